"""Bell states, Werner / Bell-diagonal two-qubit states and their figures of merit.

Theory of operation: the four Bell states, in the kernels' `BellState` order and in
kron order (qubit 0 is the most significant bit of the basis index), are

    Phi+ = (|00> + |11>)/sqrt2    Phi- = (|00> - |11>)/sqrt2
    Psi+ = (|01> + |10>)/sqrt2    Psi- = (|01> - |10>)/sqrt2

Each Bell projector expands in two-qubit Pauli products as
|B><B| = (II + s_x XX + s_y YY + s_z ZZ)/4 with the signs (s_x, s_y, s_z)
Phi+: (+,-,+), Phi-: (-,+,+), Psi+: (+,+,-), Psi-: (-,-,-) (e.g. Nielsen & Chuang,
Exercise 2.73-style decomposition; checked numerically in tests/unit/test_physics.py),
so the fidelity to |B> follows from three measured correlators.

A Werner state of visibility V is rho = V|B><B| + (1-V) I/4; its fidelity to |B> is
F = V + (1-V)/4 = (1+3V)/4. Its correlation matrix is T = V diag(s_x, s_y, s_z), and by
the Horodecki criterion (R., P. and M. Horodecki, Phys. Lett. A 200, 340 (1995)) the
largest CHSH value over all measurement settings is 2*sqrt(t1^2 + t2^2) for the two
largest singular values t1, t2 of T, i.e. S_max = 2*sqrt(2)*|V| = 2*sqrt(2)*|4F-1|/3.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from emulator.kernels import BellState

from .errors import PhysicsParameterError

__all__ = [
    "BELL_CORRELATION_SIGNS",
    "bell_diagonal_state",
    "bell_fidelity",
    "bell_projector",
    "bell_vector",
    "chsh_werner",
    "fidelity_from_correlations",
    "pauli_correlations",
    "werner_fidelity",
    "werner_state",
    "werner_visibility",
]

_S = 1.0 / math.sqrt(2.0)

# Kron order: index = 2*bit(qubit 0) + bit(qubit 1).
_BELL_VECTORS: tuple[np.ndarray, ...] = (
    np.array([_S, 0.0, 0.0, _S], dtype=np.complex128),  # Phi+
    np.array([_S, 0.0, 0.0, -_S], dtype=np.complex128),  # Phi-
    np.array([0.0, _S, _S, 0.0], dtype=np.complex128),  # Psi+
    np.array([0.0, _S, -_S, 0.0], dtype=np.complex128),  # Psi-
)
for _v in _BELL_VECTORS:
    _v.setflags(write=False)

#: Signs (s_x, s_y, s_z) of <XX>, <YY>, <ZZ> in each Bell state, in BellState order.
BELL_CORRELATION_SIGNS: tuple[tuple[int, int, int], ...] = (
    (+1, -1, +1),  # Phi+
    (-1, +1, +1),  # Phi-
    (+1, +1, -1),  # Psi+
    (-1, -1, -1),  # Psi-
)

_X = np.array([[0, 1], [1, 0]], dtype=np.complex128)
_Y = np.array([[0, -1j], [1j, 0]], dtype=np.complex128)
_Z = np.array([[1, 0], [0, -1]], dtype=np.complex128)
_XX = np.kron(_X, _X)
_YY = np.kron(_Y, _Y)
_ZZ = np.kron(_Z, _Z)


def _bell_index(bell: int) -> int:
    try:
        return int(BellState(bell))
    except ValueError:
        raise PhysicsParameterError(f"not a BellState: {bell!r}") from None


def bell_vector(bell: BellState | int) -> np.ndarray:
    """The state vector (4,) of a Bell state, kron order (read-only view)."""
    return _BELL_VECTORS[_bell_index(bell)]


def bell_projector(bell: BellState | int) -> np.ndarray:
    """|B><B| as a new (4, 4) complex128 array."""
    v = _BELL_VECTORS[_bell_index(bell)]
    return np.outer(v, v.conj())


def _check_unit(name: str, value: float) -> None:
    if not (0.0 <= value <= 1.0):
        raise PhysicsParameterError(f"{name} must be in [0, 1], got {value!r}")


def werner_state(bell: BellState | int, visibility: float) -> np.ndarray:
    """Werner state V|B><B| + (1-V) I/4 around Bell state `bell` (new (4,4) array).

    `visibility` V in [0, 1]; the fidelity to |B> is (1+3V)/4.
    """
    _check_unit("visibility", visibility)
    rho = visibility * bell_projector(bell)
    rho[np.diag_indices(4)] += (1.0 - visibility) / 4.0
    return rho


def bell_diagonal_state(weights: Sequence[float]) -> np.ndarray:
    """sum_i w_i |B_i><B_i| with weights in BellState order (non-negative, sum 1)."""
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (4,) or np.any(w < 0.0) or not math.isclose(float(w.sum()), 1.0, abs_tol=1e-12):
        raise PhysicsParameterError(
            f"Bell-diagonal weights must be 4 probabilities, got {weights!r}"
        )
    rho = np.zeros((4, 4), dtype=np.complex128)
    for wi, v in zip(w, _BELL_VECTORS):
        if wi:
            rho += wi * np.outer(v, v.conj())
    return rho


def bell_fidelity(rho: np.ndarray, bell: BellState | int) -> float:
    """<B| rho |B> for a two-qubit density matrix (kron order)."""
    v = _BELL_VECTORS[_bell_index(bell)]
    return float(np.real(v.conj() @ np.asarray(rho) @ v))


def pauli_correlations(rho: np.ndarray) -> tuple[float, float, float]:
    """(<XX>, <YY>, <ZZ>) = Tr(rho P(x)P) of a two-qubit density matrix."""
    r = np.asarray(rho)
    return (
        float(np.real(np.trace(r @ _XX))),
        float(np.real(np.trace(r @ _YY))),
        float(np.real(np.trace(r @ _ZZ))),
    )


def fidelity_from_correlations(xx: float, yy: float, zz: float, bell: BellState | int) -> float:
    """Fidelity to `bell` from measured correlators: (1 + s_x<XX> + s_y<YY> + s_z<ZZ>)/4.

    # |B><B| = (II + s_x XX + s_y YY + s_z ZZ)/4 (module docstring); exact for any
    # two-qubit state, since F = Tr(rho |B><B|) and Tr(rho II) = 1.
    """
    sx, sy, sz = BELL_CORRELATION_SIGNS[_bell_index(bell)]
    return (1.0 + sx * xx + sy * yy + sz * zz) / 4.0


def werner_fidelity(visibility: float) -> float:
    """F = (1 + 3V)/4 of a Werner state of visibility V."""
    _check_unit("visibility", visibility)
    return (1.0 + 3.0 * visibility) / 4.0


def werner_visibility(fidelity: float) -> float:
    """V = (4F - 1)/3, the inverse of `werner_fidelity` (F in [1/4, 1])."""
    if not (0.25 <= fidelity <= 1.0):
        raise PhysicsParameterError(f"Werner fidelity must be in [1/4, 1], got {fidelity!r}")
    return (4.0 * fidelity - 1.0) / 3.0


def chsh_werner(fidelity: float) -> float:
    """Largest CHSH value of a Werner state of fidelity F: 2*sqrt(2)*|4F-1|/3.

    # Horodecki, Horodecki & Horodecki, Phys. Lett. A 200, 340 (1995): S_max =
    # 2*sqrt(t1^2 + t2^2); for a Werner state T = V*diag(s) so S_max = 2*sqrt(2)*|V|,
    # V = (4F-1)/3. Bell violation (S > 2) iff F > (1 + 3/sqrt2)/4 ~ 0.780.
    F in [0, 1] (a Werner state with F < 1/4 has V < 0, still a valid state for
    V >= -1/3; the modulus keeps S_max correct there).
    """
    _check_unit("fidelity", fidelity)
    return 2.0 * math.sqrt(2.0) * abs(4.0 * fidelity - 1.0) / 3.0
