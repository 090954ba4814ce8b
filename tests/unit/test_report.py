"""Run reports: expectation evaluation, results.json shape, events.jsonl, the run timeline."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
from rich.console import Console

from emulator.report import (
    AppOutcome,
    AppState,
    EventLog,
    ExpectationSpec,
    RunResults,
    RunStatus,
    evaluate_expectation,
    evaluate_expectations,
    print_summary,
    read_events,
    redact,
    write_json_atomic,
)
from emulator.runtime.orchestrator import (
    EmulatedClock,
    FinishReason,
    PlanError,
    RegistrationTracker,
    Timeline,
    plan_from_scenario,
)
from emulator.wire import NodeStatus

SECRET = "s3cr3t-token-value-0123456789abcdef"


def done_app(**metrics: float) -> dict[str, AppOutcome]:
    return {"epr": AppOutcome("epr", "epr-test", ("alice", "bob"), AppState.DONE, metrics)}


# --------------------------------------------------------------------------- expectations


@pytest.mark.parametrize(
    ("lo", "hi", "value", "passed"),
    [
        (0.9, None, 0.95, True),
        (0.9, None, 0.9, True),  # bounds are inclusive
        (0.9, None, 0.89, False),
        (None, 0.03, 0.02, True),
        (None, 0.03, 0.031, False),
        (0.93, 0.99, 0.96, True),
        (0.93, 0.99, 0.92, False),
        (0.93, 0.99, 0.995, False),
        (0.93, 0.99, 0.99, True),
    ],
)
def test_bounds(lo: float | None, hi: float | None, value: float, passed: bool) -> None:
    result = evaluate_expectation(ExpectationSpec("fidelity", "epr", lo, hi), done_app(fidelity=value))
    assert result.passed is passed
    assert result.observed == value
    assert "fidelity of app epr" in result.message
    if not passed:
        assert ("below the minimum" if lo is not None and value < lo else "above the maximum") in result.message


def test_bound_text() -> None:
    assert ExpectationSpec("chsh", "a", 2.5, None).bound == ">= 2.5"
    assert ExpectationSpec("chsh", "a", None, 3).bound == "<= 3"
    assert ExpectationSpec("fidelity", "a", 0.93, 0.99).bound == "[0.93, 0.99]"
    with pytest.raises(ValueError, match="neither min nor max"):
        ExpectationSpec("chsh", "a")


def test_integer_metric() -> None:
    result = evaluate_expectation(ExpectationSpec("pairs_measured", "epr", 2000), done_app(pairs_measured=2000))
    assert result.passed and result.observed == 2000.0
    assert "= 2000, within >= 2000" in result.message


@pytest.mark.parametrize(
    ("state", "error", "why"),
    [
        (AppState.RUNNING, None, "did not finish within the scenario duration"),
        (AppState.PENDING, None, "never started"),
        (AppState.FAILED, "initiator alice failed: memory full", "the app failed: initiator alice failed: memory full"),
        (AppState.DONE, None, "finished without reporting it"),
    ],
)
def test_missing_metric_fails_with_reason(state: AppState, error: str | None, why: str) -> None:
    apps = {"epr": AppOutcome("epr", "epr-test", ("alice", "bob"), state, {}, error=error)}
    result = evaluate_expectation(ExpectationSpec("chsh", "epr", 2.5), apps)
    assert not result.passed
    assert result.observed is None
    assert why in result.message
    assert result.message.startswith("chsh of app epr: missing")


def test_unknown_app_and_bad_values_fail() -> None:
    result = evaluate_expectation(ExpectationSpec("chsh", "nope", 2.5), done_app(chsh=2.7))
    assert not result.passed and "no such app" in result.message
    for bad in (math.nan, math.inf, "2.7", True):
        result = evaluate_expectation(ExpectationSpec("chsh", "epr", 2.5), done_app(chsh=bad))  # type: ignore[arg-type]
        assert not result.passed and result.observed is None


def test_evaluate_expectations_indexes_in_order() -> None:
    specs = [ExpectationSpec("fidelity", "epr", 0.9), ExpectationSpec("chsh", "epr", 2.9)]
    results = evaluate_expectations(specs, done_app(fidelity=0.95, chsh=2.7))
    assert [r.index for r in results] == [0, 1]
    assert [r.passed for r in results] == [True, False]


# --------------------------------------------------------------------------- results.json


def make_results(tmp_path: Path) -> dict:
    apps = done_app(pairs_measured=2000, fidelity=0.96, fidelity_stderr=0.002, chsh=2.7, pair_rate_hz=5200.0)
    expectations = evaluate_expectations(
        [ExpectationSpec("fidelity", "epr", 0.93, 0.99), ExpectationSpec("chsh", "epr", 2.8)], apps
    )
    results = RunResults(
        scenario="two-node-epr", seed=7, run_id="two-node-epr-20250101T000000Z",
        started_at="2025-01-01T00:00:00.000Z", finished_at="2025-01-01T00:00:05.000Z",
        wall_s=5.0, emulated_s=4.5, time_scale=1.0, status=RunStatus.FAILED, exit_code=1,
        apps=apps, expectations=expectations,
        stats={"broker": {"pairs_delivered": {"alice|bob": 2000}, "note": f"token={SECRET}"}, "nodes": {}},
        backend="c", qnetem_version="0.1.0",
    )  # fmt: skip
    path = tmp_path / "results.json"
    write_json_atomic(path, results.to_dict(), secrets=[SECRET])
    text = path.read_text()
    assert SECRET not in text
    return json.loads(text)


def test_results_json_shape(tmp_path: Path) -> None:
    doc = make_results(tmp_path)
    for key in ("scenario", "seed", "run_id", "started_at", "finished_at", "wall_s", "emulated_s",
                "status", "exit_code", "passed", "apps", "expectations", "stats", "error"):  # fmt: skip
        assert key in doc, key
    assert doc["scenario"] == "two-node-epr" and doc["seed"] == 7
    assert doc["passed"] is False and doc["status"] == "failed" and doc["exit_code"] == 1
    app = doc["apps"]["epr"]
    assert app["state"] == "done" and app["nodes"] == ["alice", "bob"]
    assert app["metrics"]["fidelity"] == 0.96
    first, second = doc["expectations"]
    assert first == {
        "index": 0, "metric": "fidelity", "target": "app epr", "app": "epr", "min": 0.93, "max": 0.99,
        "bound": "[0.93, 0.99]", "observed": 0.96, "passed": True,
        "message": "fidelity of app epr = 0.96, within [0.93, 0.99]",
    }  # fmt: skip
    assert second["passed"] is False and second["observed"] == 2.7
    assert doc["stats"]["broker"]["note"] == "token=<redacted>"
    assert not list(tmp_path.glob(".*.tmp"))  # the temporary file was renamed away


def test_results_json_has_no_nan(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    write_json_atomic(path, {"a": math.nan, "b": [math.inf, 1.5], "c": b"\x00" * 32})
    assert json.loads(path.read_text()) == {"a": None, "b": [None, 1.5], "c": "<32 bytes>"}


def test_redact_walks_keys_and_values() -> None:
    tree = {"x": [SECRET, {"y": f"a{SECRET}b"}], SECRET: 1, "short": "abc"}
    assert redact(tree, [SECRET, "abc"]) == {
        "x": ["<redacted>", {"y": "a<redacted>b"}], "<redacted>": 1, "short": "abc",  # short secrets ignored
    }  # fmt: skip


def test_summary_renders(tmp_path: Path) -> None:
    doc = make_results(tmp_path)
    console = Console(width=200, record=True, force_terminal=False)
    print_summary(console, doc, run_dir="runs/x")
    text = console.export_text()
    assert "epr-test" in text and "0.96 ± 0.002" in text
    assert "FAIL" in text and "pass" in text
    assert "failed: 1/2 expectations held" in text


# --------------------------------------------------------------------------- events.jsonl


def test_event_log_lines(tmp_path: Path) -> None:
    walls = iter([1_700_000_000.25, 1_700_000_001.5])
    monos = iter([10.0, 10.5, 12.0])
    path = tmp_path / "events.jsonl"
    with EventLog(path, secrets=[SECRET], wall_clock=lambda: next(walls), monotonic=lambda: next(monos)) as log:
        log.emit("run_started", scenario="s", note=f"x{SECRET}")
        log.emit("node_registered", t_s=1.2345678901, node="alice")
    events = read_events(path)
    assert events == [
        {"event": "run_started", "t_s": None, "wall": "2023-11-14T22:13:20.250Z", "wall_s": 0.5,
         "scenario": "s", "note": "x<redacted>"},
        {"event": "node_registered", "t_s": 1.234568, "wall": "2023-11-14T22:13:21.500Z", "wall_s": 2.0,
         "node": "alice"},
    ]  # fmt: skip
    assert len(path.read_text().splitlines()) == 2


def test_event_log_refuses_credential_fields(tmp_path: Path) -> None:
    with EventLog(tmp_path / "e.jsonl") as log:
        with pytest.raises(ValueError, match="credential"):
            log.emit("x", admin_token="abc")
        with pytest.raises(ValueError, match="reserved"):
            log.emit("x", t_s=None, wall=1)
    with pytest.raises(ValueError, match="closed"):
        log.emit("x")


# --------------------------------------------------------------------------- timeline (sans-IO orchestrator)

SCENARIO = {
    "name": "t", "seed": 3, "duration": 10.0, "time_scale": 1.0,
    "nodes": {"alice": {"role": "endpoint"}, "bob": {"role": "endpoint", "external": True}},
    "apps": [
        {"kind": "epr-test", "name": "early", "nodes": ["alice", "bob"], "pairs": 100, "wait": 0.0, "start": 0.0},
        {"kind": "epr-test", "name": "late", "nodes": ["bob", "alice"], "pairs": 50, "wait": 0.5, "start": 2.0},
    ],
    "expect": [{"metric": "fidelity", "app": "early", "min": 0.9}],
}  # fmt: skip


def test_plan_from_scenario() -> None:
    plan = plan_from_scenario(SCENARIO)
    assert plan.launched_nodes == ("alice",) and plan.external_nodes == ("bob",)
    early, late = plan.apps
    assert (late.initiator, late.responder, late.start_s, late.wait_s) == ("bob", "alice", 2.0, 0.5)
    first, second = early.start_requests()
    assert (first.node, first.role) == ("bob", "responder")  # the responder listens first
    assert dict(first.params) == {"role": "responder", "peer": "alice", "pairs": 100, "wait_s": 0.0}
    assert (second.node, dict(second.params)["peer"]) == ("alice", "bob")
    assert plan.expectations[0] == ExpectationSpec("fidelity", "early", 0.9, None)
    with pytest.raises(PlanError, match="not supported"):
        plan_from_scenario({**SCENARIO, "apps": [{"kind": "teleport", "nodes": ["alice", "bob"]}]})


def test_plan_from_real_scenario_file() -> None:
    from emulator.scenario import load_scenario

    root = Path(__file__).resolve().parents[2]
    plan = plan_from_scenario(load_scenario(root / "scenarios" / "two-node-epr.yaml"))
    assert plan.name == "two-node-epr" and plan.launched_nodes == ("alice", "bob")
    assert [a.name for a in plan.apps] == ["epr-test-0"] and plan.apps[0].pairs == 5000
    assert {e.metric for e in plan.expectations} == {"pairs_measured", "fidelity", "chsh", "pair_rate_hz"}


def test_timeline_runs_apps_at_their_offsets() -> None:
    timeline = Timeline(plan_from_scenario(SCENARIO))
    assert timeline.due(100.0) == []  # nothing before the origin
    timeline.begin(100.0)
    assert [a.name for a in timeline.due(100.0)] == ["early"]
    timeline.mark_started("early", 100.0)
    assert timeline.due(101.9) == [] and timeline.next_start_s() == 102.0
    assert [a.name for a in timeline.due(102.0)] == ["late"]
    timeline.mark_started("late", 102.0)
    assert timeline.observe("early", "initiator", "running", {"pairs_measured": 40}, 103.0) is None
    assert timeline.progress(103.0)[0][:4] == ("early", AppState.RUNNING, 40, 100)
    assert timeline.finish_reason(103.0) is None
    change = timeline.observe("early", "initiator", "done", {"fidelity": 0.95, "pairs_measured": 100}, 104.0)
    assert change is not None and change.state is AppState.DONE and change.t_s == 4.0
    change = timeline.observe("late", "responder", "failed", {"error": "memory full"}, 105.0)
    assert change is not None and change.state is AppState.FAILED
    assert change.error == "responder alice failed: memory full"
    assert timeline.finish_reason(105.0) is FinishReason.ALL_APPS_FINISHED
    outcomes = timeline.outcomes()
    assert outcomes["early"].metrics == {"fidelity": 0.95, "pairs_measured": 100}
    assert outcomes["late"].metrics == {} and outcomes["late"].state is AppState.FAILED


def test_timeline_duration_ends_unfinished_apps() -> None:
    timeline = Timeline(plan_from_scenario(SCENARIO))
    timeline.begin(0.0)
    timeline.mark_started("early", 0.0)
    timeline.observe("early", "initiator", "running", {"fidelity": 0.97}, 5.0)
    assert timeline.finish_reason(9.99) is None
    assert timeline.finish_reason(10.0) is FinishReason.DURATION_ELAPSED
    outcomes = timeline.outcomes()
    # Partial results of an unfinished app do not count as its metrics.
    assert outcomes["early"].state is AppState.RUNNING and outcomes["early"].metrics == {}
    assert outcomes["late"].state is AppState.PENDING
    (result,) = evaluate_expectations(plan_from_scenario(SCENARIO).expectations, outcomes)
    assert not result.passed and "did not finish within the scenario duration" in result.message


def test_registration_tracker() -> None:
    tracker = RegistrationTracker(["alice", "bob"])
    assert tracker.update([NodeStatus("alice", True, ("127.0.0.1", 5000)), NodeStatus("bob", False)]) == ["alice"]
    assert tracker.missing() == ("bob",) and not tracker.complete
    assert tracker.update([NodeStatus("alice", True, ("127.0.0.1", 5000)), NodeStatus("bob", True)]) == ["bob"]
    assert tracker.complete and tracker.control_address("alice") == ("127.0.0.1", 5000)
    assert tracker.control_address("bob") is None
    assert tracker.lost([NodeStatus("alice", False), NodeStatus("bob", True)]) == ["alice"]


def test_emulated_clock() -> None:
    clock = EmulatedClock(time_scale=0.5)  # one emulated second lasts half a wall second
    assert clock.now(3.0) is None
    clock.sync(now_s=10.0, mono_s=100.0)
    assert clock.now(100.25) == pytest.approx(10.5)
    assert clock.wall_s_until(10.5, 12.5) == pytest.approx(1.0)
    assert clock.wall_s_until(13.0, 12.5) == 0.0


# --------------------------------------------------------------------------- qkd apps: plan, timeline, console

QKD_SCENARIO = {
    "name": "q", "seed": 3, "duration": 30.0, "time_scale": 1.0,
    "nodes": {"alice": {}, "bob": {}, "carol": {}},
    "links": [
        {"endpoints": ["alice", "bob"], "length_km": 25.0, "qkd": {"transmitter": "bob"}},
        {"endpoints": ["carol", "bob"], "length_km": 5.0, "qkd": {}, "entanglement": {}},
    ],
    "apps": [
        {"kind": "qkd", "name": "keys", "nodes": ["bob", "alice"], "key_bits": 4096, "start": 1.0},
        {"kind": "qkd", "name": "timed", "nodes": ["carol", "bob"], "duration": 10.0, "block_bits": 65536,
         "cascade": "yan", "epsilon_sec": 1e-9, "epsilon_cor": 1e-12, "qber_threshold": 0.08, "sample_fraction": 0.1},
        {"kind": "epr-test", "name": "epr", "nodes": ["carol", "bob"], "pairs": 10},
    ],
}  # fmt: skip


def test_plan_of_qkd_apps_sends_the_contracted_params() -> None:
    plan = plan_from_scenario(QKD_SCENARIO)
    keys, timed, epr = plan.apps
    assert (keys.kind, keys.initiator, keys.responder, keys.start_s) == ("qkd", "bob", "alice", 1.0)
    responder, initiator = keys.start_requests()  # the responder (Bob, the receiver) listens first
    defaults = {"duration_s": None, "key_bits": 4096, "block_key_bits": 1_000_000, "cascade": "original",
                "epsilon_sec": 1e-10, "epsilon_cor": 1e-15, "qber_threshold": 0.11, "sample_fraction": 0.05}
    assert (responder.node, responder.role, responder.kind, responder.name) == ("alice", "responder", "qkd", "keys")
    assert dict(responder.params) == {"role": "responder", "peer": "bob", **defaults}
    assert (initiator.node, dict(initiator.params)) == ("bob", {"role": "initiator", "peer": "alice", **defaults})
    assert dict(timed.start_requests()[1].params) == {
        "role": "initiator", "peer": "bob", "duration_s": 10.0, "key_bits": None, "block_key_bits": 65536,
        "cascade": "yan", "epsilon_sec": 1e-9, "epsilon_cor": 1e-12, "qber_threshold": 0.08, "sample_fraction": 0.1,
    }  # fmt: skip
    assert all(isinstance(v, float) for k, v in timed.settings.items() if k.startswith(("epsilon", "qber", "sample")))
    # epr-test is as before
    assert dict(epr.start_requests()[0].params) == {"role": "responder", "peer": "carol", "pairs": 10, "wait_s": 0.0}
    assert (keys.pairs, keys.wait_s, epr.pairs, epr.wait_s) == (None, None, 10, 0.0)
    assert (keys.requested(), timed.requested()) == (
        {"key_bits": 4096, "duration_s": None, "start_s": 1.0}, {"key_bits": None, "duration_s": 10.0, "start_s": 0.0})


def test_plan_of_a_validated_qkd_scenario_matches_its_dict_form() -> None:
    from emulator.scenario import parse_scenario, scenario_to_dict

    text = """\
name: q
duration: 30s
nodes: {alice: {}, bob: {}}
links:
  - {endpoints: [alice, bob], length_km: 25, qkd: {}}
apps:
  - {kind: qkd, nodes: [alice, bob], duration: 10s, cascade: opt7}
"""
    scenario = parse_scenario(text)
    plan = plan_from_scenario(scenario)
    assert plan.apps == plan_from_scenario(scenario_to_dict(scenario)).apps
    assert plan.apps[0].settings["cascade"] == "opt7" and plan.apps[0].settings["duration_s"] == 10.0


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"nodes": ["alice", "bob"]}, "the first node must be the link's QKD transmitter bob"),
        ({"nodes": ["alice", "carol"]}, "no QKD link between alice and carol"),
        ({"key_bits": None}, "needs `duration`, `key_bits` or both"),
    ],
)
def test_plan_rejects_qkd_apps_it_cannot_run(change: dict[str, object], fragment: str) -> None:
    data = {**QKD_SCENARIO, "apps": [{**QKD_SCENARIO["apps"][0], **change}]}  # type: ignore[dict-item]
    with pytest.raises(PlanError, match=re.escape(fragment)):
        plan_from_scenario(data)


def test_plan_rejects_two_qkd_apps_on_one_link() -> None:
    twice = {**QKD_SCENARIO, "apps": [QKD_SCENARIO["apps"][0], {**QKD_SCENARIO["apps"][0], "name": "again"}]}
    with pytest.raises(PlanError, match="one QKD session per run"):
        plan_from_scenario(twice)


def test_timeline_counts_qkd_progress_in_key_bits() -> None:
    timeline = Timeline(plan_from_scenario(QKD_SCENARIO))
    timeline.begin(0.0)
    for name in ("keys", "timed", "epr"):
        timeline.mark_started(name, 1.0)
    timeline.observe("keys", "initiator", "running", {"final_key_bits": 1024, "secret_key_rate_bps": 512.0}, 3.0)
    timeline.observe("timed", "initiator", "running", {"final_key_bits": 300}, 4.0)
    keys, timed, epr = timeline.progress(5.0)
    assert keys == ("keys", AppState.RUNNING, 1024, 4096, 512.0, 4.0, None, "bits", "")
    assert (keys.measured, keys.requested, keys.unit) == (1024, 4096, "bits")
    # a duration-only app: no amount requested, the bar follows its running time against the duration
    assert (timed.measured, timed.requested, timed.rate, timed.running_s, timed.running_limit_s) == (
        300, None, 75.0, 4.0, 10.0)
    assert epr[:5] == ("epr", AppState.RUNNING, None, 10, None) and epr.unit == "pairs"
    # the live line of a qkd app: QBER per basis, f, the decoy bounds, blocks and alarms
    live = {"final_key_bits": 2048, "qber": 0.0331, "qber_x": 0.0332, "cascade_efficiency": 1.168,
            "single_photon_yield_lower": 0.0132, "single_photon_error_upper": 0.0364, "blocks_done": 2,
            "blocks_aborted": 1, "alarms": 1}  # fmt: skip
    timeline.observe("keys", "initiator", "running", live, 5.5)
    assert timeline.progress(5.5)[0].detail == (
        "QBER 3.31% (X 3.32%)  f 1.17  Y1>=0.0132 e1<=3.64%  blocks 2 (1 aborted)  alarms 1"
    )
    assert epr.detail == ""
    done = {"final_key_bits": 4096, "secret_key_rate_bps": 800.0, "qber": 0.021}
    change = timeline.observe("keys", "initiator", "done", done, 6.0)
    assert change is not None and change.state is AppState.DONE
    outcome = timeline.outcomes()["keys"]
    assert outcome.metrics == done and outcome.requested == {"key_bits": 4096, "duration_s": None, "start_s": 1.0}
    (result,) = evaluate_expectations([ExpectationSpec("final_key_bits", "keys", 4096)], timeline.outcomes())
    assert result.passed, result.message


def test_summary_shows_qkd_columns_only_when_there_are_qkd_apps(tmp_path: Path) -> None:
    qkd = AppOutcome("keys", "qkd", ("bob", "alice"), AppState.DONE,
                     {"final_key_bits": 4096, "secret_key_rate_bps": 812.5, "qber": 0.0213, "qber_x": 0.0198,
                      "cascade_efficiency": 1.16, "alarms": 0})  # fmt: skip
    results = RunResults(
        scenario="q", seed=1, run_id="q-1", started_at="x", finished_at="y", wall_s=1.0, emulated_s=2.0,
        time_scale=1.0, status=RunStatus.PASSED, exit_code=0, apps={"keys": qkd}, expectations=(),
        stats={},
    )  # fmt: skip
    console = Console(width=250, record=True, force_terminal=False)
    print_summary(console, results.to_dict())
    text = console.export_text()
    for header in ("key bits", "key rate (bit/s)", "QBER", "QBER X", "alarms"):
        assert header in text
    assert "4096" in text and "812.5" in text and "0.0213" in text and "1.16" in text
    assert "fidelity" not in text and "CHSH" not in text  # no epr-test app: no epr-test columns
    console = Console(width=250, record=True, force_terminal=False)
    print_summary(console, make_results(tmp_path))
    assert "key bits" not in console.export_text()  # an epr-test run looks as it always did


def test_live_progress_of_a_qkd_app() -> None:
    from emulator.report.console import AppBar, RunProgress

    console = Console(width=160, record=True, force_terminal=True)
    bars = [AppBar("keys", 4096, "bits"), AppBar("timed", 10.0, "bits", by_time=True), ("epr", 100)]
    progress = RunProgress(console, bars, duration_s=30.0, live=True)
    progress.update_app("keys", measured=1024, state="running", rate_hz=512.0, running_s=2.0, detail="QBER 3.31%")
    progress.update_app("timed", measured=300, state="running", rate_hz=75.0, running_s=4.0)
    progress.update_app("epr", measured=40, state="running", rate_hz=20.0)
    tasks = {t.description: t for t in progress._progress.tasks}  # type: ignore[union-attr]
    progress.stop()
    assert (tasks["keys"].completed, tasks["keys"].total, tasks["keys"].fields["count"]) == (1024, 4096, "1024/4096")
    assert tasks["keys"].fields["note"] == "running  512 bits/s (emulated)  QBER 3.31%"
    assert (tasks["timed"].completed, tasks["timed"].total, tasks["timed"].fields["count"]) == (4.0, 10.0, "300 bits")
    assert (tasks["epr"].fields["count"], tasks["epr"].fields["note"]) == ("40/100", "running  20 pairs/s (emulated)")
