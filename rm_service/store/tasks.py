"""The labeling queue: trainers submit their samples, labelers (people or judges) lease them.

A task is of one of two kinds: `ranking`, a prompt with K >= 2 completions to rank, or
`session`, a whole conversation the policy played, for per-turn thumbs and a session outcome
(store.session_tasks; a feedback label answers it). `submit` is idempotent (the task id is
the hash of prompt, completions and policy version). `lease` hands out the highest-priority
tasks that are queued or whose lease expired, marking them leased to `owner` until
now + lease_seconds; a label with `task_id` closes its task (see Store.ingest_batches).
The labeling page also renews a lease while a person works, and releases (skips) a task.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field

from rm_service.conversation import (
    Message,
    canonical_json,
    completion_id,
    conversation_id,
    messages_from_json,
    validate_messages,
    validate_text,
)
from rm_service.errors import Aborted, InvalidArgument, NotFound
from rm_service.store.db import Store
from rm_service.store.schema import TASK_AVAILABLE
from rm_service.store.tx import one_row

POLICY_PREFIX = "policy@"
KINDS = ("ranking", "session")
MAX_POLICY_VERSION_CHARS = 200


@dataclass(frozen=True)
class Candidate:
    prompt: list[Message]
    completions: list[str]
    policy_version: str = ""
    sampling: dict[str, str] = field(default_factory=dict)
    priority: int = 0


@dataclass(frozen=True)
class Task:
    task_id: str
    prompt: list[Message]
    completions: list[str]
    policy_version: str
    lease_expires_unix_ms: int
    kind: str = "ranking"  # ranking | session: then `prompt` is the whole played conversation, `completions` empty


def task_id(c: Candidate) -> str:
    blob = json.dumps([canonical_json(c.prompt), c.completions, c.policy_version], ensure_ascii=False)
    return "task-" + hashlib.sha256(blob.encode()).hexdigest()[:24]


def validate_candidate(c: Candidate, field: str, max_chars: int, max_responses: int) -> None:
    validate_messages(c.prompt, f"{field}.prompt", max_chars)
    if len(c.completions) < 2:
        raise InvalidArgument(
            f"{field}.completions", f"needs at least 2 completions to compare, got {len(c.completions)}"
        )
    if len(c.completions) > max_responses:
        raise InvalidArgument(
            f"{field}.completions", f"has {len(c.completions)} completions; the limit is {max_responses}"
        )
    for i, text in enumerate(c.completions):
        validate_text(text, f"{field}.completions[{i}]", max_chars)
    if len(set(c.completions)) != len(c.completions):
        raise InvalidArgument(f"{field}.completions", "completions must all be different")
    if len(c.policy_version) > MAX_POLICY_VERSION_CHARS:
        raise InvalidArgument(f"{field}.policy_version", f"is longer than {MAX_POLICY_VERSION_CHARS} characters")


def policy_origin(policy_version: str) -> str:
    """The stored origin of a policy sample: `policy@<version>`, the prefix written once
    whether or not the client already put it in its version (`policy@step-7` or `step-7`)."""
    version = policy_version
    while version.startswith(POLICY_PREFIX):
        version = version[len(POLICY_PREFIX) :]
    return POLICY_PREFIX + version if version else "policy"


def submit(store: Store, candidates: list[Candidate]) -> list[str]:
    """Queue candidates (all validated first: a bad one fails the call, naming its field)."""
    for i, c in enumerate(candidates):
        validate_candidate(c, f"candidates[{i}]", store.settings.max_text_chars, store.settings.max_responses)
    ids = []
    with store.transaction():
        for c in candidates:
            ids.append(_insert(store, c))
    return ids


def _insert(store: Store, c: Candidate) -> str:
    tid = task_id(c)
    conv = conversation_id(c.prompt)
    q = store.con.execute
    q(
        "INSERT INTO conversations (id, messages, num_turns) VALUES (?, ?::JSON, ?) ON CONFLICT DO NOTHING",
        [conv, canonical_json(c.prompt), len(c.prompt)],
    )
    origin = policy_origin(c.policy_version)
    comp_ids = []
    for text in c.completions:
        cid = completion_id(conv, text)
        comp_ids.append(cid)
        q(
            "INSERT INTO completions (id, conversation_id, text, origin, sampling) VALUES (?, ?, ?, ?, ?::JSON) ON "
            "CONFLICT DO NOTHING",
            [cid, conv, text, origin, json.dumps(c.sampling)],
        )
    q(
        """INSERT INTO tasks (task_id, conversation_id, completion_ids, policy_version, priority, state, sampling)
         VALUES (?, ?, ?, ?, ?, 'queued', ?::JSON) ON CONFLICT DO NOTHING""",
        [tid, conv, comp_ids, c.policy_version, c.priority, json.dumps(c.sampling)],
    )
    return tid


def lease(
    store: Store,
    owner: str,
    max_tasks: int,
    lease_seconds: int,
    resume: bool = False,
    kinds: tuple[str, ...] = ("ranking",),
) -> list[Task]:
    """Lease up to max_tasks tasks of `kinds`, highest priority first, then oldest. A task the owner
    skipped (`release(..., skip=True)`) is never offered to it again. With `resume`, tasks
    whose lease the owner still holds come first and their lease is extended: a reopened
    labeling page gets its task back instead of leaving it leased to nobody."""
    if not owner.strip():
        raise InvalidArgument("owner", "is required (who takes the lease)")
    if max_tasks <= 0:
        raise InvalidArgument("max_tasks", f"must be > 0, got {max_tasks}")
    if lease_seconds <= 0:
        raise InvalidArgument("lease_seconds", f"must be > 0, got {lease_seconds}")
    unknown = sorted(set(kinds) - set(KINDS))
    if not kinds or unknown:
        raise InvalidArgument("kinds", f"must name task kinds of {', '.join(KINDS)}, got {unknown or 'none'}")
    expires_ms = int(time.time() * 1000) + lease_seconds * 1000
    with store.transaction():
        rows = store.con.execute(
            f"""SELECT t.task_id, c.messages, t.completion_ids, coalesce(t.policy_version, ''), t.kind
                FROM tasks t JOIN conversations c ON c.id = t.conversation_id
                WHERE ({TASK_AVAILABLE} OR ($resume AND state = 'leased' AND lease_owner = $owner))
                  AND t.kind IN (SELECT unnest($kinds::VARCHAR[]))
                  AND t.task_id NOT IN (SELECT task_id FROM task_skips WHERE annotator = $owner)
                ORDER BY ($resume AND state = 'leased' AND lease_owner = $owner) DESC, t.priority DESC, t.created_at,
                         t.task_id
                LIMIT $limit""",
            {"owner": owner, "resume": resume, "limit": max_tasks, "kinds": list(kinds)},
        ).fetchall()
        ids = [r[0] for r in rows]
        if ids:
            store.con.execute(
                """UPDATE tasks SET state = 'leased', lease_owner = ?, lease_expires_at = make_timestamptz(? * 1000),
                   lease_count = lease_count + 1 WHERE task_id IN (SELECT unnest(?::VARCHAR[]))""",
                [owner, expires_ms, ids],
            )
        return _tasks(store, rows, expires_ms)


def get(store: Store, task_id: str) -> Task:
    """One task with its prompt and completions, whatever its state (NotFound if unknown)."""
    with store.transaction():
        rows = store.con.execute(
            """SELECT t.task_id, c.messages, t.completion_ids, coalesce(t.policy_version, ''), t.kind,
                      epoch_ms(t.lease_expires_at)
               FROM tasks t JOIN conversations c ON c.id = t.conversation_id WHERE t.task_id = ?""",
            [task_id],
        ).fetchall()
        if not rows:
            raise NotFound(f"task {task_id!r} not found")
        return _tasks(store, [r[:5] for r in rows], rows[0][5] or 0)[0]


def renew(store: Store, task_id: str, owner: str, lease_seconds: int) -> int:
    """Extend the owner's live lease on a task to now + lease_seconds; returns the new expiry
    (unix ms). Aborted when the lease expired or is not the owner's (lease again)."""
    if lease_seconds <= 0:
        raise InvalidArgument("lease_seconds", f"must be > 0, got {lease_seconds}")
    expires_ms = int(time.time() * 1000) + lease_seconds * 1000
    with store.transaction():
        _check_held(store, task_id, owner)
        store.con.execute(
            "UPDATE tasks SET lease_expires_at = make_timestamptz(? * 1000) WHERE task_id = ?", [expires_ms, task_id]
        )
    return expires_ms


def release(store: Store, task_id: str, owner: str, skip: bool = True) -> None:
    """Give a leased task back to the queue at once. With `skip` the owner's skip is recorded
    (task_skips) and `lease` never offers the task to it again. Idempotent: a repeated skip
    of the same task is a no-op; a lease lost meanwhile is Aborted."""
    with store.transaction():
        if (
            skip
            and store.con.execute(
                "SELECT 1 FROM task_skips WHERE task_id = ? AND annotator = ?", [task_id, owner]
            ).fetchone()
        ):
            return
        _check_held(store, task_id, owner)
        store.con.execute(
            "UPDATE tasks SET state = 'queued', lease_owner = NULL, lease_expires_at = NULL WHERE task_id = ?",
            [task_id],
        )
        if skip:
            store.con.execute("INSERT INTO task_skips (task_id, annotator) VALUES (?, ?)", [task_id, owner])


def check_held(store: Store, task_id: str, owner: str, label_id: str | None = None) -> None:
    """NotFound for an unknown task; Aborted unless `owner` holds a live lease on it, or the
    task was closed by `label_id` (a retry of the answer that closed it: ingestion then says
    DUPLICATE, or CONFLICT if the retry differs)."""
    with store.transaction():
        _check_held(store, task_id, owner, label_id)


def _check_held(store: Store, task_id: str, owner: str, label_id: str | None = None) -> None:
    row = store.con.execute(
        "SELECT state, lease_owner, lease_expires_at >= now(), closed_by FROM tasks WHERE task_id = ?", [task_id]
    ).fetchone()
    if row is None:
        raise NotFound(f"task {task_id!r} not found")
    state, lease_owner, live, closed_by = row
    if state == "done" and label_id is not None and closed_by == label_id:
        return
    if state == "done":
        raise Aborted(f"task {task_id} was labeled already; lease the next task")
    if state != "leased" or lease_owner != owner or not live:
        raise Aborted(f"the lease on task {task_id} expired (or was never yours); lease the next task")


def progress(store: Store, annotator: str) -> dict[str, int]:
    """labeled_today: HUMAN labels by `annotator` since midnight (the store's time zone);
    queue_left: tasks it could lease now (available, and not skipped by it)."""
    with store.transaction() as con:
        # An answer's ranking and its thumbs (a feedback label with the same task) count once.
        (today,) = one_row(
            con,
            """SELECT count(DISTINCT coalesce(task_id, label_id)) FROM labels
                               WHERE source = 'HUMAN' AND annotator = ? AND created_at >= current_date""",
            [annotator],
        )
        (left,) = one_row(
            con,
            f"""SELECT count(*) FROM tasks WHERE {TASK_AVAILABLE}
                               AND task_id NOT IN (SELECT task_id FROM task_skips WHERE annotator = ?)""",
            [annotator],
        )
    return {"labeled_today": int(today), "queue_left": int(left)}


def _tasks(store: Store, rows: list[tuple], expires_ms: int) -> list[Task]:
    texts = _texts(store, [cid for r in rows for cid in r[2]])
    return [
        Task(tid, messages_from_json(msgs), [texts[c] for c in comp_ids], pv, expires_ms, kind)
        for tid, msgs, comp_ids, pv, kind in rows
    ]


def _texts(store: Store, ids: list[str]) -> dict[str, str]:
    if not ids:
        return {}
    rows = store.con.execute(
        "SELECT id, text FROM completions WHERE id IN (SELECT unnest(?::VARCHAR[]))", [ids]
    ).fetchall()
    return dict(rows)
