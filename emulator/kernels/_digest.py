"""Digest of the C sources, stamped into the compiled module to detect stale builds.

`cext/build_cext.py` loads this file by path (the isolated build environment has no
numpy, so it cannot import the `emulator` package) and compiles the digest of
`cext/*.c` and `cext/*.h` into the module. At load, `emulator.kernels._c` recomputes it
when the sources sit beside the package (a development checkout or an editable install)
and refuses a module built from other sources. Standard library only.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

__all__ = ["source_digest"]


def source_digest(cext_dir: str | Path) -> str:
    """16 hex digits of SHA-256 over the names and contents of cext/*.c and cext/*.h."""
    h = hashlib.sha256()
    for path in sorted(Path(cext_dir).glob("*.[ch]")):
        h.update(path.name.encode())
        h.update(b"\0")
        h.update(path.read_bytes())
        h.update(b"\0")
    return h.hexdigest()[:16]
