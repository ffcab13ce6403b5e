"""The suite's fixtures. Shared helpers (configs, child processes, the real daemon, checkpoints) are in
tests/helpers.py."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.helpers import Daemon


def pytest_addoption(parser):
    parser.addoption("--collection-digest", metavar="PATH",
                     help="write each collected test's id and a digest of its parameters' values to PATH "
                          "(tests/test_suite_hygiene.py compares two processes': xdist's workers must agree)")


def _stable_repr(value) -> str:
    """A parameter's value as text; a function by where it is defined (its repr holds its address, which
    differs between processes although it is the same function)."""
    code = getattr(value, "__code__", None)
    if code is not None:
        return f"<function {value.__module__}.{value.__qualname__} line {code.co_firstlineno}>"
    return repr(value)


def pytest_collection_finish(session):
    path = session.config.getoption("--collection-digest")
    if path:
        lines = []
        for item in session.items:
            params = getattr(getattr(item, "callspec", None), "params", {})
            digest = hashlib.sha256(repr(sorted((k, _stable_repr(v)) for k, v in params.items())).encode()).hexdigest()[:16]
            lines.append(f"{item.nodeid} {digest}\n")
        Path(path).write_text("".join(lines))


@pytest.fixture(autouse=True)
def own_home(tmp_path_factory, monkeypatch):
    """Every test, and every process it starts, keeps its state in its own folders: the daemon's stable
    config copy ($XDG_STATE_HOME/ckpt-daemon, keyed on the config's path: two runs with the same
    --basetemp would otherwise find the previous run's), HOME-derived caches and settings (chromium,
    fish, dconf), and temporary files (torchrun's torchelastic_* folders). Nothing is left outside the
    test's tmp folders. TMPDIR is a short path of its own: Unix sockets made under it must stay within
    108 bytes."""
    home = tmp_path_factory.mktemp("home")
    tmp = tmp_path_factory.mktemp("tmp")
    for name, sub in (("XDG_STATE_HOME", ".local/state"), ("XDG_CONFIG_HOME", ".config"), ("XDG_CACHE_HOME", ".cache"),
                      ("XDG_DATA_HOME", ".local/share")):
        (home / sub).mkdir(parents=True)
        monkeypatch.setenv(name, str(home / sub))
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))  # this process's tempfile has already read TMPDIR
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)  # systemd's: would win over XDG_STATE_HOME
    monkeypatch.delenv("CKPT_DAEMON_CONFIG", raising=False)
    return home


@pytest.fixture
def daemons():
    """Real daemons (tests.helpers.Daemon) a test started: killed at the end, with their trainers."""
    made: list[Daemon] = []
    yield made
    from ckpt_daemon.runtime import kill_tree, read_heartbeat

    for d in made:
        if d.proc and d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait()
        hb = read_heartbeat(d.folder / "checkpoints") or {}
        if hb.get("pid"):
            kill_tree(hb["pid"], signal.SIGKILL)


@pytest.fixture
def tmpfs(tmp_path):
    """A real small filesystem, to get a real ENOSPC. Needs root (CI and developers run as root here)."""
    mounted = []

    def make(size: str = "16m", options: str = "") -> Path:
        if os.geteuid() != 0 or shutil.which("mount") is None:
            pytest.skip("mounting a tmpfs needs root and mount(8); this machine lacks them")
        d = tmp_path / f"tmpfs{len(mounted)}"
        d.mkdir()
        opts = f"size={size}" + (f",{options}" if options else "")
        subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(d)], check=True)
        mounted.append(d)
        return d

    yield make
    for d in mounted:
        subprocess.run(["umount", "-l", str(d)], check=False)


@pytest.fixture
def btrfs(tmp_path):
    """A real loop-mounted btrfs (a filesystem with reflinks). Needs root, mkfs.btrfs and loop devices."""
    mounted = []

    def make(size: str = "256M") -> Path:
        if os.geteuid() != 0 or shutil.which("mkfs.btrfs") is None:
            pytest.skip("a btrfs loop mount needs root and mkfs.btrfs (btrfs-progs); this machine lacks them")
        img, d = tmp_path / "btrfs.img", tmp_path / "btrfs"
        d.mkdir()
        subprocess.run(["truncate", "-s", size, str(img)], check=True)
        subprocess.run(["mkfs.btrfs", "-q", str(img)], check=True, capture_output=True)
        r = subprocess.run(["mount", "-o", "loop", str(img), str(d)], capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"this machine cannot loop-mount btrfs: {r.stderr.strip()}")
        mounted.append(d)
        return d

    yield make
    for d in mounted:
        subprocess.run(["umount", str(d)], check=False)
