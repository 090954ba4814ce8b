"""One node's full protocol stack; runs in its own process (or container).

`nodes` may import only `emulator.wire`, `emulator.physics`, `emulator.kernels` and
`emulator.testing` from the shared side.
"""
