"""Scenario files: schema (pydantic), loader with file:line:col problems, units.

A scenario is data — validated, never executed (DESIGN §10, CONVENTIONS item 7).
Entry points::

    scenario = load_scenario("scenarios/two-node-epr.yaml")   # raises ScenarioError
    data = scenario_to_dict(scenario)                          # JSON-able, SI units
    same = scenario_from_dict(data)

The exports are resolved lazily (PEP 562) so that
``python -m emulator.scenario.schema`` (which regenerates docs/scenarios.md)
does not import the schema module twice.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from emulator.scenario.loader import (
        Problem,
        ScenarioError,
        load_scenario,
        parse_scenario,
        scenario_from_dict,
        scenario_to_dict,
    )
    from emulator.scenario.fault_kinds import FaultKind, FaultTarget
    from emulator.scenario.schema import (
        APP_KINDS,
        METRICS,
        App,
        AppBase,
        CascadeVariant,
        ClassicalLink,
        Defaults,
        Entanglement,
        EntanglementScheme,
        EprTest,
        Expectation,
        Fault,
        Link,
        LinkDefaults,
        Memory,
        MetricScope,
        MetricSpec,
        Node,
        QkdApp,
        QkdClassProbabilities,
        QkdIntensities,
        QkdLink,
        Role,
        Scenario,
        Topology,
        register_metric,
        render_reference,
    )

_EXPORTS: dict[str, str] = {
    **dict.fromkeys(
        ["Problem", "ScenarioError", "load_scenario", "parse_scenario", "scenario_from_dict", "scenario_to_dict"],
        "emulator.scenario.loader",
    ),
    **dict.fromkeys(
        [
            "APP_KINDS", "METRICS", "App", "AppBase", "CascadeVariant", "ClassicalLink", "Defaults", "Entanglement",
            "EntanglementScheme", "EprTest", "Expectation", "Fault", "Link", "LinkDefaults", "Memory", "MetricScope",
            "MetricSpec", "Node", "QkdApp", "QkdClassProbabilities", "QkdIntensities", "QkdLink", "Role", "Scenario",
            "Topology", "register_metric", "render_reference",
        ],
        "emulator.scenario.schema",
    ),
    **dict.fromkeys(["FaultKind", "FaultTarget"], "emulator.scenario.fault_kinds"),
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
