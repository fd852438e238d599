"""Prometheus metrics over HTTP from a real server, the batcher observer, and JSON logs."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
import urllib.request

import grpc
import pytest
from conftest import ServerThread
from prometheus_client.parser import text_string_to_metric_families

from rm_service.api.v1 import common_pb2, reward_pb2, reward_pb2_grpc
from rm_service.errors import FailedPrecondition
from rm_service.settings import ServeSettings

PROMPT = [common_pb2.Message(role="user", content="How do I bake bread?")]
SCORE_METHOD = "/rm.v1.RewardService/Score"


def _request(n: int) -> reward_pb2.ScoreRequest:
    return reward_pb2.ScoreRequest(
        items=[reward_pb2.ScoreItem(id=str(i), prompt=PROMPT, completion="Knead it. " * (i + 1)) for i in range(n)]
    )


def scrape(port: int) -> dict[tuple[str, frozenset], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.status == 200
        text = response.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def sample(samples, name: str, **labels) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def test_metrics_endpoint_after_scores_and_a_rejection(home, tiny_rm_dir):
    srv = ServerThread(
        ServeSettings(port=0, model=str(tiny_rm_dir), with_store=False, metrics_port=0, max_inflight_items=4)
    )
    try:
        assert srv.server.metrics_port not in (None, 0, srv.port)
        with grpc.insecure_channel(srv.address) as channel:
            stub = reward_pb2_grpc.RewardServiceStub(channel)
            for _ in range(3):
                assert len(stub.Score(_request(2), timeout=30).results) == 2
            with pytest.raises(grpc.RpcError) as err:  # 5 items > max_inflight_items: refused at admission
                stub.Score(_request(5), timeout=30)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # The server counts an RPC after its answer is sent; wait until all four are counted.
        deadline = time.monotonic() + 10
        m = scrape(srv.server.metrics_port)
        while sample(m, "rm_rpc_seconds_count", method=SCORE_METHOD) != 4 and time.monotonic() < deadline:
            time.sleep(0.05)
            m = scrape(srv.server.metrics_port)
        version = tiny_rm_dir.name
        assert sample(m, "rm_scores_total", version=version) == 6
        assert sample(m, "rm_batch_size_sum") == 6 and 3 <= sample(m, "rm_batch_size_count") <= 6
        assert sample(m, "rm_batch_size_bucket", le="+Inf") == sample(m, "rm_batch_size_count")
        assert sample(m, "rm_batch_padding_ratio_count") == sample(m, "rm_batch_size_count")
        assert sample(m, "rm_batch_padding_ratio_sum") >= sample(m, "rm_batch_padding_ratio_count")  # padded >= real
        assert sample(m, "rm_rejections_total", reason="inflight_items") == 1
        assert sample(m, "rm_stage_seconds_count", stage="tokenise") == 3  # the refused call was never tokenised
        assert sample(m, "rm_stage_seconds_count", stage="queue_wait") == 6
        assert sample(m, "rm_stage_seconds_count", stage="inference") == sample(m, "rm_batch_size_count")
        assert sample(m, "rm_rpcs_total", method=SCORE_METHOD, code="OK") == 3
        assert sample(m, "rm_rpcs_total", method=SCORE_METHOD, code="RESOURCE_EXHAUSTED") == 1
        assert sample(m, "rm_rpc_seconds_count", method=SCORE_METHOD) == 4
        assert sample(m, "rm_queue_depth") == 0 and sample(m, "rm_inflight_items") == 0
    finally:
        srv.stop()


def test_two_servers_keep_separate_registries(home, tiny_rm_dir):
    a = ServerThread(ServeSettings(port=0, model=str(tiny_rm_dir), with_store=False, metrics_port=0))
    b = ServerThread(ServeSettings(port=0, model=str(tiny_rm_dir), with_store=False, metrics_port=0))
    try:
        with grpc.insecure_channel(a.address) as channel:
            reward_pb2_grpc.RewardServiceStub(channel).Score(_request(1), timeout=30)
        assert sample(scrape(a.server.metrics_port), "rm_scores_total", version=tiny_rm_dir.name) == 1
        assert sample(scrape(b.server.metrics_port), "rm_scores_total", version=tiny_rm_dir.name) is None
    finally:
        a.stop()
        b.stop()


def test_metrics_off_and_a_taken_explicit_port(home):
    from rm_service.server.app import RewardServer

    async def start_and_stop(settings):
        server = RewardServer(settings)
        try:
            await server.start()
            return server.metrics_port
        finally:
            await server.stop()

    assert asyncio.run(start_and_stop(ServeSettings(port=0, with_model=False, metrics_port=-1))) is None
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(FailedPrecondition, match="RM_SERVE_METRICS_PORT"):
            asyncio.run(start_and_stop(ServeSettings(port=0, with_model=False, metrics_port=port)))


def test_batcher_observer_hooks():
    from rm_service.server.metrics import Metrics

    metrics = Metrics()
    metrics.batch("v3", 4, 40, 32, 0.02, [0.001, 0.002, 0.003, 0.004])
    metrics.rejected("queued_tokens")
    metrics.dropped(None)
    metrics.dropped(None)
    get = metrics.registry.get_sample_value
    assert get("rm_scores_total", {"version": "v3"}) == 4
    assert get("rm_batch_padding_ratio_sum") == pytest.approx(40 / 32)
    assert get("rm_stage_seconds_count", {"stage": "queue_wait"}) == 4
    assert get("rm_rejections_total", {"reason": "queued_tokens"}) == 1
    assert get("rm_dropped_items_total", {"reason": "expired_or_cancelled"}) == 2
    assert Metrics().registry.get_sample_value("rm_scores_total", {"version": "v3"}) is None  # per-instance registry


def test_json_log_lines():
    from rm_service.logs import JsonFormatter

    logger = logging.getLogger("rm_service.test")
    record = logger.makeRecord(
        logger.name,
        logging.WARNING,
        __file__,
        1,
        "refused %s",
        ("/rm.v1.RewardService/Score",),
        None,
        extra={"peer": "ipv4:127.0.0.1:5555"},
    )
    line = JsonFormatter().format(record)
    assert "\n" not in line
    obj = json.loads(line)
    assert (
        obj["level"] == "WARNING"
        and obj["logger"] == "rm_service.test"
        and obj["message"] == "refused /rm.v1.RewardService/Score"
    )
    assert obj["peer"] == "ipv4:127.0.0.1:5555" and obj["time"].endswith("+00:00")
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        record = logger.makeRecord(logger.name, logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    obj = json.loads(JsonFormatter().format(record))
    assert "ValueError: boom" in obj["exc"]
