"""How far judge labels can be trusted: agreement with human labels on shared pairs, Cohen's
kappa, the position-bias rate and length bias.

A shared pair is a pair of completions of one prompt that both the judge(s) and the
reference (people) ranked. Each side's votes on it give the share preferring completion x
(x = the smaller completion id: an arbitrary but fixed orientation); the majority is x, y,
or a tie at exactly one half. On pairs where both majorities are decisive:

- agreement: the fraction where the judges' majority picks the people's completion
  (MT-Bench's "agreement without ties"); pairs where the judge tied are reported apart;
- Cohen's kappa: the same agreement corrected for chance, (p_o - p_e) / (1 - p_e), with p_e
  from each side's rates of x and y (0 = chance, 1 = perfect);
- length bias: of the pairs whose completions differ in length, how often the judges prefer
  the longer one next to how often the people do.

The position-bias rate is the fraction of the judges' pairwise verdicts (each judged in both
orders) that changed when the replies swapped places (Zheng et al., 2023 call 1 minus this
"consistency"); it is read from JUDGE labels' metadata.

The labels compared are two LabelSets: the labels of some sources, optionally of one annotator
("every HUMAN label", "the JUDGE labels of judge smollm2", "the HUMAN labels of
labeler-3f9a0c12d4e5"). `report` finds the pairs of completions both sets ranked (SQL over
labels and label_rankings) with each side's share of votes for its first completion, and turns
them into the report: people against a judge, a judge against imported labels and one person
against another are the same computation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import duckdb

from rm_service.errors import InvalidArgument
from rm_service.store.tx import one_row

Side = Literal["x", "y", "tie"]


@dataclass(frozen=True)
class SharedPair:
    x_chars: int
    y_chars: int
    reference: float  # share of the people's votes preferring x
    judge: float  # share of the judges' votes preferring x


@dataclass(frozen=True)
class AgreementReport:
    shared_pairs: int  # both majorities decisive
    agreement: float
    kappa: float
    judge_ties: int | None  # shared pairs the people decided and the judges tied (None: not known)
    swapped_pairs: int
    position_flips: int
    length_pairs: int | None  # decisive shared pairs whose completions differ in length (None: not known)
    judge_longer: float
    reference_longer: float

    @property
    def position_bias_rate(self) -> float:
        return self.position_flips / self.swapped_pairs if self.swapped_pairs else 0.0


def majority(share: float) -> Side:
    return "x" if share > 0.5 else "y" if share < 0.5 else "tie"


def cohen_kappa(a: list[str], b: list[str]) -> float:
    """Cohen's kappa of two raters' labels of the same items; NaN when undefined (no items, or
    both raters always used one and the same label)."""
    n = len(a)
    if n == 0 or n != len(b):
        return math.nan
    observed = sum(x == y for x, y in zip(a, b, strict=True)) / n
    expected = sum((a.count(c) / n) * (b.count(c) / n) for c in set(a) | set(b))
    if expected == 1.0:
        return math.nan
    return (observed - expected) / (1.0 - expected)


def agreement_report(pairs: list[SharedPair], swapped_pairs: int = 0, position_flips: int = 0) -> AgreementReport:
    decided = [(p, majority(p.reference), majority(p.judge)) for p in pairs if majority(p.reference) != "tie"]
    both = [(p, r, j) for p, r, j in decided if j != "tie"]
    agree = sum(r == j for _, r, j in both)
    by_length = [(p, r, j) for p, r, j in both if p.x_chars != p.y_chars]

    def longer_rate(side: int) -> float:
        if not by_length:
            return math.nan
        return sum((t[side] == "x") == (t[0].x_chars > t[0].y_chars) for t in by_length) / len(by_length)

    return AgreementReport(
        shared_pairs=len(both),
        agreement=agree / len(both) if both else math.nan,
        kappa=cohen_kappa([r for _, r, _ in both], [j for _, _, j in both]),
        judge_ties=len(decided) - len(both),
        swapped_pairs=swapped_pairs,
        position_flips=position_flips,
        length_pairs=len(by_length),
        judge_longer=longer_rate(2),
        reference_longer=longer_rate(1),
    )


def report_from_stats(stats) -> AgreementReport:
    """The report as GetStats (rm.v1.Stats) carries it, against HUMAN labels."""
    return AgreementReport(
        shared_pairs=stats.judge_human_shared_pairs,
        agreement=stats.judge_human_agreement if stats.judge_human_shared_pairs else math.nan,
        kappa=stats.judge_human_kappa if stats.judge_human_shared_pairs else math.nan,
        judge_ties=None,
        swapped_pairs=stats.judge_swapped_pairs,
        position_flips=round(stats.judge_position_bias_rate * stats.judge_swapped_pairs),
        length_pairs=None,
        judge_longer=stats.judge_longer_preferred if stats.judge_human_shared_pairs else math.nan,
        reference_longer=stats.human_longer_preferred if stats.judge_human_shared_pairs else math.nan,
    )


def fmt(value: float, digits: int = 3) -> str:
    return "n/a" if math.isnan(value) else f"{value:.{digits}f}"


def format_report(report: AgreementReport, reference: str = "HUMAN") -> str:
    """The report as a markdown table."""
    r = report
    with_ties = r.shared_pairs + (r.judge_ties or 0)
    rows = [
        ("shared pairs (judge and people both decisive)", str(r.shared_pairs)),
        ("agreement with people", fmt(r.agreement)),
        ("Cohen's kappa", fmt(r.kappa)),
        ("pairs the people decided and the judge tied", "n/a" if r.judge_ties is None else str(r.judge_ties)),
        (
            "agreement counting judge ties as misses",
            fmt(r.agreement * r.shared_pairs / with_ties if r.judge_ties is not None and r.shared_pairs else math.nan),
        ),
        ("pair verdicts judged in both orders", str(r.swapped_pairs)),
        ("position-bias rate (verdict flips with the order)", fmt(r.position_bias_rate) if r.swapped_pairs else "n/a"),
        (
            "judge prefers the longer completion" + ("" if r.length_pairs is None else f" ({r.length_pairs} pairs)"),
            fmt(r.judge_longer),
        ),
        (f"people ({reference}) prefer the longer completion", fmt(r.reference_longer)),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"| {'metric':<{width}} | value |", f"|{'-' * (width + 2)}|-------|"]
    lines += [f"| {k:<{width}} | {v} |" for k, v in rows]
    return "\n".join(lines)


# Label sets and the SQL that finds their shared pairs.


@dataclass(frozen=True)
class LabelSet:
    sources: tuple[str, ...]
    annotator: str | None = None  # None: every annotator of those sources

    def params(self, prefix: str) -> dict:
        return {f"{prefix}_sources": list(self.sources), f"{prefix}_annotator": self.annotator}


def report(con: duckdb.DuckDBPyConnection, reference: LabelSet, other: LabelSet) -> AgreementReport:
    """`other`'s labels against `reference`'s on the pairs both ranked, as an AgreementReport;
    the position-bias counts are those recorded in `other`'s labels (a judge's metadata; 0 for
    people)."""
    if not reference.sources or not other.sources:
        raise InvalidArgument("reference", "both label sets must name at least one source")
    overlap = set(reference.sources) & set(other.sources)
    if overlap and (reference.annotator is None or other.annotator is None or reference.annotator == other.annotator):
        raise InvalidArgument(
            "reference", f"the two label sets overlap ({', '.join(sorted(overlap))}); tell them apart by annotator"
        )
    params = reference.params("ref") | other.params("other")
    rows = con.execute(_SHARED_PAIRS_SQL, params).fetchall()
    swapped, flips = one_row(con, _SWAP_SQL, other.params("other"))
    return agreement_report([SharedPair(*row) for row in rows], int(swapped), int(flips))


def annotators(con: duckdb.DuckDBPyConnection, source: str) -> list[tuple[str, int]]:
    """(annotator, number of labels) of one source, most labels first."""
    return con.execute(
        "SELECT annotator, count(*) AS n FROM labels WHERE source = ? GROUP BY annotator ORDER BY n DESC, annotator",
        [source],
    ).fetchall()


_IN_OTHER = (
    "(list_contains($other_sources::VARCHAR[], l.source) AND ($other_annotator IS NULL OR l.annotator = "
    "$other_annotator))"
)
_IN_REF = (
    "(list_contains($ref_sources::VARCHAR[], l.source) AND ($ref_annotator IS NULL OR l.annotator = $ref_annotator))"
)

# Every pair of completions within a label, as (x, y) ordered by id, with the label's vote for
# x: 1 (x ranked better), 0 (worse) or 0.5 (tied). Per pair, the share of x votes among the
# other set's labels and among the reference set's labels; pairs that both voted on.
_SHARED_PAIRS_SQL = f"""
WITH votes AS (
    SELECT {_IN_OTHER} AS is_other, least(a.completion_id, b.completion_id) AS x,
           greatest(a.completion_id, b.completion_id) AS y,
           CASE WHEN a.rank = b.rank THEN 0.5
                WHEN (a.rank < b.rank) = (a.completion_id < b.completion_id) THEN 1.0 ELSE 0.0 END AS x_vote
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


# -- feedback: thumbs and outcomes on the same turns and sessions ---------------------------

_SHARED_FEEDBACK = """
WITH sides AS (
    SELECT l.conversation_id AS conv, f.message_index AS turn, l.source = 'JUDGE' AS judge, avg(f.value) AS value
    FROM label_feedback f JOIN labels l ON l.label_id = f.label_id
    WHERE f.kind = $kind AND l.source IN ('JUDGE', 'HUMAN')
    GROUP BY ALL
)
SELECT h.value, j.value FROM sides h JOIN sides j ON h.conv = j.conv AND h.turn = j.turn AND NOT h.judge AND j.judge
WHERE h.value <> 0.5 AND j.value <> 0.5
"""


@dataclass(frozen=True)
class FeedbackAgreement:
    shared_thumbs: int  # turns both sides thumbed, both majorities decisive
    thumb_agreement: float
    thumb_kappa: float
    shared_outcomes: int  # sessions both sides gave an outcome, both means off 0.5
    outcome_agreement: float


def feedback_agreement(con: duckdb.DuckDBPyConnection) -> FeedbackAgreement:
    """JUDGE feedback against HUMAN feedback: on each assistant turn both thumbed, the
    judges' majority thumb (mean of up = 1, down = 0) against the people's; on each session both
    gave an outcome, success (mean > 0.5) or failure against the people's. NaN when none shared."""
    thumbs = con.execute(_SHARED_FEEDBACK, {"kind": "thumb"}).fetchall()
    outcomes = con.execute(_SHARED_FEEDBACK, {"kind": "outcome"}).fetchall()
    people = ["up" if h > 0.5 else "down" for h, _ in thumbs]
    judges = ["up" if j > 0.5 else "down" for _, j in thumbs]
    same = [(h > 0.5) == (j > 0.5) for h, j in outcomes]
    return FeedbackAgreement(
        len(thumbs),
        sum(p == j for p, j in zip(people, judges, strict=True)) / len(thumbs) if thumbs else math.nan,
        cohen_kappa(people, judges),
        len(outcomes),
        sum(same) / len(same) if same else math.nan,
    )
