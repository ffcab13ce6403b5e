"""What every command line of ckpt-daemon shares: where the config is, output that never fails on odd
names, one error shape for --json, one table of exit codes, and one way to run a command.

Each command is defined once, as `add_arguments(parser)` and `run(args) -> exit code`, in a module that
does not import torch; `ckpt-daemon <command>` and the module's own `python -m ...` entry point both
build their parser from it and run the same code.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import re
import signal
import sys
from pathlib import Path
from typing import Callable, Optional

from ckpt_daemon.errors import CkptError, exit_code_table
from ckpt_daemon.termtext import inert

CONFIG_ENV = "CKPT_DAEMON_CONFIG"
CONFIG_HELP = f"the config.yaml to use (default: ${CONFIG_ENV}, else ./config.yaml)"
EXIT_EPILOG = "Exit codes (the same for every command):\n" + exit_code_table()


class Parser(argparse.ArgumentParser):
    """argparse with a 'did you mean' for a mistyped subcommand or option, and, when --json was asked
    for, usage errors in the JSON error shape on stdout (exit 2) like every other error."""

    json_errors = False  # set from the raw arguments before parsing

    def error(self, message: str):
        m = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if m:
            choices = re.findall(r"'([^']+)'", m.group(2)) or [c.strip() for c in m.group(2).split(",")]
            close = difflib.get_close_matches(m.group(1), choices, n=1, cutoff=0.5)
            message = f"unknown command {m.group(1)!r}" + (f"; did you mean {close[0]!r}?" if close else "") \
                + f" (commands: {', '.join(choices)})"
        m = re.search(r"unrecognized arguments: (\S+)", message)
        if m:
            opts = sorted({o for a in self._actions for o in a.option_strings})
            close = difflib.get_close_matches(m.group(1).split("=")[0], opts, n=1, cutoff=0.6)
            if close:
                message += f"; did you mean {close[0]!r}?"
        if Parser.json_errors:
            from ckpt_daemon.errors import UsageError

            print(error_json(UsageError(f"{self.prog}: {message}. See {self.prog} --help.")))
            sys.exit(2)
        super().error(message)

    def parse_args(self, args=None, namespace=None):
        argv = sys.argv[1:] if args is None else list(args)
        Parser.json_errors = "--json" in argv
        ns, extra = self.parse_known_args(argv, namespace)
        if extra:  # reported by the subcommand's parser, with its usage and its options to suggest
            sub = next((a for a in self._actions if isinstance(a, argparse._SubParsersAction)), None)
            target = sub.choices.get(getattr(ns, sub.dest, None)) if sub else None
            (target or self).error(f"unrecognized arguments: {' '.join(extra)}")
        return ns


def number(kind: type, lo: float, hi: float) -> Callable[[str], float]:
    """An argparse type for a number in [lo, hi]: NaN, infinities and out-of-range values are a usage
    error with the range in the message, never a traceback later."""
    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'a whole number' if kind is int else 'a number'}") from None
        if not lo <= v <= hi:  # also false for NaN
            raise argparse.ArgumentTypeError(f"{text} is out of range: give a value from {lo:g} to {hi:g}")
        return v

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def safe_stdio() -> None:
    """Names in the managed folders are untrusted bytes (not always UTF-8): print them escaped rather
    than die of a UnicodeEncodeError half-way through a report."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.reconfigure(errors="backslashreplace")
        except (AttributeError, ValueError):
            pass


def error_record(exc: CkptError) -> dict:
    """{type, message, exit_code}: the "error" of the one error shape (also per file in a batch's records)."""
    return {"type": type(exc).__name__, "message": str(exc), "exit_code": exc.exit_code}


def error_json(exc: CkptError) -> str:
    """The one shape of an error under --json, on stdout: {"ok": false, "error": {type, message, exit_code}}."""
    return json.dumps({"ok": False, "error": error_record(exc)})


def add_config_argument(p: argparse.ArgumentParser, top: bool = True) -> None:
    """--config on a parser. On a subcommand it overrides one given before the subcommand only when it is
    given itself (SUPPRESS), so `ckpt-daemon --config c.yaml status` and `ckpt-daemon status --config
    c.yaml` mean the same."""
    p.add_argument("--config", metavar="PATH", default=None if top else argparse.SUPPRESS, help=CONFIG_HELP)


def config_path(args: argparse.Namespace) -> Path:
    return Path(getattr(args, "config", None) or os.environ.get(CONFIG_ENV) or "config.yaml")


def add_json_argument(p: argparse.ArgumentParser, what: str = "the result") -> None:
    p.add_argument("--json", action="store_true", help=f"print {what} as JSON (errors too, as {{\"ok\": false, ...}})")


def invoke(func: Callable[[argparse.Namespace], int], args: argparse.Namespace, long_lived: bool = False) -> int:
    """Run a command: CkptError becomes its message (or the JSON error shape) and its exit code,
    Ctrl+C exit 130, never a traceback for what a user can act on.

    Process-wide settings made here, and for whose sake:
    - stdout/stderr escape what they cannot encode (safe_stdio): for every command, the daemon included.
    - SIGPIPE: a command that prints a report and ends gets the default action while it runs, so
      `ckpt-daemon list | head` ends quietly instead of with a BrokenPipeError. A `long_lived` command
      (the daemon) keeps it ignored: it writes to sockets and pipes that others close whenever they
      like (an HTTP client, journald, a console), and a closed one must be an error it handles, never a
      silent death that takes its trainer with it (parent-death signal). The previous action is put
      back when the command returns, so a caller in the same process (a test) keeps its own.
    """
    safe_stdio()
    previous = _set_sigpipe(signal.SIG_IGN if long_lived else signal.SIG_DFL)
    try:
        return func(args)
    except CkptError as exc:
        if getattr(args, "json", False):
            print(error_json(exc))
        else:
            print(inert(f"error: {exc}"), file=sys.stderr)  # it may quote a name given or found: one line, inert
        return exc.exit_code
    except KeyboardInterrupt:
        print("cancelled", file=sys.stderr)
        return 130
    finally:
        if previous is not _NOT_SET:
            for stream in (sys.stdout, sys.stderr):  # while SIGPIPE still ends a report quietly
                try:
                    stream.flush()
                except (OSError, ValueError):
                    pass
            _set_sigpipe(signal.SIG_DFL if previous is None else previous)  # None: set outside Python


_NOT_SET = object()


def _set_sigpipe(action):
    """Set SIGPIPE's action; the previous one, or _NOT_SET where it cannot be set (no SIGPIPE on this
    system, or not the main thread)."""
    if not hasattr(signal, "SIGPIPE"):
        return _NOT_SET
    try:
        return signal.signal(signal.SIGPIPE, action)
    except ValueError:  # not the main thread
        return _NOT_SET


def module_main(prog: str, description: str, add_arguments: Callable, run: Callable,
                argv: Optional[list[str]] = None) -> int:
    """The `python -m ...` entry point of a command: the same arguments and code as `ckpt-daemon <command>`."""
    ap = Parser(prog=prog, description=description, epilog=EXIT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_argument(ap)
    add_arguments(ap)
    return invoke(run, ap.parse_args(argv))
