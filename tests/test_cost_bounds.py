"""A call's cost is bounded before tokenising, on a real server with the tiny model: a 16 MB prompt
is cut to what the model reads and answered while other callers keep their pace, and an abandoned
ScoreTurns stops using the CPU once its deadline passes (issue 30)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import pytest
from conftest import wait_until
from huge_caller import huge_prompt

from rm_service.api.v1 import common_pb2, reward_pb2


def _small() -> reward_pb2.ScoreRequest:
    prompt = [common_pb2.Message(role="user", content="Tell me about rivers.")]
    return reward_pb2.ScoreRequest(items=[reward_pb2.ScoreItem(prompt=prompt, completion="They run to the sea.")])


def _latencies(stub, n: int) -> list[float]:
    out = []
    for _ in range(n):
        start = time.perf_counter()
        stub.Score(_small(), timeout=30)
        out.append(time.perf_counter() - start)
    return out


def _p99(xs: list[float]) -> float:
    return float(np.quantile(xs, 0.99))


def test_a_16_mb_prompt_is_cut_and_other_callers_keep_their_pace(stalled_server):
    """Another client sends a 16 MB Score call (499 messages of 32,000 characters) every 0.3 s while
    1-item calls are timed: the huge calls are answered, cut to the model's window, and the
    others keep their pace. Before the cut a huge call took 14.6 s and stalled every caller as long."""
    srv, stub, _, runtime = stalled_server(stalled=False)
    _latencies(stub, 10)  # warm
    quiet = _latencies(stub, 60)
    caller = subprocess.Popen(
        [sys.executable, os.path.join(os.path.dirname(__file__), "huge_caller.py"), srv.address, "4", "0.3"],
        stdout=subprocess.PIPE,
        text=True,
    )
    time.sleep(1.0)  # its first call is on its way
    busy = _latencies(stub, 60)
    answers = json.loads(caller.communicate(timeout=60)[0])
    assert caller.returncode == 0 and answers
    for answer in answers:  # cut to the end of the conversation the model can read
        assert answer["truncated"] and answer["tokens"] == runtime.spec.max_tokens
    huge_p50 = float(np.median([a["s"] for a in answers]))
    print(
        f"quiet p99 {_p99(quiet) * 1e3:.1f} ms, beside 16 MB calls {_p99(busy) * 1e3:.1f} ms; "
        f"{len(answers)} huge calls, p50 {huge_p50:.3f} s"
    )
    # generous bounds (the 16 MB are still received and parsed, on a machine other work shares): under the CPU lock
    # on 2 cores the p99 went 6.9 -> 13.0 ms and a huge call took 0.055 s (issue 30 asks for 2x and 1 s)
    assert huge_p50 < 1.0
    assert _p99(busy) < 3 * _p99(quiet) + 0.1


def _thread_cpu_seconds(prefixes: tuple[str, ...]) -> float:
    """CPU seconds used so far by this process's threads whose name starts with one of `prefixes` (Linux)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for t in threading.enumerate():
        if t.name.startswith(prefixes) and t.native_id is not None:
            try:
                with open(f"/proc/self/task/{t.native_id}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except FileNotFoundError:
                continue
            total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return total


def _idle_a_second_after(threads: tuple[str, ...] = ("tokenise", "model")) -> float:
    """CPU seconds the threads use in the second that starts a second from now."""
    time.sleep(1.0)
    before = _thread_cpu_seconds(threads)
    time.sleep(1.0)
    return _thread_cpu_seconds(threads) - before


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="per-thread CPU time is read from /proc")
def test_an_abandoned_score_turns_stops_using_the_cpu_after_its_deadline(stalled_server):
    """The model is held until the caller's deadline has passed, then let go: none of the abandoned
    call's other turns is run, and the tokenise and model threads are idle within a second."""
    from test_admission import LONG_TURNS, _conversation

    srv, stub, stall, runtime = stalled_server()
    call = stub.ScoreTurns.future(_conversation(LONG_TURNS, words=3), timeout=2)  # each turn its own item
    wait_until(lambda: len(stall.batches) == 1 or call.done())  # its first batch is on the held model
    with pytest.raises(grpc.RpcError) as err:
        call.result(timeout=30)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    stall.release()  # the model could go on with the abandoned turns now
    used = _idle_a_second_after()
    print(f"CPU used by the tokenise and model threads 1-2 s after the deadline: {used:.3f} s")
    assert used < 0.05
    assert len(stall.batches) == 1  # none of its other turns reached the model
    assert srv.server.batcher.inflight_items == 0 and srv.server.batcher.queued_tokens == 0


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="per-thread CPU time is read from /proc")
def test_a_4_mb_score_turns_is_refused_at_its_cap_without_tokenising_it_whole(stalled_server):
    """64 turns of 32,000-character messages at the default caps: the cap is checked on about a
    cap's worth of text, so the call is refused (INVALID_ARGUMENT naming the cap) instead of
    tokenising 4 MB (14 s for 16 MB before, past any deadline), and nothing runs on afterwards."""
    srv, stub, stall, runtime = stalled_server(stalled=False)
    with pytest.raises(grpc.RpcError) as err:
        stub.ScoreTurns(reward_pb2.ScoreTurnsRequest(conversation=huge_prompt(128)), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "score_turns_max_tokens" in err.value.details()
    assert _idle_a_second_after() < 0.05
    assert stall.batches == []
