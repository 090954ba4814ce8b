"""The conductor: the orchestrator's timeline driver for a deployment someone else started.

Theory of operation
-------------------
`qnetem compose` writes a compose project in which the broker and every node are
services started by `docker compose up` (or `docker stack deploy` on a swarm). The
conductor is one more service of that project: it is `RunDriver` with an
`AttachedDeployment`, which starts nothing and stops nothing. It

1. reads the scenario (the same file the broker reads) and the run tokens from its
   environment (`QNETEM_TOKEN`, `QNETEM_ADMIN_TOKEN`, from the project's env file),
2. retries the broker until it answers (services start in any order),
3. waits for every node to register, reaches each control endpoint at the node's
   management alias (`node-<name>`, see `docker.DockerNames.mgmt_alias`) and the port
   the node registered,
4. drives the timeline (apps and link cuts, which nodes make through their control
   endpoints), checks the expectations and writes results.json, events.jsonl and
   report.html into `--out` (a mounted directory), and exits with the run's status —
   which `docker compose up --exit-code-from conductor` passes on.

Faults that need the container engine (node crash, restart, freeze) are refused when
the project is generated; here they would be a runtime failure naming the runtimes that
implement them. The conductor leaves the broker and nodes running when it ends (with
`--abort-on-container-exit`, compose stops them once the conductor exits; asking them
to stop first would race the conductor's own exit); `--stop-services` asks them to
shut down first, which a swarm needs for its tasks to complete.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable
from pathlib import Path

from rich.console import Console

from .driver import (
    ADMIN_TOKEN_ENV,
    TOKEN_ENV,
    BrokerAccess,
    LaunchContext,
    RunDriver,
    RunOptions,
    RunOutcome,
    RuntimeFailure,
    default_console,
    prepare_run,
)
from .orchestrator import ExitCode

__all__ = ["RUN_ID_ENV", "AttachedDeployment", "ConductorOptions", "conduct", "parse_address"]

RUN_ID_ENV = "QNETEM_RUN_ID"  # set by `qnetem compose`; the run id of results.json and the labels


@dataclasses.dataclass(frozen=True, slots=True)
class ConductorOptions:
    scenario_path: Path
    broker: tuple[str, int]
    out_dir: Path
    node_host_format: str = "node-{name}"  # how a node's control endpoint is found by name
    broker_wait_s: float = 60.0
    registration_timeout_s: float = 120.0
    stop_services: bool = False
    quiet: bool = True


def parse_address(text: str) -> tuple[str, int]:
    """`host:port` → (host, port); ValueError with the reason."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{text!r} is not HOST:PORT")
    return host, int(port)


class AttachedDeployment:
    """The broker and nodes run already (compose or swarm services): start, watch and stop nothing."""

    cuts_links = False  # links are cut through the nodes' control endpoints

    kms_bind_host: str | None = "0.0.0.0"  # noqa: S104 - inside the container's own network namespace

    def __init__(self, context: LaunchContext, *, broker: tuple[str, int], node_host_format: str) -> None:
        self.context = context
        self.broker = broker
        self.node_host_format = node_host_format

    async def start_broker(self) -> BrokerAccess:
        return BrokerAccess(admin=self.broker, for_nodes=f"{self.broker[0]}:{self.broker[1]}")

    async def start_node(self, name: str, *, restart: bool = False) -> None:
        if restart:
            raise RuntimeFailure(
                f"cannot restart node {name}: node faults need `qnetem run --runtime docker` or the local runtime"
            )

    async def start_nodes(self, names: Iterable[str]) -> None:
        return None  # compose started them

    def control_address(self, name: str, reported: tuple[str, int]) -> tuple[str, int]:
        return (self.node_host_format.format(name=name), reported[1])

    def check(self, phase: str) -> None:
        return None  # no view of the containers: a dead node shows as a lost broker session

    async def settle(self, timeout_s: float) -> None:
        return None

    def expect_exit(self, name: str) -> None:
        return None

    async def _refuse(self, name: str, what: str) -> None:
        raise RuntimeFailure(f"cannot {what} node {name}: node faults need `qnetem run --runtime docker` or local")

    async def kill_node(self, name: str) -> None:
        await self._refuse(name, "crash")

    async def stop_node(self, name: str, grace_s: float) -> None:
        await self._refuse(name, "stop")

    async def freeze_node(self, name: str) -> None:
        await self._refuse(name, "freeze")

    async def thaw_node(self, name: str) -> None:
        await self._refuse(name, "thaw")

    async def cut_link(self, a: str, b: str) -> None:  # pragma: no cover - cuts_links is False
        raise RuntimeFailure("the conductor cuts links through the nodes' control endpoints")

    async def restore_link(self, a: str, b: str) -> None:  # pragma: no cover - cuts_links is False
        raise RuntimeFailure("the conductor restores links through the nodes' control endpoints")

    async def terminate(self, names: Iterable[str]) -> None:
        return None

    async def wait_exited(self, names: Iterable[str], timeout_s: float) -> None:
        return None

    async def stop_all(self, grace_s: float) -> None:
        return None

    def kill_all_now(self) -> None:
        return None


def conduct(options: ConductorOptions, *, console: Console | None = None) -> RunOutcome:
    """Drive a run whose broker and nodes were started by compose; never raises for user-facing failures."""
    tokens = {name: os.environ.get(name, "") for name in (TOKEN_ENV, ADMIN_TOKEN_ENV)}
    missing = [name for name, value in tokens.items() if not value]
    if missing:
        message = f"the conductor needs {' and '.join(missing)} in its environment (the compose project's env file)"
        return RunOutcome(ExitCode.INVALID_INPUT, None, None, message)
    prepared = prepare_run(options.scenario_path, options.out_dir)
    if isinstance(prepared, RunOutcome):
        return prepared
    run_options = RunOptions(
        scenario_path=options.scenario_path,
        out_dir=options.out_dir,
        quiet=options.quiet,
        live=False,
        registration_timeout_s=options.registration_timeout_s,
        port_file_timeout_s=options.broker_wait_s,
        runtime="compose",
    )

    def factory(context: LaunchContext) -> AttachedDeployment:
        return AttachedDeployment(context, broker=options.broker, node_host_format=options.node_host_format)

    driver = RunDriver(
        prepared, run_options, console or default_console(), factory,
        tokens=tokens, stop_processes=options.stop_services,
        run_id=os.environ.get(RUN_ID_ENV) or None,  # the compose project's labels carry the same id
    )  # fmt: skip
    return driver.run()
