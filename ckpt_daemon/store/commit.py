"""The one way a checkpoint (or an export, a snapshot, a restored or downloaded copy) comes into a folder:
built in that folder's scratch space (`Scratch`: `<root>/.ckpt-daemon/tmp/<id>/`, with a lock held while its
builder lives), every file and folder in it fsynced, then, under the commit lock of `root`, renamed to its
final name and the folder fsynced. Leaving a `Scratch` without a commit removes what was built: no
`.tmp-` leftovers, and a builder killed mid-way leaves a folder whose lock nobody holds, which
`delete.clean_scratch` (run at the start of every job) removes.

Options of `Scratch.commit` (see `commit`):
- `entry`: what is committed, when it is not the scratch folder itself (a single file built inside it);
- `sidecar`: the sidecar manifest of another trainer's checkpoint (store/foreign.py), written under the
  lock before the rename (so the entry is never seen unrecorded), forgotten again if the rename fails;
- `replace`: a reason; a name already taken goes to quarantine with it (a symlink there is unlinked,
  never followed) and the new entry takes the name, as the trainers' own writers overwrite it. Without
  it, a taken name is a FileExistsError and nothing is changed;
- `overwrite`: a taken name is replaced atomically (os.replace: a file over a file only);
- `then`: called under the lock just after the commit (a native save's `latest`/`best` pointers).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat
import uuid
from pathlib import Path
from typing import Callable, Iterator, Optional

from ckpt_daemon import runtime
from ckpt_daemon.errors import UnsafePathError
from ckpt_daemon.fsutil import fsync_dir
from ckpt_daemon.store.locks import lock_held, open_lock_file

log = logging.getLogger("ckpt_daemon.store.commit")


def _lock_fd(path: Path) -> int:
    return open_lock_file(path)


def fsync_tree(path: Path) -> None:
    """fsync every regular file and folder at or under `path` (symlinks are not followed), the folders
    after what they hold."""
    path = Path(path)
    st = os.lstat(path)
    if stat.S_ISREG(st.st_mode):
        _fsync_path(path)
        return
    if not stat.S_ISDIR(st.st_mode):
        return
    for top, _dirs, files in os.walk(path, topdown=False, followlinks=False):
        for n in files:
            p = os.path.join(top, n)
            if stat.S_ISREG(os.lstat(p).st_mode):
                _fsync_path(p)
        fsync_dir(top)


def _fsync_path(p: str | os.PathLike) -> None:
    fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit(root: Path, built: Path, dest: Path, *, sidecar: Optional[dict] = None, replace: Optional[str] = None,
           overwrite: bool = False, then: Optional[Callable[[], None]] = None,
           renamed: Optional[Callable[[Path], None]] = None, timeout_s: float = 600.0) -> Path:
    """Put `built` (a folder or a file in the scratch space of `root`) at `dest` (in `root`): fsync all of
    it, take the commit lock of `root`, free or refuse a taken name (see the module's options), write the
    sidecar, rename, fsync the folder, call `then`. `renamed(dest)` is called as soon as the rename is done
    (whatever fails after it, the entry is committed). Raises FileExistsError when the name is taken (and
    not `replace`d), TrainingActiveError when the lock is not had within `timeout_s`, OSError."""
    root, built, dest = Path(root), Path(built), Path(dest)
    fsync_tree(built)
    with runtime.commit_lock(root, timeout_s):
        if os.path.lexists(dest) and replace is not None:
            _free_name(root, dest, replace)
        if os.path.lexists(dest) and not overwrite:
            raise FileExistsError(errno.EEXIST, f"{dest} already exists; refusing to overwrite it", str(dest))
        if sidecar is not None:
            from ckpt_daemon.store import foreign

            foreign.write_sidecar(root, dest.name, built, sidecar["layout"], sidecar["step"],
                                  sidecar.get("meta") or {}, sidecar["files"])
        try:
            if overwrite:
                os.replace(built, dest)
            else:
                os.rename(built, dest)
        except BaseException:
            if sidecar is not None:
                from ckpt_daemon.store import foreign

                foreign.forget(root, dest.name)
            raise
        if renamed is not None:
            renamed(dest)
        fsync_dir(dest.parent)
        if then is not None:
            then()
    return dest


def _free_name(root: Path, dest: Path, why: str) -> None:
    """The name `dest` is taken by an older entry: a symlink goes (never followed), anything else is moved
    to quarantine with `why` (the commit lock is held by our caller). Errors are logged: the caller finds
    the name still taken."""
    from ckpt_daemon.store import delete

    try:
        if os.path.islink(dest):
            os.unlink(dest)
        else:
            delete.quarantine_locked(root, dest.name, why)
    except (OSError, ValueError, UnsafePathError) as exc:
        log.error("ckpt-daemon: cannot move the older %s out of the way (%s)", dest, exc)


class Scratch:
    """A folder being built in `<root>/.ckpt-daemon/<sub>/` (tmp/ by default), with a sibling lock file
    held while its builder lives. `commit(dest)` puts it into place (`commit` above); leaving the block
    removes what is left of it (unless keep=True). A builder killed mid-way leaves a folder whose lock
    nobody holds: `delete.clean_scratch` (or, for the trash, cleanup's recovery) finishes it off."""

    def __init__(self, root: Path, label: str, sub: str = "tmp", keep: bool = False):
        self.root = Path(root)
        d = runtime.state_dir(root, sub)
        safe = "".join(c if c.isascii() and (c.isalnum() or c in "-_=.") else "_" for c in label)[:100]
        self.id = f"{safe}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.lock_path = d / f"{self.id}.lock"
        self.path = d / self.id
        self.keep = keep
        # Locked under a name nobody looks at, then renamed into place: the lock file is never seen unlocked.
        # Between its creation and our flock, clean_scratch may take it for a dead builder's and remove it:
        # then the rename fails and it is made again.
        pending = d / f".{self.id}.lock.new"
        for attempt in range(5):
            self.fd: Optional[int] = _lock_fd(pending)
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            try:
                os.rename(pending, self.lock_path)
                break
            except FileNotFoundError:
                os.close(self.fd)
                if attempt == 4:
                    raise
        os.mkdir(self.path, 0o755)
        self.committed: Optional[Path] = None

    def commit(self, dest: Path, entry: Optional[Path] = None, **options) -> Path:
        """Commit the scratch folder (or `entry`, built inside it) as `dest`, which must be in this
        scratch's root. See `commit` for the options."""
        def renamed(p: Path) -> None:
            self.committed = p

        return commit(self.root, self.path if entry is None else entry, dest, renamed=renamed, **options)

    def close(self) -> None:
        if not self.keep:
            from ckpt_daemon.store.delete import remove_entry

            remove_entry(self.path)  # whatever was not committed (all of it, or the folder a file was built in)
        if self.fd is not None:
            try:
                os.unlink(self.lock_path)
            except OSError:
                pass
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "Scratch":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def live_scratch(root: Path, sub: str = "tmp") -> list[str]:
    """Ids of scratch entries whose builder is alive (e.g. a save being written)."""
    d = Path(root) / runtime.STATE_DIR / sub
    try:
        names = os.listdir(d)
    except OSError:
        return []
    return sorted(n[:-5] for n in names if n.endswith(".lock") and n[:-5] in names and lock_held(d / n))


def claim_dead(root: Path, sub: str = "tmp") -> Iterator[Path]:
    """Yield the folders in `<root>/.ckpt-daemon/<sub>/` whose builder died (lock free or never made),
    holding their lock while the caller deals with each; the lock file goes once the entry is gone.
    Anything else found there (a symlink, a FIFO, a stray file) was not made by us as it is: it is
    unlinked as it stands, never followed, listed or opened."""
    try:
        d = runtime.state_dir(root, sub, create=False)
        names = set(os.listdir(d))
    except (OSError, UnsafePathError):
        return
    for n in sorted(names):
        p = d / n
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            continue
        if n.startswith("."):  # a lock being made (see Scratch): stale only if nobody holds it
            if n.endswith(".lock.new") and stat.S_ISREG(st.st_mode) and not lock_held(p):
                _unlink_quietly(p)
            continue
        if n.endswith(".lock"):
            if n[:-5] not in names and stat.S_ISREG(st.st_mode) and not lock_held(p):  # killed between rename and unlink
                _unlink_quietly(p)
            elif not stat.S_ISREG(st.st_mode):
                _unlink_quietly(p)
            continue
        if not stat.S_ISDIR(st.st_mode):
            _unlink_quietly(p)  # a symlink (or file) in our scratch space: removed as a link, never followed
            continue
        fd = None
        if f"{n}.lock" in names:
            try:
                fd = os.open(d / f"{n}.lock", os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    raise OSError("not a regular file")
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                if fd is not None:
                    os.close(fd)
                continue  # its builder is alive (or its lock is not a file: leave both alone)
        try:
            yield p
        finally:
            if fd is not None:
                if not os.path.lexists(p):
                    _unlink_quietly(d / f"{n}.lock")
                os.close(fd)


def _unlink_quietly(p: Path) -> None:
    try:
        os.unlink(p)
    except OSError:
        pass
