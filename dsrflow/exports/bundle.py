"""The access bundle: one zip per access case, built from every system's export.

Layout of ``bundles/<case_id>.zip``::

    manifest.json       case, request, generated_at, one entry per file, systems without data
    <system>.json       one per system that exported (``<system>-<n>.json`` if it exported several)

Each part's sha256 is checked against its receipt before it goes in, so a bundle
never carries an export that changed after the worker reported it. Identical input
gives a byte-identical zip (entries in a fixed order, timestamps from
``generated_at``), so only ``generated_at`` distinguishes two builds of the same case.
"""

from __future__ import annotations

import hashlib
import io
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import PurePosixPath
from typing import Any
from uuid import UUID

import orjson

from ..events import Artifact
from .store import ArtifactNotFound, ExportError, ExportStore, bundle_key

__all__ = ["BUNDLE_FORMAT", "MANIFEST", "BundleError", "build_bundle", "read_bundle"]

BUNDLE_FORMAT = "dsrflow.bundle.v1"
MANIFEST = "manifest.json"
MEDIA_TYPE = "application/zip"

_EXTENSIONS = {"application/json": ".json", "text/csv": ".csv", "application/zip": ".zip", "text/plain": ".txt"}


class BundleError(ExportError):
    """A part is missing from the export store or does not match its receipt's checksum."""


def _extension(artifact: Artifact) -> str:
    if artifact.media_type in _EXTENSIONS:
        return _EXTENSIONS[artifact.media_type]
    return PurePosixPath(artifact.ref).suffix or ".bin"


def _file_names(parts: Sequence[tuple[str, Artifact]]) -> list[tuple[str, str, Artifact]]:
    """(name in zip, system, artifact), ordered by system; a system's own parts keep their order
    (the order of its receipt's artifacts)."""
    ordered = sorted(parts, key=lambda p: p[0])
    per_system: dict[str, int] = {}
    for system, _ in ordered:
        per_system[system] = per_system.get(system, 0) + 1
    out: list[tuple[str, str, Artifact]] = []
    seen: dict[str, int] = {}
    for system, artifact in ordered:
        seen[system] = seen.get(system, 0) + 1
        stem = system if per_system[system] == 1 else f"{system}-{seen[system]}"
        out.append((stem + _extension(artifact), system, artifact))
    return out


def build_bundle(
    store: ExportStore,
    *,
    case_id: UUID | str,
    request_id: str,
    parts: Sequence[tuple[str, Artifact]],
    systems_without_data: Iterable[str] = (),
    systems_not_exported: Mapping[str, str] | None = None,
    generated_at: datetime | None = None,
    controller: str = "default",
) -> Artifact:
    """Build and store the access bundle of a case; return its claim check.

    ``parts`` are ``(system, artifact)`` pairs from the receipts of the case's export tasks.
    ``systems_without_data`` names systems that were asked but found nothing (not_found);
    they are listed in the manifest so the subject sees they were searched.
    ``systems_not_exported`` maps systems that hold data but whose part is not in the bundle to
    why (handled by a person, identifiers that point to different people, refused): the manifest
    says so rather than let the bundle look complete. Raises
    :class:`BundleError` when a part is missing or its sha256 or size differs from the receipt.
    """
    generated_at = (generated_at or datetime.now(UTC)).astimezone(UTC)
    names = _file_names(parts)
    with_data = {system for system, _ in parts}
    without = sorted(set(systems_without_data) - with_data)

    files: list[tuple[str, bytes]] = []
    entries: list[dict[str, Any]] = []
    for name, system, artifact in names:
        try:
            data = store.get(artifact.ref)
        except ArtifactNotFound:
            raise BundleError(f"export of system {system!r} is missing: {artifact.ref}") from None
        digest = hashlib.sha256(data).hexdigest()
        if digest != artifact.sha256 or len(data) != artifact.size:
            raise BundleError(f"export of system {system!r} does not match its receipt: {artifact.ref}")
        files.append((name, data))
        entries.append(
            {
                "name": name,
                "system": system,
                "records": artifact.records,
                "sha256": digest,
                "size": len(data),
                "media_type": artifact.media_type,
            }
        )

    manifest = {
        "format": BUNDLE_FORMAT,
        "case_id": str(case_id),
        "request_id": request_id,
        "generated_at": generated_at.isoformat(),
        "records": sum(e["records"] for e in entries),
        "files": entries,
        "systems_without_data": without,
        "systems_not_in_bundle": dict(sorted((systems_not_exported or {}).items())),
    }
    manifest_bytes = orjson.dumps(manifest, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n"

    # Zip timestamps have no zone and start in 1980; the manifest keeps the exact time.
    stamp = max(generated_at, datetime(1980, 1, 1, tzinfo=UTC)).timetuple()[:6]
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in [(MANIFEST, manifest_bytes), *files]:
            info = zipfile.ZipInfo(name, date_time=stamp)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o600 << 16
            info.create_system = 3  # unix, whatever builds it, so the bytes do not depend on the host
            zf.writestr(info, data)
    return store.put(bundle_key(case_id, controller), buf.getvalue(), records=manifest["records"],
                     media_type=MEDIA_TYPE)


def read_bundle(data: bytes) -> tuple[dict[str, Any], dict[str, bytes]]:
    """Open a bundle and check every file against the manifest.

    Returns ``(manifest, {name: bytes})``; raises :class:`BundleError` if a file is missing,
    unlisted, or its sha256 differs.
    """
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            contents = {name: zf.read(name) for name in zf.namelist()}
    except zipfile.BadZipFile as exc:
        raise BundleError(f"not a zip file: {exc}") from None
    if MANIFEST not in contents:
        raise BundleError("bundle has no manifest.json")
    manifest: dict[str, Any] = orjson.loads(contents.pop(MANIFEST))
    listed = {e["name"]: e for e in manifest.get("files", [])}
    if set(listed) != set(contents):
        raise BundleError("bundle files differ from its manifest")
    for name, entry in listed.items():
        if hashlib.sha256(contents[name]).hexdigest() != entry["sha256"]:
            raise BundleError(f"{name} does not match the manifest's sha256")
    return manifest, contents
