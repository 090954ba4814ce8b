"""`qnetem clean`: remove everything qnetem created in Docker, found by label.

Everything qnetem starts in Docker carries `org.qnetem.run=<run-id>` (DESIGN §2); the
images carry `org.qnetem.image`. `clean()` removes, in dependency order:

1. swarm services labelled with the run (when this engine is a swarm manager): a
   service would otherwise start its tasks' containers again;
2. containers (forced: running ones are killed; their anonymous volumes go too);
3. networks (retried briefly: an endpoint of a just-removed container or swarm task
   can linger for a moment);
4. volumes;
5. with `images=True`, images labelled `org.qnetem.image` (children before parents).

It is idempotent: an object that disappears between listing and removal (another
`clean`, a container started with `--rm`) is not an error and is not counted, so a
second call returns an empty report. An I/O shell over the docker SDK.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any

from .dockerutil import DockerUnavailable, docker_client, short_reason

__all__ = ["LABEL_IMAGE", "LABEL_RUN", "CleanError", "CleanReport", "clean", "leftovers"]

LABEL_RUN = "org.qnetem.run"
LABEL_IMAGE = "org.qnetem.image"

#: How long a network may keep endpoints of removed containers/tasks before we give up.
_NETWORK_RETRY_S = 10.0
_RETRY_STEP_S = 0.25


class CleanError(Exception):
    """The engine answered but refused to remove something; the message is one line."""


@dataclass(frozen=True, slots=True)
class CleanReport:
    """Names of what one `clean()` removed, per kind."""

    services: tuple[str, ...] = ()
    containers: tuple[str, ...] = ()
    networks: tuple[str, ...] = ()
    volumes: tuple[str, ...] = ()
    images: tuple[str, ...] = ()

    @property
    def total(self) -> int:
        return len(self.services) + len(self.containers) + len(self.networks) + len(self.volumes) + len(self.images)

    def counts(self) -> dict[str, int]:
        return {
            "services": len(self.services),
            "containers": len(self.containers),
            "networks": len(self.networks),
            "volumes": len(self.volumes),
            "images": len(self.images),
        }


def _run_filter(run_id: str | None) -> dict[str, str]:
    return {"label": LABEL_RUN if run_id is None else f"{LABEL_RUN}={run_id}"}


def _is_swarm_manager(client: Any) -> bool:
    swarm = (client.info() or {}).get("Swarm") or {}
    return swarm.get("LocalNodeState") == "active" and bool(swarm.get("ControlAvailable"))


def leftovers(client: Any, run_id: str | None = None) -> dict[str, list[str]]:
    """Names of the labelled containers, networks and volumes (and services) that exist now."""
    filters = _run_filter(run_id)
    found = {
        "containers": sorted(c.name for c in client.containers.list(all=True, filters=filters)),
        "networks": sorted(n.name for n in client.networks.list(filters=filters)),
        "volumes": sorted(v.name for v in client.volumes.list(filters=filters)),
    }
    if _is_swarm_manager(client):
        found["services"] = sorted(s.name for s in client.services.list(filters=filters))
    return {kind: names for kind, names in found.items() if names}


def _remove_all(objects: list[Any], remove: Any, *, what: str) -> tuple[str, ...]:
    """Remove each object; vanished ones are skipped, any other refusal is a CleanError."""
    import docker.errors

    removed = []
    for obj in objects:
        name = str(getattr(obj, "name", None) or getattr(obj, "short_id", obj))
        try:
            remove(obj)
        except docker.errors.NotFound:
            continue
        except docker.errors.APIError as exc:
            if exc.status_code == 409 and "already in progress" in str(exc):
                continue  # another clean (or --rm) is removing it
            raise CleanError(f"cannot remove {what} {name}: {short_reason(exc)}") from exc
        removed.append(name)
    return tuple(removed)


def _remove_network(network: Any) -> None:
    """Remove a network, waiting out endpoints that are still being torn down."""
    import docker.errors

    deadline = time.monotonic() + _NETWORK_RETRY_S
    while True:
        try:
            network.remove()
            return
        except docker.errors.APIError as exc:
            if isinstance(exc, docker.errors.NotFound) or exc.status_code not in (403, 409, 500):
                raise
            if "active endpoints" not in str(exc) or time.monotonic() >= deadline:
                raise
        time.sleep(_RETRY_STEP_S)
        try:
            for container in network.client.containers.list(all=True, filters={"network": network.id}):
                network.disconnect(container, force=True)
        except docker.errors.APIError:
            pass
        # Endpoints that are no container: a swarm overlay's load-balancer endpoint
        # ("<network>-endpoint") can outlive `docker stack rm`; force-disconnect it by name.
        try:
            network.reload()
            endpoints = (network.attrs.get("Containers") or {}).items()
        except docker.errors.APIError:
            endpoints = ()
        for endpoint_id, info in endpoints:
            with contextlib.suppress(docker.errors.APIError):
                network.disconnect((info or {}).get("Name") or endpoint_id, force=True)


def _remove_images(client: Any) -> tuple[str, ...]:
    """Remove every qnetem image, children first: a parent with children refuses removal (409)."""
    import docker.errors

    pending = {image.id: image for image in client.images.list(filters={"label": LABEL_IMAGE})}
    removed: list[str] = []
    while pending:
        progress = False
        last_error: Exception | None = None
        for image_id, image in list(pending.items()):
            name = image.tags[0] if image.tags else image.short_id
            try:
                client.images.remove(image_id, force=True)
            except docker.errors.ImageNotFound:
                del pending[image_id]
                continue
            except docker.errors.APIError as exc:
                if exc.status_code == 409:  # has children, or is being used: try again after the others
                    last_error = exc
                    continue
                raise CleanError(f"cannot remove image {name}: {short_reason(exc)}") from exc
            del pending[image_id]
            removed.append(name)
            progress = True
        if pending and not progress:
            names = ", ".join(i.tags[0] if i.tags else i.short_id for i in pending.values())
            reason = short_reason(last_error) if last_error else "conflict"
            raise CleanError(f"cannot remove image(s) {names}: {reason}")
    return tuple(removed)


def clean(*, run_id: str | None = None, images: bool = False, client: Any = None) -> CleanReport:
    """Remove every qnetem-labelled service, container, network and volume (of `run_id` if given).

    With `images=True`, also every image labelled `org.qnetem.image` (whatever `run_id`).
    Raises DockerUnavailable when no engine answers, CleanError when it refuses a removal.
    """
    import docker.errors

    own_client = client is None
    client = docker_client() if own_client else client
    try:
        filters = _run_filter(run_id)
        services: tuple[str, ...] = ()
        if _is_swarm_manager(client):
            services = _remove_all(client.services.list(filters=filters), lambda s: s.remove(), what="service")
        containers = _remove_all(
            client.containers.list(all=True, filters=filters),
            lambda c: c.remove(force=True, v=True),
            what="container",
        )
        networks = _remove_all(client.networks.list(filters=filters), _remove_network, what="network")
        volumes = _remove_all(client.volumes.list(filters=filters), lambda v: v.remove(force=True), what="volume")
        removed_images = _remove_images(client) if images else ()
    except docker.errors.DockerException as exc:
        raise CleanError(f"cleaning up failed: {short_reason(exc)}") from exc
    except OSError as exc:  # the engine went away mid-way (requests wraps it as an OSError subclass)
        raise DockerUnavailable(f"the Docker Engine stopped answering: {short_reason(exc)}") from exc
    finally:
        if own_client:
            client.close()
    return CleanReport(
        services=services, containers=containers, networks=networks, volumes=volumes, images=removed_images
    )
