"""Retention: data plus a pure function (as restic's ApplyPolicy and Orbax's preservation policies).

    plan(checkpoints, tiers, protected) -> [Decision(name, step, keep, reasons)]

The planner never reads the clock or the disk; the executor that deletes lives in cleanup.py.

Tiers cover numbered checkpoints newest first: each tier the next `count` of them, the last tier (no
count) all the rest. A tier without `every_steps` keeps all of its checkpoints. A tier with
`every_steps: S` keeps a checkpoint when it is the first one at or after a multiple of S: the lowest
step of its bucket floor(step / S) among all checkpoints present, with bucket >= 1.
Protected checkpoints are kept whatever the tiers say; incomplete ones are never touched.
"""

from __future__ import annotations

import gc
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Optional, Sequence


@dataclass(frozen=True)
class Item:
    name: str
    step: int
    status: str = "complete"  # complete | incomplete | corrupt


@dataclass(frozen=True)
class TierSpec:
    count: Optional[int] = None
    every_steps: Optional[int] = None


@dataclass
class Decision:
    name: str
    step: int
    keep: bool
    reasons: list[str] = field(default_factory=list)
    tier: Optional[int] = None  # 1-based tier that covered it, None if outside the tiers

    @property
    def action(self) -> str:
        return "keep" if self.keep else "delete"


def tier_specs(tiers: Iterable) -> list[TierSpec]:
    """Accept config Tier models or TierSpec alike."""
    return [TierSpec(getattr(t, "count", None), getattr(t, "every_steps", None)) for t in tiers]


def _describe(t: TierSpec, index: int) -> str:
    span = f"next {t.count}" if t.count is not None else "all older"
    if index == 1 and t.count is not None:
        span = f"newest {t.count}"
    thin = f"one per {t.every_steps} steps" if t.every_steps else "keep all"
    return f"tier {index} ({span}: {thin})"


def describe_tiers(tiers: Iterable) -> list[str]:
    return [_describe(t, i) for i, t in enumerate(tier_specs(tiers), 1)]


def plan(checkpoints: Sequence[Item], tiers: Sequence, protected: Mapping[str, Sequence[str]] | None = None) -> list[Decision]:
    """Decide keep or delete for every checkpoint, each with its reasons. Pure: same input, same output."""
    # Planning allocates millions of small objects at 1M checkpoints; the cyclic GC would rescan them
    # again and again (half the time, and superlinear). Nothing here makes cycles, so pause it.
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        return _plan(checkpoints, tiers, protected)
    finally:
        if was_enabled:
            gc.enable()


def _plan(checkpoints: Sequence[Item], tiers: Sequence, protected: Mapping[str, Sequence[str]] | None) -> list[Decision]:
    specs = tier_specs(tiers)
    protected = protected or {}
    ranked = sorted((c for c in checkpoints if c.status == "complete"), key=lambda c: (-c.step, c.name))
    # Lowest step of every bucket, per distinct every_steps, among all complete checkpoints present.
    firsts: dict[int, dict[int, int]] = {}
    for s in {t.every_steps for t in specs if t.every_steps}:
        low: dict[int, int] = {}
        for c in ranked:
            b = c.step // s
            if b not in low or c.step < low[b]:
                low[b] = c.step
        firsts[s] = low

    decisions: dict[str, Decision] = {}
    pos = 0
    for ti, t in enumerate(specs, 1):
        chunk = ranked[pos : pos + t.count] if t.count is not None else ranked[pos:]
        for n, c in enumerate(chunk, 1):
            if t.every_steps is None:
                which = "newest" if ti == 1 else "next"
                d = Decision(c.name, c.step, True,
                             [f"tier {ti}: {which} {t.count if t.count is not None else 'rest'} (#{pos + n})"], ti)
            else:
                s = t.every_steps
                b = c.step // s
                lo, hi = b * s, b * s + s - 1
                if b >= 1 and firsts[s][b] == c.step:
                    d = Decision(c.name, c.step, True, [f"tier {ti}: first of steps {lo}-{hi}"], ti)
                elif b < 1:
                    d = Decision(c.name, c.step, False,
                                 [f"tier {ti}: below the first {s} steps (one per {s} steps keeps steps {s} and up)"], ti)
                else:
                    d = Decision(c.name, c.step, False, [f"tier {ti}: not first of steps {lo}-{hi} ({firsts[s][b]} is)"], ti)
            decisions[c.name] = d
        pos += len(chunk)
    for c in ranked[pos:]:  # only if every tier has a count: beyond the last tier
        decisions[c.name] = Decision(c.name, c.step, False, [f"beyond the last tier (the tiers cover {pos} checkpoints)"])

    for c in checkpoints:
        if c.status != "complete":
            decisions[c.name] = Decision(c.name, c.step, True, [f"{c.status}: never touched by retention"])
    for name, why in protected.items():
        d = decisions.get(name)
        if d is None:
            continue
        if not d.keep:
            d.reasons = [f"protected: {w}" for w in why] + [f"(tiers alone: {r})" for r in d.reasons]
        else:
            d.reasons = d.reasons + [f"protected: {w}" for w in why]
        d.keep = True
    return sorted(decisions.values(), key=lambda d: (-d.step, d.name))


def protections(catalog, extra: Mapping[str, str] | None = None, best_metric: str = "val_loss",
                keep_epoch_ends: bool = True, max_epoch_ends: Optional[int] = None) -> dict[str, list[str]]:
    """What must never be deleted, with why, from a catalog (pure: reads only the given object).

    The newest valid checkpoint, the latest and best (for other trainers: what their own state names
    best), pinned ones, the last checkpoint of every epoch (unless keep_epoch_ends is off; only the
    newest max_epoch_ends of them when that is set), the one the trainer last resumed from, and anything
    named in `extra` (e.g. the daemon's chosen resume point).
    """
    out: dict[str, list[str]] = defaultdict(list)
    newest = catalog.newest_valid()
    if newest is not None:
        out[newest.name].append("newest valid checkpoint")
    for which in ("latest", "best"):
        e = catalog.pointer(which)
        if e is None:
            continue
        source = getattr(catalog, "best_source", None) if which == "best" else "symlink"
        said = {"trainer_state": " (trainer_state.json's best_model_checkpoint)",
                "lightning": " (Lightning's ModelCheckpoint best_model_path)"}.get(source or "", "")
        if which == "best" and best_metric in e.metrics:
            out[e.name].append(f"best ({best_metric} {e.metrics[best_metric]:.4g}){said}")
        else:
            out[e.name].append(which + said)
    for e in catalog.entries:
        if e.pin:
            out[e.name].append(f"pinned ({e.pin})")
    if keep_epoch_ends:
        for e in epoch_ends(catalog)[:max_epoch_ends]:
            out[e.name].append(f"last checkpoint of epoch {e.epoch}")
    if catalog.resumed_from:
        name = catalog.resumed_from
        if catalog.by_name(name) is not None:
            out[name].append("training last resumed from it")
    for name, why in (extra or {}).items():
        if catalog.by_name(name) is not None:
            out[name].append(why)
    return dict(out)


def epoch_ends(catalog) -> list:
    """The catalog's epoch-end checkpoints (the last of each epoch), newest first."""
    return sorted((e for e in catalog.entries if getattr(e, "epoch_end", False)), key=lambda e: (-e.step, e.name))


def items_from_catalog(catalog) -> list[Item]:
    return [Item(e.name, e.step, e.status) for e in catalog.entries]


def tier_counts(decisions: Sequence[Decision]) -> dict[Optional[int], tuple[int, int]]:
    """tier -> (kept, deleted)."""
    out: dict[Optional[int], list[int]] = defaultdict(lambda: [0, 0])
    for d in decisions:
        out[d.tier][0 if d.keep else 1] += 1
    return {k: (v[0], v[1]) for k, v in out.items()}
