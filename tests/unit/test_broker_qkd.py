"""The QKD optical layer through the broker core and the wire (emulator.testing.InMemoryBroker).

Alice (transmitter) and Bob (receiver) register; Bob consents with qkd_listen, Alice
starts with qkd_start; the fake clock drives the broker's slice timer. What Bob gets is
checked for coverage (no gap, no overlap), against OpticalLink run directly with the
same keys, and against the model (Q_k per class, the intercept-resend QBER rise), the
last two computed as Alice's node would: her choices from alice_key (optics_choices).

Statistical tests use fixed seeds; tolerances are 4 standard deviations of the binomial
counts involved (a false failure about once in 16000 runs per assertion, but the seeds
are fixed, so each run is the same).
"""

from __future__ import annotations

import dataclasses
import math
import types

import msgpack
import numpy as np
import pytest

from emulator.broker import (
    BrokerConfig,
    BrokerLimits,
    ConfigError,
    LinkConfig,
    MemoryConfig,
    qkd_config_from_mapping,
)
from emulator.broker.config import _config_from_scenario
from emulator.broker.optics import Eavesdropper, OpticalLink, link_keys
from emulator.kernels import ChoiceThresholds, get_backend
from emulator.testing import InMemoryBroker, InMemoryBrokerSession
from emulator.wire import (
    FibreCut,
    Error,
    GetStats,
    LinkInfo,
    LocalProtocolError,
    Ok,
    Ping,
    Pong,
    QkdDetections,
    QkdEmitted,
    QkdEve,
    QkdLinkInfo,
    QkdListen,
    QkdStart,
    QkdStop,
    QkdStopped,
    RemoteProtocolError,
    Stats,
    Welcome,
    decode,
    encode,
    encode_framed,
)

SEED = 4242
RATE_HZ = 1e7
Z4 = 4.0  # tolerance in standard deviations (module docstring)


def qkd_mapping(**overrides: object) -> dict[str, object]:
    raw: dict[str, object] = {"pulse_rate_hz": RATE_HZ}
    raw.update(overrides)
    return raw


def make_config(*, limits: BrokerLimits | None = None, qkd: dict[str, object] | None = None) -> BrokerConfig:
    """alice -> bob: QKD over 20 km; bob - carol: fibre without QKD; dave: no link."""
    qkd_cfg = qkd_config_from_mapping(qkd or qkd_mapping(), endpoints=("alice", "bob"), length_km=20.0)
    mem = MemoryConfig(qubits=2)
    return BrokerConfig.build(
        {"alice": mem, "bob": mem, "carol": mem, "dave": mem},
        [LinkConfig(("alice", "bob"), 20.0, qkd=qkd_cfg), LinkConfig(("bob", "carol"), 10.0)],
        seed=SEED,
        limits=limits or BrokerLimits(),
    )


@pytest.fixture(params=["numpy", "c"])
def backend_name(request: pytest.FixtureRequest) -> str:
    return request.param


def start(broker: InMemoryBroker) -> tuple[InMemoryBrokerSession, InMemoryBrokerSession]:
    alice, bob = broker.connect("alice"), broker.connect("bob")
    assert bob.call(QkdListen(peer="alice")).message == Ok()
    assert alice.call(QkdStart(peer="bob")).message == Ok()
    alice.events(), bob.events()
    return alice, bob


def collect(batches: list[QkdDetections]) -> dict[str, np.ndarray]:
    return {
        name: np.concatenate([getattr(b, name) for b in batches])
        for name in ("pulse", "basis", "outcome", "double_click")
    }


def assert_contiguous(batches: list[QkdDetections], first: int, end: int) -> None:
    assert batches and batches[0].first_pulse == first and batches[-1].end_pulse == end
    for prev, nxt in zip(batches, batches[1:], strict=False):
        assert nxt.first_pulse == prev.end_pulse  # no gap, no overlap
    for b in batches:
        assert b.peer == "alice"
        assert len(b.pulse) == len(b.basis) == len(b.outcome) == len(b.double_click)
        assert np.all((b.pulse >= b.first_pulse) & (b.pulse < b.end_pulse))
        assert np.all(np.diff(b.pulse.astype(np.int64)) > 0)


def alice_choices(welcome: Welcome, pulses: np.ndarray, backend_name: str = "numpy"):  # type: ignore[no-untyped-def]
    """What Alice's node computes: her choices for the given pulses, from her welcome only."""
    info = welcome.links[0].qkd
    assert info is not None and info.alice_key is not None
    key = int.from_bytes(info.alice_key, "little")
    th = ChoiceThresholds(info.threshold_signal, info.threshold_signal_or_decoy, info.threshold_basis_z)
    return get_backend(backend_name).optics_choices(key, pulses.astype(np.int64), th)


def error_code(env: object) -> str:
    msg = getattr(env, "message", env)
    assert isinstance(msg, Error), msg
    return msg.code


# ============================================================================ configuration


def test_qkd_mapping_defaults_and_errors() -> None:
    cfg = qkd_config_from_mapping(
        {"pulse_rate_hz": 1e8, "intensities": {"signal": 0.5, "decoy": 0.1, "vacuum": 0.0}, "transmitter": "b"},
        endpoints=("a", "b"),
        length_km=15.0,
        attenuation_db_per_km=0.18,
    )
    assert cfg.transmitter == "b" and cfg.optics.length_km == 15.0 and cfg.optics.attenuation_db_per_km == 0.18
    assert qkd_config_from_mapping({}, endpoints=("a", "b"), length_km=1.0).transmitter == "a"  # default
    bad = {
        "colour": {"colour": 1},
        "length_km": {"length_km": 3.0},
        "transmitter": {"transmitter": "c"},
        "pulse_rate_hz": {"pulse_rate_hz": "fast"},
        "intensities": {"intensities": [0.5, 0.1]},
        "class_probabilities": {"class_probabilities": [0.5, "x", 0.2]},
    }
    for field, raw in bad.items():
        with pytest.raises(ConfigError, match=field):
            qkd_config_from_mapping(raw, endpoints=("a", "b"), length_km=1.0)
    with pytest.raises(ConfigError, match="pulse_rate_hz"):
        qkd_config_from_mapping({"pulse_rate_hz": -1.0}, endpoints=("a", "b"), length_km=1.0)
    with pytest.raises(ConfigError, match="qkd_slice_s"):
        dataclasses.replace(make_config(), qkd_slice_s=0.0)


def test_from_scenario_reads_a_links_qkd_mapping() -> None:
    mem = types.SimpleNamespace(qubits=1, t1_s=math.inf, t2_s=math.inf, gate_fidelity=1.0)
    node = types.SimpleNamespace(memory=mem)
    classical = types.SimpleNamespace(jitter_s=0.0, udp_loss=0.0)

    def link(qkd: object) -> types.SimpleNamespace:
        return types.SimpleNamespace(
            endpoints=("a", "b"), length_km=5.0, attenuation_db_per_km=0.2, classical=classical,
            entanglement=None, qkd=qkd,
        )  # fmt: skip

    scenario = types.SimpleNamespace(
        nodes={"a": node, "b": node}, links=[link({"transmitter": "b", "pulse_rate_hz": 1e6})], seed=1, time_scale=1.0
    )
    cfg = _config_from_scenario(scenario, BrokerLimits())
    lc = cfg.links[0]
    assert lc.qkd is not None and lc.qkd.transmitter == "b" and lc.qkd_receiver == "a"
    assert lc.qkd.optics.pulse_rate_hz == 1e6 and lc.qkd.optics.length_km == 5.0
    scenario.links = [link(None)]
    assert _config_from_scenario(scenario, BrokerLimits()).links[0].qkd is None
    scenario.links = [link({"receiver_efficiency": 2.0})]
    with pytest.raises(ConfigError, match="receiver_efficiency"):
        _config_from_scenario(scenario, BrokerLimits())


# ============================================================================ welcome


def test_welcome_gives_only_the_transmitter_its_key() -> None:
    broker = InMemoryBroker(make_config())
    alice, bob, carol = broker.connect("alice"), broker.connect("bob"), broker.connect("carol")
    a_info, b_info = alice.welcome.links[0].qkd, bob.welcome.links[0].qkd
    assert a_info is not None and b_info is not None
    alice_key, channel_key = link_keys(SEED, "alice", "bob")
    assert a_info.alice_key == alice_key.to_bytes(8, "little")
    assert b_info.alice_key is None
    assert dataclasses.replace(a_info, alice_key=None) == b_info  # same public parameters
    # Both ends hold the same pre-shared authentication key, drawn for this run (not
    # from the public seed: another broker with the same configuration draws another).
    assert a_info.auth_key == b_info.auth_key and a_info.auth_key is not None and len(a_info.auth_key) >= 8192
    assert InMemoryBroker(make_config()).connect("bob").welcome.links[0].qkd.auth_key != b_info.auth_key
    assert "auth_key" not in repr(bob.welcome)
    assert (b_info.transmitter, b_info.receiver, b_info.pulse_rate_hz) == ("alice", "bob", RATE_HZ)
    th = make_config().links[0].qkd.optics.choice_thresholds()  # type: ignore[union-attr]
    assert (b_info.threshold_signal, b_info.threshold_signal_or_decoy, b_info.threshold_basis_z) == (
        th.signal, th.signal_or_decoy, th.basis_z,
    )  # fmt: skip
    # The channel key never travels: not in any welcome's bytes, nor the alice_key in bob's.
    for s, w in ((alice, alice.welcome), (bob, bob.welcome)):
        raw = encode(w)
        assert channel_key.to_bytes(8, "little") not in raw and channel_key.to_bytes(8, "big") not in raw
    assert alice_key.to_bytes(8, "little") not in encode(bob.welcome)
    assert "alice_key" not in repr(alice.welcome)  # secrets stay out of reprs (and so logs)
    # A link without QKD: no qkd key on the wire at all (older receivers keep working).
    (carol_link,) = carol.welcome.links
    assert carol_link.qkd is None
    assert b"qkd" not in encode(carol.welcome)


# ============================================================================ streaming


def test_detections_cover_exactly_the_pulses_sent_and_equal_the_optical_link(backend_name: str) -> None:
    broker = InMemoryBroker(make_config(), backend=get_backend(backend_name))
    alice, bob = start(broker)
    t_s = 0.25
    broker.advance_to(t_s)
    end = round(RATE_HZ * t_s)
    batches = bob.messages(QkdDetections)
    assert_contiguous(batches, 0, end)
    slice_pulses = round(broker.core.config.qkd_slice_s * RATE_HZ)
    assert len(batches) == end // slice_pulses and all(b.end_pulse - b.first_pulse == slice_pulses for b in batches)
    emitted = alice.messages(QkdEmitted)
    assert [m.end_pulse for m in emitted] == [b.end_pulse for b in batches]
    assert emitted[-1].now_s == pytest.approx(t_s)
    # Each range is stamped with the emulated time its last pulse left (start at t = 0).
    assert [b.now_s for b in batches] == pytest.approx([b.end_pulse / RATE_HZ for b in batches])
    got = collect(batches)
    assert len(got["pulse"]) > 1000
    # Determinism: the same keys run directly give the same detections.
    alice_key, channel_key = link_keys(SEED, "alice", "bob")
    direct = OpticalLink(
        make_config().links[0].qkd.optics,  # type: ignore[union-attr]
        alice_key=alice_key,
        channel_key=channel_key,
        backend=get_backend(backend_name),
    ).advance_to_pulse(end)
    assert direct.complete
    want = direct.for_receiver()
    for name in got:
        np.testing.assert_array_equal(got[name], getattr(want, name), err_msg=name)
    assert got["pulse"].dtype == np.uint64


def test_per_class_detection_counts_match_the_model() -> None:
    broker = InMemoryBroker(make_config())
    alice, bob = start(broker)
    t_s = 0.5
    broker.advance_to(t_s, batch=True)
    end = round(RATE_HZ * t_s)
    batches = bob.messages(QkdDetections)
    assert_contiguous(batches, 0, end)
    got = collect(batches)
    classes = alice_choices(alice.welcome, got["pulse"]).intensity_class
    detected = np.bincount(classes, minlength=3)
    sent = np.bincount(alice_choices(alice.welcome, np.arange(end)).intensity_class, minlength=3)
    optics = make_config().links[0].qkd.optics  # type: ignore[union-attr]
    eta = optics.channel_transmittance() * optics.receiver_efficiency
    d = optics.dark_count_probability / 2  # each of Bob's two detectors
    i = optics.intensities
    for k, mu in enumerate((i.signal, i.decoy, i.vacuum)):
        # Q_k = 1 - (1 - d)^2 exp(-eta mu_k) (emulator.kernels._optics; Ma et al. 2005 Sec. II)
        q = 1.0 - (1.0 - d) ** 2 * math.exp(-eta * mu)
        mean = sent[k] * q
        sigma = math.sqrt(sent[k] * q * (1.0 - q))
        assert abs(detected[k] - mean) <= Z4 * sigma + 1.0, (k, detected[k], mean, sigma)
    assert detected[0] > 10_000  # enough signal detections for the tolerance to mean something


def sifted_qber(welcome: Welcome, det: dict[str, np.ndarray]) -> tuple[float, int]:
    choices = alice_choices(welcome, det["pulse"])
    sifted = choices.basis == det["basis"]
    n = int(np.count_nonzero(sifted))
    errors = int(np.count_nonzero(choices.bit[sifted] != det["outcome"][sifted]))
    return errors / n, n


def test_intercept_resend_raises_the_sifted_qber_and_shows_in_stats(backend_name: str) -> None:
    broker = InMemoryBroker(make_config(), backend=get_backend(backend_name))
    alice, bob = start(broker)
    admin = broker.connect_admin()
    broker.advance_to(0.3455, batch=True)  # mid-slice: qkd_eve must flush up to now first
    f = 0.5
    assert admin.call(QkdEve(endpoints=["bob", "alice"], intercept_fraction=f)).message == Ok()
    switch = alice.messages(QkdEmitted)[-1].end_pulse
    assert switch == math.ceil(0.3455 * RATE_HZ)
    before = bob.messages(QkdDetections)
    assert_contiguous(before, 0, switch)
    broker.advance_to(0.69, batch=True)
    assert admin.call(QkdEve(endpoints=["alice", "bob"])).message == Ok()  # off again
    after = bob.messages(QkdDetections)
    end = after[-1].end_pulse
    assert_contiguous(after, switch, end)
    e0, n0 = sifted_qber(alice.welcome, collect(before))
    e1, n1 = sifted_qber(alice.welcome, collect(after))
    # Intercept-resend of a fraction f raises the sifted QBER by f (1/4 - E/2)
    # (emulator.kernels.Eavesdropper; Bennett et al. 1992 for f = 1, E = 0).
    expected = e0 + f * (0.25 - e0 / 2)
    sigma = math.sqrt(e1 * (1 - e1) / n1 + (1 - f / 2) ** 2 * e0 * (1 - e0) / n0)
    assert abs(e1 - expected) <= Z4 * sigma, (e0, e1, expected, sigma)
    assert e1 - e0 > 0.1
    # The broker applied the switch exactly at `switch`: OpticalLink run directly agrees.
    alice_key, channel_key = link_keys(SEED, "alice", "bob")
    direct = OpticalLink(
        make_config().links[0].qkd.optics,  # type: ignore[union-attr]
        alice_key=alice_key, channel_key=channel_key, backend=get_backend(backend_name),
    )  # fmt: skip
    direct.advance_to_pulse(switch)
    direct.set_eavesdropper(Eavesdropper(intercept_fraction=f))
    want = direct.advance_to_pulse(end).for_receiver()
    np.testing.assert_array_equal(collect(after)["pulse"], want.pulse)
    np.testing.assert_array_equal(collect(after)["outcome"], want.outcome)
    # Stats: Eve's counts (never bits or keys), consistent with f.
    reply = admin.call(GetStats()).message
    assert isinstance(reply, Stats)
    link = reply.stats["qkd"]["alice|bob"]
    assert link["pulses"] == end and link["detections"] == len(collect(before)["pulse"]) + len(collect(after)["pulse"])
    eve = link["eve"]
    n_after = len(collect(after)["pulse"])
    sd = math.sqrt(n_after * f * (1 - f))
    assert abs(eve["intercepted_detections"] - f * n_after) <= Z4 * sd
    half = eve["intercepted_detections"]
    assert abs(eve["basis_matched_detections"] - half / 2) <= Z4 * math.sqrt(half / 4)  # Eve's basis: a fair coin
    assert link["eavesdropper"]["intercept_fraction"] == 0.0  # switched off again
    flat = msgpack.packb(reply.stats)
    assert alice_key.to_bytes(8, "little") not in flat and channel_key.to_bytes(8, "little") not in flat


def test_stop_stops_and_a_restart_continues_the_numbering() -> None:
    broker = InMemoryBroker(make_config())
    alice, bob = start(broker)
    broker.advance_to(0.015)  # one whole slice, then half of the next
    assert alice.call(QkdStop(peer="bob")).message == Ok()
    stop_end = round(0.015 * RATE_HZ)
    received = bob.messages()
    batches = [m for m in received if isinstance(m, QkdDetections)]
    assert_contiguous(batches, 0, stop_end)
    assert isinstance(received[-1], QkdStopped)  # after the last detections of the window
    assert [m.end_pulse for m in alice.messages(QkdEmitted)] == [100_000, stop_end]
    stopped = received[-1]
    assert (stopped.transmitter, stopped.peer, stopped.end_pulse) == ("alice", "alice", stop_end)
    assert stopped.reason == "stopped"
    broker.advance_to(1.0)
    assert bob.events() == [] and alice.events() == []  # nothing while stopped
    assert alice.call(QkdStop(peer="bob")).message == Ok()  # stopping again: harmless, no event
    assert bob.events() == []
    assert alice.call(QkdStart(peer="bob")).message == Ok()
    assert alice.call(QkdStart(peer="bob")).message == Ok()  # idempotent while running
    broker.advance_to(1.02)
    batches = bob.messages(QkdDetections)
    assert_contiguous(batches, stop_end, stop_end + round(0.02 * RATE_HZ))  # no index reused


def test_batches_split_at_the_detection_limit() -> None:
    broker = InMemoryBroker(make_config(limits=BrokerLimits(max_qkd_detections_per_batch=50)))
    alice, bob = start(broker)
    broker.advance_to(0.05)
    batches = bob.messages(QkdDetections)
    assert_contiguous(batches, 0, round(0.05 * RATE_HZ))
    assert max(len(b.pulse) for b in batches) == 50
    assert len(batches) > 5  # ~800 detections per 10 ms slice, so each slice splits


def test_withdrawn_consent_and_departing_ends_stop_the_link() -> None:
    broker = InMemoryBroker(make_config())
    alice, bob = start(broker)
    broker.advance_to(0.01)
    assert bob.call(QkdListen(peer="alice", accept=False)).message == Ok()
    assert [m.reason for m in alice.messages(QkdStopped)] == ["withdrawn"]
    assert error_code(alice.call(QkdStart(peer="bob"))) == "refused"
    bob.call(QkdListen(peer="alice"), check=True)
    alice.call(QkdStart(peer="bob"), check=True)
    broker.advance_to(0.02)
    bob.close()
    (stopped,) = alice.messages(QkdStopped)
    assert stopped.reason == "peer_gone" and stopped.peer == "bob"
    bob = broker.connect("bob")  # consent is forgotten with the session
    assert error_code(alice.call(QkdStart(peer="bob"))) == "refused"
    bob.call(QkdListen(peer="alice"), check=True)
    alice.call(QkdStart(peer="bob"), check=True)
    bob.events()
    alice.close()
    assert [m.reason for m in bob.messages(QkdStopped)] == ["peer_gone"]


# ============================================================================ bad input


def test_refusals_and_malformed_requests_keep_the_session() -> None:
    broker = InMemoryBroker(make_config())
    alice, bob = broker.connect("alice"), broker.connect("bob")
    carol = broker.connect("carol")
    assert error_code(alice.call(QkdStart(peer="bob"))) == "refused"  # bob has not consented
    assert error_code(alice.call(QkdListen(peer="bob"))) == "refused"  # the transmitter does not listen
    bob.call(QkdListen(peer="alice"), check=True)
    assert error_code(bob.call(QkdStart(peer="alice"))) == "refused"  # the receiver does not emit
    assert error_code(bob.call(QkdStop(peer="alice"))) == "refused"
    refused = bob.call(QkdListen(peer="carol")).message
    assert isinstance(refused, Error) and refused.code == "refused" and "no QKD" in refused.message
    assert error_code(carol.call(QkdStart(peer="bob"))) == "refused"
    assert error_code(alice.call(QkdStart(peer="dave"))) == "no_link"
    assert error_code(alice.call(QkdStart(peer="zed"))) == "unknown_node"
    alice.events()
    for raw in (
        {"v": 1, "t": "qkd_start", "id": 50, "peer": 5},
        {"v": 1, "t": "qkd_listen", "id": 51, "peer": "alice", "accept": 1},
        {"v": 1, "t": "qkd_stop", "id": 52, "peer": "bob", "extra": True},
        {"v": 1, "t": "qkd_start", "id": 53},
    ):
        alice.send_raw(encode_framed_raw(raw))
        (env,) = alice.events()
        assert error_code(env) == "bad_field" and env.re == raw["id"]
    # Events and admin requests from a node are refused, not executed.
    assert error_code(alice.call(QkdEmitted(peer="bob", end_pulse=5, now_s=0.0))) == "unknown_type"
    assert error_code(alice.call(QkdEve(endpoints=["alice", "bob"], intercept_fraction=1.0))) == "not_registered"
    admin = broker.connect_admin()
    for msg, code in (
        (QkdEve(endpoints=["alice"]), "bad_field"),
        (QkdEve(endpoints=["alice", "bob", "carol"]), "bad_field"),
        (QkdEve(endpoints=["alice", "bob"], resend_photons=99), "bad_field"),
        (QkdEve(endpoints=["bob", "carol"], intercept_fraction=0.5), "refused"),
        (QkdEve(endpoints=["alice", "dave"], intercept_fraction=0.5), "no_link"),
        (QkdEve(endpoints=["alice", "zed"]), "unknown_node"),
        (QkdStart(peer="bob"), "not_registered"),
    ):
        assert error_code(admin.call(msg)) == code, msg
    bad_eve = {"v": 1, "t": "qkd_eve", "id": 60, "endpoints": ["alice", "bob"], "intercept_fraction": 1.5}
    admin.send_raw(encode_framed_raw(bad_eve))
    (env,) = admin.events()
    assert error_code(env) == "bad_field"
    for s in (alice, bob, carol, admin):
        assert not s.closed and isinstance(s.call(Ping()).message, Pong)
    # Still fully usable: the link runs after all that.
    alice.call(QkdStart(peer="bob"), check=True)
    broker.advance_to(0.01)
    assert bob.messages(QkdDetections)


def encode_framed_raw(raw: dict[str, object]) -> bytes:
    payload = msgpack.packb(raw, use_bin_type=True)
    return len(payload).to_bytes(4, "big") + payload


# ============================================================================ codec


def test_codec_round_trips_of_the_qkd_messages() -> None:
    det = QkdDetections(
        peer="alice", first_pulse=0, end_pulse=(1 << 53),
        pulse=np.array([0, (1 << 53) - 1, (1 << 64) - 1], dtype=np.uint64),
        basis=np.array([0, 1, 1], np.uint8), outcome=np.array([1, 0, 1], np.uint8),
        double_click=np.array([0, 0, 1], np.uint8), now_s=0.25,
    )  # fmt: skip
    back = decode(encode(det, id=3)).message
    assert isinstance(back, QkdDetections) and back.pulse.dtype == np.dtype("<u8")
    np.testing.assert_array_equal(back.pulse, det.pulse)
    # Python ints are packed as u64 without loss; negatives cannot be.
    ok = dataclasses.replace(det, pulse=[1, 2, 3])
    np.testing.assert_array_equal(decode(encode(ok)).message.pulse, [1, 2, 3])  # type: ignore[attr-defined]
    with pytest.raises(LocalProtocolError, match="pulse"):
        encode(dataclasses.replace(det, pulse=np.array([-1, 0, 1])))
    raw = msgpack.unpackb(encode(det), raw=False)
    raw["pulse"] = raw["pulse"][:-1]  # not a whole number of 8-byte items
    with pytest.raises(RemoteProtocolError, match="pulse"):
        decode(msgpack.packb(raw, use_bin_type=True))
    info = QkdLinkInfo(
        transmitter="alice", receiver="bob", pulse_rate_hz=1e9, mu_signal=0.48, mu_decoy=0.05, mu_vacuum=0.0,
        p_signal=0.8, p_decoy=0.1, p_vacuum=0.1, basis_z_probability=0.5, bob_basis_z_probability=0.5,
        threshold_signal=1, threshold_signal_or_decoy=2, threshold_basis_z=3, attenuation_db_per_km=0.2,
        receiver_efficiency=0.045, dark_count_probability=1.7e-6, misalignment_error=0.033, dead_time_s=0.0,
        alice_key=bytes(range(8)),
    )  # fmt: skip
    link = LinkInfo(peer="bob", length_km=1.0, attenuation_db_per_km=0.2, jitter_s=0.0, udp_loss=0.0,
                    entanglement=False, qkd=info)  # fmt: skip
    welcome = Welcome(version=1, node="alice", now_s=0.0, time_scale=1.0, seed=1, memory_qubits=0, links=[link])
    assert decode(encode(welcome)).message.links[0] == link  # type: ignore[attr-defined]
    for msg in (
        QkdListen(peer="alice", accept=False), QkdStart(peer="bob"), QkdStop(peer="bob"),
        QkdEmitted(peer="bob", end_pulse=7, now_s=0.5),
        QkdStopped(transmitter="alice", peer="bob", end_pulse=7, reason="stopped", now_s=0.5),
        QkdEve(endpoints=["alice", "bob"], intercept_fraction=0.25, resend_photons=1, pns=True,
               pns_multi_forward=0.5, pns_single_block=0.5),
    ):  # fmt: skip
        data = encode_framed(msg, id=9)
        again = decode(data[4:]).message
        assert type(again) is type(msg) and encode(again) == encode(msg)
    # qkd_listen's accept defaults to true when omitted.
    assert decode(msgpack.packb({"v": 1, "t": "qkd_listen", "id": 1, "peer": "a"})).message == QkdListen(peer="a")


def test_a_receiver_that_does_not_read_loses_whole_events_not_its_session() -> None:
    """While more than max_qkd_backlog_bytes wait unread for bob, the broker drops whole
    qkd_detections (docs/protocol.md §4.7): bob sees gaps between the ranges, the
    counts of what was dropped and what was sent add up to the optical link's, and
    bob's session stays open. A batch wake-up emits every slice of 0.25 s before the
    connection takes any byte, so with a 1-byte limit only the first event goes out."""
    limits = BrokerLimits(max_qkd_backlog_bytes=1)
    broker = InMemoryBroker(make_config(limits=limits))
    alice, bob = start(broker)
    broker.advance_to(0.25, batch=True)
    sent = bob.messages(QkdDetections)
    assert len(sent) == 1 and sent[0].first_pulse == 0
    broker.advance_to(0.5, batch=True)  # bob read everything in between: the first event goes out again
    sent += bob.messages(QkdDetections)
    slice_pulses = round(broker.core.config.qkd_slice_s * RATE_HZ)
    assert len(sent) == 2 and sent[1].first_pulse == sent[0].end_pulse + 24 * slice_pulses  # a gap, no overlap
    stats = broker.core.statistics().qkd_links[("alice", "bob")]
    assert stats["backlog_dropped_events"] == 2 * 24
    assert sum(b.end_pulse - b.first_pulse for b in sent) + stats["backlog_dropped_pulses"] == round(0.5 * RATE_HZ)
    assert sum(len(b.pulse) for b in sent) + stats["backlog_dropped_detections"] == stats["detections"]
    assert not bob.closed and alice.messages(QkdEmitted)  # alice still learns what was emitted


def test_a_cut_fibre_passes_dark_counts_only() -> None:
    """With the fibre cut (admin `fibre_cut`) Bob's detections fall from the link's gain to
    the dark-count probability Y0 = 1.7e-6 per pulse (Ma et al. 2005's model with eta = 0),
    exactly from the next pulse; after the splice the gain is back."""
    broker = InMemoryBroker(make_config())
    alice, bob = start(broker)
    admin = broker.connect_admin()
    broker.advance_to(0.1)
    assert admin.call(FibreCut(endpoints=["alice", "bob"])).message == Ok()
    cut_at = round(0.1 * RATE_HZ)
    broker.advance_to(0.6)
    assert admin.call(FibreCut(endpoints=["alice", "bob"], cut=False)).message == Ok()
    spliced_at = round(0.6 * RATE_HZ)
    broker.advance_to(0.7)
    got = collect(bob.messages(QkdDetections))
    pulses = got["pulse"].astype(np.int64)
    during = int(((pulses >= cut_at) & (pulses < spliced_at)).sum())
    before = int((pulses < cut_at).sum())
    after = int((pulses >= spliced_at).sum())
    # 5e6 pulses at Y0: mean 8.5 dark counts; 30 is > 7 sigma above (Poisson).
    assert during <= 30
    # The 0.1 s before and after: ~RATE * 0.1 * Q (Q ~ 3e-3 at 20 km), thousands each.
    assert before > 500 and after > 500 and abs(after - before) < 0.25 * before
