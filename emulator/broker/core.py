"""Sans-IO core of the quantum-channel broker: bytes in, bytes out, emulated time as an argument.

Theory of operation
-------------------
The broker owns every qubit of the emulated network (DESIGN §2, §5). This module is the
whole protocol and physics bookkeeping, with no sockets, no clock and no global RNG, in
the manner of aioquic's `QuicConnection`:

* a host (the trio server, or `emulator.testing.InMemoryBroker`) calls `open_session`
  per connection, pushes received bytes with `receive_data(session, data, now_s)`, and
  pulls `data_to_send(session)` for every session in `sessions_with_data()`;
* `get_timer()` is the next emulated deadline (a herald, a qubit arriving);
  the host calls `handle_timer(now_s)` once it is reached. Every input also first runs
  the timers that are due, so the core's state is always that of time `now_s`;
* `sessions_to_close()` lists sessions the host must close after flushing their output
  (wrong token, oversize frame, `bye`, a reader too slow for its output), and the host
  reports every closed connection with `close_session(session, now_s)`.

Times are EMULATED seconds (DESIGN §3: t_emulated = (monotonic() - t0)/time_scale is
computed by the host). Time never runs backwards: an earlier `now_s` than already seen
is treated as the latest one. All randomness comes from numpy Generators seeded from
the run seed with `derive_key` — measurement outcomes per node
(`derive_key(seed, "broker", "measure", node)`), fibre loss and heralding per link
(`derive_key(seed, "link", a, b, "qubit" | "epr")`, a <= b) — so the same seed and the
same sequence of inputs (messages and times) reproduce the same physics.

Session state machine (CONVENTIONS 4; h11-style table)
------------------------------------------------------

    state    | input                               | effect                                    | next
    ---------+-------------------------------------+-------------------------------------------+--------
    NEW      | hello, no common version            | error unsupported_version                 | NEW
    NEW      | hello, wrong token                  | error unauthorized, asked to close        | CLOSING
    NEW      | hello, node not in the scenario     | error unknown_node                        | NEW
    NEW      | hello, node already has a session   | error already_registered                  | NEW
    NEW      | hello, all good                     | welcome; peer_up both ways with neighbours| NODE
    NEW      | admin_hello, wrong token/version    | unauthorized (closes) / unsupported_ver.  | CLOSING/NEW
    NEW      | admin_hello, good                   | admin_welcome                             | ADMIN
    NEW      | any other known message             | error not_registered                      | NEW
    NODE     | hello / admin_hello                 | error already_registered                  | NODE
    NODE     | quantum op, ping, clock             | reply (or typed error)                    | NODE
    NODE     | status, get_stats, shutdown         | error not_registered (admin session only) | NODE
    ADMIN    | status, get_stats, shutdown, ping,  | reply; shutdown sets shutdown_requested   | ADMIN
             | clock                               |                                           |
    ADMIN    | hello / admin_hello                 | error already_registered                  | ADMIN
    ADMIN    | quantum op                          | error not_registered                      | ADMIN
    any      | bye                                 | ok, asked to close                        | CLOSING
    any      | frame over the size limit           | error frame_too_large, asked to close     | CLOSING
    any      | undecodable frame / bad field /     | error bad_frame / bad_field /             | same
             | unknown type / reply-only type      | unknown_type (re = request id if known)   |
    CLOSING  | anything                            | ignored                                   | CLOSING
    any      | close_session (host)                | node released (below)                     | gone

Qubit ownership
---------------

    qubit id                                 | touched by its owner | by another node
    -----------------------------------------+----------------------+----------------
    never allocated, freed, or lost in fibre | unknown_qubit        | unknown_qubit
    in the owner's memory                    | allowed              | not_owner
    in flight (send_qubit, not yet arrived)  | not_owner            | not_owner

A node's memory holds at most `memory.qubits` qubits: `alloc`, an arriving qubit and a
heralded pair each need a free slot. `alloc` beyond capacity is `no_resource`; a qubit
arriving at a full memory is lost (`qubit_transfer` with `arrived=false`). A qubit in
flight occupies no memory.

Physics
-------
* Lazy decoherence (DESIGN §3): each qubit carries the emulated time it was last
  brought up to date; before any operation touches it, the T1/T2 channel for the
  elapsed time (`emulator.physics.memory_decay_kraus`) is applied and the stamp moves
  to now. A qubit in flight does not decohere (the fibre is modelled as lossy only).
* Gate noise: every qubit a gate (or `unitary`) touches is then depolarised with
  p = 2(1 - F), F = the node's `gate_fidelity` (emulator.physics.gate).
* send_qubit: arrives with probability equal to the fibre transmittance
  10^(-alpha L/10), after the propagation delay L * 4.9 us/km (emulator.physics.fibre).
* Heralded entanglement (emulator.physics.heralding): pair k heralds at
  t_k = t_{k-1} + a_k T, a_k ~ Geometric(p), t_0 = the request time, T the attempt
  period; the Bell state of each pair is drawn uniformly from the model's heralds and
  its 4x4 state placed in a fresh register (initiator's qubit first). Pairs are
  delivered by timer: every pair of a request heralded at or before now goes out in
  ONE `epr_delivered` per end. **Memory back-pressure:** a herald that finds either
  end's memory full is discarded and the request pauses; when memory frees at either
  end at time t (free, measure+free, send_qubit, a disconnect), every paused request
  that now has room at both ends restarts its attempts at t — i.e. a node with full
  memory makes no attempts, as a real node without a free communication qubit.
* QKD optical layer (DESIGN §7 step 1; emulator.broker.optics): a link with a
  `QkdConfig` holds an `OpticalLink` keyed by `link_keys(seed, transmitter, receiver)`;
  `welcome` gives the transmitter its `alice_key` and both ends the public parameters.
  Consent as for EPR: the receiver sends `qkd_listen`, then the transmitter
  `qkd_start` / `qkd_stop`. Pulses are numbered from 0 over the whole run and emitted
  only while running: in a window started at emulated time t_w with first pulse p_w,
  pulse p leaves at t_w + (p - p_w)/pulse_rate_hz, so the pulses sent before t are
  [0, p_w + ceil((t - t_w) R)); stopping freezes the count (no index is ever reused).
  A QKD timer fires at each slice boundary (every `qkd_slice_s`, computed in whole
  pulses) and pushes the receiver one `qkd_detections` per slice (split further at
  `max_qkd_detections_per_batch`, capped to fit a frame) and the transmitter one
  `qkd_emitted`; like every timer it also runs before any input that comes after it.
  `qkd_stop`, a withdrawn consent, a departing end and an admin `qkd_eve` first flush
  the partial slice up to now, so a switch applies exactly from the next pulse. A
  receiver with more than `max_qkd_backlog_bytes` unread loses whole events (counted).
* Fibre cuts (admin `fibre_cut`): nothing crosses a cut fibre — a qubit sent over it
  is lost, its heralded-entanglement requests pause (resumed at the splice, like memory
  back-pressure) and its QKD layer delivers dark counts only.
"""

from __future__ import annotations

import dataclasses
import enum
import heapq
import hmac
import itertools
import logging
import math
import secrets
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

import msgpack
import numpy as np

from emulator.kernels import (
    GATES,
    MAX_PULSE_INDEX,
    Backend,
    Basis,
    KernelError,
    derive_key,
    kraus_depolarizing,
    rotation,
)
from emulator.physics import (
    HeraldingModel,
    memory_decay_kraus,
    propagation_delay_s,
    sample_attempts,
    transmittance,
)
from emulator.state import QuantumRegistry, RegisterLimitError, UnknownQubitError
from emulator.wire import (
    GATE_ARITY,
    SUPPORTED_VERSIONS,
    AdminHello,
    AdminWelcome,
    Alloc,
    Allocated,
    Bye,
    Circuit,
    Clock,
    Envelope,
    EprAccepted,
    EprCancel,
    EprDelivered,
    EprDone,
    EprListen,
    EprRequest,
    Error,
    ErrorCode,
    FrameDecoder,
    Free,
    Gate,
    GateOp,
    GetStats,
    Hello,
    Limits,
    LinkInfo,
    Measure,
    Measured,
    Message,
    NodeStatus,
    Ok,
    PeerDown,
    PeerUp,
    Ping,
    Pong,
    QkdDetections,
    QkdEmitted,
    QkdEve,
    FibreCut,
    QkdLinkInfo,
    QkdListen,
    QkdStart,
    QkdStop,
    QkdStopped,
    QubitTransfer,
    RemoteProtocolError,
    SendQubit,
    Shutdown,
    Stats,
    Status,
    StatusReply,
    Unitary,
    Welcome,
    decode,
    encode_framed,
)

from .config import BrokerConfig, LinkConfig, NodeConfig
from .optics import Eavesdropper, OpticalLink, link_keys

__all__ = ["BrokerCore", "BrokerStatistics", "SessionState", "node_seed"]

log = logging.getLogger("emulator.broker")

_INT63_MASK = (1 << 63) - 1
_UNITARY_ATOL = 1e-9  # |U U^dagger - I| tolerated for a `unitary` matrix (float64 round-off)
_ROTATION_CACHE_SIZE = 1024  # distinct (gate, angle) matrices kept; apps reuse a few angles
_QKD_BYTES_PER_DETECTION = 11  # pulse u64 + basis, outcome, double_click u8
#: Bytes of each QKD link's pre-shared authentication key (half per direction): Wegman-
#: Carter tags cost 128 bits each, so 128 kbit per direction covers ~1000 messages, the
#: sifting and Cascade traffic of the first blocks at 100 km; later keys come from the
#: link's own pool (nodes/qkd/session.py).
QKD_AUTH_KEY_BYTES = 32_768
_QKD_FRAME_HEADROOM = 4096  # envelope and small fields of a qkd_detections frame


class SessionState(enum.Enum):
    NEW = "new"
    NODE = "node"
    ADMIN = "admin"
    CLOSING = "closing"


@dataclasses.dataclass(frozen=True, slots=True)
class BrokerStatistics:
    """A snapshot of the broker's counters (`BrokerCore.statistics()`)."""

    now_s: float
    sessions_open: int
    sessions_total: int
    nodes_registered: int
    frames_in: int
    frames_out: int
    bytes_in: int
    bytes_out: int
    errors_by_code: Mapping[str, int]
    pairs_delivered: Mapping[tuple[str, str], int]  # per link (sorted endpoints)
    qubits_in_use: Mapping[str, int]  # per node, in memory
    qubits_in_flight: int
    qubits_sent: int
    qubits_lost: int
    epr_requests_open: int
    registry: Mapping[str, Any]
    qkd_links: Mapping[tuple[str, str], Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    # per QKD link (sorted endpoints): roles, state, OpticalLinkStatistics, Eve's switches (counts only)
    fibres: Mapping[tuple[str, str], Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    # links whose fibre was ever cut (sorted endpoints): {"cut": cut now, "cuts": times cut}

    def as_dict(self) -> dict[str, Any]:
        """Plain msgpack-able dict (the `stats` message body); links as "a|b" keys."""
        return {
            "now_s": self.now_s,
            "sessions_open": self.sessions_open,
            "sessions_total": self.sessions_total,
            "nodes_registered": self.nodes_registered,
            "frames_in": self.frames_in,
            "frames_out": self.frames_out,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "errors_by_code": dict(self.errors_by_code),
            "pairs_delivered": {f"{a}|{b}": n for (a, b), n in self.pairs_delivered.items()},
            "qubits_in_use": dict(self.qubits_in_use),
            "qubits_in_flight": self.qubits_in_flight,
            "qubits_sent": self.qubits_sent,
            "qubits_lost": self.qubits_lost,
            "epr_requests_open": self.epr_requests_open,
            "registry": dict(self.registry),
            "qkd": {f"{a}|{b}": dict(v) for (a, b), v in self.qkd_links.items()},
            "fibres": {f"{a}|{b}": dict(v) for (a, b), v in self.fibres.items()},
        }


# ------------------------------------------------------------------------------ internal records


@dataclasses.dataclass(slots=True, eq=False)
class _Session:
    id: int
    decoder: FrameDecoder
    state: SessionState = SessionState.NEW
    node: str | None = None
    out: bytearray = dataclasses.field(default_factory=bytearray)
    next_id: int = 1


@dataclasses.dataclass(slots=True, eq=False)
class _Node:
    config: NodeConfig
    rng: np.random.Generator  # measurement outcomes
    gate_kraus: np.ndarray | None  # depolarising Kraus set after each gate (None: ideal)
    session: int | None = None
    qubits: set[int] = dataclasses.field(default_factory=set)
    listening: set[str] = dataclasses.field(default_factory=set)
    tcp: tuple[str, int] | None = None
    udp: tuple[str, int] | None = None
    control: tuple[str, int] | None = None

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def room(self) -> int:
        return self.config.memory.qubits - len(self.qubits)


@dataclasses.dataclass(slots=True, eq=False)
class _Qubit:
    owner: str | None  # None while in flight
    stamp_s: float  # emulated time the state was last brought up to date


@dataclasses.dataclass(slots=True, eq=False, repr=False)
class _Qkd:
    """A link's QKD optical layer and its run state (see the module docstring)."""

    key: tuple[str, str]  # the link key (sorted endpoints)
    transmitter: str
    receiver: str
    optical: OpticalLink
    info: QkdLinkInfo  # public parameters, without alice_key
    alice_key: bytes  # 8 bytes little-endian; only in the transmitter's welcome
    auth_key: bytes  # the pre-shared authentication key, in both ends' welcome
    slice_pulses: int
    listening: bool = False
    running: bool = False
    window_start_s: float = 0.0
    window_first_pulse: int = 0
    generation: int = 0  # bumps invalidate queued slice timers
    overflowing: bool = False  # the receiver's backlog is over the limit (logged once per episode)
    dropped_events: int = 0  # qkd_detections not sent: the receiver's backlog was over the limit
    dropped_pulses: int = 0
    dropped_detections: int = 0

    @property
    def rate_hz(self) -> float:
        return self.optical.config.pulse_rate_hz

    def pulses_before(self, now: float) -> int:
        """End of the pulses emitted before `now` (never below what is already decided)."""
        if not self.running:
            return self.optical.next_pulse
        elapsed = max(0.0, now - self.window_start_s)
        end = min(self.window_first_pulse + math.ceil(elapsed * self.rate_hz), MAX_PULSE_INDEX)
        return max(end, self.optical.next_pulse)

    def time_of(self, pulse: int) -> float:
        return self.window_start_s + (pulse - self.window_first_pulse) / self.rate_hz


@dataclasses.dataclass(slots=True, eq=False)
class _Link:
    config: LinkConfig
    transmittance: float
    delay_s: float
    qubit_rng: np.random.Generator
    epr_rng: np.random.Generator
    model: HeraldingModel | None
    pairs_delivered: int = 0
    qkd: _Qkd | None = None
    fibre_cut: bool = False  # admin `fibre_cut`: nothing crosses the fibre
    fibre_cuts: int = 0


@dataclasses.dataclass(slots=True, eq=False)
class _EprRequest:
    id: int
    initiator: str
    peer: str
    link: _Link
    pairs: int
    last_herald_s: float  # t_{k-1}: attempts for the next pair start here
    heralded: int = 0
    generation: int = 0  # bumps invalidate queued herald timers (pause/cancel)
    paused: bool = False
    batch: list[tuple[int, int, int, int, float]] = dataclasses.field(default_factory=list)
    # batch items: (pair_id, initiator qubit, peer qubit, bell code, herald time)

    def ends(self) -> tuple[str, str]:
        return (self.initiator, self.peer)


@dataclasses.dataclass(slots=True, eq=False)
class _Transfer:
    qubit: int
    sender: str
    receiver: str
    arrives: bool


class _Kind(enum.IntEnum):
    HERALD = 0
    ARRIVAL = 1
    QKD_SLICE = 2


def node_seed(run_seed: int, node: str) -> int:
    """The seed a node receives in `welcome`: derive_key(run seed, "node", name), cut to
    63 bits because wire integers are signed 64-bit."""
    return derive_key(run_seed, "node", node) & _INT63_MASK


def _fail(code: ErrorCode, message: str) -> RemoteProtocolError:
    return RemoteProtocolError(code, message)


def _peek_id(payload: bytes, limits: Limits) -> int | None:
    """Best-effort request id of a frame that failed to decode (for the error's `re`)."""
    try:
        raw = msgpack.unpackb(
            payload,
            raw=False,
            max_bin_len=limits.max_frame_bytes,
            max_str_len=4 * limits.max_str_bytes,  # the decoder's hard limits (field limits x 4)
            max_array_len=4 * limits.max_list_items,
            max_map_len=4 * limits.max_map_items,
            max_ext_len=0,
        )
    except Exception:  # noqa: BLE001 - garbage in, no id out
        return None
    if isinstance(raw, dict):
        msg_id = raw.get("id")
        if isinstance(msg_id, int) and not isinstance(msg_id, bool):
            return msg_id
    return None


# ------------------------------------------------------------------------------ the core


class BrokerCore:
    """The broker's protocol engine (see the module docstring). Not thread-safe."""

    def __init__(
        self,
        config: BrokerConfig,
        *,
        backend: Backend,
        node_token: str,
        admin_token: str,
        now_s: float = 0.0,
        secret_bytes: Callable[[int], bytes] = secrets.token_bytes,
    ) -> None:
        """`secret_bytes(n)`: n unpredictable bytes, for each QKD link's pre-shared
        authentication key (not derived from the public seed; tests may fix it)."""
        if not node_token or not admin_token:
            raise ValueError("node_token and admin_token must be non-empty")
        self.config = config
        self._node_token = node_token.encode("utf-8")
        self._admin_token = admin_token.encode("utf-8")
        self._now_s = float(now_s)
        self._secret_bytes = secret_bytes
        self._limits = Limits(max_frame_bytes=config.limits.max_frame_bytes)
        self.registry = QuantumRegistry(backend, max_register_qubits=config.limits.max_register_qubits)
        #: Set by an admin `shutdown`; the host exits once it has flushed the reply.
        self.shutdown_requested = False

        seed = config.seed
        self._nodes: dict[str, _Node] = {}
        for nc in config.nodes:
            p_gate = nc.memory.gate_depolarizing_p
            kraus = None if p_gate <= 0.0 else kraus_depolarizing(p_gate)
            self._nodes[nc.name] = _Node(
                config=nc,
                rng=np.random.default_rng(derive_key(seed, "broker", "measure", nc.name)),
                gate_kraus=kraus,
            )
        self._links: dict[tuple[str, str], _Link] = {}
        for lc in config.links:
            a, b = lc.key
            ent = lc.entanglement
            self._links[lc.key] = _Link(
                config=lc,
                transmittance=transmittance(lc.length_km, lc.attenuation_db_per_km),
                delay_s=propagation_delay_s(lc.length_km),
                qubit_rng=np.random.default_rng(derive_key(seed, "link", a, b, "qubit")),
                epr_rng=np.random.default_rng(derive_key(seed, "link", a, b, "epr")),
                model=None if ent is None else ent.model(lc.length_km, lc.attenuation_db_per_km),
                qkd=self._make_qkd(lc, backend),
            )
        self._qkd_batch = max(
            1,
            min(
                config.limits.max_qkd_detections_per_batch,
                (config.limits.max_frame_bytes - _QKD_FRAME_HEADROOM) // _QKD_BYTES_PER_DETECTION,
                self._limits.max_array_items,
            ),
        )

        self._sessions: dict[int, _Session] = {}
        self._session_ids = itertools.count(1)
        self._to_close: list[int] = []
        self._qubits: dict[int, _Qubit] = {}
        self._requests: dict[int, _EprRequest] = {}
        self._request_ids = itertools.count(1)
        self._pair_ids = itertools.count(1)
        self._timers: list[tuple[float, int, _Kind, Any]] = []
        self._timer_seq = itertools.count()
        self._dirty_requests: dict[int, _EprRequest] = {}  # requests with an unsent batch
        # Rotation matrices by (gate, angle bits): building one with numpy costs more than
        # applying it, and a circuit typically repeats a handful of angles thousands of times.
        self._rotations: dict[tuple[str, float, bool], np.ndarray] = {}

        # counters
        self._sessions_total = 0
        self._frames_in = 0
        self._frames_out = 0
        self._bytes_in = 0
        self._bytes_out = 0
        self._errors: Counter[str] = Counter()
        self._qubits_sent = 0
        self._qubits_lost = 0

        self._node_handlers: dict[type[Message], Callable[[_Session, _Node, Envelope, float], None]] = {
            Alloc: self._on_alloc,
            Free: self._on_free,
            Gate: self._on_gate,
            Circuit: self._on_circuit,
            Unitary: self._on_unitary,
            Measure: self._on_measure,
            SendQubit: self._on_send_qubit,
            EprListen: self._on_epr_listen,
            EprRequest: self._on_epr_request,
            EprCancel: self._on_epr_cancel,
            QkdListen: self._on_qkd_listen,
            QkdStart: self._on_qkd_start,
            QkdStop: self._on_qkd_stop,
        }
        self._admin_handlers: dict[type[Message], Callable[[_Session, Envelope, float], None]] = {
            Status: self._on_status,
            GetStats: self._on_get_stats,
            Shutdown: self._on_shutdown,
            QkdEve: self._on_qkd_eve,
            FibreCut: self._on_fibre_cut,
        }

    # ================================================================== host interface

    def open_session(self, now_s: float) -> int:
        """A new connection; returns its session id."""
        self._advance(now_s)
        sid = next(self._session_ids)
        self._sessions[sid] = _Session(sid, FrameDecoder(max_frame_bytes=self.config.limits.max_frame_bytes))
        self._sessions_total += 1
        return sid

    def receive_data(self, session: int, data: bytes, now_s: float) -> None:
        """Bytes received on `session` (any split of frames). Never raises for bad input."""
        now = self._advance(now_s)
        s = self._sessions.get(session)
        if s is None or s.state is SessionState.CLOSING:
            return
        self._bytes_in += len(data)
        s.decoder.feed(data)
        while s.state is not SessionState.CLOSING:
            try:
                payload = s.decoder.next_frame()
            except RemoteProtocolError as exc:
                self._send_error(s, exc.code, exc.message, None)
                if exc.code is ErrorCode.FRAME_TOO_LARGE:
                    log.warning("session %d: %s; closing", s.id, exc.message)
                self._close_later(s)  # a framing error leaves the stream unusable
                break
            if payload is None:
                break
            self._frames_in += 1
            self._handle_frame(s, payload, now)

    def data_to_send(self, session: int) -> bytes:
        """Bytes to write to `session` (and forget). Empty if none or unknown session."""
        s = self._sessions.get(session)
        if s is None or not s.out:
            return b""
        data = bytes(s.out)
        s.out.clear()
        self._bytes_out += len(data)
        return data

    def sessions_with_data(self) -> list[int]:
        """Sessions that have output waiting for `data_to_send`."""
        return [sid for sid, s in self._sessions.items() if s.out]

    def sessions_to_close(self) -> list[int]:
        """Sessions the host must close after flushing their output (each reported once)."""
        out, self._to_close = self._to_close, []
        return out

    def close_session(self, session: int, now_s: float) -> None:
        """The connection is gone: release the node's qubits, end its EPR requests
        (`epr_done` reason `peer_gone` to the other end) and tell neighbours (`peer_down`)."""
        now = self._advance(now_s)
        s = self._sessions.pop(session, None)
        if s is None:
            return
        if s.node is not None:
            self._unregister(self._nodes[s.node], now)

    def get_timer(self) -> float | None:
        """Emulated time of the next internal event, or None."""
        timers = self._timers
        while timers and not self._timer_live(timers[0]):
            heapq.heappop(timers)
        return timers[0][0] if timers else None

    def handle_timer(self, now_s: float) -> None:
        """Run every event due at or before `now_s` (heralds, arrivals), then emit batches."""
        self._advance(now_s)

    def statistics(self) -> BrokerStatistics:
        """A frozen snapshot of the counters (the admin `get_stats` reply is its `as_dict()`)."""
        return BrokerStatistics(
            now_s=self._now_s,
            sessions_open=len(self._sessions),
            sessions_total=self._sessions_total,
            nodes_registered=sum(1 for n in self._nodes.values() if n.session is not None),
            frames_in=self._frames_in,
            frames_out=self._frames_out,
            bytes_in=self._bytes_in,
            bytes_out=self._bytes_out,
            errors_by_code=dict(self._errors),
            pairs_delivered={k: link.pairs_delivered for k, link in self._links.items() if link.model is not None},
            qubits_in_use={name: len(n.qubits) for name, n in self._nodes.items()},
            qubits_in_flight=sum(1 for q in self._qubits.values() if q.owner is None),
            qubits_sent=self._qubits_sent,
            qubits_lost=self._qubits_lost,
            epr_requests_open=len(self._requests),
            registry=dataclasses.asdict(self.registry.statistics()),
            qkd_links={k: self._qkd_stats(link.qkd) for k, link in self._links.items() if link.qkd is not None},
            fibres={k: {"cut": link.fibre_cut, "cuts": link.fibre_cuts} for k, link in self._links.items()
                    if link.fibre_cuts},  # fmt: skip
        )

    # ------------------------------------------------------------------ introspection helpers

    @property
    def now_s(self) -> float:
        """Latest emulated time the core has seen."""
        return self._now_s

    def session_state(self, session: int) -> SessionState | None:
        s = self._sessions.get(session)
        return None if s is None else s.state

    def qubits_of(self, node: str) -> frozenset[int]:
        """Qubits currently in `node`'s memory (for tests and the status page)."""
        return frozenset(self._nodes[node].qubits)

    # ================================================================== framing and dispatch

    def _advance(self, now_s: float) -> float:
        """Move time forward to `now_s` (never backwards) running every due timer."""
        now = float(now_s)
        if not math.isfinite(now) or now < self._now_s:
            now = self._now_s
        timers = self._timers
        while timers and timers[0][0] <= now:
            t, _, kind, payload = heapq.heappop(timers)
            self._now_s = max(self._now_s, t)
            try:
                if kind is _Kind.HERALD:
                    self._on_herald(payload, t)
                elif kind is _Kind.QKD_SLICE:
                    self._on_qkd_slice(payload, t)
                else:
                    self._on_arrival(payload, t)
            except Exception:  # a bug must not stop every other event: log, count, go on
                log.exception("internal error in a %s event", kind.name.lower())
                self._errors[ErrorCode.INTERNAL.value] += 1
        self._now_s = now
        # Events that happened before this input go out before any reply to it.
        self._flush_batches()
        return now

    def _timer_live(self, entry: tuple[float, int, _Kind, Any]) -> bool:
        if entry[2] is _Kind.HERALD:
            rid, generation = entry[3]
            req = self._requests.get(rid)
            return req is not None and req.generation == generation
        if entry[2] is _Kind.QKD_SLICE:
            key, generation, _ = entry[3]
            q = self._links[key].qkd
            return q is not None and q.running and q.generation == generation
        return True

    def _schedule(self, t: float, kind: _Kind, payload: Any) -> None:
        heapq.heappush(self._timers, (t, next(self._timer_seq), kind, payload))

    def _send(self, s: _Session, message: Message, re: int | None = None) -> None:
        frame = encode_framed(
            message, id=s.next_id, re=re, max_frame_bytes=self.config.limits.max_frame_bytes, limits=self._limits
        )
        s.next_id += 1
        s.out += frame
        self._frames_out += 1
        if len(s.out) > self.config.limits.max_output_buffer_bytes and s.state is not SessionState.CLOSING:
            log.warning("session %d: %d bytes unread by the peer; closing", s.id, len(s.out))
            self._close_later(s)

    def _is_up(self, node: _Node) -> bool:
        """Registered and not on its way out (a `bye` or a fatal error closes the session)."""
        s = None if node.session is None else self._sessions.get(node.session)
        return s is not None and s.state is SessionState.NODE

    def _backlog_bytes(self, name: str) -> int:
        """Output waiting for node `name` that its connection has not taken yet."""
        node = self._nodes.get(name)
        s = self._sessions.get(node.session) if node is not None and node.session is not None else None
        return len(s.out) if s is not None else 0

    def _send_to_node(self, name: str, message: Message) -> None:
        node = self._nodes.get(name)
        if node is None or node.session is None:
            return
        s = self._sessions.get(node.session)
        if s is not None and s.state is SessionState.NODE:
            self._send(s, message)

    def _send_error(self, s: _Session, code: ErrorCode, message: str, re: int | None) -> None:
        self._errors[code.value] += 1
        log.debug("session %d: error %s (%s)", s.id, code.value, message)
        self._send(s, Error(code=code.value, message=message), re)

    def _close_later(self, s: _Session) -> None:
        if s.state is not SessionState.CLOSING:
            s.state = SessionState.CLOSING
            self._to_close.append(s.id)

    def _handle_frame(self, s: _Session, payload: bytes, now: float) -> None:
        try:
            env = decode(payload, limits=self._limits)
        except RemoteProtocolError as exc:
            self._send_error(s, exc.code, exc.message, _peek_id(payload, self._limits))
            return
        msg = env.message
        try:
            self._dispatch(s, env, now)
        except RemoteProtocolError as exc:
            self._send_error(s, exc.code, exc.message, env.id)
        except UnknownQubitError as exc:
            self._send_error(s, ErrorCode.UNKNOWN_QUBIT, str(exc), env.id)
        except RegisterLimitError as exc:
            self._send_error(s, ErrorCode.NO_RESOURCE, str(exc), env.id)
        except Exception:
            # A bug on our side: the session survives. Log the type only, never payload bytes.
            log.exception("session %d: internal error handling %r", s.id, msg.TYPE)
            self._send_error(s, ErrorCode.INTERNAL, f"internal error handling {msg.TYPE!r}", env.id)

    def _dispatch(self, s: _Session, env: Envelope, now: float) -> None:
        msg = env.message
        kind = type(msg)
        if kind is Bye:
            self._send(s, Ok(), env.id)
            self._close_later(s)
            return
        if kind is Hello:
            if s.state is not SessionState.NEW:
                raise _fail(ErrorCode.ALREADY_REGISTERED, "this session has already registered")
            self._on_hello(s, env, now)
            return
        if kind is AdminHello:
            if s.state is not SessionState.NEW:
                raise _fail(ErrorCode.ALREADY_REGISTERED, "this session has already registered")
            self._on_admin_hello(s, env, now)
            return
        if kind in (Ping, Clock):
            if s.state is SessionState.NEW:
                raise _fail(ErrorCode.NOT_REGISTERED, "send hello first")
            self._send(s, Pong(now_s=now), env.id)
            return
        node_handler = self._node_handlers.get(kind)
        if node_handler is not None:
            if s.state is not SessionState.NODE or s.node is None:
                raise _fail(ErrorCode.NOT_REGISTERED, f"{msg.TYPE!r} needs a registered node session")
            node_handler(s, self._nodes[s.node], env, now)
            return
        admin_handler = self._admin_handlers.get(kind)
        if admin_handler is not None:
            if s.state is not SessionState.ADMIN:
                raise _fail(ErrorCode.NOT_REGISTERED, f"{msg.TYPE!r} needs an admin session")
            admin_handler(s, env, now)
            return
        if s.state is SessionState.NEW:
            raise _fail(ErrorCode.NOT_REGISTERED, "send hello first")
        raise _fail(ErrorCode.UNKNOWN_TYPE, f"{msg.TYPE!r} is not a request the broker serves")

    # ================================================================== registration

    @staticmethod
    def _common_version(versions: tuple[int, ...] | list[int]) -> int:
        common = set(versions) & set(SUPPORTED_VERSIONS)
        if not common:
            raise _fail(
                ErrorCode.UNSUPPORTED_VERSION,
                f"no common protocol version (broker supports {list(SUPPORTED_VERSIONS)})",
            )
        return max(common)

    def _check_token(self, s: _Session, given: str, expected: bytes, what: str) -> None:
        if not hmac.compare_digest(given.encode("utf-8", "surrogatepass"), expected):
            log.warning("session %d: %s with a wrong token; closing", s.id, what)
            self._close_later(s)
            raise _fail(ErrorCode.UNAUTHORIZED, "wrong token")

    def _on_hello(self, s: _Session, env: Envelope, now: float) -> None:
        msg: Hello = env.message  # type: ignore[assignment]
        version = self._common_version(msg.versions)
        self._check_token(s, msg.token, self._node_token, f"hello for {msg.node[:64]!r}")
        node = self._nodes.get(msg.node)
        if node is None:
            raise _fail(ErrorCode.UNKNOWN_NODE, f"node {msg.node[:64]!r} is not in the scenario")
        if node.session is not None:
            raise _fail(ErrorCode.ALREADY_REGISTERED, f"node {msg.node!r} is already registered")
        node.session = s.id
        node.tcp, node.udp, node.control = msg.tcp, msg.udp, msg.control
        s.state = SessionState.NODE
        s.node = node.name
        links = []
        for peer in self.config.neighbours(node.name):
            lc = self._links[self._key(node.name, peer)].config
            links.append(
                LinkInfo(
                    peer=peer,
                    length_km=lc.length_km,
                    attenuation_db_per_km=lc.attenuation_db_per_km,
                    jitter_s=lc.jitter_s,
                    udp_loss=lc.udp_loss,
                    entanglement=lc.entanglement is not None,
                    qkd=self._qkd_info_for(self._links[self._key(node.name, peer)].qkd, node.name),
                )
            )
        self._send(
            s,
            Welcome(
                version=version,
                node=node.name,
                now_s=now,
                time_scale=self.config.time_scale,
                seed=node_seed(self.config.seed, node.name),
                memory_qubits=node.config.memory.qubits,
                links=links,
            ),
            env.id,
        )
        log.info("node %r registered (session %d)", node.name, s.id)
        for peer_name in self.config.neighbours(node.name):
            peer = self._nodes[peer_name]
            if not self._is_up(peer) or peer.tcp is None or peer.udp is None:
                continue
            self._send_to_node(peer_name, PeerUp(node=node.name, tcp=msg.tcp, udp=msg.udp))
            self._send(s, PeerUp(node=peer_name, tcp=peer.tcp, udp=peer.udp))

    def _on_admin_hello(self, s: _Session, env: Envelope, now: float) -> None:
        msg: AdminHello = env.message  # type: ignore[assignment]
        version = self._common_version(msg.versions)
        self._check_token(s, msg.token, self._admin_token, "admin_hello")
        s.state = SessionState.ADMIN
        log.info("admin session %d opened by %r", s.id, msg.client[:64])
        self._send(
            s,
            AdminWelcome(version=version, server="broker", now_s=now, time_scale=self.config.time_scale),
            env.id,
        )

    def _unregister(self, node: _Node, now: float) -> None:
        log.info("node %r left (session %s)", node.name, node.session)
        node.session = None
        node.tcp = node.udp = node.control = None
        node.listening.clear()
        for q in sorted(node.qubits):
            self._qubits.pop(q, None)
            self.registry.free(q)
        node.qubits.clear()
        for req in [r for r in self._requests.values() if node.name in r.ends()]:
            other = req.peer if req.initiator == node.name else req.initiator
            self._end_request(req, "peer_gone", now, notify=(other,))
        for link in self._links.values():
            q = link.qkd
            if q is None or node.name not in (q.transmitter, q.receiver):
                continue
            other = q.receiver if node.name == q.transmitter else q.transmitter
            self._qkd_stop(q, "peer_gone", now, notify=(other,))
            if node.name == q.receiver:
                q.listening = False
        for peer_name in self.config.neighbours(node.name):
            self._send_to_node(peer_name, PeerDown(node=node.name))

    # ================================================================== admin

    def _on_status(self, s: _Session, env: Envelope, now: float) -> None:
        nodes = [
            NodeStatus(name=n.name, registered=n.session is not None, control=n.control, tcp=n.tcp, udp=n.udp)
            for n in self._nodes.values()
        ]
        self._send(s, StatusReply(now_s=now, nodes=nodes), env.id)

    def _on_get_stats(self, s: _Session, env: Envelope, now: float) -> None:
        self._send(s, Stats(now_s=now, stats=self.statistics().as_dict()), env.id)

    def _on_shutdown(self, s: _Session, env: Envelope, now: float) -> None:
        log.info("shutdown requested by admin session %d", s.id)
        self.shutdown_requested = True
        self._send(s, Ok(), env.id)

    # ================================================================== qubits: helpers

    @staticmethod
    def _key(a: str, b: str) -> tuple[str, str]:
        return (a, b) if a <= b else (b, a)

    def _qubit_ids(self, raw: Any, field: str) -> list[int]:
        qs = [int(q) for q in raw]
        if len(set(qs)) != len(qs):
            raise _fail(ErrorCode.BAD_FIELD, f"field {field!r}: a qubit is listed twice")
        return qs

    def _owned(self, node: _Node, q: int) -> _Qubit:
        rec = self._qubits.get(q)
        if rec is None:
            raise _fail(ErrorCode.UNKNOWN_QUBIT, f"qubit {q} does not exist")
        if rec.owner != node.name:
            raise _fail(ErrorCode.NOT_OWNER, f"qubit {q} is not in {node.name!r}'s memory")
        return rec

    def _refresh(self, node: _Node, q: int, now: float) -> None:
        """Lazy T1/T2 decoherence up to `now` (DESIGN §3)."""
        rec = self._qubits[q]
        elapsed = now - rec.stamp_s
        rec.stamp_s = max(rec.stamp_s, now)
        if elapsed <= 0.0:
            return
        mem = node.config.memory
        if math.isinf(mem.t1_s) and math.isinf(mem.t2_s):
            return
        kraus = memory_decay_kraus(elapsed, mem.t1_s, mem.t2_s)
        if len(kraus) > 1:
            self.registry.apply_kraus(q, kraus)

    def _add_qubit(self, node: _Node, q: int, stamp_s: float) -> None:
        self._qubits[q] = _Qubit(owner=node.name, stamp_s=stamp_s)
        node.qubits.add(q)

    def _release(self, node: _Node, qs: list[int], now: float) -> None:
        for q in qs:
            node.qubits.discard(q)
            del self._qubits[q]
            self.registry.free(q)
        if qs:
            self._resume_paused(now)

    def _gate_matrix(self, op: GateOp) -> np.ndarray:
        arity = GATE_ARITY.get(op.name)
        if arity is None:
            raise _fail(ErrorCode.UNKNOWN_GATE, f"gate {op.name[:32]!r} is not in the gate set")
        n_qubits, n_params = arity
        if len(op.qubits) != n_qubits:
            raise _fail(ErrorCode.BAD_FIELD, f"gate {op.name!r} takes {n_qubits} qubit(s), got {len(op.qubits)}")
        if len(op.params) != n_params:
            raise _fail(ErrorCode.BAD_FIELD, f"gate {op.name!r} takes {n_params} parameter(s), got {len(op.params)}")
        if len(set(op.qubits)) != len(op.qubits):
            raise _fail(ErrorCode.BAD_FIELD, f"gate {op.name!r} lists a qubit twice")
        if n_params:
            theta = op.params[0]
            if not math.isfinite(theta):
                raise _fail(ErrorCode.BAD_FIELD, f"gate {op.name!r}: parameter must be finite")
            key = (op.name, theta, math.copysign(1.0, theta) < 0)  # -0.0 and 0.0 kept apart
            u = self._rotations.get(key)
            if u is None:
                if len(self._rotations) >= _ROTATION_CACHE_SIZE:
                    self._rotations.clear()
                u = rotation(op.name[1], theta)  # "rx" -> axis "x"
                u.setflags(write=False)
                self._rotations[key] = u
            return u
        return GATES[op.name.upper()]

    def _apply(self, node: _Node, qubits: list[int] | tuple[int, ...], u: np.ndarray) -> None:
        if len(qubits) == 1:
            self.registry.apply_1q(qubits[0], u)
        else:
            self.registry.apply_2q(qubits[0], qubits[1], u)
        if node.gate_kraus is not None:
            for q in qubits:
                self.registry.apply_kraus(q, node.gate_kraus)

    def _check_merge(self, groups: list[tuple[int, ...]]) -> None:
        """Refuse (before anything is applied) gates whose registers would grow past the limit.

        Union-find over the registers the gates touch, keyed by each register's first
        qubit (registers are disjoint, so that names it uniquely).
        """
        limit = self.config.limits.max_register_qubits
        parent: dict[int, int] = {}
        size: dict[int, int] = {}

        def find(x: int) -> int:
            while parent[x] != x:
                x = parent[x]
            return x

        def rep(q: int) -> int:
            reg = self.registry.register_of(q)
            r = reg[0]
            if r not in parent:
                parent[r] = r
                size[r] = len(reg)
            return find(r)

        for qs in groups:
            if len(qs) < 2:
                continue
            a, b = rep(qs[0]), rep(qs[1])
            if a == b:
                continue
            total = size[a] + size[b]
            if total > limit:
                raise _fail(ErrorCode.NO_RESOURCE, f"gate would entangle {total} qubits (register limit {limit})")
            parent[b] = a
            size[a] = total

    # ================================================================== qubits: handlers

    def _on_alloc(self, s: _Session, node: _Node, env: Envelope, now: float) -> None:
        msg: Alloc = env.message  # type: ignore[assignment]
        if msg.count < 1:
            raise _fail(ErrorCode.BAD_FIELD, f"field 'count': must be >= 1, got {msg.count}")
        if msg.count > node.room:
            raise _fail(
                ErrorCode.NO_RESOURCE,
                f"{node.name!r} has {node.room} free qubit(s) of {node.config.memory.qubits}, asked for {msg.count}",
            )
        qs = []
        for _ in range(msg.count):
            q = self.registry.allocate()
            self._add_qubit(node, q, now)
            qs.append(q)
        self._send(s, Allocated(qubits=np.asarray(qs, dtype=np.int64)), env.id)

    def _on_free(self, s: _Session, node: _Node, env: Envelope, now: float) -> None:
        msg: Free = env.message  # type: ignore[assignment]
        qs = self._qubit_ids(msg.qubits, "qubits")
        for q in qs:
            self._owned(node, q)
        self._release(node, qs, now)
        self._send(s, Ok(), env.id)

    def _validate_ops(self, node: _Node, ops: tuple[GateOp, ...] | list[GateOp]) -> list[tuple[tuple[int, ...], np.ndarray]]:
        plan = []
        for op in ops:
            u = self._gate_matrix(op)
            qs = tuple(int(q) for q in op.qubits)
            for q in qs:
                self._owned(node, q)
            plan.append((qs, u))
        self._check_merge([qs for qs, _ in plan])
        return plan

    def _run_plan(self, node: _Node, plan: list[tuple[tuple[int, ...], np.ndarray]], now: float) -> None:
        for q in sorted({q for qs, _ in plan for q in qs}):
            self._refresh(node, q, now)
        for qs, u in plan:
            self._apply(node, qs, u)

    def _on_gate(self, s: _Session, node: _Node, env: Envelope, now: float) -> None:
        msg: Gate = env.message  # type: ignore[assignment]
        self._run_plan(node, self._validate_ops(node, [msg.op]), now)
        self._send(s, Ok(), env.id)

    def _on_circuit(self, s: _Session, node: _Node, env: Envelope, now: float) -> None:
        msg: Circuit = env.message  # type: ignore[assignment]
        if len(msg.ops) > self.config.limits.max_ops_per_circuit:
            raise _fail(ErrorCode.BAD_FIELD, f"field 'ops': more than {self.config.limits.max_ops_per_circuit} gates")
        # Atomic: every op is validated (names, arity, ownership, register growth) first.
        self._run_plan(node, self._validate_ops(node, msg.ops), now)
        self._send(s, Ok(), env.id)

    def _on_unitary(self, s: _Session, node: _Node, env: Envelope, now: float) -> None:
        msg: Unitary = env.message  # type: ignore[assignment]
        qs = tuple(int(q) for q in msg.qubits)
        if len(qs) not in (1, 2) or len(set(qs)) != len(qs):
            raise _fail(ErrorCode.BAD_FIELD, "field 'qubits': one or two distinct qubits")
        d = 1 << len(qs)
        if len(msg.matrix) != 16 * d * d:
            raise _fail(ErrorCode.BAD_FIELD, f"field 'matrix': {d}x{d} complex128 is {16 * d * d} bytes")
        u = np.frombuffer(msg.matrix, dtype="<c16").reshape(d, d).astype(np.complex128)
        if not np.isfinite(u).all() or not np.allclose(u @ u.conj().T, np.eye(d), atol=_UNITARY_ATOL):
            raise _fail(ErrorCode.BAD_FIELD, "field 'matrix': not a unitary")
        for q in qs:
            self._owned(node, q)
        self._check_merge([qs])
        self._run_plan(node, [(qs, u)], now)
        self._send(s, Ok(), env.id)

    def _on_measure(self, s: _Session, node: _Node, env: Envelope, now: float) -> None:
        msg: Measure = env.message  # type: ignore[assignment]
        qs = self._qubit_ids(msg.qubits, "qubits")
        if not qs:
            raise _fail(ErrorCode.BAD_FIELD, "field 'qubits': empty")
        bases_raw = [int(b) for b in msg.bases]
        if len(bases_raw) == 1:
            bases_raw *= len(qs)
        if len(bases_raw) != len(qs):
            raise _fail(ErrorCode.BAD_FIELD, "field 'bases': one basis, or one per qubit")
        try:
            bases = [Basis(b) for b in bases_raw]
        except ValueError:
            raise _fail(ErrorCode.BAD_FIELD, "field 'bases': codes are 0=Z, 1=X, 2=Y") from None
        for q in qs:
            self._owned(node, q)
        # One uniform draw per qubit, in order (Generator.random(n) yields the same numbers
        # as n calls); the registry measures the batch in as few kernel calls as it can.
        draws = node.rng.random(len(qs))
        outcomes = self.registry.measure_many(qs, bases, draws, before=lambda q: self._refresh(node, q, now))
        if msg.free:
            self._release(node, qs, now)
        self._send(s, Measured(outcomes=outcomes, now_s=now), env.id)

    # ================================================================== links: helpers

    def _link_to(self, node: _Node, peer: str) -> _Link:
        if peer not in self._nodes:
            raise _fail(ErrorCode.UNKNOWN_NODE, f"node {peer[:64]!r} is not in the scenario")
        link = self._links.get(self._key(node.name, peer))
        if link is None:
            raise _fail(ErrorCode.NO_LINK, f"no link between {node.name!r} and {peer!r}")
        return link

    # ================================================================== send_qubit

    def _on_send_qubit(self, s: _Session, node: _Node, env: Envelope, now: float) -> None:
        msg: SendQubit = env.message  # type: ignore[assignment]
        link = self._link_to(node, msg.peer)
        q = int(msg.qubit)
        rec = self._owned(node, q)
        self._refresh(node, q, now)
        rec.owner = None  # in flight: nobody may touch it
        node.qubits.discard(q)
        # Fibre loss: each photon survives independently with the transmittance
        # (Ma et al., PRA 72, 012326 (2005), Sec. II), drawn now from the link's stream.
        # A cut fibre loses it (decided at sending: a qubit already in flight arrives).
        arrives = bool(link.qubit_rng.random() < link.transmittance) and not link.fibre_cut
        self._qubits_sent += 1
        self._schedule(now + link.delay_s, _Kind.ARRIVAL, _Transfer(q, node.name, msg.peer, arrives))
        self._send(s, Ok(), env.id)
        self._resume_paused(now)

    def _on_arrival(self, tr: _Transfer, t: float) -> None:
        receiver = self._nodes[tr.receiver]
        arrived = tr.arrives and self._is_up(receiver) and receiver.room > 0
        rec = self._qubits[tr.qubit]
        if arrived:
            rec.owner = receiver.name
            rec.stamp_s = t
            receiver.qubits.add(tr.qubit)
        else:
            self._qubits_lost += 1
            del self._qubits[tr.qubit]
            self.registry.free(tr.qubit)
        event = QubitTransfer(qubit=tr.qubit, sender=tr.sender, receiver=tr.receiver, arrived=arrived, now_s=t)
        self._send_to_node(tr.sender, event)
        self._send_to_node(tr.receiver, event)

    # ================================================================== heralded entanglement

    def _on_epr_listen(self, s: _Session, node: _Node, env: Envelope, now: float) -> None:
        msg: EprListen = env.message  # type: ignore[assignment]
        self._link_to(node, msg.peer)
        if msg.accept:
            node.listening.add(msg.peer)
        else:
            node.listening.discard(msg.peer)
        self._send(s, Ok(), env.id)

    def _open_requests(self, name: str) -> int:
        return sum(1 for r in self._requests.values() if name in r.ends())

    def _on_epr_request(self, s: _Session, node: _Node, env: Envelope, now: float) -> None:
        msg: EprRequest = env.message  # type: ignore[assignment]
        limits = self.config.limits
        if not (1 <= msg.pairs <= limits.max_pairs_per_request):
            raise _fail(ErrorCode.BAD_FIELD, f"field 'pairs': must be in [1, {limits.max_pairs_per_request}]")
        link = self._link_to(node, msg.peer)
        peer = self._nodes[msg.peer]
        if link.model is None or link.model.p_success <= 0.0:
            raise _fail(ErrorCode.REFUSED, f"no heralded entanglement on the link to {msg.peer!r}")
        if not self._is_up(peer):
            raise _fail(ErrorCode.REFUSED, f"{msg.peer!r} is not registered")
        if node.name not in peer.listening:
            raise _fail(ErrorCode.REFUSED, f"{msg.peer!r} is not listening for pairs from {node.name!r}")
        for name in (node.name, peer.name):
            if self._open_requests(name) >= limits.max_open_epr_requests_per_node:
                raise _fail(
                    ErrorCode.NO_RESOURCE,
                    f"{name!r} already takes part in {limits.max_open_epr_requests_per_node} open requests",
                )
        req = _EprRequest(
            id=next(self._request_ids),
            initiator=node.name,
            peer=peer.name,
            link=link,
            pairs=msg.pairs,
            last_herald_s=now,
        )
        self._requests[req.id] = req
        self._send(s, EprAccepted(request=req.id, now_s=now), env.id)
        self._schedule_herald(req)

    def _schedule_herald(self, req: _EprRequest) -> None:
        model = req.link.model
        assert model is not None
        # Attempts are i.i.d. Bernoulli(p): the count to the next success is geometric
        # (emulator.physics.heralding), each attempt lasting T = L * 4.9 us/km.
        attempts = int(sample_attempts(req.link.epr_rng, model.p_success, 1)[0])
        self._schedule(req.last_herald_s + attempts * model.attempt_period_s, _Kind.HERALD, (req.id, req.generation))

    def _on_herald(self, payload: tuple[int, int], t: float) -> None:
        rid, generation = payload
        req = self._requests.get(rid)
        if req is None or req.generation != generation:
            return  # cancelled, ended or paused since this timer was armed
        if req.link.fibre_cut:  # (the cut pauses requests at once; kept as a guard)
            req.paused = True
            req.generation += 1
            return
        a, b = self._nodes[req.initiator], self._nodes[req.peer]
        if a.room < 1 or b.room < 1:
            req.paused = True
            req.generation += 1
            return
        model = req.link.model
        assert model is not None
        rng = req.link.epr_rng
        bell = model.bells[int(rng.integers(len(model.bells)))]
        qa, qb = self.registry.allocate_state(np.ascontiguousarray(model.state_for(bell)))
        self._add_qubit(a, qa, t)
        self._add_qubit(b, qb, t)
        req.batch.append((next(self._pair_ids), qa, qb, int(bell), t))
        req.heralded += 1
        req.last_herald_s = t
        req.link.pairs_delivered += 1
        self._dirty_requests[req.id] = req
        if req.heralded < req.pairs:
            self._schedule_herald(req)

    def _resume_paused(self, now: float) -> None:
        for req in self._requests.values():
            if req.link.fibre_cut:
                continue
            if req.paused and self._nodes[req.initiator].room > 0 and self._nodes[req.peer].room > 0:
                req.paused = False
                req.last_herald_s = max(req.last_herald_s, now)
                self._schedule_herald(req)

    def _flush_batches(self) -> None:
        """One `epr_delivered` per end per request for everything heralded so far."""
        if not self._dirty_requests:
            return
        dirty, self._dirty_requests = self._dirty_requests, {}
        for req in sorted(dirty.values(), key=lambda r: r.id):
            batch, req.batch = req.batch, []
            # One message per end for the whole batch; only a batch above the frame-safe
            # size (max_pairs_per_delivery) is split into consecutive messages.
            step = self.config.limits.max_pairs_per_delivery
            for start in range(0, len(batch), step):
                self._deliver(req, batch[start : start + step])
            if req.heralded >= req.pairs and req.id in self._requests:
                self._end_request(req, "complete", req.last_herald_s, notify=req.ends())

    def _deliver(self, req: _EprRequest, batch: list[tuple[int, int, int, int, float]]) -> None:
        n = len(batch)
        ids = np.fromiter((p[0] for p in batch), dtype=np.int64, count=n)
        bells = np.fromiter((p[3] for p in batch), dtype=np.uint8, count=n)
        heralds = np.fromiter((p[4] for p in batch), dtype=np.float64, count=n)
        for end, other, col in ((req.initiator, req.peer, 1), (req.peer, req.initiator, 2)):
            self._send_to_node(
                end,
                EprDelivered(
                    request=req.id,
                    initiator=req.initiator,
                    peer=other,
                    pair_ids=ids,
                    qubits=np.fromiter((p[col] for p in batch), dtype=np.int64, count=n),
                    bell=bells,
                    herald_s=heralds,
                ),
            )

    def _end_request(self, req: _EprRequest, reason: str, now: float, *, notify: tuple[str, ...]) -> None:
        self._requests.pop(req.id, None)
        self._dirty_requests.pop(req.id, None)
        req.generation += 1
        a, b = req.ends()
        for name in notify:
            other = b if name == a else a
            self._send_to_node(
                name,
                EprDone(
                    request=req.id, initiator=req.initiator, peer=other,
                    delivered=req.heralded, reason=reason, now_s=now,
                ),  # fmt: skip
            )

    def _on_epr_cancel(self, s: _Session, node: _Node, env: Envelope, now: float) -> None:
        msg: EprCancel = env.message  # type: ignore[assignment]
        req = self._requests.get(msg.request)
        if req is None or node.name not in req.ends():
            raise _fail(ErrorCode.BAD_FIELD, f"field 'request': no open request {msg.request} of {node.name!r}")
        self._send(s, Ok(), env.id)
        self._end_request(req, "cancelled", now, notify=req.ends())

    # ================================================================== QKD optical layer

    def _make_qkd(self, lc: LinkConfig, backend: Backend) -> _Qkd | None:
        qc = lc.qkd
        if qc is None:
            return None
        transmitter, receiver = qc.transmitter, lc.qkd_receiver
        assert receiver is not None
        alice_key, channel_key = link_keys(self.config.seed, transmitter, receiver)
        optics = qc.optics
        thresholds = optics.choice_thresholds()
        i, p = optics.intensities, optics.class_probabilities
        bob_z = optics.basis_z_probability if optics.bob_basis_z_probability is None else optics.bob_basis_z_probability
        info = QkdLinkInfo(
            transmitter=transmitter,
            receiver=receiver,
            pulse_rate_hz=optics.pulse_rate_hz,
            mu_signal=i.signal,
            mu_decoy=i.decoy,
            mu_vacuum=i.vacuum,
            p_signal=float(p[0]),
            p_decoy=float(p[1]),
            p_vacuum=float(p[2]),
            basis_z_probability=optics.basis_z_probability,
            bob_basis_z_probability=bob_z,
            threshold_signal=thresholds.signal,
            threshold_signal_or_decoy=thresholds.signal_or_decoy,
            threshold_basis_z=thresholds.basis_z,
            attenuation_db_per_km=optics.attenuation_db_per_km,
            receiver_efficiency=optics.receiver_efficiency,
            dark_count_probability=optics.dark_count_probability,
            misalignment_error=optics.misalignment_error,
            dead_time_s=optics.dead_time_s,
        )
        return _Qkd(
            key=lc.key,
            transmitter=transmitter,
            receiver=receiver,
            optical=OpticalLink(optics, alice_key=alice_key, channel_key=channel_key, backend=backend),
            info=info,
            alice_key=alice_key.to_bytes(8, "little"),
            auth_key=self._secret_bytes(QKD_AUTH_KEY_BYTES),
            slice_pulses=max(1, round(self.config.qkd_slice_s * optics.pulse_rate_hz)),
        )

    @staticmethod
    def _qkd_info_for(q: _Qkd | None, name: str) -> QkdLinkInfo | None:
        """The link's public QKD parameters; the transmitter's copy adds alice_key."""
        if q is None:
            return None
        if name == q.transmitter:
            return dataclasses.replace(q.info, alice_key=q.alice_key, auth_key=q.auth_key)
        return dataclasses.replace(q.info, auth_key=q.auth_key)

    def _qkd_link_to(self, node: _Node, peer: str) -> _Qkd:
        link = self._link_to(node, peer)
        if link.qkd is None:
            raise _fail(ErrorCode.REFUSED, f"no QKD on the link between {node.name!r} and {peer!r}")
        return link.qkd

    def _on_qkd_listen(self, s: _Session, node: _Node, env: Envelope, now: float) -> None:
        msg: QkdListen = env.message  # type: ignore[assignment]
        q = self._qkd_link_to(node, msg.peer)
        if node.name != q.receiver:
            raise _fail(ErrorCode.REFUSED, f"{node.name!r} transmits on this QKD link; only {q.receiver!r} listens")
        q.listening = msg.accept
        self._send(s, Ok(), env.id)
        if not msg.accept:
            self._qkd_stop(q, "withdrawn", now, notify=(q.transmitter, q.receiver))

    def _on_qkd_start(self, s: _Session, node: _Node, env: Envelope, now: float) -> None:
        msg: QkdStart = env.message  # type: ignore[assignment]
        q = self._qkd_link_to(node, msg.peer)
        if node.name != q.transmitter:
            raise _fail(ErrorCode.REFUSED, f"{node.name!r} receives on this QKD link; only {q.transmitter!r} emits")
        if not self._is_up(self._nodes[q.receiver]):
            raise _fail(ErrorCode.REFUSED, f"{q.receiver!r} is not registered")
        if not q.listening:
            raise _fail(ErrorCode.REFUSED, f"{q.receiver!r} is not listening for QKD pulses from {node.name!r}")
        if q.optical.next_pulse >= MAX_PULSE_INDEX:
            raise _fail(ErrorCode.NO_RESOURCE, "the link has used every pulse index (2**53)")
        self._send(s, Ok(), env.id)
        if q.running:
            return  # already emitting: starting again changes nothing
        q.running = True
        q.generation += 1
        q.window_start_s = now
        q.window_first_pulse = q.optical.next_pulse
        log.info("qkd %s -> %s: emitting from pulse %d", q.transmitter, q.receiver, q.window_first_pulse)
        self._qkd_schedule(q)

    def _on_qkd_stop(self, s: _Session, node: _Node, env: Envelope, now: float) -> None:
        msg: QkdStop = env.message  # type: ignore[assignment]
        q = self._qkd_link_to(node, msg.peer)
        if node.name != q.transmitter:
            raise _fail(ErrorCode.REFUSED, f"{node.name!r} receives on this QKD link; only {q.transmitter!r} stops it")
        self._send(s, Ok(), env.id)
        self._qkd_stop(q, "stopped", now, notify=(q.transmitter, q.receiver))

    def _qkd_stop(self, q: _Qkd, reason: str, now: float, *, notify: tuple[str, ...]) -> None:
        """Emit up to `now`, stop, and tell `notify` (nothing if not running)."""
        if not q.running:
            return
        self._qkd_emit(q, q.pulses_before(now), now)
        q.running = False
        q.generation += 1
        log.info("qkd %s -> %s: stopped at pulse %d (%s)", q.transmitter, q.receiver, q.optical.next_pulse, reason)
        for name in notify:
            other = q.receiver if name == q.transmitter else q.transmitter
            self._send_to_node(
                name,
                QkdStopped(
                    transmitter=q.transmitter, peer=other, end_pulse=q.optical.next_pulse, reason=reason, now_s=now
                ),
            )

    def _qkd_schedule(self, q: _Qkd) -> None:
        boundary = min(q.optical.next_pulse + q.slice_pulses, MAX_PULSE_INDEX)
        if boundary <= q.optical.next_pulse:
            return  # every pulse index used: nothing more to emit
        self._schedule(q.time_of(boundary), _Kind.QKD_SLICE, (q.key, q.generation, boundary))

    def _on_qkd_slice(self, payload: tuple[tuple[str, str], int, int], t: float) -> None:
        key, generation, boundary = payload
        q = self._links[key].qkd
        if q is None or not q.running or q.generation != generation:
            return
        self._qkd_emit(q, boundary, t)
        self._qkd_schedule(q)

    def _qkd_emit(self, q: _Qkd, end: int, now: float) -> None:
        """Decide pulses [next_pulse, end) in slices; push detections to the receiver and
        progress to the transmitter."""
        optical = q.optical
        if end <= optical.next_pulse:
            return
        while optical.next_pulse < end:
            target = min(end, optical.next_pulse + q.slice_pulses)
            while True:
                batch = optical.advance_to_pulse(target, max_detections=self._qkd_batch)
                if self._backlog_bytes(q.receiver) > self.config.limits.max_qkd_backlog_bytes:
                    # The receiver is not reading: its detections of this range are lost
                    # (docs/protocol.md §4.7), the session lives on.
                    if not q.overflowing:
                        log.warning("qkd %s -> %s: the receiver is not reading; dropping detections",
                                    q.transmitter, q.receiver)  # fmt: skip
                    q.overflowing = True
                    q.dropped_events += 1
                    q.dropped_pulses += batch.end_pulse - batch.first_pulse
                    q.dropped_detections += len(batch.for_receiver().pulse)
                    if batch.complete:
                        break
                    continue
                q.overflowing = False
                rec = batch.for_receiver()
                self._send_to_node(
                    q.receiver,
                    QkdDetections(
                        peer=q.transmitter,
                        first_pulse=batch.first_pulse,
                        end_pulse=batch.end_pulse,
                        pulse=rec.pulse,
                        basis=rec.basis,
                        outcome=rec.outcome,
                        double_click=rec.double_click,
                        now_s=q.time_of(batch.end_pulse),
                    ),
                )
                if batch.complete:
                    break
        self._send_to_node(q.transmitter, QkdEmitted(peer=q.receiver, end_pulse=optical.next_pulse, now_s=now))

    def _on_qkd_eve(self, s: _Session, env: Envelope, now: float) -> None:
        msg: QkdEve = env.message  # type: ignore[assignment]
        link = self._admin_link(msg.endpoints)
        a, b = msg.endpoints
        q = link.qkd
        if q is None:
            raise _fail(ErrorCode.REFUSED, f"no QKD on the link between {a!r} and {b!r}")
        try:
            eve = Eavesdropper(
                intercept_fraction=msg.intercept_fraction,
                resend_photons=msg.resend_photons,
                pns=msg.pns,
                pns_multi_forward=msg.pns_multi_forward,
                pns_single_block=msg.pns_single_block,
            )
        except (KernelError, ValueError) as exc:
            raise _fail(ErrorCode.BAD_FIELD, f"qkd_eve: {exc}") from None
        if q.running:
            self._qkd_emit(q, q.pulses_before(now), now)  # the switch applies from the next pulse
        q.optical.set_eavesdropper(eve)
        log.info("qkd %s -> %s: eavesdropper %s from pulse %d", q.transmitter, q.receiver, eve, q.optical.next_pulse)
        self._send(s, Ok(), env.id)

    def _on_fibre_cut(self, s: _Session, env: Envelope, now: float) -> None:
        """Cut or splice a link's fibre. Heralding attempts need the fibre, so a cut pauses
        every request on the link (its pending herald is dropped) and a splice resumes
        them from now — attempts are memoryless, so the waiting time to the next herald
        after the splice has the same law as from any other instant. The QKD layer emits
        up to now first, so the cut applies exactly from the next pulse."""
        msg: FibreCut = env.message  # type: ignore[assignment]
        link = self._admin_link(msg.endpoints)
        cut = bool(msg.cut)
        if link.fibre_cut != cut:
            link.fibre_cut = cut
            a, b = link.config.key
            if cut:
                link.fibre_cuts += 1
                for req in self._requests.values():
                    if req.link is link and not req.paused:
                        req.paused = True
                        req.generation += 1
            q = link.qkd
            if q is not None:
                if q.running:
                    self._qkd_emit(q, q.pulses_before(now), now)
                q.optical.set_fibre_cut(cut)
            log.warning("fibre %s|%s %s", a, b, "cut" if cut else "spliced")
            if not cut:
                self._resume_paused(now)
        self._send(s, Ok(), env.id)

    def _admin_link(self, endpoints: list[str]) -> _Link:
        """The link an admin request names by its two ends (typed errors otherwise)."""
        if len(endpoints) != 2:
            raise _fail(ErrorCode.BAD_FIELD, "field 'endpoints': two node names")
        a, b = endpoints
        for name in (a, b):
            if name not in self._nodes:
                raise _fail(ErrorCode.UNKNOWN_NODE, f"node {name[:64]!r} is not in the scenario")
        link = self._links.get(self._key(a, b)) if a != b else None
        if link is None:
            raise _fail(ErrorCode.NO_LINK, f"no link between {a!r} and {b!r}")
        return link

    @staticmethod
    def _qkd_stats(q: _Qkd) -> dict[str, Any]:
        st = q.optical.statistics()
        return {
            "transmitter": q.transmitter,
            "receiver": q.receiver,
            "listening": q.listening,
            "running": q.running,
            "pulses": st.pulses,
            "detections": st.detections,
            "double_clicks": st.double_clicks,
            "detections_per_class": list(st.detections_per_class),
            "eve": dataclasses.asdict(st.eve),
            "eavesdropper": dataclasses.asdict(q.optical.eavesdropper),
            "backlog_dropped_events": q.dropped_events,
            "backlog_dropped_pulses": q.dropped_pulses,
            "backlog_dropped_detections": q.dropped_detections,
        }
