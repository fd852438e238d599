"""The fairness bound's effect on padding and goodput, simulated with the server's own `pick_batch`.

The queue of bench/overload.py without the model: calls of `--items-per-call` HH items (token
counts estimated as characters / 4, capped at `--max-tokens`) arrive as a Poisson process at
1x, 2x and 4x the model's capacity; admission refuses a call when the queued tokens would pass
rate x `max_queue_wait_s`; whenever the model is free, `server.forming.pick_batch` forms the next
batch, which takes (padded tokens) / rate + a fixed overhead, as padded positions cost as much
as real ones on a CPU. An item is due `fair` batch times after its first-come-first-served
turn, as Batcher.fair_wait sets it. Prints, per bound: items/s, padded / real tokens and the
longest wait. It is a model of the queue, not a measurement; bench/overload.py measures.

    .venv/bin/python bench/fair_wait_sim.py [--bounds 4,6,8,12,16] [--seconds 90]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rm_service.data import HH_PAIRS
from rm_service.server.forming import pick_batch


def item_tokens(path: Path, cap: int) -> list[int]:
    lengths = []
    for line in path.read_text().splitlines():
        record = json.loads(line) if line.strip() else {}
        for key in ("chosen", "rejected"):
            if isinstance(record.get(key), str):
                lengths.append(min(cap, max(8, len(record[key]) // 4)))
    return lengths


def simulate(lengths: list[int], load: float, fair: float, args, rng: random.Random) -> dict:
    """One offered load: items/s served, padded / real tokens, longest wait (s)."""
    rate, limit = args.rate, args.rate * args.target_wait
    calls_per_s = load * rate / (sum(lengths) / len(lengths)) / args.items_per_call
    queue: list[tuple[int, float, float]] = []  # (tokens, enqueued, due)
    now = arrival = 0.0
    queued = served = padded_all = real_all = 0
    longest_wait, batch_seconds = 0.0, 0.2
    while now < args.seconds:
        while arrival <= now:
            call = [rng.choice(lengths) for _ in range(args.items_per_call)]
            if queued + sum(call) <= limit:  # admitted: due `fair` batch times after its FIFO turn
                due = arrival + queued / rate + fair * batch_seconds
                queue += [(n, arrival, due) for n in call]
                queued += sum(call)
            arrival += rng.expovariate(calls_per_s)
        if not queue:
            now = arrival
            continue
        chosen = set(pick_batch([q[0] for q in queue], [q[2] for q in queue], now, args.batch_tokens, args.max_padding))
        batch = [q for i, q in enumerate(queue) if i in chosen]
        queue = [q for i, q in enumerate(queue) if i not in chosen]
        padded, real = max(b[0] for b in batch) * len(batch), sum(b[0] for b in batch)
        seconds = padded / rate + args.overhead
        batch_seconds = 0.9 * batch_seconds + 0.1 * seconds  # the server's measured mean batch time
        now += seconds
        queued -= real
        served, padded_all, real_all = served + len(batch), padded_all + padded, real_all + real
        longest_wait = max(longest_wait, max(now - b[1] for b in batch))
    return {"items_s": served / now, "padding": padded_all / real_all, "longest_wait_s": longest_wait}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=HH_PAIRS)
    p.add_argument("--bounds", default="4,6,8,12,16", help="fairness bounds to compare, in batch times")
    p.add_argument("--seconds", type=float, default=90.0)
    p.add_argument(
        "--rate",
        type=float,
        default=7739.0,
        help="model tokens/s at no padding (bench/overload.py measured MiniLM fp32)",
    )
    p.add_argument("--overhead", type=float, default=0.01, help="fixed seconds per batch")
    p.add_argument("--target-wait", type=float, default=2.0)
    p.add_argument("--batch-tokens", type=int, default=4096)
    p.add_argument("--max-padding", type=float, default=0.25)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--items-per-call", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    lengths = item_tokens(args.data, args.max_tokens)
    print(
        "| fair bound (batch times) | load | items/s | % of 1x | padded / real | longest wait s "
        "|\n|---:|---:|---:|---:|---:|---:|"
    )
    for fair in (float(b) for b in args.bounds.split(",")):
        base = None
        for load in (1, 2, 4):
            r = simulate(lengths, load, fair, args, random.Random(args.seed))
            base = base or r["items_s"]
            print(
                f"| {fair:g} | {load}x | {r['items_s']:.1f} | {r['items_s'] / base:.0%} | {r['padding']:.2f} | "
                f"{r['longest_wait_s']:.1f} |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
