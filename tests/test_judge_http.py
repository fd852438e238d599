"""The judge against a real OpenAI-compatible server (tests/openai_server.py serving a tiny
causal LM through transformers) and a real rm-service store server, both on loopback:
position swap, retries with backoff on 5xx and timeouts, the concurrency limit, parse
failures, leases that expire, resumable runs, and the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import grpc
import pytest
from conftest import ServerThread, lapse_leases

from rm_service.api.v1 import common_pb2, preference_pb2, preference_pb2_grpc
from rm_service.judge.backend import BackendRefused, BackendUnavailable
from rm_service.judge.runner import run_judge
from rm_service.judge.settings import JudgeSettings
from rm_service.settings import ServeSettings

PROMPTS = [
    "Write a haiku about rain.",
    "How do I boil an egg?",
    "Name a large river.",
    "What is 2 + 2?",
    "Say hello in French.",
]
ANSWERS = [
    ("Soft rain on the roof.", "Rain."),
    ("Boil it for nine minutes.", "Use a microwave, it is faster."),
    ("The Nile.", "Paris."),
    ("4", "5"),
    ("Bonjour!", "Hello!"),
]


@pytest.fixture
def store(home):
    """A store-only rm-service server on port 0 and a PreferenceService stub."""
    srv = ServerThread(ServeSettings(port=0, with_model=False, metrics_port=-1))
    channel = grpc.insecure_channel(srv.address)
    yield srv, preference_pb2_grpc.PreferenceServiceStub(channel)
    channel.close()
    srv.stop()


def settings(llm, **kw) -> JudgeSettings:
    base = dict(
        backend="http",
        model="tiny-judge",
        base_url=llm.url,
        top_logprobs=1000,
        concurrency=1,
        backoff_s=0.05,
        max_backoff_s=2.0,
        timeout_s=10.0,
        rpc_timeout_s=10.0,
    )
    return JudgeSettings(**{**base, **kw})


def submit(stub, n: int, k: int = 2, start: int = 0) -> list[str]:
    candidates = [
        preference_pb2.Candidate(
            prompt=[common_pb2.Message(role="user", content=PROMPTS[i])],
            completions=list(ANSWERS[i]) + [f"Answer number {j}." for j in range(k - 2)],
            policy_version="step-1",
        )
        for i in range(start, start + n)
    ]
    return list(
        stub.SubmitCandidates(preference_pb2.SubmitCandidatesRequest(candidates=candidates), timeout=10).task_ids
    )


def rows(srv, sql: str):
    with srv.server.store._lock:  # the server's connection: take its lock, as the server does
        return srv.server.store.con.execute(sql).fetchall()


def test_both_orders_are_judged_and_stored_with_provenance(store, llm):
    srv, stub = store
    submit(stub, 3)
    submit(stub, 1, k=3, start=3)  # the 4th prompt with three completions: a 3-pair tournament
    counts = run_judge(settings(llm, inconsistent="tie"), address=srv.address)
    assert (counts.items, counts.labeled, counts.pair_judgments, counts.parse_failures, counts.errors) == (
        4,
        4,
        6,
        0,
        0,
    )
    assert llm.statuses() == [200] * 12 and counts.calls == 12  # one logprobs call per order of each pair
    # Each pair was shown in both orders: each reply once as A and once as B.
    shown = [c.body["messages"][1]["content"] for c in llm.calls]
    for first, second in ANSWERS[:3]:
        assert sum(f"[Reply A]\n{first}\n\n[Reply B]\n{second}\n" in s for s in shown) == 1
        assert sum(f"[Reply A]\n{second}\n\n[Reply B]\n{first}\n" in s for s in shown) == 1
    labels = rows(srv, "SELECT label_id, source, annotator, metadata, rationale, task_id FROM labels ORDER BY seq")
    assert {(s, a) for _, s, a, *_ in labels} == {("JUDGE", "tiny-judge")}
    assert rows(srv, "SELECT DISTINCT state FROM tasks") == [("done",)]
    for label_id, _, _, metadata, rationale, task_id in labels:
        meta = json.loads(metadata)
        assert meta["judge_template"] == "pairwise-choice-v2" and meta["judge_decision"] == "choice" and task_id
        assert "P(A)=" in rationale
        ranks = [
            r for (r,) in rows(srv, f"SELECT rank FROM label_rankings WHERE label_id = '{label_id}' ORDER BY position")
        ]
        verdicts = json.loads(meta["judge_verdicts"])
        assert int(meta["judge_flips"]) == sum(o1 != o2 for *_, o1, o2 in verdicts)
        if len(ranks) == 2:  # tie policy: a win only when both orders agree
            [[_, i, j, o1, o2]] = verdicts
            expected = {"first": [0, 1], "second": [1, 0]}.get(o1, [0, 0]) if o1 == o2 else [0, 0]
            assert ranks == expected


def test_5xx_is_retried_with_exponential_backoff(store, llm):
    srv, stub = store
    submit(stub, 1)
    llm.fail_next(3, status=503)
    counts = run_judge(settings(llm, backoff_s=0.2, max_retries=3), address=srv.address)
    assert counts.labeled == 1 and counts.errors == 0
    assert llm.statuses() == [503, 503, 503, 200, 200]
    gaps = [llm.calls[n + 1].start - llm.calls[n].end for n in range(3)]
    # delays: 0.2 * 2**retry times a factor in [0.5, 1]
    assert 0.1 <= gaps[0] < 0.6 and 0.2 <= gaps[1] < 0.8 and 0.4 <= gaps[2] < 1.2


def test_retry_after_is_honoured(store, llm):
    srv, stub = store
    submit(stub, 1)
    llm.fail_next(1, status=429, retry_after=0.8)
    assert run_judge(settings(llm, backoff_s=0.01), address=srv.address).labeled == 1
    assert llm.statuses()[:2] == [429, 200] and llm.calls[1].start - llm.calls[0].end >= 0.75


def test_timeouts_are_retried(store, llm):
    srv, stub = store
    submit(stub, 1)
    llm.stall_next(1, 2.5)
    started = time.monotonic()
    counts = run_judge(settings(llm, timeout_s=0.5), address=srv.address)
    assert counts.labeled == 1 and time.monotonic() - started < 2.4  # done before the stalled answer came
    deadline = time.monotonic() + 10
    while len(llm.calls) < 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(llm.calls) == 3  # the stalled request (answered after the client left) and two good ones
    assert rows(srv, "SELECT count(*) FROM labels") == [(1,)]


def test_backend_failures_skip_items_and_their_leases_return_them(store, llm):
    srv, stub = store
    submit(stub, 3)
    llm.fail_next(4, status=500)  # two items x (1 try + 1 retry)
    with pytest.raises(BackendUnavailable, match="2 items in a row"):
        run_judge(settings(llm, max_retries=1, max_consecutive_errors=2, lease_seconds=1), address=srv.address)
    assert rows(srv, "SELECT count(*) FROM labels") == [(0,)]
    assert rows(srv, "SELECT count(*) FROM tasks WHERE state = 'leased'") == [(2,)]
    assert lapse_leases(srv) == 2  # the leases lapse: the run can simply be started again
    counts = run_judge(settings(llm), address=srv.address)
    assert counts.labeled == 3 and rows(srv, "SELECT DISTINCT state FROM tasks") == [("done",)]


def test_a_refusing_backend_stops_the_run(store, llm):
    srv, stub = store
    submit(stub, 2)
    with pytest.raises(BackendRefused, match="404"):
        run_judge(settings(llm, model="no-such-model"), address=srv.address)
    assert llm.statuses() == [404]  # a 4xx is not retried


def test_the_api_key_is_sent(store, tiny_lm_dir):
    from openai_server import OpenAIServer

    srv, stub = store
    submit(stub, 1)
    keyed = OpenAIServer(tiny_lm_dir, api_key="k-123456")
    try:
        with pytest.raises(BackendRefused, match="401"):
            run_judge(settings(keyed, lease_seconds=1), address=srv.address)
        assert lapse_leases(srv) == 1  # the refused run's lease lapses
        assert run_judge(settings(keyed, api_key="k-123456"), address=srv.address).labeled == 1
    finally:
        keyed.stop()


def test_concurrency_limit(store, llm):
    srv, stub = store
    submit(stub, 5)
    llm.stall_next(10, 0.3)
    counts = run_judge(settings(llm, concurrency=2), address=srv.address)
    assert counts.labeled == 5 and llm.max_inflight == 2


def test_unparseable_answers_are_retried_then_counted_and_skipped(store, llm):
    srv, stub = store
    submit(stub, 2)
    counts = run_judge(
        settings(llm, decision="generate", parse_retries=2, max_new_tokens=8, lease_seconds=60), address=srv.address
    )
    # the tiny model never writes [[A]]/[[B]]/[[C]]: each item's first order is asked 3 times, then the item is skipped
    assert (counts.items, counts.parse_failures, counts.labeled) == (2, 2, 0)
    assert [c.body["temperature"] for c in llm.calls] == [0.0, 0.7, 0.7] * 2
    assert rows(srv, "SELECT count(*) FROM labels") == [(0,)]
    assert rows(srv, "SELECT DISTINCT state FROM tasks") == [("leased",)]  # never guessed; back to the queue later


def test_expired_leases_of_another_judge_return_tasks(store, llm):
    srv, stub = store
    submit(stub, 3)
    crashed = stub.LeaseTasks(
        preference_pb2.LeaseTasksRequest(owner="crashed-judge", max_tasks=2, lease_seconds=3), timeout=10
    ).tasks
    assert len(crashed) == 2
    assert all(0 < t.lease_expires_unix_ms / 1000 - time.time() <= 3 for t in crashed)  # leased for lease_seconds
    assert run_judge(settings(llm), address=srv.address).labeled == 1  # the crashed judge's two are still leased
    assert lapse_leases(srv) == 2  # its leases run out (the clock moved on, not slept through)
    assert run_judge(settings(llm), address=srv.address).labeled == 2
    assert rows(srv, "SELECT count(*), count(DISTINCT task_id) FROM labels") == [(3, 3)]
    stats = stub.GetStats(preference_pb2.GetStatsRequest(), timeout=10)
    assert stats.queue_depth == 0 and stats.tasks_done == 3


def test_runs_stop_and_resume(store, llm):
    srv, stub = store
    submit(stub, 5)
    assert run_judge(settings(llm), address=srv.address, max_tasks=2).labeled == 2
    stop = threading.Event()
    stop.set()  # a run told to stop before it starts takes nothing
    assert run_judge(settings(llm), address=srv.address, stop_event=stop).items == 0
    assert run_judge(settings(llm), address=srv.address).labeled == 3
    assert rows(srv, "SELECT count(*), count(DISTINCT task_id) FROM labels") == [(5, 5)]


def test_follow_waits_for_new_tasks_until_stopped(store, llm):
    srv, stub = store
    stop = threading.Event()
    result = {}
    thread = threading.Thread(
        target=lambda: result.setdefault(
            "counts", run_judge(settings(llm, poll_interval_s=0.1), address=srv.address, follow=True, stop_event=stop)
        )
    )
    thread.start()
    time.sleep(0.5)
    submit(stub, 2)
    deadline = time.monotonic() + 20
    while rows(srv, "SELECT count(*) FROM labels") != [(2,)] and time.monotonic() < deadline:
        time.sleep(0.1)
    stop.set()
    thread.join(10)
    assert not thread.is_alive() and result["counts"].labeled == 2


def test_file_input_is_resumable(store, llm, tmp_path):
    srv, _ = store
    path = tmp_path / "items.jsonl"
    path.write_text(
        "".join(
            json.dumps({"prompt": p, "completions": list(a)}) + "\n"
            for p, a in zip(PROMPTS[:3], ANSWERS[:3], strict=True)
        )
    )
    progress = tmp_path / "progress.done"
    first = run_judge(settings(llm), address=srv.address, input_path=path, max_tasks=2, progress_file=progress)
    assert first.labeled == 2 and len(progress.read_text().split()) == 2
    calls = len(llm.calls)
    second = run_judge(settings(llm), address=srv.address, input_path=path, progress_file=progress)
    assert (second.items, second.labeled) == (1, 1) and len(llm.calls) - calls == 2  # only the third item was judged
    assert run_judge(settings(llm), address=srv.address, input_path=path, progress_file=progress).items == 0
    progress.unlink()  # judged again from scratch: the same label ids, stored once
    again = run_judge(settings(llm), address=srv.address, input_path=path, progress_file=progress)
    assert (again.duplicates, again.labeled) == (3, 0) and rows(srv, "SELECT count(*) FROM labels") == [(3,)]


def test_stats_report_agreement_kappa_position_bias_and_length_bias(store, llm):
    srv, stub = store
    prompts = [[common_pb2.Message(role="user", content=p)] for p in PROMPTS]
    humans = [
        preference_pb2.Label(
            label_id=f"h{i}",
            prompt=prompts[i],
            responses=list(ANSWERS[i]),
            ranks=[0, 1],
            source=preference_pb2.HUMAN,
            annotator="person",
        )
        for i in range(5)
    ]
    stub.IngestLabels(preference_pb2.IngestLabelsRequest(labels=humans), timeout=10)
    stub.SubmitCandidates(
        preference_pb2.SubmitCandidatesRequest(
            candidates=[
                preference_pb2.Candidate(prompt=prompts[i], completions=list(reversed(ANSWERS[i]))) for i in range(5)
            ]
        ),
        timeout=10,
    )
    counts = run_judge(settings(llm, inconsistent="calibrate"), address=srv.address)
    assert counts.labeled == 5
    stats = stub.GetStats(preference_pb2.GetStatsRequest(), timeout=10)
    assert stats.judge_swapped_pairs == counts.pair_judgments == 5
    assert stats.judge_position_bias_rate == pytest.approx(counts.position_bias_rate)
    # recompute from the stored rows: the judge's winner vs the people's (the first answer of each pair)
    judged = rows(
        srv,
        """SELECT k.text FROM labels l JOIN label_rankings r ON r.label_id = l.label_id
                          JOIN completions k ON k.id = r.completion_id
                          WHERE l.source = 'JUDGE' AND r.rank = 0 AND l.label_id IN
                                (SELECT label_id FROM label_rankings GROUP BY label_id
                                 HAVING count(DISTINCT rank) = 2)""",
    )
    winners = {t for (t,) in judged}
    agree = sum(a in winners for a, _ in ANSWERS)
    assert stats.judge_human_shared_pairs == len(winners)
    assert stats.judge_human_agreement == pytest.approx(agree / len(winners))
    unequal = [(a, b) for a, b in ANSWERS if len(a) != len(b) and (a in winners or b in winners)]
    longer = sum(max(a, b, key=len) in winners for a, b in unequal)
    assert stats.judge_longer_preferred == pytest.approx(longer / len(unequal))
    assert stats.human_longer_preferred == pytest.approx(sum(len(a) > len(b) for a, b in unequal) / len(unequal))
    assert -1.0 <= stats.judge_human_kappa <= 1.0


def _cli(*args, home, **env):
    return subprocess.run(
        [sys.executable, "-m", "rm_service.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "RM_HOME": str(home), **env},
    )


def test_cli_judge_and_agreement(store, llm, home):
    srv, stub = store
    submit(stub, 2)
    stub.IngestLabels(
        preference_pb2.IngestLabelsRequest(
            labels=[
                preference_pb2.Label(
                    label_id="h0",
                    prompt=[common_pb2.Message(role="user", content=PROMPTS[0])],
                    responses=list(ANSWERS[0]),
                    ranks=[0, 1],
                    source=preference_pb2.HUMAN,
                    annotator="person",
                )
            ]
        ),
        timeout=10,
    )
    result = _cli(
        "judge",
        "--backend",
        "http",
        "--base-url",
        llm.url,
        "--model",
        "tiny-judge",
        "--address",
        srv.address,
        "--no-progress",
        home=home,
        RM_JUDGE_TOP_LOGPROBS="1000",
    )
    assert result.returncode == 0, result.stderr
    assert "judged 2 items" in result.stdout and "labeled 2" in result.stdout
    result = _cli("judge-agreement", "--address", srv.address, home=home)
    assert result.returncode == 0, result.stderr
    assert (
        "| shared pairs (judge and people both decisive)" in result.stdout and "| position-bias rate" in result.stdout
    )
    assert "JUDGE 2" in result.stdout and "HUMAN 1" in result.stdout


def test_cli_bad_input_is_a_message_not_a_traceback(store, home, tmp_path, monkeypatch, capsys):
    from rm_service.cli import main

    srv, _ = store
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "completions": ["only one"]}\n')
    monkeypatch.setenv("RM_JUDGE_RPC_TIMEOUT_S", "1")
    cases = [
        (["judge", "--input", str(tmp_path / "missing.jsonl"), "--address", srv.address], "no such file"),
        (["judge", "--input", str(bad), "--address", srv.address], "bad.jsonl:1.completions"),
        (["judge", "--backend", "http", "--address", "127.0.0.1:1"], "cannot reach the rm-service server"),
        (["judge", "--kway", "direct"], "needs decision=generate"),
        (["judge", "--max-tasks", "0"], "--max-tasks"),
        (["judge-agreement", "--reference", "IMPORT", "--address", srv.address], "HUMAN labels only"),
    ]
    for args, message in cases:
        assert main(args) == 2, args
        assert message in capsys.readouterr().err, args
    monkeypatch.setenv("RM_HOME", str(tmp_path / "elsewhere"))
    assert main(["judge-agreement"]) == 2 and "no store at" in capsys.readouterr().err
    monkeypatch.setenv("RM_JUDGE_CONCURRENCY", "zero")
    assert main(["judge"]) == 2 and "concurrency" in capsys.readouterr().err
    # and as a process: one line on stderr, exit status 2, no traceback
    result = _cli("judge", "--input", str(bad), home=home)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_cli_agreement_reads_the_store_file_with_any_reference(home, capsys):
    from rm_service.conversation import Message
    from rm_service.settings import StoreSettings
    from rm_service.store.db import Store
    from rm_service.store.labels import LabelIn

    def label(lid, source, responses, ranks, flips="0"):
        meta = {"judge_pairs": "1", "judge_flips": flips} if source == "JUDGE" else {}
        return LabelIn(lid, [Message("user", "q")], responses, ranks, source, "x", metadata=meta)

    store = Store(StoreSettings())
    store.ingest(
        [
            label("i1", "IMPORT", ["long answer", "no"], [0, 1]),
            label("j1", "JUDGE", ["no", "long answer"], [1, 0], flips="1"),
            label("i2", "IMPORT", ["yes", "nope!"], [0, 1]),
            label("j2", "JUDGE", ["yes", "nope!"], [1, 0]),
        ]
    )
    store.close()
    result = _cli("judge-agreement", "--reference", "HUMAN,IMPORT", home=home)
    assert result.returncode == 0, result.stderr
    table = {
        line.split("|")[1].strip(): line.split("|")[2].strip()
        for line in result.stdout.splitlines()
        if line.startswith("| ")
    }
    assert table["shared pairs (judge and people both decisive)"] == "2" and table["agreement with people"] == "0.500"
    assert table["position-bias rate (verdict flips with the order)"] == "0.500"
    assert _cli("judge-agreement", home=home).stdout.count("nothing to compare yet") == 1  # HUMAN only: no shared pairs
    from rm_service.cli import main

    assert (
        main(["judge-agreement", "--reference", "HUMAN,JUDGE"]) == 2 and "non-judge sources" in capsys.readouterr().err
    )
