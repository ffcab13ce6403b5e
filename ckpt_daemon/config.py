"""config.yaml: one pydantic v2 model tree that mirrors the file.

Every field is typed, defaulted and documented (the descriptions feed `ckpt-daemon config-schema`).
Errors name the file, the field path (`retention.tiers[1].count`), what was given and what was
expected. Bad combinations are rejected, never silently rewritten. Relative folders resolve against
the config file's folder, so the daemon behaves the same whatever its working directory.
"""

from __future__ import annotations

import datetime as dt
import difflib
import os
import re
import stat
import sys
import typing
import zoneinfo
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    field_serializer,
    field_validator,
    model_validator,
)

from ckpt_daemon.cron import next_fire_times, validate_cron
from ckpt_daemon.errors import ConfigError

DEFAULT_CONFIG_NAME = "config.yaml"

# Upper bounds no real deployment reaches; they keep a typo (or a hostile file) from overflowing a timer,
# blocking the daemon or filling memory. Counts of list items are also capped by MAX_YAML_NODES.
DAY_S = 86_400
MONTH_S = 30 * DAY_S
MAX_STEPS = 10**15
MAX_PATH_CHARS = 4096
MAX_ARG_BYTES = 64 << 10
MAX_ENV_VARS = 256
MAX_ENV_NAME_CHARS = 256
MAX_ENV_BYTES = 256 << 10
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _check_path(p: Path) -> Path:
    text = str(p)
    if len(text) > MAX_PATH_CHARS:
        raise ValueError(f"a path has at most {MAX_PATH_CHARS} characters, this one has {len(text)}")
    if "\0" in text:
        raise ValueError("a path cannot contain a NUL character")
    return p


BoundedPath = Annotated[Path, AfterValidator(_check_path)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=False, allow_inf_nan=False)


def _string_or_list(schema: dict) -> None:
    """JSON Schema of a field that takes one string or a list of them (the validator turns a string into
    a one-item list, so the schema pydantic derives from list[str] alone would flag `pattern: 'x-{step}'`)."""
    items = schema.pop("items", {"type": "string"})
    max_items = schema.pop("maxItems", None)
    schema.pop("type", None)
    schema["anyOf"] = [items, {"type": "array", "items": items, **({"maxItems": max_items} if max_items else {})}]


class MemoryConfig(_Section):
    enabled: bool = Field(
        False, description=("Memory-first checkpoints: the trainer copies its state into shared memory every "
                            "every_steps steps (a pause of one memory copy) and the daemon persists one of them in "
                            "persist_every as a normal checkpoint, and the newest one whenever the trainer dies. "
                            "Needs room for two copies of the state in dir. Used by the built-in trainer, "
                            "CheckpointManager(memory=True) and the Hugging Face and Lightning callbacks under the daemon."))
    every_steps: int = Field(1, ge=1, le=MAX_STEPS, description="The built-in trainer copies its state to memory every N steps.")
    persist_every: int = Field(
        10, ge=1, le=1_000_000,
        description="The daemon writes every Mth memory checkpoint to the checkpoint folder (and the newest at a crash or stop).")
    persist_every_s: Optional[float] = Field(
        None, gt=0, le=DAY_S,
        description="Also persist the newest memory checkpoint when the last persist is this old (null: by count only).")
    dir: Optional[BoundedPath] = Field(
        None, description=("Folder on a tmpfs for the two memory slots (null: /dev/shm/ckpt-daemon-<id>, one per "
                           "checkpoints.dir). Removed when training finishes or the daemon stops cleanly."))
    max_gb: float = Field(64.0, gt=0, le=1_000_000, description="Refuse memory checkpoints whose two slots would exceed this many GiB.")
    best_to_disk: Literal["every", "interval", "at_end"] = Field(
        "every", description=("When the Hugging Face and Lightning callbacks write a new best checkpoint "
                              "(metric_for_best_model, ModelCheckpoint(monitor=...)) to disk as well as to memory: "
                              "'every' new best at once (with an improving metric that is most saves, so memory "
                              "helps little); 'interval' at most every best_to_disk_interval_s (a newer best "
                              "replaces one waiting); 'at_end' only when training ends. Whatever is chosen, the best "
                              "is on disk when training ends; one waiting is held as one more copy (in the tmpfs for "
                              "Hugging Face, in the trainer's memory for Lightning) and is lost if the trainer is "
                              "killed first (the daemon's persists still cover the steps)."))
    best_to_disk_interval_s: Optional[float] = Field(
        None, gt=0, le=DAY_S,
        description="With best_to_disk: interval, the least time between two writes of a best to disk (seconds).")

    @model_validator(mode="after")
    def _best_interval(self) -> "MemoryConfig":
        if self.best_to_disk == "interval" and self.best_to_disk_interval_s is None:
            raise ValueError("|best_to_disk is 'interval' but best_to_disk_interval_s is not set: give the least "
                             "time between two writes of a best to disk, e.g. best_to_disk_interval_s: 1800")
        if self.best_to_disk != "interval" and self.best_to_disk_interval_s is not None:
            raise ValueError(f"|best_to_disk_interval_s is set but best_to_disk is '{self.best_to_disk}': set "
                             "best_to_disk: interval to use it, or remove best_to_disk_interval_s")
        return self


class CheckpointsConfig(_Section):
    dir: BoundedPath = Field(Path("checkpoints"), description="Folder holding the checkpoints (relative to config.yaml).")
    pattern: list[str] = Field(
        default_factory=lambda: ["checkpoint-{step}"],
        max_length=32,
        description=(
            "Name patterns of numbered checkpoints, each with one {step} field; other {fields} match digits. "
            "Folders matching are native or Hugging Face checkpoints; files (e.g. 'rolling_step_{step}.pt', "
            "'epoch={epoch}-step={step}.ckpt') are single-file checkpoints. A string or a list (at most 32)."
        ),
        json_schema_extra=_string_or_list,
    )

    runs: list[str] = Field(
        default_factory=list, max_length=64,
        description=("Subfolders of dir that each hold a run or stage of their own (e.g. [sft, dpo] for "
                     "checkpoints/sft/checkpoint-1000/): each gets its own latest, best, retention and state "
                     "folder. Other subfolders are never touched."),
    )
    memory: MemoryConfig = Field(default_factory=MemoryConfig, description="Memory-first checkpoints (opt-in).")
    settle_s: float = Field(
        30.0, ge=1, le=DAY_S,
        description=("A checkpoint written by another trainer whose files have not changed for this long has "
                     "settled: it is checked and its checksums are recorded. Before that it is 'in progress'."),
    )

    @field_validator("runs")
    @classmethod
    def _runs(cls, v: list[str]) -> list[str]:
        for r in v:
            if not r or len(r) > 255 or "/" in r or "\0" in r or r.startswith(".") or r in ("latest", "best"):
                raise ValueError(f"run {r[:60]!r} must be a plain folder name inside checkpoints.dir")
        if len(set(v)) != len(v):
            raise ValueError("a run is named twice")
        return v

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
            if len(p) > 255:
                raise ValueError(f"pattern {_short(p)} has {len(p)} characters; a file name has at most 255")
            if p.count("{step}") != 1:
                raise ValueError(f"pattern {p!r} must contain the field {{step}} exactly once")
            if "/" in p or p.startswith(".") or "\0" in p:
                raise ValueError(f"pattern {p!r} must be a plain name: no '/', no NUL and no leading '.'")
            leftover = re.sub(r"\{[A-Za-z_][A-Za-z0-9_]*\}", "", p)
            if "{" in leftover or "}" in leftover:
                raise ValueError(f"pattern {p!r} has a malformed {{field}}: use names like {{step}} or {{epoch}}")
        return v


class RestartPolicy(_Section):
    initial_backoff_s: float = Field(5.0, gt=0, le=DAY_S, description="Wait before the first restart after a crash (at most a day).")
    max_backoff_s: float = Field(300.0, gt=0, le=DAY_S, description="Backoff doubles per crash up to this cap (at most a day).")
    first_restart_immediate: bool = Field(
        True, description=("Restart at once after a first crash (one after a healthy run, or the first at all): it "
                           "costs no wait; from the second crash in a row on, initial_backoff_s applies and doubles."))
    healthy_after_s: float = Field(
        600.0, gt=0, le=MONTH_S, description="A run this long resets the backoff and crash count (at most 30 days)."
    )
    max_crashes: int = Field(5, ge=1, le=10_000, description="Give up after this many crashes within crash_window_s.")
    crash_window_s: float = Field(
        3600.0, gt=0, le=MONTH_S, description="Window for counting crashes (crash-loop protection; at most 30 days)."
    )
    same_checkpoint_crashes: int = Field(
        2, ge=1, le=1000,
        description="After this many crashes from one checkpoint with no newer one, fall back to the previous.",
    )
    heartbeat_timeout_s: float = Field(
        0.0, ge=0, le=DAY_S, description="Restart a trainer whose heartbeat is older than this (0 disables; at most a day)."
    )
    heartbeat_grace_s: float = Field(
        300.0, ge=0, le=DAY_S,
        description=("Before a run's first heartbeat, allow this long (imports, data loading, torchrun's rendezvous); "
                     "heartbeat_timeout_s applies from the first heartbeat on."),
    )
    give_up_retry_s: float = Field(
        1800.0, ge=0, le=MONTH_S,
        description=("After giving up (max_crashes), try again after this long (0: never by itself). A give-up for a "
                     "full disk is retried as soon as there is room again."),
    )

    @model_validator(mode="after")
    def _order(self) -> "RestartPolicy":
        if self.max_backoff_s < self.initial_backoff_s:
            raise ValueError(
                f"max_backoff_s ({self.max_backoff_s}) must be at least initial_backoff_s ({self.initial_backoff_s})"
            )
        return self


def is_builtin_trainer(command: list[str]) -> bool:
    """Whether training.command runs the built-in trainer (`{python} -m trainer ...`)."""
    return len(command) >= 3 and command[0] in ("{python}", sys.executable) and command[1:3] == ["-m", "trainer"]


class TrainingConfig(_Section):
    command: list[str] = Field(
        default_factory=lambda: ["{python}", "-m", "trainer", "--config", "{config}"],
        max_length=1024,
        description=(
            "argv of the training process. {python} is the daemon's interpreter, {config} this file, "
            "{resume} the checkpoint chosen for resume (also in $CKPT_RESUME; 'none' for a fresh start). "
            "At most 1024 arguments of at most 64 KiB each."
        ),
    )
    cwd: Optional[BoundedPath] = Field(None, description="Working directory of the trainer (default: config.yaml's folder).")
    env: dict[str, str] = Field(
        default_factory=dict,
        max_length=MAX_ENV_VARS,
        description="Extra environment variables for the trainer (at most 256; values at most 64 KiB, 256 KiB in all).",
    )
    restart: RestartPolicy = Field(default_factory=RestartPolicy, description="Crash restart policy.")
    stop_timeout_s: float = Field(
        120.0, gt=0, le=DAY_S, description="On stop, wait this long for the trainer's final save before killing it."
    )
    warm_spare: bool = Field(
        False, description=("Keep a warm spare of the built-in trainer: a second process that has already imported "
                             "torch and waits, so that a restart after a crash skips the interpreter start and the "
                             "imports (seconds). Costs the memory of an idle process with torch loaded (about "
                             "0.3 GiB). The built-in trainer only (training.command [{python}, -m, trainer, ...])."))

    @model_validator(mode="after")
    def _spare_needs_builtin(self) -> "TrainingConfig":
        if self.warm_spare and any("{resume}" in a for a in self.command):
            raise ValueError(".warm_spare|is true, but training.command holds {resume}: a warm spare is started before "
                             "the resume point is known. The built-in trainer reads it from $CKPT_RESUME; drop "
                             "{resume} from the command, or set warm_spare: false")
        if self.warm_spare and not is_builtin_trainer(self.command):
            raise ValueError(".warm_spare|is true, but training.command is not the built-in trainer: a warm spare "
                             "must wait for the daemon's handover before it trains, which only the built-in "
                             "trainer ([\"{python}\", \"-m\", \"trainer\", ...]) does. Set warm_spare: false")
        return self

    @field_validator("command")
    @classmethod
    def _nonempty(cls, v: list[str]) -> list[str]:
        if not v or not all(isinstance(a, str) and a for a in v):
            raise ValueError("give the command as a non-empty list of arguments, e.g. ['python', 'train.py']")
        for i, a in enumerate(v):
            if len(a.encode("utf-8", "surrogatepass")) > MAX_ARG_BYTES:
                raise ValueError(f"[{i}]|is {_short(a)}: an argument has at most 64 KiB")
            if "\0" in a:
                raise ValueError(f"[{i}]|is {_short(a)}: an argument cannot hold a NUL character")
        return v

    @field_validator("env")
    @classmethod
    def _env(cls, env: dict[str, str]) -> dict[str, str]:
        total = 0
        for name, value in env.items():
            if len(name) > MAX_ENV_NAME_CHARS or not _ENV_NAME.fullmatch(name):
                raise ValueError(
                    f"|has a variable named {_short(name)}: a name is letters, digits and '_', not starting with a "
                    f"digit, at most {MAX_ENV_NAME_CHARS} characters"
                )
            size = len(value.encode("utf-8", "surrogatepass"))
            if size > MAX_ARG_BYTES:
                raise ValueError(f".{name}|is {size} bytes long; a value has at most 64 KiB")
            if "\0" in value:
                raise ValueError(f".{name}|is {_short(value)}: a value cannot hold a NUL character")
            total += len(name) + 1 + size
        if total > MAX_ENV_BYTES:
            raise ValueError(f"|holds {total} bytes of variables; at most {MAX_ENV_BYTES // 1024} KiB in all")
        return env


class ModelConfig(_Section):
    n_layer: int = Field(2, ge=1, le=1024, description="Transformer blocks.")
    n_head: int = Field(4, ge=1, le=1024, description="Attention heads per block.")
    n_embd: int = Field(128, ge=8, le=65_536, description="Embedding width; a multiple of n_head.")
    block_size: int = Field(64, ge=4, le=1 << 20, description="Context length in tokens.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout probability.")

    @model_validator(mode="after")
    def _heads(self) -> "ModelConfig":
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})")
        return self


class DataConfig(_Section):
    path: Optional[BoundedPath] = Field(
        None, description="A UTF-8 text file (character-level) or a .npy/.bin token file; null: a synthetic corpus."
    )
    synthetic_chars: int = Field(
        200_000, ge=10_000, le=10**9, description="Size of the synthetic corpus in characters (held in memory)."
    )
    val_fraction: float = Field(0.1, gt=0, lt=0.5, description="Share of the data held out for validation.")


class TrainerConfig(_Section):
    seed: int = Field(1337, ge=0, le=2**32 - 1, description="Seed of everything: weights, data order, dropout.")
    max_steps: Optional[int] = Field(None, ge=1, le=MAX_STEPS, description="Stop after this step; null trains forever.")
    batch_size: int = Field(16, ge=1, le=1 << 20, description="Sequences per step (per process under torchrun).")
    learning_rate: float = Field(3e-3, gt=0, le=10, description="Peak AdamW learning rate.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Cosine schedule floor as a share of the peak.")
    warmup_steps: int = Field(50, ge=0, le=MAX_STEPS, description="Linear warmup steps.")
    lr_cycle_steps: int = Field(5000, ge=1, le=MAX_STEPS, description="Length of one cosine cycle (restarts after it).")
    weight_decay: float = Field(0.1, ge=0, le=10, description="AdamW weight decay.")
    grad_clip: float = Field(1.0, ge=0, le=1e6, description="Gradient norm clip (0 disables).")
    checkpoint_every_steps: int = Field(100, ge=1, le=MAX_STEPS, description="Save a checkpoint every N steps.")
    eval_every_steps: int = Field(100, ge=1, le=MAX_STEPS, description="Evaluate validation loss every N steps.")
    eval_batches: int = Field(8, ge=1, le=1_000_000, description="Batches per validation.")
    log_every_steps: int = Field(10, ge=1, le=MAX_STEPS, description="Print a progress line every N steps.")
    best_metric: str = Field(
        "val_loss", min_length=1, max_length=128, description="Metric that decides the best checkpoint."
    )
    best_mode: Literal["min", "max"] = Field("min", description="Whether lower or higher best_metric is better.")
    async_save: bool = Field(True, description="Write checkpoints in the background (training continues).")
    threads: int = Field(0, ge=0, le=1024, description="torch CPU threads (0: torch's default).")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description=("Where the built-in trainer computes: auto (a CUDA GPU when torch sees one, else the CPU), "
                             "cpu, or cuda (an error without one). Under torchrun each process uses cuda:LOCAL_RANK."))
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description=("Autocast precision of the forward pass: fp32 (none), bf16, or fp16 (with a gradient "
                             "scaler, saved in every checkpoint). Weights and optimizer state stay fp32."))
    deterministic: bool = Field(
        False, description=("Deterministic kernels (torch.use_deterministic_algorithms, CUBLAS_WORKSPACE_CONFIG): on a "
                            "GPU, needed for a resume whose losses equal an uninterrupted run's bit for bit; slower. "
                            "CPU training is deterministic either way."))
    model: ModelConfig = Field(default_factory=ModelConfig, description="Model size.")
    data: DataConfig = Field(default_factory=DataConfig, description="Training data.")


class Tier(_Section):
    count: Optional[int] = Field(
        None, ge=1, le=1_000_000, description="How many numbered checkpoints this tier covers."
    )
    every_steps: Optional[int] = Field(
        None, ge=1, le=10**12, description="Keep one per this many steps (omit: keep all)."
    )


class RetentionConfig(_Section):
    enabled: bool = Field(True, description="Run retention on its schedule (cleanup by hand works regardless).")
    schedule: str = Field("0 4 * * 0", description="Cron expression (weekday 0 = Sunday) for the weekly retention; "
                                                   "a 6th leading field gives seconds.")
    tiers: list[Tier] = Field(
        default_factory=lambda: [Tier(count=20), Tier(count=20, every_steps=200), Tier(every_steps=1000)],
        max_length=32,
        description="Graduated tiers, newest first; only the last may omit count (at most 32 tiers).",
    )
    keep_epoch_ends: bool = Field(
        True, description="Keep the last checkpoint of every epoch (any trainer), whatever the tiers say.")
    # 100 is more epochs than nearly any real schedule has (ImageNet's 90, fine-tunes' 1-10), so real
    # epoch ends stay kept for good, as users ask; a script whose `epoch` changes every few saves would
    # otherwise make every checkpoint an epoch end and retention would never delete anything.
    max_epoch_ends: Optional[int] = Field(
        100, ge=1, le=1_000_000,
        description=("keep_epoch_ends protects at most the newest this many epoch ends; older ones follow the tiers "
                     "(null: no limit)."))
    keep_trash: bool = Field(False, description="Keep deleted checkpoints in .trash until the next run (for undo).")

    _cron = field_validator("schedule")(classmethod(lambda cls, v: validate_cron(v)))

    @field_validator("tiers")
    @classmethod
    def _tiers(cls, tiers: list[Tier]) -> list[Tier]:
        return check_tiers(tiers)


def check_tiers(tiers: list[Tier]) -> list[Tier]:
    """The rules every list of retention tiers follows (the local ones and a replica's own)."""
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
    dir: BoundedPath = Field(Path("snapshots"), description="Folder of the daily snapshots (relative to config.yaml).")
    schedule: str = Field("0 3 * * *", description="Cron expression of the snapshot (daily 03:00).")
    include: list[Literal["latest", "best"]] = Field(
        default_factory=lambda: ["latest", "best"], max_length=2, description="Which checkpoints a snapshot holds."
    )
    keep_daily: int = Field(7, ge=0, le=10_000, description="Keep the last snapshot of each of the last N days.")
    keep_weekly: int = Field(4, ge=0, le=10_000, description="Keep the last snapshot of each of the last N weeks.")
    keep_monthly: int = Field(6, ge=0, le=10_000, description="Keep the last snapshot of each of the last N months.")
    mode: Literal["auto", "link", "copy"] = Field(
        "auto",
        description=("How checkpoints go into a snapshot. link: hard links (zero bytes, but a byte damaged in place "
                     "damages the snapshot too); copy: an independent, verified copy (a reflink where the filesystem "
                     "can, else real bytes); auto: a reflink where the filesystem can (independent and zero bytes), "
                     "else hard links."),
    )

    _cron = field_validator("schedule")(classmethod(lambda cls, v: validate_cron(v)))

    @field_validator("include")
    @classmethod
    def _include(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("a snapshot must include at least one of 'latest', 'best'")
        return v

    @model_validator(mode="after")
    def _keeps_something(self) -> "SnapshotsConfig":
        # Manual snapshots prune too, so this holds whether or not the daily one is enabled.
        if not (self.keep_daily or self.keep_weekly or self.keep_monthly):
            raise ValueError(
                "|has keep_daily, keep_weekly and keep_monthly all 0, which would delete every snapshot but the "
                "newest: set at least one of them above 0 (to take no daily snapshot, set snapshots.enabled: false)"
            )
        return self


class ConsolidationConfig(_Section):
    dir: BoundedPath = Field(Path("consolidated_models"), description="Folder of the exported models.")
    dtype: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="Default dtype of exports.")


class DiskConfig(_Section):
    check_interval_s: float = Field(
        300.0, ge=5, le=DAY_S, description="How often the daemon checks free space (5 s to a day)."
    )
    warn_free_gb: float = Field(20.0, ge=0, le=1e9, description="Below this much free space, warn.")
    emergency_free_gb: float = Field(5.0, ge=0, le=1e9, description="Below this, run retention at once.")
    save_margin_mb: float = Field(
        64.0, ge=0, le=1e7,
        description="A save starts only if free space exceeds the last save's size plus this margin.",
    )

    @model_validator(mode="after")
    def _order(self) -> "DiskConfig":
        if self.emergency_free_gb > self.warn_free_gb:
            raise ValueError(
                f"emergency_free_gb ({self.emergency_free_gb}) must not exceed warn_free_gb ({self.warn_free_gb})"
            )
        return self


def is_loopback_host(host: str) -> bool:
    """True for 'localhost' and loopback IP literals (127.0.0.0/8, ::1)."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class HttpConfig(_Section):
    enabled: bool = Field(
        False, description="Serve the read-only dashboard (/) and Prometheus metrics (/metrics) over HTTP.")
    host: str = Field(
        "127.0.0.1", min_length=1, max_length=64,
        description=("Address to listen on: an IP address (127.0.0.1, ::1, 0.0.0.0, ::) or 'localhost'. Any address "
                     "that is not loopback needs a token."),
    )
    port: int = Field(9184, ge=1, le=65535, description="TCP port to listen on (1 to 65535).")
    token: Optional[SecretStr] = Field(
        None,
        description=("When set, every request must carry it: once as ?token=... (the page then keeps a cookie) or as "
                     "an 'Authorization: Bearer ...' header (Prometheus: bearer_token). At least 16 printable ASCII "
                     "characters, no spaces; required when host is not a loopback address. It is never logged."),
    )
    dashboard: bool = Field(True, description="Serve the dashboard page and its JSON (/, /static/..., /api/...).")
    metrics: bool = Field(True, description="Serve Prometheus metrics at /metrics.")
    textfile: Optional[BoundedPath] = Field(
        None,
        description=("A folder of node_exporter's textfile collector (relative to config.yaml): the daemon writes "
                     "ckpt_daemon.prom there atomically every textfile_interval_s, whether or not enabled is true. "
                     "null: no file."),
    )
    textfile_interval_s: float = Field(
        30.0, ge=5, le=3600, description="How often the textfile is rewritten (5 s to an hour).")

    @field_validator("host")
    @classmethod
    def _host(cls, v: str) -> str:
        import ipaddress

        if v != "localhost":
            try:
                ipaddress.ip_address(v)
            except ValueError:
                raise ValueError(f"{_short(v)} is not an IP address: give one such as 127.0.0.1, ::1 or 0.0.0.0 "
                                 "(all interfaces), or 'localhost'") from None
        return v

    @field_validator("token")
    @classmethod
    def _token(cls, v: Optional[SecretStr]) -> Optional[SecretStr]:
        # The messages never repeat the value: it is a secret, and they go to logs and to `status`.
        if v is None:
            return v
        text = v.get_secret_value()
        example = "e.g. the output of `python -c 'import secrets; print(secrets.token_urlsafe(32))'`"
        if not 16 <= len(text) <= 1024:
            raise ValueError(f"|has {len(text)} characters; a token has 16 to 1024 ({example})")
        if not re.fullmatch(r"[\x21-\x7e]+", text):
            raise ValueError(f"|must be printable ASCII without spaces (it travels in a header and a cookie); {example}")
        return v

    @model_validator(mode="after")
    def _token_off_loopback(self) -> "HttpConfig":
        if self.token is None and not is_loopback_host(self.host):
            raise ValueError(
                f".token|is required when http.host ({self.host}) is not a loopback address: anyone who can reach "
                "the port could read the dashboard and the metrics. Set a token of at least 16 characters (e.g. "
                "`python -c 'import secrets; print(secrets.token_urlsafe(32))'`), or listen on 127.0.0.1 and reach it "
                "through an SSH tunnel")
        return self


# What the daemon can notify about (notify.events); the values say when each is sent.
ALERT_EVENTS: dict[str, str] = {
    "gave_up": "too many crashes in a row: the daemon stopped restarting the trainer (a crash loop)",
    "crash": "the trainer crashed or was killed; the daemon restarts it",
    "training_finished": "the trainer exited 0 on its own: training is finished",
    "new_best": "a new best checkpoint (the trainer's best metric improved)",
    "verification_failed": "a checkpoint failed verification (it is never resumed from)",
    "disk_emergency": "free space stays below disk.emergency_free_gb (retention could not, or may not, free enough)",
    "deletions_held": "retention held deletions that an edited, unconfirmed policy would make",
    "replica_lag": "a replica target is behind beyond its replicas[].within_s: the newest checkpoints exist only here",
}
MAX_NOTIFY_URLS = 32


def _check_events(v: list[str]) -> list[str]:
    known = list(ALERT_EVENTS)
    seen = set()
    for i, name in enumerate(v):
        if name not in ALERT_EVENTS:
            close = difflib.get_close_matches(str(name), known, n=1, cutoff=0.5)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ValueError(f"[{i}]|is {_short(name)}, which is no notification event; {hint}the events are: "
                             f"{', '.join(known)}")
        if name in seen:
            raise ValueError(f"[{i}]|names {name!r} a second time; give each event once")
        seen.add(name)
    return v


def _event_names(schema: dict) -> None:
    """JSON Schema: the event names are an enum, so that editors complete them."""
    for part in [schema, *schema.get("anyOf", [])]:
        if part.get("type") == "array":
            part["items"] = {"type": "string", "enum": list(ALERT_EVENTS)}


def _url_or_target(schema: dict) -> None:
    """JSON Schema of notify.urls: a list (or one) of URL strings or {url, events} (strings become the latter)."""
    item = {"anyOf": [{"type": "string", "writeOnly": True}, schema.pop("items", {})]}
    max_items = schema.pop("maxItems", None)
    schema.pop("type", None)
    schema["anyOf"] = [item, {"type": "array", "items": item, **({"maxItems": max_items} if max_items else {})}]


class NotifyTarget(_Section):
    url: SecretStr = Field(
        description=("An apprise URL (json://host:port/path, form://..., mailto://user:password@host, slack://..., "
                     "ntfy://..., matrix://...). It holds credentials, so it is a secret: logs, status and errors "
                     "show only its scheme and server."))
    events: Optional[list[str]] = Field(
        None, max_length=len(ALERT_EVENTS), json_schema_extra=_event_names,
        description="The events sent to this URL (null: notify.events).")
    _label: str = PrivateAttr("")

    _events = field_validator("events")(classmethod(lambda cls, v: v if v is None else _check_events(v)))

    @model_validator(mode="after")
    def _loads(self) -> "NotifyTarget":
        from ckpt_daemon import alerturl

        url = self.url.get_secret_value()
        plugin, label, why = alerturl.load(url)  # imports apprise: only a config with notify.urls pays for it
        if why:
            raise ValueError(f".url|({label}) cannot be used: it {why}")
        self._label = label
        return self

    @property
    def label(self) -> str:
        return self._label

    @field_serializer("url", when_used="json")
    def _redacted(self, v: SecretStr) -> str:
        return self._label or "**********"  # check-config and reload logs show the scheme and server only


class NotifyConfig(_Section):
    urls: list[NotifyTarget] = Field(
        default_factory=list, max_length=MAX_NOTIFY_URLS,
        description=("Where to send notifications: apprise URLs (email, Slack, Matrix, ntfy, Discord, Telegram, "
                     "webhooks...), each a string or {url: ..., events: [...]} (at most 32). Empty: no notifications, "
                     "and apprise is never imported."),
        json_schema_extra=_url_or_target,
    )
    events: list[str] = Field(
        default_factory=lambda: list(ALERT_EVENTS), max_length=len(ALERT_EVENTS), json_schema_extra=_event_names,
        description="Events sent to every URL that names none of its own: " + "; ".join(
            f"{k}: {v}" for k, v in ALERT_EVENTS.items()) + ".")
    min_interval_s: float = Field(
        600.0, ge=0, le=DAY_S,
        description=("At most one notification per event per this many seconds (0: no limit). Events in between are "
                     "not lost: the next notification of that event counts them and names the last few."))

    _events = field_validator("events")(classmethod(lambda cls, v: _check_events(v)))

    @field_validator("urls", mode="before")
    @classmethod
    def _strings_are_targets(cls, v: Any) -> Any:
        if isinstance(v, (str, dict)):
            v = [v]  # one URL needs no list
        if not isinstance(v, list):  # refused here: pydantic's message would quote it
            raise ValueError(f"|must be a list of URLs (or one URL); given a value of type {type(v).__name__}")
        out = []
        for i, x in enumerate(v):
            url = x.get("url") if isinstance(x, dict) else x
            if isinstance(x, NotifyTarget):
                out.append(x)
                continue
            if url is not None and not isinstance(url, str):  # refused here: pydantic's message would quote it
                raise ValueError(f"[{i}]|must be a URL string or {{url: '...', events: [...]}} whose url is a string; "
                                 f"given a value of type {type(url).__name__}")
            out.append(x if isinstance(x, dict) else {"url": x})
        return out


def _not_echoing_secrets(check, v: str):
    """Run a url check; an error about credentials in the url never repeats the url (the "|" form leaves
    out the "given: ..." part of the message, which would put the secret into the logs)."""
    try:
        return check(v) or True
    except ValueError as exc:
        if "credentials never go" in str(exc):
            raise ValueError(f"|{exc}") from None
        raise


class ReplicaRetention(_Section):
    mode: Literal["same", "own", "keep_all"] = Field(
        "same", description=("same: the local retention.tiers (under the same policy guard); own: the tiers below; "
                             "keep_all: never delete a replica."))
    tiers: Optional[list[Tier]] = Field(None, max_length=32, description="The replica's own tiers (mode: own).")

    @model_validator(mode="after")
    def _tiers_for_own(self) -> "ReplicaRetention":
        if self.mode == "own":
            if not self.tiers:
                raise ValueError(".tiers|is required when mode is 'own' (or write retention: same | keep_all)")
            try:
                check_tiers(self.tiers)
            except ValueError as exc:  # its message names the tier relative to the list: "[1].count|..."
                raise ValueError(f".tiers{exc}" if "|" in str(exc) else str(exc)) from None
        elif self.tiers is not None:
            raise ValueError(f".tiers|is given, but mode is {self.mode!r}: tiers apply only with mode: own")
        return self


def _retention_shorthand_schema(schema: dict) -> None:
    """`retention: same | keep_all | [tiers]` (the validator turns each into the object form) or the object."""
    ref = {k: schema.pop(k) for k in ("$ref", "allOf") if k in schema}
    tier = {"type": "object", "additionalProperties": False,
            "properties": {"count": {"type": ["integer", "null"], "minimum": 1},
                           "every_steps": {"type": ["integer", "null"], "minimum": 1}}}
    schema["anyOf"] = [{"enum": ["same", "keep_all"]}, {"type": "array", "items": tier, "maxItems": 32},
                       ref or {"type": "object"}]


class ReplicaConfig(_Section):
    url: str = Field(..., min_length=1, max_length=4096,
                     description="s3://bucket/prefix (AWS S3 or any S3-compatible server), or a folder (a local disk or "
                                 "a network mount; relative to config.yaml).")
    endpoint_url: Optional[str] = Field(
        None, max_length=2048, description="The S3-compatible server's URL (MinIO, SeaweedFS, ...); omit for AWS S3.")
    region: Optional[str] = Field(None, min_length=1, max_length=64, pattern=r"^[a-z0-9-]+$",
                                  description="The bucket's region (default: $AWS_REGION, else us-east-1).")
    credentials_file: Optional[BoundedPath] = Field(
        None, description=("A file of AWS_ACCESS_KEY_ID=... and AWS_SECRET_ACCESS_KEY=... lines (chmod 600); omitted: the "
                           "AWS_* environment and the usual AWS credential chain. Never put keys in config.yaml."))
    include: list[Literal["latest", "best", "epoch_ends", "pinned", "snapshots", "all"]] = Field(
        default_factory=lambda: ["latest", "best"], max_length=6,
        description=("What to copy: latest, best, epoch_ends (the last checkpoint of each epoch), pinned, snapshots "
                     "(what the daily snapshots hold), all."))
    every_steps: Optional[int] = Field(
        None, ge=1, le=MAX_STEPS, description="Also copy every checkpoint whose step is a multiple of this.")
    within_s: float = Field(
        600.0, ge=1, le=MONTH_S,
        description=("How soon a checkpoint should be off the machine: a replication lag beyond this is reported "
                     "(log, status, metrics, notification)."))
    parallel: int = Field(4, ge=1, le=64, description="Parts uploaded (or downloaded) at once; memory is about "
                                                      "parallel x part_size_mb.")
    part_size_mb: int = Field(8, ge=5, le=1024, description="Multipart part size in MiB (S3's minimum is 5).")
    max_mb_per_s: Optional[float] = Field(None, gt=0, le=1e6, description="Upload bandwidth cap in MB/s (null: none).")
    retention: ReplicaRetention = Field(
        default_factory=ReplicaRetention,
        description="same (the local tiers), keep_all, or a list of the replica's own tiers.",
        json_schema_extra=_retention_shorthand_schema)
    restore_on_empty: bool = Field(
        True, description=("When the daemon starts with no valid local checkpoint, restore the newest verified replica "
                           "before starting training."))
    restore_wait_s: float = Field(
        300.0, ge=0, le=DAY_S,
        description=("With no valid local checkpoint and this target unreachable, keep trying this long before training "
                     "starts without it."))

    @field_validator("retention", mode="before")
    @classmethod
    def _retention_shorthand(cls, v: Any) -> Any:
        if isinstance(v, str):
            return {"mode": v}
        if isinstance(v, list):
            return {"mode": "own", "tiers": v}
        return v

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        from ckpt_daemon.remote.target import parse_url

        return _not_echoing_secrets(parse_url, v) and v

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint(cls, v: Optional[str]) -> Optional[str]:
        from ckpt_daemon.remote.target import check_endpoint

        return None if v is None else _not_echoing_secrets(check_endpoint, v) and v

    @field_validator("include")
    @classmethod
    def _include(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("names an item twice")
        return v

    @model_validator(mode="after")
    def _combination(self) -> "ReplicaConfig":
        folder = not self.url.startswith("s3://")
        if folder and (self.endpoint_url or self.credentials_file or self.region):
            raise ValueError("|is a folder, so endpoint_url, region and credentials_file do not apply; remove them "
                             "(or give an s3:// url)")
        if not self.include and self.every_steps is None:
            raise ValueError(".include|is empty and every_steps is not set: nothing would be copied")
        return self


class LoggingConfig(_Section):
    dir: BoundedPath = Field(Path("logs"), description="Folder of daemon.log, cleanup.log, trainer.log, metrics.jsonl.")
    level: Literal["debug", "info", "warning", "error"] = Field("info", description="Console and file log level.")
    max_bytes: int = Field(
        10 * 1024 * 1024, ge=1024, le=10 << 30, description="Rotate daemon.log and trainer.log at this size (1 KiB to 10 GiB)."
    )
    backups: int = Field(5, ge=0, le=100, description="Rotated files kept (at most 100).")


class Config(_Section):
    _resolved: dict = PrivateAttr(default_factory=dict)  # folders resolved once, at load
    checkpoints: CheckpointsConfig = Field(default_factory=CheckpointsConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    retention: RetentionConfig = Field(default_factory=RetentionConfig)
    snapshots: SnapshotsConfig = Field(default_factory=SnapshotsConfig)
    consolidation: ConsolidationConfig = Field(default_factory=ConsolidationConfig)
    disk: DiskConfig = Field(default_factory=DiskConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    http: HttpConfig = Field(default_factory=HttpConfig, description="Read-only dashboard and Prometheus metrics.")
    notify: NotifyConfig = Field(default_factory=NotifyConfig,
                                 description="Notifications (apprise): crash loops, a new best, training finished...")
    replicas: list[ReplicaConfig] = Field(
        default_factory=list, max_length=16,
        description="Off-machine copies of checkpoints (S3 or a folder), verified, with their own lag and retention.")
    timezone: str = Field(
        "UTC", min_length=1, max_length=64, description="IANA time zone of the schedules, e.g. 'Europe/Berlin'."
    )

    # Where the file lives; set by load_config. Not a YAML key.
    source: Optional[Path] = Field(None, exclude=True, description="(internal) path of the loaded file")

    @field_validator("timezone")
    @classmethod
    def _tz(cls, v: str) -> str:
        try:
            zoneinfo.ZoneInfo(v)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):
            raise ValueError(f"{v!r} is not a known IANA time zone (e.g. 'UTC', 'Europe/Berlin')") from None
        return v

    # ---- resolved paths -------------------------------------------------------------------------
    @property
    def base_dir(self) -> Path:
        return self.source.parent if self.source else Path.cwd()

    def resolve_path(self, p: Path) -> Path:
        """A config path made absolute against config.yaml's folder (symlinks resolved)."""
        try:
            p = p.expanduser()
        except RuntimeError:  # `~name` of a user that does not exist (a typo for ~/name)
            raise ValueError(f"{p} names the home folder of a user {str(p)[1:].split('/')[0]!r}, and there is no such "
                             f"user; write ~/{str(p)[1:]} for a folder in your own home") from None
        return (p if p.is_absolute() else self.base_dir / p).resolve()

    def _folder(self, key: str, p: Path) -> Path:
        # Resolved once, when the config is loaded: a symlink re-pointed later never moves a running daemon.
        cache = self._resolved
        if key not in cache:
            cache[key] = self.resolve_path(p)
        return cache[key]

    @property
    def checkpoint_dir(self) -> Path:
        return self._folder("checkpoints", self.checkpoints.dir)

    @property
    def snapshot_dir(self) -> Path:
        return self._folder("snapshots", self.snapshots.dir)

    @property
    def consolidation_dir(self) -> Path:
        return self._folder("consolidation", self.consolidation.dir)

    @property
    def log_dir(self) -> Path:
        return self._folder("logging", self.logging.dir)

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
        for key, sec in (("checkpoints.dir", self.checkpoints), ("snapshots.dir", self.snapshots),
                         ("consolidation.dir", self.consolidation), ("logging.dir", self.logging)):
            try:
                self.resolve_path(sec.dir)
            except ValueError as exc:
                raise ValueError(f"{key}|{exc}") from None
        ck = self.checkpoint_dir
        if ck == Path(ck.anchor):
            raise ValueError(f"checkpoints.dir|must not be the filesystem root (given: {ck})")
        self._check_replicas(ck)
        for key, p in (("snapshots.dir", self.snapshot_dir), ("consolidation.dir", self.consolidation_dir)):
            if p == ck or p.is_relative_to(ck) or ck.is_relative_to(p):
                raise ValueError(
                    f"{key}|({p}) overlaps checkpoints.dir ({ck}): cleanup would treat one as part of the other; "
                    "give them separate folders"
                )
        return self


    def replica_target(self, r: "ReplicaConfig"):
        """The parsed target of a replica (a relative folder resolves against config.yaml's folder)."""
        from ckpt_daemon.remote.target import parse_url

        return parse_url(r.url, self.base_dir)

    def _check_replicas(self, ck: Path) -> None:
        seen: dict[str, int] = {}
        for i, r in enumerate(self.replicas):
            t = self.replica_target(r)
            if t.url in seen:
                raise ValueError(f"replicas[{i}].url|names the same target as replicas[{seen[t.url]}] ({t.url})")
            seen[t.url] = i
            if t.kind == "folder":
                p = Path(os.path.realpath(t.folder))
                for key, other in (("checkpoints.dir", ck), ("snapshots.dir", self.snapshot_dir)):
                    if p == other or p.is_relative_to(other) or other.is_relative_to(p):
                        raise ValueError(f"replicas[{i}].url|({p}) overlaps {key} ({other}): a replica must live "
                                         "apart from what it protects (another disk or a network mount)")


def _short(value: Any, limit: int = 60) -> str:
    shown = repr(value)
    return shown if len(shown) <= limit else shown[: limit - 3] + "..."


def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            part = str(part)
            out += ("." if out else "") + (part if len(part) <= 60 else part[:57] + "...")
    return out or "(top level)"


def _model_of(annotation: Any) -> Optional[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):  # Optional[...], list[...], Annotated[...]
        model = _model_of(arg)
        if model is not None:
            return model
    return None


def _known_keys(parent: tuple) -> list[str]:
    """The keys a config accepts at `parent` (a pydantic error location), for 'did you mean'."""
    model: Optional[type[BaseModel]] = Config
    for part in parent:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        model = _model_of(field.annotation) if field else None
        if model is None:
            return []
    return [k for k in model.model_fields if k != "source"]


def _unknown_key(loc: tuple) -> str:
    known = _known_keys(loc[:-1])
    close = difflib.get_close_matches(str(loc[-1]), known, n=1)
    if close:
        hint = f"; did you mean {close[0]!r}?"
    else:
        hint = f" (the keys here are: {', '.join(known)})" if known else ""
    return f"{_loc(loc)} is not a known key{hint} (check its spelling and indentation; `ckpt-daemon config-schema` lists them)"


_WHERE = re.compile(r"([\w.\[\]]*)\|")  # "[1].count|msg", "snapshots.dir|msg", "|msg": a check naming its own field
MAX_LISTED_PROBLEMS = 10


def _describe_one(err: dict) -> str:
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith(("function-", "tagged-"))))
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        return _unknown_key(loc)
    if err["type"] == "missing":
        return f"{_loc(loc)} is required"
    where = _WHERE.match(msg)
    if where:
        # A cross-field check names its own field: relative ("[1].count", "" for itself) or absolute ("snapshots.dir").
        w = where.group(1)
        field = _loc(loc) + w if not w or w.startswith(("[", ".")) else w
        return f"{field} {msg[where.end():]}"
    return f"{_loc(loc)}: {msg} (given: {_short(err.get('input'), 80)})"


def _describe_errors(path: Path, exc: ValidationError) -> str:
    lines = [_describe_one(err) for err in exc.errors(include_url=False)]
    n = len(lines)
    if n > MAX_LISTED_PROBLEMS:
        lines = lines[:MAX_LISTED_PROBLEMS] + [f"and {n - MAX_LISTED_PROBLEMS} more"]
    return (
        f"{path} is not a valid ckpt-daemon config ({n} problem{'s' if n != 1 else ''}): "
        + "; ".join(lines)
        + ". Fix the field(s) named and try again; `ckpt-daemon check-config` validates the file without starting anything."
    )


# ---- reading the file: it is untrusted input too -----------------------------------------------------
MAX_CONFIG_BYTES = 256 << 10  # the shipped config.yaml is ~6 KiB
MAX_YAML_NODES = 10_000  # values after aliases are expanded (the shipped config has a few hundred)
MAX_YAML_DEPTH = 32  # nesting levels (the config tree is 4 deep)
_START_FROM = "start from the shipped config.yaml"


def _too_large(path: Path) -> ConfigError:
    return ConfigError(
        f"{path} is larger than {MAX_CONFIG_BYTES // 1024} KiB, far more than any ckpt-daemon config; it was not "
        f"read. Check that the path points at the right file, or {_START_FROM}."
    )


def _too_deep(path: Path) -> ConfigError:
    return ConfigError(
        f"{path} nests more than {MAX_YAML_DEPTH} levels deep (or a YAML alias refers to itself), far deeper than "
        f"any ckpt-daemon config; it was not loaded. Check its brackets and indentation, or {_START_FROM}."
    )


def _yaml_error(path: Path, exc: yaml.YAMLError) -> ConfigError:
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    return ConfigError(
        f"{path} is not valid YAML{where}: {problem}. Check the indentation and quoting there "
        "(a value containing ':' or '#' needs quotes)."
    )


def _compose(text: str, path: Path) -> Optional[yaml.Node]:
    """The YAML node graph, before any value is built (aliases are still shared nodes here)."""
    try:
        return yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        raise _yaml_error(path, exc) from None
    except RecursionError:
        raise _too_deep(path) from None


def _expanded(node: yaml.Node, depth: int, memo: dict[int, tuple[int, int]]) -> tuple[int, int]:
    """(number of values, height) of `node` with every alias expanded; memoised per node, so that an
    alias bomb costs one visit per distinct node. Raises _Refused past the limits."""
    if id(node) not in memo:
        if depth > MAX_YAML_DEPTH:
            raise _Refused("deep")
        children: list = []
        if isinstance(node, yaml.SequenceNode):
            children = node.value
        elif isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        size, height = 1, 1
        for child in children:
            s, h = _expanded(child, depth + 1, memo)
            size, height = size + s, max(height, h + 1)
            if size > MAX_YAML_NODES:
                raise _Refused("large")
        memo[id(node)] = (size, height)
    size, height = memo[id(node)]
    if depth + height - 1 > MAX_YAML_DEPTH:
        raise _Refused("deep")
    return size, height


class _Refused(Exception):
    pass


def _check_expansion(node: yaml.Node, path: Path) -> None:
    try:
        _expanded(node, 1, {})
    except _Refused as exc:
        if str(exc) == "deep":
            raise _too_deep(path) from None
        raise ConfigError(
            f"{path} holds more than {MAX_YAML_NODES} values (counting each YAML alias *name as the values it "
            f"repeats), far more than any ckpt-daemon config; it was not loaded. Write the settings out without "
            f"aliases, or {_START_FROM}."
        ) from None


def _construct(node: yaml.Node, path: Path) -> Any:
    loader = yaml.SafeLoader("")
    try:
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        raise _yaml_error(path, exc) from None
    except RecursionError:
        raise _too_deep(path) from None
    except (ValueError, TypeError, OverflowError) as exc:  # e.g. a date like 2024-13-45, a 5000-digit number
        why = str(exc).split(";")[0]
        raise ConfigError(f"{path} holds a value YAML cannot read ({why}). Quote it if it is meant as text.") from None
    finally:
        loader.dispose()


def _check_duplicates(node: yaml.Node, path: Path) -> None:
    """A key written twice in one mapping: YAML keeps the second silently (an appended `checkpoints:`
    section would replace the first one's dir). Refused instead. Iterative, aliases visited once."""
    seen: set[int] = set()
    stack: list[tuple[yaml.Node, str]] = [(node, "")]
    while stack:
        n, where = stack.pop()
        if id(n) in seen:
            continue
        seen.add(id(n))
        if isinstance(n, yaml.MappingNode):
            keys: set = set()
            for k, v in n.value:
                key = k.value if isinstance(k, yaml.ScalarNode) else None
                if key is not None and key in keys:
                    line = k.start_mark.line + 1 if k.start_mark else "?"
                    raise ConfigError(
                        f"{path} has the key {where + str(key)!r} twice (again at line {line}); YAML would silently keep "
                        "only the second. Merge the two into one and try again.")
                keys.add(key)
                stack.append((v, f"{where}{key}." if key is not None else where))
        elif isinstance(n, yaml.SequenceNode):
            stack.extend((v, where) for v in n.value)


def _load_yaml(text: str, path: Path) -> Any:
    if len(text) > MAX_CONFIG_BYTES or len(text.encode("utf-8", "surrogatepass")) > MAX_CONFIG_BYTES:
        raise _too_large(path)
    node = _compose(text, path)
    if node is None:
        return None
    _check_expansion(node, path)
    _check_duplicates(node, path)
    return _construct(node, path)


def parse_config(text: str, path: Path, base: Optional[Path] = None) -> Config:
    """Validate YAML text as if it were the file at `path` (relative folders resolve against its folder,
    or against `base`'s folder when given: the daemon hands its trainer a copy of the config in force,
    which must resolve as the original does)."""
    data = _load_yaml(text, path)
    if data is None or data == {}:
        raise ConfigError(
            f"{path} holds no settings; {_START_FROM}. An empty file is refused so that an emptied or truncated "
            "config never silently means 'all defaults': to use the defaults on purpose, write one section, "
            "e.g. `checkpoints: {}`."
        )
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path} must hold a mapping of sections (checkpoints:, training:, ...), but its top level is a "
            f"{type(data).__name__}. Start from the config.yaml shipped with ckpt-daemon."
        )
    try:
        return Config.model_validate({**data, "source": Path(os.path.abspath(base or path))})
    except ValidationError as exc:
        raise ConfigError(_describe_errors(path, exc)) from None


def _read_bounded(p: Path) -> str:
    """At most MAX_CONFIG_BYTES of a regular file (never a FIFO or device), decoded as UTF-8."""
    fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(str(p))
        if not stat.S_ISREG(mode):
            raise ConfigError(f"{p} is not a regular file. Pass the path of config.yaml itself.")
        data = f.read(MAX_CONFIG_BYTES + 1)
    if len(data) > MAX_CONFIG_BYTES:
        raise _too_large(p)
    return data.decode("utf-8")


def load_config(path: str | Path | None = None, base: Optional[Path] = None) -> Config:
    """Read and validate config.yaml; raise ConfigError with a one-paragraph message on any problem.

    A trainer started by the daemon gets the config in force as a copy ($CKPT_DAEMON_CONFIG) and the
    original's path ($CKPT_DAEMON_CONFIG_SOURCE), so relative folders resolve as the daemon's do."""
    p = Path(path) if path is not None else Path.cwd() / DEFAULT_CONFIG_NAME
    if base is None and os.environ.get("CKPT_DAEMON_CONFIG_SOURCE") and os.environ.get("CKPT_DAEMON_CONFIG") \
            and os.path.abspath(p) == os.path.abspath(os.environ["CKPT_DAEMON_CONFIG"]):
        base = Path(os.environ["CKPT_DAEMON_CONFIG_SOURCE"])
    try:
        text = _read_bounded(p)
    except FileNotFoundError:
        raise ConfigError(
            f"The config file {p} does not exist. Pass --config PATH, or run from the folder that holds "
            "config.yaml (a commented default ships at the root of the ckpt-daemon repository)."
        ) from None
    except IsADirectoryError:
        raise ConfigError(f"{p} is a folder, not a config file. Pass the path of config.yaml itself.") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"The config file {p} cannot be read ({exc}). Check its permissions and encoding (UTF-8).") from None
    return parse_config(text, p, base)


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


def next_runs(cfg: Config, now: dt.datetime, n: int = 3) -> dict[str, list[str]]:
    """The next `n` fire times (ISO 8601, in the configured zone) of every enabled cron schedule."""
    out = {}
    for name, enabled, expr in (("snapshot", cfg.snapshots.enabled, cfg.snapshots.schedule),
                                ("retention", cfg.retention.enabled, cfg.retention.schedule)):
        if enabled:
            out[name] = [t.isoformat() for t in next_fire_times(expr, cfg.timezone, now, n)]
    return out
