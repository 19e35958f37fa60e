"""Deadlines for a data-subject request, computed from the bundled jurisdiction data files.

The rules themselves live in ``jurisdictions/<CODE>.toml`` (one file per jurisdiction, read once
and validated against :class:`JurisdictionRules`); this module only knows how to count, the way
the file's ``[counting]`` table says (its ``rule`` names the provision, e.g. Regulation 1182/71
Art 3 for the GDPR, and is shown on every :class:`Deadlines`):

- the local date of receipt is taken in the jurisdiction's time zone;
- ``counting.start``: ``next_day`` starts a period the day after receipt (the request's own day
  is not counted), ``receipt_day`` counts the day of receipt as day 1;
- a period is ``{ days = n }`` (calendar days: weekends and holidays count), ``{ working_days =
  n }`` (the n-th working day of the jurisdiction's calendar) or ``{ months = n }`` (the same date
  n months on; where that month has no such date, ``counting.month_overflow`` says whether it
  ends on the month's last day or on the day after);
- ``counting.end_moves_off`` lists the last days that move a period's end (weekday names, and
  ``holiday`` for a public holiday of ``[counting.holidays]``, or of the working calendar if the
  file has no such table); a listed weekday that the data file makes a working day does not move
  it. ``counting.end_moves_to``: ``next_working_day`` (the following working day of the
  calendar) or ``next_day_not_moved_off`` (the following day that is not itself such a day);
- a deadline is the end of its last day (23:59:59.999999 local), returned in UTC;
- the one extension runs on from the day the original period ends *before* any move to a working
  day (so the move is not counted twice), and is then moved itself if it ends on such a day.

The ``[verification]`` table says whether the clock runs while the subject's identity is being
checked; every bundled file says it runs (deadlines count from receipt, as computed here).
:func:`internal_target` places the organisation's own, earlier target between receipt and the
legal due date.
"""

from __future__ import annotations

import datetime as dt
import functools
import re
import tomllib
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from fractions import Fraction
from importlib import resources
from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import holidays as holidays_lib
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, field_validator, model_validator

from ..errors import DsrflowError
from ..rights import Right
from .calendars import WEEKDAYS, WorkingCalendar, add_months, weekdays

__all__ = [
    "CalendarSpec",
    "Counting",
    "Deadlines",
    "JurisdictionRules",
    "Period",
    "PolicyDataError",
    "RightGroup",
    "TargetSpec",
    "UnknownJurisdiction",
    "UnsupportedRight",
    "Verification",
    "deadlines",
    "internal_target",
    "jurisdictions",
    "parse_target_spec",
    "rules",
    "verification_clock",
    "working_calendar",
]

_PACKAGE = "dsrflow.policy"
_DATA_DIR = "jurisdictions"


class UnknownJurisdiction(DsrflowError, ValueError):
    """No data file exists for the jurisdiction code."""


class UnsupportedRight(DsrflowError, ValueError):
    """The jurisdiction's data file does not say how long this right may take."""


class PolicyDataError(DsrflowError, RuntimeError):
    """A bundled jurisdiction data file is malformed: a packaging bug, not bad input."""


# -- the data-file schema ------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Period(_Strict):
    """One legal period: exactly one of ``days``, ``working_days``, ``months``, and its basis."""

    days: PositiveInt | None = None
    working_days: PositiveInt | None = None
    months: PositiveInt | None = None
    basis: str = Field(min_length=1, description="the provision that sets this period")

    @model_validator(mode="after")
    def _one_unit(self) -> Period:
        if sum(v is not None for v in (self.days, self.working_days, self.months)) != 1:
            raise ValueError("a period has exactly one of days, working_days, months")
        return self


class _Inferable(_Strict):
    inferred: bool = Field(default=False, description="an interpretation, not the text")
    note: str | None = None

    @model_validator(mode="after")
    def _inferred_says_why(self) -> _Inferable:
        if self.inferred and not self.note:
            raise ValueError("an inferred entry needs a note saying what it is inferred from")
        return self


class DatedNote(_Strict):
    date: dt.date
    note: str = Field(min_length=1, description="why: the decision that made this day special")


class NamedNote(_Strict):
    name: str = Field(min_length=1)
    note: str = Field(min_length=1, description="why")


class CalendarSpec(_Strict):
    holidays: str | None = Field(default=None, description="country code for the holidays library")
    subdivision: str | None = None
    observed: bool = Field(default=True, description="false: the library's substitute (observed) days are not holidays")
    weekend: list[str] = ["sat", "sun"]
    extra_holidays: list[DatedNote] = []
    extra_working_days: list[DatedNote] = []
    not_holidays: list[NamedNote] = Field(
        default=[], description="library holidays, by name, that are not days off (yet) in this jurisdiction"
    )


_HOLIDAY = "holiday"


class Counting(_Inferable):
    """How periods are counted: the rule the law sets, named, with its basis."""

    rule: str = Field(min_length=1, description='the rule, named with its article: "VN Civil Code 2015 Art 147-148"')
    basis: str = Field(min_length=1, description="what the rule says, as applied here")
    start: Literal["next_day", "receipt_day"]
    month_overflow: Literal["last_day", "next_day"] = Field(
        default="last_day", description="where n months on has no such date: that month's last day, or the day after")
    end_moves_off: list[str] = Field(
        default=[], description='last days that move the end: weekday names ("sat") and "holiday"; none: never moved')
    end_moves_to: Literal["next_working_day", "next_day_not_moved_off"] = "next_working_day"
    holidays: CalendarSpec | None = Field(
        default=None, description='the holidays "holiday" means, where they are not the working calendar\'s')

    @field_validator("end_moves_off")
    @classmethod
    def _known_days(cls, v: list[str]) -> list[str]:
        for name in v:
            if name != _HOLIDAY and name.lower() not in WEEKDAYS:
                raise ValueError(f"end_moves_off: {name!r} is neither a weekday ({', '.join(WEEKDAYS)}) nor 'holiday'")
        return v


class Verification(_Inferable):
    """Whether a period's clock runs while the subject's identity is being verified."""

    clock: Literal["runs", "paused"]
    basis: str = Field(min_length=1, description="the provision, or the reading, that says so")


class RightGroup(_Strict):
    """Rights that share one set of periods."""

    rights: list[Right] = Field(min_length=1)
    complete: Period
    via_processor: Period | None = Field(default=None, description="when a processor or third party must act")
    extension: Period | None = Field(default=None, description="the one extension's maximum")
    acknowledge: bool = Field(default=True, description="false: the jurisdiction's acknowledgement does not apply")
    inferred: bool = Field(default=False, description="the periods are an interpretation, not the text")
    note: str | None = None

    @model_validator(mode="after")
    def _inferred_says_why(self) -> RightGroup:
        if self.inferred and not self.note:
            raise ValueError("an inferred group needs a note saying what it is inferred from")
        return self


class DenialGround(_Inferable):
    """A legal ground on which a request may be refused, in whole or for some rights."""

    rights: list[Right] | None = Field(default=None, description="the rights it applies to; none: every right")
    basis: str = Field(min_length=1, description="the provision, and what it allows")


class JurisdictionRules(_Strict):
    """The content of one ``jurisdictions/<CODE>.toml`` file."""

    code: str = Field(pattern=r"^[A-Z]{2}(-[A-Z0-9]{1,3})?$")
    name: str
    law: str
    timezone: str
    counting: Counting
    verification: Verification = Field(description="does the clock run while identity is verified?")
    calendar: CalendarSpec = CalendarSpec()
    acknowledge: Period | None = None
    groups: dict[str, RightGroup]
    denial_grounds: dict[str, DenialGround] = Field(
        default_factory=dict, description="ground name -> where the law allows refusing a request")

    @model_validator(mode="after")
    def _consistent(self) -> JurisdictionRules:
        try:
            ZoneInfo(self.timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {self.timezone!r}") from None
        seen: dict[Right, str] = {}
        for name, group in self.groups.items():
            for right in group.rights:
                if right in seen:
                    raise ValueError(f"right {right} is in both groups {seen[right]!r} and {name!r}")
                seen[right] = name
        for spec in (self.calendar, self.counting.holidays):
            if spec is None:
                continue
            weekdays(spec.weekend)
            if spec.holidays is not None:
                try:
                    holidays_lib.country_holidays(spec.holidays, subdiv=spec.subdivision)
                except NotImplementedError as exc:
                    raise ValueError(f"holidays library: {exc}") from None
        return self


# -- loading ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Jurisdiction:
    rules: JurisdictionRules
    tz: ZoneInfo
    calendar: WorkingCalendar
    group_of: dict[Right, RightGroup]
    #: the calendar whose holidays ``"holiday"`` in ``counting.end_moves_off`` means
    end_holidays: WorkingCalendar
    end_weekdays: frozenset[int]
    end_on_holiday: bool

    def moves_off(self, day: date) -> bool:
        """Does a period whose last day is ``day`` end later (``counting.end_moves_off``)?"""
        if self.end_on_holiday and self.end_holidays.is_holiday(day):
            return True
        return day.weekday() in self.end_weekdays and day not in self.calendar.extra_working_days


def _calendar(spec: CalendarSpec) -> WorkingCalendar:
    return WorkingCalendar(
        country=spec.holidays,
        subdivision=spec.subdivision,
        weekend=weekdays(spec.weekend),
        extra_holidays=frozenset(n.date for n in spec.extra_holidays),
        extra_working_days=frozenset(n.date for n in spec.extra_working_days),
        not_holidays=frozenset(n.name for n in spec.not_holidays),
        observed=spec.observed,
    )


def _prepare(rules: JurisdictionRules) -> _Jurisdiction:
    cal = _calendar(rules.calendar)
    counting = rules.counting
    group_of = {right: group for group in rules.groups.values() for right in group.rights}
    return _Jurisdiction(
        rules=rules, tz=ZoneInfo(rules.timezone), calendar=cal, group_of=group_of,
        end_holidays=cal if counting.holidays is None else _calendar(counting.holidays),
        end_weekdays=weekdays(n for n in counting.end_moves_off if n != _HOLIDAY),
        end_on_holiday=_HOLIDAY in counting.end_moves_off,
    )


@functools.cache
def _registry() -> dict[str, _Jurisdiction]:
    registry: dict[str, _Jurisdiction] = {}
    for entry in sorted(resources.files(_PACKAGE).joinpath(_DATA_DIR).iterdir(), key=lambda e: e.name):
        if not entry.name.endswith(".toml"):
            continue
        try:
            rules = JurisdictionRules.model_validate(tomllib.loads(entry.read_text(encoding="utf-8")))
        except (tomllib.TOMLDecodeError, ValidationError) as exc:
            raise PolicyDataError(f"{_DATA_DIR}/{entry.name}: {exc}") from exc
        if entry.name != f"{rules.code}.toml":
            raise PolicyDataError(f"{_DATA_DIR}/{entry.name} declares code {rules.code!r}; name it {rules.code}.toml")
        registry[rules.code] = _prepare(rules)
    return registry


def _get(code: str) -> _Jurisdiction:
    try:
        return _registry()[code]
    except KeyError:
        known = ", ".join(sorted(_registry()))
        raise UnknownJurisdiction(f"unknown jurisdiction {code!r}; known: {known}") from None


def jurisdictions() -> list[str]:
    """Codes of the jurisdictions that have a data file, sorted."""
    return sorted(_registry())


def rules(jurisdiction: str) -> JurisdictionRules:
    """The validated content of one jurisdiction's data file."""
    return _get(jurisdiction).rules


def denial_ground(jurisdiction: str, name: str, right: Right) -> DenialGround:
    """The ground ``name`` of the jurisdiction's data file, if it applies to ``right``; raises
    :class:`UnsupportedRight` (naming the grounds that do) otherwise."""
    grounds = _get(jurisdiction).rules.denial_grounds
    usable = sorted(n for n, g in grounds.items() if g.rights is None or Right(right) in g.rights)
    ground = grounds.get(name)
    if ground is None or name not in usable:
        raise UnsupportedRight(f"{jurisdiction} has no denial ground {name!r} for {right}; "
                               f"its grounds: {', '.join(usable) or 'none'}")
    return ground


def working_calendar(jurisdiction: str) -> WorkingCalendar:
    """The working-day calendar a jurisdiction's periods are counted on."""
    return _get(jurisdiction).calendar


def verification_clock(jurisdiction: str) -> Verification:
    """Whether the jurisdiction's periods keep running while the subject's identity is verified
    (``clock``: ``runs`` or ``paused``), with the provision or reading that says so."""
    return _get(jurisdiction).rules.verification


# -- counting --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Deadlines:
    """When a request must be acknowledged and completed.

    ``ack_due_at`` is never later than ``due_at``: where the law sets no separate
    acknowledgement (GDPR), or the completion period is the shorter one, the acknowledgement
    falls due with the completion. ``max_extension_until`` is the latest completion if the one
    extension the law allows is taken (it needs reasons given to the subject in time), or None
    where no extension is allowed. ``inferred`` is true when the periods for this right are an
    interpretation recorded in the data file rather than the text of the law.
    ``counting_rule`` names the rule the dates were counted by ("Regulation (EEC, Euratom) No
    1182/71 Art 3"); ``verification_clock`` says whether the clock runs while identity is being
    verified (``runs``: these deadlines, counted from receipt, hold whenever verification ends).
    """

    jurisdiction: str
    right: Right
    ack_due_at: datetime
    due_at: datetime
    max_extension_until: datetime | None
    basis: str
    inferred: bool = False
    counting_rule: str = ""
    verification_clock: Literal["runs", "paused"] = "runs"


def _raw_end(j: _Jurisdiction, anchor: date, period: Period, *, count_anchor: bool) -> date:
    """Last day of ``period`` counted from ``anchor``, before any move to a working day."""
    if period.working_days is not None:
        first = anchor if count_anchor else anchor + timedelta(days=1)
        return j.calendar.nth_working_day(first, period.working_days)
    back = timedelta(days=1 if count_anchor else 0)
    if period.days is not None:
        return anchor + timedelta(days=period.days) - back
    assert period.months is not None
    return add_months(anchor, period.months, overflow=j.rules.counting.month_overflow) - back


def _close(j: _Jurisdiction, day: date) -> date:
    """The day a period whose last day is ``day`` really ends (``counting.end_moves_*``)."""
    if not j.moves_off(day):
        return day
    if j.rules.counting.end_moves_to == "next_working_day":
        return j.calendar.on_or_after(day + timedelta(days=1))
    for _ in range(366):
        day += timedelta(days=1)
        if not j.moves_off(day):
            return day
    raise PolicyDataError(f"{j.rules.code}: every day of a year moves a period's end; check [counting]")


def _end_of(j: _Jurisdiction, day: date) -> datetime:
    return datetime.combine(day, time.max, tzinfo=j.tz).astimezone(UTC)


def deadlines(right: Right, jurisdiction: str, received_at: datetime, *, via_processor: bool = False) -> Deadlines:
    """The deadlines for a request for ``right`` under ``jurisdiction``, received at ``received_at``
    (timezone-aware). ``via_processor``: a processor or third party must act, which some laws
    answer with a longer period.

    Raises :class:`UnknownJurisdiction` for a code without a data file, :class:`UnsupportedRight`
    if the data file does not cover the right, and ``ValueError`` for a naive ``received_at``.
    """
    if received_at.tzinfo is None or received_at.utcoffset() is None:
        raise ValueError("received_at must be timezone-aware")
    j = _get(jurisdiction)
    right = Right(right)
    group = j.group_of.get(right)
    if group is None:
        raise UnsupportedRight(f"{jurisdiction} data file has no deadline for right {right!s}")
    count_receipt_day = j.rules.counting.start == "receipt_day"
    received = received_at.astimezone(j.tz).date()

    parts: list[str] = []
    ack = j.rules.acknowledge if group.acknowledge else None
    parts.append(ack.basis if ack else "no separate acknowledgement deadline: due with the response")

    period = group.complete
    if via_processor and group.via_processor is not None:
        period = group.via_processor
    parts.append(period.basis)
    if via_processor and group.via_processor is None:
        parts.append("no longer period where a processor or third party must act")
    raw_due = _raw_end(j, received, period, count_anchor=count_receipt_day)
    due_at = _end_of(j, _close(j, raw_due))

    extended_at: datetime | None = None
    if group.extension is not None:
        parts.append(group.extension.basis)
        extended_at = _end_of(j, _close(j, _raw_end(j, raw_due, group.extension, count_anchor=False)))

    ack_due_at = due_at
    if ack is not None:
        ack_due_at = min(due_at, _end_of(j, _close(j, _raw_end(j, received, ack, count_anchor=count_receipt_day))))

    counting = j.rules.counting
    parts.append(f"counted per {counting.rule}: {counting.basis}")
    check = j.rules.verification
    parts.append(f"identity verification: the clock {'runs' if check.clock == 'runs' else 'is paused'} "
                 f"({check.basis})")
    if group.inferred:
        parts.append(f"inferred: {group.note}")
    return Deadlines(
        jurisdiction=j.rules.code,
        right=right,
        ack_due_at=ack_due_at,
        due_at=due_at,
        max_extension_until=extended_at,
        basis="; ".join(parts),
        inferred=group.inferred,
        counting_rule=counting.rule,
        verification_clock=check.clock,
    )


# -- the organisation's internal target ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TargetSpec:
    """A parsed internal-target setting: ``share`` of the time from receipt to the due date
    (``"80%"``), or ``working_days`` / ``days`` before the legal due date (``"5wd"``, ``"3d"``)."""

    kind: Literal["share", "working_days", "days"]
    #: the share (0 < share <= 1), or the number of days before the due date
    value: Fraction | int


_SPEC = re.compile(r"^\s*(?:(?P<pct>\d+(?:\.\d+)?)\s*%|(?P<n>\d+)\s*(?P<unit>wd|d))\s*$", re.IGNORECASE)


def parse_target_spec(spec: str) -> TargetSpec:
    """Read an internal-target setting: ``"80%"`` (that share of the time from receipt to the
    legal due date), ``"5wd"`` (5 working days of the jurisdiction's calendar before the due
    date) or ``"3d"`` (3 calendar days before). Raises ``ValueError`` saying what is accepted."""
    m = _SPEC.match(spec) if isinstance(spec, str) else None
    if m is None:
        raise ValueError(f"internal target {spec!r}: use a share of the period such as '80%', or days before the "
                         "legal due date such as '5wd' (working days) or '3d' (calendar days)")
    if m["pct"] is not None:
        share = Fraction(m["pct"]) / 100
        if not 0 < share <= 1:
            raise ValueError(f"internal target {spec!r}: a share must be more than 0% and at most 100%")
        return TargetSpec("share", share)
    n = int(m["n"])
    if n > 366:
        raise ValueError(f"internal target {spec!r}: at most 366 days before the due date")
    return TargetSpec("working_days" if m["unit"].lower() == "wd" else "days", n)


def internal_target(jurisdiction: str, received_at: datetime, due_at: datetime, spec: str) -> datetime:
    """The organisation's own target for a case received at ``received_at`` and legally due at
    ``due_at`` (both timezone-aware), per ``spec`` (see :func:`parse_target_spec`): the end of a
    local day in the jurisdiction's time zone, in UTC, never after ``due_at`` and never before
    the end of the day of receipt (so never before ``received_at``).

    - ``"80%"``: the end of the last local day that ends by the moment 80% of the time from
      receipt to ``due_at`` has run;
    - ``"5wd"``: the end of the 5th working day of the jurisdiction's calendar before the local
      date of ``due_at``;
    - ``"3d"``: the end of the local day 3 calendar days before the local date of ``due_at``.
    """
    parsed = parse_target_spec(spec)
    for name, at in (("received_at", received_at), ("due_at", due_at)):
        if at.tzinfo is None or at.utcoffset() is None:
            raise ValueError(f"{name} must be timezone-aware")
    if due_at < received_at:
        raise ValueError("due_at is before received_at")
    j = _get(jurisdiction)
    due_day = due_at.astimezone(j.tz).date()
    if parsed.kind == "share":
        span = (due_at - received_at) // timedelta(microseconds=1)
        point = received_at + timedelta(microseconds=int(span * parsed.value))
        day = point.astimezone(j.tz).date()
        if _end_of(j, day) > point:
            day -= timedelta(days=1)
    elif parsed.kind == "working_days":
        day = j.calendar.nth_working_day_before(due_day, int(parsed.value)) if parsed.value else due_day
    else:
        day = due_day - timedelta(days=int(parsed.value))
    earliest = _end_of(j, received_at.astimezone(j.tz).date())
    return min(max(_end_of(j, day), earliest), due_at.astimezone(UTC))
