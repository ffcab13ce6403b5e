"""ckpt-daemon: supervise continuous PyTorch training and keep its checkpoints safe.

Every operation is a subcommand; `--config PATH` goes before or after it (default: $CKPT_DAEMON_CONFIG,
else ./config.yaml). `ckpt-daemon COMMAND --help` says what each flag does. The user's own entry points
(`python -m maintenance.cleanup`, `python -m trainer`, ...) run the same code with the same flags.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable, Optional

from ckpt_daemon import __version__
from ckpt_daemon.cliutil import EXIT_EPILOG, Parser, add_config_argument, add_json_argument, config_path, invoke, number
from ckpt_daemon.errors import CkptError, UsageError


def add_check_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", nargs="?", help="the config file to check (default: --config)")
    add_json_argument(p, "one object: ok, the effective config and the next runs")


def cmd_check_config(args) -> int:
    import datetime as dt

    import yaml

    from ckpt_daemon.config import effective_config, load_config, next_runs

    cfg = load_config(args.path or config_path(args))
    eff = effective_config(cfg)
    for section, folder in (("checkpoints", cfg.checkpoint_dir), ("snapshots", cfg.snapshot_dir),
                            ("consolidation", cfg.consolidation_dir), ("logging", cfg.log_dir)):
        eff[section]["dir"] = str(folder)
    runs = next_runs(cfg, dt.datetime.now(dt.timezone.utc))
    if args.json:
        print(json.dumps({"ok": True, "config": str(cfg.source), "effective": eff, "next_runs": runs}, indent=2))
        return 0
    print(f"# {cfg.source}: valid. Effective config (defaults filled in, folders resolved):")
    print(yaml.safe_dump(eff, sort_keys=False, default_flow_style=None), end="")
    for name, times in runs.items():
        print(f"# next {name} runs ({cfg.timezone}): {', '.join(times)}")
    if not runs:
        print("# no scheduled snapshot or retention: both are disabled")
    return 0


def cmd_schema(args) -> int:
    from ckpt_daemon.config import config_schema

    print(json.dumps(config_schema(), indent=2))
    return 0


def add_list(p: argparse.ArgumentParser) -> None:
    p.add_argument("--verify", action="store_true",
                   help="verify every checksum (reads every byte); exit 1 if any checkpoint is damaged")
    p.add_argument("--remote", action="store_true",
                   help="list the replicas of every target in replicas: instead (with --verify: read back and hash them)")
    add_json_argument(p, "the catalog")


def cmd_list(args) -> int:
    from ckpt_daemon.store import catalog as cat
    from ckpt_daemon.store import resolve as rs
    from ckpt_daemon.units import age, human

    cfg, _ = _load_for_reading(args)
    if getattr(args, "remote", False):
        return _list_remote(cfg, args)
    c = cat.scan_config(cfg, verify=args.verify)
    roles = rs.roles(c)  # what latest and best name for every command (a damaged newest is not latest)
    # damage found is a failure (exit 1), so `ckpt-daemon list --verify && ...` in a cron job notices it;
    # a checkpoint still being written is not damage
    bad = [e for e in c.entries if not e.valid and e.status != "in_progress"] if args.verify else []
    code = 1 if bad else 0
    if args.json:
        print(json.dumps({"ok": not bad, "root": str(c.root), "checkpoints": [e.to_json() for e in c.entries],
                          "in_progress": [{"name": p.name, "step": p.step} for p in c.in_progress],
                          "ignored": [{"name": n, "why": w} for n, w in c.ignored], "pointers": roles,
                          "resumed_from": c.resumed_from}, indent=2, default=str))
        return code
    from rich.console import Console
    from rich.markup import escape as markup_escape
    from rich.table import Table

    from ckpt_daemon.termtext import inert

    def escape(text: str) -> str:  # not rich markup, and no terminal escape sequence
        return markup_escape(inert(text))

    t = Table(title=escape(f"{c.root} ({len(c.entries)} checkpoints, {len(c.valid())} valid)"), title_justify="left")
    for col in ("name", "step", "layout", "status", "size", "frees", "age", "epoch", "metrics", "marks"):
        t.add_column(col, justify="right" if col in ("step", "size", "frees", "age", "epoch") else "left")
    now = time.time()
    for e in c.entries:
        marks = [p for p, n in roles.items() if n == e.name]
        if e.pin:
            marks.append(f"pinned: {e.pin}")
        if e.epoch_end:
            marks.append(f"end of epoch {e.epoch}")
        if c.resumed_from == e.name:
            marks.append("resumed from")
        status = e.status + (" (verified)" if e.verified and e.valid else "") + (f": {e.reason}" if e.reason else "")
        # every text from the folder is escaped: a name, a metric name or a pin reason like "[/x]" or "\x1b]0;"
        # is neither rich markup nor a terminal escape sequence
        t.add_row(*(escape(x) for x in (e.name, str(e.step), e.layout, status, human(e.bytes), human(e.freeable_bytes),
                                        age(now - e.mtime), "" if e.epoch is None else str(e.epoch),
                                        " ".join(f"{k}={v:.4g}" for k, v in e.metrics.items()), ", ".join(marks))))
    Console(width=max(120, os.get_terminal_size().columns if sys.stdout.isatty() else 160)).print(t)
    for p in c.in_progress:
        print(inert(f"in progress or interrupted (ignored): {p.name}"))
    for n, w in c.ignored:
        print(inert(f"not a checkpoint: {n} ({w})"))
    if bad:
        print(inert(f"{len(bad)} checkpoint(s) are not usable ({', '.join(e.name for e in bad[:5])}"
                    f"{', ...' if len(bad) > 5 else ''}): the daemon never resumes from them; restore one from a "
                    "snapshot (`ckpt-daemon restore`) if you need it."), file=sys.stderr)
    return code


def _list_remote(cfg, args) -> int:
    """`list --remote`: every replica of every target, in `list --json`'s entry shape."""
    from ckpt_daemon.remote.connect import store_for
    from ckpt_daemon.remote.listing import scan_remote, verify_replica
    from ckpt_daemon.units import human

    if not cfg.replicas:
        raise UsageError(f"{cfg.source} has no replicas: section; add one (see README, Replicas) to list its copies.")
    targets, entries, bad = [], [], 0
    for r in cfg.replicas:
        url = cfg.replica_target(r).url
        try:
            store = store_for(cfg, r, warn=lambda w: print(f"warning: {w}", file=sys.stderr))
            rc = scan_remote(store)
            reps = [verify_replica(store, x) for x in rc.replicas] if args.verify else rc.replicas
        except CkptError as exc:
            targets.append({"url": url, "ok": False, "error": str(exc), "in_progress": [], "pointers": {}})
            bad += 1
            continue
        bad += sum(not x.valid for x in reps)
        entries += [x.to_json() for x in reps]
        targets.append({"url": url, "ok": all(x.valid for x in reps), "error": None, "pointers": rc.pointers,
                        "in_progress": [{"name": n, "objects": len(o)} for n, o in rc.in_progress.items()]})
    code = 1 if bad else 0
    if args.json:
        print(json.dumps({"ok": not bad, "checkpoints": entries, "targets": targets}, indent=2, default=str))
        return code
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console(width=max(120, os.get_terminal_size().columns if sys.stdout.isatty() else 160))
    now = time.time()
    from ckpt_daemon.units import age

    for tg in targets:
        mine = [e for e in entries if e["url"].startswith(tg["url"] + "/")]
        if tg["error"]:
            print(f"{tg['url']}: {tg['error']}", file=sys.stderr)
            continue
        t = Table(title=escape(f"{tg['url']} ({len(mine)} replicas, {sum(e['status'] == 'complete' for e in mine)} complete)"),
                  title_justify="left")
        for col in ("name", "step", "layout", "status", "size", "age", "metrics", "marks"):
            t.add_column(col, justify="right" if col in ("step", "size", "age") else "left")
        for e in mine:
            marks = [p for p, n in tg["pointers"].items() if n == e["name"]]
            status = e["status"] + (" (verified)" if e["verified"] and e["status"] == "complete" else "") + (
                f": {e['reason']}" if e["reason"] else "")
            t.add_row(*(escape(x) for x in (e["name"], str(e["step"]), e["layout"], status, human(e["bytes"]),
                                            age(now - e["mtime"]) if e["mtime"] else "",
                                            " ".join(f"{k}={v:.4g}" for k, v in e["metrics"].items()), ", ".join(marks))))
        console.print(t)
        for p in tg["in_progress"]:
            print(f"upload in progress or interrupted (not a replica): {p['name']} ({p['objects']} objects)")
    return code


def _load_for_reading(args):
    """The config for a command that only looks; with a broken config.yaml, the last good copy and the
    error (printed to stderr), so that what runs is still shown."""
    from ckpt_daemon.configfile import load_for_reading

    cfg, error = load_for_reading(config_path(args))
    if error:
        print(f"warning: {config_path(args)} is broken; showing what is there with the last good config. {error}",
              file=sys.stderr)
    return cfg, error


def daemon_alive(cfg, s: Optional[dict]) -> bool:
    from ckpt_daemon import runtime

    if not s:
        return False
    try:
        os.kill(int(s["daemon"]["pid"]), 0)
    except (ProcessLookupError, KeyError, TypeError, ValueError, OverflowError):
        return False
    except PermissionError:
        pass
    return runtime.daemon_running(cfg.checkpoint_dir)


def add_status(p: argparse.ArgumentParser) -> None:
    add_json_argument(p, "the daemon's state (with running: true/false)")
    p.add_argument("--watch", nargs="?", type=number(float, 0.2, 3600), const=2.0, default=None, metavar="SECONDS",
                   help="refresh in place every SECONDS (default 2) until Ctrl+C")


STYLES = {"ok": "bold green", "warn": "bold yellow", "bad": "bold red", "": ""}


def _status_lines(args) -> tuple[int, Optional[dict], list[tuple[str, str]]]:
    from daemon import statusdoc
    from daemon.state import read_state, state_path
    from daemon.statusview import render

    cfg, config_error = _load_for_reading(args)
    raw = read_state(cfg.log_dir)
    alive = daemon_alive(cfg, raw)
    code = 0 if alive else 5
    if not raw:
        return code, None, [("bad",
                             f"ckpt-daemon has not run with {cfg.source} (no {cfg.log_dir / 'daemon-state.json'}).")]
    try:
        s = statusdoc.parse(raw, str(state_path(cfg.log_dir)))
    except statusdoc.StatusUnreadable as exc:
        return 1, {"ok": False, "running": alive, "error": str(exc)}, [("bad", str(exc))]
    doc = {"ok": True, "running": alive, "config_error": config_error, **s.to_json()}
    return code, doc, render(s, alive, time.time(), config_error, str(config_path(args)))


def cmd_status(args) -> int:
    if args.json:
        code, doc, lines = _status_lines(args)
        print(json.dumps(doc or {"ok": True, "running": False, "message": lines[0][1]}, indent=2, default=str))
        return code
    from rich.console import Console
    from rich.text import Text

    from ckpt_daemon.termtext import inert

    console = Console(highlight=False)  # colour only where the terminal supports it; NO_COLOR is honoured

    def text() -> tuple[int, Text]:
        code, _, lines = _status_lines(args)
        t = Text()
        for i, (style, line) in enumerate(lines):  # names, metrics and the trainer's output made inert
            t.append(inert(line) + ("\n" if i < len(lines) - 1 else ""), style=STYLES.get(style, ""))
        return code, t

    if args.watch is None:
        code, t = text()
        console.print(t, soft_wrap=True)
        return code
    from rich.live import Live

    every = args.watch
    code, t = text()
    restore = _stop_on_signals()
    try:
        if not console.is_terminal:  # a pipe or a log: one whole report per refresh, in order
            while True:
                console.print(t, soft_wrap=True)
                print(flush=True)
                time.sleep(every)
                code, t = text()
        with Live(t, console=console, auto_refresh=False, screen=False) as live:
            while True:
                time.sleep(every)
                code, t = text()
                live.update(t, refresh=True)
    except KeyboardInterrupt:
        return code
    finally:
        restore()


def _stop_on_signals() -> Callable[[], None]:
    """SIGINT and SIGTERM end `status --watch` cleanly (the Live display puts the cursor back), whatever
    the process inherited: a script's background job and nohup start it with SIGINT ignored, and SIGTERM's
    default action would leave the terminal without a cursor. Returns what puts the old handlers back."""
    import signal

    stopping = []

    def stop(_signum, _frame) -> None:
        if not stopping:  # a second signal while the display is being closed does not interrupt that
            stopping.append(True)
            raise KeyboardInterrupt

    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            previous[sig] = signal.signal(sig, stop)
        except ValueError:  # not the main thread (called in-process): nothing to install
            pass

    def restore() -> None:
        for sig, handler in previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)

    return restore


def add_run(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet-trainer", action="store_true",
                   help="do not echo the trainer's output (it is in logs/trainer.log either way)")


def cmd_run(args) -> int:
    from daemon.core import Daemon

    return Daemon(config_path(args), echo_trainer=not args.quiet_trainer).run()


def add_install_unit(p: argparse.ArgumentParser) -> None:
    p.add_argument("--user", default=None,
                   help="the unprivileged user the service runs as (default: owner of config.yaml)")
    p.add_argument("--instance", default=None, metavar="NAME",
                   help="install instance NAME of the template unit ckpt-daemon@.service (several runs on one host, "
                        "each with its own config): the template and NAME's drop-in with this config")
    p.add_argument("--output", default=None, metavar="PATH",
                   help="where to write the unit (default: /etc/systemd/system/ckpt-daemon.service; with --instance, "
                        "the template /etc/systemd/system/ckpt-daemon@.service, with the drop-in beside it)")
    p.add_argument("--print", action="store_true", help="print the unit instead of writing it")
    p.add_argument("--read-write", action="append", default=[], metavar="PATH",
                   help="another folder the trainer writes (repeatable); the service user's ~/.cache is writable "
                        "already, the rest of /home is read-only")


def cmd_install_unit(args) -> int:
    from daemon.unit import install_unit

    print(install_unit(config_path(args), user=args.user, output=Path(args.output) if args.output else None,
                       print_only=args.print, extra_rw=args.read_write, instance=args.instance))
    return 0


def add_pin(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", metavar="CHECKPOINT", help="a checkpoint's name (checkpoint-5000) or its step (5000)")
    p.add_argument("--reason", default="pinned by user", help="why, shown by list, status and cleanup")
    add_json_argument(p)


def add_unpin(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", metavar="CHECKPOINT", help="a checkpoint's name (checkpoint-5000) or its step (5000)")
    add_json_argument(p)


def _find(c, name: str, where: Path):
    """A checkpoint by name, or by step when the name is a number (one checkpoint at that step)."""
    e = c.by_name(name)
    if e is not None:
        return e
    if name.isascii() and name.isdigit():
        hits = [x for x in c.entries if x.step == int(name)]
        if len(hits) == 1:
            return hits[0]
        if hits:
            raise UsageError(f"Several checkpoints are at step {name} ({', '.join(x.name for x in hits)}); "
                             "name the one you mean.")
    raise UsageError(f"There is no checkpoint named {name!r} or at that step in {where}; `ckpt-daemon list` shows them.")


def cmd_pin(args) -> int:
    from ckpt_daemon import runtime
    from ckpt_daemon.config import load_config
    from ckpt_daemon.store import catalog as cat

    cfg = load_config(config_path(args))
    c = cat.scan_config(cfg, stats=False)
    e = _find(c, args.name, cfg.checkpoint_dir)
    out = {"ok": True, "name": e.name, "step": e.step}
    if args.command == "pin":
        before = runtime.read_pins(cfg.checkpoint_dir).get(e.name)
        runtime.pin(cfg.checkpoint_dir, e.name, args.reason)
        out.update(pinned=True, message=f"pinned {e.name}: retention will keep it"
                   + (f" (the reason was {before!r}, now {args.reason!r})" if before and before != args.reason else ""))
    else:
        was_pinned = runtime.unpin(cfg.checkpoint_dir, e.name)
        released = False
        if e.epoch_end and cfg.retention.keep_epoch_ends:
            runtime.release(cfg.checkpoint_dir, e.name)
            released = True
        msgs = []
        if was_pinned:
            msgs.append(f"unpinned {e.name}")
        if released:
            msgs.append(f"released {e.name} as the last checkpoint of epoch {e.epoch}: retention may delete it now "
                        "(`ckpt-daemon pin` protects it again; retention.keep_epoch_ends: false releases every epoch end)")
        if not msgs:
            msgs.append(f"{e.name} was not pinned by a user")
        out.update(pinned=False, released_epoch_end=released, message="; ".join(msgs))
    from ckpt_daemon.termtext import inert

    print(json.dumps(out) if args.json else inert(out["message"]))  # a name or reason may hold escape sequences
    return 0


def add_completion(p: argparse.ArgumentParser) -> None:
    p.add_argument("shell", choices=["bash", "zsh", "fish"],
                   help="the shell; e.g. `ckpt-daemon completion bash > /etc/bash_completion.d/ckpt-daemon`")


def cmd_completion(args) -> int:
    try:
        import shtab
    except ImportError:
        raise CkptError("Shell completion needs the shtab package: pip install shtab.") from None
    print(shtab.complete(build_parser(), shell=args.shell))
    return 0


# name -> (module, add_arguments, run, help); modules are imported when the parser is built, and none
# of them imports torch at import time (train and generate import it when they run).
def _commands() -> dict[str, tuple[Callable, Callable, str]]:
    from maintenance import cleanup, compress, consolidate, restore, snapshot
    from trainer import cli as tcli

    return {
        "run": (add_run, cmd_run, "run the daemon in the foreground (what systemd starts)"),
        "status": (add_status, cmd_status,
                   "what runs, the latest and best checkpoints, disk and next jobs; a verdict first"),
        "list": (add_list, cmd_list, "the checkpoint catalog as a table (--verify checks every checksum)"),
        "cleanup": (cleanup.add_arguments, cleanup.run, cleanup.HELP),
        "snapshot": (snapshot.add_arguments, snapshot.run, snapshot.HELP),
        "restore": (restore.add_arguments, restore.run, restore.HELP),
        "consolidate": (consolidate.add_arguments, consolidate.run, consolidate.HELP),
        "compress": (compress.add_arguments, compress.run, compress.HELP),
        "generate": (tcli.add_generate_arguments, tcli.run_generate, tcli.GENERATE_HELP),
        "train": (tcli.add_train_arguments, tcli.run_train, tcli.TRAIN_HELP),
        "pin": (add_pin, cmd_pin, "protect a checkpoint (name or step) from retention"),
        "unpin": (add_unpin, cmd_pin, "release a user's pin, or the epoch-end protection of one checkpoint"),
        "check-config": (add_check_config, cmd_check_config,
                         "validate a config file; print the effective config and next runs"),
        "config-schema": (lambda p: None, cmd_schema, "print the JSON Schema of config.yaml (for editors)"),
        "install-unit": (add_install_unit, cmd_install_unit, "render and install the systemd unit for this install"),
        "completion": (add_completion, cmd_completion, "print a shell completion script (bash, zsh or fish)"),
    }


# Commands that take no config file.
NO_CONFIG = {"compress", "generate", "config-schema", "completion"}
# Commands that live long and write to sockets and pipes others may close (see cliutil.invoke).
LONG_LIVED = {"run"}


def build_parser() -> Parser:
    ap = Parser(prog="ckpt-daemon", description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1]
                + "\n" + EXIT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--version", action="version", version=f"ckpt-daemon {__version__}")
    add_config_argument(ap)
    sub = ap.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True
    for name, (add, run, help_) in _commands().items():
        p = sub.add_parser(name, help=help_, description=help_[0].upper() + help_[1:] + ".", epilog=EXIT_EPILOG,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        if name not in NO_CONFIG:
            add_config_argument(p, top=False)
        add(p)
        p.set_defaults(func=run)
    return ap


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return invoke(args.func, args, long_lived=args.command in LONG_LIVED)


if __name__ == "__main__":
    sys.exit(main())
