"""One end of a QKD link's post-processing: detections in, identical key pools out (sans-IO).

Theory of operation
-------------------
``QkdLinkAlice`` (the transmitter's node) and ``QkdLinkBob`` (the receiver's) compose
the stages of DESIGN §7, block after block:

1. **Sifting** (``sifting``): Bob announces his detections (``add_detections``), Alice
   answers, and closes a block once ``block_key_bits`` signal key-basis bits wait; the
   parameter sample and its errors travel both ways. Event ``BlockSifted``.
2. **Estimation** (``estimation.estimate``), a pure function of the block's public counts,
   run at both ends: the same decision everywhere. Aborted: ``BlockAborted`` (and
   ``EavesdropperAlarmRaised`` for the alarm reasons); the block's bits are dropped.
3. **Cascade** (``cascade``), Bob driving, session id = block id, block sizes from the
   estimate's QBER, variant configurable. ``BlockReconciled(efficiency, leaked_bits,
   frame_errors)``: f = leaked / (n h(Q)) with Q = frame_errors / n, frame_errors being
   the errors Cascade corrected in this frame (Martinez-Mateo et al., QIC 15 (2015) 453;
   Alice learns the count from Bob's ``VerificationResult`` — it is public anyway: each
   of Bob's binary searches ends in one correction and the searches are visible).
4. **Verification** (``verification.VerificationHash.for_epsilon(n, eps_cor)``): Alice
   draws a seed after Cascade ended and sends ``VerificationTag``; Bob compares and
   answers ``VerificationResult``. Mismatch: both ends discard the block
   (``BlockDiscarded``), no retry. Otherwise ``BlockVerified``.
5. **Privacy amplification** (``amplification.toeplitz_hash``): in the same flight as the
   tag Alice sends ``AmplificationSeed`` (a Toeplitz seed drawn after Cascade, the output
   length, and how many bits of the pool go to authentication next). The output length
   is ``estimation.key_length(estimate, leaked_bits)`` with leaked_bits = Cascade's
   disclosed parities + the verification tag bits (verification.py: "the caller counts
   tag_bits as disclosed"; the log2(2/eps_cor) term of Lim et al. Eq. (1) pays for it
   once more, a conservative double count of ~50 bits). Bob checks Alice's length
   against his own. Both ends add the result to their ``KeyPool`` (``KeyAdded``) —
   Bob on the seed, Alice on Bob's positive result, the same bits in the same order.

Only one block is past sifting at a time (sifting of later blocks goes on meanwhile), so
pool order is block order at both ends.

Authentication. Every message travels in an ``Envelope(seq, message, tag)``; the tag is
``authentication.Authenticator``'s Wegman–Carter MAC over ``payload_bytes(message)``, a
canonical encoding (type code + fields, no pickle). Key: the bootstrap key given to both
ends (Alice is the initiator of ``DirectionalKeys``), then bits of the link's own pool.
Refills are decided by Alice alone and announced in ``AmplificationSeed.auth_refill_bits``
(authenticated): both ends take exactly that many bits from the *front of that block's
final key* and add only the rest to the pool: the same bits, with no further round trip.
Alice refills when either direction of her authenticator is below ``auth_low_water_bits``.
A refill never takes from the pool itself, so the pool has one consumer (key management,
DESIGN §8), which takes from it asynchronously; a refill in between would make the two
ends' pools diverge. A block with less final key than the refill goes to authentication
whole.

Rejection. An envelope with a bad tag, a replayed or out-of-order sequence number is
counted (``auth_rejects``) and dropped; so is an authentic message that breaks a stage's
protocol (``protocol_rejects``). Neither changes the session's state: the genuine message
still arrives (the transport is reliable; a forgery does not remove it).

Secrets: key bits (sifted, corrected, final), seeds of Alice's choices and authentication
key never appear in a repr, an event, ``statistics()`` or an exception — counts only.
"""

from __future__ import annotations

import abc
import dataclasses
import math
import typing
from collections import deque
from typing import Callable, Protocol, Union

import numpy as np

from emulator.kernels import Backend, Basis, ChoiceThresholds, get_backend
from emulator.wire import ErrorCode, LocalProtocolError, RemoteProtocolError

from .amplification import draw_seed, seed_length, toeplitz_hash
from .authentication import AuthenticationFailed, Authenticator, DirectionalKeys, KeyExhausted
from .cascade import (
    AliceState,
    BobState,
    CascadeAlice,
    CascadeBob,
    CascadeDone,
    CascadeStart,
    CascadeVariant,
    ParityReply,
    ParityRequest,
    binary_entropy,
)
from .estimation import AbortReason, EavesdropperAlarm, Estimate, EstimationParameters, estimate, key_length
from .keypool import KeyPool
from .sifting import (
    DEFAULT_SAMPLE_FRACTION,
    BlockSifted,
    DetectionWindow,
    ParameterErrors,
    ParameterSample,
    SiftAnnounce,
    SiftedBlock,
    SiftingAlice,
    SiftingBob,
    SiftReply,
)
from .verification import VerificationHash

__all__ = [
    "DEFAULT_AUTH_LOW_WATER_BITS",
    "DEFAULT_AUTH_REFILL_BITS",
    "AmplificationSeed",
    "BlockAborted",
    "BlockDiscarded",
    "BlockEstimated",
    "BlockReconciled",
    "BlockSifted",
    "BlockVerified",
    "EavesdropperAlarmRaised",
    "Envelope",
    "KeyAdded",
    "MessageRejected",
    "PayloadError",
    "QkdLinkAlice",
    "QkdLinkBob",
    "QkdLinkPair",
    "QkdLinkStatistics",
    "QkdRoundLimitExceeded",
    "QkdSessionConfig",
    "QkdSessionError",
    "VerificationResult",
    "VerificationTag",
    "message_from_payload",
    "payload_bytes",
]

#: Alice refills when a direction of authentication key falls below this (bits): one
#: block of 10^6 key bits costs ~110 messages per direction x 128 bits ~ 14 kbit.
DEFAULT_AUTH_LOW_WATER_BITS = 1 << 16
#: Bits taken from the pool per refill (half for each direction).
DEFAULT_AUTH_REFILL_BITS = 1 << 17

_frozen = dataclasses.dataclass(frozen=True, slots=True)


class QkdSessionError(LocalProtocolError):
    """Our caller misused the link session (bad configuration or input)."""

    def __init__(self, message: str) -> None:
        super().__init__(ErrorCode.BAD_FIELD, message)


class _SessionRemoteError(RemoteProtocolError):
    def __init__(self, message: str) -> None:
        super().__init__(ErrorCode.BAD_FIELD, message)


class QkdRoundLimitExceeded(QkdSessionError):
    """QkdLinkPair stopped: messages were still flowing after the round cap."""


# --------------------------------------------------------------------------- messages


@_frozen
class VerificationTag:
    """Alice -> Bob: the verification seed and Alice's tag of block `block_id`'s corrected key."""

    block_id: int
    seed: bytes
    tag: bytes


@_frozen
class VerificationResult:
    """Bob -> Alice: whether the tags matched, and how many errors Cascade corrected."""

    block_id: int
    ok: bool
    errors_corrected: int


@_frozen
class AmplificationSeed:
    """Alice -> Bob: Toeplitz seed (n_in + n_out - 1 bits packed LSB-first), the output
    length, and the bits both ends move from the pool to authentication afterwards."""

    block_id: int
    n_in: int
    n_out: int
    seed: bytes
    auth_refill_bits: int


SessionMessage = Union[
    SiftAnnounce, SiftReply, ParameterSample, ParameterErrors,
    CascadeStart, ParityRequest, ParityReply, CascadeDone,
    VerificationTag, VerificationResult, AmplificationSeed,
]  # fmt: skip

# Type codes of the canonical encoding (fixed: both ends, any language).
_CODES: dict[type, int] = {
    SiftAnnounce: 1, SiftReply: 2, ParameterSample: 3, ParameterErrors: 4,
    CascadeStart: 11, ParityRequest: 12, ParityReply: 13, CascadeDone: 14,
    VerificationTag: 21, VerificationResult: 22, AmplificationSeed: 23,
}  # fmt: skip


def payload_bytes(message: SessionMessage) -> bytes:
    """Canonical bytes of a message, the MAC's input: type code (1 byte), then per field in
    declaration order: bool 'b'+1 byte; int 'i'+2-byte length+signed big-endian; bytes
    'y'+8-byte length+data."""
    code = _CODES.get(type(message))
    if code is None:
        raise QkdSessionError(f"{type(message).__name__} is not a QKD post-processing message")
    out = bytearray([code])
    for field in dataclasses.fields(message):
        v = getattr(message, field.name)
        if isinstance(v, bool):
            out += b"b" + bytes([int(v)])
        elif isinstance(v, (int, np.integer)):
            iv = int(v)
            raw = iv.to_bytes((iv.bit_length() + 8) // 8, "big", signed=True)
            out += b"i" + len(raw).to_bytes(2, "big") + raw
        elif isinstance(v, (bytes, bytearray)):
            out += b"y" + len(v).to_bytes(8, "big") + bytes(v)
        else:
            raise QkdSessionError(f"field {field.name} of {type(message).__name__} cannot be encoded")
    return bytes(out)


class PayloadError(RemoteProtocolError):
    """Bytes that are not the canonical encoding of a post-processing message."""

    def __init__(self, message: str) -> None:
        super().__init__(ErrorCode.BAD_FIELD, message)


_BY_CODE: dict[int, type] = {code: cls for cls, code in _CODES.items()}
_FIELD_KINDS: dict[type, tuple[tuple[str, bytes], ...]] = {}
_KIND_OF_TYPE = {bool: b"b", int: b"i", bytes: b"y"}
_MAX_INT_BYTES = 16  # every integer field fits in 128 bits (pulse indices < 2^53, seeds < 2^64)


def _field_kinds(cls: type) -> tuple[tuple[str, bytes], ...]:
    kinds = _FIELD_KINDS.get(cls)
    if kinds is None:
        hints = typing.get_type_hints(cls)
        kinds = tuple((f.name, _KIND_OF_TYPE[hints[f.name]]) for f in dataclasses.fields(cls))
        _FIELD_KINDS[cls] = kinds
    return kinds


def message_from_payload(raw: bytes) -> SessionMessage:
    """Inverse of `payload_bytes`: the message whose canonical bytes `raw` are.

    Each field must carry the kind its declaration has ('b', 'i', 'y'), integers at most
    16 bytes, and `raw` must end exactly after the last field; else `PayloadError`
    naming the field (never its value). Stage-level checks (lengths, ranges) happen when
    the message is handled, after authentication.
    """
    view = memoryview(raw)
    if len(view) < 1:
        raise PayloadError("empty post-processing payload")
    cls = _BY_CODE.get(view[0])
    if cls is None:
        raise PayloadError(f"unknown post-processing message code {view[0]}")
    pos = 1
    values: dict[str, object] = {}
    for name, kind in _field_kinds(cls):
        if bytes(view[pos : pos + 1]) != kind:
            raise PayloadError(f"{cls.__name__}.{name}: expected a field of kind {kind.decode()}")
        pos += 1
        if kind == b"b":
            if pos >= len(view) or view[pos] > 1:
                raise PayloadError(f"{cls.__name__}.{name}: not a boolean")
            values[name] = bool(view[pos])
            pos += 1
        elif kind == b"i":
            if pos + 2 > len(view):
                raise PayloadError(f"{cls.__name__}.{name}: truncated")
            size = int.from_bytes(view[pos : pos + 2], "big")
            pos += 2
            if not 1 <= size <= _MAX_INT_BYTES or pos + size > len(view):
                raise PayloadError(f"{cls.__name__}.{name}: bad integer length")
            values[name] = int.from_bytes(view[pos : pos + size], "big", signed=True)
            pos += size
        else:
            if pos + 8 > len(view):
                raise PayloadError(f"{cls.__name__}.{name}: truncated")
            size = int.from_bytes(view[pos : pos + 8], "big")
            pos += 8
            if pos + size > len(view):
                raise PayloadError(f"{cls.__name__}.{name}: truncated")
            values[name] = bytes(view[pos : pos + size])
            pos += size
    if pos != len(view):
        raise PayloadError(f"{cls.__name__}: {len(view) - pos} trailing bytes")
    return cls(**values)  # type: ignore[no-any-return]


@dataclasses.dataclass(frozen=True, slots=True, repr=False)
class Envelope:
    """An authenticated message: per-direction sequence number, message, 16-byte tag."""

    seq: int
    message: SessionMessage
    tag: bytes

    def __repr__(self) -> str:
        return f"<Envelope seq={self.seq} {type(self.message).__name__}>"


# ----------------------------------------------------------------------------- events


@_frozen
class BlockEstimated:
    """Parameter estimation of block `estimate.block_id` is done (public numbers only:
    gains, error rates per class and basis, decoy bounds, the decision)."""

    estimate: Estimate

    @property
    def block_id(self) -> int:
        return self.estimate.block_id


@_frozen
class BlockAborted:
    """Estimation stopped block `block_id` (no key from it); qber: the worse signal QBER."""

    block_id: int
    reason: AbortReason
    reasons: tuple[AbortReason, ...]
    qber: float


@_frozen
class EavesdropperAlarmRaised:
    alarm: EavesdropperAlarm


@_frozen
class BlockReconciled:
    """Cascade finished block `block_id`: f, parities disclosed, errors it corrected."""

    block_id: int
    efficiency: float
    leaked_bits: int
    frame_errors: int


@_frozen
class BlockVerified:
    block_id: int


@_frozen
class BlockDiscarded:
    """Verification failed (or the session could not finish the block): no key from it."""

    block_id: int
    reason: str


@_frozen
class KeyAdded:
    """Block `block_id` gave `bits` final key bits (a count, never the key); all of them
    entered the pool but an authentication refill taken from their front."""

    block_id: int
    bits: int
    pulses: int


@_frozen
class MessageRejected:
    """A received envelope was dropped: authentication failed or the stage refused it."""

    reason: str
    message_type: str


QkdEvent = Union[
    BlockSifted, BlockEstimated, BlockAborted, EavesdropperAlarmRaised, BlockReconciled,
    BlockVerified, BlockDiscarded, KeyAdded, MessageRejected,
]  # fmt: skip


# ---------------------------------------------------------------- configuration, stats


@_frozen
class QkdSessionConfig:
    """Post-processing parameters both ends must share.

    estimation: intensities and eps values; block_key_bits: signal key-basis bits per
    block (before sampling); cascade_variant; sample_fraction; key_basis;
    batch_detections: Bob's largest announcement; auth_low_water_bits /
    auth_refill_bits: Alice's refill policy (module docstring); announce_interval_s:
    emulated seconds Bob gathers windows before announcing them (0: every window).
    """

    estimation: EstimationParameters
    block_key_bits: int = 1_000_000
    cascade_variant: CascadeVariant = CascadeVariant.ORIGINAL
    sample_fraction: float = DEFAULT_SAMPLE_FRACTION
    key_basis: int = Basis.Z
    batch_detections: int = 1 << 18
    auth_low_water_bits: int = DEFAULT_AUTH_LOW_WATER_BITS
    auth_refill_bits: int = DEFAULT_AUTH_REFILL_BITS
    announce_interval_s: float = 0.0

    def __post_init__(self) -> None:
        if not (self.announce_interval_s >= 0.0 and math.isfinite(self.announce_interval_s)):
            raise QkdSessionError(f"announce_interval_s must be finite and >= 0, got {self.announce_interval_s!r}")
        if not isinstance(self.estimation, EstimationParameters):
            raise QkdSessionError("estimation must be EstimationParameters")
        if self.block_key_bits < 1:
            raise QkdSessionError(f"block_key_bits must be >= 1, got {self.block_key_bits}")
        if self.auth_refill_bits < 0 or self.auth_refill_bits % 16:
            raise QkdSessionError("auth_refill_bits must be a non-negative multiple of 16")
        object.__setattr__(self, "cascade_variant", CascadeVariant(self.cascade_variant))


@_frozen
class QkdLinkStatistics:
    """One end's metrics of the link (counts and rates only).

    pulses: emitted (Alice, from on_emitted) or covered by windows (Bob); block_pulses:
    pulses of the blocks finished (kept, aborted or discarded); qber_per_basis (Z, X) and
    qber_per_intensity (signal, decoy, vacuum): of the last estimated block;
    single_photon_yield_lower / single_photon_error_upper: its Y1^L, e1^U (Ma et al. 2005
    Eqs. (34), (37)); leaked_bits: parities + verification tags of reconciled blocks;
    cascade_efficiency: sum leaked parities / sum n h(Q) over reconciled blocks;
    frame_errors: errors Cascade corrected; secret_key_rate_per_pulse: final_bits /
    block_pulses; auth_rejects / protocol_rejects: dropped envelopes.
    """

    role: str
    pulses: int
    block_pulses: int
    detections: int
    sifted_bits: int
    qber_per_basis: tuple[float, float]
    qber_per_intensity: tuple[float, float, float]
    single_photon_yield_lower: float
    single_photon_error_upper: float
    leaked_bits: int
    cascade_efficiency: float
    frame_errors: int
    final_bits: int
    blocks_done: int
    blocks_aborted: int
    blocks_discarded: int
    alarms: int
    auth_rejects: int
    protocol_rejects: int
    auth_refills: int
    secret_key_rate_per_pulse: float


class _Metrics:
    def __init__(self, role: str) -> None:
        self.role = role
        self.block_pulses = 0
        self.last: Estimate | None = None
        self.leaked = 0
        self.parities = 0
        self.shannon = 0.0
        self.frame_errors = 0
        self.final_bits = 0
        self.done = self.aborted = self.discarded = self.alarms = 0
        self.auth_rejects = self.protocol_rejects = self.refills = 0

    def reconciled(self, n: int, parities: int, errors: int) -> float:
        self.parities += parities
        self.frame_errors += errors
        h = n * binary_entropy(errors / n)
        self.shannon += h
        return parities / h if h > 0 else float("nan")


class _Block:
    """A sifted block past estimation, waiting for or in reconciliation (holds secrets)."""

    __slots__ = ("cascade", "estimate", "leaked", "n_out", "refill", "reported", "seed", "sifted", "tags_ok", "verified")

    def __init__(self, sifted: SiftedBlock, est: Estimate) -> None:
        self.sifted = sifted
        self.estimate = est
        self.cascade: CascadeAlice | CascadeBob | None = None
        self.leaked = 0
        self.seed: np.ndarray | None = None
        self.n_out = 0
        self.verified = False  # Bob: the tag was checked
        self.tags_ok = False
        self.reported = False  # Bob: BlockReconciled emitted
        self.refill = 0  # Alice: auth_refill_bits announced

    @property
    def block_id(self) -> int:
        return self.sifted.block_id


class _End(abc.ABC):
    """What both ends share: authentication, the outbox, events, the pool, metrics."""

    _role = ""

    def __init__(self, config: QkdSessionConfig, bootstrap_key: bytes, pool: KeyPool | None,
                 rng: np.random.Generator, backend: Backend | None) -> None:  # fmt: skip
        if not isinstance(config, QkdSessionConfig):
            raise QkdSessionError("config must be a QkdSessionConfig")
        if not isinstance(bootstrap_key, (bytes, bytearray)) or len(bootstrap_key) < 64:
            raise QkdSessionError("the bootstrap key must be at least 64 bytes")
        if not isinstance(rng, np.random.Generator):
            raise QkdSessionError("rng must be a numpy.random.Generator")
        self._config = config
        self._backend = backend if backend is not None else get_backend()
        self._rng = rng
        self._keys = DirectionalKeys(initiator=self._role == "alice", material=bytes(bootstrap_key))
        self._auth = Authenticator.from_keys(self._keys, backend=self._backend)
        self.pool = pool if pool is not None else KeyPool()
        self._pending: deque[SessionMessage] = deque()
        self._events: deque[QkdEvent] = deque()
        self._queue: deque[_Block] = deque()
        self._m = _Metrics(self._role)
        self._sifting: SiftingAlice | SiftingBob

    # -- transport side
    def messages_to_send(self) -> list[Envelope]:
        """Seal and return the queued messages (in order). Without authentication key
        the rest stay queued until a refill."""
        out: list[Envelope] = []
        while self._pending:
            msg = self._pending[0]
            seq = self._auth.next_seal_seq
            try:
                tag = self._auth.seal(payload_bytes(msg), seq)
            except KeyExhausted:
                break
            self._pending.popleft()
            out.append(Envelope(seq, msg, tag))
        return out

    def receive(self, envelope: Envelope, now: float = 0.0) -> None:
        """Authenticate and handle one envelope; a rejected one is counted and dropped."""
        msg = getattr(envelope, "message", None)
        name = type(msg).__name__
        try:
            if not isinstance(envelope, Envelope) or type(msg) not in _CODES:
                raise _SessionRemoteError(f"not an envelope of a post-processing message: {type(envelope).__name__}")
            self._auth.verify(payload_bytes(msg), int(envelope.seq), bytes(envelope.tag))
        except AuthenticationFailed as err:
            self._m.auth_rejects += 1
            self._events.append(MessageRejected(err.reason.value, name))
            return
        except (KeyExhausted, _SessionRemoteError, TypeError, ValueError) as err:
            self._m.auth_rejects += 1
            self._events.append(MessageRejected(type(err).__name__, name))
            return
        try:
            self._handle(msg, now)
        except RemoteProtocolError as err:
            self._m.protocol_rejects += 1
            self._events.append(MessageRejected(f"protocol: {type(err).__name__}", name))
        self._pump(now)

    def next_event(self) -> QkdEvent | None:
        return self._events.popleft() if self._events else None

    @property
    def next_inbound_seq(self) -> int:
        """The sequence number of the next envelope this end will accept from the other."""
        return self._auth.next_verify_seq

    @property
    def final_bits(self) -> int:
        """Final key bits made so far (refills included): a count."""
        return self._m.final_bits

    @property
    def blocks_in_progress(self) -> int:
        """Blocks closed by sifting whose key is not in the pool (or dropped) yet."""
        return self._sifting.blocks_open + len(self._queue)

    def reject_unreadable(self, reason: str) -> None:
        """The transport got an envelope it could not even decode: counted like one that
        failed authentication (`auth_rejects`, `MessageRejected`); nothing else changes."""
        self._m.auth_rejects += 1
        self._events.append(MessageRejected(reason[:200], "unreadable"))

    @property
    def messages_waiting(self) -> int:
        """Messages queued for sealing (waiting for authentication key if this stays > 0)."""
        return len(self._pending)

    # -- shared steps
    @abc.abstractmethod
    def _handle(self, msg: SessionMessage, now: float) -> None:
        """Act on one authenticated message of the other end."""

    @abc.abstractmethod
    def _pump(self, now: float) -> None:
        """Move blocks along as far as the messages received so far allow."""

    def _sifted(self, sifted: SiftedBlock) -> None:
        est = estimate(sifted.counts, self._config.estimation)
        self._m.last = est
        if not est.decision.abort and len(sifted) == 0:
            no_bits = dataclasses.replace(est.decision, reasons=(AbortReason.INSUFFICIENT_STATISTICS,))
            est = dataclasses.replace(est, decision=no_bits)
        self._events.append(BlockEstimated(est))
        if est.decision.abort:
            self._m.aborted += 1
            self._m.block_pulses += sifted.counts.pulses
            reasons = est.decision.reasons
            self._events.append(BlockAborted(sifted.block_id, reasons[0], reasons, max(est.qber, est.test_basis_qber)))
            if est.alarm is not None:
                self._m.alarms += 1
                self._events.append(EavesdropperAlarmRaised(est.alarm))
            return
        self._queue.append(_Block(sifted, est))

    def _verification(self, block: _Block) -> VerificationHash:
        return VerificationHash.for_epsilon(len(block.sifted), self._config.estimation.epsilon_cor)

    def _output_length(self, block: _Block, tag_bits: int) -> int:
        block.leaked = block.cascade.statistics().leaked_bits + tag_bits  # type: ignore[union-attr]
        return min(key_length(block.estimate, block.leaked), len(block.sifted))

    def _keep(self, block: _Block, key: np.ndarray, refill_bits: int) -> None:
        if refill_bits:
            self._keys.add(np.packbits(key[:refill_bits], bitorder="little").tobytes())
            self._m.refills += 1
        self.pool.add(block.block_id, key[refill_bits:])
        m = self._m
        m.done += 1
        m.final_bits += int(key.shape[0])
        m.leaked += block.leaked
        m.block_pulses += block.sifted.counts.pulses
        self._events.append(KeyAdded(block.block_id, int(key.shape[0]), block.sifted.counts.pulses))

    def _discard(self, block: _Block, reason: str) -> None:
        self._m.discarded += 1
        self._m.block_pulses += block.sifted.counts.pulses
        self._m.leaked += block.leaked
        self._events.append(BlockDiscarded(block.block_id, reason))

    def _statistics(self, pulses: int, detections: int, sifted_bits: int) -> QkdLinkStatistics:
        m = self._m
        est = m.last
        nan = float("nan")
        if est is not None:
            per_basis = (est.error_rates[0][0], est.error_rates[0][1])
            per_int = (est.statistics[0].error_rate, est.statistics[1].error_rate, est.statistics[2].error_rate)
            y1, e1 = est.bounds.yield_lower, est.bounds.error_rate_upper
        else:
            per_basis, per_int, y1, e1 = (nan, nan), (nan, nan, nan), nan, nan
        return QkdLinkStatistics(
            role=self._role, pulses=pulses, block_pulses=m.block_pulses, detections=detections,
            sifted_bits=sifted_bits, qber_per_basis=per_basis, qber_per_intensity=per_int,
            single_photon_yield_lower=y1, single_photon_error_upper=e1, leaked_bits=m.leaked,
            cascade_efficiency=m.parities / m.shannon if m.shannon > 0 else nan,
            frame_errors=m.frame_errors, final_bits=m.final_bits, blocks_done=m.done,
            blocks_aborted=m.aborted, blocks_discarded=m.discarded, alarms=m.alarms,
            auth_rejects=m.auth_rejects, protocol_rejects=m.protocol_rejects, auth_refills=m.refills,
            secret_key_rate_per_pulse=m.final_bits / m.block_pulses if m.block_pulses else 0.0,
        )  # fmt: skip


class QkdLinkAlice(_End):
    """The transmitter's end. `alice_key`/`thresholds`: her choices (the broker's
    welcome); `bootstrap_key`: the pre-shared key (both ends the same); `rng`: her
    verification and amplification seeds."""

    _role = "alice"

    def __init__(self, alice_key: int, thresholds: ChoiceThresholds, config: QkdSessionConfig, *,
                 bootstrap_key: bytes, rng: np.random.Generator, pool: KeyPool | None = None,
                 backend: Backend | None = None) -> None:  # fmt: skip
        super().__init__(config, bootstrap_key, pool, rng, backend)
        self._sifting = SiftingAlice(
            alice_key, thresholds, self._backend, key_basis=config.key_basis,
            sample_fraction=config.sample_fraction, block_key_bits=config.block_key_bits,
        )  # fmt: skip
        self._emitted = 0
        self._awaiting_result: _Block | None = None

    def __repr__(self) -> str:
        return f"<QkdLinkAlice blocks_done={self._m.done} final_bits={self._m.final_bits} pool={self.pool!r}>"

    def on_emitted(self, end_pulse: int) -> None:
        """The broker has emitted pulses [0, end_pulse) of this link (qkd_emitted)."""
        self._emitted = max(self._emitted, int(end_pulse))

    def close_block(self, now: float = 0.0) -> int:
        """Close a block now over every answered announcement (normally automatic)."""
        block_id = self._sifting.close_block(now)
        self._pump(now)
        return block_id

    def _handle(self, msg: SessionMessage, now: float) -> None:
        if isinstance(msg, (SiftAnnounce, ParameterErrors)):
            self._sifting.receive(msg, now)
        elif isinstance(msg, CascadeStart):
            head = self._queue[0] if self._queue else None
            if head is None or head.cascade is not None or msg.session_id != head.block_id:
                raise _SessionRemoteError("cascade_start for a block that is not next")
            cascade = CascadeAlice(head.sifted.key_bits, backend=self._backend)
            cascade.receive(msg, now)
            head.cascade = cascade
        elif isinstance(msg, (ParityRequest, CascadeDone)):
            head = self._queue[0] if self._queue else None
            if head is None or head.cascade is None or self._awaiting_result is head:
                raise _SessionRemoteError(f"{type(msg).__name__} with no reconciliation under way")
            head.cascade.receive(msg, now)
        elif isinstance(msg, VerificationResult):
            self._result(msg)
        else:
            raise _SessionRemoteError(f"{type(msg).__name__} is not a message for alice")

    def _pump(self, now: float) -> None:
        self._pending.extend(self._sifting.messages_to_send())
        while (ev := self._sifting.next_event()) is not None:
            self._events.append(ev)
        while (sifted := self._sifting.next_block()) is not None:
            self._sifted(sifted)
        head = self._queue[0] if self._queue else None
        if head is not None and isinstance(head.cascade, CascadeAlice):
            self._pending.extend(head.cascade.messages_to_send())
            while head.cascade.next_event() is not None:
                pass
            if head.cascade.state is AliceState.DONE and self._awaiting_result is None:
                self._confirm(head)

    def _confirm(self, block: _Block) -> None:
        """Cascade is over: send the verification tag and the amplification seed."""
        vh = self._verification(block)
        vseed = vh.draw_seed(self._rng)
        tag = vh.tag(block.sifted.key_bits, vseed, backend=self._backend)
        n_in = len(block.sifted)
        block.n_out = self._output_length(block, vh.tag_bits)
        block.seed = draw_seed(self._rng, n_in, block.n_out)
        refill = 0
        if block.n_out > 0:
            low = min(self._keys.outbound.bits_available, self._keys.inbound.bits_available)
            if low < self._config.auth_low_water_bits:
                refill = min(self._config.auth_refill_bits, block.n_out - block.n_out % 16)
        self._awaiting_result = block
        block.refill = refill
        packed = np.packbits(block.seed, bitorder="little").tobytes()
        self._pending.append(VerificationTag(block.block_id, vseed, tag))
        self._pending.append(AmplificationSeed(block.block_id, n_in, block.n_out, packed, refill))

    def _result(self, msg: VerificationResult) -> None:
        block = self._awaiting_result
        if block is None or msg.block_id != block.block_id:
            raise _SessionRemoteError("verification result for a block not awaiting one")
        errors = int(msg.errors_corrected)
        if not 0 <= errors <= len(block.sifted):
            raise _SessionRemoteError("errors_corrected outside [0, n]")
        self._awaiting_result = None
        self._queue.popleft()
        cascade = block.cascade
        assert isinstance(cascade, CascadeAlice)
        parities = cascade.statistics().leaked_bits
        f = self._m.reconciled(len(block.sifted), parities, errors)
        self._events.append(BlockReconciled(block.block_id, f, parities, errors))
        if not msg.ok:
            self._discard(block, "verification tags differ")
            return
        self._events.append(BlockVerified(block.block_id))
        assert block.seed is not None
        key = toeplitz_hash(block.sifted.key_bits, block.seed, block.n_out)
        self._keep(block, key, block.refill)

    def statistics(self) -> QkdLinkStatistics:
        s = self._sifting.statistics()
        return self._statistics(max(self._emitted, s.pulses), s.detections, s.sifted_total)


class QkdLinkBob(_End):
    """The receiver's end: detections in (`add_detections`), drives Cascade; `rng` draws
    Cascade's shuffle seeds."""

    _role = "bob"

    def __init__(self, config: QkdSessionConfig, *, bootstrap_key: bytes, rng: np.random.Generator,
                 pool: KeyPool | None = None, backend: Backend | None = None) -> None:  # fmt: skip
        super().__init__(config, bootstrap_key, pool, rng, backend)
        self._sifting = SiftingBob(backend=self._backend, batch_detections=config.batch_detections)
        self._verified: _Block | None = None  # tag checked, waiting for the seed
        self._last_flush: float | None = None

    def __repr__(self) -> str:
        return f"<QkdLinkBob blocks_done={self._m.done} final_bits={self._m.final_bits} pool={self.pool!r}>"

    def add_detections(self, window: DetectionWindow, now: float = 0.0) -> None:
        """One window of the broker's qkd_detections. Announced at once, or (with
        `announce_interval_s` > 0) once that much emulated time has passed since the last
        announcement or a batch is full: fewer, larger announcements cost less
        authentication key (one tag per message) on long, slow links."""
        self._sifting.add_detections(window, now)
        interval = self._config.announce_interval_s
        if self._last_flush is None or now - self._last_flush >= interval:
            self._sifting.flush(now)
            self._last_flush = now
        self._pump(now)

    def flush(self, now: float = 0.0) -> None:
        """Announce every detection still pending (the end of the stream)."""
        self._sifting.flush(now)
        self._last_flush = now
        self._pump(now)

    def _handle(self, msg: SessionMessage, now: float) -> None:
        if isinstance(msg, (SiftReply, ParameterSample)):
            self._sifting.receive(msg, now)
        elif isinstance(msg, ParityReply):
            head = self._queue[0] if self._queue else None
            if head is None or not isinstance(head.cascade, CascadeBob):
                raise _SessionRemoteError("parity reply with no reconciliation under way")
            head.cascade.receive(msg, now)
        elif isinstance(msg, VerificationTag):
            self._check_tag(msg)
        elif isinstance(msg, AmplificationSeed):
            self._amplify(msg)
        else:
            raise _SessionRemoteError(f"{type(msg).__name__} is not a message for bob")

    def _pump(self, now: float) -> None:
        self._pending.extend(self._sifting.messages_to_send())  # ParameterErrors before CascadeStart
        while (ev := self._sifting.next_event()) is not None:
            self._events.append(ev)
        while (sifted := self._sifting.next_block()) is not None:
            self._sifted(sifted)
        head = self._queue[0] if self._queue else None
        if head is not None and head.cascade is None:
            head.cascade = CascadeBob(
                head.sifted.key_bits, head.estimate.qber, self._rng, variant=self._config.cascade_variant,
                backend=self._backend, session_id=head.block_id,
            )  # fmt: skip
            head.cascade.start(now)
        if head is not None and isinstance(head.cascade, CascadeBob):
            self._pending.extend(head.cascade.messages_to_send())
            while head.cascade.next_event() is not None:
                pass
            if head.cascade.state is BobState.DONE and not head.reported:
                stats = head.cascade.statistics()
                head.reported = True
                f = self._m.reconciled(len(head.sifted), stats.leaked_bits, stats.bits_corrected)
                self._events.append(BlockReconciled(head.block_id, f, stats.leaked_bits, stats.bits_corrected))

    def _head_reconciled(self, block_id: int) -> _Block:
        head = self._queue[0] if self._queue else None
        if head is None or head.block_id != block_id or not isinstance(head.cascade, CascadeBob):
            raise _SessionRemoteError(f"message for block {block_id}, which is not being reconciled")
        if head.cascade.state is not BobState.DONE:
            raise _SessionRemoteError(f"block {block_id} is still being reconciled")
        return head

    def _check_tag(self, msg: VerificationTag) -> None:
        head = self._head_reconciled(int(msg.block_id))
        if self._verified is head:
            raise _SessionRemoteError(f"block {head.block_id} was verified already")
        vh = self._verification(head)
        if not isinstance(msg.seed, bytes) or len(msg.seed) != vh.seed_bytes:
            raise _SessionRemoteError("verification seed of the wrong length")
        assert isinstance(head.cascade, CascadeBob)
        ok = vh.check(head.cascade.corrected_key(), msg.seed, msg.tag, backend=self._backend)
        errors = head.cascade.statistics().bits_corrected
        self._pending.append(VerificationResult(head.block_id, ok, errors))
        head.verified = True
        head.n_out = self._output_length(head, vh.tag_bits)
        self._verified = head
        head.tags_ok = ok
        if ok:
            self._events.append(BlockVerified(head.block_id))

    def _amplify(self, msg: AmplificationSeed) -> None:
        head = self._head_reconciled(int(msg.block_id))
        if self._verified is not head:
            raise _SessionRemoteError(f"amplification seed before the verification tag of block {head.block_id}")
        n_in = len(head.sifted)
        if msg.n_in != n_in or msg.n_out != head.n_out:
            raise _SessionRemoteError(
                f"amplification {msg.n_in} -> {msg.n_out} bits, bob computed {n_in} -> {head.n_out}"
            )
        need = seed_length(n_in, head.n_out)
        if not isinstance(msg.seed, bytes) or len(msg.seed) != (need + 7) // 8:
            raise _SessionRemoteError("amplification seed of the wrong length")
        refill = int(msg.auth_refill_bits)
        if refill < 0 or refill % 16 or refill > head.n_out:
            raise _SessionRemoteError("auth_refill_bits must be a multiple of 16 within the block's key")
        self._queue.popleft()
        self._verified = None
        if not head.tags_ok:  # the seed message only closes a discarded block
            self._discard(head, "verification tags differ")
            return
        seed = np.unpackbits(np.frombuffer(msg.seed, dtype=np.uint8), count=need, bitorder="little")
        assert isinstance(head.cascade, CascadeBob)
        key = toeplitz_hash(head.cascade.corrected_key(), seed, head.n_out)
        self._keep(head, key, refill)

    def statistics(self) -> QkdLinkStatistics:
        s = self._sifting.statistics()
        return self._statistics(s.pulses, s.detections, s.sifted_total)


# -------------------------------------------------------------------- the Pair driver


class DetectionSource(Protocol):
    """What the pair needs of an optical link (emulator.broker.optics.OpticalLink)."""

    def advance(self, now_s: float, *, max_detections: int = ...) -> object: ...


#: tamper(direction, envelope) -> the envelopes to deliver instead ("a->b" / "b->a").
Tamper = Callable[[str, Envelope], list[Envelope]]


class QkdLinkPair:
    """Drives both ends with no sockets (CONVENTIONS 9), fed by an optical link on an
    emulated clock. `tamper(direction, envelope) -> envelopes to deliver instead`
    (direction "a->b" or "b->a") lets a test forge, replay or drop messages."""

    def __init__(self, alice: QkdLinkAlice, bob: QkdLinkBob, link: DetectionSource, *,
                 tamper: Tamper | None = None, max_rounds: int = 10_000, max_detections: int = 1 << 22) -> None:  # fmt: skip
        self.alice, self.bob, self.link = alice, bob, link
        self.tamper = tamper
        self.max_rounds = int(max_rounds)
        self.max_detections = int(max_detections)
        self.now_s = 0.0
        self.events: list[tuple[str, QkdEvent]] = []

    def _deliver(self, direction: str, envelopes: list[Envelope], to: _End) -> None:
        for env in envelopes:
            for out in self.tamper(direction, env) if self.tamper is not None else [env]:
                to.receive(out, self.now_s)

    def exchange(self) -> int:
        """Move envelopes both ways until both ends are quiet; returns the rounds used."""
        rounds = 0
        while True:
            to_alice = self.bob.messages_to_send()
            self._deliver("b->a", to_alice, self.alice)
            to_bob = self.alice.messages_to_send()
            self._deliver("a->b", to_bob, self.bob)
            self._collect()
            if not to_alice and not to_bob:
                return rounds
            rounds += 1
            if rounds >= self.max_rounds:
                raise QkdRoundLimitExceeded(f"the link did not settle within {self.max_rounds} rounds")

    def _collect(self) -> None:
        for name, end in (("alice", self.alice), ("bob", self.bob)):
            while (ev := end.next_event()) is not None:
                self.events.append((name, ev))

    def advance(self, now_s: float) -> None:
        """Emulated time moves to now_s: the link's detections up to then reach Bob (in
        windows of at most max_detections), Alice learns the pulses emitted, then the
        ends talk until quiet."""
        if not now_s >= self.now_s or not math.isfinite(now_s):
            raise QkdSessionError(f"time must move forward: {now_s!r} after {self.now_s!r}")
        self.now_s = now_s
        while True:
            batch = self.link.advance(now_s, max_detections=self.max_detections)
            self.alice.on_emitted(batch.end_pulse)  # type: ignore[attr-defined]
            window = DetectionWindow.from_detections(
                batch.first_pulse, batch.end_pulse, batch.for_receiver()  # type: ignore[attr-defined]
            )
            self.bob.add_detections(window, now_s)
            self.exchange()
            if batch.complete:  # type: ignore[attr-defined]
                return

    def run(self, until_s: float, step_s: float) -> None:
        """advance() in steps of step_s up to until_s."""
        if step_s <= 0.0:
            raise QkdSessionError(f"step_s must be > 0, got {step_s!r}")
        t = self.now_s
        while t < until_s - 1e-12:
            t = min(t + step_s, until_s)
            self.advance(t)
