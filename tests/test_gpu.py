"""On a CUDA GPU: the built-in trainer trains there, resumes bit for bit after kill -9 from disk and from
memory (deterministic kernels), starts under torchrun with one rank per GPU; memory slots are pinned and
a verified load lands on the GPU. Every test here needs CUDA and skips with the reason elsewhere; what
can be decided without a GPU is tested in tests/test_device.py. Run on a GPU machine with
`python -m pytest tests/test_gpu.py` (docs/gpu.md, "The GPU benchmark")."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from ckpt_daemon import memory as mem
from ckpt_daemon.runtime import kill_tree, read_heartbeat
from ckpt_daemon.store import catalog as cat
from daemon import memagent
from tests.helpers import (
    PY,
    Daemon,
    env_for_children,
    read_losses,
    run_py,
    same_nested,
    start,
    trainer_cmd,
    wait_for_step,
    write_config,
)

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs a CUDA GPU (torch.cuda.is_available() is False on this machine); run it on one (docs/gpu.md)")

STEPS = 40
GPU_TRAINER = {"device": "cuda", "deterministic": True, "precision": "bf16"}


def _bf16_or_fp16() -> str:
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def _over(**extra) -> dict:
    return {"trainer": {**GPU_TRAINER, "precision": _bf16_or_fp16(), **extra}}


def test_the_built_in_trainer_trains_on_the_gpu(tmp_path):
    cfg = write_config(tmp_path, {"trainer": {"device": "auto"}})  # auto: the GPU when there is one
    r = run_py(["-m", "trainer", "--config", str(cfg), "--max-steps", "20"], check=True)
    assert "training on cuda:0" in r.stderr
    hb = read_heartbeat(tmp_path / "checkpoints")
    dev = hb["device"]
    assert dev["device"] == "cuda:0" and dev["name"] == torch.cuda.get_device_name(0)
    assert 0 < dev["memory"]["allocated"] <= dev["memory"]["reserved"] < dev["memory"]["total"]
    losses = read_losses(tmp_path / "logs" / "metrics.jsonl")
    assert losses[20] < losses[1]
    from ckpt_daemon.checkpoint import read_checkpoint

    st = read_checkpoint(tmp_path / "checkpoints" / "checkpoint-20", map_location="cuda")  # the verified GPU load
    assert all(t.is_cuda for t in st["model"].values())


def test_exact_resume_on_the_gpu_after_sigkill_from_disk(tmp_path):
    over = _over()
    ref = write_config(tmp_path / "ref", over)
    run_py(["-m", "trainer", "--config", str(ref), "--max-steps", str(STEPS)], check=True, timeout=600)
    expected = read_losses(tmp_path / "ref" / "logs" / "metrics.jsonl")
    assert expected[STEPS] < expected[1]
    cfg = write_config(tmp_path / "run", over)
    metrics = tmp_path / "run" / "logs" / "metrics.jsonl"
    p = start(trainer_cmd(cfg, 1, "--max-steps", str(STEPS)), tmp_path / "run1.log")
    wait_for_step(metrics, 23, p, timeout=300)
    kill_tree(p.pid, signal.SIGKILL)
    p.wait()
    resumed = cat.scan(tmp_path / "run" / "checkpoints", ["checkpoint-{step}"]).newest_valid().step
    assert 10 <= resumed < STEPS
    r = run_py(["-m", "trainer", "--config", str(cfg), "--max-steps", str(STEPS)], check=True, timeout=600)
    assert f"resumed from checkpoint-{resumed}" in r.stderr
    assert read_losses(metrics) == expected  # bit for bit, every step after the checkpoint


def test_exact_resume_on_the_gpu_after_sigkill_from_memory(tmp_path, daemons):
    trainer = {**_over(checkpoint_every_steps=100_000, eval_every_steps=100_000, max_steps=STEPS)["trainer"]}
    ref = write_config(tmp_path / "ref", {"trainer": trainer})
    run_py(["-m", "trainer", "--config", str(ref)], check=True, timeout=600)
    expected = read_losses(tmp_path / "ref" / "logs" / "metrics.jsonl")
    region = Path("/dev/shm") / f"ckpt-gpu-test-{os.getpid()}"
    ck = tmp_path / "run" / "checkpoints"
    d = Daemon(tmp_path / "run", {"checkpoints": {"memory": {"enabled": True, "every_steps": 1, "persist_every": 1000,
                                                             "dir": str(region)}},
                                  "trainer": trainer}).start()
    daemons.append(d)
    try:
        d.wait(lambda s: (d.step(s) or 0) >= 20, timeout=300, what="training on the GPU with memory checkpoints")
        pid = d.status()["training"]["pid"]
        os.kill(pid, signal.SIGSTOP)  # frozen: the newest memory checkpoint is well defined
        info, _ = mem.Region(region).newest(ck)
        last = info.step
        assert not (ck / f"checkpoint-{last}").exists()  # only in memory
        os.kill(pid, signal.SIGKILL)
        d.wait(lambda s: s["training"]["state"] == "finished", timeout=600, what="the resumed run to finish")
        log = (tmp_path / "run" / "logs" / "trainer.log").read_text()
        assert f"resumed from checkpoint-{last} at step {last}" in log and "read from the memory checkpoint" in log
        assert read_losses(tmp_path / "run" / "logs" / "metrics.jsonl") == expected
        assert d.stop() == 0
    finally:
        memagent.remove_stale_region(region)


def test_torchrun_with_one_rank_per_gpu_starts_and_more_ranks_than_gpus_is_refused(tmp_path):
    n = torch.cuda.device_count()
    cfg = write_config(tmp_path / "ok", {"trainer": {"device": "auto"}})
    r = subprocess.run(trainer_cmd(cfg, n, "--max-steps", "12") if n > 1 else
                       [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "-m", "trainer",
                        "--config", str(cfg), "--max-steps", "12"],
                       capture_output=True, text=True, env=env_for_children(), timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert max(read_losses(tmp_path / "ok" / "logs" / "metrics.jsonl")) == 12
    assert read_heartbeat(tmp_path / "ok" / "checkpoints")["device"]["device"] == "cuda:0"
    cfg = write_config(tmp_path / "over", {"trainer": {"device": "auto"}})
    r = subprocess.run(trainer_cmd(cfg, n + 1, "--max-steps", "3"), capture_output=True, text=True,
                       env=env_for_children(), timeout=600)
    assert r.returncode != 0
    assert f"torch sees {n} GPU(s)" in r.stderr and f"--nproc_per_node at most {n}" in r.stderr


@pytest.mark.skipif(torch.cuda.device_count() < 2,
                    reason=f"NCCL between ranks needs two GPUs; this machine has {torch.cuda.device_count()}")
def test_torchrun_on_two_gpus_resumes_exactly_after_sigkill(tmp_path):
    over = _over()
    ref = write_config(tmp_path / "ref", over)
    r = subprocess.run(trainer_cmd(ref, 2, "--max-steps", str(STEPS)), capture_output=True, text=True,
                       env=env_for_children(), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    expected = read_losses(tmp_path / "ref" / "logs" / "metrics.jsonl")
    cfg = write_config(tmp_path / "run", over)
    p = start(trainer_cmd(cfg, 2, "--max-steps", str(STEPS)), tmp_path / "run1.log")
    wait_for_step(tmp_path / "run" / "logs" / "metrics.jsonl", 23, p, timeout=300)
    kill_tree(p.pid, signal.SIGKILL)
    p.wait()
    time.sleep(0.5)
    r = subprocess.run(trainer_cmd(cfg, 2, "--max-steps", str(STEPS)), capture_output=True, text=True,
                       env=env_for_children(), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert read_losses(tmp_path / "run" / "logs" / "metrics.jsonl") == expected


def test_memory_slots_of_a_gpu_state_are_pinned_and_round_trip(tmp_path):
    from ckpt_daemon.checkpoint import CheckpointManager
    from ckpt_daemon.memsave import read_slot_state

    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(1024, 1024), torch.nn.Linear(1024, 64)).cuda()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    mgr = CheckpointManager(tmp_path / "ck", memory=tmp_path / "region")
    assert mgr.reserve_memory(model=m, optimizer=opt)
    assert all(s.host.pinned for s in mgr._memory.slots)  # registered when reserved, before any save
    m(torch.randn(8, 1024, device="cuda")).sum().backward()
    opt.step()
    for step in (1, 2, 3):
        assert mgr.save(step, model=m, optimizer=opt, memory=True)
        mgr.wait()
    sizes = [s.size for s in mgr._memory.slots]
    mgr.close()
    assert sizes[0] == sizes[1]
    st, why = read_slot_state(tmp_path / "region", tmp_path / "ck", map_location="cuda")
    assert st is not None, why
    assert all(v.is_cuda for v in st["model"].values())
    assert same_nested({k: v.cpu() for k, v in st["model"].items()}, {k: v.cpu() for k, v in m.state_dict().items()})
    exp_avg = st["optimizer"]["state"][0]["exp_avg"]
    assert exp_avg.is_cuda and torch.equal(exp_avg, opt.state_dict()["state"][0]["exp_avg"])
    assert st["optimizer"]["state"][0]["step"].device.type == "cpu"  # as a fresh optimizer keeps it


def test_a_verified_gpu_load_equals_the_cpu_load_and_catches_a_flipped_byte(tmp_path):
    from ckpt_daemon.checkpoint import CheckpointManager, read_checkpoint
    from ckpt_daemon.errors import CheckpointError

    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(2048, 2048), torch.nn.Linear(2048, 8)).cuda()
    opt = torch.optim.AdamW(m.parameters())
    m(torch.randn(4, 2048, device="cuda")).sum().backward()
    opt.step()
    path = CheckpointManager(tmp_path).save(1, model=m, optimizer=opt)
    host, dev = read_checkpoint(path), read_checkpoint(path, map_location="cuda")
    for k in host["model"]:
        assert dev["model"][k].is_cuda and torch.equal(dev["model"][k].cpu(), host["model"][k])
    assert same_nested(json.loads(json.dumps(host["scheduler"])), json.loads(json.dumps(dev["scheduler"])))
    raw = bytearray((path / "model.safetensors").read_bytes())
    raw[len(raw) // 2] ^= 4
    (path / "model.safetensors").write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="model.safetensors fails its"):
        read_checkpoint(path, map_location="cuda")
