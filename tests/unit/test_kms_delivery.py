"""Key delivery to SAEs (ETSI GS QKD 014 semantics) by the KME core: policies, multicast, empty pools, restarts."""

from __future__ import annotations

import datetime as dt
import random

import pytest

from emulator.certs import RunCa
from nodes.kms import _relay
from nodes.kms.kme import KeysDelivered, PairPolicy, PqcFallback, RequestDone, RequestFailed
from nodes.kms.errors import KmsError
from nodes.kms.store import KeyConsumed, KeyState
from nodes.kms.testing import KmeNetwork

NODES = ("alice", "bob", "carol", "dave", "erin")


@pytest.fixture(scope="module")
def credentials() -> dict[str, tuple[bytes, bytes, bytes]]:
    ca = RunCa.create("test-kms-delivery")
    out = {}
    for node in NODES:
        cred = ca.issue_kme(node)
        out[node] = (cred.cert_pem, cred.key_pem, cred.ca_pem)
    return out


def pair_net(
    policy: PairPolicy | None = None, *, stock: int = 8, material: int = 20_000, config: dict | None = None, **kw
) -> KmeNetwork:
    policies = {frozenset(("a", "b")): policy} if policy is not None else None
    net = KmeNetwork([("alice", "bob")], {"a": "alice", "b": "bob", "b2": "bob", "a2": "alice"},
                     config={"stock_keys": stock, **(config or {})}, policies=policies, **kw)  # fmt: skip
    if material:
        net.add_material("alice", "bob", material)
        net.run_until(lambda: net.count("alice", "bob", "alice") >= stock, max_t_s=3)
    return net


def done(result: RequestDone | RequestFailed | None) -> RequestDone:
    assert isinstance(result, RequestDone), result
    return result


def failed(result: RequestDone | RequestFailed | None, status: int) -> str:
    assert isinstance(result, RequestFailed), result
    assert result.error.status == status, result.error
    return result.error.message


def same_keys(a: RequestDone, b: RequestDone) -> None:
    assert [(k.key_id, k.key, k.size_bits) for k in a.keys] == [(k.key_id, k.key, k.size_bits) for k in b.keys]


# --- the basic exchange --------------------------------------------------------------------------


def test_adjacent_pair_delivers_identical_keys_once() -> None:
    net = pair_net()
    enc = done(net.request_keys("alice", "a", "b", 3))
    assert len({k.key_id for k in enc.keys}) == 3 and all(len(k.key) == 32 for k in enc.keys)
    dec = done(net.fetch_keys("bob", "b", "a", [k.key_id for k in enc.keys]))
    same_keys(enc, dec)
    # delivered: zeroised tombstones at both ends, never again
    for k in enc.keys:
        for node in ("alice", "bob"):
            with pytest.raises(KeyConsumed):
                net.store(node).get_key(k.key_id)
    again = net.fetch_keys("bob", "b", "a", [enc.keys[0].key_id])
    assert enc.keys[0].key_id in failed(again, 400)
    assert KeysDelivered("a", 3, 256) in net.events_of("alice", KeysDelivered)
    assert KeysDelivered("b", 3, 256) in net.events_of("bob", KeysDelivered)


def test_both_directions_use_separate_stocks() -> None:
    net = pair_net()
    net.run_until(lambda: net.count("bob", "alice", "bob") >= 8, max_t_s=3)
    ab = done(net.request_keys("alice", "a", "b", 2))
    ba = done(net.request_keys("bob", "b", "a", 2))
    assert not {k.key_id for k in ab.keys} & {k.key_id for k in ba.keys}
    same_keys(ab, done(net.fetch_keys("bob", "b", "a", [k.key_id for k in ab.keys])))
    same_keys(ba, done(net.fetch_keys("alice", "a", "b", [k.key_id for k in ba.keys])))


def test_other_sizes_are_built_from_stock_keys_at_both_ends() -> None:
    net = pair_net(PairPolicy("qkd", "wait", 10.0), stock=16, material=60_000)
    for size in (64, 512, 1000 * 8):
        enc = done(net.request_keys("alice", "a", "b", 1, size, max_t_s=20))
        assert len(enc.keys[0].key) == size // 8 and enc.keys[0].size_bits == size
        same_keys(enc, done(net.fetch_keys("bob", "b", "a", [enc.keys[0].key_id])))


def test_two_hundred_concurrent_requests_never_deliver_a_key_twice() -> None:
    net = pair_net(PairPolicy("qkd", "wait", 30.0), stock=32, material=200_000)
    reqs = [net.enc("alice", "a", "b", 1 + i % 3) for i in range(100)]
    reqs_back = [net.enc("bob", "b", "a", 1) for _ in range(100)]
    net.run_until(lambda: all(net.result("alice", r) for r in reqs) and all(net.result("bob", r) for r in reqs_back),
                  max_t_s=30)  # fmt: skip
    encs = [done(net.result("alice", r)) for r in reqs]
    encs_back = [done(net.result("bob", r)) for r in reqs_back]
    decs = [net.dec("bob", "b", "a", [k.key_id for k in e.keys]) for e in encs]
    decs_back = [net.dec("alice", "a", "b", [k.key_id for k in e.keys]) for e in encs_back]
    net.run_until(lambda: all(net.result("bob", r) for r in decs) and all(net.result("alice", r) for r in decs_back),
                  max_t_s=10)  # fmt: skip
    ids = []
    for e, r in zip(encs, decs):
        same_keys(e, done(net.result("bob", r)))
        ids += [k.key_id for k in e.keys]
    for e, r in zip(encs_back, decs_back):
        same_keys(e, done(net.result("alice", r)))
        ids += [k.key_id for k in e.keys]
    assert len(ids) == len(set(ids)) == sum(1 + i % 3 for i in range(100)) + 100
    # results came in arrival order per pair
    order = [e.req for e in net.events["alice"] if isinstance(e, RequestDone) and e.req in reqs]
    assert order == reqs


def test_results_complete_in_arrival_order_per_pair() -> None:
    net = pair_net(PairPolicy("qkd", "wait", 10.0), stock=2)
    assert net.count("alice", "bob", "alice") == 2
    big = net.enc("alice", "a", "b", 20)  # must wait for the stock
    small = net.enc("alice", "a", "b", 1)  # could be served at once, but not before `big`
    assert net.count("alice", "bob", "alice") == 2  # `small` did not take a key ahead of `big`
    done(net.wait_result("alice", small, max_t_s=10))
    done(net.result("alice", big))
    finished = [e.req for e in net.events["alice"] if isinstance(e, (RequestDone, RequestFailed))]
    assert finished.index(big) < finished.index(small)


# --- authorisation and validation -------------------------------------------------------------------


def test_key_issued_to_another_sae_is_401_and_unknown_is_400() -> None:
    net = pair_net()
    enc = done(net.request_keys("alice", "a", "b", 1))
    kid = enc.keys[0].key_id
    assert "b2" in failed(net.fetch_keys("bob", "b2", "a", [kid]), 401)
    failed(net.fetch_keys("bob", "b", "a2", [kid]), 401)  # wrong master
    # the master cannot fetch its own key as a "slave" at the other end either
    failed(net.fetch_keys("alice", "a2", "a", [kid]), 400)
    t0 = net.now
    unknown = "00000000-0000-4000-8000-000000000000"
    msg = failed(net.fetch_keys("bob", "b", "a", [unknown]), 400)
    assert unknown in msg
    assert net.now - t0 >= 2.0  # waited assign_timeout_s for an assign that might be on its way
    assert "not-a-uuid" in failed(net.fetch_keys("bob", "b", "a", ["not-a-uuid"]), 400)
    same_keys(enc, done(net.fetch_keys("bob", "b", "a", [kid])))  # still there for its slave


def test_request_validation_follows_etsi_014() -> None:
    net = pair_net(material=0)
    cases = [
        (("alice", "a", "b", 129, None, ()), 400, "Number of requested keys exceed allowed max keys per request"),
        (("alice", "a", "b", 1, 260, ()), 400, "size shall be a multiple of 8"),
        (("alice", "a", "b", 1, 8, ()), 400, "not within"),
        (("alice", "a", "b", 1, 8200, ()), 400, "not within"),
        (("alice", "a", "nobody", 1, None, ()), 400, "nobody"),
        (("alice", "a", "b", 1, None, ("ghost",)), 400, "ghost"),
        (("alice", "a", "b", 1, None, ("b", )), 400, "twice"),
        (("alice", "b", "a", 1, None, ()), 401, "b"),
        (("alice", "a", "b", 0, None, ()), 400, "positive"),
    ]
    for args, status, text in cases:
        req = net.enc(*args)
        msg = failed(net.result("alice", req), status)
        assert text in msg, (args, msg)
    assert net.kme("alice").statistics().requests_failed == len(cases)


def test_status_reports_etsi_fields() -> None:
    net = pair_net(stock=5)
    st = net.kme("alice").status("a", "b")
    assert st == {
        "source_KME_ID": "alice", "target_KME_ID": "bob", "master_SAE_ID": "a", "slave_SAE_ID": "b",
        "key_size": 256, "stored_key_count": 5, "max_key_count": 100_000, "max_key_per_request": 128,
        "max_key_size": 8192, "min_key_size": 64, "max_SAE_ID_count": 8,
    }  # fmt: skip
    with pytest.raises(KmsError) as exc:
        net.kme("alice").status("b", "a")
    assert exc.value.status == 401
    with pytest.raises(KmsError) as exc:
        net.kme("alice").status("a", "zz")
    assert exc.value.status == 400 and "zz" in exc.value.message


# --- multicast ----------------------------------------------------------------------------------


def test_multicast_to_slaves_here_there_and_at_a_third_kme() -> None:
    saes = {"a": "alice", "a2": "alice", "b": "bob", "b2": "bob", "c": "carol"}
    net = KmeNetwork([("alice", "bob"), ("bob", "carol")], saes, config={"stock_keys": 8}, seed=9)
    net.add_material_all(40_000)
    net.run_until(lambda: net.count("alice", "carol", "alice") >= 8 and net.count("alice", "bob", "alice") >= 8,
                  max_t_s=3)  # fmt: skip
    enc = done(net.request_keys("alice", "a", "b", 2, 512, ("b2", "a2", "c")))
    ids = [k.key_id for k in enc.keys]
    for node, sae in (("bob", "b"), ("bob", "b2"), ("alice", "a2"), ("carol", "c")):
        same_keys(enc, done(net.fetch_keys(node, sae, "a", ids)))
        failed(net.fetch_keys(node, sae, "a", ids[:1]), 400)  # once per party
    assert net.kme("carol").statistics().keys_accepted == 2
    # every copy is consumed now
    for node in ("alice", "bob", "carol"):
        for kid in ids:
            with pytest.raises(KeyConsumed):
                net.store(node).get_key(kid)


def test_garbled_wrap_is_refused_and_the_request_fails_cleanly() -> None:
    saes = {"a": "alice", "b": "bob", "c": "carol"}
    net = KmeNetwork([("alice", "bob"), ("bob", "carol")], saes, config={"stock_keys": 4}, seed=2)
    net.add_material_all(20_000)
    net.run_until(lambda: net.count("alice", "carol", "alice") >= 4, max_t_s=3)

    wraps: list[str] = []

    def garble(src: str, dst: str, body: dict) -> dict:
        msg = body.get("msg") if body.get("op") == "fwd" else None
        if msg and msg.get("op") == "wrap" and dst == "carol":  # once: a second flip would undo it
            item = msg["keys"][0]
            item["ct"] = bytes([item["ct"][0] ^ 1]) + item["ct"][1:]
            wraps.extend(item["wraps"])
        return body

    net.tamper = garble
    msg = failed(net.request_keys("alice", "a", "b", 1, None, ("c",)), 503)
    assert "carol" in msg and "MAC" in msg
    assert net.kme("carol").statistics().wraps_rejected == 1
    # The one-time keys that checked the forgery end spent at carol (dropped there at once,
    # and withdrawn by alice's abort anyway): none is left READY for reuse.
    assert wraps
    for w in wraps:
        with pytest.raises(KeyConsumed):
            net.store("carol").get_key(w)
    net.tamper = None
    net.advance(3.0)
    for node, peer in (("alice", "bob"), ("bob", "alice"), ("alice", "carol"), ("carol", "alice")):
        assert net.count(node, peer, "alice", KeyState.ASSIGNED) == 0
    assert net.count("alice", "bob", "alice") == net.count("bob", "alice", "alice")
    assert net.count("alice", "carol", "alice") == net.count("carol", "alice", "alice")


def test_malformed_wrap_is_answered_at_once() -> None:
    saes = {"a": "alice", "b": "bob", "c": "carol"}
    net = KmeNetwork([("alice", "bob"), ("bob", "carol")], saes, config={"stock_keys": 4}, seed=3)
    net.add_material_all(20_000)
    net.run_until(lambda: net.count("alice", "carol", "alice") >= 4, max_t_s=3)

    def break_wrap(src: str, dst: str, body: dict) -> dict:
        msg = body.get("msg") if body.get("op") == "fwd" else None
        if msg and msg.get("op") == "wrap" and dst == "carol":
            msg["keys"] = "nonsense"
        return body

    net.tamper = break_wrap
    t0 = net.now
    before = net.kme("carol").statistics().messages_malformed
    msg = failed(net.request_keys("alice", "a", "b", 1, None, ("c",)), 503)
    assert "malformed" in msg
    assert net.kme("carol").statistics().messages_malformed == before + 1
    assert net.now - t0 < net.kme("alice")._cfg.assign_timeout_s  # noqa: SLF001 - not timed out: refused


# --- policies ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["qkd", "pqc", "hybrid"])
def test_each_policy_delivers_identical_keys(credentials, policy: str) -> None:
    net = pair_net(PairPolicy(policy, "fail"), credentials=credentials, utc_origin=dt.datetime.now(dt.timezone.utc))
    enc = done(net.request_keys("alice", "a", "b", 2, 384))
    same_keys(enc, done(net.fetch_keys("bob", "b", "a", [k.key_id for k in enc.keys])))
    st = net.kme("alice").statistics()
    assert (st.pqc_exchanges == 1) == (policy != "qkd")
    assert net.kme("bob").statistics().pqc_exchanges == (policy != "qkd")


def test_hybrid_key_differs_from_the_qkd_key_it_contains(credentials) -> None:
    """Same seeds -> the same stock; qkd delivers the stock key, hybrid a CatKDF of it."""
    utc = dt.datetime.now(dt.timezone.utc)
    keys = {}
    for policy in ("qkd", "hybrid"):
        net = pair_net(PairPolicy(policy, "fail"), credentials=credentials, utc_origin=utc, seed=11)
        keys[policy] = done(net.request_keys("alice", "a", "b", 1)).keys[0]
    assert keys["hybrid"].key_id == _relay.derived_key_id(keys["qkd"].key_id)
    assert keys["hybrid"].key != keys["qkd"].key and len(keys["hybrid"].key) == 32


def test_pqc_without_credentials_fails_with_503() -> None:
    net = pair_net(PairPolicy("pqc", "fail"))
    assert "certificate" in failed(net.request_keys("alice", "a", "b", 1), 503)


# --- empty pool -----------------------------------------------------------------------------------


def test_empty_pool_fail_is_immediate() -> None:
    net = pair_net(PairPolicy("qkd", "fail"), material=0)
    req = net.enc("alice", "a", "b", 1)
    assert "keys are not available" in failed(net.result("alice", req), 503)


def test_empty_pool_wait_gets_keys_when_material_arrives() -> None:
    net = pair_net(PairPolicy("qkd", "wait", 3.0), material=0)
    req = net.enc("alice", "a", "b", 2)
    net.advance(1.0)
    assert net.result("alice", req) is None
    net.add_material("alice", "bob", 5000)
    enc = done(net.wait_result("alice", req, max_t_s=1.5))
    same_keys(enc, done(net.fetch_keys("bob", "b", "a", [k.key_id for k in enc.keys])))


def test_empty_pool_wait_times_out_with_503() -> None:
    net = pair_net(PairPolicy("qkd", "wait", 3.0), material=0)
    req = net.enc("alice", "a", "b", 1)
    failed(net.wait_result("alice", req, max_t_s=5), 503)
    assert 3.0 <= net.now < 3.2


def test_empty_pool_pqc_falls_back_with_an_alarm(credentials) -> None:
    net = pair_net(PairPolicy("hybrid", "pqc"), material=0, credentials=credentials,
                   utc_origin=dt.datetime.now(dt.timezone.utc))  # fmt: skip
    enc = done(net.request_keys("alice", "a", "b", 1))
    assert net.events_of("alice", PqcFallback) == [PqcFallback("a", "b")]
    assert net.kme("alice").statistics().pqc_fallbacks == 1
    same_keys(enc, done(net.fetch_keys("bob", "b", "a", [enc.keys[0].key_id])))


def test_assign_without_ack_fails_and_withdraws_at_both_ends() -> None:
    net = pair_net(stock=4)
    net.tamper = lambda s, d, body: None if body.get("op") == "fwd" and body["msg"].get("op") == "assign_ack" else body
    enc = net.request_keys("alice", "a", "b", 2)
    failed(enc, 503)
    assert net.kme("alice").statistics().assign_timeouts == 1
    net.tamper = None
    net.advance(2.5)
    assert net.count("bob", "alice", "alice", KeyState.ASSIGNED) == 0
    assert net.count("alice", "bob", "alice", KeyState.ASSIGNED) == 0
    assert net.count("alice", "bob", "alice") == net.count("bob", "alice", "alice")


# --- crash and restart ------------------------------------------------------------------------------


@pytest.mark.parametrize("who", ["alice", "bob"])
def test_restart_mid_delivery_never_delivers_twice(tmp_path, who: str) -> None:
    net = pair_net(stock=6, store_dir=tmp_path)
    first = done(net.request_keys("alice", "a", "b", 1))  # a delivered key, fetched after the restart
    net.run_until(lambda: net.count("alice", "bob", "alice") >= 6, max_t_s=3)
    ready_before = net.count("alice", "bob", "alice")
    req = net.enc("alice", "a", "b", 2)
    net.pump(rounds=1)  # the assignment reached bob; the ack is on its way
    assert net.count("bob", "alice", "alice", KeyState.ASSIGNED) == 1 + 2  # `first` and the two
    net.restart(who)
    if who == "bob":  # alice waits for an ack that never comes
        failed(net.wait_result("alice", req, max_t_s=3), 503)
    else:
        net.advance(0.1)
        assert net.result("alice", req) is None  # the request died with the process
    net.run_until(lambda: net.kme("alice").statistics().withdrawals_pending == 0, max_t_s=5)
    net.advance(1.0)
    # the two keys of the broken request were withdrawn at both ends (bob keeps `first` for b)
    assert net.count("alice", "bob", "alice", KeyState.ASSIGNED) == 0
    assert net.count("bob", "alice", "alice", KeyState.ASSIGNED) == 1
    assert net.count("alice", "bob", "alice", KeyState.PENDING) == 0
    assert net.count("alice", "bob", "alice") == net.count("bob", "alice", "alice") >= ready_before - 2
    # the key delivered before the restart is still there for its slave, exactly once
    same_keys(first, done(net.fetch_keys("bob", "b", "a", [first.keys[0].key_id])))
    failed(net.fetch_keys("bob", "b", "a", [first.keys[0].key_id]), 400)
    # and the service goes on
    enc = done(net.request_keys("alice", "a", "b", 2))
    same_keys(enc, done(net.fetch_keys("bob", "b", "a", [k.key_id for k in enc.keys])))


def test_restart_after_commit_keeps_the_key_for_the_slave(tmp_path) -> None:
    net = pair_net(stock=4, store_dir=tmp_path)
    enc = done(net.request_keys("alice", "a", "b", 1))
    net.restart("alice")
    net.restart("bob")
    net.advance(0.5)
    same_keys(enc, done(net.fetch_keys("bob", "b", "a", [enc.keys[0].key_id])))
    assert net.count("alice", "bob", "alice") == net.count("bob", "alice", "alice") >= 3


def test_pair_on_one_kme_gets_local_keys() -> None:
    net = pair_net(material=0)
    enc = done(net.request_keys("alice", "a", "a2", 2, 128))
    assert all(len(k.key) == 16 for k in enc.keys)
    same_keys(enc, done(net.fetch_keys("alice", "a2", "a", [k.key_id for k in enc.keys])))
    assert net.kme("alice").status("a", "a2")["target_KME_ID"] == "alice"


def test_pqc_epoch_is_renewed_and_a_restarted_peer_forces_a_new_one(credentials, tmp_path) -> None:
    net = pair_net(PairPolicy("pqc", "fail"), credentials=credentials, store_dir=tmp_path,
                   utc_origin=dt.datetime.now(dt.timezone.utc), stock=2, config={"pqc_rekey_s": 1.0})  # fmt: skip
    first = done(net.request_keys("alice", "a", "b", 1))
    net.advance(1.5)
    second = done(net.request_keys("alice", "a", "b", 1))  # served with the old epoch while the new one runs
    net.advance(0.5)
    assert net.kme("alice").statistics().pqc_exchanges == 2
    third = done(net.request_keys("alice", "a", "b", 1))
    for enc in (first, second, third):
        same_keys(enc, done(net.fetch_keys("bob", "b", "a", [enc.keys[0].key_id])))
    net.restart("bob")  # bob forgets the epochs
    net.advance(0.2)
    msg = failed(net.request_keys("alice", "a", "b", 1), 503)
    assert "unknown-epoch" in msg
    fourth = done(net.request_keys("alice", "a", "b", 1))
    same_keys(fourth, done(net.fetch_keys("bob", "b", "a", [fourth.keys[0].key_id])))


def test_forged_assignment_is_refused_and_nothing_is_delivered() -> None:
    net = pair_net(PairPolicy("qkd", "fail"), stock=8)

    def forge(src: str, dst: str, body: dict) -> dict:
        msg = body.get("msg") if body.get("op") == "fwd" else None
        if msg and msg.get("op") == "assign":
            msg["slaves"] = ["b2"]  # hand the keys to another SAE
        return body

    net.tamper = forge
    msg = failed(net.request_keys("alice", "a", "b", 2), 503)
    assert "MAC" in msg
    assert net.kme("bob").statistics().assigns_rejected == 1
    assert net.count("bob", "alice", "alice", KeyState.ASSIGNED) == 0
    net.tamper = None
    net.advance(2.5)
    assert net.count("alice", "bob", "alice", KeyState.ASSIGNED) == 0
    assert net.count("alice", "bob", "alice") == net.count("bob", "alice", "alice")


@pytest.mark.parametrize("seed", [1, 2])
def test_random_operations_keep_the_invariants(credentials, tmp_path, seed: int) -> None:
    """Material, requests of every policy (multicast too), cuts, restarts and 5 % message loss, at random.

    Invariants: every key id reaches each of its SAEs at most once and with the master's
    bytes; after the dust settles, READY counts agree at both ends of every pair, nothing
    is left PENDING but relays in flight, and every withdrawal was acknowledged.
    """
    rnd = random.Random(seed)
    nodes = list(NODES)
    saes = {f"{n}{i}": n for n in nodes for i in (1, 2)}
    links = [("alice", "bob"), ("bob", "carol"), ("carol", "dave"), ("dave", "erin"), ("erin", "alice"),
             ("bob", "dave")]  # fmt: skip
    names = sorted(saes)
    policies = {
        frozenset((x, y)): PairPolicy(rnd.choice(["qkd", "qkd", "pqc", "hybrid"]), rnd.choice(["wait", "fail", "pqc"]), 3.0)
        for i, x in enumerate(names) for y in names[i + 1 :]
    }  # fmt: skip
    net = KmeNetwork(links, saes, config={"stock_keys": 6}, policies=policies, credentials=credentials,
                     utc_origin=dt.datetime.now(dt.timezone.utc), seed=seed, store_dir=tmp_path)  # fmt: skip
    net.tamper = lambda s, d, body: None if rnd.random() < 0.05 else body
    encs: list[tuple[str, int, str, tuple[str, ...]]] = []
    decs: list[tuple[str, int, str]] = []
    master_bytes: dict[str, bytes] = {}
    served: set[tuple[str, str]] = set()
    cut: set[tuple[str, str]] = set()
    n_done = n_dec = 0
    for _ in range(150):
        op = rnd.random()
        if op < 0.3:
            net.add_material(*rnd.choice(links), rnd.randint(200, 3000))
        elif op < 0.6:
            m = rnd.choice(names)
            s = rnd.choice([x for x in names if x != m])
            extra = tuple(x for x in names if x not in (m, s) and rnd.random() < 0.1)[:2]
            req = net.enc(saes[m], m, s, rnd.randint(1, 3), rnd.choice([None, None, 128, 512]), extra)
            encs.append((saes[m], req, m, (s, *extra)))
        elif op < 0.65:
            link = rnd.choice(links)
            (net.restore if link in cut else net.cut)(*link)
            cut ^= {link}
        elif op < 0.68:
            net.restart(rnd.choice(nodes))
        net.pump(rounds=rnd.randint(0, 3))
        net.advance(rnd.choice([0.01, 0.1, 0.5]))
        for item in [e for e in encs if (e[0], e[1]) in net.results]:
            encs.remove(item)
            node, req, m, slaves = item
            res = net.results[(node, req)]
            if isinstance(res, RequestDone):
                n_done += 1
                for k in res.keys:
                    assert k.key_id not in master_bytes
                    master_bytes[k.key_id] = k.key
                    served.add((k.key_id, m))
                decs += [(saes[s], net.dec(saes[s], s, m, [k.key_id for k in res.keys]), s) for s in slaves]
        for item in [d for d in decs if (d[0], d[1]) in net.results]:
            decs.remove(item)
            res = net.results[(item[0], item[1])]
            assert isinstance(res, RequestDone), res  # an assigned key stays fetchable through restarts
            n_dec += 1
            for k in res.keys:
                assert master_bytes[k.key_id] == k.key
                assert (k.key_id, item[2]) not in served
                served.add((k.key_id, item[2]))
    assert n_done >= 20 and n_dec >= 20  # the run did exercise delivery
    net.tamper = None
    for link in sorted(cut):
        net.restore(*link)
    for _ in range(100):  # 10 s: routes converge, withdrawals are retried every relay_timeout_s
        net.advance(0.1)
    for x in nodes:
        assert net.kme(x).statistics().withdrawals_pending == 0
        for y in nodes:
            if x != y:
                for owner in (x, y):
                    assert net.count(x, y, owner) == net.count(y, x, owner), (x, y, owner)
