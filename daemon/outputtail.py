"""The trainer's last lines of output, as a crash report shows them ("its last output").

A trainer's output is untrusted text from any program: progress bars redraw one line with carriage
returns (tqdm, Keras, a plain `print(..., end="\\r")`), colour codes and other escape sequences would act
on the terminal that shows `status`, and a line may never end. So:

- a line redrawn with `\\r` is kept in its final state only (what a terminal would show);
- ANSI escape sequences (colours, cursor moves) are removed, and every other control character is made
  inert (shown as `\\x1b`, `\\x07`, ...), so nothing shown can act on a terminal or fake a line;
- lines are bounded (`line_max` characters), and so is a line still being written (`pending_max` bytes);
  empty lines are not kept; only the last `keep` lines are.
"""

from __future__ import annotations

import collections
import re

from ckpt_daemon.termtext import inert

# CSI (ESC [ ... final), OSC (ESC ] ... BEL or ESC \), and two-character escapes (ESC x)
_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b[@-Z\\-_]")


def without_escapes(text: str) -> str:
    """`text` with ANSI escape sequences removed (colours are noise in a report) and every other control
    or invisible character shown as an escape (termtext.inert)."""
    return inert(_ANSI.sub("", text))


def final_state(line: str) -> str:
    """What a terminal shows of a line redrawn with carriage returns: its last non-blank redraw."""
    if "\r" not in line:
        return line
    parts = [p for p in line.split("\r") if p.strip()]
    return parts[-1] if parts else ""


def clean_line(raw: bytes, line_max: int = 500) -> str:
    text = without_escapes(final_state(raw.decode("utf-8", "replace"))).rstrip()
    return text if len(text) <= line_max else text[:line_max - 1] + "…"


class OutputTail:
    """Fed the raw bytes of the output as they come; keeps the last `keep` clean lines."""

    def __init__(self, keep: int = 40, line_max: int = 500, pending_max: int = 64 << 10):
        self.keep, self.line_max, self.pending_max = keep, line_max, pending_max
        self.lines: collections.deque[str] = collections.deque(maxlen=keep)
        self._pending = b""
        self._overlong = False  # the line being written passed pending_max: the rest of it is dropped

    def clear(self) -> None:
        self.lines.clear()
        self._pending, self._overlong = b"", False

    def feed(self, data: bytes) -> list[str]:
        """Add output; returns the lines it completed (clean, empty ones left out)."""
        done = []
        start = 0
        while True:
            nl = data.find(b"\n", start)
            if nl < 0:
                break
            piece = self._pending if self._overlong else self._pending + data[start:nl]
            self._pending, self._overlong, start = b"", False, nl + 1
            line = clean_line(piece, self.line_max)
            if line.strip():
                self.lines.append(line)
                done.append(line)
        if not self._overlong:
            self._pending += data[start:]
            if len(self._pending) > self.pending_max:
                cr = self._pending.rfind(b"\r")
                if 0 <= cr and len(self._pending) - cr <= self.pending_max:
                    self._pending = self._pending[cr:]  # a progress bar redrawn many times: its last redraw
                else:
                    self._pending, self._overlong = self._pending[:self.pending_max], True
        return done

    def flush(self) -> list[str]:
        """The output ended: a last line without a newline counts too."""
        if not self._pending:
            return []
        return self.feed(b"\n")

    def last(self, n: int) -> list[str]:
        """The last `n` lines, with the line being written (e.g. a progress bar) in its present state."""
        out = list(self.lines)
        if self._pending and not self._overlong:
            cur = clean_line(self._pending, self.line_max)
            if cur.strip():
                out.append(cur)
        return out[-n:]
