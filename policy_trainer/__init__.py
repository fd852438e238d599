"""policy-trainer: a PPO client that trains a policy against the served reward.

In-process API (what `policy-trainer ppo` calls):

    from policy_trainer import PPOSettings, train_ppo
    summary = train_ppo(PPOSettings(prompts_file=..., reward_addresses=["127.0.0.1:50051"]), on_step=print)

Names are imported on first use, so `import policy_trainer` stays cheap (torch and
transformers load with the trainer).
"""

_EXPORTS = {
    "PPOSettings": "policy_trainer.settings",
    "load_settings": "policy_trainer.settings",
    "train_ppo": "policy_trainer.trainer",
    "Summary": "policy_trainer.trainer",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'policy_trainer' has no attribute {name!r}")


__all__ = list(_EXPORTS)
