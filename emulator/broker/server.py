"""The trio shell of the broker: TCP connections in, `BrokerCore` in the middle, bytes out.

Theory of operation
-------------------
This module only moves bytes and arms one timer (CONVENTIONS 1; aioquic's asyncio
`protocol.py` is the model). Per connection there are two tasks:

* a reader: `receive_some` -> `core.receive_data(session, data, now)`;
* a writer: sleeps until woken, then sends `core.data_to_send(session)`. Output for a
  session can be produced by ANY input (an event pushed to a neighbour, a timer), so
  after every call into the core `_after_core()` wakes the writer of every session in
  `core.sessions_with_data()`. Only the writer ever sends on its stream.

One timer task sleeps until `core.get_timer()` (converted to wall time) and calls
`core.handle_timer`. Sessions the core asks to close are flushed, then closed, and every
closed connection is reported with `core.close_session`. An admin `shutdown` makes
`serve_broker` flush pending output and return.

Emulated time (DESIGN §3): t_emulated = (trio.current_time() - t0) / time_scale, with t0
taken when the server starts; trio's default clock is the monotonic clock, and tests
may run the server under a fake trio clock.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import trio

from .core import BrokerCore

__all__ = ["BrokerServer", "serve_broker", "write_port_file"]

log = logging.getLogger("emulator.broker.server")

_RECEIVE_BYTES = 256 * 1024
_SHUTDOWN_FLUSH_S = 2.0  # wall seconds allowed to flush replies before exiting on `shutdown`


def write_port_file(path: str | os.PathLike[str], port: int) -> None:
    """Write `port` to `path` atomically (temporary file in the same directory, then rename)."""
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent or ".")
    try:
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(f"{port}\n")
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class _Connection:
    __slots__ = ("closing", "done", "session", "stream", "wake")

    def __init__(self, session: int, stream: trio.abc.Stream) -> None:
        self.session = session
        self.stream = stream
        self.wake = trio.Event()
        self.closing = False  # the core asked to close: flush, then hang up
        self.done = trio.Event()  # the writer has nothing more to send


class BrokerServer:
    """Hosts a `BrokerCore` on trio streams. One instance serves one core."""

    def __init__(self, core: BrokerCore) -> None:
        self.core = core
        self._time_scale = core.config.time_scale
        self._t0 = trio.current_time() - core.now_s * self._time_scale
        self._connections: dict[int, _Connection] = {}
        self._timer_changed = trio.Event()
        self._armed: float | None = None
        self._shutdown = trio.Event()

    # ------------------------------------------------------------------ time

    def now_s(self) -> float:
        """Current emulated time."""
        return (trio.current_time() - self._t0) / self._time_scale

    def _wall(self, t_s: float) -> float:
        return self._t0 + t_s * self._time_scale

    # ------------------------------------------------------------------ plumbing

    def _after_core(self) -> None:
        """Wake writers with output, mark sessions to close, re-arm the timer if it moved."""
        core = self.core
        for sid in core.sessions_with_data():
            conn = self._connections.get(sid)
            if conn is not None:
                conn.wake.set()
        for sid in core.sessions_to_close():
            conn = self._connections.get(sid)
            if conn is not None:
                conn.closing = True
                conn.wake.set()
        if core.get_timer() != self._armed:
            self._timer_changed.set()
        if core.shutdown_requested:
            self._shutdown.set()

    async def _timer_task(self) -> None:
        while True:
            self._timer_changed = trio.Event()
            self._armed = deadline = self.core.get_timer()
            if deadline is None:
                await self._timer_changed.wait()
                continue
            with trio.move_on_at(self._wall(deadline)) as scope:
                await self._timer_changed.wait()
            if not scope.cancelled_caught:
                continue
            try:
                self.core.handle_timer(max(self.now_s(), deadline))
            except Exception:  # defence in depth: the core contains its own errors
                log.exception("core failed in handle_timer")
            self._after_core()

    async def _writer(self, conn: _Connection, cancel: trio.CancelScope) -> None:
        try:
            while True:
                await conn.wake.wait()
                conn.wake = trio.Event()
                data = self.core.data_to_send(conn.session)
                if data:
                    await conn.stream.send_all(data)
                if conn.closing:
                    break
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            conn.done.set()
        cancel.cancel()

    async def _reader(self, conn: _Connection) -> None:
        try:
            while not conn.closing:
                data = await conn.stream.receive_some(_RECEIVE_BYTES)
                if not data:
                    return
                self.core.receive_data(conn.session, data, self.now_s())
                self._after_core()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return
        except Exception:
            # The core answers bad input with error frames; anything escaping it is a bug.
            # Drop this connection only: the server and every other session keep going.
            log.exception("session %d: core failed; closing the connection", conn.session)

    async def handle_stream(self, stream: trio.abc.Stream) -> None:
        """Serve one connection until either side closes it."""
        sid = self.core.open_session(self.now_s())
        conn = _Connection(sid, stream)
        self._connections[sid] = conn
        log.debug("session %d: connected", sid)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._writer, conn, nursery.cancel_scope)
                await self._reader(conn)
                if not conn.closing:
                    # Peer hung up (EOF): nothing more can be written usefully.
                    nursery.cancel_scope.cancel()
        finally:
            del self._connections[sid]
            self.core.close_session(sid, self.now_s())
            self._after_core()
            log.debug("session %d: closed", sid)
            await trio.aclose_forcefully(stream)

    async def _flush_all(self) -> None:
        """Give every writer a chance to send what it has (bounded by _SHUTDOWN_FLUSH_S)."""
        with trio.move_on_after(_SHUTDOWN_FLUSH_S):
            while any(sid in self._connections for sid in self.core.sessions_with_data()):
                await trio.sleep(0.001)

    async def serve(
        self,
        listeners: list[trio.SocketListener],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept connections on `listeners` until an admin `shutdown` (or cancellation)."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._timer_task)
            await nursery.start(trio.serve_listeners, self.handle_stream, listeners)
            task_status.started()
            await self._shutdown.wait()
            await self._flush_all()
            log.info("shutting down")
            nursery.cancel_scope.cancel()


async def serve_broker(
    core: BrokerCore,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    port_file: str | os.PathLike[str] | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Listen on `host:port` (port 0: any free port), report the bound port through
    `task_status` and `port_file`, and serve `core` until shutdown."""
    listeners = await trio.open_tcp_listeners(port, host=host)
    bound = listeners[0].socket.getsockname()[1]
    log.info("broker listening on %s:%d", host, bound)
    if port_file is not None:
        write_port_file(port_file, bound)
    server = BrokerServer(core)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve, listeners)
        task_status.started(bound)
