"""Memory-first checkpoints: the shared-memory region, its slot format and commit protocol, reading a
committed slot, and persisting one as a native checkpoint (no torch here: the daemon uses all of it).

A region is a folder on a tmpfs (`/dev/shm/ckpt-daemon-<id>/` by default) holding two slot files,
`slot-0` and `slot-1` (double buffering: a save always goes into the slot that does not hold the newest
committed state, so a trainer killed mid-copy leaves the other one whole), and `region.lock`, held
(flock) by the daemon that persists the region for as long as it lives.

A slot file is a 1 MiB header area followed by the payload:

    0   magic  b"CKPTMEM\\x01"           16  seq    u64 (odd: being written; even: committed)
    8   version u32, flags u32          24  header length u64 (the JSON at 64)
                                        32  payload length u64; 40..63 reserved
    64  JSON header: step, gen (a counter across both slots: the newest commit has the highest), files
        [[name, offset, size], ...] (manifest.json last), manifest_sha256, boot_id, pid, ckpt_dir, time,
        and optionally target {name, layout}: what the slot becomes on disk (below)
    PAYLOAD_OFFSET: the exact bytes of the checkpoint's files, each at a 4 KiB boundary.

Layouts (`target.layout`): "native" (the default: `checkpoint-<step>/` with the slot's manifest.json),
"folder" (another trainer's folder, e.g. Hugging Face's `checkpoint-<step>/`: the slot's files without
the manifest, whose checksums become the folder's sidecar manifest) and "file" (one file, e.g. a
Lightning `epoch=0-step=500.ckpt`: the slot holds exactly that file, and the sidecar its checksum).

Commit protocol (a seqlock): the writer sets seq odd, copies the payload, hashes it, writes manifest.json
(whose checksums cover every other file) and the JSON header, and only then sets seq even. A reader takes
a header only with an even seq, and trusts what it copied only if seq is unchanged after the copy and
every checksum matches. The checksums are computed off the training thread, before the commit: the
training loop pauses only for the copy.

Slot headers are untrusted input (any process may write a tmpfs file; a trainer may die at any byte):
every size is bounded, every field's type is checked, file names are plain names, and a torn or garbage
header is reported as a reason, never raised.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import mmap
import os
import re
import shutil
import stat
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from ckpt_daemon import fsutil, runtime
from ckpt_daemon.errors import CkptError
from ckpt_daemon.fsutil import atomic_symlink, fsync_dir, is_hex64, loads_json_bounded
from ckpt_daemon.store import delete
from ckpt_daemon.store import manifest as mf
from ckpt_daemon.store.commit import Scratch
from ckpt_daemon.store.names import step_in_name
from ckpt_daemon.store.problems import Kind, Problem

MAGIC = b"CKPTMEM\x01"
VERSION = 1
FIXED = struct.Struct("<8sIIQQQ")  # magic, version, flags, seq, header length, payload length
SEQ_OFFSET = 16
JSON_OFFSET = 64
PAYLOAD_OFFSET = 1 << 20
HEADER_MAX = PAYLOAD_OFFSET - JSON_OFFSET
ALIGN = 4096
MAX_FILES = 4096
MAX_PAYLOAD = 1 << 44  # 16 TiB: beyond any host's memory
SLOTS = ("slot-0", "slot-1")
LOCK = "region.lock"
LAYOUTS = ("native", "folder", "file")
RESERVED_TARGETS = ("latest", "best", "snapshots")
MAX_TARGET = 200  # a target's sidecar is named after it, with a few characters more: keep under NAME_MAX
#: Folders trainers make in the region next to the slots: `staging-<pid>` (a trainer's own checkpoint
#: writer writes there before it is copied into a slot) and `resume-<pid>` (a slot copied out as files
#: for a loader that reads files). The daemon removes those of processes that are gone.
SCRATCH_PREFIXES = ("staging-", "resume-")
REJECTED_PREFIX = "rejected-"  # an entry a trainer found in a slot's place and moved aside (set_aside)
CHUNK = 16 << 20


class MemoryCheckpointError(CkptError):
    """Memory checkpoints cannot work as configured (e.g. the tmpfs cannot hold two copies)."""

    exit_code = 2


class SlotInProgress(ValueError):
    """A slot whose sequence number is odd: a trainer is copying into it (or died mid-copy)."""


class SlotSuperseded(ValueError):
    """The slot was rewritten by its trainer (or is being rewritten) after its header was read: a newer
    memory checkpoint is there, or is coming. Not a failure; whoever read it reads the region again."""


def boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()[:64]
    except OSError:
        return "unknown"


def default_region_dir(ckpt_dir: str | os.PathLike) -> Path:
    """/dev/shm/ckpt-daemon-<12 hex of the checkpoint folder's path>: one region per checkpoint folder."""
    digest = hashlib.sha256(os.fsencode(os.path.abspath(ckpt_dir))).hexdigest()[:12]
    return Path("/dev/shm") / f"ckpt-daemon-{digest}"


def region_dir_for(cfg) -> Path:
    """The region folder a config asks for (checkpoints.memory.dir, else the default)."""
    d = cfg.checkpoints.memory.dir
    return cfg.resolve_path(d) if d is not None else default_region_dir(cfg.checkpoint_dir)


def entry_problem(st: os.stat_result) -> Optional[str]:
    """Why a region entry with a slot's name is not usable as a slot (None if it is: a regular file of this
    user). The region is private (0700, ours): anything else there was put by hand or by another program."""
    if not stat.S_ISREG(st.st_mode):
        kind = ("a folder" if stat.S_ISDIR(st.st_mode) else "a symlink" if stat.S_ISLNK(st.st_mode)
                else "a FIFO" if stat.S_ISFIFO(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode)
                else "a device or other special file")
        return f"is not a regular file ({kind})"
    if st.st_uid != os.geteuid():
        return f"belongs to another user (uid {st.st_uid}), who could have forged it"
    return None


def set_aside(path: Path, why: str) -> Optional[Path]:
    """Get an entry the region's rules reject (`entry_problem`) out of a slot's way, never following it: a
    symlink, FIFO, socket or device node (no data of its own) is removed; a folder or another user's file is
    renamed `rejected-<name>-<ns>` next to it, kept for a person to look at. Returns the new name (None if
    removed). Raises OSError."""
    st = os.lstat(path)
    if stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode):
        dest = path.with_name(f"{REJECTED_PREFIX}{path.name}-{time.time_ns()}")
        os.rename(path, dest)
        return dest
    os.unlink(path)
    return None


def safe_name(name: Any) -> bool:
    return (isinstance(name, str) and 0 < len(name) <= 255 and "/" not in name and "\0" not in name
            and not name.startswith(".") and name not in ("..", "."))


def file_digest(data, algo: Optional[str] = None) -> dict:
    """The manifest record's checksum fields for `data` (a buffer), as native saves write them."""
    algo = algo or fsutil.default_checksum()
    h = fsutil.new_hasher(algo)
    mv = memoryview(data).cast("B")
    try:
        if algo == "sha256":
            for off in range(0, len(mv), CHUNK):
                h.update(mv[off:off + CHUNK])
        else:
            h.update(mv)  # one update: blake3 spreads it over every core
    finally:
        mv.release()
    return fsutil.digest_record(algo, h.hexdigest())


def digest_matches(meta: Any, data) -> bool:
    """Whether `data` matches the checksum of a manifest file record (False for a bad record)."""
    try:
        algo, want = fsutil.record_checksum(meta)
        got = file_digest(data, algo)
    except (ValueError, LookupError):
        return False
    return fsutil.record_checksum(got)[1] == want


def json_bytes(obj: Any) -> bytes:
    """JSON as native checkpoints write state.json (manifest.json: manifest.dumps_manifest)."""
    return (json.dumps(obj, indent=1, allow_nan=True) + "\n").encode()


# ------------------------------------------------------------------------------------------ header
@dataclass
class SlotInfo:
    """A committed slot, as its header says (validated, but its payload not yet checked)."""

    index: int
    seq: int
    gen: int
    step: int
    files: list[tuple[str, int, int]]  # (name, offset in the payload, size)
    manifest_sha256: str
    payload_len: int
    boot_id: str
    pid: int
    ckpt_dir: str
    time: float
    path: Path = field(default_factory=Path)
    target: str = ""  # the name it has on disk once persisted ("" for checkpoint-<step>)
    layout: str = "native"
    skipped: int = 0  # saves its writer skipped so far (the daemon held the other slot to persist it)

    @property
    def nbytes(self) -> int:
        return sum(s for _, _, s in self.files)

    @property
    def name(self) -> str:
        """The checkpoint's name in the checkpoint folder once persisted."""
        return self.target or f"checkpoint-{self.step}"


def parse_header(raw: bytes, file_size: int, index: int = 0) -> tuple[Optional[SlotInfo], Optional[Problem]]:
    """(SlotInfo, None) for a committed slot, or (None, why not). Never raises."""
    try:
        return _parse_header(raw, file_size, index), None
    except SlotInProgress as exc:
        return None, Problem(Kind.IN_PROGRESS, str(exc))
    except ValueError as exc:
        return None, Problem(Kind.INVALID, str(exc))
    except Exception as exc:  # untrusted bytes: whatever slips past the checks is a reason, not a crash
        return None, Problem(Kind.UNREADABLE, f"unreadable header ({exc.__class__.__name__})")


def _parse_header(raw: bytes, file_size: int, index: int) -> SlotInfo:
    if len(raw) < JSON_OFFSET:
        raise ValueError("empty or truncated (no header)")
    magic, version, _flags, seq, hlen, plen = FIXED.unpack_from(raw, 0)
    if magic != MAGIC:
        raise ValueError("not a ckpt-daemon memory slot (bad magic)")
    if version != VERSION:
        raise ValueError(f"written by an unknown format version {version}")
    if seq == 0:
        raise ValueError("never committed")
    if seq % 2:
        raise SlotInProgress("being written, or its writer died mid-copy (not committed)")
    if not 0 < hlen <= HEADER_MAX or JSON_OFFSET + hlen > len(raw):
        raise ValueError(f"has a corrupt header length {hlen}")
    if not 0 < plen <= MAX_PAYLOAD or PAYLOAD_OFFSET + plen > file_size:
        raise ValueError(f"has a payload length {plen} that does not fit its {file_size}-byte file")
    h = loads_json_bounded(raw[JSON_OFFSET:JSON_OFFSET + hlen], "the slot header")
    if not isinstance(h, dict):
        raise ValueError("has a header that is not a JSON object")
    step, gen = h.get("step"), h.get("gen")
    if not mf.is_step(step) or not mf.is_step(gen):
        raise ValueError("has no valid step or generation")
    files = h.get("files")
    if not isinstance(files, list) or not 1 <= len(files) <= MAX_FILES:
        raise ValueError("has no valid file list")
    out: list[tuple[str, int, int]] = []
    end = 0
    for item in files:
        if not (isinstance(item, list) and len(item) == 3):
            raise ValueError("has a malformed file entry")
        name, off, size = item
        if not safe_name(name):
            raise ValueError(f"names an unsafe file {str(name)[:60]!r}")
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (off, size)):
            raise ValueError(f"gives {name} no valid offset or size")
        if off < end or size < 0 or off + size > plen:
            raise ValueError(f"places {name} outside its payload or over another file")
        end = off + size
        out.append((name, off, size))
    names = [n for n, _, _ in out]
    if len(set(names)) != len(names) or names[-1] != mf.MANIFEST:
        raise ValueError("does not list manifest.json last, or lists a file twice")
    msha = h.get("manifest_sha256")
    if not is_hex64(msha):
        raise ValueError("has no valid manifest checksum")
    bid, pid, ck, t = h.get("boot_id"), h.get("pid"), h.get("ckpt_dir"), h.get("time")
    if not (isinstance(bid, str) and len(bid) <= 64 and isinstance(pid, int) and not isinstance(pid, bool)
            and isinstance(ck, str) and len(ck) <= 4096 and isinstance(t, (int, float)) and not isinstance(t, bool)):
        raise ValueError("has a malformed writer identity")
    layout, target = "native", ""
    tgt = h.get("target")
    if tgt is not None:
        if not isinstance(tgt, dict) or set(tgt) != {"name", "layout"}:
            raise ValueError("has a malformed target")
        layout, target = tgt["layout"], tgt["name"]
        if layout not in LAYOUTS:
            raise ValueError(f"names an unknown layout {str(layout)[:20]!r}")
        if not safe_name(target) or len(target) > MAX_TARGET or target in RESERVED_TARGETS:
            raise ValueError(f"names an unsafe target {str(target)[:60]!r}")
        if layout == "native" and target != f"checkpoint-{step}":
            raise ValueError(f"names a native target {target[:60]!r} that is not checkpoint-{step}")
        if layout != "native" and step_in_name(target) != step:
            raise ValueError(f"names a target {target[:60]!r} that does not carry its step {step}")
        if layout == "file" and names[:-1] != [target]:
            raise ValueError("has a single-file target but does not hold exactly that file")
    skipped = h.get("skipped", 0)
    if not mf.is_step(skipped):
        raise ValueError("has a malformed count of skipped saves")
    return SlotInfo(index, seq, gen, step, out, msha, plen, bid, pid, ck, float(t), target=target, layout=layout,
                    skipped=skipped)


def read_seq(path: Path) -> Optional[int]:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        raw = os.pread(fd, 8, SEQ_OFFSET)
        return struct.unpack("<Q", raw)[0] if len(raw) == 8 else None
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------------------ region
class Region:
    """The two slots of one region folder (reading; the torch side writes through memsave.py)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def slot_path(self, i: int) -> Path:
        return self.path / SLOTS[i]

    def exists(self) -> bool:
        return any(os.path.lexists(self.slot_path(i)) for i in range(len(SLOTS)))

    def read_slot(self, i: int) -> tuple[Optional[SlotInfo], Optional[Problem]]:
        """The committed header of slot i, or (None, why not; None if the slot file does not exist)."""
        p = self.slot_path(i)
        try:
            bad = entry_problem(os.lstat(p))  # what it is, before opening it (a socket cannot be opened)
            if bad:
                return None, Problem(Kind.INVALID, f"{p.name} {bad}")
            fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except FileNotFoundError:
            return None, None
        except OSError as exc:
            return None, Problem(Kind.UNREADABLE, f"{p.name} cannot be opened ({exc.strerror or exc})")
        try:
            st = os.fstat(fd)
            bad = entry_problem(st)
            if bad:
                return None, Problem(Kind.INVALID, f"{p.name} {bad}")
            raw = os.pread(fd, 4096, 0)  # the header is small: read the rest only if it says so
            if len(raw) >= JSON_OFFSET:
                hlen = struct.unpack_from("<Q", raw, 24)[0]
                if len(raw) < JSON_OFFSET + hlen <= PAYLOAD_OFFSET:
                    raw = os.pread(fd, JSON_OFFSET + hlen, 0)
        except OSError as exc:
            return None, Problem(Kind.UNREADABLE, f"{p.name} cannot be read ({exc.strerror or exc})")
        finally:
            os.close(fd)
        if raw[:8].strip(b"\0") == b"":
            return None, None  # reserved by a trainer, never written: nothing to report
        info, why = parse_header(raw, st.st_size, i)
        if info is not None:
            info.path = p
        return info, (Problem(why.kind, f"{p.name} {why}") if why else None)

    def slots(self) -> tuple[list[SlotInfo], list[Problem]]:
        """Committed slots, newest first, and the problems of the others."""
        good, problems = [], []
        for i in range(len(SLOTS)):
            info, why = self.read_slot(i)
            if info is not None:
                good.append(info)
            elif why:
                problems.append(why)
        good.sort(key=lambda s: (s.gen, s.step), reverse=True)
        return good, problems

    def newest(self, ckpt_dir: Optional[Path] = None) -> tuple[Optional[SlotInfo], list[Problem]]:
        """The newest committed slot written on this boot (for ckpt_dir, when given)."""
        good, problems = self.slots()
        here = boot_id()
        for s in good:
            if s.boot_id != here:
                problems.append(Problem(Kind.INVALID, f"{s.path.name} was written before the last reboot; ignored"))
                continue
            if ckpt_dir is not None and os.path.abspath(s.ckpt_dir) != os.path.abspath(ckpt_dir):
                problems.append(Problem(Kind.INVALID, f"{s.path.name} belongs to {s.ckpt_dir[:200]}, not {ckpt_dir}; ignored"))
                continue
            return s, problems
        return None, problems

    def scratch(self) -> list[tuple[Path, Optional[int]]]:
        """The staging and resume folders trainers made here, with the pid their name gives."""
        try:
            names = os.listdir(self.path)
        except OSError:
            return []
        out = []
        for n in names:
            for pre in SCRATCH_PREFIXES:
                if n.startswith(pre):
                    rest = n[len(pre):]
                    out.append((self.path / n, int(rest) if rest.isascii() and rest.isdigit() and len(rest) < 10 else None))
        return out

    def remove_scratch(self, only_dead: bool = True) -> None:
        """Remove staging/resume folders (only those whose process is gone, by default). Never follows a
        symlink."""
        for path, pid in self.scratch():
            if only_dead and pid is not None and runtime.pid_alive(pid):
                continue
            try:
                delete.remove_entry(path)
            except OSError:
                pass

    def remove(self) -> None:
        """Delete the slots and the folder (a lock file held by the caller goes last)."""
        self.remove_scratch(only_dead=False)
        for name in (*SLOTS, LOCK):
            try:
                delete.remove_entry(self.path / name)  # whatever is there (a folder in a slot's place too)
            except FileNotFoundError:
                pass
        try:
            os.rmdir(self.path)
        except OSError:
            pass


def open_slot_readonly(info: SlotInfo) -> tuple[int, mmap.mmap]:
    fd = os.open(info.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        if size < PAYLOAD_OFFSET + info.payload_len:
            raise OSError(errno.EIO, f"{info.path.name} shrank below its header's payload")
        return fd, mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
    except BaseException:
        os.close(fd)
        raise


def check_manifest_bytes(data: bytes, info: SlotInfo) -> dict:
    """The manifest of a slot, checked against the slot's file list. Raises ValueError."""
    if hashlib.sha256(data).hexdigest() != info.manifest_sha256:
        raise ValueError("its manifest.json fails its checksum (the slot changed after its commit)")
    m = loads_json_bounded(data, "the slot's manifest.json")
    if not isinstance(m, dict) or m.get("format") != mf.FORMAT or m.get("step") != info.step:
        raise ValueError("its manifest.json is not a native manifest of its step")
    files = m.get("files")
    listed = {n: s for n, _, s in info.files if n != mf.MANIFEST}
    if not isinstance(files, dict) or set(files) != set(listed):
        raise ValueError("its manifest.json lists other files than the slot holds")
    for name, meta in files.items():
        if not isinstance(meta, dict) or meta.get("size") != listed[name]:
            raise ValueError(f"its manifest.json gives {name} another size than the slot")
    return m


# ------------------------------------------------------------------------- verify in memory, and pin
VERIFIED_RECORD = "verified-memory.json"
VERIFIED_FORMAT = "ckpt-daemon/verified-memory-1"
VERIFIED_MAX_AGE_S = 600.0  # the restarted trainer loads within seconds; a later load verifies afresh


@dataclass
class Pinned:
    """A committed slot the daemon has verified in memory (every file against the manifest's checksum)
    and holds with a shared flock until it is persisted: the trainer writes only into a slot it can lock
    exclusively, so a pinned slot stays as verified."""

    info: SlotInfo
    fd: int
    mm: mmap.mmap
    seconds: float
    manifest: dict = field(default_factory=dict)

    def release(self) -> None:
        try:
            self.mm.close()
        except BufferError:
            pass
        try:
            os.close(self.fd)
        except OSError:
            pass


def hash_files(mm: mmap.mmap, info: SlotInfo, manifest: dict) -> list[str]:
    """The names of the slot's files that fail the manifest's checksums (one thread per file, up to the
    cores; BLAKE3 spreads each one further)."""
    from concurrent.futures import ThreadPoolExecutor

    base = PAYLOAD_OFFSET
    wanted = [f for f in info.files if f[0] != mf.MANIFEST]

    def check(entry) -> Optional[str]:
        name, off, size = entry
        data = memoryview(mm)[base + off:base + off + size]
        try:
            return None if digest_matches(manifest["files"][name], data) else name
        finally:
            data.release()

    with ThreadPoolExecutor(max_workers=max(1, min(len(wanted), os.cpu_count() or 1, 8))) as pool:
        return [n for n in pool.map(check, wanted) if n]


def verify_and_pin(info: SlotInfo, hash: bool = True) -> Pinned:
    """Open, lock (shared) and verify a committed slot in memory. Raises ValueError (with the reason) or
    OSError; on success the caller owns the returned Pinned and must release it. With hash=False only the
    manifest is checked (the caller hashes the files, or knows they were verified)."""
    t0 = time.perf_counter()
    fd, mm = open_slot_readonly(info)
    ok = False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            raise SlotSuperseded(f"{info.path.name} is being written by a trainer") from None
        if read_seq(info.path) != info.seq:
            raise SlotSuperseded(f"{info.path.name} was rewritten since its header was read")
        last = info.files[-1]
        manifest = check_manifest_bytes(bytes(mm[PAYLOAD_OFFSET + last[1]:PAYLOAD_OFFSET + last[1] + last[2]]), info)
        bad = hash_files(mm, info, manifest) if hash else []
        if bad:
            raise ValueError(f"{', '.join(bad)} in {info.path.name} fails its checksum")
        if read_seq(info.path) != info.seq:
            raise ValueError(f"{info.path.name} was rewritten while it was verified")
        ok = True
        return Pinned(info, fd, mm, time.perf_counter() - t0, manifest)
    finally:
        if not ok:
            mm.close()
            os.close(fd)


def _slot_identity(info: SlotInfo, st: os.stat_result) -> dict:
    return {"region": os.path.realpath(info.path.parent), "slot": info.path.name, "st_ino": st.st_ino,
            "st_dev": st.st_dev, "seq": info.seq, "gen": info.gen, "step": info.step,
            "manifest_sha256": info.manifest_sha256, "boot_id": info.boot_id}


def record_verified(ckpt_dir: Path, p: Pinned) -> bool:
    """Verify once per restart: tell the trainer's load that this slot (as it is now) was verified, so it
    copies without hashing again (`verified_by_daemon`)."""
    return runtime.write_record(Path(ckpt_dir), VERIFIED_RECORD, {
        "format": VERIFIED_FORMAT, "time": time.time(), **_slot_identity(p.info, os.fstat(p.fd))}, durable=False)


def verified_by_daemon(ckpt_dir: Path, info: SlotInfo, fd: int, now: Optional[float] = None) -> bool:
    """Whether the daemon's record says it verified exactly this committed slot (same file, seq,
    generation and manifest) less than VERIFIED_MAX_AGE_S ago. The caller still checks that seq is
    unchanged after its copy. A missing, stale or malformed record means: verify. Never raises."""
    try:
        rec = runtime.read_record(Path(ckpt_dir), VERIFIED_RECORD, limit=64 << 10)
        if not isinstance(rec, dict) or rec.get("format") != VERIFIED_FORMAT:
            return False
        t, now = rec.get("time"), time.time() if now is None else now
        if not isinstance(t, (int, float)) or isinstance(t, bool) or not 0 <= now - t <= VERIFIED_MAX_AGE_S:
            return False
        want = _slot_identity(info, os.fstat(fd))
        return all(rec.get(k) == v and type(rec.get(k)) is type(v) for k, v in want.items())
    except (OSError, ValueError, TypeError):
        return False


# ------------------------------------------------------------------------------------------ persist
@dataclass
class Persisted:
    path: Optional[Path]
    step: int
    seconds: float
    bytes: int
    note: str


def persist_slot(info: SlotInfo, ckpt_dir: Path, lock_timeout_s: float = 600.0,
                 pinned: Optional[Pinned] = None, phase: Optional[Callable[[str], None]] = None) -> Persisted:
    """Write a committed slot into `ckpt_dir` under the name it carries (checkpoint-<step> for a native
    one), committed as a native save is: each file written in the state folder's scratch space and
    fsynced, then renamed into place under the commit lock and the folder fsynced. A native checkpoint
    gets its manifest.json (written last); another trainer's folder or file gets the slot's checksums as
    its sidecar manifest, recorded before the rename, so that it is never seen unrecorded.

    The slot is verified and held with a shared flock first (`verify_and_pin`: the trainer writes only
    into a slot it can lock exclusively), and its seq must be unchanged after the copy. A slot the caller
    has `pinned` already (verified in memory and locked since) is not hashed again; the caller keeps and
    releases it. Raises OSError or ValueError (SlotSuperseded: the trainer rewrote the slot before it was
    pinned, a newer state is there).

    `phase(name)` is called as the persist passes each point where the trainer may be killed: "read" (the
    header read, the slot not yet pinned), "pinned" (verified and held), "copied" (its files written and
    fsynced in scratch space), "committed" (renamed into place, still held) and "released" (no longer held;
    not called for a slot the caller pinned). For tests and tracing; it must not raise."""
    from ckpt_daemon.store import catalog

    phase = phase or (lambda _name: None)
    t0 = time.perf_counter()
    name = info.name
    final = Path(ckpt_dir) / name
    if os.path.lexists(final):
        why = name_taken(final, info.step)
        if why is None:
            return Persisted(None, info.step, 0.0, 0, f"{name} is already on disk")
        # the name holds something that is not a valid checkpoint of that step (a torn folder, a stranger's
        # file): it goes to quarantine, with its reason, and the memory state takes the name
        if os.path.islink(final) or delete.quarantine(Path(ckpt_dir), name, f"{why}; replaced by the memory "
                                                                             f"checkpoint of step {info.step}") is None:
            raise ValueError(f"{name} is taken on disk by something that is not a valid checkpoint ({why}) and cannot "
                             "be moved to quarantine")
    phase("read")
    own = pinned is None
    if own:
        pinned = verify_and_pin(info)
    phase("pinned")
    native = info.layout == "native"
    try:
        if read_seq(info.path) != info.seq:
            raise ValueError(f"{info.path.name} was rewritten since it was verified")
        total = 0
        with Scratch(ckpt_dir, name) as scratch:
            # a single file is built inside the scratch folder and renamed out of it
            entry = scratch.path / name if info.layout == "file" else scratch.path
            written: dict[str, int] = {}
            for fname, off, size in _files_on_disk(info):
                written[fname] = _write_new(scratch.path / fname, pinned.mm, off, size, 0o644, durable=True)
                total += size
            fsync_dir(scratch.path)
            if read_seq(info.path) != info.seq:
                raise ValueError(f"{info.path.name} was rewritten during the copy")
            phase("copied")
            if native:
                status, reason, _ = mf.check_native(scratch.path, verify=False, step=info.step)
                layout, meta = "native", {}
            else:
                layout, status, reason, meta = catalog.check_entry(entry, verify=False, step=info.step)
                if layout == "native":
                    status, reason = "invalid", "it holds a manifest.json but was not written as a native checkpoint"
            if status != "complete":
                raise ValueError(f"the copy of {info.path.name} ({name}) is {status}: {reason}")
            sidecar = None
            if not native:
                records = pinned.manifest.get("files") or {}
                sidecar = {"layout": layout, "step": info.step, "meta": meta,
                           "files": {("" if info.layout == "file" else f): {**records[f], "mtime_ns": ns}
                                     for f, ns in written.items()}}
            try:
                scratch.commit(final, entry=entry, sidecar=sidecar, timeout_s=lock_timeout_s,
                               then=(lambda: _point_latest(Path(ckpt_dir), name, info.step)) if native else None)
            except FileExistsError:
                return Persisted(None, info.step, 0.0, 0, f"{name} was saved by the trainer meanwhile")
            phase("committed")
    finally:
        if own:
            pinned.release()
    if own:
        phase("released")
    return Persisted(final, info.step, time.perf_counter() - t0, total, "persisted")


def _files_on_disk(info: SlotInfo) -> list[tuple[str, int, int]]:
    """The slot's files its checkpoint has on disk: all of them for a native one; without the slot's
    manifest.json for another trainer's layout (its checksums go to the sidecar)."""
    return [f for f in info.files if info.layout == "native" or f[0] != mf.MANIFEST]


def _write_new(dest: Path, mm: mmap.mmap, off: int, size: int, mode: int, durable: bool) -> int:
    """Write `size` bytes of a slot's payload at `off` as the new file `dest` (never through a symlink,
    never over an existing file), fsynced if `durable`. Returns its mtime_ns."""
    data = memoryview(mm)[PAYLOAD_OFFSET + off:PAYLOAD_OFFSET + off + size]
    try:
        wfd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
        try:
            pos = 0
            while pos < size:
                pos += os.write(wfd, data[pos:pos + CHUNK])
            if durable:
                os.fsync(wfd)
            return os.fstat(wfd).st_mtime_ns
        finally:
            os.close(wfd)
    finally:
        data.release()


def name_taken(path: Path, step: int) -> Optional[str]:
    """None if `path` holds a complete checkpoint of `step` (structure and sizes; no hashing), else why not.
    Raises ValueError for one that may still be being written (incomplete, changed in the last minute)."""
    from ckpt_daemon.store import catalog

    _, status, reason, _ = catalog.check_entry(path, verify=False, step=step)
    if status == "complete":
        return None
    try:
        recent = time.time() - os.lstat(path).st_mtime < 60
    except OSError:
        recent = False
    if status == "incomplete" and recent:
        raise ValueError(f"{path.name} is on disk but incomplete and changed in the last minute (being written?)")
    return f"{path.name} is {status}: {reason}"


def materialize(info: SlotInfo, ckpt_dir: Path, dest_root: Path) -> Path:
    """Copy the checkpoint a committed slot holds, as files named as it will be on disk, into
    `dest_root` (a folder next to the slots, on the same tmpfs): a loader that reads files (Hugging
    Face's, Lightning's, torch.load) resumes from memory without waiting for the daemon's persist.
    Verified like a load: every file hashed, unless the daemon's record says it verified this very slot
    (verify once); the slot is held with a shared flock meanwhile and its seq checked after the copy.
    Returns the path (a folder, or the file for a single-file layout). Raises ValueError or OSError."""
    pinned = verify_and_pin(info, hash=False)
    dest_root = Path(dest_root)
    out = dest_root / info.name
    try:
        if not verified_by_daemon(Path(ckpt_dir), info, pinned.fd):
            bad = hash_files(pinned.mm, info, pinned.manifest)
            if bad:
                raise ValueError(f"{', '.join(bad)} in {info.path.name} fails its checksum")
        # a fresh folder of our own: whatever has that name (an earlier copy, a planted symlink) goes first,
        # never followed, and mkdir fails if anything takes the name again meanwhile
        delete.remove_entry(dest_root)
        os.mkdir(dest_root, 0o700)
        if info.layout != "file":
            os.mkdir(out, 0o700)
        for fname, off, size in _files_on_disk(info):
            _write_new(out if info.layout == "file" else out / fname, pinned.mm, off, size, 0o600, durable=False)
        if read_seq(info.path) != info.seq:
            raise ValueError(f"{info.path.name} was rewritten while it was copied")
        return out
    except BaseException:
        if os.path.isdir(dest_root) and not os.path.islink(dest_root):
            shutil.rmtree(dest_root, ignore_errors=True)
        raise
    finally:
        pinned.release()


def _point_latest(ckpt_dir: Path, name: str, step: int) -> None:
    """`latest` follows the newest checkpoint; a persisted slot older than it leaves it alone."""
    link = ckpt_dir / "latest"
    try:
        target = os.readlink(link)
        m = re.fullmatch(r"checkpoint-([0-9]{1,15})", target)  # ASCII digits, as the catalog reads names
        if m and int(m.group(1)) > step and (ckpt_dir / target).is_dir():
            return
    except OSError:
        pass
    try:
        atomic_symlink(name, link)
    except OSError:
        pass  # a pointer is a convenience; resume uses the newest valid checkpoint regardless


# ------------------------------------------------------------------------------------------ capacity
def slot_capacity(payload: int) -> int:
    """Bytes reserved per slot for a payload: room for the state to grow a little (metrics, JSON)."""
    want = payload + payload // 32 + (4 << 20)
    return -(-want // (2 << 20)) * (2 << 20)


def capacity_error(where: Path, need_per_slot: int, have: int, limit: Optional[int] = None) -> MemoryCheckpointError:
    gib = 2**30
    if limit is not None:
        cause = (f"two copies of the training state ({2 * need_per_slot / gib:.2f} GiB) exceed "
                 f"checkpoints.memory.max_gb ({limit / gib:.2f} GiB)")
    else:
        cause = (f"{where} cannot hold two copies of the training state: they need {2 * need_per_slot / gib:.2f} GiB "
                 f"and its filesystem has {have / gib:.2f} GiB free")
    return MemoryCheckpointError(
        f"Memory checkpoints are refused: {cause}. Nothing was written there, and disk checkpoints are unaffected. "
        "Fix it by giving the tmpfs more room (e.g. `mount -o remount,size=<N>G /dev/shm`), by pointing "
        "checkpoints.memory.dir at a larger tmpfs, by raising checkpoints.memory.max_gb, or by turning memory "
        "checkpoints off (checkpoints.memory.enabled: false) in config.yaml.")


# ------------------------------------------------------------------------------------------ the agent
def private_dir(path: Path) -> Path:
    """Make (or check) a region folder: a real folder (not a symlink) owned by this user, mode 0700 (made
    so if it is ours and looser). /dev/shm is writable by everyone and region names are predictable: a
    folder another user made first could have its slots swapped or links planted. Raises
    MemoryCheckpointError naming the fix."""
    path = Path(path)
    os.makedirs(path, mode=0o700, exist_ok=True)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise MemoryCheckpointError(f"{path} is not a folder; memory checkpoints need it to be one. "
                                    "Move it away or set checkpoints.memory.dir to another folder.")
    if st.st_uid != os.geteuid():
        raise MemoryCheckpointError(f"{path} belongs to another user (uid {st.st_uid}), who could change the memory "
                                    "checkpoints in it. Remove it, or set checkpoints.memory.dir to a folder of your own.")
    if stat.S_IMODE(st.st_mode) & 0o077:
        os.chmod(path, 0o700)
    return path
