"""CloudEvents binary-mode codec: round trip, the headers any client must send, errors without values."""

from __future__ import annotations

import orjson
import pytest

from dsrflow import codec
from dsrflow.events import DeadLetter, RightsRequested, TaskReceipt


def _request(**kw: object) -> RightsRequested:
    base: dict[str, object] = {
        "request_id": "req-1",
        "right": "access",
        "subject": {"identifiers": {"email": "Lan.Nguyen@Example.VN", "phone": "+84 90 123 4567"}},
    }
    base.update(kw)
    return RightsRequested.model_validate(base)


def test_round_trip_keeps_data_and_context() -> None:
    req = _request()
    value, headers = codec.encode(req, source="tests", subject="req-1")
    names = [k for k, _ in headers]
    for required in ("ce_specversion", "ce_id", "ce_source", "ce_type", "ce_time", "content-type", "traceparent"):
        assert required in names
    env = codec.decode(value, headers, RightsRequested)
    assert env.data == req
    assert env.source == "tests"
    assert env.subject == "req-1"
    assert env.type == "dsrflow.rights.requested.v1"


def test_identifiers_are_normalised() -> None:
    req = _request()
    assert req.subject.identifiers["email"] == "lan.nguyen@example.vn"
    assert req.subject.identifiers["phone"] == "+84901234567"


def test_foreign_client_with_plain_headers_is_accepted() -> None:
    # What kcat -H ce_specversion=1.0 -H ce_id=... would send: no ce_time, no traceparent.
    value = b'{"request_id":"kcat-1","right":"erasure","subject":{"identifiers":{"email":"a@b.vn"}}}'
    headers = [("ce_specversion", b"1.0"), ("ce_id", b"x-1"), ("ce_source", b"kcat"),
               ("ce_type", b"dsrflow.rights.requested.v1"), ("content-type", b"application/json")]
    env = codec.decode(value, headers, RightsRequested)
    assert env.data.request_id == "kcat-1"
    assert env.data.jurisdiction == "VN"


@pytest.mark.parametrize(
    ("value", "headers", "kind"),
    [
        (b"{}", [("ce_id", b"1")], "missing_header"),
        (b"not json", None, "bad_json"),
        (b"[1,2]", None, "bad_json"),
        (b'{"request_id":"r","right":"teleport","subject":{"identifiers":{"email":"secret@x.vn"}}}', None, "invalid"),
        (None, None, "empty_value"),
    ],
)
def test_bad_records_raise_decode_error(value: bytes | None, headers: list[tuple[str, bytes]] | None,
                                        kind: str) -> None:
    if headers is None:
        _, headers = codec.encode(_request(), source="t")
    with pytest.raises(codec.DecodeError) as exc:
        codec.decode(value, headers, RightsRequested)
    assert exc.value.kind == kind


def test_validation_error_does_not_echo_personal_data() -> None:
    _, headers = codec.encode(_request(), source="t")
    value = orjson.dumps({"request_id": "r", "right": "teleport",
                          "subject": {"identifiers": {"email": "bi.mat@rieng.vn"}}})
    with pytest.raises(codec.DecodeError) as exc:
        codec.decode(value, headers, RightsRequested)
    assert "bi.mat" not in str(exc.value)
    assert "right" in str(exc.value)


def test_wrong_event_type_for_topic_is_rejected() -> None:
    value, headers = codec.encode(_request(), source="t")
    with pytest.raises(codec.DecodeError) as exc:
        codec.decode(value, headers, TaskReceipt)
    assert exc.value.kind == "bad_type"


def test_rectification_needs_changes_and_only_it() -> None:
    with pytest.raises(ValueError, match="needs 'changes'"):
        _request(right="rectification")
    with pytest.raises(ValueError, match="only allowed for rectification"):
        _request(changes={"address": "x"})


def test_dead_letter_headers_round_trip() -> None:
    from datetime import UTC, datetime

    record = DeadLetter(original_topic="dsr.requests.v1", original_partition=2, original_offset=41,
                        consumer="coordinator.requests", error_type="bad_json", error="value is not JSON",
                        failed_at=datetime(2026, 11, 22, tzinfo=UTC))
    headers = codec.dead_letter_headers([("ce_id", b"abc")], record)
    assert ("ce_id", b"abc") in headers
    assert codec.read_dead_letter(headers) == record


def test_an_oversized_dead_letter_keeps_a_prefix_and_names_the_whole() -> None:
    import hashlib
    from datetime import UTC, datetime

    record = DeadLetter(original_topic="dsr.requests.v1", original_partition=0, original_offset=7,
                        consumer="c", error_type="bad_json", error="e", failed_at=datetime(2026, 1, 1, tzinfo=UTC))
    small, _ = codec.dead_letter(b"{oops", [], record)
    assert small == b"{oops"
    big_value = b"x" * (codec.DLQ_MAX_VALUE + 1)
    value, headers = codec.dead_letter(big_value, [("ce_id", b"1")], record)
    h = codec.header_map(headers)
    assert value == big_value[: codec.DLQ_KEPT_PREFIX]
    assert h["dlq_value_size"] == str(len(big_value)) and h["dlq_value_truncated"] == "true"
    assert h["dlq_value_sha256"] == hashlib.sha256(big_value).hexdigest()
    assert codec.read_dead_letter(headers) == record


def test_oversized_original_headers_are_left_out_and_counted() -> None:
    from datetime import UTC, datetime

    record = DeadLetter(original_topic="t", original_partition=0, original_offset=1, consumer="c",
                        error_type="bad_json", error="e", failed_at=datetime(2026, 1, 1, tzinfo=UTC))
    huge = [("ce_id", b"1"), ("junk", b"x" * (codec.DLQ_MAX_HEADERS + 1))]
    _, headers = codec.dead_letter(b"{", huge, record)
    h = codec.header_map(headers)
    assert "junk" not in h and "ce_id" not in h and h["dlq_original_headers_dropped"] == "2"
    _, kept = codec.dead_letter(b"{", [("ce_id", b"1")], record)
    assert ("ce_id", b"1") in kept


# -- RightsRequested: phones in the jurisdiction's region, per-identifier verification, representatives
def test_a_local_phone_is_read_in_the_jurisdictions_region() -> None:
    local = {"identifiers": {"phone": "091 234 5678"}}
    assert _request(subject=local).subject.identifiers["phone"] == "+84912345678"
    assert _request(subject=local, jurisdiction="VN").subject.identifiers["phone"] == "+84912345678"
    us = {"identifiers": {"phone": "(415) 555-0100"}}
    assert _request(subject=us, jurisdiction="US-CA").subject.identifiers["phone"] == "+14155550100"
    assert _request(subject={"identifiers": {"phone": "+84 91 234 5678"}}, jurisdiction="US-CA"
                    ).subject.identifiers["phone"] == "+84912345678"
    assert _request(subject={"identifiers": {"phone": "+33 6 12 34 56 78"}}, jurisdiction="EU"
                    ).subject.identifiers["phone"] == "+33612345678"


def test_a_local_phone_under_a_jurisdiction_of_many_countries_is_kept_as_v1_kept_it() -> None:
    # v1 accepted it before phones were parsed: it stays valid, as "+ and digits" (it cannot be read
    # in a region, so it is matched as typed), rather than be dead-lettered.
    value = orjson.dumps({"request_id": "eu-1", "right": "access", "jurisdiction": "EU",
                          "subject": {"identifiers": {"phone": "06 12 34 56 78"}}})
    _, headers = codec.encode(_request(), source="t")
    assert codec.decode(value, headers, RightsRequested).data.subject.identifiers == {"phone": "0612345678"}


def test_a_short_local_phone_under_a_jurisdiction_of_many_countries_is_invalid_without_echo() -> None:
    value = orjson.dumps({"request_id": "eu-1", "right": "access", "jurisdiction": "EU",
                          "subject": {"identifiers": {"phone": "061234"}}})
    _, headers = codec.encode(_request(), source="t")
    with pytest.raises(codec.DecodeError) as exc:
        codec.decode(value, headers, RightsRequested)
    assert exc.value.kind == "invalid"
    assert "+country code" in str(exc.value) and "EU" in str(exc.value)
    assert "61234" not in str(exc.value)


def test_emails_v1_accepted_stay_valid() -> None:
    req = RightsRequested.model_validate({"request_id": "r", "right": "access",
                                          "subject": {"identifiers": {"email": "Admin@LocalHost"}}})
    assert req.subject.identifiers == {"email": "admin@localhost"}


@pytest.mark.parametrize("identifiers", [{"phone": "12"}, {"phone": "call me 12"}, {"email": "lan.nguyen"},
                                         {"email": "lan @example.vn"}])
def test_invalid_identifiers_are_refused_without_echo(identifiers: dict[str, str]) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as exc:
        _request(subject={"identifiers": identifiers})
    (value,) = identifiers.values()
    assert value not in str(exc.value) and value not in codec.validation_message(exc.value)


def test_a_subject_alone_uses_the_identity_normal_forms() -> None:
    from dsrflow.events import Subject

    subject = Subject(identifiers={"email": " Lan@Example.VN ", "phone": "0912345678",  # type: ignore[dict-item]
                                   "customer_id": " KH-1 "})
    assert subject.identifiers == {"email": "lan@example.vn", "phone": "+84912345678", "customer_id": "KH-1"}
    with pytest.raises(ValueError, match="email identifier is not an email address"):
        Subject(identifiers={"email": "lan"})  # type: ignore[dict-item]


def test_each_identifier_is_verified_on_its_own() -> None:
    both = {"identifiers": {"email": "lan@example.vn", "phone": "0912345678"}}
    email_only = [{"identifier": "email", "method": "email_link", "verified_by": "privacy-centre"}]
    req = _request(subject=both, verification=email_only)
    assert req.verified_types() == frozenset({"email"})
    assert req.verification_record() == [{"identifier": "email", "method": "email_link",
                                          "verified_by": "privacy-centre", "verified_at": None}]
    # verification wins over the legacy flag, both ways
    assert _request(subject=both, verification=email_only, verified=True).verified_types() == frozenset({"email"})
    assert _request(subject=both, verification=email_only, verified=False).verified_types() == frozenset({"email"})
    assert _request(subject=both, verification=[], verified=True).verified_types() == frozenset()
    assert _request(subject=both, verified=True).verified_types() == frozenset({"email", "phone"})
    assert _request(subject=both).verified_types() == frozenset() and _request(subject=both).verification_record() == []


@pytest.mark.parametrize(
    ("verification", "message"),
    [
        ([{"identifier": "customer_id", "method": "account_login"}], "not among the subject's identifiers"),
        ([{"identifier": "email", "method": "email_link"}, {"identifier": "email", "method": "in_person"}],
         "more than once"),
        ([{"identifier": "email", "method": ""}], "at least 1 character"),
        ([{"identifier": "email", "method": "x" * 65}], "at most 64 characters"),
        ([{"identifier": "email", "method": "sms_otp", "by": "x"}], "Extra inputs are not permitted"),
    ],
)
def test_invalid_verification_is_refused(verification: list[dict[str, str]], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _request(subject={"identifiers": {"email": "lan@example.vn"}}, verification=verification)


def test_a_representative_must_be_verified_with_their_authority() -> None:
    assert not _request().representative_unverified()
    assert not _request(requester={"relationship": "self"}).representative_unverified()
    agent = {"relationship": "authorised_agent", "name": "Cong ty Luat ABC", "contact": "dpo@luat-abc.vn",
             "evidence": "power_of_attorney"}
    assert _request(requester=agent).representative_unverified()
    assert not _request(requester={**agent, "verified": True, "verified_by": "dpo@example.vn"}
                        ).representative_unverified()
    assert _request(requester={"relationship": "parent_guardian"}).representative_unverified()
    with pytest.raises(ValueError, match="relationship"):
        _request(requester={"relationship": "friend"})
