"""A user's own trainer.py, daemon.py or maintenance.py never runs in place of ours.

`python -m X` puts the working folder first on sys.path. The daemon runs the trainer in the config's
folder, where a user's own `trainer.py` is at home: the built-in trainer is started with that entry left
out (-P, or its equivalent on Python 3.10). The commands the README shows work next to the user's files:
`ckpt-daemon ...` everywhere (its script's folder is first on sys.path, not the working folder), and
`python -m maintenance.cleanup` and the other `python -m` spellings in the project folder, where our
packages sit beside the user's files (Python takes a package over a module of the same name)."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from daemon.supervisor import SAFE_PATH_BOOTSTRAP, expand_command, own_module_argv
from tests.helpers import PY, REPO, Daemon, env_for_children, run_py, write_config
from tests.snippets import doc_block

EXE = str(Path(sys.executable).parent / "ckpt-daemon")  # the venv's, as the README's .venv/bin/ckpt-daemon
# If Python imports one of these, it leaves a mark and fails loudly.
USER_FILE = ("import os, sys\n"
             "open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'IMPORTED-' + __name__), 'w').close()\n"
             "sys.exit(\"the user's own \" + __file__ + ' was imported')\n")
USER_FILES = ("trainer.py", "daemon.py", "maintenance.py")


def users_files(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in USER_FILES:
        (folder / name).write_text(USER_FILE)
    return folder


def imported(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("IMPORTED-*"))


def none_imported(folder: Path) -> bool:
    assert not imported(folder), f"a user's own file was imported: {imported(folder)}"
    return True


def test_our_trainer_command_is_expanded_to_leave_the_working_folder_off_the_path():
    cfg = Path("/c/config.yaml")
    argv = expand_command(["{python}", "-m", "trainer", "--config", "{config}"], cfg, "none")
    assert argv == [sys.executable, *own_module_argv("trainer"), "--config", "/c/config.yaml"]
    assert own_module_argv("trainer", (3, 11)) == ["-P", "-m", "trainer"]
    assert own_module_argv("trainer", (3, 10, 13)) == ["-c", SAFE_PATH_BOOTSTRAP, "trainer"]
    # a user's own module may live in the working folder: theirs keeps it on the path
    assert expand_command(["{python}", "-m", "mypkg.train", "{config}"], cfg, "none") == [
        sys.executable, "-m", "mypkg.train", "/c/config.yaml"]
    assert expand_command(["torchrun", "-m", "trainer"], cfg, "none") == ["torchrun", "-m", "trainer"]


@pytest.mark.slow
@pytest.mark.parametrize("version", [(3, 10), sys.version_info[:2]], ids=["python3.10-bootstrap", "this-python"])
def test_both_ways_of_starting_our_module_run_ours_next_to_a_users_trainer_py(tmp_path, version):
    """The 3.10 bootstrap runs on this Python too: both forms, for real, in a folder holding the user's files."""
    folder = users_files(tmp_path / "run")
    r = run_py([*own_module_argv("trainer", version), "--help"], cwd=folder, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "--max-steps" in r.stdout and "Exit codes" in r.stdout  # the built-in trainer's own help
    assert imported(folder) == []


@pytest.mark.slow
def test_the_daemon_runs_its_own_trainer_next_to_a_users_trainer_py(tmp_path, daemons):
    """The config's folder (the trainer's working folder) holds the user's own trainer.py, daemon.py and
    maintenance.py; the daemon is started as systemd starts it (the installed `ckpt-daemon run`, working
    folder the config's). The built-in trainer trains; none of the user's files is imported. Then the
    README's commands in their `ckpt-daemon` spelling, in the same folder."""
    folder = users_files(tmp_path / "srv-run")
    d = Daemon(folder, {"trainer": {"checkpoint_every_steps": 5}})
    daemons.append(d)
    d.start(entry=[EXE])
    d.wait(lambda s: none_imported(folder) and (d.step(s) or 0) >= 12, timeout=180,
           what="the built-in trainer past step 12")
    assert d.stop() == 0
    commands = [[EXE, "status"], [EXE, "list", "--verify"], [EXE, "cleanup", "--dry-run"],
                [EXE, "consolidate", "--from", "best", "--dtype", "bf16"],
                [EXE, "generate", "--checkpoint", "checkpoints/best", "--prompt", "the cat"]]
    if sys.version_info >= (3, 11):  # the README's other safe spelling
        commands.append([PY, "-P", "-m", "maintenance.cleanup", "--dry-run"])
    for argv in commands:
        r = subprocess.run(argv, cwd=folder, capture_output=True, text=True, timeout=300,
                           env=env_for_children(), stdin=subprocess.DEVNULL)
        want = 5 if argv[1:] == ["status"] else 0  # 5: the daemon is not running
        assert r.returncode == want, (argv[1:], r.stdout[-2000:], r.stderr[-2000:])
        none_imported(folder)
    assert list((folder / "consolidated_models").iterdir())


@pytest.mark.slow
def test_the_readmes_python_m_commands_work_in_the_project_folder_next_to_a_users_files(tmp_path):
    """The README's layout: config.yaml in the project folder beside daemon/, trainer/ and maintenance/, and
    the user's own trainer.py, daemon.py and maintenance.py dropped there too. Each command exactly as the
    README's quick tour writes it (.venv/bin/python is this interpreter)."""
    project = users_files(tmp_path / "project")
    for pkg in ("ckpt_daemon", "daemon", "trainer", "maintenance"):
        (project / pkg).symlink_to(REPO / pkg, target_is_directory=True)
    write_config(project, {"trainer": {"checkpoint_every_steps": 5}})
    env = {k: v for k, v in env_for_children().items() if k != "PYTHONPATH"}  # only the folder's own packages
    # the quick tour's commands as the README writes them, `make run` (the foreground daemon) in the form of
    # `python -m trainer` (the README: it is `ckpt-daemon train`) saving checkpoints for the others
    venv = {".venv/bin/ckpt-daemon": EXE, ".venv/bin/python": PY}
    tour = [shlex.split(line, comments=True)
            for line in doc_block("README.md", "ckpt-daemon list --verify").splitlines()]
    assert tour[0] == ["make", "run"] and len(tour) == 6, tour
    commands = [[PY, "-m", "trainer", "--config", "config.yaml", "--max-steps", "10"]]
    commands += [[venv.get(argv[0], argv[0]), *argv[1:]] for argv in tour[1:]]
    assert all(argv[0] in (PY, EXE) for argv in commands), commands
    for argv in commands:
        r = subprocess.run(argv, cwd=project, capture_output=True, text=True, timeout=300, env=env,
                           stdin=subprocess.DEVNULL)
        want = 5 if argv[1:] == ["status"] else 0  # 5: the daemon is not running
        assert r.returncode == want, (argv[1:], r.stdout[-2000:], r.stderr[-2000:])
    assert imported(project) == []
    assert list((project / "consolidated_models").iterdir())
