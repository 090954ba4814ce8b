"""SAE-side HTTPS clients of the KME: ETSI GS QKD 014 V1.1.1 and Cisco SKIP.

Theory of operation
-------------------
A thin I/O shell (CONVENTIONS 1): each method builds one request, sends it with an
`httpx.AsyncClient` (anyio underneath, so it runs under trio as well as asyncio) and
returns ``(status_code, body)`` with the body decoded from JSON. Protocol answers are
data, not exceptions: 400 / 401 / 503 (and any other status) come back as they are, so
the caller (the node runtime answering an app's `KmsCall`) can hand them to the app
unchanged. `EtsiClientError` is raised only when there is no answer to hand over: the
connection or TLS handshake failed, the call timed out, a 200 body is not a JSON object,
or a body exceeds `max_body_bytes`. Its message names the operation and the failure,
never a body — response bodies hold key bytes, and an exception may end up in a log.
For the same reason a decoding failure is raised outside the `except` block (so no
`__context__` keeps the body alive in a traceback).

Mutual TLS: `ssl_context` is the client context (run CA as trust anchor, the SAE's
certificate and key loaded: nodes/kms/certs.py); the KME learns the caller's SAE id from
that certificate, never from the request. Environment proxies are ignored
(``trust_env=False``): the KME is on the local host. Redirects are not followed (the ETSI
API has none; following one could send a request elsewhere). Tests pass a `transport`
(e.g. ``httpx.ASGITransport(app)``) and then `ssl_context` may be None.

ETSI GS QKD 014 (§5; URLs relative to the KME's base URL)::

    status(slave)                     GET  /api/v1/keys/{slave}/status              §5.2
    enc_keys(slave, number, size)     GET  /api/v1/keys/{slave}/enc_keys?number=&size=   §5.3
        post=True, additional slaves or extensions:
                                      POST /api/v1/keys/{slave}/enc_keys  Key request (§6.2)
    dec_keys(master, [id])            GET  /api/v1/keys/{master}/dec_keys?key_ID=   §5.4
        post=True or several ids:     POST /api/v1/keys/{master}/dec_keys  Key IDs (§6.4)

The GET form of dec_keys carries one key_ID only (§5.4), so several ids always POST; the
GET form of enc_keys has no member for additional slave SAEs or extensions (§5.3), so
those always POST too. SAE ids and key ids are percent-encoded in paths.

Cisco SKIP (draft-cisco-skip-02 §4, Table 2)::

    capabilities()                    GET /capabilities
    key(remote, size_bits)            GET /key?remoteSystemID=&size=
    key_by_id(key_id, remote)         GET /key/{keyId}?remoteSystemID=
    entropy(min_entropy_bits)         GET /entropy?minentropy=
"""

from __future__ import annotations

import json
import ssl
from collections.abc import Iterable, Mapping
from types import TracebackType
from typing import Any, Final, Self
from urllib.parse import quote

import httpx

__all__ = ["MAX_BODY_BYTES", "EtsiClient", "EtsiClientError", "SkipClient"]

#: Largest response body accepted (ETSI key containers of a full request are ~200 kB).
MAX_BODY_BYTES: Final = 4 << 20
_API: Final = "/api/v1/keys"
_NOT_JSON: Final = object()


class EtsiClientError(Exception):
    """A KME call did not complete (transport, TLS, time-out, unreadable 200 body).

    `operation` names the call (e.g. "enc_keys"); the message never quotes a body."""

    def __init__(self, operation: str, why: str) -> None:
        super().__init__(f"{operation}: {why}")
        self.operation = operation
        self.why = why


def _segment(value: str) -> str:
    """One path segment: every reserved character percent-encoded (RFC 3986 §2.1)."""
    if not isinstance(value, str) or not value:
        raise ValueError("path parameters must be non-empty strings")
    return quote(value, safe="")


class _JsonClient:
    """An httpx client that turns each call into (status, JSON object)."""

    def __init__(
        self,
        base_url: str,
        ssl_context: ssl.SSLContext | None,
        *,
        timeout_s: float = 5.0,
        transport: httpx.AsyncBaseTransport | None = None,
        max_body_bytes: int = MAX_BODY_BYTES,
    ) -> None:
        if timeout_s <= 0:
            raise ValueError("timeout_s must be > 0")
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self.max_body_bytes = max_body_bytes
        self._client = httpx.AsyncClient(
            base_url=self.base_url,
            verify=ssl_context if ssl_context is not None else True,
            timeout=httpx.Timeout(timeout_s),
            transport=transport,
            follow_redirects=False,
            trust_env=False,
            headers={"Accept": "application/json"},
        )

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.base_url}>"

    @property
    def closed(self) -> bool:
        return self._client.is_closed

    async def aclose(self) -> None:
        await self._client.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def _call(
        self,
        operation: str,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        body: Mapping[str, Any] | None = None,
    ) -> tuple[int, dict[str, Any]]:
        query = {k: v for k, v in (params or {}).items() if v is not None}
        try:
            async with self._client.stream(method, path, params=query, json=body) as response:
                status = response.status_code
                raw = bytearray()
                too_big = _declared_length(response) > self.max_body_bytes
                if not too_big:
                    # Read to the end (stopping early would leave httpx's nested stream
                    # generators unfinished); keep at most max_body_bytes + 1 of it.
                    async for chunk in response.aiter_bytes():
                        if not too_big:
                            raw += chunk
                            too_big = len(raw) > self.max_body_bytes
        except httpx.TimeoutException as exc:
            raise EtsiClientError(operation, f"timed out after {self.timeout_s:g} s ({type(exc).__name__})") from exc
        except httpx.HTTPError as exc:
            raise EtsiClientError(operation, f"{type(exc).__name__}: {exc}") from exc
        if too_big:
            raw.clear()
            raise EtsiClientError(operation, f"HTTP {status}: response body larger than {self.max_body_bytes} bytes")
        decoded = _decode(bytes(raw))
        del raw
        if isinstance(decoded, dict):
            return status, decoded
        if status == 200:
            what = "not JSON" if decoded is _NOT_JSON else "not a JSON object"
            raise EtsiClientError(operation, f"HTTP 200: the response body is {what}")
        # An error status with an unreadable body (e.g. a proxy's HTML page): still an answer.
        return status, {"message": f"HTTP {status} with a body that is not a JSON object"}


def _declared_length(response: httpx.Response) -> int:
    try:
        return int(response.headers.get("content-length", "0"))
    except ValueError:
        return 0


def _decode(raw: bytes) -> object:
    """The JSON value of `raw`, {} for an empty body, `_NOT_JSON` if it does not parse
    (the exception is dropped here: its `doc` attribute would hold the body)."""
    if not raw.strip():
        return {}
    try:
        return json.loads(raw)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError
        return _NOT_JSON


class EtsiClient(_JsonClient):
    """ETSI GS QKD 014 V1.1.1 SAE client (module docstring). Each method returns
    ``(status_code, body)``; raises `EtsiClientError` only when no answer came."""

    async def status(self, slave_sae: str) -> tuple[int, dict[str, Any]]:
        """§5.2 Get status of the keys shared with `slave_sae`."""
        return await self._call("status", "GET", f"{_API}/{_segment(slave_sae)}/status")

    async def enc_keys(
        self,
        slave_sae: str,
        number: int = 1,
        size_bits: int | None = None,
        additional_slaves: Iterable[str] = (),
        *,
        post: bool = False,
        extension_mandatory: list[dict[str, Any]] | None = None,
        extension_optional: list[dict[str, Any]] | None = None,
    ) -> tuple[int, dict[str, Any]]:
        """§5.3 Get key: `number` keys of `size_bits` (None: the KME's default) for
        `slave_sae` (and `additional_slaves`, §6.2), this SAE being the master."""
        if isinstance(additional_slaves, str):
            raise TypeError("additional_slaves must be an iterable of SAE ids, not a string")
        slaves = list(additional_slaves)
        path = f"{_API}/{_segment(slave_sae)}/enc_keys"
        if post or slaves or extension_mandatory is not None or extension_optional is not None:
            body: dict[str, Any] = {"number": number}
            if size_bits is not None:
                body["size"] = size_bits
            if slaves:
                body["additional_slave_SAE_IDs"] = slaves
            if extension_mandatory is not None:
                body["extension_mandatory"] = extension_mandatory
            if extension_optional is not None:
                body["extension_optional"] = extension_optional
            return await self._call("enc_keys", "POST", path, body=body)
        return await self._call("enc_keys", "GET", path, params={"number": number, "size": size_bits})

    async def dec_keys(
        self, master_sae: str, key_ids: Iterable[str], *, post: bool = False
    ) -> tuple[int, dict[str, Any]]:
        """§5.4 Get key with key IDs: the keys `key_ids` that `master_sae` obtained for this SAE."""
        if isinstance(key_ids, str):
            raise TypeError("key_ids must be an iterable of key ids, not a string")
        ids = list(key_ids)
        if not ids or not all(isinstance(k, str) and k for k in ids):
            raise ValueError("key_ids must hold at least one non-empty key id")
        path = f"{_API}/{_segment(master_sae)}/dec_keys"
        if post or len(ids) > 1:
            return await self._call("dec_keys", "POST", path, body={"key_IDs": [{"key_ID": k} for k in ids]})
        return await self._call("dec_keys", "GET", path, params={"key_ID": ids[0]})


class SkipClient(_JsonClient):
    """Cisco SKIP client (draft-cisco-skip-02 §4). Each method returns ``(status_code,
    body)``; raises `EtsiClientError` only when no answer came."""

    async def capabilities(self) -> tuple[int, dict[str, Any]]:
        """§4.1: entropy/key support, algorithm, local and remote system ids."""
        return await self._call("capabilities", "GET", "/capabilities")

    async def key(self, remote_system_id: str, size_bits: int | None = None) -> tuple[int, dict[str, Any]]:
        """§4.2: a new key shared with `remote_system_id` -> {"keyId": hex, "key": hex}."""
        return await self._call("key", "GET", "/key", params={"remoteSystemID": remote_system_id, "size": size_bits})

    async def key_by_id(self, key_id: str, remote_system_id: str) -> tuple[int, dict[str, Any]]:
        """§4.2: the key `key_id` that `remote_system_id`'s peer obtained."""
        return await self._call(
            "key_by_id", "GET", f"/key/{_segment(key_id)}", params={"remoteSystemID": remote_system_id}
        )

    async def entropy(self, min_entropy_bits: int | None = None) -> tuple[int, dict[str, Any]]:
        """§4.3: random bytes -> {"randomStr": hex, "minentropy": bits}."""
        return await self._call("entropy", "GET", "/entropy", params={"minentropy": min_entropy_bits})
