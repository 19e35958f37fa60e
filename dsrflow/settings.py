"""The one settings object, read once from ``DSRFLOW_*`` environment variables.

Where a connection setting is not given, dsrflow uses the embedded stack that
``dsrflow stack up`` started: its addresses are in ``<state_dir>/stack.json``.
"""

from __future__ import annotations

import functools
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

import orjson
from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class StackNotRunning(RuntimeError):
    """No connection setting was given and no embedded stack is running."""


class Settings(BaseSettings):
    """dsrflow's configuration. Every field is ``DSRFLOW_<FIELD>`` in the environment."""

    model_config = SettingsConfigDict(env_prefix="DSRFLOW_", extra="ignore")

    state_dir: Path = Field(default=Path(".dsrflow"), description="embedded stack state, default data")
    kafka_bootstrap: str | None = Field(default=None, description="host:port[,host:port]")
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_ssl_cafile: Path | None = None
    kafka_idempotent_producer: bool | None = Field(
        default=None,
        description="default true; false only for brokers without InitProducerId (the embedded Tansu broker)",
    )
    pg_dsn: SecretStr | None = Field(default=None, description="postgresql://user:pass@host:port/db")
    export_dir: Path | None = Field(default=None, description="export store root; default <state_dir>/exports")
    topic_replication_factor: int = Field(default=1, ge=1, description="for topics dsrflow creates; 3 in production")
    jurisdiction: str = "VN"
    api_host: str = "127.0.0.1"
    api_port: int = 8080
    api_token: SecretStr | None = None
    max_task_attempts: int = Field(default=3, ge=1)
    task_timeout: timedelta = Field(
        default=timedelta(minutes=15), description="no receipt by then: re-dispatch (seconds or ISO 8601)"
    )
    outbox_retention: timedelta = Field(default=timedelta(days=7), description="sent outbox rows kept this long")
    inbox_retention: timedelta = Field(
        default=timedelta(days=35), description="processed event ids kept this long; longer than any topic's retention"
    )
    log_level: str = "INFO"

    # -- resolved values -------------------------------------------------
    def stack_file(self) -> Path:
        return self.state_dir / "stack.json"

    def _stack(self) -> dict[str, Any]:
        path = self.stack_file()
        if not path.exists():
            raise StackNotRunning(
                "no DSRFLOW_KAFKA_BOOTSTRAP / DSRFLOW_PG_DSN set and no embedded stack "
                f"in {self.state_dir.resolve()}: run `dsrflow stack up` or set them"
            )
        data: dict[str, Any] = orjson.loads(path.read_bytes())
        return data

    @property
    def bootstrap(self) -> str:
        return self.kafka_bootstrap or str(self._stack()["kafka_bootstrap"])

    @property
    def dsn(self) -> str:
        if self.pg_dsn is not None:
            return self.pg_dsn.get_secret_value()
        return str(self._stack()["pg_dsn"])

    def database_dsn(self, database: str) -> str:
        """The DSN of another database on the same PostgreSQL server."""
        parts = urlsplit(self.dsn)
        return urlunsplit(parts._replace(path="/" + database))

    @property
    def exports(self) -> Path:
        return self.export_dir or (self.state_dir / "exports")

    def producer_options(self) -> dict[str, Any]:
        """Options for every dsrflow producer: acks=all and, where the broker supports it, idempotence."""
        idempotent = self.kafka_idempotent_producer
        if idempotent is None:
            idempotent = True if self.kafka_bootstrap else bool(self._stack().get("idempotent_producer", True))
        return {**self.kafka_client_options(), "acks": "all", "enable_idempotence": idempotent}

    def kafka_client_options(self) -> dict[str, Any]:
        """Connection options for aiokafka clients (producer, consumer, admin)."""
        opts: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap,
            "security_protocol": self.kafka_security_protocol,
        }
        if self.kafka_sasl_mechanism:
            opts["sasl_mechanism"] = self.kafka_sasl_mechanism
            opts["sasl_plain_username"] = self.kafka_sasl_username
            opts["sasl_plain_password"] = (
                self.kafka_sasl_password.get_secret_value() if self.kafka_sasl_password else None
            )
        if self.kafka_security_protocol in ("SSL", "SASL_SSL"):
            from aiokafka.helpers import create_ssl_context

            opts["ssl_context"] = create_ssl_context(
                cafile=str(self.kafka_ssl_cafile) if self.kafka_ssl_cafile else None
            )
        return opts


@functools.cache
def get_settings() -> Settings:
    """The process-wide settings, read once."""
    return Settings()
