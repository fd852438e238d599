"""Settings of reward-model training (`rm-service train`, RequestRetrain, the demo's retrains).

Its own module so that rm_service/settings.py stays readable in one sitting; import it from
`rm_service.settings` like every other component's settings.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

Device = Annotated[str, Field(pattern=r"^(auto|cpu|cuda(:\d+)?)$")]  # auto (CUDA when present), cpu, cuda, cuda:N


class TrainSettings(BaseSettings):
    """Reward-model training (Bradley-Terry)."""

    model_config = SettingsConfigDict(env_prefix="RM_TRAIN_")

    backbone: str = Field(
        "smollm2-135m-instruct",
        description="Bundled model name or HF directory to build the reward model on (a TRL reward checkpoint trains "
        "further).",
    )
    mode: Literal["head", "full"] = Field(
        "head",
        description="head: frozen backbone, cached features, trained score heads. full: fine-tune the backbone (or "
        "LoRA adapters) with the heads.",
    )
    ensemble_size: int = Field(
        4, ge=1, le=64, description="Score heads trained on bootstrap resamples; served as mean and std."
    )
    max_tokens: int = Field(
        512,
        ge=16,
        description="Tokens kept per (conversation, completion); the start is cut first. HH-RLHF items under SmolLM2's "
        "template: median 162, 90th percentile 368; 512 keeps nearly all whole.",
    )
    max_pairs: int | None = Field(None, gt=0, description="Use at most this many training pairs (None: all).")
    dataset_fraction: float = Field(
        1.0,
        gt=0,
        le=1,
        description="Train on this share of the dataset's conversations (imported/human labels, chosen by hash, the "
        "same in every retrain); labels of policy samples are always used. A proxy reward model for "
        "over-optimisation studies trains on a fraction.",
    )
    max_minutes: float = Field(15.0, gt=0, description="Wall-clock budget for feature extraction and fitting together.")
    heldout_fraction: float = Field(
        0.1, ge=0, lt=1, description="Dataset conversations held out for evaluation (split by conversation)."
    )
    onpolicy_heldout_fraction: float = Field(
        0.25,
        ge=0,
        lt=1,
        description="Full mode, or head mode with gate_crossfit_folds < 2: conversations of on-policy labels (a "
        "policy's samples) held out, to measure and decide retrains on fresh samples.",
    )
    onpolicy_weight: float = Field(
        4.0,
        gt=0,
        description="Loss weight of each on-policy pair against a dataset pair's 1: fresh labels of the policy's "
        "samples are few beside the dataset, and they are where the served reward is wrong.",
    )
    feature_layers: str = Field(
        "auto",
        description="Head mode: backbone layers whose states are candidate features: auto (50/55/60% of the depth "
        "for decoders, 50/75/100% for encoders), last, or a list like 12,18,24. Head mode picks layer, pooling and "
        "penalty by 5-fold cross-validation on the training pairs.",
    )
    head_l2: float = Field(
        0.3, gt=0, description="Head mode: L2 penalty used when there are too few pairs (< 50) to cross-validate it."
    )
    pair_weight: float = Field(
        1.0,
        ge=0,
        description="Head mode, when feedback labels are in the snapshot: weight of the Bradley-Terry term (the mean "
        "loss over pairs) in the objective beside the thumb and outcome terms (docs/feedback.md).",
    )
    thumb_weight: float = Field(
        1.0,
        ge=0,
        description="Head mode: weight of the per-turn thumbs term, the mean logistic loss of sigmoid(r_turn - "
        "b_thumb) against each thumb (1 up, 0 down); 0 ignores thumbs.",
    )
    outcome_weight: float = Field(
        1.0,
        ge=0,
        description="Head mode: weight of the session-outcome term, the mean logistic loss of sigmoid(V - b_outcome) "
        "against each outcome in [0, 1], V the session's value (session_head); 0 ignores outcomes.",
    )
    session_head: Literal["separate", "shared"] = Field(
        "separate",
        description="Head mode, with session outcomes beside pairs or thumbs: separate = the outcomes train a session "
        "head of their own (V the sum of its per-turn credits) and the turn reward fits pairs and thumbs, so P(up) and "
        "P(success) each fit their own target; shared = V is the sum of the turn rewards, one function explaining all "
        "three (outcomes then also shape every turn's reward). docs/feedback.md.",
    )
    feature_batch_tokens: int = Field(
        1024,
        gt=0,
        description="Token budget of one feature-extraction batch (1024 measured fastest on a 2-core CPU; raise it "
        "on a GPU).",
    )
    center_coef: float = Field(
        1e-3,
        ge=0,
        description="Full mode: weight of the centring term coef * (r_chosen + r_rejected)^2 (head mode centres "
        "exactly).",
    )
    weight_decay: float = Field(1e-2, ge=0, description="Full mode: AdamW weight decay.")
    patience: int = Field(
        100,
        ge=1,
        description="Full mode: early stopping after this many optimiser steps without validation-loss improvement.",
    )
    seed: int = Field(0, description="Seed for the split, the bootstrap and the heads' initialisation.")
    promote: bool = Field(True, description="Promote the new version when it passes the gate.")
    export_onnx: Literal["auto", "on", "off"] = Field(
        "auto",
        description="Export the version to ONNX (fp32, parity-checked; int8 kept only if it orders >= 99% of pairs "
        "alike): auto = only when it trained in fp32 on a CPU, where ONNX Runtime is what serves it.",
    )
    full_learning_rate: float = Field(
        2e-5, gt=0, description="Full mode: AdamW learning rate of the backbone (LoRA adapters get 10x)."
    )
    lora_rank: int = Field(
        0, ge=0, description="Full mode: LoRA rank on every linear layer of the backbone; 0 fine-tunes all weights."
    )
    micro_batch_pairs: int = Field(4, gt=0, description="Full mode: pairs per forward/backward pass.")
    grad_accum: int = Field(4, gt=0, description="Full mode: micro-batches accumulated per optimiser step.")
    epochs: float = Field(1.0, gt=0, description="Full mode: passes over the training pairs.")
    warmup_ratio: float = Field(
        0.05, ge=0, lt=1, description="Full mode: fraction of steps with linear learning-rate warm-up."
    )
    max_grad_norm: float = Field(1.0, gt=0, description="Full mode: gradient clipping norm.")
    eval_every: int = Field(
        25, gt=0, description="Full mode: optimiser steps between validation-loss checks (early stopping)."
    )
    checkpoint_every: int = Field(50, gt=0, description="Full mode: optimiser steps between resumable checkpoints.")
    resume: bool = Field(True, description="Full mode: continue from the run's last checkpoint when one exists.")
    gate_onpolicy: bool = Field(
        True,
        description="Weigh labels of the policy's own samples (those new since the parent's snapshot) as evidence when "
        "deciding a promotion, beside the held-out human pairs.",
    )
    gate_feedback: bool = Field(
        True,
        description="Head mode: weigh the thumbs and session outcomes committed since the parent's snapshot (the "
        "policy's sessions, labeled) as evidence too: each label's log-likelihood gain over the parent, read by a "
        "model that never saw it (held out, or cross-fitted as the on-policy pairs are).",
    )
    gate_confidence: float = Field(
        0.95,
        gt=0.5,
        lt=1,
        description="Level of the intervals the promotion rule decides on (the candidate's per-pair log-likelihood "
        "gain over its parent, paired): promote when significantly better on held-out human pairs, on the policy's "
        "samples or on both weighed together and significantly worse on neither; reject when significantly worse; "
        "otherwise undecided (keep collecting labels). Its error rates are measured in docs/bench/gate.md.",
    )
    gate_onpolicy_share: float = Field(
        0.5,
        ge=0,
        le=1,
        description="Weight of the policy's samples in the evidence weighed together (the rest goes to the held-out "
        "human pairs): the distribution the policy samples from now counts as much as the dataset's.",
    )
    gate_crossfit_folds: int = Field(
        5,
        ge=0,
        description="Head mode: folds over the new on-policy labels; each fold is held out once from a refit of the "
        "heads, so every new label is evidence and the version still trains on them all (0 or 1: hold out "
        "onpolicy_heldout_fraction of them instead, as full mode does).",
    )
    gate_min_effect: float = Field(
        0.01,
        gt=0,
        description="Smallest gain (nats per pair) worth detecting: an undecided retrain asks for the on-policy pairs "
        "that would show a gain this size, or its measured one if larger, with 80% power.",
    )
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto",
        description="Backbone precision: bf16 or fp32, or auto: bf16 on CUDA; on a CPU the faster of the two, "
        "measured on a layer of the backbone once per machine (models/precision.py). In bf16, feature extraction "
        "runs bf16 weights; full mode trains fp32 weights under bf16 autocast.",
    )
    device: Device = Field(
        "auto", description="Training device: auto (CUDA if any), cpu, cuda, cuda:N; under torchrun, each rank's GPU."
    )
    sharding: Literal["auto", "ddp", "fsdp"] = Field(
        "auto", description="torchrun full mode: ddp, fsdp (FSDP2), auto (fsdp when 16 B/param pass half a GPU)."
    )
