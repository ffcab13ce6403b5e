"""Small, optional glue between ckpt-daemon and the trainers people bring: a plain loop, the
Hugging Face `Trainer`, PyTorch Lightning. Import the one you use by its full name, so that nothing
collides with a `trainer.py` of your own:

    import ckpt_daemon                                              # resume_path, StopRequest, Heartbeat
    from ckpt_daemon.integrations.hf import CkptDaemonCallback         # transformers.Trainer
    from ckpt_daemon.integrations.lightning import CkptDaemonCallback  # lightning.pytorch.Trainer

This package imports neither torch nor the training libraries; `hf` and `lightning` import theirs.
"""

from ckpt_daemon.integrations.common import (  # noqa: F401
    DEFAULT_PATTERNS,
    Heartbeat,
    StopRequest,
    checkpoint_dir,
    resume_path,
)

__all__ = ["DEFAULT_PATTERNS", "Heartbeat", "StopRequest", "checkpoint_dir", "resume_path"]
