from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable

# A model small enough that a test run takes seconds, big enough to learn.
TINY_TRAINER = {
    "seed": 7,
    "batch_size": 8,
    "learning_rate": 0.003,
    "warmup_steps": 5,
    "checkpoint_every_steps": 5,
    "eval_every_steps": 10,
    "eval_batches": 2,
    "log_every_steps": 5,
    "threads": 1,
    "model": {"n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 32},
    "data": {"synthetic_chars": 20000},
}


def deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def write_config(folder: Path, overrides: dict | None = None, tiny: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    data = {"trainer": dict(TINY_TRAINER)} if tiny else {}
    data = deep_merge(data, overrides or {}) or {"checkpoints": {"dir": "checkpoints"}}  # an empty file is refused
    p = folder / "config.yaml"
    p.write_text(yaml.safe_dump(data, sort_keys=False))
    return p


def env_for_children() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    env["OMP_NUM_THREADS"] = "1"
    return env


def run_py(args: list[str], timeout: float = 300, check: bool = False, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run([PY, *args], capture_output=True, text=True, timeout=timeout, env=kw.pop("env", env_for_children()),
                       stdin=kw.pop("stdin", subprocess.DEVNULL), **kw)
    if check and r.returncode != 0:
        raise AssertionError(f"{args} exited {r.returncode}\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}")
    return r


def same_nested(a, b) -> bool:
    """Deep equality of nested state (optimizer, scheduler, RNG): every tensor compared element by
    element with torch.equal (str() would elide large tensors), every other value with ==."""
    import torch

    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype and \
            a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return list(a) == list(b) and all(same_nested(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same_nested(x, y) for x, y in zip(a, b))
    return a == b


def read_losses(metrics: Path) -> dict[int, float]:
    """step -> loss, the last record per step (a resumed run re-logs the steps after its checkpoint)."""
    out = {}
    for line in metrics.read_text().splitlines():
        r = json.loads(line)
        out[r["step"]] = r["loss"]
    return out


@pytest.fixture
def tmpfs(tmp_path):
    """A real small filesystem, to get a real ENOSPC. Needs root (CI and developers run as root here)."""
    mounted = []

    def make(size: str = "16m", options: str = "") -> Path:
        if os.geteuid() != 0 or shutil.which("mount") is None:
            pytest.skip("mounting a tmpfs needs root and mount(8); this machine lacks them")
        d = tmp_path / f"tmpfs{len(mounted)}"
        d.mkdir()
        opts = f"size={size}" + (f",{options}" if options else "")
        subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(d)], check=True)
        mounted.append(d)
        return d

    yield make
    for d in mounted:
        subprocess.run(["umount", "-l", str(d)], check=False)


@pytest.fixture
def btrfs(tmp_path):
    """A real loop-mounted btrfs (a filesystem with reflinks). Needs root, mkfs.btrfs and loop devices."""
    mounted = []

    def make(size: str = "256M") -> Path:
        if os.geteuid() != 0 or shutil.which("mkfs.btrfs") is None:
            pytest.skip("a btrfs loop mount needs root and mkfs.btrfs (btrfs-progs); this machine lacks them")
        img, d = tmp_path / "btrfs.img", tmp_path / "btrfs"
        d.mkdir()
        subprocess.run(["truncate", "-s", size, str(img)], check=True)
        subprocess.run(["mkfs.btrfs", "-q", str(img)], check=True, capture_output=True)
        r = subprocess.run(["mount", "-o", "loop", str(img), str(d)], capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"this machine cannot loop-mount btrfs: {r.stderr.strip()}")
        mounted.append(d)
        return d

    yield make
    for d in mounted:
        subprocess.run(["umount", str(d)], check=False)
