"""The promotion rule: paired per-pair log-likelihood gains with intervals, three answers.

Shapes are the ones real runs produce: 185 held-out human pairs (the demo's split of the HH
file) and 2 to 12 on-policy pairs (what a demo run labels between retrains)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest

from policy_trainer.outer_loop import evidence, label_budget_after
from policy_trainer.reward_client import Scores, conservative
from rm_service import registry
from rm_service.evidence import combined, effect, pair_loglik, pairs_needed, t_interval

HUMAN, CONF = 185, 0.95


def pairs(n: int, seed: int, spread: float = 1.5) -> tuple[np.ndarray, np.ndarray]:
    """A parent's (r_chosen, r_rejected) [n]: reward differences like a 0.6-accurate model's."""
    rng = np.random.default_rng(seed)
    r_rejected = rng.normal(0.0, 1.0, n)
    return r_rejected + rng.normal(0.4, spread, n), r_rejected


def shifted(parent: tuple[np.ndarray, np.ndarray], by: float | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A candidate whose reward difference on each pair is the parent's plus `by`."""
    return parent[0] + by, parent[1]


def test_pair_loglik_is_log_sigmoid_of_the_difference():
    assert pair_loglik(np.array([2.0]), np.array([0.0]))[0] == pytest.approx(math.log(1 / (1 + math.exp(-2))))
    assert pair_loglik(np.array([0.0]), np.array([800.0]))[0] == pytest.approx(-800.0)  # no overflow


def test_the_interval_is_students_t_and_says_nothing_on_one_pair():
    mean, low, high, sd = t_interval(np.array([0.1, 0.3, 0.2, 0.6]), 0.95)
    half = 3.182446305284263 * np.std([0.1, 0.3, 0.2, 0.6], ddof=1) / 2  # t(0.975, 3) x sd / sqrt(4)
    assert mean == pytest.approx(0.3) and low == pytest.approx(0.3 - half) and high == pytest.approx(0.3 + half)
    assert t_interval(np.array([0.5]), 0.95)[1:3] == (-math.inf, math.inf)
    assert t_interval(np.array([0.2, 0.2]), 0.95)[1:3] == (-math.inf, math.inf)  # no spread measured: no interval


def test_clearly_better_on_human_pairs_and_tied_on_three_onpolicy_pairs_is_promoted():
    """The Intel run of the issue: v3 0.6865 vs 0.6108 on human pairs, 0.50 vs 0.50 on 2 on-policy
    pairs, rejected by the old rule as a tie. Clearly better on one group and not worse on the other."""
    parent_h, parent_o = pairs(HUMAN, 0), pairs(3, 1)
    human = effect(shifted(parent_h, 0.5), parent_h, CONF)
    onpolicy = effect(shifted(parent_o, np.array([0.05, -0.04, 0.0])), parent_o, CONF)
    assert human.better and not onpolicy.better and not onpolicy.worse
    d = registry.decide(human, onpolicy, combined(human, onpolicy, 0.5, CONF), CONF, "v2")
    assert d.verdict == "promote" and d.promote and "better than its parent on human pairs" in d.reason
    assert d.verdict != "reject"


def test_worse_on_the_policys_samples_by_a_visible_margin_is_rejected_whatever_the_human_pairs_say():
    parent_h, parent_o = pairs(HUMAN, 2), pairs(12, 3)
    human = effect(shifted(parent_h, 0.3), parent_h, CONF)  # better on the dataset...
    onpolicy = effect(shifted(parent_o, -1.5), parent_o, CONF)  # ...but it has learned the policy's samples wrong
    assert onpolicy.worse and onpolicy.accuracy < onpolicy.parent_accuracy
    d = registry.decide(human, onpolicy, combined(human, onpolicy, 0.5, CONF), CONF, "v2")
    assert d.verdict == "reject" and d.reason.startswith("worse than its parent on the policy's samples")


def test_ties_on_tiny_samples_are_undecided_not_rejected():
    parent_h, parent_o = pairs(HUMAN, 4), pairs(2, 5)
    human = effect(parent_h, parent_h, CONF)  # the same scores: gain 0 on every pair
    onpolicy = effect(shifted(parent_o, np.array([0.3, -0.3])), parent_o, CONF)
    d = registry.decide(human, onpolicy, combined(human, onpolicy, 0.5, CONF), CONF, "v2")
    assert d.verdict == "undecided" and "not distinguishable" in d.reason
    assert registry.decide(None, effect(shifted(parent_o, 0.4), parent_o, CONF)).verdict == "undecided"  # 2 equal gains


def test_worse_on_human_pairs_is_rejected_unless_better_on_the_policys_samples():
    parent_h, parent_o = pairs(HUMAN, 6), pairs(40, 7)
    worse_h = effect(shifted(parent_h, -0.4), parent_h, CONF)
    assert registry.decide(worse_h, None).verdict == "reject"
    better_o = effect(shifted(parent_o, np.linspace(0.5, 1.5, 40)), parent_o, CONF)
    d = registry.decide(worse_h, better_o)
    assert d.verdict == "undecided" and "worse on human pairs" in d.reason


def test_the_groups_weighed_together_can_decide_what_neither_can_alone():
    rng = np.random.default_rng(27)
    parent_h, parent_o = pairs(HUMAN, 9), pairs(12, 10)
    human = effect(shifted(parent_h, 0.07 + rng.normal(0, 0.6, HUMAN)), parent_h, CONF)
    onpolicy = effect(shifted(parent_o, 0.5 + rng.normal(0, 1.0, 12)), parent_o, CONF)
    both = combined(human, onpolicy, 0.5, CONF)
    assert not human.better and not onpolicy.better and both.better
    assert registry.decide(human, onpolicy, both).verdict == "promote"


def test_a_decision_round_trips_through_json_with_unbounded_intervals():
    parent = pairs(1, 11)
    d = registry.decide(None, effect(shifted(parent, 0.2), parent, CONF), None, CONF, "v4", 37.0)
    back = registry.Decision.from_dict(d.to_dict())
    assert back.onpolicy.low == -math.inf and back.onpolicy.high == math.inf and back.to_dict() == d.to_dict()


def test_pairs_needed_grows_with_the_noise_and_shrinks_with_the_effect():
    parent = pairs(12, 12)
    rng = np.random.default_rng(13)
    noise = rng.normal(0, 1, 12)
    small = effect(shifted(parent, 0.1 + 0.4 * noise), parent, CONF)
    large = effect(shifted(parent, 0.6 + 0.4 * noise), parent, CONF)
    assert pairs_needed(small, CONF, 0.01) > pairs_needed(large, CONF, 0.01) >= 2
    assert pairs_needed(small, CONF, 0.5) < pairs_needed(small, CONF, 0.01)  # a floor on the effect worth seeing


def test_an_undecided_retrain_sets_the_next_label_budget_from_its_evidence():
    metrics = {"gate_pairs_needed": 50.0, "gate_onpolicy_pairs": 10.0, "gate_onpolicy_labels": 5.0}
    job = SimpleNamespace(decision="undecided", metrics=metrics)
    assert label_budget_after(job, 8, 64) == 20  # 40 more pairs at 2 pairs per label
    assert (
        label_budget_after(SimpleNamespace(decision="undecided", metrics={**metrics, "gate_pairs_needed": 900}), 8, 64)
        == 64
    )
    assert label_budget_after(SimpleNamespace(decision="promote", metrics=metrics), 8, 64) == 8
    assert label_budget_after(SimpleNamespace(decision="undecided", metrics={}), 8, 64) == 8
    metrics = {
        "gate_human_pairs": 185.0,
        "gate_human_gain": 0.02,
        "gate_human_low": -math.inf,
        "gate_human_high": 0.1,
        "gate_human_accuracy": 0.6,
        "gate_human_parent_accuracy": 0.58,
    }
    expected = {"pairs": 185.0, "gain": 0.02, "low": None, "high": 0.1, "accuracy": 0.6, "parent_accuracy": 0.58}
    assert evidence(metrics) == {"human": expected}


def test_the_conservative_reward_is_the_members_mean_minus_k_std_or_their_minimum():
    members = np.array([[1.0, 3.0], [2.0, 2.0]])  # [N, M] raw
    scores = Scores(np.array([0.5, 0.25]), members.mean(1), members.std(1), np.zeros(2, bool), "v2", members)
    assert np.allclose(conservative(scores, 1.0, 2.0, "none"), [0.5, 0.25])
    assert np.allclose(conservative(scores, 1.0, 2.0, "mean_minus_std", 1.0), [0.5 - 0.5, 0.5])  # z = [0, 1], [.5, .5]
    assert np.allclose(conservative(scores, 1.0, 2.0, "min"), [0.0, 0.5])
