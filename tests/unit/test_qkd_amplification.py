"""Privacy amplification (nodes/qkd/amplification.py): Toeplitz hashing by FFT and NTT.

- the fast paths equal the direct matrix product on many small random inputs (hypothesis);
- linearity over GF(2); the matrix convention on a hand-worked example;
- exactness at n = 10^6 against independent per-row dot products, at the largest
  possible convolution values (all-ones inputs), and FFT == exact NTT on the whole output;
- the FFT -> NTT fallback; the packed uint64 format; typed errors for bad lengths/bits;
- the universal2 property that the security argument rests on (chi-square, fixed seed).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from nodes.qkd import amplification as amp
from nodes.qkd.amplification import (
    AmplificationError,
    BitFormatError,
    ConvolutionMethod,
    OutputLengthError,
    SeedLengthError,
    draw_seed,
    pack_bits,
    seed_length,
    toeplitz_hash,
    toeplitz_hash_packed,
    toeplitz_hash_reference,
    toeplitz_matrix,
    unpack_bits,
)


@st.composite
def hash_inputs(draw, max_n: int = 160):
    n = draw(st.integers(1, max_n))
    m = draw(st.integers(0, n))
    key = np.array(draw(st.lists(st.integers(0, 1), min_size=n, max_size=n)), dtype=np.uint8)
    seed = np.array(draw(st.lists(st.integers(0, 1), min_size=n + m - 1, max_size=n + m - 1)), dtype=np.uint8)
    return key, seed, m


# --------------------------------------------------------------------- against the direct product


@given(hash_inputs())
def test_fft_equals_direct_product(args) -> None:
    key, seed, m = args
    assert np.array_equal(toeplitz_hash(key, seed, m), toeplitz_hash_reference(key, seed, m))


@given(hash_inputs())
def test_ntt_equals_direct_product(args) -> None:
    key, seed, m = args
    got = toeplitz_hash(key, seed, m, method=ConvolutionMethod.NTT)
    assert np.array_equal(got, toeplitz_hash_reference(key, seed, m))


def test_many_seeded_random_sizes_match_the_direct_product() -> None:
    rng = np.random.default_rng(20240501)
    for _ in range(200):
        n = int(rng.integers(1, 700))
        m = int(rng.integers(0, n + 1))
        key = rng.integers(0, 2, n, dtype=np.uint8)
        seed = draw_seed(rng, n, m)
        want = toeplitz_hash_reference(key, seed, m)
        assert np.array_equal(toeplitz_hash(key, seed, m), want), (n, m)
        assert np.array_equal(toeplitz_hash(key, seed, m, method=ConvolutionMethod.NTT), want), (n, m)


def test_matrix_convention_by_hand() -> None:
    # n = 3, m = 2, seed s0..s3: T = [[s2, s1, s0], [s3, s2, s1]] (module docstring).
    seed = np.array([1, 0, 1, 1], dtype=np.uint8)  # s0=1 s1=0 s2=1 s3=1
    assert toeplitz_matrix(seed, 3, 2).tolist() == [[1, 0, 1], [1, 1, 0]]
    key = np.array([1, 1, 0], dtype=np.uint8)
    # row 0: 1+0 = 1; row 1: 1+1 = 0 (mod 2)
    assert toeplitz_hash(key, seed, 2).tolist() == [1, 0]
    assert toeplitz_hash_reference(key, seed, 2).tolist() == [1, 0]


def test_reference_matrix_is_toeplitz() -> None:
    rng = np.random.default_rng(5)
    n, m = 37, 19
    t = toeplitz_matrix(draw_seed(rng, n, m), n, m)
    assert t.shape == (m, n)
    assert np.array_equal(t[1:, 1:], t[:-1, :-1])  # constant diagonals


@given(hash_inputs(), st.data())
def test_linear_over_gf2(args, data) -> None:
    x, seed, m = args
    y = np.array(data.draw(st.lists(st.integers(0, 1), min_size=x.size, max_size=x.size)), dtype=np.uint8)
    lhs = toeplitz_hash(x ^ y, seed, m)
    rhs = toeplitz_hash(x, seed, m) ^ toeplitz_hash(y, seed, m)
    assert np.array_equal(lhs, rhs)


def test_zero_output_length_gives_empty_key() -> None:
    key = np.ones(10, dtype=np.uint8)
    out = toeplitz_hash(key, np.ones(9, dtype=np.uint8), 0)
    assert out.dtype == np.uint8 and out.size == 0


# --------------------------------------------------------------------- exactness at scale

N_BIG = 10**6


@pytest.fixture(scope="module")
def big_case():
    rng = np.random.default_rng(1_000_003)
    n, m = N_BIG, N_BIG // 2
    key = rng.integers(0, 2, n, dtype=np.uint8)
    seed = draw_seed(rng, n, m)
    return key, seed, m, toeplitz_hash(key, seed, m)


def test_exact_at_one_million_bits_on_sampled_rows(big_case) -> None:
    """Independent method: y_i = sum_j s[i + n - 1 - j] x_j, an exact int64 dot product per row."""
    key, seed, m, out = big_case
    n = key.size
    rng = np.random.default_rng(77)
    rows = np.concatenate([[0, 1, m - 2, m - 1], rng.integers(0, m, 300)])
    k64 = key.astype(np.int64)
    for i in rows:
        window = seed[i : i + n][::-1].astype(np.int64)  # s[i+n-1], ..., s[i]
        assert out[i] == int(window @ k64) & 1, i


def test_fft_equals_exact_ntt_on_every_bit_at_one_million(big_case) -> None:
    key, seed, m, out = big_case
    assert np.array_equal(out, toeplitz_hash(key, seed, m, method=ConvolutionMethod.NTT))


@pytest.mark.parametrize("n", [N_BIG, N_BIG + 1])
def test_exact_at_the_largest_convolution_values(n: int) -> None:
    """All-ones key and seed: every output sums n ones, the largest value the FFT must round."""
    m = n // 2
    out = toeplitz_hash(np.ones(n, dtype=np.uint8), np.ones(n + m - 1, dtype=np.uint8), m)
    assert np.all(out == n % 2)


def test_fft_rounding_error_bound_arithmetic() -> None:
    """The numbers quoted in the module docstring (Percival 2003, Thm 5.1) at the largest size."""
    u = 2.0**-53
    k = 28
    beta = 8 * u
    bracket = (1 + u) ** (3 * k) * (1 + u * math.sqrt(5)) ** (3 * k + 1) * (1 + beta) ** (3 * k) - 1
    assert bracket < 1.1e-13
    n_max = amp.MAX_SEED_BITS
    assert 2 * n_max * bracket < 3e-5 < amp._ROUNDING_GUARD


def test_guard_falls_back_to_exact_ntt(monkeypatch) -> None:
    calls = []
    real = amp._window_ntt

    def spy(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(amp, "_ROUNDING_GUARD", -1.0)  # every FFT result "fails" the guard
    monkeypatch.setattr(amp, "_window_ntt", spy)
    rng = np.random.default_rng(3)
    key = rng.integers(0, 2, 500, dtype=np.uint8)
    seed = draw_seed(rng, 500, 200)
    assert np.array_equal(toeplitz_hash(key, seed, 200), toeplitz_hash_reference(key, seed, 200))
    assert calls == [1]


def test_fast_length_is_the_smallest_5_smooth_length() -> None:
    def smooth(k: int) -> bool:
        for p in (2, 3, 5):
            while k % p == 0:
                k //= p
        return k == 1

    for n in range(1, 3000):
        got = amp._fast_length(n)
        assert got >= n and smooth(got)
        assert not any(smooth(k) for k in range(n, got)), n


# --------------------------------------------------------------------- packed format


@given(st.lists(st.integers(0, 1), min_size=0, max_size=300))
def test_pack_unpack_round_trip(bits) -> None:
    b = np.array(bits, dtype=np.uint8)
    words = pack_bits(b)
    assert words.dtype == np.uint64 and words.size == -(-b.size // 64)
    assert np.array_equal(unpack_bits(words, b.size), b)


def test_packed_layout_is_little_endian_within_words() -> None:
    bits = np.zeros(130, dtype=np.uint8)
    bits[[0, 63, 64, 129]] = 1
    words = pack_bits(bits)
    assert words.tolist() == [1 | (1 << 63), 1, 1 << 1]


def test_packed_hash_equals_unpacked() -> None:
    rng = np.random.default_rng(11)
    n, m = 1000, 300
    key = rng.integers(0, 2, n, dtype=np.uint8)
    seed = draw_seed(rng, n, m)
    got = toeplitz_hash_packed(pack_bits(key), n, pack_bits(seed), m)
    assert np.array_equal(unpack_bits(got, m), toeplitz_hash(key, seed, m))


def test_bool_arrays_are_accepted() -> None:
    rng = np.random.default_rng(12)
    key = rng.integers(0, 2, 50, dtype=np.uint8)
    seed = draw_seed(rng, 50, 20)
    assert np.array_equal(toeplitz_hash(key.astype(bool), seed.astype(bool), 20), toeplitz_hash(key, seed, 20))


# --------------------------------------------------------------------- errors


def test_seed_length_is_checked() -> None:
    key = np.zeros(100, dtype=np.uint8)
    assert seed_length(100, 40) == 139
    for bad in (138, 140, 0):
        with pytest.raises(SeedLengthError, match=f"has {bad} bits; a 40x100 Toeplitz matrix needs 139"):
            toeplitz_hash(key, np.zeros(bad, dtype=np.uint8), 40)


def test_output_length_is_checked() -> None:
    key = np.zeros(10, dtype=np.uint8)
    with pytest.raises(OutputLengthError, match=r"\[0, 10\]"):
        toeplitz_hash(key, np.zeros(20, dtype=np.uint8), 11)
    with pytest.raises(OutputLengthError):
        toeplitz_hash(key, np.zeros(8, dtype=np.uint8), -1)
    with pytest.raises(AmplificationError, match="at least 1 bit"):
        toeplitz_hash(np.zeros(0, dtype=np.uint8), np.zeros(0, dtype=np.uint8), 0)


@pytest.mark.parametrize(
    "key",
    [
        np.array([0, 1, 2], dtype=np.uint8),  # not a bit
        np.array([0, 1, 1], dtype=np.int32),  # wrong dtype
        np.zeros((2, 2), dtype=np.uint8),  # not 1-D
    ],
)
def test_bad_bit_arrays_are_rejected(key) -> None:
    with pytest.raises(BitFormatError):
        toeplitz_hash(key, np.zeros(key.size + 1, dtype=np.uint8), 2)


def test_packed_word_count_is_checked() -> None:
    with pytest.raises(BitFormatError, match="need 2 uint64 words"):
        unpack_bits(np.zeros(3, dtype=np.uint64), 100)
    with pytest.raises(BitFormatError):
        unpack_bits(np.zeros(2, dtype=np.uint32), 64)


def test_errors_are_value_errors_and_the_reference_refuses_huge_matrices() -> None:
    assert issubclass(AmplificationError, ValueError)
    n = 1 << 14
    with pytest.raises(AmplificationError, match="O\\(n\\*m\\)"):
        toeplitz_matrix(np.zeros(2 * n - 1, dtype=np.uint8), n, n)


def test_oversized_blocks_are_refused_before_any_work() -> None:
    with pytest.raises(AmplificationError, match="supported size"):
        seed_length(amp.MAX_SEED_BITS, 2)


# --------------------------------------------------------------------- the universal2 property


def test_random_toeplitz_maps_a_fixed_key_uniformly() -> None:
    """For a fixed non-zero x, T x is uniform over {0,1}^m when the seed is uniform.

    m = 4, 8000 seeds: Pearson chi-square over the 16 outcomes with 15 degrees of freedom;
    37.70 is its 0.999 quantile, so a correct implementation fails 1 run in 1000 (the
    fixed rng seed makes the run deterministic). A hash that ignored seed bits or leaked
    structure (e.g. a broken convolution window) piles mass on few outcomes.
    """
    rng = np.random.default_rng(99)
    n, m, trials = 64, 4, 8000
    x = np.zeros(n, dtype=np.uint8)
    x[[3, 17, 40]] = 1
    counts = np.zeros(16, dtype=np.int64)
    weights = 1 << np.arange(m)
    for _ in range(trials):
        counts[int(toeplitz_hash(x, draw_seed(rng, n, m), m) @ weights)] += 1
    expected = trials / 16
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 37.70, counts


def test_ntt_modulus_and_generator() -> None:
    """p = 15·2^27 + 1 is prime and 31 generates (Z/pZ)^*, so 2^k-th roots of unity exist for k <= 27."""
    p = amp._P
    assert p == 15 * 2**27 + 1
    assert p % 2 and all(p % d for d in range(3, math.isqrt(p) + 1, 2))  # trial division
    assert all(pow(amp._G, (p - 1) // q, p) != 1 for q in (2, 3, 5))
