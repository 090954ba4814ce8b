"""Message codec: frozen dataclasses <-> msgpack maps (docs/protocol.md §3).

Every message class is registered once under its type tag (`TYPE`). Decoding looks the
tag up in that closed table — never `eval`, never a class name taken off the wire — and
checks every field against the dataclass annotation with a converter built once at
registration. The supported field types are deliberately few:

    int, float, bool, str, bytes, X | None, list[T], tuple[str, int] (an address),
    dict[str, Any] (an opaque map, limited in size), a nested registered `Struct`,
    and numpy arrays (`I64Array`, `U64Array`, `U8Array`, `F64Array`) carried as msgpack `bin`
    holding the little-endian packed array (DESIGN §4: bulk data never as lists).

Envelope: `{"v": 1, "t": <type>, "id": <int>, "re"?: <int>, ...fields}`.

A field declared with `omit_if_none()` (an optional field added to version 1 after its
first text) is left out of the map when it is None, so a receiver written before the
field existed, which refuses unknown keys, still accepts every frame that does not use it.

Each field type has a pair of functions. The encoder *normalises* values that have one
obvious wire form (numpy scalars, tuples, sequences for packed arrays, safe dtype casts)
and otherwise passes the value through, then judges its own output: every leaf value
(int, float, str, packed array, opaque map, ...) goes through that field's decoder, and
containers (lists, addresses, structs) check their own shape and length as their
decoders would. So a message with a wrong type or value is never sent (the sender learns
of it from a `LocalProtocolError` naming the field, not from the peer), in the same
single pass that builds it — the encoder does not decode its whole output a second
time, which for a `circuit` of thousands of gates would double the cost of sending it.
Sizes are checked too when `encode` is given `Limits`. Decoding applies two tiers of limits: msgpack's own
parser gets generous hard limits (`_HARD_LIMIT_FACTOR` times the `Limits`, so a hostile
length header cannot make it pre-allocate much), and the field decoders apply the exact
`Limits` so that an excess is reported as `bad_field` naming the field.
"""

from __future__ import annotations

import dataclasses
import math
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
    "U64Array",
    "U8Array",
    "F64Array",
    "Address",
    "register",
    "message_types",
    "omit_if_none",
    "encode",
    "encode_framed",
    "decode",
    "encode_datagram",
]

PROTOCOL_VERSION = 1
SUPPORTED_VERSIONS: tuple[int, ...] = (1,)


@dataclasses.dataclass(frozen=True, slots=True)
class Limits:
    """Decoder limits (DESIGN §12; docs/protocol.md §3.5). An excess is `bad_field` naming
    the field, or `bad_frame` when it is over `_HARD_LIMIT_FACTOR` times the limit."""

    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES  # also bounds any bin value
    max_array_items: int = 1 << 21  # elements in one packed array field
    max_list_items: int = 1 << 16  # elements of a list field, or of an array inside an opaque map
    max_str_bytes: int = 1 << 16  # UTF-8 bytes of a str field, or of a string/key inside an opaque map
    max_map_items: int = 1 << 12  # entries of an opaque map and of each map nested in it
    max_depth: int = 32  # nesting of maps/arrays inside an opaque map field (the map is level 1)


DEFAULT_LIMITS = Limits()
_NO_SIZE_LIMITS = Limits(  # what `encode` checks when not given limits: types and ranges only
    max_frame_bytes=1 << 62, max_array_items=1 << 62, max_list_items=1 << 62, max_str_bytes=1 << 62,
    max_map_items=1 << 62,
)  # fmt: skip

# msgpack's parser rejects containers/strings above this multiple of the field limits
# (bad_frame); between 1x and this, the field decoder reports bad_field naming the field.
_HARD_LIMIT_FACTOR = 4
_INT64_MIN = -(1 << 63)
_INT64_MAX = (1 << 63) - 1
_UINT64_MAX = (1 << 64) - 1  # largest integer msgpack can carry (opaque maps only)
_SHOWN_NAME_CHARS = 40  # peer-supplied names are cut to this length in error messages


@dataclasses.dataclass(frozen=True, slots=True)
class _ArrayKind:
    dtype: str  # little-endian numpy dtype string


I64Array = Annotated[np.ndarray, _ArrayKind("<i8")]
U64Array = Annotated[np.ndarray, _ArrayKind("<u8")]
U8Array = Annotated[np.ndarray, _ArrayKind("|u1")]
F64Array = Annotated[np.ndarray, _ArrayKind("<f8")]
Address = tuple[str, int]  # (host, port), a list of two items on the wire


_OMIT_IF_NONE = "qnetem.wire.omit_if_none"


def omit_if_none() -> Any:
    """dataclasses.field for an optional field that is not sent when None (default None)."""
    return dataclasses.field(default=None, metadata={_OMIT_IF_NONE: True})


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
_Encoder = Callable[[Any, str, Limits], Any]  # (value, field path, limits) -> msgpack-native value

_ENVELOPE_KEYS = frozenset({"v", "t", "id", "re"})


@dataclasses.dataclass(frozen=True, slots=True)
class _Schema:
    cls: type
    fields: tuple[tuple[str, bool, _Decoder, _Encoder], ...]  # name, required, decode, encode
    names: frozenset[str]  # the field names, for the unknown-field check
    omit_if_none: frozenset[str] = frozenset()  # fields left out of the map when None


_REGISTRY: dict[str, _Schema] = {}
_STRUCTS: dict[type, _Schema] = {}


def _bad(field: str, why: str) -> RemoteProtocolError:
    return RemoteProtocolError(ErrorCode.BAD_FIELD, f"field {field!r}: {why}")


def _bad_local(field: str, why: str) -> LocalProtocolError:
    return LocalProtocolError(ErrorCode.BAD_FIELD, f"field {field!r}: {why}")


def _shown(name: Any) -> str:
    """A peer-supplied name, cut short so error messages stay small."""
    text = name if isinstance(name, str) else type(name).__name__
    return text if len(text) <= _SHOWN_NAME_CHARS else text[:_SHOWN_NAME_CHARS] + "..."


def _utf8_too_long(v: str, max_bytes: int) -> bool:
    """True if the UTF-8 form of `v` exceeds `max_bytes` (encodes only when it could)."""
    if len(v) > max_bytes:
        return True
    if 4 * len(v) <= max_bytes:  # a code point is at most 4 UTF-8 bytes
        return False
    return len(v.encode("utf-8", "surrogatepass")) > max_bytes


def _check_opaque(v: Any, f: str, lim: Limits, depth: int) -> None:
    """Validate the contents of an opaque map: msgpack-native values, string keys, limits.

    `depth` is the nesting level of `v` if it is a container (the field's map is level 1).
    """
    if depth > lim.max_depth and isinstance(v, dict | list):
        raise _bad(f, f"nested deeper than {lim.max_depth} levels")
    if v is None or isinstance(v, bool | float | bytes):
        return
    if isinstance(v, int):
        if not _INT64_MIN <= v <= _UINT64_MAX:
            raise _bad(f, "integer outside the msgpack range")
        return
    if isinstance(v, str):
        if _utf8_too_long(v, lim.max_str_bytes):
            raise _bad(f, f"string longer than {lim.max_str_bytes} bytes")
        return
    if isinstance(v, dict):
        if len(v) > lim.max_map_items:
            raise _bad(f, f"map of more than {lim.max_map_items} entries")
        for key, item in v.items():
            if not isinstance(key, str):
                raise _bad(f, "map keys must be strings")
            if _utf8_too_long(key, lim.max_str_bytes):
                raise _bad(f, f"map key longer than {lim.max_str_bytes} bytes")
            _check_opaque(item, f"{f}.{_shown(key)}", lim, depth + 1)
        return
    if isinstance(v, list):
        if len(v) > lim.max_list_items:
            raise _bad(f, f"more than {lim.max_list_items} items")
        for i, item in enumerate(v):
            _check_opaque(item, f"{f}[{i}]", lim, depth + 1)
        return
    raise _bad(f, f"unsupported value type {type(v).__name__}")


def _normalize_opaque(v: Any, f: str, lim: Limits, depth: int) -> Any:
    """Encoder side of an opaque map: numpy scalars -> Python, tuples -> lists, mappings -> dicts."""
    if depth > lim.max_depth and isinstance(v, Mapping | list | tuple):
        raise _bad_local(f, f"nested deeper than {lim.max_depth} levels")
    if v is None or isinstance(v, bool | int | float | str | bytes):
        return v
    if isinstance(v, np.bool_):
        return bool(v)
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, np.floating):
        return float(v)
    if isinstance(v, bytearray | memoryview):
        return bytes(v)
    if isinstance(v, Mapping):
        out = {}
        for key, item in v.items():
            if not isinstance(key, str):
                raise _bad_local(f, f"map keys must be strings, got {type(key).__name__}")
            out[key] = _normalize_opaque(item, f"{f}.{_shown(key)}", lim, depth + 1)
        return out
    if isinstance(v, list | tuple):
        return [_normalize_opaque(item, f"{f}[{i}]", lim, depth + 1) for i, item in enumerate(v)]
    raise _bad_local(f, f"unsupported value type {type(v).__name__} in an opaque map")


def _judged(normalise: _Encoder, dec: _Decoder) -> _Encoder:
    """Encoder of a leaf field: normalise the value, then judge the result with the
    field's own decoder, so that nothing a peer would refuse is sent. The decoder raises
    `RemoteProtocolError`; `encode` reports it as a `LocalProtocolError`."""

    def enc(v: Any, f: str, lim: Limits) -> Any:
        out = normalise(v, f, lim)
        dec(out, f, lim)
        return out

    return enc


def _converter(tp: Any) -> tuple[_Decoder, _Encoder]:
    """Build (decode, encode) functions for an annotation; fail loudly on unsupported ones.

    Leaf encoders are wrapped by `_judged`; container encoders check their own shape and
    size exactly as their decoders do and leave the items to the item encoders.
    """
    origin = typing.get_origin(tp)
    if origin is Annotated:
        base, *extras = typing.get_args(tp)
        kind = next(e for e in extras if isinstance(e, _ArrayKind))
        dtype = np.dtype(kind.dtype)
        int_info = np.iinfo(dtype) if dtype.kind in "iu" else None

        def dec_array(v: Any, f: str, lim: Limits) -> np.ndarray:
            if not isinstance(v, bytes):
                raise _bad(f, f"expected bin (packed {dtype.str} array), got {type(v).__name__}")
            if len(v) % dtype.itemsize:
                raise _bad(f, f"{len(v)} bytes is not a whole number of {dtype.itemsize}-byte items")
            if len(v) // dtype.itemsize > lim.max_array_items:
                raise _bad(f, f"array longer than {lim.max_array_items} items")
            arr = np.frombuffer(v, dtype=dtype)
            if dtype.kind == "f" and not np.isfinite(arr).all():
                raise _bad(f, "array holds a NaN or infinite value")
            return arr

        def enc_array(v: Any, f: str, lim: Limits) -> Any:
            if isinstance(v, bytes | bytearray | memoryview):  # already packed: let the decoder judge it
                return bytes(v)
            try:
                arr = np.asarray(v)
            except (TypeError, ValueError, OverflowError):
                raise _bad_local(f, f"cannot make a {dtype.str} array of it") from None
            if arr.ndim != 1:
                raise _bad_local(f, f"expected a 1-D array, got {arr.ndim}-D")
            if arr.size and arr.dtype != dtype:
                # Only value-preserving conversions: no wrap-around, no truncation of floats.
                if int_info is not None:
                    ok = arr.dtype.kind == "b" or (
                        arr.dtype.kind in "iu" and int_info.min <= arr.min() and arr.max() <= int_info.max
                    )
                else:
                    ok = arr.dtype.kind in "biuf"
                if not ok:
                    raise _bad_local(f, f"cannot pack {arr.dtype} values as {dtype.str} without loss")
            return np.ascontiguousarray(arr, dtype=dtype).tobytes()

        return dec_array, _judged(enc_array, dec_array)
    if tp is bool:

        def dec_bool(v: Any, f: str, lim: Limits) -> bool:
            if not isinstance(v, bool):
                raise _bad(f, f"expected bool, got {type(v).__name__}")
            return v

        def enc_bool(v: Any, f: str, lim: Limits) -> Any:
            return bool(v) if isinstance(v, np.bool_) else v

        return dec_bool, _judged(enc_bool, dec_bool)
    if tp is int:

        def dec_int(v: Any, f: str, lim: Limits) -> int:
            if isinstance(v, bool) or not isinstance(v, int):
                raise _bad(f, f"expected int, got {type(v).__name__}")
            if not _INT64_MIN <= v <= _INT64_MAX:
                raise _bad(f, "integer outside the signed 64-bit range")
            return v

        def enc_int(v: Any, f: str, lim: Limits) -> Any:
            return int(v) if isinstance(v, np.integer) else v

        return dec_int, _judged(enc_int, dec_int)
    if tp is float:

        def dec_float(v: Any, f: str, lim: Limits) -> float:
            if isinstance(v, bool) or not isinstance(v, int | float):
                raise _bad(f, f"expected float, got {type(v).__name__}")
            try:
                out = float(v)
            except OverflowError:  # msgpack integers always fit; kept for safety
                raise _bad(f, "integer too large for a float") from None
            if not math.isfinite(out):
                raise _bad(f, "NaN or infinite float")
            return out

        def enc_float(v: Any, f: str, lim: Limits) -> Any:
            if isinstance(v, np.integer | np.floating):
                return float(v)
            if isinstance(v, int) and not isinstance(v, bool):
                try:
                    return float(v)  # ints are sent as floats
                except OverflowError:
                    raise _bad_local(f, "integer too large for a float") from None
            return v

        return dec_float, _judged(enc_float, dec_float)
    if tp is str:

        def dec_str(v: Any, f: str, lim: Limits) -> str:
            if not isinstance(v, str):
                raise _bad(f, f"expected str, got {type(v).__name__}")
            if _utf8_too_long(v, lim.max_str_bytes):
                raise _bad(f, f"string longer than {lim.max_str_bytes} bytes")
            return v

        def enc_str(v: Any, f: str, lim: Limits) -> Any:
            if isinstance(v, str):
                try:
                    v.encode("utf-8")
                except UnicodeEncodeError:
                    raise _bad_local(f, "string is not encodable as UTF-8 (lone surrogate)") from None
            return v

        return dec_str, _judged(enc_str, dec_str)
    if tp is bytes:

        def dec_bytes(v: Any, f: str, lim: Limits) -> bytes:
            if not isinstance(v, bytes):
                raise _bad(f, f"expected bin, got {type(v).__name__}")
            return v

        def enc_bytes(v: Any, f: str, lim: Limits) -> Any:
            return bytes(v) if isinstance(v, bytearray | memoryview) else v

        return dec_bytes, _judged(enc_bytes, dec_bytes)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) != 1:
            raise TypeError(f"unsupported union {tp!r}")
        inner_dec, inner_enc = _converter(args[0])

        def dec_opt(v: Any, f: str, lim: Limits) -> Any:
            return None if v is None else inner_dec(v, f, lim)

        def enc_opt(v: Any, f: str, lim: Limits) -> Any:
            return None if v is None else inner_enc(v, f, lim)

        return dec_opt, enc_opt
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        item_dec, item_enc = _converter(item_tp)

        def dec_list(v: Any, f: str, lim: Limits) -> tuple[Any, ...]:
            if not isinstance(v, list | tuple):
                raise _bad(f, f"expected array, got {type(v).__name__}")
            if len(v) > lim.max_list_items:
                raise _bad(f, f"more than {lim.max_list_items} items")
            try:
                # Fast pass without a path string per item (a circuit has thousands of gates).
                return tuple([item_dec(x, f, lim) for x in v])
            except RemoteProtocolError:
                pass
            # Decoders are pure: run again with the item paths, so the error names the item.
            return tuple([item_dec(x, f"{f}[{i}]", lim) for i, x in enumerate(v)])

        def enc_list(v: Any, f: str, lim: Limits) -> Any:
            if isinstance(v, np.ndarray) and v.ndim == 1:
                v = v.tolist()
            if not isinstance(v, list | tuple):  # a str would otherwise become a list of characters
                raise _bad_local(f, f"expected a list, got {type(v).__name__}")
            if len(v) > lim.max_list_items:  # as dec_list
                raise _bad(f, f"more than {lim.max_list_items} items")
            try:  # fast pass, as in dec_list
                return [item_enc(x, f, lim) for x in v]
            except (LocalProtocolError, RemoteProtocolError):
                pass
            return [item_enc(x, f"{f}[{i}]", lim) for i, x in enumerate(v)]

        return dec_list, enc_list
    if origin is tuple:
        item_types = typing.get_args(tp)
        convs = [_converter(t) for t in item_types]

        def dec_tuple(v: Any, f: str, lim: Limits) -> tuple[Any, ...]:
            if not isinstance(v, list | tuple) or len(v) != len(convs):
                raise _bad(f, f"expected an array of {len(convs)} items")
            return tuple(c[0](x, f"{f}[{i}]", lim) for i, (c, x) in enumerate(zip(convs, v, strict=True)))

        def enc_tuple(v: Any, f: str, lim: Limits) -> Any:
            if not isinstance(v, list | tuple) or len(v) != len(convs):
                raise _bad_local(f, f"expected a tuple of {len(convs)} items")
            return [c[1](x, f"{f}[{i}]", lim) for i, (c, x) in enumerate(zip(convs, v, strict=True))]

        return dec_tuple, enc_tuple
    if origin is dict:

        def dec_map(v: Any, f: str, lim: Limits) -> dict[str, Any]:
            if not isinstance(v, dict):
                raise _bad(f, f"expected map, got {type(v).__name__}")
            _check_opaque(v, f, lim, 1)
            return v

        def enc_map(v: Any, f: str, lim: Limits) -> Any:
            if not isinstance(v, Mapping):
                raise _bad_local(f, f"expected a mapping, got {type(v).__name__}")
            return _normalize_opaque(v, f, lim, 1)

        return dec_map, _judged(enc_map, dec_map)
    if isinstance(tp, type) and issubclass(tp, Struct):
        schema = _STRUCTS.get(tp) or _build_schema(tp)
        _STRUCTS[tp] = schema

        def dec_struct(v: Any, f: str, lim: Limits) -> Any:
            if not isinstance(v, dict):
                raise _bad(f, f"expected map, got {type(v).__name__}")
            return _decode_fields(schema, v, f + ".", lim, frozenset())

        def enc_struct(v: Any, f: str, lim: Limits) -> dict[str, Any]:
            if not isinstance(v, tp):
                raise _bad_local(f, f"expected {tp.__name__}, got {type(v).__name__}")
            return _encode_fields(schema, v, f + ".", lim)

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
    omit = frozenset(f.name for f in dataclasses.fields(cls) if f.metadata.get(_OMIT_IF_NONE))
    return _Schema(cls, tuple(fields), frozenset(name for name, *_ in fields), omit)


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
    for name, required, dec, _ in schema.fields:
        if name in raw:
            kwargs[name] = dec(raw[name], prefix + name, lim)
        elif required:
            raise _bad(prefix + name, "missing")
    extra = raw.keys() - schema.names  # set arithmetic: this runs once per gate of a circuit
    if extra and not extra <= skip:
        first = next(k for k in raw if k not in schema.names and k not in skip)  # in frame order
        raise _bad(prefix + _shown(first), "unknown field")
    return schema.cls(**kwargs)


def _encode_fields(schema: _Schema, obj: Any, prefix: str, lim: Limits) -> dict[str, Any]:
    out = {}
    omit = schema.omit_if_none
    for name, _, _, enc in schema.fields:
        value = getattr(obj, name)
        if omit and value is None and name in omit:
            continue
        try:
            out[name] = enc(value, prefix + name, lim)
        except (TypeError, ValueError, OverflowError) as exc:  # numpy conversions of odd objects
            raise _bad_local(prefix + name, f"cannot encode ({type(exc).__name__})") from None
    return out


def _to_map(message: Message, id: int, re: int | None, limits: Limits | None) -> dict[str, Any]:
    schema = _REGISTRY.get(type(message).TYPE)
    if schema is None or schema.cls is not type(message):
        raise LocalProtocolError(ErrorCode.UNKNOWN_TYPE, f"{type(message).__name__} is not a registered message")
    if isinstance(id, bool) or not isinstance(id, int) or not 0 <= id <= _INT64_MAX:
        raise _bad_local("id", "must be an int in [0, 2**63 - 1]")
    # `re` echoes the peer's id; an error about a frame with an out-of-range id may have to
    # echo it as it came, so any msgpack integer is sent (the peer's decoder judges it).
    if re is not None and (isinstance(re, bool) or not isinstance(re, int) or not _INT64_MIN <= re <= _UINT64_MAX):
        raise _bad_local("re", "must be an int")
    limits = _NO_SIZE_LIMITS if limits is None else limits
    try:  # send only what a peer with these limits would accept (the field encoders judge it)
        body = _encode_fields(schema, message, "", limits)
    except RemoteProtocolError as exc:
        raise LocalProtocolError(exc.code, f"cannot encode {message.TYPE}: {exc.message}") from None
    out: dict[str, Any] = {"v": PROTOCOL_VERSION, "t": message.TYPE, "id": id}
    if re is not None:
        out["re"] = re
    out.update(body)
    return out


def encode(message: Message, *, id: int = 0, re: int | None = None, limits: Limits | None = None) -> bytes:
    """Encode one message as a msgpack map (no length prefix).

    Raises `LocalProtocolError` naming the field if a value has the wrong type or range,
    or an array cannot be packed without loss — anything a peer's decoder would refuse
    whatever its limits. Sizes are checked against `limits` only when given (then the
    message is sent only if a peer with those limits accepts it); without them an
    over-size value reaches the peer, which answers `bad_field`, so that text echoed
    from a peer (say, in an error message) can never make our own encoder raise.
    """
    try:
        return msgpack.packb(_to_map(message, id, re, limits), use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:  # unreachable after validation; kept typed
        raise LocalProtocolError(ErrorCode.BAD_FIELD, f"cannot pack {message.TYPE}: {type(exc).__name__}") from None


def encode_framed(
    message: Message,
    *,
    id: int = 0,
    re: int | None = None,
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
    limits: Limits | None = None,
) -> bytes:
    """Encode one message with its 4-byte length prefix (stream transports)."""
    return encode_frame(encode(message, id=id, re=re, limits=limits), max_frame_bytes=max_frame_bytes)


encode_datagram = encode  # UDP datagrams carry exactly one msgpack map, no prefix (§2)


class _DuplicateKey(ValueError):
    pass


def _pairs_to_dict(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
    # A map with a repeated key is malformed (docs/protocol.md §3): otherwise two parsers
    # could disagree on which value counts, e.g. for `token`.
    out = dict(pairs)
    if len(out) != len(pairs):
        raise _DuplicateKey
    return out


def decode(payload: bytes, *, limits: Limits = DEFAULT_LIMITS) -> Envelope:
    """Decode one msgpack map into an `Envelope`; raise `RemoteProtocolError` on anything illegal."""
    try:
        raw = msgpack.unpackb(
            payload,
            raw=False,
            strict_map_key=True,
            object_pairs_hook=_pairs_to_dict,
            max_bin_len=limits.max_frame_bytes,
            max_str_len=_HARD_LIMIT_FACTOR * limits.max_str_bytes,
            max_array_len=_HARD_LIMIT_FACTOR * limits.max_list_items,
            max_map_len=_HARD_LIMIT_FACTOR * limits.max_map_items,
            max_ext_len=0,
        )
    except _DuplicateKey:
        raise RemoteProtocolError(ErrorCode.BAD_FRAME, "a map has a duplicate key") from None
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise RemoteProtocolError(ErrorCode.BAD_FRAME, f"not a msgpack document ({type(exc).__name__})") from None
    if not isinstance(raw, dict):
        raise RemoteProtocolError(ErrorCode.BAD_FRAME, f"frame is a {type(raw).__name__}, not a map")
    version = raw.get("v")
    if isinstance(version, bool) or not isinstance(version, int):  # True == 1 and 1.0 == 1 in Python
        raise _bad("v", "missing or not an integer")
    if version not in SUPPORTED_VERSIONS:
        raise RemoteProtocolError(ErrorCode.UNSUPPORTED_VERSION, f"envelope version {version} not supported")
    msg_id = raw.get("id", 0)
    if isinstance(msg_id, bool) or not isinstance(msg_id, int) or not 0 <= msg_id <= _INT64_MAX:
        raise _bad("id", "expected an int in [0, 2**63 - 1]")
    re = raw.get("re")
    # `re` is only a correlation key: any integer is accepted, one matching no request of
    # ours is simply unmatched (errors may echo a peer's out-of-range id as it came).
    if re is not None and (isinstance(re, bool) or not isinstance(re, int)):
        raise _bad("re", "expected int")
    tag = raw.get("t")
    if tag is None:
        raise _bad("t", "missing message type")
    schema = _REGISTRY.get(tag) if isinstance(tag, str) else None
    if schema is None:
        raise RemoteProtocolError(ErrorCode.UNKNOWN_TYPE, f"unknown message type {_shown(tag)!r}")
    message = _decode_fields(schema, raw, "", limits, _ENVELOPE_KEYS)
    return Envelope(message, msg_id, re)
