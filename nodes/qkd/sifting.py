"""Sifting of decoy-state BB84 detections and the parameter-estimation sample, sans-IO.

Theory of operation
-------------------
The broker pushes Bob windows of detections: for pulses [first_pulse, end_pulse) of the
link, the index of every pulse that clicked, the basis Bob measured it in, his outcome
and a double-click flag (emulator.kernels._optics; nothing else is Bob's to know). Alice
knows nothing of the quantum channel, but her choice for any pulse index — intensity
class, basis, bit — is a pure function of her secret key (``optics_choices``). Sifting
is the public discussion that turns the two into matching raw keys (Bennett & Brassard
1984; decoy-state BB84: Lo, Ma & Chen, PRL 94, 230504 (2005) and Ma, Qi, Zhao & Lo, PRA
72, 012326 (2005) Sec. II, "Ma et al." below):

1. Bob -> Alice ``SiftAnnounce``: the pulses of one batch of his detections and his
   bases (never his outcomes), with the pulse range the batch covers, so that both ends
   count the pulses sent. Bob cuts his stream of windows into batches of at most
   ``batch_detections`` detections; a cut falls just before a detection, so the covered
   ranges tile the windows exactly.
2. Alice -> Bob ``SiftReply``: per announced detection, whether her basis was Bob's and
   the intensity class of the pulse. Decoy BB84 announces the class of every detected
   pulse (Lo, Ma & Chen 2005; Ma et al. Sec. III): only the classes' separate gains and
   error rates bound the single-photon contribution. Both ends now hold, per class and
   basis, the same sifted positions; Alice her bits, Bob his outcomes.
3. Alice closes a block (``close_block``, or automatically once ``block_key_bits``
   signal bits of the key basis are waiting) and sends ``ParameterSample``: the bits of
   every sifted detection that cannot be key — all decoy and vacuum detections in both
   bases (their error rates feed the decoy bounds), all signal detections of the test
   basis (their errors bound the phase error, Lim et al. 2014 Eq. (4)) — plus a random
   sample of the signal key-basis bits (the QBER that sets Cascade's block sizes).
   The sample is chosen per bit with probability r = ``sample_threshold / 2**53``, as
   ``(rng_u64(sample_seed, SAMPLE_STREAM, j) >> 11) < sample_threshold`` for the j-th
   signal key-basis detection of the block (Philox, emulator.kernels: bit-identical at
   both ends and in any language). Alice draws ``sample_seed`` from her own key (stream
   ``SAMPLE_SEED_STREAM``, index = block id), so nobody else can predict the sample.
4. Bob -> Alice ``ParameterErrors``: the errors he found per class and basis, so that
   both ends hold the same counts and reach the same abort decision.

Every disclosed bit leaves the key material: a block (``SiftedBlock``) keeps only the
signal detections of the key basis that were not sampled — Alice's bits at one end,
Bob's outcomes at the other — plus the counts estimation needs (``BlockCounts``).

State rules (every message carries a sequence number; anything else is rejected with a
``SiftingRemoteError``, counted in ``statistics()``, and leaves the session as it was):

    ALICE  SiftAnnounce     seq = next, first_pulse >= last end, well formed -> SiftReply
           ParameterErrors  block_id = oldest block awaiting errors          -> block done
    BOB    SiftReply        seq = oldest unanswered announcement             -> positions sifted
           ParameterSample  block_id = next, through_seq answered            -> ParameterErrors, block done

    lower seq / block id than expected -> REPLAYED; higher -> OUT_OF_ORDER;
    bad field or length -> MALFORMED; wrong message for this end -> UNEXPECTED.

Bulk fields travel as packed bytes (little-endian uint64 pulse indices, LSB-first bit
packing, one uint8 per class), so that a codec can carry them as msgpack bin. Outcomes
and key bits never appear in a message from Bob, and key bits never in a repr, event,
statistic or exception.
"""

from __future__ import annotations

import dataclasses
import enum
from collections import deque
from typing import Union

import numpy as np

from emulator.kernels import MAX_PULSE_INDEX, Backend, Basis, ChoiceThresholds, get_backend
from emulator.physics import IntensityClass
from emulator.wire import ErrorCode, LocalProtocolError, RemoteProtocolError

__all__ = [
    "DEFAULT_BATCH_DETECTIONS",
    "DEFAULT_SAMPLE_FRACTION",
    "MAX_BATCH_DETECTIONS",
    "N_BASES",
    "N_CLASSES",
    "SAMPLE_SEED_STREAM",
    "SAMPLE_STREAM",
    "BlockCounts",
    "BlockSifted",
    "DetectionWindow",
    "ParameterErrors",
    "ParameterSample",
    "Rejection",
    "SiftAnnounce",
    "SiftReply",
    "SiftedBlock",
    "SiftingAlice",
    "SiftingBob",
    "SiftingLocalError",
    "SiftingMessage",
    "SiftingPair",
    "SiftingRemoteError",
    "SiftingRoundLimitExceeded",
    "SiftingStatistics",
    "sample_mask",
    "sample_threshold",
]

N_CLASSES = 3  # IntensityClass: SIGNAL, DECOY, VACUUM
N_BASES = 2  # Basis.Z, Basis.X
#: Most detections one SiftAnnounce may carry: 2**20 x 8 bytes of pulse indices stays well
#: below the wire's 16 MiB frame limit.
MAX_BATCH_DETECTIONS = 1 << 20
DEFAULT_BATCH_DETECTIONS = 1 << 16
#: Default share of the signal key-basis bits disclosed to estimate the QBER for
#: Cascade: 5 % of a 10^6-bit block is 5·10^4 bits, sigma(QBER) ~ 8e-4 at 3 % — far finer
#: than Cascade's block sizes (k1 ~ 0.73/Q) need.
DEFAULT_SAMPLE_FRACTION = 0.05
#: Philox streams: under the sample seed, the per-bit sample draws; under Alice's key,
#: the sample seed of block b (index b). CHOICE_STREAM (0) under her key is her choices.
SAMPLE_STREAM = 0x5346_5453_414D_504C  # "SFTSAMPL"
SAMPLE_SEED_STREAM = 0x5346_5453_4545_4453  # "SFTSEEDS"
_SAMPLE_ONE = 1 << 53
_U64 = np.dtype("<u8")

_frozen = dataclasses.dataclass(frozen=True, slots=True)

Cells = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]


# ------------------------------------------------------------------------------ errors


class SiftingLocalError(LocalProtocolError):
    """Our caller misused the sifting API (bad detection window, wrong state)."""

    def __init__(self, message: str) -> None:
        super().__init__(ErrorCode.BAD_FIELD, message)


class Rejection(enum.Enum):
    """Why a received sifting message was rejected."""

    REPLAYED = "replayed"
    OUT_OF_ORDER = "out_of_order"
    MALFORMED = "malformed"
    UNEXPECTED = "unexpected"


class SiftingRemoteError(RemoteProtocolError):
    """The peer sent a sifting message that breaks the protocol; the session survives."""

    def __init__(self, reason: Rejection, message: str) -> None:
        super().__init__(ErrorCode.BAD_FIELD, f"{reason.value}: {message}")
        self.reason = reason


class SiftingRoundLimitExceeded(SiftingLocalError):
    """SiftingPair stopped: messages were still flowing after the round cap."""


def _malformed(message: str) -> SiftingRemoteError:
    return SiftingRemoteError(Rejection.MALFORMED, message)


def _sequence_error(what: str, got: int, expected: int) -> SiftingRemoteError:
    reason = Rejection.REPLAYED if got < expected else Rejection.OUT_OF_ORDER
    return SiftingRemoteError(reason, f"{what} {got}, expected {expected}")


def _remote_int(name: str, value: object, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _malformed(f"{name} must be an integer, got {type(value).__name__}")
    if not low <= value <= high:
        raise _malformed(f"{name} must be in [{low}, {high}], got {value}")
    return value


def _remote_bytes(name: str, value: object, length: int) -> bytes:
    if not isinstance(value, (bytes, bytearray)):
        raise _malformed(f"{name} must be bytes, got {type(value).__name__}")
    if len(value) != length:
        raise _malformed(f"{name} holds {len(value)} bytes, {length} expected")
    return bytes(value)


def _pack_bits(bits: np.ndarray) -> bytes:
    return np.packbits(np.asarray(bits, dtype=np.uint8), bitorder="little").tobytes()


def _unpack_bits(data: bytes, count: int) -> np.ndarray:
    return np.unpackbits(np.frombuffer(data, dtype=np.uint8), count=count, bitorder="little")


# ------------------------------------------------------------------------ the sample


def sample_threshold(fraction: float) -> int:
    """The integer threshold (in [0, 2**53]) that samples a bit with probability `fraction`."""
    f = float(fraction)
    if not 0.0 <= f <= 1.0:
        raise SiftingLocalError(f"sample_fraction must be in [0, 1], got {fraction!r}")
    return round(f * _SAMPLE_ONE)


def sample_mask(seed: int, threshold: int, count: int, backend: Backend | None = None) -> np.ndarray:
    """Which of `count` signal key-basis bits are sampled (bool array; see the module docstring)."""
    be = backend if backend is not None else get_backend()
    if count == 0:
        return np.zeros(0, dtype=bool)
    draws = be.rng_u64(int(seed), SAMPLE_STREAM, 0, int(count))
    return (draws >> np.uint64(11)) < np.uint64(threshold)


# --------------------------------------------------------------------------- messages


@_frozen
class SiftAnnounce:
    """Bob -> Alice: his `count` detections among pulses [first_pulse, end_pulse).

    `pulses`: count little-endian uint64 pulse indices, increasing; `bases`: his bases,
    count bits packed LSB-first (bit j = bit j % 8 of byte j // 8; 0 Z, 1 X).
    """

    seq: int
    first_pulse: int
    end_pulse: int
    count: int
    pulses: bytes
    bases: bytes

    @classmethod
    def build(cls, seq: int, first_pulse: int, end_pulse: int, pulses: np.ndarray, bases: np.ndarray) -> SiftAnnounce:
        return cls(
            seq, first_pulse, end_pulse, int(pulses.shape[0]),
            np.ascontiguousarray(pulses, dtype=_U64).tobytes(), _pack_bits(bases),
        )  # fmt: skip

    def decoded(self) -> tuple[np.ndarray, np.ndarray]:
        """(pulses uint64, bases uint8) after checking every field; SiftingRemoteError if malformed."""
        _remote_int("seq", self.seq, 0, 1 << 63)
        first = _remote_int("first_pulse", self.first_pulse, 0, MAX_PULSE_INDEX)
        end = _remote_int("end_pulse", self.end_pulse, first, MAX_PULSE_INDEX)
        count = _remote_int("count", self.count, 0, min(MAX_BATCH_DETECTIONS, end - first))
        pulses = np.frombuffer(_remote_bytes("pulses", self.pulses, 8 * count), dtype=_U64).astype(np.uint64)
        bases = _unpack_bits(_remote_bytes("bases", self.bases, (count + 7) // 8), count)
        if count and (int(pulses[0]) < first or int(pulses[-1]) >= end or bool((pulses[1:] <= pulses[:-1]).any())):
            raise _malformed(f"pulses must increase strictly within [{first}, {end})")
        return pulses, bases


@_frozen
class SiftReply:
    """Alice -> Bob: per detection of announcement `seq`, whether the bases matched
    (`matched`, count bits packed LSB-first) and the pulse's intensity class (`classes`,
    one uint8 each: 0 signal, 1 decoy, 2 vacuum)."""

    seq: int
    count: int
    matched: bytes
    classes: bytes

    @classmethod
    def build(cls, seq: int, matched: np.ndarray, classes: np.ndarray) -> SiftReply:
        raw_classes = np.ascontiguousarray(classes, dtype=np.uint8).tobytes()
        return cls(seq, int(matched.shape[0]), _pack_bits(matched), raw_classes)

    def decoded(self, expected_count: int) -> tuple[np.ndarray, np.ndarray]:
        """(matched bool, classes uint8); SiftingRemoteError if malformed."""
        count = _remote_int("count", self.count, 0, MAX_BATCH_DETECTIONS)
        if count != expected_count:
            raise _malformed(f"sift reply holds {count} detections, the announcement had {expected_count}")
        matched = _unpack_bits(_remote_bytes("matched", self.matched, (count + 7) // 8), count).astype(bool)
        classes = np.frombuffer(_remote_bytes("classes", self.classes, count), dtype=np.uint8).copy()
        if count and int(classes.max()) >= N_CLASSES:
            raise _malformed("intensity classes must be 0 (signal), 1 (decoy) or 2 (vacuum)")
        return matched, classes


@_frozen
class ParameterSample:
    """Alice -> Bob: close block `block_id` after announcement `through_seq` and disclose
    `count` bits (packed LSB-first) in sifted order: every sifted detection that is not a
    signal detection of `key_basis`, and the sampled ones among those (see
    `sample_mask(sample_seed, sample_threshold, ...)`). `signal_threshold` and
    `signal_or_decoy_threshold` are Alice's class thresholds (ChoiceThresholds), which
    give Bob the exact class probabilities."""

    block_id: int
    through_seq: int
    key_basis: int
    sample_seed: int
    sample_threshold: int
    signal_threshold: int
    signal_or_decoy_threshold: int
    count: int
    disclosed: bytes


@_frozen
class ParameterErrors:
    """Bob -> Alice: the errors among block `block_id`'s disclosed bits, six little-endian
    uint64 in the order [class][basis] (signal Z, signal X, decoy Z, ..., vacuum X)."""

    block_id: int
    errors: bytes

    @classmethod
    def build(cls, block_id: int, errors: np.ndarray) -> ParameterErrors:
        return cls(block_id, np.ascontiguousarray(errors, dtype=_U64).tobytes())


SiftingMessage = Union[SiftAnnounce, SiftReply, ParameterSample, ParameterErrors]


# ------------------------------------------------------------- detections, blocks, events


def _as_bits(name: str, value: object, count: int) -> np.ndarray:
    arr = np.asarray(value)
    if arr.shape != (count,):
        raise SiftingLocalError(f"{name} must be 1-D with one entry per detection ({count}), got shape {arr.shape}")
    if count and (arr.dtype.kind not in "biu" or int(arr.min()) < 0 or int(arr.max()) > 1):
        raise SiftingLocalError(f"{name} must hold 0/1 values")
    return np.ascontiguousarray(arr, dtype=np.uint8)


@dataclasses.dataclass(frozen=True, slots=True, eq=False, repr=False)
class DetectionWindow:
    """What the broker tells Bob about pulses [first_pulse, end_pulse): the detected pulses
    (increasing uint64 indices) and, per detection, his basis (0 Z, 1 X), his outcome and
    whether both detectors fired (squashed to a random outcome). Outcomes are Bob's raw
    key: the repr shows counts only. Arrays are validated and normalised on creation."""

    first_pulse: int
    end_pulse: int
    pulse: np.ndarray
    basis: np.ndarray
    outcome: np.ndarray
    double_click: np.ndarray

    def __post_init__(self) -> None:
        for name in ("first_pulse", "end_pulse"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise SiftingLocalError(f"{name} must be an integer")
        first, end = int(self.first_pulse), int(self.end_pulse)
        if not 0 <= first <= end <= MAX_PULSE_INDEX:
            raise SiftingLocalError(f"need 0 <= first_pulse <= end_pulse <= 2**53, got [{first}, {end})")
        pulse = np.asarray(self.pulse)
        if pulse.ndim != 1 or (pulse.size and (pulse.dtype.kind not in "iu")):
            raise SiftingLocalError("pulse must be a 1-D integer array")
        n = int(pulse.shape[0])
        if n and int(pulse.min()) < 0:
            raise SiftingLocalError("pulse indices must be >= 0")
        pulse = np.ascontiguousarray(pulse, dtype=np.uint64)
        if n and (int(pulse[0]) < first or int(pulse[-1]) >= end or bool((pulse[1:] <= pulse[:-1]).any())):
            raise SiftingLocalError(f"pulse indices must increase strictly within [{first}, {end})")
        object.__setattr__(self, "first_pulse", first)
        object.__setattr__(self, "end_pulse", end)
        object.__setattr__(self, "pulse", pulse)
        for name in ("basis", "outcome", "double_click"):
            object.__setattr__(self, name, _as_bits(name, getattr(self, name), n))

    @classmethod
    def from_detections(cls, first_pulse: int, end_pulse: int, detections: object) -> DetectionWindow:
        """Bob's columns of a window: anything with pulse, outcome, double_click and
        basis (a broker ReceiverRecord) or bob_basis (emulator.kernels.Detections)."""
        basis = getattr(detections, "basis", None)
        if basis is None:
            basis = getattr(detections, "bob_basis")
        return cls(
            first_pulse, end_pulse, getattr(detections, "pulse"), basis,
            getattr(detections, "outcome"), getattr(detections, "double_click"),
        )  # fmt: skip

    def __len__(self) -> int:
        return int(self.pulse.shape[0])

    def __repr__(self) -> str:
        return f"<DetectionWindow pulses [{self.first_pulse}, {self.end_pulse}) detections={len(self)}>"


def _cells(flat: np.ndarray) -> Cells:
    """[class][basis] tuple of ints from a length-6 array."""
    f = [int(x) for x in flat]
    return ((f[0], f[1]), (f[2], f[3]), (f[4], f[5]))


def _check_cells(name: str, cells: object) -> None:
    ok = (
        isinstance(cells, tuple)
        and len(cells) == N_CLASSES
        and all(isinstance(row, tuple) and len(row) == N_BASES for row in cells)
        and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for row in cells for v in row)
    )
    if not ok:
        raise SiftingLocalError(f"{name} must be 3 x 2 nested tuples of non-negative ints ([class][basis])")


@_frozen
class BlockCounts:
    """Public counts of one block — what parameter estimation needs (no key bits).

    pulses: pulses the block's batches covered; class_probabilities: Alice's exact
    (signal, decoy, vacuum) probabilities, so the pulses sent per class are
    ``pulses * p_k`` (their expectation: counting them exactly would cost Alice O(pulses)
    work, and Lim et al. 2014 Eq. (2) ff. divide by p_k the same way); detections: per
    class, every basis; sifted / disclosed / errors: [class][basis], bases 0 = Z, 1 = X
    (errors only among disclosed bits); key_bits: signal key-basis bits kept as key;
    sample_fraction: the probability r with which a signal key-basis bit was disclosed.
    """

    block_id: int
    pulses: int
    class_probabilities: tuple[float, float, float]
    key_basis: int
    sample_fraction: float
    detections: tuple[int, int, int]
    sifted: Cells
    disclosed: Cells
    errors: Cells
    key_bits: int

    def __post_init__(self) -> None:
        for name in ("block_id", "pulses", "key_bits"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise SiftingLocalError(f"{name} must be a non-negative int, got {v!r}")
        if self.key_basis not in (Basis.Z, Basis.X):
            raise SiftingLocalError(f"key_basis must be 0 (Z) or 1 (X), got {self.key_basis!r}")
        if len(self.class_probabilities) != N_CLASSES or any(not 0.0 <= p <= 1.0 for p in self.class_probabilities):
            raise SiftingLocalError("class_probabilities must be three probabilities")
        if abs(sum(self.class_probabilities) - 1.0) > 1e-9:
            raise SiftingLocalError("class_probabilities must sum to 1")
        if not 0.0 <= self.sample_fraction <= 1.0:
            raise SiftingLocalError(f"sample_fraction must be in [0, 1], got {self.sample_fraction!r}")
        bad = (isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in self.detections)
        if len(self.detections) != N_CLASSES or any(bad):
            raise SiftingLocalError("detections must be three non-negative ints")
        for name in ("sifted", "disclosed", "errors"):
            _check_cells(name, getattr(self, name))
        for c in range(N_CLASSES):
            if sum(self.sifted[c]) > self.detections[c]:
                raise SiftingLocalError("sifted detections of a class exceed its detections")
            for b in range(N_BASES):
                if not self.errors[c][b] <= self.disclosed[c][b] <= self.sifted[c][b]:
                    raise SiftingLocalError("need errors <= disclosed <= sifted in every class and basis")
        if sum(self.detections) > self.pulses:
            raise SiftingLocalError("more detections than pulses")

    @property
    def test_basis(self) -> int:
        return 1 - int(self.key_basis)

    @property
    def pulses_per_class(self) -> tuple[float, float, float]:
        """Expected pulses sent per class, pulses x p_k."""
        p = self.class_probabilities
        return (self.pulses * p[0], self.pulses * p[1], self.pulses * p[2])

    @property
    def total_detections(self) -> int:
        return sum(self.detections)

    @property
    def total_sifted(self) -> int:
        return sum(sum(row) for row in self.sifted)

    @property
    def total_disclosed(self) -> int:
        return sum(sum(row) for row in self.disclosed)


@dataclasses.dataclass(frozen=True, slots=True, eq=False, repr=False)
class SiftedBlock:
    """One end's result for a block: the counts (public), the pulse indices of the key
    bits (public: both ends hold the same) and this end's key bits — Alice's bits or
    Bob's outcomes, uint8 0/1, secret: the repr shows counts only."""

    role: str
    counts: BlockCounts
    key_pulses: np.ndarray
    key_bits: np.ndarray

    @property
    def block_id(self) -> int:
        return self.counts.block_id

    def __len__(self) -> int:
        return int(self.key_bits.shape[0])

    def __repr__(self) -> str:
        c = self.counts
        return f"<SiftedBlock {self.role} block={c.block_id} pulses={c.pulses} key_bits={len(self)}>"


@_frozen
class BlockSifted:
    """Event: block `counts.block_id` is complete at this end; take it with next_block()."""

    counts: BlockCounts


SiftingEvent = BlockSifted


@_frozen
class SiftingStatistics:
    """Counters of one end (no key material). pulses: pulses covered by the windows (Bob)
    or the announcements answered (Alice); detections_per_class and sifted ([class]
    [basis]) count answered batches; double_clicks is Bob's alone; disclosed_bits and
    key_bits count completed blocks; rejections counts rejected messages per reason."""

    role: str
    pulses: int
    detections: int
    detections_per_class: tuple[int, int, int]
    sifted: Cells
    double_clicks: int
    batches: int
    blocks: int
    disclosed_bits: int
    key_bits: int
    messages_sent: int
    messages_received: int
    rejected_messages: int
    rejections: tuple[tuple[str, int], ...]

    @property
    def sifted_total(self) -> int:
        return sum(sum(row) for row in self.sifted)


# -------------------------------------------------------------------- shared machinery


class _Batch:
    """A batch whose reply is known: span, detections per class and its sifted rows."""

    __slots__ = ("classes_count", "pulse", "seq", "span", "value", "cls", "basis")

    def __init__(
        self, seq: int, span: int, classes_count: np.ndarray,
        pulse: np.ndarray, cls: np.ndarray, basis: np.ndarray, value: np.ndarray,
    ) -> None:  # fmt: skip
        self.seq = seq
        self.span = span
        self.classes_count = classes_count
        self.pulse, self.cls, self.basis, self.value = pulse, cls, basis, value


class _Ledger:
    """Answered batches not yet in a block, plus the session counters of one end."""

    def __init__(self, role: str) -> None:
        self.role = role
        self.batches: list[_Batch] = []
        self.pulses = 0
        self.detections = 0
        self.per_class = np.zeros(N_CLASSES, dtype=np.int64)
        self.sifted = np.zeros(N_CLASSES * N_BASES, dtype=np.int64)
        self.double_clicks = 0
        self.n_batches = 0
        self.blocks = 0
        self.disclosed = 0
        self.key_bits = 0
        self.sent = 0
        self.received = 0
        self.rejections: dict[Rejection, int] = {}
        self.last_block_seq = -1  # through_seq of the last block

    def add(self, batch: _Batch) -> None:
        self.batches.append(batch)
        self.per_class += batch.classes_count
        self.sifted += np.bincount(batch.cls.astype(np.int64) * N_BASES + batch.basis, minlength=N_CLASSES * N_BASES)
        self.n_batches += 1

    def reject(self, err: SiftingRemoteError) -> None:
        self.rejections[err.reason] = self.rejections.get(err.reason, 0) + 1

    def pending(self, intensity_class: int, basis: int) -> np.ndarray:
        parts = [b.pulse[(b.cls == intensity_class) & (b.basis == basis)] for b in self.batches]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint64)

    def take(self, through_seq: int) -> tuple[list[_Batch], int]:
        """Remove and return the batches with seq <= through_seq, and the highest seq."""
        taken = [b for b in self.batches if b.seq <= through_seq]
        self.batches = [b for b in self.batches if b.seq > through_seq]
        self.last_block_seq = through_seq
        return taken, through_seq

    def statistics(self) -> SiftingStatistics:
        return SiftingStatistics(
            role=self.role, pulses=self.pulses, detections=self.detections,
            detections_per_class=(int(self.per_class[0]), int(self.per_class[1]), int(self.per_class[2])),
            sifted=_cells(self.sifted), double_clicks=self.double_clicks, batches=self.n_batches,
            blocks=self.blocks, disclosed_bits=self.disclosed, key_bits=self.key_bits,
            messages_sent=self.sent, messages_received=self.received,
            rejected_messages=sum(self.rejections.values()),
            rejections=tuple(sorted((r.value, n) for r, n in self.rejections.items())),
        )  # fmt: skip


class _Assembly:
    """A block's rows split into disclosed and key positions (identical at both ends)."""

    __slots__ = (
        "cell", "detections", "disclosed", "disclosed_cells", "key_idx", "pulse", "pulses", "sifted_cells", "value",
    )

    def __init__(self, batches: list[_Batch], key_basis: int, seed: int, threshold: int, backend: Backend) -> None:
        def cat(name: str, dtype: type) -> np.ndarray:
            parts = [getattr(b, name) for b in batches]
            return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)

        self.pulse = cat("pulse", np.uint64)
        cls = cat("cls", np.uint8).astype(np.int64)
        basis = cat("basis", np.uint8).astype(np.int64)
        self.value = cat("value", np.uint8)
        self.pulses = sum(b.span for b in batches)
        self.detections = sum((b.classes_count for b in batches), np.zeros(N_CLASSES, dtype=np.int64))
        self.cell = cls * N_BASES + basis
        candidates = np.flatnonzero((cls == IntensityClass.SIGNAL) & (basis == key_basis))
        sampled = sample_mask(seed, threshold, int(candidates.shape[0]), backend)
        self.disclosed = np.ones(self.pulse.shape[0], dtype=bool)
        self.key_idx = candidates[~sampled]
        self.disclosed[self.key_idx] = False
        self.sifted_cells = np.bincount(self.cell, minlength=N_CLASSES * N_BASES)
        self.disclosed_cells = np.bincount(self.cell[self.disclosed], minlength=N_CLASSES * N_BASES)

    def counts(self, block_id: int, probabilities: tuple[float, float, float], key_basis: int,
               threshold: int, errors: np.ndarray) -> BlockCounts:  # fmt: skip
        return BlockCounts(
            block_id=block_id, pulses=int(self.pulses), class_probabilities=probabilities,
            key_basis=int(key_basis), sample_fraction=threshold / _SAMPLE_ONE,
            detections=(int(self.detections[0]), int(self.detections[1]), int(self.detections[2])),
            sifted=_cells(self.sifted_cells), disclosed=_cells(self.disclosed_cells), errors=_cells(errors),
            key_bits=int(self.key_idx.shape[0]),
        )  # fmt: skip


def _probabilities(signal: int, signal_or_decoy: int) -> tuple[float, float, float]:
    s, sd = signal / 2**32, signal_or_decoy / 2**32
    return (s, sd - s, 1.0 - sd)


# ------------------------------------------------------------------------------ Alice


@dataclasses.dataclass(slots=True)
class _AwaitingErrors:
    block_id: int
    through_seq: int
    assembly: _Assembly
    threshold: int


class _SiftingEnd:
    """What both ends share: the outbox, the event and block queues, the ledger."""

    _outbox: list[SiftingMessage]
    _events: deque[SiftingEvent]
    _blocks: deque[SiftedBlock]
    _ledger: _Ledger

    def _send(self, msg: SiftingMessage) -> None:
        self._outbox.append(msg)
        self._ledger.sent += 1

    def messages_to_send(self) -> list[SiftingMessage]:
        out, self._outbox = self._outbox, []
        return out

    def next_event(self) -> SiftingEvent | None:
        return self._events.popleft() if self._events else None

    def next_block(self) -> SiftedBlock | None:
        """The oldest completed block (secret key bits or outcomes inside), or None."""
        return self._blocks.popleft() if self._blocks else None

    @property
    def blocks_open(self) -> int:
        """Blocks closed but not complete at this end yet (Alice: awaiting Bob's errors)."""
        return 0

    def statistics(self) -> SiftingStatistics:
        return self._ledger.statistics()


class SiftingAlice(_SiftingEnd):
    """Alice's end: answers announcements from her choices, closes blocks, discloses.

    `alice_key` is the 64-bit key of her choices (secret: never in a repr); `thresholds`
    her ChoiceThresholds (class and basis probabilities). `key_basis` is the basis whose
    signal detections make the key (the other one is the test basis of Lim et al. 2014);
    `sample_fraction` the share of signal key-basis bits disclosed for the QBER;
    `block_key_bits`, if set, closes a block automatically as soon as that many signal
    key-basis bits (before sampling) wait.
    """

    def __init__(
        self,
        alice_key: int,
        thresholds: ChoiceThresholds,
        backend: Backend | None = None,
        *,
        key_basis: Basis | int = Basis.Z,
        sample_fraction: float = DEFAULT_SAMPLE_FRACTION,
        block_key_bits: int | None = None,
    ) -> None:
        if isinstance(alice_key, bool) or not isinstance(alice_key, int) or not 0 <= alice_key < 1 << 64:
            raise SiftingLocalError("alice_key must be an int in [0, 2**64)")
        if not isinstance(thresholds, ChoiceThresholds):
            raise SiftingLocalError(f"thresholds must be ChoiceThresholds, got {type(thresholds).__name__}")
        if int(key_basis) not in (Basis.Z, Basis.X):
            raise SiftingLocalError(f"key_basis must be Basis.Z or Basis.X, got {key_basis!r}")
        if block_key_bits is not None and int(block_key_bits) < 1:
            raise SiftingLocalError(f"block_key_bits must be >= 1, got {block_key_bits}")
        self._key = alice_key
        self._thresholds = thresholds
        self._backend = backend if backend is not None else get_backend()
        self._key_basis = int(key_basis)
        self._threshold = sample_threshold(sample_fraction)
        self._block_key_bits = None if block_key_bits is None else int(block_key_bits)
        self._next_seq = 0
        self._last_end = 0
        self._next_block = 0
        self._pending_key = 0
        self._awaiting: deque[_AwaitingErrors] = deque()
        self._ledger = _Ledger("alice")
        self._outbox: list[SiftingMessage] = []
        self._events: deque[SiftingEvent] = deque()
        self._blocks: deque[SiftedBlock] = deque()

    def __repr__(self) -> str:
        return f"<SiftingAlice batches={self._ledger.n_batches} blocks={self._ledger.blocks}>"

    @property
    def key_basis(self) -> int:
        return self._key_basis

    @property
    def pending_key_bits(self) -> int:
        """Signal key-basis detections waiting for the next block (before sampling)."""
        return self._pending_key

    def pending_sifted(self, intensity_class: int, basis: int) -> np.ndarray:
        """Pulse indices of the sifted detections of a class and basis not yet in a block."""
        return self._ledger.pending(int(intensity_class), int(basis))

    def receive(self, msg: SiftingMessage, now: float = 0.0) -> None:
        """Handle one message from Bob. A message that breaks the protocol raises
        SiftingRemoteError, is counted, and leaves the session as it was."""
        self._ledger.received += 1
        try:
            if isinstance(msg, SiftAnnounce):
                self._answer(msg)
            elif isinstance(msg, ParameterErrors):
                self._take_errors(msg)
            else:
                raise SiftingRemoteError(Rejection.UNEXPECTED, f"{type(msg).__name__} is not a message for alice")
        except SiftingRemoteError as err:
            self._ledger.reject(err)
            raise

    def _answer(self, msg: SiftAnnounce) -> None:
        seq = _remote_int("seq", msg.seq, 0, 1 << 63)
        if seq != self._next_seq:
            raise _sequence_error("sift announcement seq", seq, self._next_seq)
        pulses, bases = msg.decoded()
        if msg.first_pulse < self._last_end:
            raise SiftingRemoteError(
                Rejection.REPLAYED,
                f"announcement covers pulses from {msg.first_pulse}, already sifted up to {self._last_end}",
            )
        choices = self._backend.optics_choices(self._key, pulses, self._thresholds)
        matched = choices.basis == bases
        classes = choices.intensity_class
        self._next_seq += 1
        self._last_end = msg.end_pulse
        led = self._ledger
        led.pulses += msg.end_pulse - msg.first_pulse
        led.detections += int(pulses.shape[0])
        rows = np.flatnonzero(matched)  # one scan of the mask, then cheap takes
        m_classes, m_bases = classes.take(rows), bases.take(rows)
        led.add(_Batch(
            seq, msg.end_pulse - msg.first_pulse, np.bincount(classes, minlength=N_CLASSES).astype(np.int64),
            pulses.take(rows), m_classes, m_bases, choices.bit.take(rows),
        ))  # fmt: skip
        key_rows = (m_classes == IntensityClass.SIGNAL) & (m_bases == self._key_basis)
        self._pending_key += int(np.count_nonzero(key_rows))
        self._send(SiftReply.build(seq, matched, classes))
        if self._block_key_bits is not None and self._pending_key >= self._block_key_bits:
            self.close_block()

    @property
    def blocks_open(self) -> int:
        return len(self._awaiting)

    def close_block(self, now: float = 0.0) -> int:
        """Close a block over every answered batch not yet in one; send ParameterSample.
        Returns the block id. The block completes when Bob's ParameterErrors arrives."""
        led = self._ledger
        if not led.batches:
            raise SiftingLocalError("no answered batches to close a block over")
        block_id = self._next_block
        seed = int(self._backend.rng_u64(self._key, SAMPLE_SEED_STREAM, block_id, 1)[0])
        batches, through = led.take(led.batches[-1].seq)
        self._pending_key = 0
        asm = _Assembly(batches, self._key_basis, seed, self._threshold, self._backend)
        bits = asm.value[asm.disclosed]
        self._next_block += 1
        self._awaiting.append(_AwaitingErrors(block_id, through, asm, self._threshold))
        t = self._thresholds
        self._send(ParameterSample(
            block_id, through, self._key_basis, seed, self._threshold, t.signal, t.signal_or_decoy,
            int(bits.shape[0]), _pack_bits(bits),
        ))  # fmt: skip
        return block_id

    def _take_errors(self, msg: ParameterErrors) -> None:
        block_id = _remote_int("block_id", msg.block_id, 0, 1 << 63)
        if not self._awaiting:
            raise SiftingRemoteError(
                Rejection.REPLAYED if block_id < self._next_block else Rejection.OUT_OF_ORDER,
                f"parameter errors for block {block_id}, no block awaits them",
            )
        head = self._awaiting[0]
        if block_id != head.block_id:
            raise _sequence_error("parameter errors for block", block_id, head.block_id)
        raw = _remote_bytes("errors", msg.errors, 8 * N_CLASSES * N_BASES)
        errors = np.frombuffer(raw, dtype=_U64).astype(np.int64)
        if bool((errors > head.assembly.disclosed_cells).any()):
            raise _malformed("more errors than disclosed bits in some class and basis")
        self._awaiting.popleft()
        t = self._thresholds
        counts = head.assembly.counts(
            block_id, _probabilities(t.signal, t.signal_or_decoy), self._key_basis, head.threshold, errors
        )
        self._finish(counts, head.assembly)

    def _finish(self, counts: BlockCounts, asm: _Assembly) -> None:
        led = self._ledger
        led.blocks += 1
        led.disclosed += counts.total_disclosed
        led.key_bits += counts.key_bits
        self._blocks.append(SiftedBlock("alice", counts, asm.pulse[asm.key_idx], asm.value[asm.key_idx]))
        self._events.append(BlockSifted(counts))



# -------------------------------------------------------------------------------- Bob


class _Announced:
    __slots__ = ("bases", "outcomes", "pulses", "seq", "span")

    def __init__(self, seq: int, span: int, pulses: np.ndarray, bases: np.ndarray, outcomes: np.ndarray) -> None:
        self.seq, self.span = seq, span
        self.pulses, self.bases, self.outcomes = pulses, bases, outcomes


class SiftingBob(_SiftingEnd):
    """Bob's end: turns detection windows into announcements and answers the sample.

    `batch_detections` (<= MAX_BATCH_DETECTIONS) is the size of a full announcement; the
    backend draws the sample mask (any backend gives the same mask).
    """

    def __init__(self, *, backend: Backend | None = None, batch_detections: int = DEFAULT_BATCH_DETECTIONS) -> None:
        if not 1 <= int(batch_detections) <= MAX_BATCH_DETECTIONS:
            raise SiftingLocalError(f"batch_detections must be in [1, {MAX_BATCH_DETECTIONS}], got {batch_detections}")
        self._backend = backend if backend is not None else get_backend()
        self._batch = int(batch_detections)
        self._pend: list[DetectionWindow] = []
        self._pend_first: int | None = None
        self._pend_end = 0
        self._pend_count = 0
        self._last_end: int | None = None
        self._next_seq = 0
        self._outstanding: deque[_Announced] = deque()
        self._last_answered = -1
        self._next_block = 0
        self._ledger = _Ledger("bob")
        self._outbox: list[SiftingMessage] = []
        self._events: deque[SiftingEvent] = deque()
        self._blocks: deque[SiftedBlock] = deque()

    def __repr__(self) -> str:
        return f"<SiftingBob batches={self._ledger.n_batches} blocks={self._ledger.blocks}>"

    def pending_sifted(self, intensity_class: int, basis: int) -> np.ndarray:
        """Pulse indices of the sifted detections of a class and basis not yet in a block."""
        return self._ledger.pending(int(intensity_class), int(basis))

    def add_detections(self, window: DetectionWindow, now: float = 0.0) -> None:
        """Take one window from the broker; full batches are announced at once.

        Windows come in pulse order; a window starting after the previous one's end (a
        gap) first announces what is pending, so every announcement covers one range.
        """
        if not isinstance(window, DetectionWindow):
            raise SiftingLocalError(f"add_detections takes a DetectionWindow, got {type(window).__name__}")
        if self._last_end is not None and window.first_pulse < self._last_end:
            raise SiftingLocalError(
                f"window starts at pulse {window.first_pulse}, before the end of the previous one ({self._last_end})"
            )
        if self._pend_first is not None and window.first_pulse != self._pend_end:
            self._emit(final=True)
        if self._pend_first is None:
            self._pend_first = window.first_pulse
        self._pend.append(window)
        self._pend_end = window.end_pulse
        self._pend_count += len(window)
        self._last_end = window.end_pulse
        led = self._ledger
        led.pulses += window.end_pulse - window.first_pulse
        led.detections += len(window)
        led.double_clicks += int(window.double_click.sum())
        if self._pend_count >= self._batch:
            self._emit(final=False)

    def flush(self, now: float = 0.0) -> None:
        """Announce every pending detection (and the pulses they cover)."""
        if self._pend_first is not None:
            self._emit(final=True)

    def _emit(self, *, final: bool) -> None:
        assert self._pend_first is not None
        pulse = np.concatenate([w.pulse for w in self._pend])
        basis = np.concatenate([w.basis for w in self._pend])
        outcome = np.concatenate([w.outcome for w in self._pend])
        n, k, start = int(pulse.shape[0]), 0, self._pend_first
        while n - k >= self._batch or (final and (k < n or start < self._pend_end)):
            take = min(self._batch, n - k)
            end = int(pulse[k + take]) if k + take < n else self._pend_end
            self._announce(start, end, pulse[k : k + take], basis[k : k + take], outcome[k : k + take])
            start, k = end, k + take
        if final or (k == n and start == self._pend_end):
            self._pend, self._pend_first, self._pend_count = [], None, 0
            return
        double = np.concatenate([w.double_click for w in self._pend])
        rest = DetectionWindow(start, self._pend_end, pulse[k:], basis[k:], outcome[k:], double[k:])
        self._pend, self._pend_first, self._pend_count = [rest], start, n - k

    def _announce(self, first: int, end: int, pulses: np.ndarray, bases: np.ndarray, outcomes: np.ndarray) -> None:
        seq = self._next_seq
        self._next_seq += 1
        self._outstanding.append(_Announced(seq, end - first, pulses.copy(), bases.copy(), outcomes.copy()))
        self._send(SiftAnnounce.build(seq, first, end, pulses, bases))

    def receive(self, msg: SiftingMessage, now: float = 0.0) -> None:
        """Handle one message from Alice. A message that breaks the protocol raises
        SiftingRemoteError, is counted, and leaves the session as it was."""
        self._ledger.received += 1
        try:
            if isinstance(msg, SiftReply):
                self._take_reply(msg)
            elif isinstance(msg, ParameterSample):
                self._take_sample(msg)
            else:
                raise SiftingRemoteError(Rejection.UNEXPECTED, f"{type(msg).__name__} is not a message for bob")
        except SiftingRemoteError as err:
            self._ledger.reject(err)
            raise

    def _take_reply(self, msg: SiftReply) -> None:
        seq = _remote_int("seq", msg.seq, 0, 1 << 63)
        expected = self._outstanding[0].seq if self._outstanding else self._next_seq
        if seq != expected or not self._outstanding:
            raise _sequence_error("sift reply seq", seq, expected)
        head = self._outstanding[0]
        matched, classes = msg.decoded(int(head.pulses.shape[0]))
        self._outstanding.popleft()
        self._last_answered = seq
        rows = np.flatnonzero(matched)
        self._ledger.add(_Batch(
            seq, head.span, np.bincount(classes, minlength=N_CLASSES).astype(np.int64),
            head.pulses.take(rows), classes.take(rows), head.bases.take(rows), head.outcomes.take(rows),
        ))  # fmt: skip

    def _take_sample(self, msg: ParameterSample) -> None:
        block_id = _remote_int("block_id", msg.block_id, 0, 1 << 63)
        if block_id != self._next_block:
            raise _sequence_error("parameter sample for block", block_id, self._next_block)
        led = self._ledger
        through = _remote_int("through_seq", msg.through_seq, 0, 1 << 63)
        if not led.last_block_seq < through <= self._last_answered:
            raise SiftingRemoteError(
                Rejection.OUT_OF_ORDER,
                f"parameter sample through announcement {through}, answered ones end at {self._last_answered}",
            )
        key_basis = _remote_int("key_basis", msg.key_basis, 0, N_BASES - 1)
        seed = _remote_int("sample_seed", msg.sample_seed, 0, (1 << 64) - 1)
        threshold = _remote_int("sample_threshold", msg.sample_threshold, 0, _SAMPLE_ONE)
        signal = _remote_int("signal_threshold", msg.signal_threshold, 0, 1 << 32)
        signal_or_decoy = _remote_int("signal_or_decoy_threshold", msg.signal_or_decoy_threshold, signal, 1 << 32)
        count = _remote_int("count", msg.count, 0, 1 << 62)
        disclosed_bytes = _remote_bytes("disclosed", msg.disclosed, (count + 7) // 8)
        batches = [b for b in led.batches if b.seq <= through]
        asm = _Assembly(batches, key_basis, seed, threshold, self._backend)
        n_disclosed = int(asm.disclosed.sum())
        if count != n_disclosed:
            raise _malformed(f"parameter sample discloses {count} bits, the block has {n_disclosed} to disclose")
        alice_bits = _unpack_bits(disclosed_bytes, count)
        wrong = alice_bits != asm.value[asm.disclosed]
        errors = np.bincount(asm.cell[asm.disclosed][wrong], minlength=N_CLASSES * N_BASES)
        led.take(through)
        self._next_block += 1
        counts = asm.counts(block_id, _probabilities(signal, signal_or_decoy), key_basis, threshold, errors)
        led.blocks += 1
        led.disclosed += counts.total_disclosed
        led.key_bits += counts.key_bits
        self._send(ParameterErrors.build(block_id, errors))
        self._blocks.append(SiftedBlock("bob", counts, asm.pulse[asm.key_idx], asm.value[asm.key_idx]))
        self._events.append(BlockSifted(counts))



# -------------------------------------------------------------------- the Pair driver


class SiftingPair:
    """Drives both ends in memory, no sockets (CONVENTIONS 9): one round delivers Bob's
    queued messages to Alice, then Alice's to Bob, until both are quiet or `max_rounds`."""

    def __init__(self, alice: SiftingAlice, bob: SiftingBob, *, max_rounds: int = 1000) -> None:
        self.alice = alice
        self.bob = bob
        self.max_rounds = int(max_rounds)

    def exchange(self, now: float = 0.0) -> int:
        """Deliver messages both ways until none are left; returns the rounds used."""
        rounds = 0
        while True:
            to_alice = self.bob.messages_to_send()
            for msg in to_alice:
                self.alice.receive(msg, now)
            to_bob = self.alice.messages_to_send()
            for msg in to_bob:
                self.bob.receive(msg, now)
            if not to_alice and not to_bob:
                return rounds
            rounds += 1
            if rounds >= self.max_rounds:
                raise SiftingRoundLimitExceeded(f"sifting did not settle within {self.max_rounds} rounds")

    def run(self, windows: list[DetectionWindow], *, now: float = 0.0) -> tuple[SiftedBlock, SiftedBlock]:
        """Sift `windows` as one block: (Alice's block, Bob's block)."""
        for window in windows:
            self.bob.add_detections(window, now)
        self.bob.flush(now)
        self.exchange(now)
        self.alice.close_block(now)
        self.exchange(now)
        a, b = self.alice.next_block(), self.bob.next_block()
        if a is None or b is None:
            raise SiftingLocalError("the block did not complete at both ends")
        return a, b
