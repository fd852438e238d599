"""The data of a training run: a snapshot's pairs split by conversation, never by pair.

held-out:   measured once, at the end, and by the promotion rule. Pairs of the dataset
            (human labels) whose conversation hashes below heldout_fraction; on-policy pairs
            (labels of a policy's samples) below onpolicy_heldout_fraction, with their own seed,
            only where the run does not cross-fit them (`crossfits`: head mode trains on every
            on-policy label and holds each new one out of one refit instead, train.crossfit).
validation: of the rest, conversations hashed below heldout_fraction with seed + 1; full mode
            stops early on it (head mode cross-validates over validation + fit instead).
fit:        everything else. Before the validation is carved, `dataset_fraction` keeps only
            that share of the dataset's conversations (by hash: every retrain keeps the same
            ones; on-policy pairs are always kept) and `max_pairs` caps the training pairs.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field

from rm_service.errors import FailedPrecondition
from rm_service.settings import TrainSettings
from rm_service.store.db import Pair, Snapshot, Store
from rm_service.store.feedback import StoredFeedback, feedback_in_snapshot
from rm_service.train.feedback import is_heldout_feedback
from rm_service.train.split import is_heldout

log = logging.getLogger(__name__)
ONPOLICY_SEED_OFFSET = 7919
DATASET_FRACTION_SEED_OFFSET = 104729


@dataclass
class Split:
    snapshot: Snapshot
    fit: list[Pair]
    validation: list[Pair]
    heldout: list[Pair]
    feedback: list[StoredFeedback] = field(default_factory=list)  # thumbs and outcomes to train on (train.feedback)
    feedback_heldout: list[StoredFeedback] = field(
        default_factory=list
    )  # held out like pairs: by conversation, same fraction and seed

    @property
    def train(self) -> list[Pair]:
        return self.fit + self.validation


def crossfits(settings: TrainSettings) -> bool:
    """Whether on-policy labels are evidence by cross-fitting (head mode: refits take seconds)
    rather than by a held-out share."""
    return settings.mode == "head" and settings.gate_crossfit_folds >= 2


def is_heldout_pair(pair: Pair, settings: TrainSettings) -> bool:
    """Whether training holds this pair out: by its conversation, with the fraction and seed of
    its kind (dataset or on-policy; on-policy pairs never when the run cross-fits them)."""
    if pair.on_policy:
        if crossfits(settings):
            return False
        return is_heldout(
            pair.conversation_id, settings.onpolicy_heldout_fraction, settings.seed + ONPOLICY_SEED_OFFSET
        )
    return is_heldout(pair.conversation_id, settings.heldout_fraction, settings.seed)


def in_dataset_share(pair: Pair, settings: TrainSettings) -> bool:
    """On-policy pairs always; dataset pairs when their conversation is in dataset_fraction."""
    return (
        pair.on_policy
        or settings.dataset_fraction >= 1
        or is_heldout(pair.conversation_id, settings.dataset_fraction, settings.seed + DATASET_FRACTION_SEED_OFFSET)
    )


def prepare_split(store: Store, settings: TrainSettings) -> Split:
    snapshot = store.create_snapshot()
    pairs = store.pairs(snapshot)
    feedback = (
        feedback_in_snapshot(store, snapshot) if settings.mode == "head" else []
    )  # full mode trains on pairs only
    if not pairs and not feedback:
        raise FailedPrecondition(
            "the store holds no preference pairs (and, for head mode, no thumbs or outcomes); "
            "import or ingest labels first"
        )
    fb_heldout = [f for f in feedback if is_heldout_feedback(f, settings.heldout_fraction, settings.seed)]
    fb_train = [f for f in feedback if not is_heldout_feedback(f, settings.heldout_fraction, settings.seed)]
    heldout = [p for p in pairs if is_heldout_pair(p, settings)]
    rest = [p for p in pairs if not is_heldout_pair(p, settings) and in_dataset_share(p, settings)]
    if settings.max_pairs is not None and len(rest) > settings.max_pairs:
        keep = set(random.Random(settings.seed).sample(range(len(rest)), settings.max_pairs))
        rest = [p for i, p in enumerate(rest) if i in keep]  # in commit order
    validation = [p for p in rest if is_heldout(p.conversation_id, settings.heldout_fraction, settings.seed + 1)]
    fit = [p for p in rest if not is_heldout(p.conversation_id, settings.heldout_fraction, settings.seed + 1)]
    if not fit or not validation:
        fit, validation = rest, []
    log.info(
        "snapshot %s: %d fit, %d validation, %d held-out pairs (%d on-policy); feedback labels: %d train, %d held out",
        snapshot.snapshot_id,
        len(fit),
        len(validation),
        len(heldout),
        sum(p.on_policy for p in heldout),
        len(fb_train),
        len(fb_heldout),
    )
    return Split(snapshot, fit, validation, heldout, fb_train, fb_heldout)
