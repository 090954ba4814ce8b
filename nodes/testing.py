"""Test doubles for node-side code: lossy in-memory links and an app-network driver.

Theory of operation (DESIGN §13, CONVENTIONS 8-9)
--------------------------------------------------
* `LossyChannel` is one direction of an in-memory link. An item sent at `now` is
  dropped with probability `drop`, else delivered at now + delay_s + U(0, jitter_s),
  and delivered a second time (after another independent delay) with probability
  `duplicate`. With `ordered=True` delivery times never decrease (a stream); without,
  items may overtake each other (datagrams). All randomness is the seeded generator.
* `InMemoryLink` is two `LossyChannel`s between named ends.
* `FakeClock` (re-exported from `emulator.testing`) is the clock `InMemoryBroker` moves.
* `AppNetwork` runs the `AppHost`s of several nodes with no sockets: every node has a
  session on an `emulator.testing.InMemoryBroker` (the real broker core) and
  `app_msg`s travel over `InMemoryLink`s, encoded and decoded with the wire codec so
  bodies meet the same msgpack limits as on a real link. Time is a fake clock moved in
  fixed steps (`step_s`): at each step the broker runs its timers up to t in one batch
  (`advance_to(t, batch=True)`), then broker frames, link deliveries and app timers are
  fed to the hosts until nothing moves (at most `max_rounds`); requests reach the
  broker at the same emulated t. A pair heralded inside a step therefore waits at most
  `step_s` before its end sees it — choose `step_s` small against T2 and the memory
  size large against rate x step_s.

This module does no I/O and never reads a clock.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Hashable, Iterable, Mapping
from typing import Any

import numpy as np

from emulator.testing import FakeClock
from emulator.wire import AppMsg, decode, encode

from .apps import APP_KINDS, App, AppContext, AppHost, HostBrokerRequest, HostPeerSend
from .qkd.keypool import KeyPools

__all__ = ["AppNetwork", "FakeClock", "InMemoryLink", "LossyChannel"]


class LossyChannel:
    """One direction of an in-memory link with seeded drop / duplicate / delay."""

    def __init__(
        self,
        rng: np.random.Generator,
        *,
        delay_s: float = 0.0,
        jitter_s: float = 0.0,
        drop: float = 0.0,
        duplicate: float = 0.0,
        ordered: bool = False,
    ) -> None:
        for name, value in (("drop", drop), ("duplicate", duplicate)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value!r}")
        if delay_s < 0.0 or jitter_s < 0.0:
            raise ValueError("delays must be >= 0")
        self._rng = rng
        self.delay_s = delay_s
        self.jitter_s = jitter_s
        self.drop = drop
        self.duplicate = duplicate
        self.ordered = ordered
        self._heap: list[tuple[float, int, Any]] = []
        self._seq = 0
        self._last = -float("inf")
        self.sent = self.dropped = self.duplicated = self.delivered = 0

    def _delay(self) -> float:
        return self.delay_s + (self.jitter_s * float(self._rng.random()) if self.jitter_s else 0.0)

    def _push(self, at: float, item: Any) -> None:
        if self.ordered:
            at = max(at, self._last)
            self._last = at
        heapq.heappush(self._heap, (at, self._seq, item))
        self._seq += 1

    def send(self, item: Any, now: float) -> None:
        self.sent += 1
        if self.drop and self._rng.random() < self.drop:
            self.dropped += 1
            return
        self._push(now + self._delay(), item)
        if self.duplicate and self._rng.random() < self.duplicate:
            self.duplicated += 1
            self._push(now + self._delay(), item)

    def receive(self, now: float) -> list[Any]:
        out = []
        while self._heap and self._heap[0][0] <= now:
            out.append(heapq.heappop(self._heap)[2])
        self.delivered += len(out)
        return out

    def next_delivery(self) -> float | None:
        return self._heap[0][0] if self._heap else None


class InMemoryLink:
    """A bidirectional link between ends `a` and `b` (one `LossyChannel` each way)."""

    def __init__(self, a: str, b: str, rng: np.random.Generator, **channel: Any) -> None:
        self.ends = (a, b)
        self._channels = {
            (a, b): LossyChannel(rng, **channel),
            (b, a): LossyChannel(rng, **channel),
        }

    def channel(self, src: str, dst: str) -> LossyChannel:
        return self._channels[(src, dst)]

    def send(self, src: str, dst: str, item: Any, now: float) -> None:
        self._channels[(src, dst)].send(item, now)

    def receive(self, dst: str, now: float) -> list[tuple[str, Any]]:
        return [(src, item) for (src, d), ch in self._channels.items() if d == dst for item in ch.receive(now)]


class _Node:
    def __init__(self, name: str, session: Any, host: AppHost) -> None:
        self.name = name
        self.session = session
        self.host = host
        self.pending: dict[int, tuple[str, Hashable]] = {}


class AppNetwork:
    """Drive the app hosts of several nodes against an `InMemoryBroker` (module docstring)."""

    def __init__(
        self,
        broker: Any,  # emulator.testing.InMemoryBroker
        nodes: Iterable[str],
        *,
        rng: np.random.Generator,
        registry: Mapping[str, type[App]] = APP_KINDS,
        link_options: Mapping[str, Any] | None = None,
        step_s: float = 1e-3,
        max_rounds: int = 1000,
    ) -> None:
        self.broker = broker
        self.step_s = step_s
        self.max_rounds = max_rounds
        self.nodes: dict[str, _Node] = {}
        self.key_pools: dict[str, KeyPools] = {}  # each node's pools, as the runtime holds them
        for name in nodes:
            session = broker.connect(name)
            welcome = session.welcome
            links = {link.peer: link for link in welcome.links}

            pools = self.key_pools[name] = KeyPools()

            def factory(
                app_name: str, _w: Any = welcome, _links: Any = links, _node: str = name, _pools: KeyPools = pools
            ) -> AppContext:
                return AppContext(
                    node=_node,
                    name=app_name,
                    seed=_w.seed,
                    time_scale=_w.time_scale,
                    memory_qubits=_w.memory_qubits,
                    links=_links,
                    key_pools=_pools,
                )

            self.nodes[name] = _Node(name, session, AppHost(registry, factory))
        self.links: dict[frozenset[str], InMemoryLink] = {}
        opts = dict(link_options or {})
        for name, node in self.nodes.items():
            for peer in (link.peer for link in node.session.welcome.links):
                key = frozenset((name, peer))
                if peer in self.nodes and key not in self.links:
                    self.links[key] = InMemoryLink(name, peer, rng, **opts)

    @property
    def now(self) -> float:
        return float(self.broker.clock.now_s)

    def host(self, node: str) -> AppHost:
        return self.nodes[node].host

    def link(self, a: str, b: str) -> InMemoryLink:
        return self.links[frozenset((a, b))]

    def start_app(self, node: str, kind: str, name: str, params: Mapping[str, Any]) -> None:
        self.nodes[node].host.start_app(kind, name, params, self.now)
        self.settle()

    # ------------------------------------------------------------------ driving

    def settle(self) -> None:
        """Feed everything that is due at the current time until nothing moves."""
        t = self.now
        for _ in range(self.max_rounds):
            moved = False
            for node in self.nodes.values():
                moved |= self._feed_node(node, t)
            if not moved:
                return
        raise AssertionError(f"no quiescence after {self.max_rounds} rounds at t={t}")

    def step(self) -> None:
        self.broker.advance_to(self.now + self.step_s, batch=True)
        self.settle()

    def run_until(self, done: Callable[[], bool], *, max_t_s: float) -> float:
        """Step until `done()` or the clock passes `max_t_s`; return the final time."""
        self.settle()
        while not done():
            if self.now >= max_t_s:
                raise AssertionError(f"not done by t={self.now:.6f} s")
            self.step()
        return self.now

    def _feed_node(self, node: _Node, t: float) -> bool:
        moved = False
        host = node.host
        for env in node.session.events():
            moved = True
            if env.re is not None:
                tag = node.pending.pop(env.re, None)
                if tag is not None:
                    host.handle_broker_reply(tag, env.message, t)
            else:
                host.handle_broker_event(env.message, t)
        for key, link in self.links.items():
            if node.name not in key:
                continue
            for src, payload in link.receive(node.name, t):
                moved = True
                msg = decode(payload).message
                assert isinstance(msg, AppMsg)
                host.handle_peer_message(src, msg, t)
        timer = host.get_timer()
        if timer is not None and timer <= t:
            moved = True
            host.handle_timer(t)
        while (action := host.next_action()) is not None:
            moved = True
            if isinstance(action, HostBrokerRequest):
                if node.session.closed:
                    continue  # like a dead connection: the request goes nowhere
                request_id = node.session.request(action.message)
                node.pending[request_id] = action.tag
            elif isinstance(action, HostPeerSend):
                link = self.links.get(frozenset((node.name, action.peer)))
                if link is not None:
                    link.send(node.name, action.peer, encode(action.message), t)
        return moved
