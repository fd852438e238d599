"""RewardService: the gRPC adapter of the scoring core (server.scoring), and the model registry read API.

Score and ScoreTurns are refused while the queue is full before gRPC reads their request
(server.gate.RoomGate asks the core's `check_room`); the handlers turn
the request into the core's validated pairs or conversation and the call's Ticket (its deadline,
whether it was cancelled), and the core's answer into the response message.
"""

from __future__ import annotations

import asyncio
import time

import grpc

from rm_service import registry
from rm_service.api.v1 import reward_pb2, reward_pb2_grpc
from rm_service.errors import NotFound, Unavailable
from rm_service.server.admission import Ticket
from rm_service.server.convert import messages, model_info, score_items
from rm_service.server.rpc import rpc
from rm_service.server.scoring import ScoringCore, TurnsScored, sigmoid
from rm_service.store.db import Store

BIG_REQUEST_TEXTS = 256  # requests with more texts than this are read into pairs off the event loop


async def read_items(request: reward_pb2.ScoreRequest, max_items: int, max_chars: int):
    """The request's validated pairs. A big one (a 16 MB prompt: ~10 ms of decoding its texts) is read
    on a worker thread, so the event loop goes on answering other callers meanwhile. Its size is
    judged by its count of texts (each at most max_chars): counting them decodes nothing, where
    upb's ByteSize() serialises the whole message (~25 ms for 16 MB)."""
    texts = len(request.items) + sum(len(item.prompt) for item in request.items)
    if texts <= BIG_REQUEST_TEXTS:
        return score_items(request, max_items, max_chars)
    return await asyncio.to_thread(score_items, request, max_items, max_chars)


def ticket(context: grpc.aio.ServicerContext) -> Ticket:
    remaining = context.time_remaining()
    return Ticket(None if remaining is None else time.monotonic() + remaining, context.cancelled)


class RewardService(reward_pb2_grpc.RewardServiceServicer):
    def __init__(self, core: ScoringCore, store: Store | None):
        self.core = core
        self.served = core.served
        self.store = store

    @rpc
    async def Score(
        self, request: reward_pb2.ScoreRequest, context: grpc.aio.ServicerContext
    ) -> reward_pb2.ScoreResponse:
        claim = ticket(context)  # a full queue was refused before the request was read (server.gate.RoomGate)
        pairs = await read_items(request, self.core.settings.max_items_per_request, self.core.max_chars)
        scored = await self.core.score(pairs, request.model_version, claim)
        raw, std, reward, formatted, members = scored.raw, scored.std, scored.reward, scored.formatted, scored.members
        results = [
            reward_pb2.ScoreResult(
                id=item.id,
                reward=float(reward[i]),
                raw_score=float(raw[i]),
                uncertainty=float(std[i]),
                num_tokens=len(formatted[i]),
                truncated=formatted[i].truncated,
                members=members[i].tolist(),
            )
            for i, item in enumerate(request.items)
        ]
        return reward_pb2.ScoreResponse(
            results=results, model_version=scored.version, format_hash=scored.served.runtime.spec.hash
        )

    @rpc
    async def ScoreTurns(self, request: reward_pb2.ScoreTurnsRequest, context) -> reward_pb2.ScoreTurnsResponse:
        claim = ticket(context)
        scored = await self.core.score_turns(messages(request.conversation), request.model_version, claim)
        return turns_response(scored)

    @rpc
    async def ListModels(self, request, context) -> reward_pb2.ListModelsResponse:
        records = {r.version: r for r in registry.list_models(self.store)} if self.store is not None else {}
        for name, served in self.served.versions.items():
            records.setdefault(name, served.record)
        loaded = self.served.versions
        return reward_pb2.ListModelsResponse(
            models=[model_info(r, r.version in loaded, loaded.get(r.version)) for r in records.values()]
        )

    @rpc
    async def GetModel(self, request: reward_pb2.GetModelRequest, context) -> reward_pb2.ModelInfo:
        version = request.version or self.served.default or ""
        if not version and self.served.loading:
            raise Unavailable("the reward model is still loading; retry shortly")
        if version in self.served.versions:
            rec = self.served.versions[version].record
            if self.store is not None and rec.status != "external":
                rec = registry.get_model(self.store, version)  # fresh status
            return model_info(rec, True, self.served.versions[version])
        if self.store is None:
            raise NotFound(f"model version {version!r} is not loaded and this server has no registry")
        return model_info(registry.get_model(self.store, version), False)

    @rpc
    async def WatchModels(self, request, context):
        queue = self.served.subscribe()
        try:
            while True:
                kind, rec = await queue.get()
                yield reward_pb2.ModelEvent(
                    kind=kind,
                    model=model_info(rec, rec.version in self.served.versions, self.served.versions.get(rec.version)),
                )
        finally:
            self.served.unsubscribe(queue)


def turns_response(scored: TurnsScored) -> reward_pb2.ScoreTurnsResponse:
    """Per-turn rewards and the session value the version was trained for (train.feedback):
    the sum of the session head's per-turn credit [P] when the version has one, else of the
    turns' raw scores [P]; with the version's fitted offsets, P(thumbs up) per turn and
    P(success) for the session."""
    served, turns, raw, credit = scored.served, scored.turns, scored.raw, scored.credit
    runtime, offsets = served.runtime, served.feedback
    reward = runtime.normalise(raw)
    value = float((raw if credit is None else credit).sum())
    response = reward_pb2.ScoreTurnsResponse(
        model_version=served.record.version, format_hash=runtime.spec.hash, session_value=value
    )
    for n, (i, r, s) in enumerate(zip(turns, reward, raw, strict=True)):
        turn = response.turns.add(message_index=i, reward=float(r), raw_score=float(s))
        if "thumb_offset" in offsets:
            turn.thumb_up = sigmoid(float(s) - offsets["thumb_offset"])
        if credit is not None:
            turn.session_credit = float(credit[n])
    if "outcome_offset" in offsets:
        response.session_success = sigmoid(value - offsets["outcome_offset"])
    return response
