"""The dashboard and REST API: one FastAPI app per node, reading the same queries as the CLI.

Every route except /healthz needs the token (node/web/auth.py); the routes are grouped by what they serve: the
sign-in form (auth.py), the API with /metrics and /healthz (api.py) and the pages (pages.py), each built from the
one WebContext (context.py).
"""

from __future__ import annotations

from collections.abc import Callable

from fastapi import FastAPI

from db.session import Database
from node.config import Settings
from node.web.api import add_api_routes
from node.web.auth import COOKIE, add_sign_in_routes, require_token, safe_next
from node.web.context import WebContext
from node.web.pages import add_page_routes

__all__ = ["COOKIE", "create_app", "safe_next"]


def create_app(
    settings: Settings, db: Database, token: str | None = None, workers_alive: Callable[[], int] | None = None
) -> FastAPI:
    """Build the app for this node; the token defaults to web.token or the stored/generated one.

    `workers_alive` (from the node's worker supervisor) lets /healthz report dead inference workers."""
    ctx = WebContext.build(settings, db, token, workers_alive)
    app = FastAPI(title="edgenode", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.settings = settings
    app.state.db = db
    require_token(app, ctx)
    add_sign_in_routes(app, ctx)
    add_api_routes(app, ctx)
    add_page_routes(app, ctx)
    return app
