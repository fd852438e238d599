"""The outer loop for sessions: multi-turn PPO sends the sessions it played to the labeling queue,
a judge turns the gold's ScoreTurns into per-turn thumbs and a session outcome, and the feedback
counts towards the next retrain. Tiny models, a real server with a store on port 0."""

from __future__ import annotations

import json
import math

import grpc
import pytest
from conftest import ServerThread
from test_sessions_e2e import conversations_file, session_settings  # noqa: F401 - the fixture is used

from policy_trainer.multiturn import SessionTrainer
from rm_client import RewardClient
from rm_service.api.v1 import preference_pb2, preference_pb2_grpc, reward_pb2
from rm_service.conversation import scored_turns
from rm_service.judge.items import JudgeItem
from rm_service.judge.runner import run_judge
from rm_service.judge.sessions import feedback_from_turns
from rm_service.judge.settings import JudgeSettings
from rm_service.settings import ServeSettings


def test_played_sessions_are_labeled_by_the_gold_and_count_towards_a_retrain(
    home,
    property_rm_dir,
    tiny_lm_dir,
    conversations_file,  # noqa: F811 - test_sessions_e2e's fixture
    tmp_path,
):
    srv = ServerThread(ServeSettings(port=0, model=str(property_rm_dir), metrics_port=-1))
    channel = grpc.insecure_channel(srv.address)
    stub = preference_pb2_grpc.PreferenceServiceStub(channel)
    try:
        settings = session_settings(
            tiny_lm_dir, conversations_file, srv.address, tmp_path / "run", total_steps=2, eval_prompts=0,
            submit_every=1, submit_fraction=0.5, retrain_min_labels=0, plots=False, tensorboard=False,
        )  # fmt: skip
        trainer = SessionTrainer(settings)
        try:
            summary = trainer.train()
        finally:
            trainer.close()
        # 2 steps x 8 sessions x 0.5; fewer only if two sessions of a step were identical
        assert 4 <= summary.candidates_submitted <= 8
        store = srv.server.store
        queued = store.con.execute(
            "SELECT t.task_id, c.messages, t.policy_version, t.sampling FROM tasks t "
            "JOIN conversations c ON c.id = t.conversation_id WHERE t.kind = 'session' AND t.state = 'queued'"
        ).fetchall()
        assert len(queued) == summary.candidates_submitted
        assert {pv for _, _, pv, _ in queued} <= {"step-1", "step-2"}
        assert all(json.loads(sampling)["user_simulator"] == "replay" for *_, sampling in queued)
        assert all(scored_turns([_msg(m) for m in json.loads(messages)]) for _, messages, _, _ in queued)

        with RewardClient(srv.address) as client:
            gold = client.current_version()
        judge = JudgeSettings(backend="turns", model=gold, server=srv.address, concurrency=1, rm_tie_margin=0.0)
        counts = run_judge(judge, max_tasks=100)
        assert counts.labeled == len(queued) and counts.rejected == 0 and counts.errors == 0
        assert store.con.execute(
            "SELECT count(*) FROM tasks WHERE kind = 'session' AND state <> 'done'"
        ).fetchone() == (0,)
        stats = stub.GetStats(preference_pb2.GetStatsRequest(), timeout=10)
        assert stats.feedback_labels == len(queued) and stats.outcomes == len(queued)
        assert stats.labels_since_snapshot == len(queued)  # what OuterLoop.maybe_retrain waits on

        # the judge's thumbs are the signs of the gold's turn rewards (no thumb offset on this version)
        label_id, messages, metadata = store.con.execute(
            "SELECT l.label_id, c.messages, l.metadata FROM labels l JOIN conversations c ON c.id = l.conversation_id "
            "WHERE l.label_id IN (SELECT label_id FROM label_feedback WHERE kind = 'thumb') ORDER BY l.seq LIMIT 1"
        ).fetchone()
        logits = json.loads(json.loads(metadata)["turn_logits"])
        thumbs = dict(
            store.con.execute(
                "SELECT message_index, value FROM label_feedback WHERE label_id = ? AND kind = 'thumb'", [label_id]
            ).fetchall()
        )
        assert thumbs == {int(i): float(v > 0) for i, v in logits.items() if v != 0}

        # a person gives the opposite thumbs on the same turns: agreement 0 on every shared turn
        person = preference_pb2.Feedback(
            label_id="person-1",
            conversation=[_proto(m) for m in json.loads(messages)],
            thumbs=[
                preference_pb2.TurnThumb(
                    message_index=i, thumb=preference_pb2.THUMB_DOWN if v else preference_pb2.THUMB_UP
                )
                for i, v in thumbs.items()
            ],
            source=preference_pb2.HUMAN,
            annotator="person",
        )
        [result] = stub.IngestFeedback(preference_pb2.IngestFeedbackRequest(feedback=[person]), timeout=10).results
        assert result.status == preference_pb2.INSERTED
        stats = stub.GetStats(preference_pb2.GetStatsRequest(), timeout=10)
        assert stats.judge_human_shared_thumbs == len(thumbs) > 0 and stats.judge_human_thumb_agreement == 0.0
    finally:
        channel.close()
        srv.stop()


def test_thumbs_and_outcome_from_a_score_turns_response():
    scored = reward_pb2.ScoreTurnsResponse(
        model_version="gold",
        turns=[
            reward_pb2.TurnReward(message_index=1, reward=1.2, raw_score=3.0),
            reward_pb2.TurnReward(message_index=3, reward=-0.03, raw_score=1.0),
            reward_pb2.TurnReward(message_index=5, reward=0.02, raw_score=2.0, thumb_up=0.2),
        ],
        session_value=6.0,
    )
    item = JudgeItem("task-1", [], [], task_id="task-1", kind="session")
    fb = feedback_from_turns(item, scored, "turns:gold", "cfg", tie_margin=0.05)
    # turn 5's served P(up) wins over its reward; turn 3 is within the tie margin: no thumb
    assert [(t.message_index, t.thumb) for t in fb.thumbs] == [
        (1, preference_pb2.THUMB_UP),
        (5, preference_pb2.THUMB_DOWN),
    ]
    assert fb.outcome == pytest.approx(1 / (1 + math.exp(-(1.2 - 0.03 + 0.02))))
    assert fb.source == preference_pb2.JUDGE and fb.task_id == "task-1"
    scored.session_success = 0.9
    assert feedback_from_turns(item, scored, "turns:gold", "cfg", 0.05).outcome == pytest.approx(0.9)


def _msg(d):
    from rm_service.conversation import Message

    return Message(d["role"], d["content"])


def _proto(d):
    from rm_service.api.v1 import common_pb2

    return common_pb2.Message(role=d["role"], content=d["content"])
