"""Retention of the remote copies: the same pure planner as local retention (passed in: the core does
not depend on maintenance/), the same protections, and the same guard against an edited, unconfirmed
policy: an unattended run deletes only what both the tiers in force and the last confirmed tiers
delete.

A replica with its own tiers (`retention: [...]`) has its confirmed tiers recorded per url in
`.ckpt-daemon/replica-policy.json`: the first tiers the daemon applies count as confirmed (as the
shipped defaults do locally), and an edit is confirmed with the local policy
(`python -m maintenance.cleanup`, or `-y`). `retention: same` follows the local confirmation.

Deleting a replica removes its remote manifest first (from then on it does not exist for anyone),
then its files; one interrupted half-way is a prefix without a manifest, which the daemon removes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ckpt_daemon import runtime
from ckpt_daemon.remote import format as fmt
from ckpt_daemon.remote.listing import RemoteCatalog
from ckpt_daemon.remote.store import Store

POLICY_RECORD = "replica-policy.json"


@dataclass(frozen=True)
class Item:
    name: str
    step: int
    status: str = "complete"


def canon(tiers) -> list[dict]:
    return [{"count": t.count, "every_steps": t.every_steps} for t in tiers]


def _valid_tiers(v) -> bool:
    return isinstance(v, list) and 0 < len(v) <= 64 and all(
        isinstance(t, dict) and all(x is None or (isinstance(x, int) and not isinstance(x, bool) and x > 0)
                                    for x in (t.get("count"), t.get("every_steps"))) for t in v)


def confirmed_own_tiers(root: Path, url: str, tiers: list[dict]) -> list[dict]:
    """The confirmed own tiers of the replica at `url`; the first ones seen are recorded as confirmed."""
    rec = runtime.read_record(root, POLICY_RECORD) or {}
    entry = rec.get(url) if isinstance(rec.get(url), dict) else None
    if entry is not None and _valid_tiers(entry.get("tiers")):
        return [{"count": t.get("count"), "every_steps": t.get("every_steps")} for t in entry["tiers"]]
    rec = {k: v for k, v in rec.items() if isinstance(v, dict)}
    rec[url] = {"tiers": tiers, "confirmed_at": time.time(), "how": "first applied by the daemon"}
    runtime.write_record(root, POLICY_RECORD, rec)
    return tiers


def confirm_own_tiers(root: Path, replicas: list[tuple[str, list[dict]]], how: str) -> None:
    """Record these (url, tiers) as confirmed by a person (called where the local policy is confirmed)."""
    if not replicas:
        return
    rec = {k: v for k, v in (runtime.read_record(root, POLICY_RECORD) or {}).items() if isinstance(v, dict)}
    for url, tiers in replicas:
        rec[url] = {"tiers": tiers, "confirmed_at": time.time(), "how": how}
    runtime.write_record(root, POLICY_RECORD, rec)


def protections(rc: RemoteCatalog, local_names: dict[str, str], keep_epoch_ends: bool,
                keep: dict[str, str]) -> dict[str, list[str]]:
    """What no remote retention deletes: the newest replica, the replicas of the local latest and best
    (`local_names`: role -> name), pinned and epoch-end ones, and anything in `keep` (name -> why)."""
    out: dict[str, list[str]] = {}
    newest = rc.newest_valid()
    if newest is not None:
        out.setdefault(newest.name, []).append("newest replica")
    for role, name in local_names.items():
        out.setdefault(name, []).append(f"{role} locally")
    for r in rc.valid():
        m = r.manifest or {}
        if keep_epoch_ends and m.get("epoch_end"):
            out.setdefault(r.name, []).append(f"last checkpoint of epoch {m.get('epoch')}")
    for name, why in keep.items():
        out.setdefault(name, []).append(why)
    return out


def plan(rc: RemoteCatalog, tiers: list[dict], confirmed: list[dict], protected: dict[str, list[str]],
         planner: Callable, spec: Callable) -> tuple[list, list[str]]:
    """(decisions over the complete replicas, names held: deleted by the tiers in force but not by the
    confirmed ones, so kept). Damaged replicas are never planned: they stay as evidence."""
    items = [Item(r.name, r.step) for r in rc.valid()]
    now = planner(items, [spec(**t) for t in tiers], protected)
    if confirmed == tiers:
        return now, []
    before = {d.name: d.keep for d in planner(items, [spec(**t) for t in confirmed], protected)}
    held = []
    for d in now:
        if not d.keep and before.get(d.name, True):
            d.keep = True
            d.reasons = ["held: the edited replica retention deletes it, the last confirmed one keeps it; run "
                         "`python -m maintenance.cleanup` to review and confirm"] + d.reasons
            held.append(d.name)
    return now, held


def delete_replica(store: Store, rc: RemoteCatalog, name: str) -> int:
    """Delete a replica: its remote manifest first, then its files. Returns the bytes freed."""
    objs = rc.objects.get(name, [])
    marker = store.target.key(fmt.marker_key(name))
    store.delete([marker])
    rest = [o.key for o in objs if o.key != marker]
    if rest:
        store.delete(rest)
    return sum(o.size for o in objs)


def remove_leftovers(store: Store, rc: RemoteCatalog, busy: set[str]) -> tuple[list[str], int]:
    """Remove what interrupted uploads left (prefixes without a remote manifest, unfinished multipart
    uploads) except for the checkpoints in `busy` (to be resumed). Returns (names cleaned, uploads aborted)."""
    cleaned = []
    for name, objs in rc.in_progress.items():
        if name in busy:
            continue
        store.delete([o.key for o in objs])
        cleaned.append(name)
    aborted = 0
    base = store.target.key("")
    for key, uid, _ in store.open_uploads(base + "/" if base else ""):
        rest = key[len(base) + 1:] if base else key
        if rest.split("/", 1)[0] in busy:
            continue
        store.abort_upload(key, uid)
        aborted += 1
    return cleaned, aborted

