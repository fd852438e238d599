"""The judge's pure parts: strict verdict parsing, templates, the swap policies, Copeland
ranks, agreement metrics and the JSONL item reader."""

from __future__ import annotations

import json
import math

import pytest

from rm_service.conversation import Message
from rm_service.errors import InvalidArgument
from rm_service.judge.items import read_items
from rm_service.judge.pairwise import SwapJudgment, combine_orders, copeland_ranks, outcome
from rm_service.judge.templates import (
    PAIRWISE_CHOICE,
    clip_response,
    load_template,
    pairwise_messages,
    render_conversation,
)
from rm_service.judge.verdict import ParseFailure, choice_verdict, parse_pairwise, parse_ranking
from rm_service.store.agreement import SharedPair, agreement_report, cohen_kappa, format_report


@pytest.mark.parametrize(
    ("text", "position"),
    [
        ("A is clearer and safer.\n[[A]]", "A"),
        ("[[B]]", "B"),
        ("Both are equally fine. [[C]]", "tie"),
        ("Verdict: [[ A ]] ... again [[A]]", "A"),  # the same verdict twice is one verdict
    ],
)
def test_pairwise_verdicts_parse(text, position):
    verdict = parse_pairwise(text)
    assert verdict.position == position and "[[" not in verdict.rationale


@pytest.mark.parametrize("text", ["A", "I prefer reply A.", "[[A]] no wait [[B]]", "[A]", "[[D]]", ""])
def test_unparseable_pairwise_answers_are_failures_not_guesses(text):
    with pytest.raises(ParseFailure):
        parse_pairwise(text)


def test_rankings_parse_with_ties_and_reject_bad_ones():
    assert parse_ranking("because... [[2>1=3]]", 3)[0] == [1, 0, 1]
    assert parse_ranking("[[3 > 1 > 2]]", 3)[0] == [1, 2, 0]
    for bad in ("[[1>2]]", "[[1>2>2]]", "[[1>2>4]]", "no ranking", "[[1>2>3]] or [[3>2>1]]"):
        with pytest.raises(ParseFailure):
            parse_ranking(bad, 3)


def test_choice_verdict_compares_log_probabilities():
    assert choice_verdict({"A": -0.5, "B": -1.5}).position == "A"
    assert choice_verdict({"A": -2.0, "B": -1.0}).margin == pytest.approx(-1.0)
    assert choice_verdict({"A": -1.0, "B": -1.2}, tie_margin=0.5).position == "tie"
    assert choice_verdict({"A": -900.0, "B": -901.0}).position == "A"  # no underflow
    with pytest.raises(ParseFailure):
        choice_verdict({"A": -1.0, "B": -math.inf})  # not among the server's top tokens


def test_positions_map_back_to_replies():
    # Order 1 shows (i, j) as (A, B); order 2 shows (j, i).
    assert outcome("A", swapped=False) == "first" and outcome("A", swapped=True) == "second"
    assert outcome("B", swapped=True) == "first" and outcome("tie", swapped=True) == "tie"


def _jd(o1, o2, m1=0.0, m2=0.0, i=0, j=1):
    return SwapJudgment("judge", i, j, o1, o2, "", m1, m2)


@pytest.mark.parametrize(
    ("o1", "o2", "m1", "m2", "tie", "skip", "calibrate"),
    [
        ("first", "first", 2.0, 1.0, "first", "first", "first"),
        ("second", "second", -1.0, -3.0, "second", "second", "second"),
        ("tie", "tie", 0.0, 0.0, "tie", "tie", "tie"),
        # The judge picked the reply shown first both times: a position flip.
        ("first", "second", 3.0, -1.0, "tie", None, "first"),
        ("first", "second", 0.5, -2.5, "tie", None, "second"),
        # generate-mode margins: a split verdict cancels, a win and a tie stay a win
        ("first", "second", 1.0, -1.0, "tie", None, "tie"),
        ("tie", "second", 0.0, -1.0, "tie", None, "second"),
    ],
)
def test_inconsistent_policies(o1, o2, m1, m2, tie, skip, calibrate):
    jd = _jd(o1, o2, m1, m2)
    assert jd.flipped == (o1 != o2)
    assert combine_orders(jd, "tie") == tie
    assert combine_orders(jd, "skip") == skip
    assert combine_orders(jd, "calibrate") == calibrate


def test_copeland_ranks_are_dense_and_vote():
    assert copeland_ranks(2, [_jd("first", "first")], "tie") == [0, 1]
    assert copeland_ranks(2, [_jd("first", "second")], "tie") == [0, 0]
    assert copeland_ranks(2, [_jd("first", "second")], "skip") is None
    # a panel of three: two say reply 1, one says reply 0
    panel = [_jd("first", "first"), _jd("second", "second"), _jd("second", "second")]
    assert copeland_ranks(2, panel, "tie") == [1, 0]
    # a 3-way tournament: 2 beats 0 and 1, 0 and 1 tie
    tournament = [_jd("tie", "tie", i=0, j=1), _jd("second", "second", i=0, j=2), _jd("second", "second", i=1, j=2)]
    assert copeland_ranks(3, tournament, "tie") == [1, 1, 0]


def test_cohen_kappa_matches_the_textbook_example():
    # 50 items: both "yes" 20, both "no" 15, rater a yes / b no 5, a no / b yes 10
    a = ["yes"] * 20 + ["no"] * 15 + ["yes"] * 5 + ["no"] * 10
    b = ["yes"] * 20 + ["no"] * 15 + ["no"] * 5 + ["yes"] * 10
    # p_o = 0.7, p_e = 0.5 * 0.6 + 0.5 * 0.4 = 0.5
    assert cohen_kappa(a, b) == pytest.approx(0.4)
    assert cohen_kappa(["x", "y"], ["x", "y"]) == pytest.approx(1.0)
    assert math.isnan(cohen_kappa([], [])) and math.isnan(cohen_kappa(["x"], ["x"]))


def test_agreement_report_counts_ties_length_and_flips():
    pairs = [
        SharedPair(10, 5, reference=1.0, judge=1.0),  # agree, both prefer the longer x
        SharedPair(10, 5, reference=0.0, judge=1.0),  # disagree: judge longer, people shorter
        SharedPair(3, 9, reference=0.0, judge=0.0),  # agree, both prefer the longer y
        SharedPair(4, 4, reference=1.0, judge=0.5),  # the judge tied
        SharedPair(4, 6, reference=0.5, judge=1.0),  # the people split: left out
    ]
    r = agreement_report(pairs, swapped_pairs=8, position_flips=2)
    assert (r.shared_pairs, r.judge_ties, r.length_pairs) == (3, 1, 3)
    assert r.agreement == pytest.approx(2 / 3) and r.position_bias_rate == pytest.approx(0.25)
    assert r.judge_longer == pytest.approx(1.0) and r.reference_longer == pytest.approx(2 / 3)
    assert r.kappa == pytest.approx(0.4)  # people x,y,y vs judge x,x,y: p_o 2/3, p_e 4/9
    table = format_report(r)
    assert "| agreement with people" in table and "0.667" in table and "0.250" in table


def test_templates_render_and_truncate():
    prompt = [Message("user", "x" * 50), Message("assistant", "ok"), Message("user", "Which river is longest?")]
    chat = pairwise_messages(
        PAIRWISE_CHOICE, prompt, "The Nile.", "The Amazon.", max_conversation_chars=40, max_response_chars=5
    )
    assert [m.role for m in chat] == ["system", "user"]
    user = chat[1].content
    assert "User: Which river is longest?" in user and "x" * 50 not in user  # the end of the conversation is kept
    assert "The N[...]" in user and user.index("The N") < user.index("The A")
    assert render_conversation(prompt, 10_000).startswith("User: xxx") and clip_response(" hi ", 10) == "hi"


def test_template_files_are_checked(tmp_path):
    good = tmp_path / "good.toml"
    good.write_text(
        'version = "house-v2"\nkind = "pairwise"\nsystem = "Judge {{fairly}}."\n'
        'user = "{conversation} A: {response_a} B: {response_b}"\n'
    )
    t = load_template(good)
    assert (
        t.version == "house-v2"
        and t.messages(conversation="c", response_a="a", response_b="b")[0].content == "Judge {fairly}."
    )
    bad = tmp_path / "bad.toml"
    bad.write_text('version = "v"\nkind = "pairwise"\nsystem = "s"\nuser = "{conversation} {response_a}"\n')
    with pytest.raises(InvalidArgument, match="placeholders"):
        load_template(bad)
    with pytest.raises(InvalidArgument, match="no such file"):
        load_template(tmp_path / "missing.toml")


def test_items_file_shapes_and_errors(tmp_path):
    path = tmp_path / "items.jsonl"
    lines = [
        {"id": "q1", "prompt": "Name a river.", "completions": ["The Nile.", "Paris."]},
        {"prompt": [{"role": "user", "content": "Hi"}], "responses": ["Hello!", "Go away.", "Hey."]},
        {"chosen": "\n\nHuman: Hi?\n\nAssistant: Hello.", "rejected": "\n\nHuman: Hi?\n\nAssistant: No."},
    ]
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    items = read_items(path)
    assert [i.key for i in items][0] == "q1" and items[1].key.startswith("item-") and len(items[1].responses) == 3
    assert items[2].prompt == [Message("user", "Hi?")] and items[2].responses == ["Hello.", "No."]
    for bad, where in [
        ("not json", ":1"),
        (json.dumps({"prompt": "p", "completions": ["same", "same"]}), ":1.completions"),
        (json.dumps({"prompt": "p", "completions": ["only one"]}), ":1.completions"),
        (json.dumps({"prompt": [{"role": "bot", "content": "x"}], "completions": ["a", "b"]}), ":1.prompt[0].role"),
    ]:
        path.write_text(bad + "\n")
        with pytest.raises(InvalidArgument) as err:
            read_items(path)
        assert str(err.value).startswith(f"{path}{where}")
