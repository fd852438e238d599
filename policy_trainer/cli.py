"""`policy-trainer` command line.

    policy-trainer ppo --prompts-file prompts.jsonl --reward-addresses 127.0.0.1:50051 --total-steps 20
    policy-trainer ppo --config run.yaml --kl-coef 0.1        # flags override the file
    policy-trainer ppo --config run.yaml --resume             # continue the run in run_dir
    policy-trainer sessions --prompts-file hh.jsonl --reward-addresses 127.0.0.1:50051 --max-turns 3
                                                              # multi-turn PPO over whole conversations

Every PPOSettings field is a flag (`--field-name`, booleans also `--no-field-name`; `none`
sets an optional field to None) and an environment variable (`PPO_FIELD_NAME`), both shown in
`policy-trainer ppo --help` with the default (flags built by rm_service/settings_cli.py). Bad input
(settings, config file, prompts) prints one line and exits 2; a run that fails (the reward
server unreachable, a score that failed after its retries) prints one line and exits 1.
"""

from __future__ import annotations

import argparse
import sys

from pydantic import ValidationError

from policy_trainer.session_settings import SessionSettings
from policy_trainer.settings import PPOSettings
from rm_service.logs import configure_logging
from rm_service.settings_cli import CommandParser, add_settings_flags, add_version_flag, flag_values, validation_message


def settings_from_args(args: argparse.Namespace) -> PPOSettings:
    from policy_trainer.settings import load_settings

    cls = SessionSettings if args.command == "sessions" else PPOSettings
    return load_settings(args.config, cls, **flag_values(args, cls))


def _print_summary(summary) -> None:
    print(
        f"trained {summary.steps} steps against reward model(s) {', '.join(summary.versions)}; run in {summary.run_dir}"
    )
    if summary.eval_before and summary.eval_after:
        b, a = summary.eval_before, summary.eval_after
        print(
            f"held-out prompts ({a['n']} samples, reward model {a['version']}): reward {b['reward_mean']:+.4f} -> "
            f"{a['reward_mean']:+.4f}, KL to reference {a['kl_seq']:.3f} nats/sequence"
        )
        if "session_value_mean" in a:  # sessions: the reward above is per assistant turn, the KL per session
            print(
                f"held-out sessions: value {b['session_value_mean']:+.4f} -> {a['session_value_mean']:+.4f}, "
                f"assistant turns per session {b['turns_mean']:.2f} -> {a['turns_mean']:.2f}"
            )
        if "heldout_users_reward_mean" in a:  # the same openings against the held-out user model
            print(
                f"against the held-out user model: reward {b['heldout_users_reward_mean']:+.4f} -> "
                f"{a['heldout_users_reward_mean']:+.4f}; training simulator minus held-out "
                f"{a['simulator_gap_reward_mean']:+.4f} (before {b['simulator_gap_reward_mean']:+.4f})"
            )
    if summary.seconds_per_phase:
        print("seconds per step: " + ", ".join(f"{k} {v:.2f}" for k, v in summary.seconds_per_phase.items()))
    for sw in summary.switches:
        print(f"switched {sw['from_version']} -> {sw['to_version']} before step {sw['step']} ({sw['reason']})")


def _ppo(args) -> int:
    from rm_client import ScoreError
    from rm_service.errors import InvalidArgument, NotFound, RMError

    def fail(message: str, code: int) -> int:
        print(f"policy-trainer {args.command}: {message}", file=sys.stderr)
        return code

    try:  # bad input fails here: settings, config file, prompts, the model path
        settings = settings_from_args(args)  # a bad flag or PPO_* value is refused before torch is imported
        from policy_trainer.trainer import PPOTrainer

        trainer: PPOTrainer
        if isinstance(settings, SessionSettings):
            from policy_trainer.multiturn import SessionTrainer

            trainer = SessionTrainer(settings)
        else:
            trainer = PPOTrainer(settings)
    except ValidationError as err:
        return fail(validation_message(err), 2)
    except (ValueError, FileNotFoundError, InvalidArgument, NotFound) as err:
        return fail(str(err), 2)
    except (ScoreError, RMError) as err:  # no reward server answers
        return fail(str(err), 1)
    try:
        summary = trainer.train()
    except (ScoreError, RMError) as err:  # a score failed after its retries
        return fail(str(err), 1)
    except KeyboardInterrupt:
        return fail("interrupted", 130)
    finally:
        trainer.close()
    _print_summary(summary)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="policy-trainer", description="PPO client for rm-service.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    add_version_flag(parser)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=CommandParser)
    ppo = sub.add_parser(
        "ppo",
        help="train a policy with PPO against a served reward model",
        description="Train a policy with PPO against a served reward model. Flags override PPO_* environment "
        "variables, which override --config.",
    )
    ppo.add_argument(
        "--config",
        default=None,
        metavar="FILE",
        help="settings file (.yaml, .json or .toml) with PPOSettings field names as keys",
    )
    add_settings_flags(ppo, PPOSettings)
    sessions = sub.add_parser(
        "sessions",
        help="multi-turn PPO: play whole conversations against a user simulator, rewarded per turn and per session",
        description="Multi-turn PPO: the policy plays sessions from real first user turns against recorded (replay) "
        "or simulated (served) user turns; ScoreTurns rewards each turn and the session. Flags override PPO_* "
        "environment variables, which override --config.",
    )
    sessions.add_argument(
        "--config", default=None, metavar="FILE", help="settings file (.yaml, .json or .toml) with SessionSettings keys"
    )
    add_settings_flags(sessions, SessionSettings)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose)
    if args.command in ("ppo", "sessions"):
        return _ppo(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
