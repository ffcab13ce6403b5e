"""Verified, resumable upload of one checkpoint to a replica target.

Each file is streamed in parts of `part_size` (at most `parallel` parts in memory at once): every byte
read is hashed with the checksum the local manifest or sidecar recorded (a file that does not match
is not sent: the upload is aborted), and every part carries its own SHA-256, which the server checks
before it accepts the part. After the server assembled the object, its checksum (S3's composite
SHA-256 of the parts) is compared with ours. Only when every file passed is the remote manifest
written, create-only: the replica then exists, whole and verified, or not at all.

An upload interrupted by a crash, a kill or an outage is resumed: the server still holds the parts it
accepted; a part is skipped only if its size and MD5 (the server's ETag of a part) equal the local
part's. A file already uploaded whole by an earlier attempt is reused when the server's checksum equals
the one computed from the local bytes.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import mmap
import os
import queue
import socket
import stat
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from ckpt_daemon.fsutil import new_hasher, record_checksum
from ckpt_daemon.remote import format as fmt
from ckpt_daemon.remote.errors import (
    Cancelled,
    LocalChanged,
    RemoteConflict,
    RemoteError,
    RemoteIntegrityError,
    RemoteNotFound,
)
from ckpt_daemon.remote.source import Source
from ckpt_daemon.remote.store import Store, Throttle, b64, composite_sha256

MAX_PARTS = 10_000  # S3's limit
MIB = 1 << 20


def lower_priority() -> None:
    """The calling thread runs at nice 19 and in the idle I/O class: a training step, a save or a restart
    always comes first. Best effort (a container may forbid it)."""
    tid = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, tid, 19)
    except (OSError, AttributeError):
        pass
    try:
        import psutil

        psutil.Process(tid).ionice(psutil.IOPRIO_CLASS_IDLE)
    except Exception:  # not Linux, or not allowed: only the CPU priority applies
        pass


class Pool:
    """A bounded pool of daemon threads at low priority (concurrent.futures' own threads are joined at
    interpreter exit: a part stuck in retries against a dead server would hold the daemon's stop)."""

    def __init__(self, workers: int, name: str = "replica-io"):
        self.workers, self.name = workers, name
        self.q: "queue.SimpleQueue" = queue.SimpleQueue()
        self.threads: list[threading.Thread] = []
        self.lock = threading.Lock()
        self.closed = False

    def submit(self, fn, *args) -> cf.Future:
        f: cf.Future = cf.Future()
        with self.lock:
            if self.closed:
                raise RuntimeError("the transfer pool is shut down")
            if len(self.threads) < self.workers:
                t = threading.Thread(target=self._work, daemon=True, name=f"{self.name}-{len(self.threads)}")
                self.threads.append(t)
                t.start()
        self.q.put((f, fn, args))
        return f

    def _work(self) -> None:
        lower_priority()
        while True:
            item = self.q.get()
            if item is None:
                return
            f, fn, args = item
            del item
            if not f.set_running_or_notify_cancel():
                continue
            try:
                f.set_result(fn(*args))
            except BaseException as exc:  # handed to whoever waits on the future
                f.set_exception(exc)
            del f, fn, args  # nothing of a finished task stays alive while waiting for the next

    def shutdown(self, wait: bool = False, cancel_futures: bool = True) -> None:
        with self.lock:
            self.closed = True
            threads = list(self.threads)
        if cancel_futures:
            while True:
                try:
                    item = self.q.get_nowait()
                except queue.Empty:
                    break
                if item is not None:
                    item[0].cancel()
        for _ in threads:
            self.q.put(None)
        if wait:
            for t in threads:
                t.join()


@dataclass
class Transfer:
    """How one target moves bytes: its worker pool (bounded), part size, bandwidth cap and cancellation."""

    parallel: int = 4
    part_size: int = 16 * MIB
    throttle: Throttle = field(default_factory=lambda: Throttle(None))
    progress: Callable[..., None] = lambda n, sent=True: None  # bytes done (sent=False: already on the server)
    pool: Optional[Pool] = None

    def __post_init__(self) -> None:
        if self.pool is None:
            self.pool = Pool(self.parallel)

    @property
    def cancel(self) -> threading.Event:
        return self.throttle.cancel

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


def part_size_for(size: int, base: int) -> int:
    ps = base
    while -(-size // ps) > MAX_PARTS:
        ps *= 2
    return ps


def origin() -> dict:
    return {"host": socket.gethostname()[:255], "time": time.time()}


# ------------------------------------------------------------------------------------------- a file
def _local_fd(path: Path, size: int) -> int:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        raise LocalChanged(f"{path} was deleted before it was uploaded (retention or a person removed it)") from None
    except OSError as exc:
        raise LocalChanged(f"{path} cannot be read ({exc.strerror or exc})") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_size != size:
        os.close(fd)
        raise LocalChanged(f"{path} has {st.st_size} bytes, its recorded size is {size}: it changed after it was "
                           "recorded, so it is not replicated")
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
    return fd


def _buffer(n: int):
    """A part's buffer: its own anonymous mapping, so that its memory goes back to the system the moment the
    part is sent (a bytearray this large would stay in the allocator's heap, and the daemon's RSS with it)."""
    if n == 0:
        return bytearray()
    return mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)


def _free(view: memoryview, buf) -> None:
    """Give a sent part's memory back now (not when the last reference a client library keeps goes)."""
    view.release()
    if isinstance(buf, mmap.mmap):
        try:
            buf.close()
        except BufferError:
            pass  # still exported somewhere: freed with its last reference


def _read_exact(fd: int, off: int, n: int, path: Path):
    buf = _buffer(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = os.preadv(fd, [view[got:]], off + got)
        if k == 0:
            raise LocalChanged(f"{path} got shorter while it was uploaded")
        got += k
    return buf


class _Parts:
    """The parts of one file in flight: at most `parallel` buffers alive, the first error kept."""

    def __init__(self, t: Transfer, n: int):
        self.t = t
        self.sem = threading.BoundedSemaphore(t.parallel)
        self.digests: list[Optional[bytes]] = [None] * n
        self.etags: list[Optional[str]] = [None] * n
        self.error: Optional[BaseException] = None
        self.futures: list[cf.Future] = []

    def acquire(self) -> None:
        while not self.sem.acquire(timeout=0.5):
            if self.t.cancel.is_set():
                raise Cancelled("the transfer was cancelled")

    def submit(self, fn, *args) -> None:
        held = list(args)

        def run():
            try:
                fn(*held)
            except BaseException as exc:  # kept and raised by the reader, which stops reading
                if self.error is None:
                    self.error = exc
            finally:
                held.clear()  # the part's buffer is freed before the next one may be read
                self.sem.release()

        self.futures.append(self.t.pool.submit(run))

    def wait(self) -> None:
        cf.wait(self.futures)
        if self.error is not None:
            raise self.error


def upload_file(store: Store, key: str, path: Optional[Path], record: dict, t: Transfer,
                inline: Optional[bytes] = None, reuse: bool = True) -> dict:
    """Upload one file (from `path`, or the bytes `inline`) whose size and checksum are `record`; returns
    what the remote manifest keeps of it: {part_size, server: {sha256, etag}}."""
    size = record["size"]
    algo, want = record_checksum(record)
    ps = part_size_for(size, t.part_size)
    meta = {"ckpt-digest": f"{algo}:{want}"}
    if inline is not None:
        if len(inline) != size or _digest(algo, inline) != want:
            raise LocalChanged(f"{key}: the bytes read do not match their recorded checksum")
        info = store.put_bytes(key, inline, hashlib.sha256(inline).digest(), meta, throttle=t.throttle)
        t.progress(size)
        return {"part_size": max(size, 1), "server": {"sha256": info.sha256, "etag": info.etag}}
    reused = _reuse(store, key, path, size, algo, want, ps, meta, t) if reuse else None
    if reused is not None:
        return reused
    if size <= ps:  # one request
        fd = _local_fd(path, size)
        try:
            data = _read_exact(fd, 0, size, path)
        finally:
            os.close(fd)
        if _digest(algo, data) != want:
            raise LocalChanged(f"{path} fails its recorded {algo} checksum: the local copy is damaged, so it is "
                               "not replicated (`ckpt-daemon list --verify` shows it)")
        sha = hashlib.sha256(data).digest()
        info = store.put_bytes(key, data, sha, meta, throttle=t.throttle)
        if info.sha256 is not None and info.sha256 != b64(sha):
            raise RemoteIntegrityError(f"{key}: the server's checksum {info.sha256} differs from ours {b64(sha)}")
        t.progress(size)
        return {"part_size": max(size, 1), "server": {"sha256": info.sha256, "etag": info.etag}}
    return _multipart(store, key, path, size, algo, want, ps, meta, t)


def _digest(algo: str, data) -> str:
    h = new_hasher(algo, threads=False)
    h.update(data)
    return h.hexdigest()


def _local_digests(path: Path, size: int, algo: str, ps: int, t: Transfer) -> tuple[str, list[bytes]]:
    """(our checksum, the parts' SHA-256s) of a local file, read once."""
    fd = _local_fd(path, size)
    h = new_hasher(algo, threads=False)
    parts = []
    try:
        for off in range(0, max(size, 1), ps):
            if t.cancel.is_set():
                raise Cancelled("the transfer was cancelled")
            buf = _read_exact(fd, off, min(ps, size - off), path)
            h.update(buf)
            parts.append(hashlib.sha256(buf).digest())
    finally:
        os.close(fd)
    return h.hexdigest(), parts


def _reuse(store: Store, key: str, path: Path, size: int, algo: str, want: str, ps: int, meta: dict,
           t: Transfer) -> Optional[dict]:
    """The object an earlier, interrupted attempt uploaded whole, if the server's checksum equals the one of
    the local bytes (and those match their record)."""
    info = store.head(key)
    if info is None or info.size != size or info.sha256 is None or info.metadata.get("ckpt-digest") != meta["ckpt-digest"]:
        return None
    ours, parts = _local_digests(path, size, algo, ps, t)
    if ours != want:
        raise LocalChanged(f"{path} fails its recorded {algo} checksum: the local copy is damaged, so it is not replicated")
    expect = b64(parts[0]) if len(parts) == 1 and "-" not in info.sha256 else composite_sha256(parts)
    if info.sha256 != expect:
        return None
    t.progress(size, sent=False)
    return {"part_size": ps if "-" in info.sha256 else max(size, 1), "server": {"sha256": info.sha256, "etag": info.etag}}


def _resume_or_start(store: Store, key: str, meta: dict) -> tuple[str, dict[int, tuple[int, str]]]:
    """An unfinished upload of this very key to continue (the newest; older ones are aborted), or a new one."""
    mine = sorted((u for u in store.open_uploads(key) if u[0] == key), key=lambda u: u[2])
    for _, uid, _ in mine[:-1]:
        store.abort_upload(key, uid)
    if mine and store.resumable:
        uid = mine[-1][1]
        try:
            return uid, store.uploaded_parts(key, uid)
        except RemoteNotFound:
            pass
    elif mine:
        store.abort_upload(key, mine[-1][1])
    return store.start_upload(key, meta), {}


def _multipart(store: Store, key: str, path: Path, size: int, algo: str, want: str, ps: int, meta: dict,
               t: Transfer) -> dict:
    uid, have = _resume_or_start(store, key, meta)
    n = -(-size // ps)
    parts = _Parts(t, n)

    def send(i: int, off: int, buf) -> None:
        view = memoryview(buf)
        d = hashlib.sha256(view).digest()
        parts.digests[i] = d
        had = have.get(i + 1)
        if had is not None and had[0] == len(buf) and had[1] == hashlib.md5(view).hexdigest():
            parts.etags[i] = had[1]  # accepted by the server before the interruption: the same bytes
            t.progress(len(buf), sent=False)
        else:
            parts.etags[i] = store.upload_part(key, uid, i + 1, off, view, d, t.throttle)
            t.progress(len(buf))
        _free(view, buf)

    h = new_hasher(algo, threads=False)
    fd = _local_fd(path, size)
    try:
        for i in range(n):
            parts.acquire()
            if parts.error is not None:
                parts.sem.release()
                break
            off = i * ps
            try:
                buf = _read_exact(fd, off, min(ps, size - off), path)
            except BaseException:
                parts.sem.release()
                raise
            h.update(buf)
            parts.submit(send, i, off, buf)
    except BaseException:
        cf.wait(parts.futures)
        raise
    finally:
        os.close(fd)
    parts.wait()
    if h.hexdigest() != want:
        store.abort_upload(key, uid)
        raise LocalChanged(f"{path} fails its recorded {algo} checksum: the local copy is damaged, so it is not "
                           "replicated (`ckpt-daemon list --verify` shows it)")
    info = store.complete_upload(key, uid, [(i + 1, parts.etags[i], b64(parts.digests[i])) for i in range(n)], size, ps)
    expect = composite_sha256(parts.digests)
    if info.size != size or (info.sha256 is not None and info.sha256 != expect):
        store.delete([key])
        raise RemoteIntegrityError(f"{key}: the server assembled {info.size} bytes with checksum {info.sha256}; ours are "
                                   f"{size} bytes with {expect}. The object was removed and is sent again.")
    return {"part_size": ps, "server": {"sha256": info.sha256, "etag": info.etag}}


# ------------------------------------------------------------------------------------- a checkpoint
def read_marker(store: Store, name: str) -> tuple[Optional[dict], Optional[str]]:
    """(the remote manifest of `name`, None), (None, why it is unusable), or (None, None) if there is none."""
    try:
        data = store.get_bytes(store.target.key(fmt.marker_key(name)), fmt.MANIFEST_MAX_BYTES)
    except RemoteNotFound:
        return None, None
    except RemoteIntegrityError as exc:
        return None, str(exc)
    try:
        return fmt.parse(data, name), None
    except ValueError as exc:
        return None, str(exc)


def same_files(m: dict, src: Source) -> bool:
    """Whether a remote manifest records exactly the files and checksums of a local checkpoint."""
    if set(m["files"]) != set(src.files):
        return False
    for rel, rec in src.files.items():
        r = m["files"][rel]
        if r["size"] != rec["size"] or record_checksum(r) != record_checksum(rec):
            return False
    return True


def upload_checkpoint(store: Store, src: Source, t: Transfer, now: Optional[float] = None,
                      repair: bool = False) -> tuple[dict, bool]:
    """Replicate one checkpoint; returns (its remote manifest, whether anything was uploaded). Idempotent:
    a replica that already holds these very files is left as it is, unless `repair` (it was found damaged
    on the target): then it stops existing and every file is sent again, none reused."""
    marker = store.target.key(fmt.marker_key(src.name))
    existing, _bad = read_marker(store, src.name)
    if existing is not None and same_files(existing, src) and not repair:
        return existing, False
    if existing is not None or _bad is not None:
        # another save of that name (a step written again), or a marker we cannot use: it stops existing first
        store.delete([marker])
    files = {}
    for rel in sorted(src.files, key=lambda r: (r in src.inline, r)):  # manifest.json last among the files
        rec = src.files[rel]
        key = store.target.key(fmt.data_key(src.name, rel))
        info = upload_file(store, key, src.path / rel if rel else src.path, rec, t, inline=src.inline.get(rel),
                           reuse=not repair)
        files[rel] = {**rec, **info}
    m = fmt.build(src.name, src.step, src.layout, files, epoch=src.epoch, metrics=src.metrics, epoch_end=src.epoch_end,
                  meta=src.meta, origin=origin(), created=time.time() if now is None else now)
    try:
        store.put_bytes(marker, fmt.dumps(m), create_only=True)
    except RemoteConflict:
        other, _ = read_marker(store, src.name)
        if other is not None and same_files(other, src):
            return other, False
        raise RemoteError(f"Another writer committed a different {src.name} to {store.target} at the same moment. "
                          "Give each run its own replica url (one daemon per prefix); this one is not replicated.") from None
    return fmt.parse(fmt.dumps(m), src.name), True
