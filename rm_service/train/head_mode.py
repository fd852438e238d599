"""Head mode: frozen backbone, features cached in the store, score heads fitted on them.

Features of each (conversation, completion) are computed once per backbone, pooling and
formatting hash and cached in the store, so a retrain after new labels only runs the
backbone on the new completions. An interrupted run keeps what it cached: running it
again resumes where it stopped.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch
from tqdm import tqdm

from rm_service.errors import FailedPrecondition
from rm_service.models.runtime import ModelRuntime
from rm_service.settings import TrainSettings
from rm_service.store.db import Pair, Store, get_features, put_features
from rm_service.train.data import Split
from rm_service.train.heads import fit_heads
from rm_service.train.scores import Scores

log = logging.getLogger(__name__)


def fit_head_mode(runtime: ModelRuntime, store: Store, split: Split, settings: TrainSettings, deadline: float,
                  show_progress: bool, init: tuple[np.ndarray, np.ndarray] | None = None) -> Scores:
    """Fit the K heads (from `init`, [K, H] and [K], when given), install them in
    runtime.model.score, return the rewards of every split."""
    features = cached_features(runtime, store, split.heldout + split.validation + split.fit, settings.feature_batch_tokens,
                               deadline, show_progress)
    have = lambda pairs: [p for p in pairs if p.chosen_id in features and p.rejected_id in features]  # noqa: E731
    fit, validation, heldout = have(split.fit), have(split.validation), have(split.heldout)
    if len(fit) < 2:
        raise FailedPrecondition(f"only {len(fit)} training pairs have features within the budget; raise max_minutes")
    h_w, h_l = _stack(features, fit)
    margin = np.array([p.strength or 0.0 for p in fit], dtype=np.float32) if any(p.strength for p in fit) else None
    result = fit_heads(h_w, h_l, _stack(features, validation) if validation else None, settings.ensemble_size,
                       settings.learning_rate, settings.weight_decay, settings.batch_size, settings.max_steps, settings.patience,
                       settings.center_coef, margin, settings.seed, deadline=max(deadline, time.monotonic() + 30), init=init)
    runtime.model.score = _linear(result.weight, result.bias)

    def rewards(pairs: list[Pair]) -> tuple[np.ndarray, np.ndarray]:
        if not pairs:
            return np.zeros(0), np.zeros(0)
        w, l = _stack(features, pairs)
        return (w @ result.weight.T + result.bias).mean(1), (l @ result.weight.T + result.bias).mean(1)  # [N]

    return Scores(fit=rewards(fit), heldout=rewards(heldout), steps=result.steps,
                  num_pairs={"train_pairs": len(fit) + len(validation), "validation_pairs": len(validation), "heldout_pairs": len(heldout)})


def feature_key(runtime: ModelRuntime) -> str:
    """Cache key of a backbone's features: its identity and how tokens are pooled."""
    return f"{runtime.backbone_key}:{runtime.model.pooling}"


def cached_features(runtime: ModelRuntime, store: Store, pairs: list[Pair], batch_tokens: int, deadline: float,
                    show_progress: bool = True, chunk: int = 128) -> dict[str, np.ndarray]:
    """{completion_id: features [H]} for every completion in `pairs` that fits in the budget.

    Cached rows are read back; missing ones are computed in chunks (in the order given)
    and written to the cache after each chunk, so nothing done is lost.
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


def _stack(features: dict[str, np.ndarray], pairs: list[Pair]) -> tuple[np.ndarray, np.ndarray]:
    return np.stack([features[p.chosen_id] for p in pairs]), np.stack([features[p.rejected_id] for p in pairs])


def _linear(weight: np.ndarray, bias: np.ndarray) -> torch.nn.Linear:
    layer = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=True)
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(weight))
        layer.bias.copy_(torch.from_numpy(bias))
    return layer
