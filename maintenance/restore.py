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
import sys
from pathlib import Path
from typing import Optional

from ckpt_daemon.cliutil import add_json_argument, config_path, module_main
from ckpt_daemon.config import Config, load_config
from ckpt_daemon.errors import CheckpointError, UsageError
from ckpt_daemon.fsutil import inside, read_json_file
from ckpt_daemon.store import catalog as cat
from ckpt_daemon.store import names
from ckpt_daemon.store.commit import Scratch
from maintenance.snapshot import SNAPSHOT_MANIFEST, _copy_checkpoint, choose_method


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
    manifest = read_json_file(snap / SNAPSHOT_MANIFEST, 16 << 20) or {}
    listed = [c for c in (manifest.get("checkpoints") if isinstance(manifest.get("checkpoints"), list) else [])
              if isinstance(c, dict) and isinstance(c.get("name"), str)]
    lines = []
    all_names = [_label(c) for c in listed]
    todo = [c for c in listed if only is None or only in (c["name"], _label(c))]
    if not todo:
        raise UsageError(f"Snapshot {snap.name} holds no checkpoint named {only!r}; it holds "
                         f"{', '.join(all_names) or 'nothing'}.")
    rxs = [names.compile_pattern(p) for p in cfg.checkpoints.pattern]
    runs = ["", *cfg.checkpoints.runs]
    restored = []
    for rec in todo:
        name, run = rec["name"], rec.get("run") or ""
        label = _label(rec)
        if run not in runs:
            lines.append(f"skipped {label}: run {run!r} is not in checkpoints.runs of this config")
            continue
        src_dir = snap / run if run else snap
        src = src_dir / name
        fields = names.match_name(name, rxs)
        if "/" in name or name.startswith(".") or not inside(src, snap) or src.is_symlink() or fields is None:
            lines.append(f"skipped {label}: unsafe name, a symlink, or not named like a checkpoint (not followed)")
            continue
        root = cfg.checkpoint_dir / run if run else cfg.checkpoint_dir
        root.mkdir(parents=True, exist_ok=True)
        dst = root / name
        if os.path.lexists(dst):
            lines.append(f"kept {label}: a checkpoint of that name is already in {root}; nothing was overwritten")
            continue
        files = rec.get("files") if isinstance(rec.get("files"), dict) else None
        sidecar = {"files": files} if files else None
        layout = "native" if (src / "manifest.json").exists() else "other"
        with Scratch(root, f"restore-{name}") as scratch:
            tmp = scratch.path / name
            _copy_checkpoint(src, tmp, choose_method(cfg.snapshots.mode, layout, scratch.path, src))
            layout, status, reason, _ = cat.check_entry(tmp, verify=True, step=fields["step"], sidecar=sidecar)
            if status != "complete":
                raise CheckpointError(f"the copy of {label} in the snapshot is {status} ({reason}); it was not restored")
            try:
                scratch.commit(dst, entry=tmp)
            except FileExistsError:
                raise CheckpointError(f"{label} appeared in {root} meanwhile; nothing was overwritten") from None
        restored.append(label)
        lines.append(f"restored {label} from snapshot {snap.name} ({layout}, verified"
                     + (" against its recorded checksums" if sidecar else "") + ")")
    newest = cat.newest_valid_rel(cfg)  # the same choice the daemon makes
    if newest is not None:
        if newest in restored:
            lines.append(f"training will resume from {newest} (the newest valid checkpoint)")
        else:
            lines.append(f"training resumes from the newest valid checkpoint, {newest}; to continue from a restored "
                         f"one instead, move the newer checkpoints out of {cfg.checkpoint_dir} "
                         "(or pass --resume PATH to the trainer)")
    return lines


def _label(rec: dict) -> str:
    return f"{rec['run']}/{rec['name']}" if rec.get("run") else rec["name"]


HELP = "put checkpoints from a snapshot (or a replica: --from URL) back, verified, never overwriting one"


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("snapshot", nargs="?", default=None,
                    help="snapshot name (YYYY-MM-DD) or path; with --from: latest (default), best, or a STEP or NAME")
    ap.add_argument("--checkpoint", default=None, metavar="NAME", help="restore only this checkpoint of the snapshot")
    ap.add_argument("--from", dest="from_url", default=None, metavar="URL",
                    help="restore from a replica instead (s3://bucket/prefix or a folder of replicas.url): downloaded "
                         "into scratch, every checksum verified, then committed")
    add_json_argument(ap, "what was restored")


def run(args: argparse.Namespace) -> int:
    if args.from_url is not None:  # a replica (ckpt_daemon/remote/)
        from ckpt_daemon.remote.connect import restore_from

        if args.checkpoint:
            raise UsageError("--checkpoint is for snapshots; with --from, name the checkpoint as the argument "
                             "(latest, best, a step or a name).")
        name, lines = restore_from(load_config(config_path(args)), args.from_url, args.snapshot or "latest",
                                   note=lambda s: print(f"warning: {s}", file=sys.stderr))
        if args.json:
            print(json.dumps({"ok": True, "from": args.from_url, "restored": [name], "messages": lines}, indent=2))
        else:
            for line in lines:
                print(line)
        return 0
    if args.snapshot is None:
        raise UsageError("Name the snapshot to restore (YYYY-MM-DD or a path; `ckpt-daemon snapshot --list` shows them), "
                         "or give --from URL to restore from a replica.")
    lines = restore(load_config(config_path(args)), args.snapshot, args.checkpoint)
    if args.json:
        print(json.dumps({"ok": True, "snapshot": args.snapshot,
                          "restored": [ln.split()[1] for ln in lines if ln.startswith("restored ")],
                          "messages": lines}, indent=2))
    else:
        for line in lines:
            print(line)
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    return module_main("python -m maintenance.restore", __doc__.split("\n\n")[1], add_arguments, run, argv)

if __name__ == "__main__":
    sys.exit(main())
