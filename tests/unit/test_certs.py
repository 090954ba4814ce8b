"""The run CA (emulator/certs.py): profile of the certificates, files, and a real mutual-TLS handshake."""

from __future__ import annotations

import datetime as dt
import ipaddress
import ssl
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from emulator.certs import (
    CA_VALIDITY,
    LEAF_VALIDITY,
    CertError,
    Credential,
    RunCa,
    check_node_name,
    check_sae_id,
    sae_uri,
)

NOW = dt.datetime(2025, 6, 1, 12, 0, tzinfo=dt.timezone.utc)


@pytest.fixture(scope="module")
def ca() -> RunCa:
    return RunCa.create("unit-test", now=NOW)


@pytest.fixture(scope="module")
def other_ca() -> RunCa:
    return RunCa.create("unit-test", now=NOW)  # same name, different key


@pytest.fixture(scope="module")
def kme(ca: RunCa) -> Credential:
    return ca.issue_kme("alice", now=NOW)


@pytest.fixture(scope="module")
def sae(ca: RunCa) -> Credential:
    return ca.issue_sae("alice-app", now=NOW)


# The TLS handshakes check validity against the real clock: they use certificates issued now.
@pytest.fixture(scope="module")
def live_ca() -> RunCa:
    return RunCa.create("live")


@pytest.fixture(scope="module")
def live_kme(live_ca: RunCa) -> Credential:
    return live_ca.issue_kme("alice")


@pytest.fixture(scope="module")
def live_sae(live_ca: RunCa) -> Credential:
    return live_ca.issue_sae("alice-app")


def cert_of(cred: Credential) -> x509.Certificate:
    return x509.load_pem_x509_certificate(cred.cert_pem)


def cn_of(cert: x509.Certificate) -> str:
    return str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


# ---------------------------------------------------------------------------
# Profile
# ---------------------------------------------------------------------------


def test_ca_certificate_profile(ca: RunCa) -> None:
    cert = ca.certificate
    assert cert.subject == cert.issuer
    cert.verify_directly_issued_by(cert)  # self-signed
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.key_cert_sign and ku.crl_sign
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert isinstance(cert.public_key().curve, ec.SECP256R1)
    assert cert.not_valid_before_utc == NOW - dt.timedelta(minutes=5)
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == CA_VALIDITY
    assert ca.common_name == "qnetem run CA unit-test"


def test_kme_certificate_profile(ca: RunCa, kme: Credential) -> None:
    cert = cert_of(kme)
    cert.verify_directly_issued_by(ca.certificate)
    assert cn_of(cert) == "kme-alice" == kme.common_name
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "alice", "node-alice"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.IPv4Address("127.0.0.1")]
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and not bc.value.ca
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature and not ku.value.key_cert_sign
    assert cert.not_valid_before_utc == NOW - dt.timedelta(minutes=5)
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == LEAF_VALIDITY
    assert kme.ca_pem == ca.certificate_pem
    # The key in the credential is the certificate's key.
    key = serialization.load_pem_private_key(kme.key_pem, password=None)
    assert key.public_key() == cert.public_key()


def test_sae_certificate_profile(ca: RunCa, sae: Credential) -> None:
    cert = cert_of(sae)
    cert.verify_directly_issued_by(ca.certificate)
    assert cn_of(cert) == "alice-app"
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["urn:qnetem:sae:alice-app"]
    assert san.get_values_for_type(x509.DNSName) == []
    assert sae_uri("app 1:x?") == "urn:qnetem:sae:app%201:x%3F"


def test_serials_differ(ca: RunCa) -> None:
    serials = {cert_of(ca.issue_sae(f"s{i}", now=NOW)).serial_number for i in range(4)}
    assert len(serials) == 4


def test_leaf_never_outlives_the_ca(ca: RunCa) -> None:
    late = NOW + CA_VALIDITY - dt.timedelta(hours=1)
    cert = cert_of(ca.issue_sae("late", now=late))
    assert cert.not_valid_after_utc == ca.certificate.not_valid_after_utc
    with pytest.raises(CertError, match="expired"):
        ca.issue_sae("too-late", now=NOW + CA_VALIDITY)


def test_certificate_of_another_ca_does_not_verify(ca: RunCa, other_ca: RunCa, kme: Credential) -> None:
    foreign = cert_of(other_ca.issue_kme("alice", now=NOW))
    assert foreign.issuer == ca.certificate.subject  # same name: only the signature tells them apart
    with pytest.raises(InvalidSignature):
        foreign.verify_directly_issued_by(ca.certificate)
    with pytest.raises(CertError, match="not issued by"):
        ca.verify(foreign)
    ca.verify(kme.cert_pem)  # and the genuine one does


def test_naive_now_is_refused() -> None:
    with pytest.raises(CertError, match="aware"):
        RunCa.create("x", now=dt.datetime(2025, 1, 1))


# ---------------------------------------------------------------------------
# Names
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("good", ["a", "alice-app", "App_1.x", "x" * 64, "with space", "a:b@c"])
def test_valid_sae_ids(good: str) -> None:
    assert check_sae_id(good) == good


@pytest.mark.parametrize(
    "bad", ["", "x" * 65, "a/b", "tab\there", "é", "nul\x00", " lead", "trail ", "kme-alice", "KME-bob", 7]
)
def test_invalid_sae_ids(ca: RunCa, bad: object) -> None:
    with pytest.raises(CertError):
        check_sae_id(bad)
    with pytest.raises(CertError):
        ca.issue_sae(bad, now=NOW)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", ["", "Alice", "a_b", "a/b", "-a", "a" * 61, "a b", None])
def test_invalid_node_names(ca: RunCa, bad: object) -> None:
    with pytest.raises(CertError):
        check_node_name(bad)
    with pytest.raises(CertError):
        ca.issue_kme(bad, now=NOW)  # type: ignore[arg-type]


def test_longest_node_name_fits_the_common_name(ca: RunCa) -> None:
    node = "n" * 60
    assert cn_of(cert_of(ca.issue_kme(node, now=NOW))) == "kme-" + node


# ---------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_save_load_round_trip(ca: RunCa, tmp_path: Path) -> None:
    directory = ca.save(tmp_path / "run" / "certs")
    assert mode(directory) == 0o700
    assert mode(directory / "ca.key") == 0o600
    assert mode(directory / "ca.pem") == 0o644
    assert sorted(p.name for p in directory.iterdir()) == ["ca.key", "ca.pem"]  # no temporary left over
    loaded = RunCa.load(directory)
    assert loaded.certificate == ca.certificate
    # The loaded CA signs with the same key: its leaves verify against the original certificate.
    cert_of(loaded.issue_sae("after-load", now=NOW)).verify_directly_issued_by(ca.certificate)


def test_save_tightens_an_existing_directory(ca: RunCa, tmp_path: Path) -> None:
    directory = tmp_path / "certs"
    directory.mkdir(mode=0o755)
    ca.save(directory)
    assert mode(directory) == 0o700


def test_load_errors(ca: RunCa, other_ca: RunCa, tmp_path: Path) -> None:
    with pytest.raises(CertError, match="no run CA"):
        RunCa.load(tmp_path / "nothing")
    ca.save(tmp_path)
    (tmp_path / "ca.key").write_bytes(b"garbage")
    with pytest.raises(CertError, match="not an unencrypted PEM private key"):
        RunCa.load(tmp_path)
    ca.save(tmp_path)
    other_ca.save(tmp_path / "other")
    (tmp_path / "ca.key").write_bytes((tmp_path / "other" / "ca.key").read_bytes())
    with pytest.raises(CertError, match="does not match"):
        RunCa.load(tmp_path)


def test_credential_write(sae: Credential, tmp_path: Path) -> None:
    files = sae.write(tmp_path / "out", "alice-app")
    assert files.cert == tmp_path / "out" / "alice-app.pem"
    assert files.key.read_bytes() == sae.key_pem and mode(files.key) == 0o600
    assert files.cert.read_bytes() == sae.cert_pem and mode(files.cert) == 0o644
    assert files.ca.read_bytes() == sae.ca_pem
    # An existing, wider-mode key file is replaced by a 0600 one.
    files.key.chmod(0o644)
    sae.write(tmp_path / "out", "alice-app")
    assert mode(files.key) == 0o600
    for bad_stem in ("../escape", "ca", ".hidden", ""):
        with pytest.raises(CertError):
            sae.write(tmp_path, bad_stem)
    assert sae.write(tmp_path, "kme-alice").cert.name == "kme-alice.pem"  # a KME's stem is fine


def test_no_key_bytes_in_reprs(ca: RunCa, sae: Credential) -> None:
    key_body = sae.key_pem.decode().splitlines()[1]
    assert key_body not in repr(sae) and "key_pem" not in repr(sae)
    assert "cert_pem" in repr(sae)
    ca_key = ca._key.private_bytes(  # noqa: SLF001 - the test needs the secret to look for it
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    assert ca_key.decode().splitlines()[1] not in repr(ca)


# ---------------------------------------------------------------------------
# A mutual-TLS handshake with the stdlib ssl module, over memory BIOs
# ---------------------------------------------------------------------------


def server_context(cred: Credential, tmp_path: Path) -> ssl.SSLContext:
    files = cred.write(tmp_path / "server", "kme")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(files.cert, files.key)
    ctx.load_verify_locations(cadata=cred.ca_pem.decode())
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_context(cred: Credential, ca_pem: bytes, tmp_path: Path) -> ssl.SSLContext:
    files = cred.write(tmp_path / "client", "sae")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # check_hostname and CERT_REQUIRED by default
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(files.cert, files.key)
    ctx.load_verify_locations(cadata=ca_pem.decode())
    return ctx


def handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, hostname: str) -> ssl.SSLObject:
    """Drive both ends over memory BIOs until both finish; returns the server end."""
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname=hostname)
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    done = {"client": False, "server": False}
    for _ in range(20):  # a TLS 1.3 handshake takes 2-3 flights; 20 rounds is ample
        for name, end in (("client", client), ("server", server)):
            if not done[name]:
                try:
                    end.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            # TLS 1.3: the server learns of a rejected client certificate after its own
            # handshake ended; a read surfaces the alert or the verdict.
            return server
    raise AssertionError("handshake did not finish")


@pytest.mark.parametrize("hostname", ["localhost", "alice", "node-alice", "127.0.0.1"])
def test_mutual_tls_handshake(live_kme: Credential, live_sae: Credential, tmp_path: Path, hostname: str) -> None:
    server_ctx = server_context(live_kme, tmp_path)
    server = handshake(server_ctx, client_context(live_sae, live_kme.ca_pem, tmp_path), hostname)
    peer = server.getpeercert()
    assert peer is not None
    subject = dict(item for rdn in peer["subject"] for item in rdn)
    assert subject["commonName"] == "alice-app"
    assert server.version() in ("TLSv1.2", "TLSv1.3")


def test_handshake_rejects_a_client_of_another_ca(live_kme: Credential, tmp_path: Path) -> None:
    intruder = RunCa.create("live").issue_sae("alice-app")  # same CA name, another key
    with pytest.raises(ssl.SSLError, match="certificate verify failed"):
        handshake(server_context(live_kme, tmp_path), client_context(intruder, live_kme.ca_pem, tmp_path), "localhost")


def test_handshake_rejects_a_wrong_host_name(live_kme: Credential, live_sae: Credential, tmp_path: Path) -> None:
    with pytest.raises(ssl.SSLCertVerificationError, match="[Hh]ostname mismatch"):
        handshake(server_context(live_kme, tmp_path), client_context(live_sae, live_kme.ca_pem, tmp_path), "bob")


def test_sae_certificate_cannot_serve(live_ca: RunCa, live_sae: Credential, tmp_path: Path) -> None:
    """An SAE certificate lacks serverAuth: a client refuses it as a server certificate."""
    other_sae = live_ca.issue_sae("bob-app")
    with pytest.raises(ssl.SSLCertVerificationError, match="certificate purpose"):
        client_ctx = client_context(other_sae, live_ca.certificate_pem, tmp_path)
        client_ctx.check_hostname = False  # the certificate has no DNS name: test the purpose alone
        handshake(server_context(live_sae, tmp_path), client_ctx, "localhost")
