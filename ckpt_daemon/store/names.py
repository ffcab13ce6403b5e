"""Checkpoint names and what they say: the configured `{step}` patterns, the native name, the one regex
that reads a step out of any name, the reserved names (pointers, temp prefixes), and the `Status` and
`Layout` of a catalog entry.

Every name in a checkpoint folder is untrusted: only ASCII digits name a step (str.isdigit and re's \\d
also accept Arabic-Indic or full-width digits), and never more than `MAX_STEP_DIGITS` of them.
Stdlib only.
"""

from __future__ import annotations

import re
from enum import Enum
from typing import Iterable, Optional

POINTERS = ("latest", "best")
HF_TEMP_PREFIX = "tmp-"  # Hugging Face's tmp-checkpoint-<step> (and 0.1's .tmp- folders)
TEMP_PREFIXES = (".tmp-", HF_TEMP_PREFIX)
TORCH_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")
MAX_STEP_DIGITS = 15
NATIVE_PATTERN = "checkpoint-{step}"

_DIGITS = f"[0-9]{{1,{MAX_STEP_DIGITS}}}"  # ASCII digits only, never more than MAX_STEP_DIGITS
# The step any checkpoint name says, whatever its pattern: `step=100`, `step_100`, `checkpoint-100`...
_STEP_IN_NAME = re.compile(rf"(?:step[=_-]?|checkpoint-)({_DIGITS})(?![0-9])")
_NUMBER = re.compile(_DIGITS)


class StrEnum(str, Enum):
    """A str Enum (enum.StrEnum is Python >= 3.11): members are their strings, in comparisons, hashing,
    JSON, f-strings and str()."""

    def __str__(self) -> str:
        return str.__str__(self)

    def __format__(self, spec: str) -> str:
        return str.__format__(str.__str__(self), spec)


class Status(StrEnum):
    """What a catalog entry is (see catalog.py)."""

    COMPLETE = "complete"
    INCOMPLETE = "incomplete"
    CORRUPT = "corrupt"
    INVALID = "invalid"
    UNREADABLE = "unreadable"
    IN_PROGRESS = "in_progress"


class Layout(StrEnum):
    """How a checkpoint is laid out on disk."""

    NATIVE = "native"  # checkpoint-<step>/ with manifest.json
    HF = "hf"          # a Hugging Face Trainer checkpoint-<step>/ folder (trainer_state.json)
    FILE = "file"      # one file matched by a `{step}` pattern (torch.save, safetensors)


STATUSES = tuple(s.value for s in Status)


def native_name(step: int) -> str:
    return f"checkpoint-{step}"


def step_in_name(name: str) -> Optional[int]:
    """The step a name says by the usual conventions (`step=100`, `step_100`, `checkpoint-100`), else
    None. The one place a step is read out of a name without a configured pattern."""
    m = _STEP_IN_NAME.search(name)
    return int(m.group(1)) if m else None


def as_step(text: str) -> Optional[int]:
    """`text` read as a step number when it is one (ASCII digits only, at most MAX_STEP_DIGITS), else None."""
    return int(text) if isinstance(text, str) and _NUMBER.fullmatch(text) else None


def number_in_name(name: str, last: bool = False) -> Optional[int]:
    """The first (or `last`) run of ASCII digits in a name (at most MAX_STEP_DIGITS of them), else None."""
    found = _NUMBER.findall(name) if last else _NUMBER.search(name)
    if not found:
        return None
    return int(found[-1] if last else found.group(0))


def compile_pattern(pattern: str) -> re.Pattern:
    """`checkpoint-{step}` -> a regex whose fields match ASCII digits only (str.isdigit and re's \\d
    also accept Arabic-Indic or full-width digits, which must never name a step). A pattern ending in a
    file suffix also matches Lightning's re-saves of the same name: `epoch=1-step=100-v1.ckpt`."""
    out, pos = "", 0
    for m in re.finditer(r"\{([A-Za-z_][A-Za-z0-9_]*)\}", pattern):
        out += re.escape(pattern[pos : m.start()]) + f"(?P<{m.group(1)}>[0-9]+)"
        pos = m.end()
    tail = pattern[pos:]
    suffix = re.search(r"\.[A-Za-z0-9]{1,10}\Z", tail)
    if suffix:
        out += re.escape(tail[: suffix.start()]) + r"(?:-v(?P<_version>[0-9]{1,6}))?" + re.escape(suffix.group(0))
    else:
        out += re.escape(tail)
    return re.compile(out + r"\Z")


def match_name(name: str, patterns: Iterable[re.Pattern]) -> Optional[dict]:
    for rx in patterns:
        m = rx.match(name)
        if m:
            out = {}
            for k, v in m.groupdict().items():
                if v is not None:
                    if len(v) > MAX_STEP_DIGITS:
                        return None
                    out[k] = int(v)
            return out
    return None
