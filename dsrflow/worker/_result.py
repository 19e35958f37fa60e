"""What a handler returns, and the errors it may raise.

What can go wrong in a handler::

    Exception
    ├── TaskError             the handler's own failure; its message goes into the receipt
    │   ├── RetryableError    transient (database down, lock timeout): failed, retryable;
    │   │                     the coordinator sends the task again later
    │   └── PermanentError    will fail the same way every time (the record is malformed, the
    │                         action is not possible here): failed, not retryable
    └── anything else         a bug or an unexpected library error: reported as failed by class
                              name and location only, because its message may hold personal
                              data; retryable if it is one of the worker's ``retry_on``
                              (connection errors, timeouts, deadlocks... by default), else not

A plain ``TaskError`` is permanent too; ``PermanentError`` says so where it is raised. A message
is redacted before it is sent (the task's identifiers and corrected values are replaced), but it
should hold no personal data to begin with.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from ..errors import DsrflowError
from ..events import Artifact, RetainedItem
from ..rights import ReceiptStatus


class TaskError(DsrflowError):
    """A failure the handler reports on purpose. The message must not contain personal data:
    it is sent to the coordinator and shown to the DPO."""

    retryable: bool = False


class RetryableError(TaskError):
    """A transient failure: the receipt says ``failed`` with ``retryable=True`` and the
    coordinator schedules another attempt."""

    retryable = True


class PermanentError(TaskError):
    """A failure that trying again would repeat: the receipt says ``failed`` with
    ``retryable=False``; the coordinator does not try again, and the DPO sees the task failed
    with this message."""

    retryable = False


@dataclass(frozen=True, slots=True)
class Result:
    """The outcome of one task attempt. Build it with the constructors, e.g. ``Result.succeeded()``."""

    status: ReceiptStatus
    counts: Mapping[str, int] = field(default_factory=dict)
    categories: tuple[str, ...] = ()
    retained_items: tuple[RetainedItem, ...] = ()
    artifacts: tuple[Artifact, ...] = ()
    reason: str | None = None
    retryable: bool = False

    def __post_init__(self) -> None:
        for name, value in self.counts.items():
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"count {name!r} must be a non-negative int")

    @classmethod
    def succeeded(
        cls,
        *,
        counts: Mapping[str, int] | None = None,
        categories: Iterable[str] = (),
        artifacts: Iterable[Artifact] = (),
    ) -> Result:
        """The action was carried out in full."""
        return cls(
            ReceiptStatus.succeeded,
            counts=dict(counts or {}),
            categories=tuple(categories),
            artifacts=tuple(artifacts),
        )

    @classmethod
    def not_found(cls, *, counts: Mapping[str, int] | None = None) -> Result:
        """The system holds nothing about the subject (also the answer to a repeated erase)."""
        return cls(ReceiptStatus.not_found, counts=dict(counts or {}))

    @classmethod
    def retained(
        cls,
        retained: Iterable[RetainedItem],
        *,
        counts: Mapping[str, int] | None = None,
        categories: Iterable[str] = (),
        artifacts: Iterable[Artifact] = (),
    ) -> Result:
        """Erased what may be erased; kept the listed items because the law requires it."""
        items = tuple(retained)
        if not items:
            raise ValueError("Result.retained needs at least one RetainedItem")
        return cls(
            ReceiptStatus.retained,
            counts=dict(counts or {}),
            categories=tuple(categories),
            retained_items=items,
            artifacts=tuple(artifacts),
        )

    @classmethod
    def conflict(cls, reason: str = "the task's identifiers point to different people; nothing was done") -> Result:
        """The task's identifiers point to different people (see :func:`dsrflow.identity.match_subject`):
        nothing was exported, erased or changed, and the DPO decides. No personal data in ``reason``;
        ``SubjectMatch.reason()`` gives one."""
        return cls(ReceiptStatus.conflict, reason=reason)

    @classmethod
    def refused(cls, reason: str) -> Result:
        """The system will not perform this action (unsupported, not allowed). No personal data in
        ``reason``."""
        return cls(ReceiptStatus.refused, reason=reason)

    @classmethod
    def failed(cls, reason: str, *, retryable: bool = False) -> Result:
        """The action could not be completed. No personal data in ``reason``."""
        return cls(ReceiptStatus.failed, reason=reason, retryable=retryable)
