"""The message types of wire protocol version 1 (docs/protocol.md §4 is normative).

Three kinds of session share one codec and framing:

* node ⇄ broker — `hello`/`welcome`, quantum operations, pushed events;
* admin ⇄ broker and orchestrator ⇄ node control endpoint — `admin_hello` and friends;
* node ⇄ node classical links — `link_hello`, `app_msg`, and UDP `probe`/`probe_ack`.

Requests carry an envelope `id`; the answer carries `re` = that id and is either the
reply type named below or `error`. Events (pushed, unsolicited) carry `re` absent.
Field names `v`, `t`, `id`, `re` are reserved for the envelope.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ._codec import Address, F64Array, I64Array, Message, Struct, U8Array, U64Array, omit_if_none, register
from ._errors import ErrorCode

_frozen = dataclasses.dataclass(frozen=True, slots=True)

# --------------------------------------------------------------------------- generic


@register
@_frozen
class Ok(Message):
    """Success reply to a request that returns nothing else."""

    TYPE = "ok"


@register
@_frozen
class Error(Message):
    """Failure reply (or, with no `re`, a fatal notice before the sender closes)."""

    TYPE = "error"
    code: str
    message: str

    @classmethod
    def of(cls, code: ErrorCode, message: str) -> Error:
        return cls(code=code.value, message=message)


@register
@_frozen
class Ping(Message):
    """Liveness/latency request; answered by `pong` with the responder's clock."""

    TYPE = "ping"


@register
@_frozen
class Pong(Message):
    TYPE = "pong"
    now_s: float  # responder's emulated time


@register
@_frozen
class Bye(Message):
    """Graceful end of session; the receiver releases the sender's resources and closes."""

    TYPE = "bye"


# --------------------------------------------------------------------------- node ⇄ broker: session


@_frozen
class QkdLinkInfo(Struct):
    """The public parameters of a link's QKD optical layer (docs/protocol.md §4.7).

    Everything Alice and Bob need for sifting and estimation; `alice_key` (8 bytes, the
    little-endian unsigned 64-bit key of Alice's choices) only in the transmitter's copy.
    The thresholds are those of emulator.kernels.ChoiceThresholds, given exactly.
    """

    transmitter: str
    receiver: str
    pulse_rate_hz: float
    mu_signal: float
    mu_decoy: float
    mu_vacuum: float
    p_signal: float
    p_decoy: float
    p_vacuum: float
    basis_z_probability: float  # Alice's P(Z)
    bob_basis_z_probability: float  # Bob's P(Z)
    threshold_signal: int
    threshold_signal_or_decoy: int
    threshold_basis_z: int
    attenuation_db_per_km: float
    receiver_efficiency: float
    dark_count_probability: float
    misalignment_error: float
    dead_time_s: float
    alice_key: bytes | None = dataclasses.field(default=None, repr=False)  # secret
    # Both ends: the pre-shared key that authenticates the link's post-processing until
    # its own key pool takes over (nodes/qkd/authentication.py); secret, never logged.
    auth_key: bytes | None = dataclasses.field(default=None, repr=False)


@_frozen
class LinkInfo(Struct):
    """One link of the registering node, as the broker tells it in `welcome`."""

    peer: str
    length_km: float
    attenuation_db_per_km: float
    jitter_s: float  # classical link shaper: uniform jitter added to the fibre delay
    udp_loss: float  # classical link shaper: probability a UDP datagram is dropped
    entanglement: bool  # heralded entanglement is configured on this link
    qkd: QkdLinkInfo | None = omit_if_none()  # the link's QKD optical layer; not sent when absent


@register
@_frozen
class Hello(Message):
    """First frame of a node session. `tcp`/`udp`/`control` are where the node listens."""

    TYPE = "hello"
    node: str
    token: str = dataclasses.field(repr=False)
    versions: list[int]
    capabilities: list[str]
    tcp: Address
    udp: Address
    control: Address | None = None


@register
@_frozen
class Welcome(Message):
    """Reply to `hello`: the broker's clock, the node's seed, links and memory (DESIGN §3, §4)."""

    TYPE = "welcome"
    version: int
    node: str
    now_s: float  # emulated time when sent; t_emulated = now_s + (monotonic() - t_recv)/time_scale
    time_scale: float  # wall seconds per emulated second
    seed: int  # this node's own seed (derived from the run seed and the node name)
    memory_qubits: int
    links: list[LinkInfo]


@register
@_frozen
class PeerUp(Message):
    """Event: a neighbour registered (also sent at registration for neighbours already up)."""

    TYPE = "peer_up"
    node: str
    tcp: Address
    udp: Address


@register
@_frozen
class PeerDown(Message):
    """Event: a neighbour's broker session ended."""

    TYPE = "peer_down"
    node: str


# --------------------------------------------------------------------------- node ⇄ broker: quantum operations


@register
@_frozen
class Alloc(Message):
    """Allocate `count` qubits in |0> in this node's memory. Reply: `allocated`."""

    TYPE = "alloc"
    count: int


@register
@_frozen
class Allocated(Message):
    TYPE = "allocated"
    qubits: I64Array


@register
@_frozen
class Free(Message):
    """Release qubits (traced out). Reply: `ok`."""

    TYPE = "free"
    qubits: I64Array


@_frozen
class GateOp(Struct):
    """One gate from the closed gate set (docs/protocol.md §4.3); `params` in radians."""

    name: str
    qubits: list[int]
    params: list[float] = ()  # type: ignore[assignment]


@register
@_frozen
class Gate(Message):
    """Apply one gate. Reply: `ok`."""

    TYPE = "gate"
    op: GateOp


@register
@_frozen
class Circuit(Message):
    """Apply gates in order, atomically: on an error no gate is applied. Reply: `ok`."""

    TYPE = "circuit"
    ops: list[GateOp]


@register
@_frozen
class Unitary(Message):
    """Apply an arbitrary 1- or 2-qubit unitary; `matrix` is packed complex128 row-major. Reply: `ok`."""

    TYPE = "unitary"
    qubits: list[int]
    matrix: bytes


@register
@_frozen
class Measure(Message):
    """Measure qubits; `bases` has one Basis code per qubit (0=Z, 1=X, 2=Y) or a single code for all.

    With `free` the qubits are released after measurement. Reply: `measured`.
    """

    TYPE = "measure"
    qubits: I64Array
    bases: U8Array
    free: bool = False


@register
@_frozen
class Measured(Message):
    TYPE = "measured"
    outcomes: U8Array
    now_s: float


@register
@_frozen
class SendQubit(Message):
    """Send a qubit into the fibre towards `peer`. Reply: `ok`; later a `qubit_transfer` event to both ends."""

    TYPE = "send_qubit"
    qubit: int
    peer: str


@register
@_frozen
class QubitTransfer(Message):
    """Event to sender and receiver: the qubit arrived (now owned by `receiver`) or was lost in the fibre."""

    TYPE = "qubit_transfer"
    qubit: int
    sender: str
    receiver: str
    arrived: bool
    now_s: float


@register
@_frozen
class EprListen(Message):
    """Consent (or withdraw consent) to entanglement requests from `peer`. Reply: `ok`."""

    TYPE = "epr_listen"
    peer: str
    accept: bool


@register
@_frozen
class EprRequest(Message):
    """Ask for `pairs` heralded pairs with `peer`. Reply: `epr_accepted`, or `error` `refused`."""

    TYPE = "epr_request"
    peer: str
    pairs: int


@register
@_frozen
class EprAccepted(Message):
    TYPE = "epr_accepted"
    request: int  # broker-assigned request number, shared by both ends' events
    now_s: float


@register
@_frozen
class EprDelivered(Message):
    """Event to both ends: heralded pairs, batched. Arrays are parallel, one entry per pair."""

    TYPE = "epr_delivered"
    request: int
    initiator: str
    peer: str  # the other end, from the receiver's point of view
    pair_ids: I64Array
    qubits: I64Array  # the receiver's half of each pair
    bell: U8Array  # BellState code per pair: 0=Φ+, 1=Φ−, 2=Ψ+, 3=Ψ−
    herald_s: F64Array  # emulated herald time per pair


@register
@_frozen
class EprDone(Message):
    """Event to both ends: a request finished (all pairs delivered, or cancelled/aborted)."""

    TYPE = "epr_done"
    request: int
    initiator: str
    peer: str  # the other end, from the receiver's point of view (routes it like epr_delivered)
    delivered: int
    reason: str  # "complete" | "cancelled" | "peer_gone"
    now_s: float


@register
@_frozen
class EprCancel(Message):
    """Cancel an unfinished request. Reply: `ok`."""

    TYPE = "epr_cancel"
    request: int


# --------------------------------------------------------------------------- node ⇄ broker: QKD optical layer


@register
@_frozen
class QkdListen(Message):
    """Receiver: consent (or withdraw consent) to QKD pulses from `peer`. Reply: `ok`."""

    TYPE = "qkd_listen"
    peer: str
    accept: bool = True


@register
@_frozen
class QkdStart(Message):
    """Transmitter: start emitting pulses to `peer` (who must listen). Reply: `ok`."""

    TYPE = "qkd_start"
    peer: str


@register
@_frozen
class QkdStop(Message):
    """Transmitter: stop emitting to `peer`. Reply: `ok`, then `qkd_stopped` to both ends."""

    TYPE = "qkd_stop"
    peer: str


@register
@_frozen
class QkdDetections(Message):
    """Event to the receiver: its detections among pulses [first_pulse, end_pulse), in pulse order."""

    TYPE = "qkd_detections"
    peer: str  # the transmitter
    first_pulse: int
    end_pulse: int
    pulse: U64Array
    basis: U8Array  # 0 Z, 1 X (emulator.kernels.Basis)
    outcome: U8Array
    double_click: U8Array  # 1: both detectors fired (outcome is a random bit)
    now_s: float  # emulated time at which pulse end_pulse - 1 left (the range's end)


@register
@_frozen
class QkdEmitted(Message):
    """Event to the transmitter: pulses [0, end_pulse) of the link have been emitted."""

    TYPE = "qkd_emitted"
    peer: str  # the receiver
    end_pulse: int
    now_s: float


@register
@_frozen
class QkdStopped(Message):
    """Event to both ends: emission stopped after pulse end_pulse - 1."""

    TYPE = "qkd_stopped"
    transmitter: str
    peer: str  # the other end, from the receiver's point of view
    end_pulse: int
    reason: str  # "stopped" | "withdrawn" | "peer_gone"
    now_s: float


@register
@_frozen
class Clock(Message):
    """Ask the broker's emulated time. Reply: `pong`."""

    TYPE = "clock"


# --------------------------------------------------------------------------- admin (broker and node control)


@register
@_frozen
class AdminHello(Message):
    """First frame of an orchestrator session, to the broker or to a node's control endpoint."""

    TYPE = "admin_hello"
    token: str = dataclasses.field(repr=False)
    versions: list[int]
    client: str


@register
@_frozen
class AdminWelcome(Message):
    TYPE = "admin_welcome"
    version: int
    server: str  # "broker" or the node's name
    now_s: float
    time_scale: float


@_frozen
class NodeStatus(Struct):
    name: str
    registered: bool
    control: Address | None = None
    tcp: Address | None = None
    udp: Address | None = None


@register
@_frozen
class Status(Message):
    """Admin → broker: which nodes are registered and where they listen. Reply: `status_reply`."""

    TYPE = "status"


@register
@_frozen
class StatusReply(Message):
    TYPE = "status_reply"
    now_s: float
    nodes: list[NodeStatus]


@register
@_frozen
class GetStats(Message):
    """Admin → broker or node: a statistics snapshot. Reply: `stats`."""

    TYPE = "get_stats"


@register
@_frozen
class Stats(Message):
    TYPE = "stats"
    now_s: float
    stats: dict[str, Any]


@register
@_frozen
class AppStart(Message):
    """Orchestrator → node: start an application instance. Reply: `ok`."""

    TYPE = "app_start"
    kind: str
    name: str
    params: dict[str, Any]


@register
@_frozen
class AppStatusRequest(Message):
    """Orchestrator → node: state and results of an app instance. Reply: `app_status`."""

    TYPE = "app_status_request"
    name: str


@register
@_frozen
class AppStatus(Message):
    TYPE = "app_status"
    name: str
    state: str  # "running" | "done" | "failed"
    results: dict[str, Any]


@register
@_frozen
class Shutdown(Message):
    """Admin → broker or node: stop cleanly. Reply: `ok`, then the server exits."""

    TYPE = "shutdown"


@register
@_frozen
class LinkFault(Message):
    """Orchestrator → node: cut (`cut` true) or restore the classical link to neighbour `peer`.

    Reply: `ok`, or `error` `no_link` if `peer` is not a neighbour. While cut the node
    neither dials nor accepts that link and drops its datagrams (docs/protocol.md §4.5).
    """

    TYPE = "link_fault"
    peer: str
    cut: bool


@register
@_frozen
class QkdEve(Message):
    """Admin → broker: set the eavesdropper on the QKD link between `endpoints` (all zero: off).

    Fields are those of emulator.kernels.Eavesdropper. Reply: `ok`.
    """

    TYPE = "qkd_eve"
    endpoints: list[str]
    intercept_fraction: float = 0.0
    resend_photons: int = 0
    pns: bool = False
    pns_multi_forward: float = 1.0
    pns_single_block: float = 0.0


@register
@_frozen
class FibreCut(Message):
    """Admin → broker: cut (`cut` true) or splice the fibre of the link between `endpoints`.

    While cut, nothing crosses it: no heralded pair, no qubit, no QKD photon (dark counts
    only). The classical channel is the nodes' (control `link_fault`). Reply: `ok`.
    """

    TYPE = "fibre_cut"
    endpoints: list[str]
    cut: bool = True


# --------------------------------------------------------------------------- node ⇄ node


@register
@_frozen
class LinkHello(Message):
    """First frame on a classical TCP link, from the dialling node. Reply: `link_welcome`."""

    TYPE = "link_hello"
    node: str
    token: str = dataclasses.field(repr=False)
    versions: list[int]


@register
@_frozen
class LinkWelcome(Message):
    TYPE = "link_welcome"
    node: str
    version: int


@register
@_frozen
class AppMsg(Message):
    """Application payload between two nodes; `app` names the app instance, `body` is its own schema."""

    TYPE = "app_msg"
    app: str
    body: dict[str, Any]


@register
@_frozen
class KmsMsg(Message):
    """Key-management payload between the KMEs of two neighbours (DESIGN §8).

    `body` is the KME protocol's own message (nodes/kms, docs/protocol.md §10.3): routing
    updates, one-time-pad relay hops and their MACs, key assignments, routed app messages.
    It never holds a key in the clear.
    """

    TYPE = "kms_msg"
    body: dict[str, Any]


@register
@_frozen
class KmsStart(Message):
    """Orchestrator → node: start this node's key management entity with `config`.

    `config` holds the run's KMS description and this KME's credentials (PEMs; the
    private key is secret: the message is never logged). Reply: `kms_started`.
    """

    TYPE = "kms_start"
    config: dict[str, Any] = dataclasses.field(repr=False)


@register
@_frozen
class KmsStarted(Message):
    """Node → orchestrator: the KME runs; its ETSI GS QKD 014 and SKIP servers listen on
    `host` at these TCP ports (HTTPS, mutual TLS)."""

    TYPE = "kms_started"
    host: str
    etsi014_port: int
    skip_port: int


@register
@_frozen
class Probe(Message):
    """UDP liveness probe (one datagram, no length prefix). Answered by `probe_ack` with the same seq."""

    TYPE = "probe"
    node: str
    seq: int
    sent_s: float


@register
@_frozen
class ProbeAck(Message):
    TYPE = "probe_ack"
    node: str
    seq: int
    sent_s: float  # echoed from the probe
