"""Session rollouts: conversations played forward, the policy writing every assistant turn.

    start (a real first user turn) -> policy turn 1 -> user turn 2 -> policy turn 2 -> ... -> end

All sessions of a step advance together: at turn k the policy samples one reply for every
session still running (one batched `generate`, the conversation so far cut from the left at
turn boundaries to `max_prompt_tokens`), then the UserSimulator writes the next user turn of
each (or ends it). A session ends when the user ends it, after `max_turns` assistant turns,
or when the policy's reply is empty (there is nothing to answer). Each assistant turn is one
row of the step's Rollout: its query is the conversation before it, its response the sampled
tokens, so only policy tokens are ever actions. ScoreTurns scores each finished conversation
in one pass: a reward per assistant turn and the session value.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from policy_trainer.prompts import Prompt, fit_to_budget
from policy_trainer.rollout import Rollout
from policy_trainer.turn_credit import Sessions
from policy_trainer.users import UserSimulator
from rm_client import BadResponse, RewardClient
from rm_client.api.v1 import reward_pb2
from rm_client.messages import to_proto
from rm_service.conversation import Message


@dataclass
class Session:
    start: int  # index of the opening in the start list
    messages: list[Message]  # the whole conversation so far (never cut)
    rows: list[int] = field(default_factory=list)  # rollout row of each assistant turn, in order
    ended_by: str = ""  # "user", "max_turns" or "empty_reply" once finished

    @property
    def done(self) -> bool:
        return bool(self.ended_by)

    def scored_conversation(self) -> list[Message]:
        """The conversation up to its last non-empty assistant turn (what ScoreTurns reads)."""
        last = max((i for i, m in enumerate(self.messages) if m.role == "assistant"), default=-1)
        return self.messages[: last + 1]


@dataclass
class SessionRollout:
    """One step's sessions and their assistant turns as rows of one Rollout."""

    rollout: Rollout  # [N, P] queries / [N, R] responses, N = assistant turns over all sessions
    prompts: list[Prompt]  # [N] the (cut) conversation each row's reply answered
    sessions: list[Session]
    index: Sessions  # [N] session and turn of each row

    @property
    def turns_per_session(self) -> np.ndarray:
        return np.array([len(s.rows) for s in self.sessions])


def concat_rollouts(parts: list[Rollout], pad_id: int) -> Rollout:
    """Rollouts of different widths as one: queries re-padded on the left, responses on the right."""
    width_q = max(p.query_ids.shape[1] for p in parts)
    width_r = max(p.response_ids.shape[1] for p in parts)

    def pad(x: torch.Tensor, width: int, left: bool, value: int) -> torch.Tensor:
        extra = width - x.shape[1]
        return torch.nn.functional.pad(x, (extra, 0) if left else (0, extra), value=value)

    return Rollout(
        torch.cat([pad(p.query_ids, width_q, True, pad_id) for p in parts]),
        torch.cat([pad(p.query_mask, width_q, True, 0) for p in parts]),
        torch.cat([pad(p.response_ids, width_r, False, pad_id) for p in parts]),
        torch.cat([pad(p.response_mask, width_r, False, 0) for p in parts]),
        torch.cat([p.ended for p in parts]),
        [t for p in parts for t in p.texts],
        [i for p in parts for i in p.prompt_index],
    )


def play_sessions(
    trainer, starts: list[list[Message]], start_index: list[int], users: UserSimulator, max_turns: int, lm=None
) -> SessionRollout:
    """Sessions from `starts[start_index[j]]` (one session per entry), played to their end.
    `trainer.rollout(prompts, index, lm)` samples the policy's replies."""
    s, tokenizer = trainer.s, trainer.m.tokenizer
    sessions = [Session(i, list(starts[i])) for i in start_index]
    parts: list[Rollout] = []
    prompts: list[Prompt] = []
    row_session: list[int] = []
    row_turn: list[int] = []
    for turn in range(max_turns):
        active = [j for j, x in enumerate(sessions) if not x.done]
        if not active:
            break
        turn_prompts = []
        for j in active:
            kept, ids, dropped, cut = fit_to_budget(tokenizer, sessions[j].messages, s.max_prompt_tokens)
            turn_prompts.append(Prompt(kept, ids, dropped_turns=dropped, cut_text=cut))
        part = trainer.rollout(turn_prompts, list(range(len(active))), lm)
        part.prompt_index = [len(prompts) + i for i in range(len(active))]  # rows index `prompts`
        parts.append(part)
        prompts += turn_prompts
        waiting = []  # sessions that go on to a user turn
        for i, j in enumerate(active):
            session = sessions[j]
            session.rows.append(len(row_session))
            row_session.append(j)
            row_turn.append(turn)
            if not part.texts[i]:
                session.ended_by = "empty_reply"
                continue
            session.messages.append(Message("assistant", part.texts[i]))
            if turn + 1 == max_turns:
                session.ended_by = "max_turns"
            else:
                waiting.append(j)
        if waiting:
            for j, user_turn in zip(waiting, users.next_turns([sessions[j].messages for j in waiting]), strict=True):
                if user_turn is None:
                    sessions[j].ended_by = "user"
                else:
                    sessions[j].messages.append(Message("user", user_turn))
    index = Sessions(torch.tensor(row_session, dtype=torch.long), torch.tensor(row_turn, dtype=torch.long))
    return SessionRollout(concat_rollouts(parts, tokenizer.pad_token_id), prompts, sessions, index)


@dataclass
class TurnScores:
    """ScoreTurns of a step's sessions, per row and per session (NaN where not scored)."""

    turn_reward: torch.Tensor  # [N] served (normalised) reward of each assistant turn; NaN: empty reply
    turn_raw: torch.Tensor  # [N]
    session_value: torch.Tensor  # [S] raw units; NaN: no scored turn
    session_success: torch.Tensor  # [S] P(success) when the version was trained on outcomes, else NaN
    version: str


def score_turns(
    client: RewardClient, played: SessionRollout, version: str, pool: ThreadPoolExecutor | None = None
) -> TurnScores:
    """One ScoreTurns call per session with a scored turn, all pinned to `version`."""
    n, num_sessions = len(played.rollout.texts), len(played.sessions)
    turn_reward, turn_raw = torch.full((n,), float("nan")), torch.full((n,), float("nan"))
    value, success = torch.full((num_sessions,), float("nan")), torch.full((num_sessions,), float("nan"))
    todo = [j for j, x in enumerate(played.sessions) if x.scored_conversation()]

    def call(j: int) -> reward_pb2.ScoreTurnsResponse:
        conversation = played.sessions[j].scored_conversation()
        request = reward_pb2.ScoreTurnsRequest(
            conversation=to_proto(conversation, "conversation"), model_version=version
        )
        response = client._call(lambda stub: stub.ScoreTurns(request, timeout=client.timeout_s), "ScoreTurns", version)
        if version and response.model_version != version:
            raise BadResponse(f"ScoreTurns pinned to {version!r} was answered by {response.model_version!r}")
        return response

    responses = list(pool.map(call, todo)) if pool is not None else [call(j) for j in todo]
    for j, response in zip(todo, responses, strict=True):
        session = played.sessions[j]
        assistant_at = [i for i, m in enumerate(session.scored_conversation()) if m.role == "assistant"]
        by_index = {t.message_index: t for t in response.turns}
        if set(by_index) != set(assistant_at):
            raise BadResponse(f"ScoreTurns scored messages {sorted(by_index)}, expected {assistant_at}")
        for row, at in zip(
            session.rows, assistant_at, strict=False
        ):  # the empty reply, if any, is the last row and unscored
            turn_reward[row], turn_raw[row] = by_index[at].reward, by_index[at].raw_score
        value[j] = response.session_value
        if response.HasField("session_success"):
            success[j] = response.session_success
    if torch.isinf(turn_reward).any() or torch.isinf(value).any():
        raise BadResponse(f"ScoreTurns returned non-finite rewards (version {version})")
    return TurnScores(turn_reward, turn_raw, value, success, version)
