"""Chaos soak of the whole daemon: `python -m tests.soak.soak --minutes 30` (long form, as root).

Runs the real daemon with the built-in trainer (tiny model, a checkpoint every few steps, retention
and snapshots every few seconds) on a small tmpfs, and for a fixed time injects faults at random:
SIGKILL of the trainer (preferably while it saves), SIGKILL of the daemon (restarted as systemd
would), valid and broken config edits, truncated or bit-flipped checkpoints, a nearly full disk,
and manual `cleanup -y` runs beside the scheduled jobs. After every round it checks the invariants of
DESIGN.md and prints one summary line at the end; violations must be 0.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from ckpt_daemon.runtime import kill_tree, read_heartbeat  # noqa: E402
from ckpt_daemon.store import catalog as cat  # noqa: E402

PATTERN = ["checkpoint-{step}"]
VALID_TIERS = [
    [{"count": 4}, {"count": 6, "every_steps": 20}, {"every_steps": 100}],
    [{"count": 6}, {"every_steps": 50}],
    [{"count": 3}, {"count": 4, "every_steps": 10}, {"every_steps": 40}],
]



def running(pid: int, deadline_s: float) -> bool:
    """Whether `pid` still runs after up to `deadline_s`. A zombie does not run: an adopted trainer is no
    child of the daemon that stopped it, and where nothing reaps orphans (a container's pid 1) it stays
    a zombie after it exited."""
    end = time.monotonic() + deadline_s
    while True:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return False
        if state in ("Z", "X"):
            return False
        if time.monotonic() > end:
            return True
        time.sleep(0.1)

class Soak:
    def __init__(self, work: Path, disk: Path, seed: int, duration_s: float, round_s: float = 2.5,
                 memory: bool = False):
        self.work, self.disk = work, disk
        self.rng = random.Random(seed)
        self.duration_s, self.round_s = duration_s, round_s
        self.faults: collections.Counter = collections.Counter()
        self.violations: list[str] = []
        self.daemon_restarts = 0
        self.corrupted: dict[int, tuple[str, float]] = {}  # inode of a folder we damaged -> (name, when)
        self.pinned_seen: dict[str, int] = {}  # name -> inode of epoch-end checkpoints seen
        self.prev_names: dict[str, int] = {}
        self.unaccounted: set[str] = set()
        self.prev_newest: tuple[str, int, int] | None = None  # (name, step, inode)
        self.cleanups: list[subprocess.Popen] = []
        self.filler = disk / "filler.bin"
        self.ck = disk / "checkpoints"
        self.cfg_path = work / "config.yaml"
        self.cfg = {
            "checkpoints": {"dir": str(self.ck)},
            "snapshots": {"dir": str(disk / "snapshots"), "schedule": "*/11 * * * * *", "keep_daily": 2,
                          "keep_weekly": 0, "keep_monthly": 0},
            "consolidation": {"dir": str(work / "consolidated")},
            "logging": {"dir": str(work / "logs")},
            "retention": {"schedule": "*/7 * * * * *", "tiers": VALID_TIERS[0]},
            "disk": {"check_interval_s": 5, "warn_free_gb": 0.03, "emergency_free_gb": 0.012, "save_margin_mb": 0.2},
            "training": {"stop_timeout_s": 20,
                         "restart": {"initial_backoff_s": 0.2, "max_backoff_s": 1.0, "max_crashes": 10000,
                                                           "crash_window_s": 60, "same_checkpoint_crashes": 1000,
                                                           "healthy_after_s": 5}},
            "trainer": {"seed": 3, "batch_size": 8, "warmup_steps": 5, "checkpoint_every_steps": 5,
                        "eval_every_steps": 10,
                        "eval_batches": 1, "log_every_steps": 50, "threads": 1,
                        "model": {"n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 32},
                        "data": {"synthetic_chars": 40000}},
        }
        # Memory-first checkpoints: a memory copy every step, every 3rd persisted by the daemon. The region lives
        # beside the work folder, not on the small tmpfs (filling the checkpoint disk must not take it away).
        self.memory = memory
        self.region = work / "shm"
        self.lost: list[tuple[int, float]] = []  # (memory step at a trainer kill, when)
        if memory:
            self.cfg["checkpoints"]["memory"] = {"enabled": True, "every_steps": 1, "persist_every": 3,
                                                 "dir": str(self.region)}
            self.cfg["training"]["warm_spare"] = True  # restarts go to a waiting spare (handover under faults)
        self.write_config(self.cfg)
        self.env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        self.daemon: subprocess.Popen | None = None

    # ------------------------------------------------------------------------------ plumbing
    def write_config(self, data: dict | str) -> None:
        tmp = self.cfg_path.with_name("config.yaml.tmp")
        tmp.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
        os.replace(tmp, self.cfg_path)

    def start_daemon(self) -> None:
        out = open(self.work / "daemon.out", "ab")
        self.daemon = subprocess.Popen([sys.executable, "-m", "daemon", "run", "--config", str(self.cfg_path),
                                        "--quiet-trainer"],
                                       stdout=out, stderr=subprocess.STDOUT, env=self.env, cwd=self.work)

    def status(self) -> dict:
        try:
            return json.loads((self.work / "logs" / "daemon-state.json").read_text())
        except (OSError, ValueError):
            return {}

    def violation(self, msg: str) -> None:
        self.violations.append(msg)
        print(f"VIOLATION: {msg}", flush=True)

    def ino(self, p: Path) -> int | None:
        try:
            return os.lstat(p).st_ino
        except OSError:
            return None

    # ------------------------------------------------------------------------------ faults
    def kill_trainer(self) -> None:
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:  # prefer an instant while it saves
            hb = read_heartbeat(self.ck) or {}
            if hb.get("saving") or list(self.ck.glob(".tmp-checkpoint-*")):
                break
            time.sleep(0.01)
        pid = self.status().get("training", {}).get("pid")
        if pid:
            try:
                os.kill(pid, signal.SIGKILL)
                self.faults["kill_trainer"] += 1
            except ProcessLookupError:
                pass

    def _memory_step(self) -> int | None:
        from ckpt_daemon import memory as mem

        info, _ = mem.Region(self.region).newest(self.ck)
        return info.step if info else None

    def kill_trainer_mid_copy(self) -> None:
        """SIGKILL the trainer while it writes a memory slot (its seq is odd), if it does within 1.5 s."""
        from ckpt_daemon import memory as mem

        pid = self.status().get("training", {}).get("pid")
        deadline = time.monotonic() + 1.5
        while pid and time.monotonic() < deadline:
            if any((mem.read_seq(self.region / n) or 0) % 2 for n in mem.SLOTS):
                break
            time.sleep(0.002)
        if pid:
            try:
                os.kill(pid, signal.SIGKILL)
                self.faults["kill_trainer_mid_copy"] += 1
            except ProcessLookupError:
                return
            time.sleep(0.05)  # the process is gone once the kernel reaped its mappings
            step = self._memory_step()
            if step is not None and not self.filler.exists():
                self.lost.append((step, time.time()))

    def kill_daemon_mid_persist(self) -> None:
        """SIGKILL the daemon while it persists a memory slot (its scratch folder exists), if within 1.5 s."""
        pid = self.daemon.pid
        deadline = time.monotonic() + 1.5
        tmp = self.ck / ".ckpt-daemon" / "tmp"
        while time.monotonic() < deadline:
            try:
                if any(f"-{pid}-" in n and not n.endswith(".lock") for n in os.listdir(tmp)):
                    self.faults["kill_daemon_mid_persist"] += 1
                    break
            except OSError:
                pass
            time.sleep(0.002)
        self.kill_daemon()

    def kill_daemon(self) -> None:
        self.daemon.kill()
        self.daemon.wait()
        self.faults["kill_daemon"] += 1
        time.sleep(self.rng.uniform(0, 1.0))
        self.start_daemon()  # as systemd's Restart=on-failure would
        self.daemon_restarts += 1

    def edit_config(self) -> None:
        if self.rng.random() < 0.4:
            text = self.cfg_path.read_text()
            broken = self.rng.choice([
                text.replace("every_steps: ", "every_steps: -", 1),
                text + "\nretention: [unclosed\n",
                text.replace("check_interval_s: 5", "check_interval_s: soon"),
                "just a string",
            ])
            self.write_config(broken)
            self.faults["config_broken"] += 1
        else:
            self.cfg["retention"]["tiers"] = self.rng.choice(VALID_TIERS)
            self.write_config(self.cfg)
            self.faults["config_valid"] += 1

    def corrupt(self) -> None:
        entries = [e for e in cat.scan(self.ck, PATTERN, stats=False).entries if e.valid]
        if len(entries) < 2:
            return
        e = self.rng.choice(entries)
        files = [p for p in e.path.iterdir() if p.is_file()]
        if not files:
            return
        f = self.rng.choice(files)
        try:
            size = f.stat().st_size
            if self.rng.random() < 0.5:
                os.truncate(f, self.rng.randrange(0, max(size, 1)))
                self.faults["truncate"] += 1
            else:
                with open(f, "r+b") as fh:
                    pos = self.rng.randrange(0, max(size, 1))
                    fh.seek(pos)
                    b = fh.read(1) or b"\0"
                    fh.seek(pos)
                    fh.write(bytes([b[0] ^ 0x55]))
                self.faults["flip"] += 1
            ino = self.ino(e.path)
            if ino is not None:
                self.corrupted.setdefault(ino, (e.name, time.time()))
        except OSError:
            pass

    def fill_disk(self) -> None:
        if self.filler.exists():
            self.filler.unlink()
            self.faults["disk_freed"] += 1
            return
        try:
            free = shutil.disk_usage(self.disk).free
            with open(self.filler, "wb") as f:
                f.truncate(0)
                chunk = b"\0" * (1 << 20)
                for _ in range(max(0, (free - (3 << 20)) >> 20)):
                    f.write(chunk)
            self.faults["disk_filled"] += 1
        except OSError:
            self.faults["disk_filled"] += 1

    def manual_cleanup(self) -> None:
        self.cleanups.append(subprocess.Popen([sys.executable, "-m", "maintenance.cleanup", "--config",
                                               str(self.cfg_path), "-y", "-q"],
                                              stdout=subprocess.DEVNULL, stderr=open(self.work / "cleanup.err", "ab"),
                                              env=self.env,
                                              cwd=self.work))
        self.faults["manual_cleanup"] += 1

    # ------------------------------------------------------------------------------ invariants
    def check(self, final: bool = False) -> None:
        if self.daemon.poll() is not None:
            self.violation(f"the daemon exited ({self.daemon.returncode}) without being killed")
            self.start_daemon()
            return
        s = self.status()
        # the daemon rewrites its state when it changes, and at least every 30 s
        def fresh(s: dict | None) -> bool:
            return bool(s) and s.get("daemon", {}).get("pid") == self.daemon.pid and time.time() - s.get("written", 0) <= 40

        if not fresh(s):
            deadline = time.monotonic() + 30  # a just-restarted daemon on a busy machine needs a moment
            while not fresh(s) and time.monotonic() < deadline and self.daemon.poll() is None:
                time.sleep(0.2)
                s = self.status()
            if not fresh(s):
                self.violation("the status file is stale or names another daemon")
                return
        t = s["training"]
        if t["state"] == "running" and t.get("pid") and not Path(f"/proc/{t['pid']}").exists():
            def still_claimed(s2: dict | None) -> bool:
                return bool(s2) and s2["training"]["state"] == "running" and s2["training"].get("pid") == t["pid"]

            # it may have exited a moment ago; the daemon notices on its next tick (busy machine: 10 s)
            deadline = time.monotonic() + 10
            while still_claimed(s2 := self.status()) and time.monotonic() < deadline:
                time.sleep(0.2)
            if still_claimed(s2):
                self.violation(f"status says training runs as pid {t['pid']}, which does not exist")
        if t["state"] == "gave_up":
            self.violation("the supervisor gave up")
        c = cat.scan(self.ck, PATTERN, stats=False)
        names = {e.name: self.ino(e.path) for e in c.entries}
        for e in c.entries:
            if e.name.startswith("."):
                self.violation(f"a temp folder was taken for a checkpoint: {e.name}")
            if not e.valid and self.ino(e.path) not in self.corrupted:
                self.violation(f"{e.name} is {e.status} ({e.reason}) but we never damaged it")
        # nothing corrupt was resumed from: a trainer that started after we damaged its checkpoint
        rf = t.get("resumed_from")
        if rf and rf in names and names[rf] in self.corrupted and t.get("started_at"):
            damaged_at = self.corrupted[names[rf]][1]
            if damaged_at < t["started_at"] - 0.5:
                self.violation(f"training resumed from {rf}, which we had corrupted before it started")
        # the newest valid (undamaged) checkpoint never goes backwards
        undamaged = [e for e in c.entries if e.valid and names.get(e.name) not in self.corrupted]
        newest = max(undamaged, key=lambda e: e.step) if undamaged else None
        if self.prev_newest is not None:
            pname, pstep, pino = self.prev_newest
            if pino not in self.corrupted and (newest is None or newest.step < pstep):
                self.violation(f"the newest valid checkpoint went back from {pname} to {newest.name if newest else 'nothing'}")
        if newest is not None:
            self.prev_newest = (newest.name, newest.step, names[newest.name])
        # every checkpoint that disappeared is accounted for by cleanup.log or our quarantine of damage
        log = (self.work / "logs" / "cleanup.log").read_text() if (self.work / "logs" / "cleanup.log").exists() else ""
        deleted = set(re.findall(r"^(?:deleted|removed|emptied) (checkpoint-\d+)\b", log, re.M))
        for name, ino in self.prev_names.items():
            if (name not in names or names[name] != ino) and ino not in self.corrupted:
                self.unaccounted.add(name)  # a cleanup writes its block when it ends: look again later
        self.unaccounted -= deleted
        if final:
            for name in sorted(self.unaccounted):
                self.violation(f"{name} disappeared without a line in cleanup.log")
        # protected: pinned epoch ends are never deleted (unless we damaged them)
        for e in c.entries:
            if e.pin:
                self.pinned_seen[e.name] = names[e.name]
        for name, ino in self.pinned_seen.items():
            if (name not in names or names[name] != ino) and ino not in self.corrupted:
                self.violation(f"pinned checkpoint {name} was deleted")
        if re.search(r"^deleted checkpoint-\d+ .*protected:", log, re.M):
            self.violation("cleanup.log shows a protected checkpoint deleted")
        # persist at the breakpoint: the memory state a killed trainer left is on disk (or something newer is)
        keep = []
        for step, when in self.lost:
            newest_step = max((e.step for e in c.entries if e.valid), default=-1)
            if newest_step >= step or (self.ck / f"checkpoint-{step}").exists():
                continue
            if any(name == f"checkpoint-{step}" for name, _ in self.corrupted.values()):
                continue  # we damaged it ourselves after it was persisted
            if time.time() - when > 20 or final:
                self.violation(f"the memory checkpoint at step {step} left by a killed trainer never reached the disk")
            else:
                keep.append((step, when))  # the daemon may still be restarting
        self.lost = keep
        self.prev_names = names

    # ------------------------------------------------------------------------------ main
    def run(self) -> int:
        self.start_daemon()
        t_end = time.monotonic() + self.duration_s
        deadline = time.monotonic() + 120
        while not (self.status().get("training", {}).get("step") or 0) > 20:
            if time.monotonic() > deadline:
                print("the trainer never got going:\n" + (self.work / "daemon.out").read_text()[-3000:])
                return 2
            time.sleep(0.2)
        rounds = 0
        faults = [(self.kill_trainer, 5), (self.kill_daemon, 1), (self.edit_config, 2), (self.corrupt, 2),
                  (self.fill_disk, 1.5), (self.manual_cleanup, 2)]
        if self.memory:
            faults += [(self.kill_trainer_mid_copy, 4), (self.kill_daemon_mid_persist, 1)]
        while time.monotonic() < t_end:
            rounds += 1
            for _ in range(self.rng.choice([1, 1, 2])):
                fn = self.rng.choices([f for f, _ in faults], weights=[w for _, w in faults])[0]
                fn()
            time.sleep(self.round_s)
            if self.cfg_path.read_text() != yaml.safe_dump(self.cfg) and self.rng.random() < 0.7:
                self.write_config(self.cfg)  # undo a broken edit most of the time
            self.check()
            self.cleanups = [p for p in self.cleanups if p.poll() is None]
        # wind down: free the disk, restore the config, stop cleanly
        if self.filler.exists():
            self.filler.unlink()
        self.write_config(self.cfg)
        for p in self.cleanups:
            p.wait(timeout=60)
        time.sleep(3)
        self.check(final=True)
        dlog = (self.work / "logs" / "daemon.log").read_text(errors="replace")
        restarts = dlog.count('"event": "restarting after backoff"')
        adoptions = dlog.count("adopting it")
        warm = len(re.findall(r'"warm_spare":\s*true', dlog))
        self.daemon.send_signal(signal.SIGTERM)
        try:
            rc = self.daemon.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.daemon.kill()
            rc = None
        if rc != 0:
            self.violation(f"the daemon did not stop cleanly on SIGTERM (exit {rc})")
        hb = read_heartbeat(self.ck) or {}
        if hb.get("pid") and running(int(hb["pid"]), deadline_s=10):
            self.violation("the trainer outlived the daemon's stop")
            kill_tree(hb["pid"], signal.SIGKILL)
        final = cat.scan(self.ck, PATTERN, verify=True)
        undamaged = [e for e in final.entries if self.ino(e.path) not in self.corrupted]
        if not undamaged or not all(e.valid for e in undamaged):
            self.violation("after the soak, an undamaged checkpoint fails verification or none is left")
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(self.faults.items()))
        summary = (f"soak: {rounds} rounds in {self.duration_s:.0f}s, faults: {sum(self.faults.values())} ({kinds}), "
                   f"trainer restarts after crashes: {restarts}, daemon restarts: {self.daemon_restarts} (trainers adopted: {adoptions}), "
                   + (f"restarts handed to a warm spare: {warm}, " if self.memory else "")
                   + f"newest step: {self.prev_newest[1] if self.prev_newest else None}, violations: {len(self.violations)}")
        print(summary, flush=True)
        (self.work / "summary.txt").write_text(summary + "\n" + "\n".join(self.violations) + "\n")
        return 0 if not self.violations else 1


def mount_tmpfs(path: Path, size: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--seed", type=int, default=20261122,
                    help="the random choices of the run (default: a fixed seed, so a run can be repeated)")
    ap.add_argument("--work", default=None, help="work folder (default: a new temp folder)")
    ap.add_argument("--tmpfs-size", default="48m")
    ap.add_argument("--memory", action="store_true", help="with memory-first checkpoints (checkpoints.memory)")
    args = ap.parse_args(argv)
    import tempfile

    work = Path(args.work or tempfile.mkdtemp(prefix="ckpt-soak-"))
    disk = work / "disk"
    mount_tmpfs(disk, args.tmpfs_size)
    print(f"soak seed {args.seed}, work folder {work}", flush=True)
    try:
        return Soak(work, disk, args.seed, args.minutes * 60, memory=args.memory).run()
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


if __name__ == "__main__":
    sys.exit(main())
