"""The embedded stack behind ``dsrflow stack up|down|status`` and the demo: embedded
PostgreSQL and a memory-only Tansu broker, started as detached daemons that outlive
the command that started them. Their addresses go to ``<state_dir>/stack.json``,
which :class:`dsrflow.settings.Settings` reads (keys ``kafka_bootstrap``, ``pg_dsn``).

Layout of ``state_dir``::

    stack.json      addresses, pids (present while the stack runs)
    pg/             PostgreSQL data directory (kept across down/up)
    postgres.log    server log
    tansu.log       broker log (Tansu keeps topics in memory: they go with `down`)
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from ._proc import alive, create_time, port_open, run_sync, stop_group
from .postgres import EmbeddedPostgres, create_database, running_postmaster, stop_postmaster, with_database
from .tansu import Tansu, tansu_version

DATABASE = "dsrflow"
STACK_FILE = "stack.json"
SERVICES = ("postgres", "tansu")


def stack_file(state_dir: Path) -> Path:
    return Path(state_dir) / STACK_FILE


@contextlib.contextmanager
def _locked(state_dir: Path) -> Iterator[None]:
    """One up/down at a time per state dir (across processes)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    with open(state_dir / ".stack.lock", "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _read(state_dir: Path) -> dict[str, Any] | None:
    path = stack_file(state_dir)
    try:
        data: dict[str, Any] = orjson.loads(path.read_bytes())
        return data
    except (OSError, orjson.JSONDecodeError):
        return None


def _write(state_dir: Path, data: dict[str, Any]) -> None:
    path = stack_file(state_dir)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(orjson.dumps(data, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n")
    os.replace(tmp, path)


def _address(data: dict[str, Any], service: str) -> tuple[str, int] | None:
    addr = (data.get("addresses") or {}).get(service)
    if not addr:
        return None
    host, _, port = str(addr).rpartition(":")
    return host, int(port)


def _service_up(data: dict[str, Any] | None, service: str) -> bool:
    """The recorded process of ``service`` runs (same pid, same start time) and its
    port accepts connections."""
    if not data:
        return False
    pid = (data.get("pids") or {}).get(service)
    started = (data.get("started") or {}).get(service)
    addr = _address(data, service)
    return bool(pid) and alive(pid, started) and addr is not None and port_open(*addr)


def _stop_service(data: dict[str, Any] | None, service: str, state_dir: Path) -> bool:
    """Stop ``service``'s recorded process (whole group, descendants; SIGKILL after a
    timeout). Returns whether something was running."""
    stopped = False
    pid = ((data or {}).get("pids") or {}).get(service)
    started = ((data or {}).get("started") or {}).get(service)
    if pid and alive(pid, started):
        if service == "postgres":
            stop_postmaster(pid, started=started)
        else:
            stop_group(pid, started=started)
        stopped = True
    if service == "postgres":  # a server on our pgdata that stack.json does not know about
        stray = running_postmaster(Path(state_dir) / "pg")
        if stray:
            stop_postmaster(stray)
            stopped = True
    return stopped


def up(state_dir: Path) -> dict[str, Any]:
    """Start (or keep) embedded PostgreSQL and Tansu for ``state_dir`` and return the
    contents of ``stack.json``. Idempotent: services already running and healthy are
    kept, missing ones are (re)started."""
    state_dir = Path(state_dir).expanduser().resolve()
    with _locked(state_dir):
        old = _read(state_dir)
        if old and all(_service_up(old, s) for s in SERVICES):
            return old
        data: dict[str, Any] = {
            "state_dir": str(state_dir),
            "pids": {},
            "started": {},
            "addresses": {},
            "logs": {},
        }
        started_now: list[tuple[str, int]] = []
        try:
            # PostgreSQL
            if old and _service_up(old, "postgres"):
                for key in ("pids", "started", "addresses", "logs"):
                    data[key]["postgres"] = old[key]["postgres"]
                pg_admin = old["pg_admin_dsn"]
            else:
                _stop_service(old, "postgres", state_dir)
                pg = EmbeddedPostgres(state_dir / "pg", detached=True, log_path=state_dir / "postgres.log").start()
                assert pg.pid is not None
                started_now.append(("postgres", pg.pid))
                data["pids"]["postgres"] = pg.pid
                data["started"]["postgres"] = create_time(pg.pid)
                data["addresses"]["postgres"] = f"{pg.host}:{pg.port}"
                data["logs"]["postgres"] = str(pg.log_path)
                pg_admin = pg.dsn
            # Tansu
            if old and _service_up(old, "tansu"):
                for key in ("pids", "started", "addresses", "logs"):
                    data[key]["tansu"] = old[key]["tansu"]
            else:
                _stop_service(old, "tansu", state_dir)
                broker = Tansu(log_path=state_dir / "tansu.log", detached=True).start()
                assert broker.pid is not None
                started_now.append(("tansu", broker.pid))
                data["pids"]["tansu"] = broker.pid
                data["started"]["tansu"] = create_time(broker.pid)
                data["addresses"]["tansu"] = broker.bootstrap
                data["logs"]["tansu"] = str(broker.log_path)
            pg_dsn = run_sync(lambda: create_database(pg_admin, DATABASE), timeout=60)
        except BaseException:
            for service, pid in started_now:
                _stop_service({"pids": {service: pid}}, service, state_dir)
            raise
        data.update(
            {
                "kafka_bootstrap": data["addresses"]["tansu"],
                "pg_dsn": pg_dsn,
                "pg_admin_dsn": pg_admin,
                "broker": f"tansu {tansu_version()} (memory storage)",
                # Tansu answers InitProducerId with an error: producers run without idempotence.
                "idempotent_producer": False,
                "pgdata": str(state_dir / "pg"),
                "updated_at": datetime.now(UTC).isoformat(timespec="seconds"),
            }
        )
        _write(state_dir, data)
        return data


def down(state_dir: Path) -> bool:
    """Stop the embedded stack of ``state_dir`` (whole process groups and their
    descendants; SIGKILL after a timeout) and remove ``stack.json``. PostgreSQL's data
    stays in ``<state_dir>/pg``. Returns whether anything was running."""
    state_dir = Path(state_dir).expanduser().resolve()
    if not state_dir.exists():
        return False
    with _locked(state_dir):
        data = _read(state_dir)
        stopped = False
        for service in ("tansu", "postgres"):
            stopped = _stop_service(data, service, state_dir) or stopped
        existed = stack_file(state_dir).exists()
        stack_file(state_dir).unlink(missing_ok=True)
        return stopped or existed


def status(state_dir: Path) -> dict[str, Any]:
    """Whether each service of the embedded stack runs, with its pid and address."""
    state_dir = Path(state_dir).expanduser().resolve()
    data = _read(state_dir) or {}
    services: dict[str, dict[str, Any]] = {}
    for service in SERVICES:
        pid = (data.get("pids") or {}).get(service)
        addr = (data.get("addresses") or {}).get(service)
        services[service] = {
            "running": _service_up(data, service),
            "pid": pid,
            "address": addr,
            "log": (data.get("logs") or {}).get(service),
        }
    if not services["postgres"]["running"]:
        stray = running_postmaster(state_dir / "pg")
        if stray:
            services["postgres"].update(pid=stray, note="running but not recorded in stack.json")
    running = all(s["running"] for s in services.values())
    return {
        "state_dir": str(state_dir),
        "running": running,
        "stack_file": str(stack_file(state_dir)) if data else None,
        "kafka_bootstrap": data.get("kafka_bootstrap"),
        "pg_dsn": data.get("pg_dsn"),
        "services": services,
        "checked_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def wait_gone(pids: list[int], timeout: float = 10.0) -> bool:
    """True once none of ``pids`` runs (for callers that check after ``down``)."""
    deadline = time.monotonic() + timeout
    while any(alive(p) for p in pids):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


__all__ = ["DATABASE", "down", "status", "up", "stack_file", "with_database", "wait_gone"]
