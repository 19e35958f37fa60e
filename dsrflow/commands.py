"""The DPO's decisions as command payloads: what the ``cmd`` claim of a command token holds
(see :mod:`dsrflow.auth`), whether it comes from the CLI or as a command event on a topic.

A command is a JSON object whose ``decision`` names it::

    {"decision": "deny", "case_id": "…", "ground": "harms_others", "reason": "…"}

It carries no ``by``: who decided is the actor the token's key belongs to. :data:`ROLES_FOR`
says which roles may make each decision. Free text (reason, note, why) is told to the subject or
kept on the case: 1 to 2000 characters once trimmed, and no personal data.
"""

from __future__ import annotations

from datetime import date
from enum import StrEnum
from typing import Annotated, Any, Literal
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, TypeAdapter, ValidationError, model_validator

from .auth import Role
from .errors import DsrflowError, validation_summary
from .events import RightsRequested, SystemName, Text64, Text128
from .rights import IdentifierType

__all__ = [
    "ROLES_FOR",
    "ApproveSystem",
    "Command",
    "CommandError",
    "CompleteTask",
    "DeclineTask",
    "Decision",
    "Deny",
    "Extend",
    "Hold",
    "Lift",
    "NotAllowed",
    "OpenCase",
    "ReassignTask",
    "RefuseSystem",
    "Release",
    "RetryTask",
    "SkipTask",
    "Verify",
    "allowed",
    "check_role",
    "command_json_schema",
    "parse_command",
]

#: Free text: trimmed, 1 to 2000 characters. No personal data.
Text2000 = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=2000)]
#: A denial ground's name in the case's jurisdiction data file (dsrflow/policy/jurisdictions).
Ground = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]{0,63}$")]


class Decision(StrEnum):
    verify = "verify"
    deny = "deny"
    extend = "extend"
    hold = "hold"
    release = "release"
    lift = "lift"
    retry_task = "retry_task"
    skip_task = "skip_task"
    reassign_task = "reassign_task"
    complete_task = "complete_task"
    decline_task = "decline_task"
    open_case = "open_case"
    offboard = "offboard"
    approve_system = "approve_system"
    refuse_system = "refuse_system"


_DPO = frozenset({Role.dpo})
_TASK_WORK = frozenset({Role.dpo, Role.operator})
_ADMIN = frozenset({Role.admin})

#: Which roles may make each decision: a DPO every one on cases; an operator only carries out
#: tasks (retry, complete, decline); an admin manages actors, keys and systems (approves what a
#: worker announced), and decides nothing on a case.
ROLES_FOR: dict[Decision, frozenset[Role]] = {
    Decision.verify: _DPO,
    Decision.deny: _DPO,
    Decision.extend: _DPO,
    Decision.hold: _DPO,
    Decision.release: _DPO,
    Decision.lift: _DPO,
    Decision.retry_task: _TASK_WORK,
    Decision.skip_task: _DPO,
    Decision.reassign_task: _DPO,
    Decision.complete_task: _TASK_WORK,
    Decision.decline_task: _TASK_WORK,
    Decision.open_case: _DPO,
    Decision.offboard: _DPO,
    Decision.approve_system: _ADMIN,
    Decision.refuse_system: _ADMIN,
}


class CommandError(DsrflowError):
    """A command that is not one: unknown decision, a missing or invalid field. One line, without
    the values given (they may hold personal data)."""


class NotAllowed(CommandError):
    """The actor's role may not make this decision."""

    def __init__(self, role: Role | str, decision: Decision | str) -> None:
        self.role = role
        self.decision = decision
        super().__init__(f"the role {role} may not make the decision {decision}")


class _Command(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)


class _OnCase(_Command):
    case_id: UUID


class _OnTask(_OnCase):
    task_id: UUID = Field(description="a task of the case")


class Verify(_OnCase):
    """The subject's identity (and any representative's authority) was verified: fan the case out."""

    decision: Literal["verify"]
    identifiers: list[IdentifierType] | None = Field(
        default=None, min_length=1,
        description="the identifier types that were verified; absent: every one the request gave")
    method: Text64 = Field(description="how: email_link, sms_otp, account_login, id_document, in_person, ...")

    @model_validator(mode="after")
    def _distinct(self) -> Verify:
        if self.identifiers is not None and len(set(self.identifiers)) != len(self.identifiers):
            raise ValueError("identifiers lists a type more than once")
        return self


class Deny(_OnCase):
    """Refuse the request on a ground of the case's jurisdiction, with reasons (the subject is told them)."""

    decision: Literal["deny"]
    ground: Ground = Field(description="a denial ground of the case's jurisdiction data file")
    reason: Text2000


class Extend(_OnCase):
    """The one extension of the deadline the law allows, with reasons (the subject is told them)."""

    decision: Literal["extend"]
    reason: Text2000
    until: date | None = Field(
        default=None, description="the new due date, in the case's jurisdiction; absent: the latest the law allows")


class Hold(_OnCase):
    """Put an open case on hold."""

    decision: Literal["hold"]
    kind: Literal["legal_hold", "suspected_fraud"]
    reason: Text2000


class Release(_OnCase):
    """End a hold: the case goes on where it stopped."""

    decision: Literal["release"]


class Lift(_OnCase):
    """Lift the restriction (or objection) a case put in place."""

    decision: Literal["lift"]


class RetryTask(_OnTask):
    """Send a stalled, failed or conflicting task again."""

    decision: Literal["retry_task"]


class SkipTask(_OnTask):
    """Skip an open task, with a reason."""

    decision: Literal["skip_task"]
    reason: Text2000


class ReassignTask(_OnTask):
    """Give a task to another system (``to_system``) or to a person (``to_person``): exactly one."""

    decision: Literal["reassign_task"]
    to_system: SystemName | None = None
    to_person: Text128 | None = Field(default=None, description="the person who carries the task out, by role or name")
    reason: Text2000

    @model_validator(mode="after")
    def _one_target(self) -> ReassignTask:
        if (self.to_system is None) == (self.to_person is None):
            raise ValueError("give exactly one of to_system and to_person")
        return self


class CompleteTask(_OnTask):
    """A person carried out a manual task: done (``succeeded``), or the system holds nothing (``not_found``)."""

    decision: Literal["complete_task"]
    resolution: Literal["succeeded", "not_found"]
    note: Text2000 = Field(description="what was done (no personal data)")


class DeclineTask(_OnTask):
    """A person declines a manual task, saying why."""

    decision: Literal["decline_task"]
    note: Text2000 = Field(description="why not (no personal data)")


class OpenCase(_Command):
    """Open a case with no request from the subject behind it (an under-16 account, data whose
    retention ran out, a client company leaving). The request's identifiers count as verified by
    the actor."""

    decision: Literal["open_case"]
    request: RightsRequested
    why: Text2000 = Field(description="why the case is opened (no personal data)")


class Offboard(_Command):
    """A client company (a controller) leaves the processor that runs dsrflow: hand over, or
    delete, all of its data in every system it has (a hosting provider's promise)."""

    decision: Literal["offboard"]
    controller: Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_-]{0,62}$")] = Field(
        description="the client company's controller (tenant) name")
    mode: Literal["handover", "delete"]
    why: Text2000 = Field(description="why, e.g. the contract's end (no personal data)")


class ApproveSystem(_Command):
    """Put in force the declaration a system's worker announced (a new system, or a changed one),
    named by its digest as ``dsrflow systems pending`` shows it: one that changed since is refused."""

    decision: Literal["approve_system"]
    system: SystemName
    digest: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]


class RefuseSystem(_Command):
    """Refuse the declaration a system's worker announced: the one in force (if any) stays, and the
    worker's announcements of this declaration stay refused until it announces another."""

    decision: Literal["refuse_system"]
    system: SystemName
    digest: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
    reason: Text2000 = Field(description="why (no personal data); shown to whoever runs the worker")


Command = Annotated[
    Verify | Deny | Extend | Hold | Release | Lift | RetryTask | SkipTask | ReassignTask | CompleteTask
    | DeclineTask | OpenCase | Offboard | ApproveSystem | RefuseSystem,
    Field(discriminator="decision"),
]

_ADAPTER: TypeAdapter[Command] = TypeAdapter(Command)


def _label(loc: tuple[Any, ...]) -> str:
    # the union's tag leads each error's location ("deny.reason"): the decision is already known
    return ".".join(str(p) for p in loc[1:]) if loc and loc[0] in Decision.__members__ else ".".join(map(str, loc))


def parse_command(cmd: object) -> Command:
    """Validate a command object (the ``cmd`` claim). Raises :class:`CommandError` in one line
    that names the fields, never their values."""
    if not isinstance(cmd, dict):
        raise CommandError("a command is a JSON object")
    decision = cmd.get("decision")
    if decision not in Decision.__members__:
        raise CommandError(f"a command's decision is one of {', '.join(Decision)}")
    try:
        return _ADAPTER.validate_python(cmd)
    except ValidationError as exc:
        raise CommandError(f"invalid {decision} command: {validation_summary(exc, _label)}") from None


def allowed(role: Role | str, decision: Decision | str) -> bool:
    """Whether ``role`` may make ``decision``."""
    try:
        return Role(role) in ROLES_FOR[Decision(decision)]
    except ValueError:
        return False


def check_role(role: Role | str, command: Command) -> None:
    """Raise :class:`NotAllowed` unless ``role`` may make ``command``'s decision."""
    if not allowed(role, command.decision):
        raise NotAllowed(role, command.decision)


def command_json_schema() -> dict[str, Any]:
    """The JSON Schema of a command (the ``cmd`` claim), for topics/schemas/."""
    schema: dict[str, Any] = _ADAPTER.json_schema(mode="validation")
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://dsrflow.dev/schemas/Command.v1.json",
        "title": "Command",
        "description": "A DPO's decision: the 'cmd' claim of a command token, a JWT signed with EdDSA (Ed25519) "
        "whose header 'kid' is the actor's key id and whose claims are iss (the actor), aud 'dsrflow', jti (the "
        "command id, a UUID), iat and exp (at most 600 s later). Who decided is the actor the key belongs to.",
        **schema,
    }
