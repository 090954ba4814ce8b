"""The broker client (nodes/qdevice.py): registration, request/reply matching, events, clock."""

from __future__ import annotations

import numpy as np
import pytest

from emulator.broker.config import BrokerConfig, EntanglementConfig, LinkConfig
from emulator.broker.core import BrokerCore
from emulator.kernels import get_backend
from emulator.wire import (
    Alloc,
    Allocated,
    Bye,
    Error,
    ErrorCode,
    Hello,
    LinkInfo,
    LocalProtocolError,
    Measure,
    Measured,
    Ok,
    PeerUp,
    Welcome,
    decode,
    encode_framed,
)
from nodes.qdevice import (
    BrokerClosed,
    EventReceived,
    QDevice,
    Registered,
    RegistrationRefused,
    ReplyReceived,
    SessionState,
)

ADDR = ("127.0.0.1", 1)


def drain(q: QDevice) -> list[object]:
    out = []
    while (e := q.next_event()) is not None:
        out.append(e)
    return out


def welcome(now_s: float = 10.0, time_scale: float = 2.0) -> Welcome:
    link = LinkInfo(peer="bob", length_km=1.0, attenuation_db_per_km=0.2, jitter_s=0.0, udp_loss=0.0, entanglement=True)
    return Welcome(version=1, node="alice", now_s=now_s, time_scale=time_scale, seed=3, memory_qubits=8, links=[link])


def registered(now: float = 100.0) -> QDevice:
    q = QDevice("alice", "tok")
    q.register(tcp=ADDR, udp=ADDR, control=ADDR, now=now)
    hello = decode(q.data_to_send()[4:])
    assert isinstance(hello.message, Hello) and hello.message.node == "alice"
    q.receive_data(encode_framed(welcome(), re=hello.id), now)
    (event,) = drain(q)
    assert isinstance(event, Registered) and event.welcome.seed == 3 and event.welcome.links[0].peer == "bob"
    return q


def test_hello_carries_addresses_and_token() -> None:
    q = QDevice("alice", "tok", capabilities=("epr",))
    q.register(tcp=("127.0.0.1", 5), udp=("127.0.0.1", 6), control=("127.0.0.1", 7), now=0.0)
    msg = decode(q.data_to_send()[4:]).message
    assert msg == Hello(
        node="alice", token="tok", versions=(1,), capabilities=("epr",), tcp=("127.0.0.1", 5), udp=("127.0.0.1", 6), control=("127.0.0.1", 7)
    )
    assert "tok" not in repr(msg)
    with pytest.raises(LocalProtocolError):
        q.request(Alloc(count=1), 0.0)  # not registered yet


def test_emulated_clock_from_welcome() -> None:
    q = registered(now=100.0)
    # t_em = now_s + (wall - t_recv)/time_scale = 10 + (104 - 100)/2
    assert q.emulated_now(104.0) == pytest.approx(12.0)
    assert q.wall_time_of(12.0) == pytest.approx(104.0)
    assert q.time_scale == 2.0


def test_refused_registration() -> None:
    q = QDevice("alice", "wrong")
    q.register(tcp=ADDR, udp=ADDR, control=None, now=0.0)
    hello_id = decode(q.data_to_send()[4:]).id
    q.receive_data(encode_framed(Error.of(ErrorCode.UNAUTHORIZED, "bad token"), re=hello_id), 0.0)
    assert drain(q) == [RegistrationRefused("unauthorized", "bad token")]
    assert q.state is SessionState.CLOSED


def test_replies_are_matched_by_id_even_out_of_order_and_carry_the_tag() -> None:
    q = registered()
    id1 = q.request(Alloc(count=2), 100.0, tag=("app", 1))
    id2 = q.request(Measure(qubits=np.array([1]), bases=np.array([0], np.uint8)), 100.5, tag="m")
    assert id1 != id2
    frames = q.data_to_send()
    assert [decode(f).id for f in _split(frames)] == [id1, id2]
    q.receive_data(
        encode_framed(Measured(outcomes=np.array([1], np.uint8), now_s=11.0), re=id2)
        + encode_framed(PeerUp(node="bob", tcp=ADDR, udp=ADDR))
        + encode_framed(Allocated(qubits=np.array([4, 5])), re=id1),
        101.0,
    )
    got = drain(q)
    assert isinstance(got[0], ReplyReceived) and got[0].tag == "m" and got[0].request_id == id2
    assert isinstance(got[1], EventReceived) and isinstance(got[1].message, PeerUp)
    assert isinstance(got[2], ReplyReceived) and got[2].tag == ("app", 1)
    assert list(got[2].message.qubits) == [4, 5]  # type: ignore[attr-defined]
    stats = q.statistics()
    assert (stats.requests, stats.replies, stats.outstanding) == (2, 2, 0)
    assert stats.rtt_last_s == pytest.approx(1.0)  # wall seconds, request at 100.0, reply at 101.0


def test_error_replies_and_unknown_re_and_garbage() -> None:
    q = registered()
    rid = q.request(Alloc(count=99), 100.0, tag="a")
    q.data_to_send()
    q.receive_data(encode_framed(Error.of(ErrorCode.NO_RESOURCE, "full"), re=rid), 100.0)
    q.receive_data(encode_framed(Ok(), re=12345), 100.0)  # answers nothing we asked
    q.receive_data(b"\x00\x00\x00\x01\xc1", 100.0)  # undecodable: counted, session kept
    (reply,) = drain(q)
    assert isinstance(reply, ReplyReceived) and isinstance(reply.message, Error) and reply.message.code == "no_resource"
    stats = q.statistics()
    assert (stats.errors, stats.malformed_in) == (1, 2)
    assert q.state is SessionState.REGISTERED


def test_fatal_error_and_bye_and_eof_close_the_session() -> None:
    for frame, reason in (
        (encode_framed(Error.of(ErrorCode.INTERNAL, "boom")), "broker error internal: boom"),
        (encode_framed(Bye()), "broker said bye"),
        (b"", "broker closed the connection"),
    ):
        q = registered()
        q.receive_data(frame, 100.0)
        assert drain(q) == [BrokerClosed(reason)]
        assert q.state is SessionState.CLOSED


def test_close_sends_bye() -> None:
    q = registered()
    q.close()
    assert isinstance(decode(q.data_to_send()[4:]).message, Bye)
    assert q.state is SessionState.CLOSED


def test_against_the_real_broker_core() -> None:
    """Bytes from QDevice go straight into BrokerCore and back: registration, a request, events."""
    config = BrokerConfig.build(
        ["alice", "bob"], [LinkConfig(("alice", "bob"), 5.0, entanglement=EntanglementConfig())], seed=1
    )
    core = BrokerCore(config, backend=get_backend(), node_token="tok", admin_token="adm", now_s=0.0)
    devices = {}
    for name in ("alice", "bob"):
        q = QDevice(name, "tok")
        sid = core.open_session(0.0)
        q.register(tcp=ADDR, udp=ADDR, control=ADDR, now=0.0)
        core.receive_data(sid, q.data_to_send(), 0.0)
        q.receive_data(core.data_to_send(sid), 0.0)
        devices[name] = (q, sid)
    alice, sid_a = devices["alice"]
    alice.receive_data(core.data_to_send(sid_a), 0.0)  # peer_up sent when bob registered
    got = drain(alice)
    assert isinstance(got[0], Registered) and got[0].welcome.links[0].peer == "bob"
    assert any(isinstance(e, EventReceived) and isinstance(e.message, PeerUp) for e in got[1:])
    alice.request(Alloc(count=3), 0.0, tag="alloc")
    core.receive_data(sid_a, alice.data_to_send(), 0.0)
    alice.receive_data(core.data_to_send(sid_a), 0.0)
    (reply,) = drain(alice)
    assert isinstance(reply, ReplyReceived) and reply.tag == "alloc" and len(reply.message.qubits) == 3  # type: ignore[attr-defined]
    wrong = QDevice("carol", "nope")
    sid = core.open_session(0.0)
    wrong.register(tcp=ADDR, udp=ADDR, control=None, now=0.0)
    core.receive_data(sid, wrong.data_to_send(), 0.0)
    wrong.receive_data(core.data_to_send(sid), 0.0)
    (refused,) = drain(wrong)
    assert isinstance(refused, RegistrationRefused) and refused.code == "unauthorized"


def _split(data: bytes) -> list[bytes]:
    out = []
    while data:
        n = int.from_bytes(data[:4], "big")
        out.append(data[4 : 4 + n])
        data = data[4 + n :]
    return out
