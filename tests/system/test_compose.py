"""`qnetem compose` end to end (issue 3): the generated project runs with compose and on a swarm.

1. `compose up --exit-code-from conductor` (whichever spelling answers: the plugin or
   docker-compose v1) runs the quickstart: exit 0, results.json passed, report.html;
2. the same scenario with an expectation no emulator can meet exits 1 and says failed;
3. the same file on a single-node swarm (`docker stack deploy`): the conductor's task
   completes and its results passed. The swarm is initialised by the test when the
   engine is not in one, and left again afterwards; an existing swarm is left as found
   (only our stack is removed).

After each test nothing labelled with the project's run id remains (checked here for
the run id, and by the conftest's autouse check for any qnetem label).
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from emulator.runtime.cleanup import LABEL_RUN, clean, leftovers
from emulator.runtime.compose import ComposeProject, compose_down, run_compose_up, write_project
from emulator.runtime.dockerutil import DockerUnavailable, compose_command

pytestmark = [pytest.mark.docker]

ROOT = Path(__file__).resolve().parents[2]
TWO_NODE = ROOT / "scenarios" / "two-node-epr.yaml"
UP_TIMEOUT_S = 300.0  # image start + registration + a ~1 s run; generous for a loaded CI host
SWARM_RUN_TIMEOUT_S = 300.0
SWARM_REMOVAL_TIMEOUT_S = 60.0  # `docker stack rm` returns before the tasks and networks are gone
FINAL_TASK_STATES = frozenset({"complete", "failed", "shutdown", "rejected", "orphaned", "remove"})


def log(line: str) -> None:
    print(f"[compose test] {line}", file=sys.stderr, flush=True)


@pytest.fixture(scope="module")
def compose_available(docker_client: Any) -> None:
    try:
        compose_command()
    except DockerUnavailable as exc:
        pytest.skip(str(exc))


def remaining(client: Any, run_id: str) -> dict[str, list[str]]:
    return leftovers(client, run_id)


@contextlib.contextmanager
def compose_project(project: ComposeProject, client: Any) -> Iterator[ComposeProject]:
    """`down -v` however the test ends; then nothing of the run may remain."""
    try:
        yield project
    finally:
        status = compose_down(project)
        assert status == 0, f"compose down exited {status}; see {project.log_file}"
        left = remaining(client, project.run_id)
        if left:
            clean(run_id=project.run_id, client=client)
        assert not left, f"compose down left {left}"


def read_results(project: ComposeProject) -> dict[str, Any]:
    path = project.results_dir / "results.json"
    assert path.is_file(), f"no results.json; see {project.log_file}"
    results: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return results


def log_tail(project: ComposeProject, lines: int = 40) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(project.log_file.read_text(errors="replace").splitlines()[-lines:])
    return "(no compose.log)"


# --------------------------------------------------------------------------- compose up


def test_compose_up_runs_the_quickstart(
    docker_client: Any, qnetem_image: str, compose_available: None, tmp_path: Path
) -> None:
    project = write_project(TWO_NODE, tmp_path / "project", image=qnetem_image)
    with compose_project(project, docker_client):
        started = time.monotonic()
        status = run_compose_up(project, timeout_s=UP_TIMEOUT_S)
        log(f"compose up (two-node-epr) took {time.monotonic() - started:.1f} s, exit {status}")
        assert status == 0, log_tail(project)
        # The containers carried the run's labels (what `qnetem clean` relies on).
        labelled = docker_client.containers.list(all=True, filters={"label": f"{LABEL_RUN}={project.run_id}"})
        assert len(labelled) == len(project.services)
        results = read_results(project)
        assert results["status"] == "passed"
        assert results["exit_code"] == 0
        expectations = results["expectations"]
        assert len(expectations) == 4
        assert all(e["passed"] for e in expectations), expectations
        assert (project.results_dir / "report.html").is_file()
        assert (project.results_dir / "events.jsonl").is_file()
    assert not remaining(docker_client, project.run_id)


def test_compose_up_exit_status_of_a_failed_expectation(
    docker_client: Any, qnetem_image: str, compose_available: None, tmp_path: Path
) -> None:
    text = TWO_NODE.read_text(encoding="utf-8")
    bound = "{metric: fidelity, app: epr-test-0, min: 0.925}"
    assert bound in text
    # The model's fidelity is 0.9625 (see the scenario's comment): 0.999 is out of reach.
    scenario = tmp_path / "impossible.yaml"
    scenario.write_text(text.replace(bound, "{metric: fidelity, app: epr-test-0, min: 0.999}"), encoding="utf-8")
    project = write_project(scenario, tmp_path / "project", image=qnetem_image)
    with compose_project(project, docker_client):
        status = run_compose_up(project, timeout_s=UP_TIMEOUT_S)
        assert status == 1, log_tail(project)
        results = read_results(project)
        assert results["status"] == "failed"
        assert results["exit_code"] == 1
        failed = [e for e in results["expectations"] if not e["passed"]]
        assert [e["metric"] for e in failed] == ["fidelity"]
    assert not remaining(docker_client, project.run_id)


def test_the_conductor_cuts_and_restores_a_link(
    docker_client: Any, qnetem_image: str, compose_available: None, tmp_path: Path
) -> None:
    """A link-cut fault in a compose project: the conductor has the nodes cut it (control endpoints)."""
    data = yaml.safe_load(TWO_NODE.read_text(encoding="utf-8"))
    data.update(
        apps=[{"kind": "epr-test", "name": "epr", "nodes": ["alice", "bob"], "pairs": 20000}],
        faults=[{"at": "500ms", "kind": "link-cut", "link": ["alice", "bob"], "for": "1s"}],
        expect=[{"metric": "pairs_measured", "app": "epr", "min": 20000}],
    )
    scenario = tmp_path / "cut.yaml"
    scenario.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    project = write_project(scenario, tmp_path / "project", image=qnetem_image)
    with compose_project(project, docker_client):
        status = run_compose_up(project, timeout_s=UP_TIMEOUT_S)
        assert status == 0, log_tail(project)
        results = read_results(project)
        assert results["run_id"] == project.run_id  # the conductor reports under the project's labels
        assert [(s["step"], s["action"]) for s in results["faults"]["steps"]] == [
            ("apply", "cut"), ("revert", "restore"),
        ]  # fmt: skip
        for node, peer in (("alice", "bob"), ("bob", "alice")):
            link = results["stats"]["nodes"][node]["links"][peer]
            assert link["cuts"] == 1 and link["cut"] is False and link["connected"] is True, link
    assert not remaining(docker_client, project.run_id)


# --------------------------------------------------------------------------- swarm


def docker_cli(*args: str, cwd: Path | None = None, timeout_s: float = 120.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["docker", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout_s, check=False,
    )  # fmt: skip


@contextlib.contextmanager
def single_node_swarm(client: Any) -> Iterator[None]:
    """A swarm this engine manages: initialised here (and left afterwards) when there was none."""
    state = client.info().get("Swarm", {})
    created = False
    if state.get("LocalNodeState") == "inactive":
        init = docker_cli("swarm", "init", "--advertise-addr", "127.0.0.1", "--listen-addr", "127.0.0.1:2377")
        if init.returncode == 0:
            created = True
            log("initialised a single-node swarm (127.0.0.1)")
        elif "already part of a swarm" not in init.stderr:  # another test may have just made one
            pytest.fail(f"docker swarm init failed: {init.stderr.strip()}", pytrace=False)
        state = client.info().get("Swarm", {})
    if not state.get("ControlAvailable"):
        pytest.skip(f"this engine is in a swarm but not a manager (state {state.get('LocalNodeState')})")
    try:
        yield
    finally:
        if created:
            leave = docker_cli("swarm", "leave", "--force")
            assert leave.returncode == 0, f"docker swarm leave failed: {leave.stderr.strip()}"


def conductor_state(client: Any, stack: str) -> str | None:
    """The conductor task's state (`running`, `complete`, `failed`, ...), None before it exists."""
    services = client.services.list(filters={"name": f"{stack}_conductor"})
    tasks = [task for service in services for task in service.tasks()]
    if not tasks:
        return None
    newest = max(tasks, key=lambda task: task.get("CreatedAt", ""))
    return str(newest.get("Status", {}).get("State"))


def wait_removed(client: Any, run_id: str, timeout_s: float) -> dict[str, list[str]]:
    deadline = time.monotonic() + timeout_s
    while True:
        left = remaining(client, run_id)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.5)


def test_stack_deploy_on_a_single_node_swarm(docker_client: Any, qnetem_image: str, tmp_path: Path) -> None:
    project = write_project(TWO_NODE, tmp_path / "project", image=qnetem_image)
    stack = project.project_name
    with single_node_swarm(docker_client):
        try:
            started = time.monotonic()
            # Relative paths (env_file, ./scenario, ./results) are resolved by the CLI
            # against the compose file's directory; the image is local, not in a registry.
            deploy = docker_cli("stack", "deploy", "--resolve-image", "never", "-c", "docker-compose.yml", stack,
                                cwd=project.out_dir)  # fmt: skip
            assert deploy.returncode == 0, deploy.stderr
            deadline = started + SWARM_RUN_TIMEOUT_S
            state = None
            while time.monotonic() < deadline:
                state = conductor_state(docker_client, stack)
                if state in FINAL_TASK_STATES and (project.results_dir / "results.json").is_file():
                    break
                time.sleep(1.0)
            log(f"stack deploy to conductor {state} took {time.monotonic() - started:.1f} s")
            if state != "complete":
                logs = docker_cli("service", "logs", f"{stack}_conductor")
                pytest.fail(f"conductor task {state}: {(logs.stdout + logs.stderr)[-3000:]}", pytrace=False)
            # Swarm services and their containers carry the labels `qnetem clean` looks for.
            found = leftovers(docker_client, project.run_id)
            assert len(found.get("services", [])) == len(project.services)
            assert len(found["containers"]) == len(project.services)
            results = read_results(project)
            assert results["status"] == "passed"
            assert results["exit_code"] == 0
            assert all(e["passed"] for e in results["expectations"])
            assert (project.results_dir / "report.html").is_file()
        finally:
            removal_started = time.monotonic()
            docker_cli("stack", "rm", stack)
            left = wait_removed(docker_client, project.run_id, SWARM_REMOVAL_TIMEOUT_S)
            log(f"stack rm: {time.monotonic() - removal_started:.1f} s, left {left or 'nothing'}")
            if left:
                # Swarm sometimes keeps an overlay network with a stale load-balancer
                # endpoint after `stack rm` (moby#32620-style); `qnetem clean` is the
                # documented way to remove such leftovers, and it must manage.
                clean(run_id=project.run_id, client=docker_client)
                left = wait_removed(docker_client, project.run_id, SWARM_REMOVAL_TIMEOUT_S)
        assert not left, f"docker stack rm and qnetem clean left {left}"
