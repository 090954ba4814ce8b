"""Cisco SKIP key provider API (nodes/kms/skip.py) against an in-memory fake SkipService.

In-process over httpx's ASGI transport; the caller identity comes from an injected
identity function reading a test-only header (in production: the TLS client certificate).
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest

from nodes.kms.skip import DEFAULT_ENTROPY_BITS, MAX_ENTROPY_BITS, SkipError, skip_app

SAE_HEADER = "x-test-caller"


def header_identity(scope: dict[str, Any]) -> str | None:
    for name, value in scope["headers"]:
        if name == SAE_HEADER.encode():
            return value.decode() or None
    return None


class FakeSkipService:
    """KP 'alice' peering with KP 'bob'; keys live in one dict and are handed out by id once."""

    def __init__(self, seed: int = 3) -> None:
        self._rng = random.Random(seed)
        self.keys: dict[str, tuple[str, bytes]] = {}
        self.calls: list[tuple[Any, ...]] = []
        self.failure: Exception | None = None

    def _maybe_fail(self) -> None:
        if self.failure is not None:
            raise self.failure

    async def capabilities(self, caller: str) -> Mapping[str, Any]:
        self.calls.append(("capabilities", caller))
        self._maybe_fail()
        return {"entropy": True, "key": True, "algorithm": "qkd-bb84", "localSystemID": "alice", "remoteSystemID": ["bob"]}

    async def new_key(self, caller: str, remote_system_id: str, size_bits: int | None) -> tuple[str, bytes]:
        self.calls.append(("new_key", caller, remote_system_id, size_bits))
        self._maybe_fail()
        if remote_system_id != "bob":
            raise SkipError(400, f"unknown remoteSystemID {remote_system_id}")
        size_bits = 256 if size_bits is None else size_bits
        if size_bits > 1024:
            raise SkipError(400, "size too large")
        key_id = self._rng.randbytes(16).hex()
        key = self._rng.randbytes(size_bits // 8)
        self.keys[key_id] = (remote_system_id, key)
        return key_id, key

    async def key_by_id(self, caller: str, remote_system_id: str, key_id_hex: str) -> tuple[str, bytes]:
        self.calls.append(("key_by_id", caller, remote_system_id, key_id_hex))
        self._maybe_fail()
        if key_id_hex not in self.keys:
            raise SkipError(400, "key not found")  # draft Table 7: 400 also for an unknown key
        _, key = self.keys.pop(key_id_hex)  # handed out once, then gone (zeroised)
        return key_id_hex, key


@asynccontextmanager
async def client_for(service: FakeSkipService, caller: str | None = "alice-router") -> AsyncIterator[httpx.AsyncClient]:
    app = skip_app(service, identity=header_identity)
    headers = {SAE_HEADER: caller} if caller else {}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="https://kp", headers=headers) as client:
        yield client


def message_of(response: httpx.Response) -> str:
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"message"} and isinstance(body["message"], str)
    return body["message"]


async def test_capabilities_member_names() -> None:
    service = FakeSkipService()
    async with client_for(service) as client:
        response = await client.get("/capabilities")
    assert response.status_code == 200
    assert response.json() == {
        "entropy": True,
        "key": True,
        "algorithm": "qkd-bb84",
        "localSystemID": "alice",
        "remoteSystemID": ["bob"],
    }
    assert service.calls == [("capabilities", "alice-router")]


async def test_new_key_default_size_is_left_to_the_service() -> None:
    service = FakeSkipService()
    async with client_for(service) as client:
        response = await client.get("/key", params={"remoteSystemID": "bob"})
    assert response.status_code == 200
    assert response.headers["cache-control"] == "no-store"
    body = response.json()
    assert set(body) == {"keyId", "key"}
    assert bytes.fromhex(body["key"]) == service.keys[body["keyId"]][1]
    assert len(bytes.fromhex(body["key"])) == 32
    assert service.calls == [("new_key", "alice-router", "bob", None)]


async def test_new_key_with_size_in_bits() -> None:
    service = FakeSkipService()
    async with client_for(service) as client:
        response = await client.get("/key", params={"remoteSystemID": "bob", "size": "128", "other": "x"})
    assert response.status_code == 200
    assert len(bytes.fromhex(response.json()["key"])) == 16
    assert service.calls == [("new_key", "alice-router", "bob", 128)]


async def test_key_by_id_returns_the_same_key_once() -> None:
    service = FakeSkipService()
    async with client_for(service, "alice-router") as alice:
        issued = (await alice.get("/key", params={"remoteSystemID": "bob"})).json()
    async with client_for(service, "bob-router") as bob:
        first = await bob.get(f"/key/{issued['keyId'].upper()}", params={"remoteSystemID": "alice"})
        again = await bob.get(f"/key/{issued['keyId']}", params={"remoteSystemID": "alice"})
    assert first.status_code == 200
    assert first.json() == issued
    assert service.calls[-2] == ("key_by_id", "bob-router", "alice", issued["keyId"])  # hex normalised to lower case
    assert again.status_code == 400
    assert message_of(again) == "key not found"


async def test_entropy_default_and_requested_sizes() -> None:
    async with client_for(FakeSkipService()) as client:
        default = (await client.get("/entropy")).json()
        larger = (await client.get("/entropy", params={"minentropy": "512"})).json()
        other = (await client.get("/entropy")).json()
    assert default["minentropy"] == DEFAULT_ENTROPY_BITS and len(bytes.fromhex(default["randomStr"])) * 8 == 256
    assert larger["minentropy"] == 512 and len(bytes.fromhex(larger["randomStr"])) == 64
    assert default["randomStr"] != other["randomStr"]  # equal with probability 2**-256


@pytest.mark.parametrize(
    ("method", "url", "status"),
    [
        ("GET", "/key", 400),
        ("GET", "/key?remoteSystemID=", 400),
        ("GET", "/key?remoteSystemID=bob&remoteSystemID=carol", 400),
        ("GET", "/key?remoteSystemID=bob&size=abc", 400),
        ("GET", "/key?remoteSystemID=bob&size=7", 400),
        ("GET", "/key?remoteSystemID=bob&size=0", 400),
        ("GET", "/key?remoteSystemID=bob&size=-8", 400),
        ("GET", "/key?remoteSystemID=bob&size=4096", 400),  # the service's limit
        ("GET", "/key?remoteSystemID=mallory", 400),  # the service does not know that KP
        ("GET", "/key/xyz?remoteSystemID=bob", 400),  # Table 7: malformed keyId
        ("GET", "/key/" + "ab" * 200 + "?remoteSystemID=bob", 400),
        ("GET", "/key/abcd", 400),
        ("GET", "/key/abcd?remoteSystemID=bob", 400),  # Table 7: key not found
        ("GET", "/entropy?minentropy=7", 400),
        ("GET", "/entropy?minentropy=x", 400),
        ("GET", f"/entropy?minentropy={MAX_ENTROPY_BITS + 8}", 400),
        ("GET", "/keys", 404),  # Table 3: not a path of Table 2
        ("GET", "/key/ab/cd", 404),
        ("GET", "/", 404),
        ("GET", "/capabilities/", 404),
        ("POST", "/key?remoteSystemID=bob", 405),  # Table 3: only GET
        ("DELETE", "/key/abcd?remoteSystemID=bob", 405),
        ("PUT", "/entropy", 405),
        ("HEAD", "/key?remoteSystemID=bob", 405),
    ],
)
async def test_errors_have_the_draft_status_and_a_json_body(method: str, url: str, status: int) -> None:
    service = FakeSkipService()
    async with client_for(service) as client:
        response = await client.request(method, url)
    assert response.status_code == status
    if method != "HEAD":
        assert message_of(response)
    if status == 405:
        assert response.headers["allow"] == "GET"
    assert not service.keys  # no key was created


async def test_no_identity_is_401_and_reaches_no_service() -> None:
    service = FakeSkipService()
    async with client_for(service, caller=None) as client:
        for url in ("/capabilities", "/key?remoteSystemID=bob", "/key/ab?remoteSystemID=bob", "/entropy", "/nope"):
            response = await client.get(url)
            assert response.status_code == 401
            assert message_of(response)
    assert service.calls == []


async def test_identity_never_comes_from_the_request() -> None:
    service = FakeSkipService()
    app = skip_app(service)  # default identity: the TLS client certificate
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="https://kp") as client:
        response = await client.get("/capabilities", headers={SAE_HEADER: "alice-router"})
    assert response.status_code == 401
    assert service.calls == []


async def test_service_errors_and_crashes(caplog: pytest.LogCaptureFixture) -> None:
    service = FakeSkipService()
    async with client_for(service) as client:
        service.failure = SkipError(503, "no key material towards bob")
        response = await client.get("/key", params={"remoteSystemID": "bob"})
        assert (response.status_code, message_of(response)) == (503, "no key material towards bob")
        service.failure = RuntimeError("disk on fire")
        response = await client.get("/key/ab", params={"remoteSystemID": "bob"})
        assert response.status_code == 500  # Table 7: internal error while reading the key
        assert "disk on fire" not in response.text
        service.failure = None
        assert (await client.get("/capabilities")).status_code == 200
    assert "SkipService.key_by_id failed" in caplog.text


async def test_a_service_returning_garbage_is_500_not_a_crash() -> None:
    class Broken(FakeSkipService):
        async def new_key(self, caller: str, remote_system_id: str, size_bits: int | None) -> Any:
            return ("not hex!", "not bytes")

        async def capabilities(self, caller: str) -> Any:
            return ["not", "a", "mapping"]

    async with client_for(Broken()) as client:
        assert (await client.get("/key", params={"remoteSystemID": "bob"})).status_code == 500
        assert (await client.get("/capabilities")).status_code == 500


def test_skip_error_status_codes() -> None:
    assert str(SkipError(400, "bad")) == "400 bad"
    for status in (200, 404, 405):
        with pytest.raises(ValueError):
            SkipError(status, "m")
