"""Cascade information reconciliation (Brassard & Salvail, EUROCRYPT '93), sans-IO.

Theory of operation
-------------------
After sifting, Alice and Bob hold keys of n bits that differ in about Q·n positions.
Cascade removes the differences by public discussion: Bob asks Alice for the parities
of blocks of the key, and wherever his own parity differs the block holds an odd number
of errors, which a binary search (BINARY) finds with about log2(block size) more
parities. Every parity Alice reveals is a bit Eve learns; the reconciliation efficiency
``f = leaked / (n · h(Q))`` compares that with the Shannon limit n·h(Q) (Slepian–Wolf),
with Q the frame's actual error rate — the measure of the efficiency figures of
Martinez-Mateo, Pacher, Peev, Ciurana, Martin, "Demystifying the information
reconciliation protocol Cascade", Quantum Inf. Comput. 15, 453 (2015), arXiv:1407.3257.

Passes. Pass r (0-based; the paper's pass r + 1) shuffles the key with a permutation
both ends derive from a seed that Bob sends (`cascade_permutation`: a numpy Generator
seeded with SeedSequence((seed, r)); both ends must run the same numpy), and cuts the
shuffled key into consecutive blocks of size k_r (the last one shorter). Both ends keep
a shuffled, bit-packed copy of the key per pass, so every block and every half-block of
a binary search is a contiguous range of that copy: its parity is a popcount over whole
words (`Backend.gf2_parities_ranges`, C kernel cext/qnetem_gf2.c), 64 key bits per
operation. A correction flips one bit in the key and in every pass's copy, and toggles
the "odd" flag of the one block of each pass that holds it.

The cascade effect. Correcting an error found in pass r changes the parity of the
blocks that hold it in every other pass: an earlier block that held two errors (even,
so invisible) now holds one, and Bob searches it too, which may in turn uncover more.
Bob repeats, always with the lowest pass that has an odd block (the smallest blocks for
growing block sizes, as Brassard & Salvail prescribe), until no block of any pass begun
so far is odd; then he begins the next pass. All odd blocks of one pass are searched in
parallel, one parity request per level: blocks of one pass are disjoint, so the searches
never disturb each other (this is also how the AIT QKD software of the paper's
co-authors schedules them). A search asks the parity of the left half only; the right
half's follows from the parent's.

Variants (`CascadeVariant`, block sizes from the QBER estimate Q and n, see
`cascade_block_sizes`):

* ORIGINAL — Brassard & Salvail 1993: 4 passes, k_1 = ⌈0.73/Q⌉, k_i = 2·k_(i-1).
* YAN — "Cascade opt. (2)" of Martinez-Mateo et al. 2015 (after Yan et al.):
  10 passes, k_1 = ⌈0.8/Q⌉, k_2 = 5·k_1, k_i = ⌈n/2⌉ for i >= 3.
* OPT7 — "Cascade opt. (7)" of Martinez-Mateo et al. 2015 (§4, power-of-two blocks):
  14 passes, k_1 = 2^⌈log2(1/Q)⌉, k_2 = 4·k_1, k_i = ⌈n/2⌉ for i >= 3.
* OPT8 — "Cascade opt. (8)" of Martinez-Mateo et al. 2015 (§4), the last and most
  refined of their schedules, which the AIT QKD software of the paper's co-authors
  adopted: 14 passes, α = log2(1/Q) − 1/2, k_1 = 2^⌈α⌉, k_2 = 2^⌈(α+12)/2⌉,
  k_3 = 4096, k_i = ⌈n/2⌉ for i >= 4 (every size capped at ⌈n/2⌉, as there).

ORIGINAL and YAN run as published: every binary search starts afresh. OPT7 and OPT8
add two refinements: sub-block reuse (the paper's opt. (4)) — Alice's parity of a range
never changes, so the parities a search learnt are kept, keyed by (pass, start, stop),
and a later search of the same block (after a cascade) asks none of them again — and
block-parity inference (as the AIT software does): once pass 1 has revealed the parity
of Alice's whole key, the parity of the last block of every later pass follows from the
others and is not asked.

Messages (frozen dataclasses of ints and bytes, so a codec can carry them over the
node's authenticated classical link): Bob -> Alice `CascadeStart`, `ParityRequest`,
`CascadeDone`; Alice -> Bob `ParityReply`. Ranges travel as little-endian uint32,
parities as packed bits (bit j of the reply is bit j % 8 of byte j // 8).

State tables (input -> output, next state):

    ALICE  WAITING  CascadeStart, n_bits matches   -> -                      SERVING
    ALICE  SERVING  ParityRequest, next seq        -> ParityReply            SERVING
    ALICE  SERVING  CascadeDone, seq = requests    -> CascadeFinished        DONE
    ALICE  any      anything else                  -> RemoteProtocolError (counted, state kept)

    BOB    IDLE     start()                        -> CascadeStart, ParityRequest  RUNNING
    BOB    RUNNING  ParityReply to the open request -> ParityRequest (more work)    RUNNING
    BOB    RUNNING  ParityReply to the open request -> CascadeDone, CascadeFinished DONE
    BOB    any      anything else                  -> RemoteProtocolError (counted, state kept)

Bob never learns whether errors remain (an even number in every block of every pass
escapes Cascade): verification by a universal hash is the next stage's job. Key bits
never appear in messages, events, statistics, reprs or exceptions; parities do appear
in messages — they are public by construction and counted as leaked.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections import deque
from typing import Union

import numpy as np

from emulator.kernels import Backend, get_backend
from emulator.wire import ErrorCode, LocalProtocolError, RemoteProtocolError

__all__ = [
    "MAX_PASSES",
    "AliceState",
    "BobState",
    "CascadeAlice",
    "CascadeBob",
    "CascadeDone",
    "CascadeEvent",
    "CascadeFinished",
    "CascadeLocalError",
    "CascadeMessage",
    "CascadeOutcome",
    "CascadePair",
    "CascadeRemoteError",
    "CascadeStart",
    "CascadeStatistics",
    "CascadeVariant",
    "ParityReply",
    "ParityRequest",
    "PassStarted",
    "RoundLimitExceeded",
    "binary_entropy",
    "cascade_block_sizes",
    "cascade_permutation",
    "reconciliation_efficiency",
]

#: Most passes a session may use (bounds Alice's memory: one shuffled copy per pass).
MAX_PASSES = 64
#: Largest key (permutations are stored as int32; ranges travel as uint32).
MAX_BITS = (1 << 31) - 1
#: QBER estimates below this are raised to it before choosing block sizes.
QBER_FLOOR = 1e-6

_frozen = dataclasses.dataclass(frozen=True, slots=True)
_U32 = np.dtype("<u4")


class CascadeLocalError(LocalProtocolError):
    """Our caller misused the Cascade API (bad key, bad QBER estimate, wrong state)."""

    def __init__(self, message: str) -> None:
        super().__init__(ErrorCode.BAD_FIELD, message)


class CascadeRemoteError(RemoteProtocolError):
    """The peer sent a Cascade message that breaks the protocol; the session survives."""

    def __init__(self, message: str) -> None:
        super().__init__(ErrorCode.BAD_FIELD, message)


# --------------------------------------------------------------------------- formulas


def binary_entropy(p: float) -> float:
    """h(p) = -p log2 p - (1-p) log2(1-p), with h(0) = h(1) = 0."""
    p = float(p)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be in [0, 1], got {p}")
    if p in (0.0, 1.0):
        return 0.0
    return -p * math.log2(p) - (1.0 - p) * math.log2(1.0 - p)


def reconciliation_efficiency(leaked_bits: int, n_bits: int, qber: float) -> float:
    """f = leaked / (n · h(Q)) (Martinez-Mateo et al. 2015), Q the frame's actual error
    rate; f = 1 is the Shannon limit. NaN when Q = 0 (nothing to reconcile)."""
    if n_bits <= 0:
        raise ValueError(f"n_bits must be positive, got {n_bits}")
    h = binary_entropy(qber)
    return float(leaked_bits) / (n_bits * h) if h > 0.0 else float("nan")


class CascadeVariant(enum.Enum):
    """Block-size schedules (see the module docstring for their sources)."""

    ORIGINAL = "original"
    YAN = "yan"
    OPT7 = "opt7"
    OPT8 = "opt8"


@_frozen
class _Features:
    reuse: bool  # remember Alice's sub-block parities across binary searches
    inference: bool  # infer the last block's parity of passes >= 2 from the whole key's


# ORIGINAL and YAN as their authors published them; OPT7 and OPT8 with sub-block reuse
# (the paper's opt. (4)) and block-parity inference (module docstring).
_FEATURES = {
    CascadeVariant.ORIGINAL: _Features(reuse=False, inference=False),
    CascadeVariant.YAN: _Features(reuse=False, inference=False),
    CascadeVariant.OPT7: _Features(reuse=True, inference=True),
    CascadeVariant.OPT8: _Features(reuse=True, inference=True),
}


def _ceil(x: float) -> int:
    # Guard against 0.73/0.01 = 72.99999999999999 style round-off pushing ceil one up.
    return math.ceil(x - 1e-9)


def cascade_block_sizes(variant: CascadeVariant | str, qber: float, n_bits: int) -> tuple[int, ...]:
    """Block size of every pass for a QBER estimate and key length (module docstring)."""
    variant = CascadeVariant(variant)
    n = int(n_bits)
    if not 1 <= n <= MAX_BITS:
        raise CascadeLocalError(f"n_bits must be in [1, {MAX_BITS}], got {n}")
    q = float(qber)
    if not 0.0 <= q < 0.5:
        raise CascadeLocalError(f"qber estimate must be in [0, 0.5), got {q}")
    q = max(q, QBER_FLOOR)
    half = (n + 1) // 2
    if variant is CascadeVariant.ORIGINAL:
        # Brassard & Salvail 1993, section 4: k1 ~ 0.73/p, k_i = 2 k_(i-1), four passes.
        k1 = _ceil(0.73 / q)
        sizes = [k1 << i for i in range(4)]
    elif variant is CascadeVariant.YAN:
        # Martinez-Mateo et al. 2015, Cascade opt. (2): k1 = 0.8/p, k2 = 5 k1, then n/2.
        k1 = _ceil(0.8 / q)
        sizes = [k1, 5 * k1] + [half] * 8
    elif variant is CascadeVariant.OPT7:
        # Martinez-Mateo et al. 2015, Cascade opt. (7): k1 = 2^ceil(log2 1/p), k2 = 4 k1.
        k1 = 1 << _ceil(math.log2(1.0 / q))
        sizes = [k1, 4 * k1] + [half] * 12
    else:
        # Martinez-Mateo et al. 2015, Cascade opt. (8): alpha = log2(1/p) - 1/2.
        alpha = math.log2(1.0 / q) - 0.5
        sizes = [1 << max(0, _ceil(alpha)), 1 << _ceil((alpha + 12.0) / 2.0), 4096] + [half] * 11
        sizes = [min(k, half) for k in sizes]
    return tuple(max(1, min(int(k), n)) for k in sizes)


def cascade_permutation(shuffle_seed: int, pass_index: int, n_bits: int) -> np.ndarray:
    """The shuffle of pass `pass_index` (0-based): int64 array, position j of the
    shuffled key holds key bit perm[j]. Both ends derive it from Bob's seed."""
    gen = np.random.Generator(np.random.PCG64(np.random.SeedSequence((int(shuffle_seed), int(pass_index)))))
    return gen.permutation(int(n_bits)).astype(np.int64, copy=False)


# --------------------------------------------------------------------------- messages


def _u32_bytes(values: np.ndarray) -> bytes:
    return np.ascontiguousarray(values, dtype=_U32).tobytes()


def _u32_array(data: bytes, name: str) -> np.ndarray:
    if not isinstance(data, (bytes, bytearray)) or len(data) % 4:
        raise CascadeRemoteError(f"{name} must be bytes holding little-endian uint32 values")
    return np.frombuffer(data, dtype=_U32).astype(np.int64)


@_frozen
class CascadeStart:
    """Bob -> Alice: a reconciliation of `n_bits` bits, shuffles derived from the seed."""

    session_id: int
    shuffle_seed: int
    n_bits: int


@_frozen
class ParityRequest:
    """Bob -> Alice: the parities of ranges [starts[b], stops[b]) of pass `pass_index`'s
    shuffled key. `starts`/`stops` are little-endian uint32 (see `build`/`ranges`)."""

    session_id: int
    seq: int
    pass_index: int
    starts: bytes
    stops: bytes

    @classmethod
    def build(cls, session_id: int, seq: int, pass_index: int, starts: np.ndarray, stops: np.ndarray) -> ParityRequest:
        return cls(session_id, seq, pass_index, _u32_bytes(starts), _u32_bytes(stops))

    @property
    def count(self) -> int:
        return len(self.starts) // 4

    def ranges(self) -> tuple[np.ndarray, np.ndarray]:
        """(starts, stops) as int64 arrays; RemoteProtocolError if malformed."""
        starts = _u32_array(self.starts, "starts")
        stops = _u32_array(self.stops, "stops")
        if starts.shape != stops.shape:
            raise CascadeRemoteError("parity request has different numbers of starts and stops")
        return starts, stops


@_frozen
class ParityReply:
    """Alice -> Bob: `count` parities, packed LSB-first (bit j = byte j // 8, bit j % 8)."""

    session_id: int
    seq: int
    count: int
    parities: bytes

    @classmethod
    def build(cls, session_id: int, seq: int, parities: np.ndarray) -> ParityReply:
        packed = np.packbits(np.asarray(parities, dtype=np.uint8), bitorder="little")
        return cls(session_id, seq, int(parities.shape[0]), packed.tobytes())

    def values(self) -> np.ndarray:
        """The parities as a uint8 array of 0/1; RemoteProtocolError if malformed."""
        if not isinstance(self.parities, (bytes, bytearray)) or len(self.parities) != (self.count + 7) // 8:
            raise CascadeRemoteError(f"parity reply must hold {self.count} packed bits")
        return np.unpackbits(np.frombuffer(self.parities, dtype=np.uint8), count=self.count, bitorder="little")


@_frozen
class CascadeDone:
    """Bob -> Alice: reconciliation over after `seq` parity requests."""

    session_id: int
    seq: int


CascadeMessage = Union[CascadeStart, ParityRequest, ParityReply, CascadeDone]


# ----------------------------------------------------------------- events & statistics


@_frozen
class CascadeStatistics:
    """Counts of one end's session (no key material). Leaked bits are the parities
    Alice disclosed (both ends count them); requests are request/reply round trips."""

    role: str
    variant: str
    n_bits: int
    passes: int
    parity_bits_disclosed: int
    requests: int
    messages_sent: int
    messages_received: int
    rejected_messages: int
    bits_corrected: int
    corrections_per_pass: tuple[int, ...]
    backtrack_corrections: int
    duration_s: float

    @property
    def leaked_bits(self) -> int:
        return self.parity_bits_disclosed

    def efficiency(self, qber: float | None = None) -> float:
        """f = leaked / (n h(Q)); Q defaults to bits_corrected / n_bits, which is the
        frame's actual error rate whenever no error escaped (Bob's best knowledge)."""
        q = self.bits_corrected / self.n_bits if qber is None else qber
        return reconciliation_efficiency(self.parity_bits_disclosed, self.n_bits, q)


@_frozen
class PassStarted:
    """Bob began pass `pass_index` (0-based) with blocks of `block_size` bits."""

    pass_index: int
    block_size: int
    n_blocks: int


@_frozen
class CascadeFinished:
    """The session ended; `statistics` is this end's final record."""

    statistics: CascadeStatistics


CascadeEvent = Union[PassStarted, CascadeFinished]


def _check_key(key: object) -> np.ndarray:
    if not isinstance(key, np.ndarray) or key.ndim != 1 or key.dtype not in (np.uint8, np.bool_):
        raise CascadeLocalError("key must be a 1-D numpy array of bits (uint8 0/1 or bool)")
    if not 1 <= key.shape[0] <= MAX_BITS:
        raise CascadeLocalError(f"key length must be in [1, {MAX_BITS}], got {key.shape[0]}")
    return np.ascontiguousarray(key).view(np.uint8)


class _Counters:
    def __init__(self) -> None:
        self.disclosed = 0
        self.requests = 0
        self.sent = 0
        self.received = 0
        self.rejected = 0


# ------------------------------------------------------------------------------ Alice


class AliceState(enum.Enum):
    WAITING = "waiting"
    SERVING = "serving"
    DONE = "done"


class CascadeAlice:
    """Holds the reference key and answers parity requests (see the state table).

    Alice discloses at most `max_disclosed_bits` parities: a peer asking for more than n
    leaves no secret key and is not running Cascade sensibly. The default, 2n + 64,
    leaves slack for tiny keys, where the block parities of the passes alone exceed n.
    """

    def __init__(
        self, key: np.ndarray, *, backend: Backend | None = None, max_disclosed_bits: int | None = None
    ) -> None:
        bits = _check_key(key)
        self._backend = backend if backend is not None else get_backend()
        self._n = int(bits.shape[0])
        self._words = self._backend.gf2_pack(bits)
        self._budget = 2 * self._n + MAX_PASSES if max_disclosed_bits is None else int(max_disclosed_bits)
        self._state = AliceState.WAITING
        self._session = 0
        self._seed = 0
        self._next_seq = 0
        self._shuffled: dict[int, np.ndarray] = {}
        self._outbox: list[CascadeMessage] = []
        self._events: deque[CascadeEvent] = deque()
        self._count = _Counters()
        self._started_at: float | None = None
        self._finished_at: float | None = None

    def __repr__(self) -> str:
        return f"<CascadeAlice n_bits={self._n} state={self._state.value}>"

    @property
    def n_bits(self) -> int:
        return self._n

    @property
    def state(self) -> AliceState:
        return self._state

    def receive(self, msg: CascadeMessage, now: float = 0.0) -> None:
        """Handle one message from Bob. A message that breaks the protocol raises
        RemoteProtocolError, is counted, and leaves the session as it was."""
        self._count.received += 1
        try:
            self._handle(msg, now)
        except RemoteProtocolError:
            self._count.rejected += 1
            raise

    def _handle(self, msg: CascadeMessage, now: float) -> None:
        if isinstance(msg, CascadeStart):
            if self._state is not AliceState.WAITING:
                raise CascadeRemoteError("cascade_start for a session already under way")
            if msg.n_bits != self._n:
                raise CascadeRemoteError(f"cascade_start for {msg.n_bits} bits, but this key has {self._n}")
            self._session, self._seed = int(msg.session_id), int(msg.shuffle_seed)
            self._state = AliceState.SERVING
            self._started_at = now
            return
        if self._state is not AliceState.SERVING:
            raise CascadeRemoteError(f"{type(msg).__name__} while alice is {self._state.value}")
        if getattr(msg, "session_id", None) != self._session:
            raise CascadeRemoteError("message for another cascade session")
        if isinstance(msg, ParityRequest):
            self._answer(msg)
        elif isinstance(msg, CascadeDone):
            if msg.seq != self._next_seq:
                raise CascadeRemoteError(f"cascade_done after {msg.seq} requests, alice served {self._next_seq}")
            self._state = AliceState.DONE
            self._finished_at = now
            self._events.append(CascadeFinished(self.statistics()))
        else:
            raise CascadeRemoteError(f"unexpected message {type(msg).__name__} for alice")

    def _answer(self, msg: ParityRequest) -> None:
        if msg.seq != self._next_seq:
            raise CascadeRemoteError(f"parity request seq {msg.seq}, expected {self._next_seq} (replayed or lost)")
        if not 0 <= msg.pass_index < MAX_PASSES:
            raise CascadeRemoteError(f"pass_index {msg.pass_index} outside [0, {MAX_PASSES})")
        starts, stops = msg.ranges()
        count = starts.shape[0]
        if count == 0 or (starts >= stops).any() or stops.max() > self._n:
            raise CascadeRemoteError(f"parity request ranges must be non-empty and within [0, {self._n}]")
        if self._count.disclosed + count > self._budget:
            raise CascadeRemoteError(f"parity request would disclose more than {self._budget} bits")
        words = self._shuffled.get(msg.pass_index)
        if words is None:
            perm = cascade_permutation(self._seed, msg.pass_index, self._n)
            words = self._shuffled[msg.pass_index] = self._backend.gf2_gather(self._words, self._n, perm)
        parities = self._backend.gf2_parities_ranges(words, self._n, starts, stops)
        self._next_seq += 1
        self._count.disclosed += count
        self._count.requests += 1
        self._count.sent += 1
        self._outbox.append(ParityReply.build(self._session, msg.seq, parities))

    def messages_to_send(self) -> list[CascadeMessage]:
        out, self._outbox = self._outbox, []
        return out

    def next_event(self) -> CascadeEvent | None:
        return self._events.popleft() if self._events else None

    def statistics(self) -> CascadeStatistics:
        c = self._count
        duration = 0.0
        if self._finished_at is not None and self._started_at is not None:
            duration = self._finished_at - self._started_at
        return CascadeStatistics(
            role="alice", variant="", n_bits=self._n, passes=len(self._shuffled),
            parity_bits_disclosed=c.disclosed, requests=c.requests, messages_sent=c.sent,
            messages_received=c.received, rejected_messages=c.rejected, bits_corrected=0,
            corrections_per_pass=(), backtrack_corrections=0, duration_s=duration,
        )  # fmt: skip


# -------------------------------------------------------------------------------- Bob


class BobState(enum.Enum):
    IDLE = "idle"
    RUNNING = "running"
    DONE = "done"


class _Pass:
    """Bob's view of one pass: shuffle, shuffled key copy, Alice's block parities."""

    __slots__ = ("alice", "block_size", "index", "inv", "n_blocks", "odd", "perm", "starts", "stops", "words")

    def __init__(self, index: int, block_size: int, perm: np.ndarray, words: np.ndarray, n: int) -> None:
        self.index = index
        self.block_size = block_size
        self.perm = perm.astype(np.int32)
        self.inv = np.empty(n, dtype=np.int32)
        self.inv[perm] = np.arange(n, dtype=np.int32)
        self.words = words
        self.starts = np.arange(0, n, block_size, dtype=np.int64)
        self.stops = np.minimum(self.starts + block_size, n)
        self.n_blocks = int(self.starts.shape[0])
        self.alice = np.zeros(self.n_blocks, dtype=np.uint8)
        self.odd = np.zeros(self.n_blocks, dtype=np.uint8)


class _Search:
    """Parallel binary searches in the odd blocks of one pass: current ranges [lo, hi)
    and Alice's parity of each current range."""

    __slots__ = ("apar", "hi", "lo", "pass_index")

    def __init__(self, pass_index: int, lo: np.ndarray, hi: np.ndarray, apar: np.ndarray) -> None:
        self.pass_index = pass_index
        self.lo, self.hi, self.apar = lo, hi, apar


class CascadeBob:
    """Drives the reconciliation: passes, binary searches and the cascade effect.

    `qber_estimate` (from parameter estimation) sets the block sizes; `rng` draws the
    shuffle seed sent to Alice. The corrected key is available once the session is DONE.
    """

    def __init__(
        self,
        key: np.ndarray,
        qber_estimate: float,
        rng: np.random.Generator,
        *,
        variant: CascadeVariant | str = CascadeVariant.ORIGINAL,
        backend: Backend | None = None,
        session_id: int = 0,
    ) -> None:
        bits = _check_key(key)
        if not isinstance(rng, np.random.Generator):
            raise CascadeLocalError("rng must be a numpy.random.Generator")
        self._backend = backend if backend is not None else get_backend()
        self._n = int(bits.shape[0])
        self._variant = CascadeVariant(variant)
        self._block_sizes = cascade_block_sizes(self._variant, qber_estimate, self._n)
        features = _FEATURES[self._variant]
        self._inference = features.inference
        self._seed = int(rng.integers(0, 2**63))
        self._session = int(session_id)
        self._words = self._backend.gf2_pack(bits)
        self._passes: list[_Pass] = []
        self._alice_total: int | None = None  # parity of Alice's whole key, after pass 0
        # Alice's parities of sub-blocks, by (pass, start, stop), when the variant reuses them.
        self._cache: dict[tuple[int, int, int], int] | None = {} if features.reuse else None
        self._search: _Search | None = None
        self._open: tuple[str, int, np.ndarray, int] | None = None  # (kind, pass, search idx, count)
        self._next_seq = 0
        self._state = BobState.IDLE
        self._outbox: list[CascadeMessage] = []
        self._events: deque[CascadeEvent] = deque()
        self._count = _Counters()
        self._corrected = 0
        self._per_pass = [0] * len(self._block_sizes)
        self._backtrack = 0
        self._started_at = 0.0
        self._finished_at: float | None = None

    def __repr__(self) -> str:
        return f"<CascadeBob n_bits={self._n} variant={self._variant.value} state={self._state.value}>"

    @property
    def n_bits(self) -> int:
        return self._n

    @property
    def state(self) -> BobState:
        return self._state

    @property
    def block_sizes(self) -> tuple[int, ...]:
        return self._block_sizes

    @property
    def shuffle_seed(self) -> int:
        return self._seed

    def start(self, now: float = 0.0) -> None:
        """Send CascadeStart and the first parity request."""
        if self._state is not BobState.IDLE:
            raise CascadeLocalError(f"start() while bob is {self._state.value}")
        self._state = BobState.RUNNING
        self._started_at = now
        self._send(CascadeStart(self._session, self._seed, self._n))
        self._next_step(now)

    def receive(self, msg: CascadeMessage, now: float = 0.0) -> None:
        """Handle Alice's reply. Anything but the reply to the open request raises
        RemoteProtocolError, is counted, and leaves the session as it was."""
        self._count.received += 1
        try:
            values = self._check_reply(msg)
        except RemoteProtocolError:
            self._count.rejected += 1
            raise
        assert self._open is not None
        kind, pass_index, search_idx, _ = self._open
        self._open = None
        if kind == "top":
            self._took_block_parities(self._passes[pass_index], values)
        else:
            self._took_search_parities(search_idx, values)
        self._next_step(now)

    def _check_reply(self, msg: CascadeMessage) -> np.ndarray:
        if not isinstance(msg, ParityReply):
            raise CascadeRemoteError(f"unexpected message {type(msg).__name__} for bob")
        if self._open is None:
            raise CascadeRemoteError("parity reply while no request is open")
        if msg.session_id != self._session:
            raise CascadeRemoteError("parity reply for another cascade session")
        _, _, _, count = self._open
        if msg.seq != self._next_seq - 1:
            raise CascadeRemoteError(f"parity reply seq {msg.seq}, expected {self._next_seq - 1}")
        if msg.count != count:
            raise CascadeRemoteError(f"parity reply holds {msg.count} parities, {count} were asked")
        return msg.values()

    def messages_to_send(self) -> list[CascadeMessage]:
        out, self._outbox = self._outbox, []
        return out

    def next_event(self) -> CascadeEvent | None:
        return self._events.popleft() if self._events else None

    def corrected_key(self) -> np.ndarray:
        """Bob's key after reconciliation (uint8 0/1). Only once the session is DONE."""
        return self._backend.gf2_unpack(self.corrected_words(), self._n)

    def corrected_words(self) -> np.ndarray:
        """The corrected key, bit-packed (a copy). Only once the session is DONE."""
        if self._state is not BobState.DONE:
            raise CascadeLocalError(f"the corrected key is ready when bob is done, bob is {self._state.value}")
        return self._words.copy()

    def statistics(self) -> CascadeStatistics:
        c = self._count
        end = self._finished_at if self._finished_at is not None else self._started_at
        return CascadeStatistics(
            role="bob", variant=self._variant.value, n_bits=self._n, passes=len(self._passes),
            parity_bits_disclosed=c.disclosed, requests=c.requests, messages_sent=c.sent,
            messages_received=c.received, rejected_messages=c.rejected, bits_corrected=self._corrected,
            corrections_per_pass=tuple(self._per_pass), backtrack_corrections=self._backtrack,
            duration_s=end - self._started_at,
        )  # fmt: skip

    # --- protocol steps -----------------------------------------------------------
    def _send(self, msg: CascadeMessage) -> None:
        self._outbox.append(msg)
        self._count.sent += 1

    def _request(
        self, kind: str, pass_index: int, starts: np.ndarray, stops: np.ndarray, search_idx: np.ndarray
    ) -> None:
        seq = self._next_seq
        self._next_seq += 1
        self._open = (kind, pass_index, search_idx, int(starts.shape[0]))
        self._count.requests += 1
        self._count.disclosed += int(starts.shape[0])
        self._send(ParityRequest.build(self._session, seq, pass_index, starts, stops))

    def _next_step(self, now: float) -> None:
        """Do all local work, then ask Alice (one request) or finish."""
        while True:
            if self._search is not None:
                if self._advance_search():
                    return
                continue
            odd_pass = next((p for p in self._passes if p.odd.any()), None)
            if odd_pass is not None:
                blocks = np.flatnonzero(odd_pass.odd)
                self._search = _Search(
                    odd_pass.index, odd_pass.starts[blocks].copy(), odd_pass.stops[blocks].copy(),
                    odd_pass.alice[blocks].astype(np.uint8),
                )  # fmt: skip
                continue
            if len(self._passes) < len(self._block_sizes):
                if self._begin_pass():
                    return
                continue
            self._finish(now)
            return

    def _begin_pass(self) -> bool:
        """Shuffle for the next pass and ask the parities of its blocks. False when every
        parity could be inferred and no request was needed."""
        r = len(self._passes)
        perm = cascade_permutation(self._seed, r, self._n)
        p = _Pass(r, self._block_sizes[r], perm, self._backend.gf2_gather(self._words, self._n, perm), self._n)
        self._passes.append(p)
        self._events.append(PassStarted(r, p.block_size, p.n_blocks))
        asked = p.n_blocks
        if self._inference and self._alice_total is not None:
            asked -= 1  # the last block's parity follows from the whole key's
        if asked == 0:
            self._took_block_parities(p, np.empty(0, dtype=np.uint8))
            return False
        self._request("top", r, p.starts[:asked], p.stops[:asked], np.empty(0, dtype=np.int64))
        return True

    def _took_block_parities(self, p: _Pass, values: np.ndarray) -> None:
        asked = values.shape[0]
        p.alice[:asked] = values
        if asked < p.n_blocks:
            assert self._alice_total is not None
            p.alice[asked] = self._alice_total ^ (int(np.bitwise_xor.reduce(values)) if asked else 0)
        if self._alice_total is None:
            self._alice_total = int(np.bitwise_xor.reduce(p.alice))
        mine = self._backend.gf2_parities_ranges(p.words, self._n, p.starts, p.stops)
        p.odd[:] = mine ^ p.alice

    def _advance_search(self) -> bool:
        """Move the searches on as far as cached parities allow; correct the bits they
        pin down. True if a request for the next level went out."""
        s = self._search
        assert s is not None
        cache = self._cache
        while True:
            found = (s.hi - s.lo) == 1
            if found.any():
                self._correct(s.pass_index, s.lo[found])
                keep = ~found
                s.lo, s.hi, s.apar = s.lo[keep], s.hi[keep], s.apar[keep]
            if s.lo.shape[0] == 0:
                self._search = None
                return False
            mid = s.lo + (s.hi - s.lo) // 2
            r = s.pass_index
            if cache is None:
                have = np.zeros(s.lo.shape[0], dtype=bool)
            else:
                known = np.array([cache.get((r, a, b), -1) for a, b in zip(s.lo.tolist(), mid.tolist())], dtype=np.int8)
                have = known >= 0
            if not have.any():
                self._request("search", r, s.lo, mid, np.arange(s.lo.shape[0]))
                return True
            idx = np.flatnonzero(have)
            self._narrow(idx, mid[idx], known[idx].astype(np.uint8))

    def _took_search_parities(self, search_idx: np.ndarray, values: np.ndarray) -> None:
        s = self._search
        assert s is not None
        mid = s.lo[search_idx] + (s.hi[search_idx] - s.lo[search_idx]) // 2
        self._narrow(search_idx, mid, values)

    def _narrow(self, idx: np.ndarray, mid: np.ndarray, left_alice: np.ndarray) -> None:
        """Alice's parity of [lo, mid) is known for searches idx: keep the half whose
        parities differ (the left one if Bob's differs, else the right one)."""
        s = self._search
        assert s is not None
        p = self._passes[s.pass_index]
        lo, hi, apar = s.lo[idx], s.hi[idx], s.apar[idx]
        right_alice = apar ^ left_alice  # inferred, never asked
        if self._cache is not None:
            rows = zip(lo.tolist(), mid.tolist(), hi.tolist(), left_alice.tolist(), right_alice.tolist())
            for a, m, b, pl, pr in rows:
                self._cache[(s.pass_index, a, m)] = pl
                self._cache[(s.pass_index, m, b)] = pr
        left_bob = self._backend.gf2_parities_ranges(p.words, self._n, lo, mid)
        go_left = left_bob != left_alice
        s.lo[idx] = np.where(go_left, lo, mid)
        s.hi[idx] = np.where(go_left, mid, hi)
        s.apar[idx] = np.where(go_left, left_alice, right_alice)

    def _correct(self, pass_index: int, shuffled_positions: np.ndarray) -> None:
        """Flip the erroneous bits (given as positions in pass pass_index's shuffle) in
        the key and in every pass's copy, and toggle the blocks that hold them."""
        natural = self._passes[pass_index].perm[shuffled_positions].astype(np.int64)
        self._backend.gf2_flip_bits(self._words, self._n, natural)
        for p in self._passes:
            pos = p.inv[natural].astype(np.int64)
            self._backend.gf2_flip_bits(p.words, self._n, pos)
            np.bitwise_xor.at(p.odd, pos // p.block_size, 1)
        count = int(natural.shape[0])
        self._corrected += count
        self._per_pass[pass_index] += count
        if pass_index < len(self._passes) - 1:
            self._backtrack += count

    def _finish(self, now: float) -> None:
        self._state = BobState.DONE
        self._finished_at = now
        self._send(CascadeDone(self._session, self._next_seq))
        self._events.append(CascadeFinished(self.statistics()))


# -------------------------------------------------------------------- the Pair driver


class RoundLimitExceeded(CascadeLocalError):
    """CascadePair stopped: the round cap was reached before Bob finished."""


@_frozen
class CascadeOutcome:
    """What CascadePair.run observed. `remaining_errors` compares both keys directly —
    something only a test driver can do; the protocol itself never learns it."""

    alice: CascadeStatistics
    bob: CascadeStatistics
    rounds: int
    remaining_errors: int
    events: tuple[CascadeEvent, ...]

    @property
    def keys_equal(self) -> bool:
        return self.remaining_errors == 0


class CascadePair:
    """Runs both ends to completion in memory, no sockets (CONVENTIONS 9).

    One round = Bob's queued messages delivered to Alice, then Alice's to Bob. `rtt_s`
    advances the `now` handed to both ends by one round trip per round, so
    `statistics().duration_s` is the reconciliation time a link with that RTT would see.
    """

    def __init__(self, alice: CascadeAlice, bob: CascadeBob, *, max_rounds: int = 10_000) -> None:
        self.alice = alice
        self.bob = bob
        self.max_rounds = int(max_rounds)

    def run(self, *, now: float = 0.0, rtt_s: float = 0.0) -> CascadeOutcome:
        self.bob.start(now)
        events: list[CascadeEvent] = []
        rounds = 0
        while True:
            to_alice = self.bob.messages_to_send()
            if not to_alice and self.bob.state is BobState.DONE:
                break
            if rounds >= self.max_rounds:
                raise RoundLimitExceeded(f"cascade did not finish within {self.max_rounds} rounds")
            rounds += 1
            for msg in to_alice:
                self.alice.receive(msg, now + rtt_s / 2)
            now += rtt_s
            for msg in self.alice.messages_to_send():
                self.bob.receive(msg, now)
        for end in (self.bob, self.alice):
            while (event := end.next_event()) is not None:
                events.append(event)
        remaining = self.bob._backend.gf2_hamming(self.alice._words, self.bob.corrected_words(), self.bob.n_bits)
        return CascadeOutcome(self.alice.statistics(), self.bob.statistics(), rounds, remaining, tuple(events))
