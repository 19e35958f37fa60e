"""The worker conformance suite (dsrflow.testing.conformance): the reference systems and the good
in-memory worker pass every check, and each deliberately broken worker fails exactly the check that
is about its bug, so that a check removed or weakened makes a test here fail.

The reference systems run as a service team would run the suite on its own worker: a fresh
database, seeded by the system's own ``setup``; reseeded before every check (every table emptied,
``setup`` seeds it again); and a snapshot of every row, so "nothing changed" looks at the data
itself as well as at what an export finds.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import pytest
from pydantic import SecretStr

from dsrflow.events import RetainedItem
from dsrflow.registry import SystemDeclaration
from dsrflow.rights import Action, IdentifierType
from dsrflow.settings import Settings
from dsrflow.testing import broken
from dsrflow.testing.conformance import (
    CHECKS,
    CONFLICT,
    ERASE_TWICE,
    EXPORT,
    LEGAL_BASIS,
    REDELIVERY,
    Conformance,
    ConformanceError,
    assert_conformant,
)
from dsrflow.worker import Result, TaskContext, Worker
from examples.billing import worker as billing
from examples.crm import worker as crm
from examples.people import BILLING_ONLY, BILLING_WITHOUT_INVOICES, CRM_ONLY, IN_BOTH, Person, person

MakeDatabase = Callable[[], Awaitable[str]]

#: The check each broken worker must fail, and no other.
EXPECTED_FAILURES = {
    "whole_table": {EXPORT},
    "orders_only": {EXPORT},
    "any_identifier": {CONFLICT},
    "late_conflict": {CONFLICT},
    "replaying": {REDELIVERY},
    "not_found_after_erase": {ERASE_TWICE},
    "same_answer": {ERASE_TWICE},
    "soft_delete": {LEGAL_BASIS},
    "blank_basis": {LEGAL_BASIS},
}

#: On the CRM's suppression list (one contact in ten unsubscribed): its erasure keeps the keyed
#: hashes of the email and phone, and says retained.
CRM_UNSUBSCRIBED = person("nam.ho@example.vn")


def test_the_suite_has_its_five_checks() -> None:
    assert CHECKS == (EXPORT, ERASE_TWICE, LEGAL_BASIS, CONFLICT, REDELIVERY)
    assert len(set(CHECKS)) == len(CHECKS)
    # Every check is some broken worker's undoing: none of them is there for show.
    assert set().union(*EXPECTED_FAILURES.values()) == set(CHECKS)


# -- the in-memory workers -------------------------------------------------------------------------


@pytest.mark.parametrize("check", CHECKS)
async def test_the_good_in_memory_worker_passes(check: str) -> None:
    finding = await broken.GOOD.conformance().check(check)
    assert finding.passed, finding
    assert broken.good_worker is broken.GOOD.worker


async def test_the_good_in_memory_worker_passes_with_a_snapshot_of_its_table() -> None:
    findings = await broken.GOOD.conformance(snapshot=broken.GOOD.table.snapshot).assert_conformant()
    assert [f.check for f in findings if f.passed] == list(CHECKS)


def test_every_broken_worker_is_covered() -> None:
    assert set(broken.BROKEN) == set(EXPECTED_FAILURES)
    assert broken.GOOD.name not in broken.BROKEN


@pytest.mark.parametrize("name", sorted(EXPECTED_FAILURES))
async def test_each_broken_worker_fails_exactly_its_check(name: str) -> None:
    specimen = broken.BROKEN[name]
    findings = await specimen.conformance().run()
    assert [f.check for f in findings] == list(CHECKS)
    failed = {f.check for f in findings if f.failed}
    assert failed == EXPECTED_FAILURES[name], [str(f) for f in findings]
    assert all(f.passed for f in findings if not f.failed), "nothing skipped: both actions are declared"
    for f in findings:
        if f.failed:
            assert f.problems and f.reason == "; ".join(f.problems)


async def test_a_broken_workers_own_snapshot_catches_it_too() -> None:
    """The replaying worker's redelivered erasure also shows in the rows themselves."""
    specimen = broken.REPLAYING
    finding = await specimen.conformance(snapshot=specimen.table.snapshot).check(REDELIVERY)
    assert finding.failed
    assert any("the snapshot" in p for p in finding.problems), finding


async def test_what_the_findings_say() -> None:
    conflict = await broken.ANY_IDENTIFIER.conformance().check(CONFLICT)
    assert "the subject's email and the other person's phone" in conflict.reason
    assert "gave succeeded, not conflict" in conflict.reason and "exported 1 artifact(s)" in conflict.reason
    late = await broken.LATE_CONFLICT.conformance().check(CONFLICT)
    assert late.problems == ("export and erase with the subject's email and the other person's phone changed what "
                             "an export of the subject finds, what an export of the other person finds",)
    kept = await broken.SOFT_DELETE.conformance().check(LEGAL_BASIS)
    assert "an export still finds the subject" in kept.reason and "without a legal basis" in kept.reason
    blank = await broken.BLANK_BASIS.conformance().check(LEGAL_BASIS)
    assert blank.problems == ("retained item 1 (user.financial) has no legal basis",)
    everyone = await broken.WHOLE_TABLE.conformance().check(EXPORT)
    assert everyone.problems == ("the subject's export holds the other person's email, phone",)
    anonymous = await broken.ORDERS_ONLY.conformance().check(EXPORT)
    assert anonymous.problems == ("no artifact of the subject's export mentions their email or phone",)
    again = await broken.SAME_ANSWER.conformance().check(ERASE_TWICE)
    assert again.problems == ("a second erasure of the subject gave retained, not not_found",)
    liar = await broken.NOT_FOUND_AFTER_ERASE.conformance().check(ERASE_TWICE)
    assert "gave not_found, not succeeded or retained" in liar.reason


async def test_assert_conformant_names_every_failed_check() -> None:
    with pytest.raises(ConformanceError) as raised:
        await assert_conformant(broken.ANY_IDENTIFIER.worker, subject=broken.SUBJECT, other=broken.OTHER,
                                seed=broken.ANY_IDENTIFIER.table.seed)
    assert CONFLICT in str(raised.value) and REDELIVERY not in str(raised.value)
    assert [f.check for f in raised.value.findings if f.failed] == [CONFLICT]
    findings = await assert_conformant(broken.GOOD.worker, subject=broken.SUBJECT, other=broken.OTHER,
                                       seed=broken.GOOD.table.seed, checks=[EXPORT, CONFLICT])
    assert [(f.check, f.outcome) for f in findings] == [(EXPORT, "passed"), (CONFLICT, "passed")]


async def test_a_receipt_that_cannot_be_sent_fails_the_check() -> None:
    """A retained item built past its validation (no legal basis): the receipt does not survive the
    codec, run_task raises, and the check fails with what was raised; the other checks still run."""
    table = broken.Table()
    worker = Worker(SystemDeclaration(name="shop", identifier_types=(IdentifierType.email,),
                                      actions=(Action.export, Action.erase)))

    @worker.handler(Action.export)
    async def export(ctx: TaskContext) -> Result:
        return Result.not_found()

    @worker.handler(Action.erase)
    async def erase(ctx: TaskContext) -> Result:
        item = RetainedItem.model_construct(category="user.financial", records=1, legal_basis="")
        return Result.retained([item], counts={"erased": 1})

    findings = await Conformance(worker, subject=broken.SUBJECT, other=broken.OTHER, seed=table.seed).run()
    outcomes = {f.check: f.outcome for f in findings}
    assert outcomes[LEGAL_BASIS] == "failed" and outcomes[EXPORT] == "failed"
    [basis] = [f for f in findings if f.check == LEGAL_BASIS]
    assert basis.reason.startswith("erase raised ") and "instead of giving a receipt" in basis.reason, basis
    assert "legal_basis" in basis.reason


async def test_checks_of_undeclared_actions_are_skipped() -> None:
    """An export-only system: the erasure checks are skipped, the others run on export alone."""
    table = broken.Table()
    worker = Worker(SystemDeclaration(name="newsletter", identifier_types=(IdentifierType.email,),
                                      actions=(Action.export,)))

    @worker.handler(Action.export)
    async def export(ctx: TaskContext) -> Result:
        rows = [r for r in table.rows if r["email"] == ctx.identifiers[IdentifierType.email]]
        if not rows:
            return Result.not_found()
        return Result.succeeded(counts={"located": 1}, artifacts=[await ctx.export(rows, records=1)])

    conformance = Conformance(worker, subject=broken.SUBJECT, other=broken.OTHER, seed=table.seed)
    assert conformance.conflict is None  # one identifier type: no two people in one task
    outcomes = {f.check: f.outcome for f in await conformance.run()}
    assert outcomes == {EXPORT: "passed", ERASE_TWICE: "skipped", LEGAL_BASIS: "skipped", CONFLICT: "skipped",
                        REDELIVERY: "passed"}


def test_the_subject_and_the_other_person_must_differ() -> None:
    with pytest.raises(ValueError, match="share their phone"):
        Conformance(broken.GOOD.worker, subject=broken.SUBJECT, other={**broken.OTHER, "phone": "0901234567"},
                    seed=broken.GOOD.table.seed)  # the subject's phone, written the local way
    with pytest.raises(ValueError, match="no identifier of a type"):
        Conformance(broken.GOOD.worker, subject={"customer_id": "KH1"}, other=broken.OTHER, seed=broken.GOOD.table.seed)


async def test_unknown_check() -> None:
    with pytest.raises(ValueError, match="no conformance check"):
        await broken.GOOD.conformance().check("erase_once")


# -- the reference systems -------------------------------------------------------------------------


async def _tables(conn: asyncpg.Connection) -> list[str]:
    return [r["tablename"] for r in await conn.fetch(
        "SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY tablename")]


def reseed(dsn: str, setup: Callable[[str], Awaitable[None]]) -> Callable[[], Awaitable[None]]:
    """Empty every table, then the system's own ``setup`` seeds it again."""

    async def seed() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            tables = await _tables(conn)
            await conn.execute(f"TRUNCATE {', '.join(tables)} RESTART IDENTITY CASCADE")
        finally:
            await conn.close()
        await setup(dsn)

    return seed


def rows(dsn: str) -> Callable[[], Awaitable[object]]:
    """Every row of every table, as JSON text, sorted."""

    async def snapshot() -> object:
        conn = await asyncpg.connect(dsn)
        try:
            return {t: sorted(r[0] for r in await conn.fetch(f"SELECT to_jsonb(x)::text FROM {t} x"))
                    for t in await _tables(conn)}
        finally:
            await conn.close()

    return snapshot


def reference(worker: Worker, dsn: str, setup: Callable[[str], Awaitable[None]], subject: Person,
              other: Person, **kwargs: Any) -> Conformance:
    return Conformance(worker, subject=subject.identifiers(), other=other.identifiers(), seed=reseed(dsn, setup),
                       snapshot=rows(dsn), settings=Settings(pg_dsn=SecretStr(dsn)), **kwargs)


@pytest.mark.parametrize("check", CHECKS)
async def test_the_crm_passes(crm_dsn: str, check: str) -> None:
    finding = await reference(crm.worker, crm_dsn, crm.setup, IN_BOTH, CRM_ONLY).check(check)
    assert finding.passed, finding


async def test_the_crm_passes_for_someone_whose_erasure_is_retained(crm_dsn: str) -> None:
    """Its erasure keeps the suppression list's hashes, with their basis: the suite accepts it."""
    findings = await reference(crm.worker, crm_dsn, crm.setup, CRM_UNSUBSCRIBED, IN_BOTH).assert_conformant()
    [basis] = [f for f in findings if f.check == LEGAL_BASIS]
    assert basis.reason.startswith("erasure retained user.privacy_preferences"), basis


async def test_the_crm_passes_by_cookie_and_device(crm_dsn: str) -> None:
    """The conflict check with other identifier types: the subject's cookie with the other's email."""
    assert IN_BOTH.cookie_id and IN_BOTH.device_id
    subject = {"email": IN_BOTH.email, "cookie_id": IN_BOTH.cookie_id, "device_id": IN_BOTH.device_id}
    conformance = Conformance(crm.worker, subject=subject, other=CRM_ONLY.identifiers(),
                              conflict={"cookie_id": IN_BOTH.cookie_id, "phone": CRM_ONLY.phone},
                              seed=reseed(crm_dsn, crm.setup), snapshot=rows(crm_dsn))
    await conformance.assert_conformant()


@pytest.mark.parametrize("check", CHECKS)
async def test_billing_passes(billing_dsn: str, check: str) -> None:
    finding = await reference(billing.worker, billing_dsn, billing.setup, IN_BOTH, BILLING_ONLY).check(check)
    assert finding.passed, finding
    if check == LEGAL_BASIS:  # invoices are kept under the accounting law, and the suite accepts that
        assert finding.reason.startswith("erasure retained user.financial"), finding


async def test_billing_passes_for_a_customer_without_invoices(billing_dsn: str) -> None:
    findings = await reference(billing.worker, billing_dsn, billing.setup, BILLING_WITHOUT_INVOICES,
                               IN_BOTH).assert_conformant()
    [basis] = [f for f in findings if f.check == LEGAL_BASIS]
    assert basis.reason.startswith("erasure succeeded, retained nothing"), basis
