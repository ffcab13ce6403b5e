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
import logging
import os
import re
import shutil
import stat
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from ckpt_daemon.errors import DiskFullError, UnsafePathError
from ckpt_daemon.store.problems import Kind, Problem

HASH_NAME = "sha256"  # the checksum of exports, sidecars written before 0.3, and `sha256sum`
CHUNK = 16 << 20
# Checksums a manifest may name, fastest first. BLAKE3 hashes at several GB/s on every core (a tree
# hash: chunks are hashed in parallel); SHA-256 stays readable and selectable (`sha256sum` checks it).
CHECKSUMS = ("blake3", "sha256")
CHECKSUM_ENV = "CKPT_CHECKSUM"
# What tells a file unchanged since it was hashed: any write changes its ctime (which only root can set
# back; os.utime that restores an mtime sets the ctime to now), and a replaced file has a new inode.
STAT_KEYS = ("st_size", "st_mtime_ns", "st_ctime_ns", "st_ino", "st_dev")
_HEX64 = re.compile(r"[0-9a-f]{64}\Z")
_log = logging.getLogger("ckpt_daemon.fsutil")
try:
    import blake3 as _blake3
except ImportError:  # a declared dependency; without it we write sha256 and say so once
    _blake3 = None
_warned: set[str] = set()


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


def atomic_write_bytes(path: Path, data: bytes, mode: int = 0o644, durable: bool = True) -> None:
    """Replace `path` with `data` atomically: temp sibling, fsync, rename, fsync folder. With
    durable=False (status files rewritten often) the fsyncs are skipped: still never half-written."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)


def atomic_write_json(path: Path, obj: Any, mode: int = 0o644, durable: bool = True) -> None:
    atomic_write_bytes(Path(path), (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode(), mode, durable)


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


def read_bytes_bounded(path: str | os.PathLike, limit: int, dir_fd: Optional[int] = None) -> bytes:
    """The bytes of a regular file, never following a symlink and never reading more than `limit`.

    Raises OSError (ELOOP for a symlink, ENOENT...) or ValueError with the reason for a file that is
    not a regular file or is larger than `limit`: every file in the managed folders is untrusted."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"{os.fsdecode(path)} is not a regular file")
        if st.st_size > limit:
            raise ValueError(f"{os.fsdecode(path)} is {st.st_size} bytes, more than the {limit} a file of its kind may have")
        chunks, n = [], 0
        while n <= limit:
            b = os.read(fd, min(limit + 1 - n, 1 << 20))
            if not b:
                break
            chunks.append(b)
            n += len(b)
        if n > limit:
            raise ValueError(f"{os.fsdecode(path)} grew beyond the {limit} bytes a file of its kind may have")
        return b"".join(chunks)
    finally:
        os.close(fd)


def loads_json_bounded(data: bytes | str, what: str) -> Any:
    """json.loads that turns every failure, deep nesting (RecursionError) included, into ValueError."""
    try:
        return json.loads(data)
    except RecursionError:
        raise ValueError(f"{what} is nested too deeply to be a real one") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{what} is not valid JSON ({str(exc)[:120]})") from None


def read_json_file(path: str | os.PathLike, limit: int = 1 << 20, default: Any = None, kind: type = dict) -> Any:
    """A small JSON file of ours (heartbeat, pins, records): `default` if it is missing, unreadable,
    a symlink, oversized, malformed or not of type `kind`. Never raises."""
    try:
        obj = loads_json_bounded(read_bytes_bounded(path, limit), os.fsdecode(path))
    except (OSError, ValueError):
        return default
    return obj if isinstance(obj, kind) else default


def _warn_once(key: str, msg: str, *args: Any) -> None:
    if key not in _warned:
        _warned.add(key)
        _log.warning(msg, *args)


def default_checksum(requested: Optional[str] = None) -> str:
    """The checksum new checkpoints get: `requested`, else $CKPT_CHECKSUM, else blake3; sha256 (with one
    log line) where the blake3 package is missing or the name is not one we know. Never raises."""
    algo = (requested or os.environ.get(CHECKSUM_ENV) or "blake3").strip().lower()
    if algo not in CHECKSUMS:
        _warn_once(f"unknown:{algo}", "unknown checksum %r (known: %s); writing sha256 checksums", algo[:40], ", ".join(CHECKSUMS))
        return "sha256"
    if algo == "blake3" and _blake3 is None:
        _warn_once("noblake3", "the blake3 package is not installed (pip install blake3); writing sha256 checksums")
        return "sha256"
    return algo


def new_hasher(algo: str, threads: bool = True):
    """A hashlib-like object for `algo`. Raises ValueError for an algorithm we do not know, and
    LookupError where it is known but cannot be computed here (blake3 without its package).
    blake3 with threads=True hashes each large update on every core."""
    if algo == "sha256":
        return hashlib.sha256()
    if algo == "blake3":
        if _blake3 is None:
            raise LookupError("its checksums are blake3 and the blake3 package is not installed (pip install blake3)")
        return _blake3.blake3(max_threads=_blake3.blake3.AUTO) if threads else _blake3.blake3()
    raise ValueError(f"unknown checksum algorithm {str(algo)[:40]!r}")


def is_hex64(v: Any) -> bool:
    """A 64-digit lowercase hex digest (sha256, blake3), as every record of ours writes one."""
    return isinstance(v, str) and _HEX64.match(v) is not None


def digest_record(algo: str, digest: str) -> dict:
    """The checksum fields of a manifest's file record: {"sha256": hex} (the form every version reads)
    or {"algo": name, "digest": hex}."""
    return {"sha256": digest} if algo == "sha256" else {"algo": algo, "digest": digest}


def record_checksum(rec: Any) -> tuple[str, str]:
    """(algorithm, hex digest) of a manifest file record; ValueError with the reason for a record whose
    checksum is missing, of the wrong type, or of an algorithm we do not know (untrusted input)."""
    if not isinstance(rec, dict):
        raise ValueError("no file record")
    if "algo" in rec:
        algo, digest = rec.get("algo"), rec.get("digest")
        if not isinstance(algo, str) or algo not in CHECKSUMS:
            raise ValueError(f"unknown checksum algorithm {str(algo)[:40]!r}")
    elif "sha256" in rec:
        algo, digest = "sha256", rec.get("sha256")
    else:
        raise ValueError("no checksum")
    if not is_hex64(digest):
        raise ValueError(f"no valid {algo} digest")
    return algo, digest


_FADV = hasattr(os, "posix_fadvise")


def hash_file(path: Path, algo: str = HASH_NAME, chunk: int = CHUNK) -> str:
    """The hex checksum of a regular file, never following a symlink. The kernel is asked to read ahead
    of the hashing (a window of two chunks), so reading and hashing overlap without a second thread."""
    h = new_hasher(algo)
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", os.fsdecode(path))
        with os.fdopen(fd, "rb", buffering=0, closefd=False) as f:
            if _FADV:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            buf = bytearray(chunk)
            mv = memoryview(buf)
            off = 0
            while True:
                if _FADV:
                    os.posix_fadvise(fd, off + chunk, 2 * chunk, os.POSIX_FADV_WILLNEED)
                n = f.readinto(buf)
                if not n:
                    break
                h.update(mv[:n])
                off += n
    finally:
        os.close(fd)
    return h.hexdigest()


def digest_problem(path: Path, rec: Any) -> Optional[Problem]:
    """Why the file at `path` does not match its manifest record `rec` (size and checksum), or None.
    Never raises: an unreadable file, a bad record or an algorithm we cannot compute is a problem. Its
    kind: an algorithm this machine cannot compute says nothing about the bytes (unreadable); anything
    else is a file that is not what its checkpoint recorded (corrupt)."""
    name = Path(path).name
    try:
        algo, want = record_checksum(rec)
    except ValueError as exc:
        return Problem(Kind.CORRUPT, f"{name}: {exc}")
    try:
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode):
            return Problem(Kind.CORRUPT, f"{name} is not a regular file (symlinks are not followed)")
        if isinstance(rec.get("size"), int) and st.st_size != rec["size"]:
            return Problem(Kind.CORRUPT, f"{name} has {st.st_size} bytes, the manifest says {rec['size']}")
        got = hash_file(path, algo)
    except LookupError as exc:
        return Problem(Kind.UNREADABLE, f"{name} cannot be verified: {exc}")
    except OSError as exc:
        return Problem(Kind.CORRUPT, f"{name} cannot be read ({exc.strerror or exc})")
    if got != want:
        return Problem(Kind.CORRUPT, f"{name} fails its checksum ({algo} {got[:12]}..., manifest {want[:12]}...)")
    return None


def file_digest_problem(path: Path, rec: Any) -> Optional[str]:
    """The message of `digest_problem` (why the file does not match its record), or None."""
    problem = digest_problem(path, rec)
    return None if problem is None else problem.message


SYNC_FILE_RANGE_WRITE = 2
try:
    import ctypes

    _sfr = ctypes.CDLL(None, use_errno=True).sync_file_range
    _sfr.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
except (OSError, AttributeError):  # not Linux
    _sfr = None


def start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Ask the kernel to start writing this range to disk now, without waiting (Linux
    sync_file_range). The fsync at the end then finds most of the data already written, so a large
    save costs about the disk's time instead of the memory copy plus the disk's time. No durability
    is promised here: the fsync still is what makes it durable."""
    if _sfr is not None:
        _sfr(fd, offset, nbytes, SYNC_FILE_RANGE_WRITE)


def free_bytes(path: Path) -> int:
    """Free space available to this user on the filesystem holding `path` (or its nearest existing parent)."""
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    st = os.statvfs(p)
    return st.f_bavail * st.f_frsize


@dataclass(frozen=True)
class DiskUsage:
    """A filesystem's use as `df` shows it. The blocks reserved for root (5% by default on ext4, up to
    half with `mkfs -m 50`) are neither used nor available to a trainer, so the share used is
    used / (used + available), not 1 - available / size."""

    total: int  # bytes, the filesystem's size (df's 1K-blocks)
    used: int  # bytes in use (size - free)
    avail: int  # bytes this user may still write (df's Available)
    mount: str  # mount point of the filesystem holding the path

    @property
    def reserved(self) -> int:
        return max(0, self.total - self.used - self.avail)

    @property
    def used_ratio(self) -> float:
        return self.used / (self.used + self.avail) if self.used + self.avail else 0.0

    @property
    def used_percent(self) -> int:
        """df's Use%: the share rounded up, so that a nearly full disk never shows as less full than it is."""
        whole = self.used + self.avail
        return -(-self.used * 100 // whole) if whole else 0


def disk_usage(path: Path) -> DiskUsage:
    """`df` for the filesystem holding `path` (or its nearest existing parent)."""
    p = Path(os.path.abspath(path))
    while not p.exists() and p != p.parent:
        p = p.parent
    st = os.statvfs(p)
    mount = Path(os.path.realpath(p))
    while not os.path.ismount(mount) and mount != mount.parent:
        mount = mount.parent
    return DiskUsage(total=st.f_blocks * st.f_frsize, used=(st.f_blocks - st.f_bfree) * st.f_frsize,
                     avail=st.f_bavail * st.f_frsize, mount=str(mount))


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
        try:
            shutil.rmtree(path)
        except RecursionError:
            raise OSError(f"{path} holds folders nested too deeply to delete safely; remove it by hand") from None
    else:
        os.unlink(path)


FICLONE = 0x40049409


def reflink(src_fd: int, dst_fd: int) -> bool:
    """Clone src into dst (copy-on-write: shares blocks, yet a later write to either does not change
    the other). False where the filesystem cannot (ext4, tmpfs, another filesystem)."""
    import fcntl

    try:
        fcntl.ioctl(dst_fd, FICLONE, src_fd)
        return True
    except OSError:
        return False


def copy_into(src: Path, dst: Path, method: str = "copy", progress: Optional[Callable[[int], None]] = None) -> tuple[str, int]:
    """Copy the file `src` to the new file `dst` without following symlinks.

    method: "link" (hard link: zero bytes, but a byte changed in place shows in both), "reflink"
    (clone, falling back to a copy where the filesystem cannot) or "copy" (reflink where possible,
    else a plain copy). Returns (how it was done: "hard link" | "reflink" | "copy", bytes written)."""
    if method == "link":
        os.link(src, dst, follow_symlinks=False)
        return "hard link", 0
    fi = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        fo = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            if reflink(fi, fo):
                os.fsync(fo)
                return "reflink", 0
            written = 0
            while True:
                buf = os.read(fi, CHUNK)
                if not buf:
                    break
                mv = memoryview(buf)
                while mv:
                    n = os.write(fo, mv)
                    mv = mv[n:]
                written += len(buf)
                if progress:
                    progress(len(buf))
            os.fsync(fo)
        finally:
            os.close(fo)
    finally:
        os.close(fi)
    shutil.copystat(src, dst, follow_symlinks=False)
    return "copy", written
