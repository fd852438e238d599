"""Training throughput against the machine's own GEMM rate, measured in one run.

For each backbone: head mode's feature pass (forward only, 2N FLOPs per token) and full
mode's step (forward + backward, 6N FLOPs per token), N = non-embedding parameters, on
real HH-RLHF items in token-budget batches. Prints tokens/s and model FLOPs utilisation
(MFU) = FLOPs per token x tokens/s / the GEMM FLOP/s of its precision (fp32 or bf16) measured
in the same process.
With --feature-budgets, head mode's extraction as the trainer runs it (train.features.extract:
the candidate layers, the backbone cut after the deepest, shared prompts, the measured
precision) at each feature_batch_tokens budget, N counted up to the deepest candidate layer.
With --extraction-ways, the same extraction in each way of applying precision, in the same run:
fp32; bf16 autocast over fp32 weights (how extraction ran before issue 26: weights re-cast at
every op); bf16 weights (a bf16 copy made once, how it runs now when bf16 is measured faster),
each with its features' cosine to fp32's (the worst item) beside the speed.

    .venv/bin/python bench/train.py --models minilm-l6 smollm2-135m-instruct --items 48
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from rm_service.data import HH_PAIRS
from rm_service.formats.hh import HHFormatError, read_pairs
from rm_service.models.batching import collate
from rm_service.models.runtime import load_backbone_runtime
from rm_service.train.loss import bradley_terry_loss

DATA = HH_PAIRS


def gemm_flops(n: int = 1024, repeats: int = 20, dtype: torch.dtype = torch.float32) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - start)


def non_embedding_params(model: torch.nn.Module) -> int:
    embed = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding))
    return sum(p.numel() for p in model.parameters()) - embed


def forward_tokens_per_s(runtime, items, budget: int) -> float:
    runtime.run(items[:2], budget)  # warm-up
    start = time.perf_counter()
    runtime.run(items, budget, what="features")
    return sum(len(x) for x in items) / (time.perf_counter() - start)


def extraction_runtime(name: str, max_tokens: int, way: str = "auto"):
    """The backbone cut after the deepest candidate layer, as the trainer extracts, with the
    candidates; `way` one of WAYS, or "auto" for the precision measured faster here."""
    from rm_service.models.pooling import truncate
    from rm_service.settings import TrainSettings
    from rm_service.train.features import candidates_for, extraction_pooling

    runtime = load_backbone_runtime(name, max_tokens, precision="bf16" if way == "autocast" else way)
    if way == "autocast":  # bf16 autocast over the fp32 weights themselves: no bf16 copy
        runtime.inference_model = lambda: runtime.model
    cands = candidates_for(runtime, TrainSettings().feature_layers)
    runtime.model.backbone = truncate(runtime.model.backbone, extraction_pooling(cands))
    return runtime, cands


WAYS = ("fp32", "autocast", "bf16")


def extraction_tokens_per_s(
    name: str, hh, max_tokens: int, budgets: list[int], way: str = "auto"
) -> tuple[list[tuple[int, float, int, str]], dict]:
    """[(budget, tokens/s, non-embedding params run, precision)] of head mode's feature
    extraction, and the features of the last pass (candidate -> [2 x pairs, H])."""
    from rm_service.train.features import extract

    runtime, cands = extraction_runtime(name, max_tokens, way)
    prompts = [p.prompt for p in hh for _ in range(2)]
    items = [runtime.format(p.prompt, c) for p in hh for c in (p.chosen, p.rejected)]
    tokens = sum(len(x) for x in items)
    extract(runtime, prompts[:4], items[:4], cands, budgets[0])  # warm-up
    best, features = dict.fromkeys(budgets, float("inf")), {}
    for _ in range(2):  # budgets interleaved over two rounds, the best of each
        for budget in budgets:
            start = time.perf_counter()
            features = extract(runtime, prompts, items, cands, budget)
            best[budget] = min(best[budget], time.perf_counter() - start)
    n = non_embedding_params(runtime.model)
    label = way if way != "auto" else runtime.precision
    return [(b, tokens / best[b], n, label) for b in budgets], features


def worst_cosine(features: dict, reference: dict) -> float:
    """The lowest cosine between an item's features and the reference's, over items and candidates."""
    worst = 1.0
    for c, x in features.items():
        y = reference[c]
        cos = (x * y).sum(1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1) + 1e-12)  # [N]
        worst = min(worst, float(cos.min()))
    return worst


def train_step_tokens_per_s(runtime, pairs, micro: int = 4) -> float:
    model = runtime.model
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    tokens, start = 0, None
    for step, begin in enumerate(range(0, len(pairs) - micro + 1, micro)):
        part = pairs[begin : begin + micro]
        batch = collate([c for c, _ in part] + [r for _, r in part], runtime.pad_id)
        r = model(**batch)  # [2b, K]
        bradley_terry_loss(r[:micro], r[micro:]).backward()
        opt.step()
        opt.zero_grad()
        if step == 0:
            start = time.perf_counter()  # the first step is warm-up
        else:
            tokens += int(batch["attention_mask"].sum())
    model.eval()
    return tokens / (time.perf_counter() - start)


def extraction_rows(rows: list, name: str, hh, args, gemm: dict[str, float]) -> None:
    """Head mode's extraction rows: the measured precision alone, or each of --extraction-ways
    with its worst cosine to fp32's features and its speed over autocast's."""
    ways = args.extraction_ways or ["auto"]
    measured, features = {}, {}
    for way in ways:
        measured[way], features[way] = extraction_tokens_per_s(name, hh, args.max_tokens, args.feature_budgets, way)
    for way in ways:
        for (budget, tps, n, precision), base in zip(
            measured[way], measured.get("autocast", measured[way]), strict=True
        ):
            extra = ""
            if "fp32" in features and way != "fp32":
                extra = f"; worst cosine to fp32 {worst_cosine(features[way], features['fp32']):.4f}"
            if "autocast" in measured and way != "autocast":
                extra += f"; {tps / base[1]:.2f}x autocast"
            phase = f"head mode: extraction ({precision}, budget {budget}{extra})"
            rows.append((name, n, phase, tps, 2 * n * tps / gemm["fp32" if precision == "fp32" else "bf16"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["minilm-l6"])
    parser.add_argument("--items", type=int, default=48, help="HH pairs to run")
    parser.add_argument("--max-tokens", type=int, default=384)
    parser.add_argument("--feature-budgets", type=int, nargs="*", default=[], help="head-mode extraction budgets")
    parser.add_argument(
        "--extraction-ways", nargs="*", choices=WAYS, default=[], help="compare ways of applying precision"
    )
    parser.add_argument("--no-full", action="store_true", help="skip the forward and full-mode rows")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    hh = [p for _, _, p in read_pairs(DATA) if not isinstance(p, HHFormatError)][: args.items]
    gemm = {"fp32": gemm_flops(), "bf16": gemm_flops(dtype=torch.bfloat16)}
    rows = []
    for name in args.models:
        if args.feature_budgets:
            extraction_rows(rows, name, hh, args, gemm)
        if args.no_full:
            continue
        runtime = load_backbone_runtime(name, args.max_tokens)
        n = non_embedding_params(runtime.model)
        pairs = [(runtime.format(p.prompt, p.chosen), runtime.format(p.prompt, p.rejected)) for p in hh]
        items = [x for pair in pairs for x in pair]
        fwd = forward_tokens_per_s(runtime, items, 4096)
        step = train_step_tokens_per_s(runtime, pairs[: max(8, args.items // 2)])
        rows.append((name, n, "head mode: forward (features)", fwd, 2 * n * fwd / gemm[runtime.precision]))
        rows.append((name, n, "full mode: forward + backward + AdamW", step, 6 * n * step / gemm["fp32"]))
    print(
        f"\nmachine: {os.cpu_count()} cores; GEMM (1024^3, torch) fp32 {gemm['fp32'] / 1e9:.1f} GFLOP/s, "
        f"bf16 {gemm['bf16'] / 1e9:.1f} GFLOP/s, measured in this run\n"
    )
    print("| model | non-embedding params | phase | tokens/s | MFU vs the measured GEMM of its precision |")
    print("|---|---:|---|---:|---:|")
    for name, n, phase, tps, mfu in rows:
        print(f"| {name} | {n / 1e6:.1f}M | {phase} | {tps:.0f} | {mfu:.0%} |")


if __name__ == "__main__":
    main()
