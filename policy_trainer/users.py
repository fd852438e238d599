"""The user side of a session: who writes the next user turn after the policy's reply.

Multi-turn PPO codes against one small protocol, `UserSimulator`: given a batch of
conversations (each ending with the policy's assistant turn) return, per conversation, the
next user turn or None when the user ends the conversation. Two implementations:

- `ReplayUsers` (static-context mode, no model): the recorded conversation's real next user
  turn, whatever the policy said (training on logs). A conversation is matched to its record
  by the user turns played so far; the session ends when the record has no more user turns.
- `ServedUsers` (interactive mode): the served user model, rm.v1.UserService.SimulateUser,
  through rm_client's `UserClient` (deadline, retry budget, one version per call, seeded
  sampling). A seed per call is drawn from the trainer's seed and a call counter, so a run's
  sessions are reproducible.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from rm_service.conversation import Message


@runtime_checkable
class UserSimulator(Protocol):
    """Writes the next user turn of conversations (the environment of multi-turn RL)."""

    def next_turns(self, conversations: Sequence[list[Message]]) -> list[str | None]:
        """One entry per conversation (each ends with an assistant turn): the next user turn,
        or None when the user ends the conversation there."""
        ...

    @property
    def version(self) -> str:
        """What wrote the turns ("replay" or a user-model version), for the logs."""
        ...


def user_turns(messages: Sequence[Message]) -> tuple[str, ...]:
    return tuple(m.content for m in messages if m.role == "user")


class ReplayUsers:
    """The recorded next user turn of each conversation (static context): a conversation is
    matched to its recording by its user turns so far, so the policy's replies never change
    what the user says next."""

    version = "replay"

    def __init__(self, recordings: Sequence[list[Message]]):
        self._next: dict[tuple[str, ...], str | None] = {}
        for messages in recordings:
            turns = user_turns(messages)
            for k in range(1, len(turns) + 1):
                nxt = turns[k] if k < len(turns) else None
                # Two recordings that share an opening but go on differently: the first one read wins.
                self._next.setdefault(turns[:k], nxt)

    def next_turns(self, conversations: Sequence[list[Message]]) -> list[str | None]:
        out = []
        for i, messages in enumerate(conversations):
            key = user_turns(messages)
            if key not in self._next:
                raise KeyError(f"conversations[{i}]: no recording starts with these {len(key)} user turn(s)")
            out.append(self._next[key])
        return out


class ServedUsers:
    """The served user model (rm.v1.UserService.SimulateUser) as a UserSimulator.

    `client` is rm_client's UserClient, or anything with its `simulate(conversations,
    temperature, top_p, max_new_tokens, seed, version)` returning `.turns` (str or None each)
    and `.version`. The first call's version is pinned for the rest of the run unless
    `follow` is set, so a run's user turns come from one user model."""

    def __init__(
        self,
        client,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_new_tokens: int = 0,
        seed: int = 0,
        version: str = "",
        follow: bool = False,
    ):
        self.client = client
        self.sampling = dict(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens)
        self.seed, self.calls = seed, 0
        self._version, self.follow = version, follow

    @property
    def version(self) -> str:
        return self._version

    def next_turns(self, conversations: Sequence[list[Message]]) -> list[str | None]:
        if not conversations:
            return []
        result = self.client.simulate(
            [[m.as_dict() for m in c] for c in conversations],
            seed=self.seed * 1_000_003 + self.calls,
            version="" if self.follow else self._version,
            **self.sampling,
        )
        self.calls += 1
        if len(result.turns) != len(conversations):
            raise ValueError(
                f"the user model answered {len(result.turns)} turns for {len(conversations)} conversations"
            )
        self._version = result.version
        # An empty sampled turn cannot be scored or answered: the user said nothing, the session ends.
        return [t if t and t.strip() else None for t in result.turns]

    def state_dict(self) -> dict:
        """What a resumed run needs to draw the same user turns: the call counter and the pinned version."""
        return {"calls": self.calls, "version": self._version}

    def load_state_dict(self, state: dict) -> None:
        self.calls, self._version = state["calls"], state["version"]

    def close(self) -> None:
        self.client.close()


def served_users(addresses: list[str], token: str | None, tls_ca: bytes | None, s) -> ServedUsers:
    """ServedUsers over rm_client's UserClient with the settings' deadline and retry budget.
    UserClient lands with the user-model service (branch `usermodel`); until then this raises
    a clear error naming what is missing."""
    try:
        from rm_client import UserClient
    except ImportError as err:
        raise ValueError(
            "user_simulator=served needs rm_client.UserClient (rm.v1.UserService), which this install lacks"
        ) from err
    client = UserClient(
        addresses, s.score_timeout_s, s.score_max_retries, s.score_backoff_s, s.score_backoff_max_s,
        s.score_chunk_items, token, tls_ca,
    )  # fmt: skip
    return ServedUsers(
        client, s.user_temperature, s.user_top_p, s.user_max_new_tokens, s.seed, s.user_model_version, s.follow_models
    )
