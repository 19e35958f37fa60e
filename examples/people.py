"""The made-up customers both reference systems are seeded from.

Thirty people in Hà Nội, TP. Hồ Chí Minh and Đà Nẵng. Identifiers are stored the
way dsrflow delivers them in tasks: email lower-cased, phone in E.164 (``+84`` and nine
digits; see ``dsrflow.identity``). Fixed data, no randomness: a demo or a test can name
its subject.

Emails use reserved example domains, so nothing here can reach a real mailbox.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import date

#: Namespace of the made-up cookie and device identifiers (uuid5: the same on every run).
_TRACKING_NS = uuid.UUID("6f0c2f3e-5b1a-4d8e-9a57-2c1d0e6b7a90")


@dataclass(frozen=True, slots=True)
class Address:
    line: str
    ward: str
    district: str
    city: str

    def one_line(self) -> str:
        return f"{self.line}, {self.ward}, {self.district}, {self.city}"


@dataclass(frozen=True, slots=True)
class Person:
    number: int
    full_name: str
    email: str
    phone: str
    date_of_birth: date
    address: Address
    systems: frozenset[str]

    @property
    def customer_id(self) -> str:
        """The billing system's customer code (mã khách hàng)."""
        return f"KH{self.number:05d}"

    @property
    def cookie_id(self) -> str | None:
        """The first-party analytics cookie the CRM linked to this person when they signed in on
        the website: three people in four have one."""
        return str(uuid.uuid5(_TRACKING_NS, f"cookie:{self.number}")) if self.number % 4 else None

    @property
    def device_id(self) -> str | None:
        """The mobile app's device identifier, for one person in three."""
        return str(uuid.uuid5(_TRACKING_NS, f"device:{self.number}")) if self.number % 3 == 1 else None

    def identifiers(self) -> dict[str, str]:
        """Email and phone, as a request would name this person."""
        return {"email": self.email, "phone": self.phone}


HN, HCM, DN = "Hà Nội", "TP. Hồ Chí Minh", "Đà Nẵng"
CRM, BILLING = frozenset({"crm"}), frozenset({"billing"})
BOTH = CRM | BILLING

_ROWS: list[tuple[str, str, str, date, Address, frozenset[str]]] = [
    ("Nguyễn Thị Lan", "lan.nguyen@example.vn", "+84901234567", date(1990, 3, 14),
     Address("12 Phố Hàng Bạc", "Phường Hàng Bạc", "Quận Hoàn Kiếm", HN), BOTH),
    ("Trần Văn Hùng", "hung.tran@example.vn", "+84912345678", date(1985, 7, 22),
     Address("45 Nguyễn Thị Minh Khai", "Phường Bến Nghé", "Quận 1", HCM), BOTH),
    ("Lê Minh Châu", "chau.le@example.com", "+84903456789", date(1993, 11, 2),
     Address("88 Bạch Đằng", "Phường Hải Châu 1", "Quận Hải Châu", DN), CRM),
    ("Phạm Quốc Bảo", "bao.pham@example.vn", "+84914567890", date(1979, 1, 30),
     Address("23 Lý Thường Kiệt", "Phường Trần Hưng Đạo", "Quận Hoàn Kiếm", HN), BILLING),
    ("Hoàng Thị Mai", "mai.hoang@example.vn", "+84905678901", date(1997, 5, 9),
     Address("156 Cầu Giấy", "Phường Quan Hoa", "Quận Cầu Giấy", HN), BOTH),
    ("Vũ Đức Thắng", "thang.vu@example.com", "+84916789012", date(1988, 9, 18),
     Address("72 Lê Lợi", "Phường Bến Thành", "Quận 1", HCM), BOTH),
    ("Đặng Thu Hà", "ha.dang@example.vn", "+84907890123", date(1995, 12, 25),
     Address("19 Trần Phú", "Phường Thạch Thang", "Quận Hải Châu", DN), CRM),
    ("Bùi Thanh Tùng", "tung.bui@example.vn", "+84918901234", date(1982, 4, 11),
     Address("310 Điện Biên Phủ", "Phường 17", "Quận Bình Thạnh", HCM), BILLING),
    ("Đỗ Ngọc Anh", "anh.do@example.com", "+84909012345", date(2000, 8, 3),
     Address("5 Ngõ 68 Chùa Láng", "Phường Láng Thượng", "Quận Đống Đa", HN), BOTH),
    ("Hồ Văn Nam", "nam.ho@example.vn", "+84910123456", date(1975, 6, 27),
     Address("101 Nguyễn Văn Linh", "Phường Nam Dương", "Quận Hải Châu", DN), BOTH),
    ("Ngô Thị Hương", "huong.ngo@example.vn", "+84902345670", date(1991, 2, 19),
     Address("27 Võ Văn Tần", "Phường 6", "Quận 3", HCM), CRM),
    ("Dương Minh Khôi", "khoi.duong@example.com", "+84913456701", date(1987, 10, 7),
     Address("64 Kim Mã", "Phường Kim Mã", "Quận Ba Đình", HN), BOTH),
    ("Lý Thị Thu Trang", "trang.ly@example.vn", "+84904567012", date(1994, 7, 15),
     Address("210 Nguyễn Trãi", "Phường Thượng Đình", "Quận Thanh Xuân", HN), BILLING),
    ("Trịnh Văn Đức", "duc.trinh@example.vn", "+84915670123", date(1980, 12, 1),
     Address("9 Phan Châu Trinh", "Phường Phước Ninh", "Quận Hải Châu", DN), CRM),
    ("Phan Thị Ngọc Diệp", "diep.phan@example.com", "+84906701234", date(1998, 3, 28),
     Address("142 Cách Mạng Tháng Tám", "Phường 10", "Quận 3", HCM), BOTH),
    ("Võ Hoàng Long", "long.vo@example.vn", "+84917012345", date(1983, 5, 5),
     Address("58 Tôn Đức Thắng", "Phường Hòa Minh", "Quận Liên Chiểu", DN), BOTH),
    ("Đinh Thị Yến", "yen.dinh@example.vn", "+84908123450", date(1992, 9, 9),
     Address("33 Hai Bà Trưng", "Phường Tràng Tiền", "Quận Hoàn Kiếm", HN), CRM),
    ("Lâm Quang Vinh", "vinh.lam@example.com", "+84919234501", date(1977, 11, 23),
     Address("77 Trần Hưng Đạo", "Phường Cầu Ông Lãnh", "Quận 1", HCM), BILLING),
    ("Mai Anh Tuấn", "tuan.mai@example.vn", "+84900345612", date(1989, 1, 17),
     Address("12 Nguyễn Chí Thanh", "Phường Láng Hạ", "Quận Đống Đa", HN), BOTH),
    ("Tô Thị Bích Ngọc", "ngoc.to@example.vn", "+84911456723", date(1996, 6, 30),
     Address("250 Nguyễn Văn Thoại", "Phường Mỹ An", "Quận Ngũ Hành Sơn", DN), CRM),
    ("Cao Văn Sơn", "son.cao@example.com", "+84902567834", date(1973, 8, 14),
     Address("18 Phạm Văn Đồng", "Phường Hiệp Bình Chánh", "TP. Thủ Đức", HCM), BOTH),
    ("Huỳnh Thị Kim Oanh", "oanh.huynh@example.vn", "+84913678945", date(1990, 10, 21),
     Address("66 Lê Văn Sỹ", "Phường 11", "Quận Phú Nhuận", HCM), BOTH),
    ("Tạ Minh Hiếu", "hieu.ta@example.vn", "+84904789056", date(2001, 4, 2),
     Address("3 Ngõ 15 Duy Tân", "Phường Dịch Vọng Hậu", "Quận Cầu Giấy", HN), CRM),
    ("Chu Thị Thảo", "thao.chu@example.com", "+84915890167", date(1986, 2, 8),
     Address("91 Ông Ích Khiêm", "Phường Tam Thuận", "Quận Thanh Khê", DN), BILLING),
    ("Kiều Văn Phúc", "phuc.kieu@example.vn", "+84906901278", date(1984, 7, 29),
     Address("120 Xã Đàn", "Phường Phương Liên", "Quận Đống Đa", HN), BOTH),
    ("Lương Thị Hồng Nhung", "nhung.luong@example.vn", "+84917012389", date(1999, 12, 12),
     Address("45 Sư Vạn Hạnh", "Phường 12", "Quận 10", HCM), CRM),
    ("Quách Đình Trọng", "trong.quach@example.com", "+84908123490", date(1978, 3, 3),
     Address("8 Hoàng Diệu", "Phường Phước Ninh", "Quận Hải Châu", DN), BOTH),
    ("Nguyễn Văn An", "an.nguyen@example.vn", "+84919234512", date(1992, 5, 20),
     Address("199 Hoàng Quốc Việt", "Phường Nghĩa Đô", "Quận Cầu Giấy", HN), BOTH),
    ("Trần Thị Thanh Tâm", "tam.tran@example.vn", "+84900345623", date(1994, 11, 11),
     Address("512 Nguyễn Thị Thập", "Phường Tân Phong", "Quận 7", HCM), BILLING),
    ("Phùng Gia Huy", "huy.phung@example.com", "+84911456734", date(2003, 1, 25),
     Address("27 Núi Thành", "Phường Hòa Cường Bắc", "Quận Hải Châu", DN), CRM),
]

PEOPLE: tuple[Person, ...] = tuple(
    Person(i, name, email, phone, dob, addr, systems)
    for i, (name, email, phone, dob, addr, systems) in enumerate(_ROWS, start=1)
)


def person(email: str) -> Person:
    """The person with this email."""
    for p in PEOPLE:
        if p.email == email:
            return p
    raise KeyError(email)


def people_in(system: str) -> list[Person]:
    return [p for p in PEOPLE if system in p.systems]


#: Subjects for demos and tests.
IN_BOTH = person("lan.nguyen@example.vn")  # CRM contact, billing customer with invoices
CRM_ONLY = person("chau.le@example.com")
BILLING_ONLY = person("bao.pham@example.vn")  # with invoices: erasure keeps them (retained)
BILLING_WITHOUT_INVOICES = person("thao.chu@example.com")  # erasure deletes the customer outright
NOWHERE = Person(
    0, "Không Có Ai", "khong.co.ai@example.vn", "+84999999999", date(2000, 1, 1),
    Address("1 Đường Không Tên", "Phường 1", "Quận 1", HCM), frozenset(),
)  # in neither system

SUBJECTS: dict[str, Person] = {
    "both": IN_BOTH,
    "crm_only": CRM_ONLY,
    "billing_only": BILLING_ONLY,
    "billing_without_invoices": BILLING_WITHOUT_INVOICES,
    "nowhere": NOWHERE,
}
