"""ckpt-daemon's core, and the public API for your own training scripts.

The core (config, catalog, manifest, errors, locks, file utilities) depends on no other package of
ckpt-daemon; `trainer`, `maintenance` and `daemon` depend on it. Importing this package imports no
torch: the names that need it are loaded on first use.

    import ckpt_daemon
    path = ckpt_daemon.resume_path()            # the daemon's verified choice, or None
    mgr = ckpt_daemon.CheckpointManager("checkpoints")
"""

from __future__ import annotations

from typing import Any

__version__ = "0.2.0"

_LAZY = {
    "CheckpointManager": ("ckpt_daemon.checkpoint", "CheckpointManager"),
    "read_checkpoint": ("ckpt_daemon.checkpoint", "read_checkpoint"),
    "resume_path": ("ckpt_daemon.integrations.common", "resume_path"),
    "StopRequest": ("ckpt_daemon.integrations.common", "StopRequest"),
    "Heartbeat": ("ckpt_daemon.integrations.common", "Heartbeat"),
    "checkpoint_dir": ("ckpt_daemon.integrations.common", "checkpoint_dir"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        mod, attr = _LAZY[name]
        return getattr(importlib.import_module(mod), attr)
    raise AttributeError(f"module 'ckpt_daemon' has no attribute {name!r}")
