"""A retrain's promotion decision: the evidence gathered from the run, then registry.decide.

Two groups of pairs neither model trained on:
- human:    the run's held-out dataset pairs (split by conversation, the same every run);
- onpolicy: labels of the policy's samples committed after the parent's snapshot (the parent
            never saw them): in head mode all of them, each with its cross-fitted reward
            (train.crossfit); elsewhere the held-out share of on-policy pairs.
The parent scores the same pairs (its cached features in head mode, else it is loaded), and
each group's per-pair log-likelihood gain becomes an Effect with its interval
(rm_service.evidence). A third group, in head mode:
- feedback: thumbs and session outcomes committed after the parent's snapshot (the policy's
            sessions, labeled by people or the gold judge), each label read by a model that never
            saw it (held out, or cross-fitted like the on-policy pairs) and by the parent with its
            cached features: the per-label log-likelihood gain (train.feedback_gate).
The metrics keep the plain accuracies beside the gains for people.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from rm_service import registry
from rm_service.evidence import combined, effect, pairs_needed
from rm_service.models.pooling import Pooling, depth
from rm_service.models.runtime import ModelRuntime
from rm_service.models.version import open_version, read_head, read_meta, read_session_head
from rm_service.settings import ModelSettings, TrainSettings
from rm_service.store.db import Pair, Store
from rm_service.train import feedback as fb
from rm_service.train.features import Candidate
from rm_service.train.feedback_gate import LabelRead, Reader, feedback_effect, read_label
from rm_service.train.full_mode import pair_rewards
from rm_service.train.head_mode import pair_data, pooled, split_features
from rm_service.train.metrics import pair_metrics
from rm_service.train.scores import Scores

Rewards = tuple[np.ndarray, np.ndarray]  # (r_chosen, r_rejected), [N] each


def evidence_since(store: Store | None, parent: registry.ModelRecord | None) -> int | None:
    """The last label seq of the parent's snapshot: on-policy labels after it are new to it."""
    if store is None or parent is None or not parent.snapshot_id:
        return None
    snapshot = store.get_snapshot(parent.snapshot_id)
    assert snapshot is not None  # an id given: the snapshot, or NotFound
    return snapshot.max_seq


def _rows(rewards: Rewards, mask: np.ndarray) -> Rewards:
    return rewards[0][mask], rewards[1][mask]


def decide_retrain(
    store: Store,
    runtime: ModelRuntime,
    scores: Scores,
    settings: TrainSettings,
    models: ModelSettings,
    parent: registry.ModelRecord,
) -> tuple[registry.Decision, dict[str, float]]:
    """The decision on this run's version against `parent`, and the metrics it adds."""
    heldout = scores.heldout_pairs
    human = ~np.array([p.on_policy for p in heldout], dtype=bool)  # [M]
    if scores.onpolicy_evidence is not None:
        on_pairs, r_onpolicy = scores.onpolicy_evidence
    else:
        on_pairs = [p for p in heldout if p.on_policy]
        r_onpolicy = _rows(scores.heldout, ~human)
    on_pairs = on_pairs if settings.gate_onpolicy else []
    human_pairs = [p for p, h in zip(heldout, human, strict=True) if h]
    both = baseline_rewards(parent, runtime, store, human_pairs + on_pairs, settings, models)  # [H + O]
    split = np.arange(len(human_pairs) + len(on_pairs)) < len(human_pairs)
    parent_h, parent_o = _rows(both, split), _rows(both, ~split)
    conf = settings.gate_confidence
    e_human = effect(_rows(scores.heldout, human), parent_h, conf)
    e_onpolicy = effect(r_onpolicy, parent_o, conf) if on_pairs else None
    e_feedback = None
    if settings.gate_feedback and scores.feedback_evidence:
        reads = parent_feedback_reads(
            parent, runtime, store, [lab for lab, _ in scores.feedback_evidence.values()], settings
        )
        folds = max(settings.gate_crossfit_folds, 2)
        e_feedback = feedback_effect(scores.feedback_evidence, reads, folds, conf) if reads is not None else None
    e_both = combined(e_human, e_onpolicy, settings.gate_onpolicy_share, conf, e_feedback)
    decision = registry.decide(e_human, e_onpolicy, e_both, conf, parent.version, feedback=e_feedback)
    if decision.verdict == "undecided":  # asked in the policy's evidence: its pairs, or its feedback labels without
        policy = e_onpolicy if e_onpolicy is not None else e_feedback
        decision = dataclasses.replace(decision, pairs_needed=pairs_needed(policy, conf, settings.gate_min_effect))
    metrics = decision.as_metrics()
    if heldout:
        metrics.update({f"baseline_{k}": v for k, v in pair_metrics(*both).items() if k in ("accuracy", "loss")})
    for name, pairs, cand, base in (
        ("human", human_pairs, _rows(scores.heldout, human), parent_h),
        ("onpolicy", on_pairs, r_onpolicy, parent_o),
    ):
        if pairs:
            c, b = pair_metrics(*cand), pair_metrics(*base)
            metrics.update({f"accuracy_{name}": c["accuracy"], f"loss_{name}": c["loss"], f"pairs_{name}": len(pairs)})
            metrics.update({f"baseline_accuracy_{name}": b["accuracy"], f"baseline_loss_{name}": b["loss"]})
    metrics["gate_onpolicy_labels"] = float(len({p.label_id for p in on_pairs}))
    return decision, metrics


def parent_feedback_reads(
    parent: registry.ModelRecord,
    runtime: ModelRuntime,
    store: Store,
    labels: list,
    settings: TrainSettings,
) -> dict[str, LabelRead] | None:
    """{label id: the parent's read of it} (its heads, session head and offsets on this run's
    cached features); None when the parent cannot be read that way (not a head-mode version of
    this backbone and formatting, or it reads layers this run's cut backbone lacks)."""
    head = reusable_head(parent.artifact_path, runtime)
    if head is None or settings.mode != "head":
        return None
    pooling, weight, bias = head
    methods = ("last", "mean") if pooling.method == "last+mean" else (pooling.method,)
    cands = [Candidate(layer, m) for layer in pooling.layers for m in methods]
    if not cands or max(c.layer for c in cands) > depth(runtime.model.backbone):
        return None
    feats, _ = split_features(runtime, store, [], cands, settings, math.inf, False, fb.requests(labels))
    has = lambda cid: all(cid in feats[c] for c in cands)
    info = read_meta(parent.artifact_path).info.get("feedback", {})
    offsets = {k: float(v) for k, v in info.items() if k.endswith("_offset")}  # none: trained on pairs alone
    reader = Reader(weight, bias, read_session_head(parent.artifact_path), offsets)
    use = {"thumbs": settings.thumb_weight > 0, "outcomes": settings.outcome_weight > 0}
    reads = {lab.label_id: read_label(lab, lambda cid: pooled(feats, pooling, cid), has, reader, use) for lab in labels}
    return {i: r for i, r in reads.items() if r is not None}


def reusable_head(directory, runtime: ModelRuntime) -> tuple[Pooling, np.ndarray, np.ndarray] | None:
    """A version's (pooling, heads [K, F], [K]) when they read features this runtime computes
    (head mode, same backbone and formatting); None otherwise."""
    meta = read_meta(directory)
    if not (
        meta.mode == "head" and meta.backbone_key == runtime.backbone_key and meta.format_hash == runtime.spec.hash
    ):
        return None
    return (meta.pooling, *read_head(directory))


def baseline_rewards(
    parent: registry.ModelRecord,
    runtime: ModelRuntime,
    store: Store,
    pairs: list[Pair],
    settings: TrainSettings,
    models: ModelSettings,
) -> Rewards:
    """The parent's (r_chosen, r_rejected) on `pairs`, so candidate and parent are compared on
    the same pairs. A head-mode parent whose features this run has cached reuses them; any
    other is loaded."""
    if not pairs:
        return np.zeros(0), np.zeros(0)
    head = reusable_head(parent.artifact_path, runtime)
    if head is not None and settings.mode == "head":
        pooling, weight, bias = head
        methods = ("last", "mean") if pooling.method == "last+mean" else (pooling.method,)
        cands = [Candidate(layer, m) for layer in pooling.layers for m in methods]
        if cands and max(c.layer for c in cands) <= depth(runtime.model.backbone):  # still in the (cut) backbone
            feats, _ = split_features(runtime, store, pairs, cands, settings, math.inf, show_progress=False)
            d = pair_data(feats, pooling, pairs, settings)
            return (d.x_w @ weight.T + bias).mean(1), (d.x_l @ weight.T + bias).mean(1)  # [N]
    other, _ = open_version(
        parent.artifact_path, device=str(runtime.device), precision=runtime.precision, settings=models
    )
    return pair_rewards(other, pairs, settings.feature_batch_tokens)
