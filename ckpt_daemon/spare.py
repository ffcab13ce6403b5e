"""The warm spare trainer: a trainer process the daemon starts ahead of need, which imports torch and
the trainer's modules (seconds) and then waits; when the running trainer dies, the daemon hands the spare
this restart's environment (the resume point, the run token...) instead of starting a process from
scratch. Recovery then costs the load and the first step, not an interpreter start and `import torch`.

Protocol (no torch here: the daemon uses it too). The daemon starts the trainer's command with
$CKPT_DAEMON_SPARE_FD naming its end of a socket pair. The process, once its imports are done, calls
`wait_for_handover()`, which writes "ready\n" (the daemon hands a restart only to a spare that said
so) and blocks reading one JSON line:

    {"format": "ckpt-daemon/handover-1", "env": {NAME: VALUE, ...}}

and replaces its environment with `env` before training starts. End of file without a line (the daemon
dropped the spare, or died: its end closes with it) exits the process with EXIT_DROPPED (75). The
line is untrusted input all the same: it is bounded, and anything but the shape above ends the process
with a clear error, never a traceback.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Optional

ENV_FD = "CKPT_DAEMON_SPARE_FD"
FORMAT = "ckpt-daemon/handover-1"
MAX_MESSAGE = 1 << 20  # the environment is bounded by the config (256 KiB of training.env) plus the daemon's own
MAX_VARS = 4096
EXIT_DROPPED = 75  # EX_TEMPFAIL: a spare that was not needed
READY = b"ready\n"


def message(env: dict[str, str]) -> bytes:
    """The daemon's side: the handover line for `env`."""
    return (json.dumps({"format": FORMAT, "env": env}, separators=(",", ":")) + "\n").encode()


def parse(data: bytes) -> dict[str, str]:
    """The handover line's environment. Raises ValueError with the reason."""
    if len(data) > MAX_MESSAGE:
        raise ValueError(f"the handover is larger than {MAX_MESSAGE} bytes")
    try:
        msg = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"the handover is not JSON ({exc})") from None
    if not isinstance(msg, dict) or msg.get("format") != FORMAT:
        raise ValueError("the handover is not a ckpt-daemon handover")
    env = msg.get("env")
    if not isinstance(env, dict) or len(env) > MAX_VARS or not all(
            isinstance(k, str) and isinstance(v, str) and k and "=" not in k and "\0" not in k + v
            for k, v in env.items()):
        raise ValueError("the handover's environment is not a mapping of names to strings")
    return env


def _read_line(fd: int) -> bytes:
    buf = bytearray()
    while len(buf) <= MAX_MESSAGE:
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        buf += chunk
        if b"\n" in chunk:
            break
    return bytes(buf)


def wait_for_handover(fd_value: Optional[str] = None) -> bool:
    """Block until the daemon hands this spare a restart (True; os.environ is then the trainer's), or
    return False at once when this process is not a spare. Exits EXIT_DROPPED if the daemon drops it."""
    raw = fd_value if fd_value is not None else os.environ.pop(ENV_FD, None)
    if raw is None:
        return False
    if not raw.isdigit() or len(raw) > 9:
        sys.exit(f"ckpt-daemon: ${ENV_FD}={raw[:40]!r} is not a file descriptor; this variable is set by the "
                 "daemon for its warm spare trainer only. Unset it to run the trainer by hand.")
    fd = int(raw)
    try:
        os.write(fd, READY)
        data = _read_line(fd)
    except OSError as exc:
        sys.exit(f"ckpt-daemon: the warm spare cannot read its handover from descriptor {fd} ({exc}); "
                 "the daemon starts a trainer from scratch instead.")
    finally:
        try:
            os.close(fd)
        except OSError:
            pass
    if not data.strip():
        print("ckpt-daemon: this process waited as the daemon's warm spare trainer and was not needed; exiting",
              file=sys.stderr)
        sys.exit(EXIT_DROPPED)
    try:
        env = parse(data.strip())
    except ValueError as exc:
        sys.exit(f"ckpt-daemon: the warm spare got a malformed handover ({exc}); the daemon starts a trainer "
                 "from scratch instead.")
    os.environ.clear()
    os.environ.update(env)
    return True
