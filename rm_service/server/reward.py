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
from rm_service.conversation import Message, scored_turns, validate_turns
from rm_service.errors import InvalidArgument, NotFound, Unavailable
from rm_service.models.formatting import Formatted, format_item
from rm_service.server.admission import Dropped, Permit, Ticket, estimate_tokens
from rm_service.server.batcher import Batcher
from rm_service.server.convert import messages, model_info, score_items
from rm_service.server.metrics import Reference
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
    def __init__(
        self,
        served: ServedModels,
        batcher: Batcher,
        settings: ServeSettings,
        store: Store | None,
        max_chars: int,
        observer=None,
    ):
        self.served = served
        self.observer = observer  # metrics: observer.stage("tokenise", seconds), observer.observe_scores(...)
        self.batcher = batcher
        self.settings = settings
        self.store = store
        self.max_chars = max_chars
        # One thread: tokenising holds the GIL for most of its time, so a second thread adds contention with the
        # event loop (rejections waited longer for it under load: p99 68 -> 39 ms measured with one), not throughput.
        self.tokenise_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenise")

    async def warm_up(self, served: Served) -> None:
        """One full batch through the batcher's model thread: the first measured rate."""
        await self.batcher.warm_up(served.backend, warm_up_items(served.runtime, self.settings.max_batch_tokens))

    def close(self) -> None:
        """Stop tokenising: queued tokenisations are cancelled, a running one stops at its next item."""
        self.tokenise_pool.shutdown(wait=True, cancel_futures=True)

    def _admit(self, served: Served, items: int, work: list[tuple[list[Message], str]], claim: Ticket) -> Permit:
        """Admission of `items` items from the sizes of the texts the model will run (`work`)
        alone, before any tokenising; raises Overloaded at once."""
        max_tokens = served.runtime.spec.max_tokens
        tokens = sum(estimate_tokens([m.content for m in p] + [c], max_tokens) for p, c in work)
        return self.batcher.admit(items, tokens, claim)

    async def _tokenise(
        self, served: Served, pairs: list[tuple[list[Message], str]], permit: Permit
    ) -> list[Formatted]:
        runtime = served.runtime
        start = time.monotonic()

        def run() -> list[Formatted]:
            out = []
            for prompt, completion in pairs:
                if permit.gone:  # the caller left (or the server is draining): stop here
                    raise Dropped("the call was cancelled while its items were tokenised")
                out.append(runtime.format(prompt, completion))
            return out

        formatted = await asyncio.get_running_loop().run_in_executor(self.tokenise_pool, run)
        if self.observer is not None:
            self.observer.stage("tokenise", time.monotonic() - start)
        return formatted

    async def score(self, pairs: list[tuple[list[Message], str]], version: str, claim: Ticket) -> Scored:
        """Score validated (prompt, completion) pairs through admission and the batcher: the one
        scoring path of Score and of the HTTP app. `version` "" is the served default; the version
        is pinned for the whole call, even across a hot-swap."""
        served = self.served.get(version)
        with self._admit(served, len(pairs), pairs, claim) as permit:
            formatted = await self._tokenise(served, pairs, permit)
            members = await self.batcher.score(permit, served.record.version, served.backend, formatted)  # [N, K]
        scored = Scored(served, formatted, members)
        if self.observer is not None:
            self.observer.observe_scores(
                scored.version,
                scored.raw,
                scored.reward,
                [len(x) for x in formatted],
                [x.truncated for x in formatted],
                [len(c) for _, c in pairs],
                reference(served),
            )
        return scored

    @rpc
    async def Score(
        self, request: reward_pb2.ScoreRequest, context: grpc.aio.ServicerContext
    ) -> reward_pb2.ScoreResponse:
        self.batcher.admission.refuse_when_full()  # before reading the request: a refusal costs the RPC alone
        pairs = score_items(request, self.settings.max_items_per_request, self.max_chars)
        scored = await self.score(pairs, request.model_version, ticket(context))
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
        self.batcher.admission.refuse_when_full()
        conversation = messages(request.conversation)
        turns = _assistant_turns(conversation, self.max_chars, self.settings.score_turns_max_turns)
        served = self.served.get(request.model_version)
        runtime = served.runtime
        pairs = [(conversation[:i], conversation[i].content) for i in turns]
        with self._admit(served, len(pairs), _turns_work(runtime.spec, pairs), ticket(context)) as permit:
            full = await self._conversation_tokens(served, conversation, turns[-1])
            if full > self.settings.score_turns_max_tokens:
                raise InvalidArgument(
                    "conversation",
                    f"holds {full} tokens; the cap per ScoreTurns call is "
                    f"{self.settings.score_turns_max_tokens} (score_turns_max_tokens)",
                )
            items = await self._tokenise(served, pairs, permit)
            positions = _prefix_positions(items)
            if (
                positions is not None and runtime.spec.kind == "causal"
            ):  # one forward pass, score read at each turn's end
                members = await self.batcher.run_solo(
                    permit,
                    len(items[-1]),
                    runtime.rewards_at,
                    items[-1].input_ids,
                    positions,
                    [x.completion_start for x in items],
                )  # [P, K]
            elif getattr(runtime.model, "session", None) is not None:  # each turn alone, both heads
                members = await self.batcher.run_solo(
                    permit, sum(len(x) for x in items), runtime.run, items, self.settings.max_batch_tokens, "turns"
                )  # [P, K + K_s]
            else:  # encoders, or a truncated conversation: each turn as its own item
                members = await self.batcher.score(permit, served.record.version, served.backend, items)  # [P, K]
        k = runtime.model.ensemble_size
        raw = members[:, :k].mean(axis=1)  # [P]
        credit = members[:, k:].mean(axis=1) if members.shape[1] > k else None  # [P]: the session head's
        return turns_response(served, turns, raw, credit)

    async def _conversation_tokens(self, served: Served, conversation: list[Message], last: int) -> int:
        """Tokens of the whole conversation up to its last scored turn, formatted without truncation:
        one pass, so the cap is checked before the per-turn work."""
        runtime = served.runtime
        spec = runtime.spec.model_copy(update={"max_tokens": 1 << 40})
        pair = (conversation[:last], conversation[last].content)
        item = await asyncio.get_running_loop().run_in_executor(
            self.tokenise_pool, format_item, runtime.tokenizer, spec, *pair
        )
        return len(item)

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

    @stream_rpc
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


def reference(served: Served) -> Reference | None:
    """The version's raw-score statistics on its training items, for the drift metrics; None for
    an external checkpoint (its mean 0 and std 1 are placeholders)."""
    rec = served.record
    if rec.status == "external":
        return None
    corr = rec.metrics.get("reference_length_correlation")
    return Reference(rec.reward_mean, rec.reward_std or 1.0, None if corr is None or corr != corr else float(corr))


def turns_response(
    served: Served, turns: list[int], raw: np.ndarray, credit: np.ndarray | None = None
) -> reward_pb2.ScoreTurnsResponse:
    """Per-turn rewards and the session value the version was trained for (train.feedback):
    the sum of the session head's per-turn `credit` [P] when the version has one, else of the
    turns' raw scores [P]; with the version's fitted offsets, P(thumbs up) per turn and
    P(success) for the session."""
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


def sigmoid(x: float) -> float:
    """1 / (1 + e^-x), written so no x overflows (served probabilities: ScoreTurns, the HTTP classify route)."""
    return float(0.5 * (1.0 + np.tanh(0.5 * x)))  # no overflow at any x


def _assistant_turns(conversation: list[Message], max_chars: int, max_turns: int) -> list[int]:
    """Indexes of the assistant messages that follow a user turn; validates the conversation."""
    validate_turns(conversation, "conversation", max_chars)
    turns = scored_turns(conversation)
    if not turns:
        raise InvalidArgument("conversation", "has no assistant turn after a user turn")
    if len(turns) > max_turns:
        raise InvalidArgument(
            "conversation",
            f"has {len(turns)} assistant turns; the cap per ScoreTurns call is {max_turns} (score_turns_max_turns)",
        )
    return turns


def _turns_work(spec, pairs: list[tuple[list[Message], str]]) -> list[tuple[list[Message], str]]:
    """What a ScoreTurns call will run, for admission: on a causal backbone one pass over the
    last turn's item when the conversation looks like it fits the model, else every turn's item."""
    prompt, completion = pairs[-1]
    if (
        spec.kind == "causal"
        and estimate_tokens([m.content for m in prompt] + [completion], 1 << 40) <= spec.max_tokens
    ):
        return pairs[-1:]
    return pairs


def warm_up_items(runtime, max_batch_tokens: int) -> list[Formatted]:
    """Rows of the longest item the model takes (at most the budget), as many as fill the budget."""
    width = min(runtime.spec.max_tokens, max_batch_tokens)
    text = "The quick brown fox jumps over the lazy dog. " * (width // 4 + 1)
    item = runtime.format([Message("user", text[: len(text) // 4])], text)
    return [item] * max(1, max_batch_tokens // len(item))


def _prefix_positions(items: list[Formatted]) -> list[int] | None:
    """Each turn's last token index in the last item, if every item is a prefix of it."""
    full = items[-1].input_ids
    if any(x.truncated for x in items):
        return None
    for x in items:
        if full[: len(x)] != x.input_ids:
            return None
    return [len(x) - 1 for x in items]
