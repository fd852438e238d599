"""policy-trainer: a PPO client that trains a policy against the served reward.

In-process API (what `policy-trainer ppo` calls):

    from policy_trainer import PPOSettings, train_ppo
    summary = train_ppo(PPOSettings(prompts_file=..., reward_addresses=["127.0.0.1:50051"]), on_step=print)
"""

from policy_trainer.settings import PPOSettings, load_settings


def train_ppo(settings, on_step=None):
    """See policy_trainer.trainer.train_ppo (imported lazily: torch and transformers are heavy)."""
    from policy_trainer.trainer import train_ppo as run

    return run(settings, on_step)


__all__ = ["PPOSettings", "load_settings", "train_ppo"]
