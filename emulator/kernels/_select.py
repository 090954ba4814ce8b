"""Backend selection: ``get_backend(name)`` or the ``QNETEM_BACKEND`` environment variable.

Theory of operation: the choice is made at CALL time, never at import time, so a test
or a process can switch backends by setting the variable before asking. Backends are
stateless, so one instance per name is cached; a failed C load is not cached (a rebuild
followed by a new call succeeds without restarting the process).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

from ._types import Backend, KernelError

__all__ = ["BACKEND_NAMES", "DEFAULT_BACKEND", "ENV_VAR", "get_backend"]

ENV_VAR = "QNETEM_BACKEND"
DEFAULT_BACKEND = "c"
BACKEND_NAMES: tuple[str, ...] = ("c", "numpy")


def _make_c() -> Backend:
    from ._c import CBackend

    return CBackend()


def _make_numpy() -> Backend:
    from ._numpy import NumpyBackend

    return NumpyBackend()


_FACTORIES: dict[str, Callable[[], Backend]] = {"c": _make_c, "numpy": _make_numpy}
_instances: dict[str, Backend] = {}
_lock = threading.Lock()


def get_backend(name: str | None = None) -> Backend:
    """The kernel backend called `name` ("c" or "numpy", case-insensitive).

    ``name=None`` reads ``QNETEM_BACKEND`` now (default "c"). An unknown name raises
    KernelError listing the choices; "c" raises KernelBuildError when the compiled module
    is missing or stale.
    """
    source = "name"
    if name is None:
        name, source = os.environ.get(ENV_VAR, "").strip() or DEFAULT_BACKEND, ENV_VAR
    if not isinstance(name, str):
        raise KernelError(f"backend name must be a str, got {type(name).__name__}")
    key = name.strip().lower()
    factory = _FACTORIES.get(key)
    if factory is None:
        raise KernelError(
            f"unknown kernel backend {name!r} (from {source}); choose one of: {', '.join(BACKEND_NAMES)}"
        )
    with _lock:
        backend = _instances.get(key)
        if backend is None:
            backend = _instances[key] = factory()
    return backend
