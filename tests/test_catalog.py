"""The one catalog: native, Hugging Face and single-file layouts; truncated and flipped files; temp
folders; symlinks pointing outside; bytes freed with hard links."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch

from ckpt_daemon.store import catalog as cat
from tests.helpers import PATTERNS, hf_folder, native, run_py, single_file, write_config


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
    assert got == {("rolling_step_000100.pt", 100, "file", "complete"),
                   ("epoch=3-step=1200.ckpt", 1200, "file", "complete"),
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


@pytest.mark.slow
def test_list_cli_json_and_table(tmp_path):
    cfg = write_config(tmp_path, tiny=False)
    native(tmp_path / "checkpoints", [10, 20])
    r = run_py(["-m", "daemon", "list", "--config", str(cfg), "--json", "--verify"], check=True)
    data = json.loads(r.stdout)
    assert [c["name"] for c in data["checkpoints"]] == ["checkpoint-10", "checkpoint-20"]
    assert all(c["status"] == "complete" and c["verified"] for c in data["checkpoints"])
    r = run_py(["-m", "daemon", "list", "--config", str(cfg)], check=True)
    assert "checkpoint-20" in r.stdout and "latest" in r.stdout


# ------------------------------------------------------------------------------ on-disk check cache
def synthetic_native(root: Path, step: int) -> Path:
    """A small native checkpoint (a manifest and one safetensors file), without torch's save path."""
    from ckpt_daemon.fsutil import digest_record, new_hasher
    from ckpt_daemon.store.manifest import build_manifest
    from ckpt_daemon.store.safetensors_file import header_for

    st = header_for({"w": torch.zeros(4)}) + bytes(16)
    h = new_hasher("blake3")
    h.update(st)
    d = root / f"checkpoint-{step}"
    d.mkdir(parents=True)
    (d / "model.safetensors").write_bytes(st)
    rec = {"size": len(st), **digest_record("blake3", h.hexdigest())}
    (d / "manifest.json").write_text(json.dumps(build_manifest(step, {"model.safetensors": rec}, epoch=step // 100,
                                                               metrics={"val_loss": 1.0 / step})))
    return d


def fresh_process(monkeypatch) -> None:
    """What a new process would see: no in-memory results, the on-disk file not read yet."""
    cat._CACHE.clear()
    monkeypatch.setattr(cat, "_disk_loaded", set())


def count_checks(monkeypatch) -> list:
    seen = []
    real = cat.check_entry

    def spy(path, *a, **k):
        seen.append(Path(path).name)
        return real(path, *a, **k)

    monkeypatch.setattr(cat, "check_entry", spy)
    return seen


def test_disk_cache_rechecks_every_changed_checkpoint(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    dirs = [synthetic_native(root, s) for s in range(100, 900, 100)]
    (root / cat.STATE_DIR).mkdir()
    monkeypatch.setattr(cat, "DISK_CACHE_MIN_MISSES", 1)
    fresh_process(monkeypatch)
    first = cat.scan(root, PATTERNS)
    assert all(e.valid for e in first.entries) and (root / cat.STATE_DIR / cat.DISK_CACHE).is_file()

    # Damage three of them behind the catalog's back, each time putting the old mtime back:
    # a manifest whose recorded size changed (same length), a truncated file, a replaced file.
    man = dirs[1] / "manifest.json"
    st = os.stat(man)
    text = man.read_text()
    size = json.loads(text)["files"]["model.safetensors"]["size"]
    man.write_text(text.replace(f'"size": {size}', f'"size": {size + 1}'))
    os.utime(man, ns=(st.st_atime_ns, st.st_mtime_ns))
    model = dirs[3] / "model.safetensors"
    st = os.stat(model)
    with open(model, "r+b") as f:
        f.truncate(st.st_size - 4)
    os.utime(model, ns=(st.st_atime_ns, st.st_mtime_ns))
    model = dirs[5] / "model.safetensors"
    st = os.stat(model)
    tmp = dirs[5] / "new"
    tmp.write_bytes(b"\0" * st.st_size)
    os.replace(tmp, model)
    os.utime(model, ns=(st.st_atime_ns, st.st_mtime_ns))

    fresh_process(monkeypatch)
    checked = count_checks(monkeypatch)
    again = cat.scan(root, PATTERNS)
    status = {e.name: (e.status, e.reason) for e in again.entries}
    assert status[dirs[1].name][0] == "corrupt" and "the manifest says" in status[dirs[1].name][1]
    assert status[dirs[3].name][0] == "corrupt"
    assert status[dirs[5].name][0] == "complete"  # same size, no verify: complete, but it was checked again
    assert sorted(checked) == sorted(d.name for d in (dirs[1], dirs[3], dirs[5]))  # the rest came from the file
    # The unchanged ones say the same as a check from scratch.
    fresh_process(monkeypatch)
    monkeypatch.setattr(cat, "_disk_loaded", {str(root)})  # no file this time
    scratch = cat.scan(root, PATTERNS)
    assert [e.to_json() for e in scratch.entries] == [e.to_json() for e in again.entries]


def test_disk_cache_is_untrusted_input(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    dirs = [synthetic_native(root, s) for s in (100, 200, 300)]
    (root / cat.STATE_DIR).mkdir()
    monkeypatch.setattr(cat, "DISK_CACHE_MIN_MISSES", 1)
    fresh_process(monkeypatch)
    cat.scan(root, PATTERNS)
    path = root / cat.STATE_DIR / cat.DISK_CACHE
    good = json.loads(path.read_text())
    monkeypatch.setattr(cat, "DISK_CACHE_MIN_MISSES", 10**9)  # the scans below leave the file as it is
    (dirs[0] / "model.safetensors").write_bytes(b"x")  # now corrupt; a forged record says complete
    st = os.lstat(dirs[0])
    files = sorted([n, s.st_ino, s.st_size, s.st_mtime_ns, s.st_ctime_ns]
                   for n, s in ((n, os.lstat(dirs[0] / n)) for n in os.listdir(dirs[0])))
    forged = [dirs[0].name, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, files, 100,
              "complete", "", {}]
    bad_records = [None, [], ["x"] * 11, [dirs[1].name, "1", 2, 3, 4, 5, [], 200, "complete", "", {}],
                   [dirs[1].name, 1, 2, 3, 4, 5, [["a", 1, 2, 3]], 200, "complete", "", {}],
                   [dirs[1].name, 1, 2, 3, 4, 5, [], 200, "fine", "", {}],
                   [dirs[1].name, 1, 2, 3, 4, 5, [], 200, "complete", "", {"files": {}}],
                   ["../" + dirs[1].name, 1, 2, 3, 4, 5, [], 200, "complete", "", {}]]
    variants = {
        "not json": b"{not json",
        "nested": b"[" * 100_000,
        "wrong checks": json.dumps({**good, "checks": "0" * 64, "entries": [forged]}).encode(),
        "wrong root": json.dumps({**good, "root": "/elsewhere", "entries": [forged]}).encode(),
        "bad records": json.dumps({**good, "entries": bad_records}).encode(),
        "entries not a list": json.dumps({**good, "entries": {"a": 1}}).encode(),
    }
    for what, data in variants.items():
        path.write_bytes(data)
        fresh_process(monkeypatch)
        c = cat.scan(root, PATTERNS)
        assert c.by_name(dirs[0].name).status == "corrupt", what
        assert c.by_name(dirs[1].name).valid and c.by_name(dirs[2].name).valid, what
    # A well-formed forged record is ignored when others could have written the file, or through a link.
    path.write_bytes(json.dumps({**good, "entries": [forged]}).encode())
    os.chmod(path, 0o666)
    fresh_process(monkeypatch)
    assert cat.scan(root, PATTERNS).by_name(dirs[0].name).status == "corrupt"
    elsewhere = tmp_path / "forged.json"
    os.replace(path, elsewhere)
    os.chmod(elsewhere, 0o600)
    os.symlink(elsewhere, path)
    fresh_process(monkeypatch)
    assert cat.scan(root, PATTERNS).by_name(dirs[0].name).status == "corrupt"
    # The control: the same forged file, ours and not a link, is believed (so the checks above are real).
    os.unlink(path)
    os.replace(elsewhere, path)
    fresh_process(monkeypatch)
    assert cat.scan(root, PATTERNS).by_name(dirs[0].name).status == "complete"


def test_disk_cache_only_where_the_state_folder_exists(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    synthetic_native(root, 100)
    monkeypatch.setattr(cat, "DISK_CACHE_MIN_MISSES", 1)
    fresh_process(monkeypatch)
    assert cat.scan(root, PATTERNS).entries[0].valid
    assert not (root / cat.STATE_DIR).exists()  # a scan (a dry run) creates nothing
