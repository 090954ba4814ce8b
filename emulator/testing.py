"""Test doubles for code that talks to the broker: a fake clock and an in-memory broker.

Theory of operation
-------------------
`InMemoryBroker` hosts a real `emulator.broker.core.BrokerCore` exactly as the trio
server does, minus the sockets: each `InMemoryBrokerSession` encodes your messages
into frames, hands the bytes to the core at the fake clock's time, and decodes every
frame the core sends back into its inbox. Timers (heralds, qubit arrivals) run only
when you move time with `advance_to(t_s)` / `advance(dt_s)`; nothing happens "in the
background", so tests are deterministic and need no event loop.

Typical use (DESIGN §13)::

    broker = InMemoryBroker(BrokerConfig.build(["alice", "bob"], [LinkConfig(("alice", "bob"), 10.0)]))
    alice, bob = broker.connect("alice"), broker.connect("bob")
    reply = alice.call(Alloc(count=1))          # the reply Envelope (Allocated or Error)
    rid = bob.request(EprListen(peer="alice", accept=True))
    broker.advance_to(0.5)                      # run heralds/arrivals up to t = 0.5 s
    for env in alice.events():                  # everything received since the last call
        ...

Tokens are filled in for you (`node_token`, `admin_token`). A session the core closes
(wrong token, oversize frame, `bye`) gets `closed = True` after its last frames were
delivered to its inbox, and the core is told it closed, as the real server does.
This module does no I/O (no trio): node-side tests drive their sans-IO cores against it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from emulator.broker.config import BrokerConfig
from emulator.broker.core import BrokerCore
from emulator.kernels import Backend, get_backend
from emulator.wire import (
    PROTOCOL_VERSION,
    AdminHello,
    AdminWelcome,
    Envelope,
    Error,
    FrameDecoder,
    Hello,
    Message,
    Welcome,
    decode,
    encode_framed,
)

__all__ = ["FakeClock", "InMemoryBroker", "InMemoryBrokerSession", "BrokerRequestError"]

DEFAULT_NODE_TOKEN = "qnetem-test-node-token"
DEFAULT_ADMIN_TOKEN = "qnetem-test-admin-token"


class FakeClock:
    """A clock that moves only when told to (emulated seconds)."""

    __slots__ = ("now_s",)

    def __init__(self, now_s: float = 0.0) -> None:
        self.now_s = float(now_s)

    def advance(self, dt_s: float) -> float:
        if dt_s < 0:
            raise ValueError("a fake clock never runs backwards")
        self.now_s += dt_s
        return self.now_s

    def __call__(self) -> float:
        return self.now_s


class BrokerRequestError(Exception):
    """`InMemoryBrokerSession.call(..., check=True)` got an `error` reply."""

    def __init__(self, error: Error) -> None:
        super().__init__(f"{error.code}: {error.message}")
        self.code = error.code
        self.error = error


class InMemoryBrokerSession:
    """One connection to an `InMemoryBroker`. Create with `broker.connect*()`."""

    def __init__(self, broker: InMemoryBroker, session_id: int) -> None:
        self._broker = broker
        self.session_id = session_id
        self._decoder = FrameDecoder(max_frame_bytes=broker.core.config.limits.max_frame_bytes)
        self._inbox: list[Envelope] = []
        self._next_id = 1
        self.closed = False
        #: For node sessions from `connect`: the welcome message.
        self.welcome: Welcome | None = None
        #: For admin sessions from `connect_admin`: the admin_welcome message.
        self.admin_welcome: AdminWelcome | None = None

    # ------------------------------------------------------------------ sending

    def request(self, message: Message) -> int:
        """Send `message` at the broker's current time; return its envelope id."""
        msg_id = self._next_id
        self._next_id += 1
        self.send_raw(encode_framed(message, id=msg_id))
        return msg_id

    def send_raw(self, data: bytes) -> None:
        """Hand raw bytes (any framing, even garbage) to the broker core."""
        if self.closed:
            raise RuntimeError("session is closed")
        self._broker.core.receive_data(self.session_id, data, self._broker.clock.now_s)
        self._broker.pump()

    def call(self, message: Message, *, check: bool = False) -> Envelope:
        """Send `message` and return the reply envelope (`re` == its id).

        Other frames received meanwhile stay in the inbox for `events()`. With
        `check=True` an `error` reply raises `BrokerRequestError`.
        """
        msg_id = self.request(message)
        for i, env in enumerate(self._inbox):
            if env.re == msg_id:
                del self._inbox[i]
                if check and isinstance(env.message, Error):
                    raise BrokerRequestError(env.message)
                return env
        raise AssertionError(f"no reply to {message.TYPE!r} (id {msg_id})")

    def close(self) -> None:
        """Hang up (as a dropped TCP connection): the broker releases this node."""
        if not self.closed:
            self.closed = True
            self._broker.core.close_session(self.session_id, self._broker.clock.now_s)
            self._broker.pump()

    # ------------------------------------------------------------------ receiving

    def events(self) -> list[Envelope]:
        """Every frame received since the last call (replies and pushed events)."""
        out, self._inbox = self._inbox, []
        return out

    def messages(self, kind: type[Message] | None = None) -> list[Message]:
        """`events()` as bare messages, optionally only those of one type (others are dropped)."""
        return [e.message for e in self.events() if kind is None or isinstance(e.message, kind)]

    def _feed(self, data: bytes) -> None:
        self._decoder.feed(data)
        while (payload := self._decoder.next_frame()) is not None:
            self._inbox.append(decode(payload))


class InMemoryBroker:
    """A `BrokerCore` hosted in memory with a `FakeClock` (see the module docstring)."""

    def __init__(
        self,
        config: BrokerConfig,
        *,
        backend: Backend | None = None,
        seed: int | None = None,
        clock: FakeClock | None = None,
        node_token: str = DEFAULT_NODE_TOKEN,
        admin_token: str = DEFAULT_ADMIN_TOKEN,
    ) -> None:
        if seed is not None:
            config = dataclasses.replace(config, seed=seed)
        self.clock = clock or FakeClock()
        self.node_token = node_token
        self.admin_token = admin_token
        self.core = BrokerCore(
            config,
            backend=backend if backend is not None else get_backend(),
            node_token=node_token,
            admin_token=admin_token,
            now_s=self.clock.now_s,
        )
        self._sessions: dict[int, InMemoryBrokerSession] = {}
        #: Called with each session the core closed (after its last frames were delivered).
        self.on_close: Callable[[InMemoryBrokerSession], None] | None = None

    @classmethod
    def from_scenario(cls, scenario: object, **kwargs: object) -> InMemoryBroker:
        """An in-memory broker for a validated `emulator.scenario.Scenario`."""
        return cls(BrokerConfig.from_scenario(scenario), **kwargs)  # type: ignore[arg-type]

    # ------------------------------------------------------------------ connections

    def connect_raw(self) -> InMemoryBrokerSession:
        """A fresh, unregistered connection."""
        sid = self.core.open_session(self.clock.now_s)
        session = InMemoryBrokerSession(self, sid)
        self._sessions[sid] = session
        return session

    def connect(
        self,
        node_name: str,
        *,
        tcp: tuple[str, int] = ("127.0.0.1", 0),
        udp: tuple[str, int] = ("127.0.0.1", 0),
        control: tuple[str, int] | None = None,
    ) -> InMemoryBrokerSession:
        """A connection registered as `node_name` (hello/welcome done; `session.welcome` set).

        The inbox keeps any `peer_up` events that followed the welcome.
        """
        session = self.connect_raw()
        hello = Hello(
            node=node_name,
            token=self.node_token,
            versions=[PROTOCOL_VERSION],
            capabilities=[],
            tcp=tcp,
            udp=udp,
            control=control,
        )
        reply = session.call(hello, check=True)
        assert isinstance(reply.message, Welcome)
        session.welcome = reply.message
        return session

    def connect_admin(self, client: str = "test") -> InMemoryBrokerSession:
        session = self.connect_raw()
        reply = session.call(
            AdminHello(token=self.admin_token, versions=[PROTOCOL_VERSION], client=client), check=True
        )
        assert isinstance(reply.message, AdminWelcome)
        session.admin_welcome = reply.message
        return session

    # ------------------------------------------------------------------ time

    def advance_to(self, t_s: float, *, batch: bool = False) -> None:
        """Run every broker timer due up to `t_s`, then set the clock to `t_s`.

        By default each timer fires at its own deadline, as with a punctual server
        (so each heralded pair arrives in its own `epr_delivered`). With `batch=True`
        the core is woken once, at `t_s`, as a server that slept through the
        deadlines would: every pair heralded by then comes in ONE `epr_delivered`
        per request and end — cheaper for tests that generate thousands of pairs.
        """
        if t_s < self.clock.now_s:
            raise ValueError(f"cannot go back in time from {self.clock.now_s} to {t_s}")
        if not batch:
            while (deadline := self.core.get_timer()) is not None and deadline <= t_s:
                self.clock.now_s = max(self.clock.now_s, deadline)
                self.core.handle_timer(self.clock.now_s)
                self.pump()
        self.clock.now_s = t_s
        self.core.handle_timer(t_s)
        self.pump()

    def advance(self, dt_s: float, *, batch: bool = False) -> None:
        self.advance_to(self.clock.now_s + dt_s, batch=batch)

    def run_until_idle(self, *, limit_s: float = float("inf")) -> None:
        """Advance through every pending timer (up to `limit_s`)."""
        while (deadline := self.core.get_timer()) is not None and deadline <= limit_s:
            self.advance_to(max(deadline, self.clock.now_s))

    # ------------------------------------------------------------------ plumbing

    def pump(self) -> None:
        """Deliver the core's output to session inboxes and close what it asked to close."""
        core = self.core
        while True:
            for sid in core.sessions_with_data():
                data = core.data_to_send(sid)
                session = self._sessions.get(sid)
                if session is not None and not session.closed:
                    session._feed(data)
            to_close = core.sessions_to_close()
            if not to_close:
                return
            for sid in to_close:
                session = self._sessions.get(sid)
                data = core.data_to_send(sid)
                if session is not None:
                    session._feed(data)
                    session.closed = True
                core.close_session(sid, self.clock.now_s)
                if session is not None and self.on_close is not None:
                    self.on_close(session)
