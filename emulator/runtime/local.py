"""The local runtime: broker and nodes as subprocesses on 127.0.0.1, driven by one trio task.

Theory of operation
-------------------
`run_scenario(RunOptions)` is the whole of `qnetem run` minus argument parsing:

1. load and validate the scenario (problems → exit 2), build the `RunPlan`;
2. create the run directory, write `scenario.json`, draw the run token and the admin
   token with `secrets` (they reach children only through the environment:
   `QNETEM_TOKEN`, `QNETEM_ADMIN_TOKEN`; never argv, logs, events or results);
3. start the broker (`python -m emulator.broker ... --port 0 --port-file RUN/broker.port`),
   wait for the port file, open an admin session (its clock anchors emulated time),
   then start one `python -m nodes` per non-external node;
4. poll the broker's `status` until every node registered (20 s wall by default);
5. drive the `Timeline` (emulated time from the broker clock): start apps at their
   offsets over each node's control session, poll their status every 0.2 s wall,
   show the live progress, stop when every app finished or `duration` elapsed;
6. collect stats, evaluate expectations, write `results.json` (with `series`, each app's
   progress sampled at every poll, bounded by `SeriesRecorder`) and `events.jsonl`;
7. render `report.html` and its PNG plots from `results.json` and `scenario.json`
   (`emulator.report.html`); a rendering failure is logged to `orchestrator.log` and
   never changes the exit status.

Any failure on the way (a child exits, a session breaks, a timeout) raises
`RuntimeFailure`, which becomes exit 3 with one line naming the culprit and its log.

Children never outlive the run. Each child runs in its own session/process group (a
Ctrl-C in the terminal reaches only the orchestrator, which then shuts everything down
in order) and, on Linux, with `PR_SET_PDEATHSIG = SIGKILL` so that even a SIGKILLed
orchestrator takes them down. PDEATHSIG fires when the *thread* that forked the child
exits, so children are spawned synchronously from the trio (main) thread, never from a
worker thread. Shutdown is graceful first (`shutdown` on each control session, nodes
before the broker), then SIGTERM to each process group, then SIGKILL after a grace
period; Ctrl-C, SIGTERM, SIGHUP and any exception take the same path, and a last
synchronous sweep SIGKILLs whatever is still alive if even that was interrupted.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import datetime as _dt
import json
import math
import os
import secrets
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import trio
from rich.console import Console

import emulator
from emulator.report.console import RunProgress, print_summary
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
from .orchestrator import (
    EmulatedClock,
    ExitCode,
    FinishReason,
    PlanError,
    RegistrationTracker,
    RunPlan,
    Timeline,
    plan_from_scenario,
)

__all__ = [
    "ChildProcess",
    "InvalidInput",
    "ProcessSupervisor",
    "RunOptions",
    "RunOutcome",
    "RuntimeFailure",
    "load_plan",
    "run_scenario",
]

LOCALHOST = "127.0.0.1"
TOKEN_ENV = "QNETEM_TOKEN"
ADMIN_TOKEN_ENV = "QNETEM_ADMIN_TOKEN"
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


EXTERNAL_ENV_FILE = "external.env"  # broker address and run tokens for external nodes


class RuntimeFailure(Exception):
    """The run could not proceed (exit 3). The message is one line for the user."""


class InvalidInput(Exception):
    """The scenario or the options are invalid (exit 2). `problems` holds one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


# --------------------------------------------------------------------------- child processes

_libc: Any = None
if sys.platform.startswith("linux"):
    try:  # loaded in the parent: the child between fork and exec should only call into it
        _libc = ctypes.CDLL(None, use_errno=True)
    except OSError:  # pragma: no cover - no libc symbols available
        _libc = None


def _child_setup(parent_pid: int) -> Callable[[], None]:
    """`preexec_fn`: die with the parent (Linux), and bail out if it already died."""

    def setup() -> None:
        if _libc is not None:
            _libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
            if os.getppid() != parent_pid:  # the parent died before prctl took effect
                os._exit(1)

    return setup


@dataclasses.dataclass(slots=True)
class ChildProcess:
    """One child: its name ("broker" or a node), its argv (no secrets in it) and its log."""

    name: str
    role: str  # "broker" | "node"
    argv: list[str]
    log_path: Path
    popen: subprocess.Popen[bytes]
    stopping: bool = False  # we asked it to stop: its exit is not a failure
    reported_exit: bool = False

    @property
    def pid(self) -> int:
        return self.popen.pid

    def poll(self) -> int | None:
        return self.popen.poll()

    def describe_exit(self) -> str:
        code = self.popen.returncode
        if code is None:
            return "is running"
        if code < 0:
            try:
                return f"was killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"was killed by signal {-code}"
        return f"exited with status {code}"


class ProcessSupervisor:
    """Starts children in their own process groups and makes sure they all end."""

    def __init__(self, env: dict[str, str], cwd: Path) -> None:
        self._env = env
        self._cwd = cwd
        self.children: list[ChildProcess] = []

    def spawn(self, name: str, role: str, argv: list[str], log_path: Path) -> ChildProcess:
        log: IO[bytes]
        with log_path.open("ab") as log:
            popen = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self._env,
                cwd=self._cwd,
                start_new_session=True,  # own session and process group
                preexec_fn=_child_setup(os.getpid()),  # noqa: PLW1509 - needed for PDEATHSIG
                close_fds=True,
            )
        child = ChildProcess(name, role, argv, log_path, popen)
        self.children.append(child)
        return child

    def alive(self) -> list[ChildProcess]:
        return [c for c in self.children if c.poll() is None]

    def unexpected_exits(self) -> list[ChildProcess]:
        return [c for c in self.children if not c.stopping and c.poll() is not None]

    def signal_all(self, sig: int) -> None:
        for child in self.alive():
            _killpg(child.pid, sig)

    def kill_all_now(self) -> None:
        """Last resort, synchronous: SIGKILL every group and reap."""
        for child in self.children:
            child.stopping = True
            _killpg(child.pid, signal.SIGKILL)
        for child in self.children:
            with contextlib.suppress(subprocess.TimeoutExpired, OSError):
                child.popen.wait(timeout=5)

    async def wait_exited(self, timeout_s: float) -> bool:
        """Poll until every child exited; False on timeout."""
        with trio.move_on_after(timeout_s):
            while self.alive():
                await trio.sleep(0.05)
            return True
        return not self.alive()

    async def stop(self, grace_s: float) -> None:
        """SIGTERM whatever is left, then SIGKILL after `grace_s`; reap everything."""
        for child in self.children:
            child.stopping = True
        if await self.wait_exited(0):
            return
        self.signal_all(signal.SIGTERM)
        if await self.wait_exited(grace_s):
            return
        self.signal_all(signal.SIGKILL)
        await self.wait_exited(5.0)
        # Children are group leaders; SIGKILL the groups once more in case a grandchild lingers.
        for child in self.children:
            _killpg(child.pid, signal.SIGKILL)


def _killpg(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


# --------------------------------------------------------------------------- options and outcome


@dataclasses.dataclass(frozen=True, slots=True)
class RunOptions:
    scenario_path: Path
    out_dir: Path | None = None  # default: runs/<name>-<UTC timestamp> under the cwd
    backend: str | None = None  # "c" | "numpy" | None (broker default)
    quiet: bool = False
    live: bool | None = None  # live progress; None = when stdout is a terminal and not quiet
    registration_timeout_s: float | None = None  # None: 20 s, or 600 s when a person starts external nodes
    port_file_timeout_s: float = 20.0
    poll_interval_s: float = 0.2
    request_timeout_s: float = 10.0
    shutdown_grace_s: float = 3.0
    # How a node process is started; the node's own arguments follow. Tests and plugfests
    # may substitute another implementation speaking the same protocol.
    node_command: tuple[str, ...] = (sys.executable, "-m", "nodes")


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


def _utc_stamp(epoch_s: float) -> str:
    return _dt.datetime.fromtimestamp(epoch_s, tz=_dt.UTC).strftime("%Y%m%dT%H%M%SZ")


def _make_run_dir(out_dir: Path | None, name: str, stamp: str) -> Path:
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


def _child_env(tokens: dict[str, str], backend: str | None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(tokens)
    env["PYTHONUNBUFFERED"] = "1"
    if backend:
        env["QNETEM_BACKEND"] = backend
    # Children import the same code as the orchestrator, installed or not.
    root = str(Path(emulator.__file__).resolve().parents[1])
    paths = [root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != root]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


def run_scenario(options: RunOptions, *, console: Console | None = None) -> RunOutcome:
    """Run a scenario with the local runtime; never raises for user-facing failures."""
    if console is None:
        console = Console()
        if not console.is_terminal:
            console = Console(width=160)
    try:
        scenario, plan = load_plan(options.scenario_path)
    except InvalidInput as exc:
        return RunOutcome(ExitCode.INVALID_INPUT, None, None, "\n".join(exc.problems))
    from emulator.scenario import scenario_to_dict

    started_wall = time.time()
    try:
        run_dir = _make_run_dir(options.out_dir, plan.name, _utc_stamp(started_wall))
    except OSError as exc:
        return RunOutcome(ExitCode.INVALID_INPUT, None, None, f"cannot create the run directory: {exc}")
    except RuntimeFailure as exc:
        return RunOutcome(ExitCode.RUNTIME_FAILURE, None, None, str(exc))
    # Written as is: the broker re-validates it (inf is the string "inf" in this form).
    (run_dir / "scenario.json").write_text(json.dumps(scenario_to_dict(scenario), indent=2) + "\n", encoding="utf-8")
    run = _LocalRun(plan, run_dir, options, console, started_wall)
    try:
        trio.run(run.main, restrict_keyboard_interrupt_to_checkpoints=True)
    except KeyboardInterrupt:
        run.interrupted = run.interrupted or signal.SIGINT
    except BaseExceptionGroup as group:
        if group.subgroup(KeyboardInterrupt) is None:
            raise
        run.interrupted = run.interrupted or signal.SIGINT
    finally:
        run.supervisor.kill_all_now()  # no-op when everything already exited
    try:
        return run.finish()
    finally:
        run.events.close()


class _LocalRun:
    """State of one local run; `main` is the trio entry point."""

    def __init__(self, plan: RunPlan, run_dir: Path, options: RunOptions, console: Console, started_wall: float):
        self.plan = plan
        self.run_dir = run_dir
        self.options = options
        self.console = console
        self.started_wall = started_wall
        self.started_mono = time.monotonic()
        self.run_id = f"{plan.name}-{_utc_stamp(started_wall)}"
        self._tokens = {TOKEN_ENV: secrets.token_urlsafe(32), ADMIN_TOKEN_ENV: secrets.token_urlsafe(32)}
        self._secrets = tuple(self._tokens.values())
        self.supervisor = ProcessSupervisor(_child_env(self._tokens, options.backend), run_dir)
        self.events = EventLog(run_dir / "events.jsonl", secrets=self._secrets)
        self.clock = EmulatedClock(plan.time_scale)
        self.timeline = Timeline(plan)
        self.tracker = RegistrationTracker(plan.node_names)
        self.series = SeriesRecorder()  # each app's progress over emulated time, for results.json
        self.broker: AdminClient | None = None
        self.controls: dict[str, AdminClient] = {}
        self.error: str | None = None
        self.interrupted: int | None = None
        self.stats: dict[str, Any] = {"broker": None, "nodes": {}}
        self.end_now_s: float | None = None
        self.finish_reason: str | None = None
        self.phase = "while starting"  # for messages about a child that died
        live = options.live if options.live is not None else (not options.quiet and console.is_terminal)
        self.progress = RunProgress(
            console, [(a.name, a.pairs) for a in plan.apps], duration_s=plan.duration_s, live=live
        )

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

    def _check_children(self) -> None:
        for child in self.supervisor.unexpected_exits():
            child.stopping = True  # report once
            self._report_exit(child, expected=False)
            what = "the broker" if child.role == "broker" else f"node {child.name}"
            raise RuntimeFailure(
                f"{what} (pid {child.pid}) {child.describe_exit()} {self.phase}; see {self._rel(child.log_path)}"
            )

    def _report_exit(self, child: ChildProcess, *, expected: bool) -> None:
        if child.reported_exit or child.popen.returncode is None:
            return
        child.reported_exit = True
        self.emit(
            EventKind.PROCESS_EXITED, name=child.name, role=child.role, pid=child.pid,
            returncode=child.popen.returncode, expected=expected,
        )  # fmt: skip

    async def _blame(self, exc: AdminError, peer: str) -> RuntimeFailure:
        """Turn a broken session into a failure naming the dead process if there is one."""
        with trio.move_on_after(1.0):
            while not self.supervisor.unexpected_exits():
                await trio.sleep(0.05)
        self._check_children()
        return RuntimeFailure(f"{peer}: {exc}")

    # ------------------------------------------------------------------ main

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
        )  # fmt: skip
        await self._start_broker()
        for name in plan.launched_nodes:
            data_dir = run_dir / name
            data_dir.mkdir(exist_ok=True)
            argv = [
                *self.options.node_command, "--name", name, "--broker", f"{LOCALHOST}:{self.broker_port}",
                "--host", LOCALHOST, "--data-dir", str(data_dir),
            ]  # fmt: skip
            child = self.supervisor.spawn(name, "node", argv, run_dir / f"{name}.log")
            self.emit(
                EventKind.PROCESS_STARTED, name=name, role="node", pid=child.pid, log=child.log_path.name, argv=argv
            )
        if plan.external_nodes:
            self._hand_off_external_nodes()
        self.phase = "before registering with the broker"
        await self._wait_registered()
        self.phase = "during the run"
        await self._connect_controls()
        origin = self.now()
        assert origin is not None
        self.timeline.begin(origin)
        self.emit(EventKind.TIMELINE_STARTED, duration_s=plan.duration_s)
        with self.progress:
            await self._drive()
        await self._collect_stats()

    async def _start_broker(self) -> None:
        port_file = self.run_dir / "broker.port"
        with contextlib.suppress(FileNotFoundError):
            port_file.unlink()
        argv = [
            sys.executable, "-m", "emulator.broker", "--scenario", str(self.run_dir / "scenario.json"),
            "--host", LOCALHOST, "--port", "0", "--port-file", str(port_file),
        ]  # fmt: skip
        if self.options.backend:
            argv += ["--backend", self.options.backend]
        child = self.supervisor.spawn("broker", "broker", argv, self.run_dir / "broker.log")
        self.emit(EventKind.PROCESS_STARTED, name="broker", role="broker", pid=child.pid, log="broker.log", argv=argv)
        self.progress.set_phase("starting the broker")
        port = None
        with trio.move_on_after(self.options.port_file_timeout_s):
            while port is None:
                self._check_children()
                port = _read_port(port_file)
                if port is None:
                    await trio.sleep(0.05)
        if port is None:
            raise RuntimeFailure(
                f"the broker did not write {port_file.name} within {self.options.port_file_timeout_s:g} s; "
                f"see {self._rel(child.log_path)}"
            )
        self.broker_port = port
        try:
            self.broker = await AdminClient.connect(
                LOCALHOST, port, self._tokens[ADMIN_TOKEN_ENV], peer="broker", timeout_s=self.options.request_timeout_s
            )
        except AdminError as exc:
            raise await self._blame(exc, "broker") from None
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
        path = self.run_dir / EXTERNAL_ENV_FILE
        lines = [
            f"# qnetem run {self.run_id}: credentials for the external node(s) "
            f"{', '.join(self.plan.external_nodes)}. Valid for this run only; keep private.",
            f"QNETEM_BROKER={LOCALHOST}:{self.broker_port}",
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
                f"qnetem node --name {name} --broker {LOCALHOST}:{self.broker_port}`"
            )

    async def _poll_broker(self) -> Any:
        assert self.broker is not None
        try:
            reply = await self.broker.status()
        except AdminError as exc:
            raise await self._blame(exc, "broker") from None
        self.clock.sync(reply.now_s, time.monotonic())
        return reply

    async def _wait_registered(self) -> None:
        self.progress.set_phase("waiting for nodes to register")
        timeout_s = self.options.registration_timeout_s
        if timeout_s is None:
            timeout_s = 600.0 if self.plan.external_nodes else 20.0
        with trio.move_on_after(timeout_s):
            while True:
                self._check_children()
                reply = await self._poll_broker()
                for name in self.tracker.update(reply.nodes):
                    status = self.tracker.status_of(name)
                    self.emit(
                        EventKind.NODE_REGISTERED, node=name,
                        external=name in self.plan.external_nodes,
                        control=_addr(status.control), tcp=_addr(status.tcp), udp=_addr(status.udp),
                    )  # fmt: skip
                if self.tracker.complete:
                    return
                await trio.sleep(0.1)
        self._check_children()
        missing = self.tracker.missing()
        parts = []
        for name in missing:
            if name in self.plan.external_nodes:
                parts.append(f"{name} (external: start it and point it at {LOCALHOST}:{self.broker_port})")
            else:
                parts.append(f"{name} (see {self._rel(self.run_dir / f'{name}.log')})")
        raise RuntimeFailure(
            f"registration timed out after {timeout_s:g} s: {len(missing)} node(s) did not register: {', '.join(parts)}"
        )

    async def _connect_controls(self) -> None:
        needed = {n for a in self.plan.apps for n in a.nodes}
        for name in self.plan.node_names:
            address = self.tracker.control_address(name)
            if address is None:
                if name in needed:
                    raise RuntimeFailure(f"node {name} registered without a control address; cannot start its apps")
                continue
            try:
                self.controls[name] = await AdminClient.connect(
                    address[0], address[1], self._tokens[ADMIN_TOKEN_ENV], peer=f"node {name}",
                    timeout_s=self.options.request_timeout_s,
                )
            except AdminError as exc:
                raise await self._blame(exc, f"node {name}") from None

    async def _drive(self) -> None:
        timeline = self.timeline
        while True:
            now = self.now()
            assert now is not None
            for app in timeline.due(now):
                await self._start_app(app)
            await self._poll_apps()
            self._check_children()
            reply = await self._poll_broker()
            lost = self.tracker.lost(reply.nodes)
            if lost:
                self._check_children()
                raise RuntimeFailure(f"node(s) {', '.join(lost)} lost their broker session during the run")
            now = self.now()
            assert now is not None
            self._show_progress(now)
            reason = timeline.finish_reason(now)
            if reason is not None:
                self.finish_reason = reason.value
                self.end_now_s = now
                return
            # Sleep one poll interval, or less if an app start or the deadline comes sooner.
            wake = [self.options.poll_interval_s]
            for target in (timeline.next_start_s(), timeline.deadline_s()):
                if target is not None:
                    wake.append(self.clock.wall_s_until(now, target))
            await trio.sleep(max(0.0, min(wake)))

    async def _start_app(self, app: Any) -> None:
        now = self.now()
        assert now is not None
        for request in app.start_requests():
            client = self.controls[request.node]
            try:
                await client.app_start(request.kind, request.name, dict(request.params))
            except AdminRequestError as exc:
                why = f"{request.role} {request.node} refused to start it: {exc}"
                change = self.timeline.mark_failed(app.name, why, now)
                if change is not None:
                    self.emit(EventKind.APP_FAILED, app=app.name, at_s=round(change.t_s, 6), error=change.error)
                return
            except AdminError as exc:
                raise await self._blame(exc, f"node {request.node}") from None
        change = self.timeline.mark_started(app.name, now)
        self.series.record(app.name, change.t_s, {"pairs_measured": 0})
        self.emit(
            EventKind.APP_STARTED, app=app.name, kind=app.kind, nodes=list(app.nodes), pairs=app.pairs,
            at_s=round(change.t_s, 6),
        )  # fmt: skip

    async def _poll_apps(self) -> None:
        for app in self.timeline.running():
            for role in ("responder", "initiator"):
                node = app.node_of(role)
                try:
                    status = await self.controls[node].app_status(app.name)
                except AdminRequestError as exc:
                    change = self.timeline.mark_failed(app.name, f"{role} {node}: {exc}", self.now() or 0.0)
                    if change is not None:
                        self.emit(EventKind.APP_FAILED, app=app.name, at_s=round(change.t_s, 6), error=change.error)
                    break
                except AdminError as exc:
                    raise await self._blame(exc, f"node {node}") from None
                now = self.now()
                assert now is not None
                if role == "initiator" and status.state != "failed":
                    self.series.record(app.name, self.timeline.elapsed_s(now), status.results)
                change = self.timeline.observe(app.name, role, status.state, status.results, now)
                if change is None:
                    continue
                if change.state is AppState.DONE:
                    metrics = {k: v for k, v in status.results.items() if isinstance(v, int | float)}
                    self.emit(EventKind.APP_DONE, app=app.name, at_s=round(change.t_s, 6), metrics=metrics)
                elif change.state is AppState.FAILED:
                    self.emit(EventKind.APP_FAILED, app=app.name, at_s=round(change.t_s, 6), error=change.error)
                    break

    def _show_progress(self, now: float) -> None:
        self.progress.set_clock(self.timeline.elapsed_s(now))
        for name, state, measured, _requested, rate in self.timeline.progress(now):
            self.progress.update_app(name, measured=measured, state=state.value, rate_hz=rate)

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

    async def _shutdown(self) -> None:
        """Graceful stop: `shutdown` to our nodes, then to the broker; then SIGTERM, then SIGKILL."""
        grace_s = self.options.shutdown_grace_s
        for child in self.supervisor.children:
            child.stopping = True
        ours = {c.name: c for c in self.supervisor.children if c.role == "node"}
        asked = []
        with trio.move_on_after(grace_s):
            async with trio.open_nursery() as nursery:
                for name, client in self.controls.items():
                    if name in ours:
                        asked.append(ours[name])
                        nursery.start_soon(_quiet_shutdown, client)
        for child in ours.values():
            if child not in asked:  # no control session to ask: straight to SIGTERM
                _killpg(child.pid, signal.SIGTERM)
        await self._wait_for_exit(list(ours.values()), grace_s)
        broker = [c for c in self.supervisor.children if c.role == "broker"]
        if self.broker is not None:
            with trio.move_on_after(grace_s):
                await _quiet_shutdown(self.broker)
            await self._wait_for_exit(broker, grace_s)
        else:
            for child in broker:
                _killpg(child.pid, signal.SIGTERM)
        for client in [*self.controls.values(), *([self.broker] if self.broker else [])]:
            await client.aclose()
        await self.supervisor.stop(grace_s)  # SIGTERM, then SIGKILL, whatever is left
        for child in self.supervisor.children:
            self._report_exit(child, expected=True)

    async def _wait_for_exit(self, children: list[ChildProcess], timeout_s: float) -> None:
        """Wait until `children` exited (reporting each exit as it happens), at most `timeout_s`."""
        with trio.move_on_after(timeout_s):
            while True:
                for child in children:
                    if child.poll() is not None:
                        self._report_exit(child, expected=True)
                if all(c.poll() is not None for c in children):
                    return
                await trio.sleep(0.02)

    # ------------------------------------------------------------------ results

    def finish(self) -> RunOutcome:
        """Evaluate expectations, write results.json and the last events (sync, after trio)."""
        if self.finish_reason == FinishReason.DURATION_ELAPSED:
            note = f"the app did not finish within the scenario duration ({self.plan.duration_s:g} s emulated)"
        elif self.interrupted is not None:
            note = "the run was interrupted before the app finished"
        else:
            note = "the run ended early, before the app finished (runtime failure)"
        outcomes: dict[str, AppOutcome] = self.timeline.outcomes(unfinished_note=note)
        expectations = evaluate_expectations(self.plan.expectations, outcomes)
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
        document["series"] = self.series.to_dict()
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


async def _quiet_shutdown(client: AdminClient) -> None:
    with contextlib.suppress(AdminError):
        await client.shutdown()


def _read_port(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if not text.isdigit():
        return None  # not written yet, or half written
    port = int(text)
    return port if 0 < port < 65536 else None


def _addr(address: Any) -> list[Any] | None:
    return None if address is None else [address[0], address[1]]
