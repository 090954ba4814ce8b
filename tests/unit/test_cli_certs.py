"""`qnetem certs RUN_DIR --sae ID [--out DIR]`: an SAE credential from the run's CA."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from emulator.certs import RunCa
from emulator.cli import main

KMS = {
    "kmes": {
        "alice": {"etsi014": "https://127.0.0.1:40001", "skip": "https://127.0.0.1:40002"},
        "bob": {"etsi014": "https://127.0.0.1:40003", "skip": "https://127.0.0.1:40004"},
    },
    "saes": {"alice-app": "alice", "bob-app": "bob"},
}


@pytest.fixture
def run_dir(tmp_path: Path) -> tuple[Path, RunCa]:
    run = tmp_path / "run"
    ca = RunCa.create("cli-test")
    ca.save(run / "certs")
    return run, ca


def test_issues_a_credential_and_prints_the_kme(
    run_dir: tuple[Path, RunCa], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run, ca = run_dir
    (run / "kms.json").write_text(json.dumps(KMS))
    out = tmp_path / "creds"
    assert main(["certs", str(run), "--sae", "bob-app", "--out", str(out)]) == 0
    printed = capsys.readouterr()
    assert printed.err == ""
    lines = printed.out.splitlines()
    cert_path, key_path, ca_path = out / "bob-app.pem", out / "bob-app.key", out / "ca.pem"
    for path in (cert_path, key_path, ca_path):
        assert str(path) in printed.out
    assert "kme bob etsi014 https://127.0.0.1:40003" in lines
    assert "kme bob skip https://127.0.0.1:40004" in lines
    assert "40001" not in printed.out  # not alice's KME
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    cert.verify_directly_issued_by(ca.certificate)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "bob-app"
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    assert key.public_key() == cert.public_key()
    assert ca_path.read_bytes() == ca.certificate_pem


def test_default_out_and_no_kms_json(run_dir: tuple[Path, RunCa], capsys: pytest.CaptureFixture[str]) -> None:
    run, _ = run_dir
    assert main(["certs", str(run), "--sae", "any-app"]) == 0  # without kms.json any valid id is fine
    printed = capsys.readouterr().out
    assert (run / "certs" / "saes" / "any-app.pem").is_file()
    assert str(run / "certs" / "saes" / "any-app.key") in printed
    assert not [line for line in printed.splitlines() if line.startswith("kme ")]
    assert len(printed.splitlines()) == 3


def test_no_ca_is_invalid_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["certs", str(tmp_path), "--sae", "alice-app"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no usable run CA" in err
    assert not (tmp_path / "certs").exists()


def test_unknown_sae_is_invalid_input(
    run_dir: tuple[Path, RunCa], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run, _ = run_dir
    (run / "kms.json").write_text(json.dumps(KMS))
    out = tmp_path / "creds"
    assert main(["certs", str(run), "--sae", "carol-app", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'carol-app' is not in the run" in err
    assert not out.exists()  # nothing issued


@pytest.mark.parametrize("bad", ["a/b", "x" * 65])
def test_bad_sae_id_is_invalid_input(run_dir: tuple[Path, RunCa], bad: str, capsys: pytest.CaptureFixture[str]) -> None:
    run, _ = run_dir
    assert main(["certs", str(run), "--sae", bad]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_damaged_kms_json_is_invalid_input(run_dir: tuple[Path, RunCa], capsys: pytest.CaptureFixture[str]) -> None:
    run, _ = run_dir
    (run / "kms.json").write_text("{not json")
    assert main(["certs", str(run), "--sae", "alice-app"]) == 2
    assert "kms.json" in capsys.readouterr().err


def test_missing_sae_argument_is_a_usage_error(run_dir: tuple[Path, RunCa]) -> None:
    run, _ = run_dir
    with pytest.raises(SystemExit) as exc:
        main(["certs", str(run)])
    assert exc.value.code == 2
