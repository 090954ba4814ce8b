"""The node control endpoint (nodes/control.py) with the real app host behind it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgpack
import pytest

from emulator.wire import (
    AdminHello,
    AdminWelcome,
    AppStart,
    AppStatus,
    AppStatusRequest,
    Envelope,
    Error,
    ErrorCode,
    GetStats,
    LinkFault,
    LinkInfo,
    Message,
    Ok,
    RemoteProtocolError,
    Shutdown,
    Stats,
    decode,
    encode_frame,
    encode_framed,
)
from nodes.apps import APP_KINDS, AppContext, AppHost, HostBrokerRequest
from nodes.control import AuthFailed, ControlSession, ControlState, MalformedInput, ShutdownRequested

ADMIN = "admin-secret"
LINKS = {
    "bob": LinkInfo(peer="bob", length_km=10.0, attenuation_db_per_km=0.2, jitter_s=0.0, udp_loss=0.0, entanglement=True),
    "carol": LinkInfo(peer="carol", length_km=5.0, attenuation_db_per_km=0.2, jitter_s=0.0, udp_loss=0.0, entanglement=False),
}


class Backend:
    """The node as the control endpoint sees it: the real AppHost, fake stats."""

    node_name = "alice"
    time_scale = 1.0

    def __init__(self) -> None:
        self.faults = []
        self.host = AppHost(
            APP_KINDS,
            lambda name: AppContext(node="alice", name=name, seed=1, time_scale=1.0, memory_qubits=10, links=LINKS),
        )

    def start_app(self, kind: str, name: str, params: Mapping[str, Any], now: float) -> None:
        self.host.start_app(kind, name, params, now)

    def app_status(self, name: str) -> AppStatus:
        return self.host.status(name)

    def stats(self, now: float) -> dict[str, Any]:
        return {"node": "alice", "apps": self.host.summary(), "links": {"bob": {"state": "up", "frames_in": 3}}}

    def link_fault(self, peer: str, cut: bool, now: float) -> None:
        if peer not in LINKS:  # as the node runtime answers
            raise RemoteProtocolError(ErrorCode.NO_LINK, f"{peer!r} is not a neighbour of 'alice'")
        self.faults.append((peer, cut, now))

    faults: list[tuple[str, bool, float]]


def replies(session: ControlSession) -> list[Envelope]:
    data = session.data_to_send()
    out = []
    while data:
        n = int.from_bytes(data[:4], "big")
        out.append(decode(data[4 : 4 + n]))
        data = data[4 + n :]
    return out


def call(session: ControlSession, message: Message, msg_id: int = 1, now: float = 2.0) -> Envelope:
    session.receive_data(encode_framed(message, id=msg_id), now)
    (reply,) = replies(session)
    assert reply.re == msg_id
    return reply


def events(session: ControlSession) -> list[object]:
    out = []
    while (e := session.next_event()) is not None:
        out.append(e)
    return out


def opened() -> tuple[ControlSession, Backend]:
    backend = Backend()
    session = ControlSession(backend, ADMIN)
    reply = call(session, AdminHello(token=ADMIN, versions=[1], client="orchestrator"), msg_id=1, now=3.5)
    assert reply.message == AdminWelcome(version=1, server="alice", now_s=3.5, time_scale=1.0)
    assert session.state is ControlState.OPEN
    return session, backend


def test_wrong_admin_token_is_unauthorized_and_closes() -> None:
    session = ControlSession(Backend(), ADMIN)
    reply = call(session, AdminHello(token="guess", versions=[1], client="mallory"))
    assert isinstance(reply.message, Error) and reply.message.code == "unauthorized"
    assert "guess" not in reply.message.message and ADMIN not in reply.message.message
    assert events(session) == [AuthFailed("mallory")]
    assert session.should_close()
    session.receive_data(encode_framed(GetStats(), id=2), 0.0)  # ignored after refusal
    assert replies(session) == []


@pytest.mark.parametrize(
    "first",
    [
        encode_framed(GetStats(), id=4),
        encode_framed(AppStart(kind="epr-test", name="x", params={}), id=4),
        encode_frame(b"\xc1"),
    ],
)
def test_anything_but_admin_hello_first_is_unauthorized(first: bytes) -> None:
    session = ControlSession(Backend(), ADMIN)
    session.receive_data(first, 0.0)
    (reply,) = replies(session)
    assert reply.message.code == "unauthorized"  # type: ignore[attr-defined]
    assert session.state is ControlState.CLOSING


def test_app_start_unknown_kind() -> None:
    session, _ = opened()
    reply = call(session, AppStart(kind="teleport-everything", name="a", params={}), msg_id=5)
    assert isinstance(reply.message, Error) and reply.message.code == "unknown_app"


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"peer": "bob", "pairs": 10}, "role"),
        ({"role": "boss", "peer": "bob", "pairs": 10}, "role"),
        ({"role": "initiator", "pairs": 10}, "peer"),
        ({"role": "initiator", "peer": "zed", "pairs": 10}, "peer"),
        ({"role": "initiator", "peer": "carol", "pairs": 10}, "peer"),  # no entanglement on that link
        ({"role": "initiator", "peer": "bob"}, "pairs"),
        ({"role": "initiator", "peer": "bob", "pairs": 0}, "pairs"),
        ({"role": "initiator", "peer": "bob", "pairs": "many"}, "pairs"),
        ({"role": "initiator", "peer": "bob", "pairs": True}, "pairs"),
        ({"role": "initiator", "peer": "bob", "pairs": 5, "wait_s": -1.0}, "wait_s"),
        ({"role": "initiator", "peer": "bob", "pairs": 5, "seed": "x"}, "seed"),
        ({"role": "initiator", "peer": "bob", "pairs": 5, "colour": "red"}, "colour"),
    ],
)
def test_app_start_bad_params_name_the_param(params: dict[str, Any], param: str) -> None:
    session, backend = opened()
    reply = call(session, AppStart(kind="epr-test", name="e", params=params), msg_id=6)
    assert isinstance(reply.message, Error) and reply.message.code == "bad_field"
    assert reply.message.message.startswith(f"params.{param}:")
    assert backend.host.app("e") is None


def test_app_start_status_stats_shutdown() -> None:
    session, backend = opened()
    params = {"role": "responder", "peer": "bob", "pairs": 100, "wait_s": 0}
    assert isinstance(call(session, AppStart(kind="epr-test", name="e", params=params), msg_id=7).message, Ok)
    # The app asked the broker to listen (the runtime would send this request).
    action = backend.host.next_action()
    assert isinstance(action, HostBrokerRequest) and action.message.TYPE == "epr_listen"
    dup = call(session, AppStart(kind="epr-test", name="e", params=params), msg_id=8)
    assert dup.message.code == "bad_field" and dup.message.message.startswith("name:")  # type: ignore[attr-defined]
    status = call(session, AppStatusRequest(name="e"), msg_id=9).message
    assert isinstance(status, AppStatus) and status.state == "running"
    assert set(status.results) == {
        "pairs_measured", "fidelity", "fidelity_stderr", "chsh", "chsh_stderr", "pair_rate_hz", "wall_s"
    }  # fmt: skip
    missing = call(session, AppStatusRequest(name="nope"), msg_id=10).message
    assert isinstance(missing, Error) and missing.code == "unknown_app"
    stats = call(session, GetStats(), msg_id=11, now=4.0).message
    assert isinstance(stats, Stats) and stats.now_s == 4.0
    assert stats.stats["apps"] == {"e": {"kind": "epr-test", "state": "running"}}
    assert isinstance(call(session, Shutdown(), msg_id=12).message, Ok)
    assert events(session) == [ShutdownRequested()]
    assert session.should_close()


def test_malformed_frames_after_auth_get_typed_errors_and_the_session_survives() -> None:
    session, _ = opened()
    session.receive_data(encode_frame(msgpack.packb({"v": 1, "t": "app_start", "id": 3, "kind": 1})), 0.0)
    session.receive_data(encode_frame(b"\xc1"), 0.0)
    session.receive_data(encode_framed(Ok(), id=4), 0.0)  # a reply type is not a request
    got = replies(session)
    assert [r.message.code for r in got] == ["bad_field", "bad_frame", "unknown_type"]  # type: ignore[attr-defined]
    assert [type(e) for e in events(session)] == [MalformedInput] * 3
    assert session.state is ControlState.OPEN
    assert isinstance(call(session, GetStats(), msg_id=5).message, Stats)


def test_oversized_frame_closes() -> None:
    session = ControlSession(Backend(), ADMIN, max_frame_bytes=64)
    session.receive_data((10_000).to_bytes(4, "big"), 0.0)
    (reply,) = replies(session)
    assert reply.message.code == "frame_too_large"  # type: ignore[attr-defined]
    assert session.should_close()


def test_link_fault_reaches_the_backend_and_is_answered_ok() -> None:
    session, backend = opened()
    assert isinstance(call(session, LinkFault(peer="bob", cut=True), msg_id=20, now=5.0).message, Ok)
    assert isinstance(call(session, LinkFault(peer="bob", cut=False), msg_id=21, now=6.0).message, Ok)
    assert backend.faults == [("bob", True, 5.0), ("bob", False, 6.0)]
    assert events(session) == []


def test_link_fault_for_a_non_neighbour_is_no_link_and_the_session_continues() -> None:
    session, backend = opened()
    reply = call(session, LinkFault(peer="zed", cut=True), msg_id=22).message
    assert isinstance(reply, Error) and reply.code == "no_link" and "zed" in reply.message
    assert backend.faults == []
    assert session.state is ControlState.OPEN
    assert isinstance(call(session, LinkFault(peer="carol", cut=True), msg_id=23).message, Ok)
    assert backend.faults == [("carol", True, 2.0)]


def test_link_fault_with_an_ill_typed_field_is_bad_field() -> None:
    session, backend = opened()
    session.receive_data(encode_frame(msgpack.packb({"v": 1, "t": "link_fault", "id": 24, "peer": "bob", "cut": 1})), 0.0)
    (reply,) = replies(session)
    assert reply.message.code == "bad_field" and "cut" in reply.message.message  # type: ignore[attr-defined]
    assert backend.faults == [] and session.state is ControlState.OPEN


def test_link_fault_before_authentication_is_unauthorized() -> None:
    backend = Backend()
    session = ControlSession(backend, ADMIN)
    reply = call(session, LinkFault(peer="bob", cut=True), msg_id=25)
    assert isinstance(reply.message, Error) and reply.message.code == "unauthorized"
    assert backend.faults == [] and session.should_close()
