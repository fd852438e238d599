"""The batch token budget by measurement: the model's throughput-versus-batch curve, timed at start.

A batch's cost is not linear in its size. On a CPU a bigger batch pays off while its GEMMs still
gain from size and its activations still fit the caches, then loses: on the 2-core AMD EPYC this was
measured on, SmolLM2-135M in bf16 ran batches of 512-2,048 tokens at 780-1,210 tokens/s (one outlier
of 328) and of 4,096 tokens at 454-621 (bf16 activations past the caches). On a GPU the curve climbs
to tens of thousands of tokens. No constant fits both, so with `max_batch_tokens` 0 the server times
the served model at budgets doubling from `START` (rows of one item, as many as fill the budget;
each size run once to prime its kernels, then timed `RUNS` times, the best counted) while each
doubling still raises tokens/s by more than `GAIN`, and serves the smallest budget within
`TOLERANCE` of the best rate measured: the same throughput at the lowest latency. The chosen budget
and the curve are logged.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

ROW_TOKENS = 128  # the length of the rows timed: a chat item's (HH items formatted for SmolLM2: p10 63, median 165)
# The first budget timed, in padded tokens: ~5 chat items. Below it the uniform rows timed flatter the
# curve: served batches of 256 tokens (1.2 HH items each) ran 647-727 tokens/s where 1,024-token ones ran 777-843
# (2-core AMD EPYC, SmolLM2-135M bf16, bench/served_forward.py), per-batch costs and lengths that do not pack.
START = 1024
CAP = 65536  # the largest budget timed
RUNS = 2  # timed runs per budget (after one that primes its kernels): the best counts, against load spikes
GAIN = 0.05  # keep doubling while a doubling raises tokens/s by more than this
TOLERANCE = 0.05  # serve the smallest budget within this of the best rate


def choose_budget(curve: dict[int, float], tolerance: float = TOLERANCE) -> int:
    """The smallest budget whose tokens/s is within `tolerance` of the best in `curve` (budget -> tokens/s)."""
    best = max(curve.values())
    return min(b for b, rate in curve.items() if rate >= (1 - tolerance) * best)


async def measure_curve(
    rate_at: Callable[[int], Awaitable[float]], start: int = START, cap: int = CAP, gain: float = GAIN
) -> dict[int, float]:
    """Tokens/s at budgets doubling from `start` (`rate_at(budget)` times one), until a doubling gains `gain` or
    less over the best so far, or the next budget passes `cap`."""
    curve: dict[int, float] = {}
    budget = start
    while True:
        rate = await rate_at(budget)
        best = max(curve.values(), default=0.0)
        curve[budget] = rate
        if rate <= (1 + gain) * best or 2 * budget > cap:
            return curve
        budget *= 2


def describe(curve: dict[int, float], chosen: int) -> str:
    """One log line: the curve and the choice."""
    points = ", ".join(f"{b} tokens {rate:.0f} tokens/s" for b, rate in curve.items())
    return f"batch budget measured: {points} -> {chosen} tokens"
