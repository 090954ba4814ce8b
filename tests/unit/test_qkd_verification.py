"""Key verification (nodes/qkd/verification.py): polynomial hash + short Toeplitz tag.

- equal keys give equal tags, in unpacked and packed form alike;
- keys differing in 1..k bits give different tags over many seeded trials;
- the tag length is the smallest meeting the stated bound (L + 2)/2^127 + 2^-t <= ε_cor,
  computed exactly; with a deliberately tiny tag the observed collision rate is 2^-t;
- an independent re-implementation (direct power sums, explicit Toeplitz matrix) agrees;
- typed errors for bad seeds, keys and ε values.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from nodes.qkd import _polyhash
from nodes.qkd.amplification import pack_bits, toeplitz_hash_reference
from nodes.qkd.verification import (
    MAX_TAG_BITS,
    EpsilonError,
    KeyFormatError,
    SeedError,
    VerificationError,
    VerificationHash,
    key_bytes,
)


def _key(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, 2, n, dtype=np.uint8)


def test_equal_keys_give_equal_tags_in_both_formats() -> None:
    rng = np.random.default_rng(1)
    for n in (1, 7, 8, 63, 64, 65, 1000, 4099):
        h = VerificationHash.for_epsilon(n, 1e-12)
        key = _key(rng, n)
        seed = h.draw_seed(rng)
        tag = h.tag(key, seed)
        assert len(tag) == h.tag_bytes
        assert h.tag(key.copy(), seed) == tag
        assert h.tag(pack_bits(key), seed) == tag
        assert h.check(key, seed, tag)


def test_packed_bits_beyond_the_key_length_are_ignored() -> None:
    rng = np.random.default_rng(2)
    key = _key(rng, 100)
    words = pack_bits(key)
    dirty = words.copy()
    dirty[-1] |= np.uint64(1) << np.uint64(63)  # bit 127, outside the 100-bit key
    h = VerificationHash.for_epsilon(100, 1e-9)
    seed = h.draw_seed(rng)
    assert h.tag(dirty, seed) == h.tag(words, seed)


@pytest.mark.parametrize("k", range(1, 9))
def test_keys_differing_in_k_bits_get_different_tags(k: int) -> None:
    """300 seeded trials per k at ε_cor = 1e-9: a collision has probability <= 1e-9 per trial."""
    rng = np.random.default_rng(1000 + k)
    n = 5000
    h = VerificationHash.for_epsilon(n, 1e-9)
    assert h.tag_bits == 30
    for _ in range(300):
        a = _key(rng, n)
        b = a.copy()
        b[rng.choice(n, size=k, replace=False)] ^= 1
        seed = h.draw_seed(rng)
        assert h.tag(a, seed) != h.tag(b, seed)
        assert not h.check(b, seed, h.tag(a, seed))  # mismatch: discard the block


def test_observed_collision_rate_matches_two_to_the_minus_t() -> None:
    """With t = 4 a pair of different keys collides with probability 2^-4 + ~1e-36.

    4000 trials: the standard deviation of the rate is sqrt(p(1-p)/N) = 0.0038; the
    tolerance 0.017 is 4.5 sigma. Too few collisions would mean the tag holds fewer
    than t independent bits' worth of output; too many, a weaker family.
    """
    rng = np.random.default_rng(4)
    h = VerificationHash(n_bits=256, tag_bits=4)
    trials = 4000
    hits = 0
    for _ in range(trials):
        a = _key(rng, 256)
        b = a.copy()
        b[int(rng.integers(256))] ^= 1
        seed = h.draw_seed(rng)
        hits += h.tag(a, seed) == h.tag(b, seed)
    assert abs(hits / trials - 1 / 16) < 0.017


def test_tag_length_is_the_shortest_meeting_the_bound() -> None:
    for n in (1, 1000, 10**5, 10**6, 10**7):
        for eps in (0.5, 1e-3, 2.0**-40, 1e-10, 1e-15, 1e-20, 1e-30):
            h = VerificationHash.for_epsilon(n, eps)
            eps1 = Fraction(_polyhash.n_blocks(-(-n // 8)) + 2, 1 << 127)
            assert eps1 + Fraction(1, 1 << h.tag_bits) <= Fraction(eps)
            assert h.tag_bits == 1 or eps1 + Fraction(1, 1 << (h.tag_bits - 1)) > Fraction(eps)
            assert h.collision_bound <= eps


def test_known_tag_lengths() -> None:
    # 1e-15 -> ceil(log2(1e15)) = ceil(49.83) = 50; exactly 2^-40 needs 41 bits because
    # the polynomial stage's (L + 2)/2^127 must fit too.
    assert VerificationHash.for_epsilon(10**6, 1e-15).tag_bits == 50
    assert VerificationHash.for_epsilon(1000, 2.0**-40).tag_bits == 41
    assert VerificationHash.for_epsilon(10**6, 1e-15).seed_bytes == 16 + 22  # 16 + ceil(176/8)


def test_independent_reimplementation_agrees() -> None:
    """Stage 1 as sum m_i r^(L+2-i) with pow(); stage 2 with the explicit Toeplitz matrix."""
    rng = np.random.default_rng(6)
    for n in (5, 120, 121, 1000, 3001):
        h = VerificationHash.for_epsilon(n, 1e-12)
        key = _key(rng, n)
        seed = h.draw_seed(rng)
        data = np.packbits(key, bitorder="little").tobytes()
        blocks = [int.from_bytes(data[i : i + 15], "little") for i in range(0, len(data), 15)] + [n]
        p = (1 << 127) - 1
        r = (int.from_bytes(seed[:16], "little") & p) % p
        big_l = len(blocks)
        v = sum(m * pow(r, big_l + 1 - i, p) for i, m in enumerate(blocks, start=1)) % p
        v_bits = np.array([(v >> j) & 1 for j in range(127)], dtype=np.uint8)
        s_int = int.from_bytes(seed[16:], "little")
        s_bits = np.array([(s_int >> j) & 1 for j in range(126 + h.tag_bits)], dtype=np.uint8)
        y = toeplitz_hash_reference(v_bits, s_bits, h.tag_bits)
        want = sum(int(b) << i for i, b in enumerate(y)).to_bytes(h.tag_bytes, "little")
        assert h.tag(key, seed) == want, n


@given(st.lists(st.integers(0, 1), min_size=1, max_size=200))
def test_key_bytes_is_the_same_for_both_formats(bits) -> None:
    b = np.array(bits, dtype=np.uint8)
    assert key_bytes(b, b.size) == key_bytes(pack_bits(b), b.size) == np.packbits(b, bitorder="little").tobytes()


def test_different_lengths_hash_differently() -> None:
    # The length block separates keys that differ only by trailing zeros.
    rng = np.random.default_rng(8)
    r = _polyhash.key_from_bytes(rng.bytes(16))
    assert _polyhash.poly_hash(b"\x01", r, 8) != _polyhash.poly_hash(b"\x01\x00", r, 16)


# --------------------------------------------------------------------- errors


def test_seed_length_is_checked() -> None:
    h = VerificationHash.for_epsilon(64, 1e-9)
    key = np.zeros(64, dtype=np.uint8)
    with pytest.raises(SeedError, match=f"has 3 bytes; {h.seed_bytes} are needed"):
        h.tag(key, b"abc")


def test_key_format_is_checked() -> None:
    h = VerificationHash.for_epsilon(64, 1e-9)
    seed = bytes(h.seed_bytes)
    with pytest.raises(KeyFormatError, match="has 63 bits"):
        h.tag(np.zeros(63, dtype=np.uint8), seed)
    with pytest.raises(KeyFormatError, match="needs 1 uint64 words, got 2"):
        h.tag(np.zeros(2, dtype=np.uint64), seed)
    with pytest.raises(KeyFormatError):
        h.tag(np.full(64, 2, dtype=np.uint8), seed)
    with pytest.raises(KeyFormatError):
        h.tag(np.zeros(64, dtype=np.float64), seed)


@pytest.mark.parametrize("eps", [0.0, 1.0, -1e-9, 2.0, 1e-300])
def test_bad_epsilon_is_a_typed_error(eps: float) -> None:
    with pytest.raises(EpsilonError):
        VerificationHash.for_epsilon(1000, eps)


def test_parameter_ranges() -> None:
    assert issubclass(VerificationError, ValueError)
    with pytest.raises(VerificationError):
        VerificationHash(n_bits=0, tag_bits=8)
    with pytest.raises(VerificationError):
        VerificationHash(n_bits=8, tag_bits=MAX_TAG_BITS + 1)
