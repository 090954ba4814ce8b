"""cffi build script for ``emulator._cext`` (out-of-line API mode).

Theory of operation: setup.py names ``cext/build_cext.py:ffibuilder`` in
``cffi_modules``; cffi's setuptools hook imports this file, generates the C wrapper
for the declarations below and compiles it together with ``cext/qnetem_*.c`` into
``emulator/_cext*.so``. The declarations are not repeated here: they are the block of
``cext/qnetem.h`` between the ``BEGIN/END CFFI DECLARATIONS`` markers, so the header
is the single source of truth for the C interface.

The package version (``__version__`` in ``emulator/__init__.py``) is stamped into the
module as ``-DQNETEM_VERSION="..."``; ``emulator/kernels/_c.py`` compares it with the
running package and refuses a stale build.

Every path is resolved from this file's location, so the build works from any working
directory (``pip install -e .`` at the repo root, or ``python cext/build_cext.py``,
which builds in place for a quick rebuild during development).
"""

from __future__ import annotations

import glob
import os
import re

import cffi

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
_HEADER = os.path.join(_HERE, "qnetem.h")
_VERSION_FILE = os.path.join(_ROOT, "emulator", "__init__.py")

_CDEF_RE = re.compile(
    r"/\* BEGIN CFFI DECLARATIONS \*/(?P<body>.*?)/\* END CFFI DECLARATIONS \*/", re.S
)
_VERSION_RE = re.compile(r"""^__version__\s*=\s*["']([^"']+)["']""", re.M)
# The version lands inside a C string literal on the compiler's command line.
_SAFE_VERSION_RE = re.compile(r"^[0-9A-Za-z.+_-]+$")


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def read_version() -> str:
    match = _VERSION_RE.search(_read(_VERSION_FILE))
    if match is None:
        raise RuntimeError(f"no __version__ = '...' line in {_VERSION_FILE}")
    version = match.group(1)
    if not _SAFE_VERSION_RE.match(version):
        raise RuntimeError(f"refusing to stamp unusual version string {version!r}")
    return version


def read_cdef() -> str:
    match = _CDEF_RE.search(_read(_HEADER))
    if match is None:
        raise RuntimeError(f"{_HEADER} lacks the BEGIN/END CFFI DECLARATIONS markers")
    return match.group("body")


def _source_paths() -> list[str]:
    """cext/qnetem_*.c, relative to the working directory when below it.

    distutils places object files at build_temp/<source path>; relative paths keep them
    inside build_temp (an absolute path is stripped of its root and still works).
    """
    sources = sorted(glob.glob(os.path.join(_HERE, "qnetem_*.c")))
    if not sources:
        raise RuntimeError(f"no qnetem_*.c sources in {_HERE}")
    cwd = os.getcwd()
    out = []
    for path in sources:
        if os.path.commonpath([cwd, path]) == cwd:
            path = os.path.relpath(path, cwd)
        out.append(path)
    return out


ffibuilder = cffi.FFI()
ffibuilder.cdef(read_cdef())
ffibuilder.set_source(
    "emulator._cext",
    '#include "qnetem.h"\n',
    sources=_source_paths(),
    include_dirs=[_HERE],
    extra_compile_args=["-O3", "-std=c99", f'-DQNETEM_VERSION="{read_version()}"'],
)


if __name__ == "__main__":
    # In-place development build: writes emulator/_cext*.so next to the sources.
    ffibuilder.compile(tmpdir=_ROOT, verbose=True)
