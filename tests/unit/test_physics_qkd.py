"""Decoy-state BB84 formulas (emulator.physics.qkd) against hand-worked and published values.

Sources: Ma, Qi, Zhao & Lo, PRA 72, 012326 (2005) ("Ma et al.") for the model, the
vacuum + weak decoy bounds and the GLLP key rate with the GYS parameters; Lim, Curty,
Walenta, Xu & Zbinden, PRA 89, 022307 (2014) ("Lim et al.") for the finite-key length.
Hand-worked arithmetic is spelled out in comments. Nothing here is random except the
hypothesis properties, which are derandomised.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from emulator.physics import (
    GYS_PARAMETERS,
    DecoyBb84Parameters,
    DecoyIntensities,
    DecoyMethod,
    FiniteKeyInput,
    IntensityCounts,
    IntensityStatistics,
    PhysicsParameterError,
    YieldModel,
    asymptotic_key_rate,
    binary_entropy,
    click_probability,
    decoy_bounds,
    expected_error_rate,
    expected_finite_key_input,
    expected_gain,
    expected_intensity_statistics,
    finite_key_length,
    gllp_key_rate,
    hoeffding_delta,
    key_rate_vs_distance,
    lim_gamma,
    max_distance_km,
    overall_transmittance,
    photon_number_pmf,
    photon_number_yield,
    quantum_bit_error_rate,
    single_photon_error_rate,
    single_photon_yield,
    tau_n,
)

HYP = settings(
    max_examples=200,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

MODELS = (YieldModel.FIRST_ORDER, YieldModel.EXACT)


def _with_intensities(
    params: DecoyBb84Parameters, signal: float, decoy: float, vacuum: float = 0.0
) -> DecoyBb84Parameters:
    return dataclasses.replace(params, intensities=DecoyIntensities(signal, decoy, vacuum))


# ------------------------------------------------------------------ expected statistics


def test_gys_parameter_set_is_the_papers() -> None:
    # Ma et al. 2005 Table I (GYS = Gobby, Yuan & Shields 2004) and issue 4.
    p = GYS_PARAMETERS
    assert p.attenuation_db_per_km == 0.21
    assert (p.receiver_efficiency, p.dark_count_yield) == (0.045, 1.7e-6)
    assert (p.misalignment_error, p.ec_efficiency, p.sifting_factor) == (0.033, 1.22, 0.5)
    assert p.dark_count_error == 0.5
    assert p.intensities.signal == 0.48 and p.intensities.vacuum == 0.0


def test_gain_and_qber_hand_worked_at_50_km() -> None:
    # GYS at L = 50 km, mu = 0.48 (Ma et al. Sec. II, first-order model):
    #   alpha L = 0.21 * 50 = 10.5 dB  ->  t_AB = 10^-1.05 = 0.0891251
    #   eta = 0.045 * 0.0891251 = 4.010629e-3
    #   eta mu = 1.925102e-3;  1 - e^{-eta mu} = 1.923250e-3
    #   Q_mu = Y0 + 1 - e^{-eta mu} = 1.7e-6 + 1.923250e-3 = 1.924950e-3
    #   E_mu Q_mu = e0 Y0 + e_d (1 - e^{-eta mu}) = 8.5e-7 + 0.033 * 1.923250e-3 = 6.431726e-5
    #   E_mu = 6.431726e-5 / 1.924950e-3 = 0.0334124
    eta = overall_transmittance(50.0, 0.21, 0.045)
    assert eta == pytest.approx(4.010629e-3, rel=1e-6)
    assert expected_gain(0.48, eta, 1.7e-6) == pytest.approx(1.924950e-3, rel=1e-6)
    assert expected_error_rate(0.48, eta, 1.7e-6, 0.033) == pytest.approx(0.0334124, rel=1e-5)
    signal, _, vacuum = expected_intensity_statistics(GYS_PARAMETERS, 50.0)
    assert signal.gain == pytest.approx(1.924950e-3, rel=1e-6)
    assert signal.error_rate == pytest.approx(0.0334124, rel=1e-5)
    # The vacuum class clicks only on background: Q_0 = Y0, E_0 = e0 = 1/2.
    assert (vacuum.gain, vacuum.error_rate) == (pytest.approx(1.7e-6), pytest.approx(0.5))


def test_exact_model_agrees_with_the_detector_module() -> None:
    # The EXACT variant is the union-of-independent-clicks model of physics.detector.
    # Tolerance 1e-9: detector.py forms 1 - (1 - Y0) e^{-x} directly, which loses
    # ~1e-16 / Q relative (~1e-10 at Q = Y0 = 1.7e-6); qkd.py uses expm1.
    for length in (0.0, 25.0, 140.0):
        eta = float(overall_transmittance(length, 0.21, 0.045))
        for mu in (0.0, 0.05, 0.48):
            assert expected_gain(mu, eta, 1.7e-6, YieldModel.EXACT) == pytest.approx(
                click_probability(mu, eta, 1.7e-6), rel=1e-9
            )
            exact = expected_error_rate(mu, eta, 1.7e-6, 0.033, model=YieldModel.EXACT)
            assert exact == pytest.approx(quantum_bit_error_rate(mu, eta, 1.7e-6, 0.033), rel=1e-9)
        # First order and exact differ by O(Y0 eta): parts in 10^6 here.
        assert expected_gain(0.48, eta, 1.7e-6) == pytest.approx(
            expected_gain(0.48, eta, 1.7e-6, YieldModel.EXACT), rel=1e-5
        )


@pytest.mark.parametrize("model", MODELS)
def test_gain_is_the_poisson_mixture_of_the_yields(model: YieldModel) -> None:
    # Ma et al. Sec. II: Q_mu = sum_n e^{-mu} mu^n/n! Y_n and E_mu Q_mu = sum_n ... e_n Y_n;
    # both model variants must be exact mixtures, or the decoy bounds would not bracket.
    n = np.arange(0, 60)
    eta, y0, e_d = 3e-3, 1.7e-6, 0.033
    yields = np.asarray(photon_number_yield(n, eta, y0, model))
    for mu in (0.05, 0.48, 0.9):
        pmf = np.asarray(photon_number_pmf(mu, n))
        assert float(pmf @ yields) == pytest.approx(expected_gain(mu, eta, y0, model), rel=1e-12)
    # Y_1 and e_1 by hand (FIRST_ORDER): Y1 = Y0 + eta; e1 = (e0 Y0 + e_d eta) / Y1.
    y1 = single_photon_yield(eta, y0, model)
    e1 = single_photon_error_rate(eta, y0, e_d, model=model)
    if model is YieldModel.FIRST_ORDER:
        assert y1 == pytest.approx(y0 + eta, rel=1e-15)
        assert e1 == pytest.approx((0.5 * y0 + e_d * eta) / (y0 + eta), rel=1e-12)
    else:
        assert y1 == pytest.approx(1.0 - (1.0 - y0) * (1.0 - eta), rel=1e-12)
        assert e1 == pytest.approx((0.5 * y0 * (1.0 - eta) + e_d * eta) / y1, rel=1e-12)


def test_binary_entropy_values() -> None:
    assert binary_entropy(0.5) == 1.0
    assert binary_entropy(0.0) == 0.0 and binary_entropy(1.0) == 0.0
    # H2(0.11) = 0.4999 (the BB84 Shor-Preskill threshold, 1 - 2 H2(e) = 0 at e ~ 11 %).
    assert binary_entropy(0.11) == pytest.approx(0.499916, abs=1e-6)
    np.testing.assert_allclose(binary_entropy(np.array([0.1, 0.9])), [0.468996] * 2, atol=1e-6)
    with pytest.raises(PhysicsParameterError):
        binary_entropy(1.5)


# ------------------------------------------------------------------------- decoy bounds


def _true_single_photon(params: DecoyBb84Parameters, length_km: float) -> tuple[float, float]:
    eta = float(params.transmittance(length_km))
    y1 = float(single_photon_yield(eta, params.dark_count_yield, params.yield_model))
    e1 = float(
        single_photon_error_rate(
            eta, params.dark_count_yield, params.misalignment_error, model=params.yield_model
        )
    )
    return y1, e1


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("nu", [0.001, 0.05, 0.125, 0.3])
@pytest.mark.parametrize("length_km", [0.0, 10.0, 50.0, 100.0, 140.0])
def test_vacuum_weak_bounds_bracket_the_true_single_photon_terms(
    model: YieldModel, nu: float, length_km: float
) -> None:
    params = dataclasses.replace(_with_intensities(GYS_PARAMETERS, 0.48, nu), yield_model=model)
    y1, e1 = _true_single_photon(params, length_km)
    bounds = decoy_bounds(*expected_intensity_statistics(params, length_km))
    assert 0.0 < bounds.yield_lower <= y1
    assert bounds.error_rate_upper >= e1
    q1 = 0.48 * math.exp(-0.48) * bounds.yield_lower
    assert bounds.gain_lower == pytest.approx(q1, rel=1e-14)
    assert bounds.vacuum_yield_lower == pytest.approx(params.dark_count_yield, rel=1e-12)


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("length_km", [0.0, 50.0, 140.0])
def test_vacuum_weak_gap_is_the_exact_multiphoton_series(
    model: YieldModel, length_km: float
) -> None:
    # Substituting Q_k e^k = sum_n Y_n k^n / n! into Ma et al. Eq. (34) gives exactly
    #   Y1 - Y1^L = mu nu / (mu - nu) * sum_{n>=3} Y_n (mu^{n-2} - nu^{n-2}) / n!
    # (the n = 0 and n = 2 terms cancel). Any slip in a coefficient of Eq. (34) breaks this.
    mu, nu = 0.48, 0.1
    params = dataclasses.replace(_with_intensities(GYS_PARAMETERS, mu, nu), yield_model=model)
    eta = float(params.transmittance(length_km))
    y1, _ = _true_single_photon(params, length_km)
    n = np.arange(3, 60)
    y_n = np.asarray(photon_number_yield(n, eta, params.dark_count_yield, model))
    factorial = np.array([math.factorial(int(k)) for k in n], dtype=np.float64)
    terms = y_n * (mu ** (n - 2.0) - nu ** (n - 2.0)) / factorial
    series = mu * nu / (mu - nu) * float(np.sum(terms))
    bounds = decoy_bounds(*expected_intensity_statistics(params, length_km))
    # Tolerance: Eq. (34) subtracts O(Q e^k) terms to leave O(nu Y1); round-off ~1e-16 of
    # Q e^k / (nu Y1) ~ 1e-15 relative to Y1, i.e. ~1e-13 relative to a gap ~1e-2 Y1.
    assert y1 - bounds.yield_lower == pytest.approx(series, rel=1e-8)


def test_vacuum_weak_rate_approaches_infinite_decoy_linearly_in_nu() -> None:
    # Ma et al.: vacuum + weak decoy with small nu approaches the infinite-decoy
    # rate. From the series above, Y1 - Y1^L = O(mu nu eta / 2) and e1^U - e1 = O(nu), so
    # the relative deficit 1 - R(nu)/R_inf is linear in nu at small nu: its slope must
    # settle (nu = 0.01 vs 0.001 within 1 %) and the deficit vanish with nu.
    lengths = [10.0, 50.0, 100.0]
    infinite = key_rate_vs_distance(GYS_PARAMETERS, lengths, DecoyMethod.INFINITE)
    deficits = {}
    for nu in (0.1, 0.05, 0.01, 0.001):
        rate = key_rate_vs_distance(_with_intensities(GYS_PARAMETERS, 0.48, nu), lengths)
        assert np.all(rate < infinite)
        deficits[nu] = 1.0 - rate / infinite
    assert np.all(deficits[0.1] > deficits[0.05]) and np.all(deficits[0.05] > deficits[0.01])
    np.testing.assert_allclose(deficits[0.01] / 0.01, deficits[0.001] / 0.001, rtol=0.01)
    assert np.all(deficits[0.001] < 0.002)


def test_bounds_from_measured_statistics_by_hand() -> None:
    # A made-up measurement, worked by hand with Ma et al. Eqs. (34), (35), (37):
    #   mu = 0.5, nu = 0.1, Q_mu = 2e-3, E_mu = 0.03, Q_nu = 4.2e-4, E_nu = 0.035, Y0 = 1e-5
    #   Q_nu e^nu = 4.2e-4 * 1.1051709 = 4.641718e-4
    #   Q_mu e^mu nu^2/mu^2 = 2e-3 * 1.6487213 * 0.04 = 1.318977e-4
    #   (mu^2 - nu^2)/mu^2 Y0 = 0.96 * 1e-5 = 9.6e-6
    #   Y1^L = 0.5 / (0.05 - 0.01) * (4.641718e-4 - 1.318977e-4 - 9.6e-6) = 12.5 * 3.226741e-4
    #        = 4.033426e-3
    #   Q1^L = 0.5 e^-0.5 Y1^L = 0.3032653 * 4.033426e-3 = 1.223199e-3
    #   e1^U = (E_nu Q_nu e^nu - e0 Y0) / (Y1^L nu) = (0.035 * 4.641718e-4 - 5e-6) / 4.033426e-4
    #        = (1.624601e-5 - 5e-6) / 4.033426e-4 = 0.0278822
    b = decoy_bounds(
        IntensityStatistics(0.5, 2e-3, 0.03),
        IntensityStatistics(0.1, 4.2e-4, 0.035),
        IntensityStatistics(0.0, 1e-5, 0.5),
    )
    assert b.yield_lower == pytest.approx(4.033426e-3, rel=1e-6)
    assert b.gain_lower == pytest.approx(1.223199e-3, rel=1e-6)
    assert b.error_rate_upper == pytest.approx(0.0278822, rel=1e-5)
    assert b.vacuum_yield_lower == 1e-5


def test_statistics_from_counts() -> None:
    s = IntensityStatistics.from_counts(0.48, pulses=1e6, detections=1925.0, errors=64.0)
    assert (s.gain, s.error_rate) == (pytest.approx(1.925e-3), pytest.approx(64.0 / 1925.0))
    assert IntensityStatistics.from_counts(0.0, 0.0, 0.0, 0.0) == IntensityStatistics(0.0, 0.0, 0.0)
    with pytest.raises(PhysicsParameterError, match="errors <= detections <= pulses"):
        IntensityStatistics.from_counts(0.48, 10.0, 20.0, 0.0)


def test_bounds_degenerate_measurements_give_no_single_photon_credit() -> None:
    # A signal class that clicks far more than the decoy allows (a PNS-like pattern) drives
    # Y1^L below zero: it is clipped at 0, and e1^U becomes the uninformative 1/2.
    b = decoy_bounds(
        IntensityStatistics(0.5, 0.2, 0.03),
        IntensityStatistics(0.1, 1e-4, 0.03),
        IntensityStatistics(0.0, 1e-6, 0.5),
    )
    assert (b.yield_lower, b.gain_lower, b.error_rate_upper) == (0.0, 0.0, 0.5)
    with pytest.raises(PhysicsParameterError, match="signal > decoy"):
        decoy_bounds(
            IntensityStatistics(0.2, 1e-3, 0.03),
            IntensityStatistics(0.15, 1e-4, 0.03),
            IntensityStatistics(0.1, 1e-6, 0.5),
        )


def test_near_vacuum_weakest_class_uses_the_general_two_decoy_form() -> None:
    # With a non-zero weakest intensity (Lim et al.'s mu3 = 2e-4) the bounds still bracket,
    # and they are continuous in it: mu3 -> 0 recovers the vacuum + weak result.
    params = _with_intensities(GYS_PARAMETERS, 0.48, 0.1, 2e-4)
    y1, e1 = _true_single_photon(params, 50.0)
    b = decoy_bounds(*expected_intensity_statistics(params, 50.0))
    assert 0.0 < b.yield_lower <= y1 and b.error_rate_upper >= e1
    near = _with_intensities(GYS_PARAMETERS, 0.48, 0.1, 1e-9)
    b0 = decoy_bounds(*expected_intensity_statistics(near, 50.0))
    vacuum = _with_intensities(GYS_PARAMETERS, 0.48, 0.1)
    b_vac = decoy_bounds(*expected_intensity_statistics(vacuum, 50.0))
    assert b0.yield_lower == pytest.approx(b_vac.yield_lower, rel=1e-6)
    assert b0.error_rate_upper == pytest.approx(b_vac.error_rate_upper, rel=1e-6)


# -------------------------------------------------------------------- asymptotic rates


def test_infinite_decoy_rate_hand_worked_at_50_km() -> None:
    # Continuing the 50 km example (GLLP in Ma et al.'s notation, q = 1/2, f = 1.22):
    #   Y1 = Y0 + eta = 1.7e-6 + 4.010629e-3 = 4.012329e-3
    #   Q1 = Y1 mu e^-mu = 4.012329e-3 * 0.2970160 = 1.191726e-3
    #   e1 = (e0 Y0 + e_d eta) / Y1 = (8.5e-7 + 1.323508e-4) / 4.012329e-3 = 0.0331979
    #   H2(E_mu) = H2(0.0334124) = 0.2112264;  H2(e1) = 0.2101838
    #   R = 0.5 * (-1.924950e-3 * 1.22 * 0.2112264 + 1.191726e-3 * (1 - 0.2101838))
    #     = 0.5 * (-4.960150e-4 + 9.412551e-4) = 2.226e-4
    rate = asymptotic_key_rate(GYS_PARAMETERS, 50.0, DecoyMethod.INFINITE)
    assert rate == pytest.approx(2.225961e-4, rel=1e-5)


def test_gys_vacuum_weak_rate_within_ten_percent_of_the_infinite_decoy_curve() -> None:
    # Issue 4: the estimator's asymptotic rate must agree with Ma et al.'s formula within
    # 10 % at 10, 50 and 100 km. No numeric table of Ma et al.'s Fig. values was found,
    # so the reference is their infinite-decoy GLLP curve (true Y1, e1) computed here, and
    # the vacuum + weak bound (nu = 0.05) must sit below it by less than 10 %; the analytic
    # deficit is ~1.1-1.4 nu (test above), i.e. 5.6-6.8 % at nu = 0.05.
    lengths = [10.0, 50.0, 100.0]
    infinite = key_rate_vs_distance(GYS_PARAMETERS, lengths, DecoyMethod.INFINITE)
    vacuum_weak = key_rate_vs_distance(GYS_PARAMETERS, lengths, DecoyMethod.VACUUM_WEAK)
    # Reference values of the infinite-decoy curve (this module, 50 km checked by hand above).
    np.testing.assert_allclose(infinite, [1.567058e-3, 2.225961e-4, 1.718444e-5], rtol=1e-5)
    assert np.all(vacuum_weak < infinite)
    assert np.all(vacuum_weak > 0.9 * infinite)


def test_gys_optimal_signal_intensity_is_about_048() -> None:
    # Ma et al. quote mu ~ 0.48 as the optimal signal for GYS; the infinite-decoy rate at
    # 50 km, scanned on a 0.001 grid, must peak within 0.02 of it (the optimum drifts from
    # 0.486 at 0 km to 0.475 at 100 km, flat to 1e-3 relative over +-0.02).
    mus = np.round(np.arange(0.30, 0.70, 0.001), 3)
    rates = [
        asymptotic_key_rate(
            _with_intensities(GYS_PARAMETERS, float(m), 0.01), 50.0, DecoyMethod.INFINITE
        )
        for m in mus
    ]
    assert float(mus[int(np.argmax(rates))]) == pytest.approx(0.48, abs=0.02)


def test_gys_key_reaches_zero_near_140_km_and_none_at_160() -> None:
    # Issue 4: "reaching zero near 140 km with the standard parameters" and no key at
    # 160 km. The infinite-decoy curve bounds every decoy protocol from above, so
    # L_max(vacuum + weak) <= L_max(infinite) (measured: 140.6 and 142.0 km). The
    # interval 135-145 km is the "near 140 km" read as +-5 km.
    inf_max = max_distance_km(GYS_PARAMETERS, DecoyMethod.INFINITE)
    vw_max = max_distance_km(GYS_PARAMETERS, DecoyMethod.VACUUM_WEAK)
    assert 135.0 <= vw_max <= inf_max <= 145.0
    for method in DecoyMethod:
        assert asymptotic_key_rate(GYS_PARAMETERS, 160.0, method) == 0.0
    # Bisection brackets the zero crossing to its tolerance (1e-3 km).
    assert asymptotic_key_rate(GYS_PARAMETERS, vw_max, DecoyMethod.VACUUM_WEAK) > 0.0
    assert asymptotic_key_rate(GYS_PARAMETERS, vw_max + 2e-3, DecoyMethod.VACUUM_WEAK) == 0.0


def test_key_rate_vs_distance_is_vectorised_and_falls() -> None:
    lengths = np.linspace(0.0, 200.0, 401)
    rates = key_rate_vs_distance(GYS_PARAMETERS, lengths)
    assert rates.shape == lengths.shape
    assert np.all(np.diff(rates) <= 0.0)
    for i in (0, 100, 250, 400):
        assert rates[i] == asymptotic_key_rate(GYS_PARAMETERS, float(lengths[i]))
    grid = key_rate_vs_distance(GYS_PARAMETERS, lengths[:15].reshape(3, 5))
    assert grid.shape == (3, 5)


def test_no_key_when_even_zero_km_has_none() -> None:
    noisy = dataclasses.replace(GYS_PARAMETERS, misalignment_error=0.2)
    assert max_distance_km(noisy) == 0.0
    assert max_distance_km(noisy, DecoyMethod.INFINITE) == 0.0


def test_gllp_rate_clips_and_caps() -> None:
    # Q1 [1 - H2(e1)] with e1 = 0.7 must not be read as H2(0.3): e1 above 1/2 counts as 1/2.
    assert gllp_key_rate(1e-3, 0.02, 5e-4, 0.7) == 0.0
    # Hand value: 0.5 * (-1e-3 * 1.22 * H2(0.02) + 5e-4 (1 - H2(0.02))), H2(0.02) = 0.1414405
    #   = 0.5 * (-1.725574e-4 + 4.292797e-4) = 1.283612e-4
    assert gllp_key_rate(1e-3, 0.02, 5e-4, 0.02) == pytest.approx(1.283612e-4, rel=1e-6)
    unsifted = gllp_key_rate(1e-3, 0.02, 5e-4, 0.02, sifting_factor=1.0)
    assert unsifted == pytest.approx(2.567223e-4, rel=1e-6)
    rates = gllp_key_rate([1e-3, 1e-3], [0.2, 0.02], [1e-4, 0.0], [0.02, 0.02])
    np.testing.assert_array_equal(rates, [0.0, 0.0])


def test_parameter_validation() -> None:
    with pytest.raises(PhysicsParameterError, match="signal > decoy \\+ vacuum"):
        _with_intensities(GYS_PARAMETERS, 0.3, 0.2, 0.15)
    with pytest.raises(PhysicsParameterError, match="ec_efficiency"):
        dataclasses.replace(GYS_PARAMETERS, ec_efficiency=0.9)
    with pytest.raises(PhysicsParameterError, match="length_km"):
        key_rate_vs_distance(GYS_PARAMETERS, [-1.0])
    with pytest.raises(PhysicsParameterError, match="gain"):
        IntensityStatistics(0.5, 1.5, 0.1)


# -------------------------------------------------------------------------- finite key


PROBABILITIES = (0.8, 0.1, 0.1)


def _asymptotic_lim_rate(params: DecoyBb84Parameters, length_km: float, q_x: float = 0.5) -> float:
    """The limit of Lim et al.'s l/N as N -> infinity, via the asymptotic decoy bounds.

    Lim et al.'s Eqs. (2)-(4) with delta -> 0 are, per pulse, the two-decoy bounds
    (Y0^L, Y1^L, e1^U) times q_x^2 tau_n; gamma -> 0 and the epsilon costs vanish per
    pulse. Computed from decoy_bounds, an independent code path.
    """
    stats = expected_intensity_statistics(params, length_km)
    b = decoy_bounds(*stats)
    mus = tuple(s.mean_photon_number for s in stats)
    gain = sum(p * s.gain for p, s in zip(PROBABILITIES, stats))
    error_x = sum(p * s.gain * s.error_rate for p, s in zip(PROBABILITIES, stats)) / gain
    return q_x**2 * (
        tau_n(0, mus, PROBABILITIES) * b.vacuum_yield_lower
        + tau_n(1, mus, PROBABILITIES) * b.yield_lower * (1.0 - binary_entropy(b.error_rate_upper))
        - params.ec_efficiency * gain * binary_entropy(error_x)
    )


def _block(n_pulses: float, **kwargs: float) -> FiniteKeyInput:
    return expected_finite_key_input(
        GYS_PARAMETERS, 50.0, n_pulses, intensity_probabilities=PROBABILITIES, **kwargs
    )


def test_hoeffding_and_gamma_by_hand() -> None:
    # delta(1e6, 1e-10/21) = sqrt(1e6/2 * ln(2.1e11)) = sqrt(5e5 * 26.0704) = 3610.43
    assert hoeffding_delta(1e6, 1e-10 / 21) == pytest.approx(3610.427, rel=1e-6)
    # gamma(1e-10, 0.05, 1e6, 1e6) = sqrt( 2e6 * 0.95 * 0.05 / (1e12 ln 2)
    #                                      * log2( 2e6 / (1e12 * 0.95 * 0.05) * 441 / 1e-20 ) )
    #   = sqrt( 1.370560e-7 * log2(1.856842e18) ) = sqrt(1.370560e-7 * 60.68756) = 2.884024e-3
    assert lim_gamma(1e-10, 0.05, 1e6, 1e6) == pytest.approx(2.884024e-3, rel=1e-6)
    assert lim_gamma(1e-10, 0.0, 1e6, 1e6) == 0.0
    # tau_n: probability of n photons, sum_k p_k e^{-k} k^n / n!
    assert tau_n(1, (0.5, 0.1, 0.0), (0.8, 0.1, 0.1)) == pytest.approx(
        0.8 * 0.5 * math.exp(-0.5) + 0.1 * 0.1 * math.exp(-0.1), rel=1e-15
    )


def test_finite_key_grows_with_block_size_and_approaches_the_asymptote_from_below() -> None:
    asymptote = _asymptotic_lim_rate(GYS_PARAMETERS, 50.0)
    assert asymptote > 0.0
    sizes = [10.0**k for k in range(10, 17)]
    per_pulse = [finite_key_length(_block(n)).key_length_bits / n for n in sizes]
    assert all(b > a for a, b in zip(per_pulse, per_pulse[1:]))
    assert all(r < asymptote for r in per_pulse)
    # Finite-size terms shrink like sqrt(ln(1/eps)/n): at N = 1e16 (n_X ~ 4e12) the
    # deficit measured is 0.17 %; 1 % leaves room for round-off in the scan.
    assert per_pulse[-1] > 0.99 * asymptote
    assert per_pulse[1] < 0.7 * asymptote  # N = 1e11 is still far from it (measured 51 %)


def test_finite_key_is_zero_for_small_blocks() -> None:
    # 1e8 pulses at 50 km: n_X ~ 4e4 detections, whose Hoeffding margins
    # (sqrt(n/2 ln(21/eps)) ~ 690, amplified by e^k/p_k ~ 11 for the weak classes) swamp
    # the decoy estimates.
    result = finite_key_length(_block(1e8))
    assert result.key_length_bits == 0 and not result.has_key
    assert result.key_length_unrounded < 0.0
    nothing = finite_key_length(_block(0.0))
    assert nothing.key_length_bits == 0 and nothing.phase_error_upper is None
    assert nothing.s_x1_lower == 0.0


def test_finite_key_result_reports_every_bound_consistently() -> None:
    r = finite_key_length(_block(1e12))
    assert r.has_key
    assert r.delta_n_x == pytest.approx(math.sqrt(r.n_x / 2.0 * math.log(21.0 / 1e-10)), rel=1e-12)
    cost = 6.0 * math.log2(21.0 / 1e-10) + math.log2(2.0 / 1e-15)
    assert r.security_cost_bits == pytest.approx(cost)
    assert r.phase_error_upper is not None
    # Eq. (5): phi_X^U = v_Z1/s_Z1 + gamma(...), above the ratio itself.
    ratio = r.v_z1_upper / r.s_z1_lower
    assert r.phase_error_upper == pytest.approx(
        ratio + lim_gamma(1e-10, ratio, r.s_z1_lower, r.s_x1_lower), rel=1e-12
    )
    expected = (
        r.s_x0_lower
        + r.s_x1_lower * (1.0 - binary_entropy(r.phase_error_upper))
        - r.ec_leakage_bits
        - r.security_cost_bits
    )
    assert r.key_length_unrounded == pytest.approx(expected, rel=1e-12)
    assert r.key_length_bits == math.floor(expected)
    # Per pulse the single-photon bound sits below the true count q_x^2 tau_1 Y1 N.
    y1, e1 = _true_single_photon(GYS_PARAMETERS, 50.0)
    assert r.s_x1_lower < 0.25 * r.tau_1 * y1 * 1e12
    assert r.phase_error_upper > e1


def test_smaller_epsilons_give_shorter_keys() -> None:
    base = finite_key_length(_block(1e12, epsilon_sec=1e-10, epsilon_cor=1e-15))
    tighter_sec = finite_key_length(_block(1e12, epsilon_sec=1e-20, epsilon_cor=1e-15))
    tighter_cor = finite_key_length(_block(1e12, epsilon_sec=1e-10, epsilon_cor=1e-25))
    assert tighter_sec.key_length_bits < base.key_length_bits
    # eps_sec also widens every Hoeffding margin: the loss exceeds 6 log2(1e10) = 199.3 bits.
    assert base.key_length_unrounded - tighter_sec.key_length_unrounded > 6.0 * math.log2(1e10)
    # eps_cor enters only through log2(2/eps_cor): exactly log2(1e10) = 33.22 bits.
    loss_cor = base.key_length_unrounded - tighter_cor.key_length_unrounded
    assert loss_cor == pytest.approx(math.log2(1e10))


def test_leakage_is_subtracted_bit_for_bit() -> None:
    block = _block(1e12)
    more = dataclasses.replace(block, ec_leakage_bits=block.ec_leakage_bits + 1000.0)
    base, worse = finite_key_length(block), finite_key_length(more)
    loss = base.key_length_unrounded - worse.key_length_unrounded
    assert loss == pytest.approx(1000.0)


def test_finite_key_input_validation() -> None:
    block = _block(1e10)
    with pytest.raises(PhysicsParameterError, match="sum to 1"):
        dataclasses.replace(block, signal=dataclasses.replace(block.signal, probability=0.5))
    with pytest.raises(PhysicsParameterError, match="mu1 > mu2 \\+ mu3"):
        weak_signal = dataclasses.replace(block.signal, mean_photon_number=0.04)
        dataclasses.replace(block, signal=weak_signal)
    with pytest.raises(PhysicsParameterError, match="m_z"):
        IntensityCounts(0.5, 0.8, 10.0, 10.0, 11.0)
    with pytest.raises(PhysicsParameterError, match="epsilon_sec"):
        dataclasses.replace(block, epsilon_sec=0.0)


# ------------------------------------------- Lim et al. 2014, Sec. IV: a published point

# Lim et al. Sec. IV system model: eta_Bob = 10 %, p_dc = 6e-7, p_ap = 4e-2, mu3 = 2e-4,
# 0.2 dB/km, e_mis = 5e-3, f_EC = 1.16, eps_cor = 1e-15, eps_sec = kappa * l with
# kappa = 1e-15, rate l/N optimised over {q_x, p_mu1, p_mu2, mu1, mu2} for a fixed n_X.
#   D_k = 1 - (1 - 2 p_dc) exp(-eta_sys k),  R_k = D_k (1 + p_ap),
#   e_k = p_dc + e_mis (1 - exp(-eta k)) + p_ap D_k / 2.
# The paper prints eta_ch in the e_mis term; read literally, n_X = 1e7 would give no key
# at 100 km, contradicting their Fig. 1, so eta = eta_sys (the detected light) is used.


def _lim_model_rate(x: np.ndarray, length_km: float, n_x: float) -> float:
    q_x, p1, p2, mu1, mu2 = (float(v) for v in x)
    mu3, p3 = 2e-4, 1.0 - p1 - p2
    if not (0.0 < q_x < 1.0 and p1 > 0.0 and p2 > 0.0 and p3 > 0.0 and mu1 < 1.5):
        return 0.0
    if not (mu2 > mu3 and mu1 > mu2 + mu3):
        return 0.0
    eta = 0.1 * 10.0 ** (-0.2 * length_km / 10.0)
    p_dc, p_ap, e_mis, f_ec, kappa = 6e-7, 4e-2, 5e-3, 1.16, 1e-15
    mus, ps = (mu1, mu2, mu3), (p1, p2, p3)
    d = [1.0 - (1.0 - 2.0 * p_dc) * math.exp(-eta * k) for k in mus]
    r = [dk * (1.0 + p_ap) for dk in d]
    e = [p_dc + e_mis * (1.0 - math.exp(-eta * k)) + p_ap * dk / 2.0 for k, dk in zip(mus, d)]
    n_pulses = n_x / (q_x**2 * sum(p * rk for p, rk in zip(ps, r)))
    error_x = sum(p * ek for p, ek in zip(ps, e)) / sum(p * rk for p, rk in zip(ps, r))
    leakage = f_ec * n_x * float(binary_entropy(min(error_x, 0.5)))
    counts = [
        IntensityCounts(k, p, n_pulses * p * q_x**2 * rk, n_pulses * p * (1 - q_x) ** 2 * rk,
                        n_pulses * p * (1 - q_x) ** 2 * ek)
        for k, p, rk, ek in zip(mus, ps, r, e)
    ]
    # eps_sec = kappa * l is a fixed point; l moves eps_sec only through logarithms, so a
    # few iterations from eps_sec = kappa * n_X converge to well below a bit.
    epsilon_sec, length = kappa * n_x, 0.0
    for _ in range(5):
        length = finite_key_length(
            FiniteKeyInput(counts[0], counts[1], counts[2], epsilon_sec, 1e-15, leakage)
        ).key_length_unrounded
        if length <= 0.0:
            return 0.0
        epsilon_sec = kappa * length
    return length / n_pulses


def _nelder_mead(
    f: Callable[[np.ndarray], float], x0: np.ndarray, step: float, iterations: int
) -> tuple[np.ndarray, float]:
    """Plain Nelder-Mead minimisation (reflection 1, expansion 2, contraction and shrink 1/2)."""
    points = [np.asarray(x0, dtype=np.float64)]
    for i in range(len(x0)):
        p = points[0].copy()
        p[i] += step
        points.append(p)
    values = [f(p) for p in points]
    for _ in range(iterations):
        order = np.argsort(values)
        points, values = [points[i] for i in order], [values[i] for i in order]
        centroid = np.mean(points[:-1], axis=0)
        reflected = 2.0 * centroid - points[-1]
        f_reflected = f(reflected)
        if f_reflected < values[0]:
            expanded = 3.0 * centroid - 2.0 * points[-1]
            f_expanded = f(expanded)
            if f_expanded < f_reflected:
                points[-1], values[-1] = expanded, f_expanded
            else:
                points[-1], values[-1] = reflected, f_reflected
        elif f_reflected < values[-2]:
            points[-1], values[-1] = reflected, f_reflected
        else:
            contracted = 0.5 * (centroid + points[-1])
            f_contracted = f(contracted)
            if f_contracted < values[-1]:
                points[-1], values[-1] = contracted, f_contracted
            else:
                points = [points[0]] + [0.5 * (points[0] + p) for p in points[1:]]
                values = [values[0]] + [f(p) for p in points[1:]]
    best = int(np.argmin(values))
    return points[best], values[best]


def _optimised_lim_rate(length_km: float, n_x: float) -> float:
    best = 0.0
    # Two generic starts inside the feasible region (neither is the optimum found).
    for start in ((0.8, 0.6, 0.3, 0.5, 0.15), (0.7, 0.5, 0.3, 0.6, 0.2)):
        x = np.array(start)
        for step in (0.05, 0.02):
            x, value = _nelder_mead(lambda v: -_lim_model_rate(v, length_km, n_x), x, step, 400)
        best = max(best, -value)
    return best


def test_lim_2014_block_size_ratio_at_100_km() -> None:
    # Lim et al. Sec. IV: "at a fiber length of 100 km, the secret key rate obtained with
    # n_X = 1e9 is about 1.75 times the one based on n_X = 1e7". Measured here: 1.79 (rates
    # 8.54e-5 and 4.77e-5 per pulse). Tolerance +-0.1: the paper's "about" is a two-digit
    # reading of numerically optimised curves; our optimiser agrees with itself across
    # starts to < 1e-3 relative.
    rate_7 = _optimised_lim_rate(100.0, 1e7)
    rate_9 = _optimised_lim_rate(100.0, 1e9)
    assert rate_7 > 0.0
    assert rate_9 / rate_7 == pytest.approx(1.75, abs=0.1)


# ----------------------------------------------------------------- properties (hypothesis)

_probability = st.floats(0.0, 1.0, allow_nan=False)


@st.composite
def _parameter_sets(draw: st.DrawFn) -> DecoyBb84Parameters:
    mu = draw(st.floats(0.05, 1.5))
    nu = draw(st.floats(0.001, 0.99)) * mu / 2.0
    vacuum = draw(st.sampled_from([0.0, 0.0, nu * draw(st.floats(0.0, 0.5))]))
    return DecoyBb84Parameters(
        attenuation_db_per_km=draw(st.floats(0.0, 0.5)),
        receiver_efficiency=draw(st.floats(1e-4, 1.0)),
        dark_count_yield=draw(st.floats(0.0, 1e-2)),
        misalignment_error=draw(st.floats(0.0, 0.5)),
        intensities=DecoyIntensities(mu, nu, vacuum),
        ec_efficiency=draw(st.floats(1.0, 2.0)),
        yield_model=draw(st.sampled_from(MODELS)),
    )


@HYP
@given(_parameter_sets(), st.floats(0.0, 400.0))
def test_property_asymptotic_rates_and_bounds_are_sane(
    params: DecoyBb84Parameters, length_km: float
) -> None:
    for method in DecoyMethod:
        rate = asymptotic_key_rate(params, length_km, method)
        assert math.isfinite(rate) and 0.0 <= rate <= params.sifting_factor
    # The vacuum + weak bound never exceeds the infinite-decoy rate (it only loses knowledge).
    assert asymptotic_key_rate(params, length_km) <= asymptotic_key_rate(
        params, length_km, DecoyMethod.INFINITE
    ) * (1.0 + 1e-9) + 1e-15
    y1, e1 = _true_single_photon(params, length_km)
    b = decoy_bounds(*expected_intensity_statistics(params, length_km))
    values = (b.vacuum_yield_lower, b.yield_lower, b.gain_lower, b.error_rate_upper)
    assert all(math.isfinite(v) for v in values)
    # Round-off: Eq. (34) subtracts terms ~Q e^mu; allow 1e-12 of them.
    assert b.yield_lower <= y1 + 1e-12
    assert 0.0 <= b.error_rate_upper <= 0.5
    if b.yield_lower > 1e-9:
        assert b.error_rate_upper >= min(e1, 0.5) - 1e-6


@HYP
@given(
    st.tuples(*[st.floats(0.0, 1.0) for _ in range(6)]),
    st.floats(0.01, 1.5),
    st.floats(0.01, 0.99),
)
def test_property_bounds_from_any_measurement_are_finite(
    measured: tuple[float, ...], mu: float, nu_fraction: float
) -> None:
    nu = nu_fraction * mu * 0.99
    b = decoy_bounds(
        IntensityStatistics(mu, measured[0], measured[1]),
        IntensityStatistics(nu, measured[2], measured[3]),
        IntensityStatistics(0.0, measured[4], measured[5]),
    )
    for value in (b.vacuum_yield_lower, b.yield_lower, b.gain_lower, b.error_rate_upper):
        assert math.isfinite(value) and value >= 0.0
    assert b.error_rate_upper <= 0.5


@st.composite
def _blocks(draw: st.DrawFn) -> FiniteKeyInput:
    mu1 = draw(st.floats(0.1, 1.2))
    mu2 = draw(st.floats(0.01, 0.45)) * mu1
    mu3 = draw(st.floats(0.0, 0.9)) * mu2 * draw(st.sampled_from([0.0, 1.0]))
    p1 = draw(st.floats(0.05, 0.9))
    p2 = draw(st.floats(0.05, 0.9)) * (1.0 - p1)
    ps = (p1, p2, 1.0 - p1 - p2)
    classes = []
    for mu, p in zip((mu1, mu2, mu3), ps):
        n_z = draw(st.floats(0.0, 1e12))
        classes.append(
            IntensityCounts(mu, p, draw(st.floats(0.0, 1e12)), n_z, n_z * draw(st.floats(0.0, 1.0)))
        )
    return FiniteKeyInput(
        classes[0],
        classes[1],
        classes[2],
        epsilon_sec=draw(st.floats(1e-30, 0.5)),
        epsilon_cor=draw(st.floats(1e-30, 0.5)),
        ec_leakage_bits=draw(st.floats(0.0, 1e12)),
    )


@HYP
@given(_blocks())
def test_property_finite_key_never_nan_or_negative(block: FiniteKeyInput) -> None:
    r = finite_key_length(block)
    assert r.key_length_bits >= 0
    assert math.isfinite(r.key_length_unrounded)
    names = ("s_x0_lower", "s_x1_lower", "s_z0_lower", "s_z1_lower", "v_z1_upper", "tau_0", "tau_1")
    for name in names:
        value = getattr(r, name)
        assert math.isfinite(value) and value >= 0.0, name
    if r.phase_error_upper is not None:
        assert math.isfinite(r.phase_error_upper) and r.phase_error_upper >= 0.0
    # The key never exceeds the X-basis detections it is distilled from.
    assert r.key_length_bits <= r.n_x
