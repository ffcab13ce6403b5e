"""Faster verified I/O: blake3 checksums recorded per file, sha256 still read and selectable, manifests
with a checksum we cannot use reported invalid, and the daemon's verify-once record trusted only for
files unchanged since its check."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
from pathlib import Path

import pytest
import torch

from ckpt_daemon import checkpoint as ck
from ckpt_daemon import fsutil
from ckpt_daemon.checkpoint import CheckpointManager, read_checkpoint
from ckpt_daemon.errors import CheckpointError
from ckpt_daemon.store import catalog as cat
from ckpt_daemon.store import safetensors_file as stfile
from ckpt_daemon.store import verifyonce
from tests.helpers import write_manifest

PATTERNS = ["checkpoint-{step}"]


def _state():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Linear(32, 8))
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    m(torch.randn(4, 16)).sum().backward()
    opt.step()
    return m, opt


@pytest.fixture
def saved(tmp_path, monkeypatch):
    """A native checkpoint with several state shards (the parallel writers), default checksum."""
    monkeypatch.delenv(fsutil.CHECKSUM_ENV, raising=False)
    monkeypatch.setattr(ck, "STATE_SHARD_BYTES", 1024)
    m, opt = _state()
    path = CheckpointManager(tmp_path).save(7, model=m, optimizer=opt)
    return path, m, opt


def _manifest(path: Path) -> dict:
    return json.loads((path / "manifest.json").read_text())


def _flip(p: Path, at: int) -> bytes:
    data = bytearray(p.read_bytes())
    old = bytes(data)
    data[at % len(data)] ^= 0x01
    p.write_bytes(bytes(data))
    return old


def _entry(path: Path, verify: bool) -> cat.Entry:
    return cat.scan(path.parent, PATTERNS, verify=verify).by_name(path.name)


def test_blake3_is_recorded_per_file_and_a_flipped_byte_anywhere_is_caught(saved):
    path, m, opt = saved
    files = _manifest(path)["files"]
    assert len([n for n in files if n.startswith("state-")]) >= 2  # the parallel write path ran
    for name, rec in files.items():
        assert rec["algo"] == "blake3" and len(rec["digest"]) == 64 and "sha256" not in rec
        assert rec["size"] == (path / name).stat().st_size
    assert _entry(path, verify=True).status == "complete"
    state = read_checkpoint(path)
    assert torch.equal(state["model"]["0.weight"], m.state_dict()["0.weight"])
    for name in files:
        for at in (0, len((path / name).read_bytes()) // 2, -1):
            old = _flip(path / name, at)
            e = _entry(path, verify=True)
            assert e.status == "corrupt" and name in e.reason and "fails its checksum" in e.reason, (name, at, e)
            with pytest.raises(CheckpointError, match="corrupt"):
                read_checkpoint(path)
            (path / name).write_bytes(old)
    assert _entry(path, verify=True).status == "complete"
    # truncation: caught by the sizes alone, without reading the data
    big = max(files, key=lambda n: files[n]["size"])
    with open(path / big, "r+b") as f:
        f.truncate(files[big]["size"] - 1)
    e = _entry(path, verify=False)
    assert e.status == "corrupt" and big in e.reason and "bytes" in e.reason
    with pytest.raises(CheckpointError):
        read_checkpoint(path)


def test_sha256_stays_selectable_and_old_sha256_manifests_still_load(tmp_path, saved, monkeypatch):
    path, m, opt = saved
    # selectable: per manager, or for a whole run with $CKPT_CHECKSUM (e.g. in training.env)
    p1 = CheckpointManager(tmp_path / "a", checksum="sha256").save(1, model=m, optimizer=opt)
    monkeypatch.setenv(fsutil.CHECKSUM_ENV, "sha256")
    p2 = CheckpointManager(tmp_path / "b").save(2, model=m, optimizer=opt)
    for p in (p1, p2):
        for name, rec in _manifest(p)["files"].items():
            assert set(rec) == {"size", "sha256"}  # the form every version reads, and sha256sum checks
            assert rec["sha256"] == hashlib.sha256((p / name).read_bytes()).hexdigest()
        assert _entry(p, verify=True).status == "complete"
        read_checkpoint(p)
    # a manifest written before blake3 (sha256 records only) loads, verified
    man = _manifest(path)
    man["files"] = {n: {"size": r["size"], "sha256": hashlib.sha256((path / n).read_bytes()).hexdigest()}
                    for n, r in man["files"].items()}
    write_manifest(path, man, sealed=False)
    assert _entry(path, verify=True).status == "complete"
    m2, opt2 = _state()
    with torch.no_grad():
        for q in m2.parameters():
            q.zero_()
    loaded = CheckpointManager(path.parent).load("latest", model=m2, optimizer=opt2)
    assert loaded.step == 7 and torch.equal(m2.state_dict()["1.bias"], m.state_dict()["1.bias"])
    _flip(path / "model.safetensors", 100)
    assert _entry(path, verify=True).status == "corrupt"


@pytest.mark.parametrize("rec, why", [
    ({"algo": "xxh3", "digest": "0" * 64}, "unknown checksum algorithm 'xxh3'"),
    ({"algo": ["blake3"], "digest": "0" * 64}, "unknown checksum algorithm"),
    ({"algo": "blake3", "digest": 12345}, "no valid blake3 digest"),
    ({"algo": "blake3", "digest": "0" * 63 + "Z"}, "no valid blake3 digest"),
    ({"sha256": None}, "no valid sha256 digest"),
    ({}, "no checksum"),
])
def test_a_checksum_we_cannot_use_makes_the_checkpoint_invalid_never_an_exception(saved, rec, why):
    path, _, _ = saved
    man = _manifest(path)
    man["files"]["model.safetensors"] = {"size": man["files"]["model.safetensors"]["size"], **rec}
    write_manifest(path, man)
    for verify in (False, True):
        e = _entry(path, verify=verify)
        assert e.status == "invalid" and why in e.reason and "model.safetensors" in e.reason, e
        assert not e.valid
    with pytest.raises(CheckpointError, match="invalid"):
        read_checkpoint(path)


def test_without_the_blake3_package_it_writes_sha256_and_says_so_once(tmp_path, saved, monkeypatch, caplog):
    path, m, opt = saved
    monkeypatch.setattr(fsutil, "_blake3", None)
    monkeypatch.setattr(fsutil, "_warned", set())
    with caplog.at_level(logging.WARNING, logger="ckpt_daemon.fsutil"):
        assert fsutil.default_checksum() == fsutil.default_checksum() == "sha256"
    assert len([r for r in caplog.records if "blake3" in r.getMessage()]) == 1
    p = CheckpointManager(tmp_path / "c").save(3, model=m, optimizer=opt)
    assert all(set(r) == {"size", "sha256"} for r in _manifest(p)["files"].values())
    read_checkpoint(p)
    # a blake3 checkpoint cannot be checked here: unreadable (not corrupt, never quarantined for it)
    e = _entry(path, verify=True)
    assert e.status == "unreadable" and "blake3 package is not installed" in e.reason


def _count_hashing(monkeypatch) -> list:
    calls = []
    real = stfile.new_hasher

    def counting(algo, threads=True):
        calls.append(algo)
        return real(algo, threads)

    monkeypatch.setattr(stfile, "new_hasher", counting)
    return calls


def test_verify_once_the_daemons_record_skips_a_second_hash_only_while_files_are_unchanged(saved, monkeypatch):
    path, _, _ = saved
    calls = _count_hashing(monkeypatch)
    read_checkpoint(path)
    nfiles = len(_manifest(path)["files"])
    assert len(calls) == nfiles  # no record: every file hashed
    # the daemon verifies the resume choice and records what it saw
    v = verifyonce.verify_and_record(_entry(path, verify=False))
    assert v.valid and v.verified
    rec = json.loads((path.parent / ".ckpt-daemon" / verifyonce.RECORD).read_text())
    assert rec["path"] == os.path.realpath(path) and set(rec["files"]) == set(_manifest(path)["files"]) | {"manifest.json"}
    calls.clear()
    read_checkpoint(path)
    assert calls == []  # verified once, by the daemon
    # a byte flipped after the daemon's check, with the mtime put back: the ctime still tells
    target = path / "model.safetensors"
    st = target.stat()
    _flip(target, 200)
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert target.stat().st_mtime_ns == st.st_mtime_ns and target.stat().st_size == st.st_size
    calls.clear()
    with pytest.raises(CheckpointError, match="fails its blake3 checksum"):
        read_checkpoint(path)
    assert calls  # that file was hashed


def test_verify_once_record_is_ignored_when_stale_for_another_folder_or_malformed(saved, monkeypatch):
    path, _, _ = saved
    stats = verifyonce.folder_stats(path)
    calls = _count_hashing(monkeypatch)
    nfiles = len(_manifest(path)["files"])
    import time

    for rec_path, when, files in [(path, time.time() - verifyonce.MAX_AGE_S - 5, stats),   # too old
                                  (path.parent / "checkpoint-8", time.time(), stats),       # another folder
                                  (path, time.time(), {k: {"st_size": "x"} for k in stats}),  # malformed
                                  (path, time.time(), {k: v for k, v in stats.items() if k != "manifest.json"})]:
        verifyonce.record(rec_path, files, now=when)
        calls.clear()
        read_checkpoint(path)
        assert len(calls) == nfiles, rec_path
    # a manifest rewritten after the check: not trusted either
    verifyonce.record(path, stats)
    os.utime(path / "manifest.json")
    calls.clear()
    read_checkpoint(path)
    assert len(calls) == nfiles
    # and a record is only written for a checkpoint that verified
    (path.parent / ".ckpt-daemon" / verifyonce.RECORD).unlink()
    _flip(path / "state.json", 5)
    assert not verifyonce.verify_and_record(_entry(path, verify=False)).valid
    assert not (path.parent / ".ckpt-daemon" / verifyonce.RECORD).exists()


def test_foreign_sidecars_in_sha256_and_blake3_both_verify(tmp_path, monkeypatch):
    from ckpt_daemon.store import foreign

    for algo in ("sha256", "blake3"):
        monkeypatch.setenv(fsutil.CHECKSUM_ENV, algo)
        root = tmp_path / algo
        root.mkdir()
        f = root / "model_step_100.pt"
        f.write_bytes(os.urandom(4096))
        sc = foreign.record(root, f.name, f, "file", 100, {})
        rec = sc["files"][""]
        assert (rec.get("algo") == "blake3") if algo == "blake3" else ("sha256" in rec)
        sc = foreign.read_sidecar(root, f.name)
        assert sc is not None
        assert foreign.compare(sc, f, foreign.entry_files(f), verify=True) == ("ok", "")
        st = f.stat()
        _flip(f, 10)
        os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
        res, why = foreign.compare(sc, f, foreign.entry_files(f), verify=True)
        assert res == "corrupt" and "checksum" in why


# The load reads each file in pieces (madvise(MADV_POPULATE_READ) of 16 MiB at a time, two files in
# flight) and hashes each piece as soon as it is in memory (stfile.verify_buffers). Small pieces here, so
# that the small test files take many; "touch" is the path for kernels without MADV_POPULATE_READ.

@pytest.fixture
def bigger(tmp_path, monkeypatch):
    monkeypatch.delenv(fsutil.CHECKSUM_ENV, raising=False)
    monkeypatch.setattr(ck, "STATE_SHARD_BYTES", 64 << 10)
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Linear(256, 64))
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    m(torch.randn(4, 64)).sum().backward()
    opt.step()
    return CheckpointManager(tmp_path).save(3, model=m, optimizer=opt), m


def _count_populate(monkeypatch, mode: str) -> list:
    calls = []
    real = stfile._populate

    def populate(addr, length):
        calls.append(length)
        return errno.EINVAL if mode == "touch" else real(addr, length)

    monkeypatch.setattr(stfile, "_populate", populate)
    return calls


@pytest.mark.parametrize("mode", ["populate", "touch"])
def test_pieces_are_read_and_hashed_in_order_and_a_flip_in_any_piece_is_caught(bigger, monkeypatch, mode):
    path, m = bigger
    piece = 8192
    monkeypatch.setattr(stfile, "POPULATE_CHUNK", piece)
    calls = _count_populate(monkeypatch, mode)
    files = _manifest(path)["files"]
    big = [n for n in files if files[n]["size"] > 4 * piece]
    assert "model.safetensors" in big and any(n.startswith("state-") for n in big)
    state = read_checkpoint(path)
    assert torch.equal(state["model"]["1.weight"], m.state_dict()["1.weight"])
    assert calls and max(calls) == piece
    if mode == "populate":
        assert sum(calls) >= sum(files[n]["size"] for n in files)  # every byte read by the populate path
    for name in big:
        size = files[name]["size"]
        for at in (0, piece - 1, piece, 3 * piece + 17, size // 2, size - 1):
            old = _flip(path / name, at)
            with pytest.raises(CheckpointError, match=f"{name} fails its blake3 checksum"):
                read_checkpoint(path)
            (path / name).write_bytes(old)
    read_checkpoint(path)


def test_a_read_error_in_the_middle_of_a_file_is_reported_never_hashed_past(bigger, monkeypatch):
    path, _ = bigger
    monkeypatch.setattr(stfile, "POPULATE_CHUNK", 8192)
    real = stfile._populate
    seen = []

    def failing(addr, length):
        seen.append(length)
        return errno.EIO if len(seen) == 3 else real(addr, length)

    monkeypatch.setattr(stfile, "_populate", failing)
    with pytest.raises(CheckpointError, match="corrupt: .* could not be read .*Input/output error"):
        read_checkpoint(path)


def test_a_file_that_shrinks_after_it_was_opened_is_an_error_not_a_crash(tmp_path):
    p = tmp_path / "x.bin"
    data = os.urandom(256 << 10)
    p.write_bytes(data)
    h = fsutil.new_hasher("blake3")
    h.update(data)
    buf, st = stfile.map_file(p, len(data))
    if stfile._populate(stfile._address(buf), 4096) != 0:
        pytest.skip("no MADV_POPULATE_READ here (Linux < 5.14): the pages are touched, as before")
    with open(p, "r+b") as f:
        f.truncate(10_000)  # the mapping now reaches past the end of the file
    with pytest.raises(stfile.ChecksumMismatch, match="x.bin could not be read"):
        stfile.verify_buffers([stfile.VerifyJob("x.bin", buf, "blake3", h.hexdigest())])


@pytest.mark.parametrize("lanes", [1, 2, 3])
def test_verify_buffers_checks_every_file_and_names_the_bad_one(tmp_path, lanes, monkeypatch):
    monkeypatch.setattr(stfile, "POPULATE_CHUNK", 4096)
    jobs, raw = [], {}
    for i, size in enumerate([0, 100, 4096, 50_000, 70_001]):
        p = tmp_path / f"f{i}"
        raw[p.name] = os.urandom(size)
        p.write_bytes(raw[p.name])
        h = fsutil.new_hasher("sha256" if i % 2 else "blake3")
        h.update(raw[p.name])
        jobs.append((p, "sha256" if i % 2 else "blake3", h.hexdigest()))

    def run():
        stfile.verify_buffers([stfile.VerifyJob(p.name, stfile.map_file(p, p.stat().st_size)[0], a, d) for p, a, d in jobs],
                            lanes=lanes)

    run()
    for p, algo, _ in jobs[1:]:
        old = _flip(p, len(raw[p.name]) - 1)
        with pytest.raises(stfile.ChecksumMismatch, match=f"{p.name} fails its {algo} checksum"):
            run()
        p.write_bytes(old)
    run()
