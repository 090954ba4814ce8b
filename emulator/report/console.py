"""Console output of a run: a live progress display and the final summary (DESIGN §11).

Theory of operation: `RunProgress` wraps a rich `Progress` with one bar for the
emulated clock (elapsed / scenario duration) and one bar per app (pairs measured /
pairs requested, with the app's rate). It is fed snapshots by the orchestrator; when
`live` is false (``--quiet``, or stdout is not a terminal) every call is a no-op, so the
caller never branches. `print_summary` renders a `results.json` document (the dict, so a
stored report can be re-rendered) as two tables — apps with their metrics, and
expectations with pass/fail — followed by a one-line verdict.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

__all__ = ["RunProgress", "format_metric", "print_summary", "summary_tables"]

# Metric columns of the app table, in display order, with their headers.
_METRIC_COLUMNS: tuple[tuple[str, str], ...] = (
    ("pairs_measured", "pairs"),
    ("fidelity", "fidelity"),
    ("chsh", "CHSH"),
    ("pair_rate_hz", "rate (Hz)"),
    ("wall_s", "wall (s)"),
)


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
        apps: Sequence[tuple[str, int]],
        *,
        duration_s: float,
        live: bool,
    ) -> None:
        self._live = live
        self._duration_s = duration_s
        self._tasks: dict[str, TaskID] = {}
        self._totals: dict[str, int] = dict(apps)
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
        for name, total in apps:
            self._tasks[name] = self._progress.add_task(
                name, total=max(total, 1), note="pending", count=f"0/{total}"
            )

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

    def update_app(self, name: str, *, measured: int | None, state: str, rate_hz: float | None) -> None:
        if self._progress is None or name not in self._tasks:
            return
        note = state
        if rate_hz is not None:
            note += f"  {rate_hz:.4g} pairs/s (emulated)"
        fields: dict[str, Any] = {"note": note}
        if measured is not None:
            fields["completed"] = measured
            fields["count"] = f"{measured}/{self._totals[name]}"
        self._progress.update(self._tasks[name], **fields)


def summary_tables(results: Mapping[str, Any]) -> list[Table]:
    """The apps table and (when the scenario has any) the expectations table."""
    apps_table = Table(title=f"qnetem run {results.get('run_id', '')}", title_justify="left")
    apps_table.add_column("app")
    apps_table.add_column("kind")
    apps_table.add_column("nodes")
    apps_table.add_column("state")
    for _, header in _METRIC_COLUMNS:
        apps_table.add_column(header, justify="right")
    for name, app in (results.get("apps") or {}).items():
        metrics = app.get("metrics") or {}
        state = app.get("state", "?")
        style = {"done": "green", "failed": "red"}.get(state, "yellow")
        cells = [
            format_metric(metrics.get(key), metrics.get(f"{key}_stderr")) for key, _ in _METRIC_COLUMNS
        ]
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
