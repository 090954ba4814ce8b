"""The local runtime: broker and nodes as subprocesses on 127.0.0.1.

Theory of operation
-------------------
`LocalDeployment` is the `Deployment` (see `driver`) that `qnetem run` uses by default:

* the broker is `python -m emulator.broker --scenario RUN/scenario.json --host 127.0.0.1
  --port 0 --port-file RUN/broker.port`; the deployment waits for the port file;
* each non-external node is `python -m nodes --name N --broker 127.0.0.1:PORT --host
  127.0.0.1 --data-dir RUN/N`, logging to `RUN/N.log` (appended to across restarts);
* the run token and the admin token reach children only through their environment.

Children never outlive the run. Each child runs in its own session/process group (a
Ctrl-C in the terminal reaches only the orchestrator, which then shuts everything down
in order) and, on Linux, with `PR_SET_PDEATHSIG = SIGKILL` so that even a SIGKILLed
orchestrator takes them down. PDEATHSIG fires when the *thread* that forked the child
exits, so children are spawned synchronously from the trio (main) thread, never from a
worker thread. Shutdown is graceful first (the driver's `shutdown` on each control
session, nodes before the broker), then SIGTERM to each process group, then SIGKILL
after a grace period; a last synchronous sweep SIGKILLs whatever is still alive if even
that was interrupted.

Faults act on process groups: node-crash is SIGKILL, node-restart SIGTERM (then
SIGKILL after the grace period), node-freeze SIGSTOP / SIGCONT. Classical link cuts
are made by the nodes themselves (the driver sends `link_fault` to both ends), since
loopback cannot be unplugged without privileges.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, Any

import trio
from rich.console import Console

import emulator
from emulator.report.events import EventKind

from .driver import (
    BrokerAccess,
    InvalidInput,
    LaunchContext,
    RunOptions,
    RunOutcome,
    RuntimeFailure,
    load_plan,
)
from .driver import run_scenario as _run_scenario

__all__ = [
    "ChildProcess",
    "InvalidInput",
    "LocalDeployment",
    "ProcessSupervisor",
    "RunOptions",
    "RunOutcome",
    "RuntimeFailure",
    "load_plan",
    "run_scenario",
]

LOCALHOST = "127.0.0.1"
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
DEFAULT_NODE_COMMAND: tuple[str, ...] = (sys.executable, "-m", "nodes")


def run_scenario(options: RunOptions, *, console: Console | None = None) -> RunOutcome:
    """Run a scenario (the runtime `options.runtime` names, local by default)."""
    return _run_scenario(options, console=console)


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


def _child_env(tokens: dict[str, str] | Any, backend: str | None) -> dict[str, str]:
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


class LocalDeployment:
    """Broker and nodes as local processes (see the module docstring)."""

    cuts_links = False

    kms_bind_host: str | None = None  # the scenario's kms.host (127.0.0.1 unless it says otherwise)

    def __init__(self, context: LaunchContext) -> None:
        self.context = context
        self.supervisor = ProcessSupervisor(_child_env(context.tokens, context.options.backend), context.run_dir)
        self.latest: dict[str, ChildProcess] = {}  # name -> its current process
        self.broker_port: int | None = None

    # ------------------------------------------------------------------ starting

    def _spawn(self, name: str, role: str, argv: list[str], *, restart: bool = False) -> ChildProcess:
        log_path = self.context.run_dir / f"{name}.log"
        child = self.supervisor.spawn(name, role, argv, log_path)
        self.latest[name] = child
        fields: dict[str, Any] = {"restart": True} if restart else {}
        self.context.emit(
            EventKind.PROCESS_STARTED, name=name, role=role, pid=child.pid, log=log_path.name, argv=argv, **fields
        )
        return child

    async def start_broker(self) -> BrokerAccess:
        run_dir, options = self.context.run_dir, self.context.options
        port_file = run_dir / "broker.port"
        with contextlib.suppress(FileNotFoundError):
            port_file.unlink()
        argv = [
            sys.executable, "-m", "emulator.broker", "--scenario", str(run_dir / "scenario.json"),
            "--host", LOCALHOST, "--port", "0", "--port-file", str(port_file),
        ]  # fmt: skip
        if options.backend:
            argv += ["--backend", options.backend]
        child = self._spawn("broker", "broker", argv)
        port = None
        with trio.move_on_after(options.port_file_timeout_s):
            while port is None:
                self.check("while starting")
                port = _read_port(port_file)
                if port is None:
                    await trio.sleep(0.05)
        if port is None:
            raise RuntimeFailure(
                f"the broker did not write {port_file.name} within {options.port_file_timeout_s:g} s; "
                f"see {self.context.rel(child.log_path)}"
            )
        self.broker_port = port
        return BrokerAccess(admin=(LOCALHOST, port), for_nodes=f"{LOCALHOST}:{port}")

    async def start_node(self, name: str, *, restart: bool = False) -> None:
        assert self.broker_port is not None, "start the broker first"
        data_dir = self.context.run_dir / name
        data_dir.mkdir(exist_ok=True)
        command = self.context.options.node_command or DEFAULT_NODE_COMMAND
        argv = [
            *command, "--name", name, "--broker", f"{LOCALHOST}:{self.broker_port}",
            "--host", LOCALHOST, "--data-dir", str(data_dir),
        ]  # fmt: skip
        self._spawn(name, "node", argv, restart=restart)

    async def start_nodes(self, names: Iterable[str]) -> None:
        for name in names:  # spawned from the trio thread, in order (PDEATHSIG: see the docstring)
            await self.start_node(name)

    def control_address(self, name: str, reported: tuple[str, int]) -> tuple[str, int]:
        return reported

    # ------------------------------------------------------------------ watching

    def check(self, phase: str) -> None:
        for child in self.supervisor.unexpected_exits():
            child.stopping = True  # report once
            self._report_exit(child, expected=False)
            what = "the broker" if child.role == "broker" else f"node {child.name}"
            raise RuntimeFailure(
                f"{what} (pid {child.pid}) {child.describe_exit()} {phase}; see {self.context.rel(child.log_path)}"
            )

    async def settle(self, timeout_s: float) -> None:
        with trio.move_on_after(timeout_s):
            while not self.supervisor.unexpected_exits():
                await trio.sleep(0.05)

    def expect_exit(self, name: str) -> None:
        child = self.latest.get(name)
        if child is not None:
            child.stopping = True

    def _report_exit(self, child: ChildProcess, *, expected: bool) -> None:
        if child.reported_exit or child.popen.returncode is None:
            return
        child.reported_exit = True
        self.context.emit(
            EventKind.PROCESS_EXITED, name=child.name, role=child.role, pid=child.pid,
            returncode=child.popen.returncode, expected=expected,
        )  # fmt: skip

    def _children(self, names: Iterable[str]) -> list[ChildProcess]:
        return [self.latest[n] for n in names if n in self.latest]

    async def wait_exited(self, names: Iterable[str], timeout_s: float) -> None:
        """Wait until `names` exited (reporting each exit as it happens), at most `timeout_s`."""
        children = self._children(names)
        with trio.move_on_after(timeout_s):
            while True:
                for child in children:
                    if child.poll() is not None:
                        self._report_exit(child, expected=True)
                if all(c.poll() is not None for c in children):
                    return
                await trio.sleep(0.02)

    # ------------------------------------------------------------------ faults

    def _signal(self, name: str, sig: int) -> ChildProcess:
        child = self.latest.get(name)
        if child is None:
            raise RuntimeFailure(f"node {name} was not started by this run")
        _killpg(child.pid, sig)
        return child

    async def kill_node(self, name: str) -> None:
        self.expect_exit(name)
        self._signal(name, signal.SIGKILL)
        await self.wait_exited([name], 5.0)

    async def stop_node(self, name: str, grace_s: float) -> None:
        self.expect_exit(name)
        child = self._signal(name, signal.SIGTERM)
        await self.wait_exited([name], grace_s)
        if child.poll() is None:
            _killpg(child.pid, signal.SIGKILL)
            await self.wait_exited([name], 5.0)

    async def freeze_node(self, name: str) -> None:
        self._signal(name, signal.SIGSTOP)

    async def thaw_node(self, name: str) -> None:
        self._signal(name, signal.SIGCONT)

    async def cut_link(self, a: str, b: str) -> None:  # pragma: no cover - cuts_links is False
        raise RuntimeFailure("the local runtime cuts links through the nodes' control endpoints")

    async def restore_link(self, a: str, b: str) -> None:  # pragma: no cover - cuts_links is False
        raise RuntimeFailure("the local runtime restores links through the nodes' control endpoints")

    # ------------------------------------------------------------------ the end

    async def terminate(self, names: Iterable[str]) -> None:
        for child in self._children(names):
            child.stopping = True
            if child.poll() is None:
                _killpg(child.pid, signal.SIGTERM)

    async def stop_all(self, grace_s: float) -> None:
        await self.supervisor.stop(grace_s)  # SIGTERM, then SIGKILL, whatever is left
        for child in self.supervisor.children:
            self._report_exit(child, expected=True)

    def kill_all_now(self) -> None:
        self.supervisor.kill_all_now()


def _read_port(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if not text.isdigit():
        return None  # not written yet, or half written
    port = int(text)
    return port if 0 < port < 65536 else None
