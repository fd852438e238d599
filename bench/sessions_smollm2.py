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
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ppo_harness import base_overrides, phase_line, run


def table(settings, summary, metrics: list[dict]) -> str:
    max_turns = settings.max_turns
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
    lines += ["", phase_line(summary)]
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

    def settings_for(address: str):
        overrides = base_overrides(address, args.steps, args.run_dir)
        overrides.update(max_turns=args.max_turns, user_simulator=args.users)
        return load_settings(args.config, SessionSettings, **overrides)

    def describe(s, address: str) -> str:
        return (
            f"policy {s.policy}; {s.prompts_per_step} openings x {s.samples_per_prompt} sessions x <= {s.max_turns} "
            f"turns x {s.max_new_tokens} new tokens; users {s.user_simulator}; estimator {s.advantage_estimator}; "
            f"lr {s.learning_rate}; kl_coef {s.kl_coef}; server {address}"
        )

    def progress(m: dict) -> str:
        return (
            f"step {m['step']:3d}  reward/turn {m['reward/served_mean']:+.3f}  "
            f"session {m['session/value_mean']:+.3f}  turns {m['session/turns_mean']:.2f}  "
            f"KL {m['kl/ref_seq']:.3f}  step {m['time/step_s']:.1f}s"
        )

    return run(args.model, settings_for, describe, train_sessions, progress, table)


if __name__ == "__main__":
    raise SystemExit(main())
