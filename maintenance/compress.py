"""python -m maintenance.compress PATH|GLOB [PATH|GLOB ...] [--replace]

Drops the optimizer (and scheduler and scaler) state from single-file checkpoints: writes
`<stem>_compressed<suffix>`, verifies that it loads and that every tensor it keeps is bit-identical,
and with --replace only then replaces the original. A file with nothing to drop is left alone.

What is dropped:
  Lightning .ckpt        `optimizer_states` and `lr_schedulers`; everything else stays, so
                         `YourModule.load_from_checkpoint(path)` still works, but `Trainer.fit(ckpt_path=path)`
                         cannot resume from it any more.
  torch.save dicts       optimizer, optimizer_state_dict, scheduler, lr_scheduler, scaler... (see DROP), as long
                         as the weights stay (under `model`, `model_state_dict`, `state_dict` or any other key).

Files are loaded only with torch.load(weights_only=True): a file that needs arbitrary unpickling is
refused and left untouched. The compressed name never matches a `{step}` pattern such as
`model_step_{step}.pt`, so ckpt-daemon does not take the copy for a checkpoint to resume from.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import stat
import sys
from pathlib import Path
from typing import Any, Optional

from ckpt_daemon.cliutil import add_json_argument, error_record, module_main
from ckpt_daemon.errors import CheckpointError, CkptError, UsageError, crash_summary
from ckpt_daemon.fsutil import disk_full_error, is_enospc
from ckpt_daemon.store import catalog as cat
from ckpt_daemon.store.commit import Scratch
from ckpt_daemon.termtext import inert
from maintenance.consolidate import human, is_lightning, load_torch_file, same_bits

LIGHTNING_DROP = ("optimizer_states", "lr_schedulers")
DROP = ("optimizer", "optimizer_state_dict", "optimizers", "optimizer_states", "optim_state_dict",
        "scheduler", "scheduler_state_dict", "schedulers", "lr_scheduler", "lr_scheduler_state_dict", "lr_schedulers",
        "scaler", "scaler_state_dict", "grad_scaler", "grad_scaler_state_dict", "amp", "amp_state_dict")
SUFFIX = "_compressed"



def droppable(obj: Any) -> list[str]:
    """The keys of a loaded checkpoint that only resuming needs."""
    if not isinstance(obj, dict):
        return []
    names = LIGHTNING_DROP if is_lightning(obj) else DROP
    return [k for k in obj if k in names]


def tensors_of(obj: Any, prefix: str = "") -> dict:
    """Every tensor in nested dicts, lists and tuples, by its path ('state_dict/layer.weight')."""
    import torch

    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    out: dict = {}
    for k, v in items:
        out.update(tensors_of(v, f"{prefix}/{k}" if prefix else str(k)))
    return out


def compress_file(path: Path, replace: bool = False) -> dict:
    path = Path(path)
    result = {"source": str(path), "written": None, "replaced": False, "dropped": [], "original_size": 0, "size": 0}
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise UsageError(f"{path} does not exist.") from None
    if stat.S_ISDIR(st.st_mode):
        raise UsageError(f"{path} is a folder: compress handles single-file checkpoints. For a Hugging Face checkpoint "
                         f"folder, `python -m maintenance.consolidate --from {path}` writes its weights without the "
                         "optimizer.")
    if not stat.S_ISREG(st.st_mode):
        raise UsageError(f"{path} is not a regular file (symlinks are never followed); it was left untouched.")
    result["original_size"] = result["size"] = st.st_size
    if path.name.endswith(".safetensors") or cat.sniff(path) == "safetensors":
        return {**result, "nothing": "a safetensors file holds weights only"}
    obj = load_torch_file(path)
    drop = droppable(obj)
    if not drop:
        return {**result, "nothing": "it holds no optimizer, scheduler or scaler state"}
    small = {k: v for k, v in obj.items() if k not in drop}
    if not tensors_of(small):
        raise UsageError(f"{path} holds no model weights besides its {', '.join(drop)}; there is nothing worth keeping "
                         "in a compressed copy, so it was left untouched.")
    target = _write_verified(path, small, replace)
    return {**result, "written": str(target), "replaced": replace, "dropped": drop, "size": target.stat().st_size,
            "lightning": is_lightning(obj)}


def _write_verified(path: Path, small: dict, replace: bool) -> Path:
    """torch.save `small` in the scratch space of `path`'s folder (store/commit.py: the catalog sees a save in
    progress, and whatever fails, nothing is left), reload it, check every tensor bit for bit, then commit it
    into place (over the original with `replace`, over an older compressed copy otherwise)."""
    import torch

    out = path.with_name(f"{path.stem}{SUFFIX}{path.suffix}")
    target = path if replace else out
    try:
        with Scratch(path.parent, f"compress-{out.name}") as scratch:
            tmp = scratch.path / out.name
            _build_verified(path, small, tmp, torch)
            scratch.commit(target, entry=tmp, overwrite=True)
    except OSError as exc:
        if is_enospc(exc):
            raise disk_full_error(f"write the compressed copy of {path.name}", path.parent, exc) from None
        raise CkptError(f"The compressed copy of {path} could not be written ({exc.strerror or exc}); the original is "
                        "untouched.") from None
    return target


def _build_verified(path: Path, small: dict, tmp: Path, torch) -> None:
    """torch.save `small` as the new file `tmp` (fsynced, with `path`'s mode) and check that it reloads
    identically, every tensor bit for bit."""
    with open(tmp, "xb") as f:
        torch.save(small, f)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, stat.S_IMODE(os.lstat(path).st_mode))
    back = load_torch_file(tmp)
    want, got = tensors_of(small), tensors_of(back)
    bad = next((k for k in want if k not in got or not same_bits(want[k], got[k])), None)
    if bad is not None or set(want) != set(got) or list(back) != list(small):
        raise CkptError(f"The compressed copy of {path} does not reload identically ({bad or 'its keys differ'}); "
                        "it was removed and the original is untouched. Check the disk, then try again.")


def expand(patterns: list[str]) -> list[Path]:
    files: list[Path] = []
    for p in patterns:
        matched = sorted(glob.glob(p)) or ([p] if os.path.lexists(p) else [])
        files += [Path(m) for m in matched if not Path(m).stem.endswith(SUFFIX)]
    return files


HELP = "strip optimizer state from single-file checkpoints (.pt, .ckpt), verified"


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("paths", nargs="+", metavar="PATH", help="files or glob patterns, e.g. 'checkpoints/model_step_*.pt'")
    ap.add_argument("--replace", action="store_true", help="replace each original after its compressed copy is verified")
    add_json_argument(ap, "one record per file")


def run(args: argparse.Namespace) -> int:
    files = expand(args.paths)
    if not files:
        raise UsageError(f"Nothing matches {' '.join(args.paths)}: give existing files or glob patterns "
                         "(quote them, e.g. 'checkpoints/model_step_*.pt').")
    failed, records = 0, []
    for f in files:
        try:
            try:
                r = compress_file(f, args.replace)
            except CkptError:
                raise
            except Exception as exc:  # a crafted file can make torch's loader or saver raise anything: this file
                # fails with its reason, and the files after it are still compressed
                raise CheckpointError(f"{f} could not be compressed ({crash_summary(exc)}); it was left untouched. It "
                                      "is damaged or not a plain torch.save checkpoint.") from None
        except CkptError as exc:
            records.append({"file": str(f), "ok": False, "error": error_record(exc)})
            if not args.json:
                print(inert(f"error: {exc}"), file=sys.stderr)
            failed += 1
            continue
        records.append({"file": str(f), "ok": True, **{k: (str(v) if isinstance(v, Path) else v) for k, v in r.items()}})
        if args.json:
            continue
        if not r["dropped"]:
            print(inert(f"{f}: nothing to drop ({r['nothing']}); left as it is"))
            continue
        print(inert(f"{f}: {human(r['original_size'])} -> {r['written']}: {human(r['size'])} "
                    f"({1 - r['size'] / r['original_size']:.0%} smaller; dropped {', '.join(r['dropped'])}; verified)"))
        if r["lightning"]:
            print("  (LightningModule.load_from_checkpoint works on it; Trainer.fit(ckpt_path=...) cannot resume from it)")
    if args.json:
        print(json.dumps({"ok": not failed, "files": records}, indent=2, default=str))
    return 1 if failed else 0


def main(argv: Optional[list[str]] = None) -> int:
    return module_main("python -m maintenance.compress", __doc__.split("\n\n")[1], add_arguments, run, argv)

if __name__ == "__main__":
    sys.exit(main())
