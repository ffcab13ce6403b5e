"""Slow and hostile HTTP clients: a request head that dribbles in (slow loris) is cut off at the head
deadline, an answer nobody takes at the answer deadline, and however many of them wait, a Prometheus
scrape is answered at once; past the cap of answers being computed, a request gets 503 at once."""

from __future__ import annotations

import select
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from daemon import httpserver
from daemon.httpserver import Server
from tests.helpers import PY, Daemon

SLEEPER = [PY, "-c", "import time; time.sleep(3600)"]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class SlowLoris:
    """`n` connections that each send a request line, then one header line a second, never the blank
    line that ends the head. Records when the server cut each one off, and what it said."""

    def __init__(self, port: int, n: int, every_s: float = 1.0):
        self.port, self.every_s = port, every_s
        self.socks = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(n)]
        self.opened = time.monotonic()
        self.cut: dict[int, tuple[float, bytes]] = {}
        for s in self.socks:
            s.sendall(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._drive, daemon=True)
        self.thread.start()

    def _drive(self) -> None:
        line = 0
        next_line = time.monotonic() + self.every_s
        while not self._stop.is_set() and len(self.cut) < len(self.socks):
            live = [s for i, s in enumerate(self.socks) if i not in self.cut]
            ready, _, _ = select.select(live, [], [], max(0.0, next_line - time.monotonic()))
            for s in ready:  # the server answered (408) and closed, or reset
                i = self.socks.index(s)
                try:
                    said = s.recv(4096)
                except OSError:
                    said = b""
                self.cut[i] = (time.monotonic() - self.opened, said)
            if time.monotonic() >= next_line:  # one more header line from each one still connected
                line += 1
                for i, s in enumerate(self.socks):
                    if i not in self.cut:
                        try:
                            s.sendall(f"X-Slow-{line}: {line}\r\n".encode())
                        except OSError:
                            pass  # cut: the next select sees it
                next_line += self.every_s

    def wait_all_cut(self, timeout: float) -> None:
        self.thread.join(timeout)
        self._stop.set()

    def close(self) -> None:
        self._stop.set()
        self.thread.join(5)
        for s in self.socks:
            s.close()


def threads_of(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/task").iterdir()))


@pytest.mark.slow
def test_slow_loris_clients_are_cut_off_and_never_keep_a_scrape_from_being_answered(tmp_path, daemons):  # noqa: F811
    port = free_port()
    d = Daemon(tmp_path, {"training": {"command": SLEEPER}, "http": {"enabled": True, "port": port}}).start()
    daemons.append(d)
    d.wait(lambda s: s["training"]["state"] == "running", what="the trainer running")
    url = f"http://127.0.0.1:{port}/metrics"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(url, timeout=10).close()
            break
        except (OSError, urllib.error.URLError):
            assert time.monotonic() < deadline and d.proc.poll() is None, d.output()[-3000:]
            time.sleep(0.1)
    threads_before = threads_of(d.proc.pid)
    # the cap's number of slow clients, and silent connections on top, up to nearly all the server holds
    # (past that it closes the oldest: tests/test_metrics.py)
    loris = SlowLoris(port, httpserver.MAX_ANSWERING)
    silent = [socket.create_connection(("127.0.0.1", port), timeout=5)
              for _ in range(httpserver.MAX_OPEN - httpserver.MAX_ANSWERING - 4)]
    try:
        for _ in range(5):  # a scrape is answered, and at once, while they all wait
            t0 = time.monotonic()
            with urllib.request.urlopen(url, timeout=10) as r:
                assert r.status == 200 and b"ckpt_daemon_training_up 1" in r.read()
            assert time.monotonic() - t0 < 3.0, "a scrape waited for the slow clients"
        assert not loris.cut, "the slow clients were cut off before their deadline"
        # they hold no threads: a thread serves a request only once it has arrived whole
        assert threads_of(d.proc.pid) <= threads_before + 2
        loris.wait_all_cut(timeout=httpserver.HEAD_DEADLINE_S + 15)
        assert len(loris.cut) == httpserver.MAX_ANSWERING, f"{len(loris.cut)} of {httpserver.MAX_ANSWERING} cut off"
        for after, said in loris.cut.values():
            assert httpserver.HEAD_DEADLINE_S - 0.5 <= after <= httpserver.HEAD_DEADLINE_S + 5, after
            assert said.startswith(b"HTTP/1.0 408 ") or said == b"", said
        assert any(said.startswith(b"HTTP/1.0 408 ") for _, said in loris.cut.values())
    finally:
        loris.close()
        for s in silent:
            s.close()
    with urllib.request.urlopen(url, timeout=10) as r:
        assert r.status == 200
    log = d.log()
    assert "dashboard connections cut off" in log and '"level": "error"' not in log
    assert d.proc.poll() is None and d.stop() == 0


# ------------------------------------------------------------------------------ the server alone
def serve(respond, **limits) -> tuple[Server, int]:
    srv = Server(("127.0.0.1", 0), socket.AF_INET, respond, **limits)
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()
    return srv, srv.server_address[1]


def answer(body: bytes) -> bytes:
    return b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body


def read_all(s: socket.socket) -> bytes:
    out = bytearray()
    try:
        while chunk := s.recv(1 << 16):
            out += chunk
    except ConnectionResetError:
        pass
    return bytes(out)


def test_an_answer_not_taken_in_time_is_cut_off_and_a_reader_gets_all_of_it():
    big = answer(b"m" * (16 << 20))  # more than any socket buffer holds
    srv, port = serve(lambda head, client: big, answer_deadline_s=1.0)
    try:
        stalled = socket.socket()
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stalled.connect(("127.0.0.1", port))
        stalled.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        reader = socket.create_connection(("127.0.0.1", port), timeout=30)
        reader.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        assert read_all(reader) == big  # a client that reads gets the whole answer
        # the stalled client reads nothing for twice the deadline (this sleep is the slow client itself)
        time.sleep(2.0)
        stalled.settimeout(30)
        got = read_all(stalled)
        assert 0 < len(got) < len(big), "the answer was not cut off at its deadline"
    finally:
        srv.shutdown()
        srv.server_close()


def test_past_the_cap_of_answers_at_once_a_request_gets_503_at_once():
    release = threading.Event()
    entered = threading.Semaphore(0)

    def respond(head, client):
        entered.release()
        release.wait(30)
        return answer(b"ok")

    srv, port = serve(respond, max_answering=4)
    held = []
    try:
        for _ in range(4):
            c = socket.create_connection(("127.0.0.1", port), timeout=10)
            c.sendall(b"GET / HTTP/1.0\r\n\r\n")
            held.append(c)
            assert entered.acquire(timeout=10)
        extra = socket.create_connection(("127.0.0.1", port), timeout=10)
        extra.sendall(b"GET / HTTP/1.0\r\n\r\n")
        assert read_all(extra).startswith(b"HTTP/1.0 503 ")
        release.set()
        for c in held:
            assert read_all(c).endswith(b"\r\n\r\nok")
        extra = socket.create_connection(("127.0.0.1", port), timeout=10)
        extra.sendall(b"GET / HTTP/1.0\r\n\r\n")
        assert read_all(extra).endswith(b"ok")  # the slots came back
    finally:
        release.set()
        srv.shutdown()
        srv.server_close()
