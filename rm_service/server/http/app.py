"""The ASGI app: routes of every HTTP module, auth, and errors as HTTP statuses in one place.

Every error an HTTP route raises is an RMError mapped by errors.HTTP_STATUS (bad input 400,
no or unknown token 401, wrong role 403, unknown task 404, a lost lease or a conflicting
retry 409, overload 429) and answered as JSON `{"error": message, "status": code}`. Anything
else is a bug: logged, answered 500 without details.

Auth is the gRPC side's (server.auth): `authorization: Bearer <token>` with the route's role,
admin passing everywhere. With no tokens configured the server binds loopback only and every
caller is the anonymous admin `anonymous`.

What is mounted follows what the process serves: the reward routes (reward_routes) when it
serves a model, the labeling page and its API (labeling, admin) when it holds the store, and
`GET /health` always (200 when ready, 503 otherwise; open, like gRPC health).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from rm_service.errors import (
    Cancelled,
    InvalidArgument,
    Overloaded,
    RMError,
    Unauthenticated,
    Unavailable,
    http_status,
)
from rm_service.server.auth import ADMIN, Tokens, authorize, bearer_token, identity
from rm_service.settings import ServeSettings
from rm_service.store.db import Store
from rm_service.store.writer import GroupCommitWriter

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
ANONYMOUS = "anonymous"
MAX_BODY_BYTES = 1 << 20


@dataclass
class HttpContext:
    """What the routes use, all owned by the RewardServer of this process."""

    store: Store | None  # None in a process without the store (`serve --no-store`): no labeling routes
    writer: GroupCommitWriter | None
    tokens: Tokens
    settings: ServeSettings
    reward: object | None = (
        None  # server.reward.RewardService when this process serves a model: the reward routes, suggestions
    )
    metrics: object | None = None  # server.metrics.Metrics: the reward routes count requests by route and status
    readiness: Callable[[], str] = lambda: "serving"  # "serving" when loaded, warmed and not draining, else why not
    user: object | None = None  # server.user.UserService when this process serves a user model: POST /simulate_user


@dataclass(frozen=True)
class Caller:
    annotator: str  # identity(role, token), or ANONYMOUS when auth is off
    role: str


def context(request: Request) -> HttpContext:
    return request.app.state.ctx


def caller(request: Request, needed: str) -> Caller:
    """Who calls, if they may call a route that needs the `needed` role (server.auth.authorize)."""
    ctx = context(request)
    if not ctx.tokens:
        return Caller(ANONYMOUS, ADMIN)
    token = bearer_token(request.headers.items())
    role = authorize(ctx.tokens, token, needed, f"{request.method} {request.url.path}")
    return Caller(identity(role, token), role)


async def read_json(request: Request, limit: int = MAX_BODY_BYTES) -> dict:
    """The request body as a JSON object (InvalidArgument otherwise), at most `limit` bytes: a
    larger Content-Length is refused before anything is read, a longer stream as it passes it."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise InvalidArgument("body", f"is larger than the limit of {limit} bytes (Content-Length {int(declared)})")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise InvalidArgument("body", f"is larger than the limit of {limit} bytes")
    if not body.strip():
        return {}
    try:
        value = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidArgument("body", f"is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise InvalidArgument("body", f"must be a JSON object, got {type(value).__name__}")
    return value


def counted(route: str):
    """Count a route's finished requests by status and time them (server.metrics: rm_http_requests_total,
    rm_http_request_seconds), errors included with the status they are answered with."""

    def wrap(endpoint):
        @functools.wraps(endpoint)
        async def run(request: Request):
            start, status = time.perf_counter(), 500
            try:
                response = await endpoint(request)
                status = response.status_code
                return response
            except RMError as exc:
                status = http_status(exc)
                raise
            finally:
                metrics = context(request).metrics
                if metrics is not None:
                    metrics.http_request(route, status, time.perf_counter() - start)

        return run

    return wrap


async def until_disconnect(request: Request, work) -> object:
    """Await `work` (a coroutine), cancelled when the caller disconnects: its admission permit is
    released and its queued work dropped before it reaches the model, as for a cancelled gRPC call."""
    task = asyncio.ensure_future(work)
    left = asyncio.Event()

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":  # the body is read: only a disconnect can come
            await asyncio.sleep(0.05)  # never a busy loop, whatever the server answers
        left.set()
        task.cancel()

    watcher = asyncio.get_running_loop().create_task(watch())
    try:
        return await task
    except asyncio.CancelledError:
        if not left.is_set():
            raise  # this handler itself was cancelled (shutdown)
        raise Cancelled("the caller disconnected before its answer was ready") from None
    finally:
        watcher.cancel()


def finite(value):
    """JSON has no NaN: an undefined statistic is null."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "status": status}, status_code=status, headers=headers)


async def _rm_error(request: Request, exc: RMError) -> JSONResponse:
    status = http_status(exc)
    if status >= 500:
        log.warning("%s %s: %s", request.method, request.url.path, exc)
    headers = None
    if isinstance(exc, Unauthenticated):
        headers = {"WWW-Authenticate": 'Bearer realm="rm-service"'}
    elif isinstance(exc, (Overloaded, Unavailable)):
        headers = {"Retry-After": "1"}  # 429 and 503 are worth retrying: say so, as gRPC clients know for their codes
    return _error(status, str(exc), headers)


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    return _error(exc.status_code, exc.detail, exc.headers)  # unknown route 404, wrong method 405


async def _internal(request: Request, exc: Exception) -> JSONResponse:
    log.error("internal error in %s %s", request.method, request.url.path, exc_info=exc)
    return _error(500, f"internal error: {type(exc).__name__}")


_templates = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(["html"]))


# Pages load only their own scripts and styles and are never framed: text from the store is set
# with textContent, and even a slip there could not run inline script or leak the token.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def page(name: str, title: str):
    """A route that renders one page shell; the page fetches its data from the JSON API."""
    template = _templates.get_template(name)

    async def render(request: Request) -> HTMLResponse:
        return HTMLResponse(template.render(title=title), headers=PAGE_HEADERS)

    return render


@counted("/health")
async def health(request: Request) -> JSONResponse:
    """200 only when the process is ready (its model loaded and warmed, when it serves one), 503
    while it starts, loads or drains (TEI's semantics). Open, like gRPC health: probes need no token."""
    why = context(request).readiness()
    if why == "serving":
        return JSONResponse({"status": "SERVING"})
    return JSONResponse({"status": "NOT_SERVING", "reason": why}, status_code=503, headers={"Retry-After": "1"})


def create_app(ctx: HttpContext) -> Starlette:
    from rm_service.server.http import admin, labeling, reward_routes, user_routes

    routes = [Route("/health", health, methods=["GET"])]
    if ctx.reward is not None:
        routes += reward_routes.routes()
    if ctx.user is not None:
        routes += user_routes.routes()
    if ctx.store is not None:
        routes += [
            Route("/", page("label.html", "Label"), name="label"),
            Route("/admin", page("admin.html", "Agreement"), name="admin"),
            Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
            *labeling.routes(),
            *admin.routes(),
        ]
    app = Starlette(
        routes=routes, exception_handlers={RMError: _rm_error, HTTPException: _http_error, Exception: _internal}
    )
    app.state.ctx = ctx
    return app
