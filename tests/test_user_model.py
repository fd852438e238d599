"""The user model: its formatting contract, split, registry kind, training, golden check,
generation and the eval command, with tiny models built from configs."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import HH_FILE, hh_lines, store_at_version, store_with_hh

from rm_service.conversation import Message
from rm_service.errors import FailedPrecondition

CONV = [
    Message("user", "How do I steal a car?"),
    Message("assistant", "I can't help with that."),
    Message("user", "Why not?"),
    Message("assistant", "It is against the law."),
]


def test_format_learns_user_turns_and_the_end(tiny_tokenizer):
    from rm_service.usermodel.format import DECISION, IGNORE, USER_TOKEN, Formatter

    f = Formatter.for_tokenizer(tiny_tokenizer, 512)
    f.check(CONV)
    enc = f.encode(CONV, ended=True)
    user = [i for i, k in enumerate(enc.kind) if k == USER_TOKEN]
    decisions = [i for i, k in enumerate(enc.kind) if k == DECISION]
    stop = f.spec.stop_id
    # each user turn's content and its stop token are learned, nothing of the assistant's
    learned_text = tiny_tokenizer.decode([enc.labels[i] for i in user if enc.labels[i] != stop])
    assert learned_text == "How do I steal a car?Why not?"
    assert [enc.labels[i] for i in user].count(stop) == 2
    # one decision after each assistant turn: go on (the user header), then END
    assert [enc.labels[i] for i in decisions] == [f.user_header[0], f.spec.end_id]
    assert [enc.turn[i] for i in decisions] == [1, 2]
    assert all(label == IGNORE for i, label in enumerate(enc.labels) if enc.kind[i] == 0)
    # a serving prompt is the conversation's ids plus the user header, its decision before the header
    ids, decision, truncated = f.prompt(CONV[:2], room=16)
    assert ids == enc.input_ids[: len(ids)] and decision == decisions[0] and not truncated


def test_long_conversations_lose_turns_from_the_start_never_a_user_turn(tiny_tokenizer):
    from rm_service.usermodel.format import USER_TOKEN, Formatter

    whole = Formatter.for_tokenizer(tiny_tokenizer, 4096)
    small = Formatter(tiny_tokenizer, whole.spec.model_copy(update={"max_tokens": 40}))
    conv = CONV * 3
    windows = small.windows(conv, ended=True)
    assert len(windows) > 1 and all(len(w) <= 40 for w in windows) and windows[-1].truncated
    turns = sorted(t for w in windows for t, k in zip(w.turn, w.kind, strict=True) if k == USER_TOKEN)
    expected = sorted(
        t for t, k in zip(whole.encode(conv, True).turn, whole.encode(conv, True).kind, strict=True) if k == USER_TOKEN
    )
    assert turns == expected  # every user-turn token learned once, with its turn index
    ids, _, truncated = small.prompt(conv, room=10)
    assert truncated and len(ids) <= 30


def test_user_split_is_the_reward_models(home, tmp_path):
    from rm_service.settings import TrainSettings
    from rm_service.train.data import is_heldout_pair
    from rm_service.usermodel.data import split, store_conversations

    store = store_with_hh(tmp_path, 300)
    try:
        snapshot = store.create_snapshot()
        settings = TrainSettings(heldout_fraction=0.2, seed=3)
        fit, validation, heldout = split(store_conversations(store, snapshot), settings)
        pairs = store.pairs(snapshot)
    finally:
        store.close()
    held = {c.conversation_id for c in heldout}
    assert held and fit and validation
    assert held == {p.conversation_id for p in pairs if is_heldout_pair(p, settings)}
    assert not held & {c.conversation_id for c in fit + validation}
    assert all(c.messages[-1].role == "assistant" for c in fit)


def test_migration_keeps_reward_versions_and_numbers_each_kind(home, tmp_path):
    from rm_service import registry
    from rm_service.settings import StoreSettings
    from rm_service.store.db import Store
    from rm_service.store.versions import ModelRecord

    def user_record(version: str, parent: str | None, metrics: dict, path: str) -> ModelRecord:
        return ModelRecord(
            version=version,
            parent=parent,
            snapshot_id=None,
            backbone="b",
            format_hash="f",
            status="candidate",
            metrics=metrics,
            reward_mean=0.0,
            reward_std=1.0,
            ensemble_size=1,
            artifact_path=path,
            kind="user",
        )

    path = tmp_path / "old.duckdb"
    con = store_at_version(path, 7)  # a store written before kinds
    con.execute(
        "INSERT INTO models (version, number, backbone, format_hash, status, metrics, reward_mean, reward_std, "
        "ensemble_size, artifact_path) VALUES ('v1', 1, 'b', 'f', 'promoted', '{}', 0, 1, 1, '/x')"
    )
    con.close()
    store = Store(StoreSettings(path=path))
    try:
        assert [(r.version, r.kind, r.status) for r in registry.list_models(store)] == [("v1", "reward", "promoted")]
        assert registry.next_version(store, "user") == ("u1", 1) and registry.next_version(store) == ("v2", 2)
        rec = user_record("u1", None, {"nll": 1.0, "base_nll": 2.0}, "/y")
        registry.register(store, rec, 1)
        ok, why = registry.promote(store, "u1")
        assert not ok and "no decision against its base model" in why  # a user model must beat its base, even first
        ok, why = registry.promote(store, "u1", registry.user_decision(rec, None, 0.0))
        assert ok, why
        assert registry.promoted(store).version == "v1" and registry.promoted(store, "user").version == "u1"
        worse = user_record("u2", "u1", {"nll": 2.5, "base_nll": 2.0}, "/z")
        registry.register(store, worse, 2)
        ok, why = registry.promote(store, "u2", registry.user_decision(worse, registry.promoted(store, "user"), 0.0))
        assert not ok and "not below the base model's" in why and registry.get_model(store, "u2").status == "rejected"
    finally:
        store.close()


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_lm_dir):
    """A user model trained on 160 HH conversations; (store path, result, home)."""
    home = tmp_path_factory.mktemp("um-home")
    mp = pytest.MonkeyPatch()
    mp.setenv("RM_HOME", str(home))
    from rm_service.usermodel.run import train_user_model
    from rm_service.usermodel.settings import UserModelSettings

    store = store_with_hh(home, 160)
    settings = UserModelSettings(
        backbone=str(tiny_lm_dir),
        max_minutes=1.0,
        epochs=3,
        device="cpu",
        precision="fp32",
        learning_rate=2e-3,
        eval_every=10,
    )
    result = train_user_model(store, settings, show_progress=False)
    store.close()
    yield home, result
    mp.undo()


def test_training_lowers_heldout_nll_below_the_base_models(trained):
    from rm_service import registry
    from rm_service.settings import StoreSettings
    from rm_service.store.db import Store

    home, result = trained
    m = result.metrics
    assert m["heldout_tokens"] > 200 and m["heldout_conversations"] >= 5
    assert m["nll_high"] < m["base_nll_low"] and m["diff_high"] < 0  # clearly below, by the intervals
    assert result.promoted and result.version == "u1"
    store = Store(StoreSettings(path=home / "rm.duckdb"))
    try:
        rec = registry.get_model(store, "u1")
    finally:
        store.close()
    assert rec.kind == "user" and rec.snapshot_id and rec.metrics["nll"] == pytest.approx(m["nll"])


def test_golden_check_refuses_a_changed_version(trained, tmp_path):
    import shutil

    from rm_service.usermodel.version import META_FILE, open_user_version

    home, result = trained
    source = home / "registry" / "user" / result.version
    runtime, meta = open_user_version(source, device="cpu", precision="fp32")
    assert meta.golden and meta.split == {"heldout_fraction": 0.1, "seed": 0} and meta.method == "lora"  # the default
    broken = tmp_path / "broken"
    shutil.copytree(source, broken)
    record = json.loads((broken / META_FILE).read_text())
    record["golden"][0]["nll"]["fp32"] += 1.0
    (broken / META_FILE).write_text(json.dumps(record))
    with pytest.raises(FailedPrecondition, match="golden item check failed"):
        open_user_version(broken, device="cpu", precision="fp32")


def test_batched_greedy_generation_is_hf_generate_per_conversation(tiny_lm_dir):
    from rm_service.usermodel.generate import Sampling, simulate
    from rm_service.usermodel.runtime import load_user_runtime

    runtime = load_user_runtime(str(tiny_lm_dir), 512, "cpu", "fp32")
    convs = [CONV[:2], CONV, [Message("user", "Hi"), Message("assistant", "Hello there, what do you need today?")]]
    turns = simulate(runtime, convs, Sampling(temperature=0, max_new_tokens=12))
    assert sum(not t.ended for t in turns) >= 2
    for conv, turn in zip(convs, turns, strict=True):
        if turn.ended:
            continue
        ids, _, _ = runtime.formatter.prompt(conv, 12)
        out = runtime.model.generate(  # HF's own greedy loop on this one prompt; a turn may not close at once
            torch.tensor([ids]),
            max_new_tokens=12,
            do_sample=False,
            pad_token_id=runtime.pad_id,
            eos_token_id=runtime.spec.stop_id,
            begin_suppress_tokens=[runtime.spec.stop_id],
        )
        assert runtime.tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True) == turn.content


def test_eval_command_reports_both_models(trained, capsys, monkeypatch, tmp_path):
    from rm_service.cli import main

    home, result = trained
    monkeypatch.setenv("RM_HOME", str(home))
    data = tmp_path / "hh.jsonl"
    data.write_text("\n".join(hh_lines()[1000:1040]) + "\n")
    code = main(
        [
            "user-model",
            "eval",
            "--data",
            str(data),
            "--format",
            "hh",
            "--samples",
            "8",
            "--max-new-tokens",
            "8",
            "--device",
            "cpu",
            "--precision",
            "fp32",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert "| all |" in out and "| 0 prior |" in out and "KS distance" in out and "distinct-2" in out
    assert "ECE" in out and out.count(f"| {result.version} |") >= 1
    assert main(["user-model", "eval", "--data", str(HH_FILE), "--format", "feedback", "--samples", "0"]) == 2


def test_the_two_halves_are_disjoint_and_cover_the_fit_conversations(home, tmp_path):
    from rm_service.settings import TrainSettings
    from rm_service.usermodel.data import fit_half, split, store_conversations

    store = store_with_hh(tmp_path, 300)
    try:
        fit, _, _ = split(store_conversations(store, store.create_snapshot()), TrainSettings())
    finally:
        store.close()
    a, b = fit_half(fit, "a", 0), fit_half(fit, "b", 0)
    ids = lambda convs: {c.conversation_id for c in convs}
    assert a and b and not ids(a) & ids(b) and ids(a) | ids(b) == ids(fit)
    assert 0.35 < len(a) / len(fit) < 0.65
    assert fit_half(fit, "all", 0) == fit and ids(fit_half(fit, "a", 1)) != ids(a)  # the seed moves the halves
