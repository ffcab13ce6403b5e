"""python -m maintenance.snapshot [--config PATH] [--prune] [--dry-run]

Creates snapshots/YYYY-MM-DD/ holding the latest valid checkpoint and the best one, with a manifest
(snapshot.json). Built in a temp folder and renamed, so a half-made snapshot never looks done; a
second run the same day does nothing. Native checkpoint files are never rewritten after their commit,
so they are hard-linked (zero extra bytes); other layouts (whose trainers may rewrite files in place)
are reflink-copied where the filesystem can, else copied. Then snapshot retention (keep_daily,
keep_weekly, keep_monthly, as restic's `forget` defines them) prunes old snapshots, logged to
logs/cleanup.log.
"""

from __future__ import annotations

import argparse
import datetime as dt
import errno
import json
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from ckpt_daemon import runtime
from ckpt_daemon.cliutil import add_json_argument, config_path, module_main
from ckpt_daemon.config import Config, load_config
from ckpt_daemon.errors import CheckpointError, DiskFullError, NoValidCheckpoint
from ckpt_daemon.fsutil import (
    atomic_write_json,
    copy_into,
    disk_full_error,
    is_enospc,
    read_json_file,
    remove_tree_safely,
    tree_stats,
)
from ckpt_daemon.logs import append_text
from ckpt_daemon.store import catalog as cat
from ckpt_daemon.store import foreign
from ckpt_daemon.store import resolve as rs
from ckpt_daemon.store.commit import Scratch
from ckpt_daemon.termtext import inert

SNAPSHOT_MANIFEST = "snapshot.json"
SNAPSHOT_FORMAT = "ckpt-daemon-snapshot/1"
DATE_RE = re.compile(r"\A([0-9]{4})-([0-9]{2})-([0-9]{2})\Z")  # ASCII digits only (\d takes any script's)



@dataclass
class SnapshotResult:
    name: str
    path: Path
    created: bool
    checkpoints: list[dict] = field(default_factory=list)
    apparent_bytes: int = 0
    added_bytes: int = 0
    message: str = ""


def _select(c: cat.Catalog, include: Sequence[str]) -> dict[str, list[str]]:
    """name -> roles ("latest", "best") of what a snapshot takes from one run (may be empty)."""
    chosen: dict[str, list[str]] = {}
    for role in ("latest", "best"):
        e = rs.valid_or_none(c, role) if role in include else None
        if e is not None:
            chosen.setdefault(e.name, []).append(role)
    return chosen


def _copy_checkpoint(src: Path, dst: Path, method: str, progress=None) -> tuple[int, int, set[str], list[str]]:
    """Copy one checkpoint (folder or file) without following symlinks.
    Returns (apparent bytes, bytes written, the methods really used, notes)."""
    apparent = added = 0
    used: set[str] = set()
    notes: list[str] = []
    if src.is_symlink():
        raise CheckpointError(f"{src} is a symlink; snapshots never follow links")

    def one(p: Path, d: Path) -> None:
        nonlocal added
        try:
            how, n = copy_into(p, d, method, progress)
        except OSError as exc:
            if method != "link" or exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
                raise
            how, n = copy_into(p, d, "copy", progress)  # another filesystem, or too many links: copy
            notes.append(f"{d.name}: hard link impossible ({exc.strerror}), copied")
        used.add(how)
        added += n

    if src.is_file():
        apparent = src.lstat().st_size
        one(src, dst)
        return apparent, added, used, notes
    dst.mkdir()
    for root, dirs, files in os.walk(src, followlinks=False):
        rel = Path(root).relative_to(src)
        for d in dirs:
            if os.path.islink(os.path.join(root, d)):
                notes.append(f"skipped symlink {rel / d}")
            else:
                (dst / rel / d).mkdir()
        for f in files:
            p = Path(root) / f
            if p.is_symlink():
                notes.append(f"skipped symlink {rel / f}")
                continue
            apparent += p.lstat().st_size
            one(p, dst / rel / f)
    return apparent, added, used, notes


def choose_method(mode: str, layout: str, probe_dir: Path, src: Path) -> str:
    """How a checkpoint goes into a snapshot. `link`: hard links for native checkpoints (never rewritten
    after commit; zero bytes) and copies for other layouts (their trainers may rewrite files in place).
    `copy`: an independent copy (reflink where the filesystem can, else bytes), verified. `auto`: a
    reflink where the filesystem can (independent and zero bytes), else as `link`."""
    if mode == "copy" or layout != "native":
        return "copy"
    if mode == "link":
        return "link"
    return "reflink" if _can_reflink(src, probe_dir) else "link"


def _can_reflink(src: Path, probe_dir: Path) -> bool:
    from ckpt_daemon.fsutil import reflink

    f = src if src.is_file() else next((p for p in sorted(src.iterdir()) if p.is_file() and not p.is_symlink()), None)
    if f is None:
        return False
    probe = probe_dir / ".reflink-probe"
    try:
        fi = os.open(f, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            fo = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                return reflink(fi, fo)
            finally:
                os.close(fo)
        finally:
            os.close(fi)
    except OSError:
        return False
    finally:
        probe.unlink(missing_ok=True)


def _add(res: SnapshotResult, e: cat.Entry, dest: Path, roles: list[str], method: str, verify: bool,
         run: str = "", progress=None) -> None:
    try:
        sc = foreign.read_sidecar(e.path.parent, e.name) if e.layout != "native" else None
    except foreign.SidecarDamaged as exc:
        raise CheckpointError(f"{e.name} cannot be snapshotted: {exc}. The snapshot was not created; the "
                              "checkpoint is reported by `ckpt-daemon list --verify`.") from None
    apparent, added, used, notes = _copy_checkpoint(e.path, dest / e.name, method, progress)
    if verify:
        _layout, status, reason, _ = cat.check_entry(dest / e.name, verify=True, step=e.step, sidecar=sc)
        if status != "complete":
            raise CheckpointError(f"The snapshot's copy of {e.name} does not verify ({status}: {reason}); the snapshot "
                                  "was not created. Check the disk (dmesg) and run it again.")
    res.apparent_bytes += apparent
    res.added_bytes += added
    how = "/".join(sorted(used)) or "nothing to copy"
    rec = {"name": e.name, "run": run, "step": e.step, "layout": e.layout, "roles": roles, "metrics": e.metrics,
           "epoch": e.epoch, "apparent_bytes": apparent, "added_bytes": added, "method": how,
           "independent": "hard link" not in used, "verified": verify, "notes": notes}
    if sc is not None:
        rec["files"] = sc["files"]  # what restore checks the copy against
    res.checkpoints.append(rec)


def take_snapshot(cfg: Config, now: Optional[dt.datetime] = None, show_progress: bool = False) -> SnapshotResult:
    """Create today's snapshot (in cfg.timezone) unless it exists. Idempotent per day."""
    try:
        return _take_snapshot(cfg, now, show_progress)
    except OSError as exc:
        if is_enospc(exc):
            raise disk_full_error("take the snapshot", cfg.snapshot_dir, exc) from None
        raise


def _take_snapshot(cfg: Config, now: Optional[dt.datetime], show_progress: bool) -> SnapshotResult:
    import zoneinfo

    now = now or dt.datetime.now(zoneinfo.ZoneInfo(cfg.timezone))
    name = now.strftime("%Y-%m-%d")
    root = cfg.snapshot_dir
    final = root / name
    if os.path.lexists(final):
        return SnapshotResult(name, final, False, message=f"snapshot {name} already exists; nothing to do")
    root.mkdir(parents=True, exist_ok=True)
    mode = cfg.snapshots.mode
    res = SnapshotResult(name, final, True)
    bar = None
    with Scratch(root, f"snapshot-{name}") as scratch:
        tmp = scratch.path
        try:
            # Choose and hard-link under the commit lock, so a cleanup cannot move a chosen checkpoint into
            # the trash half-way through; copies (slow) are made after releasing it.
            with runtime.commit_lock(cfg.checkpoint_dir):
                todo = []
                for run, c in cat.scan_runs(cfg, stats=False).items():
                    chosen = _select(c, cfg.snapshots.include)
                    dest = tmp / run if run else tmp
                    dest.mkdir(exist_ok=True)
                    for n, roles in chosen.items():
                        e = c.by_name(n)
                        todo.append((run, e, roles, dest, choose_method(mode, e.layout, dest, e.path)))
                if not todo:
                    raise NoValidCheckpoint(
                        f"No valid checkpoint in {cfg.checkpoint_dir} to snapshot. Nothing was created; the snapshot "
                        "runs again at its next time.")
                for run, e, roles, dest, method in todo:
                    if method == "link":
                        _add(res, e, dest, roles, method, verify=False, run=run)
            slow = [t for t in todo if t[4] != "link"]
            progress = None
            if show_progress and slow:
                from rich.progress import Progress

                bar = Progress(transient=True)
                bar.start()
                task = bar.add_task("copying", total=sum(tree_stats(t[1].path)[0] for t in slow))
                progress = lambda n: bar.advance(task, n)  # noqa: E731
            for run, e, roles, dest, method in slow:
                _add(res, e, dest, roles, method, verify=True, run=run, progress=progress)
        finally:
            if bar is not None:
                bar.stop()
        atomic_write_json(tmp / SNAPSHOT_MANIFEST, {
            "format": SNAPSHOT_FORMAT, "date": name, "created": now.isoformat(), "mode": mode,
            "source": str(cfg.checkpoint_dir), "checkpoints": res.checkpoints,
            "apparent_bytes": res.apparent_bytes, "added_bytes": res.added_bytes,
        })
        scratch.commit(final)
    held = ", ".join("{}{} ({}, {})".format(f"{d['run']}/" if d["run"] else "", d["name"], "/".join(d["roles"]), d["method"])
                     for d in res.checkpoints)
    res.message = (f"snapshot {name}: {held}; "
                   f"apparent size {res.apparent_bytes / 2**20:.1f} MiB, really added {res.added_bytes / 2**20:.1f} MiB")
    return res


# ------------------------------------------------------------------------------ calendar retention
@dataclass
class SnapDecision:
    name: str
    keep: bool
    reasons: list[str]


def plan_calendar(dates: Sequence[tuple[str, dt.date]], keep_daily: int, keep_weekly: int, keep_monthly: int) -> list[SnapDecision]:
    """restic `forget` semantics: for the last N days (weeks, months) that have snapshots, keep the
    newest snapshot of each. The newest snapshot is always kept. Pure."""
    snaps = sorted(dates, key=lambda x: x[1], reverse=True)
    reasons: dict[str, list[str]] = {n: [] for n, _ in snaps}
    rules = [
        ("daily", keep_daily, lambda d: d.isoformat()),
        ("weekly", keep_weekly, lambda d: "%04d-W%02d" % d.isocalendar()[:2]),
        ("monthly", keep_monthly, lambda d: d.strftime("%Y-%m")),
    ]
    for label, n, bucket in rules:
        seen: list[str] = []
        for name, d in snaps:
            if len(seen) >= n:
                break
            b = bucket(d)
            if b in seen:
                continue
            seen.append(b)
            reasons[name].append(f"{label} #{len(seen)} ({b})")
    if snaps:
        reasons[snaps[0][0]].append("newest snapshot")
    return [SnapDecision(n, bool(reasons[n]), reasons[n] or ["outside keep_daily/keep_weekly/keep_monthly"]) for n, _ in snaps]


def list_snapshots(root: Path) -> list[tuple[str, dt.date]]:
    out = []
    if root.is_dir():
        for p in root.iterdir():
            m = DATE_RE.match(p.name)
            if m and p.is_dir() and not p.is_symlink() \
                    and (read_json_file(p / SNAPSHOT_MANIFEST, 16 << 20) or {}).get("format") == SNAPSHOT_FORMAT:
                out.append((p.name, dt.date(int(m[1]), int(m[2]), int(m[3]))))
    return out


def prune_snapshots(cfg: Config, dry_run: bool = False) -> list[SnapDecision]:
    s = cfg.snapshots
    decisions = plan_calendar(list_snapshots(cfg.snapshot_dir), s.keep_daily, s.keep_weekly, s.keep_monthly)
    lines = [f"=== {time.strftime('%Y-%m-%d %H:%M:%S %z')} snapshot retention ({'dry run' if dry_run else 'applied'}) "
             f"of {cfg.snapshot_dir}: keep_daily {s.keep_daily}, keep_weekly {s.keep_weekly}, keep_monthly {s.keep_monthly}"]
    for d in decisions:
        if d.keep:
            continue
        path = cfg.snapshot_dir / d.name
        if dry_run:
            lines.append(f"would delete snapshot {d.name}: {'; '.join(d.reasons)}")
            continue
        try:
            remove_tree_safely(path, cfg.snapshot_dir)
            lines.append(f"deleted snapshot {d.name}: {'; '.join(d.reasons)}")
        except OSError as exc:
            lines.append(f"FAILED to delete snapshot {d.name}: {exc}")
    lines.append(f"kept {sum(d.keep for d in decisions)} snapshots: "
                 + ", ".join(f"{d.name} ({'; '.join(d.reasons)})" for d in decisions if d.keep))
    append_text(cfg.log_dir / "cleanup.log", "\n".join(lines) + "\n\n")
    return decisions


def run_snapshot_job(cfg: Config, now: Optional[dt.datetime] = None) -> str:
    from maintenance.cleanup import finish_leftovers

    finish_leftovers(cfg)
    try:
        res = take_snapshot(cfg, now)
    except DiskFullError:
        prune_snapshots(cfg)  # a full snapshot disk still loses the snapshots its retention would drop
        raise
    prune_snapshots(cfg)
    return res.message


HELP = "take a snapshot of the latest and best checkpoints now (--list shows the snapshots)"


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--no-prune", action="store_true", help="do not apply snapshot retention afterwards")
    ap.add_argument("--list", action="store_true", help="list the snapshots and what snapshot retention would do, then exit")
    add_json_argument(ap, "the snapshot taken (or the list)")


def run(args: argparse.Namespace) -> int:
    cfg = load_config(config_path(args))
    if args.list:
        s = cfg.snapshots
        snaps = list_snapshots(cfg.snapshot_dir)
        decisions = plan_calendar(snaps, s.keep_daily, s.keep_weekly, s.keep_monthly)
        if args.json:
            print(json.dumps({"ok": True, "dir": str(cfg.snapshot_dir),
                              "snapshots": [{"name": d.name, "keep": d.keep, "reasons": d.reasons} for d in decisions]},
                             indent=2))
        elif not decisions:
            print(f"No snapshots in {cfg.snapshot_dir} yet. The daemon takes one at {s.schedule!r} "
                  f"({cfg.timezone}); `ckpt-daemon snapshot` takes one now.")
        for d in ([] if args.json else decisions):
            print(inert(f"{'keep  ' if d.keep else 'delete'} {d.name}  {'; '.join(d.reasons)}"))
        return 0
    from maintenance.cleanup import finish_leftovers

    leftovers = finish_leftovers(cfg)
    for line in ([] if args.json else leftovers):
        print(inert(f"Leftover of an interrupted run: {line}"))
    try:
        res = take_snapshot(cfg, show_progress=sys.stderr.isatty() and not args.json)
    except DiskFullError:
        if not args.no_prune:
            prune_snapshots(cfg)  # a full snapshot disk still loses the snapshots its retention would drop
        raise
    pruned = [] if args.no_prune else [d.name for d in prune_snapshots(cfg) if not d.keep]
    if args.json:
        print(json.dumps({"ok": True, "name": res.name, "path": str(res.path), "created": res.created,
                          "checkpoints": res.checkpoints, "apparent_bytes": res.apparent_bytes,
                          "added_bytes": res.added_bytes, "message": res.message, "pruned": pruned,
                          "leftovers": leftovers}, indent=2, default=str))
    else:
        print(inert(res.message))
        for name in pruned:
            print(f"pruned snapshot {name} (snapshot retention; logged to {cfg.log_dir / 'cleanup.log'})")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    return module_main("python -m maintenance.snapshot", __doc__.split("\n\n")[1], add_arguments, run, argv)

if __name__ == "__main__":
    sys.exit(main())
