"""Off-machine replicas in the daemon: one low-priority thread per target of `replicas:` in config.yaml.

Each thread, every few seconds: looks at the catalog (rescanned only when the checkpoint folder or the
sidecar folder changed, or once a minute), chooses what its `include` rules want (latest, best, epoch
ends, pinned, snapshots, all, every_steps), uploads what the target does not hold yet (newest first,
verified end to end: ckpt_daemon/remote/upload.py), applies the target's retention, removes what
interrupted uploads left, and reports its lag (steps and seconds behind, bytes pending), last success
and last error for `status`, the dashboard and /metrics. A lag beyond `within_s` is logged as an error
(a person must look) until it is caught up.

Nothing here can delay a save or a restart: the threads run at nice 19 in the idle I/O class, never
take the commit lock, read committed files only, and a transfer stops at the next part when the daemon
stops or the replica's settings change. boto3 is imported only when an s3:// target is configured.

When the daemon starts with no valid local checkpoint, `restore_newest` (called by the supervisor
before it starts the trainer) restores the newest verified replica, so that a replaced disk resumes the
run with nobody involved; a replica that fails verification falls back to the one before it.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Callable, Optional

from ckpt_daemon import runtime
from ckpt_daemon.config import Config, ReplicaConfig
from ckpt_daemon.logs import append_text, get_logger
from ckpt_daemon.remote import download, listing, source, upload
from ckpt_daemon.remote import format as fmt
from ckpt_daemon.remote import retention as rret
from ckpt_daemon.remote.connect import store_for
from ckpt_daemon.remote.errors import (
    Cancelled,
    LocalChanged,
    RemoteAuthError,
    RemoteError,
    RemoteSetupError,
    RemoteUnreachable,
)
from ckpt_daemon.remote.store import Store, Throttle
from ckpt_daemon.store import catalog as cat
from ckpt_daemon.store import foreign
from daemon import alerts

log = get_logger("daemon.replicate")

POLL_S = 5.0  # how often a target looks for work
RESCAN_S = 60.0  # a full catalog rescan at least this often (events can be missed)
REMOTE_REFRESH_S = 300.0  # the target is listed again at least this often (someone may have changed it)
MAX_BACKOFF_S = 60.0  # an outage is retried at least once a minute (a listing: cheap)
MAX_LISTED = 20  # names listed in status (pending, damaged); the counts are complete


def ready(e: cat.Entry) -> bool:
    """Whether a checkpoint's checksums are known (a native one's manifest, a foreign one's sidecar)."""
    return e.valid and (e.layout == "native" or e.recorded)


def select(c: cat.Catalog, include: list[str], every_steps: Optional[int],
           snapshot_names: set[str] = frozenset()) -> dict[str, list[str]]:
    """name -> why, for the valid checkpoints a replica's rules want (pure). `latest` is the newest one whose
    checksums are known: a script that saves every few seconds always has a newest file still settling."""
    out: dict[str, list[str]] = {}

    def add(e: Optional[cat.Entry], why: str) -> None:
        if e is not None and e.valid:
            out.setdefault(e.name, []).append(why)

    if "latest" in include:
        add(next((e for e in reversed(c.valid()) if ready(e)), None), "latest")
    if "best" in include:
        add(c.pointer("best"), "best")
    for e in c.valid():
        if "all" in include:
            add(e, "all")
        if "epoch_ends" in include and e.epoch_end:
            add(e, f"end of epoch {e.epoch}")
        if "pinned" in include and e.pin:
            add(e, "pinned")
        if "snapshots" in include and e.name in snapshot_names:
            add(e, "in a snapshot")
        if every_steps and e.step % every_steps == 0:
            add(e, f"step a multiple of {every_steps}")
    return out


def snapshot_names(cfg: Config) -> set[str]:
    """Checkpoints of the checkpoint folder itself that a local snapshot holds."""
    from ckpt_daemon.fsutil import read_json_file
    from maintenance.snapshot import SNAPSHOT_MANIFEST, list_snapshots

    names: set[str] = set()
    for snap, _ in list_snapshots(cfg.snapshot_dir):
        rec = read_json_file(cfg.snapshot_dir / snap / SNAPSHOT_MANIFEST, 16 << 20) or {}
        for c in rec.get("checkpoints") if isinstance(rec.get("checkpoints"), list) else []:
            if isinstance(c, dict) and isinstance(c.get("name"), str) and not c.get("run"):
                names.add(c["name"])
    return names


def lag(c: cat.Catalog, wanted: dict[str, list[str]], replicated: set[str], newest_remote_step: Optional[int],
        include: list[str], sizes: dict[str, int]) -> dict:
    """How far the target is behind: {lag_steps, behind_since, pending, bytes_pending} (pure). behind_since
    is when the oldest checkpoint the target still lacks was written (with `latest`: every checkpoint newer
    than the newest replica counts, each was the latest once)."""
    idx = {e.name: e for e in c.entries}
    pending = [idx[n] for n in wanted if n not in replicated and n in idx]
    ahead = [e for e in c.valid() if newest_remote_step is None or e.step > newest_remote_step] if "latest" in include else []
    late = pending + [e for e in ahead if e.name not in replicated]
    if not late:
        return {"lag_steps": 0, "behind_since": None, "pending": [], "pending_count": 0, "bytes_pending": 0}
    top = max(e.step for e in late)
    return {"lag_steps": max(0, top - (newest_remote_step if newest_remote_step is not None else 0)),
            "behind_since": min(e.mtime for e in late), "pending": sorted(e.name for e in pending)[:MAX_LISTED],
            "pending_count": len(pending), "bytes_pending": sum(sizes.get(e.name, e.bytes) for e in pending)}


class TargetWorker:
    """One replica target: its thread, its remote catalog, its status."""

    def __init__(self, url: str, get_cfg: Callable[[], Config], stop: threading.Event,
                 on_change: Callable[[], None], restoring: threading.Event):
        self.url = url
        self.get_cfg = get_cfg
        self.stop_event = stop
        self.on_change = on_change
        self.restoring = restoring
        self.cancel = threading.Event()
        self.wake = threading.Event()
        self.lock = threading.Lock()
        self._store: Optional[Store] = None
        self._store_key = None
        self._transfer: Optional[upload.Transfer] = None
        self._transfer_key = None
        self.rc: Optional[listing.RemoteCatalog] = None
        self.rc_time = 0.0
        self.mcache: dict = {}
        self._scan_key = None
        self._scan_time = 0.0
        self._catalog: Optional[cat.Catalog] = None
        self._sizes: dict[str, tuple[tuple, int]] = {}
        self._said: set[str] = set()
        self._alerting = False
        self.status: dict = {"url": url, "state": "starting", "replicas": 0, "newest": None, "lag_steps": 0,
                             "behind_since": None, "pending": [], "bytes_pending": 0, "uploading": None,
                             "last_success": None, "last_error": None, "uploaded_bytes": 0, "uploads": 0,
                             "within_s": None, "held": [], "damaged": {}, "waiting": []}
        self.thread = threading.Thread(target=self.run, daemon=True, name=f"replica {url}"[:60])

    # -- settings -----------------------------------------------------------------------------------
    def settings(self, cfg: Config) -> Optional[ReplicaConfig]:
        for r in cfg.replicas:
            if cfg.replica_target(r).url == self.url:
                return r
        return None

    def _settings_key(self, cfg: Config) -> tuple:
        r = self.settings(cfg)
        if r is None:
            return ()
        creds_path = cfg.resolve_path(r.credentials_file) if r.credentials_file else None
        try:
            st = os.stat(creds_path) if creds_path else None
            fkey = (st.st_mtime_ns, st.st_size, st.st_ino) if st else None
        except OSError:
            fkey = "missing"
        return (r.url, r.endpoint_url, r.region, str(creds_path), fkey, r.parallel)

    def store(self, cfg: Config, r: ReplicaConfig) -> Store:
        """The target's client, rebuilt when its settings or its credentials file change."""
        key = self._settings_key(cfg)
        if self._store is None or key != self._store_key:
            self._store = make_store(cfg, r, say=self._say)
            self._store_key = key
        return self._store

    def transfer(self, r: ReplicaConfig) -> upload.Transfer:
        key = (r.parallel, r.part_size_mb, r.max_mb_per_s)
        if self._transfer is None or key != self._transfer_key:
            if self._transfer is not None:
                self._transfer.pool.shutdown(wait=False)
            self._transfer = upload.Transfer(
                parallel=r.parallel, part_size=r.part_size_mb << 20, progress=self._progress,
                throttle=Throttle(r.max_mb_per_s * 1e6 if r.max_mb_per_s else None, self.cancel))
            self._transfer_key = key
        return self._transfer

    # -- status ---------------------------------------------------------------------------------------
    def _set(self, **kw) -> None:
        with self.lock:
            self.status.update(kw)
        self.on_change()

    def _progress(self, n: int, sent: bool = True) -> None:
        with self.lock:
            up = self.status.get("uploading")
            if up is not None:
                up["done"] = up.get("done", 0) + n
            if sent:
                self.status["uploaded_bytes"] += n

    def snapshot(self) -> dict:
        with self.lock:
            s = {k: (dict(v) if isinstance(v, dict) else list(v) if isinstance(v, list) else v) for k, v in self.status.items()}
        return s

    def _say(self, level: str, msg: str, **kw) -> None:
        """Log a message once until it changes (a target that stays down is not logged every 5 s)."""
        key = f"{level}:{msg}:{kw.get('kind') or kw.get('checkpoint') or ''}"
        if key in self._said:
            return
        if len(self._said) > 1000:  # bounded: a message may be said again after that many others
            self._said.clear()
        self._said.add(key)
        getattr(log, level)(msg, replica=self.url, **kw)

    def _fail(self, exc: BaseException) -> None:
        kind = getattr(exc, "kind", "error")
        msg = str(exc)
        self._set(state="error", last_error={"time": time.time(), "kind": kind, "message": msg})
        # a person must act on credentials and setup; an outage fixes itself (retried; the lag alert escalates)
        self._say("error" if kind in ("credentials", "setup", "error") else "warning", "replication failed", error=msg,
                  kind=kind)

    # -- thread ---------------------------------------------------------------------------------------
    def start(self) -> None:
        self.thread.start()

    def run(self) -> None:
        upload.lower_priority()
        backoff = 0.0
        while not self.stop_event.is_set() and not self.cancel.is_set():
            cfg = self.get_cfg()
            r = self.settings(cfg)
            if r is None:
                break
            key = self._settings_key(cfg)  # what this pass uses: a fix made during it is tried at once
            try:
                if self.restoring.is_set():
                    self._set(state="restoring")
                else:
                    self.run_pass(cfg, r)
                    backoff = 0.0
            except Cancelled:
                break
            except RemoteError as exc:
                self._fail(exc)
                self._report_offline(cfg, r)
                backoff = min(MAX_BACKOFF_S, max(POLL_S, backoff * 2) if not isinstance(exc, (RemoteAuthError, RemoteSetupError))
                              else 60.0)
            except Exception as exc:  # a bug must not end replication for good; it is logged and retried
                log.exception("replication pass failed unexpectedly; retrying", replica=self.url, error=str(exc))
                self._set(state="error", last_error={"time": time.time(), "kind": "error", "message": str(exc)[:500]})
                backoff = min(MAX_BACKOFF_S, max(POLL_S, backoff * 2))
            deadline = time.monotonic() + max(POLL_S, backoff)
            while time.monotonic() < deadline and not self.wake.wait(min(POLL_S, deadline - time.monotonic())):
                if self._settings_key(self.get_cfg()) != key:
                    break  # fixed credentials or settings are tried at once, not after the backoff
            self.wake.clear()
        if self._transfer is not None:
            self._transfer.pool.shutdown(wait=False, cancel_futures=True)

    # -- one pass -------------------------------------------------------------------------------------
    def local_catalog(self, cfg: Config, now: float) -> tuple[cat.Catalog, bool]:
        """The catalog, rescanned only when the folder or the sidecars changed, or after RESCAN_S."""
        key = []
        for p in (cfg.checkpoint_dir, cfg.checkpoint_dir / runtime.STATE_DIR / foreign.SIDECARS):
            try:
                key.append(os.stat(p).st_mtime_ns)
            except OSError:
                key.append(None)
        if self._catalog is not None and key == self._scan_key and now - self._scan_time < RESCAN_S:
            return self._catalog, False
        self._catalog = cat.scan_config(cfg, stats=False)
        self._scan_key, self._scan_time = key, now
        return self._catalog, True

    def remote(self, store: Store, now: float, force: bool = False) -> listing.RemoteCatalog:
        if force or self.rc is None or now - self.rc_time >= REMOTE_REFRESH_S:
            self.rc = listing.scan_remote(store, self.mcache)
            self.rc_time = now
        return self.rc

    def run_pass(self, cfg: Config, r: ReplicaConfig) -> None:
        now = time.time()
        store = self.store(cfg, r)
        rc = self.remote(store, now)
        c, rescanned = self.local_catalog(cfg, now)
        wanted = select(c, r.include, r.every_steps, snapshot_names(cfg) if "snapshots" in r.include else set())
        replicated = self._replicated(c, rc, wanted)
        cidx = {e.name: e for e in c.entries}
        todo = sorted((cidx[n] for n in wanted if n not in replicated), key=lambda e: -e.step)
        self._report(c, rc, wanted, replicated, r, state="uploading" if todo else "idle")
        busy: set[str] = set()
        uploaded = False
        waiting = []
        t = self.transfer(r)
        for e in todo:
            if self.stop_event.is_set() or self.cancel.is_set():
                raise Cancelled("stopping")
            try:
                src = source.from_entry(e)
            except source.NotReady as exc:
                waiting.append(e.name)
                self._say("info", "replica waits for a checkpoint to settle", checkpoint=e.name, reason=str(exc))
                continue
            except (OSError, ValueError) as exc:
                self._say("warning", "checkpoint cannot be read for replication; skipped", checkpoint=e.name,
                          reason=str(exc)[:300])
                continue
            self._sizes[e.name] = ((e.mtime,), src.nbytes)
            held = rc.by_name(e.name)
            newest = rc.newest_valid()
            if held is not None and newest is not None and newest.step > e.step and held.valid:
                # A different checkpoint of that name is replicated, and the target holds newer steps: this is
                # another run (e.g. started afresh under the same url), never allowed to replace the old replicas.
                self._say("warning", "a different checkpoint of this name is already replicated, from a run that got "
                                     "further; not replaced (give a new run its own replica url)", checkpoint=e.name)
                continue
            busy.add(e.name)
            self._set(uploading={"name": e.name, "done": 0, "total": src.nbytes, "started": time.time()})
            try:
                _, did = upload.upload_checkpoint(store, src, t, repair=held is not None and not held.valid)
            except LocalChanged as exc:
                busy.discard(e.name)
                self._say("warning", "checkpoint not replicated: it changed or went away while it was read",
                          checkpoint=e.name, reason=str(exc)[:300])
                continue
            finally:
                self._set(uploading=None)
            busy.discard(e.name)
            uploaded = uploaded or did
            with self.lock:
                self.status["uploads"] += 1 if did else 0
            if did:
                log.info("checkpoint replicated (verified)", replica=self.url, checkpoint=e.name, bytes=src.nbytes)
        if uploaded or rescanned:
            rc = self.remote(store, time.time(), force=uploaded)
        self._retention(cfg, r, store, rc, c, wanted)
        rc = self.rc
        cleaned, aborted = rret.remove_leftovers(store, rc, busy | {n for n in wanted if n not in self._replicated(c, rc, wanted)})
        if cleaned or aborted:
            log.info("removed what interrupted uploads left on the replica", replica=self.url, prefixes=cleaned,
                     uploads_aborted=aborted)
            rc = self.remote(store, time.time(), force=True)
        self._pointers(store, rc, c)
        replicated = self._replicated(c, rc, wanted)
        self._report(c, rc, wanted, replicated, r, state="idle", waiting=waiting, last_success=time.time(),
                     last_error=None)
        # a success re-arms the failure messages (a damaged replica stays said: it is in status all along)
        self._said = {k for k in self._said if k.startswith("info:") or "damaged" in k}

    def _report_offline(self, cfg: Config, r: ReplicaConfig) -> None:
        """The lag while the target cannot be reached: against what it held when it was last seen."""
        try:
            c, _ = self.local_catalog(cfg, time.time())
            rc = self.rc or listing.RemoteCatalog(self.url, [], {}, {})
            wanted = select(c, r.include, r.every_steps, snapshot_names(cfg) if "snapshots" in r.include else set())
            self._report(c, rc, wanted, self._replicated(c, rc, wanted), r)
        except Exception as exc:  # the report is for status only; the pass's own error is what counts
            log.debug("could not compute the lag of an unreachable replica", replica=self.url, error=str(exc))

    def _replicated(self, c: cat.Catalog, rc: listing.RemoteCatalog, wanted: dict) -> set[str]:
        """The wanted checkpoints the target holds whole, as they are now (a replica written before the
        checkpoint's last change is compared file by file)."""
        out = set()
        cidx = {e.name: e for e in c.entries}
        for n in wanted:
            rep, e = rc.by_name(n), cidx.get(n)
            if rep is None or not rep.valid or e is None or rep.step != e.step:
                continue
            if rep.created >= e.mtime:
                out.add(n)
                continue
            try:
                if upload.same_files(rep.manifest, source.from_entry(e)):
                    out.add(n)
            except (OSError, ValueError):
                pass
        return out

    def _report(self, c, rc, wanted, replicated, r: ReplicaConfig, **kw) -> None:
        newest = rc.newest_valid()
        sizes = {n: v[1] for n, v in self._sizes.items()}
        lg = lag(c, wanted, replicated, newest.step if newest else None, r.include, sizes)
        damaged = {x.name: f"{x.status}: {x.reason}" for x in rc.replicas if not x.valid}
        if len(damaged) > MAX_LISTED:
            damaged = dict(list(damaged.items())[:MAX_LISTED]) | {"...": f"and {len(damaged) - MAX_LISTED} more"}
        names = {e.name for e in c.entries}
        self._sizes = {n: v for n, v in self._sizes.items() if n in names}
        self._set(replicas=len(rc.valid()), within_s=r.within_s, damaged=damaged,
                  newest={"name": newest.name, "step": newest.step, "created": newest.created} if newest else None,
                  **lg, **kw)
        behind = time.time() - lg["behind_since"] if lg["behind_since"] else 0.0
        if behind > r.within_s and not self._alerting:
            self._alerting = True
            log.error("replication is behind beyond replicas[].within_s: the newest checkpoints exist only on this "
                      "machine", replica=self.url, behind_s=round(behind), lag_steps=lg["lag_steps"],
                      within_s=r.within_s, pending=lg["pending"][:10], last_error=(self.status.get("last_error") or {}).get("message"))
            last_error = (self.status.get("last_error") or {}).get("message")
            alerts.emit("replica_lag", f"replication to {self.url} is {round(behind)} s behind",
                        f"{lg['lag_steps']} steps ({len(lg['pending'])} checkpoint(s)) exist only on this machine; "
                        f"replicas[].within_s is {r.within_s:g} s." + (f" Last error: {last_error}" if last_error else ""),
                        key=f"replica_lag {self.url}", replica=self.url)
        elif behind <= r.within_s and self._alerting:
            self._alerting = False
            log.info("replication caught up", replica=self.url)
        for name, why in damaged.items():
            self._say("error", "a replica is damaged on the target (kept as evidence; a good local copy is uploaded "
                               "again)", checkpoint=name, reason=why)

    def _pointers(self, store: Store, rc: listing.RemoteCatalog, c: cat.Catalog) -> None:
        have = {x.name for x in rc.valid()}
        ptr = {}
        newest = rc.newest_valid()
        if newest is not None:
            ptr["latest"] = newest.name
        best = c.pointer("best")
        if best is not None and best.name in have:
            ptr["best"] = best.name
        elif rc.pointers.get("best") in have:
            ptr["best"] = rc.pointers["best"]
        if ptr and ptr != rc.pointers:
            store.put_bytes(store.target.key(fmt.POINTERS), fmt.dumps(ptr))
            rc.pointers = ptr

    def _retention(self, cfg: Config, r: ReplicaConfig, store: Store, rc: listing.RemoteCatalog, c: cat.Catalog,
                   wanted: dict) -> None:
        if r.retention.mode == "keep_all" or not rc.valid() or not c.valid():
            return  # an empty local folder (a replaced disk, a restore about to run) deletes no replica
        from maintenance import cleanup
        from maintenance import retention as lret

        if r.retention.mode == "same":
            tiers = rret.canon(cfg.retention.tiers)
            # the local policy guard's confirmed tiers (a person confirms them with a manual cleanup)
            confirmed = rret.canon(cleanup.confirmed_inputs(cfg.checkpoint_dir)[0].tiers)
        else:
            tiers = rret.canon(r.retention.tiers)
            confirmed = rret.confirmed_own_tiers(cfg.checkpoint_dir, self.url, tiers)
        local = {role: e.name for role in ("latest", "best") if (e := (c.newest_valid() if role == "latest" else c.pointer("best")))}
        keep = {n: f"wanted by include ({', '.join(w)})" for n, w in wanted.items()}
        keep.update({e.name: f"pinned ({e.pin})" for e in c.entries if e.pin})
        prot = rret.protections(rc, local, cfg.retention.keep_epoch_ends, keep)
        decisions, held = rret.plan(rc, tiers, confirmed, prot, lret.plan, lret.TierSpec)
        victims = [d for d in decisions if not d.keep]
        self._set(held=held)
        if not victims:
            return
        lines = [f"=== {time.strftime('%Y-%m-%d %H:%M:%S %z')} replica retention of {self.url} "
                 f"({'the local tiers' if r.retention.mode == 'same' else 'its own tiers'})"]
        freed = 0
        for d in victims:
            if self.stop_event.is_set():
                break
            freed += rret.delete_replica(store, rc, d.name)
            lines.append(f"deleted replica {d.name} (step {d.step}): {'; '.join(d.reasons)}")
        lines.append(f"kept {sum(d.keep for d in decisions)} replicas" + (f", held {len(held)} (unconfirmed policy)" if held else "")
                     + f"; freed {freed / 2**20:.1f} MiB on the target")
        try:
            append_text(cfg.log_dir / "cleanup.log", "\n".join(lines) + "\n\n")
        except OSError as exc:
            log.warning("could not write cleanup.log", error=str(exc))
        log.info("replica retention applied", replica=self.url, deleted=[d.name for d in victims], held=held)
        self.remote(store, time.time(), force=True)


def make_store(cfg: Config, r: ReplicaConfig, say: Callable = lambda *a, **k: None) -> Store:
    return store_for(cfg, r, warn=lambda w: say("warning", "credentials file is readable by others", detail=w))


class Replicator:
    """The replica targets of the config in force: a TargetWorker each (started and stopped as config.yaml
    changes), their status, and the restore of the newest replica before training starts."""

    def __init__(self, get_cfg: Callable[[], Config], stop: threading.Event, on_change: Callable[[], None] = lambda: None):
        self.get_cfg = get_cfg
        self.stop_event = stop
        self.on_change = on_change
        self.workers: dict[str, TargetWorker] = {}
        self.restoring = threading.Event()
        self.last_restore: Optional[dict] = None
        self.lock = threading.Lock()

    def sync(self) -> None:
        """Start a worker per configured target, stop those no longer configured (hot reload)."""
        cfg = self.get_cfg()
        urls = [cfg.replica_target(r).url for r in cfg.replicas]
        with self.lock:
            for url in list(self.workers):
                w = self.workers[url]
                if url not in urls or not w.thread.is_alive():
                    w.cancel.set()
                    w.wake.set()
                    del self.workers[url]
            for url in urls:
                if url not in self.workers:
                    w = TargetWorker(url, self.get_cfg, self.stop_event, self.on_change, self.restoring)
                    self.workers[url] = w
                    w.start()
                else:
                    self.workers[url].wake.set()  # settings may have changed: look again now
        self.on_change()

    def snapshot(self) -> list[dict]:
        with self.lock:
            out = [w.snapshot() for w in self.workers.values()]
        if self.last_restore:
            for s in out:
                if s["url"] == self.last_restore.get("url"):
                    s["restored"] = dict(self.last_restore)
        return out

    def stop(self, timeout: float = 10.0) -> None:
        with self.lock:
            workers = list(self.workers.values())
        for w in workers:
            w.cancel.set()
            w.wake.set()
        deadline = time.monotonic() + timeout
        for w in workers:
            w.thread.join(max(0.0, deadline - time.monotonic()))

    # -- restore before training ----------------------------------------------------------------------
    def restore_newest(self) -> Optional[str]:
        """With no valid local checkpoint: restore the newest verified replica of the first target that has
        one (config order), so that training resumes from it. A target that cannot be reached is retried for
        its restore_wait_s before training starts without it. Returns the restored name, or None."""
        cfg = self.get_cfg()
        targets = [r for r in cfg.replicas if r.restore_on_empty]
        if not targets:
            return None
        self.restoring.set()
        self.on_change()
        try:
            deadline = time.monotonic() + max(r.restore_wait_s for r in targets)
            while True:
                unreachable = []
                for r in targets:
                    url = cfg.replica_target(r).url
                    try:
                        name = self._restore_from(cfg, r)
                    except RemoteUnreachable as exc:
                        unreachable.append((url, str(exc)))
                        continue
                    except RemoteError as exc:
                        log.error("could not restore from a replica", replica=url, error=str(exc))
                        continue
                    if name:
                        return name
                if not unreachable:
                    return None
                if time.monotonic() >= deadline or self.stop_event.is_set():
                    log.error("no valid local checkpoint, and the replicas could not be reached: training starts "
                              "without them (from scratch, or what the trainer finds)",
                              replicas=[u for u, _ in unreachable], error=unreachable[0][1])
                    return None
                log.warning("no valid local checkpoint, and a replica cannot be reached yet; retrying before training "
                            "starts", replicas=[u for u, _ in unreachable], error=unreachable[0][1],
                            gives_up_in_s=round(deadline - time.monotonic()))
                self.stop_event.wait(min(10.0, max(0.0, deadline - time.monotonic())))
        finally:
            self.restoring.clear()
            self.on_change()

    def _restore_from(self, cfg: Config, r: ReplicaConfig) -> Optional[str]:
        store = make_store(cfg, r)
        url = store.target.url
        rc = listing.scan_remote(store)
        if not rc.valid():
            if rc.replicas:
                log.error("the replica holds no usable checkpoint", replica=url,
                          damaged={x.name: x.reason for x in rc.replicas})
            return None
        t = upload.Transfer(parallel=r.parallel, part_size=r.part_size_mb << 20,
                            throttle=Throttle(None, self.stop_event))
        try:
            t0 = time.time()
            try:
                path, notes = download.restore(store, rc, "latest", cfg.checkpoint_dir, cfg.checkpoints.pattern, t,
                                               note=lambda n: log.error("a replica failed verification; trying the one "
                                                                        "before it", replica=url, detail=n))
            except ValueError as exc:
                log.warning("nothing to restore from the replica", replica=url, reason=str(exc))
                return None
        finally:
            t.close()
        if path is None:
            return None
        self.last_restore = {"url": url, "name": path.name, "time": time.time(), "duration_s": round(time.time() - t0, 1),
                             "passed_over": notes}
        log.warning("no valid local checkpoint: restored the newest verified replica before starting training",
                    replica=url, checkpoint=path.name, duration_s=round(time.time() - t0, 1), passed_over=notes)
        return path.name
