"""Physics models against hand-worked values, published formulas and brute-force numerics.

Hand-worked values are spelled out in comments. Statistical checks use fixed seeds and a
tolerance of 4 standard errors (the failure rate of a correct model is < 1e-4).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from emulator.kernels import BellState, kraus_depolarizing
from emulator.physics import (
    BELL_CORRELATION_SIGNS,
    DEFAULT_ATTENUATION_DB_PER_KM,
    FIBRE_DELAY_S_PER_KM,
    FIBRE_GROUP_INDEX,
    SPEED_OF_LIGHT_KM_PER_S,
    DecoyIntensities,
    HeraldingScheme,
    IntensityClass,
    MemoryModel,
    MemoryParameterError,
    PhysicsParameterError,
    amplitude_damping_gamma,
    average_gate_fidelity,
    bell_diagonal_state,
    bell_fidelity,
    bell_projector,
    bell_vector,
    chsh_werner,
    click_probability,
    dead_time_throughput_factor,
    double_click_model,
    error_click_probability,
    fidelity_from_correlations,
    gate_depolarizing_probability,
    loss_db,
    memory_decay_kraus,
    multi_photon_probability,
    n_photon_yield,
    pauli_correlations,
    photon_number_pmf,
    propagation_delay_s,
    pure_dephasing_probability,
    quantum_bit_error_rate,
    registered_click_rate_hz,
    sample_attempts,
    sample_heralded_bells,
    sample_photon_numbers,
    single_click_model,
    single_click_state,
    transmittance,
    werner_fidelity,
    werner_fidelity_after_dephasing,
    werner_state,
    werner_visibility,
)

X = np.array([[0, 1], [1, 0]], dtype=np.complex128)
Y = np.array([[0, -1j], [1j, 0]], dtype=np.complex128)
Z = np.array([[1, 0], [0, -1]], dtype=np.complex128)


def apply_kraus_kron(rho: np.ndarray, kraus_a: np.ndarray, kraus_b: np.ndarray) -> np.ndarray:
    """Plain-numpy reference: (E_a (x) E_b)(rho) on two qubits, qubit 0 = a (kron order)."""
    out = np.zeros_like(rho)
    for ka in kraus_a:
        for kb in kraus_b:
            k = np.kron(ka, kb)
            out += k @ rho @ k.conj().T
    return out


def apply_kraus_1(rho: np.ndarray, kraus: np.ndarray) -> np.ndarray:
    return sum(k @ rho @ k.conj().T for k in kraus)


def random_density_matrix(rng: np.random.Generator, dim: int) -> np.ndarray:
    g = rng.normal(size=(dim, dim)) + 1j * rng.normal(size=(dim, dim))
    rho = g @ g.conj().T
    return rho / np.trace(rho)


def assert_state(rho: np.ndarray) -> None:
    assert np.allclose(rho, rho.conj().T, atol=1e-12)
    assert np.trace(rho).real == pytest.approx(1.0, abs=1e-12)
    assert np.linalg.eigvalsh(rho).min() > -1e-12


# ------------------------------------------------------------------------------ constants


def test_constants() -> None:
    assert FIBRE_DELAY_S_PER_KM == 4.9e-6
    assert DEFAULT_ATTENUATION_DB_PER_KM == 0.2
    # n_g / c = 1.47 / 299792.458 km/s = 4.903 us/km, which DESIGN §3 rounds to 4.9 us/km.
    assert FIBRE_GROUP_INDEX / SPEED_OF_LIGHT_KM_PER_S == pytest.approx(FIBRE_DELAY_S_PER_KM, rel=1e-3)


# ---------------------------------------------------------------------------------- fibre


@pytest.mark.parametrize(
    ("length_km", "alpha_db_per_km", "expected"),
    [
        (0.0, 0.2, 1.0),
        (50.0, 0.2, 0.1),  # 10 dB
        (100.0, 0.2, 0.01),  # 20 dB
        (25.0, 0.2, 10**-0.5),  # 5 dB = 0.316228
        (10.0, 0.35, 10**-0.35),  # 3.5 dB at 1310 nm = 0.446684
    ],
)
def test_transmittance(length_km: float, alpha_db_per_km: float, expected: float) -> None:
    assert transmittance(length_km, alpha_db_per_km) == pytest.approx(expected, rel=1e-12)


def test_transmittance_default_and_loss() -> None:
    assert transmittance(50.0) == pytest.approx(0.1, rel=1e-12)
    assert loss_db(30.0) == pytest.approx(6.0)


def test_propagation_delay() -> None:
    assert propagation_delay_s(0.0) == 0.0
    assert propagation_delay_s(100.0) == pytest.approx(4.9e-4, rel=1e-12)  # 100 km -> 490 us


@pytest.mark.parametrize("bad", [-1.0, math.nan, math.inf])
def test_fibre_rejects_bad_length(bad: float) -> None:
    with pytest.raises(PhysicsParameterError):
        transmittance(bad)
    with pytest.raises(PhysicsParameterError):
        propagation_delay_s(bad)


def test_fibre_rejects_negative_attenuation() -> None:
    with pytest.raises(PhysicsParameterError):
        transmittance(1.0, -0.2)


# ----------------------------------------------------------------------------------- bell


def test_bell_vectors_orthonormal_and_kron_order() -> None:
    m = np.stack([bell_vector(b) for b in BellState])
    assert np.allclose(m @ m.conj().T, np.eye(4))
    # Phi+ from H on qubit 0 then CNOT(0 -> 1) on |00>, built with plain kron.
    h = np.array([[1, 1], [1, -1]]) / math.sqrt(2)
    cnot = np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1], [0, 0, 1, 0]])
    psi = cnot @ np.kron(h, np.eye(2)) @ np.array([1, 0, 0, 0])
    assert np.allclose(psi, bell_vector(BellState.PHI_PLUS))
    # Psi- is antisymmetric under swapping the qubits.
    swap = np.array([[1, 0, 0, 0], [0, 0, 1, 0], [0, 1, 0, 0], [0, 0, 0, 1]])
    assert np.allclose(swap @ bell_vector(BellState.PSI_MINUS), -bell_vector(BellState.PSI_MINUS))


@pytest.mark.parametrize("bell", list(BellState))
def test_bell_correlation_signs(bell: BellState) -> None:
    # The brief's sign table (Phi+: +,-,+; Phi-: -,+,+; Psi+: +,+,-; Psi-: -,-,-) checked
    # by computing <XX>, <YY>, <ZZ> of each Bell state and the projector expansion.
    expected = {
        BellState.PHI_PLUS: (1, -1, 1),
        BellState.PHI_MINUS: (-1, 1, 1),
        BellState.PSI_PLUS: (1, 1, -1),
        BellState.PSI_MINUS: (-1, -1, -1),
    }[bell]
    assert BELL_CORRELATION_SIGNS[bell] == expected
    assert np.allclose(pauli_correlations(bell_projector(bell)), expected)
    sx, sy, sz = expected
    expansion = (np.eye(4) + sx * np.kron(X, X) + sy * np.kron(Y, Y) + sz * np.kron(Z, Z)) / 4
    assert np.allclose(expansion, bell_projector(bell))


def test_fidelity_from_correlations_matches_direct_fidelity() -> None:
    rng = np.random.default_rng(11)
    for _ in range(20):
        rho = random_density_matrix(rng, 4)
        xx, yy, zz = pauli_correlations(rho)
        for bell in BellState:
            assert fidelity_from_correlations(xx, yy, zz, bell) == pytest.approx(
                bell_fidelity(rho, bell), abs=1e-12
            )
    assert fidelity_from_correlations(1.0, -1.0, 1.0, BellState.PHI_PLUS) == 1.0
    assert fidelity_from_correlations(1.0, -1.0, 1.0, BellState.PSI_MINUS) == 0.0


@pytest.mark.parametrize("bell", list(BellState))
def test_werner_state(bell: BellState) -> None:
    rho = werner_state(bell, 0.8)
    assert_state(rho)
    assert bell_fidelity(rho, bell) == pytest.approx(0.85)  # (1 + 3*0.8)/4
    others = [bell_fidelity(rho, b) for b in BellState if b != bell]
    assert others == pytest.approx([0.05, 0.05, 0.05])  # (1 - V)/4 each
    assert werner_fidelity(0.8) == pytest.approx(0.85)
    assert werner_visibility(0.85) == pytest.approx(0.8)


def test_bell_diagonal_state() -> None:
    rho = bell_diagonal_state([0.7, 0.1, 0.15, 0.05])
    assert_state(rho)
    assert [bell_fidelity(rho, b) for b in BellState] == pytest.approx([0.7, 0.1, 0.15, 0.05])
    with pytest.raises(PhysicsParameterError):
        bell_diagonal_state([0.5, 0.5, 0.5, -0.5])
    with pytest.raises(PhysicsParameterError):
        bell_diagonal_state([0.5, 0.4])


def test_werner_rejects_bad_visibility() -> None:
    with pytest.raises(PhysicsParameterError):
        werner_state(BellState.PHI_PLUS, 1.1)
    with pytest.raises(PhysicsParameterError):
        werner_state(7, 0.5)


def test_chsh_werner_known_values() -> None:
    assert chsh_werner(1.0) == pytest.approx(2 * math.sqrt(2))  # Tsirelson bound
    assert chsh_werner(0.25) == pytest.approx(0.0)  # maximally mixed
    # Violation threshold V = 1/sqrt2 <=> F = (1 + 3/sqrt2)/4 = 0.78033.
    assert chsh_werner((1 + 3 / math.sqrt(2)) / 4) == pytest.approx(2.0)
    assert chsh_werner(0.9) == pytest.approx(2 * math.sqrt(2) * (3.6 - 1) / 3)  # 2.4513


def test_chsh_werner_matches_explicit_settings_and_horodecki() -> None:
    # Phi+ Werner state with the textbook optimal settings A0 = Z, A1 = X,
    # B0 = (Z + X)/sqrt2, B1 = (Z - X)/sqrt2: S = <A0B0> + <A0B1> + <A1B0> - <A1B1>.
    f = 0.9
    rho = werner_state(BellState.PHI_PLUS, werner_visibility(f))
    b0, b1 = (Z + X) / math.sqrt(2), (Z - X) / math.sqrt(2)

    def corr(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.real(np.trace(rho @ np.kron(a, b))))

    s = corr(Z, b0) + corr(Z, b1) + corr(X, b0) - corr(X, b1)
    assert s == pytest.approx(chsh_werner(f), abs=1e-12)
    # Horodecki 1995: 2*sqrt(t1^2 + t2^2) from the correlation matrix T_ij = Tr(rho s_i s_j).
    paulis = (X, Y, Z)
    for bell in BellState:
        rho = werner_state(bell, werner_visibility(f))
        t = np.array([[np.real(np.trace(rho @ np.kron(a, b))) for b in paulis] for a in paulis])
        sv = np.linalg.svd(t, compute_uv=False)
        assert 2 * math.sqrt(sv[0] ** 2 + sv[1] ** 2) == pytest.approx(chsh_werner(f), abs=1e-12)


# ------------------------------------------------------------------------------ heralding


def test_double_click_hand_worked() -> None:
    # 50 km link: each arm 25 km = 5 dB -> 10^-0.5; eta = 0.8 * 10^-0.5, eta^2 = 0.064,
    # p = eta^2/2 = 0.032; T = 50 km * 4.9 us/km = 245 us; F = (1 + 3*0.9)/4 = 0.925.
    m = double_click_model(50.0, detector_efficiency=0.8, visibility=0.9)
    assert m.scheme is HeraldingScheme.DOUBLE_CLICK
    assert m.arm_efficiency == pytest.approx(0.8 * 10**-0.5)
    assert m.p_success == pytest.approx(0.032)
    assert m.attempt_period_s == pytest.approx(245e-6)
    assert m.pair_rate_hz == pytest.approx(0.032 / 245e-6)  # ~130.6 pairs/s
    assert m.fidelity == pytest.approx(0.925)
    assert m.bells == (BellState.PSI_PLUS, BellState.PSI_MINUS)
    assert_state(m.state)
    assert bell_fidelity(m.state, BellState.PSI_PLUS) == pytest.approx(0.925)
    minus = m.state_for(BellState.PSI_MINUS)
    assert_state(minus)
    assert np.allclose(minus, werner_state(BellState.PSI_MINUS, 0.9))
    assert np.allclose(m.state_for(BellState.PSI_PLUS), m.state)
    with pytest.raises(PhysicsParameterError):
        m.state_for(BellState.PHI_PLUS)
    assert not m.state.flags.writeable


def test_double_click_ideal_zero_length() -> None:
    m = double_click_model(0.0)
    assert m.p_success == pytest.approx(0.5)  # Barrett-Kok with perfect detection: 1/2
    assert m.fidelity == 1.0
    assert m.pair_rate_hz == math.inf


def test_single_click_hand_worked() -> None:
    # Same 50 km link, alpha = 0.1: eta = 0.8 * 10^-0.5 = 0.252982; p = 2*0.1*eta = 0.0505964;
    # F = (1 - 0.1)(1 + 0.9)/2 = 0.855.
    m = single_click_model(50.0, 0.1, detector_efficiency=0.8, visibility=0.9)
    assert m.scheme is HeraldingScheme.SINGLE_CLICK
    assert m.p_success == pytest.approx(0.0505964, rel=1e-5)
    assert m.attempt_period_s == pytest.approx(245e-6)
    assert m.fidelity == pytest.approx(0.855)
    assert_state(m.state)
    assert bell_fidelity(m.state, BellState.PSI_PLUS) == pytest.approx(0.855)
    assert bell_fidelity(m.state, BellState.PSI_MINUS) == pytest.approx(0.9 * 0.05)  # (1-a)(1-V)/2
    assert m.state[3, 3].real == pytest.approx(0.1)  # alpha |11><11|
    minus = m.state_for(BellState.PSI_MINUS)
    assert np.allclose(minus, single_click_state(BellState.PSI_MINUS, 0.1, 0.9))
    assert bell_fidelity(minus, BellState.PSI_MINUS) == pytest.approx(0.855)


def test_single_click_rate_fidelity_tradeoff() -> None:
    low = single_click_model(10.0, 0.05)
    high = single_click_model(10.0, 0.2)
    assert high.p_success == pytest.approx(4 * low.p_success)
    assert high.fidelity == pytest.approx(0.8) and low.fidelity == pytest.approx(0.95)


@pytest.mark.parametrize("alpha", [0.0, 0.6, -0.1])
def test_single_click_rejects_alpha(alpha: float) -> None:
    with pytest.raises(PhysicsParameterError):
        single_click_model(10.0, alpha)


def test_single_click_state_rejects_phi() -> None:
    with pytest.raises(PhysicsParameterError):
        single_click_state(BellState.PHI_PLUS, 0.1, 1.0)


def test_heralding_rejects_bad_efficiency() -> None:
    with pytest.raises(PhysicsParameterError):
        double_click_model(10.0, detector_efficiency=1.5)


def test_sample_attempts_geometric() -> None:
    rng = np.random.default_rng(2024)
    p, n = 0.1, 100_000
    a = sample_attempts(rng, p, n)
    assert a.dtype == np.int64 and a.shape == (n,)
    assert a.min() >= 1
    # Geometric mean 1/p = 10, std sqrt(1-p)/p = 9.487; std of the mean = 0.030; 4 sigma.
    assert abs(a.mean() - 1 / p) < 4 * math.sqrt(1 - p) / p / math.sqrt(n)
    # P(k = 1) = p; binomial std sqrt(p(1-p)/n) = 9.5e-4; 4 sigma.
    assert abs(np.mean(a == 1) - p) < 4 * math.sqrt(p * (1 - p) / n)
    assert np.array_equal(sample_attempts(np.random.default_rng(5), p, 50), sample_attempts(np.random.default_rng(5), p, 50))
    assert np.all(sample_attempts(rng, 1.0, 10) == 1)
    with pytest.raises(PhysicsParameterError):
        sample_attempts(rng, 0.0, 10)


def test_sample_heralded_bells_uniform() -> None:
    rng = np.random.default_rng(7)
    m = double_click_model(20.0)
    n = 40_000
    b = sample_heralded_bells(rng, m, n)
    assert set(np.unique(b).tolist()) == {int(BellState.PSI_PLUS), int(BellState.PSI_MINUS)}
    # Binomial(n, 1/2): std of the fraction 0.0025; 4 sigma.
    assert abs(np.mean(b == BellState.PSI_PLUS) - 0.5) < 4 * 0.5 / math.sqrt(n)


# --------------------------------------------------------------------------------- memory


def test_memory_kraus_trace_preserving_and_t1_t2() -> None:
    t1_s, t2_s, t_s = 1.0, 0.5, 0.3
    k = memory_decay_kraus(t_s, t1_s, t2_s)
    assert k.dtype == np.complex128 and k.shape[1:] == (2, 2) and 1 <= k.shape[0] <= 3
    assert np.allclose(sum(ki.conj().T @ ki for ki in k), np.eye(2))
    rng = np.random.default_rng(3)
    rho = random_density_matrix(rng, 2)
    out = apply_kraus_1(rho, k)
    # Excited population decays with T1, coherence with T2 (N&C §8.3.5-8.3.6).
    assert out[1, 1].real == pytest.approx(rho[1, 1].real * math.exp(-t_s / t1_s), rel=1e-12)
    assert out[0, 1] == pytest.approx(rho[0, 1] * math.exp(-t_s / t2_s), rel=1e-12)
    # gamma = 1 - e^{-0.3} = 0.259182; 1/T_phi = 1/0.5 - 1/2 = 1.5/s, p = (1 - e^{-0.45})/2.
    assert amplitude_damping_gamma(t_s, t1_s) == pytest.approx(0.2591817793)
    assert pure_dephasing_probability(t_s, t1_s, t2_s) == pytest.approx((1 - math.exp(-0.45)) / 2)


def test_memory_t2_equal_2t1_is_pure_amplitude_damping() -> None:
    out = apply_kraus_1(np.full((2, 2), 0.5, dtype=np.complex128), memory_decay_kraus(0.7, 2.0, 4.0))
    assert out[0, 1].real == pytest.approx(0.5 * math.exp(-0.7 / 4.0))
    assert pure_dephasing_probability(0.7, 2.0, 4.0) == pytest.approx(0.0, abs=1e-15)


def test_memory_infinite_times() -> None:
    ident = memory_decay_kraus(5.0, math.inf, math.inf)
    assert ident.shape == (1, 2, 2) and np.allclose(ident[0], np.eye(2))
    assert memory_decay_kraus(0.0, 1.0, 1.0).shape == (1, 2, 2)
    # T1 = inf: pure dephasing only, populations untouched.
    k = memory_decay_kraus(1.0, math.inf, 2.0)
    rho = np.array([[0.3, 0.2], [0.2, 0.7]], dtype=np.complex128)
    out = apply_kraus_1(rho, k)
    assert out[1, 1].real == pytest.approx(0.7)
    assert out[0, 1].real == pytest.approx(0.2 * math.exp(-0.5))


@pytest.mark.parametrize(("t1_s", "t2_s"), [(1.0, 2.5), (1.0, math.inf), (0.0, 1.0), (1.0, -1.0), (math.nan, 1.0)])
def test_memory_rejects_unphysical_times(t1_s: float, t2_s: float) -> None:
    with pytest.raises(MemoryParameterError):
        memory_decay_kraus(1.0, t1_s, t2_s)
    with pytest.raises(MemoryParameterError):
        MemoryModel(t1_s, t2_s)


def test_memory_model() -> None:
    assert MemoryModel().is_ideal
    m = MemoryModel(t1_s=10.0, t2_s=1.0)
    assert not m.is_ideal
    assert np.array_equal(m.kraus(0.2), memory_decay_kraus(0.2, 10.0, 1.0))
    with pytest.raises(PhysicsParameterError):
        m.kraus(-1.0)


def test_werner_fidelity_after_dephasing_hand_worked() -> None:
    # t = T2 ln2 / 2 -> e^{-2t/T2} = 1/2; F = (1 + 0.9 + 2*0.9*0.5)/4 = 0.7.
    assert werner_fidelity_after_dephasing(0.9, 0.5 * math.log(2.0), 1.0) == pytest.approx(0.7)
    assert werner_fidelity_after_dephasing(0.9, 0.0, 1.0) == pytest.approx(0.925)  # (1+3V)/4
    assert werner_fidelity_after_dephasing(0.9, 1e6, 1.0) == pytest.approx(0.475)  # (1+V)/4


@pytest.mark.parametrize("bell", list(BellState))
@pytest.mark.parametrize(("visibility", "elapsed_s", "t2_s"), [(0.9, 0.01, 0.05), (1.0, 1.0, 1.0), (0.6, 3.0, 0.7)])
def test_werner_fidelity_after_dephasing_matches_kraus(
    bell: BellState, visibility: float, elapsed_s: float, t2_s: float
) -> None:
    k = memory_decay_kraus(elapsed_s, math.inf, t2_s)
    out = apply_kraus_kron(werner_state(bell, visibility), k, k)
    assert_state(out)
    assert bell_fidelity(out, bell) == pytest.approx(
        werner_fidelity_after_dephasing(visibility, elapsed_s, t2_s), abs=1e-12
    )


# ------------------------------------------------------------------------------- detector


def test_click_probability_hand_worked() -> None:
    # mu = 0.5, eta = 0.1, Y0 = 1e-5: 1 - (1 - 1e-5) e^{-0.05} = 1 - 0.99999 * 0.9512294245
    # = 1 - (0.9512294245 - 0.0000095123) = 0.0487800878.
    assert click_probability(0.5, 0.1, 1e-5) == pytest.approx(0.0487800878, rel=1e-8)
    assert click_probability(0.0, 0.5, 2e-6) == pytest.approx(2e-6)  # vacuum: dark counts only
    assert click_probability(1.0, 0.0, 0.0) == 0.0
    # Ma et al. 2005 first-order form Y0 + 1 - e^{-eta mu} differs by Y0 (1 - e^{-eta mu}).
    exact = click_probability(0.5, 0.1, 1e-5)
    first_order = 1e-5 + 1 - math.exp(-0.05)
    assert first_order - exact == pytest.approx(1e-5 * (1 - math.exp(-0.05)), rel=1e-6)


def test_click_probability_is_poisson_average_of_yields() -> None:
    # Q_mu = sum_n P_mu(n) Y_n (Ma et al. 2005, Sec. II), summed explicitly.
    mu, eta, y0 = 0.8, 0.3, 1e-3
    series = sum(photon_number_pmf(mu, n) * n_photon_yield(n, eta, y0) for n in range(60))
    assert click_probability(mu, eta, y0) == pytest.approx(series, rel=1e-12)
    assert n_photon_yield(0, eta, y0) == pytest.approx(y0, rel=1e-12)
    assert n_photon_yield(1, eta, y0) == pytest.approx(y0 + eta - y0 * eta)


def test_qber_hand_worked() -> None:
    # No dark counts: every error is misalignment -> QBER = e_d.
    assert quantum_bit_error_rate(0.5, 0.1, 0.0, 0.01) == pytest.approx(0.01)
    # Vacuum pulses: only dark counts -> random bits, QBER = 1/2.
    assert quantum_bit_error_rate(0.0, 0.1, 1e-6, 0.01) == pytest.approx(0.5)
    # mu = 0.5, eta = 1e-3, Y0 = 1e-5, e_d = 0.02:
    # s = 1 - e^{-5e-4} = 4.99875e-4; Q = 1 - (1 - 1e-5) e^{-5e-4} = 5.09870e-4;
    # EQ = 0.5 * 1e-5 * e^{-5e-4} + 0.02 * s = 4.99750e-6 + 9.99750e-6 = 1.49950e-5;
    # E = 1.49950e-5 / 5.09870e-4 = 0.0294095.
    assert error_click_probability(0.5, 1e-3, 1e-5, 0.02) == pytest.approx(1.49950e-5, rel=1e-5)
    assert quantum_bit_error_rate(0.5, 1e-3, 1e-5, 0.02) == pytest.approx(0.0294095, rel=1e-5)
    assert quantum_bit_error_rate(0.5, 0.0, 0.0, 0.02) == 0.0  # nothing clicks


def test_dead_time() -> None:
    # R = 1 MHz, tau = 100 ns: R tau = 0.1 -> factor 1/1.1 = 0.909091, 909 091 clicks/s.
    assert dead_time_throughput_factor(1e6, 100e-9) == pytest.approx(1 / 1.1)
    assert registered_click_rate_hz(1e6, 100e-9) == pytest.approx(1e6 / 1.1)
    assert dead_time_throughput_factor(1e6, 0.0) == 1.0
    # Saturation: registered rate tends to 1/tau.
    assert registered_click_rate_hz(1e12, 1e-6) == pytest.approx(1e6, rel=1e-5)
    with pytest.raises(PhysicsParameterError):
        dead_time_throughput_factor(-1.0, 1e-6)


def test_detector_rejects_bad_probabilities() -> None:
    with pytest.raises(PhysicsParameterError):
        click_probability(0.5, 1.2, 0.0)
    with pytest.raises(PhysicsParameterError):
        click_probability(-0.5, 0.5, 0.0)
    with pytest.raises(PhysicsParameterError):
        quantum_bit_error_rate(0.5, 0.5, 0.0, 1.5)


# --------------------------------------------------------------------------------- source


def test_photon_number_pmf_hand_worked() -> None:
    # mu = 0.5: P(0) = e^{-0.5} = 0.6065307, P(1) = 0.3032653, P(2) = 0.0758163.
    assert photon_number_pmf(0.5, 0) == pytest.approx(0.6065306597)
    assert photon_number_pmf(0.5, 1) == pytest.approx(0.3032653299)
    assert photon_number_pmf(0.5, 2) == pytest.approx(0.0758163325)
    pmf = photon_number_pmf(0.5, np.arange(40))
    assert isinstance(pmf, np.ndarray) and pmf.sum() == pytest.approx(1.0, abs=1e-14)
    assert photon_number_pmf(0.0, 0) == 1.0 and photon_number_pmf(0.0, 3) == 0.0
    assert photon_number_pmf(50.0, 200) > 0.0  # no overflow in n! or mu^n
    with pytest.raises(PhysicsParameterError):
        photon_number_pmf(0.5, -1)


def test_multi_photon_probability() -> None:
    # 1 - e^{-0.5}(1.5) = 1 - 0.9097960 = 0.0902040.
    assert multi_photon_probability(0.5) == pytest.approx(0.0902040104)
    # Small mu: ~ mu^2/2 (next term -mu^3/3); keeps precision where 1 - e^{-mu}(1+mu) cancels.
    assert multi_photon_probability(1e-4) == pytest.approx(0.5e-8 * (1 - 2e-4 / 3), rel=1e-6)


def test_sample_photon_numbers() -> None:
    rng = np.random.default_rng(99)
    n = 200_000
    s = sample_photon_numbers(rng, 0.5, n)
    assert s.dtype == np.int64
    # Poisson mean 0.5, std sqrt(0.5); std of the mean 1.58e-3; 4 sigma.
    assert abs(s.mean() - 0.5) < 4 * math.sqrt(0.5 / n)
    # P(0) = 0.60653; binomial std 1.09e-3; 4 sigma.
    p0 = math.exp(-0.5)
    assert abs(np.mean(s == 0) - p0) < 4 * math.sqrt(p0 * (1 - p0) / n)


def test_decoy_intensities() -> None:
    d = DecoyIntensities(signal=0.6, decoy=0.1)
    assert d.mean_photon_number(IntensityClass.SIGNAL) == 0.6
    assert d.mean_photon_number(IntensityClass.DECOY) == 0.1
    assert d.mean_photon_number(IntensityClass.VACUUM) == 0.0
    with pytest.raises(PhysicsParameterError):
        DecoyIntensities(signal=0.1, decoy=0.5)


# ----------------------------------------------------------------------------------- gate


def test_gate_depolarizing_probability_hand_worked() -> None:
    assert gate_depolarizing_probability(0.99) == pytest.approx(0.02)  # d = 2: 2(1 - F)
    assert gate_depolarizing_probability(0.99, n_qubits=2) == pytest.approx(0.04 / 3)  # 4(1-F)/3
    assert gate_depolarizing_probability(1.0) == 0.0
    assert gate_depolarizing_probability(0.5) == pytest.approx(1.0)  # F = 1/d: fully mixed
    assert average_gate_fidelity(gate_depolarizing_probability(0.97, 2), 2) == pytest.approx(0.97)
    with pytest.raises(PhysicsParameterError):
        gate_depolarizing_probability(0.2)
    with pytest.raises(PhysicsParameterError):
        gate_depolarizing_probability(0.9, n_qubits=0)


@pytest.mark.parametrize("n_qubits", [1, 2])
def test_gate_fidelity_relation_numerically(n_qubits: int) -> None:
    d = 2**n_qubits
    p = gate_depolarizing_probability(0.95, n_qubits)

    def channel(rho: np.ndarray) -> np.ndarray:
        return (1 - p) * rho + p * np.trace(rho) * np.eye(d) / d

    # Entanglement fidelity on the maximally entangled probe |phi> = sum_a |aa>/sqrt(d):
    # <phi|(E (x) id)(|phi><phi|)|phi> via the Choi matrix sum_ab E(|a><b|) (x) |a><b| / d.
    phi = np.eye(d).reshape(d * d) / math.sqrt(d)
    choi = np.zeros((d * d, d * d), dtype=np.complex128)
    for a in range(d):
        for b in range(d):
            e_ab = np.zeros((d, d))
            e_ab[a, b] = 1.0
            choi += np.kron(channel(e_ab), e_ab) / d
    f_e = float(np.real(phi @ choi @ phi))
    assert f_e == pytest.approx(1 - p + p / d**2)
    assert (d * f_e + 1) / (d + 1) == pytest.approx(0.95)  # Nielsen 2002 eq. (3)
    # Every pure input has the same fidelity 1 - p(d-1)/d, so the average is exactly that.
    rng = np.random.default_rng(1)
    for _ in range(10):
        v = rng.normal(size=d) + 1j * rng.normal(size=d)
        v /= np.linalg.norm(v)
        rho = np.outer(v, v.conj())
        assert np.real(v.conj() @ channel(rho) @ v) == pytest.approx(0.95)


def test_gate_probability_matches_kernel_depolarizing_convention() -> None:
    # kernels.kraus_depolarizing(p) is rho -> (1-p) rho + p I/2: same p as ours for d = 2.
    p = gate_depolarizing_probability(0.98)
    rho = np.array([[1, 0], [0, 0]], dtype=np.complex128)
    out = apply_kraus_1(rho, kraus_depolarizing(p))
    assert out[0, 0].real == pytest.approx(0.98)
