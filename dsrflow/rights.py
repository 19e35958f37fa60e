"""Data-subject rights and the actions a system performs to fulfil them."""

from __future__ import annotations

import re
from datetime import date
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
    opt_out_tracking = "opt_out_tracking"  # VN Law 91/2025 Art 29(3)-(4): cookies, device identifiers
    automated_decision_objection = "automated_decision_objection"  # Decree 356/2025 Art 10(3)
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
    suppress_tracking = "suppress_tracking"
    stop_automated = "stop_automated"
    #: the DPO lifts a restriction (a command on the original restriction case)
    lift_restriction = "lift_restriction"
    #: a client company (controller) leaves its processor: hand over, or delete, all of its data
    export_all = "export_all"
    erase_all = "erase_all"


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
    Right.opt_out_tracking: Action.suppress_tracking,
    Right.automated_decision_objection: Action.stop_automated,
}

#: Rights whose fulfilment must not wait for identity verification: an opt-out only suppresses,
#: so anyone may ask it, with unverified identifiers (CCPA even forbids verifying a sale opt-out).
NO_VERIFICATION: frozenset[Right] = frozenset(
    {Right.opt_out_marketing, Right.opt_out_sale_share, Right.opt_out_tracking}
)

#: Rights whose effect lasts: they also reach systems that register after the case was opened,
#: for as long as the effect is in force (a restriction until it is lifted).
LASTING: frozenset[Right] = frozenset({
    Right.restriction, Right.objection, Right.withdraw_consent, Right.opt_out_marketing,
    Right.opt_out_sale_share, Right.opt_out_tracking, Right.automated_decision_objection,
})

#: Purposes (fideslang data-use keys, by prefix) that make an action concern a system. A system
#: that declares purposes and none of these is not asked (billing is not asked to stop marketing);
#: one that declares no purposes at all is asked, to be safe.
ACTION_PURPOSES: dict[Action, tuple[str, ...]] = {
    Action.suppress_marketing: ("marketing",),
    Action.suppress_sale_share: ("third_party_sharing", "marketing.advertising.third_party"),
    Action.suppress_tracking: ("analytics", "marketing.advertising", "personalize"),
    Action.stop_automated: ("personalize", "automated_decision"),
    # Consent is the basis of these uses; billing under a contract or the accounting law holds no consent to revoke.
    Action.revoke_consent: ("marketing", "personalize", "analytics", "third_party_sharing"),
}


class IdentifierType(StrEnum):
    """Identifier types a system can search by."""

    email = "email"
    phone = "phone"
    customer_id = "customer_id"
    user_id = "user_id"
    national_id = "national_id"
    cookie_id = "cookie_id"  # Law 91/2025 Art 29: tracking by cookie and device identifiers
    device_id = "device_id"


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
    pending = "pending"  # planned, not sent yet
    dispatched = "dispatched"  # sent to the system's worker, no final receipt yet
    succeeded = "succeeded"
    not_found = "not_found"
    retained = "retained"  # done, and some data kept with its legal basis
    conflict = "conflict"  # the identifiers point to different people: nothing done, the DPO decides
    refused = "refused"
    failed = "failed"
    stalled = "stalled"  # no receipt after the last attempt (a late receipt still completes it)
    manual = "manual"  # waiting for a person: the system has no worker or cannot do the action
    skipped = "skipped"  # the DPO skipped it, with a reason


TERMINAL_TASK: frozenset[TaskStatus] = frozenset({
    TaskStatus.succeeded, TaskStatus.not_found, TaskStatus.retained, TaskStatus.conflict, TaskStatus.refused,
    TaskStatus.failed, TaskStatus.skipped,
})


class ReceiptStatus(StrEnum):
    """What a worker reports for one attempt of a task."""

    succeeded = "succeeded"
    not_found = "not_found"
    retained = "retained"
    conflict = "conflict"
    refused = "refused"
    failed = "failed"


#: Rectification: the short field names a request may use for its corrections, and the fideslang
#: category each belongs to. A correction goes only to the systems that declare its category;
#: a request may also name the category itself. Tasks carry the names the request used.
CHANGE_FIELDS: dict[str, str] = {
    "name": "user.name",
    "email": "user.contact.email",
    "phone": "user.contact.phone_number",
    "address": "user.contact.address",
    "date_of_birth": "user.demographic.date_of_birth",
}


def change_category(field: str) -> str | None:
    """The fideslang category of a correction's field name (``"address"`` or
    ``"user.contact.address"``), or None for a name dsrflow does not know."""
    if field in CHANGE_FIELDS:
        return CHANGE_FIELDS[field]
    return field if field.startswith("user.") else None


def parse_date_of_birth(raw: str) -> date:
    """A corrected date of birth: ISO (``1990-03-14``) or the Vietnamese way (``14/03/1990``),
    between 1900 and today. Raises ValueError (without the value: it is personal data)."""
    text = raw.strip()
    try:
        if re.fullmatch(r"\d{1,2}/\d{1,2}/\d{4}", text):
            d, m, y = (int(x) for x in text.split("/"))
            value = date(y, m, d)
        else:
            value = date.fromisoformat(text)
    except ValueError:
        raise ValueError("not a date (YYYY-MM-DD or DD/MM/YYYY)") from None
    if not date(1900, 1, 1) <= value <= date.today():
        raise ValueError("not a plausible date of birth")
    return value


def parse_text(raw: str) -> str:
    """A corrected free-text value (an address line, a city): its words, single-spaced; never empty."""
    text = " ".join(raw.split())
    if not text:
        raise ValueError("it cannot be empty")
    return text
