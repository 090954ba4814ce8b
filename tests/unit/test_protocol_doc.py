"""docs/protocol.md against the code: the spec must not fall behind the codec.

Checks, each a separate test:

* every ```frame block (JSON with `{"$bin": "<hex>"}` for bin, first line `# type: <t>`)
  msgpack-encodes and decodes with `emulator.wire.decode` to the type it names, under a
  heading that names the same type, and re-encoding keeps every value the example shows;
* every registered message type has an example, a heading and a field table whose rows
  are exactly the dataclass fields with the right wire types (nested structs too);
* every `ErrorCode` is in the §5 error table and the table has no other code;
* the §4.3 gate table is `GATE_ARITY`, the §3 limits table is `Limits()`;
* the ```session block of §9 holds real frames: each decodes to the type its header line
  names and re-encodes to the same bytes.

Regenerate the §9 block after a deliberate wire change with
`python -m tests.unit.test_protocol_doc` (prints it).
"""

from __future__ import annotations

import ast
import dataclasses
import json
import re
import types
import typing
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest

import emulator.wire as wire
from emulator.wire import (
    GATE_ARITY,
    Address,
    EprAccepted,
    EprDelivered,
    EprDone,
    EprListen,
    EprRequest,
    ErrorCode,
    F64Array,
    FrameDecoder,
    Hello,
    I64Array,
    LinkInfo,
    Limits,
    Measure,
    Measured,
    Ok,
    PeerUp,
    Struct,
    U8Array,
    U64Array,
    Welcome,
    decode,
    encode,
    encode_framed,
    message_types,
)

from tests.unit import _markdown as md

DOC_PATH = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"

_MARKER = re.compile(r"^#\s*type:\s*(?P<type>[a-z_]+)\s*$")
_SESSION_HEADER = re.compile(r"^(?P<src>[\w-]+) -> (?P<dst>[\w-]+): (?P<type>[a-z_]+)\b")


# ----------------------------------------------------------------------------- parsing


@pytest.fixture(scope="module")
def doc() -> str:
    return DOC_PATH.read_text(encoding="utf-8")


def _blocks(text: str, tag: str) -> list[tuple[int, str]]:
    """(offset, body) of every fenced block with this info string."""
    return [(m.start(), m.group("body")) for m in md.FENCE.finditer(text) if m.group("tag") == tag]


def _heading_before(text: str, offset: int) -> str:
    titles = [title for start, _, title in md.headings(text) if start < offset]
    assert titles, f"no heading before offset {offset}"
    return titles[-1]


def _section(text: str, title_pattern: str) -> str:
    """Body of the first heading matching the pattern, up to the next heading of the same or higher level."""
    heads = md.headings(text)
    for i, (start, level, title) in enumerate(heads):
        if re.search(title_pattern, title):
            end = next((s for s, lvl, _ in heads[i + 1 :] if lvl <= level), len(text))
            return text[start:end]
    raise AssertionError(f"no heading matches {title_pattern!r}")


def _from_json(obj: dict[str, Any]) -> Any:
    if set(obj) == {"$bin"}:
        return bytes.fromhex(obj["$bin"])
    return obj


def _parse_frame_block(body: str) -> tuple[str, dict[str, Any]]:
    lines = body.splitlines()
    marker = _MARKER.match(lines[0]) if lines else None
    assert marker, f"frame block must start with '# type: <t>', got {lines[:1]!r}"
    json_text = "\n".join(line for line in lines[1:] if not line.lstrip().startswith("#"))
    return marker.group("type"), json.loads(json_text, object_hook=_from_json)


def _frame_examples(text: str) -> list[tuple[int, str, dict[str, Any]]]:
    return [(offset, *_parse_frame_block(body)) for offset, body in _blocks(text, "frame")]


# ----------------------------------------------------------------------------- frame examples


def test_doc_has_frame_examples(doc: str) -> None:
    assert len(_frame_examples(doc)) >= len(message_types())


def test_every_frame_example_decodes_to_its_type(doc: str) -> None:
    types_ = message_types()
    for offset, tag, frame in _frame_examples(doc):
        assert frame.get("t") == tag, f"example marked {tag!r} has t={frame.get('t')!r}"
        env = decode(msgpack.packb(frame, use_bin_type=True))
        assert type(env.message) is types_[tag]
        assert env.id == frame.get("id", 0) and env.re == frame.get("re")
        heading = _heading_before(doc, offset)
        assert f"`{tag}`" in heading, f"example of {tag!r} sits under heading {heading!r}"
        # The example is faithful: the codec's own encoding keeps every value it shows.
        again = msgpack.unpackb(encode(env.message, id=env.id, re=env.re), raw=False)
        for key, value in frame.items():
            assert key in again and _kept(value, again[key]), f"{tag}: field {key!r} does not survive re-encoding"


def _kept(shown: Any, actual: Any) -> bool:
    """`actual` holds everything `shown` does (nested records may add omitted defaults)."""
    if isinstance(shown, dict):
        return isinstance(actual, dict) and all(k in actual and _kept(v, actual[k]) for k, v in shown.items())
    if isinstance(shown, list):
        return isinstance(actual, list) and len(shown) == len(actual) and all(map(_kept, shown, actual))
    return type(shown) in (int, float) and type(actual) in (int, float) and shown == actual or (
        type(shown) is type(actual) and shown == actual
    )


def test_every_message_type_has_an_example(doc: str) -> None:
    shown = {tag for _, tag, _ in _frame_examples(doc)}
    missing = sorted(set(message_types()) - shown)
    assert not missing, f"docs/protocol.md has no ```frame example for {missing}"


# ----------------------------------------------------------------------------- field tables


def _render_type(tp: Any) -> str:
    """The notation of docs/protocol.md §3 for a field annotation."""
    for name, alias in (
        ("I64Array", I64Array), ("U64Array", U64Array), ("U8Array", U8Array), ("F64Array", F64Array),
        ("Address", Address),
    ):  # fmt: skip
        if tp == alias:
            return name
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        (inner,) = [a for a in typing.get_args(tp) if a is not type(None)]
        return _render_type(inner) + "?"
    if origin is list:
        return f"list[{_render_type(typing.get_args(tp)[0])}]"
    if origin is dict:
        return "map"
    if isinstance(tp, type) and issubclass(tp, Struct):
        return tp.__name__
    return {int: "int", float: "float", bool: "bool", str: "str", bytes: "bin"}[tp]


def _struct_types() -> dict[str, type]:
    found: dict[str, type] = {}
    for cls in message_types().values():
        for tp in typing.get_type_hints(cls, include_extras=True).values():
            stack = [tp]
            while stack:
                t = stack.pop()
                stack.extend(typing.get_args(t))
                if isinstance(t, type) and issubclass(t, Struct):
                    found[t.__name__] = t
    return found


def _check_field_table(section: str, cls: type, what: str) -> None:
    hints = typing.get_type_hints(cls, include_extras=True)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    tables = [t for t in md.tables(section) if t and t[0][:2] == ["field", "type"]]
    if not fields:
        assert not tables, f"{what} has no fields but its section has a field table"
        assert "no fields" in section.lower(), f"{what}: say 'No fields.' in its section"
        return
    assert len(tables) == 1, f"{what}: expected one '| field | type | ... |' table, found {len(tables)}"
    rows = {md.unticked(r[0]): md.unticked(r[1]) for r in tables[0][1:]}
    assert set(rows) == set(fields), f"{what}: table lists {sorted(rows)}, code has {sorted(fields)}"
    for name, fld in fields.items():
        cell = rows[name]
        expected = _render_type(hints[name])
        assert re.match(re.escape(expected) + r"(,|$)", cell), f"{what}.{name}: doc says {cell!r}, code {expected!r}"
        has_default = fld.default is not dataclasses.MISSING or fld.default_factory is not dataclasses.MISSING
        assert ("opt." in cell) == has_default, f"{what}.{name}: 'opt.' must mark exactly the fields with a default"


def test_every_message_type_has_a_field_table(doc: str) -> None:
    for tag, cls in message_types().items():
        section = _section(doc, rf"^`{re.escape(tag)}`( |$)")
        _check_field_table(section, cls, tag)


def test_every_struct_has_a_field_table(doc: str) -> None:
    structs = _struct_types()
    assert structs  # LinkInfo, GateOp, NodeStatus at least
    for name, cls in structs.items():
        section = _section(doc, rf"^struct `{name}`")
        _check_field_table(section, cls, name)


# ----------------------------------------------------------------------------- tables of constants


def test_error_table_is_the_error_code_enum(doc: str) -> None:
    section = _section(doc, r"^5\. ")
    (table,) = [t for t in md.tables(section) if t and t[0][0] == "code"]
    codes = [md.unticked(r[0]) for r in table[1:]]
    assert sorted(codes) == sorted(c.value for c in ErrorCode), "§5 must list exactly the ErrorCode values"
    assert len(codes) == len(set(codes))
    for row in table[1:]:
        assert row[2].split()[0].rstrip(",.;") in {"yes", "no", "handshake"}, f"closes column of {row[0]}: {row[2]!r}"


def test_gate_table_is_gate_arity(doc: str) -> None:
    section = _section(doc, r"^4\.3 ")
    (table,) = [t for t in md.tables(section) if t and t[0][:3] == ["gate", "qubits", "params"]]
    documented = {md.unticked(r[0]): (int(r[1]), int(r[2])) for r in table[1:]}
    assert documented == GATE_ARITY


def _matrix_of_cell(cell: str) -> np.ndarray:
    """The matrix written in a gate-table cell: `[[...]]` or `diag(...)`, optionally `/ √2`."""
    text = cell.replace("−", "-").replace("e^(iπ/4)", repr(complex(2**-0.5, 2**-0.5)))
    found = re.search(r"(\[\[.*\]\]|diag\([^)]*\))(\s*/\s*√2)?", text)
    assert found, f"no matrix in {cell!r}"
    body = re.sub(r"(?<![\w.])i(?!\w)", "1j", found.group(1))  # the imaginary unit
    if body.startswith("diag("):
        matrix = np.diag(np.array(ast.literal_eval("[" + body[5:-1] + "]"), dtype=complex))
    else:
        matrix = np.array(ast.literal_eval(body), dtype=complex)
    return matrix / np.sqrt(2) if found.group(2) else matrix


def test_gate_matrices_are_the_kernels_matrices(doc: str) -> None:
    from emulator.kernels import GATES, rotation

    section = _section(doc, r"^4\.3 ")
    (table,) = [t for t in md.tables(section) if t and t[0][:3] == ["gate", "qubits", "params"]]
    for row in table[1:]:
        name, params = md.unticked(row[0]), int(row[2])
        if params:  # rotations: the documented closed form at one angle, against the kernels
            axis = name[1]
            assert f"exp(−iθ{axis.upper()}/2)" in row[3], row
            theta = 0.7
            values = {  # longest first, so "−i sin θ/2" is replaced before "sin θ/2"
                "−i sin θ/2": -1j * np.sin(theta / 2), "−sin θ/2": -np.sin(theta / 2),
                "sin θ/2": np.sin(theta / 2), "cos θ/2": np.cos(theta / 2),
                "e^(−iθ/2)": np.exp(-0.5j * theta), "e^(iθ/2)": np.exp(0.5j * theta),
            }  # fmt: skip
            closed = row[3].rsplit("= ", 1)[-1]
            for text, value in values.items():
                closed = closed.replace(text, repr(complex(value)))
            np.testing.assert_allclose(_matrix_of_cell(closed), rotation(axis, theta), atol=1e-12, err_msg=name)
            continue
        np.testing.assert_allclose(_matrix_of_cell(row[3]), GATES[name.upper()], atol=1e-12, err_msg=name)


def test_limits_table_is_limits_defaults(doc: str) -> None:
    section = _section(doc, r"^3\.\d+ Limits")
    (table,) = [t for t in md.tables(section) if t and t[0][:2] == ["limit", "default"]]
    documented = {md.unticked(r[0]): int(re.match(r"\d+", r[1].replace(" ", "")).group(0)) for r in table[1:]}
    assert documented == dataclasses.asdict(Limits())


def test_protocol_version_is_documented(doc: str) -> None:
    assert wire.PROTOCOL_VERSION == 1 and wire.SUPPORTED_VERSIONS == (1,), "update §6 for a new version"
    assert wire.DEFAULT_MAX_FRAME_BYTES == 16 * 1024 * 1024
    assert "16777216" in doc


# ----------------------------------------------------------------------------- the example session


def _session_frames(text: str) -> list[tuple[str, str, str, bytes]]:
    """(src, dst, type, frame bytes) of every frame of the ```session block."""
    (block,) = [body for _, body in _blocks(text, "session")]
    frames: list[tuple[str, str, str, bytes]] = []
    header: re.Match[str] | None = None
    hexdigits: list[str] = []

    def flush() -> None:
        if header is not None:
            frames.append((header["src"], header["dst"], header["type"], bytes.fromhex("".join(hexdigits))))

    for line in block.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line[0].isspace():
            assert header is not None, f"hex before any header: {line!r}"
            hexdigits.append(line.replace(" ", ""))
            continue
        flush()
        header = _SESSION_HEADER.match(line)
        assert header, f"session line is neither 'src -> dst: type' nor indented hex: {line!r}"
        hexdigits = []
    flush()
    return frames


def test_example_session_holds_real_frames(doc: str) -> None:
    frames = _session_frames(doc)
    assert frames
    for src, dst, tag, data in frames:
        decoder = FrameDecoder()
        decoder.feed(data)
        payload = decoder.next_frame()
        assert payload is not None and decoder.next_frame() is None and decoder.buffered_bytes == 0, (
            f"{src} -> {dst}: {tag} is not exactly one frame"
        )
        env = decode(payload)
        assert env.message.TYPE == tag
        assert encode_framed(env.message, id=env.id, re=env.re) == data, f"{tag}: not the codec's own encoding"


def test_example_session_walks_the_registration_and_epr_flow(doc: str) -> None:
    order = [tag for _, _, tag, _ in _session_frames(doc)]
    wanted = ["hello", "welcome", "peer_up", "epr_listen", "epr_request", "epr_delivered", "measure", "measured"]
    positions = [order.index(t) for t in wanted]
    assert positions == sorted(positions), f"session order {order} does not follow {wanted}"


def test_session_block_matches_its_generator(doc: str) -> None:
    (block,) = [body for _, body in _blocks(doc, "session")]
    assert block == render_session(), "regenerate with: python -m tests.unit.test_protocol_doc"


# ----------------------------------------------------------------------------- generator of §9


def _i64(*v: int) -> np.ndarray:
    return np.array(v, dtype="<i8")


def _u8(*v: int) -> np.ndarray:
    return np.array(v, dtype="u1")


SESSION: list[tuple[str, str, str, Any, int, int | None]] = [
    # (src, dst, comment, message, id, re)
    (
        "alice", "broker",
        "alice registers: its name, the run token, the versions it speaks and where it listens.",
        Hello(node="alice", token="k7Jd2xQ9pLm4", versions=[1], capabilities=["epr"],
              tcp=("127.0.0.1", 7101), udp=("127.0.0.1", 7102), control=("127.0.0.1", 7103)),
        1, None,
    ),
    (
        "broker", "alice",
        "version 1 chosen; emulated clock 0.125 s, time_scale 1; seed; 8 memory qubits; one link.",
        Welcome(version=1, node="alice", now_s=0.125, time_scale=1.0, seed=1234567, memory_qubits=8,
                links=[LinkInfo(peer="bob", length_km=20.0, attenuation_db_per_km=0.2, jitter_s=0.0,
                                udp_loss=0.0, entanglement=True)]),
        0, 1,
    ),
    (
        "broker", "alice",
        "event: neighbour bob is already registered; this is where its classical link listens.",
        PeerUp(node="bob", tcp=("127.0.0.1", 7201), udp=("127.0.0.1", 7202)),
        0, None,
    ),
    (
        "bob", "broker",
        "on bob's own session: bob consents to entanglement requests from alice.",
        EprListen(peer="alice", accept=True),
        2, None,
    ),
    ("broker", "bob", "consent recorded.", Ok(), 0, 2),
    (
        "alice", "broker",
        "alice asks for two heralded pairs with bob.",
        EprRequest(peer="bob", pairs=2),
        2, None,
    ),
    (
        "broker", "alice",
        "accepted as request 1 (bob's events carry the same number).",
        EprAccepted(request=1, now_s=0.2),
        0, 2,
    ),
    (
        "broker", "alice",
        "event: both pairs heralded in Phi+; alice holds qubits 1 and 2 (bob gets his halves).",
        EprDelivered(request=1, initiator="alice", peer="bob", pair_ids=_i64(1, 2), qubits=_i64(1, 2),
                     bell=_u8(0, 0), herald_s=np.array([0.2002, 0.20035], dtype="<f8")),
        0, None,
    ),
    (
        "broker", "alice",
        "event: request 1 finished, 2 pairs delivered.",
        EprDone(request=1, initiator="alice", peer="bob", delivered=2, reason="complete", now_s=0.20035),
        0, None,
    ),
    (
        "alice", "broker",
        "measure both qubits in Z (one basis code for all) and free them.",
        Measure(qubits=_i64(1, 2), bases=_u8(0), free=True),
        3, None,
    ),
    (
        "broker", "alice",
        "outcomes 0 and 1, in the order of the request.",
        Measured(outcomes=_u8(0, 1), now_s=0.21),
        0, 3,
    ),
]  # fmt: skip


def _hex_lines(data: bytes) -> list[str]:
    words = [data[i : i + 4].hex() for i in range(0, len(data), 4)]
    return ["    " + " ".join(words[i : i + 8]) for i in range(0, len(words), 8)]


def render_session() -> str:
    """The body of the ```session block of docs/protocol.md §9."""
    lines: list[str] = []
    for src, dst, comment, message, id_, re_ in SESSION:
        envelope = f"id {id_}" + (f", re {re_}" if re_ is not None else "")
        lines.append(f"# {comment}")
        lines.append(f"{src} -> {dst}: {message.TYPE}  ({envelope})")
        lines.extend(_hex_lines(encode_framed(message, id=id_, re=re_)))
        lines.append("")
    return "\n".join(lines).rstrip("\n") + "\n"


if __name__ == "__main__":
    print(render_session(), end="")
