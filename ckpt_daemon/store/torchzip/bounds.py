"""The bounds on untrusted input (`Limits`, the CPU budget) and the errors a file that breaks one, or
is not a complete torch.save file, raises."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Optional

from ckpt_daemon.store.problems import Kind, Problem

MiB = 1024 * 1024


class TorchZipError(ValueError):
    """The file is not a complete, readable torch.save archive, or a bound was exceeded.

    `str(err)` is a short reason in plain words ("truncated (no zip central directory)",
    "storage data/3 is missing", "CRC of data/5 fails", ...); `kind` says what it makes the file
    (`Kind.CORRUPT` for a failing CRC, `Kind.INVALID` for a file that is not a torch.save file or asks
    for more work than any checkpoint needs, `Kind.UNREADABLE` when it was not told apart in time,
    else `Kind.INCOMPLETE`): callers classify by `kind`, never by the words.
    """

    kind: Kind = Kind.INCOMPLETE

    def __init__(self, message: str = "", kind: Optional[Kind] = None) -> None:
        super().__init__(message)
        if kind is not None:
            self.kind = kind

    def __reduce__(self) -> Any:
        return type(self), (str(self), self.kind)

    @property
    def problem(self) -> Problem:
        return Problem(self.kind, str(self))


class TorchZipLimitError(TorchZipError):
    """A bound of `Limits` was exceeded: the file asks for more work than any real checkpoint needs
    (a million entries, a central directory of gigabytes...). Not a checkpoint, whatever its name."""

    kind = Kind.INVALID


class TorchZipTimeout(TorchZipLimitError):
    """The structure check used up its CPU time (`Limits.max_cpu_s`): whatever the file is, it was not
    told apart from a checkpoint in time. Callers report it as unreadable, never as damage."""

    kind = Kind.UNREADABLE


def _not_torch(why: str) -> TorchZipError:
    """A file that is not a torch.save file at all (`Kind.INVALID`): `why` in the words users see."""
    return TorchZipError(f"not a torch.save file {why}", Kind.INVALID)


def _crc_fails(rel: str) -> TorchZipError:
    """An entry whose bytes fail their CRC-32: damaged after it was written (`Kind.CORRUPT`)."""
    return TorchZipError(f"CRC of {rel} fails", Kind.CORRUPT)


class _Budget:
    """The CPU time one check may spend on structure (this thread's time: a busy machine does not count).
    `tick()` is called every few thousand items of any loop over untrusted counts."""

    __slots__ = ("limit", "end")

    def __init__(self, limit_s: float) -> None:
        self.limit = limit_s
        self.end = time.thread_time() + limit_s

    def tick(self) -> None:
        if time.thread_time() > self.end:
            raise TorchZipTimeout(f"checking its structure took more than {self.limit:g} CPU seconds; "
                                  "no real checkpoint needs that")


@dataclass(frozen=True)
class Limits:
    """Every bound applied to untrusted input. The defaults fit real checkpoints with a wide margin."""

    max_pickle_bytes: int = 64 * MiB      # size of data.pkl
    max_pickle_ops: int = 4_000_000       # opcodes in data.pkl (torch memoizes nearly every object: ~2 per value)
    max_depth: int = 128                  # nesting of the unpickled structure (and of tuples, in the scan)
    max_nodes: int = 2_000_000            # objects visited when walking the unpickled structure
    max_globals: int = 10_000             # distinct module.name globals data.pkl may name
    max_entries: int = 250_000            # zip entries; a real file has one per storage (the largest MoE
                                          # training state in one file: ~200k), plus a few records
    max_cd_bytes: int = 64 * MiB          # the zip central directory, read whole (~100 bytes per entry)
    max_extra_entries: int = 64           # entries beyond the storages data.pkl names (torch.save writes ~6)
    max_cpu_s: float = 30.0               # CPU seconds (this thread's) to check the structure; CRCs excluded
                                          # (the largest real file here: ~10 s for 250k storages)
    max_scalar_reads: int = 4096          # small tensors read from storages by one `inspect`
    max_string: int = 4096                # longest path / string reported in TorchFileInfo


_DEFAULT_LIMITS = Limits()


class _Malformed(Exception):
    pass



def _short(s: Any, n: int = 80) -> str:
    if type(s) is not str:
        return f"<{type(s).__name__}>"
    return repr(s if len(s) <= n else s[:n] + "...")


def _describe(e: BaseException) -> str:
    """An exception as text, without ever calling repr on untrusted objects."""
    name = type(e).__name__
    if isinstance(e, _Malformed) and e.args and type(e.args[0]) is str:
        return e.args[0]
    if all(type(a) in (str, int) for a in e.args):
        try:
            msg = str(e)
        except Exception:
            msg = ""
        msg = msg if len(msg) <= 200 else msg[:200] + "..."
        return f"{name}: {msg}" if msg else name
    return name
