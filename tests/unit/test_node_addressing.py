"""Neighbour addressing (nodes/transport/addressing.py) and the node's address options (nodes/__main__.py)."""

from __future__ import annotations

import pytest

from emulator.wire import AppMsg, Probe, ProbeAck
from nodes.__main__ import _env_flag, _parser
from nodes.transport.addressing import LogThrottle, advertised_address, datagram_peer, dial_address, parse_hosts


@pytest.mark.parametrize(
    ("by_name", "announced", "expected"),
    [
        (False, ("127.0.0.1", 7101), ("127.0.0.1", 7101)),
        (False, ("0.0.0.0", 7101), ("0.0.0.0", 7101)),  # without the flag nothing changes
        (True, ("0.0.0.0", 7101), ("bob", 7101)),  # wildcard host replaced by the name, port kept
        (True, ("10.1.2.3", 40000), ("bob", 40000)),
    ],
)
def test_dial_address(by_name: bool, announced: tuple[str, int], expected: tuple[str, int]) -> None:
    assert dial_address("bob", announced, by_name=by_name) == expected


def test_advertised_address() -> None:
    assert advertised_address(("0.0.0.0", 7101), None) == ("0.0.0.0", 7101)
    assert advertised_address(("0.0.0.0", 7101), "") == ("0.0.0.0", 7101)
    assert advertised_address(("0.0.0.0", 7101), "alice") == ("alice", 7101)


# alice's view: bob up at a resolved link-network address, carol up (registered address), dave not up.
TARGETS = {"bob": ("172.20.1.3", 5001), "carol": ("127.0.0.1", 6001), "dave": None}


def test_probes_and_acks_belong_to_the_neighbour_they_name_whatever_their_source() -> None:
    # bob's datagram comes from another of his addresses (another network): still bob's.
    assert datagram_peer(Probe(node="bob", seq=1, sent_s=0.0), ("172.20.9.7", 5001), TARGETS) == "bob"
    assert datagram_peer(ProbeAck(node="bob", seq=1, sent_s=0.0), ("10.0.0.5", 33333), TARGETS) == "bob"
    # Content wins over a source that matches another neighbour.
    assert datagram_peer(Probe(node="bob", seq=1, sent_s=0.0), ("127.0.0.1", 6001), TARGETS) == "bob"


def test_datagrams_naming_no_up_neighbour_belong_to_nobody() -> None:
    assert datagram_peer(Probe(node="dave", seq=1, sent_s=0.0), ("127.0.0.1", 7001), TARGETS) is None  # not up
    assert datagram_peer(Probe(node="mallory", seq=1, sent_s=0.0), ("127.0.0.1", 6001), TARGETS) is None
    assert datagram_peer(ProbeAck(node="alice", seq=1, sent_s=0.0), ("127.0.0.1", 6001), TARGETS) is None


def test_unnamed_datagrams_are_matched_by_source_for_counting_only() -> None:
    assert datagram_peer(None, ("127.0.0.1", 6001), TARGETS) == "carol"  # undecodable, from carol's address
    assert datagram_peer(AppMsg(app="x", body={}), ("172.20.1.3", 5001), TARGETS) == "bob"
    assert datagram_peer(None, ("127.0.0.1", 9999), TARGETS) is None
    assert datagram_peer(None, ("10.9.9.9", 5001), {"bob": ("0.0.0.0", 5001)}) == "bob"  # wildcard: port only


def test_parse_hosts() -> None:
    text = "# test hosts\n127.0.0.1 alice  bob # two names\n\n127.0.0.2 bob carol\nbroken\n::1 ip6-node\n"
    assert parse_hosts(text) == {"alice": "127.0.0.1", "bob": "127.0.0.1", "carol": "127.0.0.2", "ip6-node": "::1"}


def test_log_throttle() -> None:
    throttle = LogThrottle(30.0)
    assert throttle.allow("bob", 0.0)
    assert not throttle.allow("bob", 29.9)
    assert throttle.allow("carol", 10.0)  # per key
    assert throttle.allow("bob", 30.0)
    assert throttle.suppressed == 1
    with pytest.raises(ValueError):
        LogThrottle(0.0)


# --------------------------------------------------------------------------- python -m nodes options


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in ("QNETEM_BROKER", "QNETEM_NODE_HOST", "QNETEM_DIAL_BY_NAME", "QNETEM_ADVERTISE_HOST"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_defaults_are_unchanged(clean_env: pytest.MonkeyPatch) -> None:
    args = _parser().parse_args(["--name", "alice", "--broker", "127.0.0.1:7000"])
    assert (args.host, args.advertise_host, args.dial_by_name, args.broker_wait) == ("127.0.0.1", None, None, 30.0)
    assert _env_flag("QNETEM_DIAL_BY_NAME") is False


def test_environment_fallbacks_for_compose(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("QNETEM_BROKER", "broker:7000")
    clean_env.setenv("QNETEM_NODE_HOST", "0.0.0.0")
    clean_env.setenv("QNETEM_ADVERTISE_HOST", "alice")
    clean_env.setenv("QNETEM_DIAL_BY_NAME", "1")
    args = _parser().parse_args(["--name", "alice"])
    assert (args.broker, args.host, args.advertise_host) == (("broker", 7000), "0.0.0.0", "alice")
    assert args.dial_by_name is None and _env_flag("QNETEM_DIAL_BY_NAME") is True  # main() applies the env
    # The command line wins over the environment.
    args = _parser().parse_args(["--name", "alice", "--host", "127.0.0.1", "--no-dial-by-name", "--broker-wait", "90"])
    assert (args.host, args.dial_by_name, args.broker_wait) == ("127.0.0.1", False, 90.0)


@pytest.mark.parametrize(("value", "expected"), [("", False), ("0", False), ("false", False), ("1", True), ("TRUE", True)])
def test_env_flag_values(clean_env: pytest.MonkeyPatch, value: str, expected: bool) -> None:
    clean_env.setenv("QNETEM_DIAL_BY_NAME", value)
    assert _env_flag("QNETEM_DIAL_BY_NAME") is expected


def test_env_flag_rejects_nonsense(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("QNETEM_DIAL_BY_NAME", "maybe")
    with pytest.raises(ValueError, match="QNETEM_DIAL_BY_NAME"):
        _env_flag("QNETEM_DIAL_BY_NAME")
