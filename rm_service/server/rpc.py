"""The one place where exceptions become gRPC statuses (via errors.STATUS_CODES)."""

from __future__ import annotations

import asyncio
import functools
import logging

import grpc

from rm_service.errors import Overloaded, RMError, status_code

log = logging.getLogger(__name__)


def pushback(exc: RMError) -> tuple[tuple[str, str], ...]:
    """The trailers of an error: `grpc-retry-pushback-ms` on a refusal, so a channel with a retry
    policy (rm_client's service config) waits as long as the server asks before it tries again."""
    if isinstance(exc, Overloaded):
        return (("grpc-retry-pushback-ms", str(max(1, round(exc.retry_after_s * 1000)))),)
    return ()


def rpc(method):
    """Wrap an async unary servicer method: RMError -> its status code, anything else ->
    INTERNAL with the error logged (never UNKNOWN)."""

    @functools.wraps(method)
    async def wrapper(self, request, context: grpc.aio.ServicerContext):
        try:
            return await method(self, request, context)
        except RMError as exc:
            await context.abort(status_code(exc), str(exc), trailing_metadata=pushback(exc))
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:
            log.exception("internal error in %s", method.__name__)
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")

    return wrapper


def stream_rpc(method):
    """As `rpc`, for async-generator (server-streaming) methods."""

    @functools.wraps(method)
    async def wrapper(self, request, context: grpc.aio.ServicerContext):
        try:
            async for item in method(self, request, context):
                yield item
        except RMError as exc:
            await context.abort(status_code(exc), str(exc))
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:
            log.exception("internal error in %s", method.__name__)
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")

    return wrapper
