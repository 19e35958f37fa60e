"""The one place that knows topic names: loads topics/topics.toml, generates schemas,
and creates or checks topics on a broker."""

from __future__ import annotations

import dataclasses
import functools
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import orjson

from . import events, registry

REQUESTS = "dsr.requests.v1"
RECEIPTS = "dsr.receipts.v1"
CASES = "dsr.cases.v1"
DEADLETTER = "dsr.deadletter.v1"
NOTICES = "dsr.notices.v1"
ALERTS = "dsr.alerts.v1"
COMMANDS = "dsr.commands.v1"
COMMAND_RESULTS = "dsr.command-results.v1"
SYSTEMS = "dsr.systems.v1"
SUPPRESSIONS = "dsr.suppressions.v1"
TASKS_TEMPLATE = "dsr.tasks.{system}.v1"

SCHEMA_MODELS: dict[str, type[events.Event]] = {
    "RightsRequested": events.RightsRequested,
    "TaskAssigned": events.TaskAssigned,
    "TaskReceipt": events.TaskReceipt,
    "TaskProgress": events.TaskProgress,
    "CaseUpdated": events.CaseUpdated,
    "DeadLetter": events.DeadLetter,
    "SubjectNotice": events.SubjectNotice,
    "CaseAlert": events.CaseAlert,
    "DecisionCommand": events.DecisionCommand,
    "CommandResult": events.CommandResult,
    "SystemAnnounced": registry.SystemAnnounced,
    "SubjectSuppressed": events.SubjectSuppressed,
}


def tasks_topic(system: str) -> str:
    return TASKS_TEMPLATE.format(system=system)


@dataclass(frozen=True, slots=True)
class TopicSpec:
    name: str
    key: str
    schema: str
    partitions: int
    cleanup_policy: str
    retention_ms: int
    holds: str

    def config(self) -> dict[str, str]:
        """The topic-level configs dsrflow manages."""
        return {"cleanup.policy": self.cleanup_policy, "retention.ms": str(self.retention_ms)}

    def for_system(self, system: str) -> TopicSpec:
        return dataclasses.replace(self, name=self.name.format(system=system)) if "{system}" in self.name else self


def topics_dir() -> Path:
    """topics/ in a source checkout, or its copy inside an installed wheel."""
    repo = Path(__file__).resolve().parents[1] / "topics"
    if (repo / "topics.toml").exists():
        return repo
    return Path(str(resources.files("dsrflow") / "_topics"))


@functools.cache
def declared() -> dict[str, TopicSpec]:
    """Declared topics by name (the tasks entry keeps its ``{system}`` template)."""
    data = tomllib.loads((topics_dir() / "topics.toml").read_text())
    return {t["name"]: TopicSpec(**t) for t in data["topic"]}


def specs_for(systems: list[str]) -> list[TopicSpec]:
    """Concrete topics for a set of systems."""
    out = [s for n, s in declared().items() if "{system}" not in n]
    out += [declared()[TASKS_TEMPLATE].for_system(s) for s in sorted(systems)]
    return out


def generate_schemas() -> dict[str, bytes]:
    """JSON Schema per event model, as committed under topics/schemas/."""
    out: dict[str, bytes] = {}
    for name, model in SCHEMA_MODELS.items():
        schema: dict[str, Any] = model.model_json_schema(mode="validation")
        schema = {
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "$id": f"https://dsrflow.dev/schemas/{name}.v1.json",
            "x-cloudevents-type": model.ce_type,
            **schema,
        }
        out[f"{name}.v1.json"] = orjson.dumps(schema, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n"
    from .commands import command_json_schema  # the decision inside a DecisionCommand's token

    out["Command.v1.json"] = orjson.dumps(command_json_schema(), option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS)
    out["Command.v1.json"] += b"\n"
    return out


def write_schemas(directory: Path | None = None) -> list[Path]:
    directory = directory or topics_dir() / "schemas"
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for fname, body in generate_schemas().items():
        path = directory / fname
        path.write_bytes(body)
        written.append(path)
    return written


async def _partition_counts(admin: Any, names: list[str], attempts: int = 20) -> dict[str, int]:
    """Partitions per topic; waits out a topic so new that the broker's metadata lacks it."""
    import asyncio

    for _ in range(attempts):
        descr = await admin.describe_topics(names)
        if all(d["error_code"] == 0 for d in descr):
            break
        await asyncio.sleep(0.1)
    return {d["topic"]: len(d["partitions"]) for d in descr}


@dataclass(frozen=True, slots=True)
class ApplyReport:
    created: list[str]
    unchanged: list[str]
    drift: dict[str, list[str]]  # topic -> human-readable differences


async def apply(admin_options: dict[str, Any], specs: list[TopicSpec], *, replication_factor: int = 1) -> ApplyReport:
    """Create missing topics; report existing ones whose configuration differs. Idempotent."""
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
    from aiokafka.errors import TopicAlreadyExistsError

    admin = AIOKafkaAdminClient(**admin_options)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [s for s in specs if s.name not in existing]
        created: list[str] = []
        if missing:
            new = [
                NewTopic(name=s.name, num_partitions=s.partitions, replication_factor=replication_factor,
                         topic_configs=s.config())
                for s in missing
            ]
            try:
                resp = await admin.create_topics(new)
            except TopicAlreadyExistsError:
                resp = None
            for name, code, *_ in getattr(resp, "topic_errors", []) or []:
                if code == 0:
                    created.append(name)
                elif code == 36:
                    # TOPIC_ALREADY_EXISTS: another applier won the race, or the broker's metadata had
                    # not caught up when we listed: it exists, so it is checked for drift below.
                    existing.add(name)
                else:
                    raise RuntimeError(f"could not create topic {name}: error code {code}")
        present = [s for s in specs if s.name in existing]
        drift: dict[str, list[str]] = {}
        if present:
            parts = await _partition_counts(admin, [s.name for s in present])
            configs: dict[str, dict[str, str]] = {}
            try:
                resources_ = [ConfigResource(ConfigResourceType.TOPIC, s.name) for s in present]
                for resp in await admin.describe_configs(resources_):
                    for res in resp.resources:
                        # (error_code, error_message, resource_type, resource_name, configs)
                        configs[res[3]] = {c[0]: c[1] for c in res[4]}
            except Exception:  # noqa: BLE001 - some Kafka-compatible brokers lack DescribeConfigs
                configs = {}
            for s in present:
                diffs = []
                if parts.get(s.name) != s.partitions:
                    diffs.append(f"partitions: declared {s.partitions}, broker has {parts.get(s.name)}")
                for k, v in s.config().items():
                    have = configs.get(s.name, {}).get(k)
                    if s.name in configs and have is not None and have != v:
                        diffs.append(f"{k}: declared {v}, broker has {have}")
                if diffs:
                    drift[s.name] = diffs
        unchanged = [s.name for s in present if s.name not in drift]
        return ApplyReport(created=created, unchanged=unchanged, drift=drift)
    finally:
        await admin.close()


# -- who may do what: the ACLs of the README's table ------------------------------------------------


@dataclass(frozen=True, slots=True)
class AclRule:
    """One row of the README's ACL table ("Who may do what"): allow ``principal`` the
    ``operations`` (named as ``kafka-acls.sh --operation`` names them) on ``names``, topics or
    groups, literal or (``prefixed``) every name that starts so."""

    principal: str
    operations: tuple[str, ...]
    resource: str  # "topic" or "group"
    names: tuple[str, ...]
    prefixed: bool = False

    def on(self) -> str:
        """The table's "on" cell: ``topics `a`, `b```, ``group `g```, ``prefixed topics `p```."""
        kind = self.resource + ("s" if len(self.names) > 1 or self.prefixed else "")
        return ("prefixed " if self.prefixed else "") + kind + " " + ", ".join(f"`{n}`" for n in self.names)

    def kafka_acls_args(self) -> str:
        """The arguments of ``kafka-acls.sh --add`` that grant this row."""
        ops = " ".join(f"--operation {op}" for op in self.operations)
        pattern = " --resource-pattern-type prefixed" if self.prefixed else ""
        names = " ".join(f"--{self.resource} {n}" for n in self.names)
        return f"--allow-principal {self.principal} {ops}{pattern} {names}"


TASKS_PREFIX = "dsr.tasks."
COORDINATOR_GROUP = "dsrflow-coordinator"


def acl_rules(systems: list[str] | tuple[str, ...] = ("crm",), *, dpo_tool_group: str = "dpo-tool",
              notifier_group: str = "notifier") -> list[AclRule]:
    """The ACLs each principal needs, and no more: the README's table is ``acl_rules(["crm"])``
    (tests/unit/test_acl_table.py compares them; tests/integration/test_acls.py grants them on a
    broker with an authorizer and shows each principal doing its part and refused the rest).
    One worker principal ``User:worker-<system>`` per system; the DPO's tool and the notifier
    consume as the groups named here (their own)."""
    read, write = ("Read", "Describe", "DescribeConfigs"), ("Write", "Describe", "DescribeConfigs")
    shared = tuple(n for n in declared() if "{system}" not in n)  # the prefix covers the task topics
    rules = [
        AclRule("User:coordinator", read, "topic", (REQUESTS, RECEIPTS, COMMANDS, SYSTEMS)),
        AclRule("User:coordinator", ("Read",), "group", (COORDINATOR_GROUP,)),
        AclRule("User:coordinator", write, "topic", (CASES, NOTICES, ALERTS, COMMAND_RESULTS, DEADLETTER,
                                                         SUPPRESSIONS)),
        AclRule("User:coordinator", write, "topic", (TASKS_PREFIX,), prefixed=True),
    ]
    for system in systems:
        worker = f"User:worker-{system}"
        rules += [
            AclRule(worker, read, "topic", (tasks_topic(system),)),
            AclRule(worker, ("Read",), "group", (f"dsrflow-worker-{system}",)),
            AclRule(worker, write, "topic", (RECEIPTS, SYSTEMS, DEADLETTER)),
        ]
    admin = ("Create", "Alter", "AlterConfigs", "Describe", "DescribeConfigs")
    rules += [
        AclRule("User:intake", ("Write", "Describe"), "topic", (REQUESTS,)),
        AclRule("User:dpo-tool", ("Write", "Describe"), "topic", (COMMANDS,)),
        AclRule("User:dpo-tool", ("Read", "Describe"), "topic", (COMMAND_RESULTS, ALERTS)),
        AclRule("User:dpo-tool", ("Read",), "group", (dpo_tool_group,)),
        AclRule("User:notifier", ("Read", "Describe"), "topic", (NOTICES,)),
        AclRule("User:notifier", ("Read",), "group", (notifier_group,)),
        AclRule("User:admin", admin, "topic", shared),
        AclRule("User:admin", admin, "topic", (TASKS_PREFIX,), prefixed=True),
    ]
    return rules


async def read_to_end(kafka_options: dict[str, Any], topic: str, each: Callable[[Any], None], *,
                      timeout: float = 30.0) -> bool:
    """Give every record of ``topic`` to ``each``, from its beginning to its end as of now (a
    compacted topic read whole: no consumer group, nothing committed). False when the topic does
    not exist; TimeoutError when it is not read to its end within ``timeout`` seconds."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(**kafka_options, enable_auto_commit=False, group_id=None,
                                auto_offset_reset="earliest")
    await consumer.start()
    try:
        cluster = await consumer._client.fetch_all_metadata()  # noqa: SLF001 - the partitions, fresh
        partitions = [TopicPartition(topic, p) for p in sorted(cluster.partitions_for_topic(topic) or ())]
        if not partitions:
            return False
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        ends = await consumer.end_offsets(partitions)
        deadline = time.monotonic() + timeout
        while True:
            behind = [tp for tp in partitions if await consumer.position(tp) < ends[tp]]
            if not behind:
                return True
            if time.monotonic() > deadline:
                raise TimeoutError(f"{topic} not read to its end within {timeout:g}s")
            for records in (await consumer.getmany(*behind, timeout_ms=500)).values():
                for r in records:
                    each(r)
    finally:
        await consumer.stop()
