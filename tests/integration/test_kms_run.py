"""Key management end to end: `qnetem run` with real KMEs, used from outside (issue 5).

Theory of operation
-------------------
Each run is a real `qnetem run` child process (broker and node processes on 127.0.0.1).
The test plays the *outside application* the KMEs exist for: once ``RUN/kms.json``
appears it asks ``qnetem certs RUN --sae ID`` for SAE credentials issued by the run's
CA, builds mutual-TLS contexts from them (``nodes.kms.https.client_ssl_context``) and
talks ETSI GS QKD 014 / Cisco SKIP to the KMEs with ``nodes.kms.client`` — the same
HTTPS path any application would take. What the KMEs answer is checked while the run
goes on; what they leave behind (results.json, events, logs, delivery logs, the SQLite
key stores) after it ended.

Runs (each started once, shared by the tests that need it):

* ``kms-etsi`` (module fixture `etsi_run`): alice — relay — bob, QKD on one link at a
  time, then a quiet period in which the test makes its ETSI / SKIP calls; the policy
  pairs qkd / pqc / hybrid; after the run, a scan of every file for key bytes.
* ``kms-empty`` (`empty_run`): two KMEs whose link never runs QKD (empty pools): the
  ``on_empty`` behaviours fail / wait / pqc.
* ``kms-crash``: bob's node (and KME) is killed with SIGKILL while the test keeps
  fetching keys at both ends, then restarted over its store; afterwards both stores and
  delivery logs are compared: nothing lost (beyond what nodes/kms/kme.py's crash
  recovery table allows), nothing delivered twice.
* ``scenarios/kms-ring.yaml`` (shipped): a fibre cut forces the key relay onto the other
  side of a ring.

The scenarios of the first three runs are the YAML texts below (written to tmp; the
``tests/data/scenarios/*.yaml`` files are the invalid-scenario fixtures of
tests/unit/test_scenario.py, which requires that directory to hold exactly those).

Pulse rate. The links run decoy-state BB84 at 5e8 pulses/s, not the 1e9 of the GYS
set: at 1 GHz the broker's sampling takes ~1.5 cores per link (bench/bench_optics.py)
and the receiving node ~0.5 more, which on a 2-core machine leaves nothing for the
KMEs and the test, and a receiver that falls behind loses detections (broker
``backlog_dropped_pulses``). At 5e8 a block of 1e6 signal key-basis bits (~72 kbit of
final key, ~0.62e9 pulses) takes ~1.25 s after a ~2.4 s first-block latency.

Key bytes never go into an assertion message: keys are compared through short SHA-256
digests (`digest`), so a failing comparison prints digests, not keys.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import datetime as dt
import hashlib
import json
import os
import re
import signal
import sqlite3
import ssl
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from emulator.certs import RunCa
from nodes.kms.client import EtsiClient, EtsiClientError, SkipClient
from nodes.kms.etsi014 import Error, KeyContainer, Status
from nodes.kms.https import client_ssl_context
from nodes.kms.store import KeyConsumed, KeyNotFound, KeyState, KeyStore, StoredKey

from .test_run import assert_nothing_left

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
RING = ROOT / "scenarios" / "kms-ring.yaml"
STATUS_FIELDS = {  # ETSI GS QKD 014 §6.1, every member but the optional status_extension
    "source_KME_ID", "target_KME_ID", "master_SAE_ID", "slave_SAE_ID", "key_size", "stored_key_count",
    "max_key_count", "max_key_per_request", "max_key_size", "min_key_size", "max_SAE_ID_count",
}  # fmt: skip

# ---------------------------------------------------------------------------------------
# Scenarios
# ---------------------------------------------------------------------------------------

_GYS_LINK = """\
    length_km: 10
    attenuation_db_per_km: 0.21
    # GYS parameters (Ma et al., PRA 72, 012326 (2005), Table I) at half the pulse rate
    # (module docstring); the transmitter is the first endpoint
    qkd: {pulse_rate_hz: 5e8, receiver_efficiency: 0.045, dark_count_probability: 1.7e-6, misalignment_error: 0.033}
"""

ETSI_SCENARIO = f"""\
# Outside SAEs against the KMEs of a running emulation (test_kms_run.py, fixture etsi_run).
#
# Key budget. A relayed 256-bit key costs 32 + 16 (confirmation token) + 32 (one-time
# MAC key) = 80 bytes of link key on each hop, taken from the half of each QKD block
# its sender owns (nodes/kms/store.py). The test's requests at alice take ~115 keys
# (100 of them at once) and one more stock key each for the assignment's MAC (~110),
# the keepalive tunnel ~6, and 16 stay in stock: ~250 relays = 20 kB of alice's half of
# alice-relay and of relay's half of relay-bob, i.e. 320 kbit per link. What enters
# the store is the QKD app's net_key_bits: final bits less the session's own
# authentication refills, up to one block (~70 kbit) of a session. key_bits 450000
# stops after 7 blocks of ~72 kbit (~500 kbit, >= 430 kbit net: 35 % to spare).
# relay-bob runs first: alice's relays (they start once alice-relay has key) then find
# key on the second hop at once instead of timing out and wasting their first hop.
#
# Timeline (emulated s, time_scale 1): the test gets its credentials in the first 2 s
# (a CPU-hungry moment: not under QKD); QKD 2..~25 (a block takes ~1.2 s, the first
# ~2.4 s, more under load); the test waits for it, then makes its calls (~5 s on an idle
# 2-core machine); the `keepalive` tunnel (other SAEs, ~6 keys) starts at 42 s: a run
# ends when its last app is done, so without a late app it would end with the QKD,
# before the test could make its calls.
name: kms-etsi
description: alice and bob's KMEs, relayed through relay, serve SAEs outside the emulation.
seed: 5
duration: 48s
nodes: {{alice: {{}}, relay: {{}}, bob: {{}}}}
links:
  - endpoints: [relay, bob]
{_GYS_LINK}  - endpoints: [alice, relay]
{_GYS_LINK}kms:
  saes:
    - {{id: alice-app, node: alice}}
    - {{id: bob-app, node: bob}}
    - {{id: eve-app, node: bob}}      # a third SAE: the one keys were not issued to, or a multicast slave
    - {{id: alice-qkd, node: alice}}
    - {{id: bob-qkd, node: bob}}
    - {{id: alice-pqc, node: alice}}
    - {{id: bob-pqc, node: bob}}
    - {{id: alice-hyb, node: alice}}
    - {{id: bob-hyb, node: bob}}
    - {{id: tun-a, node: alice}}
    - {{id: tun-b, node: bob}}
  policies:
    # 100 requests at once need ~200 stock keys: they wait (in order) for the relays
    - {{saes: [alice-app, bob-app], policy: qkd, on_empty: wait, wait: 10s}}
    - {{saes: [alice-qkd, bob-qkd], policy: qkd, on_empty: fail}}
    - {{saes: [alice-pqc, bob-pqc], policy: pqc, on_empty: fail}}
    - {{saes: [alice-hyb, bob-hyb], policy: hybrid, on_empty: fail}}
  key_size: 256
  stock_keys: 16
apps:
  - {{kind: qkd, name: qkd-relay-bob, nodes: [relay, bob], start: 2s, duration: 10.5s, key_bits: 450000}}
  - {{kind: qkd, name: qkd-alice-relay, nodes: [alice, relay], start: 12.5s, duration: 10.5s, key_bits: 450000}}
  - {{kind: tunnel, name: keepalive, nodes: [alice, bob], saes: [tun-a, tun-b], start: 42s, duration: 2s,
     rate: 20, rekey_interval: 1s}}
expect:
  - {{metric: key_mismatches, max: 0}}
  - {{metric: duplicate_deliveries, max: 0}}
  - {{metric: auth_failures, app: keepalive, max: 0}}
  - {{metric: alarms, app: qkd-relay-bob, max: 0}}
  - {{metric: alarms, app: qkd-alice-relay, max: 0}}
"""

EMPTY_SCENARIO = f"""\
# Empty pools (test_kms_run.py, fixture empty_run): alice and bob share a QKD link, so
# both run a KME, but no QKD app ever runs on it. No app at all: the run lasts its
# whole duration, in which the test makes its calls (~5 s after the KMEs start).
name: kms-empty
description: KMEs with empty key pools answer by each pair's on_empty policy.
seed: 6
duration: 14s
nodes: {{alice: {{}}, bob: {{}}}}
links:
  - endpoints: [alice, bob]
{_GYS_LINK}kms:
  saes:
    - {{id: a-fail, node: alice}}
    - {{id: b-fail, node: bob}}
    - {{id: a-wait, node: alice}}
    - {{id: b-wait, node: bob}}
    - {{id: a-pqc, node: alice}}
    - {{id: b-pqc, node: bob}}
  policies:
    - {{saes: [a-fail, b-fail], policy: qkd, on_empty: fail}}
    - {{saes: [a-wait, b-wait], policy: qkd, on_empty: wait, wait: 1s}}
    - {{saes: [a-pqc, b-pqc], policy: qkd, on_empty: pqc}}
expect:
  - {{metric: pqc_fallbacks, min: 1}}
  - {{metric: keys_matched, min: 1}}
  - {{metric: key_mismatches, max: 0}}
  - {{metric: duplicate_deliveries, max: 0}}
"""

CRASH_SCENARIO = f"""\
# kill -9 of a KME during delivery (test_kms_run.py, test_kill_9_of_a_kme_...).
#
# Key budget: the test's 3 workers make ~9 requests/s, each taking 2 stock keys (the key
# and one for the assignment's MAC), for ~5 s before the crash and 3..6 s after bob is
# back: up to ~200 keys; plus the relays in flight when bob is killed (lost, up to 2 x 16)
# and 16 in stock: ~250 relays of 80 bytes = 20 kB of alice's half of the link, 320 kbit
# of net key (final key less the session's authentication refills, up to ~70 kbit).
# key_bits 400000 stops after 6 blocks of ~72 kbit (>= 360 kbit net).
#
# Timeline (emulated s): credentials in the first 2 s, QKD 2..~12; the test starts its
# loop when it is done; bob is killed at 15 s and started again at 17 s over the store
# and delivery log it left; the test goes on for 3..6 s after bob's KME is back; the
# `keepalive` tunnel (28 s) keeps the run going that long and checks that bob's KME
# serves its apps again.
name: kms-crash
description: bob's KME is killed during key delivery and restarted over its store.
seed: 7
duration: 34s
nodes: {{alice: {{}}, bob: {{}}}}
links:
  - endpoints: [alice, bob]
{_GYS_LINK}kms:
  saes:
    - {{id: alice-app, node: alice}}
    - {{id: bob-app, node: bob}}
    - {{id: tun-a, node: alice}}
    - {{id: tun-b, node: bob}}
  policies:
    # while bob is down a request fails after 1 s (bob unreachable) instead of at once
    - {{saes: [alice-app, bob-app], policy: qkd, on_empty: wait, wait: 1s}}
  key_size: 256
  stock_keys: 16
apps:
  - {{kind: qkd, name: qkd, nodes: [alice, bob], start: 2s, duration: 10s, key_bits: 400000}}
  - {{kind: tunnel, name: keepalive, nodes: [alice, bob], saes: [tun-a, tun-b], start: 28s, duration: 2s,
     rate: 20, rekey_interval: 1s}}
faults:
  - {{at: 15s, kind: node-crash, node: bob, for: 2s}}
expect:
  - {{metric: duplicate_deliveries, max: 0}}
  - {{metric: key_mismatches, max: 0}}
  # the tunnel after the restart: bob's KME assigns and delivers again (20/s x 2 s x
  # 512 B = 20480 bytes; half of it leaves room for the first key's round trips)
  - {{metric: bytes_carried, app: keepalive, min: 10240}}
  - {{metric: auth_failures, app: keepalive, max: 0}}
"""


# ---------------------------------------------------------------------------------------
# Helpers: the run, credentials, keys
# ---------------------------------------------------------------------------------------


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def read_events(run_dir: Path) -> list[dict[str, Any]]:
    """events.jsonl of a run that may still be writing it (a torn last line is skipped)."""
    path = run_dir / "events.jsonl"
    out = []
    with contextlib.suppress(FileNotFoundError):
        for line in path.read_text().splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
    return out


def digest(key: bytes) -> str:
    """What assertions compare instead of key bytes (CONVENTIONS 14)."""
    return hashlib.sha256(key).hexdigest()[:16]


def encodings(key: bytes) -> dict[str, bytes]:
    """The forms in which a key could leak into a file."""
    return {
        "raw": key,
        "hex": key.hex().encode(),
        "HEX": key.hex().upper().encode(),
        "base64": base64.b64encode(key).rstrip(b"="),
        "base64url": base64.urlsafe_b64encode(key).rstrip(b"="),
    }


def leaks(files: list[Path], keys: dict[str, bytes]) -> list[tuple[str, str, str]]:
    """(file, key id, form) of every key found in a file in one of its `encodings`."""
    found = []
    for path in files:
        data = path.read_bytes()
        for key_id, key in keys.items():
            found += [(str(path), key_id, form) for form, text in encodings(key).items() if text in data]
    return found


@dataclasses.dataclass
class Finished:
    returncode: int
    stdout: str
    stderr: str
    results: dict[str, Any]
    events: list[dict[str, Any]]

    @property
    def kms(self) -> dict[str, float]:
        return self.results["kms"]["metrics"]

    def kms_counters(self, node: str) -> dict[str, Any]:
        return self.results["stats"]["nodes"][node]["kms"]["counters"]


class QnetemRun:
    """`qnetem run SCENARIO --out RUN --quiet` in a child process, watched from outside.

    The console goes to files next to the run directory (scanned for keys too), never to
    a pipe nobody reads while the run goes on."""

    def __init__(self, scenario: Path, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.console = (run_dir.parent / f"{run_dir.name}.stdout", run_dir.parent / f"{run_dir.name}.stderr")
        self._files: list[IO[str]] = [open(p, "w") for p in self.console]  # closed by finish() / stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "emulator.cli", "run", str(scenario), "--out", str(run_dir), "--quiet"],
            cwd=ROOT, env=_env(), stdout=self._files[0], stderr=self._files[1],
        )  # fmt: skip
        self._finished: Finished | None = None

    def console_text(self) -> str:
        return "\n".join(p.read_text() for p in self.console if p.exists())

    def _check_alive(self, what: str) -> None:
        if self.proc.poll() is not None:
            pytest.fail(f"the run ended (rc {self.proc.returncode}) before {what}:\n{self.console_text()[-3000:]}")

    def wait_until(self, what: str, predicate: Callable[[], Any], timeout_s: float) -> Any:
        deadline = time.monotonic() + timeout_s
        while True:
            value = predicate()
            if value:
                return value
            self._check_alive(what)
            if time.monotonic() > deadline:
                pytest.fail(f"timed out after {timeout_s:g} s waiting for {what}")
            time.sleep(0.1)

    async def await_until(self, what: str, predicate: Callable[[], Any], timeout_s: float) -> Any:
        with trio.move_on_after(timeout_s):
            while True:
                value = predicate()
                if value:
                    return value
                self._check_alive(what)
                await trio.sleep(0.1)
        pytest.fail(f"timed out after {timeout_s:g} s waiting for {what}")

    def events(self) -> list[dict[str, Any]]:
        return read_events(self.run_dir)

    def manifest(self) -> dict[str, Any] | None:
        try:  # written to a temporary file and renamed: never half there
            return json.loads((self.run_dir / "kms.json").read_text())  # type: ignore[no-any-return]
        except FileNotFoundError:
            return None

    def app_done(self, app: str) -> bool:
        return any(e["event"] == "app_done" and e.get("app") == app for e in self.events())

    def finish(self, timeout_s: float = 120.0) -> Finished:
        """Wait for the run to exit on its own (idempotent)."""
        if self._finished is None:
            try:
                rc = self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.stop()
                pytest.fail(f"the run did not end within {timeout_s:g} s")
            for f in self._files:
                f.close()
            out, err = (p.read_text() for p in self.console)
            results_path = self.run_dir / "results.json"
            results = json.loads(results_path.read_text()) if results_path.exists() else {}
            self._finished = Finished(rc, out, err, results, read_events(self.run_dir))
        return self._finished

    def stop(self) -> None:
        """Teardown: interrupt a run still going (a test failed early), then reap it."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for f in self._files:
            f.close()


def start_run(base: Path, scenario_text: str, name: str) -> QnetemRun:
    scenario = base / f"{name}.yaml"
    scenario.write_text(scenario_text)
    return QnetemRun(scenario, base / "run")


def issue_credentials(
    run_dir: Path, saes: list[str], out: Path, *, via_cli: tuple[str, ...] | None = None
) -> dict[str, ssl.SSLContext]:
    """TLS client contexts of `saes`, from credentials of the run's CA.

    The SAEs in `via_cli` (default: all) get theirs the outside application's way,
    ``qnetem certs RUN --sae ID --out DIR`` (in parallel); the others straight from the
    run's CA with what that command calls (``emulator.certs.RunCa``), which spares the
    ~1 CPU-second of a Python start-up each while the QKD sessions start."""
    cli = saes if via_cli is None else [sae for sae in saes if sae in via_cli]
    procs = {
        sae: subprocess.Popen(
            [sys.executable, "-m", "emulator.cli", "certs", str(run_dir), "--sae", sae, "--out", str(out / sae)],
            cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        for sae in cli
    }
    for sae in saes:
        if sae not in procs:
            RunCa.load(run_dir / "certs").issue_sae(sae).write(out / sae, sae)
    for sae, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 0, stderr
        assert re.search(r"^kme \S+ etsi014 https://127\.0\.0\.1:\d+$", stdout, re.M), stdout  # where to go
        assert (out / sae / f"{sae}.key").stat().st_mode & 0o077 == 0  # the private key is the user's alone
    contexts = {}
    for sae in saes:
        d = out / sae
        cert = x509.load_pem_x509_certificate((d / f"{sae}.pem").read_bytes())
        assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == sae
        contexts[sae] = client_ssl_context(
            (d / f"{sae}.pem").read_bytes(), (d / f"{sae}.key").read_bytes(), (d / "ca.pem").read_bytes()
        )
    return contexts


class Kmes:
    """ETSI / SKIP clients of a run's KMEs, as the SAEs whose credentials we hold."""

    def __init__(self, run: QnetemRun, contexts: dict[str, ssl.SSLContext]) -> None:
        self.run = run
        self.contexts = contexts

    def url(self, sae: str, api: str = "etsi014") -> str:
        manifest = self.run.manifest()
        assert manifest is not None
        return str(manifest["kmes"][manifest["saes"][sae]][api])

    def etsi(self, sae: str, *, timeout_s: float = 10.0, url: str | None = None) -> EtsiClient:
        return EtsiClient(url or self.url(sae), self.contexts[sae], timeout_s=timeout_s)

    def skip(self, sae: str) -> SkipClient:
        return SkipClient(self.url(sae, "skip"), self.contexts[sae], timeout_s=10.0)


async def wait_for_stock(kmes: Kmes, master: str, slave: str, n: int, timeout_s: float = 20.0) -> None:
    """Until `master`'s KME holds `n` stock keys for `slave`'s (ETSI §5.1 stored_key_count)."""
    async with kmes.etsi(master) as client:

        async def enough() -> bool:
            code, body = await client.status(slave)
            return code == 200 and body["stored_key_count"] >= n

        with trio.move_on_after(timeout_s):
            while not await enough():
                await trio.sleep(0.1)
            return
    pytest.fail(f"no {n} stock keys for {master} -> {slave} within {timeout_s:g} s")


def keys_of(answer: tuple[int, dict[str, Any]]) -> list[tuple[str, bytes]]:
    """The (key_ID, key) pairs of a 200 Key container (ETSI GS QKD 014 §6.3)."""
    code, body = answer
    assert code == 200, (code, body.get("message"))  # error bodies hold no key
    return [(k.key_ID, k.key) for k in KeyContainer.from_json(body).keys]


def error_of(answer: tuple[int, dict[str, Any]], status: int) -> Error:
    """The §6.5 Error body of an answer that must have `status`."""
    code, body = answer
    assert code == status, (code, body.get("message") if code != 200 else "200 with keys")
    assert set(body) <= {"message", "details"}, sorted(body)
    return Error.from_json(body)


def deliveries_log(run_dir: Path, node: str) -> list[dict[str, str]]:
    path = run_dir / node / "kms-deliveries.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def key_rows(store: Path) -> dict[str, dict[str, Any]]:
    """Every row of a finished run's key table, tombstones included (which `KeyStore`
    does not list): state, owner, origin, parties served, and whether bytes remain."""
    with contextlib.closing(sqlite3.connect(store)) as db:
        rows = db.execute(
            "SELECT key_id, peer_kme, owner, origin, size_bits, state, master_sae, delivered_to, key IS NULL FROM keys"
        ).fetchall()
    return {
        r[0]: {"peer_kme": r[1], "owner": r[2], "origin": r[3], "size_bits": r[4], "state": r[5],
               "master_sae": r[6], "delivered_to": json.loads(r[7]), "zeroised": bool(r[8])}
        for r in rows
    }  # fmt: skip


def foreign_credential(common_name: str, issuer: x509.Name) -> tuple[bytes, bytes]:
    """A client certificate for `common_name` from a CA that is not the run's, though it
    bears the same name as the run's CA (so only the signature can tell them apart)."""
    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


# ---------------------------------------------------------------------------------------
# 1. An outside ETSI GS QKD 014 / SKIP application against a running run
# ---------------------------------------------------------------------------------------

ETSI_SAES = ["alice-app", "bob-app", "eve-app", "alice-qkd", "bob-qkd", "alice-pqc", "bob-pqc", "alice-hyb", "bob-hyb"]


@dataclasses.dataclass
class EtsiRun:
    run: QnetemRun
    kmes: Kmes
    keys: dict[str, bytes] = dataclasses.field(default_factory=dict)  # every key the test was given
    fetched: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)  # (node, sae, key_id)
    policy_keys: dict[str, list[str]] = dataclasses.field(default_factory=dict)

    def got(self, node: str, sae: str, pairs: list[tuple[str, bytes]]) -> dict[str, str]:
        """Record keys an SAE was given; their digests by id. A key id seen before must
        come with the same bytes (the other end's copy)."""
        for key_id, key in pairs:
            if key_id in self.keys:
                assert digest(self.keys[key_id]) == digest(key), f"key {key_id}: the two ends differ"
            self.keys[key_id] = key
            self.fetched.append((node, sae, key_id))
        return {key_id: digest(key) for key_id, key in pairs}


@pytest.fixture(scope="module")
def etsi_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtsiRun]:
    base = tmp_path_factory.mktemp("kms-etsi")
    run = start_run(base, ETSI_SCENARIO, "kms-etsi")
    try:
        run.wait_until("RUN/kms.json", run.manifest, 60)
        contexts = issue_credentials(run.run_dir, ETSI_SAES, base / "saes", via_cli=("alice-app", "bob-app"))
        live = EtsiRun(run, Kmes(run, contexts))
        # Both QKD sessions done (the calls then do not compete with the broker's
        # sampling for the CPU), and stock at alice for bob (ETSI §5.1 Get status).
        run.wait_until("the QKD sessions", lambda: run.app_done("qkd-alice-relay"), 60)

        async def stocked() -> int:
            async with live.kmes.etsi("alice-app") as alice:
                code, body = await alice.status("bob-app")
            return int(code == 200 and body["stored_key_count"] > 0)

        run.wait_until("stock at alice for bob", lambda: trio.run(stocked), 30)
        yield live
    finally:
        run.stop()
        if (run.run_dir / "events.jsonl").exists():
            assert_nothing_left(run.run_dir)


@pytest.mark.slow
async def test_status_has_every_field_of_etsi_014_6_1(etsi_run: EtsiRun) -> None:
    async with etsi_run.kmes.etsi("alice-app") as alice, etsi_run.kmes.etsi("bob-app") as bob:
        answers = {"alice": await alice.status("bob-app"), "bob": await bob.status("alice-app")}
    for node, (code, body) in answers.items():
        assert code == 200, body
        assert set(body) - {"status_extension"} == STATUS_FIELDS
        status = Status.from_json(body)  # types too
        peer = "bob" if node == "alice" else "alice"
        assert (status.source_KME_ID, status.target_KME_ID) == (node, peer)
        assert (status.master_SAE_ID, status.slave_SAE_ID) == (f"{node}-app", f"{peer}-app")
        assert status.key_size == 256  # kms.key_size
        assert status.max_key_per_request == 128  # kms.max_keys_per_request (default)
        assert status.min_key_size <= status.key_size <= status.max_key_size and status.min_key_size % 8 == 0
        assert status.max_SAE_ID_count >= 1  # key multicast is offered (used below)
        assert 0 <= status.stored_key_count <= status.max_key_count
    # alice keeps stock for bob (the fixture waited for it); it is alice's stock of keys
    # *she* owns, so bob's count for alice is of other keys (his own stock)
    assert Status.from_json(answers["alice"][1]).stored_key_count > 0


@pytest.mark.slow
async def test_keys_by_get_and_post_are_the_same_at_both_ends_and_delivered_once(etsi_run: EtsiRun) -> None:
    live = etsi_run
    async with live.kmes.etsi("alice-app") as alice, live.kmes.etsi("bob-app") as bob:
        sent = keys_of(await alice.enc_keys("bob-app", number=3))  # GET (§5.2)
        assert len(sent) == 3 and len({k for k, _ in sent}) == 3
        assert all(str(uuid.UUID(k)) == k and len(v) == 32 for k, v in sent)  # UUID ids, 256 bits
        at_alice = live.got("alice", "alice-app", sent)
        first = keys_of(await bob.dec_keys("alice-app", [sent[0][0]]))  # GET with one key_ID (§5.3)
        rest = keys_of(await bob.dec_keys("alice-app", [sent[1][0], sent[2][0]]))  # POST Key IDs (§6.4)
        at_bob = live.got("bob", "bob-app", first + rest)
        assert at_bob == at_alice
        # A key is delivered once: asking again (GET or POST) is "not found" (§6.4 message)
        for post in (False, True):
            err = error_of(await bob.dec_keys("alice-app", [sent[0][0]], post=post), 400)
            assert sent[0][0] in err.message and err.details and err.details[0]["key_ID"] == sent[0][0]


@pytest.mark.slow
async def test_enc_keys_post_with_size_512(etsi_run: EtsiRun) -> None:
    live = etsi_run
    async with live.kmes.etsi("alice-app") as alice, live.kmes.etsi("bob-app") as bob:
        sent = keys_of(await alice.enc_keys("bob-app", number=1, size_bits=512, post=True))  # §6.2 body
        assert [len(k) for _, k in sent] == [64]
        at_alice = live.got("alice", "alice-app", sent)
        assert live.got("bob", "bob-app", keys_of(await bob.dec_keys("alice-app", [sent[0][0]], post=True))) == at_alice
        # A size that is not a multiple of 8 is refused with the spec's message (§6.2)
        assert error_of(await alice.enc_keys("bob-app", size_bits=500, post=True), 400).message == (
            "size shall be a multiple of 8"
        )


@pytest.mark.slow
async def test_a_key_refuses_an_sae_it_was_not_issued_to(etsi_run: EtsiRun) -> None:
    live = etsi_run
    async with (
        live.kmes.etsi("alice-app") as alice,
        live.kmes.etsi("bob-app") as bob,
        live.kmes.etsi("eve-app") as eve,
    ):
        sent = keys_of(await alice.enc_keys("bob-app"))
        at_alice = live.got("alice", "alice-app", sent)
        [(key_id, _)] = sent
        err = error_of(await eve.dec_keys("alice-app", [key_id]), 401)  # eve-app is at bob too, not a party
        assert err.message and key_id in err.message
        # the refusal consumed nothing: the SAE it was issued to still gets it
        assert live.got("bob", "bob-app", keys_of(await bob.dec_keys("alice-app", [key_id]))) == at_alice


@pytest.mark.slow
async def test_multicast_to_an_additional_slave_sae(etsi_run: EtsiRun) -> None:
    live = etsi_run
    async with (
        live.kmes.etsi("alice-app") as alice,
        live.kmes.etsi("bob-app") as bob,
        live.kmes.etsi("eve-app") as eve,
    ):
        sent = keys_of(await alice.enc_keys("bob-app", number=1, additional_slaves=["eve-app"]))  # §6.2
        at_alice = live.got("alice", "alice-app", sent)
        [(key_id, _)] = sent
        assert live.got("bob", "bob-app", keys_of(await bob.dec_keys("alice-app", [key_id]))) == at_alice
        assert live.got("bob", "eve-app", keys_of(await eve.dec_keys("alice-app", [key_id]))) == at_alice
        error_of(await eve.dec_keys("alice-app", [key_id]), 400)  # each slave once


@pytest.mark.slow
async def test_tls_refuses_clients_without_a_certificate_of_the_run_ca(etsi_run: EtsiRun) -> None:
    live = etsi_run
    ca_pem = (live.run.run_dir / "certs" / "ca.pem").read_bytes()
    run_ca = x509.load_pem_x509_certificate(ca_pem)
    cert_pem, key_pem = foreign_credential("alice-app", run_ca.subject)
    bad = {
        "no certificate": client_ssl_context(None, None, ca_pem),
        "certificate from a foreign CA": client_ssl_context(cert_pem, key_pem, ca_pem),
    }
    for why, context in bad.items():
        # No HTTP answer at all (not even a 401): the TLS handshake fails.
        async with EtsiClient(live.kmes.url("alice-app"), context, timeout_s=10) as client:
            with pytest.raises(EtsiClientError) as status:
                await client.status("bob-app")
            with pytest.raises(EtsiClientError) as enc:
                await client.enc_keys("bob-app")
        async with SkipClient(live.kmes.url("alice-app", "skip"), context, timeout_s=10) as skip:
            with pytest.raises(EtsiClientError) as key:
                await skip.key("bob-app")
        assert (status.value.operation, enc.value.operation, key.value.operation) == ("status", "enc_keys", "key"), why
        assert "timed out" not in str(status.value), why  # refused, not left hanging
    # the server still serves the SAEs of the run
    async with live.kmes.etsi("alice-app") as alice:
        code, _ = await alice.status("bob-app")
    assert code == 200


# ---------------------------------------------------------------------------------------
# 2. Policies
# ---------------------------------------------------------------------------------------


@pytest.mark.slow
async def test_policies_qkd_pqc_hybrid_deliver_matching_keys(etsi_run: EtsiRun) -> None:
    """Each SAE pair gets keys by its policy; both ends get the same bytes. That the
    policy really decided the keys is checked in the stores after the run
    (test_policy_keys_come_from_their_policy)."""
    live = etsi_run
    # The qkd and hybrid pairs fail at once on an empty stock (on_empty: fail): let the
    # supply catch up with the calls before (each takes 3 stock keys: 2 + 1 for the MAC).
    await wait_for_stock(live.kmes, "alice-qkd", "bob-qkd", 6)
    for policy, tag in (("qkd", "qkd"), ("pqc", "pqc"), ("hybrid", "hyb")):
        master, slave = f"alice-{tag}", f"bob-{tag}"
        async with live.kmes.etsi(master) as alice, live.kmes.etsi(slave) as bob:
            sent = keys_of(await alice.enc_keys(slave, number=2))
            at_alice = live.got("alice", master, sent)
            got = keys_of(await bob.dec_keys(master, [k for k, _ in sent]))
            assert live.got("bob", slave, got) == at_alice, policy
        live.policy_keys[policy] = [k for k, _ in sent]
    # three policies, three different keys (no pair got another pair's key)
    assert len({k for ids in live.policy_keys.values() for k in ids}) == 6


# ---------------------------------------------------------------------------------------
# 1 (cont.). Load and SKIP
# ---------------------------------------------------------------------------------------


@pytest.mark.slow
async def test_200_concurrent_requests(etsi_run: EtsiRun) -> None:
    """100 enc_keys at once at alice, then 100 dec_keys at once at bob: 100 distinct key
    ids, each fetched once at each end, the same bytes at both."""
    live = etsi_run
    n = 100
    enc: dict[int, tuple[int, dict[str, Any]]] = {}
    # The requests queue at alice until enough keys are relayed (on_empty wait 10 s):
    # give the clients more than that.
    async with live.kmes.etsi("alice-app", timeout_s=30) as alice:

        async def one_enc(i: int) -> None:
            enc[i] = await alice.enc_keys("bob-app")

        async with trio.open_nursery() as nursery:
            for i in range(n):
                nursery.start_soon(one_enc, i)
    assert Counter(code for code, _ in enc.values()) == {200: n}
    sent = [keys_of(answer)[0] for answer in enc.values()]
    assert len({key_id for key_id, _ in sent}) == n
    at_alice = live.got("alice", "alice-app", sent)

    dec: dict[str, tuple[int, dict[str, Any]]] = {}
    async with live.kmes.etsi("bob-app", timeout_s=30) as bob:

        async def one_dec(key_id: str) -> None:
            dec[key_id] = await bob.dec_keys("alice-app", [key_id])

        async with trio.open_nursery() as nursery:
            for key_id, _ in sent:
                nursery.start_soon(one_dec, key_id)
    assert Counter(code for code, _ in dec.values()) == {200: n}
    at_bob: dict[str, str] = {}
    for key_id, answer in dec.items():
        got = keys_of(answer)
        assert [k for k, _ in got] == [key_id]  # each request got exactly the key it named
        at_bob.update(live.got("bob", "bob-app", got))
    assert at_bob == at_alice


@pytest.mark.slow
async def test_skip_key_and_key_by_id(etsi_run: EtsiRun) -> None:
    live = etsi_run
    async with live.kmes.skip("alice-app") as alice, live.kmes.skip("bob-app") as bob:
        code, caps = await alice.capabilities()  # draft-cisco-skip-02 §4.1
        assert code == 200 and caps["localSystemID"] == "alice" and caps["key"] is True
        assert {"bob", "bob-app"} <= set(caps["remoteSystemID"])
        code, body = await alice.key("bob-app")  # §4.2 new key
        assert code == 200 and set(body) == {"keyId", "key"}
        key_id = str(uuid.UUID(hex=body["keyId"]))
        at_alice = live.got("alice", "alice-app", [(key_id, bytes.fromhex(body["key"]))])
        code, body = await bob.key_by_id(uuid.UUID(key_id).hex, "alice-app")  # §4.2 key by id
        assert code == 200 and body["keyId"] == uuid.UUID(key_id).hex
        assert live.got("bob", "bob-app", [(key_id, bytes.fromhex(body["key"]))]) == at_alice


@pytest.mark.slow
async def test_skip_refuses_a_second_fetch_of_a_key_with_400(etsi_run: EtsiRun) -> None:
    live = etsi_run
    async with live.kmes.skip("alice-app") as alice, live.kmes.skip("bob-app") as bob:
        code, body = await alice.key("bob-app")
        assert code == 200
        key_id = str(uuid.UUID(hex=body["keyId"]))
        at_alice = live.got("alice", "alice-app", [(key_id, bytes.fromhex(body["key"]))])
        code, body = await bob.key_by_id(uuid.UUID(key_id).hex, "alice-app")
        assert code == 200 and live.got("bob", "bob-app", [(key_id, bytes.fromhex(body["key"]))]) == at_alice
        code, body = await bob.key_by_id(uuid.UUID(key_id).hex, "alice-app")
        assert (code, set(body)) == (400, {"message"})  # handed out once (§4.2), Table 7


# ---------------------------------------------------------------------------------------
# 1 (end). After the run: no key anywhere, each key delivered once
# ---------------------------------------------------------------------------------------


def _finished(live: EtsiRun) -> Finished:
    if not live.keys:
        pytest.skip("no key was delivered: run this module's tests together (they share one run)")
    done = live.run.finish()
    assert done.returncode == 0, done.stdout + done.stderr
    return done


@pytest.mark.slow
def test_after_the_run_no_key_bytes_are_left_in_any_file(etsi_run: EtsiRun) -> None:
    live = etsi_run
    done = _finished(live)
    assert done.results["passed"] is True and done.results["status"] == "passed"
    kms = done.kms
    assert kms["key_mismatches"] == 0 and kms["duplicate_deliveries"] == 0
    masters = {key_id for node, _, key_id in live.fetched if node == "alice"}
    both = masters & {key_id for node, _, key_id in live.fetched if node == "bob"}
    assert kms["keys_delivered"] >= len(masters)  # the keepalive tunnel's keys come on top
    assert kms["keys_matched"] >= len(both) >= 100
    # The refusals the KMEs decided are counted (the size that is not a multiple of 8 is
    # refused by the HTTP layer before it reaches a KME): the two repeated dec_keys,
    # eve's 401, eve's repeated multicast fetch (and the repeated SKIP fetch, if it ran).
    assert kms["kms_errors"] >= 4

    # Every file of the run (and the console), every encoding of every key: nothing.
    files = [p for p in live.run.run_dir.rglob("*") if p.is_file()] + list(live.run.console)
    names = {p.name for p in files}
    assert {"kms.sqlite", "kms-deliveries.jsonl", "results.json", "events.jsonl", "alice.log", "bob.log",
            "relay.log", "report.html"} <= names  # fmt: skip
    assert leaks(files, live.keys) == []
    # ... and the scan does see a key where there is one (every form, inside other bytes)
    key_id, key = next(iter(live.keys.items()))
    forms = encodings(key)
    for form, text in forms.items():
        planted = live.run.run_dir.parent / f"planted-{form}"
        planted.write_bytes(b'{"x": "' + text + b'"}\n')
        # base64 and base64url coincide for keys without '+' and '/': both forms are found
        found = {f for f, t in forms.items() if t in planted.read_bytes()}
        assert form in found and sorted(leaks([planted], live.keys)) == sorted(
            (str(planted), key_id, f) for f in found
        )

    # The delivery logs (fingerprints only) name every delivery once, and the two ends'
    # fingerprints of each key agree; the node stats report the same rows.
    logs = {node: deliveries_log(live.run.run_dir, node) for node in ("alice", "bob")}
    for node, rows in logs.items():
        assert Counter((r["key_id"], r["sae"]) for r in rows).most_common(1)[0][1] == 1
        assert set(rows[0]) == {"key_id", "sae", "role", "fp"}
        assert rows == done.results["stats"]["nodes"][node]["kms"]["deliveries"]
    logged = {(node, r["sae"], r["key_id"]): r for node, rows in logs.items() for r in rows}
    for node, sae, key_id in live.fetched:
        row = logged[(node, sae, key_id)]
        assert row["role"] == ("master" if node == "alice" else "slave")
    for key_id in both:
        fps = {r["fp"] for (node, _, kid), r in logged.items() if kid == key_id}
        assert len(fps) == 1, key_id

    # The stores: every key the test got is a zeroised DELIVERED tombstone at both ends.
    for node in ("alice", "bob"):
        rows = key_rows(live.run.run_dir / node / "kms.sqlite")
        for n, sae, key_id in live.fetched:
            if n == node:
                assert rows[key_id]["state"] == "delivered" and rows[key_id]["zeroised"], (node, key_id)
                assert sae in rows[key_id]["delivered_to"]


@pytest.mark.slow
def test_policy_keys_come_from_their_policy(etsi_run: EtsiRun) -> None:
    """qkd: the relayed QKD key itself (origin relay: alice and bob share no link); pqc:
    derived from the ML-KEM-768 + X25519 exchange only; hybrid: both through the CatKDF
    (nodes/kms/kme.py §3) — as both stores recorded them."""
    live = etsi_run
    if len(live.policy_keys) != 3:
        pytest.skip("needs test_policies_qkd_pqc_hybrid_deliver_matching_keys of the same run")
    done = _finished(live)
    origins = {"qkd": "relay", "pqc": "pqc", "hybrid": "hybrid"}
    for node in ("alice", "bob"):
        rows = key_rows(live.run.run_dir / node / "kms.sqlite")
        for policy, ids in live.policy_keys.items():
            assert {rows[k]["origin"] for k in ids} == {origins[policy]}, (node, policy)
    assert done.kms_counters("alice")["pqc_exchanges"] >= 1


# ---------------------------------------------------------------------------------------
# 2 (cont.). Empty pools: on_empty fail / wait / pqc
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class EmptyRun:
    done: Finished
    run_dir: Path
    stored_key_count: int
    fail: tuple[int, dict[str, Any]]
    fail_s: float
    wait: tuple[int, dict[str, Any]]
    wait_s: float
    pqc_at_alice: dict[str, str]
    pqc_at_bob: dict[str, str]
    pqc_ids: list[str]


@pytest.fixture(scope="module")
def empty_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmptyRun]:
    base = tmp_path_factory.mktemp("kms-empty")
    run = start_run(base, EMPTY_SCENARIO, "kms-empty")
    try:
        run.wait_until("RUN/kms.json", run.manifest, 60)
        kmes = Kmes(run, issue_credentials(run.run_dir, ["a-fail", "a-wait", "a-pqc", "b-pqc"], base / "saes"))

        async def session() -> dict[str, Any]:
            out: dict[str, Any] = {}
            async with (
                kmes.etsi("a-fail") as fail,
                kmes.etsi("a-wait") as wait,
                kmes.etsi("a-pqc") as pqc,
                kmes.etsi("b-pqc") as bob,
            ):
                # warm every connection (TLS handshake) so that the timings below are the KME's
                code, body = await fail.status("b-fail")
                out["stored_key_count"] = body["stored_key_count"] if code == 200 else -1
                await wait.status("b-wait")
                await pqc.status("b-pqc")
                t0 = trio.current_time()
                out["fail"] = await fail.enc_keys("b-fail")
                out["fail_s"] = trio.current_time() - t0
                t0 = trio.current_time()
                out["wait"] = await wait.enc_keys("b-wait")
                out["wait_s"] = trio.current_time() - t0
                sent = keys_of(await pqc.enc_keys("b-pqc"))
                got = keys_of(await bob.dec_keys("a-pqc", [k for k, _ in sent]))
            out["pqc_at_alice"] = {k: digest(v) for k, v in sent}
            out["pqc_at_bob"] = {k: digest(v) for k, v in got}
            out["pqc_ids"] = [k for k, _ in sent]
            return out

        seen = trio.run(session)
        yield EmptyRun(run.finish(), run.run_dir, **seen)
    finally:
        run.stop()
        if (run.run_dir / "events.jsonl").exists():
            assert_nothing_left(run.run_dir)


def test_empty_pools_fail_wait_and_fall_back_to_pqc(empty_run: EmptyRun) -> None:
    r = empty_run
    assert r.stored_key_count == 0  # the premise: no QKD key at all
    # on_empty fail: 503 at once. "At once": the KME answers from its state, in ms over a
    # warm connection on loopback; 0.9 s leaves room for a loaded machine and stays
    # below the 1 s the wait pair waits (and far below this pair's own `wait`, the
    # default 5 s, which a waiting request would take).
    error_of(r.fail, 503)
    assert r.fail_s < 0.9, r.fail_s
    # on_empty wait (wait: 1s): 503 after the wait. Lower bound 0.9 s (the wait minus
    # 0.1 s for the clocks: the KME's trio clock and ours); upper bound 4 s: well
    # below the 5 s default, so the pair's own setting was used.
    error_of(r.wait, 503)
    assert 0.9 <= r.wait_s < 4.0, r.wait_s
    # on_empty pqc: a key (PQC-only) that both ends agree on
    assert len(r.pqc_at_alice) == 1 and r.pqc_at_bob == r.pqc_at_alice
    done = r.done
    assert done.returncode == 0, done.stdout + done.stderr
    kms = done.kms
    assert kms["pqc_fallbacks"] >= 1 and kms["key_mismatches"] == 0 and kms["keys_matched"] >= 1
    assert kms["kms_errors"] >= 2  # the two 503s
    for node in ("alice", "bob"):  # a PQC-only key at both ends, delivered and zeroised
        rows = key_rows(r.run_dir / node / "kms.sqlite")
        for key_id in r.pqc_ids:
            row = rows[key_id]
            assert (row["origin"], row["state"], row["zeroised"]) == ("pqc", "delivered", True)


def test_a_pqc_fallback_raises_a_kms_alarm_event(empty_run: EmptyRun) -> None:
    """docs/scenarios.md (KeyPolicy.on_empty): `pqc` gives a PQC-only key *and* an alarm."""
    alarms = [e for e in empty_run.done.events if e["event"] == "kms_alarm"]
    assert [(e["node"], e["reason"]) for e in alarms] == [("alice", "pqc_fallback")]
    assert alarms[0]["keys"] >= 1


# ---------------------------------------------------------------------------------------
# 3. kill -9 of a KME during delivery
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class CrashLedger:
    at_alice: dict[str, bytes] = dataclasses.field(default_factory=dict)  # enc_keys answers
    at_bob: dict[str, bytes] = dataclasses.field(default_factory=dict)  # dec_keys answers
    phase_of: dict[str, str] = dataclasses.field(default_factory=dict)  # key id -> phase of its enc
    unanswered: set[str] = dataclasses.field(default_factory=set)  # a dec_keys for it got no answer
    duplicate_ids: list[str] = dataclasses.field(default_factory=list)
    enc_codes: Counter[tuple[str, int | str]] = dataclasses.field(default_factory=Counter)  # (phase, status)
    dec_codes: Counter[tuple[str, int | str]] = dataclasses.field(default_factory=Counter)
    phase: str = "before"  # before -> down (bob killed) -> after (bob's KME serves again)
    bob_url: str = ""
    back_at: float | None = None


@pytest.mark.slow
async def test_kill_9_of_a_kme_during_delivery_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    run = start_run(tmp_path, CRASH_SCENARIO, "kms-crash")
    try:
        await _crash_session(run, tmp_path)
    finally:
        run.stop()
    if (run.run_dir / "events.jsonl").exists():
        assert_nothing_left(run.run_dir)


async def _crash_session(run: QnetemRun, tmp_path: Path) -> None:
    await run.await_until("RUN/kms.json", run.manifest, 60)
    kmes = Kmes(run, await trio.to_thread.run_sync(issue_credentials, run.run_dir, ["alice-app", "bob-app"],
                                                     tmp_path / "saes"))  # fmt: skip
    await run.await_until("the QKD session", lambda: run.app_done("qkd"), 60)
    ledger = CrashLedger(bob_url=kmes.url("bob-app"))
    stop = trio.Event()

    async def dec_at_bob(ids: list[str]) -> None:
        phase = ledger.phase
        try:
            async with kmes.etsi("bob-app", url=ledger.bob_url, timeout_s=5) as bob:
                code, body = await bob.dec_keys("alice-app", ids, post=True)
        except EtsiClientError:
            ledger.dec_codes[(phase, "no answer")] += 1
            ledger.unanswered.update(ids)
            return
        ledger.dec_codes[(phase, code)] += 1
        if code == 200:
            for key_id, key in keys_of((code, body)):
                ledger.at_bob[key_id] = key
                ledger.unanswered.discard(key_id)

    async def worker() -> None:
        async with kmes.etsi("alice-app", timeout_s=10) as alice:
            while not stop.is_set():
                phase = ledger.phase
                try:
                    code, body = await alice.enc_keys("bob-app")
                except EtsiClientError:
                    ledger.enc_codes[(phase, "no answer")] += 1
                    continue
                ledger.enc_codes[(phase, code)] += 1
                if code == 200:
                    got = keys_of((code, body))
                    for key_id, key in got:
                        if key_id in ledger.at_alice:
                            ledger.duplicate_ids.append(key_id)
                        ledger.at_alice[key_id] = key
                        ledger.phase_of[key_id] = phase
                    await dec_at_bob([k for k, _ in got])
                await trio.sleep(0.3)  # ~3 requests/s per worker: see the scenario's key budget

    async def watch() -> None:
        """Phases from the run's events; bob's new ETSI address from his second kms_started."""
        deadline = trio.current_time() + 60
        while trio.current_time() < deadline:
            events = run.events()
            crash = next((i for i, e in enumerate(events) if e["event"] == "fault_applied"
                          and e.get("kind") == "node-crash"), None)  # fmt: skip
            if crash is not None and ledger.phase == "before":
                ledger.phase = "down"
            restarted = [e for e in events[crash or 0 :] if e["event"] == "kms_started" and e["node"] == "bob"]
            if crash is not None and restarted:
                ledger.bob_url = f"https://{restarted[0]['host']}:{restarted[0]['etsi014_port']}"
                ledger.phase = "after"
                ledger.back_at = trio.current_time()
                break
            await trio.sleep(0.05)
        else:
            stop.set()
            pytest.fail("bob's KME did not come back within 60 s")
        # Go on until keys flowed again for a while: alice's link to bob and her route to
        # him come back a moment after bob's KME (then a waiting request goes through).
        # Bounded so that the loop ends before the run does (the keepalive app at 28 s).
        assert ledger.back_at is not None
        while trio.current_time() < ledger.back_at + 6.0:
            if trio.current_time() >= ledger.back_at + 3.0 and ledger.dec_codes[("after", 200)] >= 15:
                break
            await trio.sleep(0.1)
        stop.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch)
        for _ in range(3):
            nursery.start_soon(worker)

    # Keys given at alice whose dec_keys at bob got no answer (bob was down, or killed
    # while answering): fetch them now. A 400 is legitimate only for a key bob delivered
    # (committed) while being killed, before the answer left: at-most-once, checked in
    # his store below.
    lost = []
    for key_id in sorted(ledger.unanswered):
        async with kmes.etsi("bob-app", url=ledger.bob_url, timeout_s=10) as bob:
            code, body = await bob.dec_keys("alice-app", [key_id])
        if code == 200:
            ledger.at_bob.update(keys_of((code, body)))
        else:
            error_of((code, body), 400)
            lost.append(key_id)
    # A key bob delivered before he was killed is not delivered again by his new incarnation.
    before = [k for k, p in ledger.phase_of.items() if p == "before" and k in ledger.at_bob]
    assert len(before) >= 5, ledger.enc_codes  # the loop really ran before the crash
    async with kmes.etsi("bob-app", url=ledger.bob_url) as bob:
        error_of(await bob.dec_keys("alice-app", [before[0]]), 400)

    done = await trio.to_thread.run_sync(run.finish)
    _check_crash_run(run, done, ledger, lost)


def _check_crash_run(run: QnetemRun, done: Finished, ledger: CrashLedger, lost: list[str]) -> None:
    assert done.returncode == 0, done.stdout + done.stderr
    assert [(s["kind"], s["step"]) for s in done.results["faults"]["steps"]] == [
        ("node-crash", "apply"), ("node-crash", "revert")]  # fmt: skip
    started = [e for e in done.events if e["event"] == "process_started" and e["name"] == "bob"]
    assert len(started) == 2  # bob's node was started again
    killed = [e for e in done.events if e["event"] == "process_exited" and e["name"] == "bob"][0]
    assert killed["returncode"] == -signal.SIGKILL

    # The test's own view: no key id twice, the crash was felt (requests failed while bob
    # was down) and keys flowed before and after it, equal at both ends.
    assert ledger.duplicate_ids == []
    assert sum(n for (phase, code), n in ledger.enc_codes.items() if phase == "down" and code != 200) >= 1
    assert ledger.dec_codes[("after", 200)] >= 10, (ledger.enc_codes, ledger.dec_codes)
    assert {k: digest(v) for k, v in ledger.at_bob.items()} == {k: digest(ledger.at_alice[k]) for k in ledger.at_bob}
    assert set(ledger.at_bob) | set(lost) == set(ledger.at_alice)  # every key fetched at bob, or lost
    # At most the requests in flight at the kill (one per worker) can be lost that way.
    assert len(lost) <= 3, lost

    # The run's view: fingerprints of both ends and (key, SAE) pairs in the delivery logs
    # (bob's log survived his crash: the keys of before are in it).
    kms = done.kms
    assert kms["duplicate_deliveries"] == 0 and kms["key_mismatches"] == 0
    logs = {node: deliveries_log(run.run_dir, node) for node in ("alice", "bob")}
    for rows in logs.values():
        assert max(Counter((r["key_id"], r["sae"]) for r in rows).values()) == 1
    bob_logged = {r["key_id"] for r in logs["bob"] if r["sae"] == "bob-app"}
    assert {k for k, p in ledger.phase_of.items() if p == "before" and k in ledger.at_bob} <= bob_logged
    fp = {node: {r["key_id"]: r["fp"] for r in rows} for node, rows in logs.items()}
    for key_id in ledger.at_bob:
        assert fp["alice"][key_id] == fp["bob"][key_id], key_id

    # Both stores after the run (both nodes shut down cleanly; bob's store went through
    # a kill -9 and a restart).
    alice = KeyStore(run.run_dir / "alice" / "kms.sqlite", "alice")
    bob = KeyStore(run.run_dir / "bob" / "kms.sqlite", "bob")
    try:
        assert alice.integrity_check() == "ok" and bob.integrity_check() == "ok"
        for kid in ledger.at_alice:  # delivered to alice-app: a tombstone at alice ...
            with pytest.raises(KeyConsumed):
                alice.get_key(kid)
            with pytest.raises(KeyConsumed):  # ... and at bob (fetched, or lost in the crash)
                bob.get_key(kid)
        bob_rows = key_rows(run.run_dir / "bob" / "kms.sqlite")
        for kid in lost:  # at-most-once: delivered by the killed incarnation, never again
            assert bob_rows[kid]["state"] == "delivered" and bob_rows[kid]["delivered_to"] == ["bob-app"]

        # Stock, both directions (the counts and the ids): a key READY at its owner is
        # READY at the other end with the same bytes — the owner marks it READY only on
        # the other end's confirmation, and the other end's store survived the crash.
        # A key READY at the other end is READY at the owner too, or still PENDING there
        # (its relay timed out, e.g. when bob was killed, and the withdrawal was not
        # acknowledged yet: kme.py recovery table); a withdrawn one is dropped at the
        # other end before the owner drops its row. So nothing is lost, and no key is
        # held in a state where one end could use it and the other not know it.
        for owner, other, o_store, x_store in (("alice", "bob", alice, bob), ("bob", "alice", bob, alice)):
            at_owner = {k.key_id: k for k in o_store.list_keys(KeyState.READY, owner=owner, peer_kme=other)}
            at_other = {k.key_id: k for k in x_store.list_keys(KeyState.READY, owner=owner, peer_kme=owner)}
            assert set(at_owner) <= set(at_other), (owner, sorted(set(at_owner) - set(at_other)))
            assert {k: digest(at_owner[k].key) for k in at_owner} == {k: digest(at_other[k].key) for k in at_owner}
            assert o_store.count_keys(other, owner, KeyState.READY) == len(at_owner)
            for kid in set(at_other) - set(at_owner):
                assert _state_at(o_store, kid) == "pending", (owner, kid)
                assert digest(o_store.get_key(kid).key) == digest(at_other[kid].key)
        # Keys assigned at bob (the slave side) are nowhere READY at alice any more.
        for k in bob.list_keys(KeyState.ASSIGNED, owner="alice", peer_kme="alice"):
            assert _state_at(alice, k.key_id) in ("assigned", "delivered"), k.key_id
    finally:
        alice.close()
        bob.close()


def _state_at(store: KeyStore, key_id: str) -> str:
    """A key's state in `store`: its state value, 'delivered'/'withdrawn' for tombstones
    (both raise KeyConsumed; the message names the state), 'absent' if unknown."""
    try:
        key: StoredKey = store.get_key(key_id)
    except KeyConsumed as exc:
        return "withdrawn" if "withdrawn" in str(exc) else "delivered"
    except KeyNotFound:
        return "absent"
    return key.state.value


# ---------------------------------------------------------------------------------------
# 4. The ring: keys relayed around a fibre cut
# ---------------------------------------------------------------------------------------

_ROUTE = re.compile(r"KME (?P<node>\w+): RouteChanged\(dst='(?P<dst>\w+)', path=\((?P<path>[^)]*)\)\)")


def _routes(log: str, dst: str) -> list[tuple[int, tuple[str, ...]]]:
    """(line number, path) of every route change towards `dst` in a node log."""
    out = []
    for i, line in enumerate(log.splitlines()):
        m = _ROUTE.search(line)
        if m and m["dst"] == dst:
            out.append((i, tuple(re.findall(r"'(\w+)'", m["path"]))))
    return out


def _line_of(log: str, text: str) -> int:
    return next(i for i, line in enumerate(log.splitlines()) if text in line)


@pytest.mark.slow
def test_the_ring_reroutes_keys_around_a_fibre_cut(tmp_path: Path) -> None:
    run = QnetemRun(RING, tmp_path / "run")
    try:
        done = run.finish(timeout_s=180)
    finally:
        run.stop()
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.results["passed"] is True
    assert_nothing_left(run.run_dir)
    (cut, splice) = done.results["faults"]["steps"]
    assert (cut["kind"], cut["step"], splice["step"]) == ("fibre-cut", "apply", "revert")
    assert done.results["stats"]["broker"]["fibres"]["a|b"]["cuts"] == 1

    # The route a -> c before the cut went through b (equal lengths, tie broken by name),
    # and after a's link to b was cut it went through d: a reroute caused by the cut.
    # (Routes may also flap while a QKD block keeps a node busy and its liveness probes
    # go unanswered, so only the routes around the cut are compared.)
    a_log = (run.run_dir / "a.log").read_text()
    cut_line = _line_of(a_log, "classical link to b cut (fault)")
    splice_line = _line_of(a_log, "classical link to b restored")
    routes = _routes(a_log, "c")
    before = [path for i, path in routes if i < cut_line]
    during = [path for i, path in routes if cut_line < i < splice_line]
    assert before and before[-1] == ("a", "b", "c"), before[-3:]
    assert ("a", "d", "c") in during and ("a", "b", "c") not in during, during
    # c learnt of the cut from b's link-state advertisement and turned to d as well.
    c_routes = [path for _, path in _routes((run.run_dir / "c.log").read_text(), "a")]
    assert ("c", "d", "a") in c_routes
    kms = done.kms
    assert kms["reroutes"] >= 2
    # Keys really travelled the other way: d forwarded relays (one-time-padded hops) and
    # routed messages (assignments) between a and c.
    d = done.kms_counters("d")
    assert d["relays_forwarded"] >= 1 and d["messages_forwarded"] >= 1
    # ... and none of them mismatched or went twice; the tunnel saw no forged datagram.
    assert kms["key_mismatches"] == 0 and kms["duplicate_deliveries"] == 0
    assert kms["keys_matched"] >= 10  # the scenario's keys_delivered bound; each is matched at c
    tunnel = done.results["apps"]["tunnel"]["metrics"]
    assert tunnel["auth_failures"] == 0 and tunnel["content_errors"] == 0
    assert tunnel["bytes_carried"] >= 250000  # the scenario's bound, argued in its header
