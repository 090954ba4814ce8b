"""The KME core as a whole: configuration, routing, routed app messages, timers, secrecy (nodes/kms/kme.py)."""

from __future__ import annotations

import ast
import dataclasses
import datetime as dt
from pathlib import Path

import pytest

from emulator.certs import RunCa
from nodes.kms._routing import LSA_REFRESH_S, LinkStateRouter, RoutingError
from nodes.kms.errors import KmsError
from nodes.kms.kme import (
    AppMessage,
    DeliveredKey,
    Kme,
    KmeConfig,
    KmeStatistics,
    PairPolicy,
    RequestDone,
    RequestFailed,
    RouteChanged,
)
from nodes.kms.store import KeyStore
from nodes.kms.testing import KmeNetwork, PumpError

ROOT = Path(__file__).resolve().parents[2]


# --- configuration --------------------------------------------------------------------------


def test_config_is_validated_and_frozen() -> None:
    cfg = KmeConfig("a", {"x": "a", "y": "b"}, (("b", "a"), ("a", "c")))
    assert cfg.kms_links == (("a", "b"), ("a", "c")) and cfg.neighbours == ("b", "c")
    assert cfg.nodes == frozenset("abc")
    assert cfg.policy_for("x", "y") == PairPolicy("qkd", "fail")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.node = "b"  # type: ignore[misc]
    with pytest.raises(TypeError):
        cfg.saes["z"] = "a"  # type: ignore[index]
    for bad in (dict(key_size_bits=100), dict(min_key_size_bits=512), dict(relay_timeout_s=0.0),
                dict(kms_links=(("a", "a"),)), dict(stock_keys=-1)):  # fmt: skip
        with pytest.raises(ValueError):
            KmeConfig(**{"node": "a", "saes": {}, "kms_links": (), **bad})
    with pytest.raises(ValueError):
        PairPolicy("quantum", "wait")
    with pytest.raises(ValueError):
        PairPolicy("qkd", "panic")
    assert "BEGIN" not in repr(KmeConfig("a", {}, (), kme_key_pem=b"-----BEGIN PRIVATE KEY-----"))


def test_kms_error_shape() -> None:
    err = KmsError(503, "keys are not available", [{"peer": "bob"}])
    assert (err.status, err.message, err.details) == (503, "keys are not available", ({"peer": "bob"},))
    assert str(err) == "503 keys are not available"
    with pytest.raises(ValueError):
        KmsError(500, "no")


def test_store_of_another_node_is_refused() -> None:
    with pytest.raises(ValueError):
        Kme(KmeConfig("a", {}, ()), KeyStore(":memory:", "b"), random_bytes=bytes, now=0.0)


def test_kme_modules_do_no_io() -> None:
    """Sans-IO (CONVENTIONS 1, 5): no trio/socket/ssl/asyncio/subprocess import in the core."""
    banned = {"trio", "socket", "ssl", "asyncio", "subprocess", "selectors", "http", "httpx", "os"}
    for name in ("kme.py", "_routing.py", "_relay.py", "_delivery.py", "errors.py", "testing.py"):
        tree = ast.parse((ROOT / "nodes" / "kms" / name).read_text())
        for node in ast.walk(tree):
            mods = []
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                mods = [node.module or ""]
            for mod in mods:
                assert mod.split(".")[0] not in banned, f"{name} imports {mod}"


# --- routing -----------------------------------------------------------------------------------


def _flood(routers: dict[str, LinkStateRouter], msgs: list[tuple[str, str, dict]]) -> None:
    for _ in range(100):
        if not msgs:
            return
        nxt = []
        for src, dst, body in msgs:
            nxt += [(dst, peer, b) for peer, b in routers[dst].receive_lsa(src, body)]
        msgs = nxt
    raise AssertionError("flooding did not stop")


def _square() -> dict[str, LinkStateRouter]:
    links = {"a": "bd", "b": "ac", "c": "bd", "d": "ac"}
    routers = {n: LinkStateRouter(n, links[n], "abcd", 0.0) for n in "abcd"}
    msgs = []
    for n, peers in links.items():
        for p in peers:
            msgs += [(n, peer, b) for peer, b in routers[n].link_up(p, 0.0)]
    _flood(routers, msgs)
    return routers


def test_shortest_paths_break_ties_by_name_and_need_both_ends() -> None:
    r = _square()
    assert r["a"].path("c") == ("a", "b", "c")  # a-b-c and a-d-c tie: b < d
    assert r["c"].path("a") == ("c", "b", "a")
    assert r["a"].next_hop("d") == "d" and r["a"].path("a") == ()
    # b says its link to c is down; c still says up: the edge is gone for everyone
    _flood(r, [("b", peer, body) for peer, body in r["b"].link_down("c", 1.0)])
    assert r["a"].path("c") == ("a", "d", "c")
    assert r["d"].path("b") == ("d", "a", "b")


def test_lsa_refresh_and_own_lsa_after_restart() -> None:
    r = _square()
    assert r["a"].get_timer() == pytest.approx(LSA_REFRESH_S)
    assert r["a"].handle_timer(1.0) == []
    refresh = r["a"].handle_timer(LSA_REFRESH_S)
    assert sorted(p for p, _ in refresh) == ["b", "d"]
    # a restarted router starts at seq 1 and learns its old, higher seq from a neighbour
    old_seq = refresh[0][1]["seq"]
    fresh = LinkStateRouter("a", "bd", "abcd", 10.0)
    fresh.link_up("b", 10.0)
    out = fresh.receive_lsa("b", {"op": "lsa", "origin": "a", "seq": old_seq, "up": ["b", "d"]})
    assert out and out[0][1]["seq"] == old_seq + 1
    with pytest.raises(RoutingError):
        fresh.receive_lsa("b", {"op": "lsa", "origin": "zz", "seq": 1, "up": []})
    with pytest.raises(RoutingError):
        fresh.receive_lsa("b", {"op": "lsa", "origin": "c", "seq": True, "up": []})


def test_route_changes_are_reported_for_served_kmes() -> None:
    saes = {"a-app": "a", "c-app": "c"}
    net = KmeNetwork([("a", "b"), ("b", "c"), ("c", "d"), ("d", "a")], saes, config={"stock_keys": 0})
    assert net.events_of("a", RouteChanged) == [RouteChanged("c", ("a", "b", "c"))]
    assert net.events_of("b", RouteChanged) == []  # no SAE at b: it serves nobody
    net.cut("a", "b")
    net.pump()
    assert net.events_of("a", RouteChanged)[-1] == RouteChanged("c", ("a", "d", "c"))
    net.cut("a", "d")
    net.pump()
    assert net.events_of("a", RouteChanged)[-1] == RouteChanged("c", ())


def test_routed_app_messages_and_unroutable_drops() -> None:
    net = KmeNetwork([("a", "b"), ("b", "c")], {"x": "a", "y": "c"}, config={"stock_keys": 0})
    net.kme("a").send_app("c", "chat", {"text": "hello", "n": 3}, net.now)
    net.pump()
    assert net.events_of("c", AppMessage) == [AppMessage("a", "chat", {"text": "hello", "n": 3})]
    assert net.kme("b").statistics().messages_forwarded == 1
    net.cut("b", "c")
    net.pump()
    before = net.kme("a").statistics().messages_dropped
    net.kme("a").send_app("c", "chat", {"text": "lost"}, net.now)
    assert net.kme("a").statistics().messages_dropped == before + 1


def test_messages_from_strangers_and_expired_ttl_are_dropped() -> None:
    net = KmeNetwork([("a", "b"), ("b", "c")], {"x": "a", "y": "c"}, config={"stock_keys": 0})
    b = net.kme("b")
    s0 = b.statistics()
    b.receive("c", {"op": "fwd", "src": "c", "dst": "a", "ttl": 1, "msg": {"op": "app", "app": "x", "body": {}}},
              net.now)  # fmt: skip
    assert b.statistics().messages_dropped == s0.messages_dropped + 1
    b.receive("zz", {"op": "lsa"}, net.now)  # not a neighbour
    b.receive("a", {"op": "fwd", "src": "a", "dst": "b", "ttl": 3, "msg": {"op": "launch"}}, net.now)
    b.receive("a", [1, 2], net.now)  # type: ignore[arg-type]
    assert b.statistics().messages_malformed == s0.messages_malformed + 3


# --- timers --------------------------------------------------------------------------------------


def test_timers_never_stay_due_after_handle_timer() -> None:
    net = KmeNetwork([("a", "b"), ("b", "c")], {"x": "a", "y": "c"}, config={"stock_keys": 4},
                     default_policy=PairPolicy("qkd", "wait", 1.0))  # fmt: skip
    net.tamper = lambda s, d, body: None if body.get("op") == "relay" else body  # relays vanish
    net.add_material_all(5000)
    req = net.enc("a", "x", "y", 2)
    net.dec("c", "y", "x", ["00000000-0000-4000-8000-000000000001"])
    for _ in range(60):
        net.advance(0.1)
        for node in net.nodes:
            t = net.kme(node).get_timer()
            assert t is not None and t > net.now
    assert isinstance(net.result("a", req), RequestFailed)


def test_pump_round_cap_catches_livelock() -> None:
    net = KmeNetwork([("a", "b")], {"x": "a", "y": "b"}, config={"stock_keys": 0}, max_rounds=3)
    def echo(src: str, dst: str, body: dict) -> dict:
        net.kme(dst).send_app(src, "echo", {}, net.now)  # every message begets another: never quiet
        return body

    net.kme("a").send_app("b", "ping", {}, net.now)
    net.tamper = echo
    with pytest.raises(PumpError):
        net.pump()


# --- secrecy ------------------------------------------------------------------------------------------


def test_no_key_bytes_in_messages_events_statistics_or_errors() -> None:
    ca = RunCa.create("test-kms-kme")
    creds = {}
    for n in ("alice", "bob", "carol"):
        c = ca.issue_kme(n)
        creds[n] = (c.cert_pem, c.key_pem, c.ca_pem)
    saes = {"a": "alice", "b": "bob", "c": "carol", "h": "alice", "p": "alice"}
    policies = {frozenset(("h", "b")): PairPolicy("hybrid", "fail"), frozenset(("p", "b")): PairPolicy("pqc", "fail")}
    net = KmeNetwork([("alice", "bob"), ("bob", "carol")], saes, config={"stock_keys": 8}, policies=policies,
                     credentials=creds, utc_origin=dt.datetime.now(dt.timezone.utc), seed=5)  # fmt: skip
    net.add_material_all(40_000)
    net.run_until(lambda: net.count("alice", "carol", "alice") >= 8 and net.count("alice", "bob", "alice") >= 8,
                  max_t_s=3)  # fmt: skip
    results = [
        net.request_keys("alice", "a", "b", 2),
        net.request_keys("alice", "a", "c", 2, 512),
        net.request_keys("alice", "h", "b", 2),
        net.request_keys("alice", "p", "b", 2),
        net.request_keys("alice", "a", "b", 1, None, ("c",)),
    ]
    keys: list[DeliveredKey] = []
    for (master, slave, node), res in zip(
        [("a", "b", "bob"), ("a", "c", "carol"), ("h", "b", "bob"), ("p", "b", "bob"), ("a", "b", "bob")], results
    ):
        assert isinstance(res, RequestDone)
        keys += res.keys
        got = net.fetch_keys(node, slave, master, [k.key_id for k in res.keys])
        assert isinstance(got, RequestDone) and got.keys == res.keys
    got_c = net.fetch_keys("carol", "c", "a", [results[-1].keys[0].key_id])
    assert isinstance(got_c, RequestDone) and got_c.keys == results[-1].keys
    failed = net.fetch_keys("bob", "b", "a", [keys[0].key_id])  # consumed: an error naming the id
    assert isinstance(failed, RequestFailed)
    texts = [repr(e) for node in net.nodes for e in net.events[node]]
    texts += [repr(net.kme(n).statistics()) for n in net.nodes] + [repr(net.kme(n)) for n in net.nodes]
    texts += [str(failed.error), repr(failed.error), repr(failed.error.details), repr(net.configs["alice"])]
    blob_text = "\n".join(texts)
    wire = b"".join(raw for _, _, raw in net.wire_log)
    assert len(keys) == 9 and len({k.key for k in keys}) == 9
    for k in keys:
        assert "key=" not in repr(k) and k.key.hex() not in blob_text
        for i in range(0, len(k.key) - 7):
            window = k.key[i : i + 8]
            assert window not in wire, k.key_id
            assert window.hex() not in blob_text
    assert all(isinstance(v, (int, tuple)) for v in dataclasses.asdict(net.kme("alice").statistics()).values())


def test_statistics_are_counts_only() -> None:
    fields = {f.name: f.type for f in dataclasses.fields(KmeStatistics)}
    assert all(t in ("int", "tuple[tuple[str, int], ...]") for t in fields.values()), fields
