"""Fixtures of the end-to-end tests: settings for a run of the real services."""

from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from dsrflow.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.fixture
async def e2e_settings(
    broker: str, broker_kind: str, case_store: str, make_database: Callable[..., Awaitable[str]],
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> Settings:
    # Each reference system gets a fresh database of its own, for this process and the workers.
    monkeypatch.setenv("DSRFLOW_CRM_DSN", await make_database("crm"))
    monkeypatch.setenv("DSRFLOW_BILLING_DSN", await make_database("billing"))
    return Settings(
        state_dir=tmp_path / "state", kafka_bootstrap=broker, pg_dsn=case_store, export_dir=tmp_path / "exports",
        kafka_idempotent_producer=broker_kind != "tansu", log_level="INFO",
    )
