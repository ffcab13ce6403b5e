"""Notifications (notify: in config.yaml, daemon/alerts.py): sent for real through apprise to a local
HTTP receiver (json://) and a local SMTP server (aiosmtpd), from a real daemon whose events really
happen; rate limited and coalesced, never blocking, a dead target logged once, URLs never shown whole."""

from __future__ import annotations

import json
import os
import re
import socket
import stat
import time
from pathlib import Path

import pytest
import structlog
import yaml

from ckpt_daemon.config import ALERT_EVENTS, config_schema, parse_config
from ckpt_daemon.errors import ConfigError
from daemon.alerts import Alerts
from tests.helpers import PY, REPO, SECRET, Receiver, run_py


# ---------------------------------------------------------------------------------- local receivers
def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Smtp:
    """A local SMTP server (aiosmtpd) that keeps every mail."""

    def __init__(self):
        from aiosmtpd.controller import Controller

        self.mails: list = []
        owner = self

        class H:
            async def handle_DATA(self, server, session, envelope):
                owner.mails.append(envelope)
                return "250 OK"

        self.port = free_port()
        self.ctl = Controller(H(), hostname="127.0.0.1", port=self.port)
        self.ctl.start()

    def url(self, events: list[str]) -> dict:
        return {"url": f"mailto://127.0.0.1:{self.port}?from=ckpt@example.com&to=ops@example.com&mode=insecure",
                "events": events}

    def messages(self) -> list[str]:
        return [m.content.decode("utf-8", "replace") for m in list(self.mails)]

    def close(self):
        self.ctl.stop()


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


def event_of(note: dict) -> str:
    m = re.search(r"^event: (\w+)$", note.get("message", ""), re.M)
    return m.group(1) if m else "?"


def of(notes: list[dict], event: str) -> list[dict]:
    return [n for n in notes if event_of(n) == event]


def cfg_with(tmp_path: Path, notify: dict):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"notify": notify}))
    return parse_config((tmp_path / "config.yaml").read_text(), tmp_path / "config.yaml")


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


# ---------------------------------------------------------------------------------- config
def test_a_mistyped_event_or_a_bad_url_is_a_clear_config_error_that_never_shows_the_url(tmp_path):
    with pytest.raises(ConfigError) as e:
        cfg_with(tmp_path, {"urls": [f"json://u:{SECRET}@127.0.0.1:9/x"], "events": ["gave_up", "new_bets"]})
    msg = str(e.value)
    assert "notify.events[1]" in msg and "'new_bets'" in msg and "did you mean 'new_best'?" in msg
    with pytest.raises(ConfigError) as e:
        cfg_with(tmp_path, {"urls": [{"url": f"json://127.0.0.1:9/{SECRET}", "evnts": ["crash"]}]})
    assert "notify.urls[0].evnts is not a known key; did you mean 'events'?" in str(e.value)
    for bad, says in ((f"slak://{SECRET}/x", "names no service apprise knows ('slak'"),
                      (f"mailto://{SECRET}", "was refused by apprise"),
                      (f"{SECRET}", "is not a URL of the form scheme://"),
                      (f"json://127.0.0.1/{SECRET} x", "holds a space")):
        with pytest.raises(ConfigError) as e:
            cfg_with(tmp_path, {"urls": ["json://127.0.0.1:9/ok", bad]})
        msg = str(e.value)
        assert "notify.urls[1].url" in msg and says in msg, msg
        assert SECRET not in msg, msg
    for bad in ([[f"json://{SECRET}@h/x"]], [{"url": [SECRET]}], 5):
        with pytest.raises(ConfigError) as e:
            cfg_with(tmp_path, {"urls": bad})
        assert "notify.urls" in str(e.value) and SECRET not in str(e.value)


def test_check_config_and_the_schema_show_urls_by_scheme_and_server_only(tmp_path, receiver):
    smtp_url = f"mailto://ckpt:{SECRET}@127.0.0.1:2525?from=ckpt@example.com&to=ops@example.com&mode=insecure"
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"notify": {
        "urls": [receiver.url(), {"url": smtp_url, "events": ["gave_up"]}, f"slack://T1AAA/B2BBB/{SECRET}/#ops"],
        "events": ["gave_up", "training_finished"], "min_interval_s": 60}}))
    r = run_py(["-m", "daemon", "check-config", "--json", "--config", str(tmp_path / "config.yaml")], check=True)
    eff = json.loads(r.stdout)["effective"]["notify"]
    assert [u["url"] for u in eff["urls"]] == [f"json://127.0.0.1:{receiver.port}", "mailto://127.0.0.1:2525",
                                                "slack://…"]  # a Slack URL's first field is a token: not shown
    assert eff["urls"][1]["events"] == ["gave_up"] and eff["events"] == ["gave_up", "training_finished"]
    assert SECRET not in r.stdout + r.stderr
    jsonschema = pytest.importorskip("jsonschema")
    v = jsonschema.Draft202012Validator(config_schema())
    ok = {"notify": {"urls": ["json://h/x", {"url": "mailto://h", "events": ["crash"]}], "events": list(ALERT_EVENTS)}}
    assert v.is_valid(ok) and v.is_valid({"notify": {"urls": "json://h/x"}})
    assert not v.is_valid({"notify": {"events": ["new_bets"]}})


def test_without_urls_apprise_is_never_imported():
    code = ("import sys, pathlib; import daemon.core, daemon.alerts; from ckpt_daemon.config import parse_config; "
            "cfg = parse_config('notify: {urls: []}', pathlib.Path('/tmp/config.yaml')); "
            "a = daemon.alerts.Alerts(lambda: cfg).start(); assert not a.emit('gave_up', 'x', 'y'); a.stop(); "
            "print('apprise' in sys.modules)")
    assert run_py(["-c", code], check=True).stdout.strip() == "False"


# ---------------------------------------------------------------------------------- the sender
def test_hundreds_of_alerts_never_block_and_are_coalesced_by_the_rate_limit(tmp_path):
    slow = Receiver(hold=True)  # keeps the first request open: the sender is stuck in a send
    try:
        cfg = cfg_with(tmp_path, {"urls": [slow.url()], "min_interval_s": 600})
        clock = Clock()
        a = Alerts(lambda: cfg, clock=clock).start()
        assert a.emit("crash", "crash 0", "boom", kind="error")
        assert slow.holding.wait(30), "the first notification never reached the receiver"
        for i in range(1, 400):  # while the only sender thread is blocked in a send: each returns at once
            assert a.emit("crash", f"crash {i}", "boom", kind="error")
        assert a.emit("gave_up", "gave up", "5 crashes within 60s")
        assert not slow.got  # all of the above happened while the first send was still held open
        assert a.snapshot()["pending"] == {"crash": 399, "gave_up": 1}
        slow.release.set()
        slow.wait(lambda g: len(g) >= 2, what="the first crash and the gave_up notifications")
        first, gave_up = slow.got[0], slow.got[1]
        assert first["title"].endswith("crash 0") and first["type"] == "warning"
        assert event_of(gave_up) == "gave_up" and gave_up["type"] == "failure"  # not held back by crash's limit
        assert "boom" in first["message"] and "kind: error" in first["message"]
        time.sleep(0.5)
        assert len(slow.got) == 2  # the rate limit: no second crash notification within min_interval_s
        assert a.snapshot()["pending"] == {"crash": 399}
        clock.t += 600
        a.poke()
        coalesced = slow.wait(lambda g: len(g) >= 3 and g[2], what="the coalesced crash notification")
        assert coalesced["title"].endswith("crash 399 (+398 more)")
        assert "398 earlier crash alert(s)" in coalesced["message"]
        assert "crash 394; crash 395; crash 396; crash 397; crash 398" in coalesced["message"]
        deadline = time.monotonic() + 10
        while a.snapshot()["targets"][0]["sent"] < 3 and time.monotonic() < deadline:  # counted after the reply
            time.sleep(0.05)
        snap = a.snapshot()
        assert snap["pending"] == {} and snap["held_back"]["crash"] == 398
        assert snap["targets"][0]["sent"] == 3 and snap["targets"][0]["state"] == "ok"
        # an alert with a key is sent once (a checkpoint that failed verification, seen by two threads)
        assert a.emit("verification_failed", "checkpoint-5 failed verification", "checksum", key="checkpoint-5")
        assert not a.emit("verification_failed", "checkpoint-5 failed verification", "checksum", key="checkpoint-5")
        a.stop()
        assert len(of(slow.got, "verification_failed")) == 1
    finally:
        slow.close()


def test_a_dead_target_is_logged_once_and_again_when_it_works(tmp_path, receiver):
    dead_port = free_port()
    dead = f"json://ckpt:{SECRET}@127.0.0.1:{dead_port}/hook?token={SECRET}"
    cfg = cfg_with(tmp_path, {"urls": [receiver.url(), dead], "min_interval_s": 0})
    a = Alerts(lambda: cfg).start()
    try:
        with structlog.testing.capture_logs() as logs:
            for i, event in enumerate(["crash", "gave_up", "new_best", "disk_emergency", "crash", "training_finished"]):
                a.emit(event, f"alert {i}", "details")
                receiver.wait(lambda g, i=i: len(g) > i, what=f"alert {i}")  # the live target gets each one
            deadline = time.monotonic() + 10
            while a.snapshot()["targets"][1]["failed"] < 6 and time.monotonic() < deadline:
                time.sleep(0.05)
            snap = a.snapshot()
            failing = [e for e in logs if e["event"].startswith("notification target failed")]
            assert len(failing) == 1, logs
            assert failing[0]["target"] == f"json://127.0.0.1:{dead_port}"
            assert "Connection refused" in failing[0]["reason"]
            live, gone = snap["targets"]
            assert live == {**live, "target": f"json://127.0.0.1:{receiver.port}", "state": "ok", "sent": 6}
            assert gone["state"] == "failing" and gone["failed"] == 6 and "Connection refused" in gone["last_error"]
            again = Receiver(port=dead_port)  # the target comes back
            try:
                a.emit("deletions_held", "held 3", "Kept: checkpoint-1")
                again.wait(lambda g: g, what="the notification to the target that came back")
                deadline = time.monotonic() + 10
                while a.snapshot()["targets"][1]["state"] != "ok" and time.monotonic() < deadline:
                    time.sleep(0.05)
                assert a.snapshot()["targets"][1]["state"] == "ok"
            finally:
                again.close()
        assert [e["event"] for e in logs if e["event"].startswith("notification target")] == [
            failing[0]["event"], "notification target works again"]
        assert SECRET not in json.dumps(logs, default=str) + json.dumps(a.snapshot())
        assert all(SECRET not in json.dumps(n) for n in receiver.got)  # nor in what is sent
    finally:
        a.stop()


# ---------------------------------------------------------------------------------- the real daemon
@pytest.mark.slow
def test_a_real_daemon_notifies_a_web_hook_and_a_mail_server(tmp_path, receiver):
    import torch

    from ckpt_daemon.checkpoint import CheckpointManager
    from tests.helpers import Daemon, native, tiny_model

    ck = tmp_path / "checkpoints"
    native(ck, list(range(10, 101, 10)))  # best: checkpoint-100 (val_loss 10/step)
    f = ck / "checkpoint-100" / "model.safetensors"  # damaged while nobody watched
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x40
    f.write_bytes(bytes(data))
    dead_port = free_port()
    smtp = Smtp()
    crash = [PY, "-c", "import sys; print('boom: bad batch'); sys.exit(1)"]
    d = Daemon(tmp_path, {
        "training": {"command": crash, "restart": {"initial_backoff_s": 0.2, "max_backoff_s": 0.4, "max_crashes": 3,
                                                   "give_up_retry_s": 5}},
        "disk": {"check_interval_s": 5, "warn_free_gb": 10**7, "emergency_free_gb": 10**7},  # always an emergency
        "retention": {"tiers": [{"count": 2}, {"every_steps": 1000}]},  # deletes more than the confirmed defaults
        "notify": {"urls": [receiver.url(), f"json://ckpt:{SECRET}@127.0.0.1:{dead_port}/x?token={SECRET}"],
                   "min_interval_s": 3600}})
    os.chmod(d.cfg, 0o600)
    d.start()
    try:
        got = receiver.wait(lambda g: {"crash", "gave_up", "disk_emergency", "deletions_held",
                                       "verification_failed"} <= {event_of(n) for n in g} and g,
                            what="crash, gave_up, disk_emergency, deletions_held, verification_failed")
        assert "boom: bad batch" in of(got, "crash")[0]["message"]
        assert "3 crashes within" in of(got, "gave_up")[0]["message"] and of(got, "gave_up")[0]["type"] == "failure"
        assert "DISK EMERGENCY" in of(got, "disk_emergency")[0]["title"]
        held = of(got, "deletions_held")[0]["message"]
        assert "checkpoint-10" in held and "python -m maintenance.cleanup" in held
        assert of(got, "verification_failed")[0]["title"].endswith("checkpoint-100 failed verification")
        # a new best written by a script of one's own (CheckpointManager), while the daemon watches
        m = tiny_model()
        CheckpointManager(ck).save(110, model=m, optimizer=torch.optim.AdamW(m.parameters()),
                                   metrics={"val_loss": 0.01})
        best = receiver.wait(lambda g: of(g, "new_best"), what="new_best")[0]
        assert "checkpoint-110" in best["title"] and "val_loss 0.01" in best["title"] and best["type"] == "success"
        # a hot reload: a mail target for two events, and a command that finishes; the give-up retry runs it
        cfg = yaml.safe_load(d.cfg.read_text())
        cfg["notify"]["urls"].append(smtp.url(["training_finished", "gave_up"]))
        cfg["training"]["command"] = [PY, "-c", "print('all epochs done')"]
        new = d.cfg.with_name("config.yaml.new")
        new.write_text(yaml.safe_dump(cfg))
        os.chmod(new, 0o600)
        os.replace(new, d.cfg)
        finished = receiver.wait(lambda g: of(g, "training_finished"), timeout=90, what="training_finished")[0]
        assert finished["type"] == "success" and "exited 0" in finished["message"]
        deadline = time.monotonic() + 30
        while not any("training finished" in m for m in smtp.messages()) and time.monotonic() < deadline:
            time.sleep(0.1)
        mails = smtp.messages()
        assert any("Subject: ckpt-daemon on" in m and "training finished" in m for m in mails), mails
        assert all(re.search(r"^event: (training_finished|gave_up)\s*$", m, re.M) for m in mails)  # its own events only
        mailed = lambda s: [t["sent"] > 0 for t in s["notify"]["targets"]][2:] == [True]  # noqa: E731
        s = d.wait(lambda s: s["training"]["state"] == "finished" and mailed(s) and s,
                   what="status with the mail target's first notification")  # the state file lags by up to 1 s
        live, gone, mail = s["notify"]["targets"]
        assert live["target"] == f"json://127.0.0.1:{receiver.port}" and live["state"] == "ok"
        assert gone["target"] == f"json://127.0.0.1:{dead_port}" and gone["state"] == "failing"
        assert "Connection refused" in gone["last_error"] and gone["failed"] >= 6
        assert mail["target"] == f"mailto://127.0.0.1:{smtp.port}" and mail["state"] == "ok"
        shown = run_py(["-m", "daemon", "status", "--config", str(d.cfg)]).stdout
        assert "notifications FAILING" in shown.splitlines()[0]
        assert f"notify:   json://127.0.0.1:{dead_port} FAILING for" in shown and "Connection refused" in shown
        assert SECRET not in shown
        assert d.proc.poll() is None  # the dead target cost one log line, nothing else
        assert d.stop() == 0
        crashes = sum(s["training"]["crash_counts"].values())
        # what waited under the rate limit went out at the stop: every crash was told, as one or as "+N more"
        notes = of(receiver.got, "crash")
        told = sum(1 + int((re.search(r"\(\+(\d+) more\)$", n["title"]) or [0, 0])[1]) for n in notes)
        assert crashes >= 3 and told == crashes and len(notes) <= 2, [n["title"] for n in notes]
        log = d.log()
        assert sum("notification target failed" in line for line in log.splitlines()) == 1
        for text in (log, d.output(), (tmp_path / "logs" / "daemon-state.json").read_text(),
                     (tmp_path / "logs" / "cleanup.log").read_text()):
            assert SECRET not in text
        # the copy of the config in force holds the URLs: readable by the daemon's user only
        assert stat.S_IMODE((tmp_path / "logs" / "config.last-good.yaml").stat().st_mode) == 0o600
    finally:
        if d.proc and d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait()
        smtp.close()


@pytest.mark.slow
def test_the_docs_example_is_a_valid_config_shown_without_its_secrets(tmp_path):
    from tests.snippets import doc_block

    section = (REPO / "docs" / "notifications.md").read_text()
    example = doc_block("docs/notifications.md", "min_interval_s: 600")
    (tmp_path / "config.yaml").write_text(example)
    r = run_py(["-m", "daemon", "check-config", "--json", "--config", str(tmp_path / "config.yaml")], check=True)
    eff = json.loads(r.stdout)["effective"]["notify"]
    assert eff["urls"] == [{"url": "mailtos://smtp.example.org:587", "events": None},
                           {"url": "ntfys://ntfy.example.org", "events": ["gave_up", "disk_emergency"]}]
    assert eff["events"] == list(ALERT_EVENTS) and eff["min_interval_s"] == 600
    assert "app-password" not in r.stdout and "my-training-run" not in r.stdout
    plain = re.search(r"`(mailto://mail\.internal[^`]*)`", section).group(1)  # the plain SMTP form it names
    url = parse_config(yaml.safe_dump({"notify": {"urls": [plain]}}), tmp_path / "config.yaml").notify.urls[0]
    assert url.label == "mailto://mail.internal.example.org:25"
    for event in ALERT_EVENTS:  # every event is in the docs' table
        assert f"| `{event}` |" in section
