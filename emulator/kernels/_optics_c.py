"""The optics kernels of the ``"c"`` backend: cffi calls into cext/qnetem_optics.c.

Theory of operation: :class:`COpticsMixin` is mixed into ``CBackend`` (which provides
``self._ffi`` and ``self._lib``). Arguments arrive validated by
:class:`~emulator.kernels._optics.OpticsChecked`; the model's tables are numpy arrays
handed to C by pointer (``ffi.from_buffer``, no copy) inside one ``qnetem_optics_model``
struct, kept alive for the duration of the call. Output columns are preallocated to
`capacity` rows and cut to the count C reports.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._optics import ChoiceThresholds, Detections, OpticsChecked, OpticsCursor, OpticsModel, PulseChoices
from ._types import KernelError

__all__ = ["COpticsMixin"]

_BYTE_COLUMNS = ("bob_basis", "outcome", "double_click", "photons", "alice_class", "alice_basis", "alice_bit", "eve")
_STATUS = {-1: "a required pointer is NULL", -6: "argument out of its domain (model tables or window)"}


def _check(rc: int, function: str) -> None:
    if rc != 0:
        raise KernelError(f"{function} failed: {_STATUS.get(rc, 'unknown status')} (status {rc})")


class COpticsMixin(OpticsChecked):
    """Optics kernels of the C backend."""

    _ffi: Any
    _lib: Any

    def _choice_struct(self, t: ChoiceThresholds) -> Any:
        c = self._ffi.new("qnetem_optics_choice *")
        c.signal, c.signal_or_decoy, c.basis_z = t.signal, t.signal_or_decoy, t.basis_z
        return c

    def _impl_optics_choices(
        self, alice_key: int, indices: np.ndarray, thresholds: ChoiceThresholds
    ) -> PulseChoices:
        n = indices.shape[0]
        cls, basis, bit = (np.empty(n, dtype=np.uint8) for _ in range(3))
        if n:
            ffi = self._ffi
            rc = self._lib.qnetem_optics_choices(
                alice_key, ffi.from_buffer("uint64_t[]", indices), n, self._choice_struct(thresholds),
                ffi.from_buffer("uint8_t[]", cls, require_writable=True),
                ffi.from_buffer("uint8_t[]", basis, require_writable=True),
                ffi.from_buffer("uint8_t[]", bit, require_writable=True),
            )  # fmt: skip
            _check(rc, "qnetem_optics_choices")
        return PulseChoices(cls, basis, bit)

    def _impl_optics_sample(
        self, model: OpticsModel, cursor: OpticsCursor, end: int, capacity: int
    ) -> tuple[Detections, OpticsCursor]:
        ffi = self._ffi
        keep: list[Any] = []  # buffers referenced by the struct must outlive the call

        def buf(ctype: str, arr: np.ndarray, writable: bool = False) -> Any:
            if arr.size == 0:
                return ffi.NULL
            b = ffi.from_buffer(ctype, arr, require_writable=writable)
            keep.append(b)
            return b

        m = ffi.new("qnetem_optics_model *")
        m.alice_key = model.alice_key
        m.choice = {"signal": model.choice.signal, "signal_or_decoy": model.choice.signal_or_decoy,
                    "basis_z": model.choice.basis_z}  # fmt: skip
        m.channel_key = model.channel_key
        m.bob_basis_z = model.bob_basis_z
        m.dead_slots = model.parameters.dead_slots
        m.has_candidates = 1 if model.p_max > 0.0 else 0
        m.log1m_p_max = model.log1m_p_max if model.p_max > 0.0 else -1.0
        m.intercept_fraction = model.parameters.eve.intercept_fraction
        m.pns = 1 if model.parameters.eve.pns else 0
        m.accept = model.accept.tolist()
        m.kind_start = model.kind_start.tolist()
        m.entry_cdf = buf("double[]", model.entry_cdf)
        m.entry_photons = buf("uint8_t[]", model.entry_photons)
        m.entry_flags = buf("uint8_t[]", model.entry_flags)
        m.entry_pattern = buf("double[]", model.entry_pattern)
        m.n_entries = model.entry_cdf.shape[0]

        cur = ffi.new("qnetem_optics_cursor *")
        cur.ordinal, cur.position, cur.dead_until = cursor.ordinal, cursor.position, cursor.dead_until
        det = Detections.empty(capacity)
        out = ffi.new("qnetem_optics_out *")
        out.pulse = buf("uint64_t[]", det.pulse, True)
        for name in _BYTE_COLUMNS:
            setattr(out, name, buf("uint8_t[]", getattr(det, name), True))
        count = ffi.new("size_t *")
        _check(self._lib.qnetem_optics_sample(m, cur, end, capacity, out, count), "qnetem_optics_sample")
        n = int(count[0])
        result = det if n == capacity else Detections(*(a[:n].copy() for a in _columns(det)))
        return result, OpticsCursor(int(cur.ordinal), int(cur.position), int(cur.dead_until))


def _columns(det: Detections) -> tuple[np.ndarray, ...]:
    return (det.pulse, det.bob_basis, det.outcome, det.double_click, det.photons,
            det.alice_class, det.alice_basis, det.alice_bit, det.eve)  # fmt: skip
