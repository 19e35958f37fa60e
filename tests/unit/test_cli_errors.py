"""Pure parts of "one clear line": the error tree, settings errors, naming a database without its
password, the bounded wait at start, and the parser (no broker, no database)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import BaseModel, Field, ValidationError

from dsrflow import cli, client
from dsrflow._startup import retry_at_start
from dsrflow.errors import (
    BrokerUnavailable,
    CaseStoreUnavailable,
    ConfigError,
    DsrflowError,
    InvalidInput,
    ServiceUnavailable,
    TopicMissing,
    validation_summary,
)
from dsrflow.settings import Settings, StackNotRunning, dsn_location, get_settings

SECRET = "pa55-w0rd"


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    """No DSRFLOW_* from the outer environment; get_settings() read afresh, and again after."""
    import os

    for k in list(os.environ):
        if k.startswith("DSRFLOW_"):
            monkeypatch.delenv(k)
    get_settings.cache_clear()
    yield monkeypatch
    get_settings.cache_clear()


def test_the_error_tree() -> None:
    assert issubclass(StackNotRunning, ConfigError) and issubclass(StackNotRunning, RuntimeError)
    for cls in (ConfigError, InvalidInput, ServiceUnavailable, TopicMissing):
        assert issubclass(cls, DsrflowError)
    assert issubclass(BrokerUnavailable, ServiceUnavailable) and issubclass(CaseStoreUnavailable, ServiceUnavailable)
    assert str(TopicMissing("dsr.requests.v1", "k:9092")) == (
        "topic dsr.requests.v1 does not exist on k:9092: run `dsrflow topics apply`")
    assert str(BrokerUnavailable("k:9092")) == "no Kafka broker answers at k:9092"
    assert str(CaseStoreUnavailable("db:5432/dsrflow", "connection refused")) == (
        "case store unreachable at db:5432/dsrflow (connection refused)")


@pytest.mark.parametrize(("dsn", "location"), [
    (f"postgresql://dsr:{SECRET}@db.internal:5433/dsrflow", "db.internal:5433/dsrflow"),
    (f"postgresql://dsr:{SECRET}@db.internal/dsrflow", "db.internal:5432/dsrflow"),
    (f"postgres://dsr:{SECRET}@[::1]:6432/cases?sslmode=require&password={SECRET}", "[::1]:6432/cases"),
    ("postgresql://h1:5432,h2/dsrflow", "h1:5432,h2:5432/dsrflow"),
    (f"postgresql://dsr:{SECRET}@db", "db:5432/dsr"),
    ("postgresql:///dsrflow?host=/run/postgresql", "/run/postgresql/dsrflow"),
])
def test_a_database_is_named_without_its_credentials(dsn: str, location: str) -> None:
    assert dsn_location(dsn) == location
    assert SECRET not in dsn_location(dsn)


def test_settings_errors_name_the_variable_and_never_the_value(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("DSRFLOW_API_PORT", "abc")
    clean_env.setenv("DSRFLOW_KAFKA_SECURITY_PROTOCOL", SECRET)
    clean_env.setenv("DSRFLOW_PG_DSN", f"mysql://u:{SECRET}@db/x")
    with pytest.raises(ConfigError) as info:
        get_settings()
    message = str(info.value)
    assert "\n" not in message and SECRET not in message
    for variable in ("DSRFLOW_API_PORT", "DSRFLOW_KAFKA_SECURITY_PROTOCOL", "DSRFLOW_PG_DSN"):
        assert variable in message


@pytest.mark.parametrize(("value", "seconds"), [("2", 2), ("2.5", 2.5), ("PT1M", 60), ("00:00:03", 3)])
def test_durations_in_the_environment_are_seconds_or_iso(clean_env: pytest.MonkeyPatch, value: str,
                                                          seconds: float) -> None:
    clean_env.setenv("DSRFLOW_STARTUP_TIMEOUT", value)
    clean_env.setenv("DSRFLOW_TASK_TIMEOUT", value)
    s = get_settings()
    assert s.startup_timeout.total_seconds() == seconds == s.task_timeout.total_seconds()


def test_startup_timeout_defaults_to_two_minutes(clean_env: pytest.MonkeyPatch) -> None:
    assert get_settings().startup_timeout.total_seconds() == 120


def test_a_missing_connection_setting_names_only_itself(tmp_path: Path) -> None:
    s = Settings(state_dir=tmp_path)
    with pytest.raises(StackNotRunning, match="no DSRFLOW_PG_DSN set"):
        _ = s.dsn
    with pytest.raises(StackNotRunning, match="no DSRFLOW_KAFKA_BOOTSTRAP set"):
        s.producer_options()
    assert not s.case_store_configured
    assert Settings(state_dir=tmp_path, pg_dsn="postgresql://db/x").case_store_configured


def test_validation_summary_leaves_the_input_out() -> None:
    class M(BaseModel):
        email: str = Field(pattern=r"^[^@]+@[^@]+$")
        n: int

    with pytest.raises(ValidationError) as info:
        M(email="lan.nguyen-at-example.vn", n="x")
    line = validation_summary(info.value)
    assert line.startswith("email: String should match pattern") and "n: Input should be a valid integer" in line
    assert "lan.nguyen" not in line


# -- the parser --------------------------------------------------------------------
def test_help_reads_no_settings(clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    clean_env.setenv("DSRFLOW_API_PORT", "abc")
    with pytest.raises(SystemExit) as info:
        cli.build_parser().parse_args(["submit", "--help"])
    assert info.value.code == 0 and "--jurisdiction" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [[], ["cases", "list", "--limit", "0"], ["submit", "--right", "nope"],
                                  ["stack", "sideways"]])
def test_parser_errors_are_invalid_input(argv: list[str]) -> None:
    with pytest.raises(InvalidInput):
        cli.build_parser().parse_args(argv)


def test_main_turns_a_parser_error_into_one_line_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["cases", "list", "--limit", "-1"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and captured.err.startswith("error: argument --limit: must be at least 1")


def test_unexpected_errors_are_one_line_too(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli._fail(RuntimeError("boom\n  second line"), None) == 1
    assert capsys.readouterr().err == "error: unexpected RuntimeError: boom second line\n"


# -- mapping connection failures -------------------------------------------------------
def test_connection_failures_are_named_without_secrets(tmp_path: Path) -> None:
    from aiokafka.errors import KafkaConnectionError, KafkaTimeoutError

    s = Settings(state_dir=tmp_path, kafka_bootstrap="k1:9092,k2:9092",
                 pg_dsn=f"postgresql://dsr:{SECRET}@db:5432/dsrflow")
    assert str(client.broker_error(s, KafkaConnectionError("x"))) == "no Kafka broker answers at k1:9092,k2:9092"
    assert "no answer within 5s" in str(client.broker_error(s, KafkaTimeoutError(), 5))
    assert client.broker_error(s, ValueError("not ours")) is None
    refused = client.case_store_error(s, ConnectionRefusedError(111, "Connect call failed"))
    assert str(refused) == "case store unreachable at db:5432/dsrflow (connection refused)"
    assert client.case_store_error(s, KeyError("x")) is None
    for exc in (refused, client.case_store_error(s, TimeoutError())):
        assert SECRET not in str(exc) and "dsr:" not in str(exc)


# -- the bounded wait at start ------------------------------------------------------------
_log = logging.getLogger("test.startup")


def _as_broker_error(exc: BaseException) -> DsrflowError | None:
    return BrokerUnavailable("k:9092") if isinstance(exc, ConnectionError) else None


async def test_retry_at_start_waits_out_a_service_that_comes_up() -> None:
    calls = 0

    async def attempt() -> str:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise ConnectionRefusedError
        return "up"

    got = await retry_at_start("down", attempt, timeout=10, retryable=lambda e: isinstance(e, ConnectionError),
                               fail=_as_broker_error, log=_log)
    assert got == "up" and calls == 3


async def test_retry_at_start_gives_up_after_the_timeout(caplog: pytest.LogCaptureFixture) -> None:
    async def attempt() -> None:
        raise ConnectionRefusedError

    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="test.startup"), pytest.raises(BrokerUnavailable) as info:
        await retry_at_start("broker unreachable", attempt, timeout=1.2,
                             retryable=lambda e: isinstance(e, ConnectionError), fail=_as_broker_error, log=_log)
    assert 1.2 <= time.monotonic() - t0 < 4
    assert str(info.value) == "no Kafka broker answers at k:9092; waited 1.2s (DSRFLOW_STARTUP_TIMEOUT)"
    assert len(caplog.records) >= 2
    assert all(r.getMessage().startswith("broker unreachable (ConnectionRefusedError); retrying")
               for r in caplog.records)


async def test_retry_at_start_bounds_an_attempt_that_hangs() -> None:
    async def attempt() -> None:
        await asyncio.sleep(60)

    t0 = time.monotonic()
    with pytest.raises(TimeoutError):  # not mapped by this fail(): re-raised as it was
        await retry_at_start("hangs", attempt, timeout=1, retryable=lambda e: isinstance(e, TimeoutError),
                             fail=_as_broker_error, log=_log)
    assert time.monotonic() - t0 < 5


async def test_retry_at_start_does_not_retry_what_cannot_pass() -> None:
    calls = 0

    async def attempt() -> None:
        nonlocal calls
        calls += 1
        raise PermissionError("no")

    with pytest.raises(PermissionError):
        await retry_at_start("x", attempt, timeout=30, retryable=lambda e: isinstance(e, ConnectionError),
                             fail=_as_broker_error, log=_log)
    assert calls == 1
