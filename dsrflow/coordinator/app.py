"""The coordinator as a faust app: agents on dsr.requests.v1, dsr.receipts.v1, dsr.commands.v1
and dsr.systems.v1, and the outbox relay as a long-running task.

Faust gives us the consumer group, partition assignment and batching (``take_events``
acks a batch only after its transaction committed). We do not use its
``exactly_once`` guarantee: idempotency comes from the inbox and the outbox.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import asyncpg
import faust

from .. import topics
from ..settings import Settings
from ..store.errors import is_transient, where
from .relay import OutboxRelay
from .service import AGGREGATOR, COMMANDS, INTAKE, Coordinator, Record
from .systems import ANNOUNCEMENTS

if TYPE_CHECKING:
    from .._startup import StartupBudget

log = logging.getLogger("dsrflow.coordinator")

BATCH = 500
WITHIN = 0.02  # seconds a batch may wait to fill
SWEEP_INTERVAL = 30.0  # seconds between looks for tasks without a receipt


def _credentials(settings: Settings) -> Any:
    opts = settings.kafka_client_options()
    proto = settings.kafka_security_protocol
    if proto.startswith("SASL"):
        return faust.SASLCredentials(
            username=opts.get("sasl_plain_username"),
            password=opts.get("sasl_plain_password"),
            mechanism=settings.kafka_sasl_mechanism,
            ssl_context=opts.get("ssl_context"),
        )
    if proto == "SSL":
        return faust.SSLCredentials(opts["ssl_context"])
    return None


def _records(events: Sequence[Any]) -> list[Record]:
    out = []
    for ev in events:
        m = ev.message
        out.append(Record(m.topic, m.partition, m.offset, m.key, m.value, m.headers or []))
    return out


def create_app(settings: Settings) -> faust.App:
    """Build the coordinator app for these settings."""
    (settings.state_dir / "faust").mkdir(parents=True, exist_ok=True)
    brokers = ";".join(f"kafka://{b.strip()}" for b in settings.bootstrap.split(","))
    app = faust.App(
        "dsrflow-coordinator",
        broker=brokers,
        broker_credentials=_credentials(settings),
        key_serializer="raw",
        value_serializer="raw",
        web_enabled=False,
        topic_allow_declare=False,
        topic_disable_leader=True,
        consumer_auto_offset_reset="earliest",
        datadir=str(settings.state_dir / "faust"),
        producer_acks=-1,
        broker_commit_interval=0.5,
        # A restarted coordinator rejoins quickly; the default (60 s) stalls intake that long.
        broker_session_timeout=10.0,
        broker_heartbeat_interval=3.0,
    )
    state: dict[str, Any] = {}
    ready = asyncio.Event()

    async def coordinator() -> Coordinator:
        await ready.wait()
        return state["coordinator"]  # type: ignore[no-any-return]

    requests = app.topic(topics.REQUESTS, key_type=bytes, value_type=bytes)
    receipts = app.topic(topics.RECEIPTS, key_type=bytes, value_type=bytes)
    decisions = app.topic(topics.COMMANDS, key_type=bytes, value_type=bytes)
    announcements = app.topic(topics.SYSTEMS, key_type=bytes, value_type=bytes)

    async def consume(stream: faust.StreamT[bytes], label: str, consumer: str, handler: str) -> None:
        c = await coordinator()
        async for events in stream.take_events(BATCH, within=WITHIN):  # type: ignore[attr-defined]
            log.info("%s: %d record(s)", label, len(events))
            await _with_retry(c, getattr(c, handler), consumer, _records(events))

    @app.agent(requests)
    async def intake(stream: faust.StreamT[bytes]) -> None:
        await consume(stream, "intake", INTAKE, "handle_requests")

    @app.agent(receipts)
    async def aggregate(stream: faust.StreamT[bytes]) -> None:
        await consume(stream, "receipts", AGGREGATOR, "handle_receipts")

    @app.agent(decisions)
    async def command(stream: faust.StreamT[bytes]) -> None:
        await consume(stream, "commands", COMMANDS, "handle_commands")

    @app.agent(announcements)
    async def systems(stream: faust.StreamT[bytes]) -> None:
        await consume(stream, "announcements", ANNOUNCEMENTS, "handle_announcements")

    @app.timer(interval=SWEEP_INTERVAL)  # type: ignore[untyped-decorator]
    async def sweep() -> None:
        if ready.is_set():
            try:
                await state["coordinator"].sweep_stalled()
                await state["coordinator"].watch_deadlines()
                await state["coordinator"].pseudonymise_closed()
                await state["coordinator"].plan_new_systems()
                await state["coordinator"].prune()
            except Exception as exc:  # noqa: BLE001 - a timer must not die; the next interval retries
                log.warning("sweep failed (%s); the next interval retries", type(exc).__name__)

    @app.task  # type: ignore[untyped-decorator]
    async def relay() -> None:
        settings.exports.mkdir(parents=True, exist_ok=True)
        delay = 0.5
        while True:  # the agents wait for this: a database still starting up is waited for, not fatal
            try:
                pool = await asyncpg.create_pool(settings.dsn, min_size=1, max_size=4)
                break
            except Exception as exc:  # noqa: BLE001
                if not is_transient(exc):
                    raise
                log.warning("case store unreachable (%s); retrying in %.1fs", type(exc).__name__, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
        state["coordinator"] = Coordinator(settings, pool)
        state["pool"] = pool
        ready.set()
        log.info("coordinator ready")
        await OutboxRelay(settings).run()

    return app


async def _with_retry(c: Coordinator, handler: Any, consumer: str, records: list[Record]) -> None:
    """Handle a batch; the batch is acked only once this returns, so nothing in here may raise.

    Transient errors (database unreachable, failover, serialisation) are retried with backoff
    until they pass. Any other error is a record the handler could not process although it
    decoded: the batch is split and the one record that still fails is dead-lettered.
    """
    delay = 0.5
    while True:
        try:
            await handler(records)
            return
        except Exception as exc:  # noqa: BLE001 - the agent must not die, and must not ack undone work
            if is_transient(exc):
                log.warning("batch of %d failed (%s); retrying in %.1fs", len(records), type(exc).__name__, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
                continue
            if len(records) > 1:
                for rec in records:
                    await _with_retry(c, handler, consumer, [rec])
                return
            reason = where(exc)  # no message: it may quote personal data
            log.error("record %s[%d]@%d could not be processed: %s", records[0].topic, records[0].partition,
                      records[0].offset, reason)
            await _dead_letter_until_done(c, records[0], consumer, reason)
            return


async def _dead_letter_until_done(c: Coordinator, record: Record, consumer: str, reason: str) -> None:
    """Dead-letter a record, waiting out outages. Should the record itself be unstorable, a
    letter without its original headers goes instead: it still names topic, partition and offset."""
    delay = 0.5
    while True:
        try:
            await c.dead_letter(record, consumer, "processing_error", reason)
            return
        except Exception as exc:  # noqa: BLE001 - stall rather than ack a record that went nowhere
            if not is_transient(exc):
                log.error("dead letter unstorable (%s); sending it without the original headers", where(exc))
                record = dataclasses.replace(record, headers=[])
                reason = f"{reason}; original headers dropped ({type(exc).__name__})"
                continue
            log.warning("dead-lettering failed (%s); retrying in %.1fs", type(exc).__name__, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)


async def _apply_topics(settings: Settings, budget: StartupBudget | None = None) -> topics.ApplyReport:
    """Create the coordinator's topics, waiting out a broker that is not up yet, within
    ``budget`` (``settings.startup_timeout`` when None); then
    :class:`~dsrflow.errors.BrokerUnavailable`."""
    from .._startup import wait_for_broker

    async def attempt() -> topics.ApplyReport:
        return await topics.apply(settings.kafka_client_options(), topics.specs_for([]),
                                  replication_factor=settings.topic_replication_factor)

    return await wait_for_broker(settings, attempt, log=log, budget=budget)


async def _prepare(settings: Settings) -> topics.ApplyReport:
    """What must hold before faust starts: the topics exist and the case store answers, both
    within one ``settings.startup_timeout`` (a broker that took most of it leaves the case store
    the rest). The relay's own wait for the database (inside faust) then only covers an outage
    that starts later."""
    from .._startup import StartupBudget, check_case_store

    budget = StartupBudget.of(settings)
    report = await _apply_topics(settings, budget)
    await check_case_store(settings, log=log, budget=budget)
    return report


def run(settings: Settings) -> None:
    """Run the coordinator in the foreground until SIGINT/SIGTERM.

    Its own topics are created first if missing (as ``dsrflow topics apply`` would): a broker
    that auto-creates topics would otherwise make them on first use, with its own partition
    count and retention. A broker or case store that does not answer within
    ``settings.startup_timeout`` raises a :class:`~dsrflow.errors.ServiceUnavailable`."""
    report = asyncio.run(_prepare(settings))
    for name, diffs in report.drift.items():
        log.warning("topic %s differs from topics/: %s", name, "; ".join(diffs))
    app = create_app(settings)
    worker = faust.Worker(app, loglevel=settings.log_level, quiet=True)
    worker.execute_from_commandline()
