"""Where and how the built-in trainer computes: pure decisions, no torch import.

What the machine has (`Present`: CUDA or not, how many GPUs, whether they do bf16) and what the job is
(torchrun's LOCAL_RANK / LOCAL_WORLD_SIZE) go in; the device, the process-group backend and the precision
settings come out, or a `DeviceError` whose message names the cause and the fix. The trainer asks torch
for `Present` (ckpt_daemon/devio.py) and applies the decisions; the tests check every decision on a CPU
machine by passing what a GPU machine would report. The daemon imports this module too (it shows the
device the trainer reports in its heartbeat, `heartbeat_device`), so it must never import torch.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from ckpt_daemon.errors import EXIT_USAGE, CkptError
from ckpt_daemon.store import dtypes

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("fp32", "bf16", "fp16")
# Deterministic cuBLAS needs a fixed workspace; torch's documentation gives these two values. Set before the
# first cuBLAS handle is made (the trainer's first matmul on the GPU).
CUBLAS_WORKSPACE = ":4096:8"
CUBLAS_WORKSPACE_VALUES = (":4096:8", ":16:8")


class DeviceError(CkptError):
    """The configured device or precision cannot be used on this machine or in this job."""

    exit_code = EXIT_USAGE


@dataclass(frozen=True)
class Present:
    """What torch reports about the machine (devio.present() asks it)."""

    cuda: bool = False  # torch.cuda.is_available()
    gpus: int = 0  # torch.cuda.device_count() (CUDA_VISIBLE_DEVICES applied)
    bf16: bool = False  # torch.cuda.is_bf16_supported() on the chosen GPU
    cpu_fp16_scaler: bool = False  # torch.amp.GradScaler("cpu") exists (torch >= 2.3)


@dataclass(frozen=True)
class Job:
    """The process's place in a job, from torchrun's environment."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1

    @property
    def distributed(self) -> bool:
        return self.world > 1


@dataclass(frozen=True)
class Placement:
    """Where this process trains: `device` ("cpu" or "cuda:<i>"), the torch.distributed backend (None
    when the job has one process) and the precision settings."""

    device: str
    backend: Optional[str]
    precision: str
    autocast_dtype: Optional[str]  # "bfloat16" | "float16" | None (fp32: no autocast)
    grad_scaler: bool  # fp16 only: loss scaling against underflow; its state is saved with the checkpoint
    deterministic: bool

    @property
    def device_type(self) -> str:
        return self.device.split(":", 1)[0]

    @property
    def index(self) -> Optional[int]:
        return int(self.device.split(":", 1)[1]) if ":" in self.device else None


def _int_env(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        v = int(raw)
    except ValueError:
        raise DeviceError(f"${name} is {raw[:40]!r}, not a whole number; it is set by torchrun. Start the trainer with "
                          "torchrun (or python -m trainer for one process) without setting it by hand.") from None
    if not 0 <= v < 1 << 20:
        raise DeviceError(f"${name} is {v}, out of range; it is set by torchrun. Start the trainer with torchrun "
                          "(or python -m trainer for one process) without setting it by hand.")
    return v


def job_from_env(env: Mapping[str, str] = os.environ) -> Job:
    """torchrun's RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE (a single process without them)."""
    world = max(1, _int_env(env, "WORLD_SIZE", 1))
    rank = _int_env(env, "RANK", 0)
    local_rank = _int_env(env, "LOCAL_RANK", rank)
    local_world = max(1, _int_env(env, "LOCAL_WORLD_SIZE", world))
    if rank >= world or local_rank >= local_world:
        raise DeviceError(f"RANK={rank} / WORLD_SIZE={world}, LOCAL_RANK={local_rank} / LOCAL_WORLD_SIZE={local_world} "
                          "do not fit together. Start the job with torchrun, which sets them.")
    return Job(rank, world, local_rank, local_world)


def backend_for(device_type: str) -> str:
    """NCCL for processes on GPUs, gloo on CPUs: NCCL cannot move CPU tensors (its collectives fail with
    'invalid usage'), gloo cannot use a GPU efficiently."""
    return "nccl" if device_type == "cuda" else "gloo"


def place(device: str, precision: str, deterministic: bool, present: Present, job: Job = Job()) -> Placement:
    """The trainer's placement for `trainer.device`, `trainer.precision` and `trainer.deterministic` on
    a machine with `present`, for a process at `job`. Raises DeviceError for what cannot work."""
    if device not in DEVICES:
        raise DeviceError(f"trainer.device is {device!r}; use auto, cpu or cuda.")
    if precision not in PRECISIONS:
        raise DeviceError(f"trainer.precision is {precision!r}; use fp32, bf16 or fp16.")
    use_cuda = device == "cuda" or (device == "auto" and present.cuda and present.gpus > 0)
    if use_cuda:
        if not present.cuda or present.gpus == 0:
            raise DeviceError("trainer.device is cuda, but torch sees no CUDA GPU here (torch.cuda.is_available() is "
                              "False: no GPU, no driver, a CPU-only torch, or CUDA_VISIBLE_DEVICES hides them). Set "
                              "trainer.device: auto (CUDA when present) or cpu, or install a CUDA build of torch.")
        # One GPU per process: torchrun's local rank i trains on cuda:i.
        if job.local_world > present.gpus or job.local_rank >= present.gpus:
            raise DeviceError(
                f"This node runs {job.local_world} trainer processes but torch sees {present.gpus} GPU(s): the built-in "
                "trainer uses one GPU per process. Start torchrun with --nproc_per_node at most "
                f"{present.gpus}, or set trainer.device: cpu to train on the CPU.")
        dev = f"cuda:{job.local_rank}"
    else:
        dev = "cpu"
    dtype = None if precision == "fp32" else dtypes.PRECISIONS[precision]
    if use_cuda and precision == "bf16" and not present.bf16:
        raise DeviceError("trainer.precision is bf16, but this GPU does not support bfloat16 (it needs compute "
                          "capability 8.0 or newer). Use fp16 (with loss scaling) or fp32.")
    if not use_cuda and precision == "fp16" and not present.cpu_fp16_scaler:
        raise DeviceError("trainer.precision is fp16 on the CPU, which needs torch.amp.GradScaler('cpu') (torch 2.3 or "
                          "newer). Use bf16 or fp32 on the CPU, or upgrade torch.")
    return Placement(dev, backend_for("cuda" if use_cuda else "cpu") if job.distributed else None, precision, dtype,
                     precision == "fp16", bool(deterministic))


def deterministic_env(env: Mapping[str, str], placement: Placement) -> dict[str, str]:
    """Variables to set before the first CUDA kernel for deterministic kernels: cuBLAS's workspace
    (kept if the user set one of the two values torch documents)."""
    if not placement.deterministic or placement.device_type != "cuda":
        return {}
    if env.get("CUBLAS_WORKSPACE_CONFIG") in CUBLAS_WORKSPACE_VALUES:
        return {}
    return {"CUBLAS_WORKSPACE_CONFIG": CUBLAS_WORKSPACE}


# ------------------------------------------------------------------------- the heartbeat's device record
MAX_NAME = 120
_MEM_KEYS = ("allocated", "reserved", "total", "rss")


def _bytes(v: Any) -> Optional[int]:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, float) and not math.isfinite(v)):
        return None
    v = int(v)
    return v if 0 <= v < 1 << 60 else None


def _text(v: Any, limit: int = MAX_NAME) -> Optional[str]:
    if not isinstance(v, str):
        return None
    v = "".join(c for c in v[:limit] if c.isprintable())
    return v or None


def heartbeat_device(raw: Any) -> Optional[dict]:
    """The device record of a trainer's heartbeat, as the daemon shows it: only known fields of the right
    types and sizes (the heartbeat file is input like any other), None when there is none usable."""
    if not isinstance(raw, dict):
        return None
    device = _text(raw.get("device"), 32)
    if device is None:
        return None
    out: dict = {"device": device}
    for key in ("name", "precision"):
        if (v := _text(raw.get(key))) is not None:
            out[key] = v
    mem = raw.get("memory")
    if isinstance(mem, dict):
        clean = {k: b for k in _MEM_KEYS if (b := _bytes(mem.get(k))) is not None}
        if clean:
            out["memory"] = clean
    if isinstance(raw.get("deterministic"), bool):
        out["deterministic"] = raw["deterministic"]
    return out


def describe(dev: Optional[dict]) -> str:
    """One line for `status`: 'cuda:0 (NVIDIA H200), bf16, memory 12.1 GiB allocated / 14.0 GiB reserved / 139.8 GiB'."""
    from ckpt_daemon.units import human

    if not dev:
        return ""
    line = dev["device"] + (f" ({dev['name']})" if dev.get("name") else "")
    if dev.get("precision"):
        line += f", {dev['precision']}"
    if dev.get("deterministic"):
        line += ", deterministic"
    m = dev.get("memory") or {}
    parts = [f"{human(m[k])} {k}" for k in ("allocated", "reserved") if k in m]
    if "total" in m:
        parts.append(f"{human(m['total'])} total")
    if "rss" in m:
        parts.append(f"{human(m['rss'])} resident")
    if parts:
        line += ", memory " + " / ".join(parts)
    return line
