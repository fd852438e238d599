"""The demo's report: `report.md`, PNG plots, and the summary table printed at the end."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from rm_service import registry
from rm_service.settings import StoreSettings
from rm_service.store import jobs
from rm_service.store.db import Store


@dataclass
class RunFacts:
    """Everything the report says, gathered while the demo runs and from the store after it."""

    settings: object
    home: Path
    labels_imported: int = 0
    lines_rejected: int = 0
    v1: object = None  # train.run.TrainResult
    calibration_file: Path | None = None
    calibration: object = None  # judge.runner.JudgeCounts of the human-labeled pairs
    judge_queue: object = None  # judge.runner.JudgeCounts of the policy samples
    ppo: object = None  # policy_trainer.trainer.Summary
    server_exit_code: int | None = None
    stage_seconds: dict[str, float] = field(default_factory=dict)
    total_seconds: float = 0.0
    models: list = field(default_factory=list)  # registry.ModelRecord, oldest first
    jobs: list = field(default_factory=list)  # store.jobs.Job, oldest first
    stats: dict = field(default_factory=dict)
    agreement: object = None  # judge.agreement.AgreementReport against HUMAN and IMPORT (HH-RLHF) labels
    plots: list[Path] = field(default_factory=list)

    def read_store(self, path: Path) -> None:
        store = Store(StoreSettings(path=path), read_only=True)
        try:
            self.models = sorted(registry.list_models(store), key=lambda m: int(m.version[1:]))
            self.jobs = list(reversed(jobs.list_jobs(store)))
            self.stats = store.stats()
            self.agreement = store.judge_agreement(reference=("HUMAN", "IMPORT"))  # HH-RLHF labels are people's, imported
        finally:
            store.close()

    # -- figures the report and the terminal share ---------------------------------------

    @property
    def steps(self) -> list[dict]:
        return self.ppo.metrics if self.ppo else []

    @property
    def promoted_during_run(self) -> list[str]:
        return [m.version for m in self.models if m.version != "v1" and m.status in ("promoted", "retired")]

    def reward_rise(self) -> tuple[float, float]:
        """Held-out prompts: mean served reward of the initial and the trained policy (same version)."""
        if not self.ppo or not self.ppo.eval_before or not self.ppo.eval_after:
            return math.nan, math.nan
        return self.ppo.eval_before["reward_mean"], self.ppo.eval_after["reward_mean"]

    def summary_rows(self) -> list[tuple[str, str]]:
        before, after = self.reward_rise()
        kl = [m["kl/ref_seq"] for m in self.steps]
        switches = self.ppo.switches if self.ppo else []
        by_source = self.stats.get("labels_by_source", {})
        rows = [("human labels imported", f"{self.labels_imported:,}")]
        for m in self.models:
            acc = m.metrics.get("accuracy", math.nan)
            base = m.metrics.get("baseline_accuracy")
            extra = f"; {m.parent} on the same pairs {base:.4f}" if base is not None else ""
            rows.append((f"reward model {m.version} ({m.status})", f"held-out accuracy {acc:.4f} on {int(m.metrics.get('heldout_pairs', 0))} pairs{extra}"))
        rows.append(("held-out prompts: mean reward before -> after PPO", f"{before:+.3f} -> {after:+.3f} ({after - before:+.3f})"))
        if kl:
            rows.append(("KL to the reference per sequence (max, last step)", f"{max(kl):.3f}, {kl[-1]:.3f} nats"))
        rows.append(("reward-model switches during PPO", ", ".join(f"{w['from_version']} -> {w['to_version']} at step {w['step']}" for w in switches) or "none"))
        rows.append(("labels by source", ", ".join(f"{k} {v:,}" for k, v in sorted(by_source.items()))))
        a = self.agreement
        if a is not None and a.shared_pairs:
            rows.append(("judge vs people: agreement, Cohen's kappa", f"{a.agreement:.3f}, {a.kappa:.3f} on {a.shared_pairs} shared pairs"))
        if a is not None and a.swapped_pairs:
            rows.append(("judge position-bias rate", f"{a.position_bias_rate:.3f} ({a.position_flips} of {a.swapped_pairs} "
                         "pair verdicts flip with order)"))
        if self.ppo and self.ppo.seconds_per_phase:
            p = self.ppo.seconds_per_phase
            rows.append(("seconds per PPO step (generate / score / train)",
                         f"{p.get('step', math.nan):.1f} ({p.get('generate', math.nan):.1f} / {p.get('score', math.nan):.1f} / {p.get('train', math.nan):.1f})"))
        rows.append(("total demo time", f"{self.total_seconds:.0f} s"))
        return rows

    def summary_table(self) -> str:
        return "\n".join(["| result | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in self.summary_rows()])


SMOOTHING = 5  # steps in the trailing mean drawn over the per-step reward


def trailing_mean(values: list[float], window: int) -> list[float]:
    """Mean of each value and the up to `window - 1` values before it."""
    return [sum(values[max(0, i + 1 - window): i + 1]) / (i + 1 - max(0, i + 1 - window)) for i in range(len(values))]


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
        line, = ax_r.plot(xs, rewards, marker="o", alpha=0.5, label=f"reward ({version})")
        ax_r.plot(xs, trailing_mean(rewards, SMOOTHING), color=line.get_color(), linewidth=2.5)
        ax_kl.plot(xs, [m["kl/ref_seq"] for m in steps if m["rm/version"] == version], marker="o", label=f"KL ({version})")
    for w in facts.ppo.switches if facts.ppo else []:
        for ax in (ax_r, ax_kl):
            ax.axvline(w["step"] - 0.5, color="grey", linestyle="--")
        ax_r.annotate(f"{w['from_version']} -> {w['to_version']}", (w["step"] - 0.5, ax_r.get_ylim()[1]), fontsize=8, ha="right", va="top")
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
    """Held-out accuracy per reward-model version."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    names = [f"{m.version}\n({m.status})" for m in facts.models]
    values = [m.metrics.get("accuracy", math.nan) for m in facts.models]
    ax.bar(names, values, color="tab:blue")
    ax.axhline(0.5, color="grey", linestyle=":", label="chance")
    for i, v in enumerate(values):
        ax.text(i, v + 0.01, f"{v:.3f}", ha="center", fontsize=9)
    ax.set_ylim(0, 1)
    ax.set_ylabel("held-out pairwise accuracy")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _version_row(m) -> str:
    base = m.metrics.get("baseline_accuracy")
    return (f"| {m.version} | {m.status} | {m.parent or ''} | {m.metrics.get('accuracy', math.nan):.4f} | "
            f"{int(m.metrics.get('heldout_pairs', 0))} | {'' if base is None else f'{base:.4f}'} | {m.snapshot_id} |")


def write_report(facts: RunFacts) -> Path:
    """`report.md` and the plots in the demo's home; returns the report's path."""
    home = facts.home
    if facts.steps:
        facts.plots.append(plot_reward_kl(facts, home / "reward_kl.png"))
    if facts.models:
        facts.plots.append(plot_accuracy(facts, home / "accuracy.png"))
    s = facts.settings
    lines = [
        "# rm-service demo report", "",
        f"Reward model on `{s.rm_backbone}` ({s.rm_mode} mode), policy `{s.policy}`, judge `{s.judge_model}`; "
        f"profile `{s.profile}`; {s.ppo_steps} PPO steps of {s.prompts_per_step} prompts x {s.samples_per_prompt} samples "
        f"x {s.max_new_tokens} new tokens.", "",
        "## Summary", "", facts.summary_table(), "",
        "![reward and KL per step](reward_kl.png)", "", "![accuracy per version](accuracy.png)", "",
        "## Stages", "", "| stage | seconds |", "|---|---:|",
        *[f"| {name} | {sec:.1f} |" for name, sec in facts.stage_seconds.items()], "",
        "## PPO steps", "",
        "| step | RM version | mean reward | KL/seq | entropy | clip frac | response len | generate s | score s | train s |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        *[f"| {m['step']} | {m['rm/version']} | {m['reward/served_mean']:+.3f} | {m['kl/ref_seq']:.3f} | "
          f"{m.get('policy/entropy', math.nan):.3f} | {m.get('policy/clipfrac', math.nan):.3f} | {m['response/length_mean']:.1f} | "
          f"{m['time/generate_s']:.1f} | {m['time/score_s']:.1f} | {m['time/train_s']:.1f} |" for m in facts.steps], "",
        "Rewards are normalised with each version's statistics, so values before and after a switch are on different "
        "scales; the held-out comparison in the summary scores both policies with the final version.", "",
        "## Reward-model versions", "", "| version | status | parent | held-out accuracy | pairs | same pairs, parent | snapshot |",
        "|---|---|---|---:|---:|---:|---|",
*[_version_row(m) for m in facts.models], "",
        "## Retraining jobs", "", "| job | state | version | promoted | seconds |", "|---|---|---|---|---:|",
        *[f"| {j.job_id} | {j.state} | {j.model_version or ''} | {j.promoted} | "
          f"{(j.finished_at - j.created_at) if j.finished_at else math.nan:.1f} |" for j in facts.jobs], "",
        "## Labels", "", "| source | labels |", "|---|---:|",
        *[f"| {k} | {v:,} |" for k, v in sorted(facts.stats.get("labels_by_source", {}).items())], "",
    ]
    if facts.agreement is not None:
        from rm_service.judge.agreement import format_report

        lines += ["## The judge", "", "Against the people's labels (HH-RLHF, imported) on the pairs both labeled:", "",
                  format_report(facts.agreement, reference="HUMAN+IMPORT"), ""]
    if facts.calibration is not None:
        lines += [f"Calibration run on held-out human-labeled pairs: {facts.calibration.summary()}.", ""]
    if facts.judge_queue is not None:
        lines += [f"Policy samples from the labeling queue: {facts.judge_queue.summary()}.", ""]
    lines += ["## Files", "", f"- store: `{home / 'rm.duckdb'}`", f"- registry: `{home / 'registry'}`",
              f"- PPO run (metrics.jsonl, TensorBoard, checkpoints): `{facts.ppo.run_dir if facts.ppo else ''}`",
              f"- server log: `{home / 'server.log'}`", ""]
    path = home / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
