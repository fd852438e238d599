"""SESSION tasks over gRPC: played conversations queued, leased by kind, answered by feedback."""

from __future__ import annotations

import grpc
import pytest
from conftest import store_at_version

from rm_service.api.v1 import common_pb2, preference_pb2
from rm_service.settings import StoreSettings
from rm_service.store.db import Store

M = common_pb2.Message
PLAYED = [
    M(role="user", content="How do I keep basil alive?"),
    M(role="assistant", content="Give it sun and water when the soil is dry."),
    M(role="user", content="It is wilting anyway."),
    M(role="assistant", content="Check the roots; a bigger pot may help."),
]


def _submit(stub, conversation=PLAYED, priority=0):
    session = preference_pb2.SessionCandidate(
        conversation=conversation, policy_version="step-3", sampling={"user_simulator": "served"}, priority=priority
    )
    return list(stub.SubmitSessions(preference_pb2.SubmitSessionsRequest(sessions=[session]), timeout=10).task_ids)


def _lease(stub, kinds=(), owner="judge-1"):
    request = preference_pb2.LeaseTasksRequest(owner=owner, max_tasks=10, lease_seconds=60, kinds=list(kinds))
    return list(stub.LeaseTasks(request, timeout=10).tasks)


def _feedback(task_id, conversation=PLAYED, source=preference_pb2.JUDGE, annotator="gold", label_id="fb-1"):
    return preference_pb2.Feedback(
        label_id=label_id,
        conversation=conversation,
        thumbs=[
            preference_pb2.TurnThumb(message_index=1, thumb=preference_pb2.THUMB_UP),
            preference_pb2.TurnThumb(message_index=3, thumb=preference_pb2.THUMB_DOWN),
        ],
        outcome=0.0,
        source=source,
        annotator=annotator,
        task_id=task_id,
    )


def test_session_tasks_are_leased_by_kind_and_closed_by_their_feedback(preference):
    stub, srv = preference
    [tid] = _submit(stub)
    assert _submit(stub) == [tid]  # idempotent
    ranking = stub.SubmitCandidates(
        preference_pb2.SubmitCandidatesRequest(
            candidates=[preference_pb2.Candidate(prompt=PLAYED[:1], completions=["a", "b"], policy_version="step-3")]
        ),
        timeout=10,
    ).task_ids[0]
    assert [t.task_id for t in _lease(stub)] == [ranking]  # no kinds: rankings only, as before sessions existed
    [leased] = _lease(stub, [preference_pb2.SESSION])
    assert leased.task_id == tid and leased.kind == preference_pb2.SESSION
    assert [m.content for m in leased.conversation] == [m.content for m in PLAYED]
    assert not leased.prompt and not leased.completions
    assert stub.GetStats(preference_pb2.GetStatsRequest(), timeout=10).session_queue_depth == 0

    rank = preference_pb2.Label(
        label_id="rank-1", prompt=PLAYED[:1], responses=["x", "y"], ranks=[0, 1], source=preference_pb2.HUMAN,
        annotator="p", task_id=tid,
    )  # fmt: skip
    [wrong_kind] = stub.IngestLabels(preference_pb2.IngestLabelsRequest(labels=[rank]), timeout=10).results
    assert wrong_kind.status == preference_pb2.REJECTED and "session task" in wrong_kind.reason
    other = [*PLAYED[:3], M(role="assistant", content="Another last turn.")]
    [elsewhere] = stub.IngestFeedback(
        preference_pb2.IngestFeedbackRequest(feedback=[_feedback(tid, other, label_id="fb-0")]), timeout=10
    ).results
    assert elsewhere.status == preference_pb2.REJECTED and elsewhere.reason.startswith("feedback[0].conversation")

    [ok] = stub.IngestFeedback(preference_pb2.IngestFeedbackRequest(feedback=[_feedback(tid)]), timeout=10).results
    assert ok.status == preference_pb2.INSERTED
    state, closed_by, kind = srv.server.store.con.execute(
        "SELECT state, closed_by, kind FROM tasks WHERE task_id = ?", [tid]
    ).fetchone()
    assert (state, closed_by, kind) == ("done", "fb-1", "session")
    assert _lease(stub, [preference_pb2.SESSION, preference_pb2.RANKING], owner="judge-2") == []
    rows = srv.server.store.con.execute(
        "SELECT kind, message_index, value FROM label_feedback WHERE label_id = 'fb-1' ORDER BY kind, message_index"
    ).fetchall()
    assert rows == [("outcome", -1, 0.0), ("thumb", 1, 1.0), ("thumb", 3, 0.0)]


def test_judge_and_people_agreement_on_session_feedback(preference):
    stub, _ = preference
    [tid] = _submit(stub)
    person = _feedback("", source=preference_pb2.HUMAN, annotator="p1", label_id="h-1")
    person.thumbs[1].thumb = preference_pb2.THUMB_UP  # the judge said down on turn 3
    person.outcome = 0.0
    results = stub.IngestFeedback(
        preference_pb2.IngestFeedbackRequest(feedback=[_feedback(tid), person]), timeout=10
    ).results
    assert [r.status for r in results] == [preference_pb2.INSERTED] * 2
    stats = stub.GetStats(preference_pb2.GetStatsRequest(), timeout=10)
    assert stats.judge_human_shared_thumbs == 2 and stats.judge_human_thumb_agreement == pytest.approx(0.5)
    assert stats.judge_human_shared_outcomes == 1 and stats.judge_human_outcome_agreement == 1.0


@pytest.mark.parametrize(
    "session, field",
    [
        (preference_pb2.SessionCandidate(), "sessions[0].conversation"),
        (preference_pb2.SessionCandidate(conversation=PLAYED[:1]), "sessions[0].conversation"),
        (preference_pb2.SessionCandidate(conversation=PLAYED, policy_version="v" * 300), "sessions[0].policy_version"),
    ],
)
def test_bad_sessions_are_invalid_argument_and_store_nothing(preference, session, field):
    stub, srv = preference
    with pytest.raises(grpc.RpcError) as err:
        stub.SubmitSessions(preference_pb2.SubmitSessionsRequest(sessions=[session]), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field in err.value.details()
    assert srv.server.store.con.execute("SELECT count(*) FROM tasks").fetchone() == (0,)


def test_unspecified_kind_is_invalid_argument(preference):
    stub, _ = preference
    with pytest.raises(grpc.RpcError) as err:
        _lease(stub, [preference_pb2.TASK_KIND_UNSPECIFIED])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "kinds[0]" in err.value.details()


def test_a_v8_store_migrates_its_tasks_to_ranking(tmp_path):
    path = tmp_path / "old.duckdb"
    con = store_at_version(path, 8)
    con.execute(
        "INSERT INTO tasks (task_id, conversation_id, completion_ids, state) VALUES ('task-old', 'c', ['a', 'b'], "
        "'queued')"
    )
    con.close()
    store = Store(StoreSettings(path=path))
    try:
        assert store.con.execute("SELECT task_id, kind FROM tasks").fetchall() == [("task-old", "ranking")]
    finally:
        store.close()
