"""One command line: every operation a `ckpt-daemon` subcommand with the same flags as its module entry
point, --config before or after the command, $CKPT_DAEMON_CONFIG, --json with one error shape, "did you
mean", completion for bash/zsh/fish, pin/unpin by step (and releasing an epoch end), the command reference
(docs/commands.md) checked against the parser, and the shipped config.yaml valid under the shipped schema."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import yaml

from daemon.cli import build_parser
from daemon.cli import main as cli
from tests.helpers import PY, REPO, env_for_children, run_py, write_config


def native(root: Path, step: int, epoch: int) -> None:
    d = root / f"checkpoint-{step}"
    d.mkdir(parents=True)
    payload = f"weights {step}".encode()
    (d / "model.safetensors").write_bytes(payload)
    files = {"model.safetensors": {"size": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}}
    (d / "manifest.json").write_text(json.dumps({"format": "ckpt-daemon/1", "step": step, "epoch": epoch,
                                                 "files": files}))


@pytest.fixture
def project(tmp_path):
    cfg = write_config(tmp_path, {"retention": {"tiers": [{"count": 1}]}}, tiny=False)
    for step, epoch in ((10, 0), (20, 0), (30, 1), (40, 1), (50, 2)):
        native(tmp_path / "checkpoints", step, epoch)
    return cfg


def out_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out)


def test_config_before_or_after_the_command_and_from_the_environment(project, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path.parent)  # no ./config.yaml here
    for argv in (["--config", str(project), "list", "--json"], ["list", "--config", str(project), "--json"]):
        assert cli(argv) == 0
        assert [e["name"] for e in out_json(capsys)["checkpoints"]][-1] == "checkpoint-50"
    monkeypatch.setenv("CKPT_DAEMON_CONFIG", str(project))
    assert cli(["list", "--json"]) == 0 and out_json(capsys)["ok"] is True
    # the one given after the command wins over the one before it
    assert cli(["--config", "/nonexistent/c.yaml", "list", "--config", str(project), "--json"]) == 0
    capsys.readouterr()


def test_every_reporting_command_has_json_and_the_same_error_shape(project, capsys, tmp_path):
    good = {
        "status": ["status", "--json"], "list": ["list", "--json"], "cleanup": ["cleanup", "--dry-run", "--json"],
        "snapshot --list": ["snapshot", "--list", "--json"], "check-config": ["check-config", "--json"],
        "pin": ["pin", "30", "--json"], "unpin": ["unpin", "30", "--json"],
    }
    for what, argv in good.items():
        code = cli(["--config", str(project), *argv])
        doc = out_json(capsys)
        assert doc["ok"] is True and code in (0, 5), (what, doc)  # status: 5, the daemon is not running
    assert cli(["--config", str(project), "snapshot", "--json"]) == 0
    snap = out_json(capsys)
    assert snap["created"] and {c["name"] for c in snap["checkpoints"]} >= {"checkpoint-50"}
    assert cli(["--config", str(project), "restore", snap["name"], "--json"]) == 0
    assert out_json(capsys)["ok"] is True
    missing = str(tmp_path / "missing.yaml")
    for argv in (["list", "--json"], ["cleanup", "--dry-run", "--json"], ["snapshot", "--json"],
                 ["restore", "x", "--json"],
                 ["pin", "30", "--json"], ["unpin", "30", "--json"], ["check-config", "--json"],
                 ["consolidate", "--json"],
                 ["status", "--json"]):
        code = cli(["--config", missing, *argv])
        doc = out_json(capsys)
        assert doc["ok"] is False and set(doc["error"]) == {"type", "message", "exit_code"}, argv
        assert code == doc["error"]["exit_code"] == 2 and "missing.yaml" in doc["error"]["message"], argv
    assert cli(["compress", str(tmp_path / "nothing-*.pt"), "--json"]) == 2
    assert out_json(capsys)["error"]["type"] == "UsageError"


@pytest.mark.slow
def test_both_spellings_run_the_same_code(project):
    a = run_py(["-m", "maintenance.cleanup", "--config", str(project), "--dry-run", "--json"], check=True)
    b = run_py(["-m", "daemon", "cleanup", "--config", str(project), "--dry-run", "--json"], check=True)
    strip = lambda d: {k: v for k, v in json.loads(d).items() if k not in ("disk_free_bytes", "duration_s", "time")}  # noqa: E731
    assert strip(a.stdout) == strip(b.stdout)
    for args in (["-m", "maintenance.cleanup", "--help"], ["-m", "daemon", "cleanup", "--help"],
                 ["-m", "daemon", "--help"],
                 ["-m", "trainer", "--help"]):
        r = run_py(args, check=True)
        assert "Exit codes" in r.stdout and "143" in r.stdout and "--config" in r.stdout, args


@pytest.mark.slow
def test_a_report_into_a_closed_pipe_ends_quietly_and_leaves_the_callers_sigpipe(project):
    # `ckpt-daemon list | head`: the reader is gone before the report is written; no traceback, no
    # "Exception ignored" line, for the table and for --json
    for argv in (["list"], ["list", "--json"], ["cleanup", "--dry-run"]):
        r, w = os.pipe()
        os.close(r)
        p = subprocess.run([PY, "-m", "daemon", *argv, "--config", str(project)], stdout=w, stderr=subprocess.PIPE,
                           env=env_for_children(), stdin=subprocess.DEVNULL, timeout=120)
        os.close(w)
        assert p.returncode in (0, -signal.SIGPIPE) and p.stderr == b"", (argv, p.stderr.decode())
    # a command run in-process (as the tests do) leaves the caller's SIGPIPE action as it found it: the
    # default action it sets for a report would otherwise kill a long-lived caller at its next closed socket
    before = signal.getsignal(signal.SIGPIPE)
    assert cli(["--config", str(project), "list", "--json"]) == 0
    assert signal.getsignal(signal.SIGPIPE) == before


@pytest.mark.slow
def test_mistakes_get_a_did_you_mean_and_exit_2(project):
    r = run_py(["-m", "daemon", "stauts", "--config", str(project)])
    assert r.returncode == 2 and "did you mean 'status'" in r.stderr and "Traceback" not in r.stderr
    r = run_py(["-m", "daemon", "list", "--config", str(project), "--verfy"])
    assert r.returncode == 2 and "did you mean '--verify'" in r.stderr
    r = run_py(["-m", "daemon", "--version"], check=True)
    assert r.stdout.startswith("ckpt-daemon ")


def test_pin_and_unpin_by_step_and_release_an_epoch_end(project, capsys):
    def plan() -> dict:
        assert cli(["--config", str(project), "cleanup", "--dry-run", "--json"]) == 0
        return {d["name"]: d for d in out_json(capsys)["decisions"]}

    before = plan()
    assert before["checkpoint-20"]["action"] == "keep" and "last checkpoint of epoch 0" in " ".join(before["checkpoint-20"]["reasons"])
    assert before["checkpoint-10"]["action"] == "delete"
    assert cli(["--config", str(project), "pin", "10", "--reason", "paper"]) == 0
    assert "pinned checkpoint-10" in capsys.readouterr().out
    assert plan()["checkpoint-10"]["action"] == "keep"
    assert cli(["--config", str(project), "unpin", "20"]) == 0
    assert "released checkpoint-20" in capsys.readouterr().out
    after = plan()
    assert after["checkpoint-20"]["action"] == "delete" and after["checkpoint-40"]["action"] == "keep"  # only that one
    assert cli(["--config", str(project), "pin", "checkpoint-20"]) == 0  # pinning it again protects it again
    capsys.readouterr()
    assert plan()["checkpoint-20"]["action"] == "keep"
    assert cli(["--config", str(project), "pin", "99"]) == 2
    assert "no checkpoint named '99'" in capsys.readouterr().err


def test_list_verify_exits_1_when_a_checkpoint_is_damaged(project, capsys):
    assert cli(["--config", str(project), "list", "--verify", "--json"]) == 0
    assert out_json(capsys)["ok"] is True
    f = project.parent / "checkpoints" / "checkpoint-30" / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[3] ^= 0x01
    f.write_bytes(bytes(data))
    assert cli(["--config", str(project), "list", "--verify"]) == 1  # `list --verify && ...` in cron notices
    out = capsys.readouterr()
    assert "checkpoint-30" in out.err and "not usable" in out.err
    assert cli(["--config", str(project), "list", "--verify", "--json"]) == 1
    doc = out_json(capsys)
    assert doc["ok"] is False and {e["name"]: e["status"] for e in doc["checkpoints"]}["checkpoint-30"] == "corrupt"
    assert cli(["--config", str(project), "list"]) == 0  # a listing without --verify only lists


@pytest.mark.slow
def test_usage_errors_under_json_are_json(project):
    for args in (["status", "--json", "--bogus"], ["pin", "--json"]):
        r = run_py(["-m", "daemon", "--config", str(project), *args])
        doc = json.loads(r.stdout)
        assert r.returncode == 2 and doc["ok"] is False and doc["error"]["type"] == "UsageError", args
    r = run_py(["-m", "maintenance.cleanup", "--config", str(project), "--dry-rn"])
    assert r.returncode == 2 and "did you mean '--dry-run'" in r.stderr and "maintenance.cleanup [-h]" in r.stderr
    r = run_py(["-m", "daemon", "status", "--config", str(project), "--jsn"])
    assert "usage: ckpt-daemon status" in r.stderr and "did you mean '--json'" in r.stderr


@pytest.mark.slow
def test_numbers_on_the_command_line_are_bounded(project):
    """NaN, infinities and out-of-range values are usage errors naming the range, never a traceback later
    (`status --watch nan` used to die in time.sleep)."""
    for args in (["status", "--watch", "nan"], ["status", "--watch", "0"], ["cleanup", "--dry-run", "--wait", "inf"],
                 ["consolidate", "--average", "0"], ["train", "--max-steps", "-1"],
                 ["generate", "--checkpoint", "x", "--tokens", "1e9"],
                 ["generate", "--checkpoint", "x", "--temperature", "nan"]):
        r = run_py(["-m", "daemon", "--config", str(project), *args])
        assert r.returncode == 2 and "Traceback" not in r.stderr, (args, r.stderr)
        assert "out of range" in r.stderr or "not a whole number" in r.stderr, (args, r.stderr)


def test_snapshot_list_with_none_says_so(project, capsys):
    assert cli(["--config", str(project), "snapshot", "--list"]) == 0
    assert "No snapshots in" in capsys.readouterr().out


@pytest.mark.slow
def test_status_colour_and_watch(project):
    env = {**env_for_children(), "FORCE_COLOR": "1", "COLUMNS": "120"}
    env.pop("NO_COLOR", None)
    r = run_py(["-m", "daemon", "status", "--config", str(project)], env=env)
    assert r.returncode == 5 and "\x1b[" in r.stdout  # red: the daemon has not run
    env = {**env_for_children(), "NO_COLOR": "1"}
    r = run_py(["-m", "daemon", "status", "--config", str(project)], env=env)
    assert r.returncode == 5 and "\x1b[" not in r.stdout and "has not run" in r.stdout
    p = subprocess.Popen([PY, "-m", "daemon", "status", "--config", str(project), "--watch", "0.2"], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen: list[str] = []
    reader = threading.Thread(target=lambda: seen.extend(iter(p.stdout.readline, "")), daemon=True)
    reader.start()

    def wait_for(text: str) -> None:
        deadline = time.monotonic() + 60
        while text not in "".join(seen):
            assert time.monotonic() < deadline and p.poll() is None, f"no {text!r} in {seen[-5:]}"
            time.sleep(0.05)

    try:
        wait_for("has not run")
        # while it watches, the daemon writes its state: a later refresh shows it
        state = project.parent / "logs" / "daemon-state.json"
        state.parent.mkdir(exist_ok=True)
        state.write_text(json.dumps({"daemon": {"pid": 999999999},
                                     "training": {"state": "gave_up", "message": "WATCHED"},
                                     "checkpoints": {}}))
        wait_for("training GAVE UP")
        p.send_signal(signal.SIGINT)
        p.wait(timeout=30)
        reader.join(timeout=10)
        err = p.stderr.read()
    finally:
        p.kill()
    assert p.returncode == 5 and "Traceback" not in err, err


def _ignore_stop_signals() -> None:  # in the child: what nohup, or a script's `cmd &`, hands down (and worse)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


@pytest.mark.slow
def test_status_watch_stops_on_sigint_and_sigterm_whatever_it_inherited(project):
    import pty

    env = {**env_for_children(), "TERM": "xterm-256color", "COLUMNS": "100", "LINES": "30"}
    for sig in (signal.SIGINT, signal.SIGTERM):
        master, slave = pty.openpty()  # a terminal: the live display, which hides the cursor while it runs
        p = subprocess.Popen([PY, "-m", "daemon", "status", "--config", str(project), "--watch", "0.2"], env=env,
                             stdin=slave, stdout=slave, stderr=slave, preexec_fn=_ignore_stop_signals)
        os.close(slave)
        seen = bytearray()

        def read(master: int = master, seen: bytearray = seen) -> None:
            try:
                while chunk := os.read(master, 65536):
                    seen.extend(chunk)
            except OSError:  # EIO: the process and its terminal are gone
                pass

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        try:
            deadline = time.monotonic() + 60
            while b"has not run" not in seen:
                assert time.monotonic() < deadline and p.poll() is None, bytes(seen[-500:])
                time.sleep(0.05)
            p.send_signal(sig)
            assert p.wait(timeout=30) == 5, sig  # the status it showed last: the daemon is not running
            reader.join(timeout=10)
        finally:
            p.kill()
            p.wait()
            os.close(master)
        out = bytes(seen)
        assert b"Traceback" not in out, out[-2000:]
        assert b"\x1b[?25l" in out and out.rindex(b"\x1b[?25h") > out.rindex(b"\x1b[?25l"), "the cursor was not put back"


@pytest.mark.slow
def test_completion_scripts_are_generated_from_the_parser(tmp_path):
    pytest.importorskip("shtab")
    for shell in ("bash", "zsh", "fish"):
        r = run_py(["-m", "daemon", "completion", shell], check=True)
        (tmp_path / f"c.{shell}").write_text(r.stdout)
    script = f"""source {tmp_path / 'c.bash'}
COMP_WORDS=(ckpt-daemon clea); COMP_CWORD=1; _shtab_ckpt_daemon; echo "${{COMPREPLY[@]}}"
COMP_WORDS=(ckpt-daemon cleanup --dr); COMP_CWORD=2; _shtab_ckpt_daemon; echo "${{COMPREPLY[@]}}"
"""
    r = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60)
    assert r.stdout.split("\n")[:2] == ["cleanup", "--dry-run"], r
    if shutil.which("fish"):
        r = subprocess.run(["fish", "-c", f"source {tmp_path / 'c.fish'}; complete -C 'ckpt-daemon sna'; "
                                          "complete -C 'ckpt-daemon list --ver'"], capture_output=True, text=True,
                           timeout=60)
        assert r.stdout.startswith("snapshot\t") and "--verify\t" in r.stdout, r
    if shutil.which("zsh"):
        assert subprocess.run(["zsh", "-n", str(tmp_path / "c.zsh")], timeout=60).returncode == 0
        assert "'consolidate:" in (tmp_path / "c.zsh").read_text() or "consolidate" in (tmp_path / "c.zsh").read_text()
    missing = [s for s in ("fish", "zsh") if not shutil.which(s)]
    if missing:
        pytest.skip(f"bash checked; {', '.join(missing)} not installed here (.ci/run installs them)")


def test_the_command_reference_in_docs_matches_the_parser():
    from daemon import clidoc

    assert clidoc.TARGET == REPO / "docs" / "commands.md"  # the file the README links to
    old = os.environ.get("COLUMNS")
    try:
        assert clidoc.main(["--check"]) == 0, ("docs/commands.md's command reference is out of date: "
                                               "run python -m daemon.clidoc")
    finally:
        os.environ.pop("COLUMNS", None) if old is None else os.environ.__setitem__("COLUMNS", old)
    readme = clidoc.TARGET.read_text()
    sub = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    for name, p in sub.choices.items():
        assert f"### ckpt-daemon {name}\n" in readme
        for a in p._actions:
            for opt in a.option_strings:
                assert opt in readme, (name, opt)


def test_the_shipped_config_validates_against_the_shipped_schema():
    jsonschema = pytest.importorskip("jsonschema")
    from ckpt_daemon.config import config_schema

    schema = config_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    v = jsonschema.Draft202012Validator(schema)
    shipped = yaml.safe_load((REPO / "config.yaml").read_text())
    assert [e.message for e in v.iter_errors(shipped)] == []
    for pattern in ("checkpoint-{step}", ["checkpoint-{step}", "model_step_{step}.pt"]):  # both forms the validator takes
        assert v.is_valid({**shipped, "checkpoints": {**shipped.get("checkpoints", {}), "pattern": pattern}})
    assert not v.is_valid({**shipped, "checkpoints": {"pattern": 5}})
    assert not v.is_valid({**shipped, "retention": {"tierz": []}})
