"""Parameter estimation of sifted decoy-BB84 blocks (nodes/qkd/estimation.py).

- Model-exact counts (emulator.physics expected statistics of Ma, Qi, Zhao & Lo, PRA 72,
  012326 (2005), GYS parameters): the decoy bounds bracket the true single-photon yield
  and error (Y1^L <= Y1, e1^U >= e1), the estimated asymptotic rate is Ma et al.'s
  formula, large blocks at 50 km give a finite key (Lim et al. 2014), tiny ones none,
  160 km none at all.
- Detections of the real optical sampler, sifted by nodes.qkd.sifting: the estimated
  secret key rate per pulse is within 10 % of the asymptotic formula at 10, 25 (the
  issue's bb84-metro distance), 50 and 100 km.
- Eavesdroppers: intercept-resend raises the QBER by f/4 and trips the alarm; PNS with
  matched signal gain removes the single-photon bound and trips the alarm.

Block sizes and tolerances. The estimated rate is a non-linear function of six
independent binomial counts: detections per class (Binomial(N p_k, Q_k)) and errors per
class (Binomial(disclosed_k, E_k)). `rate_sigma` propagates their standard deviations
through `estimate` by finite differences (the delta method). The rate is dominated by the
weak-decoy gain, which enters Y1^L with the factor mu e^nu / (mu nu - nu^2) ~ 23 (Ma et
al. Eq. (34)), and by the decoy errors (e1^U, Eq. (37)); at 25 km with p = (0.5, 0.25,
0.25) this gives sigma_R / R ~ 0.39 / sqrt(N / 1e8), so 10 % is >= 4 sigma once
N >~ 2.5e8 pulses; N = 1e9 (3.4e6 detections) puts it at ~8 sigma. Every statistical
assertion allows 4 sigma (two-sided 6e-5) besides the issue's own tolerance.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from emulator.broker.optics import OpticalLinkConfig, pns_gain_matching
from emulator.kernels import Eavesdropper
from emulator.physics import (
    GYS_PARAMETERS,
    DecoyIntensities,
    DecoyMethod,
    asymptotic_key_rate,
    binary_entropy,
    expected_error_rate,
    expected_gain,
    single_photon_error_rate,
    single_photon_yield,
)
from nodes.qkd.estimation import (
    ALARM_REASONS,
    SHOR_PRESKILL_QBER,
    AbortReason,
    EstimationError,
    EstimationParameters,
    estimate,
    key_length,
    thinned_lower_bound,
)
from nodes.qkd.sifting import BlockCounts
from tests.unit.test_qkd_sifting import gys, make_pair, sample_windows

Z4 = 4.0
GYS = GYS_PARAMETERS
MU = (GYS.intensities.signal, GYS.intensities.decoy, GYS.intensities.vacuum)
PARAMS = EstimationParameters(GYS.intensities)
CLASS_P = (0.5, 0.25, 0.25)


# ---------------------------------------------------------------- model-exact counts


def model_counts(length_km: float, n_pulses: float, *, class_p=CLASS_P, p_z=0.5, r=0.05, key_basis=0) -> BlockCounts:
    """Expected counts of an honest GYS link (Ma et al.'s first-order model), rounded."""
    eta = float(GYS.transmittance(length_km))
    basis_p = (p_z * p_z, (1 - p_z) ** 2)
    det, sifted, disclosed, errors = [], [], [], []
    for mu, pk in zip(MU, class_p):
        q = float(expected_gain(mu, eta, GYS.dark_count_yield))
        e = float(expected_error_rate(mu, eta, GYS.dark_count_yield, GYS.misalignment_error))
        d = n_pulses * pk * q
        s = tuple(round(d * x) for x in basis_p)
        ds = tuple(round(s[b] * (r if (mu == MU[0] and b == key_basis) else 1.0)) for b in range(2))
        det.append(round(d))
        sifted.append(s)
        disclosed.append(ds)
        errors.append(tuple(round(x * e) for x in ds))
    return BlockCounts(
        block_id=0, pulses=int(n_pulses), class_probabilities=class_p, key_basis=key_basis, sample_fraction=r,
        detections=tuple(det), sifted=tuple(sifted), disclosed=tuple(disclosed), errors=tuple(errors),
        key_bits=sifted[0][key_basis] - disclosed[0][key_basis],
    )  # fmt: skip


@pytest.mark.parametrize("length_km", [10, 50, 100])
def test_decoy_bounds_bracket_the_true_single_photon_terms(length_km):
    est = estimate(model_counts(length_km, 1e13), PARAMS)
    eta = float(GYS.transmittance(length_km))
    y1 = float(single_photon_yield(eta, GYS.dark_count_yield))
    e1 = float(single_photon_error_rate(eta, GYS.dark_count_yield, GYS.misalignment_error))
    b = est.bounds
    assert 0.0 < b.yield_lower <= y1
    assert b.yield_lower > 0.95 * y1  # vacuum + weak decoy with nu = 0.05 is tight (Ma et al. Fig. 3)
    assert e1 <= b.error_rate_upper < e1 + 0.01
    assert b.gain_lower <= MU[0] * math.exp(-MU[0]) * y1
    assert b.vacuum_yield_lower == pytest.approx(GYS.dark_count_yield, rel=1e-3)
    # The asymptotic rate is Ma et al.'s vacuum + weak formula on the same statistics
    # (rounding the counts to integers moves it by < 1e-4).
    assert est.asymptotic_rate_per_pulse == pytest.approx(asymptotic_key_rate(GYS, length_km), rel=1e-4)
    assert est.qber == pytest.approx(
        float(expected_error_rate(MU[0], eta, GYS.dark_count_yield, GYS.misalignment_error)), rel=1e-3
    )
    assert not est.decision.abort and est.alarm is None


def test_large_blocks_at_50_km_give_a_finite_key_and_tiny_ones_none():
    big = estimate(model_counts(50, 1e11), PARAMS)
    leak = GYS.ec_efficiency * float(binary_entropy(big.qber)) * big.counts.key_bits
    length = key_length(big, leak)
    assert length > 0.1 * big.counts.key_bits > 0
    # The finite-key rate stays below the asymptotic one (same sifting factor: q = 1/2 of
    # the signal pulses' detections in Ma et al., p_Z^2 = 1/4 here, so at most half of it).
    assert length / 1e11 < asymptotic_key_rate(GYS, 50) / 2
    k = big.key
    assert k.single_photon_events_lower <= k.keep_probability_single * k.lim.s_x1_lower
    assert k.phase_error_upper > k.lim.phase_error_upper > 0.0332  # e1 = 3.32 % at 50 km
    tiny = estimate(model_counts(50, 1e7), PARAMS)
    assert tiny.max_key_length_bits == 0
    assert AbortReason.NO_SECRET_KEY in tiny.decision.reasons and tiny.alarm is None


def test_key_length_pays_exactly_the_leak_and_nothing_for_aborted_blocks():
    est = estimate(model_counts(25, 1e10), PARAMS)
    full = est.max_key_length_bits
    assert full > 10_000
    assert key_length(est, 1000) in (full - 1000, full - 1001)  # floor of a non-integer bound
    assert key_length(est, 10 * full) == 0
    with pytest.raises(EstimationError):
        key_length(est, -1)
    bad = dataclasses.replace(est.counts, errors=((est.counts.disclosed[0][0] // 4, 0), *est.counts.errors[1:]))
    aborted = estimate(bad, PARAMS)
    assert aborted.decision.abort and key_length(aborted, 0) == 0


def test_no_key_at_160_km():
    # Issue 4: no key at 160 km with the standard parameters, however large the block.
    # Single photons still get through (Y1^L > 0, so no alarm: distance is no evidence of
    # Eve), but the leak of reconciliation exceeds what they carry.
    assert asymptotic_key_rate(GYS, 160) == 0.0
    est = estimate(model_counts(160, 1e14), PARAMS)
    assert est.asymptotic_rate_per_pulse == 0.0
    assert est.bounds.yield_lower > 0.0
    assert est.key.secret_bits_before_leak() < est.expected_leak_bits
    assert est.decision.reasons == (AbortReason.NO_SECRET_KEY,) and est.alarm is None
    assert est.max_key_length_bits == 0 == key_length(est, 0)


def test_thinned_lower_bound_holds_with_probability_one_minus_epsilon():
    s, p, eps = 10_000, 0.3, 0.01
    bound = thinned_lower_bound(s, p, eps)
    assert bound == pytest.approx(p * s - math.sqrt(s * math.log(1 / eps) / 2))
    draws = np.random.default_rng(7).binomial(s, p, 200_000)
    # Hoeffding is conservative: the failure rate must be below eps (it is ~2e-5 here).
    assert (draws < bound).mean() <= eps
    # Convexity: a smaller known lower bound never gives a larger result; tiny ones give 0.
    assert thinned_lower_bound(5_000, p, eps) < bound
    assert thinned_lower_bound(3, p, eps) == 0.0 == thinned_lower_bound(0, p, eps)
    assert thinned_lower_bound(100, 1.0, eps) == pytest.approx(100 - math.sqrt(50 * math.log(100)))


def test_parameters_and_counts_are_validated():
    assert SHOR_PRESKILL_QBER == 0.11 and PARAMS.qber_threshold == 0.11
    with pytest.raises(EstimationError):
        EstimationParameters(DecoyIntensities(0.1, 0.09, 0.02))  # mu <= nu + vacuum
    with pytest.raises(EstimationError):
        EstimationParameters(GYS.intensities, epsilon_sec=0.0)
    with pytest.raises(EstimationError):
        EstimationParameters(GYS.intensities, qber_threshold=1.5)
    with pytest.raises(EstimationError):
        estimate(object(), PARAMS)  # type: ignore[arg-type]
    c = model_counts(25, 1e9)
    partial = dataclasses.replace(c, disclosed=((c.disclosed[0][0], c.disclosed[0][1] - 1), *c.disclosed[1:]))
    with pytest.raises(EstimationError, match="test-basis"):
        estimate(partial, PARAMS)
    empty = dataclasses.replace(
        c, pulses=0, detections=(0, 0, 0), sifted=((0, 0),) * 3, disclosed=((0, 0),) * 3, errors=((0, 0),) * 3,
        key_bits=0,
    )
    e = estimate(empty, PARAMS)
    assert AbortReason.INSUFFICIENT_STATISTICS in e.decision.reasons and e.max_key_length_bits == 0


# ----------------------------------------------------------- detections of the sampler


def sifted_counts(length_km: float, n_pulses: int, *, eve: Eavesdropper | None = None, sample_fraction=0.1,
                  n_windows=10, **optics) -> BlockCounts:  # fmt: skip
    """Sample the optical layer and sift it as one block; both ends' counts must agree."""
    params = gys(length_km, p_z=0.5, class_p=CLASS_P, eve=eve or Eavesdropper(), **optics)
    windows, _ = sample_windows(params, n_pulses, n_windows)
    a, b = make_pair(params, sample_fraction=sample_fraction, batch=1 << 18).run(windows)
    assert a.counts == b.counts
    return a.counts


def rate_sigma(counts: BlockCounts, params: EstimationParameters) -> float:
    """Delta-method standard deviation of the estimated rate (module docstring)."""
    base = estimate(counts, params).asymptotic_rate_per_pulse
    var = 0.0
    pulses = counts.pulses_per_class
    for k in range(3):
        d = counts.detections[k]
        sd = math.sqrt(d * (1.0 - d / pulses[k]))
        h = max(1, round(sd))
        det = list(counts.detections)
        det[k] += h
        moved = estimate(dataclasses.replace(counts, detections=tuple(det)), params).asymptotic_rate_per_pulse
        var += ((moved - base) / h * sd) ** 2
        m, n = sum(counts.errors[k]), sum(counts.disclosed[k])
        sm = math.sqrt(m * (1.0 - m / n))
        h = max(1, round(sm))
        b = 0 if counts.disclosed[k][0] - counts.errors[k][0] >= h else 1  # a cell with room for h more errors
        errs = [list(row) for row in counts.errors]
        errs[k][b] += h
        bumped = dataclasses.replace(counts, errors=tuple(tuple(row) for row in errs))
        moved = estimate(bumped, params).asymptotic_rate_per_pulse
        var += ((moved - base) / h * sm) ** 2
    return math.sqrt(var)


SAMPLER_CASES = [
    # (length_km, pulses): sigma_R / R ~ 1.2-1.5 % for each (Monte Carlo of the estimator).
    pytest.param(10, 300_000_000, id="10km"),
    pytest.param(25, 1_000_000_000, id="25km-bb84-metro"),
    pytest.param(50, 3_000_000_000, id="50km"),
    pytest.param(100, 100_000_000_000, id="100km"),
]


@pytest.mark.parametrize("length_km, n_pulses", SAMPLER_CASES)
def test_estimated_rate_from_sampled_detections_matches_the_asymptotic_formula(length_km, n_pulses):
    counts = sifted_counts(length_km, n_pulses)
    est = estimate(counts, PARAMS)
    reference = asymptotic_key_rate(GYS, length_km, DecoyMethod.VACUUM_WEAK)
    sigma = rate_sigma(counts, PARAMS)
    assert Z4 * sigma < 0.1 * reference  # the block is large enough for the 10 % test
    rate = est.asymptotic_rate_per_pulse
    assert abs(rate - reference) <= 0.1 * reference  # issue 4's tolerance
    assert abs(rate - reference) <= Z4 * sigma  # and the statistics agree with the model
    assert not est.decision.abort and est.alarm is None
    assert est.max_key_length_bits > 0


def test_the_delta_method_sigma_agrees_with_a_monte_carlo_of_the_counts():
    # Guards the justification of the block sizes above: redraw the six counts of a 25 km
    # block 300 times and compare the spread of the estimated rate with rate_sigma.
    rng = np.random.default_rng(11)
    base = model_counts(25, 1e9, r=0.1)
    eta = float(GYS.transmittance(25))
    rates = []
    for _ in range(300):
        det, errs = [], []
        for k, mu in enumerate(MU):
            q = float(expected_gain(mu, eta, GYS.dark_count_yield))
            e = float(expected_error_rate(mu, eta, GYS.dark_count_yield, GYS.misalignment_error))
            det.append(int(rng.binomial(int(base.pulses_per_class[k]), q)))
            errs.append(tuple(int(rng.binomial(n, e)) for n in base.disclosed[k]))
        c = dataclasses.replace(base, detections=tuple(det), errors=tuple(errs))
        rates.append(estimate(c, PARAMS).asymptotic_rate_per_pulse)
    spread = float(np.std(rates))
    # The sample standard deviation of 300 draws is within ~8 % (2 sigma) of the true one.
    assert spread == pytest.approx(rate_sigma(base, PARAMS), rel=0.2)


# ------------------------------------------------------------------------ eavesdroppers

# Intercept-resend tests run at 25 km on 3e8 pulses with half the signal key-basis bits
# sampled: ~1.2e5 sample bits, so sigma(QBER) <= 6.3e-4 at QBER 0.05 and the difference of
# two runs has 4 sigma <= 0.0036 < 0.005 (the tolerance).
IR_PULSES = 300_000_000


def test_full_intercept_resend_gives_a_quarter_qber_and_the_alarm():
    honest = estimate(sifted_counts(25, IR_PULSES, sample_fraction=0.5), PARAMS)
    counts = sifted_counts(25, IR_PULSES, eve=Eavesdropper(intercept_fraction=1.0), sample_fraction=0.5)
    est = estimate(counts, PARAMS)
    # Eve resends what she took, so every sifted bit she measured in the wrong basis
    # (half of them) is random: QBER = E + (1/4 - E/2) = 1/4 + E/2 (E the honest QBER).
    expected = 0.25 + honest.qber / 2
    n = est.qber_sample_bits
    sigma = math.sqrt(expected * (1 - expected) / n + honest.qber / honest.qber_sample_bits)
    assert abs(est.qber - expected) <= Z4 * sigma
    assert est.qber > 0.25
    assert est.decision.abort and AbortReason.QBER_ABOVE_THRESHOLD in est.decision.reasons
    alarm = est.alarm
    assert alarm is not None and alarm.reason is AbortReason.QBER_ABOVE_THRESHOLD
    assert alarm.qber == max(est.qber, est.test_basis_qber) and alarm.qber_threshold == 0.11
    assert key_length(est, 0) == 0  # nothing from the attacked block reaches the pool
    assert "key" not in " ".join(f.name for f in dataclasses.fields(alarm))


def test_partial_intercept_resend_raises_the_qber_by_f_over_4():
    # e_d = 0 isolates Eve's contribution, f (1/4 - E/2), which is f/4 up to f E/2 ~ 1e-5.
    f = 0.2
    base = estimate(sifted_counts(25, IR_PULSES, sample_fraction=0.5, misalignment_error=0.0), PARAMS)
    eve = estimate(
        sifted_counts(
            25, IR_PULSES, eve=Eavesdropper(intercept_fraction=f), sample_fraction=0.5, misalignment_error=0.0
        ),
        PARAMS,
    )
    rise = eve.qber - base.qber
    sigma = math.sqrt(eve.qber * (1 - eve.qber) / eve.qber_sample_bits + base.qber / base.qber_sample_bits)
    assert Z4 * sigma < 0.005
    assert abs(rise - f / 4) <= 0.005  # issue 4's tolerance
    assert abs(rise - f * (0.25 - base.qber / 2)) <= Z4 * sigma


def test_alarm_fires_above_the_threshold_set_for_the_link():
    # GYS misalignment: honest QBER ~3.4 %, with f = 0.2 ~8.0 % (E + f (1/4 - E/2)). A
    # threshold of 6 % sits > 20 sigma from both (sigma <= 8e-4 with the sample above).
    strict = dataclasses.replace(PARAMS, qber_threshold=0.06)
    honest_counts = sifted_counts(25, IR_PULSES, sample_fraction=0.5)
    eve_counts = sifted_counts(25, IR_PULSES, eve=Eavesdropper(intercept_fraction=0.2), sample_fraction=0.5)
    honest, attacked = estimate(honest_counts, strict), estimate(eve_counts, strict)
    assert honest.qber < 0.05 and attacked.qber > 0.07
    # (This small block, half of it sampled, is too short for a finite key anyway — an
    # abort without an alarm; the QBER does not flag it.)
    assert honest.alarm is None and AbortReason.QBER_ABOVE_THRESHOLD not in honest.decision.reasons
    assert attacked.alarm is not None and attacked.alarm.reason is AbortReason.QBER_ABOVE_THRESHOLD
    assert attacked.alarm.qber > 0.06 and key_length(attacked, 0) == 0
    # Under the default Shor-Preskill threshold the same block is not flagged for its QBER.
    lenient = estimate(eve_counts, PARAMS)
    assert AbortReason.QBER_ABOVE_THRESHOLD not in lenient.decision.reasons


def test_photon_number_splitting_removes_the_single_photon_bound_and_fires_the_alarm():
    # PNS at 50 km with the signal gain kept at its honest value (pns_gain_matching): the
    # QBER looks normal, but the decoy gain collapses and Y1^L (Ma et al. Eq. (34)) is 0.
    eve = pns_gain_matching(OpticalLinkConfig(length_km=50, class_probabilities=CLASS_P))
    assert eve.pns and eve.pns_single_block == 1.0
    honest = estimate(sifted_counts(50, 2_000_000_000), PARAMS)
    attacked = estimate(sifted_counts(50, 2_000_000_000, eve=eve), PARAMS)
    assert honest.bounds.yield_lower > 0 and honest.alarm is None
    assert abs(attacked.qber - honest.qber) < 0.005
    assert attacked.gains[0] == pytest.approx(honest.gains[0], rel=0.02)
    assert attacked.bounds.yield_lower == 0.0
    assert attacked.alarm is not None and attacked.alarm.reason is AbortReason.NO_SINGLE_PHOTON_BOUND
    assert attacked.alarm.reason in ALARM_REASONS and attacked.max_key_length_bits == 0
