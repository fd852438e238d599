"""The K-way ranking records (rm_service.formats.ranking) as Parquet, one row per label, with the
columns of "ranking" in the same order:

    label_id VARCHAR, prompt STRUCT(role VARCHAR, content VARCHAR)[], responses VARCHAR[],
    ranks INTEGER[], source VARCHAR, annotator VARCHAR, strength DOUBLE, rationale VARCHAR,
    metadata MAP(VARCHAR, VARCHAR), task_id VARCHAR

Import and export rules are those of "ranking". Files are written and read by DuckDB's own
Parquet writer and reader (an in-memory connection; no pyarrow or pandas). A row's record
(for its label id and digest) is the row as compact JSON with sorted keys.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import duckdb

from rm_service.formats import ranking
from rm_service.formats.ranking import RANKING_KEYS
from rm_service.formats.records import FormatError, Record, digest, input_file

PARQUET_COLUMNS = (
    "label_id VARCHAR, prompt STRUCT(role VARCHAR, content VARCHAR)[], responses VARCHAR[], ranks INTEGER[], source "
    "VARCHAR, annotator VARCHAR, strength DOUBLE, rationale VARCHAR, metadata MAP(VARCHAR, VARCHAR), task_id VARCHAR"
)


def parquet_records(path: Path) -> Iterator[Record]:
    """One Record per row, in file order; its digest hashes the row as compact sorted JSON."""
    path = input_file(path)
    try:
        with duckdb.connect() as con:
            cursor = con.execute(
                "SELECT * FROM read_parquet(?, file_row_number = true) ORDER BY file_row_number", [str(path)]
            )
            names = [d[0] for d in cursor.description]
            rows = cursor.fetchall()
    except (duckdb.Error, ValueError, TypeError, OverflowError) as exc:
        yield Record("file", 0, "", FormatError(f"cannot read {path.name} as Parquet: {str(exc).splitlines()[0]}"))
        return
    for row in rows:
        record = dict(zip(names, row, strict=True))
        number = record.pop("file_row_number") + 1
        canonical = json.dumps(record, ensure_ascii=False, sort_keys=True, separators=(",", ":"), default=str)
        yield Record("row", number, digest(canonical.encode("utf-8", "surrogatepass")), record)


def write_parquet(out: Path, records: list[dict]) -> None:
    """Ranking records (all keys of RANKING_KEYS) as one Parquet file, in their order."""
    out.parent.mkdir(parents=True, exist_ok=True)
    columns = [[r[key] for r in records] for key in RANKING_KEYS if key != "metadata"]
    keys = [list(r["metadata"]) for r in records]
    values = [list(r["metadata"].values()) for r in records]
    with duckdb.connect() as con:
        con.execute(f"CREATE TABLE labels ({PARQUET_COLUMNS})")
        con.execute(
            """INSERT INTO labels
               SELECT label_id, prompt, responses, ranks, source, annotator, strength, rationale, map(keys, vals),
                      task_id
               FROM (SELECT unnest(?::VARCHAR[]) AS label_id,
                            unnest(?::STRUCT(role VARCHAR, content VARCHAR)[][]) AS prompt,
                            unnest(?::VARCHAR[][]) AS responses, unnest(?::INTEGER[][]) AS ranks,
                            unnest(?::VARCHAR[]) AS source, unnest(?::VARCHAR[]) AS annotator,
                            unnest(?::DOUBLE[]) AS strength, unnest(?::VARCHAR[]) AS rationale,
                            unnest(?::VARCHAR[]) AS task_id, unnest(?::VARCHAR[][]) AS keys,
                            unnest(?::VARCHAR[][]) AS vals, generate_subscripts(?::VARCHAR[], 1) AS i)
               ORDER BY i""",
            [*columns, keys, values, columns[0]],
        )
        target = str(out).replace("'", "''")
        con.execute(f"COPY labels TO '{target}' (FORMAT parquet)")


# Parquet is ranking records in columns: ranking's import and export with this file's reader and writer.
import_labels = partial(ranking.import_labels, read=parquet_records, fmt="parquet")
export_labels = partial(ranking.export_labels, write=write_parquet)
