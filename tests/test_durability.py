"""Durability and idempotency of IngestLabels under crashes and concurrent retries.

- A SIGKILL at a random point of ingestion loses no acknowledged label and leaves no
  half-written one (tests/crash_harness.py, 5 rounds on one store file).
- Many clients resending the same labels concurrently store each label_id once.
- Concurrent different payloads for one label_id: one version wins, the rest are CONFLICT.
"""

from __future__ import annotations

import random
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from rm_service.api.v1 import common_pb2, preference_pb2, preference_pb2_grpc
from rm_service.server.convert import label as label_in

DEADLINE_S = 30.0


@pytest.mark.slow
def test_sigkill_during_ingestion_loses_no_acknowledged_label(tmp_path):
    """5 rounds of start / ingest / SIGKILL on one file, each checked as the kill left it, then a
    last recovery and SIGTERM: the harness raises on any lost ack, double store, invented label,
    half-write, failed recovery or a round with no ack before its kill. Each round's server is
    the recovery of the previous kill, so 5 rounds take 6 starts (10 took 20 before)."""
    from crash_harness import run_crash_rounds

    result = run_crash_rounds(5, tmp_path / "crash", clients=8, seed=0)
    assert result["violations"] == []
    assert all(r["acked"] > 0 and r["unknown"] > 0 for r in result["per_round"])  # every kill cut acked work short
    assert result["stored"] >= result["acked"]
    assert result["stored"] == result["acked"] + result["unknown_stored"]


@pytest.fixture
def store_server(home):
    """A store-only server (no model) in this process, on 127.0.0.1 and port 0."""
    from conftest import ServerThread

    from rm_service.settings import ServeSettings

    srv = ServerThread(ServeSettings(port=0, with_model=False))
    yield srv
    srv.stop()


def _label(label_id: str, variant: int = 0) -> preference_pb2.Label:
    prompt = [common_pb2.Message(role="user", content=f"What should I cook tonight? ({label_id})")]
    return preference_pb2.Label(
        label_id=label_id,
        prompt=prompt,
        responses=[f"Try a risotto, variant {variant}.", f"Order pizza, variant {variant}."],
        ranks=[0, 1],
        source=preference_pb2.HUMAN,
        annotator=f"annotator-{variant}",
    )


def _run_threads(n: int, worker) -> list:
    """Run worker(i, barrier) on n threads released together; re-raises any worker's error."""
    barrier = threading.Barrier(n, timeout=DEADLINE_S)
    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(lambda i: worker(i, barrier), range(n)))


def _query(srv, sql: str, params=None) -> list:
    store = srv.server.store
    with store._lock:
        return store.con.execute(sql, params or []).fetchall()


def test_retry_storm_stores_each_id_once(store_server):
    """16 clients resend the same 50 labels (same payloads) in shuffled batches: exactly one
    INSERTED per id overall, every other answer DUPLICATE, and one row set per label."""
    labels = [_label(f"storm-{i}") for i in range(50)]

    def client(i: int, barrier: threading.Barrier) -> list[tuple[str, int]]:
        rng = random.Random(i)
        answers = []
        with grpc.insecure_channel(store_server.address) as channel:
            stub = preference_pb2_grpc.PreferenceServiceStub(channel)
            barrier.wait()
            for _ in range(5):
                order = rng.sample(labels, len(labels))
                while order:
                    size = rng.randint(1, 10)
                    batch, order = order[:size], order[size:]
                    response = stub.IngestLabels(preference_pb2.IngestLabelsRequest(labels=batch), timeout=DEADLINE_S)
                    assert [r.label_id for r in response.results] == [pb.label_id for pb in batch]
                    answers += [(r.label_id, r.status) for r in response.results]
        return answers

    answers = [a for per_client in _run_threads(16, client) for a in per_client]
    statuses = Counter(status for _, status in answers)
    assert set(statuses) <= {preference_pb2.INSERTED, preference_pb2.DUPLICATE}, statuses
    inserted = [label_id for label_id, status in answers if status == preference_pb2.INSERTED]
    assert sorted(inserted) == sorted(pb.label_id for pb in labels)  # exactly 50, one per id
    assert statuses[preference_pb2.DUPLICATE] == len(answers) - 50
    assert _query(store_server, "SELECT count(*), count(DISTINCT label_id) FROM labels") == [(50, 50)]
    assert _query(store_server, "SELECT count(*) FROM label_rankings") == [(100,)]
    assert _query(store_server, "SELECT count(*) FROM completions") == [(100,)]


def test_concurrent_different_payloads_for_one_id_store_one_version(store_server):
    """8 clients each send their own payload for the same 20 label ids, twice, concurrently:
    per id one client wins (INSERTED, then DUPLICATE), every other answer is CONFLICT, and the
    stored rows are the winner's payload."""
    ids = [f"contested-{i}" for i in range(20)]

    def client(variant: int, barrier: threading.Barrier) -> list[tuple[str, int, int]]:
        rng = random.Random(variant)
        answers = []
        with grpc.insecure_channel(store_server.address) as channel:
            stub = preference_pb2_grpc.PreferenceServiceStub(channel)
            barrier.wait()
            for label_id in rng.sample(ids, len(ids)) + rng.sample(ids, len(ids)):
                response = stub.IngestLabels(
                    preference_pb2.IngestLabelsRequest(labels=[_label(label_id, variant)]), timeout=DEADLINE_S
                )
                answers.append((label_id, variant, response.results[0].status))
        return answers

    answers = [a for per_client in _run_threads(8, client) for a in per_client]
    for label_id in ids:
        mine = [(variant, status) for i, variant, status in answers if i == label_id]
        winners = [variant for variant, status in mine if status == preference_pb2.INSERTED]
        assert len(winners) == 1, (label_id, mine)
        winner = winners[0]
        for variant, status in mine:
            expected = (
                (preference_pb2.INSERTED, preference_pb2.DUPLICATE) if variant == winner else (preference_pb2.CONFLICT,)
            )
            assert status in expected, (label_id, winner, variant, status)
        sent = _label(label_id, winner)
        assert _query(store_server, "SELECT payload_hash, annotator FROM labels WHERE label_id = ?", [label_id]) == [
            (label_in(sent).payload_hash(), sent.annotator)
        ]
        texts = _query(
            store_server,
            """SELECT k.text FROM label_rankings r JOIN completions k ON k.id = r.completion_id
                                        WHERE r.label_id = ? ORDER BY r.position""",
            [label_id],
        )
        assert [t for (t,) in texts] == list(sent.responses)
    assert _query(store_server, "SELECT count(*) FROM labels") == [(20,)]
    assert _query(store_server, "SELECT count(*) FROM label_rankings") == [(40,)]


def test_a_caller_that_times_out_does_not_stop_the_writer(home, monkeypatch):
    """A deadline that expires while labels wait for their commit must not kill the one
    writer thread: the next call is still answered. The writer is held on an event (not a
    sleep) until the first caller has seen its deadline pass."""
    from rm_service.store.db import Store as _Store

    real = _Store.ingest_batches
    held = threading.Event()

    def held_back(self, *args, **kwargs):
        held.wait(DEADLINE_S)
        return real(self, *args, **kwargs)

    from conftest import ServerThread

    from rm_service.settings import ServeSettings

    monkeypatch.setattr(_Store, "ingest_batches", held_back)
    srv = ServerThread(ServeSettings(port=0, with_model=False))
    try:
        with grpc.insecure_channel(srv.address) as channel:
            stub = preference_pb2_grpc.PreferenceServiceStub(channel)
            with pytest.raises(grpc.RpcError) as err:
                stub.IngestLabels(preference_pb2.IngestLabelsRequest(labels=[_label("late-1")]), timeout=0.3)
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            held.set()  # the writer finishes the batch whose caller gave up, then takes the next
            reply = stub.IngestLabels(preference_pb2.IngestLabelsRequest(labels=[_label("on-time-1")]), timeout=10)
        assert [r.status for r in reply.results] == [preference_pb2.INSERTED]
    finally:
        held.set()
        srv.stop()
