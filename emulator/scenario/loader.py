"""Scenario loader: YAML text -> validated :class:`Scenario`, every problem with its line.

Theory of operation
-------------------
The text is parsed once with PyYAML's *safe* loader, in two halves:
``get_single_node`` composes the node tree (each node keeps the ``Mark`` —
line and column — where it starts) and ``construct_document`` builds plain
Python data from that same tree (safe tags only: a ``!!python/...`` tag is a
syntax problem, never an object).

Before anything is constructed the node tree is measured: the document may not
be recursive, nested deeper than ``MAX_YAML_DEPTH`` or larger than
``MAX_YAML_NODES`` once aliases are expanded (a "billion laughs" document is a
few lines of text and an exponential amount of data), and a mapping may not
repeat a key (YAML says keys are unique; PyYAML silently keeps the last one,
which hides typos).

The data then goes through :func:`emulator.scenario.schema.check_data`, which
returns either a Scenario or *all* the problems it found as
(location, message) pairs.  Each location (``("links", 0, "length_km")``) is
followed down the node tree to the deepest node that exists — the value itself,
its mapping when a field is missing, the key when the key is the problem — and
that node's mark gives the 1-based line and column of the :class:`Problem`.

``scenario_to_dict`` / ``scenario_from_dict`` carry a validated scenario across
processes as JSON-able data (SI numbers, the file's key names, ``"inf"`` for an
infinite memory lifetime); ``scenario_from_dict`` re-validates, so the receiving
side trusts nothing it did not check.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from emulator.scenario.schema import FieldIssue, Loc, Scenario, check_data, format_path

__all__ = [
    "MAX_SCENARIO_BYTES",
    "MAX_YAML_DEPTH",
    "MAX_YAML_NODES",
    "Problem",
    "ScenarioError",
    "load_scenario",
    "parse_scenario",
    "scenario_from_dict",
    "scenario_to_dict",
]

#: Largest scenario file accepted (bytes of UTF-8 text).
MAX_SCENARIO_BYTES: Final = 1 << 20
#: Largest document accepted, in YAML nodes after alias expansion.
MAX_YAML_NODES: Final = 100_000
#: Deepest nesting accepted (the schema itself needs 6 levels).
MAX_YAML_DEPTH: Final = 32

_MERGE_TAG: Final = "tag:yaml.org,2002:merge"


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with a scenario, and where.

    ``line`` and ``column`` are 1-based; 0 means the problem has no position
    (unreadable file, or a scenario that came from a dict).  ``field`` is the
    dotted path (``links[0].length_km``), empty for the document as a whole.
    """

    file: str
    line: int
    column: int
    field: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}:{self.column}" if self.line > 0 else self.file
        return f"{where}: {self.field}: {self.message}" if self.field else f"{where}: {self.message}"


class ScenarioError(Exception):
    """A scenario is invalid; ``problems`` lists every problem found, in file order."""

    def __init__(self, problems: Iterable[Problem]) -> None:
        self.problems: tuple[Problem, ...] = tuple(problems)
        super().__init__(self._render())

    def _render(self) -> str:
        return "\n".join(str(p) for p in self.problems)

    def __str__(self) -> str:
        return self._render()

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.problems,))


def _sorted(problems: Iterable[Problem]) -> tuple[Problem, ...]:
    return tuple(sorted(problems, key=lambda p: (p.line, p.column, p.field, p.message)))


# ---------------------------------------------------------------------------
# YAML
# ---------------------------------------------------------------------------


def _line_col(text: str, index: int) -> tuple[int, int]:
    """1-based line and column of character `index` of `text`."""
    index = max(0, min(index, len(text)))
    line = text.count("\n", 0, index) + 1
    return line, index - (text.rfind("\n", 0, index) + 1) + 1


def _yaml_problem(err: yaml.YAMLError, text: str, filename: str) -> Problem:
    if isinstance(err, yaml.MarkedYAMLError):
        mark = err.problem_mark or err.context_mark
        message = " ".join(str(part) for part in (err.context, err.problem) if part) or "invalid YAML"
        if mark is not None:
            return Problem(filename, mark.line + 1, mark.column + 1, "", f"YAML syntax error: {message}")
        return Problem(filename, 0, 0, "", f"YAML syntax error: {message}")
    if isinstance(err, yaml.reader.ReaderError):
        line, col = _line_col(text, err.position)
        return Problem(filename, line, col, "", f"YAML syntax error: {err.reason} (character {err.character!r})")
    return Problem(filename, 0, 0, "", f"YAML syntax error: {err}")


def _children(node: Node) -> list[Node]:
    if isinstance(node, MappingNode):
        return [n for pair in node.value for n in pair]
    if isinstance(node, SequenceNode):
        return list(node.value)
    return []


def _measure(root: Node, filename: str) -> Problem | None:
    """Reject recursive, too deep or too large (after alias expansion) documents.

    Iterative post-order walk over the node graph, memoised by node identity:
    linear in the number of distinct nodes even when aliases expand
    exponentially.
    """
    size: dict[int, int] = {}
    depth: dict[int, int] = {}
    visiting: set[int] = set()
    stack: list[tuple[Node, bool]] = [(root, False)]
    while stack:
        node, finished = stack.pop()
        key = id(node)
        if finished:
            children = _children(node)
            size[key] = 1 + sum(size[id(c)] for c in children)
            depth[key] = 1 + max((depth[id(c)] for c in children), default=0)
            visiting.discard(key)
            if depth[key] > MAX_YAML_DEPTH:
                mark = node.start_mark
                return Problem(filename, mark.line + 1, mark.column + 1, "",
                               f"nested too deeply (more than {MAX_YAML_DEPTH} levels)")
            continue
        if key in size:
            continue
        if key in visiting:
            # Only a descendant of `node` can be popped while `node` is open.
            mark = node.start_mark
            return Problem(filename, mark.line + 1, mark.column + 1, "",
                           "recursive YAML alias (a node that contains itself) is not allowed")
        visiting.add(key)
        stack.append((node, True))
        stack.extend((child, False) for child in _children(node))
    if size[id(root)] > MAX_YAML_NODES:
        return Problem(filename, 1, 1, "",
                       f"document too large: {size[id(root)]} YAML nodes after alias expansion "
                       f"(limit {MAX_YAML_NODES})")
    return None


class _Keys:
    """Constructs scalar mapping keys the way safe_load does, for comparison with locations."""

    def __init__(self) -> None:
        self._constructor = yaml.constructor.SafeConstructor()

    def value(self, node: Node) -> Any:
        if not isinstance(node, ScalarNode):
            return _NO_KEY
        try:
            return self._constructor.construct_object(node, deep=True)
        except Exception:  # noqa: BLE001 - a key that does not construct matches nothing
            return _NO_KEY


_NO_KEY: Final = object()


def _same_key(a: Any, b: Any) -> bool:
    # type() first: True == 1 in Python, but `true:` and `1:` are different keys.
    return a is not _NO_KEY and type(a) is type(b) and a == b


def _duplicate_keys(root: Node, filename: str) -> list[Problem]:
    """Every mapping key written twice in the same mapping."""
    keys = _Keys()
    problems: list[Problem] = []
    seen_nodes: set[int] = set()
    stack: list[tuple[Node, Loc]] = [(root, ())]
    while stack:
        node, loc = stack.pop()
        if id(node) in seen_nodes:
            continue
        seen_nodes.add(id(node))
        if isinstance(node, MappingNode):
            first_line: list[tuple[Any, int]] = []
            for key_node, value_node in node.value:
                if key_node.tag == _MERGE_TAG:
                    stack.append((value_node, loc))
                    continue
                key = keys.value(key_node)
                if key is _NO_KEY:
                    stack.append((value_node, loc))
                    continue
                earlier = next((line for k, line in first_line if _same_key(k, key)), None)
                if earlier is not None:
                    mark = key_node.start_mark
                    problems.append(Problem(filename, mark.line + 1, mark.column + 1, format_path((*loc, str(key))),
                                            f"duplicate key {str(key)[:40]!r} (first at line {earlier})"))
                else:
                    first_line.append((key, key_node.start_mark.line + 1))
                stack.append((value_node, (*loc, key if isinstance(key, (str, int)) else str(key))))
        elif isinstance(node, SequenceNode):
            stack.extend((child, (*loc, i)) for i, child in enumerate(node.value))
    return problems


def _lookup(mapping: MappingNode, element: Any, keys: _Keys, depth: int = 0) -> tuple[Node, Node] | None:
    """The (key, value) nodes of `element` in `mapping`, following `<<` merge keys."""
    merges: list[Node] = []
    for key_node, value_node in reversed(mapping.value):  # the last duplicate wins, as in safe_load
        if key_node.tag == _MERGE_TAG:
            merges.append(value_node)
        elif _same_key(keys.value(key_node), element):
            return key_node, value_node
    if depth < MAX_YAML_DEPTH:
        for merged in merges:
            sources = merged.value if isinstance(merged, SequenceNode) else [merged]
            for source in sources:
                if isinstance(source, MappingNode):
                    found = _lookup(source, element, keys, depth + 1)
                    if found is not None:
                        return found
    return None


def _locate(root: Node, issue: FieldIssue) -> tuple[int, int]:
    """1-based line and column of the deepest node of the document on the issue's path."""
    keys = _Keys()
    node = root
    via_key: Node | None = None  # the key whose value `node` is
    for index, element in enumerate(issue.loc):
        if isinstance(node, MappingNode):
            found = _lookup(node, element, keys)
            if found is None:
                break
            key_node, value_node = found
            if issue.on_key and index == len(issue.loc) - 1:
                node, via_key = key_node, None
                break
            node, via_key = value_node, key_node
        elif isinstance(node, SequenceNode) and isinstance(element, int) and 0 <= element < len(node.value):
            node, via_key = node.value[element], None
        else:
            break
    if via_key is not None and isinstance(node, (MappingNode, SequenceNode)) and not node.flow_style:
        # A block collection starts on the line after its key; the key is where
        # the reader looks (`nodes:` for "needs at least 2 nodes").
        node = via_key
    return node.start_mark.line + 1, node.start_mark.column + 1


def _parse_yaml(text: str, filename: str) -> tuple[Node, Any, list[Problem]]:
    """The root node, the constructed data, and problems found in the tree (duplicate keys)."""
    loader: yaml.SafeLoader | None = None
    try:
        loader = yaml.SafeLoader(text)  # the reader rejects non-printable characters here
        root = loader.get_single_node()
        if root is None:
            raise ScenarioError([Problem(filename, 1, 1, "", "the scenario is empty")])
        fatal = _measure(root, filename)
        if fatal is not None:
            raise ScenarioError([fatal])
        # Before construction: PyYAML's constructor flattens `<<` merges into the node
        # tree, after which a key that overrides a merged one would look written twice.
        duplicates = _duplicate_keys(root, filename)
        data = loader.construct_document(root)
    except yaml.YAMLError as err:
        raise ScenarioError([_yaml_problem(err, text, filename)]) from None
    except RecursionError:
        raise ScenarioError([Problem(filename, 0, 0, "", "nested too deeply to parse")]) from None
    finally:
        if loader is not None:
            loader.dispose()
    return root, data, duplicates


# ---------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------


def parse_scenario(text: str, *, filename: str = "<string>") -> Scenario:
    """Validate scenario YAML `text`; `filename` only labels the problems.

    Raises :class:`ScenarioError` listing every problem found.
    """
    if not isinstance(text, str):
        raise TypeError(f"parse_scenario takes text (str), got {type(text).__name__}")
    if len(text) > MAX_SCENARIO_BYTES:  # characters <= bytes, so a cheap first check
        raise ScenarioError([Problem(filename, 0, 0, "", f"file too large (limit {MAX_SCENARIO_BYTES} bytes)")])
    root, data, problems = _parse_yaml(text, filename)
    scenario, issues = check_data(data)
    for issue in issues:
        line, column = _locate(root, issue)
        problems.append(Problem(filename, line, column, format_path(issue.loc), issue.message))
    if problems:
        raise ScenarioError(_sorted(problems))
    assert scenario is not None
    return scenario


def load_scenario(path: str | os.PathLike[str]) -> Scenario:
    """Read and validate the scenario file at `path`; raises :class:`ScenarioError`."""
    filename = os.fspath(path)
    try:
        with open(filename, "rb") as f:
            raw = f.read(MAX_SCENARIO_BYTES + 1)
    except OSError as err:
        raise ScenarioError([Problem(filename, 0, 0, "", f"cannot read the file: {err.strerror or err}")]) from None
    if len(raw) > MAX_SCENARIO_BYTES:
        raise ScenarioError([Problem(filename, 0, 0, "", f"file too large (limit {MAX_SCENARIO_BYTES} bytes)")])
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        prefix = raw[: err.start].decode("utf-8", errors="replace")
        line, column = _line_col(prefix, len(prefix))
        raise ScenarioError([Problem(filename, line, column, "", "not valid UTF-8 text")]) from None
    return parse_scenario(text, filename=filename)


def scenario_to_dict(scenario: Scenario) -> dict[str, Any]:
    """The normalised, JSON-able form: SI numbers under the file's key names.

    It is itself a valid scenario (``scenario_from_dict`` or YAML/JSON text).
    """
    return scenario.model_dump(mode="json", by_alias=True)


def scenario_from_dict(data: Any, *, source: str = "<dict>") -> Scenario:
    """Validate scenario data (e.g. the JSON written by the orchestrator).

    Raises :class:`ScenarioError`; problems carry the field path but no line
    (line 0), and `source` as their file.
    """
    scenario, issues = check_data(data)
    if issues:
        raise ScenarioError(_sorted(Problem(source, 0, 0, format_path(i.loc), i.message) for i in issues))
    assert scenario is not None
    return scenario
