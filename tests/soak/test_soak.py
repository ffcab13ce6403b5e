"""The chaos soak, short form (run in CI). The long form: see tests/soak/README.md."""

from __future__ import annotations

import os

import pytest

from tests.soak.soak import Soak

SHORT_S = float(os.environ.get("CKPT_SOAK_SECONDS", "50"))


@pytest.mark.slow
@pytest.mark.soak
def test_short_soak_has_no_violations(tmp_path, tmpfs, capsys):
    disk = tmpfs("48m")
    seed = int(os.environ.get("CKPT_SOAK_SEED", "20261123"))  # reproducible; CKPT_SOAK_SEED=N tries another
    soak = Soak(tmp_path, disk, seed, SHORT_S)
    rc = soak.run()
    out = capsys.readouterr().out
    print(out)
    assert "violations: 0" in out, f"seed {seed}: {soak.violations}\n{out}"
    assert rc == 0
    # the soak really injected faults of the kinds it promises
    assert sum(soak.faults.values()) >= 10, soak.faults
    assert soak.faults["kill_trainer"] >= 3, soak.faults


@pytest.mark.slow
@pytest.mark.soak
def test_short_soak_with_memory_checkpoints_has_no_violations(tmp_path, tmpfs, capsys):
    """The same, with memory-first checkpoints: the trainer is also killed mid-copy into a memory slot, and
    the daemon while it persists one."""
    disk = tmpfs("48m")
    seed = int(os.environ.get("CKPT_SOAK_SEED", "20261124"))
    soak = Soak(tmp_path, disk, seed, float(os.environ.get("CKPT_SOAK_SECONDS", "40")), memory=True)
    rc = soak.run()
    out = capsys.readouterr().out
    print(out)
    assert "violations: 0" in out, f"seed {seed}: {soak.violations}\n{out}"
    assert rc == 0
    assert soak.faults["kill_trainer_mid_copy"] + soak.faults["kill_trainer"] >= 3, soak.faults
