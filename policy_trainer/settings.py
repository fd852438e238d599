"""PPOSettings: every knob of `policy-trainer ppo`, in one documented pydantic-settings model.

Precedence, highest first: command-line flags, environment (`PPO_` + field name in upper
case, e.g. `PPO_KL_COEF=0.1`), a config file (`--config run.yaml|.json|.toml`, keys are the
field names), the defaults below. Unknown keys in a file are an error, not silently ignored.

Defaults are the CPU demo profile (SmolLM2-135M policy, 4 prompts x 2 samples x 32 new
tokens per step); see docs/policy-trainer.md for a GPU profile.
"""

from __future__ import annotations

import contextvars
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    JsonConfigSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
    YamlConfigSettingsSource,
)

from policy_trainer.estimators import ESTIMATORS, EstimatorName
from rm_service.settings import rm_home

_CONFIG_FILE: contextvars.ContextVar[Path | None] = contextvars.ContextVar("ppo_config_file", default=None)


class PPOSettings(BaseSettings):
    """PPO policy training against a served reward model."""

    model_config = SettingsConfigDict(env_prefix="PPO_", extra="forbid", validate_default=True)

    # -- run -------------------------------------------------------------------------------
    run_dir: Path = Field(
        default_factory=lambda: rm_home() / "ppo",
        description="Directory of the run (default `$RM_HOME/ppo`): metrics.jsonl, events.jsonl, TensorBoard files, "
        "plots, checkpoints, the final policy.",
    )
    seed: int = Field(0, description="Seed of prompt order, sampling and the value head's initialisation.")
    total_steps: int = Field(
        20, gt=0, description="PPO iterations (one rollout batch, scored, then update_epochs passes of minibatches)."
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Device for the policy and the reference; auto picks CUDA when present."
    )
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto",
        description="bf16 autocast, fp32, or auto: bf16 on CUDA; on a CPU the faster of the two, measured once per "
        "machine and cached under $RM_HOME/cache.",
    )
    torch_threads: int = Field(0, ge=0, description="Intra-op threads for torch; 0 = number of cores.")
    resume: bool = Field(
        False,
        description="Continue from the last checkpoint in run_dir: policy, value head, optimizer, RNG, KL "
        "controller, reward statistics, step.",
    )
    checkpoint_every: int = Field(10, ge=0, description="Steps between checkpoints (0: only the final one).")
    keep_checkpoints: int = Field(1, ge=1, description="Checkpoints kept on disk (the oldest are deleted).")

    # -- policy ----------------------------------------------------------------------------
    policy: str = Field(
        "smollm2-135m-instruct",
        description="Policy to train: the bundled smollm2-135m-instruct or an HF causal-LM directory. The frozen "
        "reference is a copy of it.",
    )

    # -- prompts ---------------------------------------------------------------------------
    prompts_file: Path | None = Field(
        None,
        description='JSONL of prompts: {"prompt": [messages]} (our ranking/TRL exports), {"messages": [...]} (the '
        'turns up to the last user turn), or HH {"chosen": "\\n\\nHuman: ..."}.',
    )
    prompts_store: Path | None = Field(
        None,
        description="Read the prompts from a preference-store DuckDB file instead (read-only; the file must not be "
        "held by a running server).",
    )
    max_prompt_tokens: int = Field(
        192,
        ge=8,
        description="Most prompt tokens after the chat template; a longer prompt is cut from the left at turn "
        "boundaries (oldest turns first; the last turn's start only when it alone is longer), never dropped.",
    )
    max_prompts: int | None = Field(None, gt=0, description="Use at most this many training prompts (None: all).")
    eval_prompts: int = Field(
        8,
        ge=0,
        description="Prompts held out from training (chosen by conversation id hash) and scored before and after "
        "training.",
    )
    eval_every: int = Field(
        0,
        ge=0,
        description="Also evaluate on the held-out prompts every this many steps (0: at the start and the end only).",
    )

    # -- rollouts --------------------------------------------------------------------------
    prompts_per_step: int = Field(4, gt=0, description="Prompts per rollout batch.")
    samples_per_prompt: int = Field(
        2, gt=0, description="Completions sampled per prompt (RLOO and labeling candidates need >= 2)."
    )
    max_new_tokens: int = Field(32, gt=0, description="Most tokens per completion; generation stops earlier at EOS.")
    temperature: float = Field(
        1.0, gt=0, description="Sampling temperature; log-probabilities for PPO use the same temperature."
    )
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling threshold (1.0: the whole distribution).")

    # -- reward server ---------------------------------------------------------------------
    reward_addresses: Annotated[list[str], NoDecode] = Field(
        ["127.0.0.1:50051"],
        min_length=1,
        description="Reward server address(es) host:port; several are used round-robin (retries go to the next one). "
        "Comma-separated in flags and the environment.",
    )
    score_timeout_s: float = Field(60.0, gt=0, description="Deadline of every Score call.")
    score_max_retries: int = Field(
        4,
        ge=0,
        description="Retries of a Score call answered UNAVAILABLE, RESOURCE_EXHAUSTED or NOT_FOUND (pinned version "
        "not loaded yet), with exponential backoff.",
    )
    score_backoff_s: float = Field(0.2, gt=0, description="First retry delay; doubled each retry, with jitter.")
    score_backoff_max_s: float = Field(5.0, gt=0, description="Longest retry delay.")
    score_chunk_items: int = Field(
        64, gt=0, description="Items per Score request; a batch's chunks go out concurrently across the addresses."
    )
    auth_token: SecretStr | None = Field(
        None,
        description="Bearer token sent with every call (servers with RM_AUTH_TOKENS); prefer PPO_AUTH_TOKEN over the "
        "flag.",
    )
    tls_ca: Path | None = Field(None, description="PEM CA bundle: connect with TLS, verifying the server against it.")

    # -- PPO -------------------------------------------------------------------------------
    advantage_estimator: EstimatorName = Field(
        "gae",
        description="gae: PPO with a value head and GAE. rloo: critic-free REINFORCE leave-one-out over the samples "
        "of each prompt (no value head, no value loss). turn_gae, turn_rloo: the multi-turn estimators "
        "(`policy-trainer sessions`); on single replies, GAE and RLOO over each reply's total reward.",
    )
    learning_rate: float = Field(1e-5, gt=0, description="AdamW learning rate of the policy (and the value head).")
    value_learning_rate: float | None = Field(
        None, gt=0, description="Learning rate of the value head (None: learning_rate x 10; it starts from zero)."
    )
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    adam_eps: float = Field(1e-5, gt=0, description="AdamW epsilon.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    update_epochs: int = Field(1, gt=0, description="Passes over each rollout batch.")
    num_minibatches: int = Field(
        2, gt=0, description="Minibatches per pass (the rollout batch is split into this many)."
    )
    gamma: float = Field(1.0, ge=0, le=1, description="Discount over tokens (1: the bandit view of InstructGPT).")
    gae_lambda: float = Field(0.95, ge=0, le=1, description="GAE lambda.")
    clip_coef: float = Field(
        0.2, gt=0, description="PPO ratio clipping: ratio is kept in [1 - clip_coef, 1 + clip_coef]."
    )
    clip_vf: float | None = Field(
        0.2, gt=0, description="Value clipping around the rollout's values (None: no value clipping)."
    )
    vf_coef: float = Field(0.1, ge=0, description="Weight of the value loss.")
    ent_coef: float = Field(0.0, ge=0, description="Weight of the entropy bonus.")
    norm_adv: bool = Field(True, description="Whiten the advantages over the real tokens of the batch.")
    kl_coef: float = Field(
        0.05,
        ge=0,
        description="Initial KL penalty coefficient: reward_t -= kl_coef * (logprob_t - ref_logprob_t) on every token.",
    )
    adaptive_kl: bool = Field(
        False, description="Adapt kl_coef to keep the sequence KL near kl_target (Ziegler et al. 2019)."
    )
    kl_target: float = Field(6.0, gt=0, description="Adaptive KL: target KL per sequence (nats).")
    kl_horizon: int = Field(10000, gt=0, description="Adaptive KL: horizon in sequences.")
    reward_pessimism: Literal["none", "mean_minus_std", "min"] = Field(
        "none",
        description="The reward PPO optimises, from the served ensemble's members (in the version's normalised units): "
        "none, their mean (the served reward); mean_minus_std, the mean minus pessimism_k standard deviations "
        "(a conservative reward under the reward model's uncertainty, as offline model-based RL's pessimism and "
        "Coste et al., 2023's conservative ensembles); or min, the most pessimistic member.",
    )
    pessimism_k: float = Field(
        1.0, ge=0, description="Standard deviations subtracted by reward_pessimism=mean_minus_std."
    )
    normalize_reward: bool = Field(
        True,
        description="Scale the served reward by running statistics of this reward-model version (reset at each "
        "version switch).",
    )
    reward_clip: float | None = Field(
        10.0, gt=0, description="Clip the (normalised) reward to [-reward_clip, reward_clip] (None: no clipping)."
    )
    missing_eos_penalty: float = Field(
        0.0, ge=0, description="Subtracted from the reward of completions that end without EOS (0: off)."
    )
    empty_completion_reward: float = Field(
        -1.0,
        description="Reward given to completions that decode to empty text (the server cannot score them); counted "
        "in `empty_fraction`.",
    )

    # -- outer loop ------------------------------------------------------------------------
    store_address: str | None = Field(
        None,
        description="Address of the server that owns the store (PreferenceService, TrainingService); None: the first "
        "reward address.",
    )
    follow_models: bool = Field(
        True,
        description="Follow WatchModels on the scorers (reward_addresses) and switch, between batches, to the "
        "version they all serve by default after a promotion.",
    )
    submit_every: int = Field(
        0, ge=0, description="Every this many steps submit fresh samples as labeling candidates (0: never)."
    )
    submit_fraction: float = Field(
        0.25,
        gt=0,
        le=1,
        description="Fraction of the batch's prompts (with all their completions) submitted as candidates.",
    )
    retrain_min_labels: int = Field(
        0,
        ge=0,
        description="Request retraining when GetStats shows at least this many labels since the latest snapshot (0: "
        "never). After a retrain the promotion rule left undecided, the next waits for the labels the rule says a "
        "decision needs (its pairs_needed), at least this many and at most retrain_max_labels.",
    )
    retrain_max_labels: int = Field(
        0,
        ge=0,
        description="Most new labels an undecided retrain's budget may ask for before the next retrain "
        "(0: 8 x retrain_min_labels).",
    )
    retrain_check_every: int = Field(1, gt=0, description="Steps between GetStats checks for retraining.")
    retrain_mode: Literal["", "head", "full"] = Field(
        "", description="Mode of requested retraining (empty: the server's default)."
    )
    selection: Literal["uncertainty", "random"] = Field(
        "uncertainty",
        description="Which prompts' samples go to labeling: uncertainty = those whose order the served ensemble "
        "doubts most (members' disagreement and closeness of the rewards; the doubt is the task's priority); random "
        "= a uniform draw.",
    )
    label_budget: int = Field(0, ge=0, description="Most labeling candidates submitted over the run (0: no limit).")

    # -- gold reward -----------------------------------------------------------------------
    gold_address: str | None = Field(
        None,
        description="Reward server of a gold reward model, scored beside the served proxy on the held-out samples at "
        "every evaluation (never trained against): over-optimisation shows as gold falling while the proxy rises "
        "(Gao et al., 2023).",
    )
    gold_version: str = Field(
        "", description="Version of the gold model on gold_address (pinned; empty: that server's default)."
    )

    # -- logging ---------------------------------------------------------------------------
    tensorboard: bool = Field(True, description="Write TensorBoard event files (tensorboardX) under run_dir/tb.")
    plots: bool = Field(True, description="Write reward.png and kl.png at the end, with reward-model switches marked.")
    progress: bool = Field(True, description="Show a progress bar.")
    save_policy: bool = Field(
        True, description="Save the final policy (HF directory) and value head under run_dir/policy."
    )

    @field_validator("reward_addresses", mode="before")
    @classmethod
    def _split_addresses(cls, value):
        if isinstance(value, str):
            value = [a.strip() for a in value.split(",") if a.strip()]
        return value

    @model_validator(mode="after")
    def _check(self) -> PPOSettings:
        if self.prompts_file is not None and self.prompts_store is not None:
            raise ValueError("set prompts_file or prompts_store, not both")
        if ESTIMATORS[self.advantage_estimator].needs_groups and self.samples_per_prompt < 2:
            raise ValueError(
                f"advantage_estimator={self.advantage_estimator} needs samples_per_prompt >= 2 (the baseline is the "
                "other samples' mean)"
            )
        if self.submit_every and self.samples_per_prompt < 2:
            raise ValueError("submit_every needs samples_per_prompt >= 2 (a labeling candidate has K >= 2 completions)")
        if self.num_minibatches > self.prompts_per_step * self.samples_per_prompt:
            raise ValueError(
                f"num_minibatches ({self.num_minibatches}) exceeds the batch size "
                f"({self.prompts_per_step} prompts x {self.samples_per_prompt} samples)"
            )
        return self

    @property
    def batch_size(self) -> int:
        return self.prompts_per_step * self.samples_per_prompt

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls,
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ):
        sources = [init_settings, env_settings]
        config_file = _CONFIG_FILE.get()
        if config_file is not None:
            sources.append(_file_source(settings_cls, config_file))
        return tuple(sources)


def _file_source(settings_cls, path: Path) -> PydanticBaseSettingsSource:
    suffix = path.suffix.lower()
    if suffix in (".yaml", ".yml"):
        return YamlConfigSettingsSource(settings_cls, yaml_file=path)
    if suffix == ".json":
        return JsonConfigSettingsSource(settings_cls, json_file=path)
    if suffix == ".toml":
        return TomlConfigSettingsSource(settings_cls, toml_file=path)
    raise ValueError(f"config file {path}: unknown type {suffix!r}; use .yaml, .json or .toml")


def load_settings(config_file: Path | str | None = None, settings_cls: type[PPOSettings] | None = None, **flags):
    """Settings (PPOSettings or `settings_cls`, e.g. SessionSettings) from flags (highest), the
    environment, `config_file`, then the defaults."""
    path = Path(config_file) if config_file is not None else None
    if path is not None and not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    token = _CONFIG_FILE.set(path)
    try:
        return (settings_cls or PPOSettings)(**flags)
    finally:
        _CONFIG_FILE.reset(token)


if __name__ == "__main__":  # print the settings table of docs/policy-trainer.md
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "settings_table", Path(__file__).resolve().parent.parent / "tools" / "settings_table.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    print(module.table(PPOSettings))
