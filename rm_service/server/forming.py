"""Forming a batch: which waiting items run next (the policy the batcher applies whenever the
model thread is free; see server.batcher). Pure: lengths, due times and a budget in, indexes
out, so `bench/fair_wait_sim.py` simulates the server's own rule.

An item is *due* once it has waited the fairness bound (`fair_wait_s`; by default
FAIR_WAIT_BATCHES x the measured batch time) past its first-come-first-served turn (the first
batch formed while the items queued before it, its own included, fit in one batch's token
budget: read from the queue itself, not estimated at admission), or when its deadline is less
than one batch time away. A batch is seeded by the item due first; the items already due join
next, nearest in length to the seed first, whatever their padding; then the others, nearest in
length first, while padding their rows to the batch's longest item wastes at most `max_padding`
of their tokens. The batch fills up to the token budget (count x longest; an item longer than
the budget runs alone; the budget is measured at start, server.budget). Batches stay dense (on a
CPU padded positions cost as much as real ones), callers' deadlines order the queue, and no item
waits past the bound while items of other lengths overtake it."""

from __future__ import annotations


def pick_batch(lengths: list[int], due: list[float], now: float, budget: int, max_padding: float) -> list[int]:
    """Indexes of the next batch: the seed (due first), then the due items, then the others
    while padding their rows wastes at most `max_padding` of their tokens; nearest in length
    to the seed first, count x longest within `budget`."""
    seed = min(range(len(lengths)), key=lambda i: (due[i], i))
    base = lengths[seed]
    rest = sorted(
        (i for i in range(len(lengths)) if i != seed), key=lambda i: (due[i] > now, abs(lengths[i] - base), due[i])
    )
    taken, longest = [seed], base
    free_rows, free_real = (1, base) if due[seed] > now else (0, 0)  # rows not due: their padding is bounded
    for i in rest:
        n = lengths[i]
        longest_if = max(longest, n)
        if longest_if * (len(taken) + 1) > budget:
            continue  # a shorter item further on may still fit
        if due[i] > now:
            if free_real + n < (1 - max_padding) * longest_if * (free_rows + 1):
                continue  # it waits for a batch nearer its length
            free_rows, free_real = free_rows + 1, free_real + n
        taken.append(i)
        longest = longest_if
    return taken


def at_turn(lengths: list[int], budget: int) -> int:
    """How many of the oldest items (`lengths` in arrival order) a first-come-first-served queue
    runs next: those whose tokens fit one batch's budget, at least one."""
    tokens = 0
    for i, n in enumerate(lengths):
        tokens += n
        if i and tokens > budget:
            return i
    return len(lengths)
