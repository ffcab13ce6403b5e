"""The code blocks of README.md and docs/*.md, for the tests that run them as written.

A test takes a block with `doc_block(doc, marker)`, literally in its source: `doc` is the file relative to
the repository, `marker` a piece of text only that block of that file holds. tests/test_docs.py reads
those calls from every test file and fails when a block of the documentation is taken by none (a snippet
that no test runs or validates), or when a call names a block that is not there (exactly once).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FENCE = re.compile(r"^```([\w+-]*)[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)


@dataclass(frozen=True)
class Block:
    doc: str  # the file, relative to the repository, e.g. "docs/memory.md"
    line: int  # the line of its opening fence (1-based)
    lang: str  # the fence's info string ("" for none)
    text: str  # the code, exactly as written, with its final newline


def doc_files() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def blocks(doc: str) -> list[Block]:
    text = (REPO / doc).read_text()
    return [Block(doc, text.count("\n", 0, m.start()) + 1, m.group(1), m.group(2)) for m in FENCE.finditer(text)]


def find_block(doc: str, marker: str) -> Block:
    found = [b for b in blocks(doc) if marker in b.text]
    assert len(found) == 1, f"{len(found)} code blocks of {doc} hold {marker!r} (a test needs exactly one)"
    return found[0]


def doc_block(doc: str, marker: str) -> str:
    """The one code block of `doc` that holds `marker`, exactly as written there."""
    return find_block(doc, marker).text
