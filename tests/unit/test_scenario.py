"""Scenario schema, loader and units: valid files load, every bad input is a ScenarioError.

Bad-input fixtures live in tests/data/scenarios/; each offending line ends with
``# ERROR <field.path>`` (``-`` for a problem with no field), so a fixture states
its own expected problems and the test checks them exactly: same lines, same
fields, nothing more.
"""

from __future__ import annotations

import copy
import json
import math
import pickle
import re
from pathlib import Path
from typing import Any

import pydantic
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from emulator.scenario import (
    APP_KINDS,
    METRICS,
    EntanglementScheme,
    MetricScope,
    MetricSpec,
    Problem,
    Role,
    Scenario,
    ScenarioError,
    load_scenario,
    parse_scenario,
    register_metric,
    render_reference,
    scenario_from_dict,
    scenario_to_dict,
)
from emulator.scenario import loader as loader_module
from emulator.scenario import units
from emulator.scenario.schema import BEGIN_MARKER, END_MARKER, replace_generated_section

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "scenarios" / "two-node-epr.yaml"
FIXTURES = ROOT / "tests" / "data" / "scenarios"
DOC = ROOT / "docs" / "scenarios.md"

MINIMAL = """\
name: mini
duration: 10s
nodes:
  alice: {}
  bob: {}
links:
  - endpoints: [alice, bob]
    length_km: 10
    entanglement: {}
apps:
  - {kind: epr-test, nodes: [alice, bob], pairs: 10}
"""


def problems_of(text: str) -> tuple[Problem, ...]:
    with pytest.raises(ScenarioError) as info:
        parse_scenario(text, filename="t.yaml")
    return info.value.problems


def only_problem(text: str) -> Problem:
    problems = problems_of(text)
    assert len(problems) == 1, "\n".join(map(str, problems))
    return problems[0]


# --------------------------------------------------------------------------- quickstart


def test_quickstart_loads_with_si_values() -> None:
    s = load_scenario(QUICKSTART)
    assert s.name == "two-node-epr"
    assert (s.seed, s.duration_s, s.time_scale) == (7, 60.0, 1.0)
    assert set(s.nodes) == {"alice", "bob"}
    alice = s.nodes["alice"]
    assert alice.role is Role.ENDPOINT and alice.external is False
    assert alice.memory.qubits == 4096 and math.isinf(alice.memory.t1_s) and math.isinf(alice.memory.t2_s)
    link = s.link("bob", "alice")
    assert link is not None and link.length_km == 10.0 and link.attenuation_db_per_km == 0.2
    assert link.entanglement is not None
    assert link.entanglement.scheme is EntanglementScheme.DOUBLE_CLICK
    assert (link.entanglement.detector_efficiency, link.entanglement.visibility) == (0.9, 0.95)
    app = s.app("epr-test-0")
    assert app.kind == "epr-test" and app.nodes == ("alice", "bob") and app.pairs == 5000  # type: ignore[attr-defined]
    bounds = {e.metric: (e.min, e.max) for e in s.expect}
    assert bounds == {"pairs_measured": (5000, None), "fidelity": (0.925, None), "chsh": (2.45, None),
                      "pair_rate_hz": (4900, None)}


def test_quickstart_expectations_bracket_the_model_values() -> None:
    # The values the quickstart's comment derives; the bounds must admit them.
    s = load_scenario(QUICKSTART)
    link = s.links[0]
    assert link.entanglement is not None
    eta = 10 ** (-link.attenuation_db_per_km * (link.length_km / 2) / 10) * link.entanglement.detector_efficiency
    rate_hz = (eta**2 / 2) / (link.length_km * 4.9e-6)
    v = link.entanglement.visibility
    model = {"fidelity": (1 + 3 * v) / 4, "chsh": 2 * math.sqrt(2) * v, "pair_rate_hz": rate_hz, "pairs_measured": 5000}
    assert rate_hz == pytest.approx(5215.06, abs=0.01)
    for e in s.expect:
        assert e.holds(model[e.metric]), (e.metric, model[e.metric])
    # The rate bound sits about 5 relative standard errors, sqrt((1 - p)/n), below the model.
    p, n = eta**2 / 2, 5000
    rate = next(e for e in s.expect if e.metric == "pair_rate_hz")
    assert rate.min is not None and 4 <= (1 - rate.min / rate_hz) / math.sqrt((1 - p) / n) <= 6


def test_round_trip_through_json() -> None:
    s = load_scenario(QUICKSTART)
    text = json.dumps(scenario_to_dict(s), allow_nan=False)  # strict JSON: inf is written "inf"
    back = scenario_from_dict(json.loads(text))
    assert back == s
    assert scenario_to_dict(back) == scenario_to_dict(s)
    # The normalised form is itself a valid scenario file.
    assert parse_scenario(yaml.safe_dump(scenario_to_dict(s))) == s


def test_scenario_is_frozen() -> None:
    s = parse_scenario(MINIMAL)
    with pytest.raises(pydantic.ValidationError):
        s.name = "other"  # type: ignore[misc]
    with pytest.raises(TypeError):
        s.nodes["carol"] = s.nodes["alice"]  # type: ignore[index]
    assert isinstance(s.links, tuple)
    assert hash(s) == hash(parse_scenario(MINIMAL)) and len({s, parse_scenario(MINIMAL)}) == 1


def test_helpers() -> None:
    s = parse_scenario(MINIMAL)
    assert s.link("alice", "carol") is None
    with pytest.raises(KeyError):
        s.app("nope")
    topo = s.topology()
    assert topo.linked("bob", "alice") and frozenset({"alice", "bob"}) in topo.entangling
    assert Scenario.metric_names() == tuple(sorted(METRICS))
    assert {name for name, spec in METRICS.items() if spec.app_kinds == {"epr-test"}} == {
        "chsh", "fidelity", "pair_rate_hz", "pairs_measured"}
    assert set(APP_KINDS) == {"epr-test", "qkd", "tunnel"} and topo.qkd == {} and topo.saes is None


def test_app_names_default_to_kind_and_index() -> None:
    s = parse_scenario(MINIMAL + "  - {kind: epr-test, name: second, nodes: [bob, alice], pairs: 1}\n"
                                 "  - {kind: epr-test, nodes: [bob, alice], pairs: 1}\n")
    assert [a.name for a in s.apps] == ["epr-test-0", "second", "epr-test-2"]


def test_defaults_merge_field_by_field() -> None:
    s = parse_scenario(MINIMAL.replace("nodes:\n  alice: {}\n  bob: {}\n", """\
defaults:
  memory: {qubits: 8, t1: 1s, t2: 1s}
  link: {attenuation_db_per_km: 0.3, classical: {jitter: 1ms}}
nodes:
  alice:
    memory: {qubits: 4}
  bob:
""").replace("length_km: 10", "length_km: 10\n    classical: {udp_loss: 0.5}"))
    alice, bob = s.nodes["alice"].memory, s.nodes["bob"].memory
    assert (alice.qubits, alice.t1_s, alice.t2_s) == (4, 1.0, 1.0)
    assert (bob.qubits, bob.t1_s, bob.t2_s) == (8, 1.0, 1.0)
    link = s.links[0]
    assert link.attenuation_db_per_km == 0.3
    assert (link.classical.jitter_s, link.classical.udp_loss) == (1e-3, 0.5)


def test_a_bad_default_is_reported_once() -> None:
    p = only_problem(MINIMAL.replace("nodes:\n", "defaults: {memory: {qubits: 0}}\nnodes:\n", 1))
    assert (p.line, p.field) == (3, "defaults.memory.qubits")


def test_merged_defaults_are_checked_at_the_node() -> None:
    p = only_problem(MINIMAL.replace("nodes:\n  alice: {}\n  bob: {}\n", """\
defaults:
  memory: {t1: 1s, t2: 1s}
nodes:
  alice: {}
  bob:
    memory: {t1: 10ms}
"""))
    assert (p.line, p.field) == (8, "nodes.bob.memory.t2")
    assert "2·T1" in p.message


def test_t2_defaults_to_twice_t1() -> None:
    s = parse_scenario(MINIMAL.replace("alice: {}", "alice: {memory: {t1: 3ms}}"))
    assert s.nodes["alice"].memory.t2_s == pytest.approx(6e-3)
    assert math.isinf(s.nodes["bob"].memory.t2_s)


# --------------------------------------------------------------------------- units

DURATIONS = [
    (0, 0.0), (5, 5.0), (2.5, 2.5), ("30s", 30.0), ("250ms", 0.25), ("1.5us", 1.5e-6), ("1.5µs", 1.5e-6),
    ("1.5\u03bcs", 1.5e-6), ("10ns", 1e-8), ("2min", 120.0), ("1h", 3600.0), ("1e-3s", 1e-3), ("1e3", 1000.0),
    (" 4 s ", 4.0), ("+.5s", 0.5),
]
FREQUENCIES = [
    (50, 50.0), ("1e9", 1e9), ("1GHz", 1e9), ("10MHz", 1e7), ("1kHz", 1e3), ("50Hz", 50.0), ("2.5e3 Hz", 2500.0),
]


@pytest.mark.parametrize(("text", "seconds"), DURATIONS)
def test_durations(text: Any, seconds: float) -> None:
    assert units.parse_duration_s(text) == pytest.approx(seconds, rel=1e-12, abs=0)


@pytest.mark.parametrize(("text", "hertz"), FREQUENCIES)
def test_frequencies(text: Any, hertz: float) -> None:
    assert units.parse_frequency_hz(text) == pytest.approx(hertz, rel=1e-12)


@pytest.mark.parametrize("text", ["5 parsecs", "10 sec", "1S", "ms", "1.2.3s", "-1s", "inf", True, None, [1], "nan",
                                  float("nan"), "1e400s", "s5"])
def test_bad_durations(text: Any) -> None:
    with pytest.raises(units.UnitError):
        units.parse_duration_s(text)


@pytest.mark.parametrize("text", ["1 GHZ", "1mHz", "1 bananas", 0, -5, "1e999", False, "Hz"])
def test_bad_frequencies(text: Any) -> None:
    with pytest.raises(units.UnitError):
        units.parse_frequency_hz(text)


def test_bad_unit_messages_name_the_accepted_suffixes() -> None:
    with pytest.raises(units.UnitError, match=r"s, ms, us, µs, ns, min, h"):
        units.parse_duration_s("3 fortnights")
    with pytest.raises(units.UnitError, match=r"Hz, kHz, MHz, GHz"):
        units.parse_frequency_hz("3 rpm")


@pytest.mark.parametrize(("value", "expected"), [("inf", math.inf), (".inf", math.inf), (math.inf, math.inf),
                                                  ("Infinity", math.inf), ("2s", 2.0), (1, 1.0)])
def test_lifetimes(value: Any, expected: float) -> None:
    assert units.parse_lifetime_s(value) == expected


@pytest.mark.parametrize("value", [0, "0s", "-inf", -math.inf, "forever"])
def test_bad_lifetimes(value: Any) -> None:
    with pytest.raises(units.UnitError):
        units.parse_lifetime_s(value)


@pytest.mark.parametrize(("value", "ok"), [(0, True), (1, True), ("0.5", True), (0.25, True), (1.01, False),
                                            (-0.1, False), (True, False), ("half", False)])
def test_probabilities(value: Any, ok: bool) -> None:
    if ok:
        assert 0 <= units.parse_probability(value) <= 1
    else:
        with pytest.raises(units.UnitError):
            units.parse_probability(value)


@pytest.mark.parametrize(("value", "expected"), [(3, 3), ("1e3", 1000), (2.0, 2), ("42", 42), (10**30, 10**30)])
def test_counts(value: Any, expected: int) -> None:
    assert units.parse_count(value) == expected


@pytest.mark.parametrize("value", [2.5, "2.5", True, "many", math.inf, "1e400"])
def test_bad_counts(value: Any) -> None:
    with pytest.raises(units.UnitError):
        units.parse_count(value)


def test_numeric_strings_where_numbers_are_expected() -> None:
    # PyYAML reads 1e1 (no dot) as a string; it must still count as a number.
    s = parse_scenario(MINIMAL.replace("length_km: 10", "length_km: 1e1").replace("pairs: 10", "pairs: 1e1"))
    assert s.links[0].length_km == 10.0 and s.apps[0].pairs == 10  # type: ignore[attr-defined]


def test_bad_unit_in_a_file_names_the_suffixes() -> None:
    p = only_problem(MINIMAL.replace("duration: 10s", "duration: 10 parsecs"))
    assert (p.line, p.column, p.field) == (2, 11, "duration")
    assert "s, ms, us, µs, ns, min, h" in p.message


def test_unit_in_a_unit_named_field_is_rejected() -> None:
    p = only_problem(MINIMAL.replace("length_km: 10", "length_km: 10km"))
    assert (p.line, p.field) == (8, "links[0].length_km")


# --------------------------------------------------------------------------- bad-input fixtures

_ERROR_MARK = re.compile(r"#\s*ERROR\s+(\S+)\s*$")


def expected_problems(path: Path) -> set[tuple[int, str]]:
    found = set()
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        match = _ERROR_MARK.search(line)
        if match:
            found.add((number, "" if match[1] == "-" else match[1]))
    return found


FIXTURE_MESSAGES = {
    "typo_field.yaml": {"links[0].lenght_km": "did you mean 'length_km'"},
    "unknown_node.yaml": {"links[1].endpoints[1]": "unknown node 'carol'"},
    "duplicate_link.yaml": {"links[1].endpoints": "duplicate link between 'bob' and 'alice'"},
    "self_link.yaml": {"links[1].endpoints[1]": "two different nodes"},
    "t2_above_2t1.yaml": {"nodes.alice.memory.t2": "must be <= 2·T1"},
    "missing_required.yaml": {"duration": "missing required field 'duration'",
                              "links[0].length_km": "missing required field 'length_km'"},
    "yaml_syntax.yaml": {"": "YAML syntax error"},
    "wrong_type.yaml": {"nodes.alice.external": "boolean", "apps[0].pairs": "integer"},
    "many_errors.yaml": {"links[1].qkd.protocol": "unknown field 'protocol'", "apps[1].kind": "unknown kind 'teleport'",
                         "expect[0].metric": "unknown metric 'throughput'", "expect[1].app": "unknown app 'nobody'"},
}


def test_every_fixture_is_listed() -> None:
    assert {p.name for p in FIXTURES.glob("*.yaml")} == set(FIXTURE_MESSAGES)


@pytest.mark.parametrize("name", sorted(FIXTURE_MESSAGES))
def test_bad_fixture(name: str) -> None:
    path = FIXTURES / name
    with pytest.raises(ScenarioError) as info:
        load_scenario(path)
    problems = info.value.problems
    assert {(p.line, p.field) for p in problems} == expected_problems(path), str(info.value)
    assert all(p.file == str(path) and p.column >= 1 for p in problems)
    for field, fragment in FIXTURE_MESSAGES[name].items():
        assert any(p.field == field and fragment in p.message for p in problems), (field, str(info.value))
    assert list(problems) == sorted(problems, key=lambda p: (p.line, p.column)), "problems are in file order"


def test_many_errors_are_all_reported() -> None:
    path = FIXTURES / "many_errors.yaml"
    with pytest.raises(ScenarioError) as info:
        load_scenario(path)
    assert len(info.value.problems) == len(expected_problems(path)) >= 10


def test_error_rendering() -> None:
    with pytest.raises(ScenarioError) as info:
        load_scenario(FIXTURES / "typo_field.yaml")
    line = str(info.value)
    assert line == (f"{FIXTURES / 'typo_field.yaml'}:10:5: links[0].lenght_km: "
                    "unknown field 'lenght_km'; did you mean 'length_km'?")
    assert len(str(pytest.raises(ScenarioError, load_scenario, FIXTURES / "many_errors.yaml").value).splitlines()) == 12
    assert str(Problem("f", 0, 0, "", "cannot read")) == "f: cannot read"


def test_scenario_error_pickles() -> None:
    with pytest.raises(ScenarioError) as info:
        load_scenario(FIXTURES / "many_errors.yaml")
    back = pickle.loads(pickle.dumps(info.value))
    assert back.problems == info.value.problems and str(back) == str(info.value)


# --------------------------------------------------------------------------- more bad input


@pytest.mark.parametrize(
    ("text", "line", "field", "fragment"),
    [
        ("name: x\nname: y\nduration: 1\nnodes: {a: , b: }\n", 2, "name", "duplicate key 'name' (first at line 1)"),
        ("name: !!python/object/apply:os.system ['true']\n", 1, "", "could not determine a constructor"),
        ("", 1, "", "empty"),
        ("- a\n- b\n", 1, "", "expected a mapping"),
        ("name: x\n\tduration: 1\n", 2, "", "YAML syntax error"),
        ("name: x\x00\n", 1, "", "YAML syntax error"),
        ("a: &a [*a]\n", 1, "", "recursive"),
        ("a: " + "[" * 40 + "]" * 40 + "\n", 1, "", "nested too deeply"),
        ("---\nname: x\n---\nname: y\n", 3, "", "single document"),
    ],
)
def test_bad_documents(text: str, line: int, field: str, fragment: str) -> None:
    problems = problems_of(text)
    assert any(p.line == line and p.field == field and fragment in p.message for p in problems), problems


def test_billion_laughs_is_rejected_without_expanding() -> None:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 30)]
    p = only_problem("\n".join(lines) + "\n")
    assert "too large" in p.message and "alias expansion" in p.message


def test_very_deep_nesting_does_not_crash() -> None:
    p = only_problem("a: " + "[" * 5000 + "]" * 5000 + "\n")
    assert "deep" in p.message


def test_file_limits(tmp_path: Path) -> None:
    big = tmp_path / "big.yaml"
    big.write_text("# " + "x" * loader_module.MAX_SCENARIO_BYTES + "\n")
    assert "too large" in pytest.raises(ScenarioError, load_scenario, big).value.problems[0].message
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes(b"name: x\ndescription: caf\xe9\n")
    p = pytest.raises(ScenarioError, load_scenario, latin1).value.problems[0]
    assert (p.line, p.message) == (2, "not valid UTF-8 text")
    missing = pytest.raises(ScenarioError, load_scenario, tmp_path / "nope.yaml").value.problems[0]
    assert missing.line == 0 and "cannot read" in missing.message


@pytest.mark.parametrize(
    ("old", "new", "line", "field", "fragment"),
    [
        ("entanglement: {}", "entanglement: {bright_state_alpha: 0.1}", 9,
         "links[0].entanglement.bright_state_alpha", "only to scheme single-click"),
        ("entanglement: {}", "entanglement: {scheme: single-click}", 9,
         "links[0].entanglement.bright_state_alpha", "needs bright_state_alpha"),
        ("entanglement: {}", "entanglement: {scheme: single-click, bright_state_alpha: 0.5}", 9,
         "links[0].entanglement.bright_state_alpha", "< 0.5"),
        ("entanglement: {}", "entanglement: {scheme: triple-click}", 9, "links[0].entanglement.scheme", "double-click"),
        ("entanglement: {}", "entanglement: {detector_efficiency: 0}", 9,
         "links[0].entanglement.detector_efficiency", "> 0"),
        ("    entanglement: {}\n", "", 10, "apps[0].nodes", "needs entanglement on the link"),
        ("nodes: [alice, bob], pairs", "nodes: [alice, carol], pairs", 11, "apps[0].nodes[1]", "unknown node 'carol'"),
        ("nodes: [alice, bob], pairs", "nodes: [alice, alice], pairs", 11, "apps[0].nodes[1]", "two different nodes"),
        ("nodes: [alice, bob], pairs", "nodes: [alice], pairs", 11, "apps[0].nodes[1]", "missing list item [1]"),
        ("nodes: [alice, bob], pairs", "nodes: [alice, bob, bob], pairs", 11, "apps[0].nodes", "at most 2 items"),
        ("pairs: 10}", "pairs: 10, start: 10s}", 11, "apps[0].start", "before the end of the run"),
        ("pairs: 10}", "pairs: 10, name: x}\n  - {kind: epr-test, name: x, nodes: [bob, alice], pairs: 1}", 12,
         "apps[1].name", "duplicate app name"),
        ("  bob: {}\n", "  bob: {role: router}\n", 5, "nodes.bob.role", "trusted-relay"),
        ("name: mini", "name: mini\nseed: -1", 2, "seed", "greater than or equal to 0"),
        ("name: mini", "name: mini\ntime_scale: 0", 2, "time_scale", "> 0"),
        ("name: mini", "name: mini\nsaes: []", 2, "saes", "unknown field 'saes'"),
        ("name: mini", "name: mini\nfaults: [{at: 1s, kind: fiber-cut, link: [alice, bob]}]", 2, "faults[0].kind",
         "'node-crash', 'node-restart', 'node-freeze', 'link-cut', 'fibre-cut', 'qkd-intercept-resend' or "
         "'qkd-pns'"),
        ("name: mini", "name: mini\nfault: []", 2, "fault", "did you mean 'faults'?"),
        ("length_km: 10", "length_km: 10\n    qkd: {protocol: bb84-decoy}", 9, "links[0].qkd.protocol",
         "unknown field 'protocol'"),
        ("  alice: {}", "  alice: {memory: {qubits: 5000}}", 4, "nodes.alice.memory.qubits", "4096"),
        ("  alice: {}", "  alice: {memory: {t1: never}}", 4, "nodes.alice.memory.t1", "inf"),
    ],
)
def test_bad_fields(old: str, new: str, line: int, field: str, fragment: str) -> None:
    assert old in MINIMAL
    problems = problems_of(MINIMAL.replace(old, new))
    assert len(problems) == 1 and (problems[0].line, problems[0].field) == (line, field), problems
    assert fragment in problems[0].message, problems[0].message


def test_a_bad_node_is_reported_with_its_consequences() -> None:
    problems = problems_of(MINIMAL.replace("  bob: {}\n", "  Bob: {}\n"))
    assert [(p.line, p.field) for p in problems] == [(5, "nodes.Bob"), (7, "links[0].endpoints[1]"),
                                                     (11, "apps[0].nodes[1]")]
    assert "invalid name 'Bob'" in problems[0].message and "unknown node 'bob'" in problems[1].message
    problems = problems_of(MINIMAL.replace("  bob: {}\n", ""))
    assert (problems[0].line, problems[0].field) == (3, "nodes") and "at least 2" in problems[0].message


@pytest.mark.parametrize(
    ("expect", "field", "fragment"),
    [
        ("{metric: fidelity, min: 0.9}", "expect[0]", "add `app: <name>`"),
        ("{metric: fidelity, app: epr-test-7, min: 0.9}", "expect[0].app", "unknown app 'epr-test-7'"),
        ("{metric: fidelity, app: epr-test-0, min: 0.9, max: 0.8}", "expect[0].max", "below min"),
        ("{metric: fidelity, app: epr-test-0}", "expect[0]", "min, max or both"),
        ("{metric: throughput, app: epr-test-0, max: 0.1}", "expect[0].metric", "unknown metric 'throughput'"),
        ("{metric: qber, app: epr-test-0, max: 0.1}", "expect[0].metric", "(epr-test) does not produce metric 'qber'"),
        ("{metric: fidelity, link: [alice, bob], min: 0.9}", "expect[0].link", "unknown field 'link'"),
    ],
)
def test_bad_expectations(expect: str, field: str, fragment: str) -> None:
    p = only_problem(MINIMAL + f"expect:\n  - {expect}\n")
    assert (p.line, p.field) == (13, field) and fragment in p.message, p


def test_lines_follow_anchors_and_merge_keys() -> None:
    text = MINIMAL.replace("    entanglement: {}\n", "    entanglement: &ent {visibility: 0.9}\n").replace(
        "apps:", "  - endpoints: [bob, carol]\n    length_km: 1\n    entanglement: {<<: *ent, visibilty: 1}\napps:"
    ).replace("  bob: {}\n", "  bob: {}\n  carol: {}\n")
    p = only_problem(text)
    assert (p.line, p.field) == (13, "links[1].entanglement.visibilty") and "did you mean 'visibility'" in p.message
    s = parse_scenario(text.replace("visibilty: 1", "detector_efficiency: 0.5"))
    assert s.links[1].entanglement is not None and s.links[1].entanglement.visibility == 0.9
    # A key next to a merge overrides the merged one (YAML merge keys); it is no duplicate.
    s = parse_scenario(text.replace("visibilty: 1", "visibility: 0.8"))
    assert s.links[1].entanglement is not None and s.links[1].entanglement.visibility == 0.8
    assert s.links[0].entanglement is not None and s.links[0].entanglement.visibility == 0.9


def test_from_dict_reports_paths_without_lines() -> None:
    data = scenario_to_dict(parse_scenario(MINIMAL))
    data["links"][0]["length_km"] = -1
    data["links"][0]["endpoints"] = ["alice", "zed"]
    with pytest.raises(ScenarioError) as info:
        scenario_from_dict(data, source="run/scenario.json")
    assert {(p.line, p.field) for p in info.value.problems} == {
        (0, "links[0].length_km"), (0, "links[0].endpoints[1]"), (0, "apps[0].nodes")}
    assert str(info.value).splitlines()[1] == "run/scenario.json: links[0].endpoints[1]: unknown node 'zed' (declared nodes: alice, bob)"


def test_direct_construction_runs_the_cross_checks() -> None:
    data = yaml.safe_load(MINIMAL)
    data["links"][0]["endpoints"] = ["alice", "zed"]
    with pytest.raises(pydantic.ValidationError, match="unknown node 'zed'"):
        Scenario.model_validate(data)


def test_expectation_holds() -> None:
    e = parse_scenario(MINIMAL + "expect:\n  - {metric: fidelity, app: epr-test-0, min: 0.5, max: 0.9}\n").expect[0]
    assert e.holds(0.5) and e.holds(0.9) and not e.holds(0.95) and not e.holds(0.4) and not e.holds(math.nan)


def test_register_metric_extends_expectations() -> None:
    spec = MetricSpec("test_only_metric", MetricScope.APP, "", "A metric registered by a test.", frozenset({"epr-test"}))
    text = MINIMAL + "expect:\n  - {metric: test_only_metric, app: epr-test-0, min: 1}\n"
    assert "unknown metric" in only_problem(text).message
    register_metric(spec)
    try:
        assert parse_scenario(text).expect[0].metric == "test_only_metric"
        assert "test_only_metric" in Scenario.metric_names()
        with pytest.raises(ValueError, match="already registered"):
            register_metric(spec)
    finally:
        del METRICS["test_only_metric"]


# --------------------------------------------------------------------------- fuzzing

_TOKENS = [
    "name:", "duration:", "nodes:", "links:", "apps:", "expect:", "defaults:", "memory:", "t1:", "t2:", "endpoints:",
    "length_km:", "entanglement:", "scheme:", "kind:", "epr-test", "pairs:", "metric:", "app:", "min:", "max:",
    "alice", "bob", "- ", "  ", "\n", "\n  ", "\n    ", "[", "]", "{", "}", ",", ":", "&a ", "*a", "<<: ", "!!str ",
    "!!python/object:os.system ", "1e9", "30s", "inf", ".nan", "-1", "0", "1", "2.5", "true", "null", "~", "'", '"',
    "#", "?", "|", ">", "%YAML 1.1\n", "---\n", "...\n", "\t", "\x00", "é", "µs",
]


@settings(max_examples=300, derandomize=True, deadline=None)
@given(st.text(max_size=200))
def test_fuzz_arbitrary_text(text: str) -> None:
    try:
        parse_scenario(text)
    except ScenarioError as err:
        assert err.problems
        assert all(p.line >= 0 and p.column >= 0 and p.message for p in err.problems)


@settings(max_examples=300, derandomize=True, deadline=None)
@given(st.lists(st.sampled_from(_TOKENS), max_size=60).map("".join))
def test_fuzz_yaml_ish_text(text: str) -> None:
    try:
        parse_scenario(MINIMAL + text)
    except ScenarioError as err:
        assert err.problems
    try:
        parse_scenario(text)
    except ScenarioError as err:
        assert err.problems


_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.sampled_from(["30s", "1e9", "1GHz", "inf", "alice", "bob", "epr-test", "single-click", "fidelity", "-1ms"]),
)
_VALUES = st.recursive(
    _SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.one_of(st.text(max_size=8), st.sampled_from(["name", "kind", "memory", "t2"]),
                                  st.integers(0, 3)), inner, max_size=3),
    ),
    max_leaves=8,
)


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += _paths(v, (*prefix, i))
    return out


def _mutate(data: dict[str, Any], draw: Any) -> Any:
    for _ in range(draw(st.integers(1, 3))):
        paths = _paths(data)
        path = draw(st.sampled_from(paths))
        action = draw(st.sampled_from(["replace", "delete", "add"]))
        if not path:
            if action == "replace":
                return draw(_VALUES)
            continue
        parent = data
        for k in path[:-1]:
            parent = parent[k]
        last = path[-1]
        if action == "replace":
            parent[last] = draw(_VALUES)
        elif action == "delete":
            del parent[last]
        elif isinstance(parent[last], dict):
            parent[last][draw(st.text(max_size=8))] = draw(_VALUES)
        elif isinstance(parent[last], list):
            parent[last].append(draw(_VALUES))
    return data


# The quickstart as written (units as text) and in normalised form (SI numbers).
_QUICKSTART_SOURCES = (yaml.safe_load(QUICKSTART.read_text(encoding="utf-8")), scenario_to_dict(load_scenario(QUICKSTART)))


@settings(max_examples=100, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_fuzz_mutated_quickstart(data: st.DataObject) -> None:
    for source in _QUICKSTART_SOURCES:
        mutated = _mutate(copy.deepcopy(source), data.draw)
        try:
            scenario_from_dict(mutated)
        except ScenarioError as err:
            assert err.problems
        try:
            text = yaml.safe_dump(mutated, allow_unicode=True)
        except yaml.YAMLError:
            continue
        try:
            parse_scenario(text)
        except ScenarioError as err:
            assert err.problems and all(p.line >= 1 for p in err.problems), str(err)


# --------------------------------------------------------------------------- docs


def test_docs_reference_is_in_sync() -> None:
    doc = DOC.read_text(encoding="utf-8")
    assert BEGIN_MARKER in doc and END_MARKER in doc
    assert replace_generated_section(doc, render_reference()) == doc, (
        "docs/scenarios.md is out of date with the schema; regenerate it with\n"
        "    python -m emulator.scenario.schema --write docs/scenarios.md"
    )


def test_reference_documents_every_field() -> None:
    reference = render_reference()
    for model in (Scenario, *APP_KINDS.values()):
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no description"
            assert f"| `{field.alias or name}` |" in reference


# --------------------------------------------------------------------------- QKD: links[].qkd and the qkd app

QKD = """\
name: qkd
duration: 10s
nodes:
  alice: {}
  bob: {}
links:
  - endpoints: [alice, bob]
    length_km: 25
    attenuation_db_per_km: 0.21
    qkd: {}
apps:
  - {kind: qkd, nodes: [alice, bob], duration: 5s}
"""
QKD_APP_LINE = 12


def test_qkd_defaults_are_the_gys_set_with_decoy_heavy_classes() -> None:
    from emulator.scenario import QkdLink
    from emulator.scenario import qkd_params as d

    s = parse_scenario(QKD)
    (link,) = s.links
    q = link.qkd
    assert isinstance(q, QkdLink) and link.entanglement is None
    assert q.transmitter is None and link.qkd_transmitter == "alice"  # the first endpoint by default
    assert q.pulse_rate_hz == 1e9
    i = q.intensities
    assert (i.signal, i.decoy, i.vacuum) == (0.48, 0.05, 0.0) == d.DEFAULT_INTENSITIES
    # Not the optics module's 0.8/0.1/0.1 (see qkd_params: finite-key bounds need the decoy share)
    cp = q.class_probabilities
    assert (cp.signal, cp.decoy, cp.vacuum) == (0.5, 0.25, 0.25) == d.DEFAULT_CLASS_PROBABILITIES
    assert (q.basis_z_probability, q.bob_basis_z_probability) == (0.5, None)
    assert (q.receiver_efficiency, q.dark_count_probability, q.misalignment_error, q.dead_time_s) == (
        0.045, 1.7e-6, 0.033, 0.0)
    (app,) = s.apps
    assert (app.kind, app.name, app.nodes, app.duration_s, app.key_bits) == (
        "qkd", "qkd-0", ("alice", "bob"), 5.0, None)
    assert (app.block_bits, app.cascade.value, app.epsilon_sec, app.epsilon_cor) == (
        1_000_000, "original", 1e-10, 1e-15)
    assert (app.qber_threshold, app.sample_fraction) == (0.11, 0.05)
    assert s.topology().qkd == {frozenset({"alice", "bob"}): "alice"}


def test_qkd_fields_take_units_and_round_trip() -> None:
    text = QKD.replace("qkd: {}", (
        "qkd: {transmitter: bob, pulse_rate_hz: 2.5GHz, intensities: {signal: 0.6, decoy: 0.1, vacuum: 0.001}, "
        "class_probabilities: {signal: 0.7, decoy: 0.2, vacuum: 0.1}, basis_z_probability: 0.9, "
        "bob_basis_z_probability: 0.8, receiver_efficiency: 0.1, dark_count_probability: 1e-5, "
        "misalignment_error: 0.01, dead_time: 50ns}"
    )).replace("nodes: [alice, bob], duration: 5s}", (
        "nodes: [bob, alice], start: 1s, key_bits: 1e6, block_bits: 1e5, cascade: opt8, epsilon_sec: 1e-9, "
        "epsilon_cor: 1e-12, qber_threshold: 0.08, sample_fraction: 0.1}"
    ))
    s = parse_scenario(text)
    q = s.links[0].qkd
    assert q is not None and s.links[0].qkd_transmitter == "bob"
    assert (q.pulse_rate_hz, q.dead_time_s, q.bob_basis_z_probability) == (2.5e9, pytest.approx(50e-9), 0.8)
    app = s.apps[0]
    assert (app.nodes, app.start_s, app.duration_s, app.key_bits, app.block_bits) == (
        ("bob", "alice"), 1.0, None, 1_000_000, 100_000)
    assert (app.cascade.value, app.epsilon_sec, app.epsilon_cor, app.qber_threshold, app.sample_fraction) == (
        "opt8", 1e-9, 1e-12, 0.08, 0.1)
    data = scenario_to_dict(s)
    assert data["links"][0]["qkd"]["dead_time"] == pytest.approx(50e-9)
    assert data["apps"][0]["cascade"] == "opt8" and data["apps"][0]["duration"] is None
    assert scenario_from_dict(json.loads(json.dumps(data, allow_nan=False))) == s
    assert parse_scenario(yaml.safe_dump(data)) == s


def test_cascade_variants_are_the_nodes_own() -> None:
    from emulator.scenario import CascadeVariant
    from emulator.scenario import qkd_params as d
    from nodes.qkd.cascade import CascadeVariant as NodeVariant

    assert [v.value for v in CascadeVariant] == [v.value for v in NodeVariant] == list(d.CASCADE_VARIANTS)


def test_a_link_may_carry_qkd_and_entanglement_and_host_both_apps() -> None:
    text = QKD.replace("    qkd: {}\n", "    qkd: {}\n    entanglement: {}\n") + (
        "  - {kind: epr-test, nodes: [bob, alice], pairs: 10}\n")
    s = parse_scenario(text)
    assert s.links[0].qkd is not None and s.links[0].entanglement is not None
    assert [a.kind for a in s.apps] == ["qkd", "epr-test"]


def test_qkd_key_bits_alone_is_enough() -> None:
    s = parse_scenario(QKD.replace("duration: 5s}", "key_bits: 100000}"))
    assert (s.apps[0].duration_s, s.apps[0].key_bits) == (None, 100_000)


@pytest.mark.parametrize(
    ("old", "new", "line", "field", "fragment"),
    [
        # the link's qkd section
        ("qkd: {}", "qkd: {protocol: bb84}", 10, "links[0].qkd.protocol", "unknown field 'protocol'"),
        ("qkd: {}", "qkd: {lenght_km: 3}", 10, "links[0].qkd.lenght_km", "unknown field 'lenght_km'"),
        ("qkd: {}", "qkd: {transmitter: carol}", 10, "links[0].qkd.transmitter",
         "the transmitter must be an endpoint of the link ('alice' or 'bob'), got 'carol'"),
        ("qkd: {}", "qkd: {intensities: {signal: 0.1, decoy: 0.2}}", 10, "links[0].qkd.intensities",
         "signal > decoy + vacuum and decoy > vacuum"),
        ("qkd: {}", "qkd: {intensities: {signal: 0.5, decoy: 0.3, vacuum: 0.3}}", 10, "links[0].qkd.intensities",
         "signal > decoy + vacuum"),
        ("qkd: {}", "qkd: {intensities: {signal: 11}}", 10, "links[0].qkd.intensities.signal", "10"),
        ("qkd: {}", "qkd: {intensities: {sgnal: 0.5}}", 10, "links[0].qkd.intensities.sgnal", "did you mean 'signal'"),
        ("qkd: {}", "qkd: {class_probabilities: {signal: 0.6}}", 10, "links[0].qkd.class_probabilities",
         "signal + decoy + vacuum must be 1, got 1.1"),
        ("qkd: {}", "qkd: {class_probabilities: {signal: 0.75, vacuum: 0}}", 10,
         "links[0].qkd.class_probabilities.vacuum", "greater than 0"),
        ("qkd: {}", "qkd: {basis_z_probability: 1}", 10, "links[0].qkd.basis_z_probability", "> 0 and < 1"),
        ("qkd: {}", "qkd: {bob_basis_z_probability: 0}", 10, "links[0].qkd.bob_basis_z_probability", "> 0 and < 1"),
        ("qkd: {}", "qkd: {receiver_efficiency: 0}", 10, "links[0].qkd.receiver_efficiency", "> 0 and <= 1"),
        ("qkd: {}", "qkd: {dark_count_probability: 1}", 10, "links[0].qkd.dark_count_probability", "less than 1"),
        ("qkd: {}", "qkd: {misalignment_error: 0.6}", 10, "links[0].qkd.misalignment_error", "0.5"),
        ("qkd: {}", "qkd: {pulse_rate_hz: 0}", 10, "links[0].qkd.pulse_rate_hz", "frequency must be > 0"),
        ("qkd: {}", "qkd: {dead_time: -1ns}", 10, "links[0].qkd.dead_time", ">= 0"),
        ("qkd: {}", "qkd: bb84", 10, "links[0].qkd", "expected a mapping"),
        # the app
        ("nodes: [alice, bob], duration", "nodes: [bob, alice], duration", QKD_APP_LINE, "apps[0].nodes",
         "the first node of a qkd app is the link's QKD transmitter 'alice' (it initiates); write nodes: [alice, bob]"),
        ("    qkd: {}\n", "    entanglement: {}\n", QKD_APP_LINE, "apps[0].nodes",
         "qkd needs a QKD link between 'alice' and 'bob'; give that link a `qkd` section"),
        ("nodes: [alice, bob], duration", "nodes: [alice, carol], duration", QKD_APP_LINE, "apps[0].nodes[1]",
         "unknown node 'carol'"),
        ("nodes: [alice, bob], duration", "nodes: [alice, alice], duration", QKD_APP_LINE, "apps[0].nodes[1]",
         "two different nodes"),
        (", duration: 5s}", "}", QKD_APP_LINE, "apps[0]", "needs `duration`, `key_bits` or both"),
        ("duration: 5s}", "duration: 10s}", QKD_APP_LINE, "apps[0].duration",
         "runs until 10 s, not before the end of the run (10 s)"),
        ("duration: 5s}", "duration: 5s, start: 6s}", QKD_APP_LINE, "apps[0].duration", "runs until 11 s"),
        ("duration: 5s}", "duration: 0s}", QKD_APP_LINE, "apps[0].duration", "must be > 0"),
        ("duration: 5s}", "duration: 5s, key_bits: 0}", QKD_APP_LINE, "apps[0].key_bits", "greater than or equal to 1"),
        ("duration: 5s}", "duration: 5s, block_bits: 9999}", QKD_APP_LINE, "apps[0].block_bits", "10000"),
        ("duration: 5s}", "duration: 5s, block_bits: 16777217}", QKD_APP_LINE, "apps[0].block_bits", "16777216"),
        ("duration: 5s}", "duration: 5s, cascade: turbo}", QKD_APP_LINE, "apps[0].cascade",
         "'original', 'yan', 'opt7' or 'opt8'"),
        ("duration: 5s}", "duration: 5s, epsilon_sec: 0}", QKD_APP_LINE, "apps[0].epsilon_sec", "> 0 and < 1"),
        ("duration: 5s}", "duration: 5s, epsilon_cor: 1}", QKD_APP_LINE, "apps[0].epsilon_cor", "> 0 and < 1"),
        ("duration: 5s}", "duration: 5s, qber_threshold: 0.6}", QKD_APP_LINE, "apps[0].qber_threshold", "0.5"),
        ("duration: 5s}", "duration: 5s, qber_threshold: 0}", QKD_APP_LINE, "apps[0].qber_threshold",
         "greater than 0"),
        ("duration: 5s}", "duration: 5s, sample_fraction: 1}", QKD_APP_LINE, "apps[0].sample_fraction", "> 0 and < 1"),
        ("duration: 5s}", "duration: 5s, pairs: 10}", QKD_APP_LINE, "apps[0].pairs", "unknown field 'pairs'"),
        ("duration: 5s}", "duration: 5s}\n  - {kind: qkd, name: again, nodes: [alice, bob], key_bits: 10}",
         QKD_APP_LINE + 1, "apps[1].nodes",
         "a second qkd app on the link between 'alice' and 'bob' (the first is apps[0], 'qkd-0'): the link's "
         "bootstrap authentication key serves one QKD session per link and run"),
        # expectations
        ("duration: 5s}", "duration: 5s}\nexpect:\n  - {metric: fidelity, app: qkd-0, min: 0.9}",
         QKD_APP_LINE + 2, "expect[0].metric", "app 'qkd-0' (qkd) does not produce metric 'fidelity'"),
    ],
)
def test_bad_qkd(old: str, new: str, line: int, field: str, fragment: str) -> None:
    assert old in QKD
    problems = problems_of(QKD.replace(old, new))
    assert len(problems) == 1 and (problems[0].line, problems[0].field) == (line, field), problems
    assert fragment in problems[0].message, problems[0].message


def test_a_broken_qkd_section_is_not_also_a_missing_one() -> None:
    # The app's link has a qkd section, broken: only the section is reported, not the app.
    for section in ("qkd: {transmitter: Bob}", "qkd: {transmitter: carol}", "qkd: [1, 2]"):
        problems = problems_of(QKD.replace("qkd: {}", section))
        assert [p.field.split(".")[0] for p in problems] == ["links[0]"], problems


def test_qkd_cross_checks_also_run_on_dicts_and_direct_construction() -> None:
    data = scenario_to_dict(parse_scenario(QKD))
    data["apps"][0]["nodes"] = ["bob", "alice"]
    with pytest.raises(ScenarioError) as info:
        scenario_from_dict(data, source="run/scenario.json")
    assert [p.field for p in info.value.problems] == ["apps[0].nodes"]
    with pytest.raises(pydantic.ValidationError, match="QKD transmitter 'alice'"):
        Scenario.model_validate(data)


def test_qkd_metrics_are_registered_for_qkd_apps() -> None:
    names = {
        "final_key_bits", "secret_key_rate_bps", "qber", "qber_x", "sifted_bits", "detections", "blocks_done",
        "blocks_aborted", "blocks_discarded", "alarms", "cascade_efficiency", "single_photon_yield_lower",
        "single_photon_error_upper", "key_rate_per_pulse", "auth_rejects", "detections_dropped",
        "net_key_bits",
    }  # fmt: skip
    assert {name for name, spec in METRICS.items() if spec.app_kinds == {"qkd"}} == names
    assert all(METRICS[n].scope is MetricScope.APP and METRICS[n].description for n in names)
    assert (METRICS["final_key_bits"].unit, METRICS["secret_key_rate_bps"].unit) == ("bits", "bit/s")
    text = QKD + "expect:\n" + "".join(f"  - {{metric: {n}, app: qkd-0, min: 0}}\n" for n in sorted(names))
    assert len(parse_scenario(text).expect) == len(names)


def test_broker_config_from_a_qkd_scenario() -> None:
    from emulator.broker.config import BrokerConfig
    from emulator.broker.optics import OpticalLinkConfig
    from emulator.physics import DecoyIntensities

    (link,) = BrokerConfig.from_scenario(parse_scenario(QKD)).links
    assert link.qkd is not None and link.entanglement is None
    assert (link.qkd.transmitter, link.qkd_receiver) == ("alice", "bob")
    # Every optics field from the scenario; fibre length and attenuation are the link's.
    assert link.qkd.optics == OpticalLinkConfig(
        length_km=25.0, pulse_rate_hz=1e9, intensities=DecoyIntensities(0.48, 0.05, 0.0),
        class_probabilities=(0.5, 0.25, 0.25), basis_z_probability=0.5, bob_basis_z_probability=None,
        attenuation_db_per_km=0.21, receiver_efficiency=0.045, dark_count_probability=1.7e-6,
        misalignment_error=0.033, dead_time_s=0.0,
    )  # fmt: skip
    text = QKD.replace("qkd: {}", "qkd: {transmitter: bob, bob_basis_z_probability: 0.7, dead_time: 10ns, "
                                  "intensities: {signal: 0.6, decoy: 0.2, vacuum: 0.01}}")
    text = text.replace("attenuation_db_per_km: 0.21", "attenuation_db_per_km: 0.2")
    text = text.replace("[alice, bob], duration", "[bob, alice], duration")
    (link,) = BrokerConfig.from_scenario(parse_scenario(text)).links
    assert link.qkd is not None and (link.qkd.transmitter, link.qkd_receiver) == ("bob", "alice")
    optics = link.qkd.optics
    assert (optics.bob_basis_z_probability, optics.dead_time_s, optics.attenuation_db_per_km) == (
        0.7, pytest.approx(10e-9), 0.2)
    assert optics.intensities == DecoyIntensities(0.6, 0.2, 0.01)
    assert BrokerConfig.from_scenario(parse_scenario(MINIMAL)).links[0].qkd is None


def test_reference_documents_qkd() -> None:
    reference = render_reference()
    for title in ("### QkdLink\n", "### QkdIntensities\n", "### QkdClassProbabilities\n", "### App `qkd`\n"):
        assert title in reference
    from emulator.scenario import QkdClassProbabilities, QkdIntensities, QkdLink

    for model in (QkdLink, QkdIntensities, QkdClassProbabilities):
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no description"
            assert f"| `{field.alias or name}` |" in reference
    assert "| `qkd` | [QkdLink](#qkdlink) (optional) | absent |" in reference
    assert "| `transmitter` | name (optional) | first endpoint |" in reference
    assert "0.8, 0.1, 0.1" in reference  # the class probabilities say why they differ from the optics module's
    assert "| `qber` | app | — | `qkd` |" in reference
