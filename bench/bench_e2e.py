"""End-to-end benchmark: entangled pairs delivered and measured per wall second, whole stack.

Run: ``python bench/bench_e2e.py [--quick] [--pairs 20000] [--time-scale 0.001]
[--backends c,numpy]``. Prints one JSON object per line:

* ``env``: Python, platform, CPU count;
* ``e2e_epr``: per backend, one full `qnetem run` through the local runtime
  (`emulator.runtime.run_scenario`, the same code path as the command): a broker and two
  node processes on 127.0.0.1, one epr-test app of `pairs` pairs on a 10 km
  double-click link. Reported: pairs measured, the app's own wall time (`app_wall_s`,
  from the first request to the last matched result, measured by the initiator node),
  `pairs_per_wall_s` = pairs / app_wall_s, the orchestrator's whole-run wall time
  (process start-up, registration, shutdown included), the emulated pair rate and the
  fidelity (a sanity check that speed did not break the physics).

Method: `time_scale` is set small (default 0.001: one emulated second lasts 1 ms) so
the physical pair rate (~5.2 kHz emulated = ~5.2 M/s wall) far exceeds what the
processes can carry — the number measures the emulator (broker, wire, node stacks),
not the physics. `duration` is set so the run never stops on time (1 hour of wall
time). Each backend runs in its own run directory under a temporary directory.
Wall-clock numbers depend on the machine (2 cores here: broker and both nodes share
them); compare backends within one run.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import emit, environment_record, run_scenario_data  # noqa: E402


def scenario(pairs: int, time_scale: float) -> dict[str, Any]:
    wall_budget_s = 3600.0
    return {
        "name": "bench-e2e",
        "seed": 1,
        "duration": f"{wall_budget_s / time_scale:g}s",
        "time_scale": time_scale,
        "nodes": {
            "alice": {"role": "endpoint", "memory": {"qubits": 256}},
            "bob": {"role": "endpoint", "memory": {"qubits": 256}},
        },
        "links": [
            {
                "endpoints": ["alice", "bob"],
                "length_km": 10,
                "entanglement": {"scheme": "double-click", "detector_efficiency": 0.9, "visibility": 0.95},
            }
        ],
        "apps": [{"kind": "epr-test", "name": "epr", "nodes": ["alice", "bob"], "pairs": pairs}],
        "expect": [{"metric": "pairs_measured", "app": "epr", "min": pairs}],
    }


def run_one(workdir: Path, backend: str, pairs: int, time_scale: float) -> dict[str, Any]:
    outcome, run_wall_s = run_scenario_data(scenario(pairs, time_scale), workdir, f"bench-{backend}", backend=backend)
    record: dict[str, Any] = {
        "bench": "e2e_epr",
        "backend": backend,
        "pairs_requested": pairs,
        "time_scale": time_scale,
        "exit_code": int(outcome.exit_code),
        "run_wall_s": round(run_wall_s, 3),
    }
    if outcome.results is None:
        record["error"] = outcome.message
        return record
    app = outcome.results.apps["epr"]
    metrics = dict(app.metrics)
    measured = metrics.get("pairs_measured")
    app_wall_s = metrics.get("wall_s")
    record.update(
        {
            "state": app.state.value,
            "pairs_measured": measured,
            "app_wall_s": app_wall_s,
            "pairs_per_wall_s": round(measured / app_wall_s, 1) if measured and app_wall_s else None,
            "pairs_per_run_wall_s": round(measured / run_wall_s, 1) if measured else None,
            "pair_rate_hz_emulated": metrics.get("pair_rate_hz"),
            "fidelity": metrics.get("fidelity"),
            "fidelity_stderr": metrics.get("fidelity_stderr"),
            "error": outcome.results.error,
        }
    )
    return record


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2000 pairs, c backend only")
    parser.add_argument("--pairs", type=int, default=20000)
    parser.add_argument("--time-scale", type=float, default=0.001)
    parser.add_argument("--backends", default="c,numpy")
    args = parser.parse_args()
    pairs = 2000 if args.quick else args.pairs
    backends = ["c"] if args.quick else [b for b in args.backends.split(",") if b]
    emit(environment_record())
    with tempfile.TemporaryDirectory(prefix="qnetem-bench-e2e-") as tmp:
        for backend in backends:
            emit(run_one(Path(tmp), backend, pairs, args.time_scale))
    return 0


if __name__ == "__main__":
    sys.exit(main())
