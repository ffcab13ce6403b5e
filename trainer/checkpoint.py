"""Kept for scripts written against ckpt-daemon 0.1: the checkpoint library now lives in
`ckpt_daemon.checkpoint` (an import name that cannot collide with your own `trainer.py`)."""

from ckpt_daemon.checkpoint import (  # noqa: F401
    CheckpointManager,
    Loaded,
    export_weights,
    load_weights,
    read_checkpoint,
    write_weights,
)
