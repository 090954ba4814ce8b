"""tunnel: an encrypted UDP tunnel between two SAEs, keyed through the KMS (issue 5 demo).

Theory of operation
-------------------
Two instances run, a *sender* and a *receiver*, each acting as one SAE (the sender is
the master SAE of every key, the receiver the slave). They need not be neighbours: the
control messages travel as `RoutedSend`s (forwarded hop by hop by the KMEs, best effort),
the traffic as UDP datagrams between two app sockets (`UdpOpen` / `UdpSend` /
`handle_datagram`), keys come from each node's own KME (`KmsCall`, ETSI GS QKD 014).

1. Both open a UDP socket. The receiver announces its address to the sender with
   ``{"op": "addr", "host", "port"}``, again every ``retry_s`` until the first authentic
   datagram arrives.
2. On the address, the sender asks its KME for a key: ``enc_keys`` (ETSI GS QKD 014 §5.3) with
   ``number=1``, ``size=key_size_bits``, slave ``peer_sae``. From the key container
   (§6.3: ``{"keys": [{"key_ID", "key"}]}``, key in base64) it derives the traffic key
   with HKDF-SHA256 (RFC 5869; salt empty, i.e. HashLen zeros, §2.2) and

       info = b"qnetem-tunnel" || key_ID (16 UUID bytes) || lp(sender SAE) || lp(receiver SAE)

   (lp = 2-byte big-endian length || UTF-8), which binds the key to its id and to the
   direction sender -> receiver. AES-256-GCM then seals each datagram:

       header  = version (1 byte, 1) || key_ID (16 bytes, UUID) || seq (8 bytes, big-endian)
       datagram = header || AES-GCM(key, nonce = 0x00000000 || seq, plaintext, AAD = header)

   This is the deterministic nonce construction of NIST SP 800-38D §8.2.1 (fixed field
   of 4 zero bytes, invocation field = seq): seq starts at 1 for every key and only grows,
   and a key id is never installed twice, so no (key, nonce) pair is ever reused. A key
   seals at most ``max_datagrams_per_key`` datagrams (far below 2^64) and is used for at
   most ``key_lifetime_s``.
3. Traffic: from the moment address, socket and a key are all there ("the tunnel is
   up"), one datagram every 1/rate_pps emulated seconds until ``duration_s`` after the
   app started. Each plaintext is ``payload_bytes`` long: pattern seed (8 bytes) ||
   datagram number (8 bytes) || SHAKE-128(label || those 16 bytes), so the receiver can
   check the content without sharing any state. A slot that finds no usable key (the
   old one expired while a new one is still being fetched) is not sent and counted
   (``datagrams_unsent``).
4. Rekeying: ``rekey_interval_s`` after a key was installed the sender fetches the next;
   it switches as soon as the key arrives and keeps sealing with the old one meanwhile
   (within the caps above). A fetch unanswered after ``fetch_timeout_s`` counts as failed.
5. Receiver: a datagram naming an unknown key id starts a ``dec_keys`` (§5.4, master SAE
   = the sender's) for that id — one outstanding fetch per id, at most ``_MAX_FETCHES``
   ids at once; datagrams for it wait in a bounded buffer. Each key has a sliding replay
   window of 64 (RFC 4303 §3.4.3): a sequence number left of the window or already seen
   is dropped as a replay before decryption; the window moves only after the GCM tag
   verified. A tag mismatch is an authentication failure: counted, never fatal.
6. End: at ``duration_s`` the sender sends ``{"op": "done", "sent": n}`` ``_DONE_COPIES``
   times, ``retry_s`` apart, then finishes. The receiver finishes ``grace_s`` after the
   first ``done`` (late or reordered datagrams still count), or at the latest
   ``duration_s + grace_s`` after its first authentic datagram (or its start).

KME failures. 503 (no key yet: the QKD links are still filling) and calls that did not
complete (status 0, time-outs, 5xx) are retried with exponential back-off (0.1 s doubling
to 2 s) until the duration ends, each counted in ``key_fetch_failures`` (per status in
``key_fetch_failures_by_status``). At the sender, 400/401 (or any other 4xx) are
configuration errors: the app fails naming the status. At the receiver a refused
``dec_keys`` may come from a datagram whose (unauthenticated) key id was forged or
corrupted, so it only marks that id refused (its datagrams count as authentication
failures); the receiver fails only after ``_MAX_REFUSALS`` refusals while no key was ever
obtained — a misconfiguration rather than an attack.

Parameters (``app_start`` params): ``role`` ("sender" | "receiver"; the orchestrator's
"responder" | "initiator" mean the same, in that order), ``sae`` (this end's SAE id; the
node must hold its credentials) and ``peer_sae`` — or instead ``saes`` = [sender SAE,
receiver SAE] as the orchestrator sends them —, ``peer`` (the other end's node),
``duration_s``; optional ``peer_app`` (default: this instance's name),
``rate_pps`` (50), ``payload_bytes`` (512; 16 .. 65466), ``rekey_interval_s`` (2.0),
``key_size_bits`` (256; 128 .. 8192, a multiple of 8), ``fetch_timeout_s`` (10 wall
seconds), ``key_lifetime_s`` (3 x rekey_interval_s), ``max_datagrams_per_key`` (2^32),
``grace_s`` (1.0), ``retry_s`` (0.5). Times are emulated seconds.

Results (`RESULT_KEYS`; counts only — never key bytes, CONVENTIONS 14): ``role``;
``bytes_carried`` (sender: payload bytes sent; receiver: payload bytes authentic and with
the right content); ``datagrams_sent`` (receiver: as the sender's ``done`` reported it,
None before), ``datagrams_received``, ``datagrams_authentic`` (GCM tag verified),
``auth_failures`` (tag mismatch, or a key id the KME refused), ``replays`` (RFC 4303
window), ``content_errors`` (authentic but not the pattern), ``malformed`` (short or
other version), ``datagrams_unsent`` (sender: slots without a usable key),
``dropped_no_key`` (receiver: buffer or fetch limit), ``stale_key`` (receiver: a key
already retired), ``rekeys`` (keys switched to after the first), ``keys_fetched``,
``keys_unused`` (fetched but superseded), ``key_fetch_failures`` and
``key_fetch_failures_by_status`` ({"503": n, "timeout": n, "0": n, ...}),
``traffic_s`` (sender: up to end; receiver: first to last authentic datagram),
``bytes_per_s`` (bytes_carried / traffic_s), ``bad_messages``, ``last_error`` (the latest
failure, fatal or not) and ``error`` (why the app failed, else None).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import enum
import hashlib
import struct
import uuid
from collections import OrderedDict, deque
from collections.abc import Hashable, Mapping
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from emulator.wire import Message

from ._params import int_param, number_param, peer_app_param
from .base import App, AppContext, AppParamError, AppState, KmsCall, KmsOp, KmsReply, RoutedSend, UdpOpen
from .base import UdpOpened, UdpSend

__all__ = [
    "HEADER",
    "RESULT_KEYS",
    "VERSION",
    "DatagramHeader",
    "ReplayWindow",
    "TunnelApp",
    "TunnelParams",
    "TunnelRole",
    "derive_traffic_key",
    "gcm_nonce",
    "parse_header",
    "pattern_payload",
    "payload_is_intact",
    "seal_datagram",
]

VERSION = 1
HEADER = struct.Struct(">B16sQ")  # version, key_ID (UUID bytes), seq
TAG_BYTES = 16  # AES-GCM tag (SP 800-38D §5.2.1.2, t = 128)
_MAX_UDP_PAYLOAD = 65_507  # IPv4: 65535 - 20 (IP) - 8 (UDP)
MIN_PAYLOAD_BYTES = 16  # pattern seed + datagram number
MAX_PAYLOAD_BYTES = _MAX_UDP_PAYLOAD - HEADER.size - TAG_BYTES
_HKDF_LABEL = b"qnetem-tunnel"
_PATTERN_LABEL = b"qnetem-tunnel-pattern"
_FIXED_NONCE_FIELD = bytes(4)  # SP 800-38D §8.2.1: fixed field (one sender per key)
REPLAY_WINDOW = 64  # RFC 4303 §3.4.3: at least 32, 64 recommended

_BACKOFF_MIN_S = 0.1
_BACKOFF_MAX_S = 2.0
_MAX_BURST = 1024  # datagrams sent per timer tick at most (the rest of a jump is counted unsent)
_DONE_COPIES = 3
_MAX_FETCHES = 4  # receiver: key ids being fetched at once
_MAX_BUFFER_PER_KEY = 256  # receiver: datagrams waiting for their key
_RX_KEYS_KEPT = 4  # receiver: installed keys kept (late datagrams across a rekey)
_FORGET_AFTER = 256  # receiver: retired / refused key ids remembered
_MAX_REFUSALS = 3  # receiver: refused dec_keys, with no key ever obtained, before failing
_ERROR_CHARS = 200

RESULT_KEYS = (
    "role", "bytes_carried", "datagrams_sent", "datagrams_received", "datagrams_authentic",
    "auth_failures", "replays", "content_errors", "malformed", "datagrams_unsent",
    "dropped_no_key", "stale_key", "rekeys", "keys_fetched", "keys_unused", "key_fetch_failures",
    "key_fetch_failures_by_status", "traffic_s", "bytes_per_s", "bad_messages", "last_error", "error",
)  # fmt: skip


class TunnelRole(enum.Enum):
    SENDER = "sender"  # master SAE: enc_keys, seals
    RECEIVER = "receiver"  # slave SAE: dec_keys, opens


# The orchestrator starts every app as initiator + responder; for a tunnel the receiver
# initiates (its results are the app's metrics; emulator/runtime/orchestrator.py).
_ROLE_NAMES: dict[object, TunnelRole] = {
    "sender": TunnelRole.SENDER, "receiver": TunnelRole.RECEIVER,
    "responder": TunnelRole.SENDER, "initiator": TunnelRole.RECEIVER,
}  # fmt: skip


@dataclasses.dataclass(frozen=True, slots=True)
class TunnelParams:
    role: TunnelRole
    sae: str
    peer_sae: str
    peer: str
    duration_s: float
    peer_app: str = ""
    rate_pps: float = 50.0
    payload_bytes: int = 512
    rekey_interval_s: float = 2.0
    key_size_bits: int = 256
    fetch_timeout_s: float = 10.0
    key_lifetime_s: float = 6.0
    max_datagrams_per_key: int = 1 << 32
    grace_s: float = 1.0
    retry_s: float = 0.5


_ACCEPTED_PARAMS = frozenset(f.name for f in dataclasses.fields(TunnelParams)) | {"saes"}


# ---------------------------------------------------------------------- the datagram format


@dataclasses.dataclass(frozen=True, slots=True)
class DatagramHeader:
    version: int
    key_id: uuid.UUID
    seq: int

    def pack(self) -> bytes:
        return HEADER.pack(self.version, self.key_id.bytes, self.seq)


def parse_header(data: bytes) -> DatagramHeader | None:
    """The header of a datagram, or None if it is too short or of another version."""
    if len(data) < HEADER.size + TAG_BYTES:
        return None
    version, key_id, seq = HEADER.unpack_from(data)
    if version != VERSION:
        return None
    return DatagramHeader(version, uuid.UUID(bytes=key_id), seq)


def _length_prefixed(text: str) -> bytes:
    raw = text.encode()
    return len(raw).to_bytes(2, "big") + raw


def derive_traffic_key(master_key: bytes, key_id: uuid.UUID, sender_sae: str, receiver_sae: str) -> bytes:
    """AES-256 key for direction sender -> receiver from a KMS key (RFC 5869 HKDF-SHA256)."""
    info = _HKDF_LABEL + key_id.bytes + _length_prefixed(sender_sae) + _length_prefixed(receiver_sae)
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(master_key)


def gcm_nonce(seq: int) -> bytes:
    """SP 800-38D §8.2.1 deterministic IV: 4-byte fixed field (zero) || 8-byte counter."""
    return _FIXED_NONCE_FIELD + seq.to_bytes(8, "big")


def seal_datagram(aead: AESGCM, key_id: uuid.UUID, seq: int, payload: bytes) -> bytes:
    header = HEADER.pack(VERSION, key_id.bytes, seq)
    return header + aead.encrypt(gcm_nonce(seq), payload, header)


def pattern_payload(pattern_seed: int, number: int, n_bytes: int) -> bytes:
    """A checkable payload: seed (8) || number (8) || SHAKE-128 of those, `n_bytes` in all."""
    head = struct.pack(">QQ", pattern_seed, number)
    return head + hashlib.shake_128(_PATTERN_LABEL + head).digest(n_bytes - len(head))


def payload_is_intact(payload: bytes) -> bool:
    if len(payload) < MIN_PAYLOAD_BYTES:
        return False
    head = payload[:MIN_PAYLOAD_BYTES]
    return payload[MIN_PAYLOAD_BYTES:] == hashlib.shake_128(_PATTERN_LABEL + head).digest(len(payload) - len(head))


class ReplayWindow:
    """RFC 4303 §3.4.3 anti-replay window (bitmap of `size` below the highest seq seen).

    `check(seq)` before authentication (cheap rejection); `update(seq)` only after the
    datagram authenticated, so forgeries cannot move the window. Sequence numbers start at 1.
    """

    __slots__ = ("_bitmap", "_mask", "_top", "size")

    def __init__(self, size: int = REPLAY_WINDOW) -> None:
        self.size = size
        self._mask = (1 << size) - 1
        self._top = 0  # highest authenticated seq (0: none yet)
        self._bitmap = 0  # bit i: seq top - i seen

    def check(self, seq: int) -> bool:
        """True if `seq` is new and not left of the window."""
        if seq <= 0:
            return False
        if seq > self._top:
            return True
        offset = self._top - seq
        return offset < self.size and not (self._bitmap >> offset) & 1

    def update(self, seq: int) -> None:
        if seq > self._top:
            shift = seq - self._top
            self._bitmap = ((self._bitmap << shift) | 1) & self._mask if shift < self.size else 1
            self._top = seq
        else:
            self._bitmap |= 1 << (self._top - seq)


class _ContainerError(ValueError):
    """The KME's key container is unusable (the message never quotes the body)."""


def _key_from_container(body: Any, want: uuid.UUID | None) -> tuple[uuid.UUID, bytes]:
    """(key id, key bytes) from an ETSI GS QKD 014 §6.3 key container: the first key, or
    the one with id `want`."""
    keys = body.get("keys") if isinstance(body, Mapping) else None
    if not isinstance(keys, list) or not keys:
        raise _ContainerError("the key container holds no keys")
    for entry in keys:
        if not isinstance(entry, Mapping):
            raise _ContainerError("a key container entry is not an object")
        raw_id, encoded = entry.get("key_ID"), entry.get("key")
        if not isinstance(raw_id, str) or not isinstance(encoded, str):
            raise _ContainerError("key_ID and key must be strings")
        try:
            key_id = uuid.UUID(raw_id)
        except ValueError:
            raise _ContainerError("key_ID is not a UUID") from None
        if want is not None and key_id != want:
            continue
        try:
            key = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise _ContainerError("key is not valid base64") from None
        if len(key) < 16:
            raise _ContainerError(f"a key of {len(key) * 8} bits is too short (at least 128)")
        return key_id, key
    raise _ContainerError("the key container does not hold the requested key_ID")


class _TxKey:
    __slots__ = ("aead", "fetch_no", "installed_s", "key_id", "next_seq")

    def __init__(self, key_id: uuid.UUID, aead: AESGCM, fetch_no: int, installed_s: float) -> None:
        self.key_id = key_id
        self.aead = aead
        self.fetch_no = fetch_no
        self.installed_s = installed_s
        self.next_seq = 1

    def __repr__(self) -> str:
        return f"_TxKey(key_id={self.key_id}, next_seq={self.next_seq})"


class _RxKey:
    __slots__ = ("aead", "key_id", "window")

    def __init__(self, key_id: uuid.UUID, aead: AESGCM) -> None:
        self.key_id = key_id
        self.aead = aead
        self.window = ReplayWindow()

    def __repr__(self) -> str:
        return f"_RxKey(key_id={self.key_id})"


class _Fetch:
    """A receiver's dec_keys for one key id and the datagrams waiting for it."""

    __slots__ = ("attempt", "backoff_s", "buffer", "in_flight", "key_id")

    def __init__(self, key_id: uuid.UUID) -> None:
        self.key_id = key_id
        self.attempt = 0
        self.in_flight = False
        self.backoff_s = _BACKOFF_MIN_S
        self.buffer: deque[tuple[DatagramHeader, bytes]] = deque()

    def __repr__(self) -> str:
        return f"_Fetch(key_id={self.key_id}, attempt={self.attempt}, buffered={len(self.buffer)})"


class _Bounded:
    """A set that forgets its oldest members beyond `limit`."""

    __slots__ = ("_limit", "_order", "_set")

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._order: deque[uuid.UUID] = deque()
        self._set: set[uuid.UUID] = set()

    def add(self, item: uuid.UUID) -> None:
        if item in self._set:
            return
        self._order.append(item)
        self._set.add(item)
        if len(self._order) > self._limit:
            self._set.discard(self._order.popleft())

    def __contains__(self, item: object) -> bool:
        return item in self._set


def _status_text(reply: Any) -> tuple[int, str]:
    """(status, short reason) of a KmsReply (anything else: status 0). Error bodies (§6.5)
    carry `message`; key containers are never quoted."""
    if not isinstance(reply, KmsReply):
        return 0, f"unexpected reply {type(reply).__name__}"
    message = reply.body.get("message") if reply.status != 200 and isinstance(reply.body, Mapping) else None
    return reply.status, (message[:_ERROR_CHARS] if isinstance(message, str) else "")


class TunnelApp(App):
    """One end of an encrypted UDP tunnel (see the module docstring)."""

    KIND = "tunnel"

    @classmethod
    def parse_params(cls, params: Mapping[str, Any], ctx: AppContext) -> TunnelParams:
        for name in params:
            if name not in _ACCEPTED_PARAMS:
                raise AppParamError(str(name)[:64], "unknown parameter")
        raw_role = params.get("role")
        role = _ROLE_NAMES.get(raw_role) if isinstance(raw_role, str) else None
        if role is None:
            raise AppParamError("role", "must be 'sender' or 'receiver' (or 'responder' / 'initiator')")
        sae, peer_sae = cls._sae_params(params, role)
        if sae not in ctx.saes:
            raise AppParamError("sae", f"node {ctx.node!r} holds no credentials for SAE {sae[:64]!r}")
        peer = params.get("peer")
        if not isinstance(peer, str) or not peer:
            raise AppParamError("peer", "must be a node name")
        duration_s = number_param(params, "duration_s", None, 0.0, 1e7)
        if duration_s is None or duration_s <= 0.0:
            raise AppParamError("duration_s", "required, > 0")
        rate_pps = number_param(params, "rate_pps", 50.0, 0.0, 1e5)
        assert rate_pps is not None
        if rate_pps <= 0.0:
            raise AppParamError("rate_pps", "must be > 0")
        rekey_s = number_param(params, "rekey_interval_s", 2.0, 1e-3, 1e7)
        assert rekey_s is not None
        key_size_bits = int_param(params, "key_size_bits", 256, 128, 8192)
        assert key_size_bits is not None
        if key_size_bits % 8:
            raise AppParamError("key_size_bits", "must be a multiple of 8 (ETSI GS QKD 014 §6.2)")
        fetch_timeout_s = number_param(params, "fetch_timeout_s", 10.0 / ctx.time_scale, 1e-6, 1e7)
        lifetime_s = number_param(params, "key_lifetime_s", 3.0 * rekey_s, rekey_s, 1e9)
        retry_s = number_param(params, "retry_s", 0.5, 1e-3, 1e6)
        grace_s = number_param(params, "grace_s", 1.0, 0.0, 1e6)
        payload_bytes = int_param(params, "payload_bytes", 512, MIN_PAYLOAD_BYTES, MAX_PAYLOAD_BYTES)
        per_key = int_param(params, "max_datagrams_per_key", 1 << 32, 1, 1 << 62)
        # every one has a default
        assert fetch_timeout_s is not None and lifetime_s is not None and retry_s is not None
        assert grace_s is not None and payload_bytes is not None and per_key is not None
        return TunnelParams(
            role=role, sae=sae, peer_sae=peer_sae, peer=peer, duration_s=duration_s,
            peer_app=peer_app_param(params, ctx), rate_pps=rate_pps, payload_bytes=payload_bytes,
            rekey_interval_s=rekey_s, key_size_bits=key_size_bits, fetch_timeout_s=fetch_timeout_s,
            key_lifetime_s=lifetime_s, max_datagrams_per_key=per_key, grace_s=grace_s, retry_s=retry_s,
        )  # fmt: skip

    @staticmethod
    def _sae_params(params: Mapping[str, Any], role: TunnelRole) -> tuple[str, str]:
        """(this end's SAE, the other end's): from `sae` + `peer_sae`, or from the
        orchestrator's `saes` = [sender SAE, receiver SAE]."""
        if "saes" in params:
            if "sae" in params or "peer_sae" in params:
                raise AppParamError("saes", "give either saes or sae + peer_sae")
            saes = params["saes"]
            if (
                not isinstance(saes, list | tuple) or len(saes) != 2
                or not all(isinstance(x, str) and x for x in saes)
            ):  # fmt: skip
                raise AppParamError("saes", "must be [sender SAE, receiver SAE]")
            sender, receiver = saes
            sae, peer_sae = (sender, receiver) if role is TunnelRole.SENDER else (receiver, sender)
            if sae == peer_sae:
                raise AppParamError("saes", "the two SAEs must differ")
            return sae, peer_sae
        sae, peer_sae = params.get("sae"), params.get("peer_sae")
        if not isinstance(sae, str) or not sae:
            raise AppParamError("sae", "must be an SAE id")
        if not isinstance(peer_sae, str) or not peer_sae:
            raise AppParamError("peer_sae", "must be an SAE id")
        if peer_sae == sae:
            raise AppParamError("peer_sae", "must differ from sae")
        return sae, peer_sae

    def __init__(self, ctx: AppContext, params: TunnelParams) -> None:
        super().__init__(ctx, params)
        self.p = params
        self._sender = params.role is TunnelRole.SENDER
        # (master, slave) SAE: the HKDF direction
        self._direction = (params.sae, params.peer_sae) if self._sender else (params.peer_sae, params.sae)
        digest = hashlib.sha256(f"tunnel-pattern/{ctx.seed}/{ctx.node}/{ctx.name}".encode()).digest()
        self._pattern_seed = int.from_bytes(digest[:8], "big")
        self._deadlines: dict[Hashable, float] = {}
        self._end_s = 0.0
        self._local: tuple[str, int] | None = None
        # sender
        self._dest: tuple[str, int] | None = None
        self._tx: _TxKey | None = None
        self._used_ids = _Bounded(1 << 16)  # key ids ever installed: never seal under one twice
        self._fetch_no = 0
        self._pending: int | None = None  # the enc_keys fetch we wait for
        self._backoff_s = _BACKOFF_MIN_S
        self._backoff_until = 0.0  # no enc_keys before this (after a failure)
        self._up_s: float | None = None
        self._slot = 0  # next datagram number
        self._done_copies = 0
        # receiver
        self._rx: OrderedDict[uuid.UUID, _RxKey] = OrderedDict()
        self._retired = _Bounded(_FORGET_AFTER)
        self._refused = _Bounded(_FORGET_AFTER)
        self._fetches: dict[uuid.UUID, _Fetch] = {}
        self._refusals = 0
        self._first_ok_s: float | None = None
        self._last_ok_s: float | None = None
        self._done_seen = False
        self._peer_sent: int | None = None
        # counters
        self.bytes_carried = 0
        self.datagrams_sent = 0
        self.datagrams_received = 0
        self.datagrams_authentic = 0
        self.auth_failures = 0
        self.replays = 0
        self.content_errors = 0
        self.malformed = 0
        self.datagrams_unsent = 0
        self.dropped_no_key = 0
        self.stale_key = 0
        self.rekeys = 0
        self.keys_fetched = 0
        self.keys_unused = 0
        self.key_fetch_failures = 0
        self.failures_by_status: dict[str, int] = {}
        self.bad_messages = 0
        self.last_error: str | None = None

    def __repr__(self) -> str:
        p = self.p
        return f"<TunnelApp {self.ctx.name!r} {p.role.value} {p.sae!r}->{p.peer_sae!r} {self.state.value}>"

    # ------------------------------------------------------------------ plumbing

    def _arm(self, name: Hashable, at: float | None) -> None:
        """Set (or with None clear) one named deadline; the app's timer is the earliest."""
        if at is None:
            self._deadlines.pop(name, None)
        else:
            self._deadlines[name] = at
        self._timer = min(self._deadlines.values(), default=None)

    def _count_failure(self, status: int | str, reason: str) -> None:
        self.key_fetch_failures += 1
        key = str(status)
        self.failures_by_status[key] = self.failures_by_status.get(key, 0) + 1
        self.last_error = reason

    def _stop(self, now: float, reason: str | None) -> None:
        self._deadlines.clear()
        self._timer = None
        if reason is None:
            self._finish(now)
        else:
            self.last_error = reason
            self._fail(reason, now)

    # ------------------------------------------------------------------ inputs

    def _on_start(self, now: float) -> None:
        self._end_s = now + self.p.duration_s
        self._act(UdpOpen("udp"))
        self._arm("end", self._end_s if self._sender else self._end_s + self.p.grace_s)

    def _on_reply(self, tag: Hashable, message: Message, now: float) -> None:
        if self.finished:
            return
        if tag == "udp":
            if not isinstance(message, UdpOpened):
                self._stop(now, f"could not open a UDP socket: {type(message).__name__}")
                return
            self._local = (message.host, message.port)
            if self._sender:
                self._maybe_go_up(now)
            else:
                self._announce(now)
        elif isinstance(tag, tuple) and len(tag) == 2 and tag[0] == "enc" and self._sender:
            self._enc_reply(tag[1], message, now)
        elif isinstance(tag, tuple) and len(tag) == 3 and tag[0] == "dec" and not self._sender:
            self._dec_reply(tag[1], tag[2], message, now)

    def _on_peer_message(self, peer: str, body: Mapping[str, Any], now: float) -> None:
        if self.finished:
            return
        op = body.get("op")
        if peer != self.p.peer:
            self.bad_messages += 1
        elif self._sender and op == "addr":
            host, port = body.get("host"), body.get("port")
            if not isinstance(host, str) or not host or isinstance(port, bool) or not isinstance(port, int):
                self.bad_messages += 1
            elif not 0 < port < 65536:
                self.bad_messages += 1
            else:
                first = self._dest is None
                self._dest = (host, port)
                if first and self._tx is None and now >= self._backoff_until:
                    self._fetch(now)
                self._maybe_go_up(now)
        elif not self._sender and op == "done":
            sent = body.get("sent")
            if isinstance(sent, int) and not isinstance(sent, bool) and sent >= 0:
                self._peer_sent = sent
            error = body.get("error")
            if isinstance(error, str) and error:
                self.last_error = f"sender: {error[:_ERROR_CHARS]}"
            if not self._done_seen:
                self._done_seen = True
                self._arm("end", min(self._deadlines.get("end", now), now + self.p.grace_s))
        else:
            self.bad_messages += 1

    def _on_timer(self, now: float) -> None:
        if self.finished:
            self._deadlines.clear()
            self._timer = None
            return
        due = sorted((at, str(name), name) for name, at in self._deadlines.items() if at <= now)
        for _, _, name in due:
            self._deadlines.pop(name, None)
        self._arm("_", None)  # recompute the timer from what is left
        names = [name for _, _, name in due]
        # Slots due before the end go out before the end is handled.
        if "send" in names:
            self._send_due(now)
        for name in names:
            if self.finished:
                return
            if name == "fetch":
                self._fetch(now)
            elif name == "fetch_timeout" and self._pending is not None:
                self._pending = None
                self._count_failure("timeout", f"enc_keys: no answer within {self.p.fetch_timeout_s:g} s")
                self._retry_later(now)
            elif name == "addr":
                self._announce(now)
            elif name == "end":
                self._on_end(now)
            elif name == "done":
                self._send_done(now)
            elif isinstance(name, tuple) and name[0] == "dec_retry":
                f = self._fetches.get(name[1])
                if f is not None:
                    self._dec_fetch(f, now)
            elif isinstance(name, tuple) and name[0] == "dec_timeout":
                f = self._fetches.get(name[1])
                if f is not None and f.in_flight:
                    f.in_flight = False
                    self._count_failure("timeout", f"dec_keys: no answer within {self.p.fetch_timeout_s:g} s")
                    self._dec_retry_later(f, now)

    def _on_datagram(self, addr: tuple[str, int], data: bytes, now: float) -> None:
        self.datagrams_received += 1
        if self._sender or self.finished:
            return  # nothing flows back to the sender
        header = parse_header(data)
        if header is None:
            self.malformed += 1
            return
        key = self._rx.get(header.key_id)
        if key is not None:
            self._open(key, header, data, now)
            return
        fetch = self._fetches.get(header.key_id)
        if fetch is not None:
            if len(fetch.buffer) < _MAX_BUFFER_PER_KEY:
                fetch.buffer.append((header, data))
            else:
                self.dropped_no_key += 1
        elif header.key_id in self._refused:
            self.auth_failures += 1  # names a key the KME would not give us: cannot be authentic
        elif header.key_id in self._retired:
            self.stale_key += 1
        elif len(self._fetches) >= _MAX_FETCHES:
            self.dropped_no_key += 1
        else:
            fetch = _Fetch(header.key_id)
            fetch.buffer.append((header, data))
            self._fetches[header.key_id] = fetch
            self._dec_fetch(fetch, now)

    # ------------------------------------------------------------------ sender

    def _fetch(self, now: float) -> None:
        if self._pending is not None or now >= self._end_s:
            return
        self._arm("fetch", None)  # a scheduled rekey is this fetch
        self._fetch_no += 1
        self._pending = self._fetch_no
        self._act(
            KmsCall(("enc", self._fetch_no), self.p.sae, KmsOp.ENC_KEYS, self.p.peer_sae,
                    number=1, size_bits=self.p.key_size_bits)
        )  # fmt: skip
        self._arm("fetch_timeout", now + self.p.fetch_timeout_s)

    def _retry_later(self, now: float) -> None:
        self._arm("fetch_timeout", None)
        at = self._backoff_until = now + self._backoff_s
        self._backoff_s = min(self._backoff_s * 2.0, _BACKOFF_MAX_S)
        self._arm("fetch", at if at < self._end_s else None)

    def _enc_reply(self, fetch_no: Any, reply: Message, now: float) -> None:
        current = fetch_no == self._pending
        status, why = _status_text(reply)
        if status == 200:
            assert isinstance(reply, KmsReply)
            try:
                key_id, master = _key_from_container(reply.body, None)
                if key_id in self._used_ids:
                    raise _ContainerError(f"key {key_id} was used before")
            except _ContainerError as exc:
                if current:
                    self._pending = None
                    self._count_failure(200, f"enc_keys: {exc}")
                    self._retry_later(now)
                return
            self.keys_fetched += 1
            if current:
                self._pending = None
                self._arm("fetch_timeout", None)
                self._backoff_s = _BACKOFF_MIN_S
            superseded = self._tx is not None and (not isinstance(fetch_no, int) or fetch_no <= self._tx.fetch_no)
            if superseded or now >= self._end_s:
                self.keys_unused += 1  # a late answer to a fetch that was superseded, or after the end
                return
            self._install(key_id, master, fetch_no, now)
            return
        if not current:
            return  # an answer to a fetch already given up (and counted)
        self._pending = None
        self._count_failure(status, f"enc_keys: HTTP {status}" + (f": {why}" if why else ""))
        if 400 <= status < 500:
            self._send_done_now(f"KME refused enc_keys (HTTP {status})")
            self._stop(now, f"the KME refused enc_keys as SAE {self.p.sae!r} for slave {self.p.peer_sae!r}: "
                            f"HTTP {status}" + (f": {why}" if why else ""))  # fmt: skip
            return
        self._retry_later(now)

    def _install(self, key_id: uuid.UUID, master: bytes, fetch_no: int, now: float) -> None:
        aead = AESGCM(derive_traffic_key(master, key_id, *self._direction))
        del master
        if self._tx is not None:
            self.rekeys += 1
        self._tx = _TxKey(key_id, aead, fetch_no, now)
        self._used_ids.add(key_id)
        at = now + self.p.rekey_interval_s
        self._arm("fetch", at if at < self._end_s else None)
        self._maybe_go_up(now)

    def _maybe_go_up(self, now: float) -> None:
        if self._up_s is not None or self._dest is None or self._local is None or self._tx is None:
            return
        if now >= self._end_s:
            return
        self._up_s = now
        self._slot = 0
        self._send_due(now)

    def _slot_time(self, slot: int) -> float:
        assert self._up_s is not None
        return self._up_s + slot / self.p.rate_pps

    def _send_due(self, now: float) -> None:
        if self._up_s is None:
            return
        sent_now = 0
        while (t := self._slot_time(self._slot)) <= now and t < self._end_s:
            if sent_now >= _MAX_BURST:
                # A jump in time: do not flood; the slots skipped count as unsent.
                while (t := self._slot_time(self._slot)) <= now and t < self._end_s:
                    self._slot += 1
                    self.datagrams_unsent += 1
                break
            self._send_one(now)
            self._slot += 1
            sent_now += 1
        t = self._slot_time(self._slot)
        self._arm("send", t if t < self._end_s else None)

    def _send_one(self, now: float) -> None:
        key, dest = self._tx, self._dest
        if (
            key is None or dest is None
            or now >= key.installed_s + self.p.key_lifetime_s
            or key.next_seq > self.p.max_datagrams_per_key
        ):  # fmt: skip
            self.datagrams_unsent += 1
            if self._pending is None and now >= self._backoff_until:
                self._fetch(now)  # the key is spent before its rekey time (datagram cap): fetch now
            return
        seq = key.next_seq
        key.next_seq += 1
        payload = pattern_payload(self._pattern_seed, self._slot, self.p.payload_bytes)
        self._act(UdpSend(dest, seal_datagram(key.aead, key.key_id, seq, payload)))
        self.datagrams_sent += 1
        self.bytes_carried += len(payload)

    def _on_end(self, now: float) -> None:
        if self._sender:
            self._arm("send", None)
            self._arm("fetch", None)
            self._arm("fetch_timeout", None)
            self._pending = None
            self._send_done(now)
        else:
            reason = None
            if self.datagrams_authentic == 0:
                reason = "no authentic datagram arrived from the sender"
                if self.last_error:
                    reason += f" (last error: {self.last_error})"
            self._stop(now, reason)

    def _done_body(self, error: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"op": "done", "sent": self.datagrams_sent}
        if error:
            body["error"] = error
        return body

    def _send_done_now(self, error: str) -> None:
        for _ in range(_DONE_COPIES):
            self._act(RoutedSend(self.p.peer, self.p.peer_app, self._done_body(error)))

    def _send_done(self, now: float) -> None:
        self._done_copies += 1
        self._act(RoutedSend(self.p.peer, self.p.peer_app, self._done_body()))
        if self._done_copies < _DONE_COPIES:
            self._arm("done", now + self.p.retry_s)
            return
        reason = None
        if self._up_s is None:
            if self._dest is None:
                reason = "the receiver never announced its address"
            elif self._tx is None:
                reason = f"no key from the KME ({self.key_fetch_failures} failed fetches; last: {self.last_error})"
            else:
                reason = "the UDP socket never opened"
        self._stop(now, reason)

    # ------------------------------------------------------------------ receiver

    def _announce(self, now: float) -> None:
        if self._local is None or self._first_ok_s is not None:
            return
        host, port = self._local
        self._act(RoutedSend(self.p.peer, self.p.peer_app, {"op": "addr", "host": host, "port": port}))
        self._arm("addr", now + self.p.retry_s)

    def _dec_fetch(self, f: _Fetch, now: float) -> None:
        f.attempt += 1
        f.in_flight = True
        self._act(KmsCall(("dec", f.key_id, f.attempt), self.p.sae, KmsOp.DEC_KEYS, self.p.peer_sae,
                          key_ids=(str(f.key_id),)))  # fmt: skip
        self._arm(("dec_timeout", f.key_id), now + self.p.fetch_timeout_s)

    def _dec_retry_later(self, f: _Fetch, now: float) -> None:
        self._arm(("dec_timeout", f.key_id), None)
        self._arm(("dec_retry", f.key_id), now + f.backoff_s)
        f.backoff_s = min(f.backoff_s * 2.0, _BACKOFF_MAX_S)

    def _drop_fetch(self, f: _Fetch) -> None:
        self._fetches.pop(f.key_id, None)
        self._arm(("dec_timeout", f.key_id), None)
        self._arm(("dec_retry", f.key_id), None)

    def _dec_reply(self, key_id: Any, attempt: Any, reply: Message, now: float) -> None:
        f = self._fetches.get(key_id)
        status, why = _status_text(reply)
        if status == 200:
            assert isinstance(reply, KmsReply)
            if not isinstance(key_id, uuid.UUID) or key_id in self._rx:
                return
            try:
                _, master = _key_from_container(reply.body, key_id)
            except _ContainerError as exc:
                if f is not None and attempt == f.attempt:
                    f.in_flight = False
                    self._count_failure(200, f"dec_keys: {exc}")
                    self._dec_retry_later(f, now)
                return
            self.keys_fetched += 1
            self._refusals = 0
            if self.keys_fetched > 1:
                self.rekeys += 1  # the sender switched keys
            self._rx[key_id] = _RxKey(key_id, AESGCM(derive_traffic_key(master, key_id, *self._direction)))
            del master
            while len(self._rx) > _RX_KEYS_KEPT:
                old, _ = self._rx.popitem(last=False)
                self._retired.add(old)
            if f is not None:
                self._drop_fetch(f)
                key = self._rx[key_id]
                for header, data in f.buffer:
                    self._open(key, header, data, now)
                f.buffer.clear()
            return
        if f is None or attempt != f.attempt or not f.in_flight:
            return  # an answer to an attempt already given up (and counted)
        f.in_flight = False
        self._count_failure(status, f"dec_keys {key_id}: HTTP {status}" + (f": {why}" if why else ""))
        if 400 <= status < 500:
            # The id came in an unauthenticated header: it may be forged (module docstring).
            self._drop_fetch(f)
            self._refused.add(f.key_id)
            self.auth_failures += len(f.buffer)
            f.buffer.clear()
            self._refusals += 1
            if self.keys_fetched == 0 and self._refusals >= _MAX_REFUSALS:
                self._stop(now, f"the KME refused dec_keys as SAE {self.p.sae!r} for master {self.p.peer_sae!r} "
                                f"{self._refusals} times: HTTP {status}" + (f": {why}" if why else ""))  # fmt: skip
            return
        self._dec_retry_later(f, now)

    def _open(self, key: _RxKey, header: DatagramHeader, data: bytes, now: float) -> None:
        if not key.window.check(header.seq):
            self.replays += 1
            return
        try:
            payload = key.aead.decrypt(gcm_nonce(header.seq), data[HEADER.size :], data[: HEADER.size])
        except InvalidTag:
            self.auth_failures += 1
            return
        key.window.update(header.seq)
        self.datagrams_authentic += 1
        if self._first_ok_s is None:
            self._first_ok_s = now
            self._arm("addr", None)
            if not self._done_seen:  # the sender's traffic ends at most duration_s from now
                self._arm("end", now + self.p.duration_s + self.p.grace_s)
        self._last_ok_s = now
        if payload_is_intact(payload):
            self.bytes_carried += len(payload)
        else:
            self.content_errors += 1

    # ------------------------------------------------------------------ outputs

    def results(self) -> dict[str, Any]:
        if self._sender:
            start = self._up_s
            end = min(self._t_end if self._t_end is not None else (self._t_last or 0.0), self._end_s)
        else:
            start, end = self._first_ok_s, self._last_ok_s
        traffic_s = max(0.0, end - start) if start is not None and end is not None else 0.0
        return {
            "role": self.p.role.value,
            "bytes_carried": self.bytes_carried,
            "datagrams_sent": self.datagrams_sent if self._sender else self._peer_sent,
            "datagrams_received": self.datagrams_received,
            "datagrams_authentic": self.datagrams_authentic,
            "auth_failures": self.auth_failures,
            "replays": self.replays,
            "content_errors": self.content_errors,
            "malformed": self.malformed,
            "datagrams_unsent": self.datagrams_unsent,
            "dropped_no_key": self.dropped_no_key,
            "stale_key": self.stale_key,
            "rekeys": self.rekeys,
            "keys_fetched": self.keys_fetched,
            "keys_unused": self.keys_unused,
            "key_fetch_failures": self.key_fetch_failures,
            "key_fetch_failures_by_status": dict(self.failures_by_status),
            "traffic_s": traffic_s,
            "bytes_per_s": self.bytes_carried / traffic_s if traffic_s > 0 else 0.0,
            "bad_messages": self.bad_messages,
            "last_error": self.last_error,
            "error": self.error if self.state is AppState.FAILED else None,
        }
