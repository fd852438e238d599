"""RewardService: Score and ScoreTurns through the batcher, and the model registry read API."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import numpy as np

from rm_service import registry
from rm_service.api.v1 import reward_pb2, reward_pb2_grpc
from rm_service.conversation import Message, validate_turns
from rm_service.errors import InvalidArgument, NotFound
from rm_service.models.formatting import Formatted
from rm_service.server.batcher import Batcher, Ticket
from rm_service.server.convert import messages, model_info, score_items
from rm_service.server.models import Served, ServedModels
from rm_service.server.rpc import rpc, stream_rpc
from rm_service.settings import ServeSettings
from rm_service.store.db import Store


def ticket(context: grpc.aio.ServicerContext) -> Ticket:
    remaining = context.time_remaining()
    return Ticket(None if remaining is None else time.monotonic() + remaining, context.cancelled)


@dataclass(frozen=True)
class Scored:
    """What one scoring call returns: the version that scored, the formatted items, and each
    ensemble member's raw score [N, K]."""

    served: Served
    formatted: list[Formatted]
    members: np.ndarray  # [N, K]

    @property
    def version(self) -> str:
        return self.served.record.version

    @property
    def raw(self) -> np.ndarray:
        return self.members.mean(axis=1)  # [N]

    @property
    def std(self) -> np.ndarray:
        return self.members.std(axis=1) if self.members.shape[1] > 1 else np.zeros(len(self.members))  # [N]

    @property
    def reward(self) -> np.ndarray:
        return self.served.runtime.normalise(self.raw)  # [N], with the version's served statistics


class RewardService(reward_pb2_grpc.RewardServiceServicer):
    def __init__(self, served: ServedModels, batcher: Batcher, settings: ServeSettings, store: Store | None, max_chars: int,
                 observer=None):
        self.served = served
        self.observer = observer  # metrics: observer.stage("tokenise", seconds)
        self.batcher = batcher
        self.settings = settings
        self.store = store
        self.max_chars = max_chars
        self.tokenise_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="tokenise")

    async def _tokenise(self, served: Served, pairs: list[tuple[list[Message], str]]) -> list[Formatted]:
        runtime = served.runtime
        start = time.monotonic()
        formatted = await asyncio.get_running_loop().run_in_executor(self.tokenise_pool, lambda: [runtime.format(p, c) for p, c in pairs])
        if self.observer is not None:
            self.observer.stage("tokenise", time.monotonic() - start)
        return formatted

    async def score(self, pairs: list[tuple[list[Message], str]], version: str, ticket: Ticket) -> Scored:
        """Score validated (prompt, completion) pairs through admission and the batcher: the one
        scoring path of Score and of the HTTP app. `version` "" is the served default; the version
        is pinned for the whole call, even across a hot-swap."""
        served = self.served.get(version)
        formatted = await self._tokenise(served, pairs)
        members = await self.batcher.score(served.record.version, served.backend, formatted, ticket)  # [N, K]
        return Scored(served, formatted, members)

    @rpc
    async def Score(self, request: reward_pb2.ScoreRequest, context: grpc.aio.ServicerContext) -> reward_pb2.ScoreResponse:
        pairs = score_items(request, self.settings.max_items_per_request, self.max_chars)
        scored = await self.score(pairs, request.model_version, ticket(context))
        raw, std, reward, formatted, members = scored.raw, scored.std, scored.reward, scored.formatted, scored.members
        results = [
            reward_pb2.ScoreResult(id=item.id, reward=float(reward[i]), raw_score=float(raw[i]), uncertainty=float(std[i]),
                                   num_tokens=len(formatted[i]), truncated=formatted[i].truncated, members=members[i].tolist())
            for i, item in enumerate(request.items)
        ]
        return reward_pb2.ScoreResponse(results=results, model_version=scored.version, format_hash=scored.served.runtime.spec.hash)

    @rpc
    async def ScoreTurns(self, request: reward_pb2.ScoreTurnsRequest, context) -> reward_pb2.ScoreTurnsResponse:
        conversation = messages(request.conversation)
        turns = _assistant_turns(conversation, self.max_chars)
        served = self.served.get(request.model_version)
        runtime = served.runtime
        items = await self._tokenise(served, [(conversation[:i], conversation[i].content) for i in turns])
        positions = _prefix_positions(items)
        if positions is not None and runtime.spec.kind == "causal":  # one forward pass, score read at each turn's end
            members = await self.batcher.on_model_thread(runtime.rewards_at, items[-1].input_ids, positions,
                                                         [x.completion_start for x in items])  # [P, K]
        else:  # encoders, or a truncated conversation: each turn as its own item
            members = await self.batcher.score(served.record.version, served.backend, items, ticket(context))
        raw = members.mean(axis=1)
        reward = runtime.normalise(raw)
        return reward_pb2.ScoreTurnsResponse(
            turns=[reward_pb2.TurnReward(message_index=i, reward=float(r), raw_score=float(s)) for i, r, s in zip(turns, reward, raw)],
            model_version=served.record.version, format_hash=runtime.spec.hash)

    @rpc
    async def ListModels(self, request, context) -> reward_pb2.ListModelsResponse:
        records = {r.version: r for r in registry.list_models(self.store)} if self.store is not None else {}
        for name, served in self.served.versions.items():
            records.setdefault(name, served.record)
        loaded = self.served.versions
        return reward_pb2.ListModelsResponse(models=[model_info(r, r.version in loaded, loaded.get(r.version)) for r in records.values()])

    @rpc
    async def GetModel(self, request: reward_pb2.GetModelRequest, context) -> reward_pb2.ModelInfo:
        version = request.version or self.served.default or ""
        if version in self.served.versions:
            rec = self.served.versions[version].record
            if self.store is not None and rec.status != "external":
                rec = registry.get_model(self.store, version)  # fresh status
            return model_info(rec, True, self.served.versions[version])
        if self.store is None:
            raise NotFound(f"model version {version!r} is not loaded and this server has no registry")
        return model_info(registry.get_model(self.store, version), False)

    @stream_rpc
    async def WatchModels(self, request, context):
        queue = self.served.subscribe()
        try:
            while True:
                kind, rec = await queue.get()
                yield reward_pb2.ModelEvent(kind=kind, model=model_info(rec, rec.version in self.served.versions,
                                                                        self.served.versions.get(rec.version)))
        finally:
            self.served.unsubscribe(queue)


def _assistant_turns(conversation: list[Message], max_chars: int) -> list[int]:
    """Indexes of the assistant messages that follow a user turn; validates the conversation."""
    validate_turns(conversation, "conversation", max_chars)
    turns = [i for i, m in enumerate(conversation) if m.role == "assistant" and any(p.role == "user" for p in conversation[:i])]
    if not turns:
        raise InvalidArgument("conversation", "has no assistant turn after a user turn")
    return turns


def _prefix_positions(items: list[Formatted]) -> list[int] | None:
    """Each turn's last token index in the last item, if every item is a prefix of it."""
    full = items[-1].input_ids
    if any(x.truncated for x in items):
        return None
    for x in items:
        if full[: len(x)] != x.input_ids:
            return None
    return [len(x) - 1 for x in items]
