"""The one error module of ckpt-daemon.

Every error a user can meet is a `CkptError` whose message is one paragraph of whole sentences that
names the cause and the remedy. CLIs print `str(err)` and exit with `err.exit_code`; they never show a
traceback for these.
"""

from __future__ import annotations


class CkptError(Exception):
    """Base class: a problem the user can act on. The message says what happened and what to do."""

    exit_code = 1


class ConfigError(CkptError):
    """config.yaml is missing, unreadable, or does not validate."""

    exit_code = 2


class UsageError(CkptError):
    """A command was called in a way it cannot honour (bad argument, no terminal to confirm...)."""

    exit_code = 2


class CheckpointError(CkptError):
    """A checkpoint is missing, incomplete or corrupt."""


class NoValidCheckpoint(CheckpointError):
    """Nothing valid to resume from."""


class DiskFullError(CkptError):
    """Not enough free space to write; nothing that existed before was touched."""

    exit_code = 3


class UnsafePathError(CkptError):
    """A path would lead outside the folders ckpt-daemon manages (symlink, `..`, overlap)."""


class TrainingActiveError(CkptError):
    """An operation refused because training is writing at this moment."""

    exit_code = 4
