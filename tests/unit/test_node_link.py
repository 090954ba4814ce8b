"""The classical link core (nodes/transport/link.py): handshake, framing, shaping, bad input."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest

from emulator.physics import FIBRE_DELAY_S_PER_KM
from emulator.wire import (
    AppMsg,
    Error,
    ErrorCode,
    LinkHello,
    LocalProtocolError,
    Ping,
    decode,
    encode_frame,
    encode_framed,
)
from nodes.transport.link import (
    LinkClosed,
    LinkConnection,
    LinkEstablished,
    LinkRefused,
    LinkRole,
    LinkState,
    MalformedInput,
    MessageReceived,
    PeerErrorReceived,
    PeerRejected,
)
from nodes.transport.shaper import ShaperConfig, StreamShaper

TOKEN = "run-token"


def shaper(delay_s: float = 0.0, jitter_s: float = 0.0, seed: int = 1) -> StreamShaper:
    return StreamShaper(ShaperConfig(delay_s=delay_s, jitter_s=jitter_s), np.random.default_rng(seed))


def make_pair(
    *, dial_token: str = TOKEN, delay_s: float = 0.0, neighbours: tuple[str, ...] = ("alice",)
) -> tuple[LinkConnection, LinkConnection]:
    dialer = LinkConnection(LinkRole.DIALER, local_node="alice", token=dial_token, peer="bob", shaper=shaper(delay_s))
    listener = LinkConnection(
        LinkRole.LISTENER,
        local_node="bob",
        token=TOKEN,
        shaper_factory=lambda peer: shaper(delay_s) if peer in neighbours else None,
    )
    return dialer, listener


def events(conn: LinkConnection) -> list[object]:
    out = []
    while (e := conn.next_event()) is not None:
        out.append(e)
    return out


def pump(a: LinkConnection, b: LinkConnection, now: float, *, chunk: int | None = None) -> None:
    """Move every byte released by `now` both ways (optionally in small chunks), until quiet."""
    for _ in range(100):
        moved = False
        for src, dst in ((a, b), (b, a)):
            data = src.data_to_send(now)
            if data:
                moved = True
                step = chunk or len(data)
                for i in range(0, len(data), step):
                    dst.receive_data(data[i : i + step], now)
        if not moved:
            return
    raise AssertionError("no quiescence")


def _frames(data: bytes) -> list[bytes]:
    out = []
    while data:
        n = int.from_bytes(data[:4], "big")
        out.append(data[4 : 4 + n])
        data = data[4 + n :]
    return out


def test_handshake_then_messages_both_ways() -> None:
    dialer, listener = make_pair()
    dialer.initiate(0.0)
    pump(dialer, listener, 0.0)
    assert dialer.state is LinkState.OPEN and listener.state is LinkState.OPEN
    assert events(listener) == [LinkEstablished("alice", 1)]
    assert events(dialer) == [LinkEstablished("bob", 1)]
    dialer.send(AppMsg(app="x", body={"op": "start", "n": 3, "blob": b"\x00\x01"}), 0.0)
    listener.send(AppMsg(app="x", body={"op": "ready"}), 0.0)
    pump(dialer, listener, 0.0, chunk=3)  # arbitrary fragmentation of the byte stream
    (got,) = events(listener)
    assert isinstance(got, MessageReceived) and got.peer == "alice"
    assert got.message.body == {"op": "start", "n": 3, "blob": b"\x00\x01"}
    (got,) = events(dialer)
    assert isinstance(got, MessageReceived) and got.message.body == {"op": "ready"}
    stats = dialer.statistics()
    assert stats.frames_out == 2 and stats.frames_in == 2 and stats.malformed_in == 0


def test_wrong_token_is_refused_with_unauthorized_and_closed() -> None:
    dialer, listener = make_pair(dial_token="not-the-token")
    dialer.initiate(0.0)
    listener.receive_data(dialer.data_to_send(0.0), 0.0)
    assert events(listener) == [PeerRejected(ErrorCode.UNAUTHORIZED, "alice")]
    assert listener.state is LinkState.CLOSING
    reply = listener.data_to_send(0.0)
    assert listener.should_close()
    env = decode(reply[4:])
    assert isinstance(env.message, Error) and env.message.code == "unauthorized"
    assert "not-the-token" not in env.message.message and TOKEN not in env.message.message
    dialer.receive_data(reply, 0.0)
    assert events(dialer) == [LinkRefused("unauthorized", env.message.message), LinkClosed("handshake refused")]
    assert dialer.state is LinkState.CLOSED


def test_non_neighbour_is_refused() -> None:
    dialer, listener = make_pair(neighbours=("carol",))
    dialer.initiate(0.0)
    pump(dialer, listener, 0.0)
    assert events(listener) == [PeerRejected(ErrorCode.UNKNOWN_NODE, "alice")]
    assert dialer.state is LinkState.CLOSED


def test_first_frame_must_be_link_hello() -> None:
    _, listener = make_pair()
    listener.receive_data(encode_framed(AppMsg(app="x", body={})), 0.0)
    assert events(listener) == [PeerRejected(ErrorCode.UNAUTHORIZED, None)]
    assert decode(listener.data_to_send(0.0)[4:]).message.code == "unauthorized"  # type: ignore[attr-defined]


def test_malformed_frames_are_answered_and_counted_and_the_link_keeps_working() -> None:
    dialer, listener = make_pair()
    dialer.initiate(0.0)
    pump(dialer, listener, 0.0)
    events(listener), events(dialer)
    bad_frames = [
        encode_frame(b"\xc1"),  # not msgpack
        encode_frame(msgpack.packb([1, 2])),  # not a map
        encode_frame(msgpack.packb({"v": 1, "t": "no_such_type", "id": 5})),
        encode_frame(msgpack.packb({"v": 1, "t": "app_msg", "id": 6, "app": 3, "body": {}})),
        encode_framed(Ping(), id=7),  # a real message, but not valid on a link
    ]
    for frame in bad_frames:
        listener.receive_data(frame, 0.0)
    got = events(listener)
    assert [type(e) for e in got] == [MalformedInput] * 5
    assert [e.code for e in got] == [  # type: ignore[attr-defined]
        ErrorCode.BAD_FRAME,
        ErrorCode.BAD_FRAME,
        ErrorCode.UNKNOWN_TYPE,
        ErrorCode.BAD_FIELD,
        ErrorCode.UNKNOWN_TYPE,
    ]
    assert listener.statistics().malformed_in == 5
    assert listener.state is LinkState.OPEN
    # The dialer sees the typed errors (answering frame ids where known) ...
    listener_out = listener.data_to_send(0.0)
    dialer.receive_data(listener_out, 0.0)
    errs = events(dialer)
    assert [e.code for e in errs] == ["bad_frame", "bad_frame", "unknown_type", "bad_field", "unknown_type"]  # type: ignore[attr-defined]
    assert all(isinstance(e, PeerErrorReceived) for e in errs)
    replies = [decode(f) for f in _frames(listener_out)]
    assert [r.re for r in replies] == [0, 0, 5, 6, 7]  # the frame id when it could be read, else 0
    # ... and errors are not answered with errors (no ping-pong), and traffic still flows.
    assert dialer.data_to_send(0.0) == b""
    dialer.send(AppMsg(app="x", body={"ok": True}), 0.0)
    pump(dialer, listener, 0.0)
    (got_msg,) = events(listener)
    assert isinstance(got_msg, MessageReceived)


def test_oversized_frame_closes_with_an_error_first() -> None:
    listener = LinkConnection(
        LinkRole.LISTENER, local_node="bob", token=TOKEN, shaper_factory=lambda p: shaper(), max_frame_bytes=1024
    )
    listener.receive_data((5000).to_bytes(4, "big") + b"x" * 10, 0.0)
    (malformed, closed) = events(listener)
    assert isinstance(malformed, MalformedInput) and malformed.code is ErrorCode.FRAME_TOO_LARGE
    assert isinstance(closed, LinkClosed)
    env = decode(listener.data_to_send(0.0)[4:])
    assert env.message.code == "frame_too_large" and env.re is None  # type: ignore[attr-defined]
    assert listener.should_close()


def test_sender_side_shaping_delays_every_frame_including_the_handshake() -> None:
    delay_s = 20.0 * FIBRE_DELAY_S_PER_KM
    dialer, listener = make_pair(delay_s=delay_s)
    dialer.initiate(0.0)
    assert dialer.data_to_send(0.0) == b""  # not yet released
    assert dialer.get_timer() == pytest.approx(delay_s)
    listener.receive_data(dialer.data_to_send(delay_s), delay_s)
    assert listener.state is LinkState.OPEN
    assert listener.data_to_send(delay_s) == b""
    dialer.receive_data(listener.data_to_send(2 * delay_s), 2 * delay_s)
    assert dialer.state is LinkState.OPEN


def test_graceful_close_sends_bye() -> None:
    dialer, listener = make_pair()
    dialer.initiate(0.0)
    pump(dialer, listener, 0.0)
    events(dialer), events(listener)
    dialer.close(0.0)
    assert dialer.state is LinkState.CLOSING and not dialer.should_close()
    listener.receive_data(dialer.data_to_send(0.0), 0.0)
    assert dialer.should_close()
    assert events(listener) == [LinkClosed("peer said bye")]
    assert listener.state is LinkState.CLOSED
    with pytest.raises(LocalProtocolError):
        listener.send(AppMsg(app="x", body={}), 0.0)


def test_peer_closing_the_socket_closes_the_link() -> None:
    dialer, listener = make_pair()
    dialer.initiate(0.0)
    pump(dialer, listener, 0.0)
    events(listener)
    listener.receive_data(b"", 0.0)
    assert events(listener) == [LinkClosed("peer closed the connection")]


def test_no_common_version_is_refused() -> None:
    _, listener = make_pair()
    listener.receive_data(encode_framed(LinkHello(node="alice", token=TOKEN, versions=[99]), id=1), 0.0)
    assert events(listener) == [PeerRejected(ErrorCode.UNSUPPORTED_VERSION, "alice")]


def test_a_cut_neighbour_is_refused_with_no_link_and_may_retry() -> None:
    cut = {"alice"}
    dialer = LinkConnection(LinkRole.DIALER, local_node="alice", token=TOKEN, peer="bob", shaper=shaper())
    listener = LinkConnection(
        LinkRole.LISTENER, local_node="bob", token=TOKEN,
        shaper_factory=lambda peer: shaper() if peer in ("alice", "carol") else None, is_cut=cut.__contains__,
    )  # fmt: skip
    dialer.initiate(0.0)
    pump(dialer, listener, 0.0)
    assert events(listener) == [PeerRejected(ErrorCode.NO_LINK, "alice")]
    assert listener.should_close()
    got = events(dialer)
    assert isinstance(got[0], LinkRefused) and got[0].code == "no_link" and got[0].retryable
    assert dialer.state is LinkState.CLOSED

    # The other refusals are final; an uncut neighbour of the same listener is welcome.
    assert not LinkRefused("unauthorized", "bad token").retryable
    assert not LinkRefused("unknown_node", "x").retryable
    carol = LinkConnection(LinkRole.DIALER, local_node="carol", token=TOKEN, peer="bob", shaper=shaper())
    listener2 = LinkConnection(
        LinkRole.LISTENER, local_node="bob", token=TOKEN,
        shaper_factory=lambda peer: shaper() if peer in ("alice", "carol") else None, is_cut=cut.__contains__,
    )  # fmt: skip
    carol.initiate(0.0)
    pump(carol, listener2, 0.0)
    assert events(listener2) == [LinkEstablished("carol", 1)]

    # Restored (is_cut is asked at each handshake): alice gets in.
    cut.clear()
    dialer, listener = (
        LinkConnection(LinkRole.DIALER, local_node="alice", token=TOKEN, peer="bob", shaper=shaper()),
        LinkConnection(
            LinkRole.LISTENER, local_node="bob", token=TOKEN, shaper_factory=lambda peer: shaper(), is_cut=cut.__contains__
        ),
    )
    dialer.initiate(0.0)
    pump(dialer, listener, 0.0)
    assert events(listener) == [LinkEstablished("alice", 1)]


def test_cut_is_checked_after_token_and_neighbourship() -> None:
    # A wrong token from a cut neighbour is still unauthorized; a stranger is still unknown_node.
    listener = LinkConnection(
        LinkRole.LISTENER, local_node="bob", token=TOKEN,
        shaper_factory=lambda peer: shaper() if peer == "alice" else None, is_cut=lambda peer: True,
    )  # fmt: skip
    listener.receive_data(encode_framed(LinkHello(node="alice", token="forged", versions=[1]), id=1), 0.0)
    assert events(listener) == [PeerRejected(ErrorCode.UNAUTHORIZED, "alice")]
    listener = LinkConnection(
        LinkRole.LISTENER, local_node="bob", token=TOKEN,
        shaper_factory=lambda peer: shaper() if peer == "alice" else None, is_cut=lambda peer: True,
    )  # fmt: skip
    listener.receive_data(encode_framed(LinkHello(node="mallory", token=TOKEN, versions=[1]), id=1), 0.0)
    assert events(listener) == [PeerRejected(ErrorCode.UNKNOWN_NODE, "mallory")]
