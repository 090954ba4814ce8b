"""The `qnetem` command (DESIGN §2, §11).

    qnetem run FILE [--out DIR] [--backend c|numpy] [--runtime local|docker] [--image TAG] [--quiet]
    qnetem compose FILE -o DIR [--image TAG]   (a compose project: broker, nodes, conductor)
    qnetem conductor --scenario F --broker H:P --out DIR   (the compose project's timeline driver)
    qnetem validate FILE
    qnetem report RUN_DIR     (re-render RUN_DIR/report.html from results.json)
    qnetem certs RUN_DIR --sae SAE_ID [--out DIR]   (an SAE client certificate from the run's CA)
    qnetem image build [--offline] [--tag T] [--base-image IMG] [--mirror URL] [--rebuild-base] [--force]
    qnetem image status [--tag T]   (exit 1 when the image is missing or older than the sources)
    qnetem clean [--run RUN_ID] [--images]   (remove what qnetem created in Docker, by label)
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
from typing import TYPE_CHECKING

import emulator

if TYPE_CHECKING:
    from emulator.runtime.driver import RunOutcome

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
    run.add_argument(
        "--runtime", choices=("local", "docker"), default="local",
        help="local: processes on 127.0.0.1 (default); docker: the broker and every node in its own container",
    )  # fmt: skip
    run.add_argument("--image", metavar="TAG", help="docker runtime: image to use (default: qnetem:<version>, built if missing)")
    run.add_argument("--quiet", "-q", action="store_true", help="no live progress display")
    run.add_argument(
        "--registration-timeout", type=float, default=None, metavar="SECONDS",
        help="wall seconds to wait for every node to register (default: 20, or 600 with external nodes)",
    )  # fmt: skip

    compose = sub.add_parser("compose", help="write a compose project (docker compose / docker stack deploy) for a scenario")
    compose.add_argument("file", type=Path, metavar="FILE", help="scenario file (YAML)")
    compose.add_argument("-o", "--out", type=Path, metavar="DIR", required=True, help="directory to write the project to")
    compose.add_argument("--image", metavar="TAG", help="image of every service (default: qnetem:<version>)")
    compose.add_argument("--backend", choices=("c", "numpy"), help="kernel backend of the broker (default: c)")

    conductor = sub.add_parser(
        "conductor", help="drive a run whose broker and nodes someone else started (a compose project's service)"
    )
    conductor.add_argument("--scenario", type=Path, required=True, metavar="FILE", help="scenario file (YAML or JSON)")
    conductor.add_argument("--broker", required=True, metavar="HOST:PORT", help="the broker's address")
    conductor.add_argument("--out", type=Path, required=True, metavar="DIR", help="directory for results and report")
    conductor.add_argument(
        "--node-host-format", default="node-{name}", metavar="FORMAT",
        help="host of a node's control endpoint, from its name (default: node-{name})",
    )  # fmt: skip
    conductor.add_argument("--broker-wait", type=float, default=60.0, metavar="S", help="seconds to wait for the broker")
    conductor.add_argument(
        "--registration-timeout", type=float, default=120.0, metavar="S", help="seconds to wait for every node"
    )
    conductor.add_argument(
        "--stop-services", action="store_true", help="ask the broker and nodes to shut down at the end (swarm)"
    )

    validate = sub.add_parser("validate", help="check a scenario file and print every problem")
    validate.add_argument("file", type=Path, metavar="FILE", help="scenario file (YAML)")

    report = sub.add_parser("report", help="(re)render report.html of a run directory from its results.json")
    report.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run directory (holds results.json)")

    _add_certs_parser(sub)
    _add_image_parsers(sub)

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
        f"{len(plan.apps)} apps, {len(plan.faults)} faults, {len(plan.expectations)} expectations)\n"
    )
    return EXIT_OK


def _cmd_run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from emulator.runtime.driver import RunOptions, run_scenario

    console = Console()
    if not console.is_terminal:  # files and pipes: wide enough that tables do not wrap
        console = Console(width=max(shutil.get_terminal_size((160, 24)).columns, 160))
    options = RunOptions(
        scenario_path=args.file,
        out_dir=args.out,
        backend=args.backend,
        quiet=args.quiet,
        registration_timeout_s=args.registration_timeout,
        runtime=args.runtime,
        image=args.image,
    )
    outcome = run_scenario(options, console=console)
    return _report_outcome(outcome)


def _report_outcome(outcome: RunOutcome) -> int:
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


def _cmd_compose(args: argparse.Namespace) -> int:
    from emulator.runtime.compose import write_project
    from emulator.runtime.driver import InvalidInput

    try:
        project = write_project(args.file, args.out, image=args.image, backend=args.backend)
    except InvalidInput as exc:
        for line in exc.problems:
            sys.stderr.write(line + "\n")
        return EXIT_INVALID
    except OSError as exc:
        _err(f"cannot write the project: {exc}")
        return EXIT_RUNTIME
    sys.stdout.write(
        f"wrote {project.compose_file} ({len(project.services)} services, run {project.run_id})\n"
        f"run it:  cd {project.out_dir} && docker compose up --exit-code-from conductor"
        f"   (or docker-compose ...; swarm: docker stack deploy --resolve-image never -c docker-compose.yml "
        f"{project.project_name})\n"
    )
    return EXIT_OK


def _cmd_conductor(args: argparse.Namespace) -> int:
    from emulator.runtime.conductor import ConductorOptions, conduct, parse_address

    try:
        broker = parse_address(args.broker)
    except ValueError as exc:
        _err(f"--broker: {exc}")
        return EXIT_INVALID
    options = ConductorOptions(
        scenario_path=args.scenario,
        broker=broker,
        out_dir=args.out,
        node_host_format=args.node_host_format,
        broker_wait_s=args.broker_wait,
        registration_timeout_s=args.registration_timeout,
        stop_services=args.stop_services,
    )
    return _report_outcome(conduct(options))


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


def _add_certs_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`qnetem certs`: a client certificate for an application (SAE) of a run (issue 5: KMS)."""
    certs = sub.add_parser(
        "certs", help="issue an SAE client certificate from a run's CA (for the run's KMEs' ETSI 014 / SKIP APIs)",
        epilog="exit status: 0 written, 2 no CA in RUN_DIR, bad SAE id or SAE unknown to the run, 3 cannot write",
    )  # fmt: skip
    certs.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run directory (holds certs/ca.pem, ca.key)")
    certs.add_argument("--sae", required=True, metavar="SAE_ID", help="the SAE id (the certificate's CommonName)")
    certs.add_argument(
        "--out", type=Path, metavar="DIR",
        help="where to write SAE_ID.pem, SAE_ID.key, ca.pem (default: RUN_DIR/certs/saes)",
    )  # fmt: skip


def _cmd_certs(args: argparse.Namespace) -> int:
    import json

    from emulator.certs import CertError, RunCa, check_sae_id

    run_dir: Path = args.run_dir
    try:
        sae = check_sae_id(args.sae)
    except CertError as exc:
        _err(str(exc))
        return EXIT_INVALID
    kme: str | None = None  # the SAE's KME and its API URLs, when the run wrote kms.json
    urls: dict[str, str] = {}
    kms_file = run_dir / "kms.json"
    if kms_file.is_file():
        try:
            kms = json.loads(kms_file.read_text())
            saes, kmes = kms["saes"], kms["kmes"]
            if not isinstance(saes, dict) or not isinstance(kmes, dict):
                raise TypeError("saes and kmes are maps")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            _err(f"{kms_file}: cannot read it: {exc}")
            return EXIT_INVALID
        if sae not in saes:
            known = ", ".join(sorted(map(str, saes))) or "none"
            _err(f"SAE {sae!r} is not in the run (its SAEs: {known})")
            return EXIT_INVALID
        kme = saes[sae]
        apis = kmes.get(kme) if isinstance(kme, str) else None
        if not isinstance(apis, dict):
            _err(f"{kms_file}: SAE {sae!r} belongs to KME {kme!r}, which has no endpoints")
            return EXIT_INVALID
        urls = {str(api): str(url) for api, url in apis.items()}
    try:
        ca = RunCa.load(run_dir / "certs")
    except CertError as exc:
        _err(f"no usable run CA: {exc}")
        return EXIT_INVALID
    try:
        files = ca.issue_sae(sae).write(args.out or run_dir / "certs" / "saes", sae)
    except CertError as exc:
        _err(str(exc))
        return EXIT_INVALID
    except OSError as exc:
        _err(f"cannot write the credential: {exc}")
        return EXIT_RUNTIME
    sys.stdout.write(f"certificate {files.cert}\nkey         {files.key}\nca          {files.ca}\n")
    for api, url in urls.items():
        sys.stdout.write(f"kme {kme} {api} {url}\n")
    return EXIT_OK


def _add_image_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`qnetem image build|status` and `qnetem clean` (issue 3: containers)."""
    image = sub.add_parser("image", help="build or inspect the container image (qnetem:<version>)")
    image_sub = image.add_subparsers(dest="image_command", metavar="ACTION", required=True)
    build = image_sub.add_parser(
        "build",
        help="build the image: from python:3.11-slim-bookworm, or with --offline from a debootstrap base",
        epilog="exit status: 0 built or already up to date, 2 bad arguments, 3 build failed",
    )
    build.add_argument(
        "--offline", action="store_true",
        help="no container registry: build the base (qnetem-base:bookworm) with debootstrap + docker import (root)",
    )  # fmt: skip
    build.add_argument("--tag", metavar="T", help="image tag (default: qnetem:<version>)")
    build.add_argument(
        "--base-image", metavar="IMG",
        help="base image (default: python:3.11-slim-bookworm; with --offline qnetem-base:bookworm)",
    )  # fmt: skip
    build.add_argument(
        "--mirror", metavar="URL",
        help="--offline: Debian mirror (default: $QNETEM_DEBIAN_MIRROR or http://deb.debian.org/debian)",
    )  # fmt: skip
    build.add_argument("--rebuild-base", action="store_true", help="--offline: rebuild qnetem-base:bookworm too")
    build.add_argument("--force", action="store_true", help="rebuild even if the image matches the sources")
    status = image_sub.add_parser(
        "status", help="show the image and whether it matches the sources",
        epilog="exit status: 0 up to date, 1 missing or stale, 3 no Docker Engine",
    )  # fmt: skip
    status.add_argument("--tag", metavar="T", help="image tag (default: qnetem:<version>)")

    clean = sub.add_parser(
        "clean", help="remove every container, network and volume qnetem created (found by label)",
        epilog="exit status: 0 done (also when there was nothing to remove), 3 no Docker Engine or a refusal",
    )  # fmt: skip
    clean.add_argument("--run", metavar="RUN_ID", help="only what belongs to this run")
    clean.add_argument("--images", action="store_true", help="also remove qnetem images (org.qnetem.image)")


def _cmd_image(args: argparse.Namespace) -> int:
    from emulator.runtime.dockerutil import DockerUnavailable
    from emulator.runtime.image import ImageError, build_image, default_tag, image_status

    try:
        if args.image_command == "build":
            if not args.offline and (args.mirror or args.rebuild_base):
                _err("--mirror and --rebuild-base concern the offline base: add --offline")
                return EXIT_INVALID
            build_image(
                offline=args.offline, tag=args.tag, base_image=args.base_image, mirror=args.mirror,
                rebuild_base=args.rebuild_base, force=args.force,
                log=lambda line: print(line, flush=True),
            )  # fmt: skip
            return EXIT_OK
        info = image_status(args.tag)
    except (ImageError, DockerUnavailable) as exc:
        _err(str(exc))
        return EXIT_RUNTIME
    if info is None:
        sys.stdout.write(f"{args.tag or default_tag()}: no such image (build it: qnetem image build [--offline])\n")
        return EXIT_EXPECTATION_FAILED
    state = {True: "up to date", False: "stale (the sources changed): qnetem image build", None: "unknown (no sources)"}
    sys.stdout.write(
        f"{info.tag}: {info.image_id[:19]}  {info.size_bytes / 1e6:.0f} MB  created {info.created[:19]}\n"
        f"  version {info.version}  source digest {(info.source_digest or '-')[:12]}  {state[info.current]}\n"
    )
    return EXIT_OK if info.current is not False else EXIT_EXPECTATION_FAILED


def _cmd_clean(args: argparse.Namespace) -> int:
    from emulator.runtime.cleanup import CleanError, clean
    from emulator.runtime.dockerutil import DockerUnavailable

    try:
        report = clean(run_id=args.run, images=args.images)
    except (CleanError, DockerUnavailable) as exc:
        _err(str(exc))
        return EXIT_RUNTIME
    for kind, names in (
        ("service", report.services), ("container", report.containers), ("network", report.networks),
        ("volume", report.volumes), ("image", report.images),
    ):  # fmt: skip
        for name in names:
            sys.stdout.write(f"removed {kind} {name}\n")
    counts = ", ".join(
        f"{kind} {n}" for kind, n in report.counts().items() if n or kind in ("containers", "networks", "volumes")
    )
    scope = f"run {args.run}" if args.run else "all runs"
    sys.stdout.write(f"clean ({scope}): removed {counts}\n" if report.total else f"clean ({scope}): nothing to remove\n")
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
        if args.command == "compose":
            return _cmd_compose(args)
        if args.command == "conductor":
            return _cmd_conductor(args)
        if args.command == "certs":
            return _cmd_certs(args)
        if args.command == "image":
            return _cmd_image(args)
        if args.command == "clean":
            return _cmd_clean(args)
        _err(f"unknown command {args.command!r}")
        return EXIT_INVALID
    except KeyboardInterrupt:
        sys.stderr.write("qnetem: interrupted\n")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
