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

GF(2) kernels (``gf2_*``) work on bit-packed keys: n bits in ceil(n/64) uint64 words, key
bit i = bit (i % 64) of word i // 64, least significant bit first (``gf2_pack`` /
``gf2_unpack`` convert). They compute the parities of many blocks of a key at once
(contiguous ranges, or ranges of a shuffling index), shuffle a key (``gf2_gather``),
flip bits and count differing bits: the parity work of Cascade reconciliation.

``poly127_hash(data, r, length)`` is the polynomial evaluation hash over GF(2^127 - 1)
(:data:`POLY127_PRIME`) that QKD verification and authentication use
(nodes/qkd/_polyhash.py): Horner's rule over 15-byte little-endian blocks of a byte
buffer and a final length block.

Optics kernels (``optics_*``, model in ``_optics.py``) serve decoy-state BB84: Alice's
per-pulse (intensity class, basis, bit) as a pure function of her key and the pulse index
(``optics_choices``), and the detections at Bob sampled at a cost proportional to the
detections (``optics_sample`` over an :class:`OpticsModel` built by
:func:`build_optics_model`).
"""

from ._optics import (
    CHOICE_STREAM,
    MAX_MEAN_PHOTON_NUMBER,
    MAX_PULSE_INDEX,
    ChoiceThresholds,
    Detections,
    Eavesdropper,
    EveFlag,
    OpticsCursor,
    OpticsModel,
    OpticsParameters,
    PulseChoices,
    PulseMode,
    build_optics_model,
)
from ._select import BACKEND_NAMES, DEFAULT_BACKEND, ENV_VAR, get_backend
from ._types import (
    GATES,
    GF2_MAX_BITS,
    MAX_QUBITS,
    POLY127_PRIME,
    Backend,
    Basis,
    BellState,
    KernelBuildError,
    KernelError,
    derive_key,
    gf2_words_for_bits,
    kraus_amplitude_damping,
    kraus_dephasing,
    kraus_depolarizing,
    rotation,
)

__all__ = [
    "BACKEND_NAMES",
    "CHOICE_STREAM",
    "MAX_MEAN_PHOTON_NUMBER",
    "MAX_PULSE_INDEX",
    "ChoiceThresholds",
    "Detections",
    "Eavesdropper",
    "EveFlag",
    "OpticsCursor",
    "OpticsModel",
    "OpticsParameters",
    "PulseChoices",
    "PulseMode",
    "build_optics_model",
    "DEFAULT_BACKEND",
    "ENV_VAR",
    "GATES",
    "GF2_MAX_BITS",
    "MAX_QUBITS",
    "POLY127_PRIME",
    "Backend",
    "Basis",
    "BellState",
    "KernelBuildError",
    "KernelError",
    "derive_key",
    "get_backend",
    "gf2_words_for_bits",
    "kraus_amplitude_damping",
    "kraus_dephasing",
    "kraus_depolarizing",
    "rotation",
]
