"""dsrflow.commands: the DPO's decisions as command payloads, who may make each, and their JSON Schema."""

from __future__ import annotations

import uuid
from datetime import date
from typing import Any

import jsonschema
import pytest

from dsrflow.auth import Role
from dsrflow.commands import (
    ROLES_FOR,
    CommandError,
    CompleteTask,
    Decision,
    Deny,
    NotAllowed,
    OpenCase,
    ReassignTask,
    Verify,
    allowed,
    check_role,
    command_json_schema,
    parse_command,
)
from dsrflow.errors import DsrflowError
from dsrflow.events import RightsRequested
from dsrflow.rights import IdentifierType, Right

CASE = str(uuid.UUID(int=1))
TASK = str(uuid.UUID(int=2))
SECRET = "lan.nguyen@example.vn"  # personal data: never echoed in an error

EXAMPLES: dict[str, dict[str, Any]] = {
    "verify": {"decision": "verify", "case_id": CASE, "identifiers": ["email", "phone"], "method": "id_document"},
    "deny": {"decision": "deny", "case_id": CASE, "ground": "harms_others", "reason": "it would expose another person"},
    "extend": {"decision": "extend", "case_id": CASE, "reason": "many systems", "until": "2026-05-01"},
    "hold": {"decision": "hold", "case_id": CASE, "kind": "legal_hold", "reason": "litigation pending"},
    "release": {"decision": "release", "case_id": CASE},
    "lift": {"decision": "lift", "case_id": CASE},
    "retry_task": {"decision": "retry_task", "case_id": CASE, "task_id": TASK},
    "skip_task": {"decision": "skip_task", "case_id": CASE, "task_id": TASK, "reason": "system retired"},
    "reassign_task": {"decision": "reassign_task", "case_id": CASE, "task_id": TASK, "to_person": "support lead",
                      "reason": "the worker cannot reach the archive"},
    "complete_task": {"decision": "complete_task", "case_id": CASE, "task_id": TASK, "resolution": "not_found",
                      "note": "searched the paper archive"},
    "decline_task": {"decision": "decline_task", "case_id": CASE, "task_id": TASK, "note": "not our system"},
    "open_case": {"decision": "open_case", "why": "under-16 account found",
                  "request": {"request_id": "dpo-1", "right": "erasure", "jurisdiction": "VN",
                              "subject": {"identifiers": {"email": " Lan.Nguyen@Example.VN",
                                                          "phone": "0912 345 678"}}}},
    "offboard": {"decision": "offboard", "controller": "acme", "mode": "handover", "why": "contract ended"},
    "approve_system": {"decision": "approve_system", "system": "crm", "digest": "ab" * 32},
    "refuse_system": {"decision": "refuse_system", "system": "crm", "digest": "ab" * 32,
                      "reason": "declares no phone; the CRM searches by phone"},
}
SYSTEM_DECISIONS = {Decision.approve_system, Decision.refuse_system}


def test_every_decision_has_an_example() -> None:
    assert set(EXAMPLES) == {d.value for d in Decision}


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_each_decision_parses(name: str) -> None:
    cmd = parse_command(EXAMPLES[name])
    assert cmd.decision == name
    assert parse_command(cmd.model_dump(mode="json", exclude_none=True)) == cmd  # round trip


def test_fields_are_typed() -> None:
    v = parse_command(EXAMPLES["verify"])
    assert isinstance(v, Verify) and v.identifiers == [IdentifierType.email, IdentifierType.phone]
    assert isinstance(v.case_id, uuid.UUID)
    e = parse_command(EXAMPLES["extend"])
    assert e.until == date(2026, 5, 1)  # type: ignore[union-attr]
    c = parse_command(EXAMPLES["complete_task"])
    assert isinstance(c, CompleteTask) and c.resolution == "not_found" and str(c.task_id) == TASK
    assert parse_command({**EXAMPLES["verify"], "identifiers": None}).identifiers is None  # type: ignore[union-attr]
    assert parse_command({**EXAMPLES["extend"], "until": None}).until is None  # type: ignore[union-attr]


def test_open_case_reuses_the_request_model() -> None:
    o = parse_command(EXAMPLES["open_case"])
    assert isinstance(o, OpenCase) and isinstance(o.request, RightsRequested)
    assert o.request.right == Right.erasure
    assert o.request.subject.identifiers[IdentifierType.email] == "lan.nguyen@example.vn"
    assert o.request.subject.identifiers[IdentifierType.phone] == "+84912345678"  # read in the jurisdiction
    with pytest.raises(CommandError, match="changes"):  # the request's own rules apply
        parse_command({**EXAMPLES["open_case"], "request": {**EXAMPLES["open_case"]["request"],
                                                             "changes": {"name": "x"}}})


def test_free_text_is_trimmed_and_never_empty() -> None:
    d = parse_command({**EXAMPLES["deny"], "reason": "  spaced  "})
    assert isinstance(d, Deny) and d.reason == "spaced"
    for name, field in (("deny", "reason"), ("extend", "reason"), ("hold", "reason"), ("skip_task", "reason"),
                        ("reassign_task", "reason"), ("complete_task", "note"), ("decline_task", "note"),
                        ("open_case", "why")):
        for blank in ("", "   ", "\n\t"):
            with pytest.raises(CommandError, match=field):
                parse_command({**EXAMPLES[name], field: blank})
        with pytest.raises(CommandError, match=field):
            parse_command({**EXAMPLES[name], field: "x" * 2001})
        parse_command({**EXAMPLES[name], field: "x" * 2000})
        with pytest.raises(CommandError, match=field):
            parse_command({k: v for k, v in EXAMPLES[name].items() if k != field})


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_unknown_fields_are_refused_and_a_sender_cannot_name_itself(name: str) -> None:
    with pytest.raises(CommandError, match="by: Extra inputs"):
        parse_command({**EXAMPLES[name], "by": "someone else"})


def test_reassign_names_exactly_one_target() -> None:
    base = {k: v for k, v in EXAMPLES["reassign_task"].items() if k != "to_person"}
    r = parse_command({**base, "to_system": "billing"})
    assert isinstance(r, ReassignTask) and r.to_system == "billing" and r.to_person is None
    with pytest.raises(CommandError, match="exactly one"):
        parse_command(base)
    with pytest.raises(CommandError, match="exactly one"):
        parse_command({**base, "to_system": "billing", "to_person": "support lead"})
    with pytest.raises(CommandError, match="to_system"):
        parse_command({**base, "to_system": "Not A System!"})


@pytest.mark.parametrize("change", [
    {"case_id": "not-a-uuid"}, {"identifiers": ["passport"]}, {"identifiers": []},
    {"identifiers": ["email", "email"]}, {"method": ""}, {"method": "x" * 65},
])
def test_verify_fields_are_checked(change: dict[str, Any]) -> None:
    with pytest.raises(CommandError):
        parse_command({**EXAMPLES["verify"], **change})


@pytest.mark.parametrize("name,change", [
    ("hold", {"kind": "because"}), ("complete_task", {"resolution": "refused"}), ("deny", {"ground": "Harms Others"}),
    ("extend", {"until": "next week"}), ("retry_task", {"task_id": "7"}), ("release", {"case_id": None}),
])
def test_enumerated_and_typed_fields_are_checked(name: str, change: dict[str, Any]) -> None:
    with pytest.raises(CommandError, match=next(iter(change))):
        parse_command({**EXAMPLES[name], **change})


@pytest.mark.parametrize("cmd", [None, "release", [EXAMPLES["release"]], {}, {"decision": "delete_everything"},
                                 {"decision": 3}, {"decision": "Release", "case_id": CASE}])
def test_what_is_no_command_is_refused(cmd: Any) -> None:
    with pytest.raises(CommandError):
        parse_command(cmd)


def test_errors_are_one_line_without_the_values() -> None:
    bad = {**EXAMPLES["deny"], "ground": SECRET, "reason": "", "case_id": SECRET, "extra": SECRET}
    with pytest.raises(CommandError) as info:
        parse_command(bad)
    msg = str(info.value)
    assert "\n" not in msg and SECRET not in msg and "lan.nguyen" not in msg
    assert msg.startswith("invalid deny command: ") and all(f in msg for f in ("ground", "reason", "case_id", "extra"))
    assert isinstance(info.value, DsrflowError)
    bad_request = {**EXAMPLES["open_case"], "request": {**EXAMPLES["open_case"]["request"],
                                                         "subject": {"identifiers": {"phone": SECRET}}}}
    with pytest.raises(CommandError) as info:
        parse_command(bad_request)
    assert "\n" not in str(info.value) and SECRET not in str(info.value)


# -- who may decide ----------------------------------------------------------------------------------
def test_the_role_table_covers_every_decision() -> None:
    assert set(ROLES_FOR) == set(Decision)
    assert all(isinstance(r, frozenset) and r <= set(Role) for r in ROLES_FOR.values())


def test_a_dpo_may_make_every_decision_on_a_case() -> None:
    assert all(Role.dpo in roles for d, roles in ROLES_FOR.items() if d not in SYSTEM_DECISIONS)


def test_an_operator_only_carries_out_tasks() -> None:
    assert {d for d, roles in ROLES_FOR.items() if Role.operator in roles} == {
        Decision.retry_task, Decision.complete_task, Decision.decline_task}


def test_an_admin_decides_nothing_on_a_case_and_alone_on_systems() -> None:
    assert not any(Role.admin in roles for d, roles in ROLES_FOR.items() if d not in SYSTEM_DECISIONS)
    assert all(ROLES_FOR[d] == {Role.admin} for d in SYSTEM_DECISIONS)


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_check_role_follows_the_table(name: str) -> None:
    cmd = parse_command(EXAMPLES[name])
    for role in Role:
        if role in ROLES_FOR[Decision(name)]:
            check_role(role, cmd)
            assert allowed(role.value, name)
        else:
            with pytest.raises(NotAllowed, match=f"{role}.*{name}"):
                check_role(role, cmd)
            assert not allowed(role, name)
    assert not allowed("root", name) and not allowed(Role.dpo, "delete_everything")
    with pytest.raises(NotAllowed):
        check_role("root", cmd)


# -- the schema ---------------------------------------------------------------------------------------
def test_the_json_schema_accepts_the_examples_and_refuses_what_the_models_refuse() -> None:
    schema = command_json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    assert schema["$id"].endswith("Command.v1.json") and "EdDSA" in schema["description"]
    for example in EXAMPLES.values():
        validator.validate(example)
    for bad in ({**EXAMPLES["release"], "by": "x"}, {"decision": "nope", "case_id": CASE},
                {**EXAMPLES["hold"], "kind": "because"}, {k: v for k, v in EXAMPLES["deny"].items() if k != "reason"}):
        assert not validator.is_valid(bad)


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_each_example_is_valid_against_the_committed_schema(name: str) -> None:
    """A DPO tool in another language builds its commands from topics/schemas/Command.v1.json."""
    import jsonschema
    import orjson

    from dsrflow.topics import topics_dir

    schema = orjson.loads((topics_dir() / "schemas" / "Command.v1.json").read_bytes())
    jsonschema.validate(EXAMPLES[name], schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**EXAMPLES[name], "by": "someone"}, schema)  # who decided is never in the command
