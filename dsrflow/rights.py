"""Data-subject rights and the actions a system performs to fulfil them."""

from __future__ import annotations

from enum import StrEnum


class Right(StrEnum):
    """Canonical right names (shared/LAW.md, "Canonical right names")."""

    information = "information"
    access = "access"
    portability = "portability"
    rectification = "rectification"
    erasure = "erasure"
    restriction = "restriction"
    objection = "objection"
    withdraw_consent = "withdraw_consent"
    opt_out_marketing = "opt_out_marketing"
    opt_out_sale_share = "opt_out_sale_share"
    complaint = "complaint"
    request_protective_measures = "request_protective_measures"


class Action(StrEnum):
    """What a worker is asked to do in its own store."""

    export = "export"
    erase = "erase"
    rectify = "rectify"
    restrict = "restrict"
    revoke_consent = "revoke_consent"
    suppress_marketing = "suppress_marketing"
    suppress_sale_share = "suppress_sale_share"


#: The worker action each right fans out to; rights absent here have no fan-out
#: but are still cases with deadlines.
ACTION_FOR_RIGHT: dict[Right, Action] = {
    Right.access: Action.export,
    Right.portability: Action.export,
    Right.rectification: Action.rectify,
    Right.erasure: Action.erase,
    Right.restriction: Action.restrict,
    Right.objection: Action.restrict,
    Right.withdraw_consent: Action.revoke_consent,
    Right.opt_out_marketing: Action.suppress_marketing,
    Right.opt_out_sale_share: Action.suppress_sale_share,
}

#: Rights whose fulfilment must not wait for identity verification.
NO_VERIFICATION: frozenset[Right] = frozenset({Right.opt_out_marketing, Right.opt_out_sale_share})


class IdentifierType(StrEnum):
    """Identifier types a system can search by."""

    email = "email"
    phone = "phone"
    customer_id = "customer_id"
    user_id = "user_id"
    national_id = "national_id"


class CaseStatus(StrEnum):
    received = "received"
    awaiting_verification = "awaiting_verification"
    in_progress = "in_progress"
    on_hold = "on_hold"
    completed = "completed"
    completed_with_exceptions = "completed_with_exceptions"
    denied = "denied"
    failed = "failed"


TERMINAL_CASE: frozenset[CaseStatus] = frozenset(
    {CaseStatus.completed, CaseStatus.completed_with_exceptions, CaseStatus.denied, CaseStatus.failed}
)


class TaskStatus(StrEnum):
    pending = "pending"
    dispatched = "dispatched"
    succeeded = "succeeded"
    not_found = "not_found"
    retained = "retained"
    refused = "refused"
    failed = "failed"
    stalled = "stalled"


TERMINAL_TASK: frozenset[TaskStatus] = frozenset(
    {TaskStatus.succeeded, TaskStatus.not_found, TaskStatus.retained, TaskStatus.refused, TaskStatus.failed}
)


class ReceiptStatus(StrEnum):
    """What a worker reports for one attempt of a task."""

    succeeded = "succeeded"
    not_found = "not_found"
    retained = "retained"
    refused = "refused"
    failed = "failed"
