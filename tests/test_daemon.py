"""The daemon: its pure decisions as tables, and the real process with short intervals."""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from ckpt_daemon.config import RestartPolicy
from ckpt_daemon.store import catalog as cat
from daemon.jobs import missed
from daemon.notify import Notifier
from daemon.supervisor import CrashPolicy, choose_resume, expand_command
from tests.helpers import PY, Daemon, native, run_py, write_config


def policy(**kw):
    base = dict(initial_backoff_s=1, max_backoff_s=8, healthy_after_s=100, max_crashes=5, crash_window_s=1000,
                same_checkpoint_crashes=2)
    return CrashPolicy(RestartPolicy(**{**base, **kw}))


def test_backoff_doubles_is_capped_and_resets_after_a_healthy_run():
    p = policy(max_crashes=100)
    delays = [p.on_exit(t, 1, 5, None, None).delay_s for t in range(6)]
    assert delays == [0, 1, 2, 4, 8, 8]  # a first crash restarts at once (training.restart.first_restart_immediate)
    v = p.on_exit(10, 1, 500, None, None)  # ran 500 s: healthy
    assert v.delay_s == 0


def test_exit_0_is_finished():
    assert policy().on_exit(0, 0, 5, "checkpoint-10", "checkpoint-10").action == "finished"


def test_repeated_crashes_from_one_checkpoint_fall_back():
    p = policy()
    v1 = p.on_exit(0, 1, 5, "checkpoint-30", "checkpoint-30")
    assert v1.action == "restart" and "checkpoint-30" not in p.suspect
    v2 = p.on_exit(1, 1, 5, "checkpoint-30", "checkpoint-30")
    assert "checkpoint-30" in p.suspect and "falling back" in v2.notes[0]
    # a crash after progress (a newer checkpoint appeared) does not count against it
    p2 = policy()
    p2.on_exit(0, 1, 5, "checkpoint-30", "checkpoint-40")
    p2.on_exit(1, 1, 5, "checkpoint-40", "checkpoint-50")
    assert not p2.suspect


def test_too_many_crashes_in_the_window_gives_up():
    p = policy(max_crashes=3, crash_window_s=60)
    assert p.on_exit(0, 1, 1, None, None).action == "restart"
    assert p.on_exit(100, 1, 1, None, None).action == "restart"  # the first fell out of the window
    assert p.on_exit(110, 1, 1, None, None).action == "restart"
    v = p.on_exit(120, -9, 1, None, None)
    assert v.action == "give_up" and "3 crashes within 60s" in v.notes[-1]


def test_choose_resume_takes_the_highest_that_verifies(tmp_path):
    native(tmp_path, [10, 20, 30])
    c = cat.scan(tmp_path, ["checkpoint-{step}"])
    f = tmp_path / "checkpoint-30" / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-2] ^= 1
    f.write_bytes(bytes(data))
    e, notes = choose_resume(c, exclude={"checkpoint-20"}, known_bad={})
    assert e.name == "checkpoint-10"
    assert any("checkpoint-30 skipped: failed verification" in n for n in notes)
    assert any("checkpoint-20 skipped: the trainer kept crashing" in n for n in notes)
    assert not (tmp_path / "checkpoint-30").exists()  # quarantined, with its reason
    q = list((tmp_path / cat.RUNTIME_DIR / "quarantine").glob("checkpoint-30.*.reason"))
    assert q and "checksum" in q[0].read_text()


def test_command_placeholders():
    argv = expand_command(["{python}", "train.py", "--cfg", "{config}", "--resume={resume}"], Path("/c/config.yaml"),
                          "/ck/checkpoint-5")
    assert argv == [sys.executable, "train.py", "--cfg", "/c/config.yaml", "--resume=/ck/checkpoint-5"]


def test_missed_run_detection():
    tz = "UTC"
    ts = lambda *a: dt.datetime(*a, tzinfo=dt.timezone.utc).timestamp()  # noqa: E731
    # last snapshot yesterday 03:00, now today 10:00: today's 03:00 was missed
    assert missed("0 3 * * *", tz, ts(2026, 11, 21, 3, 0), ts(2026, 11, 22, 10, 0)).day == 22
    # last snapshot today 03:00: nothing missed
    assert missed("0 3 * * *", tz, ts(2026, 11, 22, 3, 0), ts(2026, 11, 22, 10, 0)) is None
    # weekly Sunday retention: last ran Sunday the 15th, now Monday the 23rd: Sunday the 22nd was missed
    m = missed("0 4 * * 0", tz, ts(2026, 11, 15, 4, 0), ts(2026, 11, 23, 9, 0))
    assert m is not None and m.weekday() == 6 and m.day == 22


def test_notify_protocol_against_our_own_socket(tmp_path, monkeypatch):
    path = str(tmp_path / "notify.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    srv.bind(path)
    srv.settimeout(2)
    monkeypatch.setenv("WATCHDOG_USEC", "4000000")
    n = Notifier(path)
    assert n.watchdog_interval_s == 2.0
    assert n.ready("up")
    assert srv.recv(1024) == b"READY=1\nSTATUS=up"
    n.watchdog()
    assert srv.recv(1024) == b"WATCHDOG=1"
    n.status("line one\nline two")
    assert srv.recv(1024) == b"STATUS=line one line two"
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert Notifier().send(READY="1") is False  # not under systemd: a no-op


def test_the_daemon_never_imports_torch():
    code = ("import sys; import daemon.cli, daemon.core, daemon.supervisor, daemon.jobs, daemon.watch, "
            "maintenance.cleanup, maintenance.snapshot, maintenance.restore, ckpt_daemon, ckpt_daemon.config, "
            "ckpt_daemon.store.catalog, ckpt_daemon.runtime, ckpt_daemon.store.manifest, ckpt_daemon.fsutil, ckpt_daemon.logs; "
            "assert 'torch' not in sys.modules, 'torch was imported'; print('ok')")
    assert run_py(["-c", code], check=True).stdout.strip() == "ok"


def test_unit_file_renders_and_verifies(tmp_path):
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed on this machine (CI installs it)")
    cfg = write_config(tmp_path, tiny=False)
    user = "ckptd-unit-test"
    made = subprocess.run(["useradd", "--system", "--no-create-home", user], capture_output=True).returncode == 0
    try:
        r = run_py(["-m", "daemon", "install-unit", "--config", str(cfg), "--user", user, "--output",
                    str(tmp_path / "ckpt-daemon.service"),
                    "--read-write", str(tmp_path / "hf-cache")], check=True)
        assert "systemctl daemon-reload" in r.stdout
        unit = (tmp_path / "ckpt-daemon.service").read_text()
        for needle in ("Type=notify", "WatchdogSec=", "Restart=on-failure", "RestartPreventExitStatus=4",
                       "KillMode=mixed",
                       "NoNewPrivileges=yes",
                       "ProtectSystem=strict", "PrivateTmp=yes", f"User={user}", str(tmp_path / "checkpoints"),
                       f"--config {cfg}", "TimeoutStopSec=150", f"-{tmp_path / 'hf-cache'}", "/.cache"):
            assert needle in unit, needle
        assert unit.index("StartLimitBurst") < unit.index("[Service]")
        v = subprocess.run(["systemd-analyze", "verify", str(tmp_path / "ckpt-daemon.service")], capture_output=True,
                           text=True)
        assert v.returncode == 0, v.stderr
    finally:
        if made:
            subprocess.run(["userdel", user], capture_output=True)


# ---------------------------------------------------------------------------------- the real daemon


@pytest.mark.slow
def test_sigkill_of_the_trainer_restarts_it_from_the_highest_valid_checkpoint(tmp_path, daemons):
    d = Daemon(tmp_path).start()
    daemons.append(d)
    d.wait(lambda s: (d.step(s) or 0) >= 50, what="training to reach step 50")
    pid = d.status()["training"]["pid"]
    os.kill(pid, signal.SIGSTOP)  # freeze it so "highest valid" is well defined when it dies
    newest = cat.scan(tmp_path / "checkpoints", ["checkpoint-{step}"]).newest_valid()
    os.kill(pid, signal.SIGKILL)
    s = d.wait(lambda s: s["training"]["pid"] not in (None, pid) and d.step(s) and d.step(s) > newest.step and s,
               what="a restarted trainer past the checkpoint")
    assert s["training"]["resumed_from"] == newest.name
    assert s["training"]["restarts"] == 1
    assert s["training"]["last_crash"]["description"] == "signal SIGKILL"
    assert "trainer crashed" in d.log() and "restarting after backoff" in d.log()
    trainer_log = (tmp_path / "logs" / "trainer.log").read_text()
    assert f"CKPT_RESUME={newest.path}" in trainer_log and f"resumed from {newest.name}" in trainer_log
    assert d.stop() == 0


@pytest.mark.slow
def test_corrupt_newest_then_kill_resumes_from_the_one_before(tmp_path, daemons):
    d = Daemon(tmp_path).start()
    daemons.append(d)
    d.wait(lambda s: (d.step(s) or 0) >= 70, what="three checkpoints")
    pid = d.status()["training"]["pid"]
    os.kill(pid, signal.SIGSTOP)
    valid = cat.scan(tmp_path / "checkpoints", ["checkpoint-{step}"]).valid()
    newest, previous = valid[-1], valid[-2]
    f = newest.path / "state.safetensors"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x10
    f.write_bytes(bytes(data))
    os.kill(pid, signal.SIGKILL)
    s = d.wait(lambda s: s["training"]["resumed_from"] == previous.name and d.step(s) and s,
               what=f"resume from {previous.name}")
    assert s["training"]["resumed_from"] == previous.name
    assert f"{newest.name}" in d.log() and "failed verification" in d.log()
    # quarantined (not deleted): never chosen again, and the resumed run writes that step anew
    q = tmp_path / "checkpoints" / cat.RUNTIME_DIR / "quarantine"
    assert any(p.name.startswith(newest.name + ".") and p.name.endswith(".reason") for p in q.iterdir())
    d.wait(lambda s: (d.step(s) or 0) > newest.step + 20, what="training past the corrupt step")
    assert cat.scan(tmp_path / "checkpoints", ["checkpoint-{step}"], verify=True).by_name(newest.name).valid
    assert d.stop() == 0


@pytest.mark.slow
def test_sigterm_makes_the_trainer_save_and_both_exit_0(tmp_path, daemons):
    d = Daemon(tmp_path, {"trainer": {"checkpoint_every_steps": 100000, "eval_every_steps": 100000}}).start()
    daemons.append(d)
    d.wait(lambda s: (d.step(s) or 0) >= 30, what="step 30")
    before = {e.name for e in cat.scan(tmp_path / "checkpoints", ["checkpoint-{step}"]).entries}  # epoch ends only
    assert d.stop(signal.SIGTERM) == 0
    from tests.helpers import read_losses

    last_step = max(read_losses(tmp_path / "logs" / "metrics.jsonl"))
    c = cat.scan(tmp_path / "checkpoints", ["checkpoint-{step}"], verify=True)
    final = c.newest_valid()
    assert final.name not in before and final.step == last_step  # saved at the very step it stopped
    assert all(e.valid for e in c.entries)
    log = d.log()
    assert "trainer stopped" in log and '"returncode": 143' in log  # saved, then exited as SIGTERM asks: stopped, not finished
    assert "stopped by signal" in (tmp_path / "logs" / "trainer.log").read_text()
    assert d.status()["training"]["state"] == "stopped"


@pytest.mark.slow
def test_config_edits_are_hot_reloaded_and_broken_ones_are_rejected(tmp_path, daemons):
    # The disk guard runs retention every 5 s while "free space" is below this absurd threshold,
    # so the tiers in force are visible in what gets deleted.
    over = {"disk": {"check_interval_s": 5, "warn_free_gb": 10**7, "emergency_free_gb": 10**7},
            "retention": {"tiers": [{"count": 1000}]}}
    d = Daemon(tmp_path, over).start()
    daemons.append(d)
    d.wait(lambda s: s["checkpoints"]["count"] >= 8, what="8 checkpoints")
    assert "deleted" not in (tmp_path / "logs" / "cleanup.log").read_text()  # keep-all tiers: nothing deleted
    data = yaml.safe_load(d.cfg.read_text())
    data["retention"]["tiers"] = [{"count": 2}, {"every_steps": 100}]
    tmp = d.cfg.with_name("config.yaml.new")
    tmp.write_text(yaml.safe_dump(data))
    os.replace(tmp, d.cfg)  # as editors save
    d.wait(lambda s: "config.yaml reloaded" in d.log(), what="the reload")
    assert "retention.tiers" in d.log()
    d.wait(lambda s: "tier 2 (all older: one per 100 steps)" in (tmp_path / "logs" / "cleanup.log").read_text(),
           what="retention with the new tiers")
    assert "deleted checkpoint-" in (tmp_path / "logs" / "cleanup.log").read_text()
    # a broken edit: the daemon keeps running with the last good config and says what is wrong
    d.cfg.write_text(d.cfg.read_text().replace("every_steps: 100", "every_steps: -5"))
    d.wait(lambda s: s["daemon"]["config_error"], what="the rejection")
    s = d.status()
    assert "retention.tiers[1].every_steps" in s["daemon"]["config_error"]
    assert "config.yaml edit rejected" in d.log() and "retention.tiers[1].every_steps" in d.log()
    assert d.proc.poll() is None and s["training"]["state"] == "running"
    n = (tmp_path / "logs" / "cleanup.log").read_text().count("=== ")
    d.wait(lambda s: (tmp_path / "logs" / "cleanup.log").read_text().count("=== ") > n, what="another retention run")
    assert "one per 100 steps" in (tmp_path / "logs" / "cleanup.log").read_text().split("=== ")[-1]  # old good tiers
    assert d.stop() == 0


@pytest.mark.slow
def test_a_missed_0300_snapshot_is_taken_once_at_start(tmp_path, daemons):
    (tmp_path / "logs").mkdir()
    two_days_ago = time.time() - 2 * 86400
    (tmp_path / "logs" / "jobs-state.json").write_text(json.dumps({"created": two_days_ago}))
    native(tmp_path / "checkpoints", [10])
    d = Daemon(tmp_path, {"training": {"command": [PY, "-c", "import time; time.sleep(3600)"]}}).start()
    daemons.append(d)
    today = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
    d.wait(lambda s: (tmp_path / "snapshots" / today / "snapshot.json").exists(), what="the catch-up snapshot")
    assert "catching up a run missed while the daemon was down" in d.log()
    # today is due for both jobs when the last run was two days ago (the weekly one too on a Sunday)
    d.wait(lambda s: s["jobs"]["history"]["snapshot"]["last_result"] == "ok", what="the job record")
    due = [j for j in ("snapshot", "retention") if f'"job": "{j}"' in d.log() and "catching up" in d.log()]
    d.wait(lambda s: all(s["jobs"]["history"].get(j, {}).get("last_result") == "ok" for j in due),
           what="all catch-ups recorded")
    assert d.stop() == 0

    def catchups(text):
        return sum(1 for line in text.splitlines() if "catching up" in line and '"job": "snapshot"' in line)

    assert catchups(d.log()) == 1
    # started again the same day: nothing is due, nothing runs twice
    log_before = d.log().count("catching up")
    d2 = Daemon(tmp_path, {"training": {"command": [PY, "-c", "import time; time.sleep(3600)"]}}).start()
    daemons.append(d2)
    d2.wait(lambda s: s["daemon"]["pid"] == d2.proc.pid, what="the second daemon's state")
    d2.wait(lambda s: "startup jobs done" in d2.log().split("ckpt-daemon starting")[-1], what="its startup jobs")
    assert d2.log().count("catching up") == log_before
    assert d2.stop() == 0


@pytest.mark.slow
def test_a_crash_loop_backs_off_then_gives_up(tmp_path, daemons):
    d = Daemon(tmp_path, {"training": {"command": [PY, "-c", "import sys; print('boom: bad data'); sys.exit(3)"],
                                       "restart": {"initial_backoff_s": 0.2, "max_backoff_s": 0.8,
                                                   "max_crashes": 4}}}).start()
    daemons.append(d)
    s = d.wait(lambda s: s["training"]["state"] == "gave_up" and s, what="giving up")
    assert s["training"]["restarts"] == 3 and s["training"]["last_crash"]["returncode"] == 3
    assert "boom: bad data" in s["training"]["last_crash"]["tail"]
    delays = [json.loads(line)["delay_s"] for line in d.log().splitlines() if "restarting after backoff" in line]
    assert delays == [0, 0.2, 0.4]
    assert "not restarting training" in d.log() and "4 crashes within" in d.log()
    r = run_py(["-m", "daemon", "status", "--config", str(d.cfg)])
    assert "training: gave_up" in r.stdout and "exit code 3" in r.stdout
    assert d.proc.poll() is None  # the daemon itself stays up
    assert d.stop() == 0


@pytest.mark.slow
def test_daemon_is_small_and_signals_ready_to_systemd(tmp_path, daemons):
    sock_path = str(tmp_path / "notify.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    srv.bind(sock_path)
    srv.settimeout(30)
    d = Daemon(tmp_path, {"training": {"command": [PY, "-c", "import time; time.sleep(3600)"]}},
               env={"NOTIFY_SOCKET": sock_path, "WATCHDOG_USEC": "1000000"}).start()
    daemons.append(d)
    msgs = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not ({"READY=1", "WATCHDOG=1"} <= set(m.split("\n")[0] for m in msgs)
                                               and any(m.startswith("STATUS=training running") for m in msgs)):
        msgs.append(srv.recv(4096).decode())
    assert any(m.startswith("READY=1") for m in msgs) and "WATCHDOG=1" in msgs
    assert any(m.startswith("STATUS=training running") for m in msgs)
    import psutil

    rss = psutil.Process(d.proc.pid).memory_info().rss
    assert rss < 120 * 2**20, f"daemon RSS {rss / 2**20:.0f} MiB"
    maps = Path(f"/proc/{d.proc.pid}/maps").read_text()
    assert "libtorch" not in maps
    assert d.stop() == 0
    srv.settimeout(0.5)
    tail = []
    try:
        while True:
            tail.append(srv.recv(4096).decode())
    except TimeoutError:
        pass
    assert "STOPPING=1" in tail


@pytest.mark.slow
def test_restart_with_a_broken_config_runs_on_the_last_good_one(tmp_path, daemons):
    cmd = {"training": {"command": [PY, "-c", "import time; time.sleep(3600)"]}}
    # never validated: a broken file at the very first start is a clear error
    (tmp_path / "config.yaml").write_text("retention:\n  tiers: [{count: -1}]\n")
    r = run_py(["-m", "daemon", "run", "--config", str(tmp_path / "config.yaml")], timeout=60)
    assert r.returncode == 2 and "retention.tiers[0].count" in r.stderr and "No last good config" in r.stderr
    d = Daemon(tmp_path, cmd).start()
    daemons.append(d)
    d.wait(lambda s: s["training"]["state"] == "running", what="the first start")
    assert d.stop() == 0
    assert (tmp_path / "logs" / "config.last-good.yaml").exists()
    d.cfg.write_text(d.cfg.read_text() + "\nretention: {tiers: [{count: -1}]}\n")  # broken while the daemon is down
    d.start()
    s = d.wait(lambda s: s["daemon"]["pid"] == d.proc.pid and s["training"]["state"] == "running" and s,
               what="a start on the last good config")
    assert "retention" in s["daemon"]["config_error"]
    assert "running with the last good config until it is fixed" in d.log()
    good = yaml.safe_load((tmp_path / "logs" / "config.last-good.yaml").read_text())
    d.cfg.write_text(yaml.safe_dump(good))  # fixed: picked up without a restart
    d.wait(lambda s: s["daemon"]["config_error"] is None, what="the fix to be picked up")
    assert d.stop() == 0


def test_trainer_log_rotates_by_size(tmp_path):
    from daemon.logrelay import Log

    w = Log(str(tmp_path / "trainer.log"), max_bytes=1024, backups=2)
    for i in range(100):
        w.write(f"line {i:04d} ".encode() * 5 + b"\n")
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["trainer.log", "trainer.log.1", "trainer.log.2"]
    assert all((tmp_path / f).stat().st_size <= 1024 for f in files)
    assert (tmp_path / "trainer.log").read_text().rstrip().endswith("line 0099")


@pytest.mark.slow
def test_a_trainer_whose_heartbeat_stops_is_restarted(tmp_path, daemons):
    d = Daemon(tmp_path, {"training": {"command": [PY, "-c", "import time; time.sleep(3600)"],  # never beats
                                       "stop_timeout_s": 2,
                                       "restart": {"heartbeat_timeout_s": 2, "heartbeat_grace_s": 2,
                                                   "initial_backoff_s": 0.2}}}).start()
    daemons.append(d)
    s = d.wait(lambda s: s["training"]["restarts"] >= 1 and s, what="a restart for a stale heartbeat")
    assert "trainer heartbeat is stale" in d.log()
    assert s["training"]["last_crash"]["description"] == "signal SIGTERM (its heartbeat went stale)"
    assert s["training"]["last_crash"]["kind"] == "heartbeat"
    assert d.stop() == 0
