"""Building the image every qnetem container runs (`qnetem image build`, issue 3 part 1).

Theory of operation:

1. **Wheels on the host.** The project wheel is built from a clean copy of the source
   tree with the host's compiler (`pip wheel --no-deps`), so the C extension arrives
   compiled and the image needs no compiler. The runtime dependencies come as
   binary wheels for CPython 3.11 on manylinux (`pip download --only-binary=:all:
   --platform ...`), cached under `~/.cache/qnetem/wheels/<key>` where the key is a
   hash of the dependency list and the target platform, so a rebuild needs no network.
2. **Base image.** With a registry reachable, the official `python:3.11-slim-bookworm`
   (pulled once if absent). With none (`offline=True`), `qnetem-base:bookworm`:
   `debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates
   bookworm` into a temporary root, tarred and `docker import`ed. Both are Debian
   bookworm with CPython 3.11 and glibc 2.36, which fixes the wheels' platform tags.
3. **Build.** A temporary context holds `compose/Dockerfile` and `wheels/`; the
   Dockerfile installs with `--no-index` into a venv at /opt/qnetem (nothing is
   fetched during the build) and copies only the venv into the final stage.
4. **Up to date or not.** The image carries `org.qnetem.source-digest`, a SHA-256
   over the package sources (`source_digest`). `ensure_image()` builds only when no
   image with the tag carries the current digest, so tests and the docker runtime can
   call it before every use.

An I/O shell (subprocess, the docker SDK). Failures raise `ImageError` with one line.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import emulator

from .dockerutil import DockerUnavailable, docker_client, short_reason

if TYPE_CHECKING:
    import docker

__all__ = [
    "DEFAULT_BASE_IMAGE",
    "OFFLINE_BASE_IMAGE",
    "ImageError",
    "ImageInfo",
    "build_image",
    "build_offline_base",
    "default_tag",
    "ensure_image",
    "image_status",
    "source_digest",
    "source_files",
    "source_root",
]

Log = Callable[[str], None]

DEFAULT_BASE_IMAGE = "python:3.11-slim-bookworm"
OFFLINE_BASE_IMAGE = "qnetem-base:bookworm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
DEBIAN_SUITE = "bookworm"
DEBIAN_PACKAGES = ("python3", "python3-venv", "ca-certificates")

LABEL_IMAGE = "org.qnetem.image"
LABEL_VERSION = "org.qnetem.version"
LABEL_DIGEST = "org.qnetem.source-digest"
LABEL_BUILD = "org.qnetem.build"

#: The interpreter of both bases (Debian bookworm's python3 and the official 3.11 image).
IMAGE_PYTHON = (3, 11)
#: glibc of Debian bookworm: the newest manylinux tag the image can load.
IMAGE_GLIBC = (2, 36)
#: manylinux_2_17 is manylinux2014, the oldest tag current wheels use.
_OLDEST_MANYLINUX_GLIBC_MINOR = 17

#: What the image is built from; a change to any of these files changes the digest.
SOURCE_PARTS = ("emulator", "nodes", "cext", "pyproject.toml", "setup.py", "MANIFEST.in", "compose/Dockerfile")
#: Needed to build the wheel but not part of what the image runs (pyproject's `readme`).
_BUILD_ONLY = ("README.md",)
_SKIP_DIRS = frozenset({"__pycache__", "build", "dist", ".pytest_cache", ".mypy_cache", ".hypothesis"})
_SKIP_SUFFIXES = frozenset({".pyc", ".pyo", ".so", ".o", ".pyd", ".dylib", ".swp"})
#: Build artefacts that land inside the package: cffi's generated wrapper.
_SKIP_FILES = frozenset({"emulator/_cext.c"})

_LOG_TAIL_LINES = 5
_BUILD_TIMEOUT_S = 3600


class ImageError(Exception):
    """The image (or its base) could not be built or inspected; the message is one line."""


@dataclass(frozen=True, slots=True)
class ImageInfo:
    """What `qnetem image status` shows about one local image."""

    tag: str
    image_id: str
    version: str | None
    source_digest: str | None
    size_bytes: int
    created: str
    #: True when the digest label equals the digest of the sources beside this package;
    #: None when there are no sources to compare with (an installed package).
    current: bool | None


# --- sources ------------------------------------------------------------------------


def source_root() -> Path:
    """The source checkout this `emulator` package lives in (an editable install or a checkout)."""
    root = Path(emulator.__file__).resolve().parent.parent
    missing = [name for name in ("pyproject.toml", "setup.py", "cext", "nodes") if not (root / name).exists()]
    if missing:
        raise ImageError(
            f"no qnetem source tree at {root} (missing {', '.join(missing)}): "
            "`qnetem image build` runs from a checkout or an editable install"
        )
    return root


def _skipped(rel: Path) -> bool:
    if any(part in _SKIP_DIRS or part.endswith(".egg-info") for part in rel.parts[:-1]):
        return True
    name = rel.name
    return rel.suffix in _SKIP_SUFFIXES or name.endswith("~") or rel.as_posix() in _SKIP_FILES


def source_files(root: Path, parts: Iterable[str] = SOURCE_PARTS) -> list[Path]:
    """The files under `parts` of `root` that the image is built from, relative and sorted.

    Byte-code caches, compiled objects and build directories are skipped: they are
    products of the sources, and they differ between machines that built the same tree.
    """
    found: list[Path] = []
    for part in parts:
        top = root / part
        if top.is_file():
            found.append(Path(part))
        elif top.is_dir():
            for dirpath, dirnames, filenames in os.walk(top):
                dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS and not d.endswith(".egg-info")]
                for name in filenames:
                    rel = (Path(dirpath) / name).relative_to(root)
                    if not _skipped(rel):
                        found.append(rel)
    return sorted(found, key=lambda p: p.as_posix())


def source_digest(root: Path | None = None) -> str:
    """64 hex digits of SHA-256 over the relative path and bytes of every `source_files` entry."""
    root = source_root() if root is None else root
    h = hashlib.sha256()
    for rel in source_files(root):
        h.update(rel.as_posix().encode())
        h.update(b"\0")
        h.update((root / rel).read_bytes())
        h.update(b"\0")
    return h.hexdigest()


def default_tag() -> str:
    """$QNETEM_IMAGE if set (every qnetem command then uses that image), else `qnetem:<version>`."""
    return os.environ.get("QNETEM_IMAGE") or f"qnetem:{emulator.__version__}"


def project_dependencies(root: Path) -> list[str]:
    """`[project].dependencies` of the checkout's pyproject.toml."""
    try:
        with open(root / "pyproject.toml", "rb") as f:
            data = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ImageError(f"cannot read {root / 'pyproject.toml'}: {exc}") from exc
    deps = data.get("project", {}).get("dependencies", [])
    return sorted(str(d) for d in deps)


# --- wheels -------------------------------------------------------------------------


def _cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "qnetem"


def _platform_tags(arch: str) -> list[str]:
    """Every manylinux tag a bookworm image on `arch` loads (pip does not expand PEP 600 tags itself)."""
    major, newest = IMAGE_GLIBC
    tags = [f"manylinux_{major}_{minor}_{arch}" for minor in range(newest, _OLDEST_MANYLINUX_GLIBC_MINOR - 1, -1)]
    return [*tags, f"manylinux2014_{arch}"]  # pip expands manylinux2014 to 2010 and 1


def _run_logged(argv: list[str], *, what: str, log_path: Path, env: dict[str, str] | None = None) -> None:
    """Run argv with its output in log_path; on failure ImageError naming `what` and the log's last lines."""
    with open(log_path, "ab") as out:
        try:
            proc = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env)
        except OSError as exc:
            raise ImageError(f"{what}: cannot run {argv[0]}: {exc.strerror or exc}") from exc
    if proc.returncode != 0:
        raise ImageError(f"{what} failed (exit {proc.returncode}): {_tail(log_path)}")


def _tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    kept = [" ".join(line.split()) for line in text if line.strip()][-lines:]
    return " | ".join(kept) or "(empty log)"


def _dependency_wheels(root: Path, arch: str, log: Log) -> Path:
    """A directory of binary wheels for every runtime dependency, from the cache or pip download."""
    deps = project_dependencies(root)
    platforms = _platform_tags(arch)
    py = f"{IMAGE_PYTHON[0]}{IMAGE_PYTHON[1]}"
    key_src = json.dumps({"deps": deps, "python": py, "platforms": platforms}, sort_keys=True)
    key = hashlib.sha256(key_src.encode()).hexdigest()[:16]
    cache = _cache_root() / "wheels"
    final = cache / key
    if (final / ".complete").is_file():
        log(f"dependency wheels: cached in {final}")
        return final
    cache.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=cache))
    try:
        log(f"dependency wheels: downloading {len(deps)} dependencies (and theirs) for cp{py} {platforms[0]}")
        argv = [
            sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--quiet",
            "--only-binary=:all:", "--implementation", "cp", "--python-version", f"{IMAGE_PYTHON[0]}.{IMAGE_PYTHON[1]}",
            "--abi", f"cp{py}", *[arg for p in platforms for arg in ("--platform", p)],
            "--dest", str(staging), *deps,
        ]  # fmt: skip
        _run_logged(argv, what="downloading the dependency wheels (is PyPI reachable?)", log_path=staging / "pip.log")
        (staging / "pip.log").unlink()
        (staging / ".complete").write_text(key_src + "\n")
        try:
            staging.rename(final)
        except OSError:  # another build finished the same key first: use that one
            if not (final / ".complete").is_file():
                raise
        return final
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _has_build_requirements() -> bool:
    """Whether this interpreter can build the wheel without an isolated (networked) build environment."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        setuptools_major = int(version("setuptools").split(".")[0])
        version("cffi")
        version("wheel")
    except (PackageNotFoundError, ValueError):
        return False
    return setuptools_major >= 77  # pyproject.toml [build-system] requires setuptools>=77


def _wheel_tags(name: str) -> tuple[str, str, str]:
    """(python, abi, platform) tags of a wheel file name (PEP 427)."""
    parts = name[: -len(".whl")].split("-")
    return parts[-3], parts[-2], parts[-1]


def _check_project_wheel(wheel: Path, arch: str) -> None:
    py, abi, plat = _wheel_tags(wheel.name)
    want = f"cp{IMAGE_PYTHON[0]}{IMAGE_PYTHON[1]}"
    if want not in py.split(".") and not (abi == "abi3" and py.startswith("cp3")):
        running = f"{sys.version_info.major}.{sys.version_info.minor}"
        raise ImageError(
            f"the project wheel {wheel.name} is for Python {running}, the image runs "
            f"{IMAGE_PYTHON[0]}.{IMAGE_PYTHON[1]}: build with a Python {IMAGE_PYTHON[0]}.{IMAGE_PYTHON[1]} venv"
        )
    if not plat.endswith(arch):
        raise ImageError(f"the project wheel {wheel.name} is not for the engine's architecture {arch}")


def _project_wheel(root: Path, dest: Path, arch: str, log: Log) -> tuple[Path, str]:
    """Build the qnetem wheel (C extension compiled here) from a clean copy of the sources.

    A copy rather than the checkout: the build then sees exactly the digested files,
    and leaves no build/ or egg-info behind in a tree that others may be using.
    Returns the wheel and the digest of the copy (what the wheel was built from, even
    if the checkout changes meanwhile).
    """
    with tempfile.TemporaryDirectory(prefix="qnetem-src-") as tmp:
        src = Path(tmp) / "src"
        for rel in [*source_files(root), *(Path(p) for p in _BUILD_ONLY if (root / p).is_file())]:
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(root / rel, src / rel)
        digest = source_digest(src)
        out = Path(tmp) / "out"
        # Without isolation when this interpreter has the build requirements: no network needed.
        isolation = ["--no-build-isolation"] if _has_build_requirements() else []
        log(f"project wheel: building qnetem {emulator.__version__} with {sys.executable}")
        argv = [
            sys.executable, "-m", "pip", "wheel", "--disable-pip-version-check", "--quiet", "--no-deps",
            *isolation, "--wheel-dir", str(out), str(src),
        ]  # fmt: skip
        _run_logged(argv, what="building the qnetem wheel", log_path=Path(tmp) / "wheel.log")
        wheels = sorted(out.glob("qnetem-*.whl"))
        if len(wheels) != 1:
            raise ImageError(f"building the qnetem wheel produced {len(wheels)} wheels in {out}, expected 1")
        _check_project_wheel(wheels[0], arch)
        dest.mkdir(parents=True, exist_ok=True)
        target = dest / wheels[0].name
        shutil.copy2(wheels[0], target)
        return target, digest


# --- docker helpers -----------------------------------------------------------------


def _client() -> docker.DockerClient:
    try:
        return docker_client()
    except DockerUnavailable as exc:
        raise ImageError(str(exc)) from exc


def _get_image(client: docker.DockerClient, ref: str) -> Any | None:
    import docker.errors

    try:
        return client.images.get(ref)
    except docker.errors.ImageNotFound:
        return None
    except docker.errors.APIError as exc:
        raise ImageError(f"cannot inspect image {ref}: {short_reason(exc)}") from exc


def _split_ref(ref: str) -> tuple[str, str]:
    """("repo", "tag") of an image reference; the tag defaults to latest (a registry port is not a tag)."""
    repo, sep, tag = ref.rpartition(":")
    if not sep or "/" in tag:
        return ref, "latest"
    return repo, tag


def _arch(client: docker.DockerClient) -> str:
    arch = str(client.info().get("Architecture") or "x86_64")
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(arch, arch)


def _human_size(n_bytes: int) -> str:
    return f"{n_bytes / 1e6:.0f} MB"


# --- the offline base ---------------------------------------------------------------


def _mounts_under(path: Path) -> list[str]:
    """Mount points at or below `path` (debootstrap mounts proc and sys in the target)."""
    prefix = str(path)
    found = []
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 4:
                    point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
                    if point == prefix or point.startswith(prefix + "/"):
                        found.append(point)
    except OSError:
        pass
    return sorted(found, key=len, reverse=True)


def _remove_rootfs(workdir: Path, log: Log) -> None:
    """Delete the debootstrap work directory, after unmounting anything a failed run left mounted.

    rmtree through a live /proc or a bind mount would reach outside the directory, so a
    mount that will not go away leaves the directory in place (and says so).
    """
    for point in _mounts_under(workdir):
        subprocess.run(["umount", "-l", point], stdin=subprocess.DEVNULL, capture_output=True, check=False)
    still = _mounts_under(workdir)
    if still:
        log(f"warning: not deleting {workdir}: still mounted: {', '.join(still)}")
        return
    shutil.rmtree(workdir, ignore_errors=True)


def _trim_rootfs(rootfs: Path) -> None:
    """What a container never reads: package lists, manuals, documentation (copyright notices stay)."""
    for rel in ("var/lib/apt/lists", "usr/share/man", "usr/share/info", "var/cache/apt"):
        target = rootfs / rel
        if target.is_dir():
            for child in target.iterdir():
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child, ignore_errors=True)
                elif child.name != "lock":
                    child.unlink(missing_ok=True)
    doc = rootfs / "usr/share/doc"
    if doc.is_dir():
        for path in sorted(doc.rglob("*"), reverse=True):
            if path.is_file() or path.is_symlink():
                if path.name != "copyright":
                    path.unlink(missing_ok=True)
            elif path.is_dir() and not any(path.iterdir()):
                path.rmdir()


def _debootstrap() -> str:
    found = shutil.which("debootstrap") or next(
        (p for p in ("/usr/sbin/debootstrap", "/sbin/debootstrap") if os.access(p, os.X_OK)), None
    )
    if found is None:
        raise ImageError(
            "debootstrap is not installed: `apt-get install debootstrap` (needed once by `qnetem image build --offline`)"
        )
    return found


def build_offline_base(
    *, mirror: str | None = None, tag: str = OFFLINE_BASE_IMAGE, log: Log = print, client: Any = None
) -> str:
    """Build `tag` (Debian bookworm minbase + python3, python3-venv) with debootstrap and docker import.

    Needs root (debootstrap creates device nodes and chroots) and the Debian mirror
    (`mirror`, else $QNETEM_DEBIAN_MIRROR, else deb.debian.org); no container registry.
    """
    if os.geteuid() != 0:
        raise ImageError(
            "the offline base needs root for debootstrap: run `sudo qnetem image build --offline` once "
            f"(later builds reuse {tag})"
        )
    debootstrap = _debootstrap()
    mirror = mirror or os.environ.get("QNETEM_DEBIAN_MIRROR") or DEFAULT_MIRROR
    client = client if client is not None else _client()
    workdir = Path(tempfile.mkdtemp(prefix="qnetem-rootfs-"))
    try:
        rootfs = workdir / "rootfs"
        started = time.monotonic()
        log(f"offline base: debootstrap {DEBIAN_SUITE} (minbase + {', '.join(DEBIAN_PACKAGES)}) from {mirror}")
        argv = [
            debootstrap, "--variant=minbase", f"--include={','.join(DEBIAN_PACKAGES)}",
            DEBIAN_SUITE, str(rootfs), mirror,
        ]  # fmt: skip
        env = {**os.environ, "PATH": os.environ.get("PATH", "") + ":/usr/sbin:/sbin"}
        _run_logged(argv, what=f"debootstrap {DEBIAN_SUITE} from {mirror}", log_path=workdir / "debootstrap.log", env=env)
        _trim_rootfs(rootfs)
        tarball = workdir / "rootfs.tar"
        _run_logged(
            ["tar", "-C", str(rootfs), "--numeric-owner", "-cf", str(tarball), "."],
            what="packing the base root filesystem",
            log_path=workdir / "tar.log",
        )
        repo, image_tag = _split_ref(tag)
        changes = [
            f"LABEL {LABEL_IMAGE}=1",
            "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "ENV LANG=C.UTF-8",
            'CMD ["python3"]',
        ]
        try:
            client.api.import_image(src=str(tarball), repository=repo, tag=image_tag, changes=changes)
        except Exception as exc:  # docker.errors.APIError and requests errors alike
            raise ImageError(f"docker import of the base root filesystem failed: {short_reason(exc)}") from exc
        image = _get_image(client, tag)
        if image is None:
            raise ImageError(f"docker import reported success but {tag} does not exist")
        size = int(image.attrs.get("Size") or 0)
        log(f"offline base: {tag} built in {time.monotonic() - started:.1f} s ({_human_size(size)})")
        return tag
    finally:
        _remove_rootfs(workdir, log)


# --- the project image --------------------------------------------------------------


def _labels(image: Any) -> dict[str, str]:
    return dict((image.attrs.get("Config") or {}).get("Labels") or {})


def _ensure_base(
    client: Any, *, offline: bool, base_image: str | None, mirror: str | None, rebuild_base: bool, log: Log
) -> str:
    import docker.errors

    if offline:
        base = base_image or OFFLINE_BASE_IMAGE
        if base == OFFLINE_BASE_IMAGE:
            if rebuild_base or _get_image(client, base) is None:
                build_offline_base(mirror=mirror, tag=base, log=log, client=client)
            else:
                log(f"offline base: {base} present (rebuild with --rebuild-base)")
        elif _get_image(client, base) is None:
            raise ImageError(f"base image {base} is not present locally, and an offline build never pulls")
        return base
    base = base_image or DEFAULT_BASE_IMAGE
    if _get_image(client, base) is None:
        log(f"base: pulling {base}")
        repo, tag = _split_ref(base)
        try:
            client.images.pull(repo, tag=tag)
        except (docker.errors.DockerException, OSError) as exc:
            raise ImageError(
                f"cannot pull the base image {base} ({short_reason(exc)}): "
                "no registry reachable? use `qnetem image build --offline`"
            ) from exc
    return base


def _stream_build(client: Any, *, context: Path, tag: str, buildargs: dict[str, str], log: Log) -> None:
    """Run the build, logging its steps; ImageError with the last log lines on failure."""
    import docker.errors

    tail: deque[str] = deque(maxlen=200)
    error: str | None = None
    try:
        chunks: Iterator[dict[str, Any]] = client.api.build(
            path=str(context), tag=tag, buildargs=buildargs, rm=True, forcerm=True, pull=False,
            decode=True, timeout=_BUILD_TIMEOUT_S,
        )  # fmt: skip
        for chunk in chunks:
            if "stream" in chunk:
                for line in str(chunk["stream"]).splitlines():
                    if line.strip():
                        tail.append(line.rstrip())
                        if line.startswith("Step "):
                            log(f"build: {line.strip()}")
            if "error" in chunk:
                error = " ".join(str(chunk["error"]).split())
    except (docker.errors.DockerException, OSError) as exc:
        error = short_reason(exc)
    if error is not None:
        last = " | ".join(" ".join(line.split()) for line in list(tail)[-_LOG_TAIL_LINES:])
        raise ImageError(f"image build failed: {error}" + (f" (last build output: {last})" if last else ""))


def build_image(
    *,
    offline: bool,
    tag: str | None = None,
    base_image: str | None = None,
    mirror: str | None = None,
    rebuild_base: bool = False,
    force: bool = False,
    log: Log = print,
) -> str:
    """Build (or keep) the qnetem image and return its tag.

    An image with `tag` whose source-digest label equals the digest of the current
    sources is kept unless `force` (or `rebuild_base`) is set. `mirror` and
    `rebuild_base` concern the offline base only.
    """
    tag = tag or default_tag()
    root = source_root()
    digest = source_digest(root)
    client = _client()
    try:
        existing = _get_image(client, tag)
        if existing is not None and not (force or rebuild_base) and _labels(existing).get(LABEL_DIGEST) == digest:
            log(f"image {tag} is up to date (source digest {digest[:12]}); not rebuilding")
            return tag
        base = _ensure_base(
            client, offline=offline, base_image=base_image, mirror=mirror, rebuild_base=rebuild_base, log=log
        )
        started = time.monotonic()
        arch = _arch(client)
        # Stage 1 of the Dockerfile is labelled with this build's id, so that its leftover
        # image can be removed afterwards without touching other builds.
        build_id = uuid.uuid4().hex[:12]
        try:
            with tempfile.TemporaryDirectory(prefix="qnetem-image-") as tmp:
                context = Path(tmp)
                wheels = context / "wheels"
                wheels.mkdir()
                for wheel in _dependency_wheels(root, arch, log).glob("*.whl"):
                    shutil.copy2(wheel, wheels / wheel.name)
                _, digest = _project_wheel(root, wheels, arch, log)
                shutil.copy2(root / "compose" / "Dockerfile", context / "Dockerfile")
                log(f"build: {tag} from {base}")
                buildargs = {
                    "BASE_IMAGE": base,
                    "QNETEM_VERSION": emulator.__version__,
                    "QNETEM_SOURCE_DIGEST": digest,
                    "QNETEM_BUILD_ID": build_id,
                }
                _stream_build(client, context=context, tag=tag, buildargs=buildargs, log=log)
        finally:
            _remove_leftovers(client, build_id=build_id)
        image = _get_image(client, tag)
        if image is None or _labels(image).get(LABEL_DIGEST) != digest:
            raise ImageError(f"the build finished but {tag} does not carry source digest {digest[:12]}")
        size = int(image.attrs.get("Size") or 0)
        log(f"image {tag} built in {time.monotonic() - started:.1f} s ({_human_size(size)}, {image.short_id})")
        return tag
    finally:
        client.close()


def _remove_leftovers(client: Any, *, build_id: str) -> None:
    """Remove this build's stage-1 image and unused untagged qnetem images (earlier builds).

    Stage images of builds still running elsewhere carry `org.qnetem.build` and are left
    alone; images a container still uses are kept by the engine's prune.
    """
    import docker.errors

    for filters in (
        {"dangling": True, "label": [LABEL_IMAGE, f"{LABEL_BUILD}={build_id}"]},
        {"dangling": True, "label": LABEL_IMAGE, "label!": LABEL_BUILD},
    ):
        try:
            client.images.prune(filters=filters)
        except docker.errors.APIError:
            pass  # a concurrent prune; the next build tries again


def ensure_image(*, offline: bool | None = None, tag: str | None = None, log: Log = print) -> str:
    """The qnetem image for the current sources, built only if missing or stale; returns the tag.

    `offline=None` picks the base that is already local: the official Python image if
    present, else `qnetem-base:bookworm` if present, else the official one (pulled).
    Without a source tree (qnetem installed from a wheel) there is no digest to compare:
    an image labelled with this qnetem version is accepted, and none can be built.
    """
    tag = tag or default_tag()
    client = _client()
    try:
        try:
            source_root()
        except ImageError as exc:
            image = _get_image(client, tag)
            if image is not None and _labels(image).get(LABEL_VERSION) == emulator.__version__:
                return tag
            raise ImageError(f"no image {tag} for qnetem {emulator.__version__}, and {exc}") from exc
        if offline is None:
            offline = _get_image(client, DEFAULT_BASE_IMAGE) is None and _get_image(client, OFFLINE_BASE_IMAGE) is not None
    finally:
        client.close()
    return build_image(offline=offline, tag=tag, log=log)


def image_status(tag: str | None = None) -> ImageInfo | None:
    """What the local image `tag` (default `qnetem:<version>`) is, or None when there is none."""
    tag = tag or default_tag()
    client = _client()
    try:
        image = _get_image(client, tag)
    finally:
        client.close()
    if image is None:
        return None
    labels = _labels(image)
    try:
        current: bool | None = labels.get(LABEL_DIGEST) == source_digest(source_root())
    except ImageError:
        current = None
    return ImageInfo(
        tag=tag,
        image_id=str(image.id),
        version=labels.get(LABEL_VERSION),
        source_digest=labels.get(LABEL_DIGEST),
        size_bytes=int(image.attrs.get("Size") or 0),
        created=str(image.attrs.get("Created") or ""),
        current=current,
    )
