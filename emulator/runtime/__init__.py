"""Launching a scenario: the orchestrator's plan and timeline, admin sessions, the runtimes.

`run_scenario(RunOptions(...))` runs a scenario and returns a `RunOutcome` (exit code,
run directory, results). `orchestrator` and `faults` hold the sans-IO decisions;
`driver` the trio shell that drives a run; `admin_client` the client of admin
sessions; the deployments `local` (processes), `docker` (containers) and `conductor`
(a compose project started everything); `compose` writes compose projects; `image`
builds the container image; `cleanup` removes leftovers by label.
"""

from .admin_client import AdminClient, AdminConnectionError, AdminError, AdminRequestError, AdminTimeoutError
from .driver import InvalidInput, RunOptions, RunOutcome, RuntimeFailure, load_plan, run_scenario
from .orchestrator import (
    AppPlan,
    EmulatedClock,
    ExitCode,
    FinishReason,
    NodePlan,
    PlanError,
    RegistrationTracker,
    RunPlan,
    Timeline,
    plan_from_scenario,
)

__all__ = [
    "AdminClient", "AdminConnectionError", "AdminError", "AdminRequestError", "AdminTimeoutError",
    "AppPlan", "EmulatedClock", "ExitCode", "FinishReason", "InvalidInput", "NodePlan", "PlanError",
    "RegistrationTracker", "RunOptions", "RunOutcome", "RunPlan", "RuntimeFailure", "Timeline",
    "load_plan", "plan_from_scenario", "run_scenario",
]  # fmt: skip
