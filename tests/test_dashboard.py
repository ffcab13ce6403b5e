"""The dashboard: its data (loss curve, disk history, the cached inventory), the HTTP answers, and the
real page in a real headless Chromium against a real daemon: no console errors, every checkpoint and
every planned deletion drawn, hostile names shown as text, and a screenshot for the docs."""

from __future__ import annotations

import base64
import datetime as dt
import json
import math
import os
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from ckpt_daemon import runtime
from ckpt_daemon.config import load_config
from daemon import dashboard as dash
from daemon.http import App, session_value
from maintenance.cleanup import build_report, confirm_policy
from tests.helpers import PY, REPO, Daemon, fake_native

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or (
    "/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)
HOSTILE = "checkpoint-1<img src=x onerror=alert(1)>"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------ loss curve
def _lines(path: Path, recs) -> None:
    with open(path, "a") as f:
        for r in recs:
            f.write(json.dumps(r) + "\n")


def test_loss_curve_reads_only_what_was_appended_and_follows_a_resume(tmp_path):
    p = tmp_path / "metrics.jsonl"
    _lines(p, [{"step": s, "loss": 3.0 - s / 100, **({"val_loss": 2.5} if s % 10 == 0 else {})} for s in range(1, 51)])
    c = dash.LossCurve(p)
    c.update()
    j = c.to_json()
    assert [pt[0] for pt in j["loss"]] == list(range(1, 51)) and [pt[0] for pt in j["val_loss"]] == [10, 20, 30, 40, 50]
    first_offset = c.offset
    # a resumed run logs the steps after its checkpoint (40) again: they replace the old ones
    with open(p, "a") as f:
        f.write(json.dumps({"step": 41, "loss": 9.0}) + "\n" + '{"step": 42, "loss": 8.0')  # the last line unfinished
    c.update()
    assert c.offset > first_offset
    j = c.to_json()
    assert j["loss"][-1] == [41, 9.0] and [pt[0] for pt in j["loss"]][-3:] == [39, 40, 41]
    assert [pt[0] for pt in j["val_loss"]] == [10, 20, 30, 40]
    with open(p, "a") as f:
        f.write("}\nnot json\n" + json.dumps({"step": 43, "loss": float("nan")}).replace("NaN", "NaN") + "\n")
    c.update()
    assert c.to_json()["loss"][-1] == [42, 8.0]  # the finished line counted once; junk and NaN skipped
    # rotated away and started anew: read afresh
    p.unlink()
    _lines(p, [{"step": 1, "loss": 1.0}])
    c.update()
    assert c.to_json()["loss"] == [[1, 1.0]]


def test_loss_curve_of_a_long_run_is_sampled_and_bounded(tmp_path):
    p = tmp_path / "metrics.jsonl"
    _lines(p, [{"step": s, "loss": 1 + math.exp(-s / 3000), **({"val_loss": 1.5} if s % 100 == 0 else {}), "time": 0}
               for s in range(1, 20001)])
    c = dash.LossCurve(p, points=500)
    c.SAMPLE_ABOVE, c.TAIL, c.SAMPLES = 256 << 10, 64 << 10, 100  # the same logic on a 1 MB file
    c.update()
    j = c.to_json()
    steps = [pt[0] for pt in j["loss"]]
    assert j["sampled_past"] and steps == sorted(steps) and len(steps) <= 500
    assert steps[0] < 500 and steps[-1] == 20000  # the whole history, from its start to now
    assert len(j["val_loss"]) >= 50 and j["val_loss"][-1][0] == 20000


def test_disk_history_is_a_bounded_ring_kept_across_restarts(tmp_path):
    h = dash.DiskHistory(tmp_path, keep=50)
    for i in range(260):
        h.add({"t": float(i), "free": 1000 - i, "total": 2000})
    assert len(h.samples) == 50 and h.samples[-1]["t"] == 259.0
    lines = (tmp_path / "disk-history.jsonl").read_text().splitlines()
    assert len(lines) <= 100  # rewritten with the ring whenever it holds twice as many
    again = dash.DiskHistory(tmp_path, keep=50)
    assert [s["t"] for s in again.samples] == [float(i) for i in range(210, 260)]
    assert len(again.recent(points=10)) == 10 and again.recent(points=10)[-1]["t"] == 259.0


def test_the_inventory_is_rebuilt_at_most_every_ttl(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(dash, "take_inventory", lambda cfg, extra: calls.append(1) or dash.InventoryView(0, 0, {}, []))
    now = [100.0]
    inv = dash.Inventory(lambda: None, lambda: {}, ttl_s=30, clock=lambda: now[0])
    assert inv.get() is None
    assert inv.refresh_if_stale() and len(calls) == 1
    for t in (101, 110, 129.9):
        now[0] = t
        assert not inv.refresh_if_stale()
    now[0] = 130.0
    assert inv.refresh_if_stale() and len(calls) == 2 and inv.get() is not None


# ------------------------------------------------------------------------------------ HTTP answers
class _Headers(dict):
    def get(self, k, default=None):
        return next((v for kk, v in self.items() if kk.lower() == k.lower()), default)


class _Obs:
    def __init__(self, cfg):
        self.cfg = cfg

    def get_cfg(self):
        return self.cfg

    def metrics_text(self):
        return b"# metrics\n"

    def status(self):
        return {"training": {"state": "running"}}

    def dashboard(self):
        return {"ok": True, "x": float("nan")}


def _app(tmp_path, http: dict):
    import yaml

    from ckpt_daemon.config import parse_config

    cfg = parse_config(yaml.safe_dump({"http": http}), tmp_path / "config.yaml")
    return App(_Obs(cfg))


def test_read_only_bounded_and_loopback_only_without_a_token(tmp_path):
    app = _app(tmp_path, {"enabled": True})
    h = _Headers(Host="127.0.0.1:9184")
    assert app.handle("GET", "/", h).status == 200
    r = app.handle("GET", "/", h)
    assert "script-src 'self'" in r.headers["Content-Security-Policy"] and b"/static/app.js" in r.body
    for m in ("POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"):
        r = app.handle(m, "/api/dashboard", h)
        assert r.status == 405 and r.headers["Allow"] == "GET"
    assert app.handle("GET", "/" + "a" * 3000, h).status == 414
    assert app.handle("GET", "/api/status?" + "&".join(f"f{i}=1" for i in range(20)), h).status == 400
    assert app.handle("GET", "/api/status", _Headers(Host="localhost", **{"Content-Length": "5"})).status == 413
    assert app.handle("GET", "/static/../../config.yaml", h).status == 404
    assert app.handle("GET", "/static/app.js", h).status == 200
    # a web page that rebinds its own name to 127.0.0.1 must not read the dashboard
    assert app.handle("GET", "/api/status", _Headers(Host="evil.example:9184")).status == 403
    r = app.handle("GET", "/api/dashboard", h)
    assert r.status == 200 and json.loads(r.body) == {"ok": True, "x": None}  # NaN is not JSON
    off = _app(tmp_path, {"enabled": True, "dashboard": False})
    assert off.handle("GET", "/", h).status == 404 and off.handle("GET", "/metrics", h).status == 200


def test_a_token_once_in_the_url_becomes_a_cookie(tmp_path):
    token = "s3cret-token-0123456789"
    app = _app(tmp_path, {"enabled": True, "host": "0.0.0.0", "token": token})
    assert app.handle("GET", "/", _Headers()).status == 401
    assert app.handle("GET", "/?token=wrong-token-0123456789", _Headers()).status == 401
    r = app.handle("GET", f"/?token={token}", _Headers(Host="box.lan:9184"))
    assert r.status == 303 and r.headers["Location"] == "/"  # the token leaves the address bar
    cookie = r.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and token not in cookie
    value = cookie.split(";")[0]
    assert value == f"ckpt_daemon_session={session_value(token)}"
    assert app.handle("GET", "/api/dashboard", _Headers(Cookie=f"a=b; {value}")).status == 200
    assert app.handle("GET", "/metrics", _Headers(Authorization=f"Bearer {token}")).status == 200
    assert app.handle("GET", "/metrics", _Headers(Authorization="Bearer nope")).status == 401


# ------------------------------------------------------------------------------------ the real page
def _project(folder: Path) -> tuple[Path, Path]:
    """30 checkpoints in three tiers with a best, a pin, epoch ends and a snapshot; a loss curve, disk
    history, a crash with hostile output, and a hostile folder name."""
    ck = folder / "checkpoints"
    for i, step in enumerate(range(100, 3001, 100)):
        d = fake_native(ck, step, payload=b"w" * (4096 * (8 + i % 3)))
        m = json.loads((d / "manifest.json").read_text())
        m["epoch"] = step // 1000
        m["metrics"] = {"val_loss": round(0.6 + 2.5 * math.exp(-step / 700) + 0.03 * math.sin(step), 4)}
        (d / "manifest.json").write_text(json.dumps(m))
    os.symlink("checkpoint-2200", ck / "best")
    (ck / HOSTILE).mkdir()
    runtime.pin(ck, "checkpoint-1500", reason="release candidate <script>alert('pin')</script>")
    logs = folder / "logs"
    logs.mkdir(parents=True)
    now = time.time()
    with open(logs / "metrics.jsonl", "w") as f:
        for s in range(1, 3001):
            rec = {"step": s, "loss": 0.45 + 3.1 * math.exp(-s / 600) + 0.08 * math.sin(s / 7) * math.exp(-s / 2000)}
            if s % 100 == 0:
                rec["val_loss"] = 0.6 + 2.5 * math.exp(-s / 700)
            f.write(json.dumps({**rec, "time": now - 3000 + s}) + "\n")
    folder.joinpath("checkpoints").mkdir(exist_ok=True)
    total = shutil.disk_usage(folder).total
    free_now = shutil.disk_usage(folder).free
    with open(logs / "disk-history.jsonl", "w") as f:
        for i in range(145):
            t = now - 86400 + i * 600
            f.write(json.dumps({"t": t, "free": int(free_now + 0.1 * total * (1 - i / 145) + 2**30 * math.sin(i / 9)),
                                "total": total, "ckpt": int(0.1 * total * i / 145)}) + "\n")
    yesterday = (dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=1)).strftime("%Y-%m-%d")
    snap = folder / "snapshots" / yesterday
    snap.mkdir(parents=True)
    from maintenance.snapshot import SNAPSHOT_FORMAT

    (snap / "snapshot.json").write_text(json.dumps({
        "format": SNAPSHOT_FORMAT, "date": yesterday, "created": f"{yesterday}T03:00:00+00:00",
        "checkpoints": [{"name": "checkpoint-2200", "run": "", "step": 2200, "roles": ["best"]},
                        {"name": "checkpoint-50", "run": "", "step": 50, "roles": ["latest"]}], "added_bytes": 0}))
    flag = folder / "crashed-once"
    script = folder / "train.py"
    script.write_text(
        "import os, sys, time\n"
        f"flag = {str(flag)!r}\n"
        "if not os.path.exists(flag):\n"
        "    open(flag, 'w').close()\n"
        "    print('loading shard 17 <b>not bold</b>')\n"
        "    print('RuntimeError: CUDA error: an illegal memory access was encountered', flush=True)\n"
        "    sys.exit(3)\n"
        "from ckpt_daemon.runtime import write_heartbeat\n"
        "step = 3000\n"
        "while True:\n"
        f"    write_heartbeat({str(ck)!r}, step=step, resumed_from='checkpoint-3000')\n"
        "    step += 7\n"
        "    time.sleep(0.25)\n")
    return ck, script


class Browser:
    """Headless Chromium driven over the DevTools protocol: console messages and exceptions are
    collected, so a page that throws fails the test."""

    def __init__(self, tmp: Path):
        import websocket  # websocket-client (test extra)

        self.ud = tmp / "chromium-profile"
        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--disable-extensions", "--hide-scrollbars",
             "--mute-audio", f"--user-data-dir={self.ud}", "--remote-debugging-port=0", "--window-size=1280,900",
             "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = self.ud / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (port_file.exists() and port_file.read_text().count("\n") >= 1):
            assert self.proc.poll() is None, "chromium exited at start"
            assert time.monotonic() < deadline, "chromium did not open its DevTools port"
            time.sleep(0.05)
        port = int(port_file.read_text().split()[0])
        targets = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10).read())
        page = next(t for t in targets if t["type"] == "page")
        self.ws = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=30, suppress_origin=True)
        self.n = 0
        self.events: list[dict] = []
        for m in ("Runtime.enable", "Log.enable", "Page.enable"):
            self.call(m)

    def call(self, method: str, **params) -> dict:
        self.n += 1
        self.ws.send(json.dumps({"id": self.n, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.n:
                assert "error" not in msg, f"{method}: {msg['error']}"
                return msg.get("result", {})
            self.events.append(msg)

    def eval(self, expr: str):
        r = self.call("Runtime.evaluate", expression=expr, returnByValue=True, awaitPromise=True)
        assert "exceptionDetails" not in r, r["exceptionDetails"]
        return r["result"].get("value")

    def problems(self) -> list[str]:
        out = []
        for e in self.events:
            p = e.get("params", {})
            if e.get("method") == "Runtime.exceptionThrown":
                details = p["exceptionDetails"]
                out.append(f"exception: {details.get('exception', {}).get('description') or details.get('text')}")
            elif e.get("method") == "Runtime.consoleAPICalled" and p.get("type") in ("error", "warning", "assert"):
                out.append(f"console.{p['type']}: {[a.get('value', a.get('description')) for a in p.get('args', [])]}")
            elif e.get("method") == "Log.entryAdded" and p.get("entry", {}).get("level") in ("error", "warning"):
                out.append(f"log {p['entry']['level']}: {p['entry'].get('text')} {p['entry'].get('url', '')}")
        return out

    def close(self) -> None:
        try:
            self.ws.close()
        finally:
            self.proc.kill()
            self.proc.wait()


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None,
                    reason="chromium is not installed (apt-get install chromium; CI installs it where it can)")
def test_the_page_in_a_real_browser(tmp_path, daemons):  # noqa: F811
    _, script = _project(tmp_path)
    port = free_port()
    tiers = [{"count": 8}, {"count": 10, "every_steps": 200}, {"every_steps": 1000}]
    d = Daemon(tmp_path, {"training": {"command": [PY, str(script)], "restart": {"initial_backoff_s": 0.2}},
                          "retention": {"tiers": tiers}, "http": {"enabled": True, "port": port}})
    cfg = load_config(d.cfg)
    confirm_policy(cfg, "test")  # a person confirmed these tiers: nothing held, the plan applies
    plan = build_report(cfg, "dry run", unattended=True)
    victims = sorted(x.name for x in plan.decisions if not x.keep)
    assert 5 <= len(victims) < 30 and "checkpoint-1500" not in victims and "checkpoint-2200" not in victims
    d.start()
    daemons.append(d)
    d.wait(lambda s: s["training"]["restarts"] == 1 and s["training"]["state"] == "running"
           and s["training"].get("steps_per_s"), what="one crash, then training with a heartbeat")
    browser = Browser(tmp_path)
    try:
        browser.call("Page.addScriptToEvaluateOnNewDocument",
                     source="window.__alerts = 0; window.alert = () => { window.__alerts += 1; };")
        browser.call("Emulation.setDeviceMetricsOverride", width=1280, height=900, deviceScaleFactor=1, mobile=False)
        browser.call("Page.navigate", url=f"http://127.0.0.1:{port}/")
        deadline = time.monotonic() + 20
        while browser.eval("document.body ? document.body.dataset.state : null") != "ready":
            assert time.monotonic() < deadline, f"the page never got ready: {browser.problems()}"
            time.sleep(0.1)
        shown = browser.eval("""(() => {
            const run = document.querySelector('section.run[data-run=""]');
            return {
              marks: run.querySelectorAll('rect.ckpt').length,
              deleting: [...run.querySelectorAll('rect.ckpt.delete')].map(e => e.getAttribute('data-name')).sort(),
              rows: [...run.querySelectorAll('tr.planned')].map(e => e.getAttribute('data-name')).sort(),
              reason: run.querySelector('rect.ckpt.delete title').textContent,
              best: run.querySelectorAll('.flag.best').length, latest: run.querySelectorAll('.flag.latest').length,
              pins: run.querySelectorAll('.flag.pin').length, epochs: run.querySelectorAll('.flag.epoch').length,
              snaps: run.querySelectorAll('.flag.snap').length, snapOnly: run.querySelectorAll('.flag.snap-only').length,
              bands: run.querySelectorAll('rect.band').length,
              text: document.body.textContent, imgs: document.querySelectorAll('img').length,
              inlineScripts: document.querySelectorAll('script:not([src])').length,
              alerts: window.__alerts, verdict: document.getElementById('verdict').textContent,
              lossPaths: document.querySelectorAll('#loss path.loss, #loss path.val').length,
              diskPaths: document.querySelectorAll('#disk path.used').length,
              crashes: document.querySelectorAll('#crashes .crash').length,
              cards: [...document.querySelectorAll('#cards .card')].map(c => [c.querySelector('h2').textContent,
                      [...c.querySelectorAll('dt')].map(dt => [dt.textContent, dt.nextElementSibling.textContent])]),
            };
        })()""")
        # the whole page, 1280 px wide, for the docs
        height = browser.eval("Math.ceil(document.documentElement.scrollHeight)")
        png = base64.b64decode(browser.call("Page.captureScreenshot", format="png", captureBeyondViewport=True,
                                            clip={"x": 0, "y": 0, "width": 1280, "height": height, "scale": 1})["data"])
        problems = browser.problems()
    finally:
        browser.close()
    assert problems == []
    assert shown["marks"] == 30
    assert shown["deleting"] == victims and shown["rows"] == victims
    assert "NEXT CLEANUP DELETES IT: tier " in shown["reason"]
    assert (shown["best"], shown["latest"], shown["pins"], shown["bands"]) == (1, 1, 1, 3)
    assert shown["epochs"] >= 2 and shown["snaps"] == 1 and shown["snapOnly"] == 1
    assert shown["lossPaths"] == 2 and shown["diskPaths"] == 1 and shown["crashes"] == 1
    # untrusted text is shown as text, never run as markup
    assert HOSTILE in shown["text"] and "<b>not bold</b>" in shown["text"]
    assert shown["imgs"] == 0 and shown["inlineScripts"] == 0 and shown["alerts"] == 0
    assert "training OK" in shown["verdict"]
    cards = {title: dict(rows) for title, rows in shown["cards"]}
    disk = d.status()["disk"]  # as df shows it: the same figure as status and /metrics
    assert cards["Disk"]["used"] == f"{disk['used_percent']}% (as df shows it)" and cards["Disk"]["filesystem"] == disk["mount"]
    assert cards["Training"]["val_loss"].endswith("at step 3000") and cards["Training"]["loss"].startswith("0.")
    assert "Memory checkpoints" not in cards  # off in this config
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    if os.environ.get("CKPT_DAEMON_UPDATE_SCREENSHOT"):  # the README's screenshot; a test run leaves the tree alone
        (REPO / "docs" / "dashboard.png").write_bytes(png)
    assert d.stop() == 0
