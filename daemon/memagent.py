"""The daemon's side of memory-first checkpoints: the agent that holds the region (its lock), verifies each
new slot, persists one to disk every `persist_every` saves and at the end, adopts what a daemon that died
left behind, and removes a region nobody holds. The slot format and what trainers write (the Region, slot
headers, `persist_slot`, which Lightning's end-of-fit write uses too) stay in ckpt_daemon/memory.py."""

from __future__ import annotations

import os
import shutil
import stat
import threading
import time
from pathlib import Path
from typing import Callable, Optional

from ckpt_daemon.errors import CkptError
from ckpt_daemon.memory import (
    LOCK,
    SLOTS,
    MemoryCheckpointError,
    Persisted,
    Pinned,
    Region,
    SlotInfo,
    SlotSuperseded,
    boot_id,
    name_taken,
    persist_slot,
    private_dir,
    record_verified,
    region_dir_for,
    verify_and_pin,
)
from ckpt_daemon.store.locks import FileLock
from ckpt_daemon.store.problems import Kind


class RegionLock(FileLock):
    """The daemon's claim on a region: a live daemon holds it; a region whose lock is free was left by
    a daemon that died (or never had one) and is adopted. The lock file (0600, in the private region)
    says the holder's pid and boot id."""

    def __init__(self, path: Path):
        super().__init__(Path(path) / LOCK, mode=0o600, info=lambda: f"{os.getpid()} {boot_id()}\n",
                         not_regular=lambda p: MemoryCheckpointError(f"{p} is not a regular file; remove it and try again."))
        self.region = Path(path)

    def acquire(self) -> bool:
        private_dir(self.region)
        return self.try_acquire()


class MemoryAgent:
    """The daemon's side of memory checkpoints: claims the region, adopts what a dead daemon left,
    persists committed slots on the configured cadence (its own thread) and at the breakpoint (when the
    trainer exits, called by the supervisor before it chooses the resume point), and removes the region
    once everything in it is on disk."""

    def __init__(self, get_cfg: Callable, log, clock: Callable[[], float] = time.monotonic):
        self.get_cfg = get_cfg
        self.log = log
        self.clock = clock
        cfg = get_cfg()
        self.ckpt_dir = cfg.checkpoint_dir
        self.path = region_dir_for(cfg)
        self.region = Region(self.path)
        self.lock = RegionLock(self.path)
        self.mutex = threading.Lock()
        self.active = False
        self.error: Optional[str] = None
        self.last_gen: Optional[int] = None  # generation of the slot persisted (or found on disk) last
        self.last_persist_at = clock()
        self.last: Optional[dict] = None
        self.persisted = 0
        self.reported: set[str] = set()
        self.failed: set[tuple] = set()  # slots (path, seq) that could not be persisted: not retried by the cadence
        self.unusable: set[tuple] = set()  # slots (path, seq) that failed verification: never resumed from
        self.avoid: set[str] = set()  # checkpoints the supervisor avoids (crash loops): not "on disk" for us
        # The breakpoint hands the restart a slot verified in memory, and persists it in the background:
        self.pin_lock = threading.Lock()
        self.queue: list[tuple[Pinned, str]] = []  # verified, pinned slots waiting for the persist thread
        self.inflight: list[tuple[Pinned, str]] = []  # ... and the one being persisted
        self.wake = threading.Event()
        self.persisting: Optional[int] = None  # step being persisted in the background
        self.on_phase: Optional[Callable[[str], None]] = None  # persist_slot's phase hook (tests)
        # A trainer that saves to disk but never to memory while memory is on (a plain torch.save script)
        # gets nothing from it: said once, in the log and the status.
        self.warning: Optional[str] = None
        self._start_slots: set[tuple] = set()  # committed slots (path, seq) found at start: not this run's
        self._start_disk: Optional[set[str]] = None  # checkpoint names on disk at start
        self._persisted_names: set[str] = set()
        self._seen_memory = False
        self._next_unused_check = 0.0

    # -- life cycle ---------------------------------------------------------------------------------
    def start(self) -> bool:
        try:
            if not self.lock.acquire():
                self.error = (f"Memory checkpoints are off: another ckpt-daemon holds the memory region {self.path}. "
                              "Give each daemon its own checkpoints.memory.dir (the default derives one from "
                              "checkpoints.dir).")
                self.log.error(self.error)
                return False
        except (OSError, MemoryCheckpointError) as exc:
            self.error = (f"Memory checkpoints are off: the memory region {self.path} cannot be used ({exc}). "
                          "Fix checkpoints.memory.dir (a folder on a tmpfs such as /dev/shm) and restart the daemon; "
                          "disk checkpoints are unaffected.")
            self.log.error(self.error)
            return False
        self.active = True
        # Adopt: a region left by a daemon that died may hold a state newer than the disk.
        self.persist_newest("left by a previous daemon")
        try:
            self._start_slots = {(str(s.path), s.seq) for s in self.region.slots()[0]}
            self._start_disk = self._disk_names()
        except (OSError, ValueError, CkptError):
            self._start_disk = None  # not known: the check below takes its first look as the start
        return True

    def env(self) -> dict:
        return {"CKPT_DAEMON_MEMORY": str(self.path)} if self.active else {}

    def close(self, clean: bool = True) -> None:
        """At daemon stop (after the trainer stopped): persist what is newer than the disk, then remove
        the region if everything in it is on disk; otherwise keep it for the next daemon."""
        if not self.active:
            return
        self.drain()
        self.persist_newest("daemon stop")
        if clean and self.remove_if_persisted("the daemon stopped"):
            # nothing left to keep: the folder goes too (its lock file while we still hold it)
            self.region.remove_scratch(only_dead=False)
            try:
                os.unlink(self.path / LOCK)
                os.rmdir(self.path)
            except OSError:
                pass  # something else is in it: left as it is
        self.lock.release()
        self.active = False

    def remove_if_persisted(self, why: str) -> bool:
        self.drain()
        with self.mutex:
            newest, _ = self.region.newest(self.ckpt_dir)
            if newest is not None and not self._on_disk(newest):
                self.log.error("the memory region holds a state newer than the disk and could not be persisted; "
                               "it is kept for the next daemon", region=str(self.path), step=newest.step)
                return False
            for name in SLOTS:
                try:
                    if stat.S_ISREG(os.lstat(self.path / name).st_mode):
                        os.unlink(self.path / name)
                    # anything else there was reported, and is left as it is (the trainer sets it aside)
                except FileNotFoundError:
                    pass
                except OSError as exc:
                    self.log.warning("memory slot not removed", slot=name, error=str(exc))
            self.last_gen = None
            self.log.info("memory region emptied", region=str(self.path), why=why)
            return True

    # -- persisting ---------------------------------------------------------------------------------
    def _on_disk(self, info: SlotInfo) -> bool:
        """Whether the disk holds this step, or a newer valid checkpoint the supervisor would resume from."""
        from ckpt_daemon.store import catalog as cat

        if os.path.lexists(self.ckpt_dir / info.name):
            try:
                why = name_taken(self.ckpt_dir / info.name, info.step)
            except ValueError:
                return False  # being written: not on disk yet
            if why is None:
                return True
            self._report([f"{why}; the memory checkpoint of that step is newer than anything valid on disk"])
            return False
        c = cat.scan(self.ckpt_dir, self.get_cfg().checkpoints.pattern, stats=False)
        return any(e.valid and e.step >= info.step and e.name not in self.avoid for e in c.entries)

    def _report(self, problems: list) -> None:
        for p in problems:
            if getattr(p, "kind", None) == Kind.IN_PROGRESS:
                continue  # a trainer copying into a slot: the normal case, not a problem
            if str(p) not in self.reported:
                self.reported.add(str(p))
                self.log.warning("memory slot ignored", region=str(self.path), reason=str(p))

    SUPERSEDED_RETRIES = 3

    def persist_newest(self, why: str) -> Optional[Persisted]:
        """Persist the newest committed slot if the disk has nothing as new. Never raises. A slot its trainer
        rewrote before it could be pinned (it saved twice meanwhile) is no failure: the newest is read again."""
        if not self.active:
            return None
        with self.mutex:
            for _ in range(self.SUPERSEDED_RETRIES):
                newest = None
                try:
                    newest, problems = self.region.newest(self.ckpt_dir)
                    self._report(problems)
                    if newest is None:
                        return None
                    if self._on_disk(newest):
                        self.last_gen = newest.gen
                        return None
                    if (str(newest.path), newest.seq) in self.failed:
                        return None
                except (OSError, ValueError, CkptError) as exc:
                    self.log.error("could not read the memory region; the disk checkpoints stand",
                                   region=str(self.path), why=why, error=str(exc))
                    return None
                r = self._persist(newest, why)
                if r is not None or (str(newest.path), newest.seq) in self.failed:
                    return r
            return None  # superseded each time: the next tick takes the newest again

    def _persist(self, info: SlotInfo, why: str, pinned: Optional[Pinned] = None) -> Optional[Persisted]:
        """Persist one slot (the caller holds self.mutex); log and remember the outcome. Never raises."""
        self.persisting = info.step
        try:
            r = persist_slot(info, self.ckpt_dir, pinned=pinned, phase=self.on_phase)
        except SlotSuperseded as exc:
            # the trainer went on saving (every_steps: 1 against a persist): the newer state is persisted instead
            self.log.info("memory checkpoint superseded by a newer one before it was persisted", step=info.step,
                          why=why, detail=str(exc))
            return None
        except (OSError, ValueError, CkptError) as exc:
            self.failed.add((str(info.path), info.seq))
            self.log.error("could not persist the memory checkpoint; the disk checkpoints stand", region=str(self.path),
                           why=why, step=info.step, error=str(exc))
            return None
        finally:
            self.persisting = None
        self.last_gen = max(self.last_gen or 0, info.gen)
        self.last_persist_at = self.clock()
        self._persisted_names.add(info.name)
        if r.path is not None:
            self.persisted += 1
            self.last = {"step": r.step, "seconds": round(r.seconds, 3), "bytes": r.bytes, "why": why,
                         "time": time.time()}
            self.log.info("persisted a memory checkpoint", checkpoint=r.path.name, why=why,
                          seconds=round(r.seconds, 2), mib=round(r.bytes / 2**20, 1))
        return r

    def breakpoint(self, why: str = "the trainer exited", avoid: Optional[set[str]] = None) -> Optional[SlotInfo]:
        """At the breakpoint (the trainer is gone): the newest committed slot, if the disk has nothing as
        new, verified in memory, recorded for the trainer's load (verify once) and pinned; it is persisted
        in the background (`drain`) while the trainer restarts from it. None: resume from the disk (no
        such slot, or it failed verification, which is logged with its reason). Never raises."""
        if not self.active:
            return None
        if avoid is not None:
            self.avoid = set(avoid)
        self.region.remove_scratch()  # staging and resume copies of trainers that are gone
        with self.pin_lock:
            newest = None
            try:
                newest, problems = self.region.newest(self.ckpt_dir)
                self._report(problems)
                if newest is None:
                    return None
                for p, _ in self.queue + self.inflight:
                    if p.info.path == newest.path and p.info.seq == newest.seq:
                        return newest  # already verified and waiting to be persisted
                if self._on_disk(newest):
                    self.last_gen = max(self.last_gen or 0, newest.gen)
                    return None
                if (str(newest.path), newest.seq) in self.unusable:
                    return None
                # (a slot whose persist failed, e.g. on a full disk, is still the newest state: resume from it)
                pinned = verify_and_pin(newest)
            except (OSError, ValueError, CkptError) as exc:
                if newest is not None and not isinstance(exc, SlotSuperseded):  # a rewritten slot is not damaged
                    self.unusable.add((str(newest.path), newest.seq))
                self.log.error("the newest memory checkpoint is not usable; resuming from the disk", region=str(self.path),
                               why=why, error=str(exc))
                return None
            record_verified(self.ckpt_dir, pinned)
            self.queue.append((pinned, why))
            self.log.info("verified the memory checkpoint at the breakpoint; persisting it in the background",
                          step=newest.step, seconds=round(pinned.seconds, 3), why=why)
        self.wake.set()
        return newest

    def drain(self) -> None:
        """Persist the slots the breakpoint pinned, oldest first (the persist thread, and stop). Never raises."""
        while True:
            with self.pin_lock:
                if not self.queue:
                    break
                item = self.queue.pop(0)
                self.inflight.append(item)
            try:
                with self.mutex:
                    self._persist(item[0].info, item[1], item[0])
            finally:
                with self.pin_lock:
                    self.inflight = [q for q in self.inflight if q is not item]
                item[0].release()
        with self.mutex:  # one another thread took is finished too
            pass

    def due(self) -> bool:
        """Cadence: every persist_every-th memory checkpoint, or persist_every_s after the last persist."""
        if not self.active:
            return False
        mc = self.get_cfg().checkpoints.memory
        newest, problems = self.region.newest(self.ckpt_dir)
        self._report(problems)
        if newest is None:
            return False
        if (str(newest.path), newest.seq) not in self._start_slots:
            self._seen_memory = True
        if self.last_gen is None:
            self.last_gen = newest.gen - 1 if newest.gen else 0
        if newest.gen <= self.last_gen:
            return False
        if newest.gen - self.last_gen >= mc.persist_every:
            return True
        return mc.persist_every_s is not None and self.clock() - self.last_persist_at >= mc.persist_every_s

    def run(self, stop: threading.Event, interval_s: float = 0.2) -> None:
        try:  # persisting yields the CPU to a trainer that starts or trains beside it (this thread only)
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
        except (OSError, AttributeError):
            pass
        while not stop.is_set():
            try:
                self.drain()
                if self.due():
                    self.persist_newest("cadence")
                self.check_unused()
            except Exception as exc:  # one bad tick must not end persistence
                self.log.exception("memory agent tick failed; retrying", error=str(exc))
            self.wake.wait(interval_s)
            self.wake.clear()

    UNUSED_CHECK_S = 5.0

    def _disk_names(self) -> set[str]:
        from ckpt_daemon.store import catalog as cat

        c = cat.scan(self.ckpt_dir, self.get_cfg().checkpoints.pattern, stats=False)
        return {e.name for e in c.entries}

    def check_unused(self) -> Optional[str]:
        """Warn once when memory is on but the trainer saves to disk and has never saved to memory (a plain
        torch.save script, a trainer without the callbacks): it gets nothing from memory checkpoints, and
        the status would show a region that is active with nothing in it. A catalog scan at most every
        UNUSED_CHECK_S, and none once a memory save was seen or the warning given."""
        if not self.active or self.warning is not None or self._seen_memory:
            return self.warning
        now = self.clock()
        if now < self._next_unused_check:
            return None
        self._next_unused_check = now + self.UNUSED_CHECK_S
        newest, _ = self.region.newest(self.ckpt_dir)
        if newest is not None and (str(newest.path), newest.seq) not in self._start_slots:
            self._seen_memory = True
            return None
        names = self._disk_names()
        if self._start_disk is None:
            self._start_disk = names
            return None
        new = sorted(names - self._start_disk - self._persisted_names)
        if not new:
            return None
        self.warning = (f"Memory checkpoints are on (checkpoints.memory.enabled) but the trainer saved {new[0]} to "
                        "disk and has never saved to memory, so they do nothing for this run (a plain torch.save "
                        "script saves to disk only). Save through CheckpointManager(memory=True) or the Hugging Face "
                        "or Lightning callback, or set checkpoints.memory.enabled: false.")
        self.log.warning(self.warning, region=str(self.path))
        return self.warning

    def snapshot(self) -> dict:
        newest = None
        if self.active:
            s, _ = self.region.newest(self.ckpt_dir)
            newest = {"step": s.step, "bytes": s.nbytes, "time": s.time, "skipped": s.skipped} if s else None
        return {"enabled": True, "active": self.active, "region": str(self.path), "error": self.error,
                "newest": newest, "persisted": self.persisted, "last_persist": self.last,
                "persisting": self.persisting, "warning": self.warning}


def remove_stale_region(path: Path) -> bool:
    """Remove a region nobody holds (tests, tools). True if removed."""
    lock = RegionLock(path)
    if not os.path.isdir(path):
        return False
    if not lock.acquire():
        return False
    try:
        Region(path).remove()
        shutil.rmtree(path, ignore_errors=True)
    finally:
        lock.release()
    return True
