"""The image (issue 3 part 1), built on the offline path: what runs inside it, what it carries.

Every container here is started with `remove=True` and the test's `org.qnetem.run`
label, so the conftest's leftover check covers it too.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import emulator
from emulator.kernels import get_backend
from emulator.runtime.image import (
    LABEL_DIGEST,
    LABEL_IMAGE,
    LABEL_VERSION,
    ImageError,
    build_image,
    ensure_image,
    source_digest,
)

pytestmark = pytest.mark.docker

ROOT = Path(__file__).resolve().parents[2]


def run_in(client: Any, image: str, argv: list[str], labels: dict[str, str]) -> str:
    """stdout of `argv` in a fresh container of `image` (removed afterwards)."""
    out = client.containers.run(image, argv, remove=True, labels=labels, stdout=True, stderr=False)
    return bytes(out).decode()


def test_version_matches_the_sources(docker_client: Any, qnetem_image: str, run_labels: dict[str, str]) -> None:
    out = run_in(docker_client, qnetem_image, ["qnetem", "--version"], run_labels)
    assert out == f"qnetem {emulator.__version__}\n"


def test_default_command_is_the_version(docker_client: Any, qnetem_image: str, run_labels: dict[str, str]) -> None:
    out = bytes(docker_client.containers.run(qnetem_image, remove=True, labels=run_labels)).decode()
    assert out == f"qnetem {emulator.__version__}\n"


def test_c_extension_loads_and_computes_like_the_host(
    docker_client: Any, qnetem_image: str, run_labels: dict[str, str]
) -> None:
    """The compiled module arrived in the wheel, loads, and its RNG matches the host's bit for bit."""
    script = (
        "import emulator._cext; from emulator.kernels import get_backend; "
        "print(type(get_backend('c')).__name__, get_backend('c').rng_u64(7, 3, 0, 4).tolist())"
    )
    out = run_in(docker_client, qnetem_image, ["python", "-c", script], run_labels)
    host = get_backend("c").rng_u64(7, 3, 0, 4).tolist()
    assert out == f"CBackend {host}\n"


def test_no_compiler_and_no_wheels(docker_client: Any, qnetem_image: str, run_labels: dict[str, str]) -> None:
    script = (
        "import glob, os, shutil; "
        "print([n for n in ('gcc', 'cc', 'c99', 'clang', 'tcc', 'g++') if shutil.which(n)], "
        "glob.glob('/usr/bin/*gcc*') + glob.glob('/usr/lib/gcc*'), os.path.exists('/wheels'))"
    )
    out = run_in(docker_client, qnetem_image, ["python", "-c", script], run_labels)
    assert out == "[] [] False\n"


def test_runs_as_non_root(docker_client: Any, qnetem_image: str, run_labels: dict[str, str]) -> None:
    script = "import os, pwd; print(os.getuid(), os.getgid(), pwd.getpwuid(os.getuid()).pw_name, os.getcwd())"
    out = run_in(docker_client, qnetem_image, ["python", "-c", script], run_labels)
    assert out == "10001 10001 qnetem /home/qnetem\n"
    assert docker_client.images.get(qnetem_image).attrs["Config"]["User"] == "10001:10001"


def test_labels_carry_version_and_current_digest(docker_client: Any, qnetem_image: str) -> None:
    labels = docker_client.images.get(qnetem_image).labels
    assert labels[LABEL_IMAGE] == "1"
    assert labels[LABEL_VERSION] == emulator.__version__
    assert labels[LABEL_DIGEST] == source_digest(ROOT)


def test_ensure_image_again_does_not_rebuild(docker_client: Any, qnetem_image: str) -> None:
    before = docker_client.images.get(qnetem_image).id
    lines: list[str] = []
    assert ensure_image(offline=True, log=lines.append) == qnetem_image
    assert docker_client.images.get(qnetem_image).id == before
    assert any("up to date" in line for line in lines), lines


def test_image_status_cli_says_up_to_date(qnetem_image: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "emulator", "image", "status", "--tag", qnetem_image],
        capture_output=True, text=True, cwd=ROOT, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "up to date" in proc.stdout


def test_unreachable_registry_points_to_offline(docker_client: Any) -> None:
    """Online path with a base that no registry serves: one line that names the offline build.

    127.0.0.1:9 (discard) refuses connections at once, so this neither waits for nor
    touches a real registry; nothing is created.
    """
    with pytest.raises(ImageError) as excinfo:
        build_image(
            offline=False, tag="qnetem-test-unreachable:never", base_image="127.0.0.1:9/qnetem-no-such-base:1", log=print
        )
    message = str(excinfo.value)
    assert "no registry reachable? use `qnetem image build --offline`" in message
    assert "\n" not in message
