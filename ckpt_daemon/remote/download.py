"""Restore a replica as a local checkpoint: download into scratch space, verify, commit.

Every file is fetched in parallel ranges (bounded memory: a worker holds one read chunk) into the
state folder's scratch space, after the server's own checksum and size of each object were compared
with those recorded at upload (an object replaced since is refused before a byte is read). Then the
checkpoint is verified exactly as any local one: `catalog.check_entry(..., verify=True)` against our
recorded checksums (a native checkpoint against its manifest.json, which must itself match the
remote manifest; a foreign one against the remote manifest's records). Only then is it committed
(`store.commit`: commit lock, never over an existing name, durable rename). A foreign
checkpoint gets its sidecar manifest at once, so the catalog knows its checksums from the start.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional

from ckpt_daemon.fsutil import fsync_dir, record_checksum
from ckpt_daemon.remote.errors import (
    Cancelled,
    RemoteAuthError,
    RemoteError,
    RemoteIntegrityError,
    RemoteSetupError,
    RemoteUnreachable,
)
from ckpt_daemon.remote.listing import RemoteCatalog, Replica
from ckpt_daemon.remote.store import Store
from ckpt_daemon.remote.upload import Transfer
from ckpt_daemon.store import catalog as cat
from ckpt_daemon.store import foreign, names
from ckpt_daemon.store import manifest as mf
from ckpt_daemon.store import resolve as rs
from ckpt_daemon.store.commit import Scratch

RANGE = 8 << 20


class ReplicaDamaged(RemoteIntegrityError):
    """A replica whose bytes differ from what was uploaded (altered or damaged on the server)."""


def _fetch_file(store: Store, rec: dict, dst: Path, t: Transfer, label: str) -> None:
    key = store.target.key(rec["key"])
    info = store.head(key)
    if info is None:
        raise ReplicaDamaged(f"{label} is missing from the replica")
    want = rec["server"].get("sha256")
    if info.size != rec["size"] or (want and info.sha256 and info.sha256 != want):
        raise ReplicaDamaged(f"{label} was altered on the server after the upload (size {info.size}, checksum "
                             f"{info.sha256}; recorded {rec['size']}, {want})")
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        os.ftruncate(fd, rec["size"])

        def part(off: int, n: int) -> None:
            pos = off
            for chunk in store.read_range(key, off, n):
                if t.cancel.is_set():
                    raise RemoteError("the restore was cancelled")
                view = memoryview(chunk)
                while view:
                    w = os.pwrite(fd, view, pos)
                    view, pos = view[w:], pos + w
            t.progress(n)

        futures = [t.pool.submit(part, off, min(RANGE, rec["size"] - off)) for off in range(0, rec["size"], RANGE)]
        cf.wait(futures)
        for f in futures:
            f.result()
        os.fsync(fd)
    finally:
        os.close(fd)


def fetch(store: Store, m: dict, dst: Path, t: Transfer) -> None:
    """Download the files of remote manifest `m` to `dst` (a new folder, or a file for a single-file one)."""
    if m["layout"] == "file":
        _fetch_file(store, m["files"][""], dst, t, m["name"])
        return
    os.mkdir(dst, 0o755)
    made = {dst}
    for rel, rec in sorted(m["files"].items()):
        p = dst.joinpath(*rel.split("/"))
        for parent in reversed(p.parents):
            if parent not in made and parent.is_relative_to(dst) and parent != dst:
                os.mkdir(parent, 0o755)  # fresh folders in our scratch space: nothing to follow
                made.add(parent)
        _fetch_file(store, rec, p, t, f"{m['name']}/{rel}")
    for d in sorted(made, key=lambda p: len(p.parts), reverse=True):
        fsync_dir(d)


def verify_download(m: dict, path: Path) -> tuple[str, str]:
    """(status, reason) of a downloaded replica, checked as a local checkpoint of that step is."""
    if m["layout"] == "native":
        rec = m["files"].get(mf.MANIFEST)
        if rec is None:
            return "invalid", "the replica of a native checkpoint lists no manifest.json"
        from ckpt_daemon.fsutil import file_digest_problem

        problem = file_digest_problem(path / mf.MANIFEST, rec)
        if problem:
            return "corrupt", f"manifest.json: {problem}"
        try:
            local = mf.read_manifest(path)["files"]
        except ValueError as exc:
            return "corrupt", str(exc)
        listed = {n: r for n, r in m["files"].items() if n != mf.MANIFEST}
        if set(local) != set(listed) or any(record_checksum(local[n]) != record_checksum(listed[n]) for n in local):
            return "corrupt", "its manifest.json does not list the files and checksums the replica recorded"
        layout, status, reason, _ = cat.check_entry(path, verify=True, step=m["step"])
    else:
        sidecar = {"files": {rel: {k: v for k, v in r.items() if k not in ("key", "server", "part_size")}
                             for rel, r in m["files"].items()}}
        layout, status, reason, _ = cat.check_entry(path, verify=True, step=m["step"], sidecar=sidecar)
    if status == "complete" and layout != m["layout"]:
        return "invalid", f"it is a {layout} checkpoint, the replica says {m['layout']}"
    return status, reason


def restore_one(store: Store, m: dict, root: Path, t: Transfer) -> Path:
    """Download, verify and commit the replica `m` as `root/<name>`. Raises ReplicaDamaged (the replica
    fails verification: nothing is committed), FileExistsError (that name is taken locally) or
    RemoteError (the server failed)."""
    name = m["name"]
    dest = Path(root) / name
    if os.path.lexists(dest):
        raise FileExistsError(f"{name} is already in {root}; nothing was overwritten")
    with Scratch(root, f"replica-{name}") as scratch:
        built = scratch.path / name
        fetch(store, m, built, t)
        status, reason = verify_download(m, built)
        if status != "complete":
            raise ReplicaDamaged(f"the replica of {name} at {store.target} does not verify ({status}: {reason}); it "
                                 "was not restored")
        sidecar = None
        if m["layout"] != "native":  # recorded before the rename (which keeps sizes, times and inodes)
            files = {}
            for rel, st in foreign.entry_files(built).items():
                r = m["files"][rel]
                files[rel] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns,
                              **{k: v for k, v in r.items() if k in ("algo", "digest", "sha256")}}
            sidecar = {"layout": m["layout"], "step": m["step"], "meta": dict(m.get("meta") or {}), "files": files}
        scratch.commit(dest, entry=built, sidecar=sidecar)
    return dest


# ---------------------------------------------------------------------------------------- choosing
def choose(rc: RemoteCatalog, which: str, patterns: Iterable[str], best_metric: Optional[str] = None,
           best_mode: str = "min") -> list[Replica]:
    """The replicas to try for `which` (latest | best | STEP | NAME), in order: for latest, newest first
    (a damaged one falls back to the one before); otherwise exactly one. Raises ValueError with the
    reason when none fits."""
    rxs = [names.compile_pattern(p) for p in patterns]
    usable = [r for r in rc.valid() if names.match_name(r.name, rxs) is not None]
    if not usable:
        others = [r for r in rc.replicas if r.valid]
        raise ValueError(f"{rc.url} holds no complete replica" + (
            f" named like checkpoints.pattern ({', '.join(r.name for r in others[:3])} do not match)" if others else ""))
    versions = {r.name: (cat.match_name(r.name, rxs) or {}).get("_version", 0) for r in usable}
    items = [_Named(r, versions[r.name]) for r in usable]
    try:
        w = rs.parse_which(which, names=True)
        if w == rs.LATEST:  # newest first: a damaged one falls back to the one before
            return [n.replica for n in sorted(items, key=lambda n: (n.step, n.version, n.replica.created), reverse=True)]
        best = rc.pointers.get("best")
        if w == rs.BEST and not any(r.name == best for r in usable) and best_metric:
            scored = [r for r in usable if best_metric in (r.manifest or {}).get("metrics", {})]
            if scored:
                best = (min if best_mode == "min" else max)(
                    scored, key=lambda r: (r.manifest["metrics"][best_metric], -r.step)).name
        return [rs.pick(items, w, best, rc.url, names=True).replica]
    except rs.Unresolved as exc:
        if exc.kind == "no_best":
            raise ValueError(f"{rc.url} says no replica is the best one, and none records {best_metric or 'a metric'}"
                             ) from None
        if exc.kind == "ambiguous":
            raise ValueError(f"several replicas are at step {which} ({', '.join(r.name for r in usable if r.step == int(which))}); "
                             "name one") from None
        raise ValueError(f"{rc.url} holds no complete replica named or at step {which!r}; it holds "
                         f"{', '.join(r.name for r in usable[-10:])}") from None


@dataclass
class _Named:
    """A replica as store.resolve sees it: its name, step, re-save version and layout."""

    replica: Replica
    version: int = 0

    @property
    def name(self) -> str:
        return self.replica.name

    @property
    def step(self) -> int:
        return self.replica.step

    @property
    def valid(self) -> bool:
        return self.replica.valid

    @property
    def layout(self) -> str:
        return (self.replica.manifest or {}).get("layout", "")

    @property
    def path(self) -> Path:
        return Path(self.replica.name)


def restore(store: Store, rc: RemoteCatalog, which: str, root: Path, patterns: Iterable[str], t: Transfer,
            best_metric: Optional[str] = None, best_mode: str = "min",
            note: Callable[[str], None] = lambda s: None) -> tuple[Optional[Path], list[str]]:
    """Restore `which` from the replicas in `rc`; for latest, a replica that fails verification is passed
    over for the one before it (each failure is a note). Returns (the committed path, notes)."""
    notes: list[str] = []
    tried = choose(rc, which, patterns, best_metric, best_mode)
    for r in tried:
        try:
            return restore_one(store, r.manifest, root, t), notes
        except ReplicaDamaged as exc:
            msg = f"{r.name}: {exc}"
        except (RemoteUnreachable, RemoteAuthError, RemoteSetupError, Cancelled):
            raise  # the target, not this replica: no other replica would do better
        except RemoteError as exc:  # the server cannot give this replica back (e.g. its own CRC check failed)
            msg = f"{r.name}: the server could not return it intact ({exc})"
        except FileExistsError:
            msg = f"{r.name} is already in {root} (a local checkpoint of that name); nothing was overwritten"
        notes.append(msg)
        note(msg)
        if which != "latest":
            break
    return None, notes
