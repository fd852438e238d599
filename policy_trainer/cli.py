"""`policy-trainer` command line.

    policy-trainer ppo --prompts-file prompts.jsonl --reward-addresses 127.0.0.1:50051 --total-steps 20
    policy-trainer ppo --config run.yaml --kl-coef 0.1        # flags override the file
    policy-trainer ppo --config run.yaml --resume             # continue the run in run_dir

Every PPOSettings field is a flag (`--field-name`, booleans also `--no-field-name`; `none`
sets an optional field to None) and an environment variable (`PPO_FIELD_NAME`). Bad input
(settings, config file, prompts) prints one line and exits 2; a run that fails (the reward
server unreachable, a score that failed after its retries) prints one line and exits 1.
"""

from __future__ import annotations

import argparse
from rm_service.logs import configure_logging
import sys
import typing

from pydantic import ValidationError

from policy_trainer.settings import PPOSettings

NONE_WORDS = ("none", "null")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_settings_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per PPOSettings field; values stay strings for pydantic to validate."""
    for name, field in PPOSettings.model_fields.items():
        help_text = (field.description or "").replace("%", "%%")
        if field.annotation is bool:
            parser.add_argument(_flag(name), dest=name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
            continue
        choices = None
        if typing.get_origin(field.annotation) is typing.Literal:
            choices = list(typing.get_args(field.annotation))
        parser.add_argument(_flag(name), dest=name, default=argparse.SUPPRESS, choices=choices, metavar=name.upper() if choices is None else None,
                            help=help_text)


def _optional(name: str) -> bool:
    return type(None) in typing.get_args(PPOSettings.model_fields[name].annotation)


def settings_from_args(args: argparse.Namespace) -> PPOSettings:
    from policy_trainer.settings import load_settings

    flags = {k: v for k, v in vars(args).items() if k in PPOSettings.model_fields}
    flags = {k: (None if isinstance(v, str) and v.lower() in NONE_WORDS and _optional(k) else v) for k, v in flags.items()}
    return load_settings(args.config, **flags)


def _validation_message(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        where = ".".join(str(x) for x in e["loc"]) or "settings"
        parts.append(f"{where}: {e['msg']}")
    return "; ".join(parts)


def _print_summary(summary) -> None:
    print(f"trained {summary.steps} steps against reward model(s) {', '.join(summary.versions)}; run in {summary.run_dir}")
    if summary.eval_before and summary.eval_after:
        b, a = summary.eval_before, summary.eval_after
        print(f"held-out prompts ({a['n']} samples, reward model {a['version']}): reward {b['reward_mean']:+.4f} -> {a['reward_mean']:+.4f}, "
              f"KL to reference {a['kl_seq']:.3f} nats/sequence")
    if summary.seconds_per_phase:
        print("seconds per step: " + ", ".join(f"{k} {v:.2f}" for k, v in summary.seconds_per_phase.items()))
    for sw in summary.switches:
        print(f"switched {sw['from_version']} -> {sw['to_version']} before step {sw['step']} ({sw['reason']})")


def _fail(message: str, code: int) -> int:
    print(f"policy-trainer ppo: {message}", file=sys.stderr)
    return code


def _ppo(args) -> int:
    from rm_client import ScoreError
    from policy_trainer.trainer import PPOTrainer
    from rm_service.errors import InvalidArgument, NotFound, RMError

    try:  # bad input fails here: settings, config file, prompts, the model path
        trainer = PPOTrainer(settings_from_args(args))
    except ValidationError as err:
        return _fail(f"invalid settings: {_validation_message(err)}", 2)
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
    sub = parser.add_subparsers(dest="command", required=True)
    ppo = sub.add_parser("ppo", help="train a policy with PPO against a served reward model",
                         description="Train a policy with PPO against a served reward model. Flags override PPO_* environment "
                                     "variables, which override --config.")
    ppo.add_argument("--config", default=None, metavar="FILE", help="settings file (.yaml, .json or .toml) with PPOSettings field names as keys")
    add_settings_flags(ppo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose)
    if args.command == "ppo":
        return _ppo(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
