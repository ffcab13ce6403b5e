"""What every command line of ckpt-daemon shares: output that never fails on odd names, and one error
shape for --json."""

from __future__ import annotations

import json
import sys

from ckpt_daemon.errors import CkptError


def safe_stdio() -> None:
    """Names in the managed folders are untrusted bytes (not always UTF-8): print them escaped rather
    than die of a UnicodeEncodeError half-way through a report."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.reconfigure(errors="backslashreplace")
        except (AttributeError, ValueError):
            pass


def error_json(exc: CkptError) -> str:
    """The one shape of an error under --json, on stdout: {"ok": false, "error": {type, message, exit_code}}."""
    return json.dumps({"ok": False, "error": {"type": type(exc).__name__, "message": str(exc),
                                              "exit_code": exc.exit_code}})
