"""The store's `models` table: one row per model version of the registry.

Rows are read and written here only; rm_service.registry decides what they mean (the
promotion gate, the promoted pointer, rollback). Versions come in kinds, each numbered on its
own: `reward` (v1, v2, ...: reward models) and `user` (u1, u2, ...: user models, the
simulators of rm_service.usermodel). A version moves candidate -> promoted -> retired, or to
rejected; exactly one of each kind is promoted at a time, which `promote_version` keeps by
retiring the promoted one of its kind in the same transaction.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Protocol

from rm_service.store.db import Store
from rm_service.store.tx import one_row


class VersionFacts(Protocol):
    """What a version directory's metadata says of it (models.version.VersionMeta, usermodel's UserVersionMeta)."""

    version: str
    parent: str | None
    snapshot_id: str | None
    base_backbone: str
    format_hash: str
    metrics: dict[str, float]


@dataclass(kw_only=True)
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
    kind: str = "reward"  # reward | user (KINDS)

    @classmethod
    def of_version(cls, meta: VersionFacts, artifact_path: str, status: str) -> ModelRecord:
        """The record of a version directory. A user model's metadata has no reward statistics: it
        serves no rewards, so the identity normalisation and one head."""
        return cls(
            version=meta.version,
            parent=meta.parent,
            snapshot_id=meta.snapshot_id,
            backbone=meta.base_backbone,
            format_hash=meta.format_hash,
            status=status,
            metrics=meta.metrics,
            reward_mean=getattr(meta, "reward_mean", 0.0),
            reward_std=getattr(meta, "reward_std", 1.0),
            ensemble_size=getattr(meta, "ensemble_size", 1),
            artifact_path=artifact_path,
            kind=getattr(meta, "kind", "reward"),
        )

    @classmethod
    def external(cls, name: str, format_hash: str, ensemble_size: int, kind: str = "reward") -> ModelRecord:
        """A model served from outside the registry (a directory or a bundled name): no parent, no
        snapshot, the identity normalisation."""
        return cls(
            version=Path(name).name,
            parent=None,
            snapshot_id=None,
            backbone=name,
            format_hash=format_hash,
            status="external",
            metrics={},
            reward_mean=0.0,
            reward_std=1.0,
            ensemble_size=ensemble_size,
            artifact_path=name,
            kind=kind,
        )


KINDS = {"reward": "v", "user": "u"}  # kind -> the prefix of its version names


_COLUMNS = (
    "version, parent, snapshot_id, backbone, format_hash, status, metrics, reward_mean, reward_std, ensemble_size, "
    "artifact_path, epoch_ms(created_at), decision, kind"
)


def _json(value) -> dict | None:
    return json.loads(value) if isinstance(value, str) else value


def _record(row) -> ModelRecord:
    values = dict(zip((f.name for f in fields(ModelRecord)), row, strict=True))  # _COLUMNS are the fields, in order
    return ModelRecord(**{**values, "metrics": _json(values["metrics"]) or {}, "decision": _json(values["decision"])})


def list_versions(store: Store, kind: str = "reward") -> list[ModelRecord]:
    """Every version of a kind, in version-number order."""
    with store._lock:
        rows = store.con.execute(f"SELECT {_COLUMNS} FROM models WHERE kind = ? ORDER BY number", [kind]).fetchall()
    return [_record(r) for r in rows]


def find_version(store: Store, version: str) -> ModelRecord | None:
    with store._lock:
        row = store.con.execute(f"SELECT {_COLUMNS} FROM models WHERE version = ?", [version]).fetchone()
    return _record(row) if row else None


def promoted_version(store: Store, kind: str = "reward") -> ModelRecord | None:
    with store._lock:
        row = store.con.execute(
            f"SELECT {_COLUMNS} FROM models WHERE status = 'promoted' AND kind = ?", [kind]
        ).fetchone()
    return _record(row) if row else None


def next_version(store: Store, kind: str = "reward") -> tuple[str, int]:
    """The name and number the next registered version of `kind` takes: v<N+1> (reward), u<N+1> (user)."""
    with store._lock:
        number = one_row(store.con, "SELECT coalesce(max(number), 0) + 1 FROM models WHERE kind = ?", [kind])[0]
    return f"{KINDS[kind]}{number}", int(number)


def insert_version(store: Store, rec: ModelRecord, number: int) -> None:
    """A new row for `rec`, as a candidate (its status field is not read)."""
    with store._lock:
        store.con.execute(
            """INSERT INTO models (version, number, parent, snapshot_id, backbone, format_hash, status, metrics,
                                   reward_mean, reward_std, ensemble_size, artifact_path, kind)
               VALUES (?, ?, ?, ?, ?, ?, 'candidate', ?, ?, ?, ?, ?, ?)""",
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
                rec.kind,
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
    """In one transaction: the promoted version of its kind (if any) becomes retired, `version` promoted now."""
    with store.transaction() as con:
        con.execute(
            "UPDATE models SET status = 'retired' WHERE status = 'promoted' "
            "AND kind = (SELECT kind FROM models WHERE version = ?)",
            [version],
        )
        con.execute("UPDATE models SET status = 'promoted', promoted_at = now() WHERE version = ?", [version])


def last_retired_promotion(store: Store, kind: str = "reward") -> str | None:
    """The retired version of `kind` promoted most recently (what a rollback returns to), or None."""
    with store._lock:
        row = store.con.execute(
            "SELECT version FROM models WHERE status = 'retired' AND promoted_at IS NOT NULL AND kind = ? "
            "ORDER BY promoted_at DESC LIMIT 1",
            [kind],
        ).fetchone()
    return row[0] if row else None
