"""The app host: runs a node's app instances and routes their traffic (sans-IO).

Theory of operation. The runtime (or a test driver) owns one `AppHost`. It starts apps
from `app_start` (kind -> class from the registry, params validated by the class),
feeds them broker replies, broker events and peer messages, fires their timers, and
pulls their actions as `HostAction`s:

* `HostBrokerRequest(tag, message)` — the runtime sends `message` on the broker session
  and later calls `handle_broker_reply(tag, reply, now)` with the same tag. The tag is
  `(app name, app tag)`; the host strips it again.
* `HostPeerSend(peer, message)` — an `app_msg` for the classical link to `peer`.
* `HostAppIo(app, action)` — the rest of an app's actions (`RoutedSend`, `KmsCall`,
  `UdpOpen`, `UdpSend`), for the runtime to carry out on behalf of app `app`; answers
  come back through `handle_app_reply(app, tag, reply)`, datagrams through
  `handle_datagram(app, addr, data)` and routed messages through
  `handle_routed_message(src_node, message)`.

Routing of entanglement events (`epr_delivered`, `epr_done` carry the broker's request
number, not our request id):

1. An app's `epr_request` is answered by `epr_accepted(request=R)`; the host then
   routes every event of request R to that app.
2. An app's `epr_listen(peer, accept=True)` makes it the listener for `peer`; an
   `epr_delivered` of a request initiated by `peer` (unknown R) binds R to that listener.
3. Events for a request not (yet) bound are held (at most `MAX_HELD_EVENTS`) until rule
   1 or 2 binds it — the broker may push a delivery before our reply is processed.
4. QKD events (`qkd_detections`, `qkd_emitted`, `qkd_stopped`) name the other end of the
   link: they go to the app that last sent `qkd_listen(accept)` or `qkd_start` for that
   peer (the broker sends none before those); others are dropped and counted.

Any exception escaping an app marks that app failed; the others are unaffected.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Callable, Hashable, Mapping
from typing import Any

from emulator.wire import (
    AppMsg,
    AppStatus,
    EprAccepted,
    EprDelivered,
    EprDone,
    EprListen,
    ErrorCode,
    Message,
    QkdDetections,
    QkdEmitted,
    QkdListen,
    QkdStart,
    QkdStopped,
    RemoteProtocolError,
)

from .base import (
    App,
    AppContext,
    AppParamError,
    AppState,
    BrokerRequest,
    KmsCall,
    PeerSend,
    RoutedSend,
    UdpOpen,
    UdpSend,
)

__all__ = ["AppHost", "HostAction", "HostAppIo", "HostBrokerRequest", "HostPeerSend", "MAX_HELD_EVENTS"]

MAX_HELD_EVENTS = 4096
MAX_APPS = 256
_APP_NAME_MAX = 128


@dataclasses.dataclass(frozen=True, slots=True)
class HostBrokerRequest:
    tag: tuple[str, Hashable]
    message: Message


@dataclasses.dataclass(frozen=True, slots=True)
class HostPeerSend:
    peer: str
    message: AppMsg


@dataclasses.dataclass(frozen=True, slots=True)
class HostAppIo:
    app: str
    action: RoutedSend | KmsCall | UdpOpen | UdpSend


HostAction = HostBrokerRequest | HostPeerSend | HostAppIo

ContextFactory = Callable[[str], AppContext]


class AppHost:
    """Holds the app instances of one node."""

    def __init__(self, registry: Mapping[str, type[App]], context_factory: ContextFactory) -> None:
        """`context_factory(app_name)` builds the AppContext of a new instance."""
        self._registry = registry
        self._context_factory = context_factory
        self._apps: dict[str, App] = {}
        self._kinds: dict[str, str] = {}
        self._actions: deque[HostAction] = deque()
        self._by_request: dict[int, str] = {}  # broker request number -> app name
        self._listeners: dict[str, str] = {}  # peer -> app name listening for its requests
        self._qkd: dict[str, str] = {}  # peer -> app name running the QKD link with it (rule 4)
        self._held: deque[tuple[int, Message]] = deque()
        self.dropped_peer_messages = 0
        self.dropped_events = 0

    # ------------------------------------------------------------------ control

    def start_app(self, kind: str, name: str, params: Mapping[str, Any], now: float) -> None:
        """Validate and start an app; raise `RemoteProtocolError` (unknown_app / bad_field)."""
        cls = self._registry.get(kind)
        if cls is None:
            raise RemoteProtocolError(ErrorCode.UNKNOWN_APP, f"no app kind {kind[:64]!r}; known: {sorted(self._registry)}")
        if not name or len(name) > _APP_NAME_MAX:
            raise RemoteProtocolError(ErrorCode.BAD_FIELD, f"name: must be 1..{_APP_NAME_MAX} characters")
        if name in self._apps:
            raise RemoteProtocolError(ErrorCode.BAD_FIELD, f"name: an app named {name!r} already exists")
        if len(self._apps) >= MAX_APPS:
            raise RemoteProtocolError(ErrorCode.NO_RESOURCE, f"at most {MAX_APPS} app instances")
        ctx = self._context_factory(name)
        try:
            parsed = cls.parse_params(params, ctx)
        except AppParamError as exc:
            raise RemoteProtocolError(ErrorCode.BAD_FIELD, str(exc)) from None
        except Exception as exc:  # a validator bug: refuse rather than crash the node
            raise RemoteProtocolError(ErrorCode.INTERNAL, f"params: validation failed ({type(exc).__name__})") from None
        try:
            app = cls(ctx, parsed)
        except Exception as exc:
            raise RemoteProtocolError(ErrorCode.INTERNAL, f"app construction failed ({type(exc).__name__})") from None
        self._apps[name] = app
        self._kinds[name] = kind
        self._guard(app, lambda: app.start(now))
        self._collect(name)

    def status(self, name: str) -> AppStatus:
        app = self._apps.get(name)
        if app is None:
            raise RemoteProtocolError(ErrorCode.UNKNOWN_APP, f"no app instance named {name[:64]!r}")
        results = dict(app.results())
        if app.state is AppState.FAILED and app.error is not None:
            results["error"] = app.error
        return AppStatus(name=name, state=app.state.value, results=results)

    def app(self, name: str) -> App | None:
        return self._apps.get(name)

    def summary(self) -> dict[str, dict[str, Any]]:
        """{name: {"kind", "state"}} for statistics."""
        return {n: {"kind": self._kinds[n], "state": a.state.value} for n, a in self._apps.items()}

    # ------------------------------------------------------------------ inputs

    def handle_broker_reply(self, tag: tuple[str, Hashable], message: Message, now: float) -> None:
        name, app_tag = tag
        app = self._apps.get(name)
        if app is None:
            return
        if isinstance(message, EprAccepted):
            self._by_request[message.request] = name
        self._guard(app, lambda: app.handle_reply(app_tag, message, now))
        self._collect(name)
        self._release_held(now)

    def handle_broker_event(self, message: Message, now: float) -> None:
        if isinstance(message, QkdDetections | QkdEmitted | QkdStopped):
            name = self._qkd.get(message.peer)
            if name is None:
                self.dropped_events += 1
                return
            self._deliver_event(name, message, now)
            return
        if not isinstance(message, EprDelivered | EprDone):
            return  # other events concern the node, not apps (yet)
        name = self._by_request.get(message.request)
        if name is None:
            name = self._listener_for(message)
        if name is None:
            if len(self._held) >= MAX_HELD_EVENTS:
                self._held.popleft()
                self.dropped_events += 1
            self._held.append((message.request, message))
            return
        self._deliver_event(name, message, now)

    def handle_peer_message(self, peer: str, message: AppMsg, now: float) -> None:
        app = self._apps.get(message.app)
        if app is None:
            self.dropped_peer_messages += 1
            return
        self._guard(app, lambda: app.handle_peer_message(peer, message.body, now))
        self._collect(message.app)

    def handle_routed_message(self, src_node: str, message: AppMsg, now: float) -> None:
        """An app message from a (possibly distant) node, forwarded by the KMEs."""
        self.handle_peer_message(src_node, message, now)

    def handle_app_reply(self, name: str, tag: Hashable, reply: object, now: float) -> None:
        """The answer to a `HostAppIo` (KmsReply, UdpOpened) of app `name`."""
        app = self._apps.get(name)
        if app is None:
            return
        self._guard(app, lambda: app.handle_reply(tag, reply, now))  # type: ignore[arg-type]
        self._collect(name)

    def handle_datagram(self, name: str, addr: tuple[str, int], data: bytes, now: float) -> None:
        app = self._apps.get(name)
        if app is None:
            return
        self._guard(app, lambda: app.handle_datagram(addr, data, now))
        self._collect(name)

    def get_timer(self) -> float | None:
        return min((t for a in self._apps.values() if (t := a.get_timer()) is not None), default=None)

    def handle_timer(self, now: float) -> None:
        for name, app in list(self._apps.items()):
            t = app.get_timer()
            if t is not None and t <= now:
                self._guard(app, lambda app=app: app.handle_timer(now))  # type: ignore[misc]
                self._collect(name)

    # ------------------------------------------------------------------ outputs

    def next_action(self) -> HostAction | None:
        if not self._actions:
            for name in self._apps:
                self._collect(name)
        return self._actions.popleft() if self._actions else None

    # ------------------------------------------------------------------ internals

    def _listener_for(self, message: Message) -> str | None:
        """Rule 2: an event of a request the peer initiated goes to our listener for that peer."""
        if isinstance(message, EprDelivered | EprDone) and message.initiator == message.peer:
            name = self._listeners.get(message.peer)
            if name is not None:
                self._by_request[message.request] = name
            return name
        return None

    def _guard(self, app: App, call: Callable[[], None]) -> None:
        try:
            call()
        except Exception as exc:  # an app bug must not take the node down
            app._fail(f"internal: {type(exc).__name__}: {exc}")  # noqa: SLF001 - the host owns its apps

    def _collect(self, name: str) -> None:
        app = self._apps[name]
        while True:
            try:
                action = app.next_action()
            except Exception as exc:  # an app bug must not take the node down
                app._fail(f"internal: {type(exc).__name__}: {exc}")  # noqa: SLF001
                return
            if action is None:
                return
            if isinstance(action, BrokerRequest):
                msg = action.message
                if isinstance(msg, EprListen):
                    if msg.accept:
                        self._listeners[msg.peer] = name
                    elif self._listeners.get(msg.peer) == name:
                        del self._listeners[msg.peer]
                elif isinstance(msg, QkdListen | QkdStart) and (not isinstance(msg, QkdListen) or msg.accept):
                    self._qkd[msg.peer] = name
                self._actions.append(HostBrokerRequest((name, action.tag), msg))
            elif isinstance(action, PeerSend):
                self._actions.append(HostPeerSend(action.peer, AppMsg(app=action.app, body=action.body)))
            else:
                self._actions.append(HostAppIo(name, action))

    def _deliver_event(self, name: str, message: Message, now: float) -> None:
        app = self._apps.get(name)
        if app is None:
            return
        self._guard(app, lambda: app.handle_event(message, now))
        self._collect(name)

    def _release_held(self, now: float) -> None:
        if not self._held:
            return
        still: deque[tuple[int, Message]] = deque()
        ready: list[tuple[str, Message]] = []
        for request, message in self._held:
            name = self._by_request.get(request)
            if name is None:
                name = self._listener_for(message)
            if name is None:
                still.append((request, message))
            else:
                ready.append((name, message))
        self._held = still
        for name, message in ready:
            self._deliver_event(name, message, now)
