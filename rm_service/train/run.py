"""A training run: snapshot -> split by conversation -> head or full mode -> metrics ->
artifact with golden items -> registered version -> promotion gate.

Metrics of a version (all on its held-out pairs): accuracy, loss and ECE overall, and split
into dataset pairs (`*_human`) and on-policy pairs (`*_onpolicy`, labels of policy samples);
the promoted version's figures on the same pairs (`baseline_*`), which the gate compares;
`unchanged_from_parent` = 1 when the heads came out equal to the parent's (a retrain that
learned nothing is reported, and not promoted).
"""

from __future__ import annotations

import copy
import hashlib
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rm_service import registry
from rm_service.errors import FailedPrecondition
from rm_service.models.precision import describe
from rm_service.models.runtime import ModelRuntime, backbone_key, load_backbone_runtime
from rm_service.models.version import VersionMeta, golden_items, write_version
from rm_service.settings import ModelSettings, TrainSettings
from rm_service.store import versions
from rm_service.store.db import Pair, Store
from rm_service.train import ddp
from rm_service.train.data import Split, prepare_split
from rm_service.train.feedback import requests as feedback_requests
from rm_service.train.full_mode import fit_full_mode
from rm_service.train.gate import decide_retrain, evidence_since, reusable_head
from rm_service.train.head_mode import fit_head_mode
from rm_service.train.metrics import pair_metrics
from rm_service.train.scores import Scores

log = logging.getLogger(__name__)
GOLDEN_ITEMS = 4
FEEDBACK_WEIGHTS = (
    "pair_weight",
    "thumb_weight",
    "outcome_weight",
    "session_head",
)  # head mode's only: a full-mode run resumes across them
UNCHANGED_RTOL = 1e-4  # L-BFGS stops within ~1e-5 of the optimum; float32 heads on disk


@dataclass
class TrainResult:
    version: str
    promoted: bool
    gate_message: str
    metrics: dict
    seconds: float
    details: str = ""  # how it was made: precision, and in head mode the features chosen
    decision: dict | None = None  # the promotion rule's decision against the promoted version (registry.Decision)


def train(
    store: Store | None,
    settings: TrainSettings,
    models: ModelSettings | None = None,
    show_progress: bool = True,
    parent: str | None = None,
) -> TrainResult | None:
    """Train and register a version. Under torchrun every rank calls this; rank 0 alone
    needs the store and returns the result (other ranks return None)."""
    start = time.monotonic()
    deadline = start + settings.max_minutes * 60
    models = models or ModelSettings()
    world = ddp.launched_world()
    if settings.mode == "head" and world.size > 1:
        raise FailedPrecondition("head mode runs in one process; use --mode full under torchrun")
    ddp.init(world)
    try:
        split = ddp.broadcast(prepare_split(_rank0(store), settings) if world.main else None, world)
        runtime = load_backbone_runtime(
            settings.backbone,
            settings.max_tokens,
            settings.ensemble_size,
            device=ddp.device_for(world, settings.device),
            precision=settings.precision,
            settings=models,
        )
        log.info(
            "training %s in %s mode, %s",
            settings.backbone,
            settings.mode,
            describe(runtime.precision, runtime.device, runtime.config),
        )
        if settings.mode == "head":
            current = registry.promoted(store) if store is not None else None
            init = reusable_head(current.artifact_path, runtime) if current is not None else None
            since = evidence_since(store, current)
            scores = fit_head_mode(runtime, _rank0(store), split, settings, deadline, show_progress, init, since)
        else:
            scores = fit_full_mode(
                runtime, split, settings, deadline, run_dir(models, split, settings), world, show_progress
            )
        if not world.main:
            return None
        return _register(_rank0(store), runtime, split, scores, settings, models, parent, time.monotonic() - start)
    finally:
        ddp.shutdown(world)


def _rank0(store: Store | None) -> Store:
    """The store, which the main process (rank 0, the only one in head mode) is always given."""
    if store is None:
        raise FailedPrecondition("training needs the preference store in the main process")
    return store


def run_dir(models: ModelSettings, split: Split, settings: TrainSettings) -> Path:
    """Checkpoints of a full-mode run: one directory per (snapshot, settings), so rerunning
    the same command resumes it."""
    digest = hashlib.sha256(
        settings.model_dump_json(exclude={"max_minutes", "resume", "promote", *FEEDBACK_WEIGHTS}).encode()
    ).hexdigest()[:12]
    return Path(models.artifacts_dir) / ".runs" / f"{split.snapshot.snapshot_id}-{digest}"


def heldout_metrics(
    r_chosen: np.ndarray, r_rejected: np.ndarray, pairs: list[Pair], prefix: str = ""
) -> dict[str, float]:
    """accuracy/loss/ece overall, on dataset pairs (_human) and on on-policy pairs (_onpolicy)."""
    out = {f"{prefix}{k}": v for k, v in pair_metrics(r_chosen, r_rejected).items()}
    on = np.array([p.on_policy for p in pairs], dtype=bool)
    for name, mask in (("human", ~on), ("onpolicy", on)):
        if mask.any():
            m = pair_metrics(r_chosen[mask], r_rejected[mask])
            out.update(
                {
                    f"{prefix}accuracy_{name}": m["accuracy"],
                    f"{prefix}loss_{name}": m["loss"],
                    f"{prefix}pairs_{name}": m["num_pairs"],
                }
            )
    return out


def _register(
    store: Store,
    runtime: ModelRuntime,
    split: Split,
    scores: Scores,
    settings: TrainSettings,
    models: ModelSettings,
    parent: str | None,
    seconds: float,
) -> TrainResult:
    pairs = scores.heldout_pairs
    metrics = heldout_metrics(*scores.heldout, pairs) if pairs else {"accuracy": float("nan")}
    metrics.update(
        {
            "train_accuracy": pair_metrics(*scores.fit)["accuracy"],
            "steps": float(scores.steps),
            "train_seconds": seconds,
        }
    )
    metrics.update({k: float(v) for k, v in scores.num_pairs.items()})
    metrics.update(scores.extra)
    current, decision = registry.promoted(store), None
    if current is not None:
        parent = parent or current.version
        decision, evidence = decide_retrain(store, runtime, scores, settings, models, current)
        metrics.update(evidence)
        if settings.mode == "head" and _same_heads(current, runtime):
            metrics["unchanged_from_parent"] = 1.0
    reference = np.concatenate(
        [*scores.fit] + ([scores.reference] if scores.reference is not None else [])
    )  # pairs' and feedback turns' rewards
    reward_mean, reward_std = float(reference.mean()), float(reference.std() or 1.0)
    metrics.update(reference_stats(reference, scores.fit_pairs))

    version, number = registry.next_version(store)
    directory = Path(models.artifacts_dir) / version
    staging = directory.with_name(directory.name + ".tmp")
    if staging.exists():  # left by a run that died before registering
        shutil.rmtree(staging)
    backbone, key = settings.backbone, runtime.backbone_key
    if settings.mode == "full":  # the fine-tuned backbone travels with the version
        backbone, key = _save_backbone(runtime, staging)
    golden_source = [(p.prompt, p.chosen) for p in (split.heldout or split.fit)[:GOLDEN_ITEMS]]
    golden_source = (
        golden_source or list(feedback_requests(split.feedback_heldout + split.feedback).values())[:GOLDEN_ITEMS]
    )
    meta = VersionMeta(
        version=version,
        mode=settings.mode,
        backbone=backbone,
        base_backbone=settings.backbone,
        backbone_key=key,
        format=runtime.spec,
        format_hash=runtime.spec.hash,
        precision=runtime.precision,
        pooling=runtime.model.pooling,
        ensemble_size=runtime.model.ensemble_size,
        reward_mean=reward_mean,
        reward_std=reward_std,
        metrics=metrics,
        snapshot_id=split.snapshot.snapshot_id,
        parent=parent,
        settings=settings.model_dump(mode="json"),
        golden=golden_items(runtime, golden_source),
        info=scores.info,
    )
    if _wants_onnx(settings, runtime) and (split.heldout or split.fit):  # the export is parity-checked on pairs
        meta.onnx = _export_onnx(runtime, staging, split.heldout or split.fit)
    score = runtime.model.score
    bias = (
        score.bias.detach().cpu().numpy() if score.bias is not None else np.zeros(score.out_features, dtype=np.float32)
    )
    session = getattr(runtime.model, "session", None)  # a separate session head (train.feedback)
    write_version(
        directory,
        meta,
        score.weight.detach().cpu().numpy(),
        bias,
        None if session is None else (session.weight.detach().cpu().numpy(), session.bias.detach().cpu().numpy()),
    )
    rec = registry.ModelRecord(
        version=version,
        parent=parent,
        snapshot_id=split.snapshot.snapshot_id,
        backbone=settings.backbone,
        format_hash=runtime.spec.hash,
        status="candidate",
        metrics=metrics,
        reward_mean=reward_mean,
        reward_std=reward_std,
        ensemble_size=runtime.model.ensemble_size,
        artifact_path=str(directory),
    )
    registry.register(store, rec, number)
    if decision is not None:
        versions.set_decision(store, version, decision.to_dict())
    promoted, message = (
        False,
        f"{version} left as candidate" + (f"; the rule says {decision.verdict}" if decision else ""),
    )
    if metrics.get("unchanged_from_parent"):
        message = f"{version} has the same heads as {parent}: left as candidate (nothing new was learned)"
    elif settings.promote:  # announced only after the version loads from disk and re-scores its golden items
        promoted, message = registry.promote(store, version, decision, verify=registry.load_check(models))
    details = _details(runtime, metrics, scores)
    return TrainResult(version, promoted, message, metrics, seconds, details, decision.to_dict() if decision else None)


def reference_stats(raw: np.ndarray, pairs: list[Pair]) -> dict[str, float]:
    """What serving compares its recent scores with (server.metrics), beside reward_mean/std:
    the training items counted and the Pearson correlation of completion length (characters)
    and raw score over them (`raw` is r_chosen ++ r_rejected of `pairs`; NaN when undefined)."""
    out = {"reference_items": float(len(raw))}
    if len(pairs) * 2 == len(raw):
        lengths = np.array([len(p.chosen) for p in pairs] + [len(p.rejected) for p in pairs], dtype=float)  # [2N]
        ok = len(raw) >= 3 and lengths.std() > 0 and raw.std() > 0
        out["reference_length_correlation"] = float(np.corrcoef(lengths, raw)[0, 1]) if ok else float("nan")
    return out


def _details(runtime: ModelRuntime, metrics: dict, scores: Scores) -> str:
    line = f"precision {runtime.precision} on {runtime.device}"
    if "features" in scores.info:
        line += (
            f"; features {scores.info['features']} chosen by 5-fold CV (loss {metrics['head_cv_loss']:.4f}, l2 "
            f"{metrics['head_l2']:g}); {int(metrics['feature_tokens'])} new tokens in "
            f"{metrics['feature_seconds']:.0f}s ({metrics['feature_tokens_per_s']:.0f} tokens/s)"
        )
    for name in ("human", "onpolicy"):
        if f"accuracy_{name}" in metrics:
            line += f"; held-out {name} pairs: {metrics[f'accuracy_{name}']:.4f} ({int(metrics[f'pairs_{name}'])})"
            if f"baseline_accuracy_{name}" in metrics:
                line += f", parent {metrics[f'baseline_accuracy_{name}']:.4f}"
    for kind, count in (("thumb", "thumbs"), ("outcome", "outcomes")):  # feedback labels (train.feedback)
        if metrics.get(count):
            line += (
                f"; held-out {count}: AUC {metrics[f'{kind}_auc']:.4f} ({int(metrics[count])}), "
                f"pair accuracy {metrics[f'{kind}_pair_accuracy']:.4f}"
            )
    return line


def _same_heads(current: registry.ModelRecord, runtime: ModelRuntime) -> bool:
    head = reusable_head(current.artifact_path, runtime)
    if head is None or head[0] != runtime.model.pooling or head[1].shape != tuple(runtime.model.score.weight.shape):
        return False
    weight = runtime.model.score.weight.detach().cpu().numpy()
    return bool(np.abs(weight - head[1]).max() <= UNCHANGED_RTOL * max(np.abs(head[1]).max(), 1e-12))


def _save_backbone(runtime: ModelRuntime, staging: Path) -> tuple[str, str]:
    """Write the fine-tuned backbone and tokenizer into the version's staging directory;
    the artifact names it relatively ("./backbone")."""
    target = staging / "backbone"
    target.mkdir(parents=True, exist_ok=True)
    runtime.model.backbone.save_pretrained(target)
    runtime.tokenizer.save_pretrained(target)
    return "./backbone", backbone_key(target, "./backbone")


ONNX_CHECK_PAIRS = 64


def _wants_onnx(settings: TrainSettings, runtime: ModelRuntime) -> bool:
    """auto: only where the version would be served in fp32 on a CPU, the ONNX Runtime path."""
    if settings.export_onnx == "auto":
        return runtime.device.type == "cpu" and runtime.precision == "fp32"
    return settings.export_onnx == "on"


def _export_onnx(runtime: ModelRuntime, staging: Path, pairs: list[Pair]) -> dict:
    """model.onnx (parity-checked against the same model in fp32 on the CPU, whatever this run
    trained in) and, if it orders pairs alike, model.int8.onnx."""
    from rm_service.models.onnx_backend import build_onnx_artifacts

    staging.mkdir(parents=True, exist_ok=True)
    reference = runtime
    if runtime.device.type != "cpu" or runtime.precision != "fp32":
        reference = ModelRuntime(
            copy.deepcopy(runtime.model).cpu().float(),
            runtime.tokenizer,
            runtime.spec,
            runtime.backbone,
            runtime.backbone_key,
            precision="fp32",
        )
    items = [
        (runtime.format(p.prompt, p.chosen), runtime.format(p.prompt, p.rejected)) for p in pairs[:ONNX_CHECK_PAIRS]
    ]
    report = build_onnx_artifacts(reference, staging, items)
    for key in ("fp32_path", "int8_path"):  # relative to the version directory, which is renamed
        report[key] = Path(report[key]).name if report.get(key) else None
    log.info(
        "ONNX export: max relative difference %.2g; int8 agreement %.4f (%s)",
        report["max_rel_diff"],
        report["int8_agreement"],
        "kept" if report["int8_kept"] else "deleted",
    )
    return report
