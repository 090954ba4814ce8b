"""`StorePools`: the QKD sessions' pool interface over the node's key store."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from nodes.kms.pools import StorePools
from nodes.kms.store import KeyStore
from nodes.qkd.keypool import KeyPoolError


def _bits(seed: int, n: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 2, n, dtype=np.uint8)


def test_blocks_reach_the_store_in_whole_bytes_and_both_ends_agree(tmp_path: Path) -> None:
    alice = KeyStore(tmp_path / "a.sqlite", "alice")
    bob = KeyStore(tmp_path / "b.sqlite", "bob")
    told: list[str] = []
    pa, pb = StorePools(alice, lambda: 1.0), StorePools(bob, lambda: 1.0)
    pa.on_added = told.append
    for block_id, n in enumerate((1003, 64, 0, 517)):
        bits = _bits(block_id, n)
        pa.pool("bob").add(block_id, bits)
        pb.pool("alice").add(block_id, bits)
    assert told == ["bob"] * 4
    whole = 8 * sum(n // 8 for n in (1003, 64, 0, 517))  # trailing bits are dropped at both ends
    assert pa.pool("bob").bits_added == pb.pool("alice").bits_added == whole
    assert pa.pool("bob").digest() == pb.pool("alice").digest()
    # The first half of each block belongs to the lower name (alice), the rest to bob.
    pos, mine = alice.take_own("bob", 10)
    assert bob.take_peer("alice", pos, 10) == mine
    assert pa.pool("bob").bits_available == whole - 80
    assert pa.statistics()["bob"].bits_taken == 80 and pa.peers() == ("bob",)
    with pytest.raises(KeyPoolError, match="added before"):
        pa.pool("bob").add(0, _bits(0, 1003))  # a block id twice
    with pytest.raises(KeyPoolError, match="through the KME"):
        pa.pool("bob").take(8)
    # The store outlives the process: a new view over the same file sees the same pool.
    alice.close()
    again = StorePools(KeyStore(tmp_path / "a.sqlite", "alice"), lambda: 2.0)
    assert again.pool("bob").bits_added == whole and again.pool("bob").digest() == pb.pool("alice").digest()


def test_bad_bits_are_refused() -> None:
    pools = StorePools(KeyStore(":memory:", "alice"), lambda: 0.0)
    with pytest.raises(KeyPoolError, match="1-D"):
        pools.pool("bob").add(0, np.zeros((2, 8), dtype=np.uint8))
