"""uvicorn running the ASGI app as a task of the server's own asyncio loop.

We bind the socket ourselves, so port 0 works, the bound port is known at once, and a taken
port is a one-line FailedPrecondition as for gRPC. TLS uses the gRPC server's certificate and
key (SecuritySettings), and requires client certificates when a client CA is set. Signals
stay with `serve_forever`: uvicorn's own handlers are not installed.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import ssl

import uvicorn

from rm_service.errors import FailedPrecondition
from rm_service.settings import SecuritySettings

log = logging.getLogger(__name__)


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):  # the RewardServer's process handles SIGTERM/SIGINT and stops us
        yield


class HttpServer:
    def __init__(self, app, host: str, port: int, security: SecuritySettings, grace_seconds: float):
        self.app, self.host, self.requested_port = app, host, port
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
            timeout_graceful_shutdown=self.grace_seconds,
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
        if self._server is None:
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
