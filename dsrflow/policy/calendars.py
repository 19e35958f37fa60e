"""Working-day calendars and date arithmetic for legal periods.

A :class:`WorkingCalendar` answers two questions, "is this local date a working day?" and "is
it a (public) holiday?", from three sources in order of precedence: the jurisdiction's data
file (``extra_working_days``, then ``extra_holidays``), its weekend, then the public holidays
the ``holidays`` library gives for its country (with or without the library's "observed"
substitute days). Everything here works on local calendar dates; time zones are the caller's
business.
"""

from __future__ import annotations

import calendar
import functools
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Literal

import holidays as holidays_lib

#: Weekday names as written in the data files, to ``date.weekday()`` numbers.
WEEKDAYS: dict[str, int] = {"mon": 0, "tue": 1, "wed": 2, "thu": 3, "fri": 4, "sat": 5, "sun": 6}

# A working day is always found within a few weeks; a calendar that yields none in a year is
# broken data, and failing beats looping.
_SEARCH_LIMIT = 366


@functools.lru_cache(maxsize=256)
def public_holidays(country: str, subdivision: str | None, year: int, observed: bool = True) -> dict[date, str]:
    """The ``holidays`` library's public holidays of ``country`` (and ``subdivision``) that fall
    in ``year``, with their names. Neighbouring years are generated too, so an observed day
    that a rule moves across New Year is not missed. ``observed=False`` leaves out the
    library's substitute days (a Saturday holiday taken on the Friday, and the like)."""
    cal = holidays_lib.country_holidays(country, subdiv=subdivision, years=(year - 1, year, year + 1),
                                        observed=observed)
    return {day: str(name) for day, name in sorted(cal.items()) if day.year == year}


@dataclass(frozen=True, slots=True)
class WorkingCalendar:
    """Which local dates are working days in one jurisdiction."""

    country: str | None = None
    subdivision: str | None = None
    weekend: frozenset[int] = frozenset({5, 6})
    extra_holidays: frozenset[date] = frozenset()
    extra_working_days: frozenset[date] = frozenset()
    #: library holidays (by name, their "(observed)" days included) that the law does not make days off
    not_holidays: frozenset[str] = frozenset()
    #: False: the library's substitute ("observed") days are not holidays
    observed: bool = True

    def _public(self, year: int) -> dict[date, str]:
        if self.country is None:
            return {}
        return {
            d: n for d, n in public_holidays(self.country, self.subdivision, year, self.observed).items()
            if not any(n == x or n.startswith(x + " (") for x in self.not_holidays)
        }

    def is_holiday(self, day: date) -> bool:
        """A public holiday (the library's, or an extra one of the data file), whatever the
        weekday; a day the data file lists as worked is not one."""
        if day in self.extra_working_days:
            return False
        return day in self.extra_holidays or day in self._public(day.year)

    def is_working_day(self, day: date) -> bool:
        if day in self.extra_working_days:
            return True
        if day in self.extra_holidays or day.weekday() in self.weekend:
            return False
        return day not in self._public(day.year)

    def holidays(self, year: int) -> dict[date, str]:
        """Every non-weekend non-working day of ``year`` (library holidays plus the data file's
        extra holidays, minus its extra working days), with names; for display and checking."""
        days = self._public(year)
        days.update({d: "extra holiday (jurisdiction data)" for d in self.extra_holidays if d.year == year})
        return {d: n for d, n in sorted(days.items()) if d not in self.extra_working_days}

    def on_or_after(self, day: date) -> date:
        """``day`` if it is a working day, else the next working day."""
        for _ in range(_SEARCH_LIMIT):
            if self.is_working_day(day):
                return day
            day += timedelta(days=1)
        raise ValueError(f"no working day within {_SEARCH_LIMIT} days of {day}: check the calendar data")

    def nth_working_day(self, first: date, n: int) -> date:
        """The ``n``-th working day counting ``first`` itself as a candidate (n >= 1)."""
        if n < 1:
            raise ValueError("n must be at least 1")
        day = self.on_or_after(first)
        for _ in range(n - 1):
            day = self.on_or_after(day + timedelta(days=1))
        return day

    def on_or_before(self, day: date) -> date:
        """``day`` if it is a working day, else the working day before it."""
        for _ in range(_SEARCH_LIMIT):
            if self.is_working_day(day):
                return day
            day -= timedelta(days=1)
        raise ValueError(f"no working day within {_SEARCH_LIMIT} days before {day}: check the calendar data")

    def nth_working_day_before(self, day: date, n: int) -> date:
        """The ``n``-th working day strictly before ``day`` (n >= 1): 5 working days before a
        Friday is the Friday of the week before, on a calendar without holidays."""
        if n < 1:
            raise ValueError("n must be at least 1")
        for _ in range(n):
            day = self.on_or_before(day - timedelta(days=1))
        return day


def add_months(day: date, months: int, *, overflow: Literal["last_day", "next_day"] = "last_day") -> date:
    """The same date ``months`` later. Where that month has no such date: ``last_day`` gives its
    last day (31 January + 1 month = 28 or 29 February: Regulation 1182/71 Art 3(2)(c), VN Civil
    Code Art 148(3)); ``next_day`` the day after it (1 March: Brazil Civil Code Art 132 §3, "ou no
    imediato, se faltar exata correspondência")."""
    index = day.year * 12 + (day.month - 1) + months
    year, month = divmod(index, 12)
    month += 1
    last = calendar.monthrange(year, month)[1]
    if day.day <= last:
        return date(year, month, day.day)
    if overflow == "next_day":
        return date(year, month, last) + timedelta(days=1)
    return date(year, month, last)


def weekdays(names: Iterable[str]) -> frozenset[int]:
    """Weekday numbers for names such as ``"sat"``."""
    try:
        return frozenset(WEEKDAYS[n.lower()] for n in names)
    except KeyError as exc:
        raise ValueError(f"unknown weekday {exc.args[0]!r}; use one of {', '.join(WEEKDAYS)}") from None
