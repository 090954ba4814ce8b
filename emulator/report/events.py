"""The run timeline, `events.jsonl`: one JSON object per line (DESIGN §11).

Theory of operation: every line is `{"event": <kind>, "t_s": <emulated s>, "wall":
<ISO-8601 UTC>, "wall_s": <wall s since the log opened>, ...fields}`. `t_s` is the
broker's emulated clock (seconds since the broker's t0) as the orchestrator last
estimated it, or null before the broker's clock is known (the first lines of a run).
Lines are flushed one by one so a crash leaves a readable prefix.

Event kinds written by the orchestrator (`EventKind`): run_started, process_started,
process_exited, node_registered, timeline_started, app_started, app_done, app_failed,
expectation, run_finished. Consumers must ignore kinds and fields they do not know.

Nothing secret is ever written: fields go through `redact` with the run's tokens, and
field names that look like credentials are refused outright (a programming error).
Clocks are injectable so tests can pin the timestamps.
"""

from __future__ import annotations

import datetime as _dt
import enum
import json
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from .results import json_safe, redact

__all__ = ["EventKind", "EventLog", "iso_utc", "read_events"]

_FORBIDDEN_FIELD_WORDS = ("token", "secret", "password", "key_bytes")


class EventKind(enum.StrEnum):
    RUN_STARTED = "run_started"
    PROCESS_STARTED = "process_started"
    PROCESS_EXITED = "process_exited"
    NODE_REGISTERED = "node_registered"
    EXTERNAL_AWAITED = "external_awaited"  # the run waits for nodes someone else starts
    TIMELINE_STARTED = "timeline_started"
    APP_STARTED = "app_started"
    APP_DONE = "app_done"
    APP_FAILED = "app_failed"
    FAULT_APPLIED = "fault_applied"  # a scenario fault took effect (node down/frozen, link cut)
    FAULT_REVERTED = "fault_reverted"  # ... and was undone (node restarted/thawed, link restored)
    QKD_BLOCK = "qkd_block"  # a qkd app finished a block: key, aborted or discarded (counts only)
    QKD_ALARM = "qkd_alarm"  # ... and estimation raised the eavesdropper alarm on it
    KMS_STARTED = "kms_started"  # a node's KME runs; where its ETSI 014 / SKIP servers listen
    KMS_ALARM = "kms_alarm"  # a KME fell back to PQC-only keys (`on_empty: pqc`) or saw a forged relay
    EXPECTATION = "expectation"
    RUN_FINISHED = "run_finished"


def iso_utc(epoch_s: float) -> str:
    """`2025-01-31T12:00:00.123Z` for a Unix time."""
    stamp = _dt.datetime.fromtimestamp(epoch_s, tz=_dt.UTC)
    return stamp.strftime("%Y-%m-%dT%H:%M:%S.") + f"{stamp.microsecond // 1000:03d}Z"


class EventLog:
    """Append-only writer of `events.jsonl`. Use as a context manager or call `close()`."""

    def __init__(
        self,
        path: str | Path,
        *,
        secrets: Iterable[str] = (),
        wall_clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = Path(path)
        self._secrets = tuple(secrets)
        self._wall_clock = wall_clock
        self._monotonic = monotonic
        self._t0_mono = monotonic()
        self._file: IO[str] | None = self.path.open("w", encoding="utf-8")
        self.count = 0

    def emit(self, event: str, /, *, t_s: float | None = None, **fields: Any) -> dict[str, Any]:
        """Append one event; returns the object written (after redaction)."""
        if self._file is None:
            raise ValueError("event log is closed")
        for name in fields:
            lowered = name.lower()
            if any(word in lowered for word in _FORBIDDEN_FIELD_WORDS):
                raise ValueError(f"refusing to log a field named {name!r} (looks like a credential)")
            if name in ("event", "t_s", "wall", "wall_s"):
                raise ValueError(f"field name {name!r} is reserved")
        record: dict[str, Any] = {
            "event": str(event),
            "t_s": None if t_s is None else round(float(t_s), 6),
            "wall": iso_utc(self._wall_clock()),
            "wall_s": round(self._monotonic() - self._t0_mono, 6),
        }
        record.update(fields)
        record = redact(json_safe(record), self._secrets)
        self._file.write(json.dumps(record, allow_nan=False, separators=(",", ":")) + "\n")
        self._file.flush()
        self.count += 1
        return record

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> EventLog:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def read_events(path: str | Path) -> list[dict[str, Any]]:
    """Parse an `events.jsonl` file (tests and report tools)."""
    out = []
    with Path(path).open(encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if line:
                out.append(json.loads(line))
    return out
