"""trio shell of the node's UDP socket: shaped sends, raw receives.

Theory of operation: one UDP socket per node, bound at start-up. Outgoing datagrams go
through the per-peer `DatagramShaper` (delay, jitter, loss) and a sender task writes
each one when its release time comes; it sleeps until the earliest release over all
peers or until `wake()`. Incoming datagrams are handed, undecoded, to the caller's
receive loop (`receive()`), which decides what they mean.
"""

from __future__ import annotations

import math
import socket as _socket
from collections.abc import Callable, Iterable

import trio

from .shaper import DatagramShaper
from .tcp_io import Waker

__all__ = ["UdpEndpoint"]

MAX_DATAGRAM_BYTES = 65_507  # largest UDP payload over IPv4


class UdpEndpoint:
    def __init__(self, sock: trio.socket.SocketType) -> None:
        self._sock = sock
        self._waker = Waker()
        self.sent = 0
        self.send_errors = 0

    @classmethod
    async def bind(cls, host: str) -> UdpEndpoint:
        family = _socket.AF_INET6 if ":" in host else _socket.AF_INET
        sock = trio.socket.socket(family, _socket.SOCK_DGRAM)
        await sock.bind((host, 0))
        return cls(sock)

    @property
    def family(self) -> int:
        """The socket's address family (AF_INET or AF_INET6): names resolve to this family."""
        return int(self._sock.family)

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._sock.getsockname()[:2]
        return host, port

    def queue(self, shaper: DatagramShaper, datagram: bytes, address: tuple[str, int], now: float) -> bool:
        """Queue a datagram through `shaper` (False if the shaper dropped it)."""
        queued = shaper.push((datagram, address), now)
        if queued:
            self._waker.wake()
        return queued

    async def receive(self) -> tuple[bytes, tuple[str, int]]:
        data, address = await self._sock.recvfrom(MAX_DATAGRAM_BYTES + 1)
        return data, (address[0], address[1])

    async def run_sender(self, shapers: Callable[[], Iterable[DatagramShaper]]) -> None:
        """Forever: send what the shapers release, sleep until the next release."""
        while True:
            now = trio.current_time()
            deadline = math.inf
            for shaper in shapers():
                for datagram, address in shaper.pop_ready(now):  # type: ignore[misc]
                    try:
                        await self._sock.sendto(datagram, address)
                        self.sent += 1
                    except OSError:
                        self.send_errors += 1  # e.g. ICMP port unreachable from a dead peer
                release = shaper.next_release()
                if release is not None and release < deadline:
                    deadline = release
            await self._waker.wait(deadline)

    def close(self) -> None:
        self._sock.close()
