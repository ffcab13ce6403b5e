"""Nothing may be deleted that should not be.

The daemon deletes only what it created or what the catalog recognised as a checkpoint, never follows a
symlink, and keeps its scratch space inside its own state folder; runs killed half-way are finished
(and logged) by the next job; an edited retention policy nobody confirmed never deletes unattended.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from ckpt_daemon import runtime
from ckpt_daemon.config import load_config
from ckpt_daemon.store import catalog as cat
from ckpt_daemon.store import commit as store_commit
from ckpt_daemon.store import delete as store_delete
from maintenance.cleanup import build_report, run_cleanup
from tests.helpers import PY, env_for_children, fake_native, native, run_py, seed_history, write_config


def steps_left(root: Path) -> list[int]:
    return sorted(e.step for e in cat.scan(root, ["checkpoint-{step}"]).entries)


# ------------------------------------------------------------------------------ the state folder
@pytest.mark.slow
def test_a_planted_symlink_for_the_state_folder_is_refused_and_nothing_outside_is_touched(tmp_path):
    outside = tmp_path / "outside"
    (outside / "trash" / "run-1").mkdir(parents=True)
    (outside / "trash" / "run-1" / "precious.txt").write_text("the user's own file")
    (outside / "tmp" / "x").mkdir(parents=True)
    cfg = write_config(tmp_path / "proj", {"retention": {"tiers": [{"count": 1}]}}, tiny=False)
    root = tmp_path / "proj" / "checkpoints"
    for s in (10, 20, 30):
        fake_native(root, s)
    os.symlink(outside, root / ".ckpt-daemon")
    r = run_py(["-m", "maintenance.cleanup", "--config", str(cfg), "-y"])
    assert r.returncode == 1 and "is a symlink" in r.stderr and "never follows a link" in r.stderr
    assert "Traceback" not in r.stderr
    assert steps_left(root) == [10, 20, 30]  # nothing deleted
    assert (outside / "trash" / "run-1" / "precious.txt").read_text() == "the user's own file"
    assert (outside / "tmp" / "x").is_dir()
    # the same with the trash folder itself a symlink
    os.unlink(root / ".ckpt-daemon")
    (root / ".ckpt-daemon").mkdir()
    os.symlink(outside / "trash", root / ".ckpt-daemon" / "trash")
    r = run_py(["-m", "maintenance.cleanup", "--config", str(cfg), "-y"])
    assert r.returncode == 1 and "trash is a symlink" in r.stderr
    assert steps_left(root) == [10, 20, 30]
    assert (outside / "trash" / "run-1" / "precious.txt").exists()


@pytest.mark.slow
def test_foreign_trash_and_temp_folders_are_never_ours_to_delete(tmp_path):
    """A checkpoint or snapshot folder that is also someone's home: their .trash and .tmp-* stay."""
    home = tmp_path / "home"
    cfg_path = write_config(tmp_path / "proj", {"checkpoints": {"dir": str(home)},
                                                "snapshots": {"dir": str(tmp_path / "snaps")},
                                                "retention": {"tiers": [{"count": 1}]}}, tiny=False)
    for d in (home / ".trash" / "run-1-1", home / ".tmp-vim-session", tmp_path / "snaps" / ".tmp-2026-01-01-1",
              home / "tmp-download"):
        d.mkdir(parents=True)
        (d / "keep.txt").write_text("mine")
    old = time.time() - 7200
    os.utime(tmp_path / "snaps" / ".tmp-2026-01-01-1", (old, old))
    native(home, [10, 20, 30])
    run_py(["-m", "maintenance.cleanup", "--config", str(cfg_path), "-y"], check=True)
    run_py(["-m", "maintenance.snapshot", "--config", str(cfg_path)], check=True)
    assert steps_left(home) == [30]
    for d in (home / ".trash" / "run-1-1", home / ".tmp-vim-session", tmp_path / "snaps" / ".tmp-2026-01-01-1",
              home / "tmp-download"):
        assert (d / "keep.txt").read_text() == "mine", d


# ------------------------------------------------------------------------------ killed runs
@pytest.mark.slow
def test_a_cleanup_killed_half_way_is_finished_and_logged_by_the_next_job(tmp_path):
    cfg_path = write_config(tmp_path, {"retention": {"tiers": [{"count": 2}]}}, tiny=False)
    root = tmp_path / "checkpoints"
    for s in range(1, 13):
        fake_native(root, s * 10, extra_files=1500)  # slow to remove, so the kill lands mid-way
    p = subprocess.Popen([PY, "-m", "maintenance.cleanup", "--config", str(cfg_path), "-y", "-q"],
                         env=env_for_children(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    trash = root / ".ckpt-daemon" / "trash"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        runs = [d for d in trash.glob("run-*") if d.is_dir()] if trash.exists() else []
        moved = sorted(n for n in os.listdir(runs[0]) if not n.startswith(".")) if runs else []
        if len(moved) >= 9 and sorted(n for n in os.listdir(root) if n.startswith("checkpoint-")) == [
                "checkpoint-110", "checkpoint-120"]:
            break  # every victim has left the catalog, and the removals are under way
        assert p.poll() is None, "the cleanup finished before it could be killed"
        time.sleep(0.002)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert steps_left(root) == [110, 120]  # the victims left the catalog at once
    log_before = (tmp_path / "logs" / "cleanup.log").read_text() if (tmp_path / "logs" / "cleanup.log").exists() else ""
    assert "finishing a cleanup that was interrupted" not in log_before
    # the next job of any kind (here a snapshot) finishes it and says so
    r = run_py(["-m", "maintenance.snapshot", "--config", str(cfg_path)], check=True)
    assert "finishing a cleanup that was interrupted" in r.stdout
    assert not list(trash.iterdir())  # trash empty, lock files gone
    log = (tmp_path / "logs" / "cleanup.log").read_text()
    finished = [line for line in log.splitlines() if "finishing a cleanup that was interrupted" in line]
    assert finished and all("its reasons: beyond the last tier" in line for line in finished)
    assert "freed " in log.split("leftovers of interrupted runs")[-1]


@pytest.mark.slow
def test_a_snapshot_killed_half_way_leaves_nothing_that_blocks_the_next(tmp_path):
    import torch

    cfg_path = write_config(tmp_path, {"checkpoints": {"pattern": "rolling_step_{step}.pt"}}, tiny=False)
    root = tmp_path / "checkpoints"
    root.mkdir()
    torch.save({"model_state_dict": {"w": torch.randn(64 << 20)}}, root / "rolling_step_100.pt")  # 256 MiB: copied
    p = subprocess.Popen([PY, "-m", "maintenance.snapshot", "--config", str(cfg_path)], env=env_for_children(),
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    scratch = tmp_path / "snapshots" / ".ckpt-daemon" / "tmp"
    deadline = time.monotonic() + 60
    while not (scratch.exists() and any(f.stat().st_size > 0 for f in scratch.rglob("*.pt"))):
        assert time.monotonic() < deadline and p.poll() is None, "the snapshot finished before it could be killed"
        time.sleep(0.002)
    p.send_signal(signal.SIGKILL)
    p.wait()
    left = [d for d in scratch.iterdir() if d.is_dir()]
    assert left and sum(f.stat().st_size for d in left for f in d.rglob("*") if f.is_file()) > 0
    r = run_py(["-m", "maintenance.snapshot", "--config", str(cfg_path)], check=True)
    assert "left by a save, restore or snapshot that was killed" in r.stdout
    assert not list(scratch.iterdir())
    snaps = [d for d in (tmp_path / "snapshots").iterdir() if not d.name.startswith(".")]
    assert len(snaps) == 1 and (snaps[0] / "rolling_step_100.pt").stat().st_size == (root / "rolling_step_100.pt").stat().st_size


@pytest.mark.slow
def test_keep_trash_reports_nothing_freed_until_the_trash_is_emptied(tmp_path):
    cfg_path = write_config(tmp_path, {"retention": {"tiers": [{"count": 1}], "keep_trash": True}}, tiny=False)
    root = tmp_path / "checkpoints"
    for s in (10, 20, 30):
        fake_native(root, s, payload=b"x" * 50_000)
    cfg = load_config(cfg_path)
    r = run_cleanup(cfg, dry_run=False, confirm=lambda r: True, confirmed_by="test")
    assert sorted(r.deleted) == ["checkpoint-10", "checkpoint-20"] and r.freed_bytes == 0 and r.trashed_bytes > 0
    log = (tmp_path / "logs" / "cleanup.log").read_text()
    assert "moved to the trash (keep_trash; freed when the next cleanup empties it) checkpoint-10" in log
    assert "freed 0 B (0 bytes)" in log
    kept = [d for d in (root / ".ckpt-daemon" / "trash").iterdir() if d.is_dir()]
    assert {p.name for p in kept[0].iterdir()} >= {"checkpoint-10", "checkpoint-20"}
    # a snapshot job does not empty it (only the next cleanup does, as documented)
    run_py(["-m", "maintenance.snapshot", "--config", str(cfg_path)], check=True)
    assert kept[0].exists()
    fake_native(root, 40)
    r2 = run_cleanup(cfg, dry_run=False, confirm=lambda r: True)
    assert not kept[0].exists()
    log = (tmp_path / "logs" / "cleanup.log").read_text()
    assert "emptied checkpoint-10 from the trash kept by an earlier cleanup" in log
    assert r2.leftovers and any("freed" in line for line in r2.leftovers)


# ------------------------------------------------------------------------------ the policy guard


def test_the_seed_example_runs_unattended_with_the_confirmed_default_policy(tmp_path):
    cfg = load_config(write_config(tmp_path, {"retention": {"enabled": True}}, tiny=False))  # the default tiers (20, 20 by 200, by 1000)
    seed_history(cfg.checkpoint_dir)
    r = run_cleanup(cfg, dry_run=False, confirm=lambda r: True, unattended=True)
    assert not r.held and r.policy["confirmed"]
    assert len(steps_left(cfg.checkpoint_dir)) == 43 and len(r.deleted) == 127


@pytest.mark.slow
def test_an_edited_policy_nobody_confirmed_never_deletes_unattended(tmp_path):
    typo = {"retention": {"tiers": [{"count": 20}, {"count": 20, "every_steps": 200}, {"every_steps": 1000000}]}}
    cfg_path = write_config(tmp_path, typo, tiny=False)
    cfg = load_config(cfg_path)
    seed_history(cfg.checkpoint_dir)
    r = run_cleanup(cfg, dry_run=False, confirm=lambda r: True, unattended=True)
    # only what the confirmed (default) policy would delete too is deleted; the rest of the typo is held
    left = steps_left(cfg.checkpoint_dir)
    assert len(left) == 43 and all(s % 1000 == 0 for s in left if s < 13200)
    assert len(r.held) == 13 and not r.policy["confirmed"]
    log = (tmp_path / "logs" / "cleanup.log").read_text()
    assert "HELD checkpoint-1000: held: the edited retention policy deletes it, the last confirmed one keeps it" in log
    assert "held 13 deletion(s)" in log and "python -m maintenance.cleanup" in log
    # the dry run shows the policy as changed, and the held ones as deletions a person would confirm
    dry = run_py(["-m", "maintenance.cleanup", "--config", str(cfg_path), "--dry-run", "-q"], check=True).stdout
    # (on the 43 left, the typo's tiers re-rank: 1000, 2000 and 3000 fall into its tier 3)
    assert "Policy: CHANGED since it was last confirmed" in dry and "Delete 3 of 43" in dry
    # one manual run confirms it (here with -y); from then on unattended runs apply it
    run_py(["-m", "maintenance.cleanup", "--config", str(cfg_path), "-y", "-q"], check=True)
    rec = json.loads((cfg.checkpoint_dir / ".ckpt-daemon" / "policy.json").read_text())
    assert rec["tiers"][-1] == {"count": None, "every_steps": 1000000} and rec["how"] == "cleanup -y"
    assert len(steps_left(cfg.checkpoint_dir)) == 40
    fake_native(cfg.checkpoint_dir, 17100)
    r = run_cleanup(cfg, dry_run=False, confirm=lambda r: True, unattended=True)
    assert r.policy["confirmed"] and not r.held


def test_a_more_careful_edit_applies_unattended_without_confirmation(tmp_path):
    cfg = load_config(write_config(tmp_path, {"retention": {"tiers": [{"count": 40}, {"every_steps": 1000}]}},
                                   tiny=False))
    seed_history(cfg.checkpoint_dir)
    planned = {d.name for d in build_report(cfg, "dry run").to_delete}
    r = run_cleanup(cfg, dry_run=False, confirm=lambda r: True, unattended=True)
    # it keeps everything the confirmed default keeps, so nothing needs holding
    assert not r.held and not r.policy["confirmed"] and set(r.deleted) == planned
    assert len(steps_left(cfg.checkpoint_dir)) == 40 + 13


# Every setting the plan reads (cleanup.PlanInputs, by config path), each with an edit that makes
# retention delete a checkpoint the confirmed settings keep: (base overrides, the edit, the files, that
# checkpoint). A setting added to PlanInputs fails the coverage test below until it has a row here.
def _epochs(root: Path) -> None:  # epochs 0, 0, 1, 1, 2: checkpoint-20 and -40 end theirs
    for s, ep in ((10, 0), (20, 0), (30, 1), (40, 1), (50, 2)):
        d = fake_native(root, s)
        m = json.loads((d / "manifest.json").read_text())
        (d / "manifest.json").write_text(json.dumps({**m, "epoch": ep}))


def _scored_files(root: Path) -> None:
    """Plain torch.save files; the oldest has the lowest val_loss and the highest acc."""
    import torch

    root.mkdir(parents=True, exist_ok=True)
    for s, (loss, acc) in ((10, (1.0, 0.9)), (20, (2.0, 0.5)), (30, (3.0, 0.1))):
        p = root / f"model_step_{s}.pt"
        torch.save({"model": {"w": torch.full((2,), float(s))}, "step": s, "val_loss": loss, "acc": acc}, p)


def _run_sft(root: Path) -> None:
    for s in (10, 20, 30):
        fake_native(root / "sft", s)
    fake_native(root, 100)


GUARDED_EDITS = {
    "retention.tiers": ({"retention": {"tiers": [{"count": 3}]}}, {"retention": {"tiers": [{"count": 2}]}},
                        lambda root: [fake_native(root, s) for s in (10, 20, 30, 40)], "checkpoint-20"),
    "retention.keep_epoch_ends": ({}, {"retention": {"keep_epoch_ends": False}}, _epochs, "checkpoint-20"),
    "retention.max_epoch_ends": ({}, {"retention": {"max_epoch_ends": 1}}, _epochs, "checkpoint-20"),
    "checkpoints.pattern": ({}, {"checkpoints": {"pattern": ["checkpoint-{step}", "model_step_{step}.pt"]}},
                            lambda root: (_scored_files(root), fake_native(root, 100)), "model_step_20.pt"),
    "checkpoints.runs": ({}, {"checkpoints": {"runs": ["sft"]}}, _run_sft, "checkpoint-10"),
    "trainer.best_metric": ({"checkpoints": {"pattern": "model_step_{step}.pt"}}, {"trainer": {"best_metric": "acc"}},
                            _scored_files, "model_step_10.pt"),
    "trainer.best_mode": ({"checkpoints": {"pattern": "model_step_{step}.pt"}}, {"trainer": {"best_mode": "max"}},
                          _scored_files, "model_step_10.pt"),
}


def test_every_setting_the_plan_reads_has_a_guarded_edit():
    from dataclasses import fields

    from maintenance.cleanup import PlanInputs

    assert set(GUARDED_EDITS) == {f.metadata["config"] for f in fields(PlanInputs)}


@pytest.mark.parametrize("setting", sorted(GUARDED_EDITS))
def test_an_edit_of_any_setting_that_decides_a_deletion_is_held_until_confirmed(tmp_path, setting):
    from maintenance.cleanup import confirm_policy, policy_confirmed
    from tests.helpers import deep_merge

    base, edit, make, victim = GUARDED_EDITS[setting]
    base = deep_merge({"retention": {"tiers": [{"count": 1}]}}, base)
    cfg0 = load_config(write_config(tmp_path, base, tiny=False))
    make(cfg0.checkpoint_dir)
    where = cfg0.checkpoint_dir / ("sft" if setting == "checkpoints.runs" else "")
    confirm_policy(cfg0, "test")
    run_cleanup(cfg0, dry_run=False, confirm=lambda r: True, unattended=True)  # the confirmed plan, applied
    assert (where / victim).exists(), f"the confirmed settings keep {victim}"
    cfg = load_config(write_config(tmp_path, deep_merge(base, edit), tiny=False))
    assert not policy_confirmed(cfg)  # what `status` shows
    # unattended (the weekly job, the disk emergency): held, kept, logged, counted
    r = run_cleanup(cfg, dry_run=False, confirm=lambda r: True, unattended=True)
    held = [*r.held, *(n for x in r.runs.values() for n in x.held)]
    assert victim in held and (where / victim).exists()
    assert not r.policy["confirmed"] and setting in [c["setting"] for c in r.policy["changed"]]
    assert f"HELD {victim}" in (tmp_path / "logs" / "cleanup.log").read_text()
    # the dry run names the setting that changed; a person confirms, and from then on it applies
    dry = build_report(cfg, "dry run")
    assert setting in dry.policy["changed"][0]["setting"] and victim in {d.name for d in dry.to_delete} | {
        d.name for x in ([build_report(cfg, "dry run", run="sft")] if "sft" in str(where) else []) for d in x.to_delete}
    run_cleanup(cfg, dry_run=False, confirm=lambda r: True, confirmed_by="test")
    assert policy_confirmed(cfg) and not (where / victim).exists()


UNRELATED_EDITS = [
    {"retention": {"schedule": "0 5 * * 1"}}, {"retention": {"keep_trash": True}}, {"retention": {"enabled": False}},
    {"trainer": {"learning_rate": 0.01, "checkpoint_every_steps": 7}}, {"snapshots": {"keep_daily": 3}},
    {"disk": {"warn_free_gb": 50}}, {"logging": {"level": "debug"}}, {"timezone": "Europe/Berlin"},
    {"training": {"stop_timeout_s": 30}}, {"consolidation": {"dtype": "bf16"}}, {"checkpoints": {"settle_s": 5}},
]


def test_edits_that_decide_no_deletion_need_no_confirmation(tmp_path):
    from maintenance.cleanup import confirm_policy, policy_confirmed
    from tests.helpers import deep_merge

    base = {"retention": {"tiers": [{"count": 3}]}}
    cfg0 = load_config(write_config(tmp_path, base, tiny=False))
    confirm_policy(cfg0, "test")
    for edit in UNRELATED_EDITS:
        cfg = load_config(write_config(tmp_path, deep_merge(base, edit), tiny=False))
        assert policy_confirmed(cfg), edit
    cfg = load_config(write_config(tmp_path, deep_merge(base, {k: v for e in UNRELATED_EDITS for k, v in
                                                                deep_merge({}, e).items() if k != "retention"}),
                                   tiny=False))
    for s in (10, 20, 30, 40, 50):
        fake_native(cfg.checkpoint_dir, s)
    r = run_cleanup(cfg, dry_run=False, confirm=lambda r: True, unattended=True)
    assert r.policy["confirmed"] and not r.held and steps_left(cfg.checkpoint_dir) == [30, 40, 50]


def test_a_policy_record_of_an_earlier_version_or_a_damaged_one(tmp_path):
    """A record that holds only the tiers (what earlier versions wrote) confirms those tiers and the
    defaults of the rest; a damaged one counts as no record (the shipped defaults)."""
    from maintenance.cleanup import policy_confirmed

    cfg = load_config(write_config(tmp_path, {"retention": {"tiers": [{"count": 3}]}}, tiny=False))
    rec = cfg.checkpoint_dir / ".ckpt-daemon" / "policy.json"
    rec.parent.mkdir(parents=True)
    rec.write_text(json.dumps({"tiers": [{"count": 3, "every_steps": None}], "how": "cleanup -y"}))
    assert policy_confirmed(cfg)
    edited = load_config(write_config(tmp_path, {"retention": {"tiers": [{"count": 3}], "keep_epoch_ends": False}},
                                      tiny=False))
    assert not policy_confirmed(edited)
    for bad in ({"settings": {"retention.tiers": [{"count": -1}]}}, {"settings": {"checkpoints.pattern": 5}}, []):
        rec.write_text(json.dumps(bad))
        assert not policy_confirmed(cfg)  # the shipped default tiers are the confirmed ones again
        assert policy_confirmed(load_config(write_config(tmp_path, {"checkpoints": {}}, tiny=False)))


def test_the_state_folder_is_ours_only(tmp_path):
    root = tmp_path / "ck"
    root.mkdir()
    (root / ".ckpt-daemon").write_text("a file where our folder should be")
    with pytest.raises(Exception, match="not a folder"):
        runtime.state_dir(root)
    (root / ".ckpt-daemon").unlink()
    d = runtime.state_dir(root, "tmp")
    assert d.is_dir() and not d.is_symlink()
    with store_commit.Scratch(root, "x") as s:
        assert s.path.is_dir() and store_commit.live_scratch(root) == [s.id]
        assert store_delete.clean_scratch(root) == []  # alive: never removed
    assert not s.path.exists() and not s.lock_path.exists()
    # a dead builder's lock in the making (unheld) is removed...
    pending = d / ".x-1-abcd.lock.new"
    pending.write_text("")
    store_delete.clean_scratch(root)
    assert not pending.exists()


def test_a_scratch_whose_lock_in_the_making_is_cleaned_away_is_made_again(tmp_path, monkeypatch):
    """...and when that happens to a live builder between creating its lock and taking it (the cleaner
    found it unheld), the builder makes its lock again instead of failing its save."""
    root = tmp_path / "ck"
    root.mkdir()
    real, raced = store_commit._lock_fd, []

    def racing_lock_fd(path):
        fd = real(path)
        if str(path).endswith(".lock.new") and not raced:
            raced.append(path)
            assert store_delete.clean_scratch(root) == []  # unheld at this instant: the cleaner removes it
            assert not path.exists()
        return fd

    monkeypatch.setattr(store_commit, "_lock_fd", racing_lock_fd)
    with store_commit.Scratch(root, "x") as s:
        assert raced and s.lock_path.exists() and runtime.lock_held(s.lock_path)
        assert store_delete.clean_scratch(root) == [] and s.path.is_dir()


def test_pins_and_records_are_never_written_through_a_symlink(tmp_path):
    root = tmp_path / "ck"
    native(root, [10])
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    os.symlink(victim, root / ".ckpt-daemon" / "trainer.lock")
    with pytest.raises(OSError):
        runtime.TrainerLock(root).acquire()  # O_NOFOLLOW: a planted link is never opened, let alone truncated
    assert victim.read_text() == "keep me"
    with pytest.raises(Exception, match="not a checkpoint name"):
        runtime.pin(root, "../../victim.txt")
    assert yaml.safe_load(victim.read_text()) == "keep me"


def test_a_symlink_planted_in_the_trash_or_scratch_is_removed_as_a_link_never_followed(tmp_path):
    cfg_path = write_config(tmp_path / "proj", {"retention": {"tiers": [{"count": 1}]}}, tiny=False)
    root = tmp_path / "proj" / "checkpoints"
    for s in (10, 20):
        fake_native(root, s)
    victim = tmp_path / "victim"
    native(victim, [5, 6])  # someone's checkpoints elsewhere
    before = sorted(p.name for p in victim.iterdir())
    (root / ".ckpt-daemon" / "trash").mkdir(parents=True)
    (root / ".ckpt-daemon" / "tmp").mkdir()
    os.symlink(victim, root / ".ckpt-daemon" / "trash" / "run-7-dead")
    os.symlink(victim, root / ".ckpt-daemon" / "tmp" / "checkpoint-30-1-dead")
    r = run_py(["-m", "maintenance.cleanup", "--config", str(cfg_path), "-y"], check=True)
    assert "Traceback" not in r.stderr
    assert sorted(p.name for p in victim.iterdir()) == before and cat.scan(victim, ["checkpoint-{step}"]).newest_valid()
    assert not os.path.lexists(root / ".ckpt-daemon" / "trash" / "run-7-dead")
    assert not os.path.lexists(root / ".ckpt-daemon" / "tmp" / "checkpoint-30-1-dead")
    assert steps_left(root) == [20]


@pytest.mark.slow
def test_a_fifo_where_a_lock_should_be_never_hangs_anything(tmp_path):
    cfg_path = write_config(tmp_path, {}, tiny=False)
    root = tmp_path / "checkpoints"
    fake_native(root, 10)
    (root / ".ckpt-daemon" / "tmp" / "zz").mkdir(parents=True)
    os.mkfifo(root / ".ckpt-daemon" / "tmp" / "zz.lock")
    os.mkfifo(root / ".ckpt-daemon" / "trainer.lock")
    for args in (["-m", "daemon", "list", "--config", str(cfg_path)],
                 ["-m", "maintenance.cleanup", "--config", str(cfg_path), "--dry-run"]):
        r = run_py(args, timeout=60)  # a hang would time out here
        assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    r = run_py(["-m", "maintenance.cleanup", "--config", str(cfg_path), "-y"], timeout=60)
    assert r.returncode in (0, 1) and "Traceback" not in r.stderr


def test_a_cleanup_on_a_100_percent_full_disk_frees_space(tmp_path, tmpfs):
    disk = tmpfs("4m")
    cfg_path = write_config(disk, {"retention": {"tiers": [{"count": 2}]}}, tiny=False)
    for s in range(10, 90, 10):
        fake_native(disk / "checkpoints", s, payload=b"w" * 200_000)
    with open(disk / "filler", "wb", buffering=0) as f:  # the disk is now 100% full
        try:
            while True:
                f.write(b"\0" * 65536)
        except OSError:
            pass
    r = run_py(["-m", "maintenance.cleanup", "--config", str(cfg_path), "-y"])
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert steps_left(disk / "checkpoints") == [70, 80]
    assert os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize > 1_000_000
    assert "deleted checkpoint-10" in (disk / "logs" / "cleanup.log").read_text()
