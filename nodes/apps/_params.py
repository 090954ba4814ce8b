"""Checks every app's `parse_params` shares: unknown keys, role, the neighbour, numbers.

Each raises `AppParamError(param, why)`, which the host turns into a `bad_field` answer
naming the parameter (nodes/apps/base.py).
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Mapping
from typing import Any, TypeVar

from emulator.wire import LinkInfo

from .base import AppContext, AppParamError

__all__ = ["int_param", "neighbour_param", "number_param", "peer_app_param", "reject_unknown", "role_param"]

_E = TypeVar("_E", bound=enum.Enum)


def reject_unknown(params: Mapping[str, Any], record: type) -> None:
    """Every key must be a field of the dataclass `record`."""
    known = {f.name for f in dataclasses.fields(record)}
    for key in params:
        if key not in known:
            raise AppParamError(str(key)[:64], "unknown parameter")


def role_param(params: Mapping[str, Any], roles: type[_E]) -> _E:
    try:
        return roles(params.get("role"))
    except ValueError:
        choices = " or ".join(repr(r.value) for r in roles)
        raise AppParamError("role", f"must be {choices}") from None


def neighbour_param(params: Mapping[str, Any], ctx: AppContext) -> tuple[str, LinkInfo]:
    """`peer`: a neighbour of this node; returns its name and the link to it."""
    peer = params.get("peer")
    if not isinstance(peer, str) or not peer:
        raise AppParamError("peer", "must be a node name")
    link = ctx.links.get(peer)
    if link is None:
        raise AppParamError("peer", f"{peer[:64]!r} is not a neighbour of {ctx.node!r}")
    return peer, link


def int_param(params: Mapping[str, Any], key: str, default: int | None, lo: int, hi: int) -> int | None:
    value = params.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise AppParamError(key, f"must be an integer, got {type(value).__name__}")
    if not lo <= value <= hi:
        raise AppParamError(key, f"must be in [{lo}, {hi}], got {value}")
    return value


def number_param(
    params: Mapping[str, Any], key: str, default: float | None, lo: float = 0.0, hi: float = math.inf
) -> float | None:
    """A finite number in [lo, hi] (None only when absent and the default is None)."""
    value = params.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise AppParamError(key, f"must be a number, got {type(value).__name__}")
    value = float(value)
    if not (math.isfinite(value) and lo <= value <= hi):
        raise AppParamError(key, f"must be finite and in [{lo:g}, {hi:g}], got {value!r}")
    return value


def peer_app_param(params: Mapping[str, Any], ctx: AppContext) -> str:
    """`peer_app`: the other end's instance name (default: this instance's own name)."""
    peer_app = params.get("peer_app", ctx.name)
    if not isinstance(peer_app, str) or not peer_app:
        raise AppParamError("peer_app", "must be an app instance name")
    return peer_app
