"""Full mode: fine-tune the backbone (all weights, or LoRA adapters via peft) with the K score
heads, on pairs of token sequences.

Each optimiser step accumulates `grad_accum` micro-batches of `micro_batch_pairs` pairs;
chosen and rejected items of a micro-batch run in one forward pass:

    r = model(chosen ++ rejected)                        [2b, K]
    loss = BT(r[:b], r[b:], margin, center) / grad_accum  (head k weighted by its bootstrap counts)

Early stopping watches the validation loss every `eval_every` steps; the best weights are
kept. A checkpoint every `checkpoint_every` steps makes the run resumable. Under torchrun
the model is wrapped in DistributedDataParallel and each rank takes its share of every epoch.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from rm_service.models.batching import collate
from rm_service.models.formatting import Formatted
from rm_service.models.runtime import ModelRuntime
from rm_service.settings import TrainSettings
from rm_service.store.db import Pair
from rm_service.train.data import Split
from rm_service.train.ddp import World, decide
from rm_service.train.loss import bootstrap_counts, bradley_terry_loss
from rm_service.train.scores import Scores

log = logging.getLogger(__name__)
TRAIN_ACCURACY_SAMPLE = 256


def fit_full_mode(
    runtime: ModelRuntime,
    split: Split,
    settings: TrainSettings,
    deadline: float,
    run_dir: Path,
    world: World = World(),
    show_progress: bool = True,
) -> Scores:
    model = runtime.model
    if settings.lora_rank:
        model.backbone = with_lora(model.backbone, settings.lora_rank)
    fit = [(runtime.format(p.prompt, p.chosen), runtime.format(p.prompt, p.rejected)) for p in split.fit]
    validation = [(runtime.format(p.prompt, p.chosen), runtime.format(p.prompt, p.rejected)) for p in split.validation]
    counts = bootstrap_counts(len(fit), model.ensemble_size, torch.Generator().manual_seed(settings.seed))  # [N, K]
    counts = (
        counts * torch.tensor([settings.onpolicy_weight if p.on_policy else 1.0 for p in split.fit])[:, None]
    )  # [N, K]
    margin = torch.tensor([p.strength or 0.0 for p in split.fit]) if any(p.strength for p in split.fit) else None  # [N]

    params = [p for p in model.parameters() if p.requires_grad]
    lr = settings.full_learning_rate * (10 if settings.lora_rank else 1)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=settings.weight_decay)
    pairs_per_step = settings.micro_batch_pairs * settings.grad_accum * world.size
    total_steps = max(1, math.ceil(settings.epochs * len(fit) / pairs_per_step))
    warmup = int(settings.warmup_ratio * total_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(1, warmup)) * max(0.0, 1 - s / total_steps)
    )
    wrapped = model
    if world.size > 1:
        ids = [runtime.device.index] if runtime.device.type == "cuda" else None  # one GPU per rank
        wrapped = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True)

    state: dict[str, Any] = {"step": 0, "best_loss": float("inf"), "best_step": 0}  # step, best_step: ints
    best = {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}
    ckpt = run_dir / "checkpoint.pt"
    if settings.resume and ckpt.exists():
        state, best = _load_checkpoint(ckpt, model, opt, sched)
        log.info("resumed from %s at step %d", ckpt, state["step"])

    stream = _pair_stream(
        len(fit), settings.micro_batch_pairs, settings.seed, world, start_micro=state["step"] * settings.grad_accum
    )
    bar = tqdm(
        total=total_steps, initial=state["step"], desc="full", unit="step", disable=not (show_progress and world.main)
    )
    tokens, t0 = 0, time.monotonic()
    model.train()
    while state["step"] < total_steps:
        for micro in range(settings.grad_accum):
            idx = next(stream)
            batch = collate([fit[i][0] for i in idx] + [fit[i][1] for i in idx], runtime.pad_id)
            sync = micro == settings.grad_accum - 1 or world.size == 1
            ctx = wrapped.no_sync() if not sync else contextlib.nullcontext()
            with ctx, runtime.autocast():
                r = wrapped(**{k: v.to(runtime.device) for k, v in batch.items()}).float()  # [2b, K]
                b = len(idx)
                loss = (
                    bradley_terry_loss(
                        r[:b],
                        r[b:],
                        None if margin is None else margin[idx].to(r.device),
                        settings.center_coef,
                        counts[idx].to(r.device),
                    )
                    / settings.grad_accum
                )
                loss.backward()
            tokens += int(batch["attention_mask"].sum()) * world.size
        torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        state["step"] += 1
        bar.update(1)
        bar.set_postfix(
            loss=f"{loss.item() * settings.grad_accum:.3f}",
            tokens_per_s=f"{tokens / max(time.monotonic() - t0, 1e-9):.0f}",
        )
        if validation and (state["step"] % settings.eval_every == 0 or state["step"] == total_steps):
            val_loss = _validation_loss(runtime, validation) if world.main else 0.0
            if world.main and val_loss < state["best_loss"]:
                state.update(best_loss=val_loss, best_step=state["step"])
                best = {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}
            model.train()
        if world.main and state["step"] % settings.checkpoint_every == 0:
            _save_checkpoint(ckpt, model, opt, sched, state, best)
        stop = time.monotonic() > deadline or (
            bool(validation) and state["step"] - state["best_step"] >= settings.patience
        )
        if decide(world.main and stop, world):
            break
    bar.close()
    if validation:
        model.load_state_dict(best, strict=False)  # the best validation weights
    model.eval()
    if settings.lora_rank:
        model.backbone = model.backbone.merge_and_unload()
    runtime.refresh()  # the weights changed: inference in bf16 copies them again
    extra = {
        "full_steps": float(state["step"]),
        "tokens_per_s": tokens / max(time.monotonic() - t0, 1e-9),
        "best_validation_loss": float(state["best_loss"]),
    }
    if not world.main:
        return Scores(
            fit=(np.zeros(0), np.zeros(0)), heldout=(np.zeros(0), np.zeros(0)), steps=state["step"], extra=extra
        )
    sample = random.Random(settings.seed).sample(split.fit, min(TRAIN_ACCURACY_SAMPLE, len(split.fit)))
    return Scores(
        fit=pair_rewards(runtime, sample, settings.feature_batch_tokens),
        heldout=pair_rewards(runtime, split.heldout, settings.feature_batch_tokens),
        steps=state["step"],
        num_pairs={
            "train_pairs": len(split.fit) + len(split.validation),
            "validation_pairs": len(split.validation),
            "heldout_pairs": len(split.heldout),
        },
        extra=extra,
        heldout_pairs=list(split.heldout),
        fit_pairs=sample,
    )


def with_lora(backbone: torch.nn.Module, rank: int) -> torch.nn.Module:
    """LoRA adapters (peft) on every linear layer; only they (and the heads) train."""
    from peft import LoraConfig, get_peft_model

    return get_peft_model(
        backbone, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules="all-linear")
    )


def pair_rewards(runtime: ModelRuntime, pairs: list[Pair], max_batch_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """(r_chosen, r_rejected), ensemble means, [N] each."""
    if not pairs:
        return np.zeros(0), np.zeros(0)
    items = [runtime.format(p.prompt, t) for p in pairs for t in (p.chosen, p.rejected)]
    r = runtime.run(items, max_batch_tokens).mean(axis=1).reshape(-1, 2)  # [2N, K] -> [N, 2]
    return r[:, 0], r[:, 1]


@torch.no_grad()
def _validation_loss(runtime: ModelRuntime, pairs: list[tuple[Formatted, Formatted]], micro: int = 16) -> float:
    runtime.model.eval()
    total, n = 0.0, 0
    for begin in range(0, len(pairs), micro):
        part = pairs[begin : begin + micro]
        batch = collate([c for c, _ in part] + [r for _, r in part], runtime.pad_id)
        with runtime.autocast():
            r = (
                runtime.model(**{k: v.to(runtime.device) for k, v in batch.items()}).float().mean(dim=1)
            )  # [2b, K] -> [2b]
        total += bradley_terry_loss(r[: len(part)], r[len(part) :]).item() * len(part)
        n += len(part)
    return total / max(n, 1)


def _pair_stream(n: int, micro: int, seed: int, world: World, start_micro: int = 0):
    """Endless micro-batches of pair indices: each epoch a new permutation, dealt to ranks
    so every rank gets the same number of micro-batches."""
    epoch, emitted = 0, 0
    while True:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        share = order[world.rank : n - n % world.size : world.size] or order[:1]
        for begin in range(0, len(share) - micro + 1 if len(share) >= micro else 1, micro):
            if emitted >= start_micro:
                yield share[begin : begin + micro]
            emitted += 1
        epoch += 1


def _save_checkpoint(path: Path, model, opt, sched, state: dict, best: dict) -> None:
    names = {k for k, v in model.named_parameters() if v.requires_grad}
    trainable = {k: v for k, v in model.state_dict().items() if k in names}
    tmp = path.with_suffix(".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {"model": trainable, "opt": opt.state_dict(), "sched": sched.state_dict(), "state": state, "best": best}, tmp
    )
    os.replace(tmp, path)


def _load_checkpoint(path: Path, model, opt, sched) -> tuple[dict, dict]:
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    model.load_state_dict(ckpt["model"], strict=False)
    opt.load_state_dict(ckpt["opt"])
    sched.load_state_dict(ckpt["sched"])
    return ckpt["state"], ckpt["best"]
