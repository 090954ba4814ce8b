"""Start-up benchmark: wall time until every node registered, local processes vs containers.

Run: ``python bench/bench_startup.py [--quick] [--sizes 2,10,30] [--runtimes local,docker]``.
Prints one JSON object per line:

* ``env``: Python, platform, CPU count, docker engine version (or why there is none);
* ``startup``: per runtime and network size N, one full `qnetem run` (the same code path
  as the command) of a chain of N nodes (`n00 - n01 - ... `, one classical link per
  neighbour pair, 10 km each) whose only app, a 200-pair epr-test between the first two
  nodes, starts 3 emulated seconds after registration (time_scale 1) so that the nodes
  stay up long enough to be measured. Reported: `registered_s`, wall seconds from the
  run's first event to the last `node_registered` event (broker start, node start-up,
  broker sessions, and for docker the network and container creation), the whole-run
  wall time (`run_wall_s`, including shutdown, container removal and the report), and
  the nodes' memory: resident set size of each node process (local) or the memory
  cgroup usage of each node container minus its page cache (docker), sampled every
  0.25 s while the run lasts; the per-node peak is reported as median and max over the
  nodes, in MiB.

The local runtime is the baseline in the same run. For docker the image must exist or is
built first (offline when debootstrap is available; that one-time build is not counted:
the benchmark calls `ensure_image` before timing). Wall-clock numbers depend on the
machine (2 cores here; 30 nodes share them) and, for docker, on the storage driver
(fuse-overlayfs here).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402
from rich.console import Console  # noqa: E402

from emulator.runtime import RunOptions, run_scenario  # noqa: E402

MIB = 1024 * 1024


def scenario(n: int) -> dict[str, Any]:
    names = [f"n{i:02d}" for i in range(n)]
    return {
        "name": f"bench-startup-{n}",
        "seed": 1,
        "duration": "60s",
        "time_scale": 1,
        "nodes": {name: {"role": "endpoint", "memory": {"qubits": 16}} for name in names},
        "links": [
            {
                "endpoints": [a, b],
                "length_km": 10,
                "entanglement": {"scheme": "double-click", "detector_efficiency": 0.9, "visibility": 0.95},
            }
            for a, b in zip(names, names[1:], strict=False)
        ],
        "apps": [{"kind": "epr-test", "name": "epr", "nodes": names[:2], "pairs": 200, "start": "3s"}],
        "expect": [{"metric": "pairs_measured", "app": "epr", "min": 200}],
    }


class MemorySampler(threading.Thread):
    """Peak memory per node while the run lasts (a background thread of this process)."""

    def __init__(self, runtime: str, run_dir: Path, scenario_name: str) -> None:
        super().__init__(daemon=True)
        self.runtime = runtime
        self.run_dir = run_dir
        self.scenario_name = scenario_name
        self.peak_bytes: dict[str, int] = {}
        self.stop = threading.Event()
        self.client: Any = None
        if runtime == "docker":
            import docker

            self.client = docker.from_env()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                sample = self._sample_docker() if self.runtime == "docker" else self._sample_local()
            except Exception:  # a container or process that just went away
                sample = {}
            for name, value in sample.items():
                self.peak_bytes[name] = max(self.peak_bytes.get(name, 0), value)
            self.stop.wait(0.25)

    def _sample_local(self) -> dict[str, int]:
        out = {}
        marker = f"--data-dir\0{self.run_dir}/"
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_text()
                if marker not in cmdline or "nodes" not in cmdline:
                    continue
                name = cmdline.split("--name\0", 1)[1].split("\0", 1)[0]
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        out[name] = int(line.split()[1]) * 1024
            except (OSError, IndexError):
                continue
        return out

    def _sample_docker(self) -> dict[str, int]:
        out = {}
        label = [f"org.qnetem.scenario={self.scenario_name}", "org.qnetem.role=node"]
        for container in self.client.containers.list(filters={"label": label}):
            stats = container.stats(stream=False, one_shot=True)
            memory = stats.get("memory_stats", {})
            usage = memory.get("usage")
            if usage is None:
                continue
            detail = memory.get("stats", {})
            cache = detail.get("total_inactive_file", detail.get("inactive_file", detail.get("cache", 0)))
            out[container.labels.get("org.qnetem.node", container.name)] = int(usage) - int(cache)
        return out


def registered_s(run_dir: Path) -> float | None:
    first = last = None
    with (run_dir / "events.jsonl").open(encoding="utf-8") as fh:
        for line in fh:
            event = json.loads(line)
            if first is None:
                first = event["wall_s"]
            if event["event"] == "node_registered":
                last = event["wall_s"]
            if event["event"] == "timeline_started":
                break
    return None if first is None or last is None else round(last - first, 3)


def run_one(workdir: Path, runtime: str, n: int) -> dict[str, Any]:
    spec = scenario(n)
    path = workdir / f"startup-{runtime}-{n}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    out = workdir / f"run-{runtime}-{n}"
    sampler = MemorySampler(runtime, out, spec["name"])
    sampler.start()
    t0 = time.perf_counter()
    try:
        outcome = run_scenario(
            RunOptions(scenario_path=path, out_dir=out, quiet=True, runtime=runtime), console=Console(quiet=True)
        )
    finally:
        sampler.stop.set()
        sampler.join()
    record: dict[str, Any] = {
        "bench": "startup",
        "runtime": runtime,
        "nodes": n,
        "exit_code": int(outcome.exit_code),
        "run_wall_s": round(time.perf_counter() - t0, 3),
        "registered_s": registered_s(out) if (out / "events.jsonl").exists() else None,
    }
    peaks = sorted(sampler.peak_bytes.values())
    record["memory_sampled_nodes"] = len(peaks)
    if peaks:
        record["node_memory_mib_median"] = round(statistics.median(peaks) / MIB, 1)
        record["node_memory_mib_max"] = round(peaks[-1] / MIB, 1)
    if outcome.exit_code != 0:
        record["error"] = outcome.message
    return record


def engine_version() -> str:
    try:
        import docker

        return str(docker.from_env().version().get("Version"))
    except Exception as exc:
        return f"unavailable: {' '.join(str(exc).split())[:120]}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="sizes 2 and 10 only")
    parser.add_argument("--sizes", default="2,10,30")
    parser.add_argument("--runtimes", default="local,docker")
    args = parser.parse_args()
    sizes = [2, 10] if args.quick else [int(s) for s in args.sizes.split(",") if s]
    runtimes = [r for r in args.runtimes.split(",") if r]
    version = engine_version()
    sys.stdout.write(
        json.dumps(
            {"bench": "env", "python": platform.python_version(), "platform": platform.platform(),
             "cpus": os.cpu_count(), "docker_engine": version}  # fmt: skip
        )
        + "\n"
    )
    if "docker" in runtimes:
        if version.startswith("unavailable"):
            runtimes.remove("docker")
        else:
            from emulator.runtime.image import ensure_image

            t0 = time.perf_counter()
            tag = ensure_image(offline=os.geteuid() == 0, log=lambda line: None)
            sys.stdout.write(
                json.dumps({"bench": "image", "tag": tag, "ensure_s": round(time.perf_counter() - t0, 1)}) + "\n"
            )
    with tempfile.TemporaryDirectory(prefix="qnetem-bench-startup-") as tmp:
        for n in sizes:
            for runtime in runtimes:
                sys.stdout.write(json.dumps(run_one(Path(tmp), runtime, n)) + "\n")
                sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
