"""The labeling queue over gRPC: submit, lease, expiry, closing labels, agreement stats."""

from __future__ import annotations

import time

import grpc
import pytest

from rm_service.api.v1 import common_pb2, preference_pb2

PROMPT = [common_pb2.Message(role="user", content="Write a haiku about rain.")]


def _candidate(completions, priority=0):
    return preference_pb2.Candidate(
        prompt=PROMPT,
        completions=completions,
        policy_version="step-7",
        sampling={"temperature": "0.7"},
        priority=priority,
    )


def test_submit_is_idempotent_and_lease_orders_by_priority(preference):
    stub, srv = preference
    low = stub.SubmitCandidates(
        preference_pb2.SubmitCandidatesRequest(candidates=[_candidate(["a", "b"])]), timeout=10
    ).task_ids
    high = stub.SubmitCandidates(
        preference_pb2.SubmitCandidatesRequest(candidates=[_candidate(["c", "d", "e"], priority=5)]), timeout=10
    ).task_ids
    again = stub.SubmitCandidates(
        preference_pb2.SubmitCandidatesRequest(candidates=[_candidate(["a", "b"])]), timeout=10
    ).task_ids
    assert again == low
    leased = stub.LeaseTasks(
        preference_pb2.LeaseTasksRequest(owner="judge-1", max_tasks=1, lease_seconds=60), timeout=10
    ).tasks
    assert [t.task_id for t in leased] == list(high) and list(leased[0].completions) == ["c", "d", "e"]
    assert leased[0].policy_version == "step-7" and leased[0].lease_expires_unix_ms > time.time() * 1000
    stats = stub.GetStats(preference_pb2.GetStatsRequest(), timeout=10)
    assert stats.queue_depth == 1 and stats.tasks_leased == 1
    origin = srv.server.store.con.execute("SELECT DISTINCT origin FROM completions").fetchall()
    assert origin == [("policy@step-7",)]


def test_expired_leases_return_tasks_to_the_queue(preference):
    stub, _ = preference
    [tid] = stub.SubmitCandidates(
        preference_pb2.SubmitCandidatesRequest(candidates=[_candidate(["x", "y"])]), timeout=10
    ).task_ids
    first = stub.LeaseTasks(preference_pb2.LeaseTasksRequest(owner="a", max_tasks=5, lease_seconds=1), timeout=10).tasks
    assert [t.task_id for t in first] == [tid]
    assert not stub.LeaseTasks(
        preference_pb2.LeaseTasksRequest(owner="b", max_tasks=5, lease_seconds=1), timeout=10
    ).tasks
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # the lease lasts one second
        second = stub.LeaseTasks(
            preference_pb2.LeaseTasksRequest(owner="b", max_tasks=5, lease_seconds=30), timeout=10
        ).tasks
        if second:
            break
        time.sleep(0.2)
    assert [t.task_id for t in second] == [tid]


def test_a_label_with_task_id_closes_the_task(preference):
    stub, srv = preference
    [tid] = stub.SubmitCandidates(
        preference_pb2.SubmitCandidatesRequest(candidates=[_candidate(["x", "y"])]), timeout=10
    ).task_ids
    stub.LeaseTasks(preference_pb2.LeaseTasksRequest(owner="judge", max_tasks=1, lease_seconds=60), timeout=10)
    answer = preference_pb2.Label(
        label_id="j-1",
        prompt=PROMPT,
        responses=["y", "x"],
        ranks=[0, 1],
        source=preference_pb2.JUDGE,
        annotator="judge-model",
        task_id=tid,
    )
    unknown = preference_pb2.Label(
        label_id="j-2",
        prompt=PROMPT,
        responses=["y", "x"],
        ranks=[0, 1],
        source=preference_pb2.JUDGE,
        annotator="judge-model",
        task_id="task-nope",
    )
    results = stub.IngestLabels(preference_pb2.IngestLabelsRequest(labels=[answer, unknown]), timeout=10).results
    assert [r.status for r in results] == [preference_pb2.INSERTED, preference_pb2.REJECTED]
    assert results[1].reason.startswith("labels[1].task_id:")
    assert srv.server.store.con.execute("SELECT state, closed_by FROM tasks").fetchall() == [("done", "j-1")]
    stats = stub.GetStats(preference_pb2.GetStatsRequest(), timeout=10)
    assert stats.queue_depth == 0 and stats.tasks_done == 1


def test_provenance_is_the_servers_not_the_clients(preference):
    """The policy trainer sends policy_version "policy@step-3": stored once as policy@step-3
    (was policy@policy@step-3). A label's metadata "origin" stays plain metadata: completions
    keep the origin the server gave them (was: the client's metadata overrode it)."""
    stub, srv = preference
    sampled = preference_pb2.Candidate(prompt=PROMPT, completions=["p1", "p2"], policy_version="policy@step-3")
    [tid] = stub.SubmitCandidates(preference_pb2.SubmitCandidatesRequest(candidates=[sampled]), timeout=10).task_ids
    answer = preference_pb2.Label(
        label_id="a-1",
        prompt=PROMPT,
        responses=["p2", "p1"],
        ranks=[0, 1],
        source=preference_pb2.HUMAN,
        annotator="ann",
        task_id=tid,
        metadata={"origin": "human"},
    )
    fresh = preference_pb2.Label(
        label_id="a-2",
        prompt=PROMPT,
        responses=["f1", "f2"],
        ranks=[1, 0],
        source=preference_pb2.HUMAN,
        annotator="ann",
        metadata={"origin": "policy@step-999", "batch": "7"},
    )
    results = stub.IngestLabels(preference_pb2.IngestLabelsRequest(labels=[answer, fresh]), timeout=10).results
    assert [r.status for r in results] == [preference_pb2.INSERTED, preference_pb2.INSERTED]
    con = srv.server.store.con
    assert dict(con.execute("SELECT text, origin FROM completions").fetchall()) == {
        "p1": "policy@step-3",
        "p2": "policy@step-3",
        "f1": "dataset",
        "f2": "dataset",
    }
    assert con.execute("SELECT metadata->>'origin' FROM labels ORDER BY seq").fetchall() == [
        ("human",),
        ("policy@step-999",),
    ]
    leased = stub.LeaseTasks(
        preference_pb2.LeaseTasksRequest(owner="x", max_tasks=1, lease_seconds=60), timeout=10
    ).tasks
    assert not leased  # the task was answered


@pytest.mark.parametrize(
    ("candidate", "field"),
    [
        (preference_pb2.Candidate(prompt=PROMPT, completions=["only one"]), "candidates[0].completions"),
        (preference_pb2.Candidate(prompt=PROMPT, completions=["same", "same"]), "candidates[0].completions"),
        (
            preference_pb2.Candidate(prompt=[common_pb2.Message(role="bot", content="x")], completions=["a", "b"]),
            "candidates[0].prompt[0].role",
        ),
        (preference_pb2.Candidate(prompt=PROMPT, completions=["a", ""]), "candidates[0].completions[1]"),
        (
            preference_pb2.Candidate(prompt=PROMPT, completions=["a", "b"], policy_version="v" * 201),
            "candidates[0].policy_version",
        ),
    ],
)
def test_bad_candidates_are_invalid_argument(preference, candidate, field):
    stub, srv = preference
    with pytest.raises(grpc.RpcError) as err:
        stub.SubmitCandidates(preference_pb2.SubmitCandidatesRequest(candidates=[candidate]), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and err.value.details().startswith(field + ":")
    assert srv.server.store.con.execute("SELECT count(*) FROM tasks").fetchone()[0] == 0


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (preference_pb2.LeaseTasksRequest(owner="", max_tasks=1, lease_seconds=10), "owner"),
        (preference_pb2.LeaseTasksRequest(owner="a", max_tasks=0, lease_seconds=10), "max_tasks"),
        (preference_pb2.LeaseTasksRequest(owner="a", max_tasks=1, lease_seconds=0), "lease_seconds"),
        (preference_pb2.LeaseTasksRequest(owner="a", max_tasks=1, lease_seconds=10**7), "lease_seconds"),
    ],
)
def test_bad_lease_requests_are_invalid_argument(preference, request_, field):
    stub, _ = preference
    with pytest.raises(grpc.RpcError) as err:
        stub.LeaseTasks(request_, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and err.value.details().startswith(field + ":")


def test_judge_human_agreement_on_shared_pairs(preference):
    stub, _ = preference

    def label(lid, source, responses, ranks, prompt=PROMPT):
        return preference_pb2.Label(
            label_id=lid, prompt=prompt, responses=responses, ranks=ranks, source=source, annotator="x"
        )

    other = [common_pb2.Message(role="user", content="Another prompt")]
    labels = [
        label("h1", preference_pb2.HUMAN, ["a", "b"], [0, 1]),
        label("j1", preference_pb2.JUDGE, ["b", "a"], [1, 0]),  # same preference, other order: agrees
        label("h2", preference_pb2.HUMAN, ["c", "d"], [0, 1], other),
        label("j2", preference_pb2.JUDGE, ["c", "d"], [1, 0], other),  # disagrees
        label("j3", preference_pb2.JUDGE, ["e", "f"], [0, 1]),  # no human label: not shared
    ]
    stub.IngestLabels(preference_pb2.IngestLabelsRequest(labels=labels), timeout=10)
    stats = stub.GetStats(preference_pb2.GetStatsRequest(), timeout=10)
    assert stats.judge_human_shared_pairs == 2 and stats.judge_human_agreement == pytest.approx(0.5)
    assert dict(stats.labels_by_source) == {"HUMAN": 2, "JUDGE": 3}
