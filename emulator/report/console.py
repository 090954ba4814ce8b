"""Console output of a run: a live progress display and the final summary (DESIGN §11).

Theory of operation: `RunProgress` wraps a rich `Progress` with one bar for the
emulated clock (elapsed / scenario duration) and one bar per app, described by an
`AppBar`: an epr-test app counts pairs measured / pairs requested, a qkd app final key
bits / `key_bits` requested or, when it runs for a `duration` only, its running time
against that duration (the count then shows the key bits so far); each with the app's
rate. It is fed snapshots by the orchestrator; when `live` is false (``--quiet``, or
stdout is not a terminal) every call is a no-op, so the caller never branches.
`print_summary` renders a `results.json` document (the dict, so a stored report can be
re-rendered) as two tables — apps with their metrics (the columns of the app kinds
present: pairs, fidelity, CHSH and rate for epr-test; key bits, key rate, QBERs and
Cascade efficiency for qkd), and expectations with pass/fail — followed by a one-line
verdict.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

__all__ = ["AppBar", "RunProgress", "format_metric", "print_summary", "summary_tables"]

# Metric columns of the app table, in display order, with their headers: those of
# entanglement apps (every kind but qkd), those of qkd apps, then those of every app.
_EPR_COLUMNS: tuple[tuple[str, str], ...] = (
    ("pairs_measured", "pairs"),
    ("fidelity", "fidelity"),
    ("chsh", "CHSH"),
    ("pair_rate_hz", "rate (Hz)"),
)
_QKD_COLUMNS: tuple[tuple[str, str], ...] = (
    ("final_key_bits", "key bits"),
    ("secret_key_rate_bps", "key rate (bit/s)"),
    ("qber", "QBER"),
    ("qber_x", "QBER X"),
    ("cascade_efficiency", "f"),
    ("alarms", "alarms"),
)
_COMMON_COLUMNS: tuple[tuple[str, str], ...] = (("wall_s", "wall (s)"),)


@dataclass(frozen=True, slots=True)
class AppBar:
    """How one app's progress bar counts.

    `total`: the amount requested (pairs, key bits), or with `by_time` the emulated
    seconds the app runs; `unit`: what the count counts (`pairs`, `bits`), also the
    rate's unit per emulated second.
    """

    name: str
    total: float
    unit: str = "pairs"
    by_time: bool = False


def format_metric(value: Any, stderr: Any = None) -> str:
    """Short human form of a metric: 4 significant digits, `± stderr` when known."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        text = f"{value:.4g}"
        if isinstance(stderr, int | float) and not isinstance(stderr, bool):
            text += f" ± {stderr:.2g}"
        return text
    return str(value)


class RunProgress:
    """Live progress of a run; a no-op when `live` is false."""

    def __init__(
        self,
        console: Console,
        apps: Sequence[AppBar | tuple[str, int]],
        *,
        duration_s: float,
        live: bool,
    ) -> None:
        self._live = live
        self._duration_s = duration_s
        self._tasks: dict[str, TaskID] = {}
        bars = [a if isinstance(a, AppBar) else AppBar(a[0], a[1]) for a in apps]
        self._bars: dict[str, AppBar] = {b.name: b for b in bars}
        self._clock_task: TaskID | None = None
        self._progress: Progress | None = None
        if not live:
            return
        self._progress = Progress(
            TextColumn("[bold]{task.description:<20}"),
            BarColumn(bar_width=30),
            TextColumn("{task.fields[count]:>13}"),  # "measured/requested" for apps, blank for the clock
            TextColumn("{task.fields[note]}"),
            TimeElapsedColumn(),
            console=console,
            transient=False,
            refresh_per_second=5,
        )
        self._clock_task = self._progress.add_task(
            "emulated time", total=max(duration_s, 1e-9), note="waiting for nodes", count="", start=True
        )
        for bar in bars:
            count = f"0 {bar.unit}" if bar.by_time else f"0/{_amount(bar.total)}"
            total = max(bar.total, 1e-9) if bar.by_time else max(bar.total, 1)
            self._tasks[bar.name] = self._progress.add_task(bar.name, total=total, note="pending", count=count)

    def __enter__(self) -> RunProgress:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def set_phase(self, note: str) -> None:
        if self._progress is not None and self._clock_task is not None:
            self._progress.update(self._clock_task, note=note)

    def set_clock(self, elapsed_s: float) -> None:
        """Emulated seconds since the timeline origin."""
        if self._progress is not None and self._clock_task is not None:
            shown = min(max(elapsed_s, 0.0), self._duration_s)
            self._progress.update(
                self._clock_task,
                completed=shown,
                note=f"{elapsed_s:.3g} s / {self._duration_s:.3g} s",
            )

    def update_app(
        self, name: str, *, measured: int | None, state: str, rate_hz: float | None, running_s: float | None = None,
        detail: str = "",
    ) -> None:
        """`measured`: the amount so far; `running_s`: emulated seconds since the app started
        (what a bar `by_time` shows); `detail`: kind-specific figures shown after the rate."""
        if self._progress is None or name not in self._tasks:
            return
        bar = self._bars[name]
        note = state
        if rate_hz is not None:
            note += f"  {rate_hz:.4g} {bar.unit}/s (emulated)"
        if detail:
            note += f"  {escape(detail)}"
        fields: dict[str, Any] = {"note": note}
        if bar.by_time:
            if running_s is not None:
                fields["completed"] = min(running_s, bar.total)
            if measured is not None:
                fields["count"] = f"{measured} {bar.unit}"
        elif measured is not None:
            fields["completed"] = measured
            fields["count"] = f"{measured}/{_amount(bar.total)}"
        self._progress.update(self._tasks[name], **fields)


def _amount(total: float) -> str:
    return str(int(total)) if float(total).is_integer() else f"{total:g}"


def summary_tables(results: Mapping[str, Any]) -> list[Table]:
    """The apps table and (when the scenario has any) the expectations table."""
    apps_table = Table(title=f"qnetem run {results.get('run_id', '')}", title_justify="left")
    apps_table.add_column("app")
    apps_table.add_column("kind")
    apps_table.add_column("nodes")
    apps_table.add_column("state")
    apps = results.get("apps") or {}
    kinds = {str(app.get("kind", "")) for app in apps.values()}
    columns = list(_EPR_COLUMNS) if (kinds - {"qkd"}) or not kinds else []
    columns += list(_QKD_COLUMNS) if "qkd" in kinds else []
    columns += _COMMON_COLUMNS
    for _, header in columns:
        apps_table.add_column(header, justify="right")
    for name, app in apps.items():
        metrics = app.get("metrics") or {}
        state = app.get("state", "?")
        style = {"done": "green", "failed": "red"}.get(state, "yellow")
        cells = [format_metric(metrics.get(key), metrics.get(f"{key}_stderr")) for key, _ in columns]
        apps_table.add_row(
            escape(name), escape(str(app.get("kind", ""))), escape(" ↔ ".join(app.get("nodes", []))),
            f"[{style}]{escape(str(state))}", *cells,
        )
    tables = [apps_table]
    expectations = results.get("expectations") or []
    if expectations:
        exp_table = Table(title="expectations", title_justify="left")
        exp_table.add_column("#", justify="right")
        exp_table.add_column("metric")
        exp_table.add_column("bound")
        exp_table.add_column("observed", justify="right")
        exp_table.add_column("result")
        exp_table.add_column("message")
        for e in expectations:
            verdict = "[green]pass" if e.get("passed") else "[red]FAIL"
            exp_table.add_row(
                str(e.get("index", "")),
                escape(str(e.get("metric", ""))),
                escape(str(e.get("bound", ""))),
                format_metric(e.get("observed")),
                verdict,
                escape(str(e.get("message", ""))),
            )
        tables.append(exp_table)
    return tables


def print_summary(console: Console, results: Mapping[str, Any], *, run_dir: str | None = None) -> None:
    """Print the summary tables and the verdict line."""
    for table in summary_tables(results):
        console.print(table)
    status = results.get("status", "?")
    expectations = results.get("expectations") or []
    held = sum(1 for e in expectations if e.get("passed"))
    colour = {"passed": "green", "failed": "red"}.get(status, "red")
    line = f"[bold {colour}]{status}[/]: {held}/{len(expectations)} expectations held"
    wall = results.get("wall_s")
    emulated = results.get("emulated_s")
    if isinstance(wall, int | float):
        line += f", {wall:.2f} s wall"
    if isinstance(emulated, int | float):
        line += f", {emulated:.4g} s emulated"
    console.print(line)
    if results.get("error"):
        console.print(f"[red]error:[/] {escape(str(results['error']))}", highlight=False)
    if run_dir:
        console.print(f"run directory: {run_dir}", highlight=False)
