"""Settings: one pydantic model per component, every field overridable by environment.

Environment names are the prefix plus the field name in upper case, e.g. `RM_SERVE_PORT=50051`
or `RM_TRAIN_BACKBONE=minilm-l6`. `RM_HOME` sets the service home (default `./var`), under
which the store file, model artifacts and the model cache live unless set otherwise.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from rm_service.settings_http import HttpServeSettings, comma_list


def rm_home() -> Path:
    """The service home directory: `$RM_HOME`, default `./var`."""
    return Path(os.environ.get("RM_HOME", "var")).resolve()


class StoreSettings(BaseSettings):
    """The DuckDB preference store."""

    model_config = SettingsConfigDict(env_prefix="RM_STORE_")

    path: Path = Field(
        default_factory=lambda: rm_home() / "rm.duckdb", description="DuckDB file of the preference store."
    )
    max_text_chars: int = Field(32_000, gt=0, description="Longest accepted message or response, in characters.")
    max_responses: int = Field(16, ge=2, description="Most responses a single label may rank (K).")
    max_strength: float = Field(1000.0, gt=0, description="Largest accepted label strength (a margin; finite, >= 0).")
    group_commit_max_labels: int = Field(
        4096,
        ge=1,
        description="Most labels the writer commits in one transaction; 1 = one transaction per request (no group "
        "commit).",
    )


class ModelSettings(BaseSettings):
    """Where models and artifacts live."""

    model_config = SettingsConfigDict(env_prefix="RM_MODELS_")

    cache_dir: Path = Field(
        default_factory=lambda: rm_home() / "cache" / "models",
        description="Bundled models converted to HF directories (GGUF dequantised once) are cached here.",
    )
    artifacts_dir: Path = Field(
        default_factory=lambda: rm_home() / "registry",
        description="Reward-model versions: one directory per version.",
    )


class ServeSettings(HttpServeSettings):
    """The gRPC reward server."""

    model_config = SettingsConfigDict(env_prefix="RM_SERVE_")

    host: str = Field(
        "127.0.0.1", description="Address to bind; a non-loopback address needs bearer tokens (tokens_file)."
    )
    port: int = Field(50051, ge=0, le=65535, description="Port to bind; 0 picks a free one.")
    model: str | None = Field(
        None,
        description="Serve this model (a registry version, a bundled name or an HF directory) instead of the "
        "promoted version.",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Device for the model; auto picks CUDA when present."
    )
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto",
        description="Precision of the served model: auto = bf16 on CUDA, and on a CPU the faster of fp32 and bf16 "
        "autocast as measured once per machine (models/precision.py); golden pairs are checked in the precision "
        "served.",
    )
    backend: Literal["auto", "torch", "onnx"] = Field(
        "auto",
        description="What runs batches: auto = PyTorch in the chosen precision, except ONNX Runtime when that "
        "precision is fp32 on a CPU and the version has an ONNX export (always PyTorch on CUDA).",
    )
    also_load: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Versions (registry names or version directories) kept loaded beside the served one, never "
        "swapped out, for clients that pin them: e.g. a gold reward model scored beside the proxy. "
        "Comma-separated.",
    )
    onnx_int8: bool = Field(
        False,
        description="Serve the int8 ONNX model when the version kept one (it passed the 99% pair-ordering check).",
    )
    max_items_per_request: int = Field(
        512, gt=0, description="Most items one Score request may carry (INVALID_ARGUMENT above)."
    )
    max_batch_tokens: int = Field(
        2048,
        gt=0,
        description="Token budget of one model batch (padded tokens: count x longest). 2048 suits a CPU; raise it "
        "(16k+) on a GPU.",
    )
    max_padding: float = Field(
        0.3,
        ge=0,
        le=1,
        description="An item that is not yet due joins a batch only while padding the batch's not-yet-due rows to "
        "its longest item wastes at most this fraction of their tokens (due items join whatever their length).",
    )
    fair_wait_s: float = Field(
        0.0,
        ge=0,
        description="Fairness bound: an item still waiting this long after its first-come-first-served turn (the "
        "tokens queued ahead of it at admission over the measured rate) joins the next batch whatever its length. 0 "
        "= 8 x the measured mean batch time (4 let padding grow to 1.5x under overload in a simulation of "
        "bench/overload.py's queue; 6 and more kept it at 1.13-1.18 with the same longest wait).",
    )
    target_wait_s: float = Field(
        2.0,
        gt=0,
        description="Queueing delay admission aims for: unless max_queued_tokens is set, requests are refused while "
        "the queued tokens reach the measured model rate (tokens/s) x this.",
    )
    max_inflight_items: int = Field(
        0,
        ge=0,
        description="Items admitted and not yet answered; beyond it Score answers RESOURCE_EXHAUSTED at once. 0 = no "
        "item cap.",
    )
    max_queued_tokens: int = Field(
        0,
        ge=0,
        description="Tokens admitted and not yet scored at which requests are refused (RESOURCE_EXHAUSTED at once). "
        "0 = the measured model rate x target_wait_s.",
    )
    max_wait_ms: float = Field(
        0.0,
        ge=0,
        description="Wait this long before forming a batch (0: no timer; a batch leaves when the model is free).",
    )
    score_turns_max_turns: int = Field(
        64, gt=0, description="Most assistant turns one ScoreTurns call may score (INVALID_ARGUMENT above)."
    )
    score_turns_max_tokens: int = Field(
        8192,
        gt=0,
        description="Most tokens one ScoreTurns conversation may hold, formatted before truncation (INVALID_ARGUMENT "
        "above).",
    )
    follow_registry: bool = Field(
        True, description="Hot-swap to each version the registry promotes (polls promoted.json)."
    )
    watch_interval_s: float = Field(1.0, gt=0, description="How often to look for a promotion.")
    max_message_bytes: int = Field(16 * 1024 * 1024, gt=0, description="Largest gRPC message accepted or sent.")
    grace_seconds: float = Field(10.0, ge=0, description="On shutdown, how long in-flight calls may take to finish.")
    with_store: bool = Field(
        True, description="Open the preference store and serve PreferenceService from this process."
    )
    with_model: bool = Field(
        True, description="Load a reward model and serve RewardService (off: a store-only process)."
    )
    torch_threads: int = Field(0, ge=0, description="Intra-op threads for torch; 0 = number of cores.")
    model_nice: int = Field(
        10,
        ge=0,
        le=19,
        description="How many nice steps the model thread and the OpenMP workers it starts run below the server's "
        "RPC threads: when the CPU is oversubscribed, refusals, health checks and metrics are answered first and the "
        "model takes what is left (Linux; 0 = the same priority). bench/overload.py, 2 cores at 4x load: rejection "
        "p99 55-56 ms at 0, 25-59 ms at 10.",
    )
    gil_switch_interval_ms: float = Field(
        0.5,
        gt=0,
        le=100,
        description="Python's GIL switch interval in `rm-service serve` (sys.setswitchinterval; Python's default is "
        "5 ms): the longest the event loop waits for the GIL while the tokeniser or the model thread holds it. "
        "bench/overload.py, 2 cores at 4x load with model_nice 10: rejection p99 25-59 ms at 5 ms, 45-84 ms at 1 ms, "
        "28-34 ms at 0.5 ms.",
    )
    metrics_port: int = Field(
        9464,
        ge=-1,
        le=65535,
        description="Prometheus /metrics HTTP port, bound on the same host as gRPC; 0 picks a free one, -1 turns "
        "metrics off. If the default port is taken the server logs a warning and runs without metrics; a port set "
        "explicitly must bind.",
    )
    log_format: Literal["text", "json"] = Field(
        "text", description="Log lines as text, or json: one object per line with time, level, logger, message."
    )

    @field_validator("also_load", mode="before")
    @classmethod
    def _split_names(cls, value):
        return comma_list(value)


class SecuritySettings(BaseSettings):
    """Authentication (bearer tokens with roles) and TLS for the gRPC server. Off by default: a
    server without tokens binds loopback addresses only."""

    model_config = SettingsConfigDict(env_prefix="RM_AUTH_")

    tokens_file: Path | None = Field(
        None,
        description="File of bearer tokens, one `role:token` per line (roles: scorer, labeler, admin; # starts a "
        "comment). Keeps secrets off the command line; make it readable by the server's user only.",
    )
    tokens: SecretStr | None = Field(
        None, description="Bearer tokens as `role:token,role:token`, added to those of tokens_file. Prefer tokens_file."
    )
    tls_cert: Path | None = Field(
        None, description="PEM certificate chain of the server; with tls_key, serve TLS only."
    )
    tls_key: Path | None = Field(None, description="PEM private key of tls_cert.")
    tls_client_ca: Path | None = Field(
        None,
        description="PEM CA bundle for mutual TLS: clients must present a certificate signed by it (needs tls_cert).",
    )


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
        "three "
        "(outcomes then also shape every turn's reward). docs/feedback.md.",
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
        description="Backbone precision: bf16 autocast, fp32, or auto: bf16 on CUDA; on a CPU the faster of the two, "
        "measured once per machine (models/precision.py).",
    )
