"""manifest.json and every sidecar manifest carry a digest of their own bytes (issue #22, item 2).

A changed byte in a manifest (the issue's `"val_loss": 1.5` made `0.5`, which would choose `best`) or in
a foreign checkpoint's sidecar manifest makes that checkpoint damaged, named as such by the catalog and
`ckpt-daemon list --verify`, and it is never the resume point nor `best`. A manifest written before the
seal existed still loads, and the process says so once.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest

from ckpt_daemon.checkpoint import CheckpointManager, read_checkpoint
from ckpt_daemon.store import catalog as cat
from ckpt_daemon.store import foreign
from ckpt_daemon.store import manifest as mf
from daemon.supervisor import choose_resume_all
from tests.helpers import flip_byte, hf_folder, make_state, record_all, run_py, write_config, write_manifest

PATTERNS = ["checkpoint-{step}"]
LATER = time.time() + 3600  # every foreign checkpoint written now has settled by then


def _two_native(root: Path) -> None:
    """checkpoint-10 (val_loss 1.0, the best) and checkpoint-20 (val_loss 1.5, the newest); no `best`
    symlink, so that best is chosen from the manifests' metrics, which a changed manifest could sway."""
    m, opt, sched = make_state()
    mgr = CheckpointManager(root)
    mgr.save(10, model=m, optimizer=opt, scheduler=sched, metrics={"val_loss": 1.0})
    mgr.save(20, model=m, optimizer=opt, scheduler=sched, metrics={"val_loss": 1.5})
    if (root / "best").is_symlink():
        (root / "best").unlink()


def _replace_once(path: Path, old: bytes, new: bytes) -> None:
    raw = path.read_bytes()
    assert raw.count(old) == 1, raw
    path.write_bytes(raw.replace(old, new))


def _listed(root: Path, tmp_path: Path, best_metric: str) -> tuple[int, dict]:
    cfg = write_config(tmp_path / "cfg", {"checkpoints": {"dir": str(root), "pattern": ["checkpoint-{step}"]},
                                          "trainer": {"best_metric": best_metric}})
    r = run_py(["-m", "daemon", "list", "--config", str(cfg), "--verify", "--json"])
    return r.returncode, {e["name"]: e for e in json.loads(r.stdout)["checkpoints"]}


@pytest.mark.slow
def test_a_changed_metric_in_manifest_json_is_caught_and_never_chosen(tmp_path):
    root = tmp_path / "ck"
    _two_native(root)
    c = cat.scan(root, PATTERNS, verify=True, best_metric="val_loss")
    assert c.pointer("best").name == "checkpoint-10" and c.by_name("checkpoint-20").status == "complete"
    victim = root / "checkpoint-20"
    _replace_once(victim / "manifest.json", b'"val_loss": 1.5', b'"val_loss": 0.5')  # still valid JSON
    for verify in (True, False):  # the seal is checked whenever the manifest is read
        status, reason, _ = mf.check_native(victim, verify=verify)
        assert status == "corrupt" and "manifest.json" in reason and "own digest" in reason, (verify, reason)
    c = cat.scan(root, PATTERNS, verify=True, best_metric="val_loss")
    e = c.by_name("checkpoint-20")
    assert e.status == "corrupt" and "manifest.json" in e.reason and e.metrics.get("val_loss") != 0.5
    assert c.pointer("best").name == "checkpoint-10"
    code, listed = _listed(root, tmp_path, "val_loss")
    assert code == 1 and listed["checkpoint-20"]["status"] == "corrupt", listed
    assert "manifest.json" in listed["checkpoint-20"]["reason"]
    # the trainer's own load and the daemon's resume choice pass it over (best too)
    for which in ("latest", "best"):
        m2, opt2, sched2 = make_state(seed=3)
        loaded = CheckpointManager(root).load(which, model=m2, optimizer=opt2, scheduler=sched2)
        assert loaded.step == 10, which
    chosen, _, notes = choose_resume_all({"": cat.scan(root, PATTERNS)}, set(), {})
    assert chosen is not None and chosen.name == "checkpoint-10", notes


def test_any_flipped_byte_of_manifest_json_is_caught(tmp_path):
    """Every byte of the manifest, one at a time (whitespace, key names, the seal itself): never complete."""
    root = tmp_path / "ck"
    _two_native(root)
    f = root / "checkpoint-20" / "manifest.json"
    raw = f.read_bytes()
    for i in range(len(raw)):
        f.write_bytes(raw[:i] + bytes([raw[i] ^ 0x01]) + raw[i + 1:])
        status, reason, _ = mf.check_native(f.parent, verify=False)
        assert status != "complete" and "manifest.json" in reason, (i, raw[max(0, i - 20):i + 20], status, reason)
    f.write_bytes(raw)
    assert mf.check_native(f.parent, verify=True)[0] == "complete"


@pytest.mark.parametrize("how", ["metric", "byte"])
def test_a_damaged_sidecar_manifest_is_caught_and_never_chosen(tmp_path, how):
    """A Hugging Face run whose older checkpoint is the best: a sidecar whose recorded eval_loss is changed
    to make the newer one look best, or with any byte flipped, makes that checkpoint corrupt."""
    root = tmp_path / "ck"
    root.mkdir()
    for s, loss in ((100, 0.4), (200, 0.9)):
        hf_folder(root, s, state={"log_history": [{"step": s, "eval_loss": loss}]})
    record_all(root, PATTERNS)
    c = cat.scan(root, PATTERNS, verify=True, now=LATER, best_metric="eval_loss")
    assert c.pointer("best").name == "checkpoint-100" and c.by_name("checkpoint-200").recorded
    sc = foreign.sidecar_path(root, "checkpoint-200")
    raw = sc.read_bytes()
    if how == "metric":
        i = raw.index(b'"eval_loss": 0.9') + len(b'"eval_loss": 0.')
        flip_byte(sc, i, ord("9") ^ ord("1"))  # 0.9 -> 0.1: still a sidecar that parses
        assert b'"eval_loss": 0.1' in sc.read_bytes()
    else:
        flip_byte(sc, len(raw) // 3, 0x20)
    for verify in (True, False):
        c = cat.scan(root, PATTERNS, verify=verify, now=LATER, best_metric="eval_loss")
        e = c.by_name("checkpoint-200")
        assert e.status == "corrupt" and "checkpoint-200.json" in e.reason, (verify, e)
        assert c.pointer("best").name == "checkpoint-100"
        assert cat.verify_entry(e).status == "corrupt"
    code, listed = _listed(root, tmp_path, "eval_loss")
    assert code == 1 and listed["checkpoint-200"]["status"] == "corrupt", listed
    with pytest.raises(foreign.SidecarDamaged) as exc:
        foreign.read_sidecar(root, "checkpoint-200")
    assert exc.value.status == "corrupt" and "checkpoint-200.json" in str(exc.value)
    chosen, _, notes = choose_resume_all({"": cat.scan(root, PATTERNS, now=LATER)}, set(), {})
    assert chosen is not None and chosen.name == "checkpoint-100", notes


def test_an_old_manifest_without_a_seal_still_loads_and_says_so_once(tmp_path, caplog):
    root = tmp_path / "ck"
    _two_native(root)
    for name in ("checkpoint-10", "checkpoint-20"):
        m = json.loads((root / name / "manifest.json").read_text())
        assert mf.SEAL in m  # what this version writes
        write_manifest(root / name, m, sealed=False)  # what versions before the seal wrote
    mf._unsealed_said.clear()
    with caplog.at_level(logging.INFO, logger="ckpt_daemon.store.manifest"):
        c = cat.scan(root, PATTERNS, verify=True, best_metric="val_loss")
        assert [e.status for e in c.entries] == ["complete", "complete"]
        assert c.pointer("best").name == "checkpoint-10"
        state = read_checkpoint(root / "checkpoint-20")
        assert state["manifest"]["step"] == 20
    said = [r for r in caplog.records if "without a digest of its own" in r.getMessage()]
    assert len(said) == 1, caplog.text
    # and an unsealed manifest still checks its files' checksums
    f = root / "checkpoint-20" / "model.safetensors"
    flip_byte(f, f.stat().st_size - 1, 1)
    assert mf.check_native(root / "checkpoint-20", verify=True)[0] == "corrupt"
