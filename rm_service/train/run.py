"""A head-mode training run: snapshot -> pairs -> cached features -> score heads -> version.

Features of each (conversation, completion) are computed once per backbone and formatting
hash and cached in the store, so a retrain after new labels only runs the backbone on the
new completions. Runs within a wall-clock budget; an interrupted run keeps its cached
features, so running it again resumes where it stopped.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from rm_service import registry
from rm_service.errors import FailedPrecondition
from rm_service.models.runtime import ModelRuntime, load_backbone_runtime
from rm_service.settings import ModelSettings, TrainSettings
from rm_service.store.db import Pair, Store, get_features, put_features
from rm_service.train.heads import fit_heads
from rm_service.train.metrics import pair_metrics
from rm_service.train.split import is_heldout

log = logging.getLogger(__name__)
GOLDEN_ITEMS = 4


@dataclass
class TrainResult:
    version: str
    promoted: bool
    gate_message: str
    metrics: dict
    seconds: float


def train(store: Store, settings: TrainSettings, models: ModelSettings | None = None, show_progress: bool = True,
          parent: str | None = None) -> TrainResult:
    start = time.monotonic()
    deadline = start + settings.max_minutes * 60
    models = models or ModelSettings()
    snapshot = store.create_snapshot()
    pairs = store.pairs(snapshot)
    if not pairs:
        raise FailedPrecondition("the store holds no preference pairs; import or ingest labels first")
    train_pairs = [p for p in pairs if not is_heldout(p.conversation_id, settings.heldout_fraction, settings.seed)]
    held_pairs = [p for p in pairs if is_heldout(p.conversation_id, settings.heldout_fraction, settings.seed)]
    if settings.max_pairs is not None and len(train_pairs) > settings.max_pairs:
        train_pairs = random.Random(settings.seed).sample(train_pairs, settings.max_pairs)
    log.info("snapshot %s: %d train pairs, %d held-out pairs", snapshot.snapshot_id, len(train_pairs), len(held_pairs))

    runtime = load_backbone_runtime(settings.backbone, settings.max_tokens, settings.ensemble_size, precision=settings.precision, settings=models)
    features = cached_features(runtime, store, held_pairs + train_pairs, settings.feature_batch_tokens, deadline, show_progress)
    train_pairs = [p for p in train_pairs if p.chosen_id in features and p.rejected_id in features]
    held_pairs = [p for p in held_pairs if p.chosen_id in features and p.rejected_id in features]
    if len(train_pairs) < 2:
        raise FailedPrecondition(f"only {len(train_pairs)} training pairs have features within the budget; raise max_minutes")

    # Early stopping watches a validation split carved from the training conversations, so
    # the held-out pairs stay unseen until the final measurement.
    val_pairs = [p for p in train_pairs if is_heldout(p.conversation_id, settings.heldout_fraction, settings.seed + 1)]
    fit_pairs = [p for p in train_pairs if not is_heldout(p.conversation_id, settings.heldout_fraction, settings.seed + 1)]
    if not val_pairs or not fit_pairs:
        fit_pairs, val_pairs = train_pairs, []
    h_w, h_l = _stack(features, fit_pairs)
    validation = _stack(features, val_pairs) if val_pairs else None
    heldout = _stack(features, held_pairs) if held_pairs else None
    margin = np.array([p.strength or 0.0 for p in fit_pairs], dtype=np.float32) if any(p.strength for p in fit_pairs) else None
    fit = fit_heads(h_w, h_l, validation, settings.ensemble_size, settings.learning_rate, settings.weight_decay,
                    settings.batch_size, settings.max_steps, settings.patience, settings.center_coef, margin,
                    settings.seed, deadline=max(deadline, time.monotonic() + 30))

    def rewards(h: np.ndarray) -> np.ndarray:
        return (h @ fit.weight.T + fit.bias).mean(axis=1)  # [N, H] -> [N]

    train_metrics = pair_metrics(rewards(h_w), rewards(h_l))
    metrics = pair_metrics(*map(rewards, heldout)) if heldout else {"accuracy": float("nan")}
    metrics.update({"train_accuracy": train_metrics["accuracy"], "train_pairs": float(len(train_pairs)),
                    "validation_pairs": float(len(val_pairs)),
                    "heldout_pairs": float(len(held_pairs)), "head_steps": float(fit.steps)})
    reference = rewards(np.concatenate([h_w, h_l]))
    reward_mean, reward_std = float(reference.mean()), float(reference.std() or 1.0)

    version, number = registry.next_version(store)
    runtime.model.score = _linear(fit.weight, fit.bias)
    golden = golden_items(runtime, held_pairs or train_pairs)
    meta = {
        "version": version, "mode": "head", "backbone": settings.backbone, "backbone_key": runtime.backbone_key,
        "format": runtime.spec.model_dump(), "format_hash": runtime.spec.hash, "autocast_bf16": runtime.autocast_bf16,
        "pooling": runtime.model.pooling,
        "ensemble_size": settings.ensemble_size, "reward_mean": reward_mean, "reward_std": reward_std,
        "metrics": metrics, "snapshot_id": snapshot.snapshot_id, "parent": parent,
        "settings": settings.model_dump(mode="json"), "golden": golden, "golden_tolerance": 0.02,
    }
    directory = Path(models.artifacts_dir) / version
    registry.write_head_artifact(directory, meta, fit.weight, fit.bias)
    rec = registry.ModelRecord(version, parent, snapshot.snapshot_id, settings.backbone, runtime.spec.hash, "candidate",
                               metrics, reward_mean, reward_std, settings.ensemble_size, str(directory))
    registry.register(store, rec, number)
    promoted, message = (False, f"{version} left as candidate")
    if settings.promote:
        promoted, message = registry.promote(store, version, settings.gate_tolerance)
    return TrainResult(version, promoted, message, metrics, time.monotonic() - start)


def cached_features(runtime: ModelRuntime, store: Store, pairs: list[Pair], batch_tokens: int, deadline: float,
                    show_progress: bool = True, chunk: int = 128) -> dict[str, np.ndarray]:
    """{completion_id: features [H]} for every completion in `pairs` that fits in the budget.

    Cached rows are read back; missing ones are computed in chunks (held-out pairs first,
    as given) and written to the cache after each chunk, so nothing done is lost.
    """
    todo: dict[str, tuple] = {}
    for p in pairs:
        todo.setdefault(p.chosen_id, (p.prompt, p.chosen))
        todo.setdefault(p.rejected_id, (p.prompt, p.rejected))
    ids = list(todo)
    key = feature_key(runtime)
    cached = get_features(store, key, runtime.spec.hash, ids)
    out = {cid: np.asarray(vec, dtype=np.float32) for cid, (vec, _) in cached.items()}
    missing = [cid for cid in ids if cid not in out]
    log.info("features: %d cached, %d to compute", len(out), len(missing))
    bar = tqdm(total=len(missing), desc="features", unit="seq", disable=not show_progress or not missing)
    tokens, t0 = 0, time.monotonic()
    for begin in range(0, len(missing), chunk):
        if time.monotonic() > deadline:
            log.warning("time budget reached: %d of %d completions have no features and are left out", len(missing) - begin, len(missing))
            break
        part = missing[begin : begin + chunk]
        items = [runtime.format(*todo[cid]) for cid in part]

        def progress(n: int, n_tokens: int) -> None:
            nonlocal tokens
            tokens += n_tokens
            bar.update(n)
            bar.set_postfix(tokens_per_s=f"{tokens / max(time.monotonic() - t0, 1e-9):.0f}")

        vectors = runtime.run(items, batch_tokens, what="features", progress=progress)
        put_features(store, key, runtime.spec.hash, part, vectors, [len(x) for x in items])
        out.update(zip(part, vectors))
    bar.close()
    return out


def feature_key(runtime: ModelRuntime) -> str:
    """Cache key of a backbone's features: its identity and how tokens are pooled."""
    return f"{runtime.backbone_key}:{runtime.model.pooling}"


def golden_items(runtime: ModelRuntime, pairs: list[Pair]) -> list[dict]:
    """A few items with their scores now, computed one item per batch (as the load check does)."""
    chosen = pairs[:GOLDEN_ITEMS]
    items = [runtime.format(p.prompt, p.chosen) for p in chosen]
    raw = runtime.run(items, max_batch_tokens=1).mean(axis=1)
    return [{"prompt": [m.as_dict() for m in p.prompt], "completion": p.chosen, "raw_score": float(r)} for p, r in zip(chosen, raw)]


def _stack(features: dict[str, np.ndarray], pairs: list[Pair]) -> tuple[np.ndarray, np.ndarray]:
    return (np.stack([features[p.chosen_id] for p in pairs]), np.stack([features[p.rejected_id] for p in pairs]))


def _linear(weight: np.ndarray, bias: np.ndarray):
    import torch

    layer = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=True)
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(weight))
        layer.bias.copy_(torch.from_numpy(bias))
    return layer
