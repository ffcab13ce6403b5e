"""config.yaml: the shipped file validates; every kind of bad file gets one clear message naming the
file, the field path, what was given and what is expected; never a traceback."""

from __future__ import annotations

import json

import pytest
import yaml

from ckpt_daemon.config import ConfigError, config_schema, diff_configs, load_config, parse_config
from tests.helpers import REPO, run_py

BAD = [
    # (yaml text, substrings the message must contain)
    ("retention:\n  tiers:\n    - count: twenty\n", ["retention.tiers[0].count", "valid integer", "'twenty'"]),
    ("retention:\n  tiers:\n    - count: -3\n    - every_steps: 100\n",
     ["retention.tiers[0].count", "greater than or equal to 1", "-3"]),
    ("retention:\n  tiers:\n    - every_steps: 200\n    - count: 20\n",
     ["retention.tiers[0].count", "only the last tier may omit count"]),
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
    ("training:\n  restart:\n    initial_backoff_s: 100\n    max_backoff_s: 10\n",
     ["training.restart", "max_backoff_s (10.0) must be at least"]),
    ("disk:\n  warn_free_gb: 1\n  emergency_free_gb: 5\n", ["disk", "emergency_free_gb (5.0) must not exceed"]),
    ("trainer:\n  model:\n    n_embd: 130\n    n_head: 4\n", ["trainer.model", "multiple of n_head"]),
    ("trainer:\n  best_mode: lowest\n", ["trainer.best_mode", "'min' or 'max'"]),
    ("trainer:\n  precision: fp8\n", ["trainer.precision", "'fp32', 'bf16' or 'fp16'", "'fp8'"]),
    ("trainer:\n  precision: 16\n", ["trainer.precision", "'fp32', 'bf16' or 'fp16'"]),
    ("trainer:\n  device: gpu\n", ["trainer.device", "'auto', 'cpu' or 'cuda'", "'gpu'"]),
    ("trainer:\n  deterministic: maybe\n", ["trainer.deterministic", "boolean", "'maybe'"]),
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


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n# and another\n", "{}\n", "~\n", "null\n", "---\n"])
def test_empty_file_is_refused(tmp_path, text):
    # An emptied or truncated config.yaml must never silently mean "all defaults".
    p = tmp_path / "config.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    msg = str(ei.value)
    assert str(p) in msg and "holds no settings; start from the shipped config.yaml" in msg
    assert "checkpoints: {}" in msg and "\n" not in msg


def test_one_section_gets_defaults_for_the_rest(tmp_path):
    cfg = parse_config("checkpoints: {}\n", tmp_path / "config.yaml")
    assert cfg.checkpoints.pattern == ["checkpoint-{step}"] and cfg.timezone == "UTC"
    assert cfg.retention.schedule == "0 4 * * 0" and cfg.logging.backups == 5


def test_pattern_accepts_string_or_list(tmp_path):
    cfg = parse_config('checkpoints:\n  pattern: ["checkpoint-{step}", "epoch={epoch}-step={step}.ckpt"]\n',
                       tmp_path / "c.yaml")
    assert cfg.checkpoints.pattern[1] == "epoch={epoch}-step={step}.ckpt"


def test_diff_names_changed_fields(tmp_path):
    a = parse_config("checkpoints: {}\n", tmp_path / "c.yaml")
    b = parse_config("retention:\n  tiers: [{count: 5}, {every_steps: 100}]\n", tmp_path / "c.yaml")
    changes = diff_configs(a, b)
    assert any(c.startswith("retention.tiers") for c in changes)


def test_schema_covers_every_section():
    s = config_schema()
    for section in ("checkpoints", "training", "trainer", "retention", "snapshots", "consolidation", "disk", "logging",
                    "timezone"):
        assert section in s["properties"]
    json.dumps(s)


@pytest.mark.slow
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


# ---------------------------------------------------------------------- every value is untrusted input
def _yaml_at(path: str, value) -> str:
    """`a.b.c` = value as YAML text (value given as YAML)."""
    parts = path.split(".")
    lines = [" " * (2 * i) + f"{p}:" for i, p in enumerate(parts[:-1])]
    lines.append(" " * (2 * (len(parts) - 1)) + f"{parts[-1]}: {value}")
    return "\n".join(lines) + "\n"


TOO_BIG = [
    # (field, a value past its bound, the largest value accepted)
    ("disk.check_interval_s", "86401", "86400"),
    ("disk.check_interval_s", "1e300", "86400"),  # APScheduler overflowed on this at restart
    ("disk.warn_free_gb", "1.0e10", "1.0e9"),
    ("disk.save_margin_mb", "1.0e8", "1.0e7"),
    ("training.restart.initial_backoff_s", "86401", "300"),  # not above max_backoff_s (300)
    ("training.restart.max_backoff_s", "1e20", "86400"),
    ("training.restart.healthy_after_s", "2592001", "2592000"),
    ("training.restart.crash_window_s", "2592001", "2592000"),
    ("training.restart.heartbeat_timeout_s", "86401", "86400"),
    ("training.restart.max_crashes", "10001", "10000"),
    ("training.restart.same_checkpoint_crashes", "1001", "1000"),
    ("training.stop_timeout_s", "86401", "86400"),
    ("logging.max_bytes", str(10 * 2**30 + 1), str(10 * 2**30)),
    ("logging.backups", str(10**12), "100"),  # a rotation loop over 10**12 files blocked the daemon
    ("snapshots.keep_daily", "10001", "10000"),
    ("snapshots.keep_weekly", "10001", "10000"),
    ("snapshots.keep_monthly", "10001", "10000"),
    ("trainer.max_steps", str(10**15 + 1), str(10**15)),
    ("trainer.batch_size", str(2**20 + 1), str(2**20)),
    ("trainer.warmup_steps", str(10**15 + 1), str(10**15)),
    ("trainer.lr_cycle_steps", str(10**15 + 1), str(10**15)),
    ("trainer.checkpoint_every_steps", str(10**15 + 1), str(10**15)),
    ("trainer.eval_every_steps", str(10**15 + 1), str(10**15)),
    ("trainer.log_every_steps", str(10**15 + 1), str(10**15)),
    ("trainer.eval_batches", "1000001", "1000000"),
    ("trainer.threads", "1025", "1024"),
    ("trainer.seed", str(2**32), str(2**32 - 1)),
    ("trainer.learning_rate", "11", "10"),
    ("trainer.weight_decay", "11", "10"),
    ("trainer.grad_clip", "1.0e7", "1.0e6"),
    ("trainer.model.n_layer", "1025", "1024"),
    ("trainer.model.n_head", "1025", "1"),
    ("trainer.model.n_embd", "65537", "65536"),
    ("trainer.model.block_size", str(2**20 + 1), str(2**20)),
    ("trainer.data.synthetic_chars", str(10**9 + 1), str(10**9)),
]


@pytest.mark.parametrize("field,bad,ok", TOO_BIG, ids=[f"{f}={b}" for f, b, _ in TOO_BIG])
def test_every_number_has_an_upper_bound(tmp_path, field, bad, ok):
    with pytest.raises(ConfigError) as ei:
        parse_config(_yaml_at(field, bad), tmp_path / "config.yaml")
    msg = str(ei.value)
    assert f"{field}: Input should be less than or equal to" in msg and "(given: " in msg and "\n" not in msg
    parse_config(_yaml_at(field, ok), tmp_path / "config.yaml")  # the bound itself is valid


def test_tier_bounds(tmp_path):
    p = tmp_path / "config.yaml"
    with pytest.raises(ConfigError,
                       match=r"retention\.tiers\[0\]\.count: Input should be less than or equal to 1000000"):
        parse_config("retention:\n  tiers: [{count: 1000001}, {every_steps: 10}]\n", p)
    with pytest.raises(ConfigError,
                       match=r"retention\.tiers\[1\]\.every_steps: Input should be less than or equal to 1000000000000"):
        parse_config("retention:\n  tiers: [{count: 5}, {every_steps: 10000000000000}]\n", p)
    with pytest.raises(ConfigError, match=r"retention\.tiers: List should have at most 32 items"):
        parse_config("retention:\n  tiers: [" + "{count: 1}, " * 33 + "{every_steps: 10}]\n", p)
    parse_config("retention:\n  tiers: [" + "{count: 1}, " * 31 + "{every_steps: 10}]\n", p)


def test_disk_tests_may_force_an_emergency(tmp_path):
    cfg = parse_config("disk:\n  warn_free_gb: 10000000\n  emergency_free_gb: 10000000\n", tmp_path / "config.yaml")
    assert cfg.disk.emergency_free_gb == 10**7


@pytest.mark.parametrize("text,needles", [
    ("disk:\n  warn_free_gb: .inf\n", ["disk.warn_free_gb", "finite number"]),
    ("training:\n  restart:\n    crash_window_s: .nan\n", ["training.restart.crash_window_s", "finite number"]),
    ("trainer:\n  seed: -1\n", ["trainer.seed", "greater than or equal to 0"]),
    ("trainer:\n  best_metric: " + "m" * 129 + "\n", ["trainer.best_metric", "at most 128 characters"]),
    ("trainer:\n  best_metric: ''\n", ["trainer.best_metric", "at least 1 character"]),
    ("timezone: " + "Europe/" + "x" * 80 + "\n", ["timezone", "at most 64 characters"]),
    ("checkpoints:\n  pattern: [" + "'c-{step}', " * 33 + "]\n", ["checkpoints.pattern", "at most 32 items"]),
    ("checkpoints:\n  pattern: 'c-{step}" + "x" * 300 + "'\n", ["checkpoints.pattern", "at most 255"]),
    ("checkpoints:\n  dir: \"a\\0b\"\n", ["checkpoints.dir", "NUL"]),
    ("logging:\n  dir: " + "d" * 5000 + "\n", ["logging.dir", "at most 4096 characters"]),
    ("snapshots:\n  include: [latest, best, latest]\n", ["snapshots.include", "at most 2 items"]),
    ("retention:\n  schedule: '" + "1," * 200 + "1 * * * *'\n", ["retention.schedule", "at most 255 characters"]),
])
def test_values_out_of_bounds(tmp_path, text, needles):
    p = tmp_path / "config.yaml"
    with pytest.raises(ConfigError) as ei:
        parse_config(text, p)
    msg = str(ei.value)
    for n in needles:
        assert n in msg, f"{n!r} not in: {msg}"
    assert "\n" not in msg and len(msg) < 1500


def _env_yaml(env: dict) -> str:
    return yaml.safe_dump({"training": {"env": env}})


@pytest.mark.parametrize("env,needles", [
    ({f"V{i}": "x" for i in range(257)}, ["training.env", "at most 256 items"]),
    ({"BAD-NAME": "x"}, ["training.env has a variable named 'BAD-NAME'", "letters, digits and '_'"]),
    ({"1ST": "x"}, ["training.env has a variable named '1ST'", "not starting with a digit"]),
    ({"A=B": "x"}, ["training.env has a variable named 'A=B'"]),
    ({"N" * 257: "x"}, ["training.env has a variable named", "at most 256 characters"]),
    ({"BIG": "x" * (64 * 1024 + 1)}, ["training.env.BIG is 65537 bytes long", "at most 64 KiB"]),
    ({"NUL": "a\0b"}, ["training.env.NUL is 'a\\x00b': a value cannot hold a NUL character"]),
    # aliases repeat one 60 KB value: a small file, a big environment
    ("training:\n  env:\n    V0: &v " + "x" * 60000 + "\n" + "".join(f"    V{i}: *v\n" for i in range(1, 5)),
     ["training.env holds 300015 bytes of variables", "at most 256 KiB in all"]),
])
def test_training_env_is_bounded(tmp_path, env, needles):
    with pytest.raises(ConfigError) as ei:
        parse_config(env if isinstance(env, str) else _env_yaml(env), tmp_path / "config.yaml")
    msg = str(ei.value)
    for n in needles:
        assert n in msg, f"{n!r} not in: {msg[:600]}"
    assert len(msg) < 1500  # a huge value is never echoed whole


def test_training_env_accepts_ordinary_variables(tmp_path):
    env = {"CUDA_VISIBLE_DEVICES": "0,1", "_X": "", "NCCL_DEBUG": "INFO", **{f"V{i}": "x" for i in range(250)}}
    assert parse_config(_env_yaml(env), tmp_path / "config.yaml").training.env == env


def test_training_command_is_bounded(tmp_path):
    p = tmp_path / "config.yaml"
    with pytest.raises(ConfigError, match=r"training\.command: List should have at most 1024 items"):
        parse_config(yaml.safe_dump({"training": {"command": ["python"] * 1025}}), p)
    with pytest.raises(ConfigError, match=r"training\.command\[1\] is 'xxx.*at most 64 KiB"):
        parse_config(yaml.safe_dump({"training": {"command": ["python", "x" * (64 * 1024 + 1)]}}), p)
    with pytest.raises(ConfigError, match=r"training\.command\[2\] is 'a\\x00b': an argument cannot hold a NUL"):
        parse_config(yaml.safe_dump({"training": {"command": ["python", "t.py", "a\0b"]}}), p)
    assert len(parse_config(yaml.safe_dump({"training": {"command": ["python"] * 1024}}), p).training.command) == 1024


def test_snapshot_retention_keeping_nothing_is_refused(tmp_path):
    p = tmp_path / "config.yaml"
    text = "snapshots:\n  keep_daily: 0\n  keep_weekly: 0\n  keep_monthly: 0\n"
    for extra in ("", "  enabled: false\n"):  # manual snapshots prune too
        with pytest.raises(ConfigError) as ei:
            parse_config(text + extra, p)
        msg = str(ei.value)
        assert "snapshots has keep_daily, keep_weekly and keep_monthly all 0" in msg
        assert "set at least one of them above 0" in msg and "snapshots.enabled: false" in msg
    assert parse_config("snapshots:\n  keep_daily: 0\n  keep_weekly: 0\n  keep_monthly: 1\n",
                        p).snapshots.keep_monthly == 1


# ---------------------------------------------------------------------- did you mean
@pytest.mark.parametrize("text,needle", [
    ("retention:\n  teirs: []\n", "retention.teirs is not a known key; did you mean 'tiers'?"),
    ("retension:\n  enabled: true\n", "retension is not a known key; did you mean 'retention'?"),
    ("retention:\n  tiers: [{cout: 5}, {every_steps: 10}]\n",
     "retention.tiers[0].cout is not a known key; did you mean 'count'?"),
    ("training:\n  restart:\n    max_crash: 3\n",
     "training.restart.max_crash is not a known key; did you mean 'max_crashes'?"),
    ("trainer:\n  model:\n    nlayer: 3\n", "trainer.model.nlayer is not a known key; did you mean 'n_layer'?"),
    ("disk:\n  zzz: 1\n", "disk.zzz is not a known key (the keys here are: check_interval_s, warn_free_gb,"),
])
def test_unknown_key_suggests_the_closest(tmp_path, text, needle):
    with pytest.raises(ConfigError) as ei:
        parse_config(text, tmp_path / "config.yaml")
    assert needle in str(ei.value)


def test_many_problems_are_summarised(tmp_path):
    text = "retention:\n" + "".join(f"  unknown_{i}: 1\n" for i in range(40))
    with pytest.raises(ConfigError) as ei:
        parse_config(text, tmp_path / "config.yaml")
    msg = str(ei.value)
    assert "(40 problems)" in msg and "and 30 more" in msg and "unknown_39" not in msg


# ---------------------------------------------------------------------- the file is untrusted too
def test_oversized_file_is_refused_without_reading_it(tmp_path):
    import tracemalloc

    p = tmp_path / "config.yaml"
    p.write_bytes(b"retention:\n  enabled: true\n" + b"# padding\n" * 1_000_000)  # ~10 MB
    tracemalloc.start()
    try:
        with pytest.raises(ConfigError) as ei:
            load_config(p)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    msg = str(ei.value)
    assert str(p) in msg and "larger than 256 KiB" in msg and "was not read" in msg and "\n" not in msg
    assert peak < 2 * 1024 * 1024, f"reading the config took {peak} bytes"
    with pytest.raises(ConfigError, match="larger than 256 KiB"):
        parse_config("a: 1\n" + "#" * (256 * 1024), p)


def test_file_just_under_the_limit_is_read(tmp_path):
    p = tmp_path / "config.yaml"
    head = b"retention:\n  enabled: true\n"
    p.write_bytes(head + b"#" * (256 * 1024 - len(head) - 1) + b"\n")
    assert load_config(p).retention.enabled


def test_fifo_is_not_opened_for_ever(tmp_path):
    import os

    p = tmp_path / "config.yaml"
    os.mkfifo(p)
    with pytest.raises(ConfigError, match="not a regular file"):
        load_config(p)


BILLION_LAUGHS = 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n' + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [" + ",".join([f"*{chr(97 + i)}"] * 9) + "]\n" for i in range(8))


@pytest.mark.slow
@pytest.mark.timeout(30)
@pytest.mark.parametrize("text,needle", [
    (BILLION_LAUGHS, "holds more than 10000 values"),  # 9**9 values once expanded: 8 minutes and 7.8 GB before
    ("retention:\n  tiers: [" + ",".join(["{count: 1}"] * 6000) + "]\n", "holds more than 10000 values"),
    ("a: " + "[" * 40 + "]" * 40 + "\n", "nests more than 32 levels deep"),
    ("a: " + "[" * 5000 + "]" * 5000 + "\n", "nests more than 32 levels deep"),  # PyYAML's RecursionError
    ("".join(" " * i + f"k{i}:\n" for i in range(400)), "nests more than 32 levels deep"),
    ("a: &x [*x]\n", "refers to itself"),
    ("retention: &r\n  tiers: *r\n", "refers to itself"),
    ("a: !!python/object/apply:os.system ['true']\n", "not valid YAML"),
    ("retention:\n  schedule: 2024-13-45\n", "holds a value YAML cannot read (month must be in 1..12)"),
    ("trainer:\n  seed: " + "9" * 5000 + "\n", "holds a value YAML cannot read"),
], ids=["billion-laughs", "many-values", "deep-40", "deep-5000", "deep-block", "self-alias", "self-alias-section",
        "python-tag", "bad-date", "huge-int"])
def test_hostile_yaml_is_refused_quickly(tmp_path, text, needle):
    import time

    p = tmp_path / "config.yaml"
    p.write_text(text)
    t0 = time.monotonic()
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    msg = str(ei.value)
    assert needle in msg and str(p) in msg and "\n" not in msg and "Traceback" not in msg
    assert time.monotonic() - t0 < 10


def test_small_aliases_still_work(tmp_path):
    text = "retention:\n  tiers: &t [{count: 5}, {every_steps: 100}]\nsnapshots:\n  include: &i [latest]\n"
    cfg = parse_config(text, tmp_path / "config.yaml")
    assert cfg.retention.tiers[1].every_steps == 100 and cfg.snapshots.include == ["latest"]


# ---------------------------------------------------------------------- check-config --json
def _check_config_json(capsys, *argv) -> tuple[int, dict]:
    from daemon.cli import main

    rc = main(["check-config", "--json", *argv])
    out = capsys.readouterr().out
    return rc, json.loads(out)


def test_check_config_json(tmp_path, capsys):
    import datetime as dt

    from ckpt_daemon.cron import next_fire_times

    p = tmp_path / "config.yaml"
    p.write_text("timezone: Europe/Berlin\nsnapshots:\n  schedule: '30 2 * * *'\nretention:\n  schedule: '0 4 * * 0'\n")
    before = dt.datetime.now(dt.timezone.utc)
    rc, doc = _check_config_json(capsys, str(p))
    assert rc == 0 and doc["ok"] is True and doc["config"] == str(p.resolve())
    assert doc["effective"]["checkpoints"]["dir"] == str(tmp_path / "checkpoints")
    assert doc["effective"]["retention"]["tiers"][0] == {"count": 20, "every_steps": None}
    assert set(doc["next_runs"]) == {"snapshot", "retention"}
    for name, expr in (("snapshot", "30 2 * * *"), ("retention", "0 4 * * 0")):
        times = [dt.datetime.fromisoformat(t) for t in doc["next_runs"][name]]
        assert len(times) == 3 and times == sorted(times) and times[0] > before
        assert times == next_fire_times(expr, "Europe/Berlin", before, 3)  # in the configured zone
        assert all(t.utcoffset() in (dt.timedelta(hours=1), dt.timedelta(hours=2)) for t in times)
    assert all(dt.datetime.fromisoformat(t).weekday() == 6 for t in doc["next_runs"]["retention"])


def test_check_config_json_leaves_out_disabled_schedules(tmp_path, capsys):
    p = tmp_path / "config.yaml"
    p.write_text("snapshots:\n  enabled: false\n")
    rc, doc = _check_config_json(capsys, str(p))
    assert rc == 0 and list(doc["next_runs"]) == ["retention"]


def test_check_config_json_error(tmp_path, capsys):
    p = tmp_path / "config.yaml"
    p.write_text("retention:\n  teirs: []\n")
    rc, doc = _check_config_json(capsys, str(p))
    assert rc == 2 and doc["ok"] is False
    assert doc["error"]["type"] == "ConfigError" and doc["error"]["exit_code"] == 2
    assert "did you mean 'tiers'?" in doc["error"]["message"]
    rc, doc = _check_config_json(capsys, str(tmp_path / "missing.yaml"))
    assert rc == 2 and "does not exist" in doc["error"]["message"]


def test_check_config_text_shows_next_runs(tmp_path, capsys):
    from daemon.cli import main

    p = tmp_path / "config.yaml"
    p.write_text("timezone: Europe/Berlin\n")
    assert main(["check-config", str(p)]) == 0
    out = capsys.readouterr().out
    assert "# next snapshot runs (Europe/Berlin): " in out and "# next retention runs (Europe/Berlin): " in out
    yaml.safe_load(out)  # still valid YAML: the runs are comments
    p.write_text("retention:\n  tiers: [{count: -1}]\n")
    assert main(["check-config", str(p)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "retention.tiers[0].count" in captured.err


def test_a_key_written_twice_and_a_home_folder_typo_are_refused(tmp_path):
    from ckpt_daemon.config import parse_config
    from ckpt_daemon.errors import ConfigError

    with pytest.raises(ConfigError, match="has the key 'checkpoints' twice"):
        parse_config("checkpoints:\n  dir: /data/run7\nretention: {}\ncheckpoints:\n  pattern: x-{step}\n",
                     tmp_path / "config.yaml")
    with pytest.raises(ConfigError, match="snapshots.dir ~snaps names the home folder of a user 'snaps'.*~/snaps"):
        parse_config("snapshots:\n  dir: ~snaps\n", tmp_path / "config.yaml")
