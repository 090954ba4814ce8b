"""The SAE-side KME clients (nodes/kms/client.py) against a recording starlette app.

Requests go through `httpx.ASGITransport` (no sockets), under trio (pytest-trio's
trio_mode). The app records method, raw path, query items and JSON body of every request
and answers with whatever the test queued, so each test checks both directions: what
the client put on the wire and how it decodes the answer.
"""

from __future__ import annotations

import base64
import datetime
import functools
import ipaddress
import json
import ssl
from collections import deque
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from nodes.kms.client import EtsiClient, EtsiClientError, SkipClient

KEY = bytes(range(100, 132))  # a "key" whose encodings must never show up in an error
KEY_B64 = base64.b64encode(KEY).decode()
KEY_ID = "5b2bbfc5-3cc6-4c67-8f8b-b8aa1e4e6c69"


class Recorder:
    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.answers: deque[Response] = deque()

    def answer(self, status: int = 200, body: Any = None, *, raw: bytes | None = None) -> None:
        if raw is not None:
            self.answers.append(Response(raw, status_code=status, media_type="text/plain"))
        else:
            self.answers.append(JSONResponse({} if body is None else body, status_code=status))

    async def handle(self, request: Request) -> Response:
        raw_body = await request.body()
        self.requests.append({
            "method": request.method,
            "path": request.scope["raw_path"].decode(),
            "query": list(request.query_params.multi_items()),
            "json": json.loads(raw_body) if raw_body else None,
            "accept": request.headers.get("accept"),
        })  # fmt: skip
        return self.answers.popleft() if self.answers else JSONResponse({})

    def app(self) -> Starlette:
        methods = ["GET", "POST"]
        return Starlette(
            routes=[
                Route("/api/v1/keys/{sae}/status", self.handle, methods=methods),
                Route("/api/v1/keys/{sae}/enc_keys", self.handle, methods=methods),
                Route("/api/v1/keys/{sae}/dec_keys", self.handle, methods=methods),
                Route("/capabilities", self.handle, methods=methods),
                Route("/key", self.handle, methods=methods),
                Route("/key/{key_id}", self.handle, methods=methods),
                Route("/entropy", self.handle, methods=methods),
            ]
        )

    @property
    def last(self) -> dict[str, Any]:
        return self.requests[-1]


@pytest.fixture
def rec() -> Recorder:
    return Recorder()


def etsi(rec: Recorder, **kw: Any) -> EtsiClient:
    return EtsiClient("http://kme-alice", None, transport=httpx.ASGITransport(app=rec.app()), **kw)


def skip(rec: Recorder) -> SkipClient:
    return SkipClient("http://kme-alice/", None, transport=httpx.ASGITransport(app=rec.app()))


# ---------------------------------------------------------------------- ETSI GS QKD 014


async def test_status_gets_the_slaves_status(rec: Recorder) -> None:
    status_body = {"source_KME_ID": "alice", "target_KME_ID": "bob", "master_SAE_ID": "a", "slave_SAE_ID": "b",
                   "key_size": 256, "stored_key_count": 10, "max_key_count": 100, "max_key_per_request": 128,
                   "max_key_size": 1024, "min_key_size": 64, "max_SAE_ID_count": 0}  # fmt: skip
    rec.answer(200, status_body)
    async with etsi(rec) as client:
        assert await client.status("bob-app") == (200, status_body)
    assert rec.last == {"method": "GET", "path": "/api/v1/keys/bob-app/status", "query": [], "json": None,
                        "accept": "application/json"}  # fmt: skip
    assert client.closed


async def test_sae_ids_are_percent_encoded_in_the_path(rec: Recorder) -> None:
    async with etsi(rec) as client:
        await client.status("bob app?x#y%")
        await client.dec_keys("alice app", ["id/1"])
    assert rec.requests[0]["path"] == "/api/v1/keys/bob%20app%3Fx%23y%25/status"
    assert rec.requests[1]["path"] == "/api/v1/keys/alice%20app/dec_keys"
    assert rec.requests[1]["query"] == [("key_ID", "id/1")]
    # A slash cannot leave its segment (servers route on the decoded path, so this one is
    # seen on the raw request; starlette would answer 404).
    raw_paths: list[bytes] = []

    def record(request: httpx.Request) -> httpx.Response:
        raw_paths.append(request.url.raw_path)
        return httpx.Response(404)

    async with EtsiClient("http://kme", None, transport=httpx.MockTransport(record)) as client:
        assert await client.status("../../capabilities") == (404, {})
    async with SkipClient("http://kme", None, transport=httpx.MockTransport(record)) as skip_client:
        await skip_client.key_by_id("../entropy", "bob")
    assert raw_paths == [b"/api/v1/keys/..%2F..%2Fcapabilities/status", b"/key/..%2Fentropy?remoteSystemID=bob"]


async def test_enc_keys_get_carries_number_and_size(rec: Recorder) -> None:
    container = {"keys": [{"key_ID": KEY_ID, "key": KEY_B64}]}
    rec.answer(200, container)
    rec.answer(200, container)
    async with etsi(rec) as client:
        status, body = await client.enc_keys("bob-app", number=3, size_bits=512)
        assert (status, body) == (200, container)
        assert base64.b64decode(body["keys"][0]["key"]) == KEY
        await client.enc_keys("bob-app")
    first, second = rec.requests
    assert first["method"] == "GET" and first["path"] == "/api/v1/keys/bob-app/enc_keys"
    assert first["query"] == [("number", "3"), ("size", "512")] and first["json"] is None
    assert second["query"] == [("number", "1")]  # size left to the KME's default


async def test_enc_keys_post_sends_a_key_request_body(rec: Recorder) -> None:
    async with etsi(rec) as client:
        await client.enc_keys("bob-app", number=2, size_bits=256, post=True)
        await client.enc_keys("bob-app", 1, None, ["carol-app", "dave-app"])  # additional slaves: POST (§5.2)
        await client.enc_keys("bob-app", extension_mandatory=[{"abc_route_type": "direct"}])
    a, b, c = rec.requests
    assert a["method"] == b["method"] == c["method"] == "POST"
    assert a["query"] == [] and a["json"] == {"number": 2, "size": 256}
    assert b["json"] == {"number": 1, "additional_slave_SAE_IDs": ["carol-app", "dave-app"]}
    assert c["json"] == {"number": 1, "extension_mandatory": [{"abc_route_type": "direct"}]}


async def test_dec_keys_get_for_one_id_post_for_several(rec: Recorder) -> None:
    async with etsi(rec) as client:
        await client.dec_keys("alice-app", [KEY_ID])
        await client.dec_keys("alice-app", (KEY_ID,), post=True)
        await client.dec_keys("alice-app", iter(["k1", "k2"]))
    a, b, c = rec.requests
    assert (a["method"], a["path"], a["query"], a["json"]) == (
        "GET", "/api/v1/keys/alice-app/dec_keys", [("key_ID", KEY_ID)], None
    )  # fmt: skip
    assert (b["method"], b["json"]) == ("POST", {"key_IDs": [{"key_ID": KEY_ID}]})
    assert (c["method"], c["json"]) == ("POST", {"key_IDs": [{"key_ID": "k1"}, {"key_ID": "k2"}]})


@pytest.mark.parametrize("status", [400, 401, 503])
async def test_error_statuses_are_returned_not_raised(rec: Recorder, status: int) -> None:
    error = {"message": "Error of server side", "details": [{"reason": "no keys"}]}
    rec.answer(status, error)
    async with etsi(rec) as client:
        assert await client.enc_keys("bob-app") == (status, error)


async def test_an_error_with_a_non_json_body_is_still_an_answer(rec: Recorder) -> None:
    rec.answer(503, raw=b"<html>Service Unavailable</html>")
    rec.answer(401, raw=b"")
    async with etsi(rec) as client:
        status, body = await client.status("bob-app")
        assert status == 503 and "not a JSON object" in body["message"]
        assert await client.status("bob-app") == (401, {})


@pytest.mark.parametrize(
    "raw",
    [b"key=" + KEY_B64.encode(), json.dumps([KEY_B64]).encode(), b"\xff\xfe" + KEY],
    ids=["text", "json-array", "not-utf8"],
)
async def test_an_unreadable_200_raises_without_quoting_the_body(rec: Recorder, raw: bytes) -> None:
    rec.answer(200, raw=raw)
    async with etsi(rec) as client:
        with pytest.raises(EtsiClientError) as info:
            await client.enc_keys("bob-app")
    exc = info.value
    assert exc.operation == "enc_keys" and "HTTP 200" in str(exc)
    text = str(exc) + repr(exc)
    for form in (KEY_B64, KEY.hex(), repr(KEY)[2:-1], KEY.decode("latin-1")):
        assert form not in text
    # no chained exception keeps the body alive (JSONDecodeError.doc would)
    assert exc.__cause__ is None and exc.__context__ is None


async def test_an_oversized_body_raises(rec: Recorder) -> None:
    rec.answer(200, {"keys": [{"key_ID": "x", "key": "A" * 5000}]})  # with Content-Length
    async with etsi(rec, max_body_bytes=1000) as client:
        with pytest.raises(EtsiClientError, match="larger than 1000 bytes"):
            await client.enc_keys("bob-app")
        rec.answer(200, {"keys": []})
        assert await client.enc_keys("bob-app") == (200, {"keys": []})  # the client still works

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(10):
            yield b"A" * 500

    def chunked(request: httpx.Request) -> httpx.Response:  # no Content-Length: counted while read
        return httpx.Response(200, content=chunks())

    async with EtsiClient("http://kme", None, transport=httpx.MockTransport(chunked), max_body_bytes=1000) as client:
        with pytest.raises(EtsiClientError, match="larger than 1000 bytes"):
            await client.status("bob-app")


async def test_transport_failures_and_timeouts_raise_etsi_client_error() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    def stall(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=request)

    client = EtsiClient("https://127.0.0.1:1", None, transport=httpx.MockTransport(refuse), timeout_s=0.5)
    with pytest.raises(EtsiClientError) as info:
        await client.dec_keys("alice-app", [KEY_ID])
    assert info.value.operation == "dec_keys" and "ConnectError" in str(info.value)
    await client.aclose()
    client = EtsiClient("https://127.0.0.1:1", None, transport=httpx.MockTransport(stall), timeout_s=0.5)
    with pytest.raises(EtsiClientError, match=r"status: timed out after 0.5 s \(ReadTimeout\)"):
        await client.status("bob-app")
    await client.aclose()


async def test_argument_misuse_is_refused_before_any_request(rec: Recorder) -> None:
    async with etsi(rec) as client:
        with pytest.raises(TypeError):
            await client.dec_keys("alice-app", KEY_ID)  # a bare string would be split into characters
        with pytest.raises(ValueError):
            await client.dec_keys("alice-app", [])
        with pytest.raises(TypeError):
            await client.enc_keys("bob-app", additional_slaves="carol-app")
        with pytest.raises(ValueError):
            await client.status("")
    assert rec.requests == []
    with pytest.raises(ValueError):
        EtsiClient("http://kme", None, timeout_s=0)


def _pki(tmp_path: Path) -> tuple[ssl.SSLContext, ssl.SSLContext, ssl.SSLContext]:
    """(server context requiring client certs, client context of SAE `alice-app`, client
    context trusting another CA): a throw-away ECDSA P-256 CA issuing both certificates."""
    now = datetime.datetime.now(datetime.timezone.utc)

    def cert(cn: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name, signer: ec.EllipticCurvePrivateKey,
             *, ca: bool = False, san: x509.GeneralName | None = None) -> x509.Certificate:
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(issuer).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )  # fmt: skip
        if san is not None:
            builder = builder.add_extension(x509.SubjectAlternativeName([san]), critical=False)
        return builder.sign(signer, hashes.SHA256())

    def write(name: str, c: x509.Certificate, key: ec.EllipticCurvePrivateKey | None = None) -> Path:
        pem = c.public_bytes(serialization.Encoding.PEM)
        if key is not None:
            pem += key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption())  # fmt: skip
        path = tmp_path / name
        path.write_bytes(pem)
        return path

    keys = {n: ec.generate_private_key(ec.SECP256R1()) for n in ("ca", "other", "server", "client")}
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test run CA")])
    other_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "unrelated CA")])
    ca = write("ca.pem", cert("test run CA", keys["ca"], ca_name, keys["ca"], ca=True))
    other = write("other.pem", cert("unrelated CA", keys["other"], other_name, keys["other"], ca=True))
    localhost = x509.IPAddress(ipaddress.ip_address("127.0.0.1"))
    server = write("server.pem", cert("kme-alice", keys["server"], ca_name, keys["ca"], san=localhost), keys["server"])
    client = write("client.pem", cert("alice-app", keys["client"], ca_name, keys["ca"]), keys["client"])
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=ca)
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    server_ctx.load_cert_chain(server)
    client_ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
    client_ctx.load_cert_chain(client)
    wrong_ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=other)
    wrong_ctx.load_cert_chain(client)
    return server_ctx, client_ctx, wrong_ctx


async def test_mutual_tls_with_the_given_context(tmp_path: Path) -> None:
    """A real HTTPS round trip on 127.0.0.1:0: the server sees the SAE's certificate; a
    context that trusts another CA fails the handshake (EtsiClientError, no answer)."""
    server_ctx, client_ctx, wrong_ctx = _pki(tmp_path)
    seen: list[tuple[str, bytes]] = []

    async def serve(stream: trio.SSLStream[trio.SocketStream]) -> None:
        try:
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    return
                data += chunk
            subject = dict(x[0] for x in stream.getpeercert()["subject"])
            seen.append((subject["commonName"], data.split(b"\r\n", 1)[0]))
            body = json.dumps({"caller": subject["commonName"]}).encode()
            await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                                  + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body)  # fmt: skip
            await stream.aclose()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client with the wrong trust anchor aborts the handshake

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(trio.serve_ssl_over_tcp, serve, 0, server_ctx, host="127.0.0.1")
        )
        port = listeners[0].transport_listener.socket.getsockname()[1]
        async with EtsiClient(f"https://127.0.0.1:{port}", client_ctx, timeout_s=5.0) as client:
            assert await client.status("bob-app") == (200, {"caller": "alice-app"})
        assert seen == [("alice-app", b"GET /api/v1/keys/bob-app/status HTTP/1.1")]
        async with EtsiClient(f"https://127.0.0.1:{port}", wrong_ctx, timeout_s=5.0) as client:
            with pytest.raises(EtsiClientError) as info:
                await client.status("bob-app")
        assert "ConnectError" in str(info.value) and len(seen) == 1
        nursery.cancel_scope.cancel()


# ---------------------------------------------------------------------- Cisco SKIP


async def test_skip_capabilities_and_keys(rec: Recorder) -> None:
    caps = {"entropy": True, "key": True, "algorithm": "qkd", "localSystemID": "alice", "remoteSystemID": ["bob"]}
    rec.answer(200, caps)
    rec.answer(200, {"keyId": "ab" * 16, "key": KEY.hex()})
    rec.answer(200, {"keyId": "ab" * 16, "key": KEY.hex()})
    rec.answer(200, {"randomStr": "00" * 32, "minentropy": 256})
    async with skip(rec) as client:
        assert await client.capabilities() == (200, caps)
        status, body = await client.key("bob", size_bits=256)
        assert status == 200 and bytes.fromhex(body["key"]) == KEY
        await client.key_by_id("ab" * 16, "alice")
        assert await client.entropy(256) == (200, {"randomStr": "00" * 32, "minentropy": 256})
    caps_req, key_req, by_id, ent = rec.requests
    assert (caps_req["method"], caps_req["path"], caps_req["query"]) == ("GET", "/capabilities", [])
    assert (key_req["path"], key_req["query"]) == ("/key", [("remoteSystemID", "bob"), ("size", "256")])
    assert (by_id["path"], by_id["query"]) == ("/key/" + "ab" * 16, [("remoteSystemID", "alice")])
    assert (ent["path"], ent["query"]) == ("/entropy", [("minentropy", "256")])
    assert all(r["method"] == "GET" and r["json"] is None for r in rec.requests)


async def test_skip_optional_parameters_are_left_out_and_errors_returned(rec: Recorder) -> None:
    rec.answer(503, {"message": "no key material"})
    rec.answer(400, {"message": "key not found"})
    async with skip(rec) as client:
        assert await client.key("bob") == (503, {"message": "no key material"})
        assert await client.key_by_id("a b", "alice") == (400, {"message": "key not found"})
        await client.entropy()
    assert rec.requests[0]["query"] == [("remoteSystemID", "bob")]
    assert rec.requests[1]["path"] == "/key/a%20b"
    assert rec.requests[2]["query"] == []
