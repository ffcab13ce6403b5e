"""config.yaml: the shipped file validates; every kind of bad file gets one clear message naming the
file, the field path, what was given and what is expected; never a traceback."""

from __future__ import annotations

import json

import pytest

from ckpt_daemon.config import ConfigError, config_schema, cron_to_apscheduler, diff_configs, load_config, parse_config
from tests.conftest import REPO, run_py

BAD = [
    # (yaml text, substrings the message must contain)
    ("retention:\n  tiers:\n    - count: twenty\n", ["retention.tiers[0].count", "valid integer", "'twenty'"]),
    ("retention:\n  tiers:\n    - count: -3\n    - every_steps: 100\n", ["retention.tiers[0].count", "greater than or equal to 1", "-3"]),
    ("retention:\n  tiers:\n    - every_steps: 200\n    - count: 20\n", ["retention.tiers[0].count", "only the last tier may omit count"]),
    ("retention:\n  tiers:\n    - count: 20\n      every_steps: 300\n    - every_steps: 1000\n",
     ["retention.tiers[1].every_steps", "multiple of the previous tier's every_steps (300)", "1000"]),
    ("retention:\n  tiers:\n    - count: 20\n      every_steps: 200\n    - count: 5\n",
     ["retention.tiers[1].every_steps", "older tiers must thin at least as much"]),
    ("retention:\n  schedule: \"0 25 * * 0\"\n", ["retention.schedule", "not a valid cron expression", "'0 25 * * 0'"]),
    ("snapshots:\n  schedule: \"every day\"\n", ["snapshots.schedule", "5 fields"]),
    ("retention:\n  tierz: []\n", ["retention.tierz", "not a known key"]),
    ("trainer:\n  batch_size: 2.5\n", ["trainer.batch_size", "integer", "2.5"]),
    ("trainer:\n  learning_rate: fast\n", ["trainer.learning_rate", "'fast'"]),
    ("retention:\n  tiers: [ {count: 20\n", ["not valid YAML", "line"]),
    ("retention:\n\ttiers: []\n", ["not valid YAML"]),
    ("- just\n- a list\n", ["must hold a mapping of sections", "list"]),
    ("snapshots:\n  dir: checkpoints/snaps\n", ["snapshots.dir", "overlaps checkpoints.dir"]),
    ("checkpoints:\n  dir: /\n", ["checkpoints.dir", "filesystem root"]),
    ("checkpoints:\n  pattern: \"ckpt-{epoch}.pt\"\n", ["checkpoints.pattern", "{step}"]),
    ("timezone: Mars/Olympus\n", ["timezone", "IANA"]),
    ("training:\n  command: []\n", ["training.command", "non-empty list"]),
    ("training:\n  restart:\n    initial_backoff_s: 100\n    max_backoff_s: 10\n", ["training.restart", "max_backoff_s (10.0) must be at least"]),
    ("disk:\n  warn_free_gb: 1\n  emergency_free_gb: 5\n", ["disk", "emergency_free_gb (5.0) must not exceed"]),
    ("trainer:\n  model:\n    n_embd: 130\n    n_head: 4\n", ["trainer.model", "multiple of n_head"]),
    ("trainer:\n  best_mode: lowest\n", ["trainer.best_mode", "'min' or 'max'"]),
]


@pytest.mark.parametrize("text,needles", BAD, ids=[b[1][0] + "-" + str(i) for i, b in enumerate(BAD)])
def test_bad_config_message(tmp_path, text, needles):
    p = tmp_path / "config.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    msg = str(ei.value)
    assert str(p) in msg
    for n in needles:
        assert n in msg, f"{n!r} not in: {msg}"
    assert "Traceback" not in msg and "\n" not in msg  # one paragraph


def test_missing_file_names_it_and_the_fix(tmp_path):
    with pytest.raises(ConfigError) as ei:
        load_config(tmp_path / "nope.yaml")
    assert "nope.yaml does not exist" in str(ei.value) and "--config" in str(ei.value)


def test_folder_instead_of_file(tmp_path):
    with pytest.raises(ConfigError, match="is a folder"):
        load_config(tmp_path)


def test_shipped_config_is_valid_and_has_the_users_tiers():
    cfg = load_config(REPO / "config.yaml")
    assert [(t.count, t.every_steps) for t in cfg.retention.tiers] == [(20, None), (20, 200), (None, 1000)]
    assert cfg.retention.schedule == "0 4 * * 0"
    assert cfg.snapshots.schedule == "0 3 * * *"
    text = (REPO / "config.yaml").read_text()
    # every key line carries a comment
    for line in text.splitlines():
        s = line.strip()
        if s and not s.startswith("#") and ":" in s and not s.startswith("-") and not s.endswith(":"):
            assert "#" in s, f"config.yaml key without a comment: {line!r}"


def test_relative_folders_resolve_against_the_config_file(tmp_path, monkeypatch):
    d = tmp_path / "proj"
    d.mkdir()
    (d / "config.yaml").write_text("checkpoints:\n  dir: ck\nlogging:\n  dir: ../logs\n")
    monkeypatch.chdir(tmp_path)
    cfg = load_config(d / "config.yaml")
    assert cfg.checkpoint_dir == (d / "ck").resolve()
    assert cfg.log_dir == (tmp_path / "logs").resolve()
    assert cfg.snapshot_dir == (d / "snapshots").resolve()


def test_empty_file_means_all_defaults(tmp_path):
    cfg = parse_config("", tmp_path / "config.yaml")
    assert cfg.checkpoints.pattern == ["checkpoint-{step}"] and cfg.timezone == "UTC"


def test_pattern_accepts_string_or_list(tmp_path):
    cfg = parse_config('checkpoints:\n  pattern: ["checkpoint-{step}", "epoch={epoch}-step={step}.ckpt"]\n', tmp_path / "c.yaml")
    assert cfg.checkpoints.pattern[1] == "epoch={epoch}-step={step}.ckpt"


def test_cron_weekday_zero_is_sunday():
    from apscheduler.triggers.cron import CronTrigger
    import datetime as dt
    import zoneinfo

    f = cron_to_apscheduler("0 4 * * 0")
    assert f["day_of_week"] == "sun"
    trig = CronTrigger(timezone=zoneinfo.ZoneInfo("UTC"), **f)
    nxt = trig.get_next_fire_time(None, dt.datetime(2026, 11, 23, tzinfo=zoneinfo.ZoneInfo("UTC")))  # a Monday
    assert nxt.weekday() == 6 and nxt.hour == 4  # Sunday 04:00
    assert cron_to_apscheduler("0 4 * * 1-5")["day_of_week"] == "mon-fri"
    assert cron_to_apscheduler("0 4 * * 5-7")["day_of_week"] == "fri,sat,sun"
    assert cron_to_apscheduler("*/10 * * * * *")["second"] == "*/10"  # optional leading seconds field


def test_diff_names_changed_fields(tmp_path):
    a = parse_config("", tmp_path / "c.yaml")
    b = parse_config("retention:\n  tiers: [{count: 5}, {every_steps: 100}]\n", tmp_path / "c.yaml")
    changes = diff_configs(a, b)
    assert any(c.startswith("retention.tiers") for c in changes)


def test_schema_covers_every_section():
    s = config_schema()
    for section in ("checkpoints", "training", "trainer", "retention", "snapshots", "consolidation", "disk", "logging", "timezone"):
        assert section in s["properties"]
    json.dumps(s)


def test_check_config_cli(tmp_path):
    p = tmp_path / "config.yaml"
    p.write_text("retention:\n  tiers:\n    - count: 5\n    - every_steps: 100\n")
    r = run_py(["-m", "daemon", "check-config", str(p)], check=True)
    assert "valid" in r.stdout and str(tmp_path / "checkpoints") in r.stdout
    p.write_text("retention:\n  tiers:\n    - count: -1\n")
    r = run_py(["-m", "daemon", "check-config", str(p)])
    assert r.returncode == 2
    assert "retention.tiers[0].count" in r.stderr and "Traceback" not in r.stderr


def test_config_schema_cli():
    r = run_py(["-m", "daemon", "config-schema"], check=True)
    assert "retention" in json.loads(r.stdout)["properties"]
