"""The labels two sets of labelers share, for agreement statistics (rm_service.judge.agreement).

A LabelSet is the labels of some sources, optionally of one annotator: "every HUMAN label",
"the JUDGE labels of judge smollm2", "the HUMAN labels of labeler-3f9a0c12d4e5". For the
reference set and the other set, `shared_pairs` returns each pair of completions that both
ranked, with each side's share of votes for its first completion; `agreement_report` turns
them into agreement, Cohen's kappa and length bias. People against a judge, a judge against
imported labels and one person against another are the same computation.
"""

from __future__ import annotations

from dataclasses import dataclass

import duckdb

from rm_service.errors import InvalidArgument


@dataclass(frozen=True)
class LabelSet:
    sources: tuple[str, ...]
    annotator: str | None = None  # None: every annotator of those sources

    def params(self, prefix: str) -> dict:
        return {f"{prefix}_sources": list(self.sources), f"{prefix}_annotator": self.annotator}


def report(con: duckdb.DuckDBPyConnection, reference: LabelSet, other: LabelSet):
    """`other`'s labels against `reference`'s on the pairs both ranked, as an AgreementReport;
    the position-bias counts are those recorded in `other`'s labels (a judge's metadata; 0 for
    people)."""
    from rm_service.judge.agreement import SharedPair, agreement_report  # the judge package imports the store

    if not reference.sources or not other.sources:
        raise InvalidArgument("reference", "both label sets must name at least one source")
    overlap = set(reference.sources) & set(other.sources)
    if overlap and (reference.annotator is None or other.annotator is None or reference.annotator == other.annotator):
        raise InvalidArgument("reference", f"the two label sets overlap ({', '.join(sorted(overlap))}); tell them apart by annotator")
    params = reference.params("ref") | other.params("other")
    rows = con.execute(_SHARED_PAIRS_SQL, params).fetchall()
    swapped, flips = con.execute(_SWAP_SQL, other.params("other")).fetchone()
    return agreement_report([SharedPair(*row) for row in rows], int(swapped), int(flips))


def annotators(con: duckdb.DuckDBPyConnection, source: str) -> list[tuple[str, int]]:
    """(annotator, number of labels) of one source, most labels first."""
    return con.execute("SELECT annotator, count(*) AS n FROM labels WHERE source = ? GROUP BY annotator ORDER BY n DESC, annotator",
                       [source]).fetchall()


_IN_OTHER = "(list_contains($other_sources::VARCHAR[], l.source) AND ($other_annotator IS NULL OR l.annotator = $other_annotator))"
_IN_REF = "(list_contains($ref_sources::VARCHAR[], l.source) AND ($ref_annotator IS NULL OR l.annotator = $ref_annotator))"

# Every pair of completions within a label, as (x, y) ordered by id, with the label's vote for
# x: 1 (x ranked better), 0 (worse) or 0.5 (tied). Per pair, the share of x votes among the
# other set's labels and among the reference set's labels; pairs that both voted on.
_SHARED_PAIRS_SQL = f"""
WITH votes AS (
    SELECT {_IN_OTHER} AS is_other, least(a.completion_id, b.completion_id) AS x, greatest(a.completion_id, b.completion_id) AS y,
           CASE WHEN a.rank = b.rank THEN 0.5 WHEN (a.rank < b.rank) = (a.completion_id < b.completion_id) THEN 1.0 ELSE 0.0 END AS x_vote
    FROM labels l
    JOIN label_rankings a ON a.label_id = l.label_id
    JOIN label_rankings b ON b.label_id = l.label_id AND a.position < b.position
    WHERE {_IN_OTHER} OR {_IN_REF}
), shares AS (
    SELECT x, y, avg(x_vote) FILTER (WHERE NOT is_other) AS reference, avg(x_vote) FILTER (WHERE is_other) AS other
    FROM votes GROUP BY x, y
)
SELECT length(cx.text), length(cy.text), s.reference, s.other
FROM shares s JOIN completions cx ON cx.id = s.x JOIN completions cy ON cy.id = s.y
WHERE s.reference IS NOT NULL AND s.other IS NOT NULL
ORDER BY s.x, s.y
"""

# Pair verdicts judged in both orders, and those that flipped, as the judge recorded them.
_SWAP_SQL = f"""
SELECT coalesce(sum(TRY_CAST(json_extract_string(metadata, '$.judge_pairs') AS BIGINT)), 0),
       coalesce(sum(TRY_CAST(json_extract_string(metadata, '$.judge_flips') AS BIGINT)), 0)
FROM labels l WHERE {_IN_OTHER}
"""
