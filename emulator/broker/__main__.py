"""`python -m emulator.broker`: run the quantum-channel broker for one scenario.

    QNETEM_TOKEN=... QNETEM_ADMIN_TOKEN=... python -m emulator.broker \\
        --scenario run/scenario.json --host 127.0.0.1 --port 0 --port-file run/broker.port

The scenario file is the JSON that `emulator.scenario.scenario_to_dict` produces (it is
re-validated here). Tokens come from the environment only, never from the command line
(which other users can read in the process list) and never reach a log. After binding,
the chosen port is written to --port-file atomically. The process exits 0 after an
admin `shutdown`, SIGTERM or SIGINT; 2 on invalid input (scenario, tokens, arguments);
3 on a runtime failure.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence

import trio

from emulator.kernels import BACKEND_NAMES, KernelBuildError, get_backend
from emulator.scenario import ScenarioError, load_scenario, scenario_from_dict

from .config import BrokerConfig, ConfigError
from .core import BrokerCore
from .server import serve_broker

log = logging.getLogger("emulator.broker")

EXIT_OK = 0
EXIT_INVALID = 2
EXIT_RUNTIME = 3
_MAX_SCENARIO_JSON_BYTES = 4 << 20


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m emulator.broker", description="qnetem quantum-channel broker")
    p.add_argument("--scenario", required=True, help="scenario: YAML as written by users, or the JSON a run directory holds")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=0, help="TCP port (default 0: any free port)")
    p.add_argument("--port-file", help="write the bound port here (atomically)")
    p.add_argument("--backend", choices=sorted(BACKEND_NAMES), default=None, help="kernel backend (default: $QNETEM_BACKEND or c)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


def load_config(path: str) -> BrokerConfig:
    """Read and validate a scenario (YAML, or JSON from `scenario_to_dict`) into a `BrokerConfig`.

    Raises ScenarioError, ConfigError or OSError.
    """
    if path.endswith((".yaml", ".yml")):  # plugfests start a broker straight from the scenario file
        return BrokerConfig.from_scenario(load_scenario(path))
    with open(path, "rb") as f:
        raw = f.read(_MAX_SCENARIO_JSON_BYTES + 1)
    if len(raw) > _MAX_SCENARIO_JSON_BYTES:
        raise ConfigError(f"{path}: scenario JSON larger than {_MAX_SCENARIO_JSON_BYTES} bytes")
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: not JSON ({exc})") from None
    return BrokerConfig.from_scenario(scenario_from_dict(data, source=path))


async def _run(core: BrokerCore, args: argparse.Namespace) -> None:
    async with trio.open_nursery() as nursery:

        async def on_signal() -> None:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for signum in signals:
                    log.info("received %s; exiting", signal.Signals(signum).name)
                    nursery.cancel_scope.cancel()
                    return

        nursery.start_soon(on_signal)
        await serve_broker(core, host=args.host, port=args.port, port_file=args.port_file)
        nursery.cancel_scope.cancel()  # shutdown requested: stop the signal watcher too


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    node_token = os.environ.get("QNETEM_TOKEN", "")
    admin_token = os.environ.get("QNETEM_ADMIN_TOKEN", "")
    if not node_token or not admin_token:
        log.error("QNETEM_TOKEN and QNETEM_ADMIN_TOKEN must be set in the environment")
        return EXIT_INVALID
    try:
        config = load_config(args.scenario)
    except (ScenarioError, ConfigError) as exc:
        log.error("invalid scenario:\n%s", exc)
        return EXIT_INVALID
    except OSError as exc:
        log.error("cannot read %s: %s", args.scenario, exc.strerror or exc)
        return EXIT_INVALID
    try:
        backend = get_backend(args.backend)
    except (KernelBuildError, ValueError) as exc:
        log.error("kernel backend unavailable: %s", exc)
        return EXIT_RUNTIME
    core = BrokerCore(config, backend=backend, node_token=node_token, admin_token=admin_token, now_s=0.0)
    log.info(
        "broker for %d nodes, %d links, backend %s, time_scale %g",
        len(config.nodes),
        len(config.links),
        backend.name,
        config.time_scale,
    )
    try:
        trio.run(_run, core, args)
    except Exception as exc:  # trio wraps task failures in exception groups
        os_error = _find_os_error(exc)
        if os_error is not None:
            log.error("cannot serve on %s:%d: %s", args.host, args.port, os_error.strerror or os_error)
        else:
            log.exception("broker failed")
        return EXIT_RUNTIME
    return EXIT_OK


def _find_os_error(exc: BaseException) -> OSError | None:
    if isinstance(exc, OSError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _find_os_error(inner)
            if found is not None:
                return found
    return None


if __name__ == "__main__":
    sys.exit(main())
