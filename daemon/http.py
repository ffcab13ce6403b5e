"""The daemon's read-only HTTP side: the dashboard page, its JSON, and Prometheus metrics; plus the
textfile for node_exporter and the disk history the page draws.

    /                  the dashboard (daemon/web/index.html)
    /static/app.js     its script, /static/app.css its style
    /api/status        the status dict (what `ckpt-daemon status --json` reads), with `now` and the verdict
    /api/dashboard     everything the page draws (daemon/dashboard.py)
    /metrics           Prometheus text exposition (daemon/metrics.py)

Rules:
- Read-only: only GET; any other method gets 405. Nothing served can change or delete anything.
- Loopback by default. With `http.token` set, every request needs it: `?token=...` once (the page then
  keeps an HttpOnly cookie derived from the token), or `Authorization: Bearer ...`; compared in
  constant time. A host that is not loopback requires a token (config validation). Without a token,
  requests must name a loopback Host (defeats DNS rebinding from a web page).
- Bounded (daemon/httpserver.py): a URL of at most 2 KiB, no request body; the request must arrive
  whole within 5 s and the answer be taken within 10 s, else the connection is cut off; at most 16
  answers computed at once (more get 503) and 64 connections held, so no client, slow or hostile, can
  pile up threads or keep a Prometheus scrape from being answered.
- Never in the daemon's way: one thread owns every socket, answers are computed on daemon threads; a request
  reads only what the main loop and the observer thread already computed; every exception is logged and
  answered with 500.

`Observer` is the one thread behind it all (started by daemon/core.py): it (re)starts the server when
the http section changes (hot reload), rebuilds the inventory at most every 30 s while anything reads
it, writes the textfile every `http.textfile_interval_s`, and samples the disk.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import math
import socket
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any, Callable, Optional

from ckpt_daemon.config import Config, is_loopback_host
from ckpt_daemon.fsutil import disk_usage
from ckpt_daemon.logs import get_logger
from daemon import dashboard as dash
from daemon import metrics as prom
from daemon.httpserver import Server
from daemon.statusdoc import Status

log = get_logger("daemon.http")

WEB_DIR = Path(__file__).resolve().parent / "web"
STATIC = {"app.js": "text/javascript; charset=utf-8", "app.css": "text/css; charset=utf-8"}
COOKIE = "ckpt_daemon_session"
MAX_URL = 2048
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
COMMON_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}


@dataclass
class Response:
    status: int
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: dict[str, str] = field(default_factory=dict)


def _text(status: int, message: str, **headers: str) -> Response:
    return Response(status, (message.rstrip("\n") + "\n").encode(), headers=dict(headers))


def _json(obj: Any) -> Response:
    return Response(200, json.dumps(obj, default=str, allow_nan=False, separators=(",", ":")).encode(),
                    "application/json; charset=utf-8")


def _finite(obj: Any) -> Any:
    """JSON has no NaN or Infinity: a metric that diverged is shown as null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def session_value(token: str) -> str:
    """The cookie the page keeps: derived from the token, so the cookie never holds the token itself and
    changing the token logs every browser out."""
    return hmac.new(token.encode(), b"ckpt-daemon dashboard session v1", hashlib.sha256).hexdigest()


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode("utf-8", "surrogateescape"), b.encode("utf-8", "surrogateescape"))


def _host_name(host_header: str) -> str:
    h = host_header.strip().lower()
    if h.startswith("["):
        return h[1:h.find("]")] if "]" in h else h
    return h.rsplit(":", 1)[0] if h.count(":") == 1 else h


class App:
    """Routing, authentication and the answers; knows nothing of sockets (tested without them)."""

    def __init__(self, observer: "Observer"):
        self.obs = observer
        self._refused_logged = 0.0
        self._refused = 0

    def _note_refusal(self, client: str) -> None:
        """Requests without a valid token: logged at most once a minute, with a count (never the token)."""
        self._refused += 1
        now = time.monotonic()
        if now - self._refused_logged >= 60:
            log.warning("dashboard requests refused: no valid token", refused=self._refused, last_client=client)
            self._refused_logged, self._refused = now, 0

    def handle(self, method: str, target: str, headers: Any, client: str = "") -> Response:
        cfg = self.obs.get_cfg().http
        if len(target) > MAX_URL:
            return _text(414, "The URL is too long.")
        if method != "GET":
            return _text(405, "This server is read-only: only GET is allowed.", Allow="GET")
        if (headers.get("Content-Length") or "0").strip() not in ("", "0") or headers.get("Transfer-Encoding"):
            return _text(413, "A GET request carries no body.")
        try:
            url = urllib.parse.urlsplit(target)
            query = urllib.parse.parse_qs(url.query, max_num_fields=8)
        except ValueError:
            return _text(400, "The URL cannot be read (or has more than 8 query fields).")
        path = url.path
        token = cfg.token.get_secret_value() if cfg.token is not None else None
        set_cookie = None
        if token is None:
            host = headers.get("Host")
            if host and is_loopback_host(cfg.host) and _host_name(host) not in self._loopback_names(cfg.host):
                return _text(403, "This dashboard answers only to a loopback host name (localhost, 127.0.0.1, ::1). "
                                  "To reach it from elsewhere, set http.token and http.host.")
        else:
            ok, via_query = self._authorized(token, headers, query)
            if not ok:
                self._note_refusal(client)
                return _text(401, "A token is needed: open the page once as /?token=TOKEN (it then keeps a cookie), "
                                  "or send the header 'Authorization: Bearer TOKEN'. The token is http.token in "
                                  "config.yaml.", **{"WWW-Authenticate": 'Bearer realm="ckpt-daemon"'})
            if via_query:
                set_cookie = (f"{COOKIE}={session_value(token)}; Path=/; HttpOnly; SameSite=Strict; "
                              f"Max-Age={30 * 86400}")
                if path == "/":  # take the token out of the address bar and the history
                    rest = {k: v for k, v in query.items() if k != "token"}
                    loc = "/" + (("?" + urllib.parse.urlencode(rest, doseq=True)) if rest else "")
                    return Response(303, b"", headers={"Location": loc, "Set-Cookie": set_cookie})
        resp = self._route(path, cfg)
        if set_cookie:
            resp.headers["Set-Cookie"] = set_cookie
        return resp

    @staticmethod
    def _loopback_names(host: str) -> set[str]:
        return {"localhost", "127.0.0.1", "::1", host.lower()}

    @staticmethod
    def _authorized(token: str, headers: Any, query: dict) -> tuple[bool, bool]:
        auth = headers.get("Authorization") or ""
        if auth[:7].lower() == "bearer " and _same(auth[7:].strip(), token):
            return True, False
        cookie = headers.get("Cookie") or ""
        for part in cookie.split(";")[:32]:
            name, _, value = part.strip().partition("=")
            if name == COOKIE and _same(value, session_value(token)):
                return True, False
        given = query.get("token") or []
        if len(given) == 1 and _same(given[0], token):
            return True, True
        return False, False

    def _route(self, path: str, cfg) -> Response:
        if path == "/metrics":
            if not cfg.metrics:
                return _text(404, "Metrics are off (http.metrics: false).")
            return Response(200, self.obs.metrics_text(), prom.CONTENT_TYPE)
        if not cfg.dashboard:
            return _text(404,
                         "The dashboard is off (http.dashboard: false)." + (" Metrics: /metrics" if cfg.metrics else ""))
        if path in ("/", "/index.html"):
            return self._file("index.html", "text/html; charset=utf-8", csp=True)
        if path.startswith("/static/") and path[len("/static/"):] in STATIC:
            name = path[len("/static/"):]
            return self._file(name, STATIC[name])
        if path == "/api/status":
            now = time.time()
            from daemon.statusview import verdict

            s = self.obs.status()
            level, line = verdict(s, True, now)
            return _json(_finite({**s.to_json(), "now": now, "verdict": {"level": level, "line": line}}))
        if path == "/api/dashboard":
            return _json(_finite(self.obs.dashboard()))
        return _text(404, "Not found. The pages here: /, /api/status, /api/dashboard, /metrics.")

    @staticmethod
    def _file(name: str, ctype: str, csp: bool = False) -> Response:
        try:
            body = (WEB_DIR / name).read_bytes()
        except OSError:
            return _text(500, f"The page's file {name} is missing from the installation.")
        return Response(200, body, ctype, {"Content-Security-Policy": CSP} if csp else {})


class _Handler(BaseHTTPRequestHandler):
    """http.server's request parsing and answer writing, on a head already read whole and into memory:
    the sockets, their deadlines and the caps are daemon/httpserver.py's."""

    server_version = "ckpt-daemon"
    sys_version = ""
    protocol_version = "HTTP/1.0"  # one request per connection: no idle keep-alive connections

    def __init__(self, head: bytes, client: tuple, app: App):  # no super().__init__: it would read a socket
        self.app, self.client_address = app, client
        self.request = self.connection = self.server = None
        self.rfile, self.wfile = io.BytesIO(head), io.BytesIO()
        self.handle()

    def do_GET(self) -> None:  # noqa: N802
        self._answer()

    def __getattr__(self, name: str):
        if name.startswith("do_"):  # any other method: 405, not http.server's 501
            return self._answer
        raise AttributeError(name)

    def _answer(self) -> None:
        try:
            resp = self.app.handle(self.command, self.path, self.headers, client=str(self.client_address[0]))
        except Exception as exc:
            log.exception("dashboard request failed", path=self.path[:200], error=str(exc))
            resp = _text(500, "Internal error; the daemon's log has the details.")
        self.send_response(resp.status)
        self.send_header("Content-Type", resp.content_type)
        self.send_header("Content-Length", str(len(resp.body)))
        for k, v in {**COMMON_HEADERS, **resp.headers}.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(resp.body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        log.debug("http request", client=self.client_address[0], line=(format % args)[:300])


def respond(app: App, head: bytes, client: tuple) -> bytes:
    """The whole answer (status line, headers, body) to one request head."""
    return _Handler(head, client, app).wfile.getvalue()


def make_server(addr: tuple, app: App, family: int) -> Server:
    return Server(addr, family, lambda head, client: respond(app, head, client))


def bind_address(host: str) -> tuple[str, int]:
    """(address, family) to listen on for http.host."""
    if host == "localhost":
        return "127.0.0.1", socket.AF_INET
    return host, socket.AF_INET6 if ":" in host else socket.AF_INET


class Observer:
    """The thread behind the HTTP side (see the module doc). `daemon` is the running daemon.core.Daemon;
    only its get_cfg(), status() and the status its main loop last computed are used."""

    TICK_S = 1.0
    DISK_SAMPLE_S = 120.0
    INVENTORY_WAIT_S = 10.0

    def __init__(self, daemon: Any, clock: Callable[[], float] = time.time):
        self.d = daemon
        self.get_cfg: Callable[[], Config] = daemon.get_cfg
        self.clock = clock
        cfg = self.get_cfg()
        self.inventory = dash.Inventory(self.get_cfg, self._extra_protected)
        self.disk = dash.DiskHistory(cfg.log_dir)
        self.curve = dash.LossCurve(cfg.log_dir / "metrics.jsonl")
        self.collector = prom.DaemonCollector(self.status, lambda: self.inventory.get(self.INVENTORY_WAIT_S), clock)
        self.http_registry = prom.make_registry(self.collector, process=True)
        self.file_registry = prom.make_registry(self.collector)
        self.app = App(self)
        self.server: Optional[Server] = None
        self._server_thread: Optional[threading.Thread] = None
        self._server_key: Optional[tuple] = None
        self._bind_error: Optional[tuple] = None  # (key, when) of the last failed bind: retried every 30 s
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._last_textfile = 0.0
        self._textfile_error: Optional[str] = None
        self._last_disk = 0.0
        self._disk_checked = None
        self._lock = threading.Lock()

    # ---------------------------------------------------------------------------- what requests read
    def _extra_protected(self) -> dict[str, str]:
        f = getattr(self.d, "_protected_extra", None)
        return f() if f else {}

    def status(self) -> Status:
        """The status the main loop computed last (at most a second old), else a fresh one."""
        s = getattr(self.d, "_last_state", None)
        return s if s is not None else self.d.status()

    def metrics_text(self) -> bytes:
        return prom.exposition(self.http_registry)

    def dashboard(self) -> dict:
        self.curve.update()
        inv = self.inventory.get(self.INVENTORY_WAIT_S)
        return dash.build_dashboard(self.status(), inv, self.disk.recent(), self.curve.to_json(), self.clock())

    # ---------------------------------------------------------------------------- life cycle
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="http-observer", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with self._lock:
            self._stop_server()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception as exc:  # the observer must outlive any one failure
                log.exception("dashboard/metrics tick failed; retrying", error=str(exc))
            self._stop.wait(self.TICK_S)

    def tick(self) -> None:
        cfg = self.get_cfg()
        now = self.clock()
        self._sync_server(cfg)
        if self.server is not None or cfg.http.textfile is not None:
            self.inventory.refresh_if_stale()
        if cfg.http.textfile is not None and now - self._last_textfile >= cfg.http.textfile_interval_s:
            self._last_textfile = now
            self._write_textfile(cfg)
        self._sample_disk(cfg, now)

    # ---------------------------------------------------------------------------- parts
    def _sync_server(self, cfg: Config) -> None:
        with self._lock:  # stop() may run at the same time, from the main thread
            self._sync_server_locked(cfg)

    def _sync_server_locked(self, cfg: Config) -> None:
        h = cfg.http
        key = (h.host, h.port) if h.enabled and not self._stop.is_set() else None
        if key == self._server_key:
            return
        if self._bind_error and self._bind_error[0] == key and time.monotonic() - self._bind_error[1] < 30:
            return
        self._stop_server()
        if key is None:
            return
        addr, family = bind_address(h.host)
        try:
            srv = make_server((addr, h.port), self.app, family)
        except OSError as exc:
            if not self._bind_error or self._bind_error[0] != key:
                log.error("the dashboard cannot listen; retrying every 30 s", host=h.host, port=h.port, error=str(exc),
                          remedy="choose a free http.port, or stop what listens there")
            self._bind_error = (key, time.monotonic())
            return
        self._bind_error = None
        self.server, self._server_key = srv, key
        self._server_thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.5},
                                               name="http-server", daemon=True)
        self._server_thread.start()
        shown = f"[{h.host}]" if ":" in h.host else h.host
        log.info("dashboard and metrics listening", url=f"http://{shown}:{h.port}/", token=cfg.http.token is not None,
                 dashboard=h.dashboard, metrics=h.metrics)

    def _stop_server(self) -> None:
        srv, self.server, self._server_key = self.server, None, None
        if srv is not None:
            srv.shutdown()
            srv.server_close()
            log.info("dashboard and metrics stopped listening")

    def _write_textfile(self, cfg: Config) -> None:
        folder = cfg.resolve_path(cfg.http.textfile)
        try:
            prom.write_textfile(folder, self.file_registry)
            if self._textfile_error:
                log.info("the metrics textfile is written again", folder=str(folder))
            self._textfile_error = None
        except Exception as exc:
            msg = str(exc)
            if msg != self._textfile_error:  # once per distinct problem, not every 30 s
                log.error("could not write the metrics textfile; retrying", folder=str(folder), error=msg,
                          remedy="check that http.textfile names a folder the daemon may write to")
            self._textfile_error = msg

    def _sample_disk(self, cfg: Config, now: float) -> None:
        checked = self.status().disk.checked
        if now - self._last_disk < self.DISK_SAMPLE_S and checked == self._disk_checked:
            return
        self._last_disk, self._disk_checked = now, checked
        try:
            u = disk_usage(cfg.checkpoint_dir)  # as df shows it: the blocks reserved for root are not "used"
        except OSError:
            return
        sample: dict[str, Any] = {"t": round(now, 1), "free": u.avail, "total": u.total, "used": u.used}
        inv = self.inventory.view
        if inv is not None and now - inv.time < 300:
            sample["ckpt"] = sum(e.bytes for rv in inv.runs.values() if rv.report is not None
                                 for e in rv.report.entries.values())
        self.disk.add(sample)
