"""The orchestrator's decisions, without I/O: the run plan, registration, the timeline.

Theory of operation: `plan_from_scenario` turns a validated scenario into a `RunPlan`
(nodes to launch, apps with their start offsets, expectations, faults as `FaultPlan`s
whose apply/revert schedule `emulator.runtime.faults.FaultSchedule` keeps). The I/O shell
(`emulator.runtime.local`) then feeds the objects below with what it observes and acts
on what they say:

* `EmulatedClock` — the broker owns emulated time (DESIGN §3); every reply carrying
  the broker's `now_s` re-anchors the estimate `now_s + (mono - mono_at_reply) / time_scale`.
* `RegistrationTracker` — fed each `status_reply`, says which nodes newly registered and
  which are still missing.
* `Timeline` — origin = the emulated instant every node was registered. `due(now)` lists
  apps whose `start` offset has come; `observe(...)` digests each polled `app_status`
  into the app's state (pending → running → done | failed) and returns an `AppChanged`
  record on every transition; `finish_reason(now)` says when to stop: every app
  finished (not with key management: KMEs serve outside applications until the end),
  or `duration` emulated seconds elapsed since the origin (apps not finished then keep
  state `running`, so expectations on them fail with that reason).

Every app kind runs on two nodes: the responder is started first (so it is listening
when the initiator asks for pairs or opens the QKD session), then the initiator; the
initiator's results are the app's metrics. The app is done when the initiator is done,
failed when either end failed. What differs per kind is `AppPlan.settings` (the
`app_start` params both ends receive besides `role` and `peer`) and what progress is
counted in (`AppPlan.progress_metric`):

* `epr-test`: `{pairs, wait_s}`; progress in pairs measured (`pairs_measured`, rate
  `pair_rate_hz`), requested `pairs`.
* `qkd`: `{duration_s, key_bits, block_key_bits, cascade, epsilon_sec, epsilon_cor,
  qber_threshold, sample_fraction}` (`duration_s`, `key_bits` None when the scenario
  leaves them out); the first node is the link's QKD transmitter, the initiator.
  Progress in final key bits (`final_key_bits`, rate `secret_key_rate_bps`), requested
  `key_bits`, or, with only a `duration`, the app's running time against it.
* `tunnel`: `{saes: [sender SAE, receiver SAE], duration_s, rate_pps, payload_bytes,
  rekey_interval_s, key_size_bits}`. The *receiver* (the scenario's second node) is the
  initiator here, so the app's metrics are what arrived intact; progress in bytes
  carried (`bytes_carried`), against the sender's `duration`.

`RunPlan.kms` (`KmsPlan`) is the scenario's key management, None without a `kms`
section: the KME nodes (every endpoint of a QKD link), the SAEs and the per-pair
policies the driver sends to each KME in `kms_start`.

All times here are emulated seconds; nothing reads a clock.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

from emulator.report.results import AppOutcome, AppState, ExpectationSpec
from emulator.scenario import qkd_params as _qkd
from emulator.scenario.fault_kinds import FaultKind, FaultTarget

__all__ = [
    "AppChanged",
    "AppPlan",
    "AppProgress",
    "AppStartRequest",
    "EmulatedClock",
    "ExitCode",
    "FaultKind",
    "FaultPlan",
    "FaultTarget",
    "FinishReason",
    "NodePlan",
    "PlanError",
    "RegistrationTracker",
    "RunPlan",
    "Timeline",
    "plan_from_scenario",
]

_frozen = dataclasses.dataclass(frozen=True, slots=True)


class ExitCode(enum.IntEnum):
    """Exit status of `qnetem run` (DESIGN §11)."""

    OK = 0  # every expectation held
    EXPECTATION_FAILED = 1
    INVALID_INPUT = 2  # bad scenario, bad arguments
    RUNTIME_FAILURE = 3  # a process crashed, registration timed out, ...
    INTERRUPTED = 130  # Ctrl-C / SIGTERM (128 + SIGINT, the shell convention)


class FinishReason(enum.StrEnum):
    ALL_APPS_FINISHED = "all_apps_finished"
    DURATION_ELAPSED = "duration_elapsed"


class PlanError(ValueError):
    """The scenario asks for something this orchestrator cannot run (e.g. an unknown app kind)."""


#: App kinds this orchestrator knows how to start, and their roles in start order.
SUPPORTED_APP_KINDS: Mapping[str, tuple[str, ...]] = {
    "epr-test": ("responder", "initiator"),
    "qkd": ("responder", "initiator"),
    "tunnel": ("responder", "initiator"),
}

_PROGRESS: Mapping[str, tuple[str, str, str]] = {  # kind -> (progress metric, rate metric, unit)
    "epr-test": ("pairs_measured", "pair_rate_hz", "pairs"),
    "qkd": ("final_key_bits", "secret_key_rate_bps", "bits"),
    "tunnel": ("bytes_carried", "bytes_per_s", "bytes"),
}


@_frozen
class NodePlan:
    name: str
    role: str
    external: bool


@_frozen
class AppStartRequest:
    """One `app_start` to send: to `node`, in the order the plan lists them."""

    node: str
    role: str
    kind: str
    name: str
    params: Mapping[str, Any]


@_frozen
class AppPlan:
    """One scenario app as the orchestrator runs it.

    `settings` are the `app_start` params both ends receive besides `role` and `peer`
    (see the module docstring for each kind's); `start_s` is the offset from the
    timeline origin, emulated seconds.
    """

    name: str
    kind: str
    initiator: str
    responder: str
    start_s: float
    settings: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def nodes(self) -> tuple[str, str]:
        return (self.initiator, self.responder)

    def node_of(self, role: str) -> str:
        return self.initiator if role == "initiator" else self.responder

    @property
    def pairs(self) -> int | None:
        """epr-test: the pairs requested (None for other kinds)."""
        return self.settings.get("pairs") if self.kind == "epr-test" else None

    @property
    def wait_s(self) -> float | None:
        """epr-test: how long each pair waits in memory (None for other kinds)."""
        return self.settings.get("wait_s") if self.kind == "epr-test" else None

    @property
    def progress_metric(self) -> str:
        """The initiator's result that counts the app's progress."""
        return _PROGRESS[self.kind][0]

    @property
    def rate_metric(self) -> str:
        """The initiator's result that gives the app's rate per emulated second."""
        return _PROGRESS[self.kind][1]

    @property
    def unit(self) -> str:
        """What `progress_metric` counts (`pairs`, `bits`, `bytes`)."""
        return _PROGRESS[self.kind][2]

    @property
    def requested_amount(self) -> int | None:
        """How much `progress_metric` must reach for the app to be done, if the app says
        (epr-test: `pairs`; qkd: `key_bits`, None when it runs for a `duration` only)."""
        value = self.settings.get("key_bits" if self.kind == "qkd" else "pairs")
        return None if value is None else int(value)

    @property
    def running_limit_s(self) -> float | None:
        """qkd, tunnel: emulated seconds the app runs at most (its `duration`), else None."""
        value = self.settings.get("duration_s") if self.kind in ("qkd", "tunnel") else None
        return None if value is None else float(value)

    def requested(self) -> dict[str, Any]:
        """What the scenario asked of the app (results.json `apps.<name>.requested`)."""
        if self.kind == "qkd":
            return {"key_bits": self.settings.get("key_bits"), "duration_s": self.settings.get("duration_s"),
                    "start_s": self.start_s}  # fmt: skip
        if self.kind == "tunnel":
            return {"duration_s": self.settings.get("duration_s"), "start_s": self.start_s}
        return {"pairs": self.pairs, "wait_s": self.wait_s, "start_s": self.start_s}

    def start_requests(self) -> tuple[AppStartRequest, ...]:
        """The `app_start` calls for this app, responder first (it must be listening)."""
        common = dict(self.settings)
        return (
            AppStartRequest(
                self.responder, "responder", self.kind, self.name,
                {"role": "responder", "peer": self.initiator, **common},
            ),
            AppStartRequest(
                self.initiator, "initiator", self.kind, self.name,
                {"role": "initiator", "peer": self.responder, **common},
            ),
        )  # fmt: skip


@_frozen
class FaultPlan:
    """One scenario fault, as the runtime injects it (kinds: `emulator.scenario.fault_kinds`).

    `index` is 1-based (`fault 1` in events and messages); `at_s` and `for_s` are
    emulated seconds from the timeline origin; exactly one of `node` and `link` is
    set, as `kind.target` says; `link` is in the order the scenario's link lists
    its endpoints. `fraction` (in (0, 1]) is set for `qkd-intercept-resend` only.
    """

    index: int
    kind: FaultKind
    at_s: float
    for_s: float | None
    node: str | None = None
    link: tuple[str, str] | None = None
    fraction: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", FaultKind(self.kind))  # "node-crash" -> FaultKind.NODE_CRASH
        if self.link is not None:
            object.__setattr__(self, "link", tuple(self.link))
        if self.index < 1:
            raise ValueError(f"fault index is 1-based, got {self.index}")
        if not (math.isfinite(self.at_s) and self.at_s >= 0):
            raise ValueError(f"fault {self.index}: at_s must be finite and >= 0, got {self.at_s!r}")
        if self.for_s is not None and not (math.isfinite(self.for_s) and self.for_s > 0):
            raise ValueError(f"fault {self.index}: for_s must be finite and > 0 when given, got {self.for_s!r}")
        wants_node = self.kind.target is FaultTarget.NODE
        if wants_node != (self.node is not None) or wants_node == (self.link is not None):
            raise ValueError(f"fault {self.index}: {self.kind} needs exactly a {self.kind.target.value}")
        if self.kind.takes_fraction:
            if self.fraction is None or not (0.0 < self.fraction <= 1.0):
                raise ValueError(f"fault {self.index}: {self.kind} needs a fraction in (0, 1], got {self.fraction!r}")
        elif self.fraction is not None:
            raise ValueError(f"fault {self.index}: {self.kind} takes no fraction")

    @property
    def target_label(self) -> str:
        """`bob` for a node, `[alice, bob]` for a link (as the scenario writes them)."""
        if self.link is not None:
            return f"[{self.link[0]}, {self.link[1]}]"
        return str(self.node)

    @property
    def intercept_fraction(self) -> float:
        """The `intercept_fraction` of the broker's `qkd_eve` while the fault is in force."""
        return self.fraction if self.kind is FaultKind.QKD_INTERCEPT_RESEND and self.fraction is not None else 0.0

    @property
    def revert_s(self) -> float | None:
        """When the fault is reverted (timeline offset): `at + for`, `at` for a node-restart
        without `for`, None when it lasts until the run ends."""
        if self.for_s is not None:
            return self.at_s + self.for_s
        return None if self.kind.lasts_to_end_without_for else self.at_s

    def describe(self) -> str:
        """`node-crash bob at 2 s for 3 s`, `qkd-intercept-resend [alice, bob] fraction 0.5 at 8 s until the end`."""
        target = self.target_label if self.fraction is None else f"{self.target_label} fraction {self.fraction:g}"
        text = f"{self.kind.value} {target} at {self.at_s:g} s"
        if self.for_s is not None:
            return f"{text} for {self.for_s:g} s"
        return f"{text} until the end" if self.kind.lasts_to_end_without_for else text

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (for events.jsonl and results.json); `fraction` only when the kind has one."""
        out: dict[str, Any] = {
            "index": self.index,
            "kind": self.kind.value,
            "at_s": self.at_s,
            "for_s": self.for_s,
            "node": self.node,
            "link": None if self.link is None else list(self.link),
        }
        if self.fraction is not None:
            out["fraction"] = self.fraction
        out["description"] = self.describe()
        return out


@_frozen
class RunPlan:
    name: str
    seed: int
    duration_s: float
    time_scale: float
    nodes: tuple[NodePlan, ...]
    apps: tuple[AppPlan, ...]
    expectations: tuple[ExpectationSpec, ...]
    faults: tuple[FaultPlan, ...] = ()
    links: tuple[tuple[str, str], ...] = ()  # each classical link's two endpoints, scenario order
    kms: KmsPlan | None = None

    @property
    def node_names(self) -> tuple[str, ...]:
        return tuple(n.name for n in self.nodes)

    @property
    def launched_nodes(self) -> tuple[str, ...]:
        """Nodes the runtime starts (every node not marked external)."""
        return tuple(n.name for n in self.nodes if not n.external)

    @property
    def external_nodes(self) -> tuple[str, ...]:
        return tuple(n.name for n in self.nodes if n.external)


def _get(obj: Any, name: str, default: Any = None) -> Any:
    if isinstance(obj, Mapping):
        return obj.get(name, default)
    return getattr(obj, name, default)


def _first(obj: Any, names: Sequence[str], default: Any = None) -> Any:
    for name in names:
        value = _get(obj, name)
        if value is not None:
            return value
    return default


def plan_from_scenario(scenario: Any) -> RunPlan:
    """Build the run plan of a validated `Scenario` (or of its `scenario_to_dict` form)."""
    nodes = []
    raw_nodes = _get(scenario, "nodes") or {}
    items = raw_nodes.items() if isinstance(raw_nodes, Mapping) else ((_get(n, "name"), n) for n in raw_nodes)
    for name, spec in items:
        nodes.append(NodePlan(str(name), str(_get(spec, "role", "") or ""), bool(_get(spec, "external", False))))
    names = {n.name for n in nodes}

    apps = []
    for index, spec in enumerate(_get(scenario, "apps") or ()):
        kind = str(_get(spec, "kind"))
        if kind not in SUPPORTED_APP_KINDS:
            raise PlanError(f"apps[{index}]: kind {kind!r} is not supported by this orchestrator")
        name = str(_get(spec, "name") or f"{kind}-{index}")
        app_nodes = list(_get(spec, "nodes") or ())
        if len(app_nodes) != 2:
            raise PlanError(f"apps[{index}] ({name}): needs exactly two nodes [initiator, responder]")
        for node in app_nodes:
            if node not in names:
                raise PlanError(f"apps[{index}] ({name}): unknown node {node!r}")
        if kind == "qkd":
            settings = _qkd_settings(spec, index, name, app_nodes, _get(scenario, "links") or ())
        elif kind == "tunnel":
            settings = _tunnel_settings(spec)
            app_nodes.reverse()  # the receiver initiates: its results are the app's metrics
        else:
            settings = {"pairs": int(_get(spec, "pairs")), "wait_s": float(_first(spec, ("wait_s", "wait"), 0.0))}
        apps.append(
            AppPlan(
                name=name,
                kind=kind,
                initiator=str(app_nodes[0]),
                responder=str(app_nodes[1]),
                start_s=float(_first(spec, ("start_s", "start"), 0.0)),
                settings=settings,
            )
        )
    if len({a.name for a in apps}) != len(apps):
        raise PlanError("two apps share a name")
    qkd_pairs = [frozenset(a.nodes) for a in apps if a.kind == "qkd"]
    if len(set(qkd_pairs)) != len(qkd_pairs):
        raise PlanError("two qkd apps share a link (the link's bootstrap key serves one QKD session per run)")

    expectations = []
    for spec in _get(scenario, "expect") or ():
        expectations.append(
            ExpectationSpec(
                metric=str(_get(spec, "metric")),
                app=None if _get(spec, "app") is None else str(_get(spec, "app")),
                min=_opt_float(_get(spec, "min")),
                max=_opt_float(_get(spec, "max")),
            )
        )
    faults = _plan_faults(scenario, {n.name: n for n in nodes})
    links = tuple(
        (str(a), str(b)) for a, b in (_get(link, "endpoints") for link in (_get(scenario, "links") or ()))
    )
    kms = _plan_kms(_get(scenario, "kms"), _get(scenario, "links") or ())
    return RunPlan(
        name=str(_get(scenario, "name")),
        seed=int(_get(scenario, "seed", 0) or 0),
        duration_s=float(_first(scenario, ("duration_s", "duration"))),
        time_scale=float(_get(scenario, "time_scale", 1.0) or 1.0),
        nodes=tuple(nodes),
        apps=tuple(apps),
        expectations=tuple(expectations),
        faults=faults,
        links=links,
        kms=kms,
    )


def _tunnel_settings(spec: Any) -> dict[str, Any]:
    return {
        "saes": [str(x) for x in _get(spec, "saes")],
        "duration_s": float(_first(spec, ("duration_s", "duration"))),
        "rate_pps": float(_first(spec, ("rate_pps", "rate"), 50.0)),
        "payload_bytes": int(_first(spec, ("payload_bytes", "payload"), 512)),
        "rekey_interval_s": float(_first(spec, ("rekey_interval_s", "rekey_interval"), 2.0)),
        "key_size_bits": int(_first(spec, ("key_size_bits", "key_size"), 256)),
    }


@_frozen
class KmsPlan:
    """The scenario's key management: what every KME gets in `kms_start` (less credentials)."""

    kme_nodes: tuple[str, ...]  # every endpoint of a QKD link, scenario order
    kms_links: tuple[tuple[str, str], ...]  # the QKD links
    saes: Mapping[str, str]  # SAE id -> node
    policies: tuple[Mapping[str, Any], ...]  # {saes: [a, b], policy, on_empty, wait_s}
    default_policy: str = "qkd"
    default_on_empty: str = "fail"
    key_size_bits: int = 256
    stock_keys: int = 32
    max_keys_per_request: int = 128
    relay_timeout_s: float = 2.0
    host: str = "127.0.0.1"

    def config(self) -> dict[str, Any]:
        """The run-wide part of `kms_start.config` (msgpack-able)."""
        return {
            "saes": dict(self.saes),
            "kms_links": [list(pair) for pair in self.kms_links],
            "policies": [dict(p) for p in self.policies],
            "default_policy": self.default_policy,
            "default_on_empty": self.default_on_empty,
            "key_size_bits": self.key_size_bits,
            "stock_keys": self.stock_keys,
            "max_keys_per_request": self.max_keys_per_request,
            "relay_timeout_s": self.relay_timeout_s,
            "host": self.host,
        }


def _plan_kms(spec: Any, links: Iterable[Any]) -> KmsPlan | None:
    if spec is None:
        return None
    kms_links: list[tuple[str, str]] = []
    kme_nodes: list[str] = []
    for link in links:
        if _get(link, "qkd") is None:
            continue
        a, b = (str(x) for x in _get(link, "endpoints"))
        kms_links.append((a, b))
        kme_nodes += [n for n in (a, b) if n not in kme_nodes]
    saes = {str(_get(s, "id")): str(_get(s, "node")) for s in _get(spec, "saes") or ()}
    for sae, node in saes.items():
        if node not in kme_nodes:
            raise PlanError(f"kms: SAE {sae!r} is on {node!r}, which has no QKD link (no KME)")
    policies = tuple(
        {
            "saes": [str(x) for x in _get(p, "saes")],
            "policy": str(_get(p, "policy", "qkd")),
            "on_empty": str(_get(p, "on_empty", "fail")),
            "wait_s": float(_first(p, ("wait_s", "wait"), 5.0)),
        }
        for p in _get(spec, "policies") or ()
    )
    return KmsPlan(
        kme_nodes=tuple(kme_nodes),
        kms_links=tuple(kms_links),
        saes=saes,
        policies=policies,
        default_policy=str(_get(spec, "default_policy", "qkd")),
        default_on_empty=str(_get(spec, "default_on_empty", "fail")),
        key_size_bits=int(_first(spec, ("key_size_bits", "key_size"), 256)),
        stock_keys=int(_get(spec, "stock_keys", 32)),
        max_keys_per_request=int(_get(spec, "max_keys_per_request", 128)),
        relay_timeout_s=float(_first(spec, ("relay_timeout_s", "relay_timeout"), 2.0)),
        host=str(_get(spec, "host", "127.0.0.1")),
    )


def _qkd_settings(spec: Any, index: int, name: str, nodes: Sequence[Any], links: Iterable[Any]) -> dict[str, Any]:
    """The `app_start` settings of a qkd app; the checks repeat what validation does for
    a `scenario_to_dict` form that did not go through it (defaults: `qkd_params`)."""
    transmitter = None
    for link in links:
        ends = [str(e) for e in (_get(link, "endpoints") or ())]
        qkd = _get(link, "qkd")
        if qkd is not None and sorted(ends) == sorted(map(str, nodes)):
            transmitter = _get(qkd, "transmitter") or ends[0]
    if transmitter is None:
        raise PlanError(f"apps[{index}] ({name}): no QKD link between {nodes[0]} and {nodes[1]}")
    if transmitter != nodes[0]:
        raise PlanError(f"apps[{index}] ({name}): the first node must be the link's QKD transmitter {transmitter}")
    duration_s = _opt_float(_first(spec, ("duration_s", "duration")))
    key_bits = _get(spec, "key_bits")
    if duration_s is None and key_bits is None:
        raise PlanError(f"apps[{index}] ({name}): a qkd app needs `duration`, `key_bits` or both")
    cascade = _get(spec, "cascade", _qkd.DEFAULT_CASCADE)
    return {
        "duration_s": duration_s,
        "key_bits": None if key_bits is None else int(key_bits),
        "block_key_bits": int(_get(spec, "block_bits", _qkd.DEFAULT_BLOCK_BITS)),
        "cascade": str(getattr(cascade, "value", cascade)),
        "epsilon_sec": float(_get(spec, "epsilon_sec", _qkd.DEFAULT_EPSILON_SEC)),
        "epsilon_cor": float(_get(spec, "epsilon_cor", _qkd.DEFAULT_EPSILON_COR)),
        "qber_threshold": float(_get(spec, "qber_threshold", _qkd.DEFAULT_QBER_THRESHOLD)),
        "sample_fraction": float(_get(spec, "sample_fraction", _qkd.DEFAULT_SAMPLE_FRACTION)),
    }


def _plan_faults(scenario: Any, nodes: Mapping[str, NodePlan]) -> tuple[FaultPlan, ...]:
    """The scenario's faults as `FaultPlan`s; the checks repeat what validation does for
    a `scenario_to_dict` form that did not go through it."""
    link_orders: dict[frozenset[str], tuple[str, str]] = {}
    qkd_links: set[frozenset[str]] = set()
    for spec in _get(scenario, "links") or ():
        ends = tuple(str(e) for e in (_get(spec, "endpoints") or ()))
        if len(ends) == 2 and ends[0] != ends[1]:
            link_orders.setdefault(frozenset(ends), (ends[0], ends[1]))
            if _get(spec, "qkd") is not None:
                qkd_links.add(frozenset(ends))
    faults = []
    for position, spec in enumerate(_get(scenario, "faults") or ()):
        index = position + 1
        raw_kind = _get(spec, "kind")
        try:
            kind = FaultKind(raw_kind)
        except ValueError:
            raise PlanError(f"fault {index}: kind {raw_kind!r} is not supported by this orchestrator") from None
        at_s = _first(spec, ("at_s", "at"))
        if at_s is None:
            raise PlanError(f"fault {index}: no `at`")
        for_s = _opt_float(_first(spec, ("for_s", "for")))
        node: str | None = None
        link: tuple[str, str] | None = None
        if kind.target is FaultTarget.NODE:
            node = str(_get(spec, "node"))
            if node not in nodes:
                raise PlanError(f"fault {index}: unknown node {node!r}")
            if nodes[node].external:
                verb = kind.value.partition("-")[2]
                raise PlanError(f"fault {index}: node {node} is external; qnetem cannot {verb} a process it did not start")
        else:
            ends = tuple(str(e) for e in (_get(spec, "link") or ()))
            found = link_orders.get(frozenset(ends)) if len(ends) == 2 else None
            if found is None:
                raise PlanError(f"fault {index}: no link between {' and '.join(map(repr, ends)) or 'the nodes given'}")
            if kind.eavesdrops and frozenset(found) not in qkd_links:
                raise PlanError(f"fault {index}: {kind.value} needs a QKD link; [{found[0]}, {found[1]}] has no `qkd`")
            link = found
        fraction = _opt_float(_get(spec, "fraction"))
        try:
            faults.append(FaultPlan(index, kind, float(at_s), for_s, node, link, fraction))
        except ValueError as err:
            raise PlanError(str(err)) from None
    return tuple(faults)


def _opt_float(x: Any) -> float | None:
    return None if x is None else float(x)


class EmulatedClock:
    """Estimate of the broker's emulated clock between replies (DESIGN §3)."""

    __slots__ = ("_anchor_mono_s", "_anchor_now_s", "time_scale")

    def __init__(self, time_scale: float) -> None:
        if not time_scale > 0:
            raise ValueError("time_scale must be positive")
        self.time_scale = time_scale
        self._anchor_now_s: float | None = None
        self._anchor_mono_s = 0.0

    def sync(self, now_s: float, mono_s: float) -> None:
        """Re-anchor on a broker reply: the broker said `now_s` at monotonic time `mono_s`."""
        self._anchor_now_s = now_s
        self._anchor_mono_s = mono_s

    @property
    def synced(self) -> bool:
        return self._anchor_now_s is not None

    def now(self, mono_s: float) -> float | None:
        if self._anchor_now_s is None:
            return None
        return self._anchor_now_s + (mono_s - self._anchor_mono_s) / self.time_scale

    def wall_s_until(self, now_s: float, target_s: float) -> float:
        """Wall seconds until emulated time `target_s`, seen from emulated time `now_s`."""
        return max(0.0, (target_s - now_s) * self.time_scale)


class RegistrationTracker:
    """Which expected nodes have registered with the broker, and where they listen."""

    def __init__(self, expected: Iterable[str]) -> None:
        self.expected = tuple(expected)
        self._registered: dict[str, Any] = {}  # name -> NodeStatus-like

    def update(self, statuses: Iterable[Any]) -> list[str]:
        """Digest a `status_reply.nodes`; return the names that registered since the last call."""
        new = []
        for status in statuses:
            name = _get(status, "name")
            if name in self.expected and _get(status, "registered") and name not in self._registered:
                new.append(name)
            if name in self._registered or (name in self.expected and _get(status, "registered")):
                self._registered[name] = status
        return new

    def lost(self, statuses: Iterable[Any]) -> list[str]:
        """Nodes that were registered and now report unregistered."""
        return [
            _get(s, "name") for s in statuses
            if _get(s, "name") in self._registered and not _get(s, "registered")
        ]  # fmt: skip

    def forget(self, name: str) -> None:
        """`name` left on purpose (a fault): its next registration is reported as new."""
        self._registered.pop(name, None)

    @property
    def complete(self) -> bool:
        return all(n in self._registered for n in self.expected)

    def missing(self) -> tuple[str, ...]:
        return tuple(n for n in self.expected if n not in self._registered)

    def status_of(self, name: str) -> Any:
        return self._registered.get(name)

    def control_address(self, name: str) -> tuple[str, int] | None:
        control = _get(self._registered.get(name), "control")
        return None if control is None else (str(control[0]), int(control[1]))


@_frozen
class AppChanged:
    """An app changed state (returned by `Timeline.observe` / `mark_*`)."""

    name: str
    state: AppState
    t_s: float  # emulated, relative to the timeline origin
    error: str | None = None


class AppProgress(NamedTuple):
    """One app's progress (`Timeline.progress`), in the unit of its kind (`AppPlan.unit`)."""

    name: str
    state: AppState
    measured: int | None  # pairs measured (epr-test) or final key bits (qkd) so far
    requested: int | None  # the amount asked for (None: a qkd app that runs for a duration)
    rate: float | None  # per emulated second
    running_s: float | None = None  # emulated seconds since the app started (None: not started)
    running_limit_s: float | None = None  # qkd with a duration: how long it runs at most
    unit: str = "pairs"
    detail: str = ""  # kind-specific live figures (qkd: QBER, f, decoy bounds, blocks, alarms)


@dataclasses.dataclass(slots=True)
class _AppTrack:
    plan: AppPlan
    state: AppState = AppState.PENDING
    started_s: float | None = None
    finished_s: float | None = None
    error: str | None = None
    node_states: dict[str, str] = dataclasses.field(default_factory=dict)  # role -> state
    node_results: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)  # role -> results


class Timeline:
    """When to start each app, what state it is in, and when the run is over."""

    def __init__(self, plan: RunPlan) -> None:
        self.plan = plan
        self.origin_s: float | None = None
        self._apps = {a.name: _AppTrack(a) for a in plan.apps}

    # ------------------------------------------------------------------ time

    def begin(self, now_s: float) -> None:
        """Every node registered at emulated time `now_s` (broker clock): the origin."""
        if self.origin_s is not None:
            raise RuntimeError("timeline already begun")
        self.origin_s = now_s

    def elapsed_s(self, now_s: float) -> float:
        if self.origin_s is None:
            return 0.0
        return now_s - self.origin_s

    def due(self, now_s: float) -> list[AppPlan]:
        """Apps still pending whose start offset has come, in scenario order."""
        if self.origin_s is None:
            return []
        elapsed = self.elapsed_s(now_s)
        return [t.plan for t in self._apps.values() if t.state is AppState.PENDING and t.plan.start_s <= elapsed]

    def next_start_s(self) -> float | None:
        """Absolute emulated time of the next pending app start (None if none pending)."""
        if self.origin_s is None:
            return None
        pending = [t.plan.start_s for t in self._apps.values() if t.state is AppState.PENDING]
        return self.origin_s + min(pending) if pending else None

    def deadline_s(self) -> float | None:
        """Absolute emulated time at which the run stops regardless of the apps."""
        return None if self.origin_s is None else self.origin_s + self.plan.duration_s

    def finish_reason(self, now_s: float) -> FinishReason | None:
        if self.origin_s is None:
            return None
        tracks = self._apps.values()
        # With key management the KMEs serve outside applications too: the run lasts its
        # whole duration however early the scenario's own apps finish.
        if tracks and self.plan.kms is None and all(t.state in (AppState.DONE, AppState.FAILED) for t in tracks):
            return FinishReason.ALL_APPS_FINISHED
        if self.elapsed_s(now_s) >= self.plan.duration_s:
            return FinishReason.DURATION_ELAPSED
        return None

    # ------------------------------------------------------------------ app states

    def mark_started(self, name: str, now_s: float) -> AppChanged:
        track = self._apps[name]
        if track.state is not AppState.PENDING:
            raise RuntimeError(f"app {name} already started")
        track.state = AppState.RUNNING
        track.started_s = self.elapsed_s(now_s)
        return AppChanged(name, AppState.RUNNING, track.started_s)

    def mark_failed(self, name: str, error: str, now_s: float) -> AppChanged | None:
        """The orchestrator could not start or query the app (e.g. the node refused)."""
        track = self._apps[name]
        if track.state in (AppState.DONE, AppState.FAILED):
            return None
        track.state = AppState.FAILED
        track.error = error
        track.finished_s = self.elapsed_s(now_s)
        return AppChanged(name, AppState.FAILED, track.finished_s, error)

    def observe(self, name: str, role: str, state: str, results: Mapping[str, Any], now_s: float) -> AppChanged | None:
        """Digest one polled `app_status` of one end of an app."""
        track = self._apps[name]
        track.node_states[role] = state
        track.node_results[role] = dict(results)
        if track.state is not AppState.RUNNING:
            return None
        if state == "failed":
            error = results.get("error")
            who = f"{role} {track.plan.node_of(role)}"
            reason = f"{who} failed: {error}" if error else f"{who} failed"
            return self.mark_failed(name, reason, now_s)
        if role == "initiator" and state == "done":
            track.state = AppState.DONE
            track.finished_s = self.elapsed_s(now_s)
            return AppChanged(name, AppState.DONE, track.finished_s)
        return None

    def state_of(self, name: str) -> AppState:
        return self._apps[name].state

    def running(self) -> list[AppPlan]:
        return [t.plan for t in self._apps.values() if t.state is AppState.RUNNING]

    # ------------------------------------------------------------------ snapshots

    def progress(self, now_s: float) -> list[AppProgress]:
        """Per app: state, amount so far (pairs measured / final key bits), amount requested,
        rate per emulated second, and how long it has been running."""
        out = []
        for t in self._apps.values():
            plan = t.plan
            results = t.node_results.get("initiator", {})
            measured = _as_int(results.get(plan.progress_metric))
            rate = _as_float(results.get(plan.rate_metric))
            running_s = None
            if t.started_s is not None:
                end = t.finished_s if t.finished_s is not None else self.elapsed_s(now_s)
                running_s = max(0.0, end - t.started_s)
            if rate is None and measured is not None and running_s is not None:
                rate = measured / running_s if running_s > 0 else None
            detail = _qkd_detail(results) if plan.kind == "qkd" else ""
            out.append(AppProgress(plan.name, t.state, measured, plan.requested_amount, rate, running_s,
                                   plan.running_limit_s, plan.unit, detail))  # fmt: skip
        return out

    def outcomes(self, *, unfinished_note: str | None = None) -> dict[str, AppOutcome]:
        """Final outcome of every app; `unfinished_note` explains apps still running (why the run ended)."""
        out = {}
        for t in self._apps.values():
            error = t.error
            if t.state is AppState.RUNNING and error is None:
                error = unfinished_note
            metrics = {
                k: v for k, v in t.node_results.get("initiator", {}).items()
                if t.state is AppState.DONE and k != "error"
            }  # fmt: skip
            out[t.plan.name] = AppOutcome(
                name=t.plan.name,
                kind=t.plan.kind,
                nodes=t.plan.nodes,
                state=t.state,
                metrics=metrics,
                requested=t.plan.requested(),
                started_s=t.started_s,
                finished_s=t.finished_s,
                error=error,
            )
        return out

    def node_reports(self) -> dict[str, dict[str, Any]]:
        """Per app, the last status each end reported (for results.json)."""
        return {
            name: {
                role: {
                    "node": t.plan.node_of(role),
                    "state": t.node_states.get(role),
                    "results": t.node_results.get(role),
                }
                for role in ("initiator", "responder")
            }
            for name, t in self._apps.items()
        }


def _qkd_detail(results: Mapping[str, Any]) -> str:
    """`QBER 3.31% (X 3.32%)  f 1.17  Y1>=0.0132 e1<=3.64%  blocks 4 (0 aborted)  alarms 0`
    from a qkd app's latest results (what is not known yet is left out)."""
    parts = []
    qber, qber_x = _as_float(results.get("qber")), _as_float(results.get("qber_x"))
    if qber is not None:
        parts.append(f"QBER {qber:.2%}" + (f" (X {qber_x:.2%})" if qber_x is not None else ""))
    f = _as_float(results.get("cascade_efficiency"))
    if f is not None:
        parts.append(f"f {f:.3g}")
    y1, e1 = _as_float(results.get("single_photon_yield_lower")), _as_float(results.get("single_photon_error_upper"))
    if y1 is not None and e1 is not None:
        parts.append(f"Y1>={y1:.3g} e1<={e1:.2%}")
    done, aborted = _as_int(results.get("blocks_done")), _as_int(results.get("blocks_aborted"))
    if done is not None:
        parts.append(f"blocks {done}" + (f" ({aborted} aborted)" if aborted else ""))
    alarms = _as_int(results.get("alarms"))
    if alarms:
        parts.append(f"alarms {alarms}")
    return "  ".join(parts)


def _as_int(x: Any) -> int | None:
    if isinstance(x, bool) or not isinstance(x, int | float) or not math.isfinite(x):
        return None
    return int(x)


def _as_float(x: Any) -> float | None:
    if isinstance(x, bool) or not isinstance(x, int | float) or not math.isfinite(x):
        return None
    return float(x)
