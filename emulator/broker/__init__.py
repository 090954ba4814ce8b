"""The quantum-channel broker: a sans-IO core (`BrokerCore`) and the trio server that hosts it.

`core` holds every qubit and applies the physics (DESIGN §2-§6); `server` (trio, the only
module here that does I/O) moves bytes between TCP connections and the core and arms its
timer; `python -m emulator.broker` runs the server for a scenario. Tests use
`emulator.testing.InMemoryBroker`, which hosts the same core without sockets.
"""

from .config import (
    BrokerConfig,
    BrokerLimits,
    ConfigError,
    EntanglementConfig,
    LinkConfig,
    MemoryConfig,
    NodeConfig,
    QkdConfig,
    qkd_config_from_mapping,
)
from .core import BrokerCore, BrokerStatistics, SessionState

__all__ = [
    "BrokerConfig",
    "BrokerCore",
    "BrokerLimits",
    "BrokerStatistics",
    "ConfigError",
    "EntanglementConfig",
    "LinkConfig",
    "MemoryConfig",
    "NodeConfig",
    "QkdConfig",
    "SessionState",
    "qkd_config_from_mapping",
]
