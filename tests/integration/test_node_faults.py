"""Node processes on 127.0.0.1: classical link cut/restore, dialling by name, waiting for the broker.

* A cut through both control endpoints (`link_fault`) takes the link down: TCP closed,
  liveness down within a few probe intervals, datagrams dropped; an epr-test started
  during the cut waits (its `start` messages queue in the outbox) and finishes after
  the restore, when the link reconnects (`connects` grows).
* `--dial-by-name`: peers reach each other at host = node name with the ports of
  `peer_up`, never at the advertised host (`--advertise-host 127.0.0.9`, where nothing
  listens). Names resolve through the QNETEM_TEST_HOSTS_FILE test seam (a node name
  cannot be made to resolve through DNS here); a name that does not resolve is retried
  and logged once, and a name added to the file later is found.
* A node started before its broker keeps trying (and gives up with exit 3 after
  `--broker-wait`).

Timeouts below are safety nets against a hung process, not assertions on speed.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import trio

from emulator.runtime.admin_client import AdminClient, AdminRequestError
from emulator.scenario import parse_scenario, scenario_to_dict
from nodes.runtime import resolve_by_dns
from tests.integration.helpers import wait_for

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
RUN_TOKEN = "faults-run-token"
ADMIN_TOKEN = "faults-admin-token"
PROBE_INTERVAL_S = 0.1  # the node default

SCENARIO = """
name: node-fault-test
seed: 5
duration: 60s
time_scale: 1
nodes:
  alice: {role: endpoint, memory: {qubits: 64}}
  bob: {role: endpoint, memory: {qubits: 64}}
links:
  - endpoints: [alice, bob]
    length_km: 5
    classical: {jitter: 0s, udp_loss: 0.0}
    entanglement: {scheme: double-click, detector_efficiency: 0.9, visibility: 0.95}
"""


def _env(**extra: str) -> dict[str, str]:
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "QNETEM_TOKEN": RUN_TOKEN, "QNETEM_ADMIN_TOKEN": ADMIN_TOKEN, **extra}
    for name in ("QNETEM_BROKER", "QNETEM_NODE_HOST", "QNETEM_DIAL_BY_NAME", "QNETEM_ADVERTISE_HOST"):
        if name not in extra:
            env.pop(name, None)
    return env


class Procs:
    """The processes of one test; every one is killed at the end."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.scenario = tmp / "scenario.json"
        self.scenario.write_text(json.dumps(scenario_to_dict(parse_scenario(SCENARIO))))

    def log(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text()

    def _start(self, name: str, argv: Sequence[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        with open(self.tmp / f"{name}.log", "wb") as log:  # the child keeps its own descriptor
            proc = subprocess.Popen(list(argv), cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        self.procs[name] = proc
        return proc

    async def start_broker(self, port: int = 0) -> int:
        port_file = self.tmp / "broker.port"
        self._start(
            "broker",
            [sys.executable, "-m", "emulator.broker", "--scenario", str(self.scenario), "--port", str(port),
             "--port-file", str(port_file)],
            _env(),
        )  # fmt: skip
        with trio.fail_after(30):
            while not port_file.exists():
                assert self.procs["broker"].poll() is None, self.log("broker")
                await trio.sleep(0.05)
        return int(port_file.read_text())

    def start_node(self, name: str, broker_port: int, *args: str, **env: str) -> subprocess.Popen[bytes]:
        return self._start(
            name,
            [sys.executable, "-m", "nodes", "--name", name, "--broker", f"127.0.0.1:{broker_port}",
             "--data-dir", str(self.tmp / name), *args],
            _env(**env),
        )  # fmt: skip

    def kill_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)


@pytest.fixture
async def procs(tmp_path: Path) -> AsyncIterator[Procs]:
    p = Procs(tmp_path)
    try:
        yield p
    finally:
        p.kill_all()


async def registered(broker_port: int) -> dict[str, Any]:
    admin = await AdminClient.connect("127.0.0.1", broker_port, ADMIN_TOKEN, peer="broker")

    async def all_registered() -> Any:
        reply = await admin.status()
        return reply if all(n.registered for n in reply.nodes) else None

    try:
        status = await wait_for(all_registered, 30, "both nodes to register")
    finally:
        await admin.aclose()
    return {n.name: n for n in status.nodes}


async def link_stats(control: dict[str, AdminClient]) -> dict[str, dict[str, Any]]:
    out = {}
    for name, peer in (("alice", "bob"), ("bob", "alice")):
        out[name] = (await control[name].get_stats()).stats["links"][peer]
    return out


async def test_link_cut_and_restore_through_the_control_endpoints(procs: Procs) -> None:
    port = await procs.start_broker()
    for name in ("alice", "bob"):
        procs.start_node(name, port)
    where = await registered(port)
    control = {name: await AdminClient.connect(*where[name].control, ADMIN_TOKEN, peer=name) for name in ("alice", "bob")}

    async def link_up() -> Any:
        links = await link_stats(control)
        return links if all(s["connected"] and s["state"] == "up" for s in links.values()) else None

    before = await wait_for(link_up, 30, "the classical link")
    assert all(s["cut"] is False and s["cuts"] == 0 for s in before.values())

    with pytest.raises(AdminRequestError) as stranger:
        await control["alice"].link_fault("carol", True)
    assert stranger.value.code == "no_link"

    # Cut: bob (the accepting end) first, so alice redials into a refusal before her own cut.
    await control["bob"].link_fault("alice", True)
    await trio.sleep(0.3)
    await control["alice"].link_fault("bob", True)
    await control["alice"].link_fault("bob", True)  # idempotent: not a second cut

    async def link_down() -> Any:
        links = await link_stats(control)
        return links if all(not s["connected"] and s["state"] == "down" for s in links.values()) else None

    # Down after 3 unanswered probes: about 0.4 s after the cut; 10 s is a safety net.
    cut = await wait_for(link_down, 10, "liveness to see the cut link down")
    assert all(s["cut"] is True and s["cuts"] == 1 for s in cut.values()), cut

    # An app started during the cut: alice's `start` messages wait in her outbox.
    common = {"pairs": 50, "wait_s": 0.0}
    await control["bob"].app_start("epr-test", "epr", {"role": "responder", "peer": "alice", **common})
    await control["alice"].app_start("epr-test", "epr", {"role": "initiator", "peer": "bob", **common})

    async def queued() -> Any:
        link = (await control["alice"].get_stats()).stats["links"]["bob"]
        return link if link["outbox"] >= 1 else None

    during = await wait_for(queued, 10, "an app message queued for the cut link")
    assert not during["connected"] and during["state"] == "down"
    await trio.sleep(5 * PROBE_INTERVAL_S)
    during = await link_stats(control)
    assert all(s["udp_cut_dropped"] > 0 and s["state"] == "down" for s in during.values()), during
    assert (await control["alice"].app_status("epr")).state == "running"

    # Restore alice first: she dials bob, whose end is still cut and refuses (no_link); she retries.
    await control["alice"].link_fault("bob", False)
    await trio.sleep(0.5)
    await control["bob"].link_fault("alice", False)
    after = await wait_for(link_up, 30, "the link to come back after the restore")
    assert all(s["cut"] is False and s["cuts"] == 1 for s in after.values()), after
    assert after["alice"]["connects"] == before["alice"]["connects"] + 1 == after["bob"]["connects"]

    async def finished() -> Any:
        a = await control["alice"].app_status("epr")
        b = await control["bob"].app_status("epr")
        return (a, b) if a.state != "running" and b.state != "running" else None

    a, b = await wait_for(finished, 60, "the epr-test run after the restore")
    assert (a.state, b.state) == ("done", "done"), (a, b)
    assert a.results["pairs_measured"] == 50
    stats = {name: (await control[name].get_stats()).stats for name in ("alice", "bob")}
    assert stats["alice"]["links"]["bob"]["outbox"] == 0 and stats["alice"]["links"]["bob"]["outbox_dropped"] == 0
    assert stats["bob"]["links_rejected"] == 0  # refusing a cut neighbour is not refusing an intruder
    assert "refused a link from alice: the link is cut" in procs.log("bob")

    for client in control.values():
        await client.shutdown()
    for name in ("alice", "bob"):
        assert await trio.to_thread.run_sync(procs.procs[name].wait, 30) == 0, procs.log(name)
        assert "Traceback" not in procs.log(name)


async def test_dial_by_name_with_an_unusable_advertised_host(procs: Procs) -> None:
    hosts = procs.tmp / "hosts"
    hosts.write_text("127.0.0.1 alice\n")  # bob does not resolve yet
    port = await procs.start_broker()
    for name in ("alice", "bob"):
        procs.start_node(
            name, port, "--dial-by-name", "--advertise-host", "127.0.0.9", QNETEM_TEST_HOSTS_FILE=str(hosts)
        )
    where = await registered(port)
    for name in ("alice", "bob"):  # hello carried the advertised host: nothing listens there
        assert where[name].tcp[0] == where[name].udp[0] == where[name].control[0] == "127.0.0.9"
    control = {
        name: await AdminClient.connect("127.0.0.1", where[name].control[1], ADMIN_TOKEN, peer=name)
        for name in ("alice", "bob")
    }

    # alice (the dialler) cannot resolve bob: she retries, logs it once, keeps running.
    async def failing() -> Any:
        link = (await control["alice"].get_stats()).stats["links"]["bob"]
        return link if link["resolve_failures"] >= 3 else None

    link = await wait_for(failing, 20, "alice to retry resolving bob")
    assert not link["connected"]
    assert procs.procs["alice"].poll() is None
    assert procs.log("alice").count("cannot resolve neighbour bob") == 1  # rate-limited to one line per 30 s

    hosts.write_text("127.0.0.1 alice\n127.0.0.1 bob\n")  # now it does: found at the next attempt

    async def link_up() -> Any:
        links = await link_stats(control)
        return links if all(s["connected"] and s["state"] == "up" for s in links.values()) else None

    await wait_for(link_up, 30, "the link by name")
    for client in control.values():
        await client.shutdown()
    for name in ("alice", "bob"):
        assert await trio.to_thread.run_sync(procs.procs[name].wait, 30) == 0, procs.log(name)
        log = procs.log(name)
        assert "Traceback" not in log and "test seam" in log
        assert RUN_TOKEN not in log and ADMIN_TOKEN not in log


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_a_node_started_before_its_broker_waits_for_it(procs: Procs) -> None:
    port = _free_port()  # nothing listens there yet
    procs.start_node("alice", port)
    procs.start_node("bob", port, "--broker-wait", "1")
    # bob gives up after its 1 s broker wait: exit 3, one line naming the broker.
    assert await trio.to_thread.run_sync(procs.procs["bob"].wait, 30) == 3
    assert procs.log("bob").strip().splitlines()[-1].startswith("qnetem node bob: error: cannot connect to the broker")
    # alice (default 30 s) is still trying; the broker comes up on that port and she registers.
    assert procs.procs["alice"].poll() is None
    assert await procs.start_broker(port) == port
    admin = await AdminClient.connect("127.0.0.1", port, ADMIN_TOKEN, peer="broker")

    async def alice_registered() -> bool:
        return any(n.name == "alice" and n.registered for n in (await admin.status()).nodes)

    await wait_for(alice_registered, 30, "alice to register with the late broker")
    await admin.aclose()


async def test_the_default_resolver_is_the_system_one() -> None:
    assert await resolve_by_dns("localhost", socket.AF_INET) == "127.0.0.1"
    assert await resolve_by_dns("127.0.0.1", socket.AF_INET) == "127.0.0.1"
