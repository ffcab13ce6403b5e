"""config.yaml as a file: reading it (bounded, through a symlink
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


def in_force_header(config_path: Path) -> str:
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
        if text.startswith("# ckpt-daemon: the config in force for ") and not text.startswith(in_force_header(config_path)):
            continue  # another config's
        try:
            return parse_config(text, config_path), text
        except ConfigError:
            continue
    return None


def read_checked(config_path: Path, good: Optional[tuple[Config, str]]) -> tuple[Config, str]:
    text = read_config_text(config_path)
    cfg = parse_config(text, config_path)
    lost = lost_sections(text, good[1] if good else None)
    if lost:
        raise ConfigError(lost_sections_error(config_path, lost))
    return cfg, text


def load_for_reading(config_path: Path) -> tuple[Config, Optional[str]]:
    """For commands that only look (status, list, cleanup --dry-run): the config, or with a broken one
    (or one that lost sections) the last good copy and the error to show beside what they print.
    Raises if neither is usable."""
    good = read_last_good(config_path)
    try:
        return read_checked(config_path, good)[0], None
    except ConfigError as exc:
        if good is None:
            raise
        return good[0], str(exc)
