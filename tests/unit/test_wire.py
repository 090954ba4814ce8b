"""Tests of emulator.wire: codec round trips, framing, every decode error, encode checks, fuzz.

Instances of every message type are built automatically from the dataclass annotations
(`_sample`), in three variants (typical, minimal, extreme values), so a message added to
`_messages.py` is covered without editing this file. Handwritten messages cover the
shapes that matter most. Known-answer frames live in tests/data/wire_vectors.json: an
accidental change of the bytes on the wire fails `test_known_answer_vectors`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import struct
import types
import typing
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import emulator.wire as wire
from emulator.wire import (
    QkdLinkInfo,
    DEFAULT_MAX_FRAME_BYTES,
    GATE_ARITY,
    PROTOCOL_VERSION,
    SUPPORTED_VERSIONS,
    Address,
    AdminHello,
    Allocated,
    AppMsg,
    Circuit,
    EprDelivered,
    Error,
    ErrorCode,
    F64Array,
    FrameDecoder,
    Gate,
    GateOp,
    Hello,
    I64Array,
    LinkHello,
    LinkInfo,
    Limits,
    LocalProtocolError,
    Measure,
    Message,
    NodeStatus,
    Ok,
    Pong,
    Probe,
    RemoteProtocolError,
    Stats,
    StatusReply,
    Struct,
    U8Array,
    U64Array,
    Unitary,
    Welcome,
    decode,
    encode,
    encode_datagram,
    encode_frame,
    encode_framed,
    message_types,
)

VECTORS_PATH = Path(__file__).resolve().parents[1] / "data" / "wire_vectors.json"
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
TYPES = message_types()
ARRAY_DTYPES = {
    "I64Array": np.dtype("<i8"), "U64Array": np.dtype("<u8"), "U8Array": np.dtype("u1"), "F64Array": np.dtype("<f8"),
}  # fmt: skip

# ============================================================================ helpers


def _kind(tp: Any) -> str:
    """A short name for a field annotation: int, float, bool, str, bytes, I64Array, ...,
    list, address, map, struct, optional."""
    for name, alias in (
        ("I64Array", I64Array), ("U64Array", U64Array), ("U8Array", U8Array), ("F64Array", F64Array),
        ("address", Address),
    ):  # fmt: skip
        if tp == alias:
            return name
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return "optional"
    if origin is list:
        return "list"
    if origin is dict:
        return "map"
    if isinstance(tp, type) and issubclass(tp, Struct):
        return "struct"
    return {int: "int", float: "float", bool: "bool", str: "str", bytes: "bytes"}[tp]


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, include_extras=True)


def _sample(tp: Any, variant: str) -> Any:
    """A valid value of a field annotation. Variants: typical, minimal, extreme."""
    kind = _kind(tp)
    if kind in ARRAY_DTYPES:
        dtype = ARRAY_DTYPES[kind]
        values = {
            "I64Array": {"typical": [1, 2, 3], "extreme": [INT64_MIN, -1, 0, INT64_MAX]},
            "U64Array": {"typical": [1, 2, 3], "extreme": [0, INT64_MAX, (1 << 64) - 1]},
            "U8Array": {"typical": [0, 1, 2], "extreme": [0, 255, 128]},
            "F64Array": {"typical": [0.25, 1.5], "extreme": [-1.7976931348623157e308, 5e-324, -0.0]},
        }[kind]
        return np.array(values.get(variant, []), dtype=dtype)
    if kind == "int":
        return {"typical": 7, "minimal": 0, "extreme": INT64_MIN}[variant]
    if kind == "float":
        return {"typical": 1.25, "minimal": 0.0, "extreme": 1.7976931348623157e308}[variant]
    if kind == "bool":
        return variant != "minimal"
    if kind == "str":
        return {"typical": "alice", "minimal": "", "extreme": "ünïcødé ✓ 量子 \x00 𝔮"}[variant]
    if kind == "bytes":
        return {"typical": b"\x00\x01\xff", "minimal": b"", "extreme": bytes(range(256))}[variant]
    if kind == "address":
        return {"typical": ("127.0.0.1", 7000), "minimal": ("", 0), "extreme": ("::1", 65535)}[variant]
    if kind == "map":
        return {
            "typical": {"a": 1, "b": [1.5, "x", None, True, b"\x01"], "c": {"d": {}}},
            "minimal": {},
            "extreme": {"big": (1 << 64) - 1, "neg": INT64_MIN, "nan": math.nan, "deep": {"x": [[{"y": []}]]}},
        }[variant]
    if kind == "list":
        (item,) = typing.get_args(tp)
        return [] if variant == "minimal" else [_sample(item, variant), _sample(item, "typical")]
    if kind == "optional":
        (inner,) = [a for a in typing.get_args(tp) if a is not type(None)]
        return None if variant == "minimal" else _sample(inner, variant)
    if kind == "struct":
        return _instance(tp, variant)
    raise AssertionError(tp)


def _instance(cls: type, variant: str) -> Any:
    hints = _hints(cls)
    return cls(**{f.name: _sample(hints[f.name], variant) for f in dataclasses.fields(cls)})


VARIANTS = ("typical", "minimal", "extreme")
AUTO = [pytest.param(cls, v, id=f"{tag}-{v}") for tag, cls in sorted(TYPES.items()) for v in VARIANTS]


def _same(a: Any, b: Any) -> bool:
    """Wire equality: arrays by dtype and content, lists and tuples alike, NaN equal to NaN."""
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        a, b = np.asarray(a), np.asarray(b)
        return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b, equal_nan=a.dtype.kind == "f")
    if dataclasses.is_dataclass(a) and not isinstance(a, type):
        return type(a) is type(b) and all(
            _same(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a)
        )
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and a == b


def _raw(message: Message, **env: Any) -> dict[str, Any]:
    """The msgpack map of a message, as a mutable dict (to break it)."""
    return msgpack.unpackb(encode(message, **env), raw=False)


def _pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def _remote_error(payload: bytes, limits: Limits | None = None) -> RemoteProtocolError:
    with pytest.raises(RemoteProtocolError) as info:
        decode(payload) if limits is None else decode(payload, limits=limits)
    return info.value


def _local_error(message: Message, **kw: Any) -> LocalProtocolError:
    with pytest.raises(LocalProtocolError) as info:
        encode(message, **kw)
    return info.value


def _hello(**overrides: Any) -> Hello:
    fields = dict(
        node="alice", token="k7Jd2xQ9pLm4", versions=[1], capabilities=["epr"],
        tcp=("127.0.0.1", 7101), udp=("127.0.0.1", 7102), control=("127.0.0.1", 7103),
    )  # fmt: skip
    fields.update(overrides)
    return Hello(**fields)


# ============================================================================ the message table


def test_message_table_is_closed_and_consistent() -> None:
    assert len(TYPES) >= 41
    for tag, cls in TYPES.items():
        assert cls.TYPE == tag and issubclass(cls, Message)
        params = cls.__dataclass_params__  # type: ignore[attr-defined]
        assert params.frozen, f"{tag} must be frozen"
        assert "__slots__" in cls.__dict__, f"{tag} must be slotted"
        assert not set(f.name for f in dataclasses.fields(cls)) & {"v", "t", "id", "re"}, f"{tag} uses an envelope key"
    assert PROTOCOL_VERSION in SUPPORTED_VERSIONS


def test_message_types_is_a_copy() -> None:
    table = message_types()
    table["evil"] = Ok  # type: ignore[index]
    assert "evil" not in message_types()
    assert _remote_error(_pack({"v": 1, "t": "evil"})).code is ErrorCode.UNKNOWN_TYPE


def test_gate_arity_matches_the_kernel_gates() -> None:
    from emulator.kernels._types import GATES

    for name, (qubits, params) in GATE_ARITY.items():
        if params:
            assert name in ("rx", "ry", "rz") and qubits == 1
        else:
            assert GATES[name.upper()].shape == (2**qubits, 2**qubits), name


# ============================================================================ round trips


@pytest.mark.parametrize(("cls", "variant"), AUTO)
def test_round_trip_every_type(cls: type, variant: str) -> None:
    message = _instance(cls, variant)
    data = encode(message, id=INT64_MAX if variant == "extreme" else 5, re=None if variant == "minimal" else 9)
    env = decode(data)
    assert type(env.message) is cls
    assert _same(env.message, message)
    assert env.id == (INT64_MAX if variant == "extreme" else 5)
    assert env.re == (None if variant == "minimal" else 9)
    # Decoding then encoding again gives the same bytes (the encoding is canonical).
    assert encode(env.message, id=env.id, re=env.re) == data
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        value = getattr(env.message, f.name)
        if _kind(hints[f.name]) in ARRAY_DTYPES:
            assert value.dtype == ARRAY_DTYPES[_kind(hints[f.name])] and value.ndim == 1


@pytest.mark.parametrize("cls", [pytest.param(c, id=t) for t, c in sorted(TYPES.items())])
def test_optional_fields_may_be_omitted(cls: type) -> None:
    raw = _raw(_instance(cls, "typical"))
    defaults = {f.name: f for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}
    for name in defaults:
        del raw[name]
    message = decode(_pack(raw)).message
    for name, f in defaults.items():
        assert _same(getattr(message, name), f.default)


def test_handwritten_round_trips() -> None:
    messages: list[Message] = [
        _hello(),
        _hello(control=None, capabilities=[], versions=[3, 2, 1]),
        Welcome(version=1, node="alice", now_s=0.125, time_scale=10.0, seed=2**63 - 1, memory_qubits=8,
                links=[LinkInfo("bob", 20.0, 0.2, 1e-6, 0.01, True), LinkInfo("carol", 0.0, 0.0, 0.0, 1.0, False)]),
        Circuit(ops=[GateOp("h", [0]), GateOp("cnot", [0, 1]), GateOp("rz", [1], [math.pi / 3])]),
        Gate(op=GateOp("ry", [4], [-0.5])),
        Unitary(qubits=[1, 2], matrix=np.eye(4, dtype="<c16").tobytes()),
        Measure(qubits=np.arange(1000, dtype=np.int64), bases=np.zeros(1, np.uint8), free=True),
        EprDelivered(request=3, initiator="alice", peer="bob", pair_ids=np.arange(5), qubits=np.arange(10, 15),
                     bell=np.array([0, 1, 2, 3, 0], np.uint8), herald_s=np.linspace(0.0, 1.0, 5)),
        StatusReply(now_s=1.0, nodes=[NodeStatus("alice", True, ("127.0.0.1", 1), ("127.0.0.1", 2), ("127.0.0.1", 3)),
                                      NodeStatus("bob", False)]),
        Stats(now_s=2.0, stats={"links": {"alice-bob": {"pairs": 10, "fidelity": [0.9, 0.95]}}, "raw": b"\x00"}),
        AppMsg(app="kc-1", body={"bits": np.packbits(np.ones(64, bool)).tobytes(), "n": 64}),
        Error.of(ErrorCode.UNKNOWN_QUBIT, "qubit 42 does not exist"),
        Ok(),
    ]  # fmt: skip
    for message in messages:
        env = decode(encode(message, id=1))
        assert _same(env.message, message), message.TYPE


def test_encoder_normalises_harmless_python_and_numpy_values() -> None:
    # numpy scalars, tuples, lists for packed arrays, ints for floats, bytearray for bin.
    welcome = Welcome(version=np.int32(1), node="a", now_s=3, time_scale=np.float32(2.0), seed=np.uint8(7),
                      memory_qubits=np.int64(4), links=(LinkInfo("b", np.int16(5), 0.2, 0, 0.0, np.bool_(True)),))
    env = decode(encode(welcome))
    assert env.message.now_s == 3.0 and isinstance(env.message.now_s, float)
    assert env.message.links[0].entanglement is True and env.message.links[0].length_km == 5.0
    measure = decode(encode(Measure(qubits=[1, 2], bases=(0,)))).message
    assert measure.qubits.dtype == np.dtype("<i8") and list(measure.qubits) == [1, 2]
    big_endian = np.array([1, 2], dtype=">i8")  # converted, not reinterpreted
    assert list(decode(encode(Allocated(qubits=big_endian))).message.qubits) == [1, 2]
    bools = np.array([True, False])
    assert list(decode(encode(Measure(qubits=[1, 2], bases=bools))).message.bases) == [1, 0]
    assert decode(encode(Unitary(qubits=np.array([3]), matrix=bytearray(b"\x00" * 64)))).message.matrix == bytes(64)
    stats = Stats(now_s=0.0, stats={"n": np.int64(3), "x": np.float32(0.5), "ok": np.bool_(True), "t": (1, 2)})
    assert decode(encode(stats)).message.stats == {"n": 3, "x": 0.5, "ok": True, "t": [1, 2]}


def test_decoded_arrays_are_read_only_views() -> None:
    qubits = decode(encode(Allocated(qubits=[1, 2]))).message.qubits
    with pytest.raises(ValueError):
        qubits[0] = 5


def test_datagram_and_framed_encodings() -> None:
    probe = Probe(node="alice", seq=3, sent_s=1.5)
    assert encode_datagram(probe, id=2) == encode(probe, id=2)
    framed = encode_framed(probe, id=2)
    assert framed[:4] == struct.pack(">I", len(framed) - 4) and framed[4:] == encode(probe, id=2)


def test_any_msgpack_width_and_key_order_is_accepted() -> None:
    # A peer in another language may use wider formats than the reference encoder (§3.3).
    payload = (
        b"\x84"
        + b"\xd9\x05now_s" + b"\xca" + struct.pack(">f", 12.5)  # str8 key, float32 value
        + b"\xa2id" + b"\xd3" + struct.pack(">q", 9)  # int64
        + b"\xa1t" + b"\xdb" + struct.pack(">I", 4) + b"pong"  # str32
        + b"\xa1v" + b"\xcf" + struct.pack(">Q", 1)  # uint64
    )  # fmt: skip
    env = decode(payload)
    assert env.message == Pong(now_s=12.5) and env.id == 9 and env.re is None
    assert decode(_pack({"v": 1, "t": "pong", "now_s": 3})).message.now_s == 3.0  # int for a float


def test_missing_id_means_zero() -> None:
    assert decode(_pack({"v": 1, "t": "ok"})).id == 0
    assert decode(_pack({"v": 1, "t": "ok", "re": None})).re is None


# ============================================================================ known-answer vectors


def _vector_messages() -> dict[str, tuple[Message, int, int | None]]:
    return {
        "hello": (_hello(), 1, None),
        "welcome": (
            Welcome(version=1, node="alice", now_s=0.125, time_scale=1.0, seed=1234567, memory_qubits=8,
                    links=[LinkInfo("bob", 20.0, 0.2, 0.0, 0.0, True)]),
            0, 1,
        ),
        "epr_delivered": (
            EprDelivered(request=1, initiator="alice", peer="bob", pair_ids=np.array([1, 2]),
                         qubits=np.array([1, 2]), bell=np.array([0, 3], np.uint8),
                         herald_s=np.array([0.2002, 0.20035])),
            0, None,
        ),
        "circuit": (Circuit(ops=[GateOp("h", [5]), GateOp("cnot", [5, 6]), GateOp("rx", [6], [0.5])]), 6, None),
        "error": (Error.of(ErrorCode.UNAUTHORIZED, "bad token"), 0, 1),
    }  # fmt: skip


def test_known_answer_vectors() -> None:
    vectors = json.loads(VECTORS_PATH.read_text(encoding="utf-8"))["vectors"]
    built = _vector_messages()
    assert {v["name"] for v in vectors} == set(built)
    for vector in vectors:
        message, id_, re_ = built[vector["name"]]
        assert (vector["id"], vector["re"]) == (id_, re_)
        frame = bytes.fromhex(vector["frame_hex"])
        assert encode_framed(message, id=id_, re=re_).hex() == vector["frame_hex"], (
            f"the wire encoding of {vector['name']!r} changed: if deliberate, bump the protocol "
            "version or regenerate tests/data/wire_vectors.json and docs/protocol.md §9"
        )
        decoder = FrameDecoder()
        decoder.feed(frame)
        env = decode(decoder.next_frame())
        assert _same(env.message, message) and (env.id, env.re) == (id_, re_)


# ============================================================================ framing


def _stream(*messages: Message) -> tuple[bytes, list[bytes]]:
    payloads = [encode(m, id=i) for i, m in enumerate(messages)]
    return b"".join(encode_frame(p) for p in payloads), payloads


def _drain(decoder: FrameDecoder) -> list[bytes]:
    out = []
    while (payload := decoder.next_frame()) is not None:
        out.append(payload)
    return out


def test_frames_split_at_every_byte_boundary() -> None:
    data, payloads = _stream(_hello(), Ok(), Pong(now_s=1.0))
    for cut in range(len(data) + 1):
        decoder = FrameDecoder()
        decoder.feed(data[:cut])
        got = _drain(decoder)
        decoder.feed(data[cut:])
        got += _drain(decoder)
        assert got == payloads, f"cut at {cut}"
        assert decoder.buffered_bytes == 0


def test_frames_fed_one_byte_at_a_time() -> None:
    data, payloads = _stream(Ok(), _hello(), Ok())
    decoder = FrameDecoder()
    got = []
    for i in range(len(data)):
        decoder.feed(data[i : i + 1])
        got += _drain(decoder)
    assert got == payloads


def test_several_frames_in_one_chunk() -> None:
    data, payloads = _stream(*[Pong(now_s=float(i)) for i in range(50)])
    decoder = FrameDecoder()
    decoder.feed(data)
    assert _drain(decoder) == payloads
    assert [decode(p).message.now_s for p in payloads] == [float(i) for i in range(50)]


def test_truncated_frame_waits_for_more() -> None:
    frame = encode_framed(_hello())
    decoder = FrameDecoder()
    decoder.feed(frame[:2])  # half a header
    assert decoder.next_frame() is None and decoder.buffered_bytes == 2
    decoder.feed(frame[2:-1])  # all but the last byte
    assert decoder.next_frame() is None and decoder.buffered_bytes == len(frame) - 1
    decoder.feed(frame[-1:])
    assert decoder.next_frame() == frame[4:]
    assert decoder.next_frame() is None


def test_empty_frame_is_a_bad_frame() -> None:
    decoder = FrameDecoder()
    decoder.feed(b"\x00\x00\x00\x00")
    assert decoder.next_frame() == b""
    assert _remote_error(b"").code is ErrorCode.BAD_FRAME


def test_frame_at_the_limit_is_accepted_and_one_byte_more_is_not() -> None:
    limit = 64
    decoder = FrameDecoder(max_frame_bytes=limit)
    decoder.feed(struct.pack(">I", limit) + b"x" * limit)
    assert decoder.next_frame() == b"x" * limit
    decoder.feed(struct.pack(">I", limit + 1))  # the header alone is enough to refuse
    with pytest.raises(RemoteProtocolError) as info:
        decoder.next_frame()
    assert info.value.code is ErrorCode.FRAME_TOO_LARGE
    assert str(limit + 1) in info.value.message


def test_oversize_length_poisons_the_decoder() -> None:
    decoder = FrameDecoder()
    good = encode_framed(Ok())
    decoder.feed(good + struct.pack(">I", DEFAULT_MAX_FRAME_BYTES + 1) + b"junk")
    assert decoder.next_frame() == good[4:]
    with pytest.raises(RemoteProtocolError) as info:
        decoder.next_frame()
    assert info.value.code is ErrorCode.FRAME_TOO_LARGE
    # The stream position is lost: the decoder refuses further use and hoards nothing.
    decoder.feed(good * 100)
    assert decoder.buffered_bytes == 0
    for _ in range(2):
        with pytest.raises(RemoteProtocolError):
            decoder.next_frame()


def test_max_uint32_length_is_refused() -> None:
    decoder = FrameDecoder()
    decoder.feed(b"\xff\xff\xff\xff")
    with pytest.raises(RemoteProtocolError) as info:
        decoder.next_frame()
    assert info.value.code is ErrorCode.FRAME_TOO_LARGE


def test_encode_refuses_frames_the_peer_would_reject() -> None:
    with pytest.raises(LocalProtocolError) as info:
        encode_frame(b"x" * 65, max_frame_bytes=64)
    assert info.value.code is ErrorCode.FRAME_TOO_LARGE
    assert encode_frame(b"x" * 64, max_frame_bytes=64)[:4] == b"\x00\x00\x00\x40"
    with pytest.raises(LocalProtocolError) as info:
        encode_framed(Unitary(qubits=[1], matrix=b"\x00" * 100), max_frame_bytes=64)
    assert info.value.code is ErrorCode.FRAME_TOO_LARGE


# ============================================================================ decode errors

HELLO_RAW = _raw(_hello(), id=1)


def _with(base: dict[str, Any], **changes: Any) -> dict[str, Any]:
    out = dict(base)
    for key, value in changes.items():
        if value is _DELETE:
            out.pop(key, None)
        else:
            out[key] = value
    return out


_DELETE = object()


@pytest.mark.parametrize(
    ("payload", "code", "names"),
    [
        pytest.param(b"\xc1", ErrorCode.BAD_FRAME, "", id="never-used-byte"),
        pytest.param(b"\x8a\xa1v", ErrorCode.BAD_FRAME, "", id="truncated-map"),
        pytest.param(_pack({"v": 1, "t": "ok"}) + b"\x00", ErrorCode.BAD_FRAME, "", id="trailing-bytes"),
        pytest.param(b"garbage bytes \xff\x00", ErrorCode.BAD_FRAME, "", id="garbage"),
        pytest.param(_pack([1, "ok"]), ErrorCode.BAD_FRAME, "list", id="array-not-map"),
        pytest.param(_pack("hello"), ErrorCode.BAD_FRAME, "str", id="str-not-map"),
        pytest.param(_pack(None), ErrorCode.BAD_FRAME, "NoneType", id="nil-not-map"),
        pytest.param(b"\x81\x01\x02", ErrorCode.BAD_FRAME, "", id="int-map-key"),
        pytest.param(b"\x82\xa1v\x01\xa1t\xa2\xff\xfe", ErrorCode.BAD_FRAME, "", id="invalid-utf8"),
        pytest.param(b"\x81\xa1v\xd6\xff\x00\x00\x00\x01", ErrorCode.BAD_FRAME, "", id="ext-timestamp"),
        pytest.param(b"\x83\xa1v\x01\xa1t\xa2ok\xa1t\xa2ok", ErrorCode.BAD_FRAME, "duplicate", id="duplicate-key"),
        pytest.param(_pack({"t": "ok"}), ErrorCode.BAD_FIELD, "'v'", id="missing-v"),
        pytest.param(_pack({"v": 2, "t": "ok"}), ErrorCode.UNSUPPORTED_VERSION, "2", id="v-2"),
        pytest.param(_pack({"v": 0, "t": "ok"}), ErrorCode.UNSUPPORTED_VERSION, "0", id="v-0"),
        pytest.param(_pack({"v": True, "t": "ok"}), ErrorCode.BAD_FIELD, "'v'", id="v-true"),
        pytest.param(_pack({"v": 1.0, "t": "ok"}), ErrorCode.BAD_FIELD, "'v'", id="v-float"),
        pytest.param(_pack({"v": "1", "t": "ok"}), ErrorCode.BAD_FIELD, "'v'", id="v-str"),
        pytest.param(_pack({"v": 1}), ErrorCode.BAD_FIELD, "'t'", id="missing-t"),
        pytest.param(_pack({"v": 1, "t": "nope"}), ErrorCode.UNKNOWN_TYPE, "nope", id="unknown-type"),
        pytest.param(_pack({"v": 1, "t": 7}), ErrorCode.UNKNOWN_TYPE, "int", id="int-type"),
        pytest.param(_pack({"v": 1, "t": b"ok"}), ErrorCode.UNKNOWN_TYPE, "bytes", id="bin-type"),
        pytest.param(_pack({"v": 1, "t": "Hello"}), ErrorCode.UNKNOWN_TYPE, "Hello", id="class-name"),
        pytest.param(_pack({"v": 1, "t": "ok", "id": "1"}), ErrorCode.BAD_FIELD, "'id'", id="id-str"),
        pytest.param(_pack({"v": 1, "t": "ok", "id": -1}), ErrorCode.BAD_FIELD, "'id'", id="id-negative"),
        pytest.param(_pack({"v": 1, "t": "ok", "id": True}), ErrorCode.BAD_FIELD, "'id'", id="id-bool"),
        pytest.param(_pack({"v": 1, "t": "ok", "id": 1 << 63}), ErrorCode.BAD_FIELD, "'id'", id="id-uint64"),
        pytest.param(_pack({"v": 1, "t": "ok", "re": 1.5}), ErrorCode.BAD_FIELD, "'re'", id="re-float"),
        pytest.param(_pack({"v": 1, "t": "ok", "re": True}), ErrorCode.BAD_FIELD, "'re'", id="re-bool"),
        pytest.param(_pack(_with(HELLO_RAW, zzz=1)), ErrorCode.BAD_FIELD, "'zzz'", id="unknown-field"),
        pytest.param(_pack(_with(HELLO_RAW, token=_DELETE)), ErrorCode.BAD_FIELD, "'token'", id="missing-token"),
        pytest.param(_pack(_with(HELLO_RAW, tcp=["h"])), ErrorCode.BAD_FIELD, "'tcp'", id="address-1-item"),
        pytest.param(_pack(_with(HELLO_RAW, tcp=["h", "p"])), ErrorCode.BAD_FIELD, "'tcp[1]'", id="address-port-str"),
        pytest.param(_pack(_with(HELLO_RAW, versions=[1, "2"])), ErrorCode.BAD_FIELD, "'versions[1]'", id="list-item"),
        pytest.param(_pack(_with(HELLO_RAW, node=b"alice")), ErrorCode.BAD_FIELD, "'node'", id="bin-for-str"),
        pytest.param(_pack(_with(HELLO_RAW, versions=None)), ErrorCode.BAD_FIELD, "'versions'", id="nil-required"),
        pytest.param(_pack({"v": 1, "t": "alloc", "count": 1 << 63}), ErrorCode.BAD_FIELD, "'count'", id="int-range"),
        pytest.param(_pack({"v": 1, "t": "alloc", "count": 2.0}), ErrorCode.BAD_FIELD, "'count'", id="float-for-int"),
        pytest.param(_pack({"v": 1, "t": "pong", "now_s": math.nan}), ErrorCode.BAD_FIELD, "'now_s'", id="nan"),
        pytest.param(_pack({"v": 1, "t": "pong", "now_s": -math.inf}), ErrorCode.BAD_FIELD, "'now_s'", id="inf"),
        pytest.param(_pack({"v": 1, "t": "pong", "now_s": False}), ErrorCode.BAD_FIELD, "'now_s'", id="bool-float"),
        pytest.param(
            _pack({"v": 1, "t": "measure", "qubits": b"\x01" * 9, "bases": b"\x00"}),
            ErrorCode.BAD_FIELD, "'qubits'", id="array-not-multiple-of-itemsize",
        ),
        pytest.param(
            _pack({"v": 1, "t": "measure", "qubits": [1, 2], "bases": b"\x00"}),
            ErrorCode.BAD_FIELD, "'qubits'", id="array-as-list",
        ),
        pytest.param(
            _pack({"v": 1, "t": "measure", "qubits": "0100000000000000", "bases": b"\x00"}),
            ErrorCode.BAD_FIELD, "'qubits'", id="array-as-str",
        ),
        pytest.param(
            _pack({"v": 1, "t": "measured", "outcomes": b"", "now_s": 0.0, "extra": None}),
            ErrorCode.BAD_FIELD, "'extra'", id="unknown-nil-field",
        ),
        pytest.param(
            _pack(_raw(EprDelivered(1, "a", "b", np.arange(1), np.arange(1), np.zeros(1, np.uint8),
                                    np.zeros(1))) | {"herald_s": np.array([np.nan]).tobytes()}),
            ErrorCode.BAD_FIELD, "'herald_s'", id="f64-array-nan",
        ),  # fmt: skip
        pytest.param(
            _pack({"v": 1, "t": "gate", "op": {"name": "x", "qubits": [1], "params": [], "extra": 1}}),
            ErrorCode.BAD_FIELD, "'op.extra'", id="struct-unknown-field",
        ),
        pytest.param(
            _pack({"v": 1, "t": "circuit", "ops": [{"name": "x", "qubits": [1]}, {"qubits": [1]}]}),
            ErrorCode.BAD_FIELD, "'ops[1].name'", id="struct-missing-field",
        ),
        pytest.param(
            _pack({"v": 1, "t": "gate", "op": [["x"], [1]]}),
            ErrorCode.BAD_FIELD, "'op'", id="struct-as-array",
        ),
        pytest.param(
            _pack({"v": 1, "t": "stats", "now_s": 0.0, "stats": [1, 2]}),
            ErrorCode.BAD_FIELD, "'stats'", id="map-as-array",
        ),
        pytest.param(
            b"\x84\xa1v\x01\xa1t\xa5stats\xa5now_s\x00\xa5stats\x81\xa1k\x81\xc4\x01x\x01",
            ErrorCode.BAD_FIELD, "'stats.k'", id="opaque-bin-key",
        ),
    ],
)  # fmt: skip
def test_decode_errors(payload: bytes, code: ErrorCode, names: str) -> None:
    err = _remote_error(payload)
    assert err.code is code, err
    assert names in err.message, err
    assert str(err).startswith(code.value)


def _wrong_values(tp: Any) -> list[Any]:
    """msgpack values that a field of this annotation must refuse."""
    kind = _kind(tp)
    table = {
        "int": ["1", 1.5, True, None, [1]],
        "float": ["1.0", True, None, b"\x00" * 8],
        "bool": [1, 0, "true", None],
        "str": [5, b"x", None, ["a"]],
        "bytes": ["00", 5, None, [0]],
        "list": ["abc", 5, {}, None],
        "address": [["h"], ["h", 1, 2], "h:1", ["h", "1"], [1, 1]],
        "map": [[1], "x", 5, None],
        "struct": [5, "x", [], None],
    }
    if kind in ARRAY_DTYPES:
        return [[1, 2], "x", 5, None]
    if kind == "optional":
        (inner,) = [a for a in typing.get_args(tp) if a is not type(None)]
        return [v for v in _wrong_values(inner) if v is not None]
    return table[kind]


FIELDS = [
    pytest.param(cls, f.name, id=f"{tag}.{f.name}")
    for tag, cls in sorted(TYPES.items())
    for f in dataclasses.fields(cls)
]


@pytest.mark.parametrize(("cls", "name"), FIELDS)
def test_every_field_refuses_wrong_types(cls: type, name: str) -> None:
    raw = _raw(_instance(cls, "typical"))
    for bad in _wrong_values(_hints(cls)[name]):
        err = _remote_error(_pack(_with(raw, **{name: bad})))
        assert err.code is ErrorCode.BAD_FIELD, (name, bad, err)
        assert f"'{name}" in err.message, (name, bad, err)


REQUIRED_FIELDS = [
    pytest.param(cls, f.name, id=f"{tag}.{f.name}")
    for tag, cls in sorted(TYPES.items())
    for f in dataclasses.fields(cls)
    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
]


@pytest.mark.parametrize(("cls", "name"), REQUIRED_FIELDS)
def test_every_required_field_must_be_present(cls: type, name: str) -> None:
    raw = _raw(_instance(cls, "typical"))
    err = _remote_error(_pack(_with(raw, **{name: _DELETE})))
    assert err.code is ErrorCode.BAD_FIELD and f"'{name}'" in err.message and "missing" in err.message


@pytest.mark.parametrize("cls", [pytest.param(c, id=t) for t, c in sorted(TYPES.items())])
def test_every_type_refuses_unknown_fields(cls: type) -> None:
    raw = _raw(_instance(cls, "typical"))
    err = _remote_error(_pack(_with(raw, surprise=0)))
    assert err.code is ErrorCode.BAD_FIELD and "'surprise'" in err.message


# ---------------------------------------------------------------------------- limits

SMALL = Limits(max_frame_bytes=4096, max_array_items=4, max_list_items=4, max_str_bytes=8, max_map_items=4, max_depth=3)
SMALL_HELLO_RAW = _raw(_hello(token="tok", tcp=("h", 1), udp=("h", 2), control=None), id=1)


def _stats(stats: Any) -> bytes:
    return _pack({"v": 1, "t": "stats", "now_s": 0.0, "stats": stats})


@pytest.mark.parametrize(
    ("payload", "names"),
    [
        pytest.param(_pack(_with(SMALL_HELLO_RAW, capabilities=["a"] * 5)), "'capabilities'", id="list"),
        pytest.param(_pack(_with(SMALL_HELLO_RAW, node="x" * 9)), "'node'", id="str-chars"),
        pytest.param(_pack(_with(SMALL_HELLO_RAW, node="é" * 5)), "'node'", id="str-utf8-bytes"),
        pytest.param(_pack(_with(SMALL_HELLO_RAW, tcp=["h" * 9, 1])), "'tcp[0]'", id="nested-str"),
        pytest.param(_pack({"v": 1, "t": "allocated", "qubits": bytes(8 * 5)}), "'qubits'", id="i64-array"),
        pytest.param(_pack({"v": 1, "t": "measured", "outcomes": bytes(5), "now_s": 0.0}), "'outcomes'", id="u8-array"),
        pytest.param(_stats({str(i): i for i in range(5)}), "'stats'", id="map-entries"),
        pytest.param(_stats({"a": {str(i): i for i in range(5)}}), "'stats.a'", id="nested-map-entries"),
        pytest.param(_stats({"a": list(range(5))}), "'stats.a'", id="opaque-list"),
        pytest.param(_stats({"a": "y" * 9}), "'stats.a'", id="opaque-str"),
        pytest.param(_stats({"k" * 9: 1}), "'stats'", id="opaque-key"),
        pytest.param(_stats({"a": {"b": [[1]]}}), "'stats.a.b[0]'", id="depth"),
        pytest.param(
            _pack({"v": 1, "t": "circuit", "ops": [{"name": "x", "qubits": [1, 2, 3, 4, 5]}]}),
            "'ops[0].qubits'", id="struct-list",
        ),
    ],
)  # fmt: skip
def test_over_limit_values_name_the_field(payload: bytes, names: str) -> None:
    err = _remote_error(payload, SMALL)
    assert err.code is ErrorCode.BAD_FIELD, err
    assert names in err.message, err
    decode(payload)  # the same frame is fine under the default limits


def test_values_at_the_limit_are_accepted() -> None:
    decode(_pack(_with(SMALL_HELLO_RAW, capabilities=["a"] * 4, node="é" * 4)), limits=SMALL)
    decode(_pack({"v": 1, "t": "allocated", "qubits": bytes(8 * 4)}), limits=SMALL)
    decode(_stats({"a": {"b": [1]}, "c": "y" * 8}), limits=SMALL)  # 3 levels of containers


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(_pack(_with(SMALL_HELLO_RAW, capabilities=["a"] * 17)), id="list"),
        pytest.param(_pack(_with(SMALL_HELLO_RAW, node="x" * 33)), id="str"),
        pytest.param(_stats({str(i): i for i in range(17)}), id="map"),
        pytest.param(_pack({"v": 1, "t": "unitary", "qubits": [1], "matrix": bytes(4097)}), id="bin"),
    ],
)
def test_gross_excess_is_caught_by_the_msgpack_parser(payload: bytes) -> None:
    # More than 4x a limit: refused while parsing (bad_frame) before any field is known.
    assert _remote_error(payload, SMALL).code is ErrorCode.BAD_FRAME


def test_nesting_deeper_than_the_parser_allows_is_a_bad_frame() -> None:
    deep = b"\x91" * 5000 + b"\xc0"
    payload = b"\x84\xa1v\x01\xa1t\xa5stats\xa5now_s\x00\xa5stats\x81\xa1k" + deep
    assert _remote_error(payload).code is ErrorCode.BAD_FRAME


def test_error_messages_never_echo_values() -> None:
    secret = "S3CR3T-TOKEN-VALUE"
    raw = _with(HELLO_RAW, token=secret)
    for broken in (
        _with(raw, node=12345),  # a wrong field next to the token
        _with(raw, surprise=secret),  # the secret in an unknown field's value
        _with(raw, versions=[secret]),  # the secret as an ill-typed value
    ):
        err = _remote_error(_pack(broken))
        assert secret not in str(err) and "12345" not in str(err)
    err = _remote_error(_pack(_with(raw, token=secret.encode())))  # token sent as bin
    assert secret not in str(err)
    long_key = "k" * 10_000
    err = _remote_error(_pack(_with(raw, **{long_key: 1})))
    assert len(err.message) < 200  # peer-supplied names are cut short


# ============================================================================ encode errors


@pytest.mark.parametrize(
    ("message", "names"),
    [
        pytest.param(wire.Alloc(count="5"), "'count'", id="str-for-int"),
        pytest.param(wire.Alloc(count=3.7), "'count'", id="float-for-int"),
        pytest.param(wire.Alloc(count=True), "'count'", id="bool-for-int"),
        pytest.param(wire.Alloc(count=1 << 64), "'count'", id="int-too-big"),
        pytest.param(wire.Alloc(count=None), "'count'", id="none-for-required"),
        pytest.param(Pong(now_s="1.0"), "'now_s'", id="str-for-float"),
        pytest.param(Pong(now_s=math.nan), "'now_s'", id="nan"),
        pytest.param(Pong(now_s=10**400), "'now_s'", id="int-beyond-float"),
        pytest.param(_hello(node=5), "'node'", id="int-for-str"),
        pytest.param(_hello(node=b"alice"), "'node'", id="bytes-for-str"),
        pytest.param(_hello(node="\ud800"), "'node'", id="lone-surrogate"),
        pytest.param(_hello(capabilities="epr"), "'capabilities'", id="str-for-list"),
        pytest.param(_hello(versions=[1, "2"]), "'versions[1]'", id="list-item"),
        pytest.param(_hello(tcp=("h",)), "'tcp'", id="short-address"),
        pytest.param(_hello(tcp="h:1"), "'tcp'", id="str-address"),
        pytest.param(_hello(control=("h", "1")), "'control[1]'", id="optional-address"),
        pytest.param(wire.EprListen(peer="bob", accept=1), "'accept'", id="int-for-bool"),
        pytest.param(Unitary(qubits=[1], matrix="00"), "'matrix'", id="str-for-bytes"),
        pytest.param(Allocated(qubits=[1.5]), "'qubits'", id="lossy-float-to-int"),
        pytest.param(Allocated(qubits=np.array([2**63], dtype=np.uint64)), "'qubits'", id="uint64-overflow"),
        pytest.param(Allocated(qubits=[[1, 2]]), "'qubits'", id="2d-array"),
        pytest.param(Allocated(qubits=5), "'qubits'", id="scalar-array"),
        pytest.param(Allocated(qubits=["a"]), "'qubits'", id="str-array"),
        pytest.param(Allocated(qubits=[1 << 70]), "'qubits'", id="object-array"),
        pytest.param(Allocated(qubits=b"\x01" * 9), "'qubits'", id="packed-wrong-size"),
        pytest.param(Measure(qubits=[1], bases=[-1]), "'bases'", id="negative-to-u8"),
        pytest.param(Measure(qubits=[1], bases=[256]), "'bases'", id="overflow-u8"),
        pytest.param(Measure(qubits=[1], bases=[0], free=None), "'free'", id="none-for-bool"),
        pytest.param(EprDelivered(1, "a", "b", [1], [1], [0], [math.inf]), "'herald_s'", id="inf-in-f64"),
        pytest.param(EprDelivered(1, "a", "b", [1], [1], [0], ["x"]), "'herald_s'", id="str-in-f64"),
        pytest.param(Gate(op={"name": "x", "qubits": [1]}), "'op'", id="dict-for-struct"),
        pytest.param(Gate(op=GateOp("x", [1], ["a"])), "'op.params[0]'", id="struct-inner"),
        pytest.param(Circuit(ops=[GateOp("x", [1]), GateOp(5, [1])]), "'ops[1].name'", id="list-of-struct"),
        pytest.param(Stats(now_s=0.0, stats={1: 2}), "'stats'", id="int-key"),
        pytest.param(Stats(now_s=0.0, stats={"a": {"b": {3}}}), "'stats.a.b'", id="set-value"),
        pytest.param(Stats(now_s=0.0, stats={"a": np.zeros(3)}), "'stats.a'", id="ndarray-in-map"),
        pytest.param(Stats(now_s=0.0, stats={"a": 1 << 64}), "'stats.a'", id="map-int-too-big"),
        pytest.param(Stats(now_s=0.0, stats=[("a", 1)]), "'stats'", id="list-for-map"),
        pytest.param(StatusReply(now_s=0.0, nodes=[NodeStatus("a", True, tcp=("h", None))]), "'nodes[0].tcp[1]'",
                     id="deep-struct"),
    ],
)  # fmt: skip
def test_encode_refuses_wrong_values(message: Message, names: str) -> None:
    err = _local_error(message)
    assert err.code is ErrorCode.BAD_FIELD, err
    assert names in err.message, err


def test_encode_refuses_self_referential_maps() -> None:
    loop: dict[str, Any] = {}
    loop["me"] = loop
    assert _local_error(Stats(now_s=0.0, stats=loop)).code is ErrorCode.BAD_FIELD


def test_encode_applies_limits_only_when_given() -> None:
    small_hello = _hello(token="tok", tcp=("h", 1), udp=("h", 2), control=None, capabilities=["a"] * 5)
    err = _local_error(small_hello, limits=SMALL)
    assert err.code is ErrorCode.BAD_FIELD and "'capabilities'" in err.message
    encode(small_hello)  # no limits given: sizes are the receiver's business
    # Text echoed from a peer can never make our own encoder raise (the peer's decoder
    # refuses an over-size string with bad_field instead).
    long_error = Error.of(ErrorCode.UNKNOWN_NODE, "n" * 100_000)
    err_remote = _remote_error(encode(long_error))
    assert err_remote.code is ErrorCode.BAD_FIELD and "'message'" in err_remote.message
    assert _local_error(long_error, limits=Limits()).code is ErrorCode.BAD_FIELD


@pytest.mark.parametrize(
    "env",
    [{"id": -1}, {"id": True}, {"id": 1 << 63}, {"id": "1"}, {"re": 1.0}, {"re": False}, {"re": 1 << 64}, {"re": "2"}],
    ids=str,
)
def test_encode_refuses_bad_envelope_values(env: dict[str, Any]) -> None:
    err = _local_error(Ok(), **env)
    assert err.code is ErrorCode.BAD_FIELD


@pytest.mark.parametrize("re", [-5, 1 << 63, (1 << 64) - 1])
def test_an_out_of_range_request_id_can_be_echoed(re: int) -> None:
    # An error about a frame whose id is out of range answers with that id as it came:
    # encoding must not raise (a remote peer could otherwise crash the sender), and `re`
    # is only a correlation key, so the receiver decodes it and matches nothing.
    env = decode(encode(Error.of(ErrorCode.BAD_FIELD, "field 'id'"), re=re))
    assert env.re == re and env.message.code == "bad_field"


def test_encode_refuses_unregistered_messages() -> None:
    @dataclasses.dataclass(frozen=True, slots=True)
    class Sneaky(Ok):
        TYPE = "ok"  # pretends to be a registered type

    assert _local_error(Sneaky()).code is ErrorCode.UNKNOWN_TYPE

    @dataclasses.dataclass(frozen=True, slots=True)
    class Unknown(Message):
        TYPE = "unknown"

    assert _local_error(Unknown()).code is ErrorCode.UNKNOWN_TYPE


def test_local_errors_never_echo_the_token() -> None:
    secret = "S3CR3T-TOKEN-VALUE"
    for message in (_hello(token=secret, node=5), _hello(token=secret.encode()), AdminHello(secret, ["1"], "x")):
        err = _local_error(message)
        assert secret not in str(err) and secret not in repr(err)


# ============================================================================ secrets in repr


@pytest.mark.parametrize(
    "message",
    [
        _hello(token="S3CR3T-TOKEN-VALUE"),
        AdminHello(token="S3CR3T-TOKEN-VALUE", versions=[1], client="qnetem-run"),
        LinkHello(node="alice", token="S3CR3T-TOKEN-VALUE", versions=[1]),
    ],
    ids=lambda m: m.TYPE,
)
def test_tokens_never_appear_in_repr(message: Message) -> None:
    for text in (repr(message), str(message), f"{message}", repr(decode(encode(message)))):
        assert "S3CR3T" not in text
    assert "token" not in repr(message)
    assert type(message).__name__ in repr(message)  # the rest of the repr is still useful


def test_token_fields_are_exactly_the_hidden_ones() -> None:
    # Any new secret-carrying field must be hidden too: list them here when adding one.
    hidden = {
        (tag, f.name) for tag, cls in TYPES.items() for f in dataclasses.fields(cls) if not f.repr
    }
    named_token = {(tag, f.name) for tag, cls in TYPES.items() for f in dataclasses.fields(cls) if "token" in f.name}
    assert named_token == {("hello", "token"), ("admin_hello", "token"), ("link_hello", "token")}
    # kms_start carries a KME's private key (PEM) and the run's KMS config.
    assert hidden == named_token | {("kms_start", "config")}
    # qkd link info carries the bootstrap authentication key (a nested struct).
    assert not QkdLinkInfo.__dataclass_fields__["auth_key"].repr


# ============================================================================ fuzzing (hypothesis)
# Deterministic: tests/conftest.py loads a derandomized profile; max_examples stay modest.

_MSGPACK_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=INT64_MIN, max_value=(1 << 64) - 1)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
    | st.binary(max_size=24)
)
MSGPACK_VALUES = st.recursive(
    _MSGPACK_SCALARS,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=12,
)


@settings(max_examples=300)
@given(chunks=st.lists(st.binary(max_size=64), max_size=8))
def test_fuzz_arbitrary_bytes_only_raise_remote_protocol_error(chunks: list[bytes]) -> None:
    decoder = FrameDecoder(max_frame_bytes=256)
    for chunk in chunks:
        decoder.feed(chunk)
        try:
            while (payload := decoder.next_frame()) is not None:
                try:
                    decode(payload)
                except RemoteProtocolError:
                    pass
        except RemoteProtocolError as exc:
            assert exc.code is ErrorCode.FRAME_TOO_LARGE or exc.code is ErrorCode.BAD_FRAME
            return


@settings(max_examples=300)
@given(payload=st.binary(max_size=200))
def test_fuzz_arbitrary_payloads_only_raise_remote_protocol_error(payload: bytes) -> None:
    try:
        decode(payload)
    except RemoteProtocolError:
        pass


@settings(max_examples=300)
@given(data=st.data())
def test_fuzz_mutated_valid_frames(data: st.DataObject) -> None:
    cls = data.draw(st.sampled_from(sorted(TYPES.values(), key=lambda c: c.TYPE)))
    payload = bytearray(encode(_instance(cls, data.draw(st.sampled_from(VARIANTS)))))
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(payload) - 1))
        payload[pos] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(payload)))
    for candidate in (bytes(payload), bytes(payload[:cut])):
        try:
            env = decode(candidate)
        except RemoteProtocolError:
            continue
        _assert_reencodes(env)


def _assert_reencodes(env: wire.Envelope) -> None:
    """Whatever decodes must encode again and decode to the same message."""
    again = decode(encode(env.message, id=env.id, re=env.re))
    assert _same(again.message, env.message) and (again.id, again.re) == (env.id, env.re)


@settings(max_examples=400)
@given(data=st.data())
def test_fuzz_msgpack_maps_with_a_known_type(data: st.DataObject) -> None:
    tag = data.draw(st.sampled_from(sorted(TYPES)))
    cls = TYPES[tag]
    if data.draw(st.booleans()):
        # Start from a valid message and break some of it.
        raw = _raw(_instance(cls, data.draw(st.sampled_from(VARIANTS))))
        names = [f.name for f in dataclasses.fields(cls)] + ["id", "re", "zzz"]
        for _ in range(data.draw(st.integers(0, 3))):
            name = data.draw(st.sampled_from(names))
            if data.draw(st.booleans()):
                raw.pop(name, None)
            else:
                raw[name] = data.draw(MSGPACK_VALUES)
    else:
        raw = data.draw(st.dictionaries(st.text(max_size=10), MSGPACK_VALUES, max_size=6))
    raw["v"], raw["t"] = 1, tag
    try:
        env = decode(_pack(raw))
    except RemoteProtocolError:
        return
    assert type(env.message) is cls
    _assert_reencodes(env)
