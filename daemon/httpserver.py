"""The socket side of the daemon's HTTP server: one thread owns every connection, with a deadline on each.

A thread per connection lets any client hold a thread for as long as it likes: one that sends a header
line every few seconds (slow loris), or one that stops reading its answer. Here one thread (the one that
runs `serve_forever`) accepts, reads every request head and writes every answer without blocking, and a
connection is cut off when its deadline passes:

- the head (request line and headers) must have arrived whole HEAD_DEADLINE_S after the connection was
  accepted; a GET has no body, and a request that announces one is answered 413 without reading it;
- the answer must have been taken by the client ANSWER_DEADLINE_S after it was ready.

Only a complete head takes one of `max_answering` threads, and only to compute its answer (the
`respond` callable: bytes in, bytes out), never to wait on the network; past that many at once, a
request is answered 503 at once. At most `max_open` connections are held (reading or writing); a new one
past that closes the oldest, which is the one nearest its deadline. So however many slow clients wait,
a client that sends its request and reads its answer (a Prometheus scrape, a browser) is answered at
once, and nothing a client does can pile up threads, memory or descriptors.

Writes use MSG_NOSIGNAL: a client that closed or reset its connection is an error here, never a SIGPIPE.
"""

from __future__ import annotations

import collections
import selectors
import socket
import threading
import time
from typing import Callable, Optional

from ckpt_daemon.logs import get_logger

log = get_logger("daemon.http")

# Real clients (Prometheus, browsers, curl) send a whole request in one packet right after connecting
# and read the answer as it comes: seconds are plenty, and a hostile client is gone within them.
HEAD_DEADLINE_S = 5.0
ANSWER_DEADLINE_S = 10.0
MAX_ANSWERING = 16  # threads computing answers at once (an answer may wait up to 10 s for the inventory)
MAX_OPEN = 64  # connections held while their head arrives or their answer is taken
MAX_HEAD = 16 * 1024  # request line and headers: a URL of 2 KiB, cookies, a token
LISTEN_BACKLOG = 64
# Connections accepted per turn of the loop: a flood of new connections cannot keep the loop from
# reading the heads of those it has (a scrape accepted in one turn is read in the next).
ACCEPT_BATCH = 16
_NOSIGNAL = getattr(socket, "MSG_NOSIGNAL", 0)
_BUSY = b"HTTP/1.0 503 Service Unavailable\r\nContent-Length: 0\r\nRetry-After: 1\r\nConnection: close\r\n\r\n"
_TOO_BIG = b"HTTP/1.0 431 Request Header Fields Too Large\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
_TOO_SLOW = b"HTTP/1.0 408 Request Timeout\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


class _Conn:
    __slots__ = ("sock", "client", "deadline", "buf", "out", "writing")

    def __init__(self, sock: socket.socket, client: tuple, deadline: float):
        self.sock, self.client, self.deadline = sock, client, deadline
        self.buf = bytearray()  # the head, as it arrives
        self.out: Optional[memoryview] = None  # the answer still to send
        self.writing = False


class Server:
    """Listens on `addr`; `respond(head, client) -> answer bytes` runs on a bounded set of threads."""

    def __init__(self, addr: tuple, family: int, respond: Callable[[bytes, tuple], bytes], *,
                 head_deadline_s: float = HEAD_DEADLINE_S, answer_deadline_s: float = ANSWER_DEADLINE_S,
                 max_answering: int = MAX_ANSWERING, max_open: int = MAX_OPEN):
        self.respond = respond
        self.head_deadline_s, self.answer_deadline_s = head_deadline_s, answer_deadline_s
        self.max_open = max_open
        self.slots = threading.BoundedSemaphore(max_answering)
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(addr)
            sock.listen(LISTEN_BACKLOG)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self.socket = sock
        self.server_address = sock.getsockname()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._ready: collections.deque[tuple[_Conn, bytes]] = collections.deque()  # answers from the threads
        self._open: dict[socket.socket, _Conn] = {}  # in the order they were opened (or their answer came)
        self._stopping = threading.Event()
        self._stopped = threading.Event()
        self._stopped.set()  # not serving yet: shutdown() has nothing to wait for
        self._sel: Optional[selectors.BaseSelector] = None
        self._cut = collections.Counter()
        self._cut_logged = 0.0

    # ------------------------------------------------------------------------------------ life cycle
    def serve_forever(self, poll_interval: float = 0.5) -> None:
        if self._stopping.is_set():
            return
        self._stopped.clear()
        sel = self._sel = selectors.DefaultSelector()
        try:
            sel.register(self.socket, selectors.EVENT_READ)
            sel.register(self._wake_r, selectors.EVENT_READ)
            while not self._stopping.is_set():
                now = time.monotonic()
                timeout = min([poll_interval] + [max(0.0, c.deadline - now) for c in self._open.values()])
                for key, _events in sel.select(timeout):
                    if key.fileobj is self.socket:
                        self._accept()
                    elif key.fileobj is self._wake_r:
                        self._drain_wake()
                    else:
                        conn = self._open.get(key.fileobj)  # type: ignore[call-overload]
                        if conn is not None:
                            self._write(conn) if conn.writing else self._read(conn)
                self._take_answers()
                self._expire(time.monotonic())
        finally:
            for conn in list(self._open.values()):
                self._close(conn)
            sel.close()
            self._sel = None
            self._stopped.set()
            self._drop_answers()

    def shutdown(self) -> None:
        """Stop serve_forever (from another thread) and wait until it has ended."""
        self._stopping.set()
        self._wake()
        self._stopped.wait(timeout=10)

    def server_close(self) -> None:
        self._stopping.set()
        for s in (self.socket, self._wake_r, self._wake_w):
            try:
                s.close()
            except OSError:
                pass

    # ------------------------------------------------------------------------------------ the loop's steps
    def _accept(self) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                sock, client = self.socket.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # out of descriptors, a connection reset while queued
                log.debug("accept failed", error=str(exc))
                return
            sock.setblocking(False)
            while len(self._open) >= self.max_open:
                self._cut_off(next(iter(self._open.values())), "too many open connections: the oldest is closed")
            conn = _Conn(sock, client, time.monotonic() + self.head_deadline_s)
            self._open[sock] = conn
            self._sel.register(sock, selectors.EVENT_READ)

    def _read(self, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:  # reset by the client
            self._close(conn)
            return
        if not data:  # closed by the client before its request was whole
            self._close(conn)
            return
        start = max(0, len(conn.buf) - 3)
        conn.buf += data
        end = self._head_end(conn.buf, start)
        if end is None:
            if len(conn.buf) > MAX_HEAD:
                self._send_and_close(conn, _TOO_BIG)
            return
        self._forget(conn)
        head = bytes(conn.buf[:end])
        if not self.slots.acquire(blocking=False):
            self._send_and_close(conn, _BUSY)
            return
        try:
            threading.Thread(target=self._answer, args=(conn, head), name="http-answer", daemon=True).start()
        except RuntimeError:  # no thread to be had
            self.slots.release()
            self._send_and_close(conn, _BUSY)

    @staticmethod
    def _head_end(buf: bytearray, start: int) -> Optional[int]:
        for sep in (b"\r\n\r\n", b"\n\n"):
            i = buf.find(sep, start)
            if i >= 0:
                return i + len(sep)
        return None

    def _answer(self, conn: _Conn, head: bytes) -> None:
        """On an answer thread: compute the answer, hand it back to the loop to send."""
        try:
            try:
                out = self.respond(head, conn.client)
            except Exception as exc:  # respond answers its own errors; this is a bug, not the client's doing
                log.exception("dashboard request failed", error=str(exc))
                out = b""
            self._ready.append((conn, out))
            self._wake()
            if self._stopped.is_set():  # the loop has ended (or never ran): nobody will send it
                self._drop_answers()
        finally:
            self.slots.release()

    def _drop_answers(self) -> None:
        while True:
            try:
                conn, _ = self._ready.popleft()
            except IndexError:
                return
            try:
                conn.sock.close()
            except OSError:
                pass

    def _take_answers(self) -> None:
        while self._ready:
            conn, out = self._ready.popleft()
            if self._stopping.is_set() or not out:
                self._close(conn)
                continue
            while len(self._open) >= self.max_open:
                self._cut_off(next(iter(self._open.values())), "too many open connections: the oldest is closed")
            conn.out, conn.writing = memoryview(out), True
            conn.deadline = time.monotonic() + self.answer_deadline_s
            self._open[conn.sock] = conn
            try:
                self._sel.register(conn.sock, selectors.EVENT_WRITE)
            except (ValueError, OSError):  # closed meanwhile
                self._close(conn)
                continue
            self._write(conn)

    def _write(self, conn: _Conn) -> None:
        try:
            while conn.out:
                conn.out = conn.out[conn.sock.send(conn.out, _NOSIGNAL):]
        except (BlockingIOError, InterruptedError):
            return  # the client reads slowly: the loop comes back when it can take more
        except OSError:  # closed or reset by the client before it had the whole answer
            self._close(conn)
            return
        self._close(conn, graceful=True)

    def _expire(self, now: float) -> None:
        for conn in [c for c in self._open.values() if c.deadline <= now]:
            if conn.writing:
                self._cut_off(conn, f"an answer not taken within {self.answer_deadline_s:g} s")
            elif conn.buf:
                self._cut_off(conn, f"a request not whole within {self.head_deadline_s:g} s", _TOO_SLOW)
            else:  # connected and silent: a browser's preconnect, a port scan; nothing to tell anyone
                self._close(conn)

    # ------------------------------------------------------------------------------------ helpers
    def _cut_off(self, conn: _Conn, why: str, reply: bytes = b"") -> None:
        self._cut[why] += 1
        now = time.monotonic()
        if now - self._cut_logged >= 60:  # at most once a minute, with counts: a flood is one line
            log.warning("dashboard connections cut off", counts=dict(self._cut), last_client=str(conn.client[0]))
            self._cut_logged = now
            self._cut.clear()
        self._send_and_close(conn, reply) if reply else self._close(conn)

    def _send_and_close(self, conn: _Conn, data: bytes) -> None:
        try:
            conn.sock.send(data, _NOSIGNAL)  # best effort, never waits
        except OSError:
            pass
        self._close(conn, graceful=True)

    def _forget(self, conn: _Conn) -> None:
        if self._open.pop(conn.sock, None) is not None and self._sel is not None:
            try:
                self._sel.unregister(conn.sock)
            except (KeyError, ValueError):
                pass

    def _close(self, conn: _Conn, graceful: bool = False) -> None:
        self._forget(conn)
        if graceful:
            try:
                conn.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        try:
            conn.sock.close()
        except OSError:
            pass

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except OSError:  # full (the loop is already due to wake) or closed (stopping)
            pass

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except OSError:
            pass
