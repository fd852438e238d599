"""`rm-service user-model train`: snapshot -> conversations split as the reward model's -> the
untuned base model's held-out NLL -> fine-tune -> the tuned model's held-out NLL -> version with
golden items -> registry (kind `user`) -> gate -> promoted.

Metrics of a version (held-out conversations, NLL per user-turn token): `nll` and `base_nll`
with their 95% bootstrap intervals and `diff` (paired), `heldout_tokens`, the end event's
calibration (`end_ece`, `end_brier`, ...), and with a promoted user model already there its
NLL on the same conversations (`baseline_nll`), which the promotion rule compares (registry.user_decision).
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from rm_service import registry
from rm_service.errors import FailedPrecondition
from rm_service.models.precision import describe
from rm_service.settings import ModelSettings, TrainSettings
from rm_service.store import versions
from rm_service.store.db import Store
from rm_service.usermodel.data import UserSplit, fit_half, prepare_split
from rm_service.usermodel.evaluate import Teacher, end_calibration, nll_table, teacher_forced
from rm_service.usermodel.fit import fit
from rm_service.usermodel.runtime import UserRuntime, load_user_runtime
from rm_service.usermodel.settings import UserModelSettings
from rm_service.usermodel.version import (
    UserVersionMeta,
    golden_items,
    open_user_version,
    versions_dir,
    write_user_version,
)

log = logging.getLogger(__name__)
GOLDEN_ITEMS = 4


@dataclass
class UserTrainResult:
    version: str
    promoted: bool
    gate_message: str
    metrics: dict
    seconds: float
    details: str


def train_user_model(
    store: Store,
    settings: UserModelSettings,
    models: ModelSettings | None = None,
    split_settings: TrainSettings | None = None,
    show_progress: bool = True,
) -> UserTrainResult:
    start = time.monotonic()
    models = models or ModelSettings()
    split_settings = split_settings or TrainSettings()
    split = prepare_split(store, split_settings)
    split.fit = fit_half(split.fit, settings.fit_half, split_settings.seed)
    if not split.fit:
        raise FailedPrecondition(f"half {settings.fit_half} of the training conversations is empty: import more")
    runtime = load_user_runtime(settings.backbone, settings.max_tokens, settings.device, settings.precision, models)
    log.info(
        "fine-tuning %s (%s) as a user model, %s",
        settings.backbone,
        settings.method,
        describe(runtime.precision, runtime.device, runtime.model.config),
    )
    heldout = split.heldout or split.validation
    base = teacher_forced(runtime, heldout, desc="base model, held out" if show_progress else "")
    seqs = lambda convs: [w for c in convs for w in runtime.formatter.windows(c.messages, True)]
    report = fit(
        runtime,
        seqs(split.fit),
        seqs(split.validation),
        settings,
        settings.max_minutes * 60,
        show_progress,
    )
    tuned = teacher_forced(runtime, heldout, desc="tuned model, held out" if show_progress else "")
    metrics = heldout_metrics(tuned, base, split)
    metrics.update(
        steps=float(report.steps),
        train_tokens_per_s=report.tokens_per_s,
        train_seconds=report.seconds,
        best_validation_nll=report.best_validation_nll,
        trainable_params=float(report.trainable_params),
    )
    current = registry.promoted(store, "user")
    if current is not None:
        other, _ = open_user_version(current.artifact_path, str(runtime.device), runtime.precision, models)
        metrics["baseline_nll"] = nll_table(teacher_forced(other, heldout), None)["all"]["nll"]
    rec = _register(store, runtime, split, settings, split_settings, models, metrics, current)
    decision = registry.user_decision(rec, current, settings.gate_tolerance)
    versions.set_decision(store, rec.version, decision.to_dict())
    promoted, message = False, f"{rec.version} left as candidate; the rule says {decision.verdict}"
    if settings.promote:
        promoted, message = registry.promote(store, rec.version, decision, verify=load_check(models, settings.device))
    details = (
        f"{settings.method} fine-tune, precision {runtime.precision} on {runtime.device}; {report.steps} steps in "
        f"{report.seconds:.0f} s ({report.tokens_per_s:.0f} tokens/s, stopped: {report.stopped})"
    )
    return UserTrainResult(rec.version, promoted, message, metrics, time.monotonic() - start, details)


def heldout_metrics(tuned: Teacher, base: Teacher, split: UserSplit) -> dict[str, float]:
    table = nll_table(tuned, base)["all"]
    out = {k: v for k, v in table.items()}
    out["heldout_tokens"] = out.pop("tokens")
    out.pop("base_tokens", None)
    out.update(end_calibration(tuned))
    out.update({f"base_{k}": v for k, v in end_calibration(base).items() if k.startswith("end_") or k == "mean_p_end"})
    out.update(
        fit_conversations=float(len(split.fit)),
        validation_conversations=float(len(split.validation)),
        heldout_conversations=float(len(split.heldout)),
    )
    return out


def _register(
    store: Store,
    runtime: UserRuntime,
    split: UserSplit,
    settings: UserModelSettings,
    split_settings: TrainSettings,
    models: ModelSettings,
    metrics: dict,
    current,
) -> registry.ModelRecord:
    version, number = registry.next_version(store, "user")
    directory = versions_dir(models) / version
    golden = [(c.messages, True) for c in (split.heldout or split.fit)[:GOLDEN_ITEMS]]
    meta = UserVersionMeta(
        version=version,
        base_backbone=settings.backbone,
        backbone_key=runtime.backbone_key,
        method=settings.method,
        format=runtime.spec,
        format_hash=runtime.spec.hash,
        precision=runtime.precision,
        metrics=metrics,
        snapshot_id=split.snapshot.snapshot_id if split.snapshot else None,
        parent=current.version if current is not None else None,
        split={"heldout_fraction": split_settings.heldout_fraction, "seed": split_settings.seed},
        settings=settings.model_dump(mode="json"),
        golden=golden_items(runtime, golden),
    )
    staging = directory.with_name(directory.name + ".tmp")
    if staging.exists():
        shutil.rmtree(staging)
    write_user_version(directory, meta, runtime)
    rec = registry.ModelRecord(
        version=version,
        parent=meta.parent,
        snapshot_id=meta.snapshot_id,
        backbone=settings.backbone,
        format_hash=meta.format_hash,
        status="candidate",
        metrics=metrics,
        reward_mean=0.0,  # a user model serves no rewards: the identity normalisation
        reward_std=1.0,
        ensemble_size=1,
        artifact_path=str(directory),
        kind="user",
    )
    registry.register(store, rec, number)
    return rec


def load_check(models: ModelSettings | None = None, device: str = "auto"):
    """`promote`'s verify step for a user model: it loads and its golden items check."""

    def verify(rec: registry.ModelRecord) -> None:
        if not Path(rec.artifact_path).is_dir():
            raise FailedPrecondition(f"{rec.artifact_path} is missing")
        open_user_version(rec.artifact_path, device=device, settings=models)

    return verify
