"""The real gRPC server on port 0: Score, validation codes, health, reflection, ingestion."""

from __future__ import annotations

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from rm_service.api.v1 import common_pb2, preference_pb2, preference_pb2_grpc, reward_pb2, reward_pb2_grpc

PROMPT = [
    common_pb2.Message(role="user", content="How do I bake bread?"),
    common_pb2.Message(role="assistant", content="Do you have yeast?"),
    common_pb2.Message(role="user", content="Yes, and flour."),
]


@pytest.fixture
def stubs(server):
    channel = grpc.insecure_channel(server.address)
    yield (reward_pb2_grpc.RewardServiceStub(channel), preference_pb2_grpc.PreferenceServiceStub(channel), channel)
    channel.close()


def _item(i: int, completion: str) -> reward_pb2.ScoreItem:
    return reward_pb2.ScoreItem(id=f"item-{i}", prompt=PROMPT, completion=completion)


def test_score_returns_one_result_per_item_in_order(stubs, tiny_rm_dir):
    reward, _, _ = stubs
    completions = [
        "Mix flour, water, yeast and salt.",
        "No.",
        "Knead for ten minutes, let it rise, then bake at 220C for 30 minutes.",
    ]
    response = reward.Score(reward_pb2.ScoreRequest(items=[_item(i, c) for i, c in enumerate(completions)]), timeout=30)
    assert [r.id for r in response.results] == ["item-0", "item-1", "item-2"]
    assert response.model_version == tiny_rm_dir.name and response.format_hash
    # The checkpoint scored as its trainer scored it: TRL's tokens (the chat template applied, as
    # TRL's RewardTrainer tokenizes), transformers' own class, one item at a time.
    tokenizer = AutoTokenizer.from_pretrained(tiny_rm_dir)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_rm_dir).eval()
    prompt = [{"role": m.role, "content": m.content} for m in PROMPT]
    for result, completion in zip(response.results, completions, strict=True):
        ids = tokenizer.apply_chat_template(
            prompt + [{"role": "assistant", "content": completion}], tokenize=True, return_dict=True
        )["input_ids"]
        with torch.no_grad():
            expected = float(model(input_ids=torch.tensor([ids])).logits[0, 0])
        assert result.raw_score == pytest.approx(expected, abs=1e-5)
        assert result.num_tokens == len(ids)
        assert not result.truncated
    assert len({r.raw_score for r in response.results}) == 3


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (reward_pb2.ScoreRequest(), "items"),
        (reward_pb2.ScoreRequest(items=[_item(0, "")]), "items[0].completion"),
        (reward_pb2.ScoreRequest(items=[_item(0, "ok"), _item(1, "   ")]), "items[1].completion"),
        (
            reward_pb2.ScoreRequest(
                items=[reward_pb2.ScoreItem(prompt=[common_pb2.Message(role="robot", content="hi")], completion="x")]
            ),
            "items[0].prompt[0].role",
        ),
        (reward_pb2.ScoreRequest(items=[reward_pb2.ScoreItem(completion="x")]), "items[0].prompt"),
        (
            reward_pb2.ScoreRequest(
                items=[reward_pb2.ScoreItem(prompt=[common_pb2.Message(role="user", content="")], completion="x")]
            ),
            "items[0].prompt[0].content",
        ),
    ],
)
def test_bad_score_requests_are_invalid_argument_naming_the_field(stubs, request_, field):
    reward, _, _ = stubs
    with pytest.raises(grpc.RpcError) as err:
        reward.Score(request_, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith(field + ":")


def test_unknown_pinned_version_is_not_found(stubs):
    reward, _, _ = stubs
    with pytest.raises(grpc.RpcError) as err:
        reward.Score(reward_pb2.ScoreRequest(items=[_item(0, "x")], model_version="v999"), timeout=30)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_too_many_items_is_invalid_argument(home, tiny_rm_dir):
    from conftest import ServerThread

    from rm_service.settings import ServeSettings

    srv = ServerThread(ServeSettings(port=0, model=str(tiny_rm_dir), max_items_per_request=2, with_store=False))
    try:
        with grpc.insecure_channel(srv.address) as channel:
            with pytest.raises(grpc.RpcError) as err:
                reward_pb2_grpc.RewardServiceStub(channel).Score(
                    reward_pb2.ScoreRequest(items=[_item(i, "x") for i in range(3)]), timeout=30
                )
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "items" in err.value.details()
    finally:
        srv.stop()


def test_health_reports_serving(stubs):
    _, _, channel = stubs
    health = health_pb2_grpc.HealthStub(channel)
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == health_pb2.HealthCheckResponse.SERVING
    assert (
        health.Check(health_pb2.HealthCheckRequest(service="rm.v1.RewardService"), timeout=10).status
        == health_pb2.HealthCheckResponse.SERVING
    )


def test_reflection_lists_the_services(stubs):
    _, _, channel = stubs
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
    names = {s.name for r in responses for s in r.list_services_response.service}
    assert {"rm.v1.RewardService", "rm.v1.PreferenceService", "rm.v1.TrainingService", "grpc.health.v1.Health"} <= names


def test_ingest_labels_statuses_and_stored_rows(server, stubs):
    _, preference, _ = stubs
    good = preference_pb2.Label(
        label_id="a-1",
        prompt=PROMPT,
        responses=["Knead it.", "No idea."],
        ranks=[0, 1],
        source=preference_pb2.HUMAN,
        annotator="alice",
    )
    bad = preference_pb2.Label(
        label_id="a-2",
        prompt=PROMPT,
        responses=["Same.", "Same."],
        ranks=[0, 1],
        source=preference_pb2.HUMAN,
        annotator="alice",
    )
    changed = preference_pb2.Label(
        label_id="a-1",
        prompt=PROMPT,
        responses=["Knead it.", "No idea."],
        ranks=[1, 0],
        source=preference_pb2.HUMAN,
        annotator="alice",
    )
    first = preference.IngestLabels(preference_pb2.IngestLabelsRequest(labels=[good, bad]), timeout=30)
    assert [r.status for r in first.results] == [preference_pb2.INSERTED, preference_pb2.REJECTED]
    assert "labels[1].responses" in first.results[1].reason
    again = preference.IngestLabels(preference_pb2.IngestLabelsRequest(labels=[good, changed]), timeout=30)
    assert [r.status for r in again.results] == [preference_pb2.DUPLICATE, preference_pb2.CONFLICT]
    stats = preference.GetStats(preference_pb2.GetStatsRequest(), timeout=30)
    assert (
        stats.labels_total == 1 and stats.labels_by_source["HUMAN"] == 1 and stats.completions == 2 and stats.pairs == 1
    )
    con = server.server.store.con
    assert con.execute("SELECT label_id, annotator, source FROM labels").fetchall() == [("a-1", "alice", "HUMAN")]
    assert con.execute("SELECT rank FROM label_rankings ORDER BY position").fetchall() == [(0,), (1,)]


def test_empty_ingest_is_invalid_argument(stubs):
    _, preference, _ = stubs
    with pytest.raises(grpc.RpcError) as err:
        preference.IngestLabels(preference_pb2.IngestLabelsRequest(), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and err.value.details().startswith("labels:")


def test_get_model_describes_the_served_version(stubs, tiny_rm_dir):
    reward, _, _ = stubs
    info = reward.GetModel(reward_pb2.GetModelRequest(), timeout=30)
    assert info.version == tiny_rm_dir.name and info.loaded and info.status == "external" and info.ensemble_size == 1
    with pytest.raises(grpc.RpcError) as err:
        reward.GetModel(reward_pb2.GetModelRequest(version="v42"), timeout=30)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_non_loopback_bind_is_refused(home, tiny_rm_dir):
    from rm_service.errors import FailedPrecondition
    from rm_service.server.app import RewardServer
    from rm_service.settings import ServeSettings

    with pytest.raises(FailedPrecondition, match="refusing to bind 0.0.0.0"):
        RewardServer(ServeSettings(host="0.0.0.0", port=0, model=str(tiny_rm_dir)))
