"""The data of a training run: a snapshot's pairs split three ways, by conversation.

held-out:   conversations hashed below heldout_fraction; measured once, at the end.
validation: of the rest, those hashed below heldout_fraction with seed + 1; early stopping.
fit:        everything else; capped at max_pairs.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass

from rm_service.errors import FailedPrecondition
from rm_service.settings import TrainSettings
from rm_service.store.db import Pair, Snapshot, Store
from rm_service.train.split import is_heldout

log = logging.getLogger(__name__)


@dataclass
class Split:
    snapshot: Snapshot
    fit: list[Pair]
    validation: list[Pair]
    heldout: list[Pair]


def prepare_split(store: Store, settings: TrainSettings) -> Split:
    snapshot = store.create_snapshot()
    pairs = store.pairs(snapshot)
    if not pairs:
        raise FailedPrecondition("the store holds no preference pairs; import or ingest labels first")
    frac, seed = settings.heldout_fraction, settings.seed
    heldout = [p for p in pairs if is_heldout(p.conversation_id, frac, seed)]
    rest = [p for p in pairs if not is_heldout(p.conversation_id, frac, seed)]
    validation = [p for p in rest if is_heldout(p.conversation_id, frac, seed + 1)]
    fit = [p for p in rest if not is_heldout(p.conversation_id, frac, seed + 1)]
    if not fit or not validation:
        fit, validation = rest, []
    if settings.max_pairs is not None and len(fit) > settings.max_pairs:
        fit = random.Random(seed).sample(fit, settings.max_pairs)
    log.info("snapshot %s: %d fit, %d validation, %d held-out pairs", snapshot.snapshot_id, len(fit), len(validation), len(heldout))
    return Split(snapshot, fit, validation, heldout)
