"""The broker's own configuration: frozen records built from a scenario (or by hand in tests).

Theory of operation: the broker core needs only a small, already-validated slice of a
scenario — each node's memory (capacity, T1/T2, gate fidelity), each link's fibre and
heralding parameters, the run seed and the time scale — plus its own resource limits.
`BrokerConfig` holds exactly that, so `emulator.broker.core` never imports the
scenario model (pydantic) and tests can build configurations in one line.
`BrokerConfig.from_scenario` is the single place that maps scenario field names onto
these records.

Everything is a frozen, slotted dataclass; `__post_init__` checks the invariants the
core relies on (unique node names, links between known, distinct nodes, physically
possible T1/T2, probabilities in range) and raises `ConfigError`.

A link may carry a QKD optical layer (`QkdConfig`: the `OpticalLinkConfig` of
emulator.broker.optics plus which end transmits). `from_scenario` builds it from the
scenario link's `qkd` section (emulator.scenario.schema `QkdLink`: field by field, the
fibre's length and attenuation being the link's); `qkd_config_from_mapping` reads the
same from a plain mapping (hand-built configurations and tests).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from typing import Any

from emulator.physics import (
    DEFAULT_ATTENUATION_DB_PER_KM,
    DecoyIntensities,
    HeraldingModel,
    HeraldingScheme,
    PhysicsParameterError,
    check_coherence_times,
    double_click_model,
    gate_depolarizing_probability,
    single_click_model,
)
from emulator.state import MAX_REGISTER_QUBITS_LIMIT
from emulator.wire import DEFAULT_MAX_FRAME_BYTES

from .optics import DEFAULT_MAX_DETECTIONS, OpticalLinkConfig, OpticalLinkError

__all__ = [
    "BrokerConfig",
    "BrokerLimits",
    "ConfigError",
    "EntanglementConfig",
    "LinkConfig",
    "MemoryConfig",
    "NodeConfig",
    "QkdConfig",
    "qkd_config_from_mapping",
]

_frozen = dataclasses.dataclass(frozen=True, slots=True)


class ConfigError(ValueError):
    """A broker configuration violates an invariant (names the field and the value)."""


def _unit(name: str, value: float) -> None:
    if not (0.0 <= value <= 1.0):
        raise ConfigError(f"{name} must be in [0, 1], got {value!r}")


@_frozen
class MemoryConfig:
    """A node's quantum memory. `math.inf` coherence times mean "no decay of that kind".

    `gate_fidelity` is the average gate fidelity F of one qubit's share of a gate; every
    qubit a gate touches is depolarised with p = 2(1 - F) (emulator.physics.gate).
    """

    qubits: int = 10
    t1_s: float = math.inf
    t2_s: float = math.inf
    gate_fidelity: float = 1.0

    def __post_init__(self) -> None:
        if self.qubits < 0:
            raise ConfigError(f"memory qubits must be >= 0, got {self.qubits!r}")
        try:
            check_coherence_times(self.t1_s, self.t2_s)
        except PhysicsParameterError as exc:
            raise ConfigError(str(exc)) from None
        if not (0.0 <= self.gate_fidelity <= 1.0):
            raise ConfigError(f"gate_fidelity must be in [0, 1], got {self.gate_fidelity!r}")

    @property
    def gate_depolarizing_p(self) -> float:
        """p of the depolarising channel after each gate, per touched qubit.

        # Nielsen, Phys. Lett. A 303, 249 (2002), eq. (3): p = 2(1 - F) for d = 2
        # (emulator.physics.gate). F below 1/2 (worse than a fully depolarising gate)
        # is treated as 1/2, i.e. p = 1.
        """
        return gate_depolarizing_probability(max(self.gate_fidelity, 0.5), 1)


@_frozen
class NodeConfig:
    name: str
    memory: MemoryConfig = MemoryConfig()

    def __post_init__(self) -> None:
        if not self.name or len(self.name) > 256:
            raise ConfigError(f"node name must be 1..256 characters, got {self.name!r}")


@_frozen
class EntanglementConfig:
    """Heralded entanglement on a link (emulator.physics.heralding).

    `bright_state_alpha` is used by the single-click scheme only.
    """

    scheme: HeraldingScheme = HeraldingScheme.DOUBLE_CLICK
    detector_efficiency: float = 1.0
    visibility: float = 1.0
    bright_state_alpha: float = 0.1

    def __post_init__(self) -> None:
        _unit("detector_efficiency", self.detector_efficiency)
        _unit("visibility", self.visibility)
        if self.scheme is HeraldingScheme.SINGLE_CLICK and not (0.0 < self.bright_state_alpha <= 0.5):
            raise ConfigError(f"bright_state_alpha must be in (0, 0.5], got {self.bright_state_alpha!r}")

    def model(self, length_km: float, attenuation_db_per_km: float) -> HeraldingModel:
        """The per-attempt heralding model of this link."""
        if self.scheme is HeraldingScheme.SINGLE_CLICK:
            return single_click_model(
                length_km,
                self.bright_state_alpha,
                detector_efficiency=self.detector_efficiency,
                visibility=self.visibility,
                attenuation_db_per_km=attenuation_db_per_km,
            )
        return double_click_model(
            length_km,
            detector_efficiency=self.detector_efficiency,
            visibility=self.visibility,
            attenuation_db_per_km=attenuation_db_per_km,
        )


@_frozen
class QkdConfig:
    """The QKD optical layer of a link: who transmits (Alice) and the optics (DESIGN §7 step 1).

    The receiver (Bob) is the other end. `optics.length_km` must be the link's length.
    """

    transmitter: str
    optics: OpticalLinkConfig

    def __post_init__(self) -> None:
        if not isinstance(self.optics, OpticalLinkConfig):
            raise ConfigError(f"qkd optics must be an OpticalLinkConfig, got {type(self.optics).__name__}")


#: Keys of a link's `qkd` mapping besides the OpticalLinkConfig fields. `length_km`
#: comes from the link itself; `attenuation_db_per_km` defaults to the link's.
_QKD_EXTRA_KEYS = frozenset({"transmitter"})
_QKD_FIBRE_KEYS = frozenset({"length_km"})


def _qkd_number(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"qkd.{key} must be a number, got {type(value).__name__}")
    return float(value)


def _qkd_triple(key: str, value: Any) -> tuple[float, float, float]:
    if isinstance(value, Mapping):
        names = ("signal", "decoy", "vacuum")
        if set(value) != set(names):
            raise ConfigError(f"qkd.{key} must have exactly the keys signal, decoy, vacuum")
        value = [value[n] for n in names]
    if isinstance(value, str | bytes) or not isinstance(value, Iterable):
        raise ConfigError(f"qkd.{key} must be three numbers (signal, decoy, vacuum)")
    items = list(value)
    if len(items) != 3:
        raise ConfigError(f"qkd.{key} must be three numbers (signal, decoy, vacuum), got {len(items)}")
    a, b, c = (_qkd_number(f"{key}[{i}]", v) for i, v in enumerate(items))
    return (a, b, c)


def qkd_config_from_mapping(
    raw: Mapping[str, Any],
    *,
    endpoints: tuple[str, str],
    length_km: float,
    attenuation_db_per_km: float = DEFAULT_ATTENUATION_DB_PER_KM,
) -> QkdConfig:
    """A link's `qkd` mapping -> QkdConfig (ConfigError naming the field on bad input).

    Keys: the field names of OpticalLinkConfig except `length_km` (the link's), plus
    `transmitter` (default: the first endpoint). `intensities` and
    `class_probabilities` are (signal, decoy, vacuum) triples or maps with those keys.

    `from_scenario` maps the scenario's `QkdLink` model directly (`_qkd_config_from_link`)
    and uses this only when a link's `qkd` is a plain mapping.
    """
    if not isinstance(raw, Mapping):
        raise ConfigError(f"qkd must be a mapping, got {type(raw).__name__}")
    known = {f.name for f in dataclasses.fields(OpticalLinkConfig)} - _QKD_FIBRE_KEYS
    for key in raw:
        if not isinstance(key, str) or (key not in known and key not in _QKD_EXTRA_KEYS):
            hint = " (length_km is the link's)" if key in _QKD_FIBRE_KEYS else ""
            raise ConfigError(f"qkd.{str(key)[:64]}: unknown field{hint}")
    transmitter = raw.get("transmitter", endpoints[0])
    if transmitter not in endpoints:
        raise ConfigError(f"qkd.transmitter must be one of {list(endpoints)}, got {str(transmitter)[:64]!r}")
    kwargs: dict[str, Any] = {"length_km": float(length_km), "attenuation_db_per_km": float(attenuation_db_per_km)}
    for key, value in raw.items():
        if key == "transmitter":
            continue
        if key == "intensities":
            triple = _qkd_triple(key, value)
            try:
                kwargs[key] = DecoyIntensities(*triple)
            except (PhysicsParameterError, ValueError) as exc:
                raise ConfigError(f"qkd.intensities: {exc}") from None
        elif key == "class_probabilities":
            kwargs[key] = _qkd_triple(key, value)
        elif key == "bob_basis_z_probability" and value is None:
            kwargs[key] = None
        else:
            kwargs[key] = _qkd_number(key, value)
    try:
        optics = OpticalLinkConfig(**kwargs)
    except (OpticalLinkError, PhysicsParameterError, ValueError, TypeError) as exc:
        raise ConfigError(f"qkd: {exc}") from None
    return QkdConfig(transmitter=str(transmitter), optics=optics)


@_frozen
class LinkConfig:
    """A fibre between two nodes; `entanglement` None means no heralded entanglement,
    `qkd` None no QKD optical layer."""

    endpoints: tuple[str, str]
    length_km: float
    attenuation_db_per_km: float = DEFAULT_ATTENUATION_DB_PER_KM
    jitter_s: float = 0.0
    udp_loss: float = 0.0
    entanglement: EntanglementConfig | None = None
    qkd: QkdConfig | None = None

    def __post_init__(self) -> None:
        if len(self.endpoints) != 2 or self.endpoints[0] == self.endpoints[1]:
            raise ConfigError(f"a link joins two distinct nodes, got {self.endpoints!r}")
        if not (self.length_km >= 0.0 and math.isfinite(self.length_km)):
            raise ConfigError(f"length_km must be finite and >= 0, got {self.length_km!r}")
        if not (self.attenuation_db_per_km >= 0.0 and math.isfinite(self.attenuation_db_per_km)):
            raise ConfigError(f"attenuation_db_per_km must be finite and >= 0, got {self.attenuation_db_per_km!r}")
        if not (self.jitter_s >= 0.0 and math.isfinite(self.jitter_s)):
            raise ConfigError(f"jitter_s must be finite and >= 0, got {self.jitter_s!r}")
        _unit("udp_loss", self.udp_loss)
        if self.entanglement is not None:
            try:
                self.entanglement.model(self.length_km, self.attenuation_db_per_km)
            except PhysicsParameterError as exc:
                raise ConfigError(f"link {self.endpoints!r}: {exc}") from None
        if self.qkd is not None:
            if self.qkd.transmitter not in self.endpoints:
                raise ConfigError(f"link {self.endpoints!r}: qkd.transmitter {self.qkd.transmitter!r} is not an end")
            if self.qkd.optics.length_km != self.length_km:
                raise ConfigError(f"link {self.endpoints!r}: qkd optics length_km differs from the link's")

    @property
    def qkd_receiver(self) -> str | None:
        """The end that receives the QKD pulses (None without QKD)."""
        if self.qkd is None:
            return None
        a, b = self.endpoints
        return b if self.qkd.transmitter == a else a

    @property
    def key(self) -> tuple[str, str]:
        """The endpoints in sorted order: one key per link whichever end asks."""
        a, b = self.endpoints
        return (a, b) if a <= b else (b, a)


@_frozen
class BrokerLimits:
    """Resource limits of the broker (DESIGN §12: every parser and table is bounded)."""

    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
    max_register_qubits: int = 10  # largest entangled register, 2..12 (registry limit)
    max_open_epr_requests_per_node: int = 16  # open epr requests a node takes part in
    max_pairs_per_request: int = 1_000_000
    max_pairs_per_delivery: int = 65_536  # pairs in one epr_delivered (~1.6 MiB); larger batches split
    max_ops_per_circuit: int = 10_000
    max_output_buffer_bytes: int = 64 * 1024 * 1024  # unread output before a session is dropped
    max_qkd_detections_per_batch: int = DEFAULT_MAX_DETECTIONS  # one qkd_detections (also capped by the frame)
    # A QKD receiver with more unread output than this loses whole qkd_detections events
    # (counted) instead of its session: a detector buffer overflowing, not a dead node.
    max_qkd_backlog_bytes: int = 48 * 1024 * 1024

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if getattr(self, f.name) < 1:
                raise ConfigError(f"{f.name} must be >= 1")
        if not (2 <= self.max_register_qubits <= MAX_REGISTER_QUBITS_LIMIT):
            raise ConfigError(f"max_register_qubits must be in [2, {MAX_REGISTER_QUBITS_LIMIT}]")
        if self.max_qkd_backlog_bytes >= self.max_output_buffer_bytes:
            raise ConfigError("max_qkd_backlog_bytes must be below max_output_buffer_bytes")


@_frozen
class BrokerConfig:
    """Everything the broker core needs to know about a run."""

    nodes: tuple[NodeConfig, ...]
    links: tuple[LinkConfig, ...] = ()
    seed: int = 0
    time_scale: float = 1.0  # wall seconds per emulated second (DESIGN §3)
    limits: BrokerLimits = BrokerLimits()
    qkd_slice_s: float = 0.01  # emulated time covered by one qkd_detections batch (at most)

    def __post_init__(self) -> None:
        names = [n.name for n in self.nodes]
        if len(set(names)) != len(names):
            raise ConfigError("node names must be unique")
        known = set(names)
        seen: set[tuple[str, str]] = set()
        for link in self.links:
            for end in link.endpoints:
                if end not in known:
                    raise ConfigError(f"link {link.endpoints!r} names unknown node {end!r}")
            if link.key in seen:
                raise ConfigError(f"two links join {link.key!r}")
            seen.add(link.key)
        if not (self.time_scale > 0.0 and math.isfinite(self.time_scale)):
            raise ConfigError(f"time_scale must be finite and > 0, got {self.time_scale!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"seed must be an int >= 0, got {self.seed!r}")
        if not (self.qkd_slice_s > 0.0 and math.isfinite(self.qkd_slice_s)):
            raise ConfigError(f"qkd_slice_s must be finite and > 0, got {self.qkd_slice_s!r}")

    # ------------------------------------------------------------------ lookups

    def node(self, name: str) -> NodeConfig | None:
        return next((n for n in self.nodes if n.name == name), None)

    def link(self, a: str, b: str) -> LinkConfig | None:
        key = (a, b) if a <= b else (b, a)
        return next((link for link in self.links if link.key == key), None)

    def neighbours(self, name: str) -> list[str]:
        """Nodes linked to `name`, in link order."""
        out = []
        for link in self.links:
            a, b = link.endpoints
            if a == name:
                out.append(b)
            elif b == name:
                out.append(a)
        return out

    # ------------------------------------------------------------------ builders

    @classmethod
    def build(
        cls,
        nodes: Iterable[str] | Mapping[str, MemoryConfig],
        links: Iterable[LinkConfig] = (),
        **kwargs: Any,
    ) -> BrokerConfig:
        """Short form for tests: `BrokerConfig.build(["a", "b"], [LinkConfig(("a", "b"), 10.0)])`."""
        if isinstance(nodes, Mapping):
            node_cfgs = tuple(NodeConfig(n, m) for n, m in nodes.items())
        else:
            node_cfgs = tuple(NodeConfig(n) for n in nodes)
        return cls(nodes=node_cfgs, links=tuple(links), **kwargs)

    @classmethod
    def from_scenario(cls, scenario: Any, *, limits: BrokerLimits | None = None) -> BrokerConfig:
        """Build from a validated `emulator.scenario.Scenario` (the only scenario-aware code)."""
        return _config_from_scenario(scenario, limits or BrokerLimits())


def _config_from_scenario(scenario: Any, limits: BrokerLimits) -> BrokerConfig:
    """Map `emulator.scenario.schema.Scenario` field names onto the broker's records.

    Duck-typed on purpose (no pydantic import): nodes is a mapping name -> node with
    `.memory.{qubits, t1_s, t2_s, gate_fidelity}`; links have `.endpoints`, `.length_km`,
    `.attenuation_db_per_km`, `.classical.{jitter_s, udp_loss}`, `.entanglement`
    (None or `.{scheme, detector_efficiency, visibility, bright_state_alpha}`) and `.qkd`
    (None, a `QkdLink`-like object or a mapping; see `_qkd_config_from_link`).
    """
    nodes = []
    for name, node in scenario.nodes.items():
        mem = node.memory
        nodes.append(
            NodeConfig(
                name=str(name),
                memory=MemoryConfig(
                    qubits=int(mem.qubits),
                    t1_s=float(mem.t1_s),
                    t2_s=float(mem.t2_s),
                    gate_fidelity=float(mem.gate_fidelity),
                ),
            )
        )
    links = []
    for link in scenario.links:
        ent = link.entanglement
        ent_cfg = None
        if ent is not None:
            scheme = HeraldingScheme(getattr(ent.scheme, "value", ent.scheme))
            alpha = ent.bright_state_alpha
            ent_cfg = EntanglementConfig(
                scheme=scheme,
                detector_efficiency=float(ent.detector_efficiency),
                visibility=float(ent.visibility),
                bright_state_alpha=0.1 if alpha is None else float(alpha),
            )
        a, b = link.endpoints
        qkd_cfg = None if getattr(link, "qkd", None) is None else _qkd_config_from_link(link)
        links.append(
            LinkConfig(
                endpoints=(str(a), str(b)),
                length_km=float(link.length_km),
                attenuation_db_per_km=float(link.attenuation_db_per_km),
                jitter_s=float(link.classical.jitter_s),
                udp_loss=float(link.classical.udp_loss),
                entanglement=ent_cfg,
                qkd=qkd_cfg,
            )
        )
    return BrokerConfig(
        nodes=tuple(nodes),
        links=tuple(links),
        seed=int(scenario.seed),
        time_scale=float(scenario.time_scale),
        limits=limits,
    )


def _qkd_config_from_link(link: Any) -> QkdConfig:
    """A scenario link's `qkd` section -> QkdConfig (ConfigError naming the link on bad values).

    Duck-typed on emulator.scenario.schema `QkdLink`: `.transmitter` (None: the first
    endpoint), `.pulse_rate_hz`, `.intensities.{signal, decoy, vacuum}`,
    `.class_probabilities.{signal, decoy, vacuum}`, `.basis_z_probability`,
    `.bob_basis_z_probability` (None: Alice's), `.receiver_efficiency`,
    `.dark_count_probability`, `.misalignment_error`, `.dead_time_s`. The fibre
    (`length_km`, `attenuation_db_per_km`) is the link's. A plain mapping goes through
    `qkd_config_from_mapping`.
    """
    a, b = (str(e) for e in link.endpoints)
    q = link.qkd
    if isinstance(q, Mapping):
        return qkd_config_from_mapping(
            q, endpoints=(a, b), length_km=float(link.length_km),
            attenuation_db_per_km=float(link.attenuation_db_per_km),
        )  # fmt: skip
    intensities, probabilities = q.intensities, q.class_probabilities
    bob_z = q.bob_basis_z_probability
    try:
        optics = OpticalLinkConfig(
            length_km=float(link.length_km),
            pulse_rate_hz=float(q.pulse_rate_hz),
            intensities=DecoyIntensities(
                float(intensities.signal), float(intensities.decoy), float(intensities.vacuum)
            ),
            class_probabilities=(
                float(probabilities.signal), float(probabilities.decoy), float(probabilities.vacuum)
            ),
            basis_z_probability=float(q.basis_z_probability),
            bob_basis_z_probability=None if bob_z is None else float(bob_z),
            attenuation_db_per_km=float(link.attenuation_db_per_km),
            receiver_efficiency=float(q.receiver_efficiency),
            dark_count_probability=float(q.dark_count_probability),
            misalignment_error=float(q.misalignment_error),
            dead_time_s=float(q.dead_time_s),
        )
    except (OpticalLinkError, PhysicsParameterError, ValueError) as exc:
        raise ConfigError(f"link {(a, b)!r}: qkd: {exc}") from None
    transmitter = a if q.transmitter is None else str(q.transmitter)
    return QkdConfig(transmitter=transmitter, optics=optics)
