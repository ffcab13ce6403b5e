"""Off-machine replicas: against a real S3 server (SeaweedFS, started by the `server` fixture on free
loopback ports), with real kills of the daemon and of the server, altered remote objects, wrong
credentials, an unreachable target and a local checkpoint folder deleted under a running daemon."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import threading
import time
import uuid
from pathlib import Path

import pytest
import yaml

from ckpt_daemon import runtime
from ckpt_daemon.config import load_config, parse_config
from ckpt_daemon.errors import ConfigError
from ckpt_daemon.fsutil import default_checksum, digest_record, hash_file
from ckpt_daemon.remote import download, listing, source, upload
from ckpt_daemon.remote import format as fmt
from ckpt_daemon.remote.errors import LocalChanged, RemoteAuthError, RemoteIntegrityError, RemoteSetupError
from ckpt_daemon.remote.store import FolderStore, Throttle, open_store
from ckpt_daemon.remote.target import Credentials, CredentialsError, parse_url, read_credentials_file
from ckpt_daemon.store import catalog as cat
from ckpt_daemon.store import manifest as mf
from daemon import replicaview
from daemon.replicate import TargetWorker, lag, select
from tests.helpers import PY, Daemon, Receiver, deep_merge, run_py
from tests.seaweed import Seaweed, why_unavailable

MIB = 1 << 20


# ------------------------------------------------------------------------------------------ helpers
@pytest.fixture(scope="module")
def server(tmp_path_factory):
    why = why_unavailable()
    if why:
        pytest.skip(why)
    s = Seaweed(tmp_path_factory.mktemp("seaweed")).start()
    yield s
    s.stop()


@pytest.fixture
def bucket(server) -> str:
    name = f"t{uuid.uuid4().hex[:16]}"
    server.make_bucket(name)
    return name


def s3(server, url: str, secret: str | None = None, attempts: int = 6):
    return open_store(parse_url(url), server.endpoint, None,
                      Credentials(server.access_key, secret or server.secret_key), attempts=attempts)


def native_ckpt(root: Path, step: int, nbytes: int = 64 << 10, seed: int = 0) -> Path:
    """A native checkpoint (model.safetensors of raw bytes, state.json, manifest.json last), no torch."""
    d = root / f"checkpoint-{step}"
    tmp = root / f".tmp-{step}"
    tmp.mkdir(parents=True)
    payload = hashlib.shake_256(f"{seed}-{step}".encode()).digest(nbytes)
    header = json.dumps({"w": {"dtype": "U8", "shape": [nbytes], "data_offsets": [0, nbytes]}}).encode()
    (tmp / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + payload)
    (tmp / "state.json").write_text(json.dumps({"step": step}))
    algo = default_checksum()
    files = {n: {"size": (tmp / n).stat().st_size, **digest_record(algo, hash_file(tmp / n, algo))}
             for n in ("model.safetensors", "state.json")}
    (tmp / mf.MANIFEST).write_text(json.dumps(mf.build_manifest(step, files, metrics={"val_loss": 100.0 / step})))
    os.rename(tmp, d)
    return d


def scan(root: Path):
    return cat.scan(root, ["checkpoint-{step}", "epoch={epoch}-step={step}.ckpt", "model_step_{step}.pt"],
                    best_metric="val_loss", now=time.time() + 3600)


def flip(p: Path, where: float = 0.5) -> None:
    with open(p, "r+b") as f:
        n = os.fstat(f.fileno()).st_size
        f.seek(int(n * where))
        b = f.read(1)
        f.seek(int(n * where))
        f.write(bytes([b[0] ^ 0x40]))


def replica_cfg(tmp_path: Path, url: str, **extra) -> dict:
    return {"checkpoints": {"dir": str(tmp_path / "checkpoints"), "settle_s": 1},
            "replicas": [{"url": url, **extra}]}


# --------------------------------------------------------------------------------- config (no server)
@pytest.mark.parametrize("text,needle", [
    ("replicas: [{url: 'http://host/x'}]", "'http' is not a supported replica scheme"),
    ("replicas: [{url: 's3://AKIAX:secret@bucket/x'}]", "credentials never go in config.yaml"),
    ("replicas: [{url: s3://bucket/x, endpoint_url: 'http://key:secret@h:1'}]", "credentials never go in config.yaml"),
    ("replicas: [{url: s3://b/x}]", "is not a valid S3 bucket name"),
    ("replicas: [{url: s3://bucket/../x}]", "unusual part"),
    ("replicas: [{url: s3://bucket/x, retention: {mode: own}}]", "replicas[0].retention.tiers is required"),
    ("replicas: [{url: s3://bucket/x, retention: [{every_steps: 3}, {count: 3}]}]",
     "replicas[0].retention.tiers[0].count is missing"),
    ("replicas: [{url: s3://bucket/x, include: [latest, nope]}]", "replicas[0].include[1]"),
    ("replicas: [{url: s3://bucket/x, includ: [latest]}]", "did you mean 'include'"),
    ("replicas: [{url: s3://bucket/x, aws_secret_access_key: abc}]", "is not a known key"),
    ("replicas: [{url: s3://bucket/x, part_size_mb: 4}]", "part_size_mb"),
    ("replicas: [{url: s3://bucket/x, include: [], every_steps: null}]", "nothing would be copied"),
    ("replicas: [{url: /srv/r, endpoint_url: 'http://h:1'}]", "is a folder, so endpoint_url"),
    ("checkpoints: {dir: ck}\nreplicas: [{url: ck/copies}]", "overlaps checkpoints.dir"),
    ("replicas: [{url: s3://bucket/x}, {url: 's3://bucket/x/'}]", "names the same target as replicas[0]"),
])
def test_a_bad_replicas_section_is_refused_with_the_field_and_the_fix(tmp_path, text, needle):
    with pytest.raises(ConfigError) as ei:
        parse_config(text, tmp_path / "config.yaml")
    assert needle in str(ei.value) and "\n" not in str(ei.value)
    assert "AKIAX" not in str(ei.value) and "key:secret" not in str(ei.value)  # a key put in the url is not repeated


def test_the_interface_of_the_issue_parses(tmp_path):
    cfg = parse_config(yaml.safe_dump({"replicas": [
        {"url": "s3://bucket/run1", "endpoint_url": "http://127.0.0.1:8333", "credentials_file": "/etc/ckpt-daemon/s3.env",
         "include": ["latest", "best"], "within_s": 600},
        {"url": "../replicas", "retention": "keep_all"}]}), tmp_path / "proj" / "config.yaml")
    a, b = cfg.replicas
    assert cfg.replica_target(a).bucket == "bucket" and cfg.replica_target(a).prefix == "run1"
    assert a.retention.mode == "same" and a.restore_on_empty and a.within_s == 600
    assert cfg.replica_target(b).folder == tmp_path / "replicas" and b.retention.mode == "keep_all"


def test_credentials_file_is_read_strictly_and_never_echoed(tmp_path):
    p = tmp_path / "s3.env"
    p.write_text("# keys\nexport AWS_ACCESS_KEY_ID=AKIDEXAMPLE\nAWS_SECRET_ACCESS_KEY='s3cr3t-value'\nOTHER=1\n")
    p.chmod(0o644)
    creds, warnings = read_credentials_file(p)
    assert (creds.access_key, creds.secret_key) == ("AKIDEXAMPLE", "s3cr3t-value")
    assert "s3cr3t" not in repr(creds) and "s3cr3t" not in str(creds)
    assert warnings and "chmod 600" in warnings[0]
    p.chmod(0o600)
    assert read_credentials_file(p)[1] == []
    for text, needle in [("AWS_ACCESS_KEY_ID=x\n", "no AWS_SECRET_ACCESS_KEY"),
                         ("AWS_ACCESS_KEY_ID=x\nAWS_SECRET_ACCESS_KEY=a b\n", "spaces or control characters"),
                         ("this is not it s3cr3t\n", "is not NAME=value"), ("x" * (70 << 10), "larger than")]:
        p.write_text(text)
        with pytest.raises(CredentialsError) as ei:
            read_credentials_file(p)
        assert needle in str(ei.value) and "s3cr3t" not in str(ei.value)
    (tmp_path / "link").symlink_to(p)
    with pytest.raises(CredentialsError, match="symlink"):
        read_credentials_file(tmp_path / "link")


# --------------------------------------------------------------------------------- pure decisions
def _rec(**kw):
    base = {"size": 3, "algo": "blake3", "digest": "a" * 64, "part_size": 3, "server": {"sha256": None, "etag": ""}}
    return {**base, **kw}


@pytest.mark.parametrize("mutate,needle", [
    (lambda m: m.update(format="other"), "unknown format"),
    (lambda m: m.update(name="checkpoint-2"), "lies under"),
    (lambda m: m.update(step=-1), "no valid step"),
    (lambda m: m.update(files={"../../etc/passwd": _rec()}), "unsafe file path"),
    (lambda m: m.update(files={"/abs": _rec()}), "unsafe file path"),
    (lambda m: m.update(files={"a": _rec(size="3")}), "no valid size"),
    (lambda m: m.update(files={"a": _rec(algo="md5")}), "unknown checksum algorithm"),
    (lambda m: m.update(files={"a": _rec(server={"sha256": "nope"})}), "no valid server checksum"),
    (lambda m: m.update(layout="file"), "single-file checkpoint has one file"),
    (lambda m: m.update(metrics=[1]), "metrics of the wrong type"),
], ids=["format", "name", "step", "relative-path", "absolute-path", "size", "algo", "server-checksum",
        "layout", "metrics"])  # fixed ids: a lambda's id differs between xdist workers
def test_a_hostile_remote_manifest_is_refused_with_its_reason(mutate, needle):
    m = {"format": fmt.FORMAT, "name": "checkpoint-1", "step": 1, "layout": "native", "files": {"a": _rec()}}
    fmt.parse(json.dumps(m).encode(), "checkpoint-1")
    mutate(m)
    with pytest.raises(ValueError, match=needle.replace("(", r"\(")):
        fmt.parse(json.dumps(m).encode(), "checkpoint-1")
    with pytest.raises(ValueError, match="nested too deeply"):
        fmt.parse(b"[" * 100_000, "checkpoint-1")


def test_select_and_lag(tmp_path):
    root = tmp_path / "ck"
    for s in (100, 200, 300, 400):
        native_ckpt(root, s)
    runtime.pin(root, "checkpoint-100", "paper")
    c = scan(root)
    assert select(c, ["latest"], None) == {"checkpoint-400": ["latest"]}
    assert select(c, ["pinned"], 200) == {"checkpoint-100": ["pinned"], "checkpoint-200": ["step a multiple of 200"],
                                          "checkpoint-400": ["step a multiple of 200"]}
    assert set(select(c, ["all"], None)) == {f"checkpoint-{s}" for s in (100, 200, 300, 400)}
    assert select(c, ["snapshots"], None, {"checkpoint-300", "checkpoint-999"}) == {"checkpoint-300": ["in a snapshot"]}
    c.by_name("checkpoint-200").epoch_end, c.by_name("checkpoint-200").epoch = True, 1
    assert select(c, ["epoch_ends", "best"], None) == {"checkpoint-200": ["end of epoch 1"], "checkpoint-400": ["best"]}
    want = select(c, ["latest", "pinned"], None)
    # the target holds 200 only: 300 and 400 were each the latest once, so the lag counts from 300's birth
    m300 = c.by_name("checkpoint-300").mtime
    got = lag(c, want, {"checkpoint-200"}, 200, ["latest", "pinned"], {})
    assert got["lag_steps"] == 200 and got["behind_since"] == min(m300, c.by_name("checkpoint-100").mtime)
    assert got["pending"] == ["checkpoint-100", "checkpoint-400"]
    assert lag(c, want, {"checkpoint-100", "checkpoint-400"}, 400, ["latest", "pinned"], {})["behind_since"] is None
    assert lag(c, {"checkpoint-100": ["pinned"]}, set(), None, ["pinned"], {"checkpoint-100": 7})["bytes_pending"] == 7


def test_the_bandwidth_cap_paces_the_bytes():
    now = [0.0]
    slept = []

    class Ev(threading.Event):
        def wait(self, t=None):
            slept.append(t)
            now[0] += t
            return False

    th = Throttle(1e6, Ev(), clock=lambda: now[0])
    for _ in range(40):
        th.take(256 << 10)  # 10 MiB at 1 MB/s, a one-second burst allowed
    assert 9.0 <= now[0] <= 10.5, now[0]
    th.cancel.set()
    with pytest.raises(Exception, match="cancelled"):
        th.take(1)


def test_status_verdict_and_metrics_show_the_lag():
    from daemon.metrics import DaemonCollector, exposition, make_registry
    from daemon.statusview import render, verdict

    now = 10_000.0
    rep = {"url": "s3://b/run1", "replicas": 3, "newest": {"name": "checkpoint-200", "step": 200, "created": now - 900},
           "lag_steps": 300, "behind_since": now - 700, "bytes_pending": 5 << 20, "within_s": 600,
           "last_success": now - 650, "uploaded_bytes": 123,
           "last_error": {"time": now - 30, "kind": "unreachable", "message": "s3://b/run1 could not be reached"},
           "damaged": {"checkpoint-100": "corrupt: model.safetensors was replaced"}}
    s = {"training": {"state": "running"}, "checkpoints": {}, "replicas": [rep]}
    level, line = verdict(s, True, now)
    assert level == "warn" and "replica BEHIND 11.7m" in line
    text = "\n".join(x for _, x in render(s, True, now))
    assert "BEHIND by 300 steps, 11.7m" in text and "5.0 MiB pending" in text and "could not be reached" in text
    assert "DAMAGED replica checkpoint-100" in text
    out = exposition(make_registry(DaemonCollector(lambda: s, lambda: None, clock=lambda: now))).decode()
    assert 'ckpt_daemon_replica_lag_seconds{replica="s3://b/run1"} 700.0' in out
    assert 'ckpt_daemon_replica_lag_steps{replica="s3://b/run1"} 300.0' in out
    assert 'ckpt_daemon_replica_behind{replica="s3://b/run1"} 1.0' in out
    assert 'ckpt_daemon_replica_pending_bytes{replica="s3://b/run1"} 5.24288e+06' in out
    assert 'ckpt_daemon_replica_damaged{replica="s3://b/run1"} 1.0' in out
    up = dict(rep, behind_since=None, last_error=None, damaged={})
    assert replicaview.verdict_part([up], now) is None


# --------------------------------------------------------------------------------- a real server
@pytest.mark.slow
def test_every_layout_replicates_verified_and_restores_byte_identical(tmp_path, server, bucket):
    from tests.helpers import hf_folder, native, record_all, single_file

    root = tmp_path / "ck"
    root.mkdir()
    native(root, [10])
    hf_folder(root, 20)
    single_file(root, "epoch=0-step=30.ckpt")
    single_file(root, "model_step_40.pt")
    native_ckpt(root, 50, nbytes=12 * MIB)  # multipart: 3 parts of 5 MiB
    record_all(root)
    c = scan(root)
    assert [(e.name, e.layout, e.valid) for e in c.entries] == [
        ("checkpoint-10", "native", True), ("checkpoint-20", "hf", True), ("epoch=0-step=30.ckpt", "file", True),
        ("model_step_40.pt", "file", True), ("checkpoint-50", "native", True)]
    store = s3(server, f"s3://{bucket}/run1")
    t = upload.Transfer(parallel=2, part_size=5 * MIB)
    for e in c.entries:
        _, did = upload.upload_checkpoint(store, source.from_entry(e), t)
        assert did
    rc = listing.scan_remote(store)
    assert [(r.name, r.step, r.status) for r in rc.replicas] == [
        ("checkpoint-10", 10, "complete"), ("checkpoint-20", 20, "complete"), ("epoch=0-step=30.ckpt", 30, "complete"),
        ("model_step_40.pt", 40, "complete"), ("checkpoint-50", 50, "complete")]
    big = rc.by_name("checkpoint-50").manifest["files"]["model.safetensors"]
    assert big["part_size"] == 5 * MIB and big["server"]["sha256"].endswith("-3")  # the server's composite checksum
    assert all(listing.verify_replica(store, r).valid for r in rc.replicas)
    # the remote manifest is the commit marker: it was written after every file
    for r in rc.replicas:
        marker = next(o for o in rc.objects[r.name] if o.key.endswith(fmt.MARKER))
        assert all(o.mtime <= marker.mtime for o in rc.objects[r.name])
    # a second pass uploads nothing
    assert not any(upload.upload_checkpoint(store, source.from_entry(e), t)[1] for e in c.entries)
    out = tmp_path / "out"
    out.mkdir()
    for r in rc.replicas:
        download.restore_one(store, r.manifest, out, t)
    c2 = scan(out)
    assert [(e.name, e.layout, e.status, e.recorded) for e in cat.scan(out, [
        "checkpoint-{step}", "epoch={epoch}-step={step}.ckpt", "model_step_{step}.pt"], verify=True,
        now=time.time() + 3600).entries] == [(e.name, e.layout, "complete", e.layout != "native") for e in c.entries]
    for e in c.entries:
        files = sorted(p for p in e.path.rglob("*") if p.is_file()) if e.path.is_dir() else [e.path]
        for p in files:
            assert (out / p.relative_to(root)).read_bytes() == p.read_bytes()
    assert not os.listdir(out / runtime.STATE_DIR / "tmp")  # no scratch left behind
    assert [e.name for e in c2.valid()] == [e.name for e in c.entries]


@pytest.mark.slow
def test_every_part_carries_a_checksum_the_server_checks(tmp_path, server, bucket):
    native_ckpt(tmp_path, 7, nbytes=11 * MIB)
    store = s3(server, f"s3://{bucket}/p")
    real = store.upload_part

    def damaged_on_the_wire(key, uid, number, offset, data, sha256, throttle):
        bad = bytearray(data)
        bad[100] ^= 1
        return real(key, uid, number, offset, memoryview(bad), sha256, throttle)

    store.upload_part = damaged_on_the_wire
    with pytest.raises(RemoteIntegrityError, match="did not match their checksum"):
        upload.upload_checkpoint(store, source.from_entry(scan(tmp_path).entries[0]), upload.Transfer(1, 5 * MIB))
    assert listing.scan_remote(store).replicas == []  # no replica exists


def test_local_damage_is_never_uploaded(tmp_path, server, bucket):
    native_ckpt(tmp_path, 8, nbytes=11 * MIB)
    e = scan(tmp_path).entries[0]
    assert e.valid  # sizes match: only reading every byte finds it
    flip(e.path / "model.safetensors", 0.95)  # in the last part: every part was sent before the mismatch shows
    store = s3(server, f"s3://{bucket}/p")
    with pytest.raises(LocalChanged, match="fails its recorded"):
        upload.upload_checkpoint(store, source.from_entry(e), upload.Transfer(2, 5 * MIB))
    rc = listing.scan_remote(store)
    assert rc.replicas == [] and store.open_uploads("p/") == []  # aborted, nothing looks complete


@pytest.mark.slow
def test_parts_in_memory_are_bounded_and_uploads_hold_no_lock(tmp_path, server, bucket, monkeypatch):
    import weakref

    native_ckpt(tmp_path, 9, nbytes=26 * MIB)
    store = s3(server, f"s3://{bucket}/p")
    real, real_buffer = store.upload_part, upload._buffer
    bufs, peak, lock_free = [], [0], []
    mu = threading.Lock()

    def live() -> int:  # part buffers read and not yet given back
        return sum(1 for r in bufs if (b := r()) is not None and not b.closed)

    def tracked(n):
        buf = real_buffer(n)
        with mu:
            bufs.append(weakref.ref(buf))
            peak[0] = max(peak[0], live())
        return buf

    def checking(*a):
        with runtime.commit_lock(tmp_path, timeout_s=2):  # a save could commit right now
            lock_free.append(True)
        return real(*a)

    monkeypatch.setattr(upload, "_buffer", tracked)
    store.upload_part = checking
    t = upload.Transfer(parallel=2, part_size=5 * MIB, throttle=Throttle(8e6))
    upload.upload_checkpoint(store, source.from_entry(scan(tmp_path).entries[0]), t)
    assert peak[0] == 2 and live() == 0 and len(lock_free) == 6


@pytest.mark.slow
def test_an_altered_remote_object_is_caught_and_the_previous_replica_is_restored(tmp_path, server, bucket):
    root = tmp_path / "checkpoints"
    for s in (100, 200):
        native_ckpt(root, s)
    cfgp = tmp_path / "config.yaml"
    creds = server.credentials_file(tmp_path / "s3.env")
    cfgp.write_text(yaml.safe_dump({"checkpoints": {"dir": "checkpoints"}, "replicas": [
        {"url": f"s3://{bucket}/run1", "endpoint_url": server.endpoint, "credentials_file": str(creds)}]}))
    store = s3(server, f"s3://{bucket}/run1")
    t = upload.Transfer(2, 5 * MIB)
    for e in scan(root).entries:
        upload.upload_checkpoint(store, source.from_entry(e), t)
    # someone rewrites a file of the newest replica in the bucket (same size, other bytes)
    key = f"run1/{fmt.data_key('checkpoint-200', 'model.safetensors')}"
    data = bytearray(server.client().get_object(Bucket=bucket, Key=key)["Body"].read())
    data[-10] ^= 0xFF
    server.client().put_object(Bucket=bucket, Key=key, Body=bytes(data))
    r = run_py(["-m", "daemon", "list", "--remote", "--json", "--config", str(cfgp)])
    assert r.returncode == 1, r.stderr
    doc = json.loads(r.stdout)
    assert [(e["name"], e["step"], e["status"]) for e in doc["checkpoints"]] == [
        ("checkpoint-100", 100, "complete"), ("checkpoint-200", 200, "corrupt")]
    assert "replaced on the server after the upload" in doc["checkpoints"][1]["reason"]
    shutil.rmtree(root)  # the local disk is gone
    r = run_py(["-m", "daemon", "restore", "--from", f"s3://{bucket}/run1", "--config", str(cfgp)])
    assert r.returncode == 0, r.stdout + r.stderr
    assert "restored checkpoint-100" in r.stdout and "training will resume from checkpoint-100" in r.stdout
    assert [e.name for e in cat.scan(root, ["checkpoint-{step}"], verify=True).valid()] == ["checkpoint-100"]
    # asked for explicitly, the damaged one is refused, and nothing is committed
    r = run_py(["-m", "daemon", "restore", "--from", f"s3://{bucket}/run1", "200", "--config", str(cfgp)])
    assert r.returncode == 2 and "holds no complete replica named or at step '200'" in r.stdout + r.stderr
    # a replica altered so that the listing cannot tell (same ETag): its bytes are checked at restore
    upload.upload_checkpoint(store, source.from_entry(scan(root).entries[0]), t)  # (already there: nothing sent)
    rc = listing.scan_remote(store)
    m = dict(rc.by_name("checkpoint-100").manifest)
    m["files"] = {k: dict(v) for k, v in m["files"].items()}
    m["files"]["model.safetensors"]["server"] = {"sha256": None, "etag": ""}
    m["files"]["model.safetensors"]["digest"] = "0" * 64
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    with pytest.raises(download.ReplicaDamaged, match="does not verify"):
        download.restore_one(store, m, elsewhere, t)
    assert not (elsewhere / "checkpoint-100").exists()


def test_target_retention_and_leftovers_of_killed_uploads(tmp_path, server, bucket):
    cfgp = tmp_path / "config.yaml"
    creds = server.credentials_file(tmp_path / "s3.env")
    url = f"s3://{bucket}/run1"
    cfgp.write_text(yaml.safe_dump({"checkpoints": {"dir": "checkpoints"}, "replicas": [
        {"url": url, "endpoint_url": server.endpoint, "credentials_file": str(creds), "include": ["latest"],
         "retention": [{"count": 2}, {"every_steps": 200}]}]}))
    cfg = load_config(cfgp)
    root = cfg.checkpoint_dir
    store = s3(server, url)
    for s in (100, 200, 300, 400, 500):  # each was the latest once
        upload.upload_checkpoint(store, source.from_entry(scan(native_ckpt(root, s).parent).by_name(f"checkpoint-{s}")),
                                 upload.Transfer(1, 5 * MIB))
    # what killed uploads leave: a prefix without a remote manifest, and an unfinished multipart upload
    store.put_bytes("run1/checkpoint-50/data/model.safetensors", b"x" * 10)
    uid = store.start_upload("run1/checkpoint-60/data/model.safetensors", {})
    w = TargetWorker(url, lambda: cfg, threading.Event(), lambda: None, threading.Event())
    w.run_pass(cfg, cfg.replicas[0])
    rc = listing.scan_remote(store)
    # tiers: the newest 2 (500, 400), then one per 200 steps (200); the newest is protected anyway
    assert [r.name for r in rc.valid()] == ["checkpoint-200", "checkpoint-400", "checkpoint-500"]
    assert rc.in_progress == {} and store.open_uploads("run1/") == []
    assert "checkpoint-50" not in rc.objects and uid
    log = (cfg.log_dir / "cleanup.log").read_text()
    assert "replica retention of " + url in log and "deleted replica checkpoint-300 (step 300)" in log
    assert w.status["lag_steps"] == 0 and w.status["behind_since"] is None and w.status["replicas"] == 3
    # an edited own policy deletes only what the confirmed one deletes too, until a person confirms it
    cfgp.write_text(cfgp.read_text().replace("every_steps: 200", "every_steps: 400"))
    cfg2 = load_config(cfgp)
    w.run_pass(cfg2, cfg2.replicas[0])
    assert w.status["held"] == ["checkpoint-200"]
    assert [r.name for r in listing.scan_remote(store).valid()] == ["checkpoint-200", "checkpoint-400", "checkpoint-500"]
    from maintenance.cleanup import confirm_policy

    confirm_policy(cfg2, "test")  # what `python -m maintenance.cleanup` does once a person said yes
    w.run_pass(cfg2, cfg2.replicas[0])
    assert w.status["held"] == [] and [r.name for r in listing.scan_remote(store).valid()] == ["checkpoint-400",
                                                                                               "checkpoint-500"]


def test_wrong_credentials_and_a_missing_bucket_are_named_without_the_secret(server, bucket):
    bad = s3(server, f"s3://{bucket}/p", secret="wrong-secret-0123456789")
    with pytest.raises(RemoteAuthError) as ei:
        listing.scan_remote(bad)
    assert "refused the credentials" in str(ei.value) and "wrong-secret" not in str(ei.value)
    assert server.secret_key not in str(ei.value)
    with pytest.raises(RemoteSetupError, match="does not exist"):
        listing.scan_remote(s3(server, "s3://no-such-bucket-here/p"))


def test_a_folder_replica_round_trips_and_an_unmounted_one_is_refused(tmp_path):
    root = tmp_path / "ck"
    native_ckpt(root, 5, nbytes=11 * MIB)
    rep = tmp_path / "share"
    store = FolderStore(parse_url(str(rep)))
    with pytest.raises(RemoteSetupError, match="does not exist"):
        store.check()
    rep.mkdir()
    store.check()
    t = upload.Transfer(2, 5 * MIB)
    upload.upload_checkpoint(store, source.from_entry(scan(root).entries[0]), t)
    rc = listing.scan_remote(store)
    assert [(r.name, r.status) for r in rc.replicas] == [("checkpoint-5", "complete")]
    assert not list(rep.rglob("*.upload"))
    out = tmp_path / "out"
    out.mkdir()
    download.restore_one(store, rc.replicas[0].manifest, out, t)
    assert cat.scan(out, ["checkpoint-{step}"], verify=True).valid()[0].name == "checkpoint-5"
    flip(rep / "checkpoint-5" / "data" / "model.safetensors")
    assert listing.verify_replica(store, listing.scan_remote(store).replicas[0]).status == "corrupt"
    shutil.rmtree(out / "checkpoint-5")
    with pytest.raises(download.ReplicaDamaged):
        download.restore_one(store, rc.replicas[0].manifest, out, t)
    assert not (out / "checkpoint-5").exists()
    # a symlink planted in the replica folder is never written (or deleted) through
    native_ckpt(root, 9)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (rep / "checkpoint-9").symlink_to(elsewhere)
    with pytest.raises(RemoteSetupError, match="is a symlink"):
        upload.upload_checkpoint(store, source.from_entry(scan(root).by_name("checkpoint-9")), t)
    assert os.listdir(elsewhere) == []


# ------------------------------------------------------------------------------- real processes
def _wait(pred, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


SLEEPER = {"training": {"command": [PY, "-c", "import time; time.sleep(3600)"]}}


@pytest.mark.slow
def test_a_daemon_killed_mid_upload_leaves_no_replica_and_the_next_one_resumes(tmp_path, server, bucket, daemons):
    root = tmp_path / "checkpoints"
    e = native_ckpt(root, 300, nbytes=24 * MIB)
    size = sum(p.stat().st_size for p in e.iterdir())
    creds = server.credentials_file(tmp_path / "s3.env")
    rep = {"url": f"s3://{bucket}/run1", "endpoint_url": server.endpoint, "credentials_file": str(creds),
           "include": ["latest"], "part_size_mb": 5, "parallel": 1, "max_mb_per_s": 3}
    d = Daemon(tmp_path, deep_merge(SLEEPER, {"replicas": [rep]})).start()
    daemons.append(d)
    c = server.client()
    key = "run1/" + fmt.data_key("checkpoint-300", "model.safetensors")

    def parts_on_server():
        ups = [u for u in c.list_multipart_uploads(Bucket=bucket, Prefix="run1/").get("Uploads") or [] if u["Key"] == key]
        return ups and len(c.list_parts(Bucket=bucket, Key=key, UploadId=ups[0]["UploadId"]).get("Parts") or []) >= 2

    _wait(parts_on_server, 90, "two parts on the server")
    d.proc.send_signal(signal.SIGKILL)
    d.proc.wait()
    store = s3(server, f"s3://{bucket}/run1")
    rc = listing.scan_remote(store)
    assert rc.replicas == [] and [u[0] for u in store.open_uploads("run1/")] == [key]  # nothing looks complete
    r = run_py(["-m", "daemon", "list", "--remote", "--json", "--config", str(d.cfg)])
    assert json.loads(r.stdout)["checkpoints"] == []
    rep["max_mb_per_s"] = None
    d2 = Daemon(tmp_path, deep_merge(SLEEPER, {"replicas": [rep]})).start()
    daemons.append(d2)
    s = d2.wait(lambda s: s["replicas"] and s["replicas"][0]["replicas"] == 1 and s["replicas"][0]["state"] == "idle" and s,
                timeout=120, what="the replica")
    assert s["replicas"][0]["uploaded_bytes"] <= size - 10 * MIB  # the parts the server had were not sent again
    rc = listing.scan_remote(store)
    assert [r.status for r in rc.replicas] == ["complete"] and listing.verify_replica(store, rc.replicas[0]).valid
    assert rc.in_progress == {} and store.open_uploads("run1/") == []
    assert d2.stop() == 0


@pytest.mark.slow
def test_the_server_killed_mid_upload_then_back_the_upload_completes(tmp_path):
    why = why_unavailable()
    if why:
        pytest.skip(why)
    srv = Seaweed(tmp_path / "srv").start()
    try:
        srv.make_bucket("killed")
        native_ckpt(tmp_path / "ck", 1, nbytes=20 * MIB)
        store = open_store(parse_url("s3://killed/r"), srv.endpoint, None, Credentials(srv.access_key, srv.secret_key))
        t = upload.Transfer(parallel=1, part_size=5 * MIB, throttle=Throttle(4e6))
        src = source.from_entry(scan(tmp_path / "ck").entries[0])
        result: list = []
        th = threading.Thread(target=lambda: result.append(_attempt(store, src, t)))
        th.start()
        c = srv.client()
        _wait(lambda: c.list_multipart_uploads(Bucket="killed").get("Uploads"), 60, "an upload under way")
        time.sleep(1.5)
        srv.kill()  # SIGKILL mid-upload
        time.sleep(2)
        srv.start()  # same data, same ports; botocore's retries may ride it out
        th.join(120)
        real, sent = store.upload_part, []
        store.upload_part = lambda *a: sent.append(a[2]) or real(*a)
        for _ in range(3):  # else the daemon's next pass retries; here: by hand
            if result and result[-1] is True:
                break
            result.append(_attempt(store, src, upload.Transfer(parallel=2, part_size=5 * MIB)))
        assert result[-1] is True, result
        if len(result) > 1:  # botocore's own retries did not ride it out: the next attempt resumed
            parts = -(-src.files["model.safetensors"]["size"] // (5 * MIB))
            assert 1 not in sent and len(sent) < parts, sent
        rc = listing.scan_remote(store)
        assert [r.status for r in rc.replicas] == ["complete"] and listing.verify_replica(store, rc.replicas[0]).valid
    finally:
        srv.stop()


def _attempt(store, src, t):
    try:
        upload.upload_checkpoint(store, src, t)
        return True
    except Exception as exc:  # noqa: BLE001 (what the daemon's pass would log and retry)
        return f"{type(exc).__name__}: {exc}"


@pytest.mark.slow
def test_a_plain_script_replicates_after_an_unreachable_start_and_bad_credentials(tmp_path, daemons):
    """A torch.save script under the daemon; the target first down, then up with wrong keys, then right ones."""
    why = why_unavailable()
    if why:
        pytest.skip(why)
    srv = Seaweed(tmp_path / "srv")  # ports chosen, not started: unreachable
    hook = Receiver()  # a person's web hook: the lag is notified
    creds = tmp_path / "s3.env"
    creds.write_text(f"AWS_ACCESS_KEY_ID={srv.access_key}\nAWS_SECRET_ACCESS_KEY=wrong-secret-0123456789\n")
    creds.chmod(0o600)
    root = tmp_path / "checkpoints"
    d = Daemon(tmp_path, {"checkpoints": {"pattern": "model_step_{step}.pt", "settle_s": 1},
                          "training": {"command": [PY, str(Path(__file__).parent / "byo" / "plain_train.py"), str(root),
                                                   "--every", "50"]},
                          "replicas": [{"url": "s3://plain/run", "endpoint_url": srv.endpoint, "credentials_file": str(creds),
                                        "include": ["latest"], "within_s": 5, "restore_wait_s": 0}],
                          "notify": {"urls": [hook.url()], "events": ["replica_lag"]}}).start()
    daemons.append(d)
    try:
        s = d.wait(lambda s: (s["replicas"][0].get("last_error") or {}).get("kind") == "unreachable" and s, 90,
                   "the unreachable target in status")
        d.wait(lambda s: (s["checkpoints"]["latest"] or {}).get("step", 0) >= 200, 90, "training going on meanwhile")
        d.wait(lambda s: replicaview.late(s["replicas"][0], time.time()), 60, "the lag alert")
        note = hook.wait(lambda got: got and got[0], 60, "the lag notification")
        assert "replication to s3://plain/run is" in note["title"] and "behind" in note["title"]
        assert "event: replica_lag" in note["message"] and "exist only on this machine" in note["message"]
        assert "replica BEHIND" in run_py(["-m", "daemon", "status", "--config", str(d.cfg)]).stdout
        srv.start()
        srv.make_bucket("plain")
        s = d.wait(lambda s: (s["replicas"][0].get("last_error") or {}).get("kind") == "credentials" and s, 60,
                   "the credentials error")
        assert "refused the credentials" in s["replicas"][0]["last_error"]["message"]
        creds.write_text(f"AWS_ACCESS_KEY_ID={srv.access_key}\nAWS_SECRET_ACCESS_KEY={srv.secret_key}\n")
        s = d.wait(lambda s: s["replicas"][0]["replicas"] >= 1 and s["replicas"][0]["last_error"] is None and s, 90,
                   "a replica once the keys are right")
        rc = listing.scan_remote(open_store(parse_url("s3://plain/run"), srv.endpoint, None,
                                            Credentials(srv.access_key, srv.secret_key)))
        assert rc.valid() and all(r.manifest["layout"] == "file" for r in rc.valid())
        log = d.log()
        assert '"level": "error"' in log and "replication is behind beyond replicas[].within_s" in log
        assert "wrong-secret" not in log + d.output() and srv.secret_key not in log + d.output()
        assert d.stop() == 0
    finally:
        srv.stop()
        hook.close()


@pytest.mark.slow
def test_the_checkpoint_folder_deleted_under_training_is_restored_from_the_replica_at_the_next_start(tmp_path, server,
                                                                                                      bucket, daemons):
    creds = server.credentials_file(tmp_path / "s3.env")
    rep = {"url": f"s3://{bucket}/run1", "endpoint_url": server.endpoint, "credentials_file": str(creds),
           "include": ["latest"], "retention": "keep_all"}
    d = Daemon(tmp_path, {"replicas": [rep]}).start()
    daemons.append(d)
    d.wait(lambda s: s["replicas"][0]["replicas"] >= 2, 120, "two replicas")
    root = tmp_path / "checkpoints"
    hb = runtime.read_heartbeat(root) or {}
    shutil.rmtree(root, ignore_errors=True)  # a colleague's rm -rf, while training runs (and writes on)
    d.proc.send_signal(signal.SIGKILL)  # and the machine goes down
    d.proc.wait()
    for pid in [hb.get("pid"), *[p for p in [d.status().get("training", {}).get("pid")] if p]]:
        if pid:
            runtime.kill_tree(pid, signal.SIGKILL)
    shutil.rmtree(root, ignore_errors=True)
    newest = listing.scan_remote(s3(server, f"s3://{bucket}/run1")).newest_valid()
    d2 = Daemon(tmp_path, {"replicas": [rep]}).start()
    daemons.append(d2)
    s = d2.wait(lambda s: s["training"]["state"] == "running" and s["training"].get("resumed_from") and s, 120,
                "training resumed")
    assert s["training"]["resumed_from"] == newest.name
    assert "restored the newest verified replica before starting training" in d2.log()
    d2.wait(lambda s: (d2.step(s) or 0) > newest.step, 60, "training past the restored step")
    assert f"resumed from {newest.name}" in (tmp_path / "logs" / "trainer.log").read_text()
    assert d2.stop() == 0


@pytest.mark.slow
def test_without_replicas_the_daemon_never_loads_boto3_and_a_hot_reload_starts_one(tmp_path, server, bucket):
    """The daemon in a process of its own; a thread of it reports sys.modules and edits config.yaml."""
    native_ckpt(tmp_path / "checkpoints", 10)
    cfgp = tmp_path / "config.yaml"
    cfgp.write_text(yaml.safe_dump({"checkpoints": {"dir": "checkpoints"}, "replicas": [],
                                    "training": {"command": [PY, "-c", "import time; time.sleep(3600)"]}}))
    creds = server.credentials_file(tmp_path / "s3.env")
    added = {"replicas": [{"url": f"s3://{bucket}/hot", "endpoint_url": server.endpoint, "credentials_file": str(creds)}]}
    code = f"""
import json, sys, threading, time, yaml
from pathlib import Path
from daemon.core import Daemon
d = Daemon(Path({str(cfgp)!r}), echo_trainer=False)
state = Path({str(tmp_path / 'logs' / 'daemon-state.json')!r})
def probe():
    while not state.exists(): time.sleep(0.1)
    time.sleep(1.0)
    before = sorted(m for m in sys.modules if m.split('.')[0] in ('boto3', 'botocore'))
    p = Path({str(cfgp)!r}); data = yaml.safe_load(p.read_text()); data.update({added!r}); p.write_text(yaml.safe_dump(data))
    for _ in range(600):
        s = json.loads(state.read_text())
        if s.get('replicas') and s['replicas'][0]['replicas'] >= 1: break
        time.sleep(0.1)
    print(json.dumps({{'before': before, 'after': 'boto3' in sys.modules, 'replicas': s.get('replicas')}}), flush=True)
    d.stop_requested.set()
threading.Thread(target=probe, daemon=True).start()
sys.exit(d.run())
"""
    r = run_py(["-c", code], timeout=180, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    doc = json.loads(r.stdout.strip().splitlines()[-1])
    assert doc["before"] == [] and doc["after"] is True
    assert doc["replicas"][0]["replicas"] == 1 and doc["replicas"][0]["newest"]["name"] == "checkpoint-10"


@pytest.mark.slow
def test_the_docs_replicas_page_runs_as_written(tmp_path, server):
    """Its config examples validate as written; its commands run as written (against SeaweedFS, with the
    server's address and keys put into the SeaweedFS example)."""
    import shlex

    from tests.snippets import blocks, doc_block

    yamls = [doc_block("docs/replicas.md", "url: s3://my-bucket/run1"), doc_block("docs/replicas.md", "endpoint_url:"),
             doc_block("docs/replicas.md", "url: /mnt/nfs/")]
    assert [b.text for b in blocks("docs/replicas.md") if b.lang == "yaml"] == yamls  # all of them
    for text in yamls:
        parse_config(text, tmp_path / "config.yaml")
    server.make_bucket("ckpt")
    example = yaml.safe_load(yamls[1])
    rep = example["replicas"][0]
    assert rep["url"] == "s3://ckpt/run1"
    rep.update(endpoint_url=server.endpoint, credentials_file=str(server.credentials_file(tmp_path / "s3.env")))
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"checkpoints": {"dir": "checkpoints"}, **example}))
    for s in (100, 200):
        upload.upload_checkpoint(s3(server, "s3://ckpt/run1"), source.from_entry(scan(native_ckpt(tmp_path / "src", s).parent)
                                                                                  .by_name(f"checkpoint-{s}")), upload.Transfer(1, 5 * MIB))
    commands = [ln.split("#")[0].strip() for ln in doc_block("docs/replicas.md", "ckpt-daemon list --remote").splitlines()]
    outs = []
    for cmd in commands:
        argv = shlex.split(cmd)
        assert argv[0] == "ckpt-daemon"
        r = run_py(["-m", "daemon", *argv[1:]], cwd=tmp_path)
        assert r.returncode == 0, (cmd, r.stdout, r.stderr)
        outs.append(r.stdout)
    assert "checkpoint-200" in outs[0] and "2 complete" in outs[0]
    assert [(e["name"], e["status"], e["verified"]) for e in json.loads(outs[1])["checkpoints"]] == [
        ("checkpoint-100", "complete", True), ("checkpoint-200", "complete", True)]
    assert "restored checkpoint-200" in outs[2]
    assert [e.name for e in cat.scan(tmp_path / "checkpoints", ["checkpoint-{step}"], verify=True).valid()] == ["checkpoint-200"]


@pytest.mark.slow
def test_bit_rot_on_the_server_is_caught_at_restore_and_the_previous_replica_is_used(tmp_path, server, bucket):
    """A byte flipped in the server's own volume file (no API call: the listing cannot tell). SeaweedFS's
    CRC check refuses the read (it retries inside for ~13 s); the client here does not retry on top."""
    src = tmp_path / "src"
    for s in (100, 200):
        native_ckpt(src, s, seed=7)
    store = s3(server, f"s3://{bucket}/rot", attempts=1)
    t = upload.Transfer(2, 5 * MIB)
    for e in scan(src).entries:
        upload.upload_checkpoint(store, source.from_entry(e), t)
    payload = hashlib.shake_256(b"7-200").digest(64 << 10)[30_000:30_064]
    hits = [(p, p.read_bytes().find(payload)) for p in server.data.rglob("*.dat")]
    hits = [(p, i) for p, i in hits if i >= 0]
    assert len(hits) == 1
    with open(hits[0][0], "r+b") as f:
        f.seek(hits[0][1] + 5)
        b = f.read(1)
        f.seek(hits[0][1] + 5)
        f.write(bytes([b[0] ^ 1]))
    rc = listing.scan_remote(store)
    assert [r.status for r in rc.replicas] == ["complete", "complete"]  # sizes and ETags say nothing
    root = tmp_path / "checkpoints"
    root.mkdir()
    path, notes = download.restore(store, rc, "latest", root, ["checkpoint-{step}"], t)
    assert path.name == "checkpoint-100" and len(notes) == 1 and notes[0].startswith("checkpoint-200: ")
    assert [e.name for e in cat.scan(root, ["checkpoint-{step}"], verify=True).valid()] == ["checkpoint-100"]
    assert not os.listdir(root / runtime.STATE_DIR / "tmp")


@pytest.mark.slow
def test_the_daemon_rides_out_its_server_killed_mid_upload(tmp_path, daemons):
    """SIGKILL of the S3 server while the daemon streams a part: the daemon stays up (a dropped connection is
    an error, not a SIGPIPE death), says so in status, resumes once the server is back, and stops at once."""
    why = why_unavailable()
    if why:
        pytest.skip(why)
    srv = Seaweed(tmp_path / "srv").start()
    try:
        srv.make_bucket("ride")
        native_ckpt(tmp_path / "checkpoints", 5, nbytes=30 * MIB)
        rep = {"url": "s3://ride/r", "endpoint_url": srv.endpoint, "credentials_file": str(srv.credentials_file(tmp_path / "s3.env")),
               "max_mb_per_s": 4, "part_size_mb": 5, "parallel": 2}
        d = Daemon(tmp_path, deep_merge(SLEEPER, {"replicas": [rep]})).start()
        daemons.append(d)
        d.wait(lambda s: (((s.get("replicas") or [{}])[0].get("uploading") or {}).get("done") or 0) >= 5 * MIB, 60,
               "a part sent")
        srv.kill()
        d.wait(lambda s: (s["replicas"][0].get("last_error") or {}).get("kind") == "unreachable", 90, "the outage in status")
        assert d.proc.poll() is None
        srv.start()
        d.wait(lambda s: s["replicas"][0]["replicas"] == 1 and s["replicas"][0]["last_error"] is None and s, 120,
               "the replica after the outage")
        store = open_store(parse_url("s3://ride/r"), srv.endpoint, None, Credentials(srv.access_key, srv.secret_key))
        rc = listing.scan_remote(store)
        assert listing.verify_replica(store, rc.replicas[0]).valid and store.open_uploads("r/") == []
        t0 = time.monotonic()
        assert d.stop() == 0 and time.monotonic() - t0 < 30
    finally:
        srv.stop()


@pytest.mark.slow
def test_a_damaged_replica_is_sent_again_from_the_good_local_copy(tmp_path, server, bucket):
    cfgp = tmp_path / "config.yaml"
    url = f"s3://{bucket}/fix"
    cfgp.write_text(yaml.safe_dump({"checkpoints": {"dir": "checkpoints"}, "replicas": [
        {"url": url, "endpoint_url": server.endpoint, "credentials_file": str(server.credentials_file(tmp_path / "s3.env")),
         "include": ["latest"]}]}))
    cfg = load_config(cfgp)
    native_ckpt(cfg.checkpoint_dir, 100, nbytes=11 * MIB)
    w = TargetWorker(url, lambda: cfg, threading.Event(), lambda: None, threading.Event())
    w.run_pass(cfg, cfg.replicas[0])
    store = s3(server, url)
    key = f"fix/{fmt.data_key('checkpoint-100', 'model.safetensors')}"
    data = bytearray(server.client().get_object(Bucket=bucket, Key=key)["Body"].read())
    data[5] ^= 1
    server.client().put_object(Bucket=bucket, Key=key, Body=bytes(data), Metadata=store.head(key).metadata)
    w.rc_time = 0  # the next pass lists the target again (it does every REMOTE_REFRESH_S)
    w.run_pass(cfg, cfg.replicas[0])
    assert w.status["damaged"] == {}
    rc = listing.scan_remote(store)
    assert [r.status for r in rc.replicas] == ["complete"] and listing.verify_replica(store, rc.replicas[0]).valid
