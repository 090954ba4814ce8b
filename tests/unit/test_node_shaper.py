"""Link shaper (nodes/transport/shaper.py) and the in-memory lossy links (nodes/testing.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from emulator.physics import FIBRE_DELAY_S_PER_KM
from emulator.wire import LinkInfo
from nodes.testing import LossyChannel
from nodes.transport.shaper import DatagramShaper, ShaperConfig, StreamShaper, shaper_rng


def link(length_km: float = 10.0, jitter_s: float = 0.0, udp_loss: float = 0.0) -> LinkInfo:
    return LinkInfo(
        peer="bob", length_km=length_km, attenuation_db_per_km=0.2, jitter_s=jitter_s, udp_loss=udp_loss, entanglement=True
    )


def test_config_from_link_uses_the_fibre_delay() -> None:
    config = ShaperConfig.from_link(link(10.0, jitter_s=1e-4, udp_loss=0.25), time_scale=2.0)
    assert config.delay_s == pytest.approx(10.0 * 4.9e-6)
    assert config.delay_s == pytest.approx(10.0 * FIBRE_DELAY_S_PER_KM)
    assert (config.jitter_s, config.loss, config.time_scale) == (1e-4, 0.25, 2.0)


@pytest.mark.parametrize("bad", [{"delay_s": -1.0}, {"jitter_s": math.nan}, {"loss": 1.5}, {"time_scale": 0.0}])
def test_config_rejects_nonsense(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        ShaperConfig(**bad)


def test_stream_delay_is_scaled_by_time_scale() -> None:
    s = StreamShaper(ShaperConfig(delay_s=1e-3, time_scale=10.0), np.random.default_rng(0))
    release = s.push(b"abc", now=5.0)
    assert release == pytest.approx(5.0 + 1e-3 * 10.0)  # 1 ms emulated lasts 10 ms wall
    assert s.pop_ready(5.0099) == b""
    assert s.next_release() == pytest.approx(5.01)
    assert s.pop_ready(5.0101) == b"abc"
    assert s.next_release() is None and s.pending_bytes == 0


def test_stream_jitter_never_reorders_and_stays_in_bounds() -> None:
    delay_s, jitter_s = 1e-3, 5e-3  # jitter larger than the spacing: would reorder if allowed
    s = StreamShaper(ShaperConfig(delay_s=delay_s, jitter_s=jitter_s), np.random.default_rng(42))
    sends = np.arange(2000) * 1e-4
    releases = np.array([s.push(i.to_bytes(4, "big"), t) for i, t in enumerate(sends)])
    assert np.all(np.diff(releases) >= 0.0)  # release_k = max(release_{k-1}, now + delay_k)
    assert np.all(releases >= sends + delay_s)
    # The max() only ever waits for an earlier message, itself bounded by its own jitter.
    assert np.all(releases <= sends + delay_s + jitter_s)
    out = s.pop_ready(math.inf)
    assert [int.from_bytes(out[i : i + 4], "big") for i in range(0, len(out), 4)] == list(range(2000))


def test_stream_jitter_is_uniform_in_zero_to_jitter() -> None:
    jitter_s = 1e-3
    s = StreamShaper(ShaperConfig(jitter_s=jitter_s), np.random.default_rng(7))
    # Sends 1 s apart never wait for each other, so each release is now + U(0, jitter).
    extra = np.array([s.push(b"x", float(t)) - t for t in range(20000)])
    assert extra.min() >= 0.0 and extra.max() <= jitter_s
    # Mean of U(0, J) is J/2 with std J/sqrt(12 n); 4 sigma at n = 20000 is 0.0082 J.
    assert abs(extra.mean() - jitter_s / 2) < 4 * jitter_s / math.sqrt(12 * 20000)


def test_datagram_loss_rate_and_seeded_determinism() -> None:
    n, loss = 20000, 0.3

    def run(seed: int) -> list[bool]:
        d = DatagramShaper(ShaperConfig(delay_s=1e-3, loss=loss), np.random.default_rng(seed))
        return [d.push(i, 0.0) for i in range(n)]

    kept = run(5)
    assert kept == run(5)  # same seed, same drops
    assert kept != run(6)
    dropped = n - sum(kept)
    # Binomial(n, 0.3): std sqrt(n p (1-p)) = 64.8; tolerance 4 sigma = 260.
    assert abs(dropped - n * loss) < 4 * math.sqrt(n * loss * (1 - loss))


def test_datagrams_are_delayed_and_released_in_time_order() -> None:
    d = DatagramShaper(ShaperConfig(delay_s=1e-3, jitter_s=1e-3), np.random.default_rng(1))
    for i in range(100):
        d.push(i, 0.0)
    assert d.pop_ready(0.000999) == []
    assert d.next_release() is not None and d.next_release() >= 1e-3  # type: ignore[operator]
    got = d.pop_ready(0.0015)
    rest = d.pop_ready(0.0021)
    assert sorted(got + rest) == list(range(100))
    assert got + rest != list(range(100))  # independent jitter lets datagrams overtake each other
    stats = d.statistics()
    assert (stats.queued, stats.dropped) == (100, 0)


def test_shaper_rng_is_stable_and_distinct_per_peer_and_purpose() -> None:
    a = shaper_rng(7, "bob", "tcp").random(4)
    assert np.array_equal(a, shaper_rng(7, "bob", "tcp").random(4))
    assert not np.array_equal(a, shaper_rng(7, "bob", "udp").random(4))
    assert not np.array_equal(a, shaper_rng(7, "carol", "tcp").random(4))
    assert not np.array_equal(a, shaper_rng(8, "bob", "tcp").random(4))


def test_lossy_channel_drop_duplicate_delay() -> None:
    n = 20000
    ch = LossyChannel(np.random.default_rng(3), delay_s=0.5, jitter_s=0.1, drop=0.2, duplicate=0.1)
    for i in range(n):
        ch.send(i, now=0.0)
    assert ch.receive(0.4999) == []
    got = ch.receive(1.0)
    assert ch.next_delivery() is None
    # Binomial counts: 4 sigma tolerances (std sqrt(n p (1-p))).
    assert abs(ch.dropped - 0.2 * n) < 4 * math.sqrt(n * 0.2 * 0.8)
    kept = n - ch.dropped
    assert abs(ch.duplicated - 0.1 * kept) < 4 * math.sqrt(kept * 0.1 * 0.9)
    assert len(got) == kept + ch.duplicated
    assert len(set(got)) == kept


def test_lossy_channel_ordered_mode_preserves_order() -> None:
    ch = LossyChannel(np.random.default_rng(4), delay_s=0.01, jitter_s=0.05, ordered=True)
    for i in range(1000):
        ch.send(i, now=i * 1e-3)
    assert ch.receive(10.0) == list(range(1000))


def test_a_cut_datagram_shaper_drops_everything_and_discards_its_queue() -> None:
    d = DatagramShaper(ShaperConfig(delay_s=1e-3), np.random.default_rng(1))
    assert d.push("in flight", 0.0) and not d.cut
    d.set_cut(True)
    assert d.cut and d.next_release() is None  # what was in flight is lost with the cut
    assert not d.push("during", 0.5)
    assert d.pop_ready(10.0) == []
    d.set_cut(True)  # cutting again changes nothing
    stats = d.statistics()
    assert (stats.queued, stats.dropped, stats.cut_dropped) == (1, 0, 2)
    d.set_cut(False)
    assert d.push("after", 1.0)
    assert d.pop_ready(1.001) == ["after"]


def test_a_cut_does_not_shift_the_seeded_loss_sequence() -> None:
    # A cut draws no random numbers, so after a restore the drops are those of the seed.
    def kept(cut_for: int) -> list[bool]:
        d = DatagramShaper(ShaperConfig(loss=0.5), np.random.default_rng(3))
        d.set_cut(True)
        for i in range(cut_for):
            d.push(i, 0.0)
        d.set_cut(False)
        return [d.push(i, 0.0) for i in range(200)]

    assert kept(0) == kept(50)
