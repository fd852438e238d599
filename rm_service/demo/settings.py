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

from policy_trainer.estimators import EstimatorName
from rm_service.data import HH_PAIRS
from rm_service.settings import rm_home

DEFAULT_DATA = HH_PAIRS

# `full`: the same loop at a realistic size for a GPU host (bf16 on CUDA is automatic).
PROFILES: dict[str, dict] = {
    "cpu": {},
    "full": {
        "rm_mode": "full",
        "rm_max_minutes": 60.0,
        "rm_max_tokens": 1024,
        "ppo_steps": 200,
        "prompts_per_step": 32,
        "samples_per_prompt": 4,
        "max_new_tokens": 128,
        "max_prompt_tokens": 512,
        "advantage_estimator": "gae",
        "learning_rate": 1e-5,
        "kl_coef": 0.05,
        "eval_prompts": 64,
        "submit_every": 10,
        "submit_fraction": 0.25,
        "retrain_min_labels": 256,
        "update_epochs": 2,
        "num_minibatches": 4,
    },
}


class DemoSettings(BaseSettings):
    """`rm-service demo`: import, train v1, serve, judge, PPO with the outer loop, report."""

    model_config = SettingsConfigDict(env_prefix="RM_DEMO_", extra="forbid")

    profile: Literal["cpu", "full"] = Field(
        "cpu", description="Preset sizes: cpu (a 2-core CPU, ~15 min) or full (a GPU host)."
    )
    data: Path = Field(
        DEFAULT_DATA, description="HH-RLHF pairs (JSONL) imported as human labels; also the PPO prompts."
    )
    home: Path | None = Field(
        None,
        description="Directory of the run (store, registry, PPO run, report); default `$RM_HOME/demo`, emptied first.",
    )
    # -- reward models ------------------------------------------------------------------------
    rm_backbone: str = Field(
        "smollm2-135m-instruct",
        description="Backbone of the gold and proxy reward models (bundled name or HF directory). SmolLM2-135M head "
        "mode is the most accurate model that fits the demo's budget on a 2-core CPU (see bench/reward_models.py).",
    )
    rm_mode: Literal["head", "full"] = Field(
        "head",
        description="Reward-model training mode of the proxy (v2) and its retrains; the gold is always head mode.",
    )
    rm_max_minutes: float = Field(
        10.0,
        gt=0,
        description="Training budget of the gold model (its features are then cached for the proxy and the retrains).",
    )
    rm_max_tokens: int = Field(
        512, ge=16, description="Tokens kept per (conversation, completion) by the reward models."
    )
    rm_ensemble_size: int = Field(
        4, ge=1, description="Score heads (served as mean and std; their disagreement picks what to label)."
    )
    proxy_dataset_fraction: float = Field(
        0.1,
        gt=0,
        le=1,
        description="Share of the human-labeled conversations the proxy (the served reward model) learns from; the "
        "gold learns from all of them, so the proxy starts clearly weaker (Gao et al., 2023's setup; measured: 10% "
        "-> 0.61 held-out, all -> 0.67).",
    )
    calibration_pairs: int | None = Field(
        None,
        ge=0,
        description="Held-out human-labeled pairs the gold annotator also labels, to measure its agreement with "
        "people (None: all).",
    )
    # -- policy -----------------------------------------------------------------------------
    policy: str = Field(
        "smollm2-135m-instruct", description="Policy trained with PPO (bundled name or HF causal-LM directory)."
    )
    ppo_steps: int = Field(20, gt=0, description="PPO steps.")
    prompts_per_step: int = Field(4, gt=0, description="Prompts per rollout batch.")
    samples_per_prompt: int = Field(2, ge=2, description="Completions per prompt (labeling candidates need 2 or more).")
    max_new_tokens: int = Field(32, gt=0, description="Most new tokens per completion.")
    max_prompt_tokens: int = Field(
        96,
        ge=8,
        description="Prompts longer than this (after the chat template) are cut from the left at turn boundaries; "
        "short prompts keep a CPU step short.",
    )
    advantage_estimator: EstimatorName = Field(
        "rloo",
        description="rloo: the clipped PPO surrogate with leave-one-out advantages (no value head to warm up in a "
        "short run); gae: a value head and GAE.",
    )
    learning_rate: float = Field(
        1e-4,
        gt=0,
        description="AdamW learning rate of the policy (high for a 20-step run; the KL penalty bounds the drift).",
    )
    kl_coef: float = Field(0.1, ge=0, description="KL penalty coefficient to the reference policy.")
    eval_prompts: int = Field(
        24,
        ge=1,
        description="Held-out prompts scored by the proxy and the gold before, during and after PPO "
        "(samples_per_prompt completions each).",
    )
    eval_every: int = Field(
        5,
        ge=0,
        description="PPO steps between evaluations of proxy and gold reward on the held-out prompts (0: start and "
        "end only).",
    )
    update_epochs: int = Field(1, gt=0, description="PPO passes over each rollout batch.")
    num_minibatches: int = Field(2, gt=0, description="PPO minibatches per pass.")
    # -- outer loop -------------------------------------------------------------------------
    submit_every: int = Field(
        1,
        ge=0,
        description="Every this many PPO steps, fresh samples go to the labeling queue (0: never; the proxy stays "
        "fixed).",
    )
    submit_fraction: float = Field(
        0.5,
        gt=0,
        le=1,
        description="Fraction of a batch's prompts submitted (with all their completions); `selection` picks which.",
    )
    retrain_min_labels: int = Field(
        12, ge=0, description="New labels since the reward model's snapshot that trigger a retrain request (0: never)."
    )
    selection: Literal["uncertainty", "random"] = Field(
        "uncertainty", description="Which samples go to labeling: the ensemble's most doubted pairs, or random."
    )
    label_budget: int = Field(0, ge=0, description="Most labeling candidates over the run (0: no limit).")
    retrain_max_labels: int = Field(
        48,
        ge=0,
        description="Most new labels an undecided retrain may ask for before the next (the promotion rule's budget; "
        "0: 8 x retrain_min_labels).",
    )
    reward_pessimism: Literal["none", "mean_minus_std", "min"] = Field(
        "none",
        description="The reward PPO optimises from the proxy's ensemble: its mean, mean minus pessimism_k std, or its "
        "minimum (a conservative reward; see PPOSettings).",
    )
    pessimism_k: float = Field(
        1.0, ge=0, description="Standard deviations subtracted by reward_pessimism=mean_minus_std."
    )
    seed: int = Field(0, description="Seed of the PPO run (prompt order, sampling).")
    # -- run --------------------------------------------------------------------------------
    server_start_timeout_s: float = Field(
        600.0, gt=0, description="How long the server may take to load and warm the model."
    )
    progress: bool = Field(True, description="Progress bars.")
    # -- multi-turn (rm-service demo --multi-turn) ---------------------------------------------
    multi_turn: bool = Field(
        False,
        description="Run the multi-turn loop instead (rm_service/demo/multiturn.py): the reward models as above, a "
        "user model trained (or reused), then PPO over whole conversations against the served user model, the held-out "
        "sessions' per-turn and session gold in the report.",
    )
    max_turns: int = Field(2, ge=1, le=16, description="Multi-turn: most assistant turns per session.")
    session_steps: int = Field(4, gt=0, description="Multi-turn: PPO steps over sessions.")
    session_eval_openings: int = Field(
        8, ge=1, description="Multi-turn: held-out first user turns played (samples_per_prompt sessions each)."
    )
    user_model: str | None = Field(
        None,
        description="Multi-turn: a user-model version directory to reuse (e.g. one an earlier run registered); unset: "
        "train one on the imported conversations.",
    )
    user_backbone: str = Field(
        "smollm2-135m-instruct", description="Multi-turn: backbone of the user model trained (LoRA, as the default)."
    )
    user_max_minutes: float = Field(3.0, gt=0, description="Multi-turn: training budget of the user model.")
    user_max_new_tokens: int = Field(24, gt=0, description="Multi-turn: most tokens of one simulated user turn.")

    @property
    def run_home(self) -> Path:
        return (self.home or rm_home() / "demo").resolve()


def demo_settings(profile: str | None = None, **explicit) -> DemoSettings:
    """Explicit values over the environment over the profile (default: RM_DEMO_PROFILE, else
    cpu) over the defaults. An unknown profile is DemoSettings' validation error."""
    profile = profile or os.environ.get("RM_DEMO_PROFILE", "cpu")
    preset = {k: v for k, v in PROFILES.get(profile, {}).items() if f"RM_DEMO_{k.upper()}" not in os.environ}
    return DemoSettings(profile=profile, **{**preset, **{k: v for k, v in explicit.items() if v is not None}})
