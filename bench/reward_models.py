"""Which reward model fits the budget: backbone x mode x training pairs -> held-out accuracy and wall time.

Imports the shared HH-RLHF pairs into a fresh store under a temp home and trains one version
per row with the product's own `train` (promotion off, no ONNX export). Every row is measured
on the same held-out split (conversations hashed out of training), so rows compare. Head mode
runs the largest size first: its wall time includes extracting the features of every pair
(cold); the smaller sizes reuse the cached features (warm) and time only the fit. Full mode
fine-tunes the backbone for one epoch per row. Prints one markdown table with the hardware
and precision named, and writes a learning curve (PNG).

    .venv/bin/python bench/reward_models.py    # the table in docs/benchmarks.md (~20 min on 2 cores)
    .venv/bin/python bench/reward_models.py --backbones minilm-l6 --modes head --sizes 250,all
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from rm_service.data import HH_PAIRS

REPO = Path(__file__).resolve().parent.parent
DATA = HH_PAIRS
TOKENS = {"minilm-l6": 256, "smollm2-135m-instruct": 512}  # MiniLM was trained on 256 tokens


def parse_sizes(text: str) -> list[int | None]:
    """'250,500,all' -> [None, 500, 250]: the largest first (None = every pair)."""
    sizes = [None if s.strip() == "all" else int(s) for s in text.split(",") if s.strip()]
    return sorted(sizes, key=lambda n: -(n or 10**9))


def run(args) -> list[dict]:
    from rm_service.formats import import_file
    from rm_service.settings import ModelSettings, StoreSettings, TrainSettings
    from rm_service.store.db import Store
    from rm_service.train.run import train

    store = Store(StoreSettings())
    rows = []
    try:
        import_file(store, args.data, "hh")
        for backbone in args.backbones.split(","):
            for mode in args.modes.split(","):
                if mode == "full" and backbone not in args.full_backbones.split(","):
                    continue
                sizes = parse_sizes(args.sizes if mode == "head" else args.full_sizes)
                for i, n in enumerate(sizes):
                    settings = TrainSettings(
                        backbone=backbone,
                        mode=mode,
                        max_pairs=n,
                        max_tokens=TOKENS.get(backbone, 512),
                        promote=False,
                        export_onnx="off",
                        max_minutes=args.max_minutes,
                        epochs=1.0,
                    )
                    start = time.monotonic()
                    result = train(store, settings, ModelSettings(), show_progress=False)
                    seconds = time.monotonic() - start
                    m = result.metrics
                    rows.append(
                        {
                            "backbone": backbone,
                            "mode": mode,
                            "pairs": int(m["train_pairs"]),
                            "accuracy": m["accuracy"],
                            "heldout_pairs": int(m["heldout_pairs"]),
                            "seconds": seconds,
                            "cold": mode == "full" or i == 0,
                            "details": result.details,
                        }
                    )
                    print(
                        f"{backbone} {mode} {int(m['train_pairs'])} pairs: held-out {m['accuracy']:.4f} in "
                        f"{seconds:.0f}s ({result.details})",
                        flush=True,
                    )
    finally:
        store.close()
    return rows


def table(rows: list[dict], hardware: str) -> str:
    lines = [
        f"Hardware: {hardware}",
        "",
        "| backbone | mode | training pairs | held-out accuracy | wall time | features |",
        "|---|---|---:|---:|---:|---|",
    ]
    for r in rows:
        what = "n/a" if r["mode"] == "full" else ("computed (cold)" if r["cold"] else "cached (warm)")
        lines.append(
            f"| {r['backbone']} | {r['mode']} | {r['pairs']:,} | {r['accuracy']:.4f} ({r['heldout_pairs']} pairs) | "
            f"{r['seconds'] / 60:.1f} min | {what} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for key in dict.fromkeys((r["backbone"], r["mode"]) for r in rows):
        points = sorted((r["pairs"], r["accuracy"]) for r in rows if (r["backbone"], r["mode"]) == key)
        ax.plot([p for p, _ in points], [a for _, a in points], marker="o", label=f"{key[0]} ({key[1]} mode)")
    ax.axhline(0.5, color="grey", linestyle=":", label="chance")
    ax.set_xscale("log")
    ax.set_xlabel("training pairs (HH-RLHF harmless, human labels)")
    ax.set_ylabel("held-out pairwise accuracy")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--backbones", default="smollm2-135m-instruct,minilm-l6")
    p.add_argument("--modes", default="head,full")
    p.add_argument("--sizes", default="250,500,1000,all", help="head mode: training pairs per row")
    p.add_argument("--full-sizes", default="250,500", help="full mode: training pairs per row (one epoch each)")
    p.add_argument(
        "--full-backbones",
        default="minilm-l6",
        help="backbones that also get full-mode rows (SmolLM2 has ~6x MiniLM's parameters per token: add it on a GPU)",
    )
    p.add_argument("--max-minutes", type=float, default=30.0, help="budget of one row")
    p.add_argument(
        "--out", type=Path, default=REPO / "docs" / "bench", help="where the table (.md) and the curve (.png) go"
    )
    args = p.parse_args()
    home = Path(tempfile.mkdtemp(prefix="rm-bench-models-"))
    os.environ["RM_HOME"] = str(home)  # a fresh store and registry; the bundled-model cache is shared
    os.environ.setdefault("RM_MODELS_CACHE_DIR", str(REPO / "var" / "cache" / "models"))
    import torch

    from rm_service.models.precision import describe, resolve_precision

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    hardware = f"{describe(resolve_precision('auto', device), device)}, torch {torch.__version__}"
    rows = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    text = table(rows, hardware)
    (args.out / "reward_models.md").write_text(text + "\n")
    (args.out / "reward_models.json").write_text(json.dumps(rows, indent=2))
    plot(rows, args.out / "reward_models.png")
    print("\n" + text)
    print(f"\nwrote {args.out / 'reward_models.md'} and {args.out / 'reward_models.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
