"""RewardService: Score and the model registry read API."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np

from rm_service import registry
from rm_service.api.v1 import reward_pb2, reward_pb2_grpc
from rm_service.errors import NotFound, Unimplemented
from rm_service.server.convert import model_info, score_items
from rm_service.server.models import ServedModels
from rm_service.server.rpc import rpc, stream_rpc
from rm_service.settings import ServeSettings
from rm_service.store.db import Store


class RewardService(reward_pb2_grpc.RewardServiceServicer):
    def __init__(self, served: ServedModels, settings: ServeSettings, store: Store | None, max_chars: int):
        self.served = served
        self.settings = settings
        self.store = store
        self.max_chars = max_chars
        self.model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")  # one model thread
        self.cpu_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="tokenise")

    @rpc
    async def Score(self, request: reward_pb2.ScoreRequest, context: grpc.aio.ServicerContext) -> reward_pb2.ScoreResponse:
        items = score_items(request, self.settings.max_items_per_request, self.max_chars)
        served = self.served.get(request.model_version)
        runtime = served.runtime
        loop = asyncio.get_running_loop()
        formatted = await loop.run_in_executor(self.cpu_pool, lambda: [runtime.format(p, c) for p, c in items])
        if context.cancelled() or (context.time_remaining() is not None and context.time_remaining() <= 0):
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline expired before the items reached the model")
        members = await loop.run_in_executor(self.model_thread, runtime.run, formatted, self.settings.max_batch_tokens)  # [N, K]
        raw = members.mean(axis=1)  # [N]
        std = members.std(axis=1) if members.shape[1] > 1 else np.zeros_like(raw)  # [N]
        reward = runtime.normalise(raw)
        results = [
            reward_pb2.ScoreResult(id=item.id, reward=float(reward[i]), raw_score=float(raw[i]), uncertainty=float(std[i]),
                                   num_tokens=len(formatted[i]), truncated=formatted[i].truncated)
            for i, item in enumerate(request.items)
        ]
        return reward_pb2.ScoreResponse(results=results, model_version=served.record.version, format_hash=runtime.spec.hash)

    @rpc
    async def ScoreTurns(self, request, context):
        raise Unimplemented("ScoreTurns is not implemented yet")

    @rpc
    async def ListModels(self, request, context) -> reward_pb2.ListModelsResponse:
        records = {r.version: r for r in registry.list_models(self.store)} if self.store is not None else {}
        for name, served in self.served.versions.items():
            records.setdefault(name, served.record)
        return reward_pb2.ListModelsResponse(models=[model_info(r, r.version in self.served.versions) for r in records.values()])

    @rpc
    async def GetModel(self, request: reward_pb2.GetModelRequest, context) -> reward_pb2.ModelInfo:
        version = request.version or self.served.default or ""
        if version in self.served.versions:
            rec = self.served.versions[version].record
            if self.store is not None and rec.status != "external":
                rec = registry.get_model(self.store, version)  # fresh status
            return model_info(rec, True)
        if self.store is None:
            raise NotFound(f"model version {version!r} is not loaded and this server has no registry")
        return model_info(registry.get_model(self.store, version), False)

    @stream_rpc
    async def WatchModels(self, request, context):
        raise Unimplemented("WatchModels is not implemented yet")
        yield  # pragma: no cover - makes this an async generator
