"""The one place where exceptions become gRPC statuses (via errors.STATUS_CODES)."""

from __future__ import annotations

import asyncio
import functools
import logging

import grpc

from rm_service.errors import RMError, status_code

log = logging.getLogger(__name__)


def rpc(method):
    """Wrap an async unary servicer method: RMError -> its status code, anything else ->
    INTERNAL with the error logged (never UNKNOWN)."""

    @functools.wraps(method)
    async def wrapper(self, request, context: grpc.aio.ServicerContext):
        try:
            return await method(self, request, context)
        except RMError as exc:
            await context.abort(status_code(exc), str(exc))
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
