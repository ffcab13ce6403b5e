"""The built-in trainer as users run it: real processes, real signals, real files."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest

from ckpt_daemon.runtime import kill_tree
from ckpt_daemon.store import catalog as cat
from tests.helpers import PY, env_for_children, read_losses, run_py, start, trainer_cmd, wait_for_step, write_config

STEPS = 40


@pytest.mark.slow
@pytest.mark.parametrize("world, precision", [(1, "fp32"), (2, "fp32"), (1, "bf16"), (1, "fp16")],
                         ids=["single", "torchrun-2", "bf16", "fp16-scaler"])
def test_exact_resume_after_sigkill(tmp_path, world, precision):
    over = {"trainer": {"precision": precision, "deterministic": True}} if precision != "fp32" else None
    # The uninterrupted reference run.
    ref = write_config(tmp_path / "ref", over)
    r = subprocess.run(trainer_cmd(ref, world, "--max-steps", str(STEPS)), capture_output=True, text=True,
                       env=env_for_children(), timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    expected = read_losses(tmp_path / "ref" / "logs" / "metrics.jsonl")
    assert sorted(expected) == list(range(1, STEPS + 1))
    assert expected[STEPS] < expected[1]  # it learns

    # The same run, SIGKILLed at a random step after at least two checkpoints (every 5 steps).
    cfg = write_config(tmp_path / "run", over)
    metrics = tmp_path / "run" / "logs" / "metrics.jsonl"
    kill_at = random.Random(world).randint(12, STEPS - 4)
    p = start(trainer_cmd(cfg, world, "--max-steps", str(STEPS)), tmp_path / "run1.log")
    wait_for_step(metrics, kill_at, p)
    # saves run beside training; on a busy machine the second one may still be on its way at kill_at
    deadline = time.monotonic() + 120
    def newest_step() -> int:
        newest = cat.scan(tmp_path / "run" / "checkpoints", ["checkpoint-{step}"]).newest_valid()
        return newest.step if newest else 0

    while newest_step() < 10:
        assert time.monotonic() < deadline and p.poll() is None, "the second checkpoint never became valid"
        time.sleep(0.05)
    kill_tree(p.pid, signal.SIGKILL)  # torchrun's workers have sessions of their own
    p.wait()
    time.sleep(0.5)
    c = cat.scan(tmp_path / "run" / "checkpoints", ["checkpoint-{step}"])
    resumed_step = c.newest_valid().step
    assert resumed_step >= 10 and resumed_step < STEPS

    r = subprocess.run(trainer_cmd(cfg, world, "--max-steps", str(STEPS), "--resume", "latest"), capture_output=True,
                       text=True, env=env_for_children(), timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"resumed from checkpoint-{resumed_step}" in r.stderr + r.stdout
    got = read_losses(metrics)
    # every loss from the checkpoint on equals the uninterrupted run's, bit for bit
    for step in range(resumed_step + 1, STEPS + 1):
        assert got[step] == expected[step], f"step {step}: {got[step]!r} != {expected[step]!r}"
    assert got == expected
    if precision == "fp16":  # the gradient scaler's state is saved and restored: it went on as if never stopped
        from ckpt_daemon.checkpoint import read_checkpoint

        ref_scaler = read_checkpoint(tmp_path / "ref" / "checkpoints" / f"checkpoint-{STEPS}")["scaler"]
        assert ref_scaler["_growth_tracker"] == STEPS and ref_scaler["scale"] > 0
        assert read_checkpoint(tmp_path / "run" / "checkpoints" / f"checkpoint-{STEPS}")["scaler"] == ref_scaler
        assert read_checkpoint(tmp_path / "run" / "checkpoints" / f"checkpoint-{resumed_step}")["scaler"][
            "_growth_tracker"] == resumed_step


@pytest.mark.slow
def test_torchrun_ranks_resume_exactly_from_the_memory_checkpoint_rank_0_wrote(tmp_path, monkeypatch):
    """Memory-first under torchrun: rank 0 writes every step's state into the slots; after a SIGKILL of the
    whole job, newer than anything on disk, rank 0 loads the newest slot and rank 1 exactly that state: the
    losses go on bit for bit as in an uninterrupted run (a rank started fresh, or from the disk's older
    state, would diverge at once)."""
    from ckpt_daemon import memory as mem
    from daemon import memagent

    steps = 30
    region = Path("/dev/shm") / f"ckpt-test-ddp-{os.getpid()}-{tmp_path.name}"
    over = {"checkpoints": {"memory": {"enabled": True, "every_steps": 1, "persist_every": 1000, "dir": str(region)}},
            "trainer": {"checkpoint_every_steps": 1000, "eval_every_steps": 1000, "deterministic": True}}
    ref = write_config(tmp_path / "ref", over)  # no daemon named: the same run, saving to disk
    r = subprocess.run(trainer_cmd(ref, 2, "--max-steps", str(steps)), capture_output=True, text=True,
                       env=env_for_children(), timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    expected = read_losses(tmp_path / "ref" / "logs" / "metrics.jsonl")
    assert sorted(expected) == list(range(1, steps + 1))

    cfg = write_config(tmp_path / "run", over)
    ck, metrics = tmp_path / "run" / "checkpoints", tmp_path / "run" / "logs" / "metrics.jsonl"
    monkeypatch.setenv("CKPT_DAEMON_MEMORY", str(region))  # what the daemon sets for its trainer
    try:
        p = start(trainer_cmd(cfg, 2, "--max-steps", str(steps)), tmp_path / "run1.log")
        wait_for_step(metrics, 12, p)
        kill_tree(p.pid, signal.SIGSTOP)  # frozen: the newest slot is well defined
        info, _ = mem.Region(region).newest(ck)  # (the other slot may be caught mid-copy)
        kill_tree(p.pid, signal.SIGKILL)
        p.wait()
        assert info is not None
        newest_disk = cat.scan(ck, ["checkpoint-{step}"], verify=True).newest_valid()
        assert info.step >= 11 and (newest_disk is None or newest_disk.step < info.step)

        r = subprocess.run(trainer_cmd(cfg, 2, "--max-steps", str(steps), "--resume", "latest"), capture_output=True,
                           text=True, env=env_for_children(), timeout=300)
        out = r.stdout + r.stderr
        assert r.returncode == 0, out
        assert f"resumed from checkpoint-{info.step} at step {info.step}" in out and "read from the memory checkpoint" in out
        assert out.count(f"loaded the memory checkpoint at step {info.step}") == 2, out  # both ranks
        got = read_losses(metrics)
        for step in range(info.step + 1, steps + 1):
            assert got[step] == expected[step], f"step {step}: {got[step]!r} != {expected[step]!r}"
    finally:
        memagent.remove_stale_region(region)


@pytest.mark.slow
def test_resume_with_another_world_size_continues_and_says_so(tmp_path):
    cfg = write_config(tmp_path)
    run_py(["-m", "trainer", "--config", str(cfg), "--max-steps", "10"], check=True)
    r = subprocess.run(trainer_cmd(cfg, 2, "--max-steps", "20"), capture_output=True, text=True, env=env_for_children(),
                       timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "saved with 1 process(es) on 2" in r.stderr and "will not repeat bit for bit" in r.stderr
    losses = read_losses(tmp_path / "logs" / "metrics.jsonl")
    assert max(losses) == 20 and all(s in losses for s in range(11, 21))


@pytest.mark.slow
def test_sigterm_finishes_the_step_saves_and_exits_143(tmp_path):
    cfg = write_config(tmp_path, {"trainer": {"checkpoint_every_steps": 1000, "eval_every_steps": 1000}})
    metrics = tmp_path / "logs" / "metrics.jsonl"
    p = start([PY, "-m", "trainer", "--config", str(cfg)], tmp_path / "t.log")
    wait_for_step(metrics, 7, p)
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=60) == 143  # saved, then exits as a shell reports SIGTERM: stopped, not finished
    last = max(read_losses(metrics))
    c = cat.scan(tmp_path / "checkpoints", ["checkpoint-{step}"], verify=True)
    assert c.newest_valid().step == last  # the final save is the step it stopped at
    assert "stopped by signal" in (tmp_path / "t.log").read_text()


@pytest.mark.slow
def test_second_trainer_on_same_folder_is_refused_and_heartbeat_is_written(tmp_path):
    cfg = write_config(tmp_path)
    metrics = tmp_path / "logs" / "metrics.jsonl"
    p = start([PY, "-m", "trainer", "--config", str(cfg)], tmp_path / "t.log")
    try:
        wait_for_step(metrics, 3, p)
        r = run_py(["-m", "trainer", "--config", str(cfg)], timeout=120)
        assert r.returncode == 4
        assert "Another trainer" in r.stderr and f"pid {p.pid}" in r.stderr
        from ckpt_daemon.runtime import training_activity

        deadline = time.monotonic() + 30
        while (act := training_activity(tmp_path / "checkpoints")).step is None or act.step < 3:  # heartbeats
            assert time.monotonic() < deadline, "no heartbeat with a step"
            time.sleep(0.05)
        assert act.active and act.pid == p.pid and act.step >= 3 and act.heartbeat_age_s < 5
    finally:
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=60)
    from ckpt_daemon.runtime import training_activity

    assert not training_activity(tmp_path / "checkpoints").active


@pytest.mark.slow
def test_training_on_a_full_disk_skips_saves_and_goes_on(tmp_path, tmpfs):
    disk = tmpfs("1m")  # a tiny-model checkpoint is ~200 KB: a few fit, then the disk is full
    cfg = write_config(tmp_path, {"checkpoints": {"dir": str(disk)}, "disk": {"save_margin_mb": 0.05}})
    r = run_py(["-m", "trainer", "--config", str(cfg), "--max-steps", "60"], timeout=300)
    assert r.returncode == 0, r.stderr
    assert "Not saving checkpoint" in r.stderr or "Not enough disk space" in r.stderr
    assert max(read_losses(tmp_path / "logs" / "metrics.jsonl")) == 60  # training went on to the end
    c = cat.scan(disk, ["checkpoint-{step}"], verify=True)
    assert c.entries and all(e.valid for e in c.entries)  # every committed checkpoint intact
    assert not c.in_progress and not list(disk.glob(".tmp-*"))
    assert [e.step for e in c.entries] == [5 * i for i in range(1, len(c.entries) + 1)]  # the first ones survived


@pytest.mark.slow
def test_resume_none_and_explicit_path(tmp_path):
    cfg = write_config(tmp_path)
    run_py(["-m", "trainer", "--config", str(cfg), "--max-steps", "10"], check=True)
    r = run_py(["-m", "trainer", "--config", str(cfg), "--max-steps", "12", "--resume",
                str(tmp_path / "checkpoints" / "checkpoint-5")],
               check=True)
    assert "resumed from checkpoint-5 at step 5" in r.stderr
    r = run_py(["-m", "trainer", "--config", str(cfg), "--max-steps", "3", "--resume", "none"], check=True)
    assert "starting fresh" in r.stderr
    r = run_py(["-m", "trainer", "--config", str(cfg), "--max-steps", "11", "--resume", "10"], check=True)
    assert "resumed from checkpoint-10 at step 10" in r.stderr
    best = os.readlink(tmp_path / "checkpoints" / "best")
    r = run_py(["-m", "trainer", "--config", str(cfg), "--max-steps", "30", "--resume", "best"], check=True)
    assert f"resumed from {best}" in r.stderr
    r = run_py(["-m", "trainer", "--config", str(cfg), "--resume", "999"])
    assert r.returncode != 0 and "There is no checkpoint at step 999" in r.stderr


@pytest.mark.slow
def test_ckpt_resume_environment_is_honoured(tmp_path):
    cfg = write_config(tmp_path)
    run_py(["-m", "trainer", "--config", str(cfg), "--max-steps", "10"], check=True)
    env = env_for_children()
    env["CKPT_RESUME"] = str(tmp_path / "checkpoints" / "checkpoint-5")
    r = run_py(["-m", "trainer", "--config", str(cfg), "--max-steps", "11"], env=env, check=True)
    assert "resumed from checkpoint-5" in r.stderr


@pytest.mark.slow
def test_generate_from_checkpoint_and_export(tmp_path):
    cfg = write_config(tmp_path, {"trainer": {"checkpoint_every_steps": 50}})
    run_py(["-m", "trainer", "--config", str(cfg), "--max-steps", "100"], check=True)
    ckpt = tmp_path / "checkpoints" / "checkpoint-100"
    r = run_py(["-m", "trainer.generate", "--checkpoint", str(ckpt), "--prompt", "the cat", "--tokens", "40"],
               check=True)
    assert r.stdout.startswith("the cat") and len(r.stdout.strip()) >= 30
    from ckpt_daemon.checkpoint import export_weights

    out = export_weights(ckpt, tmp_path / "export")
    r = run_py(["-m", "trainer.generate", "--checkpoint", str(out), "--prompt", "the cat", "--tokens", "40"],
               check=True)
    assert r.stdout.startswith("the cat")
