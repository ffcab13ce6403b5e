"""Every way a checkpoint (or what was built for one) leaves a folder, in one place:

- `quarantine`: a checkpoint that failed verification (or an older entry a new save takes the name of)
  moves, under the commit lock, into `.ckpt-daemon/quarantine/` with a note of why; nothing is deleted.
  `quarantined` lists what is there.
- `remove_entry`: remove whatever is at a path (a folder with what it holds, a file, a symlink itself).
- `clean_scratch`: remove the scratch folders (store/commit.py) of builders that died.
- the trash: a cleanup moves its victims, under the commit lock, into its own folder of
  `.ckpt-daemon/trash/` (`trash_run`), with a journal (`write_journal`, `read_journal`) that lets the next
  job finish a run killed half-way (`dead_trash_runs`).
"""

from __future__ import annotations

import os
import shutil
import stat
import time
import uuid
from pathlib import Path
from typing import Iterator, Optional

from ckpt_daemon import runtime
from ckpt_daemon.errors import CkptError
from ckpt_daemon.fsutil import (
    atomic_write_bytes,
    atomic_write_json,
    fsync_dir,
    inside,
    read_bytes_bounded,
    read_json_file,
)
from ckpt_daemon.store.commit import Scratch, claim_dead

QUARANTINE_DIR = "quarantine"
TRASH_DIR = "trash"
JOURNAL = ".journal.json"


def remove_entry(p: Path) -> None:
    """Remove whatever is at `p`: a folder with what it holds, or a file or symlink itself (never
    followed). A folder that cannot be removed whole is left in part (the caller checks, e.g. by a mkdir
    of that name failing)."""
    try:
        st = os.lstat(p)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(p, ignore_errors=True)
    else:
        os.unlink(p)


def clean_scratch(root: Path) -> list[str]:
    """Remove the scratch entries of builders that died. Safe to call at any time by anyone: live work
    holds its lock. Returns the ids removed."""
    removed = []
    for p in claim_dead(root, "tmp"):
        remove_entry(p)
        removed.append(p.name)
    return removed


# ------------------------------------------------------------------------------------- quarantine
def quarantine(ckpt_dir: Path, name: str, reason: str) -> Optional[Path]:
    """Move a checkpoint that failed verification (a folder or a file, any layout) out of the catalog
    into .ckpt-daemon/quarantine/, with a note of why. Nothing is deleted (the evidence stays for the
    user), it can never be chosen for resume again, and the trainer can write that step afresh under
    the same name."""
    runtime._check_name(name)
    src = Path(ckpt_dir) / name
    if src.is_symlink() or not src.exists():
        return None
    with runtime.commit_lock(ckpt_dir):
        return quarantine_locked(ckpt_dir, name, reason)


def quarantine_locked(ckpt_dir: Path, name: str, reason: str) -> Optional[Path]:
    """`quarantine`, for a caller that holds the commit lock of `ckpt_dir` already."""
    runtime._check_name(name)
    src = Path(ckpt_dir) / name
    if not src.exists() or src.is_symlink():
        return None
    qdir = runtime.state_dir(ckpt_dir, QUARANTINE_DIR)
    dst = qdir / f"{name}.{time.strftime('%Y%m%dT%H%M%S')}.{os.getpid()}.{uuid.uuid4().hex[:4]}"
    os.rename(src, dst)
    fsync_dir(ckpt_dir)
    try:
        atomic_write_bytes(qdir / f"{dst.name}.reason", (reason.strip() + "\n").encode())
    except OSError:
        pass  # the move is what protects the run; the note is for the user
    return dst


def quarantined(ckpt_dir: Path) -> list[dict]:
    """What is in quarantine: [{name, path, reason}], newest first."""
    d = Path(ckpt_dir) / runtime.STATE_DIR / QUARANTINE_DIR
    try:
        names = sorted(os.listdir(d), reverse=True)
    except OSError:
        return []
    out = []
    for n in names:
        if n.endswith(".reason"):
            continue
        try:
            reason = read_bytes_bounded(d / f"{n}.reason", 8192).decode("utf-8", "replace").strip()
        except (OSError, ValueError):
            reason = ""
        out.append({"name": n.rsplit(".", 3)[0], "path": str(d / n), "reason": reason})
    return out


# ------------------------------------------------------------------------------------------ trash
def trash_run(root: Path, keep: bool = False) -> Scratch:
    """A cleanup's own folder in `<root>/.ckpt-daemon/trash/`, locked while the cleanup lives (kept after
    it with keep=True: retention.keep_trash)."""
    return Scratch(root, "run", sub=TRASH_DIR, keep=keep)


def trash_locked(root: Path, run: Scratch, name: str) -> Path:
    """Move the checkpoint `name` of `root` into the trash folder `run` (the caller holds the commit lock
    and fsyncs `root` after its moves): it stops being a checkpoint at once. A symlink or a name outside
    `root` is refused (CkptError), never followed."""
    src = Path(root) / name
    if not inside(src, root) or os.path.islink(src):
        raise CkptError(f"{src} is a symlink or lies outside {root}")
    dst = run.path / name
    os.rename(src, dst)
    return dst


def write_journal(run: Scratch, obj: dict) -> None:
    """What a cleanup run is doing, in its trash folder, so that the next job can finish it."""
    atomic_write_json(run.path / JOURNAL, obj)


def read_journal(run_path: Path) -> dict:
    return read_json_file(run_path / JOURNAL, 16 << 20) or {}


def dead_trash_runs(root: Path) -> Iterator[Path]:
    """The trash folders of cleanups that died (or kept their trash), each locked while the caller
    empties it."""
    return claim_dead(root, TRASH_DIR)
