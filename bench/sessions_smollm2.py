"""Multi-turn PPO with SmolLM2-135M-Instruct against a reward model served by `rm-service serve`.

    RM_HOME=/tmp/sessions-home .venv/bin/python bench/sessions_smollm2.py --steps 4 --max-turns 3

Needs a promoted reward model in $RM_HOME (as bench/ppo_smollm2.py). Starts the server as its
own process on a free port and plays sessions from real HH first user turns: the policy writes
every assistant turn, the recorded user turns are replayed (`--users replay`, static context)
or the served user model writes them (`--users served`, needs a user model in the server).
Prints per step the served reward of each turn, the session value, the KL to the reference per
session and the seconds per phase, then the held-out sessions of the reference (the policy
before training) and of the trained policy, with the same random draws. The table is also
written to <run_dir>/bench.md. Other SessionSettings come from --config and PPO_* variables.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ppo_smollm2 import start_server

from rm_service.data import HH_PAIRS


def table(summary, metrics: list[dict], max_turns: int) -> str:
    turns = [f"turn {k} reward" for k in range(1, max_turns + 1)]
    lines = [
        "| step | "
        + " | ".join(turns)
        + " | session value | turns/session | KL/session | generate s | score s | train s |",
        "|---:|" + "---:|" * (len(turns) + 6),
    ]
    for m in metrics:
        per_turn = " | ".join(f"{m.get(f'reward/turn{k}_mean', float('nan')):+.3f}" for k in range(1, max_turns + 1))
        lines.append(
            f"| {m['step']} | {per_turn} | {m['session/value_mean']:+.3f} | {m['session/turns_mean']:.2f} | "
            f"{m['kl/ref_seq']:.3f} | {m['time/generate_s']:.1f} | {m['time/score_s']:.1f} | {m['time/train_s']:.1f} |"
        )
    p = summary.seconds_per_phase
    lines += ["", f"mean seconds per step: generate {p['generate']:.1f}, score {p['score']:.1f}, "
              f"train {p['train']:.1f}, total {p['step']:.1f}"]  # fmt: skip
    if summary.eval_before and summary.eval_after:
        b, a = summary.eval_before, summary.eval_after
        lines += [
            "",
            f"held-out sessions ({a['n']}, reward model {a['version']}, same random draws):",
            "",
            "| policy | reward per turn | session value | turns/session | KL to reference per session |",
            "|---|---:|---:|---:|---:|",
            f"| before (reference) | {b['reward_mean']:+.4f} | {b['session_value_mean']:+.4f} | "
            f"{b['turns_mean']:.2f} | 0 |",
            f"| after {summary.steps} steps | {a['reward_mean']:+.4f} | {a['session_value_mean']:+.4f} | "
            f"{a['turns_mean']:.2f} | {a['kl_seq']:.3f} |",
        ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--max-turns", type=int, default=3)
    parser.add_argument("--users", choices=["replay", "served"], default="replay")
    parser.add_argument("--model", default=None, help="served reward-model version (default: the promoted one)")
    parser.add_argument("--config", default=None, help="SessionSettings file; flags below override it")
    parser.add_argument("--run-dir", default=None)
    args = parser.parse_args()

    from policy_trainer.multiturn import train_sessions
    from policy_trainer.session_settings import SessionSettings
    from policy_trainer.settings import load_settings

    proc, address = start_server(args.model)
    try:
        overrides = {
            "total_steps": args.steps,
            "max_turns": args.max_turns,
            "user_simulator": args.users,
            "reward_addresses": [address],
            "progress": False,
        }
        if "PPO_PROMPTS_FILE" not in os.environ and "PPO_PROMPTS_STORE" not in os.environ:
            overrides["prompts_file"] = HH_PAIRS
        if args.run_dir:
            overrides["run_dir"] = args.run_dir
        settings = load_settings(args.config, SessionSettings, **overrides)
        print(
            f"policy {settings.policy}; {settings.prompts_per_step} openings x {settings.samples_per_prompt} "
            f"sessions x <= {settings.max_turns} turns x {settings.max_new_tokens} new tokens; "
            f"users {settings.user_simulator}; "
            f"estimator {settings.advantage_estimator}; lr {settings.learning_rate}; kl_coef {settings.kl_coef}; "
            f"server {address}",
            flush=True,
        )
        metrics: list[dict] = []

        def on_step(m: dict) -> None:
            metrics.append(m)
            print(
                f"step {m['step']:3d}  reward/turn {m['reward/served_mean']:+.3f}  "
                f"session {m['session/value_mean']:+.3f}  turns {m['session/turns_mean']:.2f}  "
                f"KL {m['kl/ref_seq']:.3f}  step {m['time/step_s']:.1f}s",
                flush=True,
            )

        summary = train_sessions(settings, on_step=on_step)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    text = table(summary, metrics, settings.max_turns)
    print(text)
    (Path(summary.run_dir) / "bench.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
