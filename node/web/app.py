"""The dashboard and REST API: one FastAPI app per node, reading the same queries as the CLI.

Every route except /healthz needs the token, as `Authorization: Bearer <token>` or as the
HttpOnly, SameSite=Strict cookie that the sign-in form sets. Without it: 401 (JSON for the API
and /metrics, the sign-in form for pages), checked in one middleware so no route can forget it.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import parse_qs, urlencode

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi import Path as FastAPIPath
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from db.jobs import inference_seconds
from db.models import StudyStatus
from db.queries import (
    AUDIT_FIELDS,
    WORKLIST_FIELDS,
    AuditFilter,
    WorklistFilter,
    audit_events,
    parse_time,
    queue_summary,
    result_path,
    study_detail,
    worklist,
)
from db.session import Database
from node.config import Settings
from node.inference_server import TritonMonitor, uses_triton
from node.metrics import build_registry
from node.web.health import check_health
from node.web.result_png import HeatmapError, render_png, spool_file
from node.web.token import resolve_token

HERE = Path(__file__).parent
log = logging.getLogger(__name__)
MAX_ROWS = 1_000_000  # bounds for numeric query parameters: beyond them SQLite's integers overflow (a 500)
MAX_ID = 2**63 - 1
LOGIN_BODY_LIMIT = 4096  # bytes: a token, a next path and the form encoding fit many times over
COOKIE = "edgenode_token"
PUBLIC_PATHS = frozenset({"/healthz"})
LOGIN_PATH = "/login"
STAGE_LABELS = {  # jobs.timings keys written by the worker (and the sender), as the study page names them
    "queue_wait": "queue_wait (waiting for a worker)",
    "infer": "infer (inference pipeline, all series)",
    "encode": "encode (SEG, SC and SR written)",
    "send": "send (delivery)",
}


def presented_token(request: Request) -> str:
    """The token a request carries: the bearer header first, then the sign-in cookie."""
    scheme, _, credential = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and credential.strip():
        return credential.strip()
    return request.cookies.get(COOKIE, "")


def token_matches(presented: str, expected: str) -> bool:
    return bool(presented) and secrets.compare_digest(presented.encode(), expected.encode())


def safe_next(target: str) -> str:
    """Only same-site paths after sign-in (no open redirect to //other.host)."""
    return target if target.startswith("/") and not target.startswith("//") and "\\" not in target else "/"


def _parse_time_param(name: str, value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        return parse_time(value)
    except ValueError as exc:
        raise HTTPException(status_code=400, detail=f"{name}: {exc}") from None


def _worklist_filter(
    status: list[str], since: str | None, until: str | None, modality: str, min_score: float | None, limit: int
) -> WorklistFilter:
    known = {str(s) for s in StudyStatus}
    statuses = tuple(s for s in status if s)
    for value in statuses:
        if value not in known:
            raise HTTPException(status_code=400, detail=f"status: {value!r} is not one of {', '.join(sorted(known))}")
    return WorklistFilter(
        statuses=statuses,
        since=_parse_time_param("since", since),
        until=_parse_time_param("until", until),
        modality=modality.strip(),
        min_score=min_score,
        limit=limit or None,
    )


def _audit_filter(
    patient_id: str,
    accession: str,
    study_uid: str,
    ae: str,
    event_type: str,
    since: str | None,
    until: str | None,
    limit: int,
) -> AuditFilter:
    return AuditFilter(
        patient_id=patient_id.strip(),
        accession=accession.strip(),
        study_uid=study_uid.strip(),
        ae=ae.strip(),
        event_type=event_type.strip(),
        since=_parse_time_param("since", since),
        until=_parse_time_param("until", until),
        limit=limit or None,
    )


def create_app(
    settings: Settings, db: Database, token: str | None = None, workers_alive: Callable[[], int] | None = None
) -> FastAPI:
    """Build the app for this node; the token defaults to web.token or the stored/generated one.

    `workers_alive` (from the node's worker supervisor) lets /healthz report dead inference workers."""
    expected = token or resolve_token(settings)
    triton = TritonMonitor(settings) if uses_triton(settings) else None
    registry = build_registry(settings, db, triton)
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    templates.env.globals["stylesheet"] = (HERE / "static" / "style.css").read_text(encoding="utf-8")
    templates.env.globals["node_ae"] = settings.node.ae_title
    templates.env.globals["worker_seconds"] = inference_seconds
    templates.env.globals["stage_labels"] = STAGE_LABELS
    templates.env.filters["secs"] = lambda v: "" if v is None else f"{v:.2f} s"
    templates.env.filters["num"] = lambda v, d=3: "" if v is None else f"{v:.{d}f}"
    app = FastAPI(title="edgenode", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.settings = settings
    app.state.db = db

    def page(request: Request, name: str, status_code: int = 200, **context: Any) -> HTMLResponse:
        return templates.TemplateResponse(request, name, context, status_code=status_code)

    def sign_in_form(request: Request, next_path: str, error: str = "") -> HTMLResponse:
        return page(request, "login.html", 401, next_path=safe_next(next_path), error=error)

    @app.middleware("http")
    async def require_token(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        path = request.url.path
        if path in PUBLIC_PATHS or (path == LOGIN_PATH and request.method == "POST"):
            return await call_next(request)
        if token_matches(presented_token(request), expected):
            return await call_next(request)
        if path.startswith("/api/") or path == "/metrics" or "text/html" not in request.headers.get("accept", ""):
            return JSONResponse(
                {"detail": "missing or wrong token: send 'Authorization: Bearer <token>'"},
                status_code=401,
                headers={"WWW-Authenticate": 'Bearer realm="edgenode"'},
            )
        target = path + (f"?{request.url.query}" if request.url.query else "")
        return sign_in_form(request, "/" if path == LOGIN_PATH else target)

    @app.post(LOGIN_PATH, include_in_schema=False)
    async def login(request: Request) -> Response:
        # Reachable without the token: read at most a sign-in form's worth, so nobody can make the node (listener
        # included, same process) buffer an arbitrarily large body.
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > LOGIN_BODY_LIMIT:
                return JSONResponse({"detail": "sign-in form too large"}, status_code=413)
        form = parse_qs(bytes(body).decode("utf-8", "replace"))
        given = (form.get("token") or [""])[0].strip()
        next_path = safe_next((form.get("next") or ["/"])[0])
        if not token_matches(given, expected):
            return sign_in_form(request, next_path, error="That token is not valid.")
        response = RedirectResponse(next_path, status_code=303)
        response.set_cookie(
            COOKIE, given, httponly=True, samesite="strict", secure=request.url.scheme == "https", path="/"
        )
        return response

    @app.post("/logout", include_in_schema=False)
    def logout() -> Response:
        response = RedirectResponse("/", status_code=303)
        response.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict")
        return response

    # --- REST API: same rows and field names as `edgenode worklist|audit --format json` ---

    @app.get("/api/worklist")
    def api_worklist(
        status: list[str] = Query(default=[]),
        since: str | None = None,
        until: str | None = None,
        modality: str = "",
        min_score: float | None = None,
        limit: int = Query(default=settings.web.worklist_limit, ge=0, le=MAX_ROWS),
    ) -> list[dict[str, Any]]:
        flt = _worklist_filter(status, since, until, modality, min_score, limit)
        with db.session() as session:
            return worklist(session, flt)

    @app.get("/api/studies/{study_uid}")
    def api_study(study_uid: str) -> dict[str, Any]:
        with db.session() as session:
            detail = study_detail(session, study_uid)
        if detail is None:
            raise HTTPException(status_code=404, detail=f"no study {study_uid}")
        return detail

    @app.get("/api/audit")
    def api_audit(
        patient_id: str = "",
        accession: str = "",
        study_uid: str = "",
        ae: str = "",
        event_type: str = "",
        since: str | None = None,
        until: str | None = None,
        limit: int = Query(default=1000, ge=0, le=MAX_ROWS),
    ) -> list[dict[str, Any]]:
        flt = _audit_filter(patient_id, accession, study_uid, ae, event_type, since, until, limit)
        with db.session() as session:
            return audit_events(session, flt)

    @app.get("/api/queue")
    def api_queue() -> dict[str, Any]:
        with db.session() as session:
            summary = queue_summary(session)
        summary["health"] = check_health(settings, db, workers_alive, triton).as_dict()
        return summary

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/healthz")
    def healthz() -> JSONResponse:
        health = check_health(settings, db, workers_alive, triton)
        if not health.database_ok:
            log.warning("health check: database unreachable: %s", health.database_error)
        return JSONResponse(health.as_dict(detail=False), status_code=200 if health.ok else 503)

    # --- Pages ---

    @app.get("/", response_class=HTMLResponse)
    def worklist_page(
        request: Request,
        status: str = "",
        since: str = "",
        until: str = "",
        modality: str = "",
        min_score: str = "",
    ) -> HTMLResponse:
        error = ""
        rows: list[dict[str, Any]] = []
        try:
            score = float(min_score) if min_score.strip() else None
            flt = _worklist_filter([status], since, until, modality, score, settings.web.worklist_limit)
            with db.session() as session:
                rows = worklist(session, flt)
        except (HTTPException, ValueError) as exc:
            error = exc.detail if isinstance(exc, HTTPException) else f"min_score: {exc}"
        form = {"status": status, "since": since, "until": until, "modality": modality, "min_score": min_score}
        return page(
            request,
            "worklist.html",
            400 if error else 200,
            rows=rows,
            form=form,
            error=error,
            statuses=[str(s) for s in StudyStatus],
            fields=WORKLIST_FIELDS,
        )

    @app.get("/studies/{study_uid}", response_class=HTMLResponse)
    def study_page(request: Request, study_uid: str) -> HTMLResponse:
        with db.session() as session:
            detail = study_detail(session, study_uid)
        if detail is None:
            return page(request, "not_found.html", 404, what=f"study {study_uid}")
        return page(request, "study.html", study=detail)

    @app.get("/studies/{study_uid}/results/{result_id}.png")
    def heatmap_png(
        study_uid: str,
        result_id: Annotated[int, FastAPIPath(ge=1, le=MAX_ID)],
        frame: Annotated[int | None, Query(ge=0, le=MAX_ID)] = None,
    ) -> Response:
        with db.session() as session:
            found = result_path(session, study_uid, result_id)
        if found is None:
            raise HTTPException(status_code=404, detail=f"study {study_uid} has no result {result_id}")
        try:
            png = render_png(spool_file(settings.spool_dir, found[1]), frame)
        except HeatmapError as exc:
            raise HTTPException(status_code=404, detail=str(exc)) from None
        return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})

    @app.get("/queue", response_class=HTMLResponse)
    def queue_page(request: Request) -> HTMLResponse:
        with db.session() as session:
            summary = queue_summary(session)
        health = check_health(settings, db, workers_alive, triton)
        return page(request, "queue.html", q=summary, health=health.as_dict(), web=settings.web)

    @app.get("/audit", response_class=HTMLResponse)
    def audit_page(
        request: Request,
        patient_id: str = "",
        accession: str = "",
        study_uid: str = "",
        ae: str = "",
        event_type: str = "",
        since: str = "",
        until: str = "",
    ) -> HTMLResponse:
        form = {
            "patient_id": patient_id,
            "accession": accession,
            "study_uid": study_uid,
            "ae": ae,
            "event_type": event_type,
            "since": since,
            "until": until,
        }
        error = ""
        rows: list[dict[str, Any]] = []
        try:
            flt = _audit_filter(patient_id, accession, study_uid, ae, event_type, since, until, 500)
            with db.session() as session:
                rows = audit_events(session, flt)
        except HTTPException as exc:
            error = str(exc.detail)
        rows.reverse()  # newest first on screen
        query = urlencode({k: v for k, v in form.items() if v})
        return page(
            request,
            "audit.html",
            400 if error else 200,
            rows=rows,
            form=form,
            error=error,
            fields=AUDIT_FIELDS,
            csv_query=query,
        )

    return app
