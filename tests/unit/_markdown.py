"""Reading docs/protocol.md in tests: fenced blocks, headings and tables (shared by the
wire-spec test and the KME-protocol test)."""

from __future__ import annotations

import re

FENCE = re.compile(r"^```(?P<tag>[a-z]*)[ \t]*\n(?P<body>.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
HEADING = re.compile(r"^(?P<hashes>#{1,6}) (?P<title>.+)$", re.MULTILINE)


def without_fences(text: str) -> str:
    """The text with fenced blocks blanked out (offsets kept), so '#' lines in them are not headings."""
    return FENCE.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), text)


def headings(text: str) -> list[tuple[int, int, str]]:
    """(offset, level, title) of every heading outside fenced blocks."""
    return [(m.start(), len(m.group("hashes")), m.group("title")) for m in HEADING.finditer(without_fences(text))]


def tables(section: str) -> list[list[list[str]]]:
    """Markdown tables of a section as rows of stripped cells (separator rows dropped); '\\|' is a literal bar."""
    found: list[list[list[str]]] = []
    current: list[list[str]] = []
    for line in without_fences(section).splitlines():
        line = line.strip()
        if line.startswith("|"):
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip("|"))]
            if not all(re.fullmatch(r":?-+:?", c) for c in cells):
                current.append(cells)
        elif current:
            found.append(current)
            current = []
    if current:
        found.append(current)
    return found


def unticked(cell: str) -> str:
    return cell.replace("`", "").replace("\\|", "|").strip()
