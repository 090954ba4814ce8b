"""A real `qnetem run` of a KMS scenario in the background, for bench/bench_kms.py.

Theory of operation
-------------------
`RealKmsRun` writes a scenario (YAML) into a temporary directory and starts
``python -m emulator.cli run FILE --out RUN --quiet`` (the `qnetem run` command) as a
child process; its output goes to files in the work directory. The bench then

* waits for ``RUN/kms.json`` (the KMEs listen; ``wait_manifest``),
* waits for the named QKD apps' ``app_done`` / ``app_failed`` events in
  ``RUN/events.jsonl`` (the link material is in the stores; ``wait_apps``),
* issues SAE credentials with ``python -m emulator.cli certs RUN --sae ID --out DIR``
  (the `qnetem certs` command; ``certs``),

and ends the run with ``stop``: SIGTERM to the child it started (the orchestrator stops
politely, its node processes die with it), SIGKILL to the same pid after a grace
period. Nothing else is signalled. ``results`` reads ``RUN/results.json`` afterwards.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]

__all__ = ["RealKmsRun", "RunFailed"]


class RunFailed(RuntimeError):
    """The run did not get where the bench needs it (message: what and where to look)."""


class RealKmsRun:
    """One `qnetem run` child process and its run directory (see the module docstring)."""

    def __init__(self, scenario: Mapping[str, Any], workdir: Path) -> None:
        self.workdir = Path(workdir)
        self.scenario_path = self.workdir / "bench-kms.yaml"
        self.run_dir = self.workdir / "run"
        self.scenario_path.write_text(yaml.safe_dump(dict(scenario), sort_keys=False))
        self._stdout = open(self.workdir / "qnetem-run.out", "wb")  # noqa: SIM115 - closed in stop()
        argv = [sys.executable, "-m", "emulator.cli", "run", str(self.scenario_path), "--out", str(self.run_dir)]
        self.process = subprocess.Popen(
            [*argv, "--quiet"], cwd=ROOT, stdout=self._stdout, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        self.exit_code: int | None = None

    def _check_alive(self, what: str) -> None:
        code = self.process.poll()
        if code is not None:
            lines = (self.workdir / "qnetem-run.out").read_text(errors="replace").splitlines()
            last = [ln for ln in lines if ln.startswith(("qnetem:", "error:"))][-2:] or lines[-1:]
            raise RunFailed(f"qnetem run exited ({code}) while waiting for {what}: {' / '.join(last)}")

    def wait_manifest(self, timeout_s: float) -> dict[str, Any]:
        """RUN/kms.json, once written (the KMEs' URLs and SAE -> node)."""
        path = self.run_dir / "kms.json"
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            self._check_alive("kms.json")
            if path.is_file():
                try:
                    return dict(json.loads(path.read_text()))
                except ValueError:
                    pass  # written by rename, but be tolerant
            time.sleep(0.1)
        raise RunFailed(f"no {path} after {timeout_s:g} s")

    def events(self) -> list[dict[str, Any]]:
        path = self.run_dir / "events.jsonl"
        if not path.is_file():
            return []
        out = []
        for line in path.read_text(errors="replace").splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue  # a line being written
        return out

    def wait_apps(self, names: Sequence[str], timeout_s: float) -> dict[str, dict[str, Any]]:
        """The app_done / app_failed events of `names` (RunFailed after timeout_s)."""
        end = time.monotonic() + timeout_s
        while True:
            self._check_alive("the QKD apps")
            found = {
                e["app"]: e
                for e in self.events()
                if e.get("event") in ("app_done", "app_failed") and e.get("app") in names
            }
            if len(found) == len(names):
                return found
            if time.monotonic() > end:
                raise RunFailed(f"apps {sorted(set(names) - set(found))} not done after {timeout_s:g} s")
            time.sleep(0.2)

    def certs(self, sae: str, out_dir: Path) -> tuple[bytes, bytes, bytes]:
        """`qnetem certs RUN --sae SAE --out DIR`: (certificate PEM, key PEM, CA PEM)."""
        subprocess.run(
            [sys.executable, "-m", "emulator.cli", "certs", str(self.run_dir), "--sae", sae, "--out", str(out_dir)],
            cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        cert, key, ca = ((out_dir / name).read_bytes() for name in (f"{sae}.pem", f"{sae}.key", "ca.pem"))
        return cert, key, ca

    def stop(self, grace_s: float = 30.0) -> int:
        """SIGTERM to the `qnetem run` child, SIGKILL to it after `grace_s`; its exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(grace_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._stdout.close()
        self.exit_code = self.process.returncode
        return self.exit_code

    def results(self) -> dict[str, Any] | None:
        path = self.run_dir / "results.json"
        try:
            return dict(json.loads(path.read_text()))
        except (OSError, ValueError):
            return None

    def __enter__(self) -> RealKmsRun:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

