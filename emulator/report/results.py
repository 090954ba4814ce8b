"""Run results: expectation evaluation and the `results.json` document (DESIGN §10, §11).

Theory of operation: a run ends with one `AppOutcome` per scenario app (its final state
and the metrics its initiator reported) and the statistics snapshots of the broker and
every node. Each scenario expectation names a metric of one app and a `min`, a `max` or
both; `evaluate_expectation` turns it into an `ExpectationResult` that always carries a
human-readable message — including when the metric is missing because the app failed,
never started or did not finish within the scenario's duration, which counts as a
failure (an expectation that cannot be checked did not hold).

`RunResults.to_dict()` is the exact shape of `results.json`; `write_json_atomic` writes it
through a temporary file so a reader never sees half a report. Nothing here reads a clock
or touches a socket: timestamps come in as arguments.

Secrets: `redact` replaces every occurrence of the run's tokens in any string of a
JSON-able tree; the writers call it as a last line of defence so a token that leaked
into a stats map or an error message never reaches a file (DESIGN §12).
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "AppOutcome",
    "AppState",
    "ExpectationResult",
    "ExpectationSpec",
    "KNOWN_METRICS",
    "RunResults",
    "RunStatus",
    "evaluate_expectation",
    "evaluate_expectations",
    "json_safe",
    "redact",
    "write_json_atomic",
]

_frozen = dataclasses.dataclass(frozen=True, slots=True)

#: Metrics an `epr-test` app reports (the initiator's results), with a short description.
KNOWN_METRICS: Mapping[str, str] = {
    "pairs_measured": "entangled pairs delivered and measured by both ends",
    "fidelity": "estimated fidelity to the target Bell state",
    "chsh": "CHSH value S estimated from the measured correlators",
    "pair_rate_hz": "measured pairs per emulated second",
}

REDACTED = "<redacted>"


class AppState(enum.StrEnum):
    """Lifecycle of one scenario app as the orchestrator sees it."""

    PENDING = "pending"  # its start time was not reached (run ended first)
    RUNNING = "running"  # started, not finished when the run ended
    DONE = "done"
    FAILED = "failed"


class RunStatus(enum.StrEnum):
    PASSED = "passed"  # every expectation held (exit 0)
    FAILED = "failed"  # an expectation failed (exit 1)
    ERROR = "error"  # runtime failure (exit 3)
    INTERRUPTED = "interrupted"  # Ctrl-C / SIGTERM


@_frozen
class ExpectationSpec:
    """One `expect:` entry of a scenario: `min <= metric(app) <= max` (either bound optional)."""

    metric: str
    app: str | None  # None: a metric of the run's key management (scope `kms`)
    min: float | None = None
    max: float | None = None

    def __post_init__(self) -> None:
        if self.min is None and self.max is None:
            raise ValueError(f"expectation on {self.metric!r} of app {self.app!r} has neither min nor max")

    @property
    def bound(self) -> str:
        """The bound as text: `>= 0.9`, `<= 3`, or `[0.8, 0.95]`."""
        if self.min is not None and self.max is not None:
            return f"[{_fmt(self.min)}, {_fmt(self.max)}]"
        if self.min is not None:
            return f">= {_fmt(self.min)}"
        return f"<= {_fmt(self.max)}"

    @property
    def target(self) -> str:
        return "the key management" if self.app is None else f"app {self.app}"


@_frozen
class AppOutcome:
    """The final state of one app and its metrics (empty unless it reported some)."""

    name: str
    kind: str
    nodes: tuple[str, ...]
    state: AppState
    metrics: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    requested: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # e.g. {"pairs": 1000}
    started_s: float | None = None  # emulated time relative to the run's origin
    finished_s: float | None = None
    error: str | None = None  # why it failed (node or orchestrator), or why a running app was cut short

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "nodes": list(self.nodes),
            "state": self.state.value,
            "requested": dict(self.requested),
            "started_s": self.started_s,
            "finished_s": self.finished_s,
            "error": self.error,
            "metrics": dict(self.metrics),
        }


@_frozen
class ExpectationResult:
    """The verdict on one expectation. `observed` is None when the metric was missing."""

    index: int
    metric: str
    app: str | None
    min: float | None
    max: float | None
    observed: float | None
    passed: bool
    message: str

    @property
    def target(self) -> str:
        return "the key management" if self.app is None else f"app {self.app}"

    @property
    def bound(self) -> str:
        return ExpectationSpec(self.metric, self.app, self.min, self.max).bound

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "metric": self.metric,
            "target": self.target,
            "app": self.app,
            "min": self.min,
            "max": self.max,
            "bound": self.bound,
            "observed": self.observed,
            "passed": self.passed,
            "message": self.message,
        }


def _fmt(x: float | None) -> str:
    if x is None:
        return "-"
    if isinstance(x, int) or (isinstance(x, float) and x.is_integer() and abs(x) < 1e15):
        return str(int(x))
    return f"{x:.6g}"


def _why_missing(metric: str, outcome: AppOutcome | None, app: str) -> str:
    if outcome is None:
        return f"{metric} of app {app}: missing (no such app in the run)"
    if outcome.state is AppState.FAILED:
        reason = f": {outcome.error}" if outcome.error else ""
        return f"{metric} of app {app}: missing (the app failed{reason})"
    if outcome.state is AppState.RUNNING:
        why = outcome.error or "the app did not finish within the scenario duration"
        return f"{metric} of app {app}: missing ({why})"
    if outcome.state is AppState.PENDING:
        return f"{metric} of app {app}: missing (the app never started: the run ended before its start time)"
    return f"{metric} of app {app}: missing (the app finished without reporting it)"


def evaluate_expectation(
    spec: ExpectationSpec, apps: Mapping[str, AppOutcome], *, index: int = 0,
    kms: Mapping[str, Any] | None = None,
) -> ExpectationResult:
    """Check one expectation against the apps' final metrics (or, for `app` None, the
    run's key-management metrics `kms`; None when they could not be collected).

    A missing, non-numeric or non-finite metric fails with a message saying why.
    Bounds are inclusive.
    """
    of = f"{spec.metric} of app {spec.app}" if spec.app is not None else f"{spec.metric} of the key management"
    if spec.app is None:
        outcome = None
        raw = kms.get(spec.metric) if kms is not None else None
    else:
        outcome = apps.get(spec.app)
        raw = outcome.metrics.get(spec.metric) if outcome is not None else None

    def result(observed: float | None, passed: bool, message: str) -> ExpectationResult:
        return ExpectationResult(index, spec.metric, spec.app, spec.min, spec.max, observed, passed, message)

    if raw is None:
        if spec.app is None:
            return result(None, False, f"{of}: missing (the KMEs' statistics could not be collected)")
        return result(None, False, _why_missing(spec.metric, outcome, spec.app))
    if isinstance(raw, bool) or not isinstance(raw, int | float):
        return result(None, False, f"{of}: not a number ({type(raw).__name__})")
    observed = float(raw)
    if not math.isfinite(observed):
        return result(None, False, f"{of}: not a finite number ({observed})")
    low_ok = spec.min is None or observed >= spec.min
    high_ok = spec.max is None or observed <= spec.max
    shown = _fmt(observed)
    if low_ok and high_ok:
        return result(observed, True, f"{of} = {shown}, within {spec.bound}")
    if not low_ok:
        why = f"below the minimum {_fmt(spec.min)}"
    else:
        why = f"above the maximum {_fmt(spec.max)}"
    return result(observed, False, f"{of} = {shown}, {why}")


def evaluate_expectations(
    specs: Sequence[ExpectationSpec], apps: Mapping[str, AppOutcome], kms: Mapping[str, Any] | None = None
) -> tuple[ExpectationResult, ...]:
    return tuple(evaluate_expectation(s, apps, index=i, kms=kms) for i, s in enumerate(specs))


@_frozen
class RunResults:
    """Everything `results.json` holds. `to_dict` is the file's schema (version 1)."""

    scenario: str
    seed: int
    run_id: str
    started_at: str  # ISO-8601 UTC
    finished_at: str
    wall_s: float
    emulated_s: float | None  # emulated seconds from the timeline origin to the end
    time_scale: float
    status: RunStatus
    exit_code: int
    apps: Mapping[str, AppOutcome]
    expectations: tuple[ExpectationResult, ...]
    stats: Mapping[str, Any]  # {"broker": {...}, "nodes": {name: {...}}}
    error: str | None = None
    backend: str | None = None
    qnetem_version: str = ""

    @property
    def passed(self) -> bool:
        return self.status is RunStatus.PASSED

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": 1,
            "qnetem_version": self.qnetem_version,
            "scenario": self.scenario,
            "seed": self.seed,
            "run_id": self.run_id,
            "backend": self.backend,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "wall_s": self.wall_s,
            "emulated_s": self.emulated_s,
            "time_scale": self.time_scale,
            "status": self.status.value,
            "exit_code": self.exit_code,
            "passed": self.passed,
            "error": self.error,
            "apps": {name: app.to_dict() for name, app in self.apps.items()},
            "expectations": [e.to_dict() for e in self.expectations],
            "stats": dict(self.stats),
        }


def json_safe(obj: Any) -> Any:
    """A copy of `obj` that `json.dumps(allow_nan=False)` accepts.

    Non-finite floats become None, tuples/sets lists, bytes a size note (never the bytes:
    they could be key material), numpy scalars Python numbers, other objects their str.
    """
    if obj is None or isinstance(obj, bool | int | str):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple | set | frozenset):
        return [json_safe(v) for v in obj]
    if isinstance(obj, bytes | bytearray | memoryview):
        return f"<{len(obj)} bytes>"
    item = getattr(obj, "item", None)  # numpy scalars and 0-d arrays
    if callable(item):
        try:
            return json_safe(item())
        except (TypeError, ValueError):
            pass
    tolist = getattr(obj, "tolist", None)  # numpy arrays
    if callable(tolist):
        return json_safe(tolist())
    return str(obj)


def redact(obj: Any, secrets: Iterable[str]) -> Any:
    """A copy of a JSON-able tree with every occurrence of each secret replaced by `<redacted>`.

    Keys are redacted too. Secrets shorter than 8 characters are ignored (they would
    redact ordinary words; the run's tokens are 43 characters).
    """
    needles = [s for s in secrets if s and len(s) >= 8]
    if not needles:
        return obj

    def scrub(text: str) -> str:
        for needle in needles:
            if needle in text:
                text = text.replace(needle, REDACTED)
        return text

    def walk(x: Any) -> Any:
        if isinstance(x, str):
            return scrub(x)
        if isinstance(x, Mapping):
            return {scrub(str(k)): walk(v) for k, v in x.items()}
        if isinstance(x, list | tuple):
            return [walk(v) for v in x]
        return x

    return walk(obj)


def write_json_atomic(path: str | os.PathLike[str], document: Any, *, secrets: Iterable[str] = ()) -> None:
    """Write `document` as indented JSON through a temporary file and a rename."""
    target = Path(path)
    text = json.dumps(redact(json_safe(document), secrets), indent=2, allow_nan=False, sort_keys=False)
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_text(text + "\n", encoding="utf-8")
    os.replace(tmp, target)
