"""`python -m emulator.broker` reads a scenario as YAML (plugfests) or as a run directory's JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from emulator.broker.__main__ import load_config
from emulator.scenario import ScenarioError, load_scenario, scenario_to_dict

QUICKSTART = Path(__file__).resolve().parents[2] / "scenarios" / "two-node-epr.yaml"


def test_yaml_and_json_give_the_same_config(tmp_path: Path) -> None:
    as_json = tmp_path / "scenario.json"
    as_json.write_text(json.dumps(scenario_to_dict(load_scenario(QUICKSTART))))
    from_yaml = load_config(str(QUICKSTART))
    assert from_yaml == load_config(str(as_json))
    assert {n.name for n in from_yaml.nodes} == {"alice", "bob"}


def test_invalid_yaml_scenario_names_the_problem(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(QUICKSTART.read_text().replace("length_km: 10", "lenght_km: 10"))
    with pytest.raises(ScenarioError, match="lenght_km"):
        load_config(str(bad))
