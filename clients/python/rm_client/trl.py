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
  text parts) and each completion is a list of messages ending with the assistant's reply.
  With tools (`GRPOTrainer(tools=...)`) a completion is `[assistant(tool_calls), tool, ...,
  assistant]`: the last assistant message is scored and the turns before it are folded into the
  prompt the way Qwen2.5's chat template renders them, since rm.v1 has no tool role: an
  assistant turn's calls as `<tool_call>\n{"name": ..., "arguments": ...}\n</tool_call>` after
  its text (a tool-call turn may have `content=None`), consecutive tool results as one user turn
  of `<tool_response>\n...\n</tool_response>` blocks. A completion that ends in a tool call is
  scored as that call.
`AsyncRewardFunction` is the same function as a coroutine: TRL runs async reward functions
concurrently with the others, on its own event loop, where it opens its AsyncRewardClient.
The other keyword arguments (dataset columns, `trainer_state`, ...) are accepted and ignored,
except `log_metric`, through which the ensemble's mean uncertainty is logged
(`rm_service/uncertainty`). A failed score raises (rm_client.errors): never a silent zero.
"""

from __future__ import annotations

import asyncio
import json
import weakref
from collections.abc import Mapping, Sequence
from typing import Literal

from rm_client.adapters import LazyClient, prompt_messages
from rm_client.aio import AsyncRewardClient
from rm_client.client import RewardClient
from rm_client.messages import role_and_text
from rm_client.scoring import ScoreResult


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
        conversations, texts = conversations_and_replies(prompts, completions)
        return self._output(self.client.score(conversations, texts, version=self.version), kwargs)

    def _output(self, scores: ScoreResult, kwargs: Mapping) -> list[float]:
        log_metric = kwargs.get("log_metric")
        if callable(log_metric):
            log_metric(f"{self.__name__}/uncertainty", sum(scores.uncertainty) / len(scores))
        return list(scores.rewards if self.score == "reward" else scores.raw_scores)


class AsyncRewardFunction(RewardFunction):
    """RewardFunction as a coroutine function (`async def __call__`), built from addresses and
    AsyncRewardClient keywords; one AsyncRewardClient per event loop, opened on first use."""

    def __init__(self, *, addresses: str | Sequence[str], **kwargs):
        super().__init__(addresses=addresses, **kwargs)
        self._aclients: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    # A coroutine function where the base class has a plain one, on purpose: TRL awaits it concurrently.
    async def __call__(self, prompts: Sequence, completions: Sequence, **kwargs) -> list[float]:  # type: ignore[override]
        conversations, texts = conversations_and_replies(prompts, completions)
        loop = asyncio.get_running_loop()
        if loop not in self._aclients:
            assert self._addresses is not None  # a keyword this class requires
            self._aclients[loop] = AsyncRewardClient(self._addresses, **self._client_kwargs)
        return self._output(await self._aclients[loop].score(conversations, texts, version=self.version), kwargs)

    def __getstate__(self) -> dict:  # a copy opens its own clients, in its own loops
        return {k: v for k, v in super().__getstate__().items() if k != "_aclients"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _aclients=weakref.WeakKeyDictionary())


def conversations_and_replies(prompts: Sequence, completions: Sequence) -> tuple[list[list[dict]], list[str]]:
    """TRL's prompts and completions as rm.v1 conversations and the replies to score; ValueError
    naming `prompts[i]...` or `completions[i]...` for what cannot be scored."""
    if len(prompts) != len(completions):
        raise ValueError(f"one prompt per completion: got {len(prompts)} prompts and {len(completions)} completions")
    conversations, texts = [], []
    for i, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
        history, text = split_completion(completion, f"completions[{i}]")
        conversations.append(folded(prompt_messages(prompt, f"prompts[{i}]"), f"prompts[{i}]") + history)
        texts.append(text)
    return conversations, texts


def split_completion(completion, where: str) -> tuple[list[dict], str]:
    """(the turns before the reply, folded for the prompt; the reply's text) of one completion."""
    if isinstance(completion, str):
        return [], completion
    if isinstance(completion, Mapping) or not isinstance(completion, Sequence) or not completion:
        raise ValueError(f"{where}: expected a string or a non-empty list of messages, got {completion!r:.80}")
    last = completion[-1]
    role = last.get("role") if isinstance(last, Mapping) else getattr(last, "role", None)
    if role != "assistant":
        raise ValueError(
            f"{where}[{len(completion) - 1}].role: a completion ends with the assistant's reply, got {role!r}"
        )
    [reply] = folded([last], where, start=len(completion) - 1)
    return folded(completion[:-1], where), reply["content"]


def folded(messages: Sequence, where: str, start: int = 0) -> list[dict]:
    """Messages as rm.v1 {role, content} dicts: tool calls rendered into their assistant turn,
    consecutive tool results into one user turn (as Qwen2.5's chat template renders them)."""
    out: list[dict] = []
    for j, m in enumerate(messages, start):
        role = m.get("role") if isinstance(m, Mapping) else getattr(m, "role", None)
        calls = (m.get("tool_calls") if isinstance(m, Mapping) else getattr(m, "tool_calls", None)) or []
        content = m.get("content") if isinstance(m, Mapping) else getattr(m, "content", None)
        if content is None and (calls or role == "tool"):
            m, content = {"role": role, "content": ""}, ""
        role, text = role_and_text(m, f"{where}[{j}]")
        if role == "tool":
            block = f"<tool_response>\n{text}\n</tool_response>"
            if out and out[-1].get("tool"):
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block, "tool": True})
            continue
        text += "".join(_tool_call(c, f"{where}[{j}].tool_calls[{k}]") for k, c in enumerate(calls))
        out.append({"role": role, "content": text})
    return [{"role": m["role"], "content": m["content"]} for m in out]


def _tool_call(call, where: str) -> str:
    function = call.get("function", call) if isinstance(call, Mapping) else None
    if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
        raise ValueError(f"{where}: a tool call needs a function name, got {call!r:.80}")
    call_json = json.dumps({"name": function["name"], "arguments": function.get("arguments", {})}, ensure_ascii=False)
    return f"\n<tool_call>\n{call_json}\n</tool_call>"
