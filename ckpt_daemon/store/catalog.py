"""The checkpoint catalog: the one implementation, shared by daemon, trainer and maintenance, that
finds the checkpoints in `checkpoints.dir` and says what each one is.

Layouts: native `checkpoint-<step>/` folders (manifest.json), Hugging Face Trainer `checkpoint-<step>/`
folders (trainer_state.json), and single files matched by the configured `{step}` patterns.

Status:
- complete: usable;
- incomplete: a save that never finished (no manifest, truncated file, no trainer_state.json);
- corrupt: damaged after it was written (checksum or CRC mismatch, inconsistent structure);
- invalid: not what its name claims (a renamed copy whose content says another step, a text file
  named like a checkpoint);
- unreadable: the catalog could not look inside (permissions, I/O error);
- in_progress: another trainer's checkpoint whose files are still changing (within `settle_s`) and
  which is not complete yet: being written, neither valid nor failed.

Foreign checkpoints (Hugging Face, Lightning, plain torch.save files) get a sidecar manifest once they
settle (see foreign.py); from then on any change to their bytes is caught like a native checkpoint's.
A Lightning re-save of a step (`epoch=1-step=100-v1.ckpt`) is the same step, a later version.

Runs: `checkpoints.runs` names subfolders (e.g. `sft`, `dpo`) that each hold a run of their own, with
its own latest, best, retention and state folder; `scan_runs` gives one catalog per run ("" is the
checkpoint folder itself).

Every name and every byte in the folder is untrusted: only ASCII digits name a step, no symlink is
followed, every header is size- and type-checked, and a bad entry is reported with its reason, never
raised.
"""

from __future__ import annotations

import gc
import json
import os
import re
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

from ckpt_daemon import fsutil, runtime
from ckpt_daemon.errors import UnsafePathError
from ckpt_daemon.fsutil import atomic_write_bytes, loads_json_bounded, tree_stats
from ckpt_daemon.runtime import PINS_DIR, RUNTIME_DIR, STATE_DIR  # noqa: F401  (re-exported)
from ckpt_daemon.store import foreign
from ckpt_daemon.store import manifest as mf
from ckpt_daemon.store.commit import live_scratch
from ckpt_daemon.store.names import (  # noqa: F401  (re-exported: daemon, maintenance and users import them here)
    HF_TEMP_PREFIX,
    MAX_STEP_DIGITS,
    POINTERS,
    STATUSES,
    TEMP_PREFIXES,
    TORCH_SUFFIXES,
    Layout,
    Status,
    compile_pattern,
    match_name,
    number_in_name,
)

SETTLE_S = 30.0  # a foreign checkpoint none of whose files changed for this long has settled


class _AsEnum:
    """A dataclass field that always holds a member of a str Enum, whether it is given the member or its
    string (kept in the instance's __dict__ under its own name, so `Entry(**e.__dict__)` still works)."""

    def __init__(self, enum: type) -> None:
        self.members = {m.value: m for m in enum}
        self.enum = enum

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: object, owner: Optional[type] = None) -> object:
        if obj is None:
            raise AttributeError(self.name)  # no default: the field is required
        return obj.__dict__[self.name]

    def __set__(self, obj: object, value: object) -> None:
        try:
            obj.__dict__[self.name] = self.members[value]
        except (KeyError, TypeError):
            raise ValueError(f"{value!r} is not a valid {self.enum.__name__}") from None


@dataclass
class Entry:
    """One numbered checkpoint on disk."""

    name: str
    path: Path
    step: int
    layout: Layout = _AsEnum(Layout)  # native | hf | file (equal to those strings, however it is set)
    status: Status = _AsEnum(Status)  # see STATUSES (equal to those strings, however it is set)
    reason: str = ""
    bytes: int = 0  # allocated bytes
    freeable_bytes: int = 0  # what deleting it would free (hard links elsewhere count as 0)
    mtime: float = 0.0
    epoch: Optional[int] = None
    metrics: dict = field(default_factory=dict)
    pin: Optional[str] = None
    verified: bool = False  # checksums (or zip CRCs) were checked
    fields: dict = field(default_factory=dict)
    version: int = 0  # Lightning's -v1, -v2... re-saves of a step
    recorded: bool = False  # foreign: a sidecar manifest holds its checksums
    epoch_end: bool = False  # the last checkpoint of an epoch that a later checkpoint moved past
    meta: dict = field(default_factory=dict)  # what it says about itself (best info, optimizer, kind...)
    digest: Optional[str] = None  # foreign, recorded: a digest of all its files' checksums

    @property
    def valid(self) -> bool:
        return self.status == Status.COMPLETE

    def to_json(self) -> dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["path"] = str(self.path)
        return d


@dataclass
class InProgress:
    """A save being written (or one that was interrupted). Never a checkpoint."""

    name: str
    path: Path
    step: Optional[int]
    mtime: float


@dataclass
class Catalog:
    root: Path
    entries: list[Entry]  # numbered checkpoints, ascending step
    in_progress: list[InProgress]
    ignored: list[tuple[str, str]]  # (name, why) of things that are not checkpoints
    pointers: dict[str, Optional[str]]  # "latest"/"best" -> name: the symlinks, else the newest valid / trainer's best
    pins: dict[str, str]  # entry name -> reason
    resumed_from: Optional[str]
    run: str = ""  # "" for the checkpoint folder itself, else the run's subfolder
    best_source: Optional[str] = None  # symlink | trainer_state | lightning | metric

    def by_name(self, name: str) -> Optional[Entry]:
        return next((e for e in self.entries if e.name == name), None)

    def valid(self) -> list[Entry]:
        return [e for e in self.entries if e.valid]

    def newest_valid(self) -> Optional[Entry]:
        v = self.valid()
        return v[-1] if v else None

    def pointer(self, which: str) -> Optional[Entry]:
        name = self.pointers.get(which)
        return self.by_name(name) if name else None


# ------------------------------------------------------------------------------------------- names
def _temp_step(name: str, rxs: list[re.Pattern]) -> Optional[int]:
    """The step a temp or scratch name is about, if it says (for `in progress` reports only)."""
    fields = match_name(name.removeprefix(".tmp-").removeprefix(HF_TEMP_PREFIX).split(".")[0], rxs)
    if fields and "step" in fields:
        return fields["step"]
    return number_in_name(name)


def _name_problem(name: str, rxs: list[re.Pattern]) -> str:
    for rx in rxs:
        m = rx.match(name)
        if m and any(len(v) > MAX_STEP_DIGITS for v in m.groupdict().values()):
            return f"its step number has more than {MAX_STEP_DIGITS} digits; no real run gets there"
    return "does not match checkpoints.pattern"


# ------------------------------------------------------------------------------------- each layout
_LEGACY_MAGIC = b"\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"  # torch's magic number, pickled (LONG1)


def sniff(path: Path) -> str:
    """What a file holds by its first bytes: zip | safetensors | legacy-torch | unknown. Only a hint of
    which reader to use: every kind is then checked whole by that reader (torchzip, safetensors_problem)."""
    try:
        with open(path, "rb") as f:
            head = f.read(32)
    except OSError:
        return "unknown"
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        return "zip"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05") and _LEGACY_MAGIC in head:
        return "legacy-torch"  # a pickle (any protocol torch.save uses) opening with torch's magic number
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    return "unknown"


def _file_status(path: Path, size: int, verify: bool) -> tuple[str, str, dict]:
    if size == 0:
        return "incomplete", f"{path.name} is empty", {}
    kind = sniff(path)
    if path.name.endswith(".safetensors") or (kind == "safetensors" and not path.name.endswith(TORCH_SUFFIXES)):
        problem = mf.safetensors_problem(path, size)
        return ("incomplete", problem, {}) if problem else ("complete", "", {})
    if kind in ("zip", "legacy-torch"):
        return foreign.describe_file(path, verify)
    if path.name.endswith(TORCH_SUFFIXES):
        return "incomplete", f"{path.name} is truncated or not a torch zip file", {}
    return "invalid", (f"{path.name} is not a checkpoint: it is neither a torch.save zip nor a safetensors file "
                       f"({size} bytes)"), {}


def _folder_stats(path: str | os.PathLike) -> tuple[dict[str, os.stat_result], bool]:
    """lstat of every entry of a folder (one listing), and whether it has subfolders."""
    stats: dict[str, os.stat_result] = {}
    subdirs = False
    with os.scandir(path) as it:
        for d in it:
            try:
                st = d.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            stats[d.name] = st
            if not subdirs and _S_ISDIR(st.st_mode):
                subdirs = True
            if len(stats) > 100_000:
                raise ValueError("it holds more than 100,000 entries; no checkpoint does")
    return stats, subdirs


_S_ISDIR, _S_ISREG, _S_ISLNK = stat.S_ISDIR, stat.S_ISREG, stat.S_ISLNK


HF_MARKERS = ("trainer_state.json", "config.json", "pytorch_model.bin", "optimizer.pt", "training_args.bin")


def _step_problem(meta: dict, step: Optional[int], what: str) -> Optional[str]:
    said = meta.get("step")
    if step is not None and said is not None and said != step:
        return f"its {what} says step {said}, its name says step {step} (a renamed copy?)"
    return None


def check_entry(path: Path, verify: bool, stats: Optional[dict] = None, step: Optional[int] = None,
                sidecar: Optional[dict] = None, st: Optional[os.stat_result] = None) -> tuple[str, str, str, dict]:
    """(layout, status, reason, meta) of one checkpoint path (folder or file). Never raises for
    anything the path holds: problems come back as a status and a reason.

    With `sidecar` (a foreign checkpoint's recorded manifest), the files are checked against it: sizes
    always, checksums with verify. Without one, a foreign checkpoint is checked by its structure.
    `st`, when the caller has it, is the lstat of `path` taken with `stats` (one syscall less)."""
    try:
        if st is None:
            st = os.lstat(path)
        if stat.S_ISDIR(st.st_mode):
            if stats is None:
                stats, _ = _folder_stats(path)
            # A manifest makes it native. A native save is built in the state folder and renamed into place
            # complete, so a folder without one is another trainer's (Hugging Face's, as far as we know),
            # perhaps still being written: its files appear one by one, config.json or the weights first.
            if mf.MANIFEST in stats:
                return ("native", *mf.check_native(path, verify, stats=stats, step=step))
            layout = "hf"
        elif stat.S_ISREG(st.st_mode):
            layout = "file"
        else:
            return "file", "invalid", "neither a regular file nor a folder (symlinks are never followed)", {}
        if sidecar is not None:
            res, why = foreign.compare(sidecar, path, foreign.entry_files(path), verify, same_entry=False)
            if res == "ok":
                return layout, "complete", "", dict(sidecar.get("meta") or {})
            if res == "corrupt":
                return layout, "corrupt", why, dict(sidecar.get("meta") or {})
        if layout == "hf":
            status, reason, meta = foreign.describe_hf(path, stats, verify)
            problem = _step_problem(meta, step, "trainer_state.json")
        else:
            status, reason, meta = _file_status(path, st.st_size, verify)
            problem = _step_problem(meta, step, "content")
        if problem and status == "complete":
            return layout, "invalid", problem, meta
        return layout, status, reason, meta
    except PermissionError as exc:
        return "file", "unreadable", f"cannot be read: permission denied ({exc.filename or path})", {}
    except (OSError, ValueError, RecursionError, UnicodeError) as exc:
        return "file", "unreadable", f"cannot be read ({exc.__class__.__name__}: {str(exc)[:120]})", {}


def _sizes(entry_st: os.stat_result, stats: dict[str, os.stat_result]) -> tuple[int, int, float]:
    """tree_stats for a folder without subfolders, from the lstat results we already have."""
    allocated = freed = entry_st.st_blocks * 512
    newest = entry_st.st_mtime
    for st in stats.values():
        size = st.st_blocks * 512
        allocated += size
        if st.st_nlink <= 1:
            freed += size
        newest = max(newest, st.st_mtime)
    return allocated, freed, newest


def _read_pointer(root: Path, name: str) -> Optional[str]:
    try:
        target = os.readlink(root / name)
    except OSError:
        return None
    # Pointers are names inside the folder; anything else is not ours to follow.
    return target if "/" not in target.rstrip("/") and not target.startswith(".") else None


def _list_root(root: Path) -> list[tuple[str, os.DirEntry]]:
    try:
        with os.scandir(root) as it:
            return sorted(((d.name, d) for d in it), key=lambda x: x[0])
    except FileNotFoundError:
        return []
    except NotADirectoryError:
        raise UnsafePathError(f"{root} is a file, not a folder; checkpoints.dir must name a folder.") from None
    except PermissionError:
        raise UnsafePathError(
            f"The checkpoint folder {root} cannot be listed (permission denied). Run ckpt-daemon as the user that "
            "owns it, or give that user read access; nothing was changed.") from None


def scan(root: Path, patterns: Iterable[str], verify: bool = False, stats: bool = True,
         best_metric: Optional[str] = None, best_mode: str = "min", settle_s: float = SETTLE_S,
         now: Optional[float] = None, run: str = "") -> Catalog:
    """Look at `root` once and describe every checkpoint in it. Reads no checkpoint payload unless
    `verify` (then: checksums for native and recorded foreign checkpoints, zip CRCs for torch files)."""
    # A scan of a large folder allocates a few objects per entry and makes no reference cycles; the cyclic
    # GC would walk the growing heap again and again (as in retention.plan), so pause it meanwhile.
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        return _scan(Path(root), patterns, verify, stats, best_metric, best_mode, settle_s, now, run)
    finally:
        if was_enabled:
            gc.enable()


def _scan(root: Path, patterns: Iterable[str], verify: bool, stats: bool, best_metric: Optional[str],
          best_mode: str, settle_s: float, now: Optional[float], run: str) -> Catalog:
    now = time.time() if now is None else now
    rxs = [compile_pattern(p) for p in patterns]
    entries: list[Entry] = []
    in_progress: list[InProgress] = []
    ignored: list[tuple[str, str]] = []
    pins = runtime.read_pins(root)
    sidecars = _sidecar_names(root)
    skip = {STATE_DIR, ".gitkeep", *POINTERS}
    root_s = os.fspath(root)
    track: Optional[list] = None
    if not verify:
        _load_disk_cache(root_s)
        track = [0]  # misses, then the cache key of every entry checked
    for name, dentry in _list_root(root):
        if name in skip:
            continue
        try:
            st = dentry.stat(follow_symlinks=False)
        except OSError:
            continue  # deleted while we looked
        if name.startswith(TEMP_PREFIXES) or (name.endswith(".tmp") and not name.startswith(".")):
            in_progress.append(InProgress(name, root / name, _temp_step(name, rxs), st.st_mtime))
            continue
        if name.startswith("."):
            continue  # hidden: the state folder, pointer temps (.latest.*.tmp), not checkpoints
        fields = match_name(name, rxs)
        if fields is None:
            ignored.append((name, _name_problem(name, rxs)))
            continue
        mode = st.st_mode
        if _S_ISLNK(mode):
            ignored.append((name, "is a symlink; ckpt-daemon never follows links in the checkpoint folder"))
            continue
        if not (_S_ISDIR(mode) or _S_ISREG(mode)):
            ignored.append((name, "is neither a file nor a folder"))
            continue
        e = _entry(root, name, st, fields, verify, stats, settle_s, now,
                   has_sidecar=sidecars is None or (bool(sidecars) and f"{name}.json" in sidecars),
                   path_s=root_s + os.sep + name, track=track)
        if e is not None:
            if name in pins:
                e.pin = pins[name]
            entries.append(e)
    if track is not None and track[0] >= DISK_CACHE_MIN_MISSES:
        _save_disk_cache(root_s, track[1:])
    for sid in live_scratch(root):
        in_progress.append(InProgress(sid, root / STATE_DIR / "tmp" / sid, _temp_step(sid, rxs), 0.0))
    entries.sort(key=lambda e: (e.step, e.version, e.name))
    _mark_copies(entries)
    _mark_epoch_ends(entries)
    released = runtime.read_released(root) if any(e.epoch_end for e in entries) else set()
    for e in entries:
        if e.epoch_end and e.name in released:
            e.epoch_end = False  # the user released it: `ckpt-daemon unpin`
    pointers = {p: _read_pointer(root, p) for p in POINTERS}
    c = Catalog(root, entries, in_progress, ignored, pointers, pins, runtime.read_resumed_from(root), run=run)
    if pointers["best"]:
        c.best_source = "symlink"
    else:
        _foreign_best(c, best_metric, best_mode)
    if not pointers["latest"] and c.newest_valid() is not None:
        # other trainers keep no `latest` pointer: theirs is the newest valid checkpoint (the resume point)
        c.pointers["latest"] = c.newest_valid().name
    return c


def _sidecar_names(root: Path) -> Optional[set[str]]:
    """Names in the sidecar folder, listed once per scan (most entries have none: opening each one's
    would-be sidecar is a third of a large scan); None where it cannot be listed (then each is tried)."""
    try:
        with os.scandir(os.path.join(root, STATE_DIR, foreign.SIDECARS)) as it:
            return {d.name for d in it}
    except FileNotFoundError:
        return set()
    except OSError:
        return None


def _entry(root: Path, name: str, st: os.stat_result, fields: dict, verify: bool, stats: bool,
           settle_s: float, now: float, has_sidecar: bool = True, path_s: Optional[str] = None,
           track: Optional[list] = None) -> Optional[Entry]:
    path = root / name
    path_s = os.fspath(path) if path_s is None else path_s  # the same path as a string: cheaper for os calls
    fstats, subdirs = None, True
    step = fields["step"]
    try:
        if _S_ISDIR(st.st_mode):
            fstats, subdirs = _folder_stats(path_s)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, RecursionError) as exc:
        why = "permission denied" if isinstance(exc, PermissionError) else str(exc)[:120] or type(exc).__name__
        return Entry(name=name, path=path, step=step, layout="native", status="unreadable",
                     reason=f"cannot be read ({why})", mtime=st.st_mtime, fields=fields)
    recorded = False
    try:
        sc = foreign.read_sidecar(root, name) if has_sidecar else None
    except foreign.SidecarDamaged as exc:
        sc = None
        if fstats is None or mf.MANIFEST not in fstats:
            # the record of its bytes is damaged: never judged afresh (that would trust what it was for)
            recorded = True
            layout, status, reason, meta = ("hf" if fstats is not None else "file"), exc.status, str(exc), {}
    if sc is not None:
        try:
            files = foreign.entry_files(path)
            res, why = foreign.compare(sc, path, files, verify)
        except (OSError, ValueError, RecursionError) as exc:
            res, why = "corrupt", f"cannot be read ({str(exc)[:120] or type(exc).__name__})"
        if res in ("ok", "corrupt"):
            recorded = True
            layout = sc.get("layout") if sc.get("layout") in ("hf", "file") else "file"
            meta = dict(sc.get("meta") or {})
            status, reason = ("complete", "") if res == "ok" else ("corrupt", why)
        else:
            sc = None  # stale (the name holds something else now) or re-saved: judged afresh
    if not recorded:
        layout, status, reason, meta = _check_cached(path, st, fstats, verify, step, path_s, track)
    e = Entry(name=name, path=path, step=step, layout=layout, status=status, reason=reason,
              verified=verify and status not in ("incomplete", "unreadable"), fields=fields,
              version=fields.get("_version", 0), recorded=recorded, meta=meta,
              digest=sc.get("digest") if recorded and sc is not None and isinstance(sc.get("digest"), str) else None)
    e.fields = {k: v for k, v in fields.items() if not k.startswith("_")}
    _describe(e, meta, fields)
    if stats:
        try:
            if fstats is not None and not subdirs:
                e.bytes, e.freeable_bytes, e.mtime = _sizes(st, fstats)
            else:
                e.bytes, e.freeable_bytes, e.mtime = tree_stats(path)
        except FileNotFoundError:
            return None
        except RecursionError:
            e.status, e.reason = "unreadable", "its folders are nested too deeply to be a checkpoint"
            e.mtime = st.st_mtime
        except OSError:
            e.mtime = st.st_mtime
    else:
        e.mtime = st.st_mtime if fstats is None else max([st.st_mtime, *(s.st_mtime for s in fstats.values())])
    if layout != "native" and not recorded and status in ("incomplete", "corrupt") and now - e.mtime < settle_s:
        e.status, e.reason = "in_progress", f"being written (changed {now - e.mtime:.0f}s ago; {e.reason})"
    return e


def _describe(e: Entry, meta: dict, fields: dict) -> None:
    """Epoch, metrics and pins from what the checkpoint says about itself (type-checked)."""
    ep = meta.get("epoch") if meta else None
    if isinstance(ep, int) and not isinstance(ep, bool) and 0 <= ep < 10**9:
        e.epoch = ep
    elif "epoch" in fields:
        e.epoch = fields["epoch"]
    if isinstance(meta.get("metrics"), dict):
        e.metrics = {str(k)[:64]: float(v) for k, v in meta["metrics"].items()
                     if isinstance(v, (int, float)) and not isinstance(v, bool)}
    pin = meta.get("pin") if e.layout == "native" else None
    if isinstance(pin, str) and pin.startswith("end of epoch"):
        e.epoch_end = True  # the built-in trainer marks its epoch ends; retention.keep_epoch_ends decides
    elif isinstance(pin, str):
        e.pin = pin
    e.meta = {k: v for k, v in (meta or {}).items() if k in (
        "has_optimizer", "kind", "state_dict_key", "best_model_checkpoint", "best_model_path", "best_model_score",
        "monitor", "best_metric", "epoch_float", "note")}


_CACHE: dict[tuple, tuple[str, str, str, dict]] = {}
_CACHE_MAX = 20_000


def _check_cached(path: Path, st: os.stat_result, fstats: Optional[dict], verify: bool,
                  step: int, path_s: Optional[str] = None, track: Optional[list] = None) -> tuple[str, str, str, dict]:
    """check_entry without verify, remembered per file version (path, inode, size, mtime and ctime of the
    entry and of every file in it): a folder that gains a file per save is rescanned often, and parsing a
    pickle's header once per version of a file is enough. Any change to a file (its bytes, its size, a
    replacement) changes its key, and the entry is checked afresh. With verify the bytes are read every
    time: that is what verify means."""
    if verify:
        return check_entry(path, verify, fstats, step=step, st=st)
    if fstats:
        files = tuple(sorted([(n, x.st_ino, x.st_size, x.st_mtime_ns, x.st_ctime_ns) for n, x in fstats.items()]))
    else:
        files = ()
    key = (os.fspath(path) if path_s is None else path_s, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns,
           st.st_ctime_ns, files, step)
    hit = _CACHE.get(key)
    if hit is None:
        hit = check_entry(path, verify, fstats, step=step, st=st)
        if len(_CACHE) >= _CACHE_MAX:
            _CACHE.clear()
        _CACHE[key] = hit
        if track is not None:
            track[0] += 1
    if track is not None:
        track.append(key)
    layout, status, reason, meta = hit
    return layout, status, reason, dict(meta)


# ------------------------------------------------------------------------------ on-disk check cache
# The first scan in a process (`python -m maintenance.cleanup --dry-run`) would parse every manifest
# again; the results of the last large scan are kept in the state folder instead. A record is used only
# for the very same files: the folder and every file in it must have the same inode, size, mtime and
# ctime (ctime cannot be set back by anyone but the clock's owner), else the entry is checked afresh.
# The file is untrusted like everything else in the folder: bounded, type-checked record by record
# (a bad record is dropped, never raised), ignored unless this user wrote it (owned by us, writable by
# no one else), and bound to the code that wrote it (a change to the checks drops it). Only native
# checkpoints without verify: verify reads the bytes every time, and foreign ones have their sidecars.
DISK_CACHE = "catalog-cache.json"
DISK_CACHE_MAX_BYTES = 64 << 20
DISK_CACHE_MIN_MISSES = 64  # a scan that checked fewer entries afresh leaves the file as it is
_DISK_FORMAT = "ckpt-daemon/catalog-cache/1"
_DISK_META_KEYS = ("epoch", "metrics", "pin", "has_optimizer", "kind", "state_dict_key", "best_model_checkpoint",
                   "best_model_path", "best_model_score", "monitor", "best_metric", "epoch_float", "note")
_disk_loaded: set[str] = set()
_code_tag: Optional[str] = None


def _checks_tag() -> str:
    """A digest of the code whose results the file holds: another version of the checks, another cache."""
    global _code_tag
    if _code_tag is None:
        import hashlib

        h = hashlib.sha256(_DISK_FORMAT.encode())
        for mod in (mf, foreign, fsutil, runtime):
            try:
                with open(mod.__file__, "rb") as f:
                    h.update(f.read())
            except (OSError, TypeError):
                h.update(b"?")
        with open(__file__, "rb") as f:
            h.update(f.read())
        _code_tag = h.hexdigest()
    return _code_tag


def _is_int(v) -> bool:
    return type(v) is int


def _disk_record(root_s: str, r) -> Optional[tuple[tuple, tuple[str, str, str, dict]]]:
    """(in-memory cache key, result) of one record of the file, or None if it is not well-formed."""
    if type(r) is not list or len(r) != 11:
        return None
    name, dev, ino, size, mtime_ns, ctime_ns, files, step, status, reason, meta = r
    if not (type(name) is str and 0 < len(name) <= 255 and "/" not in name and "\0" not in name
            and not name.startswith(".")):
        return None
    if not all(_is_int(v) for v in (dev, ino, size, mtime_ns, ctime_ns, step)):
        return None
    if type(files) is not list or len(files) > 10_000:
        return None
    key_files = []
    for f in files:
        if not (type(f) is list and len(f) == 5 and type(f[0]) is str and all(_is_int(v) for v in f[1:])):
            return None
        key_files.append(tuple(f))
    if key_files != sorted(key_files):
        return None
    if status not in STATUSES or type(reason) is not str or len(reason) > 2000:
        return None
    if type(meta) is not dict or not all(k in _DISK_META_KEYS for k in meta):
        return None
    key = (root_s + os.sep + name, dev, ino, size, mtime_ns, ctime_ns, tuple(key_files), step)
    return key, ("native", status, reason, meta)


def _load_disk_cache(root_s: str) -> None:
    """Fill the in-memory cache from the state folder's file, once per folder and process."""
    if root_s in _disk_loaded:
        return
    _disk_loaded.add(root_s)
    p = os.path.join(root_s, STATE_DIR, DISK_CACHE)
    try:
        fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022 \
                or st.st_size > DISK_CACHE_MAX_BYTES:
            return
        data = os.read(fd, st.st_size + 1)
    except OSError:
        return
    finally:
        os.close(fd)
    if len(data) > DISK_CACHE_MAX_BYTES:
        return
    try:
        obj = loads_json_bounded(data, DISK_CACHE)
    except ValueError:
        return
    if type(obj) is not dict or obj.get("format") != _DISK_FORMAT or obj.get("checks") != _checks_tag() \
            or obj.get("root") != root_s or type(obj.get("entries")) is not list:
        return
    for r in obj["entries"][:_CACHE_MAX]:
        rec = _disk_record(root_s, r)
        if rec is not None and len(_CACHE) < _CACHE_MAX:
            _CACHE.setdefault(rec[0], rec[1])


def _save_disk_cache(root_s: str, keys: list[tuple]) -> None:
    """Keep the results of the native checkpoints this scan checked, for the next process. Only where the
    state folder already exists; never raises (a read-only folder just goes without)."""
    state = os.path.join(root_s, STATE_DIR)
    try:
        st = os.lstat(state)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
            return
    except OSError:
        return
    prefix = root_s + os.sep
    out = []
    for key in keys[:_CACHE_MAX]:
        hit = _CACHE.get(key)
        if hit is None or hit[0] != "native" or not key[0].startswith(prefix):
            continue
        meta = {k: v for k, v in hit[3].items() if k in _DISK_META_KEYS}
        out.append([key[0][len(prefix):], *key[1:6], [list(f) for f in key[6]], key[7], hit[1], hit[2], meta])
    try:
        data = json.dumps({"format": _DISK_FORMAT, "checks": _checks_tag(), "root": root_s, "entries": out},
                          separators=(",", ":"), default=str).encode()
        if len(data) <= DISK_CACHE_MAX_BYTES:
            atomic_write_bytes(Path(state) / DISK_CACHE, data, 0o600, durable=False)
    except (OSError, ValueError, TypeError, RecursionError):
        pass


def _mark_copies(entries: list[Entry]) -> None:
    """A recorded foreign checkpoint with the same bytes as an earlier one under another step is a copy."""
    first: dict[str, Entry] = {}
    for e in sorted((e for e in entries if e.digest and e.valid), key=lambda e: e.mtime):
        seen = first.setdefault(e.digest, e)
        if seen is not e and seen.step != e.step:
            e.status, e.reason = "invalid", f"the same bytes as {seen.name} under another step number (a copy)"


def _mark_epoch_ends(entries: list[Entry]) -> None:
    """The last valid checkpoint of each epoch that a later valid checkpoint has moved past."""
    valid = [e for e in entries if e.valid and e.epoch is not None]
    for a, b in zip(valid, valid[1:]):
        if b.epoch > a.epoch:
            a.epoch_end = True


def _foreign_best(c: Catalog, best_metric: Optional[str], best_mode: str) -> None:
    """The best checkpoint of a foreign run: what its trainer says (HF trainer_state.json's
    best_model_checkpoint, Lightning's ModelCheckpoint best_model_path), else best by the metric."""
    for e in reversed(c.valid()):
        for key, source in (("best_model_checkpoint", "trainer_state"), ("best_model_path", "lightning")):
            target = e.meta.get(key)
            if isinstance(target, str):
                best = c.by_name(os.path.basename(target.rstrip("/")))
                if best is not None and best.valid:
                    c.pointers["best"], c.best_source = best.name, source
                    return
        if e.meta.get("best_model_checkpoint") or e.meta.get("best_model_path"):
            break  # the newest says which is best, and that one is gone: no guessing
    if best_metric:
        scored = [e for e in c.valid() if best_metric in e.metrics]
        if scored:
            pick = (min if best_mode == "min" else max)(scored, key=lambda e: (e.metrics[best_metric], -e.step))
            c.pointers["best"], c.best_source = pick.name, "metric"


def scan_runs(cfg, verify: bool = False, stats: bool = True) -> dict[str, Catalog]:
    """One catalog per run: "" (checkpoints.dir itself) and every folder named in checkpoints.runs."""
    out = {"": scan_config(cfg, verify, stats)}
    for run in cfg.checkpoints.runs:
        out[run] = scan(cfg.checkpoint_dir / run, cfg.checkpoints.pattern, verify, stats, cfg.trainer.best_metric,
                        cfg.trainer.best_mode, cfg.checkpoints.settle_s, run=run)
    return out


def newest_valid_rel(cfg) -> Optional[str]:
    """The most recently written valid checkpoint across runs, named relative to checkpoints.dir: where
    training was when it stopped (the daemon resumes from it unless it fails verification)."""
    best = None
    for run, c in scan_runs(cfg, stats=False).items():
        e = c.newest_valid()
        if e is not None and (best is None or e.mtime > best[0].mtime):
            best = (e, run)
    return (f"{best[1]}/{best[0].name}" if best[1] else best[0].name) if best else None


def scan_config(cfg, verify: bool = False, stats: bool = True) -> Catalog:
    return scan(cfg.checkpoint_dir, cfg.checkpoints.pattern, verify=verify, stats=stats,
                best_metric=cfg.trainer.best_metric, best_mode=cfg.trainer.best_mode,
                settle_s=cfg.checkpoints.settle_s)


def verify_entry(entry: Entry) -> Entry:
    """Re-check one entry with checksums (against its sidecar manifest, if recorded); returns a new
    Entry with the verified status."""
    try:
        sc = foreign.read_sidecar(entry.path.parent, entry.name) if entry.layout != "native" else None
    except foreign.SidecarDamaged as exc:
        return Entry(**{**entry.__dict__, "status": exc.status, "reason": str(exc), "verified": True})
    layout, status, reason, _ = check_entry(entry.path, verify=True, step=entry.step, sidecar=sc)
    return Entry(**{**entry.__dict__, "layout": layout, "status": status, "reason": reason, "verified": True})
