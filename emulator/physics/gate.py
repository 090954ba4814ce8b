"""Gate noise: a gate of average fidelity F modelled as ideal gate + depolarisation.

Theory of operation: the d-dimensional depolarising channel
D_p(rho) = (1 - p) rho + p I/d (N&C §8.3.4 for d = 2) has entanglement fidelity
F_e = (1 - p) + p/d^2 (the maximally entangled probe survives with 1 - p, and I/d
overlaps it with 1/d^2). Average gate fidelity over Haar-random pure inputs relates to
F_e by F_avg = (d F_e + 1)/(d + 1) (M. Horodecki, P. Horodecki, R. Horodecki, PRA 60,
1888 (1999); M. A. Nielsen, Phys. Lett. A 303, 249 (2002), eq. (3)). Substituting,

    F_avg = (d - d p + p/d + 1)/(d + 1) = 1 - p (d^2 - 1)/(d (d + 1)) = 1 - p (d - 1)/d,

so a gate with measured F_avg is modelled as the ideal unitary followed by D_p with
p = d (1 - F_avg)/(d - 1): p = 2(1 - F) for one qubit (d = 2), p = 4(1 - F)/3 for two
qubits (d = 4). (Since D_p commutes with unitaries, before or after does not matter.)
p in [0, 1] covers F_avg in [1/d, 1].
"""

from __future__ import annotations

from .errors import PhysicsParameterError

__all__ = ["average_gate_fidelity", "gate_depolarizing_probability"]


def _dimension(n_qubits: int) -> int:
    if n_qubits < 1:
        raise PhysicsParameterError(f"n_qubits must be >= 1, got {n_qubits!r}")
    return 2**n_qubits


def gate_depolarizing_probability(average_gate_fidelity: float, n_qubits: int = 1) -> float:
    """p = d (1 - F_avg)/(d - 1), d = 2**n_qubits, for D_p(rho) = (1-p) rho + p I/d.

    # Nielsen, Phys. Lett. A 303, 249 (2002), eq. (3) with F_e = 1 - p + p/d^2.
    """
    d = _dimension(n_qubits)
    if not (1.0 / d <= average_gate_fidelity <= 1.0):
        raise PhysicsParameterError(
            f"average gate fidelity of a {n_qubits}-qubit gate must be in [1/{d}, 1], "
            f"got {average_gate_fidelity!r}"
        )
    return d * (1.0 - average_gate_fidelity) / (d - 1)


def average_gate_fidelity(depolarizing_probability: float, n_qubits: int = 1) -> float:
    """F_avg = 1 - p (d - 1)/d, the inverse of gate_depolarizing_probability."""
    d = _dimension(n_qubits)
    if not (0.0 <= depolarizing_probability <= 1.0):
        raise PhysicsParameterError(
            f"depolarizing_probability must be in [0, 1], got {depolarizing_probability!r}"
        )
    return 1.0 - depolarizing_probability * (d - 1) / d
