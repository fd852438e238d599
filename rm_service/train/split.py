"""Held-out split by conversation, never by pair: every pair of a conversation falls on the
same side, so held-out accuracy measures prompts the model never saw."""

from __future__ import annotations

import hashlib


def is_heldout(conversation_id: str, fraction: float, seed: int = 0) -> bool:
    digest = hashlib.sha256(f"{seed}:{conversation_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction
