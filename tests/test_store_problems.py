"""Typed problems (ckpt_daemon.store.problems) and names (ckpt_daemon.store.names): readers say the kind of
what they found, callers map kinds to statuses and never read the message; one function reads a step out
of a name, with ASCII digits only."""

from __future__ import annotations

import hashlib
import json
import re
import zipfile
from pathlib import Path

import pytest
import torch

from ckpt_daemon.fsutil import digest_problem, digest_record
from ckpt_daemon.store import catalog as cat
from ckpt_daemon.store import foreign
from ckpt_daemon.store import torchzip as tz
from ckpt_daemon.store.names import (
    MAX_STEP_DIGITS,
    Layout,
    Status,
    compile_pattern,
    match_name,
    number_in_name,
    step_in_name,
)
from ckpt_daemon.store.problems import Kind, Problem

REPO = Path(__file__).resolve().parent.parent


def saved(path: Path) -> Path:
    torch.save({"w": torch.arange(64, dtype=torch.float32), "step": 5, "loss": torch.tensor(0.5)}, path)
    return path


def storage_range(path: Path) -> tuple[int, int]:
    """[start, end) of the first storage's bytes in a torch zip (from the zip headers)."""
    with zipfile.ZipFile(path) as z:
        info = next(i for i in z.infolist() if i.filename.endswith("/data/0"))
        raw = path.read_bytes()
        nlen, elen = int.from_bytes(raw[info.header_offset + 26:info.header_offset + 28], "little"), \
            int.from_bytes(raw[info.header_offset + 28:info.header_offset + 30], "little")
        start = info.header_offset + 30 + nlen + elen
        return start, start + info.file_size


# ------------------------------------------------------------------------------------ torchzip kinds
def test_a_truncated_zip_is_an_incomplete_problem(tmp_path):
    p = saved(tmp_path / "model_step_5.pt")
    raw = p.read_bytes()
    p.write_bytes(raw[: len(raw) // 2])
    problem = tz.find_problem(p)
    assert isinstance(problem, Problem) and problem.kind is Kind.INCOMPLETE
    assert problem.message == tz.check(p)  # the words users see are check's, unchanged
    with pytest.raises(tz.TorchZipError) as err:
        tz.inspect(p)
    assert err.value.kind is Kind.INCOMPLETE and err.value.problem == problem
    status, reason, _ = foreign.describe_file(p, verify=False)
    assert status == Status.INCOMPLETE and reason == f"{p.name}: {problem.message}"


def test_a_crc_flip_is_a_corrupt_problem(tmp_path):
    p = saved(tmp_path / "model_step_5.pt")
    start, end = storage_range(p)
    raw = bytearray(p.read_bytes())
    raw[end - 1] ^= 0xFF
    p.write_bytes(bytes(raw))
    assert tz.find_problem(p) is None  # the structure holds; the storage is only read with verify_crc
    problem = tz.find_problem(p, verify_crc=True)
    assert problem.kind is Kind.CORRUPT and problem.status == Status.CORRUPT
    with pytest.raises(tz.TorchZipError) as err:
        tz.inspect(p, verify_crc=True)
    assert err.value.kind is Kind.CORRUPT
    assert foreign.describe_file(p, verify=True)[0] == Status.CORRUPT


def test_a_non_torch_file_is_an_invalid_problem(tmp_path):
    for name, body in (("text.pt", b"just some text, named like a checkpoint\n" * 20),
                       ("empty_zip.pt", b"PK\x05\x06" + bytes(18))):
        p = tmp_path / name
        p.write_bytes(body)
        problem = tz.find_problem(p)
        assert problem is not None and problem.kind is Kind.INVALID, (name, problem)
        assert foreign.describe_file(p, verify=False)[0] == Status.INVALID


def test_bounds_and_timeouts_have_their_kinds(tmp_path):
    p = saved(tmp_path / "model_step_5.pt")
    assert tz.find_problem(p, limits=tz.Limits(max_entries=2)).kind is Kind.INVALID
    assert tz.TorchZipLimitError("x").kind is Kind.INVALID
    assert tz.TorchZipTimeout("x").kind is Kind.UNREADABLE
    assert tz.TorchZipError("x").kind is Kind.INCOMPLETE
    assert tz.TorchZipError("CRC of data/0 fails").kind is Kind.INCOMPLETE  # the words never decide
    assert (missing := tz.find_problem(tmp_path / "missing.pt")) is not None and missing.kind is Kind.INCOMPLETE


def test_an_entry_named_like_a_reason_does_not_change_the_status(tmp_path):
    """A hostile entry name that holds "CRC" or "not a torch.save file" is in the message, never in the kind:
    such a file is incomplete (structurally refused), not corrupt, not invalid."""
    src = saved(tmp_path / "src.pt")
    p = tmp_path / "model_step_5.pt"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(p, "w", zipfile.ZIP_STORED) as z:
        prefix = zin.infolist()[0].filename.split("/", 1)[0]
        for i in zin.infolist():
            z.writestr(zipfile.ZipInfo(i.filename), zin.read(i))
        z.writestr(zipfile.ZipInfo(f"{prefix}/CRC not a torch.save file"), b"x" * 100,
                   compress_type=zipfile.ZIP_DEFLATED)
    problem = tz.find_problem(p)
    assert "CRC" in problem.message and "not a torch.save file" in problem.message
    assert problem.kind is Kind.INCOMPLETE
    assert foreign.describe_file(p, verify=False)[0] == Status.INCOMPLETE


def test_a_digest_the_machine_cannot_compute_is_unreadable_not_corrupt(tmp_path, monkeypatch):
    from ckpt_daemon import fsutil
    from ckpt_daemon.store import manifest as mf

    folder = tmp_path / "checkpoint-3"
    folder.mkdir()
    (folder / "a.bin").write_bytes(b"hello")
    good = {"size": 5, **digest_record("sha256", hashlib.sha256(b"hello").hexdigest())}
    assert digest_problem(folder / "a.bin", good) is None
    assert digest_problem(folder / "a.bin", {**good, "sha256": "0" * 64}).kind is Kind.CORRUPT
    m = mf.build_manifest(3, {"a.bin": good})
    assert mf.check_native(folder, verify=True, manifest=m)[0] == Status.COMPLETE

    def no_such_hasher(*a, **k):
        raise LookupError("sha256 is not available here")  # an algorithm this machine lacks

    monkeypatch.setattr(fsutil, "new_hasher", no_such_hasher)
    problem = digest_problem(folder / "a.bin", good)
    assert problem.kind is Kind.UNREADABLE
    assert mf.check_native(folder, verify=True, manifest=m)[:2] == (Status.UNREADABLE, problem.message)
    monkeypatch.undo()
    # a file whose name holds the words is judged by its bytes, never by its message
    (folder / "cannot be verified").write_bytes(b"hello")
    m = mf.build_manifest(3, {"cannot be verified": {**good, "sha256": "0" * 64}})
    assert mf.check_native(folder, verify=True, manifest=m)[0] == Status.CORRUPT


# ------------------------------------------------------------------------------------------- names
def test_a_step_is_read_from_a_name_with_ascii_digits_only_through_one_function():
    assert step_in_name("checkpoint-120") == 120
    assert step_in_name("epoch=1-step=300.ckpt") == 300
    assert step_in_name("model_step_7.pt") == 7
    assert step_in_name("model-step-0042.pt") == 42
    for name in ("checkpoint-١٢٣", "step_１２３.pt", "step=٣", "checkpoint-", "model.pt"):
        assert step_in_name(name) is None, name
    assert step_in_name("step_" + "9" * MAX_STEP_DIGITS) == int("9" * MAX_STEP_DIGITS)
    assert step_in_name("step_" + "9" * (MAX_STEP_DIGITS + 1)) is None  # never more digits than a run reaches
    assert number_in_name("run٣-model_12_34.pt") == 12 and number_in_name("run٣-model_12_34.pt", last=True) == 34
    assert number_in_name("١٢٣") is None
    rxs = [compile_pattern("checkpoint-{step}")]
    assert match_name("checkpoint-12", rxs) == {"step": 12}
    assert match_name("checkpoint-١٢", rxs) is None and match_name("checkpoint-１２", rxs) is None
    # the one function: no other module of the daemon, trainer or maintenance has its own step regex
    own = re.compile(r"step\[=_-\]\?")
    offenders = [str(f.relative_to(REPO)) for d in ("ckpt_daemon", "daemon", "maintenance", "trainer")
                 for f in (REPO / d).rglob("*.py") if own.search(f.read_text()) and f.name != "names.py"]
    assert offenders == []


def test_status_and_layout_are_their_strings(tmp_path):
    assert Status.COMPLETE == "complete" and f"{Status.IN_PROGRESS}" == "in_progress"
    assert str(Layout.HF) == "hf" and json.dumps({"s": Status.CORRUPT}) == '{"s": "corrupt"}'
    assert cat.STATUSES == ("complete", "incomplete", "corrupt", "invalid", "unreadable", "in_progress")
    assert {k.value for k in Kind} <= set(cat.STATUSES)
    e = cat.Entry("checkpoint-1", tmp_path / "checkpoint-1", 1, "native", "complete")
    assert e.status is Status.COMPLETE and e.layout is Layout.NATIVE and e.valid
    e.status = "corrupt"
    assert e.status is Status.CORRUPT and not e.valid
    with pytest.raises(ValueError):
        e.status = "fine"


@pytest.mark.parametrize("header", [b"[" * 200_000 + b"]" * 200_000, b'"just a string"', b"{not json"],
                         ids=["nesting-bomb", "not-an-object", "not-json"])
def test_the_one_safetensors_header_reader_bounds_every_reader(tmp_path, header):
    """The loader (parse_safetensors, what a resume reads) and the catalog's structural check read a
    header through the same bounded reader: a crafted header is a ValueError naming it, never a
    RecursionError or a crash, in both."""
    from ckpt_daemon.store import manifest as mf
    from ckpt_daemon.store import safetensors_file as stfile

    raw = len(header).to_bytes(8, "little") + header
    with pytest.raises(ValueError, match="header|JSON|nested"):
        stfile.parse_safetensors(bytearray(raw))
    (tmp_path / "m.safetensors").write_bytes(raw)
    assert mf.safetensors_problem(tmp_path / "m.safetensors") is not None
    too_long = (200 << 20).to_bytes(8, "little") + b"{}"  # declares more than the file holds
    with pytest.raises(ValueError, match="corrupt header length"):
        stfile.parse_safetensors(bytearray(too_long))
