"""Head mode: frozen backbone, candidate features cached in the store, score heads fitted on
the candidate chosen by cross-validation.

1. Features of every completion of the split, for every candidate (layer x pooling), in the
   measured precision, with shared prompts (train.features); a retrain after new labels
   only runs the backbone on the new completions.
2. Options: each layer's last token, its completion mean, both; and every layer together.
   `select_head` scores each option and L2 penalty by 5-fold CV (never the held-out split).
   With fewer than 50 pairs and feedback labels (thumbs, outcomes: train.feedback), the choice
   is made by CV of the feedback loss instead (`select_feedback_head`).
3. The K heads are fitted on all training pairs (and feedback labels) with the chosen option and penalty, and
   installed in the runtime's model with the chosen pooling (the backbone is cut after the
   deepest layer read, as it will be when the version is served).
"""

from __future__ import annotations

import logging
import time

import numpy as np
from tqdm import tqdm

from rm_service.errors import FailedPrecondition
from rm_service.models.pooling import Pooling, truncate
from rm_service.models.runtime import ModelRuntime
from rm_service.models.version import linear
from rm_service.settings import TrainSettings
from rm_service.store.db import Pair, Store
from rm_service.train import feedback as fb
from rm_service.train.crossfit import crossfit_rewards
from rm_service.train.data import Split, crossfits
from rm_service.train.features import Candidate, Features, cached_features, candidates_for, extraction_pooling
from rm_service.train.feedback_gate import candidate_reads
from rm_service.train.heads import MIN_PAIRS_FOR_CV, PairData, fit_heads, fold_of, select_feedback_head, select_head
from rm_service.train.scores import Scores

log = logging.getLogger(__name__)


def fit_head_mode(
    runtime: ModelRuntime,
    store: Store,
    split: Split,
    settings: TrainSettings,
    deadline: float,
    show_progress: bool,
    init: tuple[Pooling, np.ndarray, np.ndarray] | None = None,
    evidence_since: int | None = None,
) -> Scores:
    """Choose the features and penalty, fit the K heads (from `init`'s heads when it has the
    chosen pooling), install them in runtime.model; return the rewards of every split. With
    `evidence_since` (the parent's snapshot: its last label seq) and cross-fitting on, the
    on-policy training pairs labeled after it get cross-fitted rewards (train.crossfit)."""
    cands = candidates_for(runtime, settings.feature_layers)
    runtime.model.backbone = truncate(
        runtime.model.backbone, extraction_pooling(cands)
    )  # blocks past the deepest candidate never run
    start = time.monotonic()
    turns = fb.requests(
        split.feedback_heldout + split.feedback
    )  # thumbed turns and outcome sessions' turns, after the pairs
    feats, tokens = split_features(
        runtime, store, split.heldout + split.train, cands, settings, deadline, show_progress, turns
    )
    feature_seconds = time.monotonic() - start
    has = lambda cid: all(cid in feats[c] for c in cands)
    have = lambda pairs: [p for p in pairs if has(p.chosen_id) and has(p.rejected_id)]
    train, heldout = have(split.train), have(split.heldout)
    options = feature_options(cands, runtime.spec.kind)
    use = {
        "thumbs": settings.thumb_weight > 0,
        "outcomes": settings.outcome_weight > 0,
    }  # a term weighted 0 does not train
    fb_train = {
        name: fb.feedback_data(split.feedback, lambda cid, p=pooling: pooled(feats, p, cid), has, **use)
        for name, pooling in options.items()
    }
    if len(train) < 2 and next(iter(fb_train.values())).empty:
        raise FailedPrecondition(
            f"only {len(train)} training pairs (and no thumbs or outcomes) have features within the budget; "
            "raise max_minutes"
        )
    data = {name: pair_data(feats, pooling, train, settings) for name, pooling in options.items()}
    if (
        len(train) < MIN_PAIRS_FOR_CV and not next(iter(fb_train.values())).empty
    ):  # too few pairs: choose on the feedback instead
        selection = select_feedback_head(
            fb_train,
            data,
            settings.head_l2,
            (settings.thumb_weight, settings.outcome_weight),
            separate_session=settings.session_head == "separate",
        )
    else:
        selection = select_head(data, settings.head_l2)
    pooling = options[selection.name]
    start_heads = (init[1], init[2]) if init is not None and init[0] == pooling else None
    fit = fit_heads(
        data[selection.name],
        settings.ensemble_size,
        selection.l2,
        settings.seed,
        start_heads,
        feedback=fb_train[selection.name],
        term_weights=(settings.pair_weight, settings.thumb_weight, settings.outcome_weight),
        separate_session=settings.session_head == "separate",
    )
    install(runtime, pooling, fit.weight, fit.bias, fit.session)
    new = np.array([p.on_policy and evidence_since is not None and p.seq > evidence_since for p in train], dtype=bool)
    onpolicy_evidence = None
    if crossfits(settings) and new.any():
        terms = (settings.pair_weight, settings.thumb_weight, settings.outcome_weight)
        oof = crossfit_rewards(
            data[selection.name],
            new,
            settings.gate_crossfit_folds,
            fit,
            settings.ensemble_size,
            settings.seed,
            # a separate session head: outcomes never moved the reward heads, so the refits leave them out too
            fb_train[selection.name].without_outcomes() if fit.session is not None else fb_train[selection.name],
            terms,
        )
        onpolicy_evidence = ([p for p, n in zip(train, new, strict=True) if n], oof)
    feedback_evidence = None
    if evidence_since is not None:
        feedback_evidence = _feedback_evidence(
            split, settings, evidence_since, fit, data[selection.name], fb_train[selection.name], use,
            lambda cid: pooled(feats, pooling, cid), has,
        )  # fmt: skip
    feedback_extra, feedback_info, reference = _feedback_results(
        split, feats, pooling, has, fit, fb_train[selection.name]
    )

    def rewards(pairs: list[Pair]) -> tuple[np.ndarray, np.ndarray]:
        if not pairs:
            return np.zeros(0), np.zeros(0)
        d = pair_data(feats, pooling, pairs, settings)
        return (d.x_w @ fit.weight.T + fit.bias).mean(1), (d.x_l @ fit.weight.T + fit.bias).mean(1)  # [N]

    return Scores(
        fit=rewards(train),
        heldout=rewards(heldout),
        steps=fit.steps,
        heldout_pairs=heldout,
        num_pairs={
            "train_pairs": len(train),
            "validation_pairs": 0,
            "heldout_pairs": len(heldout),
            "onpolicy_train_pairs": sum(p.on_policy for p in train),
        },
        extra={
            "head_l2": selection.l2,
            "head_cv_loss": selection.cv_loss,
            "feature_seconds": feature_seconds,
            "feature_tokens_per_s": tokens / max(feature_seconds, 1e-9),
            "feature_tokens": float(tokens),
            **feedback_extra,
        },
        info={"features": selection.name, "selection": [list(row) for row in selection.table], **feedback_info},
        reference=reference,
        fit_pairs=train,
        onpolicy_evidence=onpolicy_evidence,
        feedback_evidence=feedback_evidence,
    )


def _feedback_evidence(
    split: Split,
    settings: TrainSettings,
    since: int,
    fit,
    pairs: PairData,
    train: fb.FeedbackData,
    use: dict[str, bool],
    vector,
    has,
) -> dict | None:
    """The feedback labels committed after the parent's snapshot (`since`) as this run's version
    reads them without having seen them (train.feedback_gate): the held-out ones, and with
    cross-fitting the training ones, each fold by heads refitted without it."""
    folds = settings.gate_crossfit_folds
    new_heldout = [f for f in split.feedback_heldout if f.seq > since]
    new_train = [f for f in split.feedback if f.seq > since] if crossfits(settings) else []
    if not (new_heldout or new_train):
        return None
    terms = (settings.pair_weight, settings.thumb_weight, settings.outcome_weight)

    def refit(k: int):
        rest = train.rows(lambda g: fold_of(g, folds) != k)
        if rest.empty and len(pairs.x_w) == 0:
            return None
        return fit_heads(
            pairs, settings.ensemble_size, fit.l2, settings.seed, (fit.weight, fit.bias), feedback=rest,
            term_weights=terms, separate_session=settings.session_head == "separate",
        )  # fmt: skip

    return candidate_reads(new_train, new_heldout, fit, refit, max(folds, 2), vector, has, use)


def _feedback_results(
    split: Split, feats: Features, pooling: Pooling, has, fit, train: fb.FeedbackData
) -> tuple[dict, dict, np.ndarray | None]:
    """Held-out and training metrics of the feedback terms (thumb_auc, outcome_auc, ...), the
    version's feedback record (how its session value is made, the offsets) and the training
    turns' rewards; nothing when the run had no feedback."""
    if train.empty:
        return {}, {}, None
    heldout = fb.feedback_data(split.feedback_heldout, lambda cid: pooled(feats, pooling, cid), has)
    metrics = fb.feedback_metrics(heldout, fit.weight, fit.bias, fit.offsets, "", fit.session)
    metrics.update(fb.feedback_metrics(train, fit.weight, fit.bias, fit.offsets, "train_", fit.session))
    reference = (np.concatenate([train.x_thumb, train.x_turn]) @ fit.weight.T + fit.bias).mean(1)  # [T + U]
    head = "separate" if fit.session is not None else "shared"  # which head the session value sums
    return metrics, {"feedback": {"session_value": fb.SESSION_VALUE, "session_head": head, **fit.offsets}}, reference


def split_features(
    runtime: ModelRuntime,
    store: Store,
    pairs: list[Pair],
    cands: list[Candidate],
    settings: TrainSettings,
    deadline: float,
    show_progress: bool,
    turns: dict[str, tuple] | None = None,
) -> tuple[Features, int]:
    """Every candidate's features of the pairs' completions (held-out first, so a budget that
    runs out shortens training, not evaluation), then of the feedback `turns` ({id: (prompt,
    text)}), and the tokens computed."""
    requests: dict[str, tuple] = {}
    for p in pairs:
        requests.setdefault(p.chosen_id, (p.prompt, p.chosen))
        requests.setdefault(p.rejected_id, (p.prompt, p.rejected))
    for cid, request in (turns or {}).items():
        requests.setdefault(cid, request)
    bar = tqdm(total=len(requests), desc="features", unit="seq", disable=not show_progress)
    seen = {"tokens": 0, "t0": time.monotonic()}

    def progress(n: int, n_tokens: int) -> None:
        seen["tokens"] += n_tokens
        bar.update(n)
        bar.set_postfix(tokens_per_s=f"{seen['tokens'] / max(time.monotonic() - seen['t0'], 1e-9):.0f}")

    try:
        feats = cached_features(runtime, store, requests, cands, settings.feature_batch_tokens, deadline, progress)
    finally:
        bar.close()
    return feats, int(seen["tokens"])


def feature_options(cands: list[Candidate], kind: str) -> dict[str, Pooling]:
    """The feature sets head mode chooses among: per layer each pooling (and, for decoders,
    last + mean); and all candidate layers at once."""
    layers = sorted({c.layer for c in cands})
    methods = sorted({c.method for c in cands}) + (["last+mean"] if kind == "causal" else [])
    options = {}
    for method in methods:
        for layer in layers:
            options[f"{method}@{layer}"] = Pooling(layers=(layer,), method=method)
        if len(layers) > 1:
            options[f"{method}@{'+'.join(map(str, layers))}"] = Pooling(layers=tuple(layers), method=method)
    return options


def pooled(feats: Features, pooling: Pooling, completion_id: str) -> np.ndarray:
    """A completion's feature vector under `pooling`, from the cached candidates, in the order
    `models.pooling` concatenates them (per layer: last, then mean)."""
    methods = ("last", "mean") if pooling.method == "last+mean" else (pooling.method,)
    return np.concatenate([feats[Candidate(layer, m)][completion_id] for layer in pooling.layers for m in methods])


def pair_data(feats: Features, pooling: Pooling, pairs: list[Pair], settings: TrainSettings) -> PairData:
    if not pairs:  # feedback-only training: no pair rows, the features' width
        width = sum(
            len(next(iter(feats[Candidate(layer, m)].values()), ()))
            for layer in pooling.layers
            for m in (("last", "mean") if pooling.method == "last+mean" else (pooling.method,))
        )
        return PairData(
            np.zeros((0, width), dtype=np.float32), np.zeros((0, width), dtype=np.float32), np.zeros(0), None, []
        )
    x_w = np.stack([pooled(feats, pooling, p.chosen_id) for p in pairs])  # [N, F]
    x_l = np.stack([pooled(feats, pooling, p.rejected_id) for p in pairs])  # [N, F]
    weight = np.array([settings.onpolicy_weight if p.on_policy else 1.0 for p in pairs])  # [N]
    margin = np.array([p.strength or 0.0 for p in pairs]) if any(p.strength for p in pairs) else None  # [N]
    return PairData(x_w, x_l, weight, margin, [p.conversation_id for p in pairs])


def install(
    runtime: ModelRuntime,
    pooling: Pooling,
    weight: np.ndarray,
    bias: np.ndarray,
    session: tuple[np.ndarray, np.ndarray] | None = None,
) -> None:
    """Make runtime.model the version as it will be served: `pooling`, the backbone cut after
    its deepest layer, the heads ([K, F], [K]) and the session head, if any, on the runtime's device."""
    model = runtime.model
    model.pooling = pooling
    model.backbone = truncate(model.backbone, pooling)
    model.score = linear(weight, bias, runtime.device)
    model.session = linear(*session, runtime.device) if session is not None else None
    runtime.refresh()
