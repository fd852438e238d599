"""The local judge backend: a tiny causal LM in process (fast), and the bundled SmolLM2 on
real HH pairs (slow). Labels go through a real store server on port 0."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import HH_FILE, REPO, ServerThread, hh_lines
from openai_server import build_tiny_lm

from rm_service.conversation import Message
from rm_service.errors import InvalidArgument
from rm_service.judge.local import LocalBackend
from rm_service.judge.runner import run_judge
from rm_service.judge.settings import JudgeSettings
from rm_service.judge.templates import PAIRWISE_CHOICE, pairwise_messages
from rm_service.settings import ServeSettings

PROMPT = [Message("user", "How do I boil an egg?")]
ITEMS = [
    {"id": "egg", "prompt": "How do I boil an egg?", "completions": ["Boil it for nine minutes.", "Use a microwave."]},
    {
        "id": "river",
        "prompt": "Name a large river.",
        "completions": ["The Nile.", "Paris.", "The Amazon, in South America."],
    },
]


@pytest.fixture
def store(home):
    srv = ServerThread(ServeSettings(port=0, with_model=False, metrics_port=-1))
    yield srv
    srv.stop()


def rows(srv, sql: str):
    with srv.server.store._lock:
        return srv.server.store.con.execute(sql).fetchall()


def write_items(path, items=ITEMS):
    path.write_text("".join(json.dumps(i) + "\n" for i in items))
    return path


def test_choice_shares_the_prefix_of_both_orders_exactly(tiny_lm_dir):
    backend = LocalBackend(str(tiny_lm_dir), device="cpu")
    chats = [
        pairwise_messages(PAIRWISE_CHOICE, PROMPT, a, b, 2000, 1500)
        for a, b in (("Nine minutes.", "Microwave."), ("Microwave.", "Nine minutes."))
    ]
    together = backend.choose(chats, ("A", "B"))  # the rubric and conversation run once, then each order
    alone = [backend.choose([chat], ("A", "B"))[0] for chat in chats]
    for t, a in zip(together, alone, strict=True):
        assert t.keys() == {"A", "B"} and all(abs(t[k] - a[k]) < 1e-4 for k in t)
    assert together[0] != together[1]  # the order changes the input, so the numbers


def test_local_judge_labels_pairs_and_tournaments(store, tiny_lm_dir, tmp_path):
    template = tmp_path / "house.toml"
    template.write_text(
        'version = "house-rubric-v3"\nkind = "pairwise"\nsystem = "Be fair."\n'
        'user = "{conversation}\\nA: {response_a}\\nB: {response_b}\\nBetter, A or B?"\n'
    )
    s = JudgeSettings(backend="local", model=str(tiny_lm_dir), device="cpu", template_file=template)
    counts = run_judge(
        s, address=store.address, input_path=write_items(tmp_path / "items.jsonl"), progress_file=tmp_path / "done"
    )
    assert (counts.items, counts.labeled, counts.pair_judgments, counts.calls) == (2, 2, 4, 8)
    labels = rows(store, "SELECT annotator, metadata FROM labels ORDER BY seq")
    assert [a for a, _ in labels] == [tiny_lm_dir.name] * 2
    assert {json.loads(m)["judge_template"] for _, m in labels} == {"house-rubric-v3"}
    ranks = rows(
        store,
        "SELECT l.metadata, list(r.rank ORDER BY r.position) FROM labels l JOIN label_rankings r USING (label_id) "
        "GROUP BY ALL",
    )
    assert sorted(len(r) for _, r in ranks) == [2, 3]


def test_generate_mode_direct_ranking_counts_parse_failures(store, tiny_lm_dir, tmp_path):
    s = JudgeSettings(
        backend="local",
        model=str(tiny_lm_dir),
        device="cpu",
        decision="generate",
        kway="direct",
        max_new_tokens=6,
        parse_retries=1,
    )
    counts = run_judge(
        s,
        address=store.address,
        input_path=write_items(tmp_path / "items.jsonl", ITEMS[1:]),
        progress_file=tmp_path / "done",
    )
    # the tiny model never writes [[n>m>k]]: asked twice (greedy, then sampled), then counted and skipped
    assert (counts.items, counts.parse_failures, counts.labeled, counts.calls) == (1, 1, 0, 2)
    assert rows(store, "SELECT count(*) FROM labels") == [(0,)]


def test_a_panel_of_judges_votes(store, tiny_lm_dir, tiny_tokenizer, tmp_path):
    other = build_tiny_lm(tmp_path / "judge-two", tiny_tokenizer, seed=11)
    s = JudgeSettings(backend="local", model=f"{tiny_lm_dir},{other}", device="cpu", inconsistent="tie")
    counts = run_judge(
        s,
        address=store.address,
        input_path=write_items(tmp_path / "items.jsonl", ITEMS[:1]),
        progress_file=tmp_path / "done",
    )
    assert counts.labeled == 1 and counts.pair_judgments == 2
    [(annotator, metadata)] = rows(store, "SELECT annotator, metadata FROM labels")
    assert annotator == f"{tiny_lm_dir.name}+judge-two"
    votes = json.loads(json.loads(metadata)["judge_verdicts"])
    assert [v[0] for v in votes] == [tiny_lm_dir.name, "judge-two"]
    # tie policy: each judge's vote counts only when its two orders agree; Copeland over the panel
    score = sum({"first": 1, "second": -1}.get(o1, 0) for _, _, _, o1, o2 in votes if o1 == o2)
    expected = [0, 1] if score > 0 else [1, 0] if score < 0 else [0, 0]
    assert rows(store, "SELECT list(rank ORDER BY position) FROM label_rankings") == [(expected,)]


def test_a_model_without_a_chat_template_is_refused(tiny_encoder_dir):
    with pytest.raises(InvalidArgument, match="no chat template"):
        LocalBackend(str(tiny_encoder_dir), device="cpu")


@pytest.mark.slow
def test_smollm2_judges_hh_pairs_decisively(store, tmp_path, monkeypatch):
    monkeypatch.setenv(
        "RM_MODELS_CACHE_DIR", str(REPO / "var" / "cache" / "models")
    )  # dequantise the GGUF once, not per test
    path = tmp_path / "hh.jsonl"
    path.write_text("\n".join(hh_lines(2)) + "\n")
    assert HH_FILE.exists()
    s = JudgeSettings(
        backend="local",
        model="smollm2-135m-instruct",
        max_conversation_chars=500,
        max_response_chars=300,
        torch_threads=1,
    )
    threads = torch.get_num_threads()
    try:
        counts = run_judge(s, address=store.address, input_path=path, progress_file=tmp_path / "done")
    finally:
        torch.set_num_threads(threads)  # torch_threads is process-wide: give later tests theirs back
    # choice mode + calibration: a decisive verdict for every pair, whatever the position bias
    assert (counts.labeled, counts.ties, counts.parse_failures) == (2, 0, 0)
    assert rows(store, "SELECT DISTINCT annotator, source FROM labels") == [("smollm2-135m-instruct", "JUDGE")]
