"""DLRover Flash Checkpoint on the benchmark's state, in a process of its own (its saver process and
shared memory stay out of ours): `python -m benchmarks.dlrover_peer [--quick] DIR` prints one JSON line.

Run without `dlrover-run`: DdpCheckpointer then starts its own saver process on this machine (CPU,
no cluster, no process group). Figures: the training stall of save-to-memory, the time from
save-to-storage until its tracker file names the step (the saver persists with torch.save), and a
load back from the shared memory.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path


def main(argv: list[str]) -> int:
    quick = "--quick" in argv
    d = Path([a for a in argv if not a.startswith("--")][0])
    shutil.rmtree(d, ignore_errors=True)
    out: dict = {}
    try:
        import torch  # noqa: F401
        from dlrover.trainer.torch.flash_checkpoint.ddp import DdpCheckpointer, StorageType
    except Exception as exc:  # ImportError, or a missing optional dependency of dlrover (grpc)
        print(json.dumps({"dlrover_skipped": f"dlrover does not import: {type(exc).__name__}: {str(exc)[:160]}"}))
        return 0
    from benchmarks.__main__ import gpt2_state

    m, opt, nbytes = gpt2_state(quick)
    import logging

    logging.disable(logging.INFO)
    shm_before = set(os.listdir("/dev/shm"))
    ck = DdpCheckpointer(str(d))
    sd = {"model": m.state_dict(), "optimizer": opt.state_dict()}
    stalls = []
    for step in (1, 2, 3):
        t0 = time.perf_counter()
        ck.save_checkpoint(step, sd, storage_type=StorageType.MEMORY)
        stalls.append(time.perf_counter() - t0)
    out["dlrover_memory_stall_s"] = round(min(stalls), 4)
    step = 4
    path = d / str(step) / "rank_0.pt"
    tracker = d / "dlrover_latest.txt"
    t0 = time.perf_counter()
    ck.save_checkpoint(step, sd, str(path), storage_type=StorageType.DISK)
    out["dlrover_disk_stall_s"] = round(time.perf_counter() - t0, 4)
    deadline = time.time() + 600
    while time.time() < deadline:
        try:
            if tracker.read_text().strip() == str(step):
                break
        except OSError:
            pass
        time.sleep(0.005)
    out["dlrover_persist_s"] = round(time.perf_counter() - t0, 3)
    t0 = time.perf_counter()
    state = ck.load_checkpoint()
    out["dlrover_load_memory_s"] = round(time.perf_counter() - t0, 4)
    out["dlrover_loaded_from_memory"] = bool(state)
    print(json.dumps(out))
    sys.stdout.flush()
    saver = getattr(type(ck._engine), "saver_proc", None) or getattr(ck._engine, "saver_proc", None)
    if saver is not None:  # the saver process it started for us (no dlrover-run agent here)
        saver.kill()
        saver.join(10)
    for name in set(os.listdir("/dev/shm")) - shm_before:  # its shared memory (ckpt_shm_<rank>)
        if name.startswith("ckpt_shm_"):
            try:
                os.unlink(os.path.join("/dev/shm", name))
            except OSError:
                pass
    os._exit(0)  # its threads are daemons; do not wait for them


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
