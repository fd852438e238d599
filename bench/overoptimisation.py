"""Over-optimisation with and without the outer loop (Gao et al., 2023), on this machine.

The demo's setup, three times from the same start: a gold reward model (SmolLM2 head mode on
every human training pair) stands in for people; the served proxy learns from a quarter of
them. PPO (same seed, same steps) trains the policy against the proxy in three arms:

    fixed    the proxy never changes;
    random   the outer loop: every few steps the gold labels randomly chosen fresh samples,
             the proxy is retrained on them and the trainer switches to it;
    active   the same, but the samples the proxy's ensemble doubts most are labeled;

with the same label budget for the two outer-loop arms. Every few steps the held-out prompts'
samples are scored by the served proxy and by the gold, with their KL to the reference.
Prints one markdown table (gold and proxy reward per sqrt(KL) bucket, final figures, labels
used) with the hardware named, and writes a PNG of gold and proxy against sqrt(KL) per arm.

    .venv/bin/python bench/overoptimisation.py                      # ~35 min on 2 cores
    .venv/bin/python bench/overoptimisation.py --steps 12 --arms fixed,active
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ARMS = {
    "fixed": dict(submit_every=0, retrain_min_labels=0),
    "random": dict(selection="random"),
    "active": dict(selection="uncertainty"),
}
BUCKETS = (0.0, 1.0, 2.0, 3.0, 4.0, math.inf)  # sqrt(KL) edges


def arm_settings(base, arm: str, home: Path, args):
    from rm_service.demo.settings import demo_settings

    fixed = dict(
        ppo_steps=args.steps,
        eval_every=args.eval_every,
        label_budget=args.label_budget,
        calibration_pairs=0,
        progress=False,
        retrain_min_labels=args.retrain_min_labels,
        submit_every=args.submit_every,
        submit_fraction=args.submit_fraction,
    )
    return demo_settings("cpu", home=home, data=base.data, **{**fixed, **ARMS[arm]})


def copy_home(source: Path, target: Path) -> None:
    """The built store and registry, for one arm: the versions' paths rewritten to the copy."""
    import duckdb

    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(source, target)
    con = duckdb.connect(str(target / "rm.duckdb"))
    try:
        con.execute("UPDATE models SET artifact_path = replace(artifact_path, ?, ?)", [str(source), str(target)])
    finally:
        con.close()
    pointer = target / "registry" / "promoted.json"
    if pointer.exists():
        pointer.write_text(pointer.read_text().replace(str(source), str(target)))


def built_versions(home: Path):
    """(gold, proxy) of a base home built before, as the TrainResults build_models returns;
    None when the home holds no finished build (an interrupted run: it is built again)."""
    from rm_service import registry
    from rm_service.errors import NotFound
    from rm_service.settings import StoreSettings
    from rm_service.store.db import Store
    from rm_service.train.run import TrainResult

    if not (home / "rm.duckdb").exists():
        return None
    store = Store(StoreSettings(path=home / "rm.duckdb"), read_only=True)
    try:
        gold, proxy = (registry.get_model(store, v) for v in ("v1", "v2"))
    except NotFound:
        return None
    finally:
        store.close()
    return (
        TrainResult(gold.version, False, "", gold.metrics, 0.0),
        TrainResult(proxy.version, True, "", proxy.metrics, 0.0),
    )


def run_arm(arm: str, s, base_facts, home: Path) -> dict:
    from rm_service.demo.pipeline import Stages, serve_and_loop, use_home
    from rm_service.demo.report import RunFacts

    facts = RunFacts(settings=s, home=home, gold=base_facts.gold, v1=base_facts.v1)
    start = time.monotonic()
    with use_home(home):
        serve_and_loop(s, facts, Stages())
    evals = facts.evaluations
    switches = [f"{w['to_version']}@{w['step']}" for w in facts.ppo.switches]
    labeled = facts.judge_queue.labeled if facts.judge_queue else 0
    return {
        "arm": arm,
        "evaluations": evals,
        "labels": labeled,
        "candidates": facts.ppo.candidates_submitted,
        "switches": switches,
        "seconds": time.monotonic() - start,
    }


def bucket_means(evals: list[dict], key: str) -> list[float]:
    """Mean of `key` over the evaluations whose sqrt(KL) falls in each bucket (NaN: none)."""
    out = []
    for low, high in itertools.pairwise(BUCKETS):
        values = [e[key] for e in evals if low <= math.sqrt(max(e.get("kl_seq", 0.0), 0.0)) < high and key in e]
        out.append(sum(values) / len(values) if values else math.nan)
    return out


def table(results: list[dict], hardware: str, args) -> str:
    names = [f"{lo:g}-{hi:g}" if hi != math.inf else f"{lo:g}+" for lo, hi in itertools.pairwise(BUCKETS)]
    cell = lambda v: "" if v != v else f"{v:+.3f}"
    lines = [
        f"Hardware: {hardware}. {args.steps} PPO steps, same seed; every {args.submit_every} step(s) "
        f"{args.submit_fraction:.0%} of the batch's prompts go to labeling, chosen at random or by the proxy's "
        f"doubt; label budget {args.label_budget} per outer-loop arm; retrain at {args.retrain_min_labels} new "
        "labels, promoted only when more accurate than its parent on held-out on-policy pairs (ties: "
        f"{args.gate_ties}).",
        "",
        "| arm | reward | " + " | ".join(f"sqrt(KL) {n}" for n in names) + " | final | labels | proxy versions |",
        "|---|---|" + "---:|" * len(names) + "---:|---:|---|",
    ]
    for r in results:
        final = r["evaluations"][-1] if r["evaluations"] else {}
        for key, label in (("gold_reward_mean", "gold"), ("reward_mean", "proxy")):
            lines.append(
                f"| {r['arm']} | {label} | "
                + " | ".join(cell(v) for v in bucket_means(r["evaluations"], key))
                + f" | {cell(final.get(key, math.nan))} | {r['labels']} | {', '.join(r['switches']) or 'fixed'} |"
            )
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(4.5 * len(results), 3.8), sharey=True, squeeze=False)
    for ax, r in zip(axes[0], results, strict=True):
        root_kl = [math.sqrt(max(e.get("kl_seq", 0.0), 0.0)) for e in r["evaluations"]]
        for key, label in (("gold_reward_mean", "gold"), ("reward_mean", "proxy (served)")):
            ax.plot(root_kl, [e.get(key, math.nan) for e in r["evaluations"]], marker="o", label=label)
        ax.set_title(f"{r['arm']} ({r['labels']} labels)")
        ax.set_xlabel("sqrt(KL to the reference)")
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("mean reward, held-out prompts")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arms", default="fixed,random,active")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--eval-every", type=int, default=4)
    p.add_argument("--submit-every", type=int, default=1)
    p.add_argument(
        "--submit-fraction",
        type=float,
        default=0.5,
        help="share of a batch's prompts sent to labeling: selection picks which",
    )
    p.add_argument("--retrain-min-labels", type=int, default=8)
    p.add_argument("--label-budget", type=int, default=20)
    p.add_argument("--home", type=Path, help="work directory (default: a temp dir)")
    p.add_argument("--out", type=Path, default=REPO / "docs" / "bench")
    p.add_argument(
        "--reuse",
        type=Path,
        help="an earlier run's overoptimisation.json: its arms are taken as measured, not rerun "
        "(the fixed arm does not depend on the retrain gate, say)",
    )
    p.add_argument(
        "--gate-ties",
        choices=["reject", "lower_loss"],
        default="reject",
        help="a retrain as accurate as its parent on held-out on-policy pairs: rejected, or promoted on a lower loss",
    )
    args = p.parse_args()
    os.environ["RM_TRAIN_GATE_ONPOLICY_TIES"] = args.gate_ties  # read by the arms' servers when they retrain
    home = args.home or Path(tempfile.mkdtemp(prefix="rm-bench-overopt-"))
    os.environ.setdefault("RM_MODELS_CACHE_DIR", str(REPO / "var" / "cache" / "models"))
    import torch

    from rm_service.demo.pipeline import Stages, build_models, use_home
    from rm_service.demo.report import RunFacts
    from rm_service.demo.settings import demo_settings
    from rm_service.models.precision import describe, resolve_precision

    base = demo_settings("cpu", home=home / "base", progress=False)
    base_facts = RunFacts(settings=base, home=home / "base")
    built = built_versions(home / "base")  # gold v1 and proxy v2 of an earlier run with this --home
    if built is not None:
        base_facts.gold, base_facts.v1 = built
    else:
        shutil.rmtree(home / "base", ignore_errors=True)
        (home / "base").mkdir(parents=True)
        with use_home(home / "base"):
            build_models(base, base_facts, Stages())  # gold (v1) and proxy (v2), once for every arm
    measured = {r["arm"]: r for r in json.loads(args.reuse.read_text())} if args.reuse else {}
    results = []
    for arm in args.arms.split(","):
        if arm in measured:
            results.append(measured[arm])
            print(f"{arm}: taken from {args.reuse}", flush=True)
            continue
        copy_home(home / "base", home / arm)
        results.append(run_arm(arm, arm_settings(base, arm, home / arm, args), base_facts, home / arm))
        print(
            f"{arm}: {results[-1]['labels']} labels, versions {results[-1]['switches']}, {results[-1]['seconds']:.0f}s",
            flush=True,
        )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    hardware = describe(resolve_precision("auto", device), device)
    text = table(results, hardware, args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "overoptimisation.md").write_text(text + "\n")
    (args.out / "overoptimisation.json").write_text(json.dumps(results, indent=2))
    plot(results, args.out / "overoptimisation.png")
    print("\n" + text + f"\n\nwrote {args.out / 'overoptimisation.md'} and {args.out / 'overoptimisation.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
