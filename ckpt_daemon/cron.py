"""Cron expressions as cron means them, through the `cronsim` library (no scheduler import here).

Standard 5-field crontab lines (minute hour day month weekday; weekday 0 and 7 are Sunday; names like
'sun' and 'jan'; when both day-of-month and weekday are restricted a day matching EITHER fires, as in
Vixie/Debian cron), plus an optional leading seconds field (6 fields) that tests and soaks use.
Times are computed in an IANA zone; across a DST change a fixed-time job runs once, as Debian cron does.
"""

from __future__ import annotations

import datetime as dt
import itertools
import zoneinfo

from cronsim import CronSim, CronSimError

MAX_CRON_CHARS = 255  # far above any real crontab line; keeps parsing (and int()) cheap


def _shape_problem(expr: str) -> str | None:
    if len(expr) > MAX_CRON_CHARS:
        return f"a cron expression has at most {MAX_CRON_CHARS} characters, this one has {len(expr)}"
    n = len(expr.split())
    if n not in (5, 6):
        return f"a cron expression has 5 fields (minute hour day month weekday), optionally after a seconds field; got {n}"
    return None


def validate_cron(expr: str) -> str:
    """`expr` unchanged if it is a cron expression that fires at least once; else ValueError saying why."""
    problem = _shape_problem(expr)
    if problem:
        raise ValueError(f"{_short(expr)} is not a valid cron expression: {problem}")
    try:
        next(CronSim(expr, dt.datetime.now(dt.timezone.utc)))
    except (CronSimError, ValueError) as exc:
        why = str(exc)
        if why.startswith("Bad "):  # cronsim says "Bad day-of-week"
            why = f"its {why[4:]} field is malformed or out of range"
        raise ValueError(
            f"{_short(expr)} is not a valid cron expression: {why} (fields: [second 0-59] minute 0-59, hour 0-23, "
            "day 1-31, month 1-12 or jan-dec, weekday 0-7 or sun-sat (0 and 7 are Sunday); each *, a-b, */n, a-b/n "
            "or a list of these)"
        ) from None
    except StopIteration:
        raise ValueError(f"{_short(expr)} never fires in the next 50 years; check the day and month fields") from None
    return expr


def next_fire_times(expr: str, tz_name: str, after: dt.datetime, n: int) -> list[dt.datetime]:
    """The next `n` fire times strictly after the aware datetime `after`, as aware datetimes in `tz_name`
    (fewer if the expression stops firing within cronsim's 50-year horizon)."""
    if after.tzinfo is None:
        raise ValueError("next_fire_times needs an aware datetime (with a time zone)")
    it = CronSim(expr, after.astimezone(zoneinfo.ZoneInfo(tz_name)))
    return list(itertools.islice(it, max(n, 0)))


def _short(expr: str) -> str:
    shown = repr(expr)
    return shown if len(shown) <= 60 else shown[:57] + "..."
