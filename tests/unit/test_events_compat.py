"""v1 events stay compatible: payloads that external clients send today (literal bytes, as they
go on the wire) still decode, with the same meaning, and the committed JSON Schemas in
topics/schemas/ still accept them. A failure here means a breaking change: that needs a new
topic version, not an edit of v1."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import pytest
from jsonschema import Draft202012Validator

from dsrflow import codec, topics
from dsrflow.events import Event, RightsRequested, TaskAssigned, TaskReceipt
from dsrflow.rights import Action, IdentifierType, ReceiptStatus, Right


def kcat_headers(ce_type: str, source: str = "privacy-centre") -> list[tuple[str, bytes]]:
    """What ``kcat -H ce_specversion=1.0 -H ce_id=... -H ce_source=... -H ce_type=...
    -H content-type=application/json`` sends: no ce_time, no traceparent."""
    return [("ce_specversion", b"1.0"), ("ce_id", b"0b8a4f0e-7d8e-4c43-9d55-0a6b8f1c2d3e"),
            ("ce_source", source.encode()), ("ce_type", ce_type.encode()), ("content-type", b"application/json")]


# -- today's payloads, byte for byte ----------------------------------------
README_KCAT = (b'{"request_id":"pc-2026-0001","right":"erasure","verified":true,'
               b'"subject":{"identifiers":{"email":"lan.nguyen@example.vn"}}}')
RECTIFICATION = (b'{"request_id":"pc-2026-0002","right":"rectification","verified":true,'
                 b'"subject":{"identifiers":{"email":"Lan.Nguyen@Example.VN"}},'
                 b'"changes":{"address":"12 Ly Thuong Kiet, Hoan Kiem, Ha Noi","name":"Nguyen Thi Lan"}}')
OBJECTION = (b'{"request_id":"pc-2026-0003","right":"objection","jurisdiction":"VN",'
             b'"subject":{"identifiers":{"email":"binh.tran@example.vn"}},'
             b'"purposes":["marketing.advertising","analytics"]}')
FULL = (b'{"request_id":"sd-2026-0004","right":"access","jurisdiction":"VN",'
        b'"received_at":"2026-11-20T08:30:00+07:00","verified":false,"channel":"support_desk",'
        b'"subject":{"identifiers":{"phone":"+84912345678","customer_id":"KH-000123",'
        b'"email":"lan.nguyen@example.vn"}}}')
US_CA = (b'{"request_id":"ccpa-17","right":"opt_out_sale_share","jurisdiction":"US-CA",'
         b'"subject":{"identifiers":{"email":"pat@example.com","phone":"+1 415 555 0100"}}}')
TASK_ASSIGNED = (b'{"task_id":"7c1e2f8a-5b7d-4c1e-9a3b-2d4e6f8a0b1c","case_id":"4695f4ba-1c2d-4e5f-8a9b-0c1d2e3f4a5b",'
                 b'"system":"crm","action":"erase","right":"erasure","attempt":1,'
                 b'"identifiers":{"email":"lan.nguyen@example.vn","phone":"+84912345678"},'
                 b'"due_at":"2026-12-18T17:00:00+07:00"}')
TASK_ASSIGNED_RECTIFY = (b'{"task_id":"8d2f3a9b-6c8e-4d2f-8b4c-3e5f7a9b1c2d",'
                         b'"case_id":"4695f4ba-1c2d-4e5f-8a9b-0c1d2e3f4a5b","system":"billing","action":"rectify",'
                         b'"right":"rectification","attempt":2,"identifiers":{"customer_id":"KH-000123"},'
                         b'"due_at":"2026-12-18T10:00:00Z","changes":{"address":"12 Ly Thuong Kiet"}}')
SHA = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
TASK_RECEIPT = (b'{"task_id":"7c1e2f8a-5b7d-4c1e-9a3b-2d4e6f8a0b1c","case_id":"4695f4ba-1c2d-4e5f-8a9b-0c1d2e3f4a5b",'
                b'"system":"billing","attempt":1,"status":"retained","retryable":false,'
                b'"counts":{"located":6,"anonymised":1,"retained":4},"categories":["user.contact","user.financial"],'
                b'"retained":[{"category":"user.financial","records":4,'
                b'"legal_basis":"Vietnam Law on Accounting 88/2015/QH13 Art 41(5)",'
                b'"retain_until":"2035-12-31T00:00:00Z"}],'
                b'"artifacts":[],"completed_at":"2026-11-20T09:01:02.345678+00:00"}')
EXPORT_RECEIPT = (b'{"task_id":"9e3a4b0c-7d9f-4e3a-9c5d-4f6a8b0c2d3e","case_id":"4695f4ba-1c2d-4e5f-8a9b-0c1d2e3f4a5b",'
                  b'"system":"crm","attempt":1,"status":"succeeded",'
                  b'"counts":{"located":3},"categories":["user.contact.email"],'
                  b'"artifacts":[{"ref":"cases/4695f4ba-1c2d-4e5f-8a9b-0c1d2e3f4a5b/crm/'
                  b'9e3a4b0c-7d9f-4e3a-9c5d-4f6a8b0c2d3e-1-9f86d081.json","sha256":"' + SHA.encode() + b'",'
                  b'"size":2048,"records":3,"media_type":"application/json"}],'
                  b'"completed_at":"2026-11-20T09:01:02Z"}')
FAILED_RECEIPT = (b'{"task_id":"9e3a4b0c-7d9f-4e3a-9c5d-4f6a8b0c2d3e","case_id":"4695f4ba-1c2d-4e5f-8a9b-0c1d2e3f4a5b",'
                  b'"system":"crm","attempt":2,"status":"failed","retryable":true,'
                  b'"error":"ConnectionError at crm.handlers:export:42","completed_at":"2026-11-20T09:05:00Z"}')

REQUESTS = [README_KCAT, RECTIFICATION, OBJECTION, FULL, US_CA]
OLD: list[tuple[str, type[Event], bytes]] = (
    [("RightsRequested", RightsRequested, r) for r in REQUESTS]
    + [("TaskAssigned", TaskAssigned, t) for t in (TASK_ASSIGNED, TASK_ASSIGNED_RECTIFY)]
    + [("TaskReceipt", TaskReceipt, r) for r in (TASK_RECEIPT, EXPORT_RECEIPT, FAILED_RECEIPT)]
)


def request(value: bytes) -> RightsRequested:
    return codec.decode(value, kcat_headers(RightsRequested.ce_type), RightsRequested).data


def schema_validator(name: str) -> Draft202012Validator:
    schema = json.loads((topics.topics_dir() / "schemas" / f"{name}.v1.json").read_bytes())
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema, format_checker=Draft202012Validator.FORMAT_CHECKER)


def schema_errors(name: str, payload: Any) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in schema_validator(name).iter_errors(payload)]


# -- they decode, with the same meaning ---------------------------------------
@pytest.mark.parametrize(("name", "model", "value"), OLD, ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(OLD)])
def test_todays_events_decode_from_kcat_style_records(name: str, model: type[Event], value: bytes) -> None:
    env = codec.decode(value, kcat_headers(model.ce_type), model)
    assert env.type == model.ce_type and env.source == "privacy-centre"
    assert env.traceparent is None and env.time.tzinfo is not None


@pytest.mark.parametrize(("name", "model", "value"), OLD, ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(OLD)])
def test_the_committed_schemas_accept_todays_events(name: str, model: type[Event], value: bytes) -> None:
    assert schema_errors(name, json.loads(value)) == []


def test_the_readme_kcat_request_keeps_its_meaning() -> None:
    req = request(README_KCAT)
    assert req.request_id == "pc-2026-0001" and req.right == Right.erasure
    assert req.jurisdiction == "VN" and req.received_at is None and req.channel is None
    assert req.subject.identifiers == {IdentifierType.email: "lan.nguyen@example.vn"}
    # the legacy flag: the upstream app vouched for the whole request, so every identifier counts
    assert req.verified is True and req.verification is None
    assert req.verified_types() == frozenset({IdentifierType.email})
    assert req.verification_record() == [
        {"identifier": "email", "method": "upstream", "verified_by": None, "verified_at": None}
    ]
    assert req.requester is None and not req.representative_unverified()


def test_a_rectification_keeps_its_changes_and_the_email_is_lower_cased() -> None:
    req = request(RECTIFICATION)
    assert req.right == Right.rectification
    assert req.changes == {"address": "12 Ly Thuong Kiet, Hoan Kiem, Ha Noi", "name": "Nguyen Thi Lan"}
    assert req.subject.identifiers[IdentifierType.email] == "lan.nguyen@example.vn"
    assert req.verified_types() == frozenset({IdentifierType.email})


def test_an_objection_keeps_its_purposes_and_is_not_verified() -> None:
    req = request(OBJECTION)
    assert req.right == Right.objection and req.purposes == ["marketing.advertising", "analytics"]
    assert req.verified is False and req.verified_types() == frozenset() and req.verification_record() == []


def test_a_full_request_keeps_every_field_and_its_e164_phone() -> None:
    req = request(FULL)
    assert req.received_at == datetime(2026, 11, 20, 1, 30, tzinfo=UTC)
    assert req.channel == "support_desk" and req.jurisdiction == "VN"
    assert req.subject.identifiers == {
        IdentifierType.phone: "+84912345678",
        IdentifierType.customer_id: "KH-000123",
        IdentifierType.email: "lan.nguyen@example.vn",
    }
    assert req.verified_types() == frozenset()


def test_a_us_request_keeps_its_phone() -> None:
    req = request(US_CA)
    assert req.subject.identifiers[IdentifierType.phone] == "+14155550100"
    assert req.right == Right.opt_out_sale_share and req.jurisdiction == "US-CA"


def test_legacy_verified_counts_every_identifier_of_the_subject() -> None:
    req = request(FULL.replace(b'"verified":false', b'"verified":true'))
    assert req.verified_types() == frozenset({IdentifierType.phone, IdentifierType.customer_id, IdentifierType.email})
    assert [e["identifier"] for e in req.verification_record()] == ["customer_id", "email", "phone"]
    assert {e["method"] for e in req.verification_record()} == {"upstream"}


def test_a_request_re_encoded_by_dsrflow_decodes_to_the_same_request() -> None:
    for value in REQUESTS:
        req = request(value)
        again, headers = codec.encode(req, source="dsrflow/test")
        assert codec.decode(again, headers, RightsRequested).data == req
        assert schema_errors("RightsRequested", json.loads(again)) == []


def test_todays_task_keeps_its_meaning() -> None:
    task = codec.decode(TASK_ASSIGNED, kcat_headers(TaskAssigned.ce_type), TaskAssigned).data
    assert task.task_id == UUID("7c1e2f8a-5b7d-4c1e-9a3b-2d4e6f8a0b1c")
    assert task.action == Action.erase and task.right == Right.erasure and task.attempt == 1
    assert task.identifiers == {IdentifierType.email: "lan.nguyen@example.vn", IdentifierType.phone: "+84912345678"}
    assert task.due_at == datetime(2026, 12, 18, 10, 0, tzinfo=UTC)
    assert task.changes is None and task.purposes is None
    rectify = codec.decode(TASK_ASSIGNED_RECTIFY, kcat_headers(TaskAssigned.ce_type), TaskAssigned).data
    assert rectify.changes == {"address": "12 Ly Thuong Kiet"} and rectify.attempt == 2


def test_todays_receipts_keep_their_meaning() -> None:
    kept = codec.decode(TASK_RECEIPT, kcat_headers(TaskReceipt.ce_type), TaskReceipt).data
    assert kept.status == ReceiptStatus.retained and not kept.retryable
    assert kept.counts == {"located": 6, "anonymised": 1, "retained": 4}
    assert kept.retained[0].records == 4 and kept.retained[0].retain_until == datetime(2035, 12, 31, tzinfo=UTC)
    export = codec.decode(EXPORT_RECEIPT, kcat_headers(TaskReceipt.ce_type), TaskReceipt).data
    assert export.status == ReceiptStatus.succeeded and export.artifacts[0].sha256 == SHA
    assert export.artifacts[0].records == 3 and export.retryable is False and export.retained == []
    failed = codec.decode(FAILED_RECEIPT, kcat_headers(TaskReceipt.ce_type), TaskReceipt).data
    assert failed.status == ReceiptStatus.failed and failed.retryable and failed.artifacts == []


# -- what v1 grew: optional fields only ---------------------------------------
def test_new_request_fields_are_optional_and_accepted_by_the_schema() -> None:
    payload = json.loads(FULL)
    payload["verification"] = [
        {"identifier": "email", "method": "email_link", "verified_by": "privacy-centre",
         "verified_at": "2026-11-20T08:00:00+07:00"},
        {"identifier": "phone", "method": "sms_otp"},
    ]
    payload["requester"] = {"relationship": "parent_guardian", "name": "Nguyen Van An",
                            "contact": "an.nguyen@example.vn", "evidence": "birth_certificate"}
    assert schema_errors("RightsRequested", payload) == []
    req = request(json.dumps(payload).encode())
    assert req.verified_types() == frozenset({IdentifierType.email, IdentifierType.phone})
    assert req.verification_record()[0] == {"identifier": "email", "method": "email_link",
                                            "verified_by": "privacy-centre", "verified_at": "2026-11-20T08:00:00+07:00"}
    assert req.representative_unverified()
    again, headers = codec.encode(req, source="dsrflow/test")
    assert codec.decode(again, headers, RightsRequested).data == req


def test_the_required_fields_of_v1_did_not_grow() -> None:
    required = {name: set(schema_validator(name).schema.get("required", [])) for name in topics.SCHEMA_MODELS}
    assert required["RightsRequested"] == {"request_id", "right", "subject"}
    assert required["TaskAssigned"] == {"task_id", "case_id", "system", "action", "right", "attempt",
                                        "identifiers", "due_at"}
    assert required["TaskReceipt"] == {"task_id", "case_id", "system", "attempt", "status", "completed_at"}
