"""`rm-service user-model train|eval|list|show|promote|rollback` (registered by rm_service.cli).

Every UserModelSettings field is a flag of `train` overriding its RM_USER_* variable; the
held-out split is the reward model's (RM_TRAIN_HELDOUT_FRACTION, RM_TRAIN_SEED)."""

from __future__ import annotations

import json
from pathlib import Path

from rm_service import formats
from rm_service.errors import FailedPrecondition
from rm_service.settings_cli import CommandParser, flag_values


def _settings():
    from rm_service.usermodel.settings import UserModelSettings

    return UserModelSettings


def _train(args) -> int:
    from rm_service.settings import ModelSettings, StoreSettings
    from rm_service.store.db import Store
    from rm_service.usermodel.run import train_user_model

    settings = _settings()(**flag_values(args, _settings()))
    store = Store(StoreSettings())
    try:
        result = train_user_model(store, settings, ModelSettings())
    finally:
        store.close()
    m = result.metrics
    print(
        f"trained {result.version} on {settings.backbone} in {result.seconds:.0f} s: held-out NLL per user-turn token "
        f"{m['nll']:.4f} [{m['nll_low']:.4f}, {m['nll_high']:.4f}] vs base {m['base_nll']:.4f} "
        f"[{m['base_nll_low']:.4f}, {m['base_nll_high']:.4f}] ({int(m['heldout_tokens'])} tokens, "
        f"{int(m['heldout_conversations'])} conversations); difference {m['diff']:+.4f} "
        f"[{m['diff_low']:+.4f}, {m['diff_high']:+.4f}]; end event ECE {m.get('end_ece', float('nan')):.3f}"
    )
    print(result.details)
    print(result.gate_message)
    return 0


def _eval(args) -> int:
    from rm_service.settings import ModelSettings, StoreSettings, TrainSettings
    from rm_service.store.db import Store
    from rm_service.usermodel import evaluate as ev
    from rm_service.usermodel.data import file_conversations, split, store_conversations
    from rm_service.usermodel.runtime import load_user_runtime
    from rm_service.usermodel.version import open_user_model

    models = ModelSettings()
    if args.data is not None:
        convs = file_conversations(Path(args.data), args.format)
    else:
        store = Store(StoreSettings())
        try:
            snapshot = store.get_snapshot(None if args.snapshot in (None, "latest") else args.snapshot)
            if snapshot is None:
                raise FailedPrecondition("the store has no snapshot yet; train once or pass --data")
            convs = split(store_conversations(store, snapshot), TrainSettings())[2]
        finally:
            store.close()
    convs = convs[: args.limit] if args.limit else convs
    if not convs:
        raise FailedPrecondition(
            "no conversations to evaluate (a conversation needs a user turn and ends with an assistant turn)"
        )
    name = args.model or _promoted_user()
    runtime, meta = open_user_model(name, args.device, args.precision, models)
    base_name = args.base or (meta.base_backbone if meta is not None else None)
    tuned = ev.teacher_forced(runtime, convs, args.batch_tokens, desc=f"{name}")
    base_t, base_calib = None, None
    if base_name and base_name != name:
        base = load_user_runtime(
            base_name, runtime.spec.max_tokens, args.device, args.precision, models, spec=runtime.spec
        )
        base_t = ev.teacher_forced(base, convs, args.batch_tokens, desc=f"{base_name}")
        base_calib = ev.end_calibration(base_t)
        del base
    samples = None
    if args.samples:
        samples = ev.sample_report(runtime, ev.contexts(convs, args.samples, args.seed), args.max_new_tokens, args.seed)
    label = meta.version if meta is not None else Path(name).name
    print(f"{len(convs)} conversations; {label} in {runtime.precision} on {runtime.device}\n")
    print(
        ev.format_report(
            label, base_name or "-", ev.nll_table(tuned, base_t), ev.end_calibration(tuned), base_calib, samples
        )
    )
    return 0


def _promoted_user() -> str:
    from rm_service import registry
    from rm_service.settings import StoreSettings
    from rm_service.store.db import Store

    store = Store(StoreSettings())
    try:
        rec = registry.promoted(store, "user")
    finally:
        store.close()
    if rec is None:
        raise FailedPrecondition("no promoted user model in the registry; pass --model")
    return rec.artifact_path


def _registry(args) -> int:
    from rm_service import registry
    from rm_service.settings import StoreSettings
    from rm_service.store.db import Store
    from rm_service.usermodel.run import load_check
    from rm_service.usermodel.settings import UserModelSettings

    if args.action in ("show", "promote") and not args.version:
        raise FailedPrecondition(f"user-model {args.action}: a version is required")
    store = Store(StoreSettings())
    try:
        if args.action == "list":
            print(f"{'version':<9}{'status':<11}{'backbone':<24}{'NLL':>8}{'base NLL':>10}{'tokens':>8}  snapshot")
            for r in registry.list_models(store, "user"):
                m = r.metrics
                print(
                    f"{r.version:<9}{r.status:<11}{r.backbone[:23]:<24}{m.get('nll', float('nan')):>8.4f}"
                    f"{m.get('base_nll', float('nan')):>10.4f}{int(m.get('heldout_tokens', 0)):>8}  "
                    f"{r.snapshot_id or ''}"
                )
        elif args.action == "show":
            print(json.dumps(registry.get_model(store, args.version).__dict__, indent=2, default=str))
        elif args.action == "promote":
            candidate, current = registry.get_model(store, args.version), registry.promoted(store, "user")
            decision = registry.user_decision(candidate, current, UserModelSettings().gate_tolerance)
            ok, message = registry.promote(store, args.version, decision, force=args.force, verify=load_check())
            print(message)
            return 0 if ok else 1
        else:
            print(registry.rollback(store, "user"))
    finally:
        store.close()
    return 0


def _prompts(args) -> int:
    """Openings (every message up to the first user turn) of the store's conversations of one split."""
    from rm_service.settings import StoreSettings, TrainSettings
    from rm_service.store.db import Store
    from rm_service.usermodel.data import split, store_conversations

    store = Store(StoreSettings())
    try:
        snapshot = (
            store.get_snapshot(None if args.snapshot in (None, "latest") else args.snapshot) or store.create_snapshot()
        )
        fit, validation, heldout = split(store_conversations(store, snapshot), TrainSettings())
    finally:
        store.close()
    chosen = heldout if args.split == "heldout" else fit + validation
    with open(args.out, "w", encoding="utf-8") as out:
        for c in chosen:
            first = next(i for i, m in enumerate(c.messages) if m.role == "user")
            opening = [m.as_dict() for m in c.messages[: first + 1]]
            out.write(json.dumps({"prompt": opening, "conversation_id": c.conversation_id}, ensure_ascii=False) + "\n")
    print(f"wrote {len(chosen)} openings of the {args.split} split of snapshot {snapshot.snapshot_id} to {args.out}")
    return 0


def add_user_model_commands(sub) -> None:
    p = sub.add_parser(
        "user-model",
        help="the user model: train it on the store's conversations, evaluate it, manage its versions",
        description="A causal LM fine-tuned to write the next user turn of a conversation, or to end it: the "
        "environment that SimulateUser serves for multi-turn RL (docs/user-model.md).",
    )
    actions = p.add_subparsers(dest="action", required=True, parser_class=CommandParser)
    s = actions.add_parser(
        "train",
        help="fine-tune on the store's conversations and register a user-model version",
        description="Snapshot the store, fine-tune on the user turns of its conversations (split by conversation as "
        "the reward model's held-out split: RM_TRAIN_HELDOUT_FRACTION, RM_TRAIN_SEED), register the version (kind "
        "user), promote it if it passes the gate.",
    )
    s.settings_flags(_settings)
    s.set_defaults(func=_train)

    s = actions.add_parser(
        "eval", help="NLL per user-turn token against the base model, sampled lengths (KS), distinct-2, end calibration"
    )
    s.add_argument(
        "--model", help="user version (u2), version directory, or causal LM; default: the promoted user model"
    )
    s.add_argument("--base", help="the untuned model to compare with (default: the version's base backbone)")
    s.add_argument("--data", help="a file of conversations (see --format); default: the store's held-out conversations")
    s.add_argument("--format", choices=list(formats.FORMATS), default="hh", help=formats.HELP)
    s.add_argument("--snapshot", help="without --data: the store snapshot (an id or 'latest', the default)")
    s.add_argument("--limit", type=int, help="evaluate the first N conversations only")
    s.add_argument(
        "--samples", type=int, default=200, help="contexts to sample user turns after (0: none; default 200)"
    )
    s.add_argument("--max-new-tokens", type=int, default=128, help="sampling budget per turn (default 128)")
    s.add_argument("--seed", type=int, default=0, help="seed of the contexts chosen and of sampling")
    s.add_argument("--batch-tokens", type=int, default=4096, help="token budget of one scoring batch")
    s.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    s.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto")
    s.set_defaults(func=_eval)

    s = actions.add_parser(
        "prompts",
        help="write the openings of the store's conversations of one split (ConversationEnv's reset draws from them)",
    )
    s.add_argument(
        "--split",
        choices=["heldout", "train"],
        default="heldout",
        help="the reward model's held-out split, or the rest",
    )
    s.add_argument("--snapshot", help="store snapshot (an id or 'latest', the default)")
    s.add_argument("--out", required=True, help='JSONL file to write: {"prompt": [messages], "conversation_id": ...}')
    s.set_defaults(func=_prompts)

    for action, text in (
        ("list", "the user-model versions"),
        ("show", "one version's record"),
        ("promote", "promote a version (gate: held-out NLL; --force skips it)"),
        ("rollback", "promote again the user model promoted before the current one"),
    ):
        s = actions.add_parser(action, help=text)
        if action in ("show", "promote"):
            s.add_argument("version", nargs="?")
        if action == "promote":
            s.add_argument("--force", action="store_true", help="promote even if the gate refuses")
        s.set_defaults(func=_registry, action=action)
