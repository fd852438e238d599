"""Annotators: what turns a judge item (a prompt and K responses) into a label.

- `PanelAnnotator`: LLM judges (local or over HTTP) with position swap, one or a voting panel.
- `RewardAnnotator` (`--backend rm`): a reward model scores every response; the ranking is
  by reward, with ties when rewards differ by at most `rm_tie_margin`; the label's strength is
  the Bradley-Terry log-odds of the best over the next, r_best - r_next (the "margin" of
  TRL's preference datasets), and its probability sigmoid(r_best - r_next) is kept in the
  metadata. This is how a reward model serves as a judge (TRL once shipped PairRM as one) and
  how a stronger "gold" model stands in for people (Gao et al., 2023): provenance names the
  model and its version.

Both give `annotate(item, counts) -> Label | None` (None: the policy left no outcome) and a
`config` string that label ids and progress files are derived from. `TurnsAnnotator`
(judge.sessions, `--backend turns`) answers SESSION tasks with a Feedback instead: an
annotator's `kinds` (default: ranking only) are the tasks it leases. `ANNOTATORS` is the one
registry of the settings' `backend` choices: adding a backend touches this module only.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Protocol, get_args

from rm_client.messages import to_proto
from rm_service.api.v1 import preference_pb2
from rm_service.judge.backend import JudgeBackend
from rm_service.judge.items import JudgeItem
from rm_service.judge.pairwise import Judge, copeland_ranks, judge_item
from rm_service.judge.provenance import annotator, judge_label, label_id
from rm_service.judge.settings import BackendName, JudgeSettings


class Annotator(Protocol):
    """What the judge runner drives: one item in, its label out (None: no decision)."""

    @property
    def name(self) -> str: ...

    @property
    def config(self) -> str: ...

    @property
    def calls(self) -> int: ...

    def annotate(self, item: JudgeItem, counts) -> preference_pb2.Label | preference_pb2.Feedback | None: ...

    def close(self) -> None: ...


def _local_panel(settings: JudgeSettings) -> Annotator:
    from rm_service.judge.local import LocalBackend

    return PanelAnnotator.of(
        [LocalBackend(model, device=settings.device, threads=settings.torch_threads) for model in settings.models],
        settings,
    )


def _http_panel(settings: JudgeSettings) -> Annotator:
    from rm_service.judge.openai_http import OpenAIBackend

    return PanelAnnotator.of([OpenAIBackend(settings, model) for model in settings.models], settings)


def _reward_model(settings: JudgeSettings) -> Annotator:
    return RewardAnnotator(settings.model, settings)


def _score_turns(settings: JudgeSettings) -> Annotator:
    from rm_service.judge.sessions import TurnsAnnotator

    return TurnsAnnotator(settings.model, settings)


# The settings' `backend` choices; each opens its annotator (loading models or connecting).
ANNOTATORS: dict[str, Callable[[JudgeSettings], Annotator]] = {
    "local": _local_panel,  # HF causal LMs in this process, one per panel model
    "http": _http_panel,  # OpenAI-compatible chat-completions endpoints, one per panel model
    "rm": _reward_model,  # a reward model ranks the responses by reward
    "turns": _score_turns,  # a served version's ScoreTurns gives thumbs and an outcome on SESSION tasks
}
if set(get_args(BackendName)) != set(ANNOTATORS):
    raise ImportError(f"JudgeSettings.backend {get_args(BackendName)} must list the annotators {list(ANNOTATORS)}")


def open_annotator(settings: JudgeSettings) -> Annotator:
    """The annotator of `settings.backend`; the caller closes it."""
    return ANNOTATORS[settings.backend](settings)


class PanelAnnotator:
    """LLM judges, one per backend, with position swap; several vote as a panel."""

    def __init__(self, judges: list[Judge], settings: JudgeSettings):
        self.judges, self.settings = judges, settings

    @classmethod
    def of(cls, backends: list[JudgeBackend], settings: JudgeSettings) -> PanelAnnotator:
        return cls([Judge(b, settings) for b in backends], settings)

    def close(self) -> None:
        for judge in self.judges:
            judge.backend.close()

    @property
    def name(self) -> str:
        return annotator(self.judges)

    @property
    def config(self) -> str:
        return label_id(JudgeItem("", [], []), self.judges, self.settings)

    @property
    def calls(self) -> int:
        return sum(j.calls for j in self.judges)

    def annotate(self, item: JudgeItem, counts) -> preference_pb2.Label | None:
        judgments = judge_item(self.judges, item.prompt, item.responses, self.settings.kway)
        counts.pair_judgments = len(judgments)
        counts.position_flips = sum(jd.flipped for jd in judgments)
        ranks = copeland_ranks(
            len(item.responses), judgments, self.settings.inconsistent, self.settings.choice_tie_margin
        )
        return None if ranks is None else judge_label(item, ranks, judgments, self.judges, self.settings)


def reward_ranks(rewards: list[float], tie_margin: float) -> list[int]:
    """Dense ranks (0 = best) by reward; neighbours within `tie_margin` of each other tie."""
    order = sorted(range(len(rewards)), key=lambda i: -rewards[i])
    ranks, rank = [0] * len(rewards), 0
    for previous, current in itertools.pairwise(order):
        if rewards[previous] - rewards[current] > tie_margin:
            rank += 1
        ranks[current] = rank
    return ranks


class RewardAnnotator:
    """A reward model (a registry version, a version directory or a reward checkpoint) as a judge."""

    def __init__(self, model: str, settings, runtime=None, version: str | None = None):
        if runtime is None:
            from rm_service.models.version import open_model

            runtime, meta = open_model(model, device=settings.device)
            version = meta.version if meta is not None else Path(model).name
        self.runtime, self.settings = runtime, settings
        self.version = version or model
        self.calls = 0
        runtime.inference_model()  # made now, not by concurrent first calls

    def close(self) -> None:
        """Nothing to release: the runtime is freed with this object."""

    @property
    def name(self) -> str:
        return f"rm:{self.version}@{self.runtime.spec.hash[:8]}"

    @property
    def config(self) -> str:
        return f"{self.name}|tie={self.settings.rm_tie_margin}"

    def rewards(self, item: JudgeItem) -> list[float]:
        items = [self.runtime.format(item.prompt, text) for text in item.responses]
        self.calls += 1
        return [float(r) for r in self.runtime.run(items, max_batch_tokens=1 << 14).mean(axis=1)]  # [K]

    def annotate(self, item: JudgeItem, counts) -> preference_pb2.Label:
        rewards = self.rewards(item)
        ranks = reward_ranks(rewards, self.settings.rm_tie_margin)
        ordered = sorted(rewards, reverse=True)
        gap = ordered[0] - ordered[1]  # the BT log-odds of the best over the next
        counts.pair_judgments = len(rewards) * (len(rewards) - 1) // 2
        return preference_pb2.Label(
            label_id="rm-" + hashlib.sha256(json.dumps([item.key, self.config]).encode()).hexdigest()[:32],
            prompt=to_proto(item.prompt),
            responses=item.responses,
            ranks=ranks,
            strength=gap,
            source=preference_pb2.JUDGE,
            annotator=self.name,
            task_id=item.task_id,
            metadata={
                "rm_version": self.version,
                "rm_rewards": json.dumps([round(r, 6) for r in rewards]),
                "rm_probability": f"{1 / (1 + math.exp(-gap)):.6f}",
                "judge_template": "reward-model",
            },
        )
