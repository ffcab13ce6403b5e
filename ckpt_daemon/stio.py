"""Streaming safetensors I/O with the checksum computed in the same pass.

The `safetensors` package can only serialise to one bytes object (a second full copy of the state in
memory) and cannot hash while writing; a 1.5 GB AdamW state makes both matter. The file format is
small (8-byte little-endian header length, JSON header padded to 8 bytes, raw little-endian data), so
we stream it here and test that the `safetensors` package reads our files and we read its files.
"""

from __future__ import annotations

import json
import mmap
import os
import queue
import struct
import threading
from pathlib import Path
from typing import BinaryIO, Optional

import torch

from ckpt_daemon.fsutil import HASH_NAME, STAT_KEYS, new_hasher, start_writeback

DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
for _name, _code in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2"), ("uint16", "U16"),
                     ("uint32", "U32"), ("uint64", "U64")):
    if hasattr(torch, _name):
        DTYPES[getattr(torch, _name)] = _code
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


def _same_file(st: os.stat_result, trusted: Optional[dict]) -> bool:
    return bool(trusted) and all(trusted.get(k) == getattr(st, k) for k in STAT_KEYS)


def read_file_checked(path: Path, expected_size: Optional[int] = None, expected_digest: Optional[str] = None,
                      algo: str = HASH_NAME, trusted_stat: Optional[dict] = None):
    """Map a whole file into memory and check its checksum (`algo`) in the same pass. Returns a buffer
    (a private, copy-on-write mapping) that tensors view without a copy: the bytes are read once,
    into the memory the tensors use.

    Mapping avoids zero-filling and then page-faulting a fresh multi-GB buffer before reading into it;
    with readahead requested for the whole file, the kernel reads ahead while we hash (blake3 hashes
    with every core). `trusted_stat` ({field: value} of STAT_KEYS, from the daemon's record of a
    verification it just did): when the opened file still matches it, the bytes are not hashed again.
    Raises ChecksumMismatch."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        size = st.st_size
        if expected_size is not None and size != expected_size:
            raise ChecksumMismatch(f"{Path(path).name} has {size} bytes, the manifest says {expected_size}")
        if size == 0:
            buf = bytearray()
        else:
            buf = mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
            for advice in ("MADV_SEQUENTIAL", "MADV_WILLNEED"):
                if hasattr(mmap, advice):
                    buf.madvise(getattr(mmap, advice))
    finally:
        os.close(fd)
    if expected_digest is not None and not _same_file(st, trusted_stat):
        try:
            h = new_hasher(algo)
        except (ValueError, LookupError) as exc:
            raise ChecksumMismatch(f"{Path(path).name} cannot be verified: {exc}") from None
        mv = memoryview(buf)
        for off in range(0, size, WRITE_CHUNK):
            h.update(mv[off : off + WRITE_CHUNK])
        mv.release()
        if h.hexdigest() != expected_digest:
            raise ChecksumMismatch(f"{Path(path).name} fails its {algo} checksum (the file changed after it was written)")
    return buf


def parse_safetensors(buf: bytearray | bytes) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors viewing `buf` (no copy) and the metadata. Raises ValueError on a malformed file."""
    if len(buf) < 8:
        raise ValueError("safetensors data is truncated")
    (n,) = struct.unpack_from("<Q", buf, 0)
    if n > len(buf) - 8:
        raise ValueError("safetensors header length exceeds the file")
    header = json.loads(bytes(buf[8 : 8 + n]))
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
            out[name] = torch.empty(shape, dtype=dtype)
            continue
        t = torch.frombuffer(buf, dtype=torch.uint8, count=e - b, offset=base + b).view(dtype)
        out[name] = t.reshape(shape)
    return out, meta


def load_safetensors(path: Path, expected_size: Optional[int] = None, expected_digest: Optional[str] = None,
                     algo: str = HASH_NAME) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    return parse_safetensors(read_file_checked(path, expected_size, expected_digest, algo))
