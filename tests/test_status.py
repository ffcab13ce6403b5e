"""What `ckpt-daemon status` says, and the same figures in its JSON, the dashboard's data and /metrics:
the disk as `df` shows it (on real filesystems, one with blocks reserved for root), the trainer's last
output in a crash report (progress bars, escape sequences), an old crash after a run that went fine, a
crash loop whatever the moment's state, a broken config said once, a policy confirmed by `cleanup -y`."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from ckpt_daemon.fsutil import disk_usage
from daemon.outputtail import OutputTail
from daemon.statusview import render, verdict
from tests.helpers import PY, Daemon, run_py, seed_history, write_config

SLEEPER = [PY, "-c", "import time; time.sleep(3600)"]


@pytest.fixture
def ext4(tmp_path):
    """A real loop-mounted ext4 with `reserved_percent` of its blocks reserved for root (mkfs -m)."""
    mounted = []

    def make(size: str = "64M", reserved_percent: int = 50) -> Path:
        if os.geteuid() != 0 or shutil.which("mkfs.ext4") is None:
            pytest.skip("an ext4 loop mount needs root and mkfs.ext4 (e2fsprogs); this machine lacks them")
        img, d = tmp_path / f"ext4-{len(mounted)}.img", tmp_path / f"ext4-{len(mounted)}"
        d.mkdir()
        subprocess.run(["truncate", "-s", size, str(img)], check=True)
        subprocess.run(["mkfs.ext4", "-q", "-m", str(reserved_percent), str(img)], check=True, capture_output=True)
        r = subprocess.run(["mount", "-o", "loop", str(img), str(d)], capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"this machine cannot loop-mount ext4: {r.stderr.strip()}")
        mounted.append(d)
        return d

    yield make
    for d in mounted:
        if subprocess.run(["umount", str(d)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(d)], check=False)


def df(path: Path) -> tuple[int, str]:
    """(Use% as an integer, mount point) as df(1) prints them."""
    out = subprocess.run(["df", "--output=pcent,target", str(path)], capture_output=True, text=True, check=True).stdout
    pcent, target = out.splitlines()[1].split(None, 1)
    return int(pcent.rstrip("%")), target.strip()


def statvfs_figures(path: Path) -> tuple[int, int, int]:
    st = os.statvfs(path)
    return st.f_blocks * st.f_frsize, (st.f_blocks - st.f_bfree) * st.f_frsize, st.f_bavail * st.f_frsize


# ------------------------------------------------------------------------------------ 1. disk
def test_disk_use_is_what_df_shows_on_tmpfs_and_on_ext4_with_reserved_blocks(tmpfs, ext4):
    t = tmpfs("16m")
    (t / "known").write_bytes(b"x" * (4 << 20))  # 4 MiB of 16: tmpfs counts exactly the pages written
    u = disk_usage(t / "not" / "made" / "yet")  # the nearest existing folder's filesystem
    total, used, avail = statvfs_figures(t)
    assert (u.total, u.used, u.avail) == (total, used, avail) and u.used == 4 << 20
    assert u.reserved == 0 and u.mount == str(t)
    assert u.used_percent == 25 and (u.used_percent, u.mount) == df(t)

    e = ext4("64M", reserved_percent=50)
    (e / "known").write_bytes(b"y" * (8 << 20))
    os.sync()
    u = disk_usage(e / "checkpoints")
    total, used, avail = statvfs_figures(e)
    assert (u.total, u.used, u.avail) == (total, used, avail)
    assert u.reserved > 0.45 * u.total  # half the blocks are root's: neither used nor available
    assert u.used_percent == -(-used * 100 // (used + avail))
    assert (u.used_percent, u.mount) == df(e)
    old_figure = 100 * (1 - avail / total)  # what status said: 1 - available / size
    assert old_figure - u.used_percent > 30


@pytest.mark.slow
def test_status_its_json_the_dashboard_and_metrics_show_the_disk_as_df(tmp_path, ext4, daemons):  # noqa: F811
    from tests.helpers import free_port, parse, scrape, wait_listening

    e = ext4("64M", reserved_percent=50)
    (e / "known").write_bytes(b"z" * (8 << 20))
    port = free_port()
    d = Daemon(tmp_path, {"checkpoints": {"dir": str(e / "checkpoints")}, "training": {"command": SLEEPER},
                          "http": {"enabled": True, "port": port}}).start()
    daemons.append(d)
    s = d.wait(lambda s: s["training"]["state"] == "running" and s["disk"].get("checked") and s, what="the disk check")
    wait_listening(port)
    disk = s["disk"]
    pct, mount = df(e)
    total, used, avail = statvfs_figures(e)
    r = run_py(["-m", "daemon", "status", "--config", str(d.cfg)])
    shown = re.search(r"disk (\d+)% used on (\S+)", r.stdout.splitlines()[0])
    assert shown and abs(int(shown[1]) - pct) <= 1 and shown[2] == mount, r.stdout
    # the daemon's own figures hold together, and are df's (the daemon writes a few KiB there since it measured)
    assert disk.get("used_percent") == -(-disk["used_bytes"] * 100 // (disk["used_bytes"] + disk["free_bytes"]))
    assert abs(disk["used_percent"] - pct) <= 1 and disk["mount"] == mount == str(e)
    assert disk["total_bytes"] == total and abs(disk["used_bytes"] - used) < 1 << 20
    assert disk["reserved_bytes"] > 0.45 * total
    assert f"disk {disk['used_percent']}% used on {e}" in r.stdout.splitlines()[0], r.stdout
    assert f"{disk['used_percent']}% used" in next(x for x in r.stdout.splitlines() if x.startswith("disk:"))
    j = json.loads(run_py(["-m", "daemon", "status", "--config", str(d.cfg), "--json"]).stdout)
    assert j["disk"]["used_percent"] == disk["used_percent"] and j["disk"]["mount"] == str(e)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/dashboard", timeout=20) as resp:
        dash = json.loads(resp.read())
    assert dash["disk"]["now"]["used_percent"] == disk["used_percent"] and dash["verdict"]["line"].count("% used") == 1
    assert f"disk {disk['used_percent']}% used" in dash["verdict"]["line"]
    sample = dash["disk"]["history"][-1]  # the chart over time: df's used and available too
    assert abs(sample["used"] - used) < 1 << 20 and abs(sample["free"] - avail) < 1 << 20
    m = parse(scrape(f"http://127.0.0.1:{port}/metrics"))
    assert abs(m[("ckpt_daemon_disk_used_ratio", ())] - used / (used + avail)) < 0.01
    assert m[("ckpt_daemon_disk_info", (("mountpoint", str(e)),))] == 1
    assert d.stop() == 0
    # cleanup's report counts the disk as df does too
    r = run_py(["-m", "maintenance.cleanup", "--config", str(d.cfg), "--dry-run"])
    shown = re.search(r"^Disk: .* free of .* \((\d+)% used, as df shows it\)$", r.stdout, re.M)
    assert shown and abs(int(shown[1]) - df(e)[0]) <= 1, r.stdout


# ------------------------------------------------------------------------------------ 3. noise
def test_the_last_output_keeps_real_lines_collapses_progress_and_makes_control_characters_inert():
    t = OutputTail(keep=6, line_max=80, pending_max=4096)
    t.feed(b"\x1b[32mINFO\x1b[0m start\n\n")
    for i in range(5000):  # a progress bar redrawn 5000 times on one line, arriving in pieces
        t.feed(f"\rloading {i * 100 // 4999:3d}%|{'#' * (i * 10 // 4999):10}|".encode())
    t.feed(b"\n")
    t.feed(b"\x1b]0;set the title\x07 ok \x07\x08 \xc2\x9b2J\n")
    assert list(t.lines) == ["INFO start", "loading 100%|##########|", " ok \\x07\\x08 \\x9b2J"]
    t.feed(b"\repoch 2 1/9\repoch 2 5/9")  # a bar still being drawn when the trainer died
    assert t.last(2) == [" ok \\x07\\x08 \\x9b2J", "epoch 2 5/9"]
    t.feed(b"\n" + b"w" * 100_000 + b"\nafter\n")  # a line that never seemed to end: bounded, the next one whole
    assert t.last(2) == ["w" * 79 + "…", "after"] and len(t.lines) <= 6


NOISY = r"""
import os, sys, time
marker = sys.argv[1]
if os.path.exists(marker):
    time.sleep(3600)  # the restarted trainer runs fine
open(marker, "w").close()
w = sys.stdout.write
w("\x1b[1;32mINFO\x1b[0m starting\n")
for i in range(20001):
    w(f"\rtraining {i * 100 // 20000:3d}%|{'#' * (i * 20 // 20000):20}| {i}/20000")
w("\n")
for i in range(300):
    w(f"\repoch 2 {i}/300")
w("\n")
sys.stdout.flush()
sys.stderr.write("Traceback (most recent call last):\n  File \"train.py\", line 9, in <module>\n"
                 "RuntimeError: \x1b]0;owned\x07boom \x1b[2J\x07\n")
sys.exit(1)
"""


@pytest.mark.slow
def test_a_crash_report_shows_real_lines_then_an_old_crash_is_history(tmp_path, daemons):  # noqa: F811
    script = tmp_path / "noisy.py"
    script.write_text(NOISY)
    d = Daemon(tmp_path, {"training": {"command": [PY, str(script), str(tmp_path / "crashed-once")],
                                       "restart": {"healthy_after_s": 3}}}).start()
    daemons.append(d)
    s = d.wait(lambda s: s["training"]["restarts"] == 1 and s["training"]["state"] == "running" and s,
               what="the crash and the restart")
    crash = s["training"]["crashes"][-1]
    tail = crash["tail"]
    assert tail[0].startswith("--- ") and "ckpt-daemon starts" in tail[0]  # the daemon's own line before the run's
    assert tail[1:] == ["INFO starting", "training 100%|####################| 20000/20000", "epoch 2 299/300",
                    "Traceback (most recent call last):", '  File "train.py", line 9, in <module>',
                    "RuntimeError: boom \\x07"], tail
    logged = [json.loads(x) for x in d.log().splitlines() if '"trainer crashed"' in x]
    assert logged[-1]["last_output"] == tail  # a list of real lines, not one escaped string
    shown = render({**s, "training": {**s["training"], "last_crash": crash}}, True, crash["time"] + 1)
    text = [line for _, line in shown]
    start = next(i for i, x in enumerate(text) if x.startswith("last crash: exit code 1"))
    assert text[start + 1:start + 1 + len(tail)] == [f"    | {x}" for x in tail]
    assert not any(c in "".join(text) for c in "\r\x1b\x07")
    # once the restarted trainer has run healthy_after_s, the crash is history: not shown as what is wrong now
    d.wait(lambda s: s["training"]["last_crash"].get("resolved"), what="the restarted run to be healthy")
    r = run_py(["-m", "daemon", "status", "--config", str(d.cfg)])
    assert "last crash:" not in r.stdout and "    | " not in r.stdout, r.stdout
    assert "earlier crash: exit code 1" in r.stdout and r.stdout.startswith("training OK")
    assert d.stop() == 0
    r = run_py(["-m", "daemon", "status", "--config", str(d.cfg)])
    assert "last crash:" not in r.stdout and "earlier crash: exit code 1" in r.stdout, r.stdout
    assert "until the daemon stopped it" in r.stdout


@pytest.mark.slow
def test_after_a_clean_stop_the_crash_before_is_not_current(tmp_path, daemons):  # noqa: F811
    # the run after the crash is stopped long before healthy_after_s: its clean stop is what ends the story
    script = tmp_path / "noisy.py"
    script.write_text(NOISY)
    d = Daemon(tmp_path, {"training": {"command": [PY, str(script), str(tmp_path / "crashed-once")]}}).start()
    daemons.append(d)
    d.wait(lambda s: s["training"]["restarts"] == 1 and s["training"]["state"] == "running", what="the restart")
    r = run_py(["-m", "daemon", "status", "--config", str(d.cfg)])
    assert "last crash: exit code 1" in r.stdout  # while the new run is young, the crash is news
    assert d.stop() == 0
    r = run_py(["-m", "daemon", "status", "--config", str(d.cfg)])
    assert "last crash:" not in r.stdout and "earlier crash: exit code 1" in r.stdout, r.stdout


@pytest.mark.slow
def test_a_crash_while_stopping_is_still_shown(tmp_path, daemons):  # noqa: F811
    # the daemon stopped in the backoff after a crash: no run went fine since, the crash stays current
    d = Daemon(tmp_path, {"training": {"command": [PY, "-c", "import sys; print('bad data'); sys.exit(3)"],
                                       "restart": {"initial_backoff_s": 30, "max_backoff_s": 30,
                                                   "first_restart_immediate": False}}}).start()
    daemons.append(d)
    d.wait(lambda s: s["training"]["state"] == "backoff", what="the backoff")
    assert d.stop() == 0
    r = run_py(["-m", "daemon", "status", "--config", str(d.cfg)])
    assert "last crash: exit code 3" in r.stdout and "    | bad data" in r.stdout, r.stdout


@pytest.mark.slow
def test_a_broken_config_is_said_once_in_status(tmp_path, daemons):  # noqa: F811
    d = Daemon(tmp_path, {"training": {"command": SLEEPER}}).start()
    daemons.append(d)
    d.wait(lambda s: s["training"]["state"] == "running", what="the start")
    d.cfg.write_text(d.cfg.read_text() + "\nretention: {tiers: [{count: -1}]}\n")
    d.wait(lambda s: s["daemon"]["config_error"], what="the daemon's rejection")
    r = run_py(["-m", "daemon", "status", "--config", str(d.cfg)])
    both = r.stdout + r.stderr
    assert both.count("retention.tiers[0].count") == 1, both
    assert "is BROKEN" in r.stdout and "CONFIG NOT IN FORCE" in r.stdout.splitlines()[0]
    assert d.stop() == 0


def test_cleanup_y_says_it_confirmed_the_policy_and_status_no_longer_warns(tmp_path):
    typo = {"retention": {"tiers": [{"count": 20}, {"count": 20, "every_steps": 200}, {"every_steps": 1000000}]}}
    cfg_path = write_config(tmp_path, typo, tiny=False)
    seed_history(tmp_path / "checkpoints")
    r = run_py(["-m", "maintenance.cleanup", "--config", str(cfg_path), "-y", "-q"], check=True)
    block = (tmp_path / "logs" / "cleanup.log").read_text().split("=== ")[-1]
    for text in (r.stdout, block):
        assert "until you run this command" not in text and "confirmed now (cleanup -y)" in text, text
    # the daemon's last unattended run held deletions under the policy then unconfirmed; confirmed since:
    s = {"training": {"state": "running"}, "checkpoints": {}, "disk": {}, "daemon": {},
         "retention": {"enabled": True, "policy_confirmed": True},
         "last_cleanup": {"time": 0, "reason": "weekly schedule", "deleted": 0, "kept": 170, "freed_bytes": 0,
                          "held": 13}}
    level, line = verdict(s, True, 100)
    assert level == "ok" and "HELD" not in line
    assert "HELD" not in "\n".join(x for _, x in render(s, True, 100))
    unconfirmed = {**s, "retention": {"enabled": True, "policy_confirmed": False}}
    level, line = verdict(unconfirmed, True, 100)
    assert level == "warn" and "13 deletions HELD" in line


# ------------------------------------------------------------------------------------ 4. crash loops
@pytest.mark.slow
def test_a_trainer_that_dies_at_every_start_is_a_crash_loop_whatever_the_moment(tmp_path, tmpfs, daemons):  # noqa: F811
    # memory checkpoints on a tmpfs too small for two copies of the state: the trainer exits 2 at every start
    region = tmpfs("1m") / "region"
    d = Daemon(tmp_path, {"checkpoints": {"memory": {"enabled": True, "dir": str(region)}},
                          "training": {"restart": {"initial_backoff_s": 0.2, "max_backoff_s": 0.5, "max_crashes": 50}}})
    d.start()
    daemons.append(d)
    s = d.wait(lambda s: s["training"]["state"] == "running" and s["training"]["restarts"] >= 2 and s, timeout=180,
               what="a trainer running again after two crashes")
    level, line = verdict(s, True, time.time())
    assert level == "bad" and "training OK" not in line and re.search(r"CRASH LOOP \(\d+ crashes in 10\.0m\)",
                                                                      line), line
    assert s["training"]["last_crash"]["returncode"] == 2 and s["training"]["recent_crashes"] >= 2
    r = run_py(["-m", "daemon", "status", "--config", str(d.cfg)])
    assert "CRASH LOOP" in r.stdout.splitlines()[0] and "training OK" not in r.stdout, r.stdout
    assert "Memory checkpoints are refused" in r.stdout  # why, in its last output
    assert d.stop() == 0


# ------------------------------------------------------------------------------------ 2. the trainer's metrics
@pytest.mark.slow
def test_the_newest_metrics_are_read_incrementally_and_bounded(tmp_path):
    from daemon.trainmetrics import NewestMetrics

    p = tmp_path / "metrics.jsonl"
    nm = NewestMetrics(p)
    assert nm.update() == {"values": {}, "time": None}  # no file yet
    with open(p, "w") as f:
        for s in range(1, 101):
            f.write(json.dumps({"step": s, "loss": 3 - s / 100, **({"val_loss": s / 10} if s % 50 == 0 else {}),
                                "time": 1000 + s}) + "\n")
        f.write('{"step": 101, "loss": 0.5')  # being written
    v = nm.update()
    assert v["values"]["loss"] == {"value": 2.0, "step": 100, "time": 1100.0}
    assert v["values"]["val_loss"] == {"value": 10.0, "step": 100, "time": 1100.0} and v["time"] == 1100.0
    offset = nm.offset
    with open(p, "a") as f:
        f.write(', "time": 1101}\n' + json.dumps({"step": 102, "loss": float("inf"), "n": 1e400}) + "\n")
        f.write(json.dumps({"step": 103, **{f"m{i}": i for i in range(100)}}) + "\n")
        f.write('{"step": 104, "loss": ' + "[" * 100_000 + "\n")
    v = nm.update()
    assert nm.offset > offset and v["values"]["loss"]["value"] == 0.5 and v["values"]["loss"]["step"] == 101
    assert v["values"]["val_loss"]["step"] == 100  # a validation metric is known between its lines
    assert len(v["values"]) == NewestMetrics.MAX_NAMES  # loss, val_loss and the first 30 of the 100 others
    # a file rotated away and started anew: its lines replace what was known
    p.unlink()
    p.write_text(json.dumps({"step": 1, "loss": 4.0}) + "\n")
    assert nm.update()["values"] == {"loss": {"value": 4.0, "step": 1, "time": None}}
    # a file grown by more than a call reads: only its newest part is read
    with open(p, "a") as f:
        for s in range(2, 200_000):
            f.write(json.dumps({"step": s, "loss": 1 / s}) + "\n")
    v = nm.update()
    assert v["values"]["loss"]["step"] == 199_999 and p.stat().st_size > NewestMetrics.MAX_READ


def test_the_crash_count_in_the_window_and_when_a_loop_is_over(tmp_path):
    from ckpt_daemon.config import load_config
    from daemon.supervisor import Supervisor

    cfg = load_config(write_config(tmp_path, {"training": {"restart": {"crash_window_s": 100, "healthy_after_s": 50,
                                                                       "max_crashes": 10}}}))
    now = [1000.0]
    sup = Supervisor(lambda: cfg, {}, clock=lambda: now[0], echo=False)
    for t in (1000.0, 1010.0, 1020.0):  # three quick crashes
        now[0] = t
        sup.policy.on_exit(t, 2, 3.0, None, None)
        sup.last_crash = {"time": t, "description": "exit code 2", "ran_s": 3.0, "tail": []}
    sup.state, sup.started_at = "running", 1021.0
    now[0] = 1030.0
    s = sup.snapshot()
    assert s["recent_crashes"] == 3 and s["crash_window_s"] == 100 and not s["last_crash"].get("resolved")
    assert verdict({"training": s}, True, now[0])[0] == "bad"
    sup.started_at = 1101.0  # (say it started anew)
    now[0] = 1105.0  # the first crash left the window; the running trainer is young
    assert sup.snapshot()["recent_crashes"] == 2
    now[0] = 1152.0  # ... but a trainer running longer than healthy_after_s ends the loop
    s = sup.snapshot()
    assert s["recent_crashes"] == 0 and s["last_crash"]["resolved"] and s["last_crash"]["resolved_at"] == 1151.0
    assert sup.snapshot() == s  # worded and timed without the clock: an idle daemon rewrites nothing
    level, line = verdict({"training": s}, True, now[0])
    assert level == "ok" and line.startswith("training OK"), line
    # a daemon stopped while in the backoff after crashes: no run went fine since, the loop stands
    sup.state, sup.started_at, now[0] = "stopped", None, 1105.0
    assert sup.snapshot()["recent_crashes"] == 2 and not sup.snapshot()["last_crash"].get("resolved")


@pytest.mark.slow
def test_a_status_file_of_a_newer_daemon_or_a_damaged_one_is_said_plainly(tmp_path):
    """The state file has a version: a CLI older than the daemon that wrote it refuses it with a clear
    message, a damaged one is named with where it is damaged; neither gives a traceback."""
    from daemon.statusdoc import STATUS_VERSION, Status

    cfg = write_config(tmp_path)
    state = tmp_path / "logs" / "daemon-state.json"
    state.parent.mkdir()
    newer, damaged = ("was written by a newer ckpt-daemon", "run the `ckpt-daemon` of the installation"), \
        ("is damaged", "start it, or delete the file")
    for doc, (said, fix) in [({**Status().to_json(), "version": STATUS_VERSION + 98}, newer),
                             ({**Status().to_json(), "training": {"restarts": "many"}}, damaged),
                             ({**Status().to_json(), "checkpoints": [1, 2]}, damaged)]:
        state.write_text(json.dumps(doc))
        for args in ([], ["--json"]):
            r = run_py(["-m", "daemon", "status", "--config", str(cfg), *args])
            assert r.returncode == 1 and said in r.stdout and "Traceback" not in r.stdout + r.stderr, (doc, r)
            assert "daemon-state.json" in r.stdout and fix in r.stdout
            if args:
                assert json.loads(r.stdout)["ok"] is False
    state.write_text(json.dumps(Status().to_json()))
    r = run_py(["-m", "daemon", "status", "--config", str(cfg), "--json"])
    assert r.returncode == 5 and json.loads(r.stdout)["version"] == STATUS_VERSION  # readable; no daemon runs
