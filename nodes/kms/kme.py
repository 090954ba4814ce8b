"""The key management entity (KME) core: routing, key relay, key supply and delivery (sans-IO).

Theory of operation
-------------------
One ``Kme`` runs per node. Inputs are pushed (``receive`` from a KMS neighbour,
``link_up``/``link_down``, ``material_added`` when the QKD link stored a block,
``enc_keys``/``dec_keys``/``status`` from the SAE API, ``handle_timer``); outputs are
pulled (``messages_to_send``, ``next_event``, ``get_timer``). It never reads a clock
(``now`` is an argument) and its randomness is the ``random_bytes`` callable
(``os.urandom`` in production, seeded in tests). State that must survive a crash lives
in the ``KeyStore``; everything else is rebuilt.

Layers:

1. **Routing** (``_routing``): link-state flooding over the KMS links; shortest paths
   by hop count, ties by name, over links both ends report up. Messages for another KME
   travel in a routed envelope ``{"op": "fwd", src, dst, ttl, msg}`` forwarded hop by
   hop (TTL 16); no route -> dropped and counted.

2. **Pair-key supply.** For every remote KME R hosting an SAE that may talk to an SAE
   here, this KME keeps ``stock_keys`` READY keys of ``key_size_bits`` *owned by
   itself* (only the owner assigns a key, so the two ends never hand one key to two
   requests), plus whatever waiting requests need. A key is made by a *relay* over the
   current path to R (one hop for an adjacent R): the source draws K || T (T a 16-byte
   confirmation token) from ``random_bytes``, stores K PENDING, and every hop sends the
   payload one-time-padded with fresh link material and authenticated with a
   Wegman-Carter one-time MAC (``_relay``); each trusted relay decrypts with the
   bytes the previous hop names (``take_peer``) and re-encrypts for the next
   (``take_own``). R stores K READY (owner = source) and returns T in a routed
   ``relay_ok``; the source marks K READY only if T matches. No answer within
   ``relay_timeout_s`` -> the relay is abandoned (K withdrawn, see 4), and the supply
   loop starts another one over the route of the moment (rerouting around a cut
   link). At most ``MAX_RELAYS_IN_FLIGHT`` per destination.

3. **Delivery** (ETSI GS QKD 014; ``_delivery``). ``enc_keys`` from master SAE M here
   for slave S at R: per policy of the pair, the keys are

   * ``qkd``: stock keys (a key of another size is the concatenation of
     ceil(size / key_size_bits) stock keys, truncated; its id is derived from the
     first one's, ``_relay.derived_key_id``);
   * ``pqc``: ``PqcEpoch.derive_key`` of the current ML-KEM-768 + X25519 epoch this KME
     initiated with R (``nodes.kms.hybrid``), context = key id, transcript hash,
     policy, size, master and slaves;
   * ``hybrid``: the same CatKDF with the qkd key as pre-shared key.

   The keys are taken (ASSIGNED here), an ``assign`` naming the key ids, their
   components, master, slaves, policy and epoch goes to R, authenticated by a one-time
   Wegman-Carter MAC keyed by one more stock key spent for it (policy pqc: a key
   derived from the epoch); R checks it, builds the same keys, marks them ASSIGNED to
   its slaves and acks. On every ack (and only then, and in
   the pair's arrival order) one store transaction delivers the keys to M, and the
   ``RequestDone`` leaves. Additional slaves at R or here share the key; those at a
   third KME Q get it by one-time-pad key transport: K XOR (pair keys owned by this
   KME for Q), with a one-time MAC from the same pair keys (``wrap``), and must ack
   too. No ack within ``assign_timeout_s`` -> 503 and the keys are withdrawn at every
   end. ``dec_keys`` by slave S at R: each key must be ASSIGNED here with S among its
   parties and M as master (401 otherwise); unknown keys are waited for up to
   ``assign_timeout_s`` (the assign may still be on its way), then 400. Empty stock:
   ``on_empty`` = fail (503 at once), wait (up to ``wait_s``), pqc (a PQC-only key and
   a ``PqcFallback`` alarm).

4. **Withdrawal and crash recovery.** A key this KME gave up (relay timed out,
   assignment failed) is withdrawn: ``{"op": "withdraw", ids}`` to every other holder,
   which drops the ids (and the keys derived from them) if the sender owns them, or
   tombstones unknown ids so that a late relay is refused; on the ack the local rows
   are dropped. Until then they stay PENDING / ASSIGNED-to-nobody-served in the store,
   so a KME restarted over its store finds them and withdraws them again:

   ============================================  =======================================
   found in the store at start                   what the new Kme does
   ============================================  =======================================
   PENDING, owner = self (relay not confirmed)   withdraw at its destination, then drop
   ASSIGNED, owner = self, master not served     withdraw at every slave KME, then drop
   ASSIGNED, owner = self, master served         keep: local additional slaves may fetch
   ASSIGNED, owner = other KME (slave side)      keep: the slaves may fetch
   READY (stock, either owner)                   keep
   DELIVERED / WITHDRAWN (tombstones)            keep: ids never reused or re-delivered
   ============================================  =======================================

   The master's delivery is committed (``KeyStore.deliver``) in the transaction that
   produces ``RequestDone``: a crash after it loses the keys for the master
   (at-most-once), never delivers them twice. Lost with the process: waiting requests
   (their SAE connections die too), PQC epochs (renegotiated), parked messages.

Key states (``KeyStore``) as this core uses them::

    state      at the owner (source / master side)        at the other end
    PENDING    relay sent, token not confirmed yet         —
    READY      stock, confirmed                            stock, owned by the peer
    ASSIGNED   taken by a request (parties: master and     assigned by the owner's assign /
               slaves here); or withdrawing                wrap (parties: slaves here)
    DELIVERED  every party here served (zeroised)          every party here served
    WITHDRAWN  dropped (zeroised)                          dropped by a withdrawal

Secrets. Key bytes appear only in the store, in ``DeliveredKey.key`` (hidden from its
repr) and transiently in memory; messages carry one-time-pad ciphertexts, MAC tags and
confirmation tokens (random, never part of a key) only. Events, statistics and errors
hold ids, names, sizes and counts.

Trust model. Everything that decides key bytes is authenticated: relay hops and wraps
by one-time MACs (information-theoretically), assignments by a one-time MAC keyed by a
spent pair key (pqc: by the epoch), the PQC exchange by signatures. The other KMS
messages (LSAs, acks, withdrawals, relay_ok tokens aside) rely on the classical channel
between the KMEs; forging one can deny service (route badly, withdraw or refuse keys)
but cannot make the two ends deliver different bytes under one key id.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hmac
import math
import uuid
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType
from typing import Any, Final, Union

from . import _relay
from ._delivery import (
    MSG_NOT_AVAILABLE,
    DecRequest,
    EncRequest,
    PlannedKey,
    ReqState,
    assign_aad,
    context_extra,
    key_not_found,
    unauthorized,
    unavailable,
    validate_dec,
    validate_enc,
)
from ._routing import LinkStateRouter, RoutingError
from .errors import KmsError
from .hybrid import (
    HybridError,
    KmeIdentity,
    PqcConfirm,
    PqcEpoch,
    PqcInit,
    PqcInitiator,
    PqcProtocolError,
    PqcResponder,
    PqcResponse,
    message_from_dict,
)
from .store import (
    AlreadyTaken,
    KeyConsumed,
    KeyExhausted,
    KeyNotFound,
    KeyState,
    KeyStore,
    KeyStoreError,
    NotYetAvailable,
    StoredKey,
)

__all__ = [
    "MAX_RELAYS_IN_FLIGHT",
    "TTL",
    "AppMessage",
    "DeliveredKey",
    "Kme",
    "KmeConfig",
    "KmeEvent",
    "KmeStatistics",
    "KeysDelivered",
    "PairPolicy",
    "PqcFallback",
    "RelayFailed",
    "RequestDone",
    "RequestFailed",
    "RouteChanged",
]

TTL: Final = 16
MAX_RELAYS_IN_FLIGHT: Final = 16
#: Relay messages waiting for their link material, decrypted payloads waiting for a route.
MAX_PARKED: Final = 4096
#: A withdrawal is retried every relay_timeout_s; after this long the local rows are dropped anyway.
WITHDRAW_GIVE_UP_S: Final = 60.0
PQC_EPOCHS_KEPT: Final = 3
_MAX_IDS: Final = 65536
_MAX_NAME: Final = 256
POLICIES: Final = ("qkd", "pqc", "hybrid")
ON_EMPTY: Final = ("wait", "fail", "pqc")


# --- configuration ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class PairPolicy:
    """How an SAE pair gets keys: `policy` qkd | pqc | hybrid; `on_empty` wait | fail | pqc."""

    policy: str
    on_empty: str
    wait_s: float = 5.0

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, not {self.policy!r}")
        if self.on_empty not in ON_EMPTY:
            raise ValueError(f"on_empty must be one of {ON_EMPTY}, not {self.on_empty!r}")
        if not (isinstance(self.wait_s, (int, float)) and 0.0 <= self.wait_s < math.inf):
            raise ValueError("wait_s must be a finite number >= 0")


@dataclasses.dataclass(frozen=True, slots=True)
class KmeConfig:
    """What one KME knows of the network (data; validated on construction)."""

    node: str
    saes: Mapping[str, str]  # every SAE id of the network -> its KME (node)
    kms_links: tuple[tuple[str, str], ...]  # node pairs joined by a QKD link
    policies: Mapping[frozenset[str], PairPolicy] = dataclasses.field(default_factory=dict)
    default_policy: PairPolicy = PairPolicy("qkd", "fail")
    key_size_bits: int = 256
    min_key_size_bits: int = 64
    max_key_size_bits: int = 8192
    max_keys_per_request: int = 128
    max_key_count: int = 100_000
    max_sae_id_count: int = 8
    stock_keys: int = 64
    relay_timeout_s: float = 2.0
    assign_timeout_s: float = 2.0
    pqc_rekey_s: float = 60.0
    kme_cert_pem: bytes = dataclasses.field(default=b"", repr=False)
    kme_key_pem: bytes = dataclasses.field(default=b"", repr=False)
    ca_pem: bytes = dataclasses.field(default=b"", repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.node, str) or not self.node:
            raise ValueError("node must be a non-empty string")
        links = tuple(tuple(sorted((str(a), str(b)))) for a, b in self.kms_links)
        for a, b in links:
            if a == b:
                raise ValueError(f"a KMS link joins two different nodes, not {a!r} to itself")
        object.__setattr__(self, "kms_links", tuple(sorted(set(links))))
        object.__setattr__(self, "saes", MappingProxyType(dict(self.saes)))
        pol = {frozenset(k): v for k, v in dict(self.policies).items()}
        for k, v in pol.items():
            if len(k) != 2 or not isinstance(v, PairPolicy):
                raise ValueError("policies map a pair of two SAE ids to a PairPolicy")
        object.__setattr__(self, "policies", MappingProxyType(pol))
        for name in ("key_size_bits", "min_key_size_bits", "max_key_size_bits"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0 or v % 8:
                raise ValueError(f"{name} must be a positive multiple of 8")
        if not self.min_key_size_bits <= self.key_size_bits <= self.max_key_size_bits:
            raise ValueError("key_size_bits must lie within min_key_size_bits..max_key_size_bits")
        for name in ("max_keys_per_request", "max_key_count", "max_sae_id_count", "stock_keys"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be an int >= 0")
        for name in ("relay_timeout_s", "assign_timeout_s", "pqc_rekey_s"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and 0.0 < v < math.inf):
                raise ValueError(f"{name} must be a positive finite number of seconds")

    def policy_for(self, a: str, b: str) -> PairPolicy:
        return self.policies.get(frozenset((a, b)), self.default_policy)

    @property
    def nodes(self) -> frozenset[str]:
        out = {self.node, *self.saes.values()}
        for a, b in self.kms_links:
            out |= {a, b}
        return frozenset(out)

    @property
    def neighbours(self) -> tuple[str, ...]:
        return tuple(sorted({b if a == self.node else a for a, b in self.kms_links if self.node in (a, b)}))


# --- events -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class DeliveredKey:
    key_id: str
    key: bytes = dataclasses.field(repr=False)
    size_bits: int = 0


@dataclasses.dataclass(frozen=True, slots=True)
class RequestDone:
    req: int
    keys: tuple[DeliveredKey, ...]


@dataclasses.dataclass(frozen=True, slots=True)
class RequestFailed:
    req: int
    error: KmsError


@dataclasses.dataclass(frozen=True, slots=True)
class AppMessage:
    src_node: str
    app: str
    body: Any


@dataclasses.dataclass(frozen=True, slots=True)
class RouteChanged:
    dst: str
    path: tuple[str, ...]  # (this node, ..., dst); () when unreachable


@dataclasses.dataclass(frozen=True, slots=True)
class RelayFailed:
    dst: str
    reason: str


@dataclasses.dataclass(frozen=True, slots=True)
class PqcFallback:
    """An alarm: a qkd/hybrid pair got a PQC-only key because the QKD stock was empty."""

    master_sae: str
    slave_sae: str


@dataclasses.dataclass(frozen=True, slots=True)
class KeysDelivered:
    sae: str
    n: int
    size_bits: int


KmeEvent = Union[RequestDone, RequestFailed, AppMessage, RouteChanged, RelayFailed, PqcFallback, KeysDelivered]


@dataclasses.dataclass(frozen=True, slots=True)
class KmeStatistics:
    """Counts only (no key material)."""

    keys_relayed: int  # relays started by this KME as source
    keys_confirmed: int  # ... confirmed by the destination's token
    relays_failed: int  # ... abandoned (timeout, relay_fail, bad token)
    relay_timeouts: int
    relays_forwarded: int  # relay hops this KME decrypted and re-encrypted
    relays_received: int  # relays that ended here (keys stored READY)
    relays_rejected: int  # bad MAC / malformed relay messages
    relays_replayed: int  # material already taken (replay or duplicate)
    relays_refused: int  # key id known or withdrawn already
    relays_dropped: int  # parked relays that expired, TTL exhausted
    keys_assigned: int  # keys taken for requests by this KME as master side
    keys_accepted: int  # keys assigned to slaves here by other KMEs (assign / wrap)
    keys_delivered: int  # keys handed to SAEs here (enc and dec)
    requests_done: int
    requests_failed: int
    assign_timeouts: int
    withdrawals_sent: int
    withdrawals_pending: int  # not acknowledged yet
    keys_withdrawn: int  # rows dropped here by withdrawals (ours acked, or the peer's)
    wraps_rejected: int  # key wraps whose MAC failed
    assigns_rejected: int  # key assignments whose MAC failed
    stock: tuple[tuple[str, int], ...]  # READY keys of key_size_bits owned here, per served KME
    reroutes: int
    pqc_exchanges: int
    pqc_failures: int
    pqc_fallbacks: int
    messages_sent: int
    messages_received: int
    messages_forwarded: int
    messages_dropped: int
    messages_malformed: int


# --- internal records -------------------------------------------------------------------


class _Malformed(Exception):
    """A message from a peer does not have the required shape (the peer's fault)."""


class _ForgedHop(Exception):
    """A relay hop's one-time MAC did not verify (rolls back the material it took)."""


@dataclasses.dataclass(slots=True, eq=False)
class _Relay:
    key_id: str
    dst: str
    deadline_s: float
    token: bytes = dataclasses.field(repr=False)


@dataclasses.dataclass(slots=True, eq=False)
class _ParkedHop:  # a relay message whose link material has not arrived here yet
    peer: str
    body: Mapping[str, Any] = dataclasses.field(repr=False)
    expires_s: float = 0.0


@dataclasses.dataclass(slots=True, eq=False)
class _ParkedForward:  # a decrypted relay waiting for a route or next-hop material
    key_id: str
    src: str
    dst: str
    size_bits: int
    ttl: int
    expires_s: float
    payload: bytes = dataclasses.field(repr=False)


@dataclasses.dataclass(slots=True, eq=False)
class _WithdrawGroup:
    local_ids: tuple[str, ...]
    pending: set[str]


@dataclasses.dataclass(slots=True, eq=False)
class _Withdrawal:
    wid: str
    dst: str
    ids: tuple[str, ...]
    group: _WithdrawGroup
    next_try_s: float
    give_up_s: float
    sent: bool = False


@dataclasses.dataclass(slots=True, eq=False)
class _PqcOut:
    epoch: PqcEpoch | None = None
    established_s: float = 0.0
    initiator: PqcInitiator | None = None
    deadline_s: float = 0.0
    last_epoch_id: int = 0


@dataclasses.dataclass(slots=True, eq=False)
class _ParkedAssign:
    src: str
    body: Mapping[str, Any] = dataclasses.field(repr=False)
    expires_s: float = 0.0


# --- message field checks ---------------------------------------------------------------


def _str(body: Mapping[str, Any], name: str, max_len: int = _MAX_NAME) -> str:
    v = body.get(name)
    if not isinstance(v, str) or not v or len(v) > max_len:
        raise _Malformed(f"field {name!r} must be a non-empty string")
    return v


def _int(body: Mapping[str, Any], name: str, lo: int = 0, hi: int = 1 << 62) -> int:
    v = body.get(name)
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise _Malformed(f"field {name!r} must be an int in {lo}..{hi}")
    return v


def _bytes(body: Mapping[str, Any], name: str, size: int | None = None) -> bytes:
    v = body.get(name)
    if not isinstance(v, (bytes, bytearray)) or (size is not None and len(v) != size):
        raise _Malformed(f"field {name!r} must be {size if size is not None else 'some'} bytes")
    return bytes(v)


def _strs(body: Mapping[str, Any], name: str, max_n: int = _MAX_IDS) -> tuple[str, ...]:
    v = body.get(name)
    if not isinstance(v, (list, tuple)) or len(v) > max_n:
        raise _Malformed(f"field {name!r} must be a list")
    if not all(isinstance(x, str) and x and len(x) <= _MAX_NAME for x in v):
        raise _Malformed(f"field {name!r} must hold non-empty strings")
    return tuple(v)


def _list_keys(store: KeyStore, state: KeyState, owner: str) -> list[StoredKey]:
    """Rows of `owner` in `state` (crash recovery)."""
    return store.list_keys(state, owner=owner)


# --- the core ---------------------------------------------------------------------------


class Kme:
    """The KME core of node ``config.node`` over `store` (see the module docstring)."""

    def __init__(
        self,
        config: KmeConfig,
        store: KeyStore,
        *,
        random_bytes: Callable[[int], bytes],
        now: float,
        utc_origin: dt.datetime | None = None,
    ) -> None:
        """`utc_origin`: the UTC time at which `now` was 0 (certificate validity in the PQC
        exchange); None means `now` is UNIX time."""
        if store.node != config.node:
            raise ValueError(f"the store belongs to {store.node!r}, not {config.node!r}")
        self._cfg = config
        self._store = store
        self._rand = random_bytes
        self._node = config.node
        self._utc_origin = utc_origin
        self._nodes = config.nodes
        self._neighbours = frozenset(config.neighbours)
        self._router = LinkStateRouter(self._node, self._neighbours, self._nodes, now)
        self._local_saes = frozenset(s for s, n in config.saes.items() if n == self._node)
        self._served: tuple[str, ...] = (
            tuple(sorted({n for n in config.saes.values() if n != self._node})) if self._local_saes else ()
        )
        self._default_bytes = config.key_size_bits // 8
        self._mac_keys = -(-_relay.MAC_KEY_BYTES // self._default_bytes)  # pair keys per assignment MAC
        self._out: list[tuple[str, dict[str, Any]]] = []
        self._events: deque[KmeEvent] = deque()
        self._n: Counter[str] = Counter()
        self._boot = random_bytes(4).hex()
        self._rid_seq = 0
        # relays
        self._relays: dict[str, _Relay] = {}
        self._parked_hops: list[_ParkedHop] = []
        self._parked_fwd: list[_ParkedForward] = []
        self._backoff: dict[str, float] = {}
        # withdrawals
        self._withdrawals: dict[str, _Withdrawal] = {}
        # requests
        self._enc_queues: dict[tuple[str, str], deque[EncRequest]] = {}
        self._dec_queues: dict[tuple[str, str], deque[DecRequest]] = {}
        self._assigning: dict[str, EncRequest] = {}
        self._active_reqs: set[int] = set()
        self._parked_assigns: list[_ParkedAssign] = []
        # pqc
        self._pqc_out: dict[str, _PqcOut] = {}
        self._pqc_in: dict[str, dict[int, PqcEpoch]] = {}
        self._pqc_answered: dict[str, int] = {}  # initiator -> epoch answered, not confirmed yet
        self._identity: KmeIdentity | None = None
        self._responder: PqcResponder | None = None
        self._pqc_unavailable: str | None = None
        # routes seen, for RouteChanged
        self._routes: dict[str, tuple[str, ...]] = {}
        self._recover(now)

    # ================================================================ public API: inputs

    def receive(self, peer: str, body: Mapping[str, Any], now: float) -> None:
        """A KMS message from neighbour `peer` (a decoded msgpack map)."""
        self._n["messages_received"] += 1
        try:
            if peer not in self._neighbours:
                raise _Malformed(f"message from {peer!r}, not a KMS neighbour")
            if not isinstance(body, Mapping):
                raise _Malformed("a KMS message is a map")
            op = body.get("op")
            if op == "lsa":
                try:
                    self._send_all(self._router.receive_lsa(peer, body))
                except RoutingError as exc:
                    raise _Malformed(str(exc)) from None
                self._check_routes(now)
            elif op == "relay":
                self._on_relay_hop(peer, body, now)
            elif op == "fwd":
                self._on_fwd(body, now)
            else:
                raise _Malformed("unknown op")
        except _Malformed:
            self._n["messages_malformed"] += 1
        self._pump(now)

    def link_up(self, peer: str, now: float) -> None:
        self._send_all(self._router.link_up(peer, now))
        self._check_routes(now)
        self._pump(now)

    def link_down(self, peer: str, now: float) -> None:
        self._send_all(self._router.link_down(peer, now))
        self._check_routes(now)
        self._pump(now)

    def material_added(self, peer: str, now: float) -> None:
        """A QKD block for the link to `peer` is in the store: parked relays and the supply may go on."""
        if peer not in self._neighbours:
            raise ValueError(f"{peer!r} is not a KMS neighbour of {self._node!r}")
        self._retry_parked(now, material_from=peer)
        self._pump(now)

    def enc_keys(
        self,
        req: int,
        caller_sae: str,
        slave_sae: str,
        number: int,
        size_bits: int | None,
        additional_slaves: tuple[str, ...],
        now: float,
    ) -> None:
        """ETSI GS QKD 014 §5.3 Get key, by master `caller_sae`; the result is a RequestDone/RequestFailed event."""
        self._claim(req)
        cfg = self._cfg
        try:
            size, slaves = validate_enc(
                node=self._node,
                saes=cfg.saes,
                caller=caller_sae,
                slave=slave_sae,
                number=number,
                size_bits=size_bits,
                additional=tuple(additional_slaves),
                default_size_bits=cfg.key_size_bits,
                min_size_bits=cfg.min_key_size_bits,
                max_size_bits=cfg.max_key_size_bits,
                max_keys=cfg.max_keys_per_request,
                max_sae_ids=cfg.max_sae_id_count,
            )
        except KmsError as exc:
            self._finish_now(req, exc)
            return
        r_kme = cfg.saes[slave_sae]
        policy = cfg.policy_for(caller_sae, slave_sae)
        local = (caller_sae, *(s for s in slaves if cfg.saes[s] == self._node))
        q_kmes = tuple(sorted({cfg.saes[s] for s in slaves} - {self._node, r_kme}))
        mode = "local" if r_kme == self._node else policy.policy
        request = EncRequest(
            req=req,
            master=caller_sae,
            slave=slave_sae,
            slaves=slaves,
            r_kme=r_kme,
            local_parties=local,
            q_kmes=q_kmes,
            number=number,
            size_bits=size,
            on_empty=policy.on_empty,
            wait_s=float(policy.wait_s),
            mode=mode,
            arrival_s=now,
        )
        self._enc_queues.setdefault((caller_sae, slave_sae), deque()).append(request)
        self._pump(now)

    def dec_keys(self, req: int, caller_sae: str, master_sae: str, key_ids: tuple[str, ...], now: float) -> None:
        """ETSI GS QKD 014 §5.4 Get key with key IDs, by slave `caller_sae`; result as an event."""
        self._claim(req)
        try:
            ids = validate_dec(
                node=self._node,
                saes=self._cfg.saes,
                caller=caller_sae,
                master=master_sae,
                key_ids=tuple(key_ids),
                max_keys=self._cfg.max_keys_per_request,
            )
        except KmsError as exc:
            self._finish_now(req, exc)
            return
        d = DecRequest(req, caller_sae, master_sae, ids, now + self._cfg.assign_timeout_s)
        self._dec_queues.setdefault((master_sae, caller_sae), deque()).append(d)
        self._pump(now)

    def status(self, caller_sae: str, slave_sae: str) -> dict[str, Any]:
        """ETSI GS QKD 014 §5.2 / §6.1 Status of the key supply from `caller_sae` (master) to `slave_sae`."""
        cfg = self._cfg
        if cfg.saes.get(caller_sae) != self._node:
            raise unauthorized(f"SAE {caller_sae!r} is not attached to KME {self._node!r}")
        if slave_sae not in cfg.saes:
            raise KmsError(400, f"slave SAE {slave_sae!r} is unknown", ({"slave_SAE_ID": slave_sae},))
        target = cfg.saes[slave_sae]
        policy = cfg.policy_for(caller_sae, slave_sae)
        if target == self._node or policy.policy == "pqc":
            stored = cfg.max_key_count  # made on demand
        else:
            stored = self._store.count_keys(target, self._node, KeyState.READY, cfg.key_size_bits)
        return {
            "source_KME_ID": self._node,
            "target_KME_ID": target,
            "master_SAE_ID": caller_sae,
            "slave_SAE_ID": slave_sae,
            "key_size": cfg.key_size_bits,
            "stored_key_count": min(stored, cfg.max_key_count),
            "max_key_count": cfg.max_key_count,
            "max_key_per_request": cfg.max_keys_per_request,
            "max_key_size": cfg.max_key_size_bits,
            "min_key_size": cfg.min_key_size_bits,
            "max_SAE_ID_count": cfg.max_sae_id_count,
        }

    def send_app(self, dst_node: str, app: str, body: dict[str, Any], now: float) -> None:
        """A routed application message to `dst_node` (best effort; dropped and counted without a route)."""
        if dst_node == self._node:
            self._events.append(AppMessage(self._node, app, body))
            return
        self._send_routed(dst_node, {"op": "app", "app": app, "body": body})

    def handle_timer(self, now: float) -> None:
        cfg = self._cfg
        self._send_all(self._router.handle_timer(now))
        self._check_routes(now)
        for key_id, rel in list(self._relays.items()):
            if now >= rel.deadline_s:
                del self._relays[key_id]
                self._n["relay_timeouts"] += 1
                self._relay_failed(rel, "timeout", now)
        self._expire_parked(now)
        for w in list(self._withdrawals.values()):
            if now >= w.give_up_s:
                self._withdrawal_done(w, acked=False)
            elif now >= w.next_try_s:
                self._send_withdrawal(w, now)
        for r in list(self._assigning.values()):
            if now >= r.assign_deadline_s:
                self._n["assign_timeouts"] += 1
                waiting = ", ".join(sorted(r.acks))
                self._abort_enc(
                    r,
                    unavailable(f"KME(s) {waiting} did not confirm the key assignment within {cfg.assign_timeout_s} s"),
                    now,
                )
        for link in self._pqc_out.values():
            if link.initiator is not None and now >= link.deadline_s:
                link.initiator = None
                self._n["pqc_failures"] += 1
        for p in list(self._parked_assigns):
            if now >= p.expires_s:
                self._parked_assigns.remove(p)
                rid = p.body.get("rid")
                if isinstance(rid, str):
                    self._send_routed(p.src, {"op": "assign_ack", "rid": rid, "ok": False, "reason": "unknown-epoch"})
        for peer in [p for p, t in self._backoff.items() if now >= t]:
            del self._backoff[peer]
        self._pump(now)

    def get_timer(self) -> float | None:
        times = [self._router.get_timer()]
        times += [r.deadline_s for r in self._relays.values()]
        times += [p.expires_s for p in self._parked_hops]
        times += [p.expires_s for p in self._parked_fwd]
        times += [min(w.next_try_s, w.give_up_s) for w in self._withdrawals.values()]
        times += [r.assign_deadline_s for r in self._assigning.values()]
        times += [link.deadline_s for link in self._pqc_out.values() if link.initiator is not None]
        times += [p.expires_s for p in self._parked_assigns]
        times += list(self._backoff.values())
        for q in self._enc_queues.values():
            head = next((r for r in q if r.state is ReqState.WAITING), None)
            if head is not None:
                times.append(head.deadline_s)
        for dq in self._dec_queues.values():
            dhead = next((d for d in dq if d.state is ReqState.WAITING), None)
            if dhead is not None:
                times.append(dhead.deadline_s)
        return min(times) if times else None

    # ================================================================ public API: outputs

    def messages_to_send(self) -> list[tuple[str, dict[str, Any]]]:
        out, self._out = self._out, []
        return out

    def next_event(self) -> KmeEvent | None:
        return self._events.popleft() if self._events else None

    def statistics(self) -> KmeStatistics:
        n = self._n
        stock = tuple(
            (peer, self._store.count_keys(peer, self._node, KeyState.READY, self._cfg.key_size_bits))
            for peer in self._served
        )
        names = [f.name for f in dataclasses.fields(KmeStatistics) if f.name not in ("stock", "withdrawals_pending")]
        return KmeStatistics(
            stock=stock, withdrawals_pending=len(self._withdrawals), **{name: n[name] for name in names}
        )

    @property
    def node(self) -> str:
        return self._node

    def path_to(self, dst: str) -> tuple[str, ...]:
        """The current route to KME `dst` (this node first); () if unreachable."""
        return self._router.path(dst)

    def __repr__(self) -> str:
        return f"<Kme {self._node} relays={len(self._relays)} assigning={len(self._assigning)}>"

    # ================================================================ plumbing

    def _claim(self, req: int) -> None:
        if req in self._active_reqs:
            raise ValueError(f"request id {req} is still in progress")
        self._active_reqs.add(req)

    def _finish_now(self, req: int, error: KmsError) -> None:
        self._active_reqs.discard(req)
        self._n["requests_failed"] += 1
        self._events.append(RequestFailed(req, error))

    def _new_id(self) -> str:
        return str(uuid.UUID(bytes=bytes(self._rand(16)), version=4))

    def _new_rid(self) -> str:
        self._rid_seq += 1
        return f"{self._node}-{self._boot}-{self._rid_seq}"

    def _utc(self, now: float) -> dt.datetime:
        if self._utc_origin is not None:
            return self._utc_origin + dt.timedelta(seconds=now)
        return dt.datetime.fromtimestamp(now, dt.timezone.utc)

    def _send_link(self, peer: str, body: dict[str, Any]) -> bool:
        if peer not in self._router.up_neighbours:
            self._n["messages_dropped"] += 1
            return False
        self._out.append((peer, body))
        self._n["messages_sent"] += 1
        return True

    def _send_all(self, msgs: Iterable[tuple[str, dict[str, Any]]]) -> None:
        for peer, body in msgs:
            self._send_link(peer, body)

    def _send_routed(self, dst: str, inner: dict[str, Any], ttl: int = TTL) -> bool:
        nxt = self._router.next_hop(dst)
        if nxt is None:
            self._n["messages_dropped"] += 1
            return False
        return self._send_link(nxt, {"op": "fwd", "src": self._node, "dst": dst, "ttl": ttl, "msg": inner})

    def _on_fwd(self, body: Mapping[str, Any], now: float) -> None:
        src, dst = _str(body, "src"), _str(body, "dst")
        ttl = _int(body, "ttl", 1, TTL)
        msg = body.get("msg")
        if src not in self._nodes or dst not in self._nodes or not isinstance(msg, Mapping):
            raise _Malformed("bad envelope")
        if dst != self._node:
            if ttl <= 1:
                self._n["messages_dropped"] += 1
                return
            nxt = self._router.next_hop(dst)
            if nxt is None:
                self._n["messages_dropped"] += 1
                return
            if self._send_link(nxt, {"op": "fwd", "src": src, "dst": dst, "ttl": ttl - 1, "msg": msg}):
                self._n["messages_forwarded"] += 1
            return
        op = msg.get("op")
        handler = self._ROUTED.get(op) if isinstance(op, str) else None
        if handler is None:
            raise _Malformed("unknown routed op")
        handler(self, src, msg, now)

    def _check_routes(self, now: float) -> None:
        changed = False
        for dst in self._served:
            path = self._router.path(dst)
            old = self._routes.get(dst)
            if old is None and not path:
                self._routes[dst] = path
                continue
            if path != old:
                if old and path:
                    self._n["reroutes"] += 1
                self._routes[dst] = path
                self._events.append(RouteChanged(dst, path))
                changed = True
        if changed or self._parked_fwd:
            self._retry_parked(now, material_from=None)

    # ================================================================ the pump

    def _pump(self, now: float) -> None:
        for w in list(self._withdrawals.values()):
            if not w.sent and self._router.next_hop(w.dst) is not None:
                self._send_withdrawal(w, now)
        self._supply(now)
        for key in list(self._enc_queues):
            self._run_enc_queue(key, now)
        for dkey in list(self._dec_queues):
            self._run_dec_queue(dkey, now)

    def _demand(self) -> Counter[str]:
        """Stock keys that waiting requests need, per remote KME."""
        need: Counter[str] = Counter()
        for q in self._enc_queues.values():
            for r in q:
                if r.state is not ReqState.WAITING:
                    continue
                size_b = r.size_bits // 8
                if r.mode in ("qkd", "hybrid"):
                    need[r.r_kme] += r.number * -(-size_b // self._default_bytes) + self._mac_keys
                for qk in r.q_kmes:
                    need[qk] += r.number * -(-(size_b + _relay.MAC_KEY_BYTES) // self._default_bytes)
        return need

    def _supply(self, now: float) -> None:
        if not self._served:
            return
        demand = self._demand()
        inflight = Counter(rel.dst for rel in self._relays.values())
        bits = self._cfg.key_size_bits
        for peer in self._served:
            if peer in self._backoff:
                continue
            budget = MAX_RELAYS_IN_FLIGHT - inflight[peer]
            if budget <= 0:
                continue
            ready = self._store.count_keys(peer, self._node, KeyState.READY, bits)
            target = min(self._cfg.stock_keys + demand[peer], self._cfg.max_key_count)
            want = min(target - ready - inflight[peer], budget)
            if want <= 0:
                continue
            path = self._router.path(peer)
            if len(path) < 2:
                continue
            for _ in range(want):
                if not self._start_relay(peer, path, now):
                    break

    # ================================================================ relays

    def _start_relay(self, dst: str, path: tuple[str, ...], now: float) -> bool:
        hop = path[1]
        n = self._default_bytes
        need = n + _relay.TOKEN_BYTES + _relay.MAC_KEY_BYTES
        if self._store.link_bytes_available(hop, own=True) < need:
            return False
        payload = bytes(self._rand(n + _relay.TOKEN_BYTES))
        key_id = self._new_id()
        origin = "link" if len(path) == 2 else "relay"
        try:
            with self._store.transaction():
                pos, material = self._store.take_own(hop, need)
                self._store.put_key(key_id, dst, payload[:n], owner=self._node, origin=origin,
                                    state=KeyState.PENDING, now=now)  # fmt: skip
        except KeyStoreError:
            return False
        size_bits = 8 * n
        aad = _relay.auth_data(_relay.RELAY_LABEL, self._node, hop, key_id, self._node, dst, size_bits, pos, TTL)
        ct, tag = _relay.seal_otp(payload, material, aad)
        body = {"op": "relay", "key_id": key_id, "src": self._node, "dst": dst, "size_bits": size_bits,
                "pos": pos, "ttl": TTL, "ct": ct, "tag": tag}  # fmt: skip
        self._relays[key_id] = _Relay(key_id, dst, now + self._cfg.relay_timeout_s, payload[n:])
        self._n["keys_relayed"] += 1
        self._send_link(hop, body)
        return True

    def _on_relay_hop(self, peer: str, body: Mapping[str, Any], now: float, expires_s: float | None = None) -> None:
        key_id = _str(body, "key_id", 64)
        src, dst = _str(body, "src"), _str(body, "dst")
        size_bits = _int(body, "size_bits", 8, self._cfg.max_key_size_bits)
        pos = _int(body, "pos")
        ttl = _int(body, "ttl", 1, TTL)
        if size_bits % 8 or src not in self._nodes or dst not in self._nodes or src == dst:
            raise _Malformed("bad relay header")
        n = size_bits // 8 + _relay.TOKEN_BYTES
        ct = _bytes(body, "ct", n)
        tag = _bytes(body, "tag", _relay.TAG_BYTES)
        aad = _relay.auth_data(_relay.RELAY_LABEL, peer, self._node, key_id, src, dst, size_bits, pos, ttl)
        try:
            # Take the material and check the tag in one transaction: a forged hop (a bad
            # tag, e.g. with a far-ahead `pos`) rolls back, so it spends no link key.
            with self._store.transaction():
                material = self._store.take_peer(peer, pos, n + _relay.MAC_KEY_BYTES)
                payload = _relay.open_otp(ct, tag, material, aad)
                if payload is None:
                    raise _ForgedHop
        except _ForgedHop:
            self._n["relays_rejected"] += 1
            return
        except NotYetAvailable:
            if len(self._parked_hops) >= MAX_PARKED:
                self._parked_hops.pop(0)
                self._n["relays_dropped"] += 1
            expiry = now + self._cfg.relay_timeout_s if expires_s is None else expires_s
            self._parked_hops.append(_ParkedHop(peer, body, expiry))
            return
        except AlreadyTaken:
            self._n["relays_replayed"] += 1
            return
        except KeyStoreError:
            raise _Malformed("relay position") from None
        if dst == self._node:
            self._relay_arrived(peer, key_id, src, size_bits, payload, now)
        elif ttl <= 1:
            self._n["relays_dropped"] += 1
        else:
            fwd = _ParkedForward(key_id, src, dst, size_bits, ttl - 1, now + self._cfg.relay_timeout_s, payload)
            if not self._forward_relay(fwd):
                if len(self._parked_fwd) >= MAX_PARKED:
                    self._drop_forward(self._parked_fwd.pop(0))
                self._parked_fwd.append(fwd)

    def _relay_arrived(self, peer: str, key_id: str, src: str, size_bits: int, payload: bytes, now: float) -> None:
        n = size_bits // 8
        try:
            self._store.put_key(key_id, src, payload[:n], owner=src, origin="link" if src == peer else "relay",
                                state=KeyState.READY, now=now)  # fmt: skip
        except KeyStoreError:  # id known (duplicate, or withdrawn before it arrived) or not a UUID
            self._n["relays_refused"] += 1
            return
        self._n["relays_received"] += 1
        self._send_routed(src, {"op": "relay_ok", "key_id": key_id, "token": payload[n:]})

    def _forward_relay(self, f: _ParkedForward) -> bool:
        nxt = self._router.next_hop(f.dst)
        if nxt is None:
            return False
        need = len(f.payload) + _relay.MAC_KEY_BYTES
        try:
            pos, material = self._store.take_own(nxt, need)
        except KeyExhausted:
            return False
        aad = _relay.auth_data(_relay.RELAY_LABEL, self._node, nxt, f.key_id, f.src, f.dst, f.size_bits, pos, f.ttl)
        ct, tag = _relay.seal_otp(f.payload, material, aad)
        body = {"op": "relay", "key_id": f.key_id, "src": f.src, "dst": f.dst, "size_bits": f.size_bits,
                "pos": pos, "ttl": f.ttl, "ct": ct, "tag": tag}  # fmt: skip
        if self._send_link(nxt, body):
            self._n["relays_forwarded"] += 1
        return True

    def _drop_forward(self, f: _ParkedForward) -> None:
        self._n["relays_dropped"] += 1
        self._send_routed(f.src, {"op": "relay_fail", "key_id": f.key_id})

    def _retry_parked(self, now: float, material_from: str | None) -> None:
        if material_from is not None and self._parked_hops:
            hops = [p for p in self._parked_hops if p.peer == material_from]
            self._parked_hops = [p for p in self._parked_hops if p.peer != material_from]
            for p in hops:
                try:
                    self._on_relay_hop(p.peer, p.body, now, p.expires_s)
                except _Malformed:
                    self._n["relays_rejected"] += 1
        if self._parked_fwd:
            waiting, self._parked_fwd = self._parked_fwd, []
            for f in waiting:
                if not self._forward_relay(f):
                    self._parked_fwd.append(f)

    def _expire_parked(self, now: float) -> None:
        keep = []
        for p in self._parked_hops:
            if now >= p.expires_s:
                self._n["relays_dropped"] += 1
            else:
                keep.append(p)
        self._parked_hops = keep
        keepf = []
        for f in self._parked_fwd:
            if now >= f.expires_s:
                self._drop_forward(f)
            else:
                keepf.append(f)
        self._parked_fwd = keepf

    def _relay_failed(self, rel: _Relay, reason: str, now: float) -> None:
        self._n["relays_failed"] += 1
        self._events.append(RelayFailed(rel.dst, reason))
        self._backoff[rel.dst] = now + self._cfg.relay_timeout_s / 4
        self._withdraw({rel.dst: [rel.key_id]}, (rel.key_id,), now)

    def _on_relay_ok(self, src: str, msg: Mapping[str, Any], now: float) -> None:
        key_id = _str(msg, "key_id", 64)
        token = _bytes(msg, "token", _relay.TOKEN_BYTES)
        rel = self._relays.get(key_id)
        if rel is None or rel.dst != src:
            return  # late (already withdrawn) or not ours
        del self._relays[key_id]
        if not hmac.compare_digest(rel.token, token):
            self._relay_failed(rel, "confirmation token mismatch", now)
            return
        try:
            self._store.set_state(key_id, KeyState.READY)
        except KeyStoreError:
            return
        self._n["keys_confirmed"] += 1
        self._backoff.pop(src, None)

    def _on_relay_fail(self, src: str, msg: Mapping[str, Any], now: float) -> None:
        key_id = _str(msg, "key_id", 64)
        rel = self._relays.pop(key_id, None)
        if rel is not None:
            self._relay_failed(rel, f"dropped on the way (reported by {src})", now)

    # ================================================================ withdrawals

    def _withdraw(self, per_dst: Mapping[str, Iterable[str]], local_ids: Iterable[str], now: float) -> None:
        """Withdraw ids at other KMEs; drop `local_ids` here once every one of them acked."""
        group = _WithdrawGroup(tuple(dict.fromkeys(local_ids)), set())
        for dst, ids in sorted(per_dst.items()):
            ids = tuple(dict.fromkeys(ids))
            if dst == self._node or not ids:
                continue
            w = _Withdrawal(self._new_id(), dst, ids, group, now, now + WITHDRAW_GIVE_UP_S)
            group.pending.add(w.wid)
            self._withdrawals[w.wid] = w
            self._send_withdrawal(w, now)
        if not group.pending:
            self._drop_local(group.local_ids)

    def _send_withdrawal(self, w: _Withdrawal, now: float) -> None:
        w.next_try_s = now + self._cfg.relay_timeout_s
        if self._router.next_hop(w.dst) is None:
            w.sent = False  # the pump sends it as soon as a route appears
            return
        if self._send_routed(w.dst, {"op": "withdraw", "wid": w.wid, "ids": list(w.ids)}):
            self._n["withdrawals_sent"] += 1
            w.sent = True

    def _withdrawal_done(self, w: _Withdrawal, acked: bool) -> None:
        self._withdrawals.pop(w.wid, None)
        w.group.pending.discard(w.wid)
        if not w.group.pending:
            self._drop_local(w.group.local_ids)

    def _drop_local(self, ids: Iterable[str]) -> None:
        with self._store.transaction():
            for kid in ids:
                try:
                    self._store.get_key(kid)
                    self._store.drop_key(kid)
                    self._n["keys_withdrawn"] += 1
                except KeyNotFound:  # KeyConsumed included: a tombstone already
                    continue

    def _on_withdraw(self, src: str, msg: Mapping[str, Any], now: float) -> None:
        wid = _str(msg, "wid", 64)
        ids = _strs(msg, "ids")
        with self._store.transaction():
            for kid in ids:
                for x in (kid, _relay.derived_key_id(kid)):
                    try:
                        k = self._store.get_key(x)
                    except KeyConsumed:
                        continue
                    except KeyNotFound:
                        if x == kid:
                            self._tombstone(kid, src, now)
                        continue
                    if k.owner != src:
                        continue  # only the owner withdraws a key
                    self._store.drop_key(x)
                    self._n["keys_withdrawn"] += 1
        self._send_routed(src, {"op": "withdraw_ack", "wid": wid})

    def _tombstone(self, kid: str, owner: str, now: float) -> None:
        """Mark an unknown id withdrawn, so that a relay or wrap arriving late is refused."""
        try:
            if str(uuid.UUID(kid)) != kid:
                return
            self._store.put_key(kid, owner, b"\x00", owner=owner, origin="relay", state=KeyState.PENDING, now=now)
            self._store.drop_key(kid)
        except (ValueError, KeyStoreError):
            return

    def _on_withdraw_ack(self, src: str, msg: Mapping[str, Any], now: float) -> None:
        wid = _str(msg, "wid", 64)
        w = self._withdrawals.get(wid)
        if w is not None and w.dst == src:
            self._withdrawal_done(w, acked=True)

    def _recover(self, now: float) -> None:
        """Withdraw what a previous incarnation left half-done (module docstring, table in 4)."""
        saes = self._cfg.saes
        per_dst: dict[str, list[str]] = {}
        local: list[str] = []
        for k in _list_keys(self._store, KeyState.PENDING, self._node):
            per_dst.setdefault(k.peer_kme, []).append(k.key_id)
            local.append(k.key_id)
        for k in _list_keys(self._store, KeyState.ASSIGNED, self._node):
            if k.master_sae is not None and k.master_sae in k.delivered_to:
                continue  # the master has it; local additional slaves may still fetch it
            dsts = {k.peer_kme} | {saes[s] for s in k.slave_saes if s in saes}
            for d in dsts:
                per_dst.setdefault(d, []).append(k.key_id)
            local.append(k.key_id)
        if local:
            self._withdraw(per_dst, local, now)

    # ================================================================ enc requests (master side)

    def _run_enc_queue(self, key: tuple[str, str], now: float) -> None:
        q = self._enc_queues[key]
        for r in q:
            if r.state is ReqState.WAITING and not self._serve_enc(r, now):
                break  # arrival order: nothing behind a waiting request takes keys
        while q:
            head = q[0]
            if head.state is ReqState.ACKED:
                self._commit_enc(head, now)
            if head.state not in (ReqState.DONE, ReqState.FAILED):
                break
            q.popleft()
            self._active_reqs.discard(head.req)
            self._events.append(head.result)
            if isinstance(head.result, RequestDone):
                self._n["requests_done"] += 1
                self._n["keys_delivered"] += len(head.result.keys)
                self._events.append(KeysDelivered(head.master, len(head.result.keys), head.size_bits))
            else:
                self._n["requests_failed"] += 1
        if not q:
            del self._enc_queues[key]

    def _fail_enc(self, r: EncRequest, error: KmsError) -> bool:
        r.state = ReqState.FAILED
        r.result = RequestFailed(r.req, error)
        return True

    def _serve_enc(self, r: EncRequest, now: float) -> bool:
        """Take keys and send the assignment; False while the request must keep waiting."""
        cfg = self._cfg
        size_b = r.size_bits // 8
        per_key = -(-size_b // self._default_bytes)
        wrap_each = -(-(size_b + _relay.MAC_KEY_BYTES) // self._default_bytes)
        bits = cfg.key_size_bits
        unreachable = [k for k in ((r.r_kme,) if r.mode != "local" else ()) + r.q_kmes if not self._router.path(k)]

        def short_of(peer: str, n: int) -> bool:
            return self._store.count_keys(peer, self._node, KeyState.READY, bits) < n

        need_r = r.number * per_key + self._mac_keys if r.mode in ("qkd", "hybrid") else 0
        short_r = need_r > 0 and (r.r_kme in unreachable or short_of(r.r_kme, need_r))
        if short_r and r.on_empty == "pqc" and r.r_kme not in unreachable:
            r.mode, r.fallback, need_r, short_r = "pqc", True, 0, False
            self._n["pqc_fallbacks"] += 1
            self._events.append(PqcFallback(r.master, r.slave))
        short_q = [qk for qk in r.q_kmes if qk in unreachable or short_of(qk, r.number * wrap_each)]
        if short_r or short_q or (r.mode == "pqc" and r.r_kme in unreachable):
            what = ", ".join(sorted(({r.r_kme} if short_r or r.mode == "pqc" else set()) | set(short_q)))
            if r.on_empty == "fail" or now >= r.deadline_s:
                return self._fail_enc(
                    r,
                    unavailable(f"{MSG_NOT_AVAILABLE}: no key material for KME {what} (SAE pair {r.master} -> {r.slave})"),
                )
            return False
        epoch: PqcEpoch | None = None
        if r.mode in ("pqc", "hybrid"):
            epoch = self._pqc_epoch(r.r_kme, now)
            if epoch is None:
                if self._pqc_unavailable is not None:
                    return self._fail_enc(r, unavailable(f"PQC keys are not available: {self._pqc_unavailable}"))
                if now >= r.deadline_s:
                    return self._fail_enc(r, unavailable(f"no PQC key exchange with KME {r.r_kme} in time"))
                return False
            r.epoch_id = epoch.epoch_id
        try:
            wrap_rows = self._acquire(r, epoch, per_key, wrap_each, now)
        except KeyExhausted:  # counted a moment ago; cannot happen in one thread, but stay safe
            return False
        self._send_assignment(r, wrap_rows, now)
        return True

    def _acquire(
        self, r: EncRequest, epoch: PqcEpoch | None, per_key: int, wrap_each: int, now: float
    ) -> dict[str, StoredKey]:
        """Take the keys' material (one transaction) and compute the keys (kept in memory until the commit)."""
        st, node, bits = self._store, self._node, self._cfg.key_size_bits
        size_b = r.size_bits // 8
        extra = context_extra(r.mode, r.size_bits, r.master, r.slaves)
        planned: list[PlannedKey] = []
        with st.transaction():
            comps: list[StoredKey] = []
            macs: list[StoredKey] = []
            if r.mode in ("qkd", "hybrid"):
                taken = st.take_ready(r.r_kme, node, r.number * per_key + self._mac_keys, bits,
                                      master_sae=r.master, slave_saes=r.slaves, parties=r.local_parties)  # fmt: skip
                comps, macs = taken[: r.number * per_key], taken[r.number * per_key :]
            wraps = {
                qk: st.take_ready(qk, node, r.number * wrap_each, bits, master_sae=r.master, slave_saes=r.slaves,
                                  parties=(r.master,))  # fmt: skip
                for qk in r.q_kmes
            }
            for i in range(r.number):
                if r.mode in ("local", "pqc"):
                    kid = self._new_id()
                    if r.mode == "local":
                        key, origin = bytes(self._rand(size_b)), "local"
                    else:
                        assert epoch is not None
                        key, origin = epoch.derive_key(key_id=kid, length_bytes=size_b, extra=extra), "pqc"
                    st.put_key(kid, r.r_kme, key, owner=node, origin=origin, state=KeyState.READY, now=now)
                    st.set_state(kid, KeyState.ASSIGNED, master_sae=r.master, slave_saes=r.slaves,
                                 parties=r.local_parties)  # fmt: skip
                    pk = PlannedKey(kid, kid, (), origin, True, {}, key)
                else:
                    parts = comps[i * per_key : (i + 1) * per_key]
                    base = parts[0].key_id
                    material = b"".join(p.key for p in parts)[:size_b]
                    if r.mode == "qkd" and per_key == 1 and size_b == self._default_bytes:
                        pk = PlannedKey(base, base, (base,), parts[0].origin, True, {}, material)
                    else:
                        kid = _relay.derived_key_id(base)
                        if r.mode == "hybrid":
                            assert epoch is not None
                            key = epoch.derive_key(key_id=kid, length_bytes=size_b, qkd_key=material, extra=extra)
                        else:
                            key = material
                        if r.mode == "hybrid":
                            origin = "hybrid"
                        else:
                            origin = "relay" if any(p.origin == "relay" for p in parts) else "link"
                        pk = PlannedKey(kid, base, tuple(p.key_id for p in parts), origin, False, {}, key)
                for qk, ws in wraps.items():
                    pk.wraps[qk] = tuple(w.key_id for w in ws[i * wrap_each : (i + 1) * wrap_each])
                planned.append(pk)
            wrap_rows = {w.key_id: w for ws in wraps.values() for w in ws}
        r.keys = planned
        r.rid = self._new_rid()
        r.mac_ids = tuple(m.key_id for m in macs)
        if macs:
            r.mac_key = b"".join(m.key for m in macs)[: _relay.MAC_KEY_BYTES]
        elif epoch is not None:  # policy pqc: the assignment MAC key comes from the epoch
            r.mac_key = epoch.derive_key(key_id=r.rid, length_bytes=_relay.MAC_KEY_BYTES, extra=("assign-mac",))
        made_here = [k.key_id for k in planned if k.stored and not k.parts]  # pqc / local keys
        r.local_ids = [c.key_id for c in comps] + list(r.mac_ids) + list(wrap_rows) + made_here
        to_r = [c.key_id for c in comps] + list(r.mac_ids) + [k.key_id for k in planned if not k.parts]
        r.withdraw_to = {}
        if r.r_kme != node:
            r.withdraw_to[r.r_kme] = to_r
        for qk in r.q_kmes:
            r.withdraw_to[qk] = [w for k in planned for w in k.wraps[qk]] + [k.base_id for k in planned]
        self._n["keys_assigned"] += r.number
        return wrap_rows

    def _send_assignment(self, r: EncRequest, wrap_rows: Mapping[str, StoredKey], now: float) -> None:
        size_b = r.size_bits // 8
        r.acks = set()
        if r.r_kme != self._node:
            aad = assign_aad(self._node, r.r_kme, r.rid, r.master, r.slaves, r.mode, r.size_bits, r.epoch_id,
                             [(k.key_id, k.parts) for k in r.keys], r.mac_ids)  # fmt: skip
            tag = _relay.wc_tag(_relay.auth_data(_relay.ASSIGN_LABEL, *aad), r.mac_key)
            r.mac_key = b""
            body = {"op": "assign", "rid": r.rid, "master": r.master, "slaves": list(r.slaves), "policy": r.mode,
                    "size_bits": r.size_bits, "epoch": r.epoch_id,
                    "keys": [{"id": k.key_id, "parts": list(k.parts)} for k in r.keys],
                    "mac_keys": list(r.mac_ids), "tag": tag}  # fmt: skip
            self._send_routed(r.r_kme, body)
            r.acks.add(r.r_kme)
        for qk in r.q_kmes:
            items = []
            for k in r.keys:
                ids = k.wraps[qk]
                material = b"".join(wrap_rows[w].key for w in ids)[: size_b + _relay.MAC_KEY_BYTES]
                aad = _relay.auth_data(_relay.WRAP_LABEL, self._node, qk, r.rid, k.key_id, r.master,
                                       r.size_bits, *r.slaves, *ids)  # fmt: skip
                ct, tag = _relay.seal_otp(k.key, material, aad)
                items.append({"id": k.key_id, "wraps": list(ids), "ct": ct, "tag": tag})
            self._send_routed(qk, {"op": "wrap", "rid": r.rid, "master": r.master, "slaves": list(r.slaves),
                                   "size_bits": r.size_bits, "keys": items})  # fmt: skip
            r.acks.add(qk)
        if r.acks:
            r.state = ReqState.ASSIGNING
            r.assign_deadline_s = now + self._cfg.assign_timeout_s
            self._assigning[r.rid] = r
        else:
            r.state = ReqState.ACKED

    def _on_assign_ack(self, src: str, msg: Mapping[str, Any], now: float) -> None:
        rid = _str(msg, "rid")
        r = self._assigning.get(rid)
        if r is None or src not in r.acks:
            return  # late: the request failed already
        if msg.get("ok") is True:
            r.acks.discard(src)
            if not r.acks:
                del self._assigning[rid]
                r.state = ReqState.ACKED
            return
        reason = msg.get("reason")
        reason = reason if isinstance(reason, str) and len(reason) < 200 else "refused"
        if reason == "unknown-epoch" and src in self._pqc_out:
            self._pqc_out[src].epoch = None  # the peer lost it (restart): negotiate a new one
        self._abort_enc(r, unavailable(f"KME {src} refused the key assignment: {reason}"), now)

    def _abort_enc(self, r: EncRequest, error: KmsError, now: float) -> None:
        self._assigning.pop(r.rid, None)
        self._fail_enc(r, error)
        r.keys = []  # forget the bytes
        self._withdraw(r.withdraw_to, r.local_ids, now)

    def _commit_enc(self, r: EncRequest, now: float) -> None:
        """Deliver the keys to the master in one transaction; then (and only then) RequestDone."""
        st = self._store
        delivered: list[DeliveredKey] = []
        try:
            with st.transaction():
                for k in r.keys:
                    if not k.stored:
                        st.put_key(k.key_id, r.r_kme, k.key, owner=self._node, origin=k.origin,
                                   state=KeyState.READY, now=now)  # fmt: skip
                        st.set_state(k.key_id, KeyState.ASSIGNED, master_sae=r.master, slave_saes=r.slaves,
                                     parties=r.local_parties)  # fmt: skip
                        for p in k.parts:
                            st.drop_key(p)
                    got = st.deliver(k.key_id, r.master)
                    delivered.append(DeliveredKey(k.key_id, got.key, r.size_bits))
                for k in r.keys:
                    for ws in k.wraps.values():
                        for w in ws:
                            st.drop_key(w)
                for m in r.mac_ids:
                    st.drop_key(m)
        except KeyStoreError as exc:
            self._abort_enc(r, unavailable(f"key store refused the delivery ({type(exc).__name__})"), now)
            return
        r.keys = []
        r.state = ReqState.DONE
        r.result = RequestDone(r.req, tuple(delivered))

    # ================================================================ slave side: assign, wrap

    def _on_assign(self, src: str, msg: Mapping[str, Any], now: float, expires_s: float | None = None) -> None:
        rid = _str(msg, "rid")
        try:
            reason = self._accept_assign(src, msg, now)
        except _Malformed:
            self._n["messages_malformed"] += 1
            reason = "malformed"
        if reason == "park":
            if len(self._parked_assigns) >= MAX_PARKED:
                reason = "busy"
            else:
                expiry = now + self._cfg.assign_timeout_s if expires_s is None else expires_s
                self._parked_assigns.append(_ParkedAssign(src, msg, expiry))
                return
        ack: dict[str, Any] = {"op": "assign_ack", "rid": rid, "ok": reason is None}
        if reason is not None:
            ack["reason"] = reason
        self._send_routed(src, ack)

    def _slave_side_checks(self, src: str, msg: Mapping[str, Any]) -> tuple[str, tuple[str, ...], tuple[str, ...], int]:
        saes = self._cfg.saes
        master = _str(msg, "master")
        slaves = _strs(msg, "slaves", self._cfg.max_sae_id_count + 1)
        size_bits = _int(msg, "size_bits", 8, self._cfg.max_key_size_bits)
        if saes.get(master) != src or size_bits % 8 or not slaves or any(s not in saes for s in slaves):
            raise _Malformed("assignment names SAEs that do not fit")
        here = tuple(s for s in slaves if saes[s] == self._node)
        if not here:
            raise _Malformed("assignment for no SAE here")
        return master, slaves, here, size_bits

    def _accept_assign(self, src: str, msg: Mapping[str, Any], now: float) -> str | None:
        """None when the keys are assigned here; "park" to wait for the epoch; else a reason."""
        master, slaves, here, size_bits = self._slave_side_checks(src, msg)
        policy = msg.get("policy")
        keys = msg.get("keys")
        if policy not in ("qkd", "pqc", "hybrid") or not isinstance(keys, list) or not keys:
            raise _Malformed("bad assignment")
        if len(keys) > self._cfg.max_keys_per_request:
            raise _Malformed("too many keys")
        epoch: PqcEpoch | None = None
        if policy != "qkd":
            eid = msg.get("epoch")
            if not isinstance(eid, int) or isinstance(eid, bool):
                raise _Malformed("a pqc or hybrid assignment names its epoch")
            epoch = self._pqc_in.get(src, {}).get(eid)
            if epoch is None:
                # an exchange we answered may be confirmed any moment (the confirmation can be
                # overtaken after a reroute): wait for it; an epoch we never heard of (we
                # restarted) is refused at once, so that the master negotiates a new one
                return "park" if self._pqc_answered.get(src) == eid else "unknown-epoch"
        size_b = size_bits // 8
        per_key = -(-size_b // self._default_bytes)
        extra = context_extra(policy, size_bits, master, slaves)
        st = self._store
        rid = _str(msg, "rid")
        items: list[tuple[str, tuple[str, ...]]] = []
        for item in keys:
            if not isinstance(item, Mapping):
                raise _Malformed("bad key item")
            items.append((_str(item, "id", 64), _strs(item, "parts", per_key)))
        mac_ids = _strs(msg, "mac_keys", self._mac_keys)
        tag = _bytes(msg, "tag", _relay.TAG_BYTES)
        eid = msg.get("epoch")
        aad = _relay.auth_data(
            _relay.ASSIGN_LABEL,
            *assign_aad(src, self._node, rid, master, slaves, policy, size_bits,
                        eid if isinstance(eid, int) and not isinstance(eid, bool) else None, items, mac_ids),
        )  # fmt: skip
        try:
            if policy == "pqc":
                assert epoch is not None
                if mac_ids:
                    raise _Malformed("pqc assignments are authenticated by the epoch")
                mac_key = epoch.derive_key(key_id=rid, length_bytes=_relay.MAC_KEY_BYTES, extra=("assign-mac",))
            else:
                if len(mac_ids) != self._mac_keys or len(set(mac_ids)) != len(mac_ids):
                    raise _Malformed("wrong number of MAC keys")
                rows = [st.get_key(m) for m in mac_ids]
                if any(m.state is not KeyState.READY or m.owner != src or m.peer_kme != src for m in rows):
                    raise _Refused("the assignment's MAC keys are not READY keys of the sender")
                mac_key = b"".join(m.key for m in rows)[: _relay.MAC_KEY_BYTES]
            if not hmac.compare_digest(_relay.wc_tag(aad, mac_key), tag):
                self._n["assigns_rejected"] += 1
                with st.transaction():  # spent: a one-time key that checked a forgery is not reused
                    for m in mac_ids:
                        st.drop_key(m)
                raise _Refused("assignment MAC does not verify")
        except _Refused as exc:
            return str(exc)
        except KeyNotFound:
            return "unknown key"
        try:
            with st.transaction():
                for m in mac_ids:
                    st.drop_key(m)
                for kid, parts in items:
                    if policy == "pqc":
                        if parts:
                            raise _Malformed("pqc keys have no parts")
                        assert epoch is not None
                        key = epoch.derive_key(key_id=kid, length_bytes=size_b, extra=extra)
                        st.put_key(kid, src, key, owner=src, origin="pqc", state=KeyState.READY, now=now)
                    else:
                        if len(parts) != per_key or len(set(parts)) != per_key:
                            raise _Malformed("wrong number of parts")
                        rows = [st.get_key(p) for p in parts]
                        for row in rows:
                            if row.state is not KeyState.READY or row.owner != src or row.peer_kme != src:
                                raise _Refused(f"key {row.key_id} is not a READY key of {src}")
                            if row.size_bits != self._cfg.key_size_bits:
                                raise _Refused(f"key {row.key_id} has another size")
                        material = b"".join(row.key for row in rows)[:size_b]
                        if policy == "qkd" and per_key == 1 and size_b == self._default_bytes:
                            if kid != parts[0]:
                                raise _Malformed("key id is not its part's")
                        else:
                            if kid != _relay.derived_key_id(parts[0]):
                                raise _Malformed("derived key id does not match")
                            if policy == "hybrid":
                                assert epoch is not None
                                key = epoch.derive_key(key_id=kid, length_bytes=size_b, qkd_key=material, extra=extra)
                            else:
                                key = material
                            origin = "hybrid" if policy == "hybrid" else rows[0].origin
                            st.put_key(kid, src, key, owner=src, origin=origin, state=KeyState.READY, now=now)
                            for p in parts:
                                st.drop_key(p)
                    st.set_state(kid, KeyState.ASSIGNED, master_sae=master, slave_saes=slaves, parties=here)
        except _Refused as exc:
            return str(exc)
        except KeyConsumed:
            return "a key was consumed or withdrawn"
        except KeyNotFound:
            return "unknown key"
        except (KeyStoreError, HybridError) as exc:
            return f"refused ({type(exc).__name__})"
        self._n["keys_accepted"] += len(keys)
        return None

    def _on_wrap(self, src: str, msg: Mapping[str, Any], now: float) -> None:
        rid = _str(msg, "rid")
        st = self._store
        reason: str | None = None
        spent: list[str] = []  # wrap keys that checked a forgery: dropped after the rollback
        keys: Any = ()
        try:
            # Inside the try: a malformed wrap is answered at once (like a malformed assign),
            # so the master does not wait out its timeout.
            master, slaves, here, size_bits = self._slave_side_checks(src, msg)
            keys = msg.get("keys")
            if not isinstance(keys, list) or not keys or len(keys) > self._cfg.max_keys_per_request:
                raise _Malformed("bad wrap")
            size_b = size_bits // 8
            wrap_each = -(-(size_b + _relay.MAC_KEY_BYTES) // self._default_bytes)
            with st.transaction():
                for item in keys:
                    if not isinstance(item, Mapping):
                        raise _Malformed("bad key item")
                    kid = _str(item, "id", 64)
                    ids = _strs(item, "wraps", wrap_each)
                    ct = _bytes(item, "ct", size_b)
                    tag = _bytes(item, "tag", _relay.TAG_BYTES)
                    if len(ids) != wrap_each or len(set(ids)) != wrap_each:
                        raise _Malformed("wrong number of wrap keys")
                    rows = [st.get_key(w) for w in ids]
                    if any(w.state is not KeyState.READY or w.owner != src or w.peer_kme != src for w in rows):
                        raise _Refused("wrap keys are not READY keys of the sender")
                    material = b"".join(w.key for w in rows)[: size_b + _relay.MAC_KEY_BYTES]
                    aad = _relay.auth_data(_relay.WRAP_LABEL, src, self._node, rid, kid, master, size_bits,
                                           *slaves, *ids)  # fmt: skip
                    whole = len(material) == size_b + _relay.MAC_KEY_BYTES
                    key = _relay.open_otp(ct, tag, material, aad) if whole else None
                    if key is None:
                        self._n["wraps_rejected"] += 1
                        spent = list(ids)
                        raise _Refused("wrap MAC does not verify")
                    st.put_key(kid, src, key, owner=src, origin="relay", state=KeyState.READY, now=now)
                    st.set_state(kid, KeyState.ASSIGNED, master_sae=master, slave_saes=slaves, parties=here)
                    for w in ids:
                        st.drop_key(w)
        except _Refused as exc:
            reason = str(exc)
        except _Malformed:
            self._n["messages_malformed"] += 1
            reason = "malformed"
        except KeyNotFound:
            reason = "unknown key"
        except KeyStoreError as exc:
            reason = f"refused ({type(exc).__name__})"
        if spent:  # as for an assignment's MAC keys: a one-time key that checked a forgery is not reused
            with st.transaction():
                for w in spent:
                    st.drop_key(w)
        if reason is None:
            self._n["keys_accepted"] += len(keys)
        ack: dict[str, Any] = {"op": "assign_ack", "rid": rid, "ok": reason is None}
        if reason is not None:
            ack["reason"] = reason
        self._send_routed(src, ack)

    # ================================================================ dec requests (slave side)

    def _run_dec_queue(self, key: tuple[str, str], now: float) -> None:
        q = self._dec_queues[key]
        for d in q:
            if d.state is ReqState.WAITING and not self._serve_dec(d, now):
                break
        while q and q[0].state in (ReqState.DONE, ReqState.FAILED):
            d = q.popleft()
            self._active_reqs.discard(d.req)
            self._events.append(d.result)
            if isinstance(d.result, RequestDone):
                self._n["requests_done"] += 1
                self._n["keys_delivered"] += len(d.result.keys)
                sizes = Counter(k.size_bits for k in d.result.keys)
                for size, count in sorted(sizes.items()):
                    self._events.append(KeysDelivered(d.caller, count, size))
            else:
                self._n["requests_failed"] += 1
        if not q:
            del self._dec_queues[key]

    def _serve_dec(self, d: DecRequest, now: float) -> bool:
        def fail(error: KmsError) -> bool:
            d.state, d.result = ReqState.FAILED, RequestFailed(d.req, error)
            return True

        missing: str | None = None
        for kid in d.key_ids:
            try:
                k = self._store.get_key(kid)
            except KeyConsumed:
                return fail(key_not_found(kid))
            except KeyNotFound:
                missing = missing or kid
                continue
            if k.state is not KeyState.ASSIGNED:
                missing = missing or kid
                continue
            if d.caller not in k.parties or d.caller == k.master_sae or k.master_sae != d.master:
                return fail(
                    unauthorized(f"key_ID {kid} was not issued to SAE {d.caller} by SAE {d.master}", key_ID=kid)
                )
            if d.caller in k.delivered_to:
                return fail(key_not_found(kid))
            if k.owner == self._node and k.master_sae not in k.delivered_to:
                missing = missing or kid  # the master has not got it yet
        if missing is not None:
            if now >= d.deadline_s:
                return fail(key_not_found(missing))
            return False
        out: list[DeliveredKey] = []
        try:
            with self._store.transaction():
                for kid in d.key_ids:
                    got = self._store.deliver(kid, d.caller)
                    out.append(DeliveredKey(kid, got.key, got.size_bits))
        except KeyStoreError:
            return fail(unavailable("key store refused the delivery"))
        d.state, d.result = ReqState.DONE, RequestDone(d.req, tuple(out))
        return True

    # ================================================================ PQC epochs

    def _pqc_identity(self) -> KmeIdentity | None:
        if self._identity is None and self._pqc_unavailable is None:
            cfg = self._cfg
            if not (cfg.kme_cert_pem and cfg.kme_key_pem and cfg.ca_pem):
                self._pqc_unavailable = f"KME {self._node} has no certificate for the PQC exchange"
                return None
            try:
                self._identity = KmeIdentity(self._node, cfg.kme_cert_pem, cfg.kme_key_pem, cfg.ca_pem)
                self._responder = PqcResponder(identity=self._identity, peers=self._nodes - {self._node})
            except HybridError as exc:
                self._pqc_unavailable = f"KME {self._node}: {exc}"
        return self._identity

    def _pqc_epoch(self, peer: str, now: float) -> PqcEpoch | None:
        """The epoch this KME initiated with `peer` (a rekey starts in the background when stale)."""
        link = self._pqc_out.setdefault(peer, _PqcOut())
        stale = link.epoch is None or now - link.established_s >= self._cfg.pqc_rekey_s
        if stale and link.initiator is None:
            self._pqc_start(peer, link, now)
        if link.epoch is not None and now - link.established_s >= 2 * self._cfg.pqc_rekey_s:
            return None  # too old to use while the rekey runs
        return link.epoch

    def _pqc_start(self, peer: str, link: _PqcOut, now: float) -> None:
        ident = self._pqc_identity()
        if ident is None or self._router.next_hop(peer) is None:
            return
        epoch_id = max(link.last_epoch_id + 1, int(self._utc(now).timestamp() * 1e6))
        try:
            init = PqcInitiator(identity=ident, peer=peer, epoch_id=epoch_id)
            first = init.start()
        except HybridError as exc:
            self._pqc_unavailable = f"PQC exchange with {peer}: {exc}"
            return
        link.last_epoch_id = epoch_id
        link.initiator = init
        link.deadline_s = now + 2 * self._cfg.relay_timeout_s
        self._send_routed(peer, {"op": "pqc", "m": first.to_dict()})

    def _on_pqc(self, src: str, msg: Mapping[str, Any], now: float) -> None:
        m = msg.get("m")
        try:
            pm = message_from_dict(m if isinstance(m, Mapping) else {})
            if isinstance(pm, PqcInit):
                if pm.initiator != src or self._pqc_identity() is None or self._responder is None:
                    raise _Refused("init refused")
                resp = self._responder.receive_init(pm, now=self._utc(now))
                self._pqc_answered[src] = pm.epoch_id
                self._send_routed(src, {"op": "pqc", "m": resp.to_dict()})
            elif isinstance(pm, PqcResponse):
                link = self._pqc_out.get(src)
                if link is None or link.initiator is None or pm.epoch_id != link.initiator.epoch_id:
                    raise _Refused("unexpected response")
                init, link.initiator = link.initiator, None
                confirm, epoch = init.receive_response(pm, now=self._utc(now))
                self._send_routed(src, {"op": "pqc", "m": confirm.to_dict()})
                link.epoch, link.established_s = epoch, now
                self._n["pqc_exchanges"] += 1
            elif isinstance(pm, PqcConfirm):
                if pm.initiator != src or self._responder is None:
                    raise _Refused("unexpected confirmation")
                epoch = self._responder.receive_confirm(pm)
                self._pqc_answered.pop(src, None)
                kept = self._pqc_in.setdefault(src, {})
                kept[epoch.epoch_id] = epoch
                for old in sorted(kept)[:-PQC_EPOCHS_KEPT]:
                    del kept[old]
                self._n["pqc_exchanges"] += 1
                self._retry_parked_assigns(src, now)
        except (PqcProtocolError, HybridError, _Refused):
            self._n["pqc_failures"] += 1

    def _retry_parked_assigns(self, src: str, now: float) -> None:
        mine = [p for p in self._parked_assigns if p.src == src]
        self._parked_assigns = [p for p in self._parked_assigns if p.src != src]
        for p in mine:
            try:
                self._on_assign(p.src, p.body, now, p.expires_s)
            except _Malformed:
                self._n["messages_malformed"] += 1

    # ================================================================ apps

    def _on_app(self, src: str, msg: Mapping[str, Any], now: float) -> None:
        app = _str(msg, "app")
        body = msg.get("body")
        if not isinstance(body, Mapping):
            raise _Malformed("an app message carries a map body")
        self._events.append(AppMessage(src, app, dict(body)))

    _ROUTED: Final[dict[str, Callable[[Kme, str, Mapping[str, Any], float], None]]] = {
        "relay_ok": _on_relay_ok,
        "relay_fail": _on_relay_fail,
        "withdraw": _on_withdraw,
        "withdraw_ack": _on_withdraw_ack,
        "assign": _on_assign,
        "wrap": _on_wrap,
        "assign_ack": _on_assign_ack,
        "pqc": _on_pqc,
        "app": _on_app,
    }


class _Refused(Exception):
    """A well-formed request this KME will not carry out (answered with a reason)."""
