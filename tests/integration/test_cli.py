"""The command line as a person meets it: every command run as a real process, against a real
broker and PostgreSQL, or against a port where nothing listens.

A failure must be one line on stderr starting ``error: `` (services may log before it), a
non-zero exit code, no traceback, no minute of retries, and no password or personal data.
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import orjson
import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient

from dsrflow import codec, topics
from dsrflow.auth import generate_credential
from dsrflow.coordinator import Coordinator, Record
from dsrflow.events import RightsRequested
from dsrflow.exports import MemoryExportStore
from dsrflow.registry import SystemDeclaration, register
from dsrflow.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
PASSWORD = "s3cr3t-pw"  # in every DSN below; must never be printed
EMAIL = "lan.nguyen@example.vn"
CASE_ID = "3f2a5c1e-8d4b-4f6a-9c2e-7b1d0e9f4a21"
#: a log line of a service: "2026-05-01 10:00:00,123 WARNING dsrflow.worker: ..."
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w.]+: ")
ONE_SHOT_S = 15.0  # a one-shot command must answer within this, whatever is down
SERVICE_S = 25.0  # a service with DSRFLOW_STARTUP_TIMEOUT=2


@dataclass
class Run:
    code: int
    stdout: str
    stderr: str
    seconds: float

    @property
    def last(self) -> str:
        lines = self.stderr.strip().splitlines()
        return lines[-1] if lines else ""


def closed_port() -> int:
    """A loopback port where nothing listens (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def dsrflow(*args: str, tmp: Path, env: dict[str, str] | None = None, cwd: Path = ROOT,
            timeout: float = 90) -> Run:
    """Run ``python -m dsrflow.cli ARGS`` with no DSRFLOW_* from this environment but ``env``."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("DSRFLOW_")}
    clean.update(DSRFLOW_STATE_DIR=str(tmp / "state"), PYTHONUNBUFFERED="1")
    clean.update(env or {})
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "dsrflow.cli", *args], env=clean, cwd=cwd, capture_output=True,
                       text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    return Run(p.returncode, p.stdout, p.stderr, time.monotonic() - t0)


def assert_error(run: Run, *mentions: str, code: int = 1, one_line: bool = True, within: float = ONE_SHOT_S,
                 never: tuple[str, ...] = (PASSWORD,)) -> str:
    """The run failed the way a person expects; returns its error line."""
    out = run.stdout + run.stderr
    assert "Traceback" not in out, out
    assert run.code == code, (run.code, out)
    assert run.last.startswith("error: "), out
    lines = run.stderr.strip().splitlines()
    if one_line:
        assert len(lines) == 1, out
    else:
        assert all(LOG_LINE.match(line) for line in lines[:-1]), out
    for m in mentions:
        assert m in run.last, (m, run.last)
    for secret in never:
        assert secret not in out, (secret, out)
    assert run.seconds < within, (run.seconds, out)
    return run.last


def assert_ok(run: Run, *mentions: str) -> None:
    """The run succeeded, saying ``mentions`` on stdout; stderr has informational log lines at most."""
    assert run.code == 0, run
    assert all(m in run.stdout for m in mentions), (mentions, run)
    assert all(LOG_LINE.match(line) and " INFO " in line for line in run.stderr.splitlines()), run


@pytest.fixture
def down() -> dict[str, str]:
    """Settings pointing at a port where neither Kafka nor PostgreSQL answers."""
    port = closed_port()
    return {"DSRFLOW_KAFKA_BOOTSTRAP": f"127.0.0.1:{port}",
            "DSRFLOW_PG_DSN": f"postgresql://dsr:{PASSWORD}@127.0.0.1:{port}/dsrflow",
            "DSRFLOW_STARTUP_TIMEOUT": "2", "DSRFLOW_API_TOKEN": "t0ken", "PORT": str(port)}


# -- no services needed ----------------------------------------------------------
def test_help_works_even_with_broken_settings(tmp_path: Path) -> None:
    broken = {"DSRFLOW_API_PORT": "abc", "DSRFLOW_KAFKA_SECURITY_PROTOCOL": "bogus"}
    for args in (["--help"], ["submit", "--help"], ["cases", "--help"]):
        run = dsrflow(*args, tmp=tmp_path, env=broken)
        assert run.code == 0 and "usage: dsrflow" in run.stdout and run.stderr == "", run


SUBMIT = ["submit", "--right", "access", "--email", EMAIL]


@pytest.mark.parametrize("args", [
    ["cases", "verify", CASE_ID],
    ["cases", "deny", CASE_ID, "--ground", "harms_others", "--reason", "x"],
    ["cases", "open", "--right", "erasure", "--email", EMAIL, "--reason", "retention ran out"],
    ["tasks", "complete", CASE_ID, "--note", "done"],
    ["tasks", "reassign", CASE_ID, "--to-person", "hr", "--reason", "moved"],
])
def test_a_decision_without_a_credential_is_one_line(tmp_path: Path, down: dict[str, str], args: list[str]) -> None:
    # Services "down" as well: without a credential nothing is contacted.
    line = assert_error(dsrflow(*args, tmp=tmp_path, env=down), "no credential", "set DSRFLOW_CREDENTIAL",
                        "--credential", "dsrflow actors add", never=(PASSWORD, EMAIL))
    assert "case store" not in line


def test_a_credential_file_others_may_read_is_refused(tmp_path: Path, down: dict[str, str]) -> None:
    path = generate_credential("dpo").save(tmp_path / "dpo.json")
    path.chmod(0o644)
    for env in ({**down, "DSRFLOW_CREDENTIAL": str(path)}, down):
        extra = [] if "DSRFLOW_CREDENTIAL" in env else ["--credential", str(path)]
        line = assert_error(dsrflow("cases", "verify", CASE_ID, *extra, tmp=tmp_path, env=env),
                            f"credential file {path} may be read by others (mode 0644)", f"chmod 600 {path}")
        assert "PRIVATE KEY" not in line
    missing = tmp_path / "nope.json"
    assert_error(dsrflow("cases", "lift", CASE_ID, "--credential", str(missing), tmp=tmp_path, env=down),
                 f"credential file {missing} does not exist")


def test_actors_add_never_overwrites_a_credential_file(tmp_path: Path, down: dict[str, str]) -> None:
    existing = tmp_path / "state" / "credentials" / "lan.json"
    existing.parent.mkdir(parents=True)
    existing.write_text("keep me")
    for args in (["actors", "add", "lan", "--role", "dpo"], ["actors", "key", "lan", "--out", str(existing)]):
        assert_error(dsrflow(*args, tmp=tmp_path, env=down), f"credential file {existing} exists already",
                     "not overwritten")  # before the case store is asked (it is down)
    assert existing.read_text() == "keep me"


@pytest.mark.parametrize(("variable", "value", "says", "used_by", "not_used_by"), [
    ("DSRFLOW_API_PORT", "abc", "valid integer", [["api"]],
     [["cases", "list"], ["coordinator"], ["worker", "crm"], ["stack", "status"]]),
    ("DSRFLOW_KAFKA_SECURITY_PROTOCOL", "bogus", "'PLAINTEXT', 'SSL', 'SASL_PLAINTEXT' or 'SASL_SSL'",
     [["coordinator"], ["worker", "crm"]], [["cases", "list"], ["api"]]),
    ("DSRFLOW_STARTUP_TIMEOUT", "soon", "timedelta", [["coordinator"], ["worker", "crm"], ["api"]],
     [["cases", "list"], ["topics", "apply"], SUBMIT]),
    ("DSRFLOW_STARTUP_TIMEOUT", "0", "more than 0", [["coordinator"], ["api"]], [["cases", "list"]]),
    ("DSRFLOW_TASK_TIMEOUT", "soon", "timedelta", [["coordinator"]], [["cases", "list"], ["worker", "crm"], ["api"]]),
    ("DSRFLOW_LOG_LEVEL", "loud", "DEBUG, INFO", [["cases", "list"], ["coordinator"], ["stack", "status"]], []),
    ("DSRFLOW_PG_DSN", f"mysql://dsr:{PASSWORD}@db/dsrflow", "postgresql://",
     [["cases", "list"], ["db", "migrate"], ["coordinator"], ["api"]], [SUBMIT, ["stack", "status"]]),
])
def test_invalid_settings_stop_only_the_commands_that_use_them(
    tmp_path: Path, variable: str, value: str, says: str, used_by: list[list[str]], not_used_by: list[list[str]]
) -> None:
    env = {"DSRFLOW_API_TOKEN": "t0ken", "DSRFLOW_API_PORT": str(closed_port()), variable: value}
    for args in used_by:  # one line naming the variable, before anything is contacted
        assert_error(dsrflow(*args, tmp=tmp_path, env=env), f"invalid setting {variable}", says)
    for args in not_used_by:  # no stack, no connection settings: they fail on what they do use
        line = assert_error(dsrflow(*args, tmp=tmp_path, env=env), never=(PASSWORD, EMAIL))
        assert variable not in line and "invalid setting" not in line, (args, line)
        assert "no DSRFLOW_" in line or "no embedded stack" in line, (args, line)


@pytest.mark.parametrize("value", ["abc", "-1", "99999"])
def test_stack_status_and_down_ignore_an_invalid_api_port(tmp_path: Path, value: str) -> None:
    env = {"DSRFLOW_API_PORT": value}
    assert_error(dsrflow("stack", "status", tmp=tmp_path, env=env), "no embedded stack is running")
    run = dsrflow("stack", "status", "--json", tmp=tmp_path, env=env)
    assert orjson.loads(run.stdout)["running"] is False, run
    run = dsrflow("stack", "down", tmp=tmp_path, env=env)
    assert run.code == 0 and run.stdout == "embedded stack was not running\n" and run.stderr == "", run


async def test_cases_list_ignores_invalid_service_settings(tmp_path: Path, case_store: str) -> None:
    env = {"DSRFLOW_PG_DSN": case_store, "DSRFLOW_TASK_TIMEOUT": "soon", "DSRFLOW_STARTUP_TIMEOUT": "0",
           "DSRFLOW_API_PORT": "abc", "DSRFLOW_KAFKA_SECURITY_PROTOCOL": "bogus"}
    run = await asyncio.to_thread(dsrflow, "cases", "list", "--json", tmp=tmp_path, env=env)
    assert run.code == 0 and orjson.loads(run.stdout) == [] and run.stderr == "", run


@pytest.mark.parametrize("dsn", [
    f"postgresql://dsr:{PASSWORD}@db.internal:abc/dsrflow",
    f"postgresql://dsr:{PASSWORD}@db.internal:99999/dsrflow",
    f"postgresql://dsr:{PASSWORD}@db.internal:0/dsrflow",
    f"postgresql://dsr:{PASSWORD}@h1:5432,h2:x/dsrflow",
    f"postgresql://dsr:{PASSWORD}@db.internal/dsrflow?port=70000",
    f"postgresql://dsr:{PASSWORD}@[::1/dsrflow",
    f"postgresql://dsr:{PASSWORD}/dsrflow",  # no "@host": the password parses as a port
])
def test_a_malformed_dsn_names_the_variable_and_never_the_password(tmp_path: Path, dsn: str) -> None:
    for args in (["cases", "list"], ["db", "migrate"], ["api"]):
        line = assert_error(dsrflow(*args, tmp=tmp_path, env={"DSRFLOW_PG_DSN": dsn, "DSRFLOW_API_TOKEN": "t0ken"}),
                            "invalid setting DSRFLOW_PG_DSN", never=(PASSWORD, "dsr:"))
        assert "unexpected" not in line and "db.internal" not in line


def test_stack_status_without_a_stack(tmp_path: Path) -> None:
    state = str((tmp_path / "state").resolve())
    assert_error(dsrflow("stack", "status", tmp=tmp_path), "no embedded stack", state, "dsrflow stack up")
    run = dsrflow("stack", "status", "--json", tmp=tmp_path)
    assert_error(run, "no embedded stack")
    status = orjson.loads(run.stdout)
    assert status["running"] is False and status["state_dir"] == state


def test_no_connection_setting_and_no_stack_names_the_setting_each_command_needs(tmp_path: Path) -> None:
    for args, variable in [
        (["topics", "apply"], "DSRFLOW_KAFKA_BOOTSTRAP"),
        (["submit", "--right", "access", "--email", EMAIL], "DSRFLOW_KAFKA_BOOTSTRAP"),
        (["db", "migrate"], "DSRFLOW_PG_DSN"),
        (["cases", "list"], "DSRFLOW_PG_DSN"),
        (["cases", "show", CASE_ID], "DSRFLOW_PG_DSN"),
    ]:
        line = assert_error(dsrflow(*args, tmp=tmp_path), f"no {variable} set", "dsrflow stack up",
                            never=(EMAIL,))
        assert "/" not in line.split(" set ")[0], line  # only the one it needs


@pytest.mark.parametrize(("args", "mentions"), [
    ([], ["required: COMMAND"]),
    (["nonsense"], ["invalid choice: 'nonsense'"]),
    (["submit", "--right", "access"], ["--email, --phone, --customer-id"]),
    (["submit", "--right", "sideways", "--email", EMAIL], ["argument --right"]),
    (["submit", "--right", "rectification", "--email", EMAIL, "--change", "address"], ["--change needs field=value"]),
    (["submit", "--right", "rectification", "--email", EMAIL], ["needs 'changes'"]),
    (["submit", "--right", "access", "--email", EMAIL, "--jurisdiction", "XX"], ["unknown jurisdiction 'XX'", "VN"]),
    (["submit", "--right", "access", "--email", "lan.nguyen-at-example.vn"],
     ["email identifier is not an email address"]),
    (["submit", "--right", "access", "--phone", "+84 12"], ["phone identifier is not a possible phone number"]),
    (["submit", "--right", "access", "--email", EMAIL, "--request-id", "has space"], ["--request-id"]),
    (["cases", "show"], ["needs a case id"]),
    (["cases", "show", EMAIL], ["not a UUID"]),
    (["cases", "verify", CASE_ID, "--by", "dpo"], ["unrecognized arguments: --by dpo"]),  # the credential says who
    (["tasks", "complete", CASE_ID, "--by", "ops"], ["unrecognized arguments: --by ops"]),
    (["tasks", "reassign", CASE_ID, "--reason", "moved"], ["one of --to-system NAME and --to-person NAME"]),
    (["tasks", "reassign", CASE_ID, "--to-person", "hr"], ["needs --reason"]),
    (["cases", "deny", CASE_ID, "--ground", "Not A Ground", "--reason", "x"], ["invalid deny command", "ground"]),
    (["actors", "add", "lan"], ["actors add needs --role"]),
    (["actors", "add", "bad name", "--role", "dpo"], ["an actor name is"]),
    (["actors", "add", "lan", "--role", "dpo", "--controller", "Acme Inc"], ["--controller"]),
    (["actors", "add", "lan", "--role", "king"], ["argument --role", "invalid choice: 'king'"]),
    (["actors", "revoke", "k_nope"], ["a key id is k_"]),
    (["cases", "list", "--limit", "0"], ["--limit", "at least 1"]),
    (["cases", "list", "--limit", "-5"], ["--limit", "at least 1"]),
    (["cases", "list", "--limit", "many"], ["--limit", "not a whole number"]),
    (["topics", "apply", "--system", "Bad Name"], ["--system 'Bad Name' is not valid"]),
    (["worker", "nosuch"], ["no worker for system 'nosuch'", "--app"]),
    (["worker", "Bad/Name"], ["worker name 'Bad/Name' is not valid"]),
    (["worker", "crm", "--app", "no_such_module.worker:worker"], ["no module named 'no_such_module'"]),
    (["worker", "crm", "--app", "json:nope"], ["module json has no attribute 'nope'"]),
    (["worker", "crm", "--app", "json:dumps"], ["not a dsrflow Worker"]),
    (["worker", "billing", "--app", "examples.crm.worker:worker"], ["worker of system 'crm', not 'billing'"]),
    (["demo", "--broker", "sideways"], ["argument --broker", "invalid choice: 'sideways'"]),
])
def test_bad_input_is_one_line_and_exit_code_2(tmp_path: Path, down: dict[str, str], args: list[str],
                                                mentions: list[str]) -> None:
    # Services "down" as well: bad input is reported before anything is contacted.
    run = dsrflow(*args, tmp=tmp_path, env=down)
    assert_error(run, *mentions, code=2, never=(PASSWORD, EMAIL, "lan.nguyen-at-example.vn", "+84 12"))


def test_api_without_a_token_or_a_free_port(tmp_path: Path, down: dict[str, str]) -> None:
    no_token = {k: v for k, v in down.items() if k != "DSRFLOW_API_TOKEN"}
    assert_error(dsrflow("api", tmp=tmp_path, env=no_token), "DSRFLOW_API_TOKEN")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        run = dsrflow("api", tmp=tmp_path, env={**down, "DSRFLOW_API_PORT": str(port)})
    assert_error(run, f"cannot listen on 127.0.0.1:{port}", "in use")


# -- an embedded stack that cannot start ------------------------------------------------
_FAKE_JAVA = """#!/bin/sh
case " $* " in
  *" -version "*) echo 'openjdk version "21.0.2" 2024-01-16' >&2; exit 0;;
  *kafka.tools.StorageTool*) exit 0;;
esac
i=1; while [ $i -le 40 ]; do echo "fake broker log line $i"; i=$((i + 1)); done
echo "ERROR fake broker: cannot start"
exit 1
"""
_FAKE_MVN = """#!/bin/sh
for a in "$@"; do case "$a" in -Dmdep.outputFile=*) printf '%s' "$0" > "${a#-Dmdep.outputFile=}";; esac; done
"""


def _fake_jdk(tmp: Path, *, maven: bool) -> dict[str, str]:
    """Settings under which Apache Kafka cannot start, found out in a second: a Java 21 whose
    broker exits at once, printing a long log, and, with ``maven``, a Maven that "resolves" the
    jars (without it, PATH holds only the fake java: no Maven at all)."""
    home = tmp / "fake-jdk"
    (home / "bin").mkdir(parents=True)
    for name, body in (("java", _FAKE_JAVA), ("mvn", _FAKE_MVN if maven else None)):
        if body is not None:
            (home / "bin" / name).write_text(body)
            (home / "bin" / name).chmod(0o755)
    path = str(home / "bin") + (os.pathsep + os.environ.get("PATH", "") if maven else "")
    return {"PATH": path, "JAVA_HOME": str(home), "DSRFLOW_CACHE_DIR": str(tmp / "cache"), "DSRFLOW_KAFKA_CDS": "0"}


def _state_of(command: list[str], tmp: Path) -> Path:
    return (tmp / "state" / ("demo" if command == ["demo"] else "")).resolve()


@pytest.mark.parametrize("command", [["stack", "up"], ["demo"]])
def test_a_broker_that_exits_at_start_is_one_line_naming_its_log(tmp_path: Path, command: list[str]) -> None:
    run = dsrflow(*command, tmp=tmp_path, env=_fake_jdk(tmp_path, maven=True))
    state = _state_of(command, tmp_path)
    line = assert_error(run, "error: the embedded stack did not start: Apache Kafka",
                        "the process exited during start-up", f"(log: {state / 'kafka' / 'server.log'})", within=60)
    assert "unexpected" not in line and "fake broker" not in line and "log tail" not in line
    assert "fake broker log line 40" in (state / "kafka" / "server.log").read_text()
    status = dsrflow("stack", "status", "--json", tmp=tmp_path, env={"DSRFLOW_STATE_DIR": str(state)})
    assert not any(s["running"] for s in orjson.loads(status.stdout)["services"].values()), status  # none left


@pytest.mark.parametrize(("command", "advice"), [(["stack", "up"], "`dsrflow stack up --broker tansu`"),
                                                 (["demo"], "`dsrflow demo --broker tansu`")])
def test_a_stack_that_cannot_start_advises_what_this_command_can_do(tmp_path: Path, command: list[str],
                                                                   advice: str) -> None:
    run = dsrflow(*command, tmp=tmp_path, env=_fake_jdk(tmp_path, maven=False))
    line = assert_error(run, "error: the embedded stack did not start: ", "no `mvn` on PATH", advice, within=60)
    assert "unexpected" not in line and "StackError" not in line
    assert line.count("--broker tansu") == 1


# -- a broker or case store that does not answer -----------------------------------
@pytest.mark.parametrize(("args", "service"), [
    (["db", "migrate"], "pg"),
    (["topics", "apply"], "pg"),  # a case store is configured: its registered systems are wanted
    (["submit", "--right", "access", "--email", EMAIL, "--verified"], "kafka"),
    (["cases", "list"], "pg"),
    (["cases", "list", "--json"], "pg"),
    (["cases", "show", CASE_ID], "pg"),
    (["cases", "verify", CASE_ID, "--credential", "{credential}"], "pg"),
    (["tasks", "retry", CASE_ID, "--credential", "{credential}"], "pg"),
    (["actors", "list"], "pg"),
    (["actors", "add", "lan", "--role", "dpo"], "pg"),
])
def test_one_shot_commands_with_a_service_down(tmp_path: Path, down: dict[str, str], args: list[str],
                                               service: str) -> None:
    port = down["PORT"]
    credential = str(generate_credential("dpo").save(tmp_path / "dpo.json"))
    run = dsrflow(*[credential if a == "{credential}" else a for a in args], tmp=tmp_path, env=down)
    if service == "pg":
        assert_error(run, f"case store unreachable at 127.0.0.1:{port}/dsrflow", "connection refused",
                     never=(PASSWORD, "dsr:", EMAIL))
    else:
        assert_error(run, f"no Kafka broker answers at 127.0.0.1:{port}", never=(PASSWORD, EMAIL))
    assert run.stdout == ""
    assert not (tmp_path / "state" / "credentials" / "lan.json").exists()  # no credential for an actor not added


def test_debug_log_level_adds_the_traceback(tmp_path: Path, down: dict[str, str]) -> None:
    run = dsrflow("cases", "list", tmp=tmp_path, env={**down, "DSRFLOW_LOG_LEVEL": "DEBUG"})
    assert run.code == 1 and "Traceback" in run.stderr, run
    assert run.last.startswith(f"error: case store unreachable at 127.0.0.1:{down['PORT']}/dsrflow"), run


def test_topics_apply_without_a_case_store_needs_only_kafka(tmp_path: Path, down: dict[str, str]) -> None:
    kafka_only = {"DSRFLOW_KAFKA_BOOTSTRAP": down["DSRFLOW_KAFKA_BOOTSTRAP"]}
    assert_error(dsrflow("topics", "apply", tmp=tmp_path, env=kafka_only),
                 f"no Kafka broker answers at 127.0.0.1:{down['PORT']}")


def test_topics_apply_says_how_long_a_silent_host_was_waited_for(tmp_path: Path) -> None:
    with socket.socket() as silent:  # connections complete in the backlog; nothing ever answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        port = silent.getsockname()[1]
        run = dsrflow("topics", "apply", tmp=tmp_path, env={"DSRFLOW_KAFKA_BOOTSTRAP": f"127.0.0.1:{port}"})
    line = assert_error(run, f"no Kafka broker answers at 127.0.0.1:{port} (no answer in ")
    said = float(re.search(r"no answer in ([\d.]+)s", line).group(1))  # type: ignore[union-attr]
    assert abs(said - run.seconds) < 2.5, (said, run.seconds)


# -- a stack.json of an embedded stack that is not there ------------------------------
def _write_stack_file(state: Path, *, pid: int, kafka_port: int, pg_port: int) -> None:
    """stack.json as `dsrflow stack up` writes it, for processes that are not (all) there."""
    state.mkdir(parents=True, exist_ok=True)
    (state / "stack.json").write_bytes(orjson.dumps({
        "state_dir": str(state.resolve()), "broker_kind": "apache", "broker": "Apache Kafka (test)",
        "pids": {"postgres": pid, "kafka": pid}, "started": {},
        "addresses": {"postgres": f"127.0.0.1:{pg_port}", "kafka": f"127.0.0.1:{kafka_port}"},
        "kafka_bootstrap": f"127.0.0.1:{kafka_port}", "idempotent_producer": True,
        "pg_dsn": f"postgresql://postgres:{PASSWORD}@127.0.0.1:{pg_port}/dsrflow",
    }))


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_a_stale_stack_file_is_no_embedded_stack(tmp_path: Path, broker: str, broker_kind: str) -> None:
    state = (tmp_path / "state").resolve()
    _write_stack_file(state, pid=_dead_pid(), kafka_port=1, pg_port=1)
    kafka = {"DSRFLOW_KAFKA_BOOTSTRAP": broker,
             "DSRFLOW_KAFKA_IDEMPOTENT_PRODUCER": "false" if broker_kind == "tansu" else "true"}
    # No case store configured: the dead stack's PostgreSQL is not one.
    run = dsrflow("topics", "apply", tmp=tmp_path, env=kafka)
    assert run.code == 0 and run.stderr == "" and topics.REQUESTS in run.stdout, run
    for args, variable in [(["cases", "list"], "DSRFLOW_PG_DSN"), (["db", "migrate"], "DSRFLOW_PG_DSN"),
                           (SUBMIT, "DSRFLOW_KAFKA_BOOTSTRAP")]:
        line = assert_error(dsrflow(*args, tmp=tmp_path), f"no {variable} set",
                            f"the embedded stack in {state} is not running", "dsrflow stack up",
                            never=(PASSWORD, EMAIL))
        assert "127.0.0.1:1" not in line


def test_an_unreachable_embedded_stack_is_named_as_the_source(tmp_path: Path) -> None:
    state = (tmp_path / "state").resolve()
    port = closed_port()
    _write_stack_file(state, pid=os.getpid(), kafka_port=port, pg_port=port)  # "running", but nothing listens
    assert_error(dsrflow("cases", "list", tmp=tmp_path),
                 f"case store unreachable at 127.0.0.1:{port}/dsrflow (connection refused; "
                 f"from the embedded stack in {state})")
    assert_error(dsrflow(*SUBMIT, tmp=tmp_path),
                 f"no Kafka broker answers at 127.0.0.1:{port} (from the embedded stack in {state})", never=(EMAIL,))


@pytest.mark.parametrize("args", [["coordinator"], ["worker", "crm"]])
def test_services_wait_one_startup_timeout_with_broker_and_database_down(tmp_path: Path, down: dict[str, str],
                                                                        args: list[str]) -> None:
    timeout = float(down["DSRFLOW_STARTUP_TIMEOUT"])
    run = dsrflow(*args, tmp=tmp_path, env=down)
    assert_error(run, "waited 2s (DSRFLOW_STARTUP_TIMEOUT)", one_line=False, within=SERVICE_S)
    assert timeout <= run.seconds < timeout + 2, run.seconds


async def _forward_later(port: int, target: str, delay: float) -> asyncio.Server:
    """After ``delay`` seconds, forward connections to 127.0.0.1:``port`` to ``target``: a broker
    that comes up while a service waits for it."""
    await asyncio.sleep(delay)
    host, _, target_port = target.rpartition(":")

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(host, int(target_port))
        except OSError:
            writer.close()
            return
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    return await asyncio.start_server(handle, "127.0.0.1", port)


async def test_a_late_broker_leaves_the_case_store_only_the_rest_of_the_startup_timeout(
    tmp_path: Path, down: dict[str, str], broker: str, broker_kind: str
) -> None:
    args = ["coordinator"]  # a worker needs no case store (test_services_give_up_on_the_case_store...)
    timeout = 3.0
    port = closed_port()
    env = {**down, "DSRFLOW_KAFKA_BOOTSTRAP": f"127.0.0.1:{port}", "DSRFLOW_STARTUP_TIMEOUT": f"{timeout:g}",
           "DSRFLOW_KAFKA_IDEMPOTENT_PRODUCER": "false" if broker_kind == "tansu" else "true"}
    forwarder = asyncio.ensure_future(_forward_later(port, broker, 1.0))
    try:
        run = await asyncio.to_thread(dsrflow, *args, tmp=tmp_path, env=env)
    finally:
        (await forwarder).close()
    assert_error(run, f"case store unreachable at 127.0.0.1:{down['PORT']}/dsrflow", f"waited {timeout:g}s",
                 one_line=False, within=SERVICE_S)
    assert "broker unreachable" in run.stderr  # it did wait for the broker first
    # One deadline for the start: not a broker's wait and then a whole timeout more.
    assert run.seconds < timeout + 1.25, run.seconds


@pytest.mark.parametrize("args", [["coordinator"], ["worker", "crm"]])
def test_services_give_up_on_a_broker_after_the_startup_timeout(tmp_path: Path, down: dict[str, str],
                                                                args: list[str]) -> None:
    run = dsrflow(*args, tmp=tmp_path, env=down)
    assert_error(run, f"no Kafka broker answers at 127.0.0.1:{down['PORT']}", "waited 2s", "DSRFLOW_STARTUP_TIMEOUT",
                 one_line=False, within=SERVICE_S)
    assert "WARNING" in run.stderr and "retrying" in run.stderr  # it did wait, saying so
    assert run.seconds >= 2


def test_api_gives_up_on_the_case_store_after_the_startup_timeout(tmp_path: Path, down: dict[str, str]) -> None:
    run = dsrflow("api", tmp=tmp_path, env={**down, "DSRFLOW_API_PORT": str(closed_port())})
    assert_error(run, f"case store unreachable at 127.0.0.1:{down['PORT']}/dsrflow", "waited 2s", one_line=False,
                 within=SERVICE_S)
    assert run.seconds >= 2


@pytest.mark.parametrize("args", [["coordinator"], ["worker", "crm"]])
def test_services_give_up_on_the_case_store_after_the_startup_timeout(
    tmp_path: Path, down: dict[str, str], broker: str, args: list[str]
) -> None:
    run = dsrflow(*args, tmp=tmp_path, env={**down, "DSRFLOW_KAFKA_BOOTSTRAP": broker})
    if args[0] == "worker":  # a worker needs no case store: what it waits for is its system's own database
        assert "announced declaration" in run.stderr, run.stderr  # it made itself known first
        assert_error(run, f"the crm database is unreachable at 127.0.0.1:{down['PORT']}/crm", "waited 2s",
                     one_line=False, within=SERVICE_S)
        return
    assert_error(run, f"case store unreachable at 127.0.0.1:{down['PORT']}/dsrflow", "waited 2s", one_line=False,
                 within=SERVICE_S)


def test_a_database_that_does_not_exist(tmp_path: Path, pg_server: str) -> None:
    dsn = pg_server.rsplit("/", 1)[0] + "/no_such_db"
    run = dsrflow("cases", "list", tmp=tmp_path, env={"DSRFLOW_PG_DSN": dsn})
    assert_error(run, "refused the connection", "no_such_db")


async def test_cases_on_a_database_without_migrations(
    tmp_path: Path, make_database: Callable[..., Awaitable[str]]
) -> None:
    dsn = await make_database("bare")
    run = await asyncio.to_thread(dsrflow, "cases", "list", tmp=tmp_path, env={"DSRFLOW_PG_DSN": dsn})
    assert_error(run, "no dsrflow tables", "dsrflow db migrate")
    run = await asyncio.to_thread(dsrflow, "db", "migrate", tmp=tmp_path, env={"DSRFLOW_PG_DSN": dsn})
    assert run.code == 0 and "migration(s) applied" in run.stdout, run
    run = await asyncio.to_thread(dsrflow, "cases", "list", "--json", tmp=tmp_path, env={"DSRFLOW_PG_DSN": dsn})
    assert run.code == 0 and orjson.loads(run.stdout) == [], run


# -- the real broker -----------------------------------------------------------------
async def _topic_names(bootstrap: str) -> set[str]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        return set(await admin.list_topics())
    finally:
        await admin.close()


@pytest.fixture
async def requests_topic_absent(broker_kind: str) -> AsyncIterator[str]:
    """A broker of its own, without dsr.requests.v1 (the session's broker is shared: deleting a
    topic there would pull it from under other tests)."""
    if broker_kind != "apache":
        pytest.skip("starts a second Apache Kafka")
    from dsrflow.stack.kafka import ApacheKafka

    kafka = ApacheKafka()
    await asyncio.to_thread(kafka.start)
    try:
        yield kafka.bootstrap
    finally:
        await asyncio.to_thread(kafka.stop)


async def _keys_on_requests(bootstrap: str, wanted: str) -> list[bytes]:
    consumer = AIOKafkaConsumer(topics.REQUESTS, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                                group_id=None, enable_auto_commit=False)
    await consumer.start()
    try:
        deadline = time.monotonic() + 20
        keys: list[bytes] = []
        while time.monotonic() < deadline and wanted.encode() not in keys:
            batch = await consumer.getmany(timeout_ms=500)
            keys += [r.key for records in batch.values() for r in records if r.key is not None]
        return keys
    finally:
        await consumer.stop()


async def test_submit_to_a_missing_topic_then_topics_apply_without_a_database(
    tmp_path: Path, requests_topic_absent: str, broker_kind: str
) -> None:
    bootstrap = requests_topic_absent
    env = {"DSRFLOW_KAFKA_BOOTSTRAP": bootstrap,
           "DSRFLOW_KAFKA_IDEMPOTENT_PRODUCER": "false" if broker_kind == "tansu" else "true"}
    request_id = f"cli-test-{uuid.uuid4().hex[:12]}"
    submit = ["submit", "--right", "access", "--email", EMAIL, "--verified", "--request-id", request_id]

    run = await asyncio.to_thread(dsrflow, *submit, tmp=tmp_path, env=env)
    assert_error(run, f"topic {topics.REQUESTS} does not exist on {bootstrap}", "dsrflow topics apply",
                 never=(EMAIL,))

    applied = await asyncio.to_thread(dsrflow, "topics", "apply", "--system", "clitest", tmp=tmp_path, env=env)
    assert applied.code == 0, applied
    assert f"created   {topics.REQUESTS}" in applied.stdout
    assert topics.tasks_topic("clitest") in applied.stdout
    assert {topics.REQUESTS, topics.tasks_topic("clitest")} <= await _topic_names(bootstrap)

    run = await asyncio.to_thread(dsrflow, *submit, tmp=tmp_path, env=env)
    assert run.code == 0 and f"submitted access request {request_id}" in run.stdout, run
    assert request_id.encode() in await _keys_on_requests(bootstrap, request_id)


# -- cases on a real case store ---------------------------------------------------------
async def enroll(name: str, role: str, *, tmp: Path, env: dict[str, str], controller: str | None = None) -> str:
    """`dsrflow actors add NAME --role ROLE`: the path of the credential file it wrote."""
    extra = ["--controller", controller] if controller else []
    run = await asyncio.to_thread(dsrflow, "actors", "add", name, "--role", role, *extra, tmp=tmp, env=env)
    assert run.code == 0 and run.stderr == "", run
    exports = [line for line in run.stdout.splitlines() if line.startswith("export DSRFLOW_CREDENTIAL=")]
    assert len(exports) == 1, run.stdout
    path = exports[0].removeprefix("export DSRFLOW_CREDENTIAL=")
    assert Path(path) == (tmp / "state" / "credentials" / f"{name}.json").resolve() and path in run.stdout
    assert Path(path).stat().st_mode & 0o777 == 0o600
    assert "PRIVATE KEY" not in run.stdout
    return path


async def timeline_by(case_id: str, *, tmp: Path, env: dict[str, str]) -> list[tuple[str, str]]:
    """(kind, by) of each timeline entry of the case that records who decided."""
    shown = await asyncio.to_thread(dsrflow, "cases", "show", case_id, "--json", tmp=tmp, env=env)
    assert shown.code == 0, shown
    doc = orjson.loads(shown.stdout)
    assert doc["timeline_verified"] is True
    return [(e["kind"], e["detail"]["by"]) for e in doc["timeline"] if "by" in e["detail"]]


@pytest.fixture
async def cases(case_store: str, tmp_path: Path) -> AsyncIterator[dict[str, uuid.UUID]]:
    """Two cases opened by the real coordinator service: one in progress, one awaiting verification."""
    pool = await asyncpg.create_pool(case_store, min_size=1, max_size=2)
    try:
        async with pool.acquire() as conn:
            await register(conn, SystemDeclaration(name="crm", identifier_types=("email",),
                                                   actions=("export", "erase")))
        settings = Settings(pg_dsn=case_store, kafka_bootstrap="unused:9092", state_dir=tmp_path)
        coordinator = Coordinator(settings, pool, export_store=MemoryExportStore())
        out = {}
        for n, (label, verified) in enumerate([("open", True), ("awaiting", False)]):
            req = RightsRequested.model_validate({
                "request_id": f"cli-{label}-{uuid.uuid4().hex[:8]}", "right": "erasure", "verified": verified,
                "subject": {"identifiers": {"email": EMAIL}}})
            value, headers = codec.encode(req, source="test")
            await coordinator.handle_requests([Record(topics.REQUESTS, 0, n, req.request_id.encode(), value,
                                                      headers)])
            out[label] = await pool.fetchval("SELECT case_id FROM cases WHERE request_id = $1", req.request_id)
        yield out
    finally:
        await pool.close()


async def test_cases_show_prints_hashes_as_hex(tmp_path: Path, case_store: str, cases: dict[str, uuid.UUID]) -> None:
    case_id = cases["open"]
    env = {"DSRFLOW_PG_DSN": case_store}
    conn = await asyncpg.connect(case_store)
    try:
        rows = await conn.fetch("SELECT kind, hash, prev_hash FROM case_timeline WHERE case_id = $1 ORDER BY position",
                                case_id)
    finally:
        await conn.close()
    assert rows

    run = await asyncio.to_thread(dsrflow, "cases", "show", str(case_id), tmp=tmp_path, env=env)
    assert run.code == 0 and run.stderr == "", run
    assert not re.search(r"(?<!\w)b['\"]", run.stdout) and "\\x" not in run.stdout  # no b'\x..' reprs
    assert f"case       {case_id}" in run.stdout and "status     in_progress" in run.stdout
    assert "hash chain verified" in run.stdout
    for r in rows:
        assert bytes(r["hash"]).hex() in run.stdout
    assert "crm" in run.stdout  # its task

    run = await asyncio.to_thread(dsrflow, "cases", "show", str(case_id), "--json", tmp=tmp_path, env=env)
    assert run.code == 0, run
    doc = orjson.loads(run.stdout)
    assert doc["summary"]["case_id"] == str(case_id) and doc["timeline_verified"] is True
    assert [(e["kind"], e["hash"], e["prev_hash"]) for e in doc["timeline"]] == [
        (r["kind"], bytes(r["hash"]).hex(), bytes(r["prev_hash"]).hex()) for r in rows]
    assert [t["system"] for t in doc["tasks"]] == ["crm"]

    missing = str(uuid.uuid4())
    assert_error(await asyncio.to_thread(dsrflow, "cases", "show", missing, tmp=tmp_path, env=env),
                 f"no case {missing}")


async def test_cases_list_json_and_verify(tmp_path: Path, case_store: str, cases: dict[str, uuid.UUID]) -> None:
    env = {"DSRFLOW_PG_DSN": case_store}
    run = await asyncio.to_thread(dsrflow, "cases", "list", "--json", tmp=tmp_path, env=env)
    assert run.code == 0, run
    listed = orjson.loads(run.stdout)
    assert isinstance(listed, list) and {c["case_id"] for c in listed} == {str(c) for c in cases.values()}
    assert {c["status"] for c in listed} == {"in_progress", "awaiting_verification"}

    run = await asyncio.to_thread(dsrflow, "cases", "list", "--limit", "1", tmp=tmp_path, env=env)
    assert run.code == 0 and len(run.stdout.strip().splitlines()) == 1, run

    awaiting = str(cases["awaiting"])
    credential = await enroll("dpo@example.vn", "dpo", tmp=tmp_path, env=env)
    run = await asyncio.to_thread(dsrflow, "cases", "verify", awaiting, "--credential", credential, tmp=tmp_path,
                                  env=env)
    assert_ok(run, f"case {awaiting} verified: in_progress")
    signed = {**env, "DSRFLOW_CREDENTIAL": credential}
    again = await asyncio.to_thread(dsrflow, "cases", "verify", awaiting, "--json", tmp=tmp_path, env=signed)
    assert_error(again, "verified already")
    assert await timeline_by(awaiting, tmp=tmp_path, env=env) == [("verified", "dpo@example.vn")]
    ghost = str(uuid.uuid4())
    assert_error(await asyncio.to_thread(dsrflow, "cases", "verify", ghost, tmp=tmp_path, env=signed),
                 f"no case {ghost}")


async def test_api_starts_on_a_reachable_case_store_and_stops_cleanly(tmp_path: Path, case_store: str) -> None:
    import signal

    import httpx

    port = closed_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DSRFLOW_")}
    env.update(DSRFLOW_STATE_DIR=str(tmp_path / "state"), DSRFLOW_PG_DSN=case_store, DSRFLOW_API_TOKEN="t0ken",
               DSRFLOW_API_PORT=str(port), DSRFLOW_STARTUP_TIMEOUT="5")
    proc = subprocess.Popen([sys.executable, "-m", "dsrflow.cli", "api"], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        async with httpx.AsyncClient() as http:
            while True:
                assert proc.poll() is None, proc.communicate()
                try:
                    r = await http.get(f"http://127.0.0.1:{port}/healthz")
                    if r.status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, "the API did not answer"
                await asyncio.sleep(0.2)
            r = await http.get(f"http://127.0.0.1:{port}/v1/cases", headers={"Authorization": "Bearer t0ken"})
            assert r.status_code == 200 and r.json()["items"] == []
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = await asyncio.to_thread(proc.communicate, timeout=30)
    # uvicorn shuts down gracefully, then re-raises the SIGTERM it caught
    assert proc.returncode in (0, -signal.SIGTERM), err
    assert "Application shutdown complete" in err
    assert "Traceback" not in out + err and "error:" not in err


async def test_client_checks_fail_fast_with_dsrflow_errors(tmp_path: Path, broker: str, case_store: str) -> None:
    from dsrflow import client
    from dsrflow.errors import BrokerUnavailable, CaseStoreUnavailable, TopicMissing

    port = closed_port()
    up = Settings(state_dir=tmp_path, kafka_bootstrap=broker, pg_dsn=case_store)
    await topics.apply(up.kafka_client_options(), topics.specs_for([]))
    await client.check_broker(up, [topics.RECEIPTS])
    with pytest.raises(TopicMissing, match="topic dsr.nope.v1 does not exist"):
        await client.check_broker(up, ["dsr.nope.v1"])
    await (await client.connect_case_store(up)).close()

    gone = Settings(state_dir=tmp_path, kafka_bootstrap=f"127.0.0.1:{port}",
                    pg_dsn=f"postgresql://dsr:{PASSWORD}@127.0.0.1:{port}/dsrflow")
    t0 = time.monotonic()
    with pytest.raises(BrokerUnavailable, match=f"127.0.0.1:{port}"):
        await client.check_broker(gone, timeout=2)
    with pytest.raises(CaseStoreUnavailable) as info:
        await client.connect_case_store(gone, timeout=2)
    assert PASSWORD not in str(info.value)
    with pytest.raises(BrokerUnavailable):
        await client.submit(gone, [RightsRequested.model_validate(
            {"request_id": "never-sent", "right": "access", "subject": {"identifiers": {"email": EMAIL}}})], timeout=2)
    assert time.monotonic() - t0 < 15


async def test_a_system_with_no_worker_is_declared_from_a_file_and_gets_manual_tasks(
    tmp_path: Path, case_store: str
) -> None:
    env = {"DSRFLOW_PG_DSN": case_store}
    spec = tmp_path / "payroll.toml"
    spec.write_text('name = "payroll"\nidentifier_types = ["email"]\nworker = false\n'
                    'purposes = ["essential.service.payment_processing"]\nprocessors = ["Example Payroll JSC"]\n'
                    'operated_by = "processor"\nstorage_country = "VN"\n')
    run = await asyncio.to_thread(dsrflow, "systems", "declare", str(spec), tmp=tmp_path, env=env)
    assert run.code == 0 and "declared system payroll" in run.stdout, run
    listed = await asyncio.to_thread(dsrflow, "systems", "list", "--json", tmp=tmp_path, env=env)
    [payroll] = [s for s in orjson.loads(listed.stdout) if s["name"] == "payroll"]
    assert payroll["worker"] is False and payroll["operated_by"] == "processor"
    human = await asyncio.to_thread(dsrflow, "systems", "list", tmp=tmp_path, env=env)
    assert "payroll" in human.stdout and "no worker: every task is manual" in human.stdout

    pool = await asyncpg.create_pool(case_store, min_size=1, max_size=1)
    try:
        settings = Settings(pg_dsn=case_store, kafka_bootstrap="unused:9092", state_dir=tmp_path)
        req = RightsRequested.model_validate({"request_id": f"cli-payroll-{uuid.uuid4().hex[:8]}", "right": "erasure",
                                              "verified": True, "subject": {"identifiers": {"email": EMAIL}}})
        value, headers = codec.encode(req, source="test")
        await Coordinator(settings, pool, export_store=MemoryExportStore()).handle_requests(
            [Record(topics.REQUESTS, 0, 0, req.request_id.encode(), value, headers)])
    finally:
        await pool.close()
    tasks = await asyncio.to_thread(dsrflow, "tasks", "list", "--json", tmp=tmp_path, env=env)
    [task] = [t for t in orjson.loads(tasks.stdout) if t["system"] == "payroll"]
    assert task["kind"] == "manual" and "no dsrflow worker" in task["reason"]
    hr = await enroll("hr@example.vn", "operator", tmp=tmp_path, env=env)
    done = await asyncio.to_thread(dsrflow, "tasks", "complete", task["task_id"], "--credential", hr,
                                   "--note", "deleted from the payroll export", tmp=tmp_path, env=env)
    assert_ok(done, "succeeded; case completed")
    assert ("manual_completed", "hr@example.vn") in await timeline_by(task["case_id"], tmp=tmp_path, env=env)

    bad = tmp_path / "bad.json"
    bad.write_text('{"name": "Bad Name", "identifier_types": []}')
    run = await asyncio.to_thread(dsrflow, "systems", "declare", str(bad), tmp=tmp_path, env=env)
    assert_error(run, "bad.json", code=2)
    missing = await asyncio.to_thread(dsrflow, "systems", "declare", str(tmp_path / "nope.toml"), tmp=tmp_path,
                                      env=env)
    assert_error(missing, "cannot read", code=2)


async def test_the_dpo_decisions_from_the_command_line(tmp_path: Path, case_store: str) -> None:
    env = {"DSRFLOW_PG_DSN": case_store}
    pool = await asyncpg.create_pool(case_store, min_size=1, max_size=1)
    try:
        async with pool.acquire() as conn:
            await register(conn, SystemDeclaration(name="crm", identifier_types=("email",), actions=("erase",)))
    finally:
        await pool.close()
    env = {**env, "DSRFLOW_CREDENTIAL": await enroll("dpo@example.vn", "dpo", tmp=tmp_path, env=env)}
    opened = await asyncio.to_thread(dsrflow, "cases", "open", "--right", "erasure", "--email", EMAIL,
                                     "--reason", "retention ran out", "--json", tmp=tmp_path, env=env)
    assert opened.code == 0, opened
    doc = orjson.loads(opened.stdout)
    case_id = doc["case_id"]
    assert doc["actor"] == "dpo@example.vn"
    assert EMAIL not in opened.stdout + opened.stderr
    held = await asyncio.to_thread(dsrflow, "cases", "hold", case_id, "--kind", "legal_hold",
                                   "--reason", "litigation", "--json", tmp=tmp_path, env=env)
    assert held.code == 0 and orjson.loads(held.stdout) == {"case_id": case_id, "status": "on_hold",
                                                            "actor": "dpo@example.vn"}, held
    released = await asyncio.to_thread(dsrflow, "cases", "release", case_id, tmp=tmp_path, env=env)
    assert released.code == 0 and "in_progress" in released.stdout, released
    extended = await asyncio.to_thread(dsrflow, "cases", "extend", case_id, "--reason",
                                       "archives on tape", "--json", tmp=tmp_path, env=env)
    assert extended.code == 0, extended
    assert set(orjson.loads(extended.stdout)) == {"case_id", "due_at", "actor"}
    again = await asyncio.to_thread(dsrflow, "cases", "extend", case_id, "--reason", "x",
                                    tmp=tmp_path, env=env)
    assert_error(again, "one extension")
    denied = await asyncio.to_thread(dsrflow, "cases", "deny", case_id, "--ground",
                                     "processing_without_consent", "--reason", "x", tmp=tmp_path, env=env)
    assert_error(denied, "skip them one by one")  # a task is out already
    missing = await asyncio.to_thread(dsrflow, "cases", "deny", case_id, tmp=tmp_path, env=env)
    assert_error(missing, "--ground", code=2)
    assert await timeline_by(case_id, tmp=tmp_path, env=env) == [
        ("held", "dpo@example.vn"), ("released", "dpo@example.vn"), ("deadline_extended", "dpo@example.vn")]


async def _case_with_a_crm_task(case_store: str, tmp: Path) -> tuple[str, str]:
    """A verified erasure case (controller "default") with one task, for the worker of crm."""
    pool = await asyncpg.create_pool(case_store, min_size=1, max_size=1)
    try:
        async with pool.acquire() as conn:
            await register(conn, SystemDeclaration(name="crm", identifier_types=("email",), actions=("erase",)))
        req = RightsRequested.model_validate({"request_id": f"cli-task-{uuid.uuid4().hex[:8]}", "right": "erasure",
                                              "verified": True, "subject": {"identifiers": {"email": EMAIL}}})
        value, headers = codec.encode(req, source="test")
        settings = Settings(pg_dsn=case_store, kafka_bootstrap="unused:9092", state_dir=tmp)
        await Coordinator(settings, pool, export_store=MemoryExportStore()).handle_requests(
            [Record(topics.REQUESTS, 0, 0, req.request_id.encode(), value, headers)])
        row = await pool.fetchrow("SELECT t.case_id, t.task_id FROM tasks t JOIN cases c USING (case_id) "
                                  "WHERE c.request_id = $1", req.request_id)
    finally:
        await pool.close()
    return str(row["case_id"]), str(row["task_id"])


async def test_an_operator_carries_out_tasks_but_decides_nothing_on_a_case(tmp_path: Path, case_store: str) -> None:
    env = {"DSRFLOW_PG_DSN": case_store}
    case_id, task_id = await _case_with_a_crm_task(case_store, tmp_path)
    dpo = await enroll("dpo", "dpo", tmp=tmp_path, env=env)
    ops = {**env, "DSRFLOW_CREDENTIAL": await enroll("ops", "operator", tmp=tmp_path, env=env)}

    denied = await asyncio.to_thread(dsrflow, "cases", "deny", case_id, "--ground", "harms_others", "--reason",
                                     "x", tmp=tmp_path, env=ops)
    assert_error(denied, "the role operator may not make the decision deny")
    reassign = await asyncio.to_thread(dsrflow, "tasks", "reassign", task_id, "--to-person", "hr team",
                                       "--reason", "the vendor console", tmp=tmp_path, env=ops)
    assert_error(reassign, "may not make the decision reassign_task")

    # the DPO gives the worker's task to a person; the operator does it by hand
    moved = await asyncio.to_thread(dsrflow, "tasks", "reassign", task_id, "--to-person", "hr team", "--reason",
                                    "the vendor console", "--credential", dpo, "--json", tmp=tmp_path, env=env)
    assert_ok(moved)
    assert orjson.loads(moved.stdout) == {"task_id": task_id, "status": "manual", "case_status": "in_progress",
                                          "actor": "dpo", "to_person": "hr team"}
    manual = await asyncio.to_thread(dsrflow, "tasks", "list", "--json", tmp=tmp_path, env=env)
    assert [t["task_id"] for t in orjson.loads(manual.stdout)] == [task_id]
    done = await asyncio.to_thread(dsrflow, "tasks", "complete", task_id, "--note", "deleted in the vendor console",
                                   tmp=tmp_path, env=ops)
    assert_ok(done, f"task {task_id}: succeeded; case completed")
    twice = await asyncio.to_thread(dsrflow, "tasks", "complete", task_id, "--note", "again", tmp=tmp_path, env=ops)
    assert_error(twice)
    by = await timeline_by(case_id, tmp=tmp_path, env=env)
    assert ("task_reassigned", "dpo") in by and ("manual_completed", "ops") in by
    assert not [k for k, who in by if who not in ("dpo", "ops")]


async def test_a_revoked_key_or_a_disabled_actor_is_refused(tmp_path: Path, case_store: str,
                                                            cases: dict[str, uuid.UUID]) -> None:
    env = {"DSRFLOW_PG_DSN": case_store}
    awaiting = str(cases["awaiting"])
    first = await enroll("lan", "dpo", tmp=tmp_path, env=env)
    listed = await asyncio.to_thread(dsrflow, "actors", "list", "--json", tmp=tmp_path, env=env)
    [(key_id, revoked)] = [(k["key_id"], k["revoked_at"]) for a in orjson.loads(listed.stdout) for k in a["keys"]]
    assert revoked is None
    revoke = await asyncio.to_thread(dsrflow, "actors", "revoke", key_id, tmp=tmp_path, env=env)
    assert revoke.code == 0 and f"key {key_id} revoked" in revoke.stdout, revoke
    refused = await asyncio.to_thread(dsrflow, "cases", "verify", awaiting, "--credential", first, tmp=tmp_path,
                                      env=env)
    assert_error(refused, f"key {key_id} of lan was revoked")

    # rotation: a new key, in a new file; the old file stays refused
    rotated = await asyncio.to_thread(dsrflow, "actors", "key", "lan", tmp=tmp_path, env=env)
    assert rotated.code == 0, rotated
    second = rotated.stdout.splitlines()[-1].removeprefix("export DSRFLOW_CREDENTIAL=")
    assert second != first and Path(second).stat().st_mode & 0o777 == 0o600
    ok = await asyncio.to_thread(dsrflow, "cases", "verify", awaiting, "--credential", second, tmp=tmp_path, env=env)
    assert ok.code == 0 and "verified: in_progress" in ok.stdout, ok
    assert await timeline_by(awaiting, tmp=tmp_path, env=env) == [("verified", "lan")]

    disable = await asyncio.to_thread(dsrflow, "actors", "disable", "lan", tmp=tmp_path, env=env)
    assert disable.code == 0 and "actor lan disabled" in disable.stdout, disable
    assert_error(await asyncio.to_thread(dsrflow, "cases", "lift", awaiting, "--credential", second, tmp=tmp_path,
                                         env=env), "actor lan is disabled")
    assert_error(await asyncio.to_thread(dsrflow, "actors", "key", "lan", tmp=tmp_path, env=env),
                 "actor lan is disabled")
    assert_error(await asyncio.to_thread(dsrflow, "actors", "revoke", "k_0123456789abcdef", tmp=tmp_path, env=env),
                 "no key k_0123456789abcdef")
    assert_error(await asyncio.to_thread(dsrflow, "actors", "disable", "nobody", tmp=tmp_path, env=env),
                 "no actor nobody")


async def test_actors_list_shows_key_ids_and_never_keys(tmp_path: Path, case_store: str) -> None:
    env = {"DSRFLOW_PG_DSN": case_store}
    empty = await asyncio.to_thread(dsrflow, "actors", "list", tmp=tmp_path, env=env)
    assert empty.code == 0 and "no actors" in empty.stdout, empty
    dpo = await enroll("dpo", "dpo", tmp=tmp_path, env=env, controller="acme")
    await enroll("ops", "operator", tmp=tmp_path, env=env)
    dup = await asyncio.to_thread(dsrflow, "actors", "add", "dpo", "--role", "admin", "--out",
                                  str(tmp_path / "other.json"), tmp=tmp_path, env=env)
    assert_error(dup, "actor dpo exists already")
    assert not (tmp_path / "other.json").exists()

    listed = await asyncio.to_thread(dsrflow, "actors", "list", "--json", tmp=tmp_path, env=env)
    assert listed.code == 0, listed
    actors = orjson.loads(listed.stdout)
    assert [(a["name"], a["role"], a["tenant"], a["disabled_at"]) for a in actors] == [
        ("dpo", "dpo", "acme", None), ("ops", "operator", "default", None)]
    assert orjson.loads(Path(dpo).read_text())["key_id"] == actors[0]["keys"][0]["key_id"]
    human = await asyncio.to_thread(dsrflow, "actors", "list", tmp=tmp_path, env=env)
    for run in (listed, human):
        for secret in ("PRIVATE KEY", "PUBLIC KEY", "private_key", "public_key", "BEGIN"):
            assert secret not in run.stdout + run.stderr
    assert "controller acme" in human.stdout and actors[1]["keys"][0]["key_id"] in human.stdout

    # an actor of controller acme opens cases of acme only
    other = await asyncio.to_thread(dsrflow, "cases", "open", "--right", "erasure", "--email", EMAIL, "--reason",
                                    "retention ran out", "--credential", dpo, tmp=tmp_path, env=env)
    assert_error(other, "opens cases of that controller only", never=(PASSWORD, EMAIL))
    mine = await asyncio.to_thread(dsrflow, "cases", "open", "--right", "erasure", "--email", EMAIL, "--reason",
                                   "retention ran out", "--controller", "acme", "--credential", dpo, tmp=tmp_path,
                                   env=env)
    assert mine.code == 0 and mine.stdout.startswith("opened case ") and "for dpo" in mine.stdout, mine


async def test_a_client_company_leaving_from_the_command_line(tmp_path: Path, case_store: str) -> None:
    env = {"DSRFLOW_PG_DSN": case_store}
    spec = tmp_path / "acme-helpdesk.toml"
    spec.write_text('name = "acme-helpdesk"\nidentifier_types = ["email"]\nworker = false\ncontroller = "acme"\n')
    declared = await asyncio.to_thread(dsrflow, "systems", "declare", str(spec), tmp=tmp_path, env=env)
    assert declared.code == 0, declared
    host = await enroll("dpo-host", "dpo", tmp=tmp_path, env=env)
    missing = await asyncio.to_thread(dsrflow, "cases", "offboard", "--controller", "acme", "--reason", "left",
                                      "--credential", host, tmp=tmp_path, env=env)
    assert_error(missing, "--handover", code=2)
    run = await asyncio.to_thread(dsrflow, "cases", "offboard", "--controller", "acme", "--delete", "--reason",
                                  "contract ended 2026-11-30", "--credential", host, "--json", tmp=tmp_path, env=env)
    assert run.code == 0, run
    doc = orjson.loads(run.stdout)
    assert doc["actor"] == "dpo-host" and doc["status"] == "in_progress"
    listed = await asyncio.to_thread(dsrflow, "cases", "list", "--controller", "acme", "--json", tmp=tmp_path, env=env)
    assert [c["case_id"] for c in orjson.loads(listed.stdout)] == [doc["case_id"]]
    tasks = await asyncio.to_thread(dsrflow, "tasks", "list", "--json", tmp=tmp_path, env=env)
    [task] = [t for t in orjson.loads(tasks.stdout) if t["case_id"] == doc["case_id"]]
    assert (task["system"], task["action"], task["kind"]) == ("acme-helpdesk", "erase_all", "manual")
    twice = await asyncio.to_thread(dsrflow, "cases", "offboard", "--controller", "acme", "--delete", "--reason",
                                    "again", "--credential", host, tmp=tmp_path, env=env)
    assert_error(twice, "being deleted: that case finishes first")


async def test_a_systems_signing_key_from_the_command_line(tmp_path: Path, case_store: str) -> None:
    env = {"DSRFLOW_PG_DSN": case_store}
    run = await asyncio.to_thread(dsrflow, "systems", "key", "crm", tmp=tmp_path, env=env)
    assert run.code == 0 and run.stderr == "", run
    path = Path(next(line for line in run.stdout.splitlines()
                     if line.startswith("export DSRFLOW_WORKER_CREDENTIAL=")).split("=", 1)[1])
    assert path.stat().st_mode & 0o777 == 0o600 and "PRIVATE KEY" not in run.stdout
    from dsrflow import auth

    key_id = auth.load_credential(path).key_id
    conn = await asyncpg.connect(case_store)
    try:
        row = await conn.fetchrow("SELECT system, revoked_at FROM system_keys WHERE key_id = $1", key_id)
        assert (row["system"], row["revoked_at"]) == ("crm", None)
        again = await asyncio.to_thread(dsrflow, "systems", "key", "crm", tmp=tmp_path, env=env)
        assert_error(again, "exists already", code=2)
        bad = await asyncio.to_thread(dsrflow, "systems", "key", "Not A Name", tmp=tmp_path, env=env)
        assert_error(bad, "not a system name", code=2)
        revoked = await asyncio.to_thread(dsrflow, "systems", "revoke-key", key_id, tmp=tmp_path, env=env)
        assert_ok(revoked, "revoked system key")
        assert await conn.fetchval("SELECT revoked_at FROM system_keys WHERE key_id = $1", key_id) is not None
    finally:
        await conn.close()


async def test_seed_prepares_the_reference_systems_once(
    tmp_path: Path, case_store: str, make_database: Callable[..., Awaitable[str]]
) -> None:
    crm_dsn, billing_dsn = await make_database("crm"), await make_database("billing")
    env = {"DSRFLOW_PG_DSN": case_store, "DSRFLOW_CRM_DSN": crm_dsn, "DSRFLOW_BILLING_DSN": billing_dsn}
    for _ in range(2):  # a second run changes nothing
        run = await asyncio.to_thread(dsrflow, "seed", tmp=tmp_path, env=env)
        assert run.code == 0, run
        assert "crm: " in run.stdout and "billing: " in run.stdout
    conn = await asyncpg.connect(crm_dsn)
    try:
        assert await conn.fetchval("SELECT count(*) FROM contacts WHERE email = 'lan.nguyen@example.vn'") == 1
        contacts = await conn.fetchval("SELECT count(*) FROM contacts")
    finally:
        await conn.close()
    assert f"crm: {contacts} contacts" in run.stdout
    bad = await asyncio.to_thread(dsrflow, "seed", "payroll", tmp=tmp_path, env=env)
    assert_error(bad, "no reference system payroll", code=2)
