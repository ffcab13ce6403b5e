"""python -m maintenance.restore SNAPSHOT [--config PATH] [--checkpoint NAME]

Puts checkpoints from a snapshot (snapshots/YYYY-MM-DD, or a path to one) back into checkpoints.dir
as valid checkpoints, without overwriting anything there: a name that exists is left alone. Each one
is rebuilt in a temp folder, verified (checksums for native checkpoints) and renamed into place under
the commit lock. Training resumes from the newest valid checkpoint, so a restored one is resumed from
when nothing newer is present; the command says which will be used.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Optional

from ckpt_daemon import catalog as cat
from ckpt_daemon import runtime
from ckpt_daemon.config import Config, load_config
from ckpt_daemon.errors import CheckpointError, CkptError, UsageError
from ckpt_daemon.fsutil import fsync_dir, inside
from maintenance.snapshot import SNAPSHOT_MANIFEST, _copy_checkpoint


def find_snapshot(cfg: Config, which: str) -> Path:
    p = Path(which)
    if not p.is_absolute() and not p.exists():
        p = cfg.snapshot_dir / which
    p = p.resolve()
    if not (p / SNAPSHOT_MANIFEST).is_file():
        raise UsageError(f"{which} is not a snapshot (no {SNAPSHOT_MANIFEST} in {p}). "
                         f"`python -m maintenance.snapshot --list` shows the snapshots in {cfg.snapshot_dir}.")
    return p


def restore(cfg: Config, which: str, only: Optional[str] = None) -> list[str]:
    snap = find_snapshot(cfg, which)
    manifest = json.loads((snap / SNAPSHOT_MANIFEST).read_text())
    root = cfg.checkpoint_dir
    root.mkdir(parents=True, exist_ok=True)
    lines = []
    names = [c["name"] for c in manifest["checkpoints"] if only is None or c["name"] == only]
    if not names:
        raise UsageError(f"Snapshot {snap.name} holds no checkpoint named {only!r}; it holds "
                         f"{', '.join(c['name'] for c in manifest['checkpoints'])}.")
    for name in names:
        src = snap / name
        if "/" in name or name.startswith(".") or not inside(src, snap) or src.is_symlink():
            lines.append(f"skipped {name}: unsafe name or a symlink in the snapshot (not followed)")
            continue
        dst = root / name
        if dst.exists() or dst.is_symlink():
            lines.append(f"kept {name}: a checkpoint of that name is already in {root}; nothing was overwritten")
            continue
        tmp = root / f".tmp-restore-{name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        native = (src / "manifest.json").exists()
        try:
            if src.is_dir():
                _copy_checkpoint(src, tmp, link=native)
            else:
                _copy_checkpoint(src, tmp, link=False)
            layout, status, reason, _ = cat.check_entry(tmp, verify=True)
            if status != "complete":
                raise CheckpointError(f"the copy of {name} in the snapshot is {status} ({reason}); it was not restored")
            with runtime.commit_lock(root):
                if dst.exists():
                    raise CheckpointError(f"{name} appeared in {root} meanwhile; nothing was overwritten")
                os.rename(tmp, dst)
                fsync_dir(root)
            lines.append(f"restored {name} from snapshot {snap.name} ({layout}, verified)")
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    c = cat.scan_config(cfg, stats=False)
    newest = c.newest_valid()
    if newest is not None:
        restored = [n for n in names if c.by_name(n) is not None]
        if newest.name in restored:
            lines.append(f"training will resume from {newest.name} (the newest valid checkpoint)")
        else:
            lines.append(f"training resumes from the newest valid checkpoint, {newest.name}; to continue from a restored "
                         f"one instead, move the newer checkpoints out of {root} (or pass --resume PATH to the trainer)")
    return lines


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m maintenance.restore", description=__doc__.split("\n\n")[1])
    ap.add_argument("snapshot", help="snapshot name (YYYY-MM-DD) or path")
    ap.add_argument("--config", default="config.yaml", help="path of config.yaml (default: ./config.yaml)")
    ap.add_argument("--checkpoint", default=None, help="restore only this checkpoint of the snapshot")
    args = ap.parse_args(argv)
    try:
        for line in restore(load_config(args.config), args.snapshot, args.checkpoint):
            print(line)
    except CkptError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
