"""Deadlines as tables: one row per case, each with a due date worked out by hand and why.

Every expected date below was counted on a paper calendar, never by the code under test; ``why``
says which days were counted or skipped, and which provision says so. Counting rules (the
``rule`` of each data file's ``[counting]`` table):

- VN: Civil Code 2015 Art 147-148. The day of receipt is not counted; periods in days count every
  calendar day (holidays too); a period whose last day is a weekend day off or a public holiday
  ends on the next working day (Art 148(5)). "Working days" (Decree 356 Art 5 acknowledgement)
  skip weekends and holidays.
- EU: Regulation (EEC, Euratom) No 1182/71 Art 3. The day of receipt is not counted (3(1)); a
  month ends on the same date, or the month's last day (3(2)(c)); holidays and weekends count
  (3(3)); a period whose last day is a public holiday, Saturday or Sunday ends on the next
  working day (3(4)). Public holidays: Belgium's (the data file's Brussels default).
- US-CA: California Civil Code §10. The day of receipt is excluded, the last day included unless
  it is a holiday (Civil Code §7: every Sunday and the Government Code's holidays), then it is
  excluded too. A Saturday is not a holiday. Business days (11 CCR 7021(a), 7026(f)) skip
  weekends and state holidays.
- BR: Civil Code Art 132. The day of the request is excluded, the last day included; a period
  ending on a public holiday ends on the next business day (§1); a Saturday or Sunday is not a
  holiday.

Calendar used (weekday of the 1st): 2026: Jan Thu, Feb Sun, Mar Sun, Apr Wed, May Fri, Jun Mon,
Jul Wed, Aug Sat, Oct Thu, Nov Sun. 2027: Jan Fri, Feb Mon, Apr Thu, May Sat. 2028: Jan Sat,
Feb Tue. 2029: Jan Mon. 2032: Jan Thu. Months have 31/28(29)/31/30/31/30/31/31/30/31/30/31 days.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, time
from typing import Literal
from zoneinfo import ZoneInfo

import pytest

from dsrflow import policy
from dsrflow.rights import Right

TZ = {
    "VN": ZoneInfo("Asia/Ho_Chi_Minh"),
    "EU": ZoneInfo("Europe/Brussels"),
    "US-CA": ZoneInfo("America/Los_Angeles"),
    "BR": ZoneInfo("America/Sao_Paulo"),
}


@dataclass(frozen=True)
class Row:
    id: str
    code: str
    right: Right
    received_at: datetime
    due: date  # the local date, by hand
    why: str
    field: Literal["due_at", "ack_due_at", "max_extension_until"] = "due_at"
    via_processor: bool = False
    verified_at: datetime | None = None  # when identity was verified, where that is the point of the row


def local(code: str, y: int, m: int, d: int, hh: int = 10, mm: int = 0) -> datetime:
    return datetime(y, m, d, hh, mm, tzinfo=TZ[code])


def utc(y: int, m: int, d: int, hh: int, mm: int = 0) -> datetime:
    return datetime(y, m, d, hh, mm, tzinfo=UTC)


VN_ROWS = [
    Row("vn-tet-2027-access-ends-in-tet", "VN", Right.access, local("VN", 2027, 1, 29), date(2027, 2, 11),
        "received Fri 29 Jan 2027; counting starts Sat 30 Jan (Art 147); 10 calendar days end Mon 8 Feb, a Tet "
        "day (the holidays library's Tet 2027 is Thu 4 - Wed 10 Feb; the data file adds no government plan); "
        "Tue 9 and Wed 10 are Tet too, so the period ends on the next working day, Thu 11 Feb (Art 148(5))"),
    Row("vn-tet-2027-erasure-crosses-tet", "VN", Right.erasure, local("VN", 2027, 1, 25), date(2027, 2, 15),
        "received Mon 25 Jan 2027; 20 calendar days (Decree 356 Art 5(4)) count the whole Tet break: 25 Jan + 6 "
        "= 31 Jan, + 14 = Sun 14 Feb, a weekend day: Mon 15 Feb (Art 148(5))"),
    Row("vn-tet-2027-ack", "VN", Right.access, local("VN", 2027, 2, 3, 15), date(2027, 2, 12),
        "received Wed 3 Feb 2027, the last working day before Tet; 2 working days (Decree 356 Art 5(3)) skip "
        "Thu 4 - Wed 10 Feb (Tet, with the weekend 6-7): Thu 11 (1), Fri 12 (2)", field="ack_due_at"),
    Row("vn-ack-over-a-weekend", "VN", Right.erasure, local("VN", 2026, 3, 5), date(2026, 3, 9),
        "received Thu 5 Mar 2026; working days from Fri 6: Fri 6 (1), Sat 7 and Sun 8 skipped, Mon 9 (2)",
        field="ack_due_at"),
    Row("vn-ack-received-friday", "VN", Right.erasure, local("VN", 2026, 3, 6), date(2026, 3, 10),
        "received Fri 6 Mar 2026; Sat 7 and Sun 8 are not working days: Mon 9 (1), Tue 10 (2)", field="ack_due_at"),
    Row("vn-ends-saturday-moves", "VN", Right.access, local("VN", 2026, 3, 11), date(2026, 3, 23),
        "received Wed 11 Mar 2026; 11 + 10 = Sat 21 Mar, a weekend day off: the next working day, Mon 23 Mar "
        "(Art 148(5))"),
    Row("vn-ends-on-30-april-holidays", "VN", Right.withdraw_consent, local("VN", 2026, 4, 15), date(2026, 5, 4),
        "received Wed 15 Apr 2026; 15 + 15 = Thu 30 Apr (Reunification Day), then Fri 1 May (Labour Day), Sat 2, "
        "Sun 3: Mon 4 May (Art 148(5))"),
    Row("vn-ends-on-hung-kings-2027", "VN", Right.access, local("VN", 2027, 4, 6), date(2027, 4, 19),
        "received Tue 6 Apr 2027; 6 + 10 = Fri 16 Apr, Hung Kings' Day (10th day of the 3rd lunar month), then "
        "the weekend: Mon 19 Apr"),
    Row("vn-ends-on-worked-saturday", "VN", Right.access, local("VN", 2025, 12, 31), date(2026, 1, 10),
        "received Wed 31 Dec 2025; 31 Dec + 10 = Sat 10 Jan 2026, a Saturday worked in exchange for Fri 2 Jan "
        "(Government Office letter 12729/VPCP-KGVX): not a weekend day off, so the end does not move"),
    Row("vn-ends-on-culture-day", "VN", Right.access, local("VN", 2026, 11, 14), date(2026, 11, 24),
        "received Sat 14 Nov 2026; 14 + 10 = Tue 24 Nov, Vietnam Culture Day, which is not yet a Labor Code "
        "Art 112 holiday (data file not_holidays): the end does not move"),
    Row("vn-ends-on-working-day", "VN", Right.erasure, local("VN", 2026, 6, 2), date(2026, 6, 22),
        "received Tue 2 Jun 2026; 2 + 20 = Mon 22 Jun, a working day: no move"),
    Row("vn-via-processor", "VN", Right.access, local("VN", 2026, 3, 6), date(2026, 3, 23),
        "received Fri 6 Mar 2026, a processor must act: 15 days (Decree 356 Art 5(3)), 6 + 15 = Sat 21 Mar: "
        "Mon 23 Mar", via_processor=True),
    Row("vn-2330-local-is-that-day", "VN", Right.erasure, utc(2026, 3, 5, 16, 30), date(2026, 3, 25),
        "16:30 UTC Thu 5 Mar 2026 is 23:30 Thu 5 Mar in Vietnam (UTC+7): received on the 5th, 5 + 20 = Wed 25 Mar"),
    Row("vn-0030-local-is-next-day", "VN", Right.erasure, utc(2026, 3, 5, 17, 30), date(2026, 3, 26),
        "17:30 UTC Thu 5 Mar 2026, still the 5th in UTC, is 00:30 Fri 6 Mar in Vietnam: received on the 6th, "
        "6 + 20 = Thu 26 Mar"),
]

EU_ROWS = [
    Row("eu-31-jan-2026-ends-saturday", "EU", Right.access, local("EU", 2026, 1, 31, 12), date(2026, 3, 2),
        "received Sat 31 Jan 2026; one month: there is no 31 Feb, so the last day of February, Sat 28 Feb "
        "(Art 3(2)(c)); a Saturday: the period ends at the end of the next working day, Mon 2 Mar (Art 3(4))"),
    Row("eu-31-jan-2027-ends-sunday", "EU", Right.access, local("EU", 2027, 1, 31, 12), date(2027, 3, 1),
        "received Sun 31 Jan 2027; one month: Sun 28 Feb 2027 (Art 3(2)(c)), a Sunday: Mon 1 Mar (Art 3(4))"),
    Row("eu-31-jan-2028-leap-year", "EU", Right.access, local("EU", 2028, 1, 31, 12), date(2028, 2, 29),
        "received Mon 31 Jan 2028; one month: 2028 is a leap year, the last day of February is Tue 29 Feb, a "
        "working day: no move"),
    Row("eu-31-jan-2029-ends-wednesday", "EU", Right.access, local("EU", 2029, 1, 31, 12), date(2029, 2, 28),
        "received Wed 31 Jan 2029; one month: Wed 28 Feb 2029, a working day: no move"),
    Row("eu-31-jan-2032-leap-year-sunday", "EU", Right.access, local("EU", 2032, 1, 31, 12), date(2032, 3, 1),
        "received Sat 31 Jan 2032; one month: the leap-year last day of February, Sun 29 Feb 2032, a Sunday: "
        "Mon 1 Mar (Art 3(4))"),
    Row("eu-ends-saturday", "EU", Right.erasure, local("EU", 2026, 2, 14), date(2026, 3, 16),
        "received Sat 14 Feb 2026; one month: Sat 14 Mar, a Saturday: Mon 16 Mar (Art 3(4))"),
    Row("eu-ends-easter-monday", "EU", Right.erasure, local("EU", 2026, 3, 6), date(2026, 4, 7),
        "received Fri 6 Mar 2026; one month: Mon 6 Apr 2026, Easter Monday (Easter Sunday is 5 Apr), a Belgian "
        "public holiday: Tue 7 Apr (Art 3(4))"),
    Row("eu-ends-labour-day-friday", "EU", Right.access, local("EU", 2026, 4, 1), date(2026, 5, 4),
        "received Wed 1 Apr 2026; one month: Fri 1 May, Labour Day, then Sat 2 and Sun 3: Mon 4 May (Art 3(4))"),
    Row("eu-ends-national-day", "EU", Right.rectification, local("EU", 2026, 6, 21), date(2026, 7, 22),
        "received Sun 21 Jun 2026; one month: Tue 21 Jul, Belgian National Day: Wed 22 Jul (Art 3(4))"),
    Row("eu-2330-local", "EU", Right.access, utc(2026, 3, 14, 22, 30), date(2026, 4, 14),
        "22:30 UTC Sat 14 Mar 2026 is 23:30 Sat 14 Mar in Brussels (CET, UTC+1): received on the 14th; one "
        "month: Tue 14 Apr"),
    Row("eu-0030-local-utc-day-before", "EU", Right.access, utc(2026, 3, 14, 23, 30), date(2026, 4, 15),
        "23:30 UTC Sat 14 Mar 2026, still the 14th in UTC, is 00:30 Sun 15 Mar in Brussels: received on the 15th "
        "(the local day counts, not the UTC date); one month: Wed 15 Apr"),
    Row("eu-0030-summer-time-ends-saturday", "EU", Right.access, utc(2026, 6, 30, 22, 30), date(2026, 8, 3),
        "22:30 UTC Tue 30 Jun 2026 is 00:30 Wed 1 Jul in Brussels (CEST, UTC+2); one month: Sat 1 Aug, a "
        "Saturday: Mon 3 Aug (Art 3(4))"),
    Row("eu-2330-summer-time", "EU", Right.access, utc(2026, 6, 30, 21, 30), date(2026, 7, 30),
        "21:30 UTC Tue 30 Jun 2026 is 23:30 Tue 30 Jun in Brussels: received on the 30th; one month: Thu 30 Jul"),
    Row("eu-extension-from-the-unmoved-end", "EU", Right.access, local("EU", 2026, 1, 31, 12), date(2026, 4, 28),
        "received Sat 31 Jan 2026: the first month ends Sat 28 Feb (moved to Mon 2 Mar); the two further months "
        "(GDPR Art 12(3)) run on from 28 Feb: Tue 28 Apr, a working day", field="max_extension_until"),
]

CA_ROWS = [
    Row("ca-know-45-days", "US-CA", Right.access, local("US-CA", 2026, 3, 2), date(2026, 4, 16),
        "received Mon 2 Mar 2026; §10 excludes the day of receipt: 2 Mar + 29 = 31 Mar, + 16 = Thu 16 Apr "
        "(45 calendar days, 11 CCR 7021(b))"),
    Row("ca-know-ack-10-business-days", "US-CA", Right.access, local("US-CA", 2026, 3, 2), date(2026, 3, 16),
        "received Mon 2 Mar 2026; 10 business days after receipt (11 CCR 7021(a)), the day of receipt "
        "excluded: Tue 3 - Fri 6 (4), Mon 9 - Fri 13 (9), Mon 16 Mar (10)", field="ack_due_at"),
    Row("ca-ends-saturday-not-moved", "US-CA", Right.erasure, local("US-CA", 2026, 3, 4), date(2026, 4, 18),
        "received Wed 4 Mar 2026; 4 Mar + 27 = 31 Mar, + 18 = Sat 18 Apr; a Saturday is not a holiday (Civil "
        "Code §7: Sundays and the Government Code's holidays), so the end is not moved"),
    Row("ca-ends-sunday-moves", "US-CA", Right.erasure, local("US-CA", 2026, 3, 5), date(2026, 4, 20),
        "received Thu 5 Mar 2026; + 45 = Sun 19 Apr; every Sunday is a holiday (Civil Code §7), excluded: "
        "Mon 20 Apr"),
    Row("ca-ends-memorial-day", "US-CA", Right.rectification, local("US-CA", 2026, 4, 10), date(2026, 5, 26),
        "received Fri 10 Apr 2026; 10 Apr + 20 = 30 Apr, + 25 = Mon 25 May, Memorial Day (Gov Code §6700, last "
        "Monday in May), excluded: Tue 26 May"),
    Row("ca-ends-july-4-saturday", "US-CA", Right.erasure, local("US-CA", 2026, 5, 20), date(2026, 7, 6),
        "received Wed 20 May 2026; 20 May + 11 = 31 May, + 30 = 30 Jun, + 4 = Sat 4 Jul, Independence Day, a "
        "holiday: excluded; Sun 5 Jul is one too: Mon 6 Jul"),
    Row("ca-ends-friday-3-july-not-a-state-holiday", "US-CA", Right.erasure, local("US-CA", 2026, 5, 19),
        date(2026, 7, 3),
        "received Tue 19 May 2026; + 45 = Fri 3 Jul, the federal substitute for Saturday's 4 July; the "
        "Government Code moves no Saturday holiday to the Friday but 11 November (§6701): no move"),
    Row("ca-ends-thanksgiving", "US-CA", Right.access, local("US-CA", 2026, 10, 12), date(2026, 11, 27),
        "received Mon 12 Oct 2026; 12 Oct + 19 = 31 Oct, + 26 = Thu 26 Nov, Thanksgiving (appointed by the "
        "President, Gov Code §6700), excluded; Fri 27 Nov, the day after, is a state employees' day off but not "
        "a §6700 holiday: Fri 27 Nov"),
    Row("ca-extension-90-days", "US-CA", Right.access, local("US-CA", 2026, 3, 2), date(2026, 6, 1),
        "received Mon 2 Mar 2026; the extension runs 45 more days from Thu 16 Apr: + 14 = 30 Apr, + 31 = Sun 31 "
        "May (90 days from receipt, 11 CCR 7021(b)), a Sunday: Mon 1 Jun", field="max_extension_until"),
    Row("ca-opt-out-15-business-days", "US-CA", Right.opt_out_sale_share, local("US-CA", 2026, 3, 2),
        date(2026, 3, 23),
        "received Mon 2 Mar 2026; 15 business days from receipt (11 CCR 7026(f)), the day of receipt excluded: "
        "Tue 3 - Fri 6 (4), 9-13 (9), 16-20 (14), Mon 23 Mar (15)"),
    Row("ca-opt-out-over-cesar-chavez-day", "US-CA", Right.opt_out_sale_share, local("US-CA", 2026, 3, 23),
        date(2026, 4, 14),
        "received Mon 23 Mar 2026; Tue 24 - Fri 27 (4), Mon 30 (5), Tue 31 Mar is Cesar Chavez Day (a state "
        "holiday, not a business day), Wed 1 - Fri 3 Apr (8), 6-10 Apr (13), Mon 13 (14), Tue 14 Apr (15)"),
    Row("ca-verified-20-days-after-receipt", "US-CA", Right.access, local("US-CA", 2026, 3, 2), date(2026, 4, 16),
        "received Mon 2 Mar 2026, identity verified Sun 22 Mar, 20 days later: the 45 days begin on the day the "
        "request is received regardless of the time needed to verify it (11 CCR 7021(b)), so the request is "
        "still due Thu 16 Apr, not 22 Mar + 45 = Wed 6 May", verified_at=local("US-CA", 2026, 3, 22, 16)),
    Row("ca-2330-local", "US-CA", Right.access, utc(2026, 3, 3, 7, 30), date(2026, 4, 16),
        "07:30 UTC Tue 3 Mar 2026 is 23:30 Mon 2 Mar in Los Angeles (PST, UTC-8): received on the 2nd; + 45 = "
        "Thu 16 Apr"),
    Row("ca-0030-local", "US-CA", Right.access, utc(2026, 3, 3, 8, 30), date(2026, 4, 17),
        "08:30 UTC Tue 3 Mar 2026 is 00:30 Tue 3 Mar in Los Angeles: received on the 3rd; + 45 = Fri 17 Apr"),
]

BR_ROWS = [
    Row("br-access-15-days", "BR", Right.access, local("BR", 2026, 3, 2), date(2026, 3, 17),
        "received Mon 2 Mar 2026; the day of the request is excluded (Civil Code Art 132): 2 + 15 = Tue 17 Mar "
        "(LGPD Art 19 II)"),
    Row("br-ends-saturday-not-moved", "BR", Right.access, local("BR", 2026, 3, 6), date(2026, 3, 21),
        "received Fri 6 Mar 2026; 6 + 15 = Sat 21 Mar; Art 132 §1 moves only a period that ends on a holiday, "
        "and a Saturday is not one: no move"),
    Row("br-ends-sunday-not-moved", "BR", Right.access, local("BR", 2026, 3, 7), date(2026, 3, 22),
        "received Sat 7 Mar 2026; 7 + 15 = Sun 22 Mar, not a holiday: no move (Art 132 §1)"),
    Row("br-ends-tiradentes", "BR", Right.access, local("BR", 2026, 4, 6), date(2026, 4, 22),
        "received Mon 6 Apr 2026; 6 + 15 = Tue 21 Apr, Tiradentes (a national holiday): the next business day, "
        "Wed 22 Apr (Art 132 §1)"),
    Row("br-ends-good-friday", "BR", Right.access, local("BR", 2026, 3, 19), date(2026, 4, 6),
        "received Thu 19 Mar 2026; 19 Mar + 12 = 31 Mar, + 3 = Fri 3 Apr, Good Friday (a national holiday): "
        "the next business day is Mon 6 Apr (Sat 4 and Sun 5 are not business days)"),
    Row("br-ends-holiday-saturday", "BR", Right.access, local("BR", 2027, 4, 16), date(2027, 5, 3),
        "received Fri 16 Apr 2027; 16 Apr + 14 = 30 Apr, + 1 = Sat 1 May 2027, Labour Day, a holiday: the next "
        "business day, Mon 3 May"),
    Row("br-ends-black-consciousness-day", "BR", Right.access, local("BR", 2026, 11, 5), date(2026, 11, 23),
        "received Thu 5 Nov 2026; 5 + 15 = Fri 20 Nov, National Day of Zumbi and Black Consciousness (a national "
        "holiday since Law 14.759/2023): Mon 23 Nov"),
    Row("br-ends-carnival-not-a-holiday", "BR", Right.access, local("BR", 2026, 2, 2), date(2026, 2, 17),
        "received Mon 2 Feb 2026; 2 + 15 = Tue 17 Feb, Carnival Tuesday, a ponto facultativo and not a national "
        "holiday: no move"),
    Row("br-rectification-by-analogy", "BR", Right.rectification, local("BR", 2026, 3, 2), date(2026, 3, 17),
        "received Mon 2 Mar 2026; no period in the LGPD (Art 18 §5: left to regulation), Art 19 II's 15 days by "
        "analogy: Tue 17 Mar"),
    Row("br-2330-local", "BR", Right.access, utc(2026, 3, 3, 2, 30), date(2026, 3, 17),
        "02:30 UTC Tue 3 Mar 2026 is 23:30 Mon 2 Mar in São Paulo (UTC-3): requested on the 2nd; 2 + 15 = Tue 17 Mar"),
    Row("br-0030-local", "BR", Right.access, utc(2026, 3, 3, 3, 30), date(2026, 3, 18),
        "03:30 UTC Tue 3 Mar 2026 is 00:30 Tue 3 Mar in São Paulo: requested on the 3rd; 3 + 15 = Wed 18 Mar"),
]

ROWS = VN_ROWS + EU_ROWS + CA_ROWS + BR_ROWS


@pytest.mark.parametrize("row", [pytest.param(r, id=r.id) for r in ROWS])
def test_deadline_table(row: Row) -> None:
    assert row.why and row.received_at.tzinfo is not None
    d = policy.deadlines(row.right, row.code, row.received_at, via_processor=row.via_processor)
    at = getattr(d, row.field)
    assert at is not None
    tz = TZ[row.code]
    assert at.astimezone(tz).date() == row.due, row.why
    # the end of that local day, in UTC
    assert at == datetime.combine(row.due, time.max, tzinfo=tz).astimezone(UTC) and at.tzinfo is UTC
    assert d.counting_rule == policy.rules(row.code).counting.rule
    if row.verified_at is not None:
        # counted at intake, from receipt: the clock ran while identity was being verified
        assert row.received_at < row.verified_at < at
        assert d.verification_clock == policy.verification_clock(row.code).clock == "runs"


def test_every_jurisdiction_has_rows() -> None:
    assert {r.code for r in ROWS} == set(policy.jurisdictions())
    assert len({r.id for r in ROWS}) == len(ROWS)


# -- what is an interpretation says so, and why ------------------------------------------------


def _inferred_entries() -> list[tuple[str, bool, str | None]]:
    entries: list[tuple[str, bool, str | None]] = []
    for code in policy.jurisdictions():
        rules = policy.rules(code)
        entries += [(f"{code} groups.{name}", g.inferred, g.note) for name, g in rules.groups.items()]
        entries += [(f"{code} denial_grounds.{name}", g.inferred, g.note) for name, g in rules.denial_grounds.items()]
        entries.append((f"{code} counting", rules.counting.inferred, rules.counting.note))
        entries.append((f"{code} verification", rules.verification.inferred, rules.verification.note))
    return entries


def test_every_inferred_entry_has_a_note() -> None:
    entries = _inferred_entries()
    assert any(inferred for _, inferred, _ in entries)
    for where, inferred, note in entries:
        if inferred:
            assert note and len(note.strip()) >= 20, f"{where} is inferred without a note saying why"


@pytest.mark.parametrize("code", ["VN", "EU", "US-CA", "BR"])
@pytest.mark.parametrize("right", [Right.information, Right.complaint])
def test_rights_without_a_legal_period_are_marked_inferred(code: str, right: Right) -> None:
    # None of these laws sets a period for answering a request for information or a complaint made
    # to the controller: every data file marks the group inferred, says so, and names its analogy.
    group = next(g for g in policy.rules(code).groups.values() if right in g.rights)
    assert group.inferred
    assert group.note and "no period" in group.note.lower(), group.note
    assert "analogy" in group.complete.basis.lower() or "analogy" in group.note.lower()
    d = policy.deadlines(right, code, datetime(2026, 3, 2, 10, tzinfo=UTC))
    assert d.inferred and f"inferred: {group.note}" in d.basis


def test_br_access_period_is_the_text_others_by_analogy() -> None:
    rules = policy.rules("BR")
    access = next(g for g in rules.groups.values() if Right.access in g.rights)
    assert not access.inferred and access.complete.days == 15 and "Art 19 II" in access.complete.basis
    for right in Right:
        group = next(g for g in rules.groups.values() if right in g.rights)
        assert group.complete.days == 15 and group.extension is None and group.via_processor is None
        assert group.inferred == (right is not Right.access)
