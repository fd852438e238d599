"""verl's Interaction API on rm-service: the user is the served user model, the reward the served
reward model (verl's `BaseInteraction`: start_interaction, generate_response, calculate_score,
finalize_interaction).

verl runs multi-turn rollouts (checked with verl 0.7.1) with an interaction named in a YAML file
(`actor_rollout_ref.rollout.multi_turn.interaction_config_path`):

    interaction:
      - name: rm_user
        class_name: rm_client.verl_interaction.RMUserInteraction
        config:
          address: 10.0.0.5:50051        # or a list of replicas
          token: ${oc.env:RM_TOKEN,null}
          max_turns: 4                   # assistant turns per session
          temperature: 1.0
          top_p: 1.0
          max_new_tokens: 64
          seed: 0

After each assistant turn verl calls `generate_response(instance_id, messages)` with the whole
chat; the adapter answers with the user model's next turn (batched with every other session
awaiting in the same few milliseconds, one SimulateUser call) and that assistant turn's reward
(ScoreTurns), and ends the sequence when the simulated user ends the conversation or after
`max_turns`. `calculate_score(instance_id)` is the session's value (the sum of its turns' raw
scores, what session outcomes train). Clients are opened on first use in verl's event loop.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from rm_client.aio import AsyncRewardClient
from rm_client.env import TurnSource
from rm_client.user import AsyncUserClient

try:  # verl's own class when verl is installed; the same contract otherwise
    from verl.interactions.base import BaseInteraction
except Exception:  # noqa: BLE001 - verl missing, or its heavy dependencies

    class BaseInteraction:  # type: ignore[no-redef]
        def __init__(self, config: dict[str, Any]):
            self.config = config
            self.name: str = config.get("name", "interaction_agent")


CLIENT_KEYS = ("timeout_s", "max_retries", "token")
SOURCE_KEYS = ("temperature", "top_p", "max_new_tokens", "seed", "user_version", "reward_version", "batch_window_s")


class RMUserInteraction(BaseInteraction):
    def __init__(self, config: dict[str, Any]):
        super().__init__(config)
        if not config.get("address"):
            raise ValueError("RMUserInteraction needs `address` (host:port of an rm-service serving a user model)")
        self.max_turns = int(config.get("max_turns", 8))
        self._sessions: dict[str, dict] = {}
        self._sources: dict[asyncio.AbstractEventLoop, TurnSource] = {}

    def _source(self) -> TurnSource:
        loop = asyncio.get_running_loop()
        if loop not in self._sources:
            kwargs = {k: self.config[k] for k in CLIENT_KEYS if self.config.get(k) is not None}
            address = self.config["address"]
            self._sources[loop] = TurnSource(
                AsyncUserClient(address, **kwargs),
                AsyncRewardClient(address, **kwargs),
                **{k: self.config[k] for k in SOURCE_KEYS if self.config.get(k) is not None},
            )
        return self._sources[loop]

    async def start_interaction(self, instance_id: str | None = None, **kwargs) -> str:
        instance_id = instance_id or str(uuid.uuid4())
        self._sessions[instance_id] = {"rewards": [], "session_value": None}
        return instance_id

    async def generate_response(
        self, instance_id: str, messages: list[dict[str, Any]], **kwargs
    ) -> tuple[bool, str, float, dict[str, Any]]:
        session = self._sessions.setdefault(instance_id, {"rewards": [], "session_value": None})
        conversation = [{"role": m["role"], "content": m["content"]} for m in messages if m.get("role") != "tool"]
        if not conversation or conversation[-1]["role"] != "assistant":
            raise ValueError("generate_response: the conversation must end with the assistant's turn")
        source = self._source()
        last = len(session["rewards"]) + 1 >= self.max_turns
        if last:
            rewards, (turn, version, p_end) = await source.turn_rewards(conversation), (None, "", float("nan"))
        else:
            rewards, (turn, version, p_end) = await asyncio.gather(
                source.turn_rewards(conversation), source.next_user_turn(conversation)
            )
        reward = float(rewards.turns[-1].reward)
        session["rewards"].append(reward)
        session["session_value"] = float(rewards.session_value)
        done = turn is None
        extra = {
            "reward_version": rewards.model_version,
            "user_version": version,
            "end_probability": p_end,
            "turn_rewards": list(session["rewards"]),
            "truncated": done and last,
        }
        return done, turn or "", reward, extra

    async def calculate_score(self, instance_id: str | None = None, **kwargs) -> float:
        """The session's value (the sum of its assistant turns' raw scores), 0 before any turn."""
        session = self._sessions.get(instance_id or "", {})
        value = session.get("session_value")
        return 0.0 if value is None else value

    async def finalize_interaction(self, instance_id: str | None = None, **kwargs) -> None:
        self._sessions.pop(instance_id or "", None)
