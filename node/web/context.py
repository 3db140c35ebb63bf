"""What every route of the dashboard and API needs: the node's settings and database, the token, the templates,
the metrics registry and the health inputs; built once by `create_app` and handed to each group of routes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi.responses import HTMLResponse
from fastapi.templating import Jinja2Templates
from prometheus_client import CollectorRegistry
from starlette.requests import Request

from db.jobs import inference_seconds
from db.session import Database
from node.config import Settings
from node.inference_server import TritonMonitor, uses_triton
from node.metrics import build_registry
from node.web.health import Health, check_health
from node.web.token import resolve_token

HERE = Path(__file__).parent
STAGE_LABELS = {  # jobs.timings keys written by the worker (and the sender), as the study page names them
    "queue_wait": "queue_wait (waiting for a worker)",
    "infer": "infer (inference pipeline, all series)",
    "encode": "encode (SEG, SC and SR written)",
    "send": "send (delivery)",
}


@dataclass
class WebContext:
    settings: Settings
    db: Database
    token: str  # what a request must present
    templates: Jinja2Templates
    registry: CollectorRegistry
    triton: TritonMonitor | None
    workers_alive: Callable[[], int] | None  # from the node's worker supervisor: /healthz reports dead workers

    @classmethod
    def build(
        cls, settings: Settings, db: Database, token: str | None, workers_alive: Callable[[], int] | None
    ) -> WebContext:
        """The token defaults to web.token or the stored/generated one."""
        triton = TritonMonitor(settings) if uses_triton(settings) else None
        return cls(
            settings=settings,
            db=db,
            token=token or resolve_token(settings),
            templates=_templates(settings),
            registry=build_registry(settings, db, triton),
            triton=triton,
            workers_alive=workers_alive,
        )

    def page(self, request: Request, name: str, status_code: int = 200, **context: Any) -> HTMLResponse:
        return self.templates.TemplateResponse(request, name, context, status_code=status_code)

    def health(self) -> Health:
        return check_health(self.settings, self.db, self.workers_alive, self.triton)


def _templates(settings: Settings) -> Jinja2Templates:
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    templates.env.globals["stylesheet"] = (HERE / "static" / "style.css").read_text(encoding="utf-8")
    templates.env.globals["node_ae"] = settings.node.ae_title
    templates.env.globals["worker_seconds"] = inference_seconds
    templates.env.globals["stage_labels"] = STAGE_LABELS
    templates.env.filters["secs"] = lambda v: "" if v is None else f"{v:.2f} s"
    templates.env.filters["num"] = lambda v, d=3: "" if v is None else f"{v:.{d}f}"
    return templates
