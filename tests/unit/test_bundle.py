"""Export store (memory and local, one suite) and the access bundle."""

from __future__ import annotations

import hashlib
import io
import tempfile
import uuid
import zipfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest

from dsrflow.events import Artifact
from dsrflow.exports import (
    ArtifactNotFound,
    BundleError,
    ExportStore,
    InvalidKey,
    LocalExportStore,
    MemoryExportStore,
    build_bundle,
    bundle_key,
    export_key,
    read_bundle,
    system_prefix,
)

CASE = uuid.UUID("0b7c6f0e-3a56-4e0b-9d59-2f0f8f1c2a10")
WHEN = datetime(2025, 7, 1, 9, 30, tzinfo=UTC)


@pytest.fixture(params=["memory", "local"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ExportStore]:
    yield MemoryExportStore() if request.param == "memory" else LocalExportStore(tmp_path / "exports")


# -- the store: one suite for every implementation ---------------------------------------


def test_put_returns_claim_check(store: ExportStore) -> None:
    data = orjson.dumps({"full_name": "Trần Văn Hùng"})
    art = store.put("cases/c1/crm/t1-1.json", data, records=1)
    assert art == Artifact(
        ref="cases/c1/crm/t1-1.json", sha256=hashlib.sha256(data).hexdigest(), size=len(data), records=1
    )
    assert store.get(art.ref) == data and store.exists(art.ref)


def test_put_replaces(store: ExportStore) -> None:
    store.put("a/b.json", b"1", records=1)
    store.put("a/b.json", b"22", records=2)
    assert store.get("a/b.json") == b"22"


def test_missing_key(store: ExportStore) -> None:
    assert not store.exists("nope.json")
    with pytest.raises(ArtifactNotFound):
        store.get("nope.json")
    with pytest.raises(KeyError):  # ArtifactNotFound is also a KeyError
        store.get("nope.json")


def test_delete_is_idempotent(store: ExportStore) -> None:
    store.put("x/y.json", b"{}", records=0)
    assert store.delete("x/y.json") is True
    assert store.delete("x/y.json") is False
    assert not store.exists("x/y.json")


@pytest.mark.parametrize(
    "key",
    ["", "/etc/passwd", "../x.json", "a/../../x.json", "a//b.json", "a/./b.json", ".hidden", "a\\b", "a/b/", "é.json"],
)
def test_keys_that_escape_or_are_malformed_are_refused(store: ExportStore, key: str) -> None:
    with pytest.raises(InvalidKey):
        store.put(key, b"x", records=0)
    with pytest.raises(InvalidKey):
        store.get(key)


def test_key_convention() -> None:
    task = uuid.UUID("5f1d3c1e-0000-4000-8000-000000000001")
    digest = hashlib.sha256(b"{}").hexdigest()
    assert export_key(CASE, "crm", task, 2, digest=digest) == f"systems/crm/cases/{CASE}/{task}-2-{digest[:16]}.json"
    assert (export_key(CASE, "crm", task, 2, digest=digest, part=3)
            == f"systems/crm/cases/{CASE}/{task}-2-3-{digest[:16]}.json")
    assert (export_key(CASE, "crm", task, 2, digest=digest, controller="acme")
            == f"controllers/acme/systems/crm/cases/{CASE}/{task}-2-{digest[:16]}.json")
    assert bundle_key(CASE) == f"bundles/{CASE}.zip"


@pytest.mark.parametrize("make", [MemoryExportStore, lambda: LocalExportStore(tempfile.mkdtemp())])
def test_a_systems_view_of_the_store_reaches_its_own_part_only(make: Any) -> None:
    store = make()
    theirs = store.put(f"{system_prefix('billing')}cases/c/t-1.json", b"[1]", records=1)
    crm = store.scoped(system_prefix("crm"))
    mine = crm.put(f"{system_prefix('crm')}cases/c/t-1.json", b"[2]", records=1)
    assert store.get(mine.ref) == b"[2]" and crm.get(mine.ref) == b"[2]"
    for attempt in (lambda: crm.get(theirs.ref), lambda: crm.put(theirs.ref, b"x", records=0),
                    lambda: crm.delete(theirs.ref), lambda: crm.exists(theirs.ref), lambda: crm.path(theirs.ref)):
        with pytest.raises(InvalidKey, match="outside this system's part"):
            attempt()
    assert crm.delete_prefix("systems/") == 1  # its own only
    assert store.get(theirs.ref) == b"[1]" and not store.exists(mine.ref)


def test_local_store_writes_atomically_and_privately(tmp_path: Path) -> None:
    store = LocalExportStore(tmp_path)
    store.put("cases/c/s/t-1.json", b"{}", records=0)
    path = store.path("cases/c/s/t-1.json")
    assert path == tmp_path.resolve() / "cases/c/s/t-1.json" and path.read_bytes() == b"{}"
    assert path.stat().st_mode & 0o077 == 0
    assert [p.name for p in path.parent.iterdir()] == ["t-1.json"]  # no temporary file left behind


def test_local_store_refuses_symlink_out_of_root(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    root = tmp_path / "root"
    root.mkdir()
    (root / "link").symlink_to(outside)
    with pytest.raises(InvalidKey):
        LocalExportStore(root).put("link/x.json", b"x", records=0)
    assert not (outside / "x.json").exists()


def test_memory_store_has_no_path() -> None:
    assert MemoryExportStore().path("a.json") is None


# -- the bundle --------------------------------------------------------------------------


def put_parts(store: ExportStore) -> list[tuple[str, Artifact]]:
    crm = orjson.dumps({"contacts": [{"full_name": "Nguyễn Thị Lan", "email": "lan.nguyen@example.vn"}]})
    billing = orjson.dumps({"customers": [{"full_name": "Nguyễn Thị Lan"}], "invoices": [{"amount_vnd": 1_250_000}]})
    return [
        ("crm", store.put(f"cases/{CASE}/crm/t1-1.json", crm, records=1)),
        ("billing", store.put(f"cases/{CASE}/billing/t2-1.json", billing, records=2)),
    ]


def test_bundle_manifest_matches_files(store: ExportStore) -> None:
    parts = put_parts(store)
    art = build_bundle(
        store, case_id=CASE, request_id="req-42", parts=parts, systems_without_data=["marketing"], generated_at=WHEN
    )
    assert art.ref == f"bundles/{CASE}.zip" and art.media_type == "application/zip" and art.records == 3
    data = store.get(art.ref)
    assert hashlib.sha256(data).hexdigest() == art.sha256 and len(data) == art.size

    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        assert zf.namelist() == ["manifest.json", "billing.json", "crm.json"]
        manifest = orjson.loads(zf.read("manifest.json"))
        for entry in manifest["files"]:
            body = zf.read(entry["name"])
            assert entry["sha256"] == hashlib.sha256(body).hexdigest()
            assert entry["size"] == len(body)
        assert zf.read("crm.json") == store.get(parts[0][1].ref)

    assert manifest["case_id"] == str(CASE) and manifest["request_id"] == "req-42"
    assert manifest["generated_at"] == WHEN.isoformat()
    assert [(e["name"], e["system"], e["records"]) for e in manifest["files"]] == [
        ("billing.json", "billing", 2),
        ("crm.json", "crm", 1),
    ]
    assert manifest["systems_without_data"] == ["marketing"]
    assert read_bundle(data)[0] == manifest


def test_bundle_is_deterministic(store: ExportStore) -> None:
    parts = put_parts(store)
    a = store.get(build_bundle(store, case_id=CASE, request_id="r", parts=parts, generated_at=WHEN).ref)
    b = store.get(build_bundle(store, case_id=CASE, request_id="r", parts=parts[::-1], generated_at=WHEN).ref)
    assert a == b
    later = build_bundle(
        store, case_id=CASE, request_id="r", parts=parts, generated_at=datetime(2025, 7, 2, tzinfo=UTC)
    )
    _, files_a = read_bundle(a)
    _, files_later = read_bundle(store.get(later.ref))
    assert files_a == files_later  # only generated_at differs


def test_system_with_several_exports_and_empty_export(store: ExportStore) -> None:
    parts = [
        ("crm", store.put("cases/c/crm/t-1.json", b"[1]", records=1)),
        ("crm", store.put("cases/c/crm/t-1-2.json", b"[2]", records=1)),
        ("auth", store.put("cases/c/auth/t-1.json", b"[]", records=0)),
    ]
    manifest, files = read_bundle(
        store.get(
            build_bundle(store, case_id="c", request_id="r", parts=parts, systems_without_data=["crm", "zalo"]).ref
        )
    )
    assert sorted(files) == ["auth.json", "crm-1.json", "crm-2.json"]
    assert files["crm-1.json"] == b"[1]" and files["crm-2.json"] == b"[2]"
    assert [e["records"] for e in manifest["files"]] == [0, 1, 1]
    assert manifest["systems_without_data"] == ["zalo"]  # a system with data is never listed as without


def test_tampered_export_is_refused(store: ExportStore) -> None:
    parts = put_parts(store)
    store.put(parts[0][1].ref, b'{"contacts": []}', records=0)  # changed after the receipt
    with pytest.raises(BundleError, match="crm"):
        build_bundle(store, case_id=CASE, request_id="r", parts=parts)
    assert not store.exists(bundle_key(CASE))


def test_missing_export_is_refused(store: ExportStore) -> None:
    parts = put_parts(store)
    store.delete(parts[1][1].ref)
    with pytest.raises(BundleError, match="missing"):
        build_bundle(store, case_id=CASE, request_id="r", parts=parts)


def test_read_bundle_detects_tampering(store: ExportStore) -> None:
    art = build_bundle(store, case_id=CASE, request_id="r", parts=put_parts(store), generated_at=WHEN)
    buf = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(store.get(art.ref))) as src, zipfile.ZipFile(buf, "w") as dst:
        for name in src.namelist():
            dst.writestr(name, b"{}" if name == "crm.json" else src.read(name))
    with pytest.raises(BundleError):
        read_bundle(buf.getvalue())
    with pytest.raises(BundleError):
        read_bundle(b"not a zip")


def test_local_store_read_errors_that_cannot_pass_are_export_errors(tmp_path: Path) -> None:
    from dsrflow.exports import ArtifactNotFound, ExportError

    store = LocalExportStore(tmp_path)
    store.put("cases/c/s/t-1.json", b"{}", records=0)
    with pytest.raises(ArtifactNotFound):  # a path through a file: nothing there
        store.get("cases/c/s/t-1.json/inner.json")
    import errno

    def denied(self: Path) -> bytes:
        raise PermissionError(errno.EACCES, "Permission denied")  # as root, chmod cannot make this happen

    def io_error(self: Path) -> bytes:
        raise OSError(errno.EIO, "Input/output error")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Path, "read_bytes", denied)
        with pytest.raises(ExportError, match="cannot be read"):
            store.get("cases/c/s/t-1.json")
        mp.setattr(Path, "read_bytes", io_error)
        with pytest.raises(OSError) as exc:  # may pass: left for the caller to retry
            store.get("cases/c/s/t-1.json")
        assert not isinstance(exc.value, ExportError)


@pytest.mark.parametrize("kind", ["local", "memory"])
def test_a_controllers_exports_are_deleted_by_prefix_and_no_one_elses(kind: str, tmp_path: Path) -> None:
    from dsrflow.exports.store import InvalidKey, controller_prefix

    store = LocalExportStore(tmp_path / "exports") if kind == "local" else MemoryExportStore()
    acme = [f"controllers/acme/cases/c1/crm/t{i}.json" for i in range(3)] + ["controllers/acme/bundles/c1.zip"]
    others = ["controllers/acme-2/cases/c2/crm/t.json", "cases/c3/crm/t.json", "bundles/c3.zip"]
    for key in acme + others:
        store.put(key, b"{}", records=0)
    assert store.delete_prefix(controller_prefix("acme")) == 4
    assert [k for k in acme if store.exists(k)] == [] and all(store.exists(k) for k in others)
    assert store.delete_prefix("controllers/acme/") == 0
    for bad in ("controllers/acme", "../", "/"):
        with pytest.raises(InvalidKey):
            store.delete_prefix(bad)
