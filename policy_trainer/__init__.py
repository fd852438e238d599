"""policy-trainer: a PPO client that trains a policy against the served reward."""
