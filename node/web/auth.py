"""The token on every route but /healthz: one middleware (so no route can forget it), and the sign-in form that
turns a token into an HttpOnly, SameSite=Strict cookie.

Without the token: 401, as JSON for the API and /metrics (and any client that does not ask for HTML), as the
sign-in form for pages.
"""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable
from urllib.parse import parse_qs

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

from node.web.context import WebContext

COOKIE = "edgenode_token"
PUBLIC_PATHS = frozenset({"/healthz"})
LOGIN_PATH = "/login"
LOGIN_BODY_LIMIT = 4096  # bytes: a token, a next path and the form encoding fit many times over


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


def sign_in_form(ctx: WebContext, request: Request, next_path: str, error: str = "") -> HTMLResponse:
    return ctx.page(request, "login.html", 401, next_path=safe_next(next_path), error=error)


def require_token(app: FastAPI, ctx: WebContext) -> None:
    """Install the middleware that lets through only requests carrying the node's token."""

    @app.middleware("http")
    async def check_token(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        path = request.url.path
        if path in PUBLIC_PATHS or (path == LOGIN_PATH and request.method == "POST"):
            return await call_next(request)
        if token_matches(presented_token(request), ctx.token):
            return await call_next(request)
        if path.startswith("/api/") or path == "/metrics" or "text/html" not in request.headers.get("accept", ""):
            return JSONResponse(
                {"detail": "missing or wrong token: send 'Authorization: Bearer <token>'"},
                status_code=401,
                headers={"WWW-Authenticate": 'Bearer realm="edgenode"'},
            )
        target = path + (f"?{request.url.query}" if request.url.query else "")
        return sign_in_form(ctx, request, "/" if path == LOGIN_PATH else target)


def add_sign_in_routes(app: FastAPI, ctx: WebContext) -> None:

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
        if not token_matches(given, ctx.token):
            return sign_in_form(ctx, request, next_path, error="That token is not valid.")
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
