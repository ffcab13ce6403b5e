"""Readers that go away never stop the daemon: HTTP clients that close (or reset) before reading the
answer, a console pipe nobody reads any more (journald restarting, `ckpt-daemon run | tee` killed), the
systemd notify socket gone, and the daemon itself gone while its trainer still prints its final save.
A write to a closed pipe or socket is an error the daemon handles, never a SIGPIPE that kills it (and,
through the parent-death signal, its trainer)."""

from __future__ import annotations

import json
import os
import select
import socket
import struct
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from tests.helpers import PY, Daemon

SLEEPER = [PY, "-c", "import time; time.sleep(3600)"]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_listening(port: int, d: Daemon, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            assert time.monotonic() < deadline and d.proc.poll() is None, d.output()[-3000:]
            time.sleep(0.1)


def get(url: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=20) as r:
        return r.status, r.read()


def errors_in(log: str) -> list[dict]:
    out = []
    for line in log.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("level") in ("error", "critical"):
            out.append(rec)
    return out


@pytest.mark.slow
def test_clients_that_close_before_reading_never_stop_the_daemon(tmp_path, daemons):  # noqa: F811
    port = free_port()
    d = Daemon(tmp_path, {"training": {"command": SLEEPER}, "http": {"enabled": True, "port": port}}).start()
    daemons.append(d)
    s = d.wait(lambda s: s if s["training"]["state"] == "running" else None, what="the trainer running")
    trainer = s["training"]["pid"]
    wait_listening(port, d)
    paths = ["/", "/metrics", "/api/status", "/api/dashboard", "/static/app.js"]
    for i in range(300):
        try:
            c = socket.create_connection(("127.0.0.1", port), timeout=5)
        except OSError:
            d.proc.wait(timeout=10)
            raise AssertionError(f"the daemon died after {i} clients (exit {d.proc.returncode}):\n{d.output()[-3000:]}") from None
        if i % 3 == 0:  # a reset (SO_LINGER 0: close sends RST), as a killed scraper or a crashed browser
            c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        c.sendall(f"GET {paths[i % len(paths)]} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
        if i % 3 == 1:
            c.shutdown(socket.SHUT_WR)
        c.close()  # before reading a byte of the answer
        assert d.proc.poll() is None, f"the daemon died after {i + 1} clients (exit {d.proc.returncode}):\n{d.output()[-3000:]}"
    # still serving, and the trainer is the same process, never restarted
    status, body = get(f"http://127.0.0.1:{port}/api/status")
    doc = json.loads(body)
    assert status == 200 and doc["training"]["pid"] == trainer and doc["training"]["restarts"] == 0
    os.kill(trainer, 0)
    assert get(f"http://127.0.0.1:{port}/metrics")[0] == 200
    assert d.proc.poll() is None
    assert errors_in(d.log()) == []  # a client that went away is nobody's problem to act on
    assert d.stop() == 0


TRAINER = """
import os, signal, sys, time
def final_save(*_):
    for i in range(3000):
        print("final save line", i, flush=True)
    print("final save done", flush=True)
    sys.exit(143)
signal.signal(signal.SIGTERM, final_save)
if not os.path.exists("printed"):
    while not os.path.exists("go"):
        time.sleep(0.02)
    for i in range(500):
        print("line", i, flush=True)
    open("printed", "w").close()
    sys.exit(3)  # a crash: the daemon must be alive to restart it
while True:
    time.sleep(1)
"""


@pytest.mark.slow
def test_a_closed_console_and_a_gone_notify_socket_never_stop_the_daemon(tmp_path, daemons):  # noqa: F811
    script = tmp_path / "printing_job.py"  # not trainer.py: `python -m daemon` in this folder would import it
    script.write_text(TRAINER)
    sock_path = str(tmp_path / "notify.sock")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(sock_path)
    notify.settimeout(30)
    d = Daemon(tmp_path, {"training": {"command": [PY, str(script)]}},
               env={"NOTIFY_SOCKET": sock_path, "WATCHDOG_USEC": "200000"})
    r, w = os.pipe()
    # as systemd runs it: stdout and stderr a stream nobody may read tomorrow; the trainer's output echoed
    d.proc = subprocess.Popen([PY, "-m", "daemon", "run", "--config", str(d.cfg)], stdout=w, stderr=w, env=d.env,
                              cwd=tmp_path, stdin=subprocess.DEVNULL)
    os.close(w)
    daemons.append(d)
    console: list[bytes] = []
    stop_reading = threading.Event()

    def read_console() -> None:
        while not stop_reading.is_set():
            if select.select([r], [], [], 0.1)[0]:
                data = os.read(r, 65536)
                if not data:
                    break
                console.append(data)
        os.close(r)  # nobody reads the console any more: the daemon's next write to it fails with EPIPE

    reader = threading.Thread(target=read_console, daemon=True)
    reader.start()
    try:
        msgs: list[str] = []
        while not any(m.startswith("READY=1") for m in msgs):
            msgs.append(notify.recv(4096).decode())
        d.wait(lambda s: s["training"]["state"] == "running", what="the trainer running")
    finally:
        stop_reading.set()
        reader.join(timeout=10)
        notify.close()
        os.unlink(sock_path)  # and systemd's notify socket is gone
    assert not reader.is_alive()
    (tmp_path / "daemon.out").write_bytes(b"".join(console))  # what Daemon.output() shows if something fails
    (tmp_path / "go").touch()  # the trainer prints 500 lines (each echoed to the closed console), then crashes
    d.wait(lambda s: s["training"]["restarts"] == 1 and s["training"]["state"] == "running", timeout=60,
           what="the crash noticed and the trainer restarted")
    trainer_log = tmp_path / "logs" / "trainer.log"
    assert "line 499" in trainer_log.read_text()
    assert d.proc.poll() is None
    # the daemon gone (SIGKILL): its trainer gets SIGTERM and prints through its final save into the relay,
    # which outlives the daemon and never dies of the pipe to it being closed
    pid = d.status()["training"]["pid"]
    d.proc.kill()
    d.proc.wait(timeout=30)
    deadline = time.monotonic() + 60
    while "final save done" not in trainer_log.read_text(errors="replace"):
        assert time.monotonic() < deadline, trainer_log.read_text()[-2000:]
        time.sleep(0.1)
    text = trainer_log.read_text()
    assert all(f"final save line {i}\n" in text for i in (0, 1500, 2999))
    deadline = time.monotonic() + 30
    while Path(f"/proc/{pid}").exists() and Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z":
        assert time.monotonic() < deadline
        time.sleep(0.1)
