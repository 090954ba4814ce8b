"""One run of a scenario, whatever starts its processes: the orchestrator's trio shell.

Theory of operation
-------------------
`RunDriver` is `qnetem run` minus argument parsing and minus process management:

1. the caller has loaded the scenario, built the `RunPlan` and created the run
   directory (`prepare_run`); the driver draws the run token and the admin token with
   `secrets` (they reach the broker and nodes only through their environment,
   `QNETEM_TOKEN` / `QNETEM_ADMIN_TOKEN`: never argv, logs, events or results);
2. a `Deployment` starts the broker (local process, container, or nothing when compose
   already did) and says where the orchestrator reaches it; the driver opens an admin
   session (its clock anchors emulated time), then asks the deployment to start every
   non-external node;
3. poll the broker's `status` until every node registered;
4. drive the `Timeline` and the `FaultSchedule` (emulated time from the broker clock):
   start apps at their offsets over each node's control session, apply and revert
   faults (the deployment kills, stops, pauses or cuts; the local runtime and the
   conductor cut links through the nodes' control endpoints; the `qkd-*` eavesdroppers
   are switched by the broker's admin session, `qkd_eve`, in every runtime, and a
   `fibre-cut` is a link cut plus the broker's `fibre_cut` on that link), poll app
   status every `poll_interval_s`, show live progress, stop when every app finished or
   `duration` elapsed;
5. collect stats, evaluate expectations, write `results.json` (with `series` and
   `faults`) and `events.jsonl`, render `report.html`.

Every failure on the way (a process exits unexpectedly, a session breaks, a timeout)
raises `RuntimeFailure`, which becomes exit 3 with one line naming the culprit and its
log. Shutdown always runs, shielded: revert freezes and cuts, ask our nodes then the
broker to shut down, then the deployment forces whatever is left and removes what it
created.

A node taken down by a fault is not a failure: its apps that were pending or running
are marked failed with the fault named, and when the fault restarts it, the driver
waits for it to register again (a fresh broker session), reconnects its control
session, and apps that start later use it as usual.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import json
import math
import os
import secrets
import signal
import time
import traceback
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol

import trio
from rich.console import Console

import emulator
from emulator.report.console import AppBar, RunProgress, print_summary
from emulator.report.events import EventKind, EventLog, iso_utc
from emulator.report.results import (
    AppOutcome,
    AppState,
    RunResults,
    RunStatus,
    evaluate_expectations,
    write_json_atomic,
)
from emulator.report.series import SeriesRecorder

from .admin_client import AdminClient, AdminError, AdminRequestError
from .faults import FaultAction, FaultSchedule, FaultStep
from .kms import KmsSetup, kms_metrics
from .orchestrator import (
    AppPlan,
    EmulatedClock,
    ExitCode,
    FaultKind,
    FaultPlan,
    FinishReason,
    PlanError,
    RegistrationTracker,
    RunPlan,
    Timeline,
    plan_from_scenario,
)

__all__ = [
    "ADMIN_TOKEN_ENV",
    "TOKEN_ENV",
    "BrokerAccess",
    "Deployment",
    "InvalidInput",
    "LaunchContext",
    "RunDriver",
    "RunOptions",
    "RunOutcome",
    "RuntimeFailure",
    "load_plan",
    "prepare_run",
]

TOKEN_ENV = "QNETEM_TOKEN"
ADMIN_TOKEN_ENV = "QNETEM_ADMIN_TOKEN"
EXTERNAL_ENV_FILE = "external.env"  # broker address and run tokens for external nodes

Address = tuple[str, int]


#: What a `qkd_block` event carries of a qkd app's block record (nodes/apps/qkd.py).
_BLOCK_EVENT_FIELDS = (
    "seq", "block", "outcome", "reason", "alarm", "pulses", "detections", "sifted_bits", "key_bits_in", "qber",
    "qber_x", "qber_by_class",
    "gains", "single_photon_yield_lower", "single_photon_error_upper", "cascade_efficiency", "leaked_bits",
    "frame_errors", "final_bits", "at_s",
)


class RuntimeFailure(Exception):
    """The run could not proceed (exit 3). The message is one line for the user."""


class InvalidInput(Exception):
    """The scenario or the options are invalid (exit 2). `problems` holds one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


# --------------------------------------------------------------------------- options and outcome


@dataclasses.dataclass(frozen=True, slots=True)
class RunOptions:
    scenario_path: Path
    out_dir: Path | None = None  # default: runs/<name>-<UTC timestamp> under the cwd
    backend: str | None = None  # "c" | "numpy" | None (broker default)
    quiet: bool = False
    live: bool | None = None  # live progress; None = when stdout is a terminal and not quiet
    registration_timeout_s: float | None = None  # None: 20 s local, 60 s docker, 600 s with external nodes
    port_file_timeout_s: float = 20.0
    poll_interval_s: float = 0.2
    request_timeout_s: float = 10.0
    shutdown_grace_s: float = 3.0
    runtime: str = "local"  # "local" | "docker"
    image: str | None = None  # docker runtime: the image (default qnetem:<version>, built if missing)
    # How a node process is started by the local runtime; the node's own arguments
    # follow. Tests and plugfests may substitute another implementation of the protocol.
    node_command: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True, slots=True)
class RunOutcome:
    exit_code: ExitCode
    run_dir: Path | None
    results: RunResults | None
    message: str | None = None  # one line (or one per problem for exit 2) for stderr


def load_plan(path: Path) -> tuple[Any, RunPlan]:
    """Load and validate a scenario file; raise `InvalidInput` with every problem."""
    from emulator.scenario import ScenarioError, load_scenario

    try:
        scenario = load_scenario(path)
    except ScenarioError as exc:
        problems = [line for line in str(exc).splitlines() if line.strip()]
        raise InvalidInput(problems or [f"{path}: invalid scenario"]) from None
    except OSError as exc:
        raise InvalidInput([f"{path}: cannot read: {exc.strerror or exc}"]) from None
    try:
        plan = plan_from_scenario(scenario)
    except PlanError as exc:
        raise InvalidInput([f"{path}: {exc}"]) from None
    return scenario, plan


def utc_stamp(epoch_s: float) -> str:
    return _dt.datetime.fromtimestamp(epoch_s, tz=_dt.UTC).strftime("%Y%m%dT%H%M%SZ")


def make_run_dir(out_dir: Path | None, name: str, stamp: str) -> Path:
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        return out_dir.resolve()
    base = Path.cwd() / "runs"
    base.mkdir(parents=True, exist_ok=True)
    for n in range(1, 1000):
        candidate = base / (f"{name}-{stamp}" if n == 1 else f"{name}-{stamp}-{n}")
        try:
            candidate.mkdir()
        except FileExistsError:
            continue
        return candidate.resolve()
    raise RuntimeFailure(f"cannot create a fresh run directory under {base}")


@dataclasses.dataclass(frozen=True, slots=True)
class PreparedRun:
    scenario: Any
    plan: RunPlan
    run_dir: Path
    started_wall: float


def prepare_run(path: Path, out_dir: Path | None) -> PreparedRun | RunOutcome:
    """Validate the scenario and create the run directory with `scenario.json` in it.

    Returns the failed `RunOutcome` (exit 2 or 3) when that is impossible.
    """
    try:
        scenario, plan = load_plan(path)
    except InvalidInput as exc:
        return RunOutcome(ExitCode.INVALID_INPUT, None, None, "\n".join(exc.problems))
    from emulator.scenario import scenario_to_dict

    started_wall = time.time()
    try:
        run_dir = make_run_dir(out_dir, plan.name, utc_stamp(started_wall))
    except OSError as exc:
        return RunOutcome(ExitCode.INVALID_INPUT, None, None, f"cannot create the run directory: {exc}")
    except RuntimeFailure as exc:
        return RunOutcome(ExitCode.RUNTIME_FAILURE, None, None, str(exc))
    # Written as is: the broker re-validates it (inf is the string "inf" in this form).
    (run_dir / "scenario.json").write_text(json.dumps(scenario_to_dict(scenario), indent=2) + "\n", encoding="utf-8")
    return PreparedRun(scenario, plan, run_dir, started_wall)


# --------------------------------------------------------------------------- deployments


@dataclasses.dataclass(frozen=True, slots=True)
class LaunchContext:
    """What a deployment needs to know about the run it launches."""

    plan: RunPlan
    run_dir: Path
    run_id: str
    tokens: Mapping[str, str]  # environment variable -> value; secrets, never in argv
    options: RunOptions
    emit: Callable[..., None]  # events.jsonl (already redacts the tokens)
    rel: Callable[[Path], str]  # a path as the user should see it


@dataclasses.dataclass(frozen=True, slots=True)
class BrokerAccess:
    admin: Address  # where the orchestrator opens its admin session
    for_nodes: str  # "host:port" as nodes (and external nodes) reach it


class Deployment(Protocol):
    """How the broker and the nodes of one run are started, watched, faulted and removed.

    Implementations: `local.LocalDeployment` (subprocesses), `docker.DockerDeployment`
    (containers), `conductor.AttachedDeployment` (compose started everything already).
    Every method that fails raises `RuntimeFailure` with one line for the user.
    """

    #: True when `cut_link`/`restore_link` act on the network itself; False makes the
    #: driver cut links through both nodes' control endpoints (`link_fault`).
    cuts_links: bool
    #: Where a node's KME servers bind (`kms_start` config `host`): None = the scenario's
    #: `kms.host` (local processes); "0.0.0.0" in a container's own network namespace.
    kms_bind_host: str | None

    async def start_broker(self) -> BrokerAccess: ...

    async def start_node(self, name: str, *, restart: bool = False) -> None: ...

    async def start_nodes(self, names: Iterable[str]) -> None:
        """Start these nodes (in parallel where the deployment can)."""
        ...

    def control_address(self, name: str, reported: Address) -> Address:
        """Where the orchestrator reaches `name`'s control endpoint, given what it registered."""
        ...

    def check(self, phase: str) -> None:
        """Raise `RuntimeFailure` if a process or container we started ended unexpectedly."""
        ...

    async def settle(self, timeout_s: float) -> None:
        """Wait up to `timeout_s` for an unexpected exit to become visible (for blame)."""
        ...

    def expect_exit(self, name: str) -> None:
        """`name` ("broker" or a node) is about to end on purpose: its exit is no failure."""
        ...

    async def kill_node(self, name: str) -> None: ...

    async def stop_node(self, name: str, grace_s: float) -> None: ...

    async def freeze_node(self, name: str) -> None: ...

    async def thaw_node(self, name: str) -> None: ...

    async def cut_link(self, a: str, b: str) -> None: ...

    async def restore_link(self, a: str, b: str) -> None: ...

    async def terminate(self, names: Iterable[str]) -> None:
        """Ask politely from outside (SIGTERM / docker stop signal) — no waiting."""
        ...

    async def wait_exited(self, names: Iterable[str], timeout_s: float) -> None: ...

    async def stop_all(self, grace_s: float) -> None:
        """Force-stop whatever is left, keep its logs, remove what was created. Never raises."""
        ...

    def kill_all_now(self) -> None:
        """Last resort, synchronous (after trio ended abnormally)."""
        ...


DeploymentFactory = Callable[[LaunchContext], Deployment]


# --------------------------------------------------------------------------- the driver


class RunDriver:
    """State of one run; `main` is the trio entry point, `finish` writes the results."""

    def __init__(
        self,
        prepared: PreparedRun,
        options: RunOptions,
        console: Console,
        deployment_factory: DeploymentFactory,
        *,
        tokens: Mapping[str, str] | None = None,
        run_id: str | None = None,
        default_registration_timeout_s: float = 20.0,
        stop_processes: bool = True,
    ) -> None:
        plan, run_dir = prepared.plan, prepared.run_dir
        self.plan = plan
        self.run_dir = run_dir
        self.options = options
        self.console = console
        self.started_wall = prepared.started_wall
        self.started_mono = time.monotonic()
        self.run_id = run_id or f"{plan.name}-{utc_stamp(prepared.started_wall)}"
        self._tokens = dict(tokens) if tokens is not None else {
            TOKEN_ENV: secrets.token_urlsafe(32), ADMIN_TOKEN_ENV: secrets.token_urlsafe(32),
        }  # fmt: skip
        self._secrets = tuple(self._tokens.values())
        self.events = EventLog(run_dir / "events.jsonl", secrets=self._secrets)
        self.clock = EmulatedClock(plan.time_scale)
        self.timeline = Timeline(plan)
        self.faults = FaultSchedule(plan.faults)
        self.fault_log: list[dict[str, Any]] = []  # every fault step taken, for results.json
        self.tracker = RegistrationTracker(plan.node_names)
        self.series = SeriesRecorder()  # each app's progress over emulated time, for results.json
        self._blocks_seen: dict[str, int] = {}  # qkd app -> highest block `seq` turned into events
        self.broker: AdminClient | None = None
        self.broker_access: BrokerAccess | None = None
        self.controls: dict[str, AdminClient] = {}
        self.down: dict[str, str] = {}  # node -> why, while a fault keeps it down
        self.restarting: dict[str, float] = {}  # node -> wall deadline to register again
        self.frozen: set[str] = set()
        self.error: str | None = None
        self.interrupted: int | None = None
        self.stats: dict[str, Any] = {"broker": None, "nodes": {}}
        self.kms: KmsSetup | None = None
        self.end_now_s: float | None = None
        self.finish_reason: str | None = None
        self.phase = "while starting"  # for messages about a process that died
        self.default_registration_timeout_s = default_registration_timeout_s
        self.stop_processes = stop_processes  # False: leave the broker and nodes running at the end
        live = options.live if options.live is not None else (not options.quiet and console.is_terminal)
        self.progress = RunProgress(console, [_app_bar(a) for a in plan.apps], duration_s=plan.duration_s, live=live)
        self.context = LaunchContext(plan, run_dir, self.run_id, self._tokens, options, self.emit, self._rel)
        self.deployment = deployment_factory(self.context)

    # ------------------------------------------------------------------ helpers

    def now(self) -> float | None:
        return self.clock.now(time.monotonic())

    def emit(self, event: str, /, **fields: Any) -> None:
        self.events.emit(event, t_s=self.now(), **fields)

    def _rel(self, path: Path) -> str:
        try:
            return str(path.relative_to(Path.cwd()))
        except ValueError:
            return str(path)

    async def _blame(self, exc: AdminError, peer: str) -> RuntimeFailure:
        """Turn a broken session into a failure naming the dead process if there is one."""
        await self.deployment.settle(1.0)
        self.deployment.check(self.phase)
        return RuntimeFailure(f"{peer}: {exc}")

    # ------------------------------------------------------------------ entry points

    def run(self) -> RunOutcome:
        """Run in a fresh trio loop, then write the results (the whole of `qnetem run`)."""
        try:
            trio.run(self.main, restrict_keyboard_interrupt_to_checkpoints=True)
        except KeyboardInterrupt:
            self.interrupted = self.interrupted or signal.SIGINT
        except BaseExceptionGroup as group:
            if group.subgroup(KeyboardInterrupt) is None:
                raise
            self.interrupted = self.interrupted or signal.SIGINT
        finally:
            self.deployment.kill_all_now()  # no-op when everything already ended
        try:
            return self.finish()
        finally:
            self.events.close()

    async def main(self) -> None:
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._watch_signals, nursery.cancel_scope)
                await self._run_guarded()
                nursery.cancel_scope.cancel()
        except* KeyboardInterrupt:
            self.interrupted = self.interrupted or signal.SIGINT
        finally:
            self.progress.stop()
            with trio.CancelScope(shield=True):
                await self._shutdown()

    async def _run_guarded(self) -> None:
        try:
            await self._run()
        except RuntimeFailure as exc:
            self.error = str(exc)
        except AdminError as exc:  # a session failure that escaped the specific handlers
            self.error = str(exc)
        except Exception as exc:  # a bug: keep the traceback in the run directory, one line for the user
            log = self.run_dir / "orchestrator.log"
            with log.open("a", encoding="utf-8") as fh:
                traceback.print_exception(exc, file=fh)
            self.error = f"internal error: {type(exc).__name__}: {exc} (traceback in {self._rel(log)})"

    async def _watch_signals(self, scope: trio.CancelScope) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGHUP) as signals:
            async for signum in signals:
                self.interrupted = signum
                scope.cancel()
                return

    async def _run(self) -> None:
        plan, run_dir = self.plan, self.run_dir
        self.emit(
            EventKind.RUN_STARTED, scenario=plan.name, run_id=self.run_id, seed=plan.seed,
            time_scale=plan.time_scale, duration_s=plan.duration_s, run_dir=str(run_dir),
            nodes=list(plan.node_names), apps=[a.name for a in plan.apps],
            runtime=self.options.runtime, faults=[f.to_dict() for f in plan.faults],
        )  # fmt: skip
        self.progress.set_phase("starting the broker")
        self.broker_access = await self.deployment.start_broker()
        await self._connect_broker(self.broker_access.admin)
        await self.deployment.start_nodes(plan.launched_nodes)
        if plan.external_nodes:
            self._hand_off_external_nodes()
        self.phase = "before registering with the broker"
        await self._wait_registered()
        self.phase = "during the run"
        await self._connect_controls()
        await self._start_kms()
        origin = self.now()
        assert origin is not None
        self.timeline.begin(origin)
        self.faults.begin(origin)
        self.emit(EventKind.TIMELINE_STARTED, duration_s=plan.duration_s)
        with self.progress:
            await self._drive()
        await self._collect_stats()

    async def _connect_broker(self, address: Address) -> None:
        deadline = trio.current_time() + self.options.port_file_timeout_s
        while True:
            try:
                self.broker = await AdminClient.connect(
                    address[0], address[1], self._tokens[ADMIN_TOKEN_ENV], peer="broker",
                    timeout_s=self.options.request_timeout_s,
                )  # fmt: skip
                break
            except AdminError as exc:
                # A broker in a container may take a moment to listen: retry until the deadline.
                self.deployment.check(self.phase)
                if trio.current_time() >= deadline:
                    raise await self._blame(exc, "broker") from None
                await trio.sleep(0.1)
        welcome = self.broker.welcome
        assert welcome is not None
        self.clock.sync(welcome.now_s, time.monotonic())
        if not math.isclose(welcome.time_scale, self.plan.time_scale, rel_tol=1e-9):
            raise RuntimeFailure(
                f"the broker runs with time_scale {welcome.time_scale:g}, the scenario says {self.plan.time_scale:g}"
            )

    def _hand_off_external_nodes(self) -> None:
        """Tell whoever runs the external nodes where the broker is and how to get in.

        The credentials go to `RUN/external.env`, created 0600 and deleted when the run
        ends; the console and events name the file, never its content (DESIGN §2, §12).
        """
        assert self.broker_access is not None
        where = self.broker_access.for_nodes
        path = self.run_dir / EXTERNAL_ENV_FILE
        lines = [
            f"# qnetem run {self.run_id}: credentials for the external node(s) "
            f"{', '.join(self.plan.external_nodes)}. Valid for this run only; keep private.",
            f"QNETEM_BROKER={where}",
            *(f"{name}={value}" for name, value in sorted(self._tokens.items())),
        ]
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write("\n".join(lines) + "\n")
        self.emit(EventKind.EXTERNAL_AWAITED, nodes=list(self.plan.external_nodes), credentials=path.name)
        for name in self.plan.external_nodes:
            self.console.print(
                f"waiting for external node [bold]{name}[/bold]: start it with the variables in "
                f"{self._rel(path)}, e.g. `env $(grep -v '^#' {self._rel(path)} | xargs) "
                f"qnetem node --name {name} --broker {where}`"
            )

    async def _poll_broker(self) -> Any:
        assert self.broker is not None
        try:
            reply = await self.broker.status()
        except AdminError as exc:
            raise await self._blame(exc, "broker") from None
        self.clock.sync(reply.now_s, time.monotonic())
        return reply

    def _note_registrations(self, reply: Any) -> list[str]:
        new = self.tracker.update(reply.nodes)
        for name in new:
            status = self.tracker.status_of(name)
            self.emit(
                EventKind.NODE_REGISTERED, node=name, external=name in self.plan.external_nodes,
                restarted=name in self.restarting,
                control=_addr(status.control), tcp=_addr(status.tcp), udp=_addr(status.udp),
            )  # fmt: skip
        return new

    async def _wait_registered(self) -> None:
        self.progress.set_phase("waiting for nodes to register")
        timeout_s = self.options.registration_timeout_s
        if timeout_s is None:
            timeout_s = 600.0 if self.plan.external_nodes else self.default_registration_timeout_s
        with trio.move_on_after(timeout_s):
            while True:
                self.deployment.check(self.phase)
                self._note_registrations(await self._poll_broker())
                if self.tracker.complete:
                    return
                await trio.sleep(0.1)
        self.deployment.check(self.phase)
        missing = self.tracker.missing()
        parts = []
        assert self.broker_access is not None
        for name in missing:
            if name in self.plan.external_nodes:
                parts.append(f"{name} (external: start it and point it at {self.broker_access.for_nodes})")
            else:
                parts.append(f"{name} (see {self._rel(self.run_dir / f'{name}.log')})")
        raise RuntimeFailure(
            f"registration timed out after {timeout_s:g} s: {len(missing)} node(s) did not register: {', '.join(parts)}"
        )

    async def _connect_control(self, name: str) -> None:
        reported = self.tracker.control_address(name)
        if reported is None:
            if any(name in a.nodes for a in self.plan.apps):
                raise RuntimeFailure(f"node {name} registered without a control address; cannot start its apps")
            return
        host, port = self.deployment.control_address(name, reported)
        try:
            self.controls[name] = await AdminClient.connect(
                host, port, self._tokens[ADMIN_TOKEN_ENV], peer=f"node {name}",
                timeout_s=self.options.request_timeout_s,
            )  # fmt: skip
        except AdminError as exc:
            raise await self._blame(exc, f"node {name}") from None

    async def _connect_controls(self) -> None:
        for name in self.plan.node_names:
            await self._connect_control(name)

    async def _start_kms(self) -> None:
        """Issue the run's certificates and start every KME (DESIGN §8); write RUN/kms.json."""
        if self.plan.kms is None:
            return
        self.progress.set_phase("starting the key management")
        self.kms = KmsSetup(self.plan.kms, self.plan.name, self.run_dir)
        for node in self.plan.kms.kme_nodes:
            await self._start_kme(node)
        self.kms.write_manifest()

    async def _start_kme(self, node: str) -> None:
        assert self.kms is not None
        client = self.controls.get(node)
        if client is None:  # an external node without a control session: it runs no KME here
            return
        # Where the orchestrator reaches the node is where outside clients reach its KME.
        reach = client.peer_host
        bind = self.deployment.kms_bind_host
        try:
            started = await client.kms_start(self.kms.config_for(node, bind_host=bind, reach_host=reach))
        except AdminError as exc:
            raise await self._blame(exc, f"node {node}") from None
        shown = started.host if started.host not in ("0.0.0.0", "::") else reach  # noqa: S104
        self.kms.started(node, shown, started.etsi014_port, started.skip_port)
        self.emit(EventKind.KMS_STARTED, node=node, host=started.host, etsi014_port=started.etsi014_port,
                  skip_port=started.skip_port)

    # ------------------------------------------------------------------ the timeline

    async def _drive(self) -> None:
        timeline = self.timeline
        while True:
            now = self.now()
            assert now is not None
            for action in self.faults.due(now):
                await self._fault(action)
            for app in timeline.due(now):
                await self._start_app(app)
            await self._poll_apps()
            self.deployment.check(self.phase)
            reply = await self._poll_broker()
            await self._watch_nodes(reply)
            now = self.now()
            assert now is not None
            self._show_progress(now)
            reason = timeline.finish_reason(now)
            if reason is not None:
                self.finish_reason = reason.value
                self.end_now_s = now
                return
            # Sleep one poll interval, or less if an app start, a fault or the deadline comes sooner.
            wake = [self.options.poll_interval_s]
            for target in (timeline.next_start_s(), self.faults.next_due_s(), timeline.deadline_s()):
                if target is not None:
                    wake.append(self.clock.wall_s_until(now, target))
            await trio.sleep(max(0.0, min(wake)))

    async def _watch_nodes(self, reply: Any) -> None:
        """Nodes lost without a fault fail the run; restarted nodes get their control session back."""
        lost = [n for n in self.tracker.lost(reply.nodes) if n not in self.down]
        if lost:
            self.deployment.check(self.phase)
            raise RuntimeFailure(f"node(s) {', '.join(lost)} lost their broker session during the run")
        for name in self._note_registrations(reply):
            if name in self.restarting:
                del self.restarting[name]
                await self._connect_control(name)
                if self.kms is not None and name in self.plan.kms.kme_nodes:  # type: ignore[union-attr]
                    await self._start_kme(name)  # over the store it left behind
                    self.kms.write_manifest()
        wall = time.monotonic()
        late = [n for n, deadline in self.restarting.items() if wall > deadline]
        if late:
            self.deployment.check(self.phase)
            raise RuntimeFailure(
                f"node(s) {', '.join(late)} did not register again after their restart; "
                f"see {', '.join(self._rel(self.run_dir / f'{n}.log') for n in late)}"
            )

    def _unavailable(self, node: str) -> str | None:
        """Why apps cannot use `node` now (down, restarting or frozen), or None."""
        if node in self.down:
            return self.down[node]
        if node in self.restarting:
            return f"node {node} is restarting"
        if node in self.frozen:
            return f"node {node} is frozen"
        return None

    async def _start_app(self, app: Any) -> None:
        now = self.now()
        assert now is not None
        for node in app.nodes:
            why = self._unavailable(node)
            if why is not None:
                self._fail_app(app.name, f"cannot start: {why}", now)
                return
        for request in app.start_requests():
            client = self.controls[request.node]
            try:
                await client.app_start(request.kind, request.name, dict(request.params))
            except AdminRequestError as exc:
                self._fail_app(app.name, f"{request.role} {request.node} refused to start it: {exc}", now)
                return
            except AdminError as exc:
                raise await self._blame(exc, f"node {request.node}") from None
        change = self.timeline.mark_started(app.name, now)
        self.series.record(app.name, change.t_s, {app.progress_metric: 0})
        asked = {k: v for k, v in app.requested().items() if k in ("pairs", "key_bits", "duration_s")}
        self.emit(
            EventKind.APP_STARTED, app=app.name, kind=app.kind, nodes=list(app.nodes), **asked,
            at_s=round(change.t_s, 6),
        )  # fmt: skip

    def _fail_app(self, name: str, why: str, now: float) -> None:
        change = self.timeline.mark_failed(name, why, now)
        if change is not None:
            self.emit(EventKind.APP_FAILED, app=name, at_s=round(change.t_s, 6), error=change.error)

    async def _poll_apps(self) -> None:
        for app in self.timeline.running():
            if any(self._unavailable(n) is not None for n in app.nodes):
                continue  # a frozen node cannot answer; a down one already failed the app
            for role in ("responder", "initiator"):
                node = app.node_of(role)
                try:
                    status = await self.controls[node].app_status(app.name)
                except AdminRequestError as exc:
                    self._fail_app(app.name, f"{role} {node}: {exc}", self.now() or 0.0)
                    break
                except AdminError as exc:
                    raise await self._blame(exc, f"node {node}") from None
                now = self.now()
                assert now is not None
                if role == "initiator" and status.state != "failed":
                    self.series.record(app.name, self.timeline.elapsed_s(now), status.results)
                if role == "initiator":
                    self._block_events(app.name, status.results)
                change = self.timeline.observe(app.name, role, status.state, status.results, now)
                if change is None:
                    continue
                if change.state is AppState.DONE:
                    metrics = {k: v for k, v in status.results.items() if isinstance(v, int | float)}
                    self.emit(EventKind.APP_DONE, app=app.name, at_s=round(change.t_s, 6), metrics=metrics)
                elif change.state is AppState.FAILED:
                    self.emit(EventKind.APP_FAILED, app=app.name, at_s=round(change.t_s, 6), error=change.error)
                    break

    def _block_events(self, app: str, results: Mapping[str, Any]) -> None:
        """A qkd app's newly finished blocks -> `qkd_block` (and `qkd_alarm`) events, once each.

        The app keeps its last blocks in `results["blocks"]`, numbered by `seq`; the
        poll interval is far shorter than a block, so none is missed in practice (a
        gap in `seq` is reported in the event as `missed`).
        """
        blocks = results.get("blocks")
        if not isinstance(blocks, list):
            return
        last = self._blocks_seen.get(app, 0)
        for rec in blocks:
            seq = rec.get("seq") if isinstance(rec, Mapping) else None
            if not isinstance(seq, int) or seq <= last:
                continue
            fields = {k: rec.get(k) for k in _BLOCK_EVENT_FIELDS if rec.get(k) is not None}
            self.emit(EventKind.QKD_BLOCK, app=app, missed=seq - last - 1, **fields)
            if rec.get("alarm"):
                self.emit(EventKind.QKD_ALARM, app=app, block=rec.get("block"), reason=rec.get("alarm"),
                          qber=rec.get("qber"), qber_x=rec.get("qber_x"), node_at_s=rec.get("at_s"))  # fmt: skip
            last = seq
        self._blocks_seen[app] = last

    def _show_progress(self, now: float) -> None:
        self.progress.set_clock(self.timeline.elapsed_s(now))
        for p in self.timeline.progress(now):
            self.progress.update_app(p.name, measured=p.measured, state=p.state.value, rate_hz=p.rate,
                                     running_s=p.running_s, detail=p.detail)  # fmt: skip

    # ------------------------------------------------------------------ faults

    async def _fault(self, action: FaultAction) -> None:
        fault, step = action.fault, action.step
        now = self.now()
        assert now is not None
        kind = fault.kind
        label = f"fault {fault.index} ({fault.describe()})"
        if kind in (FaultKind.NODE_CRASH, FaultKind.NODE_RESTART):
            assert fault.node is not None
            if step is FaultStep.APPLY:
                verb = "crashed" if kind is FaultKind.NODE_CRASH else "was restarted"
                await self._take_down(fault.node, f"node {fault.node} {verb} ({label})", now)
                if kind is FaultKind.NODE_CRASH:
                    await self.deployment.kill_node(fault.node)
                else:
                    await self.deployment.stop_node(fault.node, self.options.shutdown_grace_s)
                await self._await_unregistered(fault.node)
            else:
                await self._bring_up(fault.node)
        elif kind is FaultKind.NODE_FREEZE:
            assert fault.node is not None
            if step is FaultStep.APPLY:
                await self.deployment.freeze_node(fault.node)
                self.frozen.add(fault.node)
            else:
                await self.deployment.thaw_node(fault.node)
                self.frozen.discard(fault.node)
        elif kind is FaultKind.LINK_CUT:
            assert fault.link is not None
            await self._cut(fault.link, cut=step is FaultStep.APPLY)
        elif kind is FaultKind.FIBRE_CUT:
            assert fault.link is not None
            await self._cut_fibre(fault.link, cut=step is FaultStep.APPLY, label=label)
        elif kind.eavesdrops:
            assert fault.link is not None
            await self._eavesdrop(fault, on=step is FaultStep.APPLY, label=label)
        else:  # pragma: no cover - FaultKind is closed
            raise RuntimeFailure(f"{label}: kind {kind} is not implemented by this orchestrator")
        record = action.to_dict()
        record["planned_at_s"] = record.pop("t_s")  # `t_s` is the event's own (emulated) time
        record["at_s"] = round(self.timeline.elapsed_s(now), 6)
        self.fault_log.append(record)
        event = EventKind.FAULT_APPLIED if step is FaultStep.APPLY else EventKind.FAULT_REVERTED
        self.emit(event, **record)

    async def _take_down(self, node: str, why: str, now: float) -> None:
        """`node` is about to end on purpose: no failure for it, its apps fail with `why`."""
        self.down[node] = why
        self.deployment.expect_exit(node)
        for app in self.timeline.running():
            if node in app.nodes:
                self._fail_app(app.name, why, now)
        client = self.controls.pop(node, None)
        if client is not None:
            await client.aclose()

    async def _await_unregistered(self, node: str) -> None:
        """Wait (bounded) until the broker has noticed that `node`'s session ended."""
        with trio.move_on_after(max(5.0, self.options.request_timeout_s)):
            while True:
                reply = await self._poll_broker()
                if not any(s.name == node and s.registered for s in reply.nodes):
                    self.tracker.forget(node)
                    return
                await trio.sleep(0.02)
        raise RuntimeFailure(f"the broker still lists node {node} as registered after it was taken down")

    async def _bring_up(self, node: str) -> None:
        del self.down[node]
        timeout_s = self.options.registration_timeout_s or self.default_registration_timeout_s
        self.restarting[node] = time.monotonic() + timeout_s
        await self.deployment.start_node(node, restart=True)

    async def _cut(self, link: tuple[str, str], *, cut: bool) -> None:
        a, b = link
        if self.deployment.cuts_links:
            await (self.deployment.cut_link(a, b) if cut else self.deployment.restore_link(a, b))
            return
        for end, other in ((a, b), (b, a)):
            client = self.controls.get(end)
            if client is None or end in self.frozen:
                # A down node has no links to cut; a restarted one starts with its links
                # up (a known limit of control-endpoint cuts, unlike network cuts).
                continue
            try:
                await client.link_fault(other, cut)
            except AdminError as exc:
                raise await self._blame(exc, f"node {end}") from None

    async def _cut_fibre(self, link: tuple[str, str], *, cut: bool, label: str) -> None:
        """Cut a link's whole fibre (its classical channel and, in the broker, its quantum
        channel) or splice it again.

        Cut: the broker's `fibre_cut` first, then the classical cut (`_cut`, as `link-cut`
        does); splice: the classical restore first, then `fibre_cut` with `cut` false: the
        two halves are undone in the reverse order. The broker's half goes first because
        it is the one a broker may refuse (`no_link`, `unknown_node`): a refusal then
        leaves nothing half cut, and it is a runtime failure, since the scenario's fault
        would silently not happen.
        """
        if cut:
            await self._broker_fibre(link, cut=True, label=label)
            await self._cut(link, cut=True)
        else:
            await self._cut(link, cut=False)
            await self._broker_fibre(link, cut=False, label=label)

    async def _broker_fibre(self, link: tuple[str, str], *, cut: bool, label: str) -> None:
        assert self.broker is not None
        try:
            await self.broker.fibre_cut(link, cut)
        except AdminRequestError as exc:
            raise RuntimeFailure(f"{label}: the broker refused fibre_cut: {exc}") from None
        except AdminError as exc:
            raise await self._blame(exc, "broker") from None

    async def _eavesdrop(self, fault: FaultPlan, *, on: bool, label: str) -> None:
        """Switch the eavesdropper of a QKD link through the broker's admin session.

        On: `qkd_eve` with the fault's switches (intercept-resend with its fraction, or
        photon-number splitting); off: `qkd_eve` with every switch at its default. The
        broker applies the change from the next pulse it has not emitted. A refusal is a
        runtime failure: the scenario's attack would silently not happen.
        """
        assert self.broker is not None and fault.link is not None
        try:
            if on:
                await self.broker.qkd_eve(
                    fault.link, intercept_fraction=fault.intercept_fraction, pns=fault.kind is FaultKind.QKD_PNS
                )
            else:
                await self.broker.qkd_eve(fault.link)
        except AdminRequestError as exc:
            raise RuntimeFailure(f"{label}: the broker refused qkd_eve: {exc}") from None
        except AdminError as exc:
            raise await self._blame(exc, "broker") from None

    async def _revert_for_shutdown(self) -> None:
        """Thaw frozen nodes and restore cut links so that everything can stop cleanly.

        A `fibre-cut` is also spliced in the broker (while its session is open): the fault
        is reverted as a whole, as after its `for`. With control-endpoint cuts (local
        runtime, conductor) its classical half goes with the stopping nodes, as a
        `link-cut`'s does.
        """
        for action in self.faults.pending_reverts():
            fault = action.fault
            try:
                if fault.kind is FaultKind.NODE_FREEZE and fault.node in self.frozen:
                    await self.deployment.thaw_node(fault.node)
                    self.frozen.discard(fault.node)
                elif fault.kind.cuts_classical and self.deployment.cuts_links:
                    assert fault.link is not None
                    await self.deployment.restore_link(*fault.link)
                if fault.kind.cuts_fibre and self.broker is not None and not self.broker.closed:
                    assert fault.link is not None
                    await self.broker.fibre_cut(fault.link, False)
            except (RuntimeFailure, AdminError) as exc:
                self.emit(EventKind.FAULT_REVERTED, fault=fault.index, error=str(exc))

    # ------------------------------------------------------------------ the end

    async def _collect_stats(self) -> None:
        if self.broker is not None and not self.broker.closed:
            try:
                self.stats["broker"] = (await self.broker.get_stats()).stats
            except AdminError as exc:
                self.stats["broker"] = {"error": str(exc)}
        for name, client in self.controls.items():
            try:
                self.stats["nodes"][name] = (await client.get_stats()).stats
            except AdminError as exc:
                self.stats["nodes"][name] = {"error": str(exc)}
                continue
            counters = (self.stats["nodes"][name].get("kms") or {}).get("counters") or {}
            if counters.get("pqc_fallbacks"):  # DESIGN §8: a PQC-only key is an alarm
                self.emit(EventKind.KMS_ALARM, node=name, reason="pqc_fallback", keys=counters["pqc_fallbacks"])
            if counters.get("relays_rejected"):
                self.emit(EventKind.KMS_ALARM, node=name, reason="relay_rejected", relays=counters["relays_rejected"])

    async def _shutdown(self) -> None:
        """Graceful stop: `shutdown` to our nodes, then to the broker; then the deployment forces the rest."""
        grace_s = self.options.shutdown_grace_s
        deployment = self.deployment
        await self._revert_for_shutdown()
        if not self.stop_processes:  # the conductor: compose or swarm stops the services
            for client in [*self.controls.values(), *([self.broker] if self.broker else [])]:
                await client.aclose()
            await deployment.stop_all(grace_s)
            return
        ours = [n for n in self.plan.launched_nodes if n not in self.down]
        for name in [*self.plan.launched_nodes, "broker"]:
            deployment.expect_exit(name)
        asked = []
        with trio.move_on_after(grace_s):
            async with trio.open_nursery() as nursery:
                for name, client in self.controls.items():
                    if name in ours:
                        asked.append(name)
                        nursery.start_soon(_quiet_shutdown, client)
        await deployment.terminate([n for n in ours if n not in asked])  # no control session: from outside
        await deployment.wait_exited(ours, grace_s)
        if self.broker is not None:
            with trio.move_on_after(grace_s):
                await _quiet_shutdown(self.broker)
            await deployment.wait_exited(["broker"], grace_s)
        else:
            await deployment.terminate(["broker"])
        for client in [*self.controls.values(), *([self.broker] if self.broker else [])]:
            await client.aclose()
        await deployment.stop_all(grace_s)

    def finish(self) -> RunOutcome:
        """Evaluate expectations, write results.json and the last events (sync, after trio)."""
        if self.finish_reason == FinishReason.DURATION_ELAPSED:
            note = f"the app did not finish within the scenario duration ({self.plan.duration_s:g} s emulated)"
        elif self.interrupted is not None:
            note = "the run was interrupted before the app finished"
        else:
            note = "the run ended early, before the app finished (runtime failure)"
        outcomes: dict[str, AppOutcome] = self.timeline.outcomes(unfinished_note=note)
        kms = kms_metrics(self.stats["nodes"]) if self.plan.kms is not None else None
        expectations = evaluate_expectations(self.plan.expectations, outcomes, kms or None)
        if self.interrupted is not None:
            status, code = RunStatus.INTERRUPTED, ExitCode.INTERRUPTED
            self.error = self.error or f"interrupted by {signal.Signals(self.interrupted).name}"
        elif self.error is not None:
            status, code = RunStatus.ERROR, ExitCode.RUNTIME_FAILURE
        elif all(e.passed for e in expectations):
            status, code = RunStatus.PASSED, ExitCode.OK
        else:
            status, code = RunStatus.FAILED, ExitCode.EXPECTATION_FAILED
        finished_wall = time.time()
        emulated_s = None
        if self.timeline.origin_s is not None:
            end = self.end_now_s if self.end_now_s is not None else self.now()
            emulated_s = None if end is None else self.timeline.elapsed_s(end)
        stats = dict(self.stats)
        stats["apps"] = self.timeline.node_reports()
        results = RunResults(
            scenario=self.plan.name,
            seed=self.plan.seed,
            run_id=self.run_id,
            started_at=iso_utc(self.started_wall),
            finished_at=iso_utc(finished_wall),
            wall_s=round(time.monotonic() - self.started_mono, 6),
            emulated_s=emulated_s,
            time_scale=self.plan.time_scale,
            status=status,
            exit_code=int(code),
            apps=outcomes,
            expectations=expectations,
            stats=stats,
            error=self.error,
            backend=self.options.backend,
            qnetem_version=emulator.__version__,
        )
        document = results.to_dict()
        document["finish_reason"] = self.finish_reason
        document["runtime"] = self.options.runtime
        document["series"] = self.series.to_dict()
        if kms is not None:
            document["kms"] = {"metrics": kms, **(self.kms.manifest() if self.kms is not None else {})}
        document["faults"] = {
            "planned": [f.to_dict() for f in self.plan.faults],
            "steps": self.fault_log,
        }
        for e in expectations:
            self.emit(
                EventKind.EXPECTATION, index=e.index, metric=e.metric, app=e.app, bound=e.bound,
                observed=e.observed, passed=e.passed, message=e.message,
            )  # fmt: skip
        self.emit(
            EventKind.RUN_FINISHED, status=status.value, exit_code=int(code), error=self.error,
            finish_reason=self.finish_reason,
        )  # fmt: skip
        with contextlib.suppress(FileNotFoundError):  # the run's credentials die with it
            (self.run_dir / EXTERNAL_ENV_FILE).unlink()
        write_json_atomic(self.run_dir / "results.json", document, secrets=self._secrets)
        report_error = self._write_report()
        print_summary(self.console, document, run_dir=self._rel(self.run_dir))
        if report_error is not None:
            self.console.print(report_error, markup=False, highlight=False)
        return RunOutcome(code, self.run_dir, results, self.error)

    def _write_report(self) -> str | None:
        """Render report.html from the files just written; a one-line message if that failed.

        Built from `results.json` (already redacted) and `scenario.json`, exactly as
        `qnetem report RUN_DIR` would. Never raises: the report must not change the exit status.
        """
        try:
            from emulator.report.html import render_run_dir

            render_run_dir(self.run_dir)
        except Exception as exc:  # a bad report is worth a line, not a failed run
            log = self.run_dir / "orchestrator.log"
            with contextlib.suppress(OSError), log.open("a", encoding="utf-8") as fh:
                fh.write("report.html could not be rendered:\n")
                traceback.print_exception(exc, file=fh)
            why = " ".join(str(exc).split())[:200]
            return f"report.html not written: {type(exc).__name__}: {why} (traceback in {self._rel(log)})"
        return None


def _app_bar(app: AppPlan) -> AppBar:
    """How the live display counts an app: amount requested, or running time for a qkd
    app that only has a duration."""
    amount = app.requested_amount
    if amount is None and app.running_limit_s is not None:
        return AppBar(app.name, app.running_limit_s, app.unit, by_time=True)
    return AppBar(app.name, amount or 0, app.unit)


async def _quiet_shutdown(client: AdminClient) -> None:
    with contextlib.suppress(AdminError):
        await client.shutdown()


def _addr(address: Any) -> list[Any] | None:
    return None if address is None else [address[0], address[1]]


def default_console() -> Console:
    console = Console()
    if not console.is_terminal:
        console = Console(width=160)
    return console


def run_scenario(options: RunOptions, *, console: Console | None = None) -> RunOutcome:
    """Run a scenario with the runtime `options.runtime` names; never raises for user-facing failures."""
    factory: DeploymentFactory
    if options.runtime == "local":
        from .local import LocalDeployment

        factory, default_timeout_s = LocalDeployment, 20.0
    elif options.runtime == "docker":
        from .docker import preflight, scenario_problems

        try:
            problems = scenario_problems(load_plan(options.scenario_path)[1])
            if problems:
                raise InvalidInput(problems)
            factory = preflight(options)
        except InvalidInput as exc:
            return RunOutcome(ExitCode.INVALID_INPUT, None, None, "\n".join(exc.problems))
        except RuntimeFailure as exc:
            return RunOutcome(ExitCode.RUNTIME_FAILURE, None, None, str(exc))
        default_timeout_s = 60.0  # container start-up on a busy engine
    else:
        return RunOutcome(ExitCode.INVALID_INPUT, None, None, f"unknown runtime {options.runtime!r} (local, docker)")
    prepared = prepare_run(options.scenario_path, options.out_dir)
    if isinstance(prepared, RunOutcome):
        return prepared
    driver = RunDriver(
        prepared, options, console or default_console(), factory, default_registration_timeout_s=default_timeout_s
    )
    return driver.run()
