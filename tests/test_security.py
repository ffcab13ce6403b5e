"""Security edges: symlinks out of the managed folders, crafted pickles, file permissions, dangerous
folder configurations."""

from __future__ import annotations

import json
import os
import pickle
import stat
import subprocess
import time
from pathlib import Path

import pytest
import torch

from ckpt_daemon.config import ConfigError, load_config
from ckpt_daemon.store import catalog as cat
from tests.helpers import PY, env_for_children, native, run_py, write_config, write_manifest


class _Evil:
    def __init__(self, mark: str):
        self.mark = mark

    def __reduce__(self):
        return (os.system, (f"touch {self.mark}",))


@pytest.fixture
def outside(tmp_path):
    d = tmp_path / "outside"
    d.mkdir()
    (d / "precious.bin").write_bytes(b"p" * 4096)
    return d


@pytest.mark.slow
def test_snapshot_and_restore_never_follow_symlinks(tmp_path, outside):
    cfg_path = write_config(tmp_path / "proj", tiny=False)
    root = tmp_path / "proj" / "checkpoints"
    native(root, [10, 20])
    os.symlink(outside / "precious.bin", root / "checkpoint-20" / "sneaky.bin")
    os.symlink(outside, root / "checkpoint-20" / "sneakydir")
    r = run_py(["-m", "maintenance.snapshot", "--config", str(cfg_path)], check=True)
    snap = next(p for p in (tmp_path / "proj" / "snapshots").iterdir() if not p.name.startswith("."))
    assert not (snap / "checkpoint-20" / "sneaky.bin").exists() and not (snap / "checkpoint-20" / "sneakydir").exists()
    man = json.loads((snap / "snapshot.json").read_text())
    assert any("skipped symlink" in n for c in man["checkpoints"] for n in c["notes"])
    # a snapshot whose checkpoint is itself a symlink to the outside is not restored through it
    import shutil

    shutil.rmtree(root)
    (snap / "checkpoint-20").rename(tmp_path / "moved")
    os.symlink(outside, snap / "checkpoint-20")
    r = run_py(["-m", "maintenance.restore", snap.name, "--config", str(cfg_path)], check=True)
    assert "skipped checkpoint-20" in r.stdout and "symlink" in r.stdout
    assert not (root / "checkpoint-20").exists()
    assert (outside / "precious.bin").read_bytes() == b"p" * 4096 and sorted(p.name for p in outside.iterdir()) == ["precious.bin"]


@pytest.mark.slow
def test_consolidate_never_reads_through_a_symlinked_weights_file(tmp_path, outside):
    cfg_path = write_config(tmp_path / "proj")
    run_py(["-m", "trainer", "--config", str(cfg_path), "--max-steps", "10"], check=True)
    ck = tmp_path / "proj" / "checkpoints" / "checkpoint-10"
    (ck / "model.safetensors").rename(outside / "model.safetensors")
    os.symlink(outside / "model.safetensors", ck / "model.safetensors")
    e = cat.scan(tmp_path / "proj" / "checkpoints", ["checkpoint-{step}"]).by_name("checkpoint-10")
    assert e.status == "corrupt" and "not a regular file" in e.reason
    r = run_py(["-m", "maintenance.consolidate", "--config", str(cfg_path), "--from", "10"])
    assert r.returncode != 0 and "no valid native checkpoint at step 10" in r.stderr.lower()
    assert not list((tmp_path / "proj" / "consolidated_models").glob("*step10*"))


@pytest.mark.slow
def test_crafted_pickles_do_not_run_on_list_verify_consolidate_or_resume(tmp_path):
    mark = tmp_path / "PWNED"
    cfg_path = write_config(tmp_path / "proj",
                            {"checkpoints": {"pattern": ["checkpoint-{step}", "model_step_{step}.pt"]}})
    run_py(["-m", "trainer", "--config", str(cfg_path), "--max-steps", "10"], check=True)
    root = tmp_path / "proj" / "checkpoints"
    torch.save({"model_state_dict": {}, "evil": _Evil(str(mark))}, root / "model_step_99.pt")
    # and a native checkpoint whose state.json was replaced by a pickle with a matching manifest
    d = root / "checkpoint-10"
    payload = pickle.dumps(_Evil(str(mark)))
    (d / "state.json").write_bytes(payload)
    import hashlib

    man = json.loads((d / "manifest.json").read_text())
    man["files"]["state.json"] = {"size": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}
    write_manifest(d, man)
    r = run_py(["-m", "daemon", "list", "--config", str(cfg_path), "--verify"])
    assert r.returncode in (0, 1) and "Traceback" not in r.stderr, r.stderr  # 1: it found them not usable
    run_py(["-m", "maintenance.cleanup", "--config", str(cfg_path), "--dry-run"], check=True)
    run_py(["-m", "maintenance.consolidate", "--config", str(cfg_path), "--from", "10"])
    run_py(["-m", "trainer", "--config", str(cfg_path), "--max-steps", "12", "--resume", str(d)])
    assert not mark.exists(), "a pickle inside a checkpoint was executed"


@pytest.mark.slow
def test_files_the_daemon_creates_are_not_world_writable(tmp_path):
    cfg_path = write_config(tmp_path, {"trainer": {"checkpoint_every_steps": 5},
                                       "training": {"stop_timeout_s": 30}})
    # even when started with a careless umask
    p = subprocess.Popen([PY, "-m", "daemon", "run", "--config", str(cfg_path), "--quiet-trainer"],
                         env=env_for_children(),
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=lambda: os.umask(0))
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(list((tmp_path / "checkpoints").glob("checkpoint-*"))) < 2:
            time.sleep(0.2)
        from maintenance.snapshot import take_snapshot

        os.umask(0o022)
        take_snapshot(load_config(cfg_path))
        while time.monotonic() < deadline and not (tmp_path / "logs" / "daemon-state.json").exists():
            time.sleep(0.1)  # every kind of file the daemon writes exists before we look at their modes
    finally:
        p.terminate()
        assert p.wait(timeout=60) == 0
    checked = 0
    for base in (tmp_path / "logs", tmp_path / "checkpoints", tmp_path / "snapshots"):
        for dirpath, dirs, files in os.walk(base):
            for name in dirs + files:
                path = Path(dirpath) / name
                mode = os.lstat(path).st_mode
                if stat.S_ISLNK(mode):
                    continue
                assert not mode & stat.S_IWOTH, f"{path} is world-writable ({oct(mode)})"
                checked += 1
    assert checked > 10
    for f in ("daemon.log", "daemon-state.json", "jobs-state.json", "trainer.log", "metrics.jsonl"):
        assert (tmp_path / "logs" / f).exists(), f


@pytest.mark.parametrize("yaml_text,needle", [
    ("snapshots:\n  dir: checkpoints/snapshots\n", "snapshots.dir"),
    ("snapshots:\n  dir: /\n", "snapshots.dir"),
    ("consolidation:\n  dir: checkpoints\n", "consolidation.dir"),
    ("checkpoints:\n  dir: snapshots/inner\n", "overlaps checkpoints.dir"),
    ("checkpoints:\n  dir: /\n", "filesystem root"),
])
def test_dangerous_folder_overlaps_are_refused(tmp_path, yaml_text, needle):
    (tmp_path / "config.yaml").write_text(yaml_text)
    with pytest.raises(ConfigError) as ei:
        load_config(tmp_path / "config.yaml")
    msg = str(ei.value)
    assert needle in msg
    assert ("give them separate folders" in msg) or ("filesystem root" in msg)


# Escape sequences a hostile name, metric name, pin reason or trainer output could carry: set the window
# title (OSC), clear the screen (CSI, also as the one-byte C1 CSI), overwrite a line (CR), forge a line (LF),
# reverse the text that follows (a bidi override).
HOSTILE = "\x1b]0;pwned\x07\x1b[2J\x9b2J\rX\nFAKE\u202e"
RAW = ("\x1b", "\x07", "\x9b", "\r", "\u202e")


def _hostile_folder(tmp_path: Path) -> tuple[Path, Path]:
    from tests.helpers import fake_native

    cfg_path = write_config(tmp_path, {"retention": {"tiers": [{"count": 1}]}}, tiny=False)
    root = tmp_path / "checkpoints"
    for s in (10, 20, 30):
        d = fake_native(root, s)
        m = json.loads((d / "manifest.json").read_text())
        m.update(metrics={f"loss{HOSTILE}": 1.5}, pin=f"paper{HOSTILE}" if s == 20 else None)
        (d / "manifest.json").write_text(json.dumps(m))
    (root / f"notes{HOSTILE}.txt").write_text("someone's file in the folder")
    return cfg_path, root


@pytest.mark.slow
def test_text_from_the_folder_never_reaches_the_terminal_raw(tmp_path):
    """list, cleanup --dry-run (and its log), pin and status print names, metric names, pin reasons and
    the trainer's output escaped: nothing of it can act on the terminal. JSON stays exact JSON."""
    from ckpt_daemon import runtime

    cfg_path, root = _hostile_folder(tmp_path)
    runtime.pin(root, "checkpoint-30", "first")  # pinned again below: the message shows both reasons
    outs = {}
    for what, args in (("list", ["-m", "daemon", "list"]), ("cleanup", ["-m", "maintenance.cleanup", "--dry-run"]),
                       ("pin", ["-m", "daemon", "pin", "30", "--reason", f"why{HOSTILE}"])):
        r = run_py([*args, "--config", str(cfg_path)], env={**env_for_children(), "COLUMNS": "400"})
        assert r.returncode == 0, r.stderr
        outs[what] = r.stdout + r.stderr
    # status, from a state file whose names and crash output are hostile
    (tmp_path / "logs").mkdir(exist_ok=True)
    state = {"training": {"state": "backoff", "resumed_from": f"checkpoint-30{HOSTILE}",
                          "last_crash": {"description": "error", "ran_s": 3, "time": time.time(),
                                         "tail": [f"Traceback{HOSTILE}"]}},
             "checkpoints": {"latest": {"name": f"checkpoint-30{HOSTILE}", "step": 30, "metrics": {f"m{HOSTILE}": 1}},
                             "failed_verification": {f"checkpoint-9{HOSTILE}": f"bad{HOSTILE}"}}}
    (tmp_path / "logs" / "daemon-state.json").write_text(json.dumps(state))
    r = run_py(["-m", "daemon", "status", "--config", str(cfg_path)])
    outs["status"] = r.stdout + r.stderr
    outs["cleanup.log"] = (tmp_path / "logs" / "cleanup.log").read_text()
    # an error message that quotes a name given or found (every command's errors go through one printer)
    r = run_py(["-m", "trainer.generate", "--checkpoint", str(tmp_path / f"gone{HOSTILE}")])
    assert r.returncode != 0 and "Traceback" not in r.stderr
    outs["error"] = r.stdout + r.stderr
    for what, text in outs.items():
        assert not any(c in text for c in RAW), (what, text)
        assert not any(line.lstrip("│ ").startswith("FAKE") for line in text.splitlines()), what  # no forged line
    assert "loss\\x1b]0;pwned\\x07" in outs["list"] and "paper\\x1b" in outs["list"]  # shown, as escapes
    assert "notes\\x1b" in outs["list"] and "notes\\x1b" in outs["cleanup"] and "paper\\x1b" in outs["cleanup"]
    assert "gone\\x1b" in outs["error"] and "does not exist" in outs["error"]
    assert "why\\x1b" in outs["pin"] and "Traceback\\x1b" in outs["status"] and "checkpoint-30\\x1b" in outs["status"]
    # JSON is exact: the same strings, escaped by JSON itself
    listed = json.loads(run_py(["-m", "daemon", "list", "--json", "--config", str(cfg_path)], check=True).stdout)
    assert listed["checkpoints"][0]["metrics"] == {f"loss{HOSTILE}": 1.5}
    assert {"name": f"notes{HOSTILE}.txt"}.items() <= next(i for i in listed["ignored"] if "notes" in i["name"]).items()
    plan = json.loads(run_py(["-m", "maintenance.cleanup", "--dry-run", "--json", "--config", str(cfg_path)],
                             check=True).stdout)
    assert any(f"pinned (paper{HOSTILE})" in r for d in plan["decisions"] for r in d["reasons"])


@pytest.mark.slow
def test_inert_shows_every_character_and_runs_none():
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from ckpt_daemon.termtext import inert

    @settings(max_examples=2000, deadline=None)
    @given(st.text())
    def check(s):
        out = inert(s)
        assert out.isprintable() or all(c.isprintable() or c == " " or unicodedata.category(c) in ("Zs", "Cn")
                                        for c in out)
        assert inert(out) == out  # printing it twice changes nothing more
        if s.isascii() and s.isprintable():
            assert out == s  # ordinary text is left alone

    import unicodedata

    check()
    assert inert("a\x1bb\u202ec\U000e0001") == "a\\x1bb\\u202ec\\U000e0001"


def test_generate_follows_the_folders_own_best_pointer_and_no_other_link(tmp_path, outside):
    """`generate --checkpoint checkpoints/best` (the README's example) reads the checkpoint `best` names
    beside it; a link that leads out of the folder is refused with its reason."""
    from ckpt_daemon.checkpoint import load_weights
    from ckpt_daemon.errors import CheckpointError
    from tests.helpers import native

    root = tmp_path / "checkpoints"
    native(root, [10, 20])
    if os.path.lexists(root / "best"):
        os.unlink(root / "best")
    (root / "best").symlink_to("checkpoint-10")
    tensors, meta = load_weights(root / "best")
    assert meta["step"] == 10 and tensors
    native(outside / "elsewhere", [30])
    (root / "far").symlink_to(outside / "elsewhere" / "checkpoint-30")
    with pytest.raises(CheckpointError, match="symbolic link"):
        load_weights(root / "far")
