"""The watcher under the real daemon: its own reads never feed back into its work (a bounded thread
count and CPU time whatever the folder does), a save being written is in progress and never an error,
and a hostile file never delays the scheduled jobs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch

from ckpt_daemon.store import foreign
from tests.helpers import Daemon, wait_for

SLEEPER = ["sleep", "600"]


class Sampler:
    """The daemon's thread count and RSS, sampled every 20 ms from another thread (peaks last milliseconds)."""

    def __init__(self, pid: int):
        self.proc = psutil.Process(pid)
        self.peak = self.peak_rss = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, self.proc.num_threads())
                self.peak_rss = max(self.peak_rss, self.proc.memory_info().rss)
            except psutil.Error:
                return
            time.sleep(0.02)

    def cpu(self) -> float:
        t = self.proc.cpu_times()
        return t.user + t.system

    def stop(self) -> int:
        self._stop.set()
        self._t.join()
        return self.peak


def errors(d: Daemon) -> list[str]:
    """The daemon's ERROR records (daemon.log holds one JSON object per line)."""
    out = []
    for line in d.log().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("level") == "error":
            out.append(line)
    return out


@pytest.mark.slow
def test_hundreds_of_single_files_and_their_events_keep_threads_and_cpu_bounded(tmp_path, daemons):
    root = tmp_path / "checkpoints"
    root.mkdir()
    d = Daemon(tmp_path, {"checkpoints": {"pattern": ["model_step_{step}.pt"], "settle_s": 1},
                          "training": {"command": SLEEPER}}).start()
    daemons.append(d)
    d.wait(lambda s: s["training"]["state"] == "running", what="the trainer to start")
    time.sleep(1)  # the start-up jobs (disk check, catch-up) are done: what follows is the watcher's work
    n = 300  # each file says its own step inside, as a real trainer's does
    srcs = tmp_path / "src"
    srcs.mkdir()
    for i in range(1, n + 1):
        torch.save({"model": {"w": torch.full((64, 64), float(i))}, "step": i}, srcs / f"model_step_{i}.pt")
    sampler = Sampler(d.proc.pid)
    baseline_threads = psutil.Process(d.proc.pid).num_threads()
    cpu0 = sampler.cpu()
    for i in range(1, n + 1):  # copied in (create, many writes, close), then touched and re-read by others
        shutil.copy(srcs / f"model_step_{i}.pt", root / f"model_step_{i}.pt")
    for _ in range(3):
        for i in range(1, n + 1, 3):
            os.utime(root / f"model_step_{i}.pt")  # attribute events
            with open(root / f"model_step_{i}.pt", "rb") as f:  # another reader: open + close_nowrite events
                f.read(64)
    # every one is settled, checked and recorded by the daemon, as a person reading `status` expects
    wait_for(lambda: all(foreign.sidecar_path(root, f"model_step_{i}.pt").exists() for i in range(1, n + 1)),
             timeout=240, what="every file recorded")
    s = d.wait(lambda s: s["checkpoints"]["valid"] == n and s, timeout=60, what="status to count them all valid")
    assert s["checkpoints"]["failed_verification"] == {}
    time.sleep(2)  # the daemon's own reads of what it recorded must not start more work
    cpu = sampler.cpu() - cpu0
    # a save written slowly, in 2,000 small writes over ~10 s: looked at once per settle_s, not per write
    cpu1 = sampler.cpu()
    with open(root / f"model_step_{n + 1}.pt", "wb") as f:
        for _ in range(2000):
            f.write(b"\0" * 512)
            f.flush()
            time.sleep(0.005)
    writing_cpu = sampler.cpu() - cpu1
    os.unlink(root / f"model_step_{n + 1}.pt")
    peak = sampler.stop()
    print(f"watch-stress: threads {baseline_threads} -> peak {peak}, daemon CPU {cpu:.2f}s for {n} files, "
          f"{writing_cpu:.2f}s while one file was written in 2,000 writes")
    assert peak <= baseline_threads + 4, f"threads went from {baseline_threads} to {peak}"
    # recording reads each 17 KB file twice; 300 of them cost well under a CPU-second each on any machine
    assert cpu < 0.03 * n, f"the daemon used {cpu:.1f} CPU-seconds for {n} files"
    assert writing_cpu < 0.5, f"the daemon used {writing_cpu:.1f} CPU-seconds while one file was written"
    assert not errors(d), errors(d)[:5]
    assert d.stop() == 0


@pytest.mark.slow
def test_a_hugging_face_trainer_under_the_daemon_logs_no_error_in_a_healthy_run(tmp_path, daemons):
    pytest.importorskip("transformers")
    from tests.helpers import BYO, PY

    root = tmp_path / "checkpoints"
    d = Daemon(tmp_path, {"checkpoints": {"pattern": ["checkpoint-{step}"], "settle_s": 2},
                          "training": {"command": [PY, str(BYO / "hf_train.py")],
                                       "env": {"STEP_SLEEP": "0.05", "HF_HUB_OFFLINE": "1"}}}).start()
    daemons.append(d)
    # each save starts as an empty checkpoint-<N>/ that fills up file by file: in progress, then recorded
    wait_for(lambda: sum(foreign.sidecar_path(root, p.name).exists() for p in root.glob("checkpoint-*")) >= 4,
             timeout=240, what="four Hugging Face checkpoints recorded")
    assert d.stop() == 0
    assert not errors(d), errors(d)[:5]
    assert d.status()["checkpoints"]["failed_verification"] == {}


# ------------------------------------------------------------------------------------ the settle rule
def watcher_for(tmp_path: Path, settle_s: float = 30):
    from ckpt_daemon.config import load_config
    from daemon.watch import Watcher
    from tests.helpers import write_config

    cfg = load_config(write_config(tmp_path, {"checkpoints": {"pattern": ["checkpoint-{step}", "model_step_{step}.pt"],
                                                              "settle_s": settle_s}}, tiny=False))
    cfg.checkpoint_dir.mkdir(parents=True, exist_ok=True)
    w = Watcher(lambda: cfg, lambda: None)
    w.roots = w._run_roots(cfg)  # what start() sets; no observer and no worker: _verify is called by hand
    return w, cfg.checkpoint_dir


def age(path: Path, seconds: float) -> None:
    """Set the times of `path` and everything in it to `seconds` ago."""
    t = time.time() - seconds
    for p in [*path.rglob("*"), path]:
        os.utime(p, (t, t), follow_symlinks=False)


def test_an_empty_new_folder_is_a_save_in_progress_never_a_failure(tmp_path):
    from tests.helpers import hf_folder

    w, root = watcher_for(tmp_path)
    (root / "checkpoint-5").mkdir()  # Hugging Face's first step of a save
    w._verify("", "checkpoint-5")
    assert w.results == {} and w.bad == {} and w.pending() == 1  # looked at again after settle_s
    # it fills up, then is left alone for settle_s: recorded
    (root / "checkpoint-5").rmdir()
    hf_folder(root, 5)
    age(root / "checkpoint-5", 60)
    w._verify("", "checkpoint-5")
    assert w.results["checkpoint-5"][0] == "complete" and foreign.sidecar_path(root, "checkpoint-5").exists()
    # an empty folder left alone for settle_s is a save that never began to be written: reported (not an error)
    (root / "checkpoint-10").mkdir()
    age(root / "checkpoint-10", 60)
    w._verify("", "checkpoint-10")
    assert w.bad["checkpoint-10"].startswith("no trainer_state.json")


def test_a_folder_written_slowly_is_in_progress_until_it_settles(tmp_path):
    from tests.helpers import hf_folder

    w, root = watcher_for(tmp_path, settle_s=30)
    d = hf_folder(root, 20, complete=False)  # weights and optimizer written, trainer_state.json to come
    age(d, 60)
    os.utime(d / "config.json")  # ...but one file changed a moment ago: the writer is still at it
    w._verify("", "checkpoint-20")
    assert w.results == {} and w.bad == {}
    # nothing changed for settle_s, but a process still holds a file open (a slow writer between writes)
    age(d, 60)
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; f = open(sys.argv[1], 'ab'); "
                               "print('open', flush=True); time.sleep(60)", str(d / "optimizer.pt")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "open"
        age(d, 60)
        w._verify("", "checkpoint-20")
        assert w.results == {} and w.bad == {}
    finally:
        holder.kill()
        holder.wait()
    # the writer is gone and nothing changed for settle_s: a save that never finished, reported once
    w._opened = (-1e9, {})  # the open-files view is cached for a second
    w._verify("", "checkpoint-20")
    assert w.results["checkpoint-20"][0] == "incomplete" and "no trainer_state.json" in w.bad["checkpoint-20"]


# ------------------------------------------------------------------------------------ hostile files
@pytest.mark.slow
def test_a_rescan_lists_the_folder_and_never_parses_a_file(tmp_path, monkeypatch):
    """The periodic rescan runs on the scheduler: it must never wait on a check of a (hostile) file."""
    from ckpt_daemon.store import torchzip
    from tests.helpers import empty_entries_zip

    w, root = watcher_for(tmp_path)
    empty_entries_zip(root / "model_step_7.pt", 999_990)
    parsed = []
    for fn in ("inspect", "check", "find_problem"):
        monkeypatch.setattr(torchzip, fn, lambda *a, fn=fn, **k: parsed.append(fn))
    t0 = time.process_time()
    assert w.rescan() == 1 and w.pending() == 1
    assert parsed == [] and time.process_time() - t0 < 1.0


@pytest.mark.slow
def test_a_zip_of_a_million_empty_entries_costs_the_daemon_no_memory_and_is_reported(tmp_path, daemons):
    from tests.helpers import empty_entries_zip

    root = tmp_path / "checkpoints"
    root.mkdir()
    d = Daemon(tmp_path, {"checkpoints": {"pattern": ["model_step_{step}.pt"], "settle_s": 1},
                          "training": {"command": SLEEPER}}).start()
    daemons.append(d)
    d.wait(lambda s: s["training"]["state"] == "running", what="the trainer to start")
    sampler = Sampler(d.proc.pid)
    time.sleep(1)
    rss0, cpu0 = sampler.peak_rss, sampler.cpu()
    empty_entries_zip(tmp_path / "hostile.pt", 999_990)
    os.rename(tmp_path / "hostile.pt", root / "model_step_7.pt")
    s = d.wait(lambda s: "model_step_7.pt" in s["checkpoints"]["failed_verification"] and s, timeout=120,
               what="the hostile file reported")
    assert "entries" in s["checkpoints"]["failed_verification"]["model_step_7.pt"]
    d.wait(lambda s: s["jobs"]["history"].get("disk", {}).get("runs", 0) >= 2, timeout=60, what="the disk job to run")
    cpu = sampler.cpu() - cpu0
    sampler.stop()
    assert sampler.peak_rss - rss0 < 40 * 2**20, f"RSS went from {rss0 / 2**20:.0f} to {sampler.peak_rss / 2**20:.0f} MiB"
    assert cpu < 5, f"the daemon used {cpu:.1f} CPU-seconds on one hostile file"
    assert d.stop() == 0
