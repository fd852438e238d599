"""Verdicts and their strict parsing. An answer without exactly one valid verdict is a
ParseFailure: it is retried, then counted and skipped, never guessed.

Positions are the order the judge saw: "A" is the reply shown first. A pairwise verdict is
"A", "B" or "tie". In generate mode the judge writes MT-Bench's format (Zheng et al., 2023):
[[A]], [[B]] or [[C]] (tie), once, anywhere in the answer (a rationale may come before it). In
choice mode the verdict is the letter with the higher next-token log-probability.
A direct ranking is written as [[2>1>3]] (reply numbers best first; "=" for a tie).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal

Position = Literal["A", "B", "tie"]
CHOICE_LABELS = ("A", "B")

_PAIRWISE = re.compile(r"\[\[\s*([ABC])\s*\]\]")
_RANKING = re.compile(r"\[\[\s*(\d+(?:\s*[>=]\s*\d+)*)\s*\]\]")
_ANY_VERDICT = re.compile(r"\[\[[^\[\]]*\]\]")


class ParseFailure(ValueError):
    """The judge's answer holds no single valid verdict."""


@dataclass(frozen=True)
class PairVerdict:
    """One order's verdict, with what supports it (the rationale, or the letters' log-probabilities).
    `margin` is how much A is preferred: log P(A) - log P(B) in choice mode, +1 / -1 / 0 in generate mode."""

    position: Position
    rationale: str
    margin: float


def parse_pairwise(text: str) -> PairVerdict:
    """Exactly one [[A]] / [[B]] / [[C]] (the same verdict repeated is fine); the rest is the rationale."""
    found = set(_PAIRWISE.findall(text))
    if not found:
        raise ParseFailure(f"no [[A]], [[B]] or [[C]] verdict in {_preview(text)}")
    if len(found) > 1:
        raise ParseFailure(f"several different verdicts ({', '.join(sorted(found))}) in {_preview(text)}")
    letter = found.pop()
    return PairVerdict(
        "tie" if letter == "C" else letter, _PAIRWISE.sub("", text).strip(), {"A": 1.0, "B": -1.0, "C": 0.0}[letter]
    )


def parse_ranking(text: str, k: int) -> tuple[list[int], str]:
    """ranks[i] of reply i+1 (0 = best, ties equal) from one [[...]] that names each of 1..k once."""
    found = set(re.sub(r"\s+", "", m) for m in _RANKING.findall(text))
    if not found:
        raise ParseFailure(f"no [[n>m>...]] ranking in {_preview(text)}")
    if len(found) > 1:
        raise ParseFailure(f"several different rankings in {_preview(text)}")
    spec = found.pop()
    groups = [[int(n) for n in level.split("=")] for level in spec.split(">")]
    named = sorted(n for level in groups for n in level)
    if named != list(range(1, k + 1)):
        raise ParseFailure(f"ranking [[{spec}]] must name each reply 1..{k} exactly once")
    ranks = [0] * k
    for rank, level in enumerate(groups):
        for n in level:
            ranks[n - 1] = rank
    return ranks, _ANY_VERDICT.sub("", text).strip()


def choice_verdict(logprobs: dict[str, float], tie_margin: float = 0.0) -> PairVerdict:
    """The letter with the higher log-probability; a tie within `tie_margin`. A letter the
    backend could not score (missing or -inf) is a ParseFailure, not a loss."""
    missing = [label for label in CHOICE_LABELS if not math.isfinite(logprobs.get(label, -math.inf))]
    if missing:
        raise ParseFailure(f"no log-probability for {', '.join(missing)} among the judge's next tokens")
    a, b = logprobs["A"], logprobs["B"]
    position: Position = "tie" if abs(a - b) <= tie_margin else ("A" if a > b else "B")
    p_a = 1.0 / (1.0 + math.exp(max(-700.0, min(700.0, b - a))))  # softmax over the two letters
    return PairVerdict(position, f"P(A)={p_a:.3f} P(B)={1 - p_a:.3f}", a - b)


def _preview(text: str, n: int = 80) -> str:
    text = " ".join(text.split())
    return repr(text if len(text) <= n else text[:n] + "...")
