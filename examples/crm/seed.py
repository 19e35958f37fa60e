"""CRM seed data, derived from examples.people: every person whose systems include "crm"."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import asyncpg

from ..people import DN, HCM, HN, Address, Person, people_in

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


async def seed(conn: asyncpg.Connection) -> int:
    """Insert every CRM contact with its addresses and notes; returns the number of contacts."""
    people = contacts()
    ids: dict[int, int] = {}
    for p in people:
        ids[p.number] = await conn.fetchval(
            """INSERT INTO contacts (full_name, email, phone, date_of_birth, marketing_opt_in, created_at)
               VALUES ($1, $2, $3, $4, $5, $6) RETURNING id""",
            p.full_name, p.email, p.phone, p.date_of_birth, p.number % 2 == 1, created_at(p),
        )
    await conn.executemany(
        "INSERT INTO addresses (contact_id, kind, line, ward, district, city) VALUES ($1, $2, $3, $4, $5, $6)",
        [(ids[p.number], kind, a.line, a.ward, a.district, a.city) for p in people for kind, a in addresses(p)],
    )
    await conn.executemany(
        "INSERT INTO notes (contact_id, body, created_at) VALUES ($1, $2, $3)",
        [(ids[p.number], body, at) for p in people for body, at in notes(p)],
    )
    return len(people)
