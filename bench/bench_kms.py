"""Benchmark the key management (issue 5): keys served over ETSI GS QKD 014, their
latency, key relay cost per hop, hybrid key derivation and the PQC exchange.

Run: ``python bench/bench_kms.py [--quick] [--no-processes] [--keep DIR]`` (~1 min;
--quick ~35 s). Prints one JSON object per line: an ``environment`` line
(bench/_common.py, plus ``loadavg_1_5_15`` from os.getloadavg(): other work on the
machine skews every number below), then the records below. Speed is never asserted;
every served key is checked (the slave's copy must equal the master's: ``mismatches``)
and errors are counted by HTTP status. Numbers depend on the machine: on 2 cores the
broker, three node processes and the client share them.

1. Keys served per second (``kms_serve``), 256-bit keys, policy qkd. One served key =
   ``enc_keys`` (1 key) by the master SAE at its KME — which assigns a stock key and
   gets the slave KME's ack over the KMS links (alice — relay — bob, two hops) — then
   ``dec_keys`` of that key id by the slave SAE at its KME. Directions alternate
   (alice-app master, then bob-app master) so both KMEs' stocks are used.
   ``keys_per_s`` = keys served / wall seconds of the level.

   * ``mode: "processes"`` (the realistic setup): a real `qnetem run`
     (bench/_kms_fixture.py) of a scenario written to a temporary directory: alice —
     relay — bob joined by 10 km QKD links (the links of scenarios/hybrid-metro.yaml),
     one QKD link at a time (``key_bits_per_link``), then a quiet period. ``key_bits``
     makes link material for 1.5 times the stock the levels need (``stock_needed`` per
     direction: 2 stock keys per served key, the key and the one-time MAC key of its
     assignment); ``stock_keys`` is above what the material can make, so the KMEs turn
     all of it into stock and then stop relaying. The bench polls
     ``status.stored_key_count`` until both stocks stop growing: every request is served
     from stock made before the clock starts, and no relay competes for the CPU
     (``stock_after``: what is left). This process is the SAE client: credentials from
     `qnetem certs RUN --sae ID`, httpx over HTTPS with mutual TLS
     (nodes.kms.client.EtsiClient) to the URLs in RUN/kms.json. ``clients`` N: N
     concurrent trio tasks, each with its own two HTTPS connections (one per KME),
     opened by a ``status`` call before the clock starts (handshakes are not timed; a
     status call uses no key); one SAE pair for all. ``client_cpu_s``: CPU seconds this
     process used during the level. If the QKD links made less stock than planned (a
     busy machine: the broker drops detections), every level is scaled down by the same
     factor (``scale`` in ``kms_run``).
   * ``mode: "in-memory"`` (the baseline, same run): the same topology, SAEs and policy
     served by the KME cores alone — nodes.kms.testing.KmeNetwork, file stores in a
     temporary directory (SQLite fsyncs as in the nodes), msgpack between cores, a stock
     made beforehand from link material in the same way (``kms_core_stock``: how fast
     the cores made it) — no HTTP, TLS, JSON, delivery records, node runtime or process
     boundary. ``clients`` 1: one request at a time; 8 / 32: that many enc_keys issued
     together and pumped, then their dec_keys.
   * ``in_memory_over_processes`` (processes records) = in-memory keys_per_s / processes
     keys_per_s at the same ``clients``: what the HTTPS service and the processes cost.

2. Latency (``kms_latency``) of each served key of the ``clients`` = 1 level, per mode:
   p50 / p90 / p99 / max in milliseconds of ``enc_keys``, ``dec_keys`` and the two
   together (the processes records also carry each level's p50).

3. Relay cost (``kms_relay_chain``, ``kms_relay_per_hop``): one key relay (hop-by-hop
   one-time pad + Wegman-Carter MAC, confirmed end to end by the destination's token)
   along a chain of ``kmes`` = 2, 3, 5 KMEs (``hops`` = kmes - 1): sans-IO cores in
   KmeNetwork with link delay 0 (the fake clock never moves), so the time is the wall
   CPU of every hop — cores, msgpack of every message, SQLite stores (``store: "file"``:
   WAL, synchronous=FULL, each commit fsyncs; ``"memory"``: the same without the disk).
   ``ms_per_relay``: the source KME's stock is one key short (a key taken out of its
   store, not timed), a timer tick starts one relay, the network is pumped until the
   confirmation is back (p50 / p90 / p99 / max / mean of ``samples``);
   ``batch_ms_per_relay``: 16 short (MAX_RELAYS_IN_FLIGHT relays at once), wall / 16.
   ``kms_relay_per_hop``: the least-squares line through (hops, p50) — ``ms_per_hop``
   (slope) and ``ms_fixed`` (intercept: the ends' share); ``batch_*`` the same for the
   batch numbers. (Not measured over real processes.)

4. Hybrid keys. ``kms_hybrid_key``: CPU per 256-bit key, one KME. Baseline ``qkd_us`` =
   ``hybrid_key(qkd_key=k)``, the key as is after the argument checks (the KME's qkd
   path does not even call it); ``pqc_us`` / ``hybrid_us`` = ``PqcEpoch.derive_key`` —
   CatKDF (ETSI TS 103 744 §8.2: HKDF-SHA-256 over [QKD key ||] ML-KEM secret || X25519
   secret) with the context the KME builds (key id, transcript hash, policy, size,
   master, slaves); ``hybrid_over_qkd`` = the ratio. ``kms_pqc_exchange``: one
   authenticated ML-KEM-768 + X25519 exchange, all three messages (PqcInit, PqcResponse,
   PqcConfirm) between two KMEs with certificates from a ``RunCa``, each message through
   msgpack and ``message_from_dict`` as on the KMS link; ``ms_per_exchange`` is the CPU
   of both ends together (one process, no network), ``steps_ms`` splits it (medians of
   ``breakdown_n`` exchanges; ``wire`` = encoding and decoding of the three messages).
   ``amortised_us_per_key`` = ms_per_exchange / N + pqc_us (hybrid_us) for an epoch
   serving N keys (the KME renews an epoch every ``pqc_rekey_s`` = 60 s by default).

``kms_run``: the real run's sanity — QKD final key bits per link, the stock reached
(alice-owned keys for bob, bob-owned keys for alice), exit code (130: the bench stops
the run with SIGTERM once done) and the KMEs' delivery records counted like the run's
metrics (``keys_delivered``; ``key_mismatches`` and ``duplicate_deliveries`` must be 0).

Method: per_call_s (bench/_common.py: best of 3 loops of >= 0.2 s, 0.05 s with --quick)
for the per-key and per-exchange CPU; time.perf_counter around each request or relay
otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import itertools
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import msgpack  # noqa: E402
import numpy as np  # noqa: E402
import trio  # noqa: E402
from _common import emit, environment_record, per_call_s  # noqa: E402
from _kms_fixture import RealKmsRun, RunFailed  # noqa: E402

from emulator.certs import RunCa  # noqa: E402
from nodes.kms.client import EtsiClient, EtsiClientError  # noqa: E402
from nodes.kms.https import client_ssl_context  # noqa: E402
from nodes.kms.hybrid import KmeIdentity, PqcInitiator, PqcResponder, hybrid_key, message_from_dict  # noqa: E402
from nodes.kms.kme import MAX_RELAYS_IN_FLIGHT, PairPolicy, RequestDone  # noqa: E402
from nodes.kms.testing import KmeNetwork  # noqa: E402

KEY_BITS = 256
KEY_BYTES = KEY_BITS // 8
#: Link material one relay takes from each link's stream it crosses: key 32 + confirmation
#: token 16 + one-time MAC key 32 bytes (nodes/kms/kme.py `_start_relay`, nodes/kms/_relay.py).
RELAY_BYTES = KEY_BYTES + 16 + 32
#: Stock keys one enc_keys of one 256-bit key spends: the key and one more for the
#: assignment's one-time MAC (nodes/kms/kme.py `_demand`, `_mac_keys`).
STOCK_PER_KEY = 2
#: stock_keys above what the link material makes (KmeConfig.max_key_count caps the target):
#: every relay is made before the measurement and none runs during it.
STOCK_ALL = 100_000
#: kms.relay_timeout of the real run (see _scenario)
RELAY_TIMEOUT_S = 5.0
#: (master KME, master SAE, slave KME, slave SAE)
DIRECTIONS = (("alice", "alice-app", "bob", "bob-app"), ("bob", "bob-app", "alice", "alice-app"))
PAIR = frozenset(("alice-app", "bob-app"))
#: Final key bits per wall second of one 10 km link, for the QKD apps' time cap: an idle
#: 2-core machine makes ~100-150 kbit/s (~75 kbit per 10^6-bit block, a block every
#: 0.45-0.7 s: post-processing, not emission, bounds it). A link stops earlier once it
#: has `key_bits`; with less (a busy machine) the levels are scaled down.
LINK_BPS_ESTIMATE = 100e3
QKD_LINK = {
    "pulse_rate_hz": 1e9,
    "intensities": {"signal": 0.48, "decoy": 0.05, "vacuum": 0.0},
    "class_probabilities": {"signal": 0.5, "decoy": 0.25, "vacuum": 0.25},
    "receiver_efficiency": 0.045,
    "dark_count_probability": 1.7e-6,
    "misalignment_error": 0.033,
}  # scenarios/hybrid-metro.yaml (GYS, Ma et al. 2005 Table I)


def _ms(xs: Sequence[float]) -> dict[str, float | int]:
    a = np.asarray(xs, dtype=float) * 1e3
    if a.size == 0:
        return {"n": 0}
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return {"n": int(a.size), "p50": round(float(p50), 3), "p90": round(float(p90), 3),
            "p99": round(float(p99), 3), "max": round(float(a.max()), 3)}  # fmt: skip


# ====================================================================== 4. hybrid keys and the PQC exchange


def bench_hybrid(min_loop_s: float, breakdown_n: int) -> None:
    ca = RunCa.create("bench-kms")
    ident = {}
    for node in ("alice", "bob"):
        cred = ca.issue_kme(node)
        ident[node] = KmeIdentity(node=node, certificate_pem=cred.cert_pem, private_key_pem=cred.key_pem,
                                  ca_pem=cred.ca_pem)  # fmt: skip
    now = dt.datetime.now(dt.timezone.utc)
    responder = PqcResponder(identity=ident["bob"], peers={"alice"})
    epoch_ids = itertools.count(1)

    def wire(msg: Any) -> Any:  # what the KMS link does to a message: msgpack both ways
        return message_from_dict(msgpack.unpackb(msgpack.packb(msg.to_dict(), use_bin_type=True), raw=False))

    def exchange() -> tuple[Any, Any]:
        ini = PqcInitiator(identity=ident["alice"], peer="bob", epoch_id=next(epoch_ids))
        resp = responder.receive_init(wire(ini.start()), now=now)
        confirm, ep_i = ini.receive_response(wire(resp), now=now)
        return ep_i, responder.receive_confirm(wire(confirm))

    ep_i, ep_r = exchange()
    same = (ep_i.mlkem_secret, ep_i.x25519_secret, ep_i.transcript_hash) == (
        ep_r.mlkem_secret, ep_r.x25519_secret, ep_r.transcript_hash)  # fmt: skip

    # --- per key
    qkd_key = os.urandom(KEY_BYTES)
    key_id = str(uuid.uuid4())
    extra = ("hybrid", str(KEY_BITS), "alice-app", "1", "bob-app")  # nodes/kms/_delivery.py context_extra
    t_qkd = per_call_s(
        lambda: hybrid_key(qkd_key=qkd_key, mlkem_secret=None, x25519_secret=None, context=b"", length_bytes=KEY_BYTES),
        min_loop_s, loops=3,
    )  # fmt: skip
    t_pqc = per_call_s(lambda: ep_i.derive_key(key_id=key_id, length_bytes=KEY_BYTES, extra=extra), min_loop_s, loops=3)
    t_hyb = per_call_s(
        lambda: ep_i.derive_key(key_id=key_id, length_bytes=KEY_BYTES, qkd_key=qkd_key, extra=extra),
        min_loop_s, loops=3,
    )  # fmt: skip
    same_keys = ep_i.derive_key(key_id=key_id, length_bytes=KEY_BYTES, qkd_key=qkd_key, extra=extra) == ep_r.derive_key(
        key_id=key_id, length_bytes=KEY_BYTES, qkd_key=qkd_key, extra=extra
    )
    emit({
        "bench": "kms_hybrid_key", "key_bits": KEY_BITS,
        "qkd_us": round(t_qkd * 1e6, 3), "pqc_us": round(t_pqc * 1e6, 3), "hybrid_us": round(t_hyb * 1e6, 3),
        "qkd_keys_per_s": round(1 / t_qkd), "pqc_keys_per_s": round(1 / t_pqc), "hybrid_keys_per_s": round(1 / t_hyb),
        "hybrid_over_qkd": round(t_hyb / t_qkd, 1), "both_ends_equal": same_keys,
    })  # fmt: skip

    # --- per exchange
    t_ex = per_call_s(exchange, min_loop_s, loops=3)
    steps: dict[str, list[float]] = {k: [] for k in ("initiator_start", "responder_init", "initiator_response",
                                                      "responder_confirm", "wire")}  # fmt: skip
    pc = time.perf_counter
    for _ in range(breakdown_n):
        ini = PqcInitiator(identity=ident["alice"], peer="bob", epoch_id=next(epoch_ids))
        t0 = pc()
        m1 = ini.start()
        t1 = pc()
        m1 = wire(m1)
        t2 = pc()
        m2 = responder.receive_init(m1, now=now)
        t3 = pc()
        m2 = wire(m2)
        t4 = pc()
        m3, _ = ini.receive_response(m2, now=now)
        t5 = pc()
        m3 = wire(m3)
        t6 = pc()
        responder.receive_confirm(m3)
        t7 = pc()
        steps["initiator_start"].append(t1 - t0)
        steps["responder_init"].append(t3 - t2)
        steps["initiator_response"].append(t5 - t4)
        steps["responder_confirm"].append(t7 - t6)
        steps["wire"].append((t2 - t1) + (t4 - t3) + (t6 - t5))
    emit({
        "bench": "kms_pqc_exchange", "kem": "ML-KEM-768+X25519", "signatures": "ECDSA P-256",
        "ms_per_exchange": round(t_ex * 1e3, 4), "exchanges_per_s": round(1 / t_ex, 1),
        "steps_ms": {k: round(statistics.median(v) * 1e3, 4) for k, v in steps.items()},
        "breakdown_n": breakdown_n, "secrets_equal": same,
        "amortised_us_per_key": {
            str(n): {"pqc": round((t_ex / n + t_pqc) * 1e6, 2), "hybrid": round((t_ex / n + t_hyb) * 1e6, 2)}
            for n in (1, 10, 100, 1000, 10000)
        },
    })  # fmt: skip


# ====================================================================== 3. relay cost per hop (sans-IO cores)


def _relay_chain(n_kmes: int, store_dir: Path | None, samples: int, batches: int) -> dict[str, Any]:
    nodes = [f"k{i}" for i in range(n_kmes)]  # names sort in chain order
    first, last = nodes[0], nodes[-1]
    relays = 2 * (samples + batches * MAX_RELAYS_IN_FLIGHT + MAX_RELAYS_IN_FLIGHT) + 16
    net = KmeNetwork(
        list(zip(nodes, nodes[1:])), {"sae-first": first, "sae-last": last},
        store_dir=store_dir, config={"stock_keys": MAX_RELAYS_IN_FLIGHT},
    )  # fmt: skip
    try:
        # One block per link: each of its two streams gets enough for `relays` relays.
        net.add_material_all(2 * relays * RELAY_BYTES)
        net.pump()  # the stocks fill at both ends
        assert net.count(first, last, first) == MAX_RELAYS_IN_FLIGHT, "the source's stock did not fill"
        src = net.kme(first)
        store = net.store(first)
        pc = time.perf_counter
        single: list[float] = []
        confirmed0 = src.statistics().keys_confirmed
        for _ in range(samples):
            store.take_ready(last, first, 1, KEY_BITS)  # the stock is one short (not timed)
            t0 = pc()
            src.handle_timer(net.now)  # a tick: the supply starts one relay
            net.pump()  # every hop, then relay_ok back to the source
            single.append(pc() - t0)
        batch: list[float] = []
        for _ in range(batches):
            store.take_ready(last, first, MAX_RELAYS_IN_FLIGHT, KEY_BITS)
            t0 = pc()
            src.handle_timer(net.now)
            net.pump()
            batch.append((pc() - t0) / MAX_RELAYS_IN_FLIGHT)
        st = src.statistics()
        ok = st.keys_confirmed - confirmed0 == samples + batches * MAX_RELAYS_IN_FLIGHT and st.relays_failed == 0
        return {
            "kmes": n_kmes, "hops": n_kmes - 1, "samples": samples,
            "ms_per_relay": {**_ms(single), "mean": round(statistics.fmean(single) * 1e3, 3)},
            "batch_ms_per_relay": round(statistics.median(batch) * 1e3, 3) if batch else None,
            "all_confirmed": ok,
        }  # fmt: skip
    finally:
        net.close()


def bench_relay(tmp: Path, samples: int, batches: int) -> None:
    for kind in ("file", "memory"):
        n = samples if kind == "file" else max(samples // 2, 20)
        rows = []
        for n_kmes in (2, 3, 5):
            store_dir = None
            if kind == "file":
                store_dir = tmp / f"chain{n_kmes}"
                store_dir.mkdir()
            row = {"bench": "kms_relay_chain", "store": kind, **_relay_chain(n_kmes, store_dir, n, batches)}
            emit(row)
            rows.append(row)
        hops = np.array([r["hops"] for r in rows], dtype=float)
        p50 = np.array([r["ms_per_relay"]["p50"] for r in rows])
        slope, intercept = np.polyfit(hops, p50, 1)
        bslope, bintercept = np.polyfit(hops, np.array([r["batch_ms_per_relay"] for r in rows]), 1)
        emit({
            "bench": "kms_relay_per_hop", "store": kind, "hops": hops.astype(int).tolist(), "p50_ms": p50.tolist(),
            "ms_per_hop": round(float(slope), 3), "ms_fixed": round(float(intercept), 3),
            "batch_ms_per_hop": round(float(bslope), 3), "batch_ms_fixed": round(float(bintercept), 3),
        })  # fmt: skip


# ====================================================================== 1b. baseline: the KME cores alone


def _keys_needed(levels: Sequence[tuple[int, int]]) -> int:
    """Keys served per direction over all levels (+ slack: a level may split unevenly)."""
    return math.ceil(sum(n for _, n in levels) / 2) + 8


def bench_core(tmp: Path, levels: Sequence[tuple[int, int]]) -> dict[int, float]:
    stock = _keys_needed(levels) * STOCK_PER_KEY
    store_dir = tmp / "core"
    store_dir.mkdir()
    net = KmeNetwork(
        [("alice", "relay"), ("relay", "bob")], {"alice-app": "alice", "bob-app": "bob"},
        policies={PAIR: PairPolicy("qkd", "fail")}, store_dir=store_dir, config={"stock_keys": STOCK_ALL},
    )  # fmt: skip
    rates: dict[int, float] = {}
    pc = time.perf_counter
    try:
        t0 = pc()
        net.add_material_all(2 * stock * RELAY_BYTES)  # both streams of each link: `stock` relays each
        net.pump()
        fill_s = pc() - t0
        have = [net.count(m, s, m) for m, _, s, _ in DIRECTIONS]

        def one(d: int, lat: tuple[list[float], list[float]] | None) -> bool:
            mn, ms, sn, ss = DIRECTIONS[d]
            t0 = pc()
            req = net.enc(mn, ms, ss)
            net.pump()
            res = net.result(mn, req)
            t1 = pc()
            if not isinstance(res, RequestDone):
                return False
            k = res.keys[0]
            req2 = net.dec(sn, ss, ms, [k.key_id])
            net.pump()
            res2 = net.result(sn, req2)
            t2 = pc()
            if lat is not None:
                lat[0].append(t1 - t0)
                lat[1].append(t2 - t1)
            return isinstance(res2, RequestDone) and res2.keys[0].key == k.key

        emit({"bench": "kms_core_stock", "mode": "in-memory", "relays": sum(have), "fill_s": round(fill_s, 3),
              "relays_per_s": round(sum(have) / fill_s, 1), "stock": have, "hops": 2})  # fmt: skip
        for clients, n in levels:
            failed = 0
            if clients == 1:
                lat: tuple[list[float], list[float]] = ([], [])
                t0 = pc()
                for i in range(n):
                    failed += not one(i % 2, lat)
                wall = pc() - t0
                emit({"bench": "kms_latency", "mode": "in-memory", "clients": 1, "enc_keys_ms": _ms(lat[0]),
                      "dec_keys_ms": _ms(lat[1]), "enc_plus_dec_ms": _ms([a + b for a, b in zip(*lat)])})  # fmt: skip
            else:
                rounds = max(1, n // clients)
                n = rounds * clients
                t0 = pc()
                for _ in range(rounds):
                    encs = [(i % 2, net.enc(DIRECTIONS[i % 2][0], DIRECTIONS[i % 2][1], DIRECTIONS[i % 2][3]))
                            for i in range(clients)]  # fmt: skip
                    net.pump()
                    decs = []
                    for d, req in encs:
                        res = net.result(DIRECTIONS[d][0], req)
                        if not isinstance(res, RequestDone):
                            failed += 1
                            continue
                        mn, ms, sn, ss = DIRECTIONS[d]
                        decs.append((sn, net.dec(sn, ss, ms, [res.keys[0].key_id]), res.keys[0].key))
                    net.pump()
                    for sn, req, key in decs:
                        res = net.result(sn, req)
                        failed += not (isinstance(res, RequestDone) and res.keys[0].key == key)
                wall = pc() - t0
            rates[clients] = (n - failed) / wall
            emit({"bench": "kms_serve", "mode": "in-memory", "store": "file", "clients": clients, "keys": n,
                  "failed": failed, "wall_s": round(wall, 3), "keys_per_s": round(rates[clients], 1)})  # fmt: skip
    finally:
        net.close()
    return rates


# ====================================================================== 1a / 2. a real run over HTTPS


def _scenario(key_bits: int, stock_keys: int, link_cap_s: float, quiet_s: float) -> dict[str, Any]:
    def link(a: str, b: str) -> dict[str, Any]:
        return {"endpoints": [a, b], "length_km": 10, "attenuation_db_per_km": 0.21,
                "qkd": {"transmitter": a, **QKD_LINK}}  # fmt: skip

    start2 = link_cap_s + 1.0
    end_s = start2 + link_cap_s + quiet_s
    return {
        "name": "bench-kms",
        "description": "bench/bench_kms.py: a KMS stock from two QKD links, then quiet for the ETSI 014 client",
        "seed": 7,
        "duration": f"{end_s + 5:.0f}s",
        "time_scale": 1,
        "nodes": {"alice": {}, "relay": {}, "bob": {}},
        "links": [link("alice", "relay"), link("relay", "bob")],
        "kms": {
            "saes": [{"id": "alice-app", "node": "alice"}, {"id": "bob-app", "node": "bob"}],
            "policies": [{"saes": ["alice-app", "bob-app"], "policy": "qkd", "on_empty": "wait", "wait": "5s"}],
            "key_size": KEY_BITS,
            "stock_keys": stock_keys,
            # Relays alice -> bob started while only the first link has material wait at
            # relay for the second link's: a longer timeout than the default 2 s wastes less
            # of alice's material. Not much longer: a relay whose confirmation was lost (KMS
            # messages are dropped while a node link is down, e.g. probes missed on a busy
            # machine) holds one of the 16 relays in flight until then.
            "relay_timeout": f"{RELAY_TIMEOUT_S:g}s",
        },
        "apps": [
            {"kind": "qkd", "name": "qkd-alice-relay", "nodes": ["alice", "relay"], "duration": f"{link_cap_s:.0f}s",
             "key_bits": key_bits},
            {"kind": "qkd", "name": "qkd-relay-bob", "nodes": ["relay", "bob"], "start": f"{start2:.0f}s",
             "duration": f"{link_cap_s:.0f}s", "key_bits": key_bits},
            # A run ends when all its apps are done: this one, due after the quiet period,
            # keeps it going. The bench stops the run before it starts (it would use keys).
            {"kind": "tunnel", "name": "sentinel", "nodes": ["alice", "bob"], "saes": ["alice-app", "bob-app"],
             "start": f"{end_s:.0f}s", "duration": "1s"},
        ],  # fmt: skip
    }


class _Sae:
    """The two SAEs' client contexts and the KMEs' URLs."""

    def __init__(self, urls: dict[str, str], contexts: dict[str, Any]) -> None:
        self.urls = urls  # KME node -> ETSI 014 base URL
        self.contexts = contexts  # KME node -> ssl context of the SAE attached to it

    def clients(self) -> dict[str, EtsiClient]:
        return {node: EtsiClient(self.urls[node], self.contexts[node], timeout_s=20.0) for node in ("alice", "bob")}


async def _stock(sae: _Sae) -> list[int]:
    out = []
    clients = sae.clients()
    try:
        for mn, _, _, ss in DIRECTIONS:
            status, body = await clients[mn].status(ss)
            out.append(int(body["stored_key_count"]) if status == 200 else -1)
    finally:
        for c in clients.values():
            await c.aclose()
    return out


async def _wait_stock(sae: _Sae, need: int, timeout_s: float) -> tuple[list[int], float]:
    """The stock of both directions once it stopped growing: for 1.5 s if both hold `need`
    keys, else for relay_timeout + 1.5 s (a relay whose confirmation was lost is retried)."""
    t0 = time.perf_counter()
    last, since = await _stock(sae), time.perf_counter()
    while time.perf_counter() - t0 < timeout_s:
        await trio.sleep(0.25)
        now = await _stock(sae)
        if now != last:
            last, since = now, time.perf_counter()
        elif time.perf_counter() - since >= (1.5 if min(last) >= need else RELAY_TIMEOUT_S + 1.5):
            break
    return last, time.perf_counter() - t0


async def _serve_level(sae: _Sae, clients: int, n: int) -> dict[str, Any]:
    errors: Counter[str] = Counter()
    mismatches = 0
    lat_enc: list[float] = []
    lat_dec: list[float] = []
    remaining = n
    ready = 0
    go = trio.Event()
    pc = time.perf_counter
    conns = [sae.clients() for _ in range(clients)]

    async def one(c: dict[str, EtsiClient], d: int) -> None:
        nonlocal mismatches
        mn, ms, sn, ss = DIRECTIONS[d]
        t0 = pc()
        try:
            status, body = await c[mn].enc_keys(ss, 1)
        except EtsiClientError as exc:
            errors[f"enc {exc.why.split(':')[0]}"] += 1
            return
        t1 = pc()
        if status != 200:
            errors[f"enc {status}"] += 1
            return
        key = body["keys"][0]
        try:
            status, body = await c[sn].dec_keys(ms, [key["key_ID"]])
        except EtsiClientError as exc:
            errors[f"dec {exc.why.split(':')[0]}"] += 1
            return
        t2 = pc()
        if status != 200:
            errors[f"dec {status}"] += 1
            return
        if body["keys"][0]["key"] != key["key"]:
            mismatches += 1
        lat_enc.append(t1 - t0)
        lat_dec.append(t2 - t1)

    async def worker(i: int) -> None:
        nonlocal remaining, ready
        c = conns[i]
        for mn, _, _, ss in DIRECTIONS:  # opens this client's HTTPS connection to each KME (uses no key)
            try:
                await c[mn].status(ss)
            except EtsiClientError:
                errors["status"] += 1
        ready += 1
        if ready == clients:
            go.set()
        await go.wait()
        j = i
        while remaining > 0:
            remaining -= 1
            await one(c, j % 2)
            j += 1

    t_start = cpu_start = 0.0
    try:
        async with trio.open_nursery() as nursery:
            for i in range(clients):
                nursery.start_soon(worker, i)
            await go.wait()
            t_start, cpu_start = pc(), time.process_time()
        wall = pc() - t_start
        cpu = time.process_time() - cpu_start
    finally:
        for c in conns:
            for x in c.values():
                await x.aclose()
    served = len(lat_enc)
    return {
        "clients": clients, "keys": n, "served": served, "errors": dict(errors), "mismatches": mismatches,
        "wall_s": round(wall, 3), "keys_per_s": round(served / wall, 1), "client_cpu_s": round(cpu, 3),
        "enc_keys_ms": _ms(lat_enc), "dec_keys_ms": _ms(lat_dec),
        "enc_plus_dec_ms": _ms([a + b for a, b in zip(lat_enc, lat_dec)]),
    }  # fmt: skip


async def _client_main(
    sae: _Sae, levels: Sequence[tuple[int, int]], baseline: dict[int, float], need: int
) -> dict[str, Any]:
    stock, waited_s = await _wait_stock(sae, need, timeout_s=60.0)
    # Keys each direction can serve from this stock; scale the levels down if it is short.
    can = min(stock) // STOCK_PER_KEY - 2 * len(levels)
    want = math.ceil(sum(n for _, n in levels) / 2)
    scale = min(1.0, can / want) if want else 1.0
    for clients, n in levels:
        n = max(clients, int(n * scale))
        rec = await _serve_level(sae, clients, n)
        rec["stock_after"] = await _stock(sae)
        base = baseline.get(clients)
        emit({"bench": "kms_serve", "mode": "processes", "protocol": "ETSI GS QKD 014 over HTTPS (mutual TLS)",
              "key_bits": KEY_BITS, **{k: rec[k] for k in ("clients", "keys", "served", "errors", "mismatches",
                                                             "wall_s", "keys_per_s", "client_cpu_s")},
              "enc_p50_ms": rec["enc_keys_ms"].get("p50"), "dec_p50_ms": rec["dec_keys_ms"].get("p50"),
              "stock_after": rec["stock_after"],
              "in_memory_over_processes": round(base / rec["keys_per_s"], 1) if base and rec["keys_per_s"] else None,
              "loadavg_1": round(os.getloadavg()[0], 2)})  # fmt: skip
        if clients == 1:
            emit({"bench": "kms_latency", "mode": "processes", "clients": 1, "enc_keys_ms": rec["enc_keys_ms"],
                  "dec_keys_ms": rec["dec_keys_ms"], "enc_plus_dec_ms": rec["enc_plus_dec_ms"]})  # fmt: skip
    return {"stock": stock, "stock_wait_s": round(waited_s, 2), "scale": round(scale, 3)}


def bench_processes(tmp: Path, levels: Sequence[tuple[int, int]], baseline: dict[int, float]) -> None:
    need = _keys_needed(levels) * STOCK_PER_KEY
    # Each link stream feeds one direction's relays; two streams per link; 50 % margin for
    # the relays alice starts while only the first link has material (timed out, withdrawn).
    key_bits = int(need * RELAY_BYTES * 8 * 2 * 1.5)
    link_cap_s = math.ceil(key_bits / LINK_BPS_ESTIMATE) + 5
    record: dict[str, Any] = {"bench": "kms_run", "key_bits_per_link": key_bits, "stock_needed": need}
    t0 = time.perf_counter()
    run = RealKmsRun(_scenario(key_bits, STOCK_ALL, link_cap_s, quiet_s=300), tmp)
    try:
        manifest = run.wait_manifest(60)
        creds = {node: run.certs(sae, tmp / "sae") for node, sae in (("alice", "alice-app"), ("bob", "bob-app"))}
        contexts = {node: client_ssl_context(*creds[node]) for node in creds}
        urls = {node: manifest["kmes"][node]["etsi014"] for node in ("alice", "bob")}
        done = run.wait_apps(["qkd-alice-relay", "qkd-relay-bob"], timeout_s=2 * link_cap_s + 60)
        record["qkd_phase_wall_s"] = round(time.perf_counter() - t0, 1)
        record["final_key_bits"] = {a: e.get("metrics", {}).get("final_key_bits") for a, e in done.items()}
        record |= trio.run(_client_main, _Sae(urls, contexts), levels, baseline, need)
    except (RunFailed, EtsiClientError, subprocess.CalledProcessError) as exc:
        record["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        record["exit_code"] = run.stop()
        record["run_wall_s"] = round(time.perf_counter() - t0, 1)
    record["run_status"] = (run.results() or {}).get("status")
    record["deliveries"] = _deliveries(run.run_dir)
    record["loadavg_1_5_15"] = [round(x, 2) for x in os.getloadavg()]  # > ~2 on 2 cores: disturbed
    emit(record)


def _deliveries(run_dir: Path) -> dict[str, int]:
    """The KMEs' delivery records (RUN/<node>/kms-deliveries.jsonl: key id, SAE, role,
    salted fingerprint; nodes/kms/service.py): what the run's key_mismatches and
    duplicate_deliveries metrics count — a stopped run does not collect them itself."""
    fps: dict[str, set[str]] = {}
    seen: Counter[tuple[str, str]] = Counter()
    masters = 0
    for path in run_dir.glob("*/kms-deliveries.jsonl"):
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            fps.setdefault(row["key_id"], set()).add(row["fp"])
            seen[(row["key_id"], row["sae"])] += 1
            masters += row["role"] == "master"
    return {
        "keys_delivered": masters,
        "key_mismatches": sum(len(f) > 1 for f in fps.values()),
        "duplicate_deliveries": sum(n - 1 for n in seen.values()),
    }


# ====================================================================== main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer keys and samples (noisier numbers)")
    parser.add_argument("--no-processes", action="store_true", help="skip the real `qnetem run` (in-memory parts only)")
    parser.add_argument(
        "--keep", type=Path, metavar="DIR", help="work in DIR (must not exist) and keep it: stores, run directory"
    )
    args = parser.parse_args()
    if args.quick:
        levels = ((1, 40), (8, 48), (32, 64))
        min_loop_s, breakdown_n, samples, batches = 0.05, 20, 40, 4
    else:
        levels = ((1, 200), (8, 200), (32, 256))
        min_loop_s, breakdown_n, samples, batches = 0.2, 100, 150, 10
    emit(environment_record() | {"loadavg_1_5_15": [round(x, 2) for x in os.getloadavg()]})
    with contextlib.ExitStack() as stack:
        if args.keep is not None:
            args.keep.mkdir(parents=True)
            tmp = args.keep
        else:
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="qnetem-bench-kms-")))
        bench_hybrid(min_loop_s, breakdown_n)
        bench_relay(tmp, samples, batches)
        baseline = bench_core(tmp, levels)
        if not args.no_processes:
            run_dir = tmp / "processes"
            run_dir.mkdir()
            bench_processes(run_dir, levels, baseline)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
