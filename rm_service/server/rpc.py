"""The one place where exceptions become gRPC statuses (via errors.STATUS_CODES)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
from collections.abc import AsyncIterator

import grpc

from rm_service.errors import Overloaded, RMError, status_code

log = logging.getLogger(__name__)


def pushback(exc: RMError) -> tuple[tuple[str, str], ...]:
    """The trailers of an error: `grpc-retry-pushback-ms` on a refusal, so a channel with a retry
    policy (rm_client's service config) waits as long as the server asks before it tries again."""
    if isinstance(exc, Overloaded):
        return (("grpc-retry-pushback-ms", str(max(1, round(exc.retry_after_s * 1000)))),)
    return ()


@contextlib.asynccontextmanager
async def statuses(context: grpc.aio.ServicerContext, name: str) -> AsyncIterator[None]:
    """RMError -> its status code; anything else -> INTERNAL with the error logged (never UNKNOWN)."""
    try:
        yield
    except RMError as exc:
        await context.abort(status_code(exc), str(exc), trailing_metadata=pushback(exc))
    except (asyncio.CancelledError, grpc.aio.AbortError):
        raise
    except Exception as exc:
        log.exception("internal error in %s", name)
        await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")


def rpc(method):
    """Wrap an async servicer method, unary or server-streaming (an async generator), in `statuses`."""
    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def stream(self, request, context: grpc.aio.ServicerContext):
            async with statuses(context, method.__name__):
                async for item in method(self, request, context):
                    yield item

        return stream

    @functools.wraps(method)
    async def unary(self, request, context: grpc.aio.ServicerContext):
        async with statuses(context, method.__name__):
            return await method(self, request, context)

    return unary
