"""The dashboard's pages: worklist, study (with its heatmaps), queue and audit."""

from __future__ import annotations

from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi import Path as FastAPIPath
from fastapi.responses import HTMLResponse, Response

from db.models import StudyStatus
from db.queries import AUDIT_FIELDS, WORKLIST_FIELDS, audit_events, queue_summary, result_path, study_detail, worklist
from node.web.context import WebContext
from node.web.filters import MAX_ID, audit_filter, worklist_filter
from node.web.result_png import HeatmapError, render_png, spool_file

AUDIT_PAGE_ROWS = 500


def add_page_routes(app: FastAPI, ctx: WebContext) -> None:
    settings, db = ctx.settings, ctx.db

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
            flt = worklist_filter([status], since, until, modality, score, settings.web.worklist_limit)
            with db.session() as session:
                rows = worklist(session, flt)
        except (HTTPException, ValueError) as exc:
            error = exc.detail if isinstance(exc, HTTPException) else f"min_score: {exc}"
        form = {"status": status, "since": since, "until": until, "modality": modality, "min_score": min_score}
        return ctx.page(
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
            return ctx.page(request, "not_found.html", 404, what=f"study {study_uid}")
        return ctx.page(request, "study.html", study=detail)

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
        return ctx.page(request, "queue.html", q=summary, health=ctx.health().as_dict(), web=settings.web)

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
            flt = audit_filter(patient_id, accession, study_uid, ae, event_type, since, until, AUDIT_PAGE_ROWS)
            with db.session() as session:
                rows = audit_events(session, flt)
        except HTTPException as exc:
            error = str(exc.detail)
        rows.reverse()  # newest first on screen
        query = urlencode({k: v for k, v in form.items() if v})
        return ctx.page(
            request,
            "audit.html",
            400 if error else 200,
            rows=rows,
            form=form,
            error=error,
            fields=AUDIT_FIELDS,
            csv_query=query,
        )
