"""The node's control endpoint: orchestrator -> node admin session (sans-IO).

Theory of operation. The orchestrator connects to the node's control listener and
speaks framed msgpack like every other stream (docs/protocol.md §2). One
`ControlSession` is one such connection. It authenticates, then turns requests into
calls on a `ControlBackend` (the node) and frames the replies.

State table:

    AWAIT_HELLO  admin_hello, right token   -> admin_welcome(server=node)     OPEN
    AWAIT_HELLO  admin_hello, wrong token   -> error unauthorized, AuthFailed CLOSING
    AWAIT_HELLO  anything else / bad frame  -> error unauthorized, AuthFailed CLOSING
    OPEN         app_start(kind,name,params)-> ok | error unknown_app | error bad_field
    OPEN         app_status_request(name)   -> app_status | error unknown_app
    OPEN         get_stats                  -> stats
    OPEN         link_fault(peer, cut)      -> ok | error no_link (not a neighbour)
    OPEN         kms_start(config)          -> KmsStartRequested; the node answers later
                                               with reply(): kms_started | error bad_field
    OPEN         shutdown                   -> ok, ShutdownRequested         CLOSING
    OPEN         ping                       -> pong
    OPEN         bye                        ->                               CLOSED
    OPEN         malformed frame / other    -> error <code>, MalformedInput  OPEN
    any          frame over the size limit  -> error frame_too_large         CLOSING

`now` is the node's emulated time. The admin token is compared in constant time and is
never echoed. A failed authentication affects only this connection.
"""

from __future__ import annotations

import dataclasses
import enum
import hmac
from collections import deque
from collections.abc import Mapping
from typing import Any, Protocol

from emulator.wire import (
    SUPPORTED_VERSIONS,
    AdminHello,
    AdminWelcome,
    AppStart,
    AppStatus,
    AppStatusRequest,
    Bye,
    Error,
    ErrorCode,
    FrameDecoder,
    GetStats,
    KmsStart,
    LinkFault,
    Message,
    Ok,
    Ping,
    Pong,
    RemoteProtocolError,
    Shutdown,
    Stats,
    decode,
    encode_framed,
)

__all__ = [
    "AuthFailed",
    "ControlBackend",
    "ControlEvent",
    "ControlSession",
    "ControlState",
    "KmsStartRequested",
    "MalformedInput",
    "ShutdownRequested",
]

# Control requests are small; a tighter input limit than the wire default.
_CONTROL_MAX_FRAME_BYTES = 4 * 1024 * 1024


class ControlBackend(Protocol):
    """What the control endpoint needs from the node."""

    @property
    def node_name(self) -> str: ...

    @property
    def time_scale(self) -> float: ...

    def start_app(self, kind: str, name: str, params: Mapping[str, Any], now: float) -> None:
        """Start an app; raise RemoteProtocolError (unknown_app, bad_field, ...) on refusal."""

    def app_status(self, name: str) -> AppStatus:
        """Raise RemoteProtocolError(unknown_app) for an unknown instance."""

    def stats(self, now: float) -> dict[str, Any]: ...

    def link_fault(self, peer: str, cut: bool, now: float) -> None:
        """Cut or restore the classical link to `peer` (idempotent);
        raise RemoteProtocolError(no_link) if `peer` is not a neighbour."""


class ControlState(enum.Enum):
    AWAIT_HELLO = "await_hello"
    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"


@dataclasses.dataclass(frozen=True, slots=True)
class AuthFailed:
    client: str | None  # the name the client gave, if it got that far


@dataclasses.dataclass(frozen=True, slots=True)
class ShutdownRequested:
    pass


@dataclasses.dataclass(frozen=True, slots=True)
class KmsStartRequested:
    """`kms_start` arrived: the node starts its KME (async) and answers with `reply(re, ...)`."""

    re: int
    config: dict[str, Any] = dataclasses.field(repr=False)  # holds private keys


@dataclasses.dataclass(frozen=True, slots=True)
class MalformedInput:
    code: ErrorCode
    detail: str


ControlEvent = AuthFailed | ShutdownRequested | MalformedInput | KmsStartRequested


class ControlSession:
    def __init__(self, backend: ControlBackend, admin_token: str, *, max_frame_bytes: int = _CONTROL_MAX_FRAME_BYTES) -> None:
        self._backend = backend
        self._admin_token = admin_token
        self._decoder = FrameDecoder(max_frame_bytes=max_frame_bytes)
        self._out: list[bytes] = []
        self._events: deque[ControlEvent] = deque()
        self.state = ControlState.AWAIT_HELLO
        self.client: str | None = None

    # ------------------------------------------------------------------ inputs

    def receive_data(self, data: bytes, now: float) -> None:
        if self.state in (ControlState.CLOSING, ControlState.CLOSED):
            return
        if not data:
            self.state = ControlState.CLOSED
            return
        self._decoder.feed(data)
        while self.state in (ControlState.AWAIT_HELLO, ControlState.OPEN):
            try:
                payload = self._decoder.next_frame()
            except RemoteProtocolError as exc:
                self._events.append(MalformedInput(exc.code, exc.message))
                self._reply(Error.of(exc.code, exc.message))
                self.state = ControlState.CLOSING
                return
            if payload is None:
                return
            self._handle(payload, now)

    def reply(self, re: int, message: Message) -> None:
        """Answer a request the node handles asynchronously (`KmsStartRequested`)."""
        if self.state is ControlState.OPEN:
            self._reply(message, re)

    # ------------------------------------------------------------------ outputs

    def next_event(self) -> ControlEvent | None:
        return self._events.popleft() if self._events else None

    def data_to_send(self) -> bytes:
        out = b"".join(self._out)
        self._out.clear()
        return out

    def should_close(self) -> bool:
        return self.state is ControlState.CLOSED or (self.state is ControlState.CLOSING and not self._out)

    # ------------------------------------------------------------------ internals

    def _reply(self, message: Message, re: int | None = None) -> None:
        try:  # replies may exceed the (input) request limit, e.g. a big stats snapshot
            frame = encode_framed(message, re=re)
        except Exception as exc:  # e.g. stats too large or not encodable: say so, keep the session
            frame = encode_framed(Error.of(ErrorCode.INTERNAL, f"reply not encodable: {type(exc).__name__}"), re=re)
        self._out.append(frame)

    def _handle(self, payload: bytes, now: float) -> None:
        try:
            env = decode(payload)
        except RemoteProtocolError as exc:
            if self.state is ControlState.AWAIT_HELLO:
                self._unauthorized(0, "expected admin_hello")
            else:
                self._events.append(MalformedInput(exc.code, exc.message))
                self._reply(Error.of(exc.code, exc.message), re=0)
            return
        msg, re = env.message, env.id
        if self.state is ControlState.AWAIT_HELLO:
            if not isinstance(msg, AdminHello):
                self._unauthorized(re, "expected admin_hello")
                return
            self.client = msg.client[:64]
            if not hmac.compare_digest(msg.token.encode(), self._admin_token.encode()):
                self._unauthorized(re, "bad admin token")
                return
            common = set(msg.versions) & set(SUPPORTED_VERSIONS)
            if not common:
                self._reply(Error.of(ErrorCode.UNSUPPORTED_VERSION, f"supported: {list(SUPPORTED_VERSIONS)}"), re)
                self.state = ControlState.CLOSING
                return
            self.state = ControlState.OPEN
            self._reply(
                AdminWelcome(
                    version=max(common),
                    server=self._backend.node_name,
                    now_s=now,
                    time_scale=self._backend.time_scale,
                ),
                re,
            )
            return
        try:
            self._dispatch(msg, re, now)
        except RemoteProtocolError as exc:
            self._reply(Error.of(exc.code, exc.message), re)
        except Exception as exc:  # a bug behind the endpoint: say so, keep the session
            self._reply(Error.of(ErrorCode.INTERNAL, f"{msg.TYPE} failed: {type(exc).__name__}"), re)

    def _dispatch(self, msg: Message, re: int, now: float) -> None:
        if isinstance(msg, AppStart):
            self._backend.start_app(msg.kind, msg.name, msg.params, now)
            self._reply(Ok(), re)
        elif isinstance(msg, AppStatusRequest):
            self._reply(self._backend.app_status(msg.name), re)
        elif isinstance(msg, GetStats):
            self._reply(Stats(now_s=now, stats=self._backend.stats(now)), re)
        elif isinstance(msg, KmsStart):
            self._events.append(KmsStartRequested(re, msg.config))
        elif isinstance(msg, LinkFault):
            self._backend.link_fault(msg.peer, msg.cut, now)
            self._reply(Ok(), re)
        elif isinstance(msg, Shutdown):
            self._reply(Ok(), re)
            self.state = ControlState.CLOSING
            self._events.append(ShutdownRequested())
        elif isinstance(msg, Ping):
            self._reply(Pong(now_s=now), re)
        elif isinstance(msg, Bye):
            self.state = ControlState.CLOSED
        else:
            self._events.append(MalformedInput(ErrorCode.UNKNOWN_TYPE, msg.TYPE))
            raise RemoteProtocolError(ErrorCode.UNKNOWN_TYPE, f"{msg.TYPE!r} is not a control request")

    def _unauthorized(self, re: int, why: str) -> None:
        self._events.append(AuthFailed(self.client))
        self._reply(Error.of(ErrorCode.UNAUTHORIZED, why), re)
        self.state = ControlState.CLOSING
