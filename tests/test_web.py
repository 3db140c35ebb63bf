"""Dashboard, REST API, /metrics and /healthz: token on every route, same data as the CLI, real HTTP bind.

HAND-MADE rows (tests/opsdata.record_*) so the tests know exact scores, timings and delivery states (a
pending delivery with a DIMSE error, a result under another study for the access check). The dashboard of a
real run (inference, SC heatmaps, delivery) is checked in a browser in tests/test_browser.py.
"""

from __future__ import annotations

import io
import json
import re
import socket
import stat
import subprocess
from pathlib import Path

import httpx
import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from db.jobs import inference_seconds, queue_wait_seconds
from db.models import OutboundStatus
from db.session import Database
from node.config import Settings, load_settings
from node.web.app import COOKIE, create_app, safe_next
from node.web.server import WebServer
from node.web.token import resolve_token, token_path
from tests.conftest import edgenode_cmd, node_env
from tests.opsdata import record_inference_outcome, record_received_study

TOKEN = "test-token-0123456789"


@pytest.fixture
def node(tmp_path: Path):
    settings = load_settings(None, node={"data_dir": str(tmp_path)}, web={"token": TOKEN, "port": 0})
    db = Database(settings.database_url)
    spool = settings.spool_dir
    uids = {
        "high": record_received_study(db, spool, patient_id="P-HIGH", accession="ACC-H", calling_ae="CT1"),
        "low": record_received_study(db, spool, patient_id="P-LOW", accession="ACC-L"),
        "waiting": record_received_study(db, spool, patient_id="P-WAIT", accession="ACC-W", modality="DX"),
    }
    record_inference_outcome(db, spool, uids["high"], score=0.83, uncertainty=0.04, heatmaps=2)
    record_inference_outcome(
        db,
        spool,
        uids["low"],
        score=0.12,
        uncertainty=0.02,
        delivery=OutboundStatus.PENDING,
        timings={"queue_wait": 100.0, "infer": 40.0, "infer.reconstruct": 39.0, "encode": 2.0},
    )
    yield settings, db, uids
    db.dispose()


@pytest.fixture
def client(node) -> TestClient:
    settings, db, _ = node
    return TestClient(create_app(settings, db))


AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _concrete(path: str, uid: str) -> str:
    return path.replace("{study_uid}", uid).replace("{result_id}", "1")


def test_every_route_but_healthz_needs_the_token(client: TestClient, node) -> None:
    uid = node[2]["high"]
    routes = [r for r in client.app.routes if isinstance(r, APIRoute)]
    assert {"/api/worklist", "/api/studies/{study_uid}", "/api/audit", "/metrics", "/healthz"} <= {
        r.path for r in routes
    }
    for route in routes:
        path = _concrete(route.path, uid)
        for method in route.methods:
            if path == "/healthz" or (path == "/login" and method == "POST"):
                continue
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}, {"Cookie": f"{COOKIE}=x"}):
                response = client.request(method, path, headers=headers, follow_redirects=False)
                assert response.status_code == 401, (method, path, headers)
    assert client.get("/no/such/page").status_code == 401  # unknown paths reveal nothing either
    assert client.get("/healthz").status_code == 200
    api = client.get("/api/worklist")
    assert api.headers["www-authenticate"].startswith("Bearer")
    page = client.get("/", headers={"Accept": "text/html"})
    assert page.status_code == 401 and 'name="token"' in page.text


def test_an_oversized_sign_in_form_is_refused_unread(client: TestClient) -> None:
    huge = client.post("/login", content=b"token=" + b"x" * 100_000, follow_redirects=False)
    assert huge.status_code == 413  # no token needed to reach /login, so its body is capped
    assert client.post("/login", data={"token": TOKEN}, follow_redirects=False).status_code == 303


def test_bearer_header_and_signin_cookie(client: TestClient) -> None:
    assert client.get("/api/worklist", headers=AUTH).status_code == 200
    bad = client.post("/login", data={"token": "nope", "next": "/queue"}, follow_redirects=False)
    assert bad.status_code == 401 and "not valid" in bad.text
    good = client.post("/login", data={"token": TOKEN, "next": "/queue"}, follow_redirects=False)
    assert good.status_code == 303 and good.headers["location"] == "/queue"
    cookie = good.headers["set-cookie"]
    assert f"{COOKIE}={TOKEN}" in cookie and "HttpOnly" in cookie and "SameSite=strict" in cookie
    assert client.get("/queue").status_code == 200  # the client now holds the cookie
    assert client.get("/api/worklist").status_code == 200
    client.post("/logout")
    assert client.get("/api/worklist").status_code == 401
    assert safe_next("//evil.example/") == "/" and safe_next("https://evil.example") == "/"
    assert safe_next("/audit?ae=PACS") == "/audit?ae=PACS"


def _cli_json(settings: Settings, command: str, *args: str) -> list[dict]:
    out = subprocess.run(
        edgenode_cmd(command, "--format", "json", *args),
        env=node_env(EDGENODE_NODE__DATA_DIR=str(settings.data_dir)),
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    return json.loads(out.stdout)


def test_api_serves_the_same_rows_as_the_cli(client: TestClient, node) -> None:
    settings, _, uids = node
    api = client.get("/api/worklist", headers=AUTH).json()
    assert api == _cli_json(settings, "worklist")
    assert [r["study_instance_uid"] for r in api] == [uids["high"], uids["low"], uids["waiting"]]
    assert client.get("/api/worklist?modality=DX", headers=AUTH).json() == _cli_json(
        settings, "worklist", "--modality", "DX"
    )
    audit = client.get(f"/api/audit?study_uid={uids['high']}", headers=AUTH).json()
    assert audit == _cli_json(settings, "audit", "--study-uid", uids["high"])
    assert {e["event_type"] for e in audit} >= {"instance.stored", "result.created", "send.ok"}
    bad = client.get("/api/worklist?since=yesterday", headers=AUTH)
    assert bad.status_code == 400 and "ISO date" in bad.json()["detail"]
    assert client.get("/api/worklist?status=bogus", headers=AUTH).status_code == 400


def test_study_api_page_and_heatmap(client: TestClient, node) -> None:
    _, _, uids = node
    detail = client.get(f"/api/studies/{uids['high']}", headers=AUTH).json()
    assert detail["score"] == pytest.approx(0.83) and detail["uncertainty"] == pytest.approx(0.04)
    job = detail["jobs"][0]
    assert job["timings"]["infer"] == pytest.approx(3.5)
    sc = [r for r in job["results"] if r["kind"] == "sc"]
    assert len(sc) == 2 and sc[0]["outbound"][0]["status"] == "sent"
    assert client.get("/api/studies/1.2.3.4", headers=AUTH).status_code == 404

    page = client.get(f"/studies/{uids['high']}", headers=AUTH)
    assert page.status_code == 200
    srcs = re.findall(r'<img src="([^"]+\.png)"', page.text)
    assert len(srcs) == 2 and "0.830" in page.text and "infer.reconstruct" in page.text
    png = client.get(srcs[0], headers=AUTH)
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    image = Image.open(io.BytesIO(png.content))
    assert image.size == (64, 64) and image.mode == "RGB"
    red, green, blue = image.getpixel((40, 16))  # the blob centre (x=40, y=16) is hot
    assert red > 200 and red > blue + 100
    other = client.get(f"/studies/{uids['low']}/results/{sc[0]['result_id']}.png", headers=AUTH)
    assert other.status_code == 404  # a result is only served under its own study


def test_heatmaps_render_from_a_results_folder_on_another_disk(client: TestClient, node, tmp_path: Path) -> None:
    settings, _, uids = node
    results = settings.spool_dir / "results"
    elsewhere = tmp_path / "other-disk" / "results"
    elsewhere.parent.mkdir()
    results.rename(elsewhere)
    results.symlink_to(elsewhere)  # results on their own volume: still the spool (retention agrees)
    page = client.get(f"/studies/{uids['high']}", headers=AUTH)
    srcs = re.findall(r'<img src="([^"]+\.png)"', page.text)
    assert srcs and all(client.get(src, headers=AUTH).status_code == 200 for src in srcs)


def test_pages_render(client: TestClient, node) -> None:
    _, _, uids = node
    worklist = client.get("/", headers=AUTH)
    order = re.findall(r'data-study-uid="([^"]+)"', worklist.text)
    assert order == [uids["high"], uids["low"], uids["waiting"]]
    queue = client.get("/queue", headers=AUTH)
    assert queue.status_code == 200 and "Undelivered results" in queue.text and "Out of resources" in queue.text
    audit = client.get("/audit?patient_id=P-HIGH", headers=AUTH)
    assert audit.status_code == 200 and "send.ok" in audit.text
    assert client.get("/?since=nonsense", headers=AUTH).status_code == 400


def test_metrics_read_the_database(client: TestClient) -> None:
    response = client.get("/metrics", headers=AUTH)
    assert response.status_code == 200
    families = {f.name: f for f in text_string_to_metric_families(response.text)}
    assert all(name.startswith("edgenode_") for name in families)

    def value(family: str, sample: str, **labels: str) -> float:
        return next(s.value for s in families[family].samples if s.name == sample and s.labels == labels)

    assert value("edgenode_instances_received", "edgenode_instances_received_total") == 6
    assert value("edgenode_send_failures", "edgenode_send_failures_total") == 1  # the pending one retried
    assert value("edgenode_jobs", "edgenode_jobs", state="done") == 2
    assert value("edgenode_jobs", "edgenode_jobs", state="queued") == 1
    assert value("edgenode_inference_seconds", "edgenode_inference_seconds_count") == 2
    assert value("edgenode_inference_seconds", "edgenode_inference_seconds_sum") == pytest.approx(4.0 + 42.0)
    assert value("edgenode_inference_seconds", "edgenode_inference_seconds_bucket", le="5.0") == 1
    assert value("edgenode_queue_wait_seconds", "edgenode_queue_wait_seconds_sum") == pytest.approx(101.5)
    assert value("edgenode_disk_free_bytes", "edgenode_disk_free_bytes") > 0
    assert value("edgenode_database_up", "edgenode_database_up") == 1


def test_healthz_reports_low_disk(node) -> None:
    settings, db, _ = node
    starved = settings.model_copy(deep=True)
    starved.node.min_free_disk_mb = 1 << 40  # more than any disk
    response = TestClient(create_app(starved, db)).get("/healthz")
    assert response.status_code == 503 and response.json()["disk"] == "low"


def test_public_health_check_keeps_the_database_error_to_itself(client: TestClient, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import node.web.health

    secret = "OperationalError: could not connect to db.internal:5432 as user pacs_rw"
    monkeypatch.setattr(node.web.health, "database_ok", lambda db: (False, secret))
    public = client.get("/healthz")
    assert public.status_code == 503 and public.json()["database"].startswith("unreachable")
    assert "db.internal" not in public.text
    assert "db.internal" in client.get("/api/queue", headers=AUTH).text  # with the token, the reason


def test_queue_page_and_metrics_count_the_same_states(client: TestClient) -> None:
    queue = client.get("/api/queue", headers=AUTH).json()
    families = {f.name: f for f in text_string_to_metric_families(client.get("/metrics", headers=AUTH).text)}
    for family, key in (
        ("edgenode_jobs", "jobs_by_state"),
        ("edgenode_studies", "studies_by_state"),
        ("edgenode_outbound_items", "outbound_by_state"),
    ):
        scraped = {s.labels["state"]: s.value for s in families[family].samples}
        assert scraped == {state: float(n) for state, n in queue[key].items()}
    assert queue["jobs_by_state"]["done"] == 2 and queue["outbound_by_state"]["pending"] >= 1


def test_token_generated_once_and_kept_private(tmp_path: Path) -> None:
    settings = load_settings(None, node={"data_dir": str(tmp_path)})
    first_out, second_out = io.StringIO(), io.StringIO()
    token = resolve_token(settings, announce=first_out)
    assert str(token_path(settings)) in first_out.getvalue() and len(token) >= 32
    assert token not in first_out.getvalue()  # never into logs: stderr goes to the journal
    assert stat.S_IMODE(token_path(settings).stat().st_mode) == 0o600
    assert resolve_token(settings, announce=second_out) == token and second_out.getvalue() == ""
    configured = load_settings(None, node={"data_dir": str(tmp_path)}, web={"token": "configured"})
    assert resolve_token(configured) == "configured"


def test_server_binds_loopback_by_default(node) -> None:
    settings, db, _ = node
    assert Settings().web.host == "127.0.0.1"
    server = WebServer(settings, db)
    server.start()
    try:
        assert server.url.startswith("http://127.0.0.1:")
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as conn:
            assert conn.getpeername()[0] == "127.0.0.1"
        assert httpx.get(f"{server.url}/api/worklist", timeout=10).status_code == 401
        assert httpx.get(f"{server.url}/api/worklist", headers=AUTH, timeout=10).status_code == 200
        assert httpx.get(f"{server.url}/healthz", timeout=10).json()["status"] == "ok"
        clash = settings.model_copy(deep=True)
        clash.web.port = server.port
        with pytest.raises(OSError, match="could not listen"):
            WebServer(clash, db, startup_timeout=10).start()
    finally:
        server.stop()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{server.url}/healthz", timeout=2)


def test_web_and_retention_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    defaults = Settings()
    assert defaults.web.worklist_limit == 500 and defaults.retention.interval_minutes == 60
    monkeypatch.setenv("EDGENODE_WEB__WORKLIST_LIMIT", "50")
    monkeypatch.setenv("EDGENODE_RETENTION__INTERVAL_MINUTES", "15")
    loaded = load_settings(None)
    assert loaded.web.worklist_limit == 50 and loaded.retention.interval_minutes == 15


def test_worker_time_is_the_sum_of_top_level_stages() -> None:
    """infer.<stage> keys are parts of infer; queue_wait and send are waiting and delivery, not work."""
    timings = {"queue_wait": 9.0, "infer": 2.0, "infer.reconstruct": 1.9, "infer.load": 0.1, "encode": 0.5, "send": 3}
    assert inference_seconds(timings) == pytest.approx(2.5)
    assert queue_wait_seconds(timings) == pytest.approx(9.0)
    assert inference_seconds({"queue_wait": 1.0}) is None and inference_seconds({}) is None
    assert inference_seconds(None) is None and queue_wait_seconds({"infer": 1.0}) is None
    # When the worker recorded its whole time on the job, that is the figure (stages are parts of it).
    assert inference_seconds({**timings, "load": 0.4, "total": 3.1}) == pytest.approx(3.1)


def test_healthz_reports_dead_workers(node) -> None:
    """With the node's worker count visible, fewer live workers than configured is unhealthy."""
    settings, db, _ = node
    assert settings.inference.workers == 1
    dead = TestClient(create_app(settings, db, workers_alive=lambda: 0)).get("/healthz")
    assert dead.status_code == 503 and dead.json()["workers"] == "0 of 1 alive"
    alive = TestClient(create_app(settings, db, workers_alive=lambda: 1)).get("/healthz")
    assert alive.status_code == 200 and alive.json()["workers"] == "ok"
    unseen = TestClient(create_app(settings, db)).get("/healthz")
    assert unseen.status_code == 200 and unseen.json()["workers"] == "not visible here"


def test_serve_with_the_dashboard_port_taken_says_so_in_one_line(tmp_path: Path) -> None:
    import socket
    import subprocess

    from tests.conftest import edgenode_cmd, node_env
    from tests.ingest_support import node_settings, write_toml

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        settings = node_settings(tmp_path / "var", web={"enabled": True, "port": port, "token": TOKEN})
        config = write_toml(settings, tmp_path / "edgenode.toml")
        done = subprocess.run(
            edgenode_cmd("serve", "--config", str(config)), env=node_env(), capture_output=True, text=True, timeout=120
        )
    assert done.returncode == 1
    assert f"web dashboard could not listen on 127.0.0.1:{port}" in done.stderr and "Traceback" not in done.stderr


def test_out_of_range_query_values_are_client_errors_not_500(client: TestClient) -> None:
    for path in (
        "/api/worklist?since=99999999999d",
        "/api/audit?until=99999999999h",
        "/api/worklist?limit=100000000000000000000000",
        "/api/audit?limit=-1",
        "/studies/1.2.3/results/99999999999999999999999.png",
    ):
        assert 400 <= client.get(path, headers=AUTH).status_code < 500, path
