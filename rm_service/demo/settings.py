"""DemoSettings: the sizes of `rm-service demo`, one profile per kind of machine.

The demo's reward-model and PPO knobs are TrainSettings and PPOSettings fields under the demo's
names (`rm_backbone` is TrainSettings.backbone, `ppo_steps` PPOSettings.total_steps): each takes
its bounds and description from there (`of`), and the demo states only its default (the cpu
profile) and, where it uses the knob in its own way, a note. `composed` builds those settings from
the demo's values.

Precedence, highest first: explicit values (flags), the environment (`RM_DEMO_` + field name
in upper case), the profile's values, the defaults below (which are the `cpu` profile).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, Field
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, SettingsConfigDict

from policy_trainer.estimators import EstimatorName
from policy_trainer.session_settings import SessionSettings
from policy_trainer.settings import PPOSettings
from rm_service.data import HH_PAIRS
from rm_service.settings import TrainSettings, rm_home

DEFAULT_DATA = HH_PAIRS
M = TypeVar("M", bound=BaseModel)

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


@dataclass(frozen=True)
class Of:
    """In a field's metadata: the field is `model`'s field `name` too (see `composed`); `of` adds it
    with the field's bounds and description, a bare `Of` alone."""

    model: type[BaseModel]
    name: str


def of(model: type[BaseModel], name: str, note: str = "") -> FieldInfo:
    """`model`'s field `name` (bounds and description; `note` says how the demo uses it), for
    `Annotated[type, of(...)] = the demo's default`."""
    source = model.model_fields[name]
    field = Field(description=f"{source.description} {note}".rstrip() + f" (`{model.__name__}.{name}`)")
    field.metadata = [*source.metadata, Of(model, name)]
    return field


def composed(settings: BaseModel, model: type[M], **more: Any) -> M:
    """`model` built from the fields of `settings` that are its fields (`of`; a subclass's too:
    SessionSettings takes the PPOSettings ones) and `more` (over them); the rest from the
    environment and its defaults, as always."""
    values = {
        mark.name: getattr(settings, name)
        for name, field in type(settings).model_fields.items()
        for mark in field.metadata
        if isinstance(mark, Of) and issubclass(model, mark.model)
    }
    return model(**{**values, **more})


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
    rm_backbone: Annotated[
        str,
        of(
            TrainSettings,
            "backbone",
            "The gold's and the proxy's. SmolLM2-135M head mode is the most accurate model that fits the demo's "
            "budget on a 2-core CPU (see bench/reward_models.py).",
        ),
    ] = "smollm2-135m-instruct"
    rm_mode: Annotated[
        Literal["head", "full"],
        of(TrainSettings, "mode", "The proxy's (v2) and its retrains'; the gold is always head mode."),
        Of(PPOSettings, "retrain_mode"),
    ] = "head"
    rm_max_minutes: Annotated[
        float,
        of(TrainSettings, "max_minutes", "The gold's (its features are then cached for the proxy and the retrains)."),
    ] = 10.0
    rm_max_tokens: Annotated[int, of(TrainSettings, "max_tokens")] = 512
    rm_ensemble_size: Annotated[int, of(TrainSettings, "ensemble_size", "Their disagreement picks what to label.")] = 4
    proxy_dataset_fraction: Annotated[
        float,
        of(
            TrainSettings,
            "dataset_fraction",
            "The proxy's (the served reward model); the gold learns from all of them, so the proxy starts clearly "
            "weaker (Gao et al., 2023's setup; measured: 10% -> 0.61 held-out, all -> 0.67).",
        ),
    ] = 0.1
    calibration_pairs: int | None = Field(
        None,
        ge=0,
        description="Held-out human-labeled pairs the gold annotator also labels, to measure its agreement with "
        "people (None: all).",
    )
    # -- policy -----------------------------------------------------------------------------
    policy: Annotated[str, of(PPOSettings, "policy")] = "smollm2-135m-instruct"
    ppo_steps: Annotated[int, of(PPOSettings, "total_steps")] = 20
    prompts_per_step: Annotated[int, of(PPOSettings, "prompts_per_step")] = 4
    samples_per_prompt: Annotated[int, of(PPOSettings, "samples_per_prompt"), Field(ge=2)] = 2
    max_new_tokens: Annotated[int, of(PPOSettings, "max_new_tokens")] = 32
    max_prompt_tokens: Annotated[int, of(PPOSettings, "max_prompt_tokens", "Short prompts keep a CPU step short.")] = 96
    advantage_estimator: Annotated[
        EstimatorName, of(PPOSettings, "advantage_estimator", "rloo has no value head to warm up in a short run.")
    ] = "rloo"
    learning_rate: Annotated[
        float, of(PPOSettings, "learning_rate", "High for a 20-step run; the KL penalty bounds the drift.")
    ] = 1e-4
    kl_coef: Annotated[float, of(PPOSettings, "kl_coef")] = 0.1
    eval_prompts: Annotated[
        int,
        of(PPOSettings, "eval_prompts", "Scored by the proxy and the gold (samples_per_prompt completions each)."),
        Field(ge=1),
    ] = 24
    eval_every: Annotated[int, of(PPOSettings, "eval_every")] = 5
    update_epochs: Annotated[int, of(PPOSettings, "update_epochs")] = 1
    num_minibatches: Annotated[int, of(PPOSettings, "num_minibatches")] = 2
    # -- outer loop -------------------------------------------------------------------------
    submit_every: Annotated[int, of(PPOSettings, "submit_every", "With 0 the proxy stays fixed.")] = 1
    submit_fraction: Annotated[
        float,
        of(
            PPOSettings,
            "submit_fraction",
            "3 of each step's 4 prompts: 60 gold labels over 20 steps, so two retrains can each decide on 24 or "
            "more of the policy's samples (at 2 a step the first decided on 12 and the rule mostly waited).",
        ),
    ] = 0.75
    retrain_min_labels: Annotated[
        int, of(PPOSettings, "retrain_min_labels", "A retrain about step 8 and, if it is undecided, another about 16.")
    ] = 24
    selection: Annotated[Literal["uncertainty", "random"], of(PPOSettings, "selection")] = "uncertainty"
    label_budget: Annotated[int, of(PPOSettings, "label_budget")] = 0
    retrain_max_labels: Annotated[
        int,
        of(
            PPOSettings,
            "retrain_max_labels",
            "The rule usually asks for more than 20 steps bring; 24 more keeps a second decision inside the run, "
            "on the 48 labels since the proxy's snapshot.",
        ),
    ] = 24
    reward_pessimism: Annotated[Literal["none", "mean_minus_std", "min"], of(PPOSettings, "reward_pessimism")] = "none"
    pessimism_k: Annotated[float, of(PPOSettings, "pessimism_k")] = 1.0
    seed: Annotated[int, of(PPOSettings, "seed")] = 0
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
    max_turns: Annotated[int, of(SessionSettings, "max_turns", "Multi-turn."), Field(le=16)] = 2
    session_steps: int = Field(
        5,
        gt=0,
        description="Multi-turn: PPO steps over sessions. With every session labeled (session_submit_fraction) and a "
        "retrain at session_retrain_min_labels, the retrain is requested after step 3 and decided during step 4; "
        "step 5 plays against the new version if it was promoted.",
    )
    session_submit_fraction: float = Field(
        1.0,
        gt=0,
        le=1,
        description="Multi-turn: share of each step's played sessions sent for labeling (every submit_every steps). "
        "All of them: 8 a step, so a retrain has 16 labels after two steps (at 0.75 the demo labeled about 12 "
        "sessions in 4 steps and never retrained).",
    )
    session_retrain_min_labels: int = Field(
        16,
        ge=0,
        description="Multi-turn: request a retrain at this many new feedback labels (0: never); the single-turn "
        "demo's retrain_min_labels counts ranking labels.",
    )
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
    user_max_new_tokens: Annotated[int, of(SessionSettings, "user_max_new_tokens", "Multi-turn."), Field(gt=0)] = 24

    @property
    def run_home(self) -> Path:
        return (self.home or rm_home() / "demo").resolve()


def demo_settings(profile: str | None = None, **explicit) -> DemoSettings:
    """Explicit values over the environment over the profile (default: RM_DEMO_PROFILE, else
    cpu) over the defaults. An unknown profile is DemoSettings' validation error."""
    profile = profile or os.environ.get("RM_DEMO_PROFILE", "cpu")
    preset = {k: v for k, v in PROFILES.get(profile, {}).items() if f"RM_DEMO_{k.upper()}" not in os.environ}
    return DemoSettings(profile=profile, **{**preset, **{k: v for k, v in explicit.items() if v is not None}})
