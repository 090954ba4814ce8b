"""Run reports: `results.json` (metrics, expectations), `events.jsonl` (timeline), console output.

Pure data and file writers; no sockets, no processes (the orchestrator in
`emulator.runtime` feeds them).
"""

from .console import AppBar, RunProgress, format_metric, print_summary, summary_tables
from .events import EventKind, EventLog, iso_utc, read_events
from .results import (
    KNOWN_METRICS,
    AppOutcome,
    AppState,
    ExpectationResult,
    ExpectationSpec,
    RunResults,
    RunStatus,
    evaluate_expectation,
    evaluate_expectations,
    json_safe,
    redact,
    write_json_atomic,
)

__all__ = [
    "KNOWN_METRICS", "AppBar", "AppOutcome", "AppState", "EventKind", "EventLog", "ExpectationResult",
    "ExpectationSpec", "RunProgress", "RunResults", "RunStatus", "evaluate_expectation",
    "evaluate_expectations", "format_metric", "iso_utc", "json_safe", "print_summary",
    "read_events", "redact", "summary_tables", "write_json_atomic",
]  # fmt: skip
