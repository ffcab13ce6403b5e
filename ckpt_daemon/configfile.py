"""config.yaml as a file that changes under a running daemon: reading it (bounded, through a symlink
the user may re-point), the last good copy, and the edits that must never take effect silently.

Rules (README, "Configuration"):
- The last good copy (`logs/config.last-good.yaml`) is only ever replaced by a config that validated
  and was put in force.
- An edit that drops a top-level section the running config has (an emptied or truncated file) is
  rejected: write `section: {}` to go back to the defaults on purpose.
- An edit that moves a folder (checkpoints.dir, snapshots.dir, consolidation.dir, logging.dir) is
  held until the daemon restarts, and status says so: a silent move would start a new run from step 0.
- A broken file at start runs on the last good copy; commands that only look (status, list, cleanup
  --dry-run) do the same and say that the config is broken.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ckpt_daemon.config import Config, parse_config
from ckpt_daemon.errors import ConfigError

LAST_GOOD = "config.last-good.yaml"
MAX_CONFIG_BYTES = 256 << 10
FOLDER_KEYS = ("checkpoints.dir", "snapshots.dir", "consolidation.dir", "logging.dir")


def read_config_text(path: Path) -> str:
    """The text of config.yaml (following a symlink: pointing config.yaml elsewhere is the user's
    choice), at most MAX_CONFIG_BYTES. Raises ConfigError naming the cause."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(
            f"The config file {path} does not exist. Pass --config PATH, or run from the folder that holds "
            "config.yaml (a commented default ships at the root of the ckpt-daemon repository).") from None
    except IsADirectoryError:
        raise ConfigError(f"{path} is a folder, not a config file. Pass the path of config.yaml itself.") from None
    except OSError as exc:
        raise ConfigError(f"The config file {path} cannot be read ({exc.strerror or exc}). Check its permissions.") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(
            f"{path} is larger than {MAX_CONFIG_BYTES // 1024} KiB, far more than any ckpt-daemon config; it was not "
            "read. Check that config points at the right file (start from the shipped config.yaml).")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not UTF-8 text. Save it as UTF-8 and try again.") from None


def text_digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def sections(text: str) -> set[str]:
    """Top-level keys of a YAML mapping, without constructing it (cheap, and safe on any text)."""
    import yaml

    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except (yaml.YAMLError, RecursionError):
        return set()
    if not isinstance(node, yaml.MappingNode):
        return set()
    return {k.value for k, _ in node.value if isinstance(k, yaml.ScalarNode) and isinstance(k.value, str)}


def lost_sections(new_text: str, good_text: Optional[str]) -> list[str]:
    if not good_text:
        return []
    return sorted(sections(good_text) - sections(new_text))


def folder_changes(old: Config, new: Config) -> list[str]:
    """What would make a running daemon look at other checkpoints: a folder, a name pattern, the runs."""
    out = []
    for key, a, b in (("checkpoints.dir", old.checkpoint_dir, new.checkpoint_dir),
                      ("checkpoints.pattern", old.checkpoints.pattern, new.checkpoints.pattern),
                      ("checkpoints.runs", old.checkpoints.runs, new.checkpoints.runs),
                      ("snapshots.dir", old.snapshot_dir, new.snapshot_dir),
                      ("consolidation.dir", old.consolidation_dir, new.consolidation_dir),
                      ("logging.dir", old.log_dir, new.log_dir)):
        if a != b:
            out.append(f"{key} from {a} to {b}")
    return out


def lost_sections_error(path: Path, lost: list[str]) -> str:
    names = ", ".join(f"`{s}:`" for s in lost)
    return (f"{path} no longer has the section(s) {names} that the running config has, so it looks emptied or "
            f"truncated (an editor or a disk that filled up mid-save). The daemon keeps the config in force and "
            f"nothing changed. If you meant to go back to the defaults, write the section explicitly, e.g. `{lost[0]}: {{}}`.")


def _guess_log_dir(config_path: Path) -> Path:
    """Where the last good copy lives when config.yaml itself does not validate: its logging.dir if
    the YAML still says one, else the default `logs` beside it."""
    import yaml

    base = Path(os.path.abspath(config_path)).parent
    try:
        raw = yaml.safe_load(read_config_text(config_path))
        d = Path(raw["logging"]["dir"]).expanduser()
        return d if d.is_absolute() else base / d
    except Exception:  # anything at all: this is only a guess
        return base / "logs"


def state_home() -> Path:
    """Where the daemon keeps what must not depend on config.yaml itself: systemd's StateDirectory, else
    $XDG_STATE_HOME/ckpt-daemon (~/.local/state/ckpt-daemon)."""
    sd = os.environ.get("STATE_DIRECTORY", "").split(":")[0]
    if sd:
        return Path(sd)
    xdg = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(xdg) / "ckpt-daemon"


def _header(config_path: Path) -> str:
    return f"# ckpt-daemon: the config in force for {os.path.abspath(config_path)}\n"


def last_good_path(config_path: Path, cfg: Optional[Config] = None) -> Path:
    return (cfg.log_dir if cfg is not None else _guess_log_dir(config_path)) / LAST_GOOD


def stable_copy_path(config_path: Path) -> Path:
    """A copy of the config in force at a place that does not depend on config.yaml: found even when an
    edit lost the `logging:` section that says where the logs are."""
    key = hashlib.sha256(os.path.abspath(config_path).encode("utf-8", "surrogateescape")).hexdigest()[:16]
    return state_home() / f"config-in-force-{key}.yaml"


def read_last_good(config_path: Path) -> Optional[tuple[Config, str]]:
    """The last config put in force for this config.yaml (the stable copy, else the one in the logs
    folder), or None. A copy made for another config (two configs sharing a logs folder) is not used."""
    for p in (stable_copy_path(config_path), last_good_path(config_path)):
        try:
            text = read_config_text(p)
        except ConfigError:
            continue
        if text.startswith("# ckpt-daemon: the config in force for ") and not text.startswith(_header(config_path)):
            continue  # another config's
        try:
            return parse_config(text, config_path), text
        except ConfigError:
            continue
    return None


@dataclass
class Loaded:
    cfg: Config
    text: str  # the text in force
    error: Optional[str] = None  # why config.yaml itself is not in force (running on the last good copy)
    notes: tuple[str, ...] = ()


def _read_checked(config_path: Path, good: Optional[tuple[Config, str]]) -> tuple[Config, str]:
    text = read_config_text(config_path)
    cfg = parse_config(text, config_path)
    lost = lost_sections(text, good[1] if good else None)
    if lost:
        raise ConfigError(lost_sections_error(config_path, lost))
    return cfg, text


def load_with_fallback(config_path: Path) -> Loaded:
    """config.yaml if it validates and has every section the last good copy has; else the last good
    copy, with the reason. Raises ConfigError only if there is no last good copy to fall back to."""
    good = read_last_good(config_path)
    try:
        cfg, text = _read_checked(config_path, good)
    except ConfigError as exc:
        if good is None:
            raise ConfigError(f"{exc} (No last good config was found to fall back to, so the daemon cannot start.)") from None
        return Loaded(good[0], good[1], str(exc))
    notes = tuple(f"{c} since the last run" for c in folder_changes(good[0], cfg)) if good else ()
    return Loaded(cfg, text, None, notes)


def load_for_reading(config_path: Path) -> tuple[Config, Optional[str]]:
    """For commands that only look (status, list, cleanup --dry-run): the config, or with a broken one
    (or one that lost sections) the last good copy and the error to show beside what they print.
    Raises if neither is usable."""
    good = read_last_good(config_path)
    try:
        return _read_checked(config_path, good)[0], None
    except ConfigError as exc:
        if good is None:
            raise
        return good[0], str(exc)


def save_last_good(cfg: Config, text: str, config_path: Optional[Path] = None) -> Optional[str]:
    """Keep the text of the config now in force (in the logs folder, and at a stable place); it is also
    what the trainer is given. Returns an error message instead of raising."""
    from ckpt_daemon.fsutil import atomic_write_bytes

    config_path = config_path or cfg.source
    header = _header(config_path)
    body = text[len(header):] if text.startswith("# ckpt-daemon: the config in force for ") else text
    data = (header + body.split("\n", 1)[1] if body.startswith("# ckpt-daemon: the config in force for ") else header + body)
    try:
        stable = stable_copy_path(config_path)
        stable.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(stable, data.encode("utf-8"), mode=0o600)
    except OSError:
        pass  # best effort: a read-only home under a hardened unit without StateDirectory
    try:
        cfg.log_dir.mkdir(parents=True, exist_ok=True)
        # 0600: it holds what config.yaml holds, secrets included (notify.urls, http.token); the trainer runs as us
        atomic_write_bytes(cfg.log_dir / LAST_GOOD, data.encode("utf-8"), mode=0o600)
        return None
    except OSError as exc:
        return str(exc)


def config_key(path: Path) -> tuple:
    """What changes when config.yaml is edited or its symlink re-pointed (cheap: two stats)."""
    out: list = []
    try:
        lst = os.lstat(path)
        out.append((lst.st_ino, lst.st_mtime_ns))
        if os.path.islink(path):
            out.append(os.readlink(path))
    except OSError:
        out.append(None)
    try:
        st = os.stat(path)
        out.append((st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size, st.st_ctime_ns))
    except OSError:
        out.append(None)
    return tuple(out)
