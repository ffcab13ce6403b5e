"""python -m benchmarks [--quick] [--json] [--only NAME,...]

Each figure is measured against a baseline taken in the same run, on the same disk, and printed as
a ratio. The full run rewrites benchmarks/RESULTS.md. --quick uses small sizes (under a minute).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import dd_write, drop_caches
from benchmarks.gpu import GPU_GOALS, gpu_table

REPO = Path(__file__).resolve().parent.parent
WORK = Path(os.environ.get("CKPT_BENCH_DIR", REPO / "benchmarks" / ".work"))


def timed(fn, *a, **k) -> tuple[float, object]:
    t0 = time.perf_counter()
    r = fn(*a, **k)
    return time.perf_counter() - t0, r


def gpt2_state(quick: bool):
    """A GPT-2-124M-shaped training state: fp32 weights plus AdamW moments (about 1.5 GB)."""
    import torch

    torch.manual_seed(0)
    d, layers, vocab, ctx = (768, 12, 50257, 1024) if not quick else (256, 4, 8192, 256)
    shapes = {"wte.weight": (vocab, d), "wpe.weight": (ctx, d), "ln_f.weight": (d,), "ln_f.bias": (d,)}
    for i in range(layers):
        p = f"h.{i}."
        shapes.update({p + "ln_1.weight": (d,), p + "ln_1.bias": (d,), p + "attn.c_attn.weight": (d, 3 * d),
                       p + "attn.c_attn.bias": (3 * d,), p + "attn.c_proj.weight": (d, d), p + "attn.c_proj.bias": (d,),
                       p + "ln_2.weight": (d,), p + "ln_2.bias": (d,), p + "mlp.c_fc.weight": (d, 4 * d),
                       p + "mlp.c_fc.bias": (4 * d,), p + "mlp.c_proj.weight": (4 * d, d), p + "mlp.c_proj.bias": (d,)})

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.params = torch.nn.ParameterDict({k.replace(".", "_"): torch.nn.Parameter(torch.randn(*s) * 0.02)
                                                  for k, s in shapes.items()})

    m = M()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-4)
    for p in m.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    opt.step()
    nbytes = sum(p.numel() * 4 * 3 for p in m.parameters())
    return m, opt, nbytes


# ------------------------------------------------------------------------------------------ figures
def _flat(m, opt) -> dict:
    """The same tensors as a flat name -> tensor dict (what safetensors' save_file takes)."""
    import torch

    d = {f"model.{k}": v for k, v in m.state_dict().items()}
    for pid, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                d[f"optim.{pid}.{k}"] = v.contiguous()
    return d


def _fsync(path: Path) -> None:
    from ckpt_daemon.fsutil import fsync_file

    fsync_file(path)


def _clear(p: Path) -> None:
    if p.is_dir():
        shutil.rmtree(p)
    elif p.exists():
        p.unlink()
    os.sync()  # nothing of one writer's data is left to flush during the next one's timing


def bench_save_and_load(quick: bool, out: dict) -> None:
    """Our save and load against the peers, interleaved on the same state and disk, best of rounds."""
    import warnings

    import torch
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import load_file, save_file

    from ckpt_daemon.checkpoint import CheckpointManager, read_checkpoint
    from ckpt_daemon.fsutil import default_checksum, hash_file, record_checksum
    from ckpt_daemon.store import catalog as cat
    from ckpt_daemon.store import verifyonce

    warnings.filterwarnings("ignore")  # DCP warns that no process group is initialised (one process)
    m, opt, nbytes = gpt2_state(quick)
    root = WORK / "save"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    out["state_bytes"] = nbytes
    out["checksum"] = default_checksum()
    mgr = CheckpointManager(root / "ours", save_margin_bytes=0)
    sd = {"model": m.state_dict(), "optimizer": opt.state_dict()}
    flat = _flat(m, opt)

    def torch_save(p: Path) -> None:
        with open(p, "wb") as f:
            torch.save(sd, f)
            f.flush()
            os.fsync(f.fileno())

    def st_save(p: Path) -> None:
        save_file(flat, str(p))
        _fsync(p)

    writers = {
        "dd": lambda step: dd_write(root / "dd.bin", nbytes),
        "torch_save": lambda step: timed(torch_save, root / "t.pt")[0],
        "safetensors": lambda step: timed(st_save, root / "s.safetensors")[0],
        "dcp": lambda step: timed(dcp.save, sd, checkpoint_id=str(root / f"dcp-{step}"))[0],
        "save": lambda step: timed(mgr.save, step, model=m, optimizer=opt)[0],
    }
    # This machine's disk varies from run to run: interleave, and take the best of each.
    times: dict[str, list] = {k: [] for k in writers}
    for step in range(1, 4):
        for k, fn in writers.items():
            os.sync()
            times[k].append(fn(step))
            for p in (root / "t.pt", root / "s.safetensors", root / f"dcp-{step}", root / "ours" / f"checkpoint-{step}"):
                if step < 3 or p.name not in ("t.pt", "s.safetensors"):
                    _clear(p)
    best = {k: min(v) for k, v in times.items()}
    out["save_s"], out["dd_s"] = round(best["save"], 3), round(best["dd"], 3)
    out["torch_save_s"], out["safetensors_save_s"], out["dcp_save_s"] = (
        round(best["torch_save"], 3), round(best["safetensors"], 3), round(best["dcp"], 3))
    out["save_vs_dd"] = round(best["dd"] / best["save"], 3)
    out["save_vs_torch"] = round(best["save"] / best["torch_save"], 3)
    # async: how long training is blocked; and how long the write takes in all
    stalls, totals = [], []
    for step in (4, 5):
        t0 = time.perf_counter()
        mgr.save(step, model=m, optimizer=opt, blocking=False)
        stalls.append(time.perf_counter() - t0)
        mgr.wait()
        totals.append(time.perf_counter() - t0)
    out["async_stall_s"], out["async_total_s"] = round(min(stalls), 3), round(min(totals), 3)
    out["async_stall_ratio"] = round(min(stalls) / best["save"], 4)
    stalls, totals = [], []
    for _ in range(2):
        _clear(root / "dcp-async")
        t0 = time.perf_counter()
        fut = dcp.async_save(sd, checkpoint_id=str(root / "dcp-async"))
        stalls.append(time.perf_counter() - t0)
        fut.result()
        totals.append(time.perf_counter() - t0)
    out["dcp_async_stall_s"], out["dcp_async_total_s"] = round(min(stalls), 3), round(min(totals), 3)
    _clear(root / "dcp-async")
    ck = root / "ours" / "checkpoint-5"
    _clear(root / "ours" / "checkpoint-4")
    files = sorted(p for p in ck.iterdir() if p.is_file())
    st_files = [p for p in files if p.name.endswith(".safetensors")]

    def raw_read():
        for f in files:
            with open(f, "rb", buffering=0) as fh:
                buf = bytearray(16 << 20)
                while fh.readinto(buf):
                    pass

    def st_load():  # the same files, unverified: safetensors' own loader (and the small JSON beside them)
        r = [load_file(str(p)) for p in st_files]
        json.loads((ck / "state.json").read_bytes())
        return r

    # cold loads: the page cache is dropped before each (we run as root); else they are warm and say so
    cold = drop_caches()
    loads: dict[str, list] = {"ours": [], "safetensors": [], "torch_load": [], "read": []}
    for _ in range(2):
        for k, fn in (("read", raw_read), ("ours", lambda: read_checkpoint(ck)), ("safetensors", st_load),
                      ("torch_load", lambda: torch.load(root / "t.pt", weights_only=True))):
            drop_caches()
            loads[k].append(timed(fn)[0])
    lb = {k: min(v) for k, v in loads.items()}
    out["load_cold_cache"] = cold
    out["load_s"], out["read_s"] = round(lb["ours"], 3), round(lb["read"], 3)
    out["safetensors_load_s"], out["torch_load_s"] = round(lb["safetensors"], 3), round(lb["torch_load"], 3)
    out["load_vs_read"] = round(lb["read"] / lb["ours"], 3)
    out["load_vs_safetensors"] = round(lb["ours"] / lb["safetensors"], 3)
    # verify once per restart: the daemon's check (cold) then the trainer's load, with and without its record
    entry = cat.scan(ck.parent, ["checkpoint-{step}"], stats=False).by_name(ck.name)
    record = ck.parent / ".ckpt-daemon" / verifyonce.RECORD
    restart: dict[str, list] = {"once": [], "twice": []}
    for _ in range(2):
        for k in ("twice", "once"):
            record.unlink(missing_ok=True)
            drop_caches()
            t0 = time.perf_counter()
            (verifyonce.verify_and_record if k == "once" else cat.verify_entry)(entry)
            read_checkpoint(ck)
            restart[k].append(time.perf_counter() - t0)
    record.unlink(missing_ok=True)
    out["restart_verify_load_s"] = round(min(restart["once"]), 3)
    out["restart_verify_load_before_s"] = round(min(restart["twice"]), 3)
    # verify (our checksum of every file, warm cache) against `sha256sum` of the same files
    man = json.loads((ck / "manifest.json").read_text())["files"]
    tool = min(timed(subprocess.run, ["sha256sum", *map(str, files)], check=True, capture_output=True)[0] for _ in range(2))
    ours = min(timed(lambda: [hash_file(ck / n, record_checksum(r)[0]) for n, r in man.items()])[0] for _ in range(2))
    out["verify_s"], out["sha256sum_s"] = round(ours, 3), round(tool, 3)
    out["verify_vs_hash_tool"] = round(tool / ours, 3)
    mgr.close()
    shutil.rmtree(root, ignore_errors=True)


PEERS = Path(os.environ.get("CKPT_BENCH_PEERS", REPO / "benchmarks" / ".work" / "peers"))


def bench_dlrover(quick: bool, out: dict) -> None:
    """DLRover Flash Checkpoint on the same state (benchmarks/dlrover_peer.py, its own process). It is
    installed apart from the project's environment: pip install --target benchmarks/.work/peers dlrover grpcio."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PEERS), str(REPO)])}
    try:
        r = subprocess.run([sys.executable, "-m", "benchmarks.dlrover_peer", *(["--quick"] if quick else []),
                            str(WORK / "dlrover")], capture_output=True, text=True, env=env, timeout=900)
        line = next((ln for ln in reversed(r.stdout.splitlines()) if ln.startswith("{")), None)
        res = json.loads(line) if line else {"dlrover_skipped": f"no result (exit {r.returncode}): {r.stderr.strip()[-200:]}"}
    except subprocess.TimeoutExpired:
        res = {"dlrover_skipped": "timed out after 900 s"}
    out.update(res)
    shutil.rmtree(WORK / "dlrover", ignore_errors=True)


def bench_memory_first(quick: bool, out: dict) -> None:
    """Memory-first checkpoints (benchmarks/memory.py, when present)."""
    try:
        from benchmarks.memory import bench_memory
    except ImportError as exc:
        out["memory_skipped"] = f"benchmarks.memory is not importable ({exc})"
        return
    out.update(bench_memory(quick))


def bench_integrations(quick: bool, out: dict) -> None:
    """Hugging Face saves to disk and to memory (benchmarks/integrations.py)."""
    from benchmarks.integrations import bench_integrations as run

    out.update(run(quick))


def bench_gpu(quick: bool, out: dict) -> None:
    """Saves and loads of a state on a CUDA GPU (benchmarks/gpu.py); without one it says so and measures nothing."""
    from benchmarks.gpu import bench_gpu as run

    got = run(quick)
    out.update(got)
    if got.get("gpu_skipped"):
        print(f"gpu: this section needs a CUDA GPU and measured nothing: {got['gpu_skipped']}", file=sys.stderr,
              flush=True)


def bench_replicas(quick: bool, out: dict) -> None:
    """Verified upload and restore of a replica against an `aws s3 cp`-style copy (benchmarks/replicas.py)."""
    from benchmarks.replicas import bench_replicas as run

    out.update(run(quick))


def bench_snapshot(quick: bool, out: dict) -> None:
    import numpy as np

    from ckpt_daemon.store.manifest import build_manifest, dumps_manifest
    from maintenance.snapshot import _copy_checkpoint

    root = WORK / "snap"
    shutil.rmtree(root, ignore_errors=True)
    src, dst_snap, dst_cp = root / "ck", root / "snap", root / "cp"
    for d in (src, dst_snap, dst_cp):
        d.mkdir(parents=True)
    per = (256 << 20) if not quick else (4 << 20)
    data = np.random.default_rng(0).integers(0, 255, size=per, dtype=np.uint8).tobytes()
    for i in range(20):
        d = src / f"checkpoint-{(i + 1) * 100}"
        d.mkdir()
        (d / "state.safetensors").write_bytes(data)
        m = build_manifest((i + 1) * 100, {"state.safetensors": {"size": per}})
        (d / "manifest.json").write_bytes(dumps_manifest(m, "sha256"))
    os.sync()
    total = 20 * per
    free0 = shutil.disk_usage(root).free
    t_snap, _ = timed(lambda: [_copy_checkpoint(d, dst_snap / d.name, "link") for d in sorted(src.iterdir())])
    os.sync()
    extra = max(0, free0 - shutil.disk_usage(root).free)
    t_cp, _ = timed(subprocess.run, ["cp", "-a", *[str(p) for p in sorted(src.iterdir())], str(dst_cp)], check=True)
    os.sync()
    out["snapshot_bytes"] = total
    out["snapshot_s"], out["cp_a_s"] = round(t_snap, 4), round(t_cp, 3)
    out["snapshot_vs_cp"] = round(t_snap / t_cp, 5)
    out["snapshot_extra_bytes"] = extra
    shutil.rmtree(root, ignore_errors=True)


def bench_plan(quick: bool, out: dict) -> None:
    from ckpt_daemon.config import Config
    from maintenance.retention import Item, plan

    tiers = Config().retention.tiers
    small, big = (100_000, 1_000_000) if not quick else (20_000, 200_000)
    times = {}
    for n in (small, big):
        its = [Item(f"checkpoint-{s}", s) for s in range(100, 100 * (n + 1), 100)]
        times[n] = min(timed(plan, its, tiers)[0] for _ in range(2))
    out["plan_small_n"], out["plan_big_n"] = small, big
    out["plan_small_s"], out["plan_big_s"] = round(times[small], 3), round(times[big], 3)
    out["plan_scaling"] = round(times[big] / times[small], 2)


def bench_cleanup(quick: bool, out: dict) -> None:
    import torch

    from ckpt_daemon.config import load_config
    from ckpt_daemon.fsutil import digest_record, new_hasher
    from ckpt_daemon.store import catalog as cat
    from ckpt_daemon.store.manifest import build_manifest, dumps_manifest
    from ckpt_daemon.store.safetensors_file import header_for
    from maintenance import cleanup

    n = 10_000 if not quick else 2_000
    root = WORK / "cleanup"
    shutil.rmtree(root, ignore_errors=True)
    ck = root / "checkpoints"
    ck.mkdir(parents=True)
    t = {"w": torch.zeros(4)}
    st = header_for(t) + bytes(16)
    h = new_hasher("blake3")
    h.update(st)
    rec = {"size": len(st), **digest_record("blake3", h.hexdigest())}
    for i in range(1, n + 1):
        d = ck / f"checkpoint-{i * 100}"
        d.mkdir()
        (d / "model.safetensors").write_bytes(st)
        (d / "manifest.json").write_bytes(dumps_manifest(build_manifest(i * 100, {"model.safetensors": rec}), "blake3"))
    (root / "config.yaml").write_text("checkpoints: {}\n")
    cfg = load_config(root / "config.yaml")
    find = min(timed(subprocess.run, ["find", str(ck), "-maxdepth", "2"], check=True,
                     capture_output=True)[0] for _ in range(3))
    cat._CACHE.clear()
    cold = timed(cleanup.run_cleanup, cfg, True)[0]  # the first scan in a process: every manifest parsed
    dry = min(timed(cleanup.run_cleanup, cfg, True)[0] for _ in range(2))
    out["cleanup_folders"] = n
    out["cleanup_dry_run_s"], out["cleanup_cold_s"], out["find_s"] = round(dry, 3), round(cold, 3), round(find, 3)
    out["cleanup_vs_find"] = round(dry / find, 2)
    out["cleanup_cold_vs_find"] = round(cold / find, 2)
    shutil.rmtree(root, ignore_errors=True)


def bench_train_overhead(quick: bool, out: dict) -> None:
    """Slowdown of the built-in trainer's steps with checkpoints at the default interval against none.

    Two processes run at slightly different speeds on a shared machine, so each run is measured
    against itself: mean step time over median step time (a save shows up as slower steps around it),
    and the checkpointing run's ratio is compared with the run without checkpoints."""
    import statistics

    steps = 1200 if not quick else 300
    ratios, rates = {}, {}
    for label, every in (("none", 10**9), ("default", 100)):
        d = WORK / f"train-{label}"
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        (d / "config.yaml").write_text(json.dumps({"trainer": {"checkpoint_every_steps": every,
                                                               "eval_every_steps": 10**9,
                                                               "log_every_steps": 10**9, "threads": 1}}))
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
        subprocess.run([sys.executable, "-m", "trainer", "--config", str(d / "config.yaml"), "--max-steps", str(steps)],
                       check=True, capture_output=True, env=env)
        recs = [json.loads(ln) for ln in (d / "logs" / "metrics.jsonl").read_text().splitlines()]
        times = [r["time"] for r in recs if 20 <= r["step"] < steps]  # startup and the final save excluded
        dts = [b - a for a, b in zip(times, times[1:])]
        ratios[label] = statistics.fmean(dts) / statistics.median(dts)
        rates[label] = 1 / statistics.fmean(dts)
        shutil.rmtree(d, ignore_errors=True)
    out["steps_per_s_no_ckpt"], out["steps_per_s_ckpt"] = round(rates["none"], 1), round(rates["default"], 1)
    out["train_overhead"] = round(ratios["default"] / ratios["none"] - 1, 4)


def bench_daemon(quick: bool, out: dict) -> None:
    import psutil

    d = WORK / "daemon"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    (d / "config.yaml").write_text(json.dumps({
        "training": {"command": [sys.executable, "-c", "import time; time.sleep(3600)"]}}))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    p = subprocess.Popen([sys.executable, "-m", "daemon", "run", "--config", str(d / "config.yaml"), "--quiet-trainer"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        time.sleep(3)
        proc = psutil.Process(p.pid)
        window = 60 if not quick else 10
        c0, t0 = proc.cpu_times(), time.monotonic()
        time.sleep(window)
        c1, t1 = proc.cpu_times(), time.monotonic()
        out["daemon_idle_window_s"] = window
        out["daemon_rss_mb"] = round(proc.memory_info().rss / 2**20, 1)
        out["daemon_cpu_share"] = round(((c1.user - c0.user) + (c1.system - c0.system)) / (t1 - t0), 5)
    finally:
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=60)
        shutil.rmtree(d, ignore_errors=True)
    # The same daemon with notifications on (apprise is imported only then): its RSS, once its targets are loaded.
    d.mkdir(parents=True)
    (d / "config.yaml").write_text(json.dumps({
        "training": {"command": [sys.executable, "-c", "import time; time.sleep(3600)"]},
        "notify": {"urls": ["json://127.0.0.1:9/hook",
                            "mailto://127.0.0.1:2525?from=a@example.com&to=b@example.com"]}}))
    p = subprocess.Popen([sys.executable, "-m", "daemon", "run", "--config", str(d / "config.yaml"), "--quiet-trainer"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        deadline = time.monotonic() + 60
        while "notifications go to" not in ((d / "logs" / "daemon.log").read_text() if (d / "logs" / "daemon.log").exists()
                                         else "") and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(3)
        rss = psutil.Process(p.pid).memory_info().rss / 2**20
        out["daemon_rss_notify_mb"] = round(rss, 1)
        out["daemon_rss_notify_ratio"] = round(rss / out["daemon_rss_mb"], 2)
    finally:
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=60)
        shutil.rmtree(d, ignore_errors=True)


def bench_recovery(quick: bool, out: dict) -> None:
    """From a SIGKILL of the trainer to its first step after resume, minus the configured backoff."""
    d = WORK / "recovery"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    backoff = 1.0
    (d / "config.yaml").write_text(json.dumps({
        "trainer": {"checkpoint_every_steps": 20, "eval_every_steps": 10**9, "log_every_steps": 10**9, "threads": 1},
        "training": {"restart": {"initial_backoff_s": backoff, "max_backoff_s": backoff}}}))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    p = subprocess.Popen([sys.executable, "-m", "daemon", "run", "--config", str(d / "config.yaml"), "--quiet-trainer"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    metrics = d / "logs" / "metrics.jsonl"
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            s = json.loads((d / "logs" / "daemon-state.json").read_text()) if (d / "logs" / "daemon-state.json").exists() else {}
            if s.get("training", {}).get("step", 0) and s["training"]["step"] >= 60:
                break
            time.sleep(0.1)
        pid = s["training"]["pid"]
        n_before = len(metrics.read_text().splitlines())
        t_kill = time.time()
        os.kill(pid, signal.SIGKILL)
        while time.time() < deadline:
            lines = metrics.read_text().splitlines()[n_before:]
            recs = [json.loads(ln) for ln in lines if ln.strip()]
            after = [r for r in recs if r["time"] > t_kill]
            if after:
                out["recovery_s"] = round(after[0]["time"] - t_kill - backoff, 2)
                out["recovery_backoff_s"] = backoff
                break
            time.sleep(0.05)
    finally:
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=60)
        shutil.rmtree(d, ignore_errors=True)


BENCHES = {"save": bench_save_and_load, "dlrover": bench_dlrover, "memory": bench_memory_first,
           "snapshot": bench_snapshot, "plan": bench_plan, "cleanup": bench_cleanup, "train": bench_train_overhead,
           "daemon": bench_daemon, "recovery": bench_recovery, "integrations": bench_integrations,
           "replicas": bench_replicas, "gpu": bench_gpu}

GOALS = {  # name: (comparison, goal, meaning)
    "save_vs_torch": ("<=", 1.0,
                      "our blocking save (checksummed, atomic commit) / torch.save+fsync, same state and disk"),
    "save_vs_dd": (">=", 0.95, "dd conv=fsync time / our blocking save time, same bytes"),
    "load_vs_safetensors": ("<=", 1.2,
                            "our verified cold load / unverified safetensors load_file of the same files, cold"),
    "async_stall_ratio": ("<=", 0.10, "training blocked by an async save / a sync save"),
    "memory_stall_ratio": ("<=", 1.2, "training stall per memory checkpoint / memcpy of the state"),
    "memory_train_overhead": ("<=", 0.05, "train slowdown with one memory checkpoint per step"),
    "memory_load_ratio": ("<=", 1.5, "load from memory at a restart (the daemon verified the slot at the breakpoint: "
                          "verify once) / memcpy of the state"),
    "memory_load_hashing_ratio": ("<=", None, "the same load hashing every file itself (no record of the daemon's "
                                  "check) / memcpy"),
    "memory_breakpoint_verify_s": ("<=", None, "the daemon's check of the slot in memory at the breakpoint, s"),
    "memory_recovery_s": ("<=", 2.0, "trainer SIGKILL to first new step, backoff excluded, with a warm spare "
                          "(training.warm_spare), s"),
    "memory_recovery_cold_s": ("<=", None, "the same without a warm spare (a new interpreter imports torch), s"),
    "cleanup_vs_find": ("<=", 5, "cleanup --dry-run over 10k folders (in-process, best of 2) / find -maxdepth 2"),
    "cleanup_cold_vs_find": ("<=", None, "the same, first scan in a process (every manifest parsed) / find"),
    "train_overhead": ("<=", 0.02, "1 - steps/s with checkpoints at the default interval / without"),
    "load_vs_read": (">=", 0.9, "raw read time / load-and-verify time of the same checkpoint, cold"),
    "verify_vs_hash_tool": (">=", 0.9, "sha256sum time / our verify time (the manifest's checksum), same files"),
    "restart_verify_load_s": ("<=", None, "daemon's check + trainer's load at a restart, cold, verify once, s"),
    "restart_verify_load_before_s": ("<=", None, "the same with the trainer hashing again (before), s"),
    "snapshot_vs_cp": ("<=", 0.01, "snapshot of 20 checkpoints / cp -a of them"),
    "snapshot_extra_bytes": ("<=", 0, "bytes the snapshot added on disk"),
    "plan_scaling": ("<=", 12, "plan time at 1M / at 100k checkpoints"),
    "daemon_rss_mb": ("<=", 80, "daemon RSS while idle, MiB"),
    "daemon_rss_notify_mb": ("<=", 100, "the same with notify.urls set (apprise loaded), MiB"),
    "daemon_rss_notify_ratio": ("<=", 1.5, "daemon RSS with notifications / without, same run"),
    "daemon_cpu_share": ("<=", 0.005, "daemon CPU share while idle"),
    "recovery_s": ("<=", None, "SIGKILL to first step after resume from disk, minus backoff, s"),
    "hf_memory_vs_disk": ("<=", None, "Hugging Face Trainer: training stall per save with memory checkpoints / its "
                          "own save to disk (page cache, no fsync), same model (benchmarks/integrations.py)"),
    "hf_memory_vs_disk_fsync": ("<=", None, "the same / its save to disk made durable (fsync of its files)"),
    "hf_train_memory_s": ("<=", None, "the whole 6-step run with a save per step, memory mode, s (background copy and "
                          "hashing included)"),
    "hf_train_disk_s": ("<=", None, "the same run saving to disk as Hugging Face does, each save then fsynced (the "
                        "durable figure), s"),
    "replica_upload_vs_copy": ("<=", 1.5, "our verified upload of a checkpoint / boto3's managed upload (aws s3 cp) of "
                               "the same bytes to the same server (SeaweedFS), same part size and concurrency"),
    "replica_restore_vs_copy": ("<=", 2.0, "our restore (download, verify every checksum, commit) / boto3's managed "
                                "download + fsync of the same bytes"),
    "replica_daemon_peak_rss_mb": ("<=", None, "the daemon's peak RSS while it uploads a replica (boto3 loaded, "
                                   "parallel x part_size of buffers), MiB"),
}

# writer: (blocking save, async stall, async total / persisted, cold load) keys in the results
PEER_ROWS = [
    ("dd conv=fsync (same bytes)", "dd_s", None, None, None),
    ("torch.save + fsync", "torch_save_s", None, None, "torch_load_s"),
    ("safetensors save_file + fsync", "safetensors_save_s", None, None, "safetensors_load_s"),
    ("torch.distributed.checkpoint save / async_save", "dcp_save_s", "dcp_async_stall_s", "dcp_async_total_s", None),
    ("DLRover flash checkpoint (memory, then disk)", None, "dlrover_memory_stall_s", "dlrover_persist_s",
     "dlrover_load_memory_s"),
    ("ckpt-daemon blocking / async (checksummed, atomic)", "save_s", "async_stall_s", "async_total_s", "load_s"),
    ("ckpt-daemon memory-first", None, "memory_stall_s", "memory_persist_s", "memory_load_s"),
]


GOALS.update(GPU_GOALS)


def verdict(name: str, value) -> str:
    op, goal, _ = GOALS.get(name, (None, None, None))
    if goal is None or value is None:
        return ""
    ok = value >= goal if op == ">=" else value <= goal
    return "met" if ok else "NOT met"


def machine() -> str:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    import torch

    return (f"{cpu}, {os.cpu_count()} cores, {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB, "
            f"{platform.system()} {platform.release()}, Python {platform.python_version()}, torch {torch.__version__}, "
            f"GPU: {'yes' if torch.cuda.is_available() else 'none'}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[1])
    ap.add_argument("--quick", action="store_true", help="small sizes (under a minute)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--only", default="", help=f"comma-separated subset of {','.join(BENCHES)}")
    args = ap.parse_args(argv)
    WORK.mkdir(parents=True, exist_ok=True)
    out: dict = {}
    chosen = [b for b in (args.only.split(",") if args.only else BENCHES) if b]
    t0 = time.time()
    for name in chosen:
        if not args.json:
            print(f"running {name} ...", file=sys.stderr, flush=True)
        try:
            BENCHES[name](args.quick, out)
        except Exception as exc:  # one broken figure must not cost the others of a long run
            out[f"{name}_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
            print(f"{name} failed: {out[name + '_error']}", file=sys.stderr, flush=True)
        (WORK / "partial.json").write_text(json.dumps(out, indent=2))
    out["elapsed_s"] = round(time.time() - t0, 1)
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        for k, v in out.items():
            g = GOALS.get(k)
            print(f"{k:24} {v!s:>14}  {('goal ' + g[0] + ' ' + str(g[1]) + ' ' + verdict(k, v)) if g and g[1] is not None else ''}")
    if not args.quick and not args.only:
        write_results(out)
    elif not args.quick and "gpu" in chosen and "gpu_state_bytes" in out:
        write_gpu_section(out)  # a GPU machine's run of --only gpu: its table goes into RESULTS.md
    return 0


GPU_BEGIN, GPU_END = "<!-- gpu-results -->", "<!-- /gpu-results -->"


def write_gpu_section(out: dict) -> None:
    """Put the GPU table into RESULTS.md between its markers (replacing the one there), the rest unchanged."""
    path = REPO / "benchmarks" / "RESULTS.md"
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    block = "\n".join([GPU_BEGIN, f"- date: {time.strftime('%Y-%m-%d %H:%M %Z')}; machine: {machine()}",
                       "- command: `python -m benchmarks --only gpu`", "", *gpu_table(out), GPU_END])
    if GPU_BEGIN in text and GPU_END in text:
        head, rest = text.split(GPU_BEGIN, 1)
        text = head + block + rest.split(GPU_END, 1)[1]
    else:
        marker = "\nRaw figures:"
        text = text.replace(marker, "\n" + block + "\n" + marker, 1) if marker in text else text + "\n" + block + "\n"
    path.write_text(text)


def write_results(out: dict) -> None:
    lines = ["# Benchmark results", "", f"- date: {time.strftime('%Y-%m-%d %H:%M %Z')}", f"- machine: {machine()}",
             "- command: `.venv/bin/python -m benchmarks`", "", "| figure | value | goal | meaning |",
             "|---|---|---|---|"]
    for k, (op, goal, meaning) in GOALS.items():
        v = out.get(k)
        target = f"{op} {goal} ({verdict(k, v)})" if goal is not None else "recorded"
        lines.append(f"| `{k}` | {v} | {target} | {meaning} |")
    lines += ["",
              f"Peers on the same {out.get('state_bytes', 0) / 1e9:.2f} GB GPT-2-124M AdamW state and disk (seconds; "
              "blank: not applicable):", "",
              "| writer | blocking save | async stall | async total / persisted | cold load |",
              "|---|---|---|---|---|"]
    for label, *keys in PEER_ROWS:
        lines.append(f"| {label} | " + " | ".join("" if k is None or out.get(k) is None else str(out[k]) for k in keys) + " |")
    for k in ("dlrover_skipped", "memory_skipped"):
        if out.get(k):
            lines.append(f"\n{k.split('_')[0]}: skipped: {out[k]}")
    lines += ["", GPU_BEGIN, *gpu_table(out), GPU_END]
    lines += ["", "Raw figures:", "", "```json", json.dumps(out, indent=2), "```", ""]
    notes = REPO / "benchmarks" / "NOTES.md"
    if notes.exists():
        lines += [notes.read_text()]
    (REPO / "benchmarks" / "RESULTS.md").write_text("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
