"""`qnetem run` end to end: real broker and node processes on 127.0.0.1.

Every test runs the command as a subprocess (as a user or CI would) and checks the exit
status, the run directory, and that no process of the run survives it.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "scenarios" / "two-node-epr.yaml"
RUN_TIMEOUT_S = 180


def qnetem(*args: str | Path, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run(
        [sys.executable, "-m", "emulator.cli", *map(str, args)],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S,
    )  # fmt: skip


def events_of(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "events.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def started_pids(run_dir: Path) -> dict[str, int]:
    return {e["name"]: e["pid"] for e in events_of(run_dir) if e["event"] == "process_started"}


def is_alive(pid: int) -> bool:
    """True if `pid` is a live process (a zombie awaiting its reaper counts as dead)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return fields[0] != "Z"


def processes_mentioning(text: str) -> list[int]:
    """Live processes whose command line contains `text` (the run directory)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline and is_alive(int(entry.name)):
            found.append(int(entry.name))
    return found


def assert_nothing_left(run_dir: Path) -> None:
    pids = started_pids(run_dir)
    assert pids, "the run started no process"
    deadline = time.monotonic() + 5.0  # the orchestrator has reaped them; allow the kernel a moment
    while time.monotonic() < deadline and (
        any(is_alive(p) for p in pids.values()) or processes_mentioning(str(run_dir))
    ):
        time.sleep(0.1)
    assert [name for name, pid in pids.items() if is_alive(pid)] == []
    assert processes_mentioning(str(run_dir)) == []


@pytest.fixture
def run_dir(tmp_path: Path) -> Iterator[Path]:
    out = tmp_path / "run"
    yield out
    if (out / "events.jsonl").exists():
        assert_nothing_left(out)


def scenario_variant(tmp_path: Path, **changes: Any) -> Path:
    """The quickstart scenario with top-level keys or app/expect lists replaced."""
    data = yaml.safe_load(QUICKSTART.read_text())
    data.update(changes)
    path = tmp_path / f"{data['name']}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_quickstart_passes(run_dir: Path) -> None:
    proc = qnetem("run", QUICKSTART, "--out", run_dir, "--quiet")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    assert "passed: 4/4 expectations held" in proc.stdout

    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "passed" and results["passed"] is True and results["exit_code"] == 0
    assert results["scenario"] == "two-node-epr" and results["seed"] == 7
    assert [e["passed"] for e in results["expectations"]] == [True] * 4
    app = results["apps"]["epr-test-0"]
    assert app["state"] == "done"
    metrics = app["metrics"]
    assert metrics["pairs_measured"] == 5000
    # Model (scenario header): Werner state with visibility V = 0.95 has F = (1 + 3V)/4 = 0.9625
    # and S = 2*sqrt(2)*V. Tolerance: 5 standard errors as reported by the app (n = 5000 pairs),
    # plus 0.005 for the memory-free model's neglected terms.
    fidelity_model = (1 + 3 * 0.95) / 4
    assert abs(metrics["fidelity"] - fidelity_model) <= 5 * metrics["fidelity_stderr"] + 0.005
    assert abs(metrics["chsh"] - 2 * math.sqrt(2) * 0.95) <= 5 * metrics["chsh_stderr"] + 0.02
    assert results["stats"]["broker"] and set(results["stats"]["nodes"]) == {"alice", "bob"}

    kinds = [e["event"] for e in events_of(run_dir)]
    assert kinds[0] == "run_started" and kinds[-1] == "run_finished"
    for kind, count in (("process_started", 3), ("node_registered", 2), ("app_started", 1), ("app_done", 1),
                        ("expectation", 4), ("process_exited", 3)):  # fmt: skip
        assert kinds.count(kind) == count, (kind, kinds)
    for event in events_of(run_dir):
        assert "wall" in event and "t_s" in event
    exits = [e for e in events_of(run_dir) if e["event"] == "process_exited"]
    assert all(e["expected"] and e["returncode"] == 0 for e in exits), exits  # graceful shutdown

    for name in ("broker", "alice", "bob"):
        assert (run_dir / f"{name}.log").stat().st_size > 0
    assert json.loads((run_dir / "scenario.json").read_text())["name"] == "two-node-epr"
    for name in ("results.json", "events.jsonl", "scenario.json", "broker.log", "alice.log", "bob.log"):
        assert "QNETEM_TOKEN=" not in (run_dir / name).read_text()
    assert results["series"]["epr-test-0"][-1]["pairs_measured"] == 5000  # progress sampled to the end
    assert "epr-test-0" in (run_dir / "report.html").read_text()
    assert (run_dir / "pairs.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_unreachable_expectation_exits_1(tmp_path: Path, run_dir: Path) -> None:
    scenario = scenario_variant(
        tmp_path,
        name="too-demanding",
        apps=[{"kind": "epr-test", "name": "epr", "nodes": ["alice", "bob"], "pairs": 300}],
        expect=[
            # The estimator (1 + <XX> - <YY> + <ZZ>)/4 never exceeds 1, so this cannot hold
            # whatever 300 pairs show (0.999 could: with 12 pairs per correlator cell an
            # estimate of exactly 1.0 happens).
            {"metric": "fidelity", "app": "epr", "min": 1.01},
            {"metric": "pairs_measured", "app": "epr", "min": 300},
        ],
    )
    proc = qnetem("run", scenario, "--out", run_dir, "--quiet", "--backend", "numpy")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "1 expectation(s) failed" in proc.stderr
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "failed" and results["backend"] == "numpy"
    failed, held = results["expectations"]
    assert not failed["passed"] and "below the minimum 1.01" in failed["message"]
    assert held["passed"]


def test_app_that_cannot_finish_in_time_fails_its_expectations(tmp_path: Path) -> None:
    scenario = scenario_variant(
        tmp_path,
        name="too-short",
        duration="50ms",  # about 260 pairs at the model's 5.2 kHz
        apps=[{"kind": "epr-test", "name": "epr", "nodes": ["alice", "bob"], "pairs": 100000}],
        expect=[{"metric": "pairs_measured", "app": "epr", "min": 1}],
    )
    proc = qnetem("run", scenario, "--quiet", cwd=tmp_path)  # default run directory: ./runs/<name>-<stamp>
    assert proc.returncode == 1, proc.stdout + proc.stderr
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert run_dir.name.startswith("too-short-20") and run_dir.name.endswith("Z")
    results = json.loads((run_dir / "results.json").read_text())
    assert results["run_id"] == run_dir.name and results["finish_reason"] == "duration_elapsed"
    assert results["apps"]["epr"]["state"] == "running"
    (expectation,) = results["expectations"]
    assert "did not finish within the scenario duration (0.05 s emulated)" in expectation["message"]
    assert_nothing_left(run_dir)


def test_invalid_scenario_exits_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: ok\nduration: soon\nnodes: {alice: {}, bob: {}}\n")
    out = tmp_path / "run"
    proc = qnetem("run", bad, "--out", out, "--quiet")
    assert proc.returncode == 2
    assert f"{bad}:2:11: duration: " in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()


def start_long_run(tmp_path: Path, run_dir: Path) -> subprocess.Popen[str]:
    scenario = scenario_variant(
        tmp_path,
        name="long",
        # 1e6 pairs (the broker's cap per request) take minutes: the app is surely running when we act.
        apps=[{"kind": "epr-test", "name": "epr", "nodes": ["alice", "bob"], "pairs": 10**6}],
        expect=[{"metric": "pairs_measured", "app": "epr", "min": 1}],
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "emulator.cli", "run", str(scenario), "--out", str(run_dir), "--quiet"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while not any(e["event"] == "app_started" for e in events_of(run_dir)):
        if proc.poll() is not None or time.monotonic() > deadline:
            out, err = proc.communicate()
            pytest.fail(f"the run ended or stalled before starting its app (rc {proc.returncode}):\n{out}\n{err}")
        time.sleep(0.1)
    return proc


def test_killed_node_gives_exit_3_and_no_leftovers(tmp_path: Path, run_dir: Path) -> None:
    proc = start_long_run(tmp_path, run_dir)
    bob = started_pids(run_dir)["bob"]
    os.kill(bob, signal.SIGKILL)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 3, out + err
    assert "node bob" in err and "bob.log" in err and "Traceback" not in err
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "error" and "node bob" in results["error"]
    (expectation,) = results["expectations"]
    assert not expectation["passed"]
    exited = {e["name"]: e for e in events_of(run_dir) if e["event"] == "process_exited"}
    assert exited["bob"]["expected"] is False and exited["bob"]["returncode"] == -signal.SIGKILL
    assert_nothing_left(run_dir)


def child_tokens(pid: int) -> list[str]:
    """The run's tokens, read from a child's environment (the only place they exist)."""
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    tokens = [v.split(b"=", 1)[1].decode() for v in environ if v.startswith((b"QNETEM_TOKEN=", b"QNETEM_ADMIN_TOKEN="))]
    assert len(tokens) == 2 and all(len(t) >= 32 for t in tokens)
    return tokens


def test_interrupt_shuts_everything_down_and_leaks_no_token(tmp_path: Path, run_dir: Path) -> None:
    proc = start_long_run(tmp_path, run_dir)
    tokens = child_tokens(started_pids(run_dir)["broker"])
    proc.send_signal(signal.SIGINT)  # what Ctrl-C in a terminal delivers
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, out + err
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "interrupted"
    assert events_of(run_dir)[-1]["event"] == "run_finished"
    assert_nothing_left(run_dir)
    # No token in any file of the run (results, events, scenario, every log) or on the console.
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert len(files) >= 6
    for token in tokens:
        assert token not in out and token not in err
        for path in files:
            assert token.encode() not in path.read_bytes(), path


def test_killed_orchestrator_takes_its_children_down(tmp_path: Path, run_dir: Path) -> None:
    proc = start_long_run(tmp_path, run_dir)
    proc.kill()  # SIGKILL: no cleanup code runs; PR_SET_PDEATHSIG must do it
    proc.communicate(timeout=30)
    assert_nothing_left(run_dir)


@pytest.mark.parametrize("scenario", sorted((ROOT / "scenarios").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_scenario_holds(scenario: Path, tmp_path: Path) -> None:
    """CONVENTIONS 10: every scenario in scenarios/ is run, and its expectations hold."""
    out = tmp_path / "run"
    proc = qnetem("run", scenario, "--out", out, "--quiet")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert json.loads((out / "results.json").read_text())["passed"] is True
    assert_nothing_left(out)


def test_external_node_joins_with_the_handed_off_credentials(tmp_path: Path, run_dir: Path) -> None:
    """A plugfest node: the scenario marks bob external; qnetem starts nothing for him and
    hands the broker address and run tokens over in RUN/external.env (0600, removed at the end)."""
    data = yaml.safe_load(QUICKSTART.read_text())
    data["nodes"]["bob"]["external"] = True
    for app in data["apps"]:
        app["pairs"] = 500
    data["expect"] = [{"metric": "pairs_measured", "app": "epr-test-0", "min": 500}]
    scenario = tmp_path / "external.yaml"
    scenario.write_text(yaml.safe_dump(data, sort_keys=False))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    run = subprocess.Popen(
        [sys.executable, "-m", "emulator.cli", "run", str(scenario), "--out", str(run_dir), "--quiet"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    bob = None
    try:
        handoff = run_dir / "external.env"
        deadline = time.monotonic() + 60
        while not handoff.exists() and run.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert handoff.exists(), "no external.env appeared"
        time.sleep(0.1)  # created with O_EXCL and written at once; let the write land
        assert handoff.stat().st_mode & 0o077 == 0  # private to the user running qnetem
        creds = dict(
            line.split("=", 1) for line in handoff.read_text().splitlines() if line and not line.startswith("#")
        )
        assert set(creds) == {"QNETEM_BROKER", "QNETEM_TOKEN", "QNETEM_ADMIN_TOKEN"}
        bob = subprocess.Popen(
            [sys.executable, "-m", "nodes", "--name", "bob"],  # the broker address comes from QNETEM_BROKER
            cwd=ROOT, env={**env, **creds}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        out, err = run.communicate(timeout=RUN_TIMEOUT_S)
        assert run.returncode == 0, out + err
        assert "waiting for external node bob" in out
        for secret in (creds["QNETEM_TOKEN"], creds["QNETEM_ADMIN_TOKEN"]):
            assert secret not in out + err
        assert not handoff.exists()  # the credentials die with the run
        results = json.loads((run_dir / "results.json").read_text())
        assert results["passed"] and results["apps"]["epr-test-0"]["metrics"]["pairs_measured"] == 500
        assert [e["name"] for e in events_of(run_dir) if e["event"] == "process_started"] == ["broker", "alice"]
    finally:
        for proc in (run, bob):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=10)


def test_node_that_fails_to_start_gives_exit_3_and_no_leftovers(run_dir: Path) -> None:
    """A failed start (the node program dies at once) ends the run with exit 3 naming the
    node, and the broker that did start is taken down with it."""
    from rich.console import Console

    from emulator.runtime.local import RunOptions, run_scenario
    from emulator.runtime.orchestrator import ExitCode

    failing_node = (sys.executable, "-c", "import sys; sys.exit('cannot start')")
    with open(os.devnull, "w") as devnull:
        outcome = run_scenario(
            RunOptions(QUICKSTART, out_dir=run_dir, quiet=True, node_command=failing_node),
            console=Console(file=devnull, width=120),
        )
    assert outcome.exit_code == ExitCode.RUNTIME_FAILURE
    assert outcome.message is not None and ("alice" in outcome.message or "bob" in outcome.message)
    assert json.loads((run_dir / "results.json").read_text())["exit_code"] == 3
    # run_dir's fixture checks that the broker and both node processes are gone
