"""Link liveness from UDP probes (sans-IO): up/down per neighbour and round-trip time.

Theory of operation. Every `interval_s` (wall seconds; 0.1 s by default) the node sends
each neighbour a `probe(node, seq, sent_s)` datagram; the neighbour echoes it as
`probe_ack(node, seq, sent_s)`. Probes travel through the link shaper, so they see the
link's delay, jitter and UDP loss, and a cut link loses them all.

Rule (stated once, used everywhere):

* `outstanding` counts the probes sent to a peer since the last valid ack.
* At each probe tick, *before* sending the next probe, if `outstanding >= miss_limit`
  (default 3) the link is DOWN. So a link goes down about miss_limit x interval_s after
  its last answered probe (300-400 ms with the defaults), and a single lost datagram,
  or even miss_limit - 1 in a row, does not flap it.
* A valid ack (its seq is one of the last `2 * miss_limit` probes we sent to that peer)
  sets `outstanding` to 0 and the link UP at once ("up again on the next ack").
* A link starts UNKNOWN: it has not been answered yet and has not missed enough probes.

RTT is measured against our own record of when each probe left (the echoed `sent_s` is
not trusted) and smoothed as in RFC 6298 §2 (SRTT <- 7/8 SRTT + 1/8 R, first sample
taken as is). All times are the caller's wall clock; the runtime converts RTTs to
emulated seconds for reports.
"""

from __future__ import annotations

import dataclasses
import enum
from collections import deque

from emulator.wire import Probe, ProbeAck

__all__ = ["Liveness", "LinkDown", "LinkUp", "LivenessState", "PeerLiveness"]


class LivenessState(enum.Enum):
    UNKNOWN = "unknown"
    UP = "up"
    DOWN = "down"


@dataclasses.dataclass(frozen=True, slots=True)
class LinkUp:
    peer: str
    now: float


@dataclasses.dataclass(frozen=True, slots=True)
class LinkDown:
    peer: str
    now: float


@dataclasses.dataclass(frozen=True, slots=True)
class PeerLiveness:
    """Snapshot of one neighbour's liveness (times in the caller's wall seconds)."""

    state: LivenessState
    probes_sent: int
    acks_received: int
    outstanding: int
    rtt_last_s: float | None
    rtt_smoothed_s: float | None


class _Peer:
    __slots__ = ("state", "next_probe", "outstanding", "sent", "probes_sent", "acks", "rtt_last", "srtt")

    def __init__(self, now: float) -> None:
        self.state = LivenessState.UNKNOWN
        self.next_probe = now
        self.outstanding = 0
        self.sent: deque[tuple[int, float]] = deque()  # (seq, wall time sent), most recent last
        self.probes_sent = 0
        self.acks = 0
        self.rtt_last: float | None = None
        self.srtt: float | None = None


class Liveness:
    """Probe scheduler and up/down detector for all neighbours of one node."""

    def __init__(self, local_node: str, *, interval_s: float = 0.1, miss_limit: int = 3) -> None:
        if not interval_s > 0.0:
            raise ValueError(f"interval_s must be > 0, got {interval_s!r}")
        if miss_limit < 1:
            raise ValueError(f"miss_limit must be >= 1, got {miss_limit!r}")
        self.local_node = local_node
        self.interval_s = interval_s
        self.miss_limit = miss_limit
        self._peers: dict[str, _Peer] = {}
        self._seq = 0
        self._events: deque[LinkUp | LinkDown] = deque()
        self._out: deque[tuple[str, Probe]] = deque()

    # ------------------------------------------------------------------ peers

    def add_peer(self, peer: str, now: float) -> None:
        """Start probing `peer` (first probe due at once). Re-adding resets its state."""
        self._peers[peer] = _Peer(now)

    def remove_peer(self, peer: str) -> None:
        self._peers.pop(peer, None)

    def state(self, peer: str) -> LivenessState:
        p = self._peers.get(peer)
        return p.state if p is not None else LivenessState.UNKNOWN

    # ------------------------------------------------------------------ timer

    def get_timer(self) -> float | None:
        return min((p.next_probe for p in self._peers.values()), default=None)

    def handle_timer(self, now: float) -> None:
        for name, p in self._peers.items():
            if p.next_probe > now:
                continue
            if p.outstanding >= self.miss_limit and p.state is not LivenessState.DOWN:
                p.state = LivenessState.DOWN
                self._events.append(LinkDown(name, now))
            self._seq += 1
            p.sent.append((self._seq, now))
            while len(p.sent) > 2 * self.miss_limit:
                p.sent.popleft()
            p.outstanding += 1
            p.probes_sent += 1
            self._out.append((name, Probe(node=self.local_node, seq=self._seq, sent_s=now)))
            # Keep the cadence; after a stall (process paused) restart from now, no burst.
            p.next_probe += self.interval_s
            if p.next_probe <= now:
                p.next_probe = now + self.interval_s

    # ------------------------------------------------------------------ datagrams

    def receive_probe(self, probe: Probe) -> ProbeAck:
        """Answer a neighbour's probe (the runtime has checked it came from that neighbour)."""
        return ProbeAck(node=self.local_node, seq=probe.seq, sent_s=probe.sent_s)

    def receive_ack(self, peer: str, ack: ProbeAck, now: float) -> bool:
        """Account an ack from `peer`. Returns False if it was stale or unknown (ignored)."""
        p = self._peers.get(peer)
        if p is None or ack.node != peer:
            return False
        sent_at = next((t for seq, t in p.sent if seq == ack.seq), None)
        if sent_at is None:
            return False
        rtt = max(0.0, now - sent_at)
        p.rtt_last = rtt
        p.srtt = rtt if p.srtt is None else 0.875 * p.srtt + 0.125 * rtt  # RFC 6298 §2 (alpha = 1/8)
        p.acks += 1
        p.outstanding = 0
        if p.state is not LivenessState.UP:
            p.state = LivenessState.UP
            self._events.append(LinkUp(peer, now))
        return True

    # ------------------------------------------------------------------ outputs

    def probes_to_send(self) -> list[tuple[str, Probe]]:
        out = list(self._out)
        self._out.clear()
        return out

    def next_event(self) -> LinkUp | LinkDown | None:
        return self._events.popleft() if self._events else None

    def statistics(self, peer: str) -> PeerLiveness | None:
        p = self._peers.get(peer)
        if p is None:
            return None
        return PeerLiveness(
            state=p.state,
            probes_sent=p.probes_sent,
            acks_received=p.acks,
            outstanding=p.outstanding,
            rtt_last_s=p.rtt_last,
            rtt_smoothed_s=p.srtt,
        )
