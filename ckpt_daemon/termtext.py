"""Text that did not come from us, made inert before it reaches a terminal.

Checkpoint names, metric names read from a file, pin reasons, a trainer's output: any of them may hold
escape sequences (set the window title, clear the screen, move the cursor, hide what follows), a
carriage return that overwrites a line, a newline that forges one, or bidirectional overrides that show
text in another order than it is. Every human-readable printer passes such text through `inert`, which
writes each of those characters as a visible escape (`\\x1b`, `\\u202e`) and leaves the rest as it is.
JSON output needs none of this: json.dumps escapes control characters itself.
"""

from __future__ import annotations

import re
import unicodedata

# C0 and C1 controls (ESC, CSI 0x9b, BEL, CR, LF, TAB...), DEL, and Unicode's other invisible or
# reordering characters: format (bidi overrides, zero-width), surrogates (undecodable bytes of a name),
# private use, line and paragraph separators.
_UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Zl", "Zp"})
_MAYBE_UNSAFE = re.compile(r"[^\x20-\x7e]")  # printable ASCII needs no look-up


def _escape(m: re.Match) -> str:
    c = m.group(0)
    if unicodedata.category(c) not in _UNSAFE_CATEGORIES:
        return c
    n = ord(c)
    return f"\\x{n:02x}" if n < 0x100 else f"\\u{n:04x}" if n < 0x10000 else f"\\U{n:08x}"


def inert(text: object) -> str:
    """`text` (str() of it) with every control, format and separator character written as an escape, so
    that printing it can only ever show characters."""
    s = text if isinstance(text, str) else str(text)
    return _MAYBE_UNSAFE.sub(_escape, s)
