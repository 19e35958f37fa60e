"""The worker conformance suite from the command line, over Kafka, for a worker in any language::

    python -m dsrflow.testing.conformance --declaration loyalty.toml \\
        --subject email=lan@example.com --subject phone=+84901234567 \\
        --other email=hung@example.com --other phone=+84912345678 \\
        --seed-cmd "./reset-test-data.sh" [--snapshot-cmd "./dump-rows.sh"] \\
        [--conflict email=lan@example.com --conflict phone=+84912345678] \\
        [--credential coordinator.json] [--check export_finds_subject ...] [--timeout 30]

- ``--declaration``: the system's :class:`~dsrflow.registry.SystemDeclaration`, as JSON or TOML
  (the file given to ``dsrflow systems declare``); tasks go to its topic ``dsr.tasks.<name>.v1``;
- ``--subject`` / ``--other``: two different people the test data holds, one ``TYPE=VALUE`` each
  time (only the identifier types the system declares are sent); ``--conflict``: the identifiers
  of two people in one task (default: the subject's first type with the other person's second);
- ``--seed-cmd``: a shell command that (re)creates the test data; it runs before every check, and
  a check whose seed exits non-zero fails; ``--snapshot-cmd``: a shell command whose standard
  output is a picture of the system's data (its rows, say), compared before and after what
  should change nothing;
- ``--credential``: the coordinator's credential (``dsrflow systems coordinator-key``), when the
  worker acts only on signed tasks (``DSRFLOW_COORDINATOR_PUBLIC_KEYS``);
- ``--check``: run only these checks (default all of them, in order);
- ``--timeout``: seconds to wait for each receipt (default 30).

The broker and the export store come from the ``DSRFLOW_*`` environment (``DSRFLOW_KAFKA_BOOTSTRAP``
and the SASL/TLS settings; ``DSRFLOW_EXPORT_DIR``, where the worker's artifacts are read from).

Start it once the worker is up and consuming (a seed that runs while the worker still sets up its
database may collide with it). It prints one line per check, ``<check>: passed|failed|skipped:
<why>``, then a count on standard error, and exits 0 when no check failed, 1 when one did, and 2,
with one line on standard error, on bad arguments or settings.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

import orjson
from pydantic import ValidationError

from ..errors import DsrflowError, validation_summary
from ..registry import SystemDeclaration
from ..rights import IdentifierType
from .conformance import CHECKS, DEFAULT_TIMEOUT, CheckError, Conformance

__all__ = ["main"]

PROG = "python -m dsrflow.testing.conformance"
_TYPES = ", ".join(t.value for t in IdentifierType)


class _BadArguments(Exception):
    """Exit 2 with this one line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, not the usage block
        raise _BadArguments(message)


def _identifier(text: str) -> tuple[str, str]:
    kind, sep, value = text.partition("=")
    kind, value = kind.strip(), value.strip()
    if not sep or not kind or not value:  # the value is never echoed: it is a person's identifier
        raise argparse.ArgumentTypeError(f"expected TYPE=VALUE (e.g. email=lan@example.com), with TYPE one of {_TYPES}")
    try:
        IdentifierType(kind)
    except ValueError:
        raise argparse.ArgumentTypeError(f"unknown identifier type {kind[:40]!r}; the types are {_TYPES}") from None
    return kind, value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text[:40]!r} is not a number of seconds") from None
    if not 0 < value < 86_400:
        raise argparse.ArgumentTypeError("must be more than 0 seconds (and less than a day)")
    return value


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Run the dsrflow worker conformance suite over Kafka against a running "
                                       "worker (any language). Settings from the DSRFLOW_* environment.")
    p.add_argument("--declaration", required=True, metavar="FILE",
                   help="the system's SystemDeclaration, JSON (.json) or TOML (.toml)")
    p.add_argument("--subject", required=True, action="append", type=_identifier, metavar="TYPE=VALUE",
                   help="an identifier of the person the checks are about (repeat for each type)")
    p.add_argument("--other", required=True, action="append", type=_identifier, metavar="TYPE=VALUE",
                   help="an identifier of another person the test data holds (repeat for each type)")
    p.add_argument("--conflict", action="append", type=_identifier, metavar="TYPE=VALUE",
                   help="identifiers of two people in one task (default: the subject's first type, the other's "
                        "second)")
    p.add_argument("--seed-cmd", required=True, metavar="COMMAND",
                   help="shell command that (re)creates the test data; runs before every check")
    p.add_argument("--snapshot-cmd", metavar="COMMAND",
                   help="shell command whose output pictures the system's data, compared before and after")
    p.add_argument("--credential", metavar="FILE", help="the coordinator's credential, to sign tasks with")
    p.add_argument("--check", dest="checks", action="extend", nargs="+", choices=CHECKS, metavar="NAME",
                   help=f"run only these checks ({', '.join(CHECKS)}); default all")
    p.add_argument("--timeout", type=_seconds, default=DEFAULT_TIMEOUT, metavar="S",
                   help=f"seconds to wait for each receipt (default {DEFAULT_TIMEOUT:g})")
    return p


def _people(pairs: Sequence[tuple[str, str]] | None, option: str) -> dict[str, str] | None:
    if pairs is None:
        return None
    out: dict[str, str] = {}
    for kind, value in pairs:
        if kind in out:
            raise _BadArguments(f"argument {option}: {kind} given twice")
        out[kind] = value
    return out


def load_declaration(path: Path) -> SystemDeclaration:
    """A SystemDeclaration from a JSON or TOML file; :class:`_BadArguments` saying what is wrong."""
    if path.suffix not in (".json", ".toml"):
        raise _BadArguments(f"--declaration {path}: a .json or .toml file, please")
    try:
        text = path.read_text()
    except OSError as exc:
        raise _BadArguments(f"--declaration {path}: cannot read it ({exc.strerror})") from None
    try:
        raw = tomllib.loads(text) if path.suffix == ".toml" else orjson.loads(text)
    except (tomllib.TOMLDecodeError, orjson.JSONDecodeError) as exc:
        raise _BadArguments(f"--declaration {path}: not valid {path.suffix[1:].upper()} ({exc})") from None
    try:
        return SystemDeclaration.model_validate(raw)
    except ValidationError as exc:
        raise _BadArguments(f"--declaration {path}: not a system declaration: {validation_summary(exc)}") from None


async def _shell(command: str, option: str) -> bytes:
    """Run ``command`` in a shell; its standard output, or :class:`CheckError` if it exits non-zero
    (what it wrote on standard error is passed on, for whoever runs the suite)."""
    proc = await asyncio.create_subprocess_shell(command, stdin=asyncio.subprocess.DEVNULL,
                                                 stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    if proc.returncode != 0:
        if err:
            sys.stderr.buffer.write(err[-4000:])
            sys.stderr.flush()
        raise CheckError(f"{option} exited with status {proc.returncode}")
    return out


def _build(args: argparse.Namespace) -> Conformance:
    from ..auth import load_credential
    from ..settings import get_settings

    declaration = load_declaration(Path(args.declaration))
    subject, other = _people(args.subject, "--subject"), _people(args.other, "--other")
    conflict = _people(args.conflict, "--conflict")
    assert subject is not None and other is not None  # required
    credential = load_credential(args.credential) if args.credential else None
    settings = get_settings()
    # Read now, so that a setting missing or invalid is a bad argument, not five failed checks: the
    # broker (DSRFLOW_KAFKA_BOOTSTRAP or a running stack, SASL/TLS) and the export store.
    settings.producer_options()
    settings.exports  # noqa: B018

    async def seed() -> None:
        await _shell(args.seed_cmd, "--seed-cmd")

    async def snapshot() -> object:
        return await _shell(args.snapshot_cmd, "--snapshot-cmd")

    return Conformance.over_kafka(declaration, settings=settings, subject=subject, other=other, seed=seed,
                                  conflict=conflict, snapshot=snapshot if args.snapshot_cmd else None,
                                  credential=credential, timeout=args.timeout)


async def _run(conformance: Conformance, checks: Sequence[str]) -> list[str]:
    outcomes: list[str] = []
    for name in checks:
        finding = await conformance.check(name)
        print(finding, flush=True)
        outcomes.append(finding.outcome)
    return outcomes


def main(argv: Sequence[str] | None = None) -> int:
    """Run the suite; 0 when no check failed, 1 when one did, 2 on bad arguments or settings."""
    try:
        args = parser().parse_args(argv)
        conformance = _build(args)
    except _BadArguments as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    except (DsrflowError, ValueError) as exc:  # a setting, a credential, subject and other the same person
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    checks = list(dict.fromkeys(args.checks)) if args.checks else list(CHECKS)
    outcomes = asyncio.run(_run(conformance, checks))
    counts = {o: outcomes.count(o) for o in ("passed", "failed", "skipped")}
    print(f"{conformance.system.name}: {', '.join(f'{n} {o}' for o, n in counts.items())}", file=sys.stderr)
    return 1 if counts["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
