"""Fibre channel: loss and propagation delay.

Theory of operation: attenuation in fibre is quoted in dB/km, so a span of L km with
attenuation alpha dB/km loses alpha*L dB and transmits the fraction
eta = 10^(-alpha*L/10) of the photons (Beer-Lambert law in decibels; the same
expression is the channel transmittance t_AB of Ma et al., PRA 72, 012326 (2005),
Sec. II). Each photon is lost independently, so eta is also the probability that one
photon survives the span. Light travels at c/n_g in the fibre, i.e.
FIBRE_DELAY_S_PER_KM (4.9 us) per kilometre (DESIGN.md §3).
"""

from __future__ import annotations

import math

from .constants import DEFAULT_ATTENUATION_DB_PER_KM, FIBRE_DELAY_S_PER_KM
from .errors import PhysicsParameterError

__all__ = ["loss_db", "propagation_delay_s", "transmittance"]


def _check_length(length_km: float) -> None:
    if not (length_km >= 0.0 and math.isfinite(length_km)):
        raise PhysicsParameterError(f"length_km must be finite and >= 0, got {length_km!r}")


def loss_db(
    length_km: float, attenuation_db_per_km: float = DEFAULT_ATTENUATION_DB_PER_KM
) -> float:
    """Total loss in dB of a span: alpha * L."""
    _check_length(length_km)
    if not (attenuation_db_per_km >= 0.0 and math.isfinite(attenuation_db_per_km)):
        raise PhysicsParameterError(
            f"attenuation_db_per_km must be finite and >= 0, got {attenuation_db_per_km!r}"
        )
    return attenuation_db_per_km * length_km


def transmittance(
    length_km: float, attenuation_db_per_km: float = DEFAULT_ATTENUATION_DB_PER_KM
) -> float:
    """Probability that a photon survives `length_km` of fibre: 10^(-alpha*L/10).

    # Ma et al., PRA 72, 012326 (2005), Sec. II: t_AB = 10^(-alpha*l/10).
    50 km at 0.2 dB/km is 10 dB, i.e. 0.1.
    """
    return 10.0 ** (-loss_db(length_km, attenuation_db_per_km) / 10.0)


def propagation_delay_s(length_km: float) -> float:
    """One-way delay of light over `length_km` of fibre (DESIGN.md §3: 4.9 us/km)."""
    _check_length(length_km)
    return length_km * FIBRE_DELAY_S_PER_KM
