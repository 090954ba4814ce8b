"""Client of the broker: the node's quantum-hardware driver (sans-IO).

Theory of operation. One `QDevice` is one broker session (DESIGN §4). The runtime
pushes socket bytes with `receive_data(data, now)` and writes `data_to_send()`; the
caller registers with `register(...)` (queues `hello`) and, once `Registered` has been
pulled from `next_event()`, issues requests with `request(message, tag=...)`.

* Request ids are allocated here (1, 2, ...). Each outstanding id remembers the
  caller's opaque `tag` (the app host uses `(app name, app tag)`), so a reply comes
  back as `ReplyReceived(tag, message)` without the caller tracking ids. A reply is
  the expected message or an `error`; both are delivered the same way.
* Frames without `re` are pushed events (`peer_up`, `epr_delivered`, ...), delivered
  as `EventReceived(message)`. An `error` without `re` is the broker's fatal notice.
* Emulated time (DESIGN §3): `welcome` carries the broker's `now_s` when it was sent;
  with t_recv the wall time the frame was received,
  t_em(wall) = now_s + (wall - t_recv) / time_scale.  `wall_time_of` inverts it.
* Broker round-trip time is measured per request (wall clock of the caller).

Requests are answered in order by the broker, one session being one ordered stream;
nothing here depends on that except that pipelined requests keep their order.
"""

from __future__ import annotations

import dataclasses
import enum
from collections import deque
from collections.abc import Hashable, Sequence

from emulator.wire import (
    DEFAULT_MAX_FRAME_BYTES,
    SUPPORTED_VERSIONS,
    Address,
    Bye,
    Error,
    ErrorCode,
    FrameDecoder,
    Hello,
    LocalProtocolError,
    Message,
    RemoteProtocolError,
    Welcome,
    decode,
    encode_framed,
)

__all__ = [
    "BrokerClosed",
    "EventReceived",
    "QDevice",
    "QDeviceEvent",
    "QDeviceStats",
    "Registered",
    "RegistrationRefused",
    "ReplyReceived",
    "SessionState",
]

_frozen = dataclasses.dataclass(frozen=True, slots=True)


class SessionState(enum.Enum):
    IDLE = "idle"
    REGISTERING = "registering"
    REGISTERED = "registered"
    CLOSED = "closed"


@_frozen
class Registered:
    welcome: Welcome


@_frozen
class RegistrationRefused:
    code: str
    message: str


@_frozen
class ReplyReceived:
    """Answer to `request(...)`: `message` is the reply or an `Error`."""

    tag: Hashable
    request_id: int
    message: Message


@_frozen
class EventReceived:
    message: Message


@_frozen
class BrokerClosed:
    """The session ended: the broker said bye, sent a fatal error, or the stream broke."""

    reason: str


QDeviceEvent = Registered | RegistrationRefused | ReplyReceived | EventReceived | BrokerClosed


@_frozen
class QDeviceStats:
    requests: int
    replies: int
    errors: int
    events: int
    outstanding: int
    malformed_in: int
    rtt_last_s: float | None  # wall seconds
    rtt_mean_s: float | None


class QDevice:
    """Sans-IO broker session of one node."""

    def __init__(
        self,
        node: str,
        token: str,
        *,
        capabilities: Sequence[str] = ("epr",),
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
    ) -> None:
        self.node = node
        self._token = token
        self._capabilities = list(capabilities)
        self._max_frame_bytes = max_frame_bytes
        self._decoder = FrameDecoder(max_frame_bytes=max_frame_bytes)
        self._out: list[bytes] = []
        self._events: deque[QDeviceEvent] = deque()
        self._early: list[QDeviceEvent] = []
        self._next_id = 1
        self._hello_id: int | None = None
        self._pending: dict[int, tuple[Hashable, float]] = {}  # id -> (tag, wall time sent)
        self.state = SessionState.IDLE
        self.welcome: Welcome | None = None
        self._t_recv = 0.0
        self._requests = self._replies = self._errors = self._n_events = self._malformed = 0
        self._rtt_last: float | None = None
        self._rtt_sum = 0.0

    # ------------------------------------------------------------------ clock

    @property
    def time_scale(self) -> float:
        return self.welcome.time_scale if self.welcome is not None else 1.0

    def emulated_now(self, wall: float) -> float:
        """Emulated time at wall time `wall` (DESIGN §3). Before `welcome`: 0."""
        if self.welcome is None:
            return 0.0
        return self.welcome.now_s + (wall - self._t_recv) / self.welcome.time_scale

    def wall_time_of(self, t_em: float) -> float:
        """Wall time at which the emulated clock reads `t_em`."""
        if self.welcome is None:
            return t_em
        return self._t_recv + (t_em - self.welcome.now_s) * self.welcome.time_scale

    # ------------------------------------------------------------------ inputs

    def register(self, *, tcp: Address, udp: Address, control: Address | None, now: float) -> None:
        """Queue `hello` (DESIGN §4)."""
        if self.state is not SessionState.IDLE:
            raise LocalProtocolError(ErrorCode.ALREADY_REGISTERED, "register() called twice")
        hello = Hello(
            node=self.node,
            token=self._token,
            versions=list(SUPPORTED_VERSIONS),
            capabilities=self._capabilities,
            tcp=tcp,
            udp=udp,
            control=control,
        )
        self._hello_id = self._queue(hello)
        self.state = SessionState.REGISTERING

    def request(self, message: Message, now: float, *, tag: Hashable = None) -> int:
        """Queue a request; its reply will come back as `ReplyReceived(tag, ...)`."""
        if self.state is not SessionState.REGISTERED:
            raise LocalProtocolError(ErrorCode.NOT_REGISTERED, f"session is {self.state.value}")
        request_id = self._queue(message)
        self._pending[request_id] = (tag, now)
        self._requests += 1
        return request_id

    def close(self) -> None:
        """Queue `bye` (if registered); the session is closed afterwards."""
        if self.state is SessionState.REGISTERED:
            self._queue(Bye())
        if self.state is not SessionState.CLOSED:
            self.state = SessionState.CLOSED

    def receive_data(self, data: bytes, now: float) -> None:
        if self.state is SessionState.CLOSED:
            return
        if not data:
            self._closed("broker closed the connection")
            return
        self._decoder.feed(data)
        while self.state is not SessionState.CLOSED:
            try:
                payload = self._decoder.next_frame()
            except RemoteProtocolError as exc:
                self._malformed += 1
                self._closed(f"broker stream unusable: {exc}")
                return
            if payload is None:
                return
            try:
                env = decode(payload)
            except RemoteProtocolError:
                # A broker bug, not ours to answer; count it and keep the session.
                self._malformed += 1
                continue
            self._handle(env.message, env.re, now)

    def connection_lost(self) -> None:
        self._closed("connection lost")

    # ------------------------------------------------------------------ outputs

    def next_event(self) -> QDeviceEvent | None:
        return self._events.popleft() if self._events else None

    def data_to_send(self) -> bytes:
        out = b"".join(self._out)
        self._out.clear()
        return out

    def statistics(self) -> QDeviceStats:
        return QDeviceStats(
            requests=self._requests,
            replies=self._replies,
            errors=self._errors,
            events=self._n_events,
            outstanding=len(self._pending),
            malformed_in=self._malformed,
            rtt_last_s=self._rtt_last,
            rtt_mean_s=self._rtt_sum / self._replies if self._replies else None,
        )

    # ------------------------------------------------------------------ internals

    def _queue(self, message: Message) -> int:
        msg_id = self._next_id
        self._next_id += 1
        self._out.append(encode_framed(message, id=msg_id, max_frame_bytes=self._max_frame_bytes))
        return msg_id

    def _closed(self, reason: str) -> None:
        if self.state is not SessionState.CLOSED:
            self.state = SessionState.CLOSED
            self._events.append(BrokerClosed(reason))

    def _handle(self, msg: Message, re: int | None, now: float) -> None:
        if self.state is SessionState.REGISTERING:
            if re is not None and re == self._hello_id:
                if isinstance(msg, Welcome):
                    self.welcome = msg
                    self._t_recv = now
                    self.state = SessionState.REGISTERED
                    self._events.append(Registered(msg))
                    self._events.extend(self._early)  # Registered always comes first
                    self._early.clear()
                elif isinstance(msg, Error):
                    self.state = SessionState.CLOSED
                    self._events.append(RegistrationRefused(msg.code, msg.message))
                else:
                    self.state = SessionState.CLOSED
                    self._events.append(RegistrationRefused(ErrorCode.BAD_FIELD.value, f"unexpected {msg.TYPE!r}"))
                return
            if isinstance(msg, Error) and re is None:
                self.state = SessionState.CLOSED
                self._events.append(RegistrationRefused(msg.code, msg.message))
                return
            if re is None and not isinstance(msg, Bye):
                # Events before welcome would be a broker bug; keep them for after registration.
                self._early.append(EventReceived(msg))
                return
        if re is None:
            if isinstance(msg, Error):
                self._closed(f"broker error {msg.code}: {msg.message}")
            elif isinstance(msg, Bye):
                self._closed("broker said bye")
            else:
                self._n_events += 1
                self._events.append(EventReceived(msg))
            return
        pending = self._pending.pop(re, None)
        if pending is None:
            self._malformed += 1  # reply to nothing we asked
            return
        tag, sent = pending
        rtt = max(0.0, now - sent)
        self._rtt_last = rtt
        self._rtt_sum += rtt
        self._replies += 1
        if isinstance(msg, Error):
            self._errors += 1
        self._events.append(ReplyReceived(tag, re, msg))
