"""A reward model ready to run: module, tokenizer, formatting contract, precision, normalisation.

Training (feature extraction), evaluation and serving all run models through this class,
so they share one formatting function and one batching path.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from rm_service.conversation import Message
from rm_service.errors import FailedPrecondition
from rm_service.models.batching import collate, token_budget_batches
from rm_service.models.formatting import FormatSpec, Formatted, format_item, spec_for
from rm_service.models.pooling import Pooling
from rm_service.models.precision import GOLDEN_TOLERANCE, autocast, resolve_precision
from rm_service.models.resolver import resolve
from rm_service.models.reward_model import CheckpointRewardModel, RewardModel, load_checkpoint_model, load_reward_model
from rm_service.settings import ModelSettings

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)


@dataclass
class ModelRuntime:
    model: RewardModel | CheckpointRewardModel
    tokenizer: PreTrainedTokenizerBase
    spec: FormatSpec
    backbone: str  # bundled name or path
    backbone_key: str  # identity of the backbone weights, keys the feature cache
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    precision: str = "fp32"  # "fp32" or "bf16"; see models.precision
    reward_mean: float = 0.0
    reward_std: float = 1.0
    _bf16: torch.nn.Module | None = field(default=None, repr=False)  # inference_model's copy

    def inference_model(self) -> RewardModel | CheckpointRewardModel:
        """The module inference runs: the model itself in fp32; in bf16 a copy with bf16
        backbone weights, made once (not cast again on every call, half the memory traffic;
        the score heads stay fp32). Training keeps fp32 weights and autocasts; a mode that
        changes the weights calls `refresh()`."""
        if self.precision != "bf16":
            return self.model
        if self._bf16 is None:
            copy_ = copy.deepcopy(self.model)
            inner = copy_.backbone if isinstance(copy_, RewardModel) else copy_.classifier
            self._bf16 = copy_.eval()
            inner.to(torch.bfloat16)
        return self._bf16

    def refresh(self) -> None:
        """Forget the bf16 copy: the fp32 weights changed."""
        self._bf16 = None

    def serve_only(self) -> None:
        """Serving: hold one copy of the weights, in the served precision. In bf16 the backbone is
        cast in place and is the inference model (no fp32 copy is kept beside it); a runtime
        that must train or run in fp32 again is loaded again."""
        if self.precision == "bf16" and self._bf16 is not self.model:
            inner = self.model.backbone if isinstance(self.model, RewardModel) else self.model.classifier
            inner.to(torch.bfloat16)
            self._bf16 = self.model.eval()

    @property
    def config(self):
        """The transformers config of the model run (the precision probe times one of its layers)."""
        return self.model.backbone.config if isinstance(self.model, RewardModel) else self.model.classifier.config

    @property
    def pad_id(self) -> int:
        tok = self.tokenizer
        return tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)

    def format(self, prompt: list[Message], completion: str) -> Formatted:
        return format_item(self.tokenizer, self.spec, prompt, completion)

    def autocast(self):
        return autocast(self.precision, self.device)

    @torch.inference_mode()
    def run_collated(self, batch: dict[str, torch.Tensor], what: str = "rewards") -> np.ndarray:
        """One padded batch: features [b, F], member rewards [b, K], or (what="turns") the
        members ScoreTurns reads, [b, K] or [b, K + K_s] with a session head."""
        batch = {k: v.to(self.device) for k, v in batch.items()}
        model = self.inference_model()
        with self.autocast():
            if what == "features":
                return model.features(**batch).float().cpu().numpy()  # [b, F]
            if what == "turns":
                return model.turn_heads(model.features(**batch)).float().cpu().numpy()  # [b, K(+K_s)]
            return model(**batch).float().cpu().numpy()  # [b, K]

    @torch.inference_mode()
    def rewards_at(self, input_ids: list[int], positions: list[int], starts: list[int]) -> np.ndarray:
        """Member rewards of the prefixes of one causal sequence ending at `positions` (their
        completions starting at `starts`), from one forward pass: [P, K] ([P, K + K_s] with a
        session head)."""
        ids = torch.tensor([input_ids], device=self.device)  # [1, T]
        with self.autocast():
            return self.inference_model().rewards_at(ids, positions, starts).float().cpu().numpy()  # [P, K(+K_s)]

    def run(self, items: list[Formatted], max_batch_tokens: int, what: str = "rewards", progress=None) -> np.ndarray:
        """Features [N, F] (what="features"), member rewards [N, K] (what="rewards") or what
        ScoreTurns reads (what="turns": run_collated)."""
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

    def to_precision(self, precision: str) -> ModelRuntime:
        """The same runtime run in another precision (shares the module)."""
        return ModelRuntime(
            self.model,
            self.tokenizer,
            self.spec,
            self.backbone,
            self.backbone_key,
            self.device,
            precision,
            self.reward_mean,
            self.reward_std,
        )


def pick_device(device: str = "auto") -> torch.device:
    """ "auto" (CUDA when present), "cpu", "cuda" or "cuda:N"."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        raise FailedPrecondition(
            f"device {device!r} asked for, but torch sees {torch.cuda.device_count()} CUDA device(s)"
            + ("" if torch.cuda.is_available() else " (a CPU-only torch, or no driver)")
        )
    return dev


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
    precision: str = "auto",
    settings: ModelSettings | None = None,
    spec: FormatSpec | None = None,
    identity: str | None = None,
    pooling: Pooling | None = None,
    serving: bool = False,
) -> ModelRuntime:
    """Load a bundled model or HF directory as a RewardModel to train (or to serve with a
    version's heads); `spec` defaults to the backbone's own contract, `precision` "auto" to
    the one measured faster on `device`. `identity` is the name the backbone key is computed
    with (default `name_or_path`): a version stores its fine-tuned backbone as "./backbone"
    wherever the directory lives. `serving`: cast to the served precision on the host before
    moving (`serve_only`), so the device never holds the fp32 weights of a bf16 server."""
    from transformers import AutoConfig, AutoTokenizer

    model_dir = resolve(name_or_path, settings)
    config = AutoConfig.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    spec = spec or spec_for(tokenizer, config.model_type, max_tokens)
    model = load_reward_model(model_dir, ensemble_size=ensemble_size, pooling=pooling)
    dev = pick_device(device)
    runtime = ModelRuntime(
        model=model,
        tokenizer=tokenizer,
        spec=spec,
        backbone=name_or_path,
        backbone_key=backbone_key(model_dir, identity or name_or_path),
        device=dev,
        precision=resolve_precision(precision, dev, config=config),
    )
    if serving:
        runtime.serve_only()
    model.to(dev)
    return runtime


def load_checkpoint_runtime(
    name_or_path: str,
    max_tokens: int,
    device: str = "auto",
    precision: str = "auto",
    settings: ModelSettings | None = None,
    serving: bool = False,
) -> ModelRuntime:
    """A `*ForSequenceClassification` directory from elsewhere, to serve as it was trained:
    transformers' own class, and for decoders TRL's formatting (see models.formatting). The
    load check's fp32 reference is scored on the host before the weights move; `serving`: then
    cast to the served precision on the host (`serve_only`), so the device holds one copy."""
    from transformers import AutoConfig, AutoTokenizer

    model_dir = resolve(name_or_path, settings)
    config = AutoConfig.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    spec = spec_for(tokenizer, config.model_type, max_tokens, style="trl")
    model = load_checkpoint_model(model_dir)  # fp32, on the host
    dev = pick_device(device)
    runtime = ModelRuntime(
        model=model,
        tokenizer=tokenizer,
        spec=spec,
        backbone=name_or_path,
        backbone_key=backbone_key(model_dir, name_or_path),
        precision=resolve_precision(precision, dev, config=config),
    )
    pad = model.classifier.config.pad_token_id
    if pad is None:  # transformers finds the last token through the pad id; TRL sets it from the tokenizer
        model.classifier.config.pad_token_id = runtime.pad_id
    elif pad != runtime.pad_id:  # pad with the id the checkpoint's class looks for
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(pad)
    reference = checkpoint_reference(runtime)
    if serving:
        runtime.serve_only()
    model.to(dev)
    runtime.device = dev
    check_checkpoint(runtime, name_or_path, reference)
    return runtime


# Built-in items of the load check of checkpoints: one turn, several turns, a one-token answer.
PARITY_ITEMS = (
    (
        [Message("user", "How do I make a good cup of tea?")],
        "Boil fresh water, steep the tea for three to five minutes, then add milk if you like.",
    ),
    (
        [
            Message("user", "Hi there."),
            Message("assistant", "Hello! How can I help?"),
            Message("user", "Tell me a joke."),
        ],
        "Why did the scarecrow win an award? Because he was outstanding in his field.",
    ),
    ([Message("user", "What is 2 + 2?")], "4"),
)


def checkpoint_reference(runtime: ModelRuntime) -> np.ndarray:
    """The built-in items scored by the checkpoint's own class, one at a time in fp32, where the
    runtime is now (the host, before the weights move): [N]."""
    items = [runtime.format(p, c) for p, c in PARITY_ITEMS]
    return runtime.to_precision("fp32").run(items, max_batch_tokens=1)[:, 0]


def check_checkpoint(runtime: ModelRuntime, where: str, reference: np.ndarray) -> None:
    """The load check of a checkpoint from elsewhere: the built-in items scored by the served
    path (batched and padded, in the served precision, on the device) must agree with
    `reference` (checkpoint_reference) within that precision's tolerance; otherwise the
    checkpoint is refused (e.g. a pad id that the class reads as a real token)."""
    items = [runtime.format(p, c) for p, c in PARITY_ITEMS]
    served = runtime.run(items, max_batch_tokens=1 << 20)[:, 0]  # [N], one padded batch
    tolerance = GOLDEN_TOLERANCE[runtime.precision]
    worst = float(np.max(np.abs(served - reference) / np.maximum(1.0, np.abs(reference))))
    if worst > tolerance:
        raise FailedPrecondition(
            f"{where}: scored in a padded batch ({runtime.precision}) the built-in items differ from the checkpoint's "
            f"own scores by {worst:.3g} (tolerance {tolerance:g}); refusing to serve it"
        )
