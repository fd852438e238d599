"""The policy (a causal LM with a value head) and its frozen reference.

Where the value head lives: a scalar linear layer on the policy's last hidden state, sharing
the transformer trunk with the LM head (as in Ziegler et al. 2019 and InstructGPT's PPO
implementation, where the critic is the policy's trunk plus a head). Why: one forward pass
gives both the log-probabilities and the values, which halves the forward cost of a PPO step
and keeps one model in memory, not two. On this 2-core CPU that is the difference between a
step of ~20 s and one of ~35 s. The cost: the value loss also moves the trunk; `vf_coef`
keeps its gradient small next to the policy's. The head starts at zero (V = 0 everywhere),
so the first advantages are the rewards themselves.

The reference is a deep copy of the policy at the start, in eval mode, with gradients off.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from rm_service.models.precision import autocast, resolve_precision
from rm_service.models.resolver import resolve
from rm_service.settings import ModelSettings

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


class PolicyWithValue(nn.Module):
    """A causal LM and a value head on its trunk's last hidden state."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm
        hidden = lm.config.hidden_size
        self.value_head = nn.Linear(hidden, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    def response_hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_len: int) -> torch.Tensor:
        """Hidden states that predict each response token: [B, P+R] -> [B, R, H]."""
        return response_hidden(self.lm, input_ids, attention_mask, response_len)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_len: int, temperature: float):
        """Response-token logits [B, R, V] (divided by temperature) and values [B, R]."""
        h = self.response_hidden(input_ids, attention_mask, response_len)  # [B, R, H]
        logits = lm_logits(self.lm, h, temperature)  # [B, R, V]
        values = self.value_head(h.float()).squeeze(-1)  # [B, R]
        return logits, values


def position_ids_for(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding: the first real token is position 0. [B, T] -> [B, T]."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def response_hidden(
    lm: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_len: int
) -> torch.Tensor:
    """Run the trunk over query ++ response; keep the states at positions P-1 .. P+R-2, the
    ones whose next-token distributions produced the response. [B, P+R] -> [B, R, H]."""
    out = lm.base_model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_for(attention_mask),
        use_cache=False,
    )
    hidden = out.last_hidden_state  # [B, P+R, H]
    return hidden[:, -response_len - 1 : -1]  # [B, R, H]


def lm_logits(lm: nn.Module, hidden: torch.Tensor, temperature: float) -> torch.Tensor:
    """Next-token logits at the sampling temperature, in fp32: [B, R, H] -> [B, R, V]."""
    return lm.get_output_embeddings()(hidden).float() / temperature


def reference_logits(
    ref: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_len: int, temperature: float
) -> torch.Tensor:
    """The frozen reference's response-token logits, [B, P+R] -> [B, R, V]."""
    return lm_logits(ref, response_hidden(ref, input_ids, attention_mask, response_len), temperature)


@dataclass
class Loaded:
    policy: PolicyWithValue
    ref: nn.Module
    tokenizer: PreTrainedTokenizerBase
    device: torch.device
    precision: str  # "fp32" or "bf16" (autocast)

    def autocast(self):
        return autocast(self.precision, self.device)


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_policy(
    name_or_path: str, device: str = "auto", precision: str = "auto", models: ModelSettings | None = None
) -> Loaded:
    """The policy (fp32 weights, trainable), its value head and a frozen reference copy.

    Precision: fp32 weights always (AdamW needs them); with bf16 autocast the matmuls run in
    bf16. `auto`: bf16 on CUDA; on a CPU the faster of the two, measured once per machine
    (rm_service.models.precision).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = resolve(name_or_path, models or ModelSettings())
    tokenizer = AutoTokenizer.from_pretrained(directory)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.eos_token_id is None:
        raise ValueError(f"{directory}: the tokenizer has no EOS token; completions could never end")
    lm = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    dev = pick_device(device)
    policy = PolicyWithValue(lm).to(dev)
    policy.eval()  # no dropout: the log-probabilities of the rollout and the update must agree
    ref = copy.deepcopy(lm).to(dev).eval().requires_grad_(False)
    return Loaded(policy, ref, tokenizer, dev, resolve_precision(precision, dev, config=lm.config))


def stop_token_ids(tokenizer, lm: nn.Module) -> list[int]:
    """EOS ids that end a completion: the tokenizer's and the generation config's."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(lm, "generation_config", None), "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(configured)
    return sorted(i for i in ids if i is not None)


def save_policy(m: Loaded, directory: Path) -> Path:
    """The trained policy as an HF directory (weights and tokenizer) with its value head beside it."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    m.policy.lm.save_pretrained(directory)
    m.tokenizer.save_pretrained(directory)
    heads = {k: v.contiguous() for k, v in m.policy.value_head.state_dict().items()}
    save_file(heads, str(directory / "value_head.safetensors"))
    return directory
