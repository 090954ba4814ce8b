"""`qnetem compose`: a scenario as a compose project that runs without qnetem's orchestrator.

Theory of operation
-------------------
`write_project(scenario, DIR)` writes

    DIR/docker-compose.yml      the services, networks and labels (below)
    DIR/qnetem.env              the run's secrets (QNETEM_TOKEN, QNETEM_ADMIN_TOKEN), mode 0600
    DIR/scenario/scenario.json  the normalised scenario, read by the broker and the conductor
    DIR/results/                where the conductor writes results.json, events.jsonl, report.html

and `docker compose up --exit-code-from conductor` (or `docker-compose ...`) then runs
the scenario: its exit status is the run's (0 passed, 1 an expectation failed, 2
invalid input, 3 runtime failure). The same file deploys on a Docker Swarm with
`docker stack deploy` (compose reads `version` 3.8 files, and 3.x is the newest
format `docker stack deploy` reads).

The deployment is the docker runtime's (`docker.py`), as services:

* `broker` (`broker_argv`), on the management network `mgmt` under the alias `broker`;
* `node-<name>` per node (`node_argv`: `--host 0.0.0.0 --dial-by-name`), on `mgmt`
  under `node-<name>` and on one *internal* network `link-<a>-<b>` (endpoints sorted)
  per classical link under its own name, so only a link's two endpoints share it and a
  node reaches its neighbour `bob` by that name on that link only;
* `conductor` (`qnetem conductor`, see `conductor.py`), on `mgmt`: it waits for the
  broker and the nodes, drives the timeline, cuts links through the nodes' control
  endpoints (so `link-cut` faults work), switches QKD eavesdroppers and cuts fibres
  through the broker's admin session (so the `qkd-*` faults work, and `fibre-cut`, which
  does both), checks expectations, writes results into the
  bind-mounted `results/` and exits with the run's status. It runs as the user who
  generated the project (`user: uid:gid`), so the results on the host are theirs.

Compatibility rules the document keeps (docker-compose 1.29, the compose plugin and
`docker stack deploy` all accept it):

* no `container_name` (a swarm refuses it) and no `ports` (nothing is published);
* `depends_on` in list form only (compose starts the conductor last; a swarm ignores
  it, which is harmless because nodes and conductor retry the broker);
* `deploy` (read by swarm, ignored by compose up): service labels, `restart_policy:
  none` (a crashed node stays down, as with compose), `endpoint_mode: dnsrr` (names
  resolve to the task's own address, not a virtual IP, as with compose), and the
  broker and the conductor placed on a manager: the node where `docker stack deploy`
  runs, so the `./scenario` and `./results` bind mounts exist there;
* every service has `env_file: [qnetem.env]`; the tokens never appear in the compose
  file (compose reads the env file client-side, as `docker stack deploy` does);
* labels `org.qnetem.run`, `org.qnetem.scenario` and `org.qnetem.compose` (the project
  name: the marker that a directory holds a qnetem compose project) on every service
  (container labels and `deploy.labels`) and network, so `qnetem clean` finds leftovers.

Node faults (crash, restart, freeze) need the container engine, which neither compose
nor the conductor drives: such scenarios are refused here, as are external nodes. Link
faults (`link-cut`, `fibre-cut`, `qkd-intercept-resend`, `qkd-pns`) are accepted.

`compose_document` is pure (unit-tested); `write_project`, `run_compose_up` and
`compose_down` are the I/O shell (files, subprocess).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import secrets
import signal
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

import emulator

from .docker import (
    BROKER_ALIAS,
    BROKER_PORT,
    LABEL_RUN,
    LABEL_SCENARIO,
    DockerNames,
    broker_argv,
    name_length_problems,
    node_argv,
)
from .driver import ADMIN_TOKEN_ENV, TOKEN_ENV, InvalidInput, RuntimeFailure, load_plan
from .orchestrator import FaultTarget, RunPlan

__all__ = [
    "COMPOSE_FILE",
    "COMPOSE_FILE_VERSION",
    "ENV_FILE",
    "LABEL_COMPOSE",
    "RESULTS_DIR",
    "SCENARIO_DIR",
    "ComposeProject",
    "compose_document",
    "compose_down",
    "compose_header",
    "run_compose_up",
    "write_project",
]

COMPOSE_FILE = "docker-compose.yml"
COMPOSE_FILE_VERSION = "3.8"  # the newest 3.x: docker-compose 1.29 and `docker stack deploy` both read it
ENV_FILE = "qnetem.env"
SCENARIO_DIR = "scenario"
RESULTS_DIR = "results"
LOG_FILE = "compose.log"
LABEL_COMPOSE = "org.qnetem.compose"  # value: the project name; marks a qnetem compose project
LABEL_ROLE = "org.qnetem.role"  # "broker" | "node" | "conductor" (as the docker runtime labels)
LABEL_NODE = "org.qnetem.node"
MGMT_NETWORK = "mgmt"
CONDUCTOR = "conductor"
RUN_ID_ENV = "QNETEM_RUN_ID"  # the conductor's run id, so results.json names the labelled run

_SCENARIO_IN_CONTAINER = "/scenario/scenario.json"
_RESULTS_IN_CONTAINER = "/results"
_MANAGER = "node.role == manager"  # where `docker stack deploy` runs, hence where the bind mounts are
_DOWN_TIMEOUT_S = 120.0
_INTERRUPT_GRACE_S = 30.0


# --------------------------------------------------------------------------- the document (pure)


def link_network(a: str, b: str) -> str:
    """The compose network of the classical link between `a` and `b` (endpoints sorted)."""
    first, second = sorted((a, b))
    return f"link-{first}-{second}"


def node_service(name: str) -> str:
    return f"node-{name}"


def _refusals(plan: RunPlan) -> list[str]:
    problems = []
    if plan.external_nodes:
        names = ", ".join(plan.external_nodes)
        problems.append(f"external nodes cannot run in a compose project; use `qnetem run` (external: {names})")
    problems += name_length_problems(plan.launched_nodes)
    for fault in plan.faults:
        if fault.kind.target is FaultTarget.NODE:
            problems.append(
                f"fault {fault.index} ({fault.describe()}): node faults need `qnetem run --runtime docker` or "
                "the local runtime; a compose project supports link-cut, fibre-cut and the qkd-* eavesdroppers only"
            )
    return problems


def compose_document(
    plan: RunPlan,
    *,
    image: str,
    run_id: str,
    conductor_user: str,
    backend: str | None = None,
    links: Sequence[tuple[str, str]] | None = None,
    project_name: str | None = None,
) -> dict[str, Any]:
    """The compose file of `plan` as a dict (see the module docstring for its shape).

    `links` are the classical links' endpoints in scenario order (default: `plan.links`);
    `project_name` is the marker label's value (default: `run_id`). Bind-mount sources
    are relative (`./scenario`, `./results`): compose and `docker stack deploy` both
    resolve them against the compose file's directory.
    Raises `InvalidInput` (one line per problem) for what a compose project cannot run:
    external nodes and node faults.
    """
    problems = _refusals(plan)
    if problems:
        raise InvalidInput(problems)
    if links is None:
        links = getattr(plan, "links", None)
        if links is None:
            raise TypeError("compose_document needs `links` (this RunPlan has no `links`)")
    link_list = [(str(a), str(b)) for a, b in links]
    launched = plan.launched_nodes
    labels = {LABEL_RUN: run_id, LABEL_SCENARIO: plan.name, LABEL_COMPOSE: project_name or run_id}
    environment = {"QNETEM_BACKEND": backend} if backend else {}
    scenario_mount = f"./{SCENARIO_DIR}:/scenario:ro"

    def service(
        role: str, command: list[str], networks: dict[str, Any], *, node: str | None = None, **extra: Any
    ) -> dict[str, Any]:
        container_labels = {**labels, LABEL_ROLE: role, **({LABEL_NODE: node} if node else {})}
        deploy: dict[str, Any] = {
            "labels": dict(container_labels),
            "endpoint_mode": "dnsrr",
            "restart_policy": {"condition": "none"},
        }
        if role != "node":
            deploy["placement"] = {"constraints": [_MANAGER]}
        return {
            "image": image,
            "command": list(command),
            **extra,
            "init": True,
            "env_file": [ENV_FILE],
            **({"environment": dict(environment)} if environment and "environment" not in extra else {}),
            "labels": container_labels,
            "networks": networks,
            "deploy": deploy,
        }

    services: dict[str, Any] = {}
    services["broker"] = service(
        "broker",
        broker_argv(_SCENARIO_IN_CONTAINER, backend),
        {MGMT_NETWORK: {"aliases": [BROKER_ALIAS]}},
        hostname="broker",
        volumes=[scenario_mount],
    )
    for name in launched:
        networks: dict[str, Any] = {MGMT_NETWORK: {"aliases": [DockerNames.mgmt_alias(name)]}}
        for a, b in link_list:
            if name in (a, b):
                networks[link_network(a, b)] = {"aliases": [name]}
        services[node_service(name)] = service("node", node_argv(name), networks, node=name, hostname=node_service(name))
    conductor_argv = [
        "qnetem", "conductor", "--scenario", _SCENARIO_IN_CONTAINER,
        "--broker", f"{BROKER_ALIAS}:{BROKER_PORT}", "--out", _RESULTS_IN_CONTAINER,
    ]  # fmt: skip
    services[CONDUCTOR] = service(
        CONDUCTOR,
        conductor_argv,
        {MGMT_NETWORK: {"aliases": [CONDUCTOR]}},
        user=conductor_user,
        # The image's working directory belongs to the image's user; another uid may not enter it.
        working_dir="/tmp",  # noqa: S108
        volumes=[scenario_mount, f"./{RESULTS_DIR}:{_RESULTS_IN_CONTAINER}"],
        environment={
            **environment,
            "MPLCONFIGDIR": "/tmp/matplotlib",  # noqa: S108 - the user may have no home in the image
            RUN_ID_ENV: run_id,
        },
        depends_on=list(services),
    )

    networks_doc: dict[str, Any] = {MGMT_NETWORK: {"labels": dict(labels)}}
    for a, b in link_list:
        networks_doc[link_network(a, b)] = {"internal": True, "labels": dict(labels)}
    return {"version": COMPOSE_FILE_VERSION, "services": services, "networks": networks_doc}


def compose_header(*, scenario: str, run_id: str, project_name: str) -> str:
    """The comment block at the top of docker-compose.yml: how to run it, and where the secrets are."""
    lines = [
        f"qnetem compose project: scenario {scenario}, run {run_id} (qnetem {emulator.__version__}).",
        "",
        "Run it from this directory with either compose spelling; the exit status is the run's",
        "(0 expectations held, 1 an expectation failed, 2 invalid input, 3 runtime failure):",
        f"  docker compose -p {project_name} up --exit-code-from conductor",
        f"  docker-compose -p {project_name} up --exit-code-from conductor",
        f"then remove what it created:  docker compose -p {project_name} down -v --remove-orphans",
        "Results (results.json, events.jsonl, report.html) appear in ./results.",
        "",
        "On a Docker Swarm, on a manager, from this directory (the broker and the conductor",
        "run on a manager, where ./scenario and ./results are; nodes run on any host that has the image):",
        f"  docker stack deploy --resolve-image never -c docker-compose.yml {project_name}",
        f"  docker service ps {project_name}_conductor    # Complete or Failed: the run is over",
        f"  docker stack rm {project_name}",
        "",
        "qnetem.env holds this run's secrets (the broker and admin tokens); compose and",
        "`docker stack deploy` read it. Keep it private (mode 0600); never copy it into this file.",
        "Node faults (crash, restart, freeze) need `qnetem run --runtime docker`.",
    ]
    return "".join(f"# {line}\n" if line else "#\n" for line in lines)


# --------------------------------------------------------------------------- writing a project (I/O)


@dataclasses.dataclass(frozen=True, slots=True)
class ComposeProject:
    """A written compose project (`write_project`)."""

    out_dir: Path
    compose_file: Path
    run_id: str
    project_name: str
    services: tuple[str, ...]

    @property
    def env_file(self) -> Path:
        return self.out_dir / ENV_FILE

    @property
    def results_dir(self) -> Path:
        return self.out_dir / RESULTS_DIR

    @property
    def log_file(self) -> Path:
        return self.out_dir / LOG_FILE


def _previous_project(compose_file: Path) -> bool:
    """Whether `compose_file` was written by `write_project` (its networks carry our marker)."""
    try:
        document = yaml.safe_load(compose_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False
    labels: Any = document
    for key in ("networks", MGMT_NETWORK, "labels"):
        labels = labels.get(key) if isinstance(labels, Mapping) else None
    return isinstance(labels, Mapping) and bool(labels.get(LABEL_COMPOSE))


def _check_out_dir(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise InvalidInput([f"{out_dir}: exists and is not a directory"])
    if not out_dir.is_dir() or not any(out_dir.iterdir()):
        return
    if not _previous_project(out_dir / COMPOSE_FILE):
        raise InvalidInput(
            [f"{out_dir}: not empty and not a qnetem compose project; choose an empty or new directory"]
        )
    results = out_dir / RESULTS_DIR
    if results.is_dir() and any(results.iterdir()):
        raise InvalidInput(
            [f"{results}: holds a previous run's results; move them away or choose another directory"]
        )


def _write_private(path: Path, text: str) -> None:
    """Create `path` afresh with mode 0600 (never widened by the umask, never an old file's mode)."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        os.fchmod(handle.fileno(), 0o600)
        handle.write(text)


def write_project(
    scenario_path: Path,
    out_dir: Path,
    *,
    image: str | None = None,
    backend: str | None = None,
) -> ComposeProject:
    """Validate the scenario and write its compose project into `out_dir` (see the module docstring).

    `out_dir` must be new, empty, or a previous qnetem compose project whose `results/`
    is empty.
    Raises `InvalidInput` with every problem; `OSError` when the files cannot be written.
    """
    from emulator.scenario import scenario_to_dict

    scenario, plan = load_plan(Path(scenario_path))
    links = [(str(link.endpoints[0]), str(link.endpoints[1])) for link in scenario.links]
    out_dir = Path(out_dir)
    _check_out_dir(out_dir)
    token = secrets.token_hex(4)
    run_id = f"{plan.name}-compose-{token}"
    project_name = f"qnetem-{token}"
    document = compose_document(
        plan,
        image=image or f"qnetem:{emulator.__version__}",
        run_id=run_id,
        conductor_user=f"{os.getuid()}:{os.getgid()}",
        backend=backend,
        links=links,
        project_name=project_name,
    )  # before anything is created: a refused scenario leaves no directory behind

    out_dir.mkdir(parents=True, exist_ok=True)
    out_dir = out_dir.resolve()
    scenario_dir = out_dir / SCENARIO_DIR
    scenario_dir.mkdir(exist_ok=True)
    scenario_dir.chmod(0o755)  # the broker runs as the image's user: it must read the scenario
    scenario_file = scenario_dir / "scenario.json"
    scenario_file.write_text(json.dumps(scenario_to_dict(scenario), indent=2) + "\n", encoding="utf-8")
    scenario_file.chmod(0o644)
    results = out_dir / RESULTS_DIR
    results.mkdir(exist_ok=True)
    results.chmod(0o755)  # the conductor runs as this user
    env = (
        f"# qnetem run {run_id}: the run's secrets, read by every service (env_file). Keep private.\n"
        f"{TOKEN_ENV}={secrets.token_urlsafe(32)}\n"
        f"{ADMIN_TOKEN_ENV}={secrets.token_urlsafe(32)}\n"
    )
    _write_private(out_dir / ENV_FILE, env)
    compose_file = out_dir / COMPOSE_FILE
    body = yaml.safe_dump(document, sort_keys=False, default_flow_style=False)
    header = compose_header(scenario=plan.name, run_id=run_id, project_name=project_name)
    compose_file.write_text(header + body, encoding="utf-8")
    return ComposeProject(out_dir, compose_file, run_id, project_name, tuple(document["services"]))


# --------------------------------------------------------------------------- running it (I/O)


def _compose_argv(project: ComposeProject, *args: str) -> list[str]:
    from .dockerutil import compose_command

    return [*compose_command(), "-p", project.project_name, "-f", str(project.compose_file), *args]


def _run_logged(argv: list[str], project: ComposeProject, *, timeout_s: float, what: str) -> int:
    """Run `argv` in the project directory, output appended to compose.log; SIGINT then kill on timeout."""
    with project.log_file.open("ab") as log:
        log.write(f"$ {' '.join(argv)}\n".encode())
        log.flush()
        process = subprocess.Popen(  # noqa: S603 - argv built here, no shell
            argv, cwd=project.out_dir, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
        )
        try:
            return process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            # Ctrl-C is how a user stops `compose up`: it stops the containers before exiting.
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=_INTERRUPT_GRACE_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            raise RuntimeFailure(
                f"{what} did not finish within {timeout_s:g} s; see {project.log_file}"
            ) from None
        except BaseException:
            process.kill()
            process.wait()
            raise


def run_compose_up(project: ComposeProject, *, timeout_s: float) -> int:
    """`compose up --exit-code-from conductor` in the project directory; the run's exit status.

    Output goes to `compose.log`. Raises `DockerUnavailable` without a compose command and
    `RuntimeFailure` when the run does not end within `timeout_s` (compose is interrupted,
    which stops the containers; call `compose_down` to remove them).
    """
    argv = _compose_argv(project, "up", "--exit-code-from", CONDUCTOR)
    return _run_logged(argv, project, timeout_s=timeout_s, what="compose up")


def compose_down(project: ComposeProject, *, timeout_s: float = _DOWN_TIMEOUT_S) -> int:
    """`compose down -v --remove-orphans`: remove the project's containers, networks and volumes."""
    argv = _compose_argv(project, "down", "-v", "--remove-orphans")
    return _run_logged(argv, project, timeout_s=timeout_s, what="compose down")
