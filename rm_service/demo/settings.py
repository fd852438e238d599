"""DemoSettings: the sizes of `rm-service demo`, one profile per kind of machine.

Precedence, highest first: explicit values (flags), the environment (`RM_DEMO_` + field name
in upper case), the profile's values, the defaults below (which are the `cpu` profile).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from rm_service.settings import rm_home

DEFAULT_DATA = Path("..") / "shared" / "data" / "hh_harmless_pairs.jsonl"

# `full`: the same loop at a realistic size for a GPU host (bf16 on CUDA is automatic).
PROFILES: dict[str, dict] = {
    "cpu": {},
    "full": {
        "rm_backbone": "smollm2-135m-instruct", "rm_mode": "full", "rm_max_minutes": 60.0, "rm_max_tokens": 1024,
        "judge_calibration_pairs": 500, "ppo_steps": 200, "prompts_per_step": 32, "samples_per_prompt": 4,
        "max_new_tokens": 128, "max_prompt_tokens": 512, "advantage_estimator": "gae", "learning_rate": 1e-5, "kl_coef": 0.05,
        "eval_prompts": 64, "submit_every": 10, "submit_fraction": 0.25, "retrain_min_labels": 256,
        "update_epochs": 2, "num_minibatches": 4,
    },
}


class DemoSettings(BaseSettings):
    """`rm-service demo`: import, train v1, serve, judge, PPO with the outer loop, report."""

    model_config = SettingsConfigDict(env_prefix="RM_DEMO_", extra="forbid")

    profile: Literal["cpu", "full"] = Field("cpu", description="Preset sizes: cpu (this 2-core machine, ~15 min) or full (a GPU host).")
    data: Path = Field(DEFAULT_DATA, description="HH-RLHF pairs (JSONL) imported as human labels; also the PPO prompts.")
    home: Path | None = Field(None, description="Directory of the run (store, registry, PPO run, report); default `$RM_HOME/demo`, emptied first.")
    # -- reward model -------------------------------------------------------------------------
    rm_backbone: str = Field("minilm-l6", description="Backbone of the reward model (bundled name or HF directory).")
    rm_mode: Literal["head", "full"] = Field("head", description="Reward-model training mode for v1 and the retrains.")
    rm_max_minutes: float = Field(6.0, gt=0, description="Training budget of v1 (a retrain reuses the cached features).")
    rm_max_pairs: int | None = Field(None, gt=0, description="Cap on training pairs (None: all).")
    rm_max_tokens: int = Field(256, ge=16, description="Tokens kept per (conversation, completion) by the reward model (MiniLM-L6 was trained on 256).")
    rm_ensemble_size: int = Field(4, ge=1, description="Score heads (served as mean and std).")
    # -- judge ------------------------------------------------------------------------------
    judge_model: str = Field("smollm2-135m-instruct", description="Local judge model (bundled name or HF causal-LM directory).")
    judge_calibration_pairs: int = Field(16, ge=0, description="Held-out human-labeled pairs the judge also labels, to measure its agreement with people.")
    # -- policy -----------------------------------------------------------------------------
    policy: str = Field("smollm2-135m-instruct", description="Policy trained with PPO (bundled name or HF causal-LM directory).")
    ppo_steps: int = Field(20, gt=0, description="PPO steps.")
    prompts_per_step: int = Field(4, gt=0, description="Prompts per rollout batch.")
    samples_per_prompt: int = Field(2, ge=2, description="Completions per prompt (labeling candidates need 2 or more).")
    max_new_tokens: int = Field(32, gt=0, description="Most new tokens per completion.")
    max_prompt_tokens: int = Field(96, ge=8, description="Prompts longer than this (after the chat template) are skipped; short prompts keep a CPU step short.")
    advantage_estimator: Literal["gae", "rloo"] = Field(
        "rloo", description="rloo: the clipped PPO surrogate with leave-one-out advantages (no value head to warm up in a short run); gae: a value head and GAE.")
    learning_rate: float = Field(1e-4, gt=0, description="AdamW learning rate of the policy (high for a 20-step run; the KL penalty bounds the drift).")
    kl_coef: float = Field(0.1, ge=0, description="KL penalty coefficient to the reference policy.")
    eval_prompts: int = Field(24, ge=1, description="Held-out prompts scored before and after PPO (samples_per_prompt completions each).")
    update_epochs: int = Field(1, gt=0, description="PPO passes over each rollout batch.")
    num_minibatches: int = Field(2, gt=0, description="PPO minibatches per pass.")
    # -- outer loop -------------------------------------------------------------------------
    submit_every: int = Field(2, gt=0, description="Every this many PPO steps, fresh samples go to the labeling queue.")
    submit_fraction: float = Field(1.0, gt=0, le=1, description="Fraction of a batch's prompts submitted (with all their completions).")
    retrain_min_labels: int = Field(12, gt=0, description="New labels since the reward model's snapshot that trigger a retrain request.")
    # -- run --------------------------------------------------------------------------------
    server_start_timeout_s: float = Field(600.0, gt=0, description="How long the server may take to load and warm the model.")
    progress: bool = Field(True, description="Progress bars.")

    @property
    def run_home(self) -> Path:
        return (self.home or rm_home() / "demo").resolve()


def demo_settings(profile: str = "cpu", **explicit) -> DemoSettings:
    """Explicit values over the environment over the profile over the defaults."""
    preset = {k: v for k, v in PROFILES[profile].items() if f"RM_DEMO_{k.upper()}" not in os.environ}
    return DemoSettings(profile=profile, **{**preset, **{k: v for k, v in explicit.items() if v is not None}})
