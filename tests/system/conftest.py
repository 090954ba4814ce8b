"""Fixtures of the system tests (tests/system): the Docker Engine, the qnetem image, no leftovers.

- `docker_client` (session): a client of an engine that answered a ping; without one,
  every test using it is skipped with the reason ("no Docker Engine answers: ..."),
  which `-ra` prints in the summary: never a silent pass.
- `qnetem_image` (session): `ensure_image(offline=True)`, the offline path the issue
  asks CI to exercise (debootstrap base + docker import); built once, then reused while
  the sources' digest is unchanged.
- `run_id`: a fresh `org.qnetem.run` value for what a test creates.
- after every test marked `docker`: nothing labelled `org.qnetem.run` may remain. What
  remains is named in the failure, then removed so that later tests start clean.

Every module here sets `pytestmark = pytest.mark.docker`.
"""

from __future__ import annotations

import sys
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from emulator.runtime.cleanup import LABEL_RUN, clean, leftovers
from emulator.runtime.dockerutil import DockerUnavailable
from emulator.runtime.dockerutil import docker_client as _docker_client
from emulator.runtime.image import ImageError, ensure_image


def _log(line: str) -> None:
    print(f"[qnetem image] {line}", file=sys.stderr, flush=True)


@pytest.fixture(scope="session")
def docker_client() -> Iterator[Any]:
    try:
        client = _docker_client()
    except DockerUnavailable as exc:
        pytest.skip(f"no Docker Engine answers: {exc}")
    yield client
    client.close()


@pytest.fixture(scope="session")
def qnetem_image(docker_client: Any) -> str:
    try:
        return ensure_image(offline=True, log=_log)
    except ImageError as exc:
        pytest.fail(f"cannot build the qnetem image (offline path): {exc}", pytrace=False)


@pytest.fixture
def run_id() -> str:
    return f"test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def run_labels(run_id: str) -> dict[str, str]:
    return {LABEL_RUN: run_id}


@pytest.fixture(autouse=True)
def _no_qnetem_leftovers(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if request.node.get_closest_marker("docker") is None:
        return
    try:
        client = _docker_client()
    except DockerUnavailable:
        return  # the test was skipped for the same reason
    try:
        remaining = leftovers(client)
        if remaining:
            clean(client=client)
            found = "; ".join(f"{kind}: {', '.join(names)}" for kind, names in remaining.items())
            pytest.fail(f"left behind with label {LABEL_RUN} (now removed): {found}", pytrace=False)
    finally:
        client.close()
