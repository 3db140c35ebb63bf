"""The REST API (same rows and field names as `edgenode worklist|audit --format json`), /metrics and /healthz."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, HTTPException, Query
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from db.queries import audit_events, queue_summary, study_detail, worklist
from node.web.context import WebContext
from node.web.filters import MAX_ROWS, audit_filter, worklist_filter

log = logging.getLogger(__name__)


def add_api_routes(app: FastAPI, ctx: WebContext) -> None:
    db = ctx.db

    @app.get("/api/worklist")
    def api_worklist(
        status: list[str] = Query(default=[]),
        since: str | None = None,
        until: str | None = None,
        modality: str = "",
        min_score: float | None = None,
        limit: int = Query(default=ctx.settings.web.worklist_limit, ge=0, le=MAX_ROWS),
    ) -> list[dict[str, Any]]:
        flt = worklist_filter(status, since, until, modality, min_score, limit)
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
        flt = audit_filter(patient_id, accession, study_uid, ae, event_type, since, until, limit)
        with db.session() as session:
            return audit_events(session, flt)

    @app.get("/api/queue")
    def api_queue() -> dict[str, Any]:
        with db.session() as session:
            summary = queue_summary(session)
        summary["health"] = ctx.health().as_dict()
        return summary

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(ctx.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/healthz")
    def healthz() -> JSONResponse:
        health = ctx.health()
        if not health.database_ok:
            log.warning("health check: database unreachable: %s", health.database_error)
        return JSONResponse(health.as_dict(detail=False), status_code=200 if health.ok else 503)
