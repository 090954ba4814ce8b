"""Finding the Docker Engine and the compose command: the two questions every docker shell asks first.

`docker_client()` returns a `docker.DockerClient` that has answered a ping, or raises
`DockerUnavailable` with one line saying why (no socket, permission denied, SDK not
installed). The API version is negotiated ("auto"): the SDK's default (1.45) is newer
than engines in the field (20.10 speaks 1.41) and would be refused.

`compose_command()` returns the argv prefix for compose: `["docker", "compose"]` when
the v2 plugin answers `docker compose version`, else `["docker-compose"]` (v1) when it
is on PATH. Both read the same compose files (Compose Specification), so callers only
prepend the prefix.

This is an I/O shell (subprocess, the docker SDK); the SDK is imported lazily so that
`emulator` imports without it and its absence is reported as `DockerUnavailable`.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import docker

__all__ = ["DockerUnavailable", "compose_command", "docker_client", "short_reason"]

#: Seconds one API call may take before the engine counts as not answering. Builds
#: and imports pass their own (unbounded) timeouts per call.
DEFAULT_TIMEOUT_S = 60.0
_COMPOSE_PROBE_TIMEOUT_S = 15.0


class DockerUnavailable(Exception):
    """No usable Docker Engine (or compose command); the message is one line."""


def short_reason(exc: BaseException) -> str:
    """One line from a docker/requests exception chain: the innermost OS error if any,
    else the engine's explanation of an API error, else the exception's text.

    requests wraps a refused or missing socket three levels deep
    (`ConnectionError(MaxRetryError(NewConnectionError(OSError)))`); the useful part
    is the OS error at the bottom.
    """
    seen: set[int] = set()
    stack: list[BaseException] = [exc]
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError) and current.strerror:
            return current.strerror
        stack.extend(a for a in current.args if isinstance(a, BaseException))
        for nxt in (current.__cause__, current.__context__, getattr(current, "reason", None)):
            if isinstance(nxt, BaseException):
                stack.append(nxt)
    explanation = getattr(exc, "explanation", None)  # docker.errors.APIError: the engine's own words
    text = " ".join(str(explanation if isinstance(explanation, str) and explanation else exc).split())
    return text[:300] or type(exc).__name__


def _probe_unix_socket(path: str, timeout_s: float) -> None:
    """Connect to the engine's unix socket once, closing it whatever happens.

    The SDK leaks the socket of a failed connect (it is closed only by the garbage
    collector, with a ResourceWarning); probing first keeps the common failures
    (no engine, no permission) out of the SDK and names the socket in the message.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout_s)
        try:
            sock.connect(path)
        except OSError as exc:
            hint = " (is your user in the docker group?)" if isinstance(exc, PermissionError) else ""
            raise DockerUnavailable(
                f"no Docker Engine at unix://{path}: {exc.strerror or short_reason(exc)}{hint}"
            ) from exc


def docker_client(*, timeout_s: float = DEFAULT_TIMEOUT_S) -> docker.DockerClient:
    """A client of the engine named by DOCKER_HOST (default: the local socket) that answered a ping."""
    try:
        import docker
        import docker.errors
    except ImportError:
        raise DockerUnavailable("the docker Python SDK is not installed (pip install 'docker>=7.1')") from None
    host = os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
    if host.startswith("unix://"):
        _probe_unix_socket(host[len("unix://") :], timeout_s)
    try:
        client = docker.from_env(version="auto", timeout=int(timeout_s))
    except docker.errors.DockerException as exc:
        raise DockerUnavailable(f"cannot reach the Docker Engine: {short_reason(exc)}") from exc
    try:
        client.ping()
    except Exception as exc:  # requests and docker errors alike: the engine did not answer
        client.close()
        raise DockerUnavailable(f"the Docker Engine does not answer: {short_reason(exc)}") from exc
    return client


def compose_command() -> list[str]:
    """`["docker", "compose"]` if the compose plugin answers, else `["docker-compose"]`; else DockerUnavailable."""
    docker_cli = shutil.which("docker")
    if docker_cli is not None:
        try:
            probe = subprocess.run(
                [docker_cli, "compose", "version"],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                timeout=_COMPOSE_PROBE_TIMEOUT_S,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired):
            probe = None
        if probe is not None and probe.returncode == 0:
            return ["docker", "compose"]
    if shutil.which("docker-compose") is not None:
        return ["docker-compose"]
    raise DockerUnavailable(
        "no compose command: neither `docker compose` (the Compose plugin) nor `docker-compose` works; "
        "install the docker-compose-plugin package"
    )
