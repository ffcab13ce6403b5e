"""ckpt-daemon: supervise continuous PyTorch training and keep its checkpoints safe.

Commands (each takes --config PATH, default ./config.yaml):
  run             run the daemon in the foreground (what systemd starts)
  status          what is running, the latest and best checkpoints, disk, next jobs
  list            the checkpoint catalog as a table (--verify checks checksums)
  check-config    validate a config file and print the effective config
  config-schema   print the JSON Schema of config.yaml (for editors)
  install-unit    render systemd/ckpt-daemon.service for this install
  pin / unpin     protect a checkpoint from retention, or release it
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Optional

from ckpt_daemon.errors import CkptError


def _age(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= n:
            return f"{seconds / n:.1f}{unit}"
    return f"{seconds:.0f}s"


def cmd_check_config(args) -> int:
    import datetime as dt

    import yaml

    from ckpt_daemon.config import effective_config, load_config, next_runs
    from ckpt_daemon.errors import ConfigError

    try:
        cfg = load_config(args.path or args.config)
    except ConfigError as exc:
        if not args.json:
            raise
        print(json.dumps({"ok": False, "error": {"type": type(exc).__name__, "message": str(exc), "exit_code": exc.exit_code}}))
        return exc.exit_code
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


def cmd_list(args) -> int:
    from ckpt_daemon import catalog as cat
    from maintenance.cleanup import human

    cfg, _ = _load_for_reading(args)
    c = cat.scan_config(cfg, verify=args.verify)
    if args.json:
        print(json.dumps({"root": str(c.root), "checkpoints": [e.to_json() for e in c.entries],
                          "in_progress": [{"name": p.name, "step": p.step} for p in c.in_progress],
                          "ignored": [{"name": n, "why": w} for n, w in c.ignored], "pointers": c.pointers,
                          "resumed_from": c.resumed_from}, indent=2, default=str))
        return 0
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    t = Table(title=escape(f"{c.root} ({len(c.entries)} checkpoints, {len(c.valid())} valid)"), title_justify="left")
    for col in ("name", "step", "layout", "status", "size", "frees", "age", "epoch", "metrics", "marks"):
        t.add_column(col, justify="right" if col in ("step", "size", "frees", "age", "epoch") else "left")
    now = time.time()
    for e in c.entries:
        marks = [p for p, n in c.pointers.items() if n == e.name]
        if e.pin:
            marks.append(f"pinned: {e.pin}")
        if c.resumed_from == e.name:
            marks.append("resumed from")
        status = e.status + (" (verified)" if e.verified and e.valid else "") + (f": {e.reason}" if e.reason else "")
        # every text from the folder is escaped: a name or a pin reason like "[/x]" is not rich markup
        t.add_row(*(escape(x) for x in (e.name, str(e.step), e.layout, status, human(e.bytes), human(e.freeable_bytes),
                                        _age(now - e.mtime), "" if e.epoch is None else str(e.epoch),
                                        " ".join(f"{k}={v:.4g}" for k, v in e.metrics.items()), ", ".join(marks))))
    Console(width=max(120, os.get_terminal_size().columns if sys.stdout.isatty() else 160)).print(t)
    for p in c.in_progress:
        print(f"in progress or interrupted (ignored): {p.name}")
    for n, w in c.ignored:
        print(f"not a checkpoint: {n} ({w})")
    return 0


def _load_for_reading(args):
    """The config for a command that only looks; with a broken config.yaml, the last good copy and the
    error (printed to stderr), so that what runs is still shown."""
    from ckpt_daemon.configfile import load_for_reading

    cfg, error = load_for_reading(Path(args.config))
    if error:
        print(f"warning: {args.config} is broken; showing what is there with the last good config. {error}",
              file=sys.stderr)
    return cfg, error


def daemon_alive(cfg, s: Optional[dict]) -> bool:
    from ckpt_daemon import runtime

    if not s:
        return False
    try:
        os.kill(int(s["daemon"]["pid"]), 0)
    except (ProcessLookupError, KeyError, TypeError, ValueError):
        return False
    except PermissionError:
        pass
    return runtime.daemon_running(cfg.checkpoint_dir)


def cmd_status(args) -> int:
    from daemon.state import read_state
    from daemon.statusview import render

    cfg, config_error = _load_for_reading(args)
    s = read_state(cfg.log_dir)
    alive = daemon_alive(cfg, s)
    code = 0 if alive else 5
    if args.json:
        print(json.dumps({"running": alive, "config_error": config_error, **(s or {})}, indent=2, default=str))
        return code
    if not s:
        print(f"ckpt-daemon has not run with {cfg.source} (no {cfg.log_dir / 'daemon-state.json'}).")
        return code
    for _style, line in render(s, alive, time.time(), config_error, str(args.config)):
        print(line)
    return code


def cmd_run(args) -> int:
    from daemon.core import Daemon

    return Daemon(Path(args.config), echo_trainer=not args.quiet_trainer).run()


def cmd_install_unit(args) -> int:
    from daemon.unit import install_unit

    print(install_unit(Path(args.config), user=args.user, output=Path(args.output) if args.output else None,
                       print_only=args.print))
    return 0


def cmd_pin(args) -> int:
    from ckpt_daemon import catalog as cat
    from ckpt_daemon import runtime
    from ckpt_daemon.config import load_config

    cfg = load_config(args.config)
    c = cat.scan_config(cfg, stats=False)
    if c.by_name(args.name) is None:
        raise CkptError(f"There is no checkpoint named {args.name!r} in {cfg.checkpoint_dir}; `ckpt-daemon list` shows them.")
    if args.command == "pin":
        runtime.pin(cfg.checkpoint_dir, args.name, args.reason)
        print(f"pinned {args.name}: retention will keep it")
    else:
        print(f"unpinned {args.name}" if runtime.unpin(cfg.checkpoint_dir, args.name) else f"{args.name} was not pinned by a user")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="ckpt-daemon", description=__doc__.split("\n\n")[0],
                                 epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)

    def add(name, func, help_):
        p = sub.add_parser(name, help=help_, description=help_)
        p.add_argument("--config", default="config.yaml", help="path of config.yaml (default: ./config.yaml)")
        p.set_defaults(func=func)
        return p

    p = add("run", cmd_run, "run the daemon in the foreground")
    p.add_argument("--quiet-trainer", action="store_true", help="do not echo the trainer's output (it is in logs/trainer.log)")
    p = add("status", cmd_status, "show the daemon's status")
    p.add_argument("--json", action="store_true")
    p = add("list", cmd_list, "list checkpoints")
    p.add_argument("--json", action="store_true")
    p.add_argument("--verify", action="store_true", help="verify checksums (reads every byte)")
    p = add("check-config", cmd_check_config, "validate a config file and print the effective config and next runs")
    p.add_argument("path", nargs="?", help="config file (default: --config)")
    p.add_argument("--json", action="store_true", help="print one JSON object: ok, effective config, next runs (or the error)")
    add("config-schema", cmd_schema, "print the JSON Schema of config.yaml")
    p = add("install-unit", cmd_install_unit, "render and install the systemd unit")
    p.add_argument("--user", default=None, help="unprivileged user the service runs as (default: owner of config.yaml)")
    p.add_argument("--output", default=None, help="where to write the unit (default: /etc/systemd/system/ckpt-daemon.service)")
    p.add_argument("--print", action="store_true", help="print the unit instead of writing it")
    for name in ("pin", "unpin"):
        p = add(name, cmd_pin, f"{name} a checkpoint (retention never deletes a pinned one)")
        p.add_argument("name", help="checkpoint name, e.g. checkpoint-5000")
        if name == "pin":
            p.add_argument("--reason", default="pinned by user")
    args = ap.parse_args(argv)
    from ckpt_daemon.cliutil import safe_stdio

    safe_stdio()
    if args.command != "run":
        import signal

        signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `ckpt-daemon list | head` ends quietly
    try:
        return args.func(args)
    except CkptError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
