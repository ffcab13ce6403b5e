"""The resume choice: a save still being written is never failed (at a restart too), and no damaged
single file of any kind the catalog accepts is ever chosen, listed as complete or snapshotted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ckpt_daemon import catalog as cat
from ckpt_daemon import runtime
from tests.conftest import PY
from tests.test_daemon import Daemon, daemons  # noqa: F401  (fixture)

SLOW_WRITER = r"""
import sys, time
src, dst, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
data = open(src, "rb").read()
chunks = 200
with open(dst, "wb") as f:  # held open from the first byte to the last, as torch.save does
    print("writing", flush=True)
    for i in range(chunks):
        f.write(data[i * len(data) // chunks:(i + 1) * len(data) // chunks])
        f.flush()
        time.sleep(seconds / chunks)
print("done", flush=True)
"""


def test_a_file_another_process_is_writing_is_never_quarantined_at_a_restart(tmp_path, daemons):
    root = tmp_path / "checkpoints"
    root.mkdir()
    torch.save({"model": {"w": torch.ones(4)}, "step": 100}, root / "model_step_100.pt")
    src = tmp_path / "step200.pt"
    torch.save({"model": {"w": torch.randn(256, 256)}, "step": 200}, src)
    # a trainer that crashes a second after each start: the daemon picks a resume point again and again
    d = Daemon(tmp_path, {"checkpoints": {"pattern": ["model_step_{step}.pt"], "settle_s": 30},
                          "training": {"command": [PY, "-c", "import time; time.sleep(1); raise SystemExit(3)"],
                                       "restart": {"initial_backoff_s": 0.2, "max_backoff_s": 0.5, "max_crashes": 100,
                                                   "same_checkpoint_crashes": 100}}}).start()
    daemons.append(d)
    d.wait(lambda s: s["training"]["state"] == "running", what="the trainer to start")
    writer = subprocess.Popen([sys.executable, "-c", SLOW_WRITER, str(src), str(root / "model_step_200.pt"), "8"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "writing"
        restarts = d.status()["training"]["restarts"]
        # at least two resume choices while the file is half written (and changed a moment ago)
        d.wait(lambda s: s["training"]["restarts"] >= restarts + 2, timeout=60, what="two restarts during the write")
        assert writer.poll() is None, "the writer finished before the restarts: the test proves nothing"
        assert writer.stdout.readline().strip() == "done"
    finally:
        writer.kill()
        writer.wait()
    assert runtime.quarantined(root) == []
    e = cat.scan(root, ["model_step_{step}.pt"], verify=True).by_name("model_step_200.pt")
    assert e is not None and e.valid, e  # the writer finished into the folder, not into a quarantined copy
    assert torch.load(root / "model_step_200.pt", weights_only=True)["step"] == 200
    notes = [json.loads(l) for l in d.log().splitlines() if "resume choice" in l]
    assert any("model_step_200.pt skipped: still being written by pid" in n.get("note", "") for n in notes), notes
    d.wait(lambda s: s["training"]["resumed_from"] == "model_step_200.pt", timeout=60,
           what="the next restart to resume from the finished file")
    assert d.stop() == 0
