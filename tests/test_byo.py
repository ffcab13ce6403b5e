"""Bring your own trainer: a plain torch.save script, a Hugging Face Trainer and a Lightning Trainer,
each run for real under the real daemon, get the guarantees the README's table promises.

For each: a kill -9 right after a save resumes from that newest checkpoint; damage to a non-weight
part of the newest checkpoint is detected, it is quarantined, the previous one is used, and the
trainer's re-save of that step keeps its name; a manual cleanup during training never deletes the
resume point; snapshot, restore and consolidate work. A script that resumes itself from its own newest
file is protected by the quarantine that runs before every restart.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from ckpt_daemon.store import catalog as cat
from ckpt_daemon.store import delete as store_delete
from tests.helpers import BYO, FAST_RESTART, PY, Daemon, kill_right_after_a_save, newest, run_py, wait_for


def damage(path: Path) -> None:
    """Truncate a file to half its size (a torch zip loses its central directory)."""
    os.truncate(path, path.stat().st_size // 2)


@pytest.mark.slow
def test_a_plain_torch_save_script_gets_every_guarantee(tmp_path, daemons):
    patterns = ["model_step_{step}.pt"]
    root = tmp_path / "checkpoints"
    root.mkdir()
    d = Daemon(tmp_path, {"checkpoints": {"pattern": patterns, "settle_s": 1},
                          "training": {"command": [PY, str(BYO / "plain_train.py"), str(root), "--every", "25"],
                                       "restart": FAST_RESTART},
                          "retention": {"tiers": [{"count": 2}]}}).start()
    daemons.append(d)
    trainer_log = tmp_path / "logs" / "trainer.log"
    # kill -9 right after a save: resumed from that newest checkpoint
    first = kill_right_after_a_save(d, root, patterns, 30)
    s = d.wait(lambda s: s["training"]["state"] == "running" and s["training"]["resumed_from"] == first.name and s,
               what=f"the resume from {first.name}")
    wait_for(lambda: f"resumed from {first.path} at step {first.step}" in trainer_log.read_text(),
             what="the trainer's own word")
    # damage the newest one while no trainer runs: quarantined, the previous one is used, the step is written again
    bad = kill_right_after_a_save(d, root, patterns, first.step)
    damage(bad.path)
    s = d.wait(lambda s: s["training"]["state"] == "running" and s["training"]["restarts"] == 2 and s,
               what="the resume past the damaged checkpoint")
    resumed = s["training"]["resumed_from"]
    assert cat.scan(root, patterns).by_name(resumed).step < bad.step
    assert any(q["name"] == bad.name for q in store_delete.quarantined(root))
    wait_for(lambda: (e := cat.scan(root, patterns).by_name(bad.name)) is not None and cat.verify_entry(e).valid,
             what=f"{bad.name} written again under its name")
    # a manual cleanup during training keeps the checkpoint it resumed from (tiers would keep only 2)
    wait_for(lambda: newest(root, patterns).step >= bad.step + 50, what="more saves")
    r = run_py(["-m", "maintenance.cleanup", "--config", str(d.cfg), "-y"], check=True)
    assert "Training: ACTIVE" in r.stdout
    assert (root / resumed).exists(), r.stdout
    # stop: the trainer saves and exits 143, the daemon calls it stopped, not finished
    assert d.stop() == 0
    assert d.status()["training"]["state"] == "stopped"
    # snapshot, "I deleted too much", restore, consolidate, and generate from the export
    run_py(["-m", "maintenance.snapshot", "--config", str(d.cfg)], check=True)
    last = newest(root, patterns)
    last.path.unlink()
    r = run_py(["-m", "maintenance.restore", time.strftime("%Y-%m-%d", time.gmtime()), "--config", str(d.cfg)],
               check=True)
    assert f"restored {last.name}" in r.stdout
    assert cat.scan(root, patterns, verify=True).by_name(last.name).valid


@pytest.mark.slow
def test_a_script_that_resumes_itself_is_protected_from_its_own_bad_file(tmp_path, daemons):
    patterns = ["model_step_{step}.pt"]
    root = tmp_path / "checkpoints"
    root.mkdir()
    d = Daemon(tmp_path, {"checkpoints": {"pattern": patterns},
                          "training": {"command": [PY, str(BYO / "plain_train.py"), str(root), "--every", "25",
                                                   "--self-resume"], "restart": FAST_RESTART}}).start()
    daemons.append(d)
    bad = kill_right_after_a_save(d, root, patterns, 30)
    damage(bad.path)  # the file the script itself would load first
    d.wait(lambda s: s["training"]["state"] == "running" and s["training"]["restarts"] == 1
               and "resumed from" in (tmp_path / "logs" / "trainer.log").read_text().split("ckpt-daemon starts")[-1]
               and s, what="the restart")
    tail = (tmp_path / "logs" / "trainer.log").read_text().split("ckpt-daemon starts")[-1]
    assert f"resumed from {bad.path}" not in tail and "at step " in tail  # it found a good file on its own
    assert any(q["name"] == bad.name for q in store_delete.quarantined(root))
    wait_for(lambda: newest(root, patterns).step > bad.step, what="progress past the damaged step")
    assert d.status()["training"]["restarts"] == 1  # no crash loop: it trained on from a good file
    assert d.stop() == 0


def _own_trainer_cycle(tmp_path: Path, daemons, script: str, patterns: list[str], part_to_damage) -> None:
    """The README's promises for a trainer of one's own, under the real daemon, in one run."""
    root = tmp_path / "checkpoints"
    d = Daemon(tmp_path, {"checkpoints": {"pattern": patterns, "settle_s": 1},
                          "training": {"command": [PY, str(BYO / script)], "stop_timeout_s": 60,
                                       "env": {"STEP_SLEEP": "0.03", "HF_HUB_OFFLINE": "1"},
                                       "restart": FAST_RESTART},
                          "retention": {"tiers": [{"count": 1}]}}).start()
    daemons.append(d)
    trainer_log = tmp_path / "logs" / "trainer.log"
    # kill -9 right after a save: resumed from that newest checkpoint
    first = kill_right_after_a_save(d, root, patterns, 10)
    d.wait(lambda s: s["training"]["state"] == "running" and s["training"]["resumed_from"] == first.name, timeout=120,
           what=f"the resume from {first.name}")
    wait_for(lambda: f"BEGIN {first.step}" in trainer_log.read_text(), what="the trainer resuming at that step")
    # damage a part that is not the weights while no trainer runs: quarantined, the previous one is used,
    # and the trainer writes that step again under its name
    bad = kill_right_after_a_save(d, root, patterns, first.step)
    damaged = part_to_damage(bad.path)
    s = d.wait(lambda s: s["training"]["state"] == "running" and s["training"]["restarts"] == 2 and s, timeout=120,
               what="the restart past the damage")
    resumed = s["training"]["resumed_from"]
    assert resumed != bad.name and cat.scan(root, patterns).by_name(resumed).step < bad.step, (resumed, damaged)
    assert any(q["name"] == bad.name for q in store_delete.quarantined(root))
    wait_for(lambda: (e := cat.scan(root, patterns).by_name(bad.name)) is not None and cat.verify_entry(e).valid,
             what=f"{bad.name} written again under its name")
    # a manual cleanup during training keeps the resume point, the best and the epoch ends
    r = run_py(["-m", "maintenance.cleanup", "--config", str(d.cfg), "-y"], check=True)
    assert "Training: ACTIVE" in r.stdout and (root / resumed).exists(), r.stdout
    assert "protected: best" in r.stdout and "last checkpoint of epoch" in r.stdout
    # stop: saved and exited 143, which the daemon calls stopped (it sent the signal)
    assert d.stop() == 0
    assert d.status()["training"]["state"] == "stopped" and "exited with 143" in trainer_log.read_text()
    # snapshot, "I deleted too much", restore
    run_py(["-m", "maintenance.snapshot", "--config", str(d.cfg)], check=True)
    last = newest(root, patterns)
    import shutil

    shutil.rmtree(last.path) if last.path.is_dir() else last.path.unlink()
    r = run_py(["-m", "maintenance.restore", time.strftime("%Y-%m-%d", time.gmtime()), "--config", str(d.cfg)],
               check=True)
    assert f"restored {last.name}" in r.stdout and "verified" in r.stdout
    assert cat.verify_entry(cat.scan(root, patterns).by_name(last.name)).valid


@pytest.mark.slow
def test_a_hugging_face_trainer_gets_every_guarantee(tmp_path, daemons):
    pytest.importorskip("transformers")

    def truncate_optimizer(path: Path) -> Path:
        damage(path / "optimizer.pt")
        return path / "optimizer.pt"

    _own_trainer_cycle(tmp_path, daemons, "hf_train.py", ["checkpoint-{step}"], truncate_optimizer)


@pytest.mark.slow
def test_a_lightning_trainer_gets_every_guarantee(tmp_path, daemons):
    pytest.importorskip("lightning")

    def flip_a_byte_of_the_optimizer_state(path: Path) -> Path:
        import struct
        import zipfile

        # the optimizer's moments are the last tensors stored in the archive: flip a byte inside their data
        # (a byte of zip padding is covered by no checksum until the daemon records the sidecar)
        with zipfile.ZipFile(path) as z:
            info = max((i for i in z.infolist() if "/data/" in i.filename and i.file_size > 16),
                       key=lambda i: i.header_offset)
        with open(path, "r+b") as f:
            f.seek(info.header_offset + 26)
            name_len, extra_len = struct.unpack("<HH", f.read(4))
            f.seek(info.header_offset + 30 + name_len + extra_len + info.file_size // 2)
            b = f.read(1)
            f.seek(-1, 1)
            f.write(bytes([b[0] ^ 0x55]))
        return path

    _own_trainer_cycle(tmp_path, daemons, "lightning_train.py", ["epoch={epoch}-step={step}.ckpt"],
                       flip_a_byte_of_the_optimizer_state)
