"""numpy twin of the C kernels: the reference backend (``QNETEM_BACKEND=numpy``).

Theory of operation
-------------------
A density matrix of n qubits is viewed as a tensor with 2n axes of size 2: axes
0..n-1 index the row bits of qubits 0..n-1, axes n..2n-1 the column bits (qubit 0 is the
most significant bit, so this is a plain ``reshape``). An operator O on qubits Q acts on
the row axes Q from the left and, as conj(O), on the column axes n+Q — that is
``O rho O^dagger`` — via ``np.moveaxis`` to the front and one matmul. Kraus channels sum
such terms; a measurement is the projector |e><e| on both sides, then renormalisation.
Partial traces contract a row axis with its column axis (``einsum``).

The RNG is Philox4x32-10 vectorised over sample indices with uint64 arrays holding
32-bit words (a 32x32-bit product fits in 64 bits), bit-identical to cext/qnetem_rng.c.

GF(2) kernels use the packed layout of cext/qnetem_gf2.c. Range parities take a prefix
XOR over whole words plus two masked edge words and fold each uint64 onto its parity;
indexed parities gather the covered bits into one flat array and difference its prefix
XOR at the range ends (so empty ranges give 0 without special cases).

The polynomial hash over GF(2^127 - 1) is Horner's rule on Python integers, block by
block: no numpy formulation beats it (numbers are 127 bits wide), and it is the
straightforward reading of the definition that the C lanes must reproduce.

Everything here is written for clarity first; the arguments are validated by
:class:`~emulator.kernels._types.CheckedBackend` before any ``_impl_*`` runs.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

from ._optics_numpy import NumpyOpticsMixin
from ._types import POLY127_PRIME, Basis, CheckedBackend, KernelError

__all__ = ["NumpyBackend", "philox4x32_10"]

_S2 = 1.0 / math.sqrt(2.0)

# Outcome-0 and outcome-1 eigenvectors per basis (same constants as basis_vector() in C).
_EIGVECS: dict[Basis, tuple[np.ndarray, np.ndarray]] = {
    Basis.Z: (np.array([1, 0], dtype=np.complex128), np.array([0, 1], dtype=np.complex128)),
    Basis.X: (np.array([_S2, _S2], dtype=np.complex128), np.array([_S2, -_S2], dtype=np.complex128)),
    Basis.Y: (np.array([_S2, 1j * _S2], dtype=np.complex128), np.array([_S2, -1j * _S2], dtype=np.complex128)),
}

# Columns: Phi+, Phi-, Psi+, Psi- over |00>, |01>, |10>, |11> (first qubit = qubit_a).
_BELL = np.array(
    [[_S2, _S2, 0, 0], [0, 0, _S2, _S2], [0, 0, _S2, -_S2], [_S2, -_S2, 0, 0]],
    dtype=np.complex128,
)


def _apply_on_axes(rho: np.ndarray, n: int, axes: list[int], op: np.ndarray) -> None:
    """In place: contract `op` (2^k x 2^k) with the given tensor axes of rho."""
    k = len(axes)
    moved = np.moveaxis(rho.reshape((2,) * (2 * n)), axes, list(range(k)))  # a view of rho
    flat = moved.reshape(1 << k, -1)  # a copy (moved is not contiguous in general)
    moved[...] = (op @ flat).reshape(moved.shape)


def _sandwich(rho: np.ndarray, n: int, qubits: list[int], op: np.ndarray) -> None:
    """In place: rho <- O rho O^dagger with O acting on `qubits` (first = most significant)."""
    _apply_on_axes(rho, n, qubits, op)
    _apply_on_axes(rho, n, [n + q for q in qubits], op.conj())


def _reduced_1q(rho: np.ndarray, n: int, q: int) -> np.ndarray:
    left, right = 1 << q, 1 << (n - 1 - q)
    return np.einsum("aibajb->ij", rho.reshape(left, 2, right, left, 2, right))


def _expectation(red: np.ndarray, e: np.ndarray) -> float:
    return float(np.real(e.conj() @ red @ e))


def _clamp01(p: float) -> float:
    """As clamp01() in C: NaN -> 0, then clip to [0, 1]."""
    if not p >= 0.0:
        return 0.0
    return min(p, 1.0)


def _trace_out(rho: np.ndarray, n: int, q: int) -> np.ndarray:
    left, right = 1 << q, 1 << (n - 1 - q)
    d = 1 << (n - 1)
    return np.einsum("aibcid->abcd", rho.reshape(left, 2, right, left, 2, right)).reshape(d, d)


# Philox4x32-10 constants (Salmon et al. SC'11; Random123 philox.h).
_M0 = np.uint64(0xD2511F53)
_M1 = np.uint64(0xCD9E8D57)
_W0 = 0x9E3779B9
_W1 = 0xBB67AE85
_MASK32 = np.uint64(0xFFFFFFFF)
_SHIFT32 = np.uint64(32)


def philox4x32_10(
    ctr: tuple[npt.ArrayLike, npt.ArrayLike, npt.ArrayLike, npt.ArrayLike],
    key: tuple[int, int],
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Philox4x32-10 on arrays of counter words (uint64 arrays holding 32-bit values).

    Round (Salmon et al. SC'11, section 3.2): (hi0, lo0) = M0*c0, (hi1, lo1) = M1*c2,
    c' = (hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0); the key is bumped by (W0, W1) between
    rounds. Returns the four output words as uint64 arrays of 32-bit values.
    """
    c0, c1, c2, c3 = (np.asarray(c, dtype=np.uint64) for c in ctr)
    k0, k1 = int(key[0]) & 0xFFFFFFFF, int(key[1]) & 0xFFFFFFFF
    for _ in range(10):
        p0 = _M0 * c0
        p1 = _M1 * c2
        c0, c1, c2, c3 = (
            (p1 >> _SHIFT32) ^ c1 ^ np.uint64(k0),
            p1 & _MASK32,
            (p0 >> _SHIFT32) ^ c3 ^ np.uint64(k1),
            p0 & _MASK32,
        )
        k0 = (k0 + _W0) & 0xFFFFFFFF
        k1 = (k1 + _W1) & 0xFFFFFFFF
    return c0, c1, c2, c3


def _rng_u64(key: int, stream: int, start: int, count: int) -> np.ndarray:
    if count == 0:
        return np.empty(0, dtype=np.uint64)
    i = np.arange(count, dtype=np.uint64) + np.uint64(start)  # no wrap: start+count <= 2**64
    c2 = np.uint64(stream & 0xFFFFFFFF)
    c3 = np.uint64(stream >> 32)
    x0, x1, _, _ = philox4x32_10((i & _MASK32, i >> _SHIFT32, c2, c3), (key & 0xFFFFFFFF, key >> 32))
    return x0 | (x1 << _SHIFT32)


# ------------------------------------------------------------------------ GF(2) helpers
# Packed layout as cext/qnetem_gf2.c: key bit i = bit (i % 64) of uint64 word i // 64.

_ONE = np.uint64(1)
_ALL = np.uint64(0xFFFFFFFFFFFFFFFF)


def _unpack_bits(words: np.ndarray, n_bits: int) -> np.ndarray:
    as_bytes = np.ascontiguousarray(words, dtype="<u8").view(np.uint8)
    return np.unpackbits(as_bytes, count=n_bits, bitorder="little")


def _pack_bits(bits: np.ndarray) -> np.ndarray:
    n_words = (bits.shape[0] + 63) // 64
    padded = np.zeros(n_words * 64, dtype=np.uint8)
    padded[: bits.shape[0]] = bits
    return np.packbits(padded, bitorder="little").view("<u8").astype(np.uint64)


def _parity64(x: np.ndarray) -> np.ndarray:
    """Parity of each uint64 by folding halves onto each other (x ^= x >> 32, ...)."""
    x = x.copy()
    for shift in (32, 16, 8, 4, 2, 1):
        x ^= x >> np.uint64(shift)
    return (x & _ONE).astype(np.uint8)


def _low_mask(n: np.ndarray) -> np.ndarray:
    """Mask of the n lowest bits of a word, for 0 <= n <= 64 (vectorised)."""
    n = n.astype(np.uint64)
    full = n >= np.uint64(64)
    shifted = (_ONE << np.where(full, np.uint64(0), n)) - _ONE
    return np.where(full, _ALL, shifted)


def _range_parities(words: np.ndarray, starts: np.ndarray, stops: np.ndarray) -> np.ndarray:
    """XOR of bits [start, stop) per range: masked edge words plus a prefix XOR of the
    whole words between them (one pass over the key, O(1) per range)."""
    out = np.zeros(starts.shape[0], dtype=np.uint8)
    live = stops > starts
    if not live.any():
        return out
    s = starts[live]
    e = stops[live]
    prefix = np.zeros(words.shape[0] + 1, dtype=np.uint64)
    np.bitwise_xor.accumulate(words, out=prefix[1:])
    w0 = s // 64
    w1 = (e - 1) // 64
    lo_mask = ~_low_mask(s % 64)  # bits >= s % 64
    hi_mask = _low_mask((e - 1) % 64 + 1)  # bits <= (e-1)%64
    same = w0 == w1
    acc = np.where(
        same,
        words[w0] & lo_mask & hi_mask,
        (words[w0] & lo_mask) ^ (words[w1] & hi_mask) ^ prefix[w1] ^ prefix[np.minimum(w0 + 1, w1)],
    )
    out[live] = _parity64(acc)
    return out


# ----------------------------------------------------------- polynomial hash over GF(2^127 - 1)

_POLY_BLOCK_BYTES = 15  # 120-bit blocks: every block is < p


def _poly127_hash(data: memoryview, r: int, length: int) -> int:
    """Horner's rule h <- (h + m) r mod p over the 15-byte little-endian blocks of data
    (the last one shorter, i.e. zero-padded), then over `length`; p = 2^127 - 1. Plain
    Python integers: the reference for cext/qnetem_polyhash.c (~0.3 us per block)."""
    p = POLY127_PRIME
    h = 0
    frm = int.from_bytes
    for off in range(0, len(data), _POLY_BLOCK_BYTES):
        h = (h + frm(data[off : off + _POLY_BLOCK_BYTES], "little")) * r % p
    return (h + length) * r % p


class NumpyBackend(NumpyOpticsMixin, CheckedBackend):
    """Reference backend in numpy; same interface and results as the C backend."""

    name = "numpy"

    def _impl_apply_1q(self, rho: np.ndarray, n: int, q: int, u: np.ndarray) -> None:
        _sandwich(rho, n, [q], u)

    def _impl_apply_2q(self, rho: np.ndarray, n: int, qa: int, qb: int, u: np.ndarray) -> None:
        _sandwich(rho, n, [qa, qb], u)

    def _impl_apply_kraus_1q(self, rho: np.ndarray, n: int, q: int, kraus: np.ndarray) -> None:
        acc = np.zeros_like(rho)
        for op in kraus:
            term = rho.copy()
            _sandwich(term, n, [q], op)
            acc += term
        rho[...] = acc

    def _impl_probability(self, rho: np.ndarray, n: int, q: int, basis: Basis) -> float:
        return _clamp01(_expectation(_reduced_1q(rho, n, q), _EIGVECS[basis][0]))

    def _impl_measure(self, rho: np.ndarray, n: int, q: int, basis: Basis, r: float) -> tuple[int, float]:
        red = _reduced_1q(rho, n, q)
        p0 = _clamp01(_expectation(red, _EIGVECS[basis][0]))
        outcome = 0 if r < p0 else 1
        e = _EIGVECS[basis][outcome]
        # Renormalise by the projected weight (trace exactly 1), report the drawing probability.
        weight = _expectation(red, e)
        if not weight > 0.0:
            raise KernelError(f"measurement outcome {outcome} has zero weight: cannot renormalise")
        _sandwich(rho, n, [q], np.outer(e, e.conj()))
        rho *= 1.0 / weight
        return outcome, (1.0 - p0) if outcome else p0

    def _impl_measure_batch(
        self, rhos: np.ndarray, n: int, qubits: np.ndarray, bases: np.ndarray, rs: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        count = rhos.shape[0]
        # All outcomes first, so that a zero-weight outcome leaves every register as it was.
        decided = []
        for i in range(count):
            red = _reduced_1q(rhos[i], n, int(qubits[i]))
            basis = Basis(int(bases[i]))
            p0 = _clamp01(_expectation(red, _EIGVECS[basis][0]))
            outcome = 0 if rs[i] < p0 else 1
            if not _expectation(red, _EIGVECS[basis][outcome]) > 0.0:
                raise KernelError(f"measurement outcome {outcome} has zero weight: cannot renormalise")
            decided.append(outcome)
        outcomes = np.empty(count, dtype=np.uint8)
        probs = np.empty(count, dtype=np.float64)
        rest = None if n == 1 else np.empty((count, 1 << (n - 1), 1 << (n - 1)), dtype=np.complex128)
        for i in range(count):
            outcome, prob = self._impl_measure(rhos[i], n, int(qubits[i]), Basis(int(bases[i])), float(rs[i]))
            assert outcome == decided[i]
            outcomes[i], probs[i] = outcome, prob
            if rest is not None:
                rest[i] = self._impl_partial_trace(rhos[i], n, (int(qubits[i]),))
        return outcomes, probs, rest

    def _impl_partial_trace(self, rho: np.ndarray, n: int, remove: tuple[int, ...]) -> np.ndarray:
        out = rho
        # Highest qubit first, so the indices of the qubits still to remove do not shift.
        for q in sorted(remove, reverse=True):
            out = _trace_out(out, n, q)
            n -= 1
        return np.array(out, dtype=np.complex128, order="C", copy=True)

    def _impl_tensor(self, a: np.ndarray, na: int, b: np.ndarray, nb: int) -> np.ndarray:
        return np.ascontiguousarray(np.kron(a, b))

    def _impl_bell_fidelities(self, rho: np.ndarray, n: int, qa: int, qb: int) -> np.ndarray:
        red = self._impl_partial_trace(rho, n, tuple(q for q in range(n) if q not in (qa, qb)))
        if qa > qb:  # the reduced state is ordered (qb, qa): swap the two tensor factors
            red = red.reshape(2, 2, 2, 2).transpose(1, 0, 3, 2).reshape(4, 4)
        return np.real(np.einsum("ik,ij,jk->k", _BELL.conj(), red, _BELL)).astype(np.float64)

    def _impl_rng_u64(self, key: int, stream: int, start: int, count: int) -> np.ndarray:
        return _rng_u64(key, stream, start, count)

    def _impl_rng_uniform(self, key: int, stream: int, start: int, count: int) -> np.ndarray:
        # Top 53 bits as a double in [0, 1): exact, identical to the C conversion.
        return (_rng_u64(key, stream, start, count) >> np.uint64(11)).astype(np.float64) * 2.0**-53

    # --- GF(2) on bit-packed keys ---------------------------------------------------
    def _impl_gf2_pack(self, bits: np.ndarray) -> np.ndarray:
        if bits.size and bits.max() > 1:
            raise KernelError("bits must hold only 0 and 1")
        return _pack_bits(bits)

    def _impl_gf2_unpack(self, words: np.ndarray, n_bits: int) -> np.ndarray:
        return _unpack_bits(words, n_bits)

    def _impl_gf2_parity_range(self, words: np.ndarray, n_bits: int, start: int, stop: int) -> int:
        return int(_range_parities(words, np.array([start]), np.array([stop]))[0])

    def _impl_gf2_parities_ranges(
        self, words: np.ndarray, n_bits: int, starts: np.ndarray, stops: np.ndarray
    ) -> np.ndarray:
        return _range_parities(words, starts, stops)

    def _impl_gf2_parities_indexed(
        self, words: np.ndarray, n_bits: int, index: np.ndarray, starts: np.ndarray, stops: np.ndarray
    ) -> np.ndarray:
        lengths = stops - starts
        total = int(lengths.sum())
        # Flat list of the index positions every range covers, ranges back to back.
        first = np.cumsum(lengths) - lengths
        covered = np.arange(total, dtype=np.int64) - np.repeat(first, lengths) + np.repeat(starts, lengths)
        positions = index[covered]
        if positions.size and (positions.min() < 0 or positions.max() >= n_bits):
            raise KernelError(f"index entries read by the ranges must lie in [0, {n_bits})")
        gathered = _unpack_bits(words, n_bits)[positions]
        prefix = np.zeros(total + 1, dtype=np.uint8)
        np.bitwise_xor.accumulate(gathered, out=prefix[1:])
        return prefix[first + lengths] ^ prefix[first]

    def _impl_gf2_gather(self, words: np.ndarray, n_bits: int, index: np.ndarray) -> np.ndarray:
        return _pack_bits(_unpack_bits(words, n_bits)[index])

    def _impl_gf2_flip_bits(self, words: np.ndarray, n_bits: int, positions: np.ndarray) -> None:
        p = positions.astype(np.uint64)
        # ufunc.at is unbuffered, so a position listed twice flips back, as in C.
        np.bitwise_xor.at(words, (p >> np.uint64(6)).astype(np.intp), _ONE << (p & np.uint64(63)))

    def _impl_gf2_hamming(self, a: np.ndarray, b: np.ndarray, n_bits: int) -> int:
        return int(np.count_nonzero(_unpack_bits(a ^ b, n_bits)))

    # --- polynomial hash over GF(2^127 - 1) -----------------------------------------
    def _impl_poly127_hash(self, data: memoryview, r: int, length: int) -> int:
        return _poly127_hash(data, r, length)
