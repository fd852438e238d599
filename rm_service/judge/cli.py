"""The `rm-service judge` and `rm-service judge-agreement` subcommands (registered by
rm_service.cli). Every JudgeSettings field but the secrets is a flag (rm_service/settings_cli.py)
overriding its RM_JUDGE_* variable; rm_service.cli prints a bad value as one line, exit 2."""

from __future__ import annotations

from pathlib import Path

from rm_service.errors import FailedPrecondition, InvalidArgument, Unavailable
from rm_service.judge.settings import JudgeSettings
from rm_service.settings_cli import flag_values


def _judge(args) -> int:
    from rm_service.judge.runner import run_judge

    settings = JudgeSettings(**flag_values(args, JudgeSettings))
    if args.max_tasks is not None and args.max_tasks <= 0:
        raise InvalidArgument("--max-tasks", f"must be > 0, got {args.max_tasks}")
    counts = run_judge(
        settings,
        input_path=Path(args.input) if args.input else None,
        max_tasks=args.max_tasks,
        follow=args.follow,
        progress=not args.no_progress,
        progress_file=Path(args.progress_file) if args.progress_file else None,
    )
    print(counts.summary())
    return 0


def _judge_agreement(args) -> int:
    from rm_service.store.agreement import format_report, report_from_stats

    reference = tuple(s.strip().upper() for s in args.reference.split(",") if s.strip())
    if args.address:
        if reference != ("HUMAN",):
            raise InvalidArgument(
                "--reference",
                "GetStats compares with HUMAN labels only; read the store file (no --address) for other sources",
            )
        from rm_service.judge.store_client import StoreClient

        settings = JudgeSettings()  # the server's token and CA bundle (RM_JUDGE_SERVER_TOKEN, RM_JUDGE_SERVER_TLS_CA)
        token = settings.server_token.get_secret_value() if settings.server_token else None
        client = StoreClient(args.address, token, settings.rpc_timeout_s, settings.server_tls_ca)
        try:
            stats = client.stats()
        finally:
            client.close()
        report, by_source = report_from_stats(stats), dict(stats.labels_by_source)
    else:
        from rm_service.settings import StoreSettings
        from rm_service.store.db import Store

        path = StoreSettings().path
        if not path.exists():
            raise FailedPrecondition(f"no store at {path} (RM_STORE_PATH): nothing to compare")
        try:
            store = Store(StoreSettings(), read_only=True)
        except Unavailable as exc:
            raise Unavailable(f"{exc}; or read GetStats from the running server with --address HOST:PORT") from None
        try:
            report = store.judge_agreement(reference)
            by_source = store.stats()["labels_by_source"]
        finally:
            store.close()
    print("labels by source: " + (", ".join(f"{k} {v}" for k, v in sorted(by_source.items())) or "none"))
    print(format_report(report, reference="+".join(reference)))
    if report.shared_pairs == 0:
        print(f"no completion pairs are labeled both by a judge and by {'/'.join(reference)}: nothing to compare yet")
    return 0


def add_judge_commands(sub) -> None:
    s = sub.add_parser(
        "judge",
        help="label queued tasks (or a JSONL file) with an LLM judge (both orders of every pair) or a reward model",
        description="Label queued tasks (or a JSONL file) with an LLM judge, both orders of every pair, or with a "
        "reward model (docs/judge.md).",
    )
    s.add_argument(
        "--input",
        metavar="<FILE>",
        help="JSONL of items ({prompt, completions} or HH pairs) instead of the labeling queue",
    )
    s.add_argument("--max-tasks", type=int, metavar="<N>", help="stop after this many items")
    s.add_argument("--follow", action="store_true", help="keep polling an empty queue (until Ctrl-C)")
    s.add_argument(
        "--progress-file",
        metavar="<FILE>",
        help="with --input: where finished item keys go (default under $RM_HOME/judge/); a rerun skips them",
    )
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    # the API key and the server token stay off the command line: RM_JUDGE_API_KEY, RM_JUDGE_SERVER_TOKEN
    s.settings_flags(
        JudgeSettings,
        exclude=["api_key", "server_token"],
        aliases={"server": ["--address"], "template_file": ["--template"]},
    )
    s.set_defaults(func=_judge)

    s = sub.add_parser(
        "judge-agreement", help="judge vs human labels: agreement, Cohen's kappa, position bias, length bias"
    )
    s.add_argument(
        "--reference",
        default="HUMAN",
        help="comma-separated label sources to compare with (default HUMAN; add IMPORT for imported human datasets "
        "such as HH-RLHF)",
    )
    s.add_argument(
        "--address",
        help="read GetStats from a running server instead of the store file (its token and CA: RM_JUDGE_SERVER_TOKEN, "
        "RM_JUDGE_SERVER_TLS_CA)",
    )
    s.set_defaults(func=_judge_agreement)
