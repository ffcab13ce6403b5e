"""python -m maintenance.cleanup [--config PATH] [--dry-run] [-y] [--json]

Applies the graduated retention policy of config.yaml to checkpoints.dir: prints the count per tier,
every keep and delete with its reasons, and the bytes that will really be freed (a checkpoint
hard-linked into a snapshot frees nothing). Appends one block per run to logs/cleanup.log.

Exit codes: see `--help` (one table for every ckpt-daemon command).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Optional

from ckpt_daemon import fsutil, runtime
from ckpt_daemon.cliutil import add_json_argument, config_path, module_main, number
from ckpt_daemon.config import Config, load_config
from ckpt_daemon.errors import CkptError, UsageError
from ckpt_daemon.fsutil import fsync_dir, inside, is_enospc, remove_tree_safely
from ckpt_daemon.logs import append_text
from ckpt_daemon.store import catalog as cat
from ckpt_daemon.store import delete
from ckpt_daemon.termtext import inert
from ckpt_daemon.units import human
from maintenance import retention


@dataclass
class Report:
    mode: str  # "dry run" | "applied" | "cancelled"
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
    leftovers: list[str] = field(default_factory=list)  # lines: what earlier, interrupted runs left and we finished
    held: list[str] = field(default_factory=list)  # names an unconfirmed policy would delete; kept (unattended runs)
    # {"confirmed": bool, "tiers": [...], "confirmed_tiers": [...], "changed": [{"setting", "now", "confirmed"}]}
    policy: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # what the reader should know about this plan (epoch ends)
    freed_bytes: int = 0
    trashed_bytes: int = 0  # keep_trash: moved to the trash, freed only when it is emptied
    disk_free: int = 0
    disk_total: int = 0
    started: float = 0.0
    duration_s: float = 0.0
    run: str = ""  # "" for checkpoints.dir, else the run's subfolder
    runs: dict = field(default_factory=dict)  # the other runs' reports (on the first one)

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
            "held": self.held, "policy": self.policy, "notes": self.notes, "leftovers": self.leftovers, "run": self.run,
            "runs": {k: v.to_json() for k, v in self.runs.items()},
            "freed_bytes": self.freed_bytes, "trashed_bytes": self.trashed_bytes, "duration_s": round(self.duration_s, 3),
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
                if f.path.startswith(root_s) and f"{os.sep}{runtime.STATE_DIR}{os.sep}" not in f.path:
                    out.append(f"{f.path} (pid {proc.pid} {proc.info['name']})")
        except (psutil.Error, OSError):
            continue
    return out


# ---------------------------------------------------------------------------------- policy guard
POLICY_RECORD = "policy.json"


def _setting(path: str, freeze: Optional[Callable[[Any], Any]] = None):
    """A field of PlanInputs: the config setting it is read from (dotted path), and how its value is
    made hashable (lists become tuples unless `freeze` says otherwise)."""
    return field(metadata={"config": path, "freeze": freeze})


@dataclass(frozen=True)
class PlanInputs:
    """Every setting that decides what a cleanup deletes: what counts as a checkpoint (patterns, runs),
    which one is best, what epoch ends protect, and the tiers.

    The plan is computed from this object alone (`_plan_run` never sees the config), and the policy guard
    confirms this object, field by field (`confirm_policy` records it, `confirmed_inputs` reads it back), so
    a setting that changes what is deleted has to be a field here, and then it is guarded with no more
    code. Settings that only change when or how a cleanup runs (schedule, enabled, keep_trash) are not, nor
    checkpoints.settle_s: it only tells a foreign checkpoint still being written from a damaged one, and
    retention touches neither."""

    tiers: tuple = _setting("retention.tiers", lambda v: tuple(retention.tier_specs(v)))
    keep_epoch_ends: bool = _setting("retention.keep_epoch_ends")
    max_epoch_ends: Optional[int] = _setting("retention.max_epoch_ends")
    patterns: tuple = _setting("checkpoints.pattern")
    runs: tuple = _setting("checkpoints.runs")
    best_metric: str = _setting("trainer.best_metric")
    best_mode: str = _setting("trainer.best_mode")

    @classmethod
    def from_config(cls, cfg: Config) -> "PlanInputs":
        values = {}
        for f in fields(cls):
            v: Any = cfg
            for part in f.metadata["config"].split("."):
                v = getattr(v, part)
            freeze = f.metadata["freeze"]
            values[f.name] = freeze(v) if freeze else (tuple(v) if isinstance(v, list) else v)
        return cls(**values)

    def to_record(self) -> dict:
        """{config path: value as config.yaml writes it}."""
        return {f.metadata["config"]: _as_json(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_record(cls, settings: dict) -> Optional["PlanInputs"]:
        """The inputs a record holds (missing settings: their defaults), validated as config.yaml is;
        None if the record does not validate (it was damaged or written by hand)."""
        nested: dict = {}
        known = {f.metadata["config"] for f in fields(cls)}
        for path, v in settings.items():
            if path in known:  # a setting a newer version records is ignored, not an error
                *parents, leaf = path.split(".")
                node = nested
                for p in parents:
                    node = node.setdefault(p, {})
                node[leaf] = v
        try:
            return cls.from_config(Config.model_validate(nested))
        except (ValueError, TypeError):  # pydantic's ValidationError is a ValueError
            return None

    def changes(self, other: "PlanInputs") -> list[dict]:
        """[{"setting", "now", "confirmed"}] of the settings in which self differs from `other`."""
        return [{"setting": f.metadata["config"], "now": _as_json(getattr(self, f.name)),
                 "confirmed": _as_json(getattr(other, f.name))}
                for f in fields(self) if getattr(self, f.name) != getattr(other, f.name)]


def _as_json(v: Any) -> Any:
    if isinstance(v, (list, tuple)):
        return [_as_json(x) for x in v]
    if isinstance(v, retention.TierSpec):
        return {"count": v.count, "every_steps": v.every_steps}
    return v


SHIPPED_INPUTS = PlanInputs.from_config(Config())


def confirmed_inputs(root: Path) -> tuple[PlanInputs, Optional[dict]]:
    """The plan inputs a person last confirmed for this folder (a manual cleanup records them), and the
    record. Without a (valid) record, the shipped defaults count as confirmed: they are the documented
    policy, and nobody edited them. A record of an earlier version holds only the tiers: the other
    settings are taken as their defaults, so an edit of any of them is held until it is confirmed."""
    rec = runtime.read_record(root, POLICY_RECORD)
    if not isinstance(rec, dict):
        return SHIPPED_INPUTS, None
    settings = rec.get("settings")
    if not isinstance(settings, dict):
        settings = {"retention.tiers": rec.get("tiers")}
    conf = PlanInputs.from_record(settings)
    return (conf, rec) if conf is not None else (SHIPPED_INPUTS, None)


def policy_confirmed(cfg: Config) -> bool:
    """Whether a person confirmed every setting that decides what retention deletes, as it is now."""
    return PlanInputs.from_config(cfg) == confirmed_inputs(cfg.checkpoint_dir)[0]


def confirm_policy(cfg: Config, how: str) -> None:
    inputs = PlanInputs.from_config(cfg)
    runtime.write_record(cfg.checkpoint_dir, POLICY_RECORD, {
        "settings": inputs.to_record(), "tiers": _as_json(inputs.tiers), "confirmed_at": time.time(),
        "confirmed": time.strftime("%Y-%m-%d %H:%M:%S %z"), "how": how})
    from ckpt_daemon.remote.retention import canon, confirm_own_tiers  # replicas with their own tiers: confirmed too

    confirm_own_tiers(cfg.checkpoint_dir, [(cfg.replica_target(r).url, canon(r.retention.tiers)) for r in cfg.replicas
                                           if r.retention.mode == "own"], how)


def _hold_unconfirmed(r: Report, conf: PlanInputs, checkpoint_dir: Path, extra_protected, activity,
                      settle_s: float) -> None:
    """Unattended runs under edited settings apply only what the confirmed settings would also delete:
    the same plan, made again from the confirmed inputs (their own catalog, protections and tiers)."""
    conf_plan: dict[str, retention.Decision] = {}
    if r.run == "" or r.run in conf.runs:
        conf_plan = {d.name: d for d in _plan_run(checkpoint_dir, r.run, conf, extra_protected, activity, settle_s)[2]}
    for d in r.decisions:
        if d.keep:
            continue
        old = conf_plan.get(d.name)
        if old is not None and not old.keep:
            continue  # the confirmed settings delete it too
        why = ("; ".join(old.reasons) if old is not None else
               f"under the confirmed settings {d.name} is no checkpoint retention manages")
        d.keep = True
        d.reasons = [f"held: the edited retention policy deletes it, the last confirmed one keeps it ({why}); run "
                     "`python -m maintenance.cleanup` to review and confirm the new policy"] + \
                    [f"(new policy: {x})" for x in d.reasons]
        r.held.append(d.name)


# ---------------------------------------------------------------------------------- plan
def run_names(cfg: Config) -> list[str]:
    return ["", *cfg.checkpoints.runs]


def _in_run(rel: Optional[str], run: str) -> Optional[str]:
    """The name inside `run` of a path relative to checkpoints.dir ("sft/checkpoint-5" -> "checkpoint-5")."""
    if not rel:
        return None
    head, _, tail = rel.rpartition("/")
    return tail if head == run else None


def _plan_run(checkpoint_dir: Path, run: str, inputs: PlanInputs, extra_protected: Optional[dict[str, str]],
              activity: runtime.Activity, settle_s: float) -> tuple[cat.Catalog, dict[str, list[str]],
                                                                   list[retention.Decision]]:
    """(catalog, protections, decisions) of one run's folder, from the plan's inputs alone: nothing here
    reads the config, so the policy guard (which confirms PlanInputs) covers every setting used. (settle_s
    only sorts what retention never touches into 'in progress' or 'damaged'; see PlanInputs.)"""
    root = checkpoint_dir / run if run else checkpoint_dir
    c = cat.scan(root, inputs.patterns, best_metric=inputs.best_metric, best_mode=inputs.best_mode,
                 settle_s=settle_s, run=run)
    extra = {n: why for rel, why in (extra_protected or {}).items() if (n := _in_run(rel, run))}
    resume = _in_run(activity.resume_from, run)
    if resume and c.by_name(resume) is not None:
        extra.setdefault(resume, "the daemon resumed training from it")
    prot = retention.protections(c, extra, inputs.best_metric, inputs.keep_epoch_ends, inputs.max_epoch_ends)
    return c, prot, retention.plan(retention.items_from_catalog(c), inputs.tiers, prot)


def epoch_end_notes(c: cat.Catalog, decisions: list[retention.Decision], inputs: PlanInputs) -> list[str]:
    """What epoch-end protection does to this plan, when it matters: a script whose `epoch` changes every
    few saves makes nearly every checkpoint an epoch end, and then retention deletes little or nothing."""
    ends = retention.epoch_ends(c)
    complete = [e for e in c.entries if e.status == "complete"]
    if not inputs.keep_epoch_ends or not ends:
        return []
    notes = []
    cap = inputs.max_epoch_ends
    protected = {e.name for e in ends[:cap]}
    only = [d.name for d in decisions if d.name in protected and d.keep
            and any(x.startswith("(tiers alone:") for x in d.reasons)
            and all(x.startswith(("protected: last checkpoint of epoch", "(tiers alone:")) for x in d.reasons)]
    if len(ends) >= 5 and 2 * len(ends) >= len(complete):
        steps = sorted(e.step for e in ends)
        every = (steps[-1] - steps[0]) / (len(steps) - 1) if len(steps) > 1 else 0
        notes.append(
            f"Epoch ends: {len(ends)} of {len(complete)} checkpoints are the last of their epoch (the epoch changes "
            f"about every {every:.0f} steps), and retention.keep_epoch_ends keeps "
            + (f"the newest {min(cap, len(ends))} of them" if cap is not None else "all of them")
            + f" whatever the tiers say ({len(only)} are kept for that alone). If `epoch` in these checkpoints is "
            "not a real pass over the data (a script that saves something else as its epoch), set "
            "retention.keep_epoch_ends: false, or lower retention.max_epoch_ends.")
    elif only:
        notes.append(f"Epoch ends: {len(only)} checkpoint(s) are kept only because each is the last of its epoch "
                     "(retention.keep_epoch_ends).")
    if cap is not None and len(ends) > cap:
        notes.append(f"Epoch ends beyond retention.max_epoch_ends ({cap}): the {len(ends) - cap} older ones are not "
                     f"protected as epoch ends and follow the tiers (the oldest protected one is {ends[cap - 1].name}).")
    return notes


def build_report(cfg: Config, mode: str, extra_protected: Optional[dict[str, str]] = None,
                 unattended: bool = False, run: str = "") -> Report:
    root = cfg.checkpoint_dir / run if run else cfg.checkpoint_dir
    inputs = PlanInputs.from_config(cfg)
    activity = runtime.training_activity(cfg.checkpoint_dir)
    c, _, decisions = _plan_run(cfg.checkpoint_dir, run, inputs, extra_protected, activity, cfg.checkpoints.settle_s)
    # as `df` counts: the blocks reserved for root are neither free nor usable by a trainer
    usage = fsutil.disk_usage(root) if root.exists() else None
    conf, rec = confirmed_inputs(cfg.checkpoint_dir)
    r = Report(
        mode=mode, root=root, tiers=retention.describe_tiers(inputs.tiers), decisions=decisions,
        entries={e.name: e for e in c.entries}, activity=activity,
        open_files=open_checkpoint_files(root) if root.exists() else [],
        in_progress=[p.name for p in c.in_progress], ignored=c.ignored, started=time.time(),
        disk_free=usage.avail if usage else 0, disk_total=usage.used + usage.avail if usage else 0,
        policy={"confirmed": inputs == conf, "tiers": _as_json(inputs.tiers), "confirmed_tiers": _as_json(conf.tiers),
                "changed": inputs.changes(conf), "confirmed_at": (rec or {}).get("confirmed")},
        notes=epoch_end_notes(c, decisions, inputs),
    )
    r.run = run
    if unattended and not r.policy["confirmed"]:
        _hold_unconfirmed(r, conf, cfg.checkpoint_dir, extra_protected, activity, cfg.checkpoints.settle_s)
    return r


def render(r: Report, verbose: bool = True) -> str:
    lines = [f"Cleanup of {r.root} ({r.mode})"]
    lines.append("Training: " + ("ACTIVE, " if r.activity.active else "not active, ") + r.activity.detail
                 + (" (the checkpoint being written, the newest and the one it resumed from are protected; "
                    "deletions wait for the commit lock)" if r.activity.active else ""))
    if r.disk_total:
        lines.append(f"Disk: {human(r.disk_free)} free of {human(r.disk_total)} ({-(-100 * (r.disk_total - r.disk_free) // r.disk_total)}% "
                     "used, as df shows it)")
    if r.in_progress:
        lines.append(f"Being written or interrupted (never touched): {', '.join(r.in_progress)}")
    if r.open_files:
        lines.append(f"Open by other processes: {'; '.join(r.open_files[:5])}" + (" ..." if len(r.open_files) > 5 else ""))
    lines.append("Tiers: " + "; ".join(r.tiers))
    if not r.policy.get("confirmed") and r.policy.get("confirmed_now"):
        lines.append(f"Policy: CHANGED since it was last confirmed ({policy_changes(r.policy)}); confirmed now "
                     f"({r.policy['confirmed_now']}): the daemon's unattended runs apply these settings from now on.")
    elif not r.policy.get("confirmed"):
        lines.append(f"Policy: CHANGED since it was last confirmed ({policy_changes(r.policy)}). The daemon's "
                     "unattended runs hold what only the new policy would delete until you run this command without "
                     "--dry-run and confirm.")
    lines += r.notes
    counts = retention.tier_counts(r.decisions)
    for t in sorted(counts, key=lambda k: (k is None, k or 0)):
        kept, deleted = counts[t]
        label = f"tier {t}" if t is not None else "outside the tiers"
        lines.append(f"  {label}: {kept + deleted} checkpoints, keep {kept}, delete {deleted}")
    if verbose:
        for d in r.decisions:
            e = r.entries[d.name]
            lines.append(f"  {d.action.upper():6} {d.name:<28} {human(e.bytes):>10}  {'; '.join(d.reasons)}")
    for n, why in r.ignored[:20]:
        lines.append(f"  not a checkpoint (never touched): {n}: {why}")
    dels = r.to_delete
    linked = [d.name for d in dels if r.entries[d.name].freeable_bytes < r.entries[d.name].bytes]
    total = sum(r.entries[d.name].bytes for d in dels)
    lines.append(f"Delete {len(dels)} of {len(r.decisions)} checkpoints: {human(total)} on disk, "
                 f"{human(r.planned_free())} really freed")
    if linked:
        lines.append(f"  {len(linked)} of them share files with snapshots (hard links): deleting them frees only "
                     f"what no snapshot holds ({', '.join(linked[:5])}{' ...' if len(linked) > 5 else ''})")
    if r.held:
        lines.append(f"Held (unconfirmed policy): {len(r.held)} checkpoint(s) kept: {', '.join(r.held[:10])}"
                     + (" ..." if len(r.held) > 10 else ""))
    return "\n".join(inert(x) for x in lines)  # names, pin reasons and metric names come from the folder


def policy_changes(policy: dict) -> str:
    """'retention.keep_epoch_ends is false (confirmed: true); ...' from a report's policy."""
    def show(setting: str, v) -> str:
        if setting == "retention.tiers" and isinstance(v, list):
            return "; ".join(retention.describe_tiers([retention.TierSpec(**t) for t in v]))
        return json.dumps(v)

    return "; ".join(f"{c['setting']} is {show(c['setting'], c['now'])} (confirmed: {show(c['setting'], c['confirmed'])})"
                     for c in policy.get("changed", []))


# ---------------------------------------------------------------------------------- execute
def execute(cfg: Config, r: Report, extra_protected: Optional[dict[str, str]] = None,
            remove: Callable[[Path, Path], None] = remove_tree_safely, unattended: bool = False,
            lock_timeout_s: float = 600.0) -> Report:
    """Delete what the plan says, safely: under the commit lock re-scan and re-plan (a save may have
    committed since), move each victim into this run's own folder in the state folder's trash (it stops
    being a checkpoint at once), then remove that folder outside the lock. A journal written first lets
    the next job finish (and log) a run that was killed half-way. One failure is recorded and the rest
    go on."""
    root = r.root
    planned = {d.name for d in r.to_delete}
    keep = cfg.retention.keep_trash
    try:
        run = delete.trash_run(root, keep=keep)
    except OSError as exc:
        if not is_enospc(exc):
            raise
        # A disk so full that not even the trash folder can be made: deleting is exactly what is needed.
        return _execute_in_place(cfg, r, extra_protected, remove, unattended, lock_timeout_s)
    with run:
        moved: list[tuple[str, Path, int]] = []
        journal = {"started": r.started, "pid": os.getpid(), "keep_trash": keep, "state": "moving",
                   "planned": {}}
        with runtime.commit_lock(root, timeout_s=lock_timeout_s):
            fresh = build_report(cfg, r.mode, extra_protected, unattended=unattended, run=r.run)
            now_delete = {d.name: d for d in fresh.to_delete}
            r.skipped_changed = sorted(planned - set(now_delete))
            victims = [d for d in fresh.to_delete if d.name in planned]  # never more than the plan the user saw
            journal["planned"] = {d.name: {"reasons": d.reasons, "freeable_bytes": fresh.entries[d.name].freeable_bytes}
                                  for d in victims}
            try:
                delete.write_journal(run, journal)
            except OSError as exc:
                if not is_enospc(exc):
                    raise  # on a full disk the deletions go on without a journal: they are what frees space
            for d in victims:
                try:
                    dst = delete.trash_locked(root, run, d.name)
                    moved.append((d.name, dst, fresh.entries[d.name].freeable_bytes))
                except (OSError, CkptError) as exc:
                    r.failed.append((d.name, str(exc)))
            if moved:
                fsync_dir(root)
        for name, dst, freeable in moved:
            try:
                if keep:
                    r.trashed_bytes += freeable
                else:
                    try:
                        remove(dst, run.path)
                    except FileNotFoundError:
                        pass  # already gone: deleted all the same
                    r.freed_bytes += freeable
                r.deleted.append(name)
            except (OSError, CkptError) as exc:
                r.failed.append((name, f"moved to {dst} but not removed: {exc}"))
        if keep:
            delete.write_journal(run, {**journal, "state": "kept", "deleted": r.deleted})
    return r


def _execute_in_place(cfg: Config, r: Report, extra_protected, remove, unattended: bool,
                      lock_timeout_s: float) -> Report:
    """Delete without the trash (a full disk). A native checkpoint loses its manifest first, so that a
    crash half-way leaves an incomplete folder, never one that looks valid."""
    from ckpt_daemon.store import manifest as mf

    root = r.root
    planned = {d.name for d in r.to_delete}
    with runtime.commit_lock(root, timeout_s=lock_timeout_s):
        fresh = build_report(cfg, r.mode, extra_protected, unattended=unattended, run=r.run)
        r.skipped_changed = sorted(planned - {d.name for d in fresh.to_delete})
        for d in fresh.to_delete:
            if d.name not in planned:
                continue
            src = root / d.name
            try:
                if not inside(src, root) or os.path.islink(src):
                    raise CkptError(f"{src} is a symlink or lies outside {root}")
                if fresh.entries[d.name].layout == "native":
                    os.unlink(src / mf.MANIFEST)
                remove(src, root)
                r.deleted.append(d.name)
                r.freed_bytes += fresh.entries[d.name].freeable_bytes
            except (OSError, CkptError) as exc:
                r.failed.append((d.name, str(exc)))
        fsync_dir(root)
    return r


def finish_leftovers(cfg: Config, empty_kept: bool = False) -> list[str]:
    """Finish what killed runs left behind, and say so (returns log lines, also appended to
    logs/cleanup.log): scratch folders of saves, restores and snapshots whose builder died, and
    cleanups killed half-way (their victims are removed, as their journal planned). With empty_kept
    (a cleanup run), the trash kept by keep_trash is emptied too. Called at the start of every job."""
    lines: list[str] = []
    roots = [cfg.checkpoint_dir / r if r else cfg.checkpoint_dir for r in run_names(cfg)]
    for root in (*roots, cfg.snapshot_dir, cfg.consolidation_dir):
        for sid in delete.clean_scratch(root):
            lines.append(f"removed {root / runtime.STATE_DIR / 'tmp' / sid}, left by a save, restore or snapshot "
                         "that was killed before it finished")
    for root in roots:
        lines += _finish_trash(root, empty_kept)
    if lines:
        try:
            append_text(cfg.log_dir / "cleanup.log",
                        f"=== {time.strftime('%Y-%m-%d %H:%M:%S %z')} leftovers of interrupted runs in {cfg.checkpoint_dir}\n"
                        + "\n".join(inert(x) for x in lines) + "\n\n")
        except OSError:
            pass  # a full disk: the lines are returned (and printed) all the same
    return lines


def _finish_trash(root: Path, empty_kept: bool) -> list[str]:
    lines: list[str] = []
    for run in delete.dead_trash_runs(root):
        j = delete.read_journal(run)
        if j.get("state") == "kept" and not empty_kept:
            continue
        planned = j.get("planned") if isinstance(j.get("planned"), dict) else {}
        try:
            names = sorted(n for n in os.listdir(run) if n != delete.JOURNAL)
        except OSError:
            names = []
        freed = 0
        for n in names:
            meta = planned.get(n) if isinstance(planned.get(n), dict) else {}
            fb = meta.get("freeable_bytes") if isinstance(meta.get("freeable_bytes"), int) else 0
            try:
                remove_tree_safely(run / n, run)
            except (OSError, CkptError) as exc:
                lines.append(f"FAILED to remove {n} from the trash ({exc})")
                continue
            freed += fb
            why = "; ".join(str(x) for x in meta.get("reasons", []) if isinstance(x, str))[:500] if meta else ""
            if j.get("state") == "kept":
                lines.append(f"emptied {n} from the trash kept by an earlier cleanup (keep_trash)"
                             + (f"; it was deleted because: {why}" if why else ""))
            else:
                lines.append(f"deleted {n}: finishing a cleanup that was interrupted"
                             + (f" (started {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(j['started']))})"
                                if isinstance(j.get("started"), (int, float)) else "")
                             + (f"; its reasons: {why}" if why else ""))
        if names:
            lines.append(f"freed {human(freed)} ({freed} bytes) from the trash of {root}")
        remove_tree_safely(run, run.parent)
    return lines


def log_block(cfg: Config, r: Report) -> None:
    ts = time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(r.started))
    counts = retention.tier_counts(r.decisions)
    lines = [f"=== {ts} cleanup ({r.mode}) of {r.root}",
             f"tiers: {'; '.join(r.tiers)}",
             "training: " + ("active, " if r.activity.active else "not active, ") + r.activity.detail,
             f"disk before: {human(r.disk_free)} free of {human(r.disk_total)}"]
    if r.policy.get("confirmed_now"):
        lines.append(f"policy: changed since it was last confirmed; confirmed now ({r.policy['confirmed_now']}): "
                     "unattended runs apply these settings from now on")
    for t in sorted(counts, key=lambda k: (k is None, k or 0)):
        kept, deleted = counts[t]
        lines.append(f"{'tier ' + str(t) if t is not None else 'outside tiers'}: keep {kept}, delete {deleted}")
    by_name = {d.name: d for d in r.decisions}
    if r.mode == "dry run":
        for d in r.to_delete:
            lines.append(f"would delete {d.name} ({human(r.entries[d.name].freeable_bytes)} freed): {'; '.join(d.reasons)}")
        lines.append(f"would free {human(r.planned_free())} ({r.planned_free()} bytes)")
    else:
        verb = "moved to the trash (keep_trash; freed when the next cleanup empties it)" if r.trashed_bytes or (
            r.deleted and cfg.retention.keep_trash) else "deleted"
        for name in r.deleted:
            lines.append(f"{verb} {name} ({human(r.entries[name].freeable_bytes)}): {'; '.join(by_name[name].reasons)}")
        for name in r.skipped_changed:
            lines.append(f"kept {name} after all: the re-plan under the commit lock no longer deletes it")
        for name, why in r.failed:
            lines.append(f"FAILED to delete {name}: {why}")
        lines.append(f"freed {human(r.freed_bytes)} ({r.freed_bytes} bytes)"
                     + (f"; {human(r.trashed_bytes)} kept in the trash until the next cleanup" if r.trashed_bytes else ""))
    for name in r.held:
        lines.append(f"HELD {name}: {by_name[name].reasons[0]}")
    if r.held:
        lines.append(f"held {len(r.held)} deletion(s): settings in config.yaml that decide what retention deletes "
                     f"differ from the last confirmed ones ({policy_changes(r.policy)}); run "
                     "`python -m maintenance.cleanup` (or -y) once to review and confirm them")
    lines += r.notes
    lines.append(f"kept {sum(d.keep for d in r.decisions)} checkpoints; duration {r.duration_s:.2f}s")
    try:
        append_text(cfg.log_dir / "cleanup.log", "\n".join(inert(x) for x in lines) + "\n\n")  # read with cat, less
    except OSError as exc:  # the deletions stand; say so where it can still be seen
        print(f"warning: could not append to {cfg.log_dir / 'cleanup.log'} ({exc}); what was deleted is in the "
              "report above", file=sys.stderr)


def run_cleanup(cfg: Config, dry_run: bool, confirm: Callable[[Report], bool] | None = None,
                extra_protected: Optional[dict[str, str]] = None, unattended: bool = False,
                confirmed_by: Optional[str] = None, lock_timeout_s: float = 600.0) -> Report:
    """Plan, (confirm,) execute and log. Used by the CLI and the daemon's scheduled job (unattended:
    an edited, unconfirmed policy only deletes what the confirmed one also would). A manual run that a
    person confirmed (`confirmed_by`) records the policy as confirmed."""
    t0 = time.monotonic()
    leftovers = [] if dry_run else finish_leftovers(cfg, empty_kept=True)
    confirming = confirmed_by if confirmed_by and not unattended and not dry_run else None
    reports = [_run_one(cfg, run, dry_run, confirm, extra_protected, unattended, lock_timeout_s, t0, confirming)
               for run in run_names(cfg)]
    r = reports[0]
    r.leftovers = leftovers
    r.runs = {x.run: x for x in reports[1:]}
    if confirmed_by and not unattended and all(x.mode == "applied" for x in reports):
        confirm_policy(cfg, confirmed_by)
    return r


def _run_one(cfg: Config, run: str, dry_run: bool, confirm, extra_protected, unattended: bool,
             lock_timeout_s: float, t0: float, confirming: Optional[str] = None) -> Report:
    r = build_report(cfg, "dry run" if dry_run else "applied", extra_protected, unattended=unattended, run=run)
    if not dry_run and r.to_delete and (confirm is None or confirm(r)):
        execute(cfg, r, extra_protected, unattended=unattended, lock_timeout_s=lock_timeout_s)
    elif not dry_run and r.to_delete:
        r.mode = "cancelled"
    if confirming and r.mode == "applied" and not r.policy.get("confirmed"):
        r.policy["confirmed_now"] = confirming  # this run is the person's confirmation (recorded by run_cleanup)
    r.duration_s = time.monotonic() - t0
    if r.mode != "cancelled":
        log_block(cfg, r)
    return r


HELP = "apply the retention policy now (--dry-run shows the plan with a reason for every decision)"


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--dry-run", action="store_true", help="show the plan and the reason for every decision; change nothing")
    ap.add_argument("-y", "--yes", action="store_true",
                    help="do not ask for confirmation (also confirms a changed retention policy held by the daemon)")
    add_json_argument(ap, "the report")
    ap.add_argument("-q", "--quiet", action="store_true", help="print only the summary, not every decision")
    ap.add_argument("--wait", type=number(float, 0, 86400), default=600.0, metavar="SECONDS",
                    help="how long to wait for the commit lock while a save commits (default 600); exit 4 after")


def run(args: argparse.Namespace) -> int:
    try:
        if args.dry_run:  # only looks: with a broken config.yaml, show the plan of the last good one
            from ckpt_daemon.configfile import load_for_reading

            cfg, error = load_for_reading(config_path(args))
            if error:
                print(f"warning: {config_path(args)} is broken; this plan uses the last good config. {error}", file=sys.stderr)
        else:
            cfg = load_config(config_path(args))
        if not args.dry_run and not args.yes and not sys.stdin.isatty():
            n = sum(len(build_report(cfg, "dry run", run=run).to_delete) for run in run_names(cfg))
            if n:
                raise UsageError(
                    f"Cleanup would delete {n} checkpoint(s) but there is no terminal to "
                    "confirm on. Nothing was deleted. Pass -y to confirm (as the daemon's weekly job does), or "
                    "--dry-run to see the plan."
                )

        def ask(r: Report) -> bool:
            if args.yes:
                return True
            print(render(r, verbose=not args.quiet))
            ans = input(f"Delete {len(r.to_delete)} checkpoint(s), freeing {human(r.planned_free())}? [y/N] ")
            return ans.strip().lower() in ("y", "yes")

        how = "cleanup -y" if args.yes else ("cleanup, confirmed at the prompt" if sys.stdin.isatty() else None)
        r = run_cleanup(cfg, args.dry_run, ask, confirmed_by=how, lock_timeout_s=max(0.0, args.wait))
    except KeyboardInterrupt:
        print("cancelled; nothing was deleted", file=sys.stderr)
        return 130
    reports = [r, *r.runs.values()]
    if any(x.mode == "cancelled" for x in reports):
        print("cancelled; nothing more was deleted")
        return 130
    if args.json:
        print(json.dumps({"ok": not any(x.failed for x in reports), **r.to_json()}, indent=2))
    else:
        for x in reports:
            if args.dry_run or args.yes:
                print(render(x, verbose=not args.quiet))
            if x.mode == "applied":
                print(inert(f"Deleted {len(x.deleted)}, freed {human(x.freed_bytes)}"
                            + (f"; {len(x.failed)} FAILED: " + "; ".join(f"{n}: {w}" for n, w in x.failed) if x.failed else "")
                            + f". Logged to {cfg.log_dir / 'cleanup.log'}."))
            else:
                print(f"Dry run: nothing was changed. Logged to {cfg.log_dir / 'cleanup.log'}.")
        for line in r.leftovers:
            print(inert(f"Leftover of an interrupted run: {line}"))
    return 1 if any(x.failed for x in reports) else 0


def main(argv: Optional[list[str]] = None) -> int:
    return module_main("python -m maintenance.cleanup", __doc__.split("\n\n")[1], add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
