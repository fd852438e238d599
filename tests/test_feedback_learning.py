"""Learning from feedback beyond pairs, measured on the shared HH-RLHF pairs (docs/feedback.md).

Every HH pair becomes two feedback labels on two conversations that differ only in their last
assistant turn: the chosen one's last turn thumbs-up and its session a success (1.0), the
rejected one's last turn thumbs-down and its session a failure (0.0). MiniLM-L6 in head mode
(frozen backbone, cached features) is trained twice on the same store: on the thumbs alone
(outcome_weight 0), then on the outcomes alone (thumb_weight 0). Each must rank held-out turns
(conversations it never saw) better than chance: thumbs-up turns above thumbs-down turns, over
all of them (AUC) and between the two replies to one prompt (pair accuracy).
"""

from __future__ import annotations

import pytest
from feedback_data import hh_feedback

from rm_service.settings import ModelSettings, StoreSettings, TrainSettings
from rm_service.store.db import Store
from rm_service.train.run import train

LINES = None  # every shared HH pair: ~3,700 conversations; a quarter of the prompts held out


@pytest.mark.slow
def test_minilm_trained_on_hh_thumbs_or_outcomes_ranks_heldout_turns_above_chance(home):
    store = Store(StoreSettings())
    outcomes = [o.status for o in store.ingest(hh_feedback(LINES, thumbs=True, outcomes=True))]
    assert outcomes.count("INSERTED") >= 0.99 * len(outcomes)  # a few HH turns are empty: those labels are REJECTED
    common = dict(
        backbone="minilm-l6", max_minutes=8, ensemble_size=2, max_tokens=256, heldout_fraction=0.25, export_onnx="off"
    )
    thumbs = train(store, TrainSettings(**common, outcome_weight=0.0), ModelSettings(), show_progress=False).metrics
    outcomes = train(store, TrainSettings(**common, thumb_weight=0.0), ModelSettings(), show_progress=False).metrics
    store.close()
    for name, m in (("thumbs only", thumbs), ("outcomes only", outcomes)):
        print(
            f"{name}: held-out thumb AUC {m['thumb_auc']:.3f} over {int(m['thumbs'])} turns, pair accuracy "
            f"{m['thumb_pair_accuracy']:.3f} over {int(m['thumb_pairs'])} prompts; outcome AUC {m['outcome_auc']:.3f}"
        )
    assert thumbs["train_thumbs"] > 2500 and thumbs["train_outcomes"] == 0 and thumbs["thumbs"] > 800
    assert outcomes["train_outcomes"] > 2500 and outcomes["train_thumbs"] == 0
    for m in (thumbs, outcomes):  # chance is 0.5 for both
        assert m["thumb_auc"] > 0.53
        assert z_above_chance(m["thumb_pair_accuracy"], m["thumb_pairs"]) > 2.33  # one-sided p < 0.01


def z_above_chance(accuracy: float, n: float) -> float:
    """How many standard errors of a fair coin over n trials `accuracy` lies above 0.5."""
    return (accuracy - 0.5) / (0.5 / n**0.5)
