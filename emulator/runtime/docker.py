"""The docker runtime: the broker and every node in its own container (DESIGN §2).

Theory of operation
-------------------
`DockerDeployment` is the `Deployment` (see `driver`) behind `qnetem run --runtime
docker`. It talks to the Docker Engine through the `docker` SDK; every blocking SDK call
runs in a worker thread (`trio.to_thread`), so the driver's trio loop keeps polling.

Networks (issue 3, part 2):

* one management network `<prefix>-mgmt` (a plain bridge, nothing published on the
  host) joins the broker (alias `broker`) and every node (alias `node-<name>`); nodes
  reach the broker at `broker:7400` and the orchestrator reaches the broker and each
  control endpoint at the container's address on it (the host routes to its bridges);
* one *internal* network per classical link, `<prefix>-link-<a>-<b>`, with only the
  link's two endpoints attached, each under the alias of its node name. Nodes run with
  `--dial-by-name`, so a node dials its neighbour `bob` by that name and the DNS of the
  link network answers with bob's address on that link only. Cutting a link is
  `docker network disconnect` of both ends; restoring it connects them again with the
  same aliases (addresses may change; nodes resolve again at every dial).

Everything created carries the labels `org.qnetem.run=<run id>` and
`org.qnetem.scenario=<name>` (`qnetem clean` finds leftovers by them). A failure at any
step leaves nothing behind: the driver always calls `stop_all`, which collects each
container's log into the run directory (`broker.log`, `<node>.log`) and removes the
containers and networks; `kill_all_now` is the synchronous last resort.

Faults use the container boundary: node-crash is `docker kill` (SIGKILL), node-restart
`docker stop`, both followed by `docker start` of the same container (its file system,
hence its data directory, survives, as a real machine's disk would); node-freeze is
`docker pause` / `unpause`; link-cut is network disconnect / connect.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import ipaddress
import os
import secrets
import tarfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import trio

from emulator.report.events import EventKind

from .driver import BrokerAccess, InvalidInput, LaunchContext, RunOptions, RuntimeFailure
from .orchestrator import RunPlan

__all__ = [
    "BROKER_ALIAS",
    "BROKER_PORT",
    "NODE_DATA_DIR",
    "LABEL_RUN",
    "LABEL_SCENARIO",
    "DockerDeployment",
    "DockerNames",
    "broker_argv",
    "free_subnets",
    "name_length_problems",
    "node_argv",
    "preflight",
    "scenario_problems",
]

BROKER_PORT = 7400  # inside the broker container; never published on the host
BROKER_ALIAS = "broker"  # the broker's name on the management network
LABEL_RUN = "org.qnetem.run"
LABEL_SCENARIO = "org.qnetem.scenario"
LABEL_ROLE = "org.qnetem.role"  # "broker" | "node"
LABEL_NODE = "org.qnetem.node"
_SCENARIO_DIR = "/tmp/qnetem"  # where the broker container finds scenario.json
NODE_DATA_DIR = "data"  # relative to the image's working directory (owned by its user)
#: Link networks take /29 blocks (gateway + two endpoints + room to reconnect) from here,
#: outside Docker's default address pools (172.17-31.0.0/16, 192.168.0.0/16), skipping
#: blocks that overlap an existing network or a host route. QNETEM_LINK_SUBNET_POOL overrides.
LINK_SUBNET_POOL = os.environ.get("QNETEM_LINK_SUBNET_POOL", "10.213.0.0/16")
LINK_SUBNET_PREFIX = 29
_THREADS = trio.CapacityLimiter(8)  # concurrent engine requests (container starts are slow)


@dataclasses.dataclass(frozen=True, slots=True)
class DockerNames:
    """Names of everything one run creates (pure: unit-tested without an engine)."""

    prefix: str  # "qnetem-<8 hex>"

    @classmethod
    def fresh(cls) -> DockerNames:
        return cls(f"qnetem-{secrets.token_hex(4)}")

    @property
    def mgmt_network(self) -> str:
        return f"{self.prefix}-mgmt"

    def link_network(self, a: str, b: str) -> str:
        first, second = sorted((a, b))
        return f"{self.prefix}-link-{first}-{second}"

    def container(self, name: str) -> str:
        return f"{self.prefix}-{name}"

    @staticmethod
    def mgmt_alias(name: str) -> str:
        return BROKER_ALIAS if name == "broker" else f"node-{name}"


def broker_argv(scenario_path: str, backend: str | None = None) -> list[str]:
    """The broker's command in a container (compose uses the same)."""
    argv = [
        "qnetem", "broker", "--scenario", scenario_path,
        "--host", "0.0.0.0", "--port", str(BROKER_PORT),  # noqa: S104 - inside its own network namespace
    ]  # fmt: skip
    return argv + (["--backend", backend] if backend else [])


def node_argv(name: str) -> list[str]:
    """A node's command in a container: bound to all its networks, dialling neighbours by name."""
    return [
        "qnetem", "node", "--name", name, "--broker", f"{BROKER_ALIAS}:{BROKER_PORT}",
        "--host", "0.0.0.0", "--advertise-host", DockerNames.mgmt_alias(name),  # noqa: S104
        "--dial-by-name", "--data-dir", NODE_DATA_DIR,
    ]  # fmt: skip


#: Longest node name that containers can carry: `node-<name>` must stay one DNS label
#: (63 characters, RFC 1035 §2.3.4), and so must a swarm service `qnetem-<8 hex>_node-<name>`.
MAX_CONTAINER_NODE_NAME = 63 - len("qnetem-12345678_node-")


def name_length_problems(names: Iterable[str]) -> list[str]:
    """One line per node name too long for the docker runtime and compose projects."""
    return [
        f"node {name!r}: containers need node names of at most {MAX_CONTAINER_NODE_NAME} characters "
        f"(it has {len(name)}), so that `node-<name>` stays one DNS label"
        for name in names
        if len(name) > MAX_CONTAINER_NODE_NAME
    ]


def scenario_problems(plan: RunPlan) -> list[str]:
    """What the docker runtime cannot run in this plan (one line each; empty when fine)."""
    problems = name_length_problems(plan.launched_nodes)
    if plan.external_nodes:
        problems.append("external nodes need --runtime local (the docker runtime starts every node itself)")
    return problems


def preflight(options: RunOptions) -> Callable[[LaunchContext], DockerDeployment]:
    """Check the engine and the image before anything is created; return the factory.

    Raises `RuntimeFailure` (no engine, image build failed) with one line.
    """
    from .dockerutil import DockerUnavailable, docker_client
    from .image import ImageError, ensure_image

    try:
        client = docker_client()
    except DockerUnavailable as exc:
        raise RuntimeFailure(str(exc)) from None
    try:
        if options.image is not None:
            tag = options.image
            try:
                client.images.get(tag)
            except Exception:
                raise RuntimeFailure(f"image {tag} not found; build it with `qnetem image build --tag {tag}`") from None
        else:
            tag = ensure_image(offline=_offline_default(), log=lambda line: None)
    except ImageError as exc:
        raise RuntimeFailure(f"cannot build the image: {exc}") from None
    return functools.partial(DockerDeployment, client=client, image=tag)


def _offline_default() -> bool:
    """Build the base image offline (debootstrap) when that is possible here."""
    import shutil

    return os.geteuid() == 0 and shutil.which("debootstrap") is not None


class DockerDeployment:
    """Broker and nodes as containers (see the module docstring)."""

    cuts_links = True

    kms_bind_host: str | None = "0.0.0.0"  # noqa: S104 - inside the container's own network namespace

    def __init__(self, context: LaunchContext, *, client: Any, image: str, names: DockerNames | None = None) -> None:
        problems = scenario_problems(context.plan)
        if problems:
            raise InvalidInput(problems)
        self.context = context
        self.client = client
        self.image = image
        self.names = names or DockerNames.fresh()
        self.labels = {LABEL_RUN: context.run_id, LABEL_SCENARIO: context.plan.name}
        self.networks: dict[str, Any] = {}  # network name -> Network
        self.containers: dict[str, Any] = {}  # "broker" | node -> Container
        self.expected_exit: set[str] = set()
        self.reported: set[str] = set()
        self.link_networks: dict[tuple[str, str], str] = {}
        self._cut: set[tuple[str, str]] = set()
        self._listed: set[str] = set()  # names seen in the last listing of our containers
        self._link_addresses: dict[tuple[str, str], str | None] = {}  # (network, node) -> address before a cut

    # ------------------------------------------------------------------ engine calls

    async def _call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return await trio.to_thread.run_sync(functools.partial(fn, *args, **kwargs), limiter=_THREADS)
        except RuntimeFailure:
            raise
        except Exception as exc:  # docker.errors.* and connection errors: one line
            raise RuntimeFailure(f"docker: {_one_line(exc)}") from None

    def _env(self) -> dict[str, str]:
        env = {**self.context.tokens, "PYTHONUNBUFFERED": "1"}
        if self.context.options.backend:
            env["QNETEM_BACKEND"] = self.context.options.backend
        return env

    def _labels(self, role: str, node: str | None = None) -> dict[str, str]:
        labels = {**self.labels, LABEL_ROLE: role}
        if node is not None:
            labels[LABEL_NODE] = node
        return labels

    # ------------------------------------------------------------------ starting

    async def start_broker(self) -> BrokerAccess:
        await self._call(self._create_networks)
        argv = broker_argv(f"{_SCENARIO_DIR}/scenario.json", self.context.options.backend)
        container = await self._call(self._create, "broker", argv, self._labels("broker"))
        scenario = (self.context.run_dir / "scenario.json").read_bytes()
        await self._call(container.put_archive, "/tmp", _tar_of({"qnetem/scenario.json": scenario}))
        await self._call(container.start)
        self._emit_started("broker", "broker", argv)
        address = await self._call(self._mgmt_ip, "broker")
        return BrokerAccess(admin=(address, BROKER_PORT), for_nodes=f"broker:{BROKER_PORT}")

    def _create_networks(self) -> None:
        """The management network and one internal network per classical link.

        Link networks get a subnet of our choosing (a free /29 of `LINK_SUBNET_POOL`), so
        that a restored link can give each end its old address back: a real fibre cut
        leaves the endpoints' addresses alone, and TCP connections survive a short cut
        by retransmitting. (Docker assigns fixed addresses only on user-configured subnets.)
        """
        import docker.types

        mgmt = self.names.mgmt_network
        self.networks[mgmt] = self.client.networks.create(mgmt, driver="bridge", labels=self.labels)
        subnets = free_subnets(_used_subnets(self.client), LINK_SUBNET_POOL, LINK_SUBNET_PREFIX)
        for a, b in self.context.plan.links:
            name = self.names.link_network(a, b)
            for subnet in subnets:
                ipam = docker.types.IPAMConfig(pool_configs=[docker.types.IPAMPool(subnet=str(subnet))])
                try:
                    network = self.client.networks.create(
                        name, driver="bridge", internal=True, labels=self.labels, ipam=ipam
                    )
                except Exception as exc:
                    if "overlap" in str(exc).lower():  # taken meanwhile by another engine user: next one
                        continue
                    raise
                break
            else:
                raise RuntimeFailure(f"no free /{LINK_SUBNET_PREFIX} subnet left in {LINK_SUBNET_POOL} for link networks")
            self.networks[name] = network
            self.link_networks[_key(a, b)] = name

    def _create(self, name: str, argv: list[str], labels: dict[str, str]) -> Any:
        api = self.client.api
        mgmt = self.names.mgmt_network
        networking = api.create_networking_config(
            {mgmt: api.create_endpoint_config(aliases=[self.names.mgmt_alias(name)])}
        )
        response = api.create_container(
            self.image, command=argv, name=self.names.container(name), environment=self._env(), labels=labels,
            hostname=self.names.mgmt_alias(name), networking_config=networking, host_config=api.create_host_config(init=True),
        )  # fmt: skip
        container = self.client.containers.get(response["Id"])
        self.containers[name] = container
        return container

    def _mgmt_ip(self, name: str) -> str:
        container = self.containers[name]
        container.reload()
        address = container.attrs["NetworkSettings"]["Networks"][self.names.mgmt_network]["IPAddress"]
        if not address:
            raise RuntimeFailure(f"{name}: its container has no address on {self.names.mgmt_network}")
        return str(address)

    def _create_node(self, name: str) -> Any:
        container = self._create(name, node_argv(name), self._labels("node", name))
        for (a, b), network in self.link_networks.items():
            if name in (a, b):
                self.networks[network].connect(container, aliases=[name])
        container.start()
        return container

    async def start_node(self, name: str, *, restart: bool = False) -> None:
        if restart:
            self.expected_exit.discard(name)
            self.reported.discard(name)
            await self._call(self.containers[name].start)
            self._emit_started(name, "node", node_argv(name), restart=True)
            return
        await self._call(self._create_node, name)
        self._emit_started(name, "node", node_argv(name))

    async def start_nodes(self, names: Iterable[str]) -> None:
        """Create and start many node containers at once (the engine is the bottleneck)."""
        async with trio.open_nursery() as nursery:
            for name in names:
                nursery.start_soon(self.start_node, name)

    def _emit_started(self, name: str, role: str, argv: list[str], *, restart: bool = False) -> None:
        container = self.containers[name]
        fields: dict[str, Any] = {"restart": True} if restart else {}
        self.context.emit(
            EventKind.PROCESS_STARTED, name=name, role=role, container=container.name, image=self.image,
            log=f"{name}.log", argv=argv, **fields,
        )  # fmt: skip

    def control_address(self, name: str, reported: tuple[str, int]) -> tuple[str, int]:
        container = self.containers[name]
        container.reload()  # quick, and only at (re)registration
        return (str(container.attrs["NetworkSettings"]["Networks"][self.names.mgmt_network]["IPAddress"]), reported[1])

    # ------------------------------------------------------------------ watching

    def _ended(self) -> dict[str, Any]:
        """Our containers that are not running (one engine request)."""
        ended = {}
        self._listed = set()
        for container in self.client.containers.list(all=True, filters={"label": f"{LABEL_RUN}={self.context.run_id}"}):
            self._listed.add(container.labels.get(LABEL_NODE) or container.labels.get(LABEL_ROLE, "?"))
            if container.status in ("exited", "dead"):
                name = container.labels.get(LABEL_NODE) or container.labels.get(LABEL_ROLE, "?")
                ended[name] = container
        return ended

    def check(self, phase: str) -> None:
        try:
            ended = self._ended()
        except Exception as exc:
            raise RuntimeFailure(f"docker: {_one_line(exc)}") from None
        gone = [n for n in self.containers if n not in ended and n not in self._listed]
        for name in gone:
            if name not in self.expected_exit and name not in self.reported:
                self.reported.add(name)
                what = "the broker" if name == "broker" else f"node {name}"
                raise RuntimeFailure(
                    f"{what}: its container {self.containers[name].name} was removed by someone else {phase}"
                )
        for name, container in ended.items():
            if name in self.expected_exit or name in self.reported:
                continue
            self.reported.add(name)
            code = container.attrs.get("State", {}).get("ExitCode")
            log = self._save_log(name)
            self.context.emit(EventKind.PROCESS_EXITED, name=name, container=container.name, returncode=code, expected=False)
            what = "the broker" if name == "broker" else f"node {name}"
            raise RuntimeFailure(
                f"{what} (container {container.name}) exited with status {code} {phase}; see {self.context.rel(log)}"
            )

    async def settle(self, timeout_s: float) -> None:
        with trio.move_on_after(timeout_s):
            while True:
                ended = await self._call(self._ended)
                if any(n not in self.expected_exit and n not in self.reported for n in ended):
                    return
                await trio.sleep(0.1)

    def expect_exit(self, name: str) -> None:
        self.expected_exit.add(name)

    async def wait_exited(self, names: Iterable[str], timeout_s: float) -> None:
        wanted = {n for n in names if n in self.containers}
        with trio.move_on_after(timeout_s):
            while wanted:
                ended = await self._call(self._ended)
                for name in list(wanted):
                    if name in ended:
                        wanted.discard(name)
                        self._report_expected(name, ended[name])
                if wanted:
                    await trio.sleep(0.05)

    def _report_expected(self, name: str, container: Any) -> None:
        if name in self.reported:
            return
        self.reported.add(name)
        code = container.attrs.get("State", {}).get("ExitCode")
        self.context.emit(EventKind.PROCESS_EXITED, name=name, container=container.name, returncode=code, expected=True)

    # ------------------------------------------------------------------ faults

    async def kill_node(self, name: str) -> None:
        self.expect_exit(name)
        await self._call(self.containers[name].kill)
        await self.wait_exited([name], 10.0)

    async def stop_node(self, name: str, grace_s: float) -> None:
        self.expect_exit(name)
        await self._call(self.containers[name].stop, timeout=max(1, round(grace_s)))
        await self.wait_exited([name], 10.0)

    async def freeze_node(self, name: str) -> None:
        await self._call(self.containers[name].pause)

    async def thaw_node(self, name: str) -> None:
        await self._call(self.containers[name].unpause)

    async def cut_link(self, a: str, b: str) -> None:
        key = _key(a, b)
        network_name = self.link_networks[key]
        network = self.networks[network_name]
        for end in key:
            container = self.containers[end]
            await self._call(container.reload)
            address = container.attrs["NetworkSettings"]["Networks"].get(network_name, {}).get("IPAddress")
            self._link_addresses[(network_name, end)] = address or None
            await self._call(network.disconnect, container, force=True)
        self._cut.add(key)

    async def restore_link(self, a: str, b: str) -> None:
        key = _key(a, b)
        if key not in self._cut:
            return
        network_name = self.link_networks[key]
        network = self.networks[network_name]
        for end in key:
            address = self._link_addresses.get((network_name, end))
            await self._call(network.connect, self.containers[end], aliases=[end], ipv4_address=address)
        self._cut.discard(key)

    # ------------------------------------------------------------------ the end

    async def terminate(self, names: Iterable[str]) -> None:
        for name in names:
            container = self.containers.get(name)
            if container is not None:
                self.expect_exit(name)
                with contextlib.suppress(RuntimeFailure):
                    await self._call(container.kill, signal="SIGTERM")

    async def stop_all(self, grace_s: float) -> None:
        with contextlib.suppress(Exception):
            await self._call(self._stop_all_sync, grace_s)
        self._remove_all_sync()  # in case the thread was interrupted: idempotent

    def _stop_all_sync(self, grace_s: float) -> None:
        for name in self.containers:
            self.expected_exit.add(name)
        for name, container in self.containers.items():
            with contextlib.suppress(Exception):
                container.reload()
                if container.status == "paused":
                    container.unpause()
                if container.status in ("running", "paused", "restarting"):
                    container.stop(timeout=max(1, round(grace_s)))
                container.reload()
                self._report_expected(name, container)
            self._save_log(name)
        self._remove_all_sync()

    def _save_log(self, name: str) -> Path:
        path = self.context.run_dir / f"{name}.log"
        container = self.containers.get(name)
        if container is not None:
            with contextlib.suppress(Exception):
                path.write_bytes(container.logs(stdout=True, stderr=True))
        return path

    def _remove_all_sync(self) -> None:
        for container in list(self.containers.values()):
            with contextlib.suppress(Exception):
                container.remove(force=True, v=True)
        for network in list(self.networks.values()):
            with contextlib.suppress(Exception):
                network.remove()
        self._sweep_by_label()

    def _sweep_by_label(self) -> None:
        """Whatever carries this run's label, including objects created but not yet recorded."""
        label = f"{LABEL_RUN}={self.context.run_id}"
        with contextlib.suppress(Exception):
            for container in self.client.containers.list(all=True, filters={"label": label}):
                with contextlib.suppress(Exception):
                    container.remove(force=True, v=True)
        with contextlib.suppress(Exception):
            for network in self.client.networks.list(filters={"label": label}):
                with contextlib.suppress(Exception):
                    network.remove()

    def kill_all_now(self) -> None:
        for name in self.containers:
            if not (self.context.run_dir / f"{name}.log").exists():
                self._save_log(name)
        self._remove_all_sync()


def _used_subnets(client: Any) -> list[ipaddress.IPv4Network]:
    """Every IPv4 subnet of the engine's networks and of the host's routes."""
    used = []
    for network in client.networks.list():
        for config in (network.attrs.get("IPAM") or {}).get("Config") or []:
            with contextlib.suppress(KeyError, ValueError):
                subnet = ipaddress.ip_network(config["Subnet"], strict=False)
                if isinstance(subnet, ipaddress.IPv4Network):
                    used.append(subnet)
    with contextlib.suppress(OSError):
        for line in Path("/proc/net/route").read_text().splitlines()[1:]:
            fields = line.split()
            destination, mask = (int(fields[1], 16), int(fields[7], 16))
            if mask:  # skip the default route
                address = ipaddress.IPv4Address(destination.to_bytes(4, "little"))
                netmask = ipaddress.IPv4Address(mask.to_bytes(4, "little"))
                used.append(ipaddress.IPv4Network(f"{address}/{netmask}", strict=False))
    return used


def free_subnets(
    used: Iterable[ipaddress.IPv4Network], pool: str, prefix: int
) -> Iterator[ipaddress.IPv4Network]:
    """The /`prefix` blocks of `pool` that overlap nothing in `used`, in order (pure)."""
    taken = list(used)
    for subnet in ipaddress.IPv4Network(pool).subnets(new_prefix=prefix):
        if not any(subnet.overlaps(other) for other in taken):
            yield subnet


def _key(a: str, b: str) -> tuple[str, str]:
    first, second = sorted((a, b))
    return (first, second)


def _tar_of(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for path, data in files.items():
            parts = path.split("/")
            for depth in range(1, len(parts)):
                info = tarfile.TarInfo("/".join(parts[:depth]))
                info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, int(time.time())
                tar.addfile(info)
            info = tarfile.TarInfo(path)
            info.size, info.mode, info.mtime = len(data), 0o644, int(time.time())
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:300]
