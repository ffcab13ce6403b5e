"""The same `which` names the same checkpoint for every command (ckpt_daemon/store/resolve.py).

One table, every caller that resolves a checkpoint, every layout: the trainer's load
(`CheckpointManager`), the supervisor's resume choice, the integrations' newest verified checkpoint,
`consolidate --from`, a snapshot's roles, `status` and `list`'s marks, and `restore --from` a replica.
Each folder holds three steps and is settled (its files an hour old, as a run's are by the time
anyone resolves them). The cases a user trips over are in it: `best` where nothing records a best, a
step that exists only as Lightning's `-v1` re-save, a step that has both, and a path."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from ckpt_daemon.checkpoint import CheckpointManager
from ckpt_daemon.config import load_config
from ckpt_daemon.errors import NoValidCheckpoint
from ckpt_daemon.integrations import common
from ckpt_daemon.remote import download
from ckpt_daemon.remote.listing import RemoteCatalog, Replica
from ckpt_daemon.store import catalog as cat
from ckpt_daemon.store import manifest as mf
from ckpt_daemon.store import resolve as rs
from daemon import supervisor
from maintenance import consolidate, snapshot
from tests.helpers import hf_folder, single_file, tiny_model, write_config, write_manifest

NONE = None  # "names nothing here": every caller must say so, none may fall back to another checkpoint


def _native(root: Path, with_best: bool) -> None:
    import torch

    m = tiny_model()
    opt = torch.optim.AdamW(m.parameters())
    mgr = CheckpointManager(root)
    for step, loss in ((10, 1.0), (20, 0.5), (30, 0.9)):
        mgr.save(step, model=m, optimizer=opt, metrics={"val_loss": loss})
    mgr.close()
    assert os.readlink(root / "best") == "checkpoint-20"
    if not with_best:  # a run whose trainer records no best, with no metric to choose one by
        (root / "best").unlink()
        for d in root.glob("checkpoint-*"):
            m_ = json.loads((d / mf.MANIFEST).read_bytes())
            m_["metrics"] = {"accuracy": 0.5}
            write_manifest(d, m_)


def _hf(root: Path, with_best: bool) -> None:
    for step in (10, 20):
        hf_folder(root, step)
    hf_folder(root, 30, state={"best_model_checkpoint": str(root / "checkpoint-20")} if with_best else {})


def _lightning(root: Path, with_best: bool) -> None:
    # step 20 exists only as a re-save (-v1); step 30 as the save and its re-save
    for name in ("epoch=0-step=10.ckpt", "epoch=0-step=20-v1.ckpt", "epoch=1-step=30.ckpt", "epoch=1-step=30-v1.ckpt"):
        single_file(root, name)


def _plain(root: Path, with_best: bool) -> None:
    for step in (10, 20, 30):
        single_file(root, f"model_step_{step}.pt")


LAYOUTS = {"native": _native, "hf": _hf, "lightning": _lightning, "plain": _plain}
PATTERNS = ["checkpoint-{step}", "epoch={epoch}-step={step}.ckpt", "model_step_{step}.pt"]
# layout, has a best record -> {which: the name it must resolve to}
TABLE = {
    ("native", True): {"latest": "checkpoint-30", "best": "checkpoint-20", "20": "checkpoint-20",
                       "path:checkpoint-10": "checkpoint-10"},
    ("native", False): {"latest": "checkpoint-30", "best": NONE, "10": "checkpoint-10"},
    ("hf", True): {"latest": "checkpoint-30", "best": "checkpoint-20", "20": "checkpoint-20",
                   "path:checkpoint-10": "checkpoint-10"},
    ("hf", False): {"latest": "checkpoint-30", "best": NONE},
    ("lightning", False): {"latest": "epoch=1-step=30-v1.ckpt", "best": NONE, "20": "epoch=0-step=20-v1.ckpt",
                           "30": "epoch=1-step=30-v1.ckpt", "10": "epoch=0-step=10.ckpt",
                           "path:epoch=1-step=30.ckpt": "epoch=1-step=30.ckpt"},
    ("plain", False): {"latest": "model_step_30.pt", "best": NONE, "20": "model_step_20.pt",
                       "path:model_step_10.pt": "model_step_10.pt"},
}
CASES = [(layout, best, which, want) for (layout, best), rows in TABLE.items() for which, want in rows.items()]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    out = {}
    for (layout, with_best) in TABLE:
        root = tmp_path_factory.mktemp(f"{layout}-{'best' if with_best else 'nobest'}") / "checkpoints"
        root.mkdir()
        LAYOUTS[layout](root, with_best)
        old = time.time() - 3600  # settled: written an hour ago
        for p in [root, *root.rglob("*")]:
            if not p.is_symlink():
                os.utime(p, (old, old))
        cfg_path = write_config(root.parent, {"checkpoints": {"dir": str(root), "pattern": PATTERNS},
                                              "trainer": {"best_metric": "val_loss"}})
        out[(layout, with_best)] = (root, load_config(cfg_path))
    return out


def _arg(which: str, root: Path) -> str:
    return str(root / which.removeprefix("path:")) if which.startswith("path:") else which


def _answers(root: Path, cfg, which: str) -> dict[str, object]:
    """What each caller takes `which` to name: a checkpoint's name, or NONE when it says there is none."""
    w = _arg(which, root)
    got: dict[str, object] = {}
    c = cat.scan_config(cfg)

    def name_or_none(f):
        try:
            return f()
        except (NoValidCheckpoint, ValueError):
            return NONE

    got["store.resolve"] = name_or_none(lambda: rs.resolve(c, w, patterns=PATTERNS)[1].name)

    def manager():  # the trainer's load: what it reads first, else (no native one) what it passes over first
        mgr = CheckpointManager(root, patterns=PATTERNS, best_metric=cfg.trainer.best_metric)
        out, skipped = mgr.candidates(w)
        return out[0].name if out else skipped[0][0]
    got["CheckpointManager.candidates"] = name_or_none(manager)
    got["consolidate --from"] = name_or_none(lambda: consolidate._pick(cfg, w)[1].name)
    if which in ("latest", "best"):
        roles = snapshot._select(c, ["latest", "best"])
        got["snapshot"] = next((n for n, r in roles.items() if which in r), NONE)
        got["status"] = (e.name if (e := rs.named_or_none(c, which)) else NONE)
        got["list marks"] = rs.roles(c)[which]
        reps = [Replica(e.name, e.step, e.status, manifest={"layout": e.layout, "metrics": e.metrics})
                for e in c.entries]
        best = c.pointers.get("best")
        rc = RemoteCatalog("s3://b/run", reps, {}, {}, {"best": best} if best else {})
        got["restore --from replica"] = name_or_none(lambda: download.choose(rc, which, PATTERNS)[0].name)
    if which == "latest":
        got["supervisor resume"] = (e.name if (e := supervisor.choose_resume(c, set(), {}, verify=cat.verify_entry)[0])
                                    else NONE)
        got["integrations resume_path"] = (p.name if (p := common.newest_valid(root, PATTERNS)) else NONE)
    elif which.isdigit():
        reps = [Replica(e.name, e.step, e.status, manifest={"layout": e.layout}) for e in c.entries]
        rc = RemoteCatalog("s3://b/run", reps, {}, {}, {})
        got["restore --from replica"] = name_or_none(lambda: download.choose(rc, which, PATTERNS)[0].name)
    return got


@pytest.mark.parametrize("layout,with_best,which,want", CASES,
                         ids=[f"{lay}-{'best' if b else 'nobest'}-{w}" for lay, b, w, _ in CASES])
def test_the_same_which_names_the_same_checkpoint_for_every_caller(folders, layout, with_best, which, want):
    root, cfg = folders[(layout, with_best)]
    got = _answers(root, cfg, which)
    wrong = {caller: name for caller, name in got.items() if name != want}
    assert not wrong, f"{which!r} in a {layout} folder should name {want}; these callers disagree: {wrong}"


def test_a_damaged_newest_is_not_latest_for_anyone_and_a_step_walks_back_only_for_loading(tmp_path):
    """The newest native checkpoint loses a file: `latest` is the one before it everywhere (list marks
    it, status shows it, resume takes it); the damaged step named on its own is reported as damaged by
    consolidate, and the trainer's load walks back from it to the previous valid one."""
    root = tmp_path / "checkpoints"
    root.mkdir()
    _native(root, True)
    (root / "checkpoint-30" / "model.safetensors").unlink()
    cfg = load_config(write_config(tmp_path, {"checkpoints": {"dir": str(root), "pattern": PATTERNS}}))
    with pytest.raises(NoValidCheckpoint, match=r"no valid .* checkpoint at step 30.*checkpoint-30 is incomplete"):
        consolidate._pick(cfg, "30")
    out, skipped = CheckpointManager(root).candidates("30")
    assert [e.name for e in out] == ["checkpoint-20", "checkpoint-10"] and skipped[0][0] == "checkpoint-30"
    got = _answers(root, cfg, "latest")  # last: the supervisor's choice moves the damaged one to quarantine
    assert set(got.values()) == {"checkpoint-20"}, {k: v for k, v in got.items() if v != "checkpoint-20"}


def test_which_is_read_one_way_and_anything_else_is_refused_with_what_to_pass():
    assert rs.parse_which("latest") == "latest" and rs.parse_which("0042") == 42 and rs.parse_which(7) == 7
    assert rs.parse_which("./x") == Path("./x") and rs.parse_which(Path("a")) == Path("a")
    for bad in ("٣", "１２", "-1", "", "lastest", True, -3, "1" * 16):
        with pytest.raises(rs.Unresolved, match="not understood|not a step") as exc:
            rs.parse_which(bad)
        assert exc.value.kind == "not_understood"
    assert rs.parse_which("epoch=1-step=30.ckpt", names=True) == "epoch=1-step=30.ckpt"
