"""An access bundle's index.html in a real browser: Debian's chromium driven by Playwright (the
system's browser, never one Playwright downloads). The page reads in Vietnamese and English, shows
one table per export with the exported values and what was withheld, and shows exported text that
looks like markup as text: nothing in it runs.

With CI=true a missing chromium or Playwright fails the test (.ci/run installs chromium);
elsewhere it is skipped."""

from __future__ import annotations

import io
import os
import shutil
import uuid
import zipfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest

from dsrflow.exports import MemoryExportStore, Withheld, build_bundle, read_bundle, system_case_prefix
from dsrflow.registry import SystemDeclaration
from dsrflow.testing.brokers import in_ci

CASE = uuid.UUID("6a0d2a57-9a1f-4c4e-8f0b-3c1c5f7d2e11")
HOSTILE = '<script>window.__pwned = 1; alert("pwned")</script><img src=x onerror="window.__pwned = 2">'


def chromium() -> str:
    path = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)
    if path is None:
        if in_ci():
            pytest.fail("CI=true: chromium is not installed (.ci/run installs it with apt-get)")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    try:
        import playwright.async_api  # noqa: F401
    except ImportError:
        if in_ci():
            pytest.fail("CI=true: playwright is not installed (it is in the test extra)")
        pytest.skip("playwright is not installed (pip install -e '.[test]')")
    return path


def bundle_dir(tmp_path: Path) -> Path:
    store = MemoryExportStore()

    def put(system: str, doc: Any, records: int) -> Any:
        return store.put(f"{system_case_prefix(system, CASE)}t-1.json", orjson.dumps(doc), records=records)

    parts = [
        ("crm", put("crm", {"contacts": [{"full_name": "Nguyễn Thị Lan", "email": "lan.nguyen@example.vn",
                                          "address": {"city": "Hà Nội"}, "note": HOSTILE}]}, 1)),
        ("billing", put("billing", {"invoices": [{"number": "HD-0042", "amount_vnd": 1_250_000}]}, 1)),
    ]
    declarations = {"crm": SystemDeclaration(name="crm", identifier_types=("email",), actions=("export",),
                                             purposes=("essential.service",), recipients=("Zalo OA",),
                                             storage_country="VN")}
    art = build_bundle(store, case_id=CASE, request_id="pc-7", parts=parts, declarations=declarations,
                       systems_without_data=["marketing"], withheld=[Withheld("support", "manual", HOSTILE)],
                       generated_at=datetime(2026, 3, 2, 8, 0, tzinfo=UTC))
    data = store.get(art.ref)
    read_bundle(data)  # every checksum holds
    out = tmp_path / "bundle"
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        zf.extractall(out)
    return out


async def test_a_browser_shows_the_bundle_in_vietnamese_and_english_and_runs_none_of_the_data(
    tmp_path: Path,
) -> None:
    executable = chromium()
    from playwright.async_api import async_playwright

    url = (bundle_dir(tmp_path) / "index.html").as_uri()
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=executable, headless=True)
        try:
            page = await browser.new_page()
            dialogs: list[str] = []

            async def on_dialog(dialog: Any) -> None:
                dialogs.append(dialog.message)
                await dialog.dismiss()

            page.on("dialog", on_dialog)
            requests: list[str] = []
            page.on("request", lambda r: requests.append(r.url))
            await page.goto(url)
            await page.wait_for_load_state("load")

            h1 = await page.locator("h1").inner_text()
            assert "Dữ liệu cá nhân của bạn" in h1 and "Your personal data" in h1
            assert h1.index("Dữ liệu cá nhân của bạn") < h1.index("Your personal data")  # Vietnamese first
            headings = await page.locator("h2").all_inner_texts()
            assert any("Dữ liệu theo từng hệ thống" in h and "Data by system" in h for h in headings)
            assert any("Dữ liệu không có trong gói này" in h and "What is not in this bundle" in h for h in headings)
            assert any("Cách kiểm tra các tệp" in h and "How to verify the files" in h for h in headings)

            # one table per system that exported, with its values
            tables = page.locator("table.records")
            assert await tables.count() == 2
            billing = page.locator('table.records[data-system="billing"]')
            crm = page.locator('table.records[data-system="crm"]')
            assert "HD-0042" in await billing.inner_text() and "1250000" in await billing.inner_text()
            crm_text = await crm.inner_text()
            for value in ("Nguyễn Thị Lan", "lan.nguyen@example.vn", "Hà Nội", "address.city"):
                assert value in crm_text
            assert await crm.locator("tbody tr").count() == 1
            system = page.locator('article[data-system="crm"]')
            assert "Zalo OA" in await system.inner_text() and "VN" in await system.inner_text()

            # what was withheld, and why
            withheld = await page.locator("table.withheld").inner_text()
            assert "marketing" in withheld and "Không tìm thấy dữ liệu nào về bạn" in withheld
            assert "No data about you was found" in withheld and "support" in withheld

            # markup in the data is text: shown, not run
            assert HOSTILE in crm_text and HOSTILE in withheld
            assert await page.get_by_text(HOSTILE).first.is_visible()
            assert await page.evaluate("typeof window.__pwned") == "undefined"
            assert await page.locator("body script, body img").count() == 0
            assert dialogs == []
            assert all(u.startswith("file://") for u in requests), requests  # self-contained

            # how to verify: the checksums are on the page
            assert await page.locator("table.files tbody tr").count() == 4  # two JSON, two CSV

            # and it reads the same with JavaScript off
            context = await browser.new_context(java_script_enabled=False)
            quiet = await context.new_page()
            await quiet.goto(url)
            assert await quiet.locator("table.records").count() == 2
            assert "Nguyễn Thị Lan" in await quiet.locator('table.records[data-system="crm"]').inner_text()
            await context.close()
        finally:
            await browser.close()
