"""The one settings object, read once from ``DSRFLOW_*`` environment variables.

Where a connection setting is not given, dsrflow uses the embedded stack that
``dsrflow stack up`` started: its addresses are in ``<state_dir>/stack.json``.
Connection settings are resolved only when used, so a command asks only for what it needs.
"""

from __future__ import annotations

import functools
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qs, urlsplit, urlunsplit

import orjson
from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict, SettingsError

from .errors import ConfigError, validation_summary

_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class StackNotRunning(ConfigError, RuntimeError):
    """No connection setting was given and no embedded stack is running.

    A :class:`~dsrflow.errors.ConfigError` (still a ``RuntimeError``, as it used to be)."""


def dsn_location(dsn: str) -> str:
    """``host:port/dbname`` of a PostgreSQL URL: how to name a database in a message,
    without its user name or password."""
    try:
        parts = urlsplit(dsn)
        query = parse_qs(parts.query)
        hosts = [h for h in parts.netloc.rpartition("@")[2].split(",") if h]
        if not hosts:
            hosts = [h for h in ",".join(query.get("host", [])).split(",") if h] or ["localhost"]
        port = (query.get("port") or ["5432"])[0]
        named = [h if h.startswith("/") or ":" in h.rpartition("]")[2] else f"{h}:{port}" for h in hosts]
        dbname = parts.path.lstrip("/") or (query.get("dbname") or [parts.username or "postgres"])[0]
        return f"{','.join(named)}/{dbname}"
    except ValueError:
        return "(unparsable DSRFLOW_PG_DSN)"


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
    api_port: int = Field(default=8080, ge=0, le=65535)
    api_token: SecretStr | None = None
    max_task_attempts: int = Field(default=3, ge=1)
    task_timeout: timedelta = Field(
        default=timedelta(minutes=15), description="no receipt by then: re-dispatch (seconds or ISO 8601)"
    )
    outbox_retention: timedelta = Field(default=timedelta(days=7), description="sent outbox rows kept this long")
    inbox_retention: timedelta = Field(
        default=timedelta(days=35), description="processed event ids kept this long; longer than any topic's retention"
    )
    startup_timeout: timedelta = Field(
        default=timedelta(seconds=120),
        description="how long a service waits at start for its broker and case store (seconds or ISO 8601)",
    )
    log_level: str = "INFO"

    @field_validator("task_timeout", "outbox_retention", "inbox_retention", "startup_timeout", mode="before")
    @classmethod
    def _seconds(cls, v: Any) -> Any:
        """A plain number in the environment ("120", "2.5") is seconds, as it is in code;
        pydantic alone reads strings only as ISO 8601 ("PT2M") or [-][[DD]D,]HH:MM:SS."""
        if isinstance(v, str):
            try:
                return float(v.strip())
            except ValueError:
                return v
        return v

    @field_validator("log_level", mode="before")
    @classmethod
    def _known_level(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = v.strip().upper()
            if v not in _LOG_LEVELS:
                raise ValueError(f"must be one of {', '.join(_LOG_LEVELS)}")
        return v

    @field_validator("pg_dsn", mode="before")
    @classmethod
    def _postgres_url(cls, v: Any) -> Any:
        raw = v.get_secret_value() if isinstance(v, SecretStr) else v
        if isinstance(raw, str) and not raw.startswith(("postgresql://", "postgres://")):
            # The value is never echoed: it may hold a password.
            raise ValueError("must be a URL like postgresql://user:pass@host:5432/dbname")
        return v

    @field_validator("startup_timeout")
    @classmethod
    def _positive(cls, v: timedelta) -> timedelta:
        if v.total_seconds() <= 0:
            raise ValueError("must be more than 0 seconds")
        return v

    # -- resolved values -------------------------------------------------
    def stack_file(self) -> Path:
        return self.state_dir / "stack.json"

    def _stack(self, variable: str = "DSRFLOW_KAFKA_BOOTSTRAP / DSRFLOW_PG_DSN") -> dict[str, Any]:
        path = self.stack_file()
        if not path.exists():
            raise StackNotRunning(
                f"no {variable} set and no embedded stack "
                f"in {self.state_dir.resolve()}: run `dsrflow stack up` or set it"
            )
        try:
            data: dict[str, Any] = orjson.loads(path.read_bytes())
        except (OSError, orjson.JSONDecodeError) as exc:
            raise StackNotRunning(f"cannot read {path.resolve()} ({type(exc).__name__}): "
                                  f"run `dsrflow stack up` or set {variable}") from exc
        return data

    @property
    def bootstrap(self) -> str:
        return self.kafka_bootstrap or str(self._stack("DSRFLOW_KAFKA_BOOTSTRAP")["kafka_bootstrap"])

    @property
    def dsn(self) -> str:
        if self.pg_dsn is not None:
            return self.pg_dsn.get_secret_value()
        return str(self._stack("DSRFLOW_PG_DSN")["pg_dsn"])

    @property
    def case_store_configured(self) -> bool:
        """A case store is configured: DSRFLOW_PG_DSN, or an embedded stack's."""
        return self.pg_dsn is not None or self.stack_file().exists()

    @property
    def case_store_location(self) -> str:
        """``host:port/dbname`` of the case store, for messages (no user name, no password)."""
        return dsn_location(self.dsn)

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
            idempotent = True if self.kafka_bootstrap else bool(
                self._stack("DSRFLOW_KAFKA_BOOTSTRAP").get("idempotent_producer", True))
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


def _variable(loc: tuple[Any, ...]) -> str:
    return f"DSRFLOW_{str(loc[0]).upper()}" if loc else "DSRFLOW_* settings"


@functools.cache
def get_settings() -> Settings:
    """The process-wide settings, read once.

    Raises :class:`~dsrflow.errors.ConfigError` naming each invalid ``DSRFLOW_*`` variable
    (never its value: it may be a secret)."""
    try:
        return Settings()
    except ValidationError as exc:
        raise ConfigError("invalid setting " + validation_summary(exc, _variable)) from exc
    except SettingsError as exc:  # a value the environment source could not even parse
        raise ConfigError(f"invalid settings: {exc}") from exc
