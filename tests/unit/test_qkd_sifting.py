"""Sifting of decoy-BB84 detections (nodes/qkd/sifting.py).

- A round trip over detections of the real optical sampler (emulator.kernels optics, GYS
  parameters of Ma, Qi, Zhao & Lo, PRA 72, 012326 (2005), at 10 km): sifted fraction
  p_Z^2 + p_X^2, identical positions at both ends, the key bits' error rate at Ma et
  al.'s E_mu, decoy/vacuum/test-basis bits disclosed and removed, the sample rate.
- Batching, gaps and automatic block closing do not change what is sifted.
- Bob's messages do not depend on his outcomes; secrets stay out of reprs.
- Malformed, replayed and out-of-order messages are rejected, counted, and the session
  carries on.

Statistical tolerances: with fixed seeds the outcomes are deterministic; every
comparison allows 4 binomial standard deviations (two-sided 6e-5 per assertion) of the
count it tests, as tests/unit/test_optics.py does.
"""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np
import pytest

from emulator.kernels import Basis, OpticsCursor, OpticsParameters, build_optics_model, get_backend
from emulator.physics import IntensityClass, expected_error_rate
from emulator.wire import LocalProtocolError, RemoteProtocolError
from nodes.qkd.sifting import (
    MAX_BATCH_DETECTIONS,
    BlockSifted,
    DetectionWindow,
    ParameterErrors,
    ParameterSample,
    Rejection,
    SiftAnnounce,
    SiftReply,
    SiftingAlice,
    SiftingBob,
    SiftingLocalError,
    SiftingPair,
    SiftingRemoteError,
    sample_mask,
    sample_threshold,
)

ALICE_KEY = 0x0123456789ABCDEF
CHANNEL_KEY = 0x0F1E2D3C4B5A6978
Z4 = 4.0  # tolerance in standard deviations (module docstring)

# GYS (Gobby, Yuan & Shields 2004) as used by Ma et al. 2005.
GYS_ALPHA_DB_PER_KM = 0.21
GYS_ETA_BOB = 0.045
GYS_Y0 = 1.7e-6
GYS_E_D = 0.033
GYS_MU = (0.48, 0.05, 0.0)
P_Z = 0.7  # both ends; deliberately not 1/2 so that the sifted fraction tests the formula


def gys(length_km: float, *, class_p=(0.5, 0.25, 0.25), p_z: float = P_Z, **kw) -> OpticsParameters:
    fields = dict(
        intensities=GYS_MU,
        class_probabilities=class_p,
        channel_transmittance=10.0 ** (-GYS_ALPHA_DB_PER_KM * length_km / 10.0),
        receiver_efficiency=GYS_ETA_BOB,
        dark_count_probability=GYS_Y0,
        misalignment_error=GYS_E_D,
        alice_basis_z_probability=p_z,
        bob_basis_z_probability=p_z,
    )
    fields.update(kw)
    return OpticsParameters(**fields)


def sample_windows(
    params: OpticsParameters, n_pulses: int, n_windows: int, *, backend=None, keys=(ALICE_KEY, CHANNEL_KEY)
):
    """Consecutive broker windows over [0, n_pulses): Bob's DetectionWindows and, for the
    test's eyes only, the full Detections (Alice's choices included)."""
    be = backend or get_backend()
    model = build_optics_model(params, alice_key=keys[0], channel_key=keys[1])
    cursor = OpticsCursor()
    windows, parts = [], []
    first = 0
    for w in range(1, n_windows + 1):
        end = n_pulses * w // n_windows
        det, cursor = be.optics_sample(model, cursor, end, 50_000_000)
        windows.append(DetectionWindow.from_detections(first, end, det))
        parts.append(det)
        first = end
    return windows, parts


def make_pair(params: OpticsParameters, *, backend=None, batch=1 << 14, sample_fraction=0.1, **alice_kw):
    be = backend or get_backend()
    alice = SiftingAlice(ALICE_KEY, params.choice_thresholds, be, sample_fraction=sample_fraction, **alice_kw)
    bob = SiftingBob(backend=be, batch_detections=batch)
    return SiftingPair(alice, bob)


@pytest.fixture(scope="module")
def metro10():
    """One block at 10 km: 10^8 pulses in 8 windows (~7e5 detections)."""
    params = gys(10)
    windows, parts = sample_windows(params, 100_000_000, 8)
    pair = make_pair(params)
    for w in windows:
        pair.bob.add_detections(w)
    pair.bob.flush()
    pair.exchange()
    pending = {
        (c, b): (pair.alice.pending_sifted(c, b), pair.bob.pending_sifted(c, b)) for c in range(3) for b in range(2)
    }
    pair.alice.close_block()
    pair.exchange()
    a, b = pair.alice.next_block(), pair.bob.next_block()
    return dict(params=params, windows=windows, parts=parts, pair=pair, pending=pending, alice=a, bob=b)


# --------------------------------------------------------------------- the round trip


def test_sifted_fraction_is_pz2_plus_px2(metro10):
    params, counts = metro10["params"], metro10["alice"].counts
    pz_a = params.choice_thresholds.basis_z_probability
    pz_b = round(params.bob_basis_z_probability * 2**31) / 2**31
    match = pz_a * pz_b + (1 - pz_a) * (1 - pz_b)  # = p_Z^2 + p_X^2 = 0.58
    n = counts.total_detections
    assert n > 500_000
    # Sifted ~ Binomial(detections, match): Bob's basis is independent of Alice's.
    assert abs(counts.total_sifted - n * match) <= Z4 * math.sqrt(n * match * (1 - match))
    assert abs(counts.total_sifted / n - 0.58) < 0.005


def test_both_ends_hold_the_same_positions_and_counts(metro10):
    for (c, b), (pa, pb) in metro10["pending"].items():
        np.testing.assert_array_equal(pa, pb, err_msg=f"class {c} basis {b}")
    a, b = metro10["alice"], metro10["bob"]
    assert a.counts == b.counts
    np.testing.assert_array_equal(a.key_pulses, b.key_pulses)
    assert len(a) == len(b) == a.counts.key_bits > 0
    # The positions are those where Alice's and Bob's bases truly agree (test-side truth).
    det = metro10["parts"]
    pulses = np.concatenate([d.pulse for d in det])
    agree = np.concatenate([d.alice_basis == d.bob_basis for d in det])
    sifted_all = np.sort(np.concatenate([pa for pa, _ in metro10["pending"].values()]))
    np.testing.assert_array_equal(sifted_all, pulses[agree])
    # Pulses covered: every window's span, counted identically at both ends.
    span = sum(w.end_pulse - w.first_pulse for w in metro10["windows"])
    sa, sb = metro10["pair"].alice.statistics(), metro10["pair"].bob.statistics()
    assert a.counts.pulses == sa.pulses == sb.pulses == span == 100_000_000
    assert sa.detections == sb.detections == a.counts.total_detections
    assert sa.detections_per_class == sb.detections_per_class == a.counts.detections
    assert sa.sifted == sb.sifted == a.counts.sifted
    assert sb.double_clicks == int(sum(int(d.double_click.sum()) for d in det)) > 0
    assert sa.double_clicks == 0  # Alice cannot know them


def test_key_bits_differ_at_ma_et_al_signal_qber(metro10):
    params, a, b = metro10["params"], metro10["alice"], metro10["bob"]
    e_mu = float(expected_error_rate(GYS_MU[0], params.transmittance, GYS_Y0, GYS_E_D))  # Ma et al. Sec. II
    n = len(a)
    errors = int((a.key_bits != b.key_bits).sum())
    assert abs(errors - n * e_mu) <= Z4 * math.sqrt(n * e_mu * (1 - e_mu)), (errors / n, e_mu)
    # The error rates Bob counted on the disclosed bits agree with the same model.
    c = a.counts
    for k in (IntensityClass.SIGNAL, IntensityClass.DECOY):
        e_k = float(expected_error_rate(GYS_MU[k], params.transmittance, GYS_Y0, GYS_E_D))
        m, d = sum(c.errors[k]), sum(c.disclosed[k])
        assert abs(m - d * e_k) <= Z4 * math.sqrt(d * e_k * (1 - e_k)), (k, m / d, e_k)
    # Vacuum clicks are dark counts: random bits (e0 = 1/2).
    m0, d0 = sum(c.errors[2]), sum(c.disclosed[2])
    assert d0 > 0 and abs(m0 - d0 / 2) <= Z4 * math.sqrt(d0) / 2


def test_decoy_vacuum_and_test_basis_bits_are_disclosed_and_removed(metro10):
    a = metro10["alice"]
    c = a.counts
    key_basis, test_basis = int(c.key_basis), c.test_basis
    assert key_basis == Basis.Z
    for k in (IntensityClass.DECOY, IntensityClass.VACUUM):
        assert c.disclosed[k] == c.sifted[k]  # every decoy and vacuum bit, both bases
    assert c.disclosed[0][test_basis] == c.sifted[0][test_basis]  # the whole signal test basis
    sig = c.sifted[0][key_basis]
    sampled = c.disclosed[0][key_basis]
    assert sampled + c.key_bits == sig
    r = c.sample_fraction
    assert r == pytest.approx(0.1, abs=1e-15)
    assert abs(sampled - sig * r) <= Z4 * math.sqrt(sig * r * (1 - r))
    # The kept pulses are signal pulses in the key basis (Alice's choices, recomputed).
    ch = get_backend().optics_choices(ALICE_KEY, a.key_pulses, metro10["params"].choice_thresholds)
    assert (ch.intensity_class == IntensityClass.SIGNAL).all()
    assert (ch.basis == key_basis).all()
    np.testing.assert_array_equal(ch.bit, a.key_bits)
    # Disclosed = removed: no decoy/vacuum/test-basis/sampled pulse is in the key.
    pend = metro10["pending"]
    disclosed = np.concatenate(
        [pend[(k, bb)][0] for k in (1, 2) for bb in (0, 1)] + [pend[(0, test_basis)][0]]
    )
    assert not np.isin(a.key_pulses, disclosed).any()
    assert a.counts.total_disclosed == metro10["pair"].alice.statistics().disclosed_bits


def test_the_sample_is_the_documented_philox_mask():
    be = get_backend()
    t = sample_threshold(0.25)
    assert t == 2**51
    mask = sample_mask(1234, t, 100_000, be)
    draws = be.rng_u64(1234, 0x5346_5453_414D_504C, 0, 100_000)
    np.testing.assert_array_equal(mask, (draws >> np.uint64(11)) < np.uint64(t))
    assert abs(int(mask.sum()) - 25_000) <= Z4 * math.sqrt(100_000 * 0.25 * 0.75)
    np.testing.assert_array_equal(sample_mask(1234, t, 100_000, get_backend("numpy")), mask)
    assert sample_mask(1, 0, 10).sum() == 0 and sample_mask(1, 2**53, 10).all()
    with pytest.raises(SiftingLocalError):
        sample_threshold(1.5)


def test_events_and_statistics(metro10):
    pair = metro10["pair"]
    for end in (pair.alice, pair.bob):
        ev = end.next_event()
        assert isinstance(ev, BlockSifted) and ev.counts == metro10["alice"].counts
        assert end.next_event() is None and end.next_block() is None
        s = end.statistics()
        assert s.blocks == 1 and s.rejected_messages == 0 and s.key_bits == metro10["alice"].counts.key_bits
        assert s.sifted_total == metro10["alice"].counts.total_sifted


# ---------------------------------------------------------------- batching, gaps, blocks


def run_block(params, windows, **kw):
    return make_pair(params, **kw).run(windows)


def test_batch_size_and_backend_do_not_change_the_block():
    params = gys(25)
    windows, _ = sample_windows(params, 20_000_000, 3)
    a1, b1 = run_block(params, windows, batch=MAX_BATCH_DETECTIONS)
    a2, b2 = run_block(params, windows, batch=997)  # cuts fall inside windows
    a3, b3 = run_block(params, windows, backend=get_backend("numpy"))
    for a, b in ((a2, b2), (a3, b3)):
        assert a.counts == a1.counts and b.counts == b1.counts
        np.testing.assert_array_equal(a.key_pulses, a1.key_pulses)
        np.testing.assert_array_equal(a.key_bits, a1.key_bits)
        np.testing.assert_array_equal(b.key_bits, b1.key_bits)


def test_small_batches_tile_the_windows():
    params = gys(25)
    windows, _ = sample_windows(params, 5_000_000, 2)
    pair = make_pair(params, batch=100)
    announced = []
    for w in windows:
        pair.bob.add_detections(w)
        announced += pair.bob.messages_to_send()
    pair.bob.flush()
    announced += pair.bob.messages_to_send()
    assert all(isinstance(m, SiftAnnounce) for m in announced)
    assert [m.seq for m in announced] == list(range(len(announced)))
    assert all(m.count == 100 for m in announced[:-1]) and 0 < announced[-1].count <= 100
    assert announced[0].first_pulse == 0 and announced[-1].end_pulse == 5_000_000
    assert all(x.end_pulse == y.first_pulse for x, y in zip(announced, announced[1:]))
    assert sum(m.count for m in announced) == sum(len(w) for w in windows)


def test_a_gap_between_windows_is_not_counted_as_pulses():
    params = gys(25)
    windows, _ = sample_windows(params, 6_000_000, 3)
    kept = [windows[0], windows[2]]  # the broker never sent the middle window
    pair = make_pair(params)
    a, b = pair.run(kept)
    assert a.counts == b.counts
    assert a.counts.pulses == 4_000_000
    assert a.counts.total_detections == len(windows[0]) + len(windows[2])


def test_block_key_bits_closes_blocks_automatically():
    params = gys(10)
    windows, _ = sample_windows(params, 40_000_000, 20)
    pair = make_pair(params, batch=5_000, block_key_bits=20_000)
    for w in windows:
        pair.bob.add_detections(w)
        pair.exchange()
    blocks_a, blocks_b = [], []
    while (x := pair.alice.next_block()) is not None:
        blocks_a.append(x)
    while (x := pair.bob.next_block()) is not None:
        blocks_b.append(x)
    assert len(blocks_a) == len(blocks_b) >= 3
    assert [x.block_id for x in blocks_a] == list(range(len(blocks_a)))
    last = None
    for a, b in zip(blocks_a, blocks_b):
        assert a.counts == b.counts
        assert a.counts.sifted[0][0] >= 20_000  # closed once enough signal key-basis bits waited
        np.testing.assert_array_equal(a.key_pulses, b.key_pulses)
        if last is not None:
            assert a.key_pulses[0] > last  # blocks follow each other in pulse order
        last = a.key_pulses[-1]
    # Different blocks draw different samples (the seed depends on the block id).
    assert blocks_a[0].counts.disclosed != blocks_a[1].counts.disclosed


# ------------------------------------------------------------------------- secrecy


def test_bob_announces_nothing_about_his_outcomes():
    params = gys(25)
    windows, _ = sample_windows(params, 5_000_000, 2)
    flipped = [dataclasses.replace(w, outcome=1 - w.outcome) for w in windows]
    sent = []
    for ws in (windows, flipped):
        bob = SiftingBob(batch_detections=1000)
        for w in ws:
            bob.add_detections(w)
        bob.flush()
        sent.append(bob.messages_to_send())
    assert sent[0] == sent[1] and len(sent[0]) > 2


def test_secrets_stay_out_of_reprs(metro10):
    # Reprs show counts only: their whole text is pinned by a pattern.
    a, b = metro10["alice"], metro10["bob"]
    assert re.fullmatch(rf"<SiftedBlock alice block=0 pulses=100000000 key_bits={len(a)}>", repr(a))
    assert re.fullmatch(rf"<SiftedBlock bob block=0 pulses=100000000 key_bits={len(b)}>", repr(b))
    assert re.fullmatch(r"<DetectionWindow pulses \[0, 12500000\) detections=\d+>", repr(metro10["windows"][0]))
    assert re.fullmatch(r"<SiftingAlice batches=\d+ blocks=1>", repr(metro10["pair"].alice))
    assert re.fullmatch(r"<SiftingBob batches=\d+ blocks=1>", repr(metro10["pair"].bob))
    for stats in (metro10["pair"].alice.statistics(), metro10["pair"].bob.statistics()):
        assert all(not isinstance(v, np.ndarray) for v in dataclasses.astuple(stats))


# ------------------------------------------------------------------- bad input


def small_session(n_pulses=2_000_000, batch=500):
    params = gys(25)
    windows, _ = sample_windows(params, n_pulses, 2)
    pair = make_pair(params, batch=batch)
    return params, windows, pair


def expect_rejection(end, msg, reason: Rejection):
    before = end.statistics().rejected_messages
    with pytest.raises(SiftingRemoteError) as info:
        end.receive(msg)
    assert isinstance(info.value, RemoteProtocolError)
    assert info.value.reason is reason, str(info.value)
    assert end.statistics().rejected_messages == before + 1
    return info.value


def test_bad_sift_announcements_are_rejected_and_the_session_continues():
    params, windows, pair = small_session()
    alice, bob = pair.alice, pair.bob
    bob.add_detections(windows[0])
    bob.flush()
    announces = bob.messages_to_send()
    assert len(announces) >= 3
    first, second = announces[0], announces[1]
    expect_rejection(alice, second, Rejection.OUT_OF_ORDER)  # seq 1 before seq 0
    alice.receive(first)
    expect_rejection(alice, first, Rejection.REPLAYED)  # the same announcement again
    # A fresh seq over pulses already sifted is a replay too.
    expect_rejection(alice, dataclasses.replace(first, seq=1), Rejection.REPLAYED)
    # Malformed fields: lengths, order, ranges, types.
    expect_rejection(alice, dataclasses.replace(second, pulses=second.pulses[:-8]), Rejection.MALFORMED)
    expect_rejection(alice, dataclasses.replace(second, bases=second.bases + b"\0"), Rejection.MALFORMED)
    rev = np.frombuffer(second.pulses, dtype="<u8")[::-1].tobytes()
    expect_rejection(alice, dataclasses.replace(second, pulses=rev), Rejection.MALFORMED)
    expect_rejection(alice, dataclasses.replace(second, end_pulse=second.first_pulse), Rejection.MALFORMED)
    expect_rejection(alice, dataclasses.replace(second, count=MAX_BATCH_DETECTIONS + 1), Rejection.MALFORMED)
    expect_rejection(alice, dataclasses.replace(second, first_pulse="0"), Rejection.MALFORMED)
    expect_rejection(alice, dataclasses.replace(second, seq=True), Rejection.MALFORMED)
    expect_rejection(alice, SiftReply(0, 0, b"", b""), Rejection.UNEXPECTED)
    stats = alice.statistics()
    assert stats.rejected_messages == 11
    assert dict(stats.rejections) == {"malformed": 7, "out_of_order": 1, "replayed": 2, "unexpected": 1}
    # The rest goes through and the block is the same as an undisturbed session's.
    for msg in announces[1:]:
        alice.receive(msg)
    for msg in alice.messages_to_send():
        bob.receive(msg)
    bob.add_detections(windows[1])
    bob.flush()
    pair.exchange()
    alice.close_block()
    pair.exchange()
    a, b = alice.next_block(), bob.next_block()
    ref_a, ref_b = make_pair(params, batch=500).run(windows)
    assert a.counts == ref_a.counts == b.counts == ref_b.counts
    np.testing.assert_array_equal(a.key_bits, ref_a.key_bits)
    np.testing.assert_array_equal(b.key_bits, ref_b.key_bits)


def test_bad_replies_are_rejected_at_bob():
    params, windows, pair = small_session()
    alice, bob = pair.alice, pair.bob
    bob.add_detections(windows[0])
    bob.flush()
    for msg in bob.messages_to_send():
        alice.receive(msg)
    replies = alice.messages_to_send()
    r0, r1 = replies[0], replies[1]
    expect_rejection(bob, r1, Rejection.OUT_OF_ORDER)
    expect_rejection(bob, dataclasses.replace(r0, count=r0.count - 1), Rejection.MALFORMED)
    bad_classes = bytes([3]) + r0.classes[1:]
    expect_rejection(bob, dataclasses.replace(r0, classes=bad_classes), Rejection.MALFORMED)
    expect_rejection(bob, dataclasses.replace(r0, matched=r0.matched[:-1]), Rejection.MALFORMED)
    bob.receive(r0)
    expect_rejection(bob, r0, Rejection.REPLAYED)
    expect_rejection(bob, SiftAnnounce(0, 0, 0, 0, b"", b""), Rejection.UNEXPECTED)
    for msg in replies[1:]:
        bob.receive(msg)
    assert bob.statistics().rejected_messages == 6
    assert bob.statistics().batches == len(replies)


def test_bad_parameter_messages_are_rejected_and_the_block_completes():
    params, windows, pair = small_session()
    alice, bob = pair.alice, pair.bob
    for w in windows:
        bob.add_detections(w)
    bob.flush()
    pair.exchange()
    alice.close_block()
    (sample,) = alice.messages_to_send()
    assert isinstance(sample, ParameterSample)
    expect_rejection(bob, dataclasses.replace(sample, block_id=1), Rejection.OUT_OF_ORDER)
    expect_rejection(bob, dataclasses.replace(sample, through_seq=sample.through_seq + 1), Rejection.OUT_OF_ORDER)
    expect_rejection(bob, dataclasses.replace(sample, count=sample.count - 1), Rejection.MALFORMED)
    expect_rejection(bob, dataclasses.replace(sample, key_basis=2), Rejection.MALFORMED)
    expect_rejection(bob, dataclasses.replace(sample, sample_threshold=2**53 + 1), Rejection.MALFORMED)
    bob.receive(sample)
    expect_rejection(bob, sample, Rejection.REPLAYED)
    (errors,) = bob.messages_to_send()
    assert isinstance(errors, ParameterErrors)
    expect_rejection(alice, dataclasses.replace(errors, block_id=1), Rejection.OUT_OF_ORDER)
    too_many = np.full(6, 2**40, dtype="<u8").tobytes()
    expect_rejection(alice, dataclasses.replace(errors, errors=too_many), Rejection.MALFORMED)
    expect_rejection(alice, dataclasses.replace(errors, errors=errors.errors[:-1]), Rejection.MALFORMED)
    alice.receive(errors)
    expect_rejection(alice, errors, Rejection.REPLAYED)
    a, b = alice.next_block(), bob.next_block()
    assert a.counts == b.counts and a.block_id == 0
    np.testing.assert_array_equal(a.key_pulses, b.key_pulses)
    assert alice.statistics().rejected_messages == 4 and bob.statistics().rejected_messages == 6


def test_local_misuse_is_a_local_error():
    params, windows, pair = small_session()
    w = windows[0]
    with pytest.raises(SiftingLocalError):
        DetectionWindow(0, 10, np.array([3, 2]), np.zeros(2), np.zeros(2), np.zeros(2))
    with pytest.raises(SiftingLocalError):
        DetectionWindow(0, 10, np.array([3, 12]), np.zeros(2), np.zeros(2), np.zeros(2))
    with pytest.raises(SiftingLocalError):
        DetectionWindow(0, 10, np.array([3, 5]), np.array([0, 2]), np.zeros(2), np.zeros(2))
    with pytest.raises(SiftingLocalError):
        DetectionWindow(5, 4, np.zeros(0, dtype=np.uint64), np.zeros(0), np.zeros(0), np.zeros(0))
    pair.bob.add_detections(w)
    with pytest.raises(SiftingLocalError):
        pair.bob.add_detections(w)  # overlaps the previous window
    with pytest.raises(SiftingLocalError):
        pair.alice.close_block()  # nothing answered yet
    with pytest.raises(SiftingLocalError):
        SiftingAlice(-1, params.choice_thresholds)
    with pytest.raises(SiftingLocalError):
        SiftingAlice(ALICE_KEY, params.choice_thresholds, key_basis=2)
    with pytest.raises(SiftingLocalError):
        SiftingBob(batch_detections=MAX_BATCH_DETECTIONS + 1)
    assert issubclass(SiftingLocalError, LocalProtocolError)
