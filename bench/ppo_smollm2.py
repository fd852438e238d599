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
import os
import signal
import subprocess
import tempfile
from pathlib import Path

from rm_service.data import HH_PAIRS

REPO = Path(__file__).resolve().parent.parent
DATA = HH_PAIRS


def start_server(model: str | None) -> tuple[subprocess.Popen, str]:
    from rm_service.client import start_server_process
    from rm_service.errors import RMError

    run_dir = Path(tempfile.mkdtemp(prefix="ppo-bench-"))
    args = ["--metrics-port", "-1", *(["--model", model] if model else [])]
    try:
        return start_server_process(dict(os.environ), run_dir, timeout=600, args=args)
    except RMError as exc:
        raise SystemExit(f"the reward server did not start: {exc}") from None


def table(summary, metrics: list[dict]) -> str:
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
    p = summary.seconds_per_phase
    lines += [
        "",
        f"mean seconds per step: generate {p['generate']:.1f}, score {p['score']:.1f}, train {p['train']:.1f}, total "
        f"{p['step']:.1f}",
    ]
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

    proc, address = start_server(args.model)
    try:
        overrides = {"total_steps": args.steps, "reward_addresses": [address], "progress": False}
        if "PPO_PROMPTS_FILE" not in os.environ and "PPO_PROMPTS_STORE" not in os.environ:
            overrides["prompts_file"] = DATA
        if args.run_dir:
            overrides["run_dir"] = args.run_dir
        settings = load_settings(args.config, **overrides)
        print(
            f"policy {settings.policy}; {settings.prompts_per_step} prompts x {settings.samples_per_prompt} samples "
            f"x {settings.max_new_tokens} new tokens; lr {settings.learning_rate}; kl_coef {settings.kl_coef}; "
            f"server {address}",
            flush=True,
        )
        metrics: list[dict] = []

        def on_step(m: dict) -> None:
            metrics.append(m)
            print(
                f"step {m['step']:3d}  reward {m['reward/served_mean']:+.3f}  KL {m['kl/ref_seq']:.3f}  "
                f"generate {m['time/generate_s']:.1f}s score {m['time/score_s']:.1f}s train {m['time/train_s']:.1f}s",
                flush=True,
            )

        summary = train_ppo(settings, on_step=on_step)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    text = table(summary, metrics)
    print(text)
    (Path(summary.run_dir) / "bench.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
