"""Hugging Face Trainer saves: to disk as Hugging Face does by itself, and to memory through the callback.

    python -m benchmarks --only integrations     (or: python -m benchmarks.integrations [--quick])

The same GPT-2 model (built from a config, AdamW state) and Trainer, `save_steps=1`; a save's stall is
the time from the step end that decides to save to the end of `on_save` (Hugging Face's own writing,
plus, in memory mode, the copy into a memory slot). Hugging Face does not fsync its files: the disk
figure is the page cache's speed, and "+ fsync" adds what making those files durable costs, which the
memory mode leaves to the daemon, off the training loop. The whole run's time is recorded too: the
copy into the slot and its hashing run on a background thread that competes with training for the
cores (2 here), which a stall figure alone does not show.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

WORK = Path(os.environ.get("BENCH_DIR", "/tmp/ckpt-bench"))


def _run(out_dir: Path, memory: bool, n_embd: int, n_layer: int, saves: int) -> tuple[list, float]:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

    from ckpt_daemon.integrations.hf import CkptDaemonCallback

    class Tokens(torch.utils.data.Dataset):
        def __len__(self):
            return 10_000

        def __getitem__(self, i):
            ids = torch.randint(0, 8192, (32,), generator=torch.Generator().manual_seed(i))
            return {"input_ids": ids, "labels": ids}

    stalls: list[float] = []

    class Timer(TrainerCallback):
        t0 = None

        def on_step_end(self, args, state, control, **kw):
            self.t0 = time.perf_counter() if control.should_save else None

        def on_save(self, args, state, control, **kw):
            if self.t0 is not None:
                if not memory:  # what a durable save would add: fsync every file Hugging Face wrote
                    stalls.append(time.perf_counter() - self.t0)
                    t = time.perf_counter()
                    folder = out_dir / f"checkpoint-{state.global_step}"
                    for p in folder.iterdir():
                        fd = os.open(p, os.O_RDONLY)
                        os.fsync(fd)
                        os.close(fd)
                    stalls[-1] = (stalls[-1], stalls[-1] + time.perf_counter() - t)
                else:
                    stalls.append(time.perf_counter() - self.t0)

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=8192, n_positions=32, n_embd=n_embd, n_layer=n_layer, n_head=4))
    args = TrainingArguments(output_dir=str(out_dir), save_steps=1, max_steps=saves, report_to=[], use_cpu=True,
                             per_device_train_batch_size=2, disable_tqdm=True, logging_steps=10_000, seed=0,
                             dataloader_num_workers=0)
    trainer = Trainer(model=model, args=args, train_dataset=Tokens(),
                      callbacks=[CkptDaemonCallback(memory=memory, exit_on_stop=False), Timer()])
    t0 = time.perf_counter()
    trainer.train()
    # the first save pays for first-touch of the slots and imports; the total includes the background work
    return stalls[1:], time.perf_counter() - t0


def bench_integrations(quick: bool = False) -> dict:
    try:
        import transformers  # noqa: F401
    except ImportError as exc:
        return {"integrations_skipped": f"transformers is not installed ({exc})"}
    from ckpt_daemon import memory as mem
    from daemon import memagent

    n_embd, n_layer, saves = (64, 1, 4) if quick else (512, 6, 6)
    root = WORK / "hf-integration"
    shutil.rmtree(root, ignore_errors=True)
    ck = root / "checkpoints"
    ck.mkdir(parents=True)
    region = Path("/dev/shm") / f"ckpt-bench-hf-{os.getpid()}"
    saved = {k: os.environ.get(k) for k in ("CKPT_DAEMON_CHECKPOINTS", "CKPT_DAEMON_MEMORY", "CKPT_DAEMON_CONFIG")}
    os.environ["CKPT_DAEMON_CHECKPOINTS"] = str(ck)
    os.environ["CKPT_DAEMON_MEMORY"] = str(region)
    os.environ.pop("CKPT_DAEMON_CONFIG", None)
    try:
        disk, disk_total = _run(ck, False, n_embd, n_layer, saves)
        shutil.rmtree(ck)
        ck.mkdir()
        memory, memory_total = _run(ck, True, n_embd, n_layer, saves)
        info, _ = mem.Region(region).newest(ck)
        state_bytes = info.nbytes if info else None
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        memagent.remove_stale_region(region)
        shutil.rmtree(root, ignore_errors=True)
    d = statistics.median(x[0] for x in disk)
    df = statistics.median(x[1] for x in disk)
    m = statistics.median(memory)
    return {"hf_state_bytes": state_bytes, "hf_disk_save_s": round(d, 3), "hf_disk_save_fsync_s": round(df, 3),
            "hf_memory_save_s": round(m, 3), "hf_memory_vs_disk": round(m / d, 2),
            "hf_memory_vs_disk_fsync": round(m / df, 2),
            # the whole run (one save per step): what the background copy and hashing cost beside the stall
            "hf_train_disk_s": round(disk_total, 2), "hf_train_memory_s": round(memory_total, 2)}


if __name__ == "__main__":
    print(json.dumps(bench_integrations("--quick" in sys.argv), indent=2))
