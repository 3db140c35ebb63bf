"""The dashboard of a real run in a real browser: Debian's chromium driven by Playwright (never `playwright install`).

`edgenode serve` runs the whole path (storescu -> listener -> stability scan -> worker with a tiny random-weight
U-Net -> SEG/SC/SR -> dcmtk storescp) and its own dashboard, on a free port with the token it generated at first
start. The browser signs in with that token, checks the worklist is ordered by the scores the worker stored,
opens the top study and checks that its heatmaps are the very Secondary Captures the receiver got (size and
pixels read back from the page's canvas), that the job's timings and delivery rows are shown. Screenshots are
kept in test-artifacts/ (gitignored).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pydicom
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select

from db.jobs import inference_seconds
from db.models import Job, OutboundStatus, Study
from db.session import Database
from tests.conftest import REPO_ROOT
from tests.opsdata import ServedNode, served_node

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
ACCESSIONS = ("ACC-1", "ACC-2", "ACC-3")
PIXEL_PROBES = ((0.5, 0.5), (0.3, 0.6), (0.7, 0.4), (0.5, 0.95))  # (x, y) fractions of the image

pytestmark = [
    pytest.mark.slow,  # a real run, then Chromium
    pytest.mark.skipif(
        not CHROMIUM.exists(), reason="/usr/bin/chromium is not installed (scripts/setup.sh installs Debian's chromium)"
    ),
]


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory, dcmtk) -> Iterator[tuple[ServedNode, Database]]:
    """A node that has processed and delivered three CT studies and keeps serving its dashboard."""
    node = served_node(tmp_path_factory.mktemp("browser") / "node")
    node.start()
    db = Database(node.settings.database_url)
    try:
        for accession, lesion in zip(ACCESSIONS, (None, (600, 2), (900, 6)), strict=True):
            node.send(accession, f"P-{accession}", lesion=lesion)
        node.wait_until_settled(db)
        yield node, db
    finally:
        db.dispose()
        node.stop()


def current_jobs(db: Database) -> dict[str, Job]:
    with db.session() as session:
        jobs = session.scalars(select(Job).join(Study)).all()
        for job in jobs:  # load what the test reads after the session closes
            _ = (
                job.study.accession_number,
                [(r.kind, r.path, r.sop_instance_uid, list(r.outbound)) for r in job.results],
            )
        session.expunge_all()
    return {job.study.accession_number: job for job in jobs}


def test_metrics_of_the_real_run(running: tuple[ServedNode, Database]) -> None:
    node, db = running
    token = (node.settings.data_dir / "web-token").read_text().strip()
    assert httpx.get(f"{node.web_url}/metrics", timeout=10).status_code == 401
    response = httpx.get(f"{node.web_url}/metrics", headers={"Authorization": f"Bearer {token}"}, timeout=10)
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(response.text)
        for s in f.samples
    }
    assert samples[("edgenode_instances_received_total", ())] == 9
    assert samples[("edgenode_jobs", (("state", "done"),))] == 3
    assert samples[("edgenode_outbound_items", (("state", "sent"),))] == sum(
        len(j.results) for j in current_jobs(db).values()
    )
    jobs = current_jobs(db).values()
    worked = [inference_seconds(j.timings) for j in jobs]
    for job in jobs:  # the worker's keys; the worker time is its total on the job, never the queue wait
        assert {"queue_wait", "load", "infer", "infer.reconstruct", "encode", "total"} <= set(job.timings)
        assert inference_seconds(job.timings) == pytest.approx(job.timings["total"])
        assert job.timings["total"] >= job.timings["infer"] + job.timings["encode"]
    assert samples[("edgenode_inference_seconds_count", ())] == 3
    assert samples[("edgenode_inference_seconds_sum", ())] == pytest.approx(sum(worked))  # type: ignore[arg-type]
    assert samples[("edgenode_queue_wait_seconds_sum", ())] == pytest.approx(sum(j.timings["queue_wait"] for j in jobs))


def test_dashboard_sign_in_worklist_and_real_heatmaps(running: tuple[ServedNode, Database]) -> None:
    from playwright.sync_api import expect, sync_playwright

    node, db = running
    token = (node.settings.data_dir / "web-token").read_text().strip()
    jobs = current_jobs(db)
    by_score = sorted(ACCESSIONS, key=lambda a: -(jobs[a].score or 0.0))
    top = jobs[by_score[0]]
    received = {
        str(ds.SOPInstanceUID): ds for ds in (pydicom.dcmread(p) for p in node.receivers["STORESCU"].received())
    }
    sc = [r for r in sorted(top.results, key=lambda r: r.id) if r.kind == "sc"]
    assert len(sc) == 3 and all(r.sop_instance_uid in received for r in sc)  # one per slice, all delivered
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            response = page.goto(node.web_url + "/")
            assert response is not None and response.status == 401
            page.fill("input[name=token]", token)
            page.click("button[type=submit]")
            rows = page.locator("#worklist tbody tr[data-study-uid]")
            expect(rows).to_have_count(3)
            shown = [float(s) for s in rows.evaluate_all("rs => rs.map(r => r.dataset.score)")]
            assert shown == [jobs[a].score for a in by_score]  # ordered by the scores the worker stored
            page.screenshot(path=str(ARTIFACTS / "dashboard-worklist.png"), full_page=True)

            rows.first.locator("a").click()
            page.wait_for_url("**/studies/**")
            expect(page.locator("h1")).to_contain_text(by_score[0])
            images = page.locator("#heatmaps img")
            expect(images).to_have_count(len(sc))
            page.wait_for_function(
                "() => [...document.querySelectorAll('#heatmaps img')].every(i => i.complete && i.naturalWidth > 0)"
            )
            for k, result in enumerate(sc):  # each image is the SC the receiver got, pixel for pixel at the probes
                ds = received[result.sop_instance_uid]
                size = images.nth(k).evaluate("i => [i.naturalWidth, i.naturalHeight]")
                assert size == [ds.Columns, ds.Rows]
                points = [(int(fx * (ds.Columns - 1)), int(fy * (ds.Rows - 1))) for fx, fy in PIXEL_PROBES]
                seen = images.nth(k).evaluate(
                    """(img, points) => {
                        const c = document.createElement('canvas');
                        c.width = img.naturalWidth; c.height = img.naturalHeight;
                        const g = c.getContext('2d'); g.drawImage(img, 0, 0);
                        return points.map(([x, y]) => Array.from(g.getImageData(x, y, 1, 1).data.slice(0, 3)));
                    }""",
                    points,
                )
                assert seen == [[int(v) for v in ds.pixel_array[y, x]] for x, y in points]

            stages = page.locator("#timings tr[data-stage]").evaluate_all("rs => rs.map(r => r.dataset.stage)")
            assert {"queue_wait", "infer", "infer.reconstruct", "encode", "worker"} <= set(stages)
            worker_row = page.locator('#timings tr[data-stage="worker"] td.num')
            expect(worker_row).to_have_text(f"{inference_seconds(top.timings):.2f}")
            delivery = page.locator("h2:has-text('Delivery') + table tbody tr")
            expect(delivery).to_have_count(len(top.results))
            assert all(o.status == OutboundStatus.SENT for r in top.results for o in r.outbound)
            expect(delivery.filter(has_text="STORESCU").filter(has_text="sent")).to_have_count(len(top.results))
            page.screenshot(path=str(ARTIFACTS / "dashboard-study.png"), full_page=True)
        finally:
            browser.close()
