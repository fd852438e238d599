"""`policy-trainer` command line.

    policy-trainer ppo --prompts-file prompts.jsonl --reward-addresses 127.0.0.1:50051 --total-steps 20
    policy-trainer ppo --config run.yaml --kl-coef 0.1        # flags override the file
    policy-trainer ppo --config run.yaml --resume             # continue the run in run_dir

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

from policy_trainer.settings import PPOSettings
from rm_service.logs import configure_logging
from rm_service.settings_cli import CommandParser, add_settings_flags, add_version_flag, flag_values, validation_message


def settings_from_args(args: argparse.Namespace) -> PPOSettings:
    from policy_trainer.settings import load_settings

    return load_settings(args.config, **flag_values(args, PPOSettings))


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
    if summary.seconds_per_phase:
        print("seconds per step: " + ", ".join(f"{k} {v:.2f}" for k, v in summary.seconds_per_phase.items()))
    for sw in summary.switches:
        print(f"switched {sw['from_version']} -> {sw['to_version']} before step {sw['step']} ({sw['reason']})")


def _fail(message: str, code: int) -> int:
    print(f"policy-trainer ppo: {message}", file=sys.stderr)
    return code


def _ppo(args) -> int:
    from policy_trainer.trainer import PPOTrainer
    from rm_client import ScoreError
    from rm_service.errors import InvalidArgument, NotFound, RMError

    try:  # bad input fails here: settings, config file, prompts, the model path
        trainer = PPOTrainer(settings_from_args(args))
    except ValidationError as err:
        return _fail(validation_message(err), 2)
    except (ValueError, FileNotFoundError, InvalidArgument, NotFound) as err:
        return _fail(str(err), 2)
    except (ScoreError, RMError) as err:  # no reward server answers
        return _fail(str(err), 1)
    try:
        summary = trainer.train()
    except (ScoreError, RMError) as err:  # a score failed after its retries
        return _fail(str(err), 1)
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose)
    if args.command == "ppo":
        return _ppo(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
