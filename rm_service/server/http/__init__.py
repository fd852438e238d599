"""rm-service over HTTP: one ASGI application (Starlette), served by uvicorn inside the
server's asyncio loop, on `ServeSettings.http_port` of the gRPC host.

- app:       the app factory, its context, errors as HTTP statuses (errors.HTTP_STATUS), auth
- labeling:  the labeling page's JSON API (lease, renew, skip, label, progress, suggestions)
- admin:     the admin view's JSON API (agreement between people, and with each judge)
- serve:     HttpServer, uvicorn on a socket bound by us (port 0, one-line bind errors, TLS)
- templates/, static/: the two pages (plain HTML, a little JS, no build step)

New routes (e.g. reward routes that peers call) go into their own module and `create_app`.
"""

from rm_service.server.http.app import HttpContext, create_app
from rm_service.server.http.serve import HttpServer

__all__ = ["HttpContext", "HttpServer", "create_app"]
