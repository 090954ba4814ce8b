"""Quantum-memory decoherence: T1 (energy relaxation) and T2 (coherence decay).

Theory of operation (Nielsen & Chuang, "Quantum Computation and Quantum Information",
§8.3.5 amplitude damping, §8.3.6 phase damping): a stored qubit left alone for t
seconds relaxes towards |0> and loses phase coherence. In the density matrix
rho = [[a, b], [b*, 1-a]] this is

    1-a -> (1-a) e^{-t/T1}           (population of |1> decays with T1)
    b   -> b e^{-t/T2}               (coherence decays with T2)

Amplitude damping with gamma = 1 - e^{-t/T1} (N&C §8.3.5, Kraus operators E0, E1)
does the first and also multiplies b by sqrt(1-gamma) = e^{-t/(2 T1)}. The rest of the
coherence decay is pure dephasing: Z applied with probability p multiplies b by 1-2p
(the phase-flip channel of N&C §8.3.3, which §8.3.6 shows is phase damping), with

    1 - 2p = e^{-t/T2} / e^{-t/(2 T1)} = e^{-t/T_phi},   1/T_phi = 1/T2 - 1/(2 T1),

which is a channel (p in [0, 1/2]) only if T2 <= 2 T1 — otherwise no physical process
gives that pair of times, and `MemoryParameterError` is raised. `math.inf` for T1 or
T2 means "no decay of that kind". The composed channel (amplitude damping, then
dephasing) has Kraus operators D_j A_i; the two terms proportional to A_1 (|0><1|)
merge, leaving three:

    K0 = sqrt(1-p) diag(1, sqrt(1-gamma)),  K1 = sqrt(p) diag(1, -sqrt(1-gamma)),
    K2 = [[0, sqrt(gamma)], [0, 0]].

DESIGN.md §3: the broker applies this lazily, with t = emulated time since the qubit
was last updated, whenever the qubit is touched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .errors import MemoryParameterError, PhysicsParameterError

__all__ = [
    "MemoryModel",
    "amplitude_damping_gamma",
    "check_coherence_times",
    "memory_decay_kraus",
    "pure_dephasing_probability",
    "werner_fidelity_after_dephasing",
]

_IDENTITY_KRAUS = np.eye(2, dtype=np.complex128).reshape(1, 2, 2)
_IDENTITY_KRAUS.setflags(write=False)


def check_coherence_times(t1_s: float, t2_s: float) -> None:
    """Raise MemoryParameterError unless 0 < T2 <= 2*T1 (inf allowed for either)."""
    if not (t1_s > 0.0) or not (t2_s > 0.0):  # also rejects NaN
        raise MemoryParameterError(f"T1 and T2 must be > 0, got t1_s={t1_s!r}, t2_s={t2_s!r}")
    # N&C §8.3.6 / module docstring: pure dephasing rate 1/T2 - 1/(2 T1) must be >= 0.
    if t2_s > 2.0 * t1_s:
        raise MemoryParameterError(
            f"T2 must be <= 2*T1 (got t1_s={t1_s!r}, t2_s={t2_s!r}): no physical channel"
        )


def _check_elapsed(elapsed_s: float) -> None:
    if not (elapsed_s >= 0.0 and math.isfinite(elapsed_s)):
        raise PhysicsParameterError(f"elapsed_s must be finite and >= 0, got {elapsed_s!r}")


def amplitude_damping_gamma(elapsed_s: float, t1_s: float) -> float:
    """gamma = 1 - e^{-t/T1} (N&C §8.3.5); 0 for T1 = inf."""
    _check_elapsed(elapsed_s)
    if not (t1_s > 0.0):
        raise MemoryParameterError(f"t1_s must be > 0, got {t1_s!r}")
    return -math.expm1(-elapsed_s / t1_s)


def pure_dephasing_probability(elapsed_s: float, t1_s: float, t2_s: float) -> float:
    """Probability p of the extra Z so that the total coherence decay is e^{-t/T2}.

    1 - 2p = e^{-t/T_phi}, 1/T_phi = 1/T2 - 1/(2 T1) (module docstring).
    """
    _check_elapsed(elapsed_s)
    check_coherence_times(t1_s, t2_s)
    # Clamp: T2 == 2*T1 can leave a -1e-17 rate after rounding.
    rate_phi_per_s = max(0.0, 1.0 / t2_s - 1.0 / (2.0 * t1_s))
    return -math.expm1(-elapsed_s * rate_phi_per_s) / 2.0


def memory_decay_kraus(elapsed_s: float, t1_s: float, t2_s: float) -> np.ndarray:
    """Kraus operators (k, 2, 2), k in 1..3, of T1/T2 decay over `elapsed_s`.

    Returns a new complex128 array, except that when nothing decays (t = 0 or both
    times infinite) it returns a shared read-only (1, 2, 2) identity, which callers
    may skip (`len(kraus) == 1`).
    """
    gamma = amplitude_damping_gamma(elapsed_s, t1_s)
    p = pure_dephasing_probability(elapsed_s, t1_s, t2_s)
    if gamma == 0.0 and p == 0.0:
        return _IDENTITY_KRAUS
    keep = math.sqrt(1.0 - gamma)
    ops = [np.array([[math.sqrt(1.0 - p), 0.0], [0.0, math.sqrt(1.0 - p) * keep]])]
    if p > 0.0:
        ops.append(np.array([[math.sqrt(p), 0.0], [0.0, -math.sqrt(p) * keep]]))
    if gamma > 0.0:
        ops.append(np.array([[0.0, math.sqrt(gamma)], [0.0, 0.0]]))
    return np.ascontiguousarray(np.stack(ops), dtype=np.complex128)


@dataclass(frozen=True, slots=True)
class MemoryModel:
    """A memory's coherence times, validated once (0 < T2 <= 2*T1; inf = no decay)."""

    t1_s: float = math.inf
    t2_s: float = math.inf

    def __post_init__(self) -> None:
        check_coherence_times(self.t1_s, self.t2_s)

    @property
    def is_ideal(self) -> bool:
        return math.isinf(self.t1_s) and math.isinf(self.t2_s)

    def kraus(self, elapsed_s: float) -> np.ndarray:
        """`memory_decay_kraus(elapsed_s, t1_s, t2_s)`."""
        return memory_decay_kraus(elapsed_s, self.t1_s, self.t2_s)


def werner_fidelity_after_dephasing(visibility: float, elapsed_s: float, t2_s: float) -> float:
    """Bell fidelity of a Werner pair after BOTH qubits dephase for `elapsed_s` (T1 = inf).

    F(t) = (1 + V + 2 V e^{-2t/T2}) / 4.

    Derivation. The Werner state is rho = V|B><B| + (1-V) I/4 for a Bell state B. With
    T1 = inf the channel on each qubit is pure dephasing, which leaves populations alone
    and multiplies each off-diagonal element |a><a'| (a != a') by c = e^{-t/T2}. On two
    qubits, |ab><a'b'| picks up c^{[a!=a']} c^{[b!=b']}. I/4 is diagonal, so it is
    unchanged. |B><B| has two diagonal entries 1/2 (|00>,|11> for Phi; |01>,|10> for Psi)
    and the coherences +-1/2 between them, which flip BOTH bits, so they become +-c^2/2.
    Hence <B|channel(|B><B|)|B> = (1/2)(1/2 + 1/2 + 2 c^2/2) = (1 + c^2)/2, and
    <B|I/4|B> = 1/4, giving F = V(1+c^2)/2 + (1-V)/4 = (1 + V + 2 V c^2)/4.
    Checks: t = 0 gives (1+3V)/4 (the Werner fidelity); t -> inf gives (1+V)/4.
    """
    if not (0.0 <= visibility <= 1.0):
        raise PhysicsParameterError(f"visibility must be in [0, 1], got {visibility!r}")
    _check_elapsed(elapsed_s)
    if not (t2_s > 0.0):
        raise MemoryParameterError(f"t2_s must be > 0, got {t2_s!r}")
    c2 = math.exp(-2.0 * elapsed_s / t2_s)
    return (1.0 + visibility + 2.0 * visibility * c2) / 4.0
