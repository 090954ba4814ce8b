"""The `qkd` app (nodes/apps/qkd.py): both ends of a QKD link run through the real broker
core (emulator.testing.InMemoryBroker, its optical layer included) and app_msg bodies
over in-memory links (nodes.testing.AppNetwork), with no sockets.

Link: the GYS parameters of Ma, Qi, Zhao & Lo, PRA 72, 012326 (2005) (the optics
defaults: alpha 0.21 dB/km, eta_Bob 4.5 %, Y0 1.7e-6, e_d 3.3 %, mu 0.48 / 0.05 / 0) at
1 GHz with class probabilities (0.5, 0.25, 0.25) (see tests/unit/test_qkd_session.py for
why), blocks of 10^6 signal key-basis bits. Seeds are fixed.
"""

from __future__ import annotations

import numpy as np
import pytest

from emulator.broker.config import BrokerConfig, LinkConfig, MemoryConfig, qkd_config_from_mapping
from emulator.testing import InMemoryBroker
from emulator.wire import AppMsg, Ok, QkdEve, RemoteProtocolError, decode, encode
from nodes.testing import AppNetwork

SEED = 11


def network(length_km: float = 25.0, *, link_options: dict | None = None) -> tuple[InMemoryBroker, AppNetwork]:
    qkd = qkd_config_from_mapping(
        {"pulse_rate_hz": 1e9, "class_probabilities": [0.5, 0.25, 0.25], "attenuation_db_per_km": 0.21},
        endpoints=("alice", "bob"), length_km=length_km, attenuation_db_per_km=0.21,
    )  # fmt: skip
    mem = MemoryConfig(qubits=2)
    config = BrokerConfig.build(
        {"alice": mem, "bob": mem}, [LinkConfig(("alice", "bob"), length_km, 0.21, qkd=qkd)], seed=SEED
    )
    broker = InMemoryBroker(config)
    net = AppNetwork(broker, ["alice", "bob"], rng=np.random.default_rng(SEED), link_options=link_options,
                     step_s=0.01)  # fmt: skip
    return broker, net


def run(net: AppNetwork, params: dict, *, max_t_s: float = 30.0) -> tuple[dict, dict]:
    net.start_app("bob", "qkd", "qkd", {"role": "responder", "peer": "alice"})
    net.start_app("alice", "qkd", "qkd", {"role": "initiator", "peer": "bob", **params})
    alice, bob = net.host("alice"), net.host("bob")

    def finished() -> bool:
        return alice.app("qkd").finished and bob.app("qkd").finished  # type: ignore[union-attr]

    net.run_until(finished, max_t_s=max_t_s)
    return alice.status("qkd").results, bob.status("qkd").results


def test_a_link_run_fills_both_pools_with_the_same_key() -> None:
    broker, net = network()
    a, b = run(net, {"duration_s": 1.5})
    assert net.host("alice").status("qkd").state == "done", a
    assert net.host("bob").status("qkd").state == "done", b
    assert a["blocks_done"] >= 1 and a["final_key_bits"] > 10_000
    assert a["final_key_bits"] == b["final_key_bits"]
    assert a["pool_match"] is True and b["pool_match"] is True
    pa, pb = net.key_pools["alice"].pool("bob"), net.key_pools["bob"].pool("alice")
    assert pa.digest() == pb.digest() and pa.bits_added == pb.bits_added > 0
    # ~1.5 s of emission at 1 GHz; the rate is per emulated second of emission.
    assert a["running_s"] == pytest.approx(1.5, abs=0.05)
    assert a["secret_key_rate_bps"] == pytest.approx(a["final_key_bits"] / a["running_s"])
    assert 0.02 < a["qber"] < 0.05  # e_d 3.3 % plus dark counts
    assert a["auth_rejects"] == b["auth_rejects"] == 0


def test_every_registered_qkd_metric_is_a_number_the_app_reports() -> None:
    """Expectations name metrics from the scenario registry; the app must report each one
    (a number, so that min/max can test it) under exactly that name."""
    from emulator.scenario import METRICS

    _, net = network()
    a, _ = run(net, {"duration_s": 1.5})
    names = {name for name, spec in METRICS.items() if "qkd" in spec.app_kinds}
    assert names and names <= set(a)
    for name in names:
        assert isinstance(a[name], int | float) and not isinstance(a[name], bool), name
    assert a["net_key_bits"] == a["final_key_bits"]  # one block at 25 km needs no refill yet


def test_intercept_resend_raises_the_alarm_and_no_key_enters_the_pools() -> None:
    """Eve intercepts and resends every pulse from the start: QBER ~ 1/4 + e_d/2 ~ 26 %
    (Ma et al.'s model; tests/unit/test_optics.py checks f/4 exactly), far above the
    11 % threshold, so every block aborts with an alarm and nothing enters the pools."""
    broker, net = network()
    admin = broker.connect_admin()
    assert admin.call(QkdEve(endpoints=["alice", "bob"], intercept_fraction=1.0)).message == Ok()
    a, b = run(net, {"duration_s": 1.5})
    assert a["blocks_aborted"] >= 1 and a["blocks_done"] == 0 and a["alarms"] >= 1
    assert a["last_alarm"] is not None and b["alarms"] == a["alarms"]
    assert a["qber"] == pytest.approx(0.25 + 0.033 / 2, abs=0.01)  # ~5e5 sample bits: sigma ~ 6e-4
    assert a["final_key_bits"] == b["final_key_bits"] == 0
    assert net.key_pools["alice"].pool("bob").bits_added == net.key_pools["bob"].pool("alice").bits_added == 0
    assert a["pool_match"] is True  # both empty


def test_a_key_bits_target_stops_the_link_once_reached() -> None:
    _, net = network()
    a, b = run(net, {"key_bits": 50_000, "duration_s": 100.0})
    assert a["final_key_bits"] >= 50_000 and a["stopped"] == "stopped"
    assert a["running_s"] < 3.0  # one block (~1.3 s at 25 km) is enough
    assert a["pool_match"] is True


class Forger:
    """Wraps alice -> bob app_msg bodies on the in-memory link: a bad tag, a replay and
    garbage are delivered ahead of a few genuine envelopes."""

    def __init__(self, channel) -> None:  # type: ignore[no-untyped-def]
        self.channel = channel
        self.send = channel.send
        self.seen: list[bytes] = []
        channel.send = self.intercept

    def intercept(self, item, now):  # type: ignore[no-untyped-def]
        msg = decode(item).message
        body = dict(msg.body)
        if body.get("op") == "pp":
            n = len(self.seen)
            self.seen.append(item)
            if n == 3:  # flip one tag bit
                forged = AppMsg(app=msg.app, body={**body, "tag": bytes([body["tag"][0] ^ 1]) + body["tag"][1:]})
                self.send(encode(forged), now)
            elif n == 5:  # replay the first envelope
                self.send(self.seen[0], now)
            elif n == 7:  # not a post-processing payload at all
                self.send(encode(AppMsg(app=msg.app, body={**body, "msg": b"\xff\x00junk"})), now)
        self.send(item, now)


def test_forged_replayed_and_garbage_envelopes_are_rejected_and_the_session_recovers() -> None:
    _, net = network()
    Forger(net.link("alice", "bob").channel("alice", "bob"))
    a, b = run(net, {"duration_s": 1.5})
    # The forged tag and the garbage fail authentication; the replay is recognised by its
    # old sequence number before it costs any key (as a retransmission would be).
    assert b["auth_rejects"] == 2 and b["replayed"] == 1 and a["auth_rejects"] == 0
    assert a["blocks_done"] >= 1 and a["final_key_bits"] == b["final_key_bits"] > 0
    assert a["pool_match"] is True


def test_a_receiver_that_cannot_keep_up_drops_whole_windows_and_counts_them() -> None:
    """Windows reach Bob up to one step (10 ms) after their range ended; with a lag bound
    of 1 ms most are dropped unannounced. The pulses of dropped windows are left out of
    the estimation, so what is kept is still estimated correctly (QBER as usual)."""
    net_pair = network()
    net = net_pair[1]
    net.start_app("bob", "qkd", "qkd", {"role": "responder", "peer": "alice", "max_lag_s": 0.001})
    net.start_app("alice", "qkd", "qkd", {"role": "initiator", "peer": "bob", "duration_s": 1.0})
    alice, bob = net.host("alice"), net.host("bob")
    net.run_until(lambda: alice.app("qkd").finished and bob.app("qkd").finished, max_t_s=30)  # type: ignore[union-attr]
    b = bob.status("qkd").results
    assert b["detections_dropped"] > 0 and b["pulses_dropped"] > 0
    assert b["pulses"] + b["pulses_dropped"] == pytest.approx(1e9, rel=1e-6)
    assert b["detections"] + b["detections_dropped"] > 3e6


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"role": "initiator", "peer": "bob"}, "duration_s"),  # neither duration nor key_bits
        ({"role": "responder", "peer": "bob", "duration_s": 1.0}, "role"),  # alice transmits
        ({"role": "initiator", "peer": "carol", "duration_s": 1.0}, "peer"),
        ({"role": "initiator", "peer": "bob", "duration_s": 1.0, "cascade": "fast"}, "cascade"),
        ({"role": "initiator", "peer": "bob", "duration_s": 1.0, "block_key_bits": 10}, "block_key_bits"),
        ({"role": "initiator", "peer": "bob", "duration_s": 1.0, "colour": 1}, "colour"),
    ],
)
def test_bad_parameters_are_refused_naming_the_parameter(params: dict, field: str) -> None:
    _, net = network()
    with pytest.raises(RemoteProtocolError, match=f"params.{field}"):
        net.host("alice").start_app("qkd", "qkd", params, 0.0)


def test_messages_lost_or_duplicated_on_the_classical_link_are_recovered() -> None:
    """A link that drops 3 % and duplicates 2 % of app messages (as a broken and re-made
    connection, or a cut link, would lose and repeat some): the unacknowledged envelopes
    are sent again, duplicates are dropped by sequence number, control messages are
    repeated until answered, and both pools still end identical."""
    _, net = network(link_options={"drop": 0.03, "duplicate": 0.02, "ordered": True, "delay_s": 1e-4})
    a, b = run(net, {"duration_s": 1.5, "retry_s": 0.05}, max_t_s=60.0)
    assert net.host("alice").status("qkd").state == "done"
    assert a["retransmitted"] + b["retransmitted"] > 0 and a["replayed"] + b["replayed"] > 0
    assert a["blocks_done"] >= 1 and a["final_key_bits"] == b["final_key_bits"] > 0
    assert a["pool_match"] is True and b["pool_match"] is True
    assert a["auth_rejects"] == b["auth_rejects"] == 0  # losses are not forgeries


def test_no_key_bytes_in_results_reprs_or_messages() -> None:
    """Secrets stay secret: no 8-byte run of the final key (nor of the pre-shared
    authentication key) appears in either end's results, repr or status, nor in any
    app_msg body sent on the link (the salted pool check included)."""
    import json

    _, net = network()
    sent: list[bytes] = []
    for direction in (("alice", "bob"), ("bob", "alice")):
        channel = net.link("alice", "bob").channel(*direction)
        original = channel.send

        def spy(item, now, _original=original):  # type: ignore[no-untyped-def]
            sent.append(bytes(item))
            _original(item, now)

        channel.send = spy  # type: ignore[method-assign]
    a, b = run(net, {"duration_s": 1.5})
    pool = net.key_pools["alice"].pool("bob")
    key = np.packbits(pool._bits, bitorder="little").tobytes()  # noqa: SLF001 - test seam: the key itself
    assert len(key) > 1000
    auth = net.host("alice").app("qkd").info.auth_key  # type: ignore[union-attr]
    outputs = [
        json.dumps(a, default=str).encode(), json.dumps(b, default=str).encode(),
        repr(net.host("alice").app("qkd")).encode(), repr(net.host("bob").app("qkd")).encode(),
        repr(net.host("alice").status("qkd")).encode(), *sent,
    ]  # fmt: skip
    # Any copy of >= 15 secret bytes holds one of the secret's 8-byte-aligned words, so
    # it suffices to look for those words at every offset of every output. Secrets are
    # searched raw and as hex text.
    for secret in (key, auth, key.hex().encode(), auth.hex().encode()):
        words = np.frombuffer(secret[: len(secret) // 8 * 8], dtype="<u8")
        for out in outputs:
            for phase in range(8):
                chunk = out[phase : phase + (len(out) - phase) // 8 * 8]
                assert not np.isin(np.frombuffer(chunk, dtype="<u8"), words).any()
