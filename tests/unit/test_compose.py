"""`qnetem compose` without an engine: the compose document and the files of a project.

The document is checked against what the issue asks of it (one internal network per
link with only its two endpoints, a management network for everyone, aliases the
nodes and the conductor dial, labels everywhere, nothing published, no secrets in the
file) and against what `docker stack deploy` refuses (`container_name`).
"""

from __future__ import annotations

import json
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

import emulator
from emulator.runtime.compose import (
    COMPOSE_FILE,
    ENV_FILE,
    LABEL_COMPOSE,
    ComposeProject,
    compose_document,
    write_project,
)
from emulator.runtime.docker import LABEL_RUN, LABEL_SCENARIO, broker_argv, node_argv
from emulator.runtime.driver import ADMIN_TOKEN_ENV, TOKEN_ENV, InvalidInput, load_plan

ROOT = Path(__file__).resolve().parents[2]
TWO_NODE = ROOT / "scenarios" / "two-node-epr.yaml"

_NODE = "{role: endpoint, memory: {qubits: 64, t1: inf, t2: inf, gate_fidelity: 1.0}}"
_LINK_BODY = "length_km: 5, entanglement: {scheme: double-click, detector_efficiency: 0.9, visibility: 0.95}"

CHAIN = f"""\
name: chain-3
seed: 1
duration: 20s
nodes:
  alice: {_NODE}
  relay: {_NODE}
  bob: {_NODE}
links:
  - {{endpoints: [relay, alice], {_LINK_BODY}}}
  - {{endpoints: [relay, bob], {_LINK_BODY}}}
apps:
  - {{kind: epr-test, name: ar, nodes: [alice, relay], pairs: 10, start: 0s}}
"""


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def chain(tmp_path: Path) -> Path:
    """A 3-node chain alice - relay - bob (the first link lists its endpoints unsorted)."""
    return write(tmp_path, "chain-3.yaml", CHAIN)


def document_of(path: Path, **kwargs: Any) -> dict[str, Any]:
    scenario, plan = load_plan(path)
    links = [tuple(link.endpoints) for link in scenario.links]
    options: dict[str, Any] = {"image": "qnetem:test", "run_id": "run-1", "conductor_user": "1000:1000"}
    return compose_document(plan, links=links, **{**options, **kwargs})


def walk_keys(value: Any) -> Iterator[str]:
    if isinstance(value, dict):
        for key, inner in value.items():
            yield key
            yield from walk_keys(inner)
    elif isinstance(value, list):
        for inner in value:
            yield from walk_keys(inner)


def attached(document: dict[str, Any], network: str) -> set[str]:
    return {name for name, service in document["services"].items() if network in service["networks"]}


# --------------------------------------------------------------------------- the document


def test_two_node_document_services_commands_and_mounts() -> None:
    document = document_of(TWO_NODE, backend="numpy")
    assert document["version"] == "3.8"
    services = document["services"]
    assert list(services) == ["broker", "node-alice", "node-bob", "conductor"]
    assert services["broker"]["command"] == broker_argv("/scenario/scenario.json", "numpy")
    assert services["broker"]["volumes"] == ["./scenario:/scenario:ro"]
    assert services["node-alice"]["command"] == node_argv("alice")
    assert "--dial-by-name" in services["node-bob"]["command"]
    conductor = services["conductor"]
    assert conductor["command"] == [
        "qnetem", "conductor", "--scenario", "/scenario/scenario.json", "--broker", "broker:7400", "--out", "/results",
    ]  # fmt: skip
    assert conductor["volumes"] == ["./scenario:/scenario:ro", "./results:/results"]
    assert conductor["user"] == "1000:1000"
    assert conductor["environment"]["MPLCONFIGDIR"] == "/tmp/matplotlib"
    assert conductor["depends_on"] == ["broker", "node-alice", "node-bob"]
    for service in services.values():
        assert service["image"] == "qnetem:test"
        assert service["init"] is True
        assert service["env_file"] == [ENV_FILE]
        assert service["environment"]["QNETEM_BACKEND"] == "numpy"
        assert service["deploy"]["restart_policy"] == {"condition": "none"}


def test_without_backend_no_backend_anywhere() -> None:
    document = document_of(TWO_NODE)
    assert "--backend" not in document["services"]["broker"]["command"]
    for service in document["services"].values():
        assert "QNETEM_BACKEND" not in service.get("environment", {})


def test_chain_networks_attach_only_the_link_endpoints(chain: Path) -> None:
    document = document_of(chain)
    services, networks = document["services"], document["networks"]
    # Endpoints sorted in the name, whatever order the scenario gives them.
    assert set(networks) == {"mgmt", "link-alice-relay", "link-bob-relay"}
    assert attached(document, "link-alice-relay") == {"node-alice", "node-relay"}
    assert attached(document, "link-bob-relay") == {"node-bob", "node-relay"}
    assert attached(document, "mgmt") == set(services)
    assert networks["link-alice-relay"]["internal"] is True
    assert networks["link-bob-relay"]["internal"] is True
    assert not networks["mgmt"].get("internal", False)  # the conductor reaches everyone here
    # alice and bob share no network but the management one: no path between them but via relay.
    assert set(services["node-alice"]["networks"]) & set(services["node-bob"]["networks"]) == {"mgmt"}


def test_chain_aliases(chain: Path) -> None:
    services = document_of(chain)["services"]
    assert services["broker"]["networks"] == {"mgmt": {"aliases": ["broker"]}}
    assert services["node-relay"]["networks"] == {
        "mgmt": {"aliases": ["node-relay"]},
        "link-alice-relay": {"aliases": ["relay"]},
        "link-bob-relay": {"aliases": ["relay"]},
    }
    assert services["node-alice"]["networks"]["link-alice-relay"] == {"aliases": ["alice"]}
    assert set(services["conductor"]["networks"]) == {"mgmt"}


def test_labels_on_every_service_and_network(chain: Path) -> None:
    document = document_of(chain, run_id="chain-3-compose-abcd", project_name="qnetem-abcd")
    expected = {LABEL_RUN: "chain-3-compose-abcd", LABEL_SCENARIO: "chain-3", LABEL_COMPOSE: "qnetem-abcd"}
    for name, service in document["services"].items():
        assert expected.items() <= service["labels"].items(), name
        assert expected.items() <= service["deploy"]["labels"].items(), name  # swarm service labels
    assert document["services"]["node-relay"]["labels"]["org.qnetem.node"] == "relay"
    for name, network in document["networks"].items():
        assert network["labels"] == expected, name


def test_nothing_published_and_no_container_names(chain: Path) -> None:
    keys = set(walk_keys(document_of(chain)))
    assert "ports" not in keys
    assert "container_name" not in keys  # docker stack deploy refuses it
    assert "privileged" not in keys


def test_node_faults_refused_with_one_line_each(tmp_path: Path) -> None:
    text = CHAIN + (
        "faults:\n"
        "  - {at: 1s, kind: node-crash, node: bob, for: 1s}\n"
        "  - {at: 2s, kind: link-cut, link: [alice, relay], for: 1s}\n"
        "  - {at: 3s, kind: node-freeze, node: relay, for: 1s}\n"
        "  - {at: 4s, kind: node-restart, node: alice}\n"
        "  - {at: 6s, kind: fibre-cut, link: [relay, bob]}\n"  # a link fault: not refused
    )
    with pytest.raises(InvalidInput) as info:
        document_of(write(tmp_path, "faults.yaml", text))
    problems = info.value.problems
    only = "a compose project supports link-cut, fibre-cut and the qkd-* eavesdroppers only"
    assert problems == [
        f"fault 1 (node-crash bob at 1 s for 1 s): node faults need `qnetem run --runtime docker` or the local "
        f"runtime; {only}",
        f"fault 3 (node-freeze relay at 3 s for 1 s): node faults need `qnetem run --runtime docker` or the local "
        f"runtime; {only}",
        f"fault 4 (node-restart alice at 4 s): node faults need `qnetem run --runtime docker` or the local "
        f"runtime; {only}",
    ]


def test_link_cut_allowed(tmp_path: Path) -> None:
    text = CHAIN + "faults:\n  - {at: 2s, kind: link-cut, link: [alice, relay], for: 1s}\n"
    document = document_of(write(tmp_path, "cut.yaml", text))
    assert "conductor" in document["services"]


def test_fibre_cut_allowed(tmp_path: Path) -> None:
    # The conductor cuts the classical link through the nodes' control endpoints (as for
    # link-cut) and the fibre through the broker's admin session (as for qkd_eve).
    text = CHAIN + (
        "faults:\n"
        "  - {at: 2s, kind: fibre-cut, link: [relay, alice], for: 1s}\n"
        "  - {at: 3s, kind: link-cut, link: [alice, relay], for: 1s}\n"
        "  - {at: 4s, kind: fibre-cut, link: [bob, relay]}\n"
    )
    document = document_of(write(tmp_path, "fibre.yaml", text))
    assert "conductor" in document["services"]
    assert document == document_of(write(tmp_path, "plain.yaml", CHAIN))  # the faults add or change no service


def test_eavesdropper_faults_allowed(tmp_path: Path) -> None:
    # They go to the broker's admin session (the conductor has one), not to a container.
    text = CHAIN.replace("{endpoints: [relay, bob], ", "{endpoints: [relay, bob], qkd: {transmitter: bob}, ") + (
        "faults:\n"
        "  - {at: 2s, kind: qkd-intercept-resend, link: [bob, relay], fraction: 0.25, for: 1s}\n"
        "  - {at: 4s, kind: qkd-pns, link: [relay, bob]}\n"
        "  - {at: 2s, kind: link-cut, link: [relay, bob], for: 5s}\n"
    )
    assert "qkd: {transmitter: bob}" in text
    document = document_of(write(tmp_path, "eve.yaml", text))
    assert "conductor" in document["services"]


def test_external_nodes_refused(tmp_path: Path) -> None:
    text = CHAIN.replace("  bob: {role: endpoint,", "  bob: {role: endpoint, external: true,")
    assert "external: true" in text
    with pytest.raises(InvalidInput) as info:
        document_of(write(tmp_path, "external.yaml", text))
    assert len(info.value.problems) == 1
    assert info.value.problems[0].startswith(
        "external nodes cannot run in a compose project; use `qnetem run`"
    )


# --------------------------------------------------------------------------- the project on disk


def test_write_project_files(tmp_path: Path) -> None:
    out = tmp_path / "project"
    project = write_project(TWO_NODE, out)
    assert isinstance(project, ComposeProject)
    assert project.out_dir == out.resolve()
    assert project.compose_file == out.resolve() / COMPOSE_FILE
    assert project.services == ("broker", "node-alice", "node-bob", "conductor")
    assert project.run_id.startswith("two-node-epr-compose-")
    token = project.run_id.rpartition("-")[2]
    assert project.project_name == f"qnetem-{token}"
    assert len(token) == 8

    text = project.compose_file.read_text(encoding="utf-8")
    assert text.startswith("#")  # the how-to-run header
    header = "".join(line for line in text.splitlines(keepends=True) if line.startswith("#"))
    assert "docker compose" in header and "docker-compose" in header and "docker stack deploy" in header
    assert ENV_FILE in header
    document = yaml.safe_load(text)
    assert document["services"]["conductor"]["user"] == _uid_gid()
    assert document["services"]["broker"]["image"] == f"qnetem:{emulator.__version__}"
    assert document["networks"]["mgmt"]["labels"][LABEL_RUN] == project.run_id

    scenario = json.loads((out / "scenario" / "scenario.json").read_text(encoding="utf-8"))
    assert scenario["name"] == "two-node-epr"
    results = out / "results"
    assert results.is_dir() and not any(results.iterdir())
    assert stat.S_IMODE(results.stat().st_mode) == 0o755


def test_env_file_private_and_tokens_not_in_compose_file(tmp_path: Path) -> None:
    project = write_project(TWO_NODE, tmp_path / "p", image="qnetem:other")
    env_path = project.out_dir / ENV_FILE
    assert stat.S_IMODE(env_path.stat().st_mode) == 0o600
    values = dict(
        line.split("=", 1) for line in env_path.read_text(encoding="utf-8").splitlines() if line and line[0] != "#"
    )
    assert set(values) == {TOKEN_ENV, ADMIN_TOKEN_ENV}
    assert all(len(v) >= 32 for v in values.values())
    assert values[TOKEN_ENV] != values[ADMIN_TOKEN_ENV]
    text = project.compose_file.read_text(encoding="utf-8")
    for value in values.values():
        assert value not in text
    assert TOKEN_ENV not in text and ADMIN_TOKEN_ENV not in text
    assert yaml.safe_load(text)["services"]["node-bob"]["image"] == "qnetem:other"


def test_fresh_tokens_and_run_id_per_project(tmp_path: Path) -> None:
    first = write_project(TWO_NODE, tmp_path / "a")
    second = write_project(TWO_NODE, tmp_path / "b")
    assert first.run_id != second.run_id
    assert first.project_name != second.project_name
    assert (first.out_dir / ENV_FILE).read_text() != (second.out_dir / ENV_FILE).read_text()


def test_refuses_a_foreign_non_empty_directory(tmp_path: Path) -> None:
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(InvalidInput, match="not empty and not a qnetem compose project"):
        write_project(TWO_NODE, out)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]  # untouched
    (out / COMPOSE_FILE).write_text("version: '3.8'\nservices: {}\n")  # someone else's compose file
    with pytest.raises(InvalidInput, match="not a qnetem compose project"):
        write_project(TWO_NODE, out)


def test_rewrites_a_previous_project_but_not_over_its_results(tmp_path: Path) -> None:
    first = write_project(TWO_NODE, tmp_path / "p")
    second = write_project(TWO_NODE, tmp_path / "p")
    assert second.run_id != first.run_id
    assert yaml.safe_load(second.compose_file.read_text())["networks"]["mgmt"]["labels"][LABEL_RUN] == second.run_id
    (second.out_dir / "results" / "results.json").write_text("{}")
    with pytest.raises(InvalidInput, match="previous run's results"):
        write_project(TWO_NODE, tmp_path / "p")


def test_invalid_scenario_and_refusals_write_nothing(tmp_path: Path) -> None:
    bad = write(tmp_path, "bad.yaml", "name: x\nnodes: {}\nlinks: [{endpoints: [a, b]}]\n")
    with pytest.raises(InvalidInput) as info:
        write_project(bad, tmp_path / "out")
    assert info.value.problems
    crash = write(tmp_path, "crash.yaml", CHAIN + "faults:\n  - {at: 1s, kind: node-crash, node: bob}\n")
    with pytest.raises(InvalidInput, match="fault 1 .*node faults need"):
        write_project(crash, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_compose_file_round_trips(tmp_path: Path, chain: Path) -> None:
    project = write_project(chain, tmp_path / "p")
    document = yaml.safe_load(project.compose_file.read_text(encoding="utf-8"))
    scenario, plan = load_plan(chain)
    expected = compose_document(
        plan,
        image=f"qnetem:{emulator.__version__}",
        run_id=project.run_id,
        conductor_user=_uid_gid(),
        links=[tuple(link.endpoints) for link in scenario.links],
        project_name=project.project_name,
    )
    assert document == expected


# --------------------------------------------------------------------------- helpers


def _uid_gid() -> str:
    import os

    return f"{os.getuid()}:{os.getgid()}"
