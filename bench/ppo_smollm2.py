"""PPO acceptance run: SmolLM2-135M-Instruct against a reward model served by `rm-service serve`.

    RM_HOME=/tmp/ppo-home .venv/bin/python bench/ppo_smollm2.py --steps 20

Needs a promoted reward model in $RM_HOME (e.g. `rm-service import --format hh ...` then
`rm-service train --backbone minilm-l6 --max-tokens 384`). Starts the server as its own
process on a free port, trains for --steps steps (other PPOSettings from --config and PPO_*
variables), and prints one table: per step the served reward, the KL to the reference and the
seconds per phase, then the held-out prompts' mean reward under the reference (the policy
before training) and the trained policy, sampled with the same random draws and scored by
the same reward-model version. The table is also written to <run_dir>/bench.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ppo_harness import base_overrides, phase_line, run


def table(settings, summary, metrics: list[dict]) -> str:
    lines = [
        "| step | served reward (mean) | KL to reference (nats/seq) | kl_coef | entropy | clip frac | response "
        "tokens | generate s | score s | train s | step s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for m in metrics:
        lines.append(
            f"| {m['step']} | {m['reward/served_mean']:+.3f} | {m['kl/ref_seq']:.3f} | {m['kl/coef']:.3f} | "
            f"{m['policy/entropy']:.2f} | {m['policy/clipfrac']:.3f} | {m['response/length_mean']:.1f} | "
            f"{m['time/generate_s']:.1f} | {m['time/score_s']:.1f} | {m['time/train_s']:.1f} | "
            f"{m['time/step_s']:.1f} |"
        )
    lines += ["", phase_line(summary)]
    if summary.eval_before and summary.eval_after:
        b, a = summary.eval_before, summary.eval_after
        lines += [
            "",
            f"held-out prompts ({a['n']} samples, reward model {a['version']}, same random draws):",
            "",
            "| policy | mean served reward | std | KL to reference | response tokens | ended with EOS |",
            "|---|---:|---:|---:|---:|---:|",
            f"| before (reference) | {b['reward_mean']:+.4f} | {b['reward_std']:.3f} | 0 | {b['length_mean']:.1f} | "
            f"{b['ended_fraction']:.2f} |",
            f"| after {summary.steps} steps | {a['reward_mean']:+.4f} | {a['reward_std']:.3f} | {a['kl_seq']:.3f} | "
            f"{a['length_mean']:.1f} | {a['ended_fraction']:.2f} |",
        ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--model", default=None, help="served version (default: the promoted one)")
    parser.add_argument("--config", default=None, help="PPOSettings file; flags below override it")
    parser.add_argument("--run-dir", default=None)
    args = parser.parse_args()

    from policy_trainer.settings import load_settings
    from policy_trainer.trainer import train_ppo

    def settings_for(address: str):
        return load_settings(args.config, **base_overrides(address, args.steps, args.run_dir))

    def describe(s, address: str) -> str:
        return (
            f"policy {s.policy}; {s.prompts_per_step} prompts x {s.samples_per_prompt} samples x {s.max_new_tokens} "
            f"new tokens; lr {s.learning_rate}; kl_coef {s.kl_coef}; server {address}"
        )

    def progress(m: dict) -> str:
        return (
            f"step {m['step']:3d}  reward {m['reward/served_mean']:+.3f}  KL {m['kl/ref_seq']:.3f}  "
            f"generate {m['time/generate_s']:.1f}s score {m['time/score_s']:.1f}s train {m['time/train_s']:.1f}s"
        )

    return run(args.model, settings_for, describe, train_ppo, progress, table)


if __name__ == "__main__":
    raise SystemExit(main())
