"""`rm-service` command line. Flags override settings from the environment (RM_* variables).

Errors print one line to stderr and exit with status 2; no tracebacks for bad input.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path

from pydantic import ValidationError

from rm_service import formats
from rm_service.errors import RMError
from rm_service.logs import configure_logging
from rm_service.settings import SecuritySettings, ServeSettings, TrainSettings
from rm_service.settings_cli import CommandParser, add_version_flag, flag_values, validation_message


def _import(args) -> int:
    """Exit 0 when the file was imported (lines rejected are listed); 1 when nothing was
    stored or the import stopped part-way (it says which lines were stored); 2 on errors."""
    from rm_service.formats import import_file
    from rm_service.formats.ingest import ImportStopped
    from rm_service.formats.records import input_file
    from rm_service.settings import StoreSettings
    from rm_service.store.db import Store

    path = input_file(Path(args.file))  # a path that is not a readable file: one line, exit 2, store untouched
    store = Store(StoreSettings())
    try:
        counts, rejected = import_file(store, path, args.format, args.annotator)
    except ImportStopped as stop:
        # Every rejected line: the rest before the stop is stored.
        _import_report(args.file, stop.counts, stop.reasons, limit=None)
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
    print(f"exported {n} {formats.get(args.format).unit} of snapshot {snapshot} to {args.out} ({args.format})")
    return 0


def _train(args) -> int:
    settings = TrainSettings(**flag_values(args, TrainSettings))  # a bad flag or RM_TRAIN_* value: before torch
    from rm_service.settings import ModelSettings, StoreSettings
    from rm_service.store.db import Store
    from rm_service.train.ddp import launched_world
    from rm_service.train.run import train

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
    print(
        f"trained {result.version} ({settings.mode} mode) on {settings.backbone} in {result.seconds:.0f}s: held-out "
        f"accuracy {m['accuracy']:.4f} ({int(m.get('heldout_pairs', 0))} pairs), loss "
        f"{m.get('loss', float('nan')):.4f}, ECE {m.get('ece', float('nan')):.4f}; train accuracy "
        f"{m['train_accuracy']:.4f} ({int(m['train_pairs'])} pairs)"
    )
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
            pairs = snapshot_pairs(
                store, None if args.snapshot == "latest" else args.snapshot, heldout_only=not args.all_pairs
            )
            runtime, version = load_for_eval(args.model, store=store)
        finally:
            store.close()
    print(format_report(version, evaluate_pairs(runtime, pairs[: args.limit], args.batch_tokens)))
    return 0


def _models(args) -> int:
    from rm_service import registry
    from rm_service.settings import StoreSettings
    from rm_service.store.db import Store

    if args.action == "export":  # reads the version's directory only: no store
        from rm_service.models.export import export_hf

        print(export_hf(args.version, args.dir).summary())
        return 0
    store = Store(StoreSettings())
    try:
        if args.action == "list":
            print(f"{'version':<9}{'status':<11}{'backbone':<24}{'accuracy':>9}{'pairs':>7}  snapshot")
            for r in registry.list_models(store):
                print(
                    f"{r.version:<9}{r.status:<11}{r.backbone[:23]:<24}{r.metrics.get('accuracy', float('nan')):>9.4f}"
                    f"{int(r.metrics.get('train_pairs', 0)):>7}  {r.snapshot_id or ''}"
                )
        elif args.action == "show":
            r = registry.get_model(store, args.version)
            print(json.dumps(r.__dict__, indent=2, default=str))
        elif args.action == "promote":  # on the decision its training run made against the promoted version
            decision = registry.stored_decision(store, args.version)
            ok, message = registry.promote(
                store, args.version, decision, force=args.force, verify=registry.load_check()
            )
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
    return ServeSettings(**flag_values(args, ServeSettings)), SecuritySettings(**flag_values(args, SecuritySettings))


def _serve(args) -> int:
    # Before torch loads OpenMP: its threads sleep at barriers instead of spinning while the event loop and the
    # tokeniser need a core (bench/overload.py, MiniLM on 2 cores: goodput at 4x load 83-86% of 1x -> 87-108% over
    # five runs). Set OMP_WAIT_POLICY yourself to keep another policy.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    serve, security = serve_settings(args)  # a bad flag or RM_* value is refused before the server's imports (~4 s)
    from rm_service.logs import set_log_format
    from rm_service.server.app import serve_forever

    sys.setswitchinterval(serve.gil_switch_interval_ms / 1000)  # process-wide, so set by the process that serves
    set_log_format(serve.log_format)
    asyncio.run(serve_forever(serve, Path(args.port_file) if args.port_file else None, security))
    return 0


def _demo(args) -> int:
    from rm_service.demo import run_demo
    from rm_service.demo.settings import DemoSettings, demo_settings

    values = flag_values(args, DemoSettings)
    settings = demo_settings(values.pop("profile", None), **values)
    return run_demo(settings)


FORMAT_CHOICES = list(formats.FORMATS)
FORMAT_HELP = formats.HELP


def build_parser() -> argparse.ArgumentParser:
    """Subcommands whose settings are flags generated from their settings models (rm_service/settings_cli.py);
    arguments that are not settings (files, --out, versions) are plain ones."""
    p = argparse.ArgumentParser(
        prog="rm-service",
        description="Preference data and reward models for RLHF. A command's flags "
        "override its settings from the environment (RM_* variables, shown in its --help).",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    add_version_flag(p)
    sub = p.add_subparsers(dest="command", required=True, parser_class=CommandParser)

    s = sub.add_parser(
        "serve",
        help="run the gRPC reward server",
        description="Run the gRPC reward server: the promoted version, "
        "followed through promotions, or --model; the preference store unless --no-store.",
    )
    s.add_argument("--port-file", metavar="<FILE>", help="write the bound port to this file once serving")
    s.settings_flags(ServeSettings, aliases={"with_store": ["--no-store"], "with_model": ["--no-model"]})
    s.settings_flags(SecuritySettings, exclude=["tokens"])  # secrets stay off the command line: RM_AUTH_TOKENS
    s.set_defaults(func=_serve)

    s = sub.add_parser("import", help="import preference data into the store")
    s.add_argument("--format", choices=FORMAT_CHOICES, default="hh", help=FORMAT_HELP)
    s.add_argument(
        "--annotator", help="provenance recorded with each label (default: the format's name; hh-rlhf for hh)"
    )
    s.add_argument("file")
    s.set_defaults(func=_import)

    s = sub.add_parser("export", help="export a snapshot (reproducible while ingestion goes on)")
    s.add_argument("--format", choices=FORMAT_CHOICES, default="hh", help=FORMAT_HELP)
    s.add_argument("--snapshot", help="snapshot id (default: a new snapshot of everything stored)")
    s.add_argument("--out", required=True)
    s.set_defaults(func=_export)

    s = sub.add_parser(
        "train",
        help="train a Bradley-Terry reward model from the store and register it",
        description="Snapshot the store, train a Bradley-Terry reward model, register it and promote it if it passes "
        "the gate.",
    )
    s.settings_flags(TrainSettings)
    s.set_defaults(func=_train)

    s = sub.add_parser("eval", help="pairwise accuracy, loss and ECE of a model, overall, by turns and by length")
    s.add_argument("--data", help="a preference file (see --format)")
    s.add_argument(
        "--format", choices=list(formats.PAIR_FORMATS), default="hh", help="format of --data (a format of pairs)"
    )
    s.add_argument(
        "--snapshot", help="evaluate a store snapshot instead (an id or 'latest'): its held-out conversations"
    )
    s.add_argument("--all-pairs", action="store_true", help="with --snapshot, every pair, not only the held-out ones")
    s.add_argument(
        "--model",
        help="registry version (v3), version directory, bundled name or HF directory; default: the promoted version",
    )
    s.add_argument("--limit", type=int, help="evaluate the first N pairs only")
    s.add_argument("--batch-tokens", type=int, default=4096, help="token budget of one batch (default: %(default)s)")
    s.set_defaults(func=_eval)

    s = sub.add_parser("models", help="the model registry")
    s.add_argument("action", choices=["list", "show", "promote", "rollback", "export"])
    s.add_argument("version", nargs="?")
    s.add_argument("dir", nargs="?", help="export: the directory to write (a transformers *ForSequenceClassification)")
    s.add_argument(
        "--format",
        choices=["hf"],
        default="hf",
        help="export: hf, a standard transformers directory (docs/operations.md)",
    )
    s.add_argument("--force", action="store_true", help="promote even if the gate refuses")
    s.set_defaults(func=_models)

    s = sub.add_parser("stats", help="label and queue counts")
    s.set_defaults(func=_stats)

    from rm_service.judge.cli import add_judge_commands

    add_judge_commands(sub)  # judge, judge-agreement

    from rm_service.usermodel.cli import add_user_model_commands

    add_user_model_commands(sub)  # user-model train|eval|list|show|promote|rollback

    s = sub.add_parser(
        "demo",
        help="the whole RLHF loop: import HH-RLHF, train gold and proxy, serve, PPO with labeling and retraining, "
        "report",
        description="The whole RLHF loop: import HH-RLHF, train gold and proxy, serve, PPO with labeling and "
        "retraining, report. Flags override RM_DEMO_* variables, which override the profile's sizes; the defaults "
        "shown are the cpu profile's.",
    )
    s.settings_flags(
        _demo_settings,
        aliases={"rm_backbone": ["--backbone"], "ppo_steps": ["--steps"], "rm_max_minutes": ["--max-minutes"]},
    )
    s.set_defaults(func=_demo)
    return p


def _demo_settings():
    from rm_service.demo.settings import DemoSettings

    return DemoSettings


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if (
        args.command == "models"
        and args.action == "export"
        and args.dir is None
        and len(extra) == 1
        and not extra[0].startswith("-")
    ):
        # `models export VERSION --format hf DIR`: argparse leaves a positional after an option over
        args.dir = extra.pop()
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    configure_logging(args.verbose)
    if args.command == "models" and args.action in ("show", "promote", "export") and not args.version:
        print(f"rm-service models {args.action}: a version is required", file=sys.stderr)
        return 2
    if args.command == "models" and args.action == "export" and not args.dir:
        print(
            "rm-service models export: the directory to write is required (models export VERSION --format hf DIR)",
            file=sys.stderr,
        )
        return 2
    try:
        return args.func(args)
    except RMError as exc:
        print(f"rm-service {args.command}: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a file that is missing, a directory, unreadable, or a full disk
        print(f"rm-service {args.command}: {exc}", file=sys.stderr)
        return 2
    except ValidationError as exc:  # a bad flag or RM_* value, found when a settings model is built
        print(f"rm-service {args.command}: {validation_message(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
