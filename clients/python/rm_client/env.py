"""ConversationEnv: multi-turn sessions against a served user model, for any trainer (asyncio).

    users, rewards = AsyncUserClient(address), AsyncRewardClient(address)
    env = ConversationEnv.from_file("heldout_prompts.jsonl", users, rewards, max_turns=4, seed=0)

    async def play(policy):
        session = await env.reset()                       # a real first user turn
        while not session.done:
            step = await env.step(session, policy(session.messages))
            # step.user_turn: the simulated next user turn (None: the user ended the conversation)
            # step.reward: the served reward of the assistant turn just played (ScoreTurns)
            # step.done, and when done step.session_value (the sum of the turns' raw scores)
        return session

    await asyncio.gather(*(play(policy) for _ in range(64)))   # 64 sessions, batched

reset() starts a session from a real conversation opening (the prompts file that
`rm-service user-model prompts --split heldout|train` writes from the store, split as the
reward model's held-out split; any JSONL of {"prompt": [messages]} works). step(session, reply)
appends the assistant's reply, then at once asks the user model for the next user turn and the
reward model for the reply's reward. Steps of concurrent sessions are batched: the next user
turns of every step awaiting in the same `batch_window_s` (or `max_batch` of them) go in one
SimulateUser call, seeded from the env's seed and a call counter, so a run's sessions are
reproducible for a given seed and order of steps. The session ends when the user ends it or
after `max_turns` assistant turns (`truncated`).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from rm_client.aio import AsyncRewardClient
from rm_client.api.v1 import reward_pb2
from rm_client.errors import BadResponse
from rm_client.messages import role_and_text, to_proto
from rm_client.user import AsyncUserClient


@dataclass
class Session:
    id: int
    messages: list[dict[str, str]]  # the conversation so far; ends with a user turn until done
    rewards: list[float] = field(default_factory=list)  # per assistant turn played
    done: bool = False
    truncated: bool = False  # ended by max_turns, not by the user
    session_value: float | None = None  # when done: the reward model's value of the whole session
    reward_version: str = ""
    user_version: str = ""


@dataclass(frozen=True)
class Step:
    user_turn: str | None  # None: the user ended the conversation (or max_turns was reached)
    reward: float  # the served (normalised) reward of the assistant turn just played
    done: bool
    session_value: float | None  # set when done
    info: dict


class TurnSource:
    """What a multi-turn session needs from rm-service: the next user turns (SimulateUser,
    batched across concurrent callers) and the rewards of a conversation's turns (ScoreTurns)."""

    def __init__(
        self,
        user: AsyncUserClient,
        reward: AsyncRewardClient,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_new_tokens: int = 0,
        seed: int = 0,
        user_version: str = "",
        reward_version: str = "",
        batch_window_s: float = 0.005,
        max_batch: int = 256,
    ):
        self.user, self.reward = user, reward
        self.temperature, self.top_p, self.max_new_tokens = temperature, top_p, max_new_tokens
        self.seed, self.calls = seed, itertools.count()
        self.user_version, self.reward_version = user_version, reward_version
        self.batch_window_s, self.max_batch = batch_window_s, max_batch
        self._pending: list[tuple[list, asyncio.Future]] = []
        self._flush: asyncio.TimerHandle | None = None

    async def next_user_turn(self, conversation: list) -> tuple[str | None, str, float]:
        """(the next user turn or None, the user-model version, P(end)), batched with concurrent calls."""
        future = asyncio.get_running_loop().create_future()
        self._pending.append((conversation, future))
        if len(self._pending) >= self.max_batch:
            self._send()
        elif self._flush is None:
            self._flush = asyncio.get_running_loop().call_later(self.batch_window_s, self._send)
        return await future

    def _send(self) -> None:
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        batch, self._pending = self._pending, []
        if batch:
            asyncio.get_running_loop().create_task(self._simulate(batch))

    async def _simulate(self, batch: list[tuple[list, asyncio.Future]]) -> None:
        try:
            result = await self.user.simulate(
                [c for c, _ in batch],
                seed=self.seed * 1_000_003 + next(self.calls),
                version=self.user_version,
                temperature=self.temperature,
                top_p=self.top_p,
                max_new_tokens=self.max_new_tokens,
            )
        except Exception as exc:  # noqa: BLE001 - every waiting session gets the error
            for _, f in batch:
                if not f.done():
                    f.set_exception(exc)
            return
        for i, (_, f) in enumerate(batch):
            if not f.done():
                f.set_result((result.turns[i], result.version, result.end_probability[i]))

    async def turn_rewards(self, conversation: list) -> reward_pb2.ScoreTurnsResponse:
        """ScoreTurns of a conversation ending with an assistant turn (retries as every call)."""
        request = reward_pb2.ScoreTurnsRequest(
            conversation=to_proto(conversation, "conversation"), model_version=self.reward_version
        )
        client = self.reward
        response = await client._call(
            lambda stub: stub.ScoreTurns(request, timeout=client.timeout_s), "ScoreTurns", self.reward_version
        )
        if not response.turns:
            raise BadResponse("ScoreTurns answered no turn for a conversation that ends with an assistant turn")
        return response


class ConversationEnv:
    """Sessions from real openings, carried on by the served user model, scored per turn."""

    def __init__(self, source: TurnSource, prompts: Sequence[list], max_turns: int = 8, seed: int = 0):
        if not prompts:
            raise ValueError("prompts: at least one conversation opening is needed")
        if max_turns < 1:
            raise ValueError(f"max_turns must be >= 1, got {max_turns}")
        self.source, self.max_turns = source, max_turns
        self.prompts = [_opening(p, f"prompts[{i}]") for i, p in enumerate(prompts)]
        self._rng, self._ids = random.Random(seed), itertools.count()

    @classmethod
    def from_file(
        cls,
        path: str | Path,
        user: AsyncUserClient,
        reward: AsyncRewardClient,
        max_turns: int = 8,
        seed: int = 0,
        **source_kwargs,
    ) -> ConversationEnv:
        """Openings from a JSONL file of {"prompt": [messages]} (or {"prompt": "text"}: one user turn)."""
        prompts = []
        for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                record = json.loads(line)
                if not isinstance(record, dict) or "prompt" not in record:
                    raise ValueError(f"{path} line {n}: expected an object with a prompt")
                prompts.append(record["prompt"])
        return cls(TurnSource(user, reward, seed=seed, **source_kwargs), prompts, max_turns, seed)

    async def reset(self, index: int | None = None) -> Session:
        """A new session: a real opening (the `index`-th, or one drawn with the env's seed)."""
        prompt = self.prompts[self._rng.randrange(len(self.prompts)) if index is None else index]
        return Session(next(self._ids), [dict(m) for m in prompt])

    async def step(self, session: Session, reply: str) -> Step:
        """Play the assistant's `reply`; the user's next turn and the reply's reward come back."""
        if session.done:
            raise ValueError(f"session {session.id} is over; reset() starts another")
        if not isinstance(reply, str) or not reply.strip():
            raise ValueError("reply: the assistant's turn must be a non-empty string")
        session.messages.append({"role": "assistant", "content": reply})
        last = len(session.rewards) + 1 >= self.max_turns
        scoring = self.source.turn_rewards(list(session.messages))
        if last:
            rewards, (user_turn, user_version, p_end) = await scoring, (None, session.user_version, float("nan"))
        else:
            rewards, (user_turn, user_version, p_end) = await asyncio.gather(
                scoring, self.source.next_user_turn(list(session.messages))
            )
        reward = float(rewards.turns[-1].reward)
        session.rewards.append(reward)
        session.reward_version, session.user_version = rewards.model_version, user_version
        if user_turn is None:
            session.done, session.truncated = True, last
            session.session_value = float(rewards.session_value)
        else:
            session.messages.append({"role": "user", "content": user_turn})
        info = {
            "reward_version": rewards.model_version,
            "user_version": user_version,
            "end_probability": p_end,
            "raw_score": float(rewards.turns[-1].raw_score),
            "truncated": session.truncated,
        }
        return Step(user_turn, reward, session.done, session.session_value, info)


def _opening(prompt, where: str) -> list[dict[str, str]]:
    messages = (
        [{"role": "user", "content": prompt}]
        if isinstance(prompt, str)
        else [
            dict(zip(("role", "content"), role_and_text(m, f"{where}[{i}]"), strict=True)) for i, m in enumerate(prompt)
        ]
    )
    if not messages or messages[-1]["role"] != "user":
        raise ValueError(f"{where}: an opening must end with a user turn")
    return messages
