"""The ASGI app: routes of every HTTP module, auth, and errors as HTTP statuses in one place.

Every error an HTTP route raises is an RMError mapped by errors.HTTP_STATUS (bad input 400,
no or unknown token 401, wrong role 403, unknown task 404, a lost lease or a conflicting
retry 409, overload 429) and answered as JSON `{"error": message, "status": code}` (on vLLM's
routes, /classify, /pooling and /v1/*, in vLLM's shape: `{"error": {"message", "type", "param",
"code"}}`, param the field). Anything
else is a bug: logged, answered 500 without details.

Auth is the gRPC side's (server.auth): `authorization: Bearer <token>` with the route's role,
admin passing everywhere; HTTP Basic with the token as password is taken too (server.auth.http_token),
for clients that cannot set a header but can put credentials in a URL (OpenRLHF's --remote_rm_url).
With no tokens configured the server binds loopback only and every
caller is the anonymous admin `anonymous`.

What is mounted follows what the process serves: the reward routes (reward_routes) when it
serves a model, the labeling page and its API (labeling, admin) when it holds the store, and
`GET /health` always (200 when ready, 503 otherwise; open, like gRPC health), with `GET /ping`
(vLLM's name for it), `GET /metrics` (the process's Prometheus registry, as on the metrics port)
and `GET /openapi.json` and `/docs` (server.http.openapi: the routes mounted, described).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from jinja2 import Environment, FileSystemLoader, select_autoescape
from prometheus_client import make_asgi_app
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from rm_service.errors import Cancelled, Overloaded, RMError, Unauthenticated, Unavailable, http_status
from rm_service.server.admission import Ticket
from rm_service.server.auth import ADMIN, Tokens, authorize, http_token, identity
from rm_service.server.http.guard import Guard, allowed_hosts
from rm_service.server.scoring import ScoringCore
from rm_service.server.user import UserService
from rm_service.settings import ServeSettings
from rm_service.store.db import Store
from rm_service.store.writer import GroupCommitWriter

if TYPE_CHECKING:
    from rm_service.server.metrics import Metrics

log = logging.getLogger(__name__)
T = TypeVar("T")

HERE = Path(__file__).resolve().parent
ANONYMOUS = "anonymous"
HTTP_TICKET = Ticket(None)  # an HTTP call's claim on the queue: no deadline; a disconnect cancels it (until_disconnect)


@dataclass
class HttpContext:
    """What the routes use, all owned by the RewardServer of this process."""

    store: Store | None  # None in a process without the store (`serve --no-store`): no labeling routes
    writer: GroupCommitWriter | None
    tokens: Tokens
    settings: ServeSettings
    reward: ScoringCore | None = None  # the scoring core when this process serves a model: the reward routes
    metrics: Metrics | None = None  # the reward routes count requests by route and status
    readiness: Callable[[], str] = lambda: "serving"  # "serving" when loaded, warmed and not draining, else why not
    models: Callable[[], dict] = dict  # the served versions, their weight bytes and failed loads (ServedModels.health)
    user: UserService | None = None  # when this process serves a user model: POST /simulate_user

    # The routes that use an optional part are mounted only when it is set (create_app); these give it to them.
    def need_store(self) -> Store:
        return _present(self.store, "store")

    def need_writer(self) -> GroupCommitWriter:
        return _present(self.writer, "store")

    def need_reward(self) -> ScoringCore:
        return _present(self.reward, "reward model")

    def need_user(self) -> UserService:
        return _present(self.user, "user model")


def _present(part: T | None, what: str) -> T:
    if part is None:
        raise Unavailable(f"this server has no {what}")
    return part


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
    token = http_token(request.headers.items())
    role = authorize(ctx.tokens, token, needed, f"{request.method} {request.url.path}")
    assert token is not None  # authorize gives a role only to a token
    return Caller(identity(role, token), role)


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


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
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


VLLM_PATHS = ("/classify", "/pooling", "/v1/")  # routes whose errors take vLLM's shape, for vLLM's clients


def _error(
    status: int,
    message: str,
    headers: Mapping[str, str] | None = None,
    request: Request | None = None,
    param: str | None = None,
) -> JSONResponse:
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")  # a lone surrogate a client sent, quoted
    if request is not None and request.url.path.startswith(VLLM_PATHS):  # vLLM's ErrorResponse, for its clients
        phrase = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else "Client Closed Request"
        kind = phrase.title().replace(" ", "").replace("-", "") + "Error"  # BadRequestError, NotFoundError...
        body = {"error": {"message": message, "type": kind, "param": param, "code": status}}
        return JSONResponse(body, status_code=status, headers=headers)
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
    return _error(status, str(exc), headers, request, getattr(exc, "field", None))


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    return _error(exc.status_code, exc.detail, exc.headers, request)  # unknown route 404, wrong method 405


async def _internal(request: Request, exc: Exception) -> JSONResponse:
    log.error("internal error in %s %s", request.method, request.url.path, exc_info=exc)
    return _error(500, f"internal error: {type(exc).__name__}", None, request)


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
    ctx = context(request)
    why, models = ctx.readiness(), ({"models": ctx.models()} if ctx.reward is not None else {})
    if why == "serving":
        return JSONResponse({"status": "SERVING", **models})
    return JSONResponse(
        {"status": "NOT_SERVING", "reason": why, **models}, status_code=503, headers={"Retry-After": "1"}
    )


class _Asgi:
    """An ASGI app as a Route's endpoint (a plain function would be called as a request handler)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        await self.app(scope, receive, send)


def create_app(ctx: HttpContext) -> Starlette:
    from rm_service.server.http import admin, labeling, openapi, reward_routes, user_routes

    routes: list[BaseRoute] = [
        Route("/health", health, methods=["GET"]),
        Route("/ping", health, methods=["GET"]),  # vLLM's name for it
    ]
    routes += openapi.routes()  # GET /openapi.json, /docs: what is mounted here, described
    if (
        ctx.metrics is not None
    ):  # Prometheus on the HTTP port too, as vLLM and TEI serve it (open, like the metrics port)
        routes.append(Route("/metrics", _Asgi(make_asgi_app(registry=ctx.metrics.registry)), methods=["GET"]))
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
    # starlette types a handler as taking any Exception; each of these takes the class it is registered for
    handlers: dict[type[Exception], Callable[..., Awaitable[Response]]] = {
        RMError: _rm_error,
        HTTPException: _http_error,
        Exception: _internal,
    }
    app = Starlette(
        routes=routes,
        exception_handlers=handlers,
        middleware=[
            Middleware(
                Guard,
                hosts=allowed_hosts(ctx.settings.host, ctx.settings.http_allowed_hosts),
                access_log=ctx.settings.http_access_log,
            )
        ],
    )
    app.state.ctx = ctx
    return app
