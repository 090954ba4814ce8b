"""Where a node sends to its neighbours, and which neighbour a datagram is from (sans-IO).

Theory of operation (docs/protocol.md §4.6 "Addresses"). A node learns each neighbour's
classical-link TCP address and probe UDP address from `peer_up`; they are what the
neighbour reported in its `hello`. That is enough on one host (everything on
127.0.0.1), but not in containers: there a node binds the wildcard address 0.0.0.0, so
the host it reports is useless to its peers, and each classical link is its own network
on which the neighbour is reachable under its node name (a DNS alias). Hence two modes:

* by address (default): dial / send to the `peer_up` address as given;
* by name (`--dial-by-name`): dial / send to host = the neighbour's node name with the
  ports of `peer_up`. The shell resolves the name afresh at every dial attempt and
  whenever probing (re)starts or the neighbour is not up, so a neighbour whose address
  changed (a link network disconnected and connected again) is found again.

A node bound to a wildcard address may report another host (`--advertise-host`).

Incoming datagrams are attributed by content, not by source address: a node on several
networks sends from the address of the network a datagram leaves on, which is not the
address it registered (nor, by name, the one its name resolves to on every network).
A decoded `probe`/`probe_ack` belongs to the neighbour named in its `node` field, if
that neighbour is up; answers always go to the neighbour's known address, never to the
source, so a forged probe cannot be reflected at a third party. Only for datagrams
without a usable name (undecodable, another type) is the source address compared with
the neighbours' addresses — for counting them, never for answering them.

Nothing here does I/O or reads a clock: resolution is the shell's, times are arguments.
"""

from __future__ import annotations

from collections.abc import Mapping

from emulator.wire import Address, Message, Probe, ProbeAck

__all__ = ["LogThrottle", "advertised_address", "datagram_peer", "dial_address", "parse_hosts"]

_WILDCARD_HOSTS = frozenset({"0.0.0.0", "::", "localhost"})


def dial_address(peer: str, announced: Address, *, by_name: bool) -> Address:
    """The address to reach neighbour `peer` at, given the one it announced (`peer_up`).

    By name, the host is the neighbour's node name (to be resolved by the caller at each
    attempt) and the port the announced one; otherwise the announced address as is.
    """
    host, port = announced
    return (peer, port) if by_name else (host, port)


def advertised_address(bound: Address, advertise_host: str | None) -> Address:
    """The address to report in `hello` for a listener bound at `bound`."""
    return (advertise_host, bound[1]) if advertise_host else (bound[0], bound[1])


def datagram_peer(message: Message | None, source: Address, targets: Mapping[str, Address | None]) -> str | None:
    """The neighbour a received datagram belongs to, or None.

    `message` is the decoded datagram (None if it did not decode); `targets` maps each
    neighbour to the address datagrams to it go to (None while it is not up, or its name
    is not resolved yet). A `probe`/`probe_ack` belongs to the up neighbour it names,
    whatever its source. Anything else is matched by source address (a wildcard target
    host matches any host on the same port), so that garbage from a neighbour is
    counted against it; such datagrams are never answered.
    """
    if isinstance(message, Probe | ProbeAck):
        return message.node if targets.get(message.node) is not None else None
    for name, target in targets.items():
        if target is not None and target[1] == source[1] and (target[0] == source[0] or target[0] in _WILDCARD_HOSTS):
            return name
    return None


def parse_hosts(text: str) -> dict[str, str]:
    """Names to addresses from text in the /etc/hosts format (`ADDRESS NAME [ALIAS...]`, `#` comments).

    The first line that mentions a name wins, as in the resolver's `files` source.
    """
    table: dict[str, str] = {}
    for line in text.splitlines():
        fields = line.split("#", 1)[0].split()
        if len(fields) < 2:
            continue
        address, *names = fields
        for name in names:
            table.setdefault(name, address)
    return table


class LogThrottle:
    """At most one log line per key per `interval_s` (the caller's clock)."""

    def __init__(self, interval_s: float = 30.0) -> None:
        if not interval_s > 0.0:
            raise ValueError(f"interval_s must be > 0, got {interval_s!r}")
        self.interval_s = interval_s
        self._last: dict[str, float] = {}
        self.suppressed = 0  # lines not logged so far

    def allow(self, key: str, now: float) -> bool:
        last = self._last.get(key)
        if last is not None and now - last < self.interval_s:
            self.suppressed += 1
            return False
        self._last[key] = now
        return True
