"""cffi build script for ``emulator._cext`` (out-of-line API mode).

Theory of operation: setup.py names ``cext/build_cext.py:ffibuilder`` in
``cffi_modules``; cffi's setuptools hook imports this file, generates the C wrapper
for the declarations below and compiles it together with ``cext/qnetem_*.c`` into
``emulator/_cext*.so``. The declarations are not repeated here: they are the block of
``cext/qnetem.h`` between the ``BEGIN/END CFFI DECLARATIONS`` markers, so the header
is the single source of truth for the C interface.

The package version (``__version__`` in ``emulator/__init__.py``) is stamped into the
module as ``-DQNETEM_VERSION="..."``; ``emulator/kernels/_c.py`` compares it with the
running package and refuses a stale build; likewise the digest of the C sources
(``-DQNETEM_SOURCE_DIGEST``), checked whenever the sources sit beside the package, so a
C edit without a rebuild is caught too.

Every path is resolved from this file's location, so the build works from any working
directory (``pip install -e .`` at the repo root, or ``python cext/build_cext.py``,
which builds in place for a quick rebuild during development).
"""

from __future__ import annotations

import glob
import importlib.util
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


def read_source_digest() -> str:
    """Digest of cext/*.c and cext/*.h (emulator/kernels/_digest.py, loaded by path)."""
    spec = importlib.util.spec_from_file_location(
        "_qnetem_digest", os.path.join(_ROOT, "emulator", "kernels", "_digest.py")
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.source_digest(_HERE)


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


def _source_paths(*, absolute: bool = False) -> list[str]:
    """cext/qnetem_*.c, relative to the working directory when below it.

    distutils places object files at build_temp/<source path>; relative paths keep them
    inside build_temp (an absolute path is stripped of its root and still works).
    """
    sources = sorted(glob.glob(os.path.join(_HERE, "qnetem_*.c")))
    if not sources:
        raise RuntimeError(f"no qnetem_*.c sources in {_HERE}")
    if absolute:
        return sources
    cwd = os.getcwd()
    return [os.path.relpath(p, cwd) if os.path.commonpath([cwd, p]) == cwd else p for p in sources]


def make_builder(*, absolute_sources: bool = False) -> cffi.FFI:
    builder = cffi.FFI()
    builder.cdef(read_cdef())
    builder.set_source(
        "emulator._cext",
        '#include "qnetem.h"\n',
        sources=_source_paths(absolute=absolute_sources),
        include_dirs=[_HERE],
        extra_compile_args=[
            "-O3",
            "-std=c99",
            f'-DQNETEM_VERSION="{read_version()}"',
            f'-DQNETEM_SOURCE_DIGEST="{read_source_digest()}"',
        ],
    )
    return builder


#: What setup.py's ``cffi_modules=["cext/build_cext.py:ffibuilder"]`` builds.
ffibuilder = make_builder()


def build_in_place() -> str:
    """Development rebuild without pip: compile under build/ and install the module as
    emulator/_cext.abi3.so — the name the setuptools build gives it (cffi builds against
    the stable ABI) — after deleting every other emulator/_cext*.so, because the
    interpreter would prefer a leftover _cext.cpython-*.so over a fresh _cext.abi3.so.
    """
    import importlib.machinery
    import shutil

    tmpdir = os.path.join(_ROOT, "build", "cffi-inplace")
    built = make_builder(absolute_sources=True).compile(tmpdir=tmpdir, verbose=True)
    suffixes = importlib.machinery.EXTENSION_SUFFIXES
    suffix = ".abi3.so" if ".abi3.so" in suffixes else suffixes[0]
    pkg_dir = os.path.join(_ROOT, "emulator")
    for old in glob.glob(os.path.join(pkg_dir, "_cext.*")):
        if any(old.endswith(s) for s in suffixes):
            os.remove(old)
    target = os.path.join(pkg_dir, "_cext" + suffix)
    shutil.copy2(built, target)
    return target


if __name__ == "__main__":
    print(build_in_place())
