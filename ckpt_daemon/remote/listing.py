"""What a replica target holds: one listing of its objects, the remote manifest of each checkpoint,
and the status of each replica (the same words as the local catalog's).

- complete: the remote manifest is valid and every file it lists is there with its recorded size and
  the ETag the server gave it at upload (with `verify`: every byte read back and hashed);
- incomplete: a file is missing; corrupt: a file's size, ETag or (verify) checksum differs, i.e. it was
  altered after the upload; invalid: the remote manifest cannot be used;
- a prefix without a remote manifest is no replica: it is listed apart as `in_progress` (an upload
  under way or interrupted) and removed by the daemon once nothing uploads it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ckpt_daemon.fsutil import new_hasher, record_checksum
from ckpt_daemon.remote import format as fmt
from ckpt_daemon.remote.errors import RemoteError, RemoteNotFound
from ckpt_daemon.remote.store import ObjInfo, Store


@dataclass
class Replica:
    name: str
    step: int
    status: str
    reason: str = ""
    manifest: Optional[dict] = None
    url: str = ""
    bytes: int = 0
    created: float = 0.0
    verified: bool = False

    @property
    def valid(self) -> bool:
        return self.status == "complete"

    def to_json(self) -> dict:
        """The shape of `ckpt-daemon list --json`'s entries (name, step, status, ...), plus the url."""
        m = self.manifest or {}
        return {"name": self.name, "path": self.url, "url": self.url, "step": self.step,
                "layout": m.get("layout", ""), "status": self.status, "reason": self.reason, "bytes": self.bytes,
                "freeable_bytes": self.bytes, "mtime": self.created, "epoch": m.get("epoch"),
                "metrics": m.get("metrics", {}), "pin": None, "verified": self.verified, "fields": {}, "version": 0,
                "recorded": True, "epoch_end": bool(m.get("epoch_end")), "meta": m.get("meta", {}), "digest": None,
                "origin": m.get("origin", {})}


@dataclass
class RemoteCatalog:
    url: str
    replicas: list[Replica]  # ascending step
    in_progress: dict[str, list[ObjInfo]]  # name -> objects of a prefix without a remote manifest
    objects: dict[str, list[ObjInfo]]  # name -> every object under its prefix
    pointers: dict[str, str] = field(default_factory=dict)

    def valid(self) -> list[Replica]:
        return [r for r in self.replicas if r.valid]

    def newest_valid(self) -> Optional[Replica]:
        v = self.valid()
        return v[-1] if v else None

    def by_name(self, name: str) -> Optional[Replica]:
        idx = self.__dict__.get("_idx")
        if idx is None or len(idx) != len(self.replicas):
            idx = self.__dict__["_idx"] = {r.name: r for r in self.replicas}
        return idx.get(name)


def _status(m: dict, objs: dict[str, ObjInfo], key) -> tuple[str, str]:
    for rel, rec in sorted(m["files"].items()):
        o = objs.get(key(rec["key"]))
        label = rel or m["name"]
        if o is None:
            return "incomplete", f"{label} is missing from the replica"
        if o.size != rec["size"]:
            return "corrupt", f"{label} has {o.size} bytes on the server, {rec['size']} when it was uploaded"
        etag = rec["server"].get("etag") or ""
        if etag and o.etag and o.etag != etag:
            return "corrupt", f"{label} was replaced on the server after the upload (ETag {o.etag}, recorded {etag})"
    return "complete", ""


def scan_remote(store: Store, cache: Optional[dict] = None) -> RemoteCatalog:
    """List the target once and describe every replica. `cache` (name -> (marker ETag and size, manifest))
    spares re-reading remote manifests that did not change. Raises RemoteError if the target cannot be
    listed."""
    t = store.target
    base = t.key("")
    base = base + "/" if base else ""
    groups: dict[str, dict[str, ObjInfo]] = {}
    for o in store.list(base):
        rest = o.key[len(base):]
        name, _, tail = rest.partition("/")
        if not tail or name == ".ckpt-daemon" or fmt.name_problem(name):
            continue
        groups.setdefault(name, {})[t.key(rest)] = o
    replicas, in_progress = [], {}
    for name, objs in sorted(groups.items()):
        mk = objs.get(t.key(fmt.marker_key(name)))
        if mk is None:
            in_progress[name] = sorted(objs.values(), key=lambda o: o.key)
            continue
        tag = (mk.etag, mk.size, mk.mtime)
        hit = cache.get(name) if cache is not None else None
        if hit is not None and hit[0] == tag:
            m, why = hit[1], hit[2]
        else:
            try:
                m, why = fmt.parse(store.get_bytes(mk.key, fmt.MANIFEST_MAX_BYTES), name), ""
            except RemoteNotFound:
                continue  # deleted while we looked
            except ValueError as exc:
                m, why = None, str(exc)
            if cache is not None:
                cache[name] = (tag, m, why)
        url = f"{t.url}/{name}"
        if m is None:
            replicas.append(Replica(name, -1, "invalid", why, None, url))
            continue
        status, reason = _status(m, objs, t.key)
        replicas.append(Replica(name, m["step"], status, reason, m, url, sum(r["size"] for r in m["files"].values()),
                                float(m.get("created") or 0.0)))
    replicas.sort(key=lambda r: (r.step, r.created, r.name))
    pointers = {}
    try:
        pointers = fmt.parse_pointers(store.get_bytes(t.key(fmt.POINTERS), 1 << 16))
    except RemoteError:
        pass
    if cache is not None:
        for gone in set(cache) - set(groups):
            cache.pop(gone, None)
    return RemoteCatalog(t.url, replicas, in_progress, {n: sorted(o.values(), key=lambda x: x.key) for n, o in groups.items()},
                         pointers)


def verify_replica(store: Store, r: Replica) -> Replica:
    """Read every byte of a replica back and check it against our recorded checksums (no disk used)."""
    if r.manifest is None or not r.valid:
        return r
    for rel, rec in sorted(r.manifest["files"].items()):
        algo, want = record_checksum(rec)
        h = new_hasher(algo, threads=False)
        n = 0
        try:
            for chunk in store.read_range(store.target.key(rec["key"]), 0, rec["size"]):
                h.update(chunk)
                n += len(chunk)
        except RemoteError as exc:
            return Replica(**{**r.__dict__, "status": "corrupt", "reason": f"{rel or r.name}: {exc}", "verified": True})
        if n != rec["size"] or h.hexdigest() != want:
            return Replica(**{**r.__dict__, "status": "corrupt", "verified": True,
                              "reason": f"{rel or r.name} fails its recorded {algo} checksum: altered after the upload"})
    return Replica(**{**r.__dict__, "verified": True})
