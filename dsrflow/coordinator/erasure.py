"""What a completed erasure of a person does besides its tasks (called from ``Coordinator._settle``).

1. **The suppression list.** Each verified identifier the case acted on is published, as a keyed
   hash (:mod:`dsrflow.suppression`), to the compacted ``dsr.suppressions.v1``, so ingestion
   pipelines do not import the person again. Without ``DSRFLOW_SUPPRESSION_KEY`` nothing is
   published, and the outcome says so.
2. **dsrflow's own copies.** The exports and access bundles of the same controller's earlier
   access and portability cases of that person (a verified identifier of theirs equals one of the
   erasure's, in normal form, and none disagrees: the all-agree rule) are deleted from the export
   store; the outcome lists those cases and counts, never an identifier.

Both apply to an erasure of a subject (scope ``subject``) that finished completed or
completed_with_exceptions: a failed or denied erasure erased nothing, so it suppresses nothing and
deletes nothing; nor does one where a system found the identifiers to be two people's
(``conflict``). Only the identifier types of systems that erased, kept or found nothing count. A
key that cannot be used, or a store that refuses a deletion, is said in the outcome; it never
holds up the receipts behind it. They run once, in the transaction that finishes the case: the events go out
through the outbox with it. The deletions are file I/O (run in a thread): should the transaction
not commit, the files are gone already and the retried batch finds nothing left to delete (its
outcome then counts 0 for those cases, which it still lists).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
import orjson

from .. import topics
from ..domain.case import Case, Effects
from ..errors import ConfigError
from ..events import SubjectSuppressed
from ..exports.store import ExportError, ExportStore, bundle_key, controller_prefix, system_case_prefix
from ..identity import normalise_lenient, region_of
from ..registry import SystemDeclaration
from ..rights import CaseStatus, IdentifierType, Right
from ..settings import Settings
from ..suppression import configured_key, hash_normal, list_key

__all__ = ["NO_KEY", "acted_identifiers", "after_erasure", "completed_erasure"]

log = logging.getLogger("dsrflow.coordinator")

#: the outcome's ``suppression`` when no key is configured
NO_KEY = "not published: no DSRFLOW_SUPPRESSION_KEY"
#: rights whose cases leave copies of the person's data in the export store
_COPIES = (str(Right.access), str(Right.portability))


def completed_erasure(case: Case) -> bool:
    """An erasure of a person that finished having erased (completed, or with exceptions)."""
    return (case.right == Right.erasure and case.scope == "subject" and case.pseudonymised_at is None
            and case.status in (CaseStatus.completed, CaseStatus.completed_with_exceptions)
            and case.outcome is not None)


#: task outcomes after which a system's identifier types count as the person's: it erased, kept
#: with a basis, or held nothing; never ``conflict`` (the identifiers are two people's there)
_AGREED = frozenset({"succeeded", "retained", "not_found"})


def conflicted(case: Case) -> list[str]:
    """The systems where the erasure's identifiers pointed to different people."""
    return sorted(t.system for t in case.tasks if str(t.status) == "conflict")


def acted_identifiers(case: Case, systems: Mapping[str, SystemDeclaration]) -> dict[IdentifierType, str]:
    """The case's verified identifiers that its systems acted by (a type some system whose task
    erased, kept or found nothing searches by), each in normal form; none at all when a system
    found the identifiers to be two people's (``conflict``): the DPO decides, and nothing is
    suppressed or deleted meanwhile. A value that no longer normalises is left out."""
    if conflicted(case):
        return {}
    verified = case.verified_types
    searched = {t for task in case.tasks if str(task.status) in _AGREED
                and (s := systems.get(task.system)) is not None for t in s.identifier_types}
    region = region_of(case.jurisdiction)
    out: dict[IdentifierType, str] = {}
    for kind, value in case.subject.items():
        if kind not in verified or kind not in searched:
            continue
        try:
            out[kind] = normalise_lenient(kind, value, region=region)
        except ValueError:
            log.warning("erasure case %s: its %s identifier does not normalise; left out", case.case_id, kind)
    return out


async def after_erasure(conn: asyncpg.Connection, case: Case, systems: Mapping[str, SystemDeclaration],
                        now: datetime, *, settings: Settings, exports: ExportStore) -> Effects:
    """For a case :func:`completed_erasure` just finished: the suppression events to publish (the
    extra Effects returned) and the deletion of earlier copies; both recorded in ``case.outcome``.
    Nothing for any other case."""
    if not completed_erasure(case):
        return Effects()
    assert case.outcome is not None
    identifiers = acted_identifiers(case, systems)
    if not identifiers and conflicted(case):
        why = f"not published: the identifiers point to different people in {', '.join(conflicted(case))}"
        case.outcome["suppression"] = why
        case.outcome["earlier_copies_deleted"] = {"cases": [], "exports": 0, "bundles": 0,
                                                  "skipped": "the identifiers point to different people"}
        case.dirty = True
        return Effects()
    fx = _suppress(case, identifiers, settings, now)
    copies = await _earlier_copies(conn, case, identifiers, settings)
    deleted = await asyncio.to_thread(_delete, exports, case.controller, copies) if copies else []
    gone = [uuid.UUID(d["case_id"]) for d in deleted if "error" not in d]
    if gone:  # those cases' bundle and exports are no more: their records say so (the API shows it)
        await conn.execute("UPDATE cases SET exports_deleted_at = $2 WHERE case_id = ANY($1::uuid[])", gone, now)
    case.outcome["earlier_copies_deleted"] = {
        "cases": deleted, "exports": sum(d["exports"] for d in deleted),
        "bundles": sum(d["bundles"] for d in deleted)}
    case.dirty = True
    log.info("erasure case %s: %s suppression hash(es) published; copies of %d earlier case(s) deleted "
             "(%d export(s), %d bundle(s))", case.case_id, len(fx.events) if fx.events else "no",
             len(deleted), case.outcome["earlier_copies_deleted"]["exports"],
             case.outcome["earlier_copies_deleted"]["bundles"])
    return fx


# -- 1. the suppression list -------------------------------------------------------------------
def _suppress(case: Case, identifiers: Mapping[IdentifierType, str], settings: Settings, now: datetime) -> Effects:
    assert case.outcome is not None
    try:
        key = configured_key(settings)
    except ConfigError as exc:  # a key file gone bad: said on the case, never a stuck batch
        log.error("erasure case %s: suppression key unusable (%s); nothing published", case.case_id,
                  type(exc).__name__)
        case.outcome["suppression"] = f"not published: the suppression key cannot be used ({exc})"[:500]
        return Effects()
    if key is None:
        case.outcome["suppression"] = NO_KEY
        return Effects()
    fx = Effects()
    for kind, normal in sorted(identifiers.items()):
        digest = hash_normal(key, kind, normal)
        fx.events.append((topics.SUPPRESSIONS, list_key(case.controller, digest), SubjectSuppressed(
            hash=digest, identifier_type=kind, key_id=key.key_id, controller=case.controller,
            case_id=case.case_id, erased_at=case.completed_at or now)))
    case.outcome["suppression"] = {"published": len(fx.events), "key_id": key.key_id,
                                   "identifier_types": sorted(str(k) for k in identifiers)}
    return fx


# -- 2. dsrflow's own copies -------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class _Copy:
    case_id: uuid.UUID
    right: str
    systems: tuple[str, ...]


def _loads(value: Any) -> Any:
    return orjson.loads(value) if isinstance(value, str | bytes) else value


def _pseudonymised(secret: bytes, kind: IdentifierType, value: str) -> str:
    """An identifier as a pseudonymised closed case keeps it (Case.pseudonymise, keyed)."""
    return "hmac-sha256:" + hmac.new(secret, f"{kind}:{value}".encode(), hashlib.sha256).hexdigest()


async def _earlier_copies(conn: asyncpg.Connection, case: Case, identifiers: Mapping[IdentifierType, str],
                          settings: Settings) -> list[_Copy]:
    """The same controller's access and portability cases received before this erasure and finished,
    whose subject shares a verified identifier with it (in normal form; a pseudonymised case by its
    keyed hash, when ``DSRFLOW_PSEUDONYM_KEY`` is set)."""
    if not identifiers:
        return []
    pseudonym = settings.pseudonym_key
    secret = pseudonym.get_secret_value().encode() if pseudonym is not None else None
    wanted: dict[IdentifierType, set[str]] = {
        k: {v, *([_pseudonymised(secret, k, v)] if secret else [])} for k, v in identifiers.items()}
    rows = await conn.fetch(
        """SELECT case_id, right_name, subject, verification, verified, jurisdiction FROM cases
           WHERE controller = $1 AND scope = 'subject' AND right_name = ANY($2::text[]) AND case_id <> $3
             AND completed_at IS NOT NULL AND received_at <= $4
             AND EXISTS (SELECT 1 FROM jsonb_each_text(subject) e WHERE e.value = ANY($5::text[]))
           ORDER BY received_at, case_id""",
        case.controller, list(_COPIES), case.case_id, case.received_at,
        sorted({v for values in wanted.values() for v in values}))
    found: list[uuid.UUID] = []
    rights: dict[uuid.UUID, str] = {}
    for r in rows:
        subject: dict[str, str] = _loads(r["subject"]) or {}
        verification = _loads(r["verification"])
        verified = ({v["identifier"] for v in verification} if verification is not None
                    else set(subject) if r["verified"] else set())
        region = region_of(r["jurisdiction"])
        agree = disagree = 0  # the all-agree rule: one shared identifier is not the same person
        for kind, values in wanted.items():
            theirs = subject.get(str(kind))
            if theirs is None or str(kind) not in verified:
                continue
            try:
                normal = theirs if theirs.startswith("hmac-sha256:") else normalise_lenient(kind, theirs,
                                                                                               region=region)
            except ValueError:
                disagree += 1
                continue
            if normal in values:
                agree += 1
            else:
                disagree += 1
        if agree and not disagree:
            found.append(r["case_id"])
            rights[r["case_id"]] = r["right_name"]
    if not found:
        return []
    systems: dict[uuid.UUID, tuple[str, ...]] = {
        r["case_id"]: tuple(sorted(r["systems"])) for r in await conn.fetch(
            "SELECT case_id, array_agg(DISTINCT system) AS systems FROM tasks WHERE case_id = ANY($1::uuid[]) "
            "GROUP BY case_id", found)}
    return [_Copy(c, rights[c], systems.get(c, ())) for c in found]


def _delete(exports: ExportStore, controller: str, copies: Sequence[_Copy]) -> list[dict[str, Any]]:
    """Delete each case's exports (every system's part, and the layout before per-system parts)
    and its bundle. File I/O: run in a thread."""
    out: list[dict[str, Any]] = []
    for c in copies:
        prefixes = [system_case_prefix(s, c.case_id, controller) for s in c.systems]
        prefixes.append(f"{controller_prefix(controller)}cases/{c.case_id}/")  # before per-system parts
        try:
            removed = sum(exports.delete_prefix(p) for p in prefixes)
            bundles = int(exports.delete(bundle_key(c.case_id, controller)))
        except (OSError, ExportError) as exc:  # said on the case for the DPO; the erasure itself stands
            log.error("erasure: copies of case %s not deleted (%s)", c.case_id, type(exc).__name__)
            out.append({"case_id": str(c.case_id), "right": c.right, "exports": 0, "bundles": 0,
                        "error": f"not deleted: {type(exc).__name__}"})
            continue
        out.append({"case_id": str(c.case_id), "right": c.right, "exports": removed, "bundles": bundles})
    return out
