"""TrainingService on a real server: RequestRetrain trains, gates and promotes a version, the
server hot-swaps to it, and jobs are coalesced, watched, and recorded in the store."""

from __future__ import annotations

import time

import grpc
import pytest
from conftest import ServerThread, store_with_hh

from rm_service import registry
from rm_service.api.v1 import (
    common_pb2,
    preference_pb2,
    preference_pb2_grpc,
    reward_pb2,
    reward_pb2_grpc,
    training_pb2,
    training_pb2_grpc,
)
from rm_service.settings import ModelSettings, ServeSettings, StoreSettings, TrainSettings
from rm_service.store import jobs
from rm_service.store.db import Store
from rm_service.train.run import train


@pytest.fixture
def trained_home(home, tmp_path, tiny_backbone_dir):
    """A store with 40 HH labels and v1 promoted, trained on the tiny backbone; the store closed."""
    store = store_with_hh(tmp_path, 40)
    settings = TrainSettings(backbone=str(tiny_backbone_dir), ensemble_size=2, max_tokens=128, export_onnx="off")
    train(store, settings, ModelSettings(), show_progress=False)
    store.close()
    return settings


@pytest.fixture
def server(trained_home):
    srv = ServerThread(ServeSettings(port=0, watch_interval_s=0.1, metrics_port=-1), train=trained_home)
    yield srv
    srv.stop()


def _stubs(address):
    channel = grpc.insecure_channel(address)
    return channel, training_pb2_grpc.TrainingServiceStub(channel), reward_pb2_grpc.RewardServiceStub(channel)


def _score_version(reward) -> str:
    item = reward_pb2.ScoreItem(id="a", prompt=[common_pb2.Message(role="user", content="Hi?")], completion="Hello.")
    return reward.Score(reward_pb2.ScoreRequest(items=[item]), timeout=30).model_version


def _new_labels(channel, n: int = 120) -> None:
    """n fresh human labels of one clear preference (the specific answer over "Maybe."), which
    v1 never saw: a retrain learns it, and its held-out share shows the promotion rule a gain."""
    labels = [
        preference_pb2.Label(
            label_id=f"new-{i}",
            prompt=[common_pb2.Message(role="user", content=f"Question {i}: is {i} even?")],
            responses=[f"{'Yes' if i % 2 == 0 else 'No'}, {i} is {'even' if i % 2 == 0 else 'odd'}.", "Maybe."],
            ranks=[0, 1],
            source=preference_pb2.HUMAN,
            annotator="tester",
        )
        for i in range(n)
    ]
    response = preference_pb2_grpc.PreferenceServiceStub(channel).IngestLabels(
        preference_pb2.IngestLabelsRequest(labels=labels), timeout=30
    )
    assert all(r.status == preference_pb2.INSERTED for r in response.results)


def test_request_retrain_promotes_a_new_version_and_the_server_switches_to_it(server):
    channel, training, reward = _stubs(server.address)
    with channel:
        assert _score_version(reward) == "v1"
        _new_labels(channel)
        job = training.RequestRetrain(training_pb2.RetrainRequest(promote=True, reason="test"), timeout=30)
        assert job.state in ("queued", "running") and job.job_id
        again = training.RequestRetrain(training_pb2.RetrainRequest(promote=True), timeout=30)
        assert again.job_id == job.job_id  # one retraining job at a time: the second request joins it

        states = [j.state for j in training.WatchJob(training_pb2.GetJobRequest(job_id=job.job_id), timeout=120)]
        assert states[-1] == "succeeded" and "running" in states
        done = training.GetJob(training_pb2.GetJobRequest(job_id=job.job_id), timeout=30)
        assert (done.model_version, done.promoted, done.decision) == ("v2", True, "promote"), done.decision_reason
        assert done.snapshot_id and "accuracy" in done.metrics and done.finished_at.seconds > 0
        assert done.metrics["gate_human_low"] > 0 and "better than its parent on human pairs" in done.decision_reason

        deadline = time.monotonic() + 30
        while _score_version(reward) != "v2":  # the registry follower hot-swaps
            assert time.monotonic() < deadline, "the server never switched to v2"
            time.sleep(0.1)
    store = server.server.store
    assert registry.get_model(store, "v2").parent == "v1"
    assert jobs.get_job(store, job.job_id).request["reason"] == "test"


def test_bad_requests_name_the_field_or_the_missing_thing(server):
    channel, training, _ = _stubs(server.address)
    with channel:
        cases = [
            (
                lambda: training.RequestRetrain(training_pb2.RetrainRequest(mode="bogus"), timeout=10),
                grpc.StatusCode.INVALID_ARGUMENT,
                "mode",
            ),
            (
                lambda: training.RequestRetrain(training_pb2.RetrainRequest(parent_version="v9"), timeout=10),
                grpc.StatusCode.NOT_FOUND,
                "v9",
            ),
            (
                lambda: training.GetJob(training_pb2.GetJobRequest(job_id="job-nope"), timeout=10),
                grpc.StatusCode.NOT_FOUND,
                "job-nope",
            ),
            (
                lambda: training.GetJob(training_pb2.GetJobRequest(), timeout=10),
                grpc.StatusCode.INVALID_ARGUMENT,
                "job_id",
            ),
            (
                lambda: list(training.WatchJob(training_pb2.GetJobRequest(job_id="job-nope"), timeout=10)),
                grpc.StatusCode.NOT_FOUND,
                "job-nope",
            ),
        ]
        for call, code, text in cases:
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() == code and text in err.value.details()
    with server.server.store._lock:
        assert server.server.store.con.execute("SELECT count(*) FROM jobs").fetchone()[0] == 0  # nothing queued


def test_a_job_that_cannot_train_fails_with_its_reason(home, tmp_path, tiny_backbone_dir):
    Store(StoreSettings()).close()  # an empty store: nothing to train on
    settings = TrainSettings(backbone=str(tiny_backbone_dir), export_onnx="off")
    srv = ServerThread(ServeSettings(port=0, with_model=False, metrics_port=-1), train=settings)
    try:
        channel, training, _ = _stubs(srv.address)
        with channel:
            job = training.RequestRetrain(training_pb2.RetrainRequest(), timeout=30)
            last = list(training.WatchJob(training_pb2.GetJobRequest(job_id=job.job_id), timeout=60))[-1]
        assert last.state == "failed" and "no preference pairs" in last.error
    finally:
        srv.stop()


def test_a_job_left_running_by_a_dead_server_is_marked_failed_at_start(home, tmp_path, tiny_backbone_dir):
    store = Store(StoreSettings())
    job, created = jobs.create_job(store, "retrain", {"promote": True})
    jobs.mark_running(store, job.job_id)
    store.close()
    srv = ServerThread(
        ServeSettings(port=0, with_model=False, metrics_port=-1), train=TrainSettings(backbone=str(tiny_backbone_dir))
    )
    try:
        channel, training, _ = _stubs(srv.address)
        with channel:
            found = training.GetJob(training_pb2.GetJobRequest(job_id=job.job_id), timeout=10)
        assert created and found.state == "failed" and "interrupted" in found.error
    finally:
        srv.stop()


def test_watch_models_tells_of_a_retrain_that_was_not_promoted(server):
    """No new labels: the retrain's heads equal its parent's, it stays a candidate, and
    WatchModels says so instead of leaving trainers to wonder why nothing switched."""
    channel, training, reward = _stubs(server.address)
    with channel:
        events = reward.WatchModels(reward_pb2.WatchModelsRequest(), timeout=120)
        assert next(events).kind == "current"
        job = training.RequestRetrain(training_pb2.RetrainRequest(promote=True, reason="nothing new"), timeout=30)
        last = list(training.WatchJob(training_pb2.GetJobRequest(job_id=job.job_id), timeout=120))[-1]
        assert (last.state, last.promoted) == ("succeeded", False)
        event = next(events)
        events.cancel()
    assert (event.kind, event.model.version) == ("candidate", last.model_version) and event.model.metrics[
        "unchanged_from_parent"
    ] == 1.0
