"""config.yaml edits under a running daemon: progress is never lost to an edit.

An emptied or truncated file is rejected; a moved folder is held until a restart; the last good copy is
only ever a config that validated and was put in force; the idle daemon reads the file only when it
really changed and reports a given problem once; a re-pointed symlink and SIGHUP are picked up; and the
commands that only look still show what runs when the file is broken.
"""

from __future__ import annotations

import json
import os
import signal

import pytest
import yaml

from ckpt_daemon import configfile
from tests.helpers import PY, Daemon, env_for_children, run_py

SLEEPER = {"training": {"command": [PY, "-c", "import time; time.sleep(3600)"]}}


def edit(path, data_or_text) -> None:
    """Save as editors do: a new file renamed over the old one."""
    tmp = path.with_name(path.name + ".new")
    tmp.write_text(data_or_text if isinstance(data_or_text, str) else yaml.safe_dump(data_or_text))
    os.replace(tmp, path)


def count(text: str, needle: str) -> int:
    return text.count(needle)


@pytest.mark.slow
def test_edits_that_would_lose_progress_never_take_effect(tmp_path, daemons):
    d = Daemon(tmp_path, {**SLEEPER, "logging": {"level": "debug"}}).start()
    daemons.append(d)
    d.wait(lambda s: s["training"]["state"] == "running", what="the first start")
    last_good = tmp_path / "logs" / configfile.LAST_GOOD
    good_text = last_good.read_text()
    good = yaml.safe_load(d.cfg.read_text())

    # an emptied file
    edit(d.cfg, "")
    s = d.wait(lambda s: s["daemon"]["config_error"] and s, what="the rejection of an empty file")
    assert "holds no settings" in s["daemon"]["config_error"]
    assert s["checkpoints"]["dir"] == str(tmp_path / "checkpoints") and last_good.read_text() == good_text

    # a file that lost its sections (cut short mid-save): it parses, but is not the config in force
    edit(d.cfg, "logging:\n  level: debug\n")
    s = d.wait(lambda s: "no longer has the section" in (s["daemon"]["config_error"] or "") and s,
               what="the rejection of a truncated file")
    assert "`training:`" in s["daemon"]["config_error"] and "write the section explicitly, e.g. `disk: {}`" in s["daemon"]["config_error"]
    assert last_good.read_text() == good_text and s["training"]["state"] == "running"

    # a moved checkpoint folder: held until the daemon restarts, and said so
    moved = {**good, "checkpoints": {"dir": str(tmp_path / "elsewhere")}}
    edit(d.cfg, moved)
    s = d.wait(lambda s: s["daemon"]["config_pending"] and s, what="the held folder change")
    assert f"checkpoints.dir from {tmp_path / 'checkpoints'} to {tmp_path / 'elsewhere'}" in s["daemon"]["config_pending"]
    assert "restart the daemon" in s["daemon"]["config_pending"]
    assert s["checkpoints"]["dir"] == str(tmp_path / "checkpoints") and last_good.read_text() == good_text
    r = run_py(["-m", "daemon", "status", "--config", str(d.cfg)])
    assert "EDIT HELD UNTIL RESTART" in r.stdout and "CONFIG NOT IN FORCE" in r.stdout.splitlines()[0]

    # the same broken text saved again and again is reported once
    edit(d.cfg, "retention:\n  tiers: [{count: -1}]\n")
    d.wait(lambda s: "retention.tiers[0].count" in (s["daemon"]["config_error"] or ""), what="a broken edit")
    for _ in range(3):
        before = count(d.log(), "config.yaml re-read: the same text as before")
        d.cfg.touch()
        d.wait(lambda s, before=before: count(d.log(), "config.yaml re-read: the same text as before") > before,
               what="a re-read")
    assert count(d.log(), "config.yaml edit rejected") == 3  # empty, truncated, broken: once each

    # the fix is put in force, and only then becomes the last good copy
    edit(d.cfg, {**good, "retention": {"tiers": [{"count": 50}]}})
    d.wait(lambda s: s["daemon"]["config_error"] is None and s["daemon"]["config_pending"] is None,
           what="the fix")
    assert yaml.safe_load(last_good.read_text())["retention"] == {"tiers": [{"count": 50}]}
    assert d.stop() == 0

    # restarted with the folder moved while it was down: the new folder is used, and the log says so
    edit(d.cfg, {**moved, "retention": {"tiers": [{"count": 50}]}})
    d.start()
    s = d.wait(lambda s: s["daemon"]["pid"] == d.proc.pid and s["training"]["state"] == "running" and s,
               what="the restart")
    assert s["checkpoints"]["dir"] == str(tmp_path / "elsewhere") and s["daemon"]["config_error"] is None
    assert "changed a folder while the daemon was down" in d.log()
    assert d.stop() == 0


@pytest.mark.slow
def test_an_idle_daemon_reads_the_config_only_when_it_changes(tmp_path, daemons):
    d = Daemon(tmp_path, {**SLEEPER, "logging": {"level": "debug"}}).start()
    daemons.append(d)
    s0 = d.wait(lambda s: s["training"]["state"] == "running" and s, what="the first start")
    last_good = tmp_path / "logs" / configfile.LAST_GOOD
    state = tmp_path / "logs" / "daemon-state.json"
    before = (os.stat(last_good).st_ino, os.stat(last_good).st_mtime_ns)
    for _ in range(3):  # touched, not changed: re-read, but nothing rewritten and nothing logged at info
        n = count(d.log(), "config.yaml re-read")
        d.cfg.touch()
        d.wait(lambda s, n=n: count(d.log(), "config.yaml re-read") > n, what="a re-read")
    assert (os.stat(last_good).st_ino, os.stat(last_good).st_mtime_ns) == before
    assert json.loads(state.read_text())["written"] == s0["written"]  # nothing changed: the state is not rewritten
    assert "config.yaml reloaded" not in d.log()
    assert d.stop() == 0


@pytest.mark.slow
def test_a_repointed_config_symlink_and_sighup_are_picked_up(tmp_path, daemons):
    d = Daemon(tmp_path, SLEEPER)
    real = tmp_path / "configs"
    real.mkdir()
    a = real / "a.yaml"
    os.replace(d.cfg, a)
    os.symlink(a, d.cfg)
    data = yaml.safe_load(a.read_text())
    data["checkpoints"] = {"dir": str(tmp_path / "checkpoints")}
    data["logging"] = {"dir": str(tmp_path / "logs")}
    a.write_text(yaml.safe_dump(data))
    d.start()
    daemons.append(d)
    d.wait(lambda s: s["training"]["state"] == "running", what="the first start")
    b = real / "b.yaml"
    b.write_text(yaml.safe_dump({**data, "retention": {"tiers": [{"count": 7}]}}))
    tmp_link = tmp_path / "config.yaml.tmp"
    os.symlink(b, tmp_link)
    os.replace(tmp_link, d.cfg)  # what `ln -sfn b.yaml config.yaml` does
    d.wait(lambda s: "config.yaml reloaded" in d.log(), what="the reload through the new link")
    assert "retention.tiers" in d.log()
    # an edit the watcher cannot see (a file with the same size and mtime): SIGHUP re-reads it
    st = os.stat(b)
    b.write_text(b.read_text().replace("count: 7", "count: 8"))
    os.utime(b, ns=(st.st_atime_ns, st.st_mtime_ns))
    n = count(d.log(), "config.yaml reloaded")
    d.proc.send_signal(signal.SIGHUP)
    d.wait(lambda s: count(d.log(), "config.yaml reloaded") > n, what="the SIGHUP reload")
    assert "-> [{'count': 8, 'every_steps': None}]" in d.log()
    assert d.stop() == 0


@pytest.mark.slow
def test_with_a_broken_config_the_looking_commands_still_show_what_runs(tmp_path, daemons):
    d = Daemon(tmp_path, SLEEPER).start()
    daemons.append(d)
    s = d.wait(lambda s: s["training"]["state"] == "running" and s, what="the first start")
    d.cfg.write_text("retention: [this is: not valid\n")
    r = run_py(["-m", "daemon", "status", "--config", str(d.cfg)])
    assert r.returncode == 0, r.stderr
    assert f"training: running pid {s['training']['pid']}" in r.stdout and "is BROKEN" in r.stdout
    assert "not valid YAML" in r.stderr
    r = run_py(["-m", "daemon", "list", "--config", str(d.cfg), "--json"])
    assert r.returncode == 0 and "broken" in r.stderr and json.loads(r.stdout)["root"] == str(tmp_path / "checkpoints")
    r = run_py(["-m", "maintenance.cleanup", "--config", str(d.cfg), "--dry-run"])
    assert r.returncode == 0 and "Training: ACTIVE" in r.stdout and "last good config" in r.stderr
    r = run_py(["-m", "maintenance.cleanup", "--config", str(d.cfg), "-y"])  # deleting needs a valid config
    assert r.returncode == 2 and "not valid YAML" in r.stderr
    assert d.stop() == 0


@pytest.mark.slow
def test_a_changed_training_command_takes_effect_at_the_next_start(tmp_path, daemons):
    d = Daemon(tmp_path, SLEEPER).start()
    daemons.append(d)
    s = d.wait(lambda s: s["training"]["state"] == "running" and s, what="the first start")
    data = yaml.safe_load(d.cfg.read_text())
    data["training"]["command"] = [PY, "-c", "print('the new command', flush=True); import time; time.sleep(3600)"]
    edit(d.cfg, data)
    d.wait(lambda s: "they take effect at the trainer's next (re)start" in d.log(), what="the reload")
    os.kill(s["training"]["pid"], signal.SIGKILL)
    d.wait(lambda s: "the new command" in (tmp_path / "logs" / "trainer.log").read_text(), what="the new command")
    assert d.stop() == 0


@pytest.mark.slow
def test_held_and_rejected_edits_never_reach_the_trainer(tmp_path, daemons):
    """The trainer is given the config in force, not the live file: a held folder move, a rejected edit
    and a changed name pattern stay out of it until the daemon restarts."""
    d = Daemon(tmp_path).start()
    daemons.append(d)
    s = d.wait(lambda s: (d.step(s) or 0) >= 25 and s, what="training")
    good = yaml.safe_load(d.cfg.read_text())
    edit(d.cfg, {**good, "checkpoints": {"dir": str(tmp_path / "elsewhere"), "pattern": "ckpt-{step}"}})
    d.wait(lambda s: s["daemon"]["config_pending"], what="the held edit")
    assert "checkpoints.pattern" in d.status()["daemon"]["config_pending"]
    os.kill(s["training"]["pid"], signal.SIGKILL)
    s = d.wait(lambda s: s["training"]["restarts"] == 1 and (d.step(s) or 0) > 45 and s, what="the restarted trainer")
    assert s["training"]["resumed_from"].startswith("checkpoint-")
    assert not (tmp_path / "elsewhere").exists()  # it saved where the daemon looks
    # a rejected edit: the trainer keeps training on the config in force
    edit(d.cfg, {**good, "trainer": {**good["trainer"], "batch_size": -8}})
    d.wait(lambda s: "trainer.batch_size" in (s["daemon"]["config_error"] or ""), what="the rejection")
    os.kill(s["training"]["pid"], signal.SIGKILL)
    s = d.wait(lambda s: s["training"]["restarts"] == 2 and (d.step(s) or 0) > 65 and s, what="training on")
    assert s["training"]["avoided_checkpoints"] == [] and s["training"]["state"] == "running"
    assert d.stop() == 0


@pytest.mark.slow
def test_a_config_truncated_while_the_daemon_was_down_is_not_taken_at_restart(tmp_path, daemons):
    d = Daemon(tmp_path, {**SLEEPER, "logging": {"dir": "mylogs"}, "checkpoints": {"dir": "ck"}},
               env={"XDG_STATE_HOME": str(tmp_path / "state")})
    d.status = lambda: json.loads((tmp_path / "mylogs" / "daemon-state.json").read_text()) \
        if (tmp_path / "mylogs" / "daemon-state.json").exists() else {}  # type: ignore[method-assign]
    d.start()
    daemons.append(d)
    d.wait(lambda s: s.get("training", {}).get("state") == "running", what="the first start")
    assert d.stop() == 0
    text = d.cfg.read_text()
    d.cfg.write_text(text[: text.index("logging:")])  # cut short: logging (and all after it) is gone
    d.start()
    s = d.wait(lambda s: s["daemon"]["pid"] == d.proc.pid and s["training"]["state"] == "running" and s,
               what="a start on the config in force")
    assert s["checkpoints"]["dir"] == str(tmp_path / "ck") and "no longer has the section" in s["daemon"]["config_error"]
    env = {**env_for_children(), "XDG_STATE_HOME": str(tmp_path / "state")}
    r = run_py(["-m", "daemon", "status", "--config", str(d.cfg)], env=env)
    assert r.returncode == 0 and f"pid {s['training']['pid']}" in r.stdout and "is BROKEN" in r.stdout
    assert d.stop() == 0


@pytest.mark.slow
def test_two_configs_never_share_a_logs_folder(tmp_path, daemons):
    a = Daemon(tmp_path, {**SLEEPER, "checkpoints": {"dir": "ckA"}})
    a.start()
    daemons.append(a)
    a.wait(lambda s: s["training"]["state"] == "running", what="the first daemon")
    b_cfg = tmp_path / "b.yaml"
    b_cfg.write_text(yaml.safe_dump({**yaml.safe_load(a.cfg.read_text()), "checkpoints": {"dir": "ckB"}}))
    r = run_py(["-m", "daemon", "run", "--config", str(b_cfg)], timeout=60)
    assert r.returncode == 4 and "already writes its logs and state to" in r.stderr and "logging.dir" in r.stderr
    assert a.stop() == 0
