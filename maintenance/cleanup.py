"""python -m maintenance.cleanup [--config PATH] [--dry-run] [-y] [--json]

Applies the graduated retention policy of config.yaml to checkpoints.dir: prints the count per tier,
every keep and delete with its reasons, and the bytes that will really be freed (a checkpoint
hard-linked into a snapshot frees nothing). Appends one block per run to logs/cleanup.log.

Exit codes:
  0  success (or a dry run)
  1  some deletions failed (the others went on); see the report
  2  bad usage or config, or confirmation needed but no terminal and no -y
  4  the commit lock could not be taken (a save held it too long); nothing was deleted
  130 cancelled at the confirmation prompt
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from ckpt_daemon import catalog as cat
from ckpt_daemon import runtime
from maintenance import retention
from ckpt_daemon.config import Config, load_config
from ckpt_daemon.errors import CkptError, UsageError
from ckpt_daemon.fsutil import fsync_dir, inside, remove_tree_safely
from ckpt_daemon.logs import append_text


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


@dataclass
class Report:
    mode: str  # "dry run" | "applied"
    root: Path
    tiers: list[str]
    decisions: list[retention.Decision]
    entries: dict[str, cat.Entry]
    activity: runtime.Activity
    open_files: list[str]
    in_progress: list[str]
    ignored: list[tuple[str, str]]
    deleted: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    skipped_changed: list[str] = field(default_factory=list)  # planned, but the re-plan under the lock kept them
    leftovers: list[str] = field(default_factory=list)  # removed from .trash, left by an earlier run
    freed_bytes: int = 0
    disk_free: int = 0
    disk_total: int = 0
    started: float = 0.0
    duration_s: float = 0.0

    @property
    def to_delete(self) -> list[retention.Decision]:
        return [d for d in self.decisions if not d.keep]

    def planned_free(self) -> int:
        return sum(self.entries[d.name].freeable_bytes for d in self.to_delete)

    def to_json(self) -> dict:
        return {
            "mode": self.mode, "root": str(self.root), "tiers": self.tiers,
            "training_active": self.activity.active, "training": self.activity.detail,
            "disk_free_bytes": self.disk_free, "disk_total_bytes": self.disk_total,
            "open_files": self.open_files, "in_progress": self.in_progress,
            "counts": {str(k): {"kept": v[0], "deleted": v[1]} for k, v in retention.tier_counts(self.decisions).items()},
            "decisions": [{"name": d.name, "step": d.step, "action": d.action, "tier": d.tier, "reasons": d.reasons,
                           "bytes": self.entries[d.name].bytes, "freeable_bytes": self.entries[d.name].freeable_bytes}
                          for d in self.decisions],
            "planned_free_bytes": self.planned_free(), "deleted": self.deleted, "failed": self.failed,
            "freed_bytes": self.freed_bytes, "duration_s": round(self.duration_s, 3),
        }


def open_checkpoint_files(root: Path) -> list[str]:
    """Files under `root` that some process has open (psutil); a writer we do not know about."""
    import psutil

    root_s = str(root) + os.sep
    out = []
    me = os.getpid()
    for proc in psutil.process_iter(["pid", "name"]):
        if proc.pid == me:
            continue
        try:
            for f in proc.open_files():
                if f.path.startswith(root_s) and f"{os.sep}{cat.RUNTIME_DIR}{os.sep}" not in f.path:
                    out.append(f"{f.path} (pid {proc.pid} {proc.info['name']})")
        except (psutil.Error, OSError):
            continue
    return out


def build_report(cfg: Config, mode: str, extra_protected: Optional[dict[str, str]] = None) -> Report:
    root = cfg.checkpoint_dir
    c = cat.scan_config(cfg)
    prot = retention.protections(c, extra_protected, cfg.trainer.best_metric)
    import shutil

    usage = shutil.disk_usage(root) if root.exists() else None
    decisions = retention.plan(retention.items_from_catalog(c), cfg.retention.tiers, prot)
    return Report(
        mode=mode, root=root, tiers=retention.describe_tiers(cfg.retention.tiers), decisions=decisions,
        entries={e.name: e for e in c.entries}, activity=runtime.training_activity(root),
        open_files=open_checkpoint_files(root) if root.exists() else [],
        in_progress=[p.name for p in c.in_progress], ignored=c.ignored, started=time.time(),
        disk_free=usage.free if usage else 0, disk_total=usage.total if usage else 0,
    )


def render(r: Report, verbose: bool = True) -> str:
    lines = [f"Cleanup of {r.root} ({r.mode})"]
    lines.append("Training: " + ("ACTIVE, " if r.activity.active else "not active, ") + r.activity.detail
                 + (" (the checkpoint being written, the newest and the one it resumed from are protected; "
                    "deletions wait for the commit lock)" if r.activity.active else ""))
    if r.disk_total:
        lines.append(f"Disk: {human(r.disk_free)} free of {human(r.disk_total)} ({r.disk_free / r.disk_total:.0%})")
    if r.in_progress:
        lines.append(f"Being written or interrupted (never touched): {', '.join(r.in_progress)}")
    if r.open_files:
        lines.append(f"Open by other processes: {'; '.join(r.open_files[:5])}" + (" ..." if len(r.open_files) > 5 else ""))
    lines.append("Tiers: " + "; ".join(r.tiers))
    counts = retention.tier_counts(r.decisions)
    for t in sorted(counts, key=lambda k: (k is None, k or 0)):
        kept, deleted = counts[t]
        label = f"tier {t}" if t is not None else "outside the tiers"
        lines.append(f"  {label}: {kept + deleted} checkpoints, keep {kept}, delete {deleted}")
    if verbose:
        for d in r.decisions:
            e = r.entries[d.name]
            lines.append(f"  {d.action.upper():6} {d.name:<28} {human(e.bytes):>10}  {'; '.join(d.reasons)}")
    dels = r.to_delete
    linked = [d.name for d in dels if r.entries[d.name].freeable_bytes < r.entries[d.name].bytes]
    total = sum(r.entries[d.name].bytes for d in dels)
    lines.append(f"Delete {len(dels)} of {len(r.decisions)} checkpoints: {human(total)} on disk, "
                 f"{human(r.planned_free())} really freed")
    if linked:
        lines.append(f"  {len(linked)} of them share files with snapshots (hard links): deleting them frees only "
                     f"what no snapshot holds ({', '.join(linked[:5])}{' ...' if len(linked) > 5 else ''})")
    return "\n".join(lines)


def execute(cfg: Config, r: Report, extra_protected: Optional[dict[str, str]] = None,
            remove: Callable[[Path, Path], None] = remove_tree_safely) -> Report:
    """Delete what the plan says, safely: under the commit lock re-scan and re-plan (a save may have
    committed since), move each victim into this run's own folder in .trash (it stops being a
    checkpoint at once), then remove that folder outside the lock. One failure is recorded and the
    rest go on."""
    root = cfg.checkpoint_dir
    planned = {d.name for d in r.to_delete}
    run_trash = root / cat.TRASH_DIR / f"run-{os.getpid()}-{int(time.time() * 1000)}"
    moved: list[tuple[str, Path, int]] = []
    with runtime.commit_lock(root):
        fresh = build_report(cfg, r.mode, extra_protected)
        now_delete = {d.name for d in fresh.to_delete}
        r.skipped_changed = sorted(planned - now_delete)
        run_trash.mkdir(parents=True, exist_ok=True)
        for d in fresh.to_delete:
            if d.name not in planned:
                continue  # not in the plan the user saw: leave it for the next run
            e = fresh.entries[d.name]
            src = root / d.name
            try:
                if not inside(src, root) or os.path.islink(src):
                    raise CkptError(f"{src} is a symlink or lies outside {root}")
                dst = run_trash / d.name
                os.rename(src, dst)
                moved.append((d.name, dst, e.freeable_bytes))
            except (OSError, CkptError) as exc:
                r.failed.append((d.name, str(exc)))
        if moved:
            fsync_dir(root)
    for name, dst, freeable in moved:
        try:
            if not cfg.retention.keep_trash:
                try:
                    remove(dst, run_trash)
                except FileNotFoundError:
                    pass  # already gone: deleted all the same
            r.deleted.append(name)
            r.freed_bytes += freeable
        except (OSError, CkptError) as exc:
            r.failed.append((name, f"moved to {dst} but not removed: {exc}"))
    if not cfg.retention.keep_trash:
        try:
            run_trash.rmdir()
        except OSError:
            pass
    return r


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def empty_trash(root: Path) -> list[str]:
    """Remove what earlier cleanups left in .trash: interrupted runs, or kept with keep_trash (never a
    valid checkpoint). A folder of a cleanup that is still running is left to it. Returns the names
    of the checkpoints removed."""
    trash = root / cat.TRASH_DIR
    removed: list[str] = []
    if not trash.is_dir():
        return removed
    for p in trash.iterdir():
        m = re.fullmatch(r"run-(\d+)-\d+", p.name)
        if m and _pid_alive(int(m.group(1))):
            continue
        names = [c.name for c in p.iterdir()] if m and p.is_dir() and not p.is_symlink() else [p.name.split(".")[0]]
        try:
            remove_tree_safely(p, trash)
            removed.extend(names)
        except OSError:
            pass
    return removed


def log_block(cfg: Config, r: Report) -> None:
    ts = time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(r.started))
    counts = retention.tier_counts(r.decisions)
    lines = [f"=== {ts} cleanup ({r.mode}) of {r.root}",
             f"tiers: {'; '.join(r.tiers)}",
             "training: " + ("active, " if r.activity.active else "not active, ") + r.activity.detail,
             f"disk before: {human(r.disk_free)} free of {human(r.disk_total)}"]
    for t in sorted(counts, key=lambda k: (k is None, k or 0)):
        kept, deleted = counts[t]
        lines.append(f"{'tier ' + str(t) if t is not None else 'outside tiers'}: keep {kept}, delete {deleted}")
    by_name = {d.name: d for d in r.decisions}
    if r.mode == "dry run":
        for d in r.to_delete:
            lines.append(f"would delete {d.name} ({human(r.entries[d.name].freeable_bytes)} freed): {'; '.join(d.reasons)}")
        lines.append(f"would free {human(r.planned_free())} ({r.planned_free()} bytes)")
    else:
        for name in r.deleted:
            lines.append(f"deleted {name} ({human(r.entries[name].freeable_bytes)} freed): {'; '.join(by_name[name].reasons)}")
        for name in r.skipped_changed:
            lines.append(f"kept {name} after all: the re-plan under the commit lock no longer deletes it")
        for name in r.leftovers:
            lines.append(f"removed {name} from .trash (moved there by an earlier cleanup that was interrupted or kept its trash)")
        for name, why in r.failed:
            lines.append(f"FAILED to delete {name}: {why}")
        lines.append(f"freed {human(r.freed_bytes)} ({r.freed_bytes} bytes)")
    lines.append(f"kept {sum(d.keep for d in r.decisions)} checkpoints; duration {r.duration_s:.2f}s")
    append_text(cfg.log_dir / "cleanup.log", "\n".join(lines) + "\n\n")


def run_cleanup(cfg: Config, dry_run: bool, confirm: Callable[[Report], bool] | None = None,
                extra_protected: Optional[dict[str, str]] = None) -> Report:
    """Plan, (confirm,) execute and log. Used by the CLI and the daemon's scheduled job."""
    t0 = time.monotonic()
    r = build_report(cfg, "dry run" if dry_run else "applied", extra_protected)
    if not dry_run and r.to_delete and (confirm is None or confirm(r)):
        r.leftovers = empty_trash(cfg.checkpoint_dir)
        execute(cfg, r, extra_protected)
    elif not dry_run and r.to_delete:
        r.mode = "cancelled"
    r.duration_s = time.monotonic() - t0
    if r.mode != "cancelled":
        log_block(cfg, r)
    return r


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m maintenance.cleanup", description=__doc__.split("\n\n")[1],
                                 epilog=__doc__.split("\n\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="config.yaml", help="path of config.yaml (default: ./config.yaml)")
    ap.add_argument("--dry-run", action="store_true", help="show the plan; change nothing")
    ap.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    ap.add_argument("-q", "--quiet", action="store_true", help="print only the summary, not every decision")
    args = ap.parse_args(argv)
    import signal

    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `cleanup --dry-run | head` ends quietly
    try:
        cfg = load_config(args.config)
        if not args.dry_run and not args.yes and not sys.stdin.isatty():
            plan_only = build_report(cfg, "dry run")
            if plan_only.to_delete:
                raise UsageError(
                    f"Cleanup would delete {len(plan_only.to_delete)} checkpoint(s) but there is no terminal to "
                    "confirm on. Nothing was deleted. Pass -y to confirm (as the daemon's weekly job does), or "
                    "--dry-run to see the plan."
                )

        def ask(r: Report) -> bool:
            if args.yes:
                return True
            print(render(r, verbose=not args.quiet))
            ans = input(f"Delete {len(r.to_delete)} checkpoint(s), freeing {human(r.planned_free())}? [y/N] ")
            return ans.strip().lower() in ("y", "yes")

        r = run_cleanup(cfg, args.dry_run, ask)
    except CkptError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("cancelled; nothing was deleted", file=sys.stderr)
        return 130
    if r.mode == "cancelled":
        print("cancelled; nothing was deleted")
        return 130
    if args.json:
        print(json.dumps(r.to_json(), indent=2))
    else:
        if args.dry_run or args.yes:
            print(render(r, verbose=not args.quiet))
        if r.mode == "applied":
            print(f"Deleted {len(r.deleted)}, freed {human(r.freed_bytes)}"
                  + (f"; {len(r.failed)} FAILED: " + "; ".join(f"{n}: {w}" for n, w in r.failed) if r.failed else "")
                  + f". Logged to {cfg.log_dir / 'cleanup.log'}.")
        else:
            print(f"Dry run: nothing was changed. Logged to {cfg.log_dir / 'cleanup.log'}.")
    return 1 if r.failed else 0


if __name__ == "__main__":
    sys.exit(main())
