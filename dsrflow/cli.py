"""``dsrflow``: the command line.

    dsrflow stack up | down | status      embedded PostgreSQL + broker in the state directory
    dsrflow db migrate                    apply SQL migrations to the case store
    dsrflow topics apply [--system S]     create topics; report drift from topics/
    dsrflow topics schemas [--check]      (re)generate topics/schemas/ from the models
    dsrflow coordinator                   run the coordinator
    dsrflow worker NAME [--app MOD:ATTR]  run a system's worker
    dsrflow seed [crm billing]            create and seed the reference systems' databases
    dsrflow submit --right R --email E    publish a RightsRequested event
    dsrflow cases list | show ID          read cases from the case store
    dsrflow cases verify ID [--method M]  identity verified: fan an awaiting case out
    dsrflow cases lift ID                 lift a restriction or objection
    dsrflow cases extend ID --reason WHY  the one extension the law allows
    dsrflow cases deny ID --ground G --reason WHY   refuse on a ground of the law
    dsrflow cases hold | release ID [--kind K --reason WHY]   a legal hold, suspected fraud
    dsrflow cases open --right R --email E --reason WHY [--controller C]   a case with no request behind it
    dsrflow cases offboard --controller C --handover | --delete --reason WHY   a client company leaves
    dsrflow tasks list | complete | decline ID --note WHAT   manual tasks, done by a person
    dsrflow tasks skip | retry ID         the DPO skips an open task (--note why) or retries a stuck one
    dsrflow tasks reassign ID --to-system S | --to-person P --reason WHY   give a task to someone else
    dsrflow actors add NAME --role R      an actor (dpo, operator, admin) and its credential file
    dsrflow actors key NAME | revoke KEY_ID | disable NAME | list   rotate, revoke, disable, list
    dsrflow systems list | declare FILE   systems that hold personal data (one with no worker too)
    dsrflow systems pending [--all]       what workers announced that waits for an administrator
    dsrflow systems approve | refuse NAME --digest D   put an announced declaration in force, or not
    dsrflow systems key NAME | revoke-key KEY_ID   the key a system's worker signs its receipts with
    dsrflow systems coordinator-key       the key the coordinator signs tasks with, and its public file
    dsrflow audit verify [ID]             timelines against their anchors (case rows, dsr.cases.v1)
    dsrflow suppression key [--out FILE]  the key erased people's identifiers are hashed with (dsr.suppressions.v1)
    dsrflow suppression check --email E | --phone P   is this person on the suppression list? (exit 0: yes, 1: no)
    dsrflow api                           serve the DPO HTTP API
    dsrflow demo [--broker B]             the end-to-end demo on the embedded stack

`stack status`, `cases list` and `cases show` take --json for machine-readable output.
A decision (cases verify ... open, tasks complete ... reassign) is signed with the credential of
--credential FILE or DSRFLOW_CREDENTIAL (made by `dsrflow actors add`): the case records that
credential's actor as who decided, and the actor's role must allow the decision.
Settings come from DSRFLOW_* variables (see dsrflow/settings.py); each command reads only
the ones it uses, so an invalid value of another one does not stop it. A failure is one line
on stderr, `error: ...`, with exit code 1 (2 for bad arguments). The services (coordinator,
worker, api) check their settings first, then wait up to DSRFLOW_STARTUP_TIMEOUT in all for
their broker and case store.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import re
import socket
import sys
import time
import traceback
import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, date, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeAlias

import orjson

from . import topics
from .client import (
    DEFAULT_TIMEOUT,
    broker_error,
    case_store_error,
    case_store_pool,
    check_broker,
    connect_case_store,
    seconds,
)
from .client import submit as submit  # re-exported: dsrflow.cli.submit predates dsrflow.client
from .errors import ConfigError, DsrflowError, InvalidInput, validation_summary
from .rights import CaseStatus, IdentifierType, Right, TaskStatus
from .settings import Settings, get_settings

if TYPE_CHECKING:
    import asyncpg

    from .auth import Credential
    from .events import CommandResult

    #: a command, or how to make it once the case store answers (a task's case)
    _MakeCommand: TypeAlias = dict[str, Any] | Callable[[asyncpg.Pool], Awaitable[dict[str, Any]]]
    #: what a decision's answer reads from the case store besides the result
    _Then: TypeAlias = Callable[[asyncpg.Pool, CommandResult], Awaitable[Any]]

log = logging.getLogger("dsrflow.cli")

_SYSTEM_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")  # events.SystemName


def _json_default(obj: Any) -> Any:
    if isinstance(obj, bytes | bytearray | memoryview):
        return bytes(obj).hex()
    return str(obj)


def _print_json(obj: Any) -> None:
    sys.stdout.write(orjson.dumps(obj, option=orjson.OPT_INDENT_2, default=_json_default).decode() + "\n")


def _when(value: datetime | None) -> str:
    return value.isoformat(timespec="seconds") if value is not None else "-"


def _compact(obj: Any) -> str:
    return orjson.dumps(obj, default=_json_default).decode()


# -- stack -----------------------------------------------------------------
def _stack_module() -> Any:
    try:
        from . import stack

        stack.status  # noqa: B018 - imports the embedded stack's modules now, to report a missing extra
        return stack
    except ModuleNotFoundError as exc:
        raise ConfigError(
            f"the embedded stack needs the 'embedded' extra ({exc.name} is not installed): "
            "pip install 'dsrflow[embedded]'"
        ) from exc


def _stack_failures() -> tuple[type[BaseException], ...]:
    """The embedded stack's own "cannot start" exceptions (found by name: they live in dsrflow.stack)."""
    import importlib

    found: list[type[BaseException]] = []
    for module, name in (("embedded", "StackError"), ("kafka", "KafkaUnavailable"), ("_proc", "ServiceStartError")):
        try:
            found.append(getattr(importlib.import_module(f"dsrflow.stack.{module}"), name))
        except (ImportError, AttributeError):
            pass
    return tuple(found)


#: "...; log tail:" ends the first line of a ServiceStartError whose next lines are the log's tail
_LOG_TAIL = re.compile(r"[;:,]?\s*\blog(?: tail)?:\s*$")
_NAMED_LOG = re.compile(r"\S+\.log\b")
#: the log of each stack service, by a word in what failed
_STACK_LOGS = (("kafka", ("kafka", "server.log")), ("tansu", ("tansu.log",)), ("postgres", ("postgres.log",)),
               ("initdb", ("postgres.log",)))


def _stack_failed(exc: BaseException, state_dir: Path, *, tansu_hint: str) -> DsrflowError:
    """One line for the embedded stack's failure to start: the first line of its message
    (a log tail after it is many lines: the log's path instead), with the advice to try Tansu
    given as ``tansu_hint`` (the command that can do it)."""
    lines = [line.strip() for line in str(exc).splitlines()]
    first = lines[0] if lines and lines[0] else type(exc).__name__
    rest = [line for line in lines[1:] if line]
    tail = _LOG_TAIL.search(first)
    if tail:
        first = first[:tail.start()].rstrip()
        if not _NAMED_LOG.search(first):
            named = next((parts for word, parts in _STACK_LOGS if word in first.lower()), None)
            log = state_dir.joinpath(*named) if named else None
            first += f" (log: {log})" if log is not None and log.exists() else f" (logs in {state_dir})"
    elif first.endswith(":") and rest:  # "initdb failed for ...:" and the tool's output below
        errors = [line for line in rest if re.search(r"\berror\b", line, re.IGNORECASE)]
        first = f"{first} {(errors or rest)[-1][:200]}"
    first = first.replace("`dsrflow stack up --broker tansu`", tansu_hint)
    return DsrflowError(f"the embedded stack did not start: {first}")


def cmd_stack(args: argparse.Namespace, settings: Settings) -> int:
    stack = _stack_module()
    state_dir = settings.state_dir.resolve()
    if args.action == "up":
        try:
            info = stack.up(settings.state_dir, broker=args.broker)
        except _stack_failures() as exc:
            raise _stack_failed(exc, state_dir, tansu_hint="`dsrflow stack up --broker tansu`") from exc
        notices = [str(n) for n in info.get("notices", []) or []]
        sys.stdout.flush()
        for notice in notices:  # e.g. the broker's port changed: its clients need the new address
            print("notice: " + " ".join(notice.split()), file=sys.stderr, flush=True)
        if args.json:
            _print_json({"kafka_bootstrap": info["kafka_bootstrap"], "pg_dsn": info["pg_dsn"],
                         "state_dir": str(state_dir), "notices": notices})
            return 0
        print("embedded stack is up; connection settings:")
        print(f"  DSRFLOW_KAFKA_BOOTSTRAP={info['kafka_bootstrap']}")
        print(f"  DSRFLOW_PG_DSN={info['pg_dsn']}")
        print(f"  state directory: {state_dir}")
        return 0
    if args.action == "down":
        stopped = stack.down(settings.state_dir)
        if args.json:
            _print_json({"stopped": bool(stopped), "state_dir": str(state_dir)})
        else:
            print("embedded stack stopped" if stopped else "embedded stack was not running")
        return 0
    status: dict[str, Any] = stack.status(settings.state_dir)
    services: dict[str, dict[str, Any]] = status.get("services") or {}
    anything = bool(status.get("stack_file")) or any(s.get("running") or s.get("pid") for s in services.values())
    if args.json:
        _print_json(status)
    elif anything:
        broker = f" (broker: {status['broker']})" if status.get("broker") else ""
        print(f"embedded stack in {status.get('state_dir', state_dir)}: "
              + ("running" if status.get("running") else "NOT fully running") + broker)
        for name, s in sorted(services.items()):
            state = "running" if s.get("running") else "stopped"
            pid = f"pid {s['pid']}" if s.get("pid") else "no pid"
            note = f"  ({s['note']})" if s.get("note") else ""
            print(f"  {name:<9} {state:<8} {pid:<10} {s.get('address') or '-'}{note}")
        if status.get("running"):
            print(f"  DSRFLOW_KAFKA_BOOTSTRAP={status.get('kafka_bootstrap')}")
            print(f"  DSRFLOW_PG_DSN={status.get('pg_dsn')}")
    if status.get("running"):
        return 0
    if not anything:
        raise DsrflowError(f"no embedded stack is running in {state_dir}: run `dsrflow stack up`")
    stopped = ", ".join(n for n, s in sorted(services.items()) if not s.get("running")) or "unknown"
    raise DsrflowError(f"the embedded stack in {state_dir} is not fully running ({stopped} stopped): "
                       "run `dsrflow stack up`")


# -- db, topics ------------------------------------------------------------
def cmd_db(args: argparse.Namespace, settings: Settings) -> int:
    from .store import migrate

    async def go() -> list[Any]:
        conn = await connect_case_store(settings)  # a clear error, within seconds, if it is not there
        await conn.close()
        try:
            return await migrate(settings.dsn)
        except Exception as exc:  # noqa: BLE001 - mapped, or re-raised as it was
            mapped = case_store_error(settings, exc)
            if mapped is None:
                raise
            raise mapped from exc

    applied = asyncio.run(go())
    for m in applied:
        print(f"applied {m.version:04d}_{m.name}")
    print("case store is up to date" if not applied else f"{len(applied)} migration(s) applied")
    return 0


async def _registered_systems(settings: Settings) -> list[str]:
    """Systems registered in the case store ([] before `dsrflow db migrate`)."""
    import asyncpg

    from .registry import active_systems

    conn = await connect_case_store(settings)
    try:
        return [s.name for s in await active_systems(conn)]
    except asyncpg.UndefinedTableError:
        return []
    finally:
        await conn.close()


def _check_system_name(name: str, what: str = "system name") -> str:
    if not _SYSTEM_NAME.match(name):
        raise InvalidInput(f"{what} {name!r} is not valid: lowercase letters, digits, '_' and '-', "
                           "starting with a letter")
    return name


#: how long `topics apply` waits for the broker to create and describe the topics, once it answered
TOPICS_APPLY_TIMEOUT = 3 * DEFAULT_TIMEOUT


def cmd_topics(args: argparse.Namespace, settings: Settings) -> int:
    if args.action == "schemas":
        generated = topics.generate_schemas()
        directory = topics.topics_dir() / "schemas"
        if args.check:
            stale = [n for n, body in generated.items()
                     if not (directory / n).exists() or (directory / n).read_bytes() != body]
            for n in stale:
                print(f"schema drift: topics/schemas/{n} differs from the models", file=sys.stderr)
            if stale:
                raise DsrflowError(f"{len(stale)} schema(s) in topics/schemas/ differ from the models: "
                                   "run `dsrflow topics schemas`")
            return 0
        for path in topics.write_schemas():
            print(f"wrote {path}")
        return 0
    requested = {_check_system_name(s, "--system") for s in args.system or []}

    async def go() -> topics.ApplyReport:
        systems = set(requested)
        # Registered systems' task topics too, when there is a case store to ask. Without one
        # configured, the declared topics and the --system ones are all there is to apply.
        if settings.case_store_configured:
            systems |= set(await _registered_systems(settings))
        options = {**settings.kafka_client_options(), "request_timeout_ms": int(DEFAULT_TIMEOUT * 1000)}
        # First whether any broker answers at all ("no Kafka broker answers at X" if not) ...
        await check_broker(settings, timeout=DEFAULT_TIMEOUT)
        t0 = time.monotonic()
        try:
            return await asyncio.wait_for(
                topics.apply(options, topics.specs_for(sorted(systems)),
                             replication_factor=settings.topic_replication_factor),
                timeout=TOPICS_APPLY_TIMEOUT,
            )
        except Exception as exc:  # noqa: BLE001 - mapped, or re-raised as it was
            from aiokafka.errors import KafkaTimeoutError, RequestTimedOutError

            waited = time.monotonic() - t0
            if isinstance(exc, TimeoutError | KafkaTimeoutError | RequestTimedOutError):
                # ... then, since it did, a request it left unanswered is not "no broker".
                origin = f" ({settings.bootstrap_origin})" if settings.bootstrap_origin else ""
                raise DsrflowError(f"the Kafka broker at {settings.bootstrap}{origin} did not answer the "
                                   f"request in {seconds(waited)}") from exc
            mapped = broker_error(settings, exc, DEFAULT_TIMEOUT, waited=waited)
            if mapped is None:
                raise
            raise mapped from exc

    report = asyncio.run(go())
    for name in report.created:
        print(f"created   {name}")
    for name in report.unchanged:
        print(f"unchanged {name}")
    for name, diffs in report.drift.items():
        for d in diffs:
            print(f"DRIFT     {name}: {d}")
    if report.drift:
        print(f"error: {len(report.drift)} topic(s) differ from topics/ (see DRIFT above)", file=sys.stderr)
        return 2
    return 0


# -- services --------------------------------------------------------------
def cmd_coordinator(args: argparse.Namespace, settings: Settings) -> int:
    from .coordinator.app import run

    sys.argv = [sys.argv[0], "worker"]  # faust's Worker reads argv
    run(settings)
    return 0


def load_worker(name: str, app: str | None) -> Any:
    """Find a system's worker: ``--app module:attr``, else the ``dsrflow.workers`` entry point
    NAME, else the reference system ``examples.NAME.worker:worker`` (from the current directory).

    Raises :class:`~dsrflow.errors.InvalidInput` when there is none, or it cannot be imported."""
    from importlib.metadata import entry_points

    from .worker import load_worker as load

    _check_system_name(name, "worker name")
    default = app is None
    if app is None:
        eps = [ep for ep in entry_points(group="dsrflow.workers") if ep.name == name]
        if eps:
            try:
                return eps[0].load()
            except Exception as exc:  # noqa: BLE001 - any import failure is the entry point's
                raise InvalidInput(f"the dsrflow.workers entry point {name!r} ({eps[0].value}) cannot be "
                                   f"loaded: {type(exc).__name__}: {exc}") from exc
        app = f"examples.{name}.worker:worker"
    module, _, attr = app.partition(":")
    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    if default:
        from ._reference import ensure_examples

        ensure_examples()
    try:
        worker = load(app)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if missing and (module == missing or module.startswith(missing + ".")):
            if default:
                raise InvalidInput(
                    f"no worker for system {name!r}: no dsrflow.workers entry point {name!r} and no module "
                    f"{module} here; give --app module:attribute"
                ) from exc
            raise InvalidInput(f"--app {app}: no module named {missing!r}") from exc
        raise InvalidInput(f"--app {app}: importing {module} failed: {exc}") from exc
    except AttributeError as exc:
        raise InvalidInput(f"--app {app}: module {module} has no attribute {attr or 'worker'!r}") from exc
    except TypeError as exc:  # not a Worker
        raise InvalidInput(f"--app {app}: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - whatever the module raised while importing
        raise InvalidInput(f"--app {app}: importing {module} failed: {type(exc).__name__}: {exc}") from exc
    if worker.name != name:
        raise InvalidInput(f"{app} is the worker of system {worker.name!r}, not {name!r}")
    return worker


def cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    worker = load_worker(args.name, args.app)
    asyncio.run(worker.run(settings))
    return 0


def _check_can_listen(host: str, port: int) -> None:
    """Fail now, with one line, if the API's address is taken or not ours to bind."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(f"DSRFLOW_API_HOST {host!r} does not resolve") from exc
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
        try:
            sock.bind(address)
        except OSError as exc:
            raise DsrflowError(f"the API cannot listen on {host}:{port}: {exc.strerror or exc}") from exc


def cmd_api(args: argparse.Namespace, settings: Settings) -> int:
    from ._startup import check_case_store
    from .api import ApiTokenMissing, create_app, serve

    try:
        create_app(settings)  # refuses without DSRFLOW_API_TOKEN
    except ApiTokenMissing as exc:
        raise ConfigError(str(exc)) from exc
    _check_can_listen(settings.api_host, settings.api_port)
    asyncio.run(check_case_store(settings, log=logging.getLogger("dsrflow.api")))
    try:
        asyncio.run(serve(settings))
    except SystemExit as exc:  # uvicorn exits 1 when it cannot start; it has logged why
        if exc.code not in (None, 0):
            raise DsrflowError(f"the API on {settings.api_host}:{settings.api_port} could not start "
                               "(see the log line above)") from None
    return 0


# -- submit, cases -----------------------------------------------------------
def _request_field(loc: tuple[Any, ...]) -> str:
    """The command-line option behind a RightsRequested field, for error messages."""
    if loc[:2] == ("subject", "identifiers"):
        # one identifier's option, or none: the identifiers' own messages name the identifier
        return "--" + str(loc[2]).replace("_", "-") if len(loc) > 2 else ""
    flags = {"request_id": "--request-id", "jurisdiction": "--jurisdiction", "changes": "--change",
             "right": "--right", "controller": "--controller"}
    if loc and loc[0] in flags:
        return flags[loc[0]]
    return ".".join(str(p) for p in loc)


def _changes(pairs: list[str] | None) -> dict[str, str] | None:
    if not pairs:
        return None
    out = {}
    for pair in pairs:
        field, sep, value = pair.partition("=")
        if not sep or not field.strip():
            # The value is not echoed: it is a corrected piece of personal data.
            raise InvalidInput("--change needs field=value, e.g. --change address='12 Lý Thường Kiệt'")
        out[field.strip()] = value
    return out


def cmd_submit(args: argparse.Namespace, settings: Settings) -> int:
    from pydantic import ValidationError

    from .events import RightsRequested
    from .policy import jurisdictions

    identifiers = {k: v for k, v in (("email", args.email), ("phone", args.phone),
                                       ("customer_id", args.customer_id), ("cookie_id", args.cookie_id),
                                       ("device_id", args.device_id)) if v}
    if not identifiers:
        raise InvalidInput("give at least one of --email, --phone, --customer-id, --cookie-id, --device-id")
    changes = _changes(args.change)
    jurisdiction = args.jurisdiction or settings.jurisdiction
    if jurisdiction not in jurisdictions():
        where = "--jurisdiction" if args.jurisdiction else "DSRFLOW_JURISDICTION"
        raise InvalidInput(f"unknown jurisdiction {jurisdiction!r} ({where}): dsrflow has "
                           f"{', '.join(jurisdictions())}")
    try:
        req = RightsRequested(
            request_id=args.request_id or f"cli-{uuid.uuid4()}",
            right=Right(args.right),
            subject={"identifiers": identifiers},  # type: ignore[arg-type]
            jurisdiction=jurisdiction,
            received_at=datetime.now(UTC),
            verified=args.verified,
            channel="cli",
            changes=changes,
            purposes=args.purpose or None,
        )
    except ValidationError as exc:
        raise InvalidInput("invalid request: " + validation_summary(exc, _request_field)) from exc
    asyncio.run(submit(settings, [req]))
    print(f"submitted {req.right} request {req.request_id}")
    return 0


def _case_id(args: argparse.Namespace) -> uuid.UUID:
    if not args.case_id:
        raise InvalidInput(f"cases {args.action} needs a case id (see `dsrflow cases list`)")
    try:
        return uuid.UUID(args.case_id)
    except ValueError:
        # Not echoed: whatever was pasted here may be an email or a phone number.
        raise InvalidInput("the case id is not a UUID (like 3f2a5c1e-8d4b-4f6a-9c2e-7b1d0e9f4a21); "
                           "see `dsrflow cases list`") from None


def _summary_json(c: Any) -> dict[str, Any]:
    return dataclasses.asdict(c)


def _print_case(case: Any, tasks: list[Any], timeline: list[Any], verified: bool) -> None:
    s = case.summary
    overdue = "  OVERDUE" if s.overdue else ""
    rows = [
        ("case", str(s.case_id)),
        ("request", s.request_id),
        ("right", f"{s.right} ({s.jurisdiction})"),
        ("status", f"{s.status}{overdue}"),
        ("received", _when(s.received_at)),
        ("ack due", _when(s.ack_due_at)),
        ("due", _when(s.due_at)),
        *([("target", _when(s.target_at))] if s.target_at else []),
        *([("controller", s.controller)] if s.controller != "default" else []),
        ("completed", _when(s.completed_at)),
        ("verified", "yes" if case.verified else "no"),
        ("channel", case.channel or "-"),
        ("subject", ", ".join(f"{k}={v}" for k, v in sorted(case.subject.items()))),
    ]
    if case.changes:
        rows.append(("changes", _compact(case.changes)))
    if case.purposes:
        rows.append(("purposes", ", ".join(map(str, case.purposes))))
    if case.outcome:
        rows.append(("outcome", _compact(case.outcome)))
    if case.bundle:
        rows.append(("bundle", _compact(case.bundle)))
    for label, value in rows:
        print(f"{label:<10} {value}")
    print(f"tasks ({len(tasks)})")
    for t in tasks:
        extra = "".join(f"  {label}: {value}" for label, value in (
            ("error", t.error), ("waits because", t.reason if t.status == "manual" else None),
            ("assigned to", t.assignee), ("by", t.decided_by), ("note", t.note)) if value)
        print(f"  {t.system:<16} {t.action:<18} {t.kind:<6} {t.status:<12} attempt {t.attempt}  "
              f"completed {_when(t.completed_at)}  task {t.task_id}{extra}")
    chain = "hash chain verified" if verified else "HASH CHAIN BROKEN"
    print(f"timeline ({len(timeline)} entries, {chain})")
    for e in timeline:
        print(f"  {e.position:>3}  {_when(e.at)}  {e.kind:<22} hash {e.hash.hex()}  {_compact(e.detail)}")


def cmd_cases(args: argparse.Namespace, settings: Settings) -> int:
    from .store import queries

    if args.action == "verify":
        return _cases_verify(args, settings)
    if args.action == "lift":
        return _cases_lift(args, settings)
    if args.action == "extend":
        return _cases_extend(args, settings)
    if args.action == "deny":
        return _cases_deny(args, settings)
    if args.action in ("hold", "release"):
        return _cases_hold(args, settings)
    if args.action == "open":
        return _cases_open(args, settings)
    if args.action == "offboard":
        return _cases_offboard(args, settings)
    case_id = _case_id(args) if args.action == "show" else None

    async def go() -> int:
        conn = await connect_case_store(settings)
        now = datetime.now(UTC)
        try:
            if args.action == "list":
                page = await queries.list_cases(
                    conn, now=now, status=CaseStatus(args.status) if args.status else None,
                    right=Right(args.right) if args.right else None, controller=args.controller, limit=args.limit,
                )
                if args.json:
                    _print_json([_summary_json(c) for c in page.items])
                    return 0
                for c in page.items:
                    flag = " OVERDUE" if c.overdue else ""
                    print(f"{c.case_id}  {c.right:<18} {c.status:<26} due {c.due_at:%Y-%m-%d}{flag}  {c.request_id}")
                if not page.items:
                    print("no cases")
                return 0
            assert case_id is not None
            async with conn.transaction(isolation="repeatable_read", readonly=True):
                case = await queries.get_case(conn, case_id, now=now)
                if case is None:
                    raise DsrflowError(f"no case {case_id}")
                tasks = await queries.case_tasks(conn, case_id)
                timeline = await queries.case_timeline(conn, case_id)
            from .audit import verify

            audit = await verify(conn, [case_id])  # the chain, and its anchor in the case row
        finally:
            await conn.close()
        verified = audit.ok
        if args.json:
            _print_json({**dataclasses.asdict(case), "tasks": [dataclasses.asdict(t) for t in tasks],
                         "timeline": [dataclasses.asdict(e) for e in timeline], "timeline_verified": verified})
        else:
            _print_case(case, tasks, timeline, verified)
        return 0

    return asyncio.run(go())


def cmd_audit(args: argparse.Namespace, settings: Settings) -> int:
    """Check every case's timeline (or one case's) against the anchors outside its table."""
    from .audit import published_anchors, verify

    case_ids = [_case_id(args)] if args.case_id else None

    async def go() -> Any:
        anchors = None
        if not args.no_topic:
            try:
                anchors = await published_anchors(settings.kafka_client_options())
            except Exception as exc:  # noqa: BLE001 - mapped to one line
                mapped = broker_error(settings, exc)
                if mapped is None:
                    raise
                raise mapped from exc
        conn = await connect_case_store(settings)
        try:
            return await verify(conn, case_ids, anchors=anchors)
        finally:
            await conn.close()

    report = asyncio.run(go())
    if args.json:
        _print_json({"checked": report.checked, "against_topic": report.against_topic,
                     "failures": {str(k): v for k, v in report.failures.items()}})
    else:
        for case_id, found in sorted(report.failures.items()):
            for problem in found:
                print(f"{case_id}  {problem}")
        against = "case rows and dsr.cases.v1" if report.against_topic else "case rows only (--no-topic)"
        print(f"{report.checked} case(s) checked against their {against}: "
              f"{len(report.failures) or 'none'} fail")
    if not report.ok:
        raise DsrflowError(f"{len(report.failures)} case timeline(s) fail the audit")
    return 0


def cmd_systems(args: argparse.Namespace, settings: Settings) -> int:
    """Systems that hold personal data: list them, or declare one from a JSON or TOML file (a
    system a worker cannot act for, say, declared with ``worker = false``: its tasks are manual)."""
    import tomllib

    from pydantic import ValidationError

    from .registry import SystemDeclaration, active_systems, register

    if args.action in ("key", "revoke-key"):
        return _system_key(args, settings)
    if args.action == "coordinator-key":
        return _coordinator_key(args, settings)
    if args.action == "pending":
        return _systems_pending(args, settings)
    if args.action in ("approve", "refuse"):
        return _system_decision(args, settings)
    declaration = None
    if args.action == "declare":
        if not args.file:
            raise InvalidInput("systems declare needs a file (JSON or TOML, the fields of a SystemDeclaration)")
        path = Path(args.file)
        try:
            text = path.read_text()
            raw = tomllib.loads(text) if path.suffix == ".toml" else orjson.loads(text)
        except OSError as exc:
            raise InvalidInput(f"cannot read {path}: {exc.strerror}") from None
        except (tomllib.TOMLDecodeError, orjson.JSONDecodeError) as exc:
            raise InvalidInput(f"{path} is not valid {'TOML' if path.suffix == '.toml' else 'JSON'}: {exc}") from None
        try:
            declaration = SystemDeclaration.model_validate(raw)
        except ValidationError as exc:
            raise InvalidInput(f"{path}: " + validation_summary(exc)) from None

    async def go() -> list[SystemDeclaration]:
        conn = await connect_case_store(settings)
        try:
            if declaration is not None:
                await register(conn, declaration)
            return await active_systems(conn)
        finally:
            await conn.close()

    systems = asyncio.run(go())
    if declaration is not None:
        print(f"declared system {declaration.name}; the coordinator plans its tasks at its next sweep")
        return 0
    if args.json:
        _print_json([s.model_dump(mode="json") for s in systems])
        return 0
    for sy in systems:
        acts = ", ".join(map(str, sy.actions)) if sy.worker else "no worker: every task is manual"
        print(f"{sy.name:<16} searches by {', '.join(map(str, sy.identifier_types)):<28} {acts}")
    if not systems:
        print("no systems registered")
    return 0


def _systems_pending(args: argparse.Namespace, settings: Settings) -> int:
    """``systems pending``: what workers announced that is not in force (a new system, a changed
    declaration) or was refused, with what changed, for an administrator to approve or refuse;
    ``--all`` shows every system's last announcement (its heartbeat and versions)."""
    from .registry import AnnouncementState, announcements

    states: tuple[AnnouncementState, ...] = ("pending", "approved", "refused") if args.all else ("pending", "refused")

    async def go() -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
        conn = await connect_case_store(settings)
        try:
            rows = await announcements(conn, states=states)
            found = await conn.fetch("SELECT name, declaration FROM systems WHERE declaration IS NOT NULL")
            in_force = {r["name"]: orjson.loads(r["declaration"]) if isinstance(r["declaration"], str)
                        else r["declaration"] for r in found}
            return rows, in_force
        finally:
            await conn.close()

    rows, in_force = asyncio.run(go())
    docs = []
    for r in rows:
        now = in_force.get(r["system"])
        changed = sorted(k for k in set(r["declaration"]) | set(now or {})
                         if (now or {}).get(k) != r["declaration"].get(k)) if now is not None else None
        docs.append({"system": r["system"], "controller": r["controller"], "state": r["state"], "digest": r["digest"],
                     "reason": r["reason"], "in_force": r["digest_in_force"], "changed": changed,
                     "signed_by": r["signed_by"], "sdk_version": r["sdk_version"], "version": r["version"],
                     "instance": r["instance"], "first_seen_at": r["first_seen_at"].isoformat(),
                     "last_seen_at": r["last_seen_at"].isoformat(), "declaration": r["declaration"]})
    if args.json:
        _print_json(docs)
        return 0
    if not docs:
        print("nothing waits for approval" if not args.all else "no worker has announced itself")
        return 0
    for d in docs:
        what = ("a new system" if d["changed"] is None else
                "no change" if not d["changed"] else f"changes {', '.join(d['changed'])}")
        print(f"{d['system']:<16} {d['state']:<9} digest {d['digest']}  ({what}; controller {d['controller']}; "
              f"signed {'by ' + d['signed_by'] if d['signed_by'] else 'by no key'}; last seen "
              f"{d['last_seen_at'][:19]}; dsrflow {d['sdk_version']}"
              f"{'; worker ' + d['version'] if d['version'] else ''})")
        if d["reason"]:
            print(f"{'':<16} {d['reason']}")
        if d["state"] == "pending":
            print(f"{'':<16} dsrflow systems approve {d['system']} --digest {d['digest']}")
    return 0


def _system_decision(args: argparse.Namespace, settings: Settings) -> int:
    """``systems approve NAME --digest D`` / ``systems refuse NAME --digest D --reason R``: an
    administrator's signed decision on what a system's worker announced."""
    if not args.file:
        raise InvalidInput(f"systems {args.action} needs the system's name")
    if not args.digest:
        raise InvalidInput(f"systems {args.action} needs --digest (the one `dsrflow systems pending` shows)")
    cmd: dict[str, Any] = {"decision": f"{args.action}_system", "system": args.file, "digest": args.digest}
    if args.action == "refuse":
        cmd["reason"] = _reason(args, "--reason (why; shown to whoever runs the worker)")
    result, _ = _decide(settings, _credential(args, settings), _command(cmd))
    line = (f"system {args.file}: declaration {args.digest[:12]} approved by {result.actor}; it is in force, and "
            f"open cases ask it at the coordinator's next sweep" if args.action == "approve" else
            f"system {args.file}: declaration {args.digest[:12]} refused by {result.actor}; the one in force stays")
    return _answer(args, result.model_dump(mode="json", exclude_none=True), line)


def _coordinator_key(args: argparse.Namespace, settings: Settings) -> int:
    """``systems coordinator-key``: the key the coordinator signs every task with (a credential for
    the coordinator) and the public-key file its workers verify tasks with."""
    from . import signing

    folder = Path(args.out) if args.out else settings.state_dir / "credentials"
    private, public = signing.coordinator_key_files(folder)
    if private.exists() or public.exists():
        raise InvalidInput(f"{private} or {public} exists already; not overwritten (pass --out for another folder)")
    credential = signing.new_coordinator_key(private, public)
    print(f"coordinator signing key {credential.key_id}: give the coordinator the first file, every worker the second")
    print(f"export DSRFLOW_COORDINATOR_CREDENTIAL={private.resolve()}")
    print(f"export DSRFLOW_COORDINATOR_PUBLIC_KEYS={public.resolve()}")
    return 0


def _system_key(args: argparse.Namespace, settings: Settings) -> int:
    """``systems key NAME``: a signing key for a system's worker (its receipts are then checked);
    ``systems revoke-key KEY_ID``: stop accepting what that key signs."""
    from . import signing
    from .events import SystemName

    if not args.file:
        raise InvalidInput(f"systems {args.action} needs a {'system name' if args.action == 'key' else 'key id'}")
    if args.action == "revoke-key":
        async def revoke() -> None:
            conn = await connect_case_store(settings)
            try:
                await signing.revoke_system_key(conn, args.file)
            finally:
                await conn.close()

        asyncio.run(revoke())
        print(f"revoked system key {args.file}: receipts it signs are refused from now on")
        return 0
    from pydantic import TypeAdapter, ValidationError

    try:
        name = TypeAdapter(SystemName).validate_python(args.file)
    except ValidationError:
        raise InvalidInput(f"{args.file!r} is not a system name (lower case letters, digits, _ and -)") from None
    out = Path(args.out) if args.out else signing.system_key_file(settings.state_dir / "credentials", name)
    if out.exists():
        raise InvalidInput(f"{out} exists already; not overwritten (pass --out for another file)")

    async def add() -> Credential:
        conn = await connect_case_store(settings)
        try:
            return await signing.new_system_key(conn, name, out)
        finally:
            await conn.close()

    credential = asyncio.run(add())
    path = out.resolve()
    print(f"system {name}: signing key {credential.key_id} registered; its receipts must now be signed with it")
    print(f"export DSRFLOW_WORKER_CREDENTIAL={path}")
    return 0


# -- decisions: signed with the CLI's credential, executed as a command ---------------------------
_NO_CREDENTIAL = ("no credential to decide with: set DSRFLOW_CREDENTIAL or pass --credential FILE (an admin makes "
                  "one with `dsrflow actors add NAME --role dpo`)")


def _credential(args: argparse.Namespace, settings: Settings) -> Credential:
    """The credential a decision is signed with: --credential FILE, else DSRFLOW_CREDENTIAL."""
    from .auth import load_credential

    path = args.credential if args.credential else settings.credential
    if path is None or not str(path).strip():
        raise ConfigError(_NO_CREDENTIAL)
    return load_credential(Path(path).expanduser())


def _command(cmd: dict[str, Any]) -> dict[str, Any]:
    """``cmd`` checked as the coordinator checks it, JSON-ready: bad input stops here."""
    from .commands import CommandError, parse_command

    try:
        parsed = parse_command(cmd)
    except CommandError as exc:
        raise InvalidInput(str(exc)) from None
    dumped: dict[str, Any] = parsed.model_dump(mode="json", exclude_none=True)
    return dumped


def _decide(settings: Settings, credential: Credential, command: _MakeCommand,
            then: _Then | None = None) -> tuple[CommandResult, Any]:
    """Sign ``command`` with ``credential`` and have a Coordinator over the case store execute it,
    exactly as the coordinator executes a command from dsr.commands.v1 (the token checked against
    the stored keys, the actor's role and controller, the decision applied once). A refusal is one
    error line; ``then(pool, result)`` reads what the answer shows besides the result."""
    from .auth import sign_command
    from .coordinator.service import Coordinator

    async def go() -> tuple[CommandResult, Any]:
        pool = await case_store_pool(settings)
        try:
            cmd = command if isinstance(command, dict) else _command(await command(pool))
            token = sign_command(credential, cmd)
            result = await Coordinator(settings, pool).execute(token, fallback_id=f"cli/{uuid.uuid4()}")
            if not result.accepted:
                raise DsrflowError(result.error or f"the decision was refused ({result.error_type or 'no reason'})")
            return result, (await then(pool, result) if then is not None else None)
        finally:
            await pool.close()

    return asyncio.run(go())


def _answer(args: argparse.Namespace, doc: dict[str, Any], line: str) -> int:
    """A decision's result: ``doc`` with --json, else one line for a person."""
    if args.json:
        _print_json(doc)
    else:
        print(line)
    return 0


def _reason(args: argparse.Namespace, needs: str) -> str:
    reason = (args.reason or "").strip()
    if not reason:
        raise InvalidInput(f"{args.command} {args.action} needs {needs}")
    return reason


def _on_case(args: argparse.Namespace, settings: Settings, cmd: dict[str, Any],
             then: _Then | None = None) -> tuple[uuid.UUID, CommandResult, Any]:
    """A decision on the case of ``args.case_id``: checked, then signed and executed."""
    case_id = _case_id(args)
    checked = _command({**cmd, "case_id": str(case_id)})
    result, extra = _decide(settings, _credential(args, settings), checked, then)
    return case_id, result, extra


def _status_doc(case_id: uuid.UUID, result: CommandResult) -> dict[str, Any]:
    return {"case_id": str(case_id), "status": str(result.case_status), "actor": result.actor}


def _cases_verify(args: argparse.Namespace, settings: Settings) -> int:
    cmd = {"decision": "verify", "method": args.method, "identifiers": args.identifier or None}
    case_id, result, _ = _on_case(args, settings, cmd)
    return _answer(args, _status_doc(case_id, result), f"case {case_id} verified: {result.case_status}")


def _cases_lift(args: argparse.Namespace, settings: Settings) -> int:
    case_id, result, _ = _on_case(args, settings, {"decision": "lift"})
    return _answer(args, _status_doc(case_id, result),
                   f"case {case_id}: restriction lifted; each system that restricted is asked to lift it "
                   f"({result.case_status})")


def _cases_hold(args: argparse.Namespace, settings: Settings) -> int:
    if args.action == "hold":
        if not args.kind or not (args.reason or "").strip():
            raise InvalidInput("cases hold needs --kind (legal_hold or suspected_fraud) and --reason")
        cmd = {"decision": "hold", "kind": args.kind, "reason": args.reason}
    else:
        cmd = {"decision": "release"}
    case_id, result, _ = _on_case(args, settings, cmd)
    return _answer(args, _status_doc(case_id, result), f"case {case_id}: {result.case_status}")


def _cases_deny(args: argparse.Namespace, settings: Settings) -> int:
    if not args.ground or not (args.reason or "").strip():
        raise InvalidInput("cases deny needs --ground (from the jurisdiction's data file) and --reason")
    case_id, result, _ = _on_case(args, settings, {"decision": "deny", "ground": args.ground, "reason": args.reason})
    return _answer(args, _status_doc(case_id, result),
                   f"case {case_id}: {result.case_status} on the ground {args.ground}")


def _cases_extend(args: argparse.Namespace, settings: Settings) -> int:
    reason = _reason(args, "--reason (the subject is told it; no personal data)")
    until = None
    if args.until:
        try:
            until = date.fromisoformat(args.until).isoformat()
        except ValueError:
            raise InvalidInput("--until is a date, YYYY-MM-DD") from None

    async def due_at(pool: asyncpg.Pool, result: CommandResult) -> Any:
        return await pool.fetchval("SELECT due_at FROM cases WHERE case_id = $1", result.case_id)

    case_id, result, due = _on_case(args, settings, {"decision": "extend", "reason": reason, "until": until}, due_at)
    return _answer(args, {"case_id": str(case_id), "due_at": due, "actor": result.actor},
                   f"case {case_id}: due date extended to {due}")


def _cases_open(args: argparse.Namespace, settings: Settings) -> int:
    from pydantic import ValidationError

    from .events import RightsRequested

    if not args.right or not (args.reason or "").strip():
        raise InvalidInput("cases open needs --right and --reason (why, without personal data), and identifiers")
    identifiers = {k: v for k, v in (("email", args.email), ("phone", args.phone),
                                       ("customer_id", args.customer_id)) if v}
    if not identifiers:
        raise InvalidInput("cases open needs at least one of --email, --phone, --customer-id")
    try:
        req = RightsRequested.model_validate({
            "request_id": f"dpo-{uuid.uuid4()}", "right": args.right,
            "jurisdiction": args.jurisdiction or settings.jurisdiction, "subject": {"identifiers": identifiers},
            "controller": args.controller or "default"})
    except ValidationError as exc:
        raise InvalidInput("invalid case: " + validation_summary(exc, _request_field)) from exc
    cmd = _command({"decision": "open_case", "request": req.model_dump(mode="json", exclude_none=True),
                    "why": args.reason})
    result, _ = _decide(settings, _credential(args, settings), cmd)
    return _answer(args, {"case_id": str(result.case_id), "actor": result.actor},
                   f"opened case {result.case_id} ({req.right}) for {result.actor}")


def _cases_offboard(args: argparse.Namespace, settings: Settings) -> int:
    if args.handover == args.delete:
        raise InvalidInput("cases offboard needs one of --handover (hand all its data over) and --delete")
    if not (args.reason or "").strip() or not args.controller:
        raise InvalidInput("cases offboard needs --controller (the client company leaving) and --reason")
    cmd = _command({"decision": "offboard", "controller": args.controller,
                    "mode": "handover" if args.handover else "delete", "why": args.reason})
    result, _ = _decide(settings, _credential(args, settings), cmd)
    what = "hand-over" if args.handover else "deletion"
    return _answer(args, {"case_id": str(result.case_id), "actor": result.actor, "status": str(result.case_status)},
                   f"case {result.case_id}: {what} of all of {args.controller}'s data, every system asked "
                   f"({result.case_status})")


def cmd_tasks(args: argparse.Namespace, settings: Settings) -> int:
    """Manual tasks (the ones a person carries out: no worker, or a worker that cannot do the
    action) and the DPO's decisions on any task: skip, retry, reassign."""
    from .store import queries

    if args.action == "list":
        async def listing() -> list[Any]:
            conn = await connect_case_store(settings)
            try:
                return await queries.tasks_by_status(conn, args.status, limit=args.limit)
            finally:
                await conn.close()

        rows = asyncio.run(listing())
        if args.json:
            _print_json([dataclasses.asdict(t) for t in rows])
            return 0
        for t in rows:
            print(f"{t.task_id}  case {t.case_id}  {t.system:<14} {t.action:<18} {t.status:<8} {t.reason or ''}")
        if not rows:
            print(f"no {args.status} tasks")
        return 0
    if not args.task_id:
        raise InvalidInput(f"tasks {args.action} needs a task id (see `dsrflow tasks list`)")
    try:
        task_id = uuid.UUID(args.task_id)
    except ValueError:
        raise InvalidInput("the task id is not a UUID; see `dsrflow tasks list`") from None
    note = (args.note or "").strip()
    cmd: dict[str, Any]
    if args.action == "reassign":
        if (args.to_system is None) == (args.to_person is None):
            raise InvalidInput("tasks reassign needs one of --to-system NAME and --to-person NAME")
        if args.to_system is not None:
            _check_system_name(args.to_system, "--to-system")
        cmd = {"decision": "reassign_task", "to_system": args.to_system, "to_person": args.to_person,
               "reason": _reason(args, "--reason (why the task goes to someone else; no personal data)")}
    elif args.action == "retry":
        cmd = {"decision": "retry_task"}
    elif not note:
        raise InvalidInput(f"tasks {args.action} needs --note (what was done or why, without personal data)")
    elif args.action == "skip":
        cmd = {"decision": "skip_task", "reason": note}
    elif args.action == "decline":
        cmd = {"decision": "decline_task", "note": note}
    else:
        cmd = {"decision": "complete_task", "note": note,
               "resolution": str(TaskStatus.not_found if args.not_found else TaskStatus.succeeded)}
    _command({**cmd, "case_id": str(uuid.UUID(int=0)), "task_id": str(task_id)})  # bad input: before connecting
    credential = _credential(args, settings)

    async def on_its_case(pool: asyncpg.Pool) -> dict[str, Any]:
        case_id = await queries.task_case(pool, task_id)
        if case_id is None:
            raise DsrflowError(f"no task {task_id}")
        return {**cmd, "case_id": str(case_id), "task_id": str(task_id)}

    async def task_now(pool: asyncpg.Pool, result: CommandResult) -> tuple[str, str | None]:
        row = await pool.fetchrow("SELECT status, assignee FROM tasks WHERE task_id = $1", task_id)
        return (str(row["status"]), row["assignee"]) if row is not None else ("-", None)

    result, (status, assignee) = _decide(settings, credential, on_its_case, task_now)
    doc = {"task_id": str(task_id), "status": status, "case_status": str(result.case_status), "actor": result.actor}
    if args.action == "reassign":
        to = f"system {args.to_system}" if args.to_system else f"{assignee or args.to_person}"
        doc["to_system" if args.to_system else "to_person"] = args.to_system or args.to_person
        return _answer(args, doc, f"task {task_id}: reassigned to {to} ({status}); case {result.case_status}")
    return _answer(args, doc, f"task {task_id}: {status}; case {result.case_status}")


# -- actors: who may decide ---------------------------------------------------------------------
_CONTROLLER = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")  # events.Controller
_KEY_ID = re.compile(r"^k_[0-9a-f]{16}$")  # auth key ids


def _credential_file(settings: Settings, out: str | None, default_name: str) -> Path:
    """Where a new credential goes: --out, else <state_dir>/credentials/; never over an existing file."""
    from .auth import CredentialError

    path = Path(out).expanduser() if out else settings.state_dir / "credentials" / default_name
    if path.exists() or path.is_symlink():
        raise CredentialError(f"credential file {path} exists already; not overwritten (give --out FILE)")
    return path


def cmd_actors(args: argparse.Namespace, settings: Settings) -> int:
    """Actors and their keys, straight in the case store (an admin's bootstrap, like `systems
    declare`): add one with a credential file, give it a new key, revoke a key, disable an actor,
    list them (key ids only: the case store holds no private key)."""
    import shlex

    from . import auth

    if args.action == "list":
        async def listing() -> list[auth.Actor]:
            conn = await connect_case_store(settings)
            try:
                return await auth.list_actors(conn)
            finally:
                await conn.close()

        actors = asyncio.run(listing())
        if args.json:
            _print_json([dataclasses.asdict(a) for a in actors])
            return 0
        for a in actors:
            state = f"disabled {_when(a.disabled_at)}" if a.disabled_at else "enabled"
            keys = ", ".join(k.key_id + (" (revoked)" if k.revoked_at else "") for k in a.keys) or "no key"
            print(f"{a.name:<24} {a.role:<8} controller {a.tenant:<12} {state:<10} keys: {keys}")
        if not actors:
            print("no actors: add one with `dsrflow actors add NAME --role dpo`")
        return 0
    what = "KEY_ID" if args.action == "revoke" else "NAME"
    if not args.target:
        raise InvalidInput(f"actors {args.action} needs {what}")
    credential: auth.Credential | None = None
    out: Path | None = None
    if args.action in ("add", "key"):
        if args.action == "add" and not args.role:
            raise InvalidInput("actors add needs --role (dpo, operator or admin)")
        if args.action == "add" and not _CONTROLLER.fullmatch(args.controller):
            raise InvalidInput("--controller is a controller's name: lowercase letters, digits, '_' and '-', "
                               "starting with a letter")
        credential = auth.generate_credential(args.target)  # checks the name
        out = _credential_file(settings, args.out,
                               f"{args.target}.json" if args.action == "add" else
                               f"{args.target}-{credential.key_id}.json")
    elif args.action == "revoke" and not _KEY_ID.fullmatch(args.target):
        raise InvalidInput("a key id is k_ and 16 lower-case hex digits (see `dsrflow actors list`)")

    async def go() -> Path | None:
        conn = await connect_case_store(settings)
        saved = None
        try:
            async with conn.transaction():
                if args.action == "add":
                    await auth.add_actor(conn, args.target, args.role, args.controller)
                if credential is not None and out is not None:
                    await auth.add_key(conn, args.target, credential.public_pem(), key_id=credential.key_id)
                    saved = credential.save(out)  # last: a file that cannot be written undoes the actor and key
                elif args.action == "revoke":
                    await auth.revoke_key(conn, args.target)
                else:
                    await auth.disable_actor(conn, args.target)
        except InvalidInput as exc:  # an actor that exists already, no such actor or key, a disabled actor
            raise DsrflowError(str(exc)) from None
        except BaseException:
            if saved is not None:  # saved, but the transaction did not commit
                saved.unlink(missing_ok=True)
            raise
        finally:
            await conn.close()
        return saved

    saved = asyncio.run(go())
    if args.action == "revoke":
        print(f"key {args.target} revoked: what it signs is refused from now on")
        return 0
    if args.action == "disable":
        print(f"actor {args.target} disabled: what any of its keys signs is refused from now on")
        return 0
    assert saved is not None and credential is not None
    path = saved.resolve()
    if args.action == "add":
        print(f"added actor {args.target} ({args.role}, controller {args.controller}) with key {credential.key_id}")
    else:
        print(f"added key {credential.key_id} to actor {args.target} "
              "(then revoke the old one: dsrflow actors revoke KEY_ID)")
    print(f"credential: {path} (mode 0600; keep it private: it signs as {args.target})")
    print(f"export DSRFLOW_CREDENTIAL={shlex.quote(str(path))}")
    return 0


#: The reference systems ``dsrflow seed`` prepares, and how: module, and the table a seeded one fills.
_REFERENCE = {"crm": ("examples.crm.worker", "contacts"), "billing": ("examples.billing.worker", "customers")}


def cmd_seed(args: argparse.Namespace, settings: Settings) -> int:
    """Create the reference systems' databases (on the case store's server, or DSRFLOW_CRM_DSN and
    DSRFLOW_BILLING_DSN) and seed the empty ones with the demo's Vietnamese customers, so a
    newcomer's `dsrflow worker crm` and `dsrflow submit ... lan.nguyen@example.vn` find someone."""
    import importlib

    import asyncpg

    from ._reference import ensure_examples

    ensure_examples()
    try:
        from examples.common import system_dsn
    except ImportError:
        raise DsrflowError("the reference systems are not installed with this dsrflow") from None
    systems = args.systems or sorted(_REFERENCE)
    unknown = sorted(set(systems) - set(_REFERENCE))
    if unknown:
        raise InvalidInput(f"no reference system {', '.join(unknown)}; there are {', '.join(sorted(_REFERENCE))}")

    async def go() -> dict[str, int]:
        counts = {}
        for name in systems:
            module, table = _REFERENCE[name]
            dsn = system_dsn(name, settings)
            await importlib.import_module(module).setup(dsn)  # creates, migrates, seeds if empty
            conn = await asyncpg.connect(dsn)
            try:
                counts[name] = int(await conn.fetchval(f"SELECT count(*) FROM {table}"))
            finally:
                await conn.close()
        return counts

    settings.require("pg_dsn")
    for name, n in asyncio.run(go()).items():
        print(f"{name}: {n} {_REFERENCE[name][1]} (seeded once; run it again and nothing changes)")
    return 0


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from .demo import main as demo_main

    os.environ["DSRFLOW_DEMO_BROKER"] = args.broker  # read by dsrflow.demo when it starts the stack
    try:
        return demo_main(settings)
    except _stack_failures() as exc:
        raise _stack_failed(exc, (settings.state_dir / "demo").resolve(),
                            tansu_hint="`dsrflow demo --broker tansu`") from exc


def cmd_suppression(args: argparse.Namespace, settings: Settings) -> int:
    """``suppression key``: a new key for the suppression list (a 0600 JSON file);
    ``suppression check``: read ``dsr.suppressions.v1`` from its beginning (no group) and say
    whether an identifier is on it: exit 0 when it is, 1 when it is not (an ingestion check)."""
    from . import suppression

    if args.action == "key":
        out = Path(args.out) if args.out else settings.state_dir / "credentials" / "suppression-key.json"
        made = suppression.new_key()
        suppression.write_key(made, out)
        print(f"suppression key {made.key_id} written to {out.resolve()} (mode 0600): give it to the coordinator "
              "and to each ingestion pipeline that checks the list")
        print(f"export DSRFLOW_SUPPRESSION_KEY={out.resolve()}")
        return 0
    given = [(t, v) for t, v in (("email", args.email), ("phone", args.phone)) if v]
    if len(given) != 1:
        raise InvalidInput("suppression check needs one of --email and --phone")
    key = suppression.load_key(args.key) if args.key else suppression.configured_key(settings)
    if key is None:
        raise ConfigError("no suppression key: set DSRFLOW_SUPPRESSION_KEY or pass --key FILE")
    kind, value = given[0]
    from .identity import region_of

    try:
        region = region_of(args.jurisdiction or settings.jurisdiction)
        digest = suppression.suppression_hash(key, kind, value, region=region)
    except ValueError as exc:
        raise InvalidInput(str(exc)) from None
    entry = asyncio.run(suppression.read_suppressions(settings)).get(suppression.list_key(args.controller, digest))
    if entry is None:
        print("not suppressed")
        return 1
    print(f"suppressed (erased {entry.erased_at.date().isoformat()}, case {entry.case_id})")
    return 0


# -- parser, main --------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    """Bad arguments are one line, ``error: ...``, like every other failure (exit code 2)."""

    def error(self, message: str) -> NoReturn:
        raise InvalidInput(f"{message} (see `{self.prog} --help`)")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _credential_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--credential", metavar="FILE",
                        help="a decision: the credential file to sign it with (default: DSRFLOW_CREDENTIAL; "
                        "`dsrflow actors add` makes one)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser. Reads no settings: ``--help`` works whatever the environment holds."""
    p = _Parser(prog="dsrflow", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("stack", help="embedded PostgreSQL and broker")
    s.add_argument("action", choices=["up", "down", "status"])
    s.add_argument("--broker", choices=["apache", "tansu"], default="apache",
                   help="up: Apache Kafka (needs Java 17+; the default) or the memory-only Tansu broker")
    s.add_argument("--json", action="store_true", help="print JSON (status: the full status document)")
    s.set_defaults(func=cmd_stack)

    s = sub.add_parser("db", help="case store")
    s.add_argument("action", choices=["migrate"])
    s.set_defaults(func=cmd_db)

    s = sub.add_parser("topics", help="topics declared in topics/")
    s.add_argument("action", choices=["apply", "schemas"])
    s.add_argument("--system", action="append", help="also create this system's task topic")
    s.add_argument("--check", action="store_true", help="schemas: fail if topics/schemas/ drifted")
    s.set_defaults(func=cmd_topics)

    s = sub.add_parser("coordinator", help="run the coordinator")
    s.set_defaults(func=cmd_coordinator)

    s = sub.add_parser("worker", help="run a system's worker")
    s.add_argument("name")
    s.add_argument("--app", help="module:attribute of the Worker (default: examples.NAME.worker:worker)")
    s.set_defaults(func=cmd_worker)

    s = sub.add_parser("api", help="serve the DPO HTTP API")
    s.set_defaults(func=cmd_api)

    s = sub.add_parser("seed", help="create and seed the reference systems' databases (crm, billing)")
    s.add_argument("systems", nargs="*", help="which (default: all)")
    s.set_defaults(func=cmd_seed)

    s = sub.add_parser("submit", help="publish a RightsRequested event")
    s.add_argument("--right", required=True, choices=[r.value for r in Right])
    s.add_argument("--email")
    s.add_argument("--phone")
    s.add_argument("--customer-id")
    s.add_argument("--cookie-id")
    s.add_argument("--device-id")
    s.add_argument("--request-id")
    s.add_argument("--jurisdiction", help="default: DSRFLOW_JURISDICTION (VN)")
    s.add_argument("--verified", action="store_true", help="identity was verified upstream")
    s.add_argument("--change", action="append", help="rectification: field=value (name, email, phone, address, ...)")
    s.add_argument("--purpose", action="append", help="objection, withdraw_consent: a purpose (repeat)")
    s.set_defaults(func=cmd_submit)

    s = sub.add_parser("cases", help="read cases; the DPO's decisions on them (signed with a credential)")
    s.add_argument("action", choices=["list", "show", "verify", "lift", "extend", "deny", "hold", "release", "open",
                                      "offboard"])
    s.add_argument("case_id", nargs="?")
    _credential_option(s)
    s.add_argument("--method", default="dpo_checked",
                   help="verify: how the identity was verified (email_link, id_document, ...; default dpo_checked)")
    s.add_argument("--reason", help="extend, deny, hold: the reasons (extend, deny: the subject is told them)")
    s.add_argument("--ground", help="deny: a denial ground of the case's jurisdiction (see its data file)")
    s.add_argument("--kind", choices=["legal_hold", "suspected_fraud"], help="hold: what kind of hold")
    s.add_argument("--email", help="open: the subject's email")
    s.add_argument("--phone", help="open: the subject's phone")
    s.add_argument("--customer-id", help="open: the subject's customer id")
    s.add_argument("--jurisdiction", help="open: default DSRFLOW_JURISDICTION")
    s.add_argument("--controller",
                   help="open: the controller (tenant) the case belongs to; the credential's actor must be "
                   "of it (default: default); offboard: the client company leaving; list: only its cases")
    s.add_argument("--handover", action="store_true", help="offboard: hand all of the controller's data over")
    s.add_argument("--delete", action="store_true", help="offboard: delete all of the controller's data")
    s.add_argument("--until", help="extend: the new due date, YYYY-MM-DD (default: the latest the law allows)")
    s.add_argument("--identifier", action="append", choices=[t.value for t in IdentifierType],
                   help="verify: an identifier type that was verified (repeat; default: every one given)")
    s.add_argument("--status", choices=[c.value for c in CaseStatus])
    s.add_argument("--right", choices=[r.value for r in Right])
    s.add_argument("--limit", type=_positive_int, default=50)
    s.add_argument("--json", action="store_true", help="print JSON: an array (list) or the case (show)")
    s.set_defaults(func=cmd_cases)

    s = sub.add_parser("audit", help="check timelines' hash chains against their anchors")
    s.add_argument("action", choices=["verify"])
    s.add_argument("case_id", nargs="?", help="one case (default: every case)")
    s.add_argument("--no-topic", action="store_true", help="compare with the case rows only, not dsr.cases.v1")
    s.add_argument("--json", action="store_true", help="print JSON")
    s.set_defaults(func=cmd_audit)

    s = sub.add_parser("systems", help="systems that hold personal data: list, declare; approve what workers "
                       "announce; their signing keys")
    s.add_argument("action", choices=["list", "declare", "pending", "approve", "refuse", "key", "revoke-key",
                                      "coordinator-key"])
    s.add_argument("file", nargs="?", help="declare: a JSON or TOML SystemDeclaration; key, approve, refuse: the "
                   "system's name; revoke-key: the key id")
    s.add_argument("--digest", help="approve, refuse: the announced declaration's digest (systems pending shows it)")
    s.add_argument("--reason", help="refuse: why (no personal data)")
    s.add_argument("--all", action="store_true", help="pending: every system's last announcement")
    _credential_option(s)
    s.add_argument("--out", help="key: where to write the worker's credential file (default "
                   "<state>/credentials/system-NAME.json); coordinator-key: the folder (default <state>/credentials)")
    s.add_argument("--json", action="store_true", help="list, pending, approve, refuse: print JSON")
    s.set_defaults(func=cmd_systems)

    s = sub.add_parser("tasks", help="tasks: list; complete or decline a manual one; skip, retry or reassign one")
    s.add_argument("action", choices=["list", "complete", "decline", "skip", "retry", "reassign"])
    s.add_argument("task_id", nargs="?")
    s.add_argument("--status", choices=[t.value for t in TaskStatus], default="manual", help="list: which tasks")
    _credential_option(s)
    s.add_argument("--note", help="complete, decline, skip: what was done, or why not (no personal data)")
    s.add_argument("--to-system", metavar="NAME", help="reassign: give the task to this registered system")
    s.add_argument("--to-person", metavar="NAME", help="reassign: give the task to a person (a role or a name), "
                   "who completes or declines it")
    s.add_argument("--reason", help="reassign: why (no personal data)")
    s.add_argument("--not-found", action="store_true", help="complete: the system holds nothing of the subject")
    s.add_argument("--limit", type=_positive_int, default=100)
    s.add_argument("--json", action="store_true", help="print JSON")
    s.set_defaults(func=cmd_tasks)

    s = sub.add_parser("actors", help="who may decide: actors, their keys and credential files (admin)")
    s.add_argument("action", choices=["add", "key", "revoke", "disable", "list"])
    s.add_argument("target", nargs="?", metavar="NAME | KEY_ID",
                   help="add, key, disable: the actor's name; revoke: a key id (see `dsrflow actors list`)")
    s.add_argument("--role", choices=["dpo", "operator", "admin"],
                   help="add: dpo (every decision), operator (carries out tasks), admin (manages actors)")
    s.add_argument("--controller", default="default",
                   help="add: the controller (tenant) whose cases the actor decides on (default: default)")
    s.add_argument("--out", metavar="FILE",
                   help="add, key: where the credential goes (default: <state dir>/credentials/; never replaced)")
    s.add_argument("--json", action="store_true", help="list: print JSON (key ids, never keys)")
    s.set_defaults(func=cmd_actors)

    s = sub.add_parser("suppression", help="the suppression list of erased people (dsr.suppressions.v1)")
    s.add_argument("action", choices=["key", "check"])
    s.add_argument("--out", metavar="FILE", help="key: where to write it (default <state dir>/credentials/"
                   "suppression-key.json; never replaced)")
    s.add_argument("--email", help="check: an email, however written")
    s.add_argument("--phone", help="check: a phone number (a local one is read in --jurisdiction's country)")
    s.add_argument("--jurisdiction", help="check: where a local phone number is from (default DSRFLOW_JURISDICTION)")
    s.add_argument("--key", metavar="FILE", help="check: the key file (default DSRFLOW_SUPPRESSION_KEY)")
    s.add_argument("--controller", default="default", help="check: whose list (each controller has its own)")
    s.set_defaults(func=cmd_suppression)

    s = sub.add_parser("demo", help="end-to-end demo on the embedded stack")
    s.add_argument("--broker", choices=["apache", "tansu"], default="apache",
                   help="Apache Kafka (needs Java 17+; the default) or the memory-only Tansu broker")
    s.set_defaults(func=cmd_demo)
    return p


_SERVICES = frozenset({"coordinator", "worker", "api", "demo"})

_KAFKA_SETTINGS = ("kafka_bootstrap", "kafka_security_protocol", "kafka_sasl_mechanism", "kafka_sasl_username",
                   "kafka_sasl_password", "kafka_ssl_cafile", "kafka_idempotent_producer", "topic_replication_factor")
#: The settings a service reads, checked before it starts: a long-running process must not meet an
#: invalid one later, in a timer. One-shot commands need no list: reading an invalid setting fails.
SERVICE_SETTINGS: dict[str, tuple[str, ...]] = {
    "coordinator": ("state_dir", *_KAFKA_SETTINGS, "pg_dsn", "export_dir", "max_task_attempts", "task_timeout",
                    "task_backoff_max", "deadline_warning_share", "internal_target", "case_data_retention",
                    "pseudonym_key", "offboarding_period", "require_signed_receipts", "coordinator_credential",
                    "outbox_retention", "suppression_key", "bundle_retention",
                    "inbox_retention", "startup_timeout", "log_level"),
    "worker": ("state_dir", *_KAFKA_SETTINGS, "pg_dsn", "export_dir", "worker_credential", "worker_ledger_dsn",
               "coordinator_public_keys", "startup_timeout", "log_level"),
    "api": ("state_dir", "pg_dsn", "api_host", "api_port", "api_token", "startup_timeout", "log_level"),
}


class _NotACommandsOutcome(logging.Filter):
    """Drops the coordinator's lines on a command's outcome ("command ... refused", "... applied"):
    the CLI says it itself, in its one line (or one error line)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (isinstance(record.msg, str) and record.msg.startswith("command "))


_COMMAND_OUTCOMES = _NotACommandsOutcome()


def _configure_logging(settings: Settings, command: str) -> None:
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    coordinator = logging.getLogger("dsrflow.coordinator")
    coordinator.removeFilter(_COMMAND_OUTCOMES)
    if command not in _SERVICES and settings.log_level != "DEBUG":
        # A one-shot command reports a broker it cannot reach in its one error line; aiokafka
        # would log each failed connection attempt as well.
        logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
        coordinator.addFilter(_COMMAND_OUTCOMES)


def _explain(exc: BaseException, settings: Settings | None) -> DsrflowError | None:
    """The DsrflowError that explains ``exc``, when there is one."""
    if isinstance(exc, DsrflowError):
        return exc
    if settings is None:
        return None
    try:
        if type(exc).__module__.startswith("aiokafka"):
            return broker_error(settings, exc)
        if type(exc).__module__.startswith("asyncpg"):
            import asyncpg

            if isinstance(exc, asyncpg.UndefinedTableError):
                return ConfigError(f"the case store at {settings.case_store_location} has no dsrflow tables: "
                                   "run `dsrflow db migrate`")
            return case_store_error(settings, exc)
    except DsrflowError as inner:  # the address itself is not configured
        return inner
    return None


def _log_level(settings: Settings | None) -> str:
    if settings is not None:
        try:
            return settings.log_level
        except ConfigError:  # DSRFLOW_LOG_LEVEL itself is invalid
            pass
    return os.environ.get("DSRFLOW_LOG_LEVEL", "")


def _fail(exc: BaseException, settings: Settings | None) -> int:
    if _log_level(settings).strip().upper() == "DEBUG":
        traceback.print_exception(exc)
    explained = _explain(exc, settings)
    message = str(explained) if explained is not None else f"unexpected {type(exc).__name__}: {exc}"
    sys.stdout.flush()
    print("error: " + " ".join(message.split()), file=sys.stderr)
    return 2 if isinstance(explained, InvalidInput) else 1


def main(argv: Sequence[str] | None = None) -> int:
    settings: Settings | None = None
    try:
        args = build_parser().parse_args(argv)
        settings = get_settings()
        _configure_logging(settings, args.command)  # every command logs: it reads DSRFLOW_LOG_LEVEL
        if args.command in SERVICE_SETTINGS:
            settings.require(*SERVICE_SETTINGS[args.command])
        return int(args.func(args, settings) or 0)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - every failure ends as one line on stderr
        return _fail(exc, settings)


if __name__ == "__main__":
    sys.exit(main())
