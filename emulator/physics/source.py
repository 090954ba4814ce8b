"""Weak-coherent-pulse (attenuated laser) sources with decoy intensities.

Theory of operation: a phase-randomised coherent state of mean photon number mu is a
Poisson mixture of Fock states, P(n) = e^{-mu} mu^n / n! (e.g. Ma, Qi, Zhao & Lo, PRA
72, 012326 (2005), Sec. II; Lo, Ma & Chen, PRL 94, 230504 (2005)). A decoy-state
transmitter picks, per pulse, one of a few intensity classes — the signal mu, a weak
decoy nu < mu and the vacuum — so that the receiver's yields per class bound the
single-photon contribution (DESIGN.md §7). This module only describes the source; the
bounds live in the QKD estimation stage.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

import numpy as np

from .errors import PhysicsParameterError

__all__ = [
    "DecoyIntensities",
    "IntensityClass",
    "multi_photon_probability",
    "photon_number_pmf",
    "sample_photon_numbers",
]


def _check_mean(mean_photon_number: float) -> None:
    if not (mean_photon_number >= 0.0 and math.isfinite(mean_photon_number)):
        raise PhysicsParameterError(
            f"mean_photon_number must be finite and >= 0, got {mean_photon_number!r}"
        )


def photon_number_pmf(mean_photon_number: float, n_photons: int | np.ndarray) -> float | np.ndarray:
    """Poisson pmf e^{-mu} mu^n / n! (scalar n -> float, array n -> float64 array)."""
    _check_mean(mean_photon_number)
    n = np.asarray(n_photons)
    if n.dtype.kind not in "iu" or np.any(n < 0):
        raise PhysicsParameterError("n_photons must be non-negative integers")
    mu = mean_photon_number
    if mu == 0.0:
        out = (n == 0).astype(np.float64)
    else:
        # log-space keeps n! and mu^n finite for large n.
        lgamma = np.vectorize(math.lgamma, otypes=[np.float64])
        out = np.exp(n * math.log(mu) - mu - lgamma(n + 1.0))
    return float(out) if out.ndim == 0 else out


def multi_photon_probability(mean_photon_number: float) -> float:
    """P(n >= 2) = 1 - e^{-mu}(1 + mu)."""
    _check_mean(mean_photon_number)
    mu = mean_photon_number
    # -expm1(-mu) - mu e^{-mu}: keeps precision for the small mu of QKD sources.
    return -math.expm1(-mu) - mu * math.exp(-mu)


def sample_photon_numbers(
    rng: np.random.Generator, mean_photon_number: float, n_pulses: int
) -> np.ndarray:
    """Photon numbers of `n_pulses` pulses (int64), Poisson with the given mean."""
    _check_mean(mean_photon_number)
    if n_pulses < 0:
        raise PhysicsParameterError(f"n_pulses must be >= 0, got {n_pulses!r}")
    return rng.poisson(mean_photon_number, size=n_pulses).astype(np.int64, copy=False)


class IntensityClass(enum.IntEnum):
    """Intensity class of a pulse; the int value is what batch arrays carry."""

    SIGNAL = 0
    DECOY = 1
    VACUUM = 2


@dataclass(frozen=True, slots=True)
class DecoyIntensities:
    """Mean photon numbers of the three classes: signal > decoy > vacuum >= 0."""

    signal: float = 0.5
    decoy: float = 0.1
    vacuum: float = 0.0

    def __post_init__(self) -> None:
        for name in ("signal", "decoy", "vacuum"):
            _check_mean(getattr(self, name))
        if not (self.signal > self.decoy > self.vacuum):
            raise PhysicsParameterError(
                "need signal > decoy > vacuum, got "
                f"{self.signal!r}, {self.decoy!r}, {self.vacuum!r}"
            )

    def mean_photon_number(self, intensity: IntensityClass) -> float:
        return (self.signal, self.decoy, self.vacuum)[IntensityClass(intensity)]
