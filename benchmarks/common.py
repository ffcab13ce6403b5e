"""What every benchmark section shares: the disk baseline (dd conv=fsync) and a cold page cache."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path


def drop_caches() -> bool:
    """Empty the page cache (root only), so that a load reads the disk. False where it cannot."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def dd_write(path: Path, nbytes: int) -> float:
    """Seconds `dd conv=fsync` takes to write `nbytes` (16 MiB blocks, scaled to the exact size)."""
    count = max(1, nbytes // (16 << 20))
    t0 = time.perf_counter()
    subprocess.run(["dd", "if=/dev/zero", f"of={path}", "bs=16M", f"count={count}", "conv=fsync"], check=True,
                   capture_output=True)
    t = time.perf_counter() - t0
    path.unlink()
    return t * nbytes / (count * (16 << 20))
