"""Streaming safetensors I/O with the checksum computed in the same pass.

The `safetensors` package can only serialise to one bytes object (a second full copy of the state in
memory) and cannot hash while writing; a 1.5 GB AdamW state makes both matter. The file format is
small (8-byte little-endian header length, JSON header padded to 8 bytes, raw little-endian data), so
we stream it here and test that the `safetensors` package reads our files and we read its files.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import queue
import struct
import threading
from pathlib import Path
from typing import BinaryIO, Optional

import torch

from ckpt_daemon.fsutil import CHUNK, HASH_NAME

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


def write_safetensors(f: BinaryIO, tensors: dict[str, torch.Tensor], metadata: Optional[dict[str, str]] = None) -> tuple[int, str]:
    """Write `tensors` to the open binary file `f`; return (bytes written, sha256 hex).

    The checksum is computed from the same buffers as they are written, by a second thread, so
    hashing overlaps the write instead of adding to it (both release the GIL)."""
    h = hashlib.new(HASH_NAME)
    q: "queue.Queue[Optional[memoryview]]" = queue.Queue(maxsize=8)

    def hasher() -> None:
        while (part := q.get()) is not None:
            h.update(part)

    worker = threading.Thread(target=hasher, daemon=True)
    worker.start()
    size = 0
    try:
        head = header_for(tensors, metadata)
        q.put(memoryview(head))
        f.write(head)
        size = len(head)
        for t in tensors.values():
            mv = _as_bytes(t)
            for off in range(0, len(mv), CHUNK):
                part = mv[off : off + CHUNK]
                q.put(part)
                f.write(part)
            size += len(mv)
    finally:
        q.put(None)
        worker.join()
    return size, h.hexdigest()


def read_file_checked(path: Path, expected_size: Optional[int] = None, expected_sha256: Optional[str] = None):
    """Map a whole file into memory and check its sha256 in the same pass. Returns a buffer (a private,
    copy-on-write mapping) that tensors can view without a copy.

    Mapping avoids zero-filling and then page-faulting a fresh multi-GB buffer before reading into it;
    with sequential readahead the kernel reads ahead while we hash. Raises ChecksumMismatch."""
    size = os.path.getsize(path)
    if expected_size is not None and size != expected_size:
        raise ChecksumMismatch(f"{Path(path).name} has {size} bytes, the manifest says {expected_size}")
    if size == 0:
        buf = bytearray()
    else:
        with open(path, "rb") as f:
            buf = mmap.mmap(f.fileno(), size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        for advice in ("MADV_SEQUENTIAL", "MADV_WILLNEED"):
            if hasattr(mmap, advice):
                buf.madvise(getattr(mmap, advice))
    if expected_sha256 is not None:
        h = hashlib.new(HASH_NAME)
        mv = memoryview(buf)
        for off in range(0, size, CHUNK):
            h.update(mv[off : off + CHUNK])
        mv.release()
        if h.hexdigest() != expected_sha256:
            raise ChecksumMismatch(f"{Path(path).name} fails its sha256 checksum (the file changed after it was written)")
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


def load_safetensors(path: Path, expected_size: Optional[int] = None, expected_sha256: Optional[str] = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    return parse_safetensors(read_file_checked(path, expected_size, expected_sha256))
