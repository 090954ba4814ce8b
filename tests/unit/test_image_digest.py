"""The image builder's pure parts and the docker helpers' choices, without a Docker Engine.

- `source_digest`: what `ensure_image` compares with the image's label, so it must
  change with any source byte and ignore build products (tests/system covers the rest).
- wheel tags and base references: what the build accepts before asking the engine.
- `compose_command`: chosen with fake `docker`/`docker-compose` executables on PATH.
- failures with no engine, no root: one line, the right exception.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from emulator.runtime.dockerutil import DockerUnavailable, compose_command, docker_client, short_reason
from emulator.runtime.image import (
    IMAGE_GLIBC,
    ImageError,
    _check_project_wheel,
    _platform_tags,
    _split_ref,
    build_offline_base,
    source_digest,
    source_files,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A miniature source tree with one file in each digested part."""
    files = {
        "emulator/__init__.py": "__version__ = '9.9'\n",
        "emulator/broker/core.py": "X = 1\n",
        "nodes/__init__.py": "",
        "cext/qnetem.h": "int f(void);\n",
        "cext/qnetem_a.c": "int f(void) { return 1; }\n",
        "pyproject.toml": "[project]\nname = 'qnetem'\n",
        "setup.py": "from setuptools import setup\n",
        "compose/Dockerfile": "FROM scratch\n",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    return tmp_path


def test_digest_is_stable_and_hex(tree: Path) -> None:
    first = source_digest(tree)
    assert first == source_digest(tree)
    assert len(first) == 64 and int(first, 16) >= 0


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(lambda t: (t / "emulator/broker/core.py").write_text("X = 2\n"), id="python-edit"),
        pytest.param(lambda t: (t / "cext/qnetem_a.c").write_text("int f(void) { return 2; }\n"), id="c-edit"),
        pytest.param(lambda t: (t / "nodes/new.py").write_text(""), id="new-file"),
        pytest.param(lambda t: (t / "emulator/broker/core.py").rename(t / "emulator/broker/core2.py"), id="rename"),
        pytest.param(lambda t: (t / "pyproject.toml").write_text("[project]\nname = 'other'\n"), id="pyproject"),
        pytest.param(lambda t: (t / "compose/Dockerfile").write_text("FROM debian\n"), id="dockerfile"),
    ],
)
def test_digest_changes_with_the_sources(tree: Path, change: object) -> None:
    before = source_digest(tree)
    change(tree)  # type: ignore[operator]
    assert source_digest(tree) != before


def test_digest_ignores_build_products_and_other_files(tree: Path) -> None:
    before = source_digest(tree)
    products = [
        "emulator/__pycache__/__init__.cpython-311.pyc",
        "emulator/broker/__pycache__/core.cpython-311.pyc",
        "emulator/_cext.abi3.so",
        "emulator/_cext.c",  # cffi's generated wrapper
        "build/lib/emulator/__init__.py",
        "cext/build/temp/qnetem_a.o",
        "qnetem.egg-info/PKG-INFO",
        "nodes/qnetem.egg-info/PKG-INFO",
        "emulator/core.py~",
        "README.md",
        "tests/test_x.py",
        "compose/docker-compose.yml",
    ]
    for rel in products:
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        (tree / rel).write_text("anything")
    assert source_digest(tree) == before


def test_source_files_of_the_checkout() -> None:
    files = {p.as_posix() for p in source_files(ROOT)}
    assert {"emulator/__init__.py", "cext/qnetem.h", "pyproject.toml", "setup.py", "compose/Dockerfile"} <= files
    assert not any("__pycache__" in f or f.endswith((".so", ".pyc")) for f in files)
    assert not any(f.startswith(("tests/", "docs/", ".venv/")) for f in files)


def test_platform_tags_stop_at_bookworm_glibc() -> None:
    tags = _platform_tags("x86_64")
    assert f"manylinux_2_{IMAGE_GLIBC[1]}_x86_64" in tags
    assert f"manylinux_2_{IMAGE_GLIBC[1] + 1}_x86_64" not in tags
    assert "manylinux_2_17_x86_64" in tags and "manylinux2014_x86_64" in tags


@pytest.mark.parametrize(
    ("name", "ok"),
    [
        ("qnetem-0.1.0-cp311-cp311-linux_x86_64.whl", True),
        ("qnetem-0.1.0-cp38-abi3-linux_x86_64.whl", True),
        ("qnetem-0.1.0-cp312-cp312-linux_x86_64.whl", False),
        ("qnetem-0.1.0-cp311-cp311-linux_aarch64.whl", False),
    ],
)
def test_project_wheel_must_suit_the_image(name: str, ok: bool) -> None:
    if ok:
        _check_project_wheel(Path(name), "x86_64")
    else:
        with pytest.raises(ImageError):
            _check_project_wheel(Path(name), "x86_64")


@pytest.mark.parametrize(
    ("ref", "split"),
    [
        ("python:3.11-slim-bookworm", ("python", "3.11-slim-bookworm")),
        ("qnetem-base:bookworm", ("qnetem-base", "bookworm")),
        ("debian", ("debian", "latest")),
        ("127.0.0.1:5000/qnetem/base", ("127.0.0.1:5000/qnetem/base", "latest")),
        ("127.0.0.1:5000/qnetem/base:1", ("127.0.0.1:5000/qnetem/base", "1")),
    ],
)
def test_split_image_reference(ref: str, split: tuple[str, str]) -> None:
    assert _split_ref(ref) == split


def _fake_bin(tmp_path: Path, scripts: dict[str, str]) -> str:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in scripts.items():
        path = bin_dir / name
        path.write_text(f"#!/bin/sh\n{body}\n")
        path.chmod(0o755)
    return str(bin_dir)


def test_compose_prefers_the_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _fake_bin(tmp_path, {"docker": '[ "$1 $2" = "compose version" ] && exit 0; exit 1', "docker-compose": "exit 0"})
    monkeypatch.setenv("PATH", path)
    assert compose_command() == ["docker", "compose"]


def test_compose_falls_back_to_v1(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # docker without the plugin answers `docker compose version` with "unknown command", exit 1
    path = _fake_bin(tmp_path, {"docker": "echo 'unknown command' >&2; exit 1", "docker-compose": "exit 0"})
    monkeypatch.setenv("PATH", path)
    assert compose_command() == ["docker-compose"]


def test_compose_missing_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", _fake_bin(tmp_path, {"docker": "exit 1"}))
    with pytest.raises(DockerUnavailable) as excinfo:
        compose_command()
    assert "docker-compose" in str(excinfo.value) and "\n" not in str(excinfo.value)


def test_short_reason_finds_the_os_error() -> None:
    try:
        try:
            raise FileNotFoundError(2, "No such file or directory")
        except OSError as inner:
            raise RuntimeError(("Connection aborted.", inner)) from inner
    except RuntimeError as outer:
        assert short_reason(outer) == "No such file or directory"


def test_no_engine_is_docker_unavailable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-such.sock")
    with pytest.raises(DockerUnavailable) as excinfo:
        docker_client()
    assert "No such file or directory" in str(excinfo.value)


def test_cli_without_engine_is_one_line_exit_3(tmp_path: Path) -> None:
    env = {**os.environ, "DOCKER_HOST": f"unix://{tmp_path}/no-such.sock"}
    for argv in (["clean"], ["image", "status"]):
        proc = subprocess.run(
            [sys.executable, "-m", "emulator", *argv],
            capture_output=True, text=True, cwd=ROOT, timeout=60, check=False, env=env,
        )  # fmt: skip
        assert proc.returncode == 3, (argv, proc.stderr)
        assert proc.stderr.startswith("qnetem: error: ") and proc.stderr.count("\n") == 1, proc.stderr
        assert "No such file or directory" in proc.stderr


def test_offline_base_needs_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(ImageError, match="needs root for debootstrap"):
        build_offline_base(log=print)
