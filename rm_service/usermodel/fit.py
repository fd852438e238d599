"""The fine-tune: next-token NLL on user-turn tokens and end decisions only.

    loss = sum over learned positions of -log p(label) / their count        (one optimiser step)

A step is a token-budget batch of conversation windows (similar lengths together, the batches
in a seeded random order each epoch). Full fine-tune (every weight, AdamW) or LoRA adapters on
every linear layer (peft; merged into the weights at the end). The learning rate warms up
linearly and decays linearly to 0 over the planned steps. Every `eval_every` steps the NLL on
the validation conversations is measured; the best weights are kept and the run stops after
`patience` checks without improvement, at the end of `epochs`, or when the time budget is
spent. Weights stay fp32; forward passes run under bf16 autocast when that precision was
chosen (always on GPUs that support it). On CUDA batches are moved with non_blocking copies
and the optimiser is the fused AdamW.
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from rm_service.usermodel.format import Encoded
from rm_service.usermodel.runtime import UserRuntime, lm_loss, score, token_batches
from rm_service.usermodel.settings import UserModelSettings

log = logging.getLogger(__name__)


@dataclass
class FitReport:
    steps: int
    tokens: int  # learned positions seen
    seconds: float  # in optimiser steps (validation checks not counted)
    tokens_per_s: float  # sequence tokens (padding excluded) per second of optimiser steps
    best_validation_nll: float
    stopped: str  # epochs | budget | patience
    trainable_params: int


def fit(
    runtime: UserRuntime,
    fit_seqs: list[Encoded],
    validation: list[Encoded],
    settings: UserModelSettings,
    budget_s: float,
    show_progress: bool = True,
) -> FitReport:
    """Fine-tune runtime.model in place (LoRA merged back); returns what the run did. `budget_s` counts
    optimiser steps only: validation checks (the one before training included) are not charged to it."""
    model = runtime.model
    if settings.method == "lora":
        model = with_lora(model, settings.lora_rank)
    params = [p for p in model.parameters() if p.requires_grad]
    lr = settings.learning_rate * (10 if settings.method == "lora" else 1)
    fused = runtime.device.type == "cuda"
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=settings.weight_decay, fused=fused)
    batches = _batches(fit_seqs, settings.batch_tokens)
    total = max(1, math.ceil(settings.epochs * len(batches)))
    warmup = min(settings.warmup_steps, total // 4)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(1, warmup)) * max(0.0, 1 - s / total)
    )
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    best = {n: p.detach().clone() for n, p in model.named_parameters() if n in trainable}
    best_nll, since_best, stopped = validation_nll(runtime, validation), 0, "epochs"
    log.info("validation NLL before training: %.4f (%d windows)", best_nll, len(validation))
    rng = random.Random(settings.seed)
    step, learned, seen, trained_s = 0, 0, 0, 0.0
    bar = tqdm(total=total, desc="user model", unit="step", disable=not show_progress)
    model.train()
    while step < total:
        order = list(range(len(batches)))
        rng.shuffle(order)
        for b in order:
            started = time.monotonic()
            batch = runtime.collate([fit_seqs[i] for i in batches[b]])  # [b, T]
            with runtime.autocast():
                loss_sum, n = lm_loss(runtime.model, batch)  # peft adapts runtime.model's layers in place
            (loss_sum / max(n, 1)).backward()
            torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            nll_step = loss_sum.item() / max(n, 1)  # waits for the step on CUDA
            trained_s += time.monotonic() - started
            step, learned, seen = step + 1, learned + n, seen + int(batch["attention_mask"].sum())
            bar.update(1)
            bar.set_postfix(nll=f"{nll_step:.3f}", tok_s=f"{seen / trained_s:.0f}")
            if validation and (step % settings.eval_every == 0 or step == total):
                nll = validation_nll(runtime, validation)
                model.train()
                if nll < best_nll:
                    best_nll, since_best = nll, 0
                    best = {n_: p.detach().clone() for n_, p in model.named_parameters() if n_ in trainable}
                else:
                    since_best += 1
                log.info("step %d: validation NLL %.4f (best %.4f)", step, nll, best_nll)
            if trained_s > budget_s:
                stopped = "budget"
            elif since_best >= settings.patience:
                stopped = "patience"
            if stopped != "epochs" or step >= total:
                break
        if stopped != "epochs":
            break
    bar.close()
    if validation:
        with torch.no_grad():
            for n_, p in model.named_parameters():
                if n_ in best:
                    p.copy_(best[n_])
    if settings.method == "lora":
        model = model.merge_and_unload()
    runtime.model = model.eval()
    runtime.refresh()
    return FitReport(
        step, learned, trained_s, seen / max(trained_s, 1e-9), best_nll, stopped, sum(p.numel() for p in params)
    )


def validation_nll(runtime: UserRuntime, seqs: list[Encoded]) -> float:
    """Mean NLL over the learned positions of `seqs` (user-turn tokens and decisions)."""
    if not seqs:
        return float("nan")
    return float(np.mean(score(runtime, seqs, model=runtime.model).nll))  # the fp32 weights being trained, autocast


def with_lora(model: torch.nn.Module, rank: int) -> torch.nn.Module:
    """LoRA adapters (peft) on every linear layer but the LM head; only they train."""
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules="all-linear"))


def _batches(seqs: list[Encoded], budget: int) -> list[list[int]]:
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    return [[order[j] for j in b] for b in token_batches([len(seqs[i]) for i in order], budget)]
