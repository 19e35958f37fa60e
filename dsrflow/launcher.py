"""Run dsrflow's services (coordinator, workers, API) as child processes.

Used by the demo, the end-to-end tests and the benchmark: each service is a real
``dsrflow`` process in its own process group, with its log in a file, stopped with
SIGTERM (SIGKILL after a grace period) so nothing is left running.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg

from .settings import Settings


def service_env(settings: Settings, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment that points a child process at the same broker, database and export store."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DSRFLOW_")}
    env.update(
        DSRFLOW_KAFKA_BOOTSTRAP=settings.bootstrap,
        DSRFLOW_PG_DSN=settings.dsn,
        DSRFLOW_STATE_DIR=str(settings.state_dir.resolve()),
        DSRFLOW_EXPORT_DIR=str(settings.exports.resolve()),
        DSRFLOW_LOG_LEVEL=settings.log_level,
        DSRFLOW_MAX_TASK_ATTEMPTS=str(settings.max_task_attempts),
        DSRFLOW_TASK_TIMEOUT=f"PT{settings.task_timeout.total_seconds():g}S",
        PYTHONUNBUFFERED="1",
    )
    env["DSRFLOW_KAFKA_IDEMPOTENT_PRODUCER"] = str(settings.producer_options()["enable_idempotence"]).lower()
    if settings.api_token is not None:
        env["DSRFLOW_API_TOKEN"] = settings.api_token.get_secret_value()
    # trust (dsrflow.signing): the coordinator signs tasks, workers check them, receipts are checked
    if settings.coordinator_public_keys is not None:  # the private key goes to the coordinator only
        env["DSRFLOW_COORDINATOR_PUBLIC_KEYS"] = str(Path(settings.coordinator_public_keys).resolve())
    if settings.require_signed_receipts:
        env["DSRFLOW_REQUIRE_SIGNED_RECEIPTS"] = "true"
    env.update(extra or {})
    return env


def worker_credential(settings: Settings, system: str) -> Path | None:
    """The credential a system's worker signs its receipts with, where ``dsrflow systems key``
    writes it by default (``<state>/credentials/system-<name>.json``), if it is there."""
    from .signing import system_key_file

    path = system_key_file(settings.state_dir / "credentials", system)
    return path.resolve() if path.exists() else None


#: What a worker is given for the case store: an address where nothing answers. A worker needs no
#: case store (it announces itself on dsr.systems.v1, keeps its task ledger in its own database),
#: and every run of the demo and the end-to-end tests proves it.
NO_CASE_STORE = "postgresql://no-case-store@127.0.0.1:9/none"


def worker_env(settings: Settings, system: str, env: Mapping[str, str]) -> dict[str, str]:
    """A reference worker's environment: its own database (``DSRFLOW_<SYSTEM>_DSN``, on the case
    store's server unless given), its signing key if ``dsrflow systems key`` made one, and no
    case store."""
    own_db = f"DSRFLOW_{system.upper()}_DSN"
    out = {**env, own_db: env.get(own_db) or settings.database_dsn(system), "DSRFLOW_PG_DSN": NO_CASE_STORE}
    credential = worker_credential(settings, system)
    if credential is not None:
        out["DSRFLOW_WORKER_CREDENTIAL"] = str(credential)
    return out


@dataclass
class Services:
    """A set of running service processes."""

    log_dir: Path
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    _specs: dict[str, tuple[Sequence[str], Mapping[str, str], Path | None]] = field(default_factory=dict)

    def start(self, name: str, args: Sequence[str], env: Mapping[str, str], cwd: Path | None = None) -> None:
        self._specs[name] = (args, env, cwd)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - owned by the child
        self.procs[name] = subprocess.Popen(
            [sys.executable, "-m", "dsrflow.cli", *args],
            env=dict(env),
            cwd=cwd,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()

    def kill(self, name: str, sig: signal.Signals = signal.SIGKILL) -> None:
        """Stop one service abruptly (a crash), without the chance to commit or leave its group."""
        p = self.procs[name]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, sig)
        p.wait(15)

    def restart(self, name: str) -> None:
        """Start a killed service again with the same arguments and environment."""
        self.start(name, *self._specs[name])

    def check_alive(self) -> None:
        """Raise if a service exited (with the tail of its log)."""
        for name, p in self.procs.items():
            if p.poll() is not None:
                raise RuntimeError(f"service {name} exited with {p.returncode}:\n{self.log_tail(name)}")

    def log_tail(self, name: str, lines: int = 30) -> str:
        path = self.log_dir / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def stop(self, timeout: float = 15.0) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for p in self.procs.values():
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait(5)
        # children of a service (none expected) go with its group
        for p in self.procs.values():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGKILL)
        self.procs.clear()


@contextlib.contextmanager
def running(settings: Settings, workers: Sequence[str], *, log_dir: Path, cwd: Path | None = None,
            coordinator: bool = True, extra_env: Mapping[str, str] | None = None) -> Iterator[Services]:
    """Start the coordinator and the named workers; stop them all on exit."""
    env = service_env(settings, extra_env)
    services = Services(log_dir)
    try:
        if coordinator:
            signer = ({"DSRFLOW_COORDINATOR_CREDENTIAL": str(Path(settings.coordinator_credential).resolve())}
                      if settings.coordinator_credential is not None else {})
            services.start("coordinator", ["coordinator"], {**env, **signer}, cwd)
        for w in workers:
            services.start(f"worker-{w}", ["worker", w], worker_env(settings, w, env), cwd)
        yield services
    finally:
        services.stop()


async def wait_announced(dsn: str, systems: Sequence[str], services: Services | None = None,
                         timeout: float = 60.0) -> dict[str, str]:
    """Wait until every named system's worker has announced itself and the coordinator recorded it
    (``system_announcements``); returns each system's announced digest (what an administrator
    approves, :func:`dsrflow.demo.approve_systems`)."""
    return await _wait(dsn, "SELECT system AS name, digest FROM system_announcements", systems, services, timeout,
                       "workers not announced")


async def wait_registered(dsn: str, systems: Sequence[str], services: Services | None = None,
                          timeout: float = 60.0) -> None:
    """Wait until every named system is registered (approved) in the case store."""
    await _wait(dsn, "SELECT name, digest FROM systems WHERE active", systems, services, timeout,
                "systems not registered")


async def _wait(dsn: str, query: str, systems: Sequence[str], services: Services | None, timeout: float,
                what: str) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    conn = await asyncpg.connect(dsn)
    try:
        while True:
            have = {r["name"]: r["digest"] for r in await conn.fetch(query)}
            if set(systems) <= set(have):
                return {s: have[s] for s in systems}
            if services is not None:
                services.check_alive()
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what} after {timeout}s: {sorted(set(systems) - set(have))}")
            await asyncio.sleep(0.2)
    finally:
        await conn.close()
