"""What a training mode hands back: rewards on the training and held-out pairs."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from rm_service.store.db import Pair


@dataclass
class Scores:
    fit: tuple[np.ndarray, np.ndarray]  # (r_chosen, r_rejected), [N] each, ensemble mean
    heldout: tuple[np.ndarray, np.ndarray]  # [M] each, over heldout_pairs
    steps: int
    num_pairs: dict[str, int] = field(default_factory=dict)
    extra: dict[str, float] = field(default_factory=dict)  # numbers, into the version's metrics
    heldout_pairs: list[Pair] = field(default_factory=list)  # the M pairs of `heldout`, in order
    info: dict = field(
        default_factory=dict
    )  # anything else worth keeping in version.json (head mode: the feature selection)
    fit_pairs: list[Pair] = field(
        default_factory=list
    )  # the N pairs of `fit`, in order (their completion lengths: reference stats)
    reference: np.ndarray | None = (
        None  # rewards of the training feedback turns: with `fit`, what the served statistics are made of
    )
    # Head mode's cross-fitted rewards of the new on-policy pairs (train.crossfit): (pairs, (r_chosen, r_rejected)).
    onpolicy_evidence: tuple[list[Pair], tuple[np.ndarray, np.ndarray]] | None = None
    # Head mode's reads of the feedback labels new since the parent's snapshot by a model that never saw them
    # (train.feedback_gate.candidate_reads): {label id: (label, LabelRead)}.
    feedback_evidence: dict | None = None
