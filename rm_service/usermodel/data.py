"""The user model's data: the store's conversations, split by conversation as the reward model's are.

A conversation is a ranking label's prompt carried on by its best-ranked response: its user
turns are real people's, and after its last (assistant) turn the person ended it. Labels of a
policy's samples are left out (their last turn is a policy's, and nobody ended the
conversation after it), as is a conversation that is the beginning of a longer stored one (its
"end" is not one). One conversation per prompt.

The split is the reward model's (rm_service.train.data) by construction: a conversation is
held out when its prompt's id hashes below `TrainSettings.heldout_fraction` with
`TrainSettings.seed`, the very test that holds its pairs out of reward-model training; of the
rest, the validation share (seed + 1) stops the fine-tune early. Nothing the reward model
holds out is learned by the user model, so both can be evaluated on the same conversations.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from rm_service.conversation import Message, canonical_json
from rm_service.errors import FailedPrecondition
from rm_service.settings import StoreSettings, TrainSettings
from rm_service.store.db import Snapshot, Store
from rm_service.store.read import dialogues, feedback_conversations
from rm_service.train.split import is_heldout

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Conversation:
    conversation_id: str  # the prompt's id: what the split goes by
    messages: list[Message]  # ends with the assistant turn after which the user left


@dataclass
class UserSplit:
    snapshot: Snapshot | None
    fit: list[Conversation]
    validation: list[Conversation]
    heldout: list[Conversation]


def store_conversations(store: Store, snapshot: Snapshot) -> list[Conversation]:
    """The snapshot's conversations that real people ended (see the module docstring)."""
    seen: dict[str, Conversation] = {}
    for d in dialogues(store, snapshot):
        if d.origin.startswith("policy@") or d.conversation_id in seen:
            continue
        if not any(m.role == "user" for m in d.messages):
            continue
        seen[d.conversation_id] = Conversation(d.conversation_id, d.messages)
    convs = list(seen.values())
    prefixes = {canonical_json(c.messages[:i]) for c in convs for i in range(1, len(c.messages))}
    kept = [c for c in convs if canonical_json(c.messages) not in prefixes]
    if len(kept) < len(convs):
        log.info("%d conversations are the start of a longer one and are left out", len(convs) - len(kept))
    return kept


def split(convs: list[Conversation], settings: TrainSettings) -> tuple[list, list, list]:
    """(fit, validation, held-out) by the reward model's rule."""
    heldout = [c for c in convs if is_heldout(c.conversation_id, settings.heldout_fraction, settings.seed)]
    rest = [c for c in convs if not is_heldout(c.conversation_id, settings.heldout_fraction, settings.seed)]
    validation = [c for c in rest if is_heldout(c.conversation_id, settings.heldout_fraction, settings.seed + 1)]
    fit = [c for c in rest if not is_heldout(c.conversation_id, settings.heldout_fraction, settings.seed + 1)]
    return fit, validation, heldout


def fit_half(convs: list[Conversation], half: str, seed: int) -> list[Conversation]:
    """`all`, or half `a` / `b` of the conversations: disjoint, by the conversation id's hash
    (seed + 2, independent of the held-out and validation tests)."""
    if half == "all":
        return convs
    return [c for c in convs if is_heldout(c.conversation_id, 0.5, seed + 2) == (half == "a")]


def prepare_split(store: Store, split_settings: TrainSettings | None = None) -> UserSplit:
    """A new snapshot of the store, its conversations, split."""
    snapshot = store.create_snapshot()
    convs = store_conversations(store, snapshot)
    if not convs:
        raise FailedPrecondition("the store holds no conversations of people (dataset labels); import some first")
    fit, validation, heldout = split(convs, split_settings or TrainSettings())
    if not fit:
        raise FailedPrecondition(f"all {len(convs)} conversations are held out or for validation: import more")
    log.info(
        "snapshot %s: %d conversations to fit, %d validation, %d held out (%d user turns)",
        snapshot.snapshot_id,
        len(fit),
        len(validation),
        len(heldout),
        sum(m.role == "user" for c in convs for m in c.messages),
    )
    return UserSplit(snapshot, fit, validation, heldout)


def file_conversations(path: Path, fmt: str) -> list[Conversation]:
    """The conversations of any file the importer reads, parsed exactly as `rm-service import`
    parses it (through an in-memory store): rankings' prompts with their best response, and the
    whole conversations of feedback labels that end with an assistant turn."""
    from rm_service.formats import import_file

    store = Store(StoreSettings(path=":memory:"))
    try:
        import_file(store, path, fmt)
        snapshot = store.create_snapshot()
        convs = store_conversations(store, snapshot)
        seen = {c.conversation_id for c in convs}
        for cid, messages in feedback_conversations(store, snapshot):
            if cid not in seen and messages[-1].role == "assistant" and any(m.role == "user" for m in messages):
                convs.append(Conversation(cid, messages))
        return convs
    finally:
        store.close()
