"""config.yaml changing under the running daemon: loading it at start with the last good copy to fall back
on, keeping the copy in force, noticing an edit cheaply, and the folder moves that wait for a restart.
Reading a config and its last good copy (what every command does) is ckpt_daemon/configfile.py."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ckpt_daemon.config import Config
from ckpt_daemon.configfile import LAST_GOOD, in_force_header, read_checked, read_last_good, stable_copy_path
from ckpt_daemon.errors import ConfigError


def folder_changes(old: Config, new: Config) -> list[str]:
    """What would make a running daemon look at other checkpoints: a folder, a name pattern, the runs."""
    out = []
    for key, a, b in (("checkpoints.dir", old.checkpoint_dir, new.checkpoint_dir),
                      ("checkpoints.pattern", old.checkpoints.pattern, new.checkpoints.pattern),
                      ("checkpoints.runs", old.checkpoints.runs, new.checkpoints.runs),
                      ("snapshots.dir", old.snapshot_dir, new.snapshot_dir),
                      ("consolidation.dir", old.consolidation_dir, new.consolidation_dir),
                      ("logging.dir", old.log_dir, new.log_dir)):
        if a != b:
            out.append(f"{key} from {a} to {b}")
    return out


@dataclass
class Loaded:
    cfg: Config
    text: str  # the text in force
    error: Optional[str] = None  # why config.yaml itself is not in force (running on the last good copy)
    notes: tuple[str, ...] = ()


def load_with_fallback(config_path: Path) -> Loaded:
    """config.yaml if it validates and has every section the last good copy has; else the last good
    copy, with the reason. Raises ConfigError only if there is no last good copy to fall back to."""
    good = read_last_good(config_path)
    try:
        cfg, text = read_checked(config_path, good)
    except ConfigError as exc:
        if good is None:
            raise ConfigError(f"{exc} (No last good config was found to fall back to, so the daemon cannot start.)") from None
        return Loaded(good[0], good[1], str(exc))
    notes = tuple(f"{c} since the last run" for c in folder_changes(good[0], cfg)) if good else ()
    return Loaded(cfg, text, None, notes)


def save_last_good(cfg: Config, text: str, config_path: Optional[Path] = None) -> Optional[str]:
    """Keep the text of the config now in force (in the logs folder, and at a stable place); it is also
    what the trainer is given. Returns an error message instead of raising."""
    from ckpt_daemon.fsutil import atomic_write_bytes

    config_path = config_path or cfg.source
    header = in_force_header(config_path)
    body = text[len(header):] if text.startswith("# ckpt-daemon: the config in force for ") else text
    data = (header + body.split("\n", 1)[1] if body.startswith("# ckpt-daemon: the config in force for ") else header + body)
    try:
        stable = stable_copy_path(config_path)
        stable.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(stable, data.encode("utf-8"), mode=0o600)
    except OSError:
        pass  # best effort: a read-only home under a hardened unit without StateDirectory
    try:
        cfg.log_dir.mkdir(parents=True, exist_ok=True)
        # 0600: it holds what config.yaml holds, secrets included (notify.urls, http.token); the trainer runs as us
        atomic_write_bytes(cfg.log_dir / LAST_GOOD, data.encode("utf-8"), mode=0o600)
        return None
    except OSError as exc:
        return str(exc)


def config_key(path: Path) -> tuple:
    """What changes when config.yaml is edited or its symlink re-pointed (cheap: two stats)."""
    out: list = []
    try:
        lst = os.lstat(path)
        out.append((lst.st_ino, lst.st_mtime_ns))
        if os.path.islink(path):
            out.append(os.readlink(path))
    except OSError:
        out.append(None)
    try:
        st = os.stat(path)
        out.append((st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size, st.st_ctime_ns))
    except OSError:
        out.append(None)
    return tuple(out)
