"""Event models (v1) carried on dsrflow's topics.

Each model is the ``data`` of a CloudEvents 1.0 event in Kafka binary mode
(see :mod:`dsrflow.codec`). Versions only grow by optional fields; a breaking
change is a new topic version. The JSON Schemas in ``topics/schemas/`` are
generated from these models (``dsrflow topics schemas``).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, ClassVar, Literal
from uuid import UUID

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationInfo,
    field_validator,
    model_validator,
)

from . import identity
from .rights import Action, CaseStatus, IdentifierType, ReceiptStatus, Right, TaskStatus

Identifier = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=320)]
Token = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")]
SystemName = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_-]{0,62}$")]
Sha256 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
Jurisdiction = Annotated[str, StringConstraints(pattern=r"^[A-Z]{2}(-[A-Z0-9]{1,3})?$")]
#: a controller (tenant): the organisation a case, system and export belong to (docs/tenants.md)
Controller = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_-]{0,62}$")]
DEFAULT_CONTROLLER = "default"

# trimmed, non-empty strings of at most so many characters
Text64 = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=64)]
Text128 = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=128)]
Text200 = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200)]


class Event(BaseModel):
    """Base of every event: strict about unknown fields, so a typo is an error, not lost data."""

    #: hide_input_in_errors: a ValidationError's text never shows the offending value (personal data)
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    #: CloudEvents ``type`` of this event.
    ce_type: ClassVar[str]


class Subject(BaseModel):
    """Who the request is about: identifiers (personal data), each in its normal form (see
    dsrflow.identity): email trimmed and lower-cased, phone in E.164, other types trimmed.

    A phone written the local way (0912 345 678) is read in the region of the request's
    jurisdiction. A Subject validated on its own, not as part of a request, reads it in Vietnam.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    identifiers: dict[IdentifierType, Identifier] = Field(
        description="identifier type -> value, e.g. {'email': 'an.nguyen@example.vn'}; a phone is read in the "
        "region of the request's jurisdiction unless it starts with +country code",
        min_length=1,
    )

    @field_validator("identifiers")
    @classmethod
    def _normalise(cls, v: dict[IdentifierType, str], info: ValidationInfo) -> dict[IdentifierType, str]:
        # identity raises ValueError without the value (it is personal data). The region comes from
        # the request's jurisdiction when RightsRequested validates this subject (its context).
        context = info.context if isinstance(info.context, dict) else {}
        region = context.get("region", identity.DEFAULT_REGION)
        return {kind: identity.normalise_lenient(kind, value, region=region) for kind, value in v.items()}


class IdentifierVerification(BaseModel):
    """How one of the subject's identifiers was verified (no identifier value: only its type)."""

    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    identifier: IdentifierType = Field(description="the type of the subject's identifier that was verified")
    method: Text64 = Field(description="how: email_link, sms_otp, account_login, id_document, in_person, ...")
    verified_by: Text128 | None = Field(default=None, description="who or which system verified it")
    verified_at: datetime | None = None


class Requester(BaseModel):
    """Who made the request when it is not (only) the subject: an authorised agent, a parent or
    guardian. Personal data of the representative."""

    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    relationship: Literal["self", "authorised_agent", "parent_guardian"]
    name: Text200 | None = None
    contact: Identifier | None = Field(default=None, description="the representative's email or phone")
    verified: bool = Field(
        default=False, description="the representative's identity AND their authority to act were checked"
    )
    evidence: Text200 | None = Field(
        default=None, description="what proves the authority, e.g. power_of_attorney, birth_certificate"
    )
    verified_by: Text128 | None = Field(default=None, description="who or which system checked the representative")


class RightsRequested(Event):
    """A data subject exercised a right. Topic ``dsr.requests.v1``, key: request_id."""

    ce_type: ClassVar[str] = "dsrflow.rights.requested.v1"

    request_id: Token = Field(description="the caller's id for this request; the dedupe key")
    right: Right
    subject: Subject
    jurisdiction: Jurisdiction = "VN"
    received_at: datetime | None = Field(
        default=None, description="when the organisation received the request; default: event time"
    )
    verified: bool = Field(
        default=False,
        description="legacy: the upstream app verified the subject's identity, which counts as every identifier "
        "verified; ignored when 'verification' is given",
    )
    channel: str | None = Field(default=None, max_length=64, description="privacy_centre, support_desk, ...")
    changes: dict[str, str] | None = Field(
        default=None, description="rectification only: field -> corrected value"
    )
    purposes: list[str] | None = Field(default=None, description="objection / consent withdrawal: purposes")
    verification: list[IdentifierVerification] | None = Field(
        default=None,
        description="which of the subject's identifiers were verified, each on its own (at most one entry per "
        "identifier type, each present in subject.identifiers). When given, only the types listed count as "
        "verified, whatever 'verified' says: verified=true with some types listed verifies only those, and an "
        "empty list verifies none",
    )
    requester: Requester | None = Field(
        default=None,
        description="who made the request on the subject's behalf (authorised agent, parent or guardian); "
        "absent: the subject themself",
    )
    controller: Controller = Field(
        default=DEFAULT_CONTROLLER,
        description="the controller (tenant) the request is made to; only its own systems are asked",
    )

    @model_validator(mode="before")
    @classmethod
    def _phone_in_jurisdiction(cls, data: Any) -> Any:
        """Read a local phone number (no ``+``) in the region of the request's jurisdiction, before
        Subject (which would read it in Vietnam) sees it."""
        if not isinstance(data, dict):
            return data
        subject = data.get("subject")
        if not isinstance(subject, dict) or not isinstance(subject.get("identifiers"), dict):
            return data  # a Subject instance is already normalised (in Vietnam, see Subject)
        jurisdiction = data.get("jurisdiction", "VN")
        if not isinstance(jurisdiction, str):
            return data  # left to field validation
        region = identity.region_of(jurisdiction)
        phone = next((v for k, v in subject["identifiers"].items() if k == IdentifierType.phone), None)
        if region is None and isinstance(phone, str) and not phone.strip().startswith(("+", "00")):
            try:
                identity.normalise_lenient(IdentifierType.phone, phone, region=None)
            except ValueError:
                raise ValueError(
                    f"phone identifier has no +country code, and jurisdiction {jurisdiction} spans several "
                    "countries, so it cannot be read as a local number: give it as +<country code><number>"
                ) from None
        # Validated here, in the jurisdiction's region; the instance is taken as it is.
        return {**data, "subject": Subject.model_validate(subject, context={"region": region})}

    @model_validator(mode="after")
    def _check(self) -> RightsRequested:
        if self.right == Right.rectification and not self.changes:
            raise ValueError("a rectification request needs 'changes'")
        if self.right != Right.rectification and self.changes:
            raise ValueError("'changes' is only allowed for rectification")
        if self.verification:
            seen: set[IdentifierType] = set()
            for v in self.verification:
                if v.identifier not in self.subject.identifiers:
                    raise ValueError(f"verification lists {v.identifier}, which is not among the subject's identifiers")
                if v.identifier in seen:
                    raise ValueError(f"verification lists {v.identifier} more than once")
                seen.add(v.identifier)
        return self

    def verified_types(self) -> frozenset[IdentifierType]:
        """The identifier types that were verified: those ``verification`` lists when it is given;
        else, for the legacy ``verified=true``, every identifier of the subject (the upstream app
        vouched for the whole request); else none."""
        if self.verification is not None:
            return frozenset(v.identifier for v in self.verification)
        if self.verified:
            return frozenset(self.subject.identifiers)
        return frozenset()

    def verification_record(self) -> list[dict[str, Any]]:
        """What to store on the case: one JSON-ready entry ``{identifier, method, verified_by,
        verified_at}`` per verified identifier. The legacy ``verified=true`` gives one entry per
        identifier of the subject, with method ``upstream`` and no verifier or time."""
        if self.verification is not None:
            return [v.model_dump(mode="json") for v in self.verification]
        if self.verified:
            return [
                IdentifierVerification(identifier=kind, method="upstream").model_dump(mode="json")
                for kind in sorted(self.subject.identifiers)
            ]
        return []

    def representative_unverified(self) -> bool:
        """A representative (not the subject themself) made the request, and their identity and
        authority have not been checked."""
        r = self.requester
        return r is not None and r.relationship != "self" and not r.verified


class TaskAssigned(Event):
    """Work for one system. Topic ``dsr.tasks.<system>.v1``, key: case_id.

    Carries only the identifier types that system searches by.
    """

    ce_type: ClassVar[str] = "dsrflow.task.assigned.v1"

    task_id: UUID
    case_id: UUID
    system: SystemName
    action: Action
    right: Right
    attempt: int = Field(ge=1)
    identifiers: dict[IdentifierType, Identifier]
    due_at: datetime
    changes: dict[str, str] | None = None
    purposes: list[str] | None = None
    jurisdiction: str | None = Field(
        default=None, description="the case's jurisdiction: the region a system's locally written phones are read in")
    controller: Controller = Field(default=DEFAULT_CONTROLLER, description="the case's controller (tenant)")
    scope: Literal["subject", "controller"] = Field(
        default="subject",
        description="subject: the records of the person the identifiers name; controller: all of the controller's "
        "data the system holds (a client company leaving: export_all, erase_all), with no identifiers")


class Artifact(BaseModel):
    """A claim check: an export written to the export store, never carried on Kafka."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ref: Annotated[str, StringConstraints(min_length=1, max_length=1024)] = Field(
        description="key in the export store"
    )
    sha256: Sha256
    size: int = Field(ge=0)
    records: int = Field(ge=0)
    media_type: str = "application/json"


class RetainedItem(BaseModel):
    """Data kept although erasure was asked, with the law that requires it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    category: str = Field(description="fideslang data category, e.g. user.financial")
    records: int = Field(ge=0)
    legal_basis: str = Field(min_length=1, description="the provision that requires retention")
    retain_until: datetime | None = None


class TaskReceipt(Event):
    """A worker's report on one attempt of a task. Topic ``dsr.receipts.v1``, key: case_id.

    No personal data: outcome, counts, categories, artifact refs and checksums.
    """

    ce_type: ClassVar[str] = "dsrflow.task.receipt.v1"

    task_id: UUID
    case_id: UUID
    system: SystemName
    attempt: int = Field(ge=1)
    status: ReceiptStatus
    retryable: bool = False
    counts: dict[str, int] = Field(default_factory=dict, description="e.g. located, erased, anonymised")
    categories: list[str] = Field(default_factory=list)
    retained: list[RetainedItem] = Field(default_factory=list)
    artifacts: list[Artifact] = Field(default_factory=list)
    error: str | None = Field(default=None, max_length=2000, description="no personal data")
    completed_at: datetime
    receipt_id: UUID | None = Field(
        default=None, description="random, made when the attempt finished, kept with the receipt in the worker's task "
        "ledger: the CloudEvents id the receipt is sent with, every time (so a re-sent receipt is the same event and "
        "no one can guess the id of one not yet sent)")

    @field_validator("error", mode="before")
    @classmethod
    def _no_nul(cls, v: Any) -> Any:
        """PostgreSQL stores no NUL character, in text or jsonb: one in a handler's error text would
        make the receipt unstorable (in the worker's ledger and the case store) and its batch stuck."""
        return v.replace("\x00", "") if isinstance(v, str) else v


class TaskProgress(Event):
    """A worker's word that a long task is still running: how far it got. Topic ``dsr.receipts.v1``
    (beside the receipts, so it is ordered before its task's receipt), key: case_id. Not a result:
    the coordinator records it on the task and waits longer before it sends the task again.

    No personal data: counts and a short note."""

    ce_type: ClassVar[str] = "dsrflow.task.progress.v1"

    task_id: UUID
    case_id: UUID
    system: SystemName
    attempt: int = Field(ge=1)
    seq: int = Field(ge=1, description="1, 2, 3... per run of an attempt (a worker that takes the task over after "
                     "a restart counts from 1 again); the coordinator keeps the latest report it got")
    done: int | None = Field(default=None, ge=0, description="units of work done so far (records, tables...)")
    total: int | None = Field(default=None, ge=0, description="units of work in all, when known")
    note: str | None = Field(default=None, max_length=200, description="what it is doing; no personal data")
    at: datetime

    @field_validator("note", mode="before")
    @classmethod
    def _no_nul(cls, v: Any) -> Any:
        return v.replace("\x00", "") if isinstance(v, str) else v


class CaseUpdated(Event):
    """A case's state. Topic ``dsr.cases.v1`` (compacted), key: case_id. No personal data."""

    ce_type: ClassVar[str] = "dsrflow.case.updated.v1"

    case_id: UUID
    request_id: Token
    right: Right
    status: CaseStatus
    jurisdiction: str
    received_at: datetime
    due_at: datetime
    updated_at: datetime
    tasks: dict[str, TaskStatus] = Field(
        default_factory=dict, description="system (or system:lift_restriction) -> task status")
    bundle: Artifact | None = None
    timeline_length: int | None = Field(default=None, ge=0, description="entries in the case's hash-chained timeline")
    timeline_head: Sha256 | None = Field(
        default=None, description="hash of the timeline's last entry: an anchor outside the case store")
    controller: Controller = Field(default=DEFAULT_CONTROLLER, description="the case's controller (tenant)")
    target_at: datetime | None = Field(default=None, description="the organisation's internal target, before due_at")
    overdue: bool = Field(default=False, description="still open after its due date")


class DeadLetter(Event):
    """Why an event was dead-lettered. Sent as ``dlq_*`` headers beside the original bytes
    on ``dsr.deadletter.v1`` (key: the original key), so nothing of the original is lost."""

    ce_type: ClassVar[str] = "dsrflow.deadletter.v1"

    original_topic: str
    original_partition: int
    original_offset: int
    consumer: str
    error_type: str
    error: str = Field(max_length=4000)
    failed_at: datetime


class NoticeSystem(BaseModel):
    """What one system did for a finished case, as the subject is told it: no personal data."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    system: str
    action: Action
    status: TaskStatus
    counts: dict[str, int] = Field(default_factory=dict)


class NoticeRetained(BaseModel):
    """Data kept although the request asked otherwise, and the law that made us keep it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    system: str
    category: str
    records: int = Field(ge=0)
    legal_basis: str
    retain_until: datetime | None = None


class NoticeBundle(BaseModel):
    """The access bundle is ready: its checksum and size, never its content or location."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sha256: Sha256
    size: int = Field(ge=0)
    records: int = Field(ge=0)


NoticeKind = Literal["acknowledged", "more_information_needed", "extended", "denied", "completed", "bundle_ready"]


class SubjectNotice(Event):
    """Something the subject is to be told, for a privacy centre to turn into a message.
    Topic ``dsr.notices.v1``, key: case_id.

    It names the request by the privacy centre's own request_id and carries no identifier of the
    subject: the privacy centre knows whom to write to. What each kind carries:

    - acknowledged: the request arrived; ack_due_at, due_at, counting (the law's procedure);
    - more_information_needed: ``needed`` (identity_verification, representative_authority);
    - extended: due_at (new), original_due_at, reasons;
    - denied: ground, basis, reasons;
    - completed: status, systems (what was done), retained (what was kept, on which basis),
      information (for an information request: what the systems declare);
    - bundle_ready: bundle (checksum and size of the access bundle).
    """

    ce_type: ClassVar[str] = "dsrflow.notice.v1"

    notice_id: UUID = Field(description="the same for the same notice sent again: a privacy centre drops repeats by it")
    kind: NoticeKind
    case_id: UUID
    request_id: Token
    controller: Controller = DEFAULT_CONTROLLER
    right: Right
    jurisdiction: str
    at: datetime
    due_at: datetime
    ack_due_at: datetime | None = None
    original_due_at: datetime | None = None
    acknowledged_on_time: bool | None = None
    basis: str | None = Field(default=None, description="the law behind the deadline (acknowledged) or the denial")
    needed: list[str] | None = None
    reasons: str | None = Field(default=None, max_length=2000, description="the DPO's reasons (extended, denied)")
    ground: str | None = None
    status: CaseStatus | None = None
    systems: list[NoticeSystem] | None = None
    retained: list[NoticeRetained] | None = None
    information: dict[str, Any] | None = None
    bundle: NoticeBundle | None = None


AlertKind = Literal["deadline_warning", "target_passed", "deadline_overdue", "task_stalled"]


class CaseAlert(Event):
    """Something the DPO must look at: a deadline near or passed, a task that will not answer.
    Topic ``dsr.alerts.v1``, key: case_id. No personal data."""

    ce_type: ClassVar[str] = "dsrflow.case.alert.v1"

    alert_id: UUID = Field(description="stable per case, kind (and task): tools drop repeats by it")
    kind: AlertKind
    case_id: UUID
    request_id: Token
    controller: Controller = DEFAULT_CONTROLLER
    right: Right
    status: CaseStatus
    jurisdiction: str
    at: datetime
    due_at: datetime
    target_at: datetime | None = None
    share_used: float | None = Field(default=None, description="share of the time from receipt to due_at gone")
    system: str | None = None
    task_id: UUID | None = None
    attempts: int | None = None


class DecisionCommand(Event):
    """A decision of the DPO (or an operator), sent by a tool in any language.
    Topic ``dsr.commands.v1``, key: case_id (or request_id for open_case).

    ``token`` is a JWT (RFC 7519) signed with EdDSA by a key registered for an actor
    (``dsrflow actors``); its ``cmd`` claim holds the decision (dsrflow.commands), its ``iss`` the
    actor, its ``jti`` the command id. Who decided is the key's actor, never a name in the command.
    """

    ce_type: ClassVar[str] = "dsrflow.command.v1"

    token: Annotated[str, StringConstraints(min_length=16, max_length=65536)]


class CommandResult(Event):
    """What became of a command: applied, or refused and why. Topic ``dsr.command-results.v1``,
    key: command id. No personal data."""

    ce_type: ClassVar[str] = "dsrflow.command.result.v1"

    command_id: str = Field(max_length=128, description="the token's jti; the CloudEvent id when it had none")
    controller: str | None = Field(default=None, max_length=64,
                                   description="the actor's controller (tenant), once known")
    accepted: bool
    decision: str | None = None
    actor: str | None = Field(default=None, description="the key's actor, once the token verified")
    case_id: UUID | None = None
    case_status: CaseStatus | None = None
    error_type: str | None = None
    error: str | None = Field(default=None, max_length=2000)
    at: datetime


class SubjectSuppressed(Event):
    """One identifier of a person whose erasure completed, as a keyed hash: the suppression list
    ingestion pipelines check before they import someone (dsrflow.suppression). Topic
    ``dsr.suppressions.v1`` (compacted), key: the hash. No readable identifier: the hash is
    HMAC-SHA256 under a managed key of ``<identifier_type>:<identifier in normal form>``."""

    ce_type: ClassVar[str] = "dsrflow.subject.suppressed.v1"

    hash: Sha256 = Field(description="hex HMAC-SHA256 of '<identifier_type>:<normal form>' under the key key_id")
    identifier_type: IdentifierType
    key_id: Token = Field(description="the managed key the hash was made with")
    controller: Controller = Field(default=DEFAULT_CONTROLLER, description="the erasure case's controller (tenant)")
    case_id: UUID = Field(description="the erasure case")
    erased_at: datetime = Field(description="when the erasure case completed")


EVENT_TYPES: dict[str, type[Event]] = {
    m.ce_type: m for m in (RightsRequested, TaskAssigned, TaskReceipt, TaskProgress, CaseUpdated, DeadLetter,
                           SubjectNotice, CaseAlert, DecisionCommand, CommandResult, SubjectSuppressed)
}
