"""ETSI GS QKD 014 V1.1.1 key delivery API (KME side) as an ASGI application.

Theory of operation
-------------------
An SAE (application) talks HTTPS with mutual TLS to the KME it is attached to. This
module is the HTTP face of that conversation; it owns no keys. `etsi014_app(service)`
returns a starlette ASGI app that

1. authenticates: the caller's SAE id comes from the verified TLS client certificate
   (`identity(scope)`, by default `tls_identity`: the subject CommonName the HTTPS shell
   put in the ASGI TLS extension), never from the request. No identity -> 401 before
   any routing, so an unauthenticated caller learns nothing about the API;
2. parses and validates the request into the §6 data formats below (frozen dataclasses);
3. calls the `KeyService` (the KME shell in production, an in-memory fake in tests),
   which decides everything that needs key state: 401 for "these keys were not issued to
   you", 503 for "no keys", 400 for unknown SAEs or keys and for limits it advertises in
   `Status` (max_key_per_request, min/max_key_size, max_SAE_ID_count);
4. renders the service's answer as JSON; key bytes appear base64-encoded in responses and
   nowhere else (no request or response body is ever logged; `Key.__repr__` hides them).

Endpoints (§5.1 Table 1; URLs are relative to https://{KME_hostname})::

    GET       /api/v1/keys/{slave_SAE_ID}/status    §5.2 Get status         -> Status (§6.1)
    GET|POST  /api/v1/keys/{slave_SAE_ID}/enc_keys  §5.3 Get key            -> Key container (§6.3)
              GET: query `number`, `size`;  POST: body Key request (§6.2)
    GET|POST  /api/v1/keys/{master_SAE_ID}/dec_keys §5.4 Get key with IDs   -> Key container (§6.3)
              GET: query `key_ID` (one key); POST: body Key IDs (§6.4)

The GET and POST forms reach the service as the same `KeyRequest` / `KeyIds` value.

Status codes: the response-code tables of §5.2-§5.4 (Tables 4, 6, 8) define only 200,
400, 401 and 503, and this app answers with nothing else. A request outside the API
(unknown path, trailing slash, a method other than the ones above, including HEAD) is
answered 400 "Bad request format" rather than 404/405: a conforming SAE only knows those
four codes, and every error then carries the §6.5 Error JSON body — 401 included. An
unexpected failure inside the service is logged (exception type and traceback, never
bodies) and answered 503.

Validation (400 "Bad request format" with `details` unless noted):
- bodies must be a JSON object (RFC 8259) of at most `MAX_BODY_BYTES`; NaN/Infinity,
  deep nesting and invalid UTF-8 are rejected; the Content-Type header is not checked;
- unknown query parameters and unknown JSON members are ignored; a JSON `null` for an
  optional member and an empty query value (`size=`) count as absent; a known query
  parameter given twice is rejected;
- `number`: integer >= 1 (default 1); `size`: integer > 0 (default: the KME's key_size,
  left to the service as `size=None`); a size that is not a multiple of 8 gets the
  spec's message "size shall be a multiple of 8";
- `key_IDs`: a non-empty array of objects with a string `key_ID`.

Error strings (module constants `MSG_*`): "Bad request format", "Unauthorized" and
"Error of server side" are the descriptions of 400/401/503 in Tables 4, 6 and 8;
"size shall be a multiple of 8", "not all extension_mandatory parameters are supported",
"not all extension_mandatory request options could be met" (§6.2) and "one or more keys
specified are not found on KME" (§6.4) are the spec's own example messages.

Extensions: `extension_mandatory` / `extension_optional` are passed through untouched;
the service must refuse mandatory extensions it does not implement (§6.2) —
`check_mandatory_extensions` builds that error for it.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

from cryptography import x509
from cryptography.x509.oid import NameOID
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

# The one error type of the key-management core (status 400/401/503, message, details);
# re-exported here so that `etsi014.KmsError` is the very class the KME core raises.
from nodes.kms.errors import KmsError

__all__ = [
    "MAX_BODY_BYTES",
    "MSG_BAD_REQUEST",
    "MSG_EXTENSION_MANDATORY_UNMET",
    "MSG_EXTENSION_MANDATORY_UNSUPPORTED",
    "MSG_KEYS_NOT_FOUND",
    "MSG_SERVER_ERROR",
    "MSG_SIZE_NOT_MULTIPLE_OF_8",
    "MSG_UNAUTHORIZED",
    "Error",
    "FormatError",
    "IdentityFn",
    "Key",
    "KeyContainer",
    "KeyIdEntry",
    "KeyIds",
    "KeyRequest",
    "KeyService",
    "KmsError",
    "RequireIdentity",
    "Status",
    "caller_of",
    "check_mandatory_extensions",
    "etsi014_app",
    "tls_identity",
]

log = logging.getLogger(__name__)

# --- error messages ---------------------------------------------------------------------
MSG_BAD_REQUEST: Final = "Bad request format"  # §5.2-§5.4 Tables 4, 6, 8: 400
MSG_UNAUTHORIZED: Final = "Unauthorized"  # §5.2-§5.4 Tables 4, 6, 8: 401
MSG_SERVER_ERROR: Final = "Error of server side"  # §5.2-§5.4 Tables 4, 6, 8: 503
MSG_SIZE_NOT_MULTIPLE_OF_8: Final = "size shall be a multiple of 8"  # §6.2
MSG_EXTENSION_MANDATORY_UNSUPPORTED: Final = "not all extension_mandatory parameters are supported"  # §6.2
MSG_EXTENSION_MANDATORY_UNMET: Final = "not all extension_mandatory request options could be met"  # §6.2
MSG_KEYS_NOT_FOUND: Final = "one or more keys specified are not found on KME"  # §6.4

MAX_BODY_BYTES: Final = 64 * 1024  # a Key IDs body of ~1000 UUIDs; far above any sane request
_MAX_DIGITS: Final = 18  # longer decimal query values are refused before int() sees them
_CALLER_SCOPE_KEY: Final = "qnetem.kms.caller"  # set by the authentication wrapper only
_DECIMAL = re.compile(r"[0-9]+")

JsonObject = Mapping[str, Any]
IdentityFn = Callable[[Scope], "str | None"]


# --- errors -----------------------------------------------------------------------------
class FormatError(ValueError):
    """A §6 JSON value does not have the required shape (whoever sent it is at fault).

    The app answers it with 400; a client parsing a KME response treats it as a remote
    protocol error. `message` and `details` never contain key bytes.
    """

    def __init__(self, message: str, details: Sequence[JsonObject] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details: tuple[JsonObject, ...] | None = tuple(details) if details is not None else None


# --- JSON shape helpers -----------------------------------------------------------------
def _bad(member: str, problem: str) -> FormatError:
    return FormatError(MSG_BAD_REQUEST, ({"parameter": member, "error": problem},))


def _object(value: Any, member: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _bad(member, "must be a JSON object")
    return value


def _string(value: Any, member: str) -> str:
    if not isinstance(value, str):
        raise _bad(member, "must be a string")
    return value


def _integer(value: Any, member: str) -> int:
    # bool is an int subclass in Python but not an integer in JSON
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(member, "must be an integer")
    return value


def _optional_object(value: Any, member: str) -> dict[str, Any] | None:
    return None if value is None else _object(value, member)


def _array(value: Any, member: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise _bad(member, "must be an array")
    return value


def _present(obj: Mapping[str, Any], member: str) -> Any:
    value = obj.get(member)
    if value is None:
        raise _bad(member, "is required")
    return value


def _with_optional(out: dict[str, Any], **members: Any) -> dict[str, Any]:
    out.update({name: value for name, value in members.items() if value is not None})
    return out


# --- §6 data formats ---------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Status:
    """§6.1 Status data format: answer to Get status (§5.2). Sizes in bits."""

    source_KME_ID: str
    target_KME_ID: str
    master_SAE_ID: str
    slave_SAE_ID: str
    key_size: int  # default key size, bits
    stored_key_count: int
    max_key_count: int
    max_key_per_request: int
    max_key_size: int  # bits
    min_key_size: int  # bits
    max_SAE_ID_count: int  # additional slave SAEs allowed (0: no key multicast)
    status_extension: JsonObject | None = None

    _STRINGS = ("source_KME_ID", "target_KME_ID", "master_SAE_ID", "slave_SAE_ID")
    _INTEGERS = (
        "key_size",
        "stored_key_count",
        "max_key_count",
        "max_key_per_request",
        "max_key_size",
        "min_key_size",
        "max_SAE_ID_count",
    )

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {name: getattr(self, name) for name in self._STRINGS + self._INTEGERS}
        return _with_optional(out, status_extension=self.status_extension)

    @classmethod
    def from_json(cls, value: Any) -> Status:
        obj = _object(value, "Status")
        fields = {name: _string(_present(obj, name), name) for name in cls._STRINGS}
        fields.update({name: _integer(_present(obj, name), name) for name in cls._INTEGERS})
        return cls(**fields, status_extension=_optional_object(obj.get("status_extension"), "status_extension"))


@dataclass(frozen=True, slots=True)
class KeyRequest:
    """§6.2 Key request: body of Get key (§5.3); the GET form fills `number`/`size` only.

    `size` is in bits; None means "the KME's default key_size" (the service resolves it).
    Constructing an invalid request raises FormatError with the spec's message.
    """

    number: int = 1
    size: int | None = None
    additional_slave_SAE_IDs: tuple[str, ...] = ()  # key multicast to more slave SAEs
    extension_mandatory: tuple[JsonObject, ...] = ()
    extension_optional: tuple[JsonObject, ...] = ()

    def __post_init__(self) -> None:
        if _integer(self.number, "number") < 1:
            raise _bad("number", "must be an integer >= 1")
        if self.size is not None:
            if _integer(self.size, "size") <= 0:
                raise _bad("size", "must be a positive integer (bits)")
            if self.size % 8:
                raise FormatError(MSG_SIZE_NOT_MULTIPLE_OF_8, ({"parameter": "size", "value": self.size},))

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"number": self.number}
        if self.size is not None:
            out["size"] = self.size
        if self.additional_slave_SAE_IDs:
            out["additional_slave_SAE_IDs"] = list(self.additional_slave_SAE_IDs)
        if self.extension_mandatory:
            out["extension_mandatory"] = [dict(e) for e in self.extension_mandatory]
        if self.extension_optional:
            out["extension_optional"] = [dict(e) for e in self.extension_optional]
        return out

    @classmethod
    def from_json(cls, value: Any) -> KeyRequest:
        obj = _object(value, "Key request")
        number = obj.get("number")
        size = obj.get("size")
        return cls(
            number=1 if number is None else _integer(number, "number"),
            size=None if size is None else _integer(size, "size"),
            additional_slave_SAE_IDs=tuple(
                _string(v, "additional_slave_SAE_IDs[]")
                for v in _array(obj.get("additional_slave_SAE_IDs"), "additional_slave_SAE_IDs")
            ),
            extension_mandatory=tuple(
                _object(v, "extension_mandatory[]")
                for v in _array(obj.get("extension_mandatory"), "extension_mandatory")
            ),
            extension_optional=tuple(
                _object(v, "extension_optional[]")
                for v in _array(obj.get("extension_optional"), "extension_optional")
            ),
        )


@dataclass(frozen=True, slots=True)
class Key:
    """One element of `keys` in a §6.3 Key container. `key` is raw bytes; base64 on the wire."""

    key_ID: str  # UUID text (§6.3)
    key: bytes = field(repr=False)
    key_ID_extension: JsonObject | None = None
    key_extension: JsonObject | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.key, bytes):
            raise TypeError("Key.key must be bytes")

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"key_ID": self.key_ID}
        _with_optional(out, key_ID_extension=self.key_ID_extension)
        out["key"] = base64.b64encode(self.key).decode("ascii")
        return _with_optional(out, key_extension=self.key_extension)

    @classmethod
    def from_json(cls, value: Any) -> Key:
        obj = _object(value, "keys[]")
        encoded = _string(_present(obj, "key"), "key")
        try:
            key = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise _bad("key", "must be base64 (RFC 4648)") from None
        return cls(
            key_ID=_string(_present(obj, "key_ID"), "key_ID"),
            key=key,
            key_ID_extension=_optional_object(obj.get("key_ID_extension"), "key_ID_extension"),
            key_extension=_optional_object(obj.get("key_extension"), "key_extension"),
        )


@dataclass(frozen=True, slots=True)
class KeyContainer:
    """§6.3 Key container: answer to Get key (§5.3) and Get key with key IDs (§5.4)."""

    keys: tuple[Key, ...]
    key_container_extension: JsonObject | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"keys": [k.to_json() for k in self.keys]}
        return _with_optional(out, key_container_extension=self.key_container_extension)

    @classmethod
    def from_json(cls, value: Any) -> KeyContainer:
        obj = _object(value, "Key container")
        keys = obj.get("keys")
        if not isinstance(keys, list):
            raise _bad("keys", "must be an array")
        return cls(
            keys=tuple(Key.from_json(k) for k in keys),
            key_container_extension=_optional_object(obj.get("key_container_extension"), "key_container_extension"),
        )


@dataclass(frozen=True, slots=True)
class KeyIdEntry:
    """One element of `key_IDs` in §6.4 Key IDs."""

    key_ID: str
    key_ID_extension: JsonObject | None = None

    def to_json(self) -> dict[str, Any]:
        return _with_optional({"key_ID": self.key_ID}, key_ID_extension=self.key_ID_extension)

    @classmethod
    def from_json(cls, value: Any) -> KeyIdEntry:
        obj = _object(value, "key_IDs[]")
        return cls(
            key_ID=_string(_present(obj, "key_ID"), "key_ID"),
            key_ID_extension=_optional_object(obj.get("key_ID_extension"), "key_ID_extension"),
        )


@dataclass(frozen=True, slots=True)
class KeyIds:
    """§6.4 Key IDs: body of Get key with key IDs (§5.4); the GET form carries one key_ID."""

    key_IDs: tuple[KeyIdEntry, ...]
    key_IDs_extension: JsonObject | None = None

    def __post_init__(self) -> None:
        if not self.key_IDs:
            raise _bad("key_IDs", "must name at least one key")

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"key_IDs": [k.to_json() for k in self.key_IDs]}
        return _with_optional(out, key_IDs_extension=self.key_IDs_extension)

    @classmethod
    def from_json(cls, value: Any) -> KeyIds:
        obj = _object(value, "Key IDs")
        entries = obj.get("key_IDs")
        if not isinstance(entries, list):
            raise _bad("key_IDs", "must be an array")
        return cls(
            key_IDs=tuple(KeyIdEntry.from_json(e) for e in entries),
            key_IDs_extension=_optional_object(obj.get("key_IDs_extension"), "key_IDs_extension"),
        )


@dataclass(frozen=True, slots=True)
class Error:
    """§6.5 Error: body of every 400/401/503 answer."""

    message: str
    details: tuple[JsonObject, ...] | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"message": self.message}
        if self.details is not None:
            out["details"] = [dict(d) for d in self.details]
        return out

    @classmethod
    def from_json(cls, value: Any) -> Error:
        obj = _object(value, "Error")
        details = obj.get("details")
        return cls(
            message=_string(_present(obj, "message"), "message"),
            details=None if details is None else tuple(_object(d, "details[]") for d in _array(details, "details")),
        )


def check_mandatory_extensions(request: KeyRequest, supported: frozenset[str] = frozenset()) -> None:
    """Raise the §6.2 400 error if `request` asks for a mandatory extension not in `supported`."""
    unsupported = sorted({name for ext in request.extension_mandatory for name in ext} - supported)
    if unsupported:
        raise KmsError(400, MSG_EXTENSION_MANDATORY_UNSUPPORTED, ({"extension_mandatory_unsupported": unsupported},))


# --- the service the app fronts -----------------------------------------------------------
class KeyService(Protocol):
    """What the KME provides to the API. Raise `KmsError` to answer 400/401/503.

    `caller_sae` is the authenticated SAE id (TLS client certificate), never request data.
    """

    async def status(self, caller_sae: str, slave_sae: str) -> Status:
        """§5.2: caller is the master SAE asking about keys towards `slave_sae`."""
        ...

    async def enc_keys(self, caller_sae: str, slave_sae: str, request: KeyRequest) -> KeyContainer:
        """§5.3: caller (master SAE) obtains new keys shared with `slave_sae` (+ request.additional_slave_SAE_IDs)."""
        ...

    async def dec_keys(self, caller_sae: str, master_sae: str, key_ids: KeyIds) -> KeyContainer:
        """§5.4: caller (a slave SAE) obtains keys `master_sae` obtained; 401 if not issued to the caller."""
        ...


# --- identity -------------------------------------------------------------------------------
def tls_identity(scope: Scope) -> str | None:
    """Subject CommonName of the verified TLS client certificate, or None.

    Reads the ASGI TLS extension (`scope["extensions"]["tls"]`, asgiref spec) that the HTTPS
    shell (nodes/kms/https.py) fills in only after a handshake that verified the client
    certificate against the run CA. Exactly one non-empty CN is required.
    """
    tls = (scope.get("extensions") or {}).get("tls")
    if not isinstance(tls, Mapping) or tls.get("client_cert_error") is not None:
        return None
    chain = tls.get("client_cert_chain")
    if not chain:
        return None
    try:
        cert = x509.load_pem_x509_certificate(str(chain[0]).encode("ascii"))
        names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    except (ValueError, TypeError, IndexError, KeyError):
        return None
    if len(names) != 1 or not isinstance(names[0].value, str) or not names[0].value:
        return None
    return names[0].value


# --- the ASGI app -------------------------------------------------------------------------
def _error_response(status: int, message: str, details: Sequence[JsonObject] | None = None) -> Response:
    return JSONResponse(Error(message, tuple(details) if details is not None else None).to_json(), status)


def _format_error_response(exc: FormatError) -> Response:
    return _error_response(400, exc.message, exc.details)


def _ok(body: dict[str, Any]) -> Response:
    # Key containers hold key material: no cache may keep a copy (RFC 9111 §5.2.2.5).
    return JSONResponse(body, 200, headers={"Cache-Control": "no-store"})


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON (RFC 8259 §6)")


async def _read_json(request: Request) -> Any:
    chunks: list[bytes] = []
    total = 0
    async with aclosing(request.stream()) as stream:  # closed even when we stop early
        async for chunk in stream:
            total += len(chunk)
            if total > MAX_BODY_BYTES:
                raise _bad("body", f"larger than {MAX_BODY_BYTES} bytes")
            chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks), parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise _bad("body", f"not JSON: {exc.msg} at offset {exc.pos}") from None
    except (ValueError, RecursionError):  # bad UTF-8, NaN/Infinity, nesting deeper than the parser's stack
        raise _bad("body", "not JSON") from None


def _single_query(request: Request, name: str) -> str | None:
    values = request.query_params.getlist(name)
    if len(values) > 1:
        raise _bad(name, "given more than once")
    # An empty value counts as absent: common clients (httpx) render a None parameter as `name=`.
    return values[0] if values and values[0] != "" else None


def _query_integer(request: Request, name: str) -> int | None:
    text = _single_query(request, name)
    if text is None:
        return None
    if len(text) > _MAX_DIGITS or not _DECIMAL.fullmatch(text):
        raise _bad(name, "must be a decimal integer")
    return int(text)


def _wrong_method(request: Request, allowed: str) -> Response:
    return _error_response(400, MSG_BAD_REQUEST, ({"method": request.method, "error": f"use {allowed}"},))


async def _call_service(what: str, call: Callable[[], Awaitable[Any]], expected: type) -> Response:
    """Run one service call; its answer, its KmsError, or 503 for anything unexpected."""
    try:
        result = await call()
        if not isinstance(result, expected):
            raise TypeError(f"returned {type(result).__name__}, not {expected.__name__}")
        return _ok(result.to_json())  # rendering inside the try: a bad extension value is a service bug
    except KmsError as exc:
        return _error_response(exc.status, exc.message, exc.details)
    except FormatError as exc:
        return _format_error_response(exc)
    except Exception:
        log.exception("KeyService.%s failed", what)
        return _error_response(503, MSG_SERVER_ERROR)


class RequireIdentity:
    """ASGI wrapper: every HTTP request needs an identity (else `unauthorized()` answers it).

    The identity is stored in the scope for `caller_of`; shared with nodes/kms/skip.py.
    """

    def __init__(self, app: ASGIApp, identity: IdentityFn, unauthorized: Callable[[], Response]) -> None:
        self._app = app
        self._identity = identity
        self._unauthorized = unauthorized

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        try:
            caller = self._identity(scope)
        except Exception:
            log.exception("identity function failed")
            caller = None
        if not caller:
            await self._unauthorized()(scope, receive, send)
            return
        await self._app({**scope, _CALLER_SCOPE_KEY: caller}, receive, send)


def caller_of(request: Request) -> str:
    """The authenticated caller of a request that went through `RequireIdentity`."""
    return str(request.scope[_CALLER_SCOPE_KEY])


def etsi014_app(service: KeyService, *, identity: IdentityFn = tls_identity) -> ASGIApp:
    """The §5 API (Table 1) in front of `service`; `identity(scope)` names the caller (None -> 401)."""

    async def get_status(request: Request) -> Response:  # §5.2
        if request.method != "GET":
            return _wrong_method(request, "GET")
        caller, slave = caller_of(request), request.path_params["slave_SAE_ID"]
        return await _call_service("status", lambda: service.status(caller, slave), Status)

    async def get_key(request: Request) -> Response:  # §5.3
        try:
            if request.method == "POST":
                key_request = KeyRequest.from_json(await _read_json(request))
            elif request.method == "GET":
                number = _query_integer(request, "number")
                key_request = KeyRequest(number=1 if number is None else number, size=_query_integer(request, "size"))
            else:
                return _wrong_method(request, "GET or POST")
        except FormatError as exc:
            return _format_error_response(exc)
        caller, slave = caller_of(request), request.path_params["slave_SAE_ID"]
        return await _call_service("enc_keys", lambda: service.enc_keys(caller, slave, key_request), KeyContainer)

    async def get_key_with_ids(request: Request) -> Response:  # §5.4
        try:
            if request.method == "POST":
                key_ids = KeyIds.from_json(await _read_json(request))
            elif request.method == "GET":
                key_id = _single_query(request, "key_ID")
                if key_id is None:
                    raise _bad("key_ID", "is required")
                key_ids = KeyIds((KeyIdEntry(key_id),))
            else:
                return _wrong_method(request, "GET or POST")
        except FormatError as exc:
            return _format_error_response(exc)
        caller, master = caller_of(request), request.path_params["master_SAE_ID"]
        return await _call_service("dec_keys", lambda: service.dec_keys(caller, master, key_ids), KeyContainer)

    async def outside_the_api(request: Request, exc: Exception) -> Response:
        # Starlette raises HTTPException 404 (unknown path) or 405 (method not routed). Neither
        # is an API status code (Tables 4, 6, 8): answer 400 with an Error body.
        if isinstance(exc, HTTPException) and exc.status_code == 405:
            return _wrong_method(request, "GET or POST")
        return _error_response(400, MSG_BAD_REQUEST, ({"path": request.url.path, "error": "not an API endpoint"},))

    # Starlette adds HEAD to every GET route; each endpoint checks the method itself, so a
    # HEAD never reaches the service (a HEAD on enc_keys must not consume keys).
    app = Starlette(
        routes=[
            Route("/api/v1/keys/{slave_SAE_ID}/status", get_status, methods=["GET", "POST"]),
            Route("/api/v1/keys/{slave_SAE_ID}/enc_keys", get_key, methods=["GET", "POST"]),
            Route("/api/v1/keys/{master_SAE_ID}/dec_keys", get_key_with_ids, methods=["GET", "POST"]),
        ],
        exception_handlers={HTTPException: outside_the_api},
    )
    app.router.redirect_slashes = False  # a 307 is not an API status code either
    return RequireIdentity(
        app,
        identity,
        lambda: _error_response(401, MSG_UNAUTHORIZED, ({"error": "a verified client certificate naming the SAE is required"},)),
    )
