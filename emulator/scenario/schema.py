"""Scenario schema: the pydantic models a scenario file is validated against.

Theory of operation
-------------------
A scenario is *data*: it describes a network (nodes, links, apps, expectations)
and is never executed (CONVENTIONS item 7, "describe, then run").  The models here
are the single source of truth for what a scenario may contain; the field
reference in ``docs/scenarios.md`` is generated from them by
:func:`render_reference` and a test keeps the two in sync.

Validation happens in three steps, all driven by :func:`check_data`:

1. **Preparation** (:func:`_prepare`, also run as the ``Scenario`` *before*
   validator): fill in what the file leaves to the scenario itself — the
   ``defaults`` section is merged field by field into every node memory and every
   link, an app without a ``name`` gets ``<kind>-<index>``, a node written
   with no settings (``alice:``) becomes ``{}``, and a fault's ``link`` is
   written in the order its link declares the endpoints.  Defaults are merged
   only when the ``defaults`` section is valid on its own, so one bad default is reported
   once, where it is written, and not again at every node.
2. **Model validation** by pydantic with ``extra="forbid"`` everywhere: unknown
   keys are errors, units are normalised to SI floats (see ``units.py``), and
   per-object rules that need a sibling field (T2 <= 2·T1,
   ``bright_state_alpha`` only with ``single-click``, ``min <= max``, a fault's
   ``node`` or ``link`` as its ``kind`` needs) are field
   validators so the error points at the offending field.
3. **Cross-field checks** (:func:`_topology_issues`): link endpoints are declared
   and distinct, no pair is linked twice, a link's QKD transmitter is one of its
   ends, app nodes exist and are linked as the app kind needs (a `qkd` app: a
   link with `qkd`, its transmitter first, one such app per link), apps start
   (and `qkd` apps end) before the run does, expectation targets exist, faults
   (:func:`_fault_issues`) name a node qnetem starts or an existing link (a
   QKD link for the `qkd-*` kinds), apply before the run ends and do not overlap
   on one target.  They run on each list item that
   validates *on its own*, so a scenario with a type error in one link and an
   unknown node in another reports both.

Every problem comes out as a :class:`FieldIssue` (location tuple, message, and
whether the *key* rather than the value is at fault); the loader turns locations
into file/line/column.  Pydantic's locations are normalised on the way: the tag
of a discriminated union (``apps[0].epr-test.pairs``) is dropped, ``[key]``
markers become ``on_key=True``.

Python attributes carry their unit (``duration_s``, ``t2_s``, ``jitter_s``); the
file uses the short key (``duration``, ``t2``, ``jitter``) through a pydantic
alias.  ``model_dump(by_alias=True)`` therefore gives back a valid scenario.

Extending: a new app kind is a subclass of :class:`AppBase` with a ``Literal``
``kind``, added to ``_APP_CLASSES``; a new metric is a :func:`register_metric`
call (the metric check consults the registry at validation time); a new
top-level section is a field on :class:`Scenario`.
"""

from __future__ import annotations

import difflib
import enum
import math
import re
import sys
import types
import typing
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Final, Literal, Union

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    WrapSerializer,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_core import PydanticCustomError, PydanticUndefined

from emulator.scenario import qkd_params as _qkd
from emulator.scenario.fault_kinds import FaultKind, FaultTarget
from emulator.scenario.units import (
    DURATION_UNITS_S,
    FREQUENCY_UNITS_HZ,
    Count,
    Duration,
    Efficiency,
    Frequency,
    Lifetime,
    NonNegativeFloat,
    Number,
    OpenProbability,
    PositiveDuration,
    PositiveFloat,
    Probability,
    TypeDoc,
    UnitError,
    parse_lifetime_s,
    parse_positive_duration_s,
)

__all__ = [
    "APP_KINDS",
    "BEGIN_MARKER",
    "END_MARKER",
    "METRICS",
    "NAME_PATTERN",
    "App",
    "AppBase",
    "CascadeVariant",
    "ClassicalLink",
    "Defaults",
    "Entanglement",
    "EntanglementScheme",
    "EprTest",
    "Expectation",
    "Fault",
    "FaultKind",
    "FieldIssue",
    "Link",
    "LinkDefaults",
    "Loc",
    "Memory",
    "MetricScope",
    "MetricSpec",
    "Node",
    "QkdApp",
    "QkdClassProbabilities",
    "QkdIntensities",
    "QkdLink",
    "Role",
    "Scenario",
    "Topology",
    "check_data",
    "format_path",
    "register_metric",
    "render_reference",
    "replace_generated_section",
]

#: A location inside a scenario: mapping keys and list indices, outermost first.
Loc = tuple[Union[str, int], ...]

# ---------------------------------------------------------------------------
# Names
# ---------------------------------------------------------------------------

#: Names of nodes, apps and the scenario become process and container names
#: (``qnetem-<scenario>-<node>``), hence DNS-label-like: lower case, digits, '-'.
NAME_PATTERN: Final = "[a-z0-9][a-z0-9-]*"
NAME_MAX_LEN: Final = 63  # one DNS label (RFC 1035 §2.3.4)
_NAME_RE: Final = re.compile(rf"{NAME_PATTERN}\Z")


def _error(code: str, message: str) -> PydanticCustomError:
    # The text goes in the context, not the template: user input may hold braces.
    return PydanticCustomError(code, "{message}", {"message": message})


def _is_name(value: object) -> bool:
    return isinstance(value, str) and len(value) <= NAME_MAX_LEN and _NAME_RE.match(value) is not None


def _check_name(value: Any) -> str:
    if not isinstance(value, str):
        raise _error("name", f"expected a name (text), got {type(value).__name__}")
    if not _is_name(value):
        shown = value if len(value) <= 40 else value[:37] + "..."
        raise _error(
            "name",
            f"invalid name {shown!r}: names match {NAME_PATTERN} and have at most {NAME_MAX_LEN} "
            "characters (they become process and container names)",
        )
    return value


Name = Annotated[str, BeforeValidator(_check_name), TypeDoc("name", f"`{NAME_PATTERN}`, at most 63 characters")]

# ---------------------------------------------------------------------------
# Metrics registry
# ---------------------------------------------------------------------------


class MetricScope(enum.StrEnum):
    """What an expectation on a metric must name as its target."""

    APP = "app"
    #: The run's key management as a whole (`kms:`): an expectation names no app.
    KMS = "kms"


@dataclass(frozen=True, slots=True)
class MetricSpec:
    """A metric that expectations may test: its scope, unit and meaning."""

    name: str
    scope: MetricScope
    unit: str
    description: str
    #: App kinds that produce this metric (for scope ``app``); empty = any kind.
    app_kinds: frozenset[str] = frozenset()


#: Metric name -> spec.  Expectations are checked against this registry at
#: validation time, so :func:`register_metric` extends it without touching the
#: models.
METRICS: dict[str, MetricSpec] = {}


def register_metric(spec: MetricSpec) -> None:
    """Add a metric expectations may name; a name can be registered only once."""
    if not _is_name(spec.name.replace("_", "-")):
        raise ValueError(f"bad metric name {spec.name!r}")
    if spec.name in METRICS:
        raise ValueError(f"metric {spec.name!r} is already registered")
    METRICS[spec.name] = spec


for _spec in (
    MetricSpec("pairs_measured", MetricScope.APP, "pairs",
               "Entangled pairs delivered and measured by both nodes.", frozenset({"epr-test"})),
    MetricSpec("fidelity", MetricScope.APP, "",
               "Estimated fidelity of the delivered pairs to the target Bell state.", frozenset({"epr-test"})),
    MetricSpec("chsh", MetricScope.APP, "",
               "CHSH value S estimated from the measured pairs (2 classical bound, 2√2 quantum).",
               frozenset({"epr-test"})),
    MetricSpec("pair_rate_hz", MetricScope.APP, "Hz",
               "Delivered pairs per emulated second.", frozenset({"epr-test"})),
):
    register_metric(_spec)

# What a `qkd` app reports (nodes/apps, from nodes/qkd/session.py `QkdLinkStatistics`).
# Counts only: never key bits (CONVENTIONS item 14).
_QKD_APP: Final = frozenset({"qkd"})
for _name, _unit, _description in (
    ("final_key_bits", "bits", "Secret key bits that entered the key pool (both ends hold the same)."),
    ("net_key_bits", "bits", "Of final_key_bits, those not taken back to authenticate the link's own messages."),
    ("secret_key_rate_bps", "bit/s", "Final key bits per emulated second of running."),
    ("qber", "", "QBER of the signal pulses in the key basis over the blocks estimated (the disclosed sample)."),
    ("qber_x", "", "QBER of the signal pulses in the test basis over the blocks estimated."),
    ("sifted_bits", "bits", "Detections whose bases agreed (every intensity class, both bases)."),
    ("detections", "detections", "Detections the receiver registered and announced."),
    ("blocks_done", "blocks", "Blocks post-processed into key."),
    ("blocks_aborted", "blocks", "Blocks aborted by parameter estimation (QBER above the threshold, no "
                                 "single-photon yield, too few counts or no key left), with no key."),
    ("blocks_discarded", "blocks", "Blocks whose keys still differed after Cascade (verification failed), "
                                   "with no key."),
    ("alarms", "alarms", "Eavesdropper alarms: blocks aborted for a QBER above the threshold or a zero "
                         "single-photon yield."),
    ("cascade_efficiency", "", "Reconciliation efficiency f = parity bits disclosed / (n h(QBER)), over the "
                               "blocks reconciled (1 is the Shannon limit)."),
    ("single_photon_yield_lower", "", "Y1^L: lower bound on the single-photon yield of the last estimated "
                                      "block (Ma et al. 2005, Eq. (34))."),
    ("single_photon_error_upper", "", "e1^U: upper bound on the single-photon error rate of the last "
                                      "estimated block (Ma et al. 2005, Eq. (37))."),
    ("key_rate_per_pulse", "bits/pulse", "Final key bits per pulse of the blocks finished."),
    ("auth_rejects", "messages", "Post-processing messages rejected for a bad or replayed authentication tag."),
    ("detections_dropped", "detections", "Detections the receiver could not announce (its queue was full)."),
):
    register_metric(MetricSpec(_name, MetricScope.APP, _unit, _description, _QKD_APP))


# What a `tunnel` app reports (nodes/apps/tunnel.py).
_TUNNEL_APP: Final = frozenset({"tunnel"})
for _name, _unit, _description in (
    ("bytes_carried", "bytes", "Payload bytes carried (sender: sent; receiver: received, authentic and intact)."),
    ("rekeys", "keys", "Keys the tunnel switched to after the first."),
    ("key_fetch_failures", "requests", "ETSI 014 requests that did not return keys (503, timeouts)."),
    ("auth_failures", "datagrams", "Datagrams that failed AES-GCM authentication at the receiver."),
    ("content_errors", "datagrams", "Authentic datagrams whose payload was not what the sender sent."),
):
    register_metric(MetricSpec(_name, MetricScope.APP, _unit, _description, _TUNNEL_APP))

# The run's key management (`kms:`), from every KME's statistics at the end of the run.
for _name, _unit, _description in (
    ("keys_delivered", "keys", "Keys delivered to master SAEs (enc_keys and SKIP /key) over the run."),
    ("keys_matched", "keys", "Delivered keys whose bytes both ends compared equal (salted hashes)."),
    ("key_mismatches", "keys", "Delivered keys whose two copies differ: must be 0."),
    ("duplicate_deliveries", "keys", "Keys handed to the same SAE more than once: must be 0."),
    ("keys_relayed", "keys", "Keys relayed through trusted nodes and confirmed end to end."),
    ("relay_failures", "keys", "Relays not confirmed in time (dropped, relayed again)."),
    ("reroutes", "changes", "Route changes of KMEs towards other KMEs (after link failures or repairs)."),
    ("pqc_fallbacks", "keys", "Keys delivered PQC-only because the QKD pool was empty (`on_empty: pqc`)."),
    ("kms_errors", "requests", "ETSI 014 / SKIP requests answered with an error status."),
):
    register_metric(MetricSpec(_name, MetricScope.KMS, _unit, _description))


def _check_metric(value: Any) -> str:
    if not isinstance(value, str) or value not in METRICS:
        shown = repr(value) if isinstance(value, str) and len(value) <= 40 else type(value).__name__
        raise _error("metric", f"unknown metric {shown} (known: {', '.join(sorted(METRICS))})")
    return value


MetricName = Annotated[str, BeforeValidator(_check_metric), TypeDoc("metric name", "see [Metrics](#metrics)")]

# ---------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)


class Role(enum.StrEnum):
    """What a node does in the network."""

    ENDPOINT = "endpoint"
    REPEATER = "repeater"
    TRUSTED_RELAY = "trusted-relay"


class Memory(_Model):
    """Quantum memory of a node.

    Decoherence is applied lazily by the broker from T1 (amplitude damping) and
    T2 (dephasing); physically T2 <= 2·T1 (Nielsen & Chuang 2010, §8.3.5-8.3.6),
    and a memory that breaks it is rejected.
    """

    qubits: Count = Field(64, ge=1, le=4096, description="Number of memory qubits, 1 to 4096.")
    t1_s: Lifetime = Field(math.inf, alias="t1", description="Energy relaxation time T1.")
    t2_s: Lifetime = Field(
        math.inf, alias="t2",
        description="Dephasing time T2; must not exceed 2·T1. When omitted: 2·T1 (T1-limited memory).",
        json_schema_extra={"doc_default": "2·t1"},
    )
    gate_fidelity: Probability = Field(
        1.0, description="Average gate fidelity F of each gate; the broker depolarises every qubit a gate touches with p = d(1 - F)/(d - 1) (emulator.physics.gate)."
    )

    @model_validator(mode="before")
    @classmethod
    def _t2_from_t1(cls, data: Any) -> Any:
        # T2 omitted: the T1-limited memory, T2 = 2·T1 (inf when T1 is inf).
        if isinstance(data, dict) and "t1" in data and "t2" not in data:
            try:
                t1_s = parse_lifetime_s(data["t1"])
            except UnitError:
                return data  # the t1 field reports it
            return {**data, "t2": 2.0 * t1_s}
        return data

    @field_validator("t2_s")
    @classmethod
    def _t2_at_most_twice_t1(cls, t2_s: float, info: ValidationInfo) -> float:
        t1_s = info.data.get("t1_s")
        if t1_s is not None and t2_s > 2.0 * t1_s:
            raise _error("t2_above_2t1", f"T2 ({_fmt_s(t2_s)}) must be <= 2·T1 ({_fmt_s(2.0 * t1_s)}; T1 = {_fmt_s(t1_s)})")
        return t2_s


class Node(_Model):
    """One node of the network; its name is its key under `nodes`."""

    role: Role = Field(Role.ENDPOINT, description="What the node does.")
    external: StrictBool = Field(
        False, description="Started by someone else (plugfest): the orchestrator waits for it to register."
    )
    memory: Memory = Field(default_factory=Memory, description="Quantum memory; fields missing here come from `defaults.memory`.")


class ClassicalLink(_Model):
    """Shaper of the classical channel along a link.

    The fibre propagation delay (4.9 µs/km × `length_km`) is implied by the link
    length and always applied; these settings come on top.
    """

    jitter_s: Duration = Field(0.0, alias="jitter", description="Random extra delay per message, up to this value.")
    udp_loss: Probability = Field(0.0, description="Probability that a UDP datagram is dropped (TCP is reliable).")


class EntanglementScheme(enum.StrEnum):
    """Heralded entanglement generation scheme."""

    DOUBLE_CLICK = "double-click"
    SINGLE_CLICK = "single-click"


class Entanglement(_Model):
    """Heralded entanglement generation on a link (a midpoint station heralds successes)."""

    scheme: EntanglementScheme = Field(
        EntanglementScheme.DOUBLE_CLICK,
        description="`double-click` (two photons, Barrett-Kok) or `single-click` (one photon, bright-state).",
    )
    detector_efficiency: Efficiency = Field(1.0, description="Efficiency of the heralding detectors, in (0, 1].")
    visibility: Probability = Field(1.0, description="Two-photon interference visibility, in [0, 1].")
    bright_state_alpha: Number | None = Field(
        None, validate_default=True,
        description="Bright-state population α, 0 < α < 0.5; required for `single-click`, not allowed for `double-click`.",
    )

    @field_validator("bright_state_alpha")
    @classmethod
    def _alpha_matches_scheme(cls, alpha: float | None, info: ValidationInfo) -> float | None:
        scheme = info.data.get("scheme")
        if scheme is EntanglementScheme.DOUBLE_CLICK and alpha is not None:
            raise _error(
                "alpha_with_double_click",
                "bright_state_alpha applies only to scheme single-click; remove it or set scheme: single-click",
            )
        if scheme is EntanglementScheme.SINGLE_CLICK:
            if alpha is None:
                raise _error("alpha_missing", "scheme single-click needs bright_state_alpha (0 < alpha < 0.5, e.g. 0.1)")
            if not 0.0 < alpha < 0.5:
                raise _error("alpha_range", f"bright_state_alpha must be > 0 and < 0.5, got {alpha:g}")
        return alpha


class QkdIntensities(_Model):
    """Mean photon numbers of the three intensity classes of the transmitter's weak coherent pulses.

    The vacuum + weak decoy bounds need signal > decoy + vacuum and decoy > vacuum
    (Ma, Qi, Zhao & Lo, PRA 72, 012326 (2005), Eqs. (34)-(37)); the defaults are
    their GYS values.
    """

    signal: NonNegativeFloat = Field(
        _qkd.DEFAULT_INTENSITIES[0], le=_qkd.MAX_MEAN_PHOTON_NUMBER,
        description="Signal mean photon number mu (0.48: Ma et al.'s optimum for the GYS link), at most 10.",
    )
    decoy: NonNegativeFloat = Field(
        _qkd.DEFAULT_INTENSITIES[1], le=_qkd.MAX_MEAN_PHOTON_NUMBER,
        description="Weak decoy mean photon number nu.",
    )
    vacuum: NonNegativeFloat = Field(
        _qkd.DEFAULT_INTENSITIES[2], le=_qkd.MAX_MEAN_PHOTON_NUMBER,
        description="Vacuum decoy mean photon number (0: a true vacuum).",
    )

    @model_validator(mode="after")
    def _decoy_ordering(self) -> QkdIntensities:
        if not (self.decoy > self.vacuum and self.signal > self.decoy + self.vacuum):
            raise _error(
                "decoy_ordering",
                f"the decoy bounds need signal > decoy + vacuum and decoy > vacuum, got signal {self.signal:g}, "
                f"decoy {self.decoy:g}, vacuum {self.vacuum:g}",
            )
        return self


class QkdClassProbabilities(_Model):
    """How often the transmitter picks each intensity class; the three sum to 1, each > 0."""

    signal: Probability = Field(
        _qkd.DEFAULT_CLASS_PROBABILITIES[0], gt=0.0,
        description="Probability of a signal pulse (the key comes from these).",
    )
    decoy: Probability = Field(
        _qkd.DEFAULT_CLASS_PROBABILITIES[1], gt=0.0, description="Probability of a weak decoy pulse."
    )
    vacuum: Probability = Field(
        _qkd.DEFAULT_CLASS_PROBABILITIES[2], gt=0.0, description="Probability of a vacuum decoy pulse."
    )

    @model_validator(mode="after")
    def _sum_to_one(self) -> QkdClassProbabilities:
        total = self.signal + self.decoy + self.vacuum
        if abs(total - 1.0) > 1e-9:  # the optical kernel's tolerance (emulator.kernels, OpticsParameters)
            raise _error("class_probabilities_sum", f"signal + decoy + vacuum must be 1, got {total:.12g}")
        return self


class QkdLink(_Model):
    """The QKD optical layer of a link: decoy-state BB84 with weak coherent pulses (issue 4).

    The transmitter (Alice) fires pulses at `pulse_rate_hz` into the link's fibre
    (`length_km`, `attenuation_db_per_km` of the link; the GYS link of Ma et al. has
    0.21 dB/km); the broker samples the receiver's (Bob's) detections and sends them to
    him. The defaults are the GYS parameter set of Ma, Qi, Zhao & Lo, PRA 72, 012326
    (2005). A link may carry both `qkd` and `entanglement`.
    """

    transmitter: Name | None = Field(
        None, description="The endpoint that sends the pulses (Alice); the other one receives. When omitted: "
                          "the link's first endpoint.",
        json_schema_extra={"doc_default": "first endpoint"},
    )
    pulse_rate_hz: Frequency = Field(_qkd.DEFAULT_PULSE_RATE_HZ, description="Pulses per emulated second.")
    intensities: QkdIntensities = Field(
        default_factory=QkdIntensities, description="Mean photon numbers {signal, decoy, vacuum}."
    )
    class_probabilities: QkdClassProbabilities = Field(
        default_factory=QkdClassProbabilities,
        description="Probabilities {signal, decoy, vacuum} of the intensity classes. The defaults 0.5, 0.25, "
                    "0.25 differ from the optics module's 0.8, 0.1, 0.1 on purpose: with the finite-key bounds "
                    "of Lim et al., PRA 89, 022307 (2014), at about 1e9 pulses per block the decoy and vacuum "
                    "classes need that share of the pulses to bound the single-photon yield and error "
                    "tightly enough to leave a key.",
    )
    basis_z_probability: OpenProbability = Field(
        _qkd.DEFAULT_BASIS_Z_PROBABILITY,
        description="Probability that the transmitter prepares in the Z (key) basis; X is the test basis.",
    )
    bob_basis_z_probability: OpenProbability | None = Field(
        None, description="Probability that the receiver measures in Z; when omitted: the same as "
                          "`basis_z_probability`.",
        json_schema_extra={"doc_default": "`basis_z_probability`"},
    )
    receiver_efficiency: Efficiency = Field(
        _qkd.DEFAULT_RECEIVER_EFFICIENCY,
        description="eta_Bob: detector efficiency times the receiver's internal transmittance, in (0, 1].",
    )
    dark_count_probability: Probability = Field(
        _qkd.DEFAULT_DARK_COUNT_PROBABILITY, lt=1.0,
        description="Y0: probability of a background click per pulse, both detectors together, in [0, 1).",
    )
    misalignment_error: Probability = Field(
        _qkd.DEFAULT_MISALIGNMENT_ERROR, le=0.5,
        description="e_detector: probability that a photon hits the wrong detector, in [0, 0.5].",
    )
    dead_time_s: Duration = Field(
        0.0, alias="dead_time", description="After a click both detectors are blind for this long (emulated)."
    )

    def transmitter_of(self, endpoints: tuple[str, str]) -> str:
        """The transmitting end of a link with these endpoints."""
        return endpoints[0] if self.transmitter is None else self.transmitter


class Link(_Model):
    """A fibre between two nodes, with its classical channel, optional heralded entanglement and optional QKD."""

    endpoints: tuple[Name, Name] = Field(description="The two nodes joined by the link (order does not matter).")
    length_km: PositiveFloat = Field(description="Fibre length in km, > 0.")
    attenuation_db_per_km: NonNegativeFloat = Field(0.2, description="Fibre attenuation in dB/km.")
    classical: ClassicalLink = Field(default_factory=ClassicalLink, description="Classical channel shaper.")
    entanglement: Entanglement | None = Field(
        None, description="Present: the link generates heralded entanglement with these settings."
    )
    qkd: QkdLink | None = Field(
        None, description="Present: the link carries decoy-state BB84 pulses with these settings (for a `qkd` app)."
    )

    @property
    def qkd_transmitter(self) -> str | None:
        """The end that sends QKD pulses (None without `qkd`)."""
        return None if self.qkd is None else self.qkd.transmitter_of(self.endpoints)

    @property
    def pair(self) -> frozenset[str]:
        """The endpoints as an unordered pair."""
        return frozenset(self.endpoints)


class LinkDefaults(_Model):
    """Defaults merged into every link that does not set the field itself."""

    attenuation_db_per_km: NonNegativeFloat = Field(0.2, description="Fibre attenuation in dB/km.")
    classical: ClassicalLink = Field(
        default_factory=ClassicalLink, description="Classical channel shaper (merged field by field)."
    )


class Defaults(_Model):
    """Defaults for nodes and links; a node or link overrides them field by field.

    To share an `entanglement` section between links, use a YAML anchor
    (`entanglement: &ent {...}` then `entanglement: *ent`).
    """

    memory: Memory = Field(default_factory=Memory, description="Default node memory.")
    link: LinkDefaults = Field(default_factory=LinkDefaults, description="Default link parameters.")


@dataclass(frozen=True, slots=True)
class Topology:
    """Who is linked to whom: what app kinds check their node lists against."""

    nodes: frozenset[str]
    links: frozenset[frozenset[str]]
    #: Links that carry an `entanglement` section.
    entangling: frozenset[frozenset[str]]
    #: Links that carry a `qkd` section -> their transmitter (None: not known, the section is broken).
    qkd: Mapping[frozenset[str], str | None] = field(default_factory=dict, hash=False)
    #: SAE id -> the node whose KME serves it (`kms.saes`); None: no valid `kms` section.
    saes: Mapping[str, str] | None = field(default=None, hash=False)

    def linked(self, a: str, b: str) -> bool:
        return frozenset((a, b)) in self.links

    def has_links(self, node: str) -> bool:
        return any(node in pair for pair in self.links)


class AppBase(_Model):
    """Common fields of every app; subclasses add a `Literal` `kind` and their own fields."""

    kind: str = Field(description="App kind (selects the app).")
    name: Name = Field(
        description="Name expectations use to refer to the app.",
        json_schema_extra={"doc_default": "`<kind>-<index>`"},
    )
    nodes: tuple[Name, ...] = Field(description="Nodes the app runs on.")
    start_s: Duration = Field(
        0.0, alias="start", description="When to start, in emulated time after all nodes registered."
    )

    def topology_issues(self, topo: Topology) -> Iterator[tuple[Loc, str]]:
        """Problems with this app's node list in `topo`, as (location inside the app, message)."""
        for j, node in enumerate(self.nodes):
            if node not in topo.nodes:
                yield ("nodes", j), f"unknown node {node!r} (declared nodes: {_listing(topo.nodes)})"
            elif not topo.has_links(node):
                yield ("nodes", j), f"node {node!r} has no link"


def _pair_issues(kind: str, nodes: tuple[str, str], topo: Topology) -> Iterator[tuple[Loc, str]]:
    """What a two-node app needs of any topology: declared, distinct, directly linked nodes."""
    a, b = nodes
    unknown = [(j, node) for j, node in enumerate(nodes) if node not in topo.nodes]
    for j, node in unknown:
        yield ("nodes", j), f"unknown node {node!r} (declared nodes: {_listing(topo.nodes)})"
    if unknown:
        return
    if a == b:
        yield ("nodes", 1), f"{kind} needs two different nodes, got {a!r} twice"
    elif not topo.linked(a, b):
        yield ("nodes",), f"{kind} needs a direct link between {a!r} and {b!r}; add one under `links`"


class EprTest(AppBase):
    """Generate entangled pairs on a direct link, measure them, estimate fidelity and CHSH.

    The first node initiates; the link between the two nodes needs an
    `entanglement` section.
    """

    kind: Literal["epr-test"] = Field(description="`epr-test`.")
    nodes: tuple[Name, Name] = Field(description="The two nodes; the first one initiates.")
    pairs: Count = Field(ge=1, le=10**9, description="Number of pairs to generate and measure, >= 1.")
    wait_s: Duration = Field(
        0.0, alias="wait", description="Time each pair waits in memory before it is measured (emulated)."
    )

    def topology_issues(self, topo: Topology) -> Iterator[tuple[Loc, str]]:
        a, b = self.nodes
        issues = list(_pair_issues(self.kind, self.nodes, topo))
        yield from issues
        if issues:
            return
        if frozenset((a, b)) not in topo.entangling:
            yield ("nodes",), (f"epr-test needs entanglement on the link between {a!r} and {b!r}; "
                               "give that link an `entanglement` section")


class CascadeVariant(enum.StrEnum):
    """Cascade block-size schedule of a `qkd` app (the values of nodes/qkd/cascade.py `CascadeVariant`)."""

    ORIGINAL = "original"  # Brassard & Salvail, EUROCRYPT '93
    YAN = "yan"  # Martinez-Mateo et al., QIC 15 (2015), "Cascade opt. (2)" (after Yan et al.)
    OPT7 = "opt7"  # Martinez-Mateo et al. 2015, "Cascade opt. (7)"
    OPT8 = "opt8"  # Martinez-Mateo et al. 2015, "Cascade opt. (8)"


class QkdApp(AppBase):
    """Run a decoy-state BB84 QKD session over a QKD link and fill both ends' key pools.

    The first node is the link's QKD transmitter (Alice, who initiates), the second
    the receiver (Bob); their link needs a `qkd` section. Detections are post-processed
    in blocks: sifting, parameter estimation (decoy bounds of Ma et al., PRA 72, 012326
    (2005); finite-key length of Lim et al., PRA 89, 022307 (2014)), Cascade,
    verification, privacy amplification; every message is authenticated, first with the
    link's bootstrap key, then with key from the pool. The app stops after `duration`
    or once `key_bits` final bits are in the pool, whichever comes first; give at least
    one. At most one `qkd` app per link: the bootstrap key serves one session per link
    and run.
    """

    kind: Literal["qkd"] = Field(description="`qkd`.")
    nodes: tuple[Name, Name] = Field(
        description="[transmitter, receiver]: the first node must be the link's `qkd.transmitter`."
    )
    duration_s: PositiveDuration | None = Field(
        None, alias="duration",
        description="Emulated time the link runs, from `start`. `start + duration` must fall before the end of "
                    "the run, with room for the last block's post-processing.",
    )
    key_bits: Count | None = Field(
        None, ge=1, le=2**53, description="Stop once this many final key bits are in the pool, >= 1."
    )
    block_bits: Count = Field(
        _qkd.DEFAULT_BLOCK_BITS, ge=_qkd.MIN_BLOCK_BITS, le=_qkd.MAX_BLOCK_BITS,
        description="Signal key-basis bits per post-processing block (before the QBER sample), "
                    f"{_qkd.MIN_BLOCK_BITS} to 2^24. Larger blocks pay less finite-key penalty but take longer "
                    "to fill.",
    )
    cascade: CascadeVariant = Field(
        CascadeVariant(_qkd.DEFAULT_CASCADE),
        description="Cascade variant: `original` (Brassard & Salvail 1993) or options (2) `yan`, (7) `opt7`, "
                    "(8) `opt8` of Martinez-Mateo et al., QIC 15 (2015).",
    )
    epsilon_sec: OpenProbability = Field(
        _qkd.DEFAULT_EPSILON_SEC, description="Secrecy parameter eps_sec of the finite-key length (Lim et al. 2014)."
    )
    epsilon_cor: OpenProbability = Field(
        _qkd.DEFAULT_EPSILON_COR,
        description="Correctness parameter eps_cor: the verification hash's failure probability (Lim et al. 2014).",
    )
    qber_threshold: Probability = Field(
        _qkd.DEFAULT_QBER_THRESHOLD, gt=0.0, le=0.5,
        description="A block whose signal QBER (either basis) exceeds this is aborted and raises an alarm; "
                    "0.11 is the BB84 limit of Shor & Preskill, PRL 85, 441 (2000). In (0, 0.5].",
    )
    sample_fraction: OpenProbability = Field(
        _qkd.DEFAULT_SAMPLE_FRACTION,
        description="Share of the signal key-basis bits disclosed to estimate the key-basis QBER.",
    )

    @model_validator(mode="after")
    def _some_stop(self) -> QkdApp:
        if self.duration_s is None and self.key_bits is None:
            raise _error("qkd_no_stop", "a qkd app needs `duration`, `key_bits` or both, or it would never stop")
        return self

    def topology_issues(self, topo: Topology) -> Iterator[tuple[Loc, str]]:
        a, b = self.nodes
        issues = list(_pair_issues(self.kind, self.nodes, topo))
        yield from issues
        if issues:
            return
        pair = frozenset((a, b))
        if pair not in topo.qkd:
            yield ("nodes",), (f"qkd needs a QKD link between {a!r} and {b!r}; "
                               "give that link a `qkd` section")
        else:
            transmitter = topo.qkd[pair]
            if transmitter is not None and transmitter != a:
                yield ("nodes",), (f"the first node of a qkd app is the link's QKD transmitter {transmitter!r} "
                                   f"(it initiates); write nodes: [{transmitter}, {a}] or make {a!r} the "
                                   "link's `qkd.transmitter`")


class TunnelApp(AppBase):
    """An encrypted UDP tunnel between two SAEs, keyed over ETSI GS QKD 014 (the demo application of DESIGN §8).

    The sender (first node) gets keys from its KME with `enc_keys` as the master SAE,
    derives AES-256-GCM keys from them (HKDF-SHA-256) and sends `rate` datagrams per
    second of `payload` bytes over UDP straight to the receiver, which fetches each new
    key with `dec_keys` by the key ID carried in the datagrams. The sender rekeys every
    `rekey_interval`. Both SAEs must be in `kms.saes`, on these nodes. The nodes need
    no direct link: the receiver's address reaches the sender through the KMEs.
    """

    kind: Literal["tunnel"] = Field(description="`tunnel`.")
    nodes: tuple[Name, Name] = Field(description="[sender, receiver].")
    saes: tuple[Name, Name] = Field(description="[sender SAE (master), receiver SAE (slave)], from `kms.saes`.")
    duration_s: PositiveDuration = Field(alias="duration", description="Emulated time the sender sends traffic.")
    rate_pps: PositiveFloat = Field(50.0, alias="rate", le=10_000, description="Datagrams per emulated second.")
    payload_bytes: Count = Field(512, alias="payload", ge=16, le=60_000, description="Payload bytes per datagram.")
    rekey_interval_s: PositiveDuration = Field(
        2.0, alias="rekey_interval", description="Emulated time between rekeys (a new key from the KME)."
    )
    key_size_bits: Count = Field(256, alias="key_size", ge=256, le=8192, description="Key size asked of the KME, bits.")

    def topology_issues(self, topo: Topology) -> Iterator[tuple[Loc, str]]:
        for j, node in enumerate(self.nodes):
            if node not in topo.nodes:
                yield ("nodes", j), f"unknown node {node!r} (declared nodes: {_listing(topo.nodes)})"
        if self.nodes[0] == self.nodes[1]:
            yield ("nodes", 1), f"tunnel needs two different nodes, got {self.nodes[0]!r} twice"
        if topo.saes is None:
            yield ("saes",), "tunnel needs a `kms` section that lists its SAEs"
            return
        for j, (sae, node) in enumerate(zip(self.saes, self.nodes, strict=True)):
            where = topo.saes.get(sae)
            if where is None:
                yield ("saes", j), f"unknown SAE {sae!r} (kms.saes: {_listing(frozenset(topo.saes))})"
            elif where != node:
                yield ("saes", j), f"SAE {sae!r} is served by {where!r}, not by {node!r}"


#: App kind -> schema class.  Order fixes the order in the reference.
_APP_CLASSES: Final[tuple[type[AppBase], ...]] = (EprTest, QkdApp, TunnelApp)
APP_KINDS: Final[Mapping[str, type[AppBase]]] = types.MappingProxyType(
    {typing.get_args(cls.model_fields["kind"].annotation)[0]: cls for cls in _APP_CLASSES}
)

#: Any app, selected by its `kind`.
App = Annotated[Union[_APP_CLASSES], Field(discriminator="kind")]  # type: ignore[valid-type]


class KeyPolicyKind(enum.StrEnum):
    """How the keys of an SAE pair are made (DESIGN §8)."""

    QKD = "qkd"  # the QKD key itself (relayed through trusted nodes where needed)
    PQC = "pqc"  # ML-KEM-768 + X25519 shared secrets only, through the KDF
    HYBRID = "hybrid"  # QKD key + ML-KEM-768 + X25519 secrets through a concatenation KDF (ETSI TS 103 744 style)


class EmptyPoolAction(enum.StrEnum):
    """What a KME does with a `qkd`/`hybrid` request when it holds no QKD key for the pair."""

    WAIT = "wait"  # wait up to `wait` for key, then 503
    FAIL = "fail"  # 503 at once
    PQC = "pqc"  # deliver a PQC-only key and raise an alarm


class Sae(_Model):
    """A secure application entity: an application that gets keys from a node's KME."""

    id: Name = Field(description="SAE ID (the CommonName of its client certificate).")
    node: Name = Field(description="The node whose KME serves this SAE.")


class KeyPolicy(_Model):
    """The key policy of one pair of SAEs (either may be the master)."""

    saes: tuple[Name, Name] = Field(description="The two SAE IDs.")
    policy: KeyPolicyKind = Field(KeyPolicyKind.QKD, description="`qkd`, `pqc` or `hybrid`.")
    on_empty: EmptyPoolAction = Field(
        EmptyPoolAction.FAIL,
        description="When no QKD key is there for a `qkd` or `hybrid` request: `wait` (up to `wait`, then 503), "
                    "`fail` (503 at once) or `pqc` (a PQC-only key and a `kms_alarm` event).",
    )
    wait_s: Duration = Field(5.0, alias="wait", description="How long `on_empty: wait` waits (emulated).")


class Kms(_Model):
    """Key management: a KME on every node of a QKD link, serving SAEs over ETSI GS QKD 014 and Cisco SKIP.

    Every node with a QKD link runs a key management entity (KME) with a SQLite key
    store fed by its QKD links. KMEs relay keys hop by hop (one-time pad) through
    trusted nodes to KMEs they share no link with, along routes that follow link
    failures. SAEs reach their node's KME over HTTPS with mutual TLS; certificates come
    from a CA made for the run (`qnetem certs RUN_DIR --sae ID` exports one for an
    outside application). A run with key management lasts its whole `duration`, so
    that outside applications can use the KMEs after the scenario's apps finished.
    """

    saes: tuple[Sae, ...] = Field(min_length=1, max_length=1024, description="The SAEs and their nodes.")
    policies: tuple[KeyPolicy, ...] = Field((), max_length=4096, description="Per SAE pair policies.")
    default_policy: KeyPolicyKind = Field(KeyPolicyKind.QKD, description="Policy of SAE pairs not listed.")
    default_on_empty: EmptyPoolAction = Field(EmptyPoolAction.FAIL, description="`on_empty` of SAE pairs not listed.")
    key_size_bits: Count = Field(
        256, alias="key_size", ge=64, le=8192, description="Default key size in bits (ETSI 014 `key_size`), a multiple of 8."
    )
    stock_keys: Count = Field(
        32, ge=1, le=100_000,
        description="Keys of the default size each KME keeps ready per remote KME it serves (relayed ahead of demand).",
    )
    max_keys_per_request: Count = Field(128, ge=1, le=10_000, description="ETSI 014 `max_key_per_request`.")
    relay_timeout_s: PositiveDuration = Field(
        2.0, alias="relay_timeout", description="A relayed key not confirmed end to end within this is dropped and relayed again."
    )
    host: str = Field(
        "127.0.0.1", pattern=r"^[0-9a-fA-F.:]{2,45}$",
        description="Address the KMEs' HTTPS servers bind (local runtime); 127.0.0.1 unless you publish them.",
    )

    @field_validator("key_size_bits")
    @classmethod
    def _whole_bytes(cls, value: int) -> int:
        if value % 8:
            raise _error("key_size", f"key_size must be a multiple of 8, got {value}")
        return value

    def sae_nodes(self) -> dict[str, str]:
        return {sae.id: sae.node for sae in self.saes}


def _kms_issues(kms: Kms | None, topo: Topology | None) -> list[FieldIssue]:
    """SAE ids unique, on declared nodes that have a QKD link; policies name known SAEs."""
    if kms is None:
        return []
    issues: list[FieldIssue] = []
    seen: dict[str, int] = {}
    qkd_nodes = {node for pair in (topo.qkd if topo else {}) for node in pair}
    for i, sae in enumerate(kms.saes):
        if sae.id in seen:
            issues.append(FieldIssue(("kms", "saes", i, "id"), f"duplicate SAE id {sae.id!r} (first: kms.saes[{seen[sae.id]}])"))
        seen.setdefault(sae.id, i)
        if sae.id.startswith("kme-"):
            issues.append(FieldIssue(("kms", "saes", i, "id"),
                                     f"SAE id {sae.id!r} starts with 'kme-', which names KME certificates"))
        if topo is not None and sae.node not in topo.nodes:
            issues.append(FieldIssue(("kms", "saes", i, "node"),
                                     f"unknown node {sae.node!r} (declared nodes: {_listing(topo.nodes)})"))
        elif topo is not None and sae.node not in qkd_nodes:
            issues.append(FieldIssue(("kms", "saes", i, "node"),
                                     f"node {sae.node!r} has no QKD link, so it runs no KME; give one of its links "
                                     "a `qkd` section"))
    for node in sorted(qkd_nodes):
        if len(node) > 60:  # its KME certificate's CN `kme-<node>` must fit RFC 5280's 64 characters
            issues.append(FieldIssue(("kms",), f"node name {node!r} is too long for a KME (at most 60 characters)"))
    pairs: dict[frozenset[str], int] = {}
    for i, policy in enumerate(kms.policies):
        for j, sae_id in enumerate(policy.saes):
            if sae_id not in seen:
                issues.append(FieldIssue(("kms", "policies", i, "saes", j),
                                         f"unknown SAE {sae_id!r} (SAEs: {_listing(frozenset(seen))})"))
        if policy.saes[0] == policy.saes[1]:
            issues.append(FieldIssue(("kms", "policies", i, "saes"), "a policy names two different SAEs"))
        pair = frozenset(policy.saes)
        if pair in pairs:
            issues.append(FieldIssue(("kms", "policies", i, "saes"),
                                     f"a second policy for this pair (the first is kms.policies[{pairs[pair]}])"))
        pairs.setdefault(pair, i)
    return issues


class Expectation(_Model):
    """A bound on a metric the run must satisfy; give `min`, `max` or both."""

    metric: MetricName = Field(description="Metric to test, see [Metrics](#metrics).")
    app: Name | None = Field(None, description="Name of the app the metric belongs to (metrics of scope `app`).")
    min: Number | None = Field(None, description="Lowest acceptable value (inclusive).")
    max: Number | None = Field(None, description="Highest acceptable value (inclusive).")

    @field_validator("max")
    @classmethod
    def _max_not_below_min(cls, maximum: float | None, info: ValidationInfo) -> float | None:
        minimum = info.data.get("min")
        if maximum is not None and minimum is not None and maximum < minimum:
            raise _error("max_below_min", f"max ({maximum:g}) is below min ({minimum:g})")
        return maximum

    @model_validator(mode="after")
    def _some_bound(self) -> Expectation:
        if self.min is None and self.max is None:
            raise _error("no_bound", "an expectation needs min, max or both")
        return self

    def holds(self, value: float) -> bool:
        """Whether a measured value satisfies the bounds (NaN never does)."""
        if math.isnan(value):
            return False
        return (self.min is None or value >= self.min) and (self.max is None or value <= self.max)


class Fault(_Model):
    """A fault the runtime injects at the process or container boundary, or an eavesdropper on a QKD link.

    At `at` the fault is applied to its target (a `node` or a `link`, as its
    `kind` says); after `for` it is reverted. Times are emulated and count from the
    instant every node has registered, like an app's `start`. Faults on the same
    target may not overlap in time; a fault without `for` lasts until the run ends,
    except `node-restart`, which then starts the node again at once. A `for` may
    run past `duration`: when the run ends, frozen nodes are resumed and cut links
    restored before everything stops. External nodes cannot be crashed, restarted
    or frozen: qnetem did not start them. The `qkd-*` kinds switch the eavesdropper
    in the broker's optics of a link with a `qkd` section; they may not overlap each
    other on one link (they set its eavesdropper as a whole) but may overlap a
    `link-cut` of that link (which cuts the classical channel, not the photons).
    A `fibre-cut` cuts the classical channel as `link-cut` does and, in the broker,
    the link's quantum channel (no pair, no qubit, no photon); it works on any link
    and may not overlap a `link-cut` or another `fibre-cut` of that link.
    See [Fault kinds](#fault-kinds).
    """

    kind: FaultKind = Field(description="What to inject, see [Fault kinds](#fault-kinds).")
    at_s: Duration = Field(
        alias="at", description="When to apply the fault, in emulated time after all nodes registered; before `duration`."
    )
    node: Name | None = Field(
        None, validate_default=True,
        description="The node, for `node-*` kinds (required there, not allowed for the link kinds); "
                    "not an external node.",
    )
    link: tuple[Name, Name] | None = Field(
        None, validate_default=True,
        description="The endpoints of an existing link, either order, for `link-cut`, `fibre-cut` and the "
                    "`qkd-*` kinds (required there, not allowed otherwise).",
    )
    for_s: PositiveDuration | None = Field(
        None, alias="for",
        description="How long the fault lasts before it is reverted, > 0; absent: until the run ends "
                    "(`node-restart`: the node is started again at once).",
    )
    fraction: Number | None = Field(
        None, validate_default=True,
        description="For `qkd-intercept-resend` (required there, not allowed otherwise): the share of the pulses "
                    "Eve intercepts and resends, > 0 and <= 1; the QBER rises by about fraction/4.",
    )

    @field_validator("node")
    @classmethod
    def _node_matches_kind(cls, node: str | None, info: ValidationInfo) -> str | None:
        kind = info.data.get("kind")
        if isinstance(kind, FaultKind):
            if kind.target is FaultTarget.NODE and node is None:
                raise _error("fault_node_missing", f"missing required field 'node': {kind} acts on a node")
            if kind.target is FaultTarget.LINK and node is not None:
                raise _error("fault_node_forbidden",
                             f"{kind} acts on a link, not a node: remove `node` and give `link: [a, b]`")
        return node

    @field_validator("link")
    @classmethod
    def _link_matches_kind(cls, link: tuple[str, str] | None, info: ValidationInfo) -> tuple[str, str] | None:
        kind = info.data.get("kind")
        if isinstance(kind, FaultKind):
            if kind.target is FaultTarget.LINK and link is None:
                raise _error("fault_link_missing", f"missing required field 'link': {kind} acts on a link, give `link: [a, b]`")
            if kind.target is FaultTarget.NODE and link is not None:
                raise _error("fault_link_forbidden", f"{kind} acts on a node, not a link: remove `link` and give `node`")
        return link

    @field_validator("fraction")
    @classmethod
    def _fraction_matches_kind(cls, fraction: float | None, info: ValidationInfo) -> float | None:
        kind = info.data.get("kind")
        if isinstance(kind, FaultKind):
            if kind.takes_fraction and fraction is None:
                raise _error("fault_fraction_missing",
                             f"missing required field 'fraction': {kind} intercepts this share of the pulses, "
                             "> 0 and <= 1 (e.g. 0.5)")
            if not kind.takes_fraction and fraction is not None:
                raise _error("fault_fraction_forbidden",
                             f"{kind} takes no `fraction` (only qkd-intercept-resend does): remove it")
        if fraction is not None and not 0.0 < fraction <= 1.0:
            raise _error("fault_fraction_range", f"fraction must be > 0 and <= 1, got {fraction:g}")
        return fraction

    @property
    def end_s(self) -> float:
        """When the fault stops being in force: `at + for`; without `for` inf (`node-restart`: `at`)."""
        if self.for_s is not None:
            return self.at_s + self.for_s
        return math.inf if self.kind.lasts_to_end_without_for else self.at_s

    def describe(self) -> str:
        """`node-crash bob at 2 s for 3 s`, `qkd-intercept-resend [alice, bob] fraction 0.5 at 8 s until the end`."""
        target = self.node if self.link is None else f"[{self.link[0]}, {self.link[1]}]"
        if self.fraction is not None:
            target = f"{target} fraction {self.fraction:g}"
        text = f"{self.kind} {target} at {_fmt_s(self.at_s)}"
        if self.for_s is not None:
            return f"{text} for {_fmt_s(self.for_s)}"
        return f"{text} until the end" if self.kind.lasts_to_end_without_for else text


def _readonly_mapping(value: dict[str, Node]) -> Mapping[str, Node]:
    return types.MappingProxyType(value)


NodeMap = Annotated[
    Mapping[Name, Node],
    Field(min_length=2, max_length=1024),
    AfterValidator(_readonly_mapping),
    WrapSerializer(lambda value, handler: handler(dict(value))),
]

_SKIP_CROSS_CHECKS: Final = "qnetem.skip_cross_checks"


class Scenario(_Model):
    """A whole scenario: the network, what runs on it and what must come out.

    The top level of a scenario file.
    """

    name: Name = Field(description="Scenario name; prefixes process and container names.")
    description: str = Field("", max_length=10_000, description="Free text.")
    seed: Count = Field(0, ge=0, le=2**63 - 1, description="Seed of every random generator of the run, 0 to 2^63-1.")
    duration_s: PositiveDuration = Field(alias="duration", description="Emulated time after which the run stops.")
    time_scale: PositiveFloat = Field(
        1.0, description="Wall-clock seconds per emulated second (> 1 slows the emulation down)."
    )
    defaults: Defaults = Field(default_factory=Defaults, description="Defaults for node memories and links.")
    nodes: NodeMap = Field(description="Nodes by name, at least 2 (a node with no settings: `alice: {}`).")
    links: tuple[Link, ...] = Field((), max_length=4096, description="Links between nodes; at most one per pair.")
    apps: tuple[App, ...] = Field((), max_length=1024, description="Apps to run, each selected by its `kind`.")
    expect: tuple[Expectation, ...] = Field((), max_length=1024, description="Expectations checked at the end of the run.")
    faults: tuple[Fault, ...] = Field(
        (), max_length=1024, description="Faults injected during the run, see [Fault](#fault)."
    )
    kms: Kms | None = Field(None, description="Key management (KMEs, SAEs, key policies), see [Kms](#kms).")

    @model_validator(mode="before")
    @classmethod
    def _prepare_data(cls, data: Any) -> Any:
        return _prepare(data)

    @model_validator(mode="after")
    def _cross_checks(self, info: ValidationInfo) -> Scenario:
        # check_data runs these checks itself, with a location per problem;
        # direct construction gets them here, in one message.
        if info.context and info.context.get(_SKIP_CROSS_CHECKS):
            return self
        links = [
            _LinkFacts(i, link.endpoints, link.entanglement is not None, link.qkd is not None, link.qkd_transmitter)
            for i, link in enumerate(self.links)
        ]
        issues = _topology_issues(
            frozenset(self.nodes), links, list(enumerate(self.apps)), list(enumerate(self.expect)),
            self.duration_s, None, self.kms,
        )
        issues += _fault_issues(
            {name: node.external for name, node in self.nodes.items()},
            [link.endpoints for link in links],
            list(enumerate(self.faults)),
            self.duration_s,
            frozenset(frozenset(link.endpoints) for link in links if link.qkd),
        )
        if issues:
            raise _error("scenario", "; ".join(f"{format_path(i.loc)}: {i.message}" for i in issues))
        return self

    def __hash__(self) -> int:
        # The generated hash would choke on the read-only `nodes` mapping.
        return hash(tuple(
            tuple(value.items()) if isinstance(value, Mapping) else value for value in self.__dict__.values()
        ))

    @classmethod
    def metric_names(cls) -> tuple[str, ...]:
        """Names of the metrics expectations may test (the METRICS registry, sorted)."""
        return tuple(sorted(METRICS))

    def link(self, a: str, b: str) -> Link | None:
        """The link between nodes `a` and `b` (either order), or None."""
        pair = frozenset((a, b))
        return next((link for link in self.links if link.pair == pair), None)

    def app(self, name: str) -> AppBase:
        """The app called `name`; KeyError if there is none."""
        for app in self.apps:
            if app.name == name:
                return app
        raise KeyError(name)

    def topology(self) -> Topology:
        """Nodes and links as sets, for graph questions."""
        return Topology(
            nodes=frozenset(self.nodes),
            links=frozenset(link.pair for link in self.links),
            entangling=frozenset(link.pair for link in self.links if link.entanglement is not None),
            qkd={link.pair: link.qkd_transmitter for link in self.links if link.qkd is not None},
            saes=self.kms.sae_nodes() if self.kms is not None else None,
        )


# ---------------------------------------------------------------------------
# Preparation and cross-field checks
# ---------------------------------------------------------------------------

_DEFAULTS_ADAPTER: Final = TypeAdapter(Defaults)
_ENDPOINTS_ADAPTER: Final = TypeAdapter(tuple[Name, Name])
_APP_ADAPTER: Final = TypeAdapter(App)
_EXPECTATION_ADAPTER: Final = TypeAdapter(Expectation)
_FAULT_ADAPTER: Final = TypeAdapter(Fault)
_KMS_ADAPTER: Final = TypeAdapter(Kms)


def _prepare(data: Any) -> Any:
    """Merge `defaults`, name unnamed apps, turn empty nodes into `{}`; idempotent.

    Works on raw (just-parsed) data of any shape: what does not look as
    expected is left alone for validation to report.
    """
    if not isinstance(data, dict):
        return data
    out = dict(data)
    raw_defaults = data.get("defaults")
    memory_defaults: dict[Any, Any] = {}
    link_defaults: dict[Any, Any] = {}
    if isinstance(raw_defaults, dict):
        try:
            _DEFAULTS_ADAPTER.validate_python(raw_defaults)
        except ValidationError:
            pass  # reported at `defaults`; merge nothing
        else:
            # Merge the values as written (not the normalised dump), so rules
            # such as "t2 omitted = 2·t1" see what the author actually set.
            memory_defaults = raw_defaults.get("memory") or {}
            link_defaults = raw_defaults.get("link") or {}

    nodes = data.get("nodes")
    if isinstance(nodes, dict):
        merged_nodes: dict[Any, Any] = {}
        for key, node in nodes.items():
            if node is None:
                node = {}
            if isinstance(node, dict) and memory_defaults:
                memory = node.get("memory", None) if "memory" in node else {}
                if isinstance(memory, dict):
                    node = {**node, "memory": {**memory_defaults, **memory}}
            merged_nodes[key] = node
        out["nodes"] = merged_nodes

    links = data.get("links")
    if isinstance(links, list) and link_defaults:
        merged_links: list[Any] = []
        for link in links:
            if isinstance(link, dict):
                link = dict(link)
                for key, value in link_defaults.items():
                    if key not in link:
                        link[key] = value
                    elif key == "classical" and isinstance(link[key], dict) and isinstance(value, dict):
                        link[key] = {**value, **link[key]}
            merged_links.append(link)
        out["links"] = merged_links

    apps = data.get("apps")
    if isinstance(apps, list):
        named: list[Any] = []
        for index, app in enumerate(apps):
            if isinstance(app, dict) and "name" not in app:
                kind = app.get("kind")
                if isinstance(kind, str) and kind in APP_KINDS:
                    app = {**app, "name": f"{kind}-{index}"}
            named.append(app)
        out["apps"] = named

    faults = data.get("faults")
    if isinstance(faults, list) and isinstance(links, list) and isinstance(nodes, dict):
        out["faults"] = _normalise_fault_links(faults, links, nodes)
    return out


def _as_pair(value: Any) -> tuple[str, str] | None:
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, str) for v in value):
        return (value[0], value[1])
    return None


def _normalise_fault_links(faults: list[Any], links: list[Any], nodes: dict[Any, Any]) -> list[Any]:
    """Write each fault's `link` in the order its link declares the endpoints.

    Only a reversed pair of declared nodes that some link names is swapped, so a
    problem found later at `link[0]` or `link[1]` still points at what the file says.
    """
    declared = {k for k in nodes if isinstance(k, str)}
    orders: set[tuple[str, str]] = set()
    for link in links:
        pair = _as_pair(link.get("endpoints")) if isinstance(link, dict) else None
        if pair is not None and pair[0] != pair[1] and set(pair) <= declared:
            orders.add(pair)
    out: list[Any] = []
    for fault in faults:
        pair = _as_pair(fault.get("link")) if isinstance(fault, dict) else None
        if pair is not None and pair not in orders and (pair[1], pair[0]) in orders:
            fault = {**fault, "link": [pair[1], pair[0]]}
        out.append(fault)
    return out


def _listing(names: frozenset[str] | set[str]) -> str:
    shown = sorted(names)
    if len(shown) > 8:
        return ", ".join(shown[:8]) + f", ... ({len(shown)} in all)"
    return ", ".join(shown) if shown else "none"


def _fmt_s(seconds: float) -> str:
    return "inf" if math.isinf(seconds) else f"{seconds:g} s"


@dataclass(frozen=True, slots=True)
class FieldIssue:
    """One problem at a location of the scenario data."""

    loc: Loc
    message: str
    #: The mapping key itself is at fault (unknown field, bad name), not its value.
    on_key: bool = False


@dataclass(frozen=True, slots=True)
class _LinkFacts:
    """What the cross-checks need of one link that is valid enough to name its endpoints."""

    index: int
    endpoints: tuple[str, str]
    entanglement: bool
    qkd: bool = False
    #: The QKD transmitter as written or by default (the first endpoint); None when the
    #: `qkd` section is too broken to tell (its own problem is reported where it is).
    qkd_transmitter: str | None = None


def _topology_issues(
    node_names: frozenset[str] | None,
    links: Sequence[_LinkFacts],
    apps: Sequence[tuple[int, AppBase]],
    expectations: Sequence[tuple[int, Expectation]],
    duration_s: float | None,
    more_app_names: frozenset[str] | None,
    kms: Kms | None = None,
    kms_declared: bool | None = None,
) -> list[FieldIssue]:
    """The cross-field checks, on items that are valid on their own.

    `node_names` None means the `nodes` section itself is broken: node
    existence is then not checked (every reference would be flagged).
    `more_app_names` are names of apps that failed validation, so expectations
    naming them are not also reported as dangling.
    """
    issues: list[FieldIssue] = []
    first_index: dict[frozenset[str], int] = {}
    entangling: set[frozenset[str]] = set()
    qkd: dict[frozenset[str], str | None] = {}
    for link in links:
        i, (a, b) = link.index, link.endpoints
        ok = True
        if node_names is not None:
            for j, node in enumerate((a, b)):
                if node not in node_names:
                    issues.append(FieldIssue(("links", i, "endpoints", j),
                                             f"unknown node {node!r} (declared nodes: {_listing(node_names)})"))
                    ok = False
        if a == b:
            issues.append(FieldIssue(("links", i, "endpoints", 1),
                                     f"a link joins two different nodes; both endpoints are {a!r}"))
            ok = False
        if not ok:
            continue
        pair = frozenset((a, b))
        if pair in first_index:
            issues.append(FieldIssue(("links", i, "endpoints"),
                                     f"duplicate link between {a!r} and {b!r} (first declared as links[{first_index[pair]}])"))
            continue
        first_index[pair] = i
        if link.entanglement:
            entangling.add(pair)
        if link.qkd:
            transmitter = link.qkd_transmitter
            if transmitter is not None and transmitter not in (a, b):
                issues.append(FieldIssue(("links", i, "qkd", "transmitter"),
                                         f"the transmitter must be an endpoint of the link ({a!r} or {b!r}), "
                                         f"got {transmitter!r}"))
                transmitter = None
            qkd[pair] = transmitter

    topo = None
    if node_names is not None:
        topo = Topology(nodes=node_names, links=frozenset(first_index), entangling=frozenset(entangling), qkd=qkd,
                        saes=kms.sae_nodes() if kms is not None else None)
    issues.extend(_kms_issues(kms, topo))

    app_kinds: dict[str, str] = {}
    qkd_apps: dict[frozenset[str], tuple[int, str]] = {}  # link -> (index, name) of its qkd app
    declared_apps = {app.name for _, app in apps} | set(more_app_names or ())
    for i, app in apps:
        if app.name in app_kinds:
            issues.append(FieldIssue(("apps", i, "name"), f"duplicate app name {app.name!r}"))
        else:
            app_kinds[app.name] = app.kind
        if topo is not None:
            issues.extend(FieldIssue(("apps", i, *sub), message) for sub, message in app.topology_issues(topo))
        app_duration_s = getattr(app, "duration_s", None)
        if duration_s is not None and app.start_s >= duration_s:
            issues.append(FieldIssue(("apps", i, "start"),
                                     f"starts at {_fmt_s(app.start_s)}, not before the end of the run ({_fmt_s(duration_s)})"))
        elif duration_s is not None and app_duration_s is not None and app.start_s + app_duration_s >= duration_s:
            issues.append(FieldIssue(("apps", i, "duration"),
                                     f"runs until {_fmt_s(app.start_s + app_duration_s)}, not before the end of the "
                                     f"run ({_fmt_s(duration_s)}); leave time for the last block's post-processing"))
        if topo is not None and isinstance(app, QkdApp) and frozenset(app.nodes) in topo.qkd:
            pair = frozenset(app.nodes)
            if pair in qkd_apps:
                j, first = qkd_apps[pair]
                issues.append(FieldIssue(("apps", i, "nodes"),
                                         f"a second qkd app on the link between {app.nodes[0]!r} and {app.nodes[1]!r} "
                                         f"(the first is apps[{j}], {first!r}): the link's bootstrap authentication "
                                         "key serves one QKD session per link and run"))
            else:
                qkd_apps[pair] = (i, app.name)

    for i, expectation in expectations:
        spec = METRICS.get(expectation.metric)
        if spec is not None and spec.scope is MetricScope.KMS:
            if expectation.app is not None:
                issues.append(FieldIssue(("expect", i, "app"),
                                         f"metric {spec.name!r} is measured for the run's key management; drop `app`"))
            elif not (kms is not None if kms_declared is None else kms_declared):
                issues.append(FieldIssue(("expect", i, "metric"),
                                         f"metric {spec.name!r} needs a `kms` section"))
            continue
        if spec is None or spec.scope is not MetricScope.APP:
            continue
        if expectation.app is None:
            issues.append(FieldIssue(("expect", i),
                                     f"metric {spec.name!r} is measured per app: add `app: <name>` "
                                     f"(apps: {_listing(declared_apps)})"))
        elif expectation.app in app_kinds:
            kind = app_kinds[expectation.app]
            if spec.app_kinds and kind not in spec.app_kinds:
                issues.append(FieldIssue(("expect", i, "metric"),
                                         f"app {expectation.app!r} ({kind}) does not produce metric {spec.name!r}"))
        elif more_app_names is None or expectation.app not in more_app_names:
            issues.append(FieldIssue(("expect", i, "app"),
                                     f"unknown app {expectation.app!r} (apps: {_listing(declared_apps)})"))
    return issues


def _windows_overlap(a: Fault, b: Fault) -> bool:
    """Whether two faults on one target are in force at a common instant.

    A fault holds its target over [at, end): one that ends at t and one that
    starts at t do not overlap (the runtime reverts the first, then applies the
    second).  An instantaneous `node-restart` (no `for`) occupies the instant `at`.
    """
    (s1, e1), (s2, e2) = (a.at_s, a.end_s), (b.at_s, b.end_s)
    if s1 == s2:
        return True
    if s1 == e1:
        return s2 <= s1 < e2
    if s2 == e2:
        return s1 <= s2 < e1
    return s1 < e2 and s2 < e1


def _fault_issues(
    nodes: Mapping[str, bool] | None,
    links: Sequence[tuple[str, str]],
    faults: Sequence[tuple[int, Fault]],
    duration_s: float | None,
    qkd_links: frozenset[frozenset[str]] = frozenset(),
) -> list[FieldIssue]:
    """Cross-field checks of `faults`, on faults that are valid on their own.

    `nodes` maps each declared node to its `external` flag (None: the `nodes`
    section is broken, node existence is not checked); `links` are the declared
    endpoint pairs in file order, `qkd_links` those with a `qkd` section.

    Targets for the overlap rule: a node, a link's classical channel (`link-cut` and
    `fibre-cut`, which cuts it too), a link's eavesdropper (the `qkd-*` kinds, which
    set it as a whole). A classical cut and a `qkd-*` fault on one link act on
    different things and may overlap.
    """
    issues: list[FieldIssue] = []
    pairs = {frozenset(pair) for pair in links if pair[0] != pair[1]}
    checked: list[tuple[int, Fault, tuple[str, ...]]] = []  # faults whose target is sound
    for i, fault in faults:
        target: tuple[str, ...] | None = None
        if fault.node is not None:
            if nodes is not None and fault.node not in nodes:
                issues.append(FieldIssue(("faults", i, "node"),
                                         f"unknown node {fault.node!r} (declared nodes: {_listing(frozenset(nodes))})"))
            elif nodes is not None and nodes[fault.node]:
                verb = fault.kind.value.partition("-")[2]
                issues.append(FieldIssue(("faults", i, "node"),
                                         f"node {fault.node!r} is external; qnetem cannot {verb} a process it did not start"))
            else:
                target = ("node", fault.node)
        elif fault.link is not None:
            a, b = fault.link
            ok = True
            if nodes is not None:
                for j, node in enumerate((a, b)):
                    if node not in nodes:
                        issues.append(FieldIssue(("faults", i, "link", j),
                                                 f"unknown node {node!r} (declared nodes: {_listing(frozenset(nodes))})"))
                        ok = False
            if ok and a == b:
                issues.append(FieldIssue(("faults", i, "link", 1),
                                         f"a link joins two different nodes; both endpoints are {a!r}"))
                ok = False
            if ok and frozenset((a, b)) not in pairs:
                shown = ", ".join(f"[{x}, {y}]" for x, y in links[:8]) or "none"
                issues.append(FieldIssue(("faults", i, "link"), f"no link between {a!r} and {b!r} (links: {shown})"))
                ok = False
            if ok and fault.kind.eavesdrops and frozenset((a, b)) not in qkd_links:
                issues.append(FieldIssue(("faults", i, "link"),
                                         f"{fault.kind} needs a QKD link: the link between {a!r} and {b!r} has no "
                                         "`qkd` section"))
                ok = False
            if ok:
                target = ("eve" if fault.kind.eavesdrops else "link", *sorted((a, b)))
        if duration_s is not None and fault.at_s >= duration_s:
            issues.append(FieldIssue(("faults", i, "at"),
                                     f"at {_fmt_s(fault.at_s)}, not before the end of the run ({_fmt_s(duration_s)})"))
        if target is None:
            continue
        clash = next(((j, other) for j, other, t in checked if t == target and _windows_overlap(other, fault)), None)
        if clash is not None:
            j, other = clash
            if target[0] == "node":
                what = f"node {target[1]!r}"
            else:
                what = f"link [{target[1]}, {target[2]}]"
                what = f"the eavesdropper of {what}" if target[0] == "eve" else what
            issues.append(FieldIssue(("faults", i),
                                     f"{fault.describe()} overlaps faults[{j}] ({other.describe()}) on {what}; "
                                     "faults on one target must not overlap in time"))
        checked.append((i, fault, target))
    return issues


def _valid_items(raw: Any, adapter: TypeAdapter[Any]) -> list[tuple[int, Any]]:
    if not isinstance(raw, list):
        return []
    items = []
    for i, item in enumerate(raw):
        try:
            items.append((i, adapter.validate_python(item)))
        except ValidationError:
            pass  # reported by the model validation
    return items


def _raw_cross_issues(data: Any) -> list[FieldIssue]:
    """Cross-field checks on prepared raw data, item by item (see module doc)."""
    if not isinstance(data, dict):
        return []
    nodes = data.get("nodes")
    node_names = frozenset(k for k in nodes if _is_name(k)) if isinstance(nodes, dict) else None
    links = []
    raw_links = data.get("links")
    if isinstance(raw_links, list):
        for i, link in enumerate(raw_links):
            if not isinstance(link, dict):
                continue
            try:
                a, b = _ENDPOINTS_ADAPTER.validate_python(link.get("endpoints"))
            except ValidationError:
                continue
            raw_qkd = link.get("qkd")
            transmitter: str | None = None
            if isinstance(raw_qkd, dict):
                written = raw_qkd.get("transmitter")
                transmitter = a if written is None else (written if _is_name(written) else None)
            links.append(_LinkFacts(i, (a, b), link.get("entanglement") is not None, raw_qkd is not None, transmitter))
    apps = _valid_items(data.get("apps"), _APP_ADAPTER)
    raw_apps = data.get("apps")
    all_app_names = frozenset(
        app["name"] for app in (raw_apps if isinstance(raw_apps, list) else ())
        if isinstance(app, dict) and _is_name(app.get("name"))
    )
    expectations = _valid_items(data.get("expect"), _EXPECTATION_ADAPTER)
    try:
        duration_s: float | None = parse_positive_duration_s(data.get("duration"))
    except UnitError:
        duration_s = None
    kms = None
    if isinstance(data.get("kms"), dict):
        try:
            kms = _KMS_ADAPTER.validate_python(data["kms"])
        except ValidationError:
            pass  # reported at `kms`
    issues = _topology_issues(node_names, links, apps, expectations, duration_s, all_app_names, kms,
                              data.get("kms") is not None)
    external = None
    if node_names is not None and isinstance(nodes, dict):
        external = {k: isinstance(v, dict) and v.get("external") is True for k, v in nodes.items() if k in node_names}
    faults = _valid_items(data.get("faults"), _FAULT_ADAPTER)
    issues += _fault_issues(external, [link.endpoints for link in links], faults, duration_s,
                            frozenset(frozenset(link.endpoints) for link in links if link.qkd))
    return issues


# ---------------------------------------------------------------------------
# Pydantic errors -> FieldIssue
# ---------------------------------------------------------------------------


def _strip_annotated(tp: Any) -> tuple[Any, str | None]:
    """Remove Annotated/Optional layers; return the type and a discriminator if any."""
    discriminator = None
    while True:
        if typing.get_origin(tp) is Annotated:
            base, *meta = typing.get_args(tp)
            for m in meta:
                if isinstance(m, FieldInfo) and isinstance(m.discriminator, str):
                    discriminator = m.discriminator
            tp = base
            continue
        if typing.get_origin(tp) in (Union, types.UnionType):
            members = [a for a in typing.get_args(tp) if a is not type(None)]
            if len(members) == 1:
                tp = members[0]
                continue
        return tp, discriminator


def _union_members(tp: Any) -> tuple[Any, ...]:
    if typing.get_origin(tp) in (Union, types.UnionType):
        return tuple(typing.get_args(tp))
    return (tp,)


def _tag_of(model: Any, discriminator: str) -> str | None:
    field = getattr(model, "model_fields", {}).get(discriminator)
    if field is None or typing.get_origin(field.annotation) is not Literal:
        return None
    return str(typing.get_args(field.annotation)[0])


def _field_by_key(model: type[BaseModel], key: str) -> FieldInfo | None:
    for name, field in model.model_fields.items():
        if (field.alias or name) == key:
            return field
    return None


def _keys_of(model: type[BaseModel]) -> list[str]:
    return [field.alias or name for name, field in model.model_fields.items()]


@dataclass(frozen=True, slots=True)
class _Resolved:
    loc: Loc  # tags and [key] markers removed
    on_key: bool
    allowed: tuple[str, ...]  # keys of the model where the last key was not found
    union_tags: tuple[str, ...]  # tags of the discriminated union at the end of loc
    discriminator: str | None


def _resolve(loc: tuple[Any, ...]) -> _Resolved:
    """Follow a pydantic error location through the model types."""
    tp: Any = Scenario
    out: list[str | int] = []
    on_key = False
    allowed: tuple[str, ...] = ()
    for element in loc:
        if element == "[key]":
            on_key = True
            continue
        tp, discriminator = _strip_annotated(tp)
        if discriminator is not None and isinstance(element, str):
            # pydantic puts the tag of a discriminated union in the location
            tp = next((m for m in _union_members(tp) if _tag_of(m, discriminator) == element), None)
            continue
        origin = typing.get_origin(tp)
        if isinstance(tp, type) and issubclass(tp, BaseModel) and isinstance(element, str):
            field = _field_by_key(tp, element)
            if field is None:
                allowed = tuple(_keys_of(tp))
                tp = None
            else:
                tp = field.annotation
        elif origin in (tuple, list) and isinstance(element, int):
            args = typing.get_args(tp)
            if len(args) == 2 and args[1] is Ellipsis:
                tp = args[0]
            else:
                tp = args[element] if 0 <= element < len(args) else None
        elif origin in (dict, Mapping):
            tp = typing.get_args(tp)[1]
        else:
            tp = None
        out.append(element)
    tp, discriminator = _strip_annotated(tp)
    tags: tuple[str, ...] = ()
    if discriminator is not None:
        tags = tuple(t for t in (_tag_of(m, discriminator) for m in _union_members(tp)) if t is not None)
    return _Resolved(tuple(out), on_key, allowed, tags, discriminator)


def _issue_from_error(err: Any) -> FieldIssue:
    resolved = _resolve(tuple(err["loc"]))
    loc = resolved.loc
    kind = err["type"]
    ctx = err.get("ctx") or {}
    last = loc[-1] if loc else None
    if kind == "extra_forbidden":
        key = str(last)
        close = difflib.get_close_matches(key, resolved.allowed, n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r}?" if close else f" (allowed: {', '.join(resolved.allowed)})"
        return FieldIssue(loc, f"unknown field {key[:40]!r}{hint}", on_key=True)
    if kind == "missing":
        if isinstance(last, int):
            return FieldIssue(loc, f"missing list item [{last}]")
        return FieldIssue(loc, f"missing required field {last!r}")
    discriminator = resolved.discriminator or "kind"
    known = ", ".join(resolved.union_tags)
    if kind == "union_tag_invalid":
        tag = str(ctx.get("tag", ""))[:40]
        return FieldIssue((*loc, discriminator), f"unknown {discriminator} {tag!r} (known: {known})")
    if kind == "union_tag_not_found":
        return FieldIssue(loc, f"missing required field {discriminator!r} (one of: {known})")
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return FieldIssue(loc, "expected a mapping (key: value pairs)")
    message = str(err["msg"])
    if kind == "value_error" and message.startswith("Value error, "):
        message = message[len("Value error, "):]
    if message.startswith("Input should be "):
        message = "must be " + message[len("Input should be "):]
    message = message.replace(" after validation", "")
    return FieldIssue(loc, message, on_key=resolved.on_key)


def check_data(data: Any) -> tuple[Scenario | None, tuple[FieldIssue, ...]]:
    """Validate parsed scenario data: the Scenario, or None and every problem found."""
    prepared = _prepare(data)
    scenario: Scenario | None
    try:
        scenario = Scenario.model_validate(prepared, context={_SKIP_CROSS_CHECKS: True})
        issues = []
    except ValidationError as err:
        scenario = None
        issues = [_issue_from_error(e) for e in err.errors(include_url=False, include_input=False)]
    issues.extend(_raw_cross_issues(prepared))
    if issues:
        return None, tuple(issues)
    return scenario, ()


def format_path(loc: Loc) -> str:
    """`('links', 0, 'length_km')` -> `links[0].length_km`."""
    text = ""
    for element in loc:
        if isinstance(element, int) and not isinstance(element, bool):
            text += f"[{element}]"
        else:
            text += ("." if text else "") + str(element)
    return text


# ---------------------------------------------------------------------------
# Reference documentation
# ---------------------------------------------------------------------------

BEGIN_MARKER: Final = "<!-- BEGIN GENERATED REFERENCE: python -m emulator.scenario.schema --write docs/scenarios.md -->"
END_MARKER: Final = "<!-- END GENERATED REFERENCE -->"

_PRIMITIVES: Final = {bool: "boolean", str: "text", int: "integer", float: "number"}


def _anchor(title: str) -> str:
    return re.sub(r"[^a-z0-9 -]", "", title.lower()).replace(" ", "-")


def _app_title(cls: type[AppBase]) -> str:
    return f"App `{_tag_of(cls, 'kind')}`"


def _model_link(model: type[BaseModel]) -> str:
    title = _app_title(model) if issubclass(model, AppBase) and model is not AppBase else model.__name__
    return f"[{title.replace('`', '')}](#{_anchor(title)})"


def _type_label(tp: Any, metadata: Sequence[Any] = ()) -> str:
    for m in metadata:
        if isinstance(m, TypeDoc):
            return m.label
    if typing.get_origin(tp) is Annotated:
        base, *meta = typing.get_args(tp)
        discriminated = any(isinstance(m, FieldInfo) and m.discriminator for m in meta)
        if discriminated:
            return "app (by `kind`: " + ", ".join(_model_link(m) for m in _union_members(base)) + ")"
        return _type_label(base, meta)
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        members = [a for a in args if a is not type(None)]
        label = " or ".join(_type_label(m) for m in members)
        return label + (" (optional)" if len(members) < len(args) else "")
    if origin in (tuple, list):
        if len(args) == 2 and args[1] is Ellipsis:
            return f"list of {_type_label(args[0])}"
        if len(args) == 2 and args[0] == args[1]:
            return f"pair of {_type_label(args[0])}"
        return "list [" + ", ".join(_type_label(a) for a in args) + "]"
    if origin in (dict, Mapping):
        return f"mapping of {_type_label(args[0])} to {_type_label(args[1])}"
    if origin is Literal:
        return " or ".join(f"`{a}`" for a in args)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "one of " + ", ".join(f"`{m.value}`" for m in tp)
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return _model_link(tp)
    return _PRIMITIVES.get(tp, getattr(tp, "__name__", str(tp)))


def _default_label(field: FieldInfo) -> str:
    extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
    if "doc_default" in extra:
        return str(extra["doc_default"])
    if field.default_factory is not None:
        return "see " + _type_label(field.annotation)
    value = field.default
    if value is PydanticUndefined:
        return "required"
    if value is None:
        return "absent"
    if isinstance(value, enum.Enum):
        return f"`{value.value}`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, float):
        return "`inf`" if math.isinf(value) else f"`{value:g}`"
    if isinstance(value, (tuple, list)) and not value:
        return "`[]`"
    if isinstance(value, str) and not value:
        return '`""`'
    return f"`{value}`"


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _model_section(title: str, model: type[BaseModel]) -> list[str]:
    doc = typing.cast(str, model.__doc__ or "").strip()
    lines = [f"### {title}", ""]
    for paragraph in re.split(r"\n\s*\n", doc) if doc else ():
        lines += [" ".join(paragraph.split()), ""]
    lines += ["| Field | Type | Default | Description |", "|---|---|---|---|"]
    for name, field in model.model_fields.items():
        key = field.alias or name
        description = field.description or ""
        if field.alias and field.alias != name:
            description += f" (Python attribute `{name}`.)"
        lines.append(
            "| `{}` | {} | {} | {} |".format(
                key, _cell(_type_label(field.annotation, field.metadata)), _cell(_default_label(field)),
                _cell(description),
            )
        )
    lines.append("")
    return lines


_VALUE_TYPES: Final = (Name, Count, Number, PositiveFloat, NonNegativeFloat, Probability, OpenProbability, Efficiency,
                       Duration, PositiveDuration, Lifetime, Frequency, MetricName)


def render_reference() -> str:
    """The markdown field reference of the scenario schema (docs/scenarios.md)."""
    lines = ["## Reference", ""]
    models: list[tuple[str, type[BaseModel]]] = [
        ("Scenario", Scenario), ("Defaults", Defaults), ("LinkDefaults", LinkDefaults), ("Node", Node),
        ("Memory", Memory), ("Link", Link), ("ClassicalLink", ClassicalLink), ("Entanglement", Entanglement),
        ("QkdLink", QkdLink), ("QkdIntensities", QkdIntensities), ("QkdClassProbabilities", QkdClassProbabilities),
    ]
    models += [(_app_title(cls), cls) for cls in _APP_CLASSES]
    models += [("Kms", Kms), ("Sae", Sae), ("KeyPolicy", KeyPolicy), ("Expectation", Expectation), ("Fault", Fault)]
    for title, model in models:
        lines += _model_section(title, model)

    lines += ["### Fault kinds", "", "What each `kind` of [Fault](#fault) does.", "",
              "| Kind | Target | Effect |", "|---|---|---|"]
    for kind in FaultKind:
        lines.append(f"| `{kind.value}` | `{kind.target.value}` | {_cell(kind.description)} |")
    lines.append("")

    lines += ["### Metrics", "", "Metrics an expectation may test.", "",
              "| Metric | Scope | Unit | App kinds | Description |", "|---|---|---|---|---|"]
    for spec in sorted(METRICS.values(), key=lambda s: s.name):
        kinds = ", ".join(f"`{k}`" for k in sorted(spec.app_kinds)) or ("—" if spec.scope is MetricScope.KMS else "any")
        lines.append(f"| `{spec.name}` | {spec.scope.value} | {spec.unit or '—'} | {kinds} | {_cell(spec.description)} |")
    lines.append("")

    lines += ["### Value types", "", "| Type | Accepted values |", "|---|---|"]
    for tp in _VALUE_TYPES:
        doc = next(m for m in typing.get_args(tp)[1:] if isinstance(m, TypeDoc))
        lines.append(f"| {doc.label} | {_cell(doc.explanation)} |")
    lines.append("")

    lines += ["### Units", "",
              "Durations and frequencies are numbers in SI units (seconds, hertz) or numbers with a suffix; "
              "numeric strings such as `\"1e9\"` count as numbers. Fields whose name carries the unit "
              "(`length_km`) take plain numbers.", "",
              "| Quantity | Suffix | Factor |", "|---|---|---|"]
    for suffix, factor in DURATION_UNITS_S.items():
        lines.append(f"| duration | `{suffix}` | {factor:g} s |")
    for suffix, factor in FREQUENCY_UNITS_HZ.items():
        lines.append(f"| frequency | `{suffix}` | {factor:g} Hz |")
    return "\n".join(lines) + "\n"


def replace_generated_section(document: str, generated: str) -> str:
    """`document` with the text between the reference markers replaced by `generated`."""
    start = document.find(BEGIN_MARKER)
    end = document.find(END_MARKER)
    if start < 0 or end < start:
        raise ValueError(f"markers not found; the document needs a line {BEGIN_MARKER!r} and a line {END_MARKER!r}")
    head = document[: start + len(BEGIN_MARKER)]
    return f"{head}\n\n{generated}\n{document[end:]}"


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m emulator.scenario.schema [--write PATH]`: print or update the reference."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        sys.stdout.write(render_reference())
        return 0
    if len(args) == 2 and args[0] == "--write":
        with open(args[1], encoding="utf-8") as f:
            old = f.read()
        new = replace_generated_section(old, render_reference())
        if new != old:
            with open(args[1], "w", encoding="utf-8") as f:
                f.write(new)
        return 0
    sys.stderr.write("usage: python -m emulator.scenario.schema [--write docs/scenarios.md]\n")
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
