"""Helpers for server interceptors: swap the behaviour of an RpcMethodHandler, keep its kind."""

from __future__ import annotations

import grpc


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
