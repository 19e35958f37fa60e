"""The one settings object, read once from ``DSRFLOW_*`` environment variables.

Where a connection setting is not given, dsrflow uses the embedded stack that
``dsrflow stack up`` started, while it runs: its addresses are in ``<state_dir>/stack.json``.

Settings are read tolerantly: an invalid ``DSRFLOW_*`` value does not stop the settings from
being built. The field keeps its default, and reading it raises a
:class:`~dsrflow.errors.ConfigError` naming the variable, so a command fails only on the
settings it uses (:meth:`Settings.require` checks a list up front, as a service does at start).
Connection settings are resolved only when used, so a command asks only for what it needs.
"""

from __future__ import annotations

import functools
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import parse_qs, urlsplit, urlunsplit

import orjson
from pydantic import Field, PrivateAttr, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict, SettingsError

from .errors import ConfigError, validation_summary

_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class StackNotRunning(ConfigError, RuntimeError):
    """No connection setting was given and no embedded stack is running (none was started, or
    its stack.json outlived its processes).

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


def _dsn_problem(dsn: str) -> str | None:
    """What is wrong with a PostgreSQL URL that asyncpg would fail on with a bare ValueError or
    OverflowError, or None. Never quotes the URL: it may hold a password (``user:password``
    without an ``@host`` even parses as a host and its port)."""
    try:
        parts = urlsplit(dsn)
    except ValueError:
        return "is not a valid URL (postgresql://user:pass@host:5432/dbname)"
    ports = []
    for host in parts.netloc.rpartition("@")[2].split(","):
        after_host = host.rpartition("]")[2] if host.startswith("[") else host  # [::1]:5432
        if ":" in after_host:
            ports.append(after_host.rpartition(":")[2])
    ports += [p for value in parse_qs(parts.query).get("port", []) for p in value.split(",")]
    if any(p and not (p.isascii() and p.isdigit() and 1 <= int(p) <= 65535) for p in ports):
        return "has a port that is not a number from 1 to 65535 (postgresql://user:pass@host:5432/dbname)"
    return None


def _variable(loc: tuple[Any, ...]) -> str:
    return f"DSRFLOW_{str(loc[0]).upper()}" if loc else "DSRFLOW_* settings"


def _env_errors(exc: ValidationError, given: dict[str, Any]) -> dict[str, str] | None:
    """Field -> message for each error of ``exc``, when every one is on a value that came from
    the environment (not among the keyword arguments ``given``); else None. No input is quoted."""
    out: dict[str, str] = {}
    for err in exc.errors(include_url=False, include_input=False):
        loc = err.get("loc", ())
        field = str(loc[0]) if loc else ""
        if field not in Settings.model_fields or field in given:
            return None
        msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        out[field] = f"{out[field]}; {msg}" if field in out else msg
    return out


class Settings(BaseSettings):
    """dsrflow's configuration. Every field is ``DSRFLOW_<FIELD>`` in the environment."""

    model_config = SettingsConfigDict(env_prefix="DSRFLOW_", extra="ignore")

    #: field -> what is wrong with its DSRFLOW_* value (the field holds its default meanwhile)
    _invalid: dict[str, str] = PrivateAttr(default_factory=dict)

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
    task_backoff_max: timedelta = Field(
        default=timedelta(hours=12),
        description="a silent task is re-sent after task_timeout, doubled each time up to this (seconds or ISO 8601)",
    )
    deadline_warning_share: float = Field(
        default=0.75, gt=0, lt=1,
        description="share of the time from receipt to due date after which the watcher warns; silent tasks are "
        "then surfaced to the DPO instead of re-sent",
    )
    internal_target: str | None = Field(
        default=None,
        description="the organisation's own target, before the legal due date: '80%' of the period, '5wd' "
        "working days or '3d' days before it",
    )
    case_data_retention: timedelta | None = Field(
        default=None,
        description="how long a closed case keeps the subject's identifiers, corrections and notes; then they "
        "are pseudonymised (the evidence stays). Unset: kept (seconds or ISO 8601)",
    )
    pseudonym_key: SecretStr | None = Field(
        default=None, description="key of the keyed hash that replaces a pseudonymised case's identifiers")
    suppression_key: Path | None = Field(
        default=None, description="key file of the suppression list (dsrflow suppression key): completed erasures "
        "publish their subjects' identifiers, hashed with it, to dsr.suppressions.v1. Unset: nothing is published")
    bundle_retention: timedelta = Field(
        default=timedelta(days=30),
        description="how long an access case's bundle, and the systems' exports it was built from, are kept once "
        "the case finished; then they are deleted (seconds or ISO 8601)",
    )
    offboarding_period: timedelta = Field(
        default=timedelta(days=30),
        description="how long a processor takes to hand over or delete a leaving client's data, as its contract "
        "promises (seconds or ISO 8601)",
    )
    worker_credential: Path | None = Field(
        default=None, description="a worker's signing key (dsrflow systems key NAME): its receipts are signed with it")
    worker_ledger_dsn: SecretStr | None = Field(
        default=None, description="where a worker keeps its task ledger (a PostgreSQL the worker owns); default the "
        "case store, as on the embedded stack")
    coordinator_credential: Path | None = Field(
        default=None, description="the coordinator's signing key (dsrflow systems coordinator-key): every task is "
        "signed with it")
    coordinator_public_keys: Path | None = Field(
        default=None, description="a worker acts only on tasks signed by one of the keys in this file (written by "
        "dsrflow systems coordinator-key)")
    require_signed_receipts: bool = Field(
        default=False, description="the coordinator refuses unsigned receipts from every system, not only from "
        "systems that have a key")
    credential: Path | None = Field(
        default=None, description="the CLI's credential file (dsrflow actors add): who the DPO's decisions are by")
    log_level: str = "INFO"

    @field_validator("internal_target")
    @classmethod
    def _target_spec(cls, v: Any) -> Any:
        if isinstance(v, str) and v.strip():
            from .policy.deadlines import parse_target_spec

            parse_target_spec(v.strip())  # a ValueError names what is wrong with it
            return v.strip()
        return None if v is not None and not str(v).strip() else v

    @field_validator("task_timeout", "outbox_retention", "inbox_retention", "startup_timeout", "task_backoff_max",
                     "case_data_retention", "offboarding_period", "bundle_retention", mode="before")
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

    @field_validator("suppression_key", mode="before")
    @classmethod
    def _suppression_key_file(cls, v: Any) -> Any:
        """A key file that cannot be used is an invalid setting, found when a service starts
        (:meth:`require`), not at the first completed erasure. Empty: no key."""
        if isinstance(v, str) and not v.strip():
            return None
        if isinstance(v, str | Path):
            from .suppression import load_key

            try:
                load_key(v)
            except ConfigError as exc:  # one line naming the file, never its secret
                raise ValueError(str(exc)) from None
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
        if isinstance(raw, str):
            # The value is never echoed: it may hold a password.
            if not raw.startswith(("postgresql://", "postgres://")):
                raise ValueError("must be a URL like postgresql://user:pass@host:5432/dbname")
            problem = _dsn_problem(raw)
            if problem:
                raise ValueError(problem)
        return v

    @field_validator("startup_timeout", "bundle_retention")
    @classmethod
    def _positive(cls, v: timedelta) -> timedelta:
        if v.total_seconds() <= 0:
            raise ValueError("must be more than 0 seconds")
        return v

    # -- tolerant reading ---------------------------------------------------
    if not TYPE_CHECKING:  # hidden from mypy: the generated signature and attribute checks stay

        def __init__(self, **values: Any) -> None:
            """An invalid value from the environment is remembered, not raised: the field keeps
            its default and raises :class:`ConfigError` when read. An invalid keyword argument
            raises ``ValidationError`` at once, as in any pydantic model."""
            try:
                super().__init__(**values)
                return
            except ValidationError as exc:
                invalid = _env_errors(exc, values)
                if invalid is None:
                    raise
            defaults = {f: type(self).model_fields[f].get_default(call_default_factory=True) for f in invalid}
            super().__init__(**values, **defaults)
            self._invalid = invalid

        def __getattribute__(self, name: str) -> Any:
            if name in _FIELDS:
                try:
                    invalid = object.__getattribute__(self, "__pydantic_private__")["_invalid"]
                except (AttributeError, KeyError, TypeError):  # still being built
                    invalid = None
                if invalid and name in invalid:
                    raise ConfigError(f"invalid setting {_variable((name,))}: {invalid[name]}")
            return object.__getattribute__(self, name)

    @property
    def invalid(self) -> dict[str, str]:
        """``DSRFLOW_*`` variable -> what is wrong with its value, for every invalid one."""
        return {_variable((f,)): msg for f, msg in self._invalid.items()}

    def require(self, *fields: str) -> None:
        """Raise one :class:`ConfigError` naming every invalid ``DSRFLOW_*`` variable among
        ``fields`` (all fields when none are given); what a service checks before it starts."""
        names = fields or tuple(type(self).model_fields)
        bad = [f"{_variable((f,))}: {self._invalid[f]}" for f in names if f in self._invalid]
        if bad:
            raise ConfigError("invalid setting " + "; ".join(bad))

    # -- resolved values -------------------------------------------------
    def stack_file(self) -> Path:
        return self.state_dir / "stack.json"

    def _stack_data(self) -> dict[str, Any] | None:
        try:
            data = orjson.loads(self.stack_file().read_bytes())
        except (OSError, orjson.JSONDecodeError):
            return None
        return data if isinstance(data, dict) else None

    def _stack(self, variable: str, service: str) -> dict[str, Any]:
        """stack.json, when the embedded stack's ``service`` ("postgres" or "broker") runs."""
        where = self.state_dir.resolve()
        path = self.stack_file()
        if not path.exists():
            raise StackNotRunning(f"no {variable} set and no embedded stack in {where}: "
                                  "run `dsrflow stack up` or set it")
        data = self._stack_data()
        if data is None:
            raise StackNotRunning(f"no {variable} set and {path.resolve()} cannot be read: "
                                  "run `dsrflow stack up` or set it")
        stopped = _stopped(data, service)
        if stopped:
            # A stack.json left behind by a stack that died: its addresses lead nowhere.
            raise StackNotRunning(f"no {variable} set and the embedded stack in {where} is not running "
                                  f"({stopped}): run `dsrflow stack up` or set it")
        return data

    def _embedded_origin(self) -> str:
        return f"from the embedded stack in {self.state_dir.resolve()}"

    @property
    def bootstrap(self) -> str:
        return self.kafka_bootstrap or str(self._stack("DSRFLOW_KAFKA_BOOTSTRAP", "broker")["kafka_bootstrap"])

    @property
    def bootstrap_origin(self) -> str | None:
        """"from the embedded stack in DIR" when the broker's address comes from there, else None."""
        return None if self.kafka_bootstrap else self._embedded_origin()

    @property
    def dsn(self) -> str:
        if self.pg_dsn is not None:
            return self.pg_dsn.get_secret_value()
        return str(self._stack("DSRFLOW_PG_DSN", "postgres")["pg_dsn"])

    @property
    def case_store_origin(self) -> str | None:
        """"from the embedded stack in DIR" when the case store's DSN comes from there, else None."""
        return None if self.pg_dsn is not None else self._embedded_origin()

    @property
    def case_store_configured(self) -> bool:
        """A case store is configured: DSRFLOW_PG_DSN, or the PostgreSQL of a running embedded stack."""
        if self.pg_dsn is not None:
            return True
        data = self._stack_data()
        return data is not None and not _stopped(data, "postgres")

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
                self._stack("DSRFLOW_KAFKA_BOOTSTRAP", "broker").get("idempotent_producer", True))
        return {**self.kafka_client_options(), "acks": "all", "enable_idempotence": idempotent}

    def kafka_client_options(self) -> dict[str, Any]:
        """Connection options for aiokafka clients (producer, consumer, admin)."""
        protocol = self.kafka_security_protocol  # an invalid setting first, then where the broker is
        opts: dict[str, Any] = {"bootstrap_servers": self.bootstrap, "security_protocol": protocol}
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


_FIELDS = frozenset(Settings.model_fields)


def _stopped(data: dict[str, Any], service: str) -> str | None:
    """Why the embedded stack recorded in ``data`` cannot serve ``service`` ("postgres" or
    "broker"), or None while its process runs (the same process: pid and start time)."""
    from .stack._proc import alive

    pids, started = data.get("pids") or {}, data.get("started") or {}
    if service == "broker":
        kind = data.get("broker_kind")
        service = "tansu" if kind == "tansu" or (kind is None and pids.get("tansu")) else "kafka"
    pid = pids.get(service)
    if not pid:
        return f"no {service} recorded"
    if not alive(pid, started.get(service)):
        return f"its {service} process {pid} is gone"
    return None


@functools.cache
def get_settings() -> Settings:
    """The process-wide settings, read once.

    An invalid ``DSRFLOW_*`` value does not fail here: reading that setting raises a
    :class:`~dsrflow.errors.ConfigError` naming the variable (never its value: it may be a
    secret), and :meth:`Settings.require` checks several at once."""
    try:
        return Settings()
    except ValidationError as exc:  # not from the environment: cannot happen without arguments
        raise ConfigError("invalid setting " + validation_summary(exc, _variable)) from exc
    except SettingsError as exc:  # a value the environment source could not even parse
        raise ConfigError(f"invalid settings: {exc}") from exc
