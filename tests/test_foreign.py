"""Checkpoints other trainers write get native guarantees: sidecar manifests catch damage anywhere in
them, a save still being written is in progress (never failed), quarantine works for every layout so a
step can be written again under its name, and what the trainers say (best, epochs, re-saves, runs)
feeds protections, snapshots and restore."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from ckpt_daemon.config import load_config
from ckpt_daemon.store import catalog as cat
from ckpt_daemon.store import delete as store_delete
from ckpt_daemon.store import foreign
from daemon.supervisor import choose_resume
from maintenance import retention
from maintenance.cleanup import run_cleanup
from maintenance.restore import restore
from maintenance.snapshot import take_snapshot
from tests.helpers import hf_folder, record_all, tiny_model, write_config

LATER = time.time() + 3600  # "an hour later": everything written now has settled
PATTERNS = ["checkpoint-{step}", "epoch={epoch}-step={step}.ckpt", "model_step_{step}.pt"]


def flip(path: Path, where: float = 0.5) -> None:
    with open(path, "r+b") as f:
        size = os.fstat(f.fileno()).st_size
        f.seek(int(size * where))
        b = f.read(1)
        f.seek(int(size * where))
        f.write(bytes([b[0] ^ 0x40]))


def plain(root: Path, step: int, **extra) -> Path:
    p = root / f"model_step_{step}.pt"
    torch.save({"model_state_dict": tiny_model().state_dict(), "step": step, **extra}, p)
    return p


def test_damage_to_any_file_of_a_recorded_hf_checkpoint_is_caught(tmp_path):
    for s in (100, 200):
        hf_folder(tmp_path, s)
    (tmp_path / "checkpoint-200" / "rng_state.pth").write_bytes((tmp_path / "checkpoint-200" / "optimizer.pt").read_bytes())
    record_all(tmp_path)
    c = cat.scan(tmp_path, PATTERNS, verify=True, now=LATER)
    assert [(e.name, e.status, e.recorded) for e in c.entries] == [("checkpoint-100", "complete", True),
                                                                  ("checkpoint-200", "complete", True)]
    sc = json.loads(foreign.sidecar_path(tmp_path, "checkpoint-200").read_text())
    assert set(sc["files"]) == {"model.safetensors", "optimizer.pt", "config.json", "trainer_state.json",
                                "rng_state.pth"}
    assert not (tmp_path / "checkpoint-200" / ".ckpt-daemon").exists()  # nothing written inside the user's folder
    flip(tmp_path / "checkpoint-200" / "rng_state.pth", 0.9)  # a non-weight file, a byte no CRC covers here
    c = cat.scan(tmp_path, PATTERNS, now=LATER)
    assert c.by_name("checkpoint-200").status == "corrupt" and "modified after it was recorded" in c.by_name("checkpoint-200").reason
    os.utime(tmp_path / "checkpoint-200" / "rng_state.pth", ns=(0, sc["files"]["rng_state.pth"]["mtime_ns"]))
    c = cat.scan(tmp_path, PATTERNS, verify=True, now=LATER)  # even with its old mtime put back, the bytes tell
    e = c.by_name("checkpoint-200")
    assert e.status == "corrupt" and "rng_state.pth fails its recorded checksum" in e.reason
    os.truncate(tmp_path / "checkpoint-100" / "optimizer.pt", 10)
    c = cat.scan(tmp_path, PATTERNS, now=LATER)
    assert c.by_name("checkpoint-100").status == "corrupt" and "optimizer.pt has 10 bytes" in c.by_name("checkpoint-100").reason


def test_a_save_being_written_is_in_progress_never_failed_and_settles(tmp_path):
    hf_folder(tmp_path, 100)
    d = tmp_path / "checkpoint-200"
    d.mkdir()
    (d / "config.json").write_text("{}")  # HF has written its config, the weights are on their way
    c = cat.scan(tmp_path, PATTERNS)
    assert c.by_name("checkpoint-200").status == "in_progress" and c.newest_valid().name == "checkpoint-100"
    # if the writer died (no process has a file of it open), the resume choice sets it aside
    e, notes = choose_resume(c, set(), {})
    assert e.name == "checkpoint-100" and not (tmp_path / "checkpoint-200").exists()
    q = store_delete.quarantined(tmp_path)
    assert q[0]["name"] == "checkpoint-200" and "a save that stopped half-way" in q[0]["reason"]
    # ...so the trainer can write that step again under the same name
    hf_folder(tmp_path, 200)
    assert cat.scan(tmp_path, PATTERNS).by_name("checkpoint-200").valid


def test_quarantine_works_for_every_layout_and_a_resave_keeps_its_name(tmp_path):
    plain(tmp_path, 100)
    plain(tmp_path, 200)
    record_all(tmp_path)
    os.truncate(tmp_path / "model_step_200.pt", 1000)
    c = cat.scan(tmp_path, PATTERNS, now=LATER)
    e, notes = choose_resume(c, set(), {})
    assert e.name == "model_step_100.pt" and not (tmp_path / "model_step_200.pt").exists()
    assert store_delete.quarantined(tmp_path)[0]["name"] == "model_step_200.pt"
    assert not foreign.sidecar_path(tmp_path, "model_step_200.pt").exists()
    plain(tmp_path, 200)  # the trainer writes step 200 again
    c = cat.scan(tmp_path, PATTERNS, verify=True, now=LATER)
    assert c.by_name("model_step_200.pt").valid and c.newest_valid().name == "model_step_200.pt"


def test_a_recorded_checkpoint_saved_again_is_judged_afresh(tmp_path):
    plain(tmp_path, 100)
    record_all(tmp_path)
    time.sleep(0.02)
    plain(tmp_path, 100, note="saved again")  # every file rewritten after the recording: a re-save, not damage
    e = cat.scan(tmp_path, PATTERNS, verify=True, now=LATER).by_name("model_step_100.pt")
    assert e.valid and not e.recorded


def test_lightning_resaves_and_copies_under_another_step(tmp_path):
    torch.save({"state_dict": tiny_model().state_dict(), "global_step": 100, "epoch": 0,
                "pytorch-lightning_version": "2.6.0", "loops": {}}, tmp_path / "epoch=0-step=100.ckpt")
    torch.save({"state_dict": tiny_model().state_dict(), "global_step": 100, "epoch": 0,
                "pytorch-lightning_version": "2.6.0", "loops": {}}, tmp_path / "epoch=0-step=100-v1.ckpt")
    c = cat.scan(tmp_path, PATTERNS, now=LATER)
    assert [(e.name, e.step, e.version) for e in c.entries] == [("epoch=0-step=100.ckpt", 100, 0),
                                                              ("epoch=0-step=100-v1.ckpt", 100, 1)]
    assert c.newest_valid().name == "epoch=0-step=100-v1.ckpt"
    # a copy of an old checkpoint under a new name says another step inside: invalid
    import shutil

    shutil.copy(tmp_path / "epoch=0-step=100.ckpt", tmp_path / "epoch=9-step=999999.ckpt")
    c = cat.scan(tmp_path, PATTERNS, now=LATER)
    e = c.by_name("epoch=9-step=999999.ckpt")
    assert e.status == "invalid" and "says step 100" in e.reason
    assert c.newest_valid().name == "epoch=0-step=100-v1.ckpt"


def test_a_plain_file_copied_under_another_step_is_caught_by_its_recorded_bytes(tmp_path):
    p = tmp_path / "model_step_100.pt"
    torch.save({"model_state_dict": tiny_model().state_dict()}, p)  # no step inside to compare with
    record_all(tmp_path)
    import shutil

    shutil.copy(p, tmp_path / "model_step_900.pt")
    record_all(tmp_path)
    c = cat.scan(tmp_path, PATTERNS, now=LATER)
    e = c.by_name("model_step_900.pt")
    assert e.status == "invalid" and "the same bytes as model_step_100.pt" in e.reason
    assert c.newest_valid().name == "model_step_100.pt"


def test_what_trainers_say_is_best_and_their_epoch_ends_are_protected(tmp_path):
    for s, ep in ((100, 0), (200, 0), (300, 1), (400, 1), (500, 2)):
        hf_folder(tmp_path, s)
        st = {"global_step": s, "epoch": ep + 0.5, "best_model_checkpoint": str(tmp_path / "checkpoint-200"),
              "best_metric": 0.25, "log_history": [{"step": s, "loss": 1.0 / s, "eval_loss": 2.0 / s}]}
        (tmp_path / f"checkpoint-{s}" / "trainer_state.json").write_text(json.dumps(st))
    c = cat.scan(tmp_path, PATTERNS, now=LATER)
    assert c.pointers["best"] == "checkpoint-200" and c.best_source == "trainer_state"
    assert c.by_name("checkpoint-300").metrics["eval_loss"] == 2.0 / 300
    assert [e.name for e in c.entries if e.epoch_end] == ["checkpoint-200", "checkpoint-400"]
    prot = retention.protections(c)
    assert "last checkpoint of epoch 0" in prot["checkpoint-200"] and "last checkpoint of epoch 1" in prot["checkpoint-400"]
    assert any("best_model_checkpoint" in w for w in prot["checkpoint-200"])
    assert "checkpoint-300" not in prot
    assert "checkpoint-400" not in retention.protections(c, keep_epoch_ends=False)
    # Lightning: ModelCheckpoint's best_model_path, read from the newest .ckpt without unpickling
    lt = tmp_path / "lt"
    lt.mkdir()
    for s in (10, 20, 30):
        torch.save({"state_dict": tiny_model().state_dict(), "global_step": s, "epoch": 0, "loops": {},
                    "pytorch-lightning_version": "2.6.0",
                    "callbacks": {"ModelCheckpoint{'monitor': 'val_loss', 'mode': 'min'}": {
                        "best_model_path": str(lt / "epoch=0-step=20.ckpt"), "best_model_score": torch.tensor(0.5),
                        "monitor": "val_loss"}}}, lt / f"epoch=0-step={s}.ckpt")
    c = cat.scan(lt, PATTERNS, now=LATER)
    assert c.pointers["best"] == "epoch=0-step=20.ckpt" and c.best_source == "lightning"
    # a plain script: best by the configured metric
    pl = tmp_path / "pl"
    pl.mkdir()
    for s, v in ((10, 0.9), (20, 0.3), (30, 0.5)):
        plain(pl, s, val_loss=v)
    c = cat.scan(pl, PATTERNS, now=LATER, best_metric="val_loss")
    assert c.pointers["best"] == "model_step_20.pt" and c.best_source == "metric"


def test_runs_each_get_their_own_latest_best_retention_snapshot_and_restore(tmp_path):
    cfg = load_config(write_config(tmp_path, {"checkpoints": {"runs": ["sft", "dpo"]},
                                              "retention": {"tiers": [{"count": 1}]}}, tiny=False))
    for run, steps in (("sft", (100, 200, 300)), ("dpo", (10, 20))):
        (cfg.checkpoint_dir / run).mkdir(parents=True)
        for s in steps:
            hf_folder(cfg.checkpoint_dir / run, s)
    (cfg.checkpoint_dir / "backup").mkdir()
    hf_folder(cfg.checkpoint_dir / "backup", 1)  # not a configured run: never touched
    runs = cat.scan_runs(cfg)
    assert set(runs) == {"", "sft", "dpo"} and runs["sft"].newest_valid().name == "checkpoint-300"
    r = run_cleanup(cfg, dry_run=False, confirm=lambda r: True, confirmed_by="test")
    assert sorted(r.runs["sft"].deleted) == ["checkpoint-100",
                                             "checkpoint-200"] and r.runs["dpo"].deleted == ["checkpoint-10"]
    assert (cfg.checkpoint_dir / "backup" / "checkpoint-1").is_dir()
    snap = take_snapshot(cfg)
    assert {(d["run"], d["name"]) for d in snap.checkpoints} == {("sft", "checkpoint-300"), ("dpo", "checkpoint-20")}
    assert (snap.path / "sft" / "checkpoint-300" / "trainer_state.json").exists()
    store_delete.quarantine(cfg.checkpoint_dir / "sft", "checkpoint-300", "test")
    lines = restore(cfg, snap.name, "sft/checkpoint-300")
    assert any(line.startswith("restored sft/checkpoint-300") for line in lines)
    assert cat.scan_runs(cfg, verify=True)["sft"].by_name("checkpoint-300").valid
