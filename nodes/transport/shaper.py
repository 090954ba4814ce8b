"""Link shaper: the sender-side delay, jitter and loss of a classical link (sans-IO).

Theory of operation (DESIGN §3): a classical frame sent over L km of fibre arrives
L x FIBRE_DELAY_S_PER_KM (4.9 us/km) emulated seconds later, plus a configured jitter
drawn uniformly from [0, jitter_s]. The emulator applies this delay on the *sender*:
a shaped message is held in a queue and released to the socket at

    release = now + (delay_s + U(0, jitter_s)) * time_scale        (wall seconds)

because one emulated second lasts `time_scale` wall seconds. The real socket adds its
own (small, unmodelled) latency on top.

* Streams (TCP) must not be reordered, so a stream release time is also at least the
  previous one: release_k = max(release_{k-1}, now + delay_k). Jitter therefore
  bunches messages up instead of overtaking them, as on a real in-order link.
* Datagrams (UDP) are independent: each gets its own delay (they may reorder, as real
  datagrams can) and is dropped with probability `loss` before it is queued.
* A cut link (control `link_fault`, docs/protocol.md §4.5) loses every datagram: while
  a `DatagramShaper` is cut, `push` drops everything (no random draw, so the loss
  sequence after a restore is the one the seed gives without the cut), and cutting
  discards what is still queued, as a real cut loses the datagrams in flight.

`now` is always the caller's *wall* clock (the runtime passes its monotonic time; tests
pass a fake clock). Jitter and loss draw from the seeded `numpy.random.Generator` given
at construction; `shaper_rng` derives one per (node seed, peer, purpose), so a run with
the same seed shapes identically.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
import zlib
from collections import deque

import numpy as np

from emulator.physics import FIBRE_DELAY_S_PER_KM
from emulator.wire import LinkInfo

__all__ = ["DatagramShaper", "ShaperConfig", "StreamShaper", "shaper_rng"]


@dataclasses.dataclass(frozen=True, slots=True)
class ShaperConfig:
    """Parameters of one direction of one link. Delays are emulated seconds."""

    delay_s: float = 0.0  # fixed one-way delay (fibre propagation)
    jitter_s: float = 0.0  # upper bound of the uniform jitter added to each message
    loss: float = 0.0  # probability that a datagram is dropped (streams never drop)
    time_scale: float = 1.0  # wall seconds per emulated second

    def __post_init__(self) -> None:
        for name in ("delay_s", "jitter_s"):
            value = getattr(self, name)
            if not (value >= 0.0 and math.isfinite(value)):
                raise ValueError(f"{name} must be finite and >= 0, got {value!r}")
        if not (0.0 <= self.loss <= 1.0):
            raise ValueError(f"loss must be in [0, 1], got {self.loss!r}")
        if not (self.time_scale > 0.0 and math.isfinite(self.time_scale)):
            raise ValueError(f"time_scale must be finite and > 0, got {self.time_scale!r}")

    @classmethod
    def from_link(cls, link: LinkInfo, time_scale: float) -> ShaperConfig:
        """Shaping of a link as the broker described it in `welcome` (DESIGN §3)."""
        return cls(
            delay_s=link.length_km * FIBRE_DELAY_S_PER_KM,
            jitter_s=link.jitter_s,
            loss=link.udp_loss,
            time_scale=time_scale,
        )

    @property
    def is_transparent(self) -> bool:
        """True when the shaper neither delays nor drops anything."""
        return self.delay_s == 0.0 and self.jitter_s == 0.0 and self.loss == 0.0


_PURPOSES = {"tcp": 1, "udp": 2, "app": 3}


def shaper_rng(seed: int, peer: str, purpose: str) -> np.random.Generator:
    """A generator seeded from the node's seed, the peer's name and a purpose (`tcp`/`udp`).

    crc32 is used because Python's `hash` of a str changes between processes.
    """
    return np.random.default_rng([seed & 0xFFFFFFFFFFFFFFFF, zlib.crc32(peer.encode()), _PURPOSES[purpose]])


def _wall_delay(config: ShaperConfig, rng: np.random.Generator) -> float:
    jitter = config.jitter_s * rng.random() if config.jitter_s > 0.0 else 0.0
    return (config.delay_s + jitter) * config.time_scale


class StreamShaper:
    """Order-preserving delay queue for one stream (one TCP link direction)."""

    __slots__ = ("_config", "_rng", "_queue", "_last_release", "_pending_bytes")

    def __init__(self, config: ShaperConfig, rng: np.random.Generator) -> None:
        self._config = config
        self._rng = rng
        self._queue: deque[tuple[float, bytes]] = deque()
        self._last_release = -math.inf
        self._pending_bytes = 0

    @property
    def config(self) -> ShaperConfig:
        return self._config

    @property
    def pending_bytes(self) -> int:
        return self._pending_bytes

    def push(self, data: bytes, now: float) -> float:
        """Queue `data`; return its wall release time (never before an earlier message's)."""
        release = max(self._last_release, now + _wall_delay(self._config, self._rng))
        self._last_release = release
        self._queue.append((release, data))
        self._pending_bytes += len(data)
        return release

    def pop_ready(self, now: float) -> bytes:
        """All bytes whose release time is <= now, concatenated in order (b"" if none)."""
        out = []
        queue = self._queue
        while queue and queue[0][0] <= now:
            out.append(queue.popleft()[1])
        data = b"".join(out)
        self._pending_bytes -= len(data)
        return data

    def next_release(self) -> float | None:
        """Wall time at which the next queued message becomes ready, or None if empty."""
        return self._queue[0][0] if self._queue else None


@dataclasses.dataclass(frozen=True, slots=True)
class DatagramShaperStats:
    queued: int
    dropped: int  # random loss (`ShaperConfig.loss`)
    cut_dropped: int  # lost to a cut link: pushed while cut, or queued when it was cut


class DatagramShaper:
    """Delay-and-drop queue for the datagrams sent to one peer.

    Items are opaque to the shaper (the runtime queues `(bytes, address)` pairs).
    """

    __slots__ = ("_config", "_rng", "_heap", "_seq", "_queued", "_dropped", "_cut", "_cut_dropped")

    def __init__(self, config: ShaperConfig, rng: np.random.Generator) -> None:
        self._config = config
        self._rng = rng
        self._heap: list[tuple[float, int, object]] = []
        self._seq = 0  # tie-breaker: equal release times keep their sending order
        self._queued = 0
        self._dropped = 0
        self._cut = False
        self._cut_dropped = 0

    @property
    def config(self) -> ShaperConfig:
        return self._config

    @property
    def cut(self) -> bool:
        return self._cut

    def set_cut(self, cut: bool) -> None:
        """Cut (drop everything, discarding the queue) or restore the link."""
        if cut and not self._cut:
            self._cut_dropped += len(self._heap)
            self._heap.clear()
        self._cut = cut

    def push(self, item: object, now: float) -> bool:
        """Queue `item`, or drop it (cut link, or with probability `loss`). Returns False if dropped."""
        if self._cut:
            self._cut_dropped += 1
            return False
        if self._config.loss > 0.0 and self._rng.random() < self._config.loss:
            self._dropped += 1
            return False
        release = now + _wall_delay(self._config, self._rng)
        heapq.heappush(self._heap, (release, self._seq, item))
        self._seq += 1
        self._queued += 1
        return True

    def pop_ready(self, now: float) -> list[object]:
        """Items whose release time is <= now, in release order."""
        out = []
        heap = self._heap
        while heap and heap[0][0] <= now:
            out.append(heapq.heappop(heap)[2])
        return out

    def next_release(self) -> float | None:
        return self._heap[0][0] if self._heap else None

    def statistics(self) -> DatagramShaperStats:
        return DatagramShaperStats(queued=self._queued, dropped=self._dropped, cut_dropped=self._cut_dropped)
