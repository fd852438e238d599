"""A training run: snapshot -> split by conversation -> head or full mode -> metrics ->
artifact with golden pairs -> registered version -> promotion gate."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

from rm_service import registry
from rm_service.errors import FailedPrecondition
from rm_service.models.runtime import ModelRuntime, backbone_key, load_backbone_runtime
from rm_service.settings import ModelSettings, TrainSettings
from rm_service.store.db import Pair, Store
from rm_service.train import ddp
from rm_service.train.data import Split, prepare_split
from rm_service.train.full_mode import fit_full_mode
from rm_service.train.head_mode import cached_features, fit_head_mode
from rm_service.train.metrics import pair_metrics
from rm_service.train.scores import Scores

log = logging.getLogger(__name__)
GOLDEN_ITEMS = 4


@dataclass
class TrainResult:
    version: str
    promoted: bool
    gate_message: str
    metrics: dict
    seconds: float


def train(store: Store | None, settings: TrainSettings, models: ModelSettings | None = None, show_progress: bool = True,
          parent: str | None = None) -> TrainResult | None:
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
        split = ddp.broadcast(prepare_split(store, settings) if world.main else None, world)
        runtime = load_backbone_runtime(settings.backbone, settings.max_tokens, settings.ensemble_size,
                                        precision=settings.precision, settings=models)
        if settings.mode == "head":
            init = parent_heads(store, runtime) if settings.warm_start else None
            scores = fit_head_mode(runtime, store, split, settings, deadline, show_progress, init)
        else:
            scores = fit_full_mode(runtime, split, settings, deadline, run_dir(models, split, settings), world, show_progress)
        if not world.main:
            return None
        return _register(store, runtime, split, scores, settings, models, parent, time.monotonic() - start)
    finally:
        ddp.shutdown(world)


def run_dir(models: ModelSettings, split: Split, settings: TrainSettings) -> Path:
    """Checkpoints of a full-mode run: one directory per (snapshot, settings), so rerunning
    the same command resumes it."""
    digest = hashlib.sha256(settings.model_dump_json(exclude={"max_minutes", "resume", "promote"}).encode()).hexdigest()[:12]
    return Path(models.artifacts_dir) / ".runs" / f"{split.snapshot.snapshot_id}-{digest}"


def _register(store: Store, runtime: ModelRuntime, split: Split, scores: Scores, settings: TrainSettings, models: ModelSettings,
              parent: str | None, seconds: float) -> TrainResult:
    metrics = pair_metrics(*scores.heldout) if len(scores.heldout[0]) else {"accuracy": float("nan")}
    metrics.update({"train_accuracy": pair_metrics(*scores.fit)["accuracy"], "steps": float(scores.steps), "train_seconds": seconds})
    metrics.update({k: float(v) for k, v in scores.num_pairs.items()})
    metrics.update(scores.extra)
    current = registry.promoted(store)
    if current is not None and split.heldout:
        metrics["baseline_accuracy"] = baseline_accuracy(current, runtime, store, split.heldout, models)
        parent = parent or current.version
    reference = np.concatenate(scores.fit)
    reward_mean, reward_std = float(reference.mean()), float(reference.std() or 1.0)

    version, number = registry.next_version(store)
    directory = Path(models.artifacts_dir) / version
    staging = directory.with_name(directory.name + ".tmp")
    if staging.exists():  # left by a run that died before registering
        shutil.rmtree(staging)
    backbone, key = settings.backbone, runtime.backbone_key
    if settings.mode == "full":  # the fine-tuned backbone travels with the version
        backbone, key = _save_backbone(runtime, staging)
    meta = {
        "version": version, "mode": settings.mode, "backbone": backbone, "base_backbone": settings.backbone, "backbone_key": key,
        "format": runtime.spec.model_dump(), "format_hash": runtime.spec.hash, "autocast_bf16": runtime.autocast_bf16,
        "pooling": runtime.model.pooling, "ensemble_size": runtime.model.ensemble_size, "reward_mean": reward_mean,
        "reward_std": reward_std, "metrics": metrics, "snapshot_id": split.snapshot.snapshot_id, "parent": parent,
        "settings": settings.model_dump(mode="json"), "golden": golden_items(runtime, split.heldout or split.fit),
        "golden_tolerance": 0.02,
    }
    if settings.export_onnx:
        meta["onnx"] = _export_onnx(runtime, staging, split.heldout or split.fit)
    score = runtime.model.score
    bias = score.bias.detach().numpy() if score.bias is not None else np.zeros(score.out_features, dtype=np.float32)
    registry.write_head_artifact(directory, meta, score.weight.detach().numpy(), bias)
    rec = registry.ModelRecord(version, parent, split.snapshot.snapshot_id, settings.backbone, runtime.spec.hash, "candidate",
                               metrics, reward_mean, reward_std, runtime.model.ensemble_size, str(directory))
    registry.register(store, rec, number)
    promoted, message = (False, f"{version} left as candidate")
    if settings.promote:
        promoted, message = registry.promote(store, version, settings.gate_tolerance)
    return TrainResult(version, promoted, message, metrics, seconds)


def reusable_head(version: registry.ModelRecord, runtime: ModelRuntime) -> tuple[np.ndarray, np.ndarray] | None:
    """A version's heads ([K, H] weight, [K] bias) when they read the features this runtime
    computes (head mode, same backbone, formatting and pooling); None otherwise."""
    directory = Path(version.artifact_path)
    meta = json.loads((directory / "version.json").read_text())
    if not (meta["mode"] == "head" and meta["backbone_key"] == runtime.backbone_key
            and meta["format_hash"] == runtime.spec.hash and meta.get("pooling") == runtime.model.pooling):
        return None
    head = load_file(str(directory / "head.safetensors"))
    return head["weight"], head["bias"]


def parent_heads(store: Store | None, runtime: ModelRuntime) -> tuple[np.ndarray, np.ndarray] | None:
    """The promoted version's heads when a warm start can use them (same features, same K)."""
    current = registry.promoted(store) if store is not None else None
    head = reusable_head(current, runtime) if current is not None else None
    if head is None or head[0].shape[0] != runtime.model.ensemble_size:
        return None
    log.info("warm start from %s's heads", current.version)
    return head


def baseline_accuracy(current: registry.ModelRecord, runtime: ModelRuntime, store: Store, heldout: list[Pair],
                      models: ModelSettings) -> float:
    """The promoted version's accuracy on this run's held-out pairs. The held-out set grows as
    labels arrive, so the promotion gate compares the candidate with it on the same pairs.
    A head-mode version on the same backbone and formatting reuses the cached features."""
    head = reusable_head(current, runtime)
    if head is not None:
        features = cached_features(runtime, store, heldout, 4096, deadline=float("inf"), show_progress=False)
        pairs = [p for p in heldout if p.chosen_id in features and p.rejected_id in features]
        weight, bias = head  # [K, H], [K]
        r_chosen = (np.stack([features[p.chosen_id] for p in pairs]) @ weight.T + bias).mean(1)  # [N]
        r_rejected = (np.stack([features[p.rejected_id] for p in pairs]) @ weight.T + bias).mean(1)
        return float(pair_metrics(r_chosen, r_rejected)["accuracy"])
    from rm_service.evaluate import evaluate_pairs

    other, _ = registry.load_artifact(Path(current.artifact_path), settings=models)
    return float(evaluate_pairs(other, heldout, show_progress=False).overall["accuracy"])


def _save_backbone(runtime: ModelRuntime, staging: Path) -> tuple[str, str]:
    """Write the fine-tuned backbone and tokenizer into the version's staging directory;
    the artifact names it relatively ("./backbone")."""
    target = staging / "backbone"
    target.mkdir(parents=True, exist_ok=True)
    runtime.model.backbone.save_pretrained(target)
    runtime.tokenizer.save_pretrained(target)
    return "./backbone", backbone_key(target, "./backbone")


ONNX_CHECK_PAIRS = 64


def _export_onnx(runtime: ModelRuntime, staging: Path, pairs: list[Pair]) -> dict:
    """model.onnx (parity-checked against torch) and, if it orders pairs alike, model.int8.onnx."""
    from rm_service.models.onnx_backend import build_onnx_artifacts

    staging.mkdir(parents=True, exist_ok=True)
    items = [(runtime.format(p.prompt, p.chosen), runtime.format(p.prompt, p.rejected)) for p in pairs[:ONNX_CHECK_PAIRS]]
    report = build_onnx_artifacts(runtime, staging, items)
    for key in ("fp32_path", "int8_path"):  # relative to the version directory, which is renamed
        report[key] = Path(report[key]).name if report.get(key) else None
    log.info("ONNX export: max relative difference %.2g; int8 agreement %.4f (%s)", report["max_rel_diff"],
             report["int8_agreement"], "kept" if report["int8_kept"] else "deleted")
    return report


def golden_items(runtime: ModelRuntime, pairs: list[Pair]) -> list[dict]:
    """A few items with their scores now, computed one item per batch (as the load check does)."""
    chosen = pairs[:GOLDEN_ITEMS]
    items = [runtime.format(p.prompt, p.chosen) for p in chosen]
    raw = runtime.run(items, max_batch_tokens=1).mean(axis=1)
    return [{"prompt": [m.as_dict() for m in p.prompt], "completion": p.chosen, "raw_score": float(r)} for p, r in zip(chosen, raw)]
