"""Vocabulary of the kernel interface: enums, errors, the Backend protocol, argument
checks shared by both backends, and the operators (gates, Kraus sets, keys) they take.

Theory of operation
-------------------
A backend (``"c"`` in ``_c.py``, ``"numpy"`` in ``_numpy.py``) is a subclass of
:class:`CheckedBackend`. Its public methods validate every argument here — dtype,
shape, contiguity, writeability, qubit ranges — and raise :class:`KernelError` naming
the problem, then call the backend's ``_impl_*`` method with arguments that are known
good. Both backends therefore reject bad input identically, and the C code is never
reached with a buffer it could overrun.

Conventions (both backends): a density matrix ``rho`` of ``n`` qubits is a
C-contiguous complex128 array of shape ``(2**n, 2**n)``; qubit 0 is the MOST
significant bit of the basis index, so ``np.kron(A, B)`` has A on qubit 0.
GF(2) kernels take bit-packed keys: ceil(n/64) uint64 words, key bit i = bit (i % 64)
of word i // 64 (see ``gf2_words_for_bits`` and cext/qnetem_gf2.c).
``poly127_hash`` takes any contiguous byte buffer (bytes, bytearray, memoryview, uint8
array) and Python ints; it returns a Python int in [0, 2**127 - 1).
"""

from __future__ import annotations

import abc
import enum
import hashlib
import math
import operator
import types
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:  # _optics imports this module; the Protocol only names its types
    from ._optics import ChoiceThresholds, Detections, OpticsCursor, OpticsModel, PulseChoices

__all__ = [
    "GATES",
    "GF2_MAX_BITS",
    "MAX_QUBITS",
    "POLY127_PRIME",
    "Backend",
    "Basis",
    "BellState",
    "CheckedBackend",
    "KernelBuildError",
    "KernelError",
    "derive_key",
    "gf2_words_for_bits",
    "kraus_amplitude_damping",
    "kraus_dephasing",
    "kraus_depolarizing",
    "rotation",
]

#: Largest register the kernels accept (matches QNETEM_MAX_QUBITS in cext/qnetem.h).
#: A 30-qubit density matrix would need 2**64 bytes, so this is never the binding limit.
MAX_QUBITS = 30

_U64 = 1 << 64

#: What poly127_hash hashes: a contiguous byte buffer (collections.abc.Buffer needs 3.12).
Buffer = bytes | bytearray | memoryview | np.ndarray


class Basis(enum.IntEnum):
    """Measurement basis; outcome 0 is the +1 eigenstate (|0>, |+>, |+i>)."""

    Z = 0
    X = 1
    Y = 2


class BellState(enum.IntEnum):
    """Index into :meth:`Backend.bell_fidelities`."""

    PHI_PLUS = 0  # (|00> + |11>)/sqrt2
    PHI_MINUS = 1  # (|00> - |11>)/sqrt2
    PSI_PLUS = 2  # (|01> + |10>)/sqrt2
    PSI_MINUS = 3  # (|01> - |10>)/sqrt2


class KernelError(ValueError):
    """Caller misuse of a kernel (bad dtype, shape, qubit, ...) or a kernel failure."""


class KernelBuildError(ImportError):
    """The compiled module ``emulator._cext`` is missing or stale."""


@runtime_checkable
class Backend(Protocol):
    """What every kernel backend provides (see the module docstring for conventions)."""

    name: str

    def apply_1q(self, rho: np.ndarray, n_qubits: int, qubit: int, u: np.ndarray) -> None: ...

    def apply_2q(
        self, rho: np.ndarray, n_qubits: int, qubit_a: int, qubit_b: int, u: np.ndarray
    ) -> None: ...

    def apply_kraus_1q(
        self, rho: np.ndarray, n_qubits: int, qubit: int, kraus: np.ndarray
    ) -> None: ...

    def probability(self, rho: np.ndarray, n_qubits: int, qubit: int, basis: Basis) -> float: ...

    def measure(
        self, rho: np.ndarray, n_qubits: int, qubit: int, basis: Basis, r: float
    ) -> tuple[int, float]: ...

    def measure_batch(
        self, rhos: np.ndarray, n_qubits: int, qubits: npt.ArrayLike, bases: npt.ArrayLike, rs: npt.ArrayLike
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]: ...

    def partial_trace(
        self, rho: np.ndarray, n_qubits: int, remove: Sequence[int]
    ) -> np.ndarray: ...

    def tensor(self, rho_a: np.ndarray, rho_b: np.ndarray) -> np.ndarray: ...

    def bell_fidelities(
        self, rho: np.ndarray, n_qubits: int, qubit_a: int, qubit_b: int
    ) -> np.ndarray: ...

    def rng_uniform(self, key: int, stream: int, start: int, count: int) -> np.ndarray: ...

    def rng_u64(self, key: int, stream: int, start: int, count: int) -> np.ndarray: ...

    # GF(2) kernels on bit-packed keys (layout: see gf2_words_for_bits).
    def gf2_pack(self, bits: np.ndarray) -> np.ndarray: ...

    def gf2_unpack(self, words: np.ndarray, n_bits: int) -> np.ndarray: ...

    def gf2_parity_range(self, words: np.ndarray, n_bits: int, start: int, stop: int) -> int: ...

    def gf2_parities_ranges(
        self, words: np.ndarray, n_bits: int, starts: npt.ArrayLike, stops: npt.ArrayLike
    ) -> np.ndarray: ...

    def gf2_parities_indexed(
        self, words: np.ndarray, n_bits: int, index: npt.ArrayLike, starts: npt.ArrayLike, stops: npt.ArrayLike
    ) -> np.ndarray: ...

    def gf2_gather(self, words: np.ndarray, n_bits: int, index: npt.ArrayLike) -> np.ndarray: ...

    def gf2_flip_bits(self, words: np.ndarray, n_bits: int, positions: npt.ArrayLike) -> None: ...

    def gf2_hamming(self, a: np.ndarray, b: np.ndarray, n_bits: int) -> int: ...

    # Polynomial hash over GF(2^127 - 1) (cext/qnetem_polyhash.c).
    def poly127_hash(self, data: Buffer, r: int, length: int) -> int: ...

    # Optics of decoy-state BB84 (emulator/kernels/_optics.py, cext/qnetem_optics.c).
    def optics_choices(
        self, alice_key: int, indices: npt.ArrayLike, thresholds: ChoiceThresholds
    ) -> PulseChoices: ...

    def optics_sample(
        self, model: OpticsModel, cursor: OpticsCursor, end: int, capacity: int
    ) -> tuple[Detections, OpticsCursor]: ...


# ------------------------------------------------------------------------ argument checks


def _int(name: str, value: object) -> int:
    if isinstance(value, (bool, np.bool_)):
        raise KernelError(f"{name} must be an integer, got a bool")
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise KernelError(f"{name} must be an integer, got {type(value).__name__}") from None


def check_n_qubits(n_qubits: object, *, minimum: int = 1) -> int:
    n = _int("n_qubits", n_qubits)
    if not minimum <= n <= MAX_QUBITS:
        raise KernelError(f"n_qubits must be in [{minimum}, {MAX_QUBITS}], got {n}")
    return n


def check_qubit(name: str, qubit: object, n_qubits: int) -> int:
    q = _int(name, qubit)
    if not 0 <= q < n_qubits:
        raise KernelError(f"{name}={q} out of range for a {n_qubits}-qubit register")
    return q


def check_rho(rho: object, n_qubits: int, *, name: str = "rho", writable: bool = False) -> np.ndarray:
    if not isinstance(rho, np.ndarray):
        raise KernelError(f"{name} must be a numpy.ndarray, got {type(rho).__name__}")
    if rho.dtype != np.complex128:
        raise KernelError(f"{name} must have dtype complex128, got {rho.dtype}")
    d = 1 << n_qubits
    if rho.shape != (d, d):
        raise KernelError(f"{name} must have shape ({d}, {d}) for {n_qubits} qubits, got {rho.shape}")
    if not rho.flags.c_contiguous:
        raise KernelError(f"{name} must be C-contiguous")
    if writable and not rho.flags.writeable:
        raise KernelError(f"{name} is modified in place and must be writeable")
    return rho


def infer_n_qubits(rho: object, *, name: str) -> int:
    """n for a square (2**n, 2**n) array (n >= 1); full checks follow in check_rho."""
    shape = getattr(rho, "shape", None)
    if (
        shape is None
        or len(shape) != 2
        or shape[0] != shape[1]
        or shape[0] < 2
        or shape[0] & (shape[0] - 1)
    ):
        raise KernelError(f"{name} must be a square (2**n, 2**n) array with n >= 1, got shape {shape}")
    return check_n_qubits(int(shape[0]).bit_length() - 1)


def check_operator(name: str, op: object, shape: tuple[int, ...]) -> np.ndarray:
    """A small operator (gate or Kraus set): any real/complex numeric array of exactly
    `shape` with finite entries; returned as a fresh-or-same C-contiguous complex128."""
    if not isinstance(op, np.ndarray):
        raise KernelError(f"{name} must be a numpy.ndarray, got {type(op).__name__}")
    if op.dtype.kind not in "fciu" or op.dtype == np.bool_:
        raise KernelError(f"{name} must be numeric (complex128 preferred), got dtype {op.dtype}")
    if op.shape != shape:
        raise KernelError(f"{name} must have shape {shape}, got {op.shape}")
    out = np.ascontiguousarray(op, dtype=np.complex128)
    if not np.isfinite(out).all():
        raise KernelError(f"{name} has non-finite entries")
    return out


def check_kraus(kraus: object) -> np.ndarray:
    shape = getattr(kraus, "shape", None)
    if shape is None or len(shape) != 3 or shape[1:] != (2, 2) or shape[0] < 1:
        raise KernelError(f"kraus must have shape (k, 2, 2) with k >= 1, got {shape}")
    return check_operator("kraus", kraus, tuple(shape))


def check_basis(basis: object) -> Basis:
    try:
        return Basis(_int("basis", basis))
    except ValueError:
        raise KernelError(f"basis must be one of {[b.name for b in Basis]}, got {basis!r}") from None


def check_r(r: object) -> float:
    try:
        value = float(r)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise KernelError(f"r must be a float in [0, 1), got {type(r).__name__}") from None
    if not 0.0 <= value < 1.0:
        raise KernelError(f"r must be in [0, 1), got {value}")
    return value


def check_batch_rhos(rhos: object, n_qubits: int) -> int:
    """A writeable C-contiguous complex128 stack (count, 2**n, 2**n); returns count."""
    if not isinstance(rhos, np.ndarray):
        raise KernelError(f"rhos must be a numpy.ndarray, got {type(rhos).__name__}")
    d = 1 << n_qubits
    if rhos.ndim != 3 or rhos.shape[1:] != (d, d):
        raise KernelError(f"rhos must have shape (count, {d}, {d}) for {n_qubits} qubits, got {rhos.shape}")
    if rhos.dtype != np.complex128:
        raise KernelError(f"rhos must have dtype complex128, got {rhos.dtype}")
    if not rhos.flags.c_contiguous or not rhos.flags.writeable:
        raise KernelError("rhos must be C-contiguous and writeable (collapsed in place)")
    return rhos.shape[0]


def check_batch_items(
    qubits: object, bases: object, rs: object, count: int, n_qubits: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-item arguments of measure_batch as int32, int32, float64 arrays of length count."""
    out = []
    for name, value, dtype in (("qubits", qubits, np.int32), ("bases", bases, np.int32), ("rs", rs, np.float64)):
        arr = np.asarray(value)
        if arr.shape != (count,):
            raise KernelError(f"{name} must have shape ({count},), got {arr.shape}")
        if count and (arr.dtype.kind not in ("iu" if dtype is np.int32 else "fiu") or arr.dtype == np.bool_):
            raise KernelError(f"{name} has dtype {arr.dtype}, expected {'integers' if dtype is np.int32 else 'floats'}")
        out.append(arr)
    q, b, r = out
    if count:
        if q.min() < 0 or q.max() >= n_qubits:
            raise KernelError(f"qubits out of range for a {n_qubits}-qubit register")
        if b.min() < 0 or b.max() > max(Basis):
            raise KernelError(f"bases must be in {[int(x) for x in Basis]} ({[x.name for x in Basis]})")
        r = r.astype(np.float64, copy=False)
        if not ((r >= 0.0) & (r < 1.0)).all():  # also refuses NaN
            raise KernelError("rs must be in [0, 1)")
    return (
        np.ascontiguousarray(q, dtype=np.int32),
        np.ascontiguousarray(b, dtype=np.int32),
        np.ascontiguousarray(r, dtype=np.float64),
    )


def check_remove(remove: object, n_qubits: int) -> tuple[int, ...]:
    if isinstance(remove, (str, bytes)) or not isinstance(remove, (Sequence, np.ndarray)):
        raise KernelError(f"remove must be a sequence of qubit indices, got {type(remove).__name__}")
    qubits = tuple(check_qubit("remove[]", q, n_qubits) for q in remove)
    if len(set(qubits)) != len(qubits):
        raise KernelError(f"remove lists a qubit twice: {list(qubits)}")
    return qubits


def check_rng_args(key: object, stream: object, start: object, count: object) -> tuple[int, int, int, int]:
    k = _int("key", key)
    s = _int("stream", stream)
    i0 = _int("start", start)
    c = _int("count", count)
    for name, v in (("key", k), ("stream", s), ("start", i0)):
        if not 0 <= v < _U64:
            raise KernelError(f"{name} must be in [0, 2**64)")
    if c < 0:
        raise KernelError(f"count must be >= 0, got {c}")
    if i0 + c > _U64:
        raise KernelError("start + count must not exceed 2**64 (sample indices are 64-bit)")
    return k, s, i0, c


# ------------------------------------------------------------------ GF(2) argument checks
#
# Packed layout (both backends, cext/qnetem_gf2.c): n_bits bits in ceil(n_bits/64) uint64
# words, key bit i = bit (i % 64) of word i // 64, least significant bit first. Padding
# bits (>= n_bits) are ignored on input and written as zero.

#: Largest key the GF(2) kernels accept (positions must fit int64 with room to spare).
GF2_MAX_BITS = 1 << 40


def gf2_words_for_bits(n_bits: int) -> int:
    """Number of uint64 words that hold n_bits packed bits."""
    return (n_bits + 63) // 64


def check_n_bits(n_bits: object) -> int:
    n = _int("n_bits", n_bits)
    if not 0 <= n <= GF2_MAX_BITS:
        raise KernelError(f"n_bits must be in [0, 2**40], got {n}")
    return n


def check_gf2_words(name: str, words: object, n_bits: int, *, writable: bool = False) -> np.ndarray:
    """A packed key: 1-D C-contiguous uint64 of exactly ceil(n_bits/64) words."""
    if not isinstance(words, np.ndarray):
        raise KernelError(f"{name} must be a numpy.ndarray of packed bits, got {type(words).__name__}")
    if words.dtype != np.uint64:
        raise KernelError(f"{name} must have dtype uint64 (packed bits), got {words.dtype}")
    expected = gf2_words_for_bits(n_bits)
    if words.shape != (expected,):
        raise KernelError(f"{name} must have shape ({expected},) for {n_bits} bits, got {words.shape}")
    if not words.flags.c_contiguous:
        raise KernelError(f"{name} must be C-contiguous")
    if writable and not words.flags.writeable:
        raise KernelError(f"{name} is modified in place and must be writeable")
    return words


def check_bits(bits: object) -> np.ndarray:
    """Unpacked bits: 1-D C-contiguous uint8 (or bool) holding 0 and 1; returned as uint8.
    The 0/1 check itself is done by the kernels (one pass over the data)."""
    if not isinstance(bits, np.ndarray):
        raise KernelError(f"bits must be a numpy.ndarray, got {type(bits).__name__}")
    if bits.dtype not in (np.uint8, np.bool_):
        raise KernelError(f"bits must have dtype uint8 or bool, got {bits.dtype}")
    if bits.ndim != 1:
        raise KernelError(f"bits must be 1-D, got shape {bits.shape}")
    if not bits.flags.c_contiguous:
        raise KernelError("bits must be C-contiguous")
    if bits.shape[0] > GF2_MAX_BITS:
        raise KernelError(f"bits holds {bits.shape[0]} > 2**40 bits")
    return bits.view(np.uint8)


def check_int64_vector(name: str, values: object) -> np.ndarray:
    """A 1-D vector of integers (any integer dtype or a sequence) as C-contiguous int64."""
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise KernelError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.size and (arr.dtype.kind not in "iu" or arr.dtype == np.bool_):
        raise KernelError(f"{name} must hold integers, got dtype {arr.dtype}")
    if arr.dtype == np.uint64 and arr.size and int(arr.max()) > np.iinfo(np.int64).max:
        raise KernelError(f"{name} has values beyond int64")
    return np.ascontiguousarray(arr, dtype=np.int64)


def check_gf2_ranges(starts: object, stops: object, limit: int) -> tuple[np.ndarray, np.ndarray]:
    """Ranges [starts[b], stops[b]) with 0 <= start <= stop <= limit, as int64 vectors."""
    s = check_int64_vector("starts", starts)
    e = check_int64_vector("stops", stops)
    if s.shape != e.shape:
        raise KernelError(f"starts and stops must have the same length, got {s.shape[0]} and {e.shape[0]}")
    if s.size and (s.min() < 0 or (e < s).any() or e.max() > limit):
        raise KernelError(f"every range must satisfy 0 <= start <= stop <= {limit}")
    return s, e


def check_positions(name: str, positions: object, n_bits: int) -> np.ndarray:
    p = check_int64_vector(name, positions)
    if p.size and (p.min() < 0 or p.max() >= n_bits):
        raise KernelError(f"{name} must lie in [0, {n_bits})")
    return p


# ------------------------------------------------------------ polynomial hash argument checks

#: The prime 2^127 - 1 of the polynomial hash (a Mersenne prime: 2^127 == 1 mod p).
POLY127_PRIME = (1 << 127) - 1


def check_byte_buffer(name: str, data: object) -> memoryview:
    """A C-contiguous buffer of single bytes (format B, b or c) as a flat 'B' memoryview.

    Wider items (a uint64 array, say) are refused: their bytes depend on the host's byte
    order, so hashing them would not give the same tag on every machine."""
    if isinstance(data, str):
        raise KernelError(f"{name} must be bytes-like, got str (encode it first)")
    try:
        view = memoryview(data)  # type: ignore[arg-type]
    except TypeError:
        raise KernelError(f"{name} must be bytes-like, got {type(data).__name__}") from None
    if view.itemsize != 1 or view.format not in ("B", "b", "c"):
        raise KernelError(f"{name} must hold single bytes (format 'B'), got format {view.format!r}")
    if not view.c_contiguous:
        raise KernelError(f"{name} must be C-contiguous")
    return view.cast("B") if view.ndim != 1 or view.format != "B" else view


def check_poly127_args(data: object, r: object, length: object) -> tuple[memoryview, int, int]:
    view = check_byte_buffer("data", data)
    key = _int("r", r)
    if not 0 <= key < POLY127_PRIME:
        raise KernelError("r must be in [0, 2**127 - 1)")  # the value itself is a secret key
    n = _int("length", length)
    if not 0 <= n < _U64:
        raise KernelError(f"length must be in [0, 2**64), got {n}")
    return view, key, n


class CheckedBackend(abc.ABC):
    """Validates arguments, then calls ``_impl_*`` (implemented by each backend)."""

    name: str = "abstract"

    def __repr__(self) -> str:
        return f"<qnetem kernel backend {self.name!r}>"

    # --- public, validated -----------------------------------------------------------
    def apply_1q(self, rho: np.ndarray, n_qubits: int, qubit: int, u: np.ndarray) -> None:
        """rho <- U rho U^dagger with U (2, 2) acting on `qubit` (in place)."""
        n = check_n_qubits(n_qubits)
        check_rho(rho, n, writable=True)
        q = check_qubit("qubit", qubit, n)
        self._impl_apply_1q(rho, n, q, check_operator("u", u, (2, 2)))

    def apply_2q(
        self, rho: np.ndarray, n_qubits: int, qubit_a: int, qubit_b: int, u: np.ndarray
    ) -> None:
        """rho <- U rho U^dagger with U (4, 4); qubit_a is the more significant index of U."""
        n = check_n_qubits(n_qubits)
        check_rho(rho, n, writable=True)
        qa = check_qubit("qubit_a", qubit_a, n)
        qb = check_qubit("qubit_b", qubit_b, n)
        if qa == qb:
            raise KernelError(f"qubit_a and qubit_b must differ, both are {qa}")
        self._impl_apply_2q(rho, n, qa, qb, check_operator("u", u, (4, 4)))

    def apply_kraus_1q(self, rho: np.ndarray, n_qubits: int, qubit: int, kraus: np.ndarray) -> None:
        """rho <- sum_i K_i rho K_i^dagger with kraus (k, 2, 2) (in place; not checked for CPTP)."""
        n = check_n_qubits(n_qubits)
        check_rho(rho, n, writable=True)
        q = check_qubit("qubit", qubit, n)
        self._impl_apply_kraus_1q(rho, n, q, check_kraus(kraus))

    def probability(self, rho: np.ndarray, n_qubits: int, qubit: int, basis: Basis) -> float:
        """P(outcome 0) of measuring `qubit` in `basis`, clamped to [0, 1]; no collapse."""
        n = check_n_qubits(n_qubits)
        check_rho(rho, n)
        q = check_qubit("qubit", qubit, n)
        return self._impl_probability(rho, n, q, check_basis(basis))

    def measure(
        self, rho: np.ndarray, n_qubits: int, qubit: int, basis: Basis, r: float
    ) -> tuple[int, float]:
        """Measure with collapse: outcome 0 iff r < P(0); rho becomes the renormalised
        post-measurement state (in place). Returns (outcome, probability of outcome)."""
        n = check_n_qubits(n_qubits)
        check_rho(rho, n, writable=True)
        q = check_qubit("qubit", qubit, n)
        return self._impl_measure(rho, n, q, check_basis(basis), check_r(r))

    def measure_batch(
        self, rhos: np.ndarray, n_qubits: int, qubits: npt.ArrayLike, bases: npt.ArrayLike, rs: npt.ArrayLike
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """`measure` on each of `count` separate registers stacked in `rhos` (count, 2**n, 2**n):
        item i measures qubit qubits[i] of rhos[i] in bases[i] with draw rs[i], collapsing it
        in place. Returns (outcomes uint8, probabilities float64, rest): rest[i] is the
        collapsed rhos[i] with its measured qubit traced out (as `partial_trace`), shape
        (count, 2**(n-1), 2**(n-1)); None for n = 1. Results are identical to the
        one-register calls. If an outcome has zero weight, KernelError and no rho changed.

        Why: the broker measures thousands of heralded pairs per request; one call here
        replaces a measure and a partial trace per qubit, each with its own checks."""
        n = check_n_qubits(n_qubits)
        count = check_batch_rhos(rhos, n)
        q, b, r = check_batch_items(qubits, bases, rs, count, n)
        return self._impl_measure_batch(rhos, n, q, b, r)

    def partial_trace(self, rho: np.ndarray, n_qubits: int, remove: Sequence[int]) -> np.ndarray:
        """New array over the kept qubits (order preserved); removing all gives shape (1, 1)."""
        n = check_n_qubits(n_qubits)
        check_rho(rho, n)
        return self._impl_partial_trace(rho, n, check_remove(remove, n))

    def tensor(self, rho_a: np.ndarray, rho_b: np.ndarray) -> np.ndarray:
        """kron(rho_a, rho_b): a's qubits first."""
        na = infer_n_qubits(rho_a, name="rho_a")
        nb = infer_n_qubits(rho_b, name="rho_b")
        check_rho(rho_a, na, name="rho_a")
        check_rho(rho_b, nb, name="rho_b")
        if na + nb > MAX_QUBITS:
            raise KernelError(f"tensor product would have {na + nb} > {MAX_QUBITS} qubits")
        return self._impl_tensor(rho_a, na, rho_b, nb)

    def bell_fidelities(self, rho: np.ndarray, n_qubits: int, qubit_a: int, qubit_b: int) -> np.ndarray:
        """float64 (4,): <B|rho_ab|B> for B in BellState order, rho_ab the (a, b) reduced state."""
        n = check_n_qubits(n_qubits)
        check_rho(rho, n)
        qa = check_qubit("qubit_a", qubit_a, n)
        qb = check_qubit("qubit_b", qubit_b, n)
        if qa == qb:
            raise KernelError(f"qubit_a and qubit_b must differ, both are {qa}")
        return self._impl_bell_fidelities(rho, n, qa, qb)

    def rng_uniform(self, key: int, stream: int, start: int, count: int) -> np.ndarray:
        """float64 samples start .. start+count-1 of Philox stream (key, stream), in [0, 1)."""
        return self._impl_rng_uniform(*check_rng_args(key, stream, start, count))

    def rng_u64(self, key: int, stream: int, start: int, count: int) -> np.ndarray:
        """uint64 samples start .. start+count-1 of Philox stream (key, stream)."""
        return self._impl_rng_u64(*check_rng_args(key, stream, start, count))

    # --- GF(2) on bit-packed keys (layout above check_n_bits) -----------------------
    def gf2_pack(self, bits: np.ndarray) -> np.ndarray:
        """Pack 0/1 bits (uint8 or bool, 1-D) into a new uint64 word array."""
        b = check_bits(bits)
        return self._impl_gf2_pack(b)

    def gf2_unpack(self, words: np.ndarray, n_bits: int) -> np.ndarray:
        """New uint8 array of the n_bits bits held in `words`."""
        n = check_n_bits(n_bits)
        return self._impl_gf2_unpack(check_gf2_words("words", words, n), n)

    def gf2_parity_range(self, words: np.ndarray, n_bits: int, start: int, stop: int) -> int:
        """XOR of key bits [start, stop) (0 for an empty range)."""
        n = check_n_bits(n_bits)
        check_gf2_words("words", words, n)
        s, e = _int("start", start), _int("stop", stop)
        if not 0 <= s <= e <= n:
            raise KernelError(f"need 0 <= start <= stop <= {n}, got start={s} stop={e}")
        return self._impl_gf2_parity_range(words, n, s, e)

    def gf2_parities_ranges(
        self, words: np.ndarray, n_bits: int, starts: npt.ArrayLike, stops: npt.ArrayLike
    ) -> np.ndarray:
        """uint8 parities of key bits [starts[b], stops[b]) for every b."""
        n = check_n_bits(n_bits)
        check_gf2_words("words", words, n)
        s, e = check_gf2_ranges(starts, stops, n)
        return self._impl_gf2_parities_ranges(words, n, s, e)

    def gf2_parities_indexed(
        self, words: np.ndarray, n_bits: int, index: npt.ArrayLike, starts: npt.ArrayLike, stops: npt.ArrayLike
    ) -> np.ndarray:
        """uint8 parities of the key bits index[starts[b]:stops[b]] for every b: the parity
        of block b of a key shuffled by `index`, without building the shuffled copy.
        Only the index entries the ranges cover are read, and only those are checked
        (by the kernel) to lie in [0, n_bits)."""
        n = check_n_bits(n_bits)
        check_gf2_words("words", words, n)
        idx = check_int64_vector("index", index)
        s, e = check_gf2_ranges(starts, stops, idx.shape[0])
        return self._impl_gf2_parities_indexed(words, n, idx, s, e)

    def gf2_gather(self, words: np.ndarray, n_bits: int, index: npt.ArrayLike) -> np.ndarray:
        """New packed key of len(index) bits: bit j = key bit index[j] (shuffle/select)."""
        n = check_n_bits(n_bits)
        check_gf2_words("words", words, n)
        idx = check_positions("index", index, n)
        return self._impl_gf2_gather(words, n, idx)

    def gf2_flip_bits(self, words: np.ndarray, n_bits: int, positions: npt.ArrayLike) -> None:
        """Flip key bit p for every p in positions, in place (a repeated p flips back)."""
        n = check_n_bits(n_bits)
        check_gf2_words("words", words, n, writable=True)
        self._impl_gf2_flip_bits(words, n, check_positions("positions", positions, n))

    def gf2_hamming(self, a: np.ndarray, b: np.ndarray, n_bits: int) -> int:
        """Number of positions < n_bits where the packed keys a and b differ."""
        n = check_n_bits(n_bits)
        check_gf2_words("a", a, n)
        check_gf2_words("b", b, n)
        return self._impl_gf2_hamming(a, b, n)

    # --- polynomial hash over GF(2^127 - 1) ------------------------------------------
    def poly127_hash(self, data: Buffer, r: int, length: int) -> int:
        """Horner's rule over GF(p), p = 2^127 - 1: h <- (h + m) r over the 15-byte
        little-endian blocks m of `data` (the last zero-padded), then over the block
        `length` (any 64-bit number; callers pass a byte or bit count). The result, a
        Python int in [0, p), is sum_i m_i r^(L+2-i) mod p (nodes/qkd/_polyhash.py)."""
        view, key, n = check_poly127_args(data, r, length)
        return self._impl_poly127_hash(view, key, n)

    # --- implemented by each backend (arguments already validated) --------------------
    @abc.abstractmethod
    def _impl_apply_1q(self, rho: np.ndarray, n: int, q: int, u: np.ndarray) -> None:
        ...

    @abc.abstractmethod
    def _impl_apply_2q(self, rho: np.ndarray, n: int, qa: int, qb: int, u: np.ndarray) -> None:
        ...

    @abc.abstractmethod
    def _impl_apply_kraus_1q(self, rho: np.ndarray, n: int, q: int, kraus: np.ndarray) -> None:
        ...

    @abc.abstractmethod
    def _impl_probability(self, rho: np.ndarray, n: int, q: int, basis: Basis) -> float:
        ...

    @abc.abstractmethod
    def _impl_measure(self, rho: np.ndarray, n: int, q: int, basis: Basis, r: float) -> tuple[int, float]:
        ...

    @abc.abstractmethod
    def _impl_measure_batch(
        self, rhos: np.ndarray, n: int, qubits: np.ndarray, bases: np.ndarray, rs: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        ...

    @abc.abstractmethod
    def _impl_partial_trace(self, rho: np.ndarray, n: int, remove: tuple[int, ...]) -> np.ndarray:
        ...

    @abc.abstractmethod
    def _impl_tensor(self, a: np.ndarray, na: int, b: np.ndarray, nb: int) -> np.ndarray:
        ...

    @abc.abstractmethod
    def _impl_bell_fidelities(self, rho: np.ndarray, n: int, qa: int, qb: int) -> np.ndarray:
        ...

    @abc.abstractmethod
    def _impl_rng_uniform(self, key: int, stream: int, start: int, count: int) -> np.ndarray:
        ...

    @abc.abstractmethod
    def _impl_rng_u64(self, key: int, stream: int, start: int, count: int) -> np.ndarray:
        ...

    @abc.abstractmethod
    def _impl_gf2_pack(self, bits: np.ndarray) -> np.ndarray:
        ...

    @abc.abstractmethod
    def _impl_gf2_unpack(self, words: np.ndarray, n_bits: int) -> np.ndarray:
        ...

    @abc.abstractmethod
    def _impl_gf2_parity_range(self, words: np.ndarray, n_bits: int, start: int, stop: int) -> int:
        ...

    @abc.abstractmethod
    def _impl_gf2_parities_ranges(
        self, words: np.ndarray, n_bits: int, starts: np.ndarray, stops: np.ndarray
    ) -> np.ndarray:
        ...

    @abc.abstractmethod
    def _impl_gf2_parities_indexed(
        self, words: np.ndarray, n_bits: int, index: np.ndarray, starts: np.ndarray, stops: np.ndarray
    ) -> np.ndarray:
        ...

    @abc.abstractmethod
    def _impl_gf2_gather(self, words: np.ndarray, n_bits: int, index: np.ndarray) -> np.ndarray:
        ...

    @abc.abstractmethod
    def _impl_gf2_flip_bits(self, words: np.ndarray, n_bits: int, positions: np.ndarray) -> None:
        ...

    @abc.abstractmethod
    def _impl_gf2_hamming(self, a: np.ndarray, b: np.ndarray, n_bits: int) -> int:
        ...

    @abc.abstractmethod
    def _impl_poly127_hash(self, data: memoryview, r: int, length: int) -> int:
        ...


# -------------------------------------------------------------- operators both backends take


def _frozen(a: npt.ArrayLike) -> np.ndarray:
    a = np.ascontiguousarray(a, dtype=np.complex128)
    a.setflags(write=False)
    return a


_S2 = 1.0 / math.sqrt(2.0)

#: Standard gates (Nielsen & Chuang section 4.2 and figure 4.2). Two-qubit gates use the
#: apply_2q convention: qubit_a is the more significant index (CNOT's control).
GATES: Mapping[str, np.ndarray] = types.MappingProxyType(
    {
        "I": _frozen(np.eye(2)),
        "X": _frozen([[0, 1], [1, 0]]),
        "Y": _frozen([[0j, -1j], [1j, 0j]]),
        "Z": _frozen([[1, 0], [0, -1]]),
        "H": _frozen(np.array([[1, 1], [1, -1]]) * _S2),
        "S": _frozen([[1 + 0j, 0j], [0j, 1j]]),
        "SDG": _frozen([[1 + 0j, 0j], [0j, -1j]]),
        "T": _frozen([[1 + 0j, 0j], [0j, complex(_S2, _S2)]]),
        "CNOT": _frozen([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1], [0, 0, 1, 0]]),
        "CZ": _frozen(np.diag([1, 1, 1, -1])),
        "SWAP": _frozen([[1, 0, 0, 0], [0, 0, 1, 0], [0, 1, 0, 0], [0, 0, 0, 1]]),
    }
)

_PAULI = {"x": GATES["X"], "y": GATES["Y"], "z": GATES["Z"]}


def rotation(axis: str, theta_rad: float) -> np.ndarray:
    """R_axis(theta) = exp(-i theta P / 2) = cos(theta/2) I - i sin(theta/2) P
    (Nielsen & Chuang eqs. (4.4)-(4.6)); axis is "x", "y" or "z" (any case)."""
    pauli = _PAULI.get(str(axis).lower())
    if pauli is None:
        raise KernelError(f"axis must be 'x', 'y' or 'z', got {axis!r}")
    theta = float(theta_rad)
    if not math.isfinite(theta):
        raise KernelError("theta_rad must be finite")
    return math.cos(theta / 2) * np.eye(2, dtype=np.complex128) - 1j * math.sin(theta / 2) * pauli


def _check_prob(name: str, p: float) -> float:
    value = float(p)
    if not 0.0 <= value <= 1.0:
        raise KernelError(f"{name} must be in [0, 1], got {value}")
    return value


def kraus_depolarizing(p: float) -> np.ndarray:
    """Kraus set (4, 2, 2) of the depolarising channel rho -> (1 - p) rho + p I/2.

    With I/2 = (rho + X rho X + Y rho Y + Z rho Z)/4 for any unit-trace rho, the channel is
    (1 - 3p/4) rho + (p/4)(X rho X + Y rho Y + Z rho Z) (Nielsen & Chuang section 8.3.4).
    Note the convention: p is the probability of replacing the
    state by I/2, not the probability of "an error" (which is 3p/4). p in [0, 1].
    """
    p = _check_prob("p", p)
    return np.stack(
        [
            math.sqrt(1.0 - 0.75 * p) * GATES["I"],
            math.sqrt(p / 4.0) * GATES["X"],
            math.sqrt(p / 4.0) * GATES["Y"],
            math.sqrt(p / 4.0) * GATES["Z"],
        ]
    )


def kraus_dephasing(p: float) -> np.ndarray:
    """Kraus set (2, 2, 2) of the phase-flip channel: Z applied with probability p
    (Nielsen & Chuang section 8.3.3). Off-diagonals shrink by (1 - 2p)."""
    p = _check_prob("p", p)
    return np.stack([math.sqrt(1.0 - p) * GATES["I"], math.sqrt(p) * GATES["Z"]])


def kraus_amplitude_damping(gamma: float) -> np.ndarray:
    """Kraus set (2, 2, 2) of amplitude damping with decay probability gamma
    (Nielsen & Chuang section 8.3.5): E0 = [[1, 0], [0, sqrt(1-g)]],
    E1 = [[0, sqrt(g)], [0, 0]]. For a memory, gamma = 1 - exp(-t / T1)."""
    g = _check_prob("gamma", gamma)
    return np.array(
        [[[1, 0], [0, math.sqrt(1.0 - g)]], [[0, math.sqrt(g)], [0, 0]]], dtype=np.complex128
    )


_KEY_PERSON = b"qnetem-key-v1"


def derive_key(*labels: str | int) -> int:
    """64-bit RNG key from labels, e.g. ``derive_key(seed, "link:alice-bob")``.

    BLAKE2b (RFC 7693) with an 8-byte digest and personalisation "qnetem-key-v1" over an
    unambiguous encoding: each label is a type tag (b"s" str / b"i" int), an 8-byte length
    and its bytes (UTF-8, or the decimal text of the int), so ("ab", "c") and ("a", "bc")
    or 1 and "1" give different keys. Deterministic across runs, platforms and versions.
    """
    if not labels:
        raise KernelError("derive_key needs at least one label")
    h = hashlib.blake2b(digest_size=8, person=_KEY_PERSON)
    for label in labels:
        if isinstance(label, bool) or not isinstance(label, (str, int)):
            raise KernelError(f"derive_key labels must be str or int, got {type(label).__name__}")
        if isinstance(label, str):
            tag, data = b"s", label.encode("utf-8")
        else:
            tag, data = b"i", str(int(label)).encode("ascii")
        h.update(tag + len(data).to_bytes(8, "little") + data)
    return int.from_bytes(h.digest(), "little")
