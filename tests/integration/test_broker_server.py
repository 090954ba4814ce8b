"""`python -m emulator.broker` as a real process on 127.0.0.1, driven over TCP with trio.

Timeouts below are safety nets against a hung process, not assertions on speed.
"""

from __future__ import annotations

import dataclasses

import functools
import json
import math
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from emulator.broker import BrokerConfig, BrokerCore, LinkConfig
from emulator.broker.server import serve_broker
from emulator.kernels import get_backend
from emulator.physics import propagation_delay_s
from emulator.scenario import scenario_from_dict, scenario_to_dict
from emulator.wire import (
    PROTOCOL_VERSION,
    AdminHello,
    AdminWelcome,
    Alloc,
    Clock,
    Allocated,
    Envelope,
    EprAccepted,
    EprDelivered,
    EprDone,
    EprListen,
    EprRequest,
    Error,
    FrameDecoder,
    Hello,
    Message,
    Ok,
    PeerUp,
    Ping,
    Pong,
    QubitTransfer,
    SendQubit,
    Shutdown,
    Status,
    StatusReply,
    Welcome,
    decode,
    encode_framed,
)

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
NODE_TOKEN = "it-node-token-5f1c"
ADMIN_TOKEN = "it-admin-token-9a7e"
SAFETY_S = 20.0

SCENARIO = {
    "name": "broker-it",
    "duration": "10s",
    "seed": 7,
    "nodes": {"alice": {"memory": {"qubits": 16}}, "bob": {}, "carol": {}},
    "links": [
        {
            "endpoints": ["alice", "bob"],
            "length_km": 10,
            "entanglement": {"scheme": "double-click", "detector_efficiency": 0.9},
        },
        {"endpoints": ["bob", "carol"], "length_km": 5, "attenuation_db_per_km": 0.0},
    ],
}


class Client:
    """A minimal blocking-style trio client: send a request, read frames."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.decoder = FrameDecoder()
        self.inbox: list[Envelope] = []
        self.next_id = 1

    @classmethod
    async def connect(cls, port: int) -> Client:
        return cls(await trio.open_tcp_stream("127.0.0.1", port))

    async def send(self, message: Message) -> int:
        msg_id = self.next_id
        self.next_id += 1
        await self.stream.send_all(encode_framed(message, id=msg_id))
        return msg_id

    async def _read_more(self) -> bool:
        data = await self.stream.receive_some(65536)
        if not data:
            return False
        self.decoder.feed(data)
        while (payload := self.decoder.next_frame()) is not None:
            self.inbox.append(decode(payload))
        return True

    async def call(self, message: Message) -> Message:
        msg_id = await self.send(message)
        with trio.fail_after(SAFETY_S):
            while True:
                for i, env in enumerate(self.inbox):
                    if env.re == msg_id:
                        del self.inbox[i]
                        return env.message
                if not await self._read_more():
                    raise EOFError("connection closed before the reply")

    async def wait_for(self, kind: type[Message]) -> Message:
        with trio.fail_after(SAFETY_S):
            while True:
                for i, env in enumerate(self.inbox):
                    if isinstance(env.message, kind):
                        del self.inbox[i]
                        return env.message
                if not await self._read_more():
                    raise EOFError(f"connection closed before a {kind.TYPE}")

    async def wait_closed(self) -> None:
        with trio.fail_after(SAFETY_S):
            while await self._read_more():
                pass

    async def register(self, node: str, token: str = NODE_TOKEN, tcp_port: int = 9000) -> Message:
        return await self.call(
            Hello(
                node=node,
                token=token,
                versions=[PROTOCOL_VERSION],
                capabilities=[],
                tcp=("127.0.0.1", tcp_port),
                udp=("127.0.0.1", tcp_port + 1),
            )
        )


class BrokerProcess:
    def __init__(self, proc: subprocess.Popen[bytes], port: int, port_file: Path) -> None:
        self.proc = proc
        self.port = port
        self.port_file = port_file

    async def wait_exit(self) -> int:
        with trio.fail_after(SAFETY_S):
            while (rc := self.proc.poll()) is None:
                await trio.sleep(0.02)
        return rc


@pytest.fixture
def scenario_file(tmp_path: Path) -> Path:
    path = tmp_path / "scenario.json"
    path.write_text(json.dumps(scenario_to_dict(scenario_from_dict(SCENARIO))))
    return path


@pytest.fixture
def spawned(tmp_path: Path) -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:  # idempotent cleanup: nothing survives a test
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=SAFETY_S)
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()


async def start_broker(scenario: Path, run_dir: Path, procs: list[subprocess.Popen[bytes]]) -> BrokerProcess:
    port_file = run_dir / "broker.port"
    env = {
        **os.environ,
        "QNETEM_TOKEN": NODE_TOKEN,
        "QNETEM_ADMIN_TOKEN": ADMIN_TOKEN,
        "PYTHONPATH": str(ROOT),
        "QNETEM_BACKEND": os.environ.get("QNETEM_BACKEND", "numpy"),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "emulator.broker", "--scenario", str(scenario), "--host", "127.0.0.1",
         "--port", "0", "--port-file", str(port_file), "--log-level", "info"],
        env=env,
        cwd=run_dir,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    procs.append(proc)
    with trio.fail_after(SAFETY_S):
        while not port_file.exists():
            if proc.poll() is not None:
                raise AssertionError(f"broker exited early: {proc.stderr.read().decode()}")  # type: ignore[union-attr]
            await trio.sleep(0.02)
    port = int(port_file.read_text())
    assert 0 < port < 65536
    return BrokerProcess(proc, port, port_file)


async def test_broker_process_end_to_end(scenario_file: Path, tmp_path: Path, spawned: list[subprocess.Popen[bytes]]) -> None:
    broker = await start_broker(scenario_file, tmp_path, spawned)

    alice = await Client.connect(broker.port)
    welcome = await alice.register("alice", tcp_port=9100)
    assert isinstance(welcome, Welcome) and welcome.memory_qubits == 16
    assert [link.peer for link in welcome.links] == ["bob"]

    bob = await Client.connect(broker.port)
    assert isinstance(await bob.register("bob", tcp_port=9200), Welcome)
    assert await alice.wait_for(PeerUp) == PeerUp(node="bob", tcp=("127.0.0.1", 9200), udp=("127.0.0.1", 9201))
    assert (await bob.wait_for(PeerUp)).node == "alice"

    # a client with the wrong token is told and disconnected; the others keep working
    intruder = await Client.connect(broker.port)
    reply = await intruder.register("carol", token="wrong")
    assert isinstance(reply, Error) and reply.code == "unauthorized"
    await intruder.wait_closed()
    await intruder.stream.aclose()
    assert isinstance(await alice.call(Ping()), Pong)

    # heralded pairs over the real timer task
    assert await bob.call(EprListen(peer="alice", accept=True)) == Ok()
    accepted = await alice.call(EprRequest(peer="bob", pairs=5))
    assert isinstance(accepted, EprAccepted)
    done_a = await alice.wait_for(EprDone)
    done_b = await bob.wait_for(EprDone)
    assert (done_a.peer, done_b.peer) == ("bob", "alice") and done_a.initiator == done_b.initiator
    assert dataclasses.replace(done_a, peer="alice") == done_b
    assert done_a.delivered == 5 and done_a.reason == "complete"
    got_a = [e.message for e in alice.inbox if isinstance(e.message, EprDelivered)]
    assert sum(len(m.pair_ids) for m in got_a) == 5

    # a qubit sent bob -> carol? carol is not registered: it is lost on arrival
    bob_q = await bob.call(Alloc(count=1))
    assert isinstance(bob_q, Allocated)
    assert await bob.call(SendQubit(qubit=int(bob_q.qubits[0]), peer="carol")) == Ok()
    transfer = await bob.wait_for(QubitTransfer)
    assert not transfer.arrived and transfer.receiver == "carol"

    # admin: status, then shutdown
    admin = await Client.connect(broker.port)
    aw = await admin.call(AdminHello(token=ADMIN_TOKEN, versions=[PROTOCOL_VERSION], client="it"))
    assert isinstance(aw, AdminWelcome)
    status = await admin.call(Status())
    assert isinstance(status, StatusReply)
    assert {n.name: n.registered for n in status.nodes} == {"alice": True, "bob": True, "carol": False}
    assert await admin.call(Shutdown()) == Ok()

    assert await broker.wait_exit() == 0
    for client in (alice, bob, admin):
        await client.wait_closed()
        await client.stream.aclose()
    with pytest.raises(OSError):
        await trio.open_tcp_stream("127.0.0.1", broker.port)  # nobody listens any more
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broker.port", "scenario.json"]  # no temp files left
    stderr = broker.proc.stderr.read().decode()  # type: ignore[union-attr]
    assert NODE_TOKEN not in stderr and ADMIN_TOKEN not in stderr
    assert "node 'alice' registered" in stderr


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_broker_process_exits_cleanly_on_signal(
    scenario_file: Path, tmp_path: Path, spawned: list[subprocess.Popen[bytes]], signum: int
) -> None:
    broker = await start_broker(scenario_file, tmp_path, spawned)
    client = await Client.connect(broker.port)
    assert isinstance(await client.register("carol"), Welcome)
    broker.proc.send_signal(signum)
    assert await broker.wait_exit() == 0
    await client.wait_closed()
    await client.stream.aclose()


async def test_broker_process_rejects_a_bad_scenario_and_missing_tokens(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**SCENARIO, "links": [{"endpoints": ["alice", "zed"], "length_km": 1}]}))
    base = {**os.environ, "PYTHONPATH": str(ROOT), "QNETEM_BACKEND": "numpy"}
    args = [sys.executable, "-m", "emulator.broker", "--scenario", str(bad), "--port-file", str(tmp_path / "p")]
    r = subprocess.run(args, env={**base, "QNETEM_TOKEN": "a", "QNETEM_ADMIN_TOKEN": "b"}, capture_output=True, timeout=SAFETY_S)
    assert r.returncode == 2 and b"zed" in r.stderr
    env = {k: v for k, v in base.items() if k not in ("QNETEM_TOKEN", "QNETEM_ADMIN_TOKEN")}
    r = subprocess.run(args, env=env, capture_output=True, timeout=SAFETY_S)
    assert r.returncode == 2 and b"QNETEM_TOKEN" in r.stderr
    assert not (tmp_path / "p").exists()


async def test_server_in_process_keeps_emulated_time(autojump_clock: trio.testing.MockClock) -> None:
    """The trio shell converts wall time with time_scale and fires timers at their deadline."""
    time_scale = 1000.0  # one emulated second lasts 1000 wall seconds (autojump: no real wait)
    cfg = BrokerConfig.build(["a", "b"], [LinkConfig(("a", "b"), 5.0, attenuation_db_per_km=0.0)], time_scale=time_scale)
    core = BrokerCore(cfg, backend=get_backend("numpy"), node_token=NODE_TOKEN, admin_token=ADMIN_TOKEN)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(functools.partial(serve_broker, core, port=0))
        a, b = await Client.connect(port), await Client.connect(port)
        assert isinstance(await a.register("a"), Welcome)
        assert isinstance(await b.register("b"), Welcome)
        wall0 = trio.current_time()
        await trio.sleep(50.0)
        pong = await a.call(Clock())
        assert isinstance(pong, Pong)
        elapsed_wall = trio.current_time() - wall0
        assert pong.now_s == pytest.approx(elapsed_wall / time_scale, abs=1e-9)

        reply = await a.call(Alloc(count=1))
        assert isinstance(reply, Allocated)
        sent_wall = trio.current_time()
        assert await a.call(SendQubit(qubit=int(reply.qubits[0]), peer="b")) == Ok()
        transfer = await b.wait_for(QubitTransfer)
        assert transfer.arrived
        # the event fires once the wall clock reaches t0 + (t_send + delay) * time_scale
        delay_wall = propagation_delay_s(5.0) * time_scale
        assert trio.current_time() - sent_wall >= delay_wall - 1e-9  # float rounding of the wall deadline
        # emulated arrival = emulated send time + fibre delay (the server started at ~wall0)
        expected_s = (sent_wall - wall0) / time_scale + propagation_delay_s(5.0)
        assert math.isclose(transfer.now_s, expected_s, abs_tol=1e-6)

        admin = await Client.connect(port)
        assert isinstance(await admin.call(AdminHello(token=ADMIN_TOKEN, versions=[PROTOCOL_VERSION], client="t")), AdminWelcome)
        assert await admin.call(Shutdown()) == Ok()
        # serve_broker returns after a shutdown: the nursery can finish on its own
    for client in (a, b, admin):
        await client.stream.aclose()
