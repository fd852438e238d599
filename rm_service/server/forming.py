"""Forming a batch: which waiting items run next (the policy the batcher applies whenever the
model thread is free; see server.batcher). Pure: lengths, due times and a budget in, indexes
out, so `bench/fair_wait_sim.py` simulates the server's own rule."""

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
