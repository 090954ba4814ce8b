"""The node's QKD key pools, kept in its key store (DESIGN §8).

Theory of operation. A QKD link session (nodes/qkd/session.py) adds each block's final
key to its ``pool(peer)``; the key management entity takes it from there. `StorePools`
gives the session the interface of ``nodes.qkd.keypool.KeyPools`` (``pool(peer)`` with
``add``, ``digest``, counts) over ``KeyStore.add_link_block``, so a block's key goes
straight to disk, in one transaction, before the session goes on: a node that is
killed keeps every block it had finished.

The store keeps whole bytes: a block's ``n % 8`` trailing bits are dropped at both
ends alike. ``take`` is not offered: link key leaves the store only through the KME
(``take_own`` / ``take_peer``), which keeps the two ends in step. ``digest`` is the
store's ``link_digest`` (a chain of per-block SHA-256), for the QKD app's salted
end-of-session comparison — never a result. `now` for ``add`` is the wall clock the
caller passes at construction (the time only labels rows).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from nodes.qkd.keypool import KeyPoolError, KeyPoolStatistics

from .store import KeyStore, KeyStoreError

__all__ = ["StorePool", "StorePools"]


class StorePool:
    """One link's pool, a view of the key store."""

    __slots__ = ("_clock", "_notify", "_peer", "_store")

    def __init__(self, store: KeyStore, peer: str, clock: Callable[[], float],
                 notify: Callable[[str], None] | None = None) -> None:
        self._store = store
        self._peer = peer
        self._clock = clock
        self._notify = notify

    @property
    def peer(self) -> str:
        return self._peer

    def add(self, block_id: int, bits: np.ndarray) -> None:
        arr = np.asarray(bits)
        if arr.ndim != 1:
            raise KeyPoolError(f"key bits must be a 1-D array, got shape {arr.shape}")
        whole = arr.size - arr.size % 8
        packed = np.packbits(np.ascontiguousarray(arr[:whole], dtype=np.uint8), bitorder="little").tobytes()
        try:
            self._store.add_link_block(self._peer, int(block_id), packed, self._clock())
        except KeyStoreError as exc:
            raise KeyPoolError(str(exc)) from None
        if self._notify is not None:
            self._notify(self._peer)

    def take(self, n_bits: int) -> np.ndarray:
        raise KeyPoolError("link key leaves the key store through the KME, not through the pool")

    def take_bytes(self, n_bytes: int) -> bytes:
        raise KeyPoolError("link key leaves the key store through the KME, not through the pool")

    def _stats(self) -> tuple[int, int, int]:
        st = self._store.link_statistics(self._peer)
        added = st.own_added_bytes + st.peer_added_bytes
        taken = st.own_taken_bytes + st.peer_taken_bytes + st.peer_skipped_bytes
        return 8 * added, 8 * taken, st.blocks

    @property
    def bits_added(self) -> int:
        return self._stats()[0]

    @property
    def bits_available(self) -> int:
        added, taken, _ = self._stats()
        return added - taken

    @property
    def block_ids(self) -> tuple[int, ...]:
        return ()  # the store keeps counts; block ids are in the QKD app's block log

    def digest(self) -> bytes:
        return self._store.link_digest(self._peer)

    def statistics(self) -> KeyPoolStatistics:
        added, taken, blocks = self._stats()
        return KeyPoolStatistics(self._peer, added, taken, added - taken, blocks, ())

    def __repr__(self) -> str:
        return f"<StorePool peer={self._peer!r}>"


class StorePools:
    """`KeyPools` over a `KeyStore`: one `StorePool` per peer."""

    __slots__ = ("_clock", "_pools", "_store", "on_added")

    def __init__(self, store: KeyStore, clock: Callable[[], float]) -> None:
        self._store = store
        self._clock = clock
        self._pools: dict[str, StorePool] = {}
        #: Called with the peer after each block is stored (the node tells its KME).
        self.on_added: Callable[[str], None] | None = None

    def pool(self, peer: str) -> StorePool:
        pool = self._pools.get(peer)
        if pool is None:
            pool = self._pools[peer] = StorePool(self._store, peer, self._clock, self._added)
        return pool

    def _added(self, peer: str) -> None:
        if self.on_added is not None:
            self.on_added(peer)

    def peers(self) -> tuple[str, ...]:
        return tuple(sorted(set(self._pools) | set(self._store.link_peers())))

    def statistics(self) -> dict[str, KeyPoolStatistics]:
        return {peer: self.pool(peer).statistics() for peer in self.peers()}

    def __repr__(self) -> str:
        return f"<StorePools peers={list(self.peers())}>"
