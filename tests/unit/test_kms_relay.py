"""Key relay between KMEs: OTP + one-time MAC per hop, confirmation, rerouting, forgery (nodes/kms/_relay.py)."""

from __future__ import annotations

import msgpack
import pytest

from nodes.kms import _relay
from nodes.kms.kme import PairPolicy, RelayFailed, RequestDone, RouteChanged
from nodes.kms.store import KeyState
from nodes.kms.testing import KmeNetwork

WAIT = PairPolicy("qkd", "wait", 20.0)


def stock(net: KmeNetwork, node: str, peer: str) -> int:
    return dict(net.kme(node).statistics().stock)[peer]


def assert_counts_agree(net: KmeNetwork) -> None:
    """Every READY/ASSIGNED count of (peer, owner) is the same at both ends; nothing PENDING."""
    for a in net.nodes:
        for b in net.nodes:
            if a == b:
                continue
            for owner in (a, b):
                for state in (KeyState.READY, KeyState.ASSIGNED):
                    assert net.count(a, b, owner, state) == net.count(b, a, owner, state), (a, b, owner, state)
            assert net.count(a, b, a, KeyState.PENDING) == 0


# --- the cryptography ---------------------------------------------------------------------


def test_seal_open_roundtrip_and_every_byte_is_authenticated() -> None:
    payload = bytes(range(48))
    material = bytes((7 * i + 3) % 256 for i in range(48 + _relay.MAC_KEY_BYTES))
    aad = _relay.auth_data(_relay.RELAY_LABEL, "a", "b", "id", 5)
    ct, tag = _relay.seal_otp(payload, material, aad)
    assert ct != payload and len(tag) == _relay.TAG_BYTES
    assert _relay.open_otp(ct, tag, material, aad) == payload
    for i in range(len(ct)):  # a flipped ciphertext bit is caught (OTP alone is malleable)
        bad = bytearray(ct)
        bad[i] ^= 1
        assert _relay.open_otp(bytes(bad), tag, material, aad) is None
    assert _relay.open_otp(ct, tag, material, _relay.auth_data(_relay.RELAY_LABEL, "a", "b", "id", 6)) is None
    assert _relay.open_otp(ct, bytes(16), material, aad) is None
    other = bytes(material[:-1]) + bytes([material[-1] ^ 1])
    assert _relay.open_otp(ct, tag, other, aad) is None


def test_auth_data_is_injective_on_field_boundaries() -> None:
    assert _relay.auth_data(b"L", "ab", "c") != _relay.auth_data(b"L", "a", "bc")
    assert _relay.auth_data(b"L", 1) != _relay.auth_data(b"L", "\x00" * 7 + "\x01")
    assert _relay.auth_data(b"L", None) != _relay.auth_data(b"L", "")


def test_derived_key_id_is_a_stable_uuid() -> None:
    base = "0f0e0d0c-0b0a-4908-8706-050403020100"
    d = _relay.derived_key_id(base)
    assert d == _relay.derived_key_id(base) != base
    assert len(d) == 36 and d.count("-") == 4


# --- relays over the network ------------------------------------------------------------------


def test_adjacent_stock_fills_from_link_material_and_both_ends_agree() -> None:
    net = KmeNetwork([("alice", "bob")], {"a": "alice", "b": "bob"}, config={"stock_keys": 6})
    assert stock(net, "alice", "bob") == 0  # no material yet
    net.add_material("alice", "bob", 4000)
    net.run_until(lambda: stock(net, "alice", "bob") == 6 and stock(net, "bob", "alice") == 6, max_t_s=2)
    assert net.count("bob", "alice", "alice") == 6 and net.count("alice", "bob", "bob") == 6
    st = net.kme("alice").statistics()
    assert st.keys_confirmed == 6 and st.relays_forwarded == 0
    # each key took 32 key + 16 token + 32 MAC bytes from alice's own stream
    assert net.store("alice").link_statistics("bob").own_taken_bytes == 6 * 80
    assert_counts_agree(net)


def test_three_node_chain_relays_through_the_trusted_node_with_identical_keys() -> None:
    net = KmeNetwork(
        [("alice", "relay"), ("relay", "bob")], {"a": "alice", "b": "bob"}, config={"stock_keys": 5}, seed=4
    )
    net.add_material_all(5000)
    net.run_until(lambda: stock(net, "alice", "bob") == 5 and stock(net, "bob", "alice") == 5, max_t_s=2)
    assert net.kme("relay").statistics().relays_forwarded == 10
    assert net.kme("relay").statistics().stock == ()  # no SAE at the relay: it keeps no stock
    done = net.request_keys("alice", "a", "b", 3)
    assert isinstance(done, RequestDone)
    got = net.fetch_keys("bob", "b", "a", [k.key_id for k in done.keys])
    assert isinstance(got, RequestDone)
    assert [(k.key_id, k.key) for k in done.keys] == [(k.key_id, k.key) for k in got.keys]
    assert len({k.key for k in done.keys}) == 3
    # the relay holds no KME-pair key at all (it only forwards)
    assert net.store("relay").key_statistics() == {}
    assert_counts_agree(net)


def test_ring_cut_mid_relay_reroutes_and_no_key_mismatches() -> None:
    saes = {"a-app": "a", "b-app": "b", "c-app": "c", "d-app": "d"}
    net = KmeNetwork(
        [("a", "b"), ("b", "c"), ("c", "d"), ("d", "a")], saes, config={"stock_keys": 4}, default_policy=WAIT, seed=3
    )
    net.add_material_all(30_000)
    net.run_until(lambda: all(n >= 4 for _, n in net.kme("a").statistics().stock), max_t_s=3)
    assert net.kme("a").path_to("b") == ("a", "b")
    req = net.enc("a", "a-app", "b-app", 24)  # needs 20 more keys than in stock: relays start
    net.pump(rounds=1)  # the relays are on the wire ...
    net.cut("a", "b")  # ... and the link goes
    done = net.wait_result("a", req, max_t_s=20)
    assert isinstance(done, RequestDone)
    assert net.kme("a").path_to("b") == ("a", "d", "c", "b")
    assert RouteChanged("b", ("a", "d", "c", "b")) in net.events_of("a", RouteChanged)
    st = net.kme("a").statistics()
    assert st.relay_timeouts > 0 and st.reroutes >= 1
    assert net.events_of("a", RelayFailed)
    assert net.kme("d").statistics().relays_forwarded > 0 and net.kme("c").statistics().relays_forwarded > 0
    got = net.fetch_keys("b", "b-app", "a-app", [k.key_id for k in done.keys])
    assert isinstance(got, RequestDone)
    assert {k.key_id: k.key for k in done.keys} == {k.key_id: k.key for k in got.keys}
    # every other key both ends hold agrees too
    net.advance(5.0)
    assert_counts_agree(net)
    _compare_all_ready(net)


def _compare_all_ready(net: KmeNetwork) -> None:
    """Take every READY key both ends of every pair hold and compare the bytes, id by id.

    Moves one end's copies to ASSIGNED: call it last.
    """
    for x in net.nodes:
        for y in net.nodes:
            if x >= y:
                continue
            for owner in (x, y):
                n = net.count(x, y, owner)
                if not n:
                    continue
                kx = net.store(x).take_ready(y, owner, n, 256)
                for k in kx:
                    assert net.store(y).get_key(k.key_id).key == k.key, (x, y, k.key_id)


def test_restored_link_is_used_again() -> None:
    saes = {"a-app": "a", "c-app": "c"}
    net = KmeNetwork([("a", "b"), ("b", "c"), ("a", "c")], saes, config={"stock_keys": 2})
    assert net.kme("a").path_to("c") == ("a", "c")
    net.cut("a", "c")
    assert net.kme("a").path_to("c") == ("a", "b", "c")
    net.restore("a", "c")
    net.pump()
    assert net.kme("a").path_to("c") == ("a", "c")
    assert [e.path for e in net.events_of("a", RouteChanged) if e.dst == "c"] == [
        ("a", "c"),
        ("a", "b", "c"),
        ("a", "c"),
    ]
    assert net.kme("a").statistics().reroutes == 2


def test_garbled_relay_is_rejected_counted_and_no_key_accepted() -> None:
    net = KmeNetwork([("alice", "bob")], {"a": "alice", "b": "bob"}, config={"stock_keys": 4})

    def flip(src: str, dst: str, body: dict) -> dict:
        if body.get("op") == "relay":
            ct = bytearray(body["ct"])
            ct[0] ^= 0x80
            body["ct"] = bytes(ct)
        return body

    net.tamper = flip
    net.add_material("alice", "bob", 2000)
    net.pump()
    rejected = net.kme("bob").statistics().relays_rejected + net.kme("alice").statistics().relays_rejected
    assert rejected == 8  # 4 each way, every one refused
    assert net.count("bob", "alice", "alice") == 0 and net.count("alice", "bob", "bob") == 0
    net.advance(2.5)  # the sources give up and withdraw
    assert net.kme("alice").statistics().relay_timeouts == 4
    assert net.count("alice", "bob", "alice", KeyState.PENDING) == 0
    net.tamper = None
    net.run_until(lambda: stock(net, "alice", "bob") == 4 and stock(net, "bob", "alice") == 4, max_t_s=3)
    _compare_all_ready(net)


def test_forged_relay_and_replay_are_rejected() -> None:
    net = KmeNetwork([("alice", "bob")], {"a": "alice", "b": "bob"}, config={"stock_keys": 1})
    captured: list[dict] = []

    def keep(src: str, dst: str, body: dict) -> dict:
        if body.get("op") == "relay" and src == "alice":
            captured.append(dict(body))
        return body

    net.tamper = keep
    net.add_material("alice", "bob", 4000)
    net.run_until(lambda: stock(net, "alice", "bob") == 1, max_t_s=2)
    bob = net.kme("bob")
    before = bob.statistics()
    # a replayed genuine message: its material is consumed already
    bob.receive("alice", captured[0], net.now)
    assert bob.statistics().relays_replayed == before.relays_replayed + 1
    # a forgery at the next free position, with a guessed tag
    front = net.store("alice").link_statistics("bob").own_taken_bytes
    forged = dict(captured[0], key_id="11111111-2222-4333-8444-555555555555", pos=front, tag=bytes(16))
    bob.receive("alice", forged, net.now)
    assert bob.statistics().relays_rejected == before.relays_rejected + 1
    assert net.count("bob", "alice", "alice") == 1  # only the genuine key
    # ... and a forgery far ahead in the stream spends none of it (the take rolls back).
    left = net.store("bob").link_bytes_available("alice", own=False)
    bob.receive("alice", dict(forged, pos=front + 1000), net.now)
    assert bob.statistics().relays_rejected == before.relays_rejected + 2
    assert net.store("bob").link_bytes_available("alice", own=False) == left
    # an app message must carry a map: anything else is malformed, not a crash
    bob.receive("alice", {"op": "fwd", "src": "alice", "dst": "bob", "ttl": 3,
                          "msg": {"op": "app", "app": "t", "body": 7}}, net.now)  # fmt: skip
    # malformed junk is counted, not raised
    bob.receive("alice", {"op": "relay", "key_id": 5}, net.now)
    bob.receive("alice", {"op": "nonsense"}, net.now)
    assert bob.statistics().messages_malformed == before.messages_malformed + 3


def test_relay_waits_for_material_that_reaches_the_receiver_later() -> None:
    net = KmeNetwork([("alice", "bob")], {"a": "alice", "b": "bob"}, config={"stock_keys": 2})
    block = bytes(range(256)) * 4
    net.store("alice").add_link_block("bob", 0, block, net.now)
    net.kme("alice").material_added("bob", net.now)
    net.pump()
    assert net.count("bob", "alice", "alice") == 0  # bob has not got the block: relays parked
    net.advance(0.5)
    net.store("bob").add_link_block("alice", 0, block, net.now)
    net.kme("bob").material_added("alice", net.now)
    net.pump()
    assert stock(net, "alice", "bob") == 2 and net.count("bob", "alice", "alice") == 2
    _compare_all_ready(net)


def test_relays_in_flight_are_bounded_per_destination() -> None:
    net = KmeNetwork([("alice", "bob")], {"a": "alice", "b": "bob"}, config={"stock_keys": 100})
    net.tamper = lambda src, dst, body: None  # the link eats everything
    net.add_material("alice", "bob", 50_000)
    assert net.count("alice", "bob", "alice", KeyState.PENDING) == 16
    net.advance(2.1)
    assert net.kme("alice").statistics().relay_timeouts == 16


def test_relay_messages_carry_no_key_bytes() -> None:
    net = KmeNetwork([("alice", "relay"), ("relay", "bob")], {"a": "alice", "b": "bob"}, config={"stock_keys": 8})
    net.add_material_all(8000)
    net.run_until(lambda: stock(net, "alice", "bob") == 8, max_t_s=2)
    done = net.request_keys("alice", "a", "b", 7)  # + 1 stock key for the assignment's MAC
    assert isinstance(done, RequestDone)
    wire = b"".join(raw for _, _, raw in net.wire_log)
    for k in done.keys:
        for i in range(0, len(k.key) - 8, 4):
            assert k.key[i : i + 8] not in wire
    for _, _, raw in net.wire_log:
        msgpack.unpackb(raw, raw=False)  # everything on the wire is plain msgpack


@pytest.mark.parametrize("who", ["alice", "bob"])
def test_restart_with_unconfirmed_relays_withdraws_them(tmp_path, who: str) -> None:
    net = KmeNetwork([("alice", "bob")], {"a": "alice", "b": "bob"}, config={"stock_keys": 6}, store_dir=tmp_path)
    net.add_material("alice", "bob", 600)  # material for a few relays each way
    net.pump()
    net.add_material("alice", "bob", 6000)
    net.pump(rounds=1)  # relays delivered, confirmations still on the wire
    pending = net.count(who, "alice" if who == "bob" else "bob", who, KeyState.PENDING)
    assert pending > 0
    net.restart(who)
    def settled() -> bool:
        full = stock(net, "alice", "bob") == 6 and stock(net, "bob", "alice") == 6
        return full and net.kme(who).statistics().withdrawals_pending == 0

    net.run_until(settled, max_t_s=5)
    assert net.kme(who).statistics().keys_withdrawn >= pending
    assert_counts_agree(net)
    _compare_all_ready(net)
