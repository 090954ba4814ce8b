"""trio shell of one classical TCP link: moves bytes between a socket and a `LinkConnection`.

Theory of operation: two tasks per connection (aioquic's asyncio protocol is the model).
The reader pushes every `receive_some` into the core and calls `on_input(link)` so the
runtime can drain the core's events; the writer sends `core.data_to_send(now)` and
sleeps until the shaper's next release time (`core.get_timer()`) or until woken by
`wake()` (the runtime queued a message). Only the writer sends on the stream. When the
core wants the socket closed (`should_close()`), the writer cancels the reader and the
stream is closed. A connection that has not finished its handshake after
`handshake_timeout_s` wall seconds is dropped.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import trio

from .link import LinkConnection, LinkState

__all__ = ["LinkIO", "Waker"]

_RECEIVE_BYTES = 256 * 1024


class Waker:
    """A resettable wake-up flag for one sleeping task."""

    __slots__ = ("_event",)

    def __init__(self) -> None:
        self._event = trio.Event()

    def wake(self) -> None:
        self._event.set()

    async def wait(self, deadline: float = math.inf) -> None:
        """Sleep until woken or until the trio clock reaches `deadline`; then re-arm."""
        with trio.move_on_at(deadline):
            await self._event.wait()
        self._event = trio.Event()


class LinkIO:
    """Runs one `LinkConnection` over one trio stream."""

    def __init__(
        self,
        core: LinkConnection,
        stream: trio.abc.Stream,
        on_input: Callable[[LinkIO], None],
    ) -> None:
        self.core = core
        self.stream = stream
        self._on_input = on_input
        self._waker = Waker()
        self._cancel: trio.CancelScope | None = None
        self.refused = False  # the peer refused our handshake (runtime bookkeeping)
        self.refusal_retryable = False  # ... with a refusal that may clear (the link is cut there)
        self.counted = False  # the runtime folded this connection's counters into its totals

    def wake(self) -> None:
        self._waker.wake()

    def abort(self) -> None:
        """Drop the connection now (no flush)."""
        self.core.connection_lost()
        if self._cancel is not None:
            self._cancel.cancel()

    async def run(self, *, handshake_timeout_s: float = 10.0) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._cancel = nursery.cancel_scope
                nursery.start_soon(self._reader)
                nursery.start_soon(self._writer, nursery.cancel_scope)
                nursery.start_soon(self._handshake_deadline, handshake_timeout_s)
        finally:
            if self.core.state is not LinkState.CLOSED:
                self.core.connection_lost()
                self._on_input(self)
            with trio.CancelScope(shield=True):
                await self.stream.aclose()

    async def _handshake_deadline(self, timeout_s: float) -> None:
        await trio.sleep(timeout_s)
        if self.core.state is LinkState.HANDSHAKE:
            self.abort()
            self._on_input(self)

    async def _reader(self) -> None:
        while True:
            try:
                data = await self.stream.receive_some(_RECEIVE_BYTES)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            self.core.receive_data(data, trio.current_time())
            self._on_input(self)
            self._waker.wake()
            if not data or self.core.state in (LinkState.CLOSING, LinkState.CLOSED):
                return

    async def _writer(self, scope: trio.CancelScope) -> None:
        try:
            while True:
                data = self.core.data_to_send(trio.current_time())
                if data:
                    await self.stream.send_all(data)
                if self.core.should_close():
                    return
                timer = self.core.get_timer()
                await self._waker.wait(math.inf if timer is None else timer)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.core.connection_lost()
            self._on_input(self)
        finally:
            scope.cancel()
