"""config.yaml: one pydantic v2 model tree that mirrors the file.

Every field is typed, defaulted and documented (the descriptions feed `ckpt-daemon config-schema`).
Errors name the file, the field path (`retention.tiers[1].count`), what was given and what was
expected. Bad combinations are rejected, never silently rewritten. Relative folders resolve against
the config file's folder, so the daemon behaves the same whatever its working directory.
"""

from __future__ import annotations

import re
import zoneinfo
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ckpt_daemon.errors import ConfigError

DEFAULT_CONFIG_NAME = "config.yaml"

_DOW_NAMES = ["sun", "mon", "tue", "wed", "thu", "fri", "sat", "sun"]


def cron_to_apscheduler(expr: str) -> dict[str, str]:
    """Split a standard 5-field crontab line into APScheduler 3.x CronTrigger fields.

    APScheduler 3.x numbers weekdays from Monday=0, while crontab uses Sunday=0 (and 7); feeding
    "0 4 * * 0" straight to `CronTrigger.from_crontab` would fire on Mondays. Numeric weekdays are
    therefore rewritten to names, which both agree on.
    """
    fields = expr.split()
    second = None
    if len(fields) == 6:  # an optional leading seconds field, for tests and soaks
        second, fields = fields[0], fields[1:]
    if len(fields) != 5:
        raise ValueError(f"a cron expression has 5 fields (minute hour day month weekday), got {len(fields)}")

    def dow(token: str) -> str:
        if token.isdigit():
            n = int(token)
            if n > 7:
                raise ValueError(f"weekday {n} is out of range 0-7 (0 and 7 are Sunday)")
            return _DOW_NAMES[n]
        return token

    def convert_dow(field: str) -> str:
        parts = []
        for part in field.split(","):
            rng, _, step = part.partition("/")
            if "-" in rng:
                lo, hi = rng.split("-", 1)
                if lo.isdigit() and hi.isdigit() and int(hi) == 7 and int(lo) > 0:
                    # "5-7" in crontab means fri-sun, which APScheduler cannot wrap: spell it out.
                    names = [_DOW_NAMES[i] for i in range(int(lo), 8)]
                    if step:
                        raise ValueError("a weekday range ending at 7 cannot take a step")
                    parts.extend(names)
                    continue
                conv = f"{dow(lo)}-{dow(hi)}"
            else:
                conv = dow(rng)
            parts.append(conv + (f"/{step}" if step else ""))
        return ",".join(parts)

    minute, hour, day, month, weekday = fields
    out = {"minute": minute, "hour": hour, "day": day, "month": month, "day_of_week": convert_dow(weekday)}
    if second is not None:
        out["second"] = second
    return out


def validate_cron(expr: str) -> str:
    from apscheduler.triggers.cron import CronTrigger  # small import, no torch

    try:
        CronTrigger(timezone="UTC", **cron_to_apscheduler(expr))
    except ValueError as exc:
        raise ValueError(f"{expr!r} is not a valid cron expression: {exc}") from None
    return expr


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=False)


class CheckpointsConfig(_Section):
    dir: Path = Field(Path("checkpoints"), description="Folder holding the checkpoints (relative to config.yaml).")
    pattern: list[str] = Field(
        default_factory=lambda: ["checkpoint-{step}"],
        description=(
            "Name patterns of numbered checkpoints, each with one {step} field; other {fields} match digits. "
            "Folders matching are native or Hugging Face checkpoints; files (e.g. 'rolling_step_{step}.pt', "
            "'epoch={epoch}-step={step}.ckpt') are single-file checkpoints. A string or a list."
        ),
    )

    @field_validator("pattern", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @field_validator("pattern")
    @classmethod
    def _has_step(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("give at least one pattern, e.g. 'checkpoint-{step}'")
        for p in v:
            if p.count("{step}") != 1:
                raise ValueError(f"pattern {p!r} must contain the field {{step}} exactly once")
            if "/" in p or p.startswith("."):
                raise ValueError(f"pattern {p!r} must be a plain name: no '/' and no leading '.'")
            leftover = re.sub(r"\{[A-Za-z_][A-Za-z0-9_]*\}", "", p)
            if "{" in leftover or "}" in leftover:
                raise ValueError(f"pattern {p!r} has a malformed {{field}}: use names like {{step}} or {{epoch}}")
        return v


class RestartPolicy(_Section):
    initial_backoff_s: float = Field(5.0, gt=0, description="Wait before the first restart after a crash.")
    max_backoff_s: float = Field(300.0, gt=0, description="Backoff doubles per crash up to this cap.")
    healthy_after_s: float = Field(600.0, gt=0, description="A run this long resets the backoff and crash count.")
    max_crashes: int = Field(5, ge=1, description="Give up after this many crashes within crash_window_s.")
    crash_window_s: float = Field(3600.0, gt=0, description="Window for counting crashes (crash-loop protection).")
    same_checkpoint_crashes: int = Field(
        2, ge=1, description="After this many crashes from one checkpoint with no newer one, fall back to the previous."
    )
    heartbeat_timeout_s: float = Field(
        0.0, ge=0, description="Restart a trainer whose heartbeat is older than this (0 disables)."
    )

    @model_validator(mode="after")
    def _order(self) -> "RestartPolicy":
        if self.max_backoff_s < self.initial_backoff_s:
            raise ValueError(
                f"max_backoff_s ({self.max_backoff_s}) must be at least initial_backoff_s ({self.initial_backoff_s})"
            )
        return self


class TrainingConfig(_Section):
    command: list[str] = Field(
        default_factory=lambda: ["{python}", "-m", "trainer", "--config", "{config}"],
        description=(
            "argv of the training process. {python} is the daemon's interpreter, {config} this file, "
            "{resume} the checkpoint chosen for resume (also in $CKPT_RESUME; 'none' for a fresh start)."
        ),
    )
    cwd: Optional[Path] = Field(None, description="Working directory of the trainer (default: config.yaml's folder).")
    env: dict[str, str] = Field(default_factory=dict, description="Extra environment variables for the trainer.")
    restart: RestartPolicy = Field(default_factory=RestartPolicy, description="Crash restart policy.")
    stop_timeout_s: float = Field(
        120.0, gt=0, description="On stop, wait this long for the trainer's final save before killing it."
    )

    @field_validator("command")
    @classmethod
    def _nonempty(cls, v: list[str]) -> list[str]:
        if not v or not all(isinstance(a, str) and a for a in v):
            raise ValueError("give the command as a non-empty list of arguments, e.g. ['python', 'train.py']")
        return v


class ModelConfig(_Section):
    n_layer: int = Field(2, ge=1, description="Transformer blocks.")
    n_head: int = Field(4, ge=1, description="Attention heads per block.")
    n_embd: int = Field(128, ge=8, description="Embedding width; a multiple of n_head.")
    block_size: int = Field(64, ge=4, description="Context length in tokens.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout probability.")

    @model_validator(mode="after")
    def _heads(self) -> "ModelConfig":
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})")
        return self


class DataConfig(_Section):
    path: Optional[Path] = Field(
        None, description="A UTF-8 text file (character-level) or a .npy/.bin token file; null: a synthetic corpus."
    )
    synthetic_chars: int = Field(200_000, ge=10_000, description="Size of the synthetic corpus in characters.")
    val_fraction: float = Field(0.1, gt=0, lt=0.5, description="Share of the data held out for validation.")


class TrainerConfig(_Section):
    seed: int = Field(1337, description="Seed of everything: weights, data order, dropout.")
    max_steps: Optional[int] = Field(None, ge=1, description="Stop after this step; null trains forever.")
    batch_size: int = Field(16, ge=1, description="Sequences per step (per process under torchrun).")
    learning_rate: float = Field(3e-3, gt=0, description="Peak AdamW learning rate.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Cosine schedule floor as a share of the peak.")
    warmup_steps: int = Field(50, ge=0, description="Linear warmup steps.")
    lr_cycle_steps: int = Field(5000, ge=1, description="Length of one cosine cycle (restarts after it).")
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay.")
    grad_clip: float = Field(1.0, ge=0, description="Gradient norm clip (0 disables).")
    checkpoint_every_steps: int = Field(100, ge=1, description="Save a checkpoint every N steps.")
    eval_every_steps: int = Field(100, ge=1, description="Evaluate validation loss every N steps.")
    eval_batches: int = Field(8, ge=1, description="Batches per validation.")
    log_every_steps: int = Field(10, ge=1, description="Print a progress line every N steps.")
    best_metric: str = Field("val_loss", description="Metric that decides the best checkpoint.")
    best_mode: Literal["min", "max"] = Field("min", description="Whether lower or higher best_metric is better.")
    async_save: bool = Field(True, description="Write checkpoints in the background (training continues).")
    threads: int = Field(0, ge=0, description="torch CPU threads (0: torch's default).")
    model: ModelConfig = Field(default_factory=ModelConfig, description="Model size.")
    data: DataConfig = Field(default_factory=DataConfig, description="Training data.")


class Tier(_Section):
    count: Optional[int] = Field(None, ge=1, description="How many numbered checkpoints this tier covers.")
    every_steps: Optional[int] = Field(None, ge=1, description="Keep one per this many steps (omit: keep all).")


class RetentionConfig(_Section):
    enabled: bool = Field(True, description="Run retention on its schedule (cleanup by hand works regardless).")
    schedule: str = Field("0 4 * * 0", description="Cron expression (weekday 0 = Sunday) for the weekly retention; a 6th leading field gives seconds.")
    tiers: list[Tier] = Field(
        default_factory=lambda: [Tier(count=20), Tier(count=20, every_steps=200), Tier(every_steps=1000)],
        description="Graduated tiers, newest first; only the last may omit count.",
    )
    keep_trash: bool = Field(False, description="Keep deleted checkpoints in .trash until the next run (for undo).")

    _cron = field_validator("schedule")(classmethod(lambda cls, v: validate_cron(v)))

    @field_validator("tiers")
    @classmethod
    def _tiers(cls, tiers: list[Tier]) -> list[Tier]:
        if not tiers:
            raise ValueError("give at least one tier, e.g. [{count: 20}, {every_steps: 1000}]")
        for i, t in enumerate(tiers[:-1]):
            if t.count is None:
                raise ValueError(f"[{i}].count|is missing: only the last tier may omit count (it covers all the rest)")
        prev = None
        for i, t in enumerate(tiers):
            if t.every_steps is None:
                if prev is not None:
                    raise ValueError(
                        f"[{i}].every_steps|is missing, so this tier keeps every checkpoint, but an earlier tier "
                        f"keeps one per {prev} steps: older tiers must thin at least as much as newer ones"
                    )
                continue
            if prev is not None and t.every_steps % prev:
                raise ValueError(
                    f"[{i}].every_steps|must be a multiple of the previous tier's every_steps ({prev}) so that "
                    f"thinning is monotonic (given: {t.every_steps})"
                )
            prev = t.every_steps
        return tiers


class SnapshotsConfig(_Section):
    enabled: bool = Field(True, description="Take the daily snapshot.")
    dir: Path = Field(Path("snapshots"), description="Folder of the daily snapshots (relative to config.yaml).")
    schedule: str = Field("0 3 * * *", description="Cron expression of the snapshot (daily 03:00).")
    include: list[Literal["latest", "best"]] = Field(
        default_factory=lambda: ["latest", "best"], description="Which checkpoints a snapshot holds."
    )
    keep_daily: int = Field(7, ge=0, description="Keep the last snapshot of each of the last N days.")
    keep_weekly: int = Field(4, ge=0, description="Keep the last snapshot of each of the last N weeks.")
    keep_monthly: int = Field(6, ge=0, description="Keep the last snapshot of each of the last N months.")

    _cron = field_validator("schedule")(classmethod(lambda cls, v: validate_cron(v)))

    @field_validator("include")
    @classmethod
    def _include(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("a snapshot must include at least one of 'latest', 'best'")
        return v


class ConsolidationConfig(_Section):
    dir: Path = Field(Path("consolidated_models"), description="Folder of the exported models.")
    dtype: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="Default dtype of exports.")


class DiskConfig(_Section):
    check_interval_s: float = Field(300.0, ge=5, description="How often the daemon checks free space.")
    warn_free_gb: float = Field(20.0, ge=0, description="Below this much free space, warn.")
    emergency_free_gb: float = Field(5.0, ge=0, description="Below this, run retention at once.")
    save_margin_mb: float = Field(
        64.0, ge=0, description="A save starts only if free space exceeds the last save's size plus this margin."
    )

    @model_validator(mode="after")
    def _order(self) -> "DiskConfig":
        if self.emergency_free_gb > self.warn_free_gb:
            raise ValueError(
                f"emergency_free_gb ({self.emergency_free_gb}) must not exceed warn_free_gb ({self.warn_free_gb})"
            )
        return self


class LoggingConfig(_Section):
    dir: Path = Field(Path("logs"), description="Folder of daemon.log, cleanup.log, trainer.log, metrics.jsonl.")
    level: Literal["debug", "info", "warning", "error"] = Field("info", description="Console and file log level.")
    max_bytes: int = Field(10 * 1024 * 1024, ge=1024, description="Rotate daemon.log and trainer.log at this size.")
    backups: int = Field(5, ge=0, description="Rotated files kept.")


class Config(_Section):
    checkpoints: CheckpointsConfig = Field(default_factory=CheckpointsConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    retention: RetentionConfig = Field(default_factory=RetentionConfig)
    snapshots: SnapshotsConfig = Field(default_factory=SnapshotsConfig)
    consolidation: ConsolidationConfig = Field(default_factory=ConsolidationConfig)
    disk: DiskConfig = Field(default_factory=DiskConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    timezone: str = Field("UTC", description="IANA time zone of the schedules, e.g. 'Europe/Berlin'.")

    # Where the file lives; set by load_config. Not a YAML key.
    source: Optional[Path] = Field(None, exclude=True, description="(internal) path of the loaded file")

    @field_validator("timezone")
    @classmethod
    def _tz(cls, v: str) -> str:
        try:
            zoneinfo.ZoneInfo(v)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"{v!r} is not a known IANA time zone (e.g. 'UTC', 'Europe/Berlin')") from None
        return v

    # ---- resolved paths -------------------------------------------------------------------------
    @property
    def base_dir(self) -> Path:
        return self.source.parent if self.source else Path.cwd()

    def resolve_path(self, p: Path) -> Path:
        """A config path made absolute against config.yaml's folder."""
        p = p.expanduser()
        return (p if p.is_absolute() else self.base_dir / p).resolve()

    @property
    def checkpoint_dir(self) -> Path:
        return self.resolve_path(self.checkpoints.dir)

    @property
    def snapshot_dir(self) -> Path:
        return self.resolve_path(self.snapshots.dir)

    @property
    def consolidation_dir(self) -> Path:
        return self.resolve_path(self.consolidation.dir)

    @property
    def log_dir(self) -> Path:
        return self.resolve_path(self.logging.dir)

    @property
    def state_dir(self) -> Path:
        """Where the daemon keeps its state file (beside the logs, which are always writable)."""
        return self.log_dir

    def data_path(self) -> Optional[Path]:
        return self.resolve_path(self.trainer.data.path) if self.trainer.data.path else None

    @model_validator(mode="after")
    def _folders(self) -> "Config":
        if self.source is None:
            return self
        ck = self.checkpoint_dir
        if ck == Path(ck.anchor):
            raise ValueError(f"checkpoints.dir|must not be the filesystem root (given: {ck})")
        for key, p in (("snapshots.dir", self.snapshot_dir), ("consolidation.dir", self.consolidation_dir)):
            if p == ck or p.is_relative_to(ck) or ck.is_relative_to(p):
                raise ValueError(
                    f"{key}|({p}) overlaps checkpoints.dir ({ck}): cleanup would treat one as part of the other; "
                    "give them separate folders"
                )
        return self


def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def _describe_errors(path: Path, exc: ValidationError) -> str:
    lines = []
    for err in exc.errors(include_url=False):
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith(("function-", "tagged-"))))
        msg = err["msg"].removeprefix("Value error, ")
        given = err.get("input")
        if err["type"] == "extra_forbidden":
            msg = "is not a known key (check its spelling and indentation; `ckpt-daemon config-schema` lists them)"
            lines.append(f"{_loc(loc)} {msg}")
            continue
        if err["type"] == "missing":
            lines.append(f"{_loc(loc)} is required")
            continue
        if "|" in msg and not msg.startswith(" "):
            where, msg = msg.split("|", 1)
            # A cross-field check names its own field: relative ("[1].count") or absolute ("snapshots.dir").
            field = _loc(loc) + where if where.startswith(("[", ".")) else where
            lines.append(f"{field} {msg}")
            continue
        shown = repr(given)
        if len(shown) > 80:
            shown = shown[:77] + "..."
        lines.append(f"{_loc(loc)}: {msg} (given: {shown})")
    n = len(lines)
    return (
        f"{path} is not a valid ckpt-daemon config ({n} problem{'s' if n != 1 else ''}): "
        + "; ".join(lines)
        + ". Fix the field(s) named and try again; `ckpt-daemon check-config` validates the file without starting anything."
    )


def parse_config(text: str, path: Path) -> Config:
    """Validate YAML text as if it were the file at `path` (relative folders resolve against its folder)."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(
            f"{path} is not valid YAML{where}: {problem}. Check the indentation and quoting there "
            "(a value containing ':' or '#' needs quotes)."
        ) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path} must hold a mapping of sections (checkpoints:, training:, ...), but its top level is a "
            f"{type(data).__name__}. Start from the config.yaml shipped with ckpt-daemon."
        )
    try:
        return Config.model_validate({**data, "source": path.resolve()})
    except ValidationError as exc:
        raise ConfigError(_describe_errors(path, exc)) from None


def load_config(path: str | Path | None = None) -> Config:
    """Read and validate config.yaml; raise ConfigError with a one-paragraph message on any problem."""
    p = Path(path) if path is not None else Path.cwd() / DEFAULT_CONFIG_NAME
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"The config file {p} does not exist. Pass --config PATH, or run from the folder that holds "
            "config.yaml (a commented default ships at the root of the ckpt-daemon repository)."
        ) from None
    except IsADirectoryError:
        raise ConfigError(f"{p} is a folder, not a config file. Pass the path of config.yaml itself.") from None
    except (PermissionError, UnicodeDecodeError) as exc:
        raise ConfigError(f"The config file {p} cannot be read ({exc}). Check its permissions and encoding (UTF-8).") from None
    return parse_config(text, p)


def config_schema() -> dict:
    schema = Config.model_json_schema()
    schema.get("properties", {}).pop("source", None)
    schema["title"] = "ckpt-daemon config.yaml"
    return schema


def effective_config(cfg: Config) -> dict:
    """The config with defaults filled in, as plain data (for check-config and change logs)."""
    return cfg.model_dump(mode="json", exclude={"source"})


def diff_configs(old: Config, new: Config) -> list[str]:
    """Dotted paths whose values differ, with old -> new; used to log what a hot reload changed."""
    out: list[str] = []

    def walk(a: Any, b: Any, path: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b)):
                walk(a.get(k), b.get(k), f"{path}.{k}" if path else k)
        elif a != b:
            out.append(f"{path}: {a!r} -> {b!r}")

    walk(effective_config(old), effective_config(new), "")
    return out
