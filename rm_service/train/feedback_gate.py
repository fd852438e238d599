"""Session feedback as evidence for the promotion rule: the thumbs and outcomes given to the
policy's sessions since the parent's snapshot, label by label.

Each feedback label (one conversation: its per-turn thumbs and its outcome) is read by the
candidate and by the parent as the feedback objective reads it (train.feedback):

    ll(thumb)   = y log sigmoid(r_t - b_thumb) + (1 - y) log(1 - sigmoid(r_t - b_thumb))
    ll(outcome) = y log sigmoid(V - b_outcome) + (1 - y) log(1 - sigmoid(V - b_outcome))
    gain_i      = sum over label i's thumbs and outcome of ll(candidate) - ll(parent)    [nats per label]

A label's thumbs are summed into its one gain, so the interval runs over labels (the turns of
one session are not independent). The candidate's side comes from a model that never saw the
label: with cross-fitting (head mode), the new training labels are split into folds by
conversation and each fold is read by heads refitted without it, as train.crossfit does for
on-policy pairs; the new held-out labels are read by the version itself. The parent reads
feedback with its own offsets (and session head) when it was trained on feedback. A parent
trained on pairs alone has no offsets: it gets the most favourable ones, fitted per fold on the
other folds' labels (one number per kind, the candidate's form sigmoid(r - b)), so a candidate
wins only by ordering turns and sessions better, not by having an offset at all.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy.special import expit

from rm_service.evidence import Effect, gain_effect
from rm_service.store.feedback import StoredFeedback
from rm_service.train import feedback as fb
from rm_service.train.heads import HeadFit, fold_of

OFFSET_PRIOR = 0.1  # ridge on a fitted offset (pulls towards P = 1/2 at the mean reward): finite with one class


@dataclass(frozen=True)
class Reader:
    """How a version reads feedback: turn heads ([K, F], [K]), its session head (None: the
    session value sums the turn rewards) and its offsets (thumb_offset, outcome_offset)."""

    weight: np.ndarray
    bias: np.ndarray
    session: tuple[np.ndarray, np.ndarray] | None
    offsets: dict[str, float]

    @classmethod
    def of(cls, fit: HeadFit, fallback: dict[str, float] | None = None) -> Reader:
        return cls(fit.weight, fit.bias, fit.session, {**(fallback or {}), **fit.offsets})


@dataclass(frozen=True)
class LabelRead:
    """One label as a model reads it before offsets: its thumbed turns' rewards and thumbs [T],
    its session value and outcome (None: the label has no outcome); `offsets` the reader's."""

    r_thumb: np.ndarray
    y_thumb: np.ndarray
    value: float | None
    y_outcome: float | None
    offsets: dict[str, float]

    def same_items(self, other: LabelRead) -> bool:
        return len(self.y_thumb) == len(other.y_thumb) and (self.value is None) == (other.value is None)


def read_label(label: StoredFeedback, vector, have, reader: Reader, use: dict[str, bool]) -> LabelRead | None:
    """The label under `reader` (features `vector(id)` [F] where `have(id)`); None when none of
    its items has features."""
    data = fb.feedback_data([label], vector, have, **use)
    if data.empty:
        return None
    r_thumb = (data.x_thumb @ reader.weight.T + reader.bias).mean(1) if len(data.y_thumb) else np.zeros(0)  # [T]
    value = None
    if len(data.y_outcome):
        value = float(fb.session_values(data, *(reader.session or (reader.weight, reader.bias)))[0])
    y_outcome = float(data.y_outcome[0]) if len(data.y_outcome) else None
    return LabelRead(r_thumb, data.y_thumb, value, y_outcome, reader.offsets)


def candidate_reads(
    new_train: list[StoredFeedback],
    new_heldout: list[StoredFeedback],
    fit: HeadFit,
    refit: Callable[[int], HeadFit | None],
    folds: int,
    vector,
    have,
    use: dict[str, bool],
) -> dict[str, tuple[StoredFeedback, LabelRead]]:
    """{label id: (label, the candidate's read of it by a model that never saw it)}: held-out
    labels by the version's heads `fit`; training labels by `refit(k)`, the heads refitted
    without fold k (None: nothing left to fit, the fold is no evidence)."""
    out: dict[str, tuple[StoredFeedback, LabelRead]] = {}
    full = Reader.of(fit)
    for label in new_heldout:
        read = read_label(label, vector, have, full, use)
        if read is not None:
            out[label.label_id] = (label, read)
    fold = [fold_of(fb.split_key(label), folds) for label in new_train]
    for k in sorted(set(fold)):
        heads = refit(k)
        if heads is None:
            continue
        reader = Reader.of(heads, fit.offsets)  # a kind absent from the refit's data keeps the full fit's offset
        for label, f in zip(new_train, fold, strict=True):
            read = read_label(label, vector, have, reader, use) if f == k else None
            if read is not None:
                out[label.label_id] = (label, read)
    return out


def fit_offset(r: np.ndarray, y: np.ndarray) -> float:
    """argmin over b of the BCE of sigmoid(r - b) against y [n] plus OFFSET_PRIOR/2 (b - mean r)^2
    (Newton's method: convex in b); 0 without items."""
    if len(r) == 0:
        return 0.0
    centre = float(r.mean())
    b = centre
    for _ in range(100):
        p = expit(r - b)  # [n]
        grad = float((y - p).sum()) + OFFSET_PRIOR * (b - centre)
        hess = float((p * (1 - p)).sum()) + OFFSET_PRIOR
        step = grad / hess
        b -= float(np.clip(step, -5.0, 5.0))
        if abs(step) < 1e-10:
            break
    return b


def out_of_fold_offsets(reads: list[LabelRead], folds: list[int], kind: str) -> list[float]:
    """Each label's offset of `kind` ("thumb" or "outcome"): the reader's own when it has one,
    else fitted on the labels of the other folds."""
    key = f"{kind}_offset"
    fitted: dict[int, float] = {}

    def without(k: int) -> float:
        if k not in fitted:
            others = [o for o, f in zip(reads, folds, strict=True) if f != k]
            if kind == "thumb":
                r = np.concatenate([o.r_thumb for o in others] or [np.zeros(0)])
                y = np.concatenate([o.y_thumb for o in others] or [np.zeros(0)])
            else:
                r = np.array([o.value for o in others if o.value is not None])
                y = np.array([o.y_outcome for o in others if o.value is not None])
            fitted[k] = fit_offset(r, y)
        return fitted[k]

    return [read.offsets[key] if key in read.offsets else without(k) for read, k in zip(reads, folds, strict=True)]


def label_loglik(read: LabelRead, thumb_offset: float, outcome_offset: float) -> tuple[float, float, int]:
    """(log-likelihood of the label's thumbs and outcome in nats, the items read right (the
    probability on the label's side of 1/2; ties and outcomes of exactly 1/2 count half), items)."""
    logit = np.concatenate([read.r_thumb - thumb_offset, [] if read.value is None else [read.value - outcome_offset]])
    y = np.concatenate([read.y_thumb, [] if read.y_outcome is None else [read.y_outcome]])  # [T (+1)]
    ll = -float((np.logaddexp(0.0, logit) - y * logit).sum())
    right = np.where((y == 0.5) | (logit == 0), 0.5, ((logit > 0) == (y > 0.5)).astype(float))
    return ll, float(right.sum()), len(y)


def feedback_effect(
    candidate: dict[str, tuple[StoredFeedback, LabelRead]],
    parent: dict[str, LabelRead],
    folds: int,
    confidence: float,
) -> Effect | None:
    """The candidate's mean per-label log-likelihood gain over the parent on the labels both
    read alike, with its interval; accuracies over the labels' items. None without labels."""
    ids = [i for i in candidate if i in parent and candidate[i][1].same_items(parent[i])]
    if not ids:
        return None
    fold = [fold_of(fb.split_key(candidate[i][0]), folds) for i in ids]
    sides = []
    for reads in ([candidate[i][1] for i in ids], [parent[i] for i in ids]):
        thumb, outcome = out_of_fold_offsets(reads, fold, "thumb"), out_of_fold_offsets(reads, fold, "outcome")
        sides.append([label_loglik(r, t, o) for r, t, o in zip(reads, thumb, outcome, strict=True)])
    gains = np.array([c[0] - p[0] for c, p in zip(*sides, strict=True)])  # [n] nats per label
    items = max(sum(c[2] for c in sides[0]), 1)
    accuracy = sum(c[1] for c in sides[0]) / items
    parent_accuracy = sum(p[1] for p in sides[1]) / items
    return gain_effect(gains, accuracy, parent_accuracy, confidence)
