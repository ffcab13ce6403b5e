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

from ckpt_daemon.store import catalog as cat
from ckpt_daemon.store import delete as store_delete
from tests.helpers import PY, Daemon

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


@pytest.mark.slow
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
    assert store_delete.quarantined(root) == []
    e = cat.scan(root, ["model_step_{step}.pt"], verify=True).by_name("model_step_200.pt")
    assert e is not None and e.valid, e  # the writer finished into the folder, not into a quarantined copy
    assert torch.load(root / "model_step_200.pt", weights_only=True)["step"] == 200
    notes = [json.loads(line) for line in d.log().splitlines() if "resume choice" in line]
    assert any("model_step_200.pt skipped: still being written by pid" in n.get("note", "") for n in notes), notes
    d.wait(lambda s: s["training"]["resumed_from"] == "model_step_200.pt", timeout=60,
           what="the next restart to resume from the finished file")
    assert d.stop() == 0


# --------------------------------------------------------------------- every single-file kind, damaged
def _torch_bytes(obj, **kw) -> bytes:
    import io

    buf = io.BytesIO()
    torch.save(obj, buf, **kw)
    return buf.getvalue()


def _safetensors_bytes(step: int) -> bytes:
    import safetensors.torch

    return safetensors.torch.save({"w": torch.randn(16, 16), "b": torch.zeros(16)}, metadata={"step": str(step)})


def _state(step: int) -> dict:
    g = torch.Generator().manual_seed(step)
    return {"model": {"w": torch.randn(16, 16, generator=g), "b": torch.zeros(16)}, "step": step,
            "optimizer": {"state": {0: {"exp_avg": torch.randn(16, generator=g)}}, "param_groups": [{"lr": 0.1}]}}


# Every kind of single file the catalog accepts by its first bytes (catalog.sniff, foreign.describe_file):
# name pattern, bytes of a file of that step.
KINDS = {
    "torch zip (.pt)": ("model_step_{step}.pt", lambda s: _torch_bytes(_state(s))),
    "Lightning .ckpt": ("epoch=0-step={step}.ckpt", lambda s: _torch_bytes(
        {"state_dict": _state(s)["model"], "global_step": s, "epoch": 0, "pytorch-lightning_version": "2.6.0",
         "loops": {}, "optimizer_states": [_state(s)["optimizer"]]})),
    "torch zip (.bin)": ("weights_{step}.bin", lambda s: _torch_bytes(_state(s)["model"])),
    "legacy torch, pickle protocol 2": ("model_step_{step}.pt",
                                        lambda s: _torch_bytes(_state(s), _use_new_zipfile_serialization=False)),
    "legacy torch, pickle protocol 4": ("model_step_{step}.pt", lambda s: _torch_bytes(
        _state(s), _use_new_zipfile_serialization=False, pickle_protocol=4)),
    "safetensors": ("model_step_{step}.safetensors", _safetensors_bytes),
}
_BYTES: dict[tuple[str, int], bytes] = {}
LATER = time.time() + 3600  # an hour later: everything written now has settled


def kind_bytes(kind: str, step: int) -> bytes:
    if (kind, step) not in _BYTES:
        _BYTES[(kind, step)] = KINDS[kind][1](step)
    return _BYTES[(kind, step)]


def two_saves(root: Path, kind: str) -> tuple[Path, Path]:
    """Steps 100 and 200 of `kind` in `root`; returns their paths."""
    pattern = KINDS[kind][0]
    out = []
    for step in (100, 200):
        p = root / pattern.format(step=step)
        p.write_bytes(kind_bytes(kind, step))
        out.append(p)
    return out[0], out[1]


def _choice(root: Path, kind: str) -> cat.Entry:
    from daemon.supervisor import choose_resume

    e, _ = choose_resume(cat.scan(root, [KINDS[kind][0]], now=LATER), set(), {})
    return e


@pytest.mark.parametrize("kind", list(KINDS))
def test_every_kind_intact_is_complete_and_chosen(tmp_path, kind):
    good, newest = two_saves(tmp_path, kind)
    c = cat.scan(tmp_path, [KINDS[kind][0]], verify=True, now=LATER)
    assert [(e.name, e.status, e.reason) for e in c.entries] == [(good.name, "complete", ""),
                                                                 (newest.name, "complete", "")]
    assert _choice(tmp_path, kind).name == newest.name


from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@pytest.mark.slow
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(sorted(KINDS)), where=st.floats(0, 1, exclude_max=True))
def test_every_kind_cut_short_anywhere_is_reported_and_never_chosen(tmp_path_factory, kind, where):
    root = tmp_path_factory.mktemp("cut")
    good, newest = two_saves(root, kind)
    raw = newest.read_bytes()
    os.truncate(newest, int(len(raw) * where))
    for verify in (False, True):  # what status, snapshot and `list` see, and what `list --verify` sees
        e = cat.scan(root, [KINDS[kind][0]], verify=verify, now=LATER).by_name(newest.name)
        assert e.status != "complete" and e.reason, (kind, where, e.status, e.reason)
    assert _choice(root, kind).name == good.name


@pytest.mark.slow
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(sorted(KINDS)), where=st.floats(0, 1, exclude_max=True), mask=st.integers(1, 255))
def test_every_kind_with_a_byte_rotten_anywhere_after_it_settled_is_corrupt_and_never_chosen(
        tmp_path_factory, kind, where, mask):
    from ckpt_daemon.store import foreign

    root = tmp_path_factory.mktemp("flip")
    good, newest = two_saves(root, kind)
    for e in cat.scan(root, [KINDS[kind][0]], now=LATER).entries:  # what the watcher does once a file settled
        assert e.valid, (kind, e.name, e.reason)
        foreign.record(root, e.name, e.path, e.layout, e.step, e.meta)
    st = newest.stat()
    with open(newest, "r+b") as f:
        f.seek(int(st.st_size * where))
        b = f.read(1)
        f.seek(int(st.st_size * where))
        f.write(bytes([b[0] ^ mask]))
    os.utime(newest, ns=(st.st_atime_ns, st.st_mtime_ns))  # bit rot: the bytes change, the file's times do not
    e = cat.scan(root, [KINDS[kind][0]], verify=True, now=LATER).by_name(newest.name)
    assert e.status == "corrupt" and e.reason, (kind, where, e.status, e.reason)
    assert _choice(root, kind).name == good.name


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(KINDS))
def test_list_verify_and_a_snapshot_never_take_a_damaged_file_of_any_kind_for_latest(tmp_path, kind):
    from ckpt_daemon.config import load_config
    from maintenance.snapshot import take_snapshot
    from tests.helpers import run_py, write_config

    cfg_path = write_config(tmp_path, {"checkpoints": {"pattern": [KINDS[kind][0]]}}, tiny=False)
    root = tmp_path / "checkpoints"
    root.mkdir()
    good, newest = two_saves(root, kind)
    os.truncate(newest, newest.stat().st_size - 1)  # one byte short
    t = time.time() - 3600
    for p in (good, newest):
        os.utime(p, (t, t))  # written an hour ago: settled, not in progress
    r = run_py(["-m", "daemon", "list", "--verify", "--json", "--config", str(cfg_path)])
    assert r.returncode == 1, r.stdout + r.stderr
    listed = {e["name"]: e for e in json.loads(r.stdout)["checkpoints"]}
    assert listed[good.name]["status"] == "complete" and listed[newest.name]["status"] != "complete"
    assert listed[newest.name]["reason"]
    snap = take_snapshot(load_config(cfg_path))
    assert [d["name"] for d in snap.checkpoints if "latest" in d["roles"]] == [good.name], snap.checkpoints
