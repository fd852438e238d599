"""Judging with position swap (Zheng et al., 2023; Wang et al., 2023): every comparison is
judged twice, with the replies in both orders, and the two verdicts are mapped back to the
replies themselves.

A SwapJudgment holds one judge's two verdicts on replies (i, j): `order1` with i shown as A,
`order2` with j shown as A, each as "first" (i better), "second" (j better) or "tie", and
each order's margin for i (choice mode: the log-odds of i's letter over j's; generate mode:
+1, -1 or 0). The verdicts are consistent when they agree; otherwise the verdict followed the
position, not the content (a position flip), and the `inconsistent` policy decides:

- "calibrate": Balanced Position Calibration (Wang et al., 2023): the pair goes to the reply
  whose margin summed over both orders is positive. A pull towards one position adds the same
  amount to the margin of whichever reply sits there, so it cancels in the sum. In generate
  mode a split verdict (+1 and -1) sums to 0: a tie; a win in one order and a tie in the
  other stays a win;
- "tie": MT-Bench's rule: a win counts only if it holds in both orders;
- "skip": no outcome for that pair.

K-way items are judged by tournament (every pair, both orders) or by direct ranking (the
whole list in the given and the reversed order, each ranking read as pairwise outcomes).
A panel of judges votes by summing everyone's pair outcomes: Copeland scores (a win 1, a tie
0.5), ranked densely, best first.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from itertools import combinations
from typing import Literal

from rm_service.conversation import Message
from rm_service.judge.backend import JudgeBackend
from rm_service.judge.templates import Template, builtin, load_template, pairwise_messages, ranking_messages
from rm_service.judge.verdict import (
    CHOICE_LABELS,
    ParseFailure,
    Position,
    choice_verdict,
    parse_pairwise,
    parse_ranking,
)

Outcome = Literal["first", "second", "tie"]


@dataclass(frozen=True)
class SwapJudgment:
    judge: str
    i: int
    j: int
    order1: Outcome
    order2: Outcome
    rationale: str
    margin1: float = 0.0  # i's margin over j with i shown first
    margin2: float = 0.0  # i's margin over j with j shown first

    @property
    def flipped(self) -> bool:
        """The verdict changed when the order of the replies was swapped."""
        return self.order1 != self.order2


def outcome(position: Position, swapped: bool) -> Outcome:
    """A verdict about positions (A shown first) as a verdict about replies (i, j)."""
    if position == "tie":
        return "tie"
    return "first" if (position == "A") != swapped else "second"


Policy = Literal["calibrate", "tie", "skip"]


def combine_orders(jd: SwapJudgment, policy: Policy, tie_margin: float = 0.0) -> Outcome | None:
    """The pair's outcome: the verdict when both orders agree, else as the policy says."""
    if jd.order1 == jd.order2:
        return jd.order1
    if policy == "calibrate":
        mean = (jd.margin1 + jd.margin2) / 2
        return "tie" if abs(mean) <= tie_margin else "first" if mean > 0 else "second"
    return "tie" if policy == "tie" else None


def copeland_ranks(k: int, judgments: list[SwapJudgment], policy: Policy, tie_margin: float = 0.0) -> list[int] | None:
    """Dense ranks (0 = best) from Copeland scores over every judge's pair outcomes; None when
    the policy left no outcome at all."""
    scores = [0.0] * k
    counted = 0
    for jd in judgments:
        result = combine_orders(jd, policy, tie_margin)
        if result is None:
            continue
        counted += 1
        if result == "first":
            scores[jd.i] += 1.0
        elif result == "second":
            scores[jd.j] += 1.0
        else:
            scores[jd.i] += 0.5
            scores[jd.j] += 0.5
    if not counted:
        return None
    levels = sorted(set(scores), reverse=True)
    return [levels.index(s) for s in scores]


class Judge:
    """One backend with its templates and decision mode: judges pairs in both orders."""

    def __init__(self, backend: JudgeBackend, settings):
        self.backend = backend
        self.settings = settings
        custom = load_template(settings.template_file) if settings.template_file else None
        self.pairwise: Template = (
            custom if custom and custom.kind == "pairwise" else builtin("pairwise", settings.decision)
        )
        self.ranking: Template = (
            custom if custom and custom.kind == "ranking" else builtin("ranking", settings.decision)
        )
        self.calls = 0  # answers asked of the backend (retries included)
        self._calls_lock = threading.Lock()

    @property
    def model_id(self) -> str:
        return self.backend.model_id

    def _count(self, n: int = 1) -> None:
        with self._calls_lock:
            self.calls += n

    def pair(self, prompt: list[Message], responses: list[str], i: int, j: int) -> SwapJudgment:
        """Replies i and j judged in both orders. Raises ParseFailure when an order stays unparseable."""
        s = self.settings
        chats = [
            pairwise_messages(
                self.pairwise, prompt, responses[a], responses[b], s.max_conversation_chars, s.max_response_chars
            )
            for a, b in ((i, j), (j, i))
        ]
        if s.decision == "choice":
            self._count(2)
            verdicts = [choice_verdict(lp, s.choice_tie_margin) for lp in self.backend.choose(chats, CHOICE_LABELS)]
        else:
            verdicts = [self._generate(chat, parse_pairwise) for chat in chats]
        rationale = (
            f"[{self.model_id}, {i} vs {j}] order {i},{j}: {verdicts[0].rationale} | order {j},{i}: "
            f"{verdicts[1].rationale}"
        )
        return SwapJudgment(
            self.model_id,
            i,
            j,
            outcome(verdicts[0].position, False),
            outcome(verdicts[1].position, True),
            rationale,
            margin1=verdicts[0].margin,
            margin2=-verdicts[1].margin,
        )

    def direct(self, prompt: list[Message], responses: list[str]) -> list[SwapJudgment]:
        """One ranking of all replies in the given order and one in the reversed order, as pair judgments."""
        s = self.settings
        k = len(responses)
        orders = [list(range(k)), list(reversed(range(k)))]
        ranks_by_order, rationales = [], []
        for order in orders:
            chat = ranking_messages(
                self.ranking, prompt, [responses[n] for n in order], s.max_conversation_chars, s.max_response_chars
            )
            shown_ranks, rationale = self._generate(chat, lambda text: parse_ranking(text, k))
            ranks = [0] * k
            for shown, original in enumerate(order):
                ranks[original] = shown_ranks[shown]
            ranks_by_order.append(ranks)
            rationales.append(rationale)
        rationale = f"[{self.model_id}, ranking] given order: {rationales[0]} | reversed order: {rationales[1]}"
        return [
            SwapJudgment(
                self.model_id,
                i,
                j,
                _pair_outcome(ranks_by_order[0], i, j),
                _pair_outcome(ranks_by_order[1], i, j),
                rationale,
                margin1=_sign(ranks_by_order[0], i, j),
                margin2=_sign(ranks_by_order[1], i, j),
            )
            for i, j in combinations(range(k), 2)
        ]

    def _generate(self, chat: list[Message], parse):
        """Generate and parse; an unparseable answer is retried `parse_retries` times, then raised."""
        s = self.settings
        failure: ParseFailure | None = None
        for attempt in range(s.parse_retries + 1):
            self._count()
            text = self.backend.generate(chat, s.max_new_tokens, s.temperature if attempt == 0 else s.retry_temperature)
            try:
                return parse(text)
            except ParseFailure as exc:
                failure = exc
        raise ParseFailure(f"{self.model_id}: {failure} (after {s.parse_retries + 1} attempts)")


def _pair_outcome(ranks: list[int], i: int, j: int) -> Outcome:
    return "first" if ranks[i] < ranks[j] else "second" if ranks[j] < ranks[i] else "tie"


def _sign(ranks: list[int], i: int, j: int) -> float:
    return float((ranks[i] < ranks[j]) - (ranks[j] < ranks[i]))


def judge_item(judges: list[Judge], prompt: list[Message], responses: list[str], kway: str) -> list[SwapJudgment]:
    """Every judge's swap judgments of an item: one pair, a tournament, or direct rankings."""
    out: list[SwapJudgment] = []
    for judge in judges:
        if len(responses) > 2 and kway == "direct":
            out.extend(judge.direct(prompt, responses))
        else:
            out.extend(judge.pair(prompt, responses, i, j) for i, j in combinations(range(len(responses)), 2))
    return out
