"""The trainer's side of memory-first checkpoints: copy the state into a shared-memory slot, and load
the newest committed slot back (see ckpt_daemon/memory.py for the slot format and commit protocol).

`MemoryWriter.save(prepared)` pauses the caller only for the copy of the tensors into the slot (one
memcpy, or one device-to-host copy); a background thread then checksums the slot's files, writes the
manifest and the header, and commits. The next save waits for that commit, so at most one is in flight.

A save only ever targets the slot that does not hold the newest committed state: a trainer killed at any
instant leaves that state whole. While the daemon holds that other slot (it persists or verifies the older
state, with a shared flock), a save made on the training thread is skipped and counted (the next one goes
in as soon as the daemon lets go; skipping costs nothing the promise covers, a SIGKILL resumes from the
newest committed state), and a background save (`save_files(background=True)`) waits for the slot on its
own thread. A third slot would avoid the skips at the cost of a third copy of the state in RAM: the skips
last only as long as a persist, one in `persist_every` saves, while the memory is paid all the time.
"""

from __future__ import annotations

import fcntl
import json
import logging
import mmap
import os
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from ckpt_daemon import devio
from ckpt_daemon import memory as mem
from ckpt_daemon.errors import CheckpointError
from ckpt_daemon.fsutil import default_checksum, free_bytes, record_checksum
from ckpt_daemon.store import manifest as mf
from ckpt_daemon.store import safetensors_file as stfile
from ckpt_daemon.store.names import step_in_name
from ckpt_daemon.store.statecodec import decode

log = logging.getLogger("ckpt_daemon.memsave")


def _u8(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    if not t.is_contiguous():
        t = t.contiguous()
    return t.reshape(-1).view(torch.uint8)


class _Slot:
    def __init__(self, path: Path):
        self.path = path
        self.fd = _open_slot_file(path)
        self.mm: Optional[mmap.mmap] = None
        self.size = 0
        self.buf: Optional[torch.Tensor] = None  # uint8 view of the whole mapping
        self.host: Optional[devio.HostMapping] = None  # its pages faulted in; registered with CUDA for a GPU state

    def ensure(self, size: int, pin: bool = False) -> None:
        """Reserve and map the first `size` bytes (fallocate: a tmpfs that fills later never SIGBUSes a
        write into us). Only that range: a larger file (a bigger state before, a sparse file of any size
        someone left) is neither allocated nor mapped beyond it, and never shrunk (it may be the newest
        committed state, which a reader maps whole). The pages are faulted in now, and with `pin` (a GPU
        state) registered as pinned memory: a save's copy then neither faults nor stages (devio)."""
        if self.size >= size:
            if pin:
                self.pin()
            return
        os.posix_fallocate(self.fd, 0, size)
        self.unmap()
        self.size = size
        self.mm = mmap.mmap(self.fd, self.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.host = devio.HostMapping(self.mm, self.size)
        if pin:
            self.pin()
        self.buf = torch.frombuffer(self.mm, dtype=torch.uint8)

    def pin(self) -> bool:
        return self.host is not None and self.host.pin()

    def unmap(self) -> None:
        if self.host is not None:
            self.host.release()  # unregistered before the mapping goes
            self.host = None
        self.buf = None
        if self.mm is not None:
            try:
                self.mm.close()
            except BufferError:  # a view still alive: the mapping goes with it
                pass
            self.mm = None

    def seq(self) -> int:
        raw = os.pread(self.fd, 8, mem.SEQ_OFFSET)
        return struct.unpack("<Q", raw)[0] if len(raw) == 8 else 0

    def close(self) -> None:
        self.unmap()
        os.close(self.fd)


def _open_slot_file(path: Path) -> int:
    """Open (or create) a slot file for writing. Whatever the region's rules reject in its place (a folder,
    a symlink, a FIFO, a socket, another user's file: `memory.entry_problem`) is reported and set aside
    first, so that garbage left in the region never stops a trainer. Raises MemoryCheckpointError if the
    name is taken again by something else meanwhile."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    why = mem.entry_problem(st) if st is not None else None
    if why:
        try:
            moved = mem.set_aside(path, why)
        except OSError as exc:
            raise mem.MemoryCheckpointError(
                f"{path} {why} and cannot be moved out of the way ({exc.strerror or exc}). Remove it by hand, or set "
                "checkpoints.memory.dir to another folder.") from exc
        log.warning("memory slot %s %s; %s", path, why,
                    f"moved to {moved.name}" if moved else "removed (it holds no data)")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, 0o600)
    why = mem.entry_problem(os.fstat(fd))
    if why:
        os.close(fd)
        raise mem.MemoryCheckpointError(f"{path} {why}: something in the memory region keeps replacing the slots. "
                                        "Set checkpoints.memory.dir to a folder of your own.")
    return fd


class MemoryWriter:
    """Writes CheckpointManager states into a region's slots."""

    #: How long a background save waits for the slot the daemon holds (it persists the older state) before
    #: it gives up (its `after(False)` then writes it elsewhere).
    busy_wait_s = 600.0
    BUSY_POLL_S = 0.02

    def __init__(self, region_dir: str | os.PathLike, ckpt_dir: Path, max_bytes: Optional[int] = None):
        self.region = mem.Region(region_dir)
        self.ckpt_dir = Path(ckpt_dir)
        self.max_bytes = max_bytes
        mem.private_dir(self.region.path)
        self.slots = []
        try:
            for i in range(len(mem.SLOTS)):
                self.slots.append(_Slot(self.region.slot_path(i)))
        except BaseException:
            for sl in self.slots:
                sl.close()
            raise
        self._thread: Optional[threading.Thread] = None
        self._error: Optional[BaseException] = None
        self._locked: Optional[int] = None
        self.last_stall_s = 0.0
        self.last_commit_s = 0.0
        self.saves = 0
        self.skipped = 0
        self.boot = mem.boot_id()
        self._gen = max((s.gen for s in self.region.slots()[0]), default=0)
        self.pin_slots = False  # a GPU state: the slots are registered as pinned memory when reserved
        self._reserve_error: Optional[BaseException] = None

    def reserve_in_background(self, payload_bytes: int, gpu: bool = False) -> None:
        """`reserve` on the writer's thread: training goes on meanwhile (a restart's first step is not delayed);
        the first save waits for it (join), and an error surfaces there."""
        self.join()

        def run() -> None:
            try:
                self.reserve(payload_bytes, gpu)
            except BaseException as exc:  # raised as it is by the next save's join (its message is the user's)
                self._reserve_error = exc

        self._thread = threading.Thread(target=run, name="memory-reserve", daemon=True)
        self._thread.start()

    def reserve(self, payload_bytes: int, gpu: bool = False) -> None:
        """Reserve every slot for a state of about `payload_bytes` now, before the first save: the space
        (fallocate), the pages (faulted in) and, for a GPU state, the registration as pinned memory, all paid
        here rather than inside the first saves' copies. A larger state later grows the slots at that save.
        Raises MemoryCheckpointError when the region cannot hold two copies."""
        self.pin_slots = self.pin_slots or gpu
        # the files' safetensors headers and state.json: a few hundred bytes a tensor, well within the margin
        # slot_capacity adds; the manifest's room as _write reserves it
        size = mem.PAYLOAD_OFFSET + mem.slot_capacity(int(payload_bytes) + (64 << 10) + (1 << 20))
        self._reserve(None, size)

    # -- save ---------------------------------------------------------------------------------------
    def join(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._reserve_error is not None:
            err, self._reserve_error = self._reserve_error, None
            raise err
        if self._error is not None:
            err, self._error = self._error, None
            raise CheckpointError(f"The memory checkpoint could not be committed: {err}") from err

    def _target(self) -> Optional[int]:
        """The slot to write, locked exclusively: never the one holding the newest committed state of this
        checkpoint folder (a kill mid-copy must leave it whole). None when the other one is held (the
        daemon persists or verifies it)."""
        good, _ = self.region.slots()
        mine = [s for s in good if s.boot_id == self.boot
                and os.path.abspath(s.ckpt_dir) == os.path.abspath(self.ckpt_dir)]
        newest = mine[0].index if mine else None
        for i in range(len(self.slots)):
            if i == newest:
                continue
            try:
                fcntl.flock(self.slots[i].fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return i
            except OSError:
                continue
        return None

    def _wait_for_target(self, step: int) -> int:
        """`_target`, waiting (on the writer's thread) while the daemon holds the slot; raises
        CheckpointError after busy_wait_s."""
        deadline = time.monotonic() + self.busy_wait_s
        waited = False
        while (i := self._target()) is None:
            if time.monotonic() > deadline:
                raise CheckpointError(f"the memory slot for step {step} stayed busy for {self.busy_wait_s:.0f} s "
                                      "(the daemon holds it to persist the older state)")
            waited = True
            time.sleep(self.BUSY_POLL_S)
        if waited:
            log.debug("memory checkpoint at step %d waited for the daemon to release its slot", step)
        return i

    def _skip(self, step: int) -> None:
        self.skipped += 1
        (log.info if self.skipped == 1 else log.debug)(
            "memory checkpoint at step %d skipped: the daemon holds the other slot to persist it, and the newest "
            "committed state is never written over (skipped saves are counted: %d so far; the daemon's status "
            "shows them)", step, self.skipped)

    def save(self, p) -> bool:
        """Copy the prepared state (checkpoint._Prepared, tensors not yet copied) into a slot and commit
        it in the background. Returns False if the save was skipped (the daemon holds the slot it would go
        into; nothing written, counted in `skipped`)."""
        from ckpt_daemon.checkpoint import STATE_SHARD_BYTES, STATE_TENSORS, shard_tensors

        self.join()
        t0 = time.perf_counter()
        shards = shard_tensors(p.state, STATE_SHARD_BYTES)
        names = [STATE_TENSORS] if len(shards) == 1 else [
            f"state-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
        parts = [(mf.MODEL_FILE, p.model, p.model_meta)] + [(n, sh, {"format": "ckpt-daemon/1"}) for n, sh in zip(names, shards)]
        state_json = mem.json_bytes(p.state_json)
        # Layout: each file at a 4 KiB boundary; manifest.json last (its size is known only after hashing,
        # so it gets generous room).
        layout = []
        off = 0
        for name, tensors, meta in parts:
            head = stfile.header_for(tensors, meta)
            size = len(head) + sum(t.numel() * t.element_size() for t in tensors.values())
            layout.append((name, off, size, head, tensors))
            off = -(-(off + size) // mem.ALIGN) * mem.ALIGN
        layout.append(("state.json", off, len(state_json), state_json, None))
        off = -(-(off + len(state_json)) // mem.ALIGN) * mem.ALIGN
        return self._write(p.step, layout, off, p.manifest_extra, t0, None)

    def save_files(self, step: int, name: str, layout: str, files: list[tuple[str, object]],
                   manifest_extra: Optional[dict] = None, background: bool = False,
                   after: Optional[Callable[[bool], None]] = None) -> bool:
        """Copy the files of another trainer's checkpoint (name -> bytes-like: bytes, a memoryview, a uint8
        numpy array) into a slot and commit it in the background. The daemon persists it as `name` in the
        checkpoint folder: a folder of these files (layout "folder", e.g. Hugging Face's checkpoint-<step>)
        or one file (layout "file": `files` holds exactly one, named `name`). Returns False if the save was
        skipped (as `save`). Raises CheckpointError for names the daemon would refuse.

        background=True: the copy too runs on the commit thread (the buffers must stay as they are until
        it ends: files a trainer wrote and no longer touches), which waits up to busy_wait_s for a slot the
        daemon holds instead of skipping (always True); `after(committed)` is called there once it is done
        (e.g. to remove those files, or to write them to disk if the commit failed). The next save waits
        for it."""
        from ckpt_daemon.errors import CheckpointError

        if (layout not in ("folder", "file") or not mem.safe_name(name) or len(name) > mem.MAX_TARGET
                or name in mem.RESERVED_TARGETS):
            raise CheckpointError(f"cannot keep {name!r} ({layout}) in memory: not a plain checkpoint name")
        if step_in_name(name) != step:
            raise CheckpointError(f"cannot keep {name!r} in memory as step {step}: its name must carry that step")
        names = [n for n, _ in files]
        if layout == "file" and names != [name]:
            raise CheckpointError("a single-file memory checkpoint holds exactly the file it is named after")
        if not files or len(set(names)) != len(names) or mf.MANIFEST in names or not all(map(mem.safe_name, names)):
            raise CheckpointError(f"cannot keep {name!r} in memory: its file names must be plain, distinct, and not "
                                  f"{mf.MANIFEST}")
        self.join()
        t0 = time.perf_counter()
        entries = []
        off = 0
        for fname, data in files:
            arr = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else data.reshape(-1).view(np.uint8)
            entries.append((fname, off, arr.size, arr, None))
            off = -(-(off + arr.size) // mem.ALIGN) * mem.ALIGN
        return self._write(step, entries, off, manifest_extra or {}, t0, {"name": name, "layout": layout},
                           background, after)

    def _write(self, step: int, layout: list, off: int, manifest_extra: dict, t0: float,
               target: Optional[dict], background: bool = False, after: Optional[Callable[[bool], None]] = None) -> bool:
        """Copy `layout` ((name, offset, size, head bytes, tensors or None), files at `off` and beyond are
        free for the manifest) into a free slot, then hash and commit in the background. With background=True
        the copy runs on the commit thread too, which waits for a slot the daemon holds; otherwise a save
        that finds it held is skipped (False)."""
        payload_need = off + (64 << 10) + 512 * len(layout)  # the manifest's room after the files
        files = [(name, o, size) for name, o, size, _, _ in layout]
        if background:
            self.last_stall_s = time.perf_counter() - t0
            rest = (manifest_extra, files, off, target)
            self._thread = threading.Thread(target=self._write_in_background,
                                            args=(step, layout, payload_need, rest, after),
                                            name=f"memory-commit-{step}", daemon=True)
            self._thread.start()
            self.saves += 1
            return True
        i = self._target()
        if i is None:
            self._skip(step)
            return False
        odd = self._fill(i, layout, payload_need)
        self.last_stall_s = time.perf_counter() - t0
        self._gen += 1
        self._error = None
        self._thread = threading.Thread(target=self._commit, args=(i, odd + 1, self._gen, step, manifest_extra, files,
                                                                   off, target),
                                        name=f"memory-commit-{step}", daemon=True)
        self._thread.start()
        self.saves += 1
        return True

    def _fill(self, i: int, layout: list, payload_need: int) -> int:
        """Mark slot i (locked by us) as being written and copy `layout` into it. Returns the odd seq; on an
        error the slot is unlocked and the error raised."""
        slot = self.slots[i]
        try:
            gpu = devio.state_on_gpu(t for _, _, _, _, ts in layout if ts for t in ts.values())
            self.pin_slots = self.pin_slots or gpu
            if slot.size < mem.PAYLOAD_OFFSET + payload_need:
                self._reserve(slot, mem.PAYLOAD_OFFSET + mem.slot_capacity(payload_need))
            elif gpu:
                slot.pin()  # reserved before the state was known to be on a GPU: registered once, now
            seq = slot.seq()
            odd = seq + 1 if seq % 2 == 0 else seq + 2
            # from here on the slot is not committed (a reader sees a slot being written)
            mem.FIXED.pack_into(slot.mm, 0, mem.MAGIC, mem.VERSION, 0, odd, 0, 0)
            base = mem.PAYLOAD_OFFSET
            buf = slot.buf
            npbuf = buf.numpy()
            for _name, o, size, head, tensors in layout:
                start = base + o
                if isinstance(head, np.ndarray):  # raw bytes of a file: copied in pieces by every core
                    _copy_parallel(npbuf[start:start + size], head)
                    continue
                buf[start:start + len(head)] = torch.frombuffer(bytearray(head), dtype=torch.uint8)
                pos = start + len(head)
                if tensors is None:
                    continue
                for t in tensors.values():
                    n = t.numel() * t.element_size()
                    if n and t.device.type == "cpu" and n < SMALL_COPY:
                        # a plain memcpy: torch's copy_ runs a parallel region per call, whose threads
                        # wait on each other; on a busy machine that costs milliseconds per small tensor
                        np.copyto(npbuf[pos:pos + n], _u8(t).numpy())
                    elif n:
                        buf[pos:pos + n].copy_(_u8(t), non_blocking=t.device.type != "cpu")
                    pos += n
            if gpu:
                torch.cuda.synchronize()
            return odd
        except BaseException:
            fcntl.flock(slot.fd, fcntl.LOCK_UN)
            raise

    def _reserve(self, slot: _Slot, size: int) -> None:
        if self.max_bytes is not None and 2 * size > self.max_bytes:
            raise mem.capacity_error(self.region.path, size, 0, self.max_bytes)
        # Both slots are reserved at the first save: a region that cannot hold two copies is refused now,
        # not at the second save. Pages a slot file already holds (a previous trainer's) count as ours.
        need = sum(max(0, size - os.fstat(s.fd).st_blocks * 512) for s in self.slots)
        free = free_bytes(self.region.path)
        if need > free:
            raise mem.capacity_error(self.region.path, size, free + sum(os.fstat(s.fd).st_blocks * 512 for s in self.slots))
        try:
            for s in self.slots:
                s.ensure(size, pin=self.pin_slots)
        except OSError as exc:
            raise mem.capacity_error(self.region.path, size, free_bytes(self.region.path)) from exc

    def _write_in_background(self, step: int, layout: list, payload_need: int, rest: tuple,
                             after: Optional[Callable[[bool], None]]) -> None:
        """The commit thread of a background save: wait for a slot, copy, commit, then `after(committed)`."""
        self._error = None
        try:
            try:
                i = self._wait_for_target(step)
                odd = self._fill(i, layout, payload_need)
            except BaseException as exc:
                self._error = exc
                return
            self._gen += 1
            manifest_extra, files, off, target = rest
            self._commit(i, odd + 1, self._gen, step, manifest_extra, files, off, target)
        finally:
            if after is not None:
                failed = self._error
                try:
                    after(failed is None)
                    if failed is not None:
                        log.warning("memory checkpoint at step %s not committed (%s); its writer saved it elsewhere",
                                    step, failed)
                        self._error = None  # dealt with: the next save need not fail for it
                except Exception as exc:  # noqa: BLE001 - a cleanup; the commit stands
                    log.error("after the memory commit of step %s: %s", step, exc)

    def _commit(self, i: int, even: int, gen: int, step: int, manifest_extra: dict, files: list,
                manifest_off: int, target: Optional[dict]) -> None:
        slot = self.slots[i]
        t0 = time.perf_counter()
        try:
            base = mem.PAYLOAD_OFFSET
            mv = memoryview(slot.mm)

            def digest(entry):
                name, o, size = entry
                part = mv[base + o:base + o + size]
                try:
                    return name, {"size": size, **mem.file_digest(part)}
                finally:
                    part.release()

            with ThreadPoolExecutor(max_workers=min(len(files), os.cpu_count() or 1, 8)) as pool:
                entries = dict(pool.map(digest, files))
            manifest = mf.dumps_manifest(mf.build_manifest(step, entries, **manifest_extra), default_checksum())
            if base + manifest_off + len(manifest) > slot.size:
                raise CheckpointError("the manifest does not fit the slot")
            slot.mm[base + manifest_off:base + manifest_off + len(manifest)] = manifest
            all_files = files + [(mf.MANIFEST, manifest_off, len(manifest))]
            import hashlib

            header = json.dumps({"step": step, "gen": gen, "files": [list(f) for f in all_files],
                                 "manifest_sha256": hashlib.sha256(manifest).hexdigest(), "boot_id": self.boot,
                                 "pid": os.getpid(), "ckpt_dir": str(self.ckpt_dir), "time": time.time(),
                                 "skipped": self.skipped, **({"target": target} if target else {})}).encode()
            if len(header) > mem.HEADER_MAX:
                raise CheckpointError("the slot header is too large (too many files)")
            mv.release()
            payload_len = manifest_off + len(manifest)
            slot.mm[mem.JSON_OFFSET:mem.JSON_OFFSET + len(header)] = header
            struct.pack_into("<8sII", slot.mm, 0, mem.MAGIC, mem.VERSION, 0)
            struct.pack_into("<QQ", slot.mm, 24, len(header), payload_len)
            struct.pack_into("<Q", slot.mm, mem.SEQ_OFFSET, even)  # the commit: written last
            self.last_commit_s = time.perf_counter() - t0
        except BaseException as exc:
            self._error = exc
        finally:
            fcntl.flock(slot.fd, fcntl.LOCK_UN)

    def close(self) -> None:
        try:
            self.join()
        finally:
            for s in self.slots:
                s.close()


def _copy_parallel(dst: np.ndarray, src: np.ndarray) -> None:
    """dst[:] = src, in COPY_PIECE pieces on every core for a large buffer."""
    n = src.size
    if n <= COPY_PIECE:
        np.copyto(dst[:n], src)
        return

    def piece(lo: int) -> None:
        np.copyto(dst[lo:min(n, lo + COPY_PIECE)], src[lo:min(n, lo + COPY_PIECE)])

    with ThreadPoolExecutor(max_workers=min(os.cpu_count() or 1, 8)) as pool:
        list(pool.map(piece, range(0, n, COPY_PIECE)))


# ---------------------------------------------------------------------------------------------- load
COPY_PIECE = 64 << 20
SMALL_COPY = 4 << 20  # tensors below this are copied with one memcpy, not torch's parallel copy_


def read_slot_state(region_dir: str | os.PathLike, ckpt_dir: Path, map_location="cpu",
                    info: Optional[mem.SlotInfo] = None) -> tuple[Optional[dict], Optional[str]]:
    """The newest committed slot's state as `checkpoint.read_checkpoint` returns it, copied into private
    memory and verified (sizes, checksums, seq unchanged). (None, why) if there is none usable."""
    from ckpt_daemon.checkpoint import STATE_JSON, join_tied

    region = mem.Region(region_dir)
    if info is None:
        info, problems = region.newest(ckpt_dir)
        for pr in problems:
            log.warning("memory slot ignored: %s", pr)
        if info is None:
            return None, "no committed memory checkpoint"
    try:
        fd, mm = mem.open_slot_readonly(info)
    except OSError as exc:
        return None, f"{info.path.name} cannot be opened ({exc})"
    try:
        base = mem.PAYLOAD_OFFSET
        mo, ms = info.files[-1][1], info.files[-1][2]
        try:
            m = mem.check_manifest_bytes(bytes(mm[base + mo:base + mo + ms]), info)
        except ValueError as exc:
            return None, f"{info.path.name}: {exc}"
        # Verify once per restart: the daemon hashed this very slot at the breakpoint and holds it since;
        # then the copy is checked by seq alone (below). Otherwise every file is hashed as it is copied.
        trusted = mem.verified_by_daemon(ckpt_dir, info, fd)
        src = np.frombuffer(mm, dtype=np.uint8)

        wanted = [f for f in info.files if f[0] != mf.MANIFEST]
        # Onto a GPU: the tensor files go from the slot through pinned buffers to the device, hashed on the way.
        to_device = [f for f in wanted if f[0].endswith(".safetensors")] if devio.is_gpu(map_location) else []
        dev_bufs: dict = {}
        if to_device:
            try:
                jobs = [devio.ReadJob(name, src[base + o:base + o + size], size,
                                      *((None, None) if trusted else record_checksum(m["files"][name])))
                        for name, o, size in to_device]
                dev_bufs = devio.read_to_device(jobs, map_location)
            except ValueError as exc:  # devio.ReadError, or a manifest record without a usable checksum
                return None, f"{info.path.name}: {exc}"
            finally:
                jobs = None  # noqa: F841  (its views of the mapping go before the mapping is closed)
            wanted = [f for f in wanted if f not in to_device]
        bufs = {name: np.empty(size, dtype=np.uint8) for name, _, size in wanted}
        # copied in pieces by every core (one large file need not be copied by one thread)
        pieces = [(name, o + lo, lo, min(size, lo + COPY_PIECE)) for name, o, size in wanted
                  for lo in range(0, size, COPY_PIECE)]

        def copy(piece):
            name, at, lo, hi = piece
            np.copyto(bufs[name][lo:hi], src[base + at:base + at + hi - lo])

        def check(entry):
            return None if mem.digest_matches(m["files"][entry[0]], bufs[entry[0]]) else entry[0]

        with ThreadPoolExecutor(max_workers=max(1, min(len(pieces), os.cpu_count() or 1, 8))) as pool:
            list(pool.map(copy, pieces))
            bad = [] if trusted else [n for n in pool.map(check, wanted) if n]
        src = None  # drop the view of the mapping before it is closed
        bufs.update(dev_bufs)
        if mem.read_seq(info.path) != info.seq:
            return None, f"{info.path.name} was rewritten while it was read"
        if bad:
            return None, f"{info.path.name}: {', '.join(bad)} fails its checksum"
    finally:
        try:
            mm.close()
        except BufferError:
            pass
        os.close(fd)
    try:
        model, meta = stfile.parse_safetensors(bufs[mf.MODEL_FILE])
        join_tied(model, meta)
        state_t: dict = {}
        for name in sorted(n for n in bufs if n.startswith("state") and n.endswith(".safetensors")):
            state_t.update(stfile.parse_safetensors(bufs[name])[0])
        skeleton = json.loads(bytes(bufs[STATE_JSON])) if STATE_JSON in bufs else {}
    except (ValueError, KeyError, TypeError) as exc:
        return None, f"{info.path.name} holds a malformed state ({exc})"
    if dev_bufs:
        state_t = devio.host_side(state_t)  # RNG, scheduler, data state: CPU; the optimizer's moments: the GPU
    if map_location not in ("cpu", torch.device("cpu")):
        model = {k: v.to(map_location) for k, v in model.items()}
    out = {k: decode(skeleton.get(k), state_t) for k in ("optimizer", "scheduler", "scaler", "rng", "data", "extra")}
    out.update(model=model, config=skeleton.get("config") or {}, manifest=m)
    out["data"] = out["data"] or {}
    out["extra"] = out["extra"] or {}
    out["slot"] = info
    return out, None

