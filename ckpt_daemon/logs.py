"""Logging: structlog to JSON lines in logs/daemon.log and readable lines on the console (journald);
plain human lines in logs/cleanup.log; per-step metrics in logs/metrics.jsonl.

daemon.log rotates by size (RotatingFileHandler); cleanup.log and metrics.jsonl are opened in append
mode for every write, so a logrotate that moves them away is picked up at the next line.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import stat
import sys
from pathlib import Path
from typing import Any, Optional

import structlog

_configured_file: Optional[Path] = None


def setup_logging(level: str = "info", log_file: Optional[Path] = None, max_bytes: int = 10 << 20,
                  backups: int = 5, console: bool = True) -> None:
    """Configure structlog + stdlib logging once per process (later calls replace the handlers)."""
    global _configured_file
    pre_chain = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=pre_chain + [structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
        h.close()
    root.setLevel(getattr(logging, level.upper()))
    if console:
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(structlog.stdlib.ProcessorFormatter(
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                        structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty(), sort_keys=False)],
            foreign_pre_chain=pre_chain,
        ))
        root.addHandler(h)
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        fh = logging.handlers.RotatingFileHandler(log_file, maxBytes=max_bytes, backupCount=backups,
                                                  encoding="utf-8")
        fh.setFormatter(structlog.stdlib.ProcessorFormatter(
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                        structlog.processors.dict_tracebacks,
                        structlog.processors.JSONRenderer(default=str)],
            foreign_pre_chain=pre_chain,
        ))
        root.addHandler(fh)
        _configured_file = log_file
    for noisy in ("apscheduler", "watchdog"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def get_logger(name: str = "ckpt") -> Any:
    return structlog.get_logger(name)


def append_text(path: Path, text: str) -> None:
    """Append `text` with one write(2) on an O_APPEND descriptor: concurrent writers never interleave
    within a block, and a rotated-away file is not written to."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # Never through a symlink or into a FIFO someone put in the log's place.
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"{path} is not a regular file; not writing to it")
        os.write(fd, text.encode("utf-8", "replace"))
    finally:
        os.close(fd)


def append_jsonl(path: Path, obj: dict) -> None:
    append_text(path, json.dumps(obj, separators=(",", ":"), default=str) + "\n")
