"""The retention planner: tables of synthetic checkpoints, no filesystem; and properties over
thousands of random histories (hypothesis)."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from maintenance.retention import Item, TierSpec, plan

DEFAULT = [TierSpec(20), TierSpec(20, 200), TierSpec(None, 1000)]


def items(steps, status="complete"):
    return [Item(f"checkpoint-{s}", s, status) for s in steps]


def kept(decisions):
    return sorted(d.step for d in decisions if d.keep)


def test_worked_example_keeps_exactly_43():
    d = plan(items(range(100, 17001, 100)), DEFAULT)
    k = kept(d)
    assert len(k) == 43
    assert k == list(range(1000, 13001, 1000)) + list(range(13200, 15001, 200)) + list(range(15100, 17001, 100))
    # planning again on the survivors deletes nothing
    again = plan(items(k), DEFAULT)
    assert all(x.keep for x in again)


def test_reasons_name_the_tier_and_the_bucket():
    d = {x.step: x for x in plan(items(range(100, 17001, 100)), DEFAULT)}
    assert d[17000].reasons == ["tier 1: newest 20 (#1)"]
    assert d[15100].reasons == ["tier 1: newest 20 (#20)"]
    assert d[13000].reasons == ["tier 3: first of steps 13000-13999"]
    assert d[13200].reasons == ["tier 2: first of steps 13200-13399"]
    assert d[13300].reasons == ["tier 2: not first of steps 13200-13399 (13200 is)"] and not d[13300].keep
    assert not d[500].keep and "below the first 1000 steps" in d[500].reasons[0]


@pytest.mark.parametrize("steps,tiers,expect", [
    # irregular saves: still one per S steps, the first at or after each multiple
    ([130, 270, 1010, 1500, 2300, 2999, 3001], [TierSpec(1), TierSpec(None, 1000)], [1010, 2300, 3001]),
    # a tier without every_steps keeps all
    ([1, 2, 3], [TierSpec(None)], [1, 2, 3]),
    # fewer checkpoints than the first tier: all kept
    (list(range(100, 1001, 100)), DEFAULT, list(range(100, 1001, 100))),
    # every tier has a count: what lies beyond them is deleted
    ([10, 20, 30, 40], [TierSpec(2)], [30, 40]),
    # steps below S are not kept by a thinning tier
    ([50, 99, 150, 200], [TierSpec(1), TierSpec(None, 100)], [150, 200]),
])
def test_table(steps, tiers, expect):
    assert kept(plan(items(steps), tiers)) == expect


def test_protected_are_kept_with_their_reasons():
    d = {x.step: x for x in plan(items(range(100, 5001, 100)), DEFAULT, {
        "checkpoint-300": ["best (val_loss 2.15)"], "checkpoint-1700": ["pinned (end of epoch 3)"]})}
    assert d[300].keep and d[300].reasons[0] == "protected: best (val_loss 2.15)"
    assert "(tiers alone: tier 3: below the first 1000 steps" in d[300].reasons[1]
    assert d[1700].keep and "protected: pinned (end of epoch 3)" in d[1700].reasons


def test_incomplete_and_corrupt_are_never_touched_and_take_no_tier_slot():
    its = items(range(100, 2501, 100)) + [Item("checkpoint-2600", 2600, "incomplete"),
                                          Item("checkpoint-150", 150, "corrupt")]
    d = {x.name: x for x in plan(its, [TierSpec(3), TierSpec(None, 1000)])}
    assert d["checkpoint-2600"].keep and d["checkpoint-2600"].reasons == ["incomplete: never touched by retention"]
    assert d["checkpoint-150"].keep and d["checkpoint-150"].reasons == ["corrupt: never touched by retention"]
    assert d["checkpoint-2500"].reasons == ["tier 1: newest 3 (#1)"]


# ---------------------------------------------------------------------------------- properties
tier_lists = st.lists(st.integers(1, 30), min_size=0, max_size=3).flatmap(
    lambda counts: st.tuples(st.just(counts),
                             st.lists(st.sampled_from([1, 2, 5]), min_size=len(counts) + 1, max_size=len(counts) + 1),
                             st.sampled_from([1, 10, 50, 100]), st.booleans()))


def make_tiers(spec):
    counts, mults, base, first_keeps_all = spec
    tiers, every = [], None
    for i, c in enumerate(counts + [None]):
        if i == 0 and first_keeps_all:
            tiers.append(TierSpec(c, None))
            continue
        every = base if every is None else every * mults[i]
        tiers.append(TierSpec(c, every))
    return tiers


histories = st.lists(st.integers(1, 20000), min_size=0, max_size=300, unique=True)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(histories, tier_lists, st.data())
def test_properties(steps, tier_spec, data):
    tiers = make_tiers(tier_spec)
    its = items(steps)
    protected_names = data.draw(st.lists(st.sampled_from([i.name for i in its]), max_size=5,
                                         unique=True)) if its else []
    # protections as cleanup computes them, from a catalog: the newest valid one among them
    from pathlib import Path

    from ckpt_daemon.store.catalog import Catalog, Entry
    from maintenance.retention import protections

    catalog = Catalog(Path("/x"),
                      [Entry(i.name, Path("/x") / i.name, i.step, "native", "complete") for i in sorted(its,
                                                                                                        key=lambda i: i.step)],
                      [], [], {"latest": None, "best": None}, {}, None)
    protected = {n: ["test protection"] for n in protected_names}
    for n, why in protections(catalog).items():
        protected.setdefault(n, []).extend(why)
    d = plan(its, tiers, protected)
    by = {x.name: x for x in d}
    # kept plus deleted is everything, each exactly once
    assert sorted(by) == sorted(i.name for i in its) and len(d) == len(its)
    # protected ones are always kept
    assert all(by[n].keep for n in protected)
    # the newest valid checkpoint is always kept, whatever the tiers say
    if its:
        newest = by[max(its, key=lambda i: i.step).name]
        assert newest.keep and "protected: newest valid checkpoint" in newest.reasons
    # every decision has a reason
    assert all(x.reasons for x in d)
    # planning twice deletes nothing more
    survivors = [i for i in its if by[i.name].keep]
    again = plan(survivors, tiers, protected)
    assert all(x.keep for x in again), [x for x in again if not x.keep][:3]
    # monotonic thinning: in each thinning tier, at most one kept per bucket (besides protected)
    for ti, t in enumerate(tiers, 1):
        if t.every_steps:
            buckets = [x.step // t.every_steps for x in d if x.tier == ti and x.keep and x.name not in protected]
            assert len(buckets) == len(set(buckets))


@pytest.mark.slow
@settings(max_examples=300, deadline=None)
@given(st.integers(1, 5000))
def test_regular_saves_keep_exactly_multiples(n):
    """On regular saves, "first of its bucket" is exactly "divisible by S"."""
    steps = [100 * i for i in range(1, n + 1)]
    d = plan(items(steps), [TierSpec(None, 1000)])
    assert kept(d) == [s for s in steps if s % 1000 == 0]


def test_plan_is_deterministic_and_order_independent():
    import random

    its = items(range(7, 60000, 13))
    a = plan(its, DEFAULT)
    shuffled = list(its)
    random.Random(0).shuffle(shuffled)
    b = plan(shuffled, DEFAULT)
    assert [(x.name, x.keep, x.reasons) for x in a] == [(x.name, x.keep, x.reasons) for x in b]


def test_epoch_end_protection_keeps_at_most_the_newest_max_epoch_ends():
    """A script whose `epoch` changes at every save makes every checkpoint an epoch end: without a cap,
    retention could never delete anything. The cap keeps the newest K epoch ends; the rest follow the tiers."""
    from pathlib import Path

    from ckpt_daemon.store.catalog import Catalog, Entry
    from maintenance.retention import protections

    entries = []
    for s in range(10, 310, 10):  # 30 saves, a new epoch at each
        e = Entry(f"checkpoint-{s}", Path("/x") / f"checkpoint-{s}", s, "native", "complete")
        e.epoch, e.epoch_end = s // 10, s < 300
        entries.append(e)
    catalog = Catalog(Path("/x"), entries, [], [], {"latest": None, "best": None}, {}, None)
    uncapped = protections(catalog)
    assert sum("last checkpoint of epoch" in " ".join(w) for w in uncapped.values()) == 29
    assert all(d.keep for d in plan(items(range(10, 310, 10)), [TierSpec(2)], uncapped))  # nothing ever deleted
    capped = protections(catalog, max_epoch_ends=5)
    ends = sorted(int(n.split("-")[1]) for n, w in capped.items() if any("last checkpoint of epoch" in x for x in w))
    assert ends == [250, 260, 270, 280, 290]  # the newest five
    assert kept(plan(items(range(10, 310, 10)), [TierSpec(2)], capped)) == [250, 260, 270, 280, 290, 300]
    assert protections(catalog, keep_epoch_ends=False, max_epoch_ends=5).keys() == {"checkpoint-300"}
