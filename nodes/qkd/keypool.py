"""The per-peer pool of final key bits of one QKD link, in memory (sans-IO).

Theory of operation
-------------------
Privacy amplification leaves both ends of a link with the same final key per block
(``nodes.qkd.session``). Each end appends it, block after block and in the same order,
to its ``KeyPool`` for that peer, so both pools hold the same bit string. Consumers take
bits from the front (``take``): the link's own authentication refills first, later the
key-management layer (DESIGN §8). As long as both ends take the same amounts in the same
order, they take the same bits — the pool has no other synchronisation.

Two ends compare their pools out of band with ``digest()``: SHA-256 (FIPS 180-4 §6.2)
over the canonical bytes of everything ever added (bit i of the concatenation at bit
i % 8 of byte i // 8, zero-padded to a whole byte), independent of what has been taken.
The digest is a test and audit aid only: it is a hash *of key material*, so it never goes
into the results either (only counts and block ids do).

Append-only: bits are never changed once added; taken bits are forgotten. Key bits never
appear in a repr, an exception or ``statistics()``. The key-management issue replaces this
class with a SQLite store (DESIGN §8) behind the same add/take interface.
"""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np

__all__ = ["KeyPool", "KeyPoolError", "KeyPoolExhausted", "KeyPoolStatistics", "KeyPools"]


class KeyPoolError(ValueError):
    """The caller misused the pool (bad bits, duplicate block id, bad amount)."""


class KeyPoolExhausted(KeyPoolError):
    """Fewer bits are available than were asked for (nothing was taken)."""


@dataclasses.dataclass(frozen=True, slots=True)
class KeyPoolStatistics:
    """Counts only: bits added / taken / available and the ids of the blocks added."""

    peer: str
    bits_added: int
    bits_taken: int
    bits_available: int
    blocks: int
    block_ids: tuple[int, ...]


def _as_bits(bits: object) -> np.ndarray:
    arr = np.asarray(bits)
    if arr.ndim != 1:
        raise KeyPoolError(f"key bits must be a 1-D array, got shape {arr.shape}")
    if arr.dtype == np.bool_:
        arr = arr.view(np.uint8)
    if arr.size and (arr.dtype.kind not in "iu" or int(arr.min()) < 0 or int(arr.max()) > 1):
        raise KeyPoolError("key bits must be 0/1 integers")
    return np.ascontiguousarray(arr, dtype=np.uint8)


class KeyPool:
    """Append-only pool of the final key shared with one peer (see the module docstring)."""

    __slots__ = ("_bits", "_block_ids", "_digest", "_pending", "_peer", "_pos", "_added")

    def __init__(self, peer: str = "") -> None:
        self._peer = str(peer)
        self._bits = np.zeros(0, dtype=np.uint8)  # not yet taken
        self._pos = 0  # bits taken
        self._added = 0
        self._block_ids: list[int] = []
        self._digest = hashlib.sha256()
        self._pending = np.zeros(0, dtype=np.uint8)  # < 8 bits not yet fed to the digest

    def add(self, block_id: int, bits: np.ndarray) -> None:
        """Append the final key of block `block_id` (uint8/bool 0/1 bits; may be empty)."""
        if isinstance(block_id, bool) or not isinstance(block_id, (int, np.integer)) or block_id < 0:
            raise KeyPoolError(f"block_id must be a non-negative int, got {type(block_id).__name__}")
        bid = int(block_id)
        if bid in self._block_ids:
            raise KeyPoolError(f"block {bid} is already in the pool")
        arr = _as_bits(bits)
        self._block_ids.append(bid)
        self._bits = np.concatenate([self._bits, arr])
        self._added += int(arr.size)
        stream = np.concatenate([self._pending, arr])
        whole = stream.size - stream.size % 8
        self._digest.update(np.packbits(stream[:whole], bitorder="little").tobytes())
        self._pending = stream[whole:]

    def take(self, n_bits: int) -> np.ndarray:
        """Remove and return the oldest `n_bits` bits (uint8 0/1); KeyPoolExhausted if short."""
        if isinstance(n_bits, bool) or not isinstance(n_bits, (int, np.integer)) or n_bits < 0:
            raise KeyPoolError(f"n_bits must be a non-negative int, got {n_bits!r}")
        n = int(n_bits)
        if n > self.bits_available:
            raise KeyPoolExhausted(f"the pool for {self._peer!r} holds {self.bits_available} bits; {n} requested")
        out, self._bits = self._bits[:n].copy(), self._bits[n:]
        self._pos += n
        return out

    def take_bytes(self, n_bytes: int) -> bytes:
        """`take(8 * n_bytes)` as bytes (bit i at bit i % 8 of byte i // 8)."""
        return np.packbits(self.take(8 * int(n_bytes)), bitorder="little").tobytes()

    @property
    def peer(self) -> str:
        return self._peer

    @property
    def bits_available(self) -> int:
        return int(self._bits.size)

    @property
    def bits_added(self) -> int:
        return self._added

    @property
    def block_ids(self) -> tuple[int, ...]:
        return tuple(self._block_ids)

    def digest(self) -> bytes:
        """SHA-256 over everything ever added (see the module docstring); for out-of-band
        comparison of two ends in tests and audits — never put it in results."""
        h = self._digest.copy()
        if self._pending.size:
            h.update(np.packbits(self._pending, bitorder="little").tobytes())
        return h.digest()

    def statistics(self) -> KeyPoolStatistics:
        return KeyPoolStatistics(
            peer=self._peer,
            bits_added=self._added,
            bits_taken=self._pos,
            bits_available=self.bits_available,
            blocks=len(self._block_ids),
            block_ids=tuple(self._block_ids),
        )

    def __repr__(self) -> str:
        return (
            f"<KeyPool peer={self._peer!r} blocks={len(self._block_ids)} "
            f"bits_available={self.bits_available} bits_taken={self._pos}>"
        )


class KeyPools:
    """A node's key pools, one per peer, created on first use. The node owns one; every
    QKD session with a peer fills that peer's pool, and key management (DESIGN §8)
    takes from it."""

    __slots__ = ("_pools",)

    def __init__(self) -> None:
        self._pools: dict[str, KeyPool] = {}

    def pool(self, peer: str) -> KeyPool:
        pool = self._pools.get(peer)
        if pool is None:
            pool = self._pools[peer] = KeyPool(peer)
        return pool

    def peers(self) -> tuple[str, ...]:
        return tuple(self._pools)

    def statistics(self) -> dict[str, KeyPoolStatistics]:
        return {peer: pool.statistics() for peer, pool in self._pools.items()}

    def __repr__(self) -> str:
        return f"<KeyPools peers={sorted(self._pools)}>"
