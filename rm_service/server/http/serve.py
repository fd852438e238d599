"""uvicorn running the ASGI app as a task of the server's own asyncio loop.

We bind the socket ourselves, so port 0 works, the bound port is known at once, and a taken
port is a one-line FailedPrecondition as for gRPC. TLS uses the gRPC server's certificate and
key (SecuritySettings), and requires client certificates when a client CA is set. Signals
stay with `serve_forever`: uvicorn's own handlers are not installed.

Slow and many connections: uvicorn closes idle keep-alive connections (`http_keep_alive_s`)
and answers 503 beyond `http_max_connections` (its limit_concurrency), but has no deadline for
a request still arriving. _TimedH11 adds two: a connection must send a whole request head
within `http_header_timeout_s` of opening (or of its last answer), and a request's body must
arrive within `http_body_timeout_s` of its head; otherwise the connection is closed (a route
reading the body sees a disconnect, 499) and a warning says which deadline passed.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import ssl

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from rm_service.errors import FailedPrecondition
from rm_service.settings import SecuritySettings, ServeSettings

log = logging.getLogger(__name__)


class _TimedH11(H11Protocol):
    """uvicorn's h11 protocol with deadlines for the request head and the request body."""

    header_timeout_s = 10.0
    body_timeout_s = 60.0

    def connection_made(self, transport) -> None:
        self._timer: asyncio.TimerHandle | None = None
        self._waiting_for = ""
        self._request: object = None  # the request cycle whose body is awaited (compared by identity)
        super().connection_made(transport)
        self._arm("request head", self.header_timeout_s)

    def _arm(self, what: str, seconds: float) -> None:
        self._disarm()
        self._waiting_for = what
        self._timer = self.loop.call_later(seconds, self._expired, what, seconds)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._waiting_for = None, ""

    def _expired(self, what: str, seconds: float) -> None:
        self._timer = None
        if not self.transport.is_closing():
            client = f"{self.client[0]}:{self.client[1]}" if self.client else "a client"
            log.warning("closed the HTTP connection of %s: no complete %s within %.0f s", client, what, seconds)
            self.transport.close()

    def handle_events(self) -> None:
        super().handle_events()
        if self.transport.is_closing():
            self._disarm()
        elif self.cycle is not None and self.cycle is not self._request:  # a new request's head has arrived
            self._request = self.cycle
            self._arm("request body", self.body_timeout_s)
        if self._waiting_for == "request body" and self.conn.their_state is not h11.SEND_BODY:
            self._disarm()  # the whole body is in

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self._waiting_for != "request body":
            self._arm("request head", self.header_timeout_s)  # the next request on this connection

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)


def _protocol(settings: ServeSettings | None) -> type[H11Protocol]:
    if settings is None:
        return _TimedH11
    return type(
        "TimedH11",
        (_TimedH11,),
        {"header_timeout_s": settings.http_header_timeout_s, "body_timeout_s": settings.http_body_timeout_s},
    )


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):  # the RewardServer's process handles SIGTERM/SIGINT and stops us
        yield


class HttpServer:
    def __init__(
        self,
        app,
        host: str,
        port: int,
        security: SecuritySettings,
        grace_seconds: float,
        settings: ServeSettings | None = None,
    ):
        self.app, self.host, self.requested_port = app, host, port
        self.settings = settings
        self.security = security
        self.grace_seconds = grace_seconds
        self.port: int | None = None
        self.scheme = "https" if security.tls_cert else "http"
        self._server: _Server | None = None
        self._task: asyncio.Task | None = None

    async def start(self) -> int:
        """Bind, start serving, return the bound port."""
        sock = _bind(self.host, self.requested_port)
        self.port = sock.getsockname()[1]
        s = self.security
        config = uvicorn.Config(
            self.app,
            log_config=None,
            access_log=False,
            lifespan="off",
            http=_protocol(self.settings),
            timeout_keep_alive=self.settings.http_keep_alive_s if self.settings else 5,
            limit_concurrency=self.settings.http_max_connections if self.settings else None,
            # uvicorn annotates an int, and uses it as asyncio.timeout's delay, which takes any number of seconds
            timeout_graceful_shutdown=self.grace_seconds,  # type: ignore[arg-type]
            ssl_certfile=s.tls_cert,
            ssl_keyfile=s.tls_key,
            ssl_ca_certs=s.tls_client_ca,
            ssl_cert_reqs=ssl.CERT_REQUIRED if s.tls_client_ca else ssl.CERT_NONE,
        )
        self._server = _Server(config)
        self._task = asyncio.get_running_loop().create_task(self._server.serve(sockets=[sock]), name="http")
        while not self._server.started:
            if self._task.done():  # failed before it started: raise its error
                sock.close()
                self._task.result()
                raise FailedPrecondition(f"the HTTP server on {self.host}:{self.port} stopped while starting")
            await asyncio.sleep(0.01)
        return self.port

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}/"

    async def stop(self) -> None:
        """Stop accepting, let requests in flight finish (up to the grace period), close."""
        if self._server is None or self._task is None:
            return
        self._server.should_exit = True
        await self._task
        self._server = self._task = None


def _bind(host: str, port: int) -> socket.socket:
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as exc:
        raise FailedPrecondition(f"cannot bind the labeling page to {host}: {exc.strerror}") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        hint = " (in use)" if exc.errno == errno.EADDRINUSE else ""
        raise FailedPrecondition(
            f"cannot serve the labeling page on {host}:{port}{hint}: {exc.strerror}; set RM_SERVE_HTTP_PORT "
            "(serve --http-port) to a free port, 0 for any, or -1 for none"
        ) from None
    sock.setblocking(False)
    return sock
