"""The dashboard in a real browser: Debian's chromium driven by Playwright (never `playwright install`).

The studies are received by a real `edgenode serve` (storescu -> listener -> stability scan makes the
jobs); scores, SC heatmaps and deliveries are added through the db models on top (the inference and
results path is another issue's). Then the dashboard runs on that database: sign in with the token,
check the worklist is ordered by anomaly score, open the top study and check its heatmap image really
decoded. Screenshots are kept in test-artifacts/ (gitignored).
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from db.session import Database
from node.web.server import WebServer
from tests.conftest import REPO_ROOT
from tests.opsdata import record_inference_outcome, served_node

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = REPO_ROOT / "test-artifacts"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="/usr/bin/chromium is not installed (scripts/setup.sh installs Debian's chromium)"
)


def test_dashboard_sign_in_worklist_and_heatmap(tmp_path: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    node = served_node(tmp_path / "node")
    node.start()
    try:
        for accession in ("ACC-MID", "ACC-TOP", "ACC-LOW"):
            node.send(accession, f"P-{accession}")
        db = Database(node.settings.database_url)
        node.wait_until_judged(db)
    finally:
        node.stop()
    settings = node.settings
    scores = {"ACC-MID": 0.41, "ACC-TOP": 0.87, "ACC-LOW": 0.09}
    for accession, score in scores.items():
        uid = node.studies[accession].study_uid
        record_inference_outcome(db, settings.spool_dir, uid, score=score, uncertainty=score / 10, heatmaps=2)
    server = WebServer(settings, db)
    server.start()
    token = (settings.data_dir / "web-token").read_text().strip()
    ARTIFACTS.mkdir(exist_ok=True)
    try:
        metrics = httpx.get(f"{server.url}/metrics", headers={"Authorization": f"Bearer {token}"}, timeout=10)
        received = next(
            s.value
            for f in text_string_to_metric_families(metrics.text)
            for s in f.samples
            if s.name == "edgenode_instances_received_total"
        )
        assert received == sum(s.instances for s in node.studies.values()) == 9
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            response = page.goto(server.url + "/")
            assert response is not None and response.status == 401
            page.fill("input[name=token]", token)
            page.click("button[type=submit]")
            rows = page.locator("#worklist tbody tr[data-study-uid]")
            expect(rows).to_have_count(3)
            shown = [float(s) for s in rows.evaluate_all("rs => rs.map(r => r.dataset.score)")]
            assert shown == sorted(scores.values(), reverse=True)
            page.screenshot(path=str(ARTIFACTS / "dashboard-worklist.png"), full_page=True)

            rows.first.locator("a").click()
            page.wait_for_url("**/studies/**")
            expect(page.locator("h1")).to_contain_text("ACC-TOP")
            images = page.locator("#heatmaps img")
            expect(images).to_have_count(2)
            page.wait_for_function(
                "() => [...document.querySelectorAll('#heatmaps img')].every(i => i.complete && i.naturalWidth > 0)"
            )
            assert images.first.evaluate("i => i.naturalWidth") == 64
            page.screenshot(path=str(ARTIFACTS / "dashboard-study.png"), full_page=True)
            browser.close()
    finally:
        server.stop()
        db.dispose()
