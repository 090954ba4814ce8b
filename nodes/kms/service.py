"""The node's key management entity at run time: the trio shell around the KME core.

Theory of operation
-------------------
`KmsService` is started by the orchestrator's `kms_start` (docs/protocol.md §4.5) and
lives as long as the node process. It owns nothing that is not I/O:

* the sans-IO core ``nodes.kms.kme.Kme`` over the node's ``KeyStore`` decides every
  key: supply from the QKD links, relay, routing, assignment, the hybrid exchange;
* `receive` / `link_up` / `link_down` / `material_added` feed the core with what the
  node runtime sees (``kms_msg`` frames, liveness, QKD blocks stored); after every
  input `_flush` sends the core's messages (``send(peer, body)``) and turns its events
  into answers for the HTTP requests waiting on them;
* two HTTPS servers with mutual TLS (``nodes.kms.https.serve_https``): ETSI GS QKD 014
  (``nodes.kms.etsi014``) and Cisco SKIP (``nodes.kms.skip``), both calling this object
  as their ``KeyService`` / ``SkipService``. An HTTP request becomes one core request
  (``enc_keys`` / ``dec_keys`` with a fresh request number) and waits for its
  ``RequestDone`` / ``RequestFailed``;
* `sae_call`: an ETSI 014 call made *as* an SAE whose certificate this node holds (the
  node's apps, e.g. the tunnel), over real HTTPS to this KME
  (``nodes.kms.client.EtsiClient``) — the same path an outside application takes.

Time: the KME serves real clients, so its clock is trio's (wall seconds, monotonic);
timeouts in the config are wall seconds.

Delivery records. Every key handed to an SAE is recorded as (key ID, SAE, role,
fingerprint) where fingerprint = HMAC-SHA-256(run salt, key)[:8] (FIPS 198-1): the
orchestrator compares the two ends of every key without seeing one. Records go to
``<data dir>/kms-deliveries.jsonl`` (appended and fsynced before the HTTP answer), so
they survive a crash like the store does, and to ``statistics()``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import hmac
import itertools
import json
import logging
import os
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import trio

from nodes.apps.base import KmsCall, KmsOp, KmsReply

from . import etsi014
from .client import EtsiClient, EtsiClientError
from .errors import KmsError
from .etsi014 import Key, KeyContainer, KeyIdEntry, KeyIds, KeyRequest, Status, etsi014_app
from .https import ServerTls, client_ssl_context, serve_https
from .kme import AppMessage, KeysDelivered, Kme, KmeConfig, PairPolicy, PqcFallback, RequestDone, RequestFailed
from .skip import SkipError, skip_app
from .store import KeyStore

__all__ = ["DELIVERIES_FILE", "KmsConfigError", "KmsService", "kme_config_from"]

log = logging.getLogger(__name__)

DELIVERIES_FILE = "kms-deliveries.jsonl"
_REQUEST_TIMEOUT_S = 30.0  # an HTTP request the core never answers gets 503 after this
#: Seconds a link must stay down (liveness) before the KME routes around it. Probes
#: every 0.1 s, down after 3 missed: a node computing a 10^6-bit QKD block can miss
#: them for ~0.5-1 s (the QKD issue's note) without the link being gone.
LINK_DOWN_GRACE_S = 1.5


class KmsConfigError(ValueError):
    """`kms_start.config` is invalid; `field` names the member (never its value)."""

    def __init__(self, field: str, why: str) -> None:
        super().__init__(f"config.{field}: {why}")
        self.field = field


def _field(config: Mapping[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    value = config.get(name)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise KmsConfigError(name, "missing or of the wrong type")
    return value


def kme_config_from(config: Mapping[str, Any]) -> KmeConfig:
    """The core's configuration from a `kms_start` config (see emulator/runtime/kms.py)."""
    saes = _field(config, "saes", dict)
    links = _field(config, "kms_links", list)
    try:
        kms_links = tuple((str(a), str(b)) for a, b in links)
    except (TypeError, ValueError):
        raise KmsConfigError("kms_links", "must be a list of node pairs") from None
    policies: dict[frozenset[str], PairPolicy] = {}
    for i, p in enumerate(config.get("policies") or ()):
        try:
            a, b = (str(x) for x in p["saes"])
            policies[frozenset((a, b))] = PairPolicy(str(p["policy"]), str(p["on_empty"]), float(p["wait_s"]))
        except (KeyError, TypeError, ValueError):
            raise KmsConfigError(f"policies[{i}]", "must have saes [a, b], policy, on_empty, wait_s") from None
    return KmeConfig(
        node=str(_field(config, "node", str)),
        saes={str(k): str(v) for k, v in saes.items()},
        kms_links=kms_links,
        policies=policies,
        default_policy=PairPolicy(str(config.get("default_policy", "qkd")), str(config.get("default_on_empty", "fail"))),
        key_size_bits=int(config.get("key_size_bits", 256)),
        max_keys_per_request=int(config.get("max_keys_per_request", 128)),
        stock_keys=int(config.get("stock_keys", 32)),
        relay_timeout_s=float(config.get("relay_timeout_s", 2.0)),
        assign_timeout_s=float(config.get("assign_timeout_s", 2.0)),
        pqc_rekey_s=float(config.get("pqc_rekey_s", 60.0)),
        kme_cert_pem=bytes(_field(config, "kme_cert_pem", bytes)),
        kme_key_pem=bytes(_field(config, "kme_key_pem", bytes)),
        ca_pem=bytes(_field(config, "ca_pem", bytes)),
    )


@dataclasses.dataclass(slots=True)
class _Waiter:
    done: trio.Event = dataclasses.field(default_factory=trio.Event)
    result: RequestDone | RequestFailed | None = None


class KmsService:
    """One node's KME (see the module docstring)."""

    def __init__(
        self,
        config: Mapping[str, Any],
        store: KeyStore,
        *,
        send: Callable[[str, dict[str, Any]], None],
        deliver_app: Callable[[str, str, dict[str, Any]], None],
        data_dir: Path | None,
    ) -> None:
        self.config = kme_config_from(config)
        self.node = self.config.node
        self.host = str(config.get("host") or "127.0.0.1")
        self._salt = bytes(_field(config, "fingerprint_salt", bytes))
        creds = config.get("sae_credentials") or {}
        if not isinstance(creds, dict):
            raise KmsConfigError("sae_credentials", "must be a map")
        self._sae_creds: dict[str, tuple[bytes, bytes]] = {}
        for sae, cred in creds.items():
            try:
                self._sae_creds[str(sae)] = (bytes(cred["cert_pem"]), bytes(cred["key_pem"]))
            except (KeyError, TypeError):
                raise KmsConfigError("sae_credentials", "each needs cert_pem and key_pem") from None
        self._tls = ServerTls(self.config.kme_cert_pem, self.config.kme_key_pem, self.config.ca_pem)
        self.store = store
        self._send = send
        self._deliver_app = deliver_app
        self._log_path = data_dir / DELIVERIES_FILE if data_dir is not None else None
        self._deliveries: list[dict[str, str]] = self._load_deliveries()
        now = trio.current_time()
        # Certificates in the hybrid exchange are checked against UTC: tell the core
        # which UTC instant its clock's zero is.
        utc_origin = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=now)
        self.kme = Kme(self.config, store, random_bytes=os.urandom, now=now, utc_origin=utc_origin)
        self._requests = itertools.count(1)
        self._waiters: dict[int, _Waiter] = {}
        self._wake = trio.Event()
        self._clients: dict[str, EtsiClient] = {}
        self._link_up: dict[str, bool] = {}  # liveness as last reported by the node
        self._reported_up: dict[str, bool] = {}  # ... and as told to the core
        self._nursery: trio.Nursery | None = None
        self.etsi014_port = 0
        self.skip_port = 0
        self.requests_failed = 0
        self.alarms = 0

    @property
    def sae_ids(self) -> tuple[str, ...]:
        """The SAEs this node holds credentials for (its own apps may call as them)."""
        return tuple(sorted(self._sae_creds))

    def __repr__(self) -> str:
        return f"<KmsService node={self.node!r} etsi014={self.etsi014_port} skip={self.skip_port}>"

    # ------------------------------------------------------------------ lifetime

    async def run(self, *, task_status: trio.TaskStatus[tuple[str, int, int]] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self.etsi014_port = await nursery.start(
                lambda task_status: serve_https(etsi014_app(self), host=self.host, tls=self._tls, task_status=task_status)
            )
            self.skip_port = await nursery.start(
                lambda task_status: serve_https(skip_app(self), host=self.host, tls=self._tls, task_status=task_status)
            )
            nursery.start_soon(self._timer_loop)
            log.info("KME %s: ETSI GS QKD 014 on %s:%d, SKIP on %s:%d", self.node, self.host, self.etsi014_port,
                     self.host, self.skip_port)
            task_status.started((self.host, self.etsi014_port, self.skip_port))
            try:
                await trio.sleep_forever()
            finally:
                for client in self._clients.values():
                    with trio.CancelScope(shield=True):
                        await client.aclose()
                self.store.checkpoint()

    async def _timer_loop(self) -> None:
        while True:
            deadline = self.kme.get_timer()
            with trio.move_on_at(deadline if deadline is not None else float("inf")):
                await self._wake.wait()
            self._wake = trio.Event()
            now = trio.current_time()
            deadline = self.kme.get_timer()
            if deadline is not None and now >= deadline:
                self.kme.handle_timer(now)
                self._flush()

    def _poke(self) -> None:
        self._wake.set()

    # ------------------------------------------------------------------ inputs from the node

    def receive(self, peer: str, body: Mapping[str, Any]) -> None:
        self.kme.receive(peer, body, trio.current_time())
        self._flush()

    def link_up(self, peer: str) -> None:
        self._link_up[peer] = True
        if self._reported_up.get(peer) is not True:
            self._reported_up[peer] = True
            self.kme.link_up(peer, trio.current_time())
            self._flush()

    def link_down(self, peer: str) -> None:
        """Liveness lost `peer`. The core hears of it only if the link is still down
        `LINK_DOWN_GRACE_S` later: a node busy with a QKD block misses probes for a
        moment, and rerouting on every such blip would strand relays and their
        confirmations (a real cut lasts longer and is acted on after the grace)."""
        self._link_up[peer] = False
        if self._nursery is not None:
            self._nursery.start_soon(self._confirm_down, peer)

    async def _confirm_down(self, peer: str) -> None:
        await trio.sleep(LINK_DOWN_GRACE_S)
        if not self._link_up.get(peer, False) and self._reported_up.get(peer) is not False:
            self._reported_up[peer] = False
            self.kme.link_down(peer, trio.current_time())
            self._flush()

    def material_added(self, peer: str) -> None:
        self.kme.material_added(peer, trio.current_time())
        self._flush()

    def send_app(self, node: str, app: str, body: dict[str, Any]) -> None:
        """A routed app message (`RoutedSend`) for an app on `node`."""
        self.kme.send_app(node, app, body, trio.current_time())
        self._flush()

    # ------------------------------------------------------------------ the core's outputs

    def _flush(self) -> None:
        for peer, body in self.kme.messages_to_send():
            self._send(peer, body)
        while (event := self.kme.next_event()) is not None:
            if isinstance(event, RequestDone | RequestFailed):
                waiter = self._waiters.get(event.req)
                if waiter is not None:
                    waiter.result = event
                    waiter.done.set()
            elif isinstance(event, AppMessage):
                self._deliver_app(event.src_node, event.app, event.body)
            elif isinstance(event, PqcFallback):
                self.alarms += 1
                log.warning("KMS alarm: %s", event)
            elif isinstance(event, KeysDelivered):  # one per request: counted in statistics()
                log.debug("KME %s: %s", self.node, event)
            else:  # route changes, relay failures: rare, worth a line
                log.info("KME %s: %s", self.node, event)
        self._poke()

    async def _request(self, start: Callable[[int], None]) -> RequestDone:
        req = next(self._requests)
        waiter = self._waiters[req] = _Waiter()
        try:
            start(req)
            self._flush()
            with trio.move_on_after(_REQUEST_TIMEOUT_S):
                await waiter.done.wait()
        finally:
            del self._waiters[req]
        result = waiter.result
        if result is None:
            self.requests_failed += 1
            raise KmsError(503, "the KME did not complete the request in time")
        if isinstance(result, RequestFailed):
            self.requests_failed += 1
            raise result.error
        return result

    # ------------------------------------------------------------------ delivery records

    def _load_deliveries(self) -> list[dict[str, str]]:
        if self._log_path is None or not self._log_path.exists():
            return []
        out = []
        for line in self._log_path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue  # a torn last line after a crash
            if isinstance(row, dict):
                out.append({k: str(v) for k, v in row.items()})
        return out

    def _record(self, keys: tuple[Any, ...], sae: str, role: str) -> None:
        rows = [
            {"key_id": k.key_id, "sae": sae, "role": role,
             "fp": hmac.new(self._salt, k.key, hashlib.sha256).digest()[:8].hex()}
            for k in keys
        ]  # fmt: skip
        self._deliveries.extend(rows)
        if self._log_path is not None:
            with open(self._log_path, "a", encoding="utf-8") as f:
                f.write("".join(json.dumps(r) + "\n" for r in rows))
                f.flush()
                os.fsync(f.fileno())

    # ------------------------------------------------------------------ ETSI GS QKD 014 (KeyService)

    async def status(self, caller_sae: str, slave_sae: str) -> Status:
        return Status(**self.kme.status(caller_sae, slave_sae))

    async def enc_keys(self, caller_sae: str, slave_sae: str, request: KeyRequest) -> KeyContainer:
        etsi014.check_mandatory_extensions(request)
        now = trio.current_time()
        done = await self._request(lambda req: self.kme.enc_keys(
            req, caller_sae, slave_sae, request.number, request.size, tuple(request.additional_slave_SAE_IDs), now,
        ))  # fmt: skip
        self._record(done.keys, caller_sae, "master")
        return KeyContainer(tuple(Key(k.key_id, k.key) for k in done.keys))

    async def dec_keys(self, caller_sae: str, master_sae: str, key_ids: KeyIds) -> KeyContainer:
        now = trio.current_time()
        ids = tuple(entry.key_ID for entry in key_ids.key_IDs)
        done = await self._request(lambda req: self.kme.dec_keys(req, caller_sae, master_sae, ids, now))
        self._record(done.keys, caller_sae, "slave")
        return KeyContainer(tuple(Key(k.key_id, k.key) for k in done.keys))

    # ------------------------------------------------------------------ Cisco SKIP (SkipService)

    def _skip_peer(self, caller: str, remote_system_id: str) -> str:
        """The remote SAE of a SKIP call: `remoteSystemID` names an SAE, or a KME with one
        SAE paired with the caller (draft-cisco-skip §4.2: the remote system)."""
        saes = self.config.saes
        if remote_system_id in saes:
            return remote_system_id
        there = [s for s in saes if saes[s] == remote_system_id and s != caller]
        if len(there) == 1:
            return there[0]
        if not there:
            raise KmsError(400, f"unknown remoteSystemID {remote_system_id[:64]!r}")
        raise KmsError(400, f"KME {remote_system_id[:64]!r} serves several SAEs; name one as remoteSystemID")

    async def capabilities(self, caller: str) -> Mapping[str, Any]:
        saes = self.config.saes
        remote = sorted({node for node in saes.values() if node != self.node} | {s for s in saes if s != caller})
        return {
            "entropy": True, "key": True, "algorithm": "qkd-bb84-decoy+otp-relay",
            "localSystemID": self.node, "remoteSystemID": remote,
        }  # fmt: skip

    async def new_key(self, caller: str, remote_system_id: str, size_bits: int | None) -> tuple[str, bytes]:
        try:
            slave = self._skip_peer(caller, remote_system_id)
            container = await self.enc_keys(caller, slave, KeyRequest(number=1, size=size_bits))
        except KmsError as exc:  # draft-cisco-skip Table 7: the same 400 / 401 / 503
            raise SkipError(exc.status, exc.message) from None
        key = container.keys[0]
        return uuid.UUID(key.key_ID).hex, key.key

    async def key_by_id(self, caller: str, remote_system_id: str, key_id_hex: str) -> tuple[str, bytes]:
        try:
            master = self._skip_peer(caller, remote_system_id)
            key_id = str(uuid.UUID(hex=key_id_hex))
        except ValueError:
            raise SkipError(400, "keyId is not a 128-bit hex key id") from None
        except KmsError as exc:
            raise SkipError(exc.status, exc.message) from None
        try:
            container = await self.dec_keys(caller, master, KeyIds((KeyIdEntry(key_id),)))
        except KmsError as exc:
            raise SkipError(exc.status, exc.message) from None
        return uuid.UUID(container.keys[0].key_ID).hex, container.keys[0].key

    # ------------------------------------------------------------------ calls as an SAE (node apps)

    def _client(self, sae: str) -> EtsiClient:
        client = self._clients.get(sae)
        if client is None:
            cert_pem, key_pem = self._sae_creds[sae]
            context = client_ssl_context(cert_pem, key_pem, self.config.ca_pem)
            # The KME certificate names localhost and 127.0.0.1; connect by address (the
            # loopback one when the servers listen on every address of a container).
            host = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host  # noqa: S104
            host = f"[{host}]" if ":" in host else host
            client = self._clients[sae] = EtsiClient(f"https://{host}:{self.etsi014_port}", context)
        return client

    async def sae_call(self, call: KmsCall) -> KmsReply:
        """Make `call` as SAE `call.sae` over HTTPS to this KME; never raises."""
        if call.sae not in self._sae_creds:
            return KmsReply(0, {"message": f"this node holds no credentials for SAE {call.sae!r}"})
        client = self._client(call.sae)
        try:
            if call.op is KmsOp.STATUS:
                status, body = await client.status(call.peer_sae)
            elif call.op is KmsOp.ENC_KEYS:
                status, body = await client.enc_keys(call.peer_sae, call.number, call.size_bits)
            else:
                status, body = await client.dec_keys(call.peer_sae, call.key_ids)
        except EtsiClientError as exc:
            return KmsReply(0, {"message": str(exc)})
        return KmsReply(status, body)

    # ------------------------------------------------------------------ statistics

    def statistics(self) -> dict[str, Any]:
        """Counts, endpoints and delivery records (fingerprints, never keys)."""
        st = self.kme.statistics()
        counters = dataclasses.asdict(st) if dataclasses.is_dataclass(st) else dict(st)
        counters["kms_errors"] = self.requests_failed
        counters["alarms"] = self.alarms
        return {
            "host": self.host,
            "etsi014_port": self.etsi014_port,
            "skip_port": self.skip_port,
            "counters": counters,
            "store": self.store.key_statistics(),
            "deliveries": list(self._deliveries),
        }

