"""Polynomial evaluation hashing over GF(p), p = 2^127 - 1, shared by verification and authentication.

A byte string is cut into 15-byte (120-bit) little-endian blocks m_1 .. m_L (the last one
zero-padded), followed by one block m_{L+1} holding a caller-given length. With a key
r in GF(p) the hash is evaluated by Horner's rule::

    h_r(m) = sum_{i=1}^{L+1} m_i r^(L+2-i)   (mod p)

Every block is < 2^120 < p, so two different strings of the same length give a non-zero
difference polynomial D(r) = h_r(m) - h_r(m') of degree <= L+1 with no constant term;
two strings of different lengths differ in the length block. Hence for any fixed
delta, ``D(r) = delta`` has at most L+1 roots (for delta = 0 one of them is r = 0), and
for r uniform on GF(p): ``Pr[h_r(m) - h_r(m') = delta] <= (L+1)/p`` — the family is
(L+1)/p-almost-Δ-universal (Carter & Wegman, JCSS 18 (1979) 143; the polynomial
construction as in Bernstein, "The Poly1305-AES message-authentication code", FSE 2005,
and Stinson, "Universal hashing and authentication codes", Des. Codes Cryptogr. 4
(1994) 369).

Keys drawn here come from 127 uniformly random bits reduced mod p (the all-ones value
maps to 0), so r = 0 has probability 2^-126 and every other value 2^-127: bounds that
assume a uniform r gain one extra root's worth, i.e. use (L+2)/2^127.

Evaluation is a kernel (``Backend.poly127_hash``, emulator/kernels): the C backend runs
Horner's rule in 64-bit limbs (cext/qnetem_polyhash.c, a few ns per block), the numpy
backend is the plain Python-integer loop (~0.3 us per block); both give the same value.
As elsewhere in nodes/qkd, the backend is an argument, ``get_backend()`` when omitted.
"""

from __future__ import annotations

from emulator.kernels import POLY127_PRIME, Backend, get_backend

P127 = POLY127_PRIME  # (1 << 127) - 1
BLOCK_BYTES = 15  # 120 bits < 127: every block is a distinct field element
MASK127 = P127


def key_from_bytes(raw: bytes) -> int:
    """A field element from 16 random bytes: the low 127 bits, reduced mod p."""
    return (int.from_bytes(raw, "little") & MASK127) % P127


def n_blocks(n_bytes: int) -> int:
    """Number of data blocks of an n_bytes string (the length block not counted)."""
    return -(-n_bytes // BLOCK_BYTES)


def collision_bound(n_bytes: int) -> float:
    """Upper bound on Pr_r[h_r(m) - h_r(m') = delta] for m != m' of at most n_bytes bytes.

    (L + 2) / 2^127 with L data blocks: L + 1 roots, plus one for the doubled weight of r = 0.
    """
    return (n_blocks(n_bytes) + 2) / 2.0**127


def poly_hash(data: bytes | bytearray | memoryview, r: int, length: int, backend: Backend | None = None) -> int:
    """h_r(data || length-block) mod 2^127 - 1, Horner's rule over 15-byte little-endian blocks.

    ``length`` (a byte or bit count) must be < 2^64 and r in [0, p); otherwise, or for a
    non-bytes-like ``data``, ``emulator.kernels.KernelError``.
    """
    be = backend if backend is not None else get_backend()
    return be.poly127_hash(data, r, length)
