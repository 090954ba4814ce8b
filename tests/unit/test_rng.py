"""Philox4x32-10 RNG kernels and derive_key: known answers, C == numpy bit for bit,
random access, uniform moments, argument checks.

The "c" parameter FAILS (does not skip) when emulator._cext is missing or stale.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from emulator.kernels import KernelError, derive_key
from emulator.kernels._c import load_cext
from emulator.kernels._numpy import philox4x32_10

KAT = json.loads((Path(__file__).parents[1] / "data" / "philox_kat.json").read_text())["vectors"]
U64 = 1 << 64
# derive_key(7, "link:alice-bob"): BLAKE2b-64, person b"qnetem-key-v1", over
# b"i" + le64(1) + b"7" + b"s" + le64(14) + b"link:alice-bob" (computed with hashlib directly).
PINNED_KEY = 0x8EA0533FCFC17739


def _words(hexes: list[str]) -> list[int]:
    return [int(h, 16) for h in hexes]


# --------------------------------------------------------------------- known answers


@pytest.mark.parametrize("vec", KAT, ids=lambda v: "-".join(v["counter"][:1] + v["key"][:1]))
def test_kat_numpy_block(vec):
    ctr, key, expected = _words(vec["counter"]), _words(vec["key"]), _words(vec["output"])
    out = philox4x32_10(tuple(np.array([c], dtype=np.uint64) for c in ctr), tuple(key))
    assert [int(w[0]) for w in out] == expected


@pytest.mark.parametrize("vec", KAT, ids=lambda v: "-".join(v["counter"][:1] + v["key"][:1]))
def test_kat_c_block(vec):
    ffi, lib = load_cext()
    ctr, key, expected = _words(vec["counter"]), _words(vec["key"]), _words(vec["output"])
    out = ffi.new("uint32_t[4]")
    lib.qnetem_philox4x32_10(ffi.new("uint32_t[4]", ctr), ffi.new("uint32_t[2]", key), out)
    assert list(out) == expected


@pytest.mark.parametrize("vec", KAT, ids=lambda v: "-".join(v["counter"][:1] + v["key"][:1]))
def test_kat_through_public_api(backend, vec):
    """qnetem's mapping: counter = (i lo, i hi, stream lo, stream hi), key = (lo, hi),
    u64 = x0 | x1 << 32 — so each KAT vector is one sample of rng_u64."""
    c, k, x = _words(vec["counter"]), _words(vec["key"]), _words(vec["output"])
    index, stream, key = c[0] | c[1] << 32, c[2] | c[3] << 32, k[0] | k[1] << 32
    u = backend.rng_u64(key, stream, index, 1)
    assert u.dtype == np.uint64 and u.shape == (1,)
    assert int(u[0]) == x[0] | x[1] << 32
    f = backend.rng_uniform(key, stream, index, 1)
    assert f[0] == float((x[0] | x[1] << 32) >> 11) * 2.0**-53


# ------------------------------------------------------------------ C == numpy, access


@pytest.mark.parametrize(
    ("key", "stream", "start", "count"),
    [
        (0, 0, 0, 1000),
        (derive_key(7, "link:alice-bob"), 3, 12345, 100_000),
        (U64 - 1, U64 - 1, 2**32 - 5, 10),  # the index crosses into the high counter word
        (0x0123456789ABCDEF, 2**32, U64 - 10, 10),  # the last indices before 2**64
    ],
)
def test_c_equals_numpy_bit_for_bit(both, key, stream, start, count):
    npy, c = both
    a, b = npy.rng_u64(key, stream, start, count), c.rng_u64(key, stream, start, count)
    assert a.dtype == b.dtype == np.uint64
    assert np.array_equal(a, b)
    fa, fb = npy.rng_uniform(key, stream, start, count), c.rng_uniform(key, stream, start, count)
    assert fa.dtype == fb.dtype == np.float64
    assert np.array_equal(fa.view(np.uint64), fb.view(np.uint64))


def test_random_access(backend):
    key = derive_key(1, "node:alice")
    full = backend.rng_u64(key, 5, 0, 3000)
    assert np.array_equal(backend.rng_u64(key, 5, 1000, 2000), full[1000:])
    assert np.array_equal(backend.rng_uniform(key, 5, 1000, 7), backend.rng_uniform(key, 5, 0, 3000)[1000:1007])


def test_uniform_is_top_53_bits_of_u64(backend):
    u = backend.rng_u64(11, 22, 33, 1000)
    f = backend.rng_uniform(11, 22, 33, 1000)
    assert np.array_equal(f, (u >> np.uint64(11)).astype(np.float64) * 2.0**-53)


def test_keys_and_streams_give_different_sequences(backend):
    base = backend.rng_u64(1, 1, 0, 64)
    assert not np.array_equal(base, backend.rng_u64(2, 1, 0, 64))
    assert not np.array_equal(base, backend.rng_u64(1, 2, 0, 64))
    # a collision of a 64-bit word between two distinct sequences has probability ~64^2/2^64
    assert len(set(base.tolist()) & set(backend.rng_u64(1, 2, 0, 64).tolist())) == 0


def test_uniform_moments(backend):
    n = 1_000_000
    x = backend.rng_uniform(derive_key(2024, "moments"), 0, 0, n)
    assert x.min() >= 0.0 and x.max() < 1.0
    # U(0,1): mean 1/2, variance 1/12. Tolerances are 4 standard errors at n = 1e6:
    # sd(mean) = sqrt(1/12/n) = 2.89e-4; sd(sample variance) = sqrt((mu4 - sigma^4)/n)
    # with mu4 = 1/80, sigma^4 = 1/144, i.e. sqrt(1/180/n) = 7.45e-5.
    assert abs(x.mean() - 0.5) < 4 * np.sqrt(1 / 12 / n)
    assert abs(x.var() - 1 / 12) < 4 * np.sqrt(1 / 180 / n)
    # Each of 16 equal bins: binomial(n, 1/16), 5 sd = 5*sqrt(n/16*15/16) = 1210.
    counts = np.bincount((x * 16).astype(np.int64), minlength=16)
    assert np.all(np.abs(counts - n / 16) < 5 * np.sqrt(n / 16 * 15 / 16))


def test_zero_count(backend):
    assert backend.rng_u64(1, 2, 3, 0).dtype == np.uint64 and backend.rng_u64(1, 2, 3, 0).size == 0
    assert backend.rng_uniform(1, 2, U64 - 1, 0).size == 0


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((-1, 0, 0, 1), "key"),
        ((U64, 0, 0, 1), "key"),
        ((0, -1, 0, 1), "stream"),
        ((0, U64, 0, 1), "stream"),
        ((0, 0, -1, 1), "start"),
        ((0, 0, 0, -1), "count"),
        ((0, 0, U64 - 1, 2), "2\\*\\*64"),
        ((0.5, 0, 0, 1), "key"),
        ((0, 0, 0, "3"), "count"),
        ((True, 0, 0, 1), "key"),
    ],
)
def test_bad_rng_arguments(backend, args, match):
    with pytest.raises(KernelError, match=match):
        backend.rng_u64(*args)
    with pytest.raises(KernelError, match=match):
        backend.rng_uniform(*args)


def test_c_rng_rejects_wrapping_range_itself():
    """Defence in depth: the C function checks the range without the typed layer."""
    ffi, lib = load_cext()
    out = ffi.new("uint64_t[2]")
    assert lib.qnetem_rng_u64(0, 0, U64 - 1, 2, out) == lib.QNETEM_ERR_ARG
    assert lib.qnetem_rng_u64(0, 0, U64 - 2, 2, out) == lib.QNETEM_OK


# --------------------------------------------------------------------------- derive_key


def test_derive_key_is_stable_and_64_bit():
    k = derive_key(7, "link:alice-bob")
    assert k == derive_key(7, "link:alice-bob")
    assert 0 <= k < U64
    # Pinned value: keys must not change across versions, or old runs stop reproducing.
    assert k == PINNED_KEY


def test_derive_key_separates_labels():
    keys = {
        derive_key(7, "link:alice-bob"),
        derive_key(7, "link:bob-alice"),
        derive_key(8, "link:alice-bob"),
        derive_key(7, "node:alice"),
        derive_key("ab", "c"),
        derive_key("a", "bc"),
        derive_key(1),
        derive_key("1"),
        derive_key(7),
    }
    assert len(keys) == 9


@pytest.mark.parametrize("bad", [(), (1.5,), (True,), (None,), (b"x",)])
def test_derive_key_rejects_bad_labels(bad):
    with pytest.raises(KernelError):
        derive_key(*bad)
