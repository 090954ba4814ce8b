"""Physical models of qnetem's quantum hardware: pure functions, SI units in names.

Fibre (loss, delay), heralded entanglement (single- and double-click), Bell/Werner
states, memory T1/T2 decoherence, detectors (efficiency, dark counts, dead time,
misalignment), weak-coherent sources (Poisson photon number, decoy intensities) and
gate depolarisation. Nothing here reads a clock or a global RNG: times are arguments
and sampling takes a seeded `numpy.random.Generator`. Every formula cites its source
in the module that implements it.
"""

from .bell import (
    BELL_CORRELATION_SIGNS,
    bell_diagonal_state,
    bell_fidelity,
    bell_projector,
    bell_vector,
    chsh_werner,
    fidelity_from_correlations,
    pauli_correlations,
    werner_fidelity,
    werner_state,
    werner_visibility,
)
from .constants import (
    DEFAULT_ATTENUATION_DB_PER_KM,
    FIBRE_DELAY_S_PER_KM,
    FIBRE_GROUP_INDEX,
    FIBRE_SPEED_KM_PER_S,
    SPEED_OF_LIGHT_KM_PER_S,
)
from .detector import (
    DARK_COUNT_ERROR,
    click_probability,
    dead_time_throughput_factor,
    error_click_probability,
    n_photon_yield,
    quantum_bit_error_rate,
    registered_click_rate_hz,
)
from .errors import MemoryParameterError, PhysicsParameterError
from .fibre import loss_db, propagation_delay_s, transmittance
from .gate import average_gate_fidelity, gate_depolarizing_probability
from .heralding import (
    HeraldingModel,
    HeraldingScheme,
    double_click_model,
    sample_attempts,
    sample_heralded_bells,
    single_click_model,
    single_click_state,
)
from .memory import (
    MemoryModel,
    amplitude_damping_gamma,
    check_coherence_times,
    memory_decay_kraus,
    pure_dephasing_probability,
    werner_fidelity_after_dephasing,
)
from .source import (
    DecoyIntensities,
    IntensityClass,
    multi_photon_probability,
    photon_number_pmf,
    sample_photon_numbers,
)

__all__ = [
    "BELL_CORRELATION_SIGNS",
    "DARK_COUNT_ERROR",
    "DEFAULT_ATTENUATION_DB_PER_KM",
    "FIBRE_DELAY_S_PER_KM",
    "FIBRE_GROUP_INDEX",
    "FIBRE_SPEED_KM_PER_S",
    "SPEED_OF_LIGHT_KM_PER_S",
    "DecoyIntensities",
    "HeraldingModel",
    "HeraldingScheme",
    "IntensityClass",
    "MemoryModel",
    "MemoryParameterError",
    "PhysicsParameterError",
    "amplitude_damping_gamma",
    "average_gate_fidelity",
    "bell_diagonal_state",
    "bell_fidelity",
    "bell_projector",
    "bell_vector",
    "check_coherence_times",
    "chsh_werner",
    "click_probability",
    "dead_time_throughput_factor",
    "double_click_model",
    "error_click_probability",
    "fidelity_from_correlations",
    "gate_depolarizing_probability",
    "loss_db",
    "memory_decay_kraus",
    "multi_photon_probability",
    "n_photon_yield",
    "pauli_correlations",
    "photon_number_pmf",
    "propagation_delay_s",
    "pure_dephasing_probability",
    "quantum_bit_error_rate",
    "registered_click_rate_hz",
    "sample_attempts",
    "sample_heralded_bells",
    "sample_photon_numbers",
    "single_click_model",
    "single_click_state",
    "transmittance",
    "werner_fidelity",
    "werner_fidelity_after_dephasing",
    "werner_state",
    "werner_visibility",
]
