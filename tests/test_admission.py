"""Admission before work, on real servers with the tiny model: a refused call is
RESOURCE_EXHAUSTED at once and never tokenised, a call that cannot make its deadline is refused,
expired or abandoned work never reaches the model, ScoreTurns is capped, admitted like Score and
stops when its caller or the server goes, and the batcher lets go of versions no longer served."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import sys
import threading
import weakref

import grpc
import pytest
from conftest import ServerThread, Stall, wait_until

from rm_service.api.v1 import common_pb2, reward_pb2, reward_pb2_grpc
from rm_service.settings import ServeSettings

PROMPT = [common_pb2.Message(role="user", content="Tell me about rivers.")]
NILE = "The Nile, in Africa, runs about 6,650 km from Lake Victoria to the Mediterranean. "


def _request(*completions: str) -> reward_pb2.ScoreRequest:
    return reward_pb2.ScoreRequest(
        items=[reward_pb2.ScoreItem(id=str(i), prompt=PROMPT, completion=c) for i, c in enumerate(completions)]
    )


def _conversation(turns: int, words: int = 1) -> reward_pb2.ScoreTurnsRequest:
    """`turns` user/assistant exchanges, each message NILE repeated `words` times."""
    messages = []
    for i in range(turns):
        messages += [
            common_pb2.Message(role="user", content=f"Question {i}: " + NILE * words),
            common_pb2.Message(role="assistant", content=f"Answer {i}: " + NILE * words),
        ]
    return reward_pb2.ScoreTurnsRequest(conversation=messages)


class Counted:
    """Counts the calls of a runtime method (format, rewards_at) from any thread."""

    def __init__(self, runtime, name: str):
        self.fn, self.calls, self.lock = getattr(runtime, name), 0, threading.Lock()
        setattr(runtime, name, self)

    def __call__(self, *args):
        with self.lock:
            self.calls += 1
        return self.fn(*args)


def _code(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code()


def test_a_refused_call_is_resource_exhausted_and_never_tokenised(stalled_server):
    srv, stub, stall, runtime = stalled_server(max_queued_tokens=1)  # one call's tokens fill the queue
    formats = Counted(runtime, "format")
    first = stub.Score.future(_request("first"), timeout=30)
    wait_until(lambda: stall.batches == [1])  # on the (stalled) model, its tokens still queued
    for i in range(20):
        with pytest.raises(grpc.RpcError) as err:
            stub.Score(_request(f"refused {i}", NILE), timeout=30)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "tokens queued" in err.value.details()
        pushback = dict(err.value.trailing_metadata())["grpc-retry-pushback-ms"]  # how long to wait, for gRPC retries
        assert int(pushback) >= 1
    assert _code(lambda: stub.ScoreTurns(_conversation(2), timeout=30)) == grpc.StatusCode.RESOURCE_EXHAUSTED
    # a full queue is the first check, before the request is read: even a request it would reject as invalid is refused
    assert _code(lambda: stub.Score(reward_pb2.ScoreRequest(), timeout=30)) == grpc.StatusCode.RESOURCE_EXHAUSTED
    # nor parsed: bytes that are no ScoreRequest (INVALID_ARGUMENT once read) are refused as well
    with grpc.insecure_channel(srv.address) as channel:
        raw = channel.unary_unary("/rm.v1.RewardService/Score")
        assert _code(lambda: raw(b"\xff\xff\xff", timeout=30)) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert formats.calls == 1  # the admitted call's one item; admission decided the others before any tokenising
    stall.release()
    assert first.result(timeout=30).results


def test_a_full_queue_refuses_http_before_the_json_is_parsed(stalled_server):
    """HTTP and gRPC are adapters of one scoring core: /get_reward asks it for room before it
    reads the body, so with the queue full even a body that is not JSON is 429, not 400."""
    import httpx

    srv, stub, stall, runtime = stalled_server(max_queued_tokens=1, http_port=0)
    formats = Counted(runtime, "format")
    first = stub.Score.future(_request("first"), timeout=30)
    wait_until(lambda: stall.batches == [1])
    url = f"http://127.0.0.1:{srv.server.http.port}"
    for path in ("/get_reward", "/classify", "/pooling"):
        r = httpx.post(url + path, content=b"{not json", headers={"content-type": "application/json"}, timeout=30)
        error = r.json()["error"]  # vLLM's routes answer in vLLM's shape: {"error": {"message": ...}}
        assert r.status_code == 429 and "tokens queued" in (error if path == "/get_reward" else error["message"]), (
            path,
            r.text,
        )
    assert formats.calls == 1
    stall.release()
    assert first.result(timeout=30).results
    r = httpx.post(url + "/get_reward", content=b"{not json", headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 400 and "body" in r.json()["error"]  # with room, the same body is read and refused as bad


def test_a_call_that_cannot_make_its_deadline_is_refused_at_once(stalled_server):
    srv, stub, stall, runtime = stalled_server(max_queued_tokens=10**6)  # only the expected-wait rule can refuse
    formats = Counted(runtime, "format")
    first = stub.Score.future(_request(NILE * 2), timeout=60)
    wait_until(lambda: stall.batches == [1])
    meter = srv.server.batcher.meter
    meter.tokens, meter.seconds = 10.0, 1.0  # as if the model ran 10 tokens/s: the queued call alone is ~5 s of work
    with pytest.raises(grpc.RpcError) as err:
        stub.Score(_request("in a hurry"), timeout=2)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "expected wait" in err.value.details()
    assert formats.calls == 1  # the refused call was never tokenised
    patient = stub.Score.future(_request("patient"), timeout=60)  # the same wait fits its deadline: admitted
    wait_until(lambda: srv.server.batcher.inflight_items == 2)
    wait_until(lambda: formats.calls == 2)  # admitted items are counted before they are tokenised, not after
    stall.release()
    assert first.result(timeout=30).results and patient.result(timeout=30).results


def test_expired_work_never_reaches_the_model(stalled_server):
    srv, stub, stall, runtime = stalled_server()
    passes = Counted(runtime, "rewards_at")  # ScoreTurns' one causal pass
    first = stub.Score.future(_request("first"), timeout=30)
    wait_until(lambda: stall.batches == [1])
    late = [stub.Score.future(_request(f"late {i}", NILE), timeout=0.5) for i in range(6)]
    late.append(stub.ScoreTurns.future(_conversation(3), timeout=0.5))
    for f in late:
        with pytest.raises(grpc.RpcError) as err:
            f.result(timeout=30)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    stall.release()
    assert first.result(timeout=30).results
    wait_until(lambda: srv.server.batcher.inflight_items == 0 and srv.server.batcher.queued_tokens == 0)
    assert stall.batches == [1] and passes.calls == 0  # none of the late calls' work ran
    turns = stub.ScoreTurns(_conversation(3), timeout=30)  # and the server goes on
    assert len(turns.turns) == 3 and passes.calls == 1


def test_score_turns_caps_are_invalid_argument_naming_the_cap(stalled_server):
    srv, stub, stall, runtime = stalled_server(stalled=False, score_turns_max_turns=3, score_turns_max_tokens=400)
    formats = Counted(runtime, "format")
    with pytest.raises(grpc.RpcError) as err:
        stub.ScoreTurns(_conversation(4), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "score_turns_max_turns" in err.value.details()
    assert formats.calls == 0
    with pytest.raises(grpc.RpcError) as err:
        stub.ScoreTurns(_conversation(2, words=4), timeout=30)  # ~4 x 4 x 50 tokens
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "score_turns_max_tokens" in err.value.details()
    assert formats.calls == 0 and stall.batches == []  # the cap is checked on the whole conversation before the turns
    assert len(stub.ScoreTurns(_conversation(3), timeout=30).turns) == 3
    assert srv.server.batcher.inflight_items == 0 and srv.server.batcher.queued_tokens == 0


LONG_TURNS = 12  # 12 exchanges of ~150-token messages: past the model's 1,024 tokens, so each turn is its own item


def test_a_cancelled_score_turns_stops_midway(stalled_server):
    srv, stub, stall, runtime = stalled_server()
    call = stub.ScoreTurns.future(_conversation(LONG_TURNS, words=3), timeout=60)
    wait_until(lambda: len(stall.batches) == 1)  # the first batch of its turns is on the model
    assert srv.server.batcher.queue_depth() > 0  # the rest wait
    call.cancel()
    wait_until(lambda: srv.server.batcher.queue_depth() == 0 and srv.server.batcher.inflight_items == 0)
    stall.release()
    wait_until(lambda: srv.server.batcher.queued_tokens == 0)
    assert len(stall.batches) == 1


def test_draining_stops_score_turns_within_the_grace_period(home, tiny_rm_dir):
    srv = ServerThread(
        ServeSettings(port=0, model=str(tiny_rm_dir), with_store=False, metrics_port=-1, grace_seconds=0.5)
    )
    served = srv.server.served.get()
    stall = served.backend = Stall(served.backend)
    with grpc.insecure_channel(srv.address) as channel:
        call = reward_pb2_grpc.RewardServiceStub(channel).ScoreTurns.future(
            _conversation(LONG_TURNS, words=3), timeout=60
        )
        wait_until(lambda: len(stall.batches) == 1)
        threading.Timer(2.0, stall.release).start()  # the batch on the model ends after the grace period
        srv.stop()  # SIGTERM's path: the grace period, then in-flight calls are cancelled
        assert call.exception(timeout=30) is not None
    assert len(stall.batches) == 1  # the call's other turns never ran


def test_the_batcher_keeps_only_served_versions_alive(home, tiny_rm_dir):
    from rm_service.models.runtime import load_backbone_runtime
    from rm_service.server.models import Served

    srv = ServerThread(ServeSettings(port=0, model=str(tiny_rm_dir), with_store=False, metrics_port=-1))
    try:
        with grpc.insecure_channel(srv.address) as channel:
            stub = reward_pb2_grpc.RewardServiceStub(channel)
            served = srv.server.served.get()
            refs = [weakref.ref(served.backend)]
            assert stub.Score(_request("v1"), timeout=30).model_version == served.record.version
            for name in ("swap-2", "swap-3"):  # two hot-swaps; the server keeps two versions loaded
                runtime = load_backbone_runtime(str(tiny_rm_dir), max_tokens=1024)
                new = Served(runtime, dataclasses.replace(served.record, version=name), runtime)
                srv._call(_swap_in(srv.server.served, new))
                refs.append(weakref.ref(runtime))
                assert stub.Score(_request(name), timeout=30).model_version == name
            del served, runtime, new
            gc.collect()
            assert [r() is not None for r in refs] == [False, True, True]
    finally:
        srv.stop()


async def _swap_in(served_models, served) -> None:
    served_models.swap_in(served)
    await asyncio.sleep(0)


def _nice(tid: int) -> int:
    return int(open(f"/proc/self/task/{tid}/stat").read().rsplit(")", 1)[1].split()[16])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="thread priorities are per thread on Linux only")
@pytest.mark.parametrize("model_nice", [0, 7])
def test_the_model_thread_runs_below_the_rpc_threads(stalled_server, model_nice):
    """Under CPU contention refusals and health must not wait behind the model: its thread (and
    the OpenMP workers it starts) run `model_nice` steps below the event loop's."""
    srv, stub, _, _ = stalled_server(stalled=False, model_nice=model_nice)
    assert len(stub.Score(_request("a river"), timeout=30).results) == 1  # the model thread has run torch
    model = srv.server.batcher._thread
    base = _nice(srv.thread.native_id)  # the event loop's thread
    assert _nice(model.native_id) == min(19, base + model_nice)
    # named for the OS, so `top -H` and bench/overload.py can tell the model's CPU from the RPC threads'
    assert open(f"/proc/self/task/{model.native_id}/comm").read().strip() == "model"


def test_rm_client_waits_the_pushback_and_throttles_its_retries(stalled_server):
    """A refusal says how long to wait (grpc-retry-pushback-ms); rm_client's channels retry a refused
    Score by themselves, and their retry throttling stops retrying while most calls are refused, so
    a crowd of clients does not multiply an overload."""
    import random

    from rm_client import RewardClient, ServerUnavailable
    from rm_client.retry import Attempts, RetryPolicy, pushback_s

    srv, stub, stall, _ = stalled_server(max_queued_tokens=1)
    first = stub.Score.future(_request("first"), timeout=30)
    wait_until(lambda: stall.batches == [1])
    with pytest.raises(grpc.RpcError) as err:
        stub.Score(_request("refused"), timeout=30)
    asked = pushback_s(err.value)
    assert asked > 0
    attempts = Attempts(RetryPolicy(max_retries=1, backoff_s=0.0), random.Random(0), lambda: 0, ["a"], "Score")
    next(iter(attempts))
    assert attempts.failed(err.value) >= asked  # the client's own retry waits at least what the server asked

    core, arrived = srv.server.reward, []
    check_room = core.check_room

    async def counted(ticket):  # every call the server sees
        arrived.append(1)
        await check_room(ticket)

    core.check_room = counted
    calls = 20
    with RewardClient(srv.address, max_retries=0, timeout_s=30) as client:
        for _ in range(calls):
            with pytest.raises(ServerUnavailable):
                client.score([[{"role": "user", "content": "Hi"}]], ["Hello"])
    # retried by the channel (3 attempts at most), until the throttle's bucket of 10 is half spent
    assert calls < len(arrived) <= calls + 5
    stall.release()
    assert first.result(timeout=30).results


def test_a_call_that_finds_the_queue_full_waits_for_room_unread(stalled_server):
    """With room_wait_ms, a call that finds no room waits at the gate with its request unread and
    goes on once room opens; the freed room goes to one waiter at a time, so none is refused after
    its request was read."""
    srv, stub, stall, runtime = stalled_server(max_inflight_items=1, room_wait_ms=10_000)
    admission = srv.server.batcher.admission
    formats = Counted(runtime, "format")
    first = stub.Score.future(_request("first"), timeout=60)
    wait_until(lambda: stall.batches == [1])
    waiters = [stub.Score.future(_request(f"waiter {i}"), timeout=60) for i in range(2)]
    wait_until(lambda: len(admission._waiters) == 2)
    assert formats.calls == 1  # the waiters' requests are not read, let alone tokenised
    stall.release()
    assert first.result(timeout=30).results
    assert all(len(w.result(timeout=30).results) == 1 for w in waiters)  # each got room in turn: none refused
    assert formats.calls == 3 and admission._waiters == []


def test_a_call_that_finds_no_room_in_time_is_refused_and_leaves_no_waiter(stalled_server):
    srv, stub, stall, runtime = stalled_server(max_queued_tokens=1, room_wait_ms=50)
    admission = srv.server.batcher.admission
    first = stub.Score.future(_request("first"), timeout=30)
    wait_until(lambda: stall.batches == [1])
    for call in (lambda: stub.Score(_request("refused"), timeout=30), lambda: stub.ScoreTurns(_conversation(2))):
        assert _code(call) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert admission._waiters == []
    stall.release()
    assert first.result(timeout=30).results
