"""The access bundle: one zip per access or portability case, built from every system's export.

Layout of ``bundles/<case_id>.zip``::

    manifest.json   case, request, right, controller, generated_at, the systems (what each declares:
                    categories, purposes, recipients, processors, storage country, retention) with
                    their record counts, every other file's sha256 and size, what was withheld and why
    index.html      the same for a person, in Vietnamese and English, one table per export; opens in
                    any browser, offline, without JavaScript
    <system>.json   one per system that exported (``<system>-<n>.json`` if it exported several;
                    ``~<n>`` added where a name is taken: no file ever replaces another)
    <system>.csv    the same records as a table (UTF-8 with a BOM, so Excel reads Vietnamese)

Each export's sha256 is checked against its receipt before it goes in, so a bundle never carries
an export that changed after the worker reported it. Identical input gives a byte-identical zip
(entries in a fixed order, timestamps from ``generated_at``), so only ``generated_at`` (in the
manifest and the page) distinguishes two builds of the same case.

The CSV rendering of an export (:func:`export_rows`): a JSON object whose values are lists is one
row per list item with a ``table`` column naming the list (``contacts``, ``invoices``); its other
values make one row of their own; a JSON list is one row per item. Objects are flattened to
``a.b`` columns; strings go in as they are (one that starts like a spreadsheet formula, ``= + - @``,
with a leading ``'``), every other value (numbers, true/false, lists, empty objects) as its JSON
text, and null as an empty cell. The JSON file stays the authoritative, machine-readable copy:
the table loses the difference between null and an empty string, and numbers beyond a 64-bit
float's precision.
"""

from __future__ import annotations

import csv
import hashlib
import html
import io
import zipfile
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any
from uuid import UUID

import orjson

from ..events import Artifact
from .store import ArtifactNotFound, ExportError, ExportStore, bundle_key

if TYPE_CHECKING:
    from ..registry import SystemDeclaration

__all__ = [
    "BUNDLE_FORMAT",
    "INDEX",
    "MANIFEST",
    "BundleError",
    "Withheld",
    "build_bundle",
    "export_rows",
    "read_bundle",
    "render_csv",
]

BUNDLE_FORMAT = "dsrflow.bundle.v2"
MANIFEST = "manifest.json"
INDEX = "index.html"
MEDIA_TYPE = "application/zip"
CSV_MEDIA_TYPE = "text/csv"
HTML_MEDIA_TYPE = "text/html"
#: Rows shown per table on index.html; the CSV and JSON files always hold every record.
HTML_ROW_LIMIT = 2000

_EXTENSIONS = {"application/json": ".json", "text/csv": ".csv", "application/zip": ".zip", "text/plain": ".txt"}
_RESERVED = {MANIFEST, INDEX}
#: the largest file read_bundle reads (a zip bomb's file says it is larger)
_MAX_FILE = 2 * 1024**3
_BOM = "\ufeff"
TABLE_COLUMN = "table"


class BundleError(ExportError):
    """A part is missing from the export store or does not match its receipt's checksum."""


@dataclass(frozen=True, slots=True)
class Withheld:
    """A system whose data is not (all) in the bundle, and why.

    ``reason`` is one of ``not_found``, ``retained``, ``failed``, ``refused``, ``conflict``,
    ``manual``, ``skipped``, ``stalled`` (or another task status); ``detail`` is a short note (a
    person's note on a manual task); ``retained`` lists what was kept with its legal basis
    (``category``, ``records``, ``legal_basis``, ``retain_until``)."""

    system: str
    reason: str
    detail: str | None = None
    retained: tuple[Mapping[str, Any], ...] = field(default=())

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"system": self.system, "reason": self.reason}
        if self.detail:
            out["detail"] = self.detail
        if self.retained:
            out["retained"] = [dict(sorted(r.items())) for r in self.retained]
        return out


# -- file names -------------------------------------------------------------------------------


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
    # never twice the same name, nor the manifest's or the page's: a system named "manifest", or a
    # system "crm-1" beside crm's first of two exports, must not replace another file
    taken = set(_RESERVED) | {_csv_name(r) for r in _RESERVED}
    for system, artifact in ordered:
        seen[system] = seen.get(system, 0) + 1
        stem = system if per_system[system] == 1 else f"{system}-{seen[system]}"
        ext = _extension(artifact)
        name, n = stem + ext, 1
        while name in taken or _csv_name(name) in taken:
            n += 1
            name = f"{stem}~{n}{ext}"
        taken.update((name, _csv_name(name)))
        out.append((name, system, artifact))
    return out


def _csv_name(name: str) -> str:
    stem = PurePosixPath(name).stem
    return f"{stem}.csv" if not name.endswith(".csv") else f"{stem}.table.csv"


# -- JSON -> rows -----------------------------------------------------------------------------


def _flatten(value: Any, prefix: str, row: dict[str, Any]) -> None:
    if isinstance(value, dict) and value:
        for k, v in value.items():
            _flatten(v, f"{prefix}.{k}" if prefix else str(k), row)
        return
    key = prefix or "value"
    while key in row:  # "a.b" and {"a": {"b": ...}} in one record: keep both
        key += "_"
    row[key] = value


def _row(table: str | None, value: Any) -> dict[str, Any]:
    """One record as a flat row; ``table`` (None: the document has no lists) comes first, and a
    record's own ``table`` key then becomes ``table_``."""
    row: dict[str, Any] = {TABLE_COLUMN: table} if table is not None else {}
    if isinstance(value, dict) and value:
        for k, v in value.items():
            _flatten(v, str(k), row)
    else:
        _flatten(value, "value", row)
    return row


def export_rows(document: Any) -> tuple[list[str], list[dict[str, Any]]]:
    """The rows of an export (parsed JSON) as ``(columns, rows)``; see the module's docstring."""
    rows: list[dict[str, Any]] = []
    tabled = isinstance(document, dict) and any(isinstance(v, list) for v in document.values())
    if isinstance(document, dict) and tabled:
        rest = {k: v for k, v in document.items() if not isinstance(v, list)}
        if rest:
            rows.append(_row("", rest))
        for name, items in document.items():
            if isinstance(items, list):
                rows.extend(_row(str(name), item) for item in items)
    elif isinstance(document, list):
        rows.extend(_row(None, item) for item in document)
    else:
        rows.append(_row(None, document))
    columns: list[str] = [TABLE_COLUMN] if tabled else []
    seen = set(columns)
    for r in rows:
        for k in r:
            if k not in seen:
                seen.add(k)
                columns.append(k)
    return columns, rows


def cell(value: Any) -> str:
    """A value as CSV / table text: strings as they are, null empty, anything else its JSON."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return orjson.dumps(value).decode()


#: a cell a spreadsheet would read as a formula (OWASP "CSV injection")
_FORMULA = ("=", "+", "-", "@", "\t", "\r")


def _inert(text: str) -> str:
    """A CSV cell a spreadsheet shows as text: one that starts like a formula gets a leading ``'``
    (the JSON file beside it keeps the exact value)."""
    return "'" + text if text.startswith(_FORMULA) else text


def render_csv(columns: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> bytes:
    """UTF-8 with a byte-order mark (Excel then reads Vietnamese right), CRLF line ends (RFC 4180).
    A header or text cell that starts like a formula (``= + - @``) gets a leading ``'``, so a
    spreadsheet shows it and runs nothing; the JSON export is the exact copy."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\r\n")
    writer.writerow([_inert(c) for c in columns])
    for r in rows:
        writer.writerow([_inert(cell(r.get(c))) if isinstance(r.get(c), str) else cell(r.get(c)) for c in columns])
    return (_BOM + buf.getvalue()).encode("utf-8")


def _parse(data: bytes, media_type: str) -> Any:
    """The export as JSON, or raise ValueError when it is not JSON."""
    if media_type != "application/json" and not media_type.endswith("+json"):
        raise ValueError("not JSON")
    return orjson.loads(data)


# -- the manifest's system entries ------------------------------------------------------------


_DECLARED = ("categories", "purposes", "recipients", "processors", "storage_country", "retention")


def _declared(declaration: SystemDeclaration | None) -> dict[str, Any]:
    if declaration is None:
        return {"declared": False}
    doc = declaration.model_dump(mode="json", include=set(_DECLARED))
    doc["retention"] = sorted(doc.get("retention") or [], key=lambda r: (r["category"], r["legal_basis"]))
    return {"declared": True, "description": declaration.description, **doc}


# -- index.html -------------------------------------------------------------------------------

_REASONS: dict[str, tuple[str, str]] = {
    "not_found": ("Không tìm thấy dữ liệu nào về bạn trong hệ thống này", "No data about you was found in this system"),
    "retained": ("Một phần dữ liệu được giữ lại theo quy định pháp luật", "Some data is kept as the law requires"),
    "failed": ("Việc xuất dữ liệu không thành công", "The export failed"),
    "refused": ("Hệ thống đã từ chối yêu cầu", "The system refused the request"),
    "conflict": ("Các thông tin định danh trỏ tới những người khác nhau, nên không xuất dữ liệu",
                 "The identifiers point to different people, so nothing was exported"),
    "manual": ("Do nhân viên xử lý thủ công; dữ liệu không nằm trong gói này",
               "Handled by a person; the data is not in this bundle"),
    "skipped": ("Cán bộ bảo vệ dữ liệu đã bỏ qua hệ thống này", "The data protection officer skipped this system"),
    "stalled": ("Hệ thống không phản hồi", "The system did not respond"),
}
_RIGHTS: dict[str, tuple[str, str]] = {
    "access": ("Quyền truy cập dữ liệu cá nhân", "Right of access"),
    "portability": ("Quyền nhận và chuyển dữ liệu cá nhân", "Right to data portability"),
}
_FIELDS: dict[str, tuple[str, str]] = {
    "categories": ("Loại dữ liệu", "Categories of data"),
    "purposes": ("Mục đích xử lý", "Purposes"),
    "recipients": ("Bên nhận dữ liệu", "Recipients"),
    "processors": ("Bên xử lý dữ liệu", "Processors"),
    "storage_country": ("Quốc gia lưu trữ", "Storage country"),
    "retention": ("Thời hạn lưu trữ theo luật", "Retention required by law"),
}

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Arial,sans-serif;margin:2rem auto;max-width:72rem;
padding:0 1rem;color:#1a1a1a;line-height:1.45}
h1,h2,h3{line-height:1.25}.en{color:#555;font-weight:normal}h1 .en,h2 .en,h3 .en{display:block;font-size:.8em}
table{border-collapse:collapse;margin:.5rem 0 1.5rem;font-size:.92rem;display:block;overflow-x:auto}
th,td{border:1px solid #bbb;padding:.3rem .5rem;text-align:left;vertical-align:top;white-space:pre-wrap;
overflow-wrap:break-word}th{background:#eef2f5}code{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.85rem}
dl{display:grid;grid-template-columns:max-content 1fr;gap:.2rem 1rem}dt{font-weight:600}dd{margin:0}
section{border-top:2px solid #dde3e8;margin-top:1.5rem}.note{color:#555;font-size:.9rem}
"""


def _e(value: Any) -> str:
    return html.escape(cell(value), quote=True)


def _both(vi: str, en: str, tag: str = "span") -> str:
    """Vietnamese first, English after it."""
    return (f'<{tag} lang="vi" class="vi">{html.escape(vi)}</{tag}> '
            f'<{tag} lang="en" class="en">{html.escape(en)}</{tag}>')


def _heading(level: int, vi: str, en: str, extra: str = "") -> str:
    tail = f" {html.escape(extra)}" if extra else ""
    return (f'<h{level}><span lang="vi">{html.escape(vi)}{tail}</span>'
            f'<span lang="en" class="en">{html.escape(en)}{tail}</span></h{level}>')


def _table(columns: Sequence[str], rows: Sequence[Mapping[str, Any]], *, attrs: str = "") -> str:
    head = "".join(f'<th scope="col">{html.escape(c)}</th>' for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{_e(r.get(c))}</td>" for c in columns) + "</tr>" for r in rows)
    return f"<table{attrs}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _declaration_html(entry: Mapping[str, Any]) -> str:
    if not entry.get("declared"):
        return ""
    items = []
    for key, (vi, en) in _FIELDS.items():
        value = entry.get(key)
        if key == "retention":
            text = "; ".join(f"{r['category']}: {r['period']} ({r['legal_basis']})" for r in value or [])
        elif isinstance(value, list):
            text = ", ".join(str(v) for v in value)
        else:
            text = "" if value is None else str(value)
        items.append(f"<dt>{_both(vi, en)}</dt><dd>{html.escape(text) or '—'}</dd>")
    return f"<dl>{''.join(items)}</dl>"


def _render_index(manifest: Mapping[str, Any], tables: Mapping[str, tuple[list[str], list[dict[str, Any]]] | None],
                  files: Sequence[Mapping[str, Any]]) -> bytes:
    right = str(manifest["right"])
    right_vi, right_en = _RIGHTS.get(right, (right, right))
    out: list[str] = [
        "<!DOCTYPE html>",
        '<html lang="vi"><head><meta charset="utf-8">',
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; style-src \'unsafe-inline\'">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>Dữ liệu cá nhân của bạn / Your personal data — {html.escape(str(manifest['case_id']))}</title>",
        f"<style>{_CSS}</style></head><body>",
        _heading(1, "Dữ liệu cá nhân của bạn", "Your personal data"),
        "<p>" + _both("Gói này chứa dữ liệu cá nhân về bạn mà các hệ thống của chúng tôi đang lưu giữ, "
                      "theo yêu cầu của bạn.",
                      "This bundle holds the personal data about you that our systems keep, as you asked.") + "</p>",
        "<dl>",
        f"<dt>{_both('Loại yêu cầu', 'Request')}</dt><dd>{_both(right_vi, right_en)}</dd>",
        f"<dt>{_both('Mã yêu cầu', 'Request id')}</dt><dd><code>{_e(manifest['request_id'])}</code></dd>",
        f"<dt>{_both('Mã hồ sơ', 'Case id')}</dt><dd><code>{_e(manifest['case_id'])}</code></dd>",
        f"<dt>{_both('Bên kiểm soát dữ liệu', 'Controller')}</dt><dd>{_e(manifest['controller'])}</dd>",
        f"<dt>{_both('Thời điểm tạo', 'Generated at')}</dt><dd><code>{_e(manifest['generated_at'])}</code></dd>",
        f"<dt>{_both('Tổng số bản ghi', 'Records in total')}</dt><dd>{_e(manifest['records'])}</dd>",
        "</dl>",
    ]

    out.append('<section id="systems">')
    out.append(_heading(2, "Dữ liệu theo từng hệ thống", "Data by system"))
    exported = [s for s in manifest["systems"] if s["files"]]
    if not exported:
        out.append("<p>" + _both("Không hệ thống nào xuất dữ liệu về bạn.", "No system exported data about you.")
                   + "</p>")
    by_name = {f["name"]: f for f in files}
    for system in exported:
        name = str(system["name"])
        out.append(f'<article class="system" data-system="{html.escape(name, quote=True)}">')
        out.append(_heading(3, "Hệ thống:", "System:", name))
        if system.get("description"):
            out.append(f'<p class="note">{_e(system["description"])}</p>')
        out.append(_declaration_html(system))
        out.append("<p>" + _both("Số bản ghi:", "Records:") + f" {_e(system['records'])}</p>")
        for fname in system["files"]:
            entry = by_name[fname]
            if entry["kind"] != "export":
                continue
            csv_name = entry.get("csv")
            out.append("<p class=\"note\">" + _both("Tệp:", "File:") + f" <code>{_e(fname)}</code>"
                       + (f", <code>{_e(csv_name)}</code>" if csv_name else "") + "</p>")
            table = tables.get(fname)
            if table is None:
                out.append("<p>" + _both("Tệp này không phải JSON; hãy mở trực tiếp tệp.",
                                         "This file is not JSON; open the file itself.") + "</p>")
                continue
            columns, rows = table
            if not rows:
                out.append("<p>" + _both("Không có bản ghi.", "No records.") + "</p>")
                continue
            attrs = f' class="records" data-system="{html.escape(name, quote=True)}" data-file="{_e(fname)}"'
            out.append(_table(columns, rows[:HTML_ROW_LIMIT], attrs=attrs))
            if len(rows) > HTML_ROW_LIMIT:
                out.append("<p>" + _both(
                    f"Chỉ hiển thị {HTML_ROW_LIMIT} dòng đầu; tệp CSV và JSON có đủ {len(rows)} dòng.",
                    f"Only the first {HTML_ROW_LIMIT} rows are shown; the CSV and JSON files hold all {len(rows)}.")
                    + "</p>")
        out.append("</article>")
    out.append("</section>")

    out.append('<section id="withheld">')
    out.append(_heading(2, "Dữ liệu không có trong gói này và lý do", "What is not in this bundle, and why"))
    withheld = manifest["withheld"]
    if not withheld:
        out.append("<p>" + _both("Không có: mọi hệ thống đã được hỏi đều đã xuất dữ liệu.",
                                 "Nothing: every system asked exported its data.") + "</p>")
    else:
        out.append('<table class="withheld"><thead><tr>'
                   f'<th scope="col">{_both("Hệ thống", "System")}</th>'
                   f'<th scope="col">{_both("Lý do", "Reason")}</th>'
                   f'<th scope="col">{_both("Chi tiết", "Details")}</th></tr></thead><tbody>')
        for w in withheld:
            vi, en = _REASONS.get(w["reason"], ("Không có trong gói này", "Not in this bundle"))
            details = [_e(w["detail"])] if w.get("detail") else []
            for r in w.get("retained", []):
                line = f"{r.get('category', '')}: {r.get('records', '')} — {r.get('legal_basis', '')}"
                if r.get("retain_until"):
                    line += f" (→ {r['retain_until']})"
                details.append(html.escape(line))
            out.append(f'<tr data-system="{html.escape(str(w["system"]), quote=True)}"><td>{_e(w["system"])}</td>'
                       f'<td>{_both(vi, en)} <code>{_e(w["reason"])}</code></td><td>{"<br>".join(details)}</td></tr>')
        out.append("</tbody></table>")
    out.append("</section>")

    out.append('<section id="verify">')
    out.append(_heading(2, "Cách kiểm tra các tệp", "How to verify the files"))
    out.append("<p>" + _both(
        "Mỗi tệp trong gói có một mã SHA-256 bên dưới và trong manifest.json (manifest.json cũng ghi mã của "
        "trang này). Tính mã của tệp và so sánh: nếu khác, tệp đã bị thay đổi.",
        "Each file in the bundle has a SHA-256 below and in manifest.json (which also lists this page's). "
        "Compute a file's SHA-256 and compare: if they differ, the file was changed.") + "</p>")
    example = html.escape(files[0]["name"]) if files else "manifest.json"
    out.append(f"<ul><li><code>sha256sum {example}</code> (Linux)</li>"
               f"<li><code>shasum -a 256 {example}</code> (macOS)</li>"
               f"<li><code>certutil -hashfile {example} SHA256</code> (Windows)</li></ul>")
    out.append('<table class="files"><thead><tr>'
               f'<th scope="col">{_both("Tệp", "File")}</th>'
               f'<th scope="col">{_both("Kích thước (byte)", "Size (bytes)")}</th>'
               '<th scope="col">SHA-256</th></tr></thead><tbody>')
    for f in files:
        out.append(f"<tr><td><code>{_e(f['name'])}</code></td><td>{_e(f['size'])}</td>"
                   f"<td><code>{_e(f['sha256'])}</code></td></tr>")
    out.append("</tbody></table></section></body></html>")
    return ("\n".join(out) + "\n").encode("utf-8")


# -- building and reading ---------------------------------------------------------------------


def _withheld(systems_without_data: Iterable[str], systems_not_exported: Mapping[str, str] | None,
              withheld: Iterable[Withheld], with_data: set[str]) -> list[Withheld]:
    by_system: dict[str, Withheld] = {}
    for w in withheld:
        by_system.setdefault(w.system, w)
    for system, why in (systems_not_exported or {}).items():
        if system not in by_system:
            reason, _, detail = why.partition(", ")
            by_system[system] = Withheld(system, reason.strip() or "not_exported", detail or None)
    for system in systems_without_data:
        if system not in by_system and system not in with_data:
            by_system[system] = Withheld(system, "not_found")
    return [by_system[s] for s in sorted(by_system)]


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
    right: str = "access",
    declarations: Mapping[str, SystemDeclaration] | None = None,
    withheld: Iterable[Withheld] = (),
) -> Artifact:
    """Build and store the access bundle of a case; return its claim check.

    ``parts`` are ``(system, artifact)`` pairs from the receipts of the case's export tasks.
    ``declarations`` are the systems' declarations (what the manifest and page say each system
    holds, for what, who receives it, where it is stored). ``withheld`` says, per system, what is
    not in the bundle and why (:class:`Withheld`); ``systems_without_data`` (not_found) and
    ``systems_not_exported`` (system -> "status[, detail]") are the older, shorter way to say it.
    A system with data is never listed as without. Raises :class:`BundleError` when a part is
    missing or its sha256 or size differs from the receipt.
    """
    generated_at = (generated_at or datetime.now(UTC)).astimezone(UTC)
    names = _file_names(parts)
    with_data = {system for system, _ in parts}
    held = _withheld(systems_without_data, systems_not_exported, withheld, with_data)
    declarations = declarations or {}

    files: list[tuple[str, bytes]] = []
    entries: list[dict[str, Any]] = []
    tables: dict[str, tuple[list[str], list[dict[str, Any]]] | None] = {}
    taken = set(_RESERVED) | {name for name, _, _ in names}
    for name, system, artifact in names:
        try:
            data = store.get(artifact.ref)
        except ArtifactNotFound:
            raise BundleError(f"export of system {system!r} is missing: {artifact.ref}") from None
        digest = hashlib.sha256(data).hexdigest()
        if digest != artifact.sha256 or len(data) != artifact.size:
            raise BundleError(f"export of system {system!r} does not match its receipt: {artifact.ref}")
        entry: dict[str, Any] = {"name": name, "system": system, "kind": "export", "records": artifact.records,
                                 "sha256": digest, "size": len(data), "media_type": artifact.media_type}
        files.append((name, data))
        entries.append(entry)
        try:
            table = export_rows(_parse(data, artifact.media_type))
        except ValueError:  # orjson.JSONDecodeError is one: the export is shipped as it is, without a table
            tables[name] = None
            continue
        tables[name] = table
        csv_name = _csv_name(name)
        while csv_name in taken:
            csv_name = f"{PurePosixPath(csv_name).stem}_.csv"
        taken.add(csv_name)
        csv_data = render_csv(*table)
        entry["csv"] = csv_name
        files.append((csv_name, csv_data))
        entries.append({"name": csv_name, "system": system, "kind": "csv", "source": name,
                        "records": artifact.records, "rows": len(table[1]),
                        "sha256": hashlib.sha256(csv_data).hexdigest(), "size": len(csv_data),
                        "media_type": CSV_MEDIA_TYPE})

    listed = sorted(with_data | {w.system for w in held})
    withheld_names = {w.system: w.reason for w in held}
    systems = []
    for system in listed:
        own = [e for e in entries if e["system"] == system]
        systems.append({
            "name": system,
            "records": sum(e["records"] for e in own if e["kind"] == "export"),
            "files": [e["name"] for e in own],
            "exported": system in with_data,
            **({"withheld": withheld_names[system]} if system in withheld_names else {}),
            **_declared(declarations.get(system)),
        })

    manifest: dict[str, Any] = {
        "format": BUNDLE_FORMAT,
        "case_id": str(case_id),
        "request_id": request_id,
        "right": str(right),
        "controller": controller,
        "generated_at": generated_at.isoformat(),
        "records": sum(e["records"] for e in entries if e["kind"] == "export"),
        "systems": systems,
        "withheld": [w.as_dict() for w in held],
        "systems_without_data": sorted(w.system for w in held if w.reason == "not_found"),
        "systems_not_in_bundle": {w.system: w.reason + (f", {w.detail}" if w.detail else "")
                                  for w in held if w.reason != "not_found"},
    }
    index = _render_index(manifest, tables, entries)
    index_entry = {"name": INDEX, "system": None, "kind": "index", "records": 0,
                   "sha256": hashlib.sha256(index).hexdigest(), "size": len(index), "media_type": HTML_MEDIA_TYPE}
    manifest["files"] = [index_entry, *entries]
    manifest_bytes = orjson.dumps(manifest, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n"

    # Zip timestamps have no zone and start in 1980; the manifest keeps the exact time.
    stamp = max(generated_at, datetime(1980, 1, 1, tzinfo=UTC)).timetuple()[:6]
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in [(MANIFEST, manifest_bytes), (INDEX, index), *files]:
            info = zipfile.ZipInfo(name, date_time=stamp)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o600 << 16
            info.create_system = 3  # unix, whatever builds it, so the bytes do not depend on the host
            zf.writestr(info, data)
    return store.put(bundle_key(case_id, controller), buf.getvalue(), records=manifest["records"],
                     media_type=MEDIA_TYPE)


def read_bundle(data: bytes) -> tuple[dict[str, Any], dict[str, bytes]]:
    """Open a bundle and check every file against the manifest.

    Returns ``(manifest, {name: bytes})`` (every file but the manifest); raises
    :class:`BundleError` if a file is missing, unlisted, or its sha256 or size differs.
    """
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            names = zf.namelist()
            if len(names) != len(set(names)):
                raise BundleError("bundle has a file name twice")
            for info in zf.infolist():
                if "/" in info.filename or "\\" in info.filename or info.filename.startswith("."):
                    raise BundleError("bundle has a file outside its top folder")
                if info.file_size > _MAX_FILE:
                    raise BundleError(f"{info.filename} is larger than a bundle's file may be")
            contents = {name: zf.read(name) for name in names}
    except (zipfile.BadZipFile, zipfile.LargeZipFile, RuntimeError, NotImplementedError, EOFError,
            ValueError, zlib.error) as exc:  # encrypted, an unknown compression, truncated...
        raise BundleError(f"not a bundle's zip file: {type(exc).__name__}") from None
    if MANIFEST not in contents:
        raise BundleError("bundle has no manifest.json")
    try:
        manifest: dict[str, Any] = orjson.loads(contents.pop(MANIFEST))
        listed = {e["name"]: e for e in manifest.get("files", [])}
    except (orjson.JSONDecodeError, AttributeError, KeyError, TypeError):
        raise BundleError("bundle's manifest.json is not a manifest") from None
    if set(listed) != set(contents):
        raise BundleError("bundle files differ from its manifest")
    if not str(manifest.get("format", "")).startswith("dsrflow.bundle.") or INDEX not in contents:
        raise BundleError("bundle's manifest is not a dsrflow bundle's (no format, or no index.html)")
    for name, entry in listed.items():
        if hashlib.sha256(contents[name]).hexdigest() != entry.get("sha256"):
            raise BundleError(f"{name} does not match the manifest's sha256")
        if "size" in entry and len(contents[name]) != entry["size"]:
            raise BundleError(f"{name} does not match the manifest's size")
    return manifest, contents
