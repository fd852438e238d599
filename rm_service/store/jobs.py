"""Retraining jobs in the store's `jobs` table: queued -> running -> succeeded | failed.

The table is the job's source of truth, so a job survives the process that ran it: a
server that dies mid-job finds it `running` at the next start and marks it failed
(`fail_interrupted`) rather than pretending it is still going.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field

from rm_service.store.db import Store
from rm_service.store.tx import one_row

ACTIVE = ("queued", "running")
TERMINAL = ("succeeded", "failed")
# Times as epoch seconds: fetching TIMESTAMPTZ values as datetimes would need pytz.
_COLUMNS = (
    "job_id, kind, state, snapshot_id, model_version, promoted, error, metrics, request, epoch(created_at), "
    "epoch(finished_at), decision"
)


@dataclass
class Job:
    job_id: str
    kind: str
    state: str
    snapshot_id: str | None = None
    model_version: str | None = None
    promoted: bool = False
    error: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    request: dict = field(default_factory=dict)
    created_at: float | None = None  # epoch seconds
    finished_at: float | None = None
    decision: dict = field(default_factory=dict)  # the registry's promotion decision on the version (registry.Decision)

    @property
    def done(self) -> bool:
        return self.state in TERMINAL


def _job(row) -> Job:
    job_id, kind, state, snapshot_id, version, promoted, error, metrics, request, created, finished, decision = row
    return Job(
        job_id,
        kind,
        state,
        snapshot_id,
        version,
        bool(promoted),
        error,
        json.loads(metrics) if metrics else {},
        json.loads(request) if request else {},
        created,
        finished,
        json.loads(decision) if decision else {},
    )


def create_job(store: Store, kind: str, request: dict) -> tuple[Job, bool]:
    """A new queued job, unless one of this kind is already queued or running: then that one.
    Returns (job, created?). Check and insert run in one transaction under the writer lock."""
    with store.transaction() as con:
        row = con.execute(
            f"SELECT {_COLUMNS} FROM jobs WHERE kind = ? AND state IN ('queued', 'running') "
            "ORDER BY created_at LIMIT 1",
            [kind],
        ).fetchone()
        if row is not None:
            return _job(row), False
        job_id = f"job-{uuid.uuid4().hex[:12]}"
        con.execute(
            "INSERT INTO jobs (job_id, kind, state, request) VALUES (?, ?, 'queued', ?)",
            [job_id, kind, json.dumps(request)],
        )
        row = con.execute(f"SELECT {_COLUMNS} FROM jobs WHERE job_id = ?", [job_id]).fetchone()
    return _job(row), True


def get_job(store: Store, job_id: str) -> Job | None:
    with store._lock:
        row = store.con.execute(f"SELECT {_COLUMNS} FROM jobs WHERE job_id = ?", [job_id]).fetchone()
    return _job(row) if row else None


def list_jobs(store: Store, limit: int = 20) -> list[Job]:
    with store._lock:
        rows = store.con.execute(f"SELECT {_COLUMNS} FROM jobs ORDER BY created_at DESC LIMIT ?", [limit]).fetchall()
    return [_job(r) for r in rows]


def mark_running(store: Store, job_id: str) -> None:
    with store.transaction() as con:
        con.execute("UPDATE jobs SET state = 'running' WHERE job_id = ?", [job_id])


def mark_succeeded(
    store: Store,
    job_id: str,
    snapshot_id: str | None,
    version: str,
    promoted: bool,
    metrics: dict[str, float],
    decision: dict | None = None,
) -> None:
    with store.transaction() as con:
        con.execute(
            "UPDATE jobs SET state = 'succeeded', snapshot_id = ?, model_version = ?, promoted = ?, metrics = ?, "
            "decision = ?, finished_at = now() WHERE job_id = ?",
            [snapshot_id, version, promoted, json.dumps(metrics), json.dumps(decision or {}), job_id],
        )


def mark_failed(store: Store, job_id: str, error: str) -> None:
    with store.transaction() as con:
        con.execute(
            "UPDATE jobs SET state = 'failed', error = ?, finished_at = now() WHERE job_id = ?", [error, job_id]
        )


def fail_interrupted(store: Store) -> int:
    """Jobs left queued or running by a process that is gone become failed. Returns how many."""
    with store.transaction() as con:
        n = one_row(con, "SELECT count(*) FROM jobs WHERE state IN ('queued', 'running')")[0]
        con.execute(
            "UPDATE jobs SET state = 'failed', error = 'interrupted: the server stopped before the job finished; "
            "request it again', finished_at = now() WHERE state IN ('queued', 'running')"
        )
    return int(n)
