"""Cron schedules for [[maintenance]] jobs: parse "m h dom mon dow" and find the next run.

It sits beside config (which validates every schedule at load) and below everything else.

Role: the five-field crontab(5) syntax of Vixie cron / cronie, so an administrator can
copy a line from the crontab they are replacing: `*`, numbers, ranges `a-b`, lists
`a,b`, steps `*/n` and `a-b/n`, month and weekday names (`jan`, `mon`), 0 and 7 both
Sunday, and the nicknames @yearly @annually @monthly @weekly @daily @midnight @hourly.
As in cron, when both day of month and day of week are restricted a day matches if
either does. Times are the node's local time.

Trusts: nothing: schedules come from the config file, and every error is a ValueError
whose text says which field is wrong (config.py turns it into an error naming the key).
Never: accept a schedule that can never fire (such as "0 0 31 2 *"): a job that
silently never runs is the failure this module exists to prevent.

A small parser of our own rather than a dependency (croniter and friends): the grammar
is fifty lines, and the next-run search must run on the node's clock (ManualClock in
tests), which our own code does without adapters.
"""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass

_NAMES = {
    3: {m: i + 1 for i, m in enumerate("jan feb mar apr may jun jul aug sep oct nov dec".split())},
    4: {d: i for i, d in enumerate("sun mon tue wed thu fri sat".split())},
}
_FIELDS = (("minute", 0, 59), ("hour", 0, 23), ("day of month", 1, 31), ("month", 1, 12), ("day of week", 0, 7))
_NICKNAMES = {
    "@yearly": "0 0 1 1 *", "@annually": "0 0 1 1 *", "@monthly": "0 0 1 * *", "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *", "@midnight": "0 0 * * *", "@hourly": "0 * * * *",
}
_DAYS_IN_MONTH = (31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)  # February: in a leap year


def _value(text: str, index: int) -> int:
    name, lo, hi = _FIELDS[index]
    names = _NAMES.get(index, {})
    if text.lower() in names:
        return names[text.lower()]
    if not text.isdigit():
        raise ValueError(f"{name}: {text!r} is not a number" + (" or a name" if names else ""))
    n = int(text)
    if not lo <= n <= hi:
        raise ValueError(f"{name}: {n} is out of range {lo}-{hi}")
    return n


def _field(text: str, index: int) -> tuple[frozenset[int], bool]:
    """(allowed values, restricted?) of one field."""
    name, lo, hi = _FIELDS[index]
    out: set[int] = set()
    for part in text.split(","):
        base, slash, step_text = part.partition("/")
        step = 1
        if slash:
            if not step_text.isdigit() or int(step_text) == 0:
                raise ValueError(f"{name}: step {step_text!r} must be a positive number")
            step = int(step_text)
        if base == "*":
            first, last = lo, hi
        elif "-" in base:
            a, _, b = base.partition("-")
            first, last = _value(a, index), _value(b, index)
            if first > last:
                raise ValueError(f"{name}: range {base!r} goes backwards")
        elif base:
            first = _value(base, index)
            last = hi if slash else first  # "5/15" means 5-max/15, as in cronie
        else:
            raise ValueError(f"{name}: empty value in {text!r}")
        out.update(range(first, last + 1, step))
    if index == 4 and 7 in out:  # 7 is Sunday too
        out.discard(7)
        out.add(0)
    return frozenset(out), text != "*"


@dataclass(frozen=True)
class CronSchedule:
    text: str
    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]  # 0 = Sunday
    days_restricted: bool
    weekdays_restricted: bool

    @classmethod
    def parse(cls, text: str) -> CronSchedule:
        if not isinstance(text, str):
            raise ValueError("a schedule is a string in cron syntax, e.g. \"0 5 * * *\"")
        expanded = _NICKNAMES.get(text.strip().lower(), text)
        if expanded.strip().startswith("@"):
            raise ValueError(f"{text!r}: unknown nickname (one of {', '.join(_NICKNAMES)})")
        parts = expanded.split()
        if len(parts) != 5:
            raise ValueError(f"{text!r} has {len(parts)} fields; cron syntax has 5: minute hour day-of-month month day-of-week")
        (mi, _), (ho, _), (da, dr), (mo, _), (wd, wr) = (_field(p, i) for i, p in enumerate(parts))
        sched = cls(text, mi, ho, da, mo, wd, dr, wr)
        if not wr and not any(d <= _DAYS_IN_MONTH[m - 1] for m in mo for d in da):
            raise ValueError(f"{text!r} never fires: no month in it has that day")
        return sched

    def _day_matches(self, d: dt.date) -> bool:
        dom = d.day in self.days
        dow = (d.isoweekday() % 7) in self.weekdays
        if self.days_restricted and self.weekdays_restricted:
            return dom or dow
        return dom and dow

    def next_after(self, ts: float) -> float:
        """The first time this schedule fires strictly after ts (local time, whole minutes)."""
        t = dt.datetime.fromtimestamp(ts).replace(second=0, microsecond=0) + dt.timedelta(minutes=1)
        limit = t + dt.timedelta(days=366 * 5)
        while t < limit:
            if t.month not in self.months:
                t = (t.replace(day=1, hour=0, minute=0) + dt.timedelta(days=32)).replace(day=1)
                continue
            if not self._day_matches(t.date()):
                t = t.replace(hour=0, minute=0) + dt.timedelta(days=1)
                continue
            if t.hour not in self.hours:
                t = t.replace(minute=0) + dt.timedelta(hours=1)
                continue
            if t.minute not in self.minutes:
                t += dt.timedelta(minutes=1)
                continue
            return time.mktime(t.timetuple())
        raise ValueError(f"{self.text!r} does not fire within five years")


def parse_schedule(text: str) -> str:
    """Validator for config: the schedule text if it parses, else ValueError naming the field."""
    CronSchedule.parse(text)
    return text
