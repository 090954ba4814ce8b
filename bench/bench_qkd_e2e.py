"""End-to-end QKD benchmark: final key bits per wall second on a 10 km link, time_scale 1.

Run: ``python bench/bench_qkd_e2e.py [--quick] [--length-km 10] [--duration-s 20]
[--pulse-rate-hz 1e9] [--block-bits 1000000]``. Prints one JSON object per line:

* ``environment``: versions, CPU count;
* ``qkd_e2e`` ``mode: "in-memory"`` — the baseline: the same two `qkd` app instances,
  the real broker core (optical layer in C) and every post-processing stage, driven in
  one process with no sockets (nodes.testing.AppNetwork, 10 ms steps) as fast as the
  CPU allows; ``final_bits_per_wall_s`` = final key bits / wall seconds of that loop,
  and ``emulated_per_wall`` = emulated seconds per wall second (>= 1: the stack keeps up
  with the hardware on one core);
* ``qkd_e2e`` ``mode: "processes"`` — one full `qnetem run` through the local runtime
  (`emulator.runtime.run_scenario`, the code path of the command): a broker and two node
  processes on 127.0.0.1 over real TCP, at time_scale 1, so the hardware's clock is the
  wall clock. ``final_bits_per_wall_s`` = final key bits / wall seconds of emission (at
  time_scale 1 one emulated second is one wall second); ``detections_dropped_fraction``
  shows how much the receiver had to shed to keep pace (nodes/apps/qkd.py) and
  ``pulses_lost_backlog_fraction`` how much the broker dropped while the receiver's node
  was busy and did not read (docs/protocol.md §4.7); ``qber``
  and ``blocks_done`` are sanity checks that speed did not break the physics.

Numbers depend on the machine: on 2 cores the broker and both nodes share them. The
model rate for comparison (``asymptotic_bps``): Ma et al. 2005 vacuum+weak decoy GLLP
rate per pulse (emulator.physics.key_rate_vs_distance) x pulse rate — the finite-key
rate of 10^6-bit blocks is well below it (Lim et al. 2014).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
from _common import emit, environment_record, run_scenario_data  # noqa: E402

from emulator.broker.config import BrokerConfig, LinkConfig, MemoryConfig, qkd_config_from_mapping  # noqa: E402
from emulator.physics import GYS_PARAMETERS, asymptotic_key_rate  # noqa: E402
from emulator.testing import InMemoryBroker  # noqa: E402
from nodes.testing import AppNetwork  # noqa: E402

CLASS_P = [0.5, 0.25, 0.25]  # the scenario default (finite-key decoy statistics)
ATTENUATION_DB_PER_KM = 0.21  # GYS, Ma et al. 2005 Table I


def in_memory(length_km: float, duration_s: float, rate_hz: float, block_bits: int) -> dict[str, Any]:
    qkd = qkd_config_from_mapping(
        {"pulse_rate_hz": rate_hz, "class_probabilities": CLASS_P},
        endpoints=("alice", "bob"), length_km=length_km, attenuation_db_per_km=ATTENUATION_DB_PER_KM,
    )  # fmt: skip
    mem = MemoryConfig(qubits=2)
    config = BrokerConfig.build(
        {"alice": mem, "bob": mem},
        [LinkConfig(("alice", "bob"), length_km, ATTENUATION_DB_PER_KM, qkd=qkd)],
        seed=1,
    )
    net = AppNetwork(InMemoryBroker(config), ["alice", "bob"], rng=np.random.default_rng(1), step_s=0.01)
    t0 = time.perf_counter()
    net.start_app("bob", "qkd", "qkd", {"role": "responder", "peer": "alice", "max_lag_s": 1e9})
    common = {"duration_s": duration_s, "block_key_bits": block_bits}
    net.start_app("alice", "qkd", "qkd", {"role": "initiator", "peer": "bob", **common})
    alice, bob = net.host("alice"), net.host("bob")
    net.run_until(
        lambda: alice.app("qkd").finished and bob.app("qkd").finished,  # type: ignore[union-attr]
        max_t_s=duration_s + 600,
    )
    wall_s = time.perf_counter() - t0
    r = alice.status("qkd").results
    return {
        "wall_s": round(wall_s, 3),
        "emulated_s": round(net.now, 3),
        "emulated_per_wall": round(net.now / wall_s, 3),
        "final_key_bits": r["final_key_bits"],
        "final_bits_per_wall_s": round(r["final_key_bits"] / wall_s, 1),
        "secret_key_rate_bps_emulated": round(r["secret_key_rate_bps"], 1),
        "blocks_done": r["blocks_done"],
        "qber": r["qber"],
        "pool_match": r["pool_match"],
    }


def scenario(length_km: float, duration_s: float, rate_hz: float, block_bits: int) -> dict[str, Any]:
    return {
        "name": "bench-qkd-e2e",
        "seed": 1,
        "duration": f"{duration_s + 120:g}s",
        "time_scale": 1,
        "nodes": {"alice": {}, "bob": {}},
        "links": [
            {
                "endpoints": ["alice", "bob"],
                "length_km": length_km,
                "attenuation_db_per_km": ATTENUATION_DB_PER_KM,
                "qkd": {"pulse_rate_hz": rate_hz},
            }
        ],
        "apps": [
            {"kind": "qkd", "name": "qkd", "nodes": ["alice", "bob"], "duration": f"{duration_s:g}s",
             "block_bits": block_bits},
        ],  # fmt: skip
    }


def processes(workdir: Path, length_km: float, duration_s: float, rate_hz: float, block_bits: int) -> dict[str, Any]:
    outcome, run_wall_s = run_scenario_data(
        scenario(length_km, duration_s, rate_hz, block_bits), workdir, "bench-qkd"
    )
    record: dict[str, Any] = {"exit_code": int(outcome.exit_code), "run_wall_s": round(run_wall_s, 3)}
    if outcome.results is None:
        record["error"] = outcome.message
        return record
    app = outcome.results.apps["qkd"]
    m = dict(app.metrics)
    if not m:
        record["error"] = app.error
        return record
    responder = outcome.results.stats.get("apps", {}).get("qkd", {}).get("responder", {}).get("results") or {}
    kept = responder.get("detections", 0)
    pulses, lost = responder.get("pulses", 0), responder.get("pulses_lost_backlog", 0)
    dropped = responder.get("detections_dropped", 0)
    running_s = m.get("running_s") or 0.0
    record.update(
        {
            "final_key_bits": m.get("final_key_bits"),
            "running_s": running_s,
            "final_bits_per_wall_s": round(m["final_key_bits"] / running_s, 1) if running_s else None,
            "blocks_done": m.get("blocks_done"),
            "qber": m.get("qber"),
            "detections_kept": kept,
            "detections_dropped_fraction": round(dropped / (kept + dropped), 4) if kept + dropped else None,
            # pulses whose detections the broker dropped while the receiver did not read (§4.7)
            "pulses_lost_backlog_fraction": round(lost / (pulses + lost), 4) if pulses + lost else None,
            "pool_match": m.get("pool_match"),
            "error": outcome.results.error,
        }
    )
    return record


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="5 s of emission instead of 20")
    parser.add_argument("--length-km", type=float, default=10.0)
    parser.add_argument("--duration-s", type=float, default=20.0)
    parser.add_argument("--pulse-rate-hz", type=float, default=1e9)
    parser.add_argument("--block-bits", type=int, default=1_000_000)
    args = parser.parse_args()
    duration_s = 5.0 if args.quick else args.duration_s
    base = {
        "bench": "qkd_e2e", "length_km": args.length_km, "pulse_rate_hz": args.pulse_rate_hz,
        "block_bits": args.block_bits, "duration_s": duration_s,
        "asymptotic_bps": round(asymptotic_key_rate(GYS_PARAMETERS, args.length_km) * args.pulse_rate_hz, 1),
    }  # fmt: skip
    emit(environment_record())
    emit({**base, "mode": "in-memory", **in_memory(args.length_km, duration_s, args.pulse_rate_hz, args.block_bits)})
    with tempfile.TemporaryDirectory(prefix="qnetem-bench-qkd-") as tmp:
        rec = processes(Path(tmp), args.length_km, duration_s, args.pulse_rate_hz, args.block_bits)
    emit({**base, "mode": "processes", "time_scale": 1, **rec})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
