"""The orchestrator's side of key management: the `kms` section, the `tunnel` app, the
plan, the credentials the driver hands each KME and the run's `kms` metrics."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
from cryptography import x509

from emulator.report.results import AppOutcome, AppState, ExpectationSpec, evaluate_expectations
from emulator.runtime.kms import KmsSetup, kms_metrics
from emulator.runtime.orchestrator import plan_from_scenario
from emulator.scenario import ScenarioError, parse_scenario

ROOT = Path(__file__).resolve().parents[2]

BASE = """
name: kms-plan
duration: 20s
nodes: {alice: {}, relay: {}, bob: {}, carol: {}}
links:
  - {endpoints: [alice, relay], length_km: 10, qkd: {transmitter: alice}}
  - {endpoints: [relay, bob], length_km: 10, qkd: {transmitter: relay}}
  - {endpoints: [bob, carol], length_km: 10}
"""

KMS = """
kms:
  saes:
    - {id: alice-app, node: alice}
    - {id: bob-app, node: bob}
  policies:
    - {saes: [alice-app, bob-app], policy: hybrid, on_empty: pqc}
  key_size: 256
"""

TUNNEL = """
apps:
  - {kind: tunnel, name: t, nodes: [alice, bob], saes: [alice-app, bob-app], duration: 5s, rate: 20}
"""


def problems(text: str) -> list[str]:
    with pytest.raises(ScenarioError) as info:
        parse_scenario(text)
    return [f"{p.field}: {p.message}" for p in info.value.problems]


def test_the_kms_section_and_a_tunnel_validate_and_plan() -> None:
    scenario = parse_scenario(BASE + KMS + TUNNEL + "expect:\n  - {metric: key_mismatches, max: 0}\n")
    plan = plan_from_scenario(scenario)
    assert plan.kms is not None
    assert plan.kms.kme_nodes == ("alice", "relay", "bob")  # carol has no QKD link: no KME
    assert plan.kms.kms_links == (("alice", "relay"), ("relay", "bob"))
    assert dict(plan.kms.saes) == {"alice-app": "alice", "bob-app": "bob"}
    assert plan.kms.policies[0]["policy"] == "hybrid" and plan.kms.policies[0]["on_empty"] == "pqc"
    (tunnel,) = plan.apps
    # The receiver initiates (its results are the app's metrics): nodes reversed.
    assert (tunnel.initiator, tunnel.responder) == ("bob", "alice")
    assert tunnel.settings["saes"] == ["alice-app", "bob-app"] and tunnel.progress_metric == "bytes_carried"
    assert plan.expectations[0].app is None


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ("kms:\n  saes: [{id: x-app, node: carol}]\n", "has no QKD link"),
        ("kms:\n  saes: [{id: x-app, node: nobody}]\n", "unknown node 'nobody'"),
        ("kms:\n  saes: [{id: a, node: alice}, {id: a, node: bob}]\n", "duplicate SAE id 'a'"),
        ("kms:\n  saes: [{id: kme-alice, node: alice}]\n", "starts with 'kme-'"),
        ("kms:\n  saes: [{id: a, node: alice}]\n  policies: [{saes: [a, zz]}]\n", "unknown SAE 'zz'"),
        ("kms:\n  saes: [{id: a, node: alice}]\n  key_size: 100\n", "multiple of 8"),
        ("kms:\n  saes: [{id: a, node: alice}]\n  policies: [{saes: [a, a]}]\n", "two different SAEs"),
        ("expect:\n  - {metric: keys_delivered, min: 1}\n", "needs a `kms` section"),
        (KMS + "expect:\n  - {metric: keys_delivered, app: t, min: 1}\n", "drop `app`"),
        (KMS + "apps:\n  - {kind: tunnel, nodes: [alice, bob], saes: [bob-app, alice-app], duration: 1s}\n",
         "is served by 'bob', not by 'alice'"),
        ("apps:\n  - {kind: tunnel, nodes: [alice, bob], saes: [a, b], duration: 1s}\n", "needs a `kms` section"),
    ],
)
def test_kms_and_tunnel_mistakes_are_named(extra: str, expected: str) -> None:
    found = problems(BASE + extra)
    assert any(expected in p for p in found), found


def test_the_shipped_hybrid_scenario_plans_a_hybrid_pair() -> None:
    from emulator.scenario import load_scenario

    plan = plan_from_scenario(load_scenario(ROOT / "scenarios" / "hybrid-metro.yaml"))
    assert plan.kms is not None and plan.kms.kme_nodes == ("alice", "relay", "bob")
    assert plan.kms.policies[0]["policy"] == "hybrid"


def test_setup_issues_chained_credentials_and_a_manifest_without_secrets(tmp_path: Path) -> None:
    plan = plan_from_scenario(parse_scenario(BASE + KMS))
    assert plan.kms is not None
    setup = KmsSetup(plan.kms, "kms-plan", tmp_path)
    ca = x509.load_pem_x509_certificate((tmp_path / "certs" / "ca.pem").read_bytes())
    assert stat.S_IMODE((tmp_path / "certs" / "ca.key").stat().st_mode) == 0o600
    alice = setup.config_for("alice")
    relay = setup.config_for("relay")
    kme_cert = x509.load_pem_x509_certificate(alice["kme_cert_pem"])
    kme_cert.verify_directly_issued_by(ca)
    assert kme_cert.subject.rfc4514_string() == "CN=kme-alice"
    # Each node gets the credentials of its own SAEs only.
    assert set(alice["sae_credentials"]) == {"alice-app"} and relay["sae_credentials"] == {}
    sae_cert = x509.load_pem_x509_certificate(alice["sae_credentials"]["alice-app"]["cert_pem"])
    sae_cert.verify_directly_issued_by(ca)
    assert alice["fingerprint_salt"] == relay["fingerprint_salt"] and len(alice["fingerprint_salt"]) == 16
    setup.started("alice", "127.0.0.1", 4430, 4431)
    path = setup.write_manifest()
    manifest = json.loads(path.read_text())
    assert manifest["kmes"] == {"alice": {"etsi014": "https://127.0.0.1:4430", "skip": "https://127.0.0.1:4431"}}
    assert manifest["saes"] == {"alice-app": "alice", "bob-app": "bob"}
    text = path.read_text()
    assert "PRIVATE KEY" not in text and alice["fingerprint_salt"].hex() not in text
    assert "PRIVATE" not in repr(setup)


def _node(*rows: tuple[str, str, str, str], **counters: int) -> dict[str, object]:
    return {"kms": {"deliveries": [dict(zip(("key_id", "sae", "role", "fp"), r, strict=True)) for r in rows],
                    "counters": counters}}


def test_metrics_count_matches_mismatches_and_duplicates() -> None:
    nodes = {
        "alice": _node(("k1", "a", "master", "f1"), ("k2", "a", "master", "f2"), ("k3", "a", "master", "f3"),
                       keys_confirmed=5, reroutes=1),
        "bob": _node(("k1", "b", "slave", "f1"), ("k2", "b", "slave", "XX"), ("k1", "b", "slave", "f1"),
                     keys_confirmed=2, kms_errors=3),
        "relay": {"kms": None},
        "broken": {"error": "gone"},
    }
    m = kms_metrics(nodes)
    assert m["keys_delivered"] == 3  # k1, k2, k3 went to their master SAE
    assert m["keys_matched"] == 1  # k1: both ends agree
    assert m["key_mismatches"] == 1  # k2: the fingerprints differ
    assert m["duplicate_deliveries"] == 1  # k1 went to b twice
    assert m["keys_relayed"] == 7 and m["reroutes"] == 1 and m["kms_errors"] == 3
    assert kms_metrics({"alice": {"kms": None}}) == {}


def test_kms_expectations_read_the_run_metrics() -> None:
    specs = (ExpectationSpec("key_mismatches", None, max=0), ExpectationSpec("keys_delivered", None, min=5))
    apps: dict[str, AppOutcome] = {"t": AppOutcome("t", "tunnel", ("a", "b"), AppState.DONE)}
    ok, low = evaluate_expectations(specs, apps, {"key_mismatches": 0.0, "keys_delivered": 4.0})
    assert ok.passed and ok.target == "the key management"
    assert not low.passed and "below the minimum 5" in low.message
    (missing,) = evaluate_expectations(specs[:1], apps, None)
    assert not missing.passed and "could not be collected" in missing.message


def test_the_report_has_a_key_management_section(tmp_path: Path) -> None:
    from emulator.report.html import write_report

    results = {
        "run_id": "r", "apps": {}, "expectations": [],
        "kms": {"metrics": {"keys_delivered": 7.0, "key_mismatches": 0.0},
                "kmes": {"alice": {"etsi014": "https://127.0.0.1:4430", "skip": "https://127.0.0.1:4431"}}},
        "stats": {"nodes": {"alice": {"kms": {"counters": {"keys_confirmed": 12, "reroutes": 2},
                                              "store": {"bob": {"ready": 5, "delivered": 7}}}}}},
    }  # fmt: skip
    html = write_report(tmp_path, results, {"name": "r", "nodes": {}}).read_text()
    section = html[html.index("<h2>Key management</h2>"):]
    assert "keys_delivered" in section and "https://127.0.0.1:4430" in section
    assert ">12<" in section and ">5<" in section  # relays confirmed, ready keys
    empty = write_report(tmp_path, {"run_id": "r", "apps": {}}, {"name": "r", "nodes": {}}).read_text()
    assert "no key management" in empty


def test_a_run_with_key_management_lasts_its_whole_duration() -> None:
    """Outside SAEs use the KMEs after the scenario's own apps finished."""
    from emulator.runtime.orchestrator import FinishReason, Timeline

    plan = plan_from_scenario(parse_scenario(BASE + KMS + TUNNEL))
    timeline = Timeline(plan)
    timeline.begin(0.0)
    timeline.mark_started("t", 0.0)
    timeline.observe("t", "initiator", "done", {"bytes_carried": 1}, 6.0)
    assert timeline.finish_reason(6.0) is None  # every app is done, the KMEs still serve
    assert timeline.finish_reason(20.0) is FinishReason.DURATION_ELAPSED
