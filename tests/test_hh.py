"""HH-RLHF import on the shared data: counts, turns, exact round trip."""

from __future__ import annotations

import json

import pytest
from conftest import HH_FILE, hh_lines

from rm_service.formats import export_file, import_file
from rm_service.formats.hh import HHFormatError, parse_conversation, parse_pair
from rm_service.settings import StoreSettings
from rm_service.store.db import Store


@pytest.fixture
def store(tmp_path):
    s = Store(StoreSettings(path=tmp_path / "rm.duckdb"))
    yield s
    s.close()


def test_parse_splits_turns_into_messages():
    prompt = parse_conversation("\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: Tell me a joke")
    assert [(m.role, m.content) for m in prompt] == [
        ("user", "Hi there"),
        ("assistant", "Hello!"),
        ("user", "Tell me a joke"),
    ]
    with pytest.raises(HHFormatError):
        parse_conversation("no turns here")
    with pytest.raises(HHFormatError, match="share"):
        parse_pair({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: c\n\nAssistant: d"})


def test_import_round_trips_the_shared_file(store, tmp_path):
    counts, rejected = import_file(store, HH_FILE, "hh")
    valid = []
    for line in hh_lines():
        try:
            pair = parse_pair(json.loads(line))
        except HHFormatError:
            continue
        if pair.chosen.strip() and pair.rejected.strip():
            valid.append((line, pair))
    assert counts["INSERTED"] == len(valid) > 1800
    assert counts["REJECTED"] == len(hh_lines()) - len(valid) == len(rejected)
    assert store.con.execute(
        "SELECT count(*) FROM labels WHERE source = 'IMPORT' AND annotator = 'hh-rlhf'"
    ).fetchone()[0] == len(valid)
    # Turns: every stored conversation has the turns of its line's prompt.
    line, pair = valid[0]
    turns = store.con.execute(
        "SELECT num_turns FROM conversations c JOIN labels l ON l.conversation_id = c.id "
        "WHERE l.metadata->>'line' = '1'"
    ).fetchone()[0]
    assert turns == len(pair.prompt)
    out = tmp_path / "export.jsonl"
    n, _ = export_file(store, out, "hh")
    exported = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert n == len(valid)
    assert exported == [json.loads(line) for line, _ in valid]  # chosen/rejected text exact, same order


def test_reimport_is_idempotent(store):
    import_file(store, HH_FILE, "hh")
    counts, _ = import_file(store, HH_FILE, "hh")
    assert counts["INSERTED"] == 0 and counts["DUPLICATE"] > 1800
