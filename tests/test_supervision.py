"""The daemon must stay up and keep supervising: one daemon per folder, stop versus finished, a give-up
that recovers, a full disk that never kills training, heartbeats under torchrun, a watchdog that means
"the loop is alive", and the parent-death signal."""

from __future__ import annotations

import json
import os
import signal
import socket
import textwrap
import time
from pathlib import Path

import pytest

from ckpt_daemon.runtime import kill_tree
from ckpt_daemon.store import catalog as cat
from daemon import memagent
from tests.helpers import PY, Daemon, fake_native, newest_memory_step, run_py

SLEEPER = [PY, "-c", "import time; time.sleep(3600)"]


def script(tmp_path: Path, name: str, body: str) -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(body))
    return p


def slow_stop_trainer(tmp_path: Path) -> Path:
    """A trainer (`slow_stop.py CKPT_DIR [MARK [HOLD]]`) that holds the trainer lock and beats until SIGTERM,
    then takes 3 s for its final save (or, given HOLD, until the file HOLD exists, 120 s at most), writes
    MARK if given (and not "-"), and exits 143."""
    return script(tmp_path, "slow_stop.py", """
        import signal, sys, time
        from ckpt_daemon import runtime
        ck = sys.argv[1]
        lock = runtime.TrainerLock(ck).acquire()
        stop = []
        signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
        while not stop:
            runtime.write_heartbeat(ck, step=1)
            time.sleep(0.2)
        print("got SIGTERM: saving for 3 s", flush=True)
        time.sleep(3)
        if len(sys.argv) > 3:
            import os
            end = time.monotonic() + 120
            while not os.path.exists(sys.argv[3]) and time.monotonic() < end:
                time.sleep(0.05)
        if len(sys.argv) > 2 and sys.argv[2] != "-":
            open(sys.argv[2], "w").write("saved")
        sys.exit(143)
        """)


@pytest.mark.slow
def test_one_daemon_per_checkpoint_folder(tmp_path, daemons):
    d = Daemon(tmp_path, {"training": {"command": SLEEPER}}).start()
    daemons.append(d)
    s = d.wait(lambda s: s["training"]["state"] == "running" and s, what="the first daemon's trainer")
    r = run_py(["-m", "daemon", "run", "--config", str(d.cfg)], timeout=60)
    assert r.returncode == 4, r.stderr
    assert f"Another ckpt-daemon (pid {d.proc.pid}) already manages" in r.stderr and "Traceback" not in r.stderr
    s2 = d.status()
    assert s2["training"]["pid"] == s["training"]["pid"] and s2["training"]["state"] == "running"
    assert d.stop() == 0


@pytest.mark.slow
def test_a_signal_the_daemon_did_not_send_does_not_end_training(tmp_path, daemons):
    d = Daemon(tmp_path).start()
    daemons.append(d)
    d.wait(lambda s: (d.step(s) or 0) >= 25, what="training")
    pid = d.status()["training"]["pid"]
    os.kill(pid, signal.SIGTERM)  # someone else's SIGTERM: the trainer saves and exits 143
    s = d.wait(lambda s: s["training"]["pid"] not in (None, pid) and s["training"]["state"] == "running" and s,
               what="a restarted trainer")
    crash = s["training"]["last_crash"]
    assert crash["returncode"] == 143 and crash["kind"] == "stopped_outside"
    assert "a signal the daemon did not send" in crash["description"]
    assert "training is not finished, restarting it" in d.log()
    assert d.stop() == 0


@pytest.mark.slow
def test_a_give_up_for_a_full_disk_recovers_by_itself_when_space_comes_back(tmp_path, tmpfs, daemons):
    disk = tmpfs("2m")
    fake_native(disk, 10)  # a healthy checkpoint: it must not be blamed for the full disk
    trainer = script(tmp_path, "needs_space.py", """
        import os, sys, time
        with open(os.path.join(sys.argv[1], "scratch.bin"), "wb") as f:
            f.write(b"x" * 300_000)   # raises OSError(ENOSPC) while the disk is full
        os.remove(os.path.join(sys.argv[1], "scratch.bin"))
        time.sleep(3600)
        """)
    filler = disk / "filler.bin"
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 65536)
        except OSError:
            pass
    d = Daemon(tmp_path, {"checkpoints": {"dir": str(disk)},
                          "training": {"command": [PY, str(trainer), str(disk)],
                                       "restart": {"max_crashes": 2, "same_checkpoint_crashes": 1}},
                          "disk": {"save_margin_mb": 0.1}}).start()
    daemons.append(d)
    s = d.wait(lambda s: s["training"]["state"] == "gave_up" and s, what="giving up on a full disk")
    assert s["training"]["gave_up"]["kind"] == "disk_full"
    assert "the disk is full" in s["training"]["message"] and "retries by itself" in s["training"]["message"]
    assert s["training"]["avoided_checkpoints"] == []  # the checkpoint was not blamed for the disk
    filler.unlink()
    s = d.wait(lambda s: s["training"]["state"] == "running" and s, timeout=60, what="the retry once space is back")
    assert s["training"]["resumed_from"] == "checkpoint-10"
    assert "disk space came back" in d.log()
    assert d.stop() == 0


@pytest.mark.slow
def test_a_100_percent_full_disk_never_stops_the_builtin_trainer(tmp_path, tmpfs, daemons):
    disk = tmpfs("24m")
    d = Daemon(tmp_path, {"checkpoints": {"dir": str(disk)},
                          "trainer": {"checkpoint_every_steps": 200, "eval_every_steps": 200},
                          "disk": {"save_margin_mb": 0.01}}).start()
    daemons.append(d)
    d.wait(lambda s: (d.step(s) or 0) >= 10, what="training")
    filler = disk / "filler.bin"
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass
    pid = d.status()["training"]["pid"]
    trainer_log = tmp_path / "logs" / "trainer.log"
    n0 = trainer_log.read_text(errors="replace").count("Not saving checkpoint")
    deadline = time.monotonic() + 30
    while trainer_log.read_text(errors="replace").count("Not saving checkpoint") < n0 + 3:
        # 100% full: saves, heartbeats and resume records all fail; the same trainer keeps training
        assert time.monotonic() < deadline, "no skipped saves were reported"
        assert d.proc.poll() is None
        os.kill(pid, 0)
        time.sleep(0.2)
    assert "Traceback" not in trainer_log.read_text(errors="replace")
    filler.unlink()
    newest = cat.scan(disk, ["checkpoint-{step}"]).newest_valid().step
    deadline = time.monotonic() + 60
    while cat.scan(disk, ["checkpoint-{step}"]).newest_valid().step <= newest:
        assert time.monotonic() < deadline, "no checkpoint once space came back"
        time.sleep(0.2)
    s = d.status()
    assert s["training"]["pid"] == pid and s["training"]["restarts"] == 0
    assert d.stop() == 0


@pytest.mark.slow
def test_the_watchdog_keeps_pinging_while_a_stubborn_trainer_is_killed(tmp_path, daemons):
    stubborn = script(tmp_path, "stubborn.py", """
        import signal, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)   # never saves, never exits on SIGTERM, never beats
        time.sleep(3600)
        """)
    sock_path = str(tmp_path / "notify.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    srv.bind(sock_path)
    srv.settimeout(1)
    d = Daemon(tmp_path, {"training": {"command": [PY, str(stubborn)], "stop_timeout_s": 6,
                                       "restart": {"heartbeat_timeout_s": 1, "heartbeat_grace_s": 1}}},
               env={"NOTIFY_SOCKET": sock_path, "WATCHDOG_USEC": "1000000"}).start()
    daemons.append(d)
    pings: list[float] = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and "trainer did not exit in time" not in d.log():
        try:
            if srv.recv(4096) == b"WATCHDOG=1":
                pings.append(time.monotonic())
        except TimeoutError:
            pass
    assert "trainer heartbeat is stale" in d.log() and "trainer did not exit in time" in d.log()
    stale_at = pings[0]  # the 6 s wait for the stubborn trainer lies inside this window
    window = [t for t in pings if t >= stale_at]
    assert window[-1] - window[0] >= 5, "the window must span the kill"
    gaps = [b - a for a, b in zip(window, window[1:])]
    assert max(gaps) < 1.5, f"the main loop stalled: watchdog gaps {gaps}"
    assert d.stop() == 0


@pytest.mark.slow
def test_heartbeats_and_memory_checkpoints_under_torchrun_match_the_run(tmp_path, daemons):
    torchrun = str(Path(PY).with_name("torchrun"))
    region = Path("/dev/shm") / f"ckpt-test-ddp-{os.getpid()}-{tmp_path.name}"
    d = Daemon(tmp_path, {"training": {"command": [torchrun, "--standalone", "--nproc_per_node=2", "-m", "trainer",
                                                   "--config", "{config}"],
                                       "restart": {"heartbeat_timeout_s": 3, "heartbeat_grace_s": 120,
                                                   "initial_backoff_s": 0.2}},
                          "checkpoints": {"memory": {"enabled": True, "every_steps": 2, "persist_every": 1000,
                                                     "dir": str(region)}},
                          "trainer": {"checkpoint_every_steps": 10, "log_every_steps": 10}}).start()
    daemons.append(d)
    try:
        _heartbeats_and_memory_under_torchrun(tmp_path, d, region)
    finally:
        memagent.remove_stale_region(region)


def _heartbeats_and_memory_under_torchrun(tmp_path: Path, d: Daemon, region: Path) -> None:
    s = d.wait(lambda s: (d.step(s) or 0) >= 5 and s, timeout=120, what="torchrun training")
    started = time.monotonic()
    pid = s["training"]["pid"]
    hb = json.loads((tmp_path / "checkpoints" / ".ckpt-daemon" / "heartbeat.json").read_text())
    assert hb["pid"] != pid and hb["run"] == s["training"]["run"]  # written by rank 0, a grandchild
    d.wait(lambda s: time.monotonic() - started > 10, timeout=60, what="three heartbeat timeouts")
    s = d.status()
    assert s["training"]["pid"] == pid and s["training"]["restarts"] == 0, s["training"]
    assert "heartbeat is stale" not in d.log()
    # rank 0 writes memory checkpoints; a SIGKILL of the whole job is resumed from the newest one by every rank
    ck = tmp_path / "checkpoints"
    d.wait(lambda s: newest_memory_step(region, ck) >= 4, timeout=60, what="a memory checkpoint written under torchrun")
    kill_tree(pid, signal.SIGSTOP)
    last = newest_memory_step(region, ck)
    kill_tree(pid, signal.SIGKILL)
    s = d.wait(lambda s: s["training"]["pid"] not in (None, pid) and (d.step(s) or 0) > last and s, timeout=120,
               what="the restarted job")
    assert s["training"]["resumed_from"] == f"checkpoint-{last}"
    trainer_log = (tmp_path / "logs" / "trainer.log").read_text()
    assert trainer_log.count(f"loaded the memory checkpoint at step {last}") == 2  # rank 0, then rank 1
    assert d.stop() == 0
    assert cat.scan(ck, ["checkpoint-{step}"], verify=True).newest_valid().step > last


@pytest.mark.slow
def test_a_killed_daemon_makes_its_trainer_save_and_the_next_one_adopts_it(tmp_path, daemons):
    slow = slow_stop_trainer(tmp_path)
    hold = tmp_path / "saved-enough"  # the trainer's final save lasts until the test has seen the adoption
    over = {"training": {"command": [PY, str(slow), str(tmp_path / "checkpoints"), "-", str(hold)]}}
    d = Daemon(tmp_path, over).start()
    daemons.append(d)
    s = d.wait(lambda s: s["training"]["state"] == "running" and s, what="the trainer")
    d.proc.send_signal(signal.SIGKILL)  # the parent-death signal tells the trainer to save and stop
    d.proc.wait()
    d2 = Daemon(tmp_path, over).start()
    daemons.append(d2)
    d2.wait(lambda s: s["daemon"]["pid"] == d2.proc.pid and s["training"]["state"] == "adopted", what="adoption")
    hold.touch()
    s2 = d2.wait(lambda s: s["daemon"]["pid"] == d2.proc.pid and s["training"]["state"] == "running"
                 and s["training"]["pid"] and s,
                 what="a trainer of its own once the adopted one saved and left")
    assert s2["training"]["pid"] != s["training"]["pid"]
    assert "got SIGTERM: saving for 3 s" in (tmp_path / "logs" / "trainer.log").read_text()
    assert "adopting it" in d2.log()
    assert d2.stop() == 0


@pytest.mark.slow
def test_stopping_the_daemon_waits_for_an_adopted_trainer_to_save_and_exit(tmp_path, daemons):
    """A trainer that runs when the daemon starts (started by hand, or left by a daemon that died) is
    adopted; stopping the daemon then waits for its final save instead of leaving it running."""
    import subprocess

    slow = slow_stop_trainer(tmp_path)
    ck, mark = tmp_path / "checkpoints", tmp_path / "saved"
    ck.mkdir()
    by_hand = subprocess.Popen([PY, str(slow), str(ck), str(mark)],
                               env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)})
    try:
        deadline = time.monotonic() + 60
        while not (ck / ".ckpt-daemon").exists() or not any((ck / ".ckpt-daemon").iterdir()):
            assert time.monotonic() < deadline and by_hand.poll() is None, "the trainer by hand did not start"
            time.sleep(0.1)
        time.sleep(0.5)
        d = Daemon(tmp_path, {"training": {"command": [PY, str(slow), str(ck), str(mark)]}}).start()
        daemons.append(d)
        d.wait(lambda s: s["training"]["state"] == "adopted", what="adoption")
        assert d.stop() == 0
        # the daemon returned only once the adopted trainer had saved and gone
        assert mark.exists() and by_hand.poll() is not None
    finally:
        by_hand.kill()


@pytest.mark.slow
def test_a_broken_trainer_falls_back_after_repeated_crashes_end_to_end(tmp_path, daemons):
    root = tmp_path / "checkpoints"
    for s in (10, 20, 30):
        fake_native(root, s)
    picky = script(tmp_path, "picky.py", """
        import os, sys, time
        if os.environ["CKPT_RESUME"].endswith("checkpoint-30"):
            print("cannot load checkpoint-30: mismatched shapes", flush=True)
            sys.exit(1)
        time.sleep(3600)
        """)
    d = Daemon(tmp_path, {"training": {"command": [PY, str(picky)],
                                       "restart": {"same_checkpoint_crashes": 2, "max_crashes": 5}}}).start()
    daemons.append(d)
    s = d.wait(lambda s: s["training"]["state"] == "running" and s["training"]["resumed_from"] == "checkpoint-20"
               and s, what="the fallback to checkpoint-20")
    assert s["training"]["restarts"] == 2 and s["training"]["avoided_checkpoints"] == ["checkpoint-30"]
    assert "falling back to the previous valid checkpoint" in d.log()
    assert (root / "checkpoint-30").exists()  # avoided, not deleted: nothing is wrong with its bytes
    assert d.stop() == 0


def test_the_preexec_hook_does_no_loading_in_the_child():
    """PR_SET_PDEATHSIG is set through a function resolved at import, in the daemon's single thread:
    the child of a multi-threaded process must not dlopen between fork and exec."""
    code = textwrap.dedent("""
        import ctypes
        from daemon import supervisor
        assert supervisor._PRCTL is not None
        def boom(*a, **k):
            raise AssertionError("CDLL called after import")
        ctypes.CDLL = boom
        supervisor._pdeathsig()
        print("ok")
        """)
    assert run_py(["-c", code], check=True).stdout.strip() == "ok"
