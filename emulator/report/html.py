"""`report.html`: one static page per run, with PNG plots beside it (DESIGN §11).

Theory of operation
-------------------
`write_report(run_dir, results, scenario)` takes two plain dicts — the `results.json`
document (already redacted by its writer) and the `scenario_to_dict` form saved as
`RUN/scenario.json` — and writes into `run_dir`:

* `topology.png`: nodes on a circle (two nodes side by side), links labelled with their
  length and entanglement scheme; no graph library needed.
* `pairs.png`: pairs measured against emulated time for every app, from the `series`
  key of `results.json` (samples taken at each orchestrator poll), with the link
  model's mean pair rate p/T as a dashed line starting at the app's start.
* `fidelity.png`: each app's estimated fidelity and CHSH value with ±1 standard error
  bars, against the model values when the model applies (see below).
* `qkd.png` (only when the run has a `qkd` app): final key bits and QBER (both bases)
  against emulated time per qkd app, with the app's QBER threshold and the windows in
  which an eavesdropper fault was in force shaded.
* `report.html`: run summary, apps (metrics ± standard error, with model values;
  qkd apps in a table of their own), expectations (PASS/FAIL), faults, links (with the
  model's p, T, p/T, F; QKD links in a table of their own with the optics, the broker's
  counts and what Eve did), nodes, then the plots. Inline CSS only: no JavaScript, no
  external resource. Every string taken from the dicts goes through `html.escape`, and
  `$` is escaped in plot labels so no name reaches matplotlib's mathtext parser.

Model values come from `emulator.physics` (`double_click_model`, `single_click_model`,
`chsh_werner`) and the scenario's link parameters. The pair rate p/T holds for any
scheme. The state model is the no-wait Werner state of a double-click link,
F = (1+3V)/4 and S = 2√2(4F−1)/3; it is shown only when the app measures at once
(`wait` 0) and both memories are ideal (T1 = T2 = ∞, gate fidelity 1): memory
decoherence and gate noise are not part of that formula.

QKD reference values come from `emulator.physics` too (`DecoyBb84Parameters`,
`asymptotic_key_rate`, `max_distance_km`; vacuum + weak decoy bounds on the expected
statistics, f = 1.22): per link, Ma et al.'s asymptotic rate per pulse with q = 1/2 and
the length at which it reaches zero (Ma, Qi, Zhao & Lo, PRA 72, 012326 (2005), Sec. V);
per qkd app, the asymptotic limit of what its configuration keeps per pulse: only
signal pulses, only the Z basis at both ends, minus the QBER sample,
R = p_signal p_Z,A p_Z,B (1 - r) [Q1 (1 - H2(e1)) - f Q_mu H2(E_mu)], which the app's
finite-key `key_rate_per_pulse` approaches from below as its blocks grow.

A plot without data (no series, no fidelity) is not drawn and the page says why; a
PNG left over from an earlier rendering of the same directory is removed. Plots use
matplotlib's object API on the Agg backend (`Figure.savefig`), so no display and no
pyplot global state are involved. `render_run_dir` reads the two files of a finished
run directory and calls `write_report`; `qnetem report RUN_DIR` and the orchestrator
both use it.
"""

from __future__ import annotations

import dataclasses
import html
import json
import math
import os
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "PLOT_FILES", "QKD_PLOT_FILES", "REPORT_FILE", "AppModel", "QkdLinkModel", "app_model", "link_model",
    "load_run_dir", "qkd_app_model", "qkd_link_model", "render_run_dir", "write_report",
]  # fmt: skip

REPORT_FILE = "report.html"
PLOT_FILES = ("topology.png", "pairs.png", "fidelity.png")
QKD_PLOT_FILES = ("qkd.png",)  # drawn (and mentioned) only when the run has a qkd app

_INF = math.inf


# --------------------------------------------------------------------------- small helpers


def _e(value: Any) -> str:
    """HTML-escaped text of any value."""
    return html.escape(str(value), quote=True)


def _label(value: Any) -> str:
    """Text for a matplotlib label: `$` escaped so it is never parsed as mathtext."""
    return str(value).replace("$", r"\$")


def _float(value: Any) -> float | None:
    """A finite-or-infinite float from a number or a string like "inf"; None otherwise."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _finite(value: Any) -> float | None:
    x = _float(value)
    return x if x is not None and math.isfinite(x) else None


def _num(value: Any, digits: int = 4) -> str:
    """A number for a table cell ("–" when missing)."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    x = _float(value)
    if x is None:
        return _e(value)
    if math.isinf(x):
        return "∞" if x > 0 else "−∞"
    return f"{x:.{digits}g}"


def _pm(value: Any, stderr: Any) -> str:
    if value is None:
        return "–"
    if _finite(stderr) is None:
        return _num(value)
    return f"{_num(value)} ± {_num(stderr, 2)}"


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, list | tuple) else []


# --------------------------------------------------------------------------- model values


def link_model(link: Mapping[str, Any]) -> Any:
    """The `HeraldingModel` of a scenario link (dict form), or None without entanglement."""
    from emulator.physics import PhysicsParameterError, double_click_model, single_click_model

    ent = _mapping(link.get("entanglement"))
    length_km = _finite(link.get("length_km"))
    if not ent or length_km is None:
        return None
    # Missing values are the schema defaults (emulator.scenario.schema.Entanglement, Link).
    kwargs = {
        name: default if value is None else value
        for name, value, default in (
            ("detector_efficiency", _finite(ent.get("detector_efficiency")), 1.0),
            ("visibility", _finite(ent.get("visibility")), 1.0),
            ("attenuation_db_per_km", _finite(link.get("attenuation_db_per_km")), 0.2),
        )
    }
    try:
        if ent.get("scheme") == "single-click":
            alpha = _finite(ent.get("bright_state_alpha"))
            return None if alpha is None else single_click_model(length_km, alpha, **kwargs)
        if ent.get("scheme", "double-click") == "double-click":
            return double_click_model(length_km, **kwargs)
    except PhysicsParameterError:
        return None
    return None


def _find_link(scenario: Mapping[str, Any], a: str, b: str) -> Mapping[str, Any] | None:
    for link in _list(scenario.get("links")):
        link = _mapping(link)
        if sorted(map(str, _list(link.get("endpoints")))) == sorted([a, b]):
            return link
    return None


def _memory(scenario: Mapping[str, Any], node: str) -> Mapping[str, Any]:
    """A node's memory settings (dict form), falling back to `defaults.memory`."""
    memory = _mapping(_mapping(_mapping(scenario.get("nodes")).get(node)).get("memory"))
    return memory or _mapping(_mapping(scenario.get("defaults")).get("memory"))


def _ideal_memory(memory: Mapping[str, Any]) -> bool:
    # Missing values are the schema defaults: T1 = T2 = inf, gate fidelity 1.
    t1 = _float(memory.get("t1", _INF))
    t2 = _float(memory.get("t2", _INF))
    gate = _float(memory.get("gate_fidelity", 1.0))
    return t1 == _INF and t2 == _INF and gate == 1.0


@dataclasses.dataclass(frozen=True, slots=True)
class AppModel:
    """Model values for one app; None where the model does not apply."""

    pair_rate_hz: float | None = None
    fidelity: float | None = None
    chsh: float | None = None
    note: str = ""  # why the state model is not shown (empty when it is)


def _scenario_app(scenario: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    for app in _list(scenario.get("apps")):
        if _mapping(app).get("name") == name:
            return _mapping(app)
    return {}


def app_model(scenario: Mapping[str, Any], name: str, app: Mapping[str, Any]) -> AppModel:
    """Model values of app `name` (its `results.json` entry `app`) from the scenario's link."""
    from emulator.physics import chsh_werner

    nodes = [str(n) for n in _list(app.get("nodes")) or _list(_scenario_app(scenario, name).get("nodes"))]
    if len(nodes) != 2:
        return AppModel(note="not a two-node app")
    link = _find_link(scenario, *nodes)
    model = link_model(link) if link is not None else None
    if model is None:
        return AppModel(note="no entanglement parameters for its link")
    rate = model.pair_rate_hz if math.isfinite(model.pair_rate_hz) else None
    if model.scheme.value != "double-click":
        return AppModel(rate, note=f"{model.scheme.value} state is not a Werner state")
    wait_s = _float(_mapping(app.get("requested")).get("wait_s"))
    if wait_s is None:
        wait_s = _float(_scenario_app(scenario, name).get("wait", 0.0))
    if wait_s is None or wait_s != 0.0:
        return AppModel(rate, note="pairs wait in memory before they are measured")
    if not all(_ideal_memory(_memory(scenario, n)) for n in nodes):
        return AppModel(rate, note="a memory has finite T1/T2 or gate noise")
    # Werner state of a double-click link: F = (1+3V)/4 (Barrett & Kok, PRA 71,
    # 060310(R) (2005), with imperfect interference as in emulator.physics.heralding);
    # S = 2√2(4F−1)/3 (Horodecki et al., Phys. Lett. A 200, 340 (1995)).
    return AppModel(rate, model.fidelity, chsh_werner(model.fidelity))


# --------------------------------------------------------------------------- QKD model values


@dataclasses.dataclass(frozen=True, slots=True)
class QkdLinkModel:
    """Asymptotic reference values of a QKD link (None where they cannot be computed).

    `rate_per_signal_pulse`: Ma et al.'s R with q = 1/2 at the link's length (vacuum + weak
    decoy bounds, f = 1.22); `zero_key_km`: the length where it reaches zero; the rest are
    the link's choices the per-app value needs. Dead time is not part of the model.
    """

    rate_per_signal_pulse: float
    zero_key_km: float
    p_signal: float
    basis_z_alice: float
    basis_z_bob: float
    pulse_rate_hz: float


def _triple(value: Any, defaults: Sequence[float]) -> tuple[float, float, float] | None:
    m = _mapping(value)
    out = []
    for key, default in zip(("signal", "decoy", "vacuum"), defaults, strict=True):
        x = _finite(m.get(key, default))
        if x is None:
            return None
        out.append(x)
    return (out[0], out[1], out[2])


def qkd_link_model(link: Mapping[str, Any]) -> QkdLinkModel | None:
    """Reference values of a scenario link (dict form) with a `qkd` section, else None."""
    from emulator.physics import (
        DecoyBb84Parameters,
        DecoyIntensities,
        PhysicsParameterError,
        asymptotic_key_rate,
        max_distance_km,
    )
    from emulator.scenario import qkd_params as d

    if not isinstance(link.get("qkd"), Mapping):
        return None
    q = _mapping(link.get("qkd"))
    # Missing values are the schema defaults (emulator.scenario.qkd_params, Link).
    numbers = [
        _finite(q.get(key, default))
        for key, default in (
            ("receiver_efficiency", d.DEFAULT_RECEIVER_EFFICIENCY),
            ("dark_count_probability", d.DEFAULT_DARK_COUNT_PROBABILITY),
            ("misalignment_error", d.DEFAULT_MISALIGNMENT_ERROR),
            ("basis_z_probability", d.DEFAULT_BASIS_Z_PROBABILITY),
            ("pulse_rate_hz", d.DEFAULT_PULSE_RATE_HZ),
        )
    ] + [_finite(link.get("length_km")), _finite(link.get("attenuation_db_per_km", 0.2))]
    intensities = _triple(q.get("intensities"), d.DEFAULT_INTENSITIES)
    probabilities = _triple(q.get("class_probabilities"), d.DEFAULT_CLASS_PROBABILITIES)
    if intensities is None or probabilities is None or any(x is None for x in numbers):
        return None
    eta_bob, y0, e_d, alice_z, rate_hz, length_km, attenuation = typing.cast(list[float], numbers)
    bob_z = _finite(q.get("bob_basis_z_probability"))
    try:
        params = DecoyBb84Parameters(
            attenuation_db_per_km=attenuation, receiver_efficiency=eta_bob, dark_count_yield=y0,
            misalignment_error=e_d, intensities=DecoyIntensities(*intensities),
        )  # fmt: skip
        rate = asymptotic_key_rate(params, length_km)
        zero_km = max_distance_km(params, tolerance_km=0.01)
    except (PhysicsParameterError, ValueError):
        return None
    return QkdLinkModel(
        rate_per_signal_pulse=rate, zero_key_km=zero_km, p_signal=probabilities[0], basis_z_alice=alice_z,
        basis_z_bob=alice_z if bob_z is None else bob_z, pulse_rate_hz=rate_hz,
    )  # fmt: skip


def qkd_app_model(scenario: Mapping[str, Any], name: str, app: Mapping[str, Any]) -> float | None:
    """Asymptotic key bits per pulse (all pulses) that qkd app `name` could keep at most, or None.

    R = p_signal p_Z,A p_Z,B (1 - r) R_Ma / q (see the module docstring): Ma et al.'s
    bracket [Q1 (1 - H2(e1)) - f Q_mu H2(E_mu)] applies to the signal pulses both ends
    measured in the key basis and that the QBER sample r did not disclose.
    """
    nodes = [str(n) for n in _list(app.get("nodes")) or _list(_scenario_app(scenario, name).get("nodes"))]
    if len(nodes) != 2:
        return None
    link = _find_link(scenario, *nodes)
    model = qkd_link_model(link) if link is not None else None
    if model is None:
        return None
    from emulator.physics import BB84_SIFTING_FACTOR
    from emulator.scenario import qkd_params as d

    r = _finite(_scenario_app(scenario, name).get("sample_fraction", d.DEFAULT_SAMPLE_FRACTION))
    if r is None:
        return None
    bracket = model.rate_per_signal_pulse / BB84_SIFTING_FACTOR
    return model.p_signal * model.basis_z_alice * model.basis_z_bob * (1.0 - r) * bracket


# --------------------------------------------------------------------------- plots


def _plot_topology(fig: Any, scenario: Mapping[str, Any]) -> bool:
    nodes = _mapping(scenario.get("nodes"))
    if not nodes:
        return False
    names = list(nodes)
    n = len(names)
    if n == 2:
        pos = {names[0]: (-1.0, 0.0), names[1]: (1.0, 0.0)}
    else:  # a circle, first node on the left, going clockwise
        pos = {
            name: (math.cos(math.pi - 2 * math.pi * i / n), math.sin(math.pi - 2 * math.pi * i / n))
            for i, name in enumerate(names)
        }
    ax = fig.add_subplot()
    for link in _list(scenario.get("links")):
        link = _mapping(link)
        ends = [str(x) for x in _list(link.get("endpoints"))]
        if len(ends) != 2 or not all(e in pos for e in ends):
            continue
        (x1, y1), (x2, y2) = pos[ends[0]], pos[ends[1]]
        ent = _mapping(link.get("entanglement"))
        ax.plot([x1, x2], [y1, y2], color="0.35", lw=2.5 if ent else 1.2, ls="-" if ent else ":", zorder=1)
        text = f"{_num(link.get('length_km'))} km"
        if ent:
            text += f"\n{ent.get('scheme', 'double-click')}"
        if isinstance(link.get("qkd"), Mapping):
            text += "\nQKD"
        ax.annotate(
            _label(text), ((x1 + x2) / 2, (y1 + y2) / 2), ha="center", va="center", fontsize=9,
            bbox={"boxstyle": "round,pad=0.2", "fc": "white", "ec": "0.7"}, zorder=3,
        )  # fmt: skip
    roles = sorted({str(_mapping(nodes[name]).get("role", "endpoint")) for name in names})
    for k, role in enumerate(roles):
        members = [m for m in names if str(_mapping(nodes[m]).get("role", "endpoint")) == role]
        for external in (False, True):
            group = [m for m in members if bool(_mapping(nodes[m]).get("external")) is external]
            if not group:
                continue
            color = f"C{k % 10}"
            ax.scatter(
                [pos[m][0] for m in group], [pos[m][1] for m in group], s=500, zorder=2,
                facecolors="white" if external else color, edgecolors=color, linewidths=2,
                label=_label(role + (" (external)" if external else "")),
            )  # fmt: skip
    for name, (x, y) in pos.items():
        ax.annotate(_label(name), (x, y), xytext=(0, -22), textcoords="offset points", ha="center", va="top")
    ax.set_xlim(-1.5, 1.5)
    ax.set_ylim(-1.5 if n > 2 else -0.6, 1.4 if n > 2 else 0.6)
    ax.set_aspect("equal")
    ax.axis("off")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False, markerscale=0.5)
    n_links = len(_list(scenario.get("links")))
    counts = f"{n} node{'s' * (n != 1)}, {n_links} link{'s' * (n_links != 1)}"
    ax.set_title(_label(f"Topology of {scenario.get('name', '?')}: {counts} (lengths in km)"))
    return True


def _plot_pairs(
    fig: Any, results: Mapping[str, Any], models: Mapping[str, AppModel], colors: Mapping[str, str]
) -> bool:
    series = _mapping(results.get("series"))
    apps = _mapping(results.get("apps"))
    ax = fig.add_subplot()
    drawn = False
    for name, points in series.items():
        samples = [
            (_finite(p.get("t_s")), _finite(p.get("pairs_measured"))) for p in _list(points) if isinstance(p, Mapping)
        ]
        samples = [(t, y) for t, y in samples if t is not None and y is not None]
        if not samples:
            continue
        color = colors.get(name, "C0")
        ax.plot([t for t, _ in samples], [y for _, y in samples], color=color, lw=1.8, label=_label(f"{name} measured"))
        drawn = True
        rate = models[name].pair_rate_hz if name in models else None
        app = _mapping(apps.get(name))
        start = _finite(app.get("started_s"))
        start = samples[0][0] if start is None else start
        target = _finite(_mapping(app.get("requested")).get("pairs")) or max(y for _, y in samples)
        if rate and target > 0:
            ax.plot(
                [start, start + target / rate], [0.0, target], ls="--", color=color, lw=1.2,
                label=_label(f"{name} model p/T = {rate:.4g} Hz"),
            )  # fmt: skip
    if not drawn:
        return False
    ax.set_xlabel("emulated time since the run started (s)")
    ax.set_ylabel("pairs measured (both ends)")
    ax.set_title("Entangled pairs measured over time")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    return True


def _plot_fidelity(
    fig: Any, results: Mapping[str, Any], models: Mapping[str, AppModel], colors: Mapping[str, str]
) -> bool:
    apps = {name: _mapping(_mapping(app).get("metrics")) for name, app in _mapping(results.get("apps")).items()}
    names = [n for n, m in apps.items() if _finite(m.get("fidelity")) is not None or _finite(m.get("chsh")) is not None]
    if not names:
        return False
    ax_f, ax_s = fig.subplots(1, 2)
    panels = (
        (ax_f, "fidelity", "fidelity to the heralded Bell state", "Fidelity", "model (1+3V)/4"),
        (ax_s, "chsh", "CHSH value S", "CHSH", "model 2√2(4F−1)/3"),
    )
    for ax, key, ylabel, title, model_label in panels:
        labelled = {"estimate": False, "model": False}
        for i, name in enumerate(names):
            value = _finite(apps[name].get(key))
            if value is not None:
                err = _finite(apps[name].get(f"{key}_stderr"))
                ax.errorbar(
                    [i], [value], yerr=None if err is None else [err], fmt="o", color=colors.get(name, "C0"), capsize=5,
                    label=None if labelled["estimate"] else "estimate ± 1 std. error",
                )  # fmt: skip
                labelled["estimate"] = True
            model_value = getattr(models.get(name, AppModel()), key)
            if model_value is not None:
                ax.hlines(
                    model_value, i - 0.3, i + 0.3, colors="k", linestyles="--",
                    label=None if labelled["model"] else model_label,
                )  # fmt: skip
                labelled["model"] = True
        if key == "chsh":
            ax.axhline(2.0, color="0.5", ls=":", label="classical bound S = 2")
        ax.set_xticks(range(len(names)), [_label(n) for n in names], rotation=30 if len(names) > 3 else 0)
        ax.set_xlim(-0.7, len(names) - 0.3)
        ax.set_xlabel("app")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, frameon=False)
    return True


def _eve_windows(results: Mapping[str, Any]) -> list[tuple[float, float]]:
    """(start, end) of every eavesdropper fault in force, from the steps taken (end: the
    run's end when it was never withdrawn)."""
    faults = _mapping(results.get("faults"))
    steps = [_mapping(x) for x in _list(faults.get("steps"))]
    end_of_run = _finite(results.get("emulated_s"))
    windows = []
    for fault in (_mapping(f) for f in _list(faults.get("planned"))):
        if not str(fault.get("kind", "")).startswith("qkd-"):
            continue
        taken = [x for x in steps if x.get("fault") == fault.get("index")]
        start = next((_finite(x.get("at_s")) for x in taken if x.get("step") == "apply"), None)
        if start is None:
            continue
        stop = next((_finite(x.get("at_s")) for x in taken if x.get("step") == "revert"), None)
        stop = stop if stop is not None else end_of_run
        if stop is not None and stop > start:
            windows.append((start, stop))
    return windows


def _plot_qkd(
    fig: Any, results: Mapping[str, Any], scenario: Mapping[str, Any], names: Sequence[str],
    colors: Mapping[str, str],
) -> bool:  # fmt: skip
    from emulator.scenario import qkd_params as d

    series = _mapping(results.get("series"))
    ax_k, ax_q = fig.subplots(1, 2)
    drawn = False
    for name in names:
        points = [p for p in _list(series.get(name)) if isinstance(p, Mapping)]
        color = colors.get(name, "C0")
        for ax, key, style, label in (
            (ax_k, "final_key_bits", "-", "final key bits"),
            # Per block it jumps when Eve starts; the run-wide value only creeps up.
            (ax_q, "qber_last_block", "-", "QBER of the last block"),
            (ax_q, "qber", ":", "QBER over the run"),
        ):
            samples = [(_finite(p.get("t_s")), _finite(p.get(key))) for p in points]
            samples = [(t, y) for t, y in samples if t is not None and y is not None]
            if samples:
                ax.plot([t for t, _ in samples], [y for _, y in samples], ls=style, color=color, lw=1.6,
                        label=_label(f"{name} {label}"))  # fmt: skip
                drawn = True
        threshold = _finite(_scenario_app(scenario, name).get("qber_threshold", d.DEFAULT_QBER_THRESHOLD))
        if threshold is not None:
            ax_q.axhline(threshold, color=color, ls="--", lw=1.0, label=_label(f"{name} threshold {threshold:g}"))
    if not drawn:
        return False
    for k, (start, stop) in enumerate(_eve_windows(results)):
        for ax in (ax_k, ax_q):
            ax.axvspan(start, stop, color="red", alpha=0.12, label="eavesdropper on" if k == 0 and ax is ax_q else None)
    ax_k.set_title("Final key bits in the pool")
    ax_k.set_ylabel("bits")
    ax_k.set_ylim(bottom=0)
    ax_q.set_title("QBER of the signal pulses (key basis)")
    ax_q.set_ylabel("QBER")
    ax_q.set_ylim(bottom=0)
    for ax, where in ((ax_k, "upper left"), (ax_q, "center left")):
        ax.set_xlabel("emulated time since the run started (s)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc=where)
    return True


# --------------------------------------------------------------------------- HTML

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { margin-top: 1.6em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.5em 0; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; } td.n { text-align: right; font-variant-numeric: tabular-nums; }
.pass { color: #11772b; font-weight: bold; } .fail { color: #b3261e; font-weight: bold; }
.note { color: #666; font-size: 0.9em; }
figure { margin: 1em 0; } img { max-width: 100%; border: 1px solid #eee; }
"""


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], numeric: Sequence[int] = ()) -> str:
    """A table; headers are plain text (escaped here), cells are HTML already escaped by the caller."""
    head = f"<thead><tr>{''.join(f'<th>{_e(h)}</th>' for h in headers)}</tr></thead>" if headers else ""
    body = "".join(
        "<tr>" + "".join(f'<td class="n">{c}</td>' if j in numeric else f"<td>{c}</td>" for j, c in enumerate(row))
        + "</tr>"
        for row in rows
    )
    return f"<table>{head}<tbody>{body}</tbody></table>"


def _verdict(passed: Any) -> str:
    return '<span class="pass">PASS</span>' if passed is True else '<span class="fail">FAIL</span>'


def _summary_html(results: Mapping[str, Any], scenario: Mapping[str, Any]) -> str:
    status = results.get("status", "unknown")
    rows = [
        ("status", f'{_verdict(results.get("passed"))} {_e(status)} (exit {_e(results.get("exit_code", "?"))})'),
        ("run id", _e(results.get("run_id", "–"))),
        ("scenario", _e(results.get("scenario", scenario.get("name", "–")))),
        ("description", _e(scenario.get("description") or "–")),
        ("seed", _e(results.get("seed", "–"))),
        ("started (UTC)", _e(results.get("started_at", "–"))),
        ("finished (UTC)", _e(results.get("finished_at", "–"))),
        ("wall time (s)", _num(results.get("wall_s"))),
        ("emulated time (s)", _num(results.get("emulated_s"))),
        ("time scale (wall s per emulated s)", _num(results.get("time_scale"))),
        ("scenario duration (emulated s)", _num(scenario.get("duration"))),
        ("finish reason", _e(results.get("finish_reason") or "–")),
        ("kernel backend", _e(results.get("backend") or "default")),
        ("qnetem version", _e(results.get("qnetem_version") or "–")),
    ]
    if results.get("error"):
        rows.append(("error", f'<span class="fail">{_e(results["error"])}</span>'))
    return _table((), [(f"<b>{_e(k)}</b>", v) for k, v in rows])


_SHOWN_METRICS = {"pairs_measured", "fidelity", "fidelity_stderr", "chsh", "chsh_stderr", "pair_rate_hz"}


def _apps_html(results: Mapping[str, Any], models: Mapping[str, AppModel], scenario: Mapping[str, Any]) -> str:
    apps = _mapping(results.get("apps"))
    if not apps:
        return '<p class="note">No apps.</p>'
    qkd_apps = {name: app for name, app in apps.items() if _mapping(app).get("kind") == "qkd"}
    others = {name: app for name, app in apps.items() if name not in qkd_apps}
    parts = [_epr_apps_html(others, models)] if others else []
    if qkd_apps:
        parts.append(_qkd_apps_html(qkd_apps, scenario))
    return "\n".join(parts)


def _epr_apps_html(apps: Mapping[str, Any], models: Mapping[str, AppModel]) -> str:
    rows = []
    for name, app in apps.items():
        app = _mapping(app)
        m = _mapping(app.get("metrics"))
        model = models.get(name, AppModel())
        requested = _mapping(app.get("requested")).get("pairs")
        others = ", ".join(f"{_e(k)} = {_num(v)}" for k, v in m.items() if k not in _SHOWN_METRICS)
        note = "; ".join(_e(x) for x in (app.get("error"), model.note) if x)
        rows.append((
            _e(name), _e(app.get("kind", "–")), _e(" ↔ ".join(map(str, _list(app.get("nodes"))))),
            _e(app.get("state", "–")),
            f"{_num(m.get('pairs_measured'))} / {_num(requested)}",
            _pm(m.get("fidelity"), m.get("fidelity_stderr")), _num(model.fidelity),
            _pm(m.get("chsh"), m.get("chsh_stderr")), _num(model.chsh),
            _num(m.get("pair_rate_hz")), _num(model.pair_rate_hz),
            _num(app.get("started_s")), _num(app.get("finished_s")), others or "–", note or "–",
        ))  # fmt: skip
    headers = ("app", "kind", "nodes", "state", "pairs measured / requested", "fidelity ± s.e.", "model F",
               "CHSH ± s.e.", "model S", "rate (Hz)", "model p/T (Hz)", "started (s)", "finished (s)",
               "other metrics", "notes")  # fmt: skip
    return _table(headers, rows, numeric=range(4, 13))


_QKD_SHOWN = {"final_key_bits", "secret_key_rate_bps", "key_rate_per_pulse", "qber", "qber_x", "cascade_efficiency",
              "single_photon_yield_lower", "single_photon_error_upper", "blocks_done", "blocks_aborted",
              "blocks_discarded", "alarms", "auth_rejects"}  # fmt: skip


def _qkd_apps_html(apps: Mapping[str, Any], scenario: Mapping[str, Any]) -> str:
    rows = []
    for name, app in apps.items():
        app = _mapping(app)
        m = _mapping(app.get("metrics"))
        nodes = [str(n) for n in _list(app.get("nodes"))]
        model_per_pulse = qkd_app_model(scenario, str(name), app)
        link = _find_link(scenario, *nodes) if len(nodes) == 2 else None
        optics = qkd_link_model(link) if link is not None else None
        model_bps = None if model_per_pulse is None or optics is None else model_per_pulse * optics.pulse_rate_hz
        requested = _mapping(app.get("requested"))
        asked = _num(requested.get("key_bits")) if requested.get("key_bits") is not None else (
            f"{_num(requested.get('duration_s'))} s" if requested.get("duration_s") is not None else "–")
        blocks = f"{_num(m.get('blocks_done'))} / {_num(m.get('blocks_aborted'))} / {_num(m.get('blocks_discarded'))}"
        others = ", ".join(f"{_e(k)} = {_num(v)}" for k, v in m.items() if k not in _QKD_SHOWN)
        rows.append((
            _e(name), _e(" → ".join(nodes)), _e(app.get("state", "–")),
            f"{_num(m.get('final_key_bits'))} / {asked}", _num(m.get("secret_key_rate_bps")), _num(model_bps),
            _num(m.get("key_rate_per_pulse")), _num(model_per_pulse), _num(m.get("qber")), _num(m.get("qber_x")),
            _num(m.get("cascade_efficiency")), _num(m.get("single_photon_yield_lower")),
            _num(m.get("single_photon_error_upper")), blocks, _num(m.get("alarms")), _num(m.get("auth_rejects")),
            _num(app.get("started_s")), _num(app.get("finished_s")), others or "–", _e(app.get("error") or "–"),
        ))  # fmt: skip
    headers = ("qkd app", "transmitter → receiver", "state", "final key bits / requested", "key rate (bit/s)",
               "asymptotic limit (bit/s)", "key bits per pulse", "asymptotic limit per pulse", "QBER (key basis)",
               "QBER (test basis)", "Cascade f", "Y1 lower", "e1 upper", "blocks done / aborted / discarded",
               "alarms", "auth rejects", "started (s)", "finished (s)", "other metrics", "notes")  # fmt: skip
    return _table(headers, rows, numeric=(*range(4, 13), 14, 15, 16, 17)) + (
        '<p class="note">Asymptotic limit: Ma et al. 2005 (vacuum + weak decoy, f = 1.22) for the pulses this '
        "app can key (signal class, Z basis at both ends, not in the QBER sample); finite blocks keep less.</p>"
    )


def _expectations_html(results: Mapping[str, Any]) -> str:
    expectations = [_mapping(e) for e in _list(results.get("expectations"))]
    if not expectations:
        return '<p class="note">The scenario sets no expectations.</p>'
    held = sum(1 for e in expectations if e.get("passed") is True)
    rows = [
        (_e(e.get("index", i)), _e(e.get("app", "–")), _e(e.get("metric", "–")), _e(e.get("bound", "–")),
         _num(e.get("observed"), 6), _verdict(e.get("passed")), _e(e.get("message", "")))
        for i, e in enumerate(expectations)
    ]  # fmt: skip
    return f"<p>{held} of {len(expectations)} held.</p>" + _table(
        ("#", "app", "metric", "bound", "observed", "result", "message"), rows, numeric=(4,)
    )


def _faults_html(results: Mapping[str, Any]) -> str:
    """Each planned fault and each step the runtime took for it (results.json `faults`)."""
    faults = _mapping(results.get("faults"))
    planned = [_mapping(f) for f in _list(faults.get("planned"))]
    if not planned:
        return '<p class="note">The scenario injects no faults.</p>'
    steps = [_mapping(s) for s in _list(faults.get("steps"))]
    rows = []
    for fault in planned:
        index = fault.get("index")
        taken = [s for s in steps if s.get("fault") == index]
        done = "; ".join(f"{_e(s.get('action'))} at {_num(s.get('at_s'), 3)} s" for s in taken) or "not reached"
        rows.append((_e(index), _e(fault.get("description", fault.get("kind"))), done))
    return f"<p>runtime: {_e(results.get('runtime', 'local'))}</p>" + _table(("#", "fault", "steps taken"), rows)


def _kms_html(results: Mapping[str, Any]) -> str:
    """The run's key management: metrics, and per KME its endpoints and counters (counts only)."""
    kms = _mapping(results.get("kms"))
    if not kms:
        return '<p class="note">The scenario has no key management.</p>'
    metrics = _mapping(kms.get("metrics"))
    html = _table(("metric", "value"), [(_e(k), _num(v)) for k, v in metrics.items()], numeric=(1,))
    rows = []
    for node, stats in _mapping(_mapping(results.get("stats")).get("nodes")).items():
        kme = _mapping(_mapping(stats).get("kms"))
        if not kme:
            continue
        c = _mapping(kme.get("counters"))
        ready = sum(_mapping(v).get("ready", 0) for v in _mapping(kme.get("store")).values())
        rows.append((_e(node), _e(_mapping(kms.get("kmes")).get(node, {}).get("etsi014", "–")),
                     _num(c.get("keys_confirmed")), _num(c.get("relays_forwarded")), _num(c.get("keys_delivered")),
                     _num(c.get("reroutes")), _num(c.get("pqc_exchanges")), _num(c.get("pqc_fallbacks")),
                     _num(ready)))  # fmt: skip
    html += _table(("KME", "ETSI 014", "relays confirmed", "relays forwarded", "keys delivered", "reroutes",
                    "PQC exchanges", "PQC fallbacks", "ready keys"), rows, numeric=(2, 3, 4, 5, 6, 7, 8))
    return html


def _links_html(results: Mapping[str, Any], scenario: Mapping[str, Any]) -> str:
    links = [_mapping(x) for x in _list(scenario.get("links"))]
    if not links:
        return '<p class="note">No links (scenario.json missing or empty).</p>'
    delivered = _mapping(_mapping(_mapping(results.get("stats")).get("broker")).get("pairs_delivered"))
    rows = []
    for link in links:
        ends = [str(x) for x in _list(link.get("endpoints"))]
        ent = _mapping(link.get("entanglement"))
        model = link_model(link)
        length, att = _finite(link.get("length_km")), _finite(link.get("attenuation_db_per_km"))
        key = "|".join(ends)
        got = delivered.get(key, delivered.get("|".join(reversed(ends))))
        rows.append((
            _e(" ↔ ".join(ends)), _num(length), _num(att),
            _num(None if length is None or att is None else length * att),
            _e(ent.get("scheme", "–")) if ent else "none", _num(ent.get("detector_efficiency")),
            _num(ent.get("visibility")), _num(ent.get("bright_state_alpha")),
            _num(model.p_success if model else None), _num(model.attempt_period_s * 1e6 if model else None),
            _num(model.pair_rate_hz if model else None), _num(model.fidelity if model else None), _num(got),
        ))  # fmt: skip
    headers = ("link", "length (km)", "attenuation (dB/km)", "loss (dB)", "scheme", "detector efficiency",
               "visibility", "bright-state α", "model p per attempt", "model T (µs)", "model p/T (Hz)",
               "model F", "pairs delivered")  # fmt: skip
    return _table(headers, rows, numeric=(1, 2, 3, *range(5, 13))) + (
        '<p class="note">Model: emulator.physics.heralding (midpoint station; T = L × 4.9 µs/km; '
        "double click p = η²/2, single click p = 2αη).</p>"
    )


def _qkd_links_html(results: Mapping[str, Any], scenario: Mapping[str, Any]) -> str:
    """The links with a `qkd` section: optics, reference values, the broker's counts and Eve's."""
    links = [_mapping(x) for x in _list(scenario.get("links")) if isinstance(_mapping(x).get("qkd"), Mapping)]
    if not links:
        return ""
    stats = _mapping(_mapping(_mapping(results.get("stats")).get("broker")).get("qkd"))
    rows = []
    for link in links:
        ends = [str(x) for x in _list(link.get("endpoints"))]
        q = _mapping(link.get("qkd"))
        model = qkd_link_model(link)
        transmitter = str(q.get("transmitter") or (ends[0] if ends else "?"))
        receiver = next((e for e in ends if e != transmitter), "?")
        st = _mapping(stats.get("|".join(ends), stats.get("|".join(reversed(ends)))))
        eve = _mapping(st.get("eve"))
        i, p = _mapping(q.get("intensities")), _mapping(q.get("class_probabilities"))
        rows.append((
            _e(f"{transmitter} → {receiver}"), _num(link.get("length_km")), _num(link.get("attenuation_db_per_km")),
            _num(q.get("pulse_rate_hz")),
            _e(" / ".join(_num(i.get(k)) for k in ("signal", "decoy", "vacuum"))),
            _e(" / ".join(_num(p.get(k)) for k in ("signal", "decoy", "vacuum"))),
            _num(q.get("receiver_efficiency")), _num(q.get("dark_count_probability")),
            _num(q.get("misalignment_error")),
            _num(model.rate_per_signal_pulse if model else None), _num(model.zero_key_km if model else None),
            _num(st.get("pulses")), _num(st.get("detections")), _num(eve.get("intercepted_detections")),
            _num(eve.get("basis_matched_detections")), _num(eve.get("split_detections")),
        ))  # fmt: skip
    headers = ("QKD link", "length (km)", "attenuation (dB/km)", "pulse rate (Hz)", "intensities s / d / v",
               "class probabilities s / d / v", "η Bob", "Y0", "e detector", "Ma et al. R per pulse (q = 1/2)",
               "zero-key length (km)", "pulses", "detections", "Eve: intercepted detections",
               "Eve: basis matched", "Eve: split detections")  # fmt: skip
    return "<h3>QKD links</h3>" + _table(headers, rows, numeric=(1, 2, 3, *range(6, 16))) + (
        '<p class="note">Ma, Qi, Zhao &amp; Lo, PRA 72, 012326 (2005): asymptotic rate with vacuum + weak decoy '
        "bounds on the expected statistics, f = 1.22; the zero-key length is where it reaches zero. Counts are "
        "the broker's (what Eve did is counted, never what she learned bit by bit).</p>"
    )


def _nodes_html(scenario: Mapping[str, Any]) -> str:
    nodes = _mapping(scenario.get("nodes"))
    if not nodes:
        return '<p class="note">No nodes (scenario.json missing or empty).</p>'
    rows = []
    for name, node in nodes.items():
        node = _mapping(node)
        mem = _memory(scenario, str(name))
        rows.append((
            _e(name), _e(node.get("role", "endpoint")), _num(bool(node.get("external", False))),
            _num(mem.get("qubits")), _num(mem.get("t1")), _num(mem.get("t2")), _num(mem.get("gate_fidelity")),
        ))  # fmt: skip
    headers = ("node", "role", "external", "memory qubits", "T1 (s)", "T2 (s)", "gate fidelity")
    return _table(headers, rows, numeric=(3, 4, 5, 6))


_CAPTIONS = {
    "topology.png": "Nodes and links; thick lines carry heralded entanglement (labelled with the scheme), "
    "dotted lines are classical only.",
    "pairs.png": "Pairs measured by each app against emulated time (sampled at each orchestrator poll, "
    "about every 0.2 s wall); dashed: the link model's mean pair rate p/T from the app's start.",
    "fidelity.png": "Estimated fidelity and CHSH value of each app with ±1 standard error; dashed: the no-wait "
    "Werner model of a double-click link, shown only when the pairs are measured at once and the memories "
    "are ideal.",
    "qkd.png": "Final key bits and QBER (signal pulses, key and test basis, over the blocks estimated so far) of "
    "each qkd app against emulated time (sampled at each orchestrator poll); dashed: the app's QBER threshold, "
    "above which blocks are aborted and an alarm raised; shaded: an eavesdropper fault in force.",
}
_MISSING = {
    "topology.png": "No topology plot: scenario.json is missing or has no nodes.",
    "pairs.png": "No progress plot: results.json has no progress samples (`series`).",
    "fidelity.png": "No fidelity plot: no app reported a fidelity or CHSH value.",
    "qkd.png": "No QKD plot: results.json has no key or QBER samples of a qkd app (`series`).",
}


def _figures_html(drawn: Mapping[str, str | None]) -> str:
    parts = []
    for name in (*PLOT_FILES, *QKD_PLOT_FILES):
        if name not in drawn:
            continue
        problem = drawn[name]
        if problem is None:
            parts.append(
                f'<figure><img src="{_e(name)}" alt="{_e(name)}"><figcaption class="note">{_e(_CAPTIONS[name])}'
                "</figcaption></figure>"
            )
        else:
            parts.append(f'<p class="note">{_e(problem)}</p>')
    return "\n".join(parts)


def _page(results: Mapping[str, Any], scenario: Mapping[str, Any], models: Mapping[str, AppModel],
          drawn: Mapping[str, str | None]) -> str:  # fmt: skip
    title = f"qnetem run {results.get('run_id') or results.get('scenario') or ''}".strip()
    return "\n".join([
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{_e(title)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
        "<h2>Summary</h2>", _summary_html(results, scenario),
        "<h2>Apps</h2>", _apps_html(results, models, scenario),
        "<h2>Expectations</h2>", _expectations_html(results),
        "<h2>Faults</h2>", _faults_html(results),
        "<h2>Key management</h2>", _kms_html(results),
        "<h2>Links</h2>", _links_html(results, scenario) + _qkd_links_html(results, scenario),
        "<h2>Nodes</h2>", _nodes_html(scenario),
        "<h2>Plots</h2>", _figures_html(drawn),
        "</body></html>",
        "",
    ])  # fmt: skip


# --------------------------------------------------------------------------- entry points


def write_report(run_dir: str | os.PathLike[str], results: Mapping[str, Any], scenario: Mapping[str, Any]) -> Path:
    """Write `report.html` and its PNGs into `run_dir`; return the path of `report.html`."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    out = Path(run_dir)
    results, scenario = _mapping(results), _mapping(scenario)
    apps = _mapping(results.get("apps"))
    models = {str(name): app_model(scenario, str(name), _mapping(app)) for name, app in apps.items()}
    # One colour per app in every plot: its position among the apps, then among series-only names.
    names = list(dict.fromkeys([*map(str, apps), *map(str, _mapping(results.get("series")))]))
    colors = {name: f"C{i % 10}" for i, name in enumerate(names)}
    topology_height = 4.5 if len(_mapping(scenario.get("nodes"))) > 2 else 3.0
    plots: dict[str, tuple[tuple[float, float], Callable[[Any], bool]]] = {
        "topology.png": ((7.0, topology_height), lambda f: _plot_topology(f, scenario)),
        "pairs.png": ((8.0, 4.5), lambda f: _plot_pairs(f, results, models, colors)),
        "fidelity.png": ((9.0, 4.0), lambda f: _plot_fidelity(f, results, models, colors)),
    }  # fmt: skip
    qkd_names = [str(n) for n, app in apps.items() if _mapping(app).get("kind") == "qkd"]
    if qkd_names:
        plots["qkd.png"] = ((10.0, 4.2), lambda f: _plot_qkd(f, results, scenario, qkd_names, colors))
        if len(qkd_names) == len(apps):  # only qkd apps: no pairs or fidelity to plot, nor to apologise for
            del plots["pairs.png"], plots["fidelity.png"]
    for name in (*PLOT_FILES, *QKD_PLOT_FILES):
        if name not in plots:
            (out / name).unlink(missing_ok=True)  # a stale plot of an earlier rendering
    drawn: dict[str, str | None] = {}  # file -> None if written, else why not
    for name, (size, draw) in plots.items():
        path = out / name
        fig = Figure(figsize=size, dpi=110, layout="constrained")
        if draw(fig):
            fig.savefig(path, format="png")
            drawn[name] = None
        else:
            path.unlink(missing_ok=True)  # a stale plot of an earlier rendering
            drawn[name] = _MISSING[name]
    target = out / REPORT_FILE
    tmp = out / f".{REPORT_FILE}.tmp"
    tmp.write_text(_page(results, scenario, models, drawn), encoding="utf-8")
    os.replace(tmp, target)
    return target


def load_run_dir(run_dir: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """`(results, scenario)` of a finished run directory.

    Raises `OSError` if `results.json` cannot be read and `ValueError` if it is not a
    JSON object; a missing or unreadable `scenario.json` gives `{}` (the report then
    leaves out what needs it).
    """
    path = Path(run_dir)
    results = json.loads((path / "results.json").read_text(encoding="utf-8"))
    if not isinstance(results, dict):
        raise ValueError("not a JSON object")
    try:
        scenario = json.loads((path / "scenario.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        scenario = {}
    return results, scenario if isinstance(scenario, dict) else {}


def render_run_dir(run_dir: str | os.PathLike[str]) -> Path:
    """(Re)render `report.html` of a finished run from its `results.json` and `scenario.json`."""
    return write_report(run_dir, *load_run_dir(run_dir))
