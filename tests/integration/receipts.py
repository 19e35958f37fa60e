"""A reader of the receipts on the session's broker, for tests of workers over Kafka (the
``receipts`` fixture in conftest.py gives one)."""

from __future__ import annotations

import time
import uuid

from aiokafka import AIOKafkaConsumer, ConsumerRecord

from dsrflow import codec, topics
from dsrflow.events import TaskReceipt

RECEIPT_WAIT = 60.0  # seconds any one wait for receipts may take


class Receipts:
    """Reads dsr.receipts.v1 from the beginning with a plain consumer, and keeps the receipts. The
    topic is shared by the session: progress reports, and other tests' invalid receipts, are left
    out."""

    def __init__(self, bootstrap: str) -> None:
        self.consumer = AIOKafkaConsumer(topics.RECEIPTS, bootstrap_servers=bootstrap, group_id=None,
                                         auto_offset_reset="earliest")
        self.records: list[ConsumerRecord[bytes, bytes]] = []

    def of(self, task_id: uuid.UUID) -> list[tuple[ConsumerRecord[bytes, bytes], TaskReceipt]]:
        """The receipts of ``task_id`` read so far, with their records, in the order they came."""
        out = []
        for r in self.records:
            try:
                receipt = codec.decode(r.value, r.headers, TaskReceipt).data
            except codec.DecodeError:
                continue
            if receipt.task_id == task_id:
                out.append((r, receipt))
        return out

    async def read(self, seconds: float) -> None:
        """Read what comes for ``seconds``."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            for records in (await self.consumer.getmany(timeout_ms=200)).values():
                self.records.extend(records)

    async def wait_for(self, task_ids: list[uuid.UUID], copies: int = 1) -> None:
        """Read until each of ``task_ids`` has ``copies`` receipts; TimeoutError after RECEIPT_WAIT."""
        deadline = time.monotonic() + RECEIPT_WAIT
        while True:
            missing = [t for t in task_ids if len(self.of(t)) < copies]
            if not missing:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(missing)} of {len(task_ids)} tasks without {copies} receipt(s)")
            await self.read(0.3)

    async def first(self, task_id: uuid.UUID) -> TaskReceipt:
        """The first receipt of ``task_id``, waited for."""
        await self.wait_for([task_id])
        return self.of(task_id)[0][1]
