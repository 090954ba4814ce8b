"""Heralded entanglement generation between two quantum memories over fibre.

Theory of operation: two nodes A and B, L km apart, each entangle a memory qubit with a
photon and send the photon L/2 km to a beam-splitter station at the midpoint. Detector
clicks at the station herald the memories in a Bell state; the station's answer travels
L/2 km back. An attempt therefore takes T = L/2 (photon) + L/2 (herald) of flight time,
T = L * FIBRE_DELAY_S_PER_KM, and attempts repeat until one succeeds, so the number of
attempts per pair is geometric (at least one) with the per-attempt success probability p.

Each photon reaches a station detector with probability
eta = transmittance(L/2) * detector_efficiency.

Double click (Barrett & Kok, PRA 71, 060310(R) (2005)): each memory emits one photon,
both must be detected (once in each of two rounds, with a pi pulse between them), so
p = eta^2 / 2 (the 1/2: a success projects the two memories, each prepared in
(|0> + |1>)/sqrt2, onto the one-excitation subspace {|01>, |10>} of weight 1/2).
The two detector patterns herald Psi+ or Psi- with equal probability. With
imperfect two-photon interference (visibility V) we model the pair as the Werner state
V|Psi><Psi| + (1-V) I/4, fidelity (1+3V)/4.

Single click (Cabrillo et al., PRA 59, 1025 (1999); Humphreys et al., Nature 558, 268
(2018), Methods; Hermans et al., Nature 605, 663 (2022), Methods): each memory is
prepared in sqrt(1-alpha)|0> + sqrt(alpha)|1>, only |1> (the bright state) emits, and
a single click at the station heralds the pair. To first order in alpha*eta,
p = 2*alpha*eta. The herald is Psi+ or Psi- (which detector clicked) with equal
probability; the state is
    rho = (1-alpha) [ (1+V)/2 |Psi+-><Psi+-| + (1-V)/2 |Psi-+><Psi-+| ] + alpha |11><11|,
where |11><11| is the case that both memories emitted and one photon was lost, and V
is the visibility of the single-photon interference (the phase coherence of the
heralded superposition); fidelity F = (1-alpha)(1+V)/2. Alpha trades rate (p grows
with alpha) for fidelity (F falls with alpha).

All functions are pure; sampling takes a seeded numpy Generator.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

import numpy as np

from emulator.kernels import BellState

from .bell import bell_projector, werner_state
from .constants import DEFAULT_ATTENUATION_DB_PER_KM, FIBRE_DELAY_S_PER_KM
from .errors import PhysicsParameterError
from .fibre import transmittance

__all__ = [
    "HeraldingModel",
    "HeraldingScheme",
    "double_click_model",
    "sample_attempts",
    "sample_heralded_bells",
    "single_click_model",
    "single_click_state",
]

_PSI_FAMILY = (BellState.PSI_PLUS, BellState.PSI_MINUS)
# Z on qubit 0 (kron order): maps Psi+ <-> Psi- and Phi+ <-> Phi-, leaves |11><11| alone.
_Z_I = np.diag(np.array([1.0, 1.0, -1.0, -1.0], dtype=np.complex128))


class HeraldingScheme(enum.Enum):
    SINGLE_CLICK = "single-click"
    DOUBLE_CLICK = "double-click"


@dataclass(frozen=True, slots=True)
class HeraldingModel:
    """Per-attempt physics of one heralded link (see the module docstring).

    `state` is the two-qubit density matrix (kron order, node A's qubit first) that a
    herald of `bells[0]` leaves in the memories; `state_for(bell)` gives it for any
    herald in `bells`. Every herald in `bells` is equally likely and has the same
    fidelity `fidelity` to its own Bell state. `state` is read-only.
    """

    scheme: HeraldingScheme
    length_km: float
    p_success: float
    attempt_period_s: float
    bells: tuple[BellState, ...]
    state: np.ndarray = field(compare=False, repr=False)
    fidelity: float
    arm_efficiency: float
    visibility: float
    bright_state_population: float = 0.0

    @property
    def pair_rate_hz(self) -> float:
        """Mean heralded pairs per second, p / T (inf for a zero-length link, where T = 0)."""
        if self.attempt_period_s == 0.0:
            return math.inf
        return self.p_success / self.attempt_period_s

    def state_for(self, bell: BellState | int) -> np.ndarray:
        """A new (4,4) array: the state heralded as `bell` (one of `bells`)."""
        if bell == self.bells[0]:
            return self.state.copy()
        if bell in self.bells:
            # The partner herald differs by a Z on one memory (a phase flip of the
            # |01> - |10> coherence); Z(x)I maps the whole heralded mixture over.
            return _Z_I @ self.state @ _Z_I
        raise PhysicsParameterError(f"{self.scheme.value} does not herald {bell!r}")


def _check_unit(name: str, value: float, *, open_low: bool = False) -> None:
    low_ok = value > 0.0 if open_low else value >= 0.0
    if not (low_ok and value <= 1.0):
        bracket = "(0, 1]" if open_low else "[0, 1]"
        raise PhysicsParameterError(f"{name} must be in {bracket}, got {value!r}")


def _arm_efficiency(
    length_km: float, detector_efficiency: float, attenuation_db_per_km: float
) -> float:
    _check_unit("detector_efficiency", detector_efficiency)
    # Each arm is half the link: the station sits at the midpoint.
    return transmittance(length_km / 2.0, attenuation_db_per_km) * detector_efficiency


def double_click_model(
    length_km: float,
    *,
    detector_efficiency: float = 1.0,
    visibility: float = 1.0,
    attenuation_db_per_km: float = DEFAULT_ATTENUATION_DB_PER_KM,
) -> HeraldingModel:
    """Barrett-Kok double-click scheme over a link of `length_km` (midpoint station)."""
    eta = _arm_efficiency(length_km, detector_efficiency, attenuation_db_per_km)
    state = werner_state(BellState.PSI_PLUS, visibility)
    state.setflags(write=False)
    return HeraldingModel(
        scheme=HeraldingScheme.DOUBLE_CLICK,
        length_km=length_km,
        # Barrett & Kok 2005: both photons detected (eta^2), projection onto the
        # one-excitation (Psi) subspace of weight 1/2.
        p_success=eta * eta / 2.0,
        # Photon to the midpoint (L/2) + herald back (L/2).
        attempt_period_s=length_km * FIBRE_DELAY_S_PER_KM,
        bells=_PSI_FAMILY,
        state=state,
        fidelity=(1.0 + 3.0 * visibility) / 4.0,
        arm_efficiency=eta,
        visibility=visibility,
    )


def single_click_state(
    bell: BellState | int, bright_state_population: float, visibility: float
) -> np.ndarray:
    """The single-click heralded state (new (4,4) array) for a Psi+ or Psi- herald.

    # Humphreys et al., Nature 558, 268 (2018), Methods; Hermans et al., Nature 605,
    # 663 (2022), Methods: rho = (1-a)[(1+V)/2 |Psi+-><Psi+-| + (1-V)/2 |Psi-+><Psi-+|]
    #                            + a |11><11|.
    """
    if bell not in _PSI_FAMILY:
        raise PhysicsParameterError(f"the single-click scheme heralds Psi+ or Psi-, not {bell!r}")
    _check_unit("bright_state_population", bright_state_population)
    _check_unit("visibility", visibility)
    a = bright_state_population
    partner = BellState(int(bell) ^ 1)  # Psi+ <-> Psi- (BellState order 2 <-> 3)
    rho = (1.0 - a) * (
        (1.0 + visibility) / 2.0 * bell_projector(bell)
        + (1.0 - visibility) / 2.0 * bell_projector(partner)
    )
    rho[3, 3] += a
    return rho


def single_click_model(
    length_km: float,
    bright_state_population: float,
    *,
    detector_efficiency: float = 1.0,
    visibility: float = 1.0,
    attenuation_db_per_km: float = DEFAULT_ATTENUATION_DB_PER_KM,
) -> HeraldingModel:
    """Single-click scheme with bright-state population alpha in (0, 1/2].

    alpha above 1/2 is outside the model (F = (1-alpha)(1+V)/2 <= 1/2: no entanglement
    is certified and p = 2*alpha*eta stops being a first-order approximation).
    """
    if not (0.0 < bright_state_population <= 0.5):
        raise PhysicsParameterError(
            f"bright_state_population must be in (0, 0.5], got {bright_state_population!r}"
        )
    eta = _arm_efficiency(length_km, detector_efficiency, attenuation_db_per_km)
    state = single_click_state(BellState.PSI_PLUS, bright_state_population, visibility)
    state.setflags(write=False)
    return HeraldingModel(
        scheme=HeraldingScheme.SINGLE_CLICK,
        length_km=length_km,
        # Humphreys et al. 2018, Methods: p ~ 2 * alpha * eta (either node's photon
        # gives the single click; first order in alpha*eta).
        p_success=2.0 * bright_state_population * eta,
        attempt_period_s=length_km * FIBRE_DELAY_S_PER_KM,
        bells=_PSI_FAMILY,
        state=state,
        fidelity=(1.0 - bright_state_population) * (1.0 + visibility) / 2.0,
        arm_efficiency=eta,
        visibility=visibility,
        bright_state_population=bright_state_population,
    )


def sample_attempts(rng: np.random.Generator, p_success: float, n_pairs: int) -> np.ndarray:
    """Attempts needed for each of `n_pairs` pairs: i.i.d. geometric on {1, 2, ...}.

    P(k) = (1-p)^(k-1) p, mean 1/p. Returns int64 array of shape (n_pairs,).
    """
    _check_unit("p_success", p_success, open_low=True)
    if n_pairs < 0:
        raise PhysicsParameterError(f"n_pairs must be >= 0, got {n_pairs!r}")
    return rng.geometric(p_success, size=n_pairs).astype(np.int64, copy=False)


def sample_heralded_bells(
    rng: np.random.Generator, model: HeraldingModel, n_pairs: int
) -> np.ndarray:
    """Which Bell state each of `n_pairs` heralds announced (uniform over model.bells).

    Returns int8 array of BellState values.
    """
    if n_pairs < 0:
        raise PhysicsParameterError(f"n_pairs must be >= 0, got {n_pairs!r}")
    choices = np.asarray([int(b) for b in model.bells], dtype=np.int8)
    return choices[rng.integers(0, len(choices), size=n_pairs)]
