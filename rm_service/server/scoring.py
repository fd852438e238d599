"""The scoring core: Score and ScoreTurns as the server runs them, whatever the transport.

gRPC (server.reward) and HTTP (server.http.reward_routes) are thin adapters over this one core,
as TEI keeps one `Infer` behind its transports. An adapter

1. calls `check_room(ticket)` before it reads the request: when the queue has no room for any
   call, it is refused (Overloaded: RESOURCE_EXHAUSTED, HTTP 429) having cost nothing but the
   call itself;
2. reads and validates the request into (prompt, completion) pairs, or a conversation;
3. calls `score` or `score_turns` with the call's Ticket (its deadline and whether its caller
   left): admission of its items and tokens (server.admission), tokenising, the batcher, the
   served statistics; the version is pinned for the whole call, even across a hot-swap.

Everything a transport does not decide lives here, so the two cannot drift apart.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial

import numpy as np

from rm_service.conversation import Message, scored_turns, validate_turns
from rm_service.errors import InvalidArgument
from rm_service.models.formatting import Formatted, format_item, format_raw
from rm_service.server import budget
from rm_service.server.admission import Dropped, Permit, Ticket, estimate_tokens
from rm_service.server.batcher import Batcher
from rm_service.server.metrics import Reference
from rm_service.server.models import Served, ServedModels
from rm_service.settings import ServeSettings

Pairs = list[tuple[list[Message], str]]
TOKENISE_CHUNK = 16  # items per turn on the tokenise thread (~1-20 ms of work each on a CPU)


@dataclass(frozen=True)
class Scored:
    """What one Score call returns: the version that scored, the formatted items, and each
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


@dataclass(frozen=True)
class TurnsScored:
    """What one ScoreTurns call returns: the version, the scored turns' message indexes, their
    raw scores (ensemble mean) [P] and, when the version has a session head, its per-turn credit [P]."""

    served: Served
    turns: list[int]
    raw: np.ndarray  # [P]
    credit: np.ndarray | None = None  # [P]


class ScoringCore:
    def __init__(self, served: ServedModels, batcher: Batcher, settings: ServeSettings, max_chars: int, observer=None):
        self.served = served
        self.batcher = batcher
        self.settings = settings
        self.max_chars = max_chars  # the store's max_text_chars: the longest text one message may hold
        self.observer = observer  # metrics: observer.stage("tokenise", seconds), observer.observe_scores(...)
        # One thread: tokenising holds the GIL for most of its time, so a second thread adds contention with the
        # event loop (rejections waited longer for it under load: p99 68 -> 39 ms measured with one), not throughput.
        self.tokenise_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenise")

    async def check_room(self, ticket: Ticket | None) -> None:
        """Admission first: Overloaded when the queue has no room for any call and none opens
        within `room_wait_ms`, before the caller's request is read or parsed (a refusal then
        costs the call alone, and a caller retrying at once is refused at most once per wait)."""
        await self.batcher.admission.wait_for_room(self.settings.room_wait_ms / 1000)

    async def warm_up(self, served: Served) -> None:
        """The batch budget (measured unless set) and one full batch through the batcher's model thread: the first
        measured rate."""
        await self.batcher.warm_up(served.backend, partial(warm_up_items, served.runtime))

    def close(self) -> None:
        """Stop tokenising: queued tokenisations are cancelled, a running one stops at its next item."""
        self.tokenise_pool.shutdown(wait=True, cancel_futures=True)

    async def score(self, pairs: Pairs, version: str, ticket: Ticket) -> Scored:
        """Score validated (prompt, completion) pairs through admission and the batcher. `version`
        "" is the served default."""
        served = self.served.get(version)
        permit = self._admit(served, len(pairs), pairs, ticket)
        return await self._score(
            served, permit, pairs, lambda runtime, pair: runtime.format(*pair), [len(c) for _, c in pairs]
        )

    async def score_raw(self, texts: Sequence[str | list[int]], version: str, ticket: Ticket) -> Scored:
        """Score texts (or token ids) as they are, the HTTP routes' raw mode: tokenised with the
        version's tokenizer, no chat template parsed or applied (models.formatting.format_raw).
        The length-drift figures count each whole text as its completion."""
        served = self.served.get(version)
        max_tokens = served.runtime.spec.max_tokens
        tokens = sum(estimate_tokens([x], max_tokens) if isinstance(x, str) else min(len(x), max_tokens) for x in texts)
        permit = self.admit(len(texts), tokens, ticket)
        return await self._score(
            served,
            permit,
            texts,
            lambda runtime, x: format_raw(runtime.tokenizer, runtime.spec, x),
            [len(x) for x in texts],
        )

    async def _score(self, served: Served, permit: Permit, work: Sequence, fmt, lengths: list[int]) -> Scored:
        """The admitted work's items (`fmt(runtime, item)`) through the batcher, observed."""
        with permit:
            formatted = await self._tokenise(served, work, permit, fmt)
            members = await self.batcher.score(permit, served.record.version, served.backend, formatted)  # [N, K]
        scored = Scored(served, formatted, members)
        if self.observer is not None:
            self.observer.observe_scores(
                scored.version,
                scored.raw,
                scored.reward,
                [len(x) for x in formatted],
                [x.truncated for x in formatted],
                lengths,
                reference(served),
            )
        return scored

    async def score_turns(self, conversation: list[Message], version: str, ticket: Ticket) -> TurnsScored:
        """Score every assistant turn of a conversation (validated here: caps on turns and tokens).
        On a causal backbone one forward pass reads each turn's score at its end when every turn's
        item is a prefix of the last one; otherwise (encoders, a conversation past the model's
        window) each turn is its own item through the batcher."""
        turns = assistant_turns(conversation, self.max_chars, self.settings.score_turns_max_turns)
        served = self.served.get(version)
        runtime = served.runtime
        pairs = [(conversation[:i], conversation[i].content) for i in turns]
        with self._admit(served, len(pairs), _turns_work(runtime.spec, pairs), ticket) as permit:
            cap = self.settings.score_turns_max_tokens
            if await self._longer_than(served, conversation, turns[-1], cap, permit):
                raise InvalidArgument(
                    "conversation",
                    f"holds more than {cap} tokens; the cap per ScoreTurns call is {cap} (score_turns_max_tokens)",
                )
            items = await self._tokenise(served, pairs, permit, lambda runtime, pair: runtime.format(*pair))
            positions = _prefix_positions(items)
            if positions is not None and runtime.spec.kind == "causal":  # one forward pass, read at each turn's end
                starts = [x.completion_start for x in items]
                members = await self.batcher.run_solo(
                    permit, len(items[-1]), runtime.rewards_at, items[-1].input_ids, positions, starts
                )  # [P, K] ([P, K + K_s] with a session head)
            elif getattr(runtime.model, "session", None) is not None:  # each turn alone, both heads
                members = await self.batcher.run_solo(
                    permit, sum(len(x) for x in items), runtime.run, items, self.batcher.max_batch_tokens, "turns"
                )  # [P, K + K_s]
            else:  # encoders, or a truncated conversation: each turn as its own item
                members = await self.batcher.score(permit, served.record.version, served.backend, items)  # [P, K]
        k = runtime.model.ensemble_size
        credit = members[:, k:].mean(axis=1) if members.shape[1] > k else None  # [P]: the session head's
        return TurnsScored(served, turns, members[:, :k].mean(axis=1), credit)

    def admit(self, items: int, tokens: int, ticket: Ticket) -> Permit:
        """Admission of a call of `items` items and about `tokens` tokens of model work (Score's,
        ScoreTurns' and SimulateUser's one queue); raises Overloaded at once."""
        return self.batcher.admit(items, tokens, ticket)

    def _admit(self, served: Served, items: int, work: Pairs, ticket: Ticket) -> Permit:
        """Admission of `items` items from the sizes of the texts the model will run (`work`)
        alone, before any tokenising."""
        max_tokens = served.runtime.spec.max_tokens
        tokens = sum(estimate_tokens([m.content for m in p] + [c], max_tokens) for p, c in work)
        return self.admit(items, tokens, ticket)

    async def _tokenise(self, served: Served, work: Sequence, permit: Permit, fmt) -> list[Formatted]:
        """The items of `work` (`fmt(runtime, x)` of each x), TOKENISE_CHUNK at a time on the one
        tokenise thread: a big call's chunks queue behind those of calls that came after it started,
        so no call waits for another's whole tokenising. Stops at the next item once the caller has
        gone or the deadline has passed."""
        runtime = served.runtime
        start = time.monotonic()

        def run(chunk: Sequence) -> list[Formatted]:
            out = []
            for x in chunk:
                if not permit.runnable():  # the caller left, its deadline passed or the server is draining
                    raise Dropped("the call was cancelled or expired while its items were tokenised")
                out.append(fmt(runtime, x))
            return out

        loop, formatted = asyncio.get_running_loop(), []
        for i in range(0, len(work), TOKENISE_CHUNK):
            formatted += await loop.run_in_executor(self.tokenise_pool, run, work[i : i + TOKENISE_CHUNK])
        if self.observer is not None:
            self.observer.stage("tokenise", time.monotonic() - start)
        return formatted

    async def _longer_than(
        self, served: Served, conversation: list[Message], last: int, cap: int, permit: Permit
    ) -> bool:
        """Whether the conversation up to its last scored turn, formatted without truncation, holds
        more than `cap` tokens. Formatted with `cap` as the window, so only about a window's text is
        tokenised (models.formatting cuts the rest first) whatever the conversation's length."""
        runtime = served.runtime
        spec = runtime.spec.model_copy(update={"max_tokens": cap})
        pair = (conversation[:last], conversation[last].content)

        def run() -> bool:
            if not permit.runnable():
                raise Dropped("the call was cancelled or expired before its conversation was tokenised")
            return format_item(runtime.tokenizer, spec, *pair).truncated

        return await asyncio.get_running_loop().run_in_executor(self.tokenise_pool, run)


def reference(served: Served) -> Reference | None:
    """The version's raw-score statistics on its training items, for the drift metrics; None for
    an external checkpoint (its mean 0 and std 1 are placeholders)."""
    rec = served.record
    if rec.status == "external":
        return None
    corr = rec.metrics.get("reference_length_correlation")
    return Reference(rec.reward_mean, rec.reward_std or 1.0, None if corr is None or corr != corr else float(corr))


def sigmoid(x: float) -> float:
    """1 / (1 + e^-x), written so no x overflows (served probabilities: ScoreTurns, the HTTP classify route)."""
    return float(0.5 * (1.0 + np.tanh(0.5 * x)))  # no overflow at any x


def assistant_turns(conversation: list[Message], max_chars: int, max_turns: int) -> list[int]:
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


def _turns_work(spec, pairs: Pairs) -> Pairs:
    """What a ScoreTurns call will run, for admission: on a causal backbone one pass over the
    last turn's item when the conversation looks like it fits the model, else every turn's item."""
    prompt, completion = pairs[-1]
    if (
        spec.kind == "causal"
        and estimate_tokens([m.content for m in prompt] + [completion], 1 << 40) <= spec.max_tokens
    ):
        return pairs[-1:]
    return pairs


def warm_up_items(runtime, tokens: int) -> list[Formatted]:
    """Rows of `budget.ROW_TOKENS` tokens (fewer when the model or `tokens` takes fewer), as many as fill `tokens`."""
    width = max(1, min(runtime.spec.max_tokens, tokens, budget.ROW_TOKENS))
    text = "The quick brown fox jumps over the lazy dog. " * (width // 4 + 1)
    item = runtime.format([Message("user", text[: len(text) // 4])], text)
    n = min(width, len(item))
    ids, types = item.input_ids[:n], None if item.token_type_ids is None else item.token_type_ids[:n]
    return [Formatted(ids, types, True, min(item.completion_start, n - 1))] * max(1, tokens // n)


def _prefix_positions(items: list[Formatted]) -> list[int] | None:
    """Each turn's last token index in the last item, if every item is a prefix of it."""
    full = items[-1].input_ids
    if any(x.truncated for x in items):
        return None
    for x in items:
        if full[: len(x)] != x.input_ids:
            return None
    return [len(x) - 1 for x in items]
