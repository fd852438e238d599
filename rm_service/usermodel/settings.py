"""UserModelSettings: training, evaluation and serving of the user model (prefix RM_USER_).

The held-out split is not set here: the user model reads the reward model's
(`RM_TRAIN_HELDOUT_FRACTION`, `RM_TRAIN_SEED`, rm_service.train.data), so a conversation held
out from one is held out from the other.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class UserModelSettings(BaseSettings):
    """The user model: a causal LM fine-tuned to write the next user turn, or to end the conversation."""

    model_config = SettingsConfigDict(env_prefix="RM_USER_")

    backbone: str = Field(
        "smollm2-135m-instruct",
        description="Causal LM to fine-tune: a bundled name or any HF causal LM directory (config.json, weights, "
        "tokenizer with a chat template).",
    )
    method: Literal["full", "lora"] = Field(
        "lora",
        description="full: fine-tune every weight; lora: LoRA adapters on every linear layer (merged into the saved "
        "model). LoRA is the default by measurement: on SmolLM2-135M and 2 CPU cores a full step cost several LoRA "
        "steps and, in the same budget, only LoRA lowered held-out NLL (docs/user-model.md).",
    )
    lora_rank: int = Field(16, gt=0, description="LoRA rank when method is lora.")
    learning_rate: float = Field(5e-5, gt=0, description="AdamW learning rate (full fine-tune; LoRA adapters get 10x).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    warmup_steps: int = Field(10, ge=0, description="Linear learning-rate warm-up, in optimiser steps.")
    batch_tokens: int = Field(
        2048, gt=0, description="Token budget of one optimiser step (padded tokens: conversations x longest)."
    )
    max_tokens: int = Field(
        512,
        ge=32,
        description="Tokens a conversation may hold; a longer one loses whole turns from its start (never dropped), "
        "and the same cut applies when the model is served.",
    )
    epochs: float = Field(
        2.0, gt=0, description="Passes over the training conversations (the time budget may end sooner)."
    )
    max_minutes: float = Field(
        10.0, gt=0, description="Wall-clock budget of the fine-tune (evaluation and saving not counted)."
    )
    eval_every: int = Field(
        20, gt=0, description="Optimiser steps between validation NLL checks; the best weights are kept."
    )
    patience: int = Field(5, gt=0, description="Stop after this many validation checks without a lower validation NLL.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto",
        description="bf16 autocast or fp32; auto: bf16 on CUDA, on a CPU the faster of the two as measured once per "
        "machine (models/precision.py). Weights stay fp32.",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Device for training; auto picks CUDA when present."
    )
    seed: int = Field(0, description="Seed of the batch order.")
    fit_half: Literal["all", "a", "b"] = Field(
        "all",
        description="Fit on every training conversation, or on one of two disjoint halves of them (a or b, by the "
        "conversation id's hash): a user model fit on half a to train a policy against and one fit on half b, never "
        "trained against, to measure whether the policy exploits its simulator (policy-trainer sessions "
        "--eval-user-addresses). Validation and held-out conversations are the same for both.",
    )
    promote: bool = Field(
        True,
        description="Promote the new user model when its held-out NLL is below the base model's and not above the "
        "promoted user model's on the same conversations (plus gate_tolerance).",
    )
    gate_tolerance: float = Field(
        0.01, ge=0, description="Nats per user-turn token a new user model may lose to the promoted one."
    )
    max_new_tokens: int = Field(
        64,
        gt=0,
        description="Serving: tokens a sampled user turn may take when a call does not say (SimulateUser "
        "max_new_tokens).",
    )
    max_new_tokens_cap: int = Field(
        256, gt=0, description="Serving: the most tokens a call may ask for per user turn (INVALID_ARGUMENT above)."
    )
    max_conversations: int = Field(
        256, gt=0, description="Serving: most conversations one SimulateUser call may carry (INVALID_ARGUMENT above)."
    )
    generate_batch_tokens: int = Field(
        16384,
        gt=0,
        description="Serving: token budget of one generation batch (rows x (longest prompt + max_new_tokens)); a "
        "call with more runs in several batches.",
    )
