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

from rm_service.conversation import (
    Message,
    canonical_json,
    completion_id,
    conversation_id,
    validate_finite,
    validate_messages,
    validate_text,
)
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


MAX_ID_CHARS = 200  # label_id, annotator, task_id, metadata keys
MAX_METADATA_ENTRIES = 64


def validate_label(label: LabelIn, field: str, max_chars: int, max_responses: int, max_strength: float) -> None:
    """Raise InvalidArgument naming `field.<name>` for the first problem found.

    Every check costs time and memory in proportion to the label's size, never to a value in
    it: ranks are compared with K (a rank of 2**32 costs what a rank of 1 does), strengths with
    `max_strength`, texts with `max_chars`, K with `max_responses`.
    """
    _short_text(label.label_id, f"{field}.label_id", "is required (a client-chosen unique id)")
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
    _validate_ranks(label.ranks, k, f"{field}.ranks")
    if label.strength is not None:
        validate_finite(label.strength, f"{field}.strength", minimum=0.0, maximum=max_strength)
    validate_provenance(label, field, max_chars)


def validate_provenance(label, field: str, max_chars: int) -> None:
    """What every label kind carries beside its payload (a LabelIn or a FeedbackIn): source,
    annotator, rationale, task id and metadata, bounded. O(size)."""
    if label.source not in SOURCES:
        raise InvalidArgument(
            f"{field}.source", f"unknown source {str(label.source)[:40]!r}; expected one of {', '.join(SOURCES)}"
        )
    _short_text(label.annotator, f"{field}.annotator", "is required (a person's id or a judge model id)")
    validate_text(label.rationale, f"{field}.rationale", max_chars, required=False)
    if label.task_id:
        _short_text(label.task_id, f"{field}.task_id", "")
    if len(label.metadata) > MAX_METADATA_ENTRIES:
        raise InvalidArgument(
            f"{field}.metadata", f"has {len(label.metadata)} entries; the limit is {MAX_METADATA_ENTRIES}"
        )
    for key, value in label.metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise InvalidArgument(f"{field}.metadata", "must map strings to strings")
        _short_text(key, f"{field}.metadata", "keys must not be empty")
        validate_text(value, f"{field}.metadata[{key!r}]", max_chars, required=False)


def _validate_ranks(ranks: list[int], k: int, field: str) -> None:
    """One integer rank per response, each in [0, k), together a dense ranking. O(k)."""
    if len(ranks) != k:
        raise InvalidArgument(field, f"needs one rank per response ({k}), got {len(ranks)}")
    for i, rank in enumerate(ranks):
        if isinstance(rank, bool) or not isinstance(rank, int):
            raise InvalidArgument(f"{field}[{i}]", f"must be an integer, got {type(rank).__name__}")
        if not 0 <= rank < k:
            shown = (
                rank
                if -(10**20) < rank < 10**20
                else f"{'-' if rank < 0 else ''}an integer of {rank.bit_length()} bits"
            )
            raise InvalidArgument(
                f"{field}[{i}]", f"is {shown}; a rank must be in [0, {k}) for {k} responses (0 = best)"
            )
    used = set(ranks)
    missing = [r for r in range(max(used) + 1) if r not in used]  # max(used) < k: bounded by K
    if missing:
        raise InvalidArgument(
            field,
            f"{list(ranks)} is not a dense ranking: rank {missing[0]} is unused "
            "(0 = best, every rank up to the worst used)",
        )


def _short_text(value: str, field: str, when_empty: str) -> None:
    """An id-like string: at most MAX_ID_CHARS characters; required unless when_empty is ''."""
    if not isinstance(value, str):
        raise InvalidArgument(field, f"must be a string, got {type(value).__name__}")
    if when_empty and not value.strip():
        raise InvalidArgument(field, when_empty)
    if len(value) > MAX_ID_CHARS:
        raise InvalidArgument(field, f"is longer than {MAX_ID_CHARS} characters")
    validate_text(value, field, required=False)


@dataclass(frozen=True)
class PreparedLabel:
    """A validated label with what its rows need, computed before it joins a group commit."""

    label: LabelIn
    field: str  # its place in its request, e.g. "labels[3]", for reasons given at commit
    payload_hash: str
    conversation_id: str
    messages_json: str
    completion_ids: list[str]
    metadata_json: str
    origin: str  # provenance of its completions not yet stored: the ingest path's, never the client's


def prepare_label(
    label: LabelIn, field: str, origin: str, max_chars: int, max_responses: int, max_strength: float
) -> PreparedLabel:
    """Validate a label and compute its ids and JSON columns; InvalidArgument names the field.
    O(size of the label); runs in the caller's thread, outside the store's writer."""
    validate_label(label, field, max_chars, max_responses, max_strength)
    try:
        conv = conversation_id(label.prompt)
        return PreparedLabel(
            label,
            field,
            label.payload_hash(),
            conv,
            canonical_json(label.prompt),
            [completion_id(conv, text) for text in label.responses],
            json.dumps(label.metadata, sort_keys=True),
            origin,
        )
    except (TypeError, ValueError) as exc:  # validate_label should have caught it; still, this label alone fails
        raise InvalidArgument(field, f"cannot be stored: {type(exc).__name__}: {exc}") from None


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
