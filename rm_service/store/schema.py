"""Store schema and migrations.

`schema_version` holds one row per applied migration; opening a file applies the ones it
lacks, in order, each in its own transaction. Add a migration by appending to MIGRATIONS.
"""

from __future__ import annotations

import duckdb

from rm_service.errors import FailedPrecondition
from rm_service.store.tx import one_row, transaction

V1 = """
CREATE TABLE conversations (
    id          VARCHAR PRIMARY KEY,          -- sha256 of the canonical messages JSON
    messages    JSON NOT NULL,                -- [{role, content}, ...], oldest first
    num_turns   INTEGER NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT current_timestamp
);
CREATE TABLE completions (
    id              VARCHAR PRIMARY KEY,      -- sha256 of (conversation id, text)
    conversation_id VARCHAR NOT NULL,
    text            VARCHAR NOT NULL,
    origin          VARCHAR NOT NULL,         -- dataset | policy@<version> | human
    sampling        JSON,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT current_timestamp
);
CREATE SEQUENCE label_seq START 1;
CREATE TABLE labels (
    label_id        VARCHAR PRIMARY KEY,      -- client idempotency key
    seq             BIGINT NOT NULL UNIQUE,   -- commit order; snapshots are seq bounds
    conversation_id VARCHAR NOT NULL,
    source          VARCHAR NOT NULL,         -- HUMAN | JUDGE | IMPORT
    annotator       VARCHAR NOT NULL,
    strength        DOUBLE,
    rationale       VARCHAR,
    metadata        JSON,
    task_id         VARCHAR,
    payload_hash    VARCHAR NOT NULL,         -- tells a retry (same hash) from a conflict
    created_at      TIMESTAMPTZ NOT NULL DEFAULT current_timestamp
);
CREATE TABLE label_rankings (
    label_id      VARCHAR NOT NULL,
    position      INTEGER NOT NULL,           -- index in the label's responses
    completion_id VARCHAR NOT NULL,
    rank          INTEGER NOT NULL,           -- 0 = best; equal ranks are ties
    PRIMARY KEY (label_id, position)
);
CREATE TABLE tasks (
    task_id          VARCHAR PRIMARY KEY,
    conversation_id  VARCHAR NOT NULL,
    completion_ids   VARCHAR[] NOT NULL,
    policy_version   VARCHAR,
    priority         INTEGER NOT NULL DEFAULT 0,
    state            VARCHAR NOT NULL,        -- queued | leased | done
    lease_owner      VARCHAR,
    lease_expires_at TIMESTAMPTZ,
    created_at       TIMESTAMPTZ NOT NULL DEFAULT current_timestamp
);
CREATE TABLE snapshots (
    snapshot_id VARCHAR PRIMARY KEY,
    max_seq     BIGINT NOT NULL,              -- the snapshot holds labels with seq <= max_seq
    num_labels  BIGINT NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT current_timestamp
);
CREATE TABLE models (
    version       VARCHAR PRIMARY KEY,        -- v1, v2, ...
    number        INTEGER NOT NULL UNIQUE,
    parent        VARCHAR,
    snapshot_id   VARCHAR,
    backbone      VARCHAR NOT NULL,
    format_hash   VARCHAR NOT NULL,
    status        VARCHAR NOT NULL,           -- candidate | promoted | rejected | retired
    metrics       JSON,
    reward_mean   DOUBLE NOT NULL,
    reward_std    DOUBLE NOT NULL,
    ensemble_size INTEGER NOT NULL,
    artifact_path VARCHAR NOT NULL,
    created_at    TIMESTAMPTZ NOT NULL DEFAULT current_timestamp,
    promoted_at   TIMESTAMPTZ
);
CREATE TABLE jobs (
    job_id        VARCHAR PRIMARY KEY,
    kind          VARCHAR NOT NULL,
    state         VARCHAR NOT NULL,           -- queued | running | succeeded | failed
    snapshot_id   VARCHAR,
    model_version VARCHAR,
    error         VARCHAR,
    metrics       JSON,
    created_at    TIMESTAMPTZ NOT NULL DEFAULT current_timestamp,
    finished_at   TIMESTAMPTZ
);
CREATE TABLE features (
    completion_id VARCHAR NOT NULL,
    backbone_key  VARCHAR NOT NULL,           -- backbone identity (name or weights hash)
    format_hash   VARCHAR NOT NULL,
    vector        FLOAT[] NOT NULL,           -- pooled last-token features, [H]
    num_tokens    INTEGER NOT NULL,
    PRIMARY KEY (completion_id, backbone_key, format_hash)
);
"""

# v2: the labeling queue records sampling parameters, how often a task was leased, and the
# label that closed it.
V2 = """
ALTER TABLE tasks ADD COLUMN sampling JSON;
ALTER TABLE tasks ADD COLUMN lease_count INTEGER DEFAULT 0;
ALTER TABLE tasks ADD COLUMN closed_by VARCHAR;
"""

# v3: a retraining job records what was asked (mode, parent, promote, reason) and whether
# its version was promoted.
V3 = """
ALTER TABLE jobs ADD COLUMN request JSON;
ALTER TABLE jobs ADD COLUMN promoted BOOLEAN DEFAULT false;
"""

# v4: the feature cache keys each vector by what produced it (backbone, precision, layer,
# pooling) and stores it as raw float32 bytes, which DuckDB writes ~10x faster than FLOAT[]
# lists. A cache: the old rows are dropped and recomputed on demand.
V4 = """
DROP TABLE features;
CREATE TABLE features (
    completion_id VARCHAR NOT NULL,
    feature_key   VARCHAR NOT NULL,           -- backbone key : precision : pooling method @ layer
    format_hash   VARCHAR NOT NULL,
    vector        BLOB NOT NULL,              -- float32 little-endian, [H]
    num_tokens    INTEGER NOT NULL,
    PRIMARY KEY (completion_id, feature_key, format_hash)
);
"""

# v5: people label through the web page. A skip is kept (who skipped which task, when) and
# that person is not offered the task again; a suggestion shown beside a task (the served
# reward model's scores, a judge's ranking) is kept apart from labels, so it never counts as
# anyone's answer.
V5 = """
CREATE TABLE task_skips (
    task_id    VARCHAR NOT NULL,
    annotator  VARCHAR NOT NULL,
    skipped_at TIMESTAMPTZ NOT NULL DEFAULT current_timestamp,
    PRIMARY KEY (task_id, annotator)
);
CREATE TABLE suggestions (
    task_id    VARCHAR NOT NULL,
    kind       VARCHAR NOT NULL,              -- model | judge
    origin     VARCHAR NOT NULL,              -- model version, or the judge label's id
    suggester  VARCHAR NOT NULL,              -- model version, or the judge's annotator id
    ranks      INTEGER[] NOT NULL,            -- per task completion, 0 = best (ties equal)
    scores     DOUBLE[],                      -- model rewards per task completion
    created_at TIMESTAMPTZ NOT NULL DEFAULT current_timestamp,
    PRIMARY KEY (task_id, kind, origin)
);
"""

# v6: feedback beyond rankings (store/feedback.py): thumbs on single assistant turns and a
# session outcome on a whole conversation. The label's provenance and commit order stay in
# `labels` (its conversation_id is the whole conversation's); the values live here.
V6 = """
CREATE TABLE label_feedback (
    label_id      VARCHAR NOT NULL,
    kind          VARCHAR NOT NULL,           -- thumb | outcome
    message_index INTEGER NOT NULL,           -- thumb: the assistant turn's index; outcome: -1
    value         DOUBLE NOT NULL,            -- thumb: 1 up, 0 down; outcome: in [0, 1], 1 = success
    PRIMARY KEY (label_id, kind, message_index)
);
"""

# v7: the promotion decision of a version (registry.Decision as JSON: promote | reject |
# undecided, its reason and the evidence it weighed), on the version and on its training job.
V7 = """
ALTER TABLE models ADD COLUMN decision JSON;
ALTER TABLE jobs ADD COLUMN decision JSON;
"""

# v8: the registry holds more than reward models: a `kind` per version (reward | user: the user
# models of rm_service.usermodel), each kind numbered on its own (v1, v2, ... and u1, u2, ...).
# DuckDB cannot drop the old UNIQUE (number), so the table is rebuilt; every row stays, as kind reward.
V8 = """
CREATE TABLE models_v8 (
    version       VARCHAR PRIMARY KEY,        -- v1, v2, ... (reward), u1, u2, ... (user)
    kind          VARCHAR NOT NULL DEFAULT 'reward',  -- reward | user
    number        INTEGER NOT NULL,
    parent        VARCHAR,
    snapshot_id   VARCHAR,
    backbone      VARCHAR NOT NULL,
    format_hash   VARCHAR NOT NULL,
    status        VARCHAR NOT NULL,           -- candidate | promoted | rejected | retired
    metrics       JSON,
    reward_mean   DOUBLE NOT NULL,
    reward_std    DOUBLE NOT NULL,
    ensemble_size INTEGER NOT NULL,
    artifact_path VARCHAR NOT NULL,
    created_at    TIMESTAMPTZ NOT NULL DEFAULT current_timestamp,
    promoted_at   TIMESTAMPTZ,
    decision      JSON,                       -- registry.Decision (v7)
    UNIQUE (kind, number)
);
INSERT INTO models_v8 (version, kind, number, parent, snapshot_id, backbone, format_hash, status, metrics, reward_mean,
                       reward_std, ensemble_size, artifact_path, created_at, promoted_at, decision)
    SELECT version, 'reward', number, parent, snapshot_id, backbone, format_hash, status, metrics, reward_mean,
           reward_std, ensemble_size, artifact_path, created_at, promoted_at, decision FROM models;
DROP TABLE models;
ALTER TABLE models_v8 RENAME TO models;
"""

# v9: the labeling queue holds two kinds of task: `ranking` (a prompt and K >= 2 completions to
# rank, every task before v9) and `session` (a conversation the policy played, for per-turn thumbs
# and a session outcome: its conversation_id is the whole conversation's, completion_ids empty).
V9 = """
ALTER TABLE tasks ADD COLUMN kind VARCHAR DEFAULT 'ranking';
UPDATE tasks SET kind = 'ranking' WHERE kind IS NULL;
"""

MIGRATIONS: list[str] = [V1, V2, V3, V4, V5, V6, V7, V8, V9]

# A task anyone may lease now: queued, or leased and expired (a predicate on `tasks` rows).
TASK_AVAILABLE = "(state = 'queued' OR (state = 'leased' AND lease_expires_at < now()))"
SCHEMA_VERSION = len(MIGRATIONS)


def current_version(con: duckdb.DuckDBPyConnection) -> int:
    con.execute(
        "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY, applied_at TIMESTAMPTZ DEFAULT "
        "current_timestamp)"
    )
    return int(one_row(con, "SELECT coalesce(max(version), 0) FROM schema_version")[0])


def migrate(con: duckdb.DuckDBPyConnection) -> int:
    """Apply missing migrations; return the schema version now in force."""
    version = current_version(con)
    if version > SCHEMA_VERSION:
        raise FailedPrecondition(
            f"store schema version {version} is newer than this rm-service ({SCHEMA_VERSION}); upgrade rm-service"
        )
    for number in range(version + 1, SCHEMA_VERSION + 1):
        with transaction(con):
            con.execute(MIGRATIONS[number - 1])
            con.execute("INSERT INTO schema_version (version) VALUES (?)", [number])
    return SCHEMA_VERSION
