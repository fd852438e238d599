"""Fuzzing the importers (hypothesis): random bytes, and files of valid HH / TRL / ranking /
Parquet records mixed with mutated ones, never raise out of the importer, and afterwards the
store holds exactly the valid records (checked on the label ids stored in DuckDB)."""

from __future__ import annotations

import hashlib
import json
import os
import uuid

import duckdb
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rm_service.formats import import_file
from rm_service.settings import StoreSettings
from rm_service.store.db import Store

FUZZ = settings(
    max_examples=int(os.environ.get("RM_FUZZ_EXAMPLES", "100")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
FORMATS = ("hh", "trl", "ranking")

# text that is valid in every format: no lone surrogates, something that is not whitespace
words = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\n"), max_size=30).map(
    lambda t: "w" + t
)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    s = Store(StoreSettings(path=tmp_path_factory.mktemp("fuzz") / "rm.duckdb"))
    yield s
    s.close()


def _ids(store: Store) -> set[str]:
    return {r[0] for r in store.con.execute("SELECT label_id FROM labels").fetchall()}


def _valid(fmt: str, tag: str, n: int, text: str, k: int) -> tuple[dict, str]:
    """A valid record and the label id the store will give it."""
    question = f"{tag} question {n}: {text}"
    if fmt == "hh":
        record = {
            "chosen": f"\n\nHuman: {question}\n\nAssistant: yes {text}",
            "rejected": f"\n\nHuman: {question}\n\nAssistant: no {text}",
        }
        return record, "hh-" + hashlib.sha256(json.dumps(record).encode()).hexdigest()[:24]
    if fmt == "trl":
        return {
            "label_id": f"{tag}-{n}",
            "prompt": [{"role": "user", "content": question}],
            "chosen": [{"role": "assistant", "content": f"yes {text}"}],
            "rejected": [{"role": "assistant", "content": f"no {text}"}],
            "margin": 0.5,
            "extra": [n, text],
        }, f"{tag}-{n}"
    return {
        "label_id": f"{tag}-{n}",
        "prompt": [{"role": "user", "content": question}],
        "responses": [f"r{i} {text}" for i in range(k)],
        "ranks": list(range(k))[::-1],
        "strength": 1.0,
    }, f"{tag}-{n}"


# Mutations that always make a record invalid: (name, applies to formats, function(record) -> bytes)
def _bytes(record: dict) -> bytes:
    return json.dumps(record).encode()


MUTATIONS = {
    "non_utf8": (FORMATS, lambda r, x: _bytes(r).replace(b'"', b'"\xff', 1)),
    "truncated": (FORMATS, lambda r, x: _bytes(r)[: x % len(_bytes(r))]),
    "array": (FORMATS, lambda r, x: json.dumps([r]).encode()),
    "string": (FORMATS, lambda r, x: json.dumps(json.dumps(r)).encode()),
    "number": (FORMATS, lambda r, x: str(x).encode()),
    "huge_rank": (
        ("ranking",),
        lambda r, x: _bytes(
            r | {"ranks": [2**70 if i == x % len(r["ranks"]) else v for i, v in enumerate(r["ranks"])]}
        ),
    ),
    "rank_2_40": (("ranking",), lambda r, x: _bytes(r | {"ranks": [2**40] + r["ranks"][1:]})),
    "negative_rank": (("ranking",), lambda r, x: _bytes(r | {"ranks": [-1 - x] + r["ranks"][1:]})),
    "too_many_responses": (
        ("ranking",),
        lambda r, x: _bytes(r | {"responses": [f"k{i}" for i in range(17)], "ranks": list(range(17))}),
    ),
    "huge_strength": (("ranking",), lambda r, x: _bytes(r).replace(b'"strength": 1.0', b'"strength": 1e999')),
    "int_strength": (("ranking",), lambda r, x: _bytes(r).replace(b'"strength": 1.0', b'"strength": ' + b"9" * 500)),
    "nan_margin": (("trl",), lambda r, x: _bytes(r).replace(b'"margin": 0.5', b'"margin": NaN')),
    "image_part": (
        ("trl",),
        lambda r, x: _bytes(r | {"chosen": [{"role": "assistant", "content": [{"type": "image", "url": "x"}]}]}),
    ),
    "no_rejected": (("trl", "hh"), lambda r, x: _bytes({k: v for k, v in r.items() if k != "rejected"})),
    "surrogate": (FORMATS, lambda r, x: _bytes(r).replace(b"question", b"\\ud800question", 1)),
    "not_hh": (("hh",), lambda r, x: _bytes(r | {"chosen": r["chosen"].replace("\n\nHuman: ", "Human: ", 1)})),
    "deep": (FORMATS, lambda r, x: b"[" * (50_000 + x) + b"]" * (50_000 + x)),
}


@st.composite
def files(draw, fmt: str):
    """(file bytes, expected stored ids, line numbers expected to be rejected)."""
    tag = uuid.uuid4().hex[:10]
    names = sorted(name for name, (fmts, _) in MUTATIONS.items() if fmt in fmts)
    lines, expected, rejected = [], set(), []
    for n in range(draw(st.integers(1, 12))):
        record, label_id = _valid(fmt, tag, n, draw(words), draw(st.integers(2, 5)))
        mutation = draw(st.none() | st.sampled_from(names))
        if mutation is None:
            lines.append(json.dumps(record).encode())
            expected.add(label_id)
            continue
        line = MUTATIONS[mutation][1](record, draw(st.integers(0, 10**6))).replace(b"\n", b" ")
        lines.append(line)
        if line.strip():  # a truncation to blanks is a blank line: skipped, not rejected
            rejected.append(len(lines))
    return b"\n".join(lines) + b"\n", expected, rejected


@FUZZ
@given(data=st.data(), fmt=st.sampled_from(FORMATS))
def test_mutated_records_are_rejected_and_valid_ones_stored(store, tmp_path_factory, data, fmt):
    content, expected, rejected = data.draw(files(fmt))
    path = tmp_path_factory.mktemp("f") / "in.jsonl"
    path.write_bytes(content)
    before = _ids(store)
    counts, reasons = import_file(store, path, fmt)
    assert _ids(store) - before == expected
    assert counts["INSERTED"] == len(expected) and counts["REJECTED"] == len(rejected)
    assert [int(r.split(":", 1)[0].removeprefix("line ")) for r in reasons] == rejected


@FUZZ
@given(
    content=st.binary(max_size=4096) | st.lists(st.binary(max_size=200), max_size=20).map(b"\n".join),
    fmt=st.sampled_from(FORMATS + ("parquet",)),
)
def test_random_bytes_never_raise(store, tmp_path_factory, content, fmt):
    path = tmp_path_factory.mktemp("r") / "in.bin"
    path.write_bytes(content)
    before = _ids(store)
    counts, reasons = import_file(store, path, fmt)
    assert len(_ids(store) - before) == counts["INSERTED"]
    assert counts["REJECTED"] == len(reasons)


def _parquet(path, rows: list[tuple[str, str, object, object]]) -> None:
    """rows of (label_id, ranks SQL, strength SQL, responses SQL) written by DuckDB."""
    values = ", ".join(
        f"('{lid}', [{{'role': 'user', 'content': 'q {lid}'}}], {resp}, {ranks}, {strength})"
        for lid, ranks, strength, resp in rows
    )
    duckdb.sql(
        f"COPY (SELECT * FROM (VALUES {values}) t(label_id, prompt, responses, ranks, strength)) TO '{path}' (FORMAT "
        "parquet)"
    )


PARQUET_BAD = {
    "huge_rank": ("[0::BIGINT, 9223372036854775807::BIGINT]", "1.0::DOUBLE"),  # Parquet's largest integer
    "rank_2_40": ("[1099511627776::BIGINT, 0::BIGINT]", "1.0::DOUBLE"),
    "negative_rank": ("[-1::BIGINT, 0::BIGINT]", "1.0::DOUBLE"),
    "null_rank": ("[NULL::BIGINT, 0::BIGINT]", "1.0::DOUBLE"),
    "inf_strength": ("[0::BIGINT, 1::BIGINT]", "'inf'::DOUBLE"),
    "nan_strength": ("[0::BIGINT, 1::BIGINT]", "'nan'::DOUBLE"),
    "huge_strength": ("[0::BIGINT, 1::BIGINT]", "1e300::DOUBLE"),
    "dense": ("[0::BIGINT, 0::BIGINT]", "1.0::DOUBLE"),  # valid: a tie
}


@FUZZ
@given(plan=st.lists(st.sampled_from(sorted(PARQUET_BAD)), min_size=1, max_size=8))
def test_mutated_parquet_rows_are_rejected_and_valid_ones_stored(store, tmp_path_factory, plan):
    tag = uuid.uuid4().hex[:10]
    rows = [(f"{tag}-{n}", *PARQUET_BAD[kind], "['a', 'b']") for n, kind in enumerate(plan)]
    path = tmp_path_factory.mktemp("p") / "in.parquet"
    _parquet(path, rows)
    before = _ids(store)
    counts, reasons = import_file(store, path, "parquet")
    expected = {f"{tag}-{n}" for n, kind in enumerate(plan) if kind == "dense"}
    assert _ids(store) - before == expected
    assert [int(r.split(":", 1)[0].removeprefix("row ")) for r in reasons] == [
        n + 1 for n, kind in enumerate(plan) if kind != "dense"
    ]
