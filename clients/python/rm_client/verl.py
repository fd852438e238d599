"""verl's custom reward function, scored by an rm-service server.

verl loads `reward.custom_reward_function.name` (default `compute_score`) from the file at
`reward.custom_reward_function.path` (verl 0.9's keys; before 0.9 they sat at the top level) and
calls it as `compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs)`,
expecting a float or a dict whose "score" is the reward (its other keys are logged). verl 0.9's
reward loop (`reward.reward_manager.name=naive`, the default) calls it once per sample, in a
thread, or awaits it when it is a coroutine function; verl before 0.9 also had a batch reward
manager that called it with lists (`data_sources=`, `solution_strs=`, `ground_truths=`,
`extra_infos=`). So a file `rm_reward.py`:

    import os
    from rm_client.verl import ComputeScore, async_compute_score

    compute_score = ComputeScore(addresses=["10.0.0.5:50051"], token=os.environ.get("RM_TOKEN"))
    compute_score_async = async_compute_score(addresses=["10.0.0.5:50051"])  # verl 0.9's reward loop
    compute_score_batch = compute_score.batch           # verl < 0.9: reward_model.reward_manager=batch

and `reward.custom_reward_function.path=rm_reward.py reward.custom_reward_function.name=compute_score_async`.

verl passes the decoded response but not the prompt, and a reward model needs both: put the
prompt in each row's `extra_info` when preparing the Parquet files, e.g.
`"extra_info": {"prompt": row["prompt"], ...}` (a list of {"role", "content"} messages, or a
string sent as one user turn); `prompt_key` names another key. `ground_truth` and
`data_source` are not used. The dict returned holds "score" (the normalised reward, or the
raw score with `score="raw_score"`), "raw_score" and "uncertainty"; `as_float=True` returns
the score alone. A failed score raises (rm_client.errors): never a silent zero.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Mapping, Sequence
from typing import Literal

from rm_client.adapters import LazyClient, prompt_messages
from rm_client.aio import AsyncRewardClient
from rm_client.client import RewardClient
from rm_client.scoring import ScoreResult


class ComputeScore(LazyClient):
    """verl's `compute_score` (and `.batch`, for the batch reward manager). Give a RewardClient
    (`client=`) or its addresses and settings (`addresses=`, then any RewardClient keyword)."""

    def __init__(
        self,
        client: RewardClient | None = None,
        *,
        addresses: str | Sequence[str] | None = None,
        prompt_key: str = "prompt",
        version: str = "",
        score: Literal["reward", "raw_score"] = "reward",
        as_float: bool = False,
        **client_kwargs,
    ):
        super().__init__(client, addresses, client_kwargs)
        self.shape = _Shape(prompt_key, version, score, as_float)
        self.__name__ = "compute_score"

    def __call__(self, data_source=None, solution_str: str = "", ground_truth=None, extra_info=None, **kwargs):
        return self.batch([data_source], [solution_str], [ground_truth], [extra_info])[0]

    def batch(
        self, data_sources=None, solution_strs: Sequence[str] = (), ground_truths=None, extra_infos=None, **kwargs
    ) -> list:
        infos = list(extra_infos) if extra_infos is not None else [None] * len(solution_strs)
        prompts = [self.shape.prompt(info, i) for i, info in enumerate(infos)]
        return self.shape.output(self.client.score(prompts, list(solution_strs), version=self.shape.version))


def async_compute_score(
    *,
    addresses: str | Sequence[str],
    prompt_key: str = "prompt",
    version: str = "",
    score: Literal["reward", "raw_score"] = "reward",
    as_float: bool = False,
    **client_kwargs,
):
    """A coroutine function for verl's asyncio reward loop: each call is one Score request,
    and calls in flight together are batched by the server. One AsyncRewardClient per event
    loop, opened on first use. Keywords past the adapter's own go to AsyncRewardClient."""
    shape = _Shape(prompt_key, version, score, as_float)
    clients: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    async def compute_score(data_source=None, solution_str: str = "", ground_truth=None, extra_info=None, **_):
        loop = asyncio.get_running_loop()
        if loop not in clients:
            clients[loop] = AsyncRewardClient(addresses, **client_kwargs)
        result = await clients[loop].score([shape.prompt(extra_info, 0)], [solution_str], version=shape.version)
        return shape.output(result)[0]

    return compute_score


class _Shape:
    """verl's side of the call: the prompt from extra_info, the dict (or float) returned."""

    def __init__(self, prompt_key: str, version: str, score: str, as_float: bool):
        if score not in ("reward", "raw_score"):
            raise ValueError(f"score must be 'reward' or 'raw_score', got {score!r}")
        self.prompt_key, self.version, self.score, self.as_float = prompt_key, version, score, as_float

    def prompt(self, extra_info, i: int) -> list:
        if not isinstance(extra_info, Mapping) or self.prompt_key not in extra_info:
            raise ValueError(
                f"extra_info[{i}] has no {self.prompt_key!r}: a reward model needs the prompt; put it (a list of "
                f"messages or a string) in each row's extra_info when preparing the data"
            )
        return prompt_messages(extra_info[self.prompt_key], f"extra_info[{i}][{self.prompt_key!r}]")

    def output(self, scores: ScoreResult) -> list:
        values = scores.rewards if self.score == "reward" else scores.raw_scores
        if self.as_float:
            return list(values)
        return [
            {"score": v, "raw_score": raw, "uncertainty": u}
            for v, raw, u in zip(values, scores.raw_scores, scores.uncertainty, strict=True)
        ]
