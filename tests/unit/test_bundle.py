"""Export store (memory and local, one suite) and the access bundle."""

from __future__ import annotations

import codecs
import csv
import hashlib
import html
import io
import tempfile
import uuid
import zipfile
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest

from dsrflow.events import Artifact
from dsrflow.exports import (
    BUNDLE_FORMAT,
    ArtifactNotFound,
    BundleError,
    ExportStore,
    InvalidKey,
    LocalExportStore,
    MemoryExportStore,
    Withheld,
    build_bundle,
    bundle_key,
    export_key,
    export_rows,
    read_bundle,
    render_csv,
    system_prefix,
)
from dsrflow.registry import Retention, SystemDeclaration

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


def declarations() -> dict[str, SystemDeclaration]:
    return {
        "crm": SystemDeclaration(
            name="crm", identifier_types=("email",), actions=("export_all",), categories=("user.contact.email",),
            purposes=("essential.service",), recipients=("Zalo OA",), processors=("Viettel IDC",),
            storage_country="VN", description="Quản lý khách hàng",
            retention=(Retention(category="user.contact", legal_basis="Luật Kế toán 88/2015 Art 41",
                                 period=timedelta(days=3650)),)),
        "billing": SystemDeclaration(name="billing", identifier_types=("email",), actions=("export_all",),
                                     categories=("user.financial",), storage_country="SG"),
    }


def test_bundle_manifest_matches_files(store: ExportStore) -> None:
    parts = put_parts(store)
    art = build_bundle(
        store, case_id=CASE, request_id="req-42", parts=parts, systems_without_data=["marketing"], generated_at=WHEN
    )
    assert art.ref == f"bundles/{CASE}.zip" and art.media_type == "application/zip" and art.records == 3
    data = store.get(art.ref)
    assert hashlib.sha256(data).hexdigest() == art.sha256 and len(data) == art.size

    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        assert zf.namelist() == ["manifest.json", "index.html", "billing.json", "billing.csv", "crm.json", "crm.csv"]
        manifest = orjson.loads(zf.read("manifest.json"))
        assert {e["name"] for e in manifest["files"]} == set(zf.namelist()) - {"manifest.json"}
        for entry in manifest["files"]:  # every file but the manifest itself
            body = zf.read(entry["name"])
            assert entry["sha256"] == hashlib.sha256(body).hexdigest()
            assert entry["size"] == len(body)
        assert zf.read("crm.json") == store.get(parts[0][1].ref)

    assert manifest["format"] == BUNDLE_FORMAT == "dsrflow.bundle.v2"
    assert manifest["case_id"] == str(CASE) and manifest["request_id"] == "req-42"
    assert manifest["right"] == "access" and manifest["controller"] == "default"
    assert manifest["generated_at"] == WHEN.isoformat()
    assert [(e["name"], e["system"], e["kind"], e["records"]) for e in manifest["files"]] == [
        ("index.html", None, "index", 0),
        ("billing.json", "billing", "export", 2),
        ("billing.csv", "billing", "csv", 2),
        ("crm.json", "crm", "export", 1),
        ("crm.csv", "crm", "csv", 1),
    ]
    assert [(s["name"], s["records"], s["exported"]) for s in manifest["systems"]] == [
        ("billing", 2, True), ("crm", 1, True), ("marketing", 0, False)]
    assert manifest["systems_without_data"] == ["marketing"]
    assert manifest["withheld"] == [{"system": "marketing", "reason": "not_found"}]
    assert read_bundle(data)[0] == manifest


def test_manifest_says_what_each_system_declares_and_what_was_withheld(store: ExportStore) -> None:
    withheld = [
        Withheld("payroll", "retained", retained=({"category": "user.financial", "records": 3,
                                                   "legal_basis": "Luật Kế toán 88/2015", "retain_until": None},)),
        Withheld("support", "manual", "sent by post"),
        Withheld("zalo", "conflict"),
    ]
    manifest, files = read_bundle(store.get(build_bundle(
        store, case_id=CASE, request_id="r", parts=put_parts(store), right="portability", controller="acme",
        declarations=declarations(), systems_without_data=["marketing"], withheld=withheld,
        systems_not_exported={"auth": "failed", "zalo": "refused"}, generated_at=WHEN).ref))
    assert manifest["right"] == "portability" and manifest["controller"] == "acme"
    crm = next(s for s in manifest["systems"] if s["name"] == "crm")
    assert crm == {
        "name": "crm", "records": 1, "files": ["crm.json", "crm.csv"], "exported": True, "declared": True,
        "description": "Quản lý khách hàng", "categories": ["user.contact.email"],
        "purposes": ["essential.service"], "recipients": ["Zalo OA"], "processors": ["Viettel IDC"],
        "storage_country": "VN",
        "retention": [{"category": "user.contact", "legal_basis": "Luật Kế toán 88/2015 Art 41", "period": "P10Y"}],
    }
    billing = next(s for s in manifest["systems"] if s["name"] == "billing")
    assert billing["storage_country"] == "SG" and billing["purposes"] == []
    assert next(s for s in manifest["systems"] if s["name"] == "support") == {
        "name": "support", "records": 0, "files": [], "exported": False, "withheld": "manual", "declared": False}
    assert manifest["withheld"] == [
        {"system": "auth", "reason": "failed"},
        {"system": "marketing", "reason": "not_found"},
        {"system": "payroll", "reason": "retained", "retained": [
            {"category": "user.financial", "legal_basis": "Luật Kế toán 88/2015", "records": 3,
             "retain_until": None}]},
        {"system": "support", "reason": "manual", "detail": "sent by post"},
        {"system": "zalo", "reason": "conflict"},  # the structured reason wins over the short one
    ]
    assert manifest["systems_not_in_bundle"] == {"auth": "failed", "payroll": "retained",
                                                 "support": "manual, sent by post", "zalo": "conflict"}
    page = files["index.html"].decode()
    for text in ("Viettel IDC", "Luật Kế toán 88/2015", "sent by post", "Quyền nhận và chuyển dữ liệu cá nhân",
                 "Right to data portability", "Các thông tin định danh trỏ tới những người khác nhau"):
        assert text in page


def test_bundle_is_deterministic(store: ExportStore) -> None:
    parts = put_parts(store)
    a = store.get(build_bundle(store, case_id=CASE, request_id="r", parts=parts, generated_at=WHEN,
                               declarations=declarations()).ref)
    b = store.get(build_bundle(store, case_id=CASE, request_id="r", parts=parts[::-1], generated_at=WHEN,
                               declarations=dict(reversed(declarations().items()))).ref)
    assert a == b
    later_at = datetime(2025, 7, 2, tzinfo=UTC)
    later = build_bundle(store, case_id=CASE, request_id="r", parts=parts, generated_at=later_at,
                         declarations=declarations())
    manifest_a, files_a = read_bundle(a)
    manifest_later, files_later = read_bundle(store.get(later.ref))
    # only generated_at differs: on the page (and so the page's checksum) and in the manifest
    page_a, page_later = files_a.pop("index.html"), files_later.pop("index.html")
    assert files_a == files_later
    assert page_a.replace(WHEN.isoformat().encode(), later_at.isoformat().encode()) == page_later
    for m in (manifest_a, manifest_later):
        del m["generated_at"]
        m["files"] = [f for f in m["files"] if f["name"] != "index.html"]
    assert manifest_a == manifest_later


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
    assert sorted(files) == ["auth.csv", "auth.json", "crm-1.csv", "crm-1.json", "crm-2.csv", "crm-2.json",
                             "index.html"]
    assert files["crm-1.json"] == b"[1]" and files["crm-2.json"] == b"[2]"
    assert [e["records"] for e in manifest["files"] if e["kind"] == "export"] == [0, 1, 1]
    assert manifest["systems_without_data"] == ["zalo"]  # a system with data is never listed as without
    assert files["crm-2.csv"].decode("utf-8-sig") == "value\r\n2\r\n"
    assert files["auth.csv"].decode("utf-8-sig") == "\r\n"  # no records: a header without columns


def test_an_export_that_is_not_json_goes_in_as_it_is(store: ExportStore) -> None:
    parts = [("crm", store.put("cases/c/crm/t-1.csv", b"a,b\r\n1,2\r\n", records=1, media_type="text/csv")),
             ("auth", store.put("cases/c/auth/t-1.json", b"{not json", records=1))]
    manifest, files = read_bundle(store.get(build_bundle(store, case_id="c", request_id="r", parts=parts).ref))
    assert sorted(files) == ["auth.json", "crm.csv", "index.html"]
    assert files["crm.csv"] == b"a,b\r\n1,2\r\n"
    assert "không phải JSON" in files["index.html"].decode()


def read_csv(data: bytes) -> list[dict[str, str]]:
    assert data.startswith(codecs.BOM_UTF8)  # Excel reads UTF-8 (Vietnamese) only with it
    return list(csv.DictReader(io.StringIO(data.decode("utf-8-sig"), newline="")))


def test_csv_keeps_every_value(store: ExportStore) -> None:
    doc = {
        "exported_by": "crm 2.1",
        "contacts": [
            {"id": 7, "full_name": "Trần Thị Ánh Tuyết", "vip": True, "note": None,
             "address": {"street": "12 Lý Thường Kiệt", "city": "Hà Nội", "geo": {"lat": 21.02, "lng": 105.85}},
             "phones": ["+84 912 345 678", "+84 24 3825 1234"], "tags": [], "meta": {},
             "bio": 'dòng 1\ndòng 2, "trích dẫn"', "table": "kept", "address.city": "colliding key"},
        ],
        "orders": [{"id": 1, "total_vnd": 1_250_000.5, "items": [{"sku": "A", "qty": 2}]}, "stray value"],
    }
    art = store.put("cases/c/crm/t-1.json", orjson.dumps(doc), records=3)
    _, files = read_bundle(store.get(build_bundle(store, case_id="c", request_id="r", parts=[("crm", art)]).ref))
    rows = read_csv(files["crm.csv"])
    assert list(rows[0]) == ["table", "exported_by", "id", "full_name", "vip", "note", "address.street",
                             "address.city", "address.geo.lat", "address.geo.lng", "phones", "tags", "meta", "bio",
                             "table_", "address.city_", "total_vnd", "items", "value"]
    assert [r["table"] for r in rows] == ["", "contacts", "orders", "orders"]
    assert rows[0]["exported_by"] == "crm 2.1"
    lan = rows[1]
    assert lan["full_name"] == "Trần Thị Ánh Tuyết" and lan["address.city"] == "Hà Nội"
    assert lan["bio"] == 'dòng 1\ndòng 2, "trích dẫn"'
    assert lan["table_"] == "kept" and lan["address.city_"] == "colliding key"
    assert orjson.loads(lan["phones"]) == doc["contacts"][0]["phones"]  # type: ignore[index]
    assert (orjson.loads(lan["tags"]), orjson.loads(lan["meta"]), lan["note"]) == ([], {}, "")
    assert orjson.loads(lan["vip"]) is True and orjson.loads(lan["id"]) == 7
    assert float(lan["address.geo.lat"]) == 21.02
    assert orjson.loads(rows[2]["items"]) == [{"sku": "A", "qty": 2}] and float(rows[2]["total_vnd"]) == 1250000.5
    assert rows[3]["value"] == "stray value"


def test_export_rows_of_lists_and_scalars() -> None:
    assert export_rows([{"a": 1}, {"b": {"c": "x"}}]) == (["a", "b.c"], [{"a": 1}, {"b.c": "x"}])
    assert export_rows("just text") == (["value"], [{"value": "just text"}])
    assert render_csv(["a"], [{"a": "Đ"}]) == codecs.BOM_UTF8 + "a\r\nĐ\r\n".encode()


HOSTILE = '<script>alert("x")</script><img src=x onerror=alert(1)>'


def test_index_page_escapes_exported_text(store: ExportStore) -> None:
    doc = {"contacts": [{"full_name": HOSTILE, HOSTILE: "key", "note": "a & b"}]}
    parts = [("crm", store.put(f"systems/crm/cases/{CASE}/t-1.json", orjson.dumps(doc), records=1))]
    _, files = read_bundle(store.get(build_bundle(
        store, case_id=CASE, request_id='r"><script>x</script>', parts=parts, generated_at=WHEN,
        withheld=[Withheld("support", "manual", detail=HOSTILE)]).ref))
    page = files["index.html"].decode()
    assert "<script" not in page and "<img" not in page
    assert html.escape(HOSTILE) in page and "a &amp; b" in page
    assert page.count(html.escape(HOSTILE)) == 3  # the value, the column named by a key, the note
    assert '<html lang="vi">' in page and "Content-Security-Policy" in page
    assert "http://" not in page and "https://" not in page  # self-contained
    vi, en = page.index("Dữ liệu cá nhân của bạn"), page.index("Your personal data</span>")
    assert vi < en  # Vietnamese first
    manifest, _ = read_bundle(store.get(bundle_key(CASE)))
    for entry in manifest["files"]:
        if entry["name"] != "index.html":
            assert entry["sha256"] in page  # how to verify: every other file's checksum is on the page


def test_read_bundle_detects_tampering(store: ExportStore) -> None:
    art = build_bundle(store, case_id=CASE, request_id="r", parts=put_parts(store), generated_at=WHEN)
    original = store.get(art.ref)

    def rewrite(change: dict[str, bytes | None]) -> bytes:
        buf = io.BytesIO()
        with zipfile.ZipFile(io.BytesIO(original)) as src, zipfile.ZipFile(buf, "w") as dst:
            for name in src.namelist():
                body = change.get(name, src.read(name))
                if body is not None:
                    dst.writestr(name, body)
            for name, body in change.items():
                if name not in src.namelist() and body is not None:
                    dst.writestr(name, body)
        return buf.getvalue()

    assert read_bundle(rewrite({}))[1] == read_bundle(original)[1]
    for change, message in [
        ({"crm.json": b"{}"}, "crm.json does not match"),
        ({"crm.csv": b"\xef\xbb\xbffull_name\r\nsomeone else\r\n"}, "crm.csv does not match"),
        ({"index.html": b"<p>nothing here</p>"}, "index.html does not match"),
        ({"billing.json": None}, "differ from its manifest"),
        ({"extra.json": b"[]"}, "differ from its manifest"),
        ({"manifest.json": None}, "no manifest"),
        ({"manifest.json": b"[1]"}, "not a manifest"),
    ]:
        with pytest.raises(BundleError, match=message):
            read_bundle(rewrite(change))
    with pytest.raises(BundleError):
        read_bundle(b"not a zip")


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


def test_no_export_replaces_the_manifest_the_page_or_another_export(store: ExportStore) -> None:
    page = b"<script>alert(1)</script>"
    parts = [("manifest", store.put("systems/manifest/cases/c/t-1.json", b'{"forged": true}', records=1)),
             ("index", store.put("systems/index/cases/c/t-1.html", page, records=1, media_type="text/html")),
             ("crm", store.put("systems/crm/cases/c/t-1.json", b'[{"a": 1}]', records=1)),
             ("crm", store.put("systems/crm/cases/c/t-2.json", b'[{"a": 2}]', records=1)),
             ("crm-1", store.put("systems/crm-1/cases/c/t-1.json", b'[{"a": 3}]', records=1))]
    art = build_bundle(store, case_id="c", request_id="r", parts=parts)
    manifest, files = read_bundle(store.get(art.ref))  # refuses a bundle with a name twice
    assert manifest["format"] == "dsrflow.bundle.v2"
    assert page not in files["index.html"]  # the page is dsrflow's, the system's html is beside it
    exported = {f["name"]: f["system"] for f in manifest["files"] if f["kind"] == "export"}
    assert len(exported) == 5 and "manifest.json" not in exported and "index.html" not in exported
    assert sorted(exported.values()) == ["crm", "crm", "crm-1", "index", "manifest"]
    assert {orjson.loads(files[n])[0]["a"] for n, s in exported.items() if s.startswith("crm")} == {1, 2, 3}


def test_a_csv_cell_that_looks_like_a_formula_stays_text(store: ExportStore) -> None:
    doc = [{"note": "=HYPERLINK(\"http://x\",\"click\")", "=cmd": "+1", "plain": "Hà Nội", "n": -5}]
    art = store.put("systems/crm/cases/c/t-1.json", orjson.dumps(doc), records=1)
    _, files = read_bundle(store.get(build_bundle(store, case_id="c", request_id="r", parts=[("crm", art)]).ref))
    [row] = read_csv(files["crm.csv"])
    assert row["note"] == "'=HYPERLINK(\"http://x\",\"click\")" and row["'=cmd"] == "'+1"
    assert row["plain"] == "Hà Nội" and row["n"] == "-5"  # a number is a number, not text
    assert orjson.loads(files["crm.json"]) == doc  # the JSON keeps the exact value


def test_read_bundle_refuses_what_is_not_a_dsrflow_bundle(store: ExportStore) -> None:
    def zipped(entries: dict[str, bytes]) -> bytes:
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as zf:
            for name, body in entries.items():
                zf.writestr(name, body)
        return buf.getvalue()

    def manifest_of(files: dict[str, bytes], fmt: str | None = "dsrflow.bundle.v2") -> bytes:
        doc: dict[str, Any] = {"files": [{"name": n, "sha256": hashlib.sha256(b).hexdigest(), "size": len(b)}
                                         for n, b in files.items()]}
        if fmt is not None:
            doc["format"] = fmt
        return orjson.dumps(doc)

    files = {"index.html": b"<p>x</p>", "crm.json": b"[]"}
    assert read_bundle(zipped({"manifest.json": manifest_of(files), **files}))[0]["format"] == "dsrflow.bundle.v2"
    for entries, message in [
        ({"manifest.json": manifest_of({})}, "not a dsrflow bundle"),  # no index.html
        ({"manifest.json": manifest_of(files, fmt=None), **files}, "not a dsrflow bundle"),
        ({"manifest.json": manifest_of({"../x": b"1"}), "../x": b"1"}, "outside its top folder"),
    ]:
        with pytest.raises(BundleError, match=message):
            read_bundle(zipped(entries))
