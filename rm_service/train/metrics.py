"""Held-out metrics of a reward model over preference pairs."""

from __future__ import annotations

import numpy as np


def pair_metrics(r_chosen: np.ndarray, r_rejected: np.ndarray, bins: int = 10) -> dict[str, float]:
    """Accuracy, Bradley-Terry loss and calibration (ECE of sigmoid(r_chosen - r_rejected)).

    r_chosen, r_rejected: [N] rewards (ensemble mean). A tie in score counts as half right.
    """
    delta = np.asarray(r_chosen, dtype=np.float64) - np.asarray(r_rejected, dtype=np.float64)  # [N]
    if delta.size == 0:
        return {"accuracy": float("nan"), "loss": float("nan"), "ece": float("nan"), "num_pairs": 0.0}
    accuracy = float(np.mean((delta > 0) + 0.5 * (delta == 0)))
    loss = float(np.mean(np.logaddexp(0.0, -delta)))  # -log sigmoid(delta)
    return {
        "accuracy": accuracy,
        "loss": loss,
        "ece": expected_calibration_error(delta, bins),
        "num_pairs": float(delta.size),
    }


def expected_calibration_error(delta: np.ndarray, bins: int = 10) -> float:
    """ECE of p = sigmoid(delta) as the probability that the chosen one wins.

    Pairs are folded so confidence >= 0.5 (predicting whichever side the model favours); in each
    confidence bin, |mean confidence - fraction where the favoured side was the chosen one|,
    weighted by the bin's share of pairs.
    """
    p = 1.0 / (1.0 + np.exp(-delta))  # [N]
    confidence = np.maximum(p, 1.0 - p)
    correct = (delta > 0) + 0.5 * (delta == 0)  # the favoured side was the chosen one (a tie: half)
    edges = np.linspace(0.5, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1]), 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        mask = which == b
        if mask.any():
            ece += mask.mean() * abs(confidence[mask].mean() - correct[mask].mean())
    return float(ece)


def turn_bucket(num_user_turns: int) -> str:
    return f"{num_user_turns} turn{'s' if num_user_turns > 1 else ''}" if num_user_turns < 4 else "4+ turns"


LENGTH_EDGES = (128, 256, 512)


def length_bucket(num_tokens: int) -> str:
    """Bucket of a pair by its longer item's token count."""
    low = 0
    for edge in LENGTH_EDGES:
        if num_tokens < edge:
            return f"{low}-{edge - 1} tokens"
        low = edge
    return f"{LENGTH_EDGES[-1]}+ tokens"


def grouped_metrics(r_chosen: np.ndarray, r_rejected: np.ndarray, groups: list[str]) -> dict[str, dict[str, float]]:
    """pair_metrics per group label, groups in sorted order."""
    keys = np.asarray(groups)
    return {g: pair_metrics(r_chosen[keys == g], r_rejected[keys == g]) for g in sorted(set(groups))}
