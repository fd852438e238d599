"""`rm-service demo --multi-turn` end to end with tiny models: import, gold and proxy, a user
model trained on the imported conversations, the server serving all three, multi-turn PPO
against the served user model, the held-out sessions scored by the gold, the report."""

from __future__ import annotations

import json

import duckdb
import pytest
from conftest import HH_FILE

from rm_service import registry
from rm_service.cli import main
from rm_service.demo import run_demo
from rm_service.demo.settings import DemoSettings
from rm_service.settings import StoreSettings
from rm_service.store.db import Store


@pytest.mark.slow
def test_the_multi_turn_demo_with_tiny_models(home, tmp_path, tiny_backbone_dir, tiny_lm_dir, capsys):
    data = tmp_path / "hh.jsonl"
    data.write_text("".join(HH_FILE.read_text(encoding="utf-8").splitlines(keepends=True)[:80]), encoding="utf-8")
    settings = DemoSettings(
        data=data, home=tmp_path / "demo", rm_backbone=str(tiny_backbone_dir), rm_max_minutes=1.0, rm_max_tokens=128,
        rm_ensemble_size=2, calibration_pairs=0, proxy_dataset_fraction=0.5, policy=str(tiny_lm_dir),
        multi_turn=True, user_backbone=str(tiny_lm_dir), user_max_minutes=0.2, session_steps=20, prompts_per_step=2,
        samples_per_prompt=2, max_new_tokens=4, user_max_new_tokens=6, session_eval_openings=2, max_turns=2,
        session_submit_fraction=0.5, session_retrain_min_labels=4, progress=False,
    )  # fmt: skip
    assert run_demo(settings) == 0
    out = capsys.readouterr().out
    demo = tmp_path / "demo"
    report = (demo / "report.md").read_text()
    assert "whole conversations" in report and "gold session value" in report and "gold reward, turn 1" in report
    assert "User model u1" in report and "Server exit code 0" in report and "[7/7]" in out

    steps = [json.loads(line) for line in (demo / "sessions" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in steps] == list(range(1, 21))
    assert {m["user/version"] for m in steps} == {"u1"} and steps[0]["rm/version"] == "v2"
    events = [json.loads(line) for line in (demo / "sessions" / "events.jsonl").read_text().splitlines()]
    evaluations = [e for e in events if e["event"] == "eval"]
    assert {e["model"] for e in evaluations} == {"policy", "reference"}
    for e in evaluations:  # every held-out session scored by the gold: per turn and the session
        assert e["n"] == 4 and e["gold_session_value_mean"] == e["gold_session_value_mean"]
        assert e["gold_reward_turn1"] == e["gold_reward_turn1"]

    # the outer loop on sessions: played sessions queued, the gold's ScoreTurns labeled them
    submitted = [e for e in events if e["event"] == "sessions_submitted"]
    total = sum(e["count"] for e in submitted)  # 2 of each step's 4 sessions (fewer only if two were identical)
    assert [e["step"] for e in submitted] == list(range(1, 21)) and 20 <= total <= 40
    assert f"Sessions sent for labeling: {total}" in report
    con = duckdb.connect(str(demo / "rm.duckdb"), read_only=True)
    try:
        judged = con.execute(
            """SELECT count(DISTINCT l.label_id), count(*) FILTER (f.kind = 'outcome') FROM labels l
               JOIN label_feedback f USING (label_id) JOIN tasks t ON t.task_id = l.task_id
               WHERE l.source = 'JUDGE' AND l.annotator = 'turns:v1' AND t.kind = 'session' AND t.state = 'done'"""
        ).fetchone()
    finally:
        con.close()
    assert judged[0] == total and judged[1] == total  # every session sent: the judge drains the queue at the end

    # the retrain on that feedback, decided by the promotion rule with the feedback as evidence of its own
    assert any(e["event"] == "retrain_requested" for e in events)
    store = Store(StoreSettings(path=demo / "rm.duckdb"), read_only=True)
    try:
        retrained = [m for m in registry.list_models(store) if m.parent == "v2"]  # a running retrain finishes at stop
    finally:
        store.close()
    assert retrained and retrained[0].decision["parent"] == "v2"
    assert retrained[0].decision["feedback"]["pairs"] >= 4 and "feedback on its sessions" in report


def test_a_user_model_to_reuse_that_is_not_one_is_a_one_line_error(home, tmp_path, capsys):
    """Checked before anything is imported or trained."""
    (tmp_path / "not-a-version").mkdir()
    code = main(
        ["demo", "--multi-turn", "--user-model", str(tmp_path / "not-a-version"), "--home", str(tmp_path / "d")]
    )
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("demo: --user-model") and "no user.json" in err and "\n" not in err
    assert not (tmp_path / "d").exists()
