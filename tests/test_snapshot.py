"""Daily snapshots, calendar retention, restore; consolidation and compression."""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from ckpt_daemon.config import load_config
from ckpt_daemon.errors import DiskFullError
from ckpt_daemon.store import catalog as cat
from maintenance.snapshot import plan_calendar, take_snapshot
from tests.helpers import native, run_py, write_config


def visible(path: Path) -> list[Path]:
    """Entries of a folder, without ckpt-daemon's own state folder (and other hidden names)."""
    return sorted(p for p in path.iterdir() if not p.name.startswith("."))


def own_blocks_bytes(tree: Path, exclude: Path) -> int:
    """Bytes allocated to the files of `tree` that no file under `exclude` shares: what a snapshot
    really costs, measured on its own files (not the free space of a filesystem others write to)."""
    shared = {(st.st_dev, st.st_ino) for st in (os.lstat(p) for p in exclude.rglob("*"))}
    total = 0
    for p in tree.rglob("*"):
        st = os.lstat(p)
        if p.is_file() and not p.is_symlink() and (st.st_dev, st.st_ino) not in shared:
            total += st.st_blocks * 512
    return total


def du_bytes(path: Path) -> int:
    return int(subprocess.run(["du", "-sB1", str(path)], capture_output=True, text=True, check=True).stdout.split()[0])


def setup(tmp_path: Path, overrides=None):
    cfg_path = write_config(tmp_path, overrides or {}, tiny=False)
    native(tmp_path / "checkpoints", [10, 20, 30])
    return load_config(cfg_path), cfg_path


def test_snapshot_hard_links_share_inodes_and_add_no_blocks(tmp_path):
    cfg, cfg_path = setup(tmp_path)
    (tmp_path / "checkpoints" / "best").unlink()
    os.symlink("checkpoint-20", tmp_path / "checkpoints" / "best")
    r = run_py(["-m", "maintenance.snapshot", "--config", str(cfg_path)], check=True)
    snaps = visible(tmp_path / "snapshots")
    assert len(snaps) == 1 and snaps[0].name == dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
    man = json.loads((snaps[0] / "snapshot.json").read_text())
    assert {c["name"]: c["roles"] for c in man["checkpoints"]} == {"checkpoint-30": ["latest"],
                                                                   "checkpoint-20": ["best"]}
    assert man["added_bytes"] == 0 and man["apparent_bytes"] > 0
    for name in ("checkpoint-30", "checkpoint-20"):
        for f in (tmp_path / "checkpoints" / name).iterdir():
            a, b = f.stat(), (snaps[0] / name / f.name).stat()
            assert (a.st_ino, a.st_dev) == (b.st_ino, b.st_dev) and a.st_nlink == 2
    assert "really added 0.0 MiB" in r.stdout
    # only snapshot.json has blocks of its own: every checkpoint file is shared with the checkpoint folder
    assert own_blocks_bytes(snaps[0], tmp_path / "checkpoints") <= (snaps[0] / "snapshot.json").stat().st_blocks * 512
    # the snapshot is a valid checkpoint copy
    assert cat.check_entry(snaps[0] / "checkpoint-30", verify=True)[1] == "complete"


def test_same_day_rerun_is_a_noop(tmp_path):
    cfg, _ = setup(tmp_path)
    now = dt.datetime(2026, 11, 22, 3, 0, tzinfo=dt.timezone.utc)
    first = take_snapshot(cfg, now)
    before = sorted(p.name for p in first.path.rglob("*"))
    native(tmp_path / "checkpoints", [40])  # a newer checkpoint the same day
    second = take_snapshot(cfg, now.replace(hour=15))
    assert first.created and not second.created and "already exists" in second.message
    assert sorted(p.name for p in first.path.rglob("*")) == before


def test_rewritten_in_place_file_does_not_change_its_snapshot(tmp_path):
    cfg_path = write_config(tmp_path, {"checkpoints": {"pattern": "rolling_step_{step}.pt"}}, tiny=False)
    cfg = load_config(cfg_path)
    root = cfg.checkpoint_dir
    root.mkdir()
    f = root / "rolling_step_000100.pt"
    torch.save({"model_state_dict": {"w": torch.ones(100)}}, f)
    res = take_snapshot(cfg)
    snap_file = res.path / "rolling_step_000100.pt"
    assert snap_file.stat().st_ino != f.stat().st_ino  # copied (or reflinked), never hard-linked
    assert res.added_bytes > 0 or snap_file.stat().st_blocks > 0
    # the user's trainer rewrites the file in place
    with open(f, "r+b") as fh:
        fh.seek(0)
        fh.write(b"\0" * 64)
    back = torch.load(snap_file, weights_only=True)
    assert torch.equal(back["model_state_dict"]["w"], torch.ones(100))


def test_reflink_copy_on_a_filesystem_that_has_them(btrfs):
    disk = btrfs()
    cfg_path = write_config(disk, {"checkpoints": {"pattern": "rolling_step_{step}.pt"}}, tiny=False)
    cfg = load_config(cfg_path)
    cfg.checkpoint_dir.mkdir()
    f = cfg.checkpoint_dir / "rolling_step_000100.pt"
    torch.save({"model_state_dict": {"w": torch.randn(4 << 20)}}, f)  # 16 MiB
    os.sync()
    free0 = shutil.disk_usage(disk).free
    res = take_snapshot(cfg)
    os.sync()
    snap_file = res.path / f.name
    assert res.checkpoints[0]["method"] == "reflink" and res.added_bytes == 0
    assert snap_file.stat().st_ino != f.stat().st_ino
    assert free0 - shutil.disk_usage(disk).free < 4 << 20  # far less than the 16 MiB a copy costs
    with open(f, "r+b") as fh:  # the trainer rewrites its file in place: copy-on-write keeps the snapshot
        fh.seek(100)
        fh.write(b"\xff" * 4096)
    assert torch.load(snap_file, weights_only=True)["model_state_dict"]["w"].numel() == 4 << 20


def test_half_made_snapshot_never_looks_done(tmp_path, monkeypatch):
    cfg, _ = setup(tmp_path)
    import maintenance.snapshot as snap

    def fail(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(snap, "copy_into", fail)
    with pytest.raises(DiskFullError, match="Not enough disk space to take the snapshot"):
        take_snapshot(cfg)
    assert not visible(tmp_path / "snapshots")
    assert not list((tmp_path / "snapshots" / ".ckpt-daemon" / "tmp").iterdir())  # no scratch left behind


def test_calendar_retention_on_a_synthetic_month():
    start = dt.date(2026, 9, 1)
    snaps = [(d.isoformat(), d) for d in (start + dt.timedelta(days=i) for i in range(0, 75))]  # Sep 1 .. Nov 14
    decisions = {d.name: d for d in plan_calendar(snaps, keep_daily=7, keep_weekly=4, keep_monthly=3)}
    kept = sorted(n for n, d in decisions.items() if d.keep)
    daily = [f"2026-11-{d:02d}" for d in range(8, 15)]
    # weekly: the newest of each of the last 4 ISO weeks (weeks end on Sunday)
    weekly = ["2026-11-14", "2026-11-08", "2026-11-01", "2026-10-25"]
    monthly = ["2026-11-14", "2026-10-31", "2026-09-30"]
    assert kept == sorted(set(daily + weekly + monthly))
    assert "daily #1 (2026-11-14)" in decisions["2026-11-14"].reasons and "newest snapshot" in decisions["2026-11-14"].reasons
    assert decisions["2026-10-31"].reasons == ["monthly #2 (2026-10)"]
    assert not decisions["2026-10-01"].keep and decisions["2026-10-01"].reasons == ["outside keep_daily/keep_weekly/keep_monthly"]


def test_prune_deletes_old_snapshots_and_logs(tmp_path):
    cfg, _ = setup(tmp_path, {"snapshots": {"keep_daily": 2, "keep_weekly": 0, "keep_monthly": 0}})
    for day in (1, 2, 3, 4):
        take_snapshot(cfg, dt.datetime(2026, 11, day, 3, tzinfo=dt.timezone.utc))
    from maintenance.snapshot import prune_snapshots

    prune_snapshots(cfg)
    assert [p.name for p in visible(cfg.snapshot_dir)] == ["2026-11-03", "2026-11-04"]
    log = (tmp_path / "logs" / "cleanup.log").read_text()
    assert "deleted snapshot 2026-11-01" in log and "kept 2 snapshots" in log
    # the checkpoints the snapshots linked to are untouched
    assert all(e.valid for e in cat.scan_config(cfg, verify=True).entries)


@pytest.mark.slow
def test_restored_snapshot_is_resumed_from(tmp_path):
    cfg_path = write_config(tmp_path)
    run_py(["-m", "trainer", "--config", str(cfg_path), "--max-steps", "20"], check=True)
    run_py(["-m", "maintenance.snapshot", "--config", str(cfg_path)], check=True)
    snap = visible(tmp_path / "snapshots")[0]
    # "I deleted too much"
    shutil.rmtree(tmp_path / "checkpoints")
    r = run_py(["-m", "maintenance.restore", snap.name, "--config", str(cfg_path)], check=True)
    assert "restored checkpoint-20" in r.stdout and "training will resume from checkpoint-20" in r.stdout
    # restoring again overwrites nothing
    r = run_py(["-m", "maintenance.restore", snap.name, "--config", str(cfg_path)], check=True)
    assert "already in" in r.stdout and "nothing was overwritten" in r.stdout
    r = run_py(["-m", "trainer", "--config", str(cfg_path), "--max-steps", "25"], check=True)
    assert "resumed from checkpoint-20 at step 20" in r.stderr


def test_only_ascii_dates_name_a_snapshot(tmp_path):
    """A folder under snapshots/ is a snapshot only under a date of ASCII digits: `\\d` (and int()) also
    take Arabic-Indic or full-width digits, which would make a planted folder a snapshot to keep or prune."""
    import datetime as dt

    from maintenance.snapshot import SNAPSHOT_FORMAT, SNAPSHOT_MANIFEST, list_snapshots

    for name in ("2026-12-05", "\u0662\u0660\u0662\u0666-\u0661\u0662-\u0660\u0664", "２０２６-１２-０３"):
        (tmp_path / name).mkdir()
        (tmp_path / name / SNAPSHOT_MANIFEST).write_text(json.dumps({"format": SNAPSHOT_FORMAT}))
    assert list_snapshots(tmp_path) == [("2026-12-05", dt.date(2026, 12, 5))]
