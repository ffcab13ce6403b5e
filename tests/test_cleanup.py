"""python -m maintenance.cleanup on real folders."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from ckpt_daemon.config import load_config
from ckpt_daemon.store import catalog as cat
from ckpt_daemon.store import commit as store_commit
from maintenance.cleanup import run_cleanup
from tests.helpers import PY, env_for_children, hf_folder, native, run_py, single_file, write_config

SMALL_TIERS = {"retention": {"tiers": [{"count": 2}, {"every_steps": 20}]}}


def tree_fingerprint(root: Path) -> dict:
    out = {}
    for dirpath, dirs, files in os.walk(root, followlinks=False):
        for name in dirs + files:
            p = Path(dirpath) / name
            st = os.lstat(p)
            digest = None
            if os.path.isfile(p) and not os.path.islink(p):
                digest = hashlib.sha256(p.read_bytes()).hexdigest()
            out[str(p.relative_to(root))] = (st.st_mode, st.st_size, st.st_mtime_ns, st.st_ino, st.st_nlink, digest,
                                              os.readlink(p) if os.path.islink(p) else None)
    return out


def setup_native(tmp_path: Path, steps=range(5, 65, 5), overrides=None) -> Path:
    cfg = write_config(tmp_path, {**SMALL_TIERS, **(overrides or {})}, tiny=False)
    native(tmp_path / "checkpoints", list(steps))
    return cfg


@pytest.mark.slow
def test_applied_cleanup_deletes_by_policy_and_logs_every_deletion(tmp_path):
    cfg = setup_native(tmp_path)
    r = run_py(["-m", "maintenance.cleanup", "--config", str(cfg), "-y"], check=True)
    left = sorted(e.step for e in cat.scan(tmp_path / "checkpoints", ["checkpoint-{step}"]).entries)
    # newest 2 (55, 60) + first of each 20-step bucket >= 20 (20, 40)
    assert left == [20, 40, 55, 60]
    assert "tier 1: 2 checkpoints, keep 2, delete 0" in r.stdout and "tier 2: 10 checkpoints, keep 2, delete 8" in r.stdout
    log = (tmp_path / "logs" / "cleanup.log").read_text()
    assert "cleanup (applied)" in log and "tier 1 (newest 2: keep all); tier 2 (all older: one per 20 steps)" in log
    for s in (5, 10, 15, 25, 30, 35, 45, 50):
        assert f"deleted checkpoint-{s} (" in log
    assert "deleted checkpoint-25 (" in log and "not first of steps 20-39 (20 is)" in log
    assert "freed " in log and "duration" in log
    assert not list((tmp_path / "checkpoints" / ".ckpt-daemon" / "trash").iterdir())  # nothing left in the trash
    # a second run appends, never overwrites
    run_py(["-m", "maintenance.cleanup", "--config", str(cfg), "-y"], check=True)
    assert (tmp_path / "logs" / "cleanup.log").read_text().startswith(log)
    assert (tmp_path / "logs" / "cleanup.log").read_text().count("=== ") == 2


@pytest.mark.slow
def test_dry_run_changes_nothing_at_all(tmp_path):
    cfg = setup_native(tmp_path)
    before = tree_fingerprint(tmp_path / "checkpoints")
    r = run_py(["-m", "maintenance.cleanup", "--config", str(cfg), "--dry-run"], check=True)
    assert tree_fingerprint(tmp_path / "checkpoints") == before
    assert "DELETE checkpoint-5 " in r.stdout and "KEEP   checkpoint-60" in r.stdout
    assert "protected: newest valid checkpoint" in r.stdout
    assert "would delete checkpoint-5" in (tmp_path / "logs" / "cleanup.log").read_text()
    js = json.loads(run_py(["-m", "maintenance.cleanup", "--config", str(cfg), "--dry-run", "--json"],
                           check=True).stdout)
    assert js["mode"] == "dry run" and sum(d["action"] == "delete" for d in js["decisions"]) == 8
    assert tree_fingerprint(tmp_path / "checkpoints") == before


@pytest.mark.slow
def test_without_terminal_and_without_y_it_refuses_with_exit_2(tmp_path):
    cfg = setup_native(tmp_path)
    before = tree_fingerprint(tmp_path / "checkpoints")
    r = run_py(["-m", "maintenance.cleanup", "--config", str(cfg)], stdin=subprocess.DEVNULL, timeout=60)
    assert r.returncode == 2
    assert "no terminal to confirm on" in r.stderr and "Pass -y" in r.stderr and "Nothing was deleted" in r.stderr
    assert tree_fingerprint(tmp_path / "checkpoints") == before


@pytest.mark.slow
def test_confirmation_prompt_answered_no_deletes_nothing(tmp_path):
    cfg = setup_native(tmp_path)
    before = tree_fingerprint(tmp_path / "checkpoints")
    # a real terminal: run under `script` so stdin is a tty, and answer "n"
    r = subprocess.run(["script", "-qec", f"{PY} -m maintenance.cleanup --config {cfg}", "/dev/null"], input="n\n",
                       capture_output=True, text=True, env=env_for_children(), timeout=60)
    assert "Delete 8 checkpoint(s)" in r.stdout and "cancelled" in r.stdout
    assert tree_fingerprint(tmp_path / "checkpoints") == before


def test_each_layout(tmp_path):
    cfg = write_config(tmp_path,
                       {**SMALL_TIERS, "checkpoints": {"pattern": ["checkpoint-{step}", "rolling_step_{step}.pt"]}},
                       tiny=False)
    root = tmp_path / "checkpoints"
    root.mkdir()
    for s in (5, 10, 15, 25):
        hf_folder(root, s)
    for s in (30, 35, 45):
        single_file(root, f"rolling_step_{s:06d}.pt")
    single_file(root, "latest.pt")
    run_py(["-m", "maintenance.cleanup", "--config", str(cfg), "-y"], check=True)
    left = sorted(e.name for e in cat.scan(root, ["checkpoint-{step}", "rolling_step_{step}.pt"]).entries)
    assert left == ["checkpoint-25", "rolling_step_000035.pt", "rolling_step_000045.pt"]
    assert (root / "latest.pt").exists()  # not a numbered checkpoint: never touched


@pytest.mark.slow
def test_symlinks_to_outside_are_never_followed(tmp_path):
    outside = tmp_path / "precious"
    outside.mkdir()
    (outside / "data.bin").write_bytes(b"x" * 1000)
    cfg = setup_native(tmp_path)
    root = tmp_path / "checkpoints"
    (root / "checkpoint-7").symlink_to(outside, target_is_directory=True)  # a numbered name that is a link
    os.symlink(outside / "data.bin", root / "checkpoint-5" / "link.bin")  # a link inside a deleted checkpoint
    os.symlink(outside, root / "checkpoint-10" / "linkdir")
    run_py(["-m", "maintenance.cleanup", "--config", str(cfg), "-y"], check=True)
    assert (outside / "data.bin").read_bytes() == b"x" * 1000
    assert (root / "checkpoint-7").is_symlink()
    assert not (root / "checkpoint-5").exists() and not (root / "checkpoint-10").exists()


@pytest.mark.slow
def test_hard_linked_checkpoint_frees_nothing_and_says_so(tmp_path):
    cfg = setup_native(tmp_path)
    snap = tmp_path / "snapshots" / "manual"
    snap.mkdir(parents=True)
    for f in (tmp_path / "checkpoints" / "checkpoint-5").iterdir():
        os.link(f, snap / f.name)
    r = run_py(["-m", "maintenance.cleanup", "--config", str(cfg), "--dry-run"], check=True)
    assert "share files with snapshots (hard links)" in r.stdout and "checkpoint-5" in r.stdout
    js = json.loads(run_py(["-m", "maintenance.cleanup", "--config", str(cfg), "--dry-run", "--json"],
                           check=True).stdout)
    d5 = next(d for d in js["decisions"] if d["name"] == "checkpoint-5")
    assert d5["freeable_bytes"] < d5["bytes"] / 10


@pytest.mark.slow
def test_pinned_and_resumed_from_are_protected(tmp_path):
    cfg = setup_native(tmp_path)
    r = run_py(["-m", "daemon", "pin", "--config", str(cfg), "checkpoint-15", "--reason", "paper figure"], check=True)
    assert "pinned checkpoint-15" in r.stdout
    from ckpt_daemon.runtime import record_resumed_from

    record_resumed_from(tmp_path / "checkpoints", "checkpoint-25", 25)
    out = run_py(["-m", "maintenance.cleanup", "--config", str(cfg), "-y"], check=True).stdout
    left = {e.step for e in cat.scan(tmp_path / "checkpoints", ["checkpoint-{step}"]).entries}
    assert {15, 25} <= left
    assert "protected: pinned (paper figure)" in out and "protected: training last resumed from it" in out


def test_one_failed_delete_is_reported_and_the_rest_go_on(tmp_path):
    cfg_path = setup_native(tmp_path)
    cfg = load_config(cfg_path)
    calls = []

    def flaky_remove(path, root):
        calls.append(path.name)
        if path.name == "checkpoint-10":
            raise PermissionError(13, "Permission denied", str(path))
        import shutil

        shutil.rmtree(path)

    from maintenance import cleanup

    r = cleanup.build_report(cfg, "applied")
    cleanup.execute(cfg, r, remove=flaky_remove)
    assert [n for n, _ in r.failed] == ["checkpoint-10"] and len(r.deleted) == 7
    assert not (tmp_path / "checkpoints" / "checkpoint-10").exists()  # it left the catalog before the failure
    assert not any(e.name == "checkpoint-10" for e in cat.scan(tmp_path / "checkpoints", ["checkpoint-{step}"]).entries)


@pytest.mark.slow
def test_cleanup_loop_races_a_trainer_saving_every_step(tmp_path):
    cfg_path = write_config(tmp_path, {"trainer": {"checkpoint_every_steps": 1, "async_save": True},
                                       "retention": {"tiers": [{"count": 3}, {"every_steps": 10}]}})
    p = subprocess.Popen([PY, "-m", "trainer", "--config", str(cfg_path)], stdout=subprocess.DEVNULL,
                         stderr=open(tmp_path / "trainer.log", "wb"), env=env_for_children())
    cfg = load_config(cfg_path)
    root = cfg.checkpoint_dir
    deleted_total = 0
    try:
        deadline = time.monotonic() + 60
        while not (root / "checkpoint-12").exists():
            assert time.monotonic() < deadline and p.poll() is None, (tmp_path / "trainer.log").read_text()
            time.sleep(0.05)
        for _ in range(25):
            r = run_cleanup(cfg, dry_run=False, confirm=lambda r: True)
            assert not r.failed, r.failed
            deleted_total += len(r.deleted)
            latest = os.readlink(root / "latest")  # read before the scan: the trainer only adds in between
            c = cat.scan(root, ["checkpoint-{step}"])
            assert c.newest_valid() is not None and latest in {e.name for e in c.entries}
            for d in r.decisions:  # everything the policy kept is still there
                if d.keep and d.name not in {x for x in r.deleted}:
                    assert (root / d.name).exists(), d
            time.sleep(0.05)
    finally:
        p.send_signal(signal.SIGTERM)
        rc = p.wait(timeout=60)
    assert rc == 143, (tmp_path / "trainer.log").read_text()  # stopped by SIGTERM after saving: not finished
    assert deleted_total > 10
    log = (tmp_path / "trainer.log").read_text()
    assert "Error" not in log and "Traceback" not in log
    c = cat.scan(root, ["checkpoint-{step}"], verify=True)
    assert all(e.valid for e in c.entries) and not c.in_progress
    # and training resumes from what is left
    r = run_py(["-m", "trainer", "--config", str(cfg_path), "--max-steps", str(c.newest_valid().step + 2)], check=True)
    assert f"resumed from {c.newest_valid().name}" in r.stderr


@pytest.mark.slow
def test_concurrent_cleanups_never_take_each_others_trash(tmp_path):
    from ckpt_daemon.fsutil import atomic_write_json

    cfg_path = setup_native(tmp_path)
    root = tmp_path / "checkpoints"
    live = store_commit.Scratch(root, "run", sub="trash")  # a cleanup still running (it holds its lock)
    (live.path / "checkpoint-1").mkdir()
    dead = store_commit.Scratch(root, "run", sub="trash")  # one killed half-way: its lock is free, its journal says why
    (dead.path / "checkpoint-2").mkdir()
    (dead.path / "checkpoint-2" / "model.safetensors").write_bytes(b"x" * 100)
    atomic_write_json(dead.path / ".journal.json", {"started": time.time() - 60, "state": "moving", "planned": {
        "checkpoint-2": {"reasons": ["tier 2: not first of steps 0-19"], "freeable_bytes": 4096}}})
    os.close(dead.fd)  # the process dies: its lock goes, its folder and lock file stay
    dead.fd = None
    run_py(["-m", "maintenance.cleanup", "--config", str(cfg_path), "-y"], check=True)
    assert (live.path / "checkpoint-1").exists() and not dead.path.exists() and not dead.lock_path.exists()
    log = (tmp_path / "logs" / "cleanup.log").read_text()
    assert "deleted checkpoint-2: finishing a cleanup that was interrupted" in log
    assert "its reasons: tier 2: not first of steps 0-19" in log and "FAILED" not in log
    assert sorted(p.name for p in (root / ".ckpt-daemon" / "trash").iterdir()) == sorted([live.id, live.id + ".lock"])
    live.close()


@pytest.mark.slow
def test_a_script_whose_epoch_changes_every_save_is_told_and_bounded(tmp_path):
    """A plain script that saves its own counter as `epoch`: every file is an epoch end. The dry run says
    so (and what to do), and retention.max_epoch_ends bounds what epoch-end protection keeps."""
    import torch

    root = tmp_path / "checkpoints"
    root.mkdir()
    for s in range(10, 310, 10):
        torch.save({"model": {"w": torch.zeros(2)}, "step": s, "epoch": s // 10}, root / f"model_step_{s}.pt")
    over = {"checkpoints": {"pattern": "model_step_{step}.pt"}, "retention": {"tiers": [{"count": 2}]}}
    cfg = write_config(tmp_path, over, tiny=False)
    r = run_py(["-m", "maintenance.cleanup", "--config", str(cfg), "--dry-run", "-q"], check=True)
    assert "Epoch ends: 29 of 30 checkpoints are the last of their epoch (the epoch changes about every 10 steps)" in r.stdout
    assert "set retention.keep_epoch_ends: false, or lower retention.max_epoch_ends" in r.stdout
    assert "Delete 0 of 30" in r.stdout  # all 29 are within the default max_epoch_ends (100)
    cfg = write_config(tmp_path, {**over, "retention": {"tiers": [{"count": 2}], "max_epoch_ends": 5}}, tiny=False)
    r = run_py(["-m", "maintenance.cleanup", "--config", str(cfg), "--dry-run", "-q"], check=True)
    assert "Delete 24 of 30" in r.stdout, r.stdout  # kept: the newest 2 and the newest 5 epoch ends (290 is both)
    assert "the 24 older ones are not protected as epoch ends and follow the tiers" in r.stdout
    assert "Epoch ends: 29 of 30" in (tmp_path / "logs" / "cleanup.log").read_text()
