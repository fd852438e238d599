"""The trainer's reward client (rm_client's RewardClient) against real servers on port 0: round-robin over replicas,
retries on UNAVAILABLE and RESOURCE_EXHAUSTED, a deadline on every call, one pinned version
per batch, and a clear error (never a silent zero) when scoring fails."""

from __future__ import annotations

import threading
import time

import pytest
from conftest import ServerThread, Stall

from rm_client import RewardClient, ScoreError, VersionUnavailable, backoff_delays
from rm_service.conversation import Message
from rm_service.server.app import free_port
from rm_service.settings import ServeSettings

PROMPT = [
    Message("user", "Tell me about rivers."),
    Message("assistant", "Which river?"),
    Message("user", "The longest one."),
]
COMPLETIONS = ["The Nile.", "The Amazon, probably.", "I am not sure.", "Rivers are long.", "The Yangtze."]


def _server(tiny_rm_dir, **kw) -> ServerThread:
    return ServerThread(ServeSettings(port=0, model=str(tiny_rm_dir), with_store=False, metrics_port=-1, **kw))


@pytest.fixture
def two_replicas(home, tiny_rm_dir):
    servers = [_server(tiny_rm_dir), _server(tiny_rm_dir)]
    yield servers
    for s in servers:
        s.stop()


@pytest.fixture
def stalled(home, tiny_rm_dir):
    srv = _server(tiny_rm_dir, max_inflight_items=1)
    served = srv.server.served.get()
    stall = Stall(served.backend)
    served.backend = stall
    yield srv, stall
    stall.gate.set()
    srv.stop()


def test_round_robin_spreads_chunks_over_replicas_with_the_same_scores(two_replicas):
    addresses = [s.address for s in two_replicas]
    balanced = RewardClient(addresses, chunk_items=1)
    single = RewardClient(addresses[:1])
    try:
        got = balanced.score([PROMPT] * 5, COMPLETIONS)
        ref = single.score([PROMPT] * 5, COMPLETIONS)
    finally:
        balanced.close()
        single.close()
    assert got.rewards == pytest.approx(ref.rewards, abs=1e-5)
    assert got.version == ref.version == two_replicas[0].server.served.default
    assert sorted(balanced.calls_per_address) == [2, 3]  # 5 one-item requests over 2 replicas


def test_a_dead_replica_is_retried_on_the_next_one(home, tiny_rm_dir):
    srv = _server(tiny_rm_dir)
    dead = f"127.0.0.1:{free_port()}"
    try:
        client = RewardClient([dead, srv.address], max_retries=2, backoff_s=0.01, timeout_s=10)
        assert len(client.score([PROMPT] * 2, COMPLETIONS[:2]).rewards) == 2
        assert client.calls_per_address == [0, 1]
        client.close()
        alone = RewardClient([dead], max_retries=1, backoff_s=0.01, timeout_s=5)
        with pytest.raises(ScoreError, match="UNAVAILABLE") as err:
            alone.score([PROMPT], COMPLETIONS[:1])
        assert "after 2 attempts" in str(err.value)
        alone.close()
    finally:
        srv.stop()


def test_overload_is_retried_with_backoff_until_admitted(stalled):
    srv, stall = stalled  # admits one item at a time, and the model is stalled
    blocker = RewardClient([srv.address], timeout_s=30)
    client = RewardClient([srv.address], max_retries=6, backoff_s=0.1, backoff_max_s=0.5, timeout_s=30)
    try:
        first = threading.Thread(target=blocker.score, args=([PROMPT], COMPLETIONS[:1]))
        first.start()
        deadline = time.monotonic() + 10
        while srv.server.batcher.inflight_items == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        threading.Timer(0.4, stall.gate.set).start()  # the server frees up after a few refusals
        started = time.monotonic()
        result = client.score([PROMPT], COMPLETIONS[1:2])
        assert len(result.rewards) == 1 and time.monotonic() - started >= 0.3
        first.join(10)
    finally:
        stall.gate.set()
        blocker.close()
        client.close()


def test_overload_that_does_not_clear_is_an_error_naming_the_code(stalled):
    srv, stall = stalled
    blocker = RewardClient([srv.address], timeout_s=30)
    client = RewardClient([srv.address], max_retries=2, backoff_s=0.01, timeout_s=30)
    first = threading.Thread(target=blocker.score, args=([PROMPT], COMPLETIONS[:1]))
    first.start()
    try:
        while srv.server.batcher.inflight_items == 0:
            time.sleep(0.01)
        with pytest.raises(ScoreError, match="RESOURCE_EXHAUSTED.*") as err:
            client.score([PROMPT], COMPLETIONS[1:2])
        assert "after 3 attempts" in str(err.value)
    finally:
        stall.gate.set()
        first.join(10)
        blocker.close()
        client.close()


def test_every_call_has_a_deadline(stalled):
    srv, stall = stalled
    client = RewardClient([srv.address], timeout_s=0.3, max_retries=3, backoff_s=0.01)
    try:
        started = time.monotonic()
        with pytest.raises(ScoreError, match="DEADLINE_EXCEEDED"):
            client.score([PROMPT], COMPLETIONS[:1])
        assert time.monotonic() - started < 5  # not retried: the deadline is the caller's bound
    finally:
        client.close()


def test_a_batch_is_pinned_to_one_version_and_an_unknown_one_is_an_error(two_replicas):
    srv = two_replicas[0]
    version = srv.server.served.default
    client = RewardClient([srv.address], chunk_items=2, max_retries=1, backoff_s=0.01)
    try:
        pinned = client.score([PROMPT] * 5, COMPLETIONS, version=version)  # three requests, one version
        assert pinned.version == version and client.calls_per_address == [3]
        with pytest.raises(VersionUnavailable, match="'v99' is not loaded"):
            client.score([PROMPT], COMPLETIONS[:1], version="v99")
    finally:
        client.close()


def test_an_invalid_item_fails_the_batch_instead_of_scoring_zero(two_replicas):
    client = RewardClient([two_replicas[0].address], max_retries=3)
    try:
        with pytest.raises(ScoreError, match="INVALID_ARGUMENT"):
            client.score([PROMPT, PROMPT], ["fine", "   "])
    finally:
        client.close()


def test_backoff_grows_exponentially_and_is_capped():
    import random

    delays = backoff_delays(0.2, 1.0, 5, random.Random(0))
    caps = [0.2, 0.4, 0.8, 1.0, 1.0]
    assert all(0.5 * c <= d <= c for d, c in zip(delays, caps, strict=True))
