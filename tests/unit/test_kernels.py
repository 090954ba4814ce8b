"""One test battery for both kernel backends ("numpy" and "c"), plus C-vs-numpy agreement.

- Known answers: gates, bit order, Bell states, measurement probabilities and collapse,
  partial trace, tensor, channels against hand-computed matrices.
- Properties (hypothesis, derandomised, 50 examples): C and numpy agree to 1e-12 on random
  density matrices (Ginibre), random unitaries (QR) and random Kraus sets; trace 1 and
  eigenvalues >= -1e-12 survive gates, channels and measurement; both match a dense
  reference built with np.kron.
- Bad input raises KernelError before any C code runs; selection and build errors.

The "c" parameter FAILS (does not skip) when emulator._cext is missing or stale.
"""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import emulator
from emulator.kernels import (
    GATES,
    Backend,
    Basis,
    BellState,
    KernelBuildError,
    KernelError,
    get_backend,
    kraus_amplitude_damping,
    kraus_dephasing,
    kraus_depolarizing,
    rotation,
)
from emulator.kernels import _c as c_layer
from emulator.kernels._digest import source_digest

ATOL = 1e-12
S2 = 1 / math.sqrt(2)

# Deterministic in CI: same examples every run, no example database on disk.
HYP = settings(
    max_examples=50,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


# ------------------------------------------------------------------------------ helpers


def ket(*amps: complex) -> np.ndarray:
    v = np.asarray(amps, dtype=np.complex128)
    return v / np.linalg.norm(v)


def dm(v: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.outer(v, v.conj()))


def basis_dm(n: int, index: int) -> np.ndarray:
    rho = np.zeros((1 << n, 1 << n), dtype=np.complex128)
    rho[index, index] = 1
    return rho


def random_rho(rng: np.random.Generator, n: int, rank: int) -> np.ndarray:
    """Ginibre ensemble: G G^dagger / tr, G a d x rank complex Gaussian matrix."""
    d = 1 << n
    g = rng.normal(size=(d, rank)) + 1j * rng.normal(size=(d, rank))
    rho = g @ g.conj().T
    return np.ascontiguousarray(rho / np.trace(rho).real)


def random_unitary(rng: np.random.Generator, d: int) -> np.ndarray:
    """Haar unitary: QR of a complex Gaussian with the phases of R's diagonal fixed
    (Mezzadri, Notices AMS 54 (2007) 592, section 5)."""
    z = (rng.normal(size=(d, d)) + 1j * rng.normal(size=(d, d))) / math.sqrt(2)
    q, r = np.linalg.qr(z)
    diag = np.diag(r)
    return np.ascontiguousarray(q * (diag / np.abs(diag)))


def random_kraus(rng: np.random.Generator, k: int) -> np.ndarray:
    """k Kraus operators from a random 2k x 2 isometry V (V^dagger V = I): K_i = V[2i:2i+2]."""
    z = rng.normal(size=(2 * k, 2)) + 1j * rng.normal(size=(2 * k, 2))
    v, _ = np.linalg.qr(z)
    return np.ascontiguousarray(v.reshape(k, 2, 2))


def dense_1q(n: int, q: int, u: np.ndarray) -> np.ndarray:
    return np.kron(np.kron(np.eye(1 << q), u), np.eye(1 << (n - 1 - q)))


def dense_2q(n: int, qa: int, qb: int, u: np.ndarray) -> np.ndarray:
    """Full 2^n operator of u on (qa, qb), entry by entry (independent of both backends)."""
    d = 1 << n
    ba, bb = n - 1 - qa, n - 1 - qb
    others = ~((1 << ba) | (1 << bb))
    full = np.zeros((d, d), dtype=np.complex128)
    for i in range(d):
        for j in range(d):
            if (i & others) == (j & others):
                ki = 2 * ((i >> ba) & 1) + ((i >> bb) & 1)
                kj = 2 * ((j >> ba) & 1) + ((j >> bb) & 1)
                full[i, j] = u[ki, kj]
    return full


def assert_physical(rho: np.ndarray) -> None:
    assert abs(np.trace(rho) - 1) < ATOL
    assert np.allclose(rho, rho.conj().T, atol=ATOL, rtol=0)
    assert np.linalg.eigvalsh((rho + rho.conj().T) / 2).min() >= -ATOL


PHI_PLUS = dm(ket(1, 0, 0, 1))


# --------------------------------------------------------------------- known answers


def test_h_on_zero_gives_plus(backend):
    rho = basis_dm(1, 0)
    backend.apply_1q(rho, 1, 0, GATES["H"])
    np.testing.assert_allclose(rho, np.full((2, 2), 0.5), atol=ATOL, rtol=0)


def test_h_then_cnot_gives_phi_plus(backend):
    rho = basis_dm(2, 0)
    backend.apply_1q(rho, 2, 0, GATES["H"])
    backend.apply_2q(rho, 2, 0, 1, GATES["CNOT"])
    np.testing.assert_allclose(rho, PHI_PLUS, atol=ATOL, rtol=0)
    np.testing.assert_allclose(backend.bell_fidelities(rho, 2, 0, 1), [1, 0, 0, 0], atol=ATOL, rtol=0)


@pytest.mark.parametrize(("qubit", "index"), [(0, 0b10), (1, 0b01)])
def test_x_bit_order(backend, qubit, index):
    """Qubit 0 is the most significant bit: X on qubit 1 of |00> gives |01> (index 1)."""
    rho = basis_dm(2, 0)
    backend.apply_1q(rho, 2, qubit, GATES["X"])
    np.testing.assert_array_equal(rho, basis_dm(2, index))


def test_x_on_kron_factor(backend):
    """np.kron(A, B) has A on qubit 0: X on qubit 0 of |0><0| (x) |+><+| gives |1><1| (x) |+><+|."""
    plus = dm(ket(1, 1))
    rho = np.kron(dm(ket(1, 0)), plus)
    backend.apply_1q(rho, 2, 0, GATES["X"])
    np.testing.assert_allclose(rho, np.kron(dm(ket(0, 1)), plus), atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    ("n", "control", "target", "start", "expected"),
    [
        (2, 1, 0, 0b01, 0b11),  # control is the less significant qubit
        (2, 1, 0, 0b10, 0b10),  # control 0: nothing happens
        (3, 0, 2, 0b100, 0b101),  # non-adjacent qubits
        (3, 2, 0, 0b001, 0b101),
        (3, 2, 1, 0b011, 0b001),
    ],
)
def test_cnot_qubit_order(backend, n, control, target, start, expected):
    """qubit_a is CNOT's control (the more significant index of u), in any register order."""
    rho = basis_dm(n, start)
    backend.apply_2q(rho, n, control, target, GATES["CNOT"])
    np.testing.assert_array_equal(rho, basis_dm(n, expected))


def test_swap_exchanges_qubits(backend):
    a, b = dm(ket(1, 2j)), dm(ket(3, -1))
    rho = np.kron(a, b)
    backend.apply_2q(rho, 2, 1, 0, GATES["SWAP"])
    np.testing.assert_allclose(rho, np.kron(b, a), atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    ("state", "basis", "p0"),
    [
        (ket(1, 1), Basis.X, 1.0),
        (ket(1, 1), Basis.Z, 0.5),
        (ket(1, 1), Basis.Y, 0.5),
        (ket(1, -1), Basis.X, 0.0),
        (ket(1, 1j), Basis.Y, 1.0),
        (ket(1, -1j), Basis.Y, 0.0),
        (ket(0, 1), Basis.Z, 0.0),
        (ket(math.cos(0.3), math.sin(0.3)), Basis.Z, math.cos(0.3) ** 2),
    ],
)
def test_probability(backend, state, basis, p0):
    rho = dm(state)
    before = rho.copy()
    assert backend.probability(rho, 1, 0, basis) == pytest.approx(p0, abs=ATOL)
    np.testing.assert_array_equal(rho, before)  # no collapse


def test_probability_on_entangled_qubit(backend):
    for q in (0, 1):
        for basis in Basis:
            assert backend.probability(PHI_PLUS.copy(), 2, q, basis) == pytest.approx(0.5, abs=ATOL)


@pytest.mark.parametrize(
    ("r", "outcome", "post"),
    [(0.2, 0, basis_dm(2, 0b00)), (0.7, 1, basis_dm(2, 0b11))],
)
def test_measure_phi_plus_in_z(backend, r, outcome, post):
    rho = PHI_PLUS.copy()
    got = backend.measure(rho, 2, 0, Basis.Z, r)
    assert got[0] == outcome and got[1] == pytest.approx(0.5, abs=ATOL)
    np.testing.assert_allclose(rho, post, atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    ("basis", "r", "outcome", "post_ket"),
    [
        (Basis.X, 0.3, 0, ket(1, 1)),
        (Basis.X, 0.7, 1, ket(1, -1)),
        (Basis.Y, 0.3, 0, ket(1, 1j)),
        (Basis.Y, 0.7, 1, ket(1, -1j)),
    ],
)
def test_measure_zero_in_x_and_y(backend, basis, r, outcome, post_ket):
    rho = basis_dm(1, 0)
    got = backend.measure(rho, 1, 0, basis, r)
    assert got[0] == outcome and got[1] == pytest.approx(0.5, abs=ATOL)
    np.testing.assert_allclose(rho, dm(post_ket), atol=ATOL, rtol=0)


def test_measure_phi_plus_in_x_leaves_both_in_x_eigenstate(backend):
    rho = PHI_PLUS.copy()
    assert backend.measure(rho, 2, 1, Basis.X, 0.9)[0] == 1
    minus = dm(ket(1, -1))
    np.testing.assert_allclose(rho, np.kron(minus, minus), atol=ATOL, rtol=0)


def test_measure_certain_outcomes(backend):
    rho = basis_dm(1, 0)
    assert backend.measure(rho, 1, 0, Basis.Z, 0.999999) == (0, 1.0)
    rho = basis_dm(1, 1)
    assert backend.measure(rho, 1, 0, Basis.Z, 0.0) == (1, 1.0)
    np.testing.assert_array_equal(rho, basis_dm(1, 1))


def test_measure_statistics_follow_born_rule(backend):
    """Outcome 0 iff r < P(0): with r from the Philox stream, the frequency of 0 on
    cos(0.4)|0> + sin(0.4)|1> is cos^2(0.4) = 0.848 within 4 binomial sd (n = 4000: 0.023)."""
    n = 4000
    rs = backend.rng_uniform(99, 0, 0, n)
    state = dm(ket(math.cos(0.4), math.sin(0.4)))
    zeros = sum(backend.measure(state.copy(), 1, 0, Basis.Z, r)[0] == 0 for r in rs)
    p = math.cos(0.4) ** 2
    assert abs(zeros / n - p) < 4 * math.sqrt(p * (1 - p) / n)


def test_partial_trace_of_phi_plus(backend):
    for q in (0, 1):
        np.testing.assert_allclose(backend.partial_trace(PHI_PLUS, 2, [q]), np.eye(2) / 2, atol=ATOL, rtol=0)


def test_partial_trace_keeps_order():
    rng = np.random.default_rng(5)
    a, b, c = (random_rho(rng, 1, 2) for _ in range(3))
    rho = np.kron(np.kron(a, b), c)
    for name in ("numpy", "c"):
        be = get_backend(name)
        np.testing.assert_allclose(be.partial_trace(rho, 3, [1]), np.kron(a, c), atol=ATOL, rtol=0)
        np.testing.assert_allclose(be.partial_trace(rho, 3, (2, 0)), b, atol=ATOL, rtol=0)
        np.testing.assert_allclose(be.partial_trace(rho, 3, [0]), np.kron(b, c), atol=ATOL, rtol=0)
        np.testing.assert_allclose(be.partial_trace(rho, 3, [0, 1, 2]), [[1]], atol=ATOL, rtol=0)
        same = be.partial_trace(rho, 3, [])
        np.testing.assert_array_equal(same, rho)
        assert same is not rho and not np.shares_memory(same, rho)
        assert be.partial_trace(rho, 3, [1]).flags.c_contiguous


def test_tensor(backend):
    a, b = dm(ket(1, 0)), PHI_PLUS
    out = backend.tensor(a, b)
    assert out.shape == (8, 8) and out.dtype == np.complex128 and out.flags.c_contiguous
    np.testing.assert_allclose(out, np.kron(a, b), atol=ATOL, rtol=0)
    np.testing.assert_allclose(backend.partial_trace(out, 3, [0]), b, atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    ("prep", "expected"),
    [
        ([], BellState.PHI_PLUS),
        ([("Z", 0)], BellState.PHI_MINUS),
        ([("X", 1)], BellState.PSI_PLUS),
        ([("X", 1), ("Z", 0)], BellState.PSI_MINUS),
    ],
)
def test_bell_fidelities_each_state(backend, prep, expected):
    rho = PHI_PLUS.copy()
    for gate, q in prep:
        backend.apply_1q(rho, 2, q, GATES[gate])
    want = np.zeros(4)
    want[expected] = 1
    np.testing.assert_allclose(backend.bell_fidelities(rho, 2, 0, 1), want, atol=ATOL, rtol=0)
    np.testing.assert_allclose(backend.bell_fidelities(rho, 2, 1, 0), want, atol=ATOL, rtol=0)
    # The same pair inside a 3-qubit register, on qubits (0, 2), given in either order.
    big = np.kron(rho, dm(ket(1, 1j)))
    backend.apply_2q(big, 3, 1, 2, GATES["SWAP"])
    np.testing.assert_allclose(backend.bell_fidelities(big, 3, 0, 2), want, atol=ATOL, rtol=0)
    np.testing.assert_allclose(backend.bell_fidelities(big, 3, 2, 0), want, atol=ATOL, rtol=0)


def test_bell_fidelities_werner(backend):
    f = 0.85
    rho = np.ascontiguousarray(f * PHI_PLUS + (1 - f) / 3 * (np.eye(4) - PHI_PLUS))
    out = backend.bell_fidelities(rho, 2, 0, 1)
    assert out.dtype == np.float64 and out.shape == (4,)
    np.testing.assert_allclose(out, [f, (1 - f) / 3, (1 - f) / 3, (1 - f) / 3], atol=ATOL, rtol=0)


# --------------------------------------------------------------------- channels, gates


@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 1.0])
def test_depolarizing(backend, p):
    """(1 - p) rho + p I/2: |0><0| -> diag(1 - p/2, p/2); |+><+| off-diagonals -> (1 - p)/2."""
    rho = basis_dm(1, 0)
    backend.apply_kraus_1q(rho, 1, 0, kraus_depolarizing(p))
    np.testing.assert_allclose(rho, np.diag([1 - p / 2, p / 2]), atol=ATOL, rtol=0)
    rho = dm(ket(1, 1))
    backend.apply_kraus_1q(rho, 1, 0, kraus_depolarizing(p))
    np.testing.assert_allclose(rho, [[0.5, (1 - p) / 2], [(1 - p) / 2, 0.5]], atol=ATOL, rtol=0)


@pytest.mark.parametrize("p", [0.0, 0.2, 0.5, 1.0])
def test_dephasing(backend, p):
    """Z with probability p: off-diagonals of |+><+| become (1 - 2p)/2, populations stay."""
    rho = dm(ket(1, 1))
    backend.apply_kraus_1q(rho, 1, 0, kraus_dephasing(p))
    np.testing.assert_allclose(rho, [[0.5, (1 - 2 * p) / 2], [(1 - 2 * p) / 2, 0.5]], atol=ATOL, rtol=0)


@pytest.mark.parametrize("gamma", [0.0, 0.3, 1.0])
def test_amplitude_damping(backend, gamma):
    rho = basis_dm(1, 1)
    backend.apply_kraus_1q(rho, 1, 0, kraus_amplitude_damping(gamma))
    np.testing.assert_allclose(rho, np.diag([gamma, 1 - gamma]), atol=ATOL, rtol=0)
    rho = dm(ket(1, 1))
    backend.apply_kraus_1q(rho, 1, 0, kraus_amplitude_damping(gamma))
    c = math.sqrt(1 - gamma) / 2
    np.testing.assert_allclose(rho, [[(1 + gamma) / 2, c], [c, (1 - gamma) / 2]], atol=ATOL, rtol=0)


def test_channel_on_one_qubit_of_bell_pair(backend):
    """Depolarising qubit 1 of Phi+ with p gives a Werner state with F = 1 - 3p/4."""
    p = 0.4
    rho = PHI_PLUS.copy()
    backend.apply_kraus_1q(rho, 2, 1, kraus_depolarizing(p))
    f = 1 - 3 * p / 4
    np.testing.assert_allclose(backend.bell_fidelities(rho, 2, 0, 1), [f] + [(1 - f) / 3] * 3, atol=ATOL, rtol=0)


@pytest.mark.parametrize("maker", [kraus_depolarizing, kraus_dephasing, kraus_amplitude_damping])
@pytest.mark.parametrize("p", [0.0, 0.37, 1.0])
def test_kraus_sets_are_complete(maker, p):
    kraus = maker(p)
    assert kraus.dtype == np.complex128 and kraus.shape[1:] == (2, 2)
    np.testing.assert_allclose(sum(k.conj().T @ k for k in kraus), np.eye(2), atol=ATOL, rtol=0)


@pytest.mark.parametrize("maker", [kraus_depolarizing, kraus_dephasing, kraus_amplitude_damping])
@pytest.mark.parametrize("p", [-0.01, 1.01, float("nan")])
def test_kraus_parameter_out_of_range(maker, p):
    with pytest.raises(KernelError):
        maker(p)


def test_gates_are_unitary_and_read_only():
    assert set(GATES) == {"I", "X", "Y", "Z", "H", "S", "SDG", "T", "CNOT", "CZ", "SWAP"}
    for name, g in GATES.items():
        assert g.dtype == np.complex128, name
        np.testing.assert_allclose(g @ g.conj().T, np.eye(g.shape[0]), atol=ATOL, rtol=0)
        with pytest.raises(ValueError):
            g[0, 0] = 2
    np.testing.assert_allclose(GATES["T"] @ GATES["T"], GATES["S"], atol=ATOL, rtol=0)
    np.testing.assert_allclose(GATES["S"] @ GATES["SDG"], GATES["I"], atol=ATOL, rtol=0)
    with pytest.raises(TypeError):
        GATES["X"] = GATES["Z"]  # type: ignore[index]


def test_rotation():
    np.testing.assert_allclose(rotation("x", math.pi), -1j * GATES["X"], atol=ATOL, rtol=0)
    np.testing.assert_allclose(rotation("Y", math.pi), -1j * GATES["Y"], atol=ATOL, rtol=0)
    np.testing.assert_allclose(rotation("z", math.pi / 2), np.exp(-1j * math.pi / 4) * GATES["S"], atol=ATOL, rtol=0)
    np.testing.assert_allclose(rotation("x", 0.0), GATES["I"], atol=ATOL, rtol=0)
    r = rotation("y", 0.7)
    np.testing.assert_allclose(r @ r.conj().T, np.eye(2), atol=ATOL, rtol=0)
    with pytest.raises(KernelError):
        rotation("w", 1.0)
    with pytest.raises(KernelError):
        rotation("x", float("inf"))


# ------------------------------------------------------------ properties (hypothesis)


@st.composite
def registers(draw, min_qubits: int = 1):
    n = draw(st.integers(min_qubits, 4))
    rank = draw(st.integers(1, 1 << n))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    return n, random_rho(rng, n, rank), rng


@HYP
@given(reg=registers(), data=st.data())
def test_apply_1q_agrees_and_matches_dense(both, reg, data):
    n, rho, rng = reg
    q = data.draw(st.integers(0, n - 1))
    u = random_unitary(rng, 2)
    want = dense_1q(n, q, u) @ rho @ dense_1q(n, q, u).conj().T
    for be in both:
        got = rho.copy()
        be.apply_1q(got, n, q, u)
        np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)
        assert_physical(got)


@HYP
@given(reg=registers(min_qubits=2), data=st.data())
def test_apply_2q_agrees_and_matches_dense(both, reg, data):
    n, rho, rng = reg
    qa = data.draw(st.integers(0, n - 1))
    qb = data.draw(st.sampled_from([q for q in range(n) if q != qa]))
    u = random_unitary(rng, 4)
    full = dense_2q(n, qa, qb, u)
    want = full @ rho @ full.conj().T
    npy, c = both
    a, b = rho.copy(), rho.copy()
    npy.apply_2q(a, n, qa, qb, u)
    c.apply_2q(b, n, qa, qb, u)
    np.testing.assert_allclose(a, want, atol=ATOL, rtol=0)
    np.testing.assert_allclose(b, a, atol=ATOL, rtol=0)
    assert_physical(b)


@HYP
@given(reg=registers(), data=st.data())
def test_kraus_agrees_and_stays_physical(both, reg, data):
    n, rho, rng = reg
    q = data.draw(st.integers(0, n - 1))
    kraus = random_kraus(rng, data.draw(st.integers(1, 4)))
    want = sum(dense_1q(n, q, k) @ rho @ dense_1q(n, q, k).conj().T for k in kraus)
    for be in both:
        got = rho.copy()
        be.apply_kraus_1q(got, n, q, kraus)
        np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)
        assert_physical(got)


@HYP
@given(reg=registers(), data=st.data())
def test_probability_and_measure_agree(both, reg, data):
    n, rho, rng = reg
    q = data.draw(st.integers(0, n - 1))
    basis = data.draw(st.sampled_from(list(Basis)))
    r = float(rng.random())
    npy, c = both
    p0 = npy.probability(rho, n, q, basis)
    assert c.probability(rho, n, q, basis) == pytest.approx(p0, abs=ATOL)
    assume(abs(r - p0) > 1e-9)  # a draw on the knife edge could round differently
    a, b = rho.copy(), rho.copy()
    out_a, out_b = npy.measure(a, n, q, basis, r), c.measure(b, n, q, basis, r)
    assert out_a[0] == out_b[0] == (0 if r < p0 else 1)
    assert out_a[1] == pytest.approx(out_b[1], abs=ATOL)
    assert out_a[1] == pytest.approx(p0 if out_a[0] == 0 else 1 - p0, abs=ATOL)
    np.testing.assert_allclose(b, a, atol=ATOL, rtol=0)
    assert_physical(b)
    # The measured qubit is now in the eigenstate: measuring again is certain.
    assert c.probability(b, n, q, basis) == pytest.approx(1.0 - out_b[0], abs=1e-9)


@HYP
@given(n=st.integers(1, 3), count=st.integers(0, 6), seed=st.integers(0, 2**32 - 1))
def test_measure_batch_equals_one_register_calls(both, n, count, seed):
    """The batched kernel is bit-identical, per backend, to measure + partial_trace per
    register, and the two backends agree with each other."""
    rng = np.random.default_rng(seed)
    rhos = np.empty((count, 1 << n, 1 << n), dtype=np.complex128)
    for i in range(count):
        rhos[i] = random_rho(rng, n, int(rng.integers(1, (1 << n) + 1)))
    qubits = rng.integers(0, n, count)
    bases = rng.integers(0, 3, count).astype(np.uint8)
    rs = rng.random(count)
    results = []
    for be in both:
        batch = rhos.copy()
        outcomes, probs, rest = be.measure_batch(batch, n, qubits, bases, rs)
        assert outcomes.dtype == np.uint8 and outcomes.shape == probs.shape == (count,)
        assert (rest is None) == (n == 1)
        for i in range(count):
            one = rhos[i].copy()
            outcome, prob = be.measure(one, n, int(qubits[i]), Basis(int(bases[i])), float(rs[i]))
            assert (outcomes[i], probs[i]) == (outcome, prob)
            np.testing.assert_array_equal(batch[i], one)
            if rest is not None:
                np.testing.assert_array_equal(rest[i], be.partial_trace(one, n, [int(qubits[i])]))
        results.append((outcomes, probs, batch, rest))
    (oa, pa, ba, ra), (ob, pb, bb, rb) = results
    p0 = np.array([both[0].probability(rhos[i], n, int(qubits[i]), Basis(int(bases[i]))) for i in range(count)])
    if not np.any(np.abs(rs - p0) <= 1e-9):  # a draw on the knife edge could round differently
        np.testing.assert_array_equal(oa, ob)
        np.testing.assert_allclose(pb, pa, atol=ATOL, rtol=0)
        np.testing.assert_allclose(bb, ba, atol=ATOL, rtol=0)
        if ra is not None:
            np.testing.assert_allclose(rb, ra, atol=ATOL, rtol=0)


def test_measure_batch_of_phi_plus_pairs(backend):
    rhos = np.stack([PHI_PLUS, PHI_PLUS, PHI_PLUS])
    outcomes, probs, rest = backend.measure_batch(rhos, 2, [0, 1, 0], [Basis.Z, Basis.Z, Basis.X], [0.2, 0.7, 0.9])
    assert outcomes.tolist() == [0, 1, 1]
    np.testing.assert_allclose(probs, [0.5, 0.5, 0.5], atol=ATOL)
    np.testing.assert_allclose(rest[0], dm(ket(1, 0)), atol=ATOL)
    np.testing.assert_allclose(rest[1], dm(ket(0, 1)), atol=ATOL)
    np.testing.assert_allclose(rest[2], dm(ket(1, -1)), atol=ATOL)


def test_measure_batch_zero_weight_changes_nothing(backend):
    rhos = np.stack([PHI_PLUS, np.zeros((4, 4), np.complex128)])
    before = rhos.copy()
    with pytest.raises(KernelError, match="zero weight"):
        backend.measure_batch(rhos, 2, [0, 0], [0, 0], [0.3, 0.3])
    np.testing.assert_array_equal(rhos, before)


@pytest.mark.parametrize(
    ("desc", "args", "match"),
    [
        ("2d", (basis_dm(2, 0).copy(), 2, [0], [0], [0.5]), "shape"),
        ("n-mismatch", (np.stack([basis_dm(2, 0)]), 1, [0], [0], [0.5]), "shape"),
        ("dtype", (np.stack([basis_dm(2, 0)]).real.copy(), 2, [0], [0], [0.5]), "complex128"),
        ("qubits-len", (np.stack([basis_dm(2, 0)]), 2, [0, 1], [0], [0.5]), "qubits"),
        ("qubit-range", (np.stack([basis_dm(2, 0)]), 2, [2], [0], [0.5]), "qubits"),
        ("qubit-float", (np.stack([basis_dm(2, 0)]), 2, [0.0], [0], [0.5]), "qubits"),
        ("basis", (np.stack([basis_dm(2, 0)]), 2, [0], [3], [0.5]), "bases"),
        ("r-one", (np.stack([basis_dm(2, 0)]), 2, [0], [0], [1.0]), "rs"),
        ("r-nan", (np.stack([basis_dm(2, 0)]), 2, [0], [0], [float("nan")]), "rs"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_measure_batch_bad_input(backend, desc, args, match):
    with pytest.raises(KernelError, match=match):
        backend.measure_batch(*args)


@HYP
@given(reg=registers(), data=st.data())
def test_partial_trace_agrees(both, reg, data):
    n, rho, _ = reg
    remove = data.draw(st.lists(st.integers(0, n - 1), unique=True, max_size=n))
    npy, c = both
    a, b = npy.partial_trace(rho, n, remove), c.partial_trace(rho, n, remove)
    k = n - len(remove)
    assert a.shape == b.shape == (1 << k, 1 << k)
    np.testing.assert_allclose(b, a, atol=ATOL, rtol=0)
    if k:
        assert_physical(b)
    else:
        assert b[0, 0] == pytest.approx(1.0, abs=ATOL)


@HYP
@given(ra=registers(), rb=registers())
def test_tensor_agrees(both, ra, rb):
    (na, a, _), (nb, b, _) = ra, rb
    npy, c = both
    np.testing.assert_allclose(c.tensor(a, b), npy.tensor(a, b), atol=ATOL, rtol=0)
    np.testing.assert_allclose(c.partial_trace(c.tensor(a, b), na + nb, range(na)), b, atol=ATOL, rtol=0)


@HYP
@given(reg=registers(min_qubits=2), data=st.data())
def test_bell_fidelities_agree(both, reg, data):
    n, rho, _ = reg
    qa = data.draw(st.integers(0, n - 1))
    qb = data.draw(st.sampled_from([q for q in range(n) if q != qa]))
    npy, c = both
    a, b = npy.bell_fidelities(rho, n, qa, qb), c.bell_fidelities(rho, n, qa, qb)
    np.testing.assert_allclose(b, a, atol=ATOL, rtol=0)
    assert b.sum() == pytest.approx(1.0, abs=ATOL)  # the Bell basis is a basis
    assert b.min() >= -ATOL


@HYP
@given(reg=registers(min_qubits=2), data=st.data())
def test_circuit_keeps_state_physical(backend, reg, data):
    """A random sequence of gates, channels and measurements on one register."""
    n, rho, rng = reg
    for _ in range(4):
        q = data.draw(st.integers(0, n - 1))
        op = data.draw(st.sampled_from(["1q", "2q", "kraus", "measure"]))
        if op == "1q":
            backend.apply_1q(rho, n, q, random_unitary(rng, 2))
        elif op == "2q":
            backend.apply_2q(rho, n, q, (q + 1) % n, random_unitary(rng, 4))
        elif op == "kraus":
            backend.apply_kraus_1q(rho, n, q, kraus_amplitude_damping(float(rng.random())))
        else:
            backend.measure(rho, n, q, Basis(int(rng.integers(3))), float(rng.random()))
        assert_physical(rho)


# ----------------------------------------------------------------------------- bad input

GOOD1 = basis_dm(1, 0)
GOOD2 = basis_dm(2, 0)


def _bad_cases():
    """(description, call(backend), expected message fragment)."""
    h, cnot = GATES["H"], GATES["CNOT"]
    fortran = np.asfortranarray(dm(ket(1, 2j, 3, 4)))
    strided = np.zeros((2, 4), dtype=np.complex128)[:, ::2]
    readonly = GOOD1.copy()
    readonly.setflags(write=False)
    return [
        ("complex64", lambda b: b.apply_1q(GOOD1.astype(np.complex64), 1, 0, h), "complex128"),
        ("float64", lambda b: b.apply_1q(GOOD1.real.copy(), 1, 0, h), "complex128"),
        ("list", lambda b: b.apply_1q([[1, 0], [0, 0]], 1, 0, h), "ndarray"),
        ("fortran", lambda b: b.apply_2q(fortran, 2, 0, 1, cnot), "C-contiguous"),
        ("strided", lambda b: b.apply_1q(strided, 1, 0, h), "C-contiguous"),
        ("readonly", lambda b: b.apply_1q(readonly, 1, 0, h), "writeable"),
        ("readonly-measure", lambda b: b.measure(readonly, 1, 0, Basis.Z, 0.5), "writeable"),
        ("shape-n", lambda b: b.apply_1q(GOOD2.copy(), 3, 0, h), "shape"),
        ("shape-rect", lambda b: b.probability(np.zeros((4, 2), np.complex128), 2, 0, Basis.Z), "shape"),
        ("n-zero", lambda b: b.apply_1q(GOOD1.copy(), 0, 0, h), "n_qubits"),
        ("n-float", lambda b: b.apply_1q(GOOD1.copy(), 1.0, 0, h), "n_qubits"),
        ("qubit-high", lambda b: b.apply_1q(GOOD2.copy(), 2, 2, h), "qubit"),
        ("qubit-neg", lambda b: b.apply_1q(GOOD2.copy(), 2, -1, h), "qubit"),
        ("qubit-bool", lambda b: b.apply_1q(GOOD2.copy(), 2, True, h), "qubit"),
        ("2q-high", lambda b: b.apply_2q(GOOD2.copy(), 2, 0, 2, cnot), "qubit_b"),
        ("2q-same", lambda b: b.apply_2q(GOOD2.copy(), 2, 1, 1, cnot), "differ"),
        ("2q-u-shape", lambda b: b.apply_2q(GOOD2.copy(), 2, 0, 1, h), "shape"),
        ("1q-u-shape", lambda b: b.apply_1q(GOOD2.copy(), 2, 0, cnot), "shape"),
        ("u-object", lambda b: b.apply_1q(GOOD1.copy(), 1, 0, np.array([[1, 0], [0, None]])), "numeric"),
        ("u-nan", lambda b: b.apply_1q(GOOD1.copy(), 1, 0, np.full((2, 2), np.nan)), "non-finite"),
        ("kraus-2d", lambda b: b.apply_kraus_1q(GOOD1.copy(), 1, 0, h), "kraus"),
        ("kraus-empty", lambda b: b.apply_kraus_1q(GOOD1.copy(), 1, 0, np.zeros((0, 2, 2))), "kraus"),
        ("kraus-qubit", lambda b: b.apply_kraus_1q(GOOD1.copy(), 1, 1, kraus_dephasing(0.1)), "qubit"),
        ("basis", lambda b: b.probability(GOOD1, 1, 0, 3), "basis"),
        ("measure-basis", lambda b: b.measure(GOOD1.copy(), 1, 0, "x", 0.5), "basis"),
        ("r-one", lambda b: b.measure(GOOD1.copy(), 1, 0, Basis.Z, 1.0), "r must"),
        ("r-neg", lambda b: b.measure(GOOD1.copy(), 1, 0, Basis.Z, -0.1), "r must"),
        ("r-nan", lambda b: b.measure(GOOD1.copy(), 1, 0, Basis.Z, float("nan")), "r must"),
        ("zero-weight", lambda b: b.measure(np.zeros((2, 2), np.complex128), 1, 0, Basis.Z, 0.5), "zero weight"),
        ("pt-dup", lambda b: b.partial_trace(GOOD2, 2, [1, 1]), "twice"),
        ("pt-range", lambda b: b.partial_trace(GOOD2, 2, [2]), "remove"),
        ("pt-int", lambda b: b.partial_trace(GOOD2, 2, 1), "sequence"),
        ("pt-str", lambda b: b.partial_trace(GOOD2, 2, "0"), "sequence"),
        ("tensor-rect", lambda b: b.tensor(np.zeros((2, 4), np.complex128), GOOD1), "rho_a"),
        ("tensor-3x3", lambda b: b.tensor(GOOD1, np.zeros((3, 3), np.complex128)), "rho_b"),
        ("tensor-dtype", lambda b: b.tensor(GOOD1, GOOD1.real.copy()), "complex128"),
        ("bell-same", lambda b: b.bell_fidelities(GOOD2, 2, 0, 0), "differ"),
        ("bell-range", lambda b: b.bell_fidelities(GOOD2, 2, 0, 5), "qubit_b"),
    ]


@pytest.mark.parametrize(("desc", "call", "match"), _bad_cases(), ids=[c[0] for c in _bad_cases()])
def test_bad_input_raises_kernel_error(backend, desc, call, match):
    with pytest.raises(KernelError, match=match):
        call(backend)


def test_bad_input_leaves_rho_untouched(backend):
    rho = PHI_PLUS.copy()
    with pytest.raises(KernelError):
        backend.apply_2q(rho, 2, 0, 0, GATES["CNOT"])
    with pytest.raises(KernelError):
        backend.measure(rho, 2, 0, Basis.Z, 1.5)
    np.testing.assert_array_equal(rho, PHI_PLUS)


def test_kernel_error_types():
    assert issubclass(KernelError, ValueError)
    assert issubclass(KernelBuildError, ImportError)


def test_c_functions_check_their_arguments():
    """Defence in depth: the C kernels reject bad arguments even without the typed layer."""
    ffi, lib = c_layer.load_cext()
    rho = basis_dm(2, 0)
    buf = ffi.from_buffer("qnetem_c128[]", rho, require_writable=True)
    u = ffi.from_buffer("qnetem_c128[]", GATES["CNOT"])
    out = ffi.new("double[4]")
    outcome, prob = ffi.new("int *"), ffi.new("double *")
    assert lib.qnetem_apply_1q(ffi.NULL, 2, 0, u) == lib.QNETEM_ERR_NULL
    assert lib.qnetem_apply_1q(buf, 0, 0, u) == lib.QNETEM_ERR_QUBITS
    assert lib.qnetem_apply_1q(buf, 31, 0, u) == lib.QNETEM_ERR_QUBITS
    assert lib.qnetem_apply_1q(buf, 2, 2, u) == lib.QNETEM_ERR_QUBIT
    assert lib.qnetem_apply_2q(buf, 2, 1, 1, u) == lib.QNETEM_ERR_SAME_QUBIT
    assert lib.qnetem_apply_kraus_1q(buf, 2, 0, u, 0) == lib.QNETEM_ERR_ARG
    assert lib.qnetem_probability(buf, 2, 0, 3, out) == lib.QNETEM_ERR_BASIS
    assert lib.qnetem_measure(buf, 2, 0, 0, 1.0, outcome, prob) == lib.QNETEM_ERR_ARG
    assert lib.qnetem_partial_trace(buf, 2, ffi.new("int[]", [0, 0]), 2, buf) == lib.QNETEM_ERR_SAME_QUBIT
    assert lib.qnetem_bell_fidelities(buf, 2, 0, 0, out) == lib.QNETEM_ERR_SAME_QUBIT
    np.testing.assert_array_equal(rho, basis_dm(2, 0))
    zero = np.zeros((2, 2), dtype=np.complex128)
    zbuf = ffi.from_buffer("qnetem_c128[]", zero, require_writable=True)
    assert lib.qnetem_measure(zbuf, 1, 0, 0, 0.5, outcome, prob) == lib.QNETEM_ERR_ZERO_PROB
    ints, draws = ffi.new("int[]", [0]), ffi.new("double[]", [0.5])
    assert lib.qnetem_measure_batch(buf, 2, 1, ffi.new("int[]", [2]), ints, draws, outcome, prob, ffi.NULL) == lib.QNETEM_ERR_QUBIT
    assert lib.qnetem_measure_batch(buf, 2, 1, ints, ints, ffi.new("double[]", [1.0]), outcome, prob, ffi.NULL) == lib.QNETEM_ERR_ARG
    assert lib.qnetem_measure_batch(zbuf, 1, 1, ints, ints, draws, outcome, prob, zbuf) == lib.QNETEM_ERR_ARG  # n=1: no rest
    assert lib.qnetem_measure_batch(zbuf, 1, 1, ints, ints, draws, outcome, prob, ffi.NULL) == lib.QNETEM_ERR_ZERO_PROB
    np.testing.assert_array_equal(rho, basis_dm(2, 0))


# --------------------------------------------------------------------- selection, build


def test_get_backend_names_and_cache():
    assert isinstance(get_backend("numpy"), Backend) and isinstance(get_backend("c"), Backend)
    assert get_backend("numpy").name == "numpy"
    assert get_backend("C").name == "c"
    assert get_backend("c") is get_backend("c")


def test_get_backend_unknown_name_lists_choices():
    with pytest.raises(KernelError, match="bogus.*c, numpy"):
        get_backend("bogus")


def test_get_backend_reads_env_at_call_time(monkeypatch):
    monkeypatch.setenv("QNETEM_BACKEND", "numpy")
    assert get_backend().name == "numpy"
    monkeypatch.setenv("QNETEM_BACKEND", "c")
    assert get_backend().name == "c"
    monkeypatch.delenv("QNETEM_BACKEND")
    assert get_backend().name == "c"  # the default
    monkeypatch.setenv("QNETEM_BACKEND", "fortran")
    with pytest.raises(KernelError, match="QNETEM_BACKEND"):
        get_backend()


def test_stale_module_is_refused(monkeypatch):
    monkeypatch.setattr(emulator, "__version__", "99.0.0")
    with pytest.raises(KernelBuildError, match=r"stale.*pip install -e \."):
        c_layer.CBackend()


def test_module_compiled_from_other_sources_is_refused(tmp_path):
    """A C edit without a rebuild: the digest stamped in the module no longer matches cext/."""
    cext = tmp_path / "cext"
    cext.mkdir()
    (cext / "build_cext.py").write_text("# stand-in\n")
    (cext / "qnetem_state.c").write_text("int qnetem_x(void) { return 1; }\n")
    built = source_digest(cext)
    c_layer.check_source_digest(built, cext)  # unchanged sources: accepted
    (cext / "qnetem_state.c").write_text("int qnetem_x(void) { return 2; }\n")
    with pytest.raises(KernelBuildError, match=r"other C sources.*stale.*pip install -e \."):
        c_layer.check_source_digest(built, cext)


def test_installed_module_matches_the_sources_beside_it():
    c_layer.load_cext()  # raises KernelBuildError if this checkout's build is stale


def test_package_imports_without_compiled_module():
    """`import emulator.kernels` and the numpy backend work when emulator._cext is absent;
    only get_backend("c") fails, with KernelBuildError saying how to rebuild."""
    code = """
import sys
sys.modules["emulator._cext"] = None  # makes `from emulator import _cext` raise ImportError
import numpy as np
from emulator.kernels import get_backend, KernelBuildError, GATES
rho = np.zeros((2, 2), dtype=np.complex128); rho[0, 0] = 1
get_backend("numpy").apply_1q(rho, 1, 0, GATES["X"])
assert rho[1, 1] == 1
try:
    get_backend("c")
except KernelBuildError as exc:
    assert "pip install -e ." in str(exc), exc
    print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
