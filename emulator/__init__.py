"""qnetem's shared side: wire protocol, kernels, quantum state, physics, broker, scenarios, runtime.

`emulator` never imports `nodes` (tests/unit/test_layering.py enforces it).
"""

__version__ = "0.1.0"
