"""Memory-first checkpoints: the slot format and commit protocol, loads and persists, hostile slot files,
and the real daemon persisting at the breakpoint after a SIGKILL of the trainer or of itself."""

from __future__ import annotations

import json
import os
import random
import signal
import struct
import subprocess
from pathlib import Path

import pytest
import torch

from ckpt_daemon import memory as mem
from ckpt_daemon.checkpoint import CheckpointManager, read_checkpoint
from ckpt_daemon.config import RestartPolicy
from ckpt_daemon.errors import NoValidCheckpoint
from ckpt_daemon.memsave import read_slot_state
from ckpt_daemon.store import catalog as cat
from ckpt_daemon.store import manifest as mf
from daemon import memagent
from daemon.supervisor import CrashPolicy
from tests.helpers import (
    PY,
    Daemon,
    env_for_children,
    make_state,
    newest_memory_step,
    read_losses,
    run_py,
    same_nested,
    same_state,
    write_config,
)


@pytest.fixture
def region(tmp_path):
    return tmp_path / "shm"  # any folder works for the format; /dev/shm is only the default


def train_steps(m, opt, sched, n: int, seed: int) -> list[float]:
    g = torch.Generator().manual_seed(seed)
    opt.zero_grad()  # make_state leaves gradients behind
    losses = []
    for _ in range(n):
        x = torch.randn(8, 64, generator=g)
        loss = (m(x) ** 2).mean() + torch.rand(1).sum() * 0  # draws from the global RNG too
        loss.backward()
        opt.step()
        opt.zero_grad()
        sched.step()
        losses.append(loss.item())
    return losses


# ---------------------------------------------------------------------------------- format and round trip
def test_slot_round_trip_is_byte_exact_with_a_native_save(tmp_path, region):
    m, opt, sched = make_state()
    ck = tmp_path / "ck"
    mgr = CheckpointManager(ck, memory=region)
    kw = dict(model=m, optimizer=opt, scheduler=sched, epoch=1, data_state={"pos": 3}, metrics={"val_loss": 2.0},
              config={"lr": 1e-3}, rng={})
    assert mgr.save(7, memory=True, **kw) == ck / "checkpoint-7"
    mgr.wait()
    info, problems = mem.Region(region).newest(ck)
    assert info is not None and info.step == 7 and not problems
    assert not (ck / "checkpoint-7").exists()  # memory only: the daemon persists it
    r = mem.persist_slot(info, ck)
    assert r.path == ck / "checkpoint-7"
    native = tmp_path / "native"
    CheckpointManager(native).save(7, **kw)
    # the persisted files are the exact bytes a native save writes (the manifest differs only in its time)
    for f in (ck / "checkpoint-7").iterdir():
        if f.name != mf.MANIFEST:
            assert f.read_bytes() == (native / "checkpoint-7" / f.name).read_bytes(), f.name
    a, b = (json.loads((p / "checkpoint-7" / mf.MANIFEST).read_text()) for p in (ck, native))
    assert mf.SEAL in a and mf.SEAL in b  # both sealed (their seals differ with the time)
    for k in ("created", "created_unix", mf.SEAL):
        a.pop(k), b.pop(k)
    assert a == b
    assert cat.scan(ck, ["checkpoint-{step}"], verify=True).newest_valid().name == "checkpoint-7"
    assert os.readlink(ck / "latest") == "checkpoint-7"
    # load: from memory (same step as the disk: read faster), the same state as from disk
    m2, opt2, sched2 = make_state(seed=1)
    loaded = CheckpointManager(ck, memory=region).load("latest", model=m2, optimizer=opt2, scheduler=sched2)
    assert loaded.from_memory and loaded.step == 7 and loaded.data_state == {"pos": 3}
    assert same_state(m, m2) and same_nested(opt.state_dict(), opt2.state_dict())
    disk = read_checkpoint(ck / "checkpoint-7")
    assert same_nested(disk["optimizer"], opt2.state_dict())
    mgr.close()


def test_resume_from_memory_is_exact(tmp_path, region):
    ck = tmp_path / "ck"
    m, opt, sched = make_state()
    torch.manual_seed(11)
    mgr = CheckpointManager(ck, memory=region)
    train_steps(m, opt, sched, 3, seed=1)
    mgr.save(3, model=m, optimizer=opt, scheduler=sched, memory=True)
    mgr.wait()
    expected = train_steps(m, opt, sched, 4, seed=2)  # the uninterrupted run
    mgr.close()
    m2, opt2, sched2 = make_state(seed=5)
    torch.manual_seed(99)
    loaded = CheckpointManager(ck, memory=region).load("latest", model=m2, optimizer=opt2, scheduler=sched2)
    assert loaded.from_memory and loaded.step == 3
    assert train_steps(m2, opt2, sched2, 4, seed=2) == expected  # bit for bit


def test_under_torchrun_rank_0_writes_the_slots_and_another_rank_loads_exactly_what_rank_0_loaded(tmp_path, region):
    """A job's ranks share one region: only rank 0 writes (every rank holds the same state), and a rank that
    follows rank 0's choice (`load_same`) gets the same memory state, not the disk's older one."""
    ck = tmp_path / "ck"
    m, opt, sched = make_state()
    train_steps(m, opt, sched, 2, seed=1)
    r0 = CheckpointManager(ck, memory=region, rank=0)
    r0.save(2, model=m, optimizer=opt, scheduler=sched, data_state={"pos": 2})  # on disk
    r1 = CheckpointManager(ck, memory=region, rank=1)
    train_steps(m, opt, sched, 3, seed=2)
    assert r1.save(5, model=m, optimizer=opt, scheduler=sched, memory=True) is None  # not rank 0's to write
    assert r1.reserve_memory(model=m, optimizer=opt) is False
    assert mem.Region(region).newest(ck)[0] is None
    r0.save(5, model=m, optimizer=opt, scheduler=sched, data_state={"pos": 5}, memory=True)
    r0.wait()
    m0, opt0, sched0 = make_state(seed=3)
    loaded = r0.load("latest", model=m0, optimizer=opt0, scheduler=sched0)
    assert loaded.from_memory and loaded.step == 5
    m1, opt1, sched1 = make_state(seed=4)
    same = r1.load_same(loaded.source(), model=m1, optimizer=opt1, scheduler=sched1)
    assert same.from_memory and same.step == 5 and same.data_state == {"pos": 5}
    assert same_state(m, m1) and same_nested(opt.state_dict(), opt1.state_dict())
    # a state this rank cannot read (gone from memory, not on disk yet) stops the job with the reason
    r0.close()
    memagent.remove_stale_region(region)
    with pytest.raises(NoValidCheckpoint, match="rank 1 could not read the memory checkpoint at step 5"):
        r1.load_same(loaded.source(), model=m1, optimizer=opt1, scheduler=sched1)
    # a folder: loaded and verified here too
    src = {"path": str(ck / "checkpoint-2"), "step": 2, "from_memory": False}
    assert r1.load_same(src, model=m1, optimizer=opt1, scheduler=sched1).step == 2


def test_double_buffering_keeps_the_previous_slot_and_the_newest_wins(tmp_path, region):
    m, opt, sched = make_state()
    mgr = CheckpointManager(tmp_path / "ck", memory=region)
    for step in (1, 2, 3):
        mgr.save(step, model=m, optimizer=opt, memory=True)
        mgr.wait()
        good, _ = mem.Region(region).slots()
        assert [s.step for s in good] == ([step, step - 1] if step > 1 else [1])
    mgr.close()


def _flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


def test_a_torn_or_damaged_slot_leaves_the_previous_one_used(tmp_path, region, caplog):
    ck = tmp_path / "ck"
    m, opt, sched = make_state()
    mgr = CheckpointManager(ck, memory=region)
    mgr.save(4, model=m, optimizer=opt, memory=True)
    mgr.wait()
    older = {k: v.clone() for k, v in m.state_dict().items()}
    train_steps(m, opt, sched, 1, seed=3)
    mgr.save(5, model=m, optimizer=opt, memory=True)
    mgr.wait()
    mgr.close()
    reg = mem.Region(region)
    newest, _ = reg.newest(ck)
    assert newest.step == 5
    # 1. a flipped payload byte: the checksum catches it; loading falls back to the previous slot's step? No: to
    #    the disk (a slot is used only whole and verified), and persisting refuses it
    _flip(newest.path, mem.PAYLOAD_OFFSET + 100)
    state, why = read_slot_state(region, ck)
    assert state is None and "fails its checksum" in why
    with pytest.raises(ValueError, match="fails its checksum"):
        mem.persist_slot(newest, ck)
    assert not (ck / "checkpoint-5").exists()
    # 2. the commit word unset (a writer killed mid-copy): that slot is not committed, the other one is used
    with open(newest.path, "r+b") as f:
        f.seek(mem.SEQ_OFFSET)
        f.write(struct.pack("<Q", newest.seq + 1))
    info, problems = reg.newest(ck)
    assert info.step == 4 and any(p.kind == "in_progress" and "not committed" in str(p) for p in problems)
    m2, opt2, _ = make_state(seed=9)
    loaded = CheckpointManager(ck, memory=region).load("latest", model=m2, optimizer=opt2)
    assert loaded.from_memory and loaded.step == 4
    assert all(torch.equal(older[k], v) for k, v in m2.state_dict().items())


WRITER = r"""
import os, sys, time, torch
from ckpt_daemon.checkpoint import CheckpointManager
import ckpt_daemon.memsave as ms
torch.manual_seed(0)
m = torch.nn.Linear(512, 512)
mgr = CheckpointManager(sys.argv[1], memory=sys.argv[2])
mgr.save(1, model=m, memory=True); mgr.wait()
orig = ms._u8
def slow(t):  # the copy of the second save takes a while: the parent kills us in the middle of it
    print("copying", flush=True); time.sleep(30); return orig(t)
ms._u8 = slow
with torch.no_grad():
    m.weight.add_(1.0)
mgr.save(2, model=m, memory=True)
"""


@pytest.mark.slow
def test_sigkill_of_a_real_writer_mid_copy_leaves_the_previous_slot(tmp_path, region):
    ck = tmp_path / "ck"
    p = subprocess.Popen([PY, "-c", WRITER, str(ck), str(region)], stdout=subprocess.PIPE, env=env_for_children(),
                         text=True)
    try:
        assert p.stdout.readline().strip() == "copying"  # waits for the event, no fixed sleep
        p.kill()
    finally:
        p.wait()
    reg = mem.Region(region)
    info, problems = reg.newest(ck)
    assert info.step == 1 and any(pr.kind == "in_progress" and "not committed" in str(pr) for pr in problems)
    m = torch.nn.Linear(512, 512)
    loaded = CheckpointManager(ck, memory=region).load("latest", model=m)
    assert loaded.from_memory and loaded.step == 1
    torch.manual_seed(0)
    assert torch.equal(m.weight, torch.nn.Linear(512, 512).weight)  # step 1's weights, not the half-copied ones
    assert mem.persist_slot(info, ck).path is not None


HOSTILE = [
    (b"", None),
    (b"\x00" * 64, None),  # reserved, never written: nothing to report
    (random.Random(4096).randbytes(4096), "bad magic"),  # garbage, the same in every process (xdist workers compare)
    (struct.pack("<8sIIQQQ", mem.MAGIC, 99, 0, 2, 10, 10).ljust(64, b"\0"), "unknown format version"),
    (struct.pack("<8sIIQQQ", mem.MAGIC, 1, 0, 3, 10, 10).ljust(64, b"\0"), "not committed"),
    (struct.pack("<8sIIQQQ", mem.MAGIC, 1, 0, 2, 1 << 40, 10).ljust(64, b"\0"), "corrupt header length"),
]


def _slot_with_header(h, payload_len: int = 4096, raw: bytes | None = None) -> bytes:
    raw = json.dumps(h).encode() if raw is None else raw
    head = struct.pack("<8sIIQQQ", mem.MAGIC, 1, 0, 2, len(raw), payload_len).ljust(mem.JSON_OFFSET, b"\0") + raw
    return head.ljust(mem.PAYLOAD_OFFSET + min(payload_len, 4096), b"\0")  # the file: never what it claims


GOOD = {"step": 5, "gen": 1, "files": [["model.safetensors", 0, 10], ["manifest.json", 4096, 0]],
        "manifest_sha256": "0" * 64, "boot_id": "x", "pid": 1, "ckpt_dir": "/x", "time": 0}


@pytest.mark.parametrize("data, reason", HOSTILE + [
    (_slot_with_header({**GOOD, "files": [["../../etc/passwd", 0, 10], ["manifest.json", 10, 0]]}), "unsafe file"),
    (_slot_with_header({**GOOD, "files": [["a/b", 0, 10], ["manifest.json", 10, 0]]}), "unsafe file"),
    (_slot_with_header({**GOOD, "files": [["m", 0, 1 << 50], ["manifest.json", 10, 0]]}), "outside its payload"),
    (_slot_with_header({**GOOD, "files": [["m", 0, 100], ["manifest.json", 50, 0]]}), "over another file"),
    (_slot_with_header({**GOOD, "files": [["m", 0, -1], ["manifest.json", 10, 0]]}), "outside its payload"),
    (_slot_with_header({**GOOD, "files": [["manifest.json", 0, 1], ["m", 10, 0]]}), "manifest.json last"),
    (_slot_with_header({**GOOD, "step": "5"}), "valid step"),
    (_slot_with_header({**GOOD, "files": "x" * 100}), "file list"),
    (_slot_with_header({**GOOD, "files": [[1, 2]] * 5000}), "file list"),
    (_slot_with_header({**GOOD, "pid": True}), "writer identity"),
    (_slot_with_header({**GOOD, "manifest_sha256": "../x"}), "manifest checksum"),
    (_slot_with_header([1, 2, 3]), "not a JSON object"),
    (_slot_with_header(None, raw=b"[" * 200_000), "nested too deeply"),
    (_slot_with_header(None, raw=b"\xff\xfe{"), "not valid JSON"),
    (_slot_with_header({**GOOD}, payload_len=1 << 45), "does not fit"),
    (_slot_with_header({**GOOD})[:mem.JSON_OFFSET + 20], "corrupt header length"),
])
def test_hostile_slot_headers_are_reported_never_raised(region, data, reason):
    region.mkdir()
    (region / "slot-0").write_bytes(data)
    info, why = mem.Region(region).read_slot(0)
    if reason is None:
        assert why is None or info is None  # nothing to report, or a clean rejection
        if data[:8] == b"\0" * 8 or not data:
            assert info is None and why is None
    else:
        assert info is None and reason in str(why), why
    newest, problems = mem.Region(region).newest()
    assert newest is None or newest.step == 5


def test_a_slot_that_is_a_symlink_or_a_fifo_is_refused(tmp_path, region):
    region.mkdir()
    (tmp_path / "secret").write_bytes(b"x" * 100)
    os.symlink(tmp_path / "secret", region / "slot-0")
    os.mkfifo(region / "slot-1")
    newest, problems = mem.Region(region).newest()
    assert newest is None and len(problems) == 2


@pytest.mark.slow
def test_a_region_too_small_for_two_copies_is_refused_with_a_clear_error(tmp_path, tmpfs):
    small = tmpfs("8m")
    cfg = write_config(tmp_path, {"checkpoints": {"memory": {"enabled": True}}, "trainer": {"max_steps": 3}})
    env = {**env_for_children(), "CKPT_DAEMON_MEMORY": str(small / "region")}
    r = run_py(["-m", "trainer", "--config", str(cfg)], env=env, timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Memory checkpoints are refused" in r.stderr and "cannot hold two copies" in r.stderr
    assert "checkpoints.memory.dir" in r.stderr and "Traceback" not in r.stderr
    # and the bound of the config is an error of its own
    m, opt, _ = make_state()
    mgr = CheckpointManager(tmp_path / "ck2", memory=tmp_path / "r2", memory_max_bytes=1 << 20)
    with pytest.raises(mem.MemoryCheckpointError, match="max_gb"):
        mgr.save(1, model=m, optimizer=opt, memory=True)
    mgr.close()


def test_first_crash_restarts_at_once_later_ones_back_off():
    p = CrashPolicy(RestartPolicy(initial_backoff_s=1, max_backoff_s=8, healthy_after_s=100, max_crashes=100))
    assert [p.on_exit(t, 1, 5, None, None).delay_s for t in range(6)] == [0, 1, 2, 4, 8, 8]
    assert p.on_exit(10, 1, 500, None, None).delay_s == 0  # the first crash after a healthy run
    old = CrashPolicy(RestartPolicy(initial_backoff_s=1, max_backoff_s=8, first_restart_immediate=False))
    assert [old.on_exit(t, 1, 5, None, None).delay_s for t in range(3)] == [1, 2, 4]


# ---------------------------------------------------------------------------------- the real daemon
def _memory_daemon(tmp_path: Path, region: Path, trainer: dict | None = None) -> Daemon:
    return Daemon(tmp_path, {
        "checkpoints": {"memory": {"enabled": True, "every_steps": 1, "persist_every": 1000, "dir": str(region)}},
        "trainer": {"checkpoint_every_steps": 1000, "eval_every_steps": 1000, **(trainer or {})},
        "training": {"restart": {"initial_backoff_s": 0.2}},
    })


@pytest.mark.slow
def test_daemon_persists_at_the_breakpoint_and_adopts_after_its_own_death(tmp_path, daemons):
    region = Path("/dev/shm") / f"ckpt-test-{os.getpid()}-{tmp_path.name}"
    ck = tmp_path / "checkpoints"
    d = _memory_daemon(tmp_path, region).start()
    daemons.append(d)
    try:
        # 1. SIGKILL of the trainer: the newest memory state is persisted before the restart, and resumed from
        d.wait(lambda s: (d.step(s) or 0) >= 15, what="training with memory checkpoints")
        pid = d.status()["training"]["pid"]
        os.kill(pid, signal.SIGSTOP)  # freeze it so that "the newest memory checkpoint" is well defined
        last = newest_memory_step(region, ck)
        assert last >= 10 and not (ck / f"checkpoint-{last}").exists()  # only in memory so far
        os.kill(pid, signal.SIGKILL)
        s = d.wait(lambda s: s["training"]["pid"] not in (None, pid) and (d.step(s) or 0) > last and s,
                   what="a restarted trainer")
        d.wait(lambda s: (ck / f"checkpoint-{last}").is_dir(), what="the breakpoint's persist (in the background)")
        assert "verified the memory checkpoint at the breakpoint" in d.log()
        assert s["training"]["resumed_from"] == f"checkpoint-{last}"  # steps lost beyond the memory checkpoint: 0
        trainer_log = (tmp_path / "logs" / "trainer.log").read_text()
        assert f"resumed from checkpoint-{last} at step {last}" in trainer_log
        assert "read from the memory checkpoint" in trainer_log
        assert s["training"]["last_crash"]["description"] == "signal SIGKILL"
        restart = [json.loads(x) for x in d.log().splitlines() if "restarting after backoff" in x]
        assert restart[-1]["delay_s"] == 0  # a first crash restarts at once
        losses = read_losses(tmp_path / "logs" / "metrics.jsonl")
        assert max(losses) > last

        # 2. SIGKILL of the daemon with a state in memory newer than the disk (its trainer frozen, then killed,
        #    so it cannot save on its way out): a new daemon adopts the region and persists it first
        pid = d.status()["training"]["pid"]
        d.wait(lambda s: newest_memory_step(region, ck) >= last + 5, what="more memory checkpoints")
        os.kill(pid, signal.SIGSTOP)
        d.proc.kill()
        d.proc.wait()
        last2 = newest_memory_step(region, ck)
        os.kill(pid, signal.SIGKILL)
        assert last2 > last and not (ck / f"checkpoint-{last2}").exists()
        d2 = _memory_daemon(tmp_path, region).start()
        daemons.append(d2)
        s = d2.wait(lambda s: (d2.step(s) or 0) > last2 and s, what="training under the new daemon")
        assert s["training"]["resumed_from"] == f"checkpoint-{last2}"
        c = cat.scan(ck, ["checkpoint-{step}"], verify=True)
        assert all(e.valid for e in c.entries), [(e.name, e.reason) for e in c.entries if not e.valid]
        assert "persisted a memory checkpoint" in d2.log() and "left by a previous daemon" in d2.log()
        # 3. a clean stop: the final save is on disk and the region is removed
        assert d2.stop() == 0
        assert not region.exists()  # slots, lock file and folder
    finally:
        memagent.remove_stale_region(region)


class _Log:
    def __init__(self):
        self.lines: list[str] = []

    def __getattr__(self, level):
        return lambda msg, **kw: self.lines.append(f"{level} {msg} {kw}")


def test_garbage_in_the_region_is_reported_and_the_agent_goes_on(tmp_path):
    """The daemon's agent on a region holding garbage, a slot of a forged step and one of another folder:
    each reported once, nothing persisted, nothing raised; the trainer then writes over them."""
    from ckpt_daemon.config import parse_config

    region = tmp_path / "region"
    region.mkdir()
    cfg = parse_config(f"checkpoints: {{dir: ck, memory: {{enabled: true, dir: {region}}}}}\n",
                       tmp_path / "config.yaml")
    ck = cfg.checkpoint_dir
    (region / "slot-0").write_bytes(mem.MAGIC + os.urandom(mem.PAYLOAD_OFFSET))
    (region / "slot-1").write_bytes(_slot_with_header({**GOOD, "ckpt_dir": str(ck), "boot_id": mem.boot_id()}))
    log = _Log()
    agent = memagent.MemoryAgent(lambda: cfg, log)
    assert agent.start()
    assert agent.persist_newest("again") is None
    text = "\n".join(log.lines)
    assert text.count("could not persist") == 1  # reported once, not at every tick
    assert "memory slot ignored" in text and "could not persist" in text and "checksum" in text
    assert not list(ck.glob("checkpoint-*")) and not list((ck / ".ckpt-daemon" / "tmp").glob("*"))
    assert agent.snapshot()["newest"]["step"] == 5  # the forged header parses; its payload never verifies
    # the trainer's saves go over them, and the region is emptied once its newest state is on disk
    m, opt, _ = make_state()
    mgr = CheckpointManager(ck, memory=region)
    for step in (1, 2):
        mgr.save(step, model=m, optimizer=opt, memory=True)
        mgr.wait()
    mgr.close()
    assert [s.step for s in mem.Region(region).slots()[0]] == [2, 1]
    assert not agent.remove_if_persisted("test")  # step 2 is only in memory: kept
    r = agent.persist_newest("test")
    assert r.path == ck / "checkpoint-2"
    assert agent.remove_if_persisted("training finished")
    assert not (region / "slot-0").exists()
    agent.close()
    memagent.remove_stale_region(region)
    assert not region.exists()


def test_breakpoint_verifies_in_memory_pins_the_slot_and_persists_it_in_the_background(tmp_path, monkeypatch, caplog):
    """The breakpoint does not wait for the disk: it verifies the newest slot in memory, records that for the
    trainer's load (which then copies without hashing again), pins the slot so that the restarted trainer
    cannot write over it, and persists it in the background."""
    from ckpt_daemon.config import parse_config

    region = tmp_path / "region"
    cfg = parse_config(f"checkpoints: {{dir: ck, memory: {{enabled: true, dir: {region}}}}}\n",
                       tmp_path / "config.yaml")
    ck = cfg.checkpoint_dir
    log = _Log()
    agent = memagent.MemoryAgent(lambda: cfg, log)
    assert agent.start()
    m, opt, sched = make_state()
    mgr = CheckpointManager(ck, memory=region)
    for step in (1, 2):
        train_steps(m, opt, sched, 1, seed=step)
        mgr.save(step, model=m, optimizer=opt, scheduler=sched, memory=True)
        mgr.wait()
    mgr.close()
    slot = agent.breakpoint("test")
    assert slot is not None and slot.step == 2
    assert not (ck / "checkpoint-2").exists()  # not waited for: persisted in the background
    assert agent.breakpoint("again").seq == slot.seq and len(agent.queue) == 1  # pinned once

    # the restarted trainer, told by the daemon to resume from it, reads it without hashing it again
    calls = []
    real = mem.digest_matches
    monkeypatch.setattr(mem, "digest_matches", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setenv("CKPT_DAEMON_MEMORY_RESUME", "2")
    m2, opt2, sched2 = make_state(seed=1)
    trainer = CheckpointManager(ck, memory=region)
    loaded = trainer.load(str(ck / "checkpoint-2"), model=m2, optimizer=opt2, scheduler=sched2)
    assert loaded.from_memory and loaded.step == 2 and calls == []
    assert same_state(m, m2) and same_nested(opt.state_dict(), opt2.state_dict())

    # it trains on and saves twice into memory: the pinned slot is never written over, and neither is the
    # newest state: the second save is skipped while the daemon holds the other slot, and counted
    assert trainer.save(3, model=m2, optimizer=opt2, memory=True) == ck / "checkpoint-3"
    trainer.wait()
    assert trainer.save(4, model=m2, optimizer=opt2, memory=True) is None
    trainer.wait()
    assert trainer._memory.skipped == 1
    trainer.close()
    pinned = mem.Region(region).read_slot(slot.index)[0]
    assert pinned.step == 2 and pinned.seq == slot.seq
    assert mem.Region(region).newest(ck)[0].step == 3

    agent.drain()
    c = cat.scan(ck, ["checkpoint-{step}"], verify=True)
    assert [e.name for e in c.entries if e.valid] == ["checkpoint-2"]
    assert "persisted a memory checkpoint" in "\n".join(log.lines)

    # a slot committed since the daemon's check is not trusted: a load hashes it, and damage is caught
    info = mem.Region(region).newest(ck)[0]
    fd = os.open(info.path, os.O_RDONLY)
    assert not mem.verified_by_daemon(ck, info, fd)
    os.close(fd)
    _flip(info.path, mem.PAYLOAD_OFFSET + info.files[0][1] + info.files[0][2] - 1)
    assert read_slot_state(region, ck, info=info)[0] is None and calls
    # ... and the breakpoint refuses it with its reason: the trainer resumes from the disk
    assert agent.breakpoint("damaged") is None
    assert "fails its checksum" in "\n".join(log.lines)
    monkeypatch.setenv("CKPT_DAEMON_MEMORY_RESUME", "3")
    with caplog.at_level("ERROR"):
        loaded = CheckpointManager(ck, memory=region).load(str(ck / "checkpoint-3"), model=m2, optimizer=opt2)
    assert not loaded.from_memory and loaded.step == 2
    assert "could not be read" in caplog.text
    agent.close(clean=False)
    memagent.remove_stale_region(region)


def test_a_full_disk_does_not_cost_the_memory_state_and_an_avoided_checkpoint_does_not_hide_it(tmp_path, tmpfs):
    """The breakpoint's persist fails on a full disk (real ENOSPC): the verified slot is still the resume point
    at the next breakpoint (the disk has nothing), instead of an older disk checkpoint or a fresh start. And a
    newer disk checkpoint that the supervisor avoids (a crash loop) does not count as 'on disk'."""
    from ckpt_daemon.config import parse_config

    disk = tmpfs("4m")
    region = tmp_path / "region"
    cfg = parse_config(f"checkpoints: {{dir: {disk / 'ck'}, memory: {{enabled: true, dir: {region}}}}}\n",
                       tmp_path / "config.yaml")
    ck = cfg.checkpoint_dir
    ck.mkdir()
    log = _Log()
    agent = memagent.MemoryAgent(lambda: cfg, log)
    assert agent.start()
    m, opt, _ = make_state()
    mgr = CheckpointManager(ck, memory=region)
    mgr.save(7, model=m, optimizer=opt, memory=True)
    mgr.wait()
    mgr.close()
    with open(disk / "filler", "wb") as f:  # fill the disk
        try:
            while True:
                f.write(b"\0" * (1 << 16))
        except OSError:
            pass
    assert agent.breakpoint("crash 1").step == 7
    agent.drain()
    assert not (ck / "checkpoint-7").exists() and "could not persist" in "\n".join(log.lines)
    slot = agent.breakpoint("crash 2")
    assert slot is not None and slot.step == 7  # still resumed from, not dropped
    agent.drain()
    os.unlink(disk / "filler")
    assert agent.breakpoint("crash 3").step == 7
    agent.drain()
    assert cat.scan(ck, ["checkpoint-{step}"], verify=True).by_name("checkpoint-7").valid

    # a newer checkpoint on disk hides the memory state, unless the supervisor avoids it
    disk_mgr = CheckpointManager(ck, save_margin_bytes=0)
    disk_mgr.save(9, model=m, optimizer=opt, blocking=True)
    disk_mgr.close()
    mgr = CheckpointManager(ck, memory=region)
    mgr.save(8, model=m, optimizer=opt, memory=True)  # a memory state older than checkpoint-9
    mgr.wait()
    mgr.close()
    assert agent.breakpoint("newer on disk", avoid=set()) is None
    slot = agent.breakpoint("checkpoint-9 avoided", avoid={"checkpoint-9"})
    assert slot is not None and slot.step == 8
    agent.drain()
    assert (ck / "checkpoint-8").is_dir()
    agent.close(clean=False)
    memagent.remove_stale_region(region)


@pytest.mark.slow
def test_the_daemon_side_never_imports_torch():
    code = ("import sys; import ckpt_daemon.memory, daemon.core, daemon.supervisor; "
            "assert 'torch' not in sys.modules, 'torch was imported'; print('ok')")
    assert run_py(["-c", code], check=True).stdout.strip() == "ok"



def _errors(text: str) -> list[str]:
    out = []
    for line in text.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and rec.get("level") in ("error", "critical"):
            out.append(line)
    return out


@pytest.mark.slow
def test_a_healthy_every_step_memory_run_under_the_daemon_logs_no_error(tmp_path, daemons):
    """every_steps: 1 and a persist of every memory checkpoint: the daemon's persists and the trainer's saves
    race for the slots all the time. A slot the trainer rewrote before the daemon could pin it is not a failure
    (a newer one is there): no ERROR line, in the daemon's log or the trainer's, and the persists go on."""
    region = Path("/dev/shm") / f"ckpt-test-{os.getpid()}-{tmp_path.name}"
    ck = tmp_path / "checkpoints"
    d = Daemon(tmp_path, {
        "checkpoints": {"memory": {"enabled": True, "every_steps": 1, "persist_every": 1, "dir": str(region)}},
        "trainer": {"checkpoint_every_steps": 100000, "eval_every_steps": 100000},
    }).start()
    daemons.append(d)
    try:
        s = d.wait(lambda s: s["memory"]["persisted"] >= 40 and s, timeout=240,
                   what="40 persists of memory checkpoints")
        assert s["memory"]["warning"] is None and s["memory"]["newest"] is not None
        assert d.stop() == 0
        assert _errors(d.log()) == [], _errors(d.log())[:5]
        trainer_log = (tmp_path / "logs" / "trainer.log").read_text()
        assert " ERROR " not in trainer_log and "Traceback" not in trainer_log
        c = cat.scan(ck, ["checkpoint-{step}"], verify=True)
        assert len([e for e in c.entries if e.valid]) >= 2 and all(e.valid for e in c.entries)
    finally:
        memagent.remove_stale_region(region)


# ------------------------------------------------------------------- a kill at every phase of a persist
SAVER = r"""
import sys, torch
from ckpt_daemon.checkpoint import CheckpointManager
import ckpt_daemon.memsave as ms
torch.manual_seed(0)
m = torch.nn.Linear(64, 64)
mgr = CheckpointManager(sys.argv[1], memory=sys.argv[2])
orig = ms._u8
def held(t):  # this save is caught mid-copy: it says so, and the parent kills it here
    print("copying", flush=True)
    sys.stdin.readline()
    return orig(t)
for line in sys.stdin:
    cmd, step = line.split()
    step = int(step)
    if cmd == "hold":
        ms._u8 = held
    with torch.no_grad():
        m.weight.fill_(step)
    saved = mgr.save(step, model=m, memory=True)
    mgr.wait()
    print("committed" if saved else "skipped", step, flush=True)
"""


class _Saver:
    """A real trainer process that saves into memory when told, and answers with what happened."""

    def __init__(self, ck: Path, region: Path):
        import queue
        import threading

        self.p = subprocess.Popen([PY, "-c", SAVER, str(ck), str(region)], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, env=env_for_children(), text=True)
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [self.lines.put(x) for x in self.p.stdout], daemon=True).start()

    def __call__(self, cmd: str, step: int) -> list[str]:
        import queue

        self.p.stdin.write(f"{cmd} {step}\n")
        self.p.stdin.flush()
        try:
            return self.lines.get(timeout=120).split()
        except queue.Empty:
            raise AssertionError(f"the trainer did not answer {cmd} {step}") from None

    def kill(self) -> None:
        self.p.kill()
        self.p.wait()


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["read", "pinned", "copied", "committed", "released"])
def test_a_sigkill_at_every_phase_of_a_persist_loses_no_committed_memory_checkpoint(tmp_path, phase):
    """The daemon persists step 2 (slot B) and is stopped at `phase`; meanwhile the trainer commits step 3
    (slot A) and starts step 4, and is SIGKILLed right then. Step 4 may only go into B, and only when the
    daemon does not hold it: had it gone over A (the newest committed state) the restart would resume from
    step 2. Every phase: the breakpoint resumes from step 3, which reaches the disk whole, and no ERROR."""
    import threading

    from ckpt_daemon.config import parse_config

    region = tmp_path / "region"
    cfg = parse_config(f"checkpoints: {{dir: ck, memory: {{enabled: true, dir: {region}}}}}\n",
                       tmp_path / "config.yaml")
    ck = cfg.checkpoint_dir
    log = _Log()
    agent = memagent.MemoryAgent(lambda: cfg, log)
    assert agent.start()
    at, go = threading.Event(), threading.Event()

    def hook(name: str) -> None:
        if name == phase and not at.is_set():
            at.set()
            go.wait(120)

    agent.on_phase = hook
    saver = _Saver(ck, region)
    persist = threading.Thread(target=agent.persist_newest, args=("cadence",))
    try:
        assert saver("save", 1) == ["committed", "1"]
        assert saver("save", 2) == ["committed", "2"]
        persist.start()  # the newest, step 2
        assert at.wait(120), f"the persist never reached {phase}"
        assert saver("save", 3) == ["committed", "3"]  # into the other slot, which the daemon does not hold
        reply = saver("hold", 4)
        saver.kill()  # SIGKILL, mid-copy or just after the skip
    finally:
        go.set()
        persist.join(120)
        if saver.p.poll() is None:
            saver.kill()
    slot = agent.breakpoint("the trainer was killed")  # None: the disk has it already (the persist went on to it)
    agent.drain()
    c = cat.scan(ck, ["checkpoint-{step}"], verify=True)
    resume = slot.step if slot is not None else c.newest_valid().step
    assert resume == 3  # the last committed memory checkpoint: nothing lost beyond it
    assert c.by_name("checkpoint-3").valid and all(e.valid for e in c.entries)
    assert torch.equal(read_checkpoint(ck / "checkpoint-3")["model"]["weight"], torch.full((64, 64), 3.0))
    # while the daemon held step 2's slot, step 4 was skipped; otherwise it was being copied into that slot
    held = phase in ("pinned", "copied", "committed")
    assert reply == (["skipped", "4"] if held else ["copying"]), reply
    assert not [x for x in log.lines if x.startswith("error")], log.lines
    agent.close(clean=False)
    memagent.remove_stale_region(region)


# ------------------------------------------------------------------------ garbage in a slot's place
def _a_real_slot_file(tmp_path: Path, ck: Path) -> bytes:
    """The bytes of a committed slot a trainer of this folder would write (to forge another user's)."""
    m, opt, _ = make_state()
    mgr = CheckpointManager(ck, memory=tmp_path / "elsewhere")
    mgr.save(9, model=m, optimizer=opt, memory=True)
    mgr.wait()
    mgr.close()
    return mem.Region(tmp_path / "elsewhere").newest(ck)[0].path.read_bytes()


GARBAGE = {  # kind: what the daemon reports, what the trainer reports
    "fifo": ("is not a regular file (a FIFO)", "removed (it holds no data)"),
    "folder": ("is not a regular file (a folder)", "moved to rejected-slot-0-"),
    "symlink": ("is not a regular file (a symlink)", "removed (it holds no data)"),
    "socket": ("is not a regular file (a socket)", "removed (it holds no data)"),
    "other user": ("belongs to another user (uid 65534)", "moved to rejected-slot-0-"),
    "wrong size": ("unknown format version 0", None),  # a regular file of ours: reused, never allocated whole
}


@pytest.mark.parametrize("kind", sorted(GARBAGE))
def test_garbage_in_a_slots_place_is_reported_and_never_stops_the_trainer(tmp_path, tmpfs, monkeypatch, caplog, kind):
    """Each kind of entry the region's rules reject, in slot-0's place: the daemon's agent reports it and
    uses nothing of it; the real writer sets it aside (a FIFO, socket or symlink removed, a folder or
    another user's file renamed and kept) or reuses it (a file of ours of any size, allocated only as far
    as a slot needs), and saves into both slots; the daemon persists the trainer's newest state."""
    import socket

    from ckpt_daemon.config import parse_config

    if os.geteuid() != 0 and kind == "other user":
        pytest.skip("making a file of another user needs root")
    shm = tmpfs("64m")
    region = shm / "region"
    cfg = parse_config(f"checkpoints: {{dir: ck, memory: {{enabled: true, dir: {region}}}}}\n",
                       tmp_path / "config.yaml")
    ck = cfg.checkpoint_dir
    log = _Log()
    agent = memagent.MemoryAgent(lambda: cfg, log)
    assert agent.start()
    outside = tmp_path / "outside.txt"
    outside.write_text("not the region's")
    p = region / "slot-0"
    if kind == "fifo":
        os.mkfifo(p)
    elif kind == "folder":
        p.mkdir()
        (p / "notes.txt").write_text("a person's notes")
    elif kind == "symlink":
        p.symlink_to(outside)
    elif kind == "socket":
        monkeypatch.chdir(region)  # a socket's path is short: bind the relative name
        s = socket.socket(socket.AF_UNIX)
        s.bind("slot-0")
        s.close()
        monkeypatch.undo()
    elif kind == "other user":
        p.write_bytes(_a_real_slot_file(tmp_path, ck))  # a valid-looking state of step 9: forged by another user
        os.chown(p, 65534, 65534)
    else:
        with open(p, "wb") as f:  # 1 TiB (sparse) on a 64 MiB tmpfs
            f.write(mem.MAGIC + b"\0" * 64)
            f.truncate(1 << 40)
    daemon_says, trainer_says = GARBAGE[kind]
    # the daemon's side: nothing used, nothing raised (and reported: checked below)
    assert agent.persist_newest("cadence") is None and agent.breakpoint("a crash") is None
    assert not ck.exists() or not list(ck.glob("checkpoint-*"))
    daemon_lines = "\n".join(log.lines)
    # the trainer's side: the real writer, as a restarted trainer's first saves
    m, opt, sched = make_state()
    with caplog.at_level("INFO", logger="ckpt_daemon.memsave"):
        mgr = CheckpointManager(ck, memory=region)
        for step in (1, 2):
            train_steps(m, opt, sched, 1, seed=step)
            assert mgr.save(step, model=m, optimizer=opt, scheduler=sched, memory=True) == ck / f"checkpoint-{step}"
            mgr.wait()
        mgr.close()
    assert [s.step for s in mem.Region(region).slots()[0]] == [2, 1]
    if trainer_says:
        assert f"memory slot {p}" in caplog.text and trainer_says in caplog.text, caplog.text
    rejected = list(region.glob("rejected-slot-0-*"))
    if kind == "folder":
        assert (rejected[0] / "notes.txt").read_text() == "a person's notes"  # kept for a person to look at
    elif kind == "other user":
        assert rejected[0].stat().st_uid == 65534 and not (ck / "checkpoint-9").exists()
    else:
        assert rejected == []
    assert outside.read_text() == "not the region's"  # a symlink is never followed
    if kind == "wrong size":
        assert os.stat(p).st_blocks * 512 < 32 << 20  # only what a slot needs was allocated
    r = agent.persist_newest("cadence")
    assert r is not None and r.path == ck / "checkpoint-2"
    assert not [x for x in log.lines if x.startswith("error")], log.lines
    assert daemon_says in daemon_lines, daemon_lines  # the daemon reported it with its reason
    agent.close(clean=False)
    memagent.remove_stale_region(region)


@pytest.mark.slow
def test_a_restarted_built_in_trainer_under_the_daemon_goes_on_past_garbage_in_the_slots(tmp_path, daemons):
    """A folder in slot-0's place and a FIFO in slot-1's before the daemon starts: the built-in trainer's
    first memory save sets both aside and trains on (no crash, no restart), and the daemon persists."""
    region = Path("/dev/shm") / f"ckpt-test-{os.getpid()}-{tmp_path.name}"
    mem.private_dir(region)
    (region / "slot-0").mkdir()
    (region / "slot-0" / "x").write_text("left here")
    os.mkfifo(region / "slot-1")
    ck = tmp_path / "checkpoints"
    d = Daemon(tmp_path, {
        "checkpoints": {"memory": {"enabled": True, "every_steps": 1, "persist_every": 5, "dir": str(region)}},
        "trainer": {"checkpoint_every_steps": 100000, "eval_every_steps": 100000},
    }).start()
    daemons.append(d)
    try:
        s = d.wait(lambda s: s["memory"]["persisted"] >= 2 and s, timeout=180, what="memory checkpoints persisted")
        assert s["training"]["last_crash"] is None and s["training"]["restarts"] == 0
        assert "memory slot ignored" in d.log()  # reported by the daemon (if it looked before the trainer)...
        trainer_log = (tmp_path / "logs" / "trainer.log").read_text()
        assert "slot-0 is not a regular file (a folder); moved to rejected-slot-0-" in trainer_log  # ... and the trainer
        assert "slot-1 is not a regular file (a FIFO); removed" in trainer_log
        assert d.stop() == 0
        assert _errors(d.log()) == []
        assert cat.scan(ck, ["checkpoint-{step}"], verify=True).newest_valid() is not None
    finally:
        memagent.remove_stale_region(region)


# ---------------------------------------------------------------------------------------------- config
def test_the_docs_memory_snippet_is_a_valid_config_and_best_to_disk_is_checked(tmp_path):
    from ckpt_daemon.config import parse_config
    from ckpt_daemon.errors import ConfigError
    from tests.snippets import doc_block

    cfg = parse_config(doc_block("docs/memory.md", "persist_every: 10"), tmp_path / "config.yaml")
    mc = cfg.checkpoints.memory
    assert mc.enabled and mc.best_to_disk == "every" and mc.best_to_disk_interval_s is None
    ok = parse_config("checkpoints: {memory: {best_to_disk: interval, best_to_disk_interval_s: 1800}}\n",
                      tmp_path / "config.yaml").checkpoints.memory
    assert (ok.best_to_disk, ok.best_to_disk_interval_s) == ("interval", 1800)
    for bad, says in [("{best_to_disk: interval}", "best_to_disk_interval_s is not set"),
                      ("{best_to_disk: at_end, best_to_disk_interval_s: 60}", "set best_to_disk: interval to use it"),
                      ("{best_to_disk: sometimes}", "'every', 'interval' or 'at_end'"),
                      ("{best_to_disk: interval, best_to_disk_interval_s: -1}", "best_to_disk_interval_s")]:
        with pytest.raises(ConfigError, match="checkpoints.memory") as ei:
            parse_config(f"checkpoints: {{memory: {bad}}}\n", tmp_path / "config.yaml")
        assert says in str(ei.value), str(ei.value)
