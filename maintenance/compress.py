"""python -m maintenance.compress PATH|GLOB [PATH|GLOB ...] [--replace]

For single-file .pt checkpoints of your own format (a dict with `model_state_dict` and
`optimizer_state_dict`): writes `<name>_compressed.pt` without the optimizer state, verifies that it
loads and that every weight is bit-identical, and with --replace only then replaces the original.
Files are loaded with torch.load(weights_only=True): a file that needs arbitrary unpickling is refused.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
from pathlib import Path
from typing import Optional

from ckpt_daemon.errors import CkptError, UsageError
from ckpt_daemon.fsutil import fsync_dir

DROP = ("optimizer_state_dict", "optimizer", "scheduler_state_dict", "scaler_state_dict", "lr_scheduler")


def compress_file(path: Path, replace: bool = False) -> dict:
    import torch

    path = Path(path)
    original_size = path.stat().st_size
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CkptError(f"{path} cannot be loaded safely ({exc.__class__.__name__}: {str(exc).splitlines()[0]}). "
                        "It is left untouched; compress only loads files with weights_only=True.") from None
    if not isinstance(obj, dict) or "model_state_dict" not in obj:
        raise UsageError(f"{path} is not a dict with 'model_state_dict'; it is left untouched.")
    small = {k: v for k, v in obj.items() if k not in DROP}
    out = path.with_name(f"{path.stem}_compressed{path.suffix}")
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "xb") as f:
            torch.save(small, f)
            f.flush()
            os.fsync(f.fileno())
        back = torch.load(tmp, map_location="cpu", weights_only=True)
        ms, mb = obj["model_state_dict"], back["model_state_dict"]
        if list(ms) != list(mb) or not all(torch.equal(ms[k], mb[k]) for k in ms):
            raise CkptError(f"The compressed copy of {path} does not reload identically; nothing was replaced.")
        target = path if replace else out
        os.replace(tmp, target)
        fsync_dir(target.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return {"source": str(path), "written": str(target), "replaced": replace,
            "dropped": [k for k in obj if k in DROP], "size": target.stat().st_size, "original_size": original_size}


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m maintenance.compress", description=__doc__.split("\n\n")[1])
    ap.add_argument("paths", nargs="+", help="files or glob patterns, e.g. 'checkpoints/model_step_*.pt'")
    ap.add_argument("--replace", action="store_true", help="replace each original after its compressed copy is verified")
    args = ap.parse_args(argv)
    files = []
    for p in args.paths:
        matched = sorted(glob.glob(p)) or ([p] if Path(p).exists() else [])
        files += [Path(m) for m in matched if not Path(m).stem.endswith("_compressed")]
    if not files:
        print(f"error: nothing matches {' '.join(args.paths)}", file=sys.stderr)
        return 2
    failed = 0
    for f in files:
        try:
            r = compress_file(f, args.replace)
        except CkptError as exc:
            print(f"error: {exc}", file=sys.stderr)
            failed += 1
            continue
        print(f"{f}: {r['original_size'] / 2**20:.2f} MiB -> {r['written']}: {r['size'] / 2**20:.2f} MiB "
              f"({1 - r['size'] / r['original_size']:.0%} smaller; dropped {', '.join(r['dropped']) or 'nothing'}; verified)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
