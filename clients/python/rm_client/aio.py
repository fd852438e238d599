"""AsyncRewardClient: the RewardClient's contract on grpc.aio, for asyncio programs.

    async with AsyncRewardClient(["10.0.0.5:50051"]) as client:
        scores = await client.score(prompts, completions)

Same deadline, retry budget, round-robin, chunking and version pinning as RewardClient (the
chunks after the first are sent concurrently). Create it inside the event loop that uses it:
grpc.aio channels belong to one loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence

import grpc

from rm_client.api.v1 import reward_pb2, reward_pb2_grpc
from rm_client.scoring import ClientBase, ScoreResult, checked, request, result


class AsyncRewardClient(ClientBase):
    """asyncio client of rm.v1.RewardService. Constructor: see ClientBase."""

    def __init__(self, addresses: str | Sequence[str], *args, **kwargs):
        super().__init__(addresses, *args, **kwargs)
        self.channels: list[grpc.aio.Channel] = self._channels(aio=True)
        self.stubs = [reward_pb2_grpc.RewardServiceStub(c) for c in self.channels]

    async def _call(self, fn: Callable[[reward_pb2_grpc.RewardServiceStub], Awaitable], what: str, version: str = ""):
        attempts = self._attempts(what, version)
        for index in attempts:
            try:
                answer = await fn(self.stubs[index])
            except grpc.RpcError as err:  # grpc.aio.AioRpcError is one
                await asyncio.sleep(attempts.failed(err))
                continue
            self._answered(index)
            return answer
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def model_info(self, version: str = "") -> reward_pb2.ModelInfo:
        return await self._call(
            lambda stub: stub.GetModel(reward_pb2.GetModelRequest(version=version), timeout=self.timeout_s), "GetModel"
        )

    async def current_version(self) -> str:
        return (await self.model_info()).version

    async def _score_chunk(self, chunk: list[reward_pb2.ScoreItem], version: str) -> reward_pb2.ScoreResponse:
        req = request(chunk, version)
        return checked(
            await self._call(lambda stub: stub.Score(req, timeout=self.timeout_s), "Score", version), chunk, version
        )

    async def score(self, prompts: Sequence, completions: Sequence[str], version: str = "") -> ScoreResult:
        """See RewardClient.score."""
        chunks = self._chunks(prompts, completions)
        responses = []
        if not version:
            responses.append(await self._score_chunk(chunks.pop(0), ""))
            version = responses[0].model_version
        responses += await asyncio.gather(*(self._score_chunk(chunk, version) for chunk in chunks))
        return result(responses)

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self.channels))

    async def __aenter__(self) -> AsyncRewardClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
