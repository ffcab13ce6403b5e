"""Cron means what cron means: next fire times of a table of expressions, in UTC and across DST in
Europe/Berlin, checked against cronsim itself, against hand-written datetimes, and through the
APScheduler trigger the daemon schedules with."""

from __future__ import annotations

import datetime as dt
import itertools
import zoneinfo

import pytest
from cronsim import CronSim

from ckpt_daemon.config import ConfigError, parse_config
from ckpt_daemon.cron import next_fire_times, validate_cron
from daemon.jobs import CronsimTrigger, missed

UTC = zoneinfo.ZoneInfo("UTC")
BERLIN = zoneinfo.ZoneInfo("Europe/Berlin")
START = dt.datetime(2026, 3, 25, 12, 0, tzinfo=UTC)  # a Wednesday; Berlin springs forward on Sunday 2026-03-29


def utc(*a):
    return dt.datetime(*a, tzinfo=UTC)


def berlin(*a):
    return dt.datetime(*a, tzinfo=BERLIN)


# (expression, zone, start, the next fire times written out by hand)
TABLE = [
    ("0 4 * * 0-7", "UTC", START, [utc(2026, 3, d, 4) for d in (26, 27, 28, 29, 30, 31)]),  # every day
    ("0 4 * * */2", "UTC", START, [utc(2026, 3, 26, 4), utc(2026, 3, 28, 4), utc(2026, 3, 29, 4), utc(2026, 3, 31, 4)]),
    ("0 4 * * 0-6/2", "UTC", START,
     [utc(2026, 3, 26, 4), utc(2026, 3, 28, 4), utc(2026, 3, 29, 4), utc(2026, 3, 31, 4)]),
    ("0 4 * * 1-5", "UTC", START, [utc(2026, 3, 26, 4), utc(2026, 3, 27, 4), utc(2026, 3, 30, 4), utc(2026, 3, 31, 4)]),
    ("0 4 * * 5-7", "UTC", START, [utc(2026, 3, 27, 4), utc(2026, 3, 28, 4), utc(2026, 3, 29, 4), utc(2026, 4, 3, 4)]),
    ("0 4 * * 0", "UTC", START, [utc(2026, 3, 29, 4), utc(2026, 4, 5, 4), utc(2026, 4, 12, 4)]),  # Sunday 04:00
    ("0 4 * * sun", "UTC", START, [utc(2026, 3, 29, 4), utc(2026, 4, 5, 4), utc(2026, 4, 12, 4)]),
    ("0 4 * * SUN", "UTC", START, [utc(2026, 3, 29, 4), utc(2026, 4, 5, 4)]),
    # day-of-month OR weekday when both are restricted: the 1st of the month, and every Sunday
    ("0 3 1 * 0", "UTC", START, [utc(2026, 3, 29, 3), utc(2026, 4, 1, 3), utc(2026, 4, 5, 3), utc(2026, 4, 12, 3)]),
    ("0 3 1 jan-jun mon", "UTC", START, [utc(2026, 3, 30, 3), utc(2026, 4, 1, 3), utc(2026, 4, 6, 3)]),
    ("*/20 * * * * *", "UTC", START,
     [utc(2026, 3, 25, 12, 0, 20), utc(2026, 3, 25, 12, 0, 40), utc(2026, 3, 25, 12, 1, 0)]),
    ("0 3 * * *", "UTC", START, [utc(2026, 3, 26, 3), utc(2026, 3, 27, 3)]),
    # Europe/Berlin springs forward at 02:00 on 2026-03-29: 02:30 does not exist that day, the job runs once, at 03:00
    ("30 2 * * *", "Europe/Berlin", START,
     [berlin(2026, 3, 26, 2, 30), berlin(2026, 3, 27, 2, 30), berlin(2026, 3, 28, 2, 30), berlin(2026, 3, 29, 3, 0),
      berlin(2026, 3, 30, 2, 30)]),
    ("0 4 * * 0", "Europe/Berlin", START, [berlin(2026, 3, 29, 4), berlin(2026, 4, 5, 4)]),  # 04:00 CEST = 02:00 UTC
    ("0 3 * * *", "Europe/Berlin", START, [berlin(2026, 3, 26, 3), berlin(2026, 3, 27, 3), berlin(2026, 3, 28, 3),
                                           berlin(2026, 3, 29, 3), berlin(2026, 3, 30, 3)]),
    # and falls back at 03:00 on 2026-10-25: 02:30 happens twice, the job runs once
    ("30 2 * * *", "Europe/Berlin", utc(2026, 10, 24, 12),
     [berlin(2026, 10, 25, 2, 30), berlin(2026, 10, 26, 2, 30), berlin(2026, 10, 27, 2, 30)]),
    ("0 4 * * 0-7", "Europe/Berlin", utc(2026, 10, 24, 12), [berlin(2026, 10, 25, 4), berlin(2026, 10, 26, 4)]),
]
IDS = [f"{e}@{tz}-{i}" for i, (e, tz, _, _) in enumerate(TABLE)]


@pytest.mark.parametrize("expr,tz,start,expected", TABLE, ids=IDS)
def test_next_fire_times_by_hand(expr, tz, start, expected):
    got = next_fire_times(expr, tz, start, len(expected))
    assert got == expected
    assert [t.utcoffset() for t in got] == [t.utcoffset() for t in expected]  # the right side of a DST change
    assert all(t.tzinfo == zoneinfo.ZoneInfo(tz) for t in got)


@pytest.mark.parametrize("expr,tz,start,expected", TABLE, ids=IDS)
def test_next_fire_times_agree_with_cronsim(expr, tz, start, expected):
    direct = list(itertools.islice(CronSim(expr, start.astimezone(zoneinfo.ZoneInfo(tz))), 20))
    assert next_fire_times(expr, tz, start, 20) == direct


@pytest.mark.parametrize("expr,tz,start,expected", TABLE, ids=IDS)
def test_apscheduler_trigger_fires_at_the_same_times(expr, tz, start, expected):
    trig = CronsimTrigger(expr, tz)
    want = next_fire_times(expr, tz, start, 12)
    got, prev = [], None
    for _ in range(12):  # as the scheduler calls it: first from `now`, then from each fire time
        prev = trig.get_next_fire_time(prev, prev or start + dt.timedelta(microseconds=1))
        got.append(prev)
    assert got == want
    # from `now` with no previous run, a fire time exactly at `now` counts (as APScheduler's CronTrigger)
    assert trig.get_next_fire_time(None, want[0]) == want[0]
    assert trig.get_next_fire_time(None, want[0] + dt.timedelta(microseconds=1)) == want[1]


def test_weekday_fields_cover_the_days_cron_means():
    def weekdays(expr):  # Python weekday: Monday 0 .. Sunday 6
        return sorted({t.weekday() for t in next_fire_times(expr, "UTC", START, 21)})

    assert weekdays("0 4 * * 0-7") == [0, 1, 2, 3, 4, 5, 6]
    assert weekdays("0 4 * * 7") == [6]  # 7 is Sunday too
    assert weekdays("0 4 * * */2") == weekdays("0 4 * * 0,2,4,6") == [1, 3, 5, 6]  # Sun, Tue, Thu, Sat
    assert weekdays("0 4 * * 0-6/2") == [1, 3, 5, 6]
    assert weekdays("0 4 * * 1-5") == [0, 1, 2, 3, 4]
    assert weekdays("0 4 * * 5-7") == [4, 5, 6]


def test_apscheduler_schedules_the_trigger():
    from apscheduler.schedulers.background import BackgroundScheduler

    sched = BackgroundScheduler(timezone=BERLIN)
    sched.start(paused=True)
    try:
        job = sched.add_job(lambda: None, CronsimTrigger("0 3 1 * 0", "Europe/Berlin"), id="snapshot")
        now = dt.datetime.now(BERLIN)
        assert job.next_run_time == next_fire_times("0 3 1 * 0", "Europe/Berlin", now, 1)[0]
        assert job.next_run_time - now <= dt.timedelta(days=7)  # a Sunday comes within a week
        assert str(job.trigger) == "cron[0 3 1 * 0, Europe/Berlin]"
    finally:
        sched.shutdown(wait=False)


def test_trigger_refuses_a_bad_expression_or_zone():
    with pytest.raises(ValueError, match="not a valid cron expression"):
        CronsimTrigger("0 25 * * *", "UTC")
    with pytest.raises(zoneinfo.ZoneInfoNotFoundError):
        CronsimTrigger("0 3 * * *", "Mars/Olympus")


def test_missed_uses_cron_day_semantics():
    ts = lambda *a: utc(*a).timestamp()  # noqa: E731
    # "the 1st or any Sunday": last ran Sunday the 15th, now Monday the 23rd: Sunday the 22nd was missed
    m = missed("0 3 1 * 0", "UTC", ts(2026, 11, 15, 3, 0, 5), ts(2026, 11, 23, 9, 0))
    assert m == utc(2026, 11, 22, 3)
    assert missed("0 3 1 * 0", "UTC", ts(2026, 11, 22, 3, 0, 5), ts(2026, 11, 23, 9, 0)) is None
    # every day (0-7): yesterday's run done, today's 04:00 passed
    assert missed("0 4 * * 0-7", "UTC", ts(2026, 11, 22, 4, 0, 1), ts(2026, 11, 23, 9, 0)) == utc(2026, 11, 23, 4)
    # in Berlin across the spring change: last run Saturday 03:00 CET, now Sunday 12:00 CEST: Sunday 03:00 CEST missed
    m = missed("0 3 * * *", "Europe/Berlin", berlin(2026, 3, 28, 3, 0, 2).timestamp(),
               berlin(2026, 3, 29, 12).timestamp())
    assert m == berlin(2026, 3, 29, 3) and m.utcoffset() == dt.timedelta(hours=2)


@pytest.mark.parametrize("expr", ["0 4 * * 0-6/2", "0 4 * * 0-7", "0 3 1 * 0", "*/10 * * * * *", "0 0 29 2 *",
                                  "0 3 * * mon-fri", "0 0 L * *", "15,45 */2 1-15 jan,jul *"])
def test_validate_cron_accepts(expr):
    assert validate_cron(expr) == expr


@pytest.mark.parametrize("expr,needle", [
    ("0 25 * * 0", "not a valid cron expression"),
    ("0 4 * * 8", "not a valid cron expression"),
    ("every day", "5 fields"),
    ("* * * *", "5 fields"),
    ("0 0 30 2 *", "not a valid cron expression"),  # February never has a 30th
    ("*/0 * * * *", "not a valid cron expression"),
    ("9" * 5000 + " * * * *", "at most 255 characters"),
])
def test_validate_cron_refuses(expr, needle):
    with pytest.raises(ValueError) as ei:
        validate_cron(expr)
    assert needle in str(ei.value) and len(str(ei.value)) < 400


def test_config_accepts_what_cron_accepts(tmp_path):
    cfg = parse_config('snapshots:\n  schedule: "0 3 * * 0-6/2"\nretention:\n  schedule: "0 4 * * 0-7"\n',
                       tmp_path / "c.yaml")
    assert cfg.snapshots.schedule == "0 3 * * 0-6/2"
    with pytest.raises(ConfigError, match=r"snapshots\.schedule.*not a valid cron expression"):
        parse_config('snapshots:\n  schedule: "0 3 * * 9"\n', tmp_path / "c.yaml")
