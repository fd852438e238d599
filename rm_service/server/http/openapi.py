"""GET /openapi.json and GET /docs: the HTTP routes this process serves, as an OpenAPI 3.1 document.

The document is built from the app's own routing table at request time, so it lists exactly what
is mounted (which follows what the process serves: the reward routes with a model, the labeling
page with the store, /simulate_user with a user model). Each operation gives its summary, the role
it needs (security: a bearer token, or the token as HTTP Basic password; none on open routes) and
its error answers in the shape the route uses; the bodies are described in the docs each tag links
to (docs/http.md, docs/labeling.md, docs/user-model.md). `/docs` renders the same document as a
page without script (FastAPI's Swagger UI loads from a CDN: no network at run time, and the pages'
CSP allows only this server's own files). Both are open, as vLLM's are.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse
from starlette.routing import Mount, Route

from rm_service import __version__
from rm_service.server.http.app import PAGE_HEADERS, VLLM_PATHS, _templates

DOCS = "docs/"  # the repository's docs folder
TAGS = {
    "health": ("Readiness, metrics and this document", "http.md#readiness"),
    "openrlhf": ("OpenRLHF's remote reward model", "http.md#post-get_reward-openrlhfs-remote-reward-model"),
    "vllm": (
        "vLLM's classify, pooling and model list (verl's reward loop)",
        "http.md#post-classify-and-post-pooling-vllms-api-and-verls-reward-loop",
    ),
    "user model": ("The simulated user", "user-model.md"),
    "labeling": ("The labeling page and its API", "labeling.md"),
}
SCORE = ("scorer", "vllm")
# path: (role needed, None when open; tag; summary)
ROUTES: dict[str, tuple[str | None, str, str]] = {
    "/health": (None, "health", "200 SERVING once the model is loaded and warmed, 503 NOT_SERVING with the reason"),
    "/ping": (None, "health", "vLLM's name for /health"),
    "/metrics": (None, "health", "The process's Prometheus metrics"),
    "/openapi.json": (None, "health", "This document"),
    "/docs": (None, "health", "This document as a page"),
    "/version": (None, "vllm", "rm-service's version"),
    "/get_reward": ("scorer", "openrlhf", "{query, prompts, labels} -> {rewards, scores, extra_logs, model_version}"),
    "/classify": (*SCORE, "vLLM's classify: {input | messages, use_activation} -> {data: [{index, probs}]}"),
    "/v1/classify": (*SCORE, "/classify under vLLM's /v1 prefix"),
    "/pooling": (*SCORE, "vLLM's pooling: {input | messages, encoding_format} -> {data: [{index, data}]}"),
    "/v1/pooling": (*SCORE, "/pooling under vLLM's /v1 prefix"),
    "/v1/models": (*SCORE, "The loaded reward-model versions, the served one first"),
    "/simulate_user": ("scorer", "user model", "{conversations, temperature, seed...} -> the user's next turns"),
    "/": (None, "labeling", "The labeling page (its data comes from /api/*, with the labeler's token)"),
    "/admin": (None, "labeling", "The agreement page (its data comes from /api/admin/agreement)"),
    "/static/{path}": (None, "labeling", "The pages' scripts and styles"),
    "/api/me": ("labeler", "labeling", "Who the token is, and the labeler's progress"),
    "/api/next": ("labeler", "labeling", "Lease the next task"),
    "/api/tasks/{task_id}/renew": ("labeler", "labeling", "Renew a leased task"),
    "/api/tasks/{task_id}/skip": ("labeler", "labeling", "Give a leased task back"),
    "/api/tasks/{task_id}/label": ("labeler", "labeling", "Store the label of a leased task"),
    "/api/progress": ("labeler", "labeling", "The labeler's and the queue's counts"),
    "/api/admin/agreement": ("admin", "labeling", "Agreement between labelers"),
}
ERRORS = {
    "Error": {
        "type": "object",
        "required": ["error", "status"],
        "properties": {"error": {"type": "string", "description": "FIELD: message"}, "status": {"type": "integer"}},
    },
    "VllmError": {
        "type": "object",
        "required": ["error"],
        "description": "vLLM's ErrorResponse, on /classify, /pooling and /v1/*",
        "properties": {
            "error": {
                "type": "object",
                "required": ["message", "type", "code"],
                "properties": {
                    "message": {"type": "string"},
                    "type": {"type": "string", "examples": ["BadRequestError"]},
                    "param": {"type": ["string", "null"], "description": "the field at fault"},
                    "code": {"type": "integer"},
                },
            }
        },
    },
}


def routes() -> list[Route]:
    return [Route("/openapi.json", openapi, methods=["GET"]), Route("/docs", docs, methods=["GET"])]


def served(app_routes) -> list[tuple[str, str]]:
    """(method, path) of every route mounted, in OpenAPI's path syntax; HEAD (Starlette's, beside
    each GET) left out."""
    out = []
    for route in app_routes:
        if isinstance(route, Mount):
            out.append(("GET", route.path + "/{path}"))
        elif isinstance(route, Route):
            out += [(method, route.path) for method in sorted(route.methods or ()) if method != "HEAD"]
    return out


def document(app_routes) -> dict:
    paths: dict[str, dict] = {}
    for method, path in served(app_routes):
        paths.setdefault(path, {})[method.lower()] = _operation(method, path)
    used = sorted({op["tags"][0] for ops in paths.values() for op in ops.values()})
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "rm-service HTTP",
            "version": __version__,
            "description": "The reward routes OpenRLHF, verl and vLLM clients call, the labeling page's API and "
            "readiness. gRPC (rm.v1) is the main API; docs/api.md documents it.",
        },
        "tags": [
            {"name": tag, "description": TAGS[tag][0], "externalDocs": {"url": DOCS + TAGS[tag][1]}} for tag in used
        ],
        "paths": paths,
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "description": "A token of RM_AUTH_TOKENS"},
                "basic": {
                    "type": "http",
                    "scheme": "basic",
                    "description": "The token as the password (any user name), for clients that cannot set a "
                    "header (OpenRLHF's --remote_rm_url): only over TLS",
                },
            },
            "schemas": ERRORS,
        },
    }


def _operation(method: str, path: str) -> dict:
    role, tag, summary = ROUTES.get(path, ("admin", "health", f"{method} {path}"))
    error = "VllmError" if path.startswith(VLLM_PATHS) else "Error"
    content = {"application/json": {"schema": {"$ref": f"#/components/schemas/{error}"}}}
    responses: dict[str, dict] = {"200": {"description": "OK"}}
    if method == "POST":
        responses["400"] = {"description": "Bad input, the message naming the field", "content": content}
    if role is not None:
        responses["401"] = {"description": "No token, or an unknown one", "content": content}
        responses["403"] = {"description": f"The token's role is not {role} (or admin)", "content": content}
    if tag in ("openrlhf", "vllm", "user model") and method == "POST":
        responses["429"] = {"description": "Overloaded: retry after Retry-After", "content": content}
        responses["503"] = {"description": "The model is loading, or the server draining", "content": content}
    name = path.strip("/").replace("/", "_").replace("{", "").replace("}", "").replace(".", "_") or "root"
    op = {
        "operationId": f"{method.lower()}_{name}",
        "summary": summary,
        "tags": [tag],
        "security": [{"bearer": []}, {"basic": []}] if role is not None else [],
        "x-role": role or "open",
        "responses": responses,
    }
    if role is not None:
        op["description"] = f"Needs the {role} role (admin passes too) when the server has tokens."
    names = [part[1:-1] for part in path.split("/") if part.startswith("{")]
    if names:
        op["parameters"] = [{"name": n, "in": "path", "required": True, "schema": {"type": "string"}} for n in names]
    return op


async def openapi(request: Request) -> JSONResponse:
    return JSONResponse(document(request.app.routes))


async def docs(request: Request) -> HTMLResponse:
    doc = document(request.app.routes)
    operations = [(method.upper(), path, op) for path, ops in doc["paths"].items() for method, op in ops.items()]
    page = _templates.get_template("docs.html").render(title="HTTP routes", doc=doc, operations=operations)
    return HTMLResponse(page, headers=PAGE_HEADERS)
