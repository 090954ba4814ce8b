"""The quantum registry: the broker's store of every qubit, as density-matrix registers.

Theory of operation
-------------------
Every qubit the broker knows about has an integer id (fresh for each allocation, never
reused) and lives in exactly one **register**: a density matrix over the qubits that may
be correlated with each other (DESIGN.md §5). Register order is kron order: the first
qubit of ``register_of(q)`` is the most significant bit of the matrix index, as in the
kernels. The rules:

============================  ==========================================================
operation                     effect on registers
============================  ==========================================================
``allocate()``                new 1-qubit register |0><0|
``allocate_state(rho)``       new n-qubit register holding a copy of rho (ids in order)
``apply_1q`` / ``apply_kraus``  in place, register unchanged
``apply_2q(a, b)``            same register: in place. Different registers: the two are
                              merged (kron, a's register first) and the gate applied;
                              RegisterLimitError, with nothing changed, if the merged
                              register would exceed ``max_register_qubits``
``measure(q)``                collapse in place; then q is split off into its own
                              1-qubit register in the measured eigenstate and traced
                              out of the rest (exact: after a projective measurement
                              the state is a product of q's eigenstate and the rest)
``measure_many(qs)``          ``measure`` of each qubit in turn, same results; qubits
                              of separate registers share one batched kernel call
``free(q)``                   q traced out of its register; the rest stays (mixed, if q
                              was entangled with it — the same as losing the qubit)
============================  ==========================================================

Registers only grow through ``apply_2q`` and shrink through ``measure`` / ``free``, so a
typical heralded pair stays a 2-qubit register from creation to measurement.

Hot path. The broker creates and measures thousands of pairs per second, so each call
does one dict lookup per qubit, a ``list.index`` over at most ``max_register_qubits``
ids, and one kernel call (``measure_many``: one per register size for a whole batch); arrays are copied only where the contract requires it
(``allocate_state`` takes a copy, ``reduced_state`` returns one, merges and partial
traces produce new arrays by nature). The registry holds no RNG and no clock: the
caller passes the uniform draw ``r`` for a measurement and decides when decoherence
channels are applied.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import reduce

import numpy as np

from emulator.kernels import Backend, Basis

__all__ = [
    "MAX_REGISTER_QUBITS_LIMIT",
    "InvalidStateError",
    "QuantumRegistry",
    "RegisterLimitError",
    "RegistryStatistics",
    "StateError",
    "UnknownQubitError",
]

#: Upper bound for ``max_register_qubits``: a 12-qubit density matrix is 256 MiB.
MAX_REGISTER_QUBITS_LIMIT = 12

# Tolerance for accepting a caller's density matrix (Hermitian, unit trace).
_STATE_ATOL = 1e-9

_S2 = 1.0 / math.sqrt(2.0)


def _projector(v: Sequence[complex]) -> np.ndarray:
    a = np.asarray(v, dtype=np.complex128)
    p = np.outer(a, a.conj())
    p.setflags(write=False)
    return p


# Post-measurement state of the measured qubit, [basis][outcome]; outcome 0 is the +1
# eigenstate (|0>, |+>, |+i>), as in emulator.kernels.Basis.
_EIGENSTATES: tuple[tuple[np.ndarray, np.ndarray], ...] = (
    (_projector([1, 0]), _projector([0, 1])),  # Z
    (_projector([_S2, _S2]), _projector([_S2, -_S2])),  # X
    (_projector([_S2, 1j * _S2]), _projector([_S2, -1j * _S2])),  # Y
)
_KET0 = _EIGENSTATES[Basis.Z][0]


class StateError(Exception):
    """Misuse of the quantum registry (the caller's fault)."""


class UnknownQubitError(StateError):
    """The qubit id was never allocated, or has been freed."""


class RegisterLimitError(StateError):
    """The operation would make a register larger than ``max_register_qubits``."""


class InvalidStateError(StateError):
    """A density matrix handed to ``allocate_state`` is malformed (shape, trace, ...)."""


@dataclass(frozen=True, slots=True)
class RegistryStatistics:
    qubits: int
    registers: int
    largest_register: int


class _Register:
    """A density matrix and the qubit ids of its tensor factors, in kron order."""

    __slots__ = ("qubits", "rho")

    def __init__(self, qubits: list[int], rho: np.ndarray) -> None:
        self.qubits = qubits
        self.rho = rho


class QuantumRegistry:
    """Every qubit of the emulation, grouped into registers (see the module docstring)."""

    __slots__ = ("_backend", "_max_register_qubits", "_next_id", "_where")

    def __init__(self, backend: Backend, *, max_register_qubits: int = 10) -> None:
        if isinstance(max_register_qubits, bool) or not isinstance(max_register_qubits, int):
            raise TypeError("max_register_qubits must be an int")
        if not 2 <= max_register_qubits <= MAX_REGISTER_QUBITS_LIMIT:
            raise ValueError(
                f"max_register_qubits must be in [2, {MAX_REGISTER_QUBITS_LIMIT}], "
                f"got {max_register_qubits}"
            )
        self._backend = backend
        self._max_register_qubits = max_register_qubits
        self._next_id = 0
        self._where: dict[int, _Register] = {}

    @property
    def backend(self) -> Backend:
        return self._backend

    @property
    def max_register_qubits(self) -> int:
        return self._max_register_qubits

    # ------------------------------------------------------------------ lookups

    def _register(self, qubit: int) -> _Register:
        reg = self._where.get(qubit)
        if reg is None:
            raise UnknownQubitError(f"unknown qubit {qubit!r} (never allocated, or freed)")
        return reg

    def __contains__(self, qubit: object) -> bool:
        return qubit in self._where

    def __len__(self) -> int:
        return len(self._where)

    def register_of(self, qubit: int) -> tuple[int, ...]:
        """The qubit ids sharing `qubit`'s register, in register (kron) order."""
        return tuple(self._register(qubit).qubits)

    def statistics(self) -> RegistryStatistics:
        registers = {id(reg): reg for reg in self._where.values()}
        return RegistryStatistics(
            qubits=len(self._where),
            registers=len(registers),
            largest_register=max((len(r.qubits) for r in registers.values()), default=0),
        )

    # ------------------------------------------------------------ allocation

    def allocate(self) -> int:
        """A fresh qubit id in |0><0|, in its own 1-qubit register."""
        qubit = self._next_id
        self._next_id = qubit + 1
        self._where[qubit] = _Register([qubit], _KET0.copy())
        return qubit

    def allocate_state(self, rho: np.ndarray) -> list[int]:
        """Fresh qubit ids, jointly in the n-qubit state `rho` (a copy is taken).

        The ids are returned in kron order (the first is the most significant qubit of
        rho), e.g. a heralded pair ``[a, b]``. `rho` must be a square (2**n, 2**n)
        array, finite, Hermitian and of unit trace (within 1e-9; positivity is the
        caller's contract). InvalidStateError otherwise; RegisterLimitError when n
        exceeds ``max_register_qubits``.
        """
        try:
            state = np.array(rho, dtype=np.complex128, order="C", copy=True)
        except (TypeError, ValueError) as exc:
            raise InvalidStateError(f"not a numeric density matrix: {exc}") from None
        shape = state.shape
        if len(shape) != 2 or shape[0] != shape[1] or shape[0] < 2 or shape[0] & (shape[0] - 1):
            raise InvalidStateError(f"rho must have shape (2**n, 2**n) with n >= 1, got {shape}")
        n = shape[0].bit_length() - 1
        if n > self._max_register_qubits:
            raise RegisterLimitError(
                f"a {n}-qubit state exceeds max_register_qubits={self._max_register_qubits}"
            )
        # One pass for both checks: a NaN or inf entry makes the deviation NaN, and
        # `not (NaN <= tol)` rejects it.
        if not np.abs(state - state.conj().T).max() <= _STATE_ATOL:
            raise InvalidStateError("rho is not Hermitian, or has non-finite entries")
        trace = state.trace()
        if not abs(trace - 1.0) <= _STATE_ATOL:
            raise InvalidStateError(f"rho must have unit trace, got {trace.real:.12g}")
        first = self._next_id
        self._next_id = first + n
        qubits = list(range(first, first + n))
        reg = _Register(qubits[:], state)
        for q in qubits:
            self._where[q] = reg
        return qubits

    def free(self, qubit: int) -> None:
        """Forget `qubit`: it is traced out of its register; the others stay."""
        reg = self._register(qubit)
        if len(reg.qubits) > 1:
            pos = reg.qubits.index(qubit)
            reg.rho = self._backend.partial_trace(reg.rho, len(reg.qubits), (pos,))
            del reg.qubits[pos]
        del self._where[qubit]

    # ------------------------------------------------------------ operations

    def apply_1q(self, qubit: int, u: np.ndarray) -> None:
        """rho <- U rho U^dagger with the (2, 2) unitary U on `qubit`."""
        reg = self._register(qubit)
        self._backend.apply_1q(reg.rho, len(reg.qubits), reg.qubits.index(qubit), u)

    def apply_kraus(self, qubit: int, kraus: np.ndarray) -> None:
        """rho <- sum_i K_i rho K_i^dagger with kraus (k, 2, 2) on `qubit`."""
        reg = self._register(qubit)
        self._backend.apply_kraus_1q(reg.rho, len(reg.qubits), reg.qubits.index(qubit), kraus)

    def apply_2q(self, qubit_a: int, qubit_b: int, u: np.ndarray) -> None:
        """rho <- U rho U^dagger with the (4, 4) unitary U; qubit_a is U's more significant
        index (e.g. CNOT's control). Merges the two registers when they differ."""
        reg_a = self._register(qubit_a)
        reg_b = self._register(qubit_b)
        if qubit_a == qubit_b:
            raise StateError(f"apply_2q needs two different qubits, got {qubit_a!r} twice")
        if reg_a is reg_b:
            qs = reg_a.qubits
            self._backend.apply_2q(reg_a.rho, len(qs), qs.index(qubit_a), qs.index(qubit_b), u)
            return
        n_a, n_b = len(reg_a.qubits), len(reg_b.qubits)
        if n_a + n_b > self._max_register_qubits:
            raise RegisterLimitError(
                f"merging registers of {n_a} and {n_b} qubits for a gate on "
                f"({qubit_a}, {qubit_b}) exceeds max_register_qubits={self._max_register_qubits}"
            )
        merged = self._backend.tensor(reg_a.rho, reg_b.rho)
        # Gate first, commit after: a rejected gate (bad u) leaves both registers as they were.
        self._backend.apply_2q(
            merged, n_a + n_b, reg_a.qubits.index(qubit_a), n_a + reg_b.qubits.index(qubit_b), u
        )
        # Keep the larger register object so fewer dict entries need re-pointing.
        keep, other = (reg_a, reg_b) if n_a >= n_b else (reg_b, reg_a)
        keep.qubits = reg_a.qubits + reg_b.qubits
        keep.rho = merged
        for q in other.qubits:
            self._where[q] = keep

    def measure(self, qubit: int, basis: Basis, r: float) -> int:
        """Projective measurement of `qubit` in `basis`; returns the outcome (0 = +1
        eigenstate) with outcome 0 iff r < P(0), r a uniform draw in [0, 1).

        Afterwards `qubit` is alone in a 1-qubit register in the measured eigenstate
        and the rest of its former register holds the post-measurement state.
        """
        reg = self._register(qubit)
        n = len(reg.qubits)
        pos = reg.qubits.index(qubit)
        outcome, _ = self._backend.measure(reg.rho, n, pos, basis, r)
        if n > 1:
            reg.rho = self._backend.partial_trace(reg.rho, n, (pos,))
            del reg.qubits[pos]
            self._where[qubit] = _Register([qubit], _EIGENSTATES[basis][outcome].copy())
        return outcome

    def measure_many(
        self,
        qubits: Sequence[int],
        bases: Sequence[int] | np.ndarray,
        rs: Sequence[float] | np.ndarray,
        *,
        before: Callable[[int], None] | None = None,
    ) -> np.ndarray:
        """``measure(qubits[i], bases[i], rs[i])`` for each i in order; returns the outcomes
        (uint8). ``before(q)``, if given, runs just before q is measured (the broker brings
        q's decoherence up to date there).

        Results and states are exactly those of one ``measure`` call per qubit: qubits of
        distinct registers are independent, so they are collected and measured with one
        batched kernel call per register size (``Backend.measure_batch``); a qubit whose
        register already holds a qubit collected in this call waits until that one is
        measured. Why: measuring a batch of heralded pairs one qubit at a time cost two
        checked kernel calls per qubit, a large part of the broker's time per pair.
        """
        base = np.asarray(bases, dtype=np.uint8)
        draws = np.asarray(rs, dtype=np.float64)
        if not len(base) == len(draws) == len(qubits):
            raise StateError("measure_many needs one basis and one draw per qubit")
        outcomes = np.empty(len(qubits), dtype=np.uint8)
        groups: dict[int, list[tuple[int, int, _Register]]] = {}  # size -> [(index, qubit, register)]
        collected: set[int] = set()  # id() of the registers in `groups`
        for i, qubit in enumerate(qubits):
            reg = self._register(qubit)
            if id(reg) in collected:
                self._measure_groups(groups, base, draws, outcomes)
                collected.clear()
                reg = self._register(qubit)
            if before is not None:
                before(qubit)
            groups.setdefault(len(reg.qubits), []).append((i, qubit, reg))
            collected.add(id(reg))
        self._measure_groups(groups, base, draws, outcomes)
        return outcomes

    def _measure_groups(
        self,
        groups: dict[int, list[tuple[int, int, _Register]]],
        bases: np.ndarray,
        rs: np.ndarray,
        outcomes: np.ndarray,
    ) -> None:
        """Measure every collected qubit (separate registers), one kernel call per size."""
        for n, items in groups.items():
            if len(items) == 1:  # nothing to batch: the plain call, without the stacking
                i, qubit, _ = items[0]
                outcomes[i] = self.measure(qubit, Basis(int(bases[i])), float(rs[i]))
                continue
            index = [i for i, _, _ in items]
            positions = [reg.qubits.index(qubit) for _, qubit, reg in items]
            rhos = np.stack([reg.rho for _, _, reg in items])  # a copy, collapsed in place
            got, _, rest = self._backend.measure_batch(rhos, n, positions, bases[index], rs[index])
            outcomes[index] = got
            for k, (i, qubit, reg) in enumerate(items):
                # The new arrays are views of one batch array: each register owns its slice.
                if rest is None:
                    reg.rho = rhos[k]
                else:
                    reg.rho = rest[k]
                    del reg.qubits[positions[k]]
                    self._where[qubit] = _Register([qubit], _EIGENSTATES[bases[i]][got[k]].copy())
        groups.clear()

    # ------------------------------------------------------------ read-out

    def reduced_state(self, qubits: Sequence[int]) -> np.ndarray:
        """A new density matrix of `qubits`, in the given order (kron order).

        Qubits from different registers are uncorrelated by construction, so their joint
        state is the tensor product of each register's reduced state.
        """
        wanted = list(qubits)
        if not wanted:
            raise StateError("reduced_state needs at least one qubit")
        if len(set(wanted)) != len(wanted):
            raise StateError(f"reduced_state lists a qubit twice: {wanted}")
        if len(wanted) > self._max_register_qubits:
            raise RegisterLimitError(
                f"a {len(wanted)}-qubit reduced state exceeds max_register_qubits="
                f"{self._max_register_qubits}"
            )
        regs: dict[int, _Register] = {}
        for q in wanted:
            reg = self._register(q)
            regs.setdefault(id(reg), reg)
        wanted_set = set(wanted)
        parts: list[np.ndarray] = []
        order: list[int] = []
        for reg in regs.values():
            remove = [i for i, q in enumerate(reg.qubits) if q not in wanted_set]
            if remove:
                parts.append(self._backend.partial_trace(reg.rho, len(reg.qubits), remove))
            else:
                parts.append(reg.rho)  # the register's own array: never returned as is
            order.extend(q for q in reg.qubits if q in wanted_set)
        state = reduce(self._backend.tensor, parts)
        if order != wanted:
            k = len(wanted)
            perm = [order.index(q) for q in wanted]
            permuted = state.reshape((2,) * (2 * k)).transpose(perm + [k + p for p in perm])
            return np.array(permuted.reshape(1 << k, 1 << k), dtype=np.complex128, order="C")
        if any(state is reg.rho for reg in regs.values()):
            return state.copy()
        return state

    def bell_fidelities(self, qubit_a: int, qubit_b: int) -> np.ndarray:
        """float64 (4,): fidelity of the (a, b) reduced state to each Bell state, in
        BellState order, with a as the first (more significant) qubit."""
        reg_a = self._register(qubit_a)
        reg_b = self._register(qubit_b)
        if qubit_a == qubit_b:
            raise StateError(f"bell_fidelities needs two different qubits, got {qubit_a!r} twice")
        if reg_a is reg_b:
            qs = reg_a.qubits
            return self._backend.bell_fidelities(
                reg_a.rho, len(qs), qs.index(qubit_a), qs.index(qubit_b)
            )
        pair = self._backend.tensor(self._one(reg_a, qubit_a), self._one(reg_b, qubit_b))
        return self._backend.bell_fidelities(pair, 2, 0, 1)

    def _one(self, reg: _Register, qubit: int) -> np.ndarray:
        """The 1-qubit reduced state of `qubit` (may be the register's own array: read only)."""
        n = len(reg.qubits)
        if n == 1:
            return reg.rho
        pos = reg.qubits.index(qubit)
        return self._backend.partial_trace(reg.rho, n, [i for i in range(n) if i != pos])
