"""What every HTTP request passes before a route sees it, and JSON bodies parsed within limits.

Guard, an ASGI middleware around the whole app:
- `Host` must name this server (`allowed_hosts`): a page on another site that rebinds its DNS
  name to 127.0.0.1 sends its own name as Host, and is refused (400), tokens or not.
- A state-changing request (any method but GET, HEAD, OPTIONS) must be `application/json`
  (400 otherwise) and, when it carries an `Origin`, come from this server's own origin (403
  otherwise). A browser sends a cross-site form or a `text/plain` fetch without asking first;
  both are refused before a route runs, so no web page can lease a task or store a label on a
  server without tokens. Clients that are not browsers send no Origin and pass.
- One log line per request (method, path, status, seconds, client) on `rm_service.http.access`
  when the access log is on, and every 4xx with its reason on `rm_service.http`, at most
  `LOG_4XX_PER_WINDOW` lines per `LOG_4XX_WINDOW_S` (the rest are counted, and the count logged).

read_json: a body within `limit` bytes, parsed with limits a route never has to think about:
at most MAX_DEPTH levels of nesting, integers that fit 64 bits, finite numbers (no NaN,
Infinity, 1e400). Each is a 400 naming the field (`messages[0].content`), never a
RecursionError or a ValueError surfacing as a 500. A caller that leaves mid-body is Cancelled
(499, logged as a disconnect), not an error of the server.
"""

from __future__ import annotations

import json
import logging
import math
import time

from starlette.datastructures import Headers
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse

from rm_service.errors import Cancelled, InvalidArgument, PermissionDenied, RMError, http_status
from rm_service.server.auth import is_loopback

log = logging.getLogger("rm_service.http")
access = logging.getLogger("rm_service.http.access")

MAX_DEPTH = 32  # the deepest body a route takes nests 5 levels (messages[i].content[j].text)
MAX_INT = 2**63  # token ids, ranks, indexes: any integer a route takes fits 64 bits
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
LOG_4XX_WINDOW_S = 10.0
LOG_4XX_PER_WINDOW = 20


class _BadNumber:
    """A number JSON allows and a route cannot take; reported with its field after parsing."""

    __slots__ = ("text", "why")

    def __init__(self, text: str, why: str):
        self.text, self.why = text, why


def _int(text: str):
    digits = len(text.lstrip("-"))
    if digits > 19 or not -MAX_INT <= int(text) < MAX_INT:  # checked on length first: int() of 5,000 digits raises
        return _BadNumber(text, "is an integer out of range (it must fit 64 bits)")
    return int(text)


def _float(text: str):
    value = float(text)
    return value if math.isfinite(value) else _BadNumber(text, "is a number out of range (it must be finite)")


def _constant(text: str):
    return _BadNumber(text, f"is {text}, which JSON does not allow: send a finite number")


def parse_json(body: bytes):
    """The JSON value of `body` within the limits above; InvalidArgument naming the field otherwise."""
    try:
        value = json.loads(body, parse_int=_int, parse_float=_float, parse_constant=_constant)
    except RecursionError:
        raise InvalidArgument("body", f"nests deeper than {MAX_DEPTH} levels") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidArgument("body", f"is not JSON: {exc}") from None
    _check(value)
    return value


def field_name(path: tuple) -> str:
    """('messages', 0, 'content') -> 'messages[0].content'; odd keys are quoted and cut short."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            key = part if part.isidentifier() and len(part) <= 40 else repr(part[:40])
            out += f".{key}" if out else key
    return out or "body"


def _check(value) -> None:
    """Depth and numbers, walked without recursion: the first offending field is named."""
    stack: list[tuple[object, tuple, int]] = [(value, (), 0)]  # (item, its path, depth)
    while stack:
        item, path, depth = stack.pop()
        if isinstance(item, _BadNumber):
            raise InvalidArgument(field_name(path), item.why)
        if isinstance(item, (dict, list)):
            if depth >= MAX_DEPTH:
                raise InvalidArgument(field_name(path), f"nests deeper than {MAX_DEPTH} levels")
            pairs = item.items() if isinstance(item, dict) else enumerate(item)
            stack.extend((v, (*path, k), depth + 1) for k, v in pairs if isinstance(v, (dict, list, _BadNumber)))


async def read_json(request: Request, limit: int = 1 << 20) -> dict:
    """The request body as a JSON object (InvalidArgument otherwise), at most `limit` bytes: a
    larger Content-Length is refused before anything is read, a longer stream as it passes it."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise InvalidArgument("body", f"is larger than the limit of {limit} bytes (Content-Length {int(declared)})")
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise InvalidArgument("body", f"is larger than the limit of {limit} bytes")
    except ClientDisconnect:
        raise Cancelled("the caller disconnected before its request body was read") from None
    if not body.strip():
        return {}
    value = parse_json(bytes(body))
    if not isinstance(value, dict):
        raise InvalidArgument("body", f"must be a JSON object, got {type(value).__name__}")
    return value


def allowed_hosts(host: str, configured: list[str]) -> frozenset[str] | None:
    """The names a Host header may carry (without port), or None for any: the configured list,
    else the bound address (and the loopback names for a loopback bind); a wildcard bind
    (0.0.0.0, ::) answers to any name, as it must behind a Service or a proxy, where tokens
    are required anyway."""
    if configured:
        return None if "*" in configured else frozenset(h.lower().strip("[]") for h in configured)
    if host in ("0.0.0.0", "::", ""):
        return None
    names = {host.lower().strip("[]")}
    if is_loopback(host):
        names.update(LOOPBACK_NAMES)
    return frozenset(names)


def _hostname(value: str) -> str:
    """'example.org:8000' -> 'example.org'; '[::1]:8000' -> '::1'."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1 : value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


class _Rate:
    """At most `per_window` lines per `window_s`; the lines held back are counted."""

    def __init__(self, per_window: int, window_s: float):
        self.per_window, self.window_s = per_window, window_s
        self.start, self.count, self.dropped = 0.0, 0, 0

    def allow(self) -> tuple[bool, int]:
        now = time.monotonic()
        dropped = 0
        if now - self.start >= self.window_s:
            self.start, self.count, dropped, self.dropped = now, 0, self.dropped, 0
        self.count += 1
        if self.count > self.per_window:
            self.dropped += 1
            return False, dropped
        return True, dropped


class Guard:
    """The ASGI middleware described above."""

    def __init__(self, app, hosts: frozenset[str] | None, access_log: bool = True):
        self.app, self.hosts, self.access_log = app, hosts, access_log
        self.rate = _Rate(LOG_4XX_PER_WINDOW, LOG_4XX_WINDOW_S)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        seen = {"status": 500, "error": b""}

        async def sending(message):
            if message["type"] == "http.response.start":
                seen["status"] = message["status"]
            elif message["type"] == "http.response.body" and 400 <= seen["status"] < 500:
                seen["error"] += message.get("body", b"")[:2000]
            await send(message)

        try:
            refusal = self.refusal(scope)
            if refusal is not None:
                status = http_status(refusal)
                response = JSONResponse({"error": str(refusal), "status": status}, status_code=status)
                await response(scope, receive, sending)
            else:
                await self.app(scope, receive, sending)
        finally:
            self._log(scope, seen["status"], seen["error"], time.perf_counter() - start)

    def refusal(self, scope) -> RMError | None:
        headers = Headers(scope=scope)
        host = _hostname(headers.get("host", ""))
        if self.hosts is not None and host not in self.hosts:
            return InvalidArgument(
                "host", f"{host[:60]!r} is not a name of this server (DNS rebinding?); set RM_SERVE_HTTP_ALLOWED_HOSTS"
            )
        if scope["method"] in SAFE_METHODS:
            return None
        kind = headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if kind != "application/json":
            return InvalidArgument(
                "content-type", f"must be application/json for {scope['method']}, got {kind[:60] or 'none'!r}"
            )
        origin = headers.get("origin")
        if origin is not None and _origin_host(origin) != headers.get("host", "").strip().lower():
            return PermissionDenied(f"origin {origin[:80]!r} is another site: cross-site requests may not change state")
        return None

    def _log(self, scope, status: int, error: bytes, seconds: float) -> None:
        client = scope.get("client") or ("-", 0)
        line = f"{scope['method']} {scope['path'][:200]} {status} {seconds:.3f}s from {client[0]}"
        if self.access_log:
            access.info(line)
        if 400 <= status < 500 and status != 499:
            allowed, dropped = self.rate.allow()
            if dropped:
                log.warning("%d more 4xx answers were not logged in the last %.0f s", dropped, LOG_4XX_WINDOW_S)
            if allowed:
                log.warning("%s: %s", line, _reason(error))


def _origin_host(origin: str) -> str:
    """'https://example.org:8443' -> 'example.org:8443' (what the Host header of the same origin says)."""
    scheme, sep, rest = origin.strip().lower().partition("://")
    return rest.rstrip("/") if sep and scheme in ("http", "https") else "\0"


def _reason(body: bytes) -> str:
    try:
        error = json.loads(body).get("error")
    except (ValueError, AttributeError):
        return body[:200].decode("utf-8", "replace")
    if isinstance(error, dict):
        error = error.get("message")
    return str(error)[:300]
