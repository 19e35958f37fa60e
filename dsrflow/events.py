"""Event models (v1) carried on dsrflow's topics.

Each model is the ``data`` of a CloudEvents 1.0 event in Kafka binary mode
(see :mod:`dsrflow.codec`). Versions only grow by optional fields; a breaking
change is a new topic version. The JSON Schemas in ``topics/schemas/`` are
generated from these models (``dsrflow topics schemas``).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, ClassVar
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator, model_validator

from .rights import Action, IdentifierType, ReceiptStatus, Right

Identifier = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=320)]
Token = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")]
SystemName = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_-]{0,62}$")]
Sha256 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]


class Event(BaseModel):
    """Base of every event: strict about unknown fields, so a typo is an error, not lost data."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: CloudEvents ``type`` of this event.
    ce_type: ClassVar[str]


class Subject(BaseModel):
    """Who the request is about: identifiers as submitted (personal data)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    identifiers: dict[IdentifierType, Identifier] = Field(
        description="identifier type -> value, e.g. {'email': 'an.nguyen@example.vn'}",
        min_length=1,
    )

    @field_validator("identifiers")
    @classmethod
    def _normalise(cls, v: dict[IdentifierType, str]) -> dict[IdentifierType, str]:
        out = dict(v)
        if IdentifierType.email in out:
            out[IdentifierType.email] = out[IdentifierType.email].lower()
            if "@" not in out[IdentifierType.email]:
                raise ValueError("email identifier must contain '@'")
        if IdentifierType.phone in out:
            phone = "".join(ch for ch in out[IdentifierType.phone] if ch.isdigit() or ch == "+")
            if len(phone.lstrip("+")) < 8:
                raise ValueError("phone identifier must have at least 8 digits")
            out[IdentifierType.phone] = phone
        return out


class RightsRequested(Event):
    """A data subject exercised a right. Topic ``dsr.requests.v1``, key: request_id."""

    ce_type: ClassVar[str] = "dsrflow.rights.requested.v1"

    request_id: Token = Field(description="the caller's id for this request; the dedupe key")
    right: Right
    subject: Subject
    jurisdiction: Annotated[str, StringConstraints(pattern=r"^[A-Z]{2}(-[A-Z0-9]{1,3})?$")] = "VN"
    received_at: datetime | None = Field(
        default=None, description="when the organisation received the request; default: event time"
    )
    verified: bool = Field(default=False, description="the subject's identity was verified upstream")
    channel: str | None = Field(default=None, max_length=64, description="privacy_centre, support_desk, ...")
    changes: dict[str, str] | None = Field(
        default=None, description="rectification only: field -> corrected value"
    )
    purposes: list[str] | None = Field(default=None, description="objection / consent withdrawal: purposes")

    @model_validator(mode="after")
    def _changes_only_for_rectification(self) -> RightsRequested:
        if self.right == Right.rectification and not self.changes:
            raise ValueError("a rectification request needs 'changes'")
        if self.right != Right.rectification and self.changes:
            raise ValueError("'changes' is only allowed for rectification")
        return self


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


class CaseUpdated(Event):
    """A case's state. Topic ``dsr.cases.v1`` (compacted), key: case_id. No personal data."""

    ce_type: ClassVar[str] = "dsrflow.case.updated.v1"

    case_id: UUID
    request_id: Token
    right: Right
    status: str
    jurisdiction: str
    received_at: datetime
    due_at: datetime
    updated_at: datetime
    tasks: dict[str, str] = Field(default_factory=dict, description="system -> task status")
    bundle: Artifact | None = None


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


EVENT_TYPES: dict[str, type[Event]] = {
    m.ce_type: m for m in (RightsRequested, TaskAssigned, TaskReceipt, CaseUpdated, DeadLetter)
}
