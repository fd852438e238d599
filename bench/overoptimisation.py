"""Over-optimisation with and without the outer loop (Gao et al., 2023), over paired seeds.

The demo's setup from one start: a gold reward model (SmolLM2 head mode on every human training
pair) stands in for people; the served proxy learns from 10% of them. PPO trains the policy
against the proxy in four arms, each run with the same seeds (same prompts, same sampling
streams at the start):

    fixed         the proxy never changes;
    random        the outer loop: every step the gold labels randomly chosen fresh samples, the
                  proxy is retrained on them, the promotion rule decides, the trainer switches;
    active        the same, but the samples the proxy's ensemble doubts most are labeled;
    conservative  the fixed proxy, but PPO optimises its ensemble's mean minus one standard
                  deviation (pessimism under the reward model's uncertainty; Coste et al., 2023);

with the same label budget for the two outer-loop arms. Every few steps the held-out prompts'
samples are scored by the served proxy and by the gold, with their KL to the reference. Prints
(and writes to docs/bench/overoptimisation.md) gold and proxy per evaluation step against
sqrt(KL), each a mean over seeds with its 95% interval, the final gold of each arm minus the
fixed proxy's with the paired interval, and which claims those intervals support; a PNG.
Every finished (arm, seed) is saved at once, so an interrupted run resumes where it stopped.

    .venv/bin/python bench/overoptimisation.py --seeds 0,1,2,3,4   # ~6 min per (arm, seed) on 2 cores
    .venv/bin/python bench/overoptimisation.py --seeds 0,1 --arms fixed,active --steps 12
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy import stats

REPO = Path(__file__).resolve().parent.parent
ARMS = {
    "fixed": dict(submit_every=0, retrain_min_labels=0),
    "random": dict(selection="random"),
    "active": dict(selection="uncertainty"),
    "conservative": dict(submit_every=0, retrain_min_labels=0, reward_pessimism="mean_minus_std", pessimism_k=1.0),
}


def arm_settings(base, arm: str, seed: int, home: Path, args):
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
        seed=seed,
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


def run_arm(arm: str, seed: int, s, base_facts, home: Path) -> dict:
    from rm_service.demo.pipeline import Stages, serve_and_loop, use_home
    from rm_service.demo.report import RunFacts

    facts = RunFacts(settings=s, home=home, gold=base_facts.gold, v1=base_facts.v1)
    start = time.monotonic()
    with use_home(home):
        serve_and_loop(s, facts, Stages())
    facts.read_store(home / "rm.duckdb")
    decisions = [
        {"version": m.version, "verdict": m.decision["verdict"], "parent": m.decision.get("parent")}
        for m in facts.models
        if m.decision
    ]
    return {
        "arm": arm,
        "seed": seed,
        "evaluations": facts.evaluations,
        "labels": facts.judge_queue.labeled if facts.judge_queue else 0,
        "switches": [f"{w['to_version']}@{w['step']}" for w in facts.ppo.switches],
        "decisions": decisions,
        "seconds": time.monotonic() - start,
    }


def interval(values: list[float]) -> tuple[float, float, float]:
    """(mean, low, high): the 95% t-interval of the mean over seeds (NaN bounds for one seed)."""
    x = np.asarray([v for v in values if v == v], dtype=float)
    if len(x) < 2:
        return (float(x.mean()) if len(x) else math.nan), math.nan, math.nan
    half = float(stats.t.ppf(0.975, len(x) - 1)) * x.std(ddof=1) / math.sqrt(len(x))
    return float(x.mean()), float(x.mean() - half), float(x.mean() + half)


def fmt(m: tuple[float, float, float]) -> str:
    mean, low, high = m
    if mean != mean:
        return ""
    return f"{mean:+.3f}" if low != low else f"{mean:+.3f} [{low:+.3f}, {high:+.3f}]"


def by_step(results: list[dict], arm: str, key: str) -> dict[int, list[float]]:
    """{evaluation step: [value per seed]} of one arm."""
    out: dict[int, list[float]] = {}
    for r in results:
        if r["arm"] == arm:
            seen = {}
            for e in r["evaluations"]:  # the last evaluation of a step wins (the final one repeats the last step)
                seen[e["step"]] = e.get(key, math.nan)
            for step, value in seen.items():
                out.setdefault(step, []).append(value)
    return dict(sorted(out.items()))


def final(r: dict, key: str = "gold_reward_mean") -> float:
    return r["evaluations"][-1].get(key, math.nan) if r["evaluations"] else math.nan


def paired(results: list[dict], arm: str, against: str) -> tuple[list[float], tuple[float, float, float]]:
    """Per seed, final gold of `arm` minus `against`'s, and the interval of its mean."""
    mine = {r["seed"]: final(r) for r in results if r["arm"] == arm}
    theirs = {r["seed"]: final(r) for r in results if r["arm"] == against}
    diffs = [mine[s] - theirs[s] for s in sorted(mine) if s in theirs]
    return diffs, interval(diffs)


def claim(text: str, m: tuple[float, float, float], n: int) -> str:
    mean, low, high = m
    if low != low:
        return f"- {text}: not tested (fewer than two paired seeds)."
    if low > 0:
        return f"- **Supported**: {text} (paired difference {fmt(m)} over {n} seeds)."
    if high < 0:
        return f"- **The opposite holds**: {text} is contradicted (paired difference {fmt(m)} over {n} seeds)."
    return f"- **Not supported**: {text}; the paired difference {fmt(m)} over {n} seeds includes zero."


def paired_only(results: list[dict]) -> tuple[list[dict], list[dict]]:
    """(the runs of seeds every arm has finished, the others): only the first are compared."""
    arms = {r["arm"] for r in results}
    complete = {s for s in {r["seed"] for r in results} if {r["arm"] for r in results if r["seed"] == s} == arms}
    return [r for r in results if r["seed"] in complete], [r for r in results if r["seed"] not in complete]


def table(results: list[dict], hardware: str, args, wall: float) -> str:
    results, unpaired = paired_only(results)
    arms = [a for a in ARMS if any(r["arm"] == a for r in results)]
    seeds = sorted({r["seed"] for r in results})
    extra = "".join(
        f" Not compared (its seed is not finished in every arm): {r['arm']} seed {r['seed']}, final gold "
        f"{final(r):+.3f}."
        for r in unpaired
    )
    lines = [
        f"Hardware: {hardware}. Seeds {', '.join(map(str, seeds))} in every arm (paired); {args.steps} PPO steps; "
        f"every {args.submit_every} step(s) {args.submit_fraction:.0%} of the prompts go to labeling, chosen "
        f"at random or by the proxy's doubt; label budget {args.label_budget} per outer-loop arm; a retrain at "
        f"{args.retrain_min_labels} new labels (more when the promotion rule asks for them), decided by the promotion "
        f"rule. Mean over seeds [95% t-interval]. Wall time {wall / 60:.0f} min: the (arm, seed) runs together, "
        f"{wall / 60 / max(len(results) + len(unpaired), 1):.1f} min each (the shared gold and proxy build not "
        f"included).{extra}",
        "",
        "**Final reward on the held-out prompts**",
        "",
        "| arm | seeds | gold (final) | proxy (final, served version) | gold peak | labels | promotions |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for arm in arms:
        rs = [r for r in results if r["arm"] == arm]
        peaks = [max((e.get("gold_reward_mean", -math.inf) for e in r["evaluations"]), default=math.nan) for r in rs]
        promoted = sum(d["verdict"] == "promote" for r in rs for d in r.get("decisions", []))
        decided = sum(len(r.get("decisions", [])) for r in rs)
        lines.append(
            f"| {arm} | {len(rs)} | {fmt(interval([final(r) for r in rs]))} | "
            f"{fmt(interval([final(r, 'reward_mean') for r in rs]))} | {fmt(interval(peaks))} | "
            f"{np.mean([r['labels'] for r in rs]):.0f} | {promoted} of {decided} retrains |"
        )
    lines += ["", "**Gold and proxy along the run** (each cell: mean over seeds [95% interval]; sqrt(KL) its mean)", ""]
    lines += ["| arm | step | sqrt(KL) | gold | proxy |", "|---|---:|---:|---:|---:|"]
    for arm in arms:
        kl, gold, proxy = (by_step(results, arm, k) for k in ("kl_seq", "gold_reward_mean", "reward_mean"))
        for step in gold:
            root = interval([math.sqrt(max(v, 0.0)) for v in kl.get(step, [])])[0]
            lines.append(
                f"| {arm} | {step} | {root:.2f} | {fmt(interval(gold[step]))} | {fmt(interval(proxy[step]))} |"
            )
    lines += ["", "**Paired differences of the final gold** (per seed, arm minus arm)", ""]
    lines += ["| comparison | per seed | mean [95% interval] |", "|---|---|---:|"]
    comparisons = [(a, "fixed") for a in arms if a != "fixed"] + (
        [("active", "random")] if {"active", "random"} <= set(arms) else []
    )
    claims = []
    for arm, against in comparisons:
        if against not in arms:
            continue
        diffs, m = paired(results, arm, against)
        lines.append(f"| {arm} - {against} | {', '.join(f'{d:+.3f}' for d in diffs)} | {fmt(m)} |")
        text = {
            ("random", "fixed"): "the outer loop with random selection ends with more gold reward than the fixed proxy",
            ("active", "fixed"): "the outer loop with active selection ends with more gold reward than the fixed proxy",
            ("conservative", "fixed"): "the conservative reward ends with more gold reward than the fixed proxy",
            ("active", "random"): "active selection ends with more gold reward than random at the same label budget",
        }.get((arm, against), f"{arm} ends with more gold reward than {against}")
        claims.append(claim(text, m, len(diffs)))
    lines += ["", "**What these runs support**", "", *claims]
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results, _ = paired_only(results)
    arms = [a for a in ARMS if any(r["arm"] == a for r in results)]
    fig, axes = plt.subplots(1, len(arms), figsize=(4.5 * len(arms), 3.8), sharey=True, squeeze=False)
    for ax, arm in zip(axes[0], arms, strict=True):
        kl = by_step(results, arm, "kl_seq")
        for key, label in (("gold_reward_mean", "gold"), ("reward_mean", "proxy (served)")):
            values = by_step(results, arm, key)
            steps = list(values)
            x = [interval([math.sqrt(max(v, 0.0)) for v in kl.get(s, [])])[0] for s in steps]
            m = [interval(values[s]) for s in steps]
            (line,) = ax.plot(x, [v[0] for v in m], marker="o", label=label)
            ax.fill_between(x, [v[1] for v in m], [v[2] for v in m], color=line.get_color(), alpha=0.2)
        n = len({r["seed"] for r in results if r["arm"] == arm})
        ax.set_title(f"{arm} ({n} seeds)")
        ax.set_xlabel("sqrt(KL to the reference), mean over seeds")
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("mean reward, held-out prompts\n(band: 95% interval over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arms", default=",".join(ARMS))
    p.add_argument("--seeds", default="0,1,2,3,4", help="PPO seeds; every arm runs each one")
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
    p.add_argument("--home", type=Path, help="work directory (default: a temp dir); rerun with it to resume")
    p.add_argument("--out", type=Path, default=REPO / "docs" / "bench")
    args = p.parse_args()
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
            build_models(base, base_facts, Stages())  # gold (v1) and proxy (v2), once for every arm and seed
    done_file = home / "results.json"
    results = json.loads(done_file.read_text()) if done_file.exists() else []
    for seed in (int(x) for x in args.seeds.split(",")):
        for arm in args.arms.split(","):
            if any(r["arm"] == arm and r["seed"] == seed for r in results):
                continue
            work = home / f"{arm}-s{seed}"
            copy_home(home / "base", work)
            results.append(run_arm(arm, seed, arm_settings(base, arm, seed, work, args), base_facts, work))
            shutil.rmtree(work, ignore_errors=True)  # the arm's store and registry: its results are kept
            done_file.write_text(json.dumps(results, indent=1))
            r = results[-1]
            print(f"{arm} seed {seed}: final gold {final(r):+.3f}, {r['labels']} labels, versions {r['switches']}, "
                  f"{r['seconds']:.0f}s", flush=True)  # fmt: skip
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    hardware = describe(resolve_precision("auto", device), device)
    text = table(results, hardware, args, sum(r["seconds"] for r in results))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "overoptimisation.md").write_text(text + "\n")
    (args.out / "overoptimisation.json").write_text(json.dumps(results, indent=1))
    plot(results, args.out / "overoptimisation.png")
    print("\n" + text + f"\n\nwrote {args.out / 'overoptimisation.md'} and {args.out / 'overoptimisation.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
