"""python -m maintenance.consolidate [--config PATH] --from latest|best|STEP [--average K] [--dtype fp32|bf16|fp16]

Writes consolidated_models/<YYYYmmdd_HHMMSS>-step<N>/: the weights only (model.safetensors), the model
config (config.json) and metadata.json (source steps, metrics, checksums). --average K averages the
weights of the last K valid checkpoints up to the source. The result is verified by loading it into
the model and running a forward pass (for the built-in model; other models: a bit-exact reload), and
its size is printed against the full checkpoint's.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Optional

from ckpt_daemon import catalog as cat
from ckpt_daemon.config import Config, load_config
from ckpt_daemon.errors import CkptError, NoValidCheckpoint, UsageError

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def resolve_sources(cfg: Config, which: str, average: int) -> list[cat.Entry]:
    c = cat.scan_config(cfg)
    valid = [e for e in c.valid() if e.layout == "native"]
    if which == "latest":
        src = valid[-1] if valid else None
    elif which == "best":
        src = c.pointer("best")
        if src is None:
            raise NoValidCheckpoint(f"There is no best checkpoint in {cfg.checkpoint_dir} yet (no `best` pointer). "
                                    "Use --from latest or a step.")
    else:
        try:
            step = int(which)
        except ValueError:
            raise UsageError(f"--from {which!r} is not understood: use latest, best or a step number.") from None
        src = next((e for e in valid if e.step == step), None)
        if src is None:
            raise NoValidCheckpoint(f"There is no valid native checkpoint at step {step} in {cfg.checkpoint_dir}.")
    if src is None or not src.valid:
        raise NoValidCheckpoint(f"No valid native checkpoint to consolidate in {cfg.checkpoint_dir}.")
    upto = [e for e in valid if e.step <= src.step]
    if average > len(upto):
        raise UsageError(f"--average {average} needs {average} valid checkpoints up to step {src.step}; there are {len(upto)}.")
    return upto[-average:]


def consolidate(cfg: Config, which: str = "latest", average: int = 1, dtype: Optional[str] = None,
                now: Optional[float] = None) -> dict:
    import torch

    from ckpt_daemon.checkpoint import read_checkpoint, write_weights

    dtype = dtype or cfg.consolidation.dtype
    tdtype = getattr(torch, DTYPES[dtype])
    sources = resolve_sources(cfg, which, average)
    states = [read_checkpoint(e.path) for e in sources]  # each verified against its checksums
    models = [s["model"] for s in states]
    keys = list(models[-1])
    for s, e in zip(models, sources):
        if list(s) != keys or any(s[k].shape != models[-1][k].shape for k in keys):
            raise CkptError(f"{e.name} has a different set of tensors than {sources[-1].name}; they cannot be averaged.")
    out: dict = {}
    seen: dict[int, str] = {}
    for k in keys:
        t = models[-1][k]
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen and t.numel():  # tied weights stay tied
            out[k] = out[seen[ptr]]
            continue
        seen[ptr] = k
        if t.is_floating_point():
            acc = sum(m[k].to(torch.float64) for m in models) / len(models) if len(models) > 1 else t
            out[k] = acc.to(tdtype).contiguous()
        else:
            out[k] = t.clone()
    last = sources[-1]
    stamp = time.strftime("%Y%m%d_%H%M%S", time.localtime(now))
    dst = cfg.consolidation_dir / f"{stamp}-step{last.step}"
    n = 2
    while dst.exists():  # two exports within one second
        dst = cfg.consolidation_dir / f"{stamp}-step{last.step}-{n}"
        n += 1
    cfg.consolidation_dir.mkdir(parents=True, exist_ok=True)
    conf = states[-1]["config"]
    meta = {"format": "ckpt-daemon/consolidated-1", "source": str(last.path), "source_steps": [e.step for e in sources],
            "averaged": len(sources), "dtype": dtype, "metrics": last.metrics, "step": last.step, "config": conf,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    write_weights(out, dst, meta)
    from ckpt_daemon.fsutil import atomic_write_json

    if conf.get("model"):
        atomic_write_json(dst / "config.json", conf["model"])
    check = verify_export(dst, conf)
    full = sum(f.stat().st_size for f in last.path.iterdir() if f.is_file())
    size = (dst / "model.safetensors").stat().st_size
    return {"path": str(dst), "size": size, "full_checkpoint_size": full, "ratio": size / full, "check": check,
            "source_steps": meta["source_steps"], "dtype": dtype}


def verify_export(dst: Path, conf: dict) -> str:
    import torch

    from ckpt_daemon.checkpoint import load_weights

    tensors, _ = load_weights(dst)  # checksum verified
    if conf.get("model"):
        from ckpt_daemon.gpt import GPT, GPTConfig

        model = GPT(GPTConfig(**conf["model"]))
        model.load_state_dict({k: v.float() for k, v in tensors.items()})
        model.eval()
        with torch.no_grad():
            logits, _ = model(torch.zeros(1, min(8, model.config.block_size), dtype=torch.long))
        if not torch.isfinite(logits).all():
            raise CkptError(f"The consolidated model in {dst} produces non-finite outputs; it was kept for inspection.")
        return f"loaded into the model, forward pass OK (logits {tuple(logits.shape)})"
    return f"reloaded {len(tensors)} tensors OK (not the built-in model: no forward pass)"


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m maintenance.consolidate", description=__doc__.split("\n\n")[1])
    ap.add_argument("--config", default="config.yaml", help="path of config.yaml (default: ./config.yaml)")
    ap.add_argument("--from", dest="source", default="latest", help="latest | best | STEP (default: latest)")
    ap.add_argument("--average", type=int, default=1, help="average the weights of the last K valid checkpoints")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: consolidation.dtype")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    try:
        if args.average < 1:
            raise UsageError("--average must be at least 1.")
        r = consolidate(load_config(args.config), args.source, args.average, args.dtype)
    except CkptError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    if args.json:
        print(json.dumps(r, indent=2))
    else:
        print(f"wrote {r['path']} ({r['dtype']}, steps {r['source_steps']})")
        print(f"size {r['size'] / 2**20:.2f} MiB vs full checkpoint {r['full_checkpoint_size'] / 2**20:.2f} MiB "
              f"({r['ratio']:.1%}); {r['check']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
