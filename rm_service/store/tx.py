"""One transaction on a DuckDB connection (COMMIT when the block ends, ROLLBACK if it raises), and
the one row of an aggregate query."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import duckdb


@contextmanager
def transaction(con: duckdb.DuckDBPyConnection) -> Iterator[duckdb.DuckDBPyConnection]:
    con.execute("BEGIN TRANSACTION")
    try:
        yield con
    except BaseException:
        con.execute("ROLLBACK")
        raise
    con.execute("COMMIT")


def one_row(con: duckdb.DuckDBPyConnection, sql: str, params: Any = None) -> tuple[Any, ...]:
    """The row of a query that always returns exactly one (an aggregate without GROUP BY: count, max)."""
    row = con.execute(sql, params).fetchone()
    if row is None:
        raise RuntimeError(f"an aggregate query returned no row: {sql}")
    return row
