"""Deadlines for a data-subject request, computed from the bundled jurisdiction data files.

The rules themselves live in ``jurisdictions/<CODE>.toml`` (one file per jurisdiction, read once
and validated against :class:`JurisdictionRules`); this module only knows how to count:

- the local date of receipt is taken in the jurisdiction's time zone;
- ``counting.start``: ``next_day`` starts a period the day after receipt (the request's own day
  is not counted), ``receipt_day`` counts the day of receipt as day 1;
- a period is ``{ days = n }`` (calendar days), ``{ working_days = n }`` (the n-th working day of
  the jurisdiction's calendar) or ``{ months = n }`` (same date n months on, clamped to the end
  of a shorter month);
- ``counting.end_on_non_working_day``: ``next_working_day`` moves a period that ends on a weekend
  or holiday to the next working day, ``keep`` leaves it;
- a deadline is the end of its last day (23:59:59.999999 local), returned in UTC;
- the one extension runs on from the day the original period ends *before* any move to a working
  day (so the move is not counted twice), and is then moved itself if it ends on a non-working day.
"""

from __future__ import annotations

import datetime as dt
import functools
import tomllib
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from importlib import resources
from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import holidays as holidays_lib
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, model_validator

from ..errors import DsrflowError
from ..rights import Right
from .calendars import WorkingCalendar, add_months, weekdays

__all__ = [
    "CalendarSpec",
    "Counting",
    "Deadlines",
    "JurisdictionRules",
    "Period",
    "PolicyDataError",
    "RightGroup",
    "UnknownJurisdiction",
    "UnsupportedRight",
    "deadlines",
    "jurisdictions",
    "rules",
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


class Counting(_Strict):
    start: Literal["next_day", "receipt_day"]
    end_on_non_working_day: Literal["next_working_day", "keep"]
    basis: str = Field(min_length=1)


class DatedNote(_Strict):
    date: dt.date
    note: str = Field(min_length=1, description="why: the decision that made this day special")


class NamedNote(_Strict):
    name: str = Field(min_length=1)
    note: str = Field(min_length=1, description="why")


class CalendarSpec(_Strict):
    holidays: str | None = Field(default=None, description="country code for the holidays library")
    subdivision: str | None = None
    weekend: list[str] = ["sat", "sun"]
    extra_holidays: list[DatedNote] = []
    extra_working_days: list[DatedNote] = []
    not_holidays: list[NamedNote] = Field(
        default=[], description="library holidays, by name, that are not days off (yet) in this jurisdiction"
    )


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


class DenialGround(_Strict):
    """A legal ground on which a request may be refused, in whole or for some rights."""

    rights: list[Right] | None = Field(default=None, description="the rights it applies to; none: every right")
    basis: str = Field(min_length=1, description="the provision, and what it allows")
    inferred: bool = False
    note: str | None = None


class JurisdictionRules(_Strict):
    """The content of one ``jurisdictions/<CODE>.toml`` file."""

    code: str = Field(pattern=r"^[A-Z]{2}(-[A-Z0-9]{1,3})?$")
    name: str
    law: str
    timezone: str
    counting: Counting
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
        weekdays(self.calendar.weekend)
        if self.calendar.holidays is not None:
            try:
                holidays_lib.country_holidays(self.calendar.holidays, subdiv=self.calendar.subdivision)
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


def _prepare(rules: JurisdictionRules) -> _Jurisdiction:
    spec = rules.calendar
    cal = WorkingCalendar(
        country=spec.holidays,
        subdivision=spec.subdivision,
        weekend=weekdays(spec.weekend),
        extra_holidays=frozenset(n.date for n in spec.extra_holidays),
        extra_working_days=frozenset(n.date for n in spec.extra_working_days),
        not_holidays=frozenset(n.name for n in spec.not_holidays),
    )
    group_of = {right: group for group in rules.groups.values() for right in group.rights}
    return _Jurisdiction(rules=rules, tz=ZoneInfo(rules.timezone), calendar=cal, group_of=group_of)


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
    """

    jurisdiction: str
    right: Right
    ack_due_at: datetime
    due_at: datetime
    max_extension_until: datetime | None
    basis: str
    inferred: bool = False


def _raw_end(j: _Jurisdiction, anchor: date, period: Period, *, count_anchor: bool) -> date:
    """Last day of ``period`` counted from ``anchor``, before any move to a working day."""
    if period.working_days is not None:
        first = anchor if count_anchor else anchor + timedelta(days=1)
        return j.calendar.nth_working_day(first, period.working_days)
    back = timedelta(days=1 if count_anchor else 0)
    if period.days is not None:
        return anchor + timedelta(days=period.days) - back
    assert period.months is not None
    return add_months(anchor, period.months) - back


def _close(j: _Jurisdiction, day: date) -> date:
    if j.rules.counting.end_on_non_working_day == "next_working_day":
        return j.calendar.on_or_after(day)
    return day


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

    parts.append(j.rules.counting.basis)
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
    )
