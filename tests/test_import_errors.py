"""Malformed files are rejected line by line, never with a traceback: one regression test per
crash of issue #20 (a non-UTF-8 byte, a line that is a JSON array or string, a directory as
FILE, 4 KiB of random bytes, a rank of 2**70, a rank of 2**40 on line 1,200 of 1,500), and
the other limits: oversized lines, huge numbers, deep nesting, a stop part-way."""

from __future__ import annotations

import json
import random
import socket
from pathlib import Path

import pytest

from rm_service.cli import main
from rm_service.formats import import_file
from rm_service.formats.ingest import ImportStopped, import_records
from rm_service.formats.records import jsonl_records
from rm_service.formats.trl import trl_label
from rm_service.settings import StoreSettings
from rm_service.store.db import Store


def trl_line(n: int, **extra) -> dict:
    return {
        "prompt": [{"role": "user", "content": f"question {n}"}],
        "chosen": [{"role": "assistant", "content": f"yes {n}"}],
        "rejected": [{"role": "assistant", "content": f"no {n}"}],
    } | extra


def ranking_line(n: int, ranks=(0, 1), **extra) -> dict:
    return {
        "label_id": f"r{n}",
        "prompt": [{"role": "user", "content": f"question {n}"}],
        "responses": [f"answer {n}.{i}" for i in range(len(ranks))],
        "ranks": list(ranks),
    } | extra


def hh_line(n: int) -> dict:
    return {
        "chosen": f"\n\nHuman: question {n}\n\nAssistant: yes {n}",
        "rejected": f"\n\nHuman: question {n}\n\nAssistant: no {n}",
    }


GOOD = {"hh": hh_line, "trl": trl_line, "ranking": ranking_line}


def write_lines(path: Path, lines: list) -> Path:
    """Lines as bytes: dicts as JSON, bytes as they are, str encoded."""
    out = []
    for line in lines:
        out.append(line if isinstance(line, bytes) else (line if isinstance(line, str) else json.dumps(line)).encode())
    path.write_bytes(b"\n".join(out) + b"\n")
    return path


@pytest.fixture
def store(tmp_path):
    s = Store(StoreSettings(path=tmp_path / "rm.duckdb"))
    yield s
    s.close()


def stored_count(store: Store) -> int:
    return store.con.execute("SELECT count(*) FROM labels").fetchone()[0]


def cli(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("fmt", ["hh", "trl", "ranking"])
def test_a_non_utf8_byte_rejects_its_line_only(store, tmp_path, fmt):
    good = GOOD[fmt]
    path = write_lines(tmp_path / "f.jsonl", [good(1), json.dumps(good(2)).encode().replace(b"2", b"\xff", 1), good(3)])
    counts, reasons = import_file(store, path, fmt)
    assert (
        counts["INSERTED"] == 2 and len(reasons) == 1 and reasons[0].startswith("line 2: not UTF-8: byte 0xff at byte ")
    )
    assert stored_count(store) == 2


@pytest.mark.parametrize("fmt", ["hh", "trl", "ranking"])
@pytest.mark.parametrize(
    ("line", "kind"), [("[1, 2]", "an array"), ('"a string"', "a string"), ("42", "a number"), ("null", "null")]
)
def test_a_line_that_is_json_but_not_an_object_is_rejected(store, tmp_path, fmt, line, kind):
    counts, reasons = import_file(store, write_lines(tmp_path / "f.jsonl", [GOOD[fmt](1), line]), fmt)
    assert counts["INSERTED"] == 1 and reasons == [f"line 2: not a JSON object: the line is {kind}"]


def test_a_directory_as_file_is_one_line_and_exit_2(home, tmp_path, capsys):
    code, out, err = cli(["import", "--format", "trl", str(tmp_path)], capsys)
    assert code == 2 and err == f"rm-service import: {tmp_path} is a directory, not a file\n"
    assert not (home / "rm.duckdb").exists()  # refused before the store was opened


def test_a_missing_or_unreadable_path_is_one_line_and_exit_2(home, tmp_path, capsys):
    code, _, err = cli(["import", "--format", "ranking", str(tmp_path / "nope.jsonl")], capsys)
    assert code == 2 and err == f"rm-service import: no such file: {tmp_path / 'nope.jsonl'}\n"
    sock = socket.socket(socket.AF_UNIX)  # a path that exists but open() refuses, even to root
    sock.bind(str(tmp_path / "s"))
    try:
        code, _, err = cli(["import", "--format", "parquet", str(tmp_path / "s")], capsys)
    finally:
        sock.close()
    assert code == 2 and err.count("\n") == 1 and err.startswith("rm-service import: ") and "Traceback" not in err


def test_4_kib_of_random_bytes_are_rejected_lines_and_exit_1(home, tmp_path, capsys):
    data = random.Random(20).randbytes(4096)
    path = tmp_path / "random.bin"
    path.write_bytes(data)
    for fmt in ("hh", "trl", "ranking", "parquet"):
        code, out, err = cli(["import", "--format", fmt, str(path)], capsys)
        assert code == 1 and "inserted" not in out and "rejected" in out, (fmt, out)
        assert err == f"rm-service import: nothing was imported from {path}: every record was rejected\n"


@pytest.mark.parametrize("rank", [2**70, 2**40, 4294967295, -1, -(2**70)])
def test_an_out_of_range_rank_is_a_rejected_line(store, tmp_path, rank):
    path = write_lines(
        tmp_path / "f.jsonl", [ranking_line(1), ranking_line(2, ranks=(0, rank)), ranking_line(3, ranks=(rank, 1, 0))]
    )
    counts, reasons = import_file(store, path, "ranking")
    assert (counts["INSERTED"], counts["REJECTED"]) == (1, 2)
    assert reasons[0].startswith("line 2: r2: ranks[1]: is ") and reasons[1].startswith("line 3: r3: ranks[0]: is ")


def test_a_rank_of_2_40_on_line_1200_of_1500_rejects_that_line_only(home, tmp_path, capsys):
    """It raised MemoryError after the first 1,000 lines were committed: half an import."""
    lines = [ranking_line(n) for n in range(1, 1501)]
    lines[1199] = ranking_line(1200, ranks=(2**40, 0))
    path = write_lines(tmp_path / "f.jsonl", lines)
    code, out, err = cli(["import", "--format", "ranking", str(path)], capsys)
    assert code == 0 and err == ""
    assert (
        "inserted 1499" in out
        and "rejected 1" in out
        and "rejected: line 1200: r1200: ranks[0]: is 1099511627776" in out
    )
    store = Store(StoreSettings(), read_only=True)
    try:
        ids = {r[0] for r in store.con.execute("SELECT label_id FROM labels").fetchall()}
    finally:
        store.close()
    assert ids == {f"r{n}" for n in range(1, 1501)} - {"r1200"}


@pytest.mark.parametrize(
    ("fmt", "line"),
    [
        ("trl", b'{"margin": 1e400, "prompt": "q", "chosen": " a", "rejected": " b"}'),  # inf
        (
            "trl",
            b'{"margin": 1' + b"0" * 400 + b', "prompt": "q", "chosen": " a", "rejected": " b"}',
        ),  # OverflowError in float()
        ("trl", b'{"margin": NaN, "prompt": "q", "chosen": " a", "rejected": " b"}'),
        ("trl", b'{"margin": 1e9, "prompt": "q", "chosen": " a", "rejected": " b"}'),  # above max_strength
        (
            "ranking",
            b'{"ranks": [0, 1' + b"0" * 5000 + b'], "prompt": [], "responses": []}',
        ),  # > 4300 digits: ValueError
        ("ranking", b"[" * 100_000 + b"]" * 100_000),  # RecursionError
        ("trl", b'{"prompt": "\\ud800", "chosen": " a", "rejected": " b"}'),  # a lone surrogate
    ],
)
def test_numbers_out_of_range_and_pathological_json_are_rejected_lines(store, tmp_path, fmt, line):
    counts, reasons = import_file(store, write_lines(tmp_path / "f.jsonl", [GOOD[fmt](1), line, GOOD[fmt](3)]), fmt)
    assert (counts["INSERTED"], counts["REJECTED"]) == (2, 1) and reasons[0].startswith("line 2: ")


def test_too_many_responses_is_a_rejected_line(store, tmp_path):
    counts, reasons = import_file(
        store, write_lines(tmp_path / "f.jsonl", [ranking_line(1, ranks=tuple(range(17)))]), "ranking"
    )
    assert counts["REJECTED"] == 1 and reasons == ["line 1: r1: responses: has 17 responses; the limit is 16"]


def test_an_oversized_line_is_rejected_without_being_read_whole(store, tmp_path):
    big = trl_line(2, padding="x" * (9 * 1024 * 1024))
    path = write_lines(tmp_path / "f.jsonl", [trl_line(1), big, trl_line(3)])
    counts, reasons = import_file(store, path, "trl")
    assert counts["INSERTED"] == 2 and reasons == ["line 2: longer than 8388608 bytes (the line limit)"]
    assert [r.number for r in jsonl_records(path, max_line_bytes=64)] == [1, 2, 3]  # every line too long, each once


def test_a_byte_order_mark_and_crlf_line_endings_are_accepted(store, tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(
        b"\xef\xbb\xbf" + json.dumps(trl_line(1)).encode() + b"\r\n" + json.dumps(trl_line(2)).encode() + b"\r\n"
    )
    counts, reasons = import_file(store, path, "trl")
    assert counts["INSERTED"] == 2 and reasons == []


def test_an_import_that_stops_says_which_lines_were_stored_and_a_rerun_completes_it(store, tmp_path):
    """The store commits 1,000 labels a transaction; a read error at line 1,201 stops the
    import with lines 1-1,000 stored, and running it again completes it."""
    path = write_lines(tmp_path / "f.jsonl", [trl_line(n) for n in range(1, 1501)])

    def failing_read():
        for record in jsonl_records(path):
            if record.number == 1201:
                raise OSError(5, "Input/output error")
            yield record

    with pytest.raises(ImportStopped) as stop:
        import_records(store, failing_read(), trl_label, "trl", "trl")
    assert stop.value.resume_at == "line 1001" and stop.value.counts["INSERTED"] == 1000
    assert "nothing from line 1001 on was stored" in str(stop.value) and "Input/output error" in str(stop.value)
    assert stored_count(store) == 1000
    counts, reasons = import_file(store, path, "trl")
    assert (counts["DUPLICATE"], counts["INSERTED"], reasons) == (1000, 500, [])
    assert stored_count(store) == 1500


def test_an_empty_file_imports_nothing_and_exits_1(home, tmp_path, capsys):
    (tmp_path / "empty.jsonl").write_bytes(b"\n  \n")
    code, _, err = cli(["import", "--format", "hh", str(tmp_path / "empty.jsonl")], capsys)
    assert code == 1 and err.endswith("it holds no records\n")


def test_reimporting_a_file_exits_0_all_duplicate(home, tmp_path, capsys):
    path = write_lines(tmp_path / "f.jsonl", [trl_line(1), trl_line(2)])
    assert cli(["import", "--format", "trl", str(path)], capsys)[0] == 0
    code, out, _ = cli(["import", "--format", "trl", str(path)], capsys)
    assert code == 0 and "duplicate 2" in out
