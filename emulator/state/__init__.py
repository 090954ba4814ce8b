"""Quantum state of the emulation: the registry of qubits held as density-matrix
registers, built on `emulator.kernels` (DESIGN.md §5)."""

from .registry import (
    MAX_REGISTER_QUBITS_LIMIT,
    InvalidStateError,
    QuantumRegistry,
    RegisterLimitError,
    RegistryStatistics,
    StateError,
    UnknownQubitError,
)

__all__ = [
    "MAX_REGISTER_QUBITS_LIMIT",
    "InvalidStateError",
    "QuantumRegistry",
    "RegisterLimitError",
    "RegistryStatistics",
    "StateError",
    "UnknownQubitError",
]
