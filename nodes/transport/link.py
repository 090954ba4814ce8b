"""One classical TCP link between two neighbours: handshake, framing, shaping (sans-IO).

Theory of operation. Bytes from the socket are pushed with `receive_data(data, now)`;
protocol events are pulled with `next_event()`; bytes to write are pulled with
`data_to_send(now)`, and `get_timer()` says when the shaper will release more. Every
outgoing frame (handshake included) goes through the sender-side `StreamShaper`, which
delays it by the link's fibre delay plus jitter (DESIGN §3). Frames use the wire
framing (4-byte length + msgpack map, docs/protocol.md §2).

The node whose name sorts first dials (the runtime decides); the dialer sends
`link_hello(node, token, versions)`, the listener checks the run token and that the
dialer is one of its neighbours and answers `link_welcome(node, version)`. While the
link to a neighbour is cut by a fault (control `link_fault`, docs/protocol.md §4.5), the
listener refuses that neighbour with `no_link`; such a refusal is `retryable`.

State table (role, state, input -> output, next state):

    DIALER    HANDSHAKE  initiate()                     -> link_hello            HANDSHAKE
    DIALER    HANDSHAKE  link_welcome from the peer     -> LinkEstablished       OPEN
    DIALER    HANDSHAKE  error / anything else          -> LinkRefused           CLOSED
    LISTENER  HANDSHAKE  link_hello, good token + peer  -> link_welcome, LinkEstablished  OPEN
    LISTENER  HANDSHAKE  link_hello, wrong token        -> error unauthorized, PeerRejected  CLOSING
    LISTENER  HANDSHAKE  link_hello, not a neighbour    -> error unknown_node, PeerRejected  CLOSING
    LISTENER  HANDSHAKE  link_hello, no common version  -> error unsupported_version         CLOSING
    LISTENER  HANDSHAKE  link_hello, link to it is cut  -> error no_link, PeerRejected  CLOSING
    LISTENER  HANDSHAKE  any other frame                -> error unauthorized                CLOSING
    any       OPEN       app_msg, kms_msg               -> MessageReceived       OPEN
    any       OPEN       error                          -> counted, PeerErrorReceived  OPEN
    any       OPEN       bye                            -> LinkClosed            CLOSED
    any       OPEN       malformed frame / wrong type   -> counted, error <code> (re = frame id, or 0)  OPEN
    any       any        length over the frame limit    -> error frame_too_large, CLOSING
    any       any        close()                        -> bye (if OPEN)         CLOSING

CLOSING means: flush what is queued (`data_to_send`), then the runtime closes the
socket once `should_close(now)` is true. Errors are never answered with errors, so two
confused peers cannot ping-pong. Tokens never appear in events, logs or messages.
"""

from __future__ import annotations

import dataclasses
import enum
import hmac
from collections import deque
from collections.abc import Callable

import msgpack

from emulator.wire import (
    DEFAULT_MAX_FRAME_BYTES,
    SUPPORTED_VERSIONS,
    AppMsg,
    KmsMsg,
    Bye,
    Error,
    ErrorCode,
    FrameDecoder,
    LinkHello,
    LinkWelcome,
    LocalProtocolError,
    Message,
    RemoteProtocolError,
    decode,
    encode_framed,
)

from .shaper import StreamShaper

__all__ = [
    "LinkClosed",
    "LinkConnection",
    "LinkEstablished",
    "LinkEvent",
    "LinkRefused",
    "LinkRole",
    "LinkState",
    "LinkStats",
    "MalformedInput",
    "MessageReceived",
    "PeerErrorReceived",
    "PeerRejected",
]


class LinkRole(enum.Enum):
    DIALER = "dialer"
    LISTENER = "listener"


class LinkState(enum.Enum):
    HANDSHAKE = "handshake"
    OPEN = "open"
    CLOSING = "closing"  # a final frame may still be queued; close once flushed
    CLOSED = "closed"


_frozen = dataclasses.dataclass(frozen=True, slots=True)


@_frozen
class LinkEstablished:
    peer: str
    version: int


@_frozen
class MessageReceived:
    peer: str
    message: AppMsg | KmsMsg


@_frozen
class LinkRefused:
    """The dialer's `link_hello` was refused (or answered with nonsense)."""

    code: str
    message: str

    @property
    def retryable(self) -> bool:
        """True when dialling again later can succeed (the link is cut at the other end)."""
        return self.code == ErrorCode.NO_LINK.value


@_frozen
class PeerRejected:
    """The listener refused a dialer; `claimed_node` is the name the dialer gave, if any."""

    code: ErrorCode
    claimed_node: str | None


@_frozen
class PeerErrorReceived:
    code: str
    message: str


@_frozen
class MalformedInput:
    """A frame from the peer could not be decoded or was not valid here; answered with `code`."""

    code: ErrorCode
    detail: str


@_frozen
class LinkClosed:
    reason: str


LinkEvent = (
    LinkEstablished | MessageReceived | LinkRefused | PeerRejected | PeerErrorReceived | MalformedInput | LinkClosed
)


@_frozen
class LinkStats:
    frames_in: int
    bytes_in: int
    frames_out: int
    bytes_out: int
    malformed_in: int
    errors_in: int


class LinkConnection:
    """The sans-IO core of one classical link connection (either end)."""

    def __init__(
        self,
        role: LinkRole,
        *,
        local_node: str,
        token: str,
        peer: str | None = None,
        shaper: StreamShaper | None = None,
        shaper_factory: Callable[[str], StreamShaper | None] | None = None,
        is_cut: Callable[[str], bool] | None = None,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
    ) -> None:
        """A DIALER needs `peer` and its `shaper`; a LISTENER needs `shaper_factory`,
        which returns the shaper towards a named neighbour or None for a non-neighbour,
        and may take `is_cut`, which says whether the link to a neighbour is cut now."""
        if role is LinkRole.DIALER and (peer is None or shaper is None):
            raise LocalProtocolError(ErrorCode.BAD_FIELD, "a dialer needs peer and shaper")
        if role is LinkRole.LISTENER and shaper_factory is None:
            raise LocalProtocolError(ErrorCode.BAD_FIELD, "a listener needs shaper_factory")
        self.role = role
        self.local_node = local_node
        self._token = token
        self.peer = peer
        self.version: int | None = None
        self.state = LinkState.HANDSHAKE
        self._shaper = shaper
        self._shaper_factory = shaper_factory
        self._is_cut = is_cut
        self._max_frame_bytes = max_frame_bytes
        self._decoder = FrameDecoder(max_frame_bytes=max_frame_bytes)
        self._raw_out: list[bytes] = []  # unshaped frames (refusals before the peer is known)
        self._events: deque[LinkEvent] = deque()
        self._next_id = 1
        self._frames_in = self._bytes_in = self._frames_out = self._bytes_out = 0
        self._malformed_in = self._errors_in = 0

    # ------------------------------------------------------------------ inputs

    def initiate(self, now: float) -> None:
        """Dialer only: queue `link_hello`."""
        if self.role is not LinkRole.DIALER or self.state is not LinkState.HANDSHAKE or self._next_id != 1:
            raise LocalProtocolError(ErrorCode.BAD_FIELD, "initiate() is for a fresh dialer")
        self._send(LinkHello(node=self.local_node, token=self._token, versions=list(SUPPORTED_VERSIONS)), now)

    def receive_data(self, data: bytes, now: float) -> None:
        """Bytes from the socket (b"" means the peer closed its side)."""
        if self.state is LinkState.CLOSED:
            return
        if not data:
            self._close_now("peer closed the connection")
            return
        self._bytes_in += len(data)
        self._decoder.feed(data)
        while self.state in (LinkState.HANDSHAKE, LinkState.OPEN):
            try:
                payload = self._decoder.next_frame()
            except RemoteProtocolError as exc:  # frame_too_large: the stream is unusable
                self._malformed_in += 1
                self._events.append(MalformedInput(exc.code, exc.message))
                self._fatal(exc.code, exc.message, now)
                return
            if payload is None:
                return
            self._frames_in += 1
            self._handle_payload(payload, now)

    def send(self, message: AppMsg | KmsMsg, now: float) -> None:
        """Queue an application or KME message (shaped). Only when OPEN."""
        if self.state is not LinkState.OPEN:
            raise LocalProtocolError(ErrorCode.NOT_REGISTERED, f"link is {self.state.value}, not open")
        self._send(message, now)

    def close(self, now: float) -> None:
        """Start a graceful close: `bye` (if open), then CLOSING."""
        if self.state is LinkState.OPEN:
            self._send(Bye(), now)
        if self.state in (LinkState.HANDSHAKE, LinkState.OPEN):
            self.state = LinkState.CLOSING
            self._events.append(LinkClosed("closed locally"))

    def connection_lost(self) -> None:
        """The socket failed or closed; nothing more will be sent or received."""
        self._close_now("connection lost")

    # ------------------------------------------------------------------ outputs

    def next_event(self) -> LinkEvent | None:
        return self._events.popleft() if self._events else None

    def data_to_send(self, now: float) -> bytes:
        """Bytes ready for the socket at wall time `now`."""
        parts = self._raw_out
        self._raw_out = []
        if self._shaper is not None:
            shaped = self._shaper.pop_ready(now)
            if shaped:
                parts.append(shaped)
        return b"".join(parts)

    def get_timer(self) -> float | None:
        """Wall time at which `data_to_send` will have more bytes, or None."""
        if self._raw_out:
            return -float("inf")
        return self._shaper.next_release() if self._shaper is not None else None

    def should_close(self) -> bool:
        """True once the runtime should close the socket (closing and fully flushed)."""
        if self.state is LinkState.CLOSED:
            return True
        if self.state is LinkState.CLOSING:
            return not self._raw_out and (self._shaper is None or self._shaper.next_release() is None)
        return False

    def statistics(self) -> LinkStats:
        return LinkStats(
            frames_in=self._frames_in,
            bytes_in=self._bytes_in,
            frames_out=self._frames_out,
            bytes_out=self._bytes_out,
            malformed_in=self._malformed_in,
            errors_in=self._errors_in,
        )

    # ------------------------------------------------------------------ internals

    def _send(self, message: Message, now: float, *, re: int | None = None, shaped: bool = True) -> None:
        frame = encode_framed(message, id=self._next_id, re=re, max_frame_bytes=self._max_frame_bytes)
        self._next_id += 1
        self._frames_out += 1
        self._bytes_out += len(frame)
        if shaped and self._shaper is not None:
            self._shaper.push(frame, now)
        else:
            self._raw_out.append(frame)

    def _refuse(self, code: ErrorCode, message: str, now: float, re: int, claimed: str | None) -> None:
        self._send(Error.of(code, message), now, re=re, shaped=False)
        self.state = LinkState.CLOSING
        self._events.append(PeerRejected(code, claimed))

    def _fatal(self, code: ErrorCode, message: str, now: float) -> None:
        self._send(Error.of(code, message), now, shaped=False)  # no `re`: fatal notice
        self.state = LinkState.CLOSING
        self._events.append(LinkClosed(f"{code.value}: {message}"))

    def _close_now(self, reason: str) -> None:
        if self.state is not LinkState.CLOSED:
            self.state = LinkState.CLOSED
            self._events.append(LinkClosed(reason))

    def _malformed(self, exc: RemoteProtocolError, re: int, now: float) -> None:
        self._malformed_in += 1
        self._events.append(MalformedInput(exc.code, exc.message))
        self._send(Error.of(exc.code, exc.message), now, re=re)

    def _handle_payload(self, payload: bytes, now: float) -> None:
        try:
            env = decode(payload)
        except RemoteProtocolError as exc:
            if self.state is LinkState.HANDSHAKE:
                if self.role is LinkRole.LISTENER:
                    self._refuse(ErrorCode.UNAUTHORIZED, "expected link_hello", now, 0, None)
                else:
                    self._events.append(LinkRefused(exc.code.value, "undecodable reply to link_hello"))
                    self._close_now("handshake failed")
                return
            self._malformed(exc, _peek_id(payload), now)
            return
        msg = env.message
        if self.state is LinkState.HANDSHAKE:
            if self.role is LinkRole.LISTENER:
                self._listener_handshake(msg, env.id, now)
            else:
                self._dialer_handshake(msg)
            return
        # OPEN
        if isinstance(msg, AppMsg | KmsMsg):
            assert self.peer is not None
            self._events.append(MessageReceived(self.peer, msg))
        elif isinstance(msg, Error):
            self._errors_in += 1
            self._events.append(PeerErrorReceived(msg.code, msg.message))
        elif isinstance(msg, Bye):
            self._close_now("peer said bye")
        else:
            self._malformed(
                RemoteProtocolError(ErrorCode.UNKNOWN_TYPE, f"{msg.TYPE!r} is not valid on an open link"), env.id, now
            )

    def _listener_handshake(self, msg: Message, msg_id: int, now: float) -> None:
        if not isinstance(msg, LinkHello):
            self._refuse(ErrorCode.UNAUTHORIZED, "expected link_hello", now, msg_id, None)
            return
        # Constant-time comparison: the token is the link's only credential.
        if not hmac.compare_digest(msg.token.encode(), self._token.encode()):
            self._refuse(ErrorCode.UNAUTHORIZED, "bad token", now, msg_id, msg.node)
            return
        common = set(msg.versions) & set(SUPPORTED_VERSIONS)
        if not common:
            self._refuse(ErrorCode.UNSUPPORTED_VERSION, f"supported versions: {list(SUPPORTED_VERSIONS)}", now, msg_id, msg.node)
            return
        assert self._shaper_factory is not None
        shaper = self._shaper_factory(msg.node) if msg.node != self.local_node else None
        if shaper is None:
            self._refuse(ErrorCode.UNKNOWN_NODE, f"{msg.node!r} is not a neighbour of {self.local_node!r}", now, msg_id, msg.node)
            return
        if self._is_cut is not None and self._is_cut(msg.node):
            self._refuse(ErrorCode.NO_LINK, f"the link {self.local_node!r}-{msg.node!r} is cut", now, msg_id, msg.node)
            return
        self._shaper = shaper
        self.peer = msg.node
        self.version = max(common)
        self._send(LinkWelcome(node=self.local_node, version=self.version), now, re=msg_id)
        self.state = LinkState.OPEN
        self._events.append(LinkEstablished(self.peer, self.version))

    def _dialer_handshake(self, msg: Message) -> None:
        if isinstance(msg, LinkWelcome) and msg.node == self.peer and msg.version in SUPPORTED_VERSIONS:
            self.version = msg.version
            self.state = LinkState.OPEN
            self._events.append(LinkEstablished(msg.node, msg.version))
            return
        if isinstance(msg, Error):
            self._events.append(LinkRefused(msg.code, msg.message))
        else:
            self._events.append(LinkRefused(ErrorCode.BAD_FIELD.value, f"unexpected {msg.TYPE!r} from {self.peer!r}"))
        self._close_now("handshake refused")



def _peek_id(payload: bytes) -> int:
    """The envelope id of an undecodable frame if it can still be read, else 0 (for `re`)."""
    try:
        raw = msgpack.unpackb(payload, raw=False, max_bin_len=len(payload), max_str_len=1 << 16)
    except Exception:  # any malformed msgpack
        return 0
    if isinstance(raw, dict):
        msg_id = raw.get("id")
        if isinstance(msg_id, int) and not isinstance(msg_id, bool) and 0 <= msg_id < 2**63:
            return msg_id
    return 0
