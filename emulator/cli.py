"""The `qnetem` command (DESIGN §2, §11).

    qnetem run FILE [--out DIR] [--backend c|numpy] [--runtime local] [--quiet]
    qnetem validate FILE
    qnetem report RUN_DIR     (re-render RUN_DIR/report.html from results.json)
    qnetem broker ARGS...     (the broker, in this process)
    qnetem node ARGS...       (a node: exec of `python -m nodes ARGS...`)
    qnetem --version

Exit status of every subcommand: 0 success (every expectation held), 1 an expectation
failed, 2 invalid input (bad scenario, bad arguments), 3 runtime failure, 130
interrupted. Errors are one line on stderr, never a traceback (a bug's traceback goes
to RUN/orchestrator.log).

`qnetem node` replaces this process with `python -m nodes` instead of importing the
package: `emulator` never imports `nodes` (DESIGN §1), and the node should not carry
the orchestrator's modules around.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import emulator

__all__ = ["main"]

EXIT_OK = 0
EXIT_EXPECTATION_FAILED = 1
EXIT_INVALID = 2
EXIT_RUNTIME = 3
EXIT_INTERRUPTED = 130

_PASSTHROUGH = ("broker", "node")


def _err(message: str) -> None:
    sys.stderr.write(f"qnetem: error: {message}\n")
    sys.stderr.flush()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qnetem",
        description="Quantum network emulator: run and validate scenarios, run the broker or a node.",
        epilog="exit status: 0 ok, 1 an expectation failed, 2 invalid input, 3 runtime failure",
    )
    parser.add_argument("--version", action="version", version=f"qnetem {emulator.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    run = sub.add_parser("run", help="run a scenario and check its expectations")
    run.add_argument("file", type=Path, metavar="FILE", help="scenario file (YAML)")
    run.add_argument("--out", type=Path, metavar="DIR", help="run directory (default: runs/<name>-<UTC timestamp>)")
    run.add_argument("--backend", choices=("c", "numpy"), help="kernel backend of the broker (default: c)")
    run.add_argument("--runtime", choices=("local",), default="local", help="where processes run (default: local)")
    run.add_argument("--quiet", "-q", action="store_true", help="no live progress display")
    run.add_argument(
        "--registration-timeout", type=float, default=None, metavar="SECONDS",
        help="wall seconds to wait for every node to register (default: 20, or 600 with external nodes)",
    )  # fmt: skip

    validate = sub.add_parser("validate", help="check a scenario file and print every problem")
    validate.add_argument("file", type=Path, metavar="FILE", help="scenario file (YAML)")

    report = sub.add_parser("report", help="(re)render report.html of a run directory from its results.json")
    report.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run directory (holds results.json)")

    sub.add_parser(
        "broker", help="run the quantum-channel broker (arguments: see `qnetem broker --help`)", add_help=False
    )
    sub.add_parser("node", help="run one node (arguments: see `qnetem node --help`)", add_help=False)
    return parser


def _cmd_validate(path: Path) -> int:
    from emulator.runtime.local import InvalidInput, load_plan

    try:
        scenario, plan = load_plan(path)
    except InvalidInput as exc:
        for line in exc.problems:
            sys.stderr.write(line + "\n")
        sys.stderr.write(f"qnetem: {path}: {len(exc.problems)} problem(s)\n")
        return EXIT_INVALID
    sys.stdout.write(
        f"{path}: ok (scenario {plan.name}: {len(plan.nodes)} nodes, {len(scenario.links)} links, "
        f"{len(plan.apps)} apps, {len(plan.expectations)} expectations)\n"
    )
    return EXIT_OK


def _cmd_run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from emulator.runtime.local import RunOptions, run_scenario

    console = Console()
    if not console.is_terminal:  # files and pipes: wide enough that tables do not wrap
        console = Console(width=max(shutil.get_terminal_size((160, 24)).columns, 160))
    options = RunOptions(
        scenario_path=args.file,
        out_dir=args.out,
        backend=args.backend,
        quiet=args.quiet,
        registration_timeout_s=args.registration_timeout,
    )
    outcome = run_scenario(options, console=console)
    code = int(outcome.exit_code)
    if code == EXIT_INVALID and outcome.message:
        for line in outcome.message.splitlines():
            sys.stderr.write(line + "\n")
    elif code == EXIT_EXPECTATION_FAILED and outcome.results is not None:
        failed = sum(1 for e in outcome.results.expectations if not e.passed)
        _err(f"{failed} expectation(s) failed; see {outcome.run_dir}/results.json")
    elif code != EXIT_OK and outcome.message:
        _err(outcome.message)
    return code


def _cmd_report(run_dir: Path) -> int:
    from emulator.report.html import load_run_dir, write_report

    if not (run_dir / "results.json").is_file():
        _err(f"{run_dir}: not a run directory (no results.json)")
        return EXIT_INVALID
    try:
        results, scenario = load_run_dir(run_dir)
    except (OSError, ValueError) as exc:  # unreadable or not JSON (json.JSONDecodeError is a ValueError)
        _err(f"{run_dir / 'results.json'}: cannot read it: {exc}")
        return EXIT_INVALID
    try:
        path = write_report(run_dir, results, scenario)
    except Exception as exc:  # a rendering bug: one line, not a traceback
        _err(f"cannot render the report: {type(exc).__name__}: {exc}")
        return EXIT_RUNTIME
    sys.stdout.write(f"{path}\n")
    return EXIT_OK


def _cmd_broker(argv: Sequence[str]) -> int:
    from emulator.broker.__main__ import main as broker_main

    return int(broker_main(list(argv)) or 0)


def _cmd_node(argv: Sequence[str]) -> int:
    argv = [sys.executable, "-m", "nodes", *argv]
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execv(sys.executable, argv)
    except OSError as exc:
        _err(f"cannot start the node: {exc.strerror or exc}")
        return EXIT_RUNTIME
    return EXIT_RUNTIME  # not reached


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    try:
        if args_list and args_list[0] in _PASSTHROUGH:
            if args_list[0] == "broker":
                return _cmd_broker(args_list[1:])
            return _cmd_node(args_list[1:])
        args = _parser().parse_args(args_list)  # exits 2 on bad arguments
        if args.command == "validate":
            return _cmd_validate(args.file)
        if args.command == "run":
            return _cmd_run(args)
        if args.command == "report":
            return _cmd_report(args.run_dir)
        _err(f"unknown command {args.command!r}")
        return EXIT_INVALID
    except KeyboardInterrupt:
        sys.stderr.write("qnetem: interrupted\n")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
