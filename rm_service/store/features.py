"""The feature cache: pooled backbone features per completion, keyed by backbone read-out
(`feature_key`) and formatting hash, so a head-mode retrain computes features only for new
completions."""

from __future__ import annotations

import numpy as np

from rm_service.store.db import Store


def get_features(store: Store, feature_key: str, format_hash: str, completion_ids: list[str]) -> dict[str, np.ndarray]:
    """Cached pooled features {completion_id: [H] float32} under one feature key and format."""
    if not completion_ids:
        return {}
    with store._lock:
        rows = store.con.execute(
            """SELECT completion_id, vector FROM features
               WHERE feature_key = ? AND format_hash = ? AND completion_id IN (SELECT unnest(?::VARCHAR[]))""",
            [feature_key, format_hash, completion_ids],
        ).fetchall()
    return {cid: np.frombuffer(vec, dtype="<f4") for cid, vec in rows}


def put_features(
    store: Store,
    feature_key: str,
    format_hash: str,
    completion_ids: list[str],
    vectors: np.ndarray,
    num_tokens: list[int],
) -> None:
    """Cache features [N, H] in one statement; rows already cached are kept."""
    blobs = [np.ascontiguousarray(v, dtype="<f4").tobytes() for v in vectors]
    with store._lock:
        store.con.execute(
            """INSERT INTO features (completion_id, feature_key, format_hash, vector, num_tokens)
               SELECT unnest(?::VARCHAR[]), ?, ?, unnest(?::BLOB[]), unnest(?::INTEGER[])
               ON CONFLICT DO NOTHING""",
            [completion_ids, feature_key, format_hash, blobs, num_tokens],
        )
