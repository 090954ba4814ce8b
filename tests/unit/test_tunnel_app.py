"""The `tunnel` app (nodes/apps/tunnel.py): both ends driven by an in-test harness.

The harness implements the app actions with fakes: a fake KME (ETSI GS QKD 014
semantics: enc_keys makes a random key and a UUID, dec_keys hands it once to the right
slave SAE, 400 for unknown or consumed ids, 401 for the wrong SAE, 503 in chosen time
windows), RoutedSend as a fixed delay, UDP as a seeded `LossyChannel` (drop, duplicate,
reorder by jitter) with a tamper hook, and a fake clock that jumps to the next event.
Seeds are fixed; every run is deterministic.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import heapq
import json
import struct
import uuid
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from nodes.apps import APP_KINDS
from nodes.apps.base import (
    AppContext,
    AppParamError,
    AppState,
    KmsCall,
    KmsOp,
    KmsReply,
    RoutedSend,
    UdpOpen,
    UdpOpened,
    UdpSend,
)
from nodes.apps.tunnel import (
    HEADER,
    RESULT_KEYS,
    ReplayWindow,
    TunnelApp,
    TunnelRole,
    derive_traffic_key,
    parse_header,
)
from nodes.testing import LossyChannel

SENDER_SAE, RECEIVER_SAE = "alice-app", "bob-app"
PAYLOAD = 512


class FakeKme:
    """Both KMEs in one: the keys table is shared, as the real pair keeps identical copies."""

    def __init__(self, rng: np.random.Generator) -> None:
        self._rng = rng
        self.keys: dict[str, tuple[bytes, str, str]] = {}  # key_ID -> (key, master, slave)
        self.issued_at: dict[str, float] = {}
        self.consumed: set[str] = set()
        self.outages: list[tuple[float, float, set[KmsOp]]] = []  # [start, end) -> 503 for these ops
        self.silent: tuple[float, float] = (0.0, 0.0)  # [start, end): calls get no answer at all
        self.incomplete: tuple[float, float] = (0.0, 0.0)  # [start, end): status 0 (call did not complete)
        self.refuse_master: set[str] = set()  # enc_keys from these SAEs -> 401
        self.calls: list[tuple[float, KmsOp, int]] = []

    def all_key_bytes(self) -> list[bytes]:
        return [k for k, _, _ in self.keys.values()]

    def call(self, c: KmsCall, now: float) -> KmsReply:
        reply = self._answer(c, now)
        self.calls.append((now, c.op, reply.status))
        return reply

    def _answer(self, c: KmsCall, now: float) -> KmsReply:
        if self.incomplete[0] <= now < self.incomplete[1]:
            return KmsReply(0, {"message": "TLS handshake failed"})
        for start, end, ops in self.outages:
            if start <= now < end and c.op in ops:
                return KmsReply(503, {"message": "no key material available"})
        if c.op is KmsOp.ENC_KEYS:
            if c.sae in self.refuse_master:
                return KmsReply(401, {"message": "SAE not authorised"})
            key = self._rng.bytes((c.size_bits or 256) // 8)
            key_id = str(uuid.UUID(bytes=self._rng.bytes(16), version=4))
            self.keys[key_id] = (key, c.sae, c.peer_sae)
            self.issued_at[key_id] = now
            return KmsReply(200, {"keys": [{"key_ID": key_id, "key": base64.b64encode(key).decode()}]})
        if c.op is KmsOp.DEC_KEYS:
            (key_id,) = c.key_ids
            entry = self.keys.get(key_id)
            if entry is None or key_id in self.consumed:
                return KmsReply(400, {"message": "key_ID not found"})
            key, master, slave = entry
            if slave != c.sae or master != c.peer_sae:
                return KmsReply(401, {"message": "key not destined to this SAE"})
            self.consumed.add(key_id)
            return KmsReply(200, {"keys": [{"key_ID": key_id, "key": base64.b64encode(key).decode()}]})
        return KmsReply(400, {"message": "unsupported"})


class Harness:
    """Sender on node `alice`, receiver on node `bob`, both app instances named `tun`."""

    def __init__(
        self,
        *,
        seed: int = 7,
        duration_s: float = 10.0,
        sender: dict[str, Any] | None = None,
        receiver: dict[str, Any] | None = None,
        drop: float = 0.0,
        duplicate: float = 0.0,
        jitter_s: float = 0.0,
        udp_delay_s: float = 0.002,
        routed_delay_s: float = 0.01,
        kme_latency_s: float = 0.005,
    ) -> None:
        rng = np.random.default_rng(seed)
        self.kme = FakeKme(np.random.default_rng(seed + 1))
        self.now = 0.0
        self.kme_latency_s = kme_latency_s
        self.routed_delay_s = routed_delay_s
        common = {"duration_s": duration_s, "rate_pps": 50.0, "payload_bytes": PAYLOAD, "rekey_interval_s": 2.0}
        self.apps: dict[str, TunnelApp] = {}
        for node, sae, peer, peer_sae, role, extra in (
            ("alice", SENDER_SAE, "bob", RECEIVER_SAE, "sender", sender),
            ("bob", RECEIVER_SAE, "alice", SENDER_SAE, "receiver", receiver),
        ):
            ctx = AppContext(node=node, name="tun", seed=seed, time_scale=1.0, memory_qubits=0, links={}, saes=(sae,))
            params = {"role": role, "sae": sae, "peer_sae": peer_sae, "peer": peer, **common, **(extra or {})}
            self.apps[node] = TunnelApp(ctx, TunnelApp.parse_params(params, ctx))
        self.sender, self.receiver = self.apps["alice"], self.apps["bob"]
        self.hosts = {"alice": "10.0.0.1", "bob": "10.0.0.2"}
        self.bound: dict[tuple[str, int], str] = {}
        self.udp = LossyChannel(rng, delay_s=udp_delay_s, jitter_s=jitter_s, drop=drop, duplicate=duplicate)
        self._events: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = 0
        self.tamper: Callable[[int, bytes], bytes] | None = None
        self.sent: list[bytes] = []  # every datagram the sender emitted (before tampering)
        self.delivered: list[tuple[float, bytes]] = []  # every datagram delivered to the receiver
        self.action_reprs: list[str] = []
        self.routed: list[tuple[str, dict[str, Any]]] = []

    # ------------------------------------------------------------------ the fakes

    def at(self, t: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self._events, (t, self._seq, fn))
        self._seq += 1

    def inject(self, t: float, data: bytes) -> None:
        """A datagram (e.g. a replayed copy) reaches the receiver's socket at `t`."""
        self.at(t, lambda: self._deliver(data))

    def _deliver(self, data: bytes) -> None:
        self.delivered.append((self.now, data))
        self.receiver.handle_datagram(("10.0.0.1", 40000), data, self.now)

    def _do(self, node: str, action: Any) -> None:
        app = self.apps[node]
        self.action_reprs.append(repr(action))
        now = self.now
        if isinstance(action, UdpOpen):
            port = 40000 + len(self.bound)
            self.bound[(self.hosts[node], port)] = node
            self.at(now, lambda: app.handle_reply(action.tag, UdpOpened(self.hosts[node], port), self.now))
        elif isinstance(action, KmsCall):
            reply = self.kme.call(action, now)
            if self.kme.silent[0] <= now < self.kme.silent[1]:
                return
            self.at(now + self.kme_latency_s, lambda: app.handle_reply(action.tag, reply, self.now))
        elif isinstance(action, RoutedSend):
            body = copy.deepcopy(action.body)
            self.routed.append((node, body))
            target = self.apps.get(action.node)
            if target is not None and action.app == target.ctx.name:
                self.at(now + self.routed_delay_s, lambda: target.handle_peer_message(node, body, self.now))
        elif isinstance(action, UdpSend):
            assert self.bound.get(action.addr) == "bob", action.addr
            data = action.data
            index = len(self.sent)
            self.sent.append(data)
            if self.tamper is not None:
                data = self.tamper(index, data)
            self.udp.send(data, now)
        else:  # pragma: no cover - the app emits nothing else
            raise AssertionError(f"unexpected action {action!r}")

    def _drain(self) -> None:
        moved = True
        while moved:
            moved = False
            for node, app in self.apps.items():
                while (action := app.next_action()) is not None:
                    self._do(node, action)
                    moved = True

    def run(self, max_t_s: float = 60.0) -> None:
        self.receiver.start(self.now)
        self.sender.start(self.now)
        while True:
            self._drain()
            if all(a.finished for a in self.apps.values()):
                return
            candidates = [t for a in self.apps.values() if (t := a.get_timer()) is not None]
            if self._events:
                candidates.append(self._events[0][0])
            if (t := self.udp.next_delivery()) is not None:
                candidates.append(t)
            assert candidates, "nothing left to happen but the apps have not finished"
            self.now = max(self.now, min(candidates))
            assert self.now <= max_t_s, "the run did not finish in time"
            while self._events and self._events[0][0] <= self.now:
                heapq.heappop(self._events)[2]()
            for data in self.udp.receive(self.now):
                self._deliver(data)
            for app in self.apps.values():
                t = app.get_timer()
                if t is not None and t <= self.now:
                    app.handle_timer(self.now)


def _run(**kw: Any) -> Harness:
    h = Harness(**kw)
    h.run()
    return h


# ---------------------------------------------------------------------- traffic


def test_a_clean_run_carries_every_datagram_and_rekeys_on_schedule() -> None:
    h = _run(duration_s=10.0)
    s, r = h.sender.results(), h.receiver.results()
    assert h.sender.state is AppState.DONE and h.receiver.state is AppState.DONE, (s, r)
    assert set(s) == set(r) == set(RESULT_KEYS)
    # The tunnel is up after the address (10 ms) and the first key (5 ms): 50 pps for the rest of 10 s.
    assert 490 <= s["datagrams_sent"] <= 500 and s["datagrams_unsent"] == 0
    assert s["bytes_carried"] == s["datagrams_sent"] * PAYLOAD
    assert r["datagrams_authentic"] == r["datagrams_received"] == s["datagrams_sent"]
    assert r["datagrams_sent"] == s["datagrams_sent"]  # reported by the sender's `done`
    assert r["bytes_carried"] == r["datagrams_authentic"] * PAYLOAD
    assert r["content_errors"] == r["auth_failures"] == r["replays"] == r["malformed"] == 0
    # Rekeys: the first key is no rekey and the last interval is cut by the end, so a run
    # of duration D switches D / rekey_interval - 1 times (+1 if the end fell just after a
    # switch): here 10 / 2 - 1 = 4, allowed 4..5.
    assert 4 <= s["rekeys"] <= 5 and r["rekeys"] == s["rekeys"]
    assert s["keys_fetched"] == r["keys_fetched"] == s["rekeys"] + 1
    assert s["key_fetch_failures"] == r["key_fetch_failures"] == 0 and s["last_error"] is None
    assert 9.9 < r["traffic_s"] <= 10.0 and r["bytes_per_s"] == pytest.approx(50 * PAYLOAD, rel=0.01)
    # The receiver stopped announcing its address once traffic flowed.
    addr_msgs = [b for node, b in h.routed if node == "bob" and b["op"] == "addr"]
    assert len(addr_msgs) == 1
    assert sum(1 for node, b in h.routed if node == "alice" and b["op"] == "done") == 3


def test_the_wire_format_is_the_documented_one() -> None:
    """Decrypt what the sender emitted with an independent implementation of the module
    docstring's construction (header layout, HKDF info, SP 800-38D nonce, AAD)."""
    h = _run(duration_s=3.0)
    seen: set[tuple[bytes, int]] = set()
    per_key_seq: dict[bytes, int] = {}
    for number, data in enumerate(h.sent):
        assert data[0] == 1 and len(data) == 25 + PAYLOAD + 16
        key_id, seq = data[1:17], int.from_bytes(data[17:25], "big")
        assert (key_id, seq) not in seen  # never a nonce twice under one key
        seen.add((key_id, seq))
        assert seq == per_key_seq.get(key_id, 0) + 1  # 1, 2, 3, ... per key
        per_key_seq[key_id] = seq
        master = h.kme.keys[str(uuid.UUID(bytes=key_id))][0]
        info = b"qnetem-tunnel" + key_id + b"\x00\x09alice-app" + b"\x00\x07bob-app"
        traffic_key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(master)
        nonce = bytes(4) + struct.pack(">Q", seq)
        payload = AESGCM(traffic_key).decrypt(nonce, data[25:], data[:25])
        seed, n = struct.unpack(">QQ", payload[:16])
        assert n == number
        assert payload[16:] == hashlib.shake_128(b"qnetem-tunnel-pattern" + payload[:16]).digest(PAYLOAD - 16)
    assert len(per_key_seq) == h.sender.results()["keys_fetched"] >= 2


def test_loss_duplicates_and_reordering_are_handled_exactly() -> None:
    # Jitter 50 ms against 20 ms between datagrams reorders neighbours; it stays far inside
    # the 64-datagram (1.28 s) replay window.
    h = _run(duration_s=10.0, drop=0.05, duplicate=0.1, jitter_s=0.05)
    s, r = h.sender.results(), h.receiver.results()
    assert h.receiver.state is AppState.DONE
    distinct = len({d for _, d in h.delivered})
    assert h.udp.dropped > 10 and h.udp.duplicated > 20  # the channel really was lossy
    pairs = zip(h.delivered, h.delivered[1:])
    reordered = sum(1 for (_, a), (_, b) in pairs if a[1:17] == b[1:17] and b[17:25] < a[17:25])
    assert reordered > 10
    assert r["datagrams_received"] == len(h.delivered)
    assert r["datagrams_authentic"] == distinct  # every distinct datagram once ...
    assert r["replays"] == len(h.delivered) - distinct  # ... every duplicate dropped
    assert r["auth_failures"] == r["content_errors"] == r["stale_key"] == r["dropped_no_key"] == 0
    assert r["bytes_carried"] == distinct * PAYLOAD
    assert r["datagrams_sent"] == s["datagrams_sent"] > distinct


def test_a_tampered_datagram_is_an_auth_failure_and_the_tunnel_goes_on() -> None:
    def tamper(index: int, data: bytes) -> bytes:
        b = bytearray(data)
        # Indices in mid-key (keys change every ~100 datagrams, near 100, 200, 300, ...).
        if index == 120:
            b[40] ^= 0x01  # ciphertext
        elif index == 230:
            b[17] ^= 0x80  # the sequence number (AAD and nonce); must not move the replay window
        elif index == 330:
            b[5] ^= 0xFF  # the key id: unknown to the KME, which answers dec_keys with 400
        elif index == 370:
            b[-1] ^= 0x01  # the tag
        elif index == 380:
            return bytes(b[:30])  # truncated below header + tag
        return bytes(b)

    h = Harness(duration_s=10.0)
    h.tamper = tamper
    h.run()
    s, r = h.sender.results(), h.receiver.results()
    assert h.receiver.state is AppState.DONE and h.sender.state is AppState.DONE
    assert r["auth_failures"] == 4 and r["malformed"] == 1
    assert r["key_fetch_failures"] == 1 and r["key_fetch_failures_by_status"] == {"400": 1}
    assert "400" in (r["last_error"] or "")
    assert r["datagrams_authentic"] == s["datagrams_sent"] - 5
    assert r["bytes_carried"] == r["datagrams_authentic"] * PAYLOAD and r["content_errors"] == 0
    # ... and traffic after the tampering still got through
    assert max(t for t, _ in h.delivered) > 9.0


def test_replays_are_dropped() -> None:
    h = Harness(duration_s=10.0)
    # The 11th datagram again 5 s later (far left of the window, its key still held), the
    # 300th 10 ms after it was sent (inside the window, already seen), the 2nd again at
    # 9.5 s (its key retired after four newer ones).
    h.at(5.0, lambda: h.inject(h.now, h.sent[10]))
    h.at(6.0, lambda: h.inject(h.now + 0.01, h.sent[-1]))
    h.at(9.5, lambda: h.inject(h.now, h.sent[1]))
    h.run()
    s, r = h.sender.results(), h.receiver.results()
    assert r["replays"] == 2 and r["stale_key"] == 1
    assert r["datagrams_authentic"] == s["datagrams_sent"]
    assert r["bytes_carried"] == s["datagrams_sent"] * PAYLOAD


# ---------------------------------------------------------------------- the KME fails


def test_kme_503_is_retried_counted_and_recovered_from() -> None:
    h = Harness(duration_s=14.0)
    # No key between 3 s and 9 s: the key installed at ~2 s expires at ~8 s (3 rekey
    # intervals), so some slots find no key until the fetches succeed again.
    h.kme.outages.append((3.0, 9.0, {KmsOp.ENC_KEYS}))
    h.run()
    s, r = h.sender.results(), h.receiver.results()
    assert h.sender.state is AppState.DONE and h.receiver.state is AppState.DONE
    assert s["key_fetch_failures"] >= 5 and s["key_fetch_failures_by_status"] == {"503": s["key_fetch_failures"]}
    assert "503" in (s["last_error"] or "")
    failed = [t for t, op, status in h.kme.calls if op is KmsOp.ENC_KEYS and status == 503]
    assert len(failed) == s["key_fetch_failures"]
    assert all(b - a <= 2.0 + 1e-9 for a, b in zip(failed, failed[1:]))  # back-off capped at 2 s
    assert failed[1] - failed[0] < 0.2  # ... and starting small
    assert 0 < s["datagrams_unsent"] < 100
    late_keys = [k for k, t in h.kme.issued_at.items() if t >= 9.0]
    assert late_keys and s["rekeys"] >= 3
    assert r["datagrams_authentic"] == s["datagrams_sent"] and r["content_errors"] == 0
    assert any(t > 10.0 for t, _ in h.delivered)


def test_the_first_key_may_come_late() -> None:
    h = Harness(duration_s=6.0)
    h.kme.outages.append((0.0, 2.0, {KmsOp.ENC_KEYS}))
    h.run()
    s, r = h.sender.results(), h.receiver.results()
    assert h.sender.state is AppState.DONE and s["key_fetch_failures"] >= 3
    assert s["datagrams_unsent"] == 0  # slots start when the tunnel is up
    # Up between 2.0 s and 2.0 s + the last back-off (at most 2 s): 2..4 s of 50 pps.
    assert 100 <= s["datagrams_sent"] <= 200
    assert r["datagrams_authentic"] == s["datagrams_sent"]


def test_receiver_buffers_while_dec_keys_is_unavailable() -> None:
    h = Harness(duration_s=6.0)
    h.kme.outages.append((2.0, 3.0, {KmsOp.DEC_KEYS}))  # the key of ~2 s cannot be fetched for a while
    h.run()
    s, r = h.sender.results(), h.receiver.results()
    assert r["key_fetch_failures"] >= 2 and set(r["key_fetch_failures_by_status"]) == {"503"}
    # 1 s at 50 pps fits the per-key buffer (256): nothing is lost.
    assert r["datagrams_authentic"] == s["datagrams_sent"] and r["dropped_no_key"] == 0
    assert r["bytes_carried"] == s["datagrams_sent"] * PAYLOAD


def test_unanswered_and_incomplete_calls_are_retried() -> None:
    h = Harness(duration_s=6.0, sender={"fetch_timeout_s": 0.3}, receiver={"fetch_timeout_s": 0.3})
    h.kme.silent = (0.0, 1.0)
    h.kme.incomplete = (1.0, 2.0)
    h.run()
    s, r = h.sender.results(), h.receiver.results()
    assert h.sender.state is AppState.DONE and h.receiver.state is AppState.DONE
    by_status = s["key_fetch_failures_by_status"]
    assert set(by_status) == {"timeout", "0"} and by_status["timeout"] >= 2 and by_status["0"] >= 1
    assert "TLS handshake failed" in (s["last_error"] or "")
    assert s["keys_fetched"] >= 2 and r["datagrams_authentic"] == s["datagrams_sent"] > 100


def test_messages_from_the_wrong_node_are_ignored() -> None:
    h = Harness(duration_s=2.0)
    h.at(0.001, lambda: h.sender.handle_peer_message("mallory", {"op": "addr", "host": "6.6.6.6", "port": 6}, h.now))
    h.at(0.5, lambda: h.receiver.handle_peer_message("mallory", {"op": "done", "sent": 0}, h.now))
    h.at(0.6, lambda: h.sender.handle_peer_message("bob", {"op": "addr", "host": "x", "port": 70000}, h.now))
    h.run()
    assert h.sender.results()["bad_messages"] == 2 and h.receiver.results()["bad_messages"] == 1
    assert h.receiver.results()["datagrams_authentic"] == h.sender.results()["datagrams_sent"] > 80


def test_a_refused_enc_keys_fails_the_sender_with_the_status() -> None:
    h = Harness(duration_s=5.0)
    h.kme.refuse_master.add(SENDER_SAE)
    h.run()
    assert h.sender.state is AppState.FAILED
    assert h.sender.error is not None and "HTTP 401" in h.sender.error and SENDER_SAE in h.sender.error
    assert h.sender.results()["key_fetch_failures_by_status"] == {"401": 1}
    # The receiver hears `done` (with the reason) and gives up after its grace period.
    assert h.receiver.state is AppState.FAILED and h.now < 3.0
    assert "KME refused" in (h.receiver.error or "")


def test_a_misconfigured_receiver_fails_after_repeated_refusals() -> None:
    h = Harness(duration_s=5.0, sender={"rekey_interval_s": 0.5}, receiver={"peer_sae": "carol-app"})
    h.run()
    r = h.receiver.results()
    assert h.receiver.state is AppState.FAILED
    assert "HTTP 401" in (h.receiver.error or "") and "3 times" in (h.receiver.error or "")
    assert r["key_fetch_failures_by_status"] == {"401": 3} and r["datagrams_authentic"] == 0
    assert h.sender.state is AppState.DONE  # the sender does not know; it runs its duration


@pytest.mark.parametrize("rekey_interval_s", [2.0, 100.0])  # a rekey scheduled within the run, or none
def test_the_datagram_cap_per_key_forces_rekeys(rekey_interval_s: float) -> None:
    h = _run(duration_s=3.0, sender={"max_datagrams_per_key": 10, "rekey_interval_s": rekey_interval_s})
    s, r = h.sender.results(), h.receiver.results()
    seqs = [int.from_bytes(d[17:25], "big") for d in h.sent]
    assert max(seqs) <= 10
    assert len({(d[1:17], q) for d, q in zip(h.sent, seqs)}) == len(h.sent)
    # A spent key is replaced after one KME round trip (5 ms < 20 ms between datagrams),
    # in the slot that found it spent: one unsent slot per rekey.
    assert s["datagrams_unsent"] == s["rekeys"]
    assert s["rekeys"] == pytest.approx(s["datagrams_sent"] / 10, abs=1)
    assert r["datagrams_authentic"] == s["datagrams_sent"]


# ---------------------------------------------------------------------- secrets


def _leaks(secret: bytes, haystack: str) -> bool:
    forms = (secret.hex(), secret.hex().upper(), base64.b64encode(secret).decode(), repr(secret)[2:-1],
             secret.decode("latin-1"), base64.urlsafe_b64encode(secret).decode().rstrip("="))  # fmt: skip
    return any(f in haystack for f in forms)


@pytest.mark.parametrize("scenario", ["clean", "tamper-and-outage", "refused"])
def test_no_key_bytes_in_results_reprs_errors_or_actions(scenario: str) -> None:
    h = Harness(duration_s=5.0)
    if scenario == "tamper-and-outage":
        h.tamper = lambda i, d: d[:40] + bytes([d[40] ^ 1]) + d[41:] if i % 17 == 0 else d
        h.kme.outages.append((1.0, 3.0, {KmsOp.ENC_KEYS, KmsOp.DEC_KEYS}))
    elif scenario == "refused":
        h.kme.refuse_master.add(SENDER_SAE)
    h.run()
    secrets = list(h.kme.all_key_bytes())
    for key_id, (key, master, slave) in h.kme.keys.items():
        secrets.append(derive_traffic_key(key, uuid.UUID(key_id), master, slave))
    assert scenario == "refused" or len(secrets) >= 4
    haystack = "\n".join(
        [
            *h.action_reprs,
            *(json.dumps(a.results()) for a in h.apps.values()),
            *(repr(a.results()) for a in h.apps.values()),
            *(repr(a) + repr(vars(a)) + str(a.error) for a in h.apps.values()),
        ]
    )
    assert "key_fetch_failures" in haystack and "_RxKey(key_id=" in haystack or scenario == "refused"
    for secret in secrets:
        assert not _leaks(secret, haystack)


def test_the_leak_check_would_see_a_leak() -> None:
    secret = bytes(range(32))
    for form in (secret.hex(), base64.b64encode(secret).decode(), repr(secret)):
        assert _leaks(secret, f"x {form} y")


# ---------------------------------------------------------------------- pieces


def test_replay_window_follows_rfc_4303() -> None:
    w = ReplayWindow(64)
    assert not w.check(0)  # sequence numbers start at 1
    for seq in (1, 2, 5):
        assert w.check(seq)
        w.update(seq)
    assert not w.check(5) and not w.check(1)  # seen
    assert w.check(3) and w.check(4)  # inside the window, not seen
    w.update(100)
    assert w.check(37) and not w.check(36)  # 100 - 63 is the window's left edge
    w.update(37)
    assert not w.check(37) and not w.check(100)
    assert w.check(99)
    w.update(10_000)  # a jump wider than the window clears it
    assert not w.check(10_000) and w.check(9_999) and not w.check(9_936)
    # check() alone never moves the window (forgeries are checked, not recorded)
    w2 = ReplayWindow()
    assert w2.check(50) and w2.check(50)


def test_parse_header_rejects_short_and_foreign_datagrams() -> None:
    kid = uuid.uuid4()
    good = HEADER.pack(1, kid.bytes, 7) + bytes(16)
    header = parse_header(good)
    assert header is not None and header.key_id == kid and header.seq == 7 and header.pack() == good[:25]
    assert parse_header(good[:-1]) is None
    assert parse_header(HEADER.pack(2, kid.bytes, 7) + bytes(16)) is None


def _ctx(node: str = "alice", saes: tuple[str, ...] = (SENDER_SAE,)) -> AppContext:
    return AppContext(node=node, name="tun", seed=1, time_scale=1.0, memory_qubits=0, links={}, saes=saes)


BASE = {"role": "sender", "sae": SENDER_SAE, "peer_sae": RECEIVER_SAE, "peer": "bob", "duration_s": 5.0}


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"colour": "blue"}, "colour"),
        ({"role": "relay"}, "role"),
        ({"role": ["sender"]}, "role"),
        ({"sae": "carol-app"}, "sae"),
        ({"peer_sae": SENDER_SAE}, "peer_sae"),
        ({"peer_sae": 3}, "peer_sae"),
        ({"peer": ""}, "peer"),
        ({"duration_s": 0}, "duration_s"),
        ({"duration_s": None}, "duration_s"),
        ({"rate_pps": 0.0}, "rate_pps"),
        ({"payload_bytes": 15}, "payload_bytes"),
        ({"payload_bytes": 70_000}, "payload_bytes"),
        ({"key_size_bits": 260}, "key_size_bits"),
        ({"key_size_bits": 64}, "key_size_bits"),
        ({"key_lifetime_s": 1.0}, "key_lifetime_s"),  # shorter than the rekey interval
        ({"saes": [SENDER_SAE, RECEIVER_SAE]}, "saes"),  # both ways of naming the SAEs
        ({"peer_app": ""}, "peer_app"),
    ],
)
def test_bad_params_name_the_parameter(change: dict[str, Any], param: str) -> None:
    params = {k: v for k, v in {**BASE, **change}.items() if v is not None}
    with pytest.raises(AppParamError) as info:
        TunnelApp.parse_params(params, _ctx())
    assert info.value.param == param


def test_params_defaults_and_the_orchestrator_form() -> None:
    assert APP_KINDS["tunnel"] is TunnelApp
    p = TunnelApp.parse_params(BASE, _ctx())
    assert (p.rate_pps, p.payload_bytes, p.rekey_interval_s, p.key_size_bits) == (50.0, 512, 2.0, 256)
    assert p.key_lifetime_s == 6.0 and p.peer_app == "tun" and p.grace_s == 1.0
    # What emulator/runtime/orchestrator.py sends: the receiver initiates, saes = [sender, receiver].
    orch = {"saes": [SENDER_SAE, RECEIVER_SAE], "duration_s": 5.0, "rate_pps": 20.0, "payload_bytes": 100,
            "rekey_interval_s": 1.0, "key_size_bits": 512}  # fmt: skip
    s = TunnelApp.parse_params({"role": "responder", "peer": "bob", **orch}, _ctx())
    r = TunnelApp.parse_params({"role": "initiator", "peer": "alice", **orch}, _ctx("bob", (RECEIVER_SAE,)))
    assert (s.role, s.sae, s.peer_sae) == (TunnelRole.SENDER, SENDER_SAE, RECEIVER_SAE)
    assert (r.role, r.sae, r.peer_sae) == (TunnelRole.RECEIVER, RECEIVER_SAE, SENDER_SAE)
    assert s.key_size_bits == 512 and s.rate_pps == 20.0
    with pytest.raises(AppParamError) as info:  # the receiver's SAE on the sender's node
        TunnelApp.parse_params({"role": "initiator", "peer": "alice", **orch}, _ctx())
    assert info.value.param == "sae"
