"""The `qnetem` command line (run as a subprocess) and the orchestrator's admin client."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import trio
import trio.testing

import emulator
from emulator.runtime.admin_client import (
    AdminClient,
    AdminConnectionError,
    AdminRequestError,
    AdminTimeoutError,
)
from emulator.wire import (
    AdminHello,
    AdminWelcome,
    Error,
    FrameDecoder,
    NodeStatus,
    Ok,
    PeerDown,
    Shutdown,
    Status,
    StatusReply,
    decode,
    encode_framed,
)

ROOT = Path(__file__).resolve().parents[2]
GOOD = ROOT / "scenarios" / "two-node-epr.yaml"

BAD = """\
name: Bad-Name
duration: -1
nodes:
  alice: {}
  bob: {role: wizard}
links:
  - {endpoints: [alice, bob], length_km: 10, entanglement: {}}
apps:
  - {kind: epr-test, nodes: [alice, carol], pairs: 10}
"""


def qnetem(*args: str | Path, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "emulator.cli", *map(str, args)],
        cwd=cwd, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_version() -> None:
    proc = qnetem("--version")
    assert proc.returncode == 0
    assert proc.stdout.strip() == f"qnetem {emulator.__version__}"


def test_validate_good_scenario() -> None:
    proc = qnetem("validate", GOOD)
    assert proc.returncode == 0, proc.stderr
    assert "ok (scenario two-node-epr: 2 nodes, 1 links, 1 apps, 0 faults, 4 expectations)" in proc.stdout
    assert proc.stderr == ""


def test_validate_bad_scenario_prints_every_problem(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD)
    proc = qnetem("validate", bad)
    assert proc.returncode == 2
    lines = proc.stderr.splitlines()
    problems = [line for line in lines if line.startswith(f"{bad}:")]
    # One line per problem, file:line:col: field: message, in file order.
    assert any(p.startswith(f"{bad}:1:7: name: ") for p in problems), lines
    assert any(p.startswith(f"{bad}:2:11: duration: ") for p in problems), lines
    assert any(":5:" in p and "role" in p for p in problems), lines
    assert any(":9:" in p and "carol" in p for p in problems), lines
    assert lines[-1] == f"qnetem: {bad}: {len(problems)} problem(s)"
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""


def test_validate_missing_file(tmp_path: Path) -> None:
    proc = qnetem("validate", tmp_path / "nope.yaml")
    assert proc.returncode == 2
    assert "cannot read the file" in proc.stderr and "Traceback" not in proc.stderr


def test_run_invalid_scenario_exits_2_without_starting_anything(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD)
    out = tmp_path / "run"
    proc = qnetem("run", bad, "--out", out, "--quiet")
    assert proc.returncode == 2
    assert f"{bad}:1:7: name: " in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()


def test_bad_arguments_exit_2() -> None:
    for args in (("run",), ("frobnicate",), ("run", str(GOOD), "--backend", "fortran"), ()):
        proc = qnetem(*args)
        assert proc.returncode == 2, args
        assert "usage: qnetem" in proc.stderr
        assert "Traceback" not in proc.stderr


def test_help_lists_subcommands() -> None:
    proc = qnetem("--help")
    assert proc.returncode == 0
    for command in ("run", "validate", "broker", "node"):
        assert command in proc.stdout


def test_node_passthrough_execs_the_node() -> None:
    # `qnetem node` replaces itself with `python -m nodes` (emulator never imports nodes).
    proc = qnetem("node", "--help")
    assert proc.returncode == 0
    assert proc.stdout.startswith("usage: python -m nodes")


def test_broker_passthrough_reports_bad_arguments() -> None:
    # `qnetem broker` runs the broker's own argument parser in this process.
    proc = qnetem("broker", "--no-such-option")
    assert proc.returncode == 2
    assert "usage: python -m emulator.broker" in proc.stderr


# --------------------------------------------------------------------------- the orchestrator's admin client
# (in-memory streams, no sockets: the client's framing, reply matching and typed failures)

async def serve_fake(stream: trio.abc.Stream, script) -> None:  # type: ignore[no-untyped-def]
    """Answer each request with `script(message, id)` -> list of frames (bytes); None closes."""
    decoder = FrameDecoder()
    while True:
        data = await stream.receive_some(65536)
        if not data:
            return
        decoder.feed(data)
        while (payload := decoder.next_frame()) is not None:
            env = decode(payload)
            frames = script(env.message, env.id)
            if frames is None:
                await stream.aclose()
                return
            for frame in frames:
                await stream.send_all(frame)


def broker_script(message, msg_id):  # type: ignore[no-untyped-def]
    if isinstance(message, AdminHello):
        if message.token != "right-token":
            return [encode_framed(Error(code="unauthorized", message="wrong token"), re=msg_id)]
        return [encode_framed(AdminWelcome(version=1, server="broker", now_s=1.5, time_scale=1.0), re=msg_id)]
    if isinstance(message, Status):
        return [
            encode_framed(PeerDown(node="zed")),  # a pushed event: ignored by the client
            encode_framed(Ok(), re=msg_id + 100),  # a reply to something else: ignored
            encode_framed(StatusReply(now_s=2.0, nodes=[NodeStatus("alice", True)]), re=msg_id),
        ]
    if isinstance(message, Shutdown):
        return [encode_framed(Ok(), re=msg_id)]
    return [encode_framed(Error(code="unknown_type", message=message.TYPE), re=msg_id)]


async def handshake(client: AdminClient, token: str = "right-token") -> AdminWelcome:
    return await client.request(AdminHello(token=token, versions=[1], client="test"), AdminWelcome)


async def test_admin_client_matches_replies_and_ignores_events() -> None:
    left, right = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_fake, right, broker_script)
        client = AdminClient(left, peer="broker", timeout_s=5)
        welcome = await handshake(client)
        assert welcome.now_s == 1.5
        reply = await client.status()
        assert reply.now_s == 2.0 and reply.nodes[0].name == "alice"
        with pytest.raises(AdminRequestError) as info:
            await client.get_stats()
        assert info.value.code == "unknown_type"
        await client.shutdown()
        assert client.closed


async def test_admin_client_wrong_token_is_a_request_error() -> None:
    left, right = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_fake, right, broker_script)
        client = AdminClient(left, peer="broker")
        with pytest.raises(AdminRequestError, match="unauthorized") as info:
            await handshake(client, token="wrong-token")
        assert "wrong-token" not in str(info.value)  # the token never appears in an error
        await client.aclose()
        nursery.cancel_scope.cancel()


async def test_admin_client_connection_closed() -> None:
    left, right = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_fake, right, lambda message, msg_id: None)  # closes on the first request
        client = AdminClient(left, peer="node bob")
        with pytest.raises(AdminConnectionError, match="node bob closed the connection"):
            await client.status()
        assert client.closed
        with pytest.raises(AdminConnectionError, match="closed"):
            await client.status()


async def test_admin_client_shutdown_tolerates_close_without_reply() -> None:
    left, right = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_fake, right, lambda message, msg_id: None)
        client = AdminClient(left, peer="node bob")
        await client.shutdown()  # the server exiting before it answers is still a clean shutdown
        assert client.closed


async def test_admin_client_timeout(autojump_clock: trio.testing.MockClock) -> None:
    left, right = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_fake, right, lambda message, msg_id: [])  # never answers
        client = AdminClient(left, peer="broker", timeout_s=3)
        with pytest.raises(AdminTimeoutError, match="did not answer status within 3 s"):
            await client.status()
        assert client.closed
        nursery.cancel_scope.cancel()
