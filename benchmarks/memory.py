"""Memory-first checkpoints, measured: `bench_memory(quick) -> dict` (used by `python -m benchmarks`;
also `python -m benchmarks.memory [--quick]` prints the figures as JSON).

- memory_stall_s / memcpy_s: what the training thread waits for per memory checkpoint (the copy into the
  slot) against a plain copy of the same tensors into an already mapped buffer (goal <= 1.2);
- memory_commit_s: the checksums and commit that follow off the training thread;
- memory_load_s / memcpy_s: a verified read of the newest slot into private memory (goal <= 1.5), and
  memory_load_apply_s, the whole CheckpointManager.load (load_state_dict included);
- memory_persist_s: the daemon's persist of a slot (files written and fsynced, committed), beside dd;
- memory_train_overhead: the built-in trainer with a memory checkpoint every step against none (<= 5%);
- recovery_s: SIGKILL of the built-in trainer under the daemon with memory checkpoints to its first new
  step, backoff excluded (a first crash has none), with where the time goes (goal <= 2 s).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import dd_write

REPO = Path(__file__).resolve().parent.parent
WORK = Path(os.environ.get("CKPT_BENCH_DIR", REPO / "benchmarks" / ".work"))


def _state(quick: bool):
    """A GPT-2-124M-shaped state (fp32 weights and AdamW moments, about 1.5 GB), or a small one."""
    import torch

    torch.manual_seed(0)
    d, layers, vocab, ctx = (768, 12, 50257, 1024) if not quick else (256, 4, 8192, 256)
    shapes = [(vocab, d), (ctx, d)] + [s for _ in range(layers) for s in
                                        ((d, 3 * d), (3 * d,), (d, d), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,),
                                         (d,), (d,))]
    m = torch.nn.ParameterList([torch.nn.Parameter(torch.randn(*s) * 0.02) for s in shapes])
    opt = torch.optim.AdamW(m.parameters(), lr=1e-4)
    for p in m.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    opt.step()
    return m, opt


def _tensors(m, opt) -> list:
    ts = list(m.parameters())
    for st in opt.state.values():
        ts += [v for v in st.values() if hasattr(v, "numel")]
    return ts


def _memcpy(ts) -> float:
    """Best of 3: the state's bytes copied into one buffer that is already mapped (no page faults)."""
    import torch

    total = sum(t.numel() * t.element_size() for t in ts)
    buf = torch.empty(total, dtype=torch.uint8)
    buf.fill_(0)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        pos = 0
        for t in ts:
            n = t.numel() * t.element_size()
            buf[pos:pos + n].copy_(t.detach().reshape(-1).view(torch.uint8))
            pos += n
        best = min(best, time.perf_counter() - t0)
    return best


def bench_slots(quick: bool, out: dict) -> None:
    import torch

    from ckpt_daemon import memory as mem
    from ckpt_daemon.checkpoint import CheckpointManager
    from ckpt_daemon.memsave import read_slot_state
    from daemon import memagent

    root = WORK / "memory"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    region = Path("/dev/shm") / f"ckpt-bench-{os.getpid()}"
    m, opt = _state(quick)
    ts = _tensors(m, opt)
    nbytes = sum(t.numel() * t.element_size() for t in ts)
    out["memory_state_mb"] = round(nbytes / 2**20, 1)
    try:
        memcpy = _memcpy(ts)
        mgr = CheckpointManager(root / "ck", memory=region)
        mgr.save(0, model=m, optimizer=opt, memory=True)  # the first save reserves both slots
        mgr.wait()
        stalls, commits = [], []
        for step in (1, 2, 3, 4, 5):  # 1 also pays the first touch of the second slot's pages
            t0 = time.perf_counter()
            mgr.save(step, model=m, optimizer=opt, memory=True)
            stalls.append(time.perf_counter() - t0)
            mgr.wait()
            commits.append(mgr._memory.last_commit_s)
        mgr.close()
        memcpy = min(memcpy, _memcpy(ts))  # before and after: a shared machine's speed drifts
        out["memory_first_stall_s"] = round(stalls[0], 4)
        out["memcpy_s"] = round(memcpy, 4)
        out["memory_stall_s"] = round(min(stalls), 4)
        out["memory_stall_ratio"] = round(min(stalls) / memcpy, 2)
        out["memory_commit_s"] = round(min(commits), 3)
        loads = []
        for _ in range(2):  # the trainer hashing every file itself (no record of the daemon's check)
            t0 = time.perf_counter()
            state, why = read_slot_state(region, root / "ck")
            loads.append(time.perf_counter() - t0)
            assert state is not None, why
            del state
        out["memory_load_hashing_s"] = round(min(loads), 4)
        out["memory_load_hashing_ratio"] = round(min(loads) / memcpy, 2)
        # a restart: the daemon verifies the slot at the breakpoint (and pins it), the trainer's load copies
        info, _ = mem.Region(region).newest(root / "ck")
        pinned = mem.verify_and_pin(info)
        out["memory_breakpoint_verify_s"] = round(pinned.seconds, 4)
        mem.record_verified(root / "ck", pinned)
        loads = []
        for _ in range(2):
            t0 = time.perf_counter()
            state, why = read_slot_state(region, root / "ck")
            loads.append(time.perf_counter() - t0)
            assert state is not None, why
            del state
        pinned.release()
        out["memory_load_s"] = round(min(loads), 4)
        out["memory_load_ratio"] = round(min(loads) / memcpy, 2)
        t0 = time.perf_counter()
        loaded = CheckpointManager(root / "ck", memory=region).load("latest", model=m, optimizer=opt)
        out["memory_load_apply_s"] = round(time.perf_counter() - t0, 4)
        assert loaded is not None and loaded.from_memory
        info, _ = mem.Region(region).newest(root / "ck")
        r = mem.persist_slot(info, root / "ck")
        out["memory_persist_s"] = round(r.seconds, 3)
        out["memory_persist_dd_s"] = round(dd_write(root / "dd.bin", r.bytes), 3)
        out["memory_checksum"] = json.loads((r.path / "manifest.json").read_text())["files"]["model.safetensors"].get("algo", "sha256")
        _ = torch
    finally:
        memagent.remove_stale_region(region)
        shutil.rmtree(root, ignore_errors=True)


def _trainer_config(d: Path, trainer: dict, extra: dict | None = None) -> Path:
    cfg = {"trainer": {"eval_every_steps": 10**9, "log_every_steps": 10**9, "threads": 1, **trainer}, **(extra or {})}
    (d / "config.yaml").write_text(json.dumps(cfg))
    return d / "config.yaml"


def bench_train_overhead(quick: bool, out: dict) -> None:
    """The built-in trainer (its default model) with a memory checkpoint every step, against no checkpoints:
    mean step time over the same number of steps, startup excluded."""
    steps = 400 if quick else 1500
    means = {}
    for label in ("none", "memory"):
        d = WORK / f"memtrain-{label}"
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        region = Path("/dev/shm") / f"ckpt-bench-train-{os.getpid()}"
        cfg = _trainer_config(d, {"checkpoint_every_steps": 10**9},
                              {"checkpoints": {"memory": {"enabled": label == "memory", "every_steps": 1}}})
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
        if label == "memory":
            env["CKPT_DAEMON_MEMORY"] = str(region)
        try:
            subprocess.run([sys.executable, "-m", "trainer", "--config", str(cfg), "--max-steps", str(steps)],
                           check=True, capture_output=True, env=env)
            recs = [json.loads(x) for x in (d / "logs" / "metrics.jsonl").read_text().splitlines()]
            times = [r["time"] for r in recs if 20 <= r["step"] < steps]
            means[label] = statistics.fmean(b - a for a, b in zip(times, times[1:]))
        finally:
            from daemon import memagent

            memagent.remove_stale_region(region)
            shutil.rmtree(d, ignore_errors=True)
    out["memory_train_step_ms"] = round(means["none"] * 1000, 2)
    out["memory_train_overhead"] = round(means["memory"] / means["none"] - 1, 4)


def bench_recovery(quick: bool, out: dict, spare: bool = True) -> None:
    """SIGKILL of the built-in trainer (memory checkpoint every step) under the daemon, to the first step
    of the restarted trainer; a first crash restarts without backoff. With a warm spare (memory_recovery_s)
    and without (memory_recovery_cold_s)."""
    key = "memory_recovery_s" if spare else "memory_recovery_cold_s"
    d = WORK / "memrecovery"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    region = Path("/dev/shm") / f"ckpt-bench-rec-{os.getpid()}"
    # full: a model whose training state is about 1.5 GB (18 blocks of width 768: 127M parameters)
    model = ({"n_layer": 2, "n_head": 4, "n_embd": 128, "block_size": 64} if quick else
             {"n_layer": 18, "n_head": 12, "n_embd": 768, "block_size": 32})
    data = {} if quick else {"synthetic_chars": 200000}
    trainer = {"checkpoint_every_steps": 10**9, "batch_size": 16 if quick else 1, "model": model, "data": data,
               "threads": 0}
    cfg = _trainer_config(d, trainer,
                          {"checkpoints": {"memory": {"enabled": True, "every_steps": 1, "persist_every": 10**6,
                                                                  "dir": str(region)}},
                                       "training": {"warm_spare": spare}})
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    p = subprocess.Popen([sys.executable, "-m", "daemon", "run", "--config", str(cfg), "--quiet-trainer"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    metrics = d / "logs" / "metrics.jsonl"
    state = d / "logs" / "daemon-state.json"
    try:
        deadline = time.time() + (120 if quick else 600)
        s: dict = {}
        while time.time() < deadline:
            s = json.loads(state.read_text()) if state.exists() else {}
            if (s.get("training", {}).get("step") or 0) >= (30 if quick else 3) and (
                    not spare or s["training"].get("warm_spare")):
                break
            time.sleep(0.1)
        pid = s["training"]["pid"]
        if spare:
            time.sleep(15)  # the spare imports torch (a few seconds on a quiet machine)
        from ckpt_daemon import memory as mem
        from daemon import memagent

        info, _ = mem.Region(region).newest(d / "checkpoints")
        out["recovery_state_mb"] = round(info.nbytes / 2**20, 1) if info else None
        n_before = len(metrics.read_text().splitlines())
        t_kill = time.time()
        os.kill(pid, signal.SIGKILL)
        while time.time() < deadline:
            recs = [json.loads(x) for x in metrics.read_text().splitlines()[n_before:] if x.strip()]
            after = [r for r in recs if r["time"] > t_kill]
            if after:
                out[key] = round(after[0]["time"] - t_kill, 2)
                break
            time.sleep(0.02)
        log = (d / "logs" / "daemon.log").read_text().splitlines()
        ev = [json.loads(x) for x in log if x.startswith("{")]
        persisted = [e for e in ev if e.get("event") == "persisted a memory checkpoint"]
        if persisted and spare:
            out["recovery_persist_s"] = persisted[-1].get("seconds")  # in the background
        verified = [e for e in ev if e.get("event", "").startswith("verified the memory checkpoint at the breakpoint")]
        if verified and spare:
            out["recovery_breakpoint_verify_s"] = verified[-1].get("seconds")
        started = [e for e in ev if e.get("event") == "started trainer"]
        if started:
            out[key.replace("_s", "_warm")] = bool(started[-1].get("warm_spare"))
        tlog = (d / "logs" / "trainer.log").read_text()
        for line in tlog.splitlines():
            if "loaded the memory checkpoint" in line and spare:
                out["recovery_load_s"] = float(line.rsplit("(", 1)[1].rstrip("s)"))
    finally:
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=120)
        from ckpt_daemon import memory as mem
        from daemon import memagent

        memagent.remove_stale_region(region)
        shutil.rmtree(d, ignore_errors=True)
    # where the rest goes: a fresh interpreter, and importing torch in it
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    out["recovery_python_start_s"] = round(time.perf_counter() - t0, 3)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch"], check=True)
    out["recovery_import_torch_s"] = round(time.perf_counter() - t0 - out["recovery_python_start_s"], 3)


def bench_recovery_cold(quick: bool, out: dict) -> None:
    bench_recovery(quick, out, spare=False)


def bench_memory(quick: bool) -> dict:
    out: dict = {"memory_quick": quick}
    for fn in (bench_slots, bench_train_overhead, bench_recovery, bench_recovery_cold):
        try:
            fn(quick, out)
        except Exception as exc:  # one failed figure must not cost the others
            out[f"{fn.__name__}_error"] = f"{exc.__class__.__name__}: {exc}"[:500]
    return out


GOALS = {  # the memory figures' goals, for benchmarks/__main__.py
    "memory_stall_ratio": ("<=", 1.2, "training stall per memory checkpoint / memcpy of the state"),
    "memory_train_overhead": ("<=", 0.05, "slowdown of training with one memory checkpoint per step"),
    "memory_load_ratio": ("<=", 1.5, "verified load from memory / memcpy of the state"),
    "memory_recovery_s": ("<=", 2.0, "SIGKILL of the trainer to its first new step, s (no backoff on a first crash)"),
}


if __name__ == "__main__":
    print(json.dumps(bench_memory("--quick" in sys.argv), indent=1))
