"""The node process's trio shell: sockets, timers, the broker connection.

Theory of operation (DESIGN §2, §3; CONVENTIONS 1). All protocol logic lives in sans-IO
cores; this module only moves bytes between them and real sockets and arms timers:

    broker TCP  <->  QDevice            (nodes/qdevice.py)
    link TCP    <->  LinkConnection     (nodes/transport/link.py, via tcp_io.LinkIO)
    UDP         <->  Liveness + DatagramShaper (nodes/transport/liveness.py, shaper.py)
    control TCP <->  ControlSession     (nodes/control.py)
                     AppHost            (nodes/apps/host.py) in the middle

Start-up: bind the link listener, the UDP socket and the control listener on
`--host` port 0; connect to the broker, send `hello` with those addresses, wait for
`welcome` (or exit with a one-line error). Emulated time is
t_em = welcome.now_s + (now_wall - t_recv)/time_scale (QDevice.emulated_now); the wall
clock is trio's (monotonic), so every deadline below is a trio deadline.

After any input the runtime calls `_pump()`: it drains broker events (peer_up ->
dial or wait to be dialled; epr events -> apps), then app actions (broker requests,
peer messages), then wakes the writers that have something to send. The lexicographically
smaller node name dials each link; a dialer retries with back-off while the peer is up.

Addresses (nodes/transport/addressing.py): by default a neighbour is reached at the
addresses of its `peer_up`; with `dial_by_name` at host = its node name (resolved by
`NodeOptions.resolver` at each dial attempt, and for UDP whenever probing (re)starts and
then every second while the neighbour is not up) with the ports of `peer_up`. A
resolution failure is a retry, logged once per 30 s per neighbour. `hello` reports
`advertise_host` instead of the bound host when one is set.

Link faults (control `link_fault`, docs/protocol.md §4.5): cutting the link to a
neighbour closes its TCP link, stops its dialler and name resolution (a generation bump),
cuts its datagram shaper (outgoing datagrams dropped) and makes the UDP reader drop what
it sends; the link core refuses its `link_hello` with `no_link`; app messages wait in its
outbox. Restoring starts dialler and resolver again; the outbox drains on the next
`LinkEstablished`. Liveness is not told: it sees the probes go unanswered.

Shutdown (SIGTERM/SIGINT or control `shutdown`): links say `bye`, the broker session
says `bye`, writers get a short grace period to flush, then everything is cancelled.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
import signal
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import trio

from emulator.wire import (
    Address,
    AppMsg,
    AppStatus,
    EprDelivered,
    EprDone,
    Error,
    ErrorCode,
    KmsMsg,
    KmsStarted,
    LinkInfo,
    LocalProtocolError,
    Message,
    PeerDown,
    PeerUp,
    Probe,
    ProbeAck,
    QkdDetections,
    QkdEmitted,
    QkdStopped,
    RemoteProtocolError,
    decode,
    encode_datagram,
)

from .apps import APP_KINDS, AppContext, AppHost, HostAppIo, HostBrokerRequest, HostPeerSend
from .apps.base import KmsCall, KmsReply, RoutedSend, UdpOpen, UdpOpened, UdpSend
from .control import AuthFailed, ControlSession, KmsStartRequested, ShutdownRequested
from .kms.pools import StorePools
from .kms.service import KmsConfigError, KmsService
from .kms.store import KEY_STORE_FILE, KeyStore
from .qdevice import (
    BrokerClosed,
    EventReceived,
    QDevice,
    Registered,
    RegistrationRefused,
    ReplyReceived,
    SessionState,
)
from .transport.addressing import LogThrottle, advertised_address, datagram_peer, dial_address, parse_hosts
from .transport.link import (
    LinkClosed,
    LinkConnection,
    LinkEstablished,
    LinkRefused,
    LinkRole,
    LinkState,
    MalformedInput,
    MessageReceived,
    PeerRejected,
)
from .transport.liveness import Liveness, LivenessState, LinkDown, LinkUp
from .transport.shaper import DatagramShaper, ShaperConfig, StreamShaper, shaper_rng
from .transport.tcp_io import LinkIO, Waker
from .transport.udp_io import UdpEndpoint

__all__ = [
    "BrokerUnavailable",
    "NodeOptions",
    "NodeRuntime",
    "RegistrationFailed",
    "Resolver",
    "hosts_file_resolver",
    "resolve_by_dns",
]

log = logging.getLogger("nodes.runtime")

_RECEIVE_BYTES = 256 * 1024
_MAX_OUTBOX = 10_000  # app messages held per peer while its link is down
_APP_UDP_QUEUE = 1024  # datagrams an app may have waiting to be written (UDP: more are dropped)
_SHUTDOWN_FLUSH_S = 1.0
_DIAL_BACKOFF_MAX_S = 2.0
_DIAL_TIMEOUT_S = 3.0  # wall seconds for one TCP connect attempt to a neighbour
_RESOLVE_INTERVAL_S = 1.0  # re-resolve a neighbour's name this often while it is not up
_RESOLVE_RETRY_S = 0.5  # ... and this soon after a failed resolution
_RESOLVE_LOG_INTERVAL_S = 30.0  # one "cannot resolve" line per neighbour per this many seconds

# (name, address family) -> numeric host; raises OSError when the name does not resolve.
Resolver = Callable[[str, int], Awaitable[str]]


async def resolve_by_dns(name: str, family: int) -> str:
    """The default resolver: the system's `getaddrinfo` (DNS, /etc/hosts), first answer."""
    infos = await trio.socket.getaddrinfo(name, None, family=family, type=trio.socket.SOCK_DGRAM)
    if not infos:
        raise OSError(f"no address for {name!r}")
    return str(infos[0][4][0])


def hosts_file_resolver(path: Path) -> Resolver:
    """TEST SEAM: resolve names from a file in /etc/hosts format, re-read at every lookup.

    For tests on one host, where node names cannot be made to resolve through DNS
    (`python -m nodes` installs it when QNETEM_TEST_HOSTS_FILE is set). A name missing
    from the file does not resolve; editing the file between lookups emulates an
    address that changes.
    """

    async def resolve(name: str, family: int) -> str:
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise OSError(f"cannot read the test hosts file: {exc.strerror or exc}") from None
        host = parse_hosts(text).get(name)
        if host is None:
            raise OSError(f"{name!r} is not in the test hosts file")
        return host

    return resolve


class RegistrationFailed(Exception):
    """The broker refused this node (wrong token, unknown name, ...)."""


class BrokerUnavailable(Exception):
    """The broker could not be reached, or the session broke."""


@dataclasses.dataclass(frozen=True, slots=True)
class NodeOptions:
    name: str
    broker: tuple[str, int]
    token: str = dataclasses.field(repr=False)
    admin_token: str = dataclasses.field(repr=False)
    host: str = "127.0.0.1"
    data_dir: Path | None = None
    probe_interval_s: float = 0.1  # wall seconds between liveness probes
    probe_miss_limit: int = 3
    # Wall seconds to reach the broker and register; a node started before its broker
    # (compose starts everything at once) keeps trying for this long.
    connect_timeout_s: float = 30.0
    handshake_timeout_s: float = 10.0
    dial_by_name: bool = False  # reach neighbours at host = their node name (containers)
    advertise_host: str | None = None  # host reported in `hello` instead of the bound one
    resolver: Resolver = dataclasses.field(default=resolve_by_dns, repr=False, compare=False)


@dataclasses.dataclass
class _Peer:
    info: LinkInfo
    stream_config: ShaperConfig
    udp_shaper: DatagramShaper
    tcp: Address | None = None
    udp: Address | None = None
    generation: int = 0  # bumped on every peer_up/peer_down; stale dialers stop
    link: LinkIO | None = None  # the open link, if any
    outbox: deque[AppMsg] = dataclasses.field(default_factory=deque)
    outbox_dropped: int = 0
    totals: dict[str, int] = dataclasses.field(default_factory=dict)  # stats of closed connections
    udp_in: int = 0
    connects: int = 0
    udp_target: Address | None = None  # where datagrams to it go (peer_up's udp, or its resolved name)
    cut: bool = False  # the classical link is cut by a fault (control `link_fault`)
    cuts: int = 0
    udp_cut_dropped_in: int = 0  # datagrams from it dropped while cut
    resolve_failures: int = 0


_LINK_COUNTERS = ("frames_in", "bytes_in", "frames_out", "bytes_out", "malformed_in", "errors_in")


class NodeRuntime:
    """One node process. `await NodeRuntime(options).run()`; raises on fatal start-up errors."""

    def __init__(self, options: NodeOptions) -> None:
        self.options = options
        self.name = options.name
        self.qdev = QDevice(options.name, options.token, capabilities=("epr", "apps"))
        self.liveness = Liveness(options.name, interval_s=options.probe_interval_s, miss_limit=options.probe_miss_limit)
        self.host: AppHost | None = None
        # The key store (DESIGN §8): SQLite under the data directory, so QKD key and
        # delivered-key tombstones survive a crash; in memory without a data directory.
        store_path: str | Path = ":memory:"
        if options.data_dir is not None:
            options.data_dir.mkdir(parents=True, exist_ok=True)
            store_path = options.data_dir / KEY_STORE_FILE
        self.key_store = KeyStore(store_path, options.name)
        self.key_pools = StorePools(self.key_store, time.time)  # per-peer final keys of the QKD links
        self.key_pools.on_added = self._on_material
        self.kms: KmsService | None = None  # started by the orchestrator's kms_start
        self._kms_dropped = 0  # kms_msg frames for no KME, or for a link that is not open
        # app -> its UDP socket (UdpOpen) and the queue of datagrams its sender task writes
        self._app_sockets: dict[str, tuple[trio.socket.SocketType, trio.MemorySendChannel[Any]]] = {}
        self._app_udp_dropped = 0
        self.peers: dict[str, _Peer] = {}
        self.exit_code = 0
        self.failure: str | None = None  # one-line reason when exit_code != 0
        self._nursery: trio.Nursery | None = None
        self._broker_stream: trio.SocketStream | None = None
        self._broker_wake = Waker()
        self._timer_wake = Waker()
        self._shutdown = trio.Event()
        self._broker_flushed = trio.Event()
        self._closing = False
        self._udp: UdpEndpoint | None = None
        self._udp_unknown = 0
        self._udp_malformed = 0
        self._control_sessions = 0
        self._control_unauthorized = 0
        self._links_rejected = 0
        self._incoming_links: set[LinkIO] = set()
        self._resolve_log = LogThrottle(_RESOLVE_LOG_INTERVAL_S)
        self.tcp_address: Address = ("", 0)
        self.udp_address: Address = ("", 0)
        self.control_address: Address = ("", 0)

    # ================================================================== ControlBackend

    @property
    def node_name(self) -> str:
        return self.name

    @property
    def time_scale(self) -> float:
        return self.qdev.time_scale

    def start_app(self, kind: str, name: str, params: Mapping[str, Any], now: float) -> None:
        assert self.host is not None
        self.host.start_app(kind, name, params, now)
        log.info("started app %s (%s)", name[:64], kind[:64])

    def app_status(self, name: str) -> AppStatus:
        assert self.host is not None
        return self.host.status(name)

    def stats(self, now: float) -> dict[str, Any]:
        """The `stats` snapshot of the control endpoint:

        links.<peer>: frames_in/out, bytes_in/out, malformed_in, errors_in (all connections
          so far), connected (TCP link open), connects, state (liveness: up/down/unknown),
          rtt_s (emulated) and rtt_wall_s (smoothed probe RTT), probes_sent, probe_acks,
          udp_queued, udp_dropped (shaper loss), udp_received, outbox, outbox_dropped,
          cut (link cut by a fault now), cuts (times cut), udp_cut_dropped (datagrams
          to or from it lost to cuts), resolve_failures (dial by name);
        broker: requests, replies, errors, events, outstanding, malformed_in,
          rtt_last_wall_s, rtt_mean_wall_s;
        apps: {name: {kind, state}}; control: sessions, unauthorized;
        udp: unknown_source (datagrams naming no up neighbour, or from no neighbour's
          address if they name nobody), malformed, sent; links_rejected (refused link
          handshakes, not counting refusals of a cut neighbour); app_messages_unroutable;
        kms: the KME's statistics (nodes/kms/service.py; None until kms_start): counters,
          store counts by state, delivery records (key ids, SAEs, salted fingerprints);
          kms_dropped (kms_msg frames with no KME or link to carry them);
        key_pools.<peer>: bits_added, bits_taken, bits_available, blocks (counts only).
        """
        scale = self.qdev.time_scale
        links: dict[str, Any] = {}
        for peer_name, peer in self.peers.items():
            counters = dict.fromkeys(_LINK_COUNTERS, 0)
            for k, v in peer.totals.items():
                counters[k] += v
            if peer.link is not None:
                for k, v in dataclasses.asdict(peer.link.core.statistics()).items():
                    counters[k] += v
            live = self.liveness.statistics(peer_name)
            shaper_stats = peer.udp_shaper.statistics()
            links[peer_name] = {
                **counters,
                "connected": peer.link is not None and peer.link.core.state is LinkState.OPEN,
                "connects": peer.connects,
                "state": live.state.value if live is not None else "unknown",
                "rtt_s": live.rtt_smoothed_s / scale if live and live.rtt_smoothed_s is not None else None,
                "rtt_wall_s": live.rtt_smoothed_s if live else None,
                "probes_sent": live.probes_sent if live else 0,
                "probe_acks": live.acks_received if live else 0,
                "udp_queued": shaper_stats.queued,
                "udp_dropped": shaper_stats.dropped,
                "udp_received": peer.udp_in,
                "outbox": len(peer.outbox),
                "outbox_dropped": peer.outbox_dropped,
                "cut": peer.cut,
                "cuts": peer.cuts,
                "udp_cut_dropped": shaper_stats.cut_dropped + peer.udp_cut_dropped_in,
                "resolve_failures": peer.resolve_failures,
            }
        q = self.qdev.statistics()
        host = self.host
        return {
            "node": self.name,
            "links": links,
            "broker": {
                "requests": q.requests,
                "replies": q.replies,
                "errors": q.errors,
                "events": q.events,
                "outstanding": q.outstanding,
                "malformed_in": q.malformed_in,
                "rtt_last_wall_s": q.rtt_last_s,
                "rtt_mean_wall_s": q.rtt_mean_s,
            },
            "apps": host.summary() if host is not None else {},
            "app_messages_unroutable": host.dropped_peer_messages if host is not None else 0,
            "control": {"sessions": self._control_sessions, "unauthorized": self._control_unauthorized},
            "udp": {
                "unknown_source": self._udp_unknown,
                "malformed": self._udp_malformed,
                "sent": self._udp.sent if self._udp else 0,
            },
            "links_rejected": self._links_rejected,
            "key_pools": {
                peer: {"bits_added": st.bits_added, "bits_taken": st.bits_taken,
                       "bits_available": st.bits_available, "blocks": st.blocks}
                for peer, st in self.key_pools.statistics().items()
            },  # fmt: skip
            "kms": self.kms.statistics() if self.kms is not None else None,
            "kms_dropped": self._kms_dropped,
            "app_udp_dropped": self._app_udp_dropped,
        }

    def link_fault(self, peer_name: str, cut: bool, now: float) -> None:
        """Cut or restore the classical link to a neighbour (control `link_fault`; idempotent)."""
        peer = self.peers.get(peer_name)
        if peer is None:
            raise RemoteProtocolError(ErrorCode.NO_LINK, f"{peer_name[:64]!r} is not a neighbour of {self.name!r}")
        if peer.cut == cut:
            return
        peer.cut = cut
        peer.udp_shaper.set_cut(cut)
        peer.generation += 1  # the running dialler and resolver of this link stop
        if cut:
            peer.cuts += 1
            wall = self._wall()
            links = {link for link in self._incoming_links if link.core.peer == peer_name}
            if peer.link is not None:
                links.add(peer.link)
            for link in links:
                link.core.close(wall)
                link.wake()
            log.warning("classical link to %s cut (fault)", peer_name)
        else:
            log.info("classical link to %s restored", peer_name)
            self._start_peer_tasks(peer_name)

    # ================================================================== clock

    def _wall(self) -> float:
        return trio.current_time()

    def _em_now(self) -> float:
        return self.qdev.emulated_now(trio.current_time())

    # ================================================================== start-up

    async def run(self) -> int:
        """Bind, register, serve until shutdown. Returns the exit code (0 = clean)."""
        host = self.options.host
        if self.options.data_dir is not None:
            self.options.data_dir.mkdir(parents=True, exist_ok=True)
        link_listeners = await trio.open_tcp_listeners(0, host=host)
        control_listeners = await trio.open_tcp_listeners(0, host=host)
        self._udp = await UdpEndpoint.bind(host)
        self.tcp_address = _listener_address(link_listeners)
        self.control_address = _listener_address(control_listeners)
        self.udp_address = self._udp.address
        # Catch SIGTERM/SIGINT from the start: one arriving during registration is acted
        # on as soon as the node runs (a clean exit), instead of killing the process.
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signal_stream:
            try:
                await self._connect_and_register()
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    nursery.start_soon(self._broker_reader)
                    nursery.start_soon(self._broker_writer)
                    nursery.start_soon(self._timer_loop)
                    nursery.start_soon(self._udp_reader)
                    nursery.start_soon(self._udp.run_sender, self._udp_shapers)
                    nursery.start_soon(trio.serve_listeners, self._serve_incoming_link, link_listeners)
                    nursery.start_soon(trio.serve_listeners, self._serve_control, control_listeners)
                    nursery.start_soon(self._watch_signals, signal_stream)
                    self._pump()  # peer_up events that came with the welcome
                    await self._shutdown.wait()
                    await self._graceful_close()
                    nursery.cancel_scope.cancel()
            finally:
                for listener in (*link_listeners, *control_listeners):
                    with trio.CancelScope(shield=True):
                        await listener.aclose()
                self._udp.close()
                for sock, _ in self._app_sockets.values():
                    sock.close()
                self.key_store.checkpoint()
                self.key_store.close()
                if self._broker_stream is not None:
                    with trio.CancelScope(shield=True):
                        await self._broker_stream.aclose()
        return self.exit_code

    async def _connect_and_register(self) -> None:
        host, port = self.options.broker
        deadline = trio.current_time() + self.options.connect_timeout_s
        delay = 0.05
        while True:
            try:
                self._broker_stream = await trio.open_tcp_stream(host, port)
                break
            except OSError as exc:
                if trio.current_time() + delay > deadline:
                    raise BrokerUnavailable(f"cannot connect to the broker at {host}:{port}: {exc.strerror or exc}") from None
                await trio.sleep(delay)
                delay = min(delay * 2, 1.0)
        advertise = self.options.advertise_host
        self.qdev.register(
            tcp=advertised_address(self.tcp_address, advertise),
            udp=advertised_address(self.udp_address, advertise),
            control=advertised_address(self.control_address, advertise),
            now=self._wall(),
        )
        stream = self._broker_stream
        await stream.send_all(self.qdev.data_to_send())
        with trio.move_on_at(deadline) as scope:
            while self.qdev.state is SessionState.REGISTERING:
                try:
                    data = await stream.receive_some(_RECEIVE_BYTES)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    data = b""
                self.qdev.receive_data(data, self._wall())
                # Look only at the registration outcome; later events stay queued for _pump.
                if self.qdev.state is SessionState.CLOSED:
                    event = self.qdev.next_event()
                    if isinstance(event, RegistrationRefused):
                        raise RegistrationFailed(f"broker refused registration: {event.code}: {event.message[:200]}")
                    raise BrokerUnavailable("the broker closed the connection during registration")
        if scope.cancelled_caught:
            raise BrokerUnavailable(f"no welcome from the broker within {self.options.connect_timeout_s:g} s")
        event = self.qdev.next_event()
        assert isinstance(event, Registered)
        self._on_registered(event.welcome.links)

    def _on_registered(self, links: Iterable[LinkInfo]) -> None:
        welcome = self.qdev.welcome
        assert welcome is not None
        for info in links:
            config = ShaperConfig.from_link(info, welcome.time_scale)
            self.peers[info.peer] = _Peer(
                info=info,
                stream_config=config,
                udp_shaper=DatagramShaper(config, shaper_rng(welcome.seed, info.peer, "udp")),
            )
        link_map = {info.peer: info for info in welcome.links}

        def context(app_name: str) -> AppContext:
            return AppContext(
                node=self.name,
                name=app_name,
                seed=welcome.seed,
                time_scale=welcome.time_scale,
                memory_qubits=welcome.memory_qubits,
                links=link_map,
                key_pools=self.key_pools,  # type: ignore[arg-type]  # StorePools: the KeyPools interface
                saes=self.kms.sae_ids if self.kms is not None else (),
            )

        self.host = AppHost(APP_KINDS, context)
        log.info(
            "registered as %s (time_scale %g, %d links); tcp %s:%d udp %s:%d control %s:%d",
            self.name,
            welcome.time_scale,
            len(link_map),
            *self.tcp_address,
            *self.udp_address,
            *self.control_address,
        )

    # ================================================================== the pump

    def _pump(self) -> None:
        """Drain every sans-IO output after an input; wake whoever has to write."""
        host = self.host
        assert host is not None
        for _ in range(10_000):
            moved = False
            while (event := self.qdev.next_event()) is not None:
                moved = True
                self._on_qdevice_event(event)
            while (action := host.next_action()) is not None:
                moved = True
                if isinstance(action, HostBrokerRequest):
                    if self.qdev.state is not SessionState.REGISTERED:
                        continue
                    try:
                        self.qdev.request(action.message, self._wall(), tag=("app", action.tag))
                    except LocalProtocolError as exc:  # the app built a message the wire refuses
                        host.handle_broker_reply(action.tag, Error.of(exc.code, exc.message), self._em_now())
                elif isinstance(action, HostPeerSend):
                    self._send_peer(action.peer, action.message)
                elif isinstance(action, HostAppIo):
                    self._app_io(action)
            if not moved:
                break
        self._broker_wake.wake()
        self._timer_wake.wake()

    def _on_qdevice_event(self, event: object) -> None:
        host = self.host
        assert host is not None
        if isinstance(event, ReplyReceived):
            tag = event.tag
            if isinstance(tag, tuple) and len(tag) == 2 and tag[0] == "app":
                host.handle_broker_reply(tag[1], event.message, self._em_now())
        elif isinstance(event, EventReceived):
            msg = event.message
            if isinstance(msg, EprDelivered | EprDone | QkdDetections | QkdEmitted | QkdStopped):
                host.handle_broker_event(msg, self._em_now())
            elif isinstance(msg, PeerUp):
                self._on_peer_up(msg)
            elif isinstance(msg, PeerDown):
                self._on_peer_down(msg.node)
            else:
                log.debug("broker event %s", msg.TYPE)
        elif isinstance(event, BrokerClosed):
            if not self._closing:
                log.error("broker session ended: %s", event.reason)
                self.exit_code = 3
                self.failure = f"lost the broker: {event.reason}"
                self._shutdown.set()

    # ================================================================== peers and links

    def _on_peer_up(self, msg: PeerUp) -> None:
        peer = self.peers.get(msg.node)
        if peer is None:
            log.debug("peer_up for %s, not a neighbour", msg.node[:64])
            return
        peer.generation += 1
        peer.tcp = (msg.tcp[0], msg.tcp[1])
        peer.udp = (msg.udp[0], msg.udp[1])
        by_name = self.options.dial_by_name
        peer.udp_target = None if by_name else peer.udp  # by name: set once resolved
        self.liveness.add_peer(msg.node, self._wall())
        log.info(
            "peer %s up (tcp %s:%d)%s%s",
            msg.node, *dial_address(msg.node, peer.tcp, by_name=by_name),
            " by name" if by_name else "", "; link cut" if peer.cut else "",
        )  # fmt: skip
        if self.name < msg.node and self._nursery is not None and peer.link is not None:
            peer.link.core.close(self._wall())
            peer.link.wake()
        self._start_peer_tasks(msg.node)

    def _start_peer_tasks(self, name: str) -> None:
        """Start this generation's dialler (if we dial) and name resolver (if by name)."""
        peer = self.peers[name]
        if self._nursery is None or self._closing or peer.cut or peer.tcp is None:
            return
        if self.options.dial_by_name:
            self._nursery.start_soon(self._resolve_udp, name, peer.generation)
        if self.name < name:
            self._nursery.start_soon(self._dial, name, peer.generation)

    def _on_peer_down(self, name: str) -> None:
        peer = self.peers.get(name)
        if peer is None:
            return
        peer.generation += 1
        peer.tcp = peer.udp = peer.udp_target = None
        self.liveness.remove_peer(name)
        if peer.link is not None:
            peer.link.core.close(self._wall())
            peer.link.wake()
        log.info("peer %s down", name)

    def _stream_shaper(self, peer_name: str) -> StreamShaper | None:
        peer = self.peers.get(peer_name)
        welcome = self.qdev.welcome
        if peer is None or welcome is None:
            return None
        return StreamShaper(peer.stream_config, shaper_rng(welcome.seed, peer_name, "tcp"))

    async def _resolve(self, peer: _Peer) -> str | None:
        """The neighbour's node name resolved now, or None (counted; logged, rate-limited)."""
        name = peer.info.peer
        assert self._udp is not None
        try:
            return await self.options.resolver(name, self._udp.family)
        except OSError as exc:
            peer.resolve_failures += 1
            if self._resolve_log.allow(name, self._wall()):
                log.warning("cannot resolve neighbour %s: %s (retrying)", name, exc.strerror or exc)
            return None

    async def _resolve_udp(self, peer_name: str, generation: int) -> None:
        """By name: keep the neighbour's datagram address resolved while it is not up."""
        while not self._closing:
            peer = self.peers[peer_name]
            if peer.generation != generation or peer.udp is None:
                return
            pause = _RESOLVE_INTERVAL_S
            if peer.udp_target is None or self.liveness.state(peer_name) is not LivenessState.UP:
                host = await self._resolve(peer)
                if peer.generation != generation or peer.udp is None:
                    return
                if host is None:
                    pause = _RESOLVE_RETRY_S
                else:
                    target = (host, peer.udp[1])
                    if target != peer.udp_target:
                        log.info("neighbour %s: datagrams to %s:%d", peer_name, *target)
                    peer.udp_target = target
            await trio.sleep(pause)

    async def _dial(self, peer_name: str, generation: int) -> None:
        delay = 0.05
        while not self._closing:
            peer = self.peers[peer_name]
            if peer.generation != generation or peer.tcp is None:
                return
            host, port = dial_address(peer_name, peer.tcp, by_name=self.options.dial_by_name)
            resolved = await self._resolve(peer) if self.options.dial_by_name else host
            try:
                if resolved is None:
                    raise OSError("name not resolved")  # logged by _resolve
                # Bounded: a SYN to an address cut off by a fault gets no answer at all.
                with trio.fail_after(_DIAL_TIMEOUT_S):
                    stream = await trio.open_tcp_stream(resolved, port)
            except (OSError, trio.TooSlowError) as exc:
                log.debug("dial %s failed: %s", peer_name, exc)
                await trio.sleep(delay)
                delay = min(delay * 2, _DIAL_BACKOFF_MAX_S)
                continue
            if peer.generation != generation:  # cut or peer_down/up while connecting
                with trio.CancelScope(shield=True):
                    await stream.aclose()
                return
            shaper = self._stream_shaper(peer_name)
            assert shaper is not None
            core = LinkConnection(
                LinkRole.DIALER, local_node=self.name, token=self.options.token, peer=peer_name, shaper=shaper
            )
            core.initiate(self._wall())
            link = LinkIO(core, stream, self._on_link_input)
            try:
                await link.run(handshake_timeout_s=self.options.handshake_timeout_s)
            except Exception:  # a bug on one connection must not take the node down
                log.exception("link connection to %s failed", peer_name)
            if link.refused and not link.refusal_retryable:
                return  # the peer said no (e.g. unauthorized): retrying cannot help
            if link.refused:  # no_link: the link is cut at the peer's end for now
                await trio.sleep(delay)
                delay = min(delay * 2, _DIAL_BACKOFF_MAX_S)
                continue
            delay = 0.05
            await trio.sleep(delay)

    async def _serve_incoming_link(self, stream: trio.SocketStream) -> None:
        core = LinkConnection(
            LinkRole.LISTENER,
            local_node=self.name,
            token=self.options.token,
            shaper_factory=self._stream_shaper,
            is_cut=self._is_cut,
        )
        link = LinkIO(core, stream, self._on_link_input)
        self._incoming_links.add(link)
        try:
            await link.run(handshake_timeout_s=self.options.handshake_timeout_s)
        except Exception:  # a bug on one connection must not take the node down
            log.exception("link connection failed")
        finally:
            self._incoming_links.discard(link)

    def _is_cut(self, peer_name: str) -> bool:
        peer = self.peers.get(peer_name)
        return peer is not None and peer.cut

    def _on_link_input(self, link: LinkIO) -> None:
        core = link.core
        while (event := core.next_event()) is not None:
            if isinstance(event, LinkEstablished):
                peer = self.peers[event.peer]
                if peer.cut:  # a handshake that was under way when the link was cut
                    core.close(self._wall())
                    log.info("link to %s closed at once: the link is cut", event.peer)
                    continue
                old = peer.link
                if old is not None and old is not link:
                    old.core.close(self._wall())
                    old.wake()
                    self._retire(peer, old)
                peer.link = link
                peer.connects += 1
                log.info("link to %s established (%s)", event.peer, core.role.value)
                pending = list(peer.outbox)
                peer.outbox.clear()
                for message in pending:
                    self._send_peer(event.peer, message)
            elif isinstance(event, MessageReceived):
                assert self.host is not None
                if isinstance(event.message, KmsMsg):
                    if self.kms is not None:
                        self.kms.receive(event.peer, event.message.body)
                    else:
                        self._kms_dropped += 1
                else:
                    self.host.handle_peer_message(event.peer, event.message, self._em_now())
            elif isinstance(event, PeerRejected):
                if event.code is ErrorCode.NO_LINK:  # a neighbour dialling a cut link: no intruder
                    log.info("refused a link from %s: the link is cut", event.claimed_node)
                    continue
                self._links_rejected += 1
                log.warning("refused a link from %r: %s", (event.claimed_node or "?")[:64], event.code.value)
            elif isinstance(event, LinkRefused):
                link.refused = True
                link.refusal_retryable = event.retryable
                if event.retryable:
                    log.info("link to %s refused by the peer for now: %s", core.peer, event.code)
                else:
                    log.error("link to %s refused by the peer: %s: %s", core.peer, event.code, event.message[:200])
            elif isinstance(event, MalformedInput):
                log.warning("malformed input on the link to %s: %s", core.peer or "?", event.code.value)
            elif isinstance(event, LinkClosed):
                if core.peer is not None:
                    peer = self.peers.get(core.peer)
                    if peer is not None and peer.link is link:
                        self._retire(peer, link)
                        peer.link = None
                        log.info("link to %s closed: %s", core.peer, event.reason)
        link.wake()
        self._pump()

    def _retire(self, peer: _Peer, link: LinkIO) -> None:
        """Fold a finished connection's counters into the peer's totals (once)."""
        if link.counted:
            return
        link.counted = True
        for k, v in dataclasses.asdict(link.core.statistics()).items():
            peer.totals[k] = peer.totals.get(k, 0) + v

    def _send_peer(self, peer_name: str, message: AppMsg | KmsMsg) -> None:
        peer = self.peers.get(peer_name)
        if peer is None:
            return
        link = peer.link
        if link is not None and link.core.state is LinkState.OPEN:
            try:
                link.core.send(message, self._wall())
            except LocalProtocolError as exc:
                log.error("dropped a %s for %s: %s", message.TYPE, peer_name, exc)
                return
            link.wake()
            return
        if isinstance(message, KmsMsg):  # the KME retries what matters; stale frames only confuse it
            self._kms_dropped += 1
            return
        if len(peer.outbox) >= _MAX_OUTBOX:
            peer.outbox.popleft()
            peer.outbox_dropped += 1
        peer.outbox.append(message)

    # ================================================================== key management and app I/O

    async def _start_kms(self, config: Mapping[str, Any]) -> Message:
        """`kms_start`: start the KME over the node's key store (once; again: same ports)."""
        if self.kms is not None:
            return KmsStarted(host=self.kms.host, etsi014_port=self.kms.etsi014_port, skip_port=self.kms.skip_port)
        if self._nursery is None:
            return Error.of(ErrorCode.NOT_REGISTERED, "the node is not running yet")
        try:
            service = KmsService(
                config, self.key_store, send=lambda peer, body: self._send_peer(peer, KmsMsg(body=body)),
                deliver_app=self._deliver_routed, data_dir=self.options.data_dir,
            )  # fmt: skip
        except KmsConfigError as exc:
            return Error.of(ErrorCode.BAD_FIELD, str(exc))
        host, etsi_port, skip_port = await self._nursery.start(service.run)
        self.kms = service
        for peer in self.peers:
            if self.liveness.state(peer) is LivenessState.UP:
                service.link_up(peer)
        for peer in self.key_store.link_peers():
            service.material_added(peer)
        return KmsStarted(host=host, etsi014_port=etsi_port, skip_port=skip_port)

    def _on_material(self, peer: str) -> None:
        if self.kms is not None:
            self.kms.material_added(peer)

    def _deliver_routed(self, src_node: str, app: str, body: dict[str, Any]) -> None:
        if self.host is not None:
            self.host.handle_routed_message(src_node, AppMsg(app=app, body=body), self._em_now())
            self._pump()

    def _app_io(self, io: HostAppIo) -> None:
        action = io.action
        host = self.host
        assert host is not None
        if isinstance(action, RoutedSend):
            if self.kms is None:
                log.warning("app %s: no KME runs here to route a message to %s", io.app[:64], action.node)
                return
            self.kms.send_app(action.node, action.app, action.body)
        elif isinstance(action, KmsCall):
            if self.kms is None:
                host.handle_app_reply(io.app, action.tag, KmsReply(0, {"message": "no KME runs on this node"}),
                                      self._em_now())
                return
            assert self._nursery is not None
            self._nursery.start_soon(self._kms_call, io.app, action)
        elif isinstance(action, UdpOpen):
            assert self._nursery is not None
            self._nursery.start_soon(self._udp_open, io.app, action)
        elif isinstance(action, UdpSend):
            app_sock = self._app_sockets.get(io.app)
            try:
                if app_sock is None:
                    raise trio.ClosedResourceError
                app_sock[1].send_nowait((action.data, action.addr))
            except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
                self._app_udp_dropped += 1  # UDP semantics: a full queue drops

    async def _kms_call(self, app: str, call: KmsCall) -> None:
        assert self.kms is not None and self.host is not None
        reply = await self.kms.sae_call(call)
        self.host.handle_app_reply(app, call.tag, reply, self._em_now())
        self._pump()

    async def _udp_open(self, app: str, action: UdpOpen) -> None:
        assert self.host is not None
        sock = trio.socket.socket(trio.socket.AF_INET6 if ":" in self.options.host else trio.socket.AF_INET,
                                  trio.socket.SOCK_DGRAM)
        try:
            await sock.bind((self.options.host, 0))
        except OSError as exc:
            sock.close()
            self.host.handle_app_reply(app, action.tag, Error.of(ErrorCode.INTERNAL, f"UDP bind: {exc.strerror}"),
                                       self._em_now())
            self._pump()
            return
        old = self._app_sockets.pop(app, None)
        if old is not None:
            old[0].close()
            old[1].close()
        outbox, queue = trio.open_memory_channel[tuple[bytes, tuple[str, int]]](_APP_UDP_QUEUE)
        self._app_sockets[app] = (sock, outbox)
        # Peers reach the socket where they reach this node (--advertise-host in containers).
        host, port = advertised_address(sock.getsockname()[:2], self.options.advertise_host)
        self.host.handle_app_reply(app, action.tag, UdpOpened(str(host), int(port)), self._em_now())
        self._pump()
        assert self._nursery is not None
        self._nursery.start_soon(self._app_udp_reader, app, sock)
        self._nursery.start_soon(self._app_udp_sender, sock, queue)

    async def _app_udp_sender(self, sock: trio.socket.SocketType,
                              queue: trio.MemoryReceiveChannel[tuple[bytes, tuple[str, int]]]) -> None:
        async with queue:
            async for data, addr in queue:
                try:
                    await sock.sendto(data, addr)
                except OSError:
                    self._app_udp_dropped += 1  # e.g. ICMP unreachable: the receiver is gone
                    if sock.fileno() < 0:
                        return

    async def _app_udp_reader(self, app: str, sock: trio.socket.SocketType) -> None:
        while True:
            try:
                data, addr = await sock.recvfrom(65536)
            except OSError:
                if sock.fileno() < 0:
                    return
                continue
            if self.host is None:
                continue
            self.host.handle_datagram(app, (str(addr[0]), int(addr[1])), data, self._em_now())
            self._pump()

    # ================================================================== broker I/O

    async def _broker_reader(self) -> None:
        stream = self._broker_stream
        assert stream is not None
        while True:
            try:
                data = await stream.receive_some(_RECEIVE_BYTES)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            self.qdev.receive_data(data, self._wall())
            self._pump()
            if not data:
                return

    async def _broker_writer(self) -> None:
        stream = self._broker_stream
        assert stream is not None
        while True:
            data = self.qdev.data_to_send()
            if data:
                try:
                    await stream.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    self.qdev.connection_lost()
                    self._broker_flushed.set()
                    self._pump()
                    return
                continue
            if self._closing:
                self._broker_flushed.set()  # our `bye` is out
            await self._broker_wake.wait()

    # ================================================================== timers

    async def _timer_loop(self) -> None:
        assert self.host is not None
        while True:
            deadline = math.inf
            live_t = self.liveness.get_timer()
            if live_t is not None:
                deadline = live_t
            app_t = self.host.get_timer()
            if app_t is not None:
                deadline = min(deadline, self.qdev.wall_time_of(app_t))
            await self._timer_wake.wait(deadline)
            now = self._wall()
            live_t = self.liveness.get_timer()
            if live_t is not None and live_t <= now:
                self.liveness.handle_timer(now)
                self._flush_probes()
            app_t = self.host.get_timer()
            if app_t is not None and self.qdev.wall_time_of(app_t) <= now:
                # max(): float rounding must not leave the app one ulp before its own timer.
                self.host.handle_timer(max(self.qdev.emulated_now(now), app_t))
                self._pump()

    # ================================================================== UDP

    def _udp_shapers(self) -> Iterable[DatagramShaper]:
        return [p.udp_shaper for p in self.peers.values()]

    def _send_datagram(self, peer_name: str, message: Message) -> None:
        peer = self.peers.get(peer_name)
        if peer is None or peer.udp_target is None or self._udp is None:
            return  # not up, or (by name) not resolved yet: like a lost datagram
        # A cut link's shaper drops it (counted there).
        self._udp.queue(peer.udp_shaper, encode_datagram(message), peer.udp_target, self._wall())

    def _flush_probes(self) -> None:
        for peer_name, probe in self.liveness.probes_to_send():
            self._send_datagram(peer_name, probe)
        self._liveness_events()

    def _liveness_events(self) -> None:
        while (event := self.liveness.next_event()) is not None:
            if isinstance(event, LinkUp):
                log.info("link to %s is up (probes answered)", event.peer)
                if self.kms is not None:
                    self.kms.link_up(event.peer)
            elif isinstance(event, LinkDown):
                log.warning("link to %s is down (%d probes unanswered)", event.peer, self.liveness.miss_limit)
                if self.kms is not None:
                    self.kms.link_down(event.peer)

    async def _udp_reader(self) -> None:
        assert self._udp is not None
        while True:
            try:
                data, address = await self._udp.receive()
            except OSError:
                continue  # e.g. ICMP unreachable reported on the socket
            try:
                msg: Message | None = decode(data).message
            except RemoteProtocolError:
                msg = None
            targets = {name: p.udp_target for name, p in self.peers.items()}
            peer_name = datagram_peer(msg, address, targets)
            if peer_name is None:
                self._udp_unknown += 1
                continue
            peer = self.peers[peer_name]
            if peer.cut:
                peer.udp_cut_dropped_in += 1
                continue
            peer.udp_in += 1
            if msg is None:
                self._udp_malformed += 1  # datagrams get no answer: dropped and counted
                continue
            if isinstance(msg, Probe) and msg.node == peer_name:
                self._send_datagram(peer_name, self.liveness.receive_probe(msg))
            elif isinstance(msg, ProbeAck):
                self.liveness.receive_ack(peer_name, msg, self._wall())
                self._liveness_events()
            else:
                self._udp_malformed += 1

    # ================================================================== control

    async def _serve_control(self, stream: trio.SocketStream) -> None:
        self._control_sessions += 1
        session = ControlSession(self, self.options.admin_token)
        try:
            while True:
                try:
                    data = await stream.receive_some(_RECEIVE_BYTES)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return
                session.receive_data(data, self._em_now())
                shutdown = False
                while (event := session.next_event()) is not None:
                    if isinstance(event, KmsStartRequested):
                        session.reply(event.re, await self._start_kms(event.config))
                    elif isinstance(event, AuthFailed):
                        self._control_unauthorized += 1
                        log.warning("control: authentication failed (client %r)", (event.client or "?")[:64])
                    elif isinstance(event, ShutdownRequested):
                        shutdown = True
                self._pump()
                out = session.data_to_send()
                if out:
                    try:
                        await stream.send_all(out)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        return
                if shutdown:
                    log.info("control: shutdown requested")
                    self._shutdown.set()
                if session.should_close() or not data:
                    return
        finally:
            with trio.CancelScope(shield=True):
                await stream.aclose()

    # ================================================================== shutdown

    async def _watch_signals(self, signals: AsyncIterator[int]) -> None:
        async for signum in signals:
            log.info("received %s; shutting down", signal.Signals(signum).name)
            self._shutdown.set()
            return

    def request_shutdown(self) -> None:
        self._shutdown.set()

    async def _graceful_close(self) -> None:
        self._closing = True
        now = self._wall()
        links = [p.link for p in self.peers.values() if p.link is not None] + list(self._incoming_links)
        for link in links:
            link.core.close(now)
            link.wake()
        self.qdev.close()
        self._broker_wake.wake()
        with trio.move_on_after(_SHUTDOWN_FLUSH_S):
            await self._broker_flushed.wait()
            while any(not link.core.should_close() for link in links):
                await trio.sleep(0.01)
        log.info("node %s stopped", self.name)


def _listener_address(listeners: list[trio.SocketListener]) -> Address:
    host, port = listeners[0].socket.getsockname()[:2]
    return host, port

