"""One-way imports (DESIGN §1, CONVENTIONS 5), checked by walking every module's AST.

Rules:
1. `emulator` never imports `nodes`.
2. `nodes` imports from the shared side only `emulator.wire`, `emulator.physics`,
   `emulator.kernels`, `emulator.testing` (and the bare `emulator` package for its version).
3. Protocol logic does no I/O: only the shells listed in `IO_MODULES` may import trio,
   sockets, asyncio, subprocess, selectors or ssl — or import those shells.
"""

from __future__ import annotations

import ast
import fnmatch
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("emulator", "nodes")

NODES_MAY_IMPORT = ("emulator.wire", "emulator.physics", "emulator.kernels", "emulator.testing")
IO_LIBRARIES = ("trio", "socket", "asyncio", "subprocess", "selectors", "ssl", "http", "httpx", "docker")
IO_MODULES = (
    "emulator/cli.py",
    "emulator/__main__.py",
    "emulator/runtime/*.py",
    "emulator/broker/server.py",
    "emulator/broker/__main__.py",
    "nodes/runtime.py",
    "nodes/__main__.py",
    "nodes/transport/*_io.py",
    # Key management shells: the KME service, its HTTPS servers and the ETSI/SKIP client.
    "nodes/kms/service.py",
    "nodes/kms/https.py",
    "nodes/kms/client.py",
)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> Iterator[tuple[int, str]]:
    """Yield (line, absolute module name) for every import in the file, relative ones resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module_name(path)
    if path.name != "__init__.py":
        package = package.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                prefix = ".".join(base)
                mod = f"{prefix}.{node.module}" if node.module else prefix
            else:
                mod = node.module or ""
            yield node.lineno, mod
            for alias in node.names:  # `from emulator import broker` imports emulator.broker
                yield node.lineno, f"{mod}.{alias.name}"


def _is_io_module(mod: str) -> bool:
    as_path = mod.replace(".", "/") + ".py"
    return any(fnmatch.fnmatch(as_path, pattern) for pattern in IO_MODULES)


def violations(path: Path) -> list[str]:
    rel = path.relative_to(ROOT).as_posix()
    top = rel.split("/")[0]
    is_io = any(fnmatch.fnmatch(rel, pattern) for pattern in IO_MODULES)
    found = []
    for line, mod in imports_of(path):
        root = mod.split(".")[0]
        where = f"{rel}:{line} imports {mod}"
        if top == "emulator" and root == "nodes":
            found.append(f"{where} (emulator must never import nodes)")
        if top == "nodes" and root == "emulator" and mod != "emulator":
            if not any(mod == allowed or mod.startswith(allowed + ".") for allowed in NODES_MAY_IMPORT):
                # `from emulator import wire` yields both "emulator" and "emulator.wire"; only submodules count
                found.append(f"{where} (nodes may import only {', '.join(NODES_MAY_IMPORT)})")
        if not is_io and root in IO_LIBRARIES:
            found.append(f"{where} (protocol logic must not do I/O; only {', '.join(IO_MODULES)} may)")
        if not is_io and _is_io_module(mod):
            found.append(f"{where} (protocol logic must not import an I/O shell)")
    return found


def all_modules() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def test_there_are_modules_to_check() -> None:
    assert len(all_modules()) > 10


@pytest.mark.parametrize("path", all_modules(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_imports_follow_the_layering(path: Path) -> None:
    assert violations(path) == []


def test_checker_catches_violations(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The checker itself must flag each kind of violation, or the tests above prove nothing."""
    monkeypatch.setattr(f"{__name__}.ROOT", tmp_path)
    (tmp_path / "emulator" / "physics").mkdir(parents=True)
    (tmp_path / "nodes" / "qkd").mkdir(parents=True)
    bad_emulator = tmp_path / "emulator" / "physics" / "bad.py"
    bad_emulator.write_text("import trio\nfrom nodes.qkd import sifting\n")
    bad_nodes = tmp_path / "nodes" / "qkd" / "bad.py"
    bad_nodes.write_text("from emulator.broker import core\nfrom ..transport import tcp_io\nimport socket\n")
    ok_io = tmp_path / "nodes" / "runtime.py"
    ok_io.write_text("import trio\nfrom emulator.wire import decode\nfrom emulator import wire\n")
    found = violations(bad_emulator)
    assert any("imports trio" in v for v in found)
    assert any("never import nodes" in v for v in found)
    found = violations(bad_nodes)
    assert any("emulator.broker" in v for v in found)
    assert any("socket" in v for v in found)
    assert any("I/O shell" in v for v in found)
    assert violations(ok_io) == []
