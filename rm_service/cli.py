"""`rm-service` command line. Flags override settings from the environment (RM_* variables).

Errors print one line to stderr and exit with status 2; no tracebacks for bad input.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from rm_service.logs import configure_logging
import sys
from pathlib import Path

from rm_service.errors import RMError


def _import(args) -> int:
    """Exit 0 when the file was imported (lines rejected are listed); 1 when nothing was
    stored or the import stopped part-way (it says which lines were stored); 2 on errors."""
    from rm_service.formats import import_file
    from rm_service.importers import ImportStopped
    from rm_service.records import input_file
    from rm_service.settings import StoreSettings
    from rm_service.store.db import Store

    path = input_file(Path(args.file))  # a path that is not a readable file: one line, exit 2, store untouched
    store = Store(StoreSettings())
    try:
        counts, rejected = import_file(store, path, args.format, args.annotator)
    except ImportStopped as stop:
        _import_report(args.file, stop.counts, stop.reasons, limit=None)  # every rejected line: the rest before the stop is stored
        print(f"rm-service import: {stop}", file=sys.stderr)
        return 130 if isinstance(stop.cause, KeyboardInterrupt) else 1
    finally:
        store.close()
    _import_report(args.file, counts, rejected, limit=10)
    if counts["INSERTED"] + counts["DUPLICATE"] == 0:
        why = "every record was rejected" if rejected else "it holds no records"
        print(f"rm-service import: nothing was imported from {args.file}: {why}", file=sys.stderr)
        return 1
    return 0


def _import_report(file: str, counts, rejected: list[str], limit: int | None) -> None:
    print(f"imported {file}: " + ", ".join(f"{k.lower()} {v}" for k, v in sorted(counts.items())))
    for reason in rejected[:limit]:
        print(f"  rejected: {reason}")
    if limit is not None and len(rejected) > limit:
        print(f"  ... and {len(rejected) - limit} more")


def _export(args) -> int:
    from rm_service.formats import export_file
    from rm_service.settings import StoreSettings
    from rm_service.store.db import Store

    store = Store(StoreSettings())
    try:
        n, snapshot = export_file(store, Path(args.out), args.format, args.snapshot)
    finally:
        store.close()
    unit = "labels" if args.format in ("ranking", "parquet") else "pairs"
    print(f"exported {n} {unit} of snapshot {snapshot} to {args.out} ({args.format})")
    return 0


def _train(args) -> int:
    from rm_service.settings import ModelSettings, StoreSettings, TrainSettings
    from rm_service.store.db import Store
    from rm_service.train.run import train

    from rm_service.train.ddp import launched_world

    overrides = {k: v for k, v in {
        "backbone": args.backbone, "mode": args.mode, "lora_rank": args.lora_rank, "max_minutes": args.max_minutes,
        "max_pairs": args.max_pairs, "ensemble_size": args.ensemble_size, "feature_layers": args.feature_layers,
        "dataset_fraction": args.dataset_fraction, "precision": args.precision,
        "max_tokens": args.max_tokens, "epochs": args.epochs, "seed": args.seed, "promote": False if args.no_promote else None,
    }.items() if v is not None}
    settings = TrainSettings(**overrides)
    world = launched_world()
    store = Store(StoreSettings()) if world.main else None  # under torchrun, rank 0 owns the store
    try:
        result = train(store, settings, ModelSettings(), show_progress=world.main)
    finally:
        if store is not None:
            store.close()
    if result is None:
        return 0
    m = result.metrics
    print(f"trained {result.version} ({settings.mode} mode) on {settings.backbone} in {result.seconds:.0f}s: held-out accuracy {m['accuracy']:.4f} "
          f"({int(m.get('heldout_pairs', 0))} pairs), loss {m.get('loss', float('nan')):.4f}, ECE {m.get('ece', float('nan')):.4f}; "
          f"train accuracy {m['train_accuracy']:.4f} ({int(m['train_pairs'])} pairs)")
    if result.details:
        print(result.details)
    print(result.gate_message)
    return 0


def _eval(args) -> int:
    from rm_service.evaluate import evaluate_pairs, file_pairs, format_report, load_for_eval, snapshot_pairs
    from rm_service.settings import StoreSettings
    from rm_service.store.db import Store

    if (args.data is None) == (args.snapshot is None):
        print("rm-service eval: pass exactly one of --data FILE or --snapshot ID|latest", file=sys.stderr)
        return 2
    if args.data is not None:
        pairs = file_pairs(Path(args.data), args.format)
        runtime, version = load_for_eval(args.model)
    else:
        store = Store(StoreSettings())
        try:
            pairs = snapshot_pairs(store, None if args.snapshot == "latest" else args.snapshot, heldout_only=not args.all_pairs)
            runtime, version = load_for_eval(args.model, store=store)
        finally:
            store.close()
    print(format_report(version, evaluate_pairs(runtime, pairs[: args.limit], args.batch_tokens)))
    return 0


def _models(args) -> int:
    from rm_service import registry
    from rm_service.settings import StoreSettings, TrainSettings
    from rm_service.store.db import Store

    store = Store(StoreSettings())
    try:
        if args.action == "list":
            print(f"{'version':<9}{'status':<11}{'backbone':<24}{'accuracy':>9}{'pairs':>7}  snapshot")
            for r in registry.list_models(store):
                print(f"{r.version:<9}{r.status:<11}{r.backbone[:23]:<24}{r.metrics.get('accuracy', float('nan')):>9.4f}"
                      f"{int(r.metrics.get('train_pairs', 0)):>7}  {r.snapshot_id or ''}")
        elif args.action == "show":
            r = registry.get_model(store, args.version)
            print(json.dumps(r.__dict__, indent=2, default=str))
        elif args.action == "promote":
            gate = TrainSettings()
            ok, message = registry.promote(store, args.version, gate.gate_tolerance, force=args.force, verify=registry.load_check(),
                                           onpolicy=gate.gate_onpolicy, alpha=gate.gate_alpha)
            print(message)
            return 0 if ok else 1
        elif args.action == "rollback":
            print(registry.rollback(store))
    finally:
        store.close()
    return 0


def _stats(args) -> int:
    from rm_service.settings import StoreSettings
    from rm_service.store.db import Store

    store = Store(StoreSettings())
    try:
        print(json.dumps(store.stats(), indent=2))
    finally:
        store.close()
    return 0


def serve_settings(args):
    """ServeSettings and SecuritySettings from the environment, overridden by the serve flags."""
    from rm_service.settings import SecuritySettings, ServeSettings

    def given(values: dict) -> dict:
        return {k: v for k, v in values.items() if v is not None}

    serve = ServeSettings(**given({"host": args.host, "port": args.port, "model": args.model, "precision": args.precision,
                                   "also_load": args.also_load,
                                   "with_store": False if args.no_store else None, "with_model": False if args.no_model else None,
                                   "metrics_port": args.metrics_port, "http_port": args.http_port, "log_format": args.log_format}))
    security = SecuritySettings(**given({"tokens_file": args.tokens_file, "tls_cert": args.tls_cert, "tls_key": args.tls_key,
                                         "tls_client_ca": args.tls_client_ca}))
    return serve, security


def _serve(args) -> int:
    from rm_service.logs import set_log_format
    from rm_service.server.app import serve_forever

    serve, security = serve_settings(args)
    set_log_format(serve.log_format)
    asyncio.run(serve_forever(serve, Path(args.port_file) if args.port_file else None, security))
    return 0


def _demo(args) -> int:
    from rm_service.demo import run_demo
    from rm_service.demo.settings import demo_settings

    settings = demo_settings(args.profile, data=args.data, home=args.home, rm_backbone=args.backbone, policy=args.policy,
                             ppo_steps=args.steps, rm_max_minutes=args.max_minutes, selection=args.selection)
    return run_demo(settings)


FORMAT_CHOICES = ["hh", "trl", "ranking", "parquet"]
FORMAT_HELP = ("hh: HH-RLHF text pairs; trl: TRL preference JSONL (standard or conversational, explicit or implicit prompt); "
               "ranking: K-way rankings with ties, JSONL; parquet: the ranking columns as Parquet")
IO_FORMAT_CHOICES = [*FORMAT_CHOICES, "feedback"]  # import/export also move thumbs and session outcomes (docs/feedback.md)
IO_FORMAT_HELP = FORMAT_HELP + "; feedback: per-turn thumbs and session outcomes, JSONL"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rm-service", description="Preference data and reward models for RLHF.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the gRPC reward server")
    s.add_argument("--host", help="address to bind (default 127.0.0.1; env RM_SERVE_HOST)")
    s.add_argument("--port", type=int, help="port (default 50051; 0 picks a free one; env RM_SERVE_PORT)")
    s.add_argument("--model", help="registry version, bundled name (smollm2-135m-instruct, minilm-l6) or HF directory; default: the promoted version")
    s.add_argument("--precision", choices=["auto", "fp32", "bf16"], help="auto (default): bf16 on CUDA, on a CPU the faster one as measured (env RM_SERVE_PRECISION)")
    s.add_argument("--also-load", help="versions kept loaded beside the served one for clients that pin them, comma-separated (env RM_SERVE_ALSO_LOAD)")
    s.add_argument("--port-file", help="write the bound port to this file once serving")
    s.add_argument("--no-store", action="store_true", help="serve scores only; do not open the preference store")
    s.add_argument("--no-model", action="store_true", help="serve the preference store only; load no reward model")
    s.add_argument("--tokens-file", help="bearer tokens, one role:token per line (roles scorer, labeler, admin); "
                   "required to bind a non-loopback address (env RM_AUTH_TOKENS_FILE; RM_AUTH_TOKENS adds more)")
    s.add_argument("--tls-cert", help="PEM certificate chain: serve TLS (env RM_AUTH_TLS_CERT; needs --tls-key)")
    s.add_argument("--tls-key", help="PEM private key of --tls-cert (env RM_AUTH_TLS_KEY)")
    s.add_argument("--tls-client-ca", help="PEM CA bundle: require client certificates signed by it, mutual TLS (env RM_AUTH_TLS_CLIENT_CA)")
    s.add_argument("--metrics-port", type=int, help="Prometheus /metrics port on the same host (default 9464; 0 any; -1 off; env RM_SERVE_METRICS_PORT)")
    s.add_argument("--http-port", type=int, help="serve the labeling page on this port of the same host (0 any; default -1: no page; "
                   "env RM_SERVE_HTTP_PORT; docs/labeling.md)")
    s.add_argument("--log-format", choices=["text", "json"], help="json: one JSON object per log line (env RM_SERVE_LOG_FORMAT)")
    s.set_defaults(func=_serve)

    s = sub.add_parser("import", help="import preference data into the store")
    s.add_argument("--format", choices=IO_FORMAT_CHOICES, default="hh", help=IO_FORMAT_HELP)
    s.add_argument("--annotator", help="provenance recorded with each label (default: the format's name; hh-rlhf for hh)")
    s.add_argument("file")
    s.set_defaults(func=_import)

    s = sub.add_parser("export", help="export a snapshot (reproducible while ingestion goes on)")
    s.add_argument("--format", choices=IO_FORMAT_CHOICES, default="hh", help=IO_FORMAT_HELP)
    s.add_argument("--snapshot", help="snapshot id (default: a new snapshot of everything stored)")
    s.add_argument("--out", required=True)
    s.set_defaults(func=_export)

    s = sub.add_parser("train", help="train a Bradley-Terry reward model from the store and register it")
    s.add_argument("--backbone", help="smollm2-135m-instruct (default), minilm-l6, or an HF directory (a TRL reward checkpoint trains further)")
    s.add_argument("--mode", choices=["head", "full"], help="head: frozen backbone + cached features (default); full: fine-tune the backbone")
    s.add_argument("--lora-rank", type=int, help="full mode: LoRA rank (0 = all weights)")
    s.add_argument("--epochs", type=float, help="full mode: passes over the training pairs")
    s.add_argument("--max-minutes", type=float, help="wall-clock budget (default 15)")
    s.add_argument("--max-pairs", type=int, help="use at most this many training pairs")
    s.add_argument("--feature-layers", help="head mode: candidate layers: auto (default), last, or e.g. 12,18,24")
    s.add_argument("--dataset-fraction", type=float, help="train on this share of the dataset's conversations (default 1)")
    s.add_argument("--precision", choices=["auto", "fp32", "bf16"], help="auto (default): bf16 on CUDA, on a CPU the faster one as measured")
    s.add_argument("--max-tokens", type=int, help="tokens kept per item (the start is cut first)")
    s.add_argument("--ensemble-size", type=int, help="score heads on bootstrap resamples (default 4)")
    s.add_argument("--seed", type=int)
    s.add_argument("--no-promote", action="store_true", help="register as candidate only")
    s.set_defaults(func=_train)

    s = sub.add_parser("eval", help="pairwise accuracy, loss and ECE of a model, overall, by turns and by length")
    s.add_argument("--data", help="a preference file (see --format)")
    s.add_argument("--format", choices=FORMAT_CHOICES, default="hh", help="format of --data")
    s.add_argument("--snapshot", help="evaluate a store snapshot instead (an id or 'latest'): its held-out conversations")
    s.add_argument("--all-pairs", action="store_true", help="with --snapshot, every pair, not only the held-out ones")
    s.add_argument("--model", help="registry version (v3), version directory, bundled name or HF directory; default: the promoted version")
    s.add_argument("--limit", type=int, help="evaluate the first N pairs only")
    s.add_argument("--batch-tokens", type=int, default=4096, help="token budget of one batch")
    s.set_defaults(func=_eval)

    s = sub.add_parser("models", help="the model registry")
    s.add_argument("action", choices=["list", "show", "promote", "rollback"])
    s.add_argument("version", nargs="?")
    s.add_argument("--force", action="store_true", help="promote even if the gate refuses")
    s.set_defaults(func=_models)

    s = sub.add_parser("stats", help="label and queue counts")
    s.set_defaults(func=_stats)

    from rm_service.judge.cli import add_judge_commands

    add_judge_commands(sub)  # judge, judge-agreement

    s = sub.add_parser("demo", help="the whole RLHF loop: import HH-RLHF, train gold and proxy, serve, PPO with labeling and retraining, report")
    s.add_argument("--profile", choices=["cpu", "full"], default="cpu", help="cpu: this 2-core machine (default); full: realistic sizes for a GPU host")
    s.add_argument("--data", help="HH-RLHF pairs JSONL (default ../shared/data/hh_harmless_pairs.jsonl)")
    s.add_argument("--home", help="run directory (default $RM_HOME/demo; emptied first)")
    s.add_argument("--backbone", help="backbone of the gold and proxy reward models (default smollm2-135m-instruct)")
    s.add_argument("--policy", help="policy model (default smollm2-135m-instruct)")
    s.add_argument("--selection", choices=["uncertainty", "random"], help="which samples go to labeling (default uncertainty)")
    s.add_argument("--steps", type=int, help="PPO steps (cpu profile: 20)")
    s.add_argument("--max-minutes", type=float, help="v1 training budget")
    s.set_defaults(func=_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose)
    if args.command == "models" and args.action in ("show", "promote") and not args.version:
        print(f"rm-service models {args.action}: a version is required", file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except RMError as exc:
        print(f"rm-service {args.command}: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a file that is missing, a directory, unreadable, or a full disk
        print(f"rm-service {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
