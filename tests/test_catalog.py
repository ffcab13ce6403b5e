"""The one catalog: native, Hugging Face and single-file layouts; truncated and flipped files; temp
folders; symlinks pointing outside; bytes freed with hard links."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import safetensors.torch
import torch

from ckpt_daemon import catalog as cat
from tests.conftest import run_py, write_config
from ckpt_daemon.checkpoint import CheckpointManager

PATTERNS = ["checkpoint-{step}", "rolling_step_{step}.pt", "epoch={epoch}-step={step}.ckpt", "model_step_{step}.pt"]


def tiny_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.LayerNorm(64))


def native(root: Path, steps, **kw) -> CheckpointManager:
    m = tiny_model()
    opt = torch.optim.AdamW(m.parameters())
    mgr = CheckpointManager(root)
    for s in steps:
        m(torch.randn(2, 64)).sum().backward()
        opt.step()
        mgr.save(s, model=m, optimizer=opt, metrics={"val_loss": 10.0 / s}, **kw)
    return mgr


def hf_folder(root: Path, step: int, complete: bool = True) -> Path:
    d = root / f"checkpoint-{step}"
    d.mkdir()
    safetensors.torch.save_file({"w": torch.randn(16, 16)}, d / "model.safetensors")
    torch.save({"state": {}, "param_groups": []}, d / "optimizer.pt")
    (d / "config.json").write_text("{}")
    if complete:
        (d / "trainer_state.json").write_text(json.dumps({"global_step": step, "epoch": 1.0, "best_metric": 0.5}))
    return d


def single_file(root: Path, name: str) -> Path:
    p = root / name
    m = cat.match_name(name, [cat.compile_pattern(x) for x in PATTERNS])
    torch.save({"model_state_dict": tiny_model().state_dict(), "step": m["step"] if m else 1}, p)
    return p


def test_native_layout(tmp_path):
    native(tmp_path, [10, 20, 30])
    c = cat.scan(tmp_path, PATTERNS, verify=True)
    assert [(e.name, e.step, e.layout, e.status, e.verified) for e in c.entries] == [
        (f"checkpoint-{s}", s, "native", "complete", True) for s in (10, 20, 30)]
    assert c.pointers == {"latest": "checkpoint-30", "best": "checkpoint-30"}
    assert c.entries[0].metrics == {"val_loss": 1.0}
    assert all(e.bytes > 0 and e.freeable_bytes == e.bytes for e in c.entries)


def test_hugging_face_layout(tmp_path):
    hf_folder(tmp_path, 500)
    hf_folder(tmp_path, 1000, complete=False)
    c = cat.scan(tmp_path, PATTERNS)
    a, b = c.entries
    assert (a.layout, a.status, a.epoch) == ("hf", "complete", 1)
    # a folder still being written is in progress, neither valid nor failed...
    assert (b.layout, b.status) == ("hf", "in_progress") and "trainer_state.json" in b.reason
    # ...until it has settled: then it is an incomplete save
    b = cat.scan(tmp_path, PATTERNS, now=time.time() + cat.SETTLE_S + 1).entries[1]
    assert (b.layout, b.status) == ("hf", "incomplete") and "trainer_state.json" in b.reason


def test_single_file_patterns(tmp_path):
    single_file(tmp_path, "rolling_step_000100.pt")
    single_file(tmp_path, "epoch=3-step=1200.ckpt")
    single_file(tmp_path, "model_step_500.pt")
    single_file(tmp_path, "latest.pt")  # rewritten in place by its trainer: not a numbered checkpoint
    c = cat.scan(tmp_path, PATTERNS, verify=True)
    got = {(e.name, e.step, e.layout, e.status) for e in c.entries}
    assert got == {("rolling_step_000100.pt", 100, "file", "complete"), ("epoch=3-step=1200.ckpt", 1200, "file", "complete"),
                   ("model_step_500.pt", 500, "file", "complete")}
    assert c.by_name("epoch=3-step=1200.ckpt").epoch == 3
    assert ("latest.pt", "does not match checkpoints.pattern") in c.ignored


def c_status(c, name: str) -> str:
    return c.by_name(name).status


def test_truncated_files_are_incomplete(tmp_path):
    p = single_file(tmp_path, "model_step_100.pt")
    os.truncate(p, p.stat().st_size // 2)
    hf = hf_folder(tmp_path, 200)
    st = hf / "model.safetensors"
    os.truncate(st, st.stat().st_size - 10)
    native(tmp_path, [300])
    ms = tmp_path / "checkpoint-300" / "model.safetensors"
    os.truncate(ms, ms.stat().st_size - 1)
    assert c_status(cat.scan(tmp_path, PATTERNS), "model_step_100.pt") == "in_progress"  # just written: may go on
    c = cat.scan(tmp_path, PATTERNS, now=time.time() + 3600)  # an hour later nothing changed: it never will
    assert c.by_name("model_step_100.pt").status == "incomplete" and "truncated" in c.by_name("model_step_100.pt").reason
    assert c.by_name("checkpoint-200").status == "incomplete" and "truncated" in c.by_name("checkpoint-200").reason
    bad = c.by_name("checkpoint-300")
    assert bad.status == "corrupt" and "manifest says" in bad.reason
    assert c.newest_valid() is None


def test_flipped_byte_is_corrupt_only_when_verified(tmp_path):
    p = single_file(tmp_path, "model_step_100.pt")
    native(tmp_path, [200])
    # flip one byte inside the tensor data of each
    for f in (p, tmp_path / "checkpoint-200" / "state.safetensors"):
        data = bytearray(f.read_bytes())
        i = len(data) // 3 if f.suffix == ".pt" else len(data) - 5
        data[i] ^= 0xFF
        f.write_bytes(bytes(data))
    quick = cat.scan(tmp_path, PATTERNS)
    assert all(e.status == "complete" for e in quick.entries)  # sizes and structure look right
    full = cat.scan(tmp_path, PATTERNS, verify=True, now=time.time() + 3600)
    assert {e.name: e.status for e in full.entries} == {"model_step_100.pt": "corrupt", "checkpoint-200": "corrupt"}
    assert "checksum" in full.by_name("checkpoint-200").reason


def test_temp_folders_are_never_checkpoints(tmp_path):
    native(tmp_path, [10])
    (tmp_path / ".tmp-checkpoint-20-1234").mkdir()
    (tmp_path / "tmp-checkpoint-30").mkdir()  # Hugging Face's
    (tmp_path / "checkpoint-40").mkdir()  # a native save is never seen without its manifest; another trainer's may be
    c = cat.scan(tmp_path, PATTERNS)
    assert {p.name for p in c.in_progress} == {".tmp-checkpoint-20-1234", "tmp-checkpoint-30"}
    assert {p.step for p in c.in_progress} == {20, 30}
    assert c.by_name("checkpoint-40").status == "in_progress"  # just made: it may be a save under way
    assert cat.scan(tmp_path, PATTERNS, now=time.time() + 3600).by_name("checkpoint-40").status == "incomplete"
    assert c.newest_valid().name == "checkpoint-10"


def test_symlink_pointing_outside_is_not_followed(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    big = outside / "big.bin"
    big.write_bytes(os.urandom(1 << 20))
    root = tmp_path / "ck"
    root.mkdir()
    native(root, [10])
    (root / "checkpoint-99").symlink_to(outside, target_is_directory=True)
    os.symlink(big, root / "checkpoint-10" / "extra.bin")  # a link inside a checkpoint
    c = cat.scan(root, PATTERNS)
    assert c.by_name("checkpoint-99") is None
    assert any(n == "checkpoint-99" and "symlink" in w for n, w in c.ignored)
    e = c.by_name("checkpoint-10")
    assert e.bytes < (1 << 20)  # the linked file's megabyte is not counted


def test_hard_linked_files_free_nothing(tmp_path):
    native(tmp_path, [10])
    other = tmp_path.parent / (tmp_path.name + "-snap")
    other.mkdir()
    for f in (tmp_path / "checkpoint-10").iterdir():
        os.link(f, other / f.name)
    e = cat.scan(tmp_path, PATTERNS).by_name("checkpoint-10")
    assert e.bytes > 0 and e.freeable_bytes < 8192  # only the folder itself


def test_list_cli_json_and_table(tmp_path):
    cfg = write_config(tmp_path, tiny=False)
    native(tmp_path / "checkpoints", [10, 20])
    r = run_py(["-m", "daemon", "list", "--config", str(cfg), "--json", "--verify"], check=True)
    data = json.loads(r.stdout)
    assert [c["name"] for c in data["checkpoints"]] == ["checkpoint-10", "checkpoint-20"]
    assert all(c["status"] == "complete" and c["verified"] for c in data["checkpoints"])
    r = run_py(["-m", "daemon", "list", "--config", str(cfg)], check=True)
    assert "checkpoint-20" in r.stdout and "latest" in r.stdout
