"""Memory-first checkpoints for the users' own trainers: the Hugging Face and Lightning callbacks save
into memory slots instead of the disk, the daemon persists a slot under the name the trainer gave it
(a Hugging Face folder, a Lightning file) with its checksums as the sidecar manifest, and a restarted
trainer resumes from a verified copy of the newest memory state; under the real daemon a kill -9
loses no step beyond the last memory checkpoint.

Real libraries, tiny CPU models built from configs, no downloads.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch

from ckpt_daemon import memory as mem
from ckpt_daemon import memsave  # noqa: F401  (imported before any test patches fsutil.free_bytes it binds)
from ckpt_daemon.integrations import common
from ckpt_daemon.store import catalog as cat
from ckpt_daemon.store import delete as store_delete
from ckpt_daemon.store import foreign
from daemon import memagent
from tests.helpers import PY, Daemon, resident_bytes, wait_for

BYO = Path(__file__).parent / "byo"


@pytest.fixture
def under_daemon(tmp_path, monkeypatch):
    """The environment the daemon gives a trainer when checkpoints.memory.enabled (no daemon running)."""
    ck, region = tmp_path / "checkpoints", tmp_path / "shm"
    ck.mkdir()
    for k in ("CKPT_RESUME", "CKPT_DAEMON_MEMORY_RESUME", "CKPT_DAEMON_CONFIG", "WORLD_SIZE", "RANK"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("CKPT_DAEMON_CHECKPOINTS", str(ck))
    monkeypatch.setenv("CKPT_DAEMON_MEMORY", str(region))
    monkeypatch.chdir(tmp_path)
    return ck, region


def _slot(region: Path, ck: Path) -> mem.SlotInfo:
    info, problems = mem.Region(region).newest(ck)
    assert info is not None, problems
    return info


def _slot_bytes(info: mem.SlotInfo) -> dict[str, bytes]:
    raw = info.path.read_bytes()
    return {n: raw[mem.PAYLOAD_OFFSET + o:mem.PAYLOAD_OFFSET + o + s] for n, o, s in info.files if n != "manifest.json"}


def _resume_from_memory(monkeypatch, ck: Path, info: mem.SlotInfo) -> Path:
    """What a restart from memory looks like to the trainer: $CKPT_RESUME names the checkpoint not yet on disk."""
    monkeypatch.setenv("CKPT_RESUME", str(ck / info.name))
    monkeypatch.setenv("CKPT_DAEMON_MEMORY_RESUME", str(info.step))
    return Path(common.resume_path())


def _flip(path: Path, at: int) -> None:
    with open(path, "r+b") as f:
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ 0xFF]))


# ------------------------------------------------------------------------------------------ Hugging Face
def _hf_trainer(out: Path, max_steps: int, save_steps: int = 3, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    from ckpt_daemon.integrations.hf import CkptDaemonCallback

    class Tokens(torch.utils.data.Dataset):
        def __len__(self):
            return 64

        def __getitem__(self, i):
            ids = torch.randint(0, 64, (16,), generator=torch.Generator().manual_seed(i))
            return {"input_ids": ids, "labels": ids}

    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2,
                                       bos_token_id=0, eos_token_id=0))
    args = TrainingArguments(output_dir=str(out), save_steps=save_steps, max_steps=max_steps, report_to=[],
                             per_device_train_batch_size=4, use_cpu=True, disable_tqdm=True, seed=0,
                             dataloader_num_workers=0, logging_steps=1000)
    cb = CkptDaemonCallback(exit_on_stop=False)
    return Trainer(model=model, args=args, train_dataset=Tokens(), callbacks=[cb]), cb


@pytest.mark.slow
def test_hugging_face_saves_go_to_memory_and_persist_as_its_own_folder(under_daemon, monkeypatch):
    pytest.importorskip("transformers")
    ck, region = under_daemon
    trainer, cb = _hf_trainer(ck, max_steps=7)
    trainer.train()
    assert cb._mem is None and trainer.args.output_dir == str(ck)  # the staging detour is undone
    assert not any(p.name.startswith("checkpoint-") for p in ck.iterdir()), list(ck.iterdir())  # nothing on disk
    assert not any(p.name.startswith("staging-") for p in region.iterdir())  # staging removed after each save
    assert _slot(region, ck).step == 7  # Hugging Face's save at the end of training went to memory too
    info = next(s for s in mem.Region(region).slots()[0] if s.step == 6)  # the other slot: double buffering
    assert (info.name, info.layout) == ("checkpoint-6", "folder")
    held = _slot_bytes(info)
    assert {"model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json", "rng_state.pth"} <= set(held)
    assert json.loads(held["trainer_state.json"])["global_step"] == 6

    # A restart from memory: resume_path() is a verified copy, byte for byte, and Hugging Face resumes from it
    copy = _resume_from_memory(monkeypatch, ck, info)
    assert copy.parent == region / f"resume-{os.getpid()}" and copy.name == "checkpoint-6"
    assert {p.name: p.read_bytes() for p in copy.iterdir()} == held
    on_disk = shutil.copytree(copy, ck.parent / "disk" / "checkpoint-6")
    resumed, cb2 = _hf_trainer(ck, max_steps=9)
    resumed.train(resume_from_checkpoint=str(copy))
    assert resumed.state.global_step == 9 and cb2.start_step == 6
    assert not copy.exists()  # freed after the first step
    monkeypatch.delenv("CKPT_DAEMON_MEMORY")
    reference, _ = _hf_trainer(ck.parent / "disk", max_steps=9, save_steps=1000)
    reference.train(resume_from_checkpoint=str(on_disk))
    monkeypatch.setenv("CKPT_DAEMON_MEMORY", str(region))
    for (k, a), b in zip(resumed.model.state_dict().items(), reference.model.state_dict().values()):
        assert torch.equal(a, b), k  # resuming from memory is resuming from that checkpoint on disk

    # The daemon's persist: Hugging Face's folder under its name, its checksums recorded from memory
    info = _slot(region, ck)
    assert info.step == 9
    r = mem.persist_slot(info, ck)
    assert r.path == ck / "checkpoint-9" and not (r.path / "manifest.json").exists()
    sc = foreign.read_sidecar(ck, "checkpoint-9")
    assert sc is not None and sc["layout"] == "hf" and set(sc["files"]) == set(_slot_bytes(info))
    e = cat.scan(ck, ["checkpoint-{step}"], verify=True).by_name("checkpoint-9")
    assert e.valid and e.layout == "hf" and e.recorded, e.reason
    _flip(r.path / "optimizer.pt", (r.path / "optimizer.pt").stat().st_size // 2)
    e = cat.verify_entry(cat.scan(ck, ["checkpoint-{step}"]).by_name("checkpoint-9"))
    assert not e.valid and "optimizer.pt" in e.reason  # damage after the persist is caught like a native one's


def _slots_ready(writer) -> list[int]:
    """The writer's slot sizes once its reservation is done, each slot's every page mapped (resident) in this
    process: a save's copy then takes no page fault."""
    from ckpt_daemon import devio

    writer.join()  # the reservation runs on the writer's thread
    for s in writer.slots:
        assert s.mm is not None and s.size > 0, "the slot was not reserved"
        assert resident_bytes(devio.address_of(s.mm)) >= s.size - 4096
    return [s.size for s in writer.slots]


def test_hugging_face_memory_slots_are_reserved_and_faulted_in_when_training_starts(under_daemon):
    pytest.importorskip("transformers")
    from transformers import TrainerCallback

    ck, region = under_daemon
    trainer, cb = _hf_trainer(ck, max_steps=7)
    seen = {}

    class Probe(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 1:  # before the first save (step 3)
                assert not mem.Region(region).slots()[0]  # nothing committed yet
                seen["sizes"] = _slots_ready(cb._mem.writer)

    trainer.add_callback(Probe())
    trainer.train()
    assert _slot(region, ck).step == 7
    # the estimate held: the saves went into the slots reserved at the start, none grew them
    assert all(os.path.getsize(region / f"slot-{i}") == size for i, size in enumerate(seen["sizes"]))


def test_a_damaged_memory_state_is_not_copied_out_and_the_trainer_waits_for_the_disk(under_daemon, monkeypatch, caplog):
    pytest.importorskip("transformers")
    ck, region = under_daemon
    trainer, _ = _hf_trainer(ck, max_steps=3)
    trainer.train()
    info = _slot(region, ck)
    name, off, size = next(f for f in info.files if f[0] == "optimizer.pt")
    _flip(info.path, mem.PAYLOAD_OFFSET + off + size // 2)
    monkeypatch.setenv("CKPT_RESUME", str(ck / info.name))
    monkeypatch.setenv("CKPT_DAEMON_MEMORY_RESUME", str(info.step))
    assert common._memory_resume(str(ck / info.name), wait_s=0.5) is None
    assert "optimizer.pt in slot-" in caplog.text and "fails its checksum" in caplog.text
    assert not (region / f"resume-{os.getpid()}" / info.name).exists()  # no half copy left behind
    # ... and once the daemon has the checkpoint on disk, that is where the trainer resumes
    (ck / info.name).mkdir()
    assert common._memory_resume(str(ck / info.name), wait_s=5) == str(ck / info.name)


@pytest.mark.parametrize("raw", ["\u00b2", "9", "-1", "1" * 30, ""])
def test_a_memory_resume_that_names_no_slot_falls_back_at_once(under_daemon, monkeypatch, raw):
    import time

    ck, region = under_daemon
    monkeypatch.setenv("CKPT_RESUME", str(ck / "checkpoint-9"))
    monkeypatch.setenv("CKPT_DAEMON_MEMORY_RESUME", raw)
    (ck / "checkpoint-2").mkdir()  # not valid: the scan finds nothing
    t0 = time.monotonic()
    with pytest.warns(RuntimeWarning, match="no longer exists"):
        assert common.resume_path() is None
    assert time.monotonic() - t0 < 10  # no wait for a persist that nothing is doing


def test_without_room_or_outside_the_daemon_hugging_face_saves_to_disk_as_before(under_daemon, monkeypatch, caplog):
    pytest.importorskip("transformers")
    ck, region = under_daemon
    import ckpt_daemon.fsutil as fsutil

    monkeypatch.setattr(fsutil, "free_bytes", lambda p: 1 << 20)  # a tmpfs with 1 MiB free
    trainer, _ = _hf_trainer(ck, max_steps=3)
    trainer.train()
    assert (ck / "checkpoint-3" / "optimizer.pt").is_file() and "this save goes to disk" in caplog.text
    monkeypatch.undo()
    monkeypatch.delenv("CKPT_DAEMON_MEMORY", raising=False)
    trainer, cb = _hf_trainer(ck / "plain", max_steps=3)
    trainer.train()
    assert (ck / "plain" / "checkpoint-3").is_dir()


@pytest.fixture
def failing_commit(monkeypatch):
    """Every memory commit fails after the copy into the slot (its hashing raises EIO)."""
    def broken(*a, **k):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(mem, "file_digest", broken)


def test_a_hugging_face_save_that_memory_cannot_commit_is_written_to_disk(under_daemon, failing_commit, caplog):
    pytest.importorskip("transformers")
    ck, region = under_daemon
    trainer, _ = _hf_trainer(ck, max_steps=3)
    trainer.train()
    assert "could not be committed to memory; writing it to disk" in caplog.text
    e = cat.scan(ck, ["checkpoint-{step}"], verify=True).by_name("checkpoint-3")
    assert e is not None and e.valid and e.layout == "hf", e and e.reason
    assert not list(region.glob("staging-*"))


def test_a_tmpfs_that_fills_up_under_hugging_faces_own_write_sends_that_save_to_disk(under_daemon, tmpfs, monkeypatch,
                                                                                       caplog):
    pytest.importorskip("transformers")
    from transformers import TrainerCallback

    from ckpt_daemon.integrations import hf

    ck, _ = under_daemon
    region = tmpfs("24m") / "region"
    monkeypatch.setenv("CKPT_DAEMON_MEMORY", str(region))
    monkeypatch.setattr(hf._MemorySaves, "_room", lambda self: True)  # it looked roomy a moment before

    class Filler(TrainerCallback):  # another user of /dev/shm takes the rest after the first memory save
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 4:
                # once the writer's thread has copied checkpoint-3 and removed its staging folder (on a busy
                # machine it may still be there: freed after the filler, it would leave room for checkpoint-6)
                staging = region / f"staging-{os.getpid()}"
                def staged_nothing() -> bool:
                    try:
                        return not any(staging.iterdir())
                    except FileNotFoundError:
                        return True

                wait_for(staged_nothing, timeout=60, what="checkpoint-3's staging folder removed")
                with open(region.parent / "filler", "wb", buffering=0) as f:
                    for chunk in (1 << 20, 4096):  # down to the last page: a tiny checkpoint fits in a rest
                        try:
                            while True:
                                f.write(b"\1" * chunk)
                        except OSError:
                            pass

    trainer, _ = _hf_trainer(ck, max_steps=7)
    trainer.add_callback(Filler())
    trainer.train()  # no crash
    assert trainer.state.global_step == 7 and trainer.args.output_dir == str(ck)
    assert "checkpoint-6 could not be staged in memory" in caplog.text
    assert _slot(region, ck).step == 3  # the save before the tmpfs filled up is in memory
    c = cat.scan(ck, ["checkpoint-{step}"], verify=True)
    assert {e.name for e in c.entries if e.valid} == {"checkpoint-6",
                                                      "checkpoint-7"}, [(e.name, e.reason) for e in c.entries]
    assert not list(region.glob("staging-*"))


def _hf_best_at_step_3(ck: Path, seed: int = 0, metric=lambda step: 1 if step == 3 else 2, max_steps: int = 9,
                       callbacks=(), **args):
    """A Trainer whose metric (by default) is best at step 3 and worse afterwards (no evaluation set)."""
    from transformers import TrainerCallback

    trainer, _ = _hf_trainer(ck, max_steps=max_steps, seed=seed)
    for c in callbacks:
        trainer.add_callback(c)

    class NoEval(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            control.should_evaluate = False

    trainer.args.metric_for_best_model = "eval_m"
    trainer.args.greater_is_better = False
    for k, v in args.items():
        setattr(trainer.args, k, v)
    real, orig_save = trainer._determine_best_metric, trainer._maybe_log_save_evaluate

    def evaluating(*a, **k):
        if trainer.control.should_save:
            real({"eval_m": float(metric(trainer.state.global_step))}, None)
        return orig_save(*a, **k)

    trainer._maybe_log_save_evaluate = evaluating
    trainer.add_callback(NoEval())
    trainer.train()
    return trainer


def test_the_best_hugging_face_checkpoint_is_written_to_disk_too(under_daemon):
    pytest.importorskip("transformers")
    ck, region = under_daemon
    trainer = _hf_best_at_step_3(ck)
    assert trainer.state.best_model_checkpoint == str(ck / "checkpoint-3")
    on_disk = {p.name for p in ck.iterdir() if p.name.startswith("checkpoint-")}
    assert on_disk == {"checkpoint-3"}, on_disk  # the best on disk, durable; the others in memory only
    e = cat.scan(ck, ["checkpoint-{step}"], verify=True).by_name("checkpoint-3")
    assert e.valid and json.loads((e.path / "trainer_state.json").read_text())["best_model_checkpoint"] == str(e.path)
    assert _slot(region, ck).step == 9


@pytest.mark.slow
def test_a_second_run_replaces_the_best_of_the_same_name_and_loads_its_own(under_daemon):
    pytest.importorskip("transformers")
    from safetensors.torch import load_file


    ck, _ = under_daemon
    _hf_best_at_step_3(ck, seed=0)
    first = load_file(ck / "checkpoint-3" / "model.safetensors")
    second = _hf_best_at_step_3(ck, seed=1, load_best_model_at_end=True)  # another run in the same folder
    on_disk = load_file(ck / "checkpoint-3" / "model.safetensors")
    assert not torch.equal(on_disk["transformer.wte.weight"], first["transformer.wte.weight"])  # the new best
    assert torch.equal(second.model.state_dict()["transformer.wte.weight"], on_disk["transformer.wte.weight"])
    assert [q["name"] for q in store_delete.quarantined(ck)] == ["checkpoint-3"]  # the older one kept aside


def test_save_total_limit_applies_to_what_goes_to_disk(under_daemon):
    pytest.importorskip("transformers")
    ck, _ = under_daemon
    # a new best at 3 and at 6: both go to disk, and Hugging Face's rotation keeps one (the best)
    trainer = _hf_best_at_step_3(ck, metric=lambda step: {3: 2, 6: 1}.get(step, 3), save_total_limit=1)
    assert trainer.state.best_model_checkpoint == str(ck / "checkpoint-6")
    assert {p.name for p in ck.iterdir() if p.name.startswith("checkpoint-")} == {"checkpoint-6"}


# ------------------------------------------------------------------------------- best_to_disk (both)
@pytest.fixture
def memory_config(under_daemon, tmp_path, monkeypatch):
    """Write the daemon's config with these checkpoints.memory settings, as the trainer gets it ($CKPT_DAEMON_CONFIG)."""
    import yaml

    def use(**memory):
        p = tmp_path / "in-force.yaml"
        p.write_text(yaml.safe_dump({"checkpoints": {"dir": str(under_daemon[0]),
                                                     "memory": {"enabled": True, **memory}}}))
        monkeypatch.setenv("CKPT_DAEMON_CONFIG", str(p))
        return under_daemon

    return use


def test_best_to_disk_waits_as_configured():
    now = [0.0]
    every, at_end = common.BestToDisk("every"), common.BestToDisk("at_end")
    interval = common.BestToDisk("interval", 100, clock=lambda: now[0])
    assert every.now() and not every.due()
    assert not at_end.now() and not at_end.due()
    assert interval.now()  # the first best goes at once
    interval.written()
    now[0] = 99
    assert not interval.now() and not interval.due()
    now[0] = 100
    assert interval.now() and interval.due()


def _on_disk_at_each_step(ck: Path, mem_saves=lambda: None):
    """A Hugging Face callback recording, at each step end, the checkpoints on disk (after the writer's thread)."""
    from transformers import TrainerCallback

    seen: dict[int, set[str]] = {}

    class Record(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            ms = mem_saves()
            if ms is not None and ms.writer is not None:
                ms.writer.join()
            seen[state.global_step] = {p.name for p in ck.iterdir() if p.name.startswith("checkpoint-")}

    return Record(), seen


def test_hugging_face_best_to_disk_at_end_keeps_every_best_in_memory_until_training_ends(memory_config):
    pytest.importorskip("transformers")
    ck, _ = memory_config(best_to_disk="at_end")
    record, seen = _on_disk_at_each_step(ck)
    # bests at 3 and at 6; save_total_limit=1 and load_best_model_at_end need the best on disk at the end
    trainer = _hf_best_at_step_3(ck, metric=lambda step: {3: 2, 6: 1}.get(step, 3), callbacks=[record],
                                 save_total_limit=1, load_best_model_at_end=True)
    assert seen and all(v == set() for v in seen.values()), seen  # nothing written to disk while training
    assert trainer.state.best_model_checkpoint == str(ck / "checkpoint-6")
    assert {p.name for p in ck.iterdir() if p.name.startswith("checkpoint-")} == {"checkpoint-6"}
    e = cat.scan(ck, ["checkpoint-{step}"], verify=True).by_name("checkpoint-6")
    assert e.valid, e.reason
    from safetensors.torch import load_file

    on_disk = load_file(ck / "checkpoint-6" / "model.safetensors")
    assert torch.equal(trainer.model.state_dict()["transformer.wte.weight"], on_disk["transformer.wte.weight"])


def test_hugging_face_best_to_disk_at_end_writes_the_waiting_best_when_training_is_stopped(memory_config):
    pytest.importorskip("transformers")
    from transformers import TrainerCallback

    ck, _ = memory_config(best_to_disk="at_end")

    class Sigterm(TrainerCallback):  # a real SIGTERM at step 7: the callback saves step 8 and stops
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 7:
                os.kill(os.getpid(), signal.SIGTERM)

    record, seen = _on_disk_at_each_step(ck)
    trainer = _hf_best_at_step_3(ck, metric=lambda step: {3: 2, 6: 1}.get(step, 3), callbacks=[Sigterm(), record])
    assert trainer.state.global_step == 8 and all(v == set() for v in seen.values()), seen
    assert {p.name for p in ck.iterdir() if p.name.startswith("checkpoint-")} == {"checkpoint-6"}  # the best
    assert cat.scan(ck, ["checkpoint-{step}"], verify=True).by_name("checkpoint-6").valid
    assert _slot(ck.parent / "shm", ck).step == 8  # the stop's save: in memory, for the daemon to persist


def test_hugging_face_best_to_disk_interval_writes_a_waiting_best_once_the_interval_is_over(memory_config, monkeypatch):
    pytest.importorskip("transformers")
    from transformers import TrainerCallback

    ck, _ = memory_config(best_to_disk="interval", best_to_disk_interval_s=100)
    now = [0.0]
    monkeypatch.setattr(common.BestToDisk, "from_config",
                        classmethod(lambda cls: cls("interval", 100, clock=lambda: now[0])))

    class Clock(TrainerCallback):  # 10 s pass before the best at 6, 100 s more before the save at 9
        def on_step_end(self, args, state, control, **kw):
            now[0] += {4: 10, 7: 100}.get(state.global_step, 0)

    from ckpt_daemon.integrations import hf

    saves: list = []
    real_start = hf._MemorySaves.start
    monkeypatch.setattr(hf._MemorySaves, "start", classmethod(
        lambda cls, *a, **k: saves.append(real_start(*a, **k)) or saves[-1]))
    record, seen = _on_disk_at_each_step(ck, lambda: saves[-1] if saves else None)
    # bests at 3 (the first: to disk at once) and 6 (10 s later: waits); 9 and 12 are no better
    _hf_best_at_step_3(ck, metric=lambda step: {3: 2, 6: 1}.get(step, 3), max_steps=12, callbacks=[Clock(), record])
    assert seen[5] == {"checkpoint-3"}
    assert seen[8] == {"checkpoint-3"}, seen  # the best at 6 waits (in the tmpfs)
    assert seen[10] == {"checkpoint-3", "checkpoint-6"}, seen  # written with the save at 9, the interval being over
    assert cat.scan(ck, ["checkpoint-{step}"], verify=True).by_name("checkpoint-6").valid


def _lightning_disk(ck: Path):
    """A Lightning callback recording, at each train batch end, the .ckpt files on disk (after the writer)."""
    import lightning.pytorch as pl

    seen: dict[int, set[str]] = {}

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer, *a):
            w = getattr(trainer.strategy.checkpoint_io, "_writer", None)
            if w is not None:
                w.join()
            seen[trainer.global_step] = {p.name for p in ck.glob("*.ckpt")}

    return Record(), seen


def test_lightning_best_to_disk_at_end_keeps_every_best_in_memory_until_fit_ends(memory_config):
    pytest.importorskip("lightning")
    ck, _ = memory_config(best_to_disk="at_end")
    record, seen = _lightning_disk(ck)
    # ModelCheckpoint(monitor=...) as in the README: a new best at 3 and at 6 (top 1: 3 is removed then)
    trainer, _, _ = _lightning(ck, max_steps=10, monitor="m", mode="min", save_top_k=1, extra=[record],
                               metric=lambda step: {3: 2, 6: 1}.get(step, 3))
    assert seen and all(v == set() for v in seen.values()), seen  # nothing written to disk during fit
    mc = trainer.checkpoint_callback
    assert Path(mc.best_model_path).name == "epoch=0-step=6.ckpt" and Path(mc.best_model_path).is_file()
    assert sorted(p.name for p in ck.glob("*.ckpt")) == ["epoch=0-step=6.ckpt"]  # the removed best never reached it
    assert torch.load(mc.best_model_path, weights_only=False)["global_step"] == 6
    assert trainer.strategy.checkpoint_io.saves == 2


def test_lightning_best_to_disk_interval_writes_the_first_best_at_once_and_a_later_one_at_the_end(memory_config,
                                                                                                     monkeypatch):
    pytest.importorskip("lightning")
    ck, _ = memory_config(best_to_disk="interval", best_to_disk_interval_s=3600)
    record, seen = _lightning_disk(ck)
    trainer, _, _ = _lightning(ck, max_steps=10, monitor="m", mode="min", save_top_k=-1, extra=[record],
                               metric=lambda step: {3: 2, 6: 1}.get(step, 3))
    assert seen[4] == {"epoch=0-step=3.ckpt"}  # the first best: at once
    assert seen[8] == {"epoch=0-step=3.ckpt"}, seen  # the best at 6 waits: the interval is not over
    assert Path(trainer.checkpoint_callback.best_model_path).name == "epoch=0-step=6.ckpt"
    assert {p.name for p in ck.glob("*.ckpt")} >= {"epoch=0-step=3.ckpt", "epoch=0-step=6.ckpt", "epoch=0-step=9.ckpt"}


# --------------------------------------------------------------------------------------------- Lightning
def _lightning(ck: Path, max_steps: int, every: int = 3, ckpt_path=None, metric=lambda step: abs(step - 3) + 1,
               extra=(), **mc_kw):
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint

    from ckpt_daemon.integrations.lightning import CkptDaemonCallback

    class Net(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 1))

        def training_step(self, batch, i):
            x, y = batch
            loss = torch.nn.functional.mse_loss(self.net(x), y)
            # for ModelCheckpoint(monitor="m"): by default best at the first save (step 3)
            self.log("m", float(metric(self.global_step + 1)))
            return loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-2)

    pl.seed_everything(0, verbose=False)
    x = torch.randn(128, 8, generator=torch.Generator().manual_seed(0))
    data = torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True))
    mc = ModelCheckpoint(dirpath=ck, every_n_train_steps=every, filename="{epoch}-{step}",
                         **{"save_top_k": -1, **mc_kw})
    cb = CkptDaemonCallback()
    trainer = pl.Trainer(max_steps=max_steps, callbacks=[mc, cb, *extra], logger=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu", devices=1, num_sanity_val_steps=0)
    net = Net()
    trainer.fit(net, torch.utils.data.DataLoader(data, batch_size=8), ckpt_path=ckpt_path)
    return trainer, net, cb


def test_lightning_saves_go_to_memory_and_persist_under_the_name_lightning_gave(under_daemon, monkeypatch):
    pytest.importorskip("lightning")
    from ckpt_daemon.integrations.lightning import MemoryCheckpointIO

    ck, region = under_daemon
    trainer, _, _ = _lightning(ck, max_steps=7)
    assert isinstance(trainer.strategy.checkpoint_io, MemoryCheckpointIO) and trainer.strategy.checkpoint_io.saves == 2
    # step 3 only in memory; the newest (6) written to disk when fit finished (the script may use it next)
    assert [p.name for p in ck.glob("*.ckpt")] == ["epoch=0-step=6.ckpt"]
    assert cat.verify_entry(cat.scan(ck, ["epoch={epoch}-step={step}.ckpt"]).by_name("epoch=0-step=6.ckpt")).valid
    info = next(s for s in mem.Region(region).slots()[0] if s.step == 3)
    assert (info.name, info.layout) == ("epoch=0-step=3.ckpt", "file")

    copy = _resume_from_memory(monkeypatch, ck, info)
    assert copy.parent == region / f"resume-{os.getpid()}" and copy.read_bytes() == _slot_bytes(info)[info.name]
    (ck.parent / "disk").mkdir()
    on_disk = shutil.copy(copy, ck.parent / "disk" / info.name)
    resumed, net, cb = _lightning(ck, max_steps=9, ckpt_path=str(copy))
    assert cb.start_step == 3 and resumed.global_step == 9 and not copy.exists()
    monkeypatch.delenv("CKPT_DAEMON_MEMORY")
    _, ref, _ = _lightning(ck.parent / "disk", max_steps=9, every=1000, ckpt_path=str(on_disk))
    monkeypatch.setenv("CKPT_DAEMON_MEMORY", str(region))
    for (k, a), b in zip(net.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(a, b), k  # resuming from memory is resuming from that checkpoint on disk

    # the daemon's persist: the file under Lightning's name, its checksum recorded from memory
    info = next(s for s in mem.Region(region).slots()[0] if s.step == 6)
    assert info.name == "epoch=0-step=6-v1.ckpt"  # Lightning's own versioning: step 6 was on disk already
    r = mem.persist_slot(info, ck)
    assert r.path == ck / info.name and r.path.is_file()
    assert torch.load(r.path, weights_only=False)["global_step"] == 6
    sc = foreign.read_sidecar(ck, r.path.name)
    assert sc is not None and set(sc["files"]) == {""} and sc["layout"] == "file"
    e = cat.scan(ck, ["epoch={epoch}-step={step}.ckpt"], verify=True).by_name(r.path.name)
    assert e.valid and e.recorded and e.step == 6, e.reason
    _flip(r.path, r.path.stat().st_size // 2)
    assert not cat.verify_entry(cat.scan(ck, ["epoch={epoch}-step={step}.ckpt"]).by_name(r.path.name)).valid


def test_lightning_memory_slots_are_reserved_and_faulted_in_when_fit_starts(under_daemon):
    pytest.importorskip("lightning")
    import lightning.pytorch as pl

    ck, region = under_daemon
    seen = {}

    class Probe(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 1:  # before the first save (step 3)
                assert not mem.Region(region).slots()[0]
                seen["sizes"] = _slots_ready(trainer.strategy.checkpoint_io._writer)

    trainer, _, _ = _lightning(ck, max_steps=7, extra=[Probe()])
    assert trainer.strategy.checkpoint_io.saves == 2
    assert {s.step for s in mem.Region(region).slots()[0]} == {3, 6}
    # the estimate held: both saves went into the slots reserved at the start, none grew them
    assert all(os.path.getsize(region / f"slot-{i}") == size for i, size in enumerate(seen["sizes"]))


def test_lightnings_best_and_last_exist_as_files_after_fit(under_daemon):
    pytest.importorskip("lightning")
    ck, region = under_daemon
    trainer, _, _ = _lightning(ck, max_steps=10, monitor="m", mode="min", save_last="link")
    mc = trainer.checkpoint_callback
    assert Path(mc.best_model_path).name == "epoch=0-step=3.ckpt" and Path(mc.best_model_path).is_file()
    assert (ck / "last.ckpt").resolve().is_file() and Path(os.readlink(ck / "last.ckpt")).name == "epoch=0-step=9.ckpt"
    assert not (ck / "epoch=0-step=6.ckpt").exists()  # neither best nor newest: in memory only (the daemon's cadence)
    assert trainer.strategy.checkpoint_io.saves == 3  # all three went through memory


def test_lightnings_bounded_top_k_files_exist_after_fit(under_daemon):
    pytest.importorskip("lightning")
    ck, _ = under_daemon
    # step 6 is kept in the top 3 but is neither the best (3) nor the newest save (9)
    trainer, _, _ = _lightning(ck, max_steps=10, monitor="m", mode="min", save_top_k=3, metric=lambda step: step)
    kept = trainer.checkpoint_callback.best_k_models
    assert len(kept) == 3 and all(Path(p).is_file() for p in kept), (kept, sorted(os.listdir(ck)))
    assert trainer.strategy.checkpoint_io.saves == 3  # all through memory


def test_a_lightning_save_that_memory_cannot_commit_is_written_to_disk(under_daemon, failing_commit, caplog):
    pytest.importorskip("lightning")
    ck, region = under_daemon
    _lightning(ck, max_steps=3)
    assert "could not be committed to memory; writing it to disk" in caplog.text
    e = cat.scan(ck, ["epoch={epoch}-step={step}.ckpt"], verify=True).by_name("epoch=0-step=3.ckpt")
    assert e is not None and e.valid and e.step == 3, e and e.reason


# ----------------------------------------------------------------------------------------- hostile slots
@pytest.mark.parametrize("target, reason", [
    ({"name": "../escape", "layout": "folder"}, "unsafe target"),
    ({"name": "latest", "layout": "folder"}, "unsafe target"),
    ({"name": "x", "layout": "tarball"}, "unknown layout"),
    ({"name": "checkpoint-9", "layout": "native"}, "not checkpoint-3"),
    ({"name": "step=3.ckpt", "layout": "file"}, "exactly that file"),
    ({"name": "b.ckpt", "layout": "file"}, "does not carry its step"),
    ({"name": "epoch=0-step=999.ckpt", "layout": "file"}, "does not carry its step 3"),
    ({"name": "x"}, "malformed target"),
    ("checkpoint-3", "malformed target"),
])
def test_hostile_slot_targets_are_reported_never_persisted(tmp_path, target, reason):
    region, ck = tmp_path / "shm", tmp_path / "ck"
    from ckpt_daemon.memsave import MemoryWriter

    w = MemoryWriter(region, ck)
    w.save_files(3, "step=3.pt", "file", [("step=3.pt", b"x" * 100)])
    w.close()
    p = region / "slot-0" if mem.Region(region).read_slot(0)[0] else region / "slot-1"
    raw = bytearray(p.read_bytes())
    hlen = int.from_bytes(raw[24:32], "little")
    h = json.loads(raw[64:64 + hlen])
    h["target"] = target
    new = json.dumps(h).encode()
    raw[64:64 + hlen] = b" " * hlen
    raw[64:64 + len(new)] = new
    raw[24:32] = len(new).to_bytes(8, "little")
    p.write_bytes(bytes(raw))
    info, problems = mem.Region(region).newest(ck)
    assert info is None and any(reason in str(x) for x in problems), problems


def test_a_slot_whose_files_are_not_what_its_layout_claims_is_not_persisted(tmp_path):
    from ckpt_daemon.memsave import MemoryWriter

    region, ck = tmp_path / "shm", tmp_path / "ck"
    ck.mkdir()
    w = MemoryWriter(region, ck)
    w.save_files(4, "checkpoint-4", "folder", [("weights.bin", os.urandom(4096))])  # no Hugging Face file in it
    w.save_files(5, "model_step_5.pt", "file", [("model_step_5.pt", b"not a torch.save zip" * 50)])
    w.close()
    for info in mem.Region(region).slots()[0]:
        with pytest.raises(ValueError, match="is (invalid|incomplete|corrupt)"):
            mem.persist_slot(info, ck)
    assert sorted(os.listdir(ck)) == [".ckpt-daemon"]  # nothing half written, no sidecar left
    assert not list((ck / ".ckpt-daemon").glob("manifests/*"))


def test_a_name_taken_on_disk_by_a_torn_or_foreign_entry_does_not_cost_the_memory_state(tmp_path):
    import io
    import time

    from ckpt_daemon.memsave import MemoryWriter

    region, ck = tmp_path / "shm", tmp_path / "ck"
    ck.mkdir()
    buf = io.BytesIO()
    torch.save({"global_step": 5, "epoch": 0, "state_dict": {"w": torch.ones(4)}}, buf)
    w = MemoryWriter(region, ck)
    w.save_files(5, "step=5.ckpt", "file", [("step=5.ckpt", buf.getvalue())])
    w.close()
    info = _slot(region, ck)
    squatter = ck / "step=5.ckpt"
    squatter.write_bytes(b"PK\x03\x04 torn" * 10)
    with pytest.raises(ValueError, match="being written"):  # fresh and incomplete: a writer may be at work
        mem.persist_slot(info, ck)
    os.utime(squatter, (time.time() - 3600,) * 2)
    assert "step=5.ckpt is incomplete" in mem.name_taken(squatter, 5)
    r = mem.persist_slot(info, ck)
    assert r.path == squatter and torch.load(squatter, weights_only=False)["global_step"] == 5
    assert [q["name"] for q in store_delete.quarantined(ck)] == ["step=5.ckpt"]  # the torn one kept as evidence
    assert mem.name_taken(squatter, 5) is None  # and now it counts as on disk


def test_a_region_of_another_user_or_a_planted_symlink_is_never_used(tmp_path):
    from ckpt_daemon.memsave import MemoryWriter

    region, ck = tmp_path / "shm", tmp_path / "ck"
    ck.mkdir()
    w = MemoryWriter(region, ck)
    w.save_files(3, "step=3.pt", "file", [("step=3.pt", b"x" * 100)])
    w.close()
    info = _slot(region, ck)
    outside = tmp_path / "outside"
    (outside / "step=3.pt").mkdir(parents=True)
    (outside / "step=3.pt" / "precious.txt").write_text("keep me")
    dest = region / "resume-1"
    dest.symlink_to(outside)  # planted: the copy must not follow it
    out = mem.materialize(info, ck, dest)
    assert (outside / "step=3.pt" / "precious.txt").read_text() == "keep me"
    assert not dest.is_symlink() and out.read_bytes() == b"x" * 100
    os.chmod(region, 0o777)
    MemoryWriter(region, ck).close()
    assert (region.stat().st_mode & 0o777) == 0o700  # ours, made private again
    os.chown(region, 65534, 65534)
    with pytest.raises(mem.MemoryCheckpointError, match="belongs to another user"):
        MemoryWriter(region, ck)


# ------------------------------------------------------------------------------------ under the daemon
def _memory_byo_daemon(tmp_path: Path, region: Path, script: str, patterns: list[str]) -> Daemon:
    return Daemon(tmp_path, {
        "checkpoints": {"pattern": patterns, "settle_s": 1,
                        "memory": {"enabled": True, "persist_every": 1000, "dir": str(region)}},
        "training": {"command": [PY, str(BYO / script)], "stop_timeout_s": 60,
                     # no best metric: a new best is written to disk too, and the test wants a state in memory only
                     "env": {"STEP_SLEEP": "0.03", "HF_HUB_OFFLINE": "1", "NO_BEST": "1"},
                     "restart": {"initial_backoff_s": 0.2, "max_backoff_s": 1.0, "max_crashes": 20,
                                 "crash_window_s": 600}}})


@pytest.mark.slow
@pytest.mark.parametrize("script, patterns", [
    ("hf_train.py", ["checkpoint-{step}"]),
    ("lightning_train.py", ["epoch={epoch}-step={step}.ckpt"]),
])
def test_kill_minus_9_of_a_users_trainer_loses_no_step_beyond_its_memory_checkpoint(tmp_path, daemons, script,
                                                                                    patterns):
    pytest.importorskip("transformers" if script.startswith("hf") else "lightning")
    region = Path("/dev/shm") / f"ckpt-test-{os.getpid()}-{tmp_path.name}"
    ck = tmp_path / "checkpoints"
    d = _memory_byo_daemon(tmp_path, region, script, patterns).start()
    daemons.append(d)
    try:
        d.wait(lambda s: (info := mem.Region(region).newest(ck)[0]) is not None and info.step >= 10, timeout=180,
               what="memory checkpoints from the user's trainer")
        pid = d.status()["training"]["pid"]
        os.kill(pid, signal.SIGSTOP)
        info = _slot(region, ck)
        assert not (ck / info.name).exists()  # only in memory so far
        os.kill(pid, signal.SIGKILL)
        s = d.wait(lambda s: s["training"]["pid"] not in (None, pid) and s["training"]["state"] == "running"
                   and s, timeout=120, what="the restart")
        assert s["training"]["resumed_from"] == info.name
        trainer_log = tmp_path / "logs" / "trainer.log"
        d.wait(lambda s: f"BEGIN {info.step}" in trainer_log.read_text(), timeout=120,
               what=f"the trainer resuming at step {info.step}")
        d.wait(lambda s: (ck / info.name).exists(), what="the breakpoint's persist")
        e = cat.verify_entry(cat.scan(ck, patterns).by_name(info.name))
        assert e.valid and e.recorded, e.reason
        assert "never saved to memory" not in d.log()  # the callbacks save to memory: no warning that they do not
        assert d.stop() == 0
        assert "exited with 143" in trainer_log.read_text()
        newest = cat.scan(ck, patterns, verify=True).newest_valid()
        assert newest is not None and newest.step > info.step  # the stop's save went through memory to disk
    finally:
        memagent.remove_stale_region(region)


@pytest.mark.slow
def test_a_plain_torch_save_script_with_memory_on_is_told_once_that_it_gets_nothing(tmp_path, daemons):
    """memory on, a script that saves with torch.save to disk only: the daemon says so once, in its log and in
    the status (which otherwise shows an active region with nothing in it), and goes on as before."""
    region = Path("/dev/shm") / f"ckpt-test-{os.getpid()}-{tmp_path.name}"
    ck = tmp_path / "checkpoints"
    d = Daemon(tmp_path, {
        "checkpoints": {"pattern": ["model_step_{step}.pt"], "memory": {"enabled": True, "dir": str(region)}},
        "training": {"command": [PY, str(BYO / "plain_train.py"), str(ck), "--every", "5"], "stop_timeout_s": 60}})
    d.start()
    daemons.append(d)
    try:
        s = d.wait(lambda s: s["memory"]["warning"] and s, timeout=180, what="the warning that memory is unused")
        assert s["memory"]["active"] and s["memory"]["newest"] is None
        warning = s["memory"]["warning"]
        assert "never saved to memory" in warning and "model_step_" in warning
        assert "checkpoints.memory.enabled: false" in warning and "CheckpointManager(memory=True)" in warning
        n = len(list(ck.glob("model_step_*.pt")))
        d.wait(lambda s: len(list(ck.glob("model_step_*.pt"))) >= n + 3, timeout=120, what="more saves")
        assert d.stop() == 0
        assert d.log().count("has never saved to memory") == 1  # once
    finally:
        memagent.remove_stale_region(region)
