"""Training on feedback beyond pairs: per-turn thumbs and session outcomes (docs/feedback.md).

The reward model stays one function r(prompt, turn): a turn's reward reads the conversation
before it as its prompt, exactly as a pair's completion does, so thumbs, outcomes and pairs
train the same heads and share the feature cache. With r_t the raw reward of turn t:

    thumbs:   P(up | turn t)        = sigmoid(r_t - b_thumb)            logistic loss (BCE)
    outcome:  P(success | session) = sigmoid(V - b_outcome),  V = sum of r_t over the session's
              scored turns (conversation.scored_turns)                 BCE with target y in [0, 1]
    pairs:    P(chosen > rejected) = sigmoid(r_chosen - r_rejected)    Bradley-Terry, as before

Why the sum: per-turn rewards are the rewards of a multi-step episode, and the quantity a
policy optimised on them maximises is their sum, the return. Training the outcome on the
return makes the outcome teach every turn (credit assignment: a turn seen in failed sessions
loses reward, whichever turn it is), where "last" would teach the final turn only, and the mean
would shrink a turn's credit with the session's length and stop being what the per-turn
rewards add up to. The sum's cost is that the reward's constant now matters (each extra turn
adds it to V): outcome training learns it, from sessions of different lengths.

Each term is a weighted mean over its own items (bootstrap counts per ensemble member, like
pairs), scaled by TrainSettings.pair_weight / thumb_weight / outcome_weight; the offsets
b_thumb and b_outcome are fitted with the heads and kept in the version (`info["feedback"]`),
so ScoreTurns can return P(up) per turn and P(success) for the session.

Turn satisfaction and session success are different targets: people upvote turns of sessions
that fail, and a session can succeed through a turn nobody upvoted. One reward explaining both
serves a P(up) that carries nothing when they disagree (tests/test_feedback.py: held-out thumb
AUC 0.50 where a thumbs-only fit reaches 0.92). So by default (TrainSettings.session_head
"separate") the outcomes train a head of their own, the session head, with per-turn credits
v_t = U h_t + c and V = sum of v_t; pairs and thumbs train the turn reward r_t. Each head then
fits what a single-objective fit would (the probe: within 0.03 AUC of each). "shared" keeps V
the sum of the turn rewards (outcomes then also shape every turn's reward, which helps when
they agree with the thumbs). A run with outcomes and no pairs or thumbs has one head either
way: the turn reward is the outcome head.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rm_service.conversation import Message, completion_id, conversation_id, scored_turns
from rm_service.store.feedback import StoredFeedback
from rm_service.train.split import is_heldout

SESSION_VALUE = "sum"  # how a session's value is made from its turn rewards (the docstring says why)


def turn_id(conversation: list[Message], index: int) -> str:
    """The completion id of one assistant turn: the same id a pair with that prompt and text has."""
    return completion_id(conversation_id(conversation[:index]), conversation[index].content)


def turn_request(conversation: list[Message], index: int) -> tuple[list[Message], str]:
    return conversation[:index], conversation[index].content


def split_key(fb: StoredFeedback) -> str:
    """What held-out splits feedback by: the prompt of its first scored turn, so every label on
    one conversation (and on its branches) lands on one side, and a one-turn conversation lands
    where a pair with the same prompt does."""
    return conversation_id(fb.conversation[: scored_turns(fb.conversation)[0]])


def is_heldout_feedback(fb: StoredFeedback, fraction: float, seed: int) -> bool:
    return is_heldout(split_key(fb), fraction, seed)


def requests(labels: list[StoredFeedback]) -> dict[str, tuple[list[Message], str]]:
    """{turn completion id: (prompt, text)} of every turn the labels need features for: the
    thumbed turns, and every scored turn of a session with an outcome."""
    out: dict[str, tuple[list[Message], str]] = {}
    for fb in labels:
        turns = [t.message_index for t in fb.thumbs] + (scored_turns(fb.conversation) if fb.outcome is not None else [])
        for i in turns:
            out.setdefault(turn_id(fb.conversation, i), turn_request(fb.conversation, i))
    return out


@dataclass
class FeedbackData:
    """Feature rows of thumbs and sessions, for one feature set.

    x_thumb [T, F] and y_thumb [T] (1 up, 0 down); x_turn [U, F] every turn of every session,
    session [U] the session each belongs to, y_outcome [S]; thumb_group [T] and session_group
    [S]: split keys (folds never split one; within a group thumbs are compared as pairs)."""

    x_thumb: np.ndarray
    y_thumb: np.ndarray
    x_turn: np.ndarray
    session: np.ndarray
    y_outcome: np.ndarray
    thumb_group: list[str]
    session_group: list[str]

    @property
    def empty(self) -> bool:
        return len(self.y_thumb) == 0 and len(self.y_outcome) == 0

    def without_outcomes(self) -> FeedbackData:
        """The thumbs alone (what the turn reward fits beside a separate session head)."""
        width = self.x_thumb.shape[1]
        return FeedbackData(
            self.x_thumb, self.y_thumb, np.zeros((0, width)), np.zeros(0, dtype=np.int64), np.zeros(0),
            self.thumb_group, [],
        )  # fmt: skip

    def outcomes_only(self) -> FeedbackData:
        """The sessions alone (what a separate session head fits)."""
        width = self.x_turn.shape[1]
        return FeedbackData(
            np.zeros((0, width)), np.zeros(0), self.x_turn, self.session, self.y_outcome, [], self.session_group
        )

    def rows(self, keep_group) -> FeedbackData:
        """The thumbs and sessions whose group `keep_group(key)` keeps."""
        t = np.array([bool(keep_group(g)) for g in self.thumb_group], dtype=bool)
        s = np.array([bool(keep_group(g)) for g in self.session_group], dtype=bool)
        renumber = np.cumsum(s) - 1  # [S]: new session index of each kept session
        u = s[self.session] if len(self.session) else np.zeros(0, dtype=bool)
        return FeedbackData(
            self.x_thumb[t],
            self.y_thumb[t],
            self.x_turn[u],
            renumber[self.session[u]],
            self.y_outcome[s],
            [g for g, k in zip(self.thumb_group, t, strict=True) if k],
            [g for g, k in zip(self.session_group, s, strict=True) if k],
        )


def feedback_data(
    labels: list[StoredFeedback], vector, have, thumbs: bool = True, outcomes: bool = True
) -> FeedbackData:
    """Rows of every thumb whose turn has features (`have(id)`), and every session whose turns
    all have them; `vector(id)` is a turn's feature vector [F]. `thumbs` / `outcomes` False
    leave that kind out (a term weighted 0 does not train)."""
    xt: list = []
    yt: list = []
    xu: list = []
    seg: list = []
    yo: list = []
    gt: list = []
    gs: list = []
    for fb in labels:
        key = split_key(fb)
        for t in fb.thumbs if thumbs else ():
            cid = turn_id(fb.conversation, t.message_index)
            if have(cid):
                xt.append(vector(cid))
                yt.append(1.0 if t.up else 0.0)
                gt.append(key)
        if fb.outcome is not None and outcomes:
            ids = [turn_id(fb.conversation, i) for i in scored_turns(fb.conversation)]
            if all(have(cid) for cid in ids):
                xu.extend(vector(cid) for cid in ids)
                seg.extend([len(yo)] * len(ids))
                yo.append(float(fb.outcome))
                gs.append(key)
    width = len(xt[0]) if xt else (len(xu[0]) if xu else 0)
    stack = lambda rows: np.stack(rows).astype(np.float64) if rows else np.zeros((0, width))
    return FeedbackData(stack(xt), np.array(yt), stack(xu), np.array(seg, dtype=np.int64), np.array(yo), gt, gs)


def session_values(data: FeedbackData, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """Each session's value [S]: the sum of its turns' outputs (ensemble mean) under heads
    ([K, F], [K]): the session head's credits when the version has one, else the turn rewards."""
    r = (data.x_turn @ weight.T + bias).mean(1)  # [U]
    return np.bincount(data.session, weights=r, minlength=len(data.y_outcome))  # [S]


def heldout_loss(
    data: FeedbackData,
    weight: np.ndarray,
    bias: np.ndarray,
    offsets: dict[str, float],
    term_weights: tuple[float, float],
    session: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[float, float]:
    """(weighted BCE summed over thumbs and sessions, their count): what cross-validation scores.
    `session`: a separate session head ([K, F], [K]); None: sessions sum the turn rewards."""
    total, count = 0.0, 0.0
    if len(data.y_thumb):
        logit = (data.x_thumb @ weight.T + bias).mean(1) - offsets.get("thumb_offset", 0.0)
        total += term_weights[0] * float((np.logaddexp(0.0, logit) - data.y_thumb * logit).sum())
        count += term_weights[0] * len(data.y_thumb)
    if len(data.y_outcome):
        logit = session_values(data, *(session or (weight, bias))) - offsets.get("outcome_offset", 0.0)
        total += term_weights[1] * float((np.logaddexp(0.0, logit) - data.y_outcome * logit).sum())
        count += term_weights[1] * len(data.y_outcome)
    return total, count


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """P(score of a random positive > score of a random negative), ties half (Mann-Whitney);
    labels in [0, 1] are thresholded at 0.5. NaN without both classes."""
    pos, neg = scores[labels >= 0.5], scores[labels < 0.5]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    order = np.argsort(np.concatenate([pos, neg]), kind="mergesort")
    ranks = np.empty(len(order))
    values = np.concatenate([pos, neg])[order]
    i = 0
    while i < len(values):  # average ranks over ties
        j = i
        while j + 1 < len(values) and values[j + 1] == values[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def feedback_metrics(
    data: FeedbackData,
    weight: np.ndarray,
    bias: np.ndarray,
    offsets: dict[str, float],
    prefix: str,
    session: tuple[np.ndarray, np.ndarray] | None = None,
) -> dict[str, float]:
    """Metrics of heads ([K, F], [K]) on `data`, with the ensemble mean of raw rewards:
    thumb_auc (does an up turn outrank a down turn, over all pairs of them), thumb_pair_accuracy
    (the same within each conversation group: e.g. two replies to one prompt), accuracy and log
    loss of P(up); the same for outcomes on the session value (from `session`, a separate
    session head, when given); and the counts."""
    out: dict[str, float] = {
        f"{prefix}thumbs": float(len(data.y_thumb)),
        f"{prefix}outcomes": float(len(data.y_outcome)),
    }
    if len(data.y_thumb):
        r = (data.x_thumb @ weight.T + bias).mean(1)  # [T]
        out.update(_binary(f"{prefix}thumb", r - offsets.get("thumb_offset", 0.0), data.y_thumb))
        out.update(_paired(f"{prefix}thumb", r, data.y_thumb, data.thumb_group))
    if len(data.y_outcome):
        value = session_values(data, *(session or (weight, bias)))  # [S]
        out.update(_binary(f"{prefix}outcome", value - offsets.get("outcome_offset", 0.0), data.y_outcome))
        out.update(_paired(f"{prefix}outcome", value, data.y_outcome, data.session_group))
    return out


def _paired(name: str, score: np.ndarray, y: np.ndarray, groups: list[str]) -> dict[str, float]:
    """Within each group, the fraction of (better, worse) label pairs the scores order right (ties half)."""
    by_group: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        by_group.setdefault(g, []).append(i)
    right, total = 0.0, 0
    for rows in by_group.values():
        for i in rows:
            for j in rows:
                if y[i] > y[j]:
                    right += 1.0 if score[i] > score[j] else 0.5 if score[i] == score[j] else 0.0
                    total += 1
    return {f"{name}_pair_accuracy": right / total if total else float("nan"), f"{name}_pairs": float(total)}


def _binary(name: str, logit: np.ndarray, y: np.ndarray) -> dict[str, float]:
    loss = np.logaddexp(0.0, logit) - y * logit  # BCE with logits, soft targets allowed
    hard = y != 0.5
    accuracy = float(np.mean((logit[hard] > 0) == (y[hard] > 0.5))) if hard.any() else float("nan")
    return {f"{name}_auc": auc(logit, y), f"{name}_accuracy": accuracy, f"{name}_loss": float(loss.mean())}
