"""QuantumRegistry: register merge/split bookkeeping and the physics it must preserve.

Every test runs against both kernel backends ("numpy" and "c"); a missing C build is a
failure, not a skip. Reference states are built with plain numpy kron products.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from emulator.kernels import GATES, Basis, BellState, KernelError, get_backend, kraus_dephasing
from emulator.physics import (
    bell_projector,
    memory_decay_kraus,
    werner_fidelity_after_dephasing,
    werner_state,
)
from emulator.state import (
    MAX_REGISTER_QUBITS_LIMIT,
    InvalidStateError,
    QuantumRegistry,
    RegisterLimitError,
    RegistryStatistics,
    StateError,
    UnknownQubitError,
)

H, CNOT, X = GATES["H"], GATES["CNOT"], GATES["X"]
S2 = 1.0 / math.sqrt(2.0)
KET = {
    (Basis.Z, 0): np.array([1, 0]),
    (Basis.Z, 1): np.array([0, 1]),
    (Basis.X, 0): np.array([S2, S2]),
    (Basis.X, 1): np.array([S2, -S2]),
    (Basis.Y, 0): np.array([S2, 1j * S2]),
    (Basis.Y, 1): np.array([S2, -1j * S2]),
}


def proj(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=np.complex128)
    return np.outer(v, v.conj())


@pytest.fixture(params=["numpy", "c"])
def registry(request: pytest.FixtureRequest) -> QuantumRegistry:
    return QuantumRegistry(get_backend(request.param))


def bell_pair(reg: QuantumRegistry) -> tuple[int, int]:
    """Phi+ from |00> by H on a, then CNOT(a -> b)."""
    a, b = reg.allocate(), reg.allocate()
    reg.apply_1q(a, H)
    reg.apply_2q(a, b, CNOT)
    return a, b


def ghz3(reg: QuantumRegistry) -> tuple[int, int, int]:
    a, b = bell_pair(reg)
    c = reg.allocate()
    reg.apply_2q(b, c, CNOT)
    return a, b, c


# --------------------------------------------------------------------------- allocation


def test_allocate_fresh_ids_in_ground_state(registry: QuantumRegistry) -> None:
    a, b = registry.allocate(), registry.allocate()
    assert a != b and a in registry and b in registry and len(registry) == 2
    assert np.allclose(registry.reduced_state([a]), proj([1, 0]))
    assert registry.register_of(a) == (a,)
    registry.free(a)
    assert a not in registry and len(registry) == 1
    c = registry.allocate()
    assert c not in (a, b)  # ids are never reused
    assert registry.statistics() == RegistryStatistics(qubits=2, registers=2, largest_register=1)


def test_allocate_state_copies_and_orders(registry: QuantumRegistry) -> None:
    rho = np.kron(proj([1, 0]), proj([0, 1]))  # |0> (x) |1>
    a, b = registry.allocate_state(rho)
    rho[:] = 0  # the registry took a copy
    assert registry.register_of(a) == (a, b)
    assert np.allclose(registry.reduced_state([a]), proj([1, 0]))
    assert np.allclose(registry.reduced_state([b]), proj([0, 1]))
    assert np.allclose(registry.reduced_state([b, a]), np.kron(proj([0, 1]), proj([1, 0])))
    assert registry.statistics() == RegistryStatistics(qubits=2, registers=1, largest_register=2)


def test_allocate_state_heralded_pair(registry: QuantumRegistry) -> None:
    a, b = registry.allocate_state(werner_state(BellState.PSI_MINUS, 0.8))
    f = registry.bell_fidelities(a, b)
    assert f == pytest.approx([0.05, 0.05, 0.05, 0.85])  # (1 - V)/4, (1 + 3V)/4


@pytest.mark.parametrize(
    "bad",
    [
        np.eye(3) / 3,  # not 2**n
        np.ones((2, 4)) / 2,  # not square
        np.array([[0.5, 0.5], [0.0, 0.5]]),  # not Hermitian
        np.eye(2),  # trace 2
        np.array([[np.nan, 0], [0, 1]]),
        np.ones(4) / 4,  # 1-D
        np.array([[1.0]]),  # 0 qubits
    ],
)
def test_allocate_state_rejects_malformed(registry: QuantumRegistry, bad: np.ndarray) -> None:
    with pytest.raises(InvalidStateError):
        registry.allocate_state(bad)
    assert len(registry) == 0


def test_allocate_state_over_limit() -> None:
    reg = QuantumRegistry(get_backend("numpy"), max_register_qubits=2)
    with pytest.raises(RegisterLimitError):
        reg.allocate_state(np.eye(8) / 8)
    assert len(reg) == 0


@pytest.mark.parametrize("bad", [1, 0, MAX_REGISTER_QUBITS_LIMIT + 1])
def test_max_register_qubits_validated(bad: int) -> None:
    with pytest.raises(ValueError):
        QuantumRegistry(get_backend("numpy"), max_register_qubits=bad)


# --------------------------------------------------------------------- Bell pairs, measure


def test_bell_pair_state(registry: QuantumRegistry) -> None:
    a, b = bell_pair(registry)
    assert registry.register_of(a) == (a, b) == registry.register_of(b)
    assert np.allclose(registry.reduced_state([a, b]), bell_projector(BellState.PHI_PLUS))
    assert registry.bell_fidelities(a, b) == pytest.approx([1, 0, 0, 0])


@pytest.mark.parametrize(("basis", "equal"), [(Basis.Z, True), (Basis.X, True), (Basis.Y, False)])
def test_bell_pair_correlations_for_many_r(registry: QuantumRegistry, basis: Basis, equal: bool) -> None:
    # Phi+ has <ZZ> = <XX> = +1 and <YY> = -1: outcomes always equal (Z, X) or opposite (Y),
    # whatever the draws. r1 sweeps [0, 1) so both first outcomes occur; r2 is arbitrary.
    rng = np.random.default_rng(17)
    first = []
    for r1 in np.linspace(0.0, 0.999, 60):
        a, b = bell_pair(registry)
        m1 = registry.measure(a, basis, float(r1))
        m2 = registry.measure(b, basis, float(rng.random()))
        assert (m1 == m2) is equal
        assert m1 == (0 if r1 < 0.5 else 1)  # P(0) = 1/2: outcome 0 iff r < 1/2
        first.append(m1)
        registry.free(a)
        registry.free(b)
    assert set(first) == {0, 1}
    assert len(registry) == 0


@pytest.mark.parametrize("basis", list(Basis))
@pytest.mark.parametrize("r", [0.2, 0.8])
def test_measuring_half_of_phi_plus_leaves_partner(registry: QuantumRegistry, basis: Basis, r: float) -> None:
    a, b = bell_pair(registry)
    outcome = registry.measure(a, basis, r)
    # Register split: each qubit alone again.
    assert registry.register_of(a) == (a,)
    assert registry.register_of(b) == (b,)
    assert registry.statistics() == RegistryStatistics(qubits=2, registers=2, largest_register=1)
    # The measured qubit is in its eigenstate; the partner in the matching state
    # (Phi+: same state for Z and X; the complex conjugate, i.e. the opposite, for Y).
    assert np.allclose(registry.reduced_state([a]), proj(KET[basis, outcome]))
    partner = outcome if basis != Basis.Y else 1 - outcome
    assert np.allclose(registry.reduced_state([b]), proj(KET[basis, partner]))
    # A repeated measurement in the same basis reproduces the outcome for any r.
    assert registry.measure(a, basis, 0.0) == outcome
    assert registry.measure(a, basis, 0.999) == outcome


@pytest.mark.parametrize("basis", list(Basis))
@pytest.mark.parametrize("outcome_r", [0.0, 0.999])
def test_split_eigenstate_matches_kernel_collapse(
    registry: QuantumRegistry, basis: Basis, outcome_r: float
) -> None:
    # The registry writes the measured qubit's eigenstate from a table; it must equal what
    # the kernel's own collapse gives (reduced state of the collapsed register).
    backend = registry.backend
    rng = np.random.default_rng(5)
    g = rng.normal(size=(4, 4)) + 1j * rng.normal(size=(4, 4))
    rho = g @ g.conj().T
    rho /= np.trace(rho)
    a, b = registry.allocate_state(rho)
    outcome = registry.measure(a, basis, outcome_r)
    collapsed = rho.astype(np.complex128).copy()
    outcome_k, _ = backend.measure(collapsed, 2, 0, basis, outcome_r)
    assert outcome == outcome_k
    assert np.allclose(registry.reduced_state([a]), backend.partial_trace(collapsed, 2, [1]), atol=1e-12)
    assert np.allclose(registry.reduced_state([b]), backend.partial_trace(collapsed, 2, [0]), atol=1e-12)


def test_measure_lone_qubit(registry: QuantumRegistry) -> None:
    q = registry.allocate()
    registry.apply_1q(q, H)  # |+>
    assert registry.measure(q, Basis.X, 0.999) == 0  # deterministic in X
    assert registry.measure(q, Basis.Z, 0.3) == 0  # P(0) = 1/2
    assert registry.measure(q, Basis.X, 0.7) == 1  # |0> in X: P(+) = 1/2, r >= 1/2
    assert np.allclose(registry.reduced_state([q]), proj(KET[Basis.X, 1]))


def test_measure_rejects_bad_r(registry: QuantumRegistry) -> None:
    a, b = bell_pair(registry)
    with pytest.raises(KernelError):
        registry.measure(a, Basis.Z, 1.0)
    assert registry.register_of(a) == (a, b)


# ----------------------------------------------------------------- merge, split, free


def test_register_merge_and_split_sizes(registry: QuantumRegistry) -> None:
    q = [registry.allocate() for _ in range(4)]
    assert registry.statistics() == RegistryStatistics(qubits=4, registers=4, largest_register=1)
    registry.apply_2q(q[0], q[1], CNOT)
    assert registry.register_of(q[0]) == (q[0], q[1])
    assert registry.statistics() == RegistryStatistics(qubits=4, registers=3, largest_register=2)
    registry.apply_2q(q[3], q[1], CNOT)  # q3's register first in the merged order
    assert registry.register_of(q[1]) == (q[3], q[0], q[1])
    assert registry.statistics() == RegistryStatistics(qubits=4, registers=2, largest_register=3)
    registry.apply_2q(q[0], q[3], CNOT)  # same register: no change in shape
    assert registry.register_of(q[0]) == (q[3], q[0], q[1])
    registry.measure(q[0], Basis.Z, 0.5)
    assert registry.register_of(q[3]) == (q[3], q[1])
    assert registry.register_of(q[0]) == (q[0],)
    assert registry.statistics() == RegistryStatistics(qubits=4, registers=3, largest_register=2)
    registry.free(q[3])
    assert registry.register_of(q[1]) == (q[1],)
    assert registry.statistics() == RegistryStatistics(qubits=3, registers=3, largest_register=1)


def test_merge_places_gate_correctly(registry: QuantumRegistry) -> None:
    # |1> (control, allocated second) and |0> (target, allocated first): CNOT(control,
    # target) across registers must flip the target, whatever the register order.
    t, c = registry.allocate(), registry.allocate()
    registry.apply_1q(c, X)
    registry.apply_2q(c, t, CNOT)
    assert registry.register_of(t) == (c, t)
    assert np.allclose(registry.reduced_state([t, c]), np.kron(proj([0, 1]), proj([0, 1])))


def test_ghz_free_leaves_classical_mixture(registry: QuantumRegistry) -> None:
    a, b, c = ghz3(registry)
    ghz = np.zeros(8, dtype=np.complex128)
    ghz[[0, 7]] = S2
    assert np.allclose(registry.reduced_state([a, b, c]), proj(ghz))
    registry.free(a)
    assert a not in registry
    assert registry.register_of(b) == (b, c)
    mixture = (proj([1, 0, 0, 0]) + proj([0, 0, 0, 1])) / 2  # (|00><00| + |11><11|)/2
    assert np.allclose(registry.reduced_state([b, c]), mixture)
    assert registry.bell_fidelities(b, c) == pytest.approx([0.5, 0.5, 0, 0])
    with pytest.raises(UnknownQubitError):
        registry.reduced_state([a])


def test_free_middle_qubit_keeps_order(registry: QuantumRegistry) -> None:
    # |0>|1>|+> as one register; free the middle one.
    plus = np.array([S2, S2])
    a, b, c = registry.allocate_state(np.kron(np.kron(proj([1, 0]), proj([0, 1])), proj(plus)))
    registry.free(b)
    assert registry.register_of(a) == (a, c)
    assert np.allclose(registry.reduced_state([a, c]), np.kron(proj([1, 0]), proj(plus)))


def test_register_limit_leaves_state_untouched() -> None:
    for name in ("numpy", "c"):
        reg = QuantumRegistry(get_backend(name), max_register_qubits=3)
        a, b = bell_pair(reg)
        c, d = bell_pair(reg)
        before = (reg.reduced_state([a, b]), reg.reduced_state([c, d]))
        stats = reg.statistics()
        with pytest.raises(RegisterLimitError):
            reg.apply_2q(b, c, CNOT)
        assert reg.register_of(a) == (a, b) and reg.register_of(c) == (c, d)
        assert reg.statistics() == stats
        assert np.array_equal(reg.reduced_state([a, b]), before[0])
        assert np.array_equal(reg.reduced_state([c, d]), before[1])
        e = reg.allocate()
        reg.apply_2q(b, e, CNOT)  # 2 + 1 = 3 qubits: allowed
        assert reg.register_of(e) == (a, b, e)


def test_rejected_gate_does_not_merge(registry: QuantumRegistry) -> None:
    a, b = registry.allocate(), registry.allocate()
    with pytest.raises(KernelError):
        registry.apply_2q(a, b, np.eye(2))  # wrong shape
    assert registry.register_of(a) == (a,) and registry.register_of(b) == (b,)
    assert registry.statistics().registers == 2


# --------------------------------------------------------------------- reads and errors


def test_reduced_state_across_registers_in_requested_order(registry: QuantumRegistry) -> None:
    a, b = bell_pair(registry)
    q = registry.allocate()
    registry.apply_1q(q, X)  # |1>
    out = registry.reduced_state([q, a, b])
    assert np.allclose(out, np.kron(proj([0, 1]), bell_projector(BellState.PHI_PLUS)))
    out2 = registry.reduced_state([a, q])
    assert np.allclose(out2, np.kron(np.eye(2) / 2, proj([0, 1])))
    assert out2.flags.c_contiguous and out2.dtype == np.complex128
    # A copy: changing it does not touch the registry.
    full = registry.reduced_state([a, b])
    full[:] = 0
    assert registry.bell_fidelities(a, b) == pytest.approx([1, 0, 0, 0])
    with pytest.raises(StateError):
        registry.reduced_state([a, a])
    with pytest.raises(StateError):
        registry.reduced_state([])


def test_bell_fidelities_across_registers_and_positions(registry: QuantumRegistry) -> None:
    a, b = registry.allocate(), registry.allocate()
    # |00> = (Phi+ + Phi-)/sqrt2: fidelity 1/2 to each Phi.
    assert registry.bell_fidelities(a, b) == pytest.approx([0.5, 0.5, 0, 0])
    # Bell pair inside a 3-qubit register with a spectator between the two halves.
    s = registry.allocate()
    x, y = registry.allocate_state(bell_projector(BellState.PSI_PLUS))
    registry.apply_2q(x, s, GATES["SWAP"])  # merges: order (x, y, s); swaps x and s contents
    registry.apply_2q(x, s, GATES["SWAP"])  # and back: Psi+ on (x, y) again
    assert len(registry.register_of(x)) == 3
    assert registry.bell_fidelities(x, y) == pytest.approx([0, 0, 1, 0])
    assert registry.bell_fidelities(y, x) == pytest.approx([0, 0, 1, 0])
    with pytest.raises(StateError):
        registry.bell_fidelities(x, x)


def test_unknown_qubit_errors(registry: QuantumRegistry) -> None:
    a = registry.allocate()
    registry.free(a)
    calls = [
        lambda: registry.free(a),
        lambda: registry.apply_1q(a, H),
        lambda: registry.apply_kraus(a, kraus_dephasing(0.1)),
        lambda: registry.measure(a, Basis.Z, 0.5),
        lambda: registry.reduced_state([a]),
        lambda: registry.register_of(a),
        lambda: registry.bell_fidelities(a, 999),
        lambda: registry.apply_2q(999, a, CNOT),
    ]
    for call in calls:
        with pytest.raises(UnknownQubitError):
            call()
    assert issubclass(UnknownQubitError, StateError)
    assert 999 not in registry


def test_apply_2q_same_qubit(registry: QuantumRegistry) -> None:
    a = registry.allocate()
    with pytest.raises(StateError):
        registry.apply_2q(a, a, CNOT)


# ------------------------------------------------------------------------ decoherence


@pytest.mark.parametrize(("elapsed_s", "t2_s"), [(0.01, 0.05), (0.2, 0.1)])
def test_memory_dephasing_through_registry_matches_analytic(
    registry: QuantumRegistry, elapsed_s: float, t2_s: float
) -> None:
    visibility = 0.9
    a, b = registry.allocate_state(werner_state(BellState.PSI_PLUS, visibility))
    kraus = memory_decay_kraus(elapsed_s, math.inf, t2_s)
    registry.apply_kraus(a, kraus)
    registry.apply_kraus(b, kraus)
    expected = werner_fidelity_after_dephasing(visibility, elapsed_s, t2_s)
    assert registry.bell_fidelities(a, b)[BellState.PSI_PLUS] == pytest.approx(expected, abs=1e-12)


def test_t1_decay_through_registry(registry: QuantumRegistry) -> None:
    q = registry.allocate()
    registry.apply_1q(q, X)  # |1>
    registry.apply_kraus(q, memory_decay_kraus(1.0, 2.0, 1.0))
    # Excited population e^{-t/T1} = e^{-1/2} = 0.606531.
    assert registry.reduced_state([q])[1, 1].real == pytest.approx(math.exp(-0.5))


def test_backends_agree() -> None:
    # The same operation sequence on both backends gives the same states and outcomes.
    results = []
    for name in ("numpy", "c"):
        reg = QuantumRegistry(get_backend(name))
        a, b, c = ghz3(reg)
        reg.apply_kraus(b, memory_decay_kraus(0.3, 1.0, 0.8))
        reg.apply_1q(c, GATES["T"])
        m = reg.measure(a, Basis.X, 0.37)
        results.append((m, reg.reduced_state([b, c])))
    assert results[0][0] == results[1][0]
    assert np.allclose(results[0][1], results[1][1], atol=1e-12)


# ------------------------------------------------- property test against a full simulation


def _full_operator(u: np.ndarray, targets: list[int], n: int) -> np.ndarray:
    """The 2**n x 2**n matrix of `u` acting on `targets` (first = most significant index of
    u) of n qubits, built entry by entry (independent of the kernels' tensor tricks)."""
    d = 1 << n
    k = len(targets)
    out = np.zeros((d, d), dtype=np.complex128)
    others = [q for q in range(n) if q not in targets]

    def bit(x: int, q: int) -> int:
        return (x >> (n - 1 - q)) & 1

    for i in range(d):
        for j in range(d):
            if any(bit(i, q) != bit(j, q) for q in others):
                continue
            ui = sum(bit(i, t) << (k - 1 - m) for m, t in enumerate(targets))
            uj = sum(bit(j, t) << (k - 1 - m) for m, t in enumerate(targets))
            out[i, j] = u[ui, uj]
    return out


class _Reference:
    """Whole-system density matrix over the live qubits, in allocation order."""

    def __init__(self) -> None:
        self.live: list[int] = []
        self.rho = np.ones((1, 1), dtype=np.complex128)

    def allocate(self, q: int) -> None:
        self.live.append(q)
        self.rho = np.kron(self.rho, proj([1, 0]))

    def apply(self, u: np.ndarray, qubits: list[int]) -> None:
        full = _full_operator(u, [self.live.index(q) for q in qubits], len(self.live))
        self.rho = full @ self.rho @ full.conj().T

    def kraus(self, ops: np.ndarray, q: int) -> None:
        fulls = [_full_operator(k, [self.live.index(q)], len(self.live)) for k in ops]
        self.rho = sum(f @ self.rho @ f.conj().T for f in fulls)

    def p0(self, q: int, basis: Basis) -> float:
        p = _full_operator(proj(KET[basis, 0]), [self.live.index(q)], len(self.live))
        return float(np.real(np.trace(p @ self.rho)))

    def collapse(self, q: int, basis: Basis, outcome: int) -> None:
        p = _full_operator(proj(KET[basis, outcome]), [self.live.index(q)], len(self.live))
        self.rho = p @ self.rho @ p
        self.rho /= np.trace(self.rho).real

    def free(self, q: int) -> None:
        n, pos = len(self.live), self.live.index(q)
        t = self.rho.reshape((2,) * (2 * n))
        self.rho = np.trace(t, axis1=pos, axis2=n + pos).reshape(1 << (n - 1), 1 << (n - 1))
        self.live.remove(q)


ONE_QUBIT_GATES = [GATES[g] for g in ("H", "X", "Y", "S", "T")]
TWO_QUBIT_GATES = [GATES[g] for g in ("CNOT", "CZ", "SWAP")]


@pytest.mark.parametrize("backend_name", ["numpy", "c"])
@given(data=st.data())
@settings(max_examples=60)
def test_registry_matches_full_state_simulation(backend_name: str, data: st.DataObject) -> None:
    reg = QuantumRegistry(get_backend(backend_name), max_register_qubits=5)
    ref = _Reference()
    for _ in range(data.draw(st.integers(3, 16), label="steps")):
        live = ref.live
        ops = st.sampled_from(["alloc", "1q", "2q", "kraus", "measure", "free"])
        op = data.draw(ops if live else st.just("alloc"))
        if op == "alloc" or (op == "2q" and len(live) < 2):
            if len(live) >= 5:
                continue
            q = reg.allocate()
            ref.allocate(q)
        elif op == "1q":
            q = data.draw(st.sampled_from(live))
            u = data.draw(st.sampled_from(ONE_QUBIT_GATES))
            reg.apply_1q(q, u)
            ref.apply(u, [q])
        elif op == "2q":
            a, b = data.draw(st.permutations(live))[:2]
            u = data.draw(st.sampled_from(TWO_QUBIT_GATES))
            reg.apply_2q(a, b, u)
            ref.apply(u, [a, b])
        elif op == "kraus":
            q = data.draw(st.sampled_from(live))
            ops = memory_decay_kraus(data.draw(st.floats(0.0, 2.0)), 1.0, 0.7)
            reg.apply_kraus(q, ops)
            ref.kraus(ops, q)
        elif op == "measure":
            q = data.draw(st.sampled_from(live))
            basis = data.draw(st.sampled_from(list(Basis)))
            r = data.draw(st.floats(0.0, 1.0, exclude_max=True))
            p0 = ref.p0(q, basis)
            if abs(r - p0) < 1e-9 or p0 < 1e-9 or p0 > 1 - 1e-9:
                r = 0.0 if p0 > 0.5 else 0.999  # the reference and the kernel must agree
            outcome = reg.measure(q, basis, r)
            assert outcome == (0 if r < p0 else 1)
            ref.collapse(q, basis, outcome)
            assert reg.register_of(q) == (q,)
        else:
            q = data.draw(st.sampled_from(live))
            reg.free(q)
            ref.free(q)
        assert len(reg) == len(ref.live)
        if ref.live:
            assert np.allclose(reg.reduced_state(ref.live), ref.rho, atol=1e-10)
    stats = reg.statistics()
    assert stats.qubits == len(ref.live) and stats.largest_register <= 5


@pytest.mark.parametrize("backend_name", ["numpy", "c"])
def test_measure_many_equals_one_measure_per_qubit(backend_name: str) -> None:
    """Batched measurement gives the same outcomes and states as one call per qubit, also
    when several measured qubits share a register (they are then measured in order)."""

    def build() -> tuple[QuantumRegistry, list[int]]:
        reg = QuantumRegistry(get_backend(backend_name), max_register_qubits=4)
        rng = np.random.default_rng(7)
        qubits: list[int] = []
        for _ in range(6):  # heralded-pair-like 2-qubit registers in random pure states
            v = rng.normal(size=4) + 1j * rng.normal(size=4)
            qubits += reg.allocate_state(np.outer(v, v.conj()) / np.vdot(v, v).real)
        qubits.append(reg.allocate())  # a lone qubit
        a, b, c = qubits[0], qubits[1], qubits[2]
        reg.apply_2q(b, c, GATES["CNOT"])  # a 4-qubit register: (a, b) + (c, d)
        return reg, qubits

    order = [0, 1, 4, 5, 2, 12, 7, 3, 8, 10, 9, 11, 6]  # 0, 1, 2, 3 share a register
    bases = [int(b) for b in np.random.default_rng(1).integers(0, 3, len(order))]
    draws = np.random.default_rng(2).random(len(order))
    one, qs = build()
    want = [one.measure(qs[k], Basis(b), float(r)) for k, b, r in zip(order, bases, draws, strict=True)]
    many, qs2 = build()
    seen: list[int] = []
    got = many.measure_many([qs2[k] for k in order], bases, draws, before=seen.append)
    assert got.tolist() == want
    assert seen == [qs2[k] for k in order]
    for q in qs:
        assert one.register_of(q) == many.register_of(q)
        np.testing.assert_array_equal(one.reduced_state(one.register_of(q)), many.reduced_state(many.register_of(q)))
