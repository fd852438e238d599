"""The store's `models` table: one row per reward-model version of the registry.

Rows are read and written here only; rm_service.registry decides what they mean (the
promotion gate, the promoted pointer, rollback). A version moves candidate -> promoted ->
retired, or to rejected; exactly one is promoted at a time, which `promote_version` keeps
by retiring the promoted one in the same transaction.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from rm_service.store.db import Store
from rm_service.store.tx import one_row


@dataclass
class ModelRecord:
    version: str
    parent: str | None
    snapshot_id: str | None
    backbone: str
    format_hash: str
    status: str
    metrics: dict
    reward_mean: float
    reward_std: float
    ensemble_size: int
    artifact_path: str
    created_at_ms: int | None = None
    decision: dict | None = None  # registry.Decision as a dict, once the version was decided on


_COLUMNS = (
    "version, parent, snapshot_id, backbone, format_hash, status, metrics, reward_mean, reward_std, ensemble_size, "
    "artifact_path, epoch_ms(created_at), decision"
)


def _json(value) -> dict | None:
    return json.loads(value) if isinstance(value, str) else value


def _record(row) -> ModelRecord:
    rec = ModelRecord(*row)
    rec.metrics = _json(rec.metrics) or {}
    rec.decision = _json(rec.decision)
    return rec


def list_versions(store: Store) -> list[ModelRecord]:
    """Every version, in version-number order."""
    with store._lock:
        rows = store.con.execute(f"SELECT {_COLUMNS} FROM models ORDER BY number").fetchall()
    return [_record(r) for r in rows]


def find_version(store: Store, version: str) -> ModelRecord | None:
    with store._lock:
        row = store.con.execute(f"SELECT {_COLUMNS} FROM models WHERE version = ?", [version]).fetchone()
    return _record(row) if row else None


def promoted_version(store: Store) -> ModelRecord | None:
    with store._lock:
        row = store.con.execute(f"SELECT {_COLUMNS} FROM models WHERE status = 'promoted'").fetchone()
    return _record(row) if row else None


def next_version(store: Store) -> tuple[str, int]:
    """The name and number the next registered version takes: v<N+1>."""
    with store._lock:
        number = one_row(store.con, "SELECT coalesce(max(number), 0) + 1 FROM models")[0]
    return f"v{number}", int(number)


def insert_version(store: Store, rec: ModelRecord, number: int) -> None:
    """A new row for `rec`, as a candidate (its status field is not read)."""
    with store._lock:
        store.con.execute(
            """INSERT INTO models (version, number, parent, snapshot_id, backbone, format_hash, status, metrics,
                                   reward_mean, reward_std, ensemble_size, artifact_path)
               VALUES (?, ?, ?, ?, ?, ?, 'candidate', ?, ?, ?, ?, ?)""",
            [
                rec.version,
                number,
                rec.parent,
                rec.snapshot_id,
                rec.backbone,
                rec.format_hash,
                json.dumps(rec.metrics),
                rec.reward_mean,
                rec.reward_std,
                rec.ensemble_size,
                rec.artifact_path,
            ],
        )


def set_status(store: Store, version: str, status: str) -> None:
    with store._lock:
        store.con.execute("UPDATE models SET status = ? WHERE version = ?", [status, version])


def set_decision(store: Store, version: str, decision: dict) -> None:
    """Record the promotion decision made on `version` (what it was compared with and why)."""
    with store._lock:
        store.con.execute("UPDATE models SET decision = ? WHERE version = ?", [json.dumps(decision), version])


def promote_version(store: Store, version: str) -> None:
    """In one transaction: the promoted version (if any) becomes retired, `version` promoted now."""
    with store.transaction() as con:
        con.execute("UPDATE models SET status = 'retired' WHERE status = 'promoted'")
        con.execute("UPDATE models SET status = 'promoted', promoted_at = now() WHERE version = ?", [version])


def last_retired_promotion(store: Store) -> str | None:
    """The retired version promoted most recently (what a rollback returns to), or None."""
    with store._lock:
        row = store.con.execute(
            "SELECT version FROM models WHERE status = 'retired' AND promoted_at IS NOT NULL ORDER BY promoted_at "
            "DESC LIMIT 1"
        ).fetchone()
    return row[0] if row else None
