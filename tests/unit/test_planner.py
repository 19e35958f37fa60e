"""Pure planning and outcome decisions."""

from __future__ import annotations

import itertools
from datetime import timedelta

import pytest

from dsrflow.domain import planner
from dsrflow.domain.planner import TaskKind
from dsrflow.registry import SystemDeclaration
from dsrflow.rights import ACTION_FOR_RIGHT, TERMINAL_TASK, Action, CaseStatus, IdentifierType, Right, TaskStatus

EMAIL, PHONE, CUSTOMER, USER = IdentifierType.email, IdentifierType.phone, IdentifierType.customer_id, \
    IdentifierType.user_id
CRM = SystemDeclaration(name="crm", identifier_types=("email", "phone"), actions=(Action.export, Action.erase),
                        categories=("user.name", "user.contact.email", "user.contact.address"))
BILLING = SystemDeclaration(name="billing", identifier_types=("email", "customer_id"),
                            actions=(Action.export, Action.erase), purposes=("billing", "accounting"),
                            categories=("user.name", "user.financial"))
AUTH = SystemDeclaration(name="auth", identifier_types=("user_id",), actions=(Action.export,))
ANALYTICS = SystemDeclaration(name="analytics", identifier_types=("email",), worker=False,
                              purposes=("analytics",), backup_retention=timedelta(days=30))
MAILER = SystemDeclaration(name="mailer", identifier_types=("email",), actions=(Action.suppress_marketing,),
                           purposes=("marketing.communications",))


def test_one_task_per_supporting_system_with_only_its_identifier_types() -> None:
    tasks = planner.plan(Right.access, {EMAIL: "a@b.vn", PHONE: "+84901234567"}, [CRM, BILLING, AUTH])
    assert [(t.system, t.action, t.kind) for t in tasks] == [("billing", Action.export, TaskKind.worker),
                                                            ("crm", Action.export, TaskKind.worker)]
    assert tasks[0].identifiers == {EMAIL: "a@b.vn"}  # no phone: billing does not search by it


def test_a_system_that_cannot_do_the_action_gets_a_manual_task_never_nothing() -> None:
    tasks = planner.plan(Right.erasure, {USER: "u1", EMAIL: "a@b.vn"}, [CRM, AUTH])
    assert [(t.system, t.kind) for t in tasks] == [("auth", TaskKind.manual), ("crm", TaskKind.worker)]
    assert "cannot erase" in (tasks[0].reason or "")


def test_a_system_declared_without_a_worker_gets_manual_tasks() -> None:
    [task] = planner.plan(Right.access, {EMAIL: "a@b.vn"}, [ANALYTICS])
    assert task.kind == TaskKind.manual and "no dsrflow worker" in (task.reason or "")


def test_a_system_that_searches_by_none_of_the_identifiers_is_not_asked_and_says_why() -> None:
    plan = planner.plan_for(Right.access, {USER: "u1"}, [CRM, AUTH])
    assert [t.system for t in plan.tasks] == ["auth"]
    assert "identifier types" in plan.not_asked["crm"]


def test_purposes_decide_who_is_asked_to_stop_marketing() -> None:
    plan = planner.plan_for(Right.opt_out_marketing, {EMAIL: "a@b.vn"}, [CRM, BILLING, MAILER])
    # billing declares purposes and none is marketing: not asked; crm declares none: asked (manual)
    assert [(t.system, t.kind) for t in plan.tasks] == [("crm", TaskKind.manual), ("mailer", TaskKind.worker)]
    assert "billing" in plan.not_asked


def test_rectification_goes_to_the_systems_that_hold_the_fields() -> None:
    plan = planner.plan_for(Right.rectification, {EMAIL: "a@b.vn"}, [CRM, BILLING],
                            changes={"address": "1 Lê Lợi", "user.name": "Lan"})
    by = {t.system: t.changes for t in plan.tasks}
    assert by == {"billing": {"user.name": "Lan"}, "crm": {"address": "1 Lê Lợi", "user.name": "Lan"}}
    only_address = planner.plan_for(Right.rectification, {EMAIL: "a@b.vn"}, [CRM, BILLING],
                                    changes={"address": "1 Lê Lợi"})
    assert [t.system for t in only_address.tasks] == ["crm"] and "billing" in only_address.not_asked


def test_only_verified_identifiers_travel_and_unverified_only_systems_get_a_manual_task() -> None:
    plan = planner.plan_for(Right.erasure, {EMAIL: "a@b.vn", CUSTOMER: "KH1", USER: "u1"}, [CRM, BILLING, AUTH],
                            verified={EMAIL})
    by = {t.system: t for t in plan.tasks}
    assert by["crm"].identifiers == {EMAIL: "a@b.vn"} and by["billing"].identifiers == {EMAIL: "a@b.vn"}
    assert by["auth"].kind == TaskKind.manual and by["auth"].identifiers == {}
    assert "not verified (user_id)" in (by["auth"].reason or "")


def test_an_opt_out_uses_unverified_identifiers() -> None:
    [task] = planner.plan_for(Right.opt_out_marketing, {EMAIL: "a@b.vn"}, [MAILER], verified=set()).tasks
    assert task.identifiers == {EMAIL: "a@b.vn"} and task.kind == TaskKind.worker


def test_rights_without_fan_out_plan_nothing() -> None:
    for right in (Right.complaint, Right.information, Right.request_protective_measures):
        assert planner.plan(right, {EMAIL: "a@b.vn"}, [CRM]) == []


@pytest.mark.parametrize("right", sorted(ACTION_FOR_RIGHT))
def test_every_fan_out_right_reaches_a_system_that_declares_no_purposes(right: Right) -> None:
    everything = SystemDeclaration(name="erp", identifier_types=("email",), actions=tuple(Action))
    [task] = planner.plan_for(right, {EMAIL: "a@b.vn"}, [everything], changes={"name": "Lan"}).tasks
    assert task.action == ACTION_FOR_RIGHT[right] and task.kind == TaskKind.worker


def test_verification_gate() -> None:
    assert planner.needs_verification(Right.erasure, verified=False)
    assert planner.needs_verification(Right.erasure, verified=set())
    assert not planner.needs_verification(Right.erasure, verified=True)
    assert not planner.needs_verification(Right.erasure, verified={EMAIL})
    # CCPA forbids verifying an opt-out of sale; marketing and tracking opt-outs need none either.
    for right in (Right.opt_out_sale_share, Right.opt_out_marketing, Right.opt_out_tracking):
        assert not planner.needs_verification(right, verified=False)


def _expected(statuses: tuple[TaskStatus, ...]) -> CaseStatus | None:
    if not all(s in TERMINAL_TASK for s in statuses):
        return None
    if TaskStatus.failed in statuses:
        return CaseStatus.failed
    if set(statuses) & {TaskStatus.retained, TaskStatus.refused, TaskStatus.conflict, TaskStatus.skipped}:
        return CaseStatus.completed_with_exceptions
    return CaseStatus.completed


@pytest.mark.parametrize("statuses", list(itertools.combinations_with_replacement(list(TaskStatus), 2)),
                         ids=lambda s: "+".join(s))
def test_outcome_for_every_pair_of_task_states(statuses: tuple[TaskStatus, ...]) -> None:
    assert planner.outcome(list(statuses)) == _expected(statuses)
    assert planner.outcome(list(reversed(statuses))) == _expected(statuses)


@pytest.mark.parametrize(
    ("statuses", "expected"),
    [
        ([TaskStatus.succeeded, TaskStatus.not_found], CaseStatus.completed),
        ([TaskStatus.succeeded, TaskStatus.retained], CaseStatus.completed_with_exceptions),
        ([TaskStatus.refused], CaseStatus.completed_with_exceptions),
        ([TaskStatus.conflict, TaskStatus.succeeded], CaseStatus.completed_with_exceptions),
        ([TaskStatus.retained, TaskStatus.failed], CaseStatus.failed),
        ([TaskStatus.succeeded, TaskStatus.dispatched], None),
        ([TaskStatus.succeeded, TaskStatus.manual], None),  # a person has not acted yet
        ([TaskStatus.stalled], None),
    ],
)
def test_outcome(statuses: list[TaskStatus], expected: CaseStatus | None) -> None:
    assert planner.outcome(statuses) == expected


def test_an_objection_or_withdrawal_for_named_purposes_asks_only_systems_with_those_purposes() -> None:
    plan = planner.plan_for(Right.objection, {EMAIL: "a@b.vn"}, [CRM, BILLING, MAILER], purposes=["marketing"])
    assert [t.system for t in plan.tasks] == ["crm", "mailer"]  # crm declares no purposes: asked
    assert "billing" in plan.not_asked
    withdraw = planner.plan_for(Right.withdraw_consent, {EMAIL: "a@b.vn"}, [BILLING, MAILER])
    assert [t.system for t in withdraw.tasks] == ["mailer"]  # billing relies on no consent
    everything = planner.plan_for(Right.objection, {EMAIL: "a@b.vn"}, [BILLING])  # no purpose named: all processing
    assert [t.system for t in everything.tasks] == ["billing"]
