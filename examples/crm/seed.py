"""CRM seed data, derived from examples.people: every person whose systems include "crm".

Besides contacts, addresses and notes: the cookie and device identifiers of people.py, the
consents given at sign-up, and the suppression list of those who unsubscribed before.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import asyncpg

from ..people import DN, HCM, HN, Address, Person, people_in
from .processing import AD_AUDIENCE, ANALYTICS, NEWSLETTER, add_suppressions, suppression_entries

_NOTES = [
    "Khách gọi tổng đài hỏi về gói Internet cáp quang 150 Mbps.",
    "Đã gửi báo giá gói cloud server qua email.",
    "Khách phản ánh hóa đơn tháng trước bị tính trùng; đã chuyển bộ phận kế toán.",
    "Hẹn kỹ thuật viên đến lắp đặt vào sáng thứ Bảy.",
    "Khách muốn nhận bản tin khuyến mãi qua Zalo thay vì SMS.",
    "Đã xác minh danh tính qua CCCD tại quầy giao dịch.",
    "Khách hỏi chính sách bảo mật dữ liệu cá nhân và cách xóa tài khoản.",
]

_WORK = {
    HN: Address("Tầng 5, 18 Tam Trinh", "Phường Mai Động", "Quận Hoàng Mai", HN),
    HCM: Address("Tầng 12, 2 Hải Triều", "Phường Bến Nghé", "Quận 1", HCM),
    DN: Address("Tầng 3, 155 Trần Phú", "Phường Hải Châu 1", "Quận Hải Châu", DN),
}

_EPOCH = datetime(2021, 1, 4, 8, 30, tzinfo=UTC)


def contacts() -> list[Person]:
    return people_in("crm")


def created_at(p: Person) -> datetime:
    return _EPOCH + timedelta(days=37 * p.number, hours=p.number % 9)


def addresses(p: Person) -> list[tuple[str, Address]]:
    """Home address for everyone; every third person also has a work address."""
    out = [("home", p.address)]
    if p.number % 3 == 0:
        out.append(("work", _WORK[p.address.city]))
    return out


def notes(p: Person) -> list[tuple[str, datetime]]:
    """Zero to three notes per person, the same every time."""
    count = p.number % 4
    return [
        (_NOTES[(p.number + k) % len(_NOTES)], created_at(p) + timedelta(days=11 * (k + 1), minutes=7 * k))
        for k in range(count)
    ]


def marketing_opt_in(p: Person) -> bool:
    return p.number % 2 == 1


def tracking_ids(p: Person) -> list[tuple[str, str]]:
    """``(kind, value)`` of the person's cookie and device identifiers, where they have them."""
    return [(kind, value) for kind, value in (("cookie_id", p.cookie_id), ("device_id", p.device_id)) if value]


def consents(p: Person) -> list[tuple[str, bool]]:
    """``(purpose, granted)`` as asked at sign-up: the newsletter (the marketing opt-in), web
    analytics for those with a cookie, and custom audiences on advertising platforms."""
    out = [(NEWSLETTER, marketing_opt_in(p))]
    if p.cookie_id:
        out.append((ANALYTICS, p.number % 5 != 0))
    out.append((AD_AUDIENCE, p.number % 4 == 1))
    return out


def unsubscribed(p: Person) -> bool:
    """One contact in ten unsubscribed from marketing before and is on the suppression list."""
    return p.number % 10 == 0


async def seed(conn: asyncpg.Connection) -> int:
    """Insert every CRM contact with its addresses, notes, tracking identifiers and consents, and
    the suppression list; returns the number of contacts."""
    people = contacts()
    ids: dict[int, int] = {}
    for p in people:
        ids[p.number] = await conn.fetchval(
            """INSERT INTO contacts (full_name, email, phone, date_of_birth, marketing_opt_in, created_at)
               VALUES ($1, $2, $3, $4, $5, $6) RETURNING id""",
            p.full_name, p.email, p.phone, p.date_of_birth, marketing_opt_in(p), created_at(p),
        )
    await conn.executemany(
        "INSERT INTO addresses (contact_id, kind, line, ward, district, city) VALUES ($1, $2, $3, $4, $5, $6)",
        [(ids[p.number], kind, a.line, a.ward, a.district, a.city) for p in people for kind, a in addresses(p)],
    )
    await conn.executemany(
        "INSERT INTO notes (contact_id, body, created_at) VALUES ($1, $2, $3)",
        [(ids[p.number], body, at) for p in people for body, at in notes(p)],
    )
    await conn.executemany(
        "INSERT INTO tracking_ids (contact_id, kind, value, first_seen) VALUES ($1, $2, $3, $4)",
        [(ids[p.number], kind, value, created_at(p)) for p in people for kind, value in tracking_ids(p)],
    )
    await conn.executemany(
        "INSERT INTO consents (contact_id, purpose, granted, updated_at) VALUES ($1, $2, $3, $4)",
        [(ids[p.number], purpose, granted, created_at(p)) for p in people for purpose, granted in consents(p)],
    )
    await add_suppressions(conn, suppression_entries((p.email, p.phone) for p in people if unsubscribed(p)))
    return len(people)
