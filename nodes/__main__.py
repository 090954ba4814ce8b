"""`python -m nodes`: run one node of an emulated network.

    QNETEM_TOKEN=... QNETEM_ADMIN_TOKEN=... python -m nodes \\
        --name alice --broker 127.0.0.1:7000 [--host 127.0.0.1] [--data-dir DIR] [--log-level info]
        [--dial-by-name] [--advertise-host HOST] [--broker-wait 30]

The node binds its classical-link TCP listener, its UDP socket and its control listener
on --host, port 0 each, registers with the broker (which learns those addresses from
`hello`, with --advertise-host as their host if given) and serves until SIGTERM/SIGINT
or a control `shutdown`. It keeps trying to reach the broker for --broker-wait seconds,
so it may start before the broker. With --dial-by-name it reaches each neighbour at
host = the neighbour's name (resolved at each attempt) and the ports from `peer_up`,
as in containers where every link network knows each endpoint by its node name.

Environment: QNETEM_TOKEN and QNETEM_ADMIN_TOKEN (required); defaults for options, handy
in compose files: QNETEM_BROKER (--broker), QNETEM_NODE_HOST (--host),
QNETEM_DIAL_BY_NAME=1 (--dial-by-name), QNETEM_ADVERTISE_HOST (--advertise-host).
QNETEM_TEST_HOSTS_FILE is a test seam only: names resolve from that file (/etc/hosts
format, re-read at every lookup) instead of DNS.

Tokens come from the environment only (never the command line, which other users can
read). Exit status: 0 clean shutdown; 2 invalid input (arguments, missing tokens,
registration refused by the broker); 3 runtime failure (broker unreachable or lost).
Fatal errors are one line on stderr.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import trio

from .runtime import (
    BrokerUnavailable,
    NodeOptions,
    NodeRuntime,
    RegistrationFailed,
    Resolver,
    hosts_file_resolver,
    resolve_by_dns,
)

EXIT_OK = 0
EXIT_INVALID = 2
EXIT_RUNTIME = 3


def _address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("", "0", "false", "no", "off")


def _env_flag(name: str) -> bool:
    value = os.environ.get(name, "").strip().lower()
    if value not in _TRUE + _FALSE:
        raise ValueError(f"{name} must be 1 or 0 (true/false), got {value[:20]!r}")
    return value in _TRUE


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m nodes", description="qnetem node")
    p.add_argument("--name", required=True, help="this node's name (as in the scenario)")
    broker = os.environ.get("QNETEM_BROKER")  # set by a run's external.env for plugfest nodes
    p.add_argument(
        "--broker", required=broker is None, default=broker, type=_address,  # argparse applies type to it
        help="broker address HOST:PORT (default: $QNETEM_BROKER)",
    )
    p.add_argument(
        "--host", default=os.environ.get("QNETEM_NODE_HOST") or "127.0.0.1",
        help="address to bind every listener on (default: $QNETEM_NODE_HOST, else 127.0.0.1)",
    )  # fmt: skip
    p.add_argument(
        "--advertise-host", default=os.environ.get("QNETEM_ADVERTISE_HOST") or None,
        help="host to report in hello instead of the bound one, e.g. when bound to 0.0.0.0 "
        "(default: $QNETEM_ADVERTISE_HOST, else the bound host)",
    )  # fmt: skip
    p.add_argument(
        "--dial-by-name", action=argparse.BooleanOptionalAction, default=None,
        help="reach each neighbour at host = its node name (resolved at every attempt) with the "
        "ports from peer_up (default: $QNETEM_DIAL_BY_NAME, else off)",
    )  # fmt: skip
    p.add_argument(
        "--broker-wait", type=float, default=30.0, metavar="SECONDS",
        help="wall seconds to keep trying to reach the broker and register (default 30)",
    )  # fmt: skip
    p.add_argument("--data-dir", type=Path, default=None, help="directory for the node's state")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--probe-interval", type=float, default=0.1, help="wall seconds between liveness probes")
    return p


def _fail(name: str, message: str) -> None:
    print(f"qnetem node {name}: error: {message}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format=f"%(asctime)s %(levelname)s node[{args.name}] %(name)s: %(message)s",
    )
    token = os.environ.get("QNETEM_TOKEN", "")
    admin_token = os.environ.get("QNETEM_ADMIN_TOKEN", "")
    if not token or not admin_token:
        _fail(args.name, "QNETEM_TOKEN and QNETEM_ADMIN_TOKEN must be set in the environment")
        return EXIT_INVALID
    if not args.probe_interval > 0:
        _fail(args.name, "--probe-interval must be > 0")
        return EXIT_INVALID
    if not args.broker_wait > 0:
        _fail(args.name, "--broker-wait must be > 0")
        return EXIT_INVALID
    if args.dial_by_name is None:
        try:
            args.dial_by_name = _env_flag("QNETEM_DIAL_BY_NAME")
        except ValueError as exc:
            _fail(args.name, str(exc))
            return EXIT_INVALID
    resolver: Resolver = resolve_by_dns
    hosts_file = os.environ.get("QNETEM_TEST_HOSTS_FILE")
    if hosts_file:
        logging.getLogger("nodes").warning("test seam: neighbour names resolve from %s, not DNS", hosts_file)
        resolver = hosts_file_resolver(Path(hosts_file))
    options = NodeOptions(
        name=args.name,
        broker=args.broker,
        token=token,
        admin_token=admin_token,
        host=args.host,
        data_dir=args.data_dir,
        probe_interval_s=args.probe_interval,
        connect_timeout_s=args.broker_wait,
        dial_by_name=args.dial_by_name,
        advertise_host=args.advertise_host,
        resolver=resolver,
    )
    runtime = NodeRuntime(options)
    try:
        code = trio.run(runtime.run)
        if code != EXIT_OK and runtime.failure:
            _fail(args.name, runtime.failure)
        return code
    except RegistrationFailed as exc:
        _fail(args.name, str(exc))
        return EXIT_INVALID
    except BrokerUnavailable as exc:
        _fail(args.name, str(exc))
        return EXIT_RUNTIME
    except OSError as exc:
        _fail(args.name, f"cannot bind on {args.host}: {exc.strerror or exc}")
        return EXIT_RUNTIME
    except KeyboardInterrupt:
        return EXIT_OK
    except BaseException as exc:  # trio wraps task failures in exception groups
        logging.getLogger("nodes").debug("node failed", exc_info=True)
        _fail(args.name, f"internal failure: {_first_leaf(exc)}")
        return EXIT_RUNTIME


def _first_leaf(exc: BaseException) -> str:
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return f"{type(exc).__name__}: {exc}"


if __name__ == "__main__":
    sys.exit(main())
