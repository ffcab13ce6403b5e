"""Streaming safetensors I/O with the checksum computed in the same pass.

The `safetensors` package can only serialise to one bytes object (a second full copy of the state in
memory) and cannot hash while writing; a 1.5 GB AdamW state makes both matter. The file format is
small (8-byte little-endian header length, JSON header padded to 8 bytes, raw little-endian data), so
we stream it here and test that the `safetensors` package reads our files and we read its files.
"""

from __future__ import annotations

import ctypes
import errno
import json
import mmap
import os
import queue
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Optional

import torch

from ckpt_daemon.fsutil import HASH_NAME, STAT_KEYS, new_hasher, start_writeback
from ckpt_daemon.store import dtypes
from ckpt_daemon.store import manifest as mf

DTYPES = {getattr(torch, d.torch): d.code for d in dtypes.WRITTEN if hasattr(torch, d.torch)}  # store/dtypes.py
CODES = {v: k for k, v in DTYPES.items()}


class ChecksumMismatch(ValueError):
    pass


def _as_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous().reshape(-1)
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.view(torch.uint8).numpy()).cast("B")


def header_for(tensors: dict[str, torch.Tensor], metadata: Optional[dict[str, str]] = None) -> bytes:
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    off = 0
    for name, t in tensors.items():
        if t.dtype not in DTYPES:
            raise TypeError(f"tensor {name!r} has dtype {t.dtype}, which safetensors cannot store")
        n = t.numel() * t.element_size()
        header[name] = {"dtype": DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [off, off + n]}
        off += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


WRITE_CHUNK = 64 << 20  # one write() call; the kernel is told to start writing each one back at once


def _write_all(fd: int, mv: memoryview) -> None:
    while mv:
        n = os.write(fd, mv)
        mv = mv[n:]


def write_safetensors(f: BinaryIO, tensors: dict[str, torch.Tensor], metadata: Optional[dict[str, str]] = None,
                      algo: str = HASH_NAME) -> tuple[int, str]:
    """Write `tensors` to the open binary file `f`; return (bytes written, hex checksum of `algo`).

    No copy of the data is made: each tensor's memory goes to write() as it is, in chunks of
    WRITE_CHUNK, and writeback of each chunk starts at once (so the final fsync finds little left to
    do). The checksum is computed from the same buffers by a second thread, so hashing overlaps the
    write instead of adding to it (both release the GIL)."""
    h = new_hasher(algo, threads=False)  # one core: the writer has the other
    q: "queue.Queue[Optional[memoryview]]" = queue.Queue(maxsize=4)
    failed: list[BaseException] = []

    def hasher() -> None:
        while (part := q.get()) is not None:
            if not failed:
                try:
                    h.update(part)
                except BaseException as exc:  # surfaced below, never a silent wrong digest
                    failed.append(exc)

    f.flush()
    fd = f.fileno()
    start = f.tell()
    worker = threading.Thread(target=hasher, daemon=True, name="hash")
    worker.start()
    size = 0
    try:
        head = header_for(tensors, metadata)
        q.put(memoryview(head))
        _write_all(fd, memoryview(head))
        size = len(head)
        for t in tensors.values():
            mv = _as_bytes(t)
            for off in range(0, len(mv), WRITE_CHUNK):
                part = mv[off : off + WRITE_CHUNK]
                q.put(part)
                _write_all(fd, part)
                start_writeback(fd, start + size, len(part))
                size += len(part)
    finally:
        q.put(None)
        worker.join()
    f.seek(start + size)
    if failed:
        raise failed[0]
    return size, h.hexdigest()


def same_file(st: os.stat_result, trusted: Optional[dict]) -> bool:
    return bool(trusted) and all(trusted.get(k) == getattr(st, k) for k in STAT_KEYS)


def map_file(path: Path, expected_size: Optional[int] = None):
    """(buffer, fstat) of a whole file mapped into memory (private, copy-on-write, writable: tensors
    may be updated in place) and not yet read: the bytes are read when first touched. Raises
    ChecksumMismatch when its size is not `expected_size`."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        size = st.st_size
        if expected_size is not None and size != expected_size:
            raise ChecksumMismatch(f"{Path(path).name} has {size} bytes, the manifest says {expected_size}")
        if size == 0:
            return bytearray(), st
        return mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE), st
    finally:
        os.close(fd)


# Reading for the checksum. Measured on the 2-core VM (benchmarks/NOTES.md, "Verified cold load"):
# madvise(MADV_WILLNEED) and posix_fadvise(WILLNEED) start only one readahead window (8 MiB) and fill
# the page cache with small pages (costly in system time), and MADV_SEQUENTIAL made it slower still.
# madvise(MADV_POPULATE_READ) over 16 MiB pieces reads through the fault path (large folios, large
# readahead) and maps the pages in the same call (no page fault per 64 KiB later), for a tenth of the
# system time. So one thread per file in flight populates its mapping piece by piece, in order, and a
# hashing thread per file follows it, hashing each piece as soon as it is in memory: the read of one
# piece overlaps the hash of the one before, and two files are in flight at once.
POPULATE_CHUNK = 16 << 20
MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)  # Linux >= 5.14
_UNSUPPORTED = {errno.EINVAL, errno.ENOSYS, errno.EPERM}
_madvise = None


def _libc_madvise():
    """ctypes' madvise (which, unlike mmap.madvise, releases the GIL while it waits for the disk), or
    None where there is none."""
    global _madvise
    if _madvise is None:
        try:
            fn = ctypes.CDLL(None, use_errno=True).madvise
            fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            fn.restype = ctypes.c_int
            _madvise = fn
        except (OSError, AttributeError):
            _madvise = False
    return _madvise or None


def _populate(addr: int, length: int) -> int:
    """Read [addr, addr+length) of a file mapping into memory and map it: 0, or the errno."""
    fn = _libc_madvise()
    if fn is None:
        return errno.ENOSYS
    if fn(addr, length, MADV_POPULATE_READ) == 0:
        return 0
    return ctypes.get_errno() or errno.EIO


def _address(buf) -> int:
    c = ctypes.c_char.from_buffer(buf)
    try:
        return ctypes.addressof(c)
    finally:
        del c


@dataclass
class VerifyJob:
    """One mapped file to check: its name (for messages), buffer, checksum algorithm and expected digest."""
    name: str
    buf: Any
    algo: str
    digest: str


def verify_buffers(jobs: list[VerifyJob], lanes: Optional[int] = None) -> None:
    """Check every job's whole buffer against its digest before returning; raise ChecksumMismatch
    naming a bad file (the first given, of those found). Files of a mapping are read as described above
    (`_populate`); where that cannot be used, the hashing threads read them by touching the pages."""
    if not jobs:
        return
    ncpu = os.cpu_count() or 1
    lanes = max(1, min(len(jobs), lanes or min(8, max(2, ncpu))))
    spare = ncpu >= 2 * lanes  # cores beyond one reader and one hasher per lane: blake3 spreads each piece on them
    hashes = []
    for job in jobs:  # a checksum we cannot compute is reported before any read
        try:
            hashes.append(new_hasher(job.algo, threads=spare))
        except (ValueError, LookupError) as exc:
            raise ChecksumMismatch(f"{job.name} cannot be verified: {exc}") from None
    # largest first: the lanes finish together
    order = sorted(range(len(jobs)), key=lambda i: -len(jobs[i].buf))
    pieces = [[(o, min(POPULATE_CHUNK, len(j.buf) - o)) for o in range(0, len(j.buf), POPULATE_CHUNK)] for j in jobs]
    ready = [0] * len(jobs)  # pieces of each file in memory (or, without populate, to be touched by the hasher)
    read_error: list[Optional[str]] = [None] * len(jobs)
    errors: dict[int, str] = {}
    checked: set[int] = set()
    cv = threading.Condition()
    next_pop, next_hash = [0], [0]
    stop = [False]

    def take(counter: list) -> Optional[int]:
        with cv:
            if stop[0] or counter[0] >= len(order):
                return None
            counter[0] += 1
            return order[counter[0] - 1]

    def populate_file(i: int) -> None:
        buf = jobs[i].buf
        addr = _address(buf) if isinstance(buf, mmap.mmap) and len(buf) else None
        for k, (off, n) in enumerate(pieces[i]):
            err = 0 if addr is None or stop[0] else _populate(addr + off, n)
            if err in _UNSUPPORTED:
                addr, err = None, 0  # the hasher touches the pages itself
            if err:
                raise OSError(err, f"{os.strerror(err)}: it is shorter than when it was opened, or the disk failed")
            with cv:
                ready[i] = k + 1
                cv.notify_all()

    def populater() -> None:
        while (i := take(next_pop)) is not None:
            try:
                populate_file(i)
            except Exception as exc:
                with cv:
                    read_error[i] = f"{jobs[i].name} could not be read ({exc})"
                    cv.notify_all()

    def hash_file(i: int) -> Optional[str]:
        job, h = jobs[i], hashes[i]
        mv = memoryview(job.buf)
        try:
            for k, (off, n) in enumerate(pieces[i]):
                with cv:
                    while ready[i] <= k and not read_error[i] and not stop[0]:
                        cv.wait()
                    if read_error[i] or stop[0]:
                        return read_error[i]
                h.update(mv[off : off + n])
        finally:
            mv.release()
        if h.hexdigest() != job.digest:
            return f"{job.name} fails its {job.algo} checksum (the file changed after it was written)"
        checked.add(i)
        return None

    def hasher() -> None:
        while (i := take(next_hash)) is not None:
            try:
                err = hash_file(i)
            except Exception as exc:
                err = f"{jobs[i].name} could not be verified ({exc})"
            if err:
                with cv:
                    errors[i] = err
                    stop[0] = True
                    cv.notify_all()

    threads = [threading.Thread(target=populater, daemon=True, name=f"read-{n}") for n in range(lanes)]
    threads += [threading.Thread(target=hasher, daemon=True, name=f"hash-{n}") for n in range(lanes - 1)]
    for t in threads:
        t.start()
    try:
        hasher()
    except BaseException:  # interrupted (KeyboardInterrupt): let the other threads end
        with cv:
            stop[0] = True
            cv.notify_all()
        raise
    finally:
        for t in threads:
            t.join()
    if errors:
        raise ChecksumMismatch(errors[min(errors)])
    if len(checked) != len(jobs):  # never: each file is checked or has an error
        raise ChecksumMismatch("verification stopped before every file was checked")


def read_file_checked(path: Path, expected_size: Optional[int] = None, expected_digest: Optional[str] = None,
                      algo: str = HASH_NAME, trusted_stat: Optional[dict] = None):
    """Map a whole file into memory and check its checksum (`algo`) in the same pass. Returns a buffer
    (a private, copy-on-write mapping) that tensors view without a copy: the bytes are read once,
    into the memory the tensors use (see verify_buffers). `trusted_stat` ({field: value} of
    STAT_KEYS, from the daemon's record of a verification it just did): when the opened file still
    matches it, the bytes are not hashed again. Raises ChecksumMismatch."""
    buf, st = map_file(path, expected_size)
    if expected_digest is not None and not same_file(st, trusted_stat):
        verify_buffers([VerifyJob(Path(path).name, buf, algo, expected_digest)])
    return buf


def parse_safetensors(buf: bytearray | bytes | torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors viewing `buf` (no copy) and the metadata. Raises ValueError on a malformed file. `buf` may
    be a uint8 tensor on any device (a file loaded onto a GPU): the tensors then view it there."""
    on_device = isinstance(buf, torch.Tensor)
    head = buf[:8].cpu().numpy().tobytes() if on_device else bytes(buf[:8])
    n = mf.safetensors_header_length(head, len(buf), "safetensors data")
    header = mf.safetensors_header(buf[8:8 + n].cpu().numpy().tobytes() if on_device else bytes(buf[8 : 8 + n]),
                                   "safetensors data")
    if not isinstance(header, dict):
        raise ValueError("the safetensors header is not a JSON object")
    meta = header.pop("__metadata__", {}) or {}
    base = 8 + n
    out: dict[str, torch.Tensor] = {}
    for name, info in header.items():
        dtype = CODES.get(info["dtype"])
        if dtype is None:
            raise ValueError(f"tensor {name!r} has unsupported dtype {info['dtype']}")
        b, e = info["data_offsets"]
        if not (0 <= b <= e and base + e <= len(buf)):
            raise ValueError(f"tensor {name!r} lies outside the file")
        shape = info["shape"]
        count = 1
        for d in shape:
            count *= d
        if count == 0:
            out[name] = torch.empty(shape, dtype=dtype, device=buf.device if on_device else None)
            continue
        if on_device:
            raw = buf[base + b:base + e]
            # a view of another dtype must start at a multiple of its size; a file does not promise that
            t = (raw if (buf.storage_offset() + base + b) % dtype.itemsize == 0 else raw.clone()).view(dtype)
        else:
            t = torch.frombuffer(buf, dtype=torch.uint8, count=e - b, offset=base + b).view(dtype)
        out[name] = t.reshape(shape)
    return out, meta


def load_safetensors(path: Path, expected_size: Optional[int] = None, expected_digest: Optional[str] = None,
                     algo: str = HASH_NAME) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    return parse_safetensors(read_file_checked(path, expected_size, expected_digest, algo))
