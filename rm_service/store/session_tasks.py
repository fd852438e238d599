"""Session tasks: conversations a policy played, queued for per-turn thumbs and a session outcome.

The second kind of labeling task (store.tasks holds the queue, leases, renewals and skips of
both). A session task is one whole conversation, every assistant turn included; a labeler (a
person on the labeling page, or a judge: rm_service.judge.sessions) answers it with one feedback
label (store.feedback: thumbs on some of its assistant turns, a session outcome, or both) whose
`task_id` names it and whose conversation is the task's. That label closes the task
(store.rows); the reward model's feedback objective and the user model then learn from it like
any other feedback (docs/feedback.md).

`submit_sessions` is idempotent like `tasks.submit`: the task id is the hash of the kind, the
conversation and the policy version.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from rm_service.conversation import Message, canonical_json, conversation_id, scored_turns, validate_turns
from rm_service.errors import InvalidArgument
from rm_service.store.db import Store
from rm_service.store.tasks import MAX_POLICY_VERSION_CHARS


@dataclass(frozen=True)
class SessionCandidate:
    conversation: list[Message]  # the whole played conversation, oldest first
    policy_version: str = ""
    sampling: dict[str, str] = field(default_factory=dict)
    priority: int = 0


def session_task_id(c: SessionCandidate) -> str:
    blob = json.dumps(["session", canonical_json(c.conversation), c.policy_version], ensure_ascii=False)
    return "task-" + hashlib.sha256(blob.encode()).hexdigest()[:24]


def validate_session(c: SessionCandidate, where: str, max_chars: int) -> None:
    validate_turns(c.conversation, f"{where}.conversation", max_chars)
    if not scored_turns(c.conversation):
        raise InvalidArgument(
            f"{where}.conversation", "has no assistant turn after a user turn; there is nothing to give feedback on"
        )
    if len(c.policy_version) > MAX_POLICY_VERSION_CHARS:
        raise InvalidArgument(f"{where}.policy_version", f"is longer than {MAX_POLICY_VERSION_CHARS} characters")


def submit_sessions(store: Store, sessions: list[SessionCandidate]) -> list[str]:
    """Queue played sessions (all validated first: a bad one fails the call, naming its field)."""
    for i, c in enumerate(sessions):
        validate_session(c, f"sessions[{i}]", store.settings.max_text_chars)
    ids = []
    with store.transaction():
        for c in sessions:
            tid, conv = session_task_id(c), conversation_id(c.conversation)
            store.con.execute(
                "INSERT INTO conversations (id, messages, num_turns) VALUES (?, ?::JSON, ?) ON CONFLICT DO NOTHING",
                [conv, canonical_json(c.conversation), len(c.conversation)],
            )
            store.con.execute(
                """INSERT INTO tasks (task_id, conversation_id, completion_ids, policy_version, priority, state,
                                      sampling, kind)
                   VALUES (?, ?, []::VARCHAR[], ?, ?, 'queued', ?::JSON, 'session') ON CONFLICT DO NOTHING""",
                [tid, conv, c.policy_version, c.priority, json.dumps(c.sampling)],
            )
            ids.append(tid)
    return ids
