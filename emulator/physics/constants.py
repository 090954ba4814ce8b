"""Physical constants shared by the broker's models and the nodes' protocol logic.

Theory of operation: light in standard single-mode fibre travels at c / n_g, with a
group index n_g ~ 1.47 at 1550 nm, i.e. about 204 000 km/s, so one kilometre of fibre
delays a photon (or a classical frame) by ~4.9 us (DESIGN.md §3). Loss in SMF-28 at
1550 nm is typically 0.18-0.20 dB/km (ITU-T G.652 fibre); 0.2 dB/km is the round
figure customarily used by QKD and repeater studies, and our default.
"""

from __future__ import annotations

from typing import Final

__all__ = [
    "DEFAULT_ATTENUATION_DB_PER_KM",
    "FIBRE_DELAY_S_PER_KM",
    "FIBRE_GROUP_INDEX",
    "FIBRE_SPEED_KM_PER_S",
    "SPEED_OF_LIGHT_KM_PER_S",
]

#: Speed of light in vacuum (exact by the SI definition of the metre), km/s.
SPEED_OF_LIGHT_KM_PER_S: Final[float] = 299_792.458

#: Group index of standard single-mode fibre at 1550 nm (~1.468); DESIGN.md §3 rounds the
#: resulting delay to 4.9 us/km, which is what every delay in qnetem uses.
FIBRE_GROUP_INDEX: Final[float] = 1.47

#: One-way delay of light in fibre per kilometre (DESIGN.md §3): 1.47 / c ~ 4.9 us/km.
FIBRE_DELAY_S_PER_KM: Final[float] = 4.9e-6

#: Speed of light in fibre implied by FIBRE_DELAY_S_PER_KM (~204 082 km/s).
FIBRE_SPEED_KM_PER_S: Final[float] = 1.0 / FIBRE_DELAY_S_PER_KM

#: Attenuation of SMF-28 at 1550 nm, dB/km.
DEFAULT_ATTENUATION_DB_PER_KM: Final[float] = 0.2
