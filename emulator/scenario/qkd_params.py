"""Vocabulary and defaults of a scenario's QKD sections, shared without pydantic.

Theory of operation
-------------------
Two places of a scenario describe QKD (issue 4): a link's `qkd` section (the optical
layer the broker emulates, `emulator.broker.optics.OpticalLinkConfig`) and an app of
kind `qkd` (the post-processing the two nodes run, `nodes/qkd/session.py`). The
scenario schema (pydantic, validation and the generated reference) and the sans-IO
planner (`emulator.runtime.orchestrator`, which also reads the unvalidated
`scenario_to_dict` form) must agree on the defaults and on the Cascade variant names;
like `fault_kinds`, this module holds them as plain constants so both read one table
without importing each other.

Sources of the defaults:

* optics — the GYS parameter set as Ma, Qi, Zhao & Lo, PRA 72, 012326 (2005) use it
  (Table I, from Gobby, Yuan & Shields, APL 84, 3762 (2004)): eta_Bob 4.5 %,
  Y0 1.7e-6, e_detector 3.3 %; signal 0.48 (their optimum for GYS), weak decoy 0.05 and
  vacuum 0 (Sec. V: a small nu makes the vacuum + weak bound approach the
  infinite-decoy rate);
* class probabilities 0.5 / 0.25 / 0.25, not the optics module's 0.8 / 0.1 / 0.1: the
  finite-key bounds of Lim, Curty, Walenta, Xu & Zbinden, PRA 89, 022307 (2014)
  (Eqs. (2)-(5)) pay sqrt(n ln(1/eps)) per class, and at ~1e9 pulses per block the
  decoy and vacuum classes need that share of the pulses for their counts to bound
  Y1 and e1 tightly enough to leave a key;
* post-processing — eps_sec 1e-10 and eps_cor 1e-15 (Lim et al. Sec. IV's example),
  QBER threshold 11 % (Shor & Preskill, PRL 85, 441 (2000)), 5 % of the signal
  key-basis bits disclosed for the QBER estimate, blocks of 1e6 signal key-basis bits.
"""

from __future__ import annotations

from typing import Final

__all__ = [
    "CASCADE_VARIANTS",
    "DEFAULT_BASIS_Z_PROBABILITY",
    "DEFAULT_BLOCK_BITS",
    "DEFAULT_CASCADE",
    "DEFAULT_CLASS_PROBABILITIES",
    "DEFAULT_DARK_COUNT_PROBABILITY",
    "DEFAULT_EPSILON_COR",
    "DEFAULT_EPSILON_SEC",
    "DEFAULT_INTENSITIES",
    "DEFAULT_MISALIGNMENT_ERROR",
    "DEFAULT_PULSE_RATE_HZ",
    "DEFAULT_QBER_THRESHOLD",
    "DEFAULT_RECEIVER_EFFICIENCY",
    "DEFAULT_SAMPLE_FRACTION",
    "MAX_BLOCK_BITS",
    "MAX_MEAN_PHOTON_NUMBER",
    "MIN_BLOCK_BITS",
]

# ---------------------------------------------------------------- the link's optics (links[].qkd)

DEFAULT_PULSE_RATE_HZ: Final = 1e9
#: (signal, decoy, vacuum) mean photon numbers (Ma et al. 2005, GYS).
DEFAULT_INTENSITIES: Final = (0.48, 0.05, 0.0)
#: (signal, decoy, vacuum) probabilities of Alice's intensity classes (see the module doc).
DEFAULT_CLASS_PROBABILITIES: Final = (0.5, 0.25, 0.25)
DEFAULT_BASIS_Z_PROBABILITY: Final = 0.5
DEFAULT_RECEIVER_EFFICIENCY: Final = 0.045
DEFAULT_DARK_COUNT_PROBABILITY: Final = 1.7e-6
DEFAULT_MISALIGNMENT_ERROR: Final = 0.033
#: The optical kernel's ceiling on a mean photon number (emulator.kernels, _optics.py).
MAX_MEAN_PHOTON_NUMBER: Final = 10.0

# ---------------------------------------------------------------- the app (apps[] of kind qkd)

#: Cascade block-size schedules, exactly the values of nodes/qkd/cascade.py
#: `CascadeVariant`: Brassard & Salvail (EUROCRYPT '93), and options (2) (after Yan et
#: al.), (7) and (8) of Martinez-Mateo et al., QIC 15 (2015). A test compares the two.
CASCADE_VARIANTS: Final = ("original", "yan", "opt7", "opt8")
DEFAULT_CASCADE: Final = "original"
DEFAULT_BLOCK_BITS: Final = 1_000_000
MIN_BLOCK_BITS: Final = 10_000
MAX_BLOCK_BITS: Final = 2**24
DEFAULT_EPSILON_SEC: Final = 1e-10
DEFAULT_EPSILON_COR: Final = 1e-15
DEFAULT_QBER_THRESHOLD: Final = 0.11
DEFAULT_SAMPLE_FRACTION: Final = 0.05
