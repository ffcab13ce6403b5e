"""Several runs on one host: the template unit ckpt-daemon@.service and one drop-in per instance, installed
with the README's own commands, checked by `systemd-analyze verify`, and two instances run side by side
exactly as their ExecStart would (there is no systemd here): each supervises its trainer and serves HTTP
on its own port, with its own state folder; a third on the same checkpoint folder is refused, both at
install time and at start."""

from __future__ import annotations

import json
import os
import pwd
import re
import shlex
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.helpers import PY, Daemon, env_for_children, write_config

SLEEPER = [PY, "-c", "import time; time.sleep(3600)"]
EXE = str(Path(sys.executable).parent / "ckpt-daemon")  # the venv's ckpt-daemon, as the README's .venv/bin/...


def free_port(host: str = "127.0.0.1") -> int:
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def readme_install_commands() -> list[str]:
    """The install-unit lines of docs/systemd.md's block for several runs, as written there."""
    from tests.snippets import doc_block

    block = doc_block("docs/systemd.md", "install-unit --instance job-a")
    return [line for line in block.splitlines()
            if line.startswith("sudo .venv/bin/ckpt-daemon install-unit --instance")]


def as_run_here(line: str, root: Path, units: Path) -> list[str]:
    """A README line as this test runs it: no sudo (the tests run as root), the venv's ckpt-daemon, the
    folders under the test's own /srv, the current user, and the units written to a folder of the test's
    instead of /etc/systemd/system."""
    words = shlex.split(line)
    assert words[:2] == ["sudo", ".venv/bin/ckpt-daemon"], line
    words = [EXE] + [w.replace("/srv/", f"{root}/") for w in words[2:]]
    words[words.index("--user") + 1] = pwd.getpwuid(os.getuid()).pw_name
    return words + ["--output", str(units / "ckpt-daemon@.service")]


def unit_settings(*files: Path) -> dict[str, list[str]]:
    """The settings of a unit and its drop-ins, in order (an empty assignment resets a list, as in systemd)."""
    out: dict[str, list[str]] = {}
    for f in files:
        for line in f.read_text().splitlines():
            m = re.match(r"([A-Za-z]+)=(.*)$", line)
            if m:
                key, value = m.groups()
                out[key] = [] if value == "" else out.get(key, []) + [value]
    return out


def start_as_unit(units: Path, name: str, state: Path, d: Daemon) -> None:
    """Start instance `name` the way systemd would: its ExecStart, Environment, WorkingDirectory and
    $STATE_DIRECTORY, from the template and its drop-in."""
    s = unit_settings(units / "ckpt-daemon@.service", units / f"ckpt-daemon@{name}.service.d" / "ckpt-daemon.conf")
    argv = [w.replace("%%", "%") for w in shlex.split(s["ExecStart"][-1])]
    env = {**env_for_children()}
    for assignment in s.get("Environment", []):
        for word in shlex.split(assignment):
            k, _, v = word.partition("=")
            env[k] = v.replace("%%", "%")
    state_dir = state / s["StateDirectory"][-1].replace("%i", name)
    state_dir.mkdir(parents=True, exist_ok=True)
    env["STATE_DIRECTORY"] = str(state_dir)
    d.out = open(d.folder / "daemon.out", "ab")
    d.proc = subprocess.Popen(argv, env=env, cwd=s["WorkingDirectory"][-1], stdout=d.out, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL)


@pytest.mark.slow
def test_two_instances_side_by_side_from_the_template_unit(tmp_path, daemons):  # noqa: F811
    srv, units, state = tmp_path / "srv", tmp_path / "units", tmp_path / "state"
    units.mkdir()
    ports = {"job-a": free_port(), "job-b": free_port()}
    runs = {name: Daemon(srv / name, {"training": {"command": SLEEPER}, "http": {"enabled": True, "port": port}})
            for name, port in ports.items()}
    commands = readme_install_commands()
    assert len(commands) == 2, commands
    for line in commands:
        r = subprocess.run(as_run_here(line, srv, units), capture_output=True, text=True, env=env_for_children(),
                           timeout=120)
        assert r.returncode == 0, r.stderr
        name = shlex.split(line)[shlex.split(line).index("--instance") + 1]
        assert f"systemctl enable --now ckpt-daemon@{name}" in r.stdout
    template = (units / "ckpt-daemon@.service").read_text()
    for needle in ("Type=notify", "WatchdogSec=", "Restart=on-failure", "RestartPreventExitStatus=4", "KillMode=mixed",
                   "NoNewPrivileges=yes", "ProtectSystem=strict", "StateDirectory=ckpt-daemon/%i", "StartLimitBurst=5"):
        assert needle in template, needle
    for name in ports:
        drop_in = (units / f"ckpt-daemon@{name}.service.d" / "ckpt-daemon.conf").read_text()
        assert f'Environment="CKPT_DAEMON_CONFIG={runs[name].cfg}"' in drop_in
        assert f"{srv / name / 'checkpoints'} " in drop_in and f"WorkingDirectory={srv / name}\n" in drop_in
        if shutil.which("systemd-analyze"):
            v = subprocess.run(["systemd-analyze", "verify", str(units / f"ckpt-daemon@{name}.service")],
                               capture_output=True, text=True)
            assert v.returncode == 0 and "ckpt-daemon@" not in v.stderr, v.stderr

    # both run side by side, each as its ExecStart would, with its own state folder
    for name, d in runs.items():
        daemons.append(d)
        start_as_unit(units, name, state, d)
    for name, d in runs.items():
        d.wait(lambda s: s["training"]["state"] == "running", what=f"{name}'s trainer running")
    pids = {name: d.status()["training"]["pid"] for name, d in runs.items()}
    assert len(set(pids.values())) == 2
    for name, d in runs.items():
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{ports[name]}/api/status", timeout=10) as r:
                    doc = json.loads(r.read())
                break
            except OSError:
                assert time.monotonic() < deadline and d.proc.poll() is None, d.output()[-3000:]
                time.sleep(0.1)
        assert doc["daemon"]["config"] == str(d.cfg) and doc["training"]["pid"] == pids[name]
        assert doc["checkpoints"]["dir"] == str(d.folder / "checkpoints")
        assert any(p.name.startswith("config-in-force-") for p in (state / "ckpt-daemon" / name).iterdir())

    # a third run pointed at job-a's checkpoint folder: refused when installed...
    third = srv / "job-c"
    cfg_c = write_config(third, {"checkpoints": {"dir": str(srv / "job-a" / "checkpoints")},
                                 "training": {"command": SLEEPER}, "http": {"enabled": True, "port": free_port()}})
    r = subprocess.run(as_run_here("sudo .venv/bin/ckpt-daemon install-unit --instance job-c --user ckpt --config "
                                   "/srv/job-c/config.yaml", srv, units), capture_output=True, text=True,
                       env=env_for_children(), timeout=120)
    assert r.returncode == 2 and "ckpt-daemon@job-a.service" in r.stderr and "one daemon per checkpoint folder" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and not (units / "ckpt-daemon@job-c.service.d").exists()
    # ...and at start (a drop-in written by hand, or a unit installed before job-a was)
    (units / "ckpt-daemon@job-c.service.d").mkdir()
    drop_in_b = (units / "ckpt-daemon@job-b.service.d" / "ckpt-daemon.conf").read_text()
    (units / "ckpt-daemon@job-c.service.d" / "ckpt-daemon.conf").write_text(
        drop_in_b.replace(str(runs["job-b"].cfg), str(cfg_c)).replace(str(srv / "job-b"), str(third)))
    c = Daemon.__new__(Daemon)
    c.folder, c.cfg = third, cfg_c
    start_as_unit(units, "job-c", state, c)
    daemons.append(c)
    assert c.proc.wait(timeout=60) == 4  # EXIT_BUSY: the units do not restart it (RestartPreventExitStatus=4)
    assert "already manages" in c.output() and str(srv / "job-a" / "checkpoints") in c.output()
    # the same HTTP port as job-b, with folders of its own: refused when installed
    (units / "ckpt-daemon@job-c.service.d" / "ckpt-daemon.conf").unlink()
    write_config(third, {"training": {"command": SLEEPER}, "http": {"enabled": True, "port": ports["job-b"]}})
    r = subprocess.run(as_run_here("sudo .venv/bin/ckpt-daemon install-unit --instance job-c --user ckpt --config "
                                   "/srv/job-c/config.yaml", srv, units), capture_output=True, text=True,
                       env=env_for_children(), timeout=120)
    assert r.returncode == 2 and "ckpt-daemon@job-b.service" in r.stderr and f"port, {ports['job-b']}" in r.stderr, r.stderr

    for name, d in runs.items():
        assert d.proc.poll() is None, f"{name} stopped:\n{d.output()[-3000:]}"
        assert d.stop() == 0


def test_instance_names_and_output_are_checked(tmp_path, capsys):
    from daemon.cli import main as cli

    cfg = write_config(tmp_path / "run", tiny=False)
    for bad in ("../x", "a b", "", "-x", "x" * 65, "a@b"):
        assert cli(["install-unit", f"--instance={bad}", "--config", str(cfg), "--print"]) == 2, bad
        assert "cannot be an instance name" in capsys.readouterr().err, bad
    assert cli(["install-unit", "--instance", "ok", "--config", str(cfg), "--output", str(tmp_path / "x.service")]) == 2
    assert "ending in '@.service'" in capsys.readouterr().err
    assert cli(["install-unit", "--instance", "ok", "--config", str(cfg), "--print"]) == 0
    out = capsys.readouterr().out
    assert "StateDirectory=ckpt-daemon/%i" in out and f"CKPT_DAEMON_CONFIG={cfg}" in out
    # a folder with '%' (a specifier in unit files) and a blank is written so that systemd reads it back
    odd = tmp_path / "run 100%"
    cfg = write_config(odd, tiny=False)
    units = tmp_path / "units"
    units.mkdir()
    assert cli(["install-unit", "--instance", "odd", "--config", str(cfg), "--output",
                str(units / "ckpt-daemon@.service")]) == 0
    drop_in = (units / "ckpt-daemon@odd.service.d" / "ckpt-daemon.conf").read_text()
    assert 'Environment="CKPT_DAEMON_CONFIG=' + str(cfg).replace("%", "%%") + '"' in drop_in
    if shutil.which("systemd-analyze"):
        v = subprocess.run(["systemd-analyze", "verify", str(units / "ckpt-daemon@odd.service")], capture_output=True,
                           text=True)
        assert v.returncode == 0 and "ckpt-daemon@" not in v.stderr, v.stderr


def test_the_docs_single_unit_install_runs_as_written(tmp_path):
    """docs/systemd.md's first block is shell that parses; its install-unit line, expanded by bash as written
    (in a project folder of the test's, as the test's user, the unit written to a folder of the test's),
    renders a unit that runs the daemon on that config as that user, which `systemd-analyze verify` accepts."""
    from tests.snippets import doc_block

    block = doc_block("docs/systemd.md", "install-unit --user ckpt")
    assert subprocess.run(["bash", "-n"], input=block, text=True, timeout=60).returncode == 0
    [line] = [ln for ln in block.splitlines() if " install-unit " in ln]
    project = tmp_path / "project"
    cfg = write_config(project, {"training": {"command": SLEEPER}})
    expanded = subprocess.run(["bash", "-c", f'set -- {line.split("#")[0]}; printf "%s\\0" "$@"'], cwd=project,
                              capture_output=True, text=True, timeout=60, check=True).stdout.split("\0")[:-1]
    assert expanded[:3] == ["sudo", ".venv/bin/ckpt-daemon", "install-unit"], expanded
    unit = tmp_path / "units" / "ckpt-daemon.service"
    unit.parent.mkdir()
    me = pwd.getpwuid(os.getuid()).pw_name
    argv = [EXE] + expanded[2:]
    argv[argv.index("--user") + 1] = me
    r = subprocess.run(argv + ["--output", str(unit)], capture_output=True, text=True, env=env_for_children(),
                       timeout=120)
    assert r.returncode == 0, r.stderr
    s = unit_settings(unit)
    assert s["User"] == [me] and str(cfg) in s["ExecStart"][-1], s
    assert "systemctl daemon-reload" in block and "systemctl enable --now ckpt-daemon" in block
    if shutil.which("systemd-analyze"):
        v = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=120)
        assert v.returncode == 0, v.stderr
