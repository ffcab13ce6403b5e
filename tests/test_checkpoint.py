"""ckpt_daemon.checkpoint under faults: SIGKILL mid-save, corruption of every file, disk full, pickles."""

from __future__ import annotations

import logging
import os
import pickle
import random
import signal
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch

from ckpt_daemon import checkpoint as ck
from ckpt_daemon.checkpoint import CheckpointManager, read_checkpoint
from ckpt_daemon.errors import CheckpointError, NoValidCheckpoint
from ckpt_daemon.store import catalog as cat
from ckpt_daemon.store import commit as store_commit
from ckpt_daemon.store import delete as store_delete
from tests.helpers import make_state, same_nested, same_state, write_manifest


def test_round_trip_full_state(tmp_path):
    m, opt, sched = make_state()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=7)
    mgr = CheckpointManager(tmp_path)
    random.seed(5)
    torch.manual_seed(6)
    mgr.save(7, model=m, optimizer=opt, scheduler=sched, scaler=scaler, epoch=2, data_state={"epoch": 2, "pos": 96},
             metrics={"val_loss": 1.5}, config={"lr": 1e-3}, extra={"tokens": 12345})
    expect_py, expect_torch = random.random(), torch.rand(3)
    m2, opt2, sched2 = make_state(seed=1)
    random.seed(0)
    torch.manual_seed(0)
    scaler2 = torch.amp.GradScaler("cpu")
    loaded = CheckpointManager(tmp_path).load("latest", model=m2, optimizer=opt2, scheduler=sched2, scaler=scaler2)
    assert scaler2.state_dict() == scaler.state_dict() and scaler2.state_dict()["growth_interval"] == 7
    assert (loaded.step, loaded.epoch, loaded.data_state, loaded.metrics) == (7, 2, {"epoch": 2, "pos": 96},
                                                                              {"val_loss": 1.5})
    assert loaded.config == {"lr": 1e-3} and loaded.extra == {"tokens": 12345}
    assert same_state(m, m2)
    assert same_nested(opt.state_dict(), opt2.state_dict())
    assert sched.state_dict() == sched2.state_dict()
    assert random.random() == expect_py and torch.equal(torch.rand(3), expect_torch)  # RNG restored


def test_interop_with_the_safetensors_package(tmp_path):
    m, opt, _ = make_state()
    CheckpointManager(tmp_path).save(1, model=m, optimizer=opt)
    theirs = safetensors.torch.load_file(tmp_path / "checkpoint-1" / "model.safetensors")
    assert all(torch.equal(theirs[k], v) for k, v in m.state_dict().items())
    # and we read files the package wrote
    from ckpt_daemon.store import safetensors_file as stfile

    safetensors.torch.save_file({"a": torch.arange(10, dtype=torch.bfloat16), "b": torch.ones(2, 3)},
                                tmp_path / "x.safetensors")
    ours, _ = stfile.load_safetensors(tmp_path / "x.safetensors")
    assert torch.equal(ours["a"], torch.arange(10, dtype=torch.bfloat16)) and torch.equal(ours["b"], torch.ones(2, 3))


def test_async_save_copies_state_before_training_mutates_it(tmp_path):
    m, opt, _ = make_state(width=256)
    mgr = CheckpointManager(tmp_path)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    mgr.save(1, model=m, optimizer=opt, blocking=False)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(1.0)  # training goes on while the write runs
    mgr.close()
    state = read_checkpoint(tmp_path / "checkpoint-1")
    assert all(torch.equal(state["model"][k], v) for k, v in before.items())


def test_async_save_error_surfaces_at_next_call(tmp_path, monkeypatch):
    m, opt, _ = make_state()
    mgr = CheckpointManager(tmp_path)

    def boom(*a, **k):
        raise RuntimeError("simulated writer bug")

    monkeypatch.setattr(ck.stfile, "write_safetensors", boom)
    mgr.save(1, model=m, optimizer=opt, blocking=False)
    with pytest.raises(CheckpointError, match="simulated writer bug"):
        mgr.save(2, model=m, optimizer=opt, blocking=False)
    assert not list(tmp_path.glob(".tmp-*"))  # the failed write cleaned up after itself


def _saver_child(root: Path, start: int, m, opt) -> None:
    torch.set_num_threads(1)
    mgr = CheckpointManager(root)
    step = start
    while True:
        step += 1
        mgr.save(step, model=m, optimizer=opt, metrics={"val_loss": 1.0 / step})


@pytest.mark.slow
def test_sigkill_at_random_instants_during_save_never_loses_the_newest_committed(tmp_path):
    """50 SIGKILLs of a process that saves ~50 MB checkpoints back to back. Each kill waits until a save
    is under way (its scratch folder is live), then lands at a random instant within a save's duration,
    so most kills hit a save mid-write whatever else the machine is doing and whatever ran before."""

    rng = random.Random(1234)
    kills, mid_save = 0, 0
    last_valid = 0
    scratch = tmp_path / ".ckpt-daemon" / "tmp"
    m, opt, _ = make_state(width=1024)  # ~4M params: ~50 MB of state with AdamW moments; built once, forked
    for _ in range(50):
        pid = os.fork()
        if pid == 0:  # child: save forever
            try:
                _saver_child(tmp_path, last_valid, m, opt)
            finally:
                os._exit(1)
        deadline = time.monotonic() + 60
        while not store_commit.live_scratch(tmp_path):
            assert time.monotonic() < deadline, "the saver never started a save"
            time.sleep(0.002)
        time.sleep(rng.uniform(0.0, 0.3))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        kills += 1
        c = cat.scan(tmp_path, ["checkpoint-{step}"])
        dead = [p for p in scratch.iterdir() if p.is_dir()]
        mid_save += bool(dead)
        assert not store_commit.live_scratch(tmp_path) and not c.in_progress  # a dead save is never "in progress"
        # no temp folder is ever a checkpoint; every committed one is complete
        assert all(e.status == "complete" for e in c.entries), [(e.name, e.reason) for e in c.entries if not e.valid]
        newest = c.newest_valid()
        if newest is not None:
            assert newest.step >= last_valid  # nothing committed was lost
            state = read_checkpoint(newest.path)  # verifies every checksum
            assert state["manifest"]["step"] == newest.step
            last_valid = newest.step
        assert sorted(store_delete.clean_scratch(tmp_path)) == sorted(p.name for p in dead)  # what a restarted trainer does
        assert not list(scratch.iterdir())
        for e in c.entries[:-2]:  # keep the disk small
            import shutil

            shutil.rmtree(e.path)
    assert kills == 50
    assert mid_save >= 25, f"only {mid_save} of 50 kills hit a save in progress; the test did not exercise mid-save kills"
    assert last_valid >= 5


@pytest.mark.parametrize("damage", ["truncate", "flip"])
@pytest.mark.parametrize("fname", ["model.safetensors", "state.safetensors", "state.json", "manifest.json"])
def test_corruption_of_each_file_is_detected_and_resume_falls_back(tmp_path, damage, fname, caplog):
    m, opt, sched = make_state()
    mgr = CheckpointManager(tmp_path)
    mgr.save(10, model=m, optimizer=opt, scheduler=sched)
    good = {k: v.clone() for k, v in m.state_dict().items()}
    m(torch.randn(2, 64)).sum().backward()
    opt.step()
    mgr.save(20, model=m, optimizer=opt, scheduler=sched)
    f = tmp_path / "checkpoint-20" / fname
    data = bytearray(f.read_bytes())
    if damage == "truncate":
        f.write_bytes(bytes(data[: len(data) // 2]))
    else:
        i = len(data) - 3 if fname.endswith(".safetensors") else len(data) // 2
        data[i] ^= 0x01
        f.write_bytes(bytes(data))
    verified = cat.scan(tmp_path, ["checkpoint-{step}"], verify=True).by_name("checkpoint-20")
    # (a flipped byte in a manifest's checksum field makes it "invalid": unknown algorithm, malformed digest)
    assert verified.status in ("corrupt", "incomplete", "invalid"), verified
    m2, opt2, sched2 = make_state(seed=3)
    with caplog.at_level(logging.WARNING):
        loaded = CheckpointManager(tmp_path).load("latest", model=m2, optimizer=opt2, scheduler=sched2)
    assert loaded.step == 10
    assert any("checkpoint-20" in name for name, _ in loaded.skipped)
    assert all(torch.equal(m2.state_dict()[k], v) for k, v in good.items())
    assert "checkpoint-20" in caplog.text
    # the corrupt one is quarantined with its reason (not deleted), so the resumed run can save step 20 again
    q = tmp_path / ".ckpt-daemon" / "quarantine"
    assert [p.name.split(".")[0] for p in q.iterdir() if not p.name.endswith(".reason")] == ["checkpoint-20"]
    assert CheckpointManager(tmp_path).save(20, model=m2, optimizer=opt2) is not None
    assert cat.scan(tmp_path, ["checkpoint-{step}"], verify=True).by_name("checkpoint-20").valid


def test_no_valid_checkpoint_is_a_clear_error(tmp_path):
    m, opt, _ = make_state()
    CheckpointManager(tmp_path).save(5, model=m, optimizer=opt)
    (tmp_path / "checkpoint-5" / "manifest.json").unlink()
    with pytest.raises(NoValidCheckpoint, match="No valid checkpoint.*--resume none"):
        CheckpointManager(tmp_path).load("latest", model=m, optimizer=opt)
    assert CheckpointManager(tmp_path / "empty").load("latest", model=m) is None  # fresh start


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ.get('EVIL_MARK', '/tmp/ckpt-evil-ran')}",))


def test_crafted_pickle_never_runs(tmp_path, monkeypatch):
    mark = tmp_path / "pwned"
    monkeypatch.setenv("EVIL_MARK", str(mark))
    m, opt, _ = make_state()
    CheckpointManager(tmp_path / "ck").save(1, model=m, optimizer=opt)
    d = tmp_path / "ck" / "checkpoint-1"
    # Replace a state file with a pickle, and fix the manifest so only the content is hostile.
    payload = pickle.dumps(_Evil())
    (d / "state.json").write_bytes(payload)
    import hashlib
    import json

    man = json.loads((d / "manifest.json").read_text())
    man["files"]["state.json"] = {"size": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}
    write_manifest(d, man)
    # a user's single-file checkpoint that is a hostile pickle
    torch.save({"model_state_dict": {}, "x": _Evil()}, tmp_path / "ck" / "model_step_2.pt")
    cat.scan(tmp_path / "ck", ["checkpoint-{step}", "model_step_{step}.pt"], verify=True)
    with pytest.raises(NoValidCheckpoint):
        CheckpointManager(tmp_path / "ck").load("latest", model=m, optimizer=opt)
    assert not mark.exists(), "a pickle in a checkpoint was executed"


def test_enospc_mid_write_keeps_every_earlier_checkpoint(tmpfs, monkeypatch, caplog):
    root = tmpfs("12m")
    m, opt, _ = make_state(width=512)  # ~3 MB of state per save
    mgr = CheckpointManager(root, save_margin_bytes=0)
    saved = []
    for step in (1, 2):
        assert mgr.save(step, model=m, optimizer=opt) is not None
        saved.append(step)
    # Bypass the free-space pre-check so the write itself runs into the full disk.
    monkeypatch.setattr(ck, "free_bytes", lambda p: 1 << 40)
    filler = root / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * (1 << 20))
                f.flush()
        except OSError:
            pass
    os.truncate(filler, filler.stat().st_size - (1 << 20))  # leave ~1 MB: not enough for a save
    with caplog.at_level(logging.ERROR):
        assert mgr.save(3, model=m, optimizer=opt) is None
    assert "Not enough disk space" in caplog.text and "every earlier checkpoint is intact" in caplog.text
    assert not list(root.glob(".tmp-*"))
    c = cat.scan(root, ["checkpoint-{step}"], verify=True)
    assert [e.step for e in c.entries if e.valid] == saved
    assert os.readlink(root / "latest") == "checkpoint-2"


def test_precheck_skips_a_save_that_cannot_fit(tmpfs, caplog):
    root = tmpfs("6m")  # one ~3.2 MB save plus the 1 MB margin fits; a second does not
    m, opt, _ = make_state(width=512)
    mgr = CheckpointManager(root, save_margin_bytes=1 << 20)
    assert mgr.save(1, model=m, optimizer=opt) is not None
    with caplog.at_level(logging.ERROR):
        assert mgr.save(2, model=m, optimizer=opt) is None
    assert "Not saving checkpoint checkpoint-2" in caplog.text and "training goes on" in caplog.text
    assert not list(root.glob(".tmp-*")) and mgr.skipped_saves == 1
    assert read_checkpoint(root / "checkpoint-1")["manifest"]["step"] == 1


def test_weights_only_export(tmp_path):
    m, opt, _ = make_state()
    CheckpointManager(tmp_path / "ck").save(3, model=m, optimizer=opt, metrics={"val_loss": 2.0})
    out = ck.export_weights(tmp_path / "ck" / "checkpoint-3", tmp_path / "export", dtype=torch.bfloat16)
    tensors, meta = ck.load_weights(out)
    assert meta["step"] == 3 and meta["metrics"] == {"val_loss": 2.0}
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())
    full = sum(f.stat().st_size for f in (tmp_path / "ck" / "checkpoint-3").iterdir())
    assert (out / "model.safetensors").stat().st_size < full / 4
    with pytest.raises(FileExistsError):
        ck.export_weights(tmp_path / "ck" / "checkpoint-3", out)


def test_large_optimizer_state_is_sharded_and_round_trips(tmp_path, monkeypatch):
    monkeypatch.setattr(ck, "STATE_SHARD_BYTES", 64 << 10)  # tiny shards for a small state
    m, opt, sched = make_state(width=128)
    CheckpointManager(tmp_path).save(1, model=m, optimizer=opt, scheduler=sched)
    d = tmp_path / "checkpoint-1"
    shards = sorted(p.name for p in d.glob("state-*.safetensors"))
    assert len(shards) >= 3 and shards[0].startswith("state-00001-of-")
    m2, opt2, sched2 = make_state(seed=9, width=128)
    CheckpointManager(tmp_path).load("latest", model=m2, optimizer=opt2, scheduler=sched2)
    assert same_state(m, m2) and same_nested(opt.state_dict(), opt2.state_dict())
    # a damaged shard is caught like any other file
    f = d / shards[1]
    data = bytearray(f.read_bytes())
    data[-1] ^= 1
    f.write_bytes(bytes(data))
    assert cat.scan(tmp_path, ["checkpoint-{step}"], verify=True).by_name("checkpoint-1").status == "corrupt"


# ------------------------------------------------------------------ the files of a resume are released
def _checkpoint_files_held(pid: int | str, folder: Path) -> list[str]:
    """Files of `folder` that process `pid` has open (/proc/<pid>/fd) or mapped (/proc/<pid>/maps)."""
    prefix = str(folder) + os.sep
    held = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue  # closed meanwhile
        if target.startswith(prefix):
            held.append(f"fd {fd}: {target}")
    with open(f"/proc/{pid}/maps") as f:
        held += [f"mapped: {line.split()[-1]}" for line in f if prefix in line]
    return held


def test_load_leaves_no_file_of_the_checkpoint_open_or_mapped(tmp_path):
    m, opt, sched = make_state()
    CheckpointManager(tmp_path).save(5, model=m, optimizer=opt, scheduler=sched, data_state={"pos": torch.arange(4)})
    m2, opt2, sched2 = make_state(seed=1)
    loaded = CheckpointManager(tmp_path).load("latest", model=m2, optimizer=opt2, scheduler=sched2)
    assert loaded.step == 5 and same_state(m, m2)
    # the optimizer's moments and the data state are kept (and updated in place) in memory of their own
    assert _checkpoint_files_held("self", tmp_path / "checkpoint-5") == []
    m2(torch.randn(4, 64)).sum().backward()
    opt2.step()
    assert _checkpoint_files_held("self", tmp_path / "checkpoint-5") == []
    assert torch.equal(loaded.data_state["pos"], torch.arange(4))


@pytest.mark.slow
def test_the_built_in_trainer_releases_its_resume_checkpoint(tmp_path):
    """A real trainer, resumed: after the load, no file of the checkpoint it resumed from is open or mapped
    (so `cleanup` does not report it open by another process for the rest of the run)."""
    import subprocess

    from maintenance.cleanup import open_checkpoint_files
    from tests.helpers import PY, env_for_children, write_config

    cfg = write_config(tmp_path)
    subprocess.run([PY, "-m", "trainer", "--config", str(cfg), "--max-steps", "10"], env=env_for_children(),
                   check=True, capture_output=True, timeout=300)
    resumed = cat.scan(tmp_path / "checkpoints", ["checkpoint-{step}"]).newest_valid()
    log = tmp_path / "trainer.out"
    with open(log, "wb") as out:
        p = subprocess.Popen([PY, "-m", "trainer", "--config", str(cfg), "--max-steps", "100000"], stdout=out,
                             stderr=subprocess.STDOUT, env=env_for_children())
    try:
        deadline = time.monotonic() + 180
        seen: list[str] = []
        while time.monotonic() < deadline:
            text = log.read_text(errors="replace")
            if f"resumed from {resumed.name}" in text:
                seen.append("resumed")
                assert _checkpoint_files_held(p.pid, resumed.path) == [], text
                if f"step {resumed.step + 10} " in text:  # and still, ten steps (and two saves) later
                    break
            assert p.poll() is None, text
            time.sleep(0.05)
        assert seen and f"step {resumed.step + 10} " in log.read_text(), log.read_text()
        assert _checkpoint_files_held(p.pid, resumed.path) == []
        assert not [f for f in open_checkpoint_files(tmp_path / "checkpoints") if resumed.name + os.sep in f]
    finally:
        p.kill()
        p.wait()


# ------------------------------------------------------------------ the docs' CheckpointManager script
@pytest.mark.slow
def test_the_docs_checkpoint_manager_script_starts_fresh_and_resumes_after_kill_9_under_the_daemon(tmp_path):
    """Under the daemon a fresh folder's $CKPT_RESUME is `none`: the script of docs/trainers.md starts at step 0 (no
    crash loop), saves; after a kill -9 it resumes from the newest checkpoint, and it ends with exactly
    the weights of an uninterrupted run of the same script (outside the daemon, in an empty folder)."""
    import subprocess

    from ckpt_daemon.fsutil import hash_file
    from tests.helpers import FAST_RESTART, PY, Daemon, env_for_children, kill_right_after_a_save, newest
    from tests.snippets import doc_block

    script = doc_block("docs/trainers.md", "from ckpt_daemon import CheckpointManager")
    for where in ("daemon", "alone"):
        (tmp_path / where).mkdir()
        (tmp_path / where / "train.py").write_text(script)
    env = {k: v for k, v in env_for_children().items() if not k.startswith("CKPT_")}
    alone = subprocess.Popen([PY, "train.py"], cwd=tmp_path / "alone", env={**env, "OMP_NUM_THREADS": "1"},
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    d = Daemon(tmp_path / "daemon", {"training": {"command": ["{python}", "train.py"], "restart": FAST_RESTART,
                                                  "env": {"OMP_NUM_THREADS": "1"}}}, env=env).start()
    root = tmp_path / "daemon" / "checkpoints"
    try:
        first = kill_right_after_a_save(d, root, ["checkpoint-{step}"], 0)
        assert d.status()["training"]["restarts"] == 0  # the fresh start ran (load("none") is no error)
        d.wait(lambda s: s["training"]["restarts"] == 1 and cat.scan(root, ["checkpoint-{step}"]).resumed_from
               == first.name, timeout=180, what=f"the resume from {first.name}")
        d.wait(lambda s: s["training"]["state"] == "finished", timeout=300, what="training to finish")
        assert d.stop() == 0
        out, _ = alone.communicate(timeout=300)
        assert alone.returncode == 0, out
    finally:
        for p in (d.proc, alone):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
    final = newest(root, ["checkpoint-{step}"])
    ref = tmp_path / "alone" / "checkpoints" / "checkpoint-6000"
    assert final.name == "checkpoint-6000" and cat.verify_entry(final).valid
    # resumed exactly: the same weights, optimizer, scheduler, data position and torch RNG, bit for bit, as the
    # run that was never killed (python's and numpy's generators are seeded by each process: the script uses neither)
    assert hash_file(final.path / "model.safetensors") == hash_file(ref / "model.safetensors")
    a, b = read_checkpoint(final.path), read_checkpoint(ref)
    for k in ("optimizer", "scheduler", "data"):
        assert same_nested(a[k], b[k]), k
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])
