"""What the test modules share: configs, child processes, the real daemon, checkpoints of every layout,
and waiting for an event with a deadline. Test modules import from here, never from each other (a test
module imported by another is collected twice, and its fixtures leak into the importer's namespace);
the fixtures are in conftest.py."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Callable, TypeVar

import yaml

if TYPE_CHECKING:
    from ckpt_daemon.store import catalog as cat

T = TypeVar("T")

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable

# A model small enough that a test run takes seconds, big enough to learn. On the CPU even on a GPU machine
# (two torchrun ranks on one GPU are refused, and exact resume on a GPU needs deterministic kernels):
# tests/test_gpu.py asks for the GPU itself.
TINY_TRAINER = {
    "device": "cpu",
    "seed": 7,
    "batch_size": 8,
    "learning_rate": 0.003,
    "warmup_steps": 5,
    "checkpoint_every_steps": 5,
    "eval_every_steps": 10,
    "eval_batches": 2,
    "log_every_steps": 5,
    "threads": 1,
    "model": {"n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 32},
    "data": {"synthetic_chars": 20000},
}


def deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def write_config(folder: Path, overrides: dict | None = None, tiny: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    data = {"trainer": dict(TINY_TRAINER)} if tiny else {}
    data = deep_merge(data, overrides or {}) or {"checkpoints": {"dir": "checkpoints"}}  # an empty file is refused
    p = folder / "config.yaml"
    p.write_text(yaml.safe_dump(data, sort_keys=False))
    return p


def env_for_children() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    env["OMP_NUM_THREADS"] = "1"
    return env


def run_py(args: list[str], timeout: float = 300, check: bool = False, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run([PY, *args], capture_output=True, text=True, timeout=timeout,
                       env=kw.pop("env", env_for_children()),
                       stdin=kw.pop("stdin", subprocess.DEVNULL), **kw)
    if check and r.returncode != 0:
        raise AssertionError(f"{args} exited {r.returncode}\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}")
    return r


def same_nested(a, b) -> bool:
    """Deep equality of nested state (optimizer, scheduler, RNG): every tensor compared element by
    element with torch.equal (str() would elide large tensors), every other value with ==."""
    import torch

    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype and \
            a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return list(a) == list(b) and all(same_nested(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same_nested(x, y) for x, y in zip(a, b))
    return a == b


def read_losses(metrics: Path) -> dict[int, float]:
    """step -> loss, the last record per step (a resumed run re-logs the steps after its checkpoint)."""
    out = {}
    for line in metrics.read_text().splitlines():
        r = json.loads(line)
        out[r["step"]] = r["loss"]
    return out


def wait_for(predicate: Callable[[], T], timeout: float = 120, what: str = "the condition", interval: float = 0.05,
             alive: subprocess.Popen | None = None) -> T:
    """Poll `predicate` until it returns something true and return that; fail after `timeout` seconds
    naming `what` (and at once if the process `alive` has exited: it never will happen then)."""
    deadline = time.monotonic() + timeout
    while True:
        v = predicate()
        if v:
            return v
        if alive is not None and alive.poll() is not None:
            raise AssertionError(f"process {alive.pid} exited {alive.returncode} while waiting for {what}")
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


# ---------------------------------------------------------------------------------- the built-in trainer
def start(args: list[str], log: Path) -> subprocess.Popen:
    """A trainer (or any command) started in its own session, its output into `log`."""
    return subprocess.Popen(args, stdout=open(log, "wb"), stderr=subprocess.STDOUT, env=env_for_children(),
                            start_new_session=True)


def wait_for_step(metrics: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Until the trainer's metrics.jsonl has reached `step` (fails at once if `proc` exits first)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metrics.exists():
            losses = read_losses(metrics)
            if losses and max(losses) >= step:
                return
        if proc.poll() is not None:
            raise AssertionError(f"trainer exited {proc.returncode} before step {step}")
        time.sleep(0.02)
    raise AssertionError(f"step {step} not reached in {timeout}s")


def newest_memory_step(region: Path, ck: Path) -> int:
    """The step of the newest committed memory checkpoint of `ck` in `region` (-1 when there is none)."""
    from ckpt_daemon import memory as mem

    info, _ = mem.Region(region).newest(ck)
    return info.step if info else -1


def trainer_cmd(cfg: Path, world: int, *extra: str) -> list[str]:
    """The built-in trainer's command line: one process, or `world` ranks under torchrun."""
    if world == 1:
        return [PY, "-m", "trainer", "--config", str(cfg), *extra]
    return [PY, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}", "-m", "trainer",
            "--config", str(cfg), *extra]


def resident_bytes(addr: int) -> int:
    """Resident bytes of this process's mapping that starts at `addr` (/proc/self/smaps): pages faulted in."""
    import re

    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
                inside = int(line.split("-", 1)[0], 16) == addr
            elif inside and line.startswith("Rss:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no mapping at {addr:#x}")


# ---------------------------------------------------------------------------------- the real daemon
DAEMON_OVERRIDES = {
    "trainer": {"checkpoint_every_steps": 20, "eval_every_steps": 20, "log_every_steps": 100},
    "training": {"stop_timeout_s": 30,
                 "restart": {"initial_backoff_s": 0.2, "max_backoff_s": 1.0, "healthy_after_s": 600,
                                                   "max_crashes": 5, "crash_window_s": 600}},
    "disk": {"check_interval_s": 5, "warn_free_gb": 0, "emergency_free_gb": 0},
}


class Daemon:
    def __init__(self, folder: Path, overrides: dict | None = None, env: dict | None = None):
        self.folder = folder
        self.cfg = write_config(folder, deep_merge(DAEMON_OVERRIDES, overrides or {}))
        self.env = {**env_for_children(), **(env or {})}
        self.proc: subprocess.Popen | None = None

    def start(self, entry: list[str] | None = None) -> "Daemon":
        """`entry`: how the daemon is started (default `python -m daemon`; the installed `ckpt-daemon` is what
        systemd and `make run` start)."""
        self.out = open(self.folder / "daemon.out", "ab")
        self.proc = subprocess.Popen([*(entry or [PY, "-m", "daemon"]), "run", "--config", str(self.cfg),
                                      "--quiet-trainer"],
                                     stdout=self.out, stderr=subprocess.STDOUT, env=self.env, cwd=self.folder)
        return self

    def status(self) -> dict:
        try:
            return json.loads((self.folder / "logs" / "daemon-state.json").read_text())
        except (OSError, ValueError):
            return {}

    def wait(self, pred, timeout: float = 90, what: str = "condition"):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            s = self.status()
            try:
                v = pred(s)
            except (KeyError, TypeError):
                v = None
            if v:
                return v
            assert self.proc.poll() is None, f"daemon exited {self.proc.returncode}:\n{self.output()}"
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}; status: {json.dumps(self.status(), indent=1)[:3000]}\n{self.output()[-3000:]}")

    def output(self) -> str:
        return (self.folder / "daemon.out").read_text(errors="replace")

    def log(self) -> str:
        p = self.folder / "logs" / "daemon.log"
        return p.read_text() if p.exists() else ""

    def stop(self, sig=signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                return self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                raise
        return self.proc.returncode

    def step(self, s: dict):
        t = s["training"]
        return t.get("step") if t["state"] == "running" else None


# ---------------------------------------------------------------------------------- checkpoints
# The catalog's name patterns of the layouts the tests write.
PATTERNS = ["checkpoint-{step}", "rolling_step_{step}.pt", "epoch={epoch}-step={step}.ckpt", "model_step_{step}.pt"]
BYO = Path(__file__).parent / "byo"  # users' own training scripts (Hugging Face, Lightning, plain torch.save)


def tiny_model():
    import torch

    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.LayerNorm(64))


def native(root: Path, steps, **kw):
    """Native checkpoints of `steps` (val_loss 10/step: the newest is the best), as a trainer saves them."""
    import torch

    from ckpt_daemon.checkpoint import CheckpointManager

    m = tiny_model()
    opt = torch.optim.AdamW(m.parameters())
    mgr = CheckpointManager(root)
    for s in steps:
        m(torch.randn(2, 64)).sum().backward()
        opt.step()
        mgr.save(s, model=m, optimizer=opt, metrics={"val_loss": 10.0 / s}, **kw)
    return mgr


def write_manifest(folder: Path, m: dict, sealed: bool = True) -> None:
    """Write `m` as the manifest.json of a native checkpoint folder: sealed with its own digest as every
    writer of ours seals it (what someone who rewrites a manifest on purpose can do too), or, with
    sealed=False, without one, as versions before the seal wrote it."""
    from ckpt_daemon.store import manifest as mf

    m = {k: v for k, v in m.items() if k != mf.SEAL}
    (Path(folder) / mf.MANIFEST).write_bytes(mf.dumps_manifest(m, "sha256") if sealed else json.dumps(m).encode())


def hf_folder(root: Path, step: int, complete: bool = True, state: dict | None = None) -> Path:
    """A Hugging Face Trainer checkpoint folder; `state`: more fields for its trainer_state.json."""
    import safetensors.torch
    import torch

    d = root / f"checkpoint-{step}"
    d.mkdir()
    safetensors.torch.save_file({"w": torch.randn(16, 16)}, d / "model.safetensors")
    torch.save({"state": {}, "param_groups": []}, d / "optimizer.pt")
    (d / "config.json").write_text("{}")
    if complete:
        (d / "trainer_state.json").write_text(json.dumps({"global_step": step, "epoch": 1.0, "best_metric": 0.5,
                                                          **(state or {})}))
    return d


def single_file(root: Path, name: str) -> Path:
    import torch

    from ckpt_daemon.store import catalog as cat

    p = root / name
    m = cat.match_name(name, [cat.compile_pattern(x) for x in PATTERNS])
    torch.save({"model_state_dict": tiny_model().state_dict(), "step": m["step"] if m else 1}, p)
    return p


def lightning_run(folder: Path, steps: int = 8, every: int = 4) -> list[Path]:
    """A real Lightning run (CPU, seconds) whose ModelCheckpoint writes `epoch=E-step=S.ckpt` every `every`
    steps into `folder`, each saying in its callback state which is best (the newest: no monitor)."""
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import ModelCheckpoint

    class Lit(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Linear(8, 1)

        def training_step(self, batch, _):
            x, y = batch
            return torch.nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=0.01)

    L.seed_everything(0, verbose=False)
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(16, 8, generator=g), torch.randn(16, 1, generator=g))
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=True,
                        callbacks=[ModelCheckpoint(dirpath=folder, every_n_train_steps=every, save_top_k=-1)])
    trainer.fit(Lit(), torch.utils.data.DataLoader(data, batch_size=4))
    return sorted(folder.glob("*.ckpt"), key=lambda p: p.stat().st_mtime_ns)


def flip_byte(path: Path, offset: int, xor: int) -> None:
    """Change one byte of a file in place as a failing disk does: same inode, same size, same mtime (a
    write through the filesystem that changes the mtime of a one-file checkpoint looks like its trainer
    saving that step again, which is judged afresh)."""
    assert 0 < xor < 256
    st = os.stat(path)
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ xor]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def make_state(width: int = 64, seed: int = 0):
    import torch

    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.ReLU(), torch.nn.Linear(width, 10))
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt, 10)
    for _ in range(2):
        m(torch.randn(4, width)).sum().backward()
        opt.step()
        sched.step()
    return m, opt, sched


def same_state(a, b) -> bool:
    import torch

    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def fake_native(root: Path, step: int, payload: bytes = b"w" * 16, extra_files: int = 0) -> Path:
    """A committed native checkpoint in a few microseconds (retention only looks at its manifest)."""
    d = root / f"checkpoint-{step}"
    d.mkdir(parents=True)
    (d / "model.safetensors").write_bytes(payload)
    for i in range(extra_files):
        (d / f"pad-{i}").write_bytes(b"p")
    files = {"model.safetensors": {"size": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}}
    (d / "manifest.json").write_text(json.dumps({"format": "ckpt-daemon/1", "step": step, "files": files}))
    return d


def seed_history(root: Path) -> None:
    for s in range(100, 17001, 100):
        fake_native(root, s)


def empty_entries_zip(path: Path, n: int, declare: int | None = None, data_pkl: bytes | None = None) -> Path:
    """A zip whose data.pkl names no storage, followed by `n` empty entries (a zip64 end record when
    needed): a hundred megabytes that cost a careless reader a million objects. Built with struct, in
    about a second. `declare` makes the end record lie about the count."""
    import zlib

    lfh = struct.Struct("<4sHHHHHIIIHH")
    cdh = struct.Struct("<4sHHHHHHIIIHHHHHII")
    offset, cd = 0, bytearray()
    with open(path, "wb") as f:
        def entry(name: str, data: bytes) -> None:
            nonlocal offset
            nb, crc = name.encode(), zlib.crc32(data)
            f.write(lfh.pack(b"PK\x03\x04", 20, 0, 0, 0, 0, crc, len(data), len(data), len(nb), 0) + nb + data)
            cd.extend(cdh.pack(b"PK\x01\x02", 20, 20, 0, 0, 0, 0, crc, len(data), len(data), len(nb), 0, 0, 0, 0, 0,
                               offset) + nb)
            offset += lfh.size + len(nb) + len(data)

        entry("archive/data.pkl", data_pkl if data_pkl is not None else pickle.dumps({"step": 7}, protocol=2))
        entry("archive/version", b"3\n")
        for i in range(n):
            entry(f"archive/data/{i}", b"")
        count = n + 2 if declare is None else declare
        f.write(cd)
        z64 = offset + len(cd)
        f.write(struct.pack("<4sQHHIIQQQQ", b"PK\x06\x06", 44, 45, 45, 0, 0, count, count, len(cd), offset))
        f.write(struct.pack("<4sIQI", b"PK\x06\x07", 0, z64, 1))
        f.write(struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0))
    return path


# ---------------------------------------------------------------------------------- HTTP
def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_listening(port: int, host: str = "127.0.0.1", timeout: float = 30) -> None:
    """The dashboard's server starts on the observer's thread, after the daemon's own start: wait for it."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((host, port), timeout=1).close()
            return
        except OSError:
            assert time.monotonic() < deadline, f"nothing listens on {host}:{port}"
            time.sleep(0.1)


def parse(text: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of an exposition, via prometheus_client's parser."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def scrape(url: str, headers: dict | None = None) -> str:
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=20) as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
        return r.read().decode()


FOREIGN_PATTERNS = ["checkpoint-{step}", "epoch={epoch}-step={step}.ckpt", "model_step_{step}.pt"]


def record_all(root: Path, patterns: list[str] = FOREIGN_PATTERNS) -> None:
    """Record every valid foreign checkpoint of `root` as the daemon does once it has settled (an hour later)."""
    from ckpt_daemon.store import catalog as cat
    from ckpt_daemon.store import foreign

    for e in cat.scan(root, patterns, now=time.time() + 3600).entries:
        if e.layout != "native" and e.valid and not e.recorded:
            meta = cat.check_entry(e.path, verify=False, step=e.step)[3]  # all it says, metrics too (daemon/watch.py)
            foreign.record(root, e.name, e.path, e.layout, e.step, meta)


SECRET = "s3cr3tTOKENxyz"  # in every notification test URL: it must never show up in a log, a status or an error


class Receiver:
    """A local HTTP server that keeps every notification apprise's json:// posts to it. With hold set,
    it keeps the request open until released (a slow target)."""

    def __init__(self, port: int = 0, hold: bool = False):
        self.got: list[dict] = []
        self.cond = threading.Condition()
        self.release = threading.Event()
        self.holding = threading.Event()
        if not hold:
            self.release.set()
        owner = self

        class H(BaseHTTPRequestHandler):
            def do_POST(self):
                n = int(self.headers.get("Content-Length") or 0)
                data = json.loads(self.rfile.read(n) or b"{}")
                owner.holding.set()
                owner.release.wait(60)
                with owner.cond:
                    owner.got.append({"path": self.path, **data})
                    owner.cond.notify_all()
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *a):
                pass

        self.srv = ThreadingHTTPServer(("127.0.0.1", port), H)
        self.port = self.srv.server_address[1]
        threading.Thread(target=self.srv.serve_forever, daemon=True).start()

    def url(self, path: str = "hook") -> str:
        return f"json://ckpt:{SECRET}@127.0.0.1:{self.port}/{path}?token={SECRET}"

    def wait(self, pred, timeout: float = 60, what: str = "a notification"):
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                v = pred(self.got)
                if v:
                    return v
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"timed out waiting for {what}; got: {[m.get('title') for m in self.got]}")
                self.cond.wait(min(left, 0.5))

    def close(self):
        self.release.set()
        self.srv.shutdown()
        self.srv.server_close()


FAST_RESTART = {"initial_backoff_s": 0.2, "max_backoff_s": 1.0, "max_crashes": 20, "crash_window_s": 600}


def newest(root: Path, patterns) -> cat.Entry:
    from ckpt_daemon.store import catalog as cat

    return cat.scan(root, patterns).newest_valid()


def kill_right_after_a_save(d: Daemon, root: Path, patterns, after_step: int) -> cat.Entry:
    """Stop the trainer just after it saved a checkpoint newer than `after_step`, then SIGKILL it."""
    wait_for(lambda: (e := newest(root, patterns)) is not None and e.step > after_step,
             what=f"a save after {after_step}")
    pid = d.status()["training"]["pid"]
    os.kill(pid, signal.SIGSTOP)
    e = newest(root, patterns)
    os.kill(pid, signal.SIGKILL)
    return e
