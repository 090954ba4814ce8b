"""Typed layer over the compiled module ``emulator._cext`` (the ``"c"`` backend).

Theory of operation
-------------------
This is the only module that touches ``emulator._cext``. :class:`CBackend` inherits the
argument checks of :class:`~emulator.kernels._types.CheckedBackend`, so by the time an
``_impl_*`` method runs, every array is C-contiguous complex128 of the right shape and
every index is in range. Each method wraps the numpy buffers with ``ffi.from_buffer``
(no copy), calls one ``qnetem_*`` function and turns a negative status into
:class:`KernelError`. cffi releases the GIL around each call.

The module is loaded lazily, on the first ``CBackend()`` (``get_backend("c")``), never at
import time: ``import emulator.kernels`` works without a compiled module, and the numpy
backend stays usable. Loading checks the version stamped into the module against
``emulator.__version__``, and the digest of the C sources against `cext/` when the
sources sit beside the package, and refuses a stale build with :class:`KernelBuildError`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ._digest import source_digest
from ._optics_c import COpticsMixin
from ._types import Basis, CheckedBackend, KernelBuildError, KernelError

__all__ = ["CBackend", "load_cext"]

_REBUILD_HINT = (
    "rebuild it from the repository root with `pip install -e .` "
    "(or `python cext/build_cext.py` for an in-place rebuild), "
    "or select the numpy backend with QNETEM_BACKEND=numpy"
)

# enum qnetem_status in cext/qnetem.h
_STATUS: dict[int, str] = {
    -1: "a required pointer is NULL",
    -2: "n_qubits out of range",
    -3: "qubit index out of range",
    -4: "qubit indices must differ",
    -5: "unknown basis",
    -6: "argument out of its domain",
    -7: "measurement outcome has zero weight: cannot renormalise",
}


def load_cext() -> tuple[Any, Any]:
    """(ffi, lib) of ``emulator._cext`` after the version check; raises KernelBuildError."""
    try:
        from emulator import _cext  # type: ignore[attr-defined]
    except ImportError as exc:
        raise KernelBuildError(
            f"the compiled module emulator._cext cannot be imported ({exc}); {_REBUILD_HINT}"
        ) from exc
    import emulator

    built = _cext.ffi.string(_cext.lib.qnetem_version()).decode("ascii", "replace")
    if built != emulator.__version__:
        raise KernelBuildError(
            f"emulator._cext was built for qnetem {built} but the package is "
            f"{emulator.__version__} (stale build); {_REBUILD_HINT}"
        )
    check_source_digest(_cext.ffi.string(_cext.lib.qnetem_source_digest()).decode("ascii", "replace"))
    return _cext.ffi, _cext.lib


def check_source_digest(built_digest: str, cext_dir: Path | None = None) -> None:
    """Refuse a module compiled from other C sources than those beside the package.

    Only a development checkout or an editable install has `cext/` next to `emulator/`;
    an installed wheel has no sources to compare with, and the check is skipped.
    """
    if cext_dir is None:
        cext_dir = Path(__file__).resolve().parents[2] / "cext"
    if not (cext_dir / "build_cext.py").is_file():
        return
    current = source_digest(cext_dir)
    if current != built_digest:
        raise KernelBuildError(
            f"emulator._cext was compiled from other C sources than {cext_dir} holds "
            f"(digest {built_digest}, sources now {current}: stale build); {_REBUILD_HINT}"
        )


_LOW64 = (1 << 64) - 1


def _check(rc: int, function: str) -> None:
    if rc != 0:
        raise KernelError(f"{function} failed: {_STATUS.get(rc, 'unknown status')} (status {rc})")


class CBackend(COpticsMixin, CheckedBackend):
    """Backend calling the C99 kernels of cext/ (see cext/qnetem.h for their contracts)."""

    name = "c"

    def __init__(self) -> None:
        self._ffi, self._lib = load_cext()

    def _c128(self, arr: np.ndarray, *, writable: bool = False) -> Any:
        return self._ffi.from_buffer("qnetem_c128[]", arr, require_writable=writable)

    def _impl_apply_1q(self, rho: np.ndarray, n: int, q: int, u: np.ndarray) -> None:
        rc = self._lib.qnetem_apply_1q(self._c128(rho, writable=True), n, q, self._c128(u))
        _check(rc, "qnetem_apply_1q")

    def _impl_apply_2q(self, rho: np.ndarray, n: int, qa: int, qb: int, u: np.ndarray) -> None:
        rc = self._lib.qnetem_apply_2q(self._c128(rho, writable=True), n, qa, qb, self._c128(u))
        _check(rc, "qnetem_apply_2q")

    def _impl_apply_kraus_1q(self, rho: np.ndarray, n: int, q: int, kraus: np.ndarray) -> None:
        rc = self._lib.qnetem_apply_kraus_1q(
            self._c128(rho, writable=True), n, q, self._c128(kraus), kraus.shape[0]
        )
        _check(rc, "qnetem_apply_kraus_1q")

    def _impl_probability(self, rho: np.ndarray, n: int, q: int, basis: Basis) -> float:
        p0 = self._ffi.new("double *")
        _check(self._lib.qnetem_probability(self._c128(rho), n, q, int(basis), p0), "qnetem_probability")
        return float(p0[0])

    def _impl_measure(self, rho: np.ndarray, n: int, q: int, basis: Basis, r: float) -> tuple[int, float]:
        outcome = self._ffi.new("int *")
        prob = self._ffi.new("double *")
        rc = self._lib.qnetem_measure(self._c128(rho, writable=True), n, q, int(basis), r, outcome, prob)
        _check(rc, "qnetem_measure")
        return int(outcome[0]), float(prob[0])

    def _impl_measure_batch(
        self, rhos: np.ndarray, n: int, qubits: np.ndarray, bases: np.ndarray, rs: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        count = rhos.shape[0]
        outcomes = np.empty(count, dtype=np.intc)
        probs = np.empty(count, dtype=np.float64)
        rest = None if n == 1 else np.empty((count, 1 << (n - 1), 1 << (n - 1)), dtype=np.complex128)
        if count:
            ffi = self._ffi
            rc = self._lib.qnetem_measure_batch(
                self._c128(rhos, writable=True), n, count,
                ffi.from_buffer("int[]", qubits), ffi.from_buffer("int[]", bases),
                ffi.from_buffer("double[]", rs),
                ffi.from_buffer("int[]", outcomes, require_writable=True),
                ffi.from_buffer("double[]", probs, require_writable=True),
                ffi.NULL if rest is None else self._c128(rest, writable=True),
            )  # fmt: skip
            _check(rc, "qnetem_measure_batch")
        return outcomes.astype(np.uint8), probs, rest

    def _impl_partial_trace(self, rho: np.ndarray, n: int, remove: tuple[int, ...]) -> np.ndarray:
        dk = 1 << (n - len(remove))
        out = np.empty((dk, dk), dtype=np.complex128)
        qubits = self._ffi.new("int[]", list(remove)) if remove else self._ffi.NULL
        rc = self._lib.qnetem_partial_trace(
            self._c128(rho), n, qubits, len(remove), self._c128(out, writable=True)
        )
        _check(rc, "qnetem_partial_trace")
        return out

    def _impl_tensor(self, a: np.ndarray, na: int, b: np.ndarray, nb: int) -> np.ndarray:
        d = 1 << (na + nb)
        out = np.empty((d, d), dtype=np.complex128)
        rc = self._lib.qnetem_tensor(self._c128(a), na, self._c128(b), nb, self._c128(out, writable=True))
        _check(rc, "qnetem_tensor")
        return out

    def _impl_bell_fidelities(self, rho: np.ndarray, n: int, qa: int, qb: int) -> np.ndarray:
        out = np.empty(4, dtype=np.float64)
        rc = self._lib.qnetem_bell_fidelities(
            self._c128(rho), n, qa, qb, self._ffi.from_buffer("double[]", out, require_writable=True)
        )
        _check(rc, "qnetem_bell_fidelities")
        return out

    def _impl_rng_u64(self, key: int, stream: int, start: int, count: int) -> np.ndarray:
        out = np.empty(count, dtype=np.uint64)
        if count:
            buf = self._ffi.from_buffer("uint64_t[]", out, require_writable=True)
            _check(self._lib.qnetem_rng_u64(key, stream, start, count, buf), "qnetem_rng_u64")
        return out

    def _impl_rng_uniform(self, key: int, stream: int, start: int, count: int) -> np.ndarray:
        out = np.empty(count, dtype=np.float64)
        if count:
            buf = self._ffi.from_buffer("double[]", out, require_writable=True)
            _check(self._lib.qnetem_rng_uniform(key, stream, start, count, buf), "qnetem_rng_uniform")
        return out

    # --- GF(2) on bit-packed keys (cext/qnetem_gf2.c) --------------------------------
    def _u64(self, arr: np.ndarray, *, writable: bool = False) -> Any:
        return self._ffi.from_buffer("uint64_t[]", arr, require_writable=writable)

    def _i64(self, arr: np.ndarray) -> Any:
        return self._ffi.from_buffer("int64_t[]", arr)

    def _impl_gf2_pack(self, bits: np.ndarray) -> np.ndarray:
        n = bits.shape[0]
        out = np.empty((n + 63) // 64, dtype=np.uint64)
        if n:
            rc = self._lib.qnetem_gf2_pack(
                self._ffi.from_buffer("uint8_t[]", bits), n, self._u64(out, writable=True)
            )
            if rc == -6:
                raise KernelError("bits must hold only 0 and 1")
            _check(rc, "qnetem_gf2_pack")
        return out

    def _impl_gf2_unpack(self, words: np.ndarray, n_bits: int) -> np.ndarray:
        out = np.empty(n_bits, dtype=np.uint8)
        if n_bits:
            rc = self._lib.qnetem_gf2_unpack(
                self._u64(words), n_bits, self._ffi.from_buffer("uint8_t[]", out, require_writable=True)
            )
            _check(rc, "qnetem_gf2_unpack")
        return out

    def _impl_gf2_parity_range(self, words: np.ndarray, n_bits: int, start: int, stop: int) -> int:
        if start == stop:
            return 0
        parity = self._ffi.new("int *")
        _check(self._lib.qnetem_gf2_parity_range(self._u64(words), n_bits, start, stop, parity),
               "qnetem_gf2_parity_range")  # fmt: skip
        return int(parity[0])

    def _impl_gf2_parities_ranges(
        self, words: np.ndarray, n_bits: int, starts: np.ndarray, stops: np.ndarray
    ) -> np.ndarray:
        count = starts.shape[0]
        out = np.empty(count, dtype=np.uint8)
        if count:
            rc = self._lib.qnetem_gf2_parities_ranges(
                self._u64(words) if words.size else self._ffi.NULL, n_bits,
                self._i64(starts), self._i64(stops), count,
                self._ffi.from_buffer("uint8_t[]", out, require_writable=True),
            )  # fmt: skip
            _check(rc, "qnetem_gf2_parities_ranges")
        return out

    def _impl_gf2_parities_indexed(
        self, words: np.ndarray, n_bits: int, index: np.ndarray, starts: np.ndarray, stops: np.ndarray
    ) -> np.ndarray:
        count = starts.shape[0]
        out = np.empty(count, dtype=np.uint8)
        if count:
            ffi = self._ffi
            rc = self._lib.qnetem_gf2_parities_indexed(
                self._u64(words) if words.size else ffi.NULL, n_bits,
                self._i64(index) if index.size else ffi.NULL, index.shape[0],
                self._i64(starts), self._i64(stops), count,
                ffi.from_buffer("uint8_t[]", out, require_writable=True),
            )  # fmt: skip
            if rc == -6:
                raise KernelError(f"index entries read by the ranges must lie in [0, {n_bits})")
            _check(rc, "qnetem_gf2_parities_indexed")
        return out

    def _impl_gf2_gather(self, words: np.ndarray, n_bits: int, index: np.ndarray) -> np.ndarray:
        n_out = index.shape[0]
        out = np.empty((n_out + 63) // 64, dtype=np.uint64)
        if n_out:
            rc = self._lib.qnetem_gf2_gather(
                self._u64(words), n_bits, self._i64(index), n_out, self._u64(out, writable=True)
            )
            _check(rc, "qnetem_gf2_gather")
        return out

    def _impl_gf2_flip_bits(self, words: np.ndarray, n_bits: int, positions: np.ndarray) -> None:
        if positions.size:
            rc = self._lib.qnetem_gf2_flip_bits(
                self._u64(words, writable=True), n_bits, self._i64(positions), positions.shape[0]
            )
            _check(rc, "qnetem_gf2_flip_bits")

    def _impl_gf2_hamming(self, a: np.ndarray, b: np.ndarray, n_bits: int) -> int:
        distance = self._ffi.new("uint64_t *")
        if n_bits == 0:
            return 0
        _check(self._lib.qnetem_gf2_hamming(self._u64(a), self._u64(b), n_bits, distance), "qnetem_gf2_hamming")
        return int(distance[0])

    # --- polynomial hash over GF(2^127 - 1) (cext/qnetem_polyhash.c) ------------------
    def _impl_poly127_hash(self, data: memoryview, r: int, length: int) -> int:
        ffi = self._ffi
        out = ffi.new("uint64_t[2]")
        n = data.nbytes
        buf = ffi.from_buffer("uint8_t[]", data) if n else ffi.NULL
        rc = self._lib.qnetem_poly127_hash(buf, n, r & _LOW64, r >> 64, length, out)
        _check(rc, "qnetem_poly127_hash")
        return int(out[0]) | (int(out[1]) << 64)
