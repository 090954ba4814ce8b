"""Cisco Secure Key Integration Protocol (SKIP, draft-cisco-skip-02) key provider as ASGI app.

Theory of operation
-------------------
SKIP lets an encryptor (e.g. an IKEv2 router using RFC 8784 PPKs) fetch a key from its
local Key Provider (KP; here: the KME) over HTTPS. Two encryptors obtain the same key:
the initiator asks for a new key for a remote KP and gets (keyId, key); it sends the
keyId in-band to its peer, which asks its own KP for that keyId. In qnetem a KP is a KME
node, the remote system id is the peer KME's node name (the service maps it), and the
caller is authenticated like an ETSI SAE: subject CommonName of the verified TLS client
certificate (`identity(scope)`; the draft's TLS-PSK identity plays this role there).

`skip_app(service)` serves the methods of the draft's Table 2 (§4)::

    GET /capabilities                           §4.1  -> {"entropy", "key", "algorithm",
                                                          "localSystemID", "remoteSystemID": [...]}
    GET /key?remoteSystemID=<id>[&size=<bits>]   §4.2  new key   -> {"keyId": hex, "key": hex}
    GET /key/<keyId>?remoteSystemID=<id>         §4.2  key by id -> {"keyId": hex, "key": hex}
    GET /entropy[?minentropy=<bits>]             §4.3  -> {"randomStr": hex, "minentropy": bits}

The `SkipService` (the KME shell; a fake in tests) decides about keys: which remote
systems exist, key sizes it offers, and that a key fetched by id is handed out once and
then zeroised (§4.2). Entropy does not involve the service: `randomStr` is
`secrets.token_bytes` (the OS CSPRNG), hex-encoded.

Status codes, per the draft's tables (Table 3 general, Table 7 keys, Table 9 entropy):
200 success; 400 malformed parameter, malformed keyId or key not found (Table 7); 404 a
path not in Table 2; 405 a method other than GET (Allow: GET), including HEAD so that no
key is consumed without being delivered; 500 internal error while reading or zeroising
a key (unexpected service failure); 503 no entropy / no key material (service's choice).
401 (no verified client identity) is ours: the draft authenticates in TLS. Every error
here carries the JSON object {"message": str} (our choice, shaped like the ETSI Error).

Keys and entropy appear hex-encoded in response bodies only; nothing here logs a body.
"""

from __future__ import annotations

import logging
import re
import secrets
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final, Protocol

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp

from nodes.kms.etsi014 import IdentityFn, RequireIdentity, caller_of, tls_identity

__all__ = [
    "DEFAULT_ENTROPY_BITS",
    "MAX_ENTROPY_BITS",
    "SkipError",
    "SkipService",
    "skip_app",
]

log = logging.getLogger(__name__)

DEFAULT_ENTROPY_BITS: Final = 256  # §4.3: minentropy absent
MAX_ENTROPY_BITS: Final = 8192  # our cap on one /entropy answer
_MAX_KEY_ID_HEX_CHARS: Final = 256  # keyIds are short hex strings (128 bits in practice)
_MAX_DIGITS: Final = 9
_SERVICE_STATUSES: Final = frozenset({400, 401, 500, 503})
_HEX = re.compile(r"[0-9a-fA-F]+")
_DECIMAL = re.compile(r"[0-9]+")


class SkipError(Exception):
    """Raised by a `SkipService` to answer with an error: 400, 401, 500 or 503."""

    def __init__(self, status: int, message: str) -> None:
        if status not in _SERVICE_STATUSES:
            raise ValueError(f"SkipError status must be one of {sorted(_SERVICE_STATUSES)}, not {status}")
        super().__init__(status, message)
        self.status = status
        self.message = message

    def __str__(self) -> str:
        return f"{self.status} {self.message}"


class SkipService(Protocol):
    """What the KP provides to SKIP. `caller` is the authenticated client (certificate CN)."""

    async def capabilities(self, caller: str) -> Mapping[str, Any]:
        """§4.1 body: entropy, key, algorithm, localSystemID, remoteSystemID (list)."""
        ...

    async def new_key(self, caller: str, remote_system_id: str, size_bits: int | None) -> tuple[str, bytes]:
        """§4.2 new key shared with `remote_system_id`: (keyId as hex, key). size None: KP default."""
        ...

    async def key_by_id(self, caller: str, remote_system_id: str, key_id_hex: str) -> tuple[str, bytes]:
        """§4.2 the key with `key_id_hex` (lower-case hex) obtained via `remote_system_id`; once only."""
        ...


class _BadParameter(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def _error(status: int, message: str, headers: Mapping[str, str] | None = None) -> Response:
    return JSONResponse({"message": message}, status, headers=dict(headers) if headers else None)


def _not_get(request: Request) -> Response:
    # Table 3: only GET is supported.
    return _error(405, f"method {request.method} not allowed; only GET is supported", {"Allow": "GET"})


def _single(request: Request, name: str, *, required: bool) -> str | None:
    values = request.query_params.getlist(name)
    if len(values) > 1:
        raise _BadParameter(f"{name} given more than once")
    if not values or values[0] == "":
        if required:
            raise _BadParameter(f"{name} is required")
        return None
    return values[0]


def _bits(request: Request, name: str) -> int | None:
    text = _single(request, name, required=False)
    if text is None:
        return None
    if len(text) > _MAX_DIGITS or not _DECIMAL.fullmatch(text):
        raise _BadParameter(f"{name} must be a decimal integer (bits)")
    value = int(text)
    if value <= 0 or value % 8:
        raise _BadParameter(f"{name} must be a positive multiple of 8 (bits)")
    return value


def _capabilities_body(result: Any) -> dict[str, Any]:
    if not isinstance(result, Mapping):
        raise TypeError("SkipService.capabilities must return a mapping")
    return dict(result)


def _key_body(result: Any) -> dict[str, str]:
    key_id, key = result
    if not isinstance(key_id, str) or not _HEX.fullmatch(key_id) or not isinstance(key, bytes):
        raise TypeError("SkipService must return (keyId hex str, key bytes)")
    return {"keyId": key_id, "key": key.hex()}


async def _call(what: str, call: Callable[[], Awaitable[Any]], render: Callable[[Any], Any]) -> Response:
    try:
        body = render(await call())
        response = JSONResponse(body, 200, headers={"Cache-Control": "no-store"})
    except SkipError as exc:
        return _error(exc.status, exc.message)
    except Exception:
        # Table 7: 500 for an internal error while reading or zeroising the key.
        log.exception("SkipService.%s failed", what)
        return _error(500, "internal error while reading the key")
    return response


def skip_app(service: SkipService, *, identity: IdentityFn = tls_identity) -> ASGIApp:
    """The SKIP methods of draft-cisco-skip-02 Table 2 in front of `service`."""

    async def capabilities(request: Request) -> Response:  # §4.1
        if request.method != "GET":
            return _not_get(request)
        caller = caller_of(request)
        return await _call("capabilities", lambda: service.capabilities(caller), _capabilities_body)

    async def new_key(request: Request) -> Response:  # §4.2
        if request.method != "GET":
            return _not_get(request)
        try:
            remote = _single(request, "remoteSystemID", required=True)
            size_bits = _bits(request, "size")
        except _BadParameter as exc:
            return _error(400, exc.message)
        assert remote is not None
        caller = caller_of(request)
        return await _call("new_key", lambda: service.new_key(caller, remote, size_bits), _key_body)

    async def key_by_id(request: Request) -> Response:  # §4.2
        if request.method != "GET":
            return _not_get(request)
        key_id = request.path_params["keyId"]
        try:
            if len(key_id) > _MAX_KEY_ID_HEX_CHARS or not _HEX.fullmatch(key_id):
                raise _BadParameter("malformed keyId: hex expected")  # Table 7
            remote = _single(request, "remoteSystemID", required=True)
        except _BadParameter as exc:
            return _error(400, exc.message)
        assert remote is not None
        caller = caller_of(request)
        return await _call(
            "key_by_id", lambda: service.key_by_id(caller, remote, key_id.lower()), _key_body
        )

    async def entropy(request: Request) -> Response:  # §4.3
        if request.method != "GET":
            return _not_get(request)
        try:
            bits = _bits(request, "minentropy")
        except _BadParameter as exc:
            return _error(400, exc.message)
        bits = DEFAULT_ENTROPY_BITS if bits is None else bits
        if bits > MAX_ENTROPY_BITS:
            return _error(400, f"minentropy must be at most {MAX_ENTROPY_BITS} bits")
        try:
            random_hex = secrets.token_bytes(bits // 8).hex()
        except OSError:  # Table 9: the random source is not available
            log.exception("entropy source failed")
            return _error(503, "entropy source not available")
        return JSONResponse({"randomStr": random_hex, "minentropy": bits}, 200, headers={"Cache-Control": "no-store"})

    async def not_in_table_2(request: Request, exc: Exception) -> Response:
        if isinstance(exc, HTTPException) and exc.status_code == 405:
            return _not_get(request)
        return _error(404, f"{request.url.path} is not a SKIP method")  # Table 3

    app = Starlette(
        routes=[
            # Starlette adds HEAD to GET routes; the endpoints refuse it themselves (405).
            Route("/capabilities", capabilities, methods=["GET"]),
            Route("/key", new_key, methods=["GET"]),
            Route("/key/{keyId}", key_by_id, methods=["GET"]),
            Route("/entropy", entropy, methods=["GET"]),
        ],
        exception_handlers={HTTPException: not_in_table_2},
    )
    app.router.redirect_slashes = False
    return RequireIdentity(
        app, identity, lambda: _error(401, "a verified client certificate naming the caller is required")
    )
