"""Prometheus metrics from a real daemon, scraped over real HTTP and parsed with prometheus_client's
own parser; the token that guards a server reachable from elsewhere; the node_exporter textfile."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import time
import urllib.error
import urllib.request

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from ckpt_daemon.config import load_config, parse_config
from ckpt_daemon.errors import ConfigError
from maintenance.cleanup import build_report, confirm_policy
from tests.helpers import PY, Daemon, fake_native, free_port, parse, scrape, wait_listening
from tests.snippets import doc_block

SLEEPER = [PY, "-c", "import time; time.sleep(3600)"]
TIERS = [{"count": 5}, {"count": 10, "every_steps": 200}, {"every_steps": 1000}]


def families(text: str) -> dict[str, str]:
    return {f.name: f.type for f in text_string_to_metric_families(text)}


def status_of(url: str, method: str = "GET", headers: dict | None = None) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method=method, headers=headers or {}), timeout=20) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code


@pytest.mark.slow
def test_metrics_of_a_running_daemon(tmp_path, daemons):  # noqa: F811
    ck = tmp_path / "checkpoints"
    for step in range(100, 3001, 100):
        fake_native(ck, step, payload=b"w" * (4096 * (1 + step // 1000)))
    port = free_port()
    textfile = tmp_path / "textfile"
    textfile.mkdir()
    d = Daemon(tmp_path, {"training": {"command": SLEEPER, "restart": {"initial_backoff_s": 0.2}},
                          "retention": {"tiers": TIERS},
                          "http": {"enabled": True, "port": port, "textfile": "textfile", "textfile_interval_s": 5}})
    cfg = load_config(d.cfg)
    confirm_policy(cfg, "test")
    plan = build_report(cfg, "dry run", unattended=True)
    tiers: dict[str, list] = {}
    for x in plan.decisions:
        tiers.setdefault(str(x.tier), []).append(plan.entries[x.name].bytes)
    victims = [x for x in plan.decisions if not x.keep]
    assert {k: len(v) for k, v in tiers.items()} == {"1": 5, "2": 10, "3": 15} and victims
    d.start()
    daemons.append(d)
    d.wait(lambda s: s["training"]["state"] == "running" and s["disk"].get("free_bytes"), what="running, disk checked")
    url = f"http://127.0.0.1:{port}/metrics"
    text = scrape(url)
    m = parse(text)
    types = families(text)
    # names and types follow Prometheus conventions
    assert types["ckpt_daemon_training_restarts"] == "counter" and types["ckpt_daemon_training_crashes"] == "counter"
    assert types["ckpt_daemon_disk_free_bytes"] == "gauge" and types["ckpt_daemon_job_runs"] == "counter"
    assert all(n.startswith(("ckpt_daemon_", "process_", "python_")) for n in types)
    assert "# HELP ckpt_daemon_retention_tier_checkpoints " in text
    assert m[("ckpt_daemon_training_up", ())] == 1
    assert m[("ckpt_daemon_training_state", (("state", "running"),))] == 1
    assert m[("ckpt_daemon_training_restarts_total", ())] == 0
    for tier, sizes in tiers.items():
        assert m[("ckpt_daemon_retention_tier_checkpoints", (("run", ""), ("tier", tier)))] == len(sizes)
        assert m[("ckpt_daemon_retention_tier_bytes", (("run", ""), ("tier", tier)))] == sum(sizes)
    assert m[("ckpt_daemon_retention_tier_checkpoints", (("run", ""), ("tier", "none")))] == 0
    assert m[("ckpt_daemon_retention_planned_deletions", (("run", ""),))] == len(victims)
    assert m[("ckpt_daemon_retention_planned_free_bytes",
              (("run", ""),))] == sum(plan.entries[v.name].freeable_bytes for v in victims)
    assert m[("ckpt_daemon_retention_held_deletions", (("run", ""),))] == 0
    assert m[("ckpt_daemon_retention_policy_confirmed", ())] == 1
    assert m[("ckpt_daemon_checkpoints", (("run", ""), ("status", "complete")))] == 30
    assert m[("ckpt_daemon_checkpoint_last_step", (("run", ""),))] == 3000
    assert m[("ckpt_daemon_checkpoint_last_size_bytes", (("run", ""),))] == plan.entries["checkpoint-3000"].bytes
    assert 0 <= m[("ckpt_daemon_checkpoint_last_age_seconds", (("run", ""),))] < 120
    usage = shutil.disk_usage(ck)
    assert m[("ckpt_daemon_disk_total_bytes", ())] == usage.total
    assert abs(m[("ckpt_daemon_disk_free_bytes", ())] - usage.free) < 2**30
    assert m[("ckpt_daemon_job_last_result", (("job", "disk"),))] == 1
    assert m[("ckpt_daemon_job_last_duration_seconds", (("job", "disk"),))] >= 0
    assert m[("ckpt_daemon_job_last_success_timestamp_seconds", (("job", "disk"),))] > time.time() - 120
    assert m[("ckpt_daemon_job_next_run_timestamp_seconds", (("job", "snapshot"),))] > time.time()
    assert m[("ckpt_daemon_config_error", ())] == 0 and m[("ckpt_daemon_verification_failures", ())] == 0
    assert m[("ckpt_daemon_snapshots", ())] == 0 and ("process_resident_memory_bytes", ()) in m
    # docs/metrics.md's example alerts use only what is served (a state label the daemon reports included)
    rules = yaml.safe_load(doc_block("docs/metrics.md", "alert: NoCheckpointFor30Minutes"))["groups"][0]["rules"]
    assert len(rules) == 4
    for rule in rules:
        for name in re.findall(r"\b(ckpt_daemon_\w+)", rule["expr"]):
            assert any(k[0] == name for k in m), (rule["alert"], name)
        for state in re.findall(r'state="(\w+)"', rule["expr"]):
            assert ("ckpt_daemon_training_state", (("state", state),)) in m, (rule["alert"], state)

    # a killed trainer: counted as a restart and a crash of its kind
    pid = d.status()["training"]["pid"]
    os.kill(pid, signal.SIGKILL)
    d.wait(lambda s: s["training"]["restarts"] == 1 and s["training"]["state"] == "running", what="the restart")
    m = parse(scrape(url))
    assert m[("ckpt_daemon_training_restarts_total", ())] == 1
    crashes = {k[1]: v for k, v in m.items() if k[0] == "ckpt_daemon_training_crashes_total"}
    assert sum(crashes.values()) == 1 and crashes == {(("kind", d.status()["training"]["last_crash"]["kind"]),): 1}
    assert m[("ckpt_daemon_training_last_crash_timestamp_seconds", ())] > time.time() - 60

    # the textfile: the same exposition for node_exporter, written atomically, without process metrics
    prom = textfile / "ckpt_daemon.prom"

    def rewritten_after_the_restart(_s):
        t = parse(prom.read_text()) if prom.exists() else {}
        return t if t.get(("ckpt_daemon_training_restarts_total", ())) == 1 and t.get(("ckpt_daemon_training_up",
                                                                                       ())) == 1 else None

    t = d.wait(rewritten_after_the_restart, timeout=30, what="the textfile, rewritten every 5 s")
    assert t[("ckpt_daemon_retention_tier_checkpoints", (("run", ""), ("tier", "2")))] == 10
    assert not any(k[0].startswith("process_") for k in t)
    assert sorted(p.name for p in textfile.iterdir()) == ["ckpt_daemon.prom"]  # no temp file left behind
    assert d.stop() == 0


@pytest.mark.slow
def test_a_token_guards_every_request_and_nothing_but_get_is_served(tmp_path, daemons):  # noqa: F811
    # A host that is not loopback needs a token (config validation); the server here binds to another
    # loopback address, never to a real interface, and requires the token all the same.
    with pytest.raises(ConfigError, match="http.token is required when http.host"):
        parse_config("http: {enabled: true, host: 0.0.0.0}\n", tmp_path / "config.yaml")
    token = "tok-" + "x7" * 12
    host = "127.0.0.2"
    port = free_port(host)
    d = Daemon(tmp_path, {"training": {"command": SLEEPER}, "http": {"enabled": True, "host": host, "port": port,
                                                                    "token": token}})
    d.start()
    daemons.append(d)
    d.wait(lambda s: s["training"]["state"] == "running", what="running")
    base = f"http://{host}:{port}"
    deadline = time.monotonic() + 20
    while True:  # the server starts right after the jobs
        try:
            socket.create_connection((host, port), timeout=1).close()
            break
        except OSError:
            assert time.monotonic() < deadline, d.output()[-2000:]
            time.sleep(0.1)
    for path in ("/metrics", "/", "/api/status", "/api/dashboard", "/static/app.js"):
        assert status_of(base + path) == 401, path
        assert status_of(base + path, headers={"Authorization": "Bearer " + "y" * 28}) == 401, path
    assert status_of(base + "/metrics", headers={"Authorization": f"Bearer {token}"}) == 200
    assert status_of(f"{base}/api/status?token={token}") == 200
    # ?token= once on the page: a redirect that drops it from the address, and a cookie from then on
    req = urllib.request.Request(f"{base}/?token={token}")
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor())
    with opener.open(req, timeout=20) as r:
        assert r.status == 200 and r.url == base + "/" and b"app.js" in r.read()
    with opener.open(base + "/api/dashboard", timeout=20) as r:
        assert r.status == 200
    for method in ("POST", "PUT", "DELETE", "PATCH"):
        assert status_of(base + "/api/dashboard", method, headers={"Authorization": f"Bearer {token}"}) == 405
    assert status_of(base + "/" + "a" * 5000, headers={"Authorization": f"Bearer {token}"}) == 414
    # idle connections cannot pile up: past the server's cap the oldest are closed at once (and each is
    # closed at the head deadline anyway), and meanwhile a scrape is answered (tests/test_http_deadlines.py)
    from daemon.httpserver import MAX_OPEN

    idle = [socket.create_connection((host, port), timeout=5) for _ in range(MAX_OPEN + 16)]
    try:
        assert status_of(base + "/metrics", headers={"Authorization": f"Bearer {token}"}) == 200
        for s in idle[:16]:  # the oldest: closed by the server, without a word
            assert s.recv(64) == b""
    finally:
        for s in idle:
            s.close()
    deadline = time.monotonic() + 10
    while status_of(base + "/metrics", headers={"Authorization": f"Bearer {token}"}) != 200:
        assert time.monotonic() < deadline, "the server did not recover after the idle connections closed"
        time.sleep(0.1)
    assert d.proc.poll() is None and d.stop() == 0
    assert token not in d.log() and token not in d.output()  # a secret is never logged


@pytest.mark.slow
def test_metrics_and_status_carry_the_loss_the_step_rate_and_the_memory_checkpoints(tmp_path, tmpfs, daemons):  # noqa: F811
    import json
    import re

    from tests.helpers import read_losses, run_py

    region = tmpfs("64m") / "region"
    port = free_port()
    d = Daemon(tmp_path, {"checkpoints": {"memory": {"enabled": True, "every_steps": 10, "persist_every": 2,
                                                     "dir": str(region)}},
                          "trainer": {"checkpoint_every_steps": 100000, "eval_every_steps": 10},
                          "http": {"enabled": True, "port": port}}).start()
    daemons.append(d)
    d.wait(lambda s: s["training"].get("steps_per_s") and ((s.get("memory") or {}).get("last_persist") or {}).get("step"),
           what="training with a step rate and a persisted memory checkpoint")
    wait_listening(port)
    text = scrape(f"http://127.0.0.1:{port}/metrics")
    assert len(re.findall("loss", text, re.I)) > 0
    m = parse(text)
    loss, at = m[("ckpt_daemon_training_metric", (("name", "loss"),))], m[("ckpt_daemon_training_metric_step",
                                                                           (("name", "loss"),))]
    assert read_losses(tmp_path / "logs" / "metrics.jsonl")[int(at)] == loss  # the trainer's own number, at its step
    val_at = m[("ckpt_daemon_training_metric_step", (("name", "val_loss"),))]
    assert val_at % 10 == 0 and ("ckpt_daemon_training_metric", (("name", "val_loss"),)) in m
    assert m[("ckpt_daemon_training_steps_per_second", ())] > 0
    assert m[("ckpt_daemon_memory_active", ())] == 1 and m[("ckpt_daemon_memory_persists_total", ())] >= 1
    assert m[("ckpt_daemon_memory_slot_step", ())] >= m[("ckpt_daemon_memory_persisted_step", ())] >= 10
    assert m[("ckpt_daemon_memory_pinned_slots", ())] == 0
    r = run_py(["-m", "daemon", "status", "--config", str(d.cfg)])
    lines = r.stdout.splitlines()
    assert re.search(r" · loss \d", lines[0]), lines[0]
    mem = [x for x in lines if x.startswith("memory:")]
    assert len(mem) == 1 and re.match(r"memory: +newest slot step \d+ \(.*\); persisted up to step \d+ \(\d+ persists",
                                      mem[0]), r.stdout
    assert any(re.match(r"metrics: +.*loss \d", x) for x in lines), r.stdout
    j = json.loads(run_py(["-m", "daemon", "status", "--config", str(d.cfg), "--json"]).stdout)
    assert j["memory"]["pinned_steps"] == [] and j["training"]["metrics"]["loss"]["step"] >= 1
    assert d.stop() == 0


USER_SCRIPT = """
import time
import ckpt_daemon

hb = ckpt_daemon.Heartbeat(every_s=0.2)
step = 0
while True:
    step += 1
    hb.beat(step)
    extra = {"eval_accuracy": step / 1000} if step % 10 == 0 else {}
    # names and values that are not metrics: never shown
    hb.metrics(step, loss=2.0 / step, lr=1e-3, **extra, **{"bad name<b>": 1.0, "x" * 65: 1.0, "diverged": float("nan"),
                                                          "flag": True, "note": "text"})
    time.sleep(0.02)
"""


@pytest.mark.slow
def test_the_metrics_of_a_users_own_script_reach_status_and_metrics(tmp_path, daemons):  # noqa: F811
    import re

    from tests.helpers import run_py

    script = tmp_path / "train.py"
    script.write_text(USER_SCRIPT)
    port = free_port()
    d = Daemon(tmp_path, {"training": {"command": [PY, str(script)]}, "http": {"enabled": True, "port": port}}).start()
    daemons.append(d)
    d.wait(lambda s: s["training"].get("steps_per_s") and "eval_accuracy" in (s["training"].get("metrics") or {}),
           what="the script's heartbeat and metrics lines")
    wait_listening(port)
    m = parse(scrape(f"http://127.0.0.1:{port}/metrics"))
    names = {dict(k[1])["name"] for k in m if k[0] == "ckpt_daemon_training_metric"}
    assert names == {"loss", "lr", "eval_accuracy"}
    step = m[("ckpt_daemon_training_metric_step", (("name", "loss"),))]
    assert m[("ckpt_daemon_training_metric", (("name", "loss"),))] == 2.0 / step
    assert m[("ckpt_daemon_training_metric_step", (("name", "eval_accuracy"),))] % 10 == 0
    assert m[("ckpt_daemon_training_steps_per_second", ())] > 0
    r = run_py(["-m", "daemon", "status", "--config", str(d.cfg)])
    line = next(x for x in r.stdout.splitlines() if x.startswith("metrics:"))
    assert re.search(r"eval_accuracy [\d.]+ \(step \d+0\)", line) and "bad name" not in r.stdout, r.stdout
    assert d.stop() == 0
