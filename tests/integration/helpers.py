"""Helpers shared by the integration tests (real processes on 127.0.0.1)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import trio


async def wait_for(predicate: Callable[[], Awaitable[Any]], timeout_s: float, what: str) -> Any:
    """Poll `predicate` every 50 ms until it returns something truthy; fail naming `what`."""
    with trio.move_on_after(timeout_s):
        while True:
            value = await predicate()
            if value:
                return value
            await trio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")
