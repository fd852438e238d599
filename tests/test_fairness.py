"""Fair batching: length grouping without starvation, deadlines first, batches filled to the
budget. Real servers with the tiny model; assertions count batches, never milliseconds."""

from __future__ import annotations

import random
import threading

from conftest import Stall, wait_until

from rm_service.api.v1 import common_pb2, reward_pb2
from rm_service.server.forming import pick_batch

PROMPT = [common_pb2.Message(role="user", content="Tell me about rivers.")]
NILE = "The Nile, in Africa, runs about 6,650 km from Lake Victoria to the Mediterranean. "  # ~50 tokens
BUDGET = 2048  # a CPU budget of the size server.budget measures


def _request(*completions: str) -> reward_pb2.ScoreRequest:
    return reward_pb2.ScoreRequest(items=[reward_pb2.ScoreItem(prompt=PROMPT, completion=c) for c in completions])


def _queued(srv, stall: Stall, n: int) -> bool:
    """True once one batch is on the (stalled_server) model and it and the queue hold `n` items."""
    return len(stall.batches) == 1 and stall.batches[0] + srv.server.batcher.queue_depth() == n


def _batch_of(stall: Stall, tokens: int) -> int:
    """Index of the first batch that held an item of `tokens` tokens."""
    return next(i for i, lengths in enumerate(stall.lengths) if tokens in lengths)


def _flood_around(srv, stub, stall, flood: list[str], odd: str) -> tuple[int, int]:
    """Closed-loop callers keep one `flood` item each outstanding while the `odd` item is sent:
    the model is stalled until all are queued, then the flood goes on until `odd` is answered.
    Returns (index of the batch that held `odd`, items of the flood queued ahead of it)."""
    stop = threading.Event()

    def caller(text: str) -> None:
        while not stop.is_set():
            stub.Score(_request(text), timeout=60)

    threads = [threading.Thread(target=caller, args=(t,), daemon=True) for t in flood]
    for t in threads:
        t.start()
    wait_until(lambda: _queued(srv, stall, len(flood)))
    ahead = srv.server.batcher.queue_depth()
    answer = stub.Score.future(_request(odd), timeout=60)
    wait_until(lambda: _queued(srv, stall, len(flood) + 1))
    stall.release()
    tokens = answer.result(timeout=60).results[0].num_tokens
    stop.set()
    for t in threads:
        t.join(60)
    return _batch_of(stall, tokens), ahead


def test_a_short_item_amid_a_flood_of_long_ones_is_served_within_the_bound(stalled_server):
    srv, stub, stall, _ = stalled_server()
    flood = [f"Reply {i}: " + NILE * 12 for i in range(6)]  # ~600 tokens each: 3 to a batch
    batch, ahead = _flood_around(srv, stub, stall, flood, "The Nile.")
    assert batch <= 1 + ahead  # batch 0 was the stalled one; each later batch serves the oldest waiting item
    assert len(stall.batches) > batch  # the flood went on past it: it was not left for the end


def test_a_long_item_amid_a_flood_of_short_ones_is_served_within_the_bound(stalled_server):
    srv, stub, stall, _ = stalled_server()
    flood = [f"Reply {i}: The Nile." for i in range(8)]
    batch, ahead = _flood_around(srv, stub, stall, flood, NILE * 12)
    assert batch <= 1 + ahead


def test_earlier_deadlines_go_first(stalled_server):
    srv, stub, stall, _ = stalled_server(fair_wait_s=60)  # no item becomes due by waiting during this test
    relaxed = [stub.Score.future(_request(f"Reply {i}: " + NILE * 12), timeout=120) for i in range(7)]  # 3 to a batch
    wait_until(lambda: _queued(srv, stall, 7))
    urgent = stub.Score.future(_request("Urgent: " + NILE * 12), timeout=20)
    wait_until(lambda: _queued(srv, stall, 8))
    stall.release()
    tokens = urgent.result(timeout=60).results[0].num_tokens
    assert all(f.result(timeout=60).results for f in relaxed)
    assert _batch_of(stall, tokens) == 1  # the first batch formed after it arrived, ahead of the older items


def test_batches_fill_up_to_the_token_budget(stalled_server):
    srv, stub, stall, _ = stalled_server()
    stall.release()
    rng = random.Random(0)
    words = [rng.randint(2, 80) for _ in range(120)]  # 120 items of 20-420 tokens, in one call: all wait at once
    response = stub.Score(_request(*(("The river. " * w).strip() for w in words)), timeout=60)
    assert len(response.results) == 120 and sum(stall.batches) == 120
    full = [rows * width / BUDGET for rows, width in stall.shapes[:-1]]  # the last batch takes what is left
    assert sum(full) / len(full) >= 0.85  # batches fill the budget (not 3-4 items of ~300 tokens)
    for (rows, width), lengths in zip(stall.shapes, stall.lengths, strict=True):
        assert sum(lengths) >= 0.7 * rows * width  # padding within max_padding (0.3): no item was due


def test_a_due_item_joins_the_next_batch_whatever_its_length():
    now = 100.0
    # a long item due first seeds the batch; a short item past its bound joins it despite the padding
    assert pick_batch([500, 500, 500, 20], [99.0, 105.0, 105.0, 99.5], now, BUDGET, 0.3) == [0, 3, 1, 2]
    # not yet due, the short item waits for a batch of its own length
    assert pick_batch([500, 500, 500, 20], [99.0, 105.0, 105.0, 104.0], now, BUDGET, 0.3) == [0, 1, 2]
    # the rest of a batch is the items nearest in length to the seed, within the budget
    assert pick_batch([100, 400, 110, 390, 95, 380], [99.0] + [105.0] * 5, now, 1000, 0.3) == [0, 4, 2]
