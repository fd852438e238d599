"""`policy-trainer` command line.

PPO against the served reward is the policy-trainer issue's work; until it lands, `ppo`
says so and exits non-zero rather than pretending to train.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="policy-trainer", description="PPO client for rm-service.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("ppo", help="train a policy with PPO against a served reward model (not built yet)")
    args = parser.parse_args(argv)
    if args.command == "ppo":
        print("policy-trainer ppo: not implemented yet (the policy-trainer issue builds it)", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
