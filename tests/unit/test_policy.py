"""Deadlines from the jurisdiction data files, checked against dates worked out by hand (more,
one row per case, in test_deadline_tables.py).

Calendar used for the hand calculations (weekday of the 1st of each month):
2026: Jan Thu, Feb Sun, Mar Sun, Apr Wed, May Fri, Jun Mon, Jul Wed, Aug Sat, Sep Tue.
2027: Jan Fri, Feb Mon.
Vietnamese days off used below: 1 Jan 2026 (Thu), 2 Jan 2026 (Fri, swapped with Sat 10 Jan),
Tet 2026 Mon 16 - Fri 20 Feb, 30 Apr (Thu) and 1 May (Fri) 2026, Tet 2027 Thu 4 - Wed 10 Feb
(Lunar New Year is Sat 6 Feb 2027; the library's estimate, no government plan yet).
VN is UTC+7 all year, so the end of a local day D is D 16:59:59.999999 UTC.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from fractions import Fraction
from zoneinfo import ZoneInfo

import pytest
from pydantic import ValidationError

from dsrflow import policy
from dsrflow.policy import Deadlines, UnknownJurisdiction, add_months
from dsrflow.policy.deadlines import JurisdictionRules
from dsrflow.rights import Right

VN = ZoneInfo("Asia/Ho_Chi_Minh")
BRUSSELS = ZoneInfo("Europe/Brussels")
LA = ZoneInfo("America/Los_Angeles")


def vn_eod(y: int, m: int, d: int) -> datetime:
    """End of a Vietnamese local day, in UTC (UTC+7, no DST)."""
    return datetime(y, m, d, 16, 59, 59, 999999, tzinfo=UTC)


def local_day(at: datetime | None, tz: ZoneInfo) -> date:
    assert at is not None
    return at.astimezone(tz).date()


def vn(right: Right, at: datetime, *, via_processor: bool = False) -> Deadlines:
    return policy.deadlines(right, "VN", at, via_processor=via_processor)


# -- the API surface -------------------------------------------------------------------------


def test_jurisdictions_listed() -> None:
    assert policy.jurisdictions() == ["BR", "EU", "US-CA", "VN"]


def test_unknown_jurisdiction() -> None:
    with pytest.raises(UnknownJurisdiction, match="'XX'.*BR, EU, US-CA, VN"):
        policy.deadlines(Right.access, "XX", datetime(2026, 3, 6, 10, tzinfo=VN))
    # codes are exact, and the error is a ValueError for callers that only know that
    with pytest.raises(ValueError):
        policy.deadlines(Right.access, "vn", datetime(2026, 3, 6, 10, tzinfo=VN))


def test_naive_received_at_rejected() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        policy.deadlines(Right.access, "VN", datetime(2026, 3, 6, 10))


@pytest.mark.parametrize("code", ["BR", "EU", "US-CA", "VN"])
@pytest.mark.parametrize("right", list(Right))
def test_every_right_has_deadlines(code: str, right: Right) -> None:
    rules = policy.rules(code)
    for via in (False, True):
        d = policy.deadlines(right, code, datetime(2026, 3, 6, 10, tzinfo=UTC), via_processor=via)
        assert d.jurisdiction == code and d.right is right
        assert d.ack_due_at <= d.due_at
        assert d.max_extension_until is None or d.max_extension_until > d.due_at
        assert d.due_at.tzinfo is UTC and d.basis
        # the rule the dates were counted by, and the clock during verification, are shown
        assert d.counting_rule == rules.counting.rule and rules.counting.rule in d.basis
        assert d.verification_clock == rules.verification.clock == "runs"
        assert "identity verification: the clock runs" in d.basis


@pytest.mark.parametrize(("code", "rule"), [
    ("VN", "VN Civil Code 2015 Art 147-148"),
    ("EU", "Regulation (EEC, Euratom) No 1182/71 Art 3"),
    ("US-CA", "California Civil Code §10"),
    ("BR", "Brazil Civil Code (Law 10.406/2002) Art 132"),
])
def test_counting_rule_is_named(code: str, rule: str) -> None:
    assert policy.rules(code).counting.rule == rule
    assert policy.deadlines(Right.access, code, datetime(2026, 3, 6, 10, tzinfo=UTC)).counting_rule == rule


def test_verification_clock() -> None:
    ca = policy.verification_clock("US-CA")
    assert ca.clock == "runs" and "7021(b)" in ca.basis and not ca.inferred
    for code in ("VN", "EU", "BR"):
        v = policy.verification_clock(code)
        # the text is silent on identity checks: the reading is marked, with its reasons
        assert v.clock == "runs" and v.basis and v.inferred and v.note
    with pytest.raises(UnknownJurisdiction):
        policy.verification_clock("XX")


def test_deadlines_is_frozen() -> None:
    d = vn(Right.access, datetime(2026, 3, 6, 10, tzinfo=VN))
    with pytest.raises(AttributeError):
        d.due_at = d.ack_due_at  # type: ignore[misc]


# -- Vietnam: the data file says what Decree 356 Art 5 says -------------------------------------


@pytest.mark.parametrize(
    ("right", "complete", "via", "ext"),
    [
        (Right.withdraw_consent, 15, 20, 15),  # Art 5(2)
        (Right.restriction, 15, 20, 15),  # Art 5(2)
        (Right.objection, 15, 20, 15),  # Art 5(2)
        (Right.access, 10, 15, 10),  # Art 5(3) view
        (Right.rectification, 10, 15, 10),  # Art 5(3) correct
        (Right.portability, 10, 15, 10),  # Art 5(3) provide (inferred)
        (Right.erasure, 20, 30, 20),  # Art 5(4)
        (Right.request_protective_measures, 15, None, 15),  # Art 5(5)
        (Right.opt_out_marketing, 15, 20, 15),  # as an objection (Law 91 Art 28(5))
    ],
)
def test_vn_data_matches_decree_356_art_5(right: Right, complete: int, via: int | None, ext: int) -> None:
    rules = policy.rules("VN")
    assert rules.acknowledge is not None and rules.acknowledge.working_days == 2
    group = next(g for g in rules.groups.values() if right in g.rights)
    assert group.complete.days == complete
    assert (group.via_processor.days if group.via_processor else None) == via
    assert group.extension is not None and group.extension.days == ext
    assert group.acknowledge


def test_vn_holiday_calendar_has_tet_and_hung_kings() -> None:
    cal = policy.working_calendar("VN")
    h2026, h2027 = cal.holidays(2026), cal.holidays(2027)
    # Tet 2026: Lunar New Year is Tue 17 Feb 2026; days off Mon 16 - Fri 20 Feb (the 9-day
    # break 14-22 Feb approved in October 2025 is these five plus two weekends).
    assert [d for d in h2026 if d.month == 2] == [date(2026, 2, d) for d in (16, 17, 18, 19, 20)]
    # Tet 2027: Lunar New Year Sat 6 Feb 2027.
    assert date(2027, 2, 6) in h2027 and "Lunar New Year" in h2027[date(2027, 2, 6)]
    assert [d for d in h2027 if d.month == 2] == [date(2027, 2, d) for d in range(4, 11)]
    # Hung Kings (10th day of the 3rd lunar month): Sun 26 Apr 2026, off Mon 27 Apr; Fri 16 Apr 2027.
    assert "Hung Kings" in h2026[date(2026, 4, 26)] and date(2026, 4, 27) in h2026
    assert "Hung Kings" in h2027[date(2027, 4, 16)]
    for day in (date(2026, 2, 17), date(2026, 4, 27), date(2027, 2, 8), date(2027, 4, 16)):
        assert not cal.is_working_day(day)
    # The New Year 2026 swap from the data file: Fri 2 Jan off, Sat 10 Jan worked.
    assert not cal.is_working_day(date(2026, 1, 2))
    assert cal.is_working_day(date(2026, 1, 10))


# -- Vietnam: deadlines ----------------------------------------------------------------------


def test_vn_access_received_on_a_friday() -> None:
    # Received Fri 6 Mar 2026, 10:00 local; counting starts Sat 7 Mar.
    d = vn(Right.access, datetime(2026, 3, 6, 10, tzinfo=VN))
    # 2 working days: Mon 9 (1), Tue 10 (2).
    assert d.ack_due_at == vn_eod(2026, 3, 10) == datetime(2026, 3, 10, 16, 59, 59, 999999, tzinfo=UTC)
    # 10 days: 6 + 10 = Mon 16 Mar, a working day.
    assert d.due_at == vn_eod(2026, 3, 16)
    # one extension of 10 days from 16 Mar: Thu 26 Mar.
    assert d.max_extension_until == vn_eod(2026, 3, 26)
    assert not d.inferred
    assert "Decree 356/2025/ND-CP Art 5(3)" in d.basis and "Civil Code 2015 Art 147-148" in d.basis

    p = vn(Right.access, datetime(2026, 3, 6, 10, tzinfo=VN), via_processor=True)
    # 15 days: 6 + 15 = Sat 21 Mar -> Mon 23 Mar.
    assert p.due_at == vn_eod(2026, 3, 23)
    # the extension runs on from Sat 21 (not from the Monday it was moved to): 21 + 10 = Tue 31 Mar.
    assert p.max_extension_until == vn_eod(2026, 3, 31)
    assert p.ack_due_at == vn_eod(2026, 3, 10)


def test_vn_deadline_on_a_sunday_moves_to_monday() -> None:
    # Access received Thu 5 Mar 2026: 5 + 10 = Sun 15 Mar -> Mon 16 Mar (Civil Code Art 148).
    d = vn(Right.access, datetime(2026, 3, 5, 10, tzinfo=VN))
    assert local_day(d.due_at, VN) == date(2026, 3, 16)
    # ack: Fri 6 (1), Mon 9 (2).
    assert local_day(d.ack_due_at, VN) == date(2026, 3, 9)


def test_vn_deadline_on_a_holiday_moves_past_it() -> None:
    # Withdrawal received Wed 15 Apr 2026: 15 + 15 = Thu 30 Apr (holiday), Fri 1 May (holiday),
    # Sat 2, Sun 3 -> Mon 4 May 2026.
    d = vn(Right.withdraw_consent, datetime(2026, 4, 15, 9, tzinfo=VN))
    assert d.due_at == vn_eod(2026, 5, 4)
    # ack: Thu 16 (1), Fri 17 (2).
    assert d.ack_due_at == vn_eod(2026, 4, 17)
    # extension: 30 Apr + 15 = Fri 15 May 2026.
    assert d.max_extension_until == vn_eod(2026, 5, 15)


def test_vn_received_2330_vs_0030_local() -> None:
    # 23:30 Thu 5 Mar local = 16:30 UTC Thu 5 Mar: received on Thu 5, counting from Fri 6.
    late = vn(Right.access, datetime(2026, 3, 5, 16, 30, tzinfo=UTC))
    # 00:30 Fri 6 Mar local = 17:30 UTC still Thu 5 Mar: received on Fri 6, counting from Sat 7.
    early = vn(Right.access, datetime(2026, 3, 5, 17, 30, tzinfo=UTC))
    assert datetime(2026, 3, 5, 16, 30, tzinfo=UTC).astimezone(VN).hour == 23
    # ack: Thu receipt -> Fri 6 (1), Mon 9 (2); Fri receipt -> Mon 9 (1), Tue 10 (2).
    assert late.ack_due_at == vn_eod(2026, 3, 9)
    assert early.ack_due_at == vn_eod(2026, 3, 10)
    # 10 days: 5 + 10 = Sun 15 -> Mon 16; 6 + 10 = Mon 16. Same day, different reasons.
    assert late.due_at == early.due_at == vn_eod(2026, 3, 16)
    # erasure (20 days) shows the day's difference: 5 + 20 = Wed 25 Mar; 6 + 20 = Thu 26 Mar.
    assert vn(Right.erasure, datetime(2026, 3, 5, 16, 30, tzinfo=UTC)).due_at == vn_eod(2026, 3, 25)
    assert vn(Right.erasure, datetime(2026, 3, 5, 17, 30, tzinfo=UTC)).due_at == vn_eod(2026, 3, 26)


def test_vn_erasure_20_days() -> None:
    # Received Tue 2 Jun 2026.
    d = vn(Right.erasure, datetime(2026, 6, 2, 14, tzinfo=VN))
    # ack: Wed 3 (1), Thu 4 (2).
    assert d.ack_due_at == vn_eod(2026, 6, 4)
    # 2 + 20 = Mon 22 Jun.
    assert d.due_at == vn_eod(2026, 6, 22)
    # extension 20: 22 Jun + 20 = 12 Jul (Sun) -> Mon 13 Jul.
    assert d.max_extension_until == vn_eod(2026, 7, 13)
    p = vn(Right.erasure, datetime(2026, 6, 2, 14, tzinfo=VN), via_processor=True)
    # via a processor, 30 days: 2 Jun + 30 = Thu 2 Jul; extension: 2 Jul + 20 = Wed 22 Jul.
    assert p.due_at == vn_eod(2026, 7, 2)
    assert p.max_extension_until == vn_eod(2026, 7, 22)
    assert "Art 5(4)" in p.basis


def test_vn_ack_jumps_over_tet_2027() -> None:
    # Received Wed 3 Feb 2027, the last working day before Tet (Thu 4 - Wed 10 Feb off, with
    # the weekend 6-7 Feb): working days are Thu 11 (1), Fri 12 (2).
    d = vn(Right.access, datetime(2027, 2, 3, 15, tzinfo=VN))
    assert d.ack_due_at == vn_eod(2027, 2, 12)
    # 10 days: 3 + 10 = Sat 13 -> Sun 14 -> Mon 15 Feb 2027.
    assert d.due_at == vn_eod(2027, 2, 15)
    # Received Fri 5 Feb 2027, New Year's Eve, the day before Lunar New Year (Sat 6 Feb): same ack.
    eve = vn(Right.access, datetime(2027, 2, 5, 9, tzinfo=VN))
    assert eve.ack_due_at == vn_eod(2027, 2, 12)
    # 5 + 10 = Mon 15 Feb, a working day.
    assert eve.due_at == vn_eod(2027, 2, 15)


def test_vn_tet_2026_ack_never_after_completion() -> None:
    # Received Fri 13 Feb 2026. Working days: Sat 14, Sun 15, Tet Mon 16 - Fri 20, Sat 21, Sun 22,
    # then Mon 23 (1), Tue 24 (2): the acknowledgement would be due Tue 24 Feb.
    # Access completes in 10 days: 13 + 10 = Mon 23 Feb, earlier; the ack falls due with it.
    d = vn(Right.access, datetime(2026, 2, 13, 11, tzinfo=VN))
    assert d.due_at == vn_eod(2026, 2, 23)
    assert d.ack_due_at == vn_eod(2026, 2, 23)
    # Erasure: 13 Feb + 20 = Thu 5 Mar 2026 (February has 28 days), so the ack stays on Tue 24 Feb.
    e = vn(Right.erasure, datetime(2026, 2, 13, 11, tzinfo=VN))
    assert e.ack_due_at == vn_eod(2026, 2, 24)
    assert e.due_at == vn_eod(2026, 3, 5)


def test_vn_new_year_2026_swap() -> None:
    # Received Wed 31 Dec 2025: Thu 1 Jan (holiday), Fri 2 Jan (swapped day off), weekend,
    # then Mon 5 (1), Tue 6 (2).
    assert vn(Right.objection, datetime(2025, 12, 31, 10, tzinfo=VN)).ack_due_at == vn_eod(2026, 1, 6)
    # Received Thu 8 Jan 2026: Fri 9 (1), Sat 10 Jan, worked in exchange for 2 Jan (2).
    assert vn(Right.objection, datetime(2026, 1, 8, 10, tzinfo=VN)).ack_due_at == vn_eod(2026, 1, 10)


def test_vn_protective_measures_have_no_processor_period() -> None:
    # Received Fri 6 Mar 2026: 6 + 15 = Sat 21 -> Mon 23 Mar, with or without a processor;
    # extension 15 from Sat 21 = Sun 5 Apr -> Mon 6 Apr.
    for via in (False, True):
        d = vn(Right.request_protective_measures, datetime(2026, 3, 6, 10, tzinfo=VN), via_processor=via)
        assert d.due_at == vn_eod(2026, 3, 23)
        assert d.max_extension_until == vn_eod(2026, 4, 6)
    assert "no longer period" in d.basis


def test_vn_inferred_rights_are_marked() -> None:
    at = datetime(2026, 3, 6, 10, tzinfo=VN)
    marketing = vn(Right.opt_out_marketing, at)
    assert marketing.inferred and "Art 28(5)" in marketing.basis and "inferred:" in marketing.basis
    # treated as an objection: the same dates.
    objection = vn(Right.objection, at)
    assert (marketing.ack_due_at, marketing.due_at, marketing.max_extension_until) == (
        objection.ack_due_at,
        objection.due_at,
        objection.max_extension_until,
    )
    for right in (Right.information, Right.complaint, Right.portability, Right.opt_out_sale_share):
        assert vn(right, at).inferred
    assert not objection.inferred


# -- GDPR --------------------------------------------------------------------------------------


def test_gdpr_one_month_clamps_to_month_end() -> None:
    # Received Sat 31 Jan 2026 10:00 Brussels: one month -> 31 Feb does not exist -> Sat 28 Feb
    # (Regulation 1182/71 Art 3(2)(c)), a Saturday, so the period ends at the end of the next
    # working day, Mon 2 Mar (Art 3(4)). Brussels is UTC+1 in March until the 29th.
    d = policy.deadlines(Right.access, "EU", datetime(2026, 1, 31, 10, tzinfo=BRUSSELS))
    assert d.due_at == datetime(2026, 3, 2, 22, 59, 59, 999999, tzinfo=UTC)
    # two further months run on from 28 Feb (before the move): Tue 28 Apr 2026, a working day
    # (UTC+2 after the 29 Mar DST change).
    assert d.max_extension_until == datetime(2026, 4, 28, 21, 59, 59, 999999, tzinfo=UTC)
    # no separate acknowledgement deadline in the GDPR
    assert d.ack_due_at == d.due_at
    assert "GDPR Art 12(3)" in d.basis and not d.inferred


def test_gdpr_months() -> None:
    def due(y: int, m: int, d: int) -> date:
        return local_day(policy.deadlines(Right.erasure, "EU", datetime(y, m, d, 12, tzinfo=BRUSSELS)).due_at, BRUSSELS)

    assert due(2028, 1, 31) == date(2028, 2, 29)  # leap year
    assert due(2026, 3, 15) == date(2026, 4, 15)  # same date next month
    # across the year: 31 Jan 2027 is a Sunday -> Mon 1 Feb (Art 3(4))
    assert due(2026, 12, 31) == date(2027, 2, 1)
    # via a processor: no longer period in the GDPR
    d = policy.deadlines(Right.erasure, "EU", datetime(2026, 3, 15, 12, tzinfo=BRUSSELS), via_processor=True)
    assert local_day(d.due_at, BRUSSELS) == date(2026, 4, 15)


# -- California --------------------------------------------------------------------------------


def test_ccpa_know_request() -> None:
    # Received Mon 2 Mar 2026 10:00 Los Angeles; Civil Code §10 excludes the day of receipt.
    d = policy.deadlines(Right.access, "US-CA", datetime(2026, 3, 2, 10, tzinfo=LA))
    # 10 business days: Tue 3 - Fri 6 Mar (4), 9-13 Mar (9), Mon 16 Mar (10); PDT (UTC-7) from 8 Mar.
    assert d.ack_due_at == datetime(2026, 3, 17, 6, 59, 59, 999999, tzinfo=UTC)
    # 45 calendar days: 2 Mar + 29 = 31 Mar, + 16 = Thu 16 Apr.
    assert local_day(d.due_at, LA) == date(2026, 4, 16)
    # +45 from 16 Apr: + 14 = 30 Apr, + 31 = Sun 31 May (90 days from receipt); a Sunday is a
    # holiday (Civil Code §7), so it is excluded too: Mon 1 Jun.
    assert local_day(d.max_extension_until, LA) == date(2026, 6, 1)
    assert d.counting_rule == "California Civil Code §10"


def test_ccpa_opt_out_in_15_business_days() -> None:
    # Received Mon 2 Mar 2026: Tue 3 - Fri 6 (4), 9-13 (9), 16-20 (14), Mon 23 Mar (15); no ack,
    # no extension.
    d = policy.deadlines(Right.opt_out_sale_share, "US-CA", datetime(2026, 3, 2, 10, tzinfo=LA))
    assert local_day(d.due_at, LA) == date(2026, 3, 23)
    assert d.ack_due_at == d.due_at and d.max_extension_until is None
    # Received Mon 23 Mar 2026: Tue 24 - Fri 27 (4), Mon 30 (5), Tue 31 is Cesar Chavez Day (CA
    # holiday), Wed 1 - Fri 3 Apr (8), 6-10 Apr (13), Mon 13 (14), Tue 14 Apr (15).
    d = policy.deadlines(Right.opt_out_sale_share, "US-CA", datetime(2026, 3, 23, 10, tzinfo=LA))
    assert local_day(d.due_at, LA) == date(2026, 4, 14)


# -- building blocks and data validation -------------------------------------------------------


def test_add_months() -> None:
    assert add_months(date(2026, 1, 31), 1) == date(2026, 2, 28)
    assert add_months(date(2026, 3, 31), 1) == date(2026, 4, 30)
    assert add_months(date(2026, 12, 31), 2) == date(2027, 2, 28)
    assert add_months(date(2026, 1, 15), 12) == date(2027, 1, 15)
    # Brazil Civil Code Art 132 §3: no such date -> the day after the month's last day
    assert add_months(date(2026, 1, 31), 1, overflow="next_day") == date(2026, 3, 1)
    assert add_months(date(2028, 1, 31), 1, overflow="next_day") == date(2028, 3, 1)
    assert add_months(date(2028, 1, 30), 1, overflow="next_day") == date(2028, 3, 1)
    assert add_months(date(2026, 1, 28), 1, overflow="next_day") == date(2026, 2, 28)
    assert add_months(date(2026, 3, 31), 1, overflow="next_day") == date(2026, 5, 1)


def _minimal(**override: object) -> dict[str, object]:
    data: dict[str, object] = {
        "code": "XX",
        "name": "Test",
        "law": "Test Act",
        "timezone": "UTC",
        "counting": {"rule": "Test Act s 2", "start": "next_day", "basis": "b"},
        "verification": {"clock": "runs", "basis": "Test Act s 3"},
        "groups": {"all": {"rights": ["access"], "complete": {"days": 10, "basis": "s 1"}}},
    }
    data.update(override)
    return data


def test_data_file_schema_is_strict() -> None:
    JurisdictionRules.model_validate(_minimal())
    with pytest.raises(ValidationError, match="exactly one"):
        JurisdictionRules.model_validate(
            _minimal(groups={"g": {"rights": ["access"], "complete": {"days": 1, "months": 1, "basis": "x"}}})
        )
    with pytest.raises(ValidationError, match="both groups"):
        JurisdictionRules.model_validate(
            _minimal(
                groups={
                    "a": {"rights": ["access"], "complete": {"days": 1, "basis": "x"}},
                    "b": {"rights": ["access"], "complete": {"days": 2, "basis": "x"}},
                }
            )
        )
    with pytest.raises(ValidationError, match="needs a note"):
        JurisdictionRules.model_validate(
            _minimal(groups={"g": {"rights": ["access"], "inferred": True, "complete": {"days": 1, "basis": "x"}}})
        )
    with pytest.raises(ValidationError, match="time zone"):
        JurisdictionRules.model_validate(_minimal(timezone="Mars/Olympus"))
    with pytest.raises(ValidationError):
        JurisdictionRules.model_validate(_minimal(deadline_days=30))  # unknown key
    counting = {"rule": "r", "start": "next_day", "basis": "b"}
    with pytest.raises(ValidationError, match="neither a weekday"):
        JurisdictionRules.model_validate(_minimal(counting={**counting, "end_moves_off": ["weekend"]}))
    with pytest.raises(ValidationError, match="rule"):
        JurisdictionRules.model_validate(_minimal(counting={"start": "next_day", "basis": "b"}))
    with pytest.raises(ValidationError, match="needs a note"):
        JurisdictionRules.model_validate(_minimal(counting={**counting, "inferred": True}))
    with pytest.raises(ValidationError, match="verification"):
        JurisdictionRules.model_validate({k: v for k, v in _minimal().items() if k != "verification"})
    with pytest.raises(ValidationError, match="clock"):
        JurisdictionRules.model_validate(_minimal(verification={"clock": "stopped", "basis": "x"}))
    with pytest.raises(ValidationError, match="needs a note"):
        JurisdictionRules.model_validate(_minimal(verification={"clock": "paused", "basis": "x", "inferred": True}))
    with pytest.raises(ValidationError, match="needs a note"):
        JurisdictionRules.model_validate(_minimal(denial_grounds={"g": {"basis": "x", "inferred": True}}))
    with pytest.raises(ValidationError, match="holidays library"):
        JurisdictionRules.model_validate(_minimal(counting={**counting, "holidays": {"holidays": "XX"}}))


def test_vn_culture_day_counts_as_a_working_day_until_it_is_a_labor_code_holiday() -> None:
    # Received Sun 22 Nov 2026. Counting starts Mon 23 (working day 1); Tue 24 Nov, Vietnam Culture
    # Day, is counted as working (day 2) because it is not yet a Labor Code public holiday.
    cal = policy.working_calendar("VN")
    # every year, and the library's "observed" days too (Sat 24 Nov 2029 -> Mon 26; Sun 24 Nov 2030 -> Mon 25)
    for day in (date(2026, 11, 24), date(2027, 11, 24), date(2028, 11, 24), date(2029, 11, 26), date(2030, 11, 25)):
        assert cal.is_working_day(day), day
        assert day not in cal.holidays(day.year)
    d = policy.deadlines(Right.access, "VN", datetime(2026, 11, 22, 10, 0, tzinfo=ZoneInfo("Asia/Ho_Chi_Minh")))
    assert d.ack_due_at.astimezone(ZoneInfo("Asia/Ho_Chi_Minh")).date() == date(2026, 11, 24)


# -- the organisation's internal target ----------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("80%", policy.TargetSpec("share", Fraction(4, 5))),
        (" 87.5 % ", policy.TargetSpec("share", Fraction(7, 8))),
        ("100%", policy.TargetSpec("share", Fraction(1))),
        ("5wd", policy.TargetSpec("working_days", 5)),
        ("5WD", policy.TargetSpec("working_days", 5)),
        ("3d", policy.TargetSpec("days", 3)),
        ("0d", policy.TargetSpec("days", 0)),
    ],
)
def test_parse_target_spec(spec: str, expected: policy.TargetSpec) -> None:
    assert policy.parse_target_spec(spec) == expected


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", "use a share of the period"),
        ("80", "use a share of the period"),
        ("5 days", "use a share of the period"),
        ("-3d", "use a share of the period"),
        ("3.5d", "use a share of the period"),
        ("5w", "use a share of the period"),
        ("wd", "use a share of the period"),
        ("80%%", "use a share of the period"),
        ("0%", "more than 0% and at most 100%"),
        ("101%", "more than 0% and at most 100%"),
        ("400d", "at most 366 days"),
    ],
)
def test_parse_target_spec_rejects(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as err:
        policy.parse_target_spec(spec)
    assert repr(spec) in str(err.value)


def test_internal_target_vn() -> None:
    # Access received Fri 6 Mar 2026 10:00 local (03:00 UTC), due Mon 16 Mar (end of day local).
    received = datetime(2026, 3, 6, 10, tzinfo=VN)
    due = vn(Right.access, received).due_at
    assert due == vn_eod(2026, 3, 16)

    def target(spec: str) -> datetime:
        return policy.internal_target("VN", received, due, spec)

    # 3 calendar days before Mon 16: Fri 13 Mar.
    assert target("3d") == vn_eod(2026, 3, 13)
    # 5 working days before Mon 16: Fri 13 (1), Thu 12 (2), Wed 11 (3), Tue 10 (4), Mon 9 (5).
    assert target("5wd") == vn_eod(2026, 3, 9)
    # 80%: the span is 10 d 13:59:59.999999, 80% of it 8 d 11:12 (rounded), so the point is
    # Sat 14 Mar 14:12 UTC = 21:12 local; the last local day that has ended by then is Fri 13.
    assert target("80%") == vn_eod(2026, 3, 13)
    # 50%: 5 d 07:00 after receipt = Wed 11 Mar 10:00 UTC = 17:00 local, before that day ends: Tue 10.
    assert target("50%") == vn_eod(2026, 3, 10)
    # never after the due date, never before the end of the day of receipt
    assert target("100%") == target("0d") == target("0wd") == due
    assert target("10d") == vn_eod(2026, 3, 6)  # 16 - 10 = the day of receipt itself
    assert target("12d") == vn_eod(2026, 3, 6)  # 4 Mar, before receipt: the end of Fri 6 Mar instead
    assert target("1%") == vn_eod(2026, 3, 6)  # 12:31 local on Fri 6: that day has not ended yet


def test_internal_target_working_days_skip_tet_2027() -> None:
    # Access received Wed 3 Feb 2027, due Mon 15 Feb 2027 (see test_vn_ack_jumps_over_tet_2027).
    received = datetime(2027, 2, 3, 15, tzinfo=VN)
    due = vn(Right.access, received).due_at
    assert due == vn_eod(2027, 2, 15)
    # 2 working days before Mon 15: Fri 12 (1), Thu 11 (2).
    assert policy.internal_target("VN", received, due, "2wd") == vn_eod(2027, 2, 11)
    # 3 working days: Tet Thu 4 - Wed 10 Feb is skipped, the 3rd is Wed 3 Feb, the day of receipt.
    assert policy.internal_target("VN", received, due, "3wd") == vn_eod(2027, 2, 3)
    # 5 working days would be Mon 1 Feb, before receipt: the end of the day of receipt instead.
    assert policy.internal_target("VN", received, due, "5wd") == vn_eod(2027, 2, 3)


def test_internal_target_is_the_end_of_a_local_day() -> None:
    # CCPA request to know received Mon 2 Mar 2026 10:00 PST, due Thu 16 Apr 2026 (PDT, UTC-7).
    received = datetime(2026, 3, 2, 10, tzinfo=LA)
    due = policy.deadlines(Right.access, "US-CA", received).due_at
    assert due == datetime(2026, 4, 17, 6, 59, 59, 999999, tzinfo=UTC)
    # 5 business days before Thu 16 Apr: Wed 15 (1), Tue 14 (2), Mon 13 (3), Fri 10 (4), Thu 9 (5).
    t = policy.internal_target("US-CA", received, due, "5wd")
    assert t == datetime(2026, 4, 10, 6, 59, 59, 999999, tzinfo=UTC) and t.tzinfo is UTC
    assert policy.internal_target("US-CA", received, due, "3d") == datetime(2026, 4, 14, 6, 59, 59, 999999, tzinfo=UTC)


def test_internal_target_rejects_bad_input() -> None:
    received = datetime(2026, 3, 6, 10, tzinfo=VN)
    due = vn_eod(2026, 3, 16)
    with pytest.raises(ValueError, match="use a share"):
        policy.internal_target("VN", received, due, "soon")
    with pytest.raises(ValueError, match="timezone-aware"):
        policy.internal_target("VN", datetime(2026, 3, 6, 10), due, "3d")
    with pytest.raises(ValueError, match="before received_at"):
        policy.internal_target("VN", received, received - timedelta(days=1), "3d")
    with pytest.raises(UnknownJurisdiction):
        policy.internal_target("XX", received, due, "3d")
