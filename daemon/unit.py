"""Render systemd/ckpt-daemon.service with this install's paths and user."""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import sys
from pathlib import Path
from typing import Optional

from ckpt_daemon.config import load_config
from ckpt_daemon.errors import UsageError
from ckpt_daemon.fsutil import atomic_write_bytes

TEMPLATE = Path(__file__).resolve().parent.parent / "systemd" / "ckpt-daemon.service"
DEFAULT_OUTPUT = Path("/etc/systemd/system/ckpt-daemon.service")


def render_unit(config_path: Path, user: Optional[str] = None, exec_path: Optional[str] = None,
                extra_rw: Optional[list[str]] = None) -> str:
    cfg = load_config(config_path)
    root = cfg.base_dir
    if user is None:
        user = pwd.getpwuid(os.stat(config_path).st_uid).pw_name
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        raise UsageError(f"There is no user {user!r} on this machine. Create it (useradd --system {user}) or pass --user.") from None
    if pw.pw_uid == 0:
        print("warning: the unit will run as root; pass --user to run it as an unprivileged user", file=sys.stderr)
    group = grp.getgrgid(pw.pw_gid).gr_name
    exe = exec_path or shutil.which("ckpt-daemon") or str(Path(sys.executable).parent / "ckpt-daemon")
    folders = [cfg.checkpoint_dir, cfg.snapshot_dir, cfg.consolidation_dir, cfg.log_dir]
    if cfg.http.textfile:
        folders.append(cfg.resolve_path(cfg.http.textfile))
    rw = sorted({str(p) for p in folders})
    # ProtectHome=read-only would stop the trainer writing its caches (Hugging Face, torch, triton...);
    # "-" lets the unit start where the folder does not exist yet
    rw.append(f"-{Path(pw.pw_dir) / '.cache'}")
    rw += [f"-{Path(p).resolve()}" for p in extra_rw or ()]
    text = TEMPLATE.read_text()
    for k, v in {"@ROOT@": str(root), "@USER@": user, "@GROUP@": group, "@EXEC@": exe,
                 "@CONFIG@": str(Path(config_path).resolve()), "@RW_PATHS@": " ".join(rw),
                 "@STOP_TIMEOUT@": str(int(cfg.training.stop_timeout_s + 30))}.items():
        text = text.replace(k, v)
    return text


def install_unit(config_path: Path, user: Optional[str] = None, output: Optional[Path] = None,
                 print_only: bool = False, extra_rw: Optional[list[str]] = None) -> str:
    text = render_unit(config_path, user, extra_rw=extra_rw)
    if print_only:
        return text
    out = output or DEFAULT_OUTPUT
    atomic_write_bytes(out, text.encode(), mode=0o644)
    return (f"wrote {out}. Now: systemctl daemon-reload && systemctl enable --now ckpt-daemon; "
            "journalctl -u ckpt-daemon -f to follow it.")
