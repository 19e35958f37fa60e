"""Pure planning and outcome decisions."""

from __future__ import annotations

import pytest

from dsrflow.coordinator import planner
from dsrflow.registry import SystemDeclaration
from dsrflow.rights import Action, CaseStatus, Right, TaskStatus

CRM = SystemDeclaration(name="crm", identifier_types=("email", "phone"), actions=(Action.export, Action.erase))
BILLING = SystemDeclaration(name="billing", identifier_types=("email", "customer_id"),
                            actions=(Action.export, Action.erase))
AUTH = SystemDeclaration(name="auth", identifier_types=("user_id",), actions=(Action.export,))


def test_one_task_per_supporting_system_with_only_its_identifier_types() -> None:
    tasks = planner.plan(Right.access, {"email": "a@b.vn", "phone": "+84901234567"}, [CRM, BILLING, AUTH])
    assert [(t.system, t.action) for t in tasks] == [("billing", Action.export), ("crm", Action.export)]
    billing = tasks[0]
    assert billing.identifiers == {"email": "a@b.vn"}  # no phone: billing does not search by it


def test_system_without_the_action_gets_no_task() -> None:
    tasks = planner.plan(Right.erasure, {"user_id": "u1", "email": "a@b.vn"}, [CRM, AUTH])
    assert [t.system for t in tasks] == ["crm"]


def test_rights_without_fan_out_plan_nothing() -> None:
    assert planner.plan(Right.complaint, {"email": "a@b.vn"}, [CRM]) == []


def test_verification_gate() -> None:
    assert planner.needs_verification(Right.erasure, verified=False)
    assert not planner.needs_verification(Right.erasure, verified=True)
    # CCPA forbids verifying an opt-out of sale; marketing opt-out needs none either.
    assert not planner.needs_verification(Right.opt_out_sale_share, verified=False)
    assert not planner.needs_verification(Right.opt_out_marketing, verified=False)


@pytest.mark.parametrize(
    ("statuses", "expected"),
    [
        ([TaskStatus.succeeded, TaskStatus.not_found], CaseStatus.completed),
        ([TaskStatus.succeeded, TaskStatus.retained], CaseStatus.completed_with_exceptions),
        ([TaskStatus.refused], CaseStatus.completed_with_exceptions),
        ([TaskStatus.retained, TaskStatus.failed], CaseStatus.failed),
        ([TaskStatus.succeeded, TaskStatus.dispatched], None),
        ([TaskStatus.stalled], None),
    ],
)
def test_outcome(statuses: list[TaskStatus], expected: CaseStatus | None) -> None:
    assert planner.outcome(statuses) == expected
