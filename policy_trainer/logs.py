"""What a run writes: metrics.jsonl (one line per step), events.jsonl (version switches,
retraining requests, candidate submissions, evaluations), TensorBoard event files, a
progress bar, and PNG plots of reward and KL at the end with version switches marked."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

log = logging.getLogger("policy_trainer")

BAR_KEYS = {"reward/served_mean": "reward", "kl/ref_seq": "kl", "rm/version": "rm"}


class RunLogger:
    def __init__(self, run_dir: Path, total_steps: int, start_step: int, tensorboard: bool, progress: bool):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.events_path = self.run_dir / "events.jsonl"
        for path in (self.metrics_path, self.events_path):  # a fresh run starts fresh files; a resumed one keeps
            keep = (
                [r for r in read_jsonl(path) if r["step"] <= start_step] if start_step else []
            )  # what its checkpoint saw
            path.write_text("".join(json.dumps(r) + "\n" for r in keep), encoding="utf-8")
        self.tb = None
        if tensorboard:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(str(self.run_dir / "tb"), purge_step=start_step or None)
        self.bar = None
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="ppo", unit="step")

    def step(self, metrics: dict) -> None:
        with self.metrics_path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(metrics) + "\n")
        step = metrics["step"]
        if self.tb is not None:
            for key, value in metrics.items():
                if (
                    isinstance(value, (int, float))
                    and not isinstance(value, bool)
                    and math.isfinite(value)
                    and key != "step"
                ):
                    self.tb.add_scalar(key, value, step)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix({short: _fmt(metrics.get(key)) for key, short in BAR_KEYS.items()}, refresh=False)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        """Scalars outside a step's metrics line (an evaluation at step 0 or after the last step): TensorBoard only."""
        if self.tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self.tb.add_scalar(key, value, step)

    def event(self, kind: str, step: int, **fields) -> None:
        record = {"event": kind, "step": step, "time": time.time(), **fields}
        with self.events_path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            self.tb.add_text(f"events/{kind}", json.dumps(fields), step)
        message = f"step {step}: {kind} " + " ".join(f"{k}={v}" for k, v in fields.items())
        if self.bar is not None:
            self.bar.write(message)
        log.info(message)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()


def _fmt(value) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def plot(run_dir: Path) -> list[Path]:
    """reward.png and kl.png from metrics.jsonl; dashed lines where the reward model switched."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    if not metrics:
        return []
    switches = [
        (e["step"], e["to_version"]) for e in read_jsonl(run_dir / "events.jsonl") if e["event"] == "version_switch"
    ]
    steps = [m["step"] for m in metrics]
    panels = {
        "reward.png": (
            "served reward (mean over the batch)",
            [("reward/served_mean", "mean"), ("reward/served_std", "std")],
        ),
        "kl.png": ("KL to the reference (nats per sequence)", [("kl/ref_seq", "KL"), ("kl/coef", "kl_coef")]),
    }
    written = []
    for name, (title, series) in panels.items():
        fig, ax = plt.subplots(figsize=(7, 4))
        for key, label in series:
            ax.plot(steps, [m.get(key, float("nan")) for m in metrics], marker="o", markersize=3, label=label)
        for step, version in switches:
            ax.axvline(step, color="grey", linestyle="--", linewidth=1)
            ax.annotate(
                f"-> {version}",
                (step, 1),
                xycoords=("data", "axes fraction"),
                rotation=90,
                va="top",
                ha="right",
                fontsize=8,
            )
        ax.set_xlabel("PPO step")
        ax.set_title(title)
        ax.legend()
        fig.tight_layout()
        fig.savefig(run_dir / name, dpi=100)
        plt.close(fig)
        written.append(run_dir / name)
    return written
