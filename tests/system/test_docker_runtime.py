"""`qnetem run --runtime docker`: the broker and every node in its own container.

The same scenarios as the local runtime, checked through the run directory (results,
events, logs collected from the containers) and through the engine (nothing labelled
remains: the conftest checks after every test). Faults act at the container boundary:
`docker kill` / `start`, `pause` / `unpause`, network disconnect / connect.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from rich.console import Console

from emulator.runtime.docker import LABEL_RUN
from emulator.runtime.driver import RunOptions, run_scenario
from emulator.runtime.orchestrator import ExitCode

pytestmark = pytest.mark.docker

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "scenarios" / "two-node-epr.yaml"


def events_of(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines() if line.strip()]


def run_docker(path: Path, out: Path, image: str, **options: Any) -> tuple[Any, dict[str, Any]]:
    outcome = run_scenario(
        RunOptions(scenario_path=path, out_dir=out, quiet=True, runtime="docker", image=image, **options),
        console=Console(quiet=True),
    )
    results = json.loads((out / "results.json").read_text())
    return outcome, results


def variant(tmp_path: Path, **changes: Any) -> Path:
    data = yaml.safe_load(QUICKSTART.read_text())
    data.update(changes)
    data["name"] = "docker-variant"
    path = tmp_path / "variant.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_quickstart_in_containers_through_the_command(tmp_path: Path, qnetem_image: str, docker_client: Any) -> None:
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "emulator.cli", "run", str(QUICKSTART), "--runtime", "docker",
         "--image", qnetem_image, "--out", str(out), "--quiet"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "passed" and results["runtime"] == "docker"
    assert results["apps"]["epr-test-0"]["metrics"]["pairs_measured"] == 5000
    started = [e for e in events_of(out) if e["event"] == "process_started"]
    assert {e["name"] for e in started} == {"broker", "alice", "bob"}
    assert all(e["container"].startswith("qnetem-") and e["image"] == qnetem_image for e in started)
    run_id = results["run_id"]
    # Each process's log was collected from its container before the container was removed.
    assert "registered as alice" in (out / "alice.log").read_text()
    assert "registered as bob" in (out / "bob.log").read_text()
    assert (out / "broker.log").stat().st_size > 0
    for name in ("results.json", "events.jsonl", "alice.log", "bob.log", "broker.log"):
        assert "QNETEM_TOKEN=" not in (out / name).read_text()
    assert docker_client.containers.list(all=True, filters={"label": f"{LABEL_RUN}={run_id}"}) == []
    assert docker_client.networks.list(filters={"label": f"{LABEL_RUN}={run_id}"}) == []


def test_classical_links_are_private_docker_networks(tmp_path: Path, qnetem_image: str) -> None:
    """Nodes dial each other by name on the link network; the node log shows the link address."""
    out = tmp_path / "run"
    outcome, results = run_docker(QUICKSTART, out, qnetem_image)
    assert outcome.exit_code == ExitCode.OK, outcome.message
    alice = (out / "alice.log").read_text()
    assert "peer bob up (tcp bob:" in alice and "by name" in alice
    # Both endpoints were on one internal network of their own, besides the management network.
    started = [e for e in events_of(out) if e["event"] == "process_started" and e["role"] == "node"]
    assert all("--dial-by-name" in e["argv"] for e in started)


def test_crash_and_restart_in_containers(tmp_path: Path, qnetem_image: str) -> None:
    out = tmp_path / "run"
    outcome, results = run_docker(ROOT / "scenarios" / "crash-restart.yaml", out, qnetem_image)
    assert outcome.exit_code == ExitCode.OK, outcome.message
    assert [(s["step"], s["action"]) for s in results["faults"]["steps"]] == [("apply", "kill"), ("revert", "start")]
    events = events_of(out)
    killed = [e for e in events if e["event"] == "process_exited" and e["name"] == "bob"][0]
    assert killed["returncode"] == 137 and killed["expected"] is True  # docker kill: 128 + SIGKILL
    assert any(e["event"] == "node_registered" and e["node"] == "bob" and e["restarted"] for e in events)
    # The same container was started again: one log holding both lives of bob.
    assert (out / "bob.log").read_text().count("registered as bob") == 2


def test_link_cut_disconnects_the_link_network(tmp_path: Path, qnetem_image: str) -> None:
    path = variant(
        tmp_path,
        apps=[{"kind": "epr-test", "name": "epr", "nodes": ["alice", "bob"], "pairs": 20000}],
        faults=[{"at": "500ms", "kind": "link-cut", "link": ["alice", "bob"], "for": "2s"}],
        expect=[{"metric": "pairs_measured", "app": "epr", "min": 20000}],
    )
    out = tmp_path / "run"
    outcome, results = run_docker(path, out, qnetem_image)
    assert outcome.exit_code == ExitCode.OK, outcome.message
    assert [(s["step"], s["action"]) for s in results["faults"]["steps"]] == [("apply", "cut"), ("revert", "restore")]
    # The nodes did not cut anything themselves: the network went away under them and their
    # liveness probes went unanswered (2 s at one probe per 0.1 s: ~20 lost; 10 leaves margin
    # for the probes in flight around the cut). The restore gave both ends their old
    # addresses back, so the TCP connection survived by retransmission, as across a real
    # fibre cut: one connect in the whole run, and every pair's messages arrived.
    link = results["stats"]["nodes"]["alice"]["links"]["bob"]
    assert link["cuts"] == 0 and link["connected"] is True and link["connects"] == 1, link
    assert link["probes_sent"] - link["probe_acks"] >= 10, link
    assert "link to bob is down" in (out / "alice.log").read_text()
    assert "link to bob is up" in (out / "alice.log").read_text().split("link to bob is down", 1)[1]


def test_frozen_container_resumes(tmp_path: Path, qnetem_image: str) -> None:
    path = variant(
        tmp_path,
        apps=[{"kind": "epr-test", "name": "epr", "nodes": ["alice", "bob"], "pairs": 20000}],
        faults=[{"at": "500ms", "kind": "node-freeze", "node": "bob", "for": "1500ms"}],
        expect=[{"metric": "pairs_measured", "app": "epr", "min": 20000}],
    )
    out = tmp_path / "run"
    outcome, results = run_docker(path, out, qnetem_image)
    assert outcome.exit_code == ExitCode.OK, outcome.message
    assert [(s["step"], s["action"]) for s in results["faults"]["steps"]] == [
        ("apply", "pause"), ("revert", "resume"),
    ]  # fmt: skip
    assert results["apps"]["epr"]["metrics"]["wall_s"] >= 1.5


def test_a_failed_run_leaves_nothing_behind(tmp_path: Path, qnetem_image: str, docker_client: Any) -> None:
    """Registration cannot complete in 1 ms: exit 3, logs kept, every container and network removed."""
    out = tmp_path / "run"
    outcome, results = run_docker(QUICKSTART, out, qnetem_image, registration_timeout_s=0.001)
    assert outcome.exit_code == ExitCode.RUNTIME_FAILURE
    assert "registration timed out" in (outcome.message or "")
    assert results["status"] == "error"
    assert (out / "broker.log").exists()
    label = f"{LABEL_RUN}={results['run_id']}"
    assert docker_client.containers.list(all=True, filters={"label": label}) == []
    assert docker_client.networks.list(filters={"label": label}) == []


def test_qkd_in_containers_under_an_eavesdropper(tmp_path: Path, qnetem_image: str) -> None:
    """scenarios/bb84-eve.yaml, shortened, in containers: the optical layer in the broker
    container, the post-processing in the node containers over their private link
    network; both pools end identical, and the eavesdropper (an admin request to the
    broker, nothing at the container boundary) raises the alarm."""
    data = yaml.safe_load((ROOT / "scenarios" / "bb84-eve.yaml").read_text())
    data["apps"][0]["duration"] = "6s"
    data["faults"][0]["at"] = "3s"
    data["expect"] = [
        {"metric": "final_key_bits", "app": "attacked", "min": 1},
        {"metric": "alarms", "app": "attacked", "min": 1},
    ]
    path = tmp_path / "eve.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    out = tmp_path / "run"
    outcome, results = run_docker(path, out, qnetem_image)
    assert outcome.exit_code == ExitCode.OK, outcome.message
    apps = results["stats"]["apps"]["attacked"]
    alice, bob = apps["initiator"]["results"], apps["responder"]["results"]
    assert alice["pool_match"] is True and bob["pool_match"] is True
    assert alice["final_key_bits"] == bob["final_key_bits"] > 0
    assert any(e["event"] == "qkd_alarm" for e in events_of(out))


def test_key_management_in_containers_serves_the_host(tmp_path: Path, qnetem_image: str) -> None:
    """scenarios/hybrid-metro.yaml, shortened, in containers: the KMEs relay hybrid keys
    over the private link networks, the tunnel carries UDP between two containers, and an
    ETSI GS QKD 014 client on the host reaches a KME at the address in RUN/kms.json,
    with a certificate from `qnetem certs` (mutual TLS, the KME certificate names the
    container's address)."""
    import time

    import httpx

    from nodes.kms.https import client_ssl_context

    data = yaml.safe_load((ROOT / "scenarios" / "hybrid-metro.yaml").read_text())
    tunnel = next(a for a in data["apps"] if a["kind"] == "tunnel")
    tunnel["duration"] = "4s"
    data["duration"] = "20s"
    data["expect"] = [
        {"metric": "keys_delivered", "min": 3},
        {"metric": "key_mismatches", "max": 0},
        {"metric": "duplicate_deliveries", "max": 0},
        {"metric": "bytes_carried", "app": "tunnel", "min": 1},
        {"metric": "auth_failures", "app": "tunnel", "max": 0},
    ]
    path = tmp_path / "hybrid.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.Popen(
        [sys.executable, "-m", "emulator.cli", "run", str(path), "--runtime", "docker", "--image", qnetem_image,
         "--out", str(out), "--quiet"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    status: tuple[int, dict[str, Any]] | None = None
    try:
        deadline = time.monotonic() + 240
        while not (out / "kms.json").exists() and run.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        manifest = json.loads((out / "kms.json").read_text())
        url = manifest["kmes"]["alice"]["etsi014"]
        assert "127.0.0.1" not in url  # the container's address on its management network
        creds = tmp_path / "creds"
        subprocess.run([sys.executable, "-m", "emulator.cli", "certs", str(out), "--sae", "alice-app",
                        "--out", str(creds)], cwd=ROOT, env=env, check=True, capture_output=True, timeout=60)
        context = client_ssl_context((creds / "alice-app.pem").read_bytes(), (creds / "alice-app.key").read_bytes(),
                                     (creds / "ca.pem").read_bytes())
        with httpx.Client(verify=context, timeout=10) as client:
            reply = client.get(f"{url}/api/v1/keys/bob-app/status")
            status = (reply.status_code, reply.json())
    finally:
        stdout, stderr = run.communicate(timeout=300)
    assert run.returncode == 0, stdout + stderr
    results = json.loads((out / "results.json").read_text())
    assert status is not None and status[0] == 200
    assert status[1]["source_KME_ID"] == "alice" and status[1]["target_KME_ID"] == "bob"
    assert results["kms"]["metrics"]["keys_matched"] >= 3
