"""Threshold single-photon detectors: clicks, dark counts, dead time, misalignment.

Theory of operation (the standard QKD detector model of Ma, Qi, Zhao & Lo, PRA 72,
012326 (2005), Sec. II): a pulse carrying n photons reaches a threshold detector of
overall efficiency eta (channel transmittance x detector efficiency). Photons are
lost independently, so at least one is detected with probability
eta_n = 1 - (1-eta)^n. Independently of the signal, a dark count (or any background
click) happens in the detection window with probability Y0. The detector clicks if
either happens:

    Y_n = 1 - (1 - Y0)(1 - eta)^n                    (yield of an n-photon pulse)

Ma et al. write this as Y_n = Y0 + eta_n - Y0*eta_n. For a weak coherent pulse the
photon number is Poisson with mean mu, and summing Y_n against the Poisson pmf gives
the gain (click probability per pulse) exactly:

    Q_mu = sum_n e^{-mu} mu^n/n! Y_n = 1 - (1 - Y0) e^{-eta mu},

of which Ma et al.'s Q_mu = Y0 + 1 - e^{-eta mu} is the first-order form in Y0.

Errors: a click caused by a photon lands in the wrong detector with probability e_d
(optical misalignment, "e_detector" in Ma et al.); a click caused by a dark count
alone is random, error 1/2 (e0). So (neglecting the second-order event of a dark
count in the same window as a signal click, whose error is counted as e_d)

    E_mu Q_mu = e0 Y0 e^{-eta mu} + e_d (1 - e^{-eta mu}),

again Ma et al.'s E_mu Q_mu = e0 Y0 + e_d (1 - e^{-eta mu}) to first order in Y0.

Dead time: after each click a detector is blind for tau seconds. A non-paralysable
detector exposed to a true click rate R registers R / (1 + R tau) clicks per second
(G. F. Knoll, Radiation Detection and Measurement, 4th ed., ch. 4 "Dead time",
non-paralysable model m = n / (1 + n tau)), i.e. the throughput factor is
1 / (1 + R tau).
"""

from __future__ import annotations

import math

from .errors import PhysicsParameterError

__all__ = [
    "DARK_COUNT_ERROR",
    "click_probability",
    "dead_time_throughput_factor",
    "error_click_probability",
    "n_photon_yield",
    "quantum_bit_error_rate",
    "registered_click_rate_hz",
]

#: e0: the error probability of a click caused by background alone (a random bit).
DARK_COUNT_ERROR = 0.5


def _check_probability(name: str, value: float) -> None:
    if not (0.0 <= value <= 1.0):
        raise PhysicsParameterError(f"{name} must be in [0, 1], got {value!r}")


def _check_mean(mean_photon_number: float) -> None:
    if not (mean_photon_number >= 0.0 and math.isfinite(mean_photon_number)):
        raise PhysicsParameterError(
            f"mean_photon_number must be finite and >= 0, got {mean_photon_number!r}"
        )


def n_photon_yield(n_photons: int, efficiency: float, dark_count_probability: float) -> float:
    """Y_n = 1 - (1 - Y0)(1 - eta)^n: click probability given n photons in the pulse.

    # Ma, Qi, Zhao & Lo, PRA 72, 012326 (2005), Sec. II: Y_i = Y0 + eta_i - Y0*eta_i,
    # eta_i = 1 - (1 - eta)^i.
    """
    if n_photons < 0:
        raise PhysicsParameterError(f"n_photons must be >= 0, got {n_photons!r}")
    _check_probability("efficiency", efficiency)
    _check_probability("dark_count_probability", dark_count_probability)
    return 1.0 - (1.0 - dark_count_probability) * (1.0 - efficiency) ** n_photons


def click_probability(
    mean_photon_number: float, efficiency: float, dark_count_probability: float
) -> float:
    """Gain Q_mu = 1 - (1 - Y0) e^{-mu eta} of a phase-randomised weak coherent pulse.

    # Ma et al. 2005, Sec. II: Q_mu = sum_i Y_i mu^i e^{-mu}/i!; with the exact Y_i the
    # sum is 1 - (1 - Y0) e^{-eta mu} (their Q_mu = Y0 + 1 - e^{-eta mu} to first order).
    `efficiency` is the overall eta (channel transmittance x detector efficiency).
    """
    _check_mean(mean_photon_number)
    _check_probability("efficiency", efficiency)
    _check_probability("dark_count_probability", dark_count_probability)
    return 1.0 - (1.0 - dark_count_probability) * math.exp(-mean_photon_number * efficiency)


def error_click_probability(
    mean_photon_number: float,
    efficiency: float,
    dark_count_probability: float,
    misalignment: float,
) -> float:
    """E_mu Q_mu: probability per pulse of a click with the wrong bit (sifted basis).

    # Ma et al. 2005, Sec. II: E_mu Q_mu = e0 Y0 + e_d (1 - e^{-eta mu}); here the
    # dark-count term is weighted by e^{-eta mu} (no signal click in the window),
    # consistent with the exact Q_mu of click_probability().
    """
    _check_mean(mean_photon_number)
    _check_probability("efficiency", efficiency)
    _check_probability("dark_count_probability", dark_count_probability)
    _check_probability("misalignment", misalignment)
    no_signal = math.exp(-mean_photon_number * efficiency)
    return DARK_COUNT_ERROR * dark_count_probability * no_signal + misalignment * (1.0 - no_signal)


def quantum_bit_error_rate(
    mean_photon_number: float,
    efficiency: float,
    dark_count_probability: float,
    misalignment: float,
) -> float:
    """E_mu = (E_mu Q_mu) / Q_mu; 0 when nothing can click (Q_mu = 0)."""
    q = click_probability(mean_photon_number, efficiency, dark_count_probability)
    if q == 0.0:
        return 0.0
    errors = error_click_probability(
        mean_photon_number, efficiency, dark_count_probability, misalignment
    )
    return errors / q


def dead_time_throughput_factor(click_rate_hz: float, dead_time_s: float) -> float:
    """Fraction 1 / (1 + R tau) of true clicks a non-paralysable detector registers.

    # Knoll, Radiation Detection and Measurement, ch. 4 (dead time): m = n / (1 + n tau).
    """
    if not (click_rate_hz >= 0.0 and math.isfinite(click_rate_hz)):
        raise PhysicsParameterError(f"click_rate_hz must be finite and >= 0, got {click_rate_hz!r}")
    if not (dead_time_s >= 0.0 and math.isfinite(dead_time_s)):
        raise PhysicsParameterError(f"dead_time_s must be finite and >= 0, got {dead_time_s!r}")
    return 1.0 / (1.0 + click_rate_hz * dead_time_s)


def registered_click_rate_hz(click_rate_hz: float, dead_time_s: float) -> float:
    """Registered click rate R / (1 + R tau) of a non-paralysable detector."""
    return click_rate_hz * dead_time_throughput_factor(click_rate_hz, dead_time_s)
