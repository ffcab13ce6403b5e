"""The native checkpoint format's manifest: the commit marker of a checkpoint (no torch here).

A native checkpoint is a folder `checkpoint-<step>/` holding `model.safetensors`, `state.safetensors`,
`state.json` and, written last, `manifest.json`, which lists every file with its size and checksum. A
folder without a valid manifest is not a checkpoint for anyone.

A file record names its checksum's algorithm (all checksums are 64 lowercase hex digits):

    {"size": 1234, "algo": "blake3", "digest": "<hex>"}     # the default since 0.3
    {"size": 1234, "sha256": "<hex>"}                       # sha256 (what `sha256sum` prints), and every
                                                            # manifest written before 0.3
Both are read everywhere (`fsutil.record_checksum`, `fsutil.file_digest_problem`). New checkpoints get
blake3 unless CheckpointManager(checksum="sha256") or $CKPT_CHECKSUM=sha256 asks otherwise. An
algorithm we do not know, a digest that is not 64 hex digits, or no checksum at all makes the
checkpoint "invalid" with the reason (never an exception, never "incomplete": a checkpoint written
by a newer version is not a half-written one to be cleaned away).

The manifest carries a checksum of its own exact bytes (`self_digest`, see `seal_json`), so that a
changed byte anywhere in it (a metric that chooses `best`, a step, a file's recorded checksum) makes the
checkpoint "corrupt" like a changed byte in any other file. Manifests written by earlier versions have
none: they are read as before, and the first one a process meets says so once in the log.

Every byte read here is untrusted: sizes are bounded, JSON nesting is bounded, every field's type is
checked, and a bad file is reported as a reason string, never as an exception.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import struct
from pathlib import Path
from typing import Any, Callable, Optional

from ckpt_daemon.fsutil import (
    digest_problem,
    digest_record,
    loads_json_bounded,
    new_hasher,
    read_bytes_bounded,
    record_checksum,
)
from ckpt_daemon.store import dtypes

MANIFEST = "manifest.json"
FORMAT = "ckpt-daemon/1"
MODEL_FILE = "model.safetensors"
MANIFEST_MAX_BYTES = 16 << 20
SAFETENSORS_HEADER_MAX = 100 << 20
MAX_STEP = 10**15  # a step number beyond this is not a real one
ITEMSIZE = dtypes.ITEMSIZE  # safetensors code -> bytes per element (store/dtypes.py)


SEAL = "self_digest"  # a manifest's (or sidecar's) checksum of its own bytes
_SEAL_PLACEHOLDER = b"0" * 64
_log = logging.getLogger("ckpt_daemon.store.manifest")
_unsealed_said: set[str] = set()


class ManifestInvalid(ValueError):
    """manifest.json is a well-formed commit marker whose content we cannot use (an unknown checksum
    algorithm, a digest of the wrong type): the checkpoint is invalid, not half-written."""


class ManifestCorrupt(ValueError):
    """manifest.json was changed after it was written: it fails its own digest."""


class ManifestUnverifiable(ValueError):
    """manifest.json's own digest is of an algorithm this machine cannot compute (blake3 missing)."""


# ------------------------------------------------------------------------------- the seal
def seal_json(obj: dict, algo: str, dumps: Callable[[dict], bytes]) -> bytes:
    """`obj` as `dumps` writes it, with the field SEAL appended: the `algo` checksum of the exact bytes
    written, computed with the 64 hex digits of that checksum as zeros. Every byte of the file is covered,
    whitespace and the spelling of numbers included (a checksum of re-serialised content would miss a
    flip of `1e-05` into `1E-05`, or of a space into a tab)."""
    obj = {k: v for k, v in obj.items() if k != SEAL}
    raw = dumps({**obj, SEAL: digest_record(algo, _SEAL_PLACEHOLDER.decode())})
    at = raw.rindex(_SEAL_PLACEHOLDER)  # the last field is the seal: its placeholder is the last one
    h = new_hasher(algo, threads=False)
    h.update(raw)
    return raw[:at] + h.hexdigest().encode() + raw[at + len(_SEAL_PLACEHOLDER):]


def seal_problem(raw: bytes, obj: Any, what: str) -> Optional[str]:
    """Why the bytes `raw` of a sealed file (parsed as `obj`) do not match their own SEAL, or None if
    they do. An unsealed file (written by an earlier version) is None too, said once per process and kind `what`;
    but one that holds a checksum record under another top-level name is a seal whose name was damaged.
    Raises ManifestUnverifiable where the seal's algorithm cannot be computed here."""
    if not isinstance(obj, dict):
        return None  # not ours to judge here: the caller's format checks reject it
    rec = obj.get(SEAL)
    if rec is None:
        if any(isinstance(v, dict) and set(v) in ({"sha256"}, {"algo", "digest"}) for v in obj.values()):
            return f"{what} has a damaged {SEAL} field (changed after it was written)"
        if what not in _unsealed_said:
            _unsealed_said.add(what)
            _log.info("a %s without a digest of its own (written by an earlier version) was read; its content is "
                      "trusted as read; files written from now on carry one", what)
        return None
    try:
        algo, want = record_checksum(rec)
    except ValueError as exc:
        return f"{what} has a damaged {SEAL} ({exc}; changed after it was written)"
    at = raw.rfind(want.encode())
    if at < 0:
        return f"{what} fails its own digest (changed after it was written)"
    try:
        h = new_hasher(algo, threads=False)
    except LookupError as exc:
        raise ManifestUnverifiable(f"{what} cannot be verified: {exc}") from None
    h.update(raw[:at])
    h.update(_SEAL_PLACEHOLDER)
    h.update(raw[at + len(want):])
    if h.hexdigest() != want:
        return f"{what} fails its own digest (changed after it was written)"
    return None


def dumps_manifest(m: dict, algo: str) -> bytes:
    """The bytes of manifest.json as every native writer writes them: indented JSON, sealed."""
    return seal_json(m, algo, lambda o: (json.dumps(o, indent=1, allow_nan=True) + "\n").encode())


def is_step(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_STEP


def read_manifest(folder: Path, st: Optional[os.stat_result] = None) -> dict:
    """Parse and sanity-check manifest.json; raise ValueError with the reason if it is not usable."""
    p = os.path.join(folder, MANIFEST)
    try:
        data = read_bytes_bounded(p, MANIFEST_MAX_BYTES)
    except FileNotFoundError:
        raise ValueError("no manifest.json (never committed, or a save was interrupted)") from None
    except OSError as exc:
        raise ValueError(f"manifest.json cannot be read ({exc.strerror or exc})") from None
    m = loads_json_bounded(data, "manifest.json")
    problem = seal_problem(data, m, MANIFEST)
    if problem:
        raise ManifestCorrupt(problem)
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        fmt = m.get("format") if isinstance(m, dict) else None
        raise ValueError(f"manifest.json has an unknown format {str(fmt)[:40]!r}")
    files = m.get("files")
    if not isinstance(files, dict) or not files or not is_step(m.get("step")):
        raise ValueError("manifest.json lacks its file list or a valid step")
    if len(files) > 100_000:
        raise ValueError("manifest.json lists more files than a checkpoint has")
    for name, meta in files.items():
        if not name or "/" in name or "\0" in name or name.startswith(".") or len(name) > 255 or not isinstance(meta, dict):
            raise ValueError(f"manifest.json lists an unsafe file name {name[:60]!r}")
        size = meta.get("size")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ValueError(f"manifest.json gives {name} no valid size")
        try:
            record_checksum(meta)
        except ValueError as exc:
            raise ManifestInvalid(f"manifest.json lists {name[:60]} with {exc}") from None
    for key, kind in (("epoch", int), ("metrics", dict), ("pin", str), ("world_size", int)):
        if m.get(key) is not None and not isinstance(m[key], kind):
            raise ValueError(f"manifest.json has a {key} of the wrong type")
    if isinstance(m.get("metrics"), dict):
        m["metrics"] = {str(k)[:64]: float(v) for k, v in list(m["metrics"].items())[:256]
                        if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return m


def safetensors_header_length(head: bytes, size: int, name: str) -> int:
    """The header length a safetensors file's first 8 bytes declare, bounded by the file's size and by
    SAFETENSORS_HEADER_MAX. The one header reader: safetensors_file.parse_safetensors uses it too."""
    if len(head) < 8:
        raise ValueError(f"{name} is truncated (no header)")
    (n,) = struct.unpack("<Q", head[:8])
    if n > min(size - 8, SAFETENSORS_HEADER_MAX):
        raise ValueError(f"{name} has a corrupt header length")
    return n


def safetensors_header(raw: bytes, name: str) -> Any:
    """A safetensors header's JSON, bounded in size and nesting (fsutil.loads_json_bounded)."""
    return loads_json_bounded(raw, f"the header of {name}")


def _safetensors_header(path: Path, size: int) -> tuple[int, Any]:
    with open(path, "rb") as f:
        n = safetensors_header_length(f.read(8), size, path.name)
        raw = f.read(n)
    return n, safetensors_header(raw, path.name)


def safetensors_problem(path: Path, size: Optional[int] = None) -> Optional[str]:
    """Why a safetensors file is unusable (truncated, bad header), or None if its structure is sound:
    the header is an object of well-formed tensor entries whose data tiles the rest of the file."""
    try:
        size = os.lstat(path).st_size if size is None else size
        n, header = _safetensors_header(path, size)
    except ValueError as exc:
        return str(exc)
    except OSError as exc:
        return f"{path.name} is unreadable ({exc.strerror or exc.__class__.__name__})"
    if not isinstance(header, dict):
        return f"{path.name} has a header that is not a JSON object"
    spans = []
    for key, meta in header.items():
        if key == "__metadata__":
            if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
                return f"{path.name} has malformed __metadata__"
            continue
        problem = _entry_problem(meta)
        if problem:
            return f"{path.name} has a malformed entry for {key[:60]!r}: {problem}"
        spans.append(tuple(meta["data_offsets"]))
    end = 0
    for b, e in sorted(spans):
        if b != end:
            return f"{path.name} has overlapping or gapped tensor data"
        end = e
    if 8 + n + end != size:
        return f"{path.name} is truncated or padded ({size} bytes, header says {8 + n + end})"
    return None


def _entry_problem(meta: Any) -> Optional[str]:
    if not isinstance(meta, dict):
        return "not an object"
    dtype, shape, offs = meta.get("dtype"), meta.get("shape"), meta.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in ITEMSIZE:
        return "unknown dtype"
    if not isinstance(shape, list) or len(shape) > 64 or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        return "bad shape"
    if not (isinstance(offs, list) and len(offs) == 2 and all(isinstance(o, int) and not isinstance(o, bool) for o in offs)):
        return "bad data_offsets"
    b, e = offs
    count = 1
    for d in shape:
        count *= d
    if not 0 <= b <= e or (dtype not in ("F4", "F6_E2M3", "F6_E3M2") and e - b != count * ITEMSIZE[dtype]):
        return "data_offsets do not match the shape"
    return None


def check_native(folder: Path, verify: bool, manifest: Optional[dict] = None,
                 stats: Optional[dict[str, os.stat_result]] = None, step: Optional[int] = None) -> tuple[str, str, dict]:
    """(status, reason, manifest) for a native checkpoint folder. status: complete|incomplete|corrupt|invalid.
    `stats` (name -> lstat result of the folder's entries), when the caller has them, saves syscalls.
    `step`, when given (the step its name says), must equal the manifest's: a copy renamed to another
    step is not that checkpoint."""
    try:
        m = manifest or read_manifest(folder, stats.get(MANIFEST) if stats is not None else None)
    except ManifestInvalid as exc:
        return "invalid", str(exc), {}
    except ManifestCorrupt as exc:
        return "corrupt", str(exc), {}
    except ManifestUnverifiable as exc:
        return "unreadable", str(exc), {}
    except ValueError as exc:
        return "incomplete", str(exc), {}
    if step is not None and m["step"] != step:
        return "invalid", f"its manifest says step {m['step']}, its name says step {step} (a renamed copy?)", m
    # The manifest records each file's size at commit: a size check catches truncation without reading
    # the file (a changed byte is what the checksums are for, with verify).
    for name, meta in m["files"].items():
        try:
            st = stats[name] if stats is not None else os.lstat(os.path.join(folder, name))
        except (FileNotFoundError, KeyError):
            return "incomplete", f"{name} listed in the manifest is missing", m
        if not stat.S_ISREG(st.st_mode):
            return "corrupt", f"{name} is not a regular file (symlinks are not followed)", m
        if st.st_size != meta["size"]:
            return "corrupt", f"{name} has {st.st_size} bytes, the manifest says {meta['size']}", m
    if verify:
        for name, meta in m["files"].items():
            problem = digest_problem(Path(folder) / name, meta)
            if problem is not None:
                # an algorithm this machine cannot compute says nothing about the bytes: not corrupt
                return problem.kind.status, problem.message, m
    return "complete", "", m


def build_manifest(step: int, files: dict[str, dict], **extra: Any) -> dict:
    return {"format": FORMAT, "step": int(step), "files": files, **extra}
