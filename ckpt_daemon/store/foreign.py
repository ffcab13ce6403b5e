"""Checkpoints other trainers write (Hugging Face, Lightning, plain torch.save scripts): what they say
about themselves, and the sidecar manifests that give them the integrity native checkpoints have.

What they say: a Hugging Face `checkpoint-<step>/` folder's trainer_state.json (global_step, epoch,
best_model_checkpoint, best_metric, log_history); a torch.save file's own step, epoch, metrics and
Lightning's ModelCheckpoint state, read by `torchzip` without torch and without unpickling.

Sidecar manifests: once a foreign checkpoint has settled (no file changed for `settle_s`, no writer
has it open), the daemon records the size, mtime and sha256 of every file in
`<folder>/.ckpt-daemon/manifests/<name>.json` (never inside the checkpoint itself). From then on damage
anywhere in it (a truncated optimizer.pt, a flipped byte in model.safetensors) is caught by
`list --verify`, the resume choice and snapshot/restore, exactly as for native checkpoints.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import time
from pathlib import Path
from typing import Any, Optional

from ckpt_daemon import runtime
from ckpt_daemon.fsutil import (
    atomic_write_bytes,
    default_checksum,
    digest_record,
    hash_file,
    loads_json_bounded,
    read_bytes_bounded,
    record_checksum,
)
from ckpt_daemon.store import manifest as mf
from ckpt_daemon.store import torchzip
from ckpt_daemon.store.names import Status
from ckpt_daemon.store.problems import Kind, Problem

SIDECARS = "manifests"
SIDECAR_FORMAT = "ckpt-daemon-sidecar/1"
TRAINER_STATE_MAX = 64 << 20
HF_TORCH_FILES = ("optimizer.pt", "scheduler.pt", "scaler.pt", "training_args.bin")
MAX_FILES = 100_000
METRIC_KEYS = ("loss", "eval_loss", "val_loss", "eval_accuracy", "accuracy", "learning_rate", "grad_norm")
NOT_METRICS = ("_runtime", "_per_second")  # eval_runtime, eval_samples_per_second: timings, not results
MAX_METRICS = 16
SIDECAR_MAX_BYTES = 64 << 20


def _num(v: Any) -> Optional[float]:
    if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) != float("inf"):
        return float(v)
    return None


# ------------------------------------------------------------------------------------- Hugging Face
def read_trainer_state(folder: Path) -> dict:
    """trainer_state.json, parsed and type-checked into what the catalog needs. Raises ValueError."""
    raw = loads_json_bounded(read_bytes_bounded(folder / "trainer_state.json", TRAINER_STATE_MAX),
                             "trainer_state.json")
    if not isinstance(raw, dict):
        raise ValueError("trainer_state.json is not a JSON object")
    out: dict = {}
    gs = raw.get("global_step")
    if mf.is_step(gs):
        out["step"] = gs
    ep = _num(raw.get("epoch"))
    if ep is not None and 0 <= ep < 1e9:
        out["epoch_float"] = ep
        out["epoch"] = int(ep)
    bmc = raw.get("best_model_checkpoint")
    if isinstance(bmc, str) and 0 < len(bmc) < 4096:
        out["best_model_checkpoint"] = bmc
    bm = _num(raw.get("best_metric"))
    if bm is not None:
        out["best_metric"] = bm
    # This checkpoint's own metrics: the log_history records of its step (a training log, an evaluation).
    # Not best_metric: that is the run's best so far, another checkpoint's value (kept in meta for "best").
    metrics: dict[str, float] = {}
    hist = raw.get("log_history")
    if isinstance(hist, list):
        for rec in hist[-200:]:  # the records of this step are the last ones
            if isinstance(rec, dict) and rec.get("step") == out.get("step"):
                for k in [*METRIC_KEYS, *sorted(k for k in rec if isinstance(k, str) and k.startswith("eval_"))]:
                    v = _num(rec.get(k))
                    if v is not None and len(metrics) < MAX_METRICS and len(k) <= 64 and not k.endswith(NOT_METRICS):
                        metrics[k] = v
    out["metrics"] = metrics
    return out


def describe_hf(folder: Path, stats: dict[str, os.stat_result], verify: bool) -> tuple[str, str, dict]:
    """(status, reason, meta) of a Hugging Face checkpoint folder, from its structure alone."""
    if "trainer_state.json" not in stats:
        return "incomplete", "no trainer_state.json (a Hugging Face save that did not finish)", {}
    try:
        meta = read_trainer_state(folder)
    except (OSError, ValueError) as exc:
        return "incomplete", f"trainer_state.json is unreadable ({str(exc)[:120]})", {}
    weights = sorted(n for n in stats if (n.endswith(".safetensors") or n.endswith(".bin")) and n != "training_args.bin")
    if not weights:
        return "incomplete", "no weights file (model.safetensors or pytorch_model.bin)", meta
    if "model.safetensors.index.json" in stats:
        problem = _index_problem(folder, stats)
        if problem:
            return "incomplete", problem, meta
    torch_files = [n for n in stats if n in HF_TORCH_FILES or (n.startswith("rng_state") and n.endswith(".pth"))]
    for n in [*weights, *sorted(torch_files)]:
        if not stat.S_ISREG(stats[n].st_mode):
            return "corrupt", f"{n} is not a regular file (symlinks are not followed)", meta
        p = folder / n
        problem = _weights_problem(p, stats[n].st_size) if n.endswith(".safetensors") else torchzip.find_problem(p, verify)
        if problem:
            # a part of a Hugging Face save that fails its CRC is damage; any other problem, a save that did not finish
            return (Status.CORRUPT if problem.kind is Kind.CORRUPT else Status.INCOMPLETE), f"{n}: {problem.message}", meta
    meta["has_optimizer"] = "optimizer.pt" in stats
    return "complete", "", meta


def _weights_problem(path: Path, size: int) -> Optional[Problem]:
    """A safetensors file's structural problem: a header or layout that does not add up is an
    unfinished write (it holds no checksums to fail)."""
    why = mf.safetensors_problem(path, size)
    return None if why is None else Problem(Kind.INCOMPLETE, why)


def _index_problem(folder: Path, stats: dict) -> Optional[str]:
    try:
        idx = loads_json_bounded(read_bytes_bounded(folder / "model.safetensors.index.json", 16 << 20),
                                 "model.safetensors.index.json")
        shards = set(idx["weight_map"].values()) if isinstance(idx, dict) and isinstance(idx.get("weight_map"), dict) else None
    except (OSError, ValueError, TypeError):
        return "model.safetensors.index.json is unreadable"
    if shards is None or not all(isinstance(s, str) for s in shards):
        return "model.safetensors.index.json has no weight map"
    missing = sorted(s for s in shards if s not in stats)
    return f"weight shard {missing[0]} is missing" if missing else None


# -------------------------------------------------------------------------------------- torch files
def describe_file(path: Path, verify: bool) -> tuple[str, str, dict]:
    """(status, reason, meta) of a torch.save file: structure (and CRCs with verify), and what it
    says about itself."""
    try:
        info = torchzip.inspect(path, verify_crc=verify)
    except torchzip.TorchZipError as exc:
        # its kind: a timeout is unreadable (not told apart in time: never taken for damage, never used);
        # past a bound (more work than any real checkpoint needs) or not a torch.save file, invalid; a
        # failing CRC, corrupt; anything else, incomplete
        return exc.kind.status, f"{path.name}: {exc}", {}
    meta: dict = {"kind": info.kind, "has_optimizer": info.has_optimizer, "state_dict_key": info.state_dict_key,
                  "metrics": {k: v for k, v in info.metrics.items() if _num(v) is not None}}
    if info.format == "legacy":
        meta["note"] = "torch's legacy format: no checksums inside, its structure was checked whole"
    if info.step is not None:
        meta["step"] = info.step
    if info.epoch is not None:
        meta["epoch"] = info.epoch
    if info.lightning is not None:
        for mc in info.lightning.model_checkpoints:
            if mc.best_model_path:
                meta["best_model_path"] = mc.best_model_path
                if mc.best_model_score is not None and _num(mc.best_model_score) is not None:
                    meta["best_model_score"] = float(mc.best_model_score)
                if mc.monitor:
                    meta["monitor"] = str(mc.monitor)[:64]
                break
    return "complete", "", meta


# ---------------------------------------------------------------------------------------- sidecars
def entry_files(path: Path) -> dict[str, os.stat_result]:
    """Relative path -> lstat of every file of a checkpoint (a file, or a folder walked without following
    symlinks). Symlinks are listed too, so that a check can refuse them."""
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        return {"": st}
    out: dict[str, os.stat_result] = {}
    for root, dirs, files in os.walk(path, followlinks=False):
        rel_root = os.path.relpath(root, path)
        for n in files + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            rel = n if rel_root == "." else os.path.join(rel_root, n)
            try:
                out[rel] = os.lstat(os.path.join(root, n))
            except FileNotFoundError:
                continue
            if len(out) > MAX_FILES:
                raise ValueError(f"it holds more than {MAX_FILES} files; no checkpoint does")
    return out


def newest_mtime(files: dict[str, os.stat_result]) -> float:
    return max((s.st_mtime for s in files.values()), default=0.0)


def sidecar_path(root: Path, name: str) -> Path:
    return Path(root) / runtime.STATE_DIR / SIDECARS / f"{name}.json"


class SidecarDamaged(ValueError):
    """A sidecar manifest exists but cannot be trusted: it fails its own digest, does not parse, or cannot
    be read. `status` is what that makes its checkpoint: corrupt, or unreadable (an I/O error). The
    checkpoint is never judged afresh by its structure then: the record of its bytes is what was lost."""

    def __init__(self, message: str, status: str = "corrupt"):
        super().__init__(message)
        self.status = status


def sidecar_label(name: str) -> str:
    """How reasons name a sidecar: its path inside the checkpoint folder."""
    return f"{runtime.STATE_DIR}/{SIDECARS}/{name}.json"


def read_sidecar(root: Path, name: str) -> Optional[dict]:
    """The sidecar manifest of checkpoint `name`, None if it has none. Raises SidecarDamaged (a
    ValueError) for one that exists but is damaged: its own digest fails, it does not parse, or its
    records are malformed."""
    label = sidecar_label(name)
    try:
        raw = read_bytes_bounded(sidecar_path(root, name), SIDECAR_MAX_BYTES)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise SidecarDamaged(f"{label} cannot be read ({exc.strerror or exc})", "unreadable") from None
    except ValueError as exc:
        raise SidecarDamaged(f"{label}: {exc}") from None
    try:
        sc = loads_json_bounded(raw, label)
        problem = mf.seal_problem(raw, sc, label)
    except mf.ManifestUnverifiable as exc:
        raise SidecarDamaged(str(exc), "unreadable") from None
    except ValueError as exc:
        raise SidecarDamaged(str(exc)) from None
    if problem:
        raise SidecarDamaged(problem)
    if not isinstance(sc, dict) or sc.get("format") != SIDECAR_FORMAT or not isinstance(sc.get("files"), dict):
        raise SidecarDamaged(f"{label} is not a sidecar manifest of a known format")
    ok = all(isinstance(k, str) and isinstance(v, dict) and isinstance(v.get("size"), int) and _checksum_ok(v)
             for k, v in sc["files"].items())
    if not ok:
        raise SidecarDamaged(f"{label} has a malformed file record")
    return sc


def _checksum_ok(rec: dict) -> bool:
    try:
        record_checksum(rec)
        return True
    except ValueError:
        return False


def _matches(path: Path, rec: dict) -> bool:
    """The file's checksum equals the recorded one (sha256 in sidecars before 0.3, blake3 since)."""
    algo, want = record_checksum(rec)
    return hash_file(path, algo) == want


class NotSettled(Exception):
    """A file changed while it was being recorded: a writer is still at work."""


def record(root: Path, name: str, path: Path, layout: str, step: int, meta: dict) -> dict:
    """Hash every file of a settled foreign checkpoint and keep the result as its sidecar manifest."""
    before = entry_files(path)
    if any(stat.S_ISLNK(s.st_mode) for s in before.values()):
        raise ValueError("it contains a symlink (never followed)")
    files = {}
    algo = default_checksum()
    for rel, s in sorted(before.items()):
        digest = hash_file(path / rel if rel else path, algo)
        files[rel] = {"size": s.st_size, "mtime_ns": s.st_mtime_ns, **digest_record(algo, digest)}
    after = entry_files(path)
    if {k: (s.st_size, s.st_mtime_ns) for k, s in after.items()} != {k: (s.st_size, s.st_mtime_ns) for k, s in before.items()}:
        raise NotSettled(f"{name} changed while it was being recorded")
    return write_sidecar(root, name, path, layout, step, meta, files)


def write_sidecar(root: Path, name: str, path: Path, layout: str, step: int, meta: dict, files: dict) -> dict:
    """Keep `files` (relative path -> size, mtime_ns and checksum fields) as the sidecar manifest of the
    checkpoint `name`, whose folder or file is `path` now (its device and inode are recorded: a rename
    into place keeps them). Used by `record`, and by the daemon for a checkpoint it writes itself from
    memory, whose checksums it has already."""
    est = os.lstat(path)
    sc = {"format": SIDECAR_FORMAT, "name": name, "layout": layout, "step": step, "recorded": time.time(),
          "entry": {"dev": est.st_dev, "ino": est.st_ino}, "files": files,
          "digest": hashlib.sha256("".join(f"{k}\0{record_checksum(v)[1]}\n" for k, v in sorted(files.items())).encode()).hexdigest(),
          "meta": meta}
    algo = default_checksum()
    data = mf.seal_json(sc, algo, lambda o: (json.dumps(o, indent=2, default=str) + "\n").encode())
    atomic_write_bytes(runtime.state_dir(root, SIDECARS) / f"{name}.json", data)
    return sc


def forget(root: Path, name: str) -> None:
    try:
        os.unlink(sidecar_path(root, name))
    except OSError:
        pass


def compare(sc: dict, path: Path, files: dict[str, os.stat_result], verify: bool,
            same_entry: bool = True) -> tuple[str, str]:
    """Check a foreign checkpoint against its sidecar: ("ok" | "stale" | "resaved" | "corrupt", reason).

    stale: the name now holds another folder or file (e.g. a step written again after quarantine);
    resaved: every file was rewritten after the recording and sizes may differ (the trainer saved that
    step again); corrupt: some files changed, vanished or appeared, or (with verify) a checksum fails.
    same_entry=False checks a copy (a snapshot, a restore) against the original's sidecar: only sizes
    and checksums count."""
    rec = sc["files"]
    if not same_entry:
        files = {k: v for k, v in files.items()}
        if set(files) != set(rec):
            return "corrupt", "its files differ from the recorded ones"
        for k in sorted(files):
            if files[k].st_size != rec[k]["size"] or (verify and not _matches(path / k if k else path, rec[k])):
                return "corrupt", f"{k or path.name} differs from the recorded checksum"
        return "ok", ""
    est = os.lstat(path)
    if sc.get("entry") != {"dev": est.st_dev, "ino": est.st_ino}:
        return "stale", ""
    if set(files) != set(rec):
        gone, new = sorted(set(rec) - set(files)), sorted(set(files) - set(rec))
        if gone:
            return "corrupt", f"{gone[0] or path.name} is missing since it was recorded"
        return "corrupt", f"{new[0]} appeared after it was recorded"
    changed = [k for k, s in files.items() if s.st_size != rec[k]["size"] or s.st_mtime_ns != rec[k].get("mtime_ns")]
    if changed and len(changed) == len(files) and all(files[k].st_mtime > sc.get("recorded", 0) for k in files):
        return "resaved", ""
    for k in changed:
        if files[k].st_size != rec[k]["size"]:
            return "corrupt", f"{k or path.name} has {files[k].st_size} bytes, {rec[k]['size']} when it was recorded"
    if changed and not verify:
        return "corrupt", f"{changed[0] or path.name} was modified after it was recorded (list --verify checks its bytes)"
    if verify:
        for k in sorted(files):
            if not _matches(path / k if k else path, rec[k]):
                return "corrupt", f"{k or path.name} fails its recorded checksum (damaged after it was saved)"
    return "ok", ""
