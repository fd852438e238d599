"""A preference label as the store takes it: validation, payload hash, pair expansion.

A label ranks K >= 2 responses to one prompt. `ranks[i]` is the rank of `responses[i]`
(0 = best, equal ranks = a tie) and must be a dense ranking: every value from 0 to
max(ranks) appears. Pairs for Bradley-Terry are expanded by PAIR_POLICY (see `expand_pairs`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from itertools import combinations
from typing import Literal

from rm_service.conversation import Message, validate_finite, validate_messages, validate_text
from rm_service.errors import InvalidArgument

SOURCES = ("HUMAN", "JUDGE", "IMPORT")
Status = Literal["INSERTED", "DUPLICATE", "REJECTED", "CONFLICT"]


@dataclass(frozen=True)
class LabelIn:
    label_id: str
    prompt: list[Message]
    responses: list[str]
    ranks: list[int]
    source: str
    annotator: str
    strength: float | None = None
    rationale: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    task_id: str = ""

    def payload_hash(self) -> str:
        """Hash of everything but label_id: a retry has the same hash, a conflict another."""
        payload = {
            "prompt": [m.as_dict() for m in self.prompt],
            "responses": self.responses,
            "ranks": self.ranks,
            "source": self.source,
            "annotator": self.annotator,
            "strength": self.strength,
            "rationale": self.rationale,
            "metadata": dict(sorted(self.metadata.items())),
            "task_id": self.task_id,
        }
        return hashlib.sha256(json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()).hexdigest()


@dataclass(frozen=True)
class IngestOutcome:
    label_id: str
    status: Status
    reason: str = ""


def validate_label(label: LabelIn, field: str, max_chars: int, max_responses: int) -> None:
    """Raise InvalidArgument naming `field.<name>` for the first problem found."""
    if not label.label_id.strip():
        raise InvalidArgument(f"{field}.label_id", "is required (a client-chosen unique id)")
    if len(label.label_id) > 200:
        raise InvalidArgument(f"{field}.label_id", "is longer than 200 characters")
    validate_messages(label.prompt, f"{field}.prompt", max_chars)
    k = len(label.responses)
    if k < 2:
        raise InvalidArgument(f"{field}.responses", f"needs at least 2 responses, got {k}")
    if k > max_responses:
        raise InvalidArgument(f"{field}.responses", f"has {k} responses; the limit is {max_responses}")
    for i, text in enumerate(label.responses):
        validate_text(text, f"{field}.responses[{i}]", max_chars)
    if len(set(label.responses)) != k:
        raise InvalidArgument(f"{field}.responses", "responses must all be different")
    if len(label.ranks) != k:
        raise InvalidArgument(f"{field}.ranks", f"needs one rank per response ({k}), got {len(label.ranks)}")
    if sorted(set(label.ranks)) != list(range(max(label.ranks) + 1)):
        raise InvalidArgument(f"{field}.ranks", f"{label.ranks} is not a dense ranking (0 = best, every rank up to the worst used)")
    if label.strength is not None:
        validate_finite(label.strength, f"{field}.strength", minimum=0.0)
    if label.source not in SOURCES:
        raise InvalidArgument(f"{field}.source", f"unknown source {label.source!r}; expected one of {', '.join(SOURCES)}")
    if not label.annotator.strip():
        raise InvalidArgument(f"{field}.annotator", "is required (a person's id or a judge model id)")


PairPolicy = Literal["all", "best"]


def expand_pairs(ranks: list[int], policy: PairPolicy = "all") -> list[tuple[int, int]]:
    """(chosen position, rejected position) pairs of one ranking. Ties give no pair.

    all:  every pair with different ranks (InstructGPT: all K-choose-2 comparisons).
    best: each best-ranked response over each worse one.
    """
    if policy == "best":
        best = min(ranks)
        return [(i, j) for i, ri in enumerate(ranks) if ri == best for j, rj in enumerate(ranks) if rj > best]
    pairs = []
    for i, j in combinations(range(len(ranks)), 2):
        if ranks[i] < ranks[j]:
            pairs.append((i, j))
        elif ranks[j] < ranks[i]:
            pairs.append((j, i))
    return pairs
