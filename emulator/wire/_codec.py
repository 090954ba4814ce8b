"""Message codec: frozen dataclasses <-> msgpack maps (docs/protocol.md §3).

Every message class is registered once under its type tag (`TYPE`). Decoding looks the
tag up in that closed table — never `eval`, never a class name taken off the wire — and
checks every field against the dataclass annotation with a converter built once at
registration. The supported field types are deliberately few:

    int, float, bool, str, bytes, X | None, list[T], tuple[str, int] (an address),
    dict[str, Any] (an opaque map, limited in size), a nested registered `Struct`,
    and numpy arrays (`I64Array`, `U8Array`, `F64Array`) carried as msgpack `bin`
    holding the little-endian packed array (DESIGN §4: bulk data never as lists).

Envelope: `{"v": 1, "t": <type>, "id": <int>, "re"?: <int>, ...fields}`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Mapping
from typing import Annotated, Any, ClassVar

import msgpack
import numpy as np

from ._errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from ._framing import DEFAULT_MAX_FRAME_BYTES, encode_frame

__all__ = [
    "PROTOCOL_VERSION",
    "SUPPORTED_VERSIONS",
    "Limits",
    "Message",
    "Struct",
    "Envelope",
    "I64Array",
    "U8Array",
    "F64Array",
    "Address",
    "register",
    "message_types",
    "encode",
    "encode_framed",
    "decode",
    "encode_datagram",
]

PROTOCOL_VERSION = 1
SUPPORTED_VERSIONS: tuple[int, ...] = (1,)


@dataclasses.dataclass(frozen=True, slots=True)
class Limits:
    """Decoder limits (DESIGN §12). Any excess is a `bad_frame`/`bad_field` error."""

    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
    max_array_items: int = 1 << 21  # elements in one packed array field
    max_list_items: int = 1 << 16  # elements of a list field / msgpack array
    max_str_bytes: int = 1 << 16
    max_map_items: int = 1 << 12


DEFAULT_LIMITS = Limits()


@dataclasses.dataclass(frozen=True, slots=True)
class _ArrayKind:
    dtype: str  # little-endian numpy dtype string


I64Array = Annotated[np.ndarray, _ArrayKind("<i8")]
U8Array = Annotated[np.ndarray, _ArrayKind("|u1")]
F64Array = Annotated[np.ndarray, _ArrayKind("<f8")]
Address = tuple[str, int]  # (host, port), a list of two items on the wire


class Struct:
    """Base of nested records (maps inside a message). Subclasses are frozen dataclasses."""

    __slots__ = ()


class Message:
    """Base of every top-level wire message. Subclasses set `TYPE` and are frozen dataclasses."""

    __slots__ = ()
    TYPE: ClassVar[str] = ""


@dataclasses.dataclass(frozen=True, slots=True)
class Envelope:
    """A decoded frame: the message plus its envelope fields."""

    message: Message
    id: int = 0
    re: int | None = None


_M = typing.TypeVar("_M", bound=type)

_Decoder = Callable[[Any, str, Limits], Any]
_Encoder = Callable[[Any], Any]

_ENVELOPE_KEYS = frozenset({"v", "t", "id", "re"})


@dataclasses.dataclass(frozen=True, slots=True)
class _Schema:
    cls: type
    fields: tuple[tuple[str, bool, _Decoder, _Encoder], ...]  # name, required, decode, encode


_REGISTRY: dict[str, _Schema] = {}
_STRUCTS: dict[type, _Schema] = {}


def _bad(field: str, why: str) -> RemoteProtocolError:
    return RemoteProtocolError(ErrorCode.BAD_FIELD, f"field {field!r}: {why}")


def _identity(value: Any) -> Any:
    return value


def _converter(tp: Any) -> tuple[_Decoder, _Encoder]:
    """Build (decode, encode) functions for an annotation; fail loudly on unsupported ones."""
    origin = typing.get_origin(tp)
    if origin is Annotated:
        base, *extras = typing.get_args(tp)
        kind = next(e for e in extras if isinstance(e, _ArrayKind))
        dtype = np.dtype(kind.dtype)

        def dec_array(v: Any, f: str, lim: Limits) -> np.ndarray:
            if not isinstance(v, bytes):
                raise _bad(f, f"expected bin (packed {dtype.str} array), got {type(v).__name__}")
            if len(v) % dtype.itemsize:
                raise _bad(f, f"{len(v)} bytes is not a whole number of {dtype.itemsize}-byte items")
            if len(v) // dtype.itemsize > lim.max_array_items:
                raise _bad(f, f"array longer than {lim.max_array_items} items")
            return np.frombuffer(v, dtype=dtype)

        def enc_array(v: Any) -> bytes:
            return np.ascontiguousarray(v, dtype=dtype).tobytes()

        return dec_array, enc_array
    if tp is bool:

        def dec_bool(v: Any, f: str, lim: Limits) -> bool:
            if not isinstance(v, bool):
                raise _bad(f, f"expected bool, got {type(v).__name__}")
            return v

        return dec_bool, _identity
    if tp is int:

        def dec_int(v: Any, f: str, lim: Limits) -> int:
            if isinstance(v, bool) or not isinstance(v, int):
                raise _bad(f, f"expected int, got {type(v).__name__}")
            return v

        return dec_int, int
    if tp is float:

        def dec_float(v: Any, f: str, lim: Limits) -> float:
            if isinstance(v, bool) or not isinstance(v, int | float):
                raise _bad(f, f"expected float, got {type(v).__name__}")
            return float(v)

        return dec_float, float
    if tp is str:

        def dec_str(v: Any, f: str, lim: Limits) -> str:
            if not isinstance(v, str):
                raise _bad(f, f"expected str, got {type(v).__name__}")
            if len(v) > lim.max_str_bytes:
                raise _bad(f, f"string longer than {lim.max_str_bytes}")
            return v

        return dec_str, _identity
    if tp is bytes:

        def dec_bytes(v: Any, f: str, lim: Limits) -> bytes:
            if not isinstance(v, bytes):
                raise _bad(f, f"expected bin, got {type(v).__name__}")
            return v

        return dec_bytes, bytes
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) != 1:
            raise TypeError(f"unsupported union {tp!r}")
        inner_dec, inner_enc = _converter(args[0])

        def dec_opt(v: Any, f: str, lim: Limits) -> Any:
            return None if v is None else inner_dec(v, f, lim)

        def enc_opt(v: Any) -> Any:
            return None if v is None else inner_enc(v)

        return dec_opt, enc_opt
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        item_dec, item_enc = _converter(item_tp)

        def dec_list(v: Any, f: str, lim: Limits) -> tuple[Any, ...]:
            if not isinstance(v, list | tuple):
                raise _bad(f, f"expected array, got {type(v).__name__}")
            if len(v) > lim.max_list_items:
                raise _bad(f, f"more than {lim.max_list_items} items")
            return tuple(item_dec(x, f"{f}[{i}]", lim) for i, x in enumerate(v))

        def enc_list(v: Any) -> list[Any]:
            return [item_enc(x) for x in v]

        return dec_list, enc_list
    if origin is tuple:
        item_types = typing.get_args(tp)
        convs = [_converter(t) for t in item_types]

        def dec_tuple(v: Any, f: str, lim: Limits) -> tuple[Any, ...]:
            if not isinstance(v, list | tuple) or len(v) != len(convs):
                raise _bad(f, f"expected an array of {len(convs)} items")
            return tuple(c[0](x, f"{f}[{i}]", lim) for i, (c, x) in enumerate(zip(convs, v, strict=True)))

        def enc_tuple(v: Any) -> list[Any]:
            return [c[1](x) for c, x in zip(convs, v, strict=True)]

        return dec_tuple, enc_tuple
    if origin is dict:

        def dec_map(v: Any, f: str, lim: Limits) -> dict[str, Any]:
            if not isinstance(v, dict):
                raise _bad(f, f"expected map, got {type(v).__name__}")
            if not all(isinstance(k, str) for k in v):
                raise _bad(f, "map keys must be strings")
            return v

        def enc_map(v: Any) -> dict[str, Any]:
            return dict(v)

        return dec_map, enc_map
    if isinstance(tp, type) and issubclass(tp, Struct):
        schema = _STRUCTS.get(tp) or _build_schema(tp)
        _STRUCTS[tp] = schema

        def dec_struct(v: Any, f: str, lim: Limits) -> Any:
            if not isinstance(v, dict):
                raise _bad(f, f"expected map, got {type(v).__name__}")
            return _decode_fields(schema, v, f + ".", lim, frozenset())

        def enc_struct(v: Any) -> dict[str, Any]:
            return _encode_fields(schema, v)

        return dec_struct, enc_struct
    raise TypeError(f"unsupported wire field type {tp!r}")


def _build_schema(cls: type) -> _Schema:
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls.__name__} must be a dataclass")
    hints = typing.get_type_hints(cls, include_extras=True)
    fields = []
    for fld in dataclasses.fields(cls):
        required = fld.default is dataclasses.MISSING and fld.default_factory is dataclasses.MISSING
        dec, enc = _converter(hints[fld.name])
        fields.append((fld.name, required, dec, enc))
    return _Schema(cls, tuple(fields))


def register(cls: _M) -> _M:
    """Class decorator: add a message class to the closed type table."""
    if not cls.TYPE or cls.TYPE in _REGISTRY:
        raise TypeError(f"message type {cls.TYPE!r} is empty or registered twice")
    _REGISTRY[cls.TYPE] = _build_schema(cls)
    return cls


def message_types() -> Mapping[str, type[Message]]:
    """The closed table of message types: tag -> class."""
    return {tag: schema.cls for tag, schema in _REGISTRY.items()}


def _decode_fields(
    schema: _Schema, raw: dict[str, Any], prefix: str, lim: Limits, skip: frozenset[str]
) -> Any:
    kwargs = {}
    known = set(skip)
    for name, required, dec, _ in schema.fields:
        known.add(name)
        if name in raw:
            kwargs[name] = dec(raw[name], prefix + name, lim)
        elif required:
            raise _bad(prefix + name, "missing")
    extra = [k for k in raw if k not in known]
    if extra:
        raise _bad(prefix + str(extra[0]), "unknown field")
    return schema.cls(**kwargs)


def _encode_fields(schema: _Schema, obj: Any) -> dict[str, Any]:
    return {name: enc(getattr(obj, name)) for name, _, _, enc in schema.fields}


def _to_map(message: Message, id: int, re: int | None) -> dict[str, Any]:
    schema = _REGISTRY.get(type(message).TYPE)
    if schema is None or schema.cls is not type(message):
        raise LocalProtocolError(ErrorCode.UNKNOWN_TYPE, f"{type(message).__name__} is not a registered message")
    try:
        body = _encode_fields(schema, message)
    except (TypeError, ValueError) as exc:
        raise LocalProtocolError(ErrorCode.BAD_FIELD, f"cannot encode {message.TYPE}: {exc}") from None
    out: dict[str, Any] = {"v": PROTOCOL_VERSION, "t": message.TYPE, "id": id}
    if re is not None:
        out["re"] = re
    out.update(body)
    return out


def encode(message: Message, *, id: int = 0, re: int | None = None) -> bytes:
    """Encode one message as a msgpack map (no length prefix)."""
    return msgpack.packb(_to_map(message, id, re), use_bin_type=True)


def encode_framed(
    message: Message, *, id: int = 0, re: int | None = None, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
) -> bytes:
    """Encode one message with its 4-byte length prefix (stream transports)."""
    return encode_frame(encode(message, id=id, re=re), max_frame_bytes=max_frame_bytes)


encode_datagram = encode  # UDP datagrams carry exactly one msgpack map, no prefix (§2)


def decode(payload: bytes, *, limits: Limits = DEFAULT_LIMITS) -> Envelope:
    """Decode one msgpack map into an `Envelope`; raise `RemoteProtocolError` on anything illegal."""
    try:
        raw = msgpack.unpackb(
            payload,
            raw=False,
            strict_map_key=True,
            max_bin_len=limits.max_frame_bytes,
            max_str_len=limits.max_str_bytes,
            max_array_len=limits.max_list_items,
            max_map_len=limits.max_map_items,
            max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise RemoteProtocolError(ErrorCode.BAD_FRAME, f"not a msgpack document ({type(exc).__name__})") from None
    if not isinstance(raw, dict):
        raise RemoteProtocolError(ErrorCode.BAD_FRAME, f"frame is a {type(raw).__name__}, not a map")
    version = raw.get("v")
    if version not in SUPPORTED_VERSIONS:
        raise RemoteProtocolError(ErrorCode.UNSUPPORTED_VERSION, f"envelope version {version!r} not supported")
    msg_id = raw.get("id", 0)
    if isinstance(msg_id, bool) or not isinstance(msg_id, int):
        raise _bad("id", "expected int")
    re = raw.get("re")
    if re is not None and (isinstance(re, bool) or not isinstance(re, int)):
        raise _bad("re", "expected int")
    tag = raw.get("t")
    if tag is None:
        raise _bad("t", "missing message type")
    schema = _REGISTRY.get(tag) if isinstance(tag, str) else None
    if schema is None:
        shown = tag if isinstance(tag, str) and len(tag) <= 40 else type(tag).__name__
        raise RemoteProtocolError(ErrorCode.UNKNOWN_TYPE, f"unknown message type {shown!r}")
    message = _decode_fields(schema, raw, "", limits, _ENVELOPE_KEYS)
    return Envelope(message, msg_id, re)
