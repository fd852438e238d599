"""`import --format trl` takes TRL's preference formats as TRL defines them; `export --format
trl` writes files TRL's RewardTrainer loads (margin on every row or on none)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rm_service.cli import main
from rm_service.conversation import Message
from rm_service.formats import export_file, import_file
from rm_service.settings import StoreSettings
from rm_service.store.db import Store
from rm_service.store.labels import LabelIn
from rm_service.store.read import labels_in_snapshot


def msg(role: str, content, **extra) -> dict:
    return {"role": role, "content": content, **extra}


SKY = [msg("user", "What color is the sky?")]

# one row of each TRL preference shape -> (prompt, chosen, rejected) as stored
SHAPES = {
    "standard, explicit prompt": (
        {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},
        ([Message("user", "The sky is")], " blue.", " green."),
    ),
    "standard, implicit prompt (the space before the difference goes with the completions)": (
        {"chosen": "The sky is blue.", "rejected": "The sky is green."},
        ([Message("user", "The sky is")], " blue.", " green."),
    ),
    "conversational, explicit prompt": (
        {"prompt": SKY, "chosen": [msg("assistant", "It is blue.")], "rejected": [msg("assistant", "It is green.")]},
        ([Message("user", "What color is the sky?")], "It is blue.", "It is green."),
    ),
    "conversational, implicit prompt": (
        {"chosen": [*SKY, msg("assistant", "It is blue.")], "rejected": [*SKY, msg("assistant", "It is green.")]},
        ([Message("user", "What color is the sky?")], "It is blue.", "It is green."),
    ),
    "string prompt with whole conversations (TRL ignores a prompt of the other kind)": (
        {
            "prompt": "What color is the sky?",
            "chosen": [*SKY, msg("assistant", "Blue.")],
            "rejected": [*SKY, msg("assistant", "Green.")],
        },
        ([Message("user", "What color is the sky?")], "Blue.", "Green."),
    ),
    "content parts and extra message keys": (
        {
            "prompt": [
                msg("system", [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}]),
                msg("user", [{"type": "text", "text": "Weather?"}], name="alice"),
            ],
            "chosen": [msg("assistant", [{"type": "text", "text": "Sunny."}], tool_calls=[])],
            "rejected": [msg("assistant", "Rain, probably.", name="bot", tool_calls=[{"id": "1"}])],
        },
        ([Message("system", "Be brief."), Message("user", "Weather?")], "Sunny.", "Rain, probably."),
    ),
    "explicit prompt whose completions share leading turns": (
        {
            "prompt": SKY,
            "chosen": [msg("assistant", "Why?"), msg("user", "Curious."), msg("assistant", "Blue.")],
            "rejected": [msg("assistant", "Why?"), msg("user", "Curious."), msg("assistant", "Green.")],
        },
        (
            [Message("user", "What color is the sky?"), Message("assistant", "Why?"), Message("user", "Curious.")],
            "Blue.",
            "Green.",
        ),
    ),
}


@pytest.fixture
def store(tmp_path):
    s = Store(StoreSettings(path=tmp_path / "rm.duckdb"))
    yield s
    s.close()


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.mark.parametrize("shape", list(SHAPES))
def test_each_trl_shape_imports_with_its_prompt_chosen_and_rejected(store, tmp_path, shape):
    row, (prompt, chosen, rejected) = SHAPES[shape]
    counts, reasons = import_file(store, write_jsonl(tmp_path / "in.jsonl", [row]), "trl")
    assert counts["INSERTED"] == 1 and reasons == []
    (label,) = labels_in_snapshot(store, store.create_snapshot())
    assert (label.prompt, label.responses, label.ranks) == (prompt, [chosen, rejected], [0, 1])


def test_extra_columns_are_kept_as_metadata(store, tmp_path):
    row = SHAPES["conversational, implicit prompt"][0] | {
        "prompt_id": "abc",
        "score_chosen": 9.0,
        "score_rejected": 2,
        "messages": [msg("user", "hi")],
        "format": "theirs",
    }
    import_file(store, write_jsonl(tmp_path / "in.jsonl", [row]), "trl")
    (label,) = labels_in_snapshot(store, store.create_snapshot())
    assert label.metadata == {
        "prompt_id": "abc",
        "score_chosen": "9.0",
        "score_rejected": "2",
        "messages": '[{"role":"user","content":"hi"}]',
        "format": "trl",
    }


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        (
            {
                "prompt": SKY,
                "chosen": [msg("assistant", [{"type": "image", "url": "x.png"}])],
                "rejected": [msg("assistant", "b")],
            },
            "chosen[0].content[0] is a 'image' part; only text parts",
        ),
        ({"chosen": "Same start, then a", "rejected": "Different entirely"}, "share no prompt"),
        ({"chosen": "text", "rejected": [msg("assistant", "b")]}, "both be strings or both be lists"),
        (
            {"prompt": SKY, "chosen": [msg("assistant", None)], "rejected": [msg("assistant", "b")]},
            "content must be a string or a list of text parts",
        ),
        ({"prompt": SKY, "chosen": [{"content": "a"}], "rejected": [msg("assistant", "b")]}, "string 'role'"),
    ],
)
def test_rows_trl_cannot_mean_are_rejected_with_a_reason(store, tmp_path, row, reason):
    counts, reasons = import_file(store, write_jsonl(tmp_path / "in.jsonl", [row]), "trl")
    assert counts["REJECTED"] == 1 and reasons[0].startswith("line 1: ") and reason in reasons[0], reasons


def test_a_file_whose_every_row_is_rejected_exits_non_zero(home, tmp_path, capsys):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"chosen": 1, "rejected": 2}, {"prompt": "only"}])
    assert main(["import", "--format", "trl", str(path)]) == 1
    assert (
        capsys.readouterr().err == f"rm-service import: nothing was imported from {path}: every record was rejected\n"
    )


def _label(n: int, strength: float | None) -> LabelIn:
    return LabelIn(f"l{n}", [Message("user", f"q{n}")], [f"a{n}", f"b{n}"], [0, 1], "HUMAN", "ann", strength=strength)


@pytest.mark.parametrize(
    ("strengths", "margins"),
    [
        ((1.5, None, 0.0), [1.5, 0.0, 0.0]),  # mixed: margin on every row, 0.0 where the label has none
        ((None, None), None),  # none: no margin column at all
        ((2.0, 0.5), [2.0, 0.5]),
    ],
)
def test_export_has_margin_on_every_row_or_none(store, tmp_path, strengths, margins):
    store.ingest([_label(n, s) for n, s in enumerate(strengths)])
    n, _ = export_file(store, tmp_path / "out.jsonl", "trl")
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert n == len(strengths) == len(rows)
    assert [r.get("margin") for r in rows] == (margins or [None] * len(rows))
    assert all(("margin" in r) == (margins is not None) for r in rows)
