"""Scenario faults with the local runtime: crash, restart, freeze and link cut of real processes.

Each test runs `qnetem run` as a subprocess on a variant of the quickstart scenario and
checks what the run directory says happened (events, results) and that no process of
the run survives it. The docker runtime runs the same kinds in tests/system.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.integration.test_run import QUICKSTART, ROOT, assert_nothing_left, events_of, qnetem

pytestmark = pytest.mark.integration


def variant(tmp_path: Path, *, apps: list[dict[str, Any]], faults: list[dict[str, Any]],
            expect: list[dict[str, Any]], **top: Any) -> Path:  # fmt: skip
    data = yaml.safe_load(QUICKSTART.read_text())
    data.update(apps=apps, faults=faults, expect=expect, **top)
    data["name"] = "faults"
    path = tmp_path / "faults.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def run(path: Path, out: Path) -> tuple[int, dict[str, Any], list[dict[str, Any]], str]:
    proc = qnetem("run", path, "--out", out, "--quiet")
    assert "Traceback" not in proc.stderr, proc.stderr
    results = json.loads((out / "results.json").read_text())
    return proc.returncode, results, events_of(out), proc.stdout + proc.stderr


def test_crash_restart_scenario_records_the_fault_and_the_restart(tmp_path: Path) -> None:
    out = tmp_path / "run"
    code, results, events, text = run(ROOT / "scenarios" / "crash-restart.yaml", out)
    assert code == 0, text
    steps = results["faults"]["steps"]
    assert [(s["fault"], s["step"], s["action"], s["node"]) for s in steps] == [
        (1, "apply", "kill", "bob"), (1, "revert", "start", "bob"),
    ]  # fmt: skip
    # Applied and reverted at (not before) their planned times; the poll loop wakes for them.
    assert steps[0]["at_s"] >= 5.0 and steps[1]["at_s"] >= 6.0
    bob = [e for e in events if e.get("name") == "bob" or e.get("node") == "bob"]
    kinds = [(e["event"], e.get("restarted", e.get("restart", False))) for e in bob]
    assert ("process_exited", False) in kinds
    killed = next(e for e in bob if e["event"] == "process_exited")
    assert killed["returncode"] == -9 and killed["expected"] is True  # SIGKILL, not a failure
    assert ("node_registered", True) in kinds  # a fresh broker session after the restart
    assert [e["event"] for e in bob].count("process_started") == 2
    assert_nothing_left(out)


def test_crash_during_an_app_fails_that_app_naming_the_fault(tmp_path: Path) -> None:
    # 10^6 pairs at ~5 kHz cannot finish before bob is killed at 0.3 s; without `for` he stays down.
    path = variant(
        tmp_path,
        apps=[{"kind": "epr-test", "name": "long", "nodes": ["alice", "bob"], "pairs": 1_000_000}],
        faults=[{"at": "300ms", "kind": "node-crash", "node": "bob"}],
        expect=[{"metric": "pairs_measured", "app": "long", "min": 1_000_000}],
    )
    out = tmp_path / "run"
    code, results, events, text = run(path, out)
    assert code == 1, text  # an expectation failed; not a runtime failure (3)
    assert results["error"] is None
    app = results["apps"]["long"]
    assert app["state"] == "failed"
    assert "node bob crashed" in app["error"] and "fault 1" in app["error"]
    assert [e["event"] for e in events].count("fault_applied") == 1
    assert_nothing_left(out)


def test_frozen_node_resumes_and_its_app_completes(tmp_path: Path) -> None:
    # 20000 pairs take ~4 s at the link's 5.2 kHz; bob is stopped (SIGSTOP) for 1.5 s in the middle.
    path = variant(
        tmp_path,
        apps=[{"kind": "epr-test", "name": "epr", "nodes": ["alice", "bob"], "pairs": 20000}],
        faults=[{"at": "500ms", "kind": "node-freeze", "node": "bob", "for": "1500ms"}],
        expect=[{"metric": "pairs_measured", "app": "epr", "min": 20000}],
    )
    out = tmp_path / "run"
    code, results, events, text = run(path, out)
    assert code == 0, text
    steps = [(s["step"], s["action"]) for s in results["faults"]["steps"]]
    assert steps == [("apply", "pause"), ("revert", "resume")]
    # The app's own wall time includes the 1.5 s during which bob could not answer.
    assert results["apps"]["epr"]["metrics"]["wall_s"] >= 1.5
    assert not any(e["event"] == "process_exited" and not e["expected"] for e in events)
    assert_nothing_left(out)


def test_link_cut_is_restored_and_counted_by_both_nodes(tmp_path: Path) -> None:
    path = variant(
        tmp_path,
        apps=[{"kind": "epr-test", "name": "epr", "nodes": ["alice", "bob"], "pairs": 20000}],
        faults=[{"at": "500ms", "kind": "link-cut", "link": ["alice", "bob"], "for": "1s"}],
        expect=[{"metric": "pairs_measured", "app": "epr", "min": 20000}],
    )
    out = tmp_path / "run"
    code, results, events, text = run(path, out)
    assert code == 0, text
    steps = [(s["step"], s["action"]) for s in results["faults"]["steps"]]
    assert steps == [("apply", "cut"), ("revert", "restore")]
    for node, peer in (("alice", "bob"), ("bob", "alice")):
        link = results["stats"]["nodes"][node]["links"][peer]
        assert link["cuts"] == 1 and link["cut"] is False and link["connected"] is True, link
    assert_nothing_left(out)
