"""The per-peer key pool (nodes/qkd/keypool.py): append, take from the front, digest
of everything added (SHA-256 over the canonical bytes), counts-only repr/statistics."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from nodes.qkd.keypool import KeyPool, KeyPoolError, KeyPoolExhausted


def bits(seed: int, n: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 2, n, dtype=np.uint8)


def test_take_returns_the_added_bits_in_order() -> None:
    pool = KeyPool("bob")
    a, b = bits(1, 100), bits(2, 37)
    pool.add(0, a)
    pool.add(1, b)
    assert pool.bits_available == 137 and pool.bits_added == 137
    np.testing.assert_array_equal(pool.take(60), a[:60])
    np.testing.assert_array_equal(pool.take(77), np.concatenate([a[60:], b]))
    assert pool.bits_available == 0
    with pytest.raises(KeyPoolExhausted):
        pool.take(1)
    assert pool.statistics().bits_taken == 137


def test_take_bytes_packs_lsb_first() -> None:
    pool = KeyPool()
    pool.add(0, np.array([1, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0], dtype=np.uint8))
    assert pool.take_bytes(2) == bytes([0x01, 0x02])


def test_digest_is_sha256_of_the_concatenation_whatever_the_block_cut_and_takes() -> None:
    whole = bits(3, 1003)
    one, two = KeyPool(), KeyPool()
    one.add(0, whole)
    two.add(5, whole[:3])
    two.take(2)  # taking does not change the digest
    two.add(6, whole[3:500])
    two.add(7, whole[500:])
    want = hashlib.sha256(np.packbits(whole, bitorder="little").tobytes()).digest()
    assert one.digest() == two.digest() == want
    other = KeyPool()
    flipped = whole.copy()
    flipped[999] ^= 1
    other.add(0, flipped)
    assert other.digest() != want


def test_bad_input_is_refused() -> None:
    pool = KeyPool()
    pool.add(0, bits(4, 8))
    with pytest.raises(KeyPoolError, match="already"):
        pool.add(0, bits(4, 8))
    with pytest.raises(KeyPoolError):
        pool.add(1, np.array([0, 2], dtype=np.uint8))
    with pytest.raises(KeyPoolError):
        pool.add(-1, bits(4, 8))
    with pytest.raises(KeyPoolError):
        pool.take(-1)
    assert pool.block_ids == (0,)


def test_repr_and_statistics_show_counts_and_block_ids_only() -> None:
    pool = KeyPool("alice")
    key = np.ones(4096, dtype=np.uint8)  # all-ones: 0xff bytes would show in any dump
    pool.add(17, key)
    shown = repr(pool) + repr(pool.statistics())
    assert "17" in repr(pool.statistics()) and "4096" in shown
    assert "\\xff" not in shown and "1, 1, 1" not in shown and "ff" not in shown.lower().replace("off", "")
