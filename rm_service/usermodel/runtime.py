"""A user model ready to run: a causal LM, its tokenizer and formatting contract, device and precision.

Training, evaluation and serving run the model through this class. Log-probabilities are
computed only where something is learned: the decoder's hidden states at those positions go
through the LM head, so a batch never holds [B, T, vocab] logits (49,152 columns for SmolLM2).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rm_service.models.precision import autocast, resolve_precision
from rm_service.models.resolver import resolve
from rm_service.models.runtime import backbone_key, pick_device
from rm_service.settings import ModelSettings
from rm_service.usermodel.format import DECISION, IGNORE, USER_TOKEN, Encoded, Formatter, UserFormat

log = logging.getLogger(__name__)


@dataclass
class Scored:
    """Per learned position of a batch of encoded sequences: what it is, its NLL, P(end)."""

    nll: np.ndarray  # [N] -log p(label)
    p_end: np.ndarray  # [N] softmax(logits)[END]
    kind: np.ndarray  # [N] USER_TOKEN | DECISION
    turn: np.ndarray  # [N] prior user turns of the turn the position belongs to
    row: np.ndarray  # [N] index of the sequence in the list scored
    ended: np.ndarray  # [N] at a decision: the label is END


@dataclass
class UserRuntime:
    model: torch.nn.Module  # an HF *ForCausalLM, fp32 weights
    tokenizer: Any  # a transformers tokenizer (transformers is Any to mypy: pyproject.toml)
    formatter: Formatter
    backbone: str
    backbone_key: str
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    precision: str = "fp32"
    _bf16: torch.nn.Module | None = field(default=None, repr=False)

    @property
    def spec(self) -> UserFormat:
        return self.formatter.spec

    @property
    def pad_id(self) -> int:
        tok = self.tokenizer
        return tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)

    def autocast(self):
        return autocast(self.precision, self.device)

    def inference_model(self) -> torch.nn.Module:
        """fp32: the model itself; bf16: a copy with bf16 weights made once (see ModelRuntime)."""
        if self.precision != "bf16":
            return self.model
        if self._bf16 is None:
            self._bf16 = copy.deepcopy(self.model).eval().to(torch.bfloat16)
        return self._bf16

    def refresh(self) -> None:
        self._bf16 = None

    def to_precision(self, precision: str) -> UserRuntime:
        return UserRuntime(
            self.model, self.tokenizer, self.formatter, self.backbone, self.backbone_key, self.device, precision
        )

    def collate(self, seqs: list[Encoded]) -> dict[str, torch.Tensor]:
        """Right-padded input_ids, attention_mask and labels [b, T] on the runtime's device."""
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(seqs), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s.input_ids)
            labels[i, : len(s)] = torch.tensor(s.labels)
            mask[i, : len(s)] = 1
        return {
            k: v.to(self.device, non_blocking=True)
            for k, v in (("input_ids", ids), ("attention_mask", mask), ("labels", labels))
        }


def learned_logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [N, V] at the learned positions, their labels [N]) of a collated batch."""
    hidden = model.get_decoder()(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
    ).last_hidden_state  # [b, T, H]
    where = batch["labels"] != IGNORE  # [b, T]
    h = hidden[where]  # [N, H]
    return model.get_output_embeddings()(h).float(), batch["labels"][where]  # [N, V], [N]


def lm_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed NLL of every learned position (user-turn tokens and decisions), and their count."""
    logits, labels = learned_logits(model, batch)
    return torch.nn.functional.cross_entropy(logits, labels, reduction="sum"), int(labels.numel())


@torch.inference_mode()
def score(runtime: UserRuntime, seqs: list[Encoded], batch_tokens: int = 4096, progress=None, model=None) -> Scored:
    """NLL and P(end) of every learned position of `seqs` (teacher forcing), in the runtime's
    precision (`model`: another module to run, e.g. the fp32 weights being trained)."""
    model = model if model is not None else runtime.inference_model()
    model.eval()
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("nll", "p_end", "kind", "turn", "row", "ended")}
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    for batch_idx in token_batches([len(seqs[i]) for i in order], batch_tokens):
        rows = [order[j] for j in batch_idx]
        part = [seqs[r] for r in rows]
        batch = runtime.collate(part)
        with runtime.autocast():
            logits, labels = learned_logits(model, batch)  # [N, V], [N]
        logp = torch.log_softmax(logits, dim=-1)  # [N, V]
        parts["nll"].append((-logp.gather(1, labels[:, None])[:, 0]).cpu().numpy())
        parts["p_end"].append(logp[:, runtime.spec.end_id].exp().cpu().numpy())
        parts["ended"].append((labels == runtime.spec.end_id).cpu().numpy())
        for s, r in zip(part, rows, strict=True):
            learned = [i for i, k in enumerate(s.kind) if k in (USER_TOKEN, DECISION)]
            parts["kind"].append(np.array([s.kind[i] for i in learned], dtype=np.int64))
            parts["turn"].append(np.array([s.turn[i] for i in learned], dtype=np.int64))
            parts["row"].append(np.full(len(learned), r, dtype=np.int64))
        if progress is not None:
            progress(len(part))
    cat = {k: np.concatenate(v) if v else np.zeros(0) for k, v in parts.items()}
    cat["ended"] = cat["ended"] & (cat["kind"] == DECISION)
    return Scored(**cat)


def token_batches(lengths: list[int], budget: int) -> list[list[int]]:
    """Consecutive runs of `lengths` (sorted ascending) whose count x longest fits `budget`."""
    out: list[list[int]] = []
    for i, n in enumerate(lengths):
        if out and (len(out[-1]) + 1) * max(n, lengths[out[-1][0]]) <= budget:
            out[-1].append(i)
        else:
            out.append([i])
    return out


def load_user_runtime(
    name_or_path: str,
    max_tokens: int,
    device: str = "auto",
    precision: str = "auto",
    settings: ModelSettings | None = None,
    spec: UserFormat | None = None,
    identity: str | None = None,
) -> UserRuntime:
    """A bundled name or an HF causal-LM directory as a user model (fp32 weights); `spec`
    defaults to the backbone's own contract (its chat template, END = EOS)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = resolve(name_or_path, settings)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    formatter = Formatter(tokenizer, spec) if spec is not None else Formatter.for_tokenizer(tokenizer, max_tokens)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    dev = pick_device(device)
    model.to(dev).eval()
    return UserRuntime(
        model,
        tokenizer,
        formatter,
        name_or_path,
        backbone_key(Path(model_dir), identity or name_or_path),
        dev,
        resolve_precision(precision, dev, config=model.config),
    )
