"""Backbones, the formatting contract, and the reward-model module."""
