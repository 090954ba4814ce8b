"""Launching a scenario: the orchestrator's plan and timeline, admin sessions, the local runtime.

`run_scenario(RunOptions(...))` runs a scenario with local processes and returns a
`RunOutcome` (exit code, run directory, results). `orchestrator` holds the sans-IO
decisions; `admin_client` the trio client of admin sessions; `local` the processes.
"""

from .admin_client import AdminClient, AdminConnectionError, AdminError, AdminRequestError, AdminTimeoutError
from .local import InvalidInput, RunOptions, RunOutcome, RuntimeFailure, load_plan, run_scenario
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
