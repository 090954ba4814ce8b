"""ETSI GS QKD 014 V1.1.1 API (nodes/kms/etsi014.py) against an in-memory fake KeyService.

The app runs in-process through httpx's ASGI transport. The caller's SAE id, which in
production comes from the TLS client certificate, comes here from an injected identity
function reading a test-only header — the app never looks at headers itself.
"""

from __future__ import annotations

import base64
import json
import random
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nodes.kms.etsi014 import (
    MAX_BODY_BYTES,
    MSG_BAD_REQUEST,
    MSG_EXTENSION_MANDATORY_UNSUPPORTED,
    MSG_KEYS_NOT_FOUND,
    MSG_SERVER_ERROR,
    MSG_SIZE_NOT_MULTIPLE_OF_8,
    MSG_UNAUTHORIZED,
    Error,
    FormatError,
    Key,
    KeyContainer,
    KeyIdEntry,
    KeyIds,
    KeyRequest,
    KmsError,
    Status,
    check_mandatory_extensions,
    etsi014_app,
)

SAE_HEADER = "x-test-sae"  # test-only stand-in for the certificate CN
KME_OF = {"alice-app": "alice", "bob-app": "bob", "carol-app": "carol", "dave-app": "dave"}
MAX_PER_REQUEST = 8


def header_identity(scope: dict[str, Any]) -> str | None:
    for name, value in scope["headers"]:
        if name == SAE_HEADER.encode():
            return value.decode() or None
    return None


@dataclass
class Issued:
    master: str
    slaves: tuple[str, ...]
    key: bytes


class FakeKeyService:
    """An in-memory KME: a stock of keys, issued to a master and its slaves, one dict."""

    def __init__(self, stock: int = 50, seed: int = 7) -> None:
        self.stock = stock
        self.issued: dict[str, Issued] = {}
        self.calls: list[tuple[str, ...]] = []
        self.requests: list[KeyRequest] = []
        self._rng = random.Random(seed)
        self.crash = False

    def _check_sae(self, sae: str) -> None:
        if sae not in KME_OF:
            raise KmsError(400, MSG_BAD_REQUEST, ({"slave_SAE_ID": sae, "error": "unknown SAE"},))

    async def status(self, caller_sae: str, slave_sae: str) -> Status:
        self.calls.append(("status", caller_sae, slave_sae))
        if self.crash:
            raise RuntimeError("store is on fire")
        self._check_sae(slave_sae)
        return Status(
            source_KME_ID=KME_OF[caller_sae],
            target_KME_ID=KME_OF[slave_sae],
            master_SAE_ID=caller_sae,
            slave_SAE_ID=slave_sae,
            key_size=256,
            stored_key_count=self.stock,
            max_key_count=1000,
            max_key_per_request=MAX_PER_REQUEST,
            max_key_size=1024,
            min_key_size=64,
            max_SAE_ID_count=2,
        )

    async def enc_keys(self, caller_sae: str, slave_sae: str, request: KeyRequest) -> KeyContainer:
        self.calls.append(("enc_keys", caller_sae, slave_sae))
        self.requests.append(request)
        check_mandatory_extensions(request)
        slaves = (slave_sae, *request.additional_slave_SAE_IDs)
        for sae in slaves:
            self._check_sae(sae)
        if request.number > MAX_PER_REQUEST:
            raise KmsError(400, MSG_BAD_REQUEST, ({"number": request.number, "max_key_per_request": MAX_PER_REQUEST},))
        if request.number > self.stock:
            raise KmsError(503, MSG_SERVER_ERROR, ({"error": "not enough keys"},))
        self.stock -= request.number
        keys = []
        for _ in range(request.number):
            key_id = str(uuid.UUID(int=self._rng.getrandbits(128), version=4))
            key = self._rng.randbytes((request.size or 256) // 8)
            self.issued[key_id] = Issued(caller_sae, slaves, key)
            keys.append(Key(key_id, key))
        return KeyContainer(tuple(keys))

    async def dec_keys(self, caller_sae: str, master_sae: str, key_ids: KeyIds) -> KeyContainer:
        self.calls.append(("dec_keys", caller_sae, master_sae))
        keys = []
        for entry in key_ids.key_IDs:
            issued = self.issued.get(entry.key_ID)
            if issued is None:
                raise KmsError(400, MSG_KEYS_NOT_FOUND, ({"key_ID_not_found": entry.key_ID},))
            if issued.master != master_sae or caller_sae not in issued.slaves:
                raise KmsError(401, MSG_UNAUTHORIZED)  # the key was not issued to this caller
            keys.append(Key(entry.key_ID, issued.key))
        return KeyContainer(tuple(keys))


@asynccontextmanager
async def client_for(service: FakeKeyService, sae: str | None = "alice-app") -> AsyncIterator[httpx.AsyncClient]:
    app = etsi014_app(service, identity=header_identity)
    headers = {SAE_HEADER: sae} if sae else {}
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="https://kme-alice", headers=headers
    ) as client:
        yield client


def error_of(response: httpx.Response) -> Error:
    assert response.headers["content-type"] == "application/json"
    return Error.from_json(response.json())


# --- §5.2 Get status ----------------------------------------------------------------------
async def test_status_names_the_authenticated_caller_as_master() -> None:
    service = FakeKeyService()
    async with client_for(service, "alice-app") as client:
        response = await client.get("/api/v1/keys/bob-app/status")
    assert response.status_code == 200
    status = Status.from_json(response.json())
    assert (status.master_SAE_ID, status.slave_SAE_ID) == ("alice-app", "bob-app")
    assert (status.source_KME_ID, status.target_KME_ID) == ("alice", "bob")
    assert response.json() == status.to_json()
    assert service.calls == [("status", "alice-app", "bob-app")]


# --- §5.3 Get key -------------------------------------------------------------------------
async def test_get_key_get_form_passes_number_and_size() -> None:
    service = FakeKeyService()
    async with client_for(service) as client:
        response = await client.get("/api/v1/keys/bob-app/enc_keys", params={"number": "2", "size": "512"})
    assert response.status_code == 200
    assert response.headers["cache-control"] == "no-store"
    container = KeyContainer.from_json(response.json())
    assert [len(k.key) for k in container.keys] == [64, 64]
    assert [k.key for k in container.keys] == [service.issued[k.key_ID].key for k in container.keys]
    assert service.requests == [KeyRequest(number=2, size=512)]


async def test_get_key_get_form_defaults_and_ignores_unknown_parameters() -> None:
    service = FakeKeyService()
    async with client_for(service) as client:
        response = await client.get("/api/v1/keys/bob-app/enc_keys", params={"colour": "blue"})
        assert response.status_code == 200
        empty = await client.get("/api/v1/keys/bob-app/enc_keys", params={"number": None, "size": None})
        assert (str(empty.request.url.query, "ascii"), empty.status_code) == ("number=&size=", 200)
    assert service.requests == [KeyRequest(number=1, size=None)] * 2
    assert len(base64.b64decode(response.json()["keys"][0]["key"])) == 32  # the service's default 256 bits


async def test_get_key_post_form_passes_every_member() -> None:
    service = FakeKeyService()
    body = {
        "number": 3,
        "size": 128,
        "additional_slave_SAE_IDs": ["carol-app"],
        "extension_optional": [{"route_type": "direct"}],
        "unknown_member": {"ignored": True},
    }
    async with client_for(service) as client:
        response = await client.post("/api/v1/keys/bob-app/enc_keys", json=body)
    assert response.status_code == 200
    assert len(response.json()["keys"]) == 3
    assert service.requests == [
        KeyRequest(
            number=3,
            size=128,
            additional_slave_SAE_IDs=("carol-app",),
            extension_optional=({"route_type": "direct"},),
        )
    ]


async def test_get_key_post_form_with_empty_object_uses_defaults() -> None:
    service = FakeKeyService()
    async with client_for(service) as client:
        response = await client.post("/api/v1/keys/bob-app/enc_keys", content=b"{}")
    assert response.status_code == 200
    assert service.requests == [KeyRequest()]


async def test_head_is_refused_and_consumes_no_key() -> None:
    service = FakeKeyService()
    async with client_for(service) as client:
        response = await client.head("/api/v1/keys/bob-app/enc_keys")
    assert response.status_code == 400
    assert service.calls == [] and service.stock == 50


# --- §5.4 Get key with key IDs -------------------------------------------------------------
async def test_get_key_with_ids_get_form_returns_the_same_key() -> None:
    service = FakeKeyService()
    async with client_for(service, "alice-app") as alice:
        issued = KeyContainer.from_json((await alice.get("/api/v1/keys/bob-app/enc_keys")).json()).keys[0]
    async with client_for(service, "bob-app") as bob:
        response = await bob.get("/api/v1/keys/alice-app/dec_keys", params={"key_ID": issued.key_ID})
    assert response.status_code == 200
    assert KeyContainer.from_json(response.json()).keys == (issued,)
    assert response.headers["cache-control"] == "no-store"


async def test_get_key_with_ids_post_form_returns_every_key_in_order() -> None:
    service = FakeKeyService()
    async with client_for(service, "alice-app") as alice:
        issued = KeyContainer.from_json(
            (await alice.post("/api/v1/keys/bob-app/enc_keys", json={"number": 3})).json()
        ).keys
    wanted = [issued[2], issued[0]]
    body = KeyIds(tuple(KeyIdEntry(k.key_ID) for k in wanted)).to_json()
    body["key_IDs_extension"] = {"x": 1}
    async with client_for(service, "bob-app") as bob:
        response = await bob.post("/api/v1/keys/alice-app/dec_keys", json=body)
    assert response.status_code == 200
    assert list(KeyContainer.from_json(response.json()).keys) == wanted


async def test_multicast_keys_reach_every_named_slave_and_only_them() -> None:
    service = FakeKeyService()
    async with client_for(service, "alice-app") as alice:
        response = await alice.post(
            "/api/v1/keys/bob-app/enc_keys", json={"number": 1, "additional_slave_SAE_IDs": ["carol-app"]}
        )
    key = KeyContainer.from_json(response.json()).keys[0]
    for sae, expected in [("bob-app", 200), ("carol-app", 200), ("dave-app", 401)]:
        async with client_for(service, sae) as client:
            answer = await client.get("/api/v1/keys/alice-app/dec_keys", params={"key_ID": key.key_ID})
        assert answer.status_code == expected, sae
        if expected == 200:
            assert KeyContainer.from_json(answer.json()).keys == (key,)


# --- 401 --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/api/v1/keys/bob-app/status"),
        ("GET", "/api/v1/keys/bob-app/enc_keys"),
        ("POST", "/api/v1/keys/bob-app/enc_keys"),
        ("GET", "/api/v1/keys/alice-app/dec_keys?key_ID=x"),
        ("POST", "/api/v1/keys/alice-app/dec_keys"),
        ("GET", "/not/an/endpoint"),
    ],
)
async def test_no_identity_is_401_with_error_body_before_anything_else(method: str, path: str) -> None:
    service = FakeKeyService()
    async with client_for(service, sae=None) as client:
        response = await client.request(method, path, json={"number": 1})
    assert response.status_code == 401
    assert error_of(response).message == MSG_UNAUTHORIZED
    assert service.calls == []


async def test_identity_never_comes_from_the_request() -> None:
    """With the default identity (TLS certificate), a plain HTTP request has no identity."""
    service = FakeKeyService()
    app = etsi014_app(service)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="https://kme") as client:
        response = await client.get(
            "/api/v1/keys/bob-app/status", headers={"master_SAE_ID": "alice-app", SAE_HEADER: "alice-app"}
        )
    assert response.status_code == 401
    assert service.calls == []


async def test_key_not_issued_to_the_caller_is_401_decided_by_the_service() -> None:
    service = FakeKeyService()
    async with client_for(service, "alice-app") as alice:
        key = KeyContainer.from_json((await alice.get("/api/v1/keys/bob-app/enc_keys")).json()).keys[0]
    async with client_for(service, "carol-app") as carol:
        response = await carol.get("/api/v1/keys/alice-app/dec_keys", params={"key_ID": key.key_ID})
    assert response.status_code == 401
    assert error_of(response).message == MSG_UNAUTHORIZED
    assert key.key.hex() not in response.text and base64.b64encode(key.key).decode() not in response.text


# --- 503 --------------------------------------------------------------------------------------
async def test_no_keys_is_503_decided_by_the_service() -> None:
    service = FakeKeyService(stock=1)
    async with client_for(service) as client:
        response = await client.get("/api/v1/keys/bob-app/enc_keys", params={"number": "2"})
    assert response.status_code == 503
    assert error_of(response).message == MSG_SERVER_ERROR
    assert service.stock == 1


async def test_service_crash_is_503_and_the_app_stays_up(caplog: pytest.LogCaptureFixture) -> None:
    service = FakeKeyService()
    async with client_for(service) as client:
        service.crash = True
        response = await client.get("/api/v1/keys/bob-app/status")
        assert response.status_code == 503
        assert error_of(response) == Error(MSG_SERVER_ERROR)
        service.crash = False
        assert (await client.get("/api/v1/keys/bob-app/status")).status_code == 200
    assert "KeyService.status failed" in caplog.text


# --- 400 --------------------------------------------------------------------------------------
ENC = "/api/v1/keys/bob-app/enc_keys"
DEC = "/api/v1/keys/alice-app/dec_keys"


@pytest.mark.parametrize(
    ("method", "url", "body", "message"),
    [
        ("GET", ENC + "?size=255", None, MSG_SIZE_NOT_MULTIPLE_OF_8),
        ("POST", ENC, b'{"size": 255}', MSG_SIZE_NOT_MULTIPLE_OF_8),
        ("GET", ENC + "?size=0", None, MSG_BAD_REQUEST),
        ("GET", ENC + "?size=-8", None, MSG_BAD_REQUEST),
        ("GET", ENC + "?number=0", None, MSG_BAD_REQUEST),
        ("GET", ENC + "?number=-1", None, MSG_BAD_REQUEST),
        ("GET", ENC + "?number=1.5", None, MSG_BAD_REQUEST),
        ("GET", ENC + "?number=two", None, MSG_BAD_REQUEST),
        ("GET", ENC + "?number=%C2%B2", None, MSG_BAD_REQUEST),  # a Unicode digit is not a decimal
        ("GET", ENC + "?number=1&number=2", None, MSG_BAD_REQUEST),
        ("GET", ENC + "?number=" + "9" * 40, None, MSG_BAD_REQUEST),
        ("POST", ENC, b"", MSG_BAD_REQUEST),
        ("POST", ENC, b"{", MSG_BAD_REQUEST),
        ("POST", ENC, b"[]", MSG_BAD_REQUEST),
        ("POST", ENC, b'"number"', MSG_BAD_REQUEST),
        ("POST", ENC, b'{"number": "2"}', MSG_BAD_REQUEST),
        ("POST", ENC, b'{"number": true}', MSG_BAD_REQUEST),
        ("POST", ENC, b'{"number": 1.0}', MSG_BAD_REQUEST),
        ("POST", ENC, b'{"number": 0}', MSG_BAD_REQUEST),
        ("POST", ENC, b'{"number": NaN}', MSG_BAD_REQUEST),
        ("POST", ENC, b'{"size": 0}', MSG_BAD_REQUEST),
        ("POST", ENC, b'{"additional_slave_SAE_IDs": "carol-app"}', MSG_BAD_REQUEST),
        ("POST", ENC, b'{"additional_slave_SAE_IDs": [7]}', MSG_BAD_REQUEST),
        ("POST", ENC, b'{"extension_mandatory": {"a": 1}}', MSG_BAD_REQUEST),
        ("POST", ENC, b'{"extension_optional": ["a"]}', MSG_BAD_REQUEST),
        ("POST", ENC, b'{"number": 1}\xff', MSG_BAD_REQUEST),
        ("POST", ENC, b"[" * 50_000, MSG_BAD_REQUEST),  # deeper than the parser's recursion limit
        ("POST", ENC, b'{"extension_mandatory": [{"abc_route_type": "x"}]}', MSG_EXTENSION_MANDATORY_UNSUPPORTED),
        ("GET", "/api/v1/keys/nobody/enc_keys", None, MSG_BAD_REQUEST),  # the service's verdict
        ("GET", DEC, None, MSG_BAD_REQUEST),
        ("GET", DEC + "?key_ID=a&key_ID=b", None, MSG_BAD_REQUEST),
        ("GET", DEC + "?key_ID=00000000-0000-4000-8000-000000000000", None, MSG_KEYS_NOT_FOUND),
        ("POST", DEC, b"{}", MSG_BAD_REQUEST),
        ("POST", DEC, b'{"key_IDs": []}', MSG_BAD_REQUEST),
        ("POST", DEC, b'{"key_IDs": [{}]}', MSG_BAD_REQUEST),
        ("POST", DEC, b'{"key_IDs": [{"key_ID": 5}]}', MSG_BAD_REQUEST),
        ("POST", DEC, b'{"key_IDs": {"key_ID": "a"}}', MSG_BAD_REQUEST),
        ("POST", "/api/v1/keys/bob-app/status", b"{}", MSG_BAD_REQUEST),
        ("PUT", ENC, b"{}", MSG_BAD_REQUEST),
        ("DELETE", DEC, None, MSG_BAD_REQUEST),
        ("GET", "/api/v1/keys/bob-app/status/", None, MSG_BAD_REQUEST),
        ("GET", "/api/v1/keys/bob-app", None, MSG_BAD_REQUEST),
        ("GET", "/", None, MSG_BAD_REQUEST),
        ("GET", "/api/v2/keys/bob-app/status", None, MSG_BAD_REQUEST),
    ],
)
async def test_bad_requests_are_400_with_an_error_body(method: str, url: str, body: bytes | None, message: str) -> None:
    service = FakeKeyService()
    async with client_for(service) as client:
        response = await client.request(method, url, content=body)
    assert response.status_code == 400
    error = error_of(response)
    assert error.message == message
    assert error.details is None or all(isinstance(d, dict) for d in error.details)
    assert service.stock == 50  # no key was handed out


async def test_an_oversized_body_is_400_without_reading_it_all() -> None:
    """Driven by hand over ASGI to count how much of the body the app pulls in."""
    app = etsi014_app(FakeKeyService(), identity=lambda scope: "alice-app")
    chunk = b"x" * 4096
    chunks_total = 4 * MAX_BODY_BYTES // len(chunk)
    pulled = 0
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        nonlocal pulled
        pulled += 1
        return {"type": "http.request", "body": chunk, "more_body": pulled < chunks_total}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "https",
        "path": ENC, "raw_path": ENC.encode(), "query_string": b"", "root_path": "", "headers": [],
        "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 443), "extensions": {},
    }
    await app(scope, receive, send)
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 400
    assert Error.from_json(json.loads(sent[1]["body"])).message == MSG_BAD_REQUEST
    assert pulled == MAX_BODY_BYTES // len(chunk) + 1  # stopped at the first chunk past the limit


# --- data formats ------------------------------------------------------------------------------
def test_data_formats_round_trip_through_json() -> None:
    status = Status("a", "b", "a-app", "b-app", 256, 1, 2, 3, 4, 5, 6, status_extension={"x": [1]})
    request = KeyRequest(2, 64, ("c",), ({"m": 1},), ({"o": 2},))
    container = KeyContainer(
        (Key("k1", b"\x00\xff", key_ID_extension={"e": 1}, key_extension={"f": 2}), Key("k2", b"")),
        key_container_extension={"g": 3},
    )
    key_ids = KeyIds((KeyIdEntry("k1", {"e": 1}), KeyIdEntry("k2")), key_IDs_extension={"h": 4})
    error = Error("m", ({"d": 1},))
    for value in (status, request, container, key_ids, error, KeyRequest(), Error("only")):
        as_json = json.loads(json.dumps(value.to_json()))
        assert type(value).from_json(as_json) == value
    assert container.to_json()["keys"][0] == {
        "key_ID": "k1",
        "key_ID_extension": {"e": 1},
        "key": "AP8=",
        "key_extension": {"f": 2},
    }
    assert Error("only").to_json() == {"message": "only"}


def test_key_bytes_stay_out_of_reprs_and_errors() -> None:
    secret = bytes(range(32))
    key = Key("k1", secret)
    text = repr(key) + repr(KeyContainer((key,))) + str(KmsError(401, MSG_UNAUTHORIZED))
    assert secret.hex() not in text and repr(secret) not in text and "key=" not in repr(key)


@pytest.mark.parametrize(
    ("cls", "value"),
    [
        (Status, {"source_KME_ID": "a"}),
        (Status, []),
        (KeyContainer, {"keys": [{"key_ID": "a", "key": "not base64!"}]}),
        (KeyContainer, {"keys": [{"key_ID": "a"}]}),
        (KeyContainer, {}),
        (KeyIds, {"key_IDs": []}),
        (Error, {"details": []}),
        (Error, {"message": "m", "details": "d"}),
    ],
)
def test_from_json_rejects_wrong_shapes(cls: Any, value: Any) -> None:
    with pytest.raises(FormatError):
        cls.from_json(value)


def test_kms_error_allows_only_the_api_status_codes() -> None:
    for status in (400, 401, 503):
        error = KmsError(status, "m", [{"d": 1}])
        assert (error.status, error.message, error.details) == (status, "m", ({"d": 1},))
    for status in (200, 404, 405, 500):
        with pytest.raises(ValueError, match="400, 401 and 503"):
            KmsError(status, "m")


# --- fuzz ---------------------------------------------------------------------------------------
def _not_json(data: bytes) -> bool:
    try:
        json.loads(data)
    except (ValueError, RecursionError):
        return True
    return False


json_leaf = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=8))
json_value = st.recursive(
    json_leaf,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)),
    max_leaves=8,
)
bad_number = st.one_of(
    st.integers(max_value=0), st.floats(allow_nan=False), st.text(max_size=5), st.booleans(), st.lists(json_leaf, max_size=2)
)
malformed_enc_body = st.one_of(
    st.binary(max_size=64).filter(_not_json),
    json_value.filter(lambda v: not isinstance(v, dict)).map(lambda v: json.dumps(v).encode()),
    st.builds(
        lambda extra, number: json.dumps({**extra, "number": number}).encode(),
        st.dictionaries(st.text(max_size=8), json_value, max_size=3),
        bad_number,
    ),
)
malformed_dec_body = st.one_of(
    st.binary(max_size=64).filter(_not_json),
    json_value.filter(lambda v: not (isinstance(v, dict) and "key_IDs" in v)).map(lambda v: json.dumps(v).encode()),
    st.lists(st.one_of(json_leaf, st.dictionaries(st.just("key_ID"), st.integers(), min_size=1)), max_size=3).map(
        lambda ids: json.dumps({"key_IDs": ids}).encode()
    ),
)
malformed_query_number = st.text(min_size=1, max_size=12).filter(  # "" counts as absent
    lambda s: not (s.isascii() and s.isdigit() and int(s) > 0)
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(enc_body=malformed_enc_body, dec_body=malformed_dec_body, number=malformed_query_number)
async def test_fuzzed_malformed_requests_get_400_and_the_app_stays_up(
    enc_body: bytes, dec_body: bytes, number: str
) -> None:
    service = FakeKeyService()
    async with client_for(service) as client:
        for method, url, kwargs in [
            ("POST", ENC, {"content": enc_body}),
            ("POST", DEC, {"content": dec_body}),
            ("GET", ENC, {"params": {"number": number}}),
        ]:
            response = await client.request(method, url, **kwargs)
            assert response.status_code == 400, (url, kwargs, response.text)
            assert error_of(response).message in (MSG_BAD_REQUEST, MSG_SIZE_NOT_MULTIPLE_OF_8)
        assert service.calls == []
        assert (await client.get(ENC)).status_code == 200


@settings(max_examples=100, deadline=None)
@given(body=json_value.map(lambda v: json.dumps(v).encode()))
async def test_fuzzed_key_requests_always_get_a_well_formed_answer(body: bytes) -> None:
    service = FakeKeyService()
    async with client_for(service) as client:
        response = await client.post(ENC, content=body)
        assert response.status_code in (200, 400)
        if response.status_code == 200:
            KeyContainer.from_json(response.json())
        else:
            error_of(response)
        assert (await client.get("/api/v1/keys/bob-app/status")).status_code == 200
