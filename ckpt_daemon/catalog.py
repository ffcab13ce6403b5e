"""The checkpoint catalog: the one implementation, shared by daemon, trainer and maintenance, that
finds the checkpoints in `checkpoints.dir` and says what each one is.

Layouts: native `checkpoint-<step>/` folders (manifest.json), Hugging Face Trainer `checkpoint-<step>/`
folders (trainer_state.json), and single files matched by the configured `{step}` patterns. Status:
complete, incomplete (temp folder, missing manifest or trainer_state.json, truncated file) or corrupt
(checksum mismatch or inconsistent structure). Symlinks are never followed out of the folder.
"""

from __future__ import annotations

import json
import os
import re
import stat
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

from ckpt_daemon import manifest as mf
from ckpt_daemon.fsutil import tree_stats

RUNTIME_DIR = ".ckpt-daemon"  # lock, heartbeat, pins, resume record (inside checkpoints.dir)
TRASH_DIR = ".trash"  # deletions are renamed here first, so a crash mid-delete leaves nothing valid-looking
PINS_DIR = "pins"
POINTERS = ("latest", "best")
TEMP_PREFIXES = (".tmp-", "tmp-")  # ours, and Hugging Face's tmp-checkpoint-<step>
TORCH_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")


@dataclass
class Entry:
    """One numbered checkpoint on disk."""

    name: str
    path: Path
    step: int
    layout: str  # native | hf | file
    status: str  # complete | incomplete | corrupt
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
    """A temp folder or file: a save being written, or one interrupted. Never a checkpoint."""

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


def compile_pattern(pattern: str) -> re.Pattern:
    out, pos = "", 0
    for m in re.finditer(r"\{([A-Za-z_][A-Za-z0-9_]*)\}", pattern):
        out += re.escape(pattern[pos : m.start()]) + f"(?P<{m.group(1)}>\\d+)"
        pos = m.end()
    return re.compile(out + re.escape(pattern[pos:]) + r"\Z")


def match_name(name: str, patterns: Iterable[re.Pattern]) -> Optional[dict]:
    for rx in patterns:
        m = rx.match(name)
        if m:
            return {k: int(v) for k, v in m.groupdict().items()}
    return None


def _hf_status(folder: Path, verify: bool) -> tuple[str, str, dict]:
    ts = folder / "trainer_state.json"
    try:
        state = json.loads(ts.read_bytes())
    except FileNotFoundError:
        return "incomplete", "no trainer_state.json (a Hugging Face save that did not finish)", {}
    except (OSError, ValueError) as exc:
        return "incomplete", f"trainer_state.json is unreadable ({exc.__class__.__name__})", {}
    weights = [p for p in sorted(folder.iterdir()) if p.name.endswith((".safetensors", ".bin"))]
    if not weights:
        return "incomplete", "no weights file (model.safetensors or pytorch_model.bin)", state
    for p in weights:
        if p.is_symlink():
            return "corrupt", f"{p.name} is a symlink (not followed)", state
        problem = mf.safetensors_problem(p) if p.name.endswith(".safetensors") else _zip_problem(p, verify)
        if problem:
            return ("corrupt" if "checksum" in problem else "incomplete"), problem, state
    return "complete", "", state


def _zip_problem(path: Path, verify: bool) -> Optional[str]:
    """A torch.save file is a zip: a missing central directory means truncation; CRCs catch flips."""
    try:
        with zipfile.ZipFile(path) as z:
            if verify:
                bad = z.testzip()
                if bad:
                    return f"{path.name} fails its checksum (zip CRC of {bad})"
    except zipfile.BadZipFile:
        return f"{path.name} is truncated or not a torch zip file"
    except (OSError, EOFError) as exc:
        return f"{path.name} is unreadable ({exc.__class__.__name__}: {exc})"
    return None


def _file_status(path: Path, verify: bool) -> tuple[str, str]:
    if path.stat().st_size == 0:
        return "incomplete", f"{path.name} is empty"
    if path.name.endswith(".safetensors"):
        problem = mf.safetensors_problem(path)
    elif path.name.endswith(TORCH_SUFFIXES):
        problem = _zip_problem(path, verify)
    else:
        problem = None
    if problem:
        return ("corrupt" if "checksum" in problem else "incomplete"), problem
    return "complete", ""


def _read_pointer(root: Path, name: str) -> Optional[str]:
    link = root / name
    try:
        target = os.readlink(link)
    except OSError:
        return None
    # Pointers are names inside the folder; anything else is not ours to follow.
    return target if "/" not in target.rstrip("/") else None


def _read_pins(root: Path) -> dict[str, str]:
    pins = {}
    d = root / RUNTIME_DIR / PINS_DIR
    try:
        for p in d.iterdir():
            if p.is_file() and not p.is_symlink():
                pins[p.name] = p.read_text(errors="replace").strip() or "pinned by user"
    except FileNotFoundError:
        pass
    return pins


def read_resumed_from(root: Path) -> Optional[str]:
    try:
        return json.loads((root / RUNTIME_DIR / "resumed_from.json").read_text()).get("name")
    except (OSError, ValueError, AttributeError):
        return None


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
    return stats, subdirs


def check_entry(path: Path, verify: bool, stats: Optional[dict] = None) -> tuple[str, str, str, dict]:
    """(layout, status, reason, meta) of one checkpoint path (folder or file)."""
    st = os.lstat(path)
    if stat.S_ISDIR(st.st_mode):
        if stats is None:
            stats, _ = _folder_stats(path)
        # A manifest makes it native; trainer_state.json or HF's own files make it Hugging Face; an
        # empty or unrecognised folder is a native save that never committed.
        hf_markers = ("trainer_state.json", "config.json", "pytorch_model.bin", "optimizer.pt")
        if mf.MANIFEST in stats:
            layout = "native"
        elif any(n in stats for n in hf_markers):
            layout = "hf"
        else:
            layout = "native"
        if layout == "native":
            status, reason, meta = mf.check_native(path, verify, stats=stats)
        else:
            status, reason, meta = _hf_status(path, verify)
        return layout, status, reason, meta
    status, reason = _file_status(path, verify)
    return "file", status, reason, {}


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


def scan(root: Path, patterns: Iterable[str], verify: bool = False, stats: bool = True) -> Catalog:
    """Look at `root` once and describe every checkpoint in it. Reads no checkpoint payload unless
    `verify` (then: checksums for native, zip CRCs for torch files)."""
    root = Path(root)
    rxs = [compile_pattern(p) for p in patterns]
    entries: list[Entry] = []
    in_progress: list[InProgress] = []
    ignored: list[tuple[str, str]] = []
    pins = _read_pins(root)
    try:
        with os.scandir(root) as it:
            listing = sorted(((d.name, d) for d in it), key=lambda x: x[0])
    except FileNotFoundError:
        listing = []
    for name, dentry in listing:
        path = root / name
        if name in (RUNTIME_DIR, TRASH_DIR, ".gitkeep") or name in POINTERS:
            continue
        try:
            st = dentry.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue  # deleted while we looked
        if name.startswith(TEMP_PREFIXES) or name.endswith(".tmp"):
            fields = match_name(name.removeprefix(".tmp-").removeprefix("tmp-").split(".")[0], rxs) or {}
            step = fields.get("step")
            if step is None:
                m = re.search(r"(\d+)", name)
                step = int(m.group(1)) if m else None
            in_progress.append(InProgress(name, path, step, st.st_mtime))
            continue
        if name.startswith("."):
            continue
        fields = match_name(name, rxs)
        if fields is None:
            ignored.append((name, "does not match checkpoints.pattern"))
            continue
        if stat.S_ISLNK(st.st_mode):
            ignored.append((name, "is a symlink; ckpt-daemon never follows links in the checkpoint folder"))
            continue
        if not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)):
            ignored.append((name, "is neither a file nor a folder"))
            continue
        fstats, subdirs = None, True
        try:
            if stat.S_ISDIR(st.st_mode):
                fstats, subdirs = _folder_stats(path)
            layout, status, reason, meta = check_entry(path, verify, fstats)
        except FileNotFoundError:
            continue
        e = Entry(name=name, path=path, step=fields["step"], layout=layout, status=status, reason=reason,
                  verified=verify and status != "incomplete", fields=fields)
        if layout == "native" and meta:
            e.epoch = meta.get("epoch")
            e.metrics = dict(meta.get("metrics") or {})
            e.pin = meta.get("pin")
        elif layout == "hf" and meta:
            e.epoch = meta.get("epoch")
            if meta.get("best_metric") is not None:
                e.metrics = {"best_metric": meta.get("best_metric")}
        elif "epoch" in fields:
            e.epoch = fields["epoch"]
        if name in pins:
            e.pin = pins[name]
        if stats:
            try:
                if fstats is not None and not subdirs:
                    e.bytes, e.freeable_bytes, e.mtime = _sizes(st, fstats)
                else:
                    e.bytes, e.freeable_bytes, e.mtime = tree_stats(path)
            except FileNotFoundError:
                continue
        else:
            e.mtime = st.st_mtime
        entries.append(e)
    entries.sort(key=lambda e: (e.step, e.name))
    pointers = {p: _read_pointer(root, p) for p in POINTERS}
    return Catalog(root, entries, in_progress, ignored, pointers, pins, read_resumed_from(root))


def scan_config(cfg, verify: bool = False, stats: bool = True) -> Catalog:
    return scan(cfg.checkpoint_dir, cfg.checkpoints.pattern, verify=verify, stats=stats)


def verify_entry(entry: Entry) -> Entry:
    """Re-check one entry with checksums; returns a new Entry with the verified status."""
    layout, status, reason, _ = check_entry(entry.path, verify=True)
    return Entry(**{**entry.__dict__, "layout": layout, "status": status, "reason": reason, "verified": True})
