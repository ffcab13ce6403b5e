"""The native checkpoint format's manifest: the commit marker of a checkpoint (no torch here).

A native checkpoint is a folder `checkpoint-<step>/` holding `model.safetensors`, `state.safetensors`,
`state.json` and, written last, `manifest.json`, which lists every file with its size and sha256. A
folder without a valid manifest is not a checkpoint for anyone.
"""

from __future__ import annotations

import json
import os
import stat
import struct
from pathlib import Path
from typing import Any, Optional

from ckpt_daemon.fsutil import hash_file

MANIFEST = "manifest.json"
FORMAT = "ckpt-daemon/1"
MODEL_FILE = "model.safetensors"


def read_manifest(folder: Path, st: Optional[os.stat_result] = None) -> dict:
    """Parse and sanity-check manifest.json; raise ValueError with the reason if it is not usable."""
    p = os.path.join(folder, MANIFEST)
    try:
        st = st or os.lstat(p)
    except FileNotFoundError:
        raise ValueError("no manifest.json (never committed, or a save was interrupted)") from None
    if not stat.S_ISREG(st.st_mode):
        raise ValueError("manifest.json is not a regular file")
    try:
        with open(p, "rb") as f:
            m = json.loads(f.read())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"manifest.json is not valid JSON ({exc})") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise ValueError(f"manifest.json has an unknown format {m.get('format') if isinstance(m, dict) else None!r}")
    files = m.get("files")
    if not isinstance(files, dict) or not files or not isinstance(m.get("step"), int):
        raise ValueError("manifest.json lacks its file list or step")
    for name, meta in files.items():
        if "/" in name or name.startswith(".") or not isinstance(meta, dict):
            raise ValueError(f"manifest.json lists an unsafe file name {name!r}")
    return m


def safetensors_problem(path: Path, size: Optional[int] = None) -> Optional[str]:
    """Why a safetensors file is unusable (truncated, bad header), or None if its structure is sound."""
    try:
        size = os.path.getsize(path) if size is None else size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"{path.name} is truncated (no header)"
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, 100 << 20):
                return f"{path.name} has a corrupt header length"
            header = json.loads(f.read(n))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        return f"{path.name} has an unreadable header ({exc.__class__.__name__})"
    end = 0
    for key, meta in header.items():
        if key == "__metadata__":
            continue
        try:
            end = max(end, int(meta["data_offsets"][1]))
        except (KeyError, TypeError, IndexError, ValueError):
            return f"{path.name} has a malformed entry for {key!r}"
    if 8 + n + end != size:
        return f"{path.name} is truncated or padded ({size} bytes, header says {8 + n + end})"
    return None


def check_native(folder: Path, verify: bool, manifest: Optional[dict] = None,
                 stats: Optional[dict[str, os.stat_result]] = None) -> tuple[str, str, dict]:
    """(status, reason, manifest) for a native checkpoint folder. status: complete|incomplete|corrupt.
    `stats` (name -> lstat result of the folder's entries), when the caller has them, saves syscalls."""
    try:
        m = manifest or read_manifest(folder, stats.get(MANIFEST) if stats is not None else None)
    except ValueError as exc:
        return "incomplete", str(exc), {}
    # The manifest records each file's size at commit: a size check catches truncation without reading
    # the file (a changed byte is what the checksums are for, with verify).
    for name, meta in m["files"].items():
        try:
            st = stats[name] if stats is not None else os.lstat(os.path.join(folder, name))
        except (FileNotFoundError, KeyError):
            return "incomplete", f"{name} listed in the manifest is missing", m
        if not stat.S_ISREG(st.st_mode):
            return "corrupt", f"{name} is not a regular file (symlinks are not followed)", m
        if st.st_size != meta.get("size"):
            return "corrupt", f"{name} has {st.st_size} bytes, the manifest says {meta.get('size')}", m
    if verify:
        for name, meta in m["files"].items():
            digest = hash_file(Path(folder) / name)
            if digest != meta.get("sha256"):
                return "corrupt", f"{name} fails its checksum (sha256 {digest[:12]}..., manifest {str(meta.get('sha256'))[:12]}...)", m
    return "complete", "", m


def build_manifest(step: int, files: dict[str, dict], **extra: Any) -> dict:
    return {"format": FORMAT, "step": int(step), "files": files, **extra}
