"""The local judge on real human preferences: agreement and position bias on HH-RLHF pairs.

Samples --pairs pairs of the shared HH-RLHF file (a seeded random sample), judges each in
both orders with the in-process judge (default: the bundled SmolLM2-135M-Instruct, decision
mode choice), and prints one markdown table: agreement with the crowdworkers' choice, Cohen's
kappa, how often the verdict flips with the order (position bias) and to which position,
length bias of the judge next to that of the people, parse failures and seconds per
pair-order. Stops early, and reports what it judged, after --max-minutes.

    RM_HOME=var .venv/bin/python bench/judge_agreement.py --pairs 150 --max-minutes 9
    RM_HOME=var .venv/bin/python bench/judge_agreement.py --pairs 10 --decision generate
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

from rm_service.conversation import completion_id, conversation_id
from rm_service.data import HH_PAIRS
from rm_service.formats.hh import HHFormatError, HHPair, read_pairs
from rm_service.judge.local import LocalBackend
from rm_service.judge.pairwise import Judge, combine_orders
from rm_service.judge.settings import JudgeSettings
from rm_service.judge.verdict import ParseFailure
from rm_service.store.agreement import SharedPair, agreement_report, fmt, format_report

POLICIES = ("calibrate", "tie", "skip")
DATA = HH_PAIRS


def sample_pairs(path: Path, n: int, seed: int) -> list[HHPair]:
    pairs = [p for _, _, p in read_pairs(path) if not isinstance(p, HHFormatError)]
    return random.Random(seed).sample(pairs, min(n, len(pairs)))


def shared_pair(pair: HHPair, judge_share: float) -> SharedPair:
    """Oriented like the store: x is the completion with the smaller id."""
    conv = conversation_id(pair.prompt)
    chosen_is_x = completion_id(conv, pair.chosen) < completion_id(conv, pair.rejected)
    x, y = (pair.chosen, pair.rejected) if chosen_is_x else (pair.rejected, pair.chosen)
    return SharedPair(len(x), len(y), 1.0 if chosen_is_x else 0.0, judge_share if chosen_is_x else 1.0 - judge_share)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--pairs", type=int, default=150)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--decision", choices=["choice", "generate"], default="choice")
    ap.add_argument("--inconsistent", choices=POLICIES, default="calibrate", help="policy of the main table")
    ap.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: fastest when other processes share the CPU)"
    )
    ap.add_argument("--max-minutes", type=float, default=9.0)
    args = ap.parse_args()

    settings = JudgeSettings(
        model=args.model, decision=args.decision, inconsistent=args.inconsistent, torch_threads=args.threads
    )
    t = time.monotonic()
    judge = Judge(LocalBackend(args.model, device=settings.device, threads=settings.torch_threads), settings)
    load_s = time.monotonic() - t
    pairs = sample_pairs(args.data, args.pairs, args.seed)
    deadline = time.monotonic() + args.max_minutes * 60
    shared, flips, flips_to_first, judged, parse_failures = {p: [] for p in POLICIES}, 0, 0, 0, 0
    started = time.monotonic()
    for n, pair in enumerate(pairs, start=1):
        if time.monotonic() > deadline:
            print(f"time budget reached after {n - 1} pairs", file=sys.stderr)
            break
        try:
            jd = judge.pair(pair.prompt, [pair.chosen, pair.rejected], 0, 1)
        except ParseFailure:
            parse_failures += 1
            continue
        judged += 1
        flips += jd.flipped
        flips_to_first += jd.order1 == "first" and jd.order2 == "second"  # reply A won in both orders
        for policy in POLICIES:
            result = combine_orders(jd, policy)  # "first" = the chosen completion
            if result is not None:
                shared[policy].append(shared_pair(pair, {"first": 1.0, "second": 0.0, "tie": 0.5}[result]))
        if n % 10 == 0:
            print(
                f"  {n}/{len(pairs)} pairs, {(time.monotonic() - started) / n:.2f}s per pair",
                file=sys.stderr,
                flush=True,
            )
    seconds = time.monotonic() - started
    attempted = judged + parse_failures
    report = agreement_report(shared[settings.inconsistent], judged, flips)
    print(
        f"\nLocal judge {args.model} ({args.decision} mode, template {judge.pairwise.version}) on {attempted} "
        f"HH-RLHF harmless pairs (seed {args.seed}), inconsistent={args.inconsistent}, {args.threads} torch "
        f"thread(s); model load {load_s:.1f}s\n"
    )
    print(format_report(report, reference="HH crowdworkers"))
    print(f"| flips where the reply shown first won both times | {flips_to_first} of {flips} |")
    print(f"| pairs with an unparseable answer (skipped) | {parse_failures} of {attempted} |")
    print(
        f"| seconds per pair (both orders) / per pair-order | {seconds / max(attempted, 1):.2f} / "
        f"{seconds / max(2 * attempted, 1):.2f} |"
    )
    print(f"| judge calls | {judge.calls} |")
    print("\nThe same verdicts under each policy for order-dependent verdicts:\n")
    print("| policy | pairs with an outcome | decisive | agreement | Cohen's kappa |")
    print("|---|---|---|---|---|")
    for policy in POLICIES:
        r = agreement_report(shared[policy])
        print(f"| {policy} | {len(shared[policy])} | {r.shared_pairs} | {fmt(r.agreement)} | {fmt(r.kappa)} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
