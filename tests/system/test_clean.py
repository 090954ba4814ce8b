"""`qnetem clean` (issue 3): labelled containers, networks and volumes go; nothing else does.

Objects are created directly through the SDK with `org.qnetem.run` labels; `clean` runs
through the CLI (`python -m emulator clean`), as a user would. The unlabelled network
and volume (proof that clean is selective) are removed by the test itself.
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from emulator.runtime.cleanup import LABEL_RUN

pytestmark = pytest.mark.docker

ROOT = Path(__file__).resolve().parents[2]
SLEEP = ["python3", "-c", "import time; time.sleep(60)"]


@dataclass
class Objects:
    run_id: str
    container: Any
    network: Any
    volume: Any


def make_objects(client: Any, image: str, run_id: str) -> Objects:
    name = f"qnetem-test-{run_id}"
    labels = {LABEL_RUN: run_id}
    container = client.containers.run(image, SLEEP, detach=True, labels=labels, name=name)
    network = client.networks.create(name, labels=labels)
    volume = client.volumes.create(name=name, labels=labels)
    return Objects(run_id, container, network, volume)


def exists(obj: Any) -> bool:
    import docker.errors

    try:
        obj.reload()
    except docker.errors.NotFound:
        return False
    return True


def qnetem_clean(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "emulator", "clean", *args],
        capture_output=True, text=True, cwd=ROOT, timeout=120, check=False,
    )  # fmt: skip


@pytest.fixture
def unlabelled(docker_client: Any) -> Iterator[tuple[Any, Any]]:
    """A network and a volume without the run label (carrying another label to be traceable)."""
    name = f"qnetem-test-unlabelled-{uuid.uuid4().hex[:12]}"
    network = docker_client.networks.create(name, labels={"org.qnetem.test": "unlabelled"})
    volume = docker_client.volumes.create(name=name, labels={"org.qnetem.test": "unlabelled"})
    yield network, volume
    for obj in (network, volume):
        if exists(obj):
            obj.remove()


def test_clean_run_removes_that_run_only(
    docker_client: Any, qnetem_image: str, run_id: str, unlabelled: tuple[Any, Any]
) -> None:
    mine = make_objects(docker_client, qnetem_image, run_id)
    other = make_objects(docker_client, qnetem_image, f"{run_id}-other")
    try:
        assert mine.container.status in ("created", "running")

        first = qnetem_clean("--run", run_id)
        assert first.returncode == 0, first.stderr
        for obj in (mine.container, mine.network, mine.volume):
            assert not exists(obj)
            assert obj.name in first.stdout
        assert "removed containers 1, networks 1, volumes 1" in first.stdout
        for obj in (other.container, other.network, other.volume, *unlabelled):
            assert exists(obj), obj.name

        second = qnetem_clean("--run", run_id)
        assert second.returncode == 0, second.stderr
        assert second.stdout == f"clean (run {run_id}): nothing to remove\n"
    finally:
        qnetem_clean("--run", other.run_id)
    assert not exists(other.container)


def test_clean_removes_every_run_and_is_idempotent(
    docker_client: Any, qnetem_image: str, run_id: str, unlabelled: tuple[Any, Any]
) -> None:
    runs = [make_objects(docker_client, qnetem_image, f"{run_id}-{i}") for i in range(2)]

    first = qnetem_clean()
    assert first.returncode == 0, first.stderr
    for objects in runs:
        for obj in (objects.container, objects.network, objects.volume):
            assert not exists(obj), obj.name
    for obj in unlabelled:
        assert exists(obj), obj.name

    second = qnetem_clean()
    assert second.returncode == 0, second.stderr
    assert second.stdout == "clean (all runs): nothing to remove\n"

