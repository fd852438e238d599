"""UserClient and AsyncUserClient: SimulateUser calls, batch-first and deterministic for a seed.

    from rm_client import UserClient

    with UserClient("127.0.0.1:50051") as users:
        result = users.simulate(conversations, temperature=1.0, top_p=0.95, max_new_tokens=64, seed=7)
        result.turns      # per conversation: the next user turn, or None when the user ended it
        result.version    # the user-model version that sampled them all

A conversation is a list of messages (dicts or objects with role and content) ending with the
assistant's turn. The same deadline, retry budget, round-robin and TLS/token settings as
RewardClient (rm_client.scoring.ClientBase). Conversations go in chunks of `chunk_items`; chunk
k samples with seed + k, and every chunk after the first is pinned to the version that answered
the first, so one call's result comes from one version and the same call with the same seed
samples the same turns. Without a seed the client draws one and returns it in the result.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc

from rm_client.api.v1 import user_pb2, user_pb2_grpc
from rm_client.errors import BadResponse
from rm_client.messages import to_proto
from rm_client.scoring import ClientBase

SEED_SPACE = 2**63


@dataclass(frozen=True)
class SimulateResult:
    """The next user turn of N conversations, in the order given, all from one user-model version."""

    turns: list[str | None]  # the sampled user turn, or None: the user ended the conversation
    end_probability: list[float]  # the model's P(the user ends here)
    num_tokens: list[int]
    complete: list[bool]  # False: cut at max_new_tokens
    truncated: list[bool]  # the conversation lost turns from its start to fit the model
    version: str
    seed: int

    @property
    def ended(self) -> list[bool]:
        return [t is None for t in self.turns]

    def __len__(self) -> int:
        return len(self.turns)


class _UserBase(ClientBase):
    def _requests(
        self, conversations: Sequence, temperature: float, top_p: float, max_new_tokens: int, seed: int | None
    ) -> tuple[list[user_pb2.SimulateUserRequest], int]:
        if isinstance(conversations, (str, bytes)) or not len(conversations):
            raise ValueError("conversations: expected a non-empty list of conversations (lists of messages)")
        convs = [
            user_pb2.Conversation(messages=to_proto(c, f"conversations[{i}]")) for i, c in enumerate(conversations)
        ]
        seed = random.randrange(SEED_SPACE) if seed is None else int(seed)
        chunks = [convs[i : i + self.chunk_items] for i in range(0, len(convs), self.chunk_items)]
        return [
            user_pb2.SimulateUserRequest(
                conversations=chunk,
                temperature=temperature,
                top_p=top_p,
                max_new_tokens=max_new_tokens,
                seed=(seed + k) % 2**64,
            )
            for k, chunk in enumerate(chunks)
        ], seed

    @staticmethod
    def _checked(response: user_pb2.SimulateUserResponse, request: user_pb2.SimulateUserRequest, version: str):
        if len(response.results) != len(request.conversations):
            raise BadResponse(
                f"SimulateUser answered {len(response.results)} turns for {len(request.conversations)} conversations"
            )
        if version and response.model_version != version:
            raise BadResponse(f"SimulateUser pinned to {version!r} was answered by {response.model_version!r}")
        return response

    @staticmethod
    def _result(responses: list[user_pb2.SimulateUserResponse], seed: int) -> SimulateResult:
        results = [r for resp in responses for r in resp.results]
        return SimulateResult(
            turns=[None if r.ended else r.content for r in results],
            end_probability=[r.end_probability if math.isfinite(r.end_probability) else 0.0 for r in results],
            num_tokens=[r.num_tokens for r in results],
            complete=[r.complete for r in results],
            truncated=[r.truncated for r in results],
            version=responses[0].model_version,
            seed=seed,
        )


class UserClient(_UserBase):
    """Blocking client of rm.v1.UserService; thread-safe. Constructor: see ClientBase."""

    def __init__(self, addresses: str | Sequence[str], *args, **kwargs):
        super().__init__(addresses, *args, **kwargs)
        self.channels = self._channels(aio=False)
        self.stubs = [user_pb2_grpc.UserServiceStub(c) for c in self.channels]
        self._pool = ThreadPoolExecutor(max_workers=max(2, 2 * len(self.addresses)), thread_name_prefix="rm-user")

    def _send(self, request: user_pb2.SimulateUserRequest, version: str) -> user_pb2.SimulateUserResponse:
        request.model_version = version
        attempts = self._attempts("SimulateUser", version)
        for index in attempts:
            try:
                answer = self.stubs[index].SimulateUser(request, timeout=self.timeout_s)
            except grpc.RpcError as err:
                time.sleep(attempts.failed(err))
                continue
            self._answered(index)
            return self._checked(answer, request, version)
        raise AssertionError("unreachable: the last attempt returns or raises")

    def simulate(
        self,
        conversations: Sequence,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_new_tokens: int = 0,
        seed: int | None = None,
        version: str = "",
    ) -> SimulateResult:
        """The next user turn (None: ended) of each conversation; max_new_tokens 0 is the server's default."""
        requests, seed = self._requests(conversations, temperature, top_p, max_new_tokens, seed)
        first = self._send(requests[0], version)
        version = version or first.model_version
        rest = list(self._pool.map(lambda r: self._send(r, version), requests[1:]))
        return self._result([first, *rest], seed)

    def close(self) -> None:
        self._pool.shutdown(wait=False)
        for c in self.channels:
            c.close()

    def __enter__(self) -> UserClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncUserClient(_UserBase):
    """asyncio client of rm.v1.UserService (create it inside the loop that uses it)."""

    def __init__(self, addresses: str | Sequence[str], *args, **kwargs):
        super().__init__(addresses, *args, **kwargs)
        self.channels = self._channels(aio=True)
        self.stubs = [user_pb2_grpc.UserServiceStub(c) for c in self.channels]

    async def _send(self, request: user_pb2.SimulateUserRequest, version: str) -> user_pb2.SimulateUserResponse:
        request.model_version = version
        attempts = self._attempts("SimulateUser", version)
        for index in attempts:
            try:
                answer = await self.stubs[index].SimulateUser(request, timeout=self.timeout_s)
            except grpc.RpcError as err:
                await asyncio.sleep(attempts.failed(err))
                continue
            self._answered(index)
            return self._checked(answer, request, version)
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def simulate(
        self,
        conversations: Sequence,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_new_tokens: int = 0,
        seed: int | None = None,
        version: str = "",
    ) -> SimulateResult:
        """See UserClient.simulate."""
        requests, seed = self._requests(conversations, temperature, top_p, max_new_tokens, seed)
        first = await self._send(requests[0], version)
        version = version or first.model_version
        rest = await asyncio.gather(*(self._send(r, version) for r in requests[1:]))
        return self._result([first, *rest], seed)

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self.channels))

    async def __aenter__(self) -> AsyncUserClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
