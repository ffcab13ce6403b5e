"""A local checkpoint as the uploader sees it: its files and the checksums recorded for them when it
was committed (a native checkpoint's manifest.json) or when it settled (a foreign checkpoint's sidecar
manifest). The upload reads every byte against those checksums, so a checkpoint damaged on the local
disk is never sent as a good replica."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ckpt_daemon.fsutil import digest_record, read_bytes_bounded, record_checksum
from ckpt_daemon.store import catalog as cat
from ckpt_daemon.store import foreign
from ckpt_daemon.store import manifest as mf


class NotReady(ValueError):
    """The checkpoint has no recorded checksums yet (a foreign one that has not settled): it waits."""


@dataclass
class Source:
    name: str
    step: int
    layout: str  # native | hf | file
    path: Path
    files: dict[str, dict]  # rel -> {size, checksum fields}; "" is a single-file checkpoint itself
    inline: dict[str, bytes] = field(default_factory=dict)  # rel -> bytes already read (manifest.json)
    epoch: Optional[int] = None
    metrics: dict = field(default_factory=dict)
    epoch_end: bool = False
    meta: dict = field(default_factory=dict)
    mtime: float = 0.0

    @property
    def nbytes(self) -> int:
        return sum(r["size"] for r in self.files.values())


def _checksum_only(rec: dict) -> dict:
    algo, digest = record_checksum(rec)
    return {"size": rec["size"], **digest_record(algo, digest)}


def from_entry(e: cat.Entry) -> Source:
    """The source of a complete catalog entry. Raises NotReady (a foreign checkpoint without a sidecar
    yet) or ValueError (its records cannot be read)."""
    common = dict(name=e.name, step=e.step, layout=e.layout, path=e.path, epoch=e.epoch, metrics=dict(e.metrics),
                  epoch_end=e.epoch_end, meta=dict(e.meta), mtime=e.mtime)
    if e.layout == "native":
        raw = read_bytes_bounded(e.path / mf.MANIFEST, mf.MANIFEST_MAX_BYTES)
        m = mf.read_manifest(e.path)
        if json.loads(raw).get("files") != m["files"]:
            raise ValueError(f"{e.name}/manifest.json changed while it was read")
        files = {n: _checksum_only(r) for n, r in m["files"].items()}
        files[mf.MANIFEST] = {"size": len(raw), **digest_record("sha256", hashlib.sha256(raw).hexdigest())}
        return Source(files=files, inline={mf.MANIFEST: raw}, **common)
    sc = foreign.read_sidecar(e.path.parent, e.name)
    if sc is None:
        raise NotReady(f"{e.name} has no recorded checksums yet (it is replicated once it has settled)")
    if isinstance(sc.get("meta"), dict):
        common["meta"] = dict(sc["meta"])  # what the sidecar says about it (restored with it)
    return Source(files={rel: _checksum_only(r) for rel, r in sc["files"].items()}, **common)
