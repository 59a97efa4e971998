"""Cron schedules of revisions (pure): ``min hour day-of-month month day-of-week``, or six fields with
seconds first; ``*``, ``a``, ``a-b``, ``*/n``, ``a-b/n`` and comma lists; UTC.

    parse(expr) -> Cron                  # ValueError naming the field that is wrong
    Cron.next_after(t) -> datetime       # the first fire time strictly after t
    due(expr, last, now) -> bool         # has it fired in (last, now]?

As in cron, when both day-of-month and day-of-week are restricted a day matching either fires.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

_FIELDS = (("second", 0, 59), ("minute", 0, 59), ("hour", 0, 23), ("day of month", 1, 31), ("month", 1, 12),
           ("day of week", 0, 7))
_HORIZON = timedelta(days=366 * 5)


@dataclass(frozen=True)
class Cron:
    seconds: frozenset[int]
    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]  # 0 = Sunday
    any_day: bool
    any_weekday: bool

    def _day_ok(self, t: datetime) -> bool:
        dom, dow = t.day in self.days, (t.isoweekday() % 7) in self.weekdays
        if self.any_day or self.any_weekday:
            return dom and dow
        return dom or dow

    def next_after(self, t: datetime) -> datetime:
        t = t.astimezone(UTC).replace(microsecond=0) + timedelta(seconds=1)
        limit = t + _HORIZON
        while t < limit:
            if t.month not in self.months:
                t = (t.replace(day=1, hour=0, minute=0, second=0) + timedelta(days=32)).replace(day=1)
            elif not self._day_ok(t):
                t = t.replace(hour=0, minute=0, second=0) + timedelta(days=1)
            elif t.hour not in self.hours:
                t = t.replace(minute=0, second=0) + timedelta(hours=1)
            elif t.minute not in self.minutes:
                t = t.replace(second=0) + timedelta(minutes=1)
            elif t.second not in self.seconds:
                t += timedelta(seconds=1)
            else:
                return t
        raise ValueError("the schedule never fires (e.g. February 31)")


def _field(text: str, name: str, low: int, high: int) -> frozenset[int]:
    values: set[int] = set()
    for part in text.split(","):
        base, _, step_text = part.partition("/")
        try:
            step = int(step_text) if step_text else 1
            if base == "*":
                start, stop = low, high
            elif "-" in base:
                a, b = base.split("-", 1)
                start, stop = int(a), int(b)
            else:
                start = int(base)
                stop = high if step_text else start
        except ValueError:
            raise ValueError(f"{name} {part!r} is not a number, a range a-b, * or */n") from None
        if step < 1 or start < low or stop > high or start > stop:
            raise ValueError(f"{name} {part!r} is outside {low}-{high}")
        values.update(range(start, stop + 1, step))
    return frozenset(values)


def parse(expr: str) -> Cron:
    parts = expr.split()
    if len(parts) == 5:
        parts = ["0", *parts]
    if len(parts) != 6:
        raise ValueError(f"{expr!r} has {len(parts)} fields; write 5 (minute hour day-of-month month day-of-week) "
                         "or 6 (with seconds first), e.g. '0 3 * * *' for 03:00 UTC daily")
    sets = [_field(p, name, low, high) for p, (name, low, high) in zip(parts, _FIELDS, strict=True)]
    weekdays = frozenset(d % 7 for d in sets[5])
    cron = Cron(sets[0], sets[1], sets[2], sets[3], sets[4], weekdays, parts[3] == "*", parts[5] == "*")
    cron.next_after(datetime(2000, 1, 1, tzinfo=UTC))  # refuses a schedule that never fires
    return cron


def due(expr: str, last: float | None, now: float) -> bool:
    """Whether ``expr`` fired after ``last`` (epoch seconds) and by ``now``; no ``last``: yes."""
    if last is None:
        return True
    return parse(expr).next_after(datetime.fromtimestamp(last, UTC)).timestamp() <= now


def next_fire(expr: str, after: float) -> str:
    return parse(expr).next_after(datetime.fromtimestamp(after, UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")
