"""What `which` names, once for every caller: `latest`, `best`, a step number, a checkpoint's name or a
path; and the one walk from there to the newest checkpoint that verifies, with fallback.

Used by the trainer's load (`CheckpointManager`), the supervisor's resume choice, the integrations'
`resume_path`, consolidate, snapshot, `restore --from` a replica and `status`, so that the same `which`
names the same checkpoint everywhere (tests/test_resolve.py holds the table across callers and layouts):

- `latest`: the newest *valid* checkpoint, by step and then by re-save (`-v1`, `-v2`). A `latest`
  symlink is informational: a folder whose newest save is damaged has an older latest.
- `best`: what the run says is best (the `best` symlink; a Hugging Face or Lightning run's own record;
  else the best value of `trainer.best_metric`). With none of these there is **no** best checkpoint,
  for every caller: it is never silently the latest.
- a step: the checkpoint at that step; of a step's re-saves (Lightning's `-v1`), the newest valid one,
  also when only the re-save exists. Two valid checkpoints of different kinds at one step are
  ambiguous (name one by its path). A step whose only checkpoints are damaged resolves to the damaged
  one, so a caller can say why it cannot be used (or walk back from it).
- a path (holds a `/`, or starts with `.` or `~`): that checkpoint, in the folder or outside it.

A caller may restrict the layouts it can use (`CheckpointManager` loads native checkpoints only); the
walk then passes over the others and says why.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Collection, Iterable, Iterator, Optional, Protocol, Sequence, TypeVar, Union

from ckpt_daemon.errors import NoValidCheckpoint
from ckpt_daemon.store import catalog as cat
from ckpt_daemon.store import names as nm

LATEST, BEST = "latest", "best"

Which = Union[str, int, Path]


class Unresolved(NoValidCheckpoint):
    """`which` names no checkpoint here; the message says why and what to pass instead. `kind` says which
    case it is, for callers that word it their own way: not_understood | none | no_best | ambiguous |
    layout | missing_path."""

    def __init__(self, message: str, kind: str = "none"):
        super().__init__(message)
        self.kind = kind


class Item(Protocol):  # what resolution needs of a checkpoint (a catalog Entry, a replica)
    name: str
    step: int

    @property
    def valid(self) -> bool: ...


T = TypeVar("T", bound=Item)


def parse_which(which: Which, names: bool = False) -> Which:
    """`which` as LATEST, BEST, a step (int), a Path, or (with `names`) a checkpoint's name.
    Raises Unresolved for anything else."""
    if isinstance(which, bool):
        raise Unresolved(f"{which!r} is not understood: use latest, best, a step number or a path.", "not_understood")
    if isinstance(which, int):
        if which < 0:
            raise Unresolved(f"{which} is not a step: steps are 0 or more.", "not_understood")
        return which
    if isinstance(which, os.PathLike):
        return Path(which)
    if isinstance(which, str):
        if which in (LATEST, BEST):
            return which
        if nm.as_step(which) is not None:
            return nm.as_step(which)
        if "/" in which or which.startswith((".", "~")):
            return Path(which).expanduser()
        if names and which and len(which) <= 255 and "\0" not in which:
            return which
    raise Unresolved(f"{str(which)[:200]!r} is not understood: use latest, best, a step number or a path.",
                     "not_understood")


def order(e) -> tuple[int, int]:
    """Newer is larger: by step, then by re-save (Lightning's -v1, -v2)."""
    return e.step, getattr(e, "version", 0)


def _kind(e) -> tuple:
    layout = getattr(e, "layout", "")
    return layout, (e.path.suffix if layout == "file" and hasattr(e, "path") else "")


def pick(items: Sequence[T], which: Which, best: Optional[str], where: str,
         layouts: Optional[Collection[str]] = None, names: bool = False) -> T:
    """The one item `which` names among `items` (any status; see the module's rules). `best` is the name
    the run records as best (None: none). Raises Unresolved with the reason."""
    w = parse_which(which, names=names)
    usable = [e for e in items if layouts is None or getattr(e, "layout", None) in layouts]
    if w == LATEST:
        valid = [e for e in usable if e.valid]
        if not valid:
            raise Unresolved(f"There is no valid checkpoint in {where}.")
        return max(valid, key=order)
    if w == BEST:
        hit = next((e for e in items if e.name == best), None) if best else None
        if hit is None:
            raise Unresolved(
                f"There is no best checkpoint in {where} yet: no `best` pointer, no trainer's record of its best, "
                "and no checkpoint holding trainer.best_metric. Use latest, a step number or a path.", "no_best")
        if layouts is not None and getattr(hit, "layout", None) not in layouts:
            raise Unresolved(f"The best checkpoint in {where}, {hit.name}, is a {hit.layout} checkpoint, "
                             "which this command does not use.", "layout")
        return hit
    if isinstance(w, int):
        at = [e for e in usable if e.step == w]
        valid = [e for e in at if e.valid]
        if len({_kind(e) for e in valid}) > 1:
            raise Unresolved(f"Step {w} names {len(valid)} checkpoints ({', '.join(e.name for e in valid)}); give the "
                             "one you mean as a path.", "ambiguous")
        if valid or at:
            return max(valid or at, key=order)
        raise Unresolved(f"There is no checkpoint at step {w} in {where}.")
    if isinstance(w, str):
        hit = next((e for e in usable if e.name == w), None)
        if hit is None:
            raise Unresolved(f"There is no checkpoint named or at step {w!r} in {where}.")
        return hit
    raise Unresolved(f"{w} is a path; resolve it with entry_at().")


def entry_at(path: Path, patterns: Sequence[str], c: Optional[cat.Catalog] = None
             ) -> tuple[Optional[cat.Catalog], cat.Entry]:
    """The checkpoint at `path`: an entry of its folder's catalog (`c` when the path is in c's folder,
    else a scan of its parent with `patterns`), so its neighbours are known; else the path alone,
    checked for what it holds. Raises Unresolved when nothing is there. Symlinks are not followed."""
    path = Path(path).absolute()
    if not os.path.lexists(path):
        raise Unresolved(f"{path} does not exist. Pass a checkpoint's path, or latest, best or a step number.",
                         "missing_path")
    if c is not None and os.path.realpath(path.parent) == os.path.realpath(c.root):
        e = c.by_name(path.name)
        if e is not None:
            return c, e
    else:
        c = cat.scan(path.parent, list(patterns), stats=False)
        e = c.by_name(path.name)
        if e is not None:
            return c, e
    layout, status, reason, meta = cat.check_entry(path, verify=False)
    step = meta.get("step") if isinstance(meta.get("step"), int) and not isinstance(meta.get("step"), bool) else None
    if step is None:
        step = nm.number_in_name(path.name, last=True) or 0
    return None, cat.Entry(name=path.name, path=path, step=step, layout=layout, status=status, reason=reason,
                           meta=meta, metrics=dict(meta.get("metrics") or {}) if isinstance(meta.get("metrics"), dict)
                           else {})


def resolve(c: cat.Catalog, which: Which, layouts: Optional[Collection[str]] = None,
            patterns: Optional[Sequence[str]] = None) -> tuple[Optional[cat.Catalog], cat.Entry]:
    """(the catalog it belongs to, the entry) that `which` names in catalog `c`. Raises Unresolved."""
    w = parse_which(which)
    if isinstance(w, Path):
        return entry_at(w, patterns if patterns is not None else [], c)
    return c, pick(c.entries, w, c.pointers.get(BEST), str(c.root), layouts)


def named_or_none(c: cat.Catalog, which: Which) -> Optional[cat.Entry]:
    """The checkpoint `which` names in `c` whatever its status, or None: what `status` shows."""
    try:
        return resolve(c, which)[1]
    except Unresolved:
        return None


def roles(c: cat.Catalog) -> dict[str, Optional[str]]:
    """{"latest": name, "best": name} as every command names them (None: no such checkpoint): what
    `list` marks and the dashboard shows."""
    return {w: (e.name if (e := named_or_none(c, w)) is not None else None) for w in (LATEST, BEST)}


def valid_or_none(c: cat.Catalog, which: Which) -> Optional[cat.Entry]:
    """The valid checkpoint `which` names in `c`, or None (nothing named, or not valid): what a role such
    as a snapshot's `latest` and `best` holds."""
    e = named_or_none(c, which)
    return e if e is not None and e.valid else None


def walk(entries: Sequence[T], start: Optional[T]) -> Iterator[T]:
    """`start` and every entry older than it, newest first (any status)."""
    if start is None:
        return
    top = order(start)
    yield from sorted((e for e in entries if order(e) <= top), key=order, reverse=True)


def steps_back(c: cat.Catalog, which: Which = LATEST, layouts: Optional[Collection[str]] = None,
               patterns: Optional[Sequence[str]] = None
               ) -> Iterator[tuple[cat.Entry, Optional[str], str]]:
    """The walk behind every "newest valid at or before `which`": (entry, stage, why) newest first, where
    stage is None for a usable candidate, else `layout` (not a layout the caller uses) or `status` (not
    valid: incomplete, corrupt, in progress...). For `latest` it starts at the newest entry of *any*
    status, so what is passed over is said; for a path outside `c`, it walks the path's own folder.
    Lazy: a caller that stops at its first good candidate looks at nothing older."""
    w = parse_which(which)
    if w == LATEST:
        pool = list(c.entries)
        start = max(pool, key=order) if pool else None
    else:
        home, start = resolve(c, w, patterns=patterns)
        pool = list(home.entries) if home is not None else [start]
    for e in walk(pool, start):
        if layouts is not None and e.layout not in layouts:
            yield e, "layout", f"a {e.layout} checkpoint"
        elif not e.valid:
            yield e, "status", f"{e.status} ({e.reason})" if e.reason else e.status
        else:
            yield e, None, ""


Skip = Callable[[cat.Entry, str, str], None]  # (entry, stage, why); stage: layout | status | excluded | verification


def newest_verified(c: cat.Catalog, which: Which = LATEST, *, layouts: Optional[Collection[str]] = None,
                    verify: Optional[Callable[[cat.Entry], cat.Entry]] = None,
                    exclude: Optional[Callable[[cat.Entry], Optional[str]]] = None,
                    on_skip: Optional[Skip] = None, patterns: Optional[Sequence[str]] = None
                    ) -> Optional[cat.Entry]:
    """The newest checkpoint at or before `which` that is valid, of a usable layout, not excluded and
    passes `verify` (which returns the entry as checked: valid, or with the status and reason of what it
    found); None when none does. Everything passed over on the way goes to `on_skip`, newest first;
    nothing older than the answer is looked at."""
    return first_good(steps_back(c, which, layouts, patterns), verify, exclude, on_skip)


def first_good(walked: Iterable[tuple[cat.Entry, Optional[str], str]],
               verify: Optional[Callable[[cat.Entry], cat.Entry]] = None,
               exclude: Optional[Callable[[cat.Entry], Optional[str]]] = None,
               on_skip: Optional[Skip] = None) -> Optional[cat.Entry]:
    """The fallback itself: the first of `walked` (see steps_back) that is usable, not excluded and
    verifies; every one passed over goes to `on_skip`."""
    skip = on_skip or (lambda e, stage, why: None)
    for e, stage, why in walked:
        if stage is not None:
            skip(e, stage, why)
            continue
        why = exclude(e) if exclude else None
        if why:
            skip(e, "excluded", why)
            continue
        checked = verify(e) if verify else e
        if not checked.valid:
            skip(e, "verification", checked.reason or checked.status)
            continue
        return checked
    return None
