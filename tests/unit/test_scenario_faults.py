"""The scenario's `faults` section: valid faults load, every mistake is a located problem.

Covers the schema side of issue 3 part 4 (emulator/scenario/schema.py `Fault`,
emulator/scenario/fault_kinds.py), the QKD eavesdroppers and fibre cuts of issue 4, and
the shipped scenarios/crash-restart.yaml.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import pydantic
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from emulator.scenario import (
    Fault,
    FaultKind,
    FaultTarget,
    Problem,
    Scenario,
    ScenarioError,
    load_scenario,
    parse_scenario,
    render_reference,
    scenario_from_dict,
    scenario_to_dict,
)

ROOT = Path(__file__).resolve().parents[2]
CRASH_RESTART = ROOT / "scenarios" / "crash-restart.yaml"

# Three nodes (carol external), two links; faults go at the end, from line 16 on.
BASE = """\
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
apps:
  - {kind: epr-test, nodes: [alice, bob], pairs: 10}
faults:
"""
FIRST_FAULT_LINE = 16


def with_faults(*faults: str) -> str:
    return BASE + "".join(f"  - {f}\n" for f in faults)


def problems_of(text: str) -> tuple[Problem, ...]:
    with pytest.raises(ScenarioError) as info:
        parse_scenario(text, filename="f.yaml")
    return info.value.problems


def only_problem(text: str) -> Problem:
    problems = problems_of(text)
    assert len(problems) == 1, "\n".join(map(str, problems))
    return problems[0]


# --------------------------------------------------------------------------- valid faults


def test_every_kind_loads_with_si_values() -> None:
    s = parse_scenario(with_faults(
        "{at: 2s, kind: node-crash, node: bob, for: 3s}",
        "{at: 2s, kind: node-restart, node: alice}",
        "{at: 5500ms, kind: node-freeze, node: bob, for: 0.5}",
        "{at: 8, kind: link-cut, link: [alice, bob], for: 2s}",
        "{at: 0s, kind: link-cut, link: [bob, carol]}",
    ))
    crash, restart, freeze, cut, cut_forever = s.faults
    assert (crash.kind, crash.at_s, crash.for_s, crash.node, crash.link) == (FaultKind.NODE_CRASH, 2.0, 3.0, "bob", None)
    assert (restart.kind, restart.for_s, restart.end_s) == (FaultKind.NODE_RESTART, None, 2.0)  # instantaneous
    assert (freeze.at_s, freeze.for_s, freeze.end_s) == (5.5, 0.5, 6.0)
    assert (cut.node, cut.link, cut.end_s) == (None, ("alice", "bob"), 10.0)
    assert cut_forever.at_s == 0.0 and math.isinf(cut_forever.end_s)  # lasts until the run ends
    assert crash.describe() == "node-crash bob at 2 s for 3 s"
    assert restart.describe() == "node-restart alice at 2 s"
    assert cut_forever.describe() == "link-cut [bob, carol] at 0 s until the end"


def test_a_scenario_without_faults_has_none() -> None:
    s = parse_scenario(BASE.replace("faults:\n", ""))
    assert s.faults == ()
    assert parse_scenario(BASE.replace("faults:\n", "faults: []\n")).faults == ()


def test_link_is_written_in_the_scenarios_order() -> None:
    s = parse_scenario(with_faults("{at: 1s, kind: link-cut, link: [bob, alice], for: 1s}",
                                   "{at: 1s, kind: link-cut, link: [carol, bob], for: 1s}"))
    assert [f.link for f in s.faults] == [("alice", "bob"), ("bob", "carol")]


def test_a_fault_may_outlast_the_run() -> None:
    # `for` past `duration` is allowed (the runtime undoes faults at the end) and draws no remark.
    s = parse_scenario(with_faults("{at: 19s, kind: node-freeze, node: bob, for: 1h}"))
    assert s.faults[0].end_s == 19.0 + 3600.0


@pytest.mark.parametrize(
    ("first", "second"),
    [
        # back to back on one target: the first is reverted at 5 s, then the second applied
        ("{at: 2s, kind: node-crash, node: bob, for: 3s}", "{at: 5s, kind: node-freeze, node: bob, for: 1s}"),
        ("{at: 2s, kind: link-cut, link: [alice, bob], for: 3s}", "{at: 5s, kind: link-cut, link: [bob, alice]}"),
        # an instantaneous restart right when a window closes, or before one opens
        ("{at: 2s, kind: node-freeze, node: bob, for: 3s}", "{at: 5s, kind: node-restart, node: bob}"),
        ("{at: 2s, kind: node-restart, node: bob}", "{at: 2.001s, kind: node-crash, node: bob}"),
        # different targets never clash, whatever the times
        ("{at: 2s, kind: node-crash, node: bob}", "{at: 2s, kind: node-crash, node: alice}"),
        ("{at: 2s, kind: node-crash, node: bob}", "{at: 2s, kind: link-cut, link: [alice, bob]}"),
        ("{at: 2s, kind: link-cut, link: [alice, bob]}", "{at: 2s, kind: link-cut, link: [bob, carol]}"),
    ],
)
def test_faults_that_do_not_overlap(first: str, second: str) -> None:
    assert len(parse_scenario(with_faults(first, second)).faults) == 2


@pytest.mark.parametrize(
    ("first", "second", "fragment"),
    [
        ("{at: 2s, kind: node-crash, node: bob, for: 3s}", "{at: 4s, kind: node-freeze, node: bob, for: 1s}",
         "node-freeze bob at 4 s for 1 s overlaps faults[0] (node-crash bob at 2 s for 3 s) on node 'bob'"),
        # without `for` a crash lasts until the end of the run
        ("{at: 2s, kind: node-crash, node: bob}", "{at: 15s, kind: node-restart, node: bob}",
         "overlaps faults[0] (node-crash bob at 2 s until the end)"),
        # a later fault that started earlier in time is still caught (order in the file does not matter)
        ("{at: 6s, kind: node-freeze, node: bob, for: 1s}", "{at: 5s, kind: node-crash, node: bob, for: 1.5s}",
         "overlaps faults[0]"),
        # an instantaneous restart inside a window
        ("{at: 2s, kind: node-freeze, node: bob, for: 3s}", "{at: 4.999s, kind: node-restart, node: bob}",
         "overlaps faults[0]"),
        # two faults starting at the same instant
        ("{at: 2s, kind: node-restart, node: bob}", "{at: 2s, kind: node-restart, node: bob}", "overlaps faults[0]"),
        # one link, named in either order
        ("{at: 2s, kind: link-cut, link: [alice, bob], for: 3s}", "{at: 3s, kind: link-cut, link: [bob, alice]}",
         "on link [alice, bob]"),
    ],
)
def test_overlapping_faults_on_one_target(first: str, second: str, fragment: str) -> None:
    p = only_problem(with_faults(first, second))
    assert (p.line, p.column, p.field) == (FIRST_FAULT_LINE + 1, 5, "faults[1]"), p
    assert fragment in p.message and "must not overlap" in p.message, p.message


def test_only_the_first_clash_of_a_fault_is_reported() -> None:
    problems = problems_of(with_faults(
        "{at: 1s, kind: node-freeze, node: bob}",
        "{at: 2s, kind: node-crash, node: bob}",
        "{at: 3s, kind: node-restart, node: bob}",
    ))
    assert [(p.field, "faults[0]" in p.message) for p in problems] == [("faults[1]", True), ("faults[2]", True)]


# --------------------------------------------------------------------------- mistakes, with their place


@pytest.mark.parametrize(
    ("fault", "anchor", "field", "fragment"),
    [
        # `anchor`: the text the problem points at (its first character); "{" is the fault itself
        ("{at: 2s, kind: node-crash, for: 3s}", "{", "faults[0].node", "missing required field 'node': node-crash acts on a node"),
        ("{at: 2s, kind: node-crash, node: Bob}", "Bob", "faults[0].node", "invalid name 'Bob'"),
        ("{at: 2s, kind: node-crash, node: dave}", "dave", "faults[0].node",
         "unknown node 'dave' (declared nodes: alice, bob, carol)"),
        ("{at: 2s, kind: node-crash, node: carol}", "carol", "faults[0].node",
         "node 'carol' is external; qnetem cannot crash a process it did not start"),
        ("{at: 2s, kind: node-freeze, node: carol}", "carol", "faults[0].node", "qnetem cannot freeze a process"),
        ("{at: 2s, kind: node-restart, node: carol}", "carol", "faults[0].node", "qnetem cannot restart a process"),
        ("{at: 2s, kind: link-cut, link: [alice, carol]}", "[alice", "faults[0].link",
         "no link between 'alice' and 'carol' (links: [alice, bob], [bob, carol])"),
        ("{at: 2s, kind: link-cut, link: [alice, dave]}", "dave", "faults[0].link[1]", "unknown node 'dave'"),
        ("{at: 2s, kind: link-cut, link: [bob, bob]}", "bob]", "faults[0].link[1]", "two different nodes"),
        ("{at: 2s, kind: link-cut, link: [alice]}", "[alice", "faults[0].link[1]", "missing list item [1]"),
        ("{at: 2s, kind: link-cut, link: alice}", "alice", "faults[0].link", "tuple"),
        ("{at: 20s, kind: node-crash, node: bob}", "20s", "faults[0].at", "at 20 s, not before the end of the run (20 s)"),
        ("{at: -1s, kind: node-crash, node: bob}", "-1s", "faults[0].at", ">= 0"),
        ("{at: 2 fortnights, kind: node-crash, node: bob}", "2 fortnights", "faults[0].at", "unknown unit"),
        ("{kind: node-crash, node: bob}", "{", "faults[0].at", "missing required field 'at'"),
        ("{at: 2s, node: bob}", "{", "faults[0].kind", "missing required field 'kind'"),
        ("{at: 2s, kind: fiber-cut, link: [alice, bob]}", "fiber-cut", "faults[0].kind",
         "'node-crash', 'node-restart', 'node-freeze', 'link-cut', 'fibre-cut', 'qkd-intercept-resend' or "
         "'qkd-pns'"),
        ("{at: 2s, kind: node-crash, node: bob, for: 0s}", "0s", "faults[0].for", "must be > 0"),
        ("{at: 2s, kind: node-crash, node: bob, for: -1s}", "-1s", "faults[0].for", ">= 0"),
        ("{at: 2s, kind: node-crash, node: bob, fro: 1s}", "fro", "faults[0].fro", "did you mean 'for'?"),
        ("[2s, node-crash, bob]", "[", "faults[0]", "expected a mapping"),
    ],
)
def test_bad_faults(fault: str, anchor: str, field: str, fragment: str) -> None:
    p = only_problem(with_faults(fault))
    column = len("  - ") + fault.rindex(anchor) + 1
    assert (p.file, p.line, p.column, p.field) == ("f.yaml", FIRST_FAULT_LINE, column, field), p
    assert fragment in p.message, p.message


@pytest.mark.parametrize(
    ("fault", "wrong", "missing"),
    [
        ("{at: 2s, kind: node-freeze, link: [alice, bob]}", "link", "node"),
        ("{at: 2s, kind: link-cut, node: bob}", "node", "link"),
    ],
)
def test_the_wrong_target_field(fault: str, wrong: str, missing: str) -> None:
    # Both mistakes are named: the field that does not belong, and the one that is missing.
    problems = problems_of(with_faults(fault))
    by_field = {p.field: p for p in problems}
    assert set(by_field) == {f"faults[0].{wrong}", f"faults[0].{missing}"}, problems
    assert by_field[f"faults[0].{missing}"].column == len("  - ") + 1  # the fault, where the key would go
    assert by_field[f"faults[0].{wrong}"].column == len("  - ") + fault.index(f"{wrong}:") + len(wrong) + 3
    assert f"missing required field {missing!r}" in by_field[f"faults[0].{missing}"].message
    assert f"not a {wrong}" in by_field[f"faults[0].{wrong}"].message


def test_node_and_link_given_together() -> None:
    problems = problems_of(with_faults("{at: 2s, kind: link-cut, node: bob, link: [alice, bob]}"))
    assert [(p.field, p.message) for p in problems] == [
        ("faults[0].node", "link-cut acts on a link, not a node: remove `node` and give `link: [a, b]`")]


def test_every_bad_fault_is_reported_in_one_go() -> None:
    problems = problems_of(with_faults(
        "{at: 2s, kind: node-crash, node: carol}",
        "{at: 25s, kind: link-cut, link: [alice, carol]}",
        "{at: 2s, kind: node-freeze}",
        "{at: 1s, kind: node-restart, node: alice, for: 1s}",  # valid
    ).replace("length_km: 5", "length_km: -5"))
    assert [(p.line, p.field) for p in problems] == [
        (12, "links[1].length_km"),  # a broken link is still a link the faults may name
        (16, "faults[0].node"),
        (17, "faults[1].at"),
        (17, "faults[1].link"),
        (18, "faults[2].node"),
    ], "\n".join(map(str, problems))


def test_too_many_faults() -> None:
    faults = [f"{{at: {i}ms, kind: node-restart, node: bob}}" for i in range(1025)]
    p = only_problem(with_faults(*faults))
    assert (p.line, p.field) == (FIRST_FAULT_LINE - 1, "faults") and "at most 1024" in p.message, p
    assert len(parse_scenario(with_faults(*faults[:1024])).faults) == 1024


def test_faults_survive_json_and_yaml_round_trips() -> None:
    s = parse_scenario(with_faults("{at: 2s, kind: node-crash, node: bob, for: 3s}",
                                   "{at: 8s, kind: link-cut, link: [bob, alice]}"))
    data = scenario_to_dict(s)
    assert data["faults"] == [
        {"kind": "node-crash", "at": 2.0, "node": "bob", "link": None, "for": 3.0, "fraction": None},
        {"kind": "link-cut", "at": 8.0, "node": None, "link": ["alice", "bob"], "for": None, "fraction": None},
    ]
    assert scenario_from_dict(json.loads(json.dumps(data, allow_nan=False))) == s
    assert parse_scenario(yaml.safe_dump(data)) == s
    assert hash(s) == hash(scenario_from_dict(data))


def test_from_dict_and_direct_construction_check_faults() -> None:
    data = scenario_to_dict(parse_scenario(with_faults("{at: 2s, kind: node-crash, node: bob}")))
    data["faults"][0]["node"] = "carol"
    with pytest.raises(ScenarioError) as info:
        scenario_from_dict(data, source="run/scenario.json")
    assert [str(p) for p in info.value.problems] == [
        "run/scenario.json: faults[0].node: node 'carol' is external; qnetem cannot crash a process it did not start"]
    with pytest.raises(pydantic.ValidationError, match="is external"):
        Scenario.model_validate(data)


def test_fault_models_are_frozen() -> None:
    fault = parse_scenario(with_faults("{at: 2s, kind: node-crash, node: bob}")).faults[0]
    assert isinstance(fault, Fault)
    with pytest.raises(pydantic.ValidationError):
        fault.at_s = 3.0  # type: ignore[misc]


def test_kinds_table() -> None:
    assert [k.value for k in FaultKind] == [
        "node-crash", "node-restart", "node-freeze", "link-cut", "fibre-cut", "qkd-intercept-resend", "qkd-pns"]
    assert [k for k in FaultKind if k.target is FaultTarget.LINK] == [
        FaultKind.LINK_CUT, FaultKind.FIBRE_CUT, FaultKind.QKD_INTERCEPT_RESEND, FaultKind.QKD_PNS]
    assert [k for k in FaultKind if not k.lasts_to_end_without_for] == [FaultKind.NODE_RESTART]
    assert {k for k in FaultKind if k.takes_node_down} == {FaultKind.NODE_CRASH, FaultKind.NODE_RESTART}
    # an eavesdropper ends with the broker: nothing to undo before shutdown; a cut classical channel is undone
    assert {k for k in FaultKind if k.undo_before_shutdown} == {
        FaultKind.NODE_FREEZE, FaultKind.LINK_CUT, FaultKind.FIBRE_CUT}
    assert {k for k in FaultKind if k.cuts_classical} == {FaultKind.LINK_CUT, FaultKind.FIBRE_CUT}
    assert {k for k in FaultKind if k.cuts_fibre} == {FaultKind.FIBRE_CUT}
    assert {k for k in FaultKind if k.eavesdrops} == {FaultKind.QKD_INTERCEPT_RESEND, FaultKind.QKD_PNS}
    assert [k for k in FaultKind if k.takes_fraction] == [FaultKind.QKD_INTERCEPT_RESEND]
    assert [(k.apply_verb, k.revert_verb) for k in FaultKind] == [
        ("kill", "start"), ("stop", "start"), ("pause", "resume"), ("cut", "restore"), ("cut", "splice"),
        ("intercept", "withdraw"), ("split", "withdraw")]


def test_reference_documents_faults() -> None:
    reference = render_reference()
    assert "### Fault\n" in reference and "### Fault kinds\n" in reference
    for name, field in Fault.model_fields.items():
        assert field.description, f"Fault.{name} has no description"
        assert f"| `{field.alias or name}` |" in reference
    for kind in FaultKind:
        assert f"| `{kind.value}` | `{kind.target.value}` |" in reference
    assert "| `faults` | list of [Fault](#fault) |" in reference
    assert "| `fraction` | number (optional) | absent |" in reference


# --------------------------------------------------------------------------- eavesdroppers on a QKD link

# BASE with a QKD section on [alice, bob] (not on [bob, carol]): faults from line 17 on.
QKD_BASE = BASE.replace("    entanglement: {}\n", "    entanglement: {}\n    qkd: {}\n")
QKD_FIRST_FAULT_LINE = FIRST_FAULT_LINE + 1


def with_qkd_faults(*faults: str) -> str:
    return QKD_BASE + "".join(f"  - {f}\n" for f in faults)


def test_eavesdropper_faults_load() -> None:
    s = parse_scenario(with_qkd_faults(
        "{at: 2s, kind: qkd-intercept-resend, link: [bob, alice], fraction: 0.5, for: 3s}",
        "{at: 6s, kind: qkd-pns, link: [alice, bob]}",
    ))
    ir, pns = s.faults
    assert (ir.kind, ir.link, ir.at_s, ir.for_s, ir.fraction) == (
        FaultKind.QKD_INTERCEPT_RESEND, ("alice", "bob"), 2.0, 3.0, 0.5)
    assert (pns.kind, pns.link, pns.for_s, pns.fraction, pns.end_s) == (
        FaultKind.QKD_PNS, ("alice", "bob"), None, None, math.inf)
    assert ir.describe() == "qkd-intercept-resend [alice, bob] fraction 0.5 at 2 s for 3 s"
    assert pns.describe() == "qkd-pns [alice, bob] at 6 s until the end"
    data = scenario_to_dict(s)
    assert data["faults"][0] == {"kind": "qkd-intercept-resend", "at": 2.0, "node": None, "link": ["alice", "bob"],
                                 "for": 3.0, "fraction": 0.5}  # fmt: skip
    assert scenario_from_dict(json.loads(json.dumps(data))) == s == parse_scenario(yaml.safe_dump(data))


@pytest.mark.parametrize(
    ("first", "second"),
    [
        # a link cut acts on the classical channel, an eavesdropper on the photons: they may overlap
        ("{at: 2s, kind: link-cut, link: [alice, bob], for: 5s}",
         "{at: 3s, kind: qkd-intercept-resend, link: [alice, bob], fraction: 1, for: 1s}"),
        ("{at: 2s, kind: qkd-pns, link: [alice, bob]}", "{at: 3s, kind: link-cut, link: [bob, alice], for: 1s}"),
        # back to back on one eavesdropper
        ("{at: 2s, kind: qkd-intercept-resend, link: [alice, bob], fraction: 0.1, for: 1s}",
         "{at: 3s, kind: qkd-pns, link: [alice, bob]}"),
        # node faults on the link's ends do not clash either
        ("{at: 2s, kind: qkd-pns, link: [alice, bob]}", "{at: 2s, kind: node-freeze, node: bob, for: 1s}"),
    ],
)
def test_eavesdropper_faults_that_may_coexist(first: str, second: str) -> None:
    assert len(parse_scenario(with_qkd_faults(first, second)).faults) == 2


def test_eavesdroppers_on_one_link_may_not_overlap() -> None:
    p = only_problem(with_qkd_faults(
        "{at: 2s, kind: qkd-intercept-resend, link: [alice, bob], fraction: 0.5, for: 3s}",
        "{at: 4s, kind: qkd-pns, link: [bob, alice], for: 1s}",
    ))
    assert (p.line, p.field) == (QKD_FIRST_FAULT_LINE + 1, "faults[1]"), p
    assert p.message == (
        "qkd-pns [alice, bob] at 4 s for 1 s overlaps faults[0] (qkd-intercept-resend [alice, bob] fraction 0.5 at "
        "2 s for 3 s) on the eavesdropper of link [alice, bob]; faults on one target must not overlap in time")


@pytest.mark.parametrize(
    ("fault", "anchor", "field", "fragment"),
    [
        ("{at: 2s, kind: qkd-intercept-resend, link: [alice, bob]}", "{", "faults[0].fraction",
         "missing required field 'fraction': qkd-intercept-resend intercepts this share of the pulses"),
        ("{at: 2s, kind: qkd-intercept-resend, link: [alice, bob], fraction: 1.5}", "1.5", "faults[0].fraction",
         "fraction must be > 0 and <= 1, got 1.5"),
        ("{at: 2s, kind: qkd-intercept-resend, link: [alice, bob], fraction: 0}", "0}", "faults[0].fraction",
         "fraction must be > 0 and <= 1, got 0"),
        ("{at: 2s, kind: qkd-intercept-resend, link: [alice, bob], fraction: -0.1}", "-0.1", "faults[0].fraction",
         "> 0 and <= 1"),
        ("{at: 2s, kind: qkd-intercept-resend, link: [alice, bob], fraction: half}", "half", "faults[0].fraction",
         "expected a number"),
        ("{at: 2s, kind: node-crash, node: bob, fraction: 0.5}", "0.5", "faults[0].fraction",
         "node-crash takes no `fraction` (only qkd-intercept-resend does): remove it"),
        ("{at: 2s, kind: link-cut, link: [alice, bob], fraction: 0.5}", "0.5", "faults[0].fraction",
         "link-cut takes no `fraction`"),
        ("{at: 2s, kind: qkd-pns, link: [alice, bob], fraction: 0.5}", "0.5", "faults[0].fraction",
         "qkd-pns takes no `fraction`"),
        ("{at: 2s, kind: qkd-pns, link: [bob, carol]}", "[bob", "faults[0].link",
         "qkd-pns needs a QKD link: the link between 'bob' and 'carol' has no `qkd` section"),
        ("{at: 2s, kind: qkd-intercept-resend, link: [carol, bob], fraction: 0.5}", "[carol", "faults[0].link",
         "qkd-intercept-resend needs a QKD link: the link between 'bob' and 'carol' has no `qkd` section"),
        ("{at: 2s, kind: qkd-pns, link: [alice, carol]}", "[alice", "faults[0].link", "no link between"),
        ("{at: 2s, kind: qkd-pns, node: bob}", "{", "faults[0].link", "missing required field 'link'"),
    ],
)
def test_bad_eavesdropper_faults(fault: str, anchor: str, field: str, fragment: str) -> None:
    problems = problems_of(with_qkd_faults(fault))
    p = next(p for p in problems if p.field == field)
    column = len("  - ") + fault.rindex(anchor) + 1
    assert (p.line, p.column) == (QKD_FIRST_FAULT_LINE, column), p
    assert fragment in p.message, p.message
    assert len(problems) == (2 if "node: bob" in fault and "qkd-pns" in fault else 1), problems


def test_eavesdropper_faults_need_qkd_in_dicts_and_direct_construction() -> None:
    data = scenario_to_dict(parse_scenario(with_qkd_faults("{at: 2s, kind: qkd-pns, link: [alice, bob]}")))
    data["links"][0]["qkd"] = None
    with pytest.raises(ScenarioError) as info:
        scenario_from_dict(data, source="run/scenario.json")
    assert [p.field for p in info.value.problems] == ["faults[0].link"]
    with pytest.raises(pydantic.ValidationError, match="needs a QKD link"):
        Scenario.model_validate(data)


# --------------------------------------------------------------------------- fibre cuts


def test_fibre_cuts_load_on_any_link() -> None:
    s = parse_scenario(with_faults(
        "{at: 2s, kind: fibre-cut, link: [bob, alice], for: 1.5s}",
        "{at: 3s, kind: fibre-cut, link: [carol, bob]}",  # no qkd, no entanglement, an external end: any link
    ))
    short, forever = s.faults
    assert (short.kind, short.link, short.at_s, short.for_s, short.fraction, short.end_s) == (
        FaultKind.FIBRE_CUT, ("alice", "bob"), 2.0, 1.5, None, 3.5)
    assert (forever.link, forever.end_s) == (("bob", "carol"), math.inf)
    assert short.describe() == "fibre-cut [alice, bob] at 2 s for 1.5 s"
    assert forever.describe() == "fibre-cut [bob, carol] at 3 s until the end"
    data = scenario_to_dict(s)
    assert data["faults"][0] == {"kind": "fibre-cut", "at": 2.0, "node": None, "link": ["alice", "bob"],
                                 "for": 1.5, "fraction": None}  # fmt: skip
    assert scenario_from_dict(json.loads(json.dumps(data))) == s == parse_scenario(yaml.safe_dump(data))


@pytest.mark.parametrize(
    ("first", "second"),
    [
        # a fibre cut holds the classical channel like a link cut: back to back is fine
        ("{at: 2s, kind: fibre-cut, link: [alice, bob], for: 1s}", "{at: 3s, kind: link-cut, link: [bob, alice]}"),
        ("{at: 2s, kind: link-cut, link: [alice, bob], for: 1s}", "{at: 3s, kind: fibre-cut, link: [alice, bob]}"),
        # an eavesdropper may be on while the fibre is cut (she just sees no photon)
        ("{at: 2s, kind: qkd-pns, link: [alice, bob]}", "{at: 3s, kind: fibre-cut, link: [bob, alice], for: 1s}"),
        ("{at: 2s, kind: fibre-cut, link: [alice, bob], for: 5s}",
         "{at: 3s, kind: qkd-intercept-resend, link: [alice, bob], fraction: 0.5}"),
        # other links and the nodes at its ends are other targets
        ("{at: 2s, kind: fibre-cut, link: [alice, bob]}", "{at: 2s, kind: fibre-cut, link: [bob, carol]}"),
        ("{at: 2s, kind: fibre-cut, link: [alice, bob]}", "{at: 2s, kind: node-freeze, node: bob, for: 1s}"),
    ],
)
def test_fibre_cuts_that_may_coexist(first: str, second: str) -> None:
    assert len(parse_scenario(with_qkd_faults(first, second)).faults) == 2


@pytest.mark.parametrize(
    ("first", "second", "fragment"),
    [
        ("{at: 2s, kind: link-cut, link: [alice, bob], for: 3s}", "{at: 4s, kind: fibre-cut, link: [bob, alice]}",
         "fibre-cut [alice, bob] at 4 s until the end overlaps faults[0] (link-cut [alice, bob] at 2 s for 3 s) "
         "on link [alice, bob]"),
        ("{at: 2s, kind: fibre-cut, link: [alice, bob]}", "{at: 9s, kind: link-cut, link: [alice, bob], for: 1s}",
         "link-cut [alice, bob] at 9 s for 1 s overlaps faults[0] (fibre-cut [alice, bob] at 2 s until the end)"),
        ("{at: 2s, kind: fibre-cut, link: [bob, carol], for: 3s}", "{at: 2s, kind: fibre-cut, link: [carol, bob]}",
         "overlaps faults[0] (fibre-cut [bob, carol] at 2 s for 3 s) on link [bob, carol]"),
    ],
)
def test_fibre_cuts_may_not_overlap_classical_cuts(first: str, second: str, fragment: str) -> None:
    p = only_problem(with_qkd_faults(first, second))
    assert (p.line, p.column, p.field) == (QKD_FIRST_FAULT_LINE + 1, 5, "faults[1]"), p
    assert fragment in p.message and "must not overlap" in p.message, p.message


@pytest.mark.parametrize(
    ("fault", "anchor", "field", "fragment"),
    [
        ("{at: 2s, kind: fibre-cut, link: [alice, bob], fraction: 0.5}", "0.5", "faults[0].fraction",
         "fibre-cut takes no `fraction` (only qkd-intercept-resend does): remove it"),
        ("{at: 2s, kind: fibre-cut, link: [alice, carol]}", "[alice", "faults[0].link",
         "no link between 'alice' and 'carol' (links: [alice, bob], [bob, carol])"),
        ("{at: 2s, kind: fibre-cut, link: [alice, dave]}", "dave", "faults[0].link[1]", "unknown node 'dave'"),
        ("{at: 2s, kind: fibre-cut, node: bob}", "{", "faults[0].link",
         "missing required field 'link': fibre-cut acts on a link"),
        ("{at: 20s, kind: fibre-cut, link: [alice, bob]}", "20s", "faults[0].at", "not before the end of the run"),
    ],
)
def test_bad_fibre_cuts(fault: str, anchor: str, field: str, fragment: str) -> None:
    problems = problems_of(with_faults(fault))
    p = next(p for p in problems if p.field == field)
    column = len("  - ") + fault.rindex(anchor) + 1
    assert (p.line, p.column) == (FIRST_FAULT_LINE, column), p
    assert fragment in p.message, p.message
    assert len(problems) == (2 if "node: bob" in fault else 1), problems


# --------------------------------------------------------------------------- the shipped scenario


def test_crash_restart_scenario_loads() -> None:
    s = load_scenario(CRASH_RESTART)
    assert s.name == "crash-restart" and s.duration_s == 60.0 and s.time_scale == 1.0
    (crash,) = s.faults
    assert (crash.kind, crash.node, crash.at_s, crash.for_s) == (FaultKind.NODE_CRASH, "bob", 5.0, 1.0)
    assert [a.name for a in s.apps] == ["before", "after"]
    assert {e.app for e in s.expect} == {"before", "after"}


def test_crash_restart_timeline_leaves_margins() -> None:
    """The crash falls well after `before` ends and `after` starts well after bob is back."""
    s = load_scenario(CRASH_RESTART)
    link = s.links[0]
    assert link.entanglement is not None
    eta = 10 ** (-link.attenuation_db_per_km * (link.length_km / 2) / 10) * link.entanglement.detector_efficiency
    rate_hz = (eta**2 / 2) / (link.length_km * 4.9e-6)
    before, after = s.app("before"), s.app("after")
    (crash,) = s.faults
    slowest_rate_hz = 1000.0  # nodes draining memories slower than the link heralds (two-node-epr.yaml)
    before_s = before.pairs / min(rate_hz, slowest_rate_hz)  # type: ignore[attr-defined]
    assert crash.at_s >= before.start_s + 10 * before_s
    assert after.start_s - crash.end_s >= 5.0  # a restarted process or container registers in a few seconds
    after_s = after.pairs / slowest_rate_hz  # type: ignore[attr-defined]
    assert after.start_s + 10 * after_s <= s.duration_s
    # every pair of both tests fits in memory, so the measured rate is the heralding rate
    assert all(node.memory.qubits >= after.pairs for node in s.nodes.values())  # type: ignore[attr-defined]


def test_crash_restart_bounds_are_four_standard_errors_below_the_model() -> None:
    s = load_scenario(CRASH_RESTART)
    link = s.links[0]
    assert link.entanglement is not None
    eta = 10 ** (-link.attenuation_db_per_km * (link.length_km / 2) / 10) * link.entanglement.detector_efficiency
    p = eta**2 / 2
    rate_hz = p / (link.length_km * 4.9e-6)
    v = link.entanglement.visibility
    model = {"fidelity": (1 + 3 * v) / 4, "chsh": 2 * math.sqrt(2) * v, "pair_rate_hz": rate_hz}
    # epr-test sampling (nodes/apps/epr_test.py): fidelity cells 0.04 N pairs, CHSH cells 0.12 N,
    # correlator variance (1 - E^2)/n; |E| = V for XX, YY, ZZ and V/sqrt2 for the CHSH cells.
    def sigma(metric: str, n: int) -> float:
        if metric == "fidelity":
            return math.sqrt(3 * (1 - v**2) / (0.04 * n)) / 4
        if metric == "chsh":
            return math.sqrt(4 * (1 - v**2 / 2) / (0.12 * n))
        return rate_hz * math.sqrt((1 - p) / n)

    checked = set()
    for e in s.expect:
        n = s.app(e.app or "").pairs  # type: ignore[attr-defined]
        if e.metric == "pairs_measured":
            assert e.min == n
            continue
        assert e.min is not None and e.max is None
        distance = (model[e.metric] - e.min) / sigma(e.metric, n)
        assert 3.9 <= distance <= 4.5, (e.app, e.metric, distance)
        checked.add((e.app, e.metric))
    assert checked == {("before", "fidelity"), ("after", "fidelity"), ("after", "chsh"), ("after", "pair_rate_hz")}


# --------------------------------------------------------------------------- fuzzing

_FAULT_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 30), st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["2s", "0s", "-1s", "1h", "alice", "bob", "carol", "dave", "Bob", "node-crash", "node-restart",
                     "node-freeze", "link-cut", "fiber-cut", "fibre-cut", "qkd-pns", "qkd-intercept-resend", "0.5"]),
    st.lists(st.sampled_from(["alice", "bob", "carol", "dave", 3]), max_size=3),
)
_FAULT = st.dictionaries(st.sampled_from(["at", "kind", "node", "link", "for", "fro", "fraction"]), _FAULT_VALUES,
                         max_size=6)


@settings(max_examples=300, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_FAULT, max_size=4))
def test_fuzz_faults(faults: list[dict[str, Any]]) -> None:
    data = yaml.safe_load(QKD_BASE)
    data["faults"] = copy.deepcopy(faults)
    try:
        s = parse_scenario(yaml.safe_dump(data))
    except ScenarioError as err:
        assert err.problems and all(p.line >= 1 and p.column >= 1 for p in err.problems), str(err)
    else:
        # whatever was accepted honours the rules
        for f in s.faults:
            assert (f.node is None) != (f.link is None)
            assert f.node in (None, "alice", "bob") and 0 <= f.at_s < s.duration_s
            assert f.link in (None, ("alice", "bob"), ("bob", "carol"))
            assert (f.fraction is not None) == (f.kind is FaultKind.QKD_INTERCEPT_RESEND)
            assert f.fraction is None or 0 < f.fraction <= 1
            assert not f.kind.eavesdrops or f.link == ("alice", "bob")  # the QKD link
