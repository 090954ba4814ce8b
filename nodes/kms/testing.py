"""Test driver for the KME core: N ``Kme`` cores over real key stores, with no sockets.

Theory of operation (CONVENTIONS 8-9)
-------------------------------------
``KmeNetwork`` builds one ``nodes.kms.kme.Kme`` per node, each over a real ``KeyStore``
(``":memory:"``, or files in ``store_dir`` so that a node can be restarted over its
store), joined by the KMS links given. Time is a ``FakeClock`` moved by the test.

* **Messages.** Every message a core emits is encoded with msgpack (so bodies meet the
  wire's limits: str/int/bytes/list/map only), logged in ``wire_log`` (for scans of what
  crossed the links) and queued on its link. ``pump`` delivers in *rounds*: a round
  hands every queued message to its receiver, in order; the messages those produce
  wait for the next round. ``pump`` stops when no message is left, and raises after
  ``max_rounds`` (a livelock is a bug). ``pump(rounds=k)`` stops after k rounds,
  leaving messages in flight (to cut a link or restart a node mid-protocol).
* **Links** are up at the start (``link_up`` at both ends). ``cut`` drops what is in
  flight on the link and tells both ends ``link_down``; ``restore`` tells them
  ``link_up``. ``tamper``, if set, sees every message as (src, dst, body) and returns
  the body to deliver (possibly altered) or None to drop it.
* **Key material.** ``add_material(a, b, n_bytes)`` appends one identical block (seeded
  random bytes) to the link's material at both ends, as the QKD link would, and calls
  ``material_added`` on both cores.
* **Time.** ``advance(dt_s)`` moves the clock, runs every core's due timers and pumps;
  ``run_until(predicate, max_t_s)`` does that in ``step_s`` steps.
* **Requests.** ``enc``/``dec`` start a request and return its number; events are
  collected per node (``events``), results by (node, request number) (``result``).
* **Restart.** ``restart(node)`` drops the core (and what is in flight to or from it),
  closes its store, reopens the same file and builds a new core on it, as a node process
  restarted after a crash would.

Randomness is seeded (numpy Generator per node and per incarnation); the PQC exchange
inside ``nodes.kms.hybrid`` uses the operating system's randomness by design, so runs
with policy pqc/hybrid differ in key bytes but not in behaviour. This module does no
I/O except the store files under ``store_dir`` and never reads a clock.
"""

from __future__ import annotations

import datetime as dt
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

from emulator.testing import FakeClock

from .kme import Kme, KmeConfig, KmeEvent, PairPolicy, RequestDone, RequestFailed
from .store import KeyState, KeyStore

__all__ = ["FakeClock", "KmeNetwork", "PumpError"]


class PumpError(RuntimeError):
    """The network did not settle within the round cap."""


def _close_all(stores: dict[str, KeyStore]) -> None:
    for st in stores.values():
        st.close()


def _link(a: str, b: str) -> tuple[str, str]:
    return (a, b) if a < b else (b, a)


class KmeNetwork:
    """N KME cores joined by in-memory KMS links (see the module docstring)."""

    def __init__(
        self,
        links: Iterable[tuple[str, str]],
        saes: Mapping[str, str],
        *,
        nodes: Iterable[str] = (),
        policies: Mapping[frozenset[str], PairPolicy] | None = None,
        default_policy: PairPolicy | None = None,
        seed: int = 0,
        store_dir: str | Path | None = None,
        credentials: Mapping[str, tuple[bytes, bytes, bytes]] | None = None,
        utc_origin: dt.datetime | None = None,
        config: Mapping[str, Any] | None = None,
        max_rounds: int = 10_000,
    ) -> None:
        """`credentials`: node -> (KME certificate PEM, key PEM, CA PEM) for the PQC exchange.

        `config`: extra KmeConfig fields for every node (stock_keys, timeouts, ...).
        `utc_origin`: the UTC time at fake-clock 0 (certificate validity).
        """
        self.links = sorted({_link(a, b) for a, b in links})
        self.saes = dict(saes)
        self.nodes = sorted(set(nodes) | {n for ln in self.links for n in ln} | set(self.saes.values()))
        self.clock = FakeClock(0.0)
        self.max_rounds = max_rounds
        self._seed = seed
        self._store_dir = Path(store_dir) if store_dir is not None else None
        self._utc_origin = utc_origin
        self._rng = np.random.default_rng([seed, 0x4B4D45])
        self._incarnation: dict[str, int] = {}
        self._block_ids: dict[tuple[str, str], int] = {}
        self._up: dict[tuple[str, str], bool] = {ln: True for ln in self.links}
        self._in_flight: deque[tuple[str, str, bytes]] = deque()
        self.wire_log: list[tuple[str, str, bytes]] = []
        self.events: dict[str, list[KmeEvent]] = {n: [] for n in self.nodes}
        self.results: dict[tuple[str, int], RequestDone | RequestFailed] = {}
        self.tamper: Callable[[str, str, dict[str, Any]], dict[str, Any] | None] | None = None
        self._next_req = 1
        creds = dict(credentials or {})
        extra = dict(config or {})
        self.configs: dict[str, KmeConfig] = {}
        for node in self.nodes:
            cert, key, ca = creds.get(node, (b"", b"", b""))
            kwargs: dict[str, Any] = dict(extra)
            if policies is not None:
                kwargs["policies"] = policies
            if default_policy is not None:
                kwargs["default_policy"] = default_policy
            self.configs[node] = KmeConfig(
                node=node, saes=self.saes, kms_links=tuple(self.links),
                kme_cert_pem=cert, kme_key_pem=key, ca_pem=ca, **kwargs,
            )  # fmt: skip
        self.stores: dict[str, KeyStore] = {}
        self._closer = weakref.finalize(self, _close_all, self.stores)  # no unclosed store outlives the network
        self.kmes: dict[str, Kme] = {}
        for node in self.nodes:
            self.stores[node] = self._open_store(node)
            self.kmes[node] = self._new_kme(node)
        for a, b in self.links:
            self.kmes[a].link_up(b, self.now)
            self.kmes[b].link_up(a, self.now)
        self.pump()

    # --- plumbing ----------------------------------------------------------------------

    @property
    def now(self) -> float:
        return self.clock.now_s

    def _open_store(self, node: str) -> KeyStore:
        path = ":memory:" if self._store_dir is None else str(self._store_dir / f"{node}.sqlite3")
        return KeyStore(path, node)

    def _new_kme(self, node: str) -> Kme:
        inc = self._incarnation.get(node, 0)
        self._incarnation[node] = inc + 1
        rng = np.random.default_rng([self._seed, self.nodes.index(node), inc])
        return Kme(
            self.configs[node], self.stores[node], random_bytes=lambda n: rng.bytes(n), now=self.now,
            utc_origin=self._utc_origin,
        )  # fmt: skip

    def kme(self, node: str) -> Kme:
        return self.kmes[node]

    def store(self, node: str) -> KeyStore:
        return self.stores[node]

    def close(self) -> None:
        self._closer()

    def __enter__(self) -> KmeNetwork:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- links and material ----------------------------------------------------------------

    def link_is_up(self, a: str, b: str) -> bool:
        return self._up[_link(a, b)]

    def cut(self, a: str, b: str) -> None:
        """Cut the link: in-flight messages on it are lost, both ends see link_down."""
        ln = _link(a, b)
        self._up[ln] = False
        self._in_flight = deque(m for m in self._in_flight if _link(m[0], m[1]) != ln)
        self.kmes[a].link_down(b, self.now)
        self.kmes[b].link_down(a, self.now)
        self._collect()

    def restore(self, a: str, b: str) -> None:
        self._up[_link(a, b)] = True
        self.kmes[a].link_up(b, self.now)
        self.kmes[b].link_up(a, self.now)
        self._collect()

    def add_material(self, a: str, b: str, n_bytes: int) -> None:
        """One QKD block of `n_bytes` seeded random bytes, identical at both ends of link a-b."""
        ln = _link(a, b)
        if ln not in self._up:
            raise ValueError(f"no KMS link {a}-{b}")
        block_id = self._block_ids.get(ln, 0)
        self._block_ids[ln] = block_id + 1
        block = self._rng.bytes(n_bytes)
        for x, y in (ln, ln[::-1]):
            self.stores[x].add_link_block(y, block_id, block, self.now)
        for x, y in (ln, ln[::-1]):
            self.kmes[x].material_added(y, self.now)
        self._collect()

    def add_material_all(self, n_bytes: int) -> None:
        for a, b in self.links:
            self.add_material(a, b, n_bytes)

    # --- moving messages and time ----------------------------------------------------------

    def _collect(self) -> int:
        n = 0
        for node in self.nodes:
            kme = self.kmes[node]
            for peer, body in kme.messages_to_send():
                raw = msgpack.packb(body, use_bin_type=True)
                self.wire_log.append((node, peer, raw))
                ln = _link(node, peer)
                if self._up.get(ln):
                    self._in_flight.append((node, peer, raw))
                    n += 1
            while (ev := kme.next_event()) is not None:
                self.events[node].append(ev)
                if isinstance(ev, (RequestDone, RequestFailed)):
                    self.results[(node, ev.req)] = ev
        return n

    def pump(self, rounds: int | None = None) -> int:
        """Deliver messages in rounds until none is left (or `rounds` rounds); returns rounds run."""
        self._collect()
        done = 0
        while self._in_flight:
            if rounds is not None and done >= rounds:
                return done
            if done >= self.max_rounds:
                raise PumpError(f"the KME network did not settle within {self.max_rounds} rounds")
            batch, self._in_flight = self._in_flight, deque()
            for src, dst, raw in batch:
                body = msgpack.unpackb(raw, raw=False)
                if self.tamper is not None:
                    body = self.tamper(src, dst, body)
                    if body is None:
                        continue
                self.kmes[dst].receive(src, body, self.now)
            self._collect()
            done += 1
        return done

    def advance(self, dt_s: float) -> None:
        """Move the clock by dt_s, fire due timers (repeatedly while any is due), pump."""
        self.clock.advance(dt_s)
        for _ in range(100):
            due = [n for n in self.nodes if (t := self.kmes[n].get_timer()) is not None and t <= self.now]
            if not due:
                break
            for n in due:
                self.kmes[n].handle_timer(self.now)
            self.pump()
        else:
            raise PumpError("timers keep firing at the same time")
        self.pump()

    def run_until(self, predicate: Callable[[], bool], *, max_t_s: float, step_s: float = 0.05) -> float:
        """Advance in steps until `predicate()`; TimeoutError after max_t_s emulated seconds."""
        end = self.now + max_t_s
        self.pump()
        while not predicate():
            if self.now >= end:
                raise TimeoutError(f"condition not met within {max_t_s} s (t = {self.now:.3f} s)")
            self.advance(step_s)
        return self.now

    # --- requests --------------------------------------------------------------------------

    def _req(self) -> int:
        req = self._next_req
        self._next_req += 1
        return req

    def enc(
        self,
        node: str,
        master: str,
        slave: str,
        number: int = 1,
        size_bits: int | None = None,
        additional: tuple[str, ...] = (),
    ) -> int:
        req = self._req()
        self.kmes[node].enc_keys(req, master, slave, number, size_bits, tuple(additional), self.now)
        self._collect()
        return req

    def dec(self, node: str, slave: str, master: str, key_ids: Iterable[str]) -> int:
        req = self._req()
        self.kmes[node].dec_keys(req, slave, master, tuple(key_ids), self.now)
        self._collect()
        return req

    def result(self, node: str, req: int) -> RequestDone | RequestFailed | None:
        self._collect()
        return self.results.get((node, req))

    def wait_result(self, node: str, req: int, *, max_t_s: float = 10.0) -> RequestDone | RequestFailed:
        self.run_until(lambda: (node, req) in self.results, max_t_s=max_t_s)
        return self.results[(node, req)]

    def request_keys(
        self, node: str, master: str, slave: str, number: int = 1, size_bits: int | None = None,
        additional: tuple[str, ...] = (), *, max_t_s: float = 10.0,
    ) -> RequestDone | RequestFailed:  # fmt: skip
        return self.wait_result(node, self.enc(node, master, slave, number, size_bits, additional), max_t_s=max_t_s)

    def fetch_keys(
        self, node: str, slave: str, master: str, key_ids: Iterable[str], *, max_t_s: float = 10.0
    ) -> RequestDone | RequestFailed:
        return self.wait_result(node, self.dec(node, slave, master, key_ids), max_t_s=max_t_s)

    def events_of(self, node: str, kind: type) -> list[Any]:
        self._collect()
        return [e for e in self.events[node] if isinstance(e, kind)]

    # --- restart ---------------------------------------------------------------------------

    def restart(self, node: str) -> Kme:
        """Crash and restart `node`'s KME over its store file (needs `store_dir`)."""
        if self._store_dir is None:
            raise ValueError("restart needs store files: build the network with store_dir")
        self._collect()
        self._in_flight = deque(m for m in self._in_flight if node not in (m[0], m[1]))
        self.stores[node].close()
        self.stores[node] = self._open_store(node)
        self.kmes[node] = self._new_kme(node)
        for a, b in self.links:
            if node in (a, b) and self._up[(a, b)]:
                peer = b if a == node else a
                self.kmes[node].link_up(peer, self.now)
                # the peer sees its connection to the restarted process come back
                self.kmes[peer].link_down(node, self.now)
                self.kmes[peer].link_up(node, self.now)
        self._collect()
        return self.kmes[node]

    def count(self, node: str, peer: str, owner: str, state: KeyState = KeyState.READY) -> int:
        """Keys of (peer, owner) in `state` in `node`'s store."""
        return self.stores[node].count_keys(peer, owner, state)
