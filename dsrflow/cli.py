"""``dsrflow``: the command line.

    dsrflow stack up | down | status      embedded PostgreSQL + broker in the state directory
    dsrflow db migrate                    apply SQL migrations to the case store
    dsrflow topics apply [--system S]     create topics; report drift from topics/
    dsrflow topics schemas [--check]      (re)generate topics/schemas/ from the models
    dsrflow coordinator                   run the coordinator
    dsrflow worker NAME [--app MOD:ATTR]  run a system's worker
    dsrflow submit --right R --email E    publish a RightsRequested event
    dsrflow cases list | show ID          read cases from the case store
    dsrflow cases verify ID --by WHO      identity verified: fan an awaiting case out
    dsrflow api                           serve the DPO HTTP API
    dsrflow demo                          the end-to-end demo on the embedded stack
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import sys
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from . import topics
from .rights import CaseStatus, Right
from .settings import Settings, StackNotRunning, get_settings


def _print(obj: Any) -> None:
    sys.stdout.write(orjson.dumps(obj, option=orjson.OPT_INDENT_2, default=str).decode() + "\n")


# -- stack -----------------------------------------------------------------
def cmd_stack(args: argparse.Namespace, settings: Settings) -> int:
    from . import stack

    if args.action == "up":
        info = stack.up(settings.state_dir)
        print("embedded stack is up; connection settings:")
        print(f"  DSRFLOW_KAFKA_BOOTSTRAP={info['kafka_bootstrap']}")
        print(f"  DSRFLOW_PG_DSN={info['pg_dsn']}")
        print(f"  state directory: {settings.state_dir.resolve()}")
        return 0
    if args.action == "down":
        stopped = stack.down(settings.state_dir)
        print("embedded stack stopped" if stopped else "embedded stack was not running")
        return 0
    _print(stack.status(settings.state_dir))
    return 0


# -- db, topics ------------------------------------------------------------
def cmd_db(args: argparse.Namespace, settings: Settings) -> int:
    from .store import migrate

    applied = asyncio.run(migrate(settings.dsn))
    for m in applied:
        print(f"applied {m.version:04d}_{m.name}")
    print("case store is up to date" if not applied else f"{len(applied)} migration(s) applied")
    return 0


async def _registered_systems(settings: Settings) -> list[str]:
    import asyncpg

    from .registry import active_systems

    conn = await asyncpg.connect(settings.dsn)
    try:
        return [s.name for s in await active_systems(conn)]
    except asyncpg.UndefinedTableError:
        return []
    finally:
        await conn.close()


def cmd_topics(args: argparse.Namespace, settings: Settings) -> int:
    if args.action == "schemas":
        generated = topics.generate_schemas()
        directory = topics.topics_dir() / "schemas"
        if args.check:
            stale = [n for n, body in generated.items()
                     if not (directory / n).exists() or (directory / n).read_bytes() != body]
            for n in stale:
                print(f"schema drift: topics/schemas/{n} differs from the models", file=sys.stderr)
            return 1 if stale else 0
        for path in topics.write_schemas():
            print(f"wrote {path}")
        return 0
    systems = sorted(set(args.system or []) | set(asyncio.run(_registered_systems(settings))))
    report = asyncio.run(topics.apply(settings.kafka_client_options(), topics.specs_for(systems),
                                      replication_factor=settings.topic_replication_factor))
    for name in report.created:
        print(f"created   {name}")
    for name in report.unchanged:
        print(f"unchanged {name}")
    for name, diffs in report.drift.items():
        for d in diffs:
            print(f"DRIFT     {name}: {d}")
    return 2 if report.drift else 0


# -- services --------------------------------------------------------------
def cmd_coordinator(args: argparse.Namespace, settings: Settings) -> int:
    from .coordinator.app import run

    sys.argv = [sys.argv[0], "worker"]  # faust's Worker reads argv
    run(settings)
    return 0


def load_worker(name: str, app: str | None) -> Any:
    """Find a system's worker: ``--app module:attr``, else the ``dsrflow.workers`` entry point
    NAME, else the reference system ``examples.NAME.worker:worker`` (from the current directory)."""
    from importlib.metadata import entry_points

    from .worker import load_worker as load

    if app is None:
        eps = [ep for ep in entry_points(group="dsrflow.workers") if ep.name == name]
        if eps:
            return eps[0].load()
        app = f"examples.{name}.worker:worker"
    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    worker = load(app)
    if worker.name != name:
        raise SystemExit(f"error: {app} is the worker of system {worker.name!r}, not {name!r}")
    return worker


def cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    worker = load_worker(args.name, args.app)
    asyncio.run(worker.run(settings))
    return 0


def cmd_api(args: argparse.Namespace, settings: Settings) -> int:
    from .api import serve

    asyncio.run(serve(settings))
    return 0


# -- submit, cases -----------------------------------------------------------
async def submit(settings: Settings, requests: Sequence[Any]) -> list[str]:
    """Publish RightsRequested events (acks=all); returns their event ids."""
    from aiokafka import AIOKafkaProducer

    from . import codec

    producer = AIOKafkaProducer(**settings.producer_options())
    await producer.start()
    ids = []
    try:
        futures = []
        for req in requests:
            value, headers = codec.encode(req, source="dsrflow/cli")
            ids.append(dict(headers)["ce_id"].decode())
            futures.append(await producer.send(topics.REQUESTS, value=value, key=req.request_id.encode(),
                                               headers=headers))
        await asyncio.gather(*futures)
    finally:
        await producer.stop()
    return ids


def cmd_submit(args: argparse.Namespace, settings: Settings) -> int:
    from .events import RightsRequested

    identifiers = {k: v for k, v in (("email", args.email), ("phone", args.phone),
                                       ("customer_id", args.customer_id)) if v}
    if not identifiers:
        print("error: give at least one of --email, --phone, --customer-id", file=sys.stderr)
        return 2
    changes = dict(c.split("=", 1) for c in args.change) if args.change else None
    req = RightsRequested(
        request_id=args.request_id or f"cli-{uuid.uuid4()}",
        right=Right(args.right),
        subject={"identifiers": identifiers},  # type: ignore[arg-type]
        jurisdiction=args.jurisdiction,
        received_at=datetime.now(UTC),
        verified=args.verified,
        channel="cli",
        changes=changes,
    )
    asyncio.run(submit(settings, [req]))
    print(f"submitted {req.right} request {req.request_id}")
    return 0


def cmd_cases(args: argparse.Namespace, settings: Settings) -> int:
    import asyncpg

    from .store import queries

    async def verify() -> int:
        from .coordinator.service import CaseNotFound, Coordinator, InvalidTransition

        pool = await asyncpg.create_pool(settings.dsn, min_size=1, max_size=1)
        try:
            status = await Coordinator(settings, pool).verify(uuid.UUID(args.case_id), by=args.by)
        except (CaseNotFound, InvalidTransition) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        finally:
            await pool.close()
        print(f"case {args.case_id} verified: {status}")
        return 0

    if args.action == "verify":
        return asyncio.run(verify())

    async def go() -> int:
        conn = await asyncpg.connect(settings.dsn)
        now = datetime.now(UTC)
        try:
            if args.action == "list":
                page = await queries.list_cases(conn, now=now, status=args.status, right=args.right,
                                                limit=args.limit)
                for c in page.items:
                    flag = " OVERDUE" if c.overdue else ""
                    print(f"{c.case_id}  {c.right:<18} {c.status:<26} due {c.due_at:%Y-%m-%d}{flag}  {c.request_id}")
                if not page.items:
                    print("no cases")
                return 0
            case = await queries.get_case(conn, uuid.UUID(args.case_id), now=now)
            if case is None:
                print(f"no case {args.case_id}", file=sys.stderr)
                return 1
            tasks = await queries.case_tasks(conn, case.summary.case_id)
            timeline = await queries.case_timeline(conn, case.summary.case_id)
            _print({**dataclasses.asdict(case), "tasks": [dataclasses.asdict(t) for t in tasks],
                    "timeline": [dataclasses.asdict(t) for t in timeline]})
            return 0
        finally:
            await conn.close()

    return asyncio.run(go())


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from .demo import main as demo_main

    return demo_main(settings)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dsrflow", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("stack", help="embedded PostgreSQL and broker")
    s.add_argument("action", choices=["up", "down", "status"])
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

    s = sub.add_parser("submit", help="publish a RightsRequested event")
    s.add_argument("--right", required=True, choices=[r.value for r in Right])
    s.add_argument("--email")
    s.add_argument("--phone")
    s.add_argument("--customer-id")
    s.add_argument("--request-id")
    s.add_argument("--jurisdiction", default=get_settings().jurisdiction)
    s.add_argument("--verified", action="store_true", help="identity was verified upstream")
    s.add_argument("--change", action="append", help="rectification: field=value")
    s.set_defaults(func=cmd_submit)

    s = sub.add_parser("cases", help="read cases")
    s.add_argument("action", choices=["list", "show", "verify"])
    s.add_argument("case_id", nargs="?")
    s.add_argument("--by", help="verify: who verified the subject's identity (recorded on the timeline)")
    s.add_argument("--status", choices=[c.value for c in CaseStatus])
    s.add_argument("--right", choices=[r.value for r in Right])
    s.add_argument("--limit", type=int, default=50)
    s.set_defaults(func=cmd_cases)

    s = sub.add_parser("demo", help="end-to-end demo on the embedded stack")
    s.set_defaults(func=cmd_demo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = get_settings()
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "cases" and args.action in ("show", "verify") and not args.case_id:
        print(f"error: cases {args.action} needs a case id", file=sys.stderr)
        return 2
    if args.command == "cases" and args.action == "verify" and not args.by:
        print("error: cases verify needs --by (who verified the identity)", file=sys.stderr)
        return 2
    try:
        return int(args.func(args, settings) or 0)
    except StackNotRunning as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
