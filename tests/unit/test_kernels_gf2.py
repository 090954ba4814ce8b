"""One test battery for the GF(2) kernels of both backends ("numpy" and "c").

- Layout known answers: key bit i is bit (i % 64) of uint64 word i // 64, LSB first;
  padding bits are written as zero and ignored on input.
- Every kernel against a plain-Python reference (parity = sum % 2 of a slice).
- Properties (hypothesis, derandomised): C, numpy and the reference agree on random keys,
  ranges, shuffles and flip lists, including empty ranges and non-multiple-of-64 sizes.
- Bad input raises KernelError from both backends.

The "c" parameter FAILS (does not skip) when emulator._cext is missing or stale.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from emulator.kernels import GF2_MAX_BITS, KernelError, get_backend, gf2_words_for_bits
from emulator.kernels import _c as c_layer

HYP = settings(
    max_examples=60,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def ref_parity(bits: np.ndarray, start: int, stop: int) -> int:
    return int(bits[start:stop].sum()) % 2


def random_bits(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, 2, n, dtype=np.uint8)


# ------------------------------------------------------------------------- layout


def test_words_for_bits():
    assert [gf2_words_for_bits(n) for n in (0, 1, 63, 64, 65, 128, 129)] == [0, 1, 1, 1, 2, 2, 3]


def test_pack_layout_lsb_first(backend):
    words = backend.gf2_pack(np.array([1, 0, 1, 1], dtype=np.uint8))
    assert words.dtype == np.uint64 and words.tolist() == [0b1101]


def test_pack_layout_second_word(backend):
    bits = np.zeros(130, dtype=np.uint8)
    bits[[0, 63, 64, 129]] = 1
    words = backend.gf2_pack(bits)
    assert words.tolist() == [1 | (1 << 63), 1, 1 << 1]


def test_pack_accepts_bool(backend):
    words = backend.gf2_pack(np.array([True, False, True]))
    assert words.tolist() == [0b101]


def test_pack_matches_numpy_packbits_little(backend):
    rng = np.random.default_rng(7)
    bits = random_bits(rng, 1000)
    words = backend.gf2_pack(bits)
    expected = np.packbits(np.concatenate([bits, np.zeros(24, np.uint8)]), bitorder="little")
    assert words.astype("<u8").tobytes() == expected.tobytes()


def test_unpack_round_trip(backend):
    rng = np.random.default_rng(8)
    for n in (0, 1, 63, 64, 65, 1000):
        bits = random_bits(rng, n)
        out = backend.gf2_unpack(backend.gf2_pack(bits), n)
        assert out.dtype == np.uint8 and out.tolist() == bits.tolist()


def test_padding_bits_are_ignored(backend):
    bits = np.array([1, 1, 0], dtype=np.uint8)
    words = backend.gf2_pack(bits)
    dirty = words | np.uint64(0xFFFF_FFFF_FFFF_FFF8)  # set every padding bit
    assert backend.gf2_unpack(dirty, 3).tolist() == [1, 1, 0]
    assert backend.gf2_parity_range(dirty, 3, 0, 3) == 0
    assert backend.gf2_parities_ranges(dirty, 3, [0, 1], [3, 3]).tolist() == [0, 1]
    assert backend.gf2_hamming(dirty, words, 3) == 0
    assert backend.gf2_gather(dirty, 3, [2, 1, 0]).tolist() == [0b110]  # bits 0, 1, 1


# ------------------------------------------------------------------ known answers


def test_parity_range_known(backend):
    bits = np.zeros(200, dtype=np.uint8)
    bits[[3, 64, 65, 130, 199]] = 1
    w = backend.gf2_pack(bits)
    assert backend.gf2_parity_range(w, 200, 0, 200) == 1  # five ones
    assert backend.gf2_parity_range(w, 200, 3, 4) == 1
    assert backend.gf2_parity_range(w, 200, 4, 64) == 0
    assert backend.gf2_parity_range(w, 200, 60, 66) == 0  # 64 and 65
    assert backend.gf2_parity_range(w, 200, 0, 131) == 0  # 3, 64, 65, 130
    assert backend.gf2_parity_range(w, 200, 17, 17) == 0  # empty


def test_parities_ranges_against_reference(backend):
    rng = np.random.default_rng(1)
    n = 777
    bits = random_bits(rng, n)
    w = backend.gf2_pack(bits)
    a, b = rng.integers(0, n + 1, 500), rng.integers(0, n + 1, 500)
    starts, stops = np.minimum(a, b), np.maximum(a, b)
    got = backend.gf2_parities_ranges(w, n, starts, stops)
    assert got.dtype == np.uint8
    assert got.tolist() == [ref_parity(bits, s, e) for s, e in zip(starts, stops)]


def test_parities_of_all_blocks_of_a_pass(backend):
    """The Cascade pass shape: consecutive blocks of size k, a shorter last block."""
    rng = np.random.default_rng(2)
    n, k = 10_000, 73
    bits = random_bits(rng, n)
    starts = np.arange(0, n, k)
    stops = np.minimum(starts + k, n)
    got = backend.gf2_parities_ranges(backend.gf2_pack(bits), n, starts, stops)
    assert got.tolist() == [ref_parity(bits, s, e) for s, e in zip(starts, stops)]
    assert int(np.bitwise_xor.reduce(got)) == int(bits.sum()) % 2


def test_parities_indexed_against_reference(backend):
    rng = np.random.default_rng(3)
    n = 500
    bits = random_bits(rng, n)
    perm = rng.permutation(n)
    starts = np.array([0, 10, 10, 499, 0])
    stops = np.array([10, 10, 300, 500, 500])
    got = backend.gf2_parities_indexed(backend.gf2_pack(bits), n, perm, starts, stops)
    assert got.tolist() == [int(bits[perm[s:e]].sum()) % 2 for s, e in zip(starts, stops)]


def test_parities_indexed_index_may_repeat_and_be_short(backend):
    bits = np.array([1, 0, 1, 1, 0], dtype=np.uint8)
    w = backend.gf2_pack(bits)
    index = [0, 0, 2, 3, 1]  # gathers 1, 1, 1, 1, 0; bit 4 is never read
    assert backend.gf2_parities_indexed(w, 5, index, [0, 0, 3, 4], [1, 2, 5, 4]).tolist() == [1, 0, 1, 0]


def test_gather_is_a_shuffle(backend):
    rng = np.random.default_rng(4)
    n = 1_001
    bits = random_bits(rng, n)
    perm = rng.permutation(n)
    shuffled = backend.gf2_gather(backend.gf2_pack(bits), n, perm)
    assert shuffled.shape == (gf2_words_for_bits(n),)
    assert backend.gf2_unpack(shuffled, n).tolist() == bits[perm].tolist()


def test_gather_subset_and_repeats(backend):
    bits = np.array([1, 0, 0, 1], dtype=np.uint8)
    out = backend.gf2_gather(backend.gf2_pack(bits), 4, [3, 3, 1, 0, 0])
    assert backend.gf2_unpack(out, 5).tolist() == [1, 1, 0, 1, 1]
    assert backend.gf2_gather(backend.gf2_pack(bits), 4, []).shape == (0,)


def test_flip_bits(backend):
    bits = np.zeros(130, dtype=np.uint8)
    w = backend.gf2_pack(bits)
    backend.gf2_flip_bits(w, 130, [0, 64, 129, 5, 5])  # 5 twice: flips back
    expected = np.zeros(130, dtype=np.uint8)
    expected[[0, 64, 129]] = 1
    assert backend.gf2_unpack(w, 130).tolist() == expected.tolist()
    backend.gf2_flip_bits(w, 130, np.array([0, 64, 129], dtype=np.int32))
    assert not backend.gf2_unpack(w, 130).any()
    backend.gf2_flip_bits(w, 130, [])


def test_hamming(backend):
    rng = np.random.default_rng(5)
    for n in (1, 64, 65, 4097):
        a, b = random_bits(rng, n), random_bits(rng, n)
        assert backend.gf2_hamming(backend.gf2_pack(a), backend.gf2_pack(b), n) == int((a != b).sum())
    empty = np.empty(0, dtype=np.uint64)
    assert backend.gf2_hamming(empty, empty, 0) == 0


def test_parity_of_key_equals_xor_of_block_parities_after_shuffle(backend):
    """A shuffle keeps the parity of the whole key (Cascade's parity inference relies on it)."""
    rng = np.random.default_rng(6)
    n = 3000
    bits = random_bits(rng, n)
    w = backend.gf2_pack(bits)
    shuffled = backend.gf2_gather(w, n, rng.permutation(n))
    starts = np.arange(0, n, 128)
    blocks = backend.gf2_parities_ranges(shuffled, n, starts, np.minimum(starts + 128, n))
    assert int(np.bitwise_xor.reduce(blocks)) == backend.gf2_parity_range(w, n, 0, n)


# --------------------------------------------------------------------- properties


@st.composite
def key_and_ranges(draw):
    n = draw(st.integers(0, 300))
    seed = draw(st.integers(0, 2**32 - 1))
    count = draw(st.integers(0, 40))
    return n, seed, count


@HYP
@given(key_and_ranges())
def test_backends_agree_on_random_input(both, case):
    n, seed, count = case
    rng = np.random.default_rng(seed)
    bits = random_bits(rng, n)
    a, b = rng.integers(0, n + 1, count), rng.integers(0, n + 1, count)
    starts, stops = np.minimum(a, b), np.maximum(a, b)
    perm = rng.permutation(n)
    flips = rng.integers(0, max(n, 1), rng.integers(0, 10)) if n else np.empty(0, np.int64)
    results = []
    for backend in both:
        w = backend.gf2_pack(bits)
        ranges = backend.gf2_parities_ranges(w, n, starts, stops)
        indexed = backend.gf2_parities_indexed(w, n, perm, starts, stops)
        shuffled = backend.gf2_gather(w, n, perm)
        flipped = w.copy()
        backend.gf2_flip_bits(flipped, n, flips)
        whole = backend.gf2_parity_range(w, n, 0, n)
        results.append(
            (w.tolist(), ranges.tolist(), indexed.tolist(), shuffled.tolist(), flipped.tolist(),
             backend.gf2_hamming(w, flipped, n), whole)
        )  # fmt: skip
    assert results[0] == results[1]
    # ... and both agree with the plain-Python reference.
    _, ranges, indexed, shuffled, flipped, distance, whole = results[0]
    assert ranges == [ref_parity(bits, s, e) for s, e in zip(starts, stops)]
    assert indexed == [int(bits[perm[s:e]].sum()) % 2 for s, e in zip(starts, stops)]
    assert get_backend("numpy").gf2_unpack(np.array(shuffled, dtype=np.uint64), n).tolist() == bits[perm].tolist()
    odd_flips = np.zeros(n, dtype=np.uint8)
    np.add.at(odd_flips, flips, 1)
    assert distance == int((odd_flips % 2).sum())
    assert whole == int(bits.sum()) % 2


# ----------------------------------------------------------------------- bad input


def packed(n: int) -> np.ndarray:
    return np.zeros(gf2_words_for_bits(n), dtype=np.uint64)


@pytest.mark.parametrize(
    ("call", "fragment"),
    [
        (lambda k: k.gf2_pack(np.array([0, 2, 1], dtype=np.uint8)), "only 0 and 1"),
        (lambda k: k.gf2_pack(np.array([0, 1], dtype=np.int64)), "dtype"),
        (lambda k: k.gf2_pack(np.zeros((2, 2), dtype=np.uint8)), "1-D"),
        (lambda k: k.gf2_pack(np.zeros(10, dtype=np.uint8)[::2]), "contiguous"),
        (lambda k: k.gf2_pack([0, 1]), "numpy.ndarray"),
        (lambda k: k.gf2_unpack(np.zeros(2, dtype=np.int64), 65), "uint64"),
        (lambda k: k.gf2_unpack(packed(64), 65), "shape"),
        (lambda k: k.gf2_unpack(packed(10), -1), "n_bits"),
        (lambda k: k.gf2_unpack(packed(10), GF2_MAX_BITS + 1), "n_bits"),
        (lambda k: k.gf2_unpack(packed(10), 10.0), "integer"),
        (lambda k: k.gf2_parity_range(packed(10), 10, 5, 4), "start"),
        (lambda k: k.gf2_parity_range(packed(10), 10, 0, 11), "stop"),
        (lambda k: k.gf2_parities_ranges(packed(10), 10, [0, 1], [5]), "same length"),
        (lambda k: k.gf2_parities_ranges(packed(10), 10, [-1], [5]), "range"),
        (lambda k: k.gf2_parities_ranges(packed(10), 10, [0], [11]), "range"),
        (lambda k: k.gf2_parities_ranges(packed(10), 10, [0.5], [1]), "integers"),
        (lambda k: k.gf2_parities_indexed(packed(10), 10, [0, 1, 2], [0], [4]), "range"),
        (lambda k: k.gf2_parities_indexed(packed(10), 10, [0, 10, 2], [0], [3]), "[0, 10)"),
        (lambda k: k.gf2_parities_indexed(packed(10), 10, [0, -3, 2], [1], [2]), "[0, 10)"),
        (lambda k: k.gf2_gather(packed(10), 10, [0, 10]), "index"),
        (lambda k: k.gf2_flip_bits(packed(10), 10, [10]), "positions"),
        (lambda k: k.gf2_flip_bits(packed(10), 10, [-1]), "positions"),
        (lambda k: k.gf2_hamming(packed(10), packed(70), 10), "shape"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_bad_input_raises_kernel_error(backend, call, fragment):
    with pytest.raises(KernelError, match=fragment.replace("[", r"\[").replace(")", r"\)")):
        call(backend)


def test_flip_on_read_only_words_refused(backend):
    w = packed(10)
    w.setflags(write=False)
    with pytest.raises(KernelError, match="writeable"):
        backend.gf2_flip_bits(w, 10, [1])


def test_flip_refused_before_any_write(backend):
    """A bad position anywhere in the list leaves the key untouched."""
    w = packed(10)
    with pytest.raises(KernelError):
        backend.gf2_flip_bits(w, 10, [1, 2, 99])
    assert not w.any()


def test_unread_index_entries_are_not_checked(backend):
    """Only the index entries covered by the ranges are read (documented contract)."""
    w = backend.gf2_pack(np.array([1, 1, 0], dtype=np.uint8))
    assert backend.gf2_parities_indexed(w, 3, [0, 1, 99], [0], [2]).tolist() == [0]


def test_c_functions_check_their_arguments():
    """Defence in depth: the C kernels reject bad arguments even without the typed layer,
    and a kernel that writes refuses before writing anything."""
    ffi, lib = c_layer.load_cext()
    words = np.array([0b1011], dtype=np.uint64)
    w = ffi.from_buffer("uint64_t[]", words, require_writable=True)
    i64 = lambda *v: ffi.new("int64_t[]", list(v))  # noqa: E731
    u8 = ffi.new("uint8_t[4]")
    parity, dist = ffi.new("int *"), ffi.new("uint64_t *")
    assert lib.qnetem_gf2_pack(ffi.new("uint8_t[]", [0, 2]), 2, w) == lib.QNETEM_ERR_ARG
    assert lib.qnetem_gf2_pack(ffi.NULL, 2, w) == lib.QNETEM_ERR_NULL
    assert lib.qnetem_gf2_unpack(w, 4, ffi.NULL) == lib.QNETEM_ERR_NULL
    assert lib.qnetem_gf2_parity_range(w, 4, 3, 2, parity) == lib.QNETEM_ERR_ARG
    assert lib.qnetem_gf2_parity_range(w, 4, 0, 5, parity) == lib.QNETEM_ERR_ARG
    assert lib.qnetem_gf2_parity_range(w, 4, 0, 4, ffi.NULL) == lib.QNETEM_ERR_NULL
    assert lib.qnetem_gf2_parities_ranges(w, 4, i64(0), i64(5), 1, u8) == lib.QNETEM_ERR_ARG
    assert lib.qnetem_gf2_parities_ranges(w, 4, i64(-1), i64(2), 1, u8) == lib.QNETEM_ERR_ARG
    assert lib.qnetem_gf2_parities_indexed(w, 4, i64(0, 4), 2, i64(0), i64(2), 1, u8) == lib.QNETEM_ERR_ARG
    assert lib.qnetem_gf2_parities_indexed(w, 4, i64(0, 1), 2, i64(0), i64(3), 1, u8) == lib.QNETEM_ERR_ARG
    out = np.zeros(1, dtype=np.uint64)
    o = ffi.from_buffer("uint64_t[]", out, require_writable=True)
    assert lib.qnetem_gf2_gather(w, 4, i64(0, -1), 2, o) == lib.QNETEM_ERR_ARG
    assert lib.qnetem_gf2_flip_bits(w, 4, i64(0, 4), 2) == lib.QNETEM_ERR_ARG
    assert lib.qnetem_gf2_hamming(w, ffi.NULL, 4, dist) == lib.QNETEM_ERR_NULL
    assert words.tolist() == [0b1011] and out.tolist() == [0]
    assert lib.qnetem_gf2_parity_range(w, 4, 0, 4, parity) == lib.QNETEM_OK and parity[0] == 1
