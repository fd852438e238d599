"""The reward model r(x, y), in two kinds.

`RewardModel`, what rm-service trains: a backbone, pooled features, K linear score heads.

    h = pool(backbone(x ++ y), layers, method)     see models.pooling
    r = W h + b                                    W: [K, F], one row per ensemble member

The served reward is the mean over the K members and the uncertainty their std. A version
trained with session outcomes beside pairs or thumbs may also hold a session head (`session`,
U: [K, F]): each turn's credit v = U h + c, whose sum over a conversation's turns is the
session value ScoreTurns serves (train.feedback). Score and the exported graphs read `score`
only; ScoreTurns reads both.

`CheckpointRewardModel`, a `*ForSequenceClassification` directory from elsewhere (TRL's
RewardTrainer writes these; OpenAssistant's DeBERTa reward models are these): run by
transformers' own class, so every family's head (DistilBERT's pre-classifier, DeBERTa's
pooler, RoBERTa's dense + tanh, the decoders' score read at the last non-padding token) is
computed exactly as transformers computes it. Its `num_labels` must be 1: a classifier
with several labels is not a reward model.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from rm_service.errors import FailedPrecondition
from rm_service.models.formatting import ENCODER_MODEL_TYPES
from rm_service.models.pooling import Pooling, depth, pool, pooled_features, truncate

log = logging.getLogger(__name__)


class RewardModel(nn.Module):
    """Backbone + pooling + K linear score heads."""

    kind = "heads"

    def __init__(self, backbone: nn.Module, score: nn.Linear, pooling: Pooling, session: nn.Linear | None = None):
        super().__init__()
        self.backbone = backbone
        self.score = score
        self.pooling = pooling
        self.session = session

    @property
    def ensemble_size(self) -> int:
        return self.score.out_features

    @property
    def hidden_size(self) -> int:
        return self.score.in_features

    def features(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        completion_start: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Pooled features h, [B, T] -> [B, F]. Expects right padding."""
        return pooled_features(self.backbone, self.pooling, input_ids, attention_mask, token_type_ids, completion_start)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        completion_start: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Rewards of every ensemble member, [B, T] -> [B, K]."""
        h = self.features(input_ids, attention_mask, token_type_ids, completion_start)  # [B, F]
        return self.score(h.to(self.score.weight.dtype))  # [B, K]

    def turn_heads(self, h: torch.Tensor) -> torch.Tensor:
        """What ScoreTurns reads from features: the reward members, then the session head's
        members when there is one. [B, F] -> [B, K] or [B, K + K_s]."""
        h = h.to(self.score.weight.dtype)
        rewards = self.score(h)  # [B, K]
        return rewards if self.session is None else torch.cat([rewards, self.session(h)], dim=-1)

    def rewards_at(self, input_ids: torch.Tensor, positions: list[int], starts: list[int]) -> torch.Tensor:
        """Member rewards read at several positions of one causal sequence [1, T] -> [P, K]
        ([P, K + K_s] with a session head: turn_heads): the reward of the prefix ending at each
        position, its completion starting at the matching start. With causal attention the
        states at t see tokens <= t only, so this equals scoring each prefix on its own, from
        one forward pass."""
        t = torch.arange(input_ids.size(1), device=input_ids.device)  # [T]
        row_masks = (
            t[None, :] <= torch.tensor(positions, device=t.device)[:, None]
        ).long()  # [P, T]: row p ends at positions[p]
        h = prefix_features(self, input_ids, row_masks, torch.tensor(starts, device=t.device))  # [P, F]
        return self.turn_heads(h)  # [P, K(+K_s)]


def prefix_features(
    model: RewardModel, input_ids: torch.Tensor, row_masks: torch.Tensor, starts: torch.Tensor
) -> torch.Tensor:
    """Features of P prefixes of one causal sequence from one backbone pass: the hidden states
    of [1, T] are computed once and pooled under each row's mask, [P, T] -> [P, F]."""
    pooling = model.pooling
    full_mask = torch.ones_like(input_ids)  # [1, T]
    if pooling.layers in ((), (depth(model.backbone),)):
        states = [model.backbone(input_ids=input_ids, attention_mask=full_mask).last_hidden_state]  # [1, T, H]
    else:
        hidden = model.backbone(input_ids=input_ids, attention_mask=full_mask, output_hidden_states=True).hidden_states
        states = [hidden[layer] for layer in pooling.layers]
    p = row_masks.size(0)
    return torch.cat([pool(h.expand(p, -1, -1), row_masks, starts, pooling.method) for h in states], dim=-1)  # [P, F]


class CheckpointRewardModel(nn.Module):
    """A `*ForSequenceClassification` checkpoint, run by transformers' own class."""

    kind = "checkpoint"

    def __init__(self, classifier: nn.Module):
        super().__init__()
        self.classifier = classifier
        self.pooling = Pooling(method="last")  # recorded for information; the class pools as it always does

    @property
    def ensemble_size(self) -> int:
        return int(self.classifier.config.num_labels)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        completion_start: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The checkpoint's logits, [B, T] -> [B, 1]. Right padding with the config's pad id."""
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None and self.classifier.config.model_type not in NO_TOKEN_TYPES:
            kwargs["token_type_ids"] = token_type_ids
        return self.classifier(**kwargs).logits  # [B, 1]

    def rewards_at(self, input_ids: torch.Tensor, positions: list[int], starts: list[int]) -> torch.Tensor:
        """Decoder checkpoints: the score head applied to the states at each position, [1, T] -> [P, 1]."""
        head = getattr(self.classifier, "score", None)
        if not isinstance(head, nn.Linear):
            raise FailedPrecondition("per-turn rewards need a decoder checkpoint with a linear score head")
        base = self.classifier.base_model
        hidden = base(input_ids=input_ids, attention_mask=torch.ones_like(input_ids)).last_hidden_state  # [1, T, H]
        return head(hidden[0, positions].to(head.weight.dtype))  # [P, 1]


# Families whose forward takes no token_type_ids.
NO_TOKEN_TYPES = {"distilbert", "roberta", "xlm-roberta", "deberta-v2", "modernbert", "mpnet"}


def _fresh_score(hidden: int, ensemble_size: int, seed: int, std: float) -> nn.Linear:
    """A new score layer of `ensemble_size` rows, initialised like HF's (normal, `std`), from `seed`."""
    generator = torch.Generator().manual_seed(seed)
    score = nn.Linear(hidden, ensemble_size, bias=False)
    with torch.no_grad():
        score.weight.copy_(torch.randn(score.weight.shape, generator=generator) * std)
    return score


def is_classifier_checkpoint(model_dir: str | Path) -> bool:
    from transformers import AutoConfig

    archs = AutoConfig.from_pretrained(model_dir).architectures or []
    return any(a.endswith("ForSequenceClassification") for a in archs)


def load_checkpoint_model(model_dir: str | Path) -> CheckpointRewardModel:
    """A `*ForSequenceClassification` directory as it was trained (num_labels must be 1)."""
    from transformers import AutoModelForSequenceClassification

    classifier = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=torch.float32)
    labels = int(classifier.config.num_labels)
    if labels != 1:
        raise FailedPrecondition(
            f"{model_dir}: num_labels={labels}: a classifier with several labels is not a reward model; "
            "a reward checkpoint has one output (TRL's RewardTrainer sets num_labels=1)"
        )
    if classifier.config.pad_token_id is None and not classifier.config.is_encoder_decoder:
        log.info("%s: no pad_token_id in config; batches of more than one item cannot find the last token", model_dir)
    return CheckpointRewardModel(classifier.eval())


def load_reward_model(
    model_dir: str | Path, ensemble_size: int = 1, seed: int = 0, pooling: Pooling | None = None
) -> RewardModel:
    """An HF directory as a RewardModel to train or to serve with trained heads.

    A decoder `*ForSequenceClassification` checkpoint keeps its trained linear score layer
    (full mode trains it further); a plain backbone gets a fresh score layer of
    `ensemble_size` rows from `seed`. `pooling` (default: the last token of the backbone's
    output, or the token mean for encoders) cuts the backbone after its deepest layer.
    """
    from transformers import AutoModel, AutoModelForSequenceClassification

    if is_classifier_checkpoint(model_dir):
        seq = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=torch.float32)
        backbone, score = seq.base_model, getattr(seq, "score", None)
        if not isinstance(score, nn.Linear):
            raise FailedPrecondition(
                f"{model_dir}: {type(seq).__name__} has no single linear score head over the last token, "
                "so it can be served as it is (--model) but not trained further"
            )
        pooling = pooling or Pooling(method="last")
    else:
        backbone = AutoModel.from_pretrained(model_dir, dtype=torch.float32)
        pooling = pooling or Pooling(method="all_mean" if backbone.config.model_type in ENCODER_MODEL_TYPES else "last")
        hidden = backbone.config.hidden_size
        score = _fresh_score(
            pooling.width(hidden), ensemble_size, seed, getattr(backbone.config, "initializer_range", 0.02)
        )
    model = RewardModel(truncate(backbone, pooling), score, pooling)
    model.eval()
    return model
