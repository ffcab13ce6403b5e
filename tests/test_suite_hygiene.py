"""The suite itself runs anywhere: every process collects the same tests (xdist's workers must agree, on
2 cores or 16), a test run again with the same --basetemp passes again, and a test's state stays in its
own tmp folders."""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.helpers import PY, REPO, env_for_children, run_py


def _pytest_env(**extra: str) -> dict:
    # not this run's own: an inner pytest must not think it is an xdist worker or inside a test
    env = {k: v for k, v in env_for_children().items() if not k.startswith(("PYTEST_", "PYTHONHASHSEED"))}
    return {**env, **extra}


@pytest.mark.slow
def test_every_process_collects_the_same_tests_with_the_same_parameters(tmp_path):
    """Two processes with different hash seeds collect the suite: the same test ids, and the same values
    for every parameter (a value drawn at import, such as os.urandom, differs between xdist's workers; with
    pytest 8 it shows in the ids too and the run fails at collection)."""
    procs = []
    for seed in ("1", "2"):
        out = tmp_path / f"collected-{seed}.txt"
        procs.append((out, subprocess.Popen(
            [PY, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", f"--collection-digest={out}",
             "-o", "parametrize_long_str_id_strategy=legacy", str(REPO / "tests")],
            cwd=REPO, env=_pytest_env(PYTHONHASHSEED=seed), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                            text=True)))
    runs = []
    for out, p in procs:
        text = p.communicate(timeout=600)[0]
        assert p.returncode == 0, text[-3000:]
        runs.append(out.read_text().splitlines())
    first, second = runs
    assert len(first) > 500  # the whole suite, not an error
    differ = sorted(set(first) ^ set(second))
    shown = [line if len(line) < 300 else line[:200] + " ... " + line[-60:] for line in differ[:20]]
    assert not differ, "collected differently by two processes (id, then a digest of the parameters):\n" + "\n".join(shown)


@pytest.mark.slow
def test_a_real_daemon_test_run_twice_with_the_same_basetemp_passes_again(tmp_path):
    """The daemon keeps a copy of the config in force in $XDG_STATE_HOME, keyed on the config's path: with a
    shared HOME, the second run of a test with the same --basetemp found the first run's copy."""
    test = "tests/test_daemon.py::test_restart_with_a_broken_config_runs_on_the_last_good_one"
    for attempt in (1, 2):
        r = run_py(["-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider", f"--basetemp={tmp_path / 'base'}", test],
                   cwd=REPO, env=_pytest_env(), timeout=600)
        assert r.returncode == 0, f"run {attempt}:\n{r.stdout[-4000:]}\n{r.stderr[-2000:]}"


def test_a_tests_state_stays_in_its_own_tmp_folders(tmp_path_factory):
    """HOME, the XDG folders (the daemon's state home) and TMPDIR point into this run's tmp folders, in this
    process and in the processes a test starts."""
    base = tmp_path_factory.getbasetemp().resolve()
    for name in ("HOME", "XDG_STATE_HOME", "XDG_CONFIG_HOME", "XDG_CACHE_HOME", "TMPDIR"):
        assert Path(os.environ[name]).resolve().is_relative_to(base), name
    assert Path(tempfile.gettempdir()).resolve().is_relative_to(base)
    code = ("import os, tempfile; from ckpt_daemon.configfile import state_home; "
            "print(state_home()); print(os.path.expanduser('~')); print(tempfile.gettempdir())")
    for line in run_py(["-c", code], check=True).stdout.split():
        assert Path(line).resolve().is_relative_to(base), line
