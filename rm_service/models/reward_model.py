"""The reward model r(x, y): a backbone, a pooled feature, and K score heads.

    h = backbone(x ++ y)[last real token]          (causal: the EOS that closes y)
      | mean over tokens of backbone(x, y)         (encoder, head mode: sentence-transformers pool this way)
      | backbone(x, y).pooler_output               (encoder checkpoint with a trained classifier)
    r = W h (+ b)                                  W: [K, H], one row per ensemble member

The served reward is the mean over the K members and the uncertainty their std.
A directory written by `AutoModelForSequenceClassification.save_pretrained` (TRL's
RewardTrainer writes these) loads with its own score layer: K = num_labels.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)


class RewardModel(nn.Module):
    def __init__(self, backbone: nn.Module, score: nn.Linear, pooling: str):
        super().__init__()
        self.backbone = backbone
        self.score = score
        self.pooling = pooling  # "last_token" | "mean" | "pooler" | "cls"

    @property
    def ensemble_size(self) -> int:
        return self.score.out_features

    @property
    def hidden_size(self) -> int:
        return self.score.in_features

    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Pooled features h, [B, T] -> [B, H]. Expects right padding."""
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        out = self.backbone(**kwargs)
        if self.pooling == "pooler":
            return out.pooler_output  # [B, H]
        hidden = out.last_hidden_state  # [B, T, H]
        if self.pooling == "cls":
            return hidden[:, 0]  # [B, H]
        if self.pooling == "mean":
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # [B, T, 1]
            return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1)  # [B, H]
        last = attention_mask.sum(dim=1) - 1  # [B] index of the last real token
        return hidden[torch.arange(hidden.size(0), device=hidden.device), last]  # [B, H]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Rewards of every ensemble member, [B, T] -> [B, K]."""
        h = self.features(input_ids, attention_mask, token_type_ids)  # [B, H]
        return self.score(h.to(self.score.weight.dtype))  # [B, K]


def _pooling_for(backbone: nn.Module, is_encoder: bool, has_trained_head: bool) -> str:
    """Causal: the last real token. Encoder: its classifier's pooling when it has a trained
    one (HF's *ForSequenceClassification reads the pooler), else the token mean."""
    if not is_encoder:
        return "last_token"
    if has_trained_head:
        return "pooler" if getattr(backbone, "pooler", None) is not None else "cls"
    return "mean"


def load_reward_model(model_dir: str | Path, is_encoder: bool, ensemble_size: int = 1, seed: int = 0) -> RewardModel:
    """Load an HF directory as a RewardModel.

    A `*ForSequenceClassification` checkpoint keeps its trained score layer. A plain
    backbone gets a fresh score layer of `ensemble_size` rows (initialised like HF's, from
    `seed`), to be trained by head mode or full mode.
    """
    from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(model_dir)
    archs = config.architectures or []
    has_trained_head = any(a.endswith("ForSequenceClassification") for a in archs)
    if has_trained_head:
        seq = AutoModelForSequenceClassification.from_pretrained(model_dir)
        backbone = seq.base_model
        score = getattr(seq, "score", None) or getattr(seq, "classifier", None)
        if not isinstance(score, nn.Linear):
            raise ValueError(f"{model_dir}: unsupported classification head {type(score).__name__}; a single nn.Linear is expected")
        if getattr(seq.config, "pad_token_id", None) is None and not is_encoder:
            log.info("%s: no pad_token_id in config; rm-service pools by attention mask, so none is needed", model_dir)
    else:
        backbone = AutoModel.from_pretrained(model_dir)
        hidden = backbone.config.hidden_size
        generator = torch.Generator().manual_seed(seed)
        score = nn.Linear(hidden, ensemble_size, bias=False)
        std = getattr(backbone.config, "initializer_range", 0.02)
        with torch.no_grad():
            score.weight.copy_(torch.randn(score.weight.shape, generator=generator) * std)
    model = RewardModel(backbone, score, _pooling_for(backbone, is_encoder, has_trained_head))
    model.eval()
    return model
