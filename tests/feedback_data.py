"""Feedback labels made from the shared HH-RLHF pairs, for the feedback tests.

Each pair gives two conversations that differ only in their last assistant turn: the chosen
one's last turn gets a thumbs-up, the rejected one's a thumbs-down; as session outcomes, the
chosen conversation succeeded (1.0) and the rejected one failed (0.0).
"""

from __future__ import annotations

import json

from conftest import hh_lines

from rm_service.formats.hh import HHFormatError, parse_pair
from rm_service.store.feedback import FeedbackIn, TurnThumb


def hh_feedback(n: int | None, thumbs: bool = True, outcomes: bool = False) -> list[FeedbackIn]:
    """Feedback labels of the first n HH lines (None: all): thumbs on both last turns, and/or outcomes."""
    out = []
    for number, line in enumerate(hh_lines(n), 1):
        try:
            pair = parse_pair(json.loads(line))
        except HHFormatError:  # a few lines are not pairs (the HH importer rejects them too)
            continue
        last = len(pair.prompt)
        for kind, text, good in (("chosen", pair.chosen, True), ("rejected", pair.rejected, False)):
            conversation = [*pair.prompt, type(pair.prompt[0])("assistant", text)]
            out.append(
                FeedbackIn(
                    label_id=f"hh-{number}-{kind}",
                    conversation=conversation,
                    thumbs=[TurnThumb(last, good)] if thumbs else [],
                    outcome=(1.0 if good else 0.0) if outcomes else None,
                    source="IMPORT",
                    annotator="hh-rlhf",
                    metadata={"line": str(number), "side": kind},
                )
            )
    return out
