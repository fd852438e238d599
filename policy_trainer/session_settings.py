"""SessionSettings: PPOSettings plus what multi-turn PPO adds (`policy-trainer sessions`).

Every PPOSettings field keeps its meaning, with sessions in place of samples: a step plays
`prompts_per_step` real openings x `samples_per_prompt` sessions each, every session up to
`max_turns` assistant turns; `max_new_tokens` bounds each turn; `max_prompt_tokens` bounds
the conversation the policy reads before each turn (cut from the left at turn boundaries);
`gamma` and `gae_lambda` are per turn for the turn-level estimators; the outer loop's
`submit_every` / `submit_fraction` / `label_budget` send played sessions (drawn at random:
ScoreTurns serves no ensemble members to doubt with) to the labeling queue as SESSION tasks.
Same environment prefix (`PPO_`), config files and flags.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import NoDecode

from policy_trainer.estimators import ESTIMATORS, EstimatorName
from policy_trainer.settings import PPOSettings


class SessionSettings(PPOSettings):
    """Multi-turn PPO: sessions played against a user simulator, rewarded per turn and per session."""

    advantage_estimator: EstimatorName = Field(
        "turn_gae",
        description="Credit across turns: turn_gae (a turn is one action, GAE over turns), gae (token-level GAE over "
        "the session's policy tokens), turn_rloo (critic-free: each turn's return against the other sessions from the "
        "same start). rloo is single-turn only.",
    )
    max_turns: int = Field(3, ge=1, le=64, description="Most assistant turns per session.")
    user_simulator: Literal["replay", "served"] = Field(
        "replay",
        description="Who writes the user turns: replay (static context: the recorded conversation's real next user "
        "turn, whatever the policy said) or served (interactive: the user model behind "
        "rm.v1.UserService.SimulateUser).",
    )
    user_addresses: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="host:port of the user-model server(s) for user_simulator=served (comma-separated in the "
        "environment); empty: the reward servers.",
    )
    user_model_version: str = Field(
        "", description="Pin a user-model version; empty: the served one at the first call, kept for the run."
    )
    user_temperature: float = Field(1.0, ge=0, description="Sampling temperature of the simulated user turns.")
    user_top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling of the simulated user turns.")
    user_max_new_tokens: int = Field(
        0, ge=0, description="Most tokens of one simulated user turn; 0: the user-model server's default."
    )
    eval_user_addresses: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="host:port of a server of a held-out user model (trained on other conversations, never trained "
        "against): evaluation also plays the held-out openings against it, and reports each reward under both "
        "simulators and their difference (the training simulator's exploitation). Empty: none.",
    )
    eval_user_model_version: str = Field(
        "", description="Pin the held-out user model's version; empty: the one eval_user_addresses serve."
    )
    session_reward_weight: float = Field(
        1.0,
        ge=0,
        description="Weight of the session value (ScoreTurns' session_value, normalised like the turn rewards) added "
        "at the session's last turn; 0: per-turn rewards only.",
    )

    @field_validator("user_addresses", "eval_user_addresses", mode="before")
    @classmethod
    def _split_user_addresses(cls, value):
        if isinstance(value, str):
            value = [a.strip() for a in value.split(",") if a.strip()]
        return value

    @model_validator(mode="after")
    def _check_sessions(self) -> SessionSettings:
        if not ESTIMATORS[self.advantage_estimator].multi_turn:
            multi = [name for name, e in ESTIMATORS.items() if e.multi_turn]
            raise ValueError(f"advantage_estimator={self.advantage_estimator} is single-turn; use one of {multi}")
        if self.reward_pessimism != "none":
            raise ValueError("reward_pessimism: ScoreTurns serves no ensemble members per turn; set it to none")
        return self
