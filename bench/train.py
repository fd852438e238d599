"""Training throughput against the machine's own GEMM rate, measured in one run.

For each backbone: head mode's feature pass (forward only, 2N FLOPs per token) and full
mode's step (forward + backward, 6N FLOPs per token), N = non-embedding parameters, on
real HH-RLHF items in token-budget batches. Prints tokens/s and model FLOPs utilisation
(MFU) = FLOPs per token x tokens/s / fp32 GEMM FLOP/s measured in the same process.

    .venv/bin/python bench/train.py --models minilm-l6 smollm2-135m-instruct --items 48
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from rm_service.data import HH_PAIRS
from rm_service.formats.hh import HHFormatError, read_pairs
from rm_service.models.batching import collate
from rm_service.models.runtime import load_backbone_runtime
from rm_service.train.loss import bradley_terry_loss

DATA = HH_PAIRS


def gemm_flops(n: int = 1024, repeats: int = 20) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["minilm-l6"])
    parser.add_argument("--items", type=int, default=48, help="HH pairs to run")
    parser.add_argument("--max-tokens", type=int, default=384)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    hh = [p for _, _, p in read_pairs(DATA) if not isinstance(p, HHFormatError)][: args.items]
    gemm = gemm_flops()
    rows = []
    for name in args.models:
        runtime = load_backbone_runtime(name, args.max_tokens)
        n = non_embedding_params(runtime.model)
        pairs = [(runtime.format(p.prompt, p.chosen), runtime.format(p.prompt, p.rejected)) for p in hh]
        items = [x for pair in pairs for x in pair]
        fwd = forward_tokens_per_s(runtime, items, 4096)
        step = train_step_tokens_per_s(runtime, pairs[: max(8, args.items // 2)])
        rows.append((name, n, "head mode: forward (features)", fwd, 2 * n * fwd / gemm))
        rows.append((name, n, "full mode: forward + backward + AdamW", step, 6 * n * step / gemm))
    print(
        f"\nmachine: {os.cpu_count()} cores; fp32 GEMM (1024^3, torch) {gemm / 1e9:.1f} GFLOP/s, measured in this run\n"
    )
    print("| model | non-embedding params | phase | tokens/s | MFU vs measured GEMM |")
    print("|---|---:|---|---:|---:|")
    for name, n, phase, tps, mfu in rows:
        print(f"| {name} | {n / 1e6:.1f}M | {phase} | {tps:.0f} | {mfu:.0%} |")


if __name__ == "__main__":
    main()
