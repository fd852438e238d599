"""A reward model ready to run: module, tokenizer, formatting contract, normalisation.

Training (feature extraction), evaluation and serving all run models through this class,
so they share one formatting function and one batching path.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from rm_service.conversation import Message
from rm_service.models.batching import collate, token_budget_batches
from rm_service.models.formatting import FormatSpec, Formatted, format_item, spec_for
from rm_service.models.reward_model import RewardModel, load_reward_model
from rm_service.models.resolver import resolve
from rm_service.settings import ModelSettings

log = logging.getLogger(__name__)


@dataclass
class ModelRuntime:
    model: RewardModel
    tokenizer: object
    spec: FormatSpec
    backbone: str  # bundled name or path
    backbone_key: str  # identity of the backbone weights, keys the feature cache
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    autocast_bf16: bool = False
    reward_mean: float = 0.0
    reward_std: float = 1.0

    @property
    def pad_id(self) -> int:
        tok = self.tokenizer
        return tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)

    def format(self, prompt: list[Message], completion: str) -> Formatted:
        return format_item(self.tokenizer, self.spec, prompt, completion)

    def _autocast(self):
        if self.autocast_bf16:
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @torch.inference_mode()
    def run_collated(self, batch: dict[str, torch.Tensor], what: str = "rewards") -> np.ndarray:
        """One padded batch: features [b, H] or member rewards [b, K]."""
        batch = {k: v.to(self.device) for k, v in batch.items()}
        with self._autocast():
            h = self.model.features(**batch).float()  # [b, H]
        values = h if what == "features" else self.model.score(h.to(self.model.score.weight.dtype)).float()  # [b, H|K]
        return values.cpu().numpy()

    @torch.inference_mode()
    def rewards_at(self, input_ids: list[int], positions: list[int]) -> np.ndarray:
        """Member rewards read at several positions of one causal sequence: [P, K].

        With causal attention the hidden state at position t sees tokens <= t only, so this
        equals scoring each prefix ending at t on its own, from one forward pass."""
        ids = torch.tensor([input_ids], device=self.device)  # [1, T]
        with self._autocast():
            hidden = self.model.backbone(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state  # [1, T, H]
        h = hidden[0, positions].float()  # [P, H]
        return self.model.score(h.to(self.model.score.weight.dtype)).float().cpu().numpy()  # [P, K]

    def run(self, items: list[Formatted], max_batch_tokens: int, what: str = "rewards", progress=None) -> np.ndarray:
        """Features [N, H] (what="features") or member rewards [N, K] (what="rewards")."""
        out: np.ndarray | None = None
        for batch_idx in token_budget_batches([len(x) for x in items], max_batch_tokens):
            values = self.run_collated(collate([items[i] for i in batch_idx], self.pad_id), what)
            if out is None:
                out = np.zeros((len(items), values.shape[1]), dtype=np.float32)
            out[batch_idx] = values
            if progress is not None:
                progress(len(batch_idx), sum(len(items[i]) for i in batch_idx))
        return out if out is not None else np.zeros((0, 0), dtype=np.float32)

    def normalise(self, raw: np.ndarray) -> np.ndarray:
        return (raw - self.reward_mean) / self.reward_std


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def backbone_key(model_dir: Path, name: str) -> str:
    """Identity of a backbone: its name plus a hash of its config and weight-file sizes."""
    parts = [name, (model_dir / "config.json").read_text()]
    for weights in sorted(model_dir.glob("*.safetensors")) + sorted(model_dir.glob("*.bin")):
        parts.append(f"{weights.name}:{weights.stat().st_size}")
    return f"{Path(name).name}-{hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:12]}"


def load_backbone_runtime(
    name_or_path: str,
    max_tokens: int,
    ensemble_size: int = 1,
    device: str = "auto",
    precision: str = "fp32",
    settings: ModelSettings | None = None,
    spec: FormatSpec | None = None,
    identity: str | None = None,
) -> ModelRuntime:
    """Load a bundled model or HF directory; `spec` defaults to the backbone's own contract.
    `identity` is the name the backbone key is computed with (default `name_or_path`): a
    version stores its fine-tuned backbone as "./backbone" wherever the directory lives."""
    from transformers import AutoConfig, AutoTokenizer

    model_dir = resolve(name_or_path, settings)
    config = AutoConfig.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    spec = spec or spec_for(tokenizer, config.model_type, max_tokens)
    model = load_reward_model(model_dir, is_encoder=spec.kind == "encoder", ensemble_size=ensemble_size)
    dev = pick_device(device)
    model.to(dev)
    return ModelRuntime(
        model=model,
        tokenizer=tokenizer,
        spec=spec,
        backbone=name_or_path,
        backbone_key=backbone_key(model_dir, identity or name_or_path),
        device=dev,
        autocast_bf16=precision == "bf16" or (precision == "auto" and dev.type == "cuda"),
    )
