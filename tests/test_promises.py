"""The smaller truths, and README promises that had no test of their own.

Each test names the promise it holds the code to: honest reports (bytes freed, snapshot methods, a
committed checkpoint whose pointers could not be updated), exit codes, the snapshot modes, a
checkpoint that does not fit the model, unpin, best_mode max, time zones, retention disabled in a disk
emergency, and a manual cleanup that knows what the daemon's own trainer resumed from.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import pty
import subprocess
import time
import zoneinfo
from pathlib import Path

import pytest
import torch

from ckpt_daemon import runtime
from ckpt_daemon.checkpoint import CheckpointManager
from ckpt_daemon.config import load_config
from ckpt_daemon.store import catalog as cat
from ckpt_daemon.store import delete as store_delete
from maintenance.snapshot import take_snapshot
from tests.helpers import PY, Daemon, env_for_children, fake_native, native, run_py, write_config


def model(width: int = 32) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.Linear(width, 4))


def test_a_commit_whose_pointers_cannot_be_written_is_reported_as_committed(tmpfs, caplog):
    """No inode left right after the commit: the checkpoint is valid and said to be; only `latest` lags."""
    disk = tmpfs("16m", "nr_inodes=64")
    m = model()
    mgr = CheckpointManager(disk, save_margin_bytes=0)
    mgr.save(1, model=m)
    fillers = []
    while True:
        try:
            p = disk / f"filler-{len(fillers)}"
            p.touch()
            fillers.append(p)
        except OSError:
            break
    for p in fillers[:6]:  # a scratch lock, a folder and its four files: exactly enough for the save itself
        p.unlink()
    with caplog.at_level(logging.INFO):
        out = mgr.save(2, model=m)
    assert out == disk / "checkpoint-2"
    c = cat.scan(disk, ["checkpoint-{step}"], verify=True)
    assert c.by_name("checkpoint-2").valid and c.pointers["latest"] == "checkpoint-1"
    text = caplog.text
    assert "is committed and valid, but the latest/best pointers could not be updated" in text
    assert "Not enough disk space" not in text and mgr.skipped_saves == 0
    for p in fillers[6:]:
        p.unlink()
    mgr.save(3, model=m)
    assert os.readlink(disk / "latest") == "checkpoint-3"


def test_a_snapshot_records_how_it_really_copied(tmp_path, tmpfs):
    snaps = tmpfs("64m")  # another filesystem: no hard link can reach it
    cfg = load_config(write_config(tmp_path, {"snapshots": {"dir": str(snaps), "mode": "link"}}, tiny=False))
    native(cfg.checkpoint_dir, [10])
    res = take_snapshot(cfg)
    rec = res.checkpoints[0]
    assert rec["method"] == "copy" and rec["independent"] is True and res.added_bytes > 0
    assert any("hard link impossible" in n for n in rec["notes"])
    assert json.loads((res.path / "snapshot.json").read_text())["checkpoints"][0]["method"] == "copy"


def test_a_snapshot_to_a_full_filesystem_exits_3_with_the_reason(tmp_path, tmpfs):
    snaps = tmpfs("1m")
    cfg_path = write_config(tmp_path, {"snapshots": {"dir": str(snaps)}}, tiny=False)
    m = torch.nn.Linear(1024, 1024)  # 4 MiB of weights: does not fit
    CheckpointManager(tmp_path / "checkpoints").save(10, model=m)
    r = run_py(["-m", "maintenance.snapshot", "--config", str(cfg_path)])
    assert r.returncode == 3 and "Not enough disk space to take the snapshot" in r.stderr
    assert "Traceback" not in r.stderr
    assert not [p for p in snaps.iterdir() if not p.name.startswith(".")]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["link", "copy"])
def test_snapshot_modes_and_damage_in_place(tmp_path, mode):
    """link shares the bytes: a byte damaged in place damages the snapshot too (as the README says);
    copy is independent and verified, so restore brings back a good checkpoint."""
    cfg_path = write_config(tmp_path, {"snapshots": {"mode": mode}}, tiny=False)
    cfg = load_config(cfg_path)
    native(cfg.checkpoint_dir, [10])
    res = take_snapshot(cfg)
    assert res.checkpoints[0]["method"] == ("hard link" if mode == "link" else "copy")
    f = cfg.checkpoint_dir / "checkpoint-10" / "model.safetensors"
    with open(f, "r+b") as fh:  # bit rot, in place
        fh.seek(200)
        b = fh.read(1)
        fh.seek(200)
        fh.write(bytes([b[0] ^ 0xFF]))
    snap_ok = cat.check_entry(res.path / "checkpoint-10", verify=True)[1] == "complete"
    assert snap_ok is (mode == "copy")
    if mode == "copy":
        store_delete.quarantine(cfg.checkpoint_dir, "checkpoint-10", "damaged")
        r = run_py(["-m", "maintenance.restore", res.name, "--config", str(cfg_path)], check=True)
        assert "restored checkpoint-10" in r.stdout
        assert cat.scan_config(cfg, verify=True).by_name("checkpoint-10").valid


def test_an_intact_checkpoint_that_does_not_fit_the_model_falls_back(tmp_path, caplog):
    mgr = CheckpointManager(tmp_path)
    mgr.save(10, model=model(32))
    mgr.save(20, model=model(16))  # another architecture, same folder
    m = model(32)
    with caplog.at_level(logging.INFO):
        loaded = CheckpointManager(tmp_path).load("latest", model=m)
    assert loaded.step == 10 and loaded.skipped[0][0] == "checkpoint-20"
    assert "does not fit the model" in loaded.skipped[0][1]
    assert (tmp_path / "checkpoint-20").is_dir()  # nothing is wrong with its bytes: not quarantined
    with pytest.raises(Exception, match="fits this model"):
        CheckpointManager(tmp_path).load("latest", model=model(8))


def test_best_mode_max_follows_the_highest_metric(tmp_path):
    mgr = CheckpointManager(tmp_path, best_metric="accuracy", best_mode="max")
    m = model()
    for step, acc in ((10, 0.5), (20, 0.7), (30, 0.6)):
        mgr.save(step, model=m, metrics={"accuracy": acc})
    assert os.readlink(tmp_path / "best") == "checkpoint-20"
    assert CheckpointManager(tmp_path, best_metric="accuracy", best_mode="max").best_value == 0.7


@pytest.mark.slow
def test_snapshots_are_named_by_the_configured_time_zone(tmp_path):
    names = {}
    for tz in ("Pacific/Kiritimati", "Pacific/Pago_Pago"):  # UTC+14 and UTC-11: never the same date
        cfg = load_config(write_config(tmp_path / tz.replace("/", "_"), {"timezone": tz}, tiny=False))
        fake_native(cfg.checkpoint_dir, 10)
        before = dt.datetime.now(zoneinfo.ZoneInfo(tz)).date()
        names[tz] = take_snapshot(cfg).name
        assert names[tz] in (before.isoformat(), dt.datetime.now(zoneinfo.ZoneInfo(tz)).date().isoformat())
    assert names["Pacific/Kiritimati"] != names["Pacific/Pago_Pago"]
    r = run_py(["-m", "daemon", "check-config", "--json", "--config",
                str(tmp_path / "Pacific_Kiritimati" / "config.yaml")], check=True)
    assert all(t.endswith("+14:00") for t in json.loads(r.stdout)["next_runs"]["snapshot"])


@pytest.mark.slow
def test_status_exits_5_when_the_daemon_is_not_running(tmp_path, daemons):
    d = Daemon(tmp_path, {"training": {"command": [PY, "-c", "import time; time.sleep(3600)"]}}).start()
    daemons.append(d)
    d.wait(lambda s: s["training"]["state"] == "running", what="the start")
    assert run_py(["-m", "daemon", "status", "--config", str(d.cfg)]).returncode == 0
    assert d.stop() == 0
    r = run_py(["-m", "daemon", "status", "--config", str(d.cfg)])
    assert r.returncode == 5 and "daemon NOT RUNNING" in r.stdout.splitlines()[0]
    assert run_py(["-m", "daemon", "status", "--config", str(d.cfg), "--json"]).returncode == 5


@pytest.mark.slow
def test_pin_and_unpin(tmp_path):
    cfg = write_config(tmp_path, {"retention": {"tiers": [{"count": 1}]}}, tiny=False)
    for s in (10, 20, 30):
        fake_native(tmp_path / "checkpoints", s)
    run_py(["-m", "daemon", "pin", "--config", str(cfg), "checkpoint-10", "--reason", "paper"], check=True)
    run_py(["-m", "maintenance.cleanup", "--config", str(cfg), "-y"], check=True)
    assert [e.step for e in cat.scan(tmp_path / "checkpoints", ["checkpoint-{step}"]).entries] == [10, 30]
    r = run_py(["-m", "daemon", "unpin", "--config", str(cfg), "checkpoint-10"], check=True)
    assert "unpinned checkpoint-10" in r.stdout
    run_py(["-m", "maintenance.cleanup", "--config", str(cfg), "-y"], check=True)
    assert [e.step for e in cat.scan(tmp_path / "checkpoints", ["checkpoint-{step}"]).entries] == [30]


@pytest.mark.slow
def test_cleanup_exits_4_when_the_commit_lock_stays_taken_and_130_when_told_no(tmp_path):
    cfg = write_config(tmp_path, {"retention": {"tiers": [{"count": 1}]}}, tiny=False)
    for s in (10, 20, 30):
        fake_native(tmp_path / "checkpoints", s)
    with runtime.commit_lock(tmp_path / "checkpoints"):  # a save that takes its time to commit
        r = run_py(["-m", "maintenance.cleanup", "--config", str(cfg), "-y", "--wait", "1"])
    assert r.returncode == 4 and "Timed out after 1s waiting for the commit lock" in r.stderr
    assert len(cat.scan(tmp_path / "checkpoints", ["checkpoint-{step}"]).entries) == 3
    # on a terminal, answering no
    master, slave = pty.openpty()
    p = subprocess.Popen([PY, "-m", "maintenance.cleanup", "--config", str(cfg)], stdin=slave, stdout=slave,
                         stderr=slave, env=env_for_children(), close_fds=True)
    os.close(slave)
    out = b""
    deadline = time.monotonic() + 60
    while b"[y/N]" not in out:
        assert time.monotonic() < deadline, out
        out += os.read(master, 4096)
    os.write(master, b"n\n")
    assert p.wait(timeout=60) == 130
    os.close(master)
    assert len(cat.scan(tmp_path / "checkpoints", ["checkpoint-{step}"]).entries) == 3


@pytest.mark.slow
def test_retention_disabled_stays_disabled_in_a_disk_emergency(tmp_path, daemons):
    for s in range(10, 110, 10):
        fake_native(tmp_path / "checkpoints", s)
    d = Daemon(tmp_path, {"training": {"command": [PY, "-c", "import time; time.sleep(3600)"]},
                          "retention": {"enabled": False, "tiers": [{"count": 1}]},
                          "disk": {"check_interval_s": 5, "warn_free_gb": 10**7, "emergency_free_gb": 10**7}}).start()
    daemons.append(d)
    s = d.wait(lambda s: (s.get("disk") or {}).get("message") and s, what="the emergency check")
    assert "retention is disabled" in s["disk"]["message"] and "nothing is deleted" in s["disk"]["message"]
    assert "DISK EMERGENCY" in d.log()
    assert len(cat.scan(tmp_path / "checkpoints", ["checkpoint-{step}"]).entries) == 10
    assert not (tmp_path / "logs" / "cleanup.log").exists() or "deleted" not in (tmp_path / "logs" / "cleanup.log").read_text()
    r = run_py(["-m", "daemon", "status", "--config", str(d.cfg)])
    assert "DISK EMERGENCY" in r.stdout and "retention: disabled" in r.stdout
    assert d.stop() == 0


@pytest.mark.slow
def test_a_manual_cleanup_knows_what_the_daemons_own_trainer_resumed_from(tmp_path, daemons):
    root = tmp_path / "checkpoints"
    for s in range(10, 110, 10):
        fake_native(root, s)
    writer = tmp_path / "own_trainer.py"  # takes no lock, writes no heartbeat: any command at all
    writer.write_text(
        "import sys, time\n"
        "sys.path.insert(0, sys.argv[2])\n"
        "from tests.helpers import fake_native\n"
        "from pathlib import Path\n"
        "for s in (110, 120, 130):\n"
        "    fake_native(Path(sys.argv[1]), s)\n"
        "print('saved 130', flush=True)\n"
        "time.sleep(3600)\n")
    d = Daemon(tmp_path, {"training": {"command": [PY, str(writer), str(root), str(Path(__file__).parent.parent)]},
                          "retention": {"tiers": [{"count": 1}]}}).start()
    daemons.append(d)
    d.wait(lambda s: s["training"]["resumed_from"] == "checkpoint-100"
           and "saved 130" in (tmp_path / "logs" / "trainer.log").read_text(), what="the trainer's saves")
    r = run_py(["-m", "maintenance.cleanup", "--config", str(d.cfg), "-y"], check=True)
    assert "Training: ACTIVE" in r.stdout and "resumed from checkpoint-100" in r.stdout
    left = [e.step for e in cat.scan(root, ["checkpoint-{step}"]).entries]
    assert left == [100, 130]
    assert "protected: the daemon resumed training from it" in r.stdout
    assert d.stop() == 0
