"""Fixtures the integration tests share: the reference systems' own databases, created, seeded and
opened by their workers' startup hooks (as ``dsrflow worker crm`` would), one fresh database per test;
and a reader of the receipts on the session's broker (:mod:`tests.integration.receipts`)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from pydantic import SecretStr

from dsrflow import topics
from dsrflow.settings import Settings
from examples.billing import worker as billing
from examples.crm import worker as crm
from tests.integration.receipts import Receipts

MakeDatabase = Callable[[], Awaitable[str]]


@pytest.fixture
async def crm_dsn(make_database: MakeDatabase, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[str]:
    """A seeded CRM database, with the CRM worker's startup hooks run against it."""
    dsn = await make_database()
    await crm.setup(dsn)
    monkeypatch.setenv("DSRFLOW_CRM_DSN", dsn)
    # Settings would otherwise point the hook at the case store's server; the env var wins.
    async with crm.worker.lifespan(Settings(pg_dsn=SecretStr(dsn))):
        yield dsn


@pytest.fixture
async def billing_dsn(make_database: MakeDatabase, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[str]:
    """A seeded billing database, with the billing worker's startup hooks run against it."""
    dsn = await make_database()
    await billing.setup(dsn)
    monkeypatch.setenv("DSRFLOW_BILLING_DSN", dsn)
    async with billing.worker.lifespan(Settings(pg_dsn=SecretStr(dsn))):
        yield dsn


@pytest.fixture
async def receipts(broker: str) -> AsyncIterator[Receipts]:
    await topics.apply({"bootstrap_servers": broker}, topics.specs_for([]))  # receipts, dead letters
    reader = Receipts(broker)
    await reader.consumer.start()
    try:
        yield reader
    finally:
        await reader.consumer.stop()
