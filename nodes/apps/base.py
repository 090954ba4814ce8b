"""The application interface: a sans-IO core that the node runtime drives.

Theory of operation (aioquic/h11 style, CONVENTIONS 1). An app never does I/O and never
reads a clock. Its inputs are pushed, each with the node's emulated time `now`:

    start(now)                                   once, right after construction
    handle_reply(tag, message, now)              the broker's answer to a BrokerRequest
                                                 (the reply message or an `Error`)
    handle_event(message, now)                   broker events routed to this app
                                                 (`epr_delivered`, `epr_done` of its requests)
    handle_peer_message(peer, body, now)         an `app_msg` body from a neighbour
    handle_timer(now)                            when now >= get_timer()
    handle_datagram(addr, data, now)             a UDP datagram to the app's socket (UdpOpen)

Its outputs are pulled:

    next_action() -> BrokerRequest | PeerSend | None
    get_timer()   -> emulated time of the next wanted handle_timer, or None
    state, results()                             AppState and the results dict

`BrokerRequest(tag, message)`: send `message` to the broker; its reply comes back to
`handle_reply` with the same `tag` (any hashable the app chooses). `PeerSend(peer, app,
body)`: an `app_msg` to app instance `app` on node `peer` over the classical link
(reliable and ordered on a real link, but the in-memory test links may drop, duplicate
and delay, so apps retransmit what matters). `RoutedSend(node, app, body)`: the same to
a node that need not be a neighbour; the key-management entities forward it hop by hop
along their routes (best effort: dropped when no route exists).

Key management and real traffic (the SAE side of DESIGN §8):

* `KmsCall(tag, sae, op, peer_sae, ...)`: an ETSI GS QKD 014 call, made as SAE `sae`
  (whose certificate the node holds) to this node's KME over HTTPS with mutual TLS; the
  answer comes to `handle_reply(tag, KmsReply(status, body), now)`.
* `UdpOpen(tag)`: bind a UDP socket for the app on the node's host (port chosen by the
  OS); answered by `handle_reply(tag, UdpOpened(host, port), now)`. Datagrams to it
  arrive through `handle_datagram`; `UdpSend(addr, data)` sends one from it.

Batching: actions are materialised lazily. Inputs only record work; `next_action()`
first calls `_prepare_actions()`, where an app turns everything that piled up (e.g. all
pairs delivered by several frames read in one go) into as few requests as possible.

Parameters are validated before construction by `parse_params(params, ctx)`, which
raises `AppParamError(param, why)`; the node answers `app_start` with `bad_field`
naming the parameter. An exception escaping any input marks the app failed (the host
catches it); the node keeps running.
"""

from __future__ import annotations

import abc
import dataclasses
import enum
from collections import deque
from collections.abc import Hashable, Mapping
from typing import Any, ClassVar

from emulator.wire import LinkInfo, Message
from nodes.qkd.keypool import KeyPools

__all__ = [
    "App",
    "AppAction",
    "AppContext",
    "AppParamError",
    "AppState",
    "BrokerRequest",
    "KmsCall",
    "KmsOp",
    "KmsReply",
    "PeerSend",
    "RoutedSend",
    "UdpOpen",
    "UdpOpened",
    "UdpSend",
]


class AppState(enum.Enum):
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


class AppParamError(ValueError):
    """`app_start` parameters are invalid; `param` names the offending key."""

    def __init__(self, param: str, why: str) -> None:
        super().__init__(f"params.{param}: {why}")
        self.param = param
        self.why = why


@dataclasses.dataclass(frozen=True, slots=True)
class AppContext:
    """What an app may know about the node it runs on."""

    node: str
    name: str  # this instance's name (from app_start)
    seed: int  # the node's seed (welcome.seed)
    time_scale: float  # wall seconds per emulated second
    memory_qubits: int
    links: Mapping[str, LinkInfo]  # neighbours by name
    # The node's key pools by peer (QKD apps fill them); None: the app keeps its own.
    key_pools: KeyPools | None = None
    # SAE ids whose credentials this node holds (apps may make KmsCalls as these).
    saes: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True, slots=True)
class BrokerRequest:
    tag: Hashable
    message: Message


@dataclasses.dataclass(frozen=True, slots=True)
class PeerSend:
    peer: str
    app: str  # the receiving app instance's name on `peer`
    body: dict[str, Any]


@dataclasses.dataclass(frozen=True, slots=True)
class RoutedSend:
    """An app message to app `app` on any node `node`, forwarded by the KMEs (best effort)."""

    node: str
    app: str
    body: dict[str, Any]


class KmsOp(enum.Enum):
    STATUS = "status"  # ETSI GS QKD 014 §5.2
    ENC_KEYS = "enc_keys"  # §5.3
    DEC_KEYS = "dec_keys"  # §5.4


@dataclasses.dataclass(frozen=True, slots=True)
class KmsCall:
    """An ETSI GS QKD 014 request to this node's KME, made as SAE `sae`. `peer_sae` is the
    slave SAE (status, enc_keys) or the master SAE (dec_keys)."""

    tag: Hashable
    sae: str
    op: KmsOp
    peer_sae: str
    number: int = 1
    size_bits: int | None = None
    key_ids: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True, slots=True)
class KmsReply:
    """The KME's answer to a `KmsCall`: HTTP status (200/400/401/503, or 0 when the call
    did not complete: `body` then holds {"message": why}) and the decoded JSON body."""

    status: int
    body: dict[str, Any] = dataclasses.field(repr=False)  # key containers hold key bytes


@dataclasses.dataclass(frozen=True, slots=True)
class UdpOpen:
    tag: Hashable


@dataclasses.dataclass(frozen=True, slots=True)
class UdpOpened:
    host: str
    port: int


@dataclasses.dataclass(frozen=True, slots=True)
class UdpSend:
    addr: tuple[str, int]
    data: bytes = dataclasses.field(repr=False)


AppAction = BrokerRequest | PeerSend | RoutedSend | KmsCall | UdpOpen | UdpSend


class App(abc.ABC):
    """Base of every app core. Subclasses set `KIND` and implement the inputs."""

    KIND: ClassVar[str] = ""

    def __init__(self, ctx: AppContext, params: Any) -> None:
        self.ctx = ctx
        self.params = params
        self.state = AppState.RUNNING
        self._actions: deque[AppAction] = deque()
        self._timer: float | None = None
        self._t_start: float | None = None
        self._t_last: float | None = None
        self._t_end: float | None = None
        self.error: str | None = None

    # ------------------------------------------------------------------ construction

    @classmethod
    @abc.abstractmethod
    def parse_params(cls, params: Mapping[str, Any], ctx: AppContext) -> Any:
        """Validate `app_start` params; return the app's parameter record or raise AppParamError."""

    # ------------------------------------------------------------------ inputs

    def start(self, now: float) -> None:
        self._t_start = self._t_last = now
        self._on_start(now)

    def handle_reply(self, tag: Hashable, message: Message, now: float) -> None:
        self._t_last = now
        self._on_reply(tag, message, now)

    def handle_event(self, message: Message, now: float) -> None:
        self._t_last = now
        self._on_event(message, now)

    def handle_peer_message(self, peer: str, body: Mapping[str, Any], now: float) -> None:
        self._t_last = now
        self._on_peer_message(peer, body, now)

    def handle_timer(self, now: float) -> None:
        self._t_last = now
        self._timer = None
        self._on_timer(now)

    def handle_datagram(self, addr: tuple[str, int], data: bytes, now: float) -> None:
        self._t_last = now
        self._on_datagram(addr, data, now)

    # ------------------------------------------------------------------ outputs

    def next_action(self) -> AppAction | None:
        if not self._actions:
            self._prepare_actions()
        return self._actions.popleft() if self._actions else None

    def get_timer(self) -> float | None:
        return self._timer

    @property
    def finished(self) -> bool:
        return self.state is not AppState.RUNNING

    def wall_s(self) -> float:
        """Wall seconds from start to finish (or to the latest input while running).

        Exact in emulated terms: one emulated second lasts `time_scale` wall seconds.
        """
        if self._t_start is None:
            return 0.0
        end = self._t_end if self._t_end is not None else self._t_last
        assert end is not None
        return max(0.0, end - self._t_start) * self.ctx.time_scale

    @abc.abstractmethod
    def results(self) -> dict[str, Any]:
        """The results dict reported by `app_status` (partial while running)."""

    # ------------------------------------------------------------------ for subclasses

    def _on_start(self, now: float) -> None:
        pass

    def _on_reply(self, tag: Hashable, message: Message, now: float) -> None:
        pass

    def _on_event(self, message: Message, now: float) -> None:
        pass

    def _on_peer_message(self, peer: str, body: Mapping[str, Any], now: float) -> None:
        pass

    def _on_timer(self, now: float) -> None:
        pass

    def _on_datagram(self, addr: tuple[str, int], data: bytes, now: float) -> None:
        pass

    def _prepare_actions(self) -> None:
        """Hook: turn accumulated work into actions (called when the action queue is empty)."""

    def _request(self, tag: Hashable, message: Message) -> None:
        self._actions.append(BrokerRequest(tag, message))

    def _send_peer(self, peer: str, app: str, body: dict[str, Any]) -> None:
        self._actions.append(PeerSend(peer, app, body))

    def _act(self, action: AppAction) -> None:
        """Queue any other action (RoutedSend, KmsCall, UdpOpen, UdpSend)."""
        self._actions.append(action)

    def _set_timer(self, at: float | None) -> None:
        """Arm (earliest wins) or, with None, clear the timer."""
        if at is None:
            self._timer = None
        elif self._timer is None or at < self._timer:
            self._timer = at

    def _finish(self, now: float) -> None:
        if self.state is AppState.RUNNING:
            self.state = AppState.DONE
            self._t_end = now

    def _fail(self, reason: str, now: float | None = None) -> None:
        if self.state is AppState.RUNNING:
            self.state = AppState.FAILED
            self.error = reason
            self._t_end = now if now is not None else self._t_last
