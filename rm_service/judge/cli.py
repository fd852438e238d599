"""The `rm-service judge` and `rm-service judge-agreement` subcommands (registered by
rm_service.cli). Flags override RM_JUDGE_* settings; bad settings are one-line errors."""

from __future__ import annotations

from pathlib import Path

from rm_service.errors import FailedPrecondition, InvalidArgument, Unavailable


def judge_settings(**overrides):
    """JudgeSettings from the environment and the given (non-None) overrides; a validation
    error becomes InvalidArgument naming the setting."""
    from pydantic import ValidationError

    from rm_service.judge.settings import JudgeSettings

    try:
        return JudgeSettings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'settings'}: {e['msg']}" for e in exc.errors())
        raise InvalidArgument("judge settings (flags or RM_JUDGE_*)", problems) from None


def _judge(args) -> int:
    from rm_service.judge.runner import run_judge

    settings = judge_settings(
        backend=args.backend, model=args.model, decision=args.decision, inconsistent=args.inconsistent, kway=args.kway,
        template_file=args.template, base_url=args.base_url, concurrency=args.concurrency, lease_seconds=args.lease_seconds,
        server=args.address, rm_tie_margin=args.rm_tie_margin,
    )
    if args.max_tasks is not None and args.max_tasks <= 0:
        raise InvalidArgument("--max-tasks", f"must be > 0, got {args.max_tasks}")
    counts = run_judge(settings, input_path=Path(args.input) if args.input else None, max_tasks=args.max_tasks, follow=args.follow,
                       progress=not args.no_progress, progress_file=Path(args.progress_file) if args.progress_file else None)
    print(counts.summary())
    return 0


def _judge_agreement(args) -> int:
    from rm_service.store.agreement import format_report, report_from_stats

    reference = tuple(s.strip().upper() for s in args.reference.split(",") if s.strip())
    if args.address:
        if reference != ("HUMAN",):
            raise InvalidArgument("--reference", "GetStats compares with HUMAN labels only; read the store file (no --address) for other sources")
        from rm_service.judge.settings import JudgeSettings
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
    s = sub.add_parser("judge", help="label queued tasks (or a JSONL file) with an LLM judge (both orders of every pair) or a reward model")
    s.add_argument("--input", help="JSONL of items ({prompt, completions} or HH pairs) instead of the labeling queue")
    s.add_argument("--address", help="rm-service server for LeaseTasks/IngestLabels (default 127.0.0.1:50051; env RM_JUDGE_SERVER)")
    s.add_argument("--backend", choices=["local", "http", "rm"],
                   help="local: HF model in process (default); http: OpenAI-compatible endpoint; rm: a reward model scores each response")
    s.add_argument("--model", help="judge model (bundled name, HF directory, or served name; comma-separated models vote); "
                                   "with --backend rm a registry version or a reward checkpoint")
    s.add_argument("--rm-tie-margin", type=float, help="rm: rewards within this of each other tie (default 0)")
    s.add_argument("--base-url", help="http: base URL, e.g. http://127.0.0.1:8000/v1 (env RM_JUDGE_BASE_URL; key: RM_JUDGE_API_KEY)")
    s.add_argument("--decision", choices=["choice", "generate"], help="choice: compare the verdict letters' log-probabilities (default); generate: parse a written [[A]]/[[B]]/[[C]]")
    s.add_argument("--inconsistent", choices=["calibrate", "tie", "skip"], help="verdicts that change with the order: calibrate (default), tie or skip")
    s.add_argument("--kway", choices=["tournament", "direct"], help="K > 2 responses: every pair (default) or one ranking per order (generate only)")
    s.add_argument("--template", help="TOML prompt template replacing the built-in one of its kind")
    s.add_argument("--concurrency", type=int, help="judge calls in flight (default 4)")
    s.add_argument("--lease-seconds", type=int, help="lease length (default 600); unlabeled tasks return to the queue after it")
    s.add_argument("--max-tasks", type=int, help="stop after this many items")
    s.add_argument("--follow", action="store_true", help="keep polling an empty queue (until Ctrl-C)")
    s.add_argument("--progress-file", help="with --input: where finished item keys go (default under $RM_HOME/judge/); a rerun skips them")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.set_defaults(func=_judge)

    s = sub.add_parser("judge-agreement", help="judge vs human labels: agreement, Cohen's kappa, position bias, length bias")
    s.add_argument("--reference", default="HUMAN", help="comma-separated label sources to compare with (default HUMAN; add IMPORT for imported human datasets such as HH-RLHF)")
    s.add_argument("--address", help="read GetStats from a running server instead of the store file")
    s.set_defaults(func=_judge_agreement)

