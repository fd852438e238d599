"""Torch vs ONNX Runtime (fp32 and int8) reward-model throughput on real HH items, on CPU.

For each model it scores the chosen side of the first --items HH pairs four ways:

    torch fp32, one item at a time      (the baseline: ModelRuntime.run with a budget of 1 token)
    torch fp32, token-budget batches    (ModelRuntime.run, --batch-tokens)
    ORT fp32,   token-budget batches    (OnnxRuntimeModel.run, same batches and padding)
    ORT int8,   token-budget batches    (dynamic int8 quantisation of the same graph)

and prints a markdown table: tokens/s (real tokens, padding not counted), items/s, the ratio
to the baseline, model FLOPs utilisation (2 * non-embedding params * tokens/s over the
fp32 GEMM rate measured in this run; attention FLOPs are not counted), and the largest
relative difference from the torch batched rewards. The int8 row also gives the fraction
of (chosen, rejected) pairs it orders like torch fp32.

Bundled backbones get a fresh (untrained, seed 0) score head: throughput does not depend
on the head, and the ordering agreement measures how int8 noise compares to the spread of
the rewards. A registry version directory (`$RM_HOME/registry/vN`) runs with its trained
head and formatting contract, which makes the agreement figure meaningful.

    RM_HOME=var .venv/bin/python bench/onnx_vs_torch.py --models minilm-l6,smollm2-135m-instruct --items 64
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from rm_service.data import HH_PAIRS
from rm_service.formats.hh import HHPair, read_pairs
from rm_service.models.formatting import Formatted
from rm_service.models.onnx_backend import (
    OnnxRuntimeModel,
    export_onnx,
    max_relative_difference,
    ordering_agreement,
)
from rm_service.models.quantize import quantize_int8
from rm_service.models.runtime import ModelRuntime, load_backbone_runtime

DEFAULT_DATA = HH_PAIRS


@dataclass
class Timing:
    name: str
    seconds: float
    tokens: int
    items: int
    rewards: np.ndarray  # [N, K]

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds

    @property
    def items_per_s(self) -> float:
        return self.items / self.seconds


def gemm_gflops(n: int = 1024, reps: int = 10, trials: int = 5) -> float:
    """Best fp32 GFLOP/s of torch's n x n matmul over `trials` timed loops of `reps`."""
    a, b = torch.randn(n, n), torch.randn(n, n)  # [n, n]
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(trials):
        start = time.perf_counter()
        for _ in range(reps):
            a @ b
        best = min(best, (time.perf_counter() - start) / reps)
    return 2 * n**3 / best / 1e9


def non_embedding_params(model: torch.nn.Module) -> int:
    """Parameters outside nn.Embedding tables (they cost no FLOPs per token)."""
    total = sum(p.numel() for p in model.parameters())
    embedded = sum(
        p.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters(recurse=False)
    )
    return total - embedded


def load_runtime(name: str, max_tokens: int) -> ModelRuntime:
    """A registry version directory (version.json: its trained head and format) or a backbone with a fresh head."""
    if (Path(name) / "version.json").is_file():
        from rm_service.models.version import open_version

        runtime, _ = open_version(name, device="cpu", precision="fp32")
        return runtime
    return load_backbone_runtime(name, max_tokens=max_tokens, device="cpu", precision="fp32")


def hh_pairs(path: Path, n: int) -> list[HHPair]:
    pairs = [p for _, _, p in read_pairs(path) if not isinstance(p, Exception)]
    return pairs[:n]


def timed(name: str, fn, items: list[Formatted], repeats: int = 1) -> Timing:
    """Best of `repeats` timed runs of `fn(items)`, after a two-item warm-up."""
    fn(items[:2])
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        rewards = fn(items)  # [N, K]
        best = min(best, time.perf_counter() - start)
    return Timing(name, best, sum(len(x) for x in items), len(items), rewards)


def bench_model(name: str, pairs: list[HHPair], args, work: Path) -> list[dict]:
    """Time the four paths for one model; one table row per path.

    The GEMM rate is measured right before this model's timings, so MFU compares figures
    taken under the same load from other processes.
    """
    t0 = time.perf_counter()
    runtime = load_runtime(name, args.max_tokens)
    load_s = time.perf_counter() - t0
    chosen = [runtime.format(p.prompt, p.chosen) for p in pairs]
    rejected = [runtime.format(p.prompt, p.rejected) for p in pairs]
    params = non_embedding_params(runtime.model)

    t0 = time.perf_counter()
    fp32_path = export_onnx(runtime, work / Path(name).name / "model.onnx")
    export_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    int8_path = quantize_int8(fp32_path, work / Path(name).name / "model.int8.onnx")
    quant_s = time.perf_counter() - t0
    ort_fp32 = OnnxRuntimeModel.for_runtime(runtime, fp32_path)
    ort_int8 = OnnxRuntimeModel.for_runtime(runtime, int8_path)
    budget = args.batch_tokens

    gflops = gemm_gflops()
    runs = [
        timed("torch fp32, 1 item/batch", lambda xs: runtime.run(xs, max_batch_tokens=1), chosen, args.repeats),
        timed(f"torch fp32, {budget}-token batches", lambda xs: runtime.run(xs, budget), chosen, args.repeats),
        timed(f"ORT fp32, {budget}-token batches", lambda xs: ort_fp32.run(xs, budget), chosen, args.repeats),
        timed(f"ORT int8, {budget}-token batches", lambda xs: ort_int8.run(xs, budget), chosen, args.repeats),
    ]
    reference = runs[1].rewards
    agreement = ordering_agreement(
        reference, runtime.run(rejected, budget), runs[3].rewards, ort_int8.run(rejected, budget)
    )
    base = runs[0].tokens_per_s
    lengths = [len(x) for x in chosen]
    print(
        f"{name}: loaded in {load_s:.1f}s, exported in {export_s:.1f}s ({fp32_path.stat().st_size / 2**20:.0f} MiB), "
        f"int8 in {quant_s:.1f}s ({int8_path.stat().st_size / 2**20:.0f} MiB); {len(chosen)} items, {sum(lengths)} "
        f"tokens (min {min(lengths)}, median {int(np.median(lengths))}, max {max(lengths)}); {params / 1e6:.1f}M "
        "non-embedding params",
        file=sys.stderr,
    )
    rows = []
    for run in runs:
        rows.append(
            {
                "model": Path(name).name,
                "path": run.name,
                "tokens_per_s": run.tokens_per_s,
                "items_per_s": run.items_per_s,
                "ratio": run.tokens_per_s / base,
                "gemm_gflops": gflops,
                "mfu": 2 * params * run.tokens_per_s / (gflops * 1e9),
                "max_rel_diff": max_relative_difference(reference, run.rewards),
                "agreement": agreement if run is runs[3] else None,
            }
        )
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [
        "| model | path | tokens/s | items/s | vs 1-at-a-time | GEMM GFLOP/s | MFU | max rel diff vs torch batched | "
        "int8 pair-order agreement |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        agreement = "" if r["agreement"] is None else f"{r['agreement']:.3f}"
        lines.append(
            f"| {r['model']} | {r['path']} | {r['tokens_per_s']:.0f} | {r['items_per_s']:.2f} | {r['ratio']:.2f}x "
            f"| {r['gemm_gflops']:.0f} | {100 * r['mfu']:.1f}% | {r['max_rel_diff']:.1e} | {agreement} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--models",
        default="minilm-l6,smollm2-135m-instruct",
        help="comma-separated bundled names, HF dirs or registry version dirs (trained head)",
    )
    parser.add_argument("--items", type=int, default=64, help="first N HH pairs (chosen side is timed)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--max-tokens", type=int, default=512, help="formatting contract's token limit")
    parser.add_argument("--batch-tokens", type=int, default=4096, help="padded-token budget of one batch")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per path; the fastest counts")
    parser.add_argument("--work-dir", type=Path, default=None, help="where the ONNX files go (default: a temp dir)")
    args = parser.parse_args(argv)

    pairs = hh_pairs(args.data, args.items)
    gflops = gemm_gflops()
    print(
        f"cpu cores: {os.cpu_count()}, torch threads: {torch.get_num_threads()}, "
        f"torch fp32 GEMM 1024x1024: {gflops:.1f} GFLOP/s",
        file=sys.stderr,
    )
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="onnx-bench-") as tmp:
        work = args.work_dir or Path(tmp)
        for name in [m.strip() for m in args.models.split(",") if m.strip()]:
            rows.extend(bench_model(name, pairs, args, work))
    gflops_end = gemm_gflops()
    print(
        f"\ntorch fp32 GEMM (1024x1024, best of 5): {gflops:.1f} GFLOP/s at start, {gflops_end:.1f} GFLOP/s at end; "
        f"MFU uses the figure measured before each model's timings. {os.cpu_count()} cores, torch threads "
        f"{torch.get_num_threads()}, ORT intra-op threads {os.cpu_count()}; other processes may share them.\n"
    )
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
