"""Verify once per restart: the daemon's record of the checkpoint it has just verified for a resume.

Before (re)starting the trainer the daemon hashes every file of the checkpoint it picks (the resume
choice must be valid); the trainer's load would then hash the same bytes again. So after a successful
verification the daemon writes `verified.json` into the state folder beside the checkpoints
(`<checkpoints>/.ckpt-daemon/`, never inside a checkpoint):

    {"format": "ckpt-daemon/verified-1", "path": <the checkpoint folder's real path>, "time": <unix s>,
     "files": {name: {"st_size", "st_mtime_ns", "st_ctime_ns", "st_ino", "st_dev"}}}   # manifest.json too

The stats are taken before hashing and the record is written only if they are the same after it. A
loader (`read_checkpoint`) skips hashing a file only if the record names that folder, is at most
MAX_AGE_S old, manifest.json's stat is unchanged, and the file it opened has the recorded size, mtime,
ctime, inode and device. Any write to a file changes its ctime, which only root can set back (os.utime
restoring an mtime sets the ctime to now); a replaced file has a new inode. In every other case the
load verifies as before. The record is advisory: a missing, stale, malformed or mismatched one costs a
second hashing pass, never a wrong answer. No torch here (the daemon imports it).
"""

from __future__ import annotations

import math
import os
import stat
import time
from pathlib import Path
from typing import Any, Optional

from ckpt_daemon import runtime
from ckpt_daemon.fsutil import STAT_KEYS

RECORD = "verified.json"
FORMAT = "ckpt-daemon/verified-1"
MAX_AGE_S = 600.0  # the trainer loads within seconds of the daemon's check; a later load verifies afresh
MAX_FILES = 10_000


def folder_stats(folder: Path) -> Optional[dict[str, dict]]:
    """{name: stat fields} of the regular files in `folder` (symlinks are not followed), or None."""
    out: dict[str, dict] = {}
    try:
        with os.scandir(folder) as it:
            for de in it:
                st = de.stat(follow_symlinks=False)
                if stat.S_ISREG(st.st_mode):
                    out[de.name] = {k: getattr(st, k) for k in STAT_KEYS}
                if len(out) > MAX_FILES:
                    return None
    except OSError:
        return None
    return out


def record(folder: Path, stats: dict[str, dict], now: Optional[float] = None) -> bool:
    folder = Path(folder)
    return runtime.write_record(folder.parent, RECORD, {
        "format": FORMAT, "path": os.path.realpath(folder), "time": time.time() if now is None else now,
        "files": stats}, durable=False)


def verify_and_record(entry: Any, verify=None) -> Any:
    """`catalog.verify_entry` for the resume choice, recording a valid native checkpoint's file stats
    (taken before hashing, unchanged after) so that the trainer's load need not hash it again."""
    from ckpt_daemon.store import catalog as cat

    verify = verify or cat.verify_entry
    before = folder_stats(entry.path) if entry.layout == "native" else None
    v = verify(entry)
    if before and v.valid and v.layout == "native" and folder_stats(entry.path) == before:
        record(entry.path, before)
    return v


def _stat_ok(v: Any) -> bool:
    return isinstance(v, dict) and all(isinstance(v.get(k), int) and not isinstance(v.get(k), bool) for k in STAT_KEYS)


def trusted_stats(folder: Path, manifest_name: str = "manifest.json", now: Optional[float] = None) -> Optional[dict[str, dict]]:
    """The daemon's recorded stats of `folder`'s files if its record is for this folder, recent, well
    formed, and manifest.json is unchanged since; else None (verify as usual). Never raises."""
    folder = Path(folder)
    rec = runtime.read_record(folder.parent, RECORD, limit=4 << 20)
    if not rec or rec.get("format") != FORMAT or rec.get("path") != os.path.realpath(folder):
        return None
    t, now = rec.get("time"), time.time() if now is None else now
    if not isinstance(t, (int, float)) or isinstance(t, bool) or not math.isfinite(t) or not 0 <= now - t <= MAX_AGE_S:
        return None
    files = rec.get("files")
    if not isinstance(files, dict) or not all(isinstance(k, str) and _stat_ok(v) for k, v in files.items()):
        return None
    try:
        st = os.lstat(folder / manifest_name)
    except OSError:
        return None
    m = files.get(manifest_name)
    if m is None or any(m[k] != getattr(st, k) for k in STAT_KEYS):
        return None
    return files
