"""`python -m nodes`: run one node of an emulated network.

    QNETEM_TOKEN=... QNETEM_ADMIN_TOKEN=... python -m nodes \\
        --name alice --broker 127.0.0.1:7000 [--host 127.0.0.1] [--data-dir DIR] [--log-level info]

The node binds its classical-link TCP listener, its UDP socket and its control listener
on --host, port 0 each, registers with the broker (which learns those addresses from
`hello`) and serves until SIGTERM/SIGINT or a control `shutdown`.
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

from .runtime import BrokerUnavailable, NodeOptions, NodeRuntime, RegistrationFailed

EXIT_OK = 0
EXIT_INVALID = 2
EXIT_RUNTIME = 3


def _address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m nodes", description="qnetem node")
    p.add_argument("--name", required=True, help="this node's name (as in the scenario)")
    broker = os.environ.get("QNETEM_BROKER")  # set by a run's external.env for plugfest nodes
    p.add_argument(
        "--broker", required=broker is None, default=broker, type=_address,  # argparse applies type to it
        help="broker address HOST:PORT (default: $QNETEM_BROKER)",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind every listener on (default 127.0.0.1)")
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
    options = NodeOptions(
        name=args.name,
        broker=args.broker,
        token=token,
        admin_token=admin_token,
        host=args.host,
        data_dir=args.data_dir,
        probe_interval_s=args.probe_interval,
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
