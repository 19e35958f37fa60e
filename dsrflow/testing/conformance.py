"""The worker contract as a test kit: run it against your own worker, in-process or over Kafka.

Every dsrflow worker keeps the same promises, whatever system it fronts and whatever language it is
written in. This suite checks the ones that can be checked from outside. In-process, through a
Python worker's own handlers (:func:`dsrflow.testing.worker.run_task`), no Kafka::

    import pytest
    from dsrflow.testing.conformance import CHECKS, Conformance

    conformance = Conformance(
        loyalty.worker,
        subject={"email": "lan@example.com", "phone": "+84901234567"},   # someone the test data holds
        other={"email": "hung@example.com", "phone": "+84912345678"},    # someone else it holds
        seed=reset_test_data,       # async, no arguments: (re)creates the test data before every check
    )

    @pytest.mark.parametrize("check", CHECKS)
    async def test_loyalty_keeps_the_worker_contract(check: str) -> None:
        finding = await conformance.check(check)
        assert not finding.failed, finding

    # or all of them at once: raises ConformanceError naming every failed check
    await conformance.assert_conformant()

The checks (:data:`CHECKS`), each on freshly seeded data:

- ``export_finds_subject``: an export of the subject succeeds, with artifacts in the export store
  whose checksums hold, that mention one of the subject's identifiers and none of the other person's;
- ``erase_twice_not_found``: a first erasure reports ``succeeded`` or ``retained`` with real
  (positive) counts and leaves the other person to be found as before; a second erasure says
  ``not_found``;
- ``retained_has_legal_basis``: an erasure that reports ``retained`` gives every item a category
  and a non-blank legal basis (and a ``retain_until`` still to come); a worker that keeps data must
  say so: after the erasure, an export of the subject finds nothing, unless the erasure said
  ``retained``;
- ``conflicting_identifiers``: the subject's email with the other person's phone (two identifier
  types the worker declares, from the two people) give ``conflict`` for an export and an erasure,
  with nothing exported and nothing changed;
- ``redelivery_changes_nothing``: the same TaskAssigned (same task id, same attempt) run twice
  gives an equivalent receipt (an export: the same status, counts and artifact checksums; an
  erasure: the same receipt or ``not_found``) and changes nothing more.

A check needs the actions it exercises; one whose actions the worker does not declare is
``skipped``. "Nothing changed" compares, before and after, the exports of the subject and of the
other person (status and artifact checksums: so an export's content must depend on the data, not on
the task) and, when given, ``snapshot()``: any comparable picture of the system's data (its rows,
say), which also sees changes an export does not show.

How a task is run is the suite's *transport*; the checks are the same over each:

- in-process (``Conformance(worker, ...)``, :class:`InProcessTransport`): the worker runs inside
  its :meth:`~dsrflow.worker.Worker.lifespan` (with ``settings``) for each check, ``seed`` runs in
  it, first, and each task goes straight to its handler;
- over Kafka (``Conformance.over_kafka(declaration, ...)``, :class:`KafkaTransport`): against a
  worker that runs on its own, in any language, consuming its task topic. The suite needs only the
  system's :class:`~dsrflow.registry.SystemDeclaration`, it sends each task as the coordinator
  does (``dsr.tasks.<system>.v1``, key the case id, CloudEvents with source
  ``dsrflow/coordinator``, signed with the coordinator's credential when given) and waits, up to
  ``timeout`` seconds a task, for the receipt that names the task and its attempt on
  ``dsr.receipts.v1`` (read from its end as it was before the task was sent, by an assigned
  consumer that commits nothing; other event types there, such as task progress, are ignored).
  Artifacts are read from ``store`` (default ``LocalExportStore(settings.exports)``: the worker's
  export store, as the suite can reach it). A redelivery is the very same record (same bytes, same
  CloudEvents id) sent twice, so the worker's task ledger is tested too. No receipt in time fails
  the check ("no receipt for export within 30s: is the worker running and consuming
  dsr.tasks.crm.v1?"), as does a receipt of the task that does not decode or is not keyed by its
  case id::

    conformance = Conformance.over_kafka(
        SystemDeclaration.model_validate_json(Path("loyalty.json").read_text()),
        settings=Settings(kafka_bootstrap="localhost:9092", export_dir=Path("/srv/exports")),
        subject=..., other=..., seed=reset_test_data,
        credential=load_credential("coordinator.json"),   # when the worker checks task signatures
        timeout=30,
    )
    await conformance.assert_conformant()

A worker in another language runs the suite from the command line (settings from the ``DSRFLOW_*``
environment: ``DSRFLOW_KAFKA_BOOTSTRAP``, ``DSRFLOW_EXPORT_DIR``, the SASL/TLS ones)::

    python -m dsrflow.testing.conformance --declaration loyalty.toml \
        --subject email=lan@example.com --subject phone=+84901234567 \
        --other email=hung@example.com --other phone=+84912345678 \
        --seed-cmd "./reset-test-data.sh" [--snapshot-cmd "./dump-rows.sh"] \
        [--credential coordinator.json] [--check export_finds_subject ...] [--timeout 30]

It prints one line per check (``<check>: passed|failed|skipped: <why>``) and exits 0 when none
failed, 1 when one did, 2 on bad arguments (see :mod:`dsrflow.testing.conformance_cli`).
``--seed-cmd`` is a shell command run before every check that (re)creates the test data;
``--snapshot-cmd`` one whose output is the snapshot.

``dsrflow.testing.broken`` has workers that break each promise, to see what the suite catches.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal, Protocol

import orjson

from .. import codec, topics
from ..events import TaskAssigned, TaskReceipt
from ..exports.store import ExportStore, LocalExportStore, MemoryExportStore, system_case_prefix
from ..registry import SystemDeclaration
from ..rights import Action, IdentifierType, ReceiptStatus
from ..settings import Settings
from ..signing import sign_headers
from ..worker import Worker
from .worker import make_task, run_task

if TYPE_CHECKING:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

    from ..auth import Credential

__all__ = [
    "CHECKS",
    "CONFLICT",
    "COORDINATOR_SOURCE",
    "DEFAULT_TIMEOUT",
    "ERASE_TWICE",
    "EXPORT",
    "LEGAL_BASIS",
    "REDELIVERY",
    "CheckError",
    "Conformance",
    "ConformanceError",
    "Finding",
    "InProcessTransport",
    "KafkaTransport",
    "Transport",
    "assert_conformant",
]

EXPORT = "export_finds_subject"
ERASE_TWICE = "erase_twice_not_found"
LEGAL_BASIS = "retained_has_legal_basis"
CONFLICT = "conflicting_identifiers"
REDELIVERY = "redelivery_changes_nothing"

#: Every check's name, in the order :meth:`Conformance.run` runs them: parametrize a test with it.
CHECKS: tuple[str, ...] = (EXPORT, ERASE_TWICE, LEGAL_BASIS, CONFLICT, REDELIVERY)

#: The actions each check needs: all of them, or (``any``) at least one.
_NEEDS: dict[str, tuple[Literal["all", "any"], tuple[Action, ...]]] = {
    EXPORT: ("all", (Action.export,)),
    ERASE_TWICE: ("all", (Action.erase,)),
    LEGAL_BASIS: ("all", (Action.erase,)),
    CONFLICT: ("any", (Action.export, Action.erase)),
    REDELIVERY: ("any", (Action.export, Action.erase)),
}

Seed = Callable[[], Awaitable[object]]
Snapshot = Callable[[], Awaitable[object]]
Outcome = Literal["passed", "failed", "skipped"]
_ACTED = (ReceiptStatus.succeeded, ReceiptStatus.retained)


@dataclass(frozen=True, slots=True)
class Finding:
    """What one check found: ``outcome`` passed, failed or skipped; ``reason`` says why (every
    problem, when failed); ``problems`` lists them one by one."""

    check: str
    outcome: Outcome
    reason: str
    problems: tuple[str, ...] = field(default=())

    @property
    def passed(self) -> bool:
        return self.outcome == "passed"

    @property
    def failed(self) -> bool:
        return self.outcome == "failed"

    @property
    def skipped(self) -> bool:
        return self.outcome == "skipped"

    def __str__(self) -> str:
        return f"{self.check}: {self.outcome}: {self.reason}"


class ConformanceError(AssertionError):
    """Raised by :func:`assert_conformant` when a check failed; ``findings`` holds every finding."""

    def __init__(self, worker: str, findings: list[Finding]) -> None:
        self.findings = findings
        failed = [f for f in findings if f.failed]
        super().__init__(f"worker {worker!r} failed {len(failed)} conformance check(s):\n"
                         + "\n".join(f"- {f}" for f in failed))


class CheckError(Exception):
    """Raised while a check runs (by a transport, a seed or a snapshot) to end that check as failed
    with this message: no receipt in time, a broker that cannot be reached, a seed command that
    failed. The other checks still run. Its message holds no personal data."""


class _WorkerRaised(CheckError):
    """run_task raised (the receipt could not be built or sent, say): the check fails."""


#: The CloudEvents source of the tasks the suite sends over Kafka: the coordinator's.
COORDINATOR_SOURCE = "dsrflow/coordinator"
#: How long the suite waits for a task's receipt over Kafka, by default (seconds).
DEFAULT_TIMEOUT = 30.0


class Transport(Protocol):
    """How the suite runs a task: ``session()`` is entered around each check (the seed runs inside
    it), ``run(task)`` returns the task's receipt or raises :class:`CheckError`. ``system`` is the
    worker's declaration, ``store`` the export store its artifacts are read from."""

    @property
    def system(self) -> SystemDeclaration: ...

    @property
    def store(self) -> ExportStore: ...

    def session(self) -> AbstractAsyncContextManager[object]: ...

    async def run(self, task: TaskAssigned) -> TaskReceipt: ...


class InProcessTransport:
    """Tasks straight to a Python worker's handlers (:func:`~dsrflow.testing.worker.run_task`),
    inside its :meth:`~dsrflow.worker.Worker.lifespan`; exports to ``store`` (default a
    :class:`~dsrflow.exports.MemoryExportStore`)."""

    def __init__(self, worker: Worker, *, store: ExportStore | None = None, settings: Settings | None = None) -> None:
        self.worker = worker
        self.store: ExportStore = store if store is not None else MemoryExportStore()
        self.settings = settings

    def __repr__(self) -> str:
        return repr(self.worker)

    @property
    def system(self) -> SystemDeclaration:
        return self.worker.system

    def session(self) -> AbstractAsyncContextManager[object]:
        return self.worker.lifespan(self.settings if self.settings is not None else Settings())

    async def run(self, task: TaskAssigned) -> TaskReceipt:
        try:
            return await run_task(self.worker, task, store=self.store, settings=self.settings)
        except Exception as exc:  # noqa: BLE001 - the check fails, the others still run
            raise _WorkerRaised(f"{task.action} raised {type(exc).__name__} instead of giving a receipt: "
                                f"{str(exc)[:300]}") from exc


class KafkaTransport:
    """Tasks over Kafka to a running worker, as the coordinator sends them, and its receipts back.

    ``declaration``: the worker's system. ``settings``: the broker (``kafka_bootstrap`` and the
    SASL/TLS settings) and, by default, the export store (``settings.exports``). ``store``: where
    the worker's artifacts are read from. ``credential``: the coordinator's signing key
    (:func:`dsrflow.auth.load_credential`), for a worker that acts only on signed tasks.
    ``timeout``: how long to wait for each receipt, in seconds.

    Each check opens a producer and a consumer of ``dsr.receipts.v1`` that is assigned every
    partition and commits nothing; before each task is sent it moves to the end of every
    partition, so only receipts sent after the task are read. A task run twice in one check (a
    redelivery) is sent as the very same record, byte for byte.
    """

    def __init__(
        self,
        declaration: SystemDeclaration,
        *,
        settings: Settings,
        store: ExportStore | None = None,
        credential: Credential | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        self._system = declaration
        self.settings = settings
        self._store: ExportStore = store if store is not None else LocalExportStore(settings.exports)
        self.credential = credential
        self.timeout = timeout
        self.topic = topics.tasks_topic(declaration.name)
        self._producer: AIOKafkaProducer | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._partitions: list[TopicPartition] = []
        #: the records sent in this session, by (task id, attempt): a task run again goes as the same bytes
        self._records: dict[tuple[object, int], tuple[bytes, bytes, list[tuple[str, bytes]]]] = {}

    def __repr__(self) -> str:
        return f"KafkaTransport({self._system.name!r}, {self.topic})"

    @property
    def system(self) -> SystemDeclaration:
        return self._system

    @property
    def store(self) -> ExportStore:
        return self._store

    @asynccontextmanager
    async def session(self) -> AsyncIterator[KafkaTransport]:
        from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
        from aiokafka.errors import KafkaError

        try:
            producer_options = self.settings.producer_options()
            consumer_options = self.settings.kafka_client_options()
        except Exception as exc:  # noqa: BLE001 - a setting missing or invalid (it names the variable)
            raise CheckError(f"no broker to send tasks to: {exc}") from None
        where = producer_options.get("bootstrap_servers")
        producer = AIOKafkaProducer(client_id="dsrflow-conformance", linger_ms=0, **producer_options)
        consumer = AIOKafkaConsumer(client_id="dsrflow-conformance", group_id=None, enable_auto_commit=False,
                                    **consumer_options)
        try:
            try:
                await producer.start()
                await consumer.start()
                present = await consumer.topics()
            except KafkaError as exc:
                raise CheckError(f"cannot reach the broker at {where} ({type(exc).__name__})") from None
            for topic, hint in ((topics.RECEIPTS, "`dsrflow topics apply` creates it"),
                                (self.topic, f"is the worker for {self._system.name} running? it creates its "
                                             "task topic; `dsrflow topics apply` does too")):
                if topic not in present:
                    raise CheckError(f"no topic {topic} on the broker at {where}: {hint}")
            try:
                partitions = await producer.partitions_for(topics.RECEIPTS)
            except KafkaError as exc:
                raise CheckError(f"the partitions of {topics.RECEIPTS} are not known ({type(exc).__name__})") from None
            self._partitions = [TopicPartition(topics.RECEIPTS, p) for p in sorted(partitions)]
            consumer.assign(self._partitions)
            self._producer, self._consumer = producer, consumer
            yield self
        finally:
            self._producer = self._consumer = None
            self._partitions = []
            self._records.clear()
            for client in (consumer, producer):
                with contextlib.suppress(Exception):
                    await client.stop()

    def _record(self, task: TaskAssigned) -> tuple[bytes, bytes, list[tuple[str, bytes]]]:
        """The task's record as the coordinator's relay sends it: the same one each time it is run."""
        key = (task.task_id, task.attempt)
        if key not in self._records:
            value, headers = codec.encode(task, source=COORDINATOR_SOURCE, subject=str(task.case_id))
            if self.credential is not None:
                ce = codec.header_map(headers)
                headers = [*headers, *sign_headers(self.credential, ce_id=ce["ce_id"], ce_source=COORDINATOR_SOURCE,
                                                   value=value, kind="task")]
            self._records[key] = (str(task.case_id).encode(), value, headers)
        return self._records[key]

    async def run(self, task: TaskAssigned) -> TaskReceipt:
        from aiokafka.errors import KafkaError

        producer, consumer = self._producer, self._consumer
        if producer is None or consumer is None:
            raise RuntimeError("KafkaTransport.run outside its session()")
        key, value, headers = self._record(task)
        try:
            for tp, end in (await consumer.end_offsets(self._partitions)).items():
                consumer.seek(tp, end)
            await (await producer.send(self.topic, value, key=key, headers=headers))
        except KafkaError as exc:
            raise CheckError(f"{task.action} could not be sent to {self.topic} ({type(exc).__name__})") from None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        while (left := deadline - loop.time()) > 0:
            try:
                batch = await consumer.getmany(timeout_ms=max(1, int(min(left, 0.5) * 1000)))
            except KafkaError as exc:
                raise CheckError(f"receipts could not be read ({type(exc).__name__})") from None
            for records in batch.values():
                for record in records:
                    receipt = self._receipt_of(task, record)
                    if receipt is not None:
                        return receipt
        signed = "" if self.credential is not None else (
            " (the task was not signed: a worker given the coordinator's public keys refuses unsigned tasks)")
        raise CheckError(f"no receipt for {task.action} within {self.timeout:g}s: is the worker running and "
                         f"consuming {self.topic}?{signed}")

    @staticmethod
    def _receipt_of(task: TaskAssigned, record: Any) -> TaskReceipt | None:
        """The record's receipt if it is the task's (its id and attempt), else None."""
        try:
            if codec.header_map(record.headers).get("ce_type") != TaskReceipt.ce_type:
                return None  # task progress, or anything else that shares the topic
            receipt = codec.decode(record.value, record.headers, TaskReceipt).data
        except codec.DecodeError as exc:
            if _names_task(record.value, task):
                raise CheckError(f"the receipt of {task.action} does not decode: {exc}") from None
            return None
        if receipt.task_id != task.task_id or receipt.attempt != task.attempt:
            return None
        if record.key != str(task.case_id).encode():
            raise CheckError(f"the receipt of {task.action} is not keyed by the task's case_id: a receipt's key is "
                             "its case_id, so that a case's receipts stay in order")
        return receipt


def _names_task(value: bytes | None, task: TaskAssigned) -> bool:
    """Whether a record that is not a valid receipt still names the task (and its attempt)."""
    try:
        raw = orjson.loads(value or b"")
    except orjson.JSONDecodeError:
        return False
    return isinstance(raw, dict) and raw.get("task_id") == str(task.task_id) and raw.get("attempt") in (
        task.attempt, None)


def _status(receipt: TaskReceipt) -> str:
    return f"{receipt.status}" + (f" ({receipt.error})" if receipt.error else "")


def _mentions(body: bytes, value: str) -> bool:
    """Whether an export's bytes hold ``value``, as written or as JSON escapes it."""
    escaped = json.dumps(value)[1:-1]
    return value.encode() in body or escaped.encode() in body


class Conformance:
    """The worker contract's checks, bound to one worker and its test data.

    ``worker``: a :class:`~dsrflow.worker.Worker`, run in-process (:class:`InProcessTransport`),
    or a :class:`Transport` (see :meth:`over_kafka` for a worker that runs on its own).
    ``subject`` and ``other`` are two different people the seeded data holds, each as identifiers
    (``{"email": ..., "phone": ...}``; only the types the worker declares are sent, in dsrflow's
    normal form, as the coordinator sends them). ``seed`` (async, no arguments) recreates the test
    data: it runs before every check, so checks are independent and may erase. ``conflict``: the
    identifiers of two people in one task; default the subject's first declared identifier type
    (email, say) with the other person's next (phone). ``snapshot`` (async, no arguments): a
    comparable picture of the system's data, for the "nothing changed" parts. ``store``: where
    exports go (default a :class:`~dsrflow.exports.MemoryExportStore`). ``settings``: for the
    worker's startup hooks (default ``Settings()``). (With a transport, ``store`` and ``settings``
    are the transport's.)
    """

    def __init__(
        self,
        worker: Worker | Transport,
        *,
        subject: Mapping[str, str],
        other: Mapping[str, str],
        seed: Seed,
        conflict: Mapping[str, str] | None = None,
        snapshot: Snapshot | None = None,
        store: ExportStore | None = None,
        settings: Settings | None = None,
    ) -> None:
        if isinstance(worker, Worker):
            self.transport: Transport = InProcessTransport(worker, store=store, settings=settings)
            self.worker: Worker | None = worker
        elif store is not None or settings is not None:
            raise TypeError("store and settings are the transport's: give them to it")
        else:
            self.transport, self.worker = worker, None
        self.system = self.transport.system
        self.store: ExportStore = self.transport.store
        self.settings = settings
        self.seed = seed
        self.snapshot = snapshot
        self.declared = tuple(self.system.identifier_types)
        self.subject = self._declared(subject, "subject")
        self.other = self._declared(other, "other")
        # Values in normal form, as tasks carry them (and as an export shows them).
        self._subject_values = self._normalised(self.subject)
        self._other_values = self._normalised(self.other)
        same = sorted(k for k in self._subject_values.keys() & self._other_values.keys()
                      if self._subject_values[k] == self._other_values[k])
        if same:
            raise ValueError(f"subject and other share their {', '.join(same)}: give two different people")
        self.conflict = self._declared(conflict, "conflict") if conflict is not None else self._default_conflict()

    @classmethod
    def over_kafka(
        cls,
        declaration: SystemDeclaration,
        *,
        settings: Settings,
        subject: Mapping[str, str],
        other: Mapping[str, str],
        seed: Seed,
        conflict: Mapping[str, str] | None = None,
        snapshot: Snapshot | None = None,
        store: ExportStore | None = None,
        credential: Credential | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> Conformance:
        """The suite against a worker that runs on its own (any language) and consumes the task
        topic of ``declaration``'s system, over the broker of ``settings``: see
        :class:`KafkaTransport` for ``store``, ``credential`` and ``timeout``. ``seed`` and
        ``snapshot`` reach the system's data however the test can (a database, a shell command)."""
        transport = KafkaTransport(declaration, settings=settings, store=store, credential=credential,
                                   timeout=timeout)
        return cls(transport, subject=subject, other=other, seed=seed, conflict=conflict, snapshot=snapshot)

    def __repr__(self) -> str:
        return f"Conformance({self.worker if self.worker is not None else self.transport!r})"

    # -- running ---------------------------------------------------------------------------------
    async def run(self, checks: Iterable[str] = CHECKS) -> list[Finding]:
        """Run ``checks`` (default all of them) and return a finding for each."""
        return [await self.check(name) for name in checks]

    async def assert_conformant(self, checks: Iterable[str] = CHECKS) -> list[Finding]:
        """Run ``checks``; raise :class:`ConformanceError` if any failed, else return the findings."""
        findings = await self.run(checks)
        if any(f.failed for f in findings):
            raise ConformanceError(self.system.name, findings)
        return findings

    async def check(self, name: str) -> Finding:
        """Run the check called ``name`` (one of :data:`CHECKS`) on freshly seeded data."""
        bodies: dict[str, Callable[[list[str]], Awaitable[str]]] = {
            EXPORT: self._export_finds_subject,
            ERASE_TWICE: self._erase_twice_not_found,
            LEGAL_BASIS: self._retained_has_legal_basis,
            CONFLICT: self._conflicting_identifiers,
            REDELIVERY: self._redelivery_changes_nothing,
        }
        if name not in bodies:
            raise ValueError(f"no conformance check {name!r}; the checks are {', '.join(CHECKS)}")
        how, actions = _NEEDS[name]
        have = [a for a in actions if self.system.supports(a)]
        if (how == "all" and len(have) < len(actions)) or not have:
            return Finding(name, "skipped", f"the worker declares no {' or '.join(map(str, actions))} action")
        if name == CONFLICT and self.conflict is None:
            return Finding(name, "skipped", "needs two identifier types the worker declares, both given for the "
                                            "subject and the other person (or pass conflict=, or --conflict on the "
                                            "command line)")
        problems: list[str] = []
        summary = ""
        try:
            async with self.transport.session():
                await self.seed()
                try:
                    summary = await bodies[name](problems)
                except CheckError as exc:
                    problems.append(str(exc))
        except CheckError as exc:  # the session could not start, or the seed failed
            problems.append(str(exc))
        if problems:
            return Finding(name, "failed", "; ".join(problems), tuple(problems))
        return Finding(name, "passed", summary)

    async def export_finds_subject(self) -> Finding:
        return await self.check(EXPORT)

    async def erase_twice_not_found(self) -> Finding:
        return await self.check(ERASE_TWICE)

    async def retained_has_legal_basis(self) -> Finding:
        return await self.check(LEGAL_BASIS)

    async def conflicting_identifiers(self) -> Finding:
        return await self.check(CONFLICT)

    async def redelivery_changes_nothing(self) -> Finding:
        return await self.check(REDELIVERY)

    # -- the checks ------------------------------------------------------------------------------
    async def _export_finds_subject(self, problems: list[str]) -> str:
        receipt = await self._run(self._task(Action.export, self.subject))
        if receipt.status != ReceiptStatus.succeeded:
            problems.append(f"an export of the subject gave {_status(receipt)}, not succeeded")
            return ""
        if not receipt.artifacts:
            problems.append("an export of the subject succeeded with no artifact")
            return ""
        bodies = self._artifact_bodies(receipt, problems)
        if bodies and not any(_mentions(b, v) for b in bodies for v in self._subject_values.values()):
            problems.append(f"no artifact of the subject's export mentions their "
                            f"{' or '.join(self._subject_values)}")
        leaked = sorted(kind for kind, v in self._other_values.items() if any(_mentions(b, v) for b in bodies))
        if leaked:
            problems.append(f"the subject's export holds the other person's {', '.join(leaked)}")
        return f"export succeeded with {len(receipt.artifacts)} artifact(s) about the subject"

    async def _erase_twice_not_found(self, problems: list[str]) -> str:
        other_before = await self._export_state(self.other) if self._can(Action.export) else None
        first = await self._run(self._task(Action.erase, self.subject))
        if first.status not in _ACTED:
            problems.append(f"the first erasure of the seeded subject gave {_status(first)}, "
                            "not succeeded or retained")
        elif not any(n > 0 for n in first.counts.values()):
            problems.append(f"the first erasure reported {first.status} with no positive count ({first.counts}): "
                            "a receipt says what was erased")
        if other_before is not None:
            other_after = await self._export_state(self.other)
            if other_after[0] != other_before[0]:  # the status: the content may show the subject gone
                problems.append(f"erasing the subject changed an export of the other person from {other_before[0]} "
                                f"to {other_after[0]}")
        second = await self._run(self._task(Action.erase, self.subject))
        if second.status != ReceiptStatus.not_found:
            problems.append(f"a second erasure of the subject gave {_status(second)}, not not_found")
        return f"first erasure {first.status} {dict(first.counts)}, second not_found"

    async def _retained_has_legal_basis(self, problems: list[str]) -> str:
        erased = await self._run(self._task(Action.erase, self.subject))
        now = datetime.now(UTC)
        if erased.status == ReceiptStatus.retained:
            if not erased.retained:
                problems.append("the erasure reported retained without listing what it kept")
            for i, item in enumerate(erased.retained, start=1):
                if not item.legal_basis.strip():
                    problems.append(f"retained item {i} ({item.category or 'no category'}) has no legal basis")
                if not item.category.strip():
                    problems.append(f"retained item {i} has no category")
                if item.retain_until is not None and item.retain_until <= now:
                    problems.append(f"retained item {i} ({item.category}) is kept until {item.retain_until:%Y-%m-%d}, "
                                    "already past: it should have been erased")
        elif erased.retained:
            problems.append(f"the erasure reported {erased.status} but lists {len(erased.retained)} retained item(s): "
                            "a receipt that keeps data says retained")
        if erased.status not in (*_ACTED, ReceiptStatus.not_found):
            problems.append(f"the erasure of the subject gave {_status(erased)}")
            return ""
        if not self._can(Action.export):
            return f"erasure {erased.status}; no export to look again with"
        after = await self._run(self._task(Action.export, self.subject))
        if after.status == ReceiptStatus.succeeded and erased.status != ReceiptStatus.retained:
            problems.append(f"after an erasure that reported {erased.status} and retained nothing, an export still "
                            f"finds the subject ({len(after.artifacts)} artifact(s), counts {dict(after.counts)}): "
                            "data kept without a legal basis")
        elif after.status not in (ReceiptStatus.succeeded, ReceiptStatus.not_found):
            problems.append(f"an export after the erasure gave {_status(after)}")
        if erased.status == ReceiptStatus.retained:
            kept = "; ".join(f"{i.category} ({i.records} record(s)) under {_short(i.legal_basis)}"
                             for i in erased.retained)
            return f"erasure retained {kept}; the export afterwards: {after.status}"
        return f"erasure {erased.status}, retained nothing; the export afterwards: {after.status}"

    async def _conflicting_identifiers(self, problems: list[str]) -> str:
        assert self.conflict is not None
        described = self._describe_conflict()
        before = await self._state()
        done = []
        for action in (Action.export, Action.erase):
            if not self._can(action):
                continue
            task = self._task(action, self.conflict)
            receipt = await self._run(task)
            done.append(str(action))
            if receipt.status != ReceiptStatus.conflict:
                problems.append(f"{action} with {described} gave {_status(receipt)}, not conflict")
            if receipt.artifacts or self._stored_for(task):
                problems.append(f"{action} with {described} exported {len(receipt.artifacts)} artifact(s)")
        changed = self._diff(before, await self._state())
        if changed:
            problems.append(f"{' and '.join(done)} with {described} changed {', '.join(changed)}")
        return f"{' and '.join(done)} with {described}: conflict, nothing exported or changed"

    async def _redelivery_changes_nothing(self, problems: list[str]) -> str:
        done = []
        if self._can(Action.export):
            task = self._task(Action.export, self.subject)
            first = await self._run(task)
            again = await self._run(task)
            done.append("export")
            if again.status != first.status:
                problems.append(f"a redelivered export gave {_status(again)}, the first {_status(first)}")
            elif _shas(again) != _shas(first):
                problems.append(f"a redelivered export wrote other content (sha256 {_shas(again)}, "
                                f"the first {_shas(first)})")
            elif again.counts != first.counts:
                problems.append(f"a redelivered export counted {dict(again.counts)}, the first {dict(first.counts)}")
        if self._can(Action.erase):
            task = self._task(Action.erase, self.subject)
            first = await self._run(task)
            between = await self._state()
            again = await self._run(task)
            done.append("erase")
            if again.status == ReceiptStatus.not_found:
                pass  # nothing left to erase: what a second run finds
            elif again.status != first.status:
                problems.append(f"a redelivered erasure gave {_status(again)}, the first {_status(first)}")
            elif (again.counts, again.retained, again.categories) != (first.counts, first.retained, first.categories):
                problems.append(f"a redelivered erasure reported {again.status} {dict(again.counts)}, the first "
                                f"{dict(first.counts)}: either the same receipt or not_found")
            changed = self._diff(between, await self._state())
            if changed:
                problems.append(f"a redelivered erasure changed {', '.join(changed)}")
        return f"{' and '.join(done)} redelivered: equivalent receipts, nothing changed"

    # -- helpers ---------------------------------------------------------------------------------
    def _can(self, action: Action) -> bool:
        return self.system.supports(action)

    def _declared(self, identifiers: Mapping[str, str], label: str) -> dict[IdentifierType, str]:
        out = {IdentifierType(k): v for k, v in identifiers.items() if IdentifierType(k) in self.declared}
        if not out:
            raise ValueError(f"{label}: no identifier of a type worker {self.system.name!r} declares "
                             f"({', '.join(self.declared)})")
        return out

    def _normalised(self, identifiers: Mapping[IdentifierType, str]) -> dict[IdentifierType, str]:
        return dict(self._task(Action.export, identifiers).identifiers)

    def _default_conflict(self) -> dict[IdentifierType, str] | None:
        kinds = [k for k in self.declared if k in self._subject_values and k in self._other_values]
        if len(kinds) < 2:
            return None
        return {kinds[0]: self.subject[kinds[0]], kinds[1]: self.other[kinds[1]]}

    def _describe_conflict(self) -> str:
        assert self.conflict is not None
        conflict = self._normalised(self.conflict)
        def whose(kind: IdentifierType, value: str) -> str:
            if self._subject_values.get(kind) == value:
                return f"the subject's {kind}"
            if self._other_values.get(kind) == value:
                return f"the other person's {kind}"
            return f"a given {kind}"

        return " and ".join(whose(k, v) for k, v in conflict.items())

    def _task(self, action: Action, identifiers: Mapping[IdentifierType, str]) -> TaskAssigned:
        """A new task, as the coordinator would send it: new task and case ids, attempt 1."""
        ids: dict[IdentifierType | str, str] = {k: v for k, v in identifiers.items()}
        return make_task(self.system.name, action, ids, controller=self.system.controller)

    async def _run(self, task: TaskAssigned) -> TaskReceipt:
        """The task's receipt, through the transport; raises :class:`CheckError` when there is none."""
        return await self.transport.run(task)

    def _artifact_bodies(self, receipt: TaskReceipt, problems: list[str]) -> list[bytes]:
        bodies = []
        for art in receipt.artifacts:
            try:
                body = self.store.get(art.ref)
            except Exception as exc:  # noqa: BLE001
                problems.append(f"artifact {art.ref} cannot be read from the export store ({type(exc).__name__})")
                continue
            if hashlib.sha256(body).hexdigest() != art.sha256 or len(body) != art.size:
                problems.append(f"artifact {art.ref} does not match its sha256 or size")
            bodies.append(body)
        return bodies

    def _stored_for(self, task: TaskAssigned) -> bool:
        """Whether the store holds an export of ``task`` (a MemoryExportStore can tell, and a store
        of local files: anything under the prefix of the task's case, new for each task)."""
        if isinstance(self.store, MemoryExportStore):
            return any(str(task.task_id) in key for key in self.store.keys())
        folder = self.store.path(system_case_prefix(task.system, task.case_id, task.controller).rstrip("/"))
        return folder is not None and folder.is_dir() and any(f.is_file() for f in folder.rglob("*"))

    async def _export_state(self, identifiers: Mapping[IdentifierType, str]) -> tuple[str, tuple[str, ...]]:
        """What an export of these identifiers finds: its status and artifact checksums."""
        receipt = await self._run(self._task(Action.export, identifiers))
        return str(receipt.status), _shas(receipt)

    async def _state(self) -> dict[str, object]:
        state: dict[str, object] = {}
        if self._can(Action.export):
            state["what an export of the subject finds"] = await self._export_state(self.subject)
            state["what an export of the other person finds"] = await self._export_state(self.other)
        if self.snapshot is not None:
            state["the snapshot"] = await self.snapshot()
        return state

    @staticmethod
    def _diff(before: Mapping[str, object], after: Mapping[str, object]) -> list[str]:
        return [k for k in before if before[k] != after.get(k)]


def _short(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[:limit].rsplit(" ", 1)[0] + "..."


def _shas(receipt: TaskReceipt) -> tuple[str, ...]:
    return tuple(sorted(a.sha256 for a in receipt.artifacts))


async def assert_conformant(
    worker: Worker,
    *,
    subject: Mapping[str, str],
    other: Mapping[str, str],
    seed: Seed,
    checks: Iterable[str] = CHECKS,
    conflict: Mapping[str, str] | None = None,
    snapshot: Snapshot | None = None,
    store: ExportStore | None = None,
    settings: Settings | None = None,
) -> list[Finding]:
    """Run the conformance checks on ``worker`` (see :class:`Conformance` for the arguments); raise
    :class:`ConformanceError` naming every failed check, else return the findings."""
    conformance = Conformance(worker, subject=subject, other=other, seed=seed, conflict=conflict,
                              snapshot=snapshot, store=store, settings=settings)
    return await conformance.assert_conformant(checks)


if __name__ == "__main__":  # python -m dsrflow.testing.conformance: the command line for any worker
    import sys

    from dsrflow.testing.conformance_cli import main

    sys.exit(main())
