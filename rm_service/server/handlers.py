"""Helpers for server interceptors: swap the behaviour of an RpcMethodHandler, keep its kind."""

from __future__ import annotations

import asyncio

import grpc

BIG_MESSAGE_BYTES = 1 << 20  # requests past this are parsed on a worker thread, not on the event loop


def behaviour(handler: grpc.RpcMethodHandler):
    """The handler's servicer function, whatever its streaming kind."""
    return handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream


def with_behaviour(handler: grpc.RpcMethodHandler, fn) -> grpc.RpcMethodHandler:
    """A handler of the same kind and (de)serialisers as `handler` that runs `fn(request, context)`."""
    if handler.request_streaming and handler.response_streaming:
        make = grpc.stream_stream_rpc_method_handler
    elif handler.request_streaming:
        make = grpc.stream_unary_rpc_method_handler
    elif handler.response_streaming:
        make = grpc.unary_stream_rpc_method_handler
    else:
        make = grpc.unary_unary_rpc_method_handler
    return make(fn, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)


class _Undecodable:
    """Stands in for a request whose bytes are not a valid message."""

    def __init__(self, error: str):
        self.error = error


class _Unparsed:
    """A big request's bytes, parsed later off the event loop (a 16 MB message: ~5-15 ms of parsing)."""

    def __init__(self, parse, data: bytes):
        self.parse, self.data = parse, data

    async def parsed(self):
        return await asyncio.to_thread(self.parse, self.data)


def _safe_deserializer(deserialize):
    def parse(data: bytes):
        try:
            return deserialize(data)
        except Exception as exc:  # noqa: BLE001 - DecodeError and friends
            return _Undecodable(str(exc))

    def parse_or_defer(data: bytes):
        return _Unparsed(parse, data) if len(data) > BIG_MESSAGE_BYTES else parse(data)

    return parse_or_defer


class DecodeGuard(grpc.aio.ServerInterceptor):
    """Undecodable request bytes get INVALID_ARGUMENT naming the request instead of grpc's
    UNKNOWN (grpc.aio answers UNKNOWN when the deserializer raises). Requests over
    BIG_MESSAGE_BYTES are parsed on a worker thread: grpc.aio runs deserializers on the event
    loop, where a 16 MB parse would hold up every other caller."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_streaming or handler.request_deserializer is None:
            return handler
        fn = behaviour(handler)
        method = handler_call_details.method

        if handler.response_streaming:

            async def guarded_stream(request, context):
                if isinstance(request, _Unparsed):
                    request = await request.parsed()
                if isinstance(request, _Undecodable):
                    await context.abort(
                        grpc.StatusCode.INVALID_ARGUMENT, f"request: not a valid message for {method}: {request.error}"
                    )
                async for response in fn(request, context):
                    yield response

            guarded = guarded_stream
        else:

            async def guarded_unary(request, context):
                if isinstance(request, _Unparsed):
                    request = await request.parsed()
                if isinstance(request, _Undecodable):
                    await context.abort(
                        grpc.StatusCode.INVALID_ARGUMENT, f"request: not a valid message for {method}: {request.error}"
                    )
                return await fn(request, context)

            guarded = guarded_unary
        make = (
            grpc.unary_stream_rpc_method_handler if handler.response_streaming else grpc.unary_unary_rpc_method_handler
        )
        return make(
            guarded,
            request_deserializer=_safe_deserializer(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )
