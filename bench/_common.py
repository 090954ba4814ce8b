"""What the micro-benchmarks share: JSON-lines output, the environment record, timing.

Benchmarks are run as scripts (`python bench/bench_x.py`), so this module is imported
as `_common` from the bench directory. `per_call_s` times a call with enough repetitions
that one loop lasts at least `min_loop_s`, then reports the best of `loops` loops (the
least-disturbed measurement on a shared machine), per call.
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

import emulator


def emit(record: dict[str, Any]) -> None:
    print(json.dumps(record), flush=True)


def environment_record() -> dict[str, Any]:
    return {
        "bench": "environment",
        "qnetem": emulator.__version__,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "cpu_count": os.cpu_count(),
    }


def per_call_s(fn: Callable[[], object], min_loop_s: float, loops: int = 5) -> float:
    fn()  # warm-up (first-call allocation, cffi type caches, FFT plans)
    reps = 1
    while True:
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        dt = time.perf_counter() - t0
        if dt >= min_loop_s:
            break
        reps = max(reps * 2, int(reps * min_loop_s / max(dt, 1e-9)))
    best = dt
    for _ in range(loops - 1):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        best = min(best, time.perf_counter() - t0)
    return best / reps


def run_scenario_data(data: Mapping[str, Any], workdir: Path, stem: str, **options: Any) -> tuple[Any, float]:
    """Write `data` as `workdir/<stem>.yaml` and run it through `qnetem run`'s code path
    (`emulator.runtime.run_scenario`, quiet, run directory `workdir/run-<stem>`); returns
    the outcome and the wall seconds of the whole run. `options`: more RunOptions fields."""
    import yaml
    from rich.console import Console

    from emulator.runtime import RunOptions, run_scenario

    path = workdir / f"{stem}.yaml"
    path.write_text(yaml.safe_dump(dict(data), sort_keys=False))
    t0 = time.perf_counter()
    outcome = run_scenario(
        RunOptions(scenario_path=path, out_dir=workdir / f"run-{stem}", quiet=True, **options),
        console=Console(quiet=True),
    )
    return outcome, time.perf_counter() - t0
