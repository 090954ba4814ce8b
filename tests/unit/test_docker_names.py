"""The pure parts of the docker runtime and the conductor: names, commands, refusals."""

from __future__ import annotations

from pathlib import Path

import pytest

from emulator.runtime.conductor import AttachedDeployment, parse_address
from emulator.runtime.docker import (
    BROKER_PORT,
    MAX_CONTAINER_NODE_NAME,
    DockerNames,
    broker_argv,
    free_subnets,
    name_length_problems,
    node_argv,
    scenario_problems,
)
from emulator.runtime.driver import load_plan

ROOT = Path(__file__).resolve().parents[2]


def test_names_of_one_run() -> None:
    names = DockerNames("qnetem-0123abcd")
    assert names.mgmt_network == "qnetem-0123abcd-mgmt"
    # One network per link, the same whichever end names it.
    assert names.link_network("bob", "alice") == names.link_network("alice", "bob") == "qnetem-0123abcd-link-alice-bob"
    assert names.container("alice") == "qnetem-0123abcd-alice"
    assert DockerNames.mgmt_alias("broker") == "broker"
    assert DockerNames.mgmt_alias("alice") == "node-alice"  # never the bare name: that is the link alias
    fresh = {DockerNames.fresh().prefix for _ in range(50)}
    assert len(fresh) == 50 and all(p.startswith("qnetem-") and len(p) == 15 for p in fresh)


def test_container_commands() -> None:
    argv = node_argv("alice")
    assert argv[:2] == ["qnetem", "node"] and argv[argv.index("--name") + 1] == "alice"
    assert argv[argv.index("--broker") + 1] == f"broker:{BROKER_PORT}"
    assert "--dial-by-name" in argv and argv[argv.index("--host") + 1] == "0.0.0.0"
    assert argv[argv.index("--advertise-host") + 1] == "node-alice"
    assert broker_argv("/s.json") == [
        "qnetem", "broker", "--scenario", "/s.json", "--host", "0.0.0.0", "--port", str(BROKER_PORT),
    ]  # fmt: skip
    assert broker_argv("/s.json", "numpy")[-2:] == ["--backend", "numpy"]
    assert not any("TOKEN" in a for a in argv + broker_argv("/s.json"))  # secrets travel in the environment


def test_node_names_that_containers_cannot_carry_are_refused() -> None:
    ok = "n" * MAX_CONTAINER_NODE_NAME
    long = "n" * (MAX_CONTAINER_NODE_NAME + 1)
    assert name_length_problems([ok]) == []
    [problem] = name_length_problems([ok, long])
    assert repr(long) in problem and "DNS label" in problem
    # The longest swarm service name stays one DNS label.
    assert len(f"qnetem-12345678_node-{ok}") == 63


def test_docker_runtime_refuses_external_nodes(tmp_path: Path) -> None:
    text = (ROOT / "scenarios" / "two-node-epr.yaml").read_text().replace("role: endpoint", "role: endpoint\n    external: true", 1)
    path = tmp_path / "ext.yaml"
    path.write_text(text)
    _, plan = load_plan(path)
    assert plan.external_nodes
    assert any("external nodes need --runtime local" in p for p in scenario_problems(plan))
    _, quickstart = load_plan(ROOT / "scenarios" / "two-node-epr.yaml")
    assert scenario_problems(quickstart) == []


@pytest.mark.parametrize(
    ("text", "expected"),
    [("broker:7400", ("broker", 7400)), ("10.0.0.2:1", ("10.0.0.2", 1)), ("[::1]:80", ("[::1]", 80))],
)
def test_parse_address(text: str, expected: tuple[str, int]) -> None:
    assert parse_address(text) == expected


@pytest.mark.parametrize("text", ["broker", "broker:", ":7400", "broker:0", "broker:65536", "broker:x"])
def test_parse_address_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="is not HOST:PORT"):
        parse_address(text)


def test_conductor_finds_control_endpoints_by_management_alias() -> None:
    deployment = AttachedDeployment(None, broker=("broker", 7400), node_host_format="node-{name}")  # type: ignore[arg-type]
    assert deployment.control_address("alice", ("0.0.0.0", 41000)) == ("node-alice", 41000)
    assert deployment.cuts_links is False  # links are cut through the nodes' control endpoints


def test_link_subnets_avoid_everything_in_use() -> None:
    from ipaddress import IPv4Network

    used = [IPv4Network("10.213.0.0/28"), IPv4Network("10.213.0.24/29"), IPv4Network("192.168.0.0/16")]
    free = free_subnets(used, "10.213.0.0/26", 29)
    assert [str(n) for n in free] == [
        "10.213.0.16/29", "10.213.0.32/29", "10.213.0.40/29", "10.213.0.48/29", "10.213.0.56/29",
    ]  # fmt: skip
    assert list(free_subnets([IPv4Network("10.0.0.0/8")], "10.213.0.0/16", 29)) == []
