"""The README's ACL table ("Who may do what: principals, topics and ACLs") and its kafka-acls.sh
example say exactly what :func:`dsrflow.topics.acl_rules` returns: the function is what
tests/integration/test_acls.py grants on a broker with an authorizer, so README and test cannot
drift apart."""

from __future__ import annotations

import re
from pathlib import Path

from dsrflow import topics

README = Path(__file__).resolve().parents[2] / "README.md"


def section() -> str:
    text = README.read_text()
    start = text.index("## Who may do what: principals, topics and ACLs")
    end = text.index("\n## ", start + 1)
    return text[start:end]


def table_rows() -> list[tuple[str, str, str]]:
    """(principal, allow, on) of every row, without the notes in parentheses after a principal."""
    lines = section().splitlines()
    head = lines.index("| principal | allow | on |")
    assert lines[head + 1] == "|---|---|---|"
    rows = []
    for line in lines[head + 2:]:
        if not line.startswith("|"):
            break
        principal, allow, on = (cell.strip() for cell in line.strip("|").split("|"))
        rows.append((re.sub(r"\s*\(.*\)$", "", principal), allow, on))
    return rows


def shell_commands() -> list[str]:
    """The ``acl ...`` commands of the example, a command's continued lines joined."""
    block = re.search(r"```sh\n(.*?)```", section(), re.DOTALL)
    assert block is not None
    joined = re.sub(r"\s*\\\n\s*", " ", block.group(1))
    lines = joined.strip().splitlines()
    assert lines[0].startswith("acl() { kafka-acls.sh ") and '--add "$@"; }' in lines[0]
    return lines[1:]


def test_the_table_lists_exactly_the_rules() -> None:
    expected = [(f"`{r.principal}`", ", ".join(r.operations), r.on()) for r in topics.acl_rules(["crm"])]
    assert table_rows() == expected


def test_the_example_grants_exactly_the_workers_rules() -> None:
    worker = [r for r in topics.acl_rules(["crm"]) if r.principal == "User:worker-crm"]
    assert len(worker) == 3
    assert shell_commands() == [f"acl {r.kafka_acls_args()}" for r in worker]


def test_the_rules_cover_every_topic_and_each_system_apart() -> None:
    rules = topics.acl_rules(["crm", "billing"])
    every = {s.name for s in topics.specs_for(["crm", "billing"])}
    admin = [r for r in rules if r.principal == "User:admin"]
    created = {n for r in admin if not r.prefixed for n in r.names}
    prefixes = [n for r in admin if r.prefixed for n in r.names]
    assert every == created | {n for n in every if any(n.startswith(p) for p in prefixes)}
    assert all("Create" in r.operations for r in admin)
    crm = {n for r in rules if r.principal == "User:worker-crm" for n in r.names}
    billing = {n for r in rules if r.principal == "User:worker-billing" for n in r.names}
    assert "dsr.tasks.crm.v1" in crm - billing and "dsr.tasks.billing.v1" in billing - crm
    assert crm & billing == {topics.RECEIPTS, topics.SYSTEMS, topics.DEADLETTER}
