"""The one error module of ckpt-daemon, and the one table of exit codes every command uses.

Every error a user can meet is a `CkptError` whose message is one paragraph of whole sentences that
names the cause and the remedy. CLIs print `str(err)` and exit with `err.exit_code`; they never show a
traceback for these.
"""

from __future__ import annotations

# The exit codes of every ckpt-daemon command (the CLI, `python -m maintenance.*`, the built-in trainer).
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_DISK_FULL = 3
EXIT_BUSY = 4
EXIT_NOT_RUNNING = 5
EXIT_NO_CHECKPOINT = 6
EXIT_CANCELLED = 130
EXIT_STOPPED_BY_SIGNAL = 143

EXIT_CODES: dict[int, str] = {
    EXIT_OK: "success (for the trainer: training finished)",
    EXIT_FAILED: "failed; the message says why (for cleanup: some deletions failed, the rest went on)",
    EXIT_USAGE: "bad usage or config, or a confirmation was needed with no terminal to ask on",
    EXIT_DISK_FULL: "not enough disk space; nothing that existed before was touched",
    EXIT_BUSY: "another process holds what was needed (a daemon on the same folder, a trainer, the commit lock); nothing was changed",
    EXIT_NOT_RUNNING: "status: the daemon is not running (the last state it wrote is shown)",
    EXIT_NO_CHECKPOINT: "there is no valid checkpoint to use",
    EXIT_CANCELLED: "cancelled (Ctrl+C, or 'no' at a prompt); nothing was changed",
    EXIT_STOPPED_BY_SIGNAL: "trainer: stopped by SIGTERM after saving (not finished: the daemon restarts it unless it sent the signal)",
}


def exit_code_table() -> str:
    return "\n".join(f"  {code:>3}  {what}" for code, what in EXIT_CODES.items())


class CkptError(Exception):
    """Base class: a problem the user can act on. The message says what happened and what to do."""

    exit_code = EXIT_FAILED


class ConfigError(CkptError):
    """config.yaml is missing, unreadable, or does not validate."""

    exit_code = EXIT_USAGE


class UsageError(CkptError):
    """A command was called in a way it cannot honour (bad argument, no terminal to confirm...)."""

    exit_code = EXIT_USAGE


class CheckpointError(CkptError):
    """A checkpoint is missing, incomplete or corrupt."""


class NoValidCheckpoint(CheckpointError):
    """Nothing valid to resume from."""

    exit_code = EXIT_NO_CHECKPOINT


class DiskFullError(CkptError):
    """Not enough free space to write; nothing that existed before was touched."""

    exit_code = EXIT_DISK_FULL


class UnsafePathError(CkptError):
    """A path would lead outside the folders ckpt-daemon manages (symlink, `..`, overlap)."""


class TrainingActiveError(CkptError):
    """An operation refused because training is writing at this moment, or a lock is held."""

    exit_code = EXIT_BUSY


class AlreadyRunningError(CkptError):
    """Another daemon already manages this checkpoint folder."""

    exit_code = EXIT_BUSY


class NotRunningError(CkptError):
    """The daemon is not running."""

    exit_code = EXIT_NOT_RUNNING


def crash_summary(exc: BaseException) -> str:
    """'IndexError: list index out of range': what a parser of an untrusted file raised, in one line for a
    message (a crafted file can make a library raise anything; the message still names it)."""
    first = (str(exc).splitlines() or [""])[0][:200]
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__
