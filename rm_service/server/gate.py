"""RoomGate: Score, ScoreTurns and SimulateUser are refused before their request is received or parsed.

A servicer method runs only once grpc.aio has received the whole request and deserialised it:
a refusal there costs the message's transfer and parse (a 512-item call, a 16 MB conversation)
on the event loop, which under clients that retry every 10 ms crowds out the calls that are
served. This interceptor asks the scoring core for room when the call arrives, with its headers
alone; when there is none and none opens within `room_wait_ms` (the call waits, unread: a client
that retries the moment it is refused is thus refused at most once per wait, however short its
own retry delay), it answers with a handler that never reads the message (a request-streaming
handler whose iterator is left alone), RESOURCE_EXHAUSTED with the `grpc-retry-pushback-ms`
trailer, so clients with a retry policy wait as long as the server asks.

Installed after authentication: an unauthenticated caller learns nothing about the queue.
"""

from __future__ import annotations

import grpc

from rm_service.api.v1 import reward_pb2, user_pb2
from rm_service.errors import Overloaded, status_code
from rm_service.server.rpc import pushback

_REWARD = reward_pb2.DESCRIPTOR.services_by_name["RewardService"].full_name
_USER = user_pb2.DESCRIPTOR.services_by_name["UserService"].full_name
GATED = frozenset([f"/{_REWARD}/Score", f"/{_REWARD}/ScoreTurns", f"/{_USER}/SimulateUser"])


class RoomGate(grpc.aio.ServerInterceptor):
    def __init__(self, check_room):
        self.check_room = check_room  # async; raises Overloaded when the queue has no room for any call

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        if details.method in GATED:
            try:
                await self.check_room()
            except Overloaded as exc:
                return grpc.stream_unary_rpc_method_handler(_refusal(exc))
        return await continuation(details)


def _refusal(exc: Overloaded):
    code, trailers = status_code(exc), pushback(exc)

    async def refuse(requests, context: grpc.aio.ServicerContext):  # `requests` is never read
        await context.abort(code, str(exc), trailing_metadata=trailers)

    return refuse
