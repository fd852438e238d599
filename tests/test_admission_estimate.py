"""Admission's token count before tokenising, and the batcher's first-come-first-served turns:
the bytes rule is scaled by what tokenising showed (so a burst of calls is counted near its real
size and is not refused for work that is not there), and an item's turn is read from the queue."""

from __future__ import annotations

import pytest

from rm_service.errors import Overloaded
from rm_service.server.admission import ESTIMATE_FLOOR, ESTIMATE_MARGIN, Admission, RateMeter, Ticket
from rm_service.server.batcher import Job
from rm_service.server.forming import at_turn
from rm_service.settings import ServeSettings


def _admission(max_queued_tokens: int = 0) -> Admission:
    meter = RateMeter()
    meter.record(1000, 10, 1.0)  # 1,000 tokens/s: the token limit is 30,000 at the default 30 s
    return Admission(ServeSettings(max_queued_tokens=max_queued_tokens), meter)


def _served(adm: Admission, estimate: int, real: int) -> None:
    """One call admitted at `estimate`, tokenised to `real`, answered."""
    permit = adm.admit(1, estimate, Ticket(None), adm.close)
    adm.correct(permit, real)
    adm.close(permit)


def test_the_estimate_learns_how_far_the_bytes_rule_overestimates():
    adm = _admission()
    assert adm.estimate_scale == 1.0
    for _ in range(40):
        _served(adm, 400, 180)  # chat text at ~0.22 tokens per byte against the rule's 0.5
    assert adm.estimate_scale == pytest.approx(ESTIMATE_MARGIN * 180 / 400, rel=1e-3)
    permit = adm.admit(1, 400, Ticket(None), adm.close)
    assert permit.tokens in (225, 226)  # 400 x ~0.5625, rounded up: above the 180 real tokens, by the margin
    assert adm.queued_tokens == permit.tokens
    adm.correct(permit, 180)
    assert adm.queued_tokens == 180  # the correction replaces the scaled estimate exactly
    adm.close(permit)
    assert adm.queued_tokens == 0 and adm.inflight_items == 0


def test_the_learned_scale_stays_between_its_floor_and_the_bytes_rule():
    adm = _admission()
    for _ in range(60):
        _served(adm, 1000, 1)  # a tokeniser far below the rule: the floor holds
    assert adm.estimate_scale == ESTIMATE_FLOOR
    for _ in range(60):
        _served(adm, 100, 1000)  # text denser than the rule: never above the rule itself
    assert adm.estimate_scale == 1.0


def test_a_burst_counted_at_its_learned_size_is_queued_where_the_bytes_rule_refused_it():
    """128 one-item calls of ~180 real tokens arrive before any is tokenised (OpenRLHF's pattern):
    the bytes rule counts them at 400 each, 51,200 tokens, and refuses all past the 30,000-token bound;
    at the learned scale they count ~28,900 and all queue."""
    cold = _admission()
    refused = 0
    for _ in range(128):
        try:
            cold.admit(1, 400, Ticket(None), cold.close)
        except Overloaded:
            refused += 1
    assert refused == 128 - 75  # 75 x 400 = 30,000: the 76th finds the queue full

    warm = _admission()
    for _ in range(40):
        _served(warm, 400, 180)
    permits = [warm.admit(1, 400, Ticket(None), warm.close) for _ in range(128)]
    assert len(permits) == 128 and warm.queued_tokens <= 128 * 226 < 30_000


def test_an_items_turn_is_when_the_items_before_it_fit_one_batch():
    assert at_turn([300, 500, 400, 900, 100], budget=1200) == 3  # 300 + 500 + 400 fit 1,200; + 900 does not
    assert at_turn([900, 100], budget=1200) == 2  # once those three ran
    assert at_turn([5000, 10], budget=2048) == 1  # the oldest has its turn even when longer than a batch
    assert at_turn([], budget=2048) == 0


def test_an_item_is_due_the_fairness_bound_after_its_turn_and_not_before():
    permit = Admission(ServeSettings(), RateMeter()).admit(2, 1, Ticket(None), lambda p: None)
    at, waiting = (Job(item=[0] * 10, permit=permit, future=None, turn=t) for t in (1.0, None))  # type: ignore[arg-type]
    assert at.due(fair_wait=2.0, batch_seconds=0.5) == 3.0
    assert waiting.due(fair_wait=2.0, batch_seconds=0.5) == float("inf")
