"""How often the promotion rule promotes a worse reward model or rejects a better one.

Real labels, real models, known quality: the HH-RLHF pairs are split by conversation into a
training half and an evaluation pool. Score heads (head mode, the demo's features) are fitted
on disjoint training subsets of several sizes, so there are many (parent, candidate) couples
whose true difference is known from the whole pool (its mean per-pair log-likelihood gain and
that gain's interval). Each decision is then simulated the way a run makes it: 185 human pairs
(the held-out split's size) and n on-policy pairs, drawn from the pool with replacement, the
rule applied to them; 500 draws per couple and n. The table gives, by what the couple truly
is (candidate worse, about equal, better), how often the rule promotes, rejects or stays
undecided; and the same for the rule it replaced (a retrain must be strictly more accurate on
the on-policy pairs and lose at most 0.02 accuracy on human pairs).

    .venv/bin/python bench/gate_error_rates.py                       # SmolLM2 features: ~8 min cold
    .venv/bin/python bench/gate_error_rates.py --backbone minilm-l6  # ~2 min
    .venv/bin/python bench/gate_error_rates.py --home COPY_OF_A_DEMO_RUN_DIR --precision fp32  # the demo's features
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
SIZES = (60, 120, 240, 480)  # training pairs of a candidate: weak to strong
HUMAN = 185  # held-out human pairs in a run of the demo's split
ONPOLICY = (2, 5, 12, 25, 50, 100, 200)  # on-policy pairs: a demo round (2-25) to a real run


def features(backbone: str, home: Path, max_tokens: int, precision: str):
    """Every HH pair and its pooled features (the gold's read-out: last+mean at 60% depth)."""
    os.environ["RM_HOME"] = str(home)
    from rm_service.data import HH_PAIRS
    from rm_service.formats import import_file
    from rm_service.models.pooling import depth
    from rm_service.models.runtime import load_backbone_runtime
    from rm_service.settings import StoreSettings, TrainSettings
    from rm_service.store.db import Store
    from rm_service.train.features import Candidate, candidates_for
    from rm_service.train.head_mode import feature_options, pair_data, split_features

    store = Store(StoreSettings(path=home / "rm.duckdb"))
    try:
        if not store.get_snapshot():
            import_file(store, HH_PAIRS, "hh")
        pairs = [p for p in store.pairs(store.create_snapshot()) if p.source in ("IMPORT", "HUMAN")]  # people's labels
        settings = TrainSettings(backbone=backbone, max_tokens=max_tokens)
        runtime = load_backbone_runtime(backbone, max_tokens, precision=precision)
        deepest = max(c.layer for c in candidates_for(runtime, "auto"))
        cands = [Candidate(deepest, m) for m in ("last", "mean")] if runtime.spec.kind == "causal" else None
        cands = cands or [c for c in candidates_for(runtime, "auto") if c.layer == deepest]
        feats, _ = split_features(runtime, store, pairs, cands, settings, math.inf, show_progress=True)
        name = f"last+mean@{deepest}" if runtime.spec.kind == "causal" else f"mean@{deepest}"
        pooling = feature_options(cands, runtime.spec.kind)[name]
        print(f"features: {name} of {backbone} ({depth(runtime.model.backbone)} layers run)", flush=True)
        return pairs, pair_data(feats, pooling, pairs, settings)
    finally:
        store.close()


def fit_models(data, train_rows: np.ndarray, seed: int) -> list[tuple[int, np.ndarray]]:
    """Heads on disjoint subsets of each size: [(size, r_delta over all pairs [N])]."""
    from rm_service.train.heads import fit_heads

    rng = np.random.default_rng(seed)
    out = []
    for size in SIZES:
        order = rng.permutation(train_rows)
        for k in range(min(3, len(order) // size)):
            rows = np.zeros(len(data.weight), dtype=bool)
            rows[order[k * size : (k + 1) * size]] = True
            fit = fit_heads(data.rows(rows), 4, 0.3, seed + k)
            delta = ((data.x_w - data.x_l) @ fit.weight.T).mean(1)  # [N] r_chosen - r_rejected, ensemble mean
            out.append((size, delta))
    return out


def loglik(delta: np.ndarray) -> np.ndarray:
    return -np.logaddexp(0.0, -delta)


def new_rule(dc_h, dp_h, dc_o, dp_o, conf: float, share: float) -> str:
    from rm_service import registry
    from rm_service.evidence import combined, effect

    human = effect((dc_h, np.zeros_like(dc_h)), (dp_h, np.zeros_like(dp_h)), conf)
    onpolicy = effect((dc_o, np.zeros_like(dc_o)), (dp_o, np.zeros_like(dp_o)), conf)
    return registry.decide(human, onpolicy, combined(human, onpolicy, share, conf), conf).verdict


def old_rule(dc_h, dp_h, dc_o, dp_o) -> str:
    """The rule before this one: strictly more accurate on on-policy pairs (ties rejected), at
    most 0.02 less accurate on human pairs."""

    def acc(delta: np.ndarray) -> float:
        return float(np.mean((delta > 0) + 0.5 * (delta == 0)))

    if acc(dc_h) < acc(dp_h) - 0.02 or acc(dc_o) <= acc(dp_o):
        return "reject"
    return "promote"


def simulate(models, pool: np.ndarray, draws: int, conf: float, share: float, seed: int) -> dict:
    """{(truth, n): {rule: {verdict: count}}} over every (parent, candidate) couple."""
    rng = np.random.default_rng(seed)
    tallies: dict = {}
    for i, (_, parent) in enumerate(models):
        for j, (_, cand) in enumerate(models):
            if i == j:
                continue
            gains = loglik(cand[pool]) - loglik(parent[pool])  # [P] the whole pool: the truth
            se = gains.std(ddof=1) / math.sqrt(len(gains))
            truth = "better" if gains.mean() > 2.58 * se else "worse" if gains.mean() < -2.58 * se else "about equal"
            for n in ONPOLICY:
                cell = tallies.setdefault((truth, n), {"new": {}, "old": {}, "couples": set()})
                cell["couples"].add((i, j))
                for _ in range(draws):
                    h = rng.choice(pool, HUMAN)
                    o = rng.choice(pool, n)
                    for rule, verdict in (
                        ("new", new_rule(cand[h], parent[h], cand[o], parent[o], conf, share)),
                        ("old", old_rule(cand[h], parent[h], cand[o], parent[o])),
                    ):
                        cell[rule][verdict] = cell[rule].get(verdict, 0) + 1
    return tallies


def table(tallies: dict, hardware: str, args, couples: int, pool: int) -> str:
    def rate(cell, rule, verdict):
        total = sum(cell[rule].values())
        return cell[rule].get(verdict, 0) / total if total else math.nan

    lines = [
        f"{hardware}. {couples} (parent, candidate) couples of head-mode reward models ({args.backbone} features; "
        f"heads on disjoint subsets of {', '.join(map(str, SIZES))} HH training pairs); truth from the {pool}-pair "
        f"evaluation pool (99% interval of the gain); {args.draws} simulated decisions per couple and n, each on "
        f"{HUMAN} human and n on-policy pairs drawn from the pool. New rule at {args.confidence:.0%}, "
        f"share {args.share}. Cells: promote / reject / undecided.",
        "",
        "| truth | couples | rule | " + " | ".join(f"n = {n}" for n in ONPOLICY) + " |",
        "|---|---:|---|" + "---|" * len(ONPOLICY),
    ]
    for truth in ("worse", "about equal", "better"):
        cells = [tallies.get((truth, n)) for n in ONPOLICY]
        if not cells[0]:
            continue
        for rule, name in (("new", "evidence (this rule)"), ("old", "accuracy (before)")):
            parts = []
            for cell in cells:
                p, r, u = (rate(cell, rule, v) for v in ("promote", "reject", "undecided"))
                parts.append(f"{p:.2f} / {r:.2f} / {u:.2f}" if rule == "new" else f"{p:.2f} / {r:.2f} / -")
            lines.append(f"| {truth} | {len(cells[0]['couples'])} | {name} | " + " | ".join(parts) + " |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="smollm2-135m-instruct")
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--draws", type=int, default=500)
    p.add_argument("--confidence", type=float, default=0.95)
    p.add_argument("--share", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", default="auto", help="backbone precision (features are cached per precision)")
    p.add_argument(
        "--home",
        type=Path,
        help="work directory (features are cached in its store; a demo's run directory reuses the demo's)",
    )
    p.add_argument("--out", type=Path, default=REPO / "docs" / "bench")
    args = p.parse_args()
    start = time.monotonic()
    home = args.home or Path(tempfile.mkdtemp(prefix="rm-bench-gate-"))
    home.mkdir(parents=True, exist_ok=True)
    pairs, data = features(args.backbone, home, args.max_tokens, args.precision)
    from rm_service.train.split import is_heldout

    in_pool = np.array([is_heldout(p.conversation_id, 0.5, args.seed + 11) for p in pairs])  # by conversation
    pool, train_rows = np.flatnonzero(in_pool), np.flatnonzero(~in_pool)
    models = fit_models(data, train_rows, args.seed)
    tallies = simulate(models, pool, args.draws, args.confidence, args.share, args.seed)
    import platform

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "")
    hardware = f"Hardware: {cpu or platform.processor()}, {os.cpu_count()} cores"
    text = table(tallies, hardware, args, len(models) * (len(models) - 1), len(pool))
    text += f"\n\nWall time {time.monotonic() - start:.0f} s."
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gate.md").write_text("# The promotion rule's error rates (simulated)\n\n" + text + "\n")
    print("\n" + text + f"\n\nwrote {args.out / 'gate.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
