"""One commit primitive (store/commit.py), one lock class (store/locks.py), one deletion module
(store/delete.py): every writer commits under the commit lock, leaves nothing behind when it fails or is
killed, and an older entry it replaces goes to quarantine with its reason."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from ckpt_daemon import memory, runtime
from ckpt_daemon.errors import UnsafePathError
from ckpt_daemon.integrations import common
from ckpt_daemon.store import commit as store_commit
from ckpt_daemon.store import delete as store_delete
from ckpt_daemon.store import foreign, locks
from daemon import memagent
from tests.helpers import REPO, env_for_children, wait_for

HOLD_COMMIT_LOCK = textwrap.dedent("""
    import sys
    from ckpt_daemon import runtime
    with runtime.commit_lock(sys.argv[1]):
        print("held", flush=True)
        sys.stdin.readline()
""")


def hold_commit_lock(root: Path) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", HOLD_COMMIT_LOCK, str(root)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True, env=env_for_children(), cwd=REPO)
    assert p.stdout.readline().strip() == "held"
    return p


def test_commit_to_disk_waits_for_the_commit_lock_and_never_renames_while_it_is_held(tmp_path, monkeypatch):
    """A trainer's save (the HF and Lightning callbacks' commit_to_disk) is renamed into place only under
    the commit lock: a cleanup that holds it (re-planning, moving its victims) never sees it appear."""
    root = tmp_path / "ck"
    root.mkdir()
    dest = root / "checkpoint-5"
    waiting = threading.Event()
    real_pause = locks._pause

    def pause():
        waiting.set()
        real_pause()

    monkeypatch.setattr(locks, "_pause", pause)
    holder = hold_commit_lock(root)
    result = []
    try:
        t = threading.Thread(target=lambda: result.append(common.commit_to_disk(
            dest, lambda p: (p.mkdir(exist_ok=True), (p / "model.safetensors").write_bytes(b"w" * 64)))))
        t.start()
        wait_for(lambda: waiting.is_set() or not t.is_alive(), 30, "the save to wait for the commit lock")
        assert t.is_alive() and waiting.is_set(), "commit_to_disk did not wait for the commit lock"
        assert not os.path.lexists(dest)  # built in scratch space, not renamed while the lock is held
        assert store_commit.live_scratch(root)  # the save in progress is visible as such
    finally:
        holder.stdin.close()
        holder.wait(30)
    t.join(30)
    assert result == [True] and (dest / "model.safetensors").read_bytes() == b"w" * 64
    assert store_commit.live_scratch(root) == [] and os.listdir(root / ".ckpt-daemon" / "tmp") == []


def test_commit_to_disk_puts_an_older_entry_of_that_name_in_quarantine(tmp_path):
    root = tmp_path / "ck"
    (root / "checkpoint-5").mkdir(parents=True)
    (root / "checkpoint-5" / "old.bin").write_bytes(b"old")
    assert common.commit_to_disk(root / "checkpoint-5", lambda p: (p / "new.bin").write_bytes(b"new"))
    assert os.listdir(root / "checkpoint-5") == ["new.bin"]
    (q,) = store_delete.quarantined(root)
    assert q["name"] == "checkpoint-5" and "replaced by the trainer's new save" in q["reason"]
    assert (Path(q["path"]) / "old.bin").read_bytes() == b"old"
    # a single file, over a symlink: the link goes (never followed), its target is untouched
    target = tmp_path / "elsewhere.pt"
    target.write_bytes(b"keep")
    os.symlink(target, root / "last.ckpt")
    assert common.commit_to_disk(root / "last.ckpt", lambda p: p.write_bytes(b"file"), single_file=True)
    assert not os.path.islink(root / "last.ckpt") and (root / "last.ckpt").read_bytes() == b"file"
    assert target.read_bytes() == b"keep"


def test_a_failed_build_or_commit_leaves_nothing_behind(tmp_path, monkeypatch):
    root = tmp_path / "ck"
    root.mkdir()

    def fail(p):
        p.mkdir(exist_ok=True)
        (p / "half").write_bytes(b"x")
        raise RuntimeError("the trainer's writer failed")

    with pytest.raises(RuntimeError):
        common.commit_to_disk(root / "checkpoint-1", fail)
    real_rename = os.rename

    def rename(a, b):
        if Path(b).name == "checkpoint-2":
            raise OSError(5, "I/O error")
        return real_rename(a, b)

    monkeypatch.setattr(os, "rename", rename)
    with store_commit.Scratch(root, "checkpoint-2") as s:
        (s.path / "f").write_bytes(b"x")
        with pytest.raises(OSError):
            s.commit(root / "checkpoint-2", sidecar={"layout": "folder", "step": 2, "files": {}})
        assert foreign.read_sidecar(root, "checkpoint-2") is None  # written before the rename, forgotten after it failed
    assert sorted(os.listdir(root)) == [".ckpt-daemon"]
    assert os.listdir(root / ".ckpt-daemon" / "tmp") == []
    with store_commit.Scratch(root, "taken") as s:
        (root / "taken").mkdir()
        with pytest.raises(FileExistsError):
            s.commit(root / "taken")  # never over an existing name, unless asked to replace it
    assert os.listdir(root / ".ckpt-daemon" / "tmp") == [] and os.listdir(root / "taken") == []


KILLED_EXPORT = textwrap.dedent("""
    import os, signal, sys
    import torch
    from ckpt_daemon import checkpoint
    def die(*a, **kw):
        os.kill(os.getpid(), signal.SIGKILL)
    checkpoint.split_tied = die
    checkpoint.write_weights({"w": torch.ones(4)}, sys.argv[1], {})
""")


def test_a_weights_export_killed_half_way_leaves_only_scratch_that_the_next_job_removes(tmp_path):
    """write_weights built its folder in a `.tmp-` sibling that nothing removed after a kill; it builds in
    the scratch space now, whose dead entries every job removes."""
    out = tmp_path / "exports"
    out.mkdir()
    r = subprocess.run([sys.executable, "-c", KILLED_EXPORT, str(out / "w")], env=env_for_children(), cwd=REPO,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == -9, r.stderr
    assert sorted(os.listdir(out)) == [".ckpt-daemon"]  # no .tmp-w-<pid> beside the exports
    assert len(store_delete.clean_scratch(out)) == 1 and os.listdir(out / ".ckpt-daemon" / "tmp") == []


def test_every_lock_is_the_one_lock_class(tmp_path):
    assert issubclass(runtime.TrainerLock, locks.FileLock) and issubclass(runtime.DaemonLock, locks.FileLock)
    assert issubclass(memagent.RegionLock, locks.FileLock)
    region = tmp_path / "region"
    a, b = memagent.RegionLock(region), memagent.RegionLock(region)
    assert a.acquire() and not b.acquire()
    assert b.holder_pid() == os.getpid()  # "pid boot-id" in the file
    assert oct(os.stat(region / memory.LOCK).st_mode & 0o777) == "0o600"
    a.release()
    assert b.acquire()
    b.release()
    os.unlink(region / memory.LOCK)
    os.mkfifo(region / memory.LOCK)
    with pytest.raises(memory.MemoryCheckpointError, match="not a regular file"):
        memagent.RegionLock(region).acquire()
    root = tmp_path / "ck"
    os.makedirs(root / ".ckpt-daemon")
    os.mkfifo(root / ".ckpt-daemon" / "commit.lock")
    with pytest.raises(UnsafePathError, match="not a regular file"):
        with runtime.commit_lock(root):
            pass


def test_the_commit_lock_times_out_with_its_message(tmp_path):
    root = tmp_path / "ck"
    root.mkdir()
    holder = hold_commit_lock(root)
    try:
        with pytest.raises(Exception, match="waiting for the commit lock"):
            with runtime.commit_lock(root, timeout_s=0.1):
                pass
    finally:
        holder.stdin.close()
        holder.wait(30)


RENAMES = {"rename", "replace"}
COMMIT_LOCK_USERS = {  # modules that hold the commit lock for something other than a rename into place
    "maintenance/cleanup.py": "re-plans and deletes under it (its moves to the trash are store/delete.py's)",
    "maintenance/snapshot.py": "chooses and hard-links what a snapshot holds under it",
}


def test_only_the_store_renames_under_the_commit_lock():
    """grep, as a test: a module that takes the commit lock and renames is store/commit.py or
    store/delete.py; every other writer commits through them."""
    offenders = []
    for pkg in ("ckpt_daemon", "maintenance", "daemon", "trainer"):
        for p in sorted((REPO / pkg).rglob("*.py")):
            rel = p.relative_to(REPO).as_posix()
            if rel in ("ckpt_daemon/store/commit.py", "ckpt_daemon/store/delete.py", "ckpt_daemon/runtime.py"):
                continue
            tree = ast.parse(p.read_text())
            calls = {(n.func.attr if isinstance(n.func, ast.Attribute) else getattr(n.func, "id", ""))
                     for n in ast.walk(tree) if isinstance(n, ast.Call)}
            if "commit_lock" in calls and (calls & RENAMES):
                offenders.append(rel)
            if "commit_lock" in calls and rel not in COMMIT_LOCK_USERS:
                offenders.append(f"{rel} takes the commit lock itself")
    assert offenders == []
