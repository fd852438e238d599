"""Reward-model training: Bradley-Terry loss, score heads, evaluation, the training run."""
