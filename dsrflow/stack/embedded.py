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
                    (server.log.1: the previous run's), ports.json (its ports, reused by the next
                    `up`), kafka.pid (pid, start time and ports of the JVM while it runs)
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

from ._proc import (
    Interrupted,
    alive,
    create_time,
    kafka_ready_sync,
    no_interrupt,
    port_bindable,
    port_open,
    resend,
    run_sync,
    signals_raise,
    stop_group,
)
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


def _stop_service(data: dict[str, Any] | None, service: str, state_dir: Path,
                  notices: list[str] | None = None) -> bool:
    """Stop ``service``'s recorded process (whole group, descendants; SIGKILL after a
    timeout), and any process of that service on this state dir that stack.json does not
    record (a PostgreSQL on ``pg/``, a JVM on ``kafka/``). Returns whether something was running."""
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
            if notices is not None:
                notices.append(f"stopped PostgreSQL (pid {stray}) that ran on {Path(state_dir) / 'pg'} "
                               "but was not recorded in stack.json")
    elif service == "kafka":  # a JVM on our log dir that stack.json does not know about
        from .kafka import stop_brokers

        strays = stop_brokers(Path(state_dir) / "kafka")
        if strays:
            stopped = True
            if notices is not None:
                notices.append(f"stopped Apache Kafka (pid {', '.join(map(str, strays))}) that ran on "
                               f"{Path(state_dir) / 'kafka'} but was not recorded in stack.json")
    return stopped


def _broker_of(data: dict[str, Any] | None) -> str | None:
    if not data:
        return None
    kind = data.get("broker_kind")
    if kind in BROKERS:
        return str(kind)
    return "tansu" if (data.get("pids") or {}).get("tansu") else None  # a stack.json from before the choice


def _free(port: int | None) -> bool:
    """A remembered port that a server can take now (nothing listens on it or holds it bound)."""
    return bool(port) and port_bindable("127.0.0.1", int(port))  # type: ignore[arg-type]


@dataclasses.dataclass(frozen=True)
class _Started:
    pid: int
    bootstrap: str
    log: str
    description: str
    ports: dict[str, int] | None = None


def _start_apache(state_dir: Path, old: dict[str, Any] | None, notices: list[str]) -> _Started:
    """Apache Kafka in ``<state_dir>/kafka``, on the ports it had before when they can still be
    bound (its clients keep their settings); on fresh ports, with a notice, when they cannot."""
    from .kafka import ApacheKafka, KafkaUnavailable

    ports = (old or {}).get("kafka_ports") or _last_ports(state_dir) or {}
    remembered, controller = ports.get("broker"), ports.get("controller")
    port = remembered if _free(remembered) else None
    if controller == port or not _free(controller):
        controller = None
    try:
        # ports_preferred: should another process take a port between the check above and the
        # JVM's bind, the broker still starts, on fresh ports
        kafka = ApacheKafka(state_dir / "kafka", port=port, controller_port=controller, keep_data=True,
                            detached=True, jvm_opts=EMBEDDED_JVM_OPTS, ports_preferred=True)
        kafka.start()
    except KafkaUnavailable as exc:
        raise StackError(f"{str(exc).splitlines()[0]}; or run `dsrflow stack up --broker tansu`") from exc
    assert kafka.pid is not None
    if remembered and kafka.port != remembered:
        notices.append(f"the broker's address changed from {kafka.host}:{remembered} to {kafka.bootstrap} "
                       f"(port {remembered} is taken by another process): clients set to the old address "
                       f"need DSRFLOW_KAFKA_BOOTSTRAP={kafka.bootstrap}")
    ports = {"broker": kafka.port, "controller": kafka.controller_port}
    _write_ports(state_dir, ports)
    return _Started(kafka.pid, kafka.bootstrap, str(kafka.log_path), _apache_description(state_dir), ports)


def _apache_description(state_dir: Path) -> str:
    from .kafka import kafka_version

    return f"Apache Kafka {kafka_version()} (KRaft, data kept in {state_dir / 'kafka'})"


def _adopt_apache(state_dir: Path, notices: list[str]) -> _Started | None:
    """A broker that runs on ``<state_dir>/kafka`` but is not recorded in stack.json (its ``up``
    was killed before it wrote the file), taken over when it is the only JVM there and answers on
    the port its pid file names. None otherwise: the caller stops whatever runs there."""
    from .kafka import broker_processes

    found = broker_processes(state_dir / "kafka")
    if len(found) != 1:
        return None
    [jvm] = found
    if not (jvm.broker and jvm.port and jvm.controller_port and jvm.bootstrap):
        return None
    if not kafka_ready_sync(jvm.bootstrap, timeout=5.0):
        return None
    ports = {"broker": jvm.port, "controller": jvm.controller_port}
    _write_ports(state_dir, ports)
    notices.append(f"took over Apache Kafka (pid {jvm.pid}, {jvm.bootstrap}) that ran on {state_dir / 'kafka'} "
                   "but was not recorded in stack.json")
    return _Started(jvm.pid, jvm.bootstrap, str(state_dir / "kafka" / "server.log"), _apache_description(state_dir),
                    ports)


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
    ``state_dir`` and return the contents of ``stack.json``, plus ``notices``: a list of
    one-line messages for the user (the broker's address changed; a server that ran on this
    state dir unrecorded was stopped or taken over), empty when there is nothing to tell.
    Idempotent: services already running and healthy are kept, missing ones are (re)started.
    A stack that runs another broker than the one asked for must be stopped first
    (:class:`StackError`).

    SIGTERM or SIGHUP while starting (main thread only) stops what this call started, then
    takes its usual course: nothing is left running that stack.json does not record."""
    if broker not in BROKERS:
        raise StackError(f"unknown broker {broker!r}: choose one of {', '.join(BROKERS)}")
    state_dir = Path(state_dir).expanduser().resolve()
    try:
        with signals_raise():
            return _up(state_dir, broker)
    except Interrupted as exc:
        resend(exc.signum)  # the previous handler (by default: the process ends as the signal asks)
        raise StackError(f"`stack up` was {exc} while starting; what it had started is stopped") from exc


def _up(state_dir: Path, broker: str) -> dict[str, Any]:
    service = BROKER_SERVICE[broker]
    notices: list[str] = []
    with _locked(state_dir):
        old = _read(state_dir)
        running_broker = _broker_of(old)
        if running_broker and running_broker != broker and _service_up(old, BROKER_SERVICE[running_broker]):
            raise StackError(f"the stack in {state_dir} runs {running_broker}, not {broker}: "
                             "run `dsrflow stack down` first")
        if old and _service_up(old, "postgres") and _service_up(old, service):
            return {**old, "notices": notices}
        data: dict[str, Any] = {
            "state_dir": str(state_dir),
            "pids": {},
            "started": {},
            "addresses": {},
            "logs": {},
        }
        #: services this call (re)starts or takes over: stopped again if the call fails
        starting: dict[str, int | None] = {}
        written = False
        try:
            # PostgreSQL
            if old and _service_up(old, "postgres"):
                for key in ("pids", "started", "addresses", "logs"):
                    data[key]["postgres"] = old[key]["postgres"]
                pg_admin = old["pg_admin_dsn"]
            else:
                _stop_service(old, "postgres", state_dir, notices)
                starting["postgres"] = None
                pg = EmbeddedPostgres(state_dir / "pg", detached=True, log_path=state_dir / "postgres.log").start()
                assert pg.pid is not None
                starting["postgres"] = pg.pid
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
                starting[service] = None
                if broker != "apache":  # a JVM left on <state_dir>/kafka by an `up` that was killed
                    _stop_service(None, "kafka", state_dir, notices)
                new = _adopt_apache(state_dir, notices) if broker == "apache" else None
                if new is None:
                    # the recorded process, and (Apache Kafka) any JVM on <state_dir>/kafka: never two
                    _stop_service(old, service, state_dir, notices)
                    new = _start_apache(state_dir, old, notices) if broker == "apache" else _start_tansu(state_dir)
                starting[service] = new.pid
                data["pids"][service] = new.pid
                data["started"][service] = create_time(new.pid)
                data["addresses"][service] = new.bootstrap
                data["logs"][service] = new.log
                description, kafka_ports = new.description, new.ports
            pg_dsn = run_sync(lambda: create_database(pg_admin, DATABASE), timeout=60)
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
            with no_interrupt():  # a signal now is taken once stack.json records what runs
                _write(state_dir, data)
                written = True
        except BaseException:
            if not written:
                with no_interrupt():  # a second SIGTERM must not cut the clean-up short
                    for name, pid in starting.items():
                        # by pid, and whatever else runs on its data dir (a JVM whose start was cut)
                        _stop_service({"pids": {name: pid}} if pid else None, name, state_dir)
            raise
        return {**data, "notices": notices}


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
            services["postgres"].update(pid=stray, note=UNRECORDED)
    running = all(s["running"] for s in services.values())
    _report_stray_kafka(state_dir, data, services)
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


UNRECORDED = "running but not recorded in stack.json"


def _report_stray_kafka(state_dir: Path, data: dict[str, Any], services: dict[str, dict[str, Any]]) -> None:
    """A JVM on ``<state_dir>/kafka`` that stack.json does not record (its `up` was killed before
    writing the file): shown on the kafka service (added when the stack runs Tansu); `stack down`
    stops it, `stack up` stops or takes it over."""
    from .kafka import broker_processes

    if not (state_dir / "kafka").exists():
        return
    pid = (data.get("pids") or {}).get("kafka")
    recorded = pid if pid and alive(pid, (data.get("started") or {}).get("kafka")) else None
    strays = [p.pid for p in broker_processes(state_dir / "kafka") if p.pid != recorded]
    if not strays:
        return
    kafka = services.setdefault("kafka", {"running": False, "pid": None, "address": None,
                                          "log": str(state_dir / "kafka" / "server.log")})
    if kafka.get("pid") and recorded:
        kafka["note"] = f"another JVM on this state dir (pid {', '.join(map(str, strays))}) is {UNRECORDED}"
    else:
        kafka.update(pid=strays[0], note=UNRECORDED if len(strays) == 1
                     else f"{UNRECORDED} (pids {', '.join(map(str, strays))})")
    kafka["unrecorded_pids"] = strays


def wait_gone(pids: list[int], timeout: float = 10.0) -> bool:
    """True once none of ``pids`` runs (for callers that check after ``down``)."""
    deadline = time.monotonic() + timeout
    while any(alive(p) for p in pids):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


__all__ = ["BROKERS", "DATABASE", "StackError", "down", "status", "up", "stack_file", "with_database", "wait_gone"]
