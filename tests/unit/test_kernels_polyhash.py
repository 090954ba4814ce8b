"""One test battery for the polynomial hash over GF(2^127 - 1) of both backends ("numpy", "c").

- Known answers from a reference written here: the hash as the sum
  sum_i m_i r^(L+2-i) mod p, accumulated from the LAST block backwards (not Horner's
  rule, which both backends use), for lengths around the 15-byte block and the C lanes'
  group size (4 blocks, 60 bytes; lanes start at 2 groups), up to a random 1 MiB input,
  and r = 0, 1, p - 1, random.
- Hand-made answers: r = 2 on tiny inputs; sums landing exactly on p, p - 1, p + 1
  (the final reduction's edge cases); all-ones blocks with r = p - 1 (carry chains).
- Properties (hypothesis, derandomised): C == numpy on random inputs, keys and lengths.
- Buffers: bytes, bytearray, memoryview, uint8/int8 arrays hash alike; bytes after the
  end of a slice are never read into the last (zero-padded) block.
- Bad arguments raise KernelError from both backends, without the key in the message.

The "c" parameter FAILS (does not skip) when emulator._cext is missing or stale.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from emulator.kernels import POLY127_PRIME, KernelError
from nodes.qkd import _polyhash
from nodes.qkd.authentication import Authenticator, DirectionalKeys
from nodes.qkd.verification import VerificationHash

P = (1 << 127) - 1
HYP = settings(
    max_examples=80,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
R_RANDOM = 0x2B7E151628AED2A6ABF7158809CF4F3C % P  # any fixed value in [0, p)
KEYS = (0, 1, P - 1, R_RANDOM)


def reference(data: bytes, r: int, length: int) -> int:
    """sum_{i=1}^{L} m_i r^(L+2-i) + length * r (mod p), from the last block backwards."""
    blocks = [int.from_bytes(data[off : off + 15], "little") for off in range(0, len(data), 15)]
    power = r % P  # r^1, the weight of the length block
    total = length * power
    for m in reversed(blocks):
        power = power * r % P
        total += m * power
    return total % P


@functools.cache
def random_bytes(n: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).bytes(n)


@functools.cache
def reference_cached(n: int, r: int) -> int:
    return reference(random_bytes(n), r, n)


# ------------------------------------------------------------------------ known answers


def test_prime_constant():
    assert POLY127_PRIME == P == _polyhash.P127


@pytest.mark.parametrize(
    ("data", "r", "length", "expected"),
    [
        (b"", 2, 0, 0),
        (b"", 2, 5, 10),  # only the length block: 5 r
        (b"\x01", 2, 1, 6),  # 1 r^2 + 1 r
        (b"\x03\x01", 2, 0, 259 * 4),  # one block 0x0103 (little-endian)
        (bytes(range(1, 17)), 2, 0, int.from_bytes(bytes(range(1, 16)), "little") * 8 + 16 * 4),
        (b"\x00" * 15 + b"\x01", 3, 7, 1 * 9 + 7 * 3),  # a zero block still counts as a block
        (b"\x01", 0, 123, 0),
        (b"\x05" * 15, 1, 9, int.from_bytes(b"\x05" * 15, "little") + 9),
    ],
)
def test_hand_made_answers(backend, data, r, length, expected):
    assert backend.poly127_hash(data, r, length) == expected % P


@pytest.mark.parametrize("n", [0, 1, 14, 15, 16, 29, 30, 31, 59, 60, 61, 119, 120, 121, 134, 135, 136, 1000])
@pytest.mark.parametrize("r", KEYS)
def test_reference_lengths(backend, n, r):
    data = random_bytes(n, seed=n)
    for length in (0, n, 8 * n, (1 << 64) - 1):
        assert backend.poly127_hash(data, r, length) == reference(data, r, length), (n, length)


def test_reference_every_length_below_400_c_and_numpy(both):
    numpy_be, c_be = both
    for n in range(400):
        data = random_bytes(n, seed=1000 + n)
        want = reference(data, R_RANDOM, n)
        assert c_be.poly127_hash(data, R_RANDOM, n) == want, n
        assert numpy_be.poly127_hash(data, R_RANDOM, n) == want, n


@pytest.mark.parametrize("r", KEYS)
def test_reference_one_mebibyte(backend, r):
    n = 1 << 20
    assert backend.poly127_hash(random_bytes(n), r, n) == reference_cached(n, r)


@pytest.mark.parametrize("n", [15, 16, 60, 120, 1000, 4095])
def test_all_ones_blocks_with_r_minus_one(backend, n):
    # Maximal blocks (2^120 - 1) and r = p - 1 (maximal key) exercise every carry.
    data = b"\xff" * n
    assert backend.poly127_hash(data, P - 1, (1 << 64) - 1) == reference(data, P - 1, (1 << 64) - 1)


@pytest.mark.parametrize(("length", "expected"), [(126, P - 1), (127, 0), (128, 1), (129, 2)])
def test_result_fully_reduced_at_p(backend, length, expected):
    # With r = 1 the hash is sum(blocks) + length. 128 blocks of 2^120 - 1 sum to
    # 2^127 - 128 = p - 127, so length = 127 lands exactly on p (must give 0, not p).
    data = b"\xff" * (15 * 128)
    assert backend.poly127_hash(data, 1, length) == expected


@pytest.mark.parametrize("n", [1000, 1 << 16])
def test_r_minus_one_alternating_sum(backend, n):
    # r = -1 (mod p): h = sum_i m_i (-1)^(L+2-i) + length * (-1), a second independent formula.
    data = random_bytes(n, seed=7)
    blocks = [int.from_bytes(data[off : off + 15], "little") for off in range(0, n, 15)]
    big_l = len(blocks)
    want = (sum(m * (-1) ** (big_l + 1 - i) for i, m in enumerate(blocks)) - n) % P
    assert backend.poly127_hash(data, P - 1, n) == want


# ------------------------------------------------------------------------- C == numpy


@HYP
@given(
    data=st.binary(min_size=0, max_size=2000),
    r=st.integers(0, P - 1),
    length=st.integers(0, (1 << 64) - 1),
)
def test_c_equals_numpy(both, data, r, length):
    numpy_be, c_be = both
    assert c_be.poly127_hash(data, r, length) == numpy_be.poly127_hash(data, r, length)


@HYP
@given(data=st.binary(min_size=0, max_size=400), r=st.integers(0, P - 1))
def test_c_equals_reference(both, data, r):
    assert both[1].poly127_hash(data, r, len(data)) == reference(data, r, len(data))


# ------------------------------------------------------------------------------ buffers


def test_buffer_types_hash_alike(backend):
    raw = random_bytes(100, seed=3)
    want = reference(raw, R_RANDOM, 100)
    arr = np.frombuffer(raw, dtype=np.uint8)
    for data in (raw, bytearray(raw), memoryview(raw), arr, arr.view(np.int8), arr.reshape(10, 10),
                 memoryview(raw).cast("c")):  # fmt: skip
        assert backend.poly127_hash(data, R_RANDOM, 100) == want, type(data)


@pytest.mark.parametrize("n", [1, 7, 8, 9, 14, 16, 22, 23, 24, 121, 1001])
def test_bytes_past_the_end_are_not_hashed(backend, n):
    # The tail of a slice is zero-padded, never filled from the bytes that follow it.
    big = b"\xa5" * n + b"\xff" * 64
    assert backend.poly127_hash(memoryview(big)[:n], R_RANDOM, n) == reference(b"\xa5" * n, R_RANDOM, n)


# ---------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("data", "r", "length"),
    [
        ("text", 1, 0),  # str is not bytes
        (123, 1, 0),
        ([1, 2, 3], 1, 0),
        (np.zeros(3, dtype=np.uint64), 1, 0),  # wider items: byte order would leak in
        (np.zeros(3, dtype=np.bool_), 1, 0),
        (memoryview(b"abcdef")[::2], 1, 0),  # not contiguous
        (b"ab", -1, 0),
        (b"ab", P, 0),
        (b"ab", 1 << 127, 0),
        (b"ab", 1 << 200, 0),
        (b"ab", 1.0, 0),
        (b"ab", True, 0),
        (b"ab", 1, -1),
        (b"ab", 1, 1 << 64),
        (b"ab", 1, 2.0),
        (b"ab", 1, None),
    ],
)
def test_bad_arguments(backend, data, r, length):
    with pytest.raises(KernelError):
        backend.poly127_hash(data, r, length)


def test_error_does_not_show_the_key(backend):
    secret = P + 0x1234567890ABCDEF
    with pytest.raises(KernelError) as info:
        backend.poly127_hash(b"ab", secret, 0)
    assert str(secret) not in str(info.value) and hex(secret)[2:] not in str(info.value).lower()


# ------------------------------------------------------------------ users of the kernel


def test_poly_hash_uses_the_given_backend(backend):
    data = random_bytes(500, seed=11)
    assert _polyhash.poly_hash(data, R_RANDOM, 500, backend) == reference(data, R_RANDOM, 500)


def test_poly_hash_default_backend_follows_environment(monkeypatch):
    data = random_bytes(77, seed=12)
    for name in ("numpy", "c"):
        monkeypatch.setenv("QNETEM_BACKEND", name)
        assert _polyhash.poly_hash(data, R_RANDOM, 77) == reference(data, R_RANDOM, 77)


def test_authenticator_tags_equal_across_backends(both):
    shared = np.random.default_rng(5).bytes(4096)
    payloads = [b"", b"x", random_bytes(70_000, seed=13)]
    tags = []
    for be in both:
        auth = Authenticator.from_keys(DirectionalKeys(initiator=True, material=shared), backend=be)
        tags.append([auth.seal(p, seq) for seq, p in enumerate(payloads)])
        peer = Authenticator.from_keys(DirectionalKeys(initiator=False, material=shared), backend=be)
        for seq, (p, t) in enumerate(zip(payloads, tags[-1], strict=True)):
            peer.verify(p, seq, t)
    assert tags[0] == tags[1]


def test_verification_tags_equal_across_backends(both):
    rng = np.random.default_rng(6)
    key = rng.integers(0, 2, 10_007, dtype=np.uint8)
    vh = VerificationHash.for_epsilon(key.size, 1e-12)
    seed = vh.draw_seed(rng)
    numpy_tag, c_tag = (vh.tag(key, seed, backend=be) for be in both)
    assert numpy_tag == c_tag
    assert vh.check(key, seed, c_tag, backend=both[0])
