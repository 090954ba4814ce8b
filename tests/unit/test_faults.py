"""Faults in the run plan (`FaultPlan`, `plan_from_scenario`), the sans-IO `FaultSchedule`,
and the driver's broker steps (`RunDriver._fault` -> the broker's `qkd_eve` and `fibre_cut`).

Every schedule test drives the schedule with a fake `now` (plain floats, broker
emulated seconds); nothing here reads a clock. The driver tests talk to an in-memory
fake broker (trio memory streams): no process, no socket.
"""

from __future__ import annotations

import io
import json
import math
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import trio
import trio.testing
from rich.console import Console

from emulator.report.events import read_events
from emulator.runtime.admin_client import AdminClient, AdminRequestError
from emulator.runtime.driver import ADMIN_TOKEN_ENV, TOKEN_ENV, PreparedRun, RunDriver, RunOptions, RuntimeFailure
from emulator.runtime.faults import FaultAction, FaultSchedule, FaultStep
from emulator.runtime.orchestrator import FaultKind, FaultPlan, PlanError, RunPlan, plan_from_scenario
from emulator.scenario import load_scenario, parse_scenario
from emulator.wire import Error, FibreCut, FrameDecoder, LinkFault, Ok, QkdEve, decode, encode_framed

ROOT = Path(__file__).resolve().parents[2]

APPLY, REVERT = FaultStep.APPLY, FaultStep.REVERT
CRASH, RESTART, FREEZE, CUT = FaultKind.NODE_CRASH, FaultKind.NODE_RESTART, FaultKind.NODE_FREEZE, FaultKind.LINK_CUT
IR, PNS, FIBRE = FaultKind.QKD_INTERCEPT_RESEND, FaultKind.QKD_PNS, FaultKind.FIBRE_CUT
ORIGIN = 100.0  # the broker's emulated time when every node had registered


def crash(index: int, at_s: float, for_s: float | None = None, node: str = "bob") -> FaultPlan:
    return FaultPlan(index, CRASH, at_s, for_s, node=node)


def restart(index: int, at_s: float, for_s: float | None = None, node: str = "bob") -> FaultPlan:
    return FaultPlan(index, RESTART, at_s, for_s, node=node)


def freeze(index: int, at_s: float, for_s: float | None = None, node: str = "bob") -> FaultPlan:
    return FaultPlan(index, FREEZE, at_s, for_s, node=node)


def cut(index: int, at_s: float, for_s: float | None = None, link: tuple[str, str] = ("alice", "bob")) -> FaultPlan:
    return FaultPlan(index, CUT, at_s, for_s, link=link)


def intercept(index: int, at_s: float, for_s: float | None = None, fraction: float = 0.5,
              link: tuple[str, str] = ("alice", "bob")) -> FaultPlan:  # fmt: skip
    return FaultPlan(index, IR, at_s, for_s, link=link, fraction=fraction)


def pns(index: int, at_s: float, for_s: float | None = None, link: tuple[str, str] = ("alice", "bob")) -> FaultPlan:
    return FaultPlan(index, PNS, at_s, for_s, link=link)


def fibre(index: int, at_s: float, for_s: float | None = None, link: tuple[str, str] = ("alice", "bob")) -> FaultPlan:
    return FaultPlan(index, FIBRE, at_s, for_s, link=link)


def steps(actions: list[FaultAction]) -> list[tuple[int, str, float]]:
    return [(a.fault.index, a.step.value, a.t_s) for a in actions]


def begun(*faults: FaultPlan) -> FaultSchedule:
    schedule = FaultSchedule(faults)
    schedule.begin(ORIGIN)
    return schedule


# --------------------------------------------------------------------------- FaultPlan


def test_fault_plan_describes_itself() -> None:
    assert crash(1, 2.0, 3.0).describe() == "node-crash bob at 2 s for 3 s"
    assert crash(1, 2.0).describe() == "node-crash bob at 2 s until the end"
    assert restart(2, 0.25).describe() == "node-restart bob at 0.25 s"
    assert freeze(3, 5.0, 1.0).describe() == "node-freeze bob at 5 s for 1 s"
    assert cut(4, 8.0, 2.0).describe() == "link-cut [alice, bob] at 8 s for 2 s"


def test_fault_plan_revert_times() -> None:
    assert crash(1, 2.0, 3.0).revert_s == 5.0
    assert crash(1, 2.0).revert_s is None  # stays down
    assert freeze(1, 2.0).revert_s is None and cut(1, 2.0).revert_s is None
    assert restart(1, 2.0).revert_s == 2.0  # started again at once
    assert restart(1, 2.0, 0.5).revert_s == 2.5


def test_fault_plan_to_dict_is_json() -> None:
    d = cut(4, 8.0, 2.0).to_dict()
    assert d == {"index": 4, "kind": "link-cut", "at_s": 8.0, "for_s": 2.0, "node": None, "link": ["alice", "bob"],
                 "description": "link-cut [alice, bob] at 8 s for 2 s"}
    assert json.loads(json.dumps(crash(1, 2.0).to_dict(), allow_nan=False))["for_s"] is None


def test_eavesdropper_plans() -> None:
    ir = intercept(5, 2.0, 1.0, fraction=0.25)
    assert ir.describe() == "qkd-intercept-resend [alice, bob] fraction 0.25 at 2 s for 1 s"
    assert pns(6, 3.0).describe() == "qkd-pns [alice, bob] at 3 s until the end"
    assert (ir.intercept_fraction, pns(6, 3.0).intercept_fraction) == (0.25, 0.0)
    assert ir.to_dict() == {"index": 5, "kind": "qkd-intercept-resend", "at_s": 2.0, "for_s": 1.0, "node": None,
                            "link": ["alice", "bob"], "fraction": 0.25,
                            "description": "qkd-intercept-resend [alice, bob] fraction 0.25 at 2 s for 1 s"}
    assert "fraction" not in pns(6, 3.0).to_dict()  # only the kinds that have one
    assert (ir.revert_s, pns(6, 3.0).revert_s) == (3.0, None)  # Eve stays on to the end without `for`


def test_fault_plan_takes_kind_names() -> None:
    plan = FaultPlan(1, "link-cut", 1.0, None, link=["alice", "bob"])  # type: ignore[arg-type]
    assert plan.kind is CUT and plan.link == ("alice", "bob") and plan == cut(1, 1.0)
    with pytest.raises(ValueError, match="fiber-cut"):
        FaultPlan(1, "fiber-cut", 1.0, None, link=("alice", "bob"))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"index": 0, "kind": CRASH, "at_s": 1.0, "for_s": None, "node": "bob"}, "1-based"),
        ({"index": 1, "kind": CRASH, "at_s": -1.0, "for_s": None, "node": "bob"}, "at_s"),
        ({"index": 1, "kind": CRASH, "at_s": math.nan, "for_s": None, "node": "bob"}, "at_s"),
        ({"index": 1, "kind": CRASH, "at_s": 1.0, "for_s": 0.0, "node": "bob"}, "for_s"),
        ({"index": 1, "kind": CRASH, "at_s": 1.0, "for_s": math.inf, "node": "bob"}, "for_s"),
        ({"index": 1, "kind": CRASH, "at_s": 1.0, "for_s": None}, "needs exactly a node"),
        ({"index": 1, "kind": CRASH, "at_s": 1.0, "for_s": None, "node": "bob", "link": ("a", "b")}, "exactly a node"),
        ({"index": 1, "kind": CUT, "at_s": 1.0, "for_s": None, "node": "bob"}, "needs exactly a link"),
        ({"index": 1, "kind": IR, "at_s": 1.0, "for_s": None, "link": ("a", "b")}, "needs a fraction in"),
        ({"index": 1, "kind": IR, "at_s": 1.0, "for_s": None, "link": ("a", "b"), "fraction": 0.0}, "fraction in"),
        ({"index": 1, "kind": IR, "at_s": 1.0, "for_s": None, "link": ("a", "b"), "fraction": 1.01}, "fraction in"),
        ({"index": 1, "kind": IR, "at_s": 1.0, "for_s": None, "node": "bob", "fraction": 0.5}, "exactly a link"),
        ({"index": 1, "kind": PNS, "at_s": 1.0, "for_s": None, "link": ("a", "b"), "fraction": 0.5}, "no fraction"),
        ({"index": 1, "kind": CRASH, "at_s": 1.0, "for_s": None, "node": "bob", "fraction": 0.5}, "no fraction"),
    ],
)
def test_fault_plan_rejects_nonsense(kwargs: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        FaultPlan(**kwargs)


# --------------------------------------------------------------------------- plan_from_scenario

SCENARIO_TEXT = """\
name: faulty
duration: 20s
nodes:
  alice: {}
  bob: {}
  carol: {external: true}
links:
  - endpoints: [alice, bob]
    length_km: 10
    entanglement: {}
  - endpoints: [bob, carol]
    length_km: 5
faults:
  - {at: 2s, kind: node-crash, node: bob, for: 3s}
  - {at: 2s, kind: node-restart, node: alice}
  - {at: 8s, kind: link-cut, link: [carol, bob], for: 500ms}
  - {at: 9s, kind: node-freeze, node: bob}
"""


def test_plan_carries_the_faults_in_scenario_order() -> None:
    plan = plan_from_scenario(parse_scenario(SCENARIO_TEXT))
    assert plan.faults == (
        FaultPlan(1, CRASH, 2.0, 3.0, node="bob"),
        FaultPlan(2, RESTART, 2.0, None, node="alice"),
        FaultPlan(3, CUT, 8.0, 0.5, link=("bob", "carol")),  # the link's own order
        FaultPlan(4, FREEZE, 9.0, None, node="bob"),
    )


def test_plan_from_the_dict_form_is_the_same() -> None:
    from emulator.scenario import scenario_to_dict

    scenario = parse_scenario(SCENARIO_TEXT)
    assert plan_from_scenario(scenario_to_dict(scenario)).faults == plan_from_scenario(scenario).faults
    data = scenario_to_dict(scenario)
    data["faults"][2]["link"] = ["carol", "bob"]  # unnormalised (never validated): the plan normalises
    assert plan_from_scenario(data).faults[2].link == ("bob", "carol")


def test_plan_without_faults() -> None:
    plan = plan_from_scenario(parse_scenario(SCENARIO_TEXT.split("faults:")[0]))
    assert plan.faults == ()
    fields = {f.name: f for f in RunPlan.__dataclass_fields__.values()}
    assert fields["faults"].default == ()  # runtimes that build a RunPlan by hand need not mention faults


@pytest.mark.parametrize(
    ("fault", "fragment"),
    [
        ({"at": 1.0, "kind": "fiber-cut", "link": ["alice", "bob"]}, "fault 1: kind 'fiber-cut' is not supported"),
        ({"at": 1.0, "kind": "node-crash", "node": "dave"}, "fault 1: unknown node 'dave'"),
        ({"at": 1.0, "kind": "node-crash", "node": "carol"},
         "fault 1: node carol is external; qnetem cannot crash a process it did not start"),
        ({"at": 1.0, "kind": "link-cut", "link": ["alice", "carol"]}, "fault 1: no link between 'alice' and 'carol'"),
        ({"kind": "node-crash", "node": "bob"}, "fault 1: no `at`"),
        ({"at": -1.0, "kind": "node-crash", "node": "bob"}, "at_s must be finite and >= 0"),
    ],
)
def test_plan_rejects_faults_it_cannot_run(fault: dict[str, Any], fragment: str) -> None:
    data = {
        "name": "t", "duration": 10.0,
        "nodes": {"alice": {}, "bob": {}, "carol": {"external": True}},
        "links": [{"endpoints": ["alice", "bob"]}, {"endpoints": ["bob", "carol"]}],
        "faults": [fault],
    }  # fmt: skip
    with pytest.raises(PlanError, match=fragment.replace("(", r"\(")):
        plan_from_scenario(data)


QKD_SCENARIO = {
    "name": "t", "duration": 10.0,
    "nodes": {"alice": {}, "bob": {}, "carol": {}},
    "links": [{"endpoints": ["alice", "bob"], "qkd": {}}, {"endpoints": ["bob", "carol"], "qkd": None}],
}  # fmt: skip


def test_plan_carries_eavesdroppers() -> None:
    text = SCENARIO_TEXT.split("faults:")[0].replace("    entanglement: {}\n", "    entanglement: {}\n    qkd: {}\n")
    text += ("faults:\n  - {at: 2s, kind: qkd-intercept-resend, link: [bob, alice], fraction: 0.5, for: 1s}\n"
             "  - {at: 3s, kind: qkd-pns, link: [alice, bob]}\n  - {at: 2s, kind: link-cut, link: [alice, bob]}\n")
    scenario = parse_scenario(text)
    plan = plan_from_scenario(scenario)
    assert plan.faults == (intercept(1, 2.0, 1.0, fraction=0.5), pns(2, 3.0), cut(3, 2.0))
    from emulator.scenario import scenario_to_dict

    assert plan_from_scenario(scenario_to_dict(scenario)).faults == plan.faults
    schedule = begun(*plan.faults)
    assert [(a.fault.index, a.verb) for a in schedule.timeline()] == [
        (1, "intercept"), (3, "cut"), (1, "withdraw"), (2, "split")]
    schedule.due(ORIGIN + 5.0)
    # Only the cut is undone before shutdown: an eavesdropper ends with the broker.
    assert [(a.fault.index, a.verb) for a in schedule.close(ORIGIN + 5.0)] == [(3, "restore")]
    (applied, _, _, _) = schedule.timeline()
    assert applied.to_dict()["fraction"] == 0.5 and "fraction" not in schedule.timeline()[1].to_dict()


@pytest.mark.parametrize(
    ("fault", "fragment"),
    [
        ({"at": 1.0, "kind": "qkd-pns", "link": ["bob", "carol"]}, "fault 1: qkd-pns needs a QKD link; [bob, carol]"),
        ({"at": 1.0, "kind": "qkd-intercept-resend", "link": ["alice", "bob"]}, "needs a fraction in (0, 1]"),
        ({"at": 1.0, "kind": "qkd-intercept-resend", "link": ["alice", "bob"], "fraction": 2}, "fraction in"),
        ({"at": 1.0, "kind": "link-cut", "link": ["alice", "bob"], "fraction": 0.5}, "link-cut takes no fraction"),
    ],
)
def test_plan_rejects_eavesdroppers_it_cannot_run(fault: dict[str, Any], fragment: str) -> None:
    with pytest.raises(PlanError) as info:
        plan_from_scenario({**QKD_SCENARIO, "faults": [fault]})
    assert fragment in str(info.value)


def test_plan_carries_fibre_cuts_on_any_link() -> None:
    text = SCENARIO_TEXT.split("faults:")[0].replace("    entanglement: {}\n", "    entanglement: {}\n    qkd: {}\n")
    text += ("faults:\n  - {at: 1s, kind: fibre-cut, link: [bob, alice], for: 2s}\n"
             "  - {at: 2s, kind: qkd-pns, link: [alice, bob], for: 2s}\n"  # may overlap the cut
             "  - {at: 3s, kind: link-cut, link: [alice, bob]}\n"  # back to back with it
             "  - {at: 4s, kind: fibre-cut, link: [carol, bob]}\n")  # no qkd, an external end
    scenario = parse_scenario(text)
    plan = plan_from_scenario(scenario)
    assert plan.faults == (fibre(1, 1.0, 2.0), pns(2, 2.0, 2.0), cut(3, 3.0), fibre(4, 4.0, link=("bob", "carol")))
    from emulator.scenario import scenario_to_dict

    assert plan_from_scenario(scenario_to_dict(scenario)).faults == plan.faults
    schedule = begun(*plan.faults)
    assert [(a.fault.index, a.verb) for a in schedule.timeline()] == [
        (1, "cut"), (2, "split"), (1, "splice"), (3, "cut"), (2, "withdraw"), (4, "cut")]
    schedule.due(ORIGIN + 2.0)
    assert schedule.cut_links() == {("alice", "bob")}  # a fibre cut cuts the classical channel too
    schedule.due(ORIGIN + 5.0)
    assert schedule.cut_links() == {("alice", "bob"), ("bob", "carol")}
    # Both classical cuts are undone before shutdown; the fibre's verb is `splice`.
    assert [(a.fault.index, a.verb) for a in schedule.close(ORIGIN + 6.0)] == [(3, "restore"), (4, "splice")]
    assert fibre(1, 1.0, 2.0).describe() == "fibre-cut [alice, bob] at 1 s for 2 s"
    assert "fraction" not in fibre(1, 1.0).to_dict() and fibre(1, 1.0).to_dict()["kind"] == "fibre-cut"


def test_plan_rejects_fibre_cuts_it_cannot_run() -> None:
    with pytest.raises(PlanError, match="fault 1: fibre-cut takes no fraction"):
        plan_from_scenario({**QKD_SCENARIO, "faults": [
            {"at": 1.0, "kind": "fibre-cut", "link": ["alice", "bob"], "fraction": 0.5}]})
    with pytest.raises(PlanError, match="fault 1: no link between 'alice' and 'carol'"):
        plan_from_scenario({**QKD_SCENARIO, "faults": [{"at": 1.0, "kind": "fibre-cut", "link": ["alice", "carol"]}]})
    with pytest.raises(ValueError, match="fibre-cut needs exactly a link"):
        FaultPlan(1, FIBRE, 1.0, None, node="bob")


def test_plan_of_the_crash_restart_scenario() -> None:
    plan = plan_from_scenario(load_scenario(ROOT / "scenarios" / "crash-restart.yaml"))
    assert plan.faults == (FaultPlan(1, CRASH, 5.0, 1.0, node="bob"),)
    assert [(a.name, a.start_s) for a in plan.apps] == [("before", 0.0), ("after", 15.0)]
    schedule = begun(*plan.faults)
    assert steps(schedule.timeline()) == [(1, "apply", 5.0), (1, "revert", 6.0)]
    assert [a.verb for a in schedule.timeline()] == ["kill", "start"]


# --------------------------------------------------------------------------- FaultSchedule: time order, exactly once


def test_nothing_is_due_before_begin() -> None:
    schedule = FaultSchedule([crash(1, 0.0, 1.0)])
    assert schedule.due(1e9) == [] and schedule.next_due_s() is None
    assert schedule.active(1e9) == [] and schedule.down_nodes(1e9) == set()
    schedule.begin(ORIGIN)
    with pytest.raises(RuntimeError, match="already begun"):
        schedule.begin(ORIGIN)


def test_actions_come_once_each_in_time_order() -> None:
    schedule = begun(freeze(1, 5.0, 1.0), crash(2, 2.0, 1.5, node="alice"), cut(3, 0.0, 10.0))
    assert schedule.next_due_s() == ORIGIN + 0.0
    assert steps(schedule.due(ORIGIN - 0.5)) == []  # not yet
    assert steps(schedule.due(ORIGIN)) == [(3, "apply", 0.0)]
    assert steps(schedule.due(ORIGIN)) == []  # exactly once
    assert schedule.next_due_s() == ORIGIN + 2.0
    assert steps(schedule.due(ORIGIN + 1.999)) == []
    assert steps(schedule.due(ORIGIN + 2.0)) == [(2, "apply", 2.0)]
    assert schedule.next_due_s() == ORIGIN + 3.5
    # a late wake-up catches up with everything that has come, in order
    assert steps(schedule.due(ORIGIN + 5.5)) == [(2, "revert", 3.5), (1, "apply", 5.0)]
    assert steps(schedule.due(ORIGIN + 5.0)) == []  # time going backwards hands out nothing
    assert steps(schedule.due(ORIGIN + 100.0)) == [(1, "revert", 6.0), (3, "revert", 10.0)]
    assert schedule.due(ORIGIN + 1000.0) == [] and schedule.next_due_s() is None


def test_sleeping_until_next_due_always_gets_the_action() -> None:
    # Offsets that do not add up exactly in binary: (origin + t) - origin != t for some of them.
    origin = 12345.678
    faults = [freeze(i + 1, 0.1 * (3 * i + 1), 0.1, node=f"n{i}") for i in range(30)]
    schedule = FaultSchedule(faults)
    schedule.begin(origin)
    handed_out = []
    while (wake := schedule.next_due_s()) is not None:
        got = schedule.due(wake)
        assert got, f"nothing due at next_due_s() = {wake!r}"
        handed_out += got
    assert steps(handed_out) == steps(schedule.timeline()) and len(handed_out) == 60


def test_timeline_lists_every_planned_action() -> None:
    schedule = FaultSchedule([crash(1, 2.0, 3.0), freeze(2, 1.0), restart(3, 4.0, node="alice"), cut(4, 3.0)])
    assert steps(schedule.timeline()) == [
        (2, "apply", 1.0), (1, "apply", 2.0), (4, "apply", 3.0), (3, "apply", 4.0), (3, "revert", 4.0),
        (1, "revert", 5.0),
    ]  # the freeze and the cut last until the end: no revert planned
    assert [a.verb for a in schedule.timeline()] == ["pause", "kill", "cut", "stop", "start", "start"]


def test_duplicate_indices_are_refused() -> None:
    with pytest.raises(ValueError, match="unique"):
        FaultSchedule([crash(1, 1.0), freeze(1, 2.0, node="alice")])


# --------------------------------------------------------------------------- ties


def test_at_equal_times_a_revert_comes_before_the_next_apply() -> None:
    # Back to back on bob: the crash ends at 5 s exactly when the freeze starts. The
    # freeze is listed first in the scenario, so index order alone would apply it first.
    schedule = begun(freeze(1, 5.0, 1.0), crash(2, 2.0, 3.0))
    assert steps(schedule.due(ORIGIN + 2.0)) == [(2, "apply", 2.0)]
    assert steps(schedule.due(ORIGIN + 5.0)) == [(2, "revert", 5.0), (1, "apply", 5.0)]


def test_restart_without_for_is_stop_then_start_in_one_call() -> None:
    schedule = begun(restart(1, 3.0))
    assert schedule.next_due_s() == ORIGIN + 3.0
    got = schedule.due(ORIGIN + 3.0)
    assert [(a.step, a.verb, a.t_s) for a in got] == [(APPLY, "stop", 3.0), (REVERT, "start", 3.0)]
    assert schedule.down_nodes() == set() and schedule.active() == []
    assert schedule.next_due_s() is None


def test_simultaneous_starts_follow_scenario_order() -> None:
    # Listed out of order on purpose: `index` (the position in the scenario) decides, not list order.
    schedule = begun(restart(2, 1.0, node="alice"), crash(1, 1.0, 1.0), cut(3, 1.0), restart(4, 0.0, 1.0))
    assert steps(schedule.due(ORIGIN)) == [(4, "apply", 0.0)]
    assert steps(schedule.due(ORIGIN + 1.0)) == [
        (4, "revert", 1.0),  # carried over from 0 s: first
        (1, "apply", 1.0), (2, "apply", 1.0), (2, "revert", 1.0), (3, "apply", 1.0),
    ]


# --------------------------------------------------------------------------- state


def test_down_frozen_and_cut_follow_the_actions_handed_out() -> None:
    schedule = begun(crash(1, 1.0, 2.0), freeze(2, 2.0, 2.0, node="alice"), cut(3, 2.5), restart(4, 3.5, 1.0, node="carol"))
    schedule.due(ORIGIN + 1.0)
    assert schedule.down_nodes() == {"bob"} and schedule.frozen_nodes() == set()
    assert [f.index for f in schedule.active()] == [1]
    schedule.due(ORIGIN + 2.5)
    assert schedule.frozen_nodes() == {"alice"} and schedule.cut_links() == {("alice", "bob")}
    assert [f.index for f in schedule.active()] == [1, 2, 3]  # in the order they were applied
    schedule.due(ORIGIN + 3.0)
    assert schedule.down_nodes() == set()  # bob started again at 3 s
    schedule.due(ORIGIN + 4.0)
    assert schedule.down_nodes() == {"carol"} and schedule.frozen_nodes() == set()
    assert [f.index for f in schedule.active()] == [3, 4]
    schedule.due(ORIGIN + 4.5)
    assert schedule.down_nodes() == set() and schedule.cut_links() == {("alice", "bob")}  # the cut lasts to the end


def test_queries_with_now_look_ahead_without_consuming() -> None:
    schedule = begun(crash(1, 1.0, 2.0), freeze(2, 2.0, node="alice"))
    assert schedule.down_nodes(ORIGIN + 1.0) == {"bob"}  # due(1.0) not called yet
    assert schedule.down_nodes() == set()  # as of the last due(): nothing handed out
    assert schedule.frozen_nodes(ORIGIN + 2.0) == {"alice"}
    assert [f.index for f in schedule.active(ORIGIN + 3.0)] == [2]
    assert steps(schedule.due(ORIGIN + 3.0)) == [(1, "apply", 1.0), (2, "apply", 2.0), (1, "revert", 3.0)]
    assert schedule.down_nodes(ORIGIN + 0.5) == set()  # never earlier than what was handed out


def test_pending_reverts() -> None:
    schedule = begun(crash(1, 1.0, 5.0), freeze(2, 2.0, node="alice"), cut(3, 2.0, 1.0), restart(4, 2.5, node="carol"))
    schedule.due(ORIGIN + 2.5)
    planned = schedule.pending_reverts()
    assert [(a.fault.index, a.step, a.verb) for a in planned] == [(1, REVERT, "start"), (2, REVERT, "resume"),
                                                                 (3, REVERT, "restore")]
    assert [a.t_s for a in planned] == [6.0, math.inf, 3.0]  # planned times; the freeze has none
    assert planned[1].to_dict()["t_s"] is None  # JSON has no infinity
    at_now = schedule.pending_reverts(ORIGIN + 2.75)
    assert [(a.fault.index, a.t_s) for a in at_now] == [(1, 2.75), (2, 2.75), (3, 2.75)]
    assert [a.fault.index for a in schedule.pending_reverts(ORIGIN + 3.0)] == [1, 2]  # the cut is restored at 3 s


def test_close_undoes_freezes_and_cuts_but_restarts_nothing() -> None:
    schedule = begun(crash(1, 1.0), freeze(2, 2.0, 100.0, node="alice"), cut(3, 2.0), cut(4, 50.0, link=("bob", "carol")))
    schedule.due(ORIGIN + 10.0)
    undo = schedule.close(ORIGIN + 12.0)
    assert [(a.fault.index, a.step, a.verb, a.t_s) for a in undo] == [(2, REVERT, "resume", 12.0),
                                                                     (3, REVERT, "restore", 12.0)]
    assert schedule.closed and schedule.close(ORIGIN + 13.0) == []  # once
    assert schedule.due(ORIGIN + 1000.0) == [] and schedule.next_due_s() is None  # the cut at 50 s never comes
    assert schedule.down_nodes() == {"bob"}  # crashed nodes stay down
    assert schedule.frozen_nodes() == set() and schedule.cut_links() == set()
    assert [f.index for f in schedule.active(ORIGIN + 1000.0)] == [1]


def test_close_before_begin_is_harmless() -> None:
    schedule = FaultSchedule([freeze(1, 1.0)])
    assert schedule.close(5.0) == [] and schedule.due(10.0) == []


# --------------------------------------------------------------------------- serialisation


def test_actions_serialise() -> None:
    (apply, revert) = FaultSchedule([crash(1, 2.0, 3.0)]).timeline()
    assert apply.to_dict() == {"fault": 1, "kind": "node-crash", "step": "apply", "action": "kill", "t_s": 2.0,
                               "node": "bob", "link": None, "description": "node-crash bob at 2 s for 3 s"}
    assert revert.describe() == "fault 1 revert (start bob): node-crash bob at 2 s for 3 s"
    (cut_apply,) = FaultSchedule([cut(7, 1.0)]).timeline()
    assert json.loads(json.dumps(cut_apply.to_dict(), allow_nan=False))["link"] == ["alice", "bob"]
    assert cut_apply.describe() == "fault 7 apply (cut [alice, bob]): link-cut [alice, bob] at 1 s until the end"


# --------------------------------------------------------------------------- the driver: eavesdroppers via qkd_eve


class FakeBroker:
    """The broker's admin session, in memory: answers `qkd_eve` and `fibre_cut` with `ok` (or `error`),
    records each one. As `name` a node, it is that node's control endpoint (`link_fault`).

    `log`, when given, gets one tuple per request, so that a test can check the order of
    requests to several peers (and to a fake deployment writing the same list).
    """

    def __init__(self, refuse: str | None = None, *, message: str = "no QKD on that link",
                 log: list[tuple[Any, ...]] | None = None, name: str = "broker") -> None:  # fmt: skip
        self.received: list[QkdEve | FibreCut | LinkFault] = []
        self.refuse = refuse
        self.message = message
        self.log = log
        self.name = name

    async def serve(self, stream: trio.abc.Stream) -> None:
        decoder = FrameDecoder()
        while data := await stream.receive_some(65536):
            decoder.feed(data)
            while (payload := decoder.next_frame()) is not None:
                env = decode(payload)
                message = env.message
                wanted = LinkFault if self.name != "broker" else (QkdEve, FibreCut)
                assert isinstance(message, wanted), message  # the driver sends nothing else here
                self.received.append(message)
                if self.log is not None:
                    if isinstance(message, FibreCut):
                        self.log.append(("fibre_cut", *message.endpoints, message.cut))
                    elif isinstance(message, LinkFault):
                        self.log.append(("link_fault", self.name, message.peer, message.cut))
                    else:
                        self.log.append(("qkd_eve", message.intercept_fraction, message.pns))
                reply = Ok() if self.refuse is None else Error(code=self.refuse, message=self.message)
                await stream.send_all(encode_framed(reply, re=env.id))


def make_driver(
    tmp_path: Path, faults: tuple[FaultPlan, ...], cuts: list[Any], *, cuts_links: bool = True
) -> RunDriver:
    plan = RunPlan(name="eve", seed=1, duration_s=10.0, time_scale=1.0, nodes=(), apps=(), expectations=(),
                   faults=faults, links=(("alice", "bob"),))  # fmt: skip

    async def cut_link(a: str, b: str) -> None:
        cuts.append((a, b, True))

    async def restore_link(a: str, b: str) -> None:
        cuts.append((a, b, False))

    async def settle(timeout_s: float) -> None:
        pass

    deployment = SimpleNamespace(cuts_links=cuts_links, cut_link=cut_link, restore_link=restore_link, settle=settle,
                                 check=lambda phase: None)  # fmt: skip
    driver = RunDriver(
        PreparedRun(None, plan, tmp_path, time.time()), RunOptions(tmp_path / "eve.yaml", quiet=True, live=False),
        Console(file=io.StringIO()), lambda context: deployment,  # type: ignore[arg-type,return-value]
        tokens={TOKEN_ENV: "t" * 43, ADMIN_TOKEN_ENV: "a" * 43}, run_id="eve-run",
    )  # fmt: skip
    driver.clock.sync(ORIGIN, time.monotonic())
    driver.timeline.begin(ORIGIN)
    driver.faults.begin(ORIGIN)
    return driver


async def test_driver_switches_eavesdroppers_through_the_broker(tmp_path: Path) -> None:
    cuts: list[tuple[str, str, bool]] = []
    driver = make_driver(tmp_path, (intercept(1, 1.0, 1.0, fraction=0.3), cut(2, 1.0, 5.0), pns(3, 4.0)), cuts)
    broker = FakeBroker()
    left, right = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(broker.serve, right)
        driver.broker = AdminClient(left, peer="broker", timeout_s=5)
        for action in driver.faults.timeline():
            await driver._fault(action)
        await driver.broker.aclose()
    driver.events.close()
    assert [(list(m.endpoints), m.intercept_fraction, m.pns) for m in broker.received] == [
        (["alice", "bob"], 0.3, False),  # fault 1 on
        (["alice", "bob"], 0.0, False),  # fault 1 off: every switch at its default
        (["alice", "bob"], 0.0, True),  # fault 3 on (no `for`: on to the end)
    ]
    assert all((m.resend_photons, m.pns_multi_forward, m.pns_single_block) == (0, 1.0, 0.0) for m in broker.received)
    assert cuts == [("alice", "bob", True), ("alice", "bob", False)]  # the cut went to the deployment, not Eve
    assert [(r["fault"], r["action"], r.get("fraction")) for r in driver.fault_log] == [
        (1, "intercept", 0.3), (2, "cut", None), (1, "withdraw", 0.3), (3, "split", None), (2, "restore", None)]
    events = [e for e in read_events(tmp_path / "events.jsonl") if e["event"].startswith("fault_")]
    assert [(e["event"], e["kind"], e["action"]) for e in events][:1] == [
        ("fault_applied", "qkd-intercept-resend", "intercept")]
    assert events[0]["fraction"] == 0.3 and events[0]["planned_at_s"] == 1.0
    assert events[0]["description"] == "qkd-intercept-resend [alice, bob] fraction 0.3 at 1 s for 1 s"


async def test_driver_fails_the_run_when_the_broker_refuses_an_eavesdropper(tmp_path: Path) -> None:
    driver = make_driver(tmp_path, (pns(1, 1.0),), [])
    left, right = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(FakeBroker(refuse="refused").serve, right)
        driver.broker = AdminClient(left, peer="broker", timeout_s=5)
        (action,) = driver.faults.timeline()
        with pytest.raises(RuntimeFailure) as info:
            await driver._fault(action)
        await driver.broker.aclose()
    driver.events.close()
    assert str(info.value) == (
        "fault 1 (qkd-pns [alice, bob] at 1 s until the end): the broker refused qkd_eve: refused: no QKD on that link")
    assert driver.fault_log == []  # a step that did not happen is not logged


async def test_admin_client_qkd_eve_raises_like_the_other_requests() -> None:
    left, right = trio.testing.memory_stream_pair()
    broker = FakeBroker(refuse="no_link")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(broker.serve, right)
        client = AdminClient(left, peer="broker", timeout_s=5)
        with pytest.raises(AdminRequestError) as info:
            await client.qkd_eve(("bob", "carol"), intercept_fraction=1, pns=True)
        await client.aclose()
    assert info.value.code == "no_link"
    (sent,) = broker.received
    assert (list(sent.endpoints), sent.intercept_fraction, sent.pns) == (["bob", "carol"], 1.0, True)
    assert isinstance(sent.intercept_fraction, float)


# --------------------------------------------------------------------------- the driver: fibre cuts


async def test_driver_cuts_the_fibre_and_the_link_and_splices_both(tmp_path: Path) -> None:
    # The docker runtime's path: the deployment cuts the classical link, the broker the fibre.
    log: list[Any] = []
    driver = make_driver(tmp_path, (fibre(1, 1.0, 2.0), pns(2, 2.0, 1.0), fibre(3, 5.0)), log)
    left, right = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(FakeBroker(log=log).serve, right)
        driver.broker = AdminClient(left, peer="broker", timeout_s=5)
        for action in driver.faults.due(ORIGIN + 100.0):
            await driver._fault(action)
        del log[:]
        await driver._revert_for_shutdown()  # fault 3 is still cut at the end
        shutdown_log = list(log)
        await driver.broker.aclose()
    driver.events.close()
    assert shutdown_log == [("alice", "bob", False), ("fibre_cut", "alice", "bob", False)]
    assert [(r["fault"], r["action"]) for r in driver.fault_log] == [
        (1, "cut"), (2, "split"), (1, "splice"), (2, "withdraw"), (3, "cut")]
    events = [e for e in read_events(tmp_path / "events.jsonl") if e["event"].startswith("fault_")]
    assert [(e["event"], e["fault"], e["kind"], e["action"]) for e in events] == [
        ("fault_applied", 1, "fibre-cut", "cut"), ("fault_applied", 2, "qkd-pns", "split"),
        ("fault_reverted", 1, "fibre-cut", "splice"), ("fault_reverted", 2, "qkd-pns", "withdraw"),
        ("fault_applied", 3, "fibre-cut", "cut")]
    assert events[0]["description"] == "fibre-cut [alice, bob] at 1 s for 2 s" and "fraction" not in events[0]
    assert (events[2]["planned_at_s"], events[2]["link"]) == (3.0, ["alice", "bob"])


async def test_driver_fibre_cut_order(tmp_path: Path) -> None:
    # Cut: the broker's fibre first (the refusable half), then the link; splice: the reverse.
    log: list[Any] = []
    driver = make_driver(tmp_path, (fibre(1, 1.0, 2.0), pns(2, 2.0, 1.0)), log)
    left, right = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(FakeBroker(log=log).serve, right)
        driver.broker = AdminClient(left, peer="broker", timeout_s=5)
        for action in driver.faults.due(ORIGIN + 100.0):
            await driver._fault(action)
        await driver.broker.aclose()
    driver.events.close()
    assert log == [
        ("fibre_cut", "alice", "bob", True), ("alice", "bob", True),  # fault 1 cut
        ("qkd_eve", 0.0, True),  # fault 2 on while the fibre is cut
        ("alice", "bob", False), ("fibre_cut", "alice", "bob", False),  # fault 1 spliced
        ("qkd_eve", 0.0, False),  # fault 2 off
    ]


async def test_driver_fibre_cut_through_the_nodes_control_endpoints(tmp_path: Path) -> None:
    # The local runtime's and the conductor's path: `link_fault` to both ends, as link-cut does.
    log: list[Any] = []
    driver = make_driver(tmp_path, (fibre(1, 1.0, 2.0), fibre(2, 4.0, link=("bob", "alice"))), log, cuts_links=False)
    async with trio.open_nursery() as nursery:
        for name in ("broker", "alice", "bob"):
            left, right = trio.testing.memory_stream_pair()
            nursery.start_soon(FakeBroker(log=log, name=name).serve, right)
            client = AdminClient(left, peer=name, timeout_s=5)
            if name == "broker":
                driver.broker = client
            else:
                driver.controls[name] = client
        for action in driver.faults.due(ORIGIN + 100.0):
            await driver._fault(action)
        await driver._revert_for_shutdown()
        for client in [driver.broker, *driver.controls.values()]:
            assert client is not None
            await client.aclose()
    driver.events.close()
    assert log == [
        ("fibre_cut", "alice", "bob", True), ("link_fault", "alice", "bob", True), ("link_fault", "bob", "alice", True),
        ("link_fault", "alice", "bob", False), ("link_fault", "bob", "alice", False),
        ("fibre_cut", "alice", "bob", False),
        ("fibre_cut", "bob", "alice", True), ("link_fault", "bob", "alice", True), ("link_fault", "alice", "bob", True),
        # shutdown: the nodes are about to stop (their cut goes with them, as for link-cut); the broker splices
        ("fibre_cut", "bob", "alice", False),
    ]


async def test_driver_fails_the_run_when_the_broker_refuses_a_fibre_cut(tmp_path: Path) -> None:
    cuts: list[Any] = []
    driver = make_driver(tmp_path, (fibre(1, 1.0),), cuts)
    left, right = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(FakeBroker(refuse="no_link", message="no link between alice and bob").serve, right)
        driver.broker = AdminClient(left, peer="broker", timeout_s=5)
        (action,) = driver.faults.timeline()
        with pytest.raises(RuntimeFailure) as info:
            await driver._fault(action)
        await driver.broker.aclose()
    driver.events.close()
    assert str(info.value) == (
        "fault 1 (fibre-cut [alice, bob] at 1 s until the end): the broker refused fibre_cut: "
        "no_link: no link between alice and bob")
    assert cuts == []  # the broker's half goes first: nothing is left half cut
    assert driver.fault_log == []


async def test_admin_client_fibre_cut_raises_like_the_other_requests() -> None:
    left, right = trio.testing.memory_stream_pair()
    broker = FakeBroker(refuse="unknown_node", message="unknown node dave")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(broker.serve, right)
        client = AdminClient(left, peer="broker", timeout_s=5)
        with pytest.raises(AdminRequestError) as info:
            await client.fibre_cut(("dave", "bob"), False)
        await client.aclose()
    assert info.value.code == "unknown_node"
    (sent,) = broker.received
    assert isinstance(sent, FibreCut) and (list(sent.endpoints), sent.cut) == (["dave", "bob"], False)
