"""epr-test: measure heralded pairs on both ends; report fidelity, CHSH and pair rate.

Theory of operation
-------------------
Two instances run, an *initiator* (Alice) and a *responder* (Bob), on neighbours
joined by an entanglement-capable link.

1. Bob sends the broker `epr_listen(peer=Alice, accept=True)`.
2. Alice sends Bob `{"op": "start", "pairs": N}` over the classical link, again every
   `retry_s` until Bob answers `{"op": "ready"}` (at most `max_start_attempts` times;
   Bob answers each start once his listen is acknowledged).
3. Alice sends `epr_request(peer=Bob, pairs=N)`; its `epr_accepted.now_s` is the
   request acceptance time t_acc.
4. Both receive batched `epr_delivered`. Each end draws a measurement setting per pair
   from its own seeded RNG and, `wait_s` emulated seconds after the herald, measures
   (all due pairs together: one `circuit` for corrections/rotations, one `measure` with
   per-qubit bases and `free=True`; one batch in flight at a time, a second only under
   memory pressure, so batches grow with load instead of the request count).
   Bob first applies the Pauli-frame correction that maps the heralded Bell state to
   Phi+ (Psi+: X; Phi-: Z; Psi-: X then Z), see `PAULI_FRAME`.
5. Bob sends `{"op": "results", "seq", "pair_ids", "settings", "outcomes"}` batches
   (packed little-endian numpy arrays as bytes), one per measured batch; Alice answers
   `{"op": "ack", "seq"}` and Bob retransmits unacknowledged batches every `retry_s`.
6. Alice matches results by pair id. Done when `epr_done` has arrived and every
   delivered pair is measured on both ends (Bob: and all results are acknowledged;
   he then withdraws his listen). An `epr_done` other than `complete` (peer gone,
   cancelled), a broker error or a peer that never gets ready fails the run: the
   results keep what was measured, and qubits still held are freed.

Settings and why these probabilities
------------------------------------
Alice measures Z, X or Y; Bob Z, X, Y, W = (Z+X)/sqrt2 or V = (Z-X)/sqrt2.
For Phi+, F = (1 + <XX> - <YY> + <ZZ>)/4 (emulator.physics.fidelity_from_correlations)
and CHSH S = E(Z,W) + E(Z,V) + E(X,W) - E(X,V), which reaches 2 sqrt2 V for a Werner
state of visibility V. A correlator estimated from n pairs has variance (1 - E^2)/n.
The fidelity correlators have |E| ~ V close to 1 and need few pairs; the four CHSH
correlators have E^2 ~ V^2/2 ~ 1/2 and dominate the sample size. Hence

    Alice: Z 0.4, X 0.4, Y 0.2        Bob: Z 0.1, X 0.1, Y 0.2, W 0.3, V 0.3

which gives each CHSH cell 0.12 N pairs and each fidelity cell (ZZ, XX, YY) the same
0.04 N. A numerical search over these probabilities for the fewest pairs reaching
sigma(F) <= 0.005 and sigma(S) <= 0.0125 at V = 0.9 (with and without memory
dephasing) lands within 10 % of this rounder choice. At V = 0.9:
sigma(S) ~ 4.5/sqrt(N), sigma(F) ~ 0.94/sqrt(N).

W and V are measured as an `ry` rotation followed by a Z measurement. Measuring Z after
U measures U^dag Z U; with Ry(phi) = exp(-i phi Y/2) (Nielsen & Chuang eq. 4.5),
Ry(phi)^dag Z Ry(phi) = cos(phi) Z - sin(phi) X, so W needs phi = -pi/4 and V
phi = +pi/4 (checked on exact states in tests/unit/test_epr_test_app.py).
Outcome 0 is the +1 eigenvalue in every basis (emulator.kernels.Basis).

Parameters (`app_start` params) and results
-------------------------------------------
`role` ("initiator" | "responder"), `peer` (a neighbour with entanglement), `pairs`
(1..10^7), `wait_s` (emulated seconds, default 0), `seed` (optional; default: the
node's seed), and rarely needed: `peer_app` (the other instance's name, default this
one's), `max_batch` (pairs per measure request, default 4096), `retry_s` (default half
a wall second, in emulated seconds), `max_start_attempts` (default 40).

Results: `pairs_measured` (initiator: pairs measured on both ends; responder: its own),
`fidelity`, `fidelity_stderr`, `chsh`, `chsh_stderr` (initiator only; None until every
correlator has data), `pair_rate_hz` = delivered pairs / (last herald - t_acc) in
emulated time (initiator only), `wall_s` (start to finish in wall seconds, i.e.
emulated duration x time_scale). A failed run adds `error`.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import zlib
from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np

from emulator.physics import fidelity_from_correlations
from emulator.wire import (
    Circuit,
    EprAccepted,
    EprDelivered,
    EprDone,
    EprListen,
    EprRequest,
    Error,
    Free,
    GateOp,
    Measure,
    Measured,
    Message,
)

from ._params import int_param, neighbour_param, number_param, peer_app_param, reject_unknown, role_param
from .base import App, AppContext, AppParamError

__all__ = [
    "EprTestApp",
    "EprTestParams",
    "INITIATOR_PROBS",
    "PAULI_FRAME",
    "RESPONDER_PROBS",
    "RESULT_KEYS",
    "ROTATION_RAD",
    "Role",
    "Setting",
    "correlator_table",
    "estimate",
]


class Role(enum.Enum):
    INITIATOR = "initiator"
    RESPONDER = "responder"


class Setting(enum.IntEnum):
    """Measurement settings; the codes travel in the results batches."""

    Z = 0
    X = 1
    Y = 2
    W = 3  # (Z + X)/sqrt2
    V = 4  # (Z - X)/sqrt2


N_SETTINGS = 5
# Probabilities per setting code (module docstring explains the choice).
INITIATOR_PROBS = np.array([0.4, 0.4, 0.2, 0.0, 0.0])
RESPONDER_PROBS = np.array([0.1, 0.1, 0.2, 0.3, 0.3])

# Basis code of `measure` per setting (0=Z, 1=X, 2=Y; emulator.kernels.Basis); W and V
# are rotated onto Z first.
_MEASURE_BASIS = np.array([0, 1, 2, 0, 0], dtype=np.uint8)
#: ry angle applied before the Z measurement (module docstring: U^dag Z U = cos Z - sin X).
ROTATION_RAD: dict[Setting, float] = {Setting.W: -math.pi / 4, Setting.V: math.pi / 4}

#: Pauli-frame correction on the responder's qubit, gates in order, per BellState code,
#: mapping the heralded state onto Phi+: Phi-: Z; Psi+: X; Psi-: X then Z.
PAULI_FRAME: dict[int, tuple[str, ...]] = {0: (), 1: ("z",), 2: ("x",), 3: ("x", "z")}

RESULT_KEYS = ("pairs_measured", "fidelity", "fidelity_stderr", "chsh", "chsh_stderr", "pair_rate_hz", "wall_s")

_MAX_PAIRS = 10_000_000
_MAX_BATCH = 16_384  # pairs per measure request
# Gates per `circuit` request: below the broker's default max_ops_per_circuit (10 000) and
# the wire's 65 536-item list limit; a batch needing more is split over several circuits.
_MAX_OPS_PER_CIRCUIT = 8192
_MAX_MEASURES_IN_FLIGHT = 2


@dataclasses.dataclass(frozen=True, slots=True)
class EprTestParams:
    role: Role
    peer: str
    pairs: int
    wait_s: float = 0.0
    seed: int | None = None
    peer_app: str = ""  # name of the other end's instance; "" = same as ours
    max_batch: int = 4096
    retry_s: float = 0.5  # emulated seconds between start retries / result retransmissions
    max_start_attempts: int = 40


def correlator_table(
    a_settings: np.ndarray, b_settings: np.ndarray, a_outcomes: np.ndarray, b_outcomes: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(counts, sums) over setting pairs: counts[a, b] pairs, sums[a, b] of outcome products (+-1)."""
    counts = np.zeros((N_SETTINGS, N_SETTINGS), dtype=np.int64)
    sums = np.zeros((N_SETTINGS, N_SETTINGS), dtype=np.int64)
    a = a_settings.astype(np.intp)
    b = b_settings.astype(np.intp)
    prod = 1 - 2 * (a_outcomes.astype(np.int64) ^ b_outcomes.astype(np.int64))
    np.add.at(counts, (a, b), 1)
    np.add.at(sums, (a, b), prod)
    return counts, sums


def _correlator(counts: np.ndarray, sums: np.ndarray, a: Setting, b: Setting) -> tuple[float, float] | None:
    n = int(counts[a, b])
    if n == 0:
        return None
    e = float(sums[a, b]) / n
    # The outcome product is a +-1 variable of mean E: variance (1 - E^2), so Var(mean) = (1 - E^2)/n.
    return e, max(0.0, 1.0 - e * e) / n


def estimate(counts: np.ndarray, sums: np.ndarray) -> dict[str, float | None]:
    """Fidelity to Phi+ and CHSH from a correlator table, with standard errors."""
    out: dict[str, float | None] = {"fidelity": None, "fidelity_stderr": None, "chsh": None, "chsh_stderr": None}
    zz = _correlator(counts, sums, Setting.Z, Setting.Z)
    xx = _correlator(counts, sums, Setting.X, Setting.X)
    yy = _correlator(counts, sums, Setting.Y, Setting.Y)
    if zz and xx and yy:
        out["fidelity"] = fidelity_from_correlations(xx[0], yy[0], zz[0], 0)  # 0 = Phi+
        out["fidelity_stderr"] = math.sqrt(xx[1] + yy[1] + zz[1]) / 4.0
    terms = [
        (_correlator(counts, sums, Setting.Z, Setting.W), 1.0),
        (_correlator(counts, sums, Setting.Z, Setting.V), 1.0),
        (_correlator(counts, sums, Setting.X, Setting.W), 1.0),
        (_correlator(counts, sums, Setting.X, Setting.V), -1.0),
    ]
    if all(t is not None for t, _ in terms):
        out["chsh"] = sum(sign * t[0] for t, sign in terms)  # type: ignore[index]
        out["chsh_stderr"] = math.sqrt(sum(t[1] for t, _ in terms))  # type: ignore[index]
    return out


def _pack(a: np.ndarray, dtype: str) -> bytes:
    return np.ascontiguousarray(a, dtype=dtype).tobytes()


class _Batch:
    """A measured-together group of pairs awaiting the broker's `measured` reply."""

    __slots__ = ("pair_ids", "settings")

    def __init__(self, pair_ids: np.ndarray, settings: np.ndarray) -> None:
        self.pair_ids = pair_ids
        self.settings = settings


class EprTestApp(App):
    KIND = "epr-test"

    @classmethod
    def parse_params(cls, params: Mapping[str, Any], ctx: AppContext) -> EprTestParams:
        reject_unknown(params, EprTestParams)
        role = role_param(params, Role)
        peer, link = neighbour_param(params, ctx)
        if not link.entanglement:
            raise AppParamError("peer", f"the link to {peer!r} has no entanglement source")
        pairs = int_param(params, "pairs", None, 1, _MAX_PAIRS)
        if pairs is None:
            raise AppParamError("pairs", "required")
        peer_app = peer_app_param(params, ctx)
        seed = int_param(params, "seed", None, 0, 2**63 - 1)
        default_retry_s = 0.5 / ctx.time_scale  # half a wall second
        retry_s = number_param(params, "retry_s", default_retry_s)
        assert retry_s is not None  # it has a default
        if retry_s <= 0.0:
            raise AppParamError("retry_s", "must be > 0")
        return EprTestParams(
            role=role,
            peer=peer,
            pairs=pairs,
            wait_s=number_param(params, "wait_s", 0.0) or 0.0,
            seed=seed,
            peer_app=peer_app,
            max_batch=int_param(params, "max_batch", 4096, 1, _MAX_BATCH) or 4096,
            retry_s=retry_s,
            max_start_attempts=int_param(params, "max_start_attempts", 40, 1, 10_000) or 40,
        )

    def __init__(self, ctx: AppContext, params: EprTestParams) -> None:
        super().__init__(ctx, params)
        self.p = params
        self.role = params.role
        names = [zlib.crc32(ctx.node.encode()), zlib.crc32(ctx.name.encode())]
        base = params.seed if params.seed is not None else ctx.seed
        self._rng = np.random.default_rng([base & 0xFFFFFFFFFFFFFFFF, *names])
        self._probs = INITIATOR_PROBS if self.role is Role.INITIATOR else RESPONDER_PROBS
        # pairs delivered and waiting for their measurement time
        self._wait_ids = np.empty(0, np.int64)
        self._wait_qubits = np.empty(0, np.int64)
        self._wait_bell = np.empty(0, np.uint8)
        self._wait_due = np.empty(0, np.float64)
        # pairs due, to be measured at the next _prepare_actions
        self._ready: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._in_flight: dict[int, _Batch] = {}
        self._batch_no = 0
        self._delivered = 0
        self._measured = 0
        self._last_herald: float | None = None
        self._total: int | None = None  # from epr_done
        self._done_reason = ""
        self.bad_peer_messages = 0
        # initiator
        self._requested = False
        self._start_attempts = 0
        self._start_retry_at = math.inf
        self._t_accept: float | None = None
        self._own_pool = (np.empty(0, np.int64), np.empty(0, np.uint8), np.empty(0, np.uint8))
        self._peer_pool = (np.empty(0, np.int64), np.empty(0, np.uint8), np.empty(0, np.uint8))
        self._seen_seq: set[int] = set()
        self._counts = np.zeros((N_SETTINGS, N_SETTINGS), dtype=np.int64)
        self._sums = np.zeros((N_SETTINGS, N_SETTINGS), dtype=np.int64)
        self._matched = 0
        # responder
        self._listening = False
        self._start_seen = False
        self._unacked: dict[int, tuple[dict[str, Any], float]] = {}  # seq -> (body, last sent)
        self._next_seq = 0
        self._unlistened = False

    # ------------------------------------------------------------------ inputs

    def _on_start(self, now: float) -> None:
        if self.role is Role.RESPONDER:
            self._request("listen", EprListen(peer=self.p.peer, accept=True))
        else:
            self._send_start(now)
        self._rearm()

    def _send_start(self, now: float) -> None:
        self._start_attempts += 1
        self._send_peer(self.p.peer, self.p.peer_app, {"op": "start", "pairs": self.p.pairs})
        self._start_retry_at = now + self.p.retry_s

    def _on_reply(self, tag: Hashable, message: Message, now: float) -> None:
        if isinstance(message, Error):
            if tag in ("unlisten", "free"):
                return
            if tag == "listen":
                self._send_peer(self.p.peer, self.p.peer_app, {"op": "error", "code": message.code})
            self._fail(f"broker refused {tag!r}: {message.code}: {message.message}", now)
            return
        if tag == "listen":
            self._listening = True
            if self._start_seen:
                self._send_peer(self.p.peer, self.p.peer_app, {"op": "ready"})
        elif tag == "request" and isinstance(message, EprAccepted):
            self._t_accept = message.now_s
        elif isinstance(tag, tuple) and tag[0] == "measure" and isinstance(message, Measured):
            self._measured_batch(tag[1], message.outcomes, now)
        self._rearm()

    def _on_event(self, message: Message, now: float) -> None:
        if self.finished:
            if isinstance(message, EprDelivered) and len(message.qubits):
                self._request("free", Free(qubits=message.qubits))  # do not hog the memory
            return
        if isinstance(message, EprDelivered):
            self._delivered += len(message.pair_ids)
            if len(message.herald_s):
                last = float(np.max(message.herald_s))
                self._last_herald = last if self._last_herald is None else max(self._last_herald, last)
            self._wait_ids = np.concatenate([self._wait_ids, message.pair_ids])
            self._wait_qubits = np.concatenate([self._wait_qubits, message.qubits])
            self._wait_bell = np.concatenate([self._wait_bell, message.bell])
            self._wait_due = np.concatenate([self._wait_due, message.herald_s + self.p.wait_s])
            self._take_due(now)
        elif isinstance(message, EprDone):
            self._total = message.delivered
            self._done_reason = message.reason
            if message.reason != "complete":
                # The other end is gone or the request was cancelled: what is measured
                # stays in the results, but the run cannot complete.
                self._fail(f"entanglement request ended early: {message.reason[:64]}", now)
            else:
                self._check_done(now)
        self._rearm()

    def _on_peer_message(self, peer: str, body: Mapping[str, Any], now: float) -> None:
        if peer != self.p.peer:
            self.bad_peer_messages += 1
            return
        op = body.get("op")
        if self.role is Role.INITIATOR:
            if op == "ready":
                if not self._requested and not self.finished:
                    self._requested = True
                    self._request("request", EprRequest(peer=self.p.peer, pairs=self.p.pairs))
            elif op == "results":
                self._peer_results(body, now)
            elif op == "error":
                self._fail(f"peer app refused: {str(body.get('code'))[:64]}", now)
            else:
                self.bad_peer_messages += 1
        else:
            if op == "start":
                self._start_seen = True
                if self._listening:
                    self._send_peer(self.p.peer, self.p.peer_app, {"op": "ready"})
            elif op == "ack":
                seq = body.get("seq")
                if isinstance(seq, int) and self._unacked.pop(seq, None) is not None:
                    self._check_done(now)
            else:
                self.bad_peer_messages += 1
        self._rearm()

    def _on_timer(self, now: float) -> None:
        if self.finished:
            return
        if self.role is Role.INITIATOR and not self._requested and now >= self._start_retry_at:
            if self._start_attempts >= self.p.max_start_attempts:
                self._fail(f"peer app not ready after {self._start_attempts} start messages", now)
                return
            self._send_start(now)
        for seq, (body, sent_at) in list(self._unacked.items()):
            if now >= sent_at + self.p.retry_s:  # not acknowledged in time: send again
                self._send_peer(self.p.peer, self.p.peer_app, body)
                self._unacked[seq] = (body, now)
        self._take_due(now)
        self._rearm()

    # ------------------------------------------------------------------ measurement

    def _take_due(self, now: float) -> None:
        """Move pairs whose measurement time has come into the ready list."""
        if not len(self._wait_ids):
            return
        due = np.ones(len(self._wait_ids), bool) if self.p.wait_s == 0.0 else self._wait_due <= now
        if not due.any():
            return
        self._ready.append((self._wait_ids[due], self._wait_qubits[due], self._wait_bell[due]))
        keep = ~due
        self._wait_ids = self._wait_ids[keep]
        self._wait_qubits = self._wait_qubits[keep]
        self._wait_bell = self._wait_bell[keep]
        self._wait_due = self._wait_due[keep]

    def _fail(self, reason: str, now: float | None = None) -> None:
        super()._fail(reason, now)
        self._release_pending()

    def _release_pending(self) -> None:
        """Free the qubits of pairs not yet measured (after a failure)."""
        qubits = [self._wait_qubits, *(r[1] for r in self._ready)]
        self._wait_ids, self._wait_qubits = np.empty(0, np.int64), np.empty(0, np.int64)
        self._wait_bell, self._wait_due = np.empty(0, np.uint8), np.empty(0, np.float64)
        self._ready.clear()
        held = np.concatenate(qubits)
        if len(held):
            self._request("free", Free(qubits=held))

    def _prepare_actions(self) -> None:
        # Self-clocked batching (in the spirit of Nagle's algorithm, RFC 896): while one
        # measure request is outstanding, pairs that come due pile up and go out together
        # when its reply arrives. Idle, a pair is measured at once; under load, batches
        # grow with the broker's round trip, so the requests per pair fall (the broker's
        # per-frame cost is what limits throughput) instead of the queue growing. A second
        # request may overlap the first only when the pile reaches a quarter of the
        # memory: the broker stops generating pairs when a memory is full.
        if not self._ready or self.finished:
            return
        if self._in_flight:
            waiting = sum(len(r[0]) for r in self._ready)
            if len(self._in_flight) >= _MAX_MEASURES_IN_FLIGHT or waiting < max(1, self.ctx.memory_qubits // 4):
                return
        ids = np.concatenate([r[0] for r in self._ready])
        qubits = np.concatenate([r[1] for r in self._ready])
        bell = np.concatenate([r[2] for r in self._ready])
        self._ready.clear()
        for lo in range(0, len(ids), self.p.max_batch):
            self._measure(ids[lo : lo + self.p.max_batch], qubits[lo : lo + self.p.max_batch], bell[lo : lo + self.p.max_batch])

    def _measure(self, ids: np.ndarray, qubits: np.ndarray, bell: np.ndarray) -> None:
        settings = self._rng.choice(N_SETTINGS, size=len(ids), p=self._probs).astype(np.uint8)
        self._batch_no += 1
        k = self._batch_no
        if self.role is Role.RESPONDER:
            ops: list[GateOp] = []
            for q, b, s in zip(qubits.tolist(), bell.tolist(), settings.tolist(), strict=True):
                for gate in PAULI_FRAME[b]:
                    ops.append(GateOp(name=gate, qubits=[q]))
                angle = ROTATION_RAD.get(Setting(s))
                if angle is not None:
                    ops.append(GateOp(name="ry", qubits=[q], params=[angle]))
            for lo in range(0, len(ops), _MAX_OPS_PER_CIRCUIT):
                self._request(("circuit", k), Circuit(ops=ops[lo : lo + _MAX_OPS_PER_CIRCUIT]))
        self._in_flight[k] = _Batch(ids, settings)
        self._request(("measure", k), Measure(qubits=qubits, bases=_MEASURE_BASIS[settings], free=True))

    def _measured_batch(self, k: int, outcomes: np.ndarray, now: float) -> None:
        batch = self._in_flight.pop(k, None)
        if batch is None:
            return
        if len(outcomes) != len(batch.pair_ids):
            self._fail(f"measured {len(outcomes)} outcomes for {len(batch.pair_ids)} qubits", now)
            return
        self._measured += len(outcomes)
        outcomes = np.ascontiguousarray(outcomes, dtype=np.uint8)
        if self.role is Role.RESPONDER:
            seq = self._next_seq
            self._next_seq += 1
            body = {
                "op": "results",
                "seq": seq,
                "pair_ids": _pack(batch.pair_ids, "<i8"),
                "settings": _pack(batch.settings, "|u1"),
                "outcomes": _pack(outcomes, "|u1"),
            }
            self._unacked[seq] = (body, now)
            self._send_peer(self.p.peer, self.p.peer_app, body)
        else:
            self._own_pool = tuple(  # type: ignore[assignment]
                np.concatenate([old, new]) for old, new in zip(self._own_pool, (batch.pair_ids, batch.settings, outcomes))
            )
            self._match()
        self._check_done(now)

    # ------------------------------------------------------------------ initiator: matching

    def _peer_results(self, body: Mapping[str, Any], now: float) -> None:
        seq = body.get("seq")
        ids_b, set_b, out_b = body.get("pair_ids"), body.get("settings"), body.get("outcomes")
        if not isinstance(seq, int) or not all(isinstance(x, bytes) for x in (ids_b, set_b, out_b)):
            self.bad_peer_messages += 1
            return
        if len(ids_b) % 8 or len(ids_b) // 8 != len(set_b) or len(set_b) != len(out_b):  # type: ignore[arg-type]
            self.bad_peer_messages += 1
            return
        # Ack first: a duplicate (our ack was lost) must be acked again but not counted twice.
        self._send_peer(self.p.peer, self.p.peer_app, {"op": "ack", "seq": seq})
        if seq in self._seen_seq:
            return
        self._seen_seq.add(seq)
        ids = np.frombuffer(ids_b, dtype="<i8")  # type: ignore[arg-type]
        settings = np.frombuffer(set_b, dtype=np.uint8)  # type: ignore[arg-type]
        outcomes = np.frombuffer(out_b, dtype=np.uint8)  # type: ignore[arg-type]
        if settings.size and (settings.max() >= N_SETTINGS or outcomes.max() > 1):
            self.bad_peer_messages += 1
            return
        self._peer_pool = tuple(  # type: ignore[assignment]
            np.concatenate([old, new]) for old, new in zip(self._peer_pool, (ids, settings, outcomes))
        )
        self._match()
        self._check_done(now)

    def _match(self) -> None:
        a_ids, a_set, a_out = self._own_pool
        b_ids, b_set, b_out = self._peer_pool
        if not len(a_ids) or not len(b_ids):
            return
        _, ia, ib = np.intersect1d(a_ids, b_ids, assume_unique=True, return_indices=True)
        if not len(ia):
            return
        counts, sums = correlator_table(a_set[ia], b_set[ib], a_out[ia], b_out[ib])
        self._counts += counts
        self._sums += sums
        self._matched += len(ia)
        keep_a = np.ones(len(a_ids), bool)
        keep_a[ia] = False
        keep_b = np.ones(len(b_ids), bool)
        keep_b[ib] = False
        self._own_pool = (a_ids[keep_a], a_set[keep_a], a_out[keep_a])
        self._peer_pool = (b_ids[keep_b], b_set[keep_b], b_out[keep_b])

    # ------------------------------------------------------------------ completion

    def _check_done(self, now: float) -> None:
        if self.finished or self._total is None:
            return
        if self.role is Role.INITIATOR:
            complete = self._matched >= self._total
        else:
            complete = self._measured >= self._total and not self._unacked and not self._in_flight
        if not complete:
            return
        if self.role is Role.RESPONDER and not self._unlistened:
            self._unlistened = True
            self._request("unlisten", EprListen(peer=self.p.peer, accept=False))
        self._finish(now)

    def _rearm(self) -> None:
        if self.finished:
            self._timer = None
            return
        times = []
        if self.role is Role.INITIATOR and not self._requested:
            times.append(self._start_retry_at)
        if self._unacked:
            times.append(min(sent_at for _, sent_at in self._unacked.values()) + self.p.retry_s)
        if self.p.wait_s > 0.0 and len(self._wait_due):
            times.append(float(self._wait_due.min()))
        self._timer = min(times) if times else None

    # ------------------------------------------------------------------ results

    def results(self) -> dict[str, Any]:
        out: dict[str, Any] = dict.fromkeys(RESULT_KEYS)
        out["wall_s"] = self.wall_s()
        if self.role is Role.INITIATOR:
            out["pairs_measured"] = self._matched
            out.update(estimate(self._counts, self._sums))
            if self._t_accept is not None and self._last_herald is not None and self._last_herald > self._t_accept:
                out["pair_rate_hz"] = self._delivered / (self._last_herald - self._t_accept)
        else:
            out["pairs_measured"] = self._measured
        return out
