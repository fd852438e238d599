"""Seconds per optimiser step of the user model's fine-tune: full (every weight) against LoRA.

    flock /tmp/rm-cpu.lock .venv/bin/python bench/user_model_methods.py [--backbone smollm2-135m-instruct]
        [--steps 4] [--batch-tokens 2048] [--lora-rank 16]

Both methods run `usermodel.fit.fit` (the code `user-model train` runs) on the same batches of
HH conversations (their user-turn windows, the first batches in length order after one warm-up
step), in the precision the probe picks, one after the other in this process. What each method
learns per step is measured apart, at equal steps and outside the lock (docs/user-model.md);
this gives what a step costs, so a time budget can be turned into steps.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "clients" / "python")]

import torch  # noqa: E402

from rm_service.data import HH_PAIRS  # noqa: E402
from rm_service.models.precision import cpu_name, describe  # noqa: E402
from rm_service.usermodel.data import file_conversations  # noqa: E402
from rm_service.usermodel.fit import _batches, fit  # noqa: E402
from rm_service.usermodel.runtime import load_user_runtime  # noqa: E402
from rm_service.usermodel.settings import UserModelSettings  # noqa: E402


def windows(runtime, limit: int) -> list:
    convs = file_conversations(HH_PAIRS, "hh")[:limit]
    return [w for c in convs for w in runtime.formatter.windows(c.messages, True)]


def run(method: str, args) -> tuple:
    settings = UserModelSettings(
        backbone=args.backbone, method=method, batch_tokens=args.batch_tokens, lora_rank=args.lora_rank, warmup_steps=1
    )
    runtime = load_user_runtime(settings.backbone, settings.max_tokens)
    seqs = windows(runtime, args.conversations)
    batches = _batches(seqs, settings.batch_tokens)
    chosen = [seqs[i] for b in batches[: args.steps + 1] for i in b]  # one warm-up step, then the timed ones
    fit(runtime, chosen[: len(batches[0])], [], settings.model_copy(update={"epochs": 1.0}), 1e9, False)
    timed = chosen[len(batches[0]) :]
    report = fit(runtime, timed, [], settings.model_copy(update={"epochs": 1.0}), 1e9, False)
    return runtime, report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="smollm2-135m-instruct")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch-tokens", type=int, default=2048)
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--conversations", type=int, default=400)
    args = p.parse_args()
    rows = []
    for method in ("full", "lora"):
        runtime, report = run(method, args)
        rows.append((method, report))
    print(
        f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}; "
        f"{describe(runtime.precision, runtime.device)}"
    )
    print(f"{args.backbone}, batches of {args.batch_tokens} tokens, {args.steps} timed steps per method\n")
    print("| method | trainable parameters | steps | s/step | tokens/s |")
    print("|---|---:|---:|---:|---:|")
    for method, r in rows:
        print(f"| {method} | {r.trainable_params:,} | {r.steps} | {r.seconds / r.steps:.2f} | {r.tokens_per_s:.0f} |")
    full, lora = (r.seconds / r.steps for _, r in rows)
    print(f"\nfull / LoRA seconds per step: {full / lora:.2f}x")


if __name__ == "__main__":
    main()
