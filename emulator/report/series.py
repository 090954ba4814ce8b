"""Bounded time series of each app's progress, for the `series` key of `results.json`.

Theory of operation: the orchestrator polls every running app about every 0.2 s wall
and hands the initiator's results to `SeriesRecorder.record(app, t_s, results)` with
the emulated time since the run's origin. Each sample keeps `t_s` and the numeric
metrics present at that moment (`pairs_measured`, `fidelity`, `chsh`, their standard
errors, `pair_rate_hz`); None, booleans and non-finite values are dropped.

A long run must not grow `results.json` without bound, so each app keeps at most
`max_points` samples: when the list overflows, every second sample is dropped (the
first stays) and from then on only every second offered sample is kept (the stride
doubles). Samples stay evenly spread over the run at any length. The latest offered
sample is always kept aside and appended by `to_dict`, so the series ends at the app's
last known state even when the stride skipped it.

Pure data: no clock, no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

__all__ = ["DEFAULT_MAX_POINTS", "SeriesRecorder"]

DEFAULT_MAX_POINTS = 2000


def _numeric(results: Mapping[str, Any]) -> dict[str, float | int]:
    out: dict[str, float | int] = {}
    for key, value in results.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if isinstance(value, float) and not math.isfinite(value):
            continue
        out[str(key)] = value
    return out


class _Track:
    __slots__ = ("last", "offered", "points", "stride")

    def __init__(self) -> None:
        self.points: list[dict[str, Any]] = []
        self.stride = 1
        self.offered = 0
        self.last: dict[str, Any] | None = None


class SeriesRecorder:
    """Per-app samples `{"t_s": ..., "pairs_measured": ..., ...}`, at most ~`max_points` each."""

    def __init__(self, max_points: int = DEFAULT_MAX_POINTS) -> None:
        if max_points < 2:
            raise ValueError(f"max_points must be >= 2, got {max_points}")
        self.max_points = max_points
        self._tracks: dict[str, _Track] = {}

    def record(self, app: str, t_s: float, results: Mapping[str, Any]) -> None:
        """Offer one sample of `app` at emulated time `t_s` (seconds since the run's origin)."""
        track = self._tracks.setdefault(app, _Track())
        point: dict[str, Any] = {"t_s": round(float(t_s), 6), **_numeric(results)}
        point.pop("wall_s", None)  # wall time of the app itself: not a progress metric
        track.last = point
        keep = track.offered % track.stride == 0
        track.offered += 1
        if not keep:
            return
        track.points.append(point)
        if len(track.points) > self.max_points:
            track.points = track.points[::2]
            track.stride *= 2

    def to_dict(self) -> dict[str, list[dict[str, Any]]]:
        """`{app: [sample, ...]}` in time order, each ending at the latest sample offered."""
        out = {}
        for app, track in self._tracks.items():
            points = list(track.points)
            if track.last is not None and (not points or points[-1] is not track.last):
                points.append(track.last)
            out[app] = points
        return out
