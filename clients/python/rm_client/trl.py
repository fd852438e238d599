"""A reward function for TRL's GRPOTrainer (and RLOOTrainer, which calls its reward functions the
same way), scored by an rm-service server.

    from trl import GRPOConfig, GRPOTrainer
    from rm_client.trl import RewardFunction

    reward = RewardFunction(
        addresses=["10.0.0.5:50051"], token=os.environ["RM_TOKEN"], tls_ca=open("ca.pem", "rb").read()
    )
    trainer = GRPOTrainer(
        model="Qwen/Qwen2.5-0.5B-Instruct", reward_funcs=[reward], train_dataset=dataset, args=GRPOConfig(...)
    )

TRL calls `reward(prompts=..., completions=..., completion_ids=..., **columns)` with one entry
per generated completion and expects one float each:
- standard format: `prompts` are strings, each sent as one user turn (the reward model applies
  its own chat template), and `completions` strings;
- conversational format: `prompts` are lists of {"role", "content"} messages (content may be
  text parts) and each completion is a list holding one assistant message.
The other keyword arguments (dataset columns, `trainer_state`, ...) are accepted and ignored,
except `log_metric`, through which the ensemble's mean uncertainty is logged
(`rm_service/uncertainty`). A failed score raises (rm_client.errors): never a silent zero.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

from rm_client.adapters import LazyClient, prompt_messages
from rm_client.client import RewardClient
from rm_client.messages import role_and_text


class RewardFunction(LazyClient):
    """`reward_funcs=[RewardFunction(...)]`. Give a RewardClient (`client=`) or its addresses and
    settings (`addresses=`, then any RewardClient keyword: token, tls_ca, timeout_s, ...).
    `version` pins every call to one reward-model version (default: the server's promoted one,
    the same for all completions of one call); `score` picks the normalised reward (default)
    or the raw score; `name` is how TRL names its logged reward (`rewards/<name>/mean`)."""

    def __init__(
        self,
        client: RewardClient | None = None,
        *,
        addresses: str | Sequence[str] | None = None,
        version: str = "",
        score: Literal["reward", "raw_score"] = "reward",
        name: str = "rm_service",
        **client_kwargs,
    ):
        super().__init__(client, addresses, client_kwargs)
        if score not in ("reward", "raw_score"):
            raise ValueError(f"score must be 'reward' or 'raw_score', got {score!r}")
        self.version, self.score, self.__name__ = version, score, name

    def __call__(self, prompts: Sequence, completions: Sequence, **kwargs) -> list[float]:
        if len(prompts) != len(completions):
            raise ValueError(
                f"one prompt per completion: got {len(prompts)} prompts and {len(completions)} completions"
            )
        conversations = [prompt_messages(p, f"prompts[{i}]") for i, p in enumerate(prompts)]
        texts = [completion_text(c, f"completions[{i}]") for i, c in enumerate(completions)]
        scores = self.client.score(conversations, texts, version=self.version)
        log_metric = kwargs.get("log_metric")
        if callable(log_metric):
            log_metric(f"{self.__name__}/uncertainty", sum(scores.uncertainty) / len(scores))
        return list(scores.rewards if self.score == "reward" else scores.raw_scores)


def completion_text(completion, where: str) -> str:
    """A completion's text: a string, or a list holding one assistant message (TRL's conversational shape)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Mapping) or not isinstance(completion, Sequence):
        raise ValueError(f"{where}: expected a string or a list of messages, got {type(completion).__name__}")
    if len(completion) != 1:
        raise ValueError(
            f"{where}: a completion of {len(completion)} messages (tool calls and results?) cannot be scored as one "
            "reply; rm.v1 scores one assistant message after the prompt"
        )
    role, text = role_and_text(completion[0], f"{where}[0]")
    if role != "assistant":
        raise ValueError(f"{where}[0].role: a completion is the assistant's reply, got role {role!r}")
    return text
