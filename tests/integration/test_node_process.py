"""Node processes end to end: a real broker process and two `python -m nodes` on 127.0.0.1.

Checks registration, the classical link (TCP handshake and UDP liveness), an epr-test
run driven over the control endpoints, refusal of a wrong admin token and of a wrong
link token while everything keeps working, a refused registration, and a clean
shutdown (control `shutdown` for one node, SIGTERM for the other) that leaves no
process behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio

from emulator.runtime.admin_client import AdminClient, AdminRequestError
from emulator.scenario import parse_scenario, scenario_to_dict
from emulator.wire import Error, LinkHello, decode, encode_framed
from tests.integration.helpers import wait_for

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
RUN_TOKEN = "integration-run-token"
ADMIN_TOKEN = "integration-admin-token"
PAIRS = 300

SCENARIO = """
name: node-process-test
seed: 11
duration: 60s
time_scale: 1
nodes:
  alice: {role: endpoint, memory: {qubits: 256}}
  bob: {role: endpoint, memory: {qubits: 256}}
links:
  - endpoints: [alice, bob]
    length_km: 10
    classical: {jitter: 0s, udp_loss: 0.0}
    entanglement: {scheme: double-click, detector_efficiency: 0.9, visibility: 0.95}
"""


def _env(token: str = RUN_TOKEN) -> dict[str, str]:
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "QNETEM_TOKEN": token, "QNETEM_ADMIN_TOKEN": ADMIN_TOKEN}


@dataclass
class Network:
    broker: subprocess.Popen[bytes]
    broker_port: int
    nodes: dict[str, subprocess.Popen[bytes]]
    logs: Path

    def start_node(self, name: str, token: str = RUN_TOKEN) -> subprocess.Popen[bytes]:
        with open(self.logs / f"{name}.log", "wb") as log:  # the child keeps its own descriptor
            return subprocess.Popen(
                [sys.executable, "-m", "nodes", "--name", name, "--broker", f"127.0.0.1:{self.broker_port}",
                 "--data-dir", str(self.logs / name)],
                cwd=ROOT, env=_env(token), stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip

    def all(self) -> list[subprocess.Popen[bytes]]:
        return [self.broker, *self.nodes.values()]


@pytest.fixture
async def network(tmp_path: Path) -> AsyncIterator[Network]:
    scenario = tmp_path / "scenario.json"
    scenario.write_text(json.dumps(scenario_to_dict(parse_scenario(SCENARIO))))
    port_file = tmp_path / "broker.port"
    with open(tmp_path / "broker.log", "wb") as log:
        broker = subprocess.Popen(
            [sys.executable, "-m", "emulator.broker", "--scenario", str(scenario), "--port", "0", "--port-file", str(port_file)],
            cwd=ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    net = Network(broker=broker, broker_port=0, nodes={}, logs=tmp_path)
    try:
        with trio.fail_after(30):
            while not port_file.exists():
                assert broker.poll() is None, (tmp_path / "broker.log").read_text()
                await trio.sleep(0.05)
        net.broker_port = int(port_file.read_text())
        for name in ("alice", "bob"):
            net.nodes[name] = net.start_node(name)
        yield net
    finally:
        for proc in net.all():
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)


async def test_two_node_processes(network: Network) -> None:
    net = network
    admin = await AdminClient.connect("127.0.0.1", net.broker_port, ADMIN_TOKEN, peer="broker")

    async def registered() -> Any:
        reply = await admin.status()
        return reply if all(n.registered for n in reply.nodes) else None

    status = await wait_for(registered, 30, "both nodes to register")
    where = {n.name: n for n in status.nodes}
    assert where["alice"].control is not None and where["alice"].control[0] == "127.0.0.1"
    control = {name: await AdminClient.connect(*where[name].control, ADMIN_TOKEN, peer=name) for name in ("alice", "bob")}
    assert control["alice"].welcome is not None and control["alice"].welcome.server == "alice"

    async def link_up() -> bool:
        for name, peer in (("alice", "bob"), ("bob", "alice")):
            link = (await control[name].get_stats()).stats["links"][peer]
            if not (link["connected"] and link["state"] == "up"):
                return False
        return True

    await wait_for(link_up, 30, "the classical link (TCP handshake and UDP probes)")

    # A wrong admin token is refused; the node keeps serving the good session.
    with pytest.raises(AdminRequestError) as refused:
        await AdminClient.connect(*where["alice"].control, "not-the-admin-token", peer="alice")
    assert refused.value.code == "unauthorized"

    # A wrong run token on the classical link is refused with a typed error; other links unaffected.
    stream = await trio.open_tcp_stream(*where["alice"].tcp)
    await stream.send_all(encode_framed(LinkHello(node="bob", token="forged", versions=[1]), id=1))
    data = b""
    with trio.fail_after(10):
        while len(data) < 4 or len(data) < 4 + int.from_bytes(data[:4], "big"):
            chunk = await stream.receive_some(65536)
            assert chunk, "closed without an error frame"
            data += chunk
        reply = decode(data[4 : 4 + int.from_bytes(data[:4], "big")]).message
        assert isinstance(reply, Error) and reply.code == "unauthorized"
        while await stream.receive_some(65536):  # then the node closes the connection
            pass
    await stream.aclose()

    # Garbage datagrams from strangers are dropped and counted.
    udp = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
    await udp.sendto(b"\xc1 not msgpack", tuple(where["alice"].udp))
    udp.close()

    # An epr-test run over the control endpoints (responder first, as the orchestrator does).
    common = {"pairs": PAIRS, "wait_s": 0.0}
    await control["bob"].app_start("epr-test", "epr", {"role": "responder", "peer": "alice", **common})
    await control["alice"].app_start("epr-test", "epr", {"role": "initiator", "peer": "bob", **common})
    with pytest.raises(AdminRequestError) as bad:
        await control["alice"].app_start("epr-test", "other", {"role": "initiator", "peer": "bob", "pairs": -1})
    assert bad.value.code == "bad_field" and "params.pairs" in bad.value.message
    with pytest.raises(AdminRequestError) as unknown:
        await control["alice"].app_start("no-such-app", "x", {})
    assert unknown.value.code == "unknown_app"

    async def finished() -> Any:
        a = await control["alice"].app_status("epr")
        b = await control["bob"].app_status("epr")
        return (a, b) if a.state != "running" and b.state != "running" else None

    a, b = await wait_for(finished, 60, "the epr-test run")
    assert (a.state, b.state) == ("done", "done"), (a, b)
    assert set(a.results) == {"pairs_measured", "fidelity", "fidelity_stderr", "chsh", "chsh_stderr", "pair_rate_hz", "wall_s"}
    assert a.results["pairs_measured"] == PAIRS == b.results["pairs_measured"]
    # Model F = (1 + 3 x 0.95)/4 = 0.9625 with sigma ~ 0.066 at 300 pairs: 0.6 is 5.5 sigma below (a sanity range).
    assert 0.6 < a.results["fidelity"] <= 1.0
    assert a.results["pair_rate_hz"] > 0 and a.results["wall_s"] > 0

    stats = (await control["alice"].get_stats()).stats
    assert stats["control"]["unauthorized"] == 1
    assert stats["links_rejected"] == 1
    assert stats["udp"]["unknown_source"] >= 1
    link = stats["links"]["bob"]
    assert link["connected"] and link["frames_in"] > 0 and link["bytes_out"] > 0 and link["malformed_in"] == 0
    assert stats["broker"]["replies"] > 0 and stats["broker"]["rtt_mean_wall_s"] > 0
    assert stats["apps"] == {"epr": {"kind": "epr-test", "state": "done"}}

    # A node with the wrong run token is refused registration: nonzero exit, one line of error.
    intruder = net.start_node("carol", token="wrong-run-token")
    code = await trio.to_thread.run_sync(intruder.wait, 30)
    assert code == 2
    lines = (net.logs / "carol.log").read_text().strip().splitlines()
    assert lines[-1].startswith("qnetem node carol: error: broker refused registration: unauthorized")
    assert "wrong-run-token" not in (net.logs / "carol.log").read_text()

    # Clean shutdown: alice by control, bob by SIGTERM, then the broker.
    await control["alice"].shutdown()
    net.nodes["bob"].send_signal(signal.SIGTERM)
    for name, proc in net.nodes.items():
        assert await trio.to_thread.run_sync(proc.wait, 30) == 0, (net.logs / f"{name}.log").read_text()
    await admin.shutdown()
    assert await trio.to_thread.run_sync(net.broker.wait, 30) == 0
    await control["bob"].aclose()
    assert all(p.poll() is not None for p in net.all())
    for name in ("alice", "bob"):
        log = (net.logs / f"{name}.log").read_text()
        assert RUN_TOKEN not in log and ADMIN_TOKEN not in log
        assert "Traceback" not in log, log
