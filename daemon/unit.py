"""Render and install the systemd units with this install's paths and user.

- One run on the host: systemd/ckpt-daemon.service, rendered whole (`install-unit`).
- Several runs on one host: the template systemd/ckpt-daemon@.service, the same for every instance, and
  for each instance NAME a drop-in beside it, ckpt-daemon@NAME.service.d/ckpt-daemon.conf, with what is
  that run's own: its config.yaml ($CKPT_DAEMON_CONFIG), its ckpt-daemon, user, working folder, the
  folders it writes and its stop timeout (`install-unit --instance NAME`). Each instance has its own
  state folder (StateDirectory=ckpt-daemon/%i), logs and HTTP port, from its own config.

Installing refuses a unit whose run would share a checkpoint folder, a logs folder or an HTTP port with
another unit installed beside it (the daemon refuses it at start too: one daemon per folder).
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import shlex
import shutil
import sys
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ckpt_daemon.config import Config, load_config
from ckpt_daemon.errors import CkptError, UsageError
from ckpt_daemon.fsutil import atomic_write_bytes

SYSTEMD = Path(__file__).resolve().parent.parent / "systemd"
TEMPLATE = SYSTEMD / "ckpt-daemon.service"
INSTANCE_TEMPLATE = SYSTEMD / "ckpt-daemon@.service"
DEFAULT_OUTPUT = Path("/etc/systemd/system/ckpt-daemon.service")
DEFAULT_TEMPLATE_OUTPUT = Path("/etc/systemd/system/ckpt-daemon@.service")
DROP_IN = "ckpt-daemon.conf"  # sorts before systemctl edit's override.conf: a person's own edits win
CONFIG_ENV = "CKPT_DAEMON_CONFIG"
# systemd allows more in an instance name, but each of these is also a file name and a journalctl -u
# argument that needs no escaping
INSTANCE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_WILDCARD = {"0.0.0.0", "::"}


def _spec(text: str) -> str:
    """A value for a unit file: '%' starts a specifier there, so a literal one is doubled."""
    if any(ord(c) < 32 or c in '"\\' for c in text):
        raise UsageError(f"The path {text!r} cannot be written into a systemd unit (it has a quote, a backslash or a "
                         "control character). Rename the folder, or use a symlink without them.")
    return text.replace("%", "%%")


def _word(text: str) -> str:
    """One word of a list (ExecStart=, ReadWritePaths=, Environment=): quoted when it has blanks."""
    s = _spec(text)
    return f'"{s}"' if any(c.isspace() for c in s) else s


@dataclass
class _Run:
    """What one config asks of its unit."""

    cfg: Config
    config: Path
    user: str
    group: str
    exe: str
    rw: list[str]
    stop_timeout: int


def _run(config_path: Path, user: Optional[str], exec_path: Optional[str], extra_rw: Optional[list[str]]) -> _Run:
    cfg = load_config(config_path)
    if user is None:
        user = pwd.getpwuid(os.stat(config_path).st_uid).pw_name
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        raise UsageError(f"There is no user {user!r} on this machine. Create it (useradd --system {user}) or pass --user.") from None
    if pw.pw_uid == 0:
        print("warning: the unit will run as root; pass --user to run it as an unprivileged user", file=sys.stderr)
    group = grp.getgrgid(pw.pw_gid).gr_name
    exe = exec_path or shutil.which("ckpt-daemon") or str(Path(sys.executable).parent / "ckpt-daemon")
    folders = [cfg.checkpoint_dir, cfg.snapshot_dir, cfg.consolidation_dir, cfg.log_dir]
    if cfg.http.textfile:
        folders.append(cfg.resolve_path(cfg.http.textfile))
    rw = sorted({str(p) for p in folders})
    # ProtectHome=read-only would stop the trainer writing its caches (Hugging Face, torch, triton...);
    # "-" lets the unit start where the folder does not exist yet
    rw.append(f"-{Path(pw.pw_dir) / '.cache'}")
    rw += [f"-{Path(p).resolve()}" for p in extra_rw or ()]
    return _Run(cfg, Path(config_path).resolve(), user, group, exe, rw, int(cfg.training.stop_timeout_s + 30))


def render_unit(config_path: Path, user: Optional[str] = None, exec_path: Optional[str] = None,
                extra_rw: Optional[list[str]] = None) -> str:
    """systemd/ckpt-daemon.service for one config."""
    r = _run(config_path, user, exec_path, extra_rw)
    text = TEMPLATE.read_text()
    for k, v in {"@ROOT@": _spec(str(r.cfg.base_dir)), "@DOC@": _doc(r.cfg), "@USER@": _spec(r.user),
                 "@GROUP@": _spec(r.group), "@EXEC@": _word(r.exe), "@CONFIG@": _word(str(r.config)),
                 "@RW_PATHS@": " ".join(_word(p) for p in r.rw), "@STOP_TIMEOUT@": str(r.stop_timeout)}.items():
        text = text.replace(k, v)
    return text


def render_instance(name: str, config_path: Path, user: Optional[str] = None, exec_path: Optional[str] = None,
                    extra_rw: Optional[list[str]] = None) -> tuple[str, str]:
    """(the template ckpt-daemon@.service, the drop-in of instance `name`) for one config."""
    check_instance_name(name)
    r = _run(config_path, user, exec_path, extra_rw)
    template = INSTANCE_TEMPLATE.read_text().replace("@EXEC@", _word(r.exe))
    drop_in = "\n".join([
        f"# ckpt-daemon@{name}: what is this instance's own. Rendered by `ckpt-daemon install-unit --instance {name}`",
        f"# for {r.config}; render it again after changing a folder, the user or training.stop_timeout_s there.",
        "[Unit]",
        f"Documentation={_doc(r.cfg)}",
        "",
        "[Service]",
        f"User={_spec(r.user)}",
        f"Group={_spec(r.group)}",
        f"WorkingDirectory={_spec(str(r.cfg.base_dir))}",
        f'Environment="{CONFIG_ENV}={_spec(str(r.config))}"',
        "ExecStart=",
        f"ExecStart={_word(r.exe)} run",
        f"ReadWritePaths={' '.join(_word(p) for p in r.rw)}",
        f"TimeoutStopSec={r.stop_timeout}",
        "",
    ])
    return template, drop_in


def check_instance_name(name: str) -> None:
    if not INSTANCE_NAME.fullmatch(name):
        raise UsageError(f"{name!r} cannot be an instance name: use 1 to 64 letters, digits, '_', '.' or '-', starting "
                         "with a letter or digit (e.g. --instance llama-8b).")


def _doc(cfg: Config) -> str:
    return _spec("file://" + urllib.parse.quote(str(cfg.base_dir / "README.md")))


# ------------------------------------------------------------------------------------ what is installed
def drop_in_path(template_path: Path, name: str) -> Path:
    stem = template_path.name[: -len("@.service")]
    return template_path.parent / f"{stem}@{name}.service.d" / DROP_IN


def installed_units(unit_dir: Path) -> dict[str, Path]:
    """{unit name: its config.yaml} of the ckpt-daemon units installed in `unit_dir`: the single unit
    (its ExecStart --config) and every instance (its drop-in's $CKPT_DAEMON_CONFIG)."""
    found: dict[str, Path] = {}
    single = unit_dir / DEFAULT_OUTPUT.name
    for line in _lines(single):
        if line.startswith("ExecStart="):
            words = _split(line[len("ExecStart="):])
            if "--config" in words[:-1]:
                found[single.name] = Path(words[words.index("--config") + 1].replace("%%", "%"))
    try:
        drop_ins = sorted(unit_dir.glob(f"ckpt-daemon@*.service.d/{DROP_IN}"))
    except OSError:
        drop_ins = []
    for p in drop_ins[:1000]:
        for line in _lines(p):
            if line.startswith("Environment="):
                for word in _split(line[len("Environment="):]):
                    if word.startswith(CONFIG_ENV + "="):
                        found[p.parent.name[: -len(".d")]] = Path(word[len(CONFIG_ENV) + 1:].replace("%%", "%"))
    return found


def _split(text: str) -> list[str]:
    try:
        return shlex.split(text)
    except ValueError:  # a line edited by hand beyond what shlex reads: not ours to judge
        return []


def _lines(path: Path) -> list[str]:
    try:
        if path.is_symlink() or not path.is_file() or path.stat().st_size > 1 << 20:
            return []
        return path.read_text(errors="replace").splitlines()
    except OSError:
        return []


def check_conflicts(unit: str, cfg: Config, unit_dir: Path) -> None:
    """Refuse a unit whose run would share a checkpoint folder, a logs folder or an HTTP port with another
    ckpt-daemon unit installed in `unit_dir` (reinstalling the same unit is no conflict)."""
    for other, config in installed_units(unit_dir).items():
        if other == unit:
            continue
        try:
            theirs = load_config(config)
        except (CkptError, OSError) as exc:
            print(f"warning: not checked against {other}: its config {config} cannot be read ({exc})", file=sys.stderr)
            continue
        clash = None
        if theirs.checkpoint_dir == cfg.checkpoint_dir:
            clash = f"its checkpoints.dir is the same folder, {cfg.checkpoint_dir}: one daemon per checkpoint folder"
        elif theirs.log_dir == cfg.log_dir:
            clash = f"its logging.dir is the same folder, {cfg.log_dir}: their state files and logs would mix"
        elif (theirs.http.enabled and cfg.http.enabled and theirs.http.port == cfg.http.port
              and (theirs.http.host == cfg.http.host or {theirs.http.host, cfg.http.host} & _WILDCARD)):
            clash = f"it serves HTTP on the same port, {cfg.http.port}: the second could not listen"
        if clash:
            raise UsageError(f"{unit} would clash with {other}, installed in {unit_dir} for {config}: {clash}. Give "
                             f"{cfg.source} its own folders and http.port, or remove {other} first.")


def install_unit(config_path: Path, user: Optional[str] = None, output: Optional[Path] = None,
                 print_only: bool = False, extra_rw: Optional[list[str]] = None, instance: Optional[str] = None) -> str:
    if instance is not None:
        return _install_instance(instance, config_path, user, output, print_only, extra_rw)
    text = render_unit(config_path, user, extra_rw=extra_rw)
    if print_only:
        return text
    out = output or DEFAULT_OUTPUT
    check_conflicts(out.name, load_config(config_path), out.parent)
    _write(out, text)
    return (f"wrote {out}. Now: systemctl daemon-reload && systemctl enable --now ckpt-daemon; "
            "journalctl -u ckpt-daemon -f to follow it.")


def _write(path: Path, text: str) -> None:
    try:
        path.parent.mkdir(mode=0o755, exist_ok=True)
        atomic_write_bytes(path, text.encode(), mode=0o644)
    except OSError as exc:
        raise CkptError(f"Cannot write {path}: {exc.strerror or exc}. Units go to /etc/systemd/system, which needs "
                        "root (sudo); or pass --output to write them elsewhere, or --print to see them.") from None


def _install_instance(name: str, config_path: Path, user: Optional[str], output: Optional[Path], print_only: bool,
                      extra_rw: Optional[list[str]]) -> str:
    template, drop_in = render_instance(name, config_path, user, extra_rw=extra_rw)
    out = output or DEFAULT_TEMPLATE_OUTPUT
    if not out.name.endswith("@.service") or out.name == "@.service":
        raise UsageError(f"With --instance, --output names the template unit, a file ending in '@.service' (such as "
                         f"{DEFAULT_TEMPLATE_OUTPUT}); the instance's drop-in goes beside it. {out} is not one.")
    unit = f"{out.name[: -len('@.service')]}@{name}.service"
    dest = drop_in_path(out, name)
    if print_only:
        return f"# {out}\n{template}\n# {dest}\n{drop_in}"
    check_conflicts(unit, load_config(config_path), out.parent)
    _write(out, template)
    _write(dest, drop_in)
    service = unit[: -len(".service")]
    return (f"wrote {out} and {dest}. Now: systemctl daemon-reload && systemctl enable --now {service}; "
            f"journalctl -u {service} -f to follow it.")
