"""The warm spare trainer (training.warm_spare): the handover protocol with hostile input, the config's
refusals, and the real daemon handing a restart after a SIGKILL to a spare that has torch imported."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from ckpt_daemon import memory as mem
from ckpt_daemon import spare
from ckpt_daemon.config import parse_config
from ckpt_daemon.errors import CkptError
from daemon import memagent
from tests.helpers import PY, Daemon, env_for_children


# ------------------------------------------------------------------------------------------ protocol
def _waiting_spare(tmp_path: Path, code: str = "import os, sys; from ckpt_daemon import spare; "
                   "print(spare.wait_for_handover(), os.environ.get('CKPT_RESUME'), os.environ.get('HOME')); "
                   "sys.stdout.flush()") -> tuple[subprocess.Popen, int]:
    ours, theirs = socket.socketpair()
    p = subprocess.Popen([PY, "-c", code], env={**env_for_children(), spare.ENV_FD: str(theirs.fileno())},
                         pass_fds=(theirs.fileno(),), stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path)
    theirs.close()
    ours.settimeout(60)
    assert ours.recv(64) == spare.READY  # it says it waits
    ours.setblocking(True)
    w = os.dup(ours.fileno())
    ours.close()
    return p, w


def test_a_spare_takes_the_handed_environment(tmp_path):
    p, w = _waiting_spare(tmp_path)
    time.sleep(0.2)
    assert p.poll() is None  # it waits for the daemon
    os.write(w, spare.message({"CKPT_RESUME": "/ck/checkpoint-7", "PATH": os.environ["PATH"]}))
    os.close(w)
    out, err = p.communicate(timeout=30)
    assert p.returncode == 0, err
    assert out.decode().split() == ["True", "/ck/checkpoint-7", "None"]  # the whole environment is replaced


def test_a_dropped_spare_exits_saying_so(tmp_path):
    p, w = _waiting_spare(tmp_path)
    os.close(w)  # the daemon dropped it (or died)
    out, err = p.communicate(timeout=30)
    assert p.returncode == spare.EXIT_DROPPED and out == b"" and b"Traceback" not in err
    assert b"warm spare trainer and was not needed" in err


@pytest.mark.parametrize("line, reason", [
    (b"not json\n", "not JSON"),
    (b"[1, 2]\n", "not a ckpt-daemon handover"),
    (b'{"format": "ckpt-daemon/handover-1", "env": {"A": 1}}\n', "not a mapping"),
    (b'{"format": "ckpt-daemon/handover-1", "env": {"A=B": "x"}}\n', "not a mapping"),
    (b'{"format": "ckpt-daemon/handover-1", "env": "x"}\n', "not a mapping"),
    (b"[" * 100_000 + b"\n", "not JSON"),
    (b'{"format": "ckpt-daemon/handover-1", "env": {"A": "' + b"x" * (2 << 20) + b'"}}\n', "larger than"),
])
def test_a_malformed_handover_ends_the_spare_with_its_reason(tmp_path, line, reason):
    p, w = _waiting_spare(tmp_path)
    sock = socket.socket(fileno=w)
    try:
        while line:  # MSG_NOSIGNAL: a peer that stopped reading gives EPIPE, not a SIGPIPE to the test process
            line = line[sock.send(line, socket.MSG_NOSIGNAL):]
    except (BrokenPipeError, ConnectionResetError):
        pass  # it stopped reading at the bound
    finally:
        sock.close()
    out, err = p.communicate(timeout=30)
    assert p.returncode == 1 and out == b""
    assert reason in err.decode() and b"Traceback" not in err


def test_a_stale_spare_variable_by_hand_is_a_clear_error(tmp_path):
    p = subprocess.run([PY, "-c", "from ckpt_daemon import spare; spare.wait_for_handover()"],
                       env={**env_for_children(), spare.ENV_FD: "x1"}, capture_output=True, timeout=60)
    assert p.returncode == 1 and b"is not a file descriptor" in p.stderr and b"Traceback" not in p.stderr


def test_the_config_allows_a_spare_only_for_the_built_in_trainer(tmp_path):
    ok = parse_config("training: {warm_spare: true}\n", tmp_path / "config.yaml")
    assert ok.training.warm_spare
    for text, why in [("training: {warm_spare: true, command: [python, train.py]}\n", "not the built-in trainer"),
                      ("training: {warm_spare: true, command: ['{python}', -m, trainer, --resume, '{resume}']}\n",
                       "holds {resume}")]:
        with pytest.raises(CkptError) as e:
            parse_config(text, tmp_path / "config.yaml")
        assert "training.warm_spare" in str(e.value) and why in str(e.value) and "warm_spare: false" in str(e.value)


# ------------------------------------------------------------------------------------------ the real daemon
def _alive(pid: int) -> bool:
    from ckpt_daemon.runtime import pid_alive

    return pid_alive(pid)


@pytest.mark.slow
def test_the_daemon_hands_a_restart_to_its_warm_spare(tmp_path, daemons):
    """SIGKILL of the trainer: the restart goes to the spare (same pid, torch already imported), which resumes
    from the memory checkpoint the breakpoint verified; a new spare follows; stop ends both cleanly."""
    region = Path("/dev/shm") / f"ckpt-test-spare-{os.getpid()}-{tmp_path.name}"
    ck = tmp_path / "checkpoints"
    d = Daemon(tmp_path, {
        "checkpoints": {"memory": {"enabled": True, "every_steps": 1, "persist_every": 1000, "dir": str(region)}},
        "trainer": {"checkpoint_every_steps": 1000, "eval_every_steps": 1000},
        "training": {"warm_spare": True, "restart": {"initial_backoff_s": 0.2}},
    }).start()
    daemons.append(d)
    try:
        s = d.wait(lambda s: (s["training"]["warm_spare"] or {}).get("ready") and (d.step(s) or 0) >= 5 and s,
                   timeout=120, what="training with a ready warm spare")
        pid, spare_pid = s["training"]["pid"], s["training"]["warm_spare"]["pid"]
        assert spare_pid != pid and _alive(spare_pid)
        shown = subprocess.run([PY, "-m", "daemon", "status", "--config", str(d.cfg)], capture_output=True, text=True,
                               env=env_for_children(), timeout=60).stdout
        assert f"warm spare: pid {spare_pid}, waiting for" in shown and "(ready: a restart is handed to it)" in shown
        os.kill(pid, signal.SIGSTOP)
        info, _ = mem.Region(region).newest(ck)
        last = info.step
        os.kill(pid, signal.SIGKILL)
        s = d.wait(lambda s: s["training"]["pid"] == spare_pid and (d.step(s) or 0) > last and s, timeout=120,
                   what="the spare taking over")
        assert s["training"]["started_warm"] and s["training"]["resumed_from"] == f"checkpoint-{last}"
        trainer_log = (tmp_path / "logs" / "trainer.log").read_text()
        assert f"hands the restart to the warm spare (pid {spare_pid}" in trainer_log
        assert f"resumed from checkpoint-{last} at step {last}" in trainer_log
        d.wait(lambda s: (ck / f"checkpoint-{last}").is_dir(), what="the breakpoint's persist")
        # a new spare is started once the new trainer is past its start
        s = d.wait(lambda s: s["training"]["warm_spare"] and s["training"]["warm_spare"]["pid"] != spare_pid and s,
                   timeout=120, what="a new spare")
        spare2 = s["training"]["warm_spare"]["pid"]
        assert d.stop() == 0
        assert not _alive(spare2) and not _alive(spare_pid)
        assert "warm spare trainer ended" in d.log()
    finally:
        memagent.remove_stale_region(region)


@pytest.mark.slow
def test_a_spare_started_for_another_config_is_not_used(tmp_path, daemons):
    """The config changes while a spare waits (here: training.env): the restart starts a fresh trainer with
    the new environment, and the old spare is ended."""
    d = Daemon(tmp_path, {"trainer": {"checkpoint_every_steps": 5, "eval_every_steps": 1000},
                          "training": {"warm_spare": True, "restart": {"initial_backoff_s": 0.2}}}).start()
    daemons.append(d)
    s = d.wait(lambda s: s["training"]["warm_spare"] and (d.step(s) or 0) >= 5 and s, timeout=120,
               what="training with a warm spare")
    pid, spare_pid = s["training"]["pid"], s["training"]["warm_spare"]["pid"]
    cfg = yaml.safe_load(d.cfg.read_text())
    cfg["training"]["env"] = {"CKPT_TEST_MARK": "changed"}
    d.cfg.write_text(yaml.safe_dump(cfg))
    d.wait(lambda s: "config.yaml reloaded" in d.log(), timeout=60, what="the reload")
    os.kill(pid, signal.SIGKILL)
    s = d.wait(lambda s: s["training"]["pid"] not in (None, pid) and (d.step(s) or 0) > 0 and s, timeout=120,
               what="a restarted trainer")
    assert s["training"]["pid"] != spare_pid and not s["training"]["started_warm"]
    with open(f"/proc/{s['training']['pid']}/environ", "rb") as f:
        assert b"CKPT_TEST_MARK=changed" in f.read()
    d.wait(lambda s: not _alive(spare_pid), what="the old spare to end")
    assert d.stop() == 0


@pytest.mark.slow
def test_a_stopped_spare_is_not_handed_the_restart_and_stale_variables_are_not_inherited(tmp_path, daemons):
    """A spare that cannot take a handover (SIGSTOPped) does not stall the restart: a trainer starts cold and
    the spare is ended. Variables the daemon sets per start, left in the daemon's own environment, never
    reach a trainer. Turning warm_spare off ends the spare."""
    d = Daemon(tmp_path, {"trainer": {"checkpoint_every_steps": 5, "eval_every_steps": 1000},
                          "training": {"warm_spare": True, "restart": {"initial_backoff_s": 0.2}}},
               env={spare.ENV_FD: "0", "CKPT_DAEMON_MEMORY_RESUME": "5", "CKPT_RESUME": "/stale/checkpoint-5"}).start()
    daemons.append(d)
    s = d.wait(lambda s: (s["training"]["warm_spare"] or {}).get("ready") and (d.step(s) or 0) >= 6 and s,
               timeout=120, what="training with a ready warm spare")
    pid, spare_pid = s["training"]["pid"], s["training"]["warm_spare"]["pid"]
    for p in (pid, spare_pid):
        with open(f"/proc/{p}/environ", "rb") as f:
            env = f.read().split(b"\0")
        assert b"CKPT_DAEMON_MEMORY_RESUME=5" not in env and b"CKPT_RESUME=/stale/checkpoint-5" not in env
        assert (p == spare_pid) == any(e.startswith(spare.ENV_FD.encode() + b"=") for e in env)
    os.kill(spare_pid, signal.SIGSTOP)
    os.kill(pid, signal.SIGKILL)
    s = d.wait(lambda s: s["training"]["pid"] not in (None, pid) and (d.step(s) or 0) > 5 and s, timeout=120,
               what="a trainer started cold")
    assert s["training"]["pid"] != spare_pid and not s["training"]["started_warm"]
    assert s["training"]["resumed_from"]  # from the newest checkpoint, not from scratch
    d.wait(lambda s: not _alive(spare_pid), what="the stopped spare to be ended")
    s = d.wait(lambda s: s["training"]["warm_spare"] and s, timeout=120, what="a new spare")
    spare2 = s["training"]["warm_spare"]["pid"]
    cfg = yaml.safe_load(d.cfg.read_text())
    cfg["training"]["warm_spare"] = False
    d.cfg.write_text(yaml.safe_dump(cfg))
    d.wait(lambda s: not s["training"]["warm_spare"] and not _alive(spare2), timeout=60, what="the spare to end")
    assert d.stop() == 0
