"""Mutual-TLS HTTPS shell (nodes/kms/https.py): real TLS on 127.0.0.1:0 under trio.

A throwaway PKI (ECDSA P-256) is made per test module: the run CA, a KME server
certificate, two SAE client certificates, and a foreign CA with a client certificate of
its own. The served app is the ETSI GS QKD 014 app with a fake service that echoes the
caller, so a 200 answer shows which identity the certificate produced.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
import pathlib
import ssl
import tempfile
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from nodes.kms.errors import KmsError
from nodes.kms.etsi014 import KeyContainer, KeyIds, KeyRequest, Status, etsi014_app
from nodes.kms.https import ServerTls, client_ssl_context, serve_https, server_ssl_context, tls_identity

NOW = datetime.datetime.now(datetime.timezone.utc)


@dataclass(frozen=True)
class Issued:
    cert_pem: bytes
    key_pem: bytes


def _name(cn: str | None) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)] if cn else [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "qnetem")])


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def make_ca(cn: str) -> tuple[Issued, ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - datetime.timedelta(minutes=5))
        .not_valid_after(NOW + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Issued(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)), key, cert


def issue(ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, cn: str | None, *, server: bool) -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - datetime.timedelta(minutes=5))
        .not_valid_after(NOW + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()), critical=False  # type: ignore[arg-type]
        )
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
    cert = builder.sign(ca_key, hashes.SHA256())
    return Issued(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


@dataclass(frozen=True)
class Pki:
    ca: Issued
    server: Issued
    alice: Issued
    bob: Issued
    no_cn: Issued
    foreign: Issued


@pytest.fixture(scope="module")
def pki() -> Pki:
    ca, ca_key, ca_cert = make_ca("qnetem run CA")
    _, foreign_key, foreign_cert = make_ca("some other CA")
    return Pki(
        ca=ca,
        server=issue(ca_key, ca_cert, "kme-alice", server=True),
        alice=issue(ca_key, ca_cert, "alice-app", server=False),
        bob=issue(ca_key, ca_cert, "bob-app", server=False),
        no_cn=issue(ca_key, ca_cert, None, server=False),
        foreign=issue(foreign_key, foreign_cert, "alice-app", server=False),
    )


class EchoService:
    """Status echoes the authenticated caller as master_SAE_ID."""

    async def status(self, caller_sae: str, slave_sae: str) -> Status:
        return Status("alice", "bob", caller_sae, slave_sae, 256, 0, 0, 1, 256, 256, 0)

    async def enc_keys(self, caller_sae: str, slave_sae: str, request: KeyRequest) -> KeyContainer:
        raise KmsError(503, "this test service holds no keys")

    async def dec_keys(self, caller_sae: str, master_sae: str, key_ids: KeyIds) -> KeyContainer:
        raise KmsError(503, "this test service holds no keys")


def server_tls(pki: Pki) -> ServerTls:
    return ServerTls(cert_pem=pki.server.cert_pem, key_pem=pki.server.key_pem, ca_pem=pki.ca.cert_pem)


async def start_server(nursery: trio.Nursery, pki: Pki) -> int:
    port = await nursery.start(lambda task_status: serve_https(etsi014_app(EchoService()), tls=server_tls(pki), task_status=task_status))
    assert isinstance(port, int) and port > 0
    return port


async def status_as(port: int, who: Issued, ca_pem: bytes) -> httpx.Response:
    context = client_ssl_context(who.cert_pem, who.key_pem, ca_pem)
    async with httpx.AsyncClient(verify=context, base_url=f"https://127.0.0.1:{port}") as client:
        return await client.get("/api/v1/keys/bob-app/status")


def causes(exc: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


async def handshake_error(port: int, context: ssl.SSLContext) -> ssl.SSLError:
    """Run a raw TLS client; return the SSL error the server's refusal produced."""
    stream = trio.SSLStream(await trio.open_tcp_stream("127.0.0.1", port), context, server_hostname="127.0.0.1")
    try:
        with pytest.raises(trio.BrokenResourceError) as info:
            # With TLS 1.3 the client finishes its half first; the server's alert arrives on read.
            await stream.do_handshake()
            await stream.send_all(b"GET /api/v1/keys/bob-app/status HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            await stream.receive_some()
    finally:
        await trio.aclose_forcefully(stream)
    assert isinstance(info.value.__cause__, ssl.SSLError)
    return info.value.__cause__


async def test_good_client_gets_200_and_its_cn_is_the_identity(pki: Pki) -> None:
    async with trio.open_nursery() as nursery:
        port = await start_server(nursery, pki)
        for who, cn in ((pki.alice, "alice-app"), (pki.bob, "bob-app")):
            response = await status_as(port, who, pki.ca.cert_pem)
            assert response.status_code == 200
            assert response.json()["master_SAE_ID"] == cn
        nursery.cancel_scope.cancel()


async def test_http2_clients_get_the_same_identity(pki: Pki) -> None:
    async with trio.open_nursery() as nursery:
        port = await start_server(nursery, pki)
        context = client_ssl_context(pki.bob.cert_pem, pki.bob.key_pem, pki.ca.cert_pem)
        async with httpx.AsyncClient(verify=context, http2=True, base_url=f"https://127.0.0.1:{port}") as client:
            responses = [await client.get("/api/v1/keys/alice-app/status") for _ in range(2)]
        assert [r.http_version for r in responses] == ["HTTP/2", "HTTP/2"]
        assert [r.json()["master_SAE_ID"] for r in responses] == ["bob-app", "bob-app"]
        nursery.cancel_scope.cancel()


async def test_certificate_without_cn_is_401(pki: Pki) -> None:
    async with trio.open_nursery() as nursery:
        port = await start_server(nursery, pki)
        response = await status_as(port, pki.no_cn, pki.ca.cert_pem)
        assert response.status_code == 401
        assert response.json()["message"] == "Unauthorized"
        nursery.cancel_scope.cancel()


async def test_refused_handshakes_do_not_stop_the_server(pki: Pki, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="nodes.kms.https")
    async with trio.open_nursery() as nursery:
        port = await start_server(nursery, pki)

        no_cert = await handshake_error(port, client_ssl_context(None, None, pki.ca.cert_pem))
        # TLS 1.3 "certificate_required" alert (RFC 8446 §4.4.2.4); TLS 1.2 sends handshake_failure.
        assert no_cert.reason in ("TLSV13_ALERT_CERTIFICATE_REQUIRED", "SSLV3_ALERT_HANDSHAKE_FAILURE")

        foreign = await handshake_error(port, client_ssl_context(pki.foreign.cert_pem, pki.foreign.key_pem, pki.ca.cert_pem))
        assert foreign.reason == "TLSV1_ALERT_UNKNOWN_CA"  # RFC 8446 §6.2 unknown_ca

        with pytest.raises(httpx.TransportError):  # the same refusal through an ordinary client
            await status_as(port, pki.foreign, pki.ca.cert_pem)

        response = await status_as(port, pki.alice, pki.ca.cert_pem)
        assert response.status_code == 200 and response.json()["master_SAE_ID"] == "alice-app"
        nursery.cancel_scope.cancel()
    refusals = [r.getMessage() for r in caplog.records if "TLS handshake" in r.getMessage()]
    assert len(refusals) == 3
    assert "PEER_DID_NOT_RETURN_A_CERTIFICATE" in refusals[0]
    assert "CERTIFICATE_VERIFY_FAILED" in refusals[1]


async def test_client_must_verify_the_server_against_the_ca(pki: Pki) -> None:
    _, _, other_cert = make_ca("impostor CA")
    async with trio.open_nursery() as nursery:
        port = await start_server(nursery, pki)
        with pytest.raises(httpx.ConnectError) as info:
            await status_as(port, pki.alice, other_cert.public_bytes(serialization.Encoding.PEM))
        assert any(isinstance(e, ssl.SSLCertVerificationError) for e in causes(info.value))
        nursery.cancel_scope.cancel()


def test_server_context_policy(pki: Pki) -> None:
    context = server_ssl_context(server_tls(pki))
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    client = client_ssl_context(pki.alice.cert_pem, pki.alice.key_pem, pki.ca.cert_pem.decode())
    assert client.verify_mode == ssl.CERT_REQUIRED and client.check_hostname
    assert client.minimum_version == ssl.TLSVersion.TLSv1_2
    with pytest.raises(ValueError):
        client_ssl_context(pki.alice.cert_pem, None, pki.ca.cert_pem)


def test_without_memfd_the_key_goes_through_a_private_temp_file_that_is_removed(
    pki: Pki, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delattr(os, "memfd_create", raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    modes: list[int] = []
    real_open = os.open

    def recording_open(path: str, flags: int, mode: int = 0o777, **kwargs: Any) -> int:
        if flags & os.O_CREAT and str(path).startswith(str(tmp_path)):
            modes.extend([os.stat(os.path.dirname(path)).st_mode & 0o777, mode])
        return real_open(path, flags, mode, **kwargs)

    monkeypatch.setattr(os, "open", recording_open)
    context = server_ssl_context(server_tls(pki))
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert modes == [0o700, 0o600]
    assert list(tmp_path.iterdir()) == []


def test_server_tls_repr_hides_the_private_key(pki: Pki) -> None:
    tls = server_tls(pki)
    assert b"PRIVATE KEY" in pki.server.key_pem
    assert "PRIVATE KEY" not in repr(tls) and "key_pem" not in repr(tls)


def _scope_with(tls: dict[str, Any] | None) -> dict[str, Any]:
    return {"type": "http", "extensions": {} if tls is None else {"tls": tls}}


def test_tls_identity_reads_the_cn_of_the_verified_client_certificate(pki: Pki) -> None:
    alice = pki.alice.cert_pem.decode()
    assert tls_identity(_scope_with({"client_cert_chain": [alice], "client_cert_error": None})) == "alice-app"
    assert tls_identity(_scope_with({"client_cert_chain": [alice], "client_cert_error": "expired"})) is None
    assert tls_identity(_scope_with({"client_cert_chain": [pki.no_cn.cert_pem.decode()]})) is None
    assert tls_identity(_scope_with({"client_cert_chain": []})) is None
    assert tls_identity(_scope_with({"client_cert_chain": ["not a certificate"]})) is None
    assert tls_identity(_scope_with(None)) is None
    assert tls_identity({"type": "http"}) is None
