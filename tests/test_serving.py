"""The production serving path on real servers: batching, deadlines, admission, hot-swap,
WatchModels, ScoreTurns, scale-out and graceful shutdown."""

from __future__ import annotations

import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import grpc
import pytest
from conftest import ServerThread, Stall, store_with_hh
from conftest import wait_until as _wait

from rm_service import registry
from rm_service.api.v1 import common_pb2, reward_pb2, reward_pb2_grpc
from rm_service.settings import ModelSettings, ServeSettings, TrainSettings
from rm_service.train.run import train

PROMPT = [
    common_pb2.Message(role="user", content="Tell me about rivers."),
    common_pb2.Message(role="assistant", content="Which river?"),
    common_pb2.Message(role="user", content="The longest one."),
]


def _request(completions, version=""):
    return reward_pb2.ScoreRequest(
        items=[reward_pb2.ScoreItem(id=str(i), prompt=PROMPT, completion=c) for i, c in enumerate(completions)],
        model_version=version,
    )


@pytest.fixture
def stalled(home, tiny_rm_dir):
    srv = ServerThread(ServeSettings(port=0, model=str(tiny_rm_dir), with_store=False, max_inflight_items=8))
    served = srv.server.served.get()
    stall = Stall(served.backend)
    served.backend = stall
    channel = grpc.insecure_channel(srv.address)
    yield srv, reward_pb2_grpc.RewardServiceStub(channel), stall
    stall.release()
    channel.close()
    srv.stop()


def test_an_items_score_does_not_depend_on_its_batch(server):
    with grpc.insecure_channel(server.address) as channel:
        stub = reward_pb2_grpc.RewardServiceStub(channel)
        alone = stub.Score(_request(["The Nile."]), timeout=30).results[0].raw_score
        long = "The Nile, in Africa, runs about 6,650 km from Lake Victoria to the Mediterranean. " * 8
        with_others = stub.Score(_request([long, "The Nile.", "Amazon", long[:100]]), timeout=30).results[1].raw_score
    assert abs(alone - with_others) <= 1e-5


def test_a_deadline_against_a_stalled_model_never_runs_the_item(stalled):
    srv, stub, stall = stalled
    with pytest.raises(grpc.RpcError) as first:  # occupies the model thread
        stub.Score(_request(["first"]), timeout=0.05)
    with pytest.raises(grpc.RpcError) as second:  # waits in the queue behind it, then expires
        stub.Score(_request(["second"]), timeout=0.05)
    assert first.value.code() == second.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    stall.release()
    _wait(lambda: srv.server.batcher.inflight_items == 0 and srv.server.batcher.queued_tokens == 0)
    assert stall.batches == [1]  # only the first call's item ran; the queued one was dropped before the model


def test_cancelled_calls_leak_no_permits(stalled):
    srv, stub, stall = stalled
    srv.server.batcher.max_inflight_items = 1000
    futures = [stub.Score.future(_request([f"c{i}"]), timeout=30) for i in range(100)]
    _wait(lambda: srv.server.batcher.inflight_items == 100)
    for f in futures:
        f.cancel()
    _wait(lambda: srv.server.batcher.inflight_items == 0)  # the server saw every cancel: permits back
    _wait(
        lambda: srv.server.batcher.queue_depth() == 0, timeout=10
    )  # their items left the queue while the model was busy
    stall.release()
    _wait(lambda: srv.server.batcher.queued_tokens == 0)
    assert len(stall.batches) == 1  # only the batch already on the model ran; the cancelled rest never did


def test_overload_is_resource_exhausted_at_once_never_unknown(stalled):
    srv, stub, stall = stalled  # in-flight limit 8
    futures = [stub.Score.future(_request([f"x{i}"]), timeout=30) for i in range(32)]
    codes, rejected_after = [], []
    start = time.monotonic()
    for f in futures:
        try:
            f.result(timeout=0.5)
        except grpc.FutureTimeoutError:
            continue  # admitted, waiting for the stalled model
        except grpc.RpcError as err:
            codes.append(err.code())
            rejected_after.append(time.monotonic() - start)
    assert codes and set(codes) == {grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert len(codes) == 32 - 8
    stall.release()
    admitted = [f for f in futures if not f.done() or f.exception() is None]
    assert all(f.result(timeout=30).results for f in admitted)


def test_too_large_a_message_is_resource_exhausted_and_the_server_goes_on(home, tiny_rm_dir):
    srv = ServerThread(ServeSettings(port=0, model=str(tiny_rm_dir), with_store=False, max_message_bytes=4096))
    try:
        with grpc.insecure_channel(srv.address) as channel:
            stub = reward_pb2_grpc.RewardServiceStub(channel)
            with pytest.raises(grpc.RpcError) as err:
                stub.Score(_request(["x" * 10_000]), timeout=30)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert stub.Score(_request(["fine"]), timeout=30).results
    finally:
        srv.stop()


@pytest.fixture
def registry_with_two_versions(home, tmp_path, tiny_backbone_dir):
    """v1 and v2 trained (head mode) on the tiny backbone; the store closed, as for replicas."""
    store = store_with_hh(tmp_path, 40)
    settings = TrainSettings(
        backbone=str(tiny_backbone_dir), ensemble_size=2, max_tokens=128, promote=False, export_onnx="on"
    )
    train(store, settings, ModelSettings(), show_progress=False)
    train(store, settings.model_copy(update={"seed": 1}), ModelSettings(), show_progress=False)
    registry.promote(store, "v1")
    records = {v: registry.get_model(store, v) for v in ("v1", "v2")}
    store.close()
    return records


def test_hot_swap_under_load_fails_no_call(registry_with_two_versions):
    records = registry_with_two_versions
    srv = ServerThread(ServeSettings(port=0, with_store=False, watch_interval_s=0.1))
    channel = grpc.insecure_channel(srv.address)
    stub = reward_pb2_grpc.RewardServiceStub(channel)
    seen, failures, stop = [], [], threading.Event()

    def load():
        while not stop.is_set():
            try:
                seen.append(stub.Score(_request(["The Nile.", "The Amazon."]), timeout=30).model_version)
            except grpc.RpcError as err:
                failures.append(err.code())

    try:
        with ThreadPoolExecutor(4) as pool:
            for _ in range(4):
                pool.submit(load)
            _wait(lambda: len(seen) > 20)
            registry.write_promoted_pointer(records["v2"])  # what `models promote v2` does
            _wait(lambda: seen and seen[-1] == "v2")
            _wait(lambda: seen.count("v2") > 20)
            stop.set()
        assert failures == [] and set(seen) == {"v1", "v2"}
        first_v2 = seen.index("v2")
        assert seen[first_v2 + 8 :].count("v1") == 0  # after the switch, new calls use v2 (4 threads may straddle it)
        pinned = stub.Score(_request(["x"], version="v1"), timeout=30)  # the old version stays loaded
        assert pinned.model_version == "v1"
    finally:
        stop.set()
        channel.close()
        srv.stop()


def test_a_corrupt_candidate_leaves_the_old_version_serving(registry_with_two_versions, tmp_path):
    records = registry_with_two_versions
    srv = ServerThread(ServeSettings(port=0, with_store=False, watch_interval_s=0.1))
    try:
        v2_dir = records["v2"].artifact_path
        with open(f"{v2_dir}/head.safetensors", "wb") as f:
            f.write(b"not a safetensors file")
        registry.write_promoted_pointer(records["v2"])
        _wait(lambda: "v2" in srv.server.served.failed)
        with grpc.insecure_channel(srv.address) as channel:
            response = reward_pb2_grpc.RewardServiceStub(channel).Score(_request(["still fine"]), timeout=30)
        assert response.model_version == "v1"
    finally:
        srv.stop()


def test_watch_models_streams_promotions(registry_with_two_versions):
    records = registry_with_two_versions
    srv = ServerThread(ServeSettings(port=0, with_store=False, watch_interval_s=0.1))
    try:
        with grpc.insecure_channel(srv.address) as channel:
            stream = reward_pb2_grpc.RewardServiceStub(channel).WatchModels(reward_pb2.WatchModelsRequest(), timeout=30)
            first = next(stream)
            assert (first.kind, first.model.version) == ("current", "v1")
            registry.write_promoted_pointer(records["v2"])
            second = next(stream)
            assert (second.kind, second.model.version, second.model.loaded) == ("promoted", "v2", True)
            stream.cancel()
    finally:
        srv.stop()


def test_score_turns_equals_scoring_each_turn(server):
    conversation = [
        common_pb2.Message(role="system", content="Be brief."),
        common_pb2.Message(role="user", content="Hi"),
        common_pb2.Message(role="assistant", content="Hello!"),
        common_pb2.Message(role="user", content="A river?"),
        common_pb2.Message(role="assistant", content="The Nile."),
    ]
    with grpc.insecure_channel(server.address) as channel:
        stub = reward_pb2_grpc.RewardServiceStub(channel)
        turns = stub.ScoreTurns(reward_pb2.ScoreTurnsRequest(conversation=conversation), timeout=30)
        assert [t.message_index for t in turns.turns] == [2, 4]
        for t in turns.turns:
            item = reward_pb2.ScoreItem(
                prompt=conversation[: t.message_index], completion=conversation[t.message_index].content
            )
            alone = stub.Score(reward_pb2.ScoreRequest(items=[item]), timeout=30).results[0]
            assert abs(alone.raw_score - t.raw_score) <= 1e-5
        with pytest.raises(grpc.RpcError) as err:
            stub.ScoreTurns(reward_pb2.ScoreTurnsRequest(conversation=conversation[:2]), timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "conversation" in err.value.details()


def test_two_scorers_behind_client_side_round_robin(home, tiny_rm_dir):
    a = ServerThread(ServeSettings(port=0, model=str(tiny_rm_dir), with_store=False))
    b = ServerThread(ServeSettings(port=0, model=str(tiny_rm_dir), with_store=False))
    try:
        target = f"ipv4:127.0.0.1:{a.port},127.0.0.1:{b.port}"
        with grpc.insecure_channel(target, options=[("grpc.lb_policy_name", "round_robin")]) as channel:
            stub = reward_pb2_grpc.RewardServiceStub(channel)
            scores = {stub.Score(_request(["same text"]), timeout=30).results[0].raw_score for _ in range(20)}
        assert a.server.batcher.items_scored > 0 and b.server.batcher.items_scored > 0
        assert a.server.batcher.items_scored + b.server.batcher.items_scored == 20
        assert len(scores) == 1  # same model, same answer, whichever replica
    finally:
        a.stop()
        b.stop()


def test_sigterm_finishes_calls_in_flight(home, tiny_rm_dir, tmp_path):
    from rm_service.client import Client, start_server_process

    env = {**os.environ, "RM_HOME": str(home), "RM_SERVE_MAX_WAIT_MS": "400"}  # items wait in the queue at SIGTERM
    proc, address = start_server_process(env, tmp_path, timeout=120, args=["--model", str(tiny_rm_dir), "--no-store"])
    try:
        client = Client(address)
        futures = [client.reward.Score.future(_request([f"in flight {i}"]), timeout=30) for i in range(8)]
        time.sleep(0.1)  # the calls are admitted and queued (max_wait 400 ms)
        proc.send_signal(signal.SIGTERM)
        assert all(f.result().results for f in futures)  # drained, not dropped
        assert proc.wait(timeout=60) == 0
        assert "stopped cleanly" in (tmp_path / "server.log").read_text()
        client.close()
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_server_process_that_cannot_start_is_an_error_naming_its_log(home, tmp_path):
    from rm_service.client import start_server_process
    from rm_service.errors import RMError

    env = {
        **os.environ,
        "RM_HOME": str(home),
        "RM_SERVE_MODEL": str(tmp_path / "no-such-model"),
        "RM_SERVE_WITH_STORE": "false",
        "RM_SERVE_METRICS_PORT": "-1",
    }
    with pytest.raises(RMError, match=r"exited during start-up \(code 2\); see .*server.log"):
        start_server_process(env, tmp_path, timeout=120)
    assert "no model version at" in (tmp_path / "server.log").read_text()  # the child's own account is kept


@pytest.mark.parametrize("faster, served_as", [("bf16", ("torch", "bf16")), ("fp32", ("onnxruntime", "fp32"))])
def test_the_server_serves_in_the_precision_measured_fastest(
    registry_with_two_versions, monkeypatch, faster, served_as
):
    """precision=auto and backend=auto (the defaults): where this machine measures bf16 faster the
    version is served by torch under bf16 autocast; where fp32 wins, by ONNX Runtime fp32 (its export).
    GetModel tells which, and the golden pairs passed in the precision served."""
    from rm_service.models import precision
    from rm_service.models.precision import Measurement
    from rm_service.settings import rm_home

    rates = {"bf16": (100.0, 200.0, 260.0), "fp32": (100.0, 30.0, 40.0)}[faster]
    measured = partial(Measurement, "test cpu", layer="llama", speedup=rates[2] / rates[0], chosen=faster)
    monkeypatch.setattr(precision, "_MEASURED", {})
    monkeypatch.setattr(
        precision,
        "probe_cpu",
        lambda threads, key="", **_: measured(
            key,
            threads,
            fp32_gflops=rates[0],
            autocast_gflops=rates[1],
            bf16_gflops=rates[2],
            rounds=6,
            quiet_rounds=6,
            settled=True,
            measured_at=0.0,
        ),
    )
    (rm_home() / "cache" / "precision.json").unlink(missing_ok=True)
    srv = ServerThread(ServeSettings(port=0, with_store=False, metrics_port=-1))
    try:
        with grpc.insecure_channel(srv.address) as channel:
            stub = reward_pb2_grpc.RewardServiceStub(channel)
            info = stub.GetModel(reward_pb2.GetModelRequest(), timeout=30)
            assert (info.version, info.backend, info.precision) == ("v1", *served_as)
            assert len(stub.Score(_request(["The Nile.", "No idea, sorry."]), timeout=30).results) == 2
    finally:
        srv.stop()


def test_a_version_with_an_onnx_export_is_served_by_onnx_runtime_on_cpu(registry_with_two_versions):
    from rm_service.models.onnx_backend import OnnxRuntimeModel

    records = registry_with_two_versions
    meta = __import__("json").loads(open(f"{records['v1'].artifact_path}/version.json").read())
    assert meta["onnx"]["fp32_path"] == "model.onnx" and meta["onnx"]["max_rel_diff"] <= 1e-4
    # ONNX Runtime serves when the precision is fp32 on a CPU (auto picks it where fp32 measures faster).
    onnx_srv = ServerThread(ServeSettings(port=0, with_store=False, precision="fp32"))
    torch_srv = ServerThread(
        ServeSettings(port=0, with_store=False, backend="torch", precision="fp32", metrics_port=-1)
    )
    try:
        assert isinstance(onnx_srv.server.served.get().backend, OnnxRuntimeModel)
        assert not isinstance(torch_srv.server.served.get().backend, OnnxRuntimeModel)
        scores = []
        for srv in (onnx_srv, torch_srv):
            with grpc.insecure_channel(srv.address) as channel:
                response = reward_pb2_grpc.RewardServiceStub(channel).Score(
                    _request(["The Nile.", "No idea, sorry."]), timeout=30
                )
            scores.append([r.raw_score for r in response.results])
        assert max(abs(a - b) for a, b in zip(*scores, strict=True)) <= 1e-4
    finally:
        onnx_srv.stop()
        torch_srv.stop()
