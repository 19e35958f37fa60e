"""The README's ACLs ("Who may do what: principals, topics and ACLs") on a real Apache Kafka with
SASL/PLAIN and the StandardAuthorizer (nothing allowed without an ACL): each principal holds only
the ACLs of :func:`dsrflow.topics.acl_rules` (the README's table, see tests/unit/test_acl_table.py)
and does its part, and is refused the rest.

- ``admin`` (no super user: only its rows) runs ``topics.apply`` and creates every topic;
- a real ``Worker`` as ``worker-crm`` checks its topics, announces itself, consumes a task the
  ``coordinator`` sent and sends its receipt (with an idempotent producer: no IdempotentWrite);
- ``worker-crm`` is refused another system's tasks, writing tasks, and the requests topic;
- ``intake`` writes requests but cannot read them; the ``coordinator`` reads them (as its own
  group only) and writes any system's tasks (the prefixed ACL).

The ACLs are added by ``operator``, the broker's super user (as ``kafka-acls.sh`` is run). With
CI=true a missing Java or Maven fails this module instead of skipping it."""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import (
    ClusterAuthorizationFailedError,
    GroupAuthorizationFailedError,
    KafkaError,
    TopicAuthorizationFailedError,
)
from pydantic import SecretStr

from dsrflow import codec, topics
from dsrflow.events import TaskReceipt
from dsrflow.registry import SystemAnnounced, SystemDeclaration
from dsrflow.rights import Action, IdentifierType, ReceiptStatus
from dsrflow.settings import Settings
from dsrflow.stack.kafka import ApacheKafka, available
from dsrflow.testing.brokers import in_ci
from dsrflow.testing.worker import make_task
from dsrflow.worker import MemoryTaskLedger, Result, TaskContext, Worker

pytestmark = pytest.mark.kafka

TIMEOUT = 30.0
SUPER = "operator"  # the broker's own principal, and the one that adds the ACLs
PRINCIPALS = ("admin", "coordinator", "worker-crm", "worker-billing", "intake", "dpo-tool", "notifier")
PASSWORDS = {SUPER: "operator-secret", **{p: f"{p}-secret" for p in PRINCIPALS}}
SYSTEMS = ["crm", "billing"]
#: what acl_rules() hands out, on this broker
RULES = topics.acl_rules(SYSTEMS)


# -- the broker ---------------------------------------------------------------------------------
def _bindings(rules: list[topics.AclRule]) -> list[Any]:
    from confluent_kafka.admin import (  # type: ignore[attr-defined]
        AclBinding,
        AclOperation,
        AclPermissionType,
        ResourcePatternType,
        ResourceType,
    )

    out = []
    for rule in rules:
        for op in rule.operations:
            for name in rule.names:
                out.append(AclBinding(
                    ResourceType[rule.resource.upper()], name,
                    ResourcePatternType.PREFIXED if rule.prefixed else ResourcePatternType.LITERAL,
                    rule.principal, "*",
                    AclOperation[re.sub(r"(?<!^)(?=[A-Z])", "_", op).upper()],  # DescribeConfigs -> DESCRIBE_CONFIGS
                    AclPermissionType.ALLOW,
                ))
    return out


def _grant(kafka: ApacheKafka, rules: list[topics.AclRule]) -> int:
    """Add the ACLs as the super user; return once the broker's authorizer has every one of them."""
    from confluent_kafka.admin import (  # type: ignore[attr-defined]
        AclBindingFilter,
        AclOperation,
        AclPermissionType,
        AdminClient,
        ResourcePatternType,
        ResourceType,
    )

    admin = AdminClient({"bootstrap.servers": kafka.bootstrap, "security.protocol": "SASL_PLAINTEXT",
                         "sasl.mechanism": "PLAIN", "sasl.username": SUPER, "sasl.password": PASSWORDS[SUPER]})
    bindings = _bindings(rules)
    for future in admin.create_acls(bindings, request_timeout=TIMEOUT).values():
        future.result()
    every = AclBindingFilter(ResourceType.ANY, None, ResourcePatternType.ANY, None, None,  # type: ignore[arg-type]
                             AclOperation.ANY, AclPermissionType.ANY)
    deadline = time.monotonic() + TIMEOUT
    while len(admin.describe_acls(every, request_timeout=TIMEOUT).result()) < len(bindings):
        assert time.monotonic() < deadline, "the broker did not take the ACLs"
        time.sleep(0.1)
    return len(bindings)


@pytest.fixture(scope="module")
def secured() -> Iterator[ApacheKafka]:
    """A broker of its own: SASL/PLAIN for every principal, the StandardAuthorizer, the README's ACLs."""
    why = available()
    if why is not None:
        if in_ci():
            pytest.fail(f"CI=true: Apache Kafka with ACLs must run here: {why}")
        pytest.skip(why)
    kafka = ApacheKafka(sasl_users=PASSWORDS, authorizer=True, super_users=(SUPER,))
    try:
        kafka.start()
        props = kafka.server_properties()
        assert props["authorizer.class.name"] == "org.apache.kafka.metadata.authorizer.StandardAuthorizer"
        assert props["allow.everyone.if.no.acl.found"] == "false" and props["super.users"] == f"User:{SUPER}"
        assert _grant(kafka, RULES) > 40
        yield kafka
    finally:
        kafka.stop()


def opts(kafka: ApacheKafka, user: str) -> dict[str, Any]:
    return kafka.client_options(user)


def settings_as(kafka: ApacheKafka, user: str, tmp_path: Path) -> Settings:
    return Settings(kafka_bootstrap=kafka.bootstrap, kafka_security_protocol="SASL_PLAINTEXT",
                    kafka_sasl_mechanism="PLAIN", kafka_sasl_username=user,
                    kafka_sasl_password=SecretStr(PASSWORDS[user]), export_dir=tmp_path / "exports",
                    state_dir=tmp_path / "state", startup_timeout=timedelta(seconds=TIMEOUT))


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def applied(secured: ApacheKafka) -> topics.ApplyReport:
    """`dsrflow topics apply --system crm --system billing`, as ``admin`` with only its ACLs."""
    return await topics.apply(opts(secured, "admin"), topics.specs_for(SYSTEMS))


# -- clients --------------------------------------------------------------------------------------
async def produce(kafka: ApacheKafka, user: str, topic: str, value: bytes, *, key: bytes = b"k",
                  headers: list[tuple[str, bytes]] | None = None, idempotent: bool = True) -> Any:
    """Send one record as ``user``; the broker's acknowledgement (its offset)."""
    producer = AIOKafkaProducer(**opts(kafka, user), acks="all", enable_idempotence=idempotent,
                                request_timeout_ms=10_000)
    try:
        await producer.start()
        return await asyncio.wait_for(producer.send_and_wait(topic, value, key=key, headers=headers or []), TIMEOUT)
    finally:
        await producer.stop()


async def consume(kafka: ApacheKafka, user: str, topic: str, match: Callable[[Any], bool], *,
                  group: str | None = None) -> Any:
    """Read ``topic`` from the beginning as ``user`` (and ``group``) until a record matches."""
    consumer = AIOKafkaConsumer(topic, **opts(kafka, user), group_id=group, auto_offset_reset="earliest",
                                enable_auto_commit=False)
    try:
        await consumer.start()
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=500)).values():
                for record in records:
                    if match(record):
                        if group is not None:
                            await consumer.commit()
                        return record
        raise AssertionError(f"no matching record on {topic} as {user} within {TIMEOUT:.0f} s")
    finally:
        await consumer.stop()


def topic_configs(kafka: ApacheKafka, user: str, topic: str) -> dict[str, str]:
    """DescribeConfigs of ``topic`` as ``user`` (what a service looks at for drift at start)."""
    from confluent_kafka.admin import AdminClient, ConfigResource  # type: ignore[attr-defined]

    admin = AdminClient({"bootstrap.servers": kafka.bootstrap, "security.protocol": "SASL_PLAINTEXT",
                         "sasl.mechanism": "PLAIN", "sasl.username": user, "sasl.password": PASSWORDS[user]})
    [future] = admin.describe_configs([ConfigResource("topic", topic)], request_timeout=TIMEOUT).values()
    return {name: entry.value for name, entry in future.result().items()}


async def committed_offset(kafka: ApacheKafka, group: str, tp: TopicPartition, *, user: str = SUPER) -> int | None:
    consumer = AIOKafkaConsumer(**opts(kafka, user), group_id=group, enable_auto_commit=False)
    try:
        await consumer.start()
        offset = await consumer.committed(tp)
        return None if offset is None else int(offset)
    finally:
        await consumer.stop()


async def refused(action: Awaitable[Any], *errors: type[KafkaError]) -> KafkaError:
    """The broker refused ``action``: it raised one of ``errors`` (topic authorization by default)."""
    errors = errors or (TopicAuthorizationFailedError,)
    with pytest.raises(errors) as caught:
        await asyncio.wait_for(action, TIMEOUT)
    return caught.value


# -- the tests ------------------------------------------------------------------------------------
async def test_admin_creates_every_topic_and_a_worker_none(
        secured: ApacheKafka, applied: topics.ApplyReport) -> None:
    every = {s.name for s in topics.specs_for(SYSTEMS)}
    assert {"dsr.tasks.crm.v1", "dsr.tasks.billing.v1", topics.REQUESTS, topics.SYSTEMS} <= every
    assert sorted(applied.created) == sorted(every) and not applied.drift
    again = await topics.apply(opts(secured, "admin"), topics.specs_for(SYSTEMS))  # idempotent, and it can look
    assert not again.created and sorted(again.unchanged) == sorted(every) and not again.drift

    # no service creates topics: a worker cannot, even the task topic of a system of its own name
    erp = topics.declared()[topics.TASKS_TEMPLATE].for_system("erp")
    with pytest.raises(RuntimeError, match=r"could not create topic dsr\.tasks\.erp\.v1: error code 29"):
        await topics.apply(opts(secured, "worker-crm"), [erp])


async def test_a_worker_with_only_its_acls_announces_consumes_and_answers(
        secured: ApacheKafka, applied: topics.ApplyReport, tmp_path: Path) -> None:
    worker = Worker(SystemDeclaration(name="crm", identifier_types=(IdentifierType.email,),
                                      categories=("user.contact.email",), actions=(Action.export,)),
                    ledger=MemoryTaskLedger())

    @worker.handler(Action.export)
    async def export(ctx: TaskContext) -> Result:
        art = await ctx.export({"email": ctx.identifiers[IdentifierType.email]}, records=1)
        return Result.succeeded(counts={"located": 1}, categories=["user.contact.email"], artifacts=[art])

    settings = settings_as(secured, "worker-crm", tmp_path)
    assert settings.producer_options().get("enable_idempotence") is True  # InitProducerId without IdempotentWrite
    stop = asyncio.Event()
    running = asyncio.create_task(worker.run(settings, stop=stop))
    try:
        # it announced itself on dsr.systems.v1 (read back as the coordinator, who may)
        announced = await consume(secured, "coordinator", topics.SYSTEMS, lambda r: r.key == b"crm")
        assert codec.decode(announced.value, announced.headers, SystemAnnounced).data.declaration.name == "crm"
        assert not running.done(), running.exception() if running.done() else None

        task = make_task("crm", Action.export, {"email": "Lan.Nguyen@Example.VN"})
        value, headers = codec.encode(task, source="test")
        sent = await produce(secured, "coordinator", topics.tasks_topic("crm"), value,
                             key=str(task.case_id).encode(), headers=headers)
        assert sent.offset >= 0

        def its_receipt(r: Any) -> bool:
            return (dict(r.headers or ()).get("ce_type") == TaskReceipt.ce_type.encode()
                    and codec.decode(r.value, r.headers, TaskReceipt).data.task_id == task.task_id)

        record = await consume(secured, "coordinator", topics.RECEIPTS, its_receipt)
        receipt = codec.decode(record.value, record.headers, TaskReceipt).data
        assert receipt.system == "crm" and receipt.status == ReceiptStatus.succeeded
        assert receipt.artifacts and receipt.counts.get("located") == 1

        # the worker's group committed the task's offset (Read on its group suffices for that)
        tp = TopicPartition(sent.topic, sent.partition)
        deadline = time.monotonic() + TIMEOUT
        while (committed := await committed_offset(secured, "dsrflow-worker-crm", tp)) is None or \
                committed <= sent.offset:
            assert time.monotonic() < deadline, f"the worker's group committed {committed} on {tp}"
            await asyncio.sleep(0.2)
        assert not running.done()
    finally:
        stop.set()
        await asyncio.wait_for(running, TIMEOUT)


async def test_a_worker_is_refused_what_is_not_its_own(secured: ApacheKafka, applied: topics.ApplyReport) -> None:
    billing = topics.tasks_topic("billing")
    # its topics' configs, to look for drift, and no other's
    spec = topics.declared()[topics.TASKS_TEMPLATE]
    assert topic_configs(secured, "worker-crm", topics.tasks_topic("crm"))["retention.ms"] == str(spec.retention_ms)
    assert topic_configs(secured, "worker-crm", topics.SYSTEMS)["cleanup.policy"] == "compact"
    from confluent_kafka import KafkaException

    with pytest.raises(KafkaException, match="TOPIC_AUTHORIZATION_FAILED"):
        topic_configs(secured, "worker-crm", billing)
    # another system's tasks: not with its own group, not without a group
    await refused(consume(secured, "worker-crm", billing, lambda r: True))
    await refused(consume(secured, "worker-crm", billing, lambda r: True, group="dsrflow-worker-crm"))
    # tasks are the coordinator's to write, its own included; requests are neither its to write nor to read
    for topic in (topics.tasks_topic("crm"), billing, topics.REQUESTS):
        await refused(produce(secured, "worker-crm", topic, b"{}"))
    await refused(consume(secured, "worker-crm", topics.REQUESTS, lambda r: True))
    # and a group that is not its own
    await refused(consume(secured, "worker-crm", topics.tasks_topic("crm"), lambda r: True,
                          group="dsrflow-worker-billing"), GroupAuthorizationFailedError)


async def test_intake_writes_requests_and_the_coordinator_reads_them(
        secured: ApacheKafka, applied: topics.ApplyReport) -> None:
    marker = uuid.uuid4().hex.encode()
    sent = await produce(secured, "intake", topics.REQUESTS, b'{"request": "' + marker + b'"}', key=marker)
    assert sent.offset >= 0
    await refused(consume(secured, "intake", topics.REQUESTS, lambda r: True))

    # the coordinator reads it, as its own group and no other
    got = await consume(secured, "coordinator", topics.REQUESTS, lambda r: r.key == marker,
                        group=topics.COORDINATOR_GROUP)
    assert got.offset == sent.offset
    await refused(consume(secured, "coordinator", topics.REQUESTS, lambda r: True, group="someone-else"),
                  GroupAuthorizationFailedError)
    assert await committed_offset(secured, topics.COORDINATOR_GROUP, TopicPartition(sent.topic, sent.partition),
                                  user="coordinator") == sent.offset + 1

    # it writes every system's tasks (the prefixed ACL on dsr.tasks.), but not requests
    for system in SYSTEMS:
        assert (await produce(secured, "coordinator", topics.tasks_topic(system), b"{}")).offset >= 0
    await refused(produce(secured, "coordinator", topics.REQUESTS, b"{}"))


async def test_the_dpo_tool_and_the_notifier_get_what_the_coordinator_sends_them(
        secured: ApacheKafka, applied: topics.ApplyReport) -> None:
    marker = uuid.uuid4().hex.encode()
    command = await produce(secured, "dpo-tool", topics.COMMANDS, b"{}", key=marker)
    assert (await consume(secured, "coordinator", topics.COMMANDS, lambda r: r.key == marker)).offset == command.offset
    for topic in (topics.COMMAND_RESULTS, topics.NOTICES, topics.ALERTS):
        await produce(secured, "coordinator", topic, b"{}", key=marker)
    for topic in (topics.COMMAND_RESULTS, topics.ALERTS):
        await consume(secured, "dpo-tool", topic, lambda r: r.key == marker, group="dpo-tool")
    await consume(secured, "notifier", topics.NOTICES, lambda r: r.key == marker, group="notifier")

    await refused(consume(secured, "dpo-tool", topics.COMMANDS, lambda r: True))  # its own commands: write only
    await refused(produce(secured, "dpo-tool", topics.COMMAND_RESULTS, b"{}"))
    await refused(consume(secured, "notifier", topics.ALERTS, lambda r: True))
    await refused(consume(secured, "notifier", topics.NOTICES, lambda r: True, group="dpo-tool"),
                  GroupAuthorizationFailedError)
    # a principal with Write on no topic at all may not even start an idempotent producer
    await refused(produce(secured, "notifier", topics.NOTICES, b"{}", idempotent=False))
    await refused(produce(secured, "notifier", topics.NOTICES, b"{}"), ClusterAuthorizationFailedError)
