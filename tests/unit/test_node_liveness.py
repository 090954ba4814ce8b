"""UDP liveness (nodes/transport/liveness.py): probes, up/down transitions, RTT."""

from __future__ import annotations

import numpy as np
import pytest

from emulator.wire import Probe, ProbeAck
from nodes.transport.liveness import LinkDown, LinkUp, Liveness, LivenessState
from nodes.transport.shaper import DatagramShaper, ShaperConfig


def drain(live: Liveness) -> list[object]:
    out = []
    while (e := live.next_event()) is not None:
        out.append(e)
    return out


# Intervals are 1/8 s so that tick times add up exactly in binary floating point.
I = 0.125


def tick(live: Liveness, now: float) -> list[tuple[str, Probe]]:
    assert live.get_timer() is not None and live.get_timer() <= now  # type: ignore[operator]
    live.handle_timer(now)
    return live.probes_to_send()


def ack_for(probe: Probe, peer: str = "bob") -> ProbeAck:
    return ProbeAck(node=peer, seq=probe.seq, sent_s=probe.sent_s)


def test_probe_is_echoed() -> None:
    bob = Liveness("bob")
    ack = bob.receive_probe(Probe(node="alice", seq=7, sent_s=1.25))
    assert ack == ProbeAck(node="bob", seq=7, sent_s=1.25)


def test_up_on_first_ack_with_rtt() -> None:
    live = Liveness("alice", interval_s=I, miss_limit=3)
    live.add_peer("bob", now=0.0)
    assert live.state("bob") is LivenessState.UNKNOWN
    ((peer, probe),) = tick(live, 0.0)
    assert peer == "bob" and probe.node == "alice"
    assert live.get_timer() == I
    assert live.receive_ack("bob", ack_for(probe), now=0.004)
    assert drain(live) == [LinkUp("bob", 0.004)]
    stats = live.statistics("bob")
    assert stats is not None and stats.rtt_last_s == pytest.approx(0.004) and stats.rtt_smoothed_s == pytest.approx(0.004)
    # RFC 6298 §2: SRTT <- 7/8 SRTT + 1/8 R
    ((_, probe2),) = tick(live, I)
    live.receive_ack("bob", ack_for(probe2), now=I + 0.012)
    assert live.statistics("bob").rtt_smoothed_s == pytest.approx(0.875 * 0.004 + 0.125 * 0.012)  # type: ignore[union-attr]
    assert drain(live) == []  # already up: no second event


def test_down_after_miss_limit_unanswered_probes_and_up_again_on_next_ack() -> None:
    live = Liveness("alice", interval_s=I, miss_limit=3)
    live.add_peer("bob", now=0.0)
    ((_, p0),) = tick(live, 0.0)
    live.receive_ack("bob", ack_for(p0), 0.001)
    drain(live)
    # Probes at I, 2I, 3I go unanswered; at the 4I tick three are outstanding -> down.
    probes = [tick(live, k * I)[0][1] for k in (1, 2, 3)]
    assert live.state("bob") is LivenessState.UP
    assert drain(live) == []
    tick(live, 4 * I)
    assert live.state("bob") is LivenessState.DOWN
    assert drain(live) == [LinkDown("bob", 4 * I)]
    tick(live, 5 * I)
    assert drain(live) == []  # stays down, no repeated event
    # A late ack of a recent probe counts: up at once.
    assert live.receive_ack("bob", ack_for(probes[-1]), 5.5 * I)
    assert drain(live) == [LinkUp("bob", 5.5 * I)]
    assert live.statistics("bob").outstanding == 0  # type: ignore[union-attr]


def test_fewer_misses_than_the_limit_do_not_flap() -> None:
    live = Liveness("alice", interval_s=I, miss_limit=3)
    live.add_peer("bob", now=0.0)
    t = 0.0
    for round_ in range(20):
        probes = [tick(live, t + I * i)[0][1] for i in range(3)]  # two lost, the third answered
        live.receive_ack("bob", ack_for(probes[2]), t + 2.5 * I)
        t += 3 * I
        assert live.state("bob") is LivenessState.UP, round_
    assert drain(live) == [LinkUp("bob", 2.5 * I)]


def test_never_answered_goes_down_from_unknown() -> None:
    live = Liveness("alice", interval_s=I, miss_limit=2)
    live.add_peer("bob", now=0.0)
    tick(live, 0.0)
    tick(live, I)
    assert live.state("bob") is LivenessState.UNKNOWN
    tick(live, 2 * I)
    assert drain(live) == [LinkDown("bob", 2 * I)]


def test_stale_forged_or_foreign_acks_are_ignored() -> None:
    live = Liveness("alice", interval_s=I, miss_limit=2)
    live.add_peer("bob", now=0.0)
    first = tick(live, 0.0)[0][1]
    for k in range(1, 6):
        tick(live, k * I)
    later = 5.5 * I
    assert not live.receive_ack("bob", ack_for(first), later)  # older than the last 2*miss_limit probes
    assert not live.receive_ack("bob", ProbeAck(node="bob", seq=10**9, sent_s=0.0), later)  # never sent
    assert not live.receive_ack("bob", ProbeAck(node="mallory", seq=first.seq, sent_s=0.0), later)
    assert not live.receive_ack("carol", ack_for(first, "carol"), later)  # not a peer
    assert live.state("bob") is LivenessState.DOWN


def test_cadence_after_a_stall_does_not_burst() -> None:
    live = Liveness("alice", interval_s=I)
    live.add_peer("bob", now=0.0)
    tick(live, 0.0)
    assert len(tick(live, 5.0)) == 1  # the process slept 5 s: one probe, not forty
    assert live.get_timer() == 5.0 + I


def test_remove_peer_stops_probing() -> None:
    live = Liveness("alice")
    live.add_peer("bob", now=0.0)
    live.remove_peer("bob")
    assert live.get_timer() is None and live.statistics("bob") is None


@pytest.mark.parametrize("kwargs", [{"interval_s": 0.0}, {"miss_limit": 0}])
def test_bad_parameters(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        Liveness("alice", **kwargs)  # type: ignore[arg-type]


def test_a_cut_link_goes_down_within_miss_limit_probes_and_up_on_the_first_ack_after_restore() -> None:
    # Liveness is not told about cuts: the cut datagram shaper (and the receiving side,
    # which drops a cut peer's datagrams) makes probes go unanswered, as on a real cut.
    alice, bob = Liveness("alice", interval_s=I, miss_limit=3), Liveness("bob", interval_s=I, miss_limit=3)
    alice.add_peer("bob", now=0.0)
    to_bob = DatagramShaper(ShaperConfig(), np.random.default_rng(0))

    def step(now: float) -> None:
        for _, probe in tick(alice, now):
            if to_bob.push(probe, now):
                for delivered in to_bob.pop_ready(now):
                    alice.receive_ack("bob", bob.receive_probe(delivered), now)  # type: ignore[arg-type]

    step(0.0)
    assert drain(alice) == [LinkUp("bob", 0.0)]
    to_bob.set_cut(True)
    for k in range(1, 5):
        step(k * I)
    # Probes at I, 2I, 3I are lost; at the 4I tick three are outstanding -> down.
    assert drain(alice) == [LinkDown("bob", 4 * I)]
    assert to_bob.statistics().cut_dropped == 4
    to_bob.set_cut(False)
    step(5 * I)
    assert drain(alice) == [LinkUp("bob", 5 * I)]
