"""Verification of the corrected keys by a universal hash with collision probability <= ε_cor.

Theory of operation
-------------------
Cascade leaves Alice and Bob with keys that are equal with high probability, not
certainty. Before privacy amplification one end (say Alice) draws a random seed,
hashes her key with it and sends (seed, tag) over the authenticated channel; Bob
hashes his key with the same seed and compares. Equal tags: keep the block. A
mismatch: **discard the block** (no retry — the tag has already leaked its bits).
The keys are then ε_cor-correct: ``Pr[K_A != K_B and the tags match] <= ε_cor``, the
definition used by the finite-key bound (Lim, Curty, Walenta, Xu, Zbinden, PRA 89,
022307 (2014)), whose key length subtracts log2(2/ε_cor) bits for this step.

The hash is a composition of two universal families with independent seeds:

1. compress the n-bit key to a 127-bit field element with the polynomial hash of
   ``_polyhash`` over GF(2^127 - 1) (15-byte blocks, a length block, key r from 16
   seed bytes): for different keys, ``Pr[v_A = v_B] <= ε1 = (L + 2) / 2^127`` with
   L = ceil(ceil(n/8) / 15) blocks;
2. map the 127 bits of v to t bits with a random t × 127 Toeplitz matrix (126 + t seed
   bits), a universal2 family: for ``v_A != v_B``, ``Pr[T v_A = T v_B] = 2^-t``
   (Krawczyk, CRYPTO '94; the same family privacy amplification uses).

A collision needs a collision in stage 1, or no collision there and one in stage 2,
so ``Pr[tags equal | K_A != K_B] <= ε1 + 2^-t`` (the composition rule for
ε-almost-universal families, Stinson, Des. Codes Cryptogr. 4 (1994) 369).
``for_epsilon`` picks the smallest t with ``ε1 + 2^-t <= ε_cor`` (in exact rational
arithmetic); since ε1 < 2^-100 for any key below 2^27 bits, t = ceil(log2(1/ε_cor)) in
practice, which is what Lim et al.'s log2(2/ε_cor) term pays for
(t < log2(2/(ε_cor - ε1))). The caller counts ``tag_bits`` as disclosed.

Costs: the seed is 16 + ceil((126 + t)/8) bytes (~40 bytes) whatever the key length, the
tag ceil(t/8) bytes; the work is one Horner pass over the key's bytes by the kernel
backend (``Backend.poly127_hash``; the C kernel hashes ~3 GB/s, the Python reference
loop ~2.5 µs per kilobit), ``get_backend()`` unless ``tag``/``check`` get one.

Key format: an unpacked key is a 1-D uint8/bool array of 0/1 (``n_bits`` long); a packed
key is a uint64 array in the project's format (bit i = bit i%64 of word i//64,
little-endian within words; bits beyond n_bits ignored). Both give the same tag: the
hash is defined on the bytes with bit i at bit i%8 of byte i//8.
"""

from __future__ import annotations

import dataclasses
import fractions
import hmac
import math

import numpy as np

from emulator.kernels import Backend

from . import _polyhash

__all__ = [
    "MAX_TAG_BITS",
    "EpsilonError",
    "KeyFormatError",
    "SeedError",
    "VerificationError",
    "VerificationHash",
    "key_bytes",
]

#: Largest tag: beyond 127 bits stage 1 (a 127-bit value) dominates the collision bound.
MAX_TAG_BITS = 127
_R_BYTES = 16


class VerificationError(ValueError):
    """Bad arguments to key verification (the caller's fault)."""


class EpsilonError(VerificationError):
    """ε_cor is outside (0, 1) or too small for the hash to reach."""


class KeyFormatError(VerificationError):
    """The key array has the wrong dtype, shape or length."""


class SeedError(VerificationError):
    """The seed has the wrong length."""


def key_bytes(key: np.ndarray, n_bits: int) -> bytes:
    """Canonical bytes of a key (bit i -> bit i%8 of byte i//8), from unpacked bits or packed uint64 words."""
    a = np.asarray(key)
    if a.ndim != 1:
        raise KeyFormatError(f"a key must be a 1-D array, got shape {a.shape}")
    n_bytes = -(-n_bits // 8)
    if a.dtype == np.uint64:
        if a.size != -(-n_bits // 64):
            raise KeyFormatError(f"a packed {n_bits}-bit key needs {-(-n_bits // 64)} uint64 words, got {a.size}")
        raw = bytearray(np.ascontiguousarray(a.astype("<u8")).tobytes()[:n_bytes])
        if n_bits % 8:
            raw[-1] &= (1 << (n_bits % 8)) - 1
        return bytes(raw)
    if a.dtype == np.bool_:
        a = a.view(np.uint8)
    if a.dtype != np.uint8:
        raise KeyFormatError(f"a key must be uint8/bool bits or packed uint64 words, got {a.dtype}")
    if a.size != n_bits:
        raise KeyFormatError(f"the key has {a.size} bits; this hash is set up for {n_bits}")
    if a.size and int(a.max()) > 1:
        raise KeyFormatError("an unpacked key must hold only 0 and 1")
    return np.packbits(a, bitorder="little").tobytes()


def _reverse127(v: int) -> int:
    return int(format(v, "0127b")[::-1], 2)


@dataclasses.dataclass(frozen=True, slots=True)
class VerificationHash:
    """Parameters of one verification: key length and tag length (both ends build the same one)."""

    n_bits: int
    tag_bits: int

    def __post_init__(self) -> None:
        if self.n_bits < 1:
            raise VerificationError(f"a key to verify must have at least 1 bit, got {self.n_bits}")
        if not 1 <= self.tag_bits <= MAX_TAG_BITS:
            raise VerificationError(f"tag_bits must be in [1, {MAX_TAG_BITS}], got {self.tag_bits}")

    @classmethod
    def for_epsilon(cls, n_bits: int, eps_cor: float) -> VerificationHash:
        """The shortest tag whose collision bound ε1 + 2^-t is <= eps_cor for n_bits-bit keys."""
        if not 0.0 < eps_cor < 1.0:
            raise EpsilonError(f"eps_cor must be in (0, 1), got {eps_cor!r}")
        if n_bits < 1:
            raise VerificationError(f"a key to verify must have at least 1 bit, got {n_bits}")
        # Exact rational arithmetic: a float test of eps1 + 2^-t <= eps_cor rounds eps1 away
        # (it is ~1e-30 of 2^-t) and would accept t = 40 for eps_cor = 2^-40.
        eps = fractions.Fraction(eps_cor)
        eps1 = fractions.Fraction(_polyhash.n_blocks(-(-n_bits // 8)) + 2, 1 << 127)
        if eps1 >= eps:
            raise EpsilonError(
                f"eps_cor = {eps_cor!r} is below this hash's floor {float(eps1):.3g} for {n_bits}-bit keys"
            )
        t = max(1, math.floor(-math.log2(eps_cor)) - 1)
        while eps1 + fractions.Fraction(1, 1 << t) > eps:
            t += 1
        if t > MAX_TAG_BITS:
            raise EpsilonError(f"eps_cor = {eps_cor!r} needs a {t}-bit tag; at most {MAX_TAG_BITS} are supported")
        return cls(n_bits, t)

    @property
    def seed_bytes(self) -> int:
        """16 bytes for the polynomial key, then ceil((126 + t)/8) bytes of Toeplitz seed."""
        return _R_BYTES + -(-(126 + self.tag_bits) // 8)

    @property
    def tag_bytes(self) -> int:
        return -(-self.tag_bits // 8)

    @property
    def collision_bound(self) -> float:
        """Pr[tags equal | keys differ] <= (L + 2)/2^127 + 2^-tag_bits (see the module docstring)."""
        return _polyhash.collision_bound(-(-self.n_bits // 8)) + 2.0**-self.tag_bits

    def draw_seed(self, rng: np.random.Generator) -> bytes:
        """A fresh uniformly random seed; draw it after reconciliation ends, once per block."""
        return rng.bytes(self.seed_bytes)

    def tag(self, key: np.ndarray, seed: bytes, *, backend: Backend | None = None) -> bytes:
        """The tag of ``key`` (unpacked 0/1 bits or packed uint64 words) under ``seed``;
        ``backend`` evaluates the polynomial hash (``get_backend()`` when None)."""
        if len(seed) != self.seed_bytes:
            raise SeedError(f"the verification seed has {len(seed)} bytes; {self.seed_bytes} are needed")
        data = key_bytes(key, self.n_bits)
        r = _polyhash.key_from_bytes(seed[:_R_BYTES])
        v = _polyhash.poly_hash(data, r, self.n_bits, backend)
        # Stage 2: y_i = XOR_j T[i, j] v_j with T[i, j] = s[i - j + 126] (a t x 127 Toeplitz
        # matrix). With v' the bit-reversal of v over 127 bits (v'_k = v_{126-k}),
        # y_i = parity(sum_k s[i + k] v'_k) = parity((s >> i) & v').
        s = int.from_bytes(seed[_R_BYTES:], "little") & ((1 << (126 + self.tag_bits)) - 1)
        rv = _reverse127(v)
        y = 0
        for i in range(self.tag_bits):
            y |= (((s >> i) & rv).bit_count() & 1) << i
        return y.to_bytes(self.tag_bytes, "little")

    def check(self, key: np.ndarray, seed: bytes, remote_tag: bytes, *, backend: Backend | None = None) -> bool:
        """True when the local tag equals the peer's; False means: discard the block."""
        return hmac.compare_digest(self.tag(key, seed, backend=backend), bytes(remote_tag))
