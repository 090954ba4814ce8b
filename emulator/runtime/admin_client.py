"""Trio client for admin sessions: orchestrator → broker, orchestrator → node control endpoint.

Theory of operation: one TCP stream, length-prefixed msgpack frames (docs/protocol.md
§2–§3). The session opens with `admin_hello(token, versions, client)` and the server
answers `admin_welcome` (or `error` `unauthorized`, then closes). After that every call
is a request with a fresh envelope `id`; the reply is the frame whose `re` is that id.
Frames without `re` (pushed events) are ignored: the orchestrator needs none. Calls are
serialised by a lock, so one client may be shared by several tasks.

Failures are typed: `AdminRequestError` — the server answered `error` (its code and
message); `AdminConnectionError` — the stream broke, timed out, or the peer spoke
nonsense. The token is never part of an exception message or a repr.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any, TypeVar

import trio

from emulator.wire import (
    KmsStart,
    KmsStarted,
    SUPPORTED_VERSIONS,
    AdminHello,
    AdminWelcome,
    AppStart,
    AppStatus,
    AppStatusRequest,
    Error,
    FibreCut,
    FrameDecoder,
    GetStats,
    LinkFault,
    Message,
    Ok,
    QkdEve,
    RemoteProtocolError,
    Shutdown,
    Stats,
    Status,
    StatusReply,
    decode,
    encode_framed,
)

__all__ = ["AdminClient", "AdminConnectionError", "AdminError", "AdminRequestError", "AdminTimeoutError"]

_M = TypeVar("_M", bound=Message)
_RECEIVE_BYTES = 65536


class AdminError(Exception):
    """Base of admin-session failures."""


class AdminConnectionError(AdminError):
    """The session could not be opened, broke, timed out, or received an illegal frame."""


class AdminTimeoutError(AdminConnectionError):
    """The server did not answer within the client's timeout (the session is closed)."""


class AdminRequestError(AdminError):
    """The server answered a request with an `error` frame."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class AdminClient:
    """An open admin session. Create with `await AdminClient.connect(...)`; close with `aclose()`."""

    def __init__(self, stream: trio.abc.Stream, *, peer: str, timeout_s: float = 10.0) -> None:
        self._stream = stream
        self._decoder = FrameDecoder()
        self._ids = itertools.count(1)
        self._lock = trio.Lock()
        self.peer = peer  # for messages: "broker" or "node alice"
        self.timeout_s = timeout_s
        self.welcome: AdminWelcome | None = None
        self.peer_host: str | None = None  # the host `connect` dialled
        self._closed = False

    @classmethod
    async def connect(
        cls,
        host: str,
        port: int,
        token: str,
        *,
        peer: str,
        client: str = "orchestrator",
        timeout_s: float = 10.0,
    ) -> AdminClient:
        """Open a TCP session and run the `admin_hello` handshake."""
        try:
            with trio.fail_after(timeout_s):
                stream = await trio.open_tcp_stream(host, port)
        except (OSError, trio.TooSlowError) as exc:
            raise AdminConnectionError(f"cannot connect to {peer} at {host}:{port}: {_why(exc)}") from None
        self = cls(stream, peer=peer, timeout_s=timeout_s)
        self.peer_host = host
        try:
            welcome = await self.request(
                AdminHello(token=token, versions=list(SUPPORTED_VERSIONS), client=client), AdminWelcome
            )
        except BaseException:
            await self.aclose()
            raise
        self.welcome = welcome
        return self

    async def request(self, message: Message, expect: type[_M] | None = None) -> Any:
        """Send one request and return its reply (checked against `expect` when given)."""
        async with self._lock:
            if self._closed:
                raise AdminConnectionError(f"session with {self.peer} is closed")
            msg_id = next(self._ids)
            try:
                with trio.fail_after(self.timeout_s):
                    await self._stream.send_all(encode_framed(message, id=msg_id))
                    reply = await self._receive_reply(msg_id)
            except trio.TooSlowError:
                await self._abort()
                raise AdminTimeoutError(
                    f"{self.peer} did not answer {message.TYPE} within {self.timeout_s:g} s"
                ) from None
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                await self._abort()
                raise AdminConnectionError(
                    f"connection to {self.peer} lost during {message.TYPE}: {_why(exc)}"
                ) from None
            except AdminConnectionError:
                await self._abort()
                raise
        if isinstance(reply, Error):
            raise AdminRequestError(reply.code, reply.message)
        if expect is not None and not isinstance(reply, expect):
            raise AdminConnectionError(
                f"{self.peer} answered {message.TYPE} with {reply.TYPE}, expected {expect.TYPE}"
            )
        return reply

    async def _receive_reply(self, msg_id: int) -> Message:
        while True:
            while (payload := self._next_frame()) is not None:
                try:
                    env = decode(payload)
                except RemoteProtocolError as exc:
                    raise AdminConnectionError(f"{self.peer} sent an illegal frame: {exc}") from None
                if env.re == msg_id:
                    return env.message
                if env.re is None and isinstance(env.message, Error):
                    # A fatal notice (e.g. unauthorized) before the server closes.
                    return env.message
                # Pushed events or stale replies: not ours.
            data = await self._stream.receive_some(_RECEIVE_BYTES)
            if not data:
                raise AdminConnectionError(f"{self.peer} closed the connection")
            self._decoder.feed(data)

    def _next_frame(self) -> bytes | None:
        try:
            return self._decoder.next_frame()
        except RemoteProtocolError as exc:
            raise AdminConnectionError(f"{self.peer} sent an illegal frame: {exc}") from None

    # ------------------------------------------------------------------ typed calls

    async def status(self) -> StatusReply:
        return await self.request(Status(), StatusReply)

    async def get_stats(self) -> Stats:
        return await self.request(GetStats(), Stats)

    async def app_start(self, kind: str, name: str, params: dict[str, Any]) -> None:
        await self.request(AppStart(kind=kind, name=name, params=params), Ok)

    async def app_status(self, name: str) -> AppStatus:
        return await self.request(AppStatusRequest(name=name), AppStatus)

    async def link_fault(self, peer: str, cut: bool) -> None:
        """Node control endpoint: cut (`cut=True`) or restore the classical link to `peer`.

        Raises `AdminRequestError` with code `no_link` if `peer` is not a neighbour.
        """
        await self.request(LinkFault(peer=peer, cut=cut), Ok)

    async def kms_start(self, config: dict[str, Any]) -> KmsStarted:
        """Node control endpoint: start the node's KME (`config` is secret: PEM keys)."""
        return await self.request(KmsStart(config=config), KmsStarted)

    async def qkd_eve(self, endpoints: Sequence[str], *, intercept_fraction: float = 0.0, pns: bool = False) -> None:
        """Broker: set the eavesdropper of the QKD link between `endpoints` (docs/protocol.md §4.7).

        `intercept_fraction` in [0, 1] of the pulses are intercepted and resent; `pns`
        splits multi-photon pulses (the other switches keep the protocol's defaults). The
        defaults turn Eve off. Raises `AdminRequestError` (`bad_field`, `unknown_node`,
        `no_link`, `refused`: the link has no QKD) like the other requests.
        """
        message = QkdEve(endpoints=[str(e) for e in endpoints], intercept_fraction=float(intercept_fraction),
                         pns=bool(pns))  # fmt: skip
        await self.request(message, Ok)

    async def fibre_cut(self, endpoints: Sequence[str], cut: bool) -> None:
        """Broker: cut (`cut=True`) or splice the fibre of the link between `endpoints`
        (docs/protocol.md §4.5, `fibre_cut`): while cut, no heralded pair, no qubit and no
        QKD photon crosses it. The classical channel is the nodes' (`link_fault`). Raises
        `AdminRequestError` (`bad_field`, `unknown_node`, `no_link`) like the other requests.
        """
        await self.request(FibreCut(endpoints=[str(e) for e in endpoints], cut=bool(cut)), Ok)

    async def shutdown(self) -> None:
        """Ask the server to exit; a connection closed instead of `ok` counts as success.

        Raises `AdminTimeoutError` if the server neither answers nor closes in time.
        """
        try:
            await self.request(Shutdown(), Ok)
        except AdminTimeoutError:
            raise
        except AdminConnectionError:
            pass  # the server closed the session while exiting
        await self.aclose()

    # ------------------------------------------------------------------ closing

    async def _abort(self) -> None:
        self._closed = True
        with trio.CancelScope(shield=True):
            await trio.aclose_forcefully(self._stream)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        with trio.CancelScope(shield=True):
            try:
                with trio.move_on_after(1.0):
                    await self._stream.aclose()
            except (trio.BrokenResourceError, OSError):
                pass

    @property
    def closed(self) -> bool:
        return self._closed


def _why(exc: BaseException) -> str:
    if isinstance(exc, trio.TooSlowError):
        return "timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return type(exc).__name__ if not str(exc) else str(exc)
