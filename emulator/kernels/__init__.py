"""Quantum-state and RNG kernels: a typed layer over the C module and its numpy twin.

Theory of operation
-------------------
Callers ask :func:`get_backend` for a :class:`Backend` — ``"c"`` (the C99 kernels of
``cext/``, built by cffi into ``emulator._cext``) or ``"numpy"`` (a reference twin with
identical results) — and hand it numpy arrays: density matrices (complex128,
C-contiguous, (2**n, 2**n), qubit 0 = most significant bit), operators from
:data:`GATES`, :func:`rotation` and the ``kraus_*`` constructors, and RNG keys from
:func:`derive_key`. Gates, channels and measurements modify ``rho`` in place. Bad
arguments raise :class:`KernelError` (a ValueError) from both backends alike.

``QNETEM_BACKEND=numpy|c`` selects the default backend, read at each ``get_backend()``
call. Importing this package never loads the compiled module.

The RNG is Philox4x32-10 (Salmon et al., SC'11): ``rng_u64(key, stream, start, count)``
returns samples ``start .. start+count-1`` of an independent sequence per (key, stream),
with random access and bit-identical output from both backends.
"""

from ._select import BACKEND_NAMES, DEFAULT_BACKEND, ENV_VAR, get_backend
from ._types import (
    GATES,
    MAX_QUBITS,
    Backend,
    Basis,
    BellState,
    KernelBuildError,
    KernelError,
    derive_key,
    kraus_amplitude_damping,
    kraus_dephasing,
    kraus_depolarizing,
    rotation,
)

__all__ = [
    "BACKEND_NAMES",
    "DEFAULT_BACKEND",
    "ENV_VAR",
    "GATES",
    "MAX_QUBITS",
    "Backend",
    "Basis",
    "BellState",
    "KernelBuildError",
    "KernelError",
    "derive_key",
    "get_backend",
    "kraus_amplitude_damping",
    "kraus_dephasing",
    "kraus_depolarizing",
    "rotation",
]
