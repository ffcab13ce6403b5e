"""Notification URLs (apprise): load one, name it without its secrets, send through it.

A notification URL carries credentials (a webhook token, an SMTP password, a private topic), so it is
a secret: it is never logged, shown in `status` or put in an error message whole. `label()` is what
is shown instead: the scheme and, for services whose URL names a real server (json://, form://,
mailto://, matrix://, ntfy://host/...), that server (`json://hooks.example.org:8080`); for the others,
where the first field of the URL is itself a token (slack://, discord://, tgram://), the scheme alone.

apprise is imported here, lazily, and only for a config that has notify.urls: it costs about 17 MiB
and 0.3 s, which a daemon without notifications never pays. Its own log lines are kept out of our logs
(its debug lines hold whole URLs); what it says about a failure is captured, scrubbed of every piece
of the URL and returned as the reason.
"""

from __future__ import annotations

import logging
import re
import threading
from contextlib import contextmanager
from typing import Any, Iterator, Optional
from urllib.parse import unquote

MAX_URL_CHARS = 4096
MAX_REASON_CHARS = 300
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]{0,31})://")
_ERRNO = re.compile(r"\[Errno -?\d+\] [^'\")\]\n]{1,120}")
_local = threading.local()


def scheme(url: str) -> str:
    m = _SCHEME.match(url)
    return m.group(1).lower() if m else "?"


def shape_error(url: str) -> Optional[str]:
    """What is wrong with the text of a URL before apprise sees it (None: nothing). Never repeats it."""
    if len(url) > MAX_URL_CHARS:
        return f"has {len(url)} characters; a notification URL has at most {MAX_URL_CHARS}"
    if not _SCHEME.match(url):
        return ("is not a URL of the form scheme://...: give an apprise URL such as json://host:port/path, "
                "mailto://user:password@host or slack://TokenA/TokenB/TokenC")
    if any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in url):
        return "holds a space or a control character; percent-encode it (%20)"
    return None


class _Capture(logging.Handler):
    """apprise's log records, kept per thread while a load or a send runs (else dropped)."""

    def emit(self, record: logging.LogRecord) -> None:
        lines = getattr(_local, "lines", None)
        if lines is not None and len(lines) < 200:
            try:
                lines.append((record.levelno, record.getMessage()))
            except Exception:
                pass


_setup_lock = threading.Lock()
_apprise: Any = None


def apprise_module() -> Any:
    """apprise, imported once, with its logger detached from ours (propagate off, our capture on)."""
    global _apprise
    with _setup_lock:
        if _apprise is None:
            lg = logging.getLogger("apprise")
            lg.propagate = False  # its debug lines print whole URLs; nothing of it reaches daemon.log
            lg.setLevel(logging.DEBUG)  # the socket error behind a failure is a debug line
            if not any(isinstance(h, _Capture) for h in lg.handlers):
                lg.addHandler(_Capture())
            import apprise

            lg.propagate = False
            _apprise = apprise
        return _apprise


@contextmanager
def _captured() -> Iterator[list]:
    lines: list = []
    _local.lines = lines
    try:
        yield lines
    finally:
        _local.lines = None


def _secret_pieces(url: str, shown: set[str]) -> list[str]:
    rest = url.split("://", 1)[-1]
    pieces = set()
    for p in re.split(r"[/:@?&=#,;+\s]", rest):
        for q in (p, unquote(p)):
            if len(q) >= 3 and q not in shown:
                pieces.add(q)
    return sorted(pieces, key=len, reverse=True)


def scrub(text: str, url: str, shown: set[str] = frozenset()) -> str:
    """`text` without any piece of `url` (but the parts in `shown`), bounded."""
    for piece in _secret_pieces(url, set(shown)):
        text = text.replace(piece, "…")
    text = " ".join(text.split())
    return text if len(text) <= MAX_REASON_CHARS else text[: MAX_REASON_CHARS - 1] + "…"


def _reason(lines: list, url: str, shown: set[str], default: str) -> str:
    said = [msg for level, msg in lines if level >= logging.WARNING]
    errno = next((m.group(0).strip() for _, msg in lines for m in [_ERRNO.search(msg)] if m), None)
    text = "; ".join(dict.fromkeys(said[-2:])) or default
    if errno and errno not in text:
        text += f" ({errno})"
    return scrub(text, url, shown)


def label(url: str, plugin: Any = None) -> str:
    """How a URL is shown: scheme://host[:port] where the service's URL names a server, else scheme://…"""
    s = scheme(url)
    host = getattr(plugin, "host", None) if plugin is not None else None
    names_server = plugin is not None and any("{host}" in t for t in (getattr(plugin, "templates", ()) or ()))
    if names_server and isinstance(host, str) and host and re.fullmatch(r"[A-Za-z0-9.\-\[\]:_]{1,255}", host):
        port = getattr(plugin, "port", None)
        shown = f"[{host}]" if ":" in host and not host.startswith("[") else host
        return f"{s}://{shown}" + (f":{port}" if isinstance(port, int) else "")
    return f"{s}://…"


def _shown(plugin: Any) -> set[str]:
    out = set()
    host, port = getattr(plugin, "host", None), getattr(plugin, "port", None)
    if isinstance(host, str) and host and any("{host}" in t for t in (getattr(plugin, "templates", ()) or ())):
        out.add(host)
        if isinstance(port, int):
            out.add(str(port))
    return out


def load(url: str) -> tuple[Any, str, Optional[str]]:
    """(apprise plugin or None, label, why it cannot be used or None). Imports apprise. The reason is a
    predicate ("is not a URL ...", "was refused by apprise (...)") and never holds a piece of the URL."""
    bad = shape_error(url)
    if bad:
        return None, f"{scheme(url)}://…", bad
    try:
        ap = apprise_module()
    except ImportError:
        return None, f"{scheme(url)}://…", ("needs the apprise package, which is not installed: "
                                             "pip install 'apprise>=1.9' (a dependency of ckpt-daemon)")
    with _captured() as lines:
        try:
            plugin = ap.Apprise.instantiate(url, asset=_asset(ap), suppress_exceptions=True)
        except Exception as exc:  # apprise's own bug on odd input: reported, never raised
            lines.append((logging.ERROR, f"{type(exc).__name__}: {exc}"))
            plugin = None
    if plugin is None:
        known = _schemes(ap)
        if known and scheme(url) not in known:
            return None, f"{scheme(url)}://…", (f"names no service apprise knows ({scheme(url)!r}; e.g. json, form, "
                                                 "mailto, slack, ntfy, matrix, discord)")
        return None, f"{scheme(url)}://…", (f"was refused by apprise ({_reason(lines, url, set(), 'no reason given')}); "
                                             "check it against apprise's page for that service")
    return plugin, label(url, plugin), None


def _asset(ap: Any) -> Any:
    """Who the notifications are from (a mail's sender name, a chat's bot name): ckpt-daemon, not Apprise."""
    try:
        return ap.AppriseAsset(app_id="ckpt-daemon", app_desc="ckpt-daemon notifications")
    except Exception:  # an apprise whose asset takes no such arguments: its default
        return None


def _schemes(ap: Any) -> set[str]:
    try:
        return {str(s).lower() for s in ap.manager_plugins.NotificationManager().schemas()}
    except Exception:  # an apprise without this API: its own message is used instead
        return set()


def send(plugin: Any, url: str, title: str, body: str, kind: str) -> tuple[bool, Optional[str]]:
    """Send one notification through a loaded plugin: (ok, why not). Never raises."""
    ap = apprise_module()
    notify_type = {"info": ap.NotifyType.INFO, "success": ap.NotifyType.SUCCESS,
                   "warning": ap.NotifyType.WARNING, "failure": ap.NotifyType.FAILURE}.get(kind, ap.NotifyType.INFO)
    with _captured() as lines:
        try:
            # body_format TEXT: apprise escapes it and keeps its lines (as <br> in the HTML part of a mail)
            ok = bool(plugin.notify(body=body, title=title, notify_type=notify_type, body_format=ap.NotifyFormat.TEXT))
        except Exception as exc:
            lines.append((logging.ERROR, f"{type(exc).__name__}: {exc}"))
            ok = False
    if ok:
        return True, None
    return False, _reason(lines, url, _shown(plugin), "the service did not accept it")
