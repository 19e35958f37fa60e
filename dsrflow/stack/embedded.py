"""The embedded stack behind ``dsrflow stack up|down|status`` and the demo: embedded
PostgreSQL and a broker, started as detached daemons that outlive the command that started
them. Their addresses go to ``<state_dir>/stack.json``, which
:class:`dsrflow.settings.Settings` reads (keys ``kafka_bootstrap``, ``pg_dsn``).

The broker is Apache Kafka (single-node KRaft) by default: every Kafka client talks to it
(librdkafka-based ones such as kcat and confluent-kafka, the Java client, aiokafka), and it
keeps its topics and offsets across ``down`` and ``up``. Tansu (memory only, no JVM) is an
explicit choice: librdkafka clients cannot talk to it.

Layout of ``state_dir``::

    stack.json      addresses, pids, broker kind (present while the stack runs)
    pg/             PostgreSQL data directory (kept across down/up)
    postgres.log    server log
    kafka/          Apache Kafka's log dirs (kept across down/up), server.properties, server.log
    tansu.log       Tansu's log (Tansu keeps topics in memory: they go with `down`)
"""

from __future__ import annotations

import contextlib
import dataclasses
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

DATABASE = "dsrflow"
STACK_FILE = "stack.json"
BROKERS = ("apache", "tansu")
#: the service name each broker kind runs under in stack.json
BROKER_SERVICE = {"apache": "kafka", "tansu": "tansu"}
SERVICES = ("postgres", "kafka", "tansu")


class StackError(RuntimeError):
    """The embedded stack cannot be started as asked (one line, for the CLI)."""


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
        elif service == "kafka":  # a controlled shutdown flushes its logs; SIGKILL only if it hangs
            stop_group(pid, ((15, 30.0),), started=started)
        else:
            stop_group(pid, started=started)
        stopped = True
    if service == "postgres":  # a server on our pgdata that stack.json does not know about
        stray = running_postmaster(Path(state_dir) / "pg")
        if stray:
            stop_postmaster(stray)
            stopped = True
    return stopped


def _broker_of(data: dict[str, Any] | None) -> str | None:
    if not data:
        return None
    kind = data.get("broker_kind")
    if kind in BROKERS:
        return str(kind)
    return "tansu" if (data.get("pids") or {}).get("tansu") else None  # a stack.json from before the choice


def _free(port: int | None) -> bool:
    return bool(port) and not port_open("127.0.0.1", int(port))  # type: ignore[arg-type]


@dataclasses.dataclass(frozen=True)
class _Started:
    pid: int
    bootstrap: str
    log: str
    description: str
    ports: dict[str, int] | None = None


def _start_apache(state_dir: Path, old: dict[str, Any] | None) -> _Started:
    """Apache Kafka in ``<state_dir>/kafka``, on the ports it had before when they are free (its
    clients keep their settings)."""
    from .kafka import ApacheKafka, KafkaUnavailable

    ports = (old or {}).get("kafka_ports") or _last_ports(state_dir) or {}
    port, controller = ports.get("broker"), ports.get("controller")
    if not (_free(port) and _free(controller) and port != controller):
        port = controller = None
    try:
        kafka = ApacheKafka(state_dir / "kafka", port=port, controller_port=controller, keep_data=True,
                            detached=True, jvm_opts=EMBEDDED_JVM_OPTS)
        kafka.start()
    except KafkaUnavailable as exc:
        raise StackError(f"{str(exc).splitlines()[0]}; or run `dsrflow stack up --broker tansu`") from exc
    assert kafka.pid is not None
    ports = {"broker": kafka.port, "controller": kafka.controller_port}
    _write_ports(state_dir, ports)
    return _Started(kafka.pid, kafka.bootstrap, str(kafka.log_path),
                    f"Apache Kafka {kafka.version} (KRaft, data kept in {state_dir / 'kafka'})", ports)


def _start_tansu(state_dir: Path) -> _Started:
    from .tansu import Tansu, tansu_version

    broker = Tansu(log_path=state_dir / "tansu.log", detached=True).start()
    assert broker.pid is not None
    return _Started(broker.pid, broker.bootstrap, str(broker.log_path), f"tansu {tansu_version()} (memory storage)")


#: A smaller heap than the tests' broker: the demo runs five more processes beside it.
EMBEDDED_JVM_OPTS = (
    "-Xms128m",
    "-Xmx512m",
    "-XX:+UseSerialGC",
    "-XX:-UsePerfData",
    "-XX:+ExitOnOutOfMemoryError",
    "-Djava.awt.headless=true",
    "-Djava.net.preferIPv4Stack=true",
)


def up(state_dir: Path, *, broker: str = "apache") -> dict[str, Any]:
    """Start (or keep) embedded PostgreSQL and the broker (``"apache"`` or ``"tansu"``) for
    ``state_dir`` and return the contents of ``stack.json``. Idempotent: services already
    running and healthy are kept, missing ones are (re)started. A stack that runs another
    broker than the one asked for must be stopped first (:class:`StackError`)."""
    if broker not in BROKERS:
        raise StackError(f"unknown broker {broker!r}: choose one of {', '.join(BROKERS)}")
    service = BROKER_SERVICE[broker]
    state_dir = Path(state_dir).expanduser().resolve()
    with _locked(state_dir):
        old = _read(state_dir)
        running_broker = _broker_of(old)
        if running_broker and running_broker != broker and _service_up(old, BROKER_SERVICE[running_broker]):
            raise StackError(f"the stack in {state_dir} runs {running_broker}, not {broker}: "
                             "run `dsrflow stack down` first")
        if old and _service_up(old, "postgres") and _service_up(old, service):
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
            # the broker
            if old and _service_up(old, service):
                for key in ("pids", "started", "addresses", "logs"):
                    data[key][service] = old[key][service]
                description = old.get("broker", broker)
                kafka_ports = old.get("kafka_ports")
            else:
                _stop_service(old, service, state_dir)
                new = _start_apache(state_dir, old) if broker == "apache" else _start_tansu(state_dir)
                started_now.append((service, new.pid))
                data["pids"][service] = new.pid
                data["started"][service] = create_time(new.pid)
                data["addresses"][service] = new.bootstrap
                data["logs"][service] = new.log
                description, kafka_ports = new.description, new.ports
            pg_dsn = run_sync(lambda: create_database(pg_admin, DATABASE), timeout=60)
        except BaseException:
            for name, pid in started_now:
                _stop_service({"pids": {name: pid}}, name, state_dir)
            raise
        if kafka_ports:
            data["kafka_ports"] = kafka_ports
        data.update(
            {
                "kafka_bootstrap": data["addresses"][service],
                "pg_dsn": pg_dsn,
                "pg_admin_dsn": pg_admin,
                "broker_kind": broker,
                "broker": description,
                # Tansu answers InitProducerId with an error: producers run without idempotence there.
                "idempotent_producer": broker == "apache",
                "pgdata": str(state_dir / "pg"),
                "updated_at": datetime.now(UTC).isoformat(timespec="seconds"),
            }
        )
        _write(state_dir, data)
        return data


def down(state_dir: Path) -> bool:
    """Stop the embedded stack of ``state_dir`` (whole process groups and their
    descendants; SIGKILL after a timeout) and remove ``stack.json``. PostgreSQL's data
    stays in ``<state_dir>/pg``, Apache Kafka's in ``<state_dir>/kafka``. Returns whether
    anything was running."""
    state_dir = Path(state_dir).expanduser().resolve()
    if not state_dir.exists():
        return False
    with _locked(state_dir):
        data = _read(state_dir)
        stopped = False
        for service in ("kafka", "tansu", "postgres"):
            stopped = _stop_service(data, service, state_dir) or stopped
        existed = stack_file(state_dir).exists()
        stack_file(state_dir).unlink(missing_ok=True)
        return stopped or existed


def _write_ports(state_dir: Path, ports: dict[str, int]) -> None:
    """Remembered across `down`: the next `up` takes the same ports, so clients keep their settings."""
    (state_dir / "kafka").mkdir(parents=True, exist_ok=True)
    (state_dir / "kafka" / "ports.json").write_bytes(orjson.dumps(ports))


def _last_ports(state_dir: Path) -> dict[str, Any] | None:
    try:
        ports: dict[str, Any] = orjson.loads((state_dir / "kafka" / "ports.json").read_bytes())
        return ports
    except (OSError, orjson.JSONDecodeError):
        return None


def status(state_dir: Path) -> dict[str, Any]:
    """Whether each service of the embedded stack runs, with its pid and address."""
    state_dir = Path(state_dir).expanduser().resolve()
    data = _read(state_dir) or {}
    broker = _broker_of(data) or "apache"
    services: dict[str, dict[str, Any]] = {}
    for service in ("postgres", BROKER_SERVICE[broker]):
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
        "broker": data.get("broker"),
        "broker_kind": data.get("broker_kind") if data else None,
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


__all__ = ["BROKERS", "DATABASE", "StackError", "down", "status", "up", "stack_file", "with_database", "wait_gone"]
