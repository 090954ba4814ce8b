"""Decoy-state BB84 with weak coherent pulses: expected statistics, decoy bounds, key rates.

Theory of operation. Alice sends phase-randomised weak coherent pulses, each a Poisson
mixture of n-photon states, at a signal intensity mu and two weaker decoy intensities
(nu and, usually, the vacuum). Eve cannot tell the intensity of a pulse from its photon
number, so every class shares the same n-photon yields Y_n and error rates e_n; what Bob
measures per class (gain Q_k, error rate E_k) is a different Poisson average of the
same unknowns, and two or three classes suffice to bound the single-photon terms
(Ma, Qi, Zhao & Lo, PRA 72, 012326 (2005), "Ma et al." below).

Four layers, each usable on its own:

1. *Expected statistics* of an honest channel (Ma et al. Sec. II): overall transmittance
   eta = eta_Bob 10^(-alpha L / 10), yields Y_n, gains Q_k, error rates E_k and the true
   single-photon Y1, e1. Two variants (`YieldModel`): the first-order form Ma et al.
   print and plot (Y_n = Y0 + eta_n, Q = Y0 + 1 - e^{-eta mu}), and the exact union of
   independent signal and background clicks (Y_n = 1 - (1-Y0)(1-eta)^n) that the
   broker's optical layer samples. Both are exact Poisson mixtures of their own Y_n, so
   the decoy bounds below bracket the true Y1, e1 of either.
2. *Decoy bounds* from measured (Q, E) per class: Y1^L, Q1^L, e1^U (Ma et al. vacuum +
   weak decoy, Eqs. (34), (35), (37); with a non-zero weakest intensity, the general
   two-decoy form, which is the asymptotic limit of Lim et al.'s Eqs. (A4)-(A6)).
3. *Asymptotic key rate* per pulse, the GLLP formula in Ma et al.'s notation:
   R = q { -Q_mu f H2(E_mu) + Q1 [1 - H2(e1)] }, clipped at zero, plus the curve
   R(L) and the distance where it reaches zero.
4. *Finite-key length* of Lim, Curty, Walenta, Xu & Zbinden, PRA 89, 022307 (2014)
   ("Lim et al."), Eqs. (1)-(5): the number of secret bits a block of counts supports
   for given epsilon_sec, epsilon_cor and error-correction leakage, with every
   intermediate bound kept in the result so that a report can show it.

Everything is a pure function of its arguments; the asymptotic functions accept numpy
arrays (vectorised over distance or transmittance) and return a float for scalar
input. Nothing here reads a clock, an RNG or a file.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

from .detector import DARK_COUNT_ERROR
from .errors import PhysicsParameterError
from .source import DecoyIntensities

__all__ = [
    "BB84_SIFTING_FACTOR",
    "GYS_PARAMETERS",
    "DecoyBb84Parameters",
    "DecoyMethod",
    "FiniteKeyInput",
    "FiniteKeyResult",
    "IntensityCounts",
    "IntensityStatistics",
    "SinglePhotonBounds",
    "YieldModel",
    "asymptotic_key_rate",
    "binary_entropy",
    "decoy_bounds",
    "expected_error_rate",
    "expected_finite_key_input",
    "expected_gain",
    "expected_intensity_statistics",
    "finite_key_length",
    "gllp_key_rate",
    "hoeffding_delta",
    "key_rate_vs_distance",
    "lim_gamma",
    "max_distance_km",
    "overall_transmittance",
    "photon_number_yield",
    "single_photon_error_rate",
    "single_photon_yield",
    "tau_n",
]

ArrayLike = float | npt.ArrayLike
FloatOrArray = float | npt.NDArray[np.float64]

#: q in Ma et al.'s key rate: standard BB84 keeps the half of the detections whose
#: bases agree.
BB84_SIFTING_FACTOR: Final[float] = 0.5

#: The number of equal error terms epsilon_sec is split into by Lim et al. (App. B,
#: Eq. (B4) with every term set to a common epsilon: epsilon_sec = 21 epsilon).
_LIM_EPSILON_SPLIT: Final[float] = 21.0


class YieldModel(enum.Enum):
    """How a pulse's click probability combines signal photons and background.

    FIRST_ORDER: Ma et al. Sec. II as printed and plotted, first order in Y0:
    Y_n = Y0 + eta_n, Q_mu = Y0 + 1 - e^{-eta mu}, E_mu Q_mu = e0 Y0 + e_d (1 - e^{-eta mu}).
    EXACT: the background click and each photon's detection are independent events:
    Y_n = 1 - (1 - Y0)(1 - eta)^n, Q_mu = 1 - (1 - Y0) e^{-eta mu},
    E_mu Q_mu = e0 Y0 e^{-eta mu} + e_d (1 - e^{-eta mu}) (as in emulator.physics.detector).
    The two differ by O(Y0 eta), i.e. parts in 10^6 for the GYS parameters. FIRST_ORDER
    is meant for Y0 << 1; where its gain would pass 1 it is capped there.
    """

    FIRST_ORDER = "first-order"
    EXACT = "exact"


class DecoyMethod(enum.Enum):
    """Which single-photon figures the asymptotic key rate uses.

    INFINITE: the true Y1, e1 of the channel model (the limit of infinitely many decoy
    intensities, GLLP with perfect knowledge; Ma et al.'s upper curve).
    VACUUM_WEAK: the bounds Y1^L, e1^U from the three intensities of the parameter set
    (signal, weak decoy, vacuum), evaluated on the expected statistics.
    """

    INFINITE = "infinite"
    VACUUM_WEAK = "vacuum-weak"


# ----------------------------------------------------------------------------- helpers


def _out(value: npt.NDArray[np.float64]) -> FloatOrArray:
    """A float for 0-d results, the array otherwise (numpy-style scalar in, scalar out)."""
    return float(value) if value.ndim == 0 else value


def _check_probability(name: str, value: float) -> None:
    if not (0.0 <= value <= 1.0):
        raise PhysicsParameterError(f"{name} must be in [0, 1], got {value!r}")


def _check_non_negative(name: str, value: float) -> None:
    if not (value >= 0.0 and math.isfinite(value)):
        raise PhysicsParameterError(f"{name} must be finite and >= 0, got {value!r}")


def _check_open_unit(name: str, value: float) -> None:
    if not (0.0 < value < 1.0):
        raise PhysicsParameterError(f"{name} must be in (0, 1), got {value!r}")


def _array(name: str, value: ArrayLike, *, upper: float | None = None) -> npt.NDArray[np.float64]:
    arr = np.asarray(value, dtype=np.float64)
    if not np.all(np.isfinite(arr)) or np.any(arr < 0.0):
        raise PhysicsParameterError(f"{name} must be finite and >= 0")
    if upper is not None and np.any(arr > upper):
        raise PhysicsParameterError(f"{name} must be <= {upper}")
    return arr


def binary_entropy(p: ArrayLike) -> FloatOrArray:
    """H2(p) = -p log2 p - (1-p) log2(1-p), with H2(0) = H2(1) = 0; vectorised.

    Values outside [0, 1] are a caller error (PhysicsParameterError).
    """
    arr = np.asarray(p, dtype=np.float64)
    if np.any(~(arr >= 0.0) | ~(arr <= 1.0)):
        raise PhysicsParameterError("binary_entropy needs probabilities in [0, 1]")
    inner = (arr > 0.0) & (arr < 1.0)
    safe = np.where(inner, arr, 0.5)
    h = -safe * np.log2(safe) - (1.0 - safe) * np.log2(1.0 - safe)
    return _out(np.where(inner, h, 0.0))


# ------------------------------------------------------------------ expected statistics


def overall_transmittance(
    length_km: ArrayLike, attenuation_db_per_km: float, receiver_efficiency: float
) -> FloatOrArray:
    """eta = eta_Bob * 10^(-alpha L / 10), vectorised over `length_km`.

    # Ma et al. 2005 Sec. II: eta = t_AB eta_Bob, t_AB = 10^(-alpha l / 10).
    """
    length = _array("length_km", length_km)
    _check_non_negative("attenuation_db_per_km", attenuation_db_per_km)
    _check_probability("receiver_efficiency", receiver_efficiency)
    return _out(receiver_efficiency * 10.0 ** (-attenuation_db_per_km * length / 10.0))


def photon_number_yield(
    n_photons: int | npt.ArrayLike,
    transmittance: ArrayLike,
    dark_count_yield: float,
    model: YieldModel = YieldModel.FIRST_ORDER,
) -> FloatOrArray:
    """Y_n: probability that Bob clicks given an n-photon pulse (broadcasts n and eta).

    # Ma et al. 2005 Sec. II: eta_n = 1 - (1 - eta)^n; Y_n = Y0 + eta_n - Y0 eta_n
    # (EXACT), ~= Y0 + eta_n (FIRST_ORDER, the form their gain and error formulas sum).
    """
    n = np.asarray(n_photons)
    if n.dtype.kind not in "iu" or np.any(n < 0):
        raise PhysicsParameterError("n_photons must be non-negative integers")
    eta = _array("transmittance", transmittance, upper=1.0)
    _check_probability("dark_count_yield", dark_count_yield)
    # eta_n = 1 - (1 - eta)^n through log1p/expm1, so that it keeps its precision when eta
    # is tiny (long fibres: 1 - (1 - 1e-17) is 0 in floating point). At eta = 1,
    # log1p(-1) = -inf is exact; the n = 0 entries (0 * -inf) are masked to eta_0 = 0.
    with np.errstate(divide="ignore", invalid="ignore"):
        log_survival = n * np.log1p(-eta)
    eta_n = -np.expm1(np.where(n == 0, 0.0, log_survival))
    if model is YieldModel.FIRST_ORDER:
        return _out(dark_count_yield + eta_n)
    # 1 - (1 - Y0)(1 - eta)^n = eta_n + Y0 (1 - eta)^n
    return _out(eta_n + dark_count_yield * (1.0 - eta_n))


def expected_gain(
    mean_photon_number: ArrayLike,
    transmittance: ArrayLike,
    dark_count_yield: float,
    model: YieldModel = YieldModel.FIRST_ORDER,
) -> FloatOrArray:
    """Q_mu = sum_n e^{-mu} mu^n / n! Y_n, the click probability per pulse.

    # Ma et al. 2005 Sec. II: Q_mu = Y0 + 1 - e^{-eta mu} (FIRST_ORDER);
    # EXACT: 1 - (1 - Y0) e^{-eta mu}.
    """
    mu = _array("mean_photon_number", mean_photon_number)
    eta = _array("transmittance", transmittance, upper=1.0)
    _check_probability("dark_count_yield", dark_count_yield)
    signal = -np.expm1(-eta * mu)  # 1 - e^{-eta mu}, accurate for tiny eta mu
    if model is YieldModel.FIRST_ORDER:
        # First order in Y0: capped at 1 where it stops being a probability (Y0 ~ e^{-eta mu}).
        return _out(np.minimum(dark_count_yield + signal, 1.0))
    return _out(signal + dark_count_yield * (1.0 - signal))


def _error_gain(
    mu: npt.NDArray[np.float64],
    eta: npt.NDArray[np.float64],
    dark_count_yield: float,
    misalignment_error: float,
    dark_count_error: float,
    model: YieldModel,
) -> npt.NDArray[np.float64]:
    signal = -np.expm1(-eta * mu)
    # Ma et al. 2005 Sec. II: E_mu Q_mu = e0 Y0 + e_detector (1 - e^{-eta mu}); EXACT
    # counts a background click as random only when no photon clicked (e^{-eta mu}).
    background = dark_count_yield
    if model is YieldModel.EXACT:
        background = dark_count_yield * (1.0 - signal)
    return dark_count_error * background + misalignment_error * signal


def expected_error_rate(
    mean_photon_number: ArrayLike,
    transmittance: ArrayLike,
    dark_count_yield: float,
    misalignment_error: float,
    dark_count_error: float = DARK_COUNT_ERROR,
    model: YieldModel = YieldModel.FIRST_ORDER,
) -> FloatOrArray:
    """E_mu = (E_mu Q_mu) / Q_mu, the QBER of one intensity class; 0 where Q_mu = 0.

    # Ma et al. 2005 Sec. II: E_mu Q_mu = e0 Y0 + e_detector (1 - e^{-eta mu}), e0 = 1/2.
    """
    mu = _array("mean_photon_number", mean_photon_number)
    eta = _array("transmittance", transmittance, upper=1.0)
    _check_probability("dark_count_yield", dark_count_yield)
    _check_probability("misalignment_error", misalignment_error)
    _check_probability("dark_count_error", dark_count_error)
    q = np.asarray(expected_gain(mu, eta, dark_count_yield, model), dtype=np.float64)
    eq = _error_gain(mu, eta, dark_count_yield, misalignment_error, dark_count_error, model)
    return _out(np.minimum(np.where(q > 0.0, eq / np.where(q > 0.0, q, 1.0), 0.0), 1.0))


def single_photon_yield(
    transmittance: ArrayLike, dark_count_yield: float, model: YieldModel = YieldModel.FIRST_ORDER
) -> FloatOrArray:
    """Y1, the yield of single-photon pulses (Y_n at n = 1)."""
    return photon_number_yield(1, transmittance, dark_count_yield, model)


def single_photon_error_rate(
    transmittance: ArrayLike,
    dark_count_yield: float,
    misalignment_error: float,
    dark_count_error: float = DARK_COUNT_ERROR,
    model: YieldModel = YieldModel.FIRST_ORDER,
) -> FloatOrArray:
    """e1, the error rate of single-photon pulses; 0 where Y1 = 0.

    # Ma et al. 2005 Sec. II: e_i = (e0 Y0 + e_detector eta_i) / Y_i at i = 1 (FIRST_ORDER);
    # EXACT weights the background by (1 - eta), the chance the photon did not click.
    """
    eta = _array("transmittance", transmittance, upper=1.0)
    _check_probability("misalignment_error", misalignment_error)
    _check_probability("dark_count_error", dark_count_error)
    y1 = np.asarray(single_photon_yield(eta, dark_count_yield, model), dtype=np.float64)
    background = dark_count_yield
    if model is YieldModel.EXACT:
        background = dark_count_yield * (1.0 - eta)
    errors = dark_count_error * background + misalignment_error * eta
    return _out(np.where(y1 > 0.0, errors / np.where(y1 > 0.0, y1, 1.0), 0.0))


# ------------------------------------------------------------------------ parameter set


@dataclass(frozen=True, slots=True)
class DecoyBb84Parameters:
    """A decoy-state BB84 link: fibre, receiver, intensities and post-processing.

    `receiver_efficiency` is eta_Bob (detector efficiency x Bob's internal
    transmittance); `dark_count_yield` is Y0, the background click probability per
    pulse; `misalignment_error` is e_detector; `ec_efficiency` is f in f H2(E);
    `sifting_factor` is q (1/2 for BB84 with unbiased bases). The intensities are
    signal mu > weak decoy nu > vacuum (usually 0), with mu > nu + vacuum, the condition
    under which the two-decoy bounds hold (Ma et al.'s two-decoy analysis; Lim et al.
    Sec. II).
    """

    attenuation_db_per_km: float
    receiver_efficiency: float
    dark_count_yield: float
    misalignment_error: float
    intensities: DecoyIntensities
    ec_efficiency: float = 1.22
    sifting_factor: float = BB84_SIFTING_FACTOR
    dark_count_error: float = DARK_COUNT_ERROR
    yield_model: YieldModel = YieldModel.FIRST_ORDER

    def __post_init__(self) -> None:
        _check_non_negative("attenuation_db_per_km", self.attenuation_db_per_km)
        _check_probability("receiver_efficiency", self.receiver_efficiency)
        _check_probability("dark_count_yield", self.dark_count_yield)
        _check_probability("misalignment_error", self.misalignment_error)
        _check_probability("dark_count_error", self.dark_count_error)
        if not (self.ec_efficiency >= 1.0 and math.isfinite(self.ec_efficiency)):
            raise PhysicsParameterError(
                f"ec_efficiency must be finite and >= 1 (Shannon limit), got {self.ec_efficiency!r}"
            )
        if not (0.0 < self.sifting_factor <= 1.0):
            raise PhysicsParameterError(
                f"sifting_factor must be in (0, 1], got {self.sifting_factor!r}"
            )
        i = self.intensities
        spread = (i.decoy - i.vacuum) * (i.signal - i.decoy - i.vacuum)
        if not (i.signal > i.decoy + i.vacuum and spread > 0.0):
            raise PhysicsParameterError(
                f"need signal > decoy + vacuum for the decoy bounds, got {i.signal!r}, "
                f"{i.decoy!r}, {i.vacuum!r}"
            )

    def transmittance(self, length_km: ArrayLike) -> FloatOrArray:
        """Overall eta = eta_Bob 10^(-alpha L / 10) at `length_km` (vectorised)."""
        return overall_transmittance(
            length_km, self.attenuation_db_per_km, self.receiver_efficiency
        )


#: The GYS parameter set as used by Ma et al. 2005 (from Gobby, Yuan & Shields, APL 84,
#: 3762 (2004)), as issue 4 quotes it: alpha = 0.21 dB/km, eta_Bob = 4.5 %, Y0 = 1.7e-6,
#: e_detector = 3.3 %, f = 1.22. Signal mu = 0.48, the optimum quoted for GYS
#: (test_physics_qkd checks it maximises the infinite-decoy rate here). The weak decoy
#: nu = 0.05 is small, where the vacuum + weak bound approaches the infinite-decoy rate
#: (the rate deficit is ~1.1-1.4 nu, i.e. 6-7 %); a larger nu trades that tightness for
#: smaller statistical fluctuations, which this asymptotic set ignores.
GYS_PARAMETERS: Final[DecoyBb84Parameters] = DecoyBb84Parameters(
    attenuation_db_per_km=0.21,
    receiver_efficiency=0.045,
    dark_count_yield=1.7e-6,
    misalignment_error=0.033,
    intensities=DecoyIntensities(signal=0.48, decoy=0.05, vacuum=0.0),
    ec_efficiency=1.22,
)


# -------------------------------------------------------------------------- decoy bounds


@dataclass(frozen=True, slots=True)
class IntensityStatistics:
    """What Bob measured (or expects) for one intensity class: gain Q_k and QBER E_k."""

    mean_photon_number: float
    gain: float
    error_rate: float

    def __post_init__(self) -> None:
        _check_non_negative("mean_photon_number", self.mean_photon_number)
        _check_probability("gain", self.gain)
        _check_probability("error_rate", self.error_rate)

    @classmethod
    def from_counts(
        cls, mean_photon_number: float, pulses: float, detections: float, errors: float
    ) -> IntensityStatistics:
        """Q_k = detections / pulses and E_k = errors / detections (0 when undefined).

        `pulses` and `detections` are those of the sifted set (bases agreed) when the
        statistics feed the key rate, as in Ma et al.'s per-pulse Q_mu, E_mu.
        """
        _check_non_negative("pulses", pulses)
        _check_non_negative("detections", detections)
        _check_non_negative("errors", errors)
        if detections > pulses or errors > detections:
            raise PhysicsParameterError(
                f"need errors <= detections <= pulses, got {errors!r}, {detections!r}, {pulses!r}"
            )
        gain = detections / pulses if pulses > 0 else 0.0
        error_rate = errors / detections if detections > 0 else 0.0
        return cls(mean_photon_number, gain, error_rate)


@dataclass(frozen=True, slots=True)
class SinglePhotonBounds:
    """Decoy-state bounds on the single-photon terms.

    `vacuum_yield_lower` is Y0^L (the measured Y0 when the weakest class is a true
    vacuum); `yield_lower` is Y1^L >= 0; `gain_lower` is Q1^L = mu e^{-mu} Y1^L for the
    signal mu; `error_rate_upper` is e1^U in [0, 1/2] (1/2 when Y1^L = 0 or the bound is
    uninformative: an error rate of 1/2 leaves Eve nothing to learn and the key rate's
    single-photon term nothing to give).
    """

    vacuum_yield_lower: float
    yield_lower: float
    gain_lower: float
    error_rate_upper: float


def _bounds_arrays(
    mu: float,
    nu1: float,
    nu2: float,
    q_mu: npt.NDArray[np.float64],
    q_nu1: npt.NDArray[np.float64],
    q_nu2: npt.NDArray[np.float64],
    eq_nu1: npt.NDArray[np.float64],
    eq_nu2: npt.NDArray[np.float64],
) -> tuple[
    npt.NDArray[np.float64],
    npt.NDArray[np.float64],
    npt.NDArray[np.float64],
    npt.NDArray[np.float64],
]:
    """(Y0^L, Y1^L, Q1^L, e1^U) for signal mu and decoys nu1 > nu2 >= 0 with mu > nu1 + nu2."""
    # Y0^L: with nu2 = 0 this is the measured vacuum gain Q_0 = Y0 (Ma et al. Eq. (33));
    # otherwise the two decoys bound it (Lim et al. Eq. (A4) per pulse).
    y0 = np.maximum((nu1 * q_nu2 * math.exp(nu2) - nu2 * q_nu1 * math.exp(nu1)) / (nu1 - nu2), 0.0)
    # Ma et al. Eq. (34) (nu2 = 0):
    #   Y1^L = mu / (mu nu - nu^2) [Q_nu e^nu - Q_mu e^mu nu^2/mu^2 - (mu^2 - nu^2)/mu^2 Y0];
    # the general nu2 >= 0 form is Lim et al. Eq. (A5) per pulse:
    #   Y1^L = mu / (mu (nu1 - nu2) - nu1^2 + nu2^2)
    #          [Q_nu1 e^nu1 - Q_nu2 e^nu2 - (nu1^2 - nu2^2)/mu^2 (Q_mu e^mu - Y0^L)],
    # which reduces to Eq. (34) at nu2 = 0.
    denominator = (nu1 - nu2) * (mu - nu1 - nu2)  # = mu (nu1 - nu2) - (nu1^2 - nu2^2) > 0
    numerator = (
        q_nu1 * math.exp(nu1)
        - q_nu2 * math.exp(nu2)
        - (nu1**2 - nu2**2) / mu**2 * (q_mu * math.exp(mu) - y0)
    )
    with np.errstate(over="ignore"):
        # A yield is a probability: an inconsistent measurement may push the bound
        # outside [0, 1], and clipping a lower bound to [0, 1] keeps it a lower bound.
        y1 = np.clip(mu * numerator / denominator, 0.0, 1.0)
    # Ma et al. Eq. (35): Q1^L = mu e^{-mu} Y1^L.
    q1 = mu * math.exp(-mu) * y1
    # Ma et al. Eq. (37) (nu2 = 0): e1^U = (E_nu Q_nu e^nu - e0 Y0) / (Y1^L nu); the
    # general form subtracts the weaker decoy's errors (Lim et al. Eq. (A6) per pulse).
    error_excess = np.maximum(eq_nu1 * math.exp(nu1) - eq_nu2 * math.exp(nu2), 0.0)
    weight = (nu1 - nu2) * y1
    positive = weight > 0.0
    with np.errstate(over="ignore"):
        e1 = np.where(positive, error_excess / np.where(positive, weight, 1.0), 0.5)
    e1 = np.minimum(e1, 0.5)
    return y0, y1, q1, e1


def decoy_bounds(
    signal: IntensityStatistics, decoy: IntensityStatistics, vacuum: IntensityStatistics
) -> SinglePhotonBounds:
    """Y1^L, Q1^L and e1^U from the measured statistics of three intensity classes.

    With `vacuum.mean_photon_number == 0` this is Ma et al.'s vacuum + weak decoy
    protocol (Eqs. (34), (35), (37)): `vacuum.gain` is Y0 and
    `vacuum.error_rate` its QBER (e0 = 1/2 for pure background). A weakest class with a
    small non-zero intensity uses the general two-decoy form. Requires
    signal > decoy + vacuum and decoy > vacuum (intensities).
    """
    mu, nu1, nu2 = signal.mean_photon_number, decoy.mean_photon_number, vacuum.mean_photon_number
    if not (nu1 > nu2 and mu > nu1 + nu2 and (nu1 - nu2) * (mu - nu1 - nu2) > 0.0):
        raise PhysicsParameterError(
            f"need signal > decoy + vacuum and decoy > vacuum, got {mu!r}, {nu1!r}, {nu2!r}"
        )
    y0, y1, q1, e1 = _bounds_arrays(
        mu,
        nu1,
        nu2,
        np.asarray(signal.gain),
        np.asarray(decoy.gain),
        np.asarray(vacuum.gain),
        np.asarray(decoy.gain * decoy.error_rate),
        np.asarray(vacuum.gain * vacuum.error_rate),
    )
    return SinglePhotonBounds(float(y0), float(y1), float(q1), float(e1))


def expected_intensity_statistics(
    params: DecoyBb84Parameters, length_km: float
) -> tuple[IntensityStatistics, IntensityStatistics, IntensityStatistics]:
    """(signal, decoy, vacuum) statistics an honest channel of `length_km` produces."""
    eta = float(params.transmittance(length_km))
    out = []
    for mu in (params.intensities.signal, params.intensities.decoy, params.intensities.vacuum):
        out.append(
            IntensityStatistics(
                mean_photon_number=mu,
                gain=float(expected_gain(mu, eta, params.dark_count_yield, params.yield_model)),
                error_rate=float(
                    expected_error_rate(
                        mu,
                        eta,
                        params.dark_count_yield,
                        params.misalignment_error,
                        params.dark_count_error,
                        params.yield_model,
                    )
                ),
            )
        )
    return out[0], out[1], out[2]


# ----------------------------------------------------------------------- asymptotic rate


def gllp_key_rate(
    signal_gain: ArrayLike,
    signal_error_rate: ArrayLike,
    single_photon_gain: ArrayLike,
    single_photon_error_rate: ArrayLike,
    *,
    ec_efficiency: float = 1.22,
    sifting_factor: float = BB84_SIFTING_FACTOR,
) -> FloatOrArray:
    """Secret bits per pulse R = q {-Q_mu f H2(E_mu) + Q1 [1 - H2(e1)]}, clipped at 0.

    # GLLP (Gottesman, Lo, Luetkenhaus & Preskill, QIC 4, 325 (2004)) in the notation of
    # Ma et al. 2005 Sec. II: q the sifting factor, f the error-correction efficiency.
    An e1 above 1/2 counts as 1/2 (H2 is symmetric, so a larger e1 must not be read as
    knowledge). Vectorised.
    """
    q_mu = _array("signal_gain", signal_gain, upper=1.0)
    e_mu = _array("signal_error_rate", signal_error_rate, upper=1.0)
    q1 = _array("single_photon_gain", single_photon_gain, upper=1.0)
    e1 = np.minimum(_array("single_photon_error_rate", single_photon_error_rate, upper=1.0), 0.5)
    if not (ec_efficiency >= 1.0 and math.isfinite(ec_efficiency)):
        raise PhysicsParameterError(f"ec_efficiency must be finite and >= 1, got {ec_efficiency!r}")
    if not (0.0 < sifting_factor <= 1.0):
        raise PhysicsParameterError(f"sifting_factor must be in (0, 1], got {sifting_factor!r}")
    rate = sifting_factor * (
        -q_mu * ec_efficiency * np.asarray(binary_entropy(np.minimum(e_mu, 0.5)))
        + q1 * (1.0 - np.asarray(binary_entropy(e1)))
    )
    # An E_mu above 1/2 is as useless as 1/2 for error correction; H2 is capped there too.
    return _out(np.maximum(rate, 0.0))


def key_rate_vs_distance(
    params: DecoyBb84Parameters,
    lengths_km: ArrayLike,
    method: DecoyMethod = DecoyMethod.VACUUM_WEAK,
) -> npt.NDArray[np.float64]:
    """Asymptotic secret bits per pulse at each fibre length (always an ndarray).

    INFINITE uses the model's true Y1, e1; VACUUM_WEAK the decoy bounds evaluated on the
    expected statistics of the three intensities (Ma et al. Figs.: key rate vs distance).
    """
    eta = np.atleast_1d(np.asarray(params.transmittance(lengths_km), dtype=np.float64))
    shape = np.shape(np.asarray(lengths_km))
    y0, model = params.dark_count_yield, params.yield_model
    e_d, e0 = params.misalignment_error, params.dark_count_error
    mu, nu1, nu2 = params.intensities.signal, params.intensities.decoy, params.intensities.vacuum

    def gain(m: float) -> npt.NDArray[np.float64]:
        return np.asarray(expected_gain(m, eta, y0, model), dtype=np.float64)

    def error_gain(m: float) -> npt.NDArray[np.float64]:
        return _error_gain(np.asarray(m), eta, y0, e_d, e0, model)

    q_mu = gain(mu)
    e_mu = np.asarray(expected_error_rate(mu, eta, y0, e_d, e0, model), dtype=np.float64)
    if method is DecoyMethod.INFINITE:
        y1 = np.asarray(single_photon_yield(eta, y0, model), dtype=np.float64)
        q1 = mu * math.exp(-mu) * y1
        e1 = np.asarray(single_photon_error_rate(eta, y0, e_d, e0, model), dtype=np.float64)
    else:
        _, _, q1, e1 = _bounds_arrays(
            mu, nu1, nu2, q_mu, gain(nu1), gain(nu2), error_gain(nu1), error_gain(nu2)
        )
    rate = gllp_key_rate(
        np.minimum(q_mu, 1.0),  # FIRST_ORDER's Y0 + 1 - e^{-eta mu} can pass 1 at absurd Y0
        e_mu,
        np.minimum(q1, 1.0),
        e1,
        ec_efficiency=params.ec_efficiency,
        sifting_factor=params.sifting_factor,
    )
    return np.asarray(rate, dtype=np.float64).reshape(shape)


def asymptotic_key_rate(
    params: DecoyBb84Parameters, length_km: float, method: DecoyMethod = DecoyMethod.VACUUM_WEAK
) -> float:
    """Asymptotic secret bits per pulse at one fibre length (see key_rate_vs_distance)."""
    return float(key_rate_vs_distance(params, float(length_km), method))


def max_distance_km(
    params: DecoyBb84Parameters,
    method: DecoyMethod = DecoyMethod.VACUUM_WEAK,
    *,
    tolerance_km: float = 1e-3,
    search_limit_km: float = 2000.0,
) -> float:
    """The fibre length where the asymptotic key rate reaches zero, by bisection.

    Returns 0.0 when there is no key even at 0 km, and `search_limit_km` when the rate
    is still positive there. The result is within `tolerance_km` of the last length
    with a positive rate.
    """
    if not (tolerance_km > 0.0 and search_limit_km > 0.0):
        raise PhysicsParameterError("tolerance_km and search_limit_km must be > 0")

    def positive(length: float) -> bool:
        return asymptotic_key_rate(params, length, method) > 0.0

    if not positive(0.0):
        return 0.0
    low, high = 0.0, min(100.0, search_limit_km)
    while positive(high):
        if high >= search_limit_km:
            return search_limit_km
        low, high = high, min(2.0 * high, search_limit_km)
    while high - low > tolerance_km:
        mid = 0.5 * (low + high)
        if positive(mid):
            low = mid
        else:
            high = mid
    return low


# --------------------------------------------------------------------------- finite key


def hoeffding_delta(n: float, epsilon: float) -> float:
    """delta(n, eps) = sqrt(n/2 ln(1/eps)), Hoeffding's deviation (Lim et al. Eq. (A1))."""
    _check_non_negative("n", n)
    _check_open_unit("epsilon", epsilon)
    return math.sqrt(n / 2.0 * math.log(1.0 / epsilon))


def lim_gamma(a: float, b: float, c: float, d: float) -> float:
    """gamma(a, b, c, d) of Lim et al. Eq. (5), the sampling correction to the phase error.

    # Lim et al. 2014 Eq. (5): gamma = sqrt( (c+d)(1-b) b / (c d ln 2)
    #                                        * log2( (c+d) / (c d (1-b) b) * 21^2 / a^2 ) ).
    a = epsilon_sec, b = v_Z1 / s_Z1, c = s_Z1, d = s_X1 (c, d > 0). gamma -> 0 as
    b -> 0 or 1 (the limit is taken there); a log2 term below zero (astronomical blocks)
    is taken as zero rather than a complex root.
    """
    _check_open_unit("a", a)
    if not (c > 0.0 and d > 0.0):
        raise PhysicsParameterError(f"lim_gamma needs c, d > 0, got {c!r}, {d!r}")
    if not (0.0 < b < 1.0):
        return 0.0
    # (c + d) / (c d) = 1/c + 1/d; the logarithm is taken term by term so that extreme
    # inputs (subnormal b, huge or tiny counts) give inf or 0 rather than nan.
    inverse_sum = 1.0 / c + 1.0 / d
    log_term = (
        math.log2(inverse_sum)
        - math.log2(1.0 - b)
        - math.log2(b)
        + 2.0 * math.log2(_LIM_EPSILON_SPLIT)
        - 2.0 * math.log2(a)
    )
    if not log_term > 0.0:
        return 0.0
    spread = inverse_sum * (1.0 - b) * b / math.log(2.0)
    return math.sqrt(spread * log_term)


def tau_n(n: int, intensities: tuple[float, ...], probabilities: tuple[float, ...]) -> float:
    """tau_n = sum_k p_k e^{-k} k^n / n!: the probability Alice sends n photons (Lim Eq. (2))."""
    if n < 0:
        raise PhysicsParameterError(f"n must be >= 0, got {n!r}")
    return sum(
        p * math.exp(-k) * k**n / math.factorial(n) for k, p in zip(intensities, probabilities)
    )


@dataclass(frozen=True, slots=True)
class IntensityCounts:
    """The counts of one intensity class in a block (Lim et al. Sec. II, step 3-4).

    `n_x`, `n_z`: detections where Alice and Bob both used X (the key basis) / Z;
    `m_z`: bit errors among the Z detections. Floats so that expected counts can be
    fed in as well as observed integers.
    """

    mean_photon_number: float
    probability: float
    n_x: float
    n_z: float
    m_z: float

    def __post_init__(self) -> None:
        _check_non_negative("mean_photon_number", self.mean_photon_number)
        if not (0.0 < self.probability <= 1.0):
            raise PhysicsParameterError(f"probability must be in (0, 1], got {self.probability!r}")
        for name in ("n_x", "n_z", "m_z"):
            _check_non_negative(name, getattr(self, name))
        if self.m_z > self.n_z:
            raise PhysicsParameterError(f"m_z ({self.m_z!r}) cannot exceed n_z ({self.n_z!r})")


@dataclass(frozen=True, slots=True)
class FiniteKeyInput:
    """A block's counts per intensity (mu1 > mu2 + mu3, mu2 > mu3 >= 0) and the security targets.

    `ec_leakage_bits` is lambda_EC, the bits error correction revealed (measured
    leakage; f H2(E_X) n_X for a model). The probabilities must sum to 1.
    """

    signal: IntensityCounts
    decoy: IntensityCounts
    vacuum: IntensityCounts
    epsilon_sec: float
    epsilon_cor: float
    ec_leakage_bits: float

    def __post_init__(self) -> None:
        mu1, mu2, mu3 = (c.mean_photon_number for c in self.classes)
        if not (mu2 > mu3 and mu1 > mu2 + mu3):
            raise PhysicsParameterError(
                "need mu1 > mu2 + mu3 and mu2 > mu3 (Lim et al. Sec. II), "
                f"got {mu1!r}, {mu2!r}, {mu3!r}"
            )
        total = sum(c.probability for c in self.classes)
        if abs(total - 1.0) > 1e-9:
            raise PhysicsParameterError(f"intensity probabilities must sum to 1, got {total!r}")
        _check_open_unit("epsilon_sec", self.epsilon_sec)
        _check_open_unit("epsilon_cor", self.epsilon_cor)
        _check_non_negative("ec_leakage_bits", self.ec_leakage_bits)

    @property
    def classes(self) -> tuple[IntensityCounts, IntensityCounts, IntensityCounts]:
        return (self.signal, self.decoy, self.vacuum)


@dataclass(frozen=True, slots=True)
class FiniteKeyResult:
    """Every intermediate bound of Lim et al.'s key length, for reports.

    Counts are per block. `phase_error_upper` is phi_X^U of Eq. (5), None when the
    single-photon bounds s_X1^L or s_Z1^L are zero (then no single-photon key). Bounds
    are clipped to the physically possible range (s >= 0, s_0 + s_1 <= n, 0 <= v_Z1 <=
    m_Z), which keeps them valid bounds. `key_length_unrounded` is the
    bracket of Eq. (1) before the floor; `key_length_bits` is max(0, floor(...)).
    """

    key_length_bits: int
    key_length_unrounded: float
    n_x: float
    n_z: float
    m_z: float
    tau_0: float
    tau_1: float
    delta_n_x: float
    delta_n_z: float
    delta_m_z: float
    s_x0_lower: float
    s_x1_lower: float
    s_z0_lower: float
    s_z1_lower: float
    v_z1_upper: float
    phase_error_upper: float | None
    ec_leakage_bits: float
    security_cost_bits: float

    @property
    def has_key(self) -> bool:
        return self.key_length_bits > 0


def _vacuum_and_single(
    mu: tuple[float, float, float],
    p: tuple[float, float, float],
    counts: tuple[float, float, float],
    delta: float,
    tau0: float,
    tau1: float,
) -> tuple[float, float]:
    """(s_0^L, s_1^L) of one basis from Lim et al. Eqs. (2) and (3)."""
    mu1, mu2, mu3 = mu
    # Lim et al. Eq. (2) ff.: n^{+-}_k = e^k / p_k (n_k +- delta(n, eps_sec/21)).
    n_plus = [math.exp(k) / pk * (n + delta) for k, pk, n in zip(mu, p, counts)]
    n_minus = [math.exp(k) / pk * (n - delta) for k, pk, n in zip(mu, p, counts)]
    # Eq. (2): s_0 >= tau_0 (mu2 n^-_mu3 - mu3 n^+_mu2) / (mu2 - mu3).
    # Both bounds are clipped to what is physically possible (0 <= s_0, s_1 and
    # s_0 + s_1 <= n): a clipped lower bound is still a lower bound, and counts that are
    # statistically inconsistent (e.g. every detection in the vacuum class) can otherwise
    # extrapolate past the number of detections.
    n_total = sum(counts)
    s0 = min(max(tau0 * (mu2 * n_minus[2] - mu3 * n_plus[1]) / (mu2 - mu3), 0.0), n_total)
    # Eq. (3): s_1 >= tau_1 mu1 [n^-_mu2 - n^+_mu3 - (mu2^2 - mu3^2)/mu1^2 (n^+_mu1 - s_0/tau_0)]
    #                 / (mu1 (mu2 - mu3) - mu2^2 + mu3^2).
    # The coefficient of s_0 is positive, so the clipped (still valid) s_0^L may be used.
    s1 = (
        tau1
        * mu1
        * (n_minus[1] - n_plus[2] - (mu2**2 - mu3**2) / mu1**2 * (n_plus[0] - s0 / tau0))
        / (mu1 * (mu2 - mu3) - mu2**2 + mu3**2)
    )
    return s0, min(max(s1, 0.0), n_total - s0)


def finite_key_length(block: FiniteKeyInput) -> FiniteKeyResult:
    """Secret key length of Lim et al. 2014, Eqs. (1)-(5), for one block.

    l = floor( s_X0 + s_X1 (1 - h(phi_X)) - lambda_EC - 6 log2(21/eps_sec) - log2(2/eps_cor) ),
    negative -> 0. The key is extracted from the X basis; Z estimates the phase error.
    """
    classes = block.classes
    mu = (
        classes[0].mean_photon_number,
        classes[1].mean_photon_number,
        classes[2].mean_photon_number,
    )
    p = (classes[0].probability, classes[1].probability, classes[2].probability)
    eps1 = block.epsilon_sec / _LIM_EPSILON_SPLIT
    tau0, tau1 = tau_n(0, mu, p), tau_n(1, mu, p)

    n_x_k = (classes[0].n_x, classes[1].n_x, classes[2].n_x)
    n_z_k = (classes[0].n_z, classes[1].n_z, classes[2].n_z)
    m_z_k = (classes[0].m_z, classes[1].m_z, classes[2].m_z)
    n_x, n_z, m_z = sum(n_x_k), sum(n_z_k), sum(m_z_k)
    # Lim et al. Eq. (2) ff. and (A1): delta(n_X, eps_sec/21) = sqrt(n_X/2 ln(21/eps_sec)).
    delta_x = hoeffding_delta(n_x, eps1)
    delta_z = hoeffding_delta(n_z, eps1)
    delta_m = hoeffding_delta(m_z, eps1)

    s_x0, s_x1 = _vacuum_and_single(mu, p, n_x_k, delta_x, tau0, tau1)
    s_z0, s_z1 = _vacuum_and_single(mu, p, n_z_k, delta_z, tau0, tau1)
    # Lim et al. Eq. (4): v_Z1 <= tau_1 (m^+_mu2 - m^-_mu3) / (mu2 - mu3),
    # m^{+-}_k = e^k / p_k (m_k +- delta(m_Z, eps_sec/21)).
    m_plus_2 = math.exp(mu[1]) / p[1] * (m_z_k[1] + delta_m)
    m_minus_3 = math.exp(mu[2]) / p[2] * (m_z_k[2] - delta_m)
    # Clipped to [0, m_Z]: the single-photon errors are some of the observed errors.
    v_z1 = min(max(tau1 * (m_plus_2 - m_minus_3) / (mu[1] - mu[2]), 0.0), m_z)

    phase_error: float | None = None
    single_photon_entropy = 0.0
    if s_x1 > 0.0 and s_z1 > 0.0:
        # Lim et al. Eq. (5): phi_X <= v_Z1/s_Z1 + gamma(eps_sec, v_Z1/s_Z1, s_Z1, s_X1).
        # An error rate is at most 1, so capping the bound there keeps it a bound.
        ratio = min(v_z1 / s_z1, 1.0)
        phase_error = min(ratio + lim_gamma(block.epsilon_sec, ratio, s_z1, s_x1), 1.0)
        # h is symmetric about 1/2: a bound above 1/2 leaves the single photons no entropy.
        single_photon_entropy = s_x1 * (1.0 - float(binary_entropy(min(phase_error, 0.5))))
    # Lim et al. Eq. (1).
    security_cost = 6.0 * math.log2(_LIM_EPSILON_SPLIT / block.epsilon_sec) + math.log2(
        2.0 / block.epsilon_cor
    )
    unrounded = s_x0 + single_photon_entropy - block.ec_leakage_bits - security_cost
    length = max(int(math.floor(unrounded)), 0)
    return FiniteKeyResult(
        key_length_bits=length,
        key_length_unrounded=unrounded,
        n_x=n_x,
        n_z=n_z,
        m_z=m_z,
        tau_0=tau0,
        tau_1=tau1,
        delta_n_x=delta_x,
        delta_n_z=delta_z,
        delta_m_z=delta_m,
        s_x0_lower=s_x0,
        s_x1_lower=s_x1,
        s_z0_lower=s_z0,
        s_z1_lower=s_z1,
        v_z1_upper=v_z1,
        phase_error_upper=phase_error,
        ec_leakage_bits=block.ec_leakage_bits,
        security_cost_bits=security_cost,
    )


def expected_finite_key_input(
    params: DecoyBb84Parameters,
    length_km: float,
    n_pulses: float,
    *,
    intensity_probabilities: tuple[float, float, float],
    x_basis_probability: float = 0.5,
    epsilon_sec: float = 1e-10,
    epsilon_cor: float = 1e-15,
) -> FiniteKeyInput:
    """The expected counts of `n_pulses` pulses over `length_km` of fibre, as a block.

    Alice and Bob each pick X with probability q_x (Lim et al. Sec. II), so a pulse of
    intensity k lands in X-X with probability p_k q_x^2 and in Z-Z with p_k (1 - q_x)^2;
    counts are those times the gain Q_k, errors E_k Q_k (params' yield model). The
    leakage is lambda_EC = f n_X H2(E_X) with E_X the X-basis error rate over all
    intensities (Lim et al. Sec. IV, lambda_EC = f_EC h(e_obs)).
    """
    _check_non_negative("n_pulses", n_pulses)
    _check_open_unit("x_basis_probability", x_basis_probability)
    eta = float(params.transmittance(length_km))
    mus = (params.intensities.signal, params.intensities.decoy, params.intensities.vacuum)
    qx2, qz2 = x_basis_probability**2, (1.0 - x_basis_probability) ** 2
    classes = []
    n_x_total = errors_x_total = 0.0
    for mu, pk in zip(mus, intensity_probabilities):
        gain = float(expected_gain(mu, eta, params.dark_count_yield, params.yield_model))
        error_gain = float(
            _error_gain(
                np.asarray(mu),
                np.asarray(eta),
                params.dark_count_yield,
                params.misalignment_error,
                params.dark_count_error,
                params.yield_model,
            )
        )
        n_x_k = n_pulses * pk * qx2 * gain
        n_x_total += n_x_k
        errors_x_total += n_pulses * pk * qx2 * error_gain
        classes.append(
            IntensityCounts(
                mean_photon_number=mu,
                probability=pk,
                n_x=n_x_k,
                n_z=n_pulses * pk * qz2 * gain,
                m_z=n_pulses * pk * qz2 * error_gain,
            )
        )
    error_x = errors_x_total / n_x_total if n_x_total > 0.0 else 0.0
    leakage = params.ec_efficiency * n_x_total * float(binary_entropy(min(error_x, 0.5)))
    return FiniteKeyInput(
        signal=classes[0],
        decoy=classes[1],
        vacuum=classes[2],
        epsilon_sec=epsilon_sec,
        epsilon_cor=epsilon_cor,
        ec_leakage_bits=leakage,
    )
