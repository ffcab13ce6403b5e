"""The remote format: one prefix per checkpoint, its files, and a remote manifest written last.

    <prefix>/<name>/data/<file>          each file of the checkpoint (a single-file checkpoint: data/<name>)
    <prefix>/<name>/replica.json         the commit marker, uploaded LAST and create-only
    <prefix>/.ckpt-daemon/pointers.json  which replica was latest and best when the daemon last wrote (a hint)

replica.json lists every file with its size, our checksum (the one the local manifest or sidecar
records: BLAKE3 or SHA-256) and the server's own checksum (a SHA-256, composite for multipart objects)
and ETag. A prefix without a valid replica.json does not exist for anyone: listing, restore and
retention ignore it, and the daemon removes it when nothing uploads it any more.

Every byte read back from a server is untrusted: sizes and nesting are bounded, every field's type is
checked, and an object key is always derived from the file's name, never taken from the manifest.
"""

from __future__ import annotations

import json
import re
from typing import Any, Optional

from ckpt_daemon.fsutil import loads_json_bounded, record_checksum
from ckpt_daemon.store import manifest as mf

FORMAT = "ckpt-daemon-replica/1"
MARKER = "replica.json"
DATA = "data"
POINTERS = ".ckpt-daemon/pointers.json"
MANIFEST_MAX_BYTES = 16 << 20
MAX_FILES = 100_000
MAX_REL = 1024
_B64SHA = re.compile(r"[A-Za-z0-9+/]{43}=(-[0-9]{1,5})?\Z")


def rel_problem(rel: str) -> Optional[str]:
    """Why `rel` (a file's path inside a checkpoint, "" for a single-file checkpoint) is unsafe, or None."""
    if rel == "":
        return None
    if not isinstance(rel, str) or len(rel) > MAX_REL or "\0" in rel or "\\" in rel or rel.startswith("/"):
        return "an unsafe file path"
    parts = rel.split("/")
    if len(parts) > 16 or any(p in ("", ".", "..") or len(p) > 255 for p in parts):
        return "an unsafe file path"
    return None


def name_problem(name: Any) -> Optional[str]:
    if not isinstance(name, str) or not name or len(name) > 255 or "/" in name or "\0" in name or name.startswith("."):
        return "not a plain checkpoint name"
    return None


def data_key(name: str, rel: str) -> str:
    """The key of a file, relative to the target's prefix."""
    return f"{name}/{DATA}/{rel or name}"


def marker_key(name: str) -> str:
    return f"{name}/{MARKER}"


def build(name: str, step: int, layout: str, files: dict[str, dict], *, epoch: Optional[int], metrics: dict,
          epoch_end: bool, meta: dict, origin: dict, created: float) -> dict:
    """The remote manifest of a checkpoint whose files are all uploaded and verified. `files`: rel ->
    {size, checksum fields, part_size, server: {sha256, etag}}."""
    return {"format": FORMAT, "name": name, "step": step, "layout": layout, "created": created, "origin": origin,
            "epoch": epoch, "metrics": metrics, "epoch_end": epoch_end, "meta": meta,
            "files": {rel: {**rec, "key": data_key(name, rel)} for rel, rec in sorted(files.items())}}


def dumps(m: dict) -> bytes:
    return (json.dumps(m, indent=1, sort_keys=True, default=str) + "\n").encode()


def parse(data: bytes, name: str) -> dict:
    """A remote manifest read from the server, checked; raises ValueError with the reason."""
    if len(data) > MANIFEST_MAX_BYTES:
        raise ValueError(f"{MARKER} is larger than {MANIFEST_MAX_BYTES >> 20} MiB")
    m = loads_json_bounded(data, MARKER)
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise ValueError(f"{MARKER} has an unknown format")
    if m.get("name") != name:
        raise ValueError(f"{MARKER} names {str(m.get('name'))[:60]!r}, but it lies under {name!r}")
    if not mf.is_step(m.get("step")):
        raise ValueError(f"{MARKER} has no valid step")
    if m.get("layout") not in ("native", "hf", "file"):
        raise ValueError(f"{MARKER} has an unknown layout")
    files = m.get("files")
    if not isinstance(files, dict) or not files or len(files) > MAX_FILES:
        raise ValueError(f"{MARKER} lists no files, or too many")
    if (m["layout"] == "file") != (set(files) == {""}):
        raise ValueError(f"{MARKER}: a single-file checkpoint has one file, a folder has named files")
    for rel, rec in files.items():
        why = rel_problem(rel)
        if why:
            raise ValueError(f"{MARKER} lists {why} ({str(rel)[:60]!r})")
        if not isinstance(rec, dict):
            raise ValueError(f"{MARKER} has no record for {rel[:60]!r}")
        size = rec.get("size")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ValueError(f"{MARKER} gives {rel[:60]!r} no valid size")
        try:
            record_checksum(rec)
        except ValueError as exc:
            raise ValueError(f"{MARKER} lists {rel[:60]!r} with {exc}") from None
        ps = rec.get("part_size")
        if not isinstance(ps, int) or isinstance(ps, bool) or ps <= 0:
            raise ValueError(f"{MARKER} gives {rel[:60]!r} no valid part size")
        server = rec.get("server")
        if not isinstance(server, dict) or not (server.get("sha256") is None or (isinstance(server["sha256"], str)
                                                                                  and _B64SHA.match(server["sha256"]))):
            raise ValueError(f"{MARKER} gives {rel[:60]!r} no valid server checksum")
        if not isinstance(server.get("etag", ""), str) or len(server.get("etag", "")) > 200:
            raise ValueError(f"{MARKER} gives {rel[:60]!r} an invalid ETag")
        rec["key"] = data_key(name, rel)  # derived, never trusted (relative to the target's prefix)
    for key, kind in (("epoch", int), ("metrics", dict), ("meta", dict), ("origin", dict)):
        if m.get(key) is not None and not isinstance(m[key], kind):
            raise ValueError(f"{MARKER} has a {key} of the wrong type")
    m["metrics"] = {str(k)[:64]: float(v) for k, v in list((m.get("metrics") or {}).items())[:256]
                    if isinstance(v, (int, float)) and not isinstance(v, bool)}
    m["epoch_end"] = m.get("epoch_end") is True
    if not isinstance(m.get("created"), (int, float)) or isinstance(m.get("created"), bool):
        m["created"] = 0.0
    return m


def parse_pointers(data: bytes) -> dict[str, str]:
    try:
        p = loads_json_bounded(data[:1 << 16], "pointers.json")
    except ValueError:
        return {}
    if not isinstance(p, dict):
        return {}
    return {k: v for k, v in p.items() if k in ("latest", "best") and name_problem(v) is None}
