"""Every name and every byte in the checkpoint folder is untrusted input.

A step is named by ASCII digits only and must agree with what the checkpoint holds; a file that merely
matches a pattern is not a checkpoint; hostile headers, deep nesting and unreadable folders are reported
as invalid with a reason, never as an exception, by the catalog, `list`, cleanup and the resume choice.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import struct
import subprocess
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ckpt_daemon.store import catalog as cat
from ckpt_daemon.store import delete as store_delete
from ckpt_daemon.store import foreign
from daemon.supervisor import choose_resume, choose_resume_all
from tests.helpers import (
    PY,
    env_for_children,
    flip_byte,
    hf_folder,
    lightning_run,
    native,
    record_all,
    run_py,
    tiny_model,
    write_config,
    write_manifest,
)

PATTERNS = ["checkpoint-{step}", "model_step_{step}.pt", "rolling_step_{step}"]


def test_only_ascii_digits_name_a_step(tmp_path):
    native(tmp_path, [10, 20])
    for name in ("checkpoint-\u0669\u0669\u0669\u0669", "checkpoint-\uff19\uff19\uff19\uff19", "checkpoint-9\u0669"):
        shutil.copytree(tmp_path / "checkpoint-20", tmp_path / name)  # Arabic-Indic and full-width nines
    c = cat.scan(tmp_path, PATTERNS)
    assert [e.name for e in c.entries] == ["checkpoint-10", "checkpoint-20"]
    assert {n for n, _ in c.ignored} >= {"checkpoint-\u0669\u0669\u0669\u0669", "checkpoint-\uff19\uff19\uff19\uff19"}
    assert cat.compile_pattern("checkpoint-{step}").match("checkpoint-\u0661\u0662") is None


def test_a_renamed_copy_is_not_the_checkpoint_its_name_claims(tmp_path):
    native(tmp_path, [10, 20, 30])
    shutil.copytree(tmp_path / "checkpoint-10", tmp_path / "checkpoint-99999999")  # an old checkpoint, renamed
    (tmp_path / "checkpoint-12345678901234567890").mkdir()  # more digits than any run gets to
    c = cat.scan(tmp_path, PATTERNS)
    fake = c.by_name("checkpoint-99999999")
    assert fake.status == "invalid" and "manifest says step 10" in fake.reason
    assert ("checkpoint-12345678901234567890",
            "its step number has more than 15 digits; no real run gets there") in c.ignored
    e, notes = choose_resume(c, set(), {})
    assert e.name == "checkpoint-30"  # the real newest, not the renamed copy
    assert any("checkpoint-99999999 skipped: invalid" in n for n in notes)


def test_a_file_that_merely_matches_a_pattern_is_not_a_checkpoint(tmp_path):
    native(tmp_path, [10])
    (tmp_path / "model_step_900.pt").write_text("this is not a checkpoint\n")  # a 25-byte text file
    (tmp_path / "rolling_step_950").write_bytes(b"29 bytes of someone's notes.\n")
    c = cat.scan(tmp_path, PATTERNS, now=time.time() + 3600)
    assert c.by_name("model_step_900.pt").status == "incomplete"
    junk = c.by_name("rolling_step_950")
    assert junk.status == "invalid" and "neither a torch.save zip nor a safetensors file" in junk.reason
    assert c.newest_valid().name == "checkpoint-10"
    assert choose_resume(c, set(), {})[0].name == "checkpoint-10"


def _safetensors(path: Path, header: bytes, payload: bytes = b"") -> None:
    path.write_bytes(struct.pack("<Q", len(header)) + header + payload)


HOSTILE_HEADERS = {
    "a JSON list": b"[1, 2, 3]",
    "a JSON string": b'"hello"',
    "deep nesting": b"[" * 100_000 + b"]" * 100_000,
    "an entry that is not an object": b'{"w": 5}',
    "an unknown dtype": b'{"w": {"dtype": "Q99", "shape": [1], "data_offsets": [0, 4]}}',
    "a shape of strings": b'{"w": {"dtype": "F32", "shape": ["a"], "data_offsets": [0, 4]}}',
    "offsets that lie": b'{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}',
    "overlapping tensors": (b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},'
                            b' "b": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}'),
    "metadata of numbers": b'{"__metadata__": {"a": 1}}',
    "not JSON": b"\xff\xfe{{{",
}


@pytest.mark.parametrize("what", sorted(HOSTILE_HEADERS))
def test_hostile_safetensors_headers_are_reported_not_raised(tmp_path, what, capsys):
    root = tmp_path / "checkpoints"
    native(root, [10])
    d = root / "checkpoint-20"
    shutil.copytree(root / "checkpoint-10", d)
    m = json.loads((d / "manifest.json").read_text())
    m["step"] = 20
    write_manifest(d, m)
    _safetensors(root / "rolling_step_30", HOSTILE_HEADERS[what], b"\0" * 4)
    hf = root / "checkpoint-40"
    hf.mkdir()
    (hf / "trainer_state.json").write_text(json.dumps({"global_step": 40}))
    _safetensors(hf / "model.safetensors", HOSTILE_HEADERS[what], b"\0" * 4)
    c = cat.scan(root, PATTERNS, verify=True)
    bad = {e.name: e for e in c.entries if not e.valid}
    assert set(bad) == {"rolling_step_30", "checkpoint-40"}, what
    assert all(e.reason for e in bad.values())
    # the commands that read the folder say so instead of crashing
    cfg = write_config(tmp_path, {"checkpoints": {"pattern": PATTERNS}}, tiny=False)
    from daemon.cli import main as ckpt_daemon_cli  # in-process: the same code, without an interpreter per case
    from maintenance.cleanup import main as cleanup_cli

    capsys.readouterr()
    code = ckpt_daemon_cli(["list", "--config", str(cfg), "--verify", "--json"])  # 1 once they settled as damaged
    doc = json.loads(capsys.readouterr().out)
    assert code in (0, 1) and doc["ok"] is (code == 0)
    got = {e["name"]: e["status"] for e in doc["checkpoints"]}
    assert got["checkpoint-40"] != "complete" and got["rolling_step_30"] != "complete"
    assert cleanup_cli(["--config", str(cfg), "--dry-run"]) == 0
    # and the resume choice passes them over (setting them aside, newer than its choice as they are)
    assert choose_resume(cat.scan(root, PATTERNS), set(), {})[0].name == "checkpoint-20"
    assert {q["name"] for q in store_delete.quarantined(root)} == set(bad)


def test_a_hostile_manifest_is_reported_not_raised(tmp_path):
    native(tmp_path, [10, 20, 30])
    variants = [b"[" * 50_000 + b"]" * 50_000,
                b'{"format": "ckpt-daemon/1", "step": 20, "files": {"model.safetensors": 7}}',
                b'{"format": "ckpt-daemon/1", "step": 20, "files": {"../../etc/passwd": {"size": 1, "sha256": "' + b"0" * 64 + b'"}}}',
                b'{"format": "ckpt-daemon/1", "step": true, "files": {}}', b"\x00" * 100, b" " * (17 << 20)]
    for i, data in enumerate(variants):
        (tmp_path / "checkpoint-30" / "manifest.json").write_bytes(data)
        c = cat.scan(tmp_path, PATTERNS)
        e = c.by_name("checkpoint-30")
        assert e.status in ("incomplete", "invalid", "corrupt") and e.reason, (i, e)
        assert c.newest_valid().name == "checkpoint-20"


def test_an_unreadable_folder_is_reported_as_such_when_not_root():
    """Run the scan as an unprivileged user (root reads everything): the folder without read permission
    becomes an entry with status `unreadable`, and the scan goes on."""
    import tempfile

    tmp_path = Path(tempfile.mkdtemp(prefix="ckpt-unreadable-", dir="/tmp"))  # pytest's tmp_path is root-only
    os.chmod(tmp_path, 0o755)
    native(tmp_path / "checkpoints", [10, 20])
    locked = tmp_path / "checkpoints" / "checkpoint-20"
    locked.chmod(0o000)
    code = ("import json, sys; from ckpt_daemon.store import catalog as cat; "
            f"c = cat.scan({str(tmp_path / 'checkpoints')!r}, ['checkpoint-{{step}}'], verify=True); "
            "print(json.dumps([(e.name, e.status, e.reason) for e in c.entries]))")
    if os.geteuid() != 0:
        pytest.skip("needs root to run the scan as another user")
    # import first (the interpreter lives under /root), then become `nobody` for the scan itself
    r = subprocess.run([PY, "-c",
                        f"import os, json, ckpt_daemon.store.catalog; os.setgid(65534); os.setuid(65534); exec({code!r})"],
                       capture_output=True, text=True, env=env_for_children(), timeout=60)
    locked.chmod(0o755)
    shutil.rmtree(tmp_path)
    assert r.returncode == 0, r.stderr
    got = {n: (s, why) for n, s, why in json.loads(r.stdout)}
    assert got["checkpoint-10"][0] == "complete"
    assert got["checkpoint-20"][0] == "unreadable" and "permission denied" in got["checkpoint-20"][1]


@pytest.mark.slow
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_damage_never_raises(tmp_path_factory, data):
    """Truncate, flip, or replace any file of any layout: the scan and the verification report a status,
    never an exception, and a damaged checkpoint is never `complete` with verify."""
    root = tmp_path_factory.mktemp("fuzz")
    native(root, [10])
    import torch

    torch.save({"model_state_dict": {"w": torch.ones(64)}, "step": 20}, root / "model_step_20.pt")
    files = sorted(p for p in root.rglob("*") if p.is_file() and ".ckpt-daemon" not in p.parts)
    victim = files[int(data.draw(st.floats(0, 1, exclude_max=True)) * len(files))]
    raw = victim.read_bytes()
    how = data.draw(st.sampled_from(["truncate", "flip", "replace"]))
    where = data.draw(st.floats(0, 1, exclude_max=True))  # a position relative to the file's size (which varies)
    if how == "truncate":
        victim.write_bytes(raw[: int(where * len(raw))])
    elif how == "flip":
        i = int(where * len(raw))
        victim.write_bytes(raw[:i] + bytes([raw[i] ^ (1 << data.draw(st.integers(0, 7)))]) + raw[i + 1 :])
    else:
        victim.write_bytes(data.draw(st.binary(max_size=300)))
    c = cat.scan(root, PATTERNS, verify=True)
    damaged = victim.parent.name if victim.parent != root else victim.name
    e = c.by_name(damaged)
    if victim.parent != root and victim.read_bytes() != raw:
        # a native file covered by the manifest's checksums, or the manifest itself (sealed with a digest of
        # its own bytes): any change is caught
        assert e is not None and e.status != "complete", (how, victim.name, e)


# ------------------------------------------------------------ a changed byte in any file of any layout
LATER = time.time() + 3600  # "an hour later": every foreign checkpoint written now has settled
DAMAGE_PATTERNS = ["checkpoint-{step}", "epoch={epoch}-step={step}.ckpt", "model_step_{step}.pt"]
# Where a changed byte of a manifest or sidecar would sway a choice while the file still parses: a metric's
# first digit (the "val_loss": 1.5 -> 0.5), the path a trainer says is best, the step.
SWAYING = (b'"val_loss": ', b'"eval_loss": ', b'"best_model_path": "', b'"step": ')


@pytest.fixture(scope="module")
def two_of_each_layout(tmp_path_factory):
    """layout -> (folder, the newer checkpoint, the older one, best_metric): in each folder the newer of two
    checkpoints is both the resume choice and the best, so that damage to it must change both choices."""
    import torch

    base = tmp_path_factory.mktemp("layouts")
    out = {}
    d = base / "native"
    native(d, [10, 20])
    (d / "best").unlink()  # best is then chosen from the manifests' metrics: what a changed manifest could sway
    out["native"] = (d, "checkpoint-20", "checkpoint-10", "val_loss")
    d = base / "hf"
    d.mkdir()
    for s, loss in ((100, 0.9), (200, 0.4)):
        hf_folder(d, s, state={"log_history": [{"step": s, "eval_loss": loss}]})
    out["hf"] = (d, "checkpoint-200", "checkpoint-100", "eval_loss")
    d = base / "lightning"
    d.mkdir()
    older, newer = lightning_run(d)[-2:]
    out["lightning"] = (d, newer.name, older.name, None)
    d = base / "plain"
    d.mkdir()
    for s, v in ((10, 0.9), (20, 0.3)):
        torch.save({"model_state_dict": tiny_model().state_dict(), "step": s, "val_loss": v}, d / f"model_step_{s}.pt")
    out["plain"] = (d, "model_step_20.pt", "model_step_10.pt", "val_loss")
    return out


def _files_of(root: Path, name: str) -> list[Path]:
    """Every file of checkpoint `name`, and its sidecar manifest if it has one."""
    p = root / name
    files = [p] if p.is_file() else sorted(x for x in p.rglob("*") if x.is_file())
    sc = foreign.sidecar_path(root, name)
    return files + ([sc] if sc.exists() else [])


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["native", "hf", "lightning", "plain"])
def test_a_changed_byte_in_any_file_of_a_checkpoint_is_caught_named_and_never_chosen(two_of_each_layout, layout,
                                                                                     tmp_path):
    """Bytes changed anywhere in any file of a checkpoint of every layout, its manifest.json or its sidecar
    manifest included (each a copy of the folder, foreign ones recorded as the daemon records them once
    they settled): the verified catalog calls it damaged and names the file, and neither the resume choice
    nor `best` is that checkpoint."""
    src, victim, older, metric = two_of_each_layout[layout]
    work = tmp_path / "w"

    def fresh() -> None:
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(src, work, symlinks=True)
        if layout != "native":
            record_all(work, DAMAGE_PATTERNS)

    fresh()
    c = cat.scan(work, DAMAGE_PATTERNS, verify=True, now=LATER, best_metric=metric)
    chosen, _, _ = choose_resume_all({"": c}, set(), {})
    assert chosen.name == victim and c.pointer("best").name == victim  # undamaged, it is both
    files = _files_of(work, victim)
    assert any(f.name in ("manifest.json", f"{victim}.json") for f in files)
    rng = random.Random(layout)
    cases = []  # (file, where: a share of its size or a key whose value follows, xor)
    for f in files:
        raw = f.read_bytes()
        shares = (0.0, 1.0, *(rng.random() for _ in range(4)))
        cases += [(f.relative_to(work), w, rng.randrange(1, 256)) for w in shares]
        cases += [(f.relative_to(work), key, 1) for key in SWAYING if key in raw]
    for rel, where, xor in cases:
        fresh()  # a sidecar recorded afresh may differ in size by a digit of its time: positions are found anew
        raw = (work / rel).read_bytes()
        i = raw.find(where) + len(where) if isinstance(where, bytes) else min(int(where * len(raw)), len(raw) - 1)
        flip_byte(work / rel, i, xor)
        c = cat.scan(work, DAMAGE_PATTERNS, verify=True, now=LATER, best_metric=metric)
        e = c.by_name(victim)
        what = (str(rel), i, xor, e and (e.status, e.reason))
        assert e is not None and e.status != "complete" and rel.name in e.reason, what
        assert c.pointer("best") is None or c.pointer("best").name != victim, what
        c = cat.scan(work, DAMAGE_PATTERNS, now=LATER, best_metric=metric)
        chosen, _, notes = choose_resume_all({"": c}, set(), {})
        assert chosen is not None and chosen.name == older, (*what, notes)


def test_a_zip_that_is_not_a_torch_file_is_not_a_checkpoint(tmp_path):
    import zipfile

    native(tmp_path, [10])
    with zipfile.ZipFile(tmp_path / "model_step_9999.pt", "w") as z:
        z.writestr("notes.txt", "hello")
    c = cat.scan(tmp_path, PATTERNS, verify=True)
    e = c.by_name("model_step_9999.pt")
    assert e.status == "invalid" and "not a torch.save file" in e.reason
    assert c.newest_valid().name == "checkpoint-10"


@pytest.mark.slow
def test_odd_names_markup_and_deep_folders_never_crash_the_commands(tmp_path):
    root = tmp_path / "checkpoints"
    native(root, [10, 20])
    os.mkdir(os.path.join(os.fsencode(root), b"checkpoint-30\xff"))  # not UTF-8
    (root / "checkpoint-40").mkdir()
    fd = os.open(root / "checkpoint-40", os.O_RDONLY)
    for _ in range(1200):  # deeper than Python's recursion limit, made one level at a time
        os.mkdir("a", dir_fd=fd)
        fd2 = os.open("a", os.O_RDONLY, dir_fd=fd)
        os.close(fd)
        fd = fd2
    os.close(fd)
    cfg = write_config(tmp_path, {}, tiny=False)
    run_py(["-m", "daemon", "pin", "--config", str(cfg), "checkpoint-20", "--reason", "see [/data/notes] [bold]x"],
           check=True)
    env = {**env_for_children(), "PYTHONIOENCODING": "utf-8"}  # strict UTF-8 output, as an en_US.UTF-8 locale gives
    for args in (["-m", "daemon", "list", "--config", str(cfg)],
                 ["-m", "maintenance.cleanup", "--config", str(cfg), "--dry-run"]):
        r = run_py(args, env=env)
        assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    r = run_py(["-m", "daemon", "list", "--config", str(cfg)], env=env)
    assert "pinned" in r.stdout and "checkpoint-30\\udcff" in r.stdout  # markup shown as text, odd bytes escaped
    e = cat.scan(root, ["checkpoint-{step}"]).by_name("checkpoint-40")
    assert e.status in ("unreadable", "incomplete", "in_progress") and not e.valid
    _remove_deep(root / "checkpoint-40")  # shutil.rmtree (pytest's own clean-up too) would hit the recursion limit


def _remove_deep(top: Path) -> None:
    depth = 0
    fd = os.open(top, os.O_RDONLY)
    fds = [fd]
    while "a" in os.listdir(fd):
        fd = os.open("a", os.O_RDONLY, dir_fd=fd)
        fds.append(fd)
        depth += 1
    for parent in reversed(fds[:-1]):
        os.rmdir("a", dir_fd=parent)
    for f in fds:
        os.close(f)
    top.rmdir()


def test_a_hostile_job_history_never_stops_the_daemon(tmp_path):
    from daemon.state import JobHistory

    for text in ("[]", "[" * 100_000, '{"jobs": [1, 2], "created": "x"}',
                 '{"jobs": {"snapshot": {"last_success": "soon"}}}'):
        (tmp_path / "jobs-state.json").write_text(text)
        h = JobHistory(tmp_path, now=1000.0)
        assert isinstance(h.last_success("snapshot"), float)
