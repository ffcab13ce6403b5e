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
- unreadable: the catalog could not look inside (permissions, I/O error).

Every name and every byte in the folder is untrusted: only ASCII digits name a step, no symlink is
followed, every header is size- and type-checked, and a bad entry is reported with its reason, never
raised.
"""

from __future__ import annotations

import os
import re
import stat
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

from ckpt_daemon import manifest as mf
from ckpt_daemon import runtime
from ckpt_daemon.errors import UnsafePathError
from ckpt_daemon.fsutil import loads_json_bounded, read_bytes_bounded, tree_stats
from ckpt_daemon.runtime import PINS_DIR, RUNTIME_DIR, STATE_DIR  # noqa: F401  (re-exported)

POINTERS = ("latest", "best")
HF_TEMP_PREFIX = "tmp-"  # Hugging Face's tmp-checkpoint-<step> (and 0.1's .tmp- folders)
TEMP_PREFIXES = (".tmp-", HF_TEMP_PREFIX)
TORCH_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")
MAX_STEP_DIGITS = 15
TRAINER_STATE_MAX = 64 << 20
STATUSES = ("complete", "incomplete", "corrupt", "invalid", "unreadable")


@dataclass
class Entry:
    """One numbered checkpoint on disk."""

    name: str
    path: Path
    step: int
    layout: str  # native | hf | file
    status: str  # see STATUSES
    reason: str = ""
    bytes: int = 0  # allocated bytes
    freeable_bytes: int = 0  # what deleting it would free (hard links elsewhere count as 0)
    mtime: float = 0.0
    epoch: Optional[int] = None
    metrics: dict = field(default_factory=dict)
    pin: Optional[str] = None
    verified: bool = False  # checksums (or zip CRCs) were checked
    fields: dict = field(default_factory=dict)

    @property
    def valid(self) -> bool:
        return self.status == "complete"

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
    pointers: dict[str, Optional[str]]  # "latest"/"best" -> entry name
    pins: dict[str, str]  # entry name -> reason
    resumed_from: Optional[str]

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
def compile_pattern(pattern: str) -> re.Pattern:
    """`checkpoint-{step}` -> a regex whose fields match ASCII digits only (str.isdigit and re's \\d
    also accept Arabic-Indic or full-width digits, which must never name a step)."""
    out, pos = "", 0
    for m in re.finditer(r"\{([A-Za-z_][A-Za-z0-9_]*)\}", pattern):
        out += re.escape(pattern[pos : m.start()]) + f"(?P<{m.group(1)}>[0-9]+)"
        pos = m.end()
    return re.compile(out + re.escape(pattern[pos:]) + r"\Z")


def match_name(name: str, patterns: Iterable[re.Pattern]) -> Optional[dict]:
    for rx in patterns:
        m = rx.match(name)
        if m:
            groups = m.groupdict()
            if any(len(v) > MAX_STEP_DIGITS for v in groups.values()):
                return None
            return {k: int(v) for k, v in groups.items()}
    return None


def _temp_step(name: str, rxs: list[re.Pattern]) -> Optional[int]:
    """The step a temp or scratch name is about, if it says (for `in progress` reports only)."""
    fields = match_name(name.removeprefix(".tmp-").removeprefix(HF_TEMP_PREFIX).split(".")[0], rxs)
    if fields and "step" in fields:
        return fields["step"]
    m = re.search(r"[0-9]{1,15}", name)
    return int(m.group(0)) if m else None


def _name_problem(name: str, rxs: list[re.Pattern]) -> str:
    for rx in rxs:
        m = rx.match(name)
        if m and any(len(v) > MAX_STEP_DIGITS for v in m.groupdict().values()):
            return f"its step number has more than {MAX_STEP_DIGITS} digits; no real run gets there"
    return "does not match checkpoints.pattern"


# ------------------------------------------------------------------------------------- each layout
def _hf_status(folder: Path, verify: bool, step: Optional[int], stats: dict[str, os.stat_result]) -> tuple[str, str, dict]:
    if "trainer_state.json" not in stats:
        return "incomplete", "no trainer_state.json (a Hugging Face save that did not finish)", {}
    try:
        state = loads_json_bounded(read_bytes_bounded(folder / "trainer_state.json", TRAINER_STATE_MAX),
                                   "trainer_state.json")
    except (OSError, ValueError) as exc:
        return "incomplete", f"trainer_state.json is unreadable ({str(exc)[:120]})", {}
    if not isinstance(state, dict):
        return "corrupt", "trainer_state.json is not a JSON object", {}
    gs = state.get("global_step")
    if step is not None and mf.is_step(gs) and gs != step:
        return "invalid", f"its trainer_state.json says global_step {gs}, its name says step {step} (a renamed copy?)", state
    weights = sorted(n for n in stats if n.endswith((".safetensors", ".bin")) and n != "training_args.bin")
    if not weights:
        return "incomplete", "no weights file (model.safetensors or pytorch_model.bin)", state
    for n in [*weights, *(n for n in ("optimizer.pt", "scheduler.pt") if n in stats)]:
        if not stat.S_ISREG(stats[n].st_mode):
            return "corrupt", f"{n} is not a regular file (symlinks are not followed)", state
        p = folder / n
        problem = mf.safetensors_problem(p, stats[n].st_size) if n.endswith(".safetensors") else _zip_problem(p, verify)
        if problem:
            return ("corrupt" if "checksum" in problem or "CRC" in problem else "incomplete"), problem, state
    return "complete", "", state


def _zip_problem(path: Path, verify: bool) -> Optional[str]:
    """A torch.save file is a zip: a missing central directory means truncation; CRCs catch flips."""
    try:
        with zipfile.ZipFile(path) as z:
            if len(z.infolist()) > 1_000_000:
                return f"{path.name} has an implausible number of entries"
            if verify:
                bad = z.testzip()
                if bad:
                    return f"{path.name} fails its checksum (zip CRC of {bad[:80]})"
    except zipfile.BadZipFile:
        return f"{path.name} is truncated or not a torch zip file"
    except (OSError, EOFError, ValueError, NotImplementedError, RuntimeError) as exc:
        return f"{path.name} is unreadable ({exc.__class__.__name__}: {str(exc)[:100]})"
    return None


_LEGACY_TORCH = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19."  # pickle proto 2 + torch's magic number


def sniff(path: Path) -> str:
    """What a file holds by its first bytes: zip | safetensors | legacy-torch | unknown."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError:
        return "unknown"
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        return "zip"
    if head.startswith(_LEGACY_TORCH):
        return "legacy-torch"
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    return "unknown"


def _file_status(path: Path, size: int, verify: bool) -> tuple[str, str]:
    if size == 0:
        return "incomplete", f"{path.name} is empty"
    kind = sniff(path)
    if path.name.endswith(".safetensors") or (kind == "safetensors" and not path.name.endswith(TORCH_SUFFIXES)):
        problem = mf.safetensors_problem(path, size)
    elif kind == "zip":
        problem = _zip_problem(path, verify)
    elif kind == "legacy-torch":
        problem = None  # torch's pre-1.6 format: no structure to check without unpickling
    elif path.name.endswith(TORCH_SUFFIXES):
        return "incomplete", f"{path.name} is truncated or not a torch zip file"
    else:
        return "invalid", (f"{path.name} is not a checkpoint: it is neither a torch.save zip nor a safetensors file "
                           f"({size} bytes)")
    if problem:
        return ("corrupt" if "checksum" in problem or "CRC" in problem else "incomplete"), problem
    return "complete", ""


def _folder_stats(path: Path) -> tuple[dict[str, os.stat_result], bool]:
    """lstat of every entry of a folder (one listing), and whether it has subfolders."""
    stats, subdirs = {}, False
    with os.scandir(path) as it:
        for d in it:
            try:
                st = d.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            stats[d.name] = st
            subdirs = subdirs or stat.S_ISDIR(st.st_mode)
            if len(stats) > 100_000:
                raise ValueError("it holds more than 100,000 entries; no checkpoint does")
    return stats, subdirs


HF_MARKERS = ("trainer_state.json", "config.json", "pytorch_model.bin", "optimizer.pt", "training_args.bin")


def check_entry(path: Path, verify: bool, stats: Optional[dict] = None,
                step: Optional[int] = None) -> tuple[str, str, str, dict]:
    """(layout, status, reason, meta) of one checkpoint path (folder or file). Never raises for
    anything the path holds: problems come back as a status and a reason."""
    try:
        st = os.lstat(path)
        if stat.S_ISDIR(st.st_mode):
            if stats is None:
                stats, _ = _folder_stats(path)
            # A manifest makes it native; trainer_state.json or HF's own files make it Hugging Face; an
            # empty or unrecognised folder is a native save that never committed.
            if mf.MANIFEST not in stats and any(n in stats for n in HF_MARKERS):
                return ("hf", *_hf_status(path, verify, step, stats))
            return ("native", *mf.check_native(path, verify, stats=stats, step=step))
        if not stat.S_ISREG(st.st_mode):
            return "file", "invalid", "neither a regular file nor a folder (symlinks are never followed)", {}
        return ("file", *_file_status(path, st.st_size, verify), {})
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


def scan(root: Path, patterns: Iterable[str], verify: bool = False, stats: bool = True) -> Catalog:
    """Look at `root` once and describe every checkpoint in it. Reads no checkpoint payload unless
    `verify` (then: checksums for native, zip CRCs for torch files)."""
    root = Path(root)
    rxs = [compile_pattern(p) for p in patterns]
    entries: list[Entry] = []
    in_progress: list[InProgress] = []
    ignored: list[tuple[str, str]] = []
    pins = runtime.read_pins(root)
    for name, dentry in _list_root(root):
        path = root / name
        if name in (STATE_DIR, ".gitkeep") or name in POINTERS:
            continue
        try:
            st = dentry.stat(follow_symlinks=False)
        except OSError:
            continue  # deleted while we looked
        if name.startswith(TEMP_PREFIXES) or name.endswith(".tmp"):
            in_progress.append(InProgress(name, path, _temp_step(name, rxs), st.st_mtime))
            continue
        if name.startswith("."):
            continue
        fields = match_name(name, rxs)
        if fields is None:
            ignored.append((name, _name_problem(name, rxs)))
            continue
        if stat.S_ISLNK(st.st_mode):
            ignored.append((name, "is a symlink; ckpt-daemon never follows links in the checkpoint folder"))
            continue
        if not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)):
            ignored.append((name, "is neither a file nor a folder"))
            continue
        e = _entry(root, name, st, fields, verify, stats)
        if e is not None:
            e.pin = pins.get(name, e.pin)
            entries.append(e)
    for sid in runtime.live_scratch(root):
        in_progress.append(InProgress(sid, root / STATE_DIR / "tmp" / sid, _temp_step(sid, rxs), 0.0))
    entries.sort(key=lambda e: (e.step, e.name))
    pointers = {p: _read_pointer(root, p) for p in POINTERS}
    return Catalog(root, entries, in_progress, ignored, pointers, pins, runtime.read_resumed_from(root))


def _entry(root: Path, name: str, st: os.stat_result, fields: dict, verify: bool, stats: bool) -> Optional[Entry]:
    path = root / name
    fstats, subdirs = None, True
    try:
        if stat.S_ISDIR(st.st_mode):
            fstats, subdirs = _folder_stats(path)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        why = "permission denied" if isinstance(exc, PermissionError) else str(exc)[:120]
        return Entry(name=name, path=path, step=fields["step"], layout="native", status="unreadable",
                     reason=f"cannot be read ({why})", mtime=st.st_mtime, fields=fields)
    layout, status, reason, meta = check_entry(path, verify, fstats, step=fields["step"])
    e = Entry(name=name, path=path, step=fields["step"], layout=layout, status=status, reason=reason,
              verified=verify and status not in ("incomplete", "unreadable"), fields=fields)
    _describe(e, meta, fields)
    if stats:
        try:
            if fstats is not None and not subdirs:
                e.bytes, e.freeable_bytes, e.mtime = _sizes(st, fstats)
            else:
                e.bytes, e.freeable_bytes, e.mtime = tree_stats(path)
        except FileNotFoundError:
            return None
        except OSError:
            e.mtime = st.st_mtime
    else:
        e.mtime = st.st_mtime
    return e


def _describe(e: Entry, meta: dict, fields: dict) -> None:
    """Epoch, metrics and pins from what the checkpoint says about itself (type-checked)."""
    if e.layout == "native" and meta:
        e.epoch = meta.get("epoch") if isinstance(meta.get("epoch"), int) else None
        e.metrics = dict(meta.get("metrics") or {})
        e.pin = meta.get("pin") if isinstance(meta.get("pin"), str) else None
    elif e.layout == "hf" and meta:
        ep = meta.get("epoch")
        e.epoch = int(ep) if isinstance(ep, (int, float)) and not isinstance(ep, bool) and 0 <= ep < 1e9 else None
        bm = meta.get("best_metric")
        if isinstance(bm, (int, float)) and not isinstance(bm, bool):
            e.metrics = {"best_metric": float(bm)}
    elif "epoch" in fields:
        e.epoch = fields["epoch"]


def scan_config(cfg, verify: bool = False, stats: bool = True) -> Catalog:
    return scan(cfg.checkpoint_dir, cfg.checkpoints.pattern, verify=verify, stats=stats)


def verify_entry(entry: Entry) -> Entry:
    """Re-check one entry with checksums; returns a new Entry with the verified status."""
    layout, status, reason, _ = check_entry(entry.path, verify=True, step=entry.step)
    return Entry(**{**entry.__dict__, "layout": layout, "status": status, "reason": reason, "verified": True})
