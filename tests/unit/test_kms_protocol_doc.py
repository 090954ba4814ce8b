"""docs/protocol.md §10.3 (the KME protocol inside `kms_msg.body`) against nodes/kms.

The section must not fall behind the code. Each check is a separate test:

* the `op`s: every op string the code sends (a dict literal ``{"op": "<op>", ...}`` in
  nodes/kms/*.py) or dispatches on (``op == "<op>"`` in ``Kme.receive``, the keys of
  ``Kme._ROUTED``) is documented with a heading ``op `<op>```, and nothing else is; the
  overview table says which are hop messages (``Kme.receive``) and which routed
  (``Kme._ROUTED``), and every op sent is handled somewhere;
* each op's field table lists exactly the members the code writes for it (the keys of
  its dict literals, plus keys stored later as ``name["key"] = ...``);
* every ```json example in §10.3 has an op, exactly its table's fields (opt. ones may be
  left out), values of the documented types and sizes, nested records (``keys[]``,
  ``pqc.m``, ``fwd.msg``) checked the same way; every op has an example; each example
  is a valid `kms_msg` frame for `emulator.wire`;
* the `pqc.m` tables are the fields of ``PqcInit``/``PqcResponse``/``PqcConfirm`` in
  transcript order, and the CatKDF labels of ``hybrid.LABELS`` are named;
* the constants table holds the code's values; the configuration table lists exactly
  the members ``nodes/kms/service.py`` reads, with its defaults and "opt." marks;
* the byte-level constructions written in §10.3.2 (AD, the one-time MAC, Seal) and the
  order of the assignment's AD, re-implemented here from the text, give the code's bytes.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import re
import uuid
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest

import nodes.kms._delivery as delivery
import nodes.kms._relay as relay
import nodes.kms._routing as routing
import nodes.kms.hybrid as hybrid
import nodes.kms.kme as kme
from emulator.wire import KmsMsg, decode

from tests.unit import _markdown as md

ROOT = Path(__file__).resolve().parents[2]
DOC_PATH = ROOT / "docs" / "protocol.md"
KMS_DIR = ROOT / "nodes" / "kms"
MODULES = {
    "nodes/kms/kme.py": kme,
    "nodes/kms/_routing.py": routing,
    "nodes/kms/_relay.py": relay,
    "nodes/kms/hybrid.py": hybrid,
}

_OPHEADING = re.compile(r"^op `(?P<op>[a-z_]+)`$")
_NESTED_HEADER = re.compile(r"^`?(?P<name>[\w\[\]-]+)`? field$")


# ----------------------------------------------------------------------------- the document


def _section_at(text: str, index: int, heads: list[tuple[int, int, str]]) -> str:
    start, level, _ = heads[index]
    end = next((s for s, lvl, _ in heads[index + 1 :] if lvl <= level), len(text))
    return text[start:end]


@dataclasses.dataclass(frozen=True)
class Field:
    name: str
    type: str  # §3.3 notation without "?" / "opt."
    nullable: bool  # T?
    optional: bool  # "opt."
    unit: str


class Shortened(bytes):
    """A bin shown with its tail elided (`{"$bin": "<hex>..."}`): its size is not checked."""


def _from_json(obj: dict[str, Any]) -> Any:
    if set(obj) == {"$bin"}:
        text = obj["$bin"]
        if text.endswith("..."):
            return Shortened(bytes.fromhex(text[:-3]))
        return bytes.fromhex(text)
    return obj


def _field_table(rows: list[list[str]]) -> dict[str, Field]:
    out: dict[str, Field] = {}
    for row in rows[1:]:
        name = md.unticked(row[0])
        type_cell = md.unticked(row[1])
        base = type_cell.split(",")[0].strip()
        assert name not in out, f"field {name!r} listed twice"
        out[name] = Field(name, base.rstrip("?"), base.endswith("?"), "opt." in type_cell, md.unticked(row[2]))
    return out


@dataclasses.dataclass
class Spec:
    text: str  # §10.3
    hop_ops: set[str]
    routed_ops: set[str]
    fields: dict[str, dict[str, Field]]  # op -> its table
    nested: dict[str, dict[str, dict[str, Field]]]  # op -> record name ("keys[]", "pqc-init") -> table
    nested_order: dict[str, dict[str, list[str]]]
    examples: list[Any]


@pytest.fixture(scope="module")
def spec() -> Spec:
    doc = DOC_PATH.read_text(encoding="utf-8")
    heads = md.headings(doc)
    (index,) = [i for i, (_, _, title) in enumerate(heads) if re.match(r"10\.3 ", title)]
    text = _section_at(doc, index, heads)
    sub = md.headings(text)
    overview = [t for t in md.tables(text[: sub[1][0]]) if t[0][:2] == ["`op`", "carried"]]
    assert len(overview) == 1, "§10.3 needs one overview table '| `op` | carried | ...'"
    carried = {md.unticked(r[0]): r[1] for r in overview[0][1:]}
    assert set(carried.values()) <= {"hop", "routed"}, carried
    fields: dict[str, dict[str, Field]] = {}
    nested: dict[str, dict[str, dict[str, Field]]] = {}
    order: dict[str, dict[str, list[str]]] = {}
    for i, (_, _, title) in enumerate(sub):
        m = _OPHEADING.match(title)
        if not m:
            continue
        op = m.group("op")
        assert op not in fields, f"op {op!r} has two headings"
        main = []
        nested[op], order[op] = {}, {}
        for table in md.tables(_section_at(text, i, sub)):
            head = md.unticked(table[0][0])
            if head == "field":
                main.append(table)
            elif n := _NESTED_HEADER.match(head):
                nested[op][n.group("name")] = _field_table(table)
                order[op][n.group("name")] = [md.unticked(r[0]) for r in table[1:]]
        assert len(main) == 1, f"op {op!r}: expected one '| field | type | unit | meaning |' table"
        assert main[0][0][:3] == ["field", "type", "unit"], f"op {op!r}: columns {main[0][0]}"
        fields[op] = _field_table(main[0])
    assert set(fields) == set(carried), f"headings {sorted(fields)} vs overview {sorted(carried)}"
    examples = [json.loads(m.group("body"), object_hook=_from_json) for m in md.FENCE.finditer(text)
                if m.group("tag") == "json"]  # fmt: skip
    assert "```frame" not in text, "§10.3 examples are ```json (```frame means a whole wire frame)"
    return Spec(
        text=text,
        hop_ops={op for op, c in carried.items() if c == "hop"},
        routed_ops={op for op, c in carried.items() if c == "routed"},
        fields=fields,
        nested=nested,
        nested_order=order,
        examples=examples,
    )


# ----------------------------------------------------------------------------- the code


def _trees() -> dict[str, ast.Module]:
    return {p.name: ast.parse(p.read_text(encoding="utf-8"), filename=str(p)) for p in sorted(KMS_DIR.glob("*.py"))}


def _op_of(node: ast.Dict) -> str | None:
    for k, v in zip(node.keys, node.values):
        if isinstance(k, ast.Constant) and k.value == "op":
            assert isinstance(v, ast.Constant) and isinstance(v.value, str), f"line {node.lineno}: op is not a literal"
            return v.value
    return None


def _dict_keys(node: ast.Dict) -> set[str]:
    keys = set()
    for k in node.keys:
        assert isinstance(k, ast.Constant) and isinstance(k.value, str), f"line {node.lineno}: non-literal key"
        keys.add(k.value)
    return keys


@pytest.fixture(scope="module")
def emitted() -> dict[str, set[str]]:
    """op -> every member the code writes into a message of that op."""
    out: dict[str, set[str]] = {}
    for tree in _trees().values():
        for node in ast.walk(tree):
            if isinstance(node, ast.Dict) and (op := _op_of(node)) is not None:
                out.setdefault(op, set()).update(_dict_keys(node))
        for func in ast.walk(tree):
            if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            named: dict[str, str] = {}  # variable bound to an op's dict literal, in this function -> op
            for node in ast.walk(func):
                if isinstance(node, (ast.Assign, ast.AnnAssign)) and isinstance(node.value, ast.Dict):
                    targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                    op = _op_of(node.value)
                    for t in targets:
                        if op is not None and isinstance(t, ast.Name):
                            named[t.id] = op
            for node in ast.walk(func):  # later stores: ack["reason"] = ...
                if isinstance(node, ast.Assign):
                    for t in node.targets:
                        if (isinstance(t, ast.Subscript) and isinstance(t.value, ast.Name) and t.value.id in named
                                and isinstance(t.slice, ast.Constant) and isinstance(t.slice.value, str)):  # fmt: skip
                            out[named[t.value.id]].add(t.slice.value)
    return out


def _kme_class() -> ast.ClassDef:
    (cls,) = [n for n in _trees()["kme.py"].body if isinstance(n, ast.ClassDef) and n.name == "Kme"]
    return cls


def _hop_handled() -> set[str]:
    """Ops `Kme.receive` compares `op` with (its hop-message dispatch)."""
    (receive,) = [n for n in _kme_class().body if isinstance(n, ast.FunctionDef) and n.name == "receive"]
    ops = set()
    for node in ast.walk(receive):
        if isinstance(node, ast.Compare) and isinstance(node.left, ast.Name) and node.left.id == "op":
            for cmp_op, right in zip(node.ops, node.comparators):
                assert isinstance(cmp_op, ast.Eq), f"line {node.lineno}: dispatch by == only"
                assert isinstance(right, ast.Constant) and isinstance(right.value, str)
                ops.add(right.value)
    return ops


def _routed_handled() -> set[str]:
    """The keys of `Kme._ROUTED` (its routed-message dispatch table)."""
    for node in _kme_class().body:
        target = node.target if isinstance(node, ast.AnnAssign) else None
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target = node.targets[0]
        if isinstance(target, ast.Name) and target.id == "_ROUTED":
            assert isinstance(node.value, ast.Dict)
            return _dict_keys(node.value)
    raise AssertionError("Kme._ROUTED not found")


# ----------------------------------------------------------------------------- ops


def test_dispatch_tables_are_found() -> None:
    assert _hop_handled() >= {"lsa", "relay", "fwd"}
    assert set(kme.Kme._ROUTED) == _routed_handled()  # the AST reading is the class's real table


def test_documented_ops_are_the_ops_the_code_sends_and_handles(spec: Spec, emitted: dict[str, set[str]]) -> None:
    hop, routed = _hop_handled(), _routed_handled()
    assert not hop & routed, f"ops both hop and routed: {sorted(hop & routed)}"
    code = set(emitted) | hop | routed
    documented = set(spec.fields)
    assert documented == code, f"undocumented: {sorted(code - documented)}; doc only: {sorted(documented - code)}"
    handled = hop | routed
    assert set(emitted) == handled, (
        f"sent, never handled: {sorted(set(emitted) - handled)}; handled, never sent: {sorted(handled - set(emitted))}"
    )


def test_hop_and_routed_ops_are_classified_as_the_code_does(spec: Spec) -> None:
    assert spec.hop_ops == _hop_handled()
    assert spec.routed_ops == _routed_handled()


def test_field_tables_are_the_members_the_code_writes(spec: Spec, emitted: dict[str, set[str]]) -> None:
    for op, keys in emitted.items():
        documented = set(spec.fields[op])
        assert documented == keys, f"op {op!r}: table {sorted(documented)}, code writes {sorted(keys)}"
        assert spec.fields[op]["op"].type == "str"


# ----------------------------------------------------------------------------- examples


def _check_type(where: str, f: Field, value: Any) -> None:
    if value is None:
        assert f.nullable, f"{where}: nil for a field that is not {f.type}?"
        return
    ok = {
        "str": lambda v: isinstance(v, str),
        "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "bool": lambda v: isinstance(v, bool),
        "bin": lambda v: isinstance(v, bytes),
        "map": lambda v: isinstance(v, dict),
        "list[str]": lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
        "list[map]": lambda v: isinstance(v, list) and all(isinstance(x, dict) for x in v),
    }
    assert f.type in ok, f"{where}: unknown type notation {f.type!r}"
    assert ok[f.type](value), f"{where}: {type(value).__name__} is not a {f.type}"
    size = re.fullmatch(r"(\d+) bytes", f.unit)
    if f.type == "bin" and size and not isinstance(value, Shortened):
        assert len(value) == int(size.group(1)), f"{where}: {len(value)} bytes, the table says {f.unit}"


def _check_record(where: str, table: dict[str, Field], body: dict[str, Any]) -> None:
    required = {n for n, f in table.items() if not f.optional}
    assert set(body) <= set(table), f"{where}: members not in the table: {sorted(set(body) - set(table))}"
    assert set(body) >= required, f"{where}: missing members: {sorted(required - set(body))}"
    for name, value in body.items():
        _check_type(f"{where}.{name}", table[name], value)


def _check_body(spec: Spec, body: dict[str, Any], where: str = "example", routed: bool = False) -> str:
    op = body.get("op")
    assert op in spec.fields, f"{where}: op {op!r} is not documented"
    if routed:
        assert op in spec.routed_ops, f"{where}: fwd.msg carries hop message {op!r}"
    _check_record(f"{where} {op}", spec.fields[op], body)
    for name, value in body.items():
        if spec.fields[op][name].type == "list[map]":
            table = spec.nested[op].get(f"{name}[]")
            assert table is not None, f"op {op!r}: no '| {name}[] field | ...' table"
            for i, item in enumerate(value):
                _check_record(f"{where} {op}.{name}[{i}]", table, item)
    if op == "fwd":
        _check_body(spec, body["msg"], f"{where} fwd.msg", routed=True)
    if op == "pqc":
        kind = body["m"].get("type")
        assert kind in spec.nested["pqc"], f"{where}: pqc message type {kind!r} has no table"
        _check_record(f"{where} pqc.m ({kind})", spec.nested["pqc"][kind], body["m"])
    return str(op)


def test_every_example_has_exactly_its_tables_fields(spec: Spec) -> None:
    assert spec.examples
    for i, body in enumerate(spec.examples):
        _check_body(spec, body, f"example {i + 1}")


def test_every_op_has_a_complete_example(spec: Spec) -> None:
    shown: dict[str, set[str]] = {}
    for body in spec.examples:
        stack = [body]
        while stack:
            b = stack.pop()
            shown.setdefault(b["op"], set()).update(b)
            if b["op"] == "fwd":
                stack.append(b["msg"])
    assert set(shown) == set(spec.fields), f"ops without an example: {sorted(set(spec.fields) - set(shown))}"
    for op, seen in shown.items():
        assert seen == set(spec.fields[op]), f"op {op!r}: no example shows {sorted(set(spec.fields[op]) - seen)}"
    pqc_types = {b["m"]["type"] for b in spec.examples if b["op"] == "pqc"}
    assert pqc_types == set(spec.nested["pqc"]), "one example per PQC message"


def test_examples_are_valid_kms_msg_frames(spec: Spec) -> None:
    for body in spec.examples:
        frame = {"v": 1, "t": "kms_msg", "id": 0, "body": body}
        env = decode(msgpack.packb(frame, use_bin_type=True))
        assert isinstance(env.message, KmsMsg) and env.message.body["op"] == body["op"]


# ----------------------------------------------------------------------------- pqc messages


def test_pqc_tables_are_the_exchange_messages_in_transcript_order(spec: Spec) -> None:
    classes = {cls.TYPE: cls for cls in (hybrid.PqcInit, hybrid.PqcResponse, hybrid.PqcConfirm)}
    assert set(spec.nested["pqc"]) == set(classes)
    assert set(classes) == set(hybrid._MESSAGE_TYPES)  # noqa: SLF001 - every type the decoder accepts
    for kind, cls in classes.items():
        names = [f.name for f in dataclasses.fields(cls)]
        rows = spec.nested_order["pqc"][kind]
        assert set(rows) == {"type", *names}, f"{kind}: table {rows}, dataclass {names}"
        # §10.3.7: the transcript encodes the members in table order, type first, signature left out.
        assert [r for r in rows if r != "signature"] == ["type", *cls._BODY], kind  # noqa: SLF001
        table = spec.nested["pqc"][kind]
        assert table["type"].type == "str" and table["epoch_id"].type == "int"
        for name in ("x25519_public", "nonce"):
            if name in table:
                assert table[name].unit == "32 bytes"
    assert spec.nested["pqc"]["pqc-init"]["mlkem_encapsulation_key"].unit == (
        f"{hybrid.MLKEM768_ENCAPSULATION_KEY_BYTES} bytes"
    )
    assert spec.nested["pqc"]["pqc-response"]["mlkem_ciphertext"].unit == f"{hybrid.MLKEM768_CIPHERTEXT_BYTES} bytes"


def test_kdf_labels_are_named(spec: Spec) -> None:
    for label in hybrid.LABELS.values():
        assert f"`{label.decode()}`" in spec.text


# ----------------------------------------------------------------------------- constants and configuration


def test_constants_table_holds_the_codes_values(spec: Spec) -> None:
    (table,) = [t for t in md.tables(spec.text) if t[0][:3] == ["constant", "value", "defined in"]]
    assert len(table) > 10
    for row in table[1:]:
        name, module = md.unticked(row[0]), MODULES[md.unticked(row[2])]
        documented = ast.literal_eval(md.unticked(row[1]))
        actual = getattr(module, name)
        if isinstance(actual, uuid.UUID):
            actual = str(actual)
        assert type(documented) is type(actual) and documented == actual, f"{name}: doc {documented!r}, code {actual!r}"


def _config_reads() -> dict[str, tuple[bool, Any]]:
    """member -> (required, default or None) as nodes/kms/service.py reads `config`."""
    out: dict[str, tuple[bool, Any]] = {}
    for node in ast.walk(_trees()["service.py"]):
        if not isinstance(node, ast.Call) or not node.args:
            continue
        f = node.func
        if isinstance(f, ast.Name) and f.id == "_field" and len(node.args) >= 2:
            key = node.args[1]
            if isinstance(key, ast.Constant) and isinstance(key.value, str):
                out[key.value] = (True, None)
        elif (isinstance(f, ast.Attribute) and f.attr == "get" and isinstance(f.value, ast.Name)
              and f.value.id == "config" and isinstance(node.args[0], ast.Constant)):  # fmt: skip
            default = node.args[1].value if len(node.args) > 1 and isinstance(node.args[1], ast.Constant) else None
            out.setdefault(node.args[0].value, (False, default))
    return out


def test_configuration_table_is_what_the_service_reads(spec: Spec) -> None:
    (table,) = [t for t in md.tables(spec.text) if t[0][:3] == ["member", "type", "default"]]
    rows = {md.unticked(r[0]): r for r in table[1:]}
    reads = _config_reads()
    assert set(rows) == set(reads), f"doc {sorted(rows)}, service.py {sorted(reads)}"
    for name, (required, default) in reads.items():
        row = rows[name]
        assert ("opt." in row[1]) != required, f"config.{name}: 'opt.' must mark exactly the optional members"
        if default is not None:
            documented = ast.literal_eval(md.unticked(row[2]))
            assert documented == default and type(documented) is type(default), f"config.{name} default"


# ----------------------------------------------------------------------------- the constructions of §10.3.2


def _doc_ad(label: bytes, *fields: Any) -> bytes:
    """AD(label, f_1..f_k) as §10.3.2 writes it."""
    out = len(label).to_bytes(4, "big") + label
    for f in fields:
        if f is None:
            t, raw = b"n", b""
        elif isinstance(f, int):
            t, raw = b"i", f.to_bytes(8, "big")
        elif isinstance(f, str):
            t, raw = b"s", f.encode()
        else:
            t, raw = b"b", bytes(f)
        out += t + len(raw).to_bytes(4, "big") + raw
    return out


def _doc_wc(data: bytes, k: bytes) -> bytes:
    """WC(data, k) as §10.3.2 writes it (Python integers, no kernel)."""
    p = (1 << 127) - 1
    r = (int.from_bytes(k[:16], "little") % (1 << 127)) % p
    s = (int.from_bytes(k[16:32], "little") % (1 << 127)) % p
    blocks = [int.from_bytes(data[i : i + 15], "little") for i in range(0, len(data), 15)] + [len(data)]
    h = 0
    for m in blocks:
        h = (h + m) * r % p
    return ((h + s) % p).to_bytes(16, "little")


def test_ad_mac_and_seal_are_the_documented_bytes() -> None:
    rng = np.random.default_rng(20240611)
    for n in (0, 1, 14, 15, 16, 47, 48, 300):
        data, key = rng.bytes(n), rng.bytes(relay.MAC_KEY_BYTES)
        assert relay.wc_tag(data, key) == _doc_wc(data, key), n
    assert relay.wc_tag(b"x", b"\xff" * 32) == _doc_wc(b"x", b"\xff" * 32)  # r, s at the top of their range
    fields = ("alice", "bob", "3351e4d3-ca3a-4a41-8c46-c1682afad1a4", 256, 0, 16, None, b"\x00\x01", "é")
    assert relay.auth_data(relay.RELAY_LABEL, *fields) == _doc_ad(relay.RELAY_LABEL, *fields)
    payload, material, aad = rng.bytes(48), rng.bytes(48 + 32), rng.bytes(21)
    ct, tag = relay.seal_otp(payload, material, aad)
    assert ct == bytes(a ^ b for a, b in zip(payload, material[:48]))
    assert tag == _doc_wc(aad + ct, material[48:])
    assert relay.open_otp(ct, tag, material, aad) == payload


def test_assignment_ad_has_the_documented_order() -> None:
    keys = [("k1", ("p1", "p2")), ("k2", ("p3", "p4"))]
    got = delivery.assign_aad("alice", "bob", "rid-1", "a1", ("b1", "r1"), "hybrid", 512, 7, keys, ("m1",))
    # §10.3.6: K, R, rid, master, policy, size_bits, epoch, n_s, slaves, n_k, (id, n_p, parts)..., n_m, mac_keys
    assert got == ("alice", "bob", "rid-1", "a1", "hybrid", 512, 7, 2, "b1", "r1", 2,
                   "k1", 2, "p1", "p2", "k2", 2, "p3", "p4", 1, "m1")  # fmt: skip


def test_derived_ids_use_the_documented_namespace() -> None:
    base = "3351e4d3-ca3a-4a41-8c46-c1682afad1a4"
    ns = uuid.UUID("6f6e6574-656d-4b4d-9e53-646572697665")
    assert relay.derived_key_id(base) == str(uuid.uuid5(ns, base))

