"""dsrflow.identity: one normal form per identifier type, and the all-agree matching rule."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

from dsrflow.identity import DEFAULT_REGION, SubjectMatch, match_subject, normalise, normalise_phone, region_of
from dsrflow.rights import IdentifierType

FIELDS = {"email": "email", "phone": "phone"}
LAN = {"id": 1, "email": "lan.nguyen@example.vn", "phone": "+84912345678"}
BINH = {"id": 2, "email": "binh.tran@example.vn", "phone": "+84987654321"}


def ids(match: SubjectMatch[Any]) -> tuple[list[int], list[int]]:
    return [r["id"] for r in match.found], [r["id"] for r in match.records]


# -- normal forms -----------------------------------------------------------
def test_email_is_trimmed_and_lower_cased() -> None:
    assert normalise("email", "  Lan.Nguyen@Example.VN ") == "lan.nguyen@example.vn"
    assert normalise(IdentifierType.email, "lan@ví-dụ.vn") == "lan@ví-dụ.vn"


@pytest.mark.parametrize("value", ["lan.nguyen", "@example.vn", "lan@", "lan@example", "lan@example.",
                                   "lan@.vn", "lan nguyen@example.vn", "   "])
def test_a_value_that_is_no_email_is_refused_without_echo(value: str) -> None:
    with pytest.raises(ValueError, match="email identifier is not an email address") as exc:
        normalise("email", value)
    if value.strip():
        assert value.strip() not in str(exc.value)


@pytest.mark.parametrize(
    "value",
    ["0912345678", "091 234 5678", "0912.345.678", "(091) 234-5678", "912345678", "84912345678",
     "+84912345678", "+84 91 234 56 78", "+84 (0) 912 345 678", "0084912345678", "00 84 912 345 678",
     " +84912345678 "],
)
def test_vietnamese_phones_in_every_way_they_are_written(value: str) -> None:
    assert normalise("phone", value) == "+84912345678"
    assert normalise_phone(value) == "+84912345678"


def test_a_phone_with_its_country_code_is_read_in_that_country_whatever_the_region() -> None:
    for region in ("VN", "US", "GB", None):
        assert normalise_phone("+1 (415) 555-0100", region) == "+14155550100"
        assert normalise_phone("+44 20 7946 0958", region) == "+442079460958"
        assert normalise_phone("0033 6 12 34 56 78", region) == "+33612345678"


def test_a_local_phone_is_read_in_the_region_given() -> None:
    assert normalise_phone("(415) 555-0100", "US") == "+14155550100"
    assert normalise_phone("020 7946 0958", "GB") == "+442079460958"
    assert normalise("phone", "0912345678", region="VN") == "+84912345678"


def test_a_local_phone_without_a_region_asks_for_its_country_code() -> None:
    with pytest.raises(ValueError, match=r"\+country code") as exc:
        normalise_phone("0912345678", None)
    assert "0912345678" not in str(exc.value) and "912" not in str(exc.value)


@pytest.mark.parametrize("value", ["12", "abc", "", "   ", "+1234567890123456", "not a phone 0912",
                                   "+84 1", "00"])
def test_an_invalid_phone_is_refused_without_echo(value: str) -> None:
    with pytest.raises(ValueError, match="phone identifier is not") as exc:
        normalise("phone", value)
    digits = "".join(ch for ch in value if ch.isdigit())
    if len(digits) > 2:
        assert digits not in str(exc.value)
    if value.strip():
        assert value.strip() not in str(exc.value)


def test_other_types_are_only_trimmed() -> None:
    assert normalise("customer_id", "  KH-0001 ") == "KH-0001"
    assert normalise(IdentifierType.user_id, "U-Abc") == "U-Abc"  # case is kept: ids are not emails
    assert normalise("national_id", " 001099012345\n") == "001099012345"
    assert normalise("cookie_id", "ga1.2.3") == "ga1.2.3"


def test_an_unknown_identifier_type_is_refused() -> None:
    with pytest.raises(ValueError):
        normalise("passport", "B1234567")


@pytest.mark.parametrize(
    ("jurisdiction", "region"),
    [("VN", "VN"), ("US-CA", "US"), ("us-ca", "US"), ("GB", "GB"), ("UK", "GB"), ("EU", None), ("XX", None),
     (None, DEFAULT_REGION), ("", DEFAULT_REGION)],
)
def test_region_of_a_jurisdiction(jurisdiction: str | None, region: str | None) -> None:
    assert region_of(jurisdiction) == region
    assert DEFAULT_REGION == "VN"


# -- matching ---------------------------------------------------------------
def test_one_identifier_finds_its_record() -> None:
    m = match_subject({"email": "lan.nguyen@example.vn"}, [LAN, BINH], FIELDS)
    assert ids(m) == ([1], [1])
    assert not m.conflict and not m.not_found and m.disagreeing == ()


def test_one_identifier_that_finds_nobody_is_not_found() -> None:
    m = match_subject({"phone": "+84900000000"}, [LAN, BINH], FIELDS)
    assert m.not_found and m.records == [] and not m.conflict


def test_two_identifiers_agreeing_on_one_record() -> None:
    m = match_subject({"email": "lan.nguyen@example.vn", "phone": "+84912345678"}, [LAN], FIELDS)
    assert ids(m) == ([1], [1]) and not m.conflict


def test_the_attack_verified_email_of_one_person_and_phone_of_another_is_a_conflict() -> None:
    # Lan's verified email with Binh's phone: acting on both would export or erase Binh's data
    m = match_subject({"email": "lan.nguyen@example.vn", "phone": "+84987654321"}, [LAN, BINH], FIELDS)
    assert m.conflict
    assert m.records == []
    assert ids(m)[0] == [1, 2]
    assert set(m.disagreeing) == {IdentifierType.email, IdentifierType.phone}
    reason = m.reason()
    assert "email" in reason and "phone" in reason and "2 record(s)" in reason
    for value in ("lan.nguyen", "binh", "912345678", "987654321"):
        assert value not in reason


@pytest.mark.parametrize("unknown", [None, "", "   "])
def test_a_record_whose_phone_is_unknown_still_agrees(unknown: str | None) -> None:
    record = {"id": 3, "email": "lan.nguyen@example.vn", "phone": unknown}
    m = match_subject({"email": "lan.nguyen@example.vn", "phone": "+84912345678"}, [record], FIELDS)
    assert ids(m) == ([3], [3]) and not m.conflict


def test_a_phone_that_finds_nobody_while_the_email_record_has_another_phone_is_a_conflict() -> None:
    m = match_subject({"email": "lan.nguyen@example.vn", "phone": "+84900000000"}, [LAN], FIELDS)
    assert m.conflict and m.records == [] and ids(m)[0] == [1]
    assert m.disagreeing == (IdentifierType.phone,)


def test_duplicates_of_the_same_person_are_all_acted_on() -> None:
    twin = {"id": 4, "email": "lan.nguyen@example.vn", "phone": None}
    m = match_subject({"email": "lan.nguyen@example.vn", "phone": "+84912345678"}, [LAN, twin], FIELDS)
    assert ids(m) == ([1, 4], [1, 4]) and not m.conflict


def test_records_that_share_no_identifier_are_not_one_person() -> None:
    # One contact has only this email, another only this phone: nothing links them to one person.
    email_only = {"id": 5, "email": "lan.nguyen@example.vn", "phone": None}
    phone_only = {"id": 6, "email": None, "phone": "+84912345678"}
    m = match_subject({"email": "lan.nguyen@example.vn", "phone": "+84912345678"}, [email_only, phone_only], FIELDS)
    assert m.conflict and m.records == [] and ids(m)[0] == [5, 6]
    # ... unless a third record holds both: then all three are the same person
    both = {"id": 7, "email": "lan.nguyen@example.vn", "phone": "+84912345678"}
    m = match_subject({"email": "lan.nguyen@example.vn", "phone": "+84912345678"},
                      [email_only, phone_only, both], FIELDS)
    assert ids(m) == ([5, 6, 7], [5, 6, 7]) and not m.conflict


def test_stored_values_in_other_formats_are_compared_in_normal_form() -> None:
    stored = {"id": 5, "email": " LAN.NGUYEN@EXAMPLE.VN", "phone": "0912 345 678"}
    m = match_subject({"email": "lan.nguyen@example.vn", "phone": "+84912345678"}, [stored], FIELDS)
    assert ids(m) == ([5], [5])
    # and the identifiers themselves may come in any format too
    m = match_subject({"email": "Lan.Nguyen@Example.VN", "phone": "091-234-5678"}, [stored], FIELDS)
    assert ids(m) == ([5], [5])
    stored_00 = {"id": 6, "email": None, "phone": "0084 912 345 678"}
    assert ids(match_subject({"phone": "+84912345678"}, [stored_00], FIELDS)) == ([6], [6])


def test_stored_local_phones_are_read_in_the_region_given() -> None:
    us = {"id": 7, "email": None, "phone": "(415) 555-0100"}
    assert ids(match_subject({"phone": "+14155550100"}, [us], FIELDS, region="US")) == ([7], [7])
    assert match_subject({"phone": "+14155550100"}, [us], FIELDS, region="VN").not_found


def test_an_unreadable_stored_value_disagrees() -> None:
    # "n/a" is not unknown (empty): it is a value that cannot be this phone, so nothing is done
    odd = {"id": 8, "email": "lan.nguyen@example.vn", "phone": "n/a"}
    m = match_subject({"email": "lan.nguyen@example.vn", "phone": "+84912345678"}, [odd], FIELDS)
    assert m.conflict and m.disagreeing == (IdentifierType.phone,)


def test_records_found_by_no_identifier_are_ignored() -> None:
    stranger = {"id": 9, "email": "khach.la@example.vn", "phone": "+84911111111"}
    m = match_subject({"email": "lan.nguyen@example.vn", "phone": "+84912345678"}, [stranger, LAN], FIELDS)
    assert ids(m) == ([1], [1]) and not m.conflict
    assert match_subject({"email": "lan.nguyen@example.vn"}, [stranger], FIELDS).not_found


def test_identifier_types_without_a_field_are_not_compared() -> None:
    m = match_subject({"email": "lan.nguyen@example.vn", "customer_id": "KH-404"}, [LAN], FIELDS)
    assert ids(m) == ([1], [1])
    # a field for a type the task does not carry is not compared either
    m = match_subject({"email": "lan.nguyen@example.vn"}, [LAN], {**FIELDS, "customer_id": "id"})
    assert ids(m) == ([1], [1])


def test_fields_that_name_none_of_the_identifiers_are_an_error_not_a_not_found() -> None:
    with pytest.raises(ValueError, match="none of the identifier types"):
        match_subject({"phone": "+84912345678"}, [LAN], {"email": "email"})


def test_records_may_be_objects_read_with_get() -> None:
    @dataclass
    class Contact:
        id: int
        mail: str | None
        mobile: str | None

    people = [Contact(1, "Lan.Nguyen@example.vn", "0912345678"), Contact(2, "binh.tran@example.vn", None)]
    m = match_subject({"email": "lan.nguyen@example.vn", "phone": "+84912345678"}, people,
                      {"email": "mail", "phone": "mobile"}, get=getattr)
    assert m.records == [people[0]] and m.found == [people[0]]
    clash = match_subject({"email": "binh.tran@example.vn", "phone": "+84912345678"}, people,
                          {IdentifierType.email: "mail", IdentifierType.phone: "mobile"}, get=getattr)
    assert clash.conflict and clash.records == [] and clash.found == people


def test_make_task_gives_identifiers_in_normal_form() -> None:
    from dsrflow.testing.worker import make_task

    task = make_task("crm", "export",
                     {"email": " Lan.Nguyen@Example.VN", "phone": "091 234 5678", "customer_id": " KH-1"})
    assert task.identifiers == {IdentifierType.email: "lan.nguyen@example.vn", IdentifierType.phone: "+84912345678",
                                IdentifierType.customer_id: "KH-1"}
    assert make_task("crm", "export", {"phone": "(415) 555-0100"}, region="US").identifiers == {
        IdentifierType.phone: "+14155550100"}
    with pytest.raises(ValueError, match="phone identifier"):
        make_task("crm", "export", {"phone": "12"})
    with pytest.raises(ValueError, match="at least one identifier"):
        make_task("crm", "export", {})
