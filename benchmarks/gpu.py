"""Checkpoints of a training state on a GPU, against the floors and peers of the same run:
`bench_gpu(quick) -> dict` (`python -m benchmarks --only gpu`; also `python -m benchmarks.gpu [--quick]`,
which prints the figures as JSON).

The state is the project's GPT at GPT-2-124M's shape (fp32 weights and AdamW moments, about 1.5 GB, the
CPU table's size) training with bf16 autocast; $CKPT_BENCH_GPU_MODEL=355m or 1.3b takes the shapes of
../shared/GPU.md's figures. Floors: a copy of the whole state from the device into pinned host memory
(the least any save can stall training) and `dd conv=fsync` of the same bytes (the least any durable
save takes). Each saver is measured inside the training loop: its stall (the save call, training
blocked), the extra time of the 10 steps that follow (in steps: background work competing with
training), and the time until the checkpoint is durable; then cold loads onto the GPU. Without CUDA the
section says so and returns.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

from benchmarks.common import dd_write
from benchmarks.common import drop_caches as _drop_caches  # a name of this module: tests replace it

REPO = Path(__file__).resolve().parent.parent
WORK = Path(os.environ.get("CKPT_BENCH_DIR", REPO / "benchmarks" / ".work"))

GPU_GOALS = {  # name: (comparison, goal, meaning), merged into benchmarks.__main__.GOALS
    "gpu_memory_stall_ratio": ("<=", 1.2, "GPU: memory-first stall (saves 3-5) / pinned device copy of the state"),
    "gpu_memory_first_stall_ratio": ("<=", None, "GPU: the same for the first memory save (slots reserved, faulted "
                                     "in and registered at start: gpu_memory_reserve_s)"),
    "gpu_async_stall_ratio": ("<=", 1.2, "GPU: our async save's stall / pinned device copy"),
    "gpu_next_steps_slowdown": ("<=", 0.5, "GPU: extra time of the 10 steps after an async or memory save, in steps "
                                "(the worse of the two)"),
    "gpu_load_vs_safetensors": ("<=", 1.0, "GPU: our verified cold load onto the GPU / safetensors "
                                "load_file(device='cuda') of the same files, cold"),
    "gpu_save_vs_dd": ("<=", 1.0, "GPU: our blocking save / dd conv=fsync of the same bytes"),
}

MODELS = {  # name: (n_layer, n_head, n_embd, vocab, block, batch)
    "dry": (2, 2, 64, 256, 32, 2),  # device="cpu": the script's every path, in seconds (tests/test_device.py)
    "quick": (4, 4, 256, 8192, 256, 8),
    "124m": (12, 12, 768, 50257, 1024, 8),
    "355m": (24, 16, 1024, 50257, 1024, 8),
    "1.3b": (24, 32, 2048, 50257, 1024, 4),
}

# writer: (stall, next-10-steps slowdown, until durable, cold load) keys
GPU_ROWS = [
    ("pinned device copy (floor of any stall)", "gpu_floor_copy_s", None, None, None),
    ("dd conv=fsync (floor of a durable save)", None, None, "gpu_dd_s", None),
    ("torch.save + fsync", "gpu_torch_save_s", None, "gpu_torch_save_s", "gpu_torch_load_s"),
    ("safetensors load_file(device='cuda')", None, None, None, "gpu_safetensors_load_s"),
    ("torch.distributed.checkpoint save", "gpu_dcp_save_s", None, "gpu_dcp_save_s", None),
    ("torch.distributed.checkpoint async_save (default)", "gpu_dcp_async_stall_s", "gpu_dcp_async_next_steps",
     "gpu_dcp_async_durable_s", None),
    ("torch.distributed.checkpoint async_save (pinned stager)", "gpu_dcp_pinned_stall_s", "gpu_dcp_pinned_next_steps",
     "gpu_dcp_pinned_durable_s", None),
    ("ckpt-daemon blocking", "gpu_save_s", None, "gpu_save_s", "gpu_load_s"),
    ("ckpt-daemon async", "gpu_async_stall_s", "gpu_async_next_steps", "gpu_async_durable_s", None),
    ("ckpt-daemon memory-first (durable: the daemon's persist)", "gpu_memory_stall_s", "gpu_memory_next_steps",
     "gpu_memory_durable_s", "gpu_memory_load_s"),
]


def _sync(dev) -> None:
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _model(quick: bool, dev):
    import torch

    from ckpt_daemon.models.gpt import GPT, GPTConfig

    name = "dry" if dev.type == "cpu" else "quick" if quick else os.environ.get("CKPT_BENCH_GPU_MODEL", "124m")
    if name not in MODELS:
        raise ValueError(f"$CKPT_BENCH_GPU_MODEL is {name[:40]!r}; use one of {', '.join(MODELS)}")
    n_layer, n_head, n_embd, vocab, block, batch = MODELS[name]
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=vocab, block_size=block, n_layer=n_layer, n_head=n_head, n_embd=n_embd)).to(dev)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-4)
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randint(0, vocab, (batch, block), device=dev, generator=g)

    def step() -> float:
        t0 = time.perf_counter()
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            _, loss = m(x, x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()  # the step's end, as a training loop that logs its loss sees it
        return time.perf_counter() - t0

    return name, m, opt, step


def _tensors(m, opt) -> list:
    ts = list({id(p): p for p in m.parameters()}.values())
    for st in opt.state.values():
        ts += [v for v in st.values() if hasattr(v, "dim") and v.dim() > 0]
    return ts


def _floor_copy(ts, dev) -> float:
    """Best of 3: every state tensor copied from the device into pinned host buffers allocated beforehand."""
    import torch

    bufs = [torch.empty(t.shape, dtype=t.dtype, pin_memory=dev.type == "cuda") for t in ts]
    best = float("inf")
    for _ in range(4):
        _sync(dev)
        t0 = time.perf_counter()
        for b, t in zip(bufs, ts):
            b.copy_(t.detach(), non_blocking=True)
        _sync(dev)
        best = min(best, time.perf_counter() - t0)
    return best


def _after(step, n: int, base: float) -> float:
    """Extra time of the next n steps, in steps."""
    return (sum(step() for _ in range(n)) - n * base) / base


def bench_gpu(quick: bool, device: str = "cuda") -> dict:
    """The figures; device="cpu" runs the same code on the CPU (a dry run of the script, no GPU figures)."""
    out: dict = {}
    try:
        import torch
    except ImportError as exc:
        return {"gpu_skipped": f"torch is not importable ({exc})"}
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        return {"gpu_skipped": f"no CUDA GPU on this machine (torch {torch.__version__}: torch.cuda.is_available() "
                               "is False); the GPU figures are still to be measured"}
    import warnings

    import torch.distributed.checkpoint as dcp
    from safetensors.torch import load_file

    from ckpt_daemon import memory as mem
    from ckpt_daemon.checkpoint import CheckpointManager, read_checkpoint
    from daemon import memagent

    warnings.filterwarnings("ignore")  # DCP warns that no process group is initialised (one process)
    root = WORK / "gpu"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    region = Path("/dev/shm") / f"ckpt-bench-gpu-{os.getpid()}"
    name, m, opt, step = _model(quick, dev)
    out["gpu_name"] = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu (dry run)"
    out["gpu_model"] = name
    for _ in range(3):
        step()  # warm-up; the AdamW state exists from here on
    ts = _tensors(m, opt)
    nbytes = sum(t.numel() * t.element_size() for t in ts)
    out["gpu_state_bytes"] = nbytes
    base = statistics.median(step() for _ in range(10))
    out["gpu_step_s"] = round(base, 4)
    floor = _floor_copy(ts, dev)
    out["gpu_floor_copy_s"] = round(floor, 4)
    out["gpu_dd_s"] = round(min(dd_write(root / "dd.bin", nbytes) for _ in range(2)), 3)
    sd = {"model": m.state_dict(), "optimizer": opt.state_dict()}
    n_after = 10

    def clear(p: Path) -> None:
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        os.sync()

    # -- blocking savers: the stall is the whole save
    def torch_save(p: Path) -> None:
        with open(p, "wb") as f:
            torch.save(sd, f)
            f.flush()
            os.fsync(f.fileno())

    mgr = CheckpointManager(root / "ours", save_margin_bytes=0)
    blocking = {"torch_save": lambda i: torch_save(root / "t.pt"),
                "dcp_save": lambda i: dcp.save(sd, checkpoint_id=str(root / f"dcp-{i}")),
                "save": lambda i: mgr.save(100 + i, model=m, optimizer=opt)}
    times: dict[str, list] = {k: [] for k in blocking}
    for i in range(2):
        for k, fn in blocking.items():
            step()
            _sync(dev)
            os.sync()
            t0 = time.perf_counter()
            fn(i)
            times[k].append(time.perf_counter() - t0)
            if not (k == "torch_save" and i == 1) and not (k == "save" and i == 1):
                clear(root / ("t.pt" if k == "torch_save" else f"dcp-{i}" if k == "dcp_save" else f"ours/checkpoint-{100 + i}"))
    for k, v in times.items():
        out[f"gpu_{k}_s"] = round(min(v), 3)
    out["gpu_save_vs_dd"] = round(out["gpu_save_s"] / out["gpu_dd_s"], 3)

    # -- async savers: stall, the following steps, time until durable (best of saves 2-4: 1 fills the buffers)
    def measure(save, durable, label: str, rounds: int = 4, cleanup=lambda i: None) -> None:
        stalls, afters, durables = [], [], []
        for i in range(rounds):
            step()
            _sync(dev)
            t0 = time.perf_counter()
            h = save(i)
            stalls.append(time.perf_counter() - t0)
            afters.append(_after(step, n_after, base))
            durable(h)
            durables.append(time.perf_counter() - t0)
            cleanup(i)  # a large state's copies would fill the disk
        later = slice(1, None)
        out[f"gpu_{label}_first_stall_s"] = round(stalls[0], 4)
        out[f"gpu_{label}_stall_s"] = round(min(stalls[later]), 4)
        out[f"gpu_{label}_next_steps"] = round(statistics.median(afters[later]), 3)
        out[f"gpu_{label}_durable_s"] = round(min(durables[later]), 3)

    measure(lambda i: mgr.save(200 + i, model=m, optimizer=opt, blocking=False), lambda h: mgr.wait(), "async",
            cleanup=lambda i: clear(root / "ours" / f"checkpoint-{200 + i}"))
    out["gpu_async_stall_ratio"] = round(out["gpu_async_stall_s"] / floor, 3)

    def dcp_durable(fut) -> None:
        r = getattr(fut, "upload_completion", fut)
        r.result()

    measure(lambda i: (clear(root / "dcp-a"), dcp.async_save(sd, checkpoint_id=str(root / "dcp-a")))[1], dcp_durable,
            "dcp_async", rounds=3)
    try:
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

        stager = DefaultStager(StagingOptions(use_pinned_memory=True, use_shared_memory=False,
                                              use_async_staging=False, use_non_blocking_copy=True))
    except (ImportError, TypeError, AttributeError, AssertionError, RuntimeError) as exc:
        stager = None
        out["gpu_dcp_pinned_skipped"] = f"no pinned-memory stager for async_save here ({type(exc).__name__}: {exc})"
    if stager is not None:
        measure(lambda i: (clear(root / "dcp-p"), dcp.async_save(sd, checkpoint_id=str(root / "dcp-p"),
                                                                 async_stager=stager))[1], dcp_durable, "dcp_pinned",
                rounds=3)
        stager.close()
    clear(root / "dcp-a")
    clear(root / "dcp-p")

    # -- memory-first: slots reserved (space, pages, pinned registration) at start, as the trainer does
    ck = root / "mem"
    mmgr = CheckpointManager(ck, memory=region)
    try:
        t0 = time.perf_counter()
        mmgr.reserve_memory(model=m, optimizer=opt)
        out["gpu_memory_reserve_s"] = round(time.perf_counter() - t0, 3)
        persist: list = []

        def mem_durable(_h) -> None:
            mmgr.wait()  # the commit (checksums, manifest) on the writer's thread
            info, _ = mem.Region(region).newest(ck)
            t = time.perf_counter()
            mem.persist_slot(info, ck)  # what the daemon does with every persist_every-th state
            persist.append(time.perf_counter() - t)

        measure(lambda i: mmgr.save(300 + i, model=m, optimizer=opt, memory=True), mem_durable, "memory", rounds=5,
                cleanup=lambda i: clear(ck / f"checkpoint-{300 + i}"))
        out["gpu_memory_persist_s"] = round(min(persist), 3)
        out["gpu_memory_stall_ratio"] = round(out["gpu_memory_stall_s"] / floor, 3)
        out["gpu_memory_first_stall_ratio"] = round(out["gpu_memory_first_stall_s"] / floor, 3)
        out["gpu_next_steps_slowdown"] = max(out["gpu_memory_next_steps"], out["gpu_async_next_steps"])
        # a restart's load from memory onto the GPU (the trainer hashing the slot itself)
        from ckpt_daemon.memsave import read_slot_state

        t = []
        for _ in range(2):
            _sync(dev)
            t0 = time.perf_counter()
            st, why = read_slot_state(region, ck, map_location=dev)
            _sync(dev)
            t.append(time.perf_counter() - t0)
            assert st is not None, why
            del st
        out["gpu_memory_load_s"] = round(min(t), 3)
    finally:
        mmgr.close()
        memagent.remove_stale_region(region)
        shutil.rmtree(ck, ignore_errors=True)

    # -- cold loads onto the GPU
    ours = root / "ours" / "checkpoint-101"
    files = sorted(p for p in ours.iterdir() if p.name.endswith(".safetensors"))
    loads: dict[str, list] = {"ours": [], "safetensors": [], "torch_load": []}

    def timed_load(fn) -> float:
        if dev.type == "cuda":  # a dry run on the CPU leaves the machine's page cache alone
            _drop_caches()
        _sync(dev)
        t0 = time.perf_counter()
        r = fn()
        _sync(dev)
        dt = time.perf_counter() - t0
        del r
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        return dt

    out["gpu_load_cold_cache"] = dev.type == "cuda" and _drop_caches()
    for _ in range(2):
        loads["safetensors"].append(timed_load(lambda: [load_file(str(p), device=str(dev)) for p in files]))
        loads["ours"].append(timed_load(lambda: read_checkpoint(ours, map_location=dev)))
        loads["torch_load"].append(timed_load(lambda: torch.load(root / "t.pt", map_location=dev, weights_only=True)))
    out["gpu_load_s"] = round(min(loads["ours"]), 3)
    out["gpu_safetensors_load_s"] = round(min(loads["safetensors"]), 3)
    out["gpu_torch_load_s"] = round(min(loads["torch_load"]), 3)
    out["gpu_load_vs_safetensors"] = round(out["gpu_load_s"] / out["gpu_safetensors_load_s"], 3)
    mgr.close()
    shutil.rmtree(root, ignore_errors=True)
    return out


def gpu_table(out: dict) -> list[str]:
    """The RESULTS.md lines of the GPU section (or the note that it is still to be measured)."""
    if "gpu_state_bytes" not in out:
        why = out.get("gpu_skipped") or out.get("gpu_error") or "the GPU section was not run"
        return ["## GPU", "", f"Still to be measured on a GPU machine: {why}. Run `python -m benchmarks --only gpu` there "
                "(docs/gpu.md, \"The GPU benchmark\").", ""]
    lines = ["## GPU", "", f"{out.get('gpu_name')}, state {out['gpu_state_bytes'] / 1e9:.2f} GB "
             f"({out.get('gpu_model')}: fp32 weights + AdamW moments), training step {out.get('gpu_step_s')} s "
             "(bf16 autocast). Seconds; next steps: extra time of the 10 steps after the save, in steps.", "",
             "| writer | stall | next 10 steps | until durable | cold load onto the GPU |", "|---|---|---|---|---|"]
    for label, *keys in GPU_ROWS:
        lines.append(f"| {label} | " + " | ".join("" if k is None or out.get(k) is None else str(out[k]) for k in keys) + " |")
    lines += ["", "| figure | value | goal |", "|---|---|---|"]
    for k, (op, goal, meaning) in GPU_GOALS.items():
        v = out.get(k)
        ok = "" if goal is None or v is None else (" (met)" if (v <= goal if op == "<=" else v >= goal) else " (NOT met)")
        lines.append(f"| `{k}`: {meaning} | {v} | {op + ' ' + str(goal) + ok if goal is not None else 'recorded'} |")
    if out.get("gpu_dcp_pinned_skipped"):
        lines.append(f"\n{out['gpu_dcp_pinned_skipped']}")
    return lines + [""]


def main(argv=None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    print(json.dumps(bench_gpu("--quick" in args, "cpu" if "--cpu-dry-run" in args else "cuda"), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
