"""Filesystem primitives every writer and deleter shares: durable writes, atomic replaces, and deletion
that never leaves the managed folder nor follows a symlink.

Durability rules (ext4/xfs): data is fsynced before the rename that publishes it, and the parent folder
is fsynced after, so that after a power cut the name points either to the old or to the complete new
object, never to a half-written one.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import stat
import uuid
from pathlib import Path
from typing import Any, Callable, Optional

from ckpt_daemon.errors import DiskFullError, UnsafePathError

HASH_NAME = "sha256"
CHUNK = 16 << 20


def fsync_dir(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Replace `path` with `data` atomically: temp sibling, fsync, rename, fsync folder."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_json(path: Path, obj: Any, mode: int = 0o644) -> None:
    atomic_write_bytes(Path(path), (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode(), mode)


def atomic_symlink(target: str, link: Path) -> None:
    """Point `link` at `target` (a name relative to link's folder), replacing it atomically."""
    link = Path(link)
    tmp = link.with_name(f".{link.name}.{uuid.uuid4().hex[:8]}.tmp")
    os.symlink(target, tmp)
    try:
        os.replace(tmp, link)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(link.parent)


def hash_file(path: Path, chunk: int = CHUNK) -> str:
    h = hashlib.new(HASH_NAME)
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(chunk)
        mv = memoryview(buf)
        while True:
            n = f.readinto(buf)
            if not n:
                break
            h.update(mv[:n])
    return h.hexdigest()


def free_bytes(path: Path) -> int:
    """Free space available to this user on the filesystem holding `path` (or its nearest existing parent)."""
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    st = os.statvfs(p)
    return st.f_bavail * st.f_frsize


def is_enospc(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def disk_full_error(what: str, where: Path, exc: Optional[BaseException] = None) -> DiskFullError:
    return DiskFullError(
        f"Not enough disk space to {what} in {where} ({free_bytes(where) / 2**20:.0f} MiB free"
        + (f"; {exc.strerror}" if isinstance(exc, OSError) and exc.strerror else "")
        + "). The partial write was removed and every earlier checkpoint is intact. Free space (run "
        "`python -m maintenance.cleanup --dry-run` to see what retention would remove) and it will be retried."
    )


def inside(path: Path, root: Path) -> bool:
    """True if `path` (not resolved through its last component) lies strictly inside `root`."""
    root = Path(os.path.realpath(root))
    parent = Path(os.path.realpath(Path(path).parent))
    return parent == root or parent.is_relative_to(root)


def tree_stats(path: Path) -> tuple[int, int, float]:
    """(allocated bytes, bytes freed if deleted, newest mtime) of a file or folder, never following symlinks.

    A file whose inode has other links (e.g. hard-linked into a snapshot) frees nothing when deleted.
    An inode seen twice inside the same tree counts once, and is freed if all its links are inside.
    """
    seen: dict[tuple[int, int], list] = {}
    newest = 0.0

    def visit(st: os.stat_result) -> None:
        nonlocal newest
        newest = max(newest, st.st_mtime)
        key = (st.st_dev, st.st_ino)
        if key in seen:
            seen[key][1] += 1
        else:
            seen[key] = [st, 1]

    st = os.lstat(path)
    visit(st)
    if stat.S_ISDIR(st.st_mode):
        for root, dirs, files in os.walk(path, followlinks=False):
            for name in dirs + files:
                try:
                    visit(os.lstat(os.path.join(root, name)))
                except FileNotFoundError:
                    continue
    allocated = freed = 0
    for st, count in seen.values():
        size = st.st_blocks * 512
        allocated += size
        if st.st_nlink <= count or stat.S_ISDIR(st.st_mode):
            freed += size
    return allocated, freed, newest


def remove_tree_safely(path: Path, root: Path) -> None:
    """Delete `path` (a file, a folder, or a symlink itself), which must lie inside `root`.

    Symlinks are removed as links and never followed (shutil.rmtree does not follow them; we also
    refuse to start if `path` resolves outside `root`).
    """
    path = Path(path)
    if not inside(path, root):
        raise UnsafePathError(
            f"Refusing to delete {path}: it is not inside the managed folder {root}. Nothing was deleted; "
            "check for symlinks in the path."
        )
    st = os.lstat(path)
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path)
    else:
        os.unlink(path)


def copy_into(src: Path, dst: Path, link: bool, progress: Optional[Callable[[int], None]] = None) -> int:
    """Copy the file `src` to the new file `dst`: a hard link if `link`, else a reflink when the
    filesystem supports it, else a plain copy. Returns the bytes actually written (0 for links)."""
    if link:
        os.link(src, dst, follow_symlinks=False)
        return 0
    with open(src, "rb") as fi, open(dst, "xb") as fo:
        try:
            import fcntl

            FICLONE = 0x40049409
            fcntl.ioctl(fo.fileno(), FICLONE, fi.fileno())
            os.fsync(fo.fileno())
            return 0
        except OSError:
            pass
        written = 0
        while True:
            buf = fi.read(CHUNK)
            if not buf:
                break
            fo.write(buf)
            written += len(buf)
            if progress:
                progress(len(buf))
        fo.flush()
        os.fsync(fo.fileno())
    shutil.copystat(src, dst)
    return written
