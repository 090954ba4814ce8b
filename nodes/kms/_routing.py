"""Link-state routing between KMEs over the QKD links (sans-IO).

Theory of operation
-------------------
Every KME knows the static set of its KMS neighbours (the other ends of its QKD
links). The node's liveness layer tells it when a neighbour's classical link is up or
down (``link_up`` / ``link_down``). Each KME describes its own view in a *link-state
advertisement* (LSA, as in OSPF, RFC 2328 §12, much simplified)::

    {"op": "lsa", "origin": node, "seq": n, "up": [neighbours origin sees up]}

and floods it: the origin sends it to every neighbour that is up; a KME that receives
an LSA newer than the one it holds (higher ``seq`` for that origin) stores it and sends
it on to its other up neighbours; older or equal ones are dropped. That is reliable
flooding in the sense of RFC 2328 §13 without acknowledgements: the origin re-issues
its LSA (with a higher seq) on every change and every ``LSA_REFRESH_S`` seconds, and a
KME whose link comes up sends its whole database to the new neighbour, so a lost LSA is
repaired within one refresh period. A restarted KME starts at seq 0; when it hears its
own old LSA (seq >= its own) it jumps past it and re-floods (RFC 2328 §13.4).

Routes. An edge u-v exists only if *both* u's and v's LSAs list the other as up (and,
for this KME's own links, its own current view): a node that died cannot keep edges
alive with its last LSA, because its neighbours report the link down. Paths minimise
the hop count; ties are broken by name: from a node at distance d from the
destination, the next hop is the alphabetically first neighbour at distance d - 1.
Every KME applies the same rule to the same database, so the path of a message
forwarded hop by hop is the path its source computed (and is loop-free whenever the
databases agree; the envelope's TTL covers the moments when they do not).

This module keeps no secrets and does no I/O; methods return the LSAs to send as
``(neighbour, body)`` pairs.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping
from typing import Any, Final

__all__ = ["LSA_REFRESH_S", "LinkStateRouter", "RoutingError"]

#: The origin re-floods its LSA this often (repairs lost LSAs, ages nothing out).
LSA_REFRESH_S: Final = 2.0
_MAX_SEQ: Final = 1 << 62


class RoutingError(ValueError):
    """A malformed LSA (the neighbour's fault)."""


class LinkStateRouter:
    """The routing state of KME `node` with static KMS neighbours `neighbours`."""

    __slots__ = ("_db", "_neighbours", "_next_refresh", "_node", "_nodes", "_paths", "_seq", "_up")

    def __init__(self, node: str, neighbours: Iterable[str], nodes: Iterable[str], now: float) -> None:
        self._node = node
        self._neighbours = frozenset(neighbours)
        self._nodes = frozenset(nodes) | self._neighbours | {node}
        self._up: set[str] = set()
        self._seq = 0
        self._db: dict[str, tuple[int, frozenset[str]]] = {}
        self._paths: dict[str, tuple[str, ...]] | None = None
        self._next_refresh = now + LSA_REFRESH_S

    # --- inputs ---------------------------------------------------------------------------

    def link_up(self, peer: str, now: float) -> list[tuple[str, dict[str, Any]]]:
        """`peer`'s link came up: re-flood our LSA and send the new neighbour our database."""
        if peer not in self._neighbours:
            raise ValueError(f"{peer!r} is not a KMS neighbour of {self._node!r}")
        self._up.add(peer)
        out = self._originate(now)
        for origin in sorted(self._db):
            seq, up = self._db[origin]
            out.append((peer, _lsa(origin, seq, up)))
        return out

    def link_down(self, peer: str, now: float) -> list[tuple[str, dict[str, Any]]]:
        if peer not in self._neighbours:
            raise ValueError(f"{peer!r} is not a KMS neighbour of {self._node!r}")
        if peer not in self._up:
            return []
        self._up.discard(peer)
        return self._originate(now)

    def receive_lsa(self, peer: str, body: Mapping[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        """An LSA from neighbour `peer`; RoutingError if malformed. Returns the LSAs to send on."""
        origin, seq, up = _parse_lsa(body, self._nodes)
        if origin == self._node:
            # Our own LSA coming back is normal; one we never sent (higher seq, or our seq with
            # other contents) is from before a restart: jump past it.
            if seq > self._seq or (seq == self._seq and up != frozenset(self._up)):
                self._seq = seq
                return self._originate(None)
            return []
        known = self._db.get(origin)
        if known is not None and seq <= known[0]:
            return []
        changed = known is None or known[1] != up
        self._db[origin] = (seq, up)
        if changed:
            self._paths = None
        msg = _lsa(origin, seq, up)
        return [(n, msg) for n in sorted(self._up) if n != peer]

    def handle_timer(self, now: float) -> list[tuple[str, dict[str, Any]]]:
        if now < self._next_refresh:
            return []
        return self._originate(now)

    def get_timer(self) -> float:
        return self._next_refresh

    # --- queries --------------------------------------------------------------------------

    @property
    def up_neighbours(self) -> frozenset[str]:
        return frozenset(self._up)

    def path(self, dst: str) -> tuple[str, ...]:
        """The path (self, ..., dst) by the rule in the module docstring; () if unreachable."""
        if self._paths is None:
            self._paths = self._compute()
        return self._paths.get(dst, ())

    def next_hop(self, dst: str) -> str | None:
        p = self.path(dst)
        return p[1] if len(p) >= 2 else None

    # --- internals ------------------------------------------------------------------------

    def _originate(self, now: float | None) -> list[tuple[str, dict[str, Any]]]:
        self._seq = min(self._seq + 1, _MAX_SEQ)
        self._paths = None
        if now is not None:
            self._next_refresh = now + LSA_REFRESH_S
        msg = _lsa(self._node, self._seq, frozenset(self._up))
        return [(n, msg) for n in sorted(self._up)]

    def _adjacency(self) -> dict[str, list[str]]:
        views: dict[str, frozenset[str]] = {o: up for o, (_, up) in self._db.items()}
        views[self._node] = frozenset(self._up)
        adj: dict[str, list[str]] = {}
        for u, up in views.items():
            for v in up:
                if v != u and u in views.get(v, frozenset()):
                    adj.setdefault(u, []).append(v)
        for u in adj:
            adj[u].sort()
        return adj

    def _compute(self) -> dict[str, tuple[str, ...]]:
        adj = self._adjacency()
        paths: dict[str, tuple[str, ...]] = {}
        for dst in adj:
            if dst == self._node:
                continue
            dist = {dst: 0}  # BFS from the destination (edges are symmetric)
            queue = deque([dst])
            while queue:
                u = queue.popleft()
                for v in adj.get(u, ()):
                    if v not in dist:
                        dist[v] = dist[u] + 1
                        queue.append(v)
            if self._node not in dist:
                continue
            path = [self._node]
            cur = self._node
            while cur != dst:
                cur = next(v for v in adj[cur] if dist.get(v) == dist[cur] - 1)  # adj is sorted
                path.append(cur)
            paths[dst] = tuple(path)
        return paths


def _lsa(origin: str, seq: int, up: frozenset[str]) -> dict[str, Any]:
    return {"op": "lsa", "origin": origin, "seq": seq, "up": sorted(up)}


def _parse_lsa(body: Mapping[str, Any], nodes: frozenset[str]) -> tuple[str, int, frozenset[str]]:
    origin, seq, up = body.get("origin"), body.get("seq"), body.get("up")
    if not isinstance(origin, str) or origin not in nodes:
        raise RoutingError("LSA: unknown origin")
    if isinstance(seq, bool) or not isinstance(seq, int) or not 0 < seq <= _MAX_SEQ:
        raise RoutingError("LSA: bad seq")
    if not isinstance(up, (list, tuple)) or len(up) > len(nodes):
        raise RoutingError("LSA: bad neighbour list")
    if not all(isinstance(n, str) and n in nodes and n != origin for n in up):
        raise RoutingError("LSA: unknown neighbour")
    return origin, seq, frozenset(up)
