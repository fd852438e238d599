"""The demo's report: `report.md`, PNG plots, and the summary table printed at the end."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from rm_service import registry
from rm_service.demo.evidence import decision_table, gold_course, rule_text
from rm_service.settings import StoreSettings
from rm_service.store import jobs
from rm_service.store.agreement import AgreementReport, format_report
from rm_service.store.db import Store

if TYPE_CHECKING:  # the modules that load torch, imported by the stages that run them
    from policy_trainer.trainer import Summary
    from rm_service.demo.settings import DemoSettings
    from rm_service.judge.runner import JudgeCounts
    from rm_service.train.run import TrainResult


@dataclass
class RunFacts:
    """Everything the report says, gathered while the demo runs and from the store after it."""

    settings: DemoSettings
    home: Path
    labels_imported: int = 0
    lines_rejected: int = 0
    gold: TrainResult | None = None  # the gold reward model
    v1: TrainResult | None = None  # the first proxy (the first served version)
    calibration_file: Path | None = None
    calibration: JudgeCounts | None = None  # the gold annotator on the human-labeled pairs
    judge_queue: JudgeCounts | None = None  # the gold annotator on the policy samples
    ppo: Summary | None = None
    server_exit_code: int | None = None
    stage_seconds: dict[str, float] = field(default_factory=dict)
    total_seconds: float = 0.0
    models: list = field(default_factory=list)  # registry.ModelRecord, oldest first
    jobs: list = field(default_factory=list)  # store.jobs.Job, oldest first
    stats: dict = field(default_factory=dict)
    agreement: AgreementReport | None = None  # against HUMAN and IMPORT (HH-RLHF) labels
    plots: list[Path] = field(default_factory=list)

    def read_store(self, path: Path) -> None:
        store = Store(StoreSettings(path=path), read_only=True)
        try:
            self.models = sorted(registry.list_models(store), key=lambda m: int(m.version[1:]))
            self.jobs = list(reversed(jobs.list_jobs(store)))
            self.stats = store.stats()
            # HH-RLHF labels are people's, imported.
            self.agreement = store.judge_agreement(reference=("HUMAN", "IMPORT"))
        finally:
            store.close()

    # -- figures the report and the terminal share ---------------------------------------

    @property
    def steps(self) -> list[dict]:
        return self.ppo.metrics if self.ppo else []

    @property
    def evaluations(self) -> list[dict]:
        """The policy's held-out evaluations (step, proxy reward_mean, gold_reward_mean, kl_seq), in order."""
        if not self.ppo:
            return []
        from policy_trainer.logs import read_jsonl

        return [
            e
            for e in read_jsonl(self.ppo.run_dir / "events.jsonl")
            if e["event"] == "eval" and e.get("model") == "policy"
        ]

    def reward_rise(self, key: str = "reward_mean") -> tuple[float, float]:
        """Held-out prompts' mean reward (served proxy, final version; or gold): initial and trained policy."""
        if not self.ppo or not self.ppo.eval_before or not self.ppo.eval_after:
            return math.nan, math.nan
        return self.ppo.eval_before.get(key, math.nan), self.ppo.eval_after.get(key, math.nan)

    def summary_rows(self) -> list[tuple[str, str]]:
        before, after = self.reward_rise()
        gold_before, gold_after = self.reward_rise("gold_reward_mean")
        kl = [m["kl/ref_seq"] for m in self.steps]
        switches = self.ppo.switches if self.ppo else []
        by_source = self.stats.get("labels_by_source", {})
        rows = [("human labels imported", f"{self.labels_imported:,}")]
        gold = self.gold.version if self.gold else None
        for m in self.models:
            role = "gold" if m.version == gold else "proxy"
            rows.append((f"reward model {m.version} ({role}, {m.status})", _accuracies(m)))
        rows.append(
            (
                "held-out prompts: proxy reward before -> after PPO (final version)",
                f"{before:+.3f} -> {after:+.3f} ({after - before:+.3f})",
            )
        )
        rows.append(
            (
                "held-out prompts: gold reward before -> after PPO",
                f"{gold_before:+.3f} -> {gold_after:+.3f} ({gold_after - gold_before:+.3f})",
            )
        )
        course = gold_course(self.evaluations)
        if course is not None:
            rows.append(("gold reward along the run (held-out samples)", course.text()))
        decided = [m for m in self.models if m.decision]
        if decided:
            rows.append(
                (
                    "promotion decisions",
                    ", ".join(
                        f"{m.version} {m.decision['verdict']} against {m.decision.get('parent')}" for m in decided
                    ),
                )
            )
        if kl:
            rows.append(("KL to the reference per sequence (max, last step)", f"{max(kl):.3f}, {kl[-1]:.3f} nats"))
        rows.append(
            (
                "reward-model switches during PPO",
                ", ".join(f"{w['from_version']} -> {w['to_version']} at step {w['step']}" for w in switches) or "none",
            )
        )
        rows.append(("labels by source", ", ".join(f"{k} {v:,}" for k, v in sorted(by_source.items()))))
        a = self.agreement
        if a is not None and a.shared_pairs:
            rows.append(
                (
                    "gold annotator vs people: agreement, Cohen's kappa",
                    f"{a.agreement:.3f}, {a.kappa:.3f} on {a.shared_pairs} shared pairs",
                )
            )
        if self.ppo and self.ppo.seconds_per_phase:
            p = self.ppo.seconds_per_phase
            rows.append(
                (
                    "seconds per PPO step (generate / score / train)",
                    f"{p.get('step', math.nan):.1f} ({p.get('generate', math.nan):.1f} / "
                    f"{p.get('score', math.nan):.1f} / {p.get('train', math.nan):.1f})",
                )
            )
        rows.append(("total demo time", f"{self.total_seconds:.0f} s"))
        return rows

    def summary_table(self) -> str:
        return "\n".join(["| result | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in self.summary_rows()])


SMOOTHING = 5  # steps in the trailing mean drawn over the per-step reward


def trailing_mean(values: list[float], window: int) -> list[float]:
    """Mean of each value and the up to `window - 1` values before it."""
    return [sum(values[max(0, i + 1 - window) : i + 1]) / (i + 1 - max(0, i + 1 - window)) for i in range(len(values))]


def plot_reward_kl(facts: RunFacts, path: Path) -> Path:
    """Served reward and KL per step, one colour per reward-model version, switches marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = facts.steps
    fig, (ax_r, ax_kl) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    for version in dict.fromkeys(m["rm/version"] for m in steps):
        xs = [m["step"] for m in steps if m["rm/version"] == version]
        rewards = [m["reward/served_mean"] for m in steps if m["rm/version"] == version]
        (line,) = ax_r.plot(xs, rewards, marker="o", alpha=0.5, label=f"reward ({version})")
        ax_r.plot(xs, trailing_mean(rewards, SMOOTHING), color=line.get_color(), linewidth=2.5)
        ax_kl.plot(
            xs, [m["kl/ref_seq"] for m in steps if m["rm/version"] == version], marker="o", label=f"KL ({version})"
        )
    for w in facts.ppo.switches if facts.ppo else []:
        for ax in (ax_r, ax_kl):
            ax.axvline(w["step"] - 0.5, color="grey", linestyle="--")
        ax_r.annotate(
            f"{w['from_version']} -> {w['to_version']}",
            (w["step"] - 0.5, ax_r.get_ylim()[1]),
            fontsize=8,
            ha="right",
            va="top",
        )
    ax_r.set_ylabel(f"mean served reward\n(thick: mean of the last {SMOOTHING} steps)")
    ax_kl.set_ylabel("KL(policy || ref) per sequence, nats")
    ax_kl.set_xlabel("PPO step")
    ax_r.legend(fontsize=8)
    ax_kl.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_accuracy(facts: RunFacts, path: Path) -> Path:
    """Held-out accuracy per reward-model version: on human pairs and on on-policy pairs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(facts.models) + 2), 3.5))
    gold = facts.gold.version if facts.gold else None
    names = [f"{m.version}\n({'gold' if m.version == gold else m.status})" for m in facts.models]
    for offset, kind, colour in ((-0.2, "human", "tab:blue"), (0.2, "onpolicy", "tab:orange")):
        values = [m.metrics.get(f"accuracy_{kind}", math.nan) for m in facts.models]
        ax.bar([i + offset for i in range(len(names))], values, width=0.4, color=colour, label=f"{kind} pairs")
        for i, v in enumerate(values):
            if v == v:
                ax.text(i + offset, v + 0.01, f"{v:.2f}", ha="center", fontsize=8)
    ax.set_xticks(range(len(names)), names)
    ax.axhline(0.5, color="grey", linestyle=":", label="chance")
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("held-out pairwise accuracy")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _accuracies(m) -> str:
    """A version's held-out accuracy on human and on on-policy pairs, with its parent's on the same pairs."""
    parts = []
    for kind in ("human", "onpolicy"):
        acc = m.metrics.get(f"accuracy_{kind}")
        if acc is None:
            continue
        base = m.metrics.get(f"baseline_accuracy_{kind}")
        parent = f" (parent {m.parent}: {base:.4f})" if base is not None else ""
        parts.append(f"{kind} {acc:.4f} on {int(m.metrics.get(f'pairs_{kind}', 0))} pairs{parent}")
    return "; ".join(parts) or f"accuracy {m.metrics.get('accuracy', math.nan):.4f}"


def _version_row(m) -> str:
    get = lambda key: m.metrics.get(key)
    cell = lambda v: "" if v is None else f"{v:.4f}"
    return (
        f"| {m.version} | {m.status} | {m.parent or ''} | {cell(get('accuracy_human'))} | "
        f"{cell(get('baseline_accuracy_human'))} | {cell(get('accuracy_onpolicy'))} | "
        f"{cell(get('baseline_accuracy_onpolicy'))} | {int(get('pairs_onpolicy') or 0)} | "
        f"{int(get('onpolicy_train_pairs') or 0)} | {'yes' if get('unchanged_from_parent') else ''} | "
        f"{m.snapshot_id} |"
    )


def plot_overoptimisation(facts: RunFacts, path: Path) -> Path:
    """Proxy and gold reward of the held-out samples per evaluation, against step and sqrt(KL)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evals = facts.evaluations
    steps = [e["step"] for e in evals]
    root_kl = [math.sqrt(max(e.get("kl_seq", 0.0), 0.0)) for e in evals]
    fig, (ax_s, ax_k) = plt.subplots(1, 2, figsize=(10, 4))
    for key, label in (("reward_mean", "proxy (served version)"), ("gold_reward_mean", "gold")):
        values = [e.get(key, math.nan) for e in evals]
        ax_s.plot(steps, values, marker="o", label=label)
        ax_k.plot(root_kl, values, marker="o", label=label)
    ax_s.set_xlabel("PPO step")
    ax_k.set_xlabel("sqrt(KL to the reference), nats^0.5")
    for ax in (ax_s, ax_k):
        ax.set_ylabel("mean reward, held-out prompts")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_report(facts: RunFacts) -> Path:
    """`report.md` and the plots in the demo's home; returns the report's path."""
    home = facts.home
    if facts.steps:
        facts.plots.append(plot_reward_kl(facts, home / "reward_kl.png"))
    if facts.evaluations:
        facts.plots.append(plot_overoptimisation(facts, home / "proxy_gold.png"))
    if facts.models:
        facts.plots.append(plot_accuracy(facts, home / "accuracy.png"))
    s = facts.settings
    lines = [
        "# rm-service demo report",
        "",
        f"Reward models on `{s.rm_backbone}`: the gold ({facts.gold.version if facts.gold else '?'}, head mode on "
        f"every human training pair; {facts.gold.details if facts.gold else ''}) labels the policy's samples; the "
        f"served proxy learns from {s.proxy_dataset_fraction:.0%} of the human-labeled conversations and those "
        f"labels ({s.rm_mode} mode). Policy `{s.policy}`; profile `{s.profile}`; {s.ppo_steps} PPO steps of "
        f"{s.prompts_per_step} prompts x {s.samples_per_prompt} samples x {s.max_new_tokens} new tokens; labeling "
        f"candidates chosen by `{s.selection}`.",
        "",
        "## Summary",
        "",
        facts.summary_table(),
        "",
        "![proxy and gold reward against step and sqrt(KL)](proxy_gold.png)",
        "",
        "![reward and KL per step](reward_kl.png)",
        "",
        "![accuracy per version](accuracy.png)",
        "",
        "## Proxy and gold on held-out prompts",
        "",
        "| step | KL/seq | sqrt(KL) | proxy reward (version) | gold reward |",
        "|---:|---:|---:|---:|---:|",
        *[
            f"| {e['step']} | {e.get('kl_seq', math.nan):.3f} | {math.sqrt(max(e.get('kl_seq', 0.0), 0.0)):.3f} | "
            f"{e.get('reward_mean', math.nan):+.3f} ({e.get('version', '')}) | "
            f"{e.get('gold_reward_mean', math.nan):+.3f} |"
            for e in facts.evaluations
        ],
        "",
        "The proxy column is each evaluation's served version (rewards normalised by that version's statistics); the "
        "gold's scale is fixed. Over-optimisation shows as the proxy rising while the gold falls (Gao et al., 2023).",
        "",
        "## Stages",
        "",
        "| stage | seconds |",
        "|---|---:|",
        *[f"| {name} | {sec:.1f} |" for name, sec in facts.stage_seconds.items()],
        "",
        "## PPO steps",
        "",
        "| step | RM version | mean reward | KL/seq | entropy | clip frac | response len | generate s | score s | "
        "train s |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        *[
            f"| {m['step']} | {m['rm/version']} | {m['reward/served_mean']:+.3f} | {m['kl/ref_seq']:.3f} | "
            f"{m.get('policy/entropy', math.nan):.3f} | {m.get('policy/clipfrac', math.nan):.3f} | "
            f"{m['response/length_mean']:.1f} | {m['time/generate_s']:.1f} | {m['time/score_s']:.1f} | "
            f"{m['time/train_s']:.1f} |"
            for m in facts.steps
        ],
        "",
        "Rewards are normalised with each version's statistics, so values before and after a switch are on different "
        "scales; the held-out comparison in the summary scores both policies with the final version.",
        "",
        "## Promotion decisions",
        "",
        rule_text(),
        "",
        *decision_table(facts.models),
        "",
        "## Reward-model versions",
        "",
        "Accuracy on held-out human pairs and on the policy's samples (cross-fitted), each beside the parent's on the "
        "same pairs: what people read; the decisions above weigh the per-pair log-likelihoods.",
        "",
        "| version | status | parent | human | parent, human | on-policy | parent, on-policy | on-policy pairs "
        "judged | on-policy training pairs | same heads as parent | snapshot |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---|---|",
        *[_version_row(m) for m in facts.models],
        "",
        "## Retraining jobs",
        "",
        "| job | state | version | promoted | seconds |",
        "|---|---|---|---|---:|",
        *[
            f"| {j.job_id} | {j.state} | {j.model_version or ''} | {j.promoted} | "
            f"{(j.finished_at - j.created_at) if j.finished_at else math.nan:.1f} |"
            for j in facts.jobs
        ],
        "",
        "## Labels",
        "",
        "| source | labels |",
        "|---|---:|",
        *[f"| {k} | {v:,} |" for k, v in sorted(facts.stats.get("labels_by_source", {}).items())],
        "",
    ]
    if facts.agreement is not None:
        lines += [
            "## The gold annotator",
            "",
            "Against the people's labels (HH-RLHF, imported) on the held-out pairs both labeled:",
            "",
            format_report(facts.agreement, reference="HUMAN+IMPORT"),
            "",
        ]
    if facts.calibration is not None:
        lines += [f"Calibration run on held-out human-labeled pairs: {facts.calibration.summary()}.", ""]
    if facts.judge_queue is not None:
        lines += [f"Policy samples from the labeling queue: {facts.judge_queue.summary()}.", ""]
    lines += [
        "## Files",
        "",
        f"- store: `{home / 'rm.duckdb'}`",
        f"- registry: `{home / 'registry'}`",
        f"- PPO run (metrics.jsonl, TensorBoard, checkpoints): `{facts.ppo.run_dir if facts.ppo else ''}`",
        f"- server log: `{home / 'server.log'}`",
        "",
    ]
    path = home / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
