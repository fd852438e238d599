"""One client cannot hurt another: hostile labels among valid ones, sent by concurrent gRPC
clients to a real server, fail alone. Every valid label is acknowledged INSERTED and stored;
every hostile one is REJECTED with a reason naming its field, whatever group commit it shared.

(Ranks are uint32 on the wire, so a negative rank cannot be sent over gRPC; negative and
non-integer ranks are covered where they can occur, in tests/test_store.py and the importers.)
"""

from __future__ import annotations

import math
import threading
import time
import uuid

import grpc
import pytest
from conftest import ServerThread
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rm_service.api.v1 import common_pb2, preference_pb2, preference_pb2_grpc
from rm_service.settings import ServeSettings, StoreSettings

MAX_CHARS, MAX_K = 300, 4
PROMPT = [common_pb2.Message(role="user", content="Which answer is better?")]


@pytest.fixture(scope="module")
def store_server(tmp_path_factory):
    home = tmp_path_factory.mktemp("hostile-home")
    srv = ServerThread(
        ServeSettings(port=0, with_model=False, metrics_port=-1),
        StoreSettings(path=home / "rm.duckdb", max_text_chars=MAX_CHARS, max_responses=MAX_K),
    )
    yield srv
    srv.stop()


def _valid(label_id: str, n: int = 0) -> preference_pb2.Label:
    return preference_pb2.Label(
        label_id=label_id,
        prompt=PROMPT,
        responses=[f"yes {label_id}", f"no {label_id}"],
        ranks=[n % 2, 1 - n % 2],
        source=preference_pb2.HUMAN,
        annotator="ann",
        metadata={"origin": "human"},
    )


# kind -> (field the reason must name, how a valid label is made hostile)
HOSTILE = {
    "rank_uint32_max": ("ranks[1]", lambda lab: lab.ranks.__setitem__(1, 4294967295)),
    "rank_50_million": ("ranks[0]", lambda lab: lab.ranks.__setitem__(0, 50_000_000)),
    "rank_equal_to_k": ("ranks[1]", lambda lab: lab.ranks.__setitem__(1, 2)),
    "strength_nan": ("strength", lambda lab: setattr(lab, "strength", math.nan)),
    "strength_inf": ("strength", lambda lab: setattr(lab, "strength", math.inf)),
    "strength_huge": ("strength", lambda lab: setattr(lab, "strength", 1e308)),
    "strength_negative": ("strength", lambda lab: setattr(lab, "strength", -0.5)),
    "k_over_limit": (
        "responses",
        lambda lab: (
            lab.responses.extend(f"extra {i}" for i in range(MAX_K - 1)),
            lab.ranks.extend(range(2, MAX_K + 1)),
        ),
    ),
    "oversized_text": ("responses[0]", lambda lab: lab.responses.__setitem__(0, "x" * (MAX_CHARS + 1))),
    "oversized_prompt": ("prompt[0].content", lambda lab: lab.prompt[0].__setattr__("content", "p" * (MAX_CHARS + 1))),
    "unknown_task": ("task_id", lambda lab: setattr(lab, "task_id", "task-that-was-never-queued")),
    "long_label_id": ("label_id", lambda lab: setattr(lab, "label_id", lab.label_id + "#" * 200)),
    "no_annotator": ("annotator", lambda lab: setattr(lab, "annotator", "")),
    "too_much_metadata": ("metadata", lambda lab: lab.metadata.update({f"k{i}": "v" for i in range(100)})),
}


def _hostile(label_id: str, kind: str) -> preference_pb2.Label:
    label = _valid(label_id)
    HOSTILE[kind][1](label)
    return label


def _send_all(
    address: str, clients: list[list[list[preference_pb2.Label]]]
) -> list[list[list[preference_pb2.IngestResult]]]:
    """Each client sends its requests in order on its own channel; the clients run at once."""
    answers: list = [None] * len(clients)
    start = threading.Barrier(len(clients))

    def run(c: int) -> None:
        with grpc.insecure_channel(address) as channel:
            stub = preference_pb2_grpc.PreferenceServiceStub(channel)
            start.wait()
            answers[c] = [
                list(stub.IngestLabels(preference_pb2.IngestLabelsRequest(labels=req), timeout=30).results)
                for req in clients[c]
            ]

    threads = [threading.Thread(target=run, args=(c,)) for c in range(len(clients))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return answers


def _stored(srv: ServerThread, prefix: str) -> dict[str, list[int]]:
    store = srv.server.store
    with store._lock:
        rows = store.con.execute(
            """SELECT label_id, list(rank ORDER BY position) FROM label_rankings
                                    WHERE starts_with(label_id, ?) GROUP BY label_id""",
            [prefix],
        ).fetchall()
    return dict(rows)


def _check(srv: ServerThread, prefix: str, clients, answers) -> None:
    expected: dict[str, list[int]] = {}
    for requests, results in zip(clients, answers, strict=True):
        for labels, outcomes in zip(requests, results, strict=True):
            assert len(outcomes) == len(labels)
            for i, (label, outcome) in enumerate(zip(labels, outcomes, strict=True)):
                kind = label.metadata.get("kind")
                if kind is None:
                    assert outcome.status == preference_pb2.INSERTED, outcome.reason
                    expected[label.label_id] = list(label.ranks)
                else:
                    field = f"labels[{i}].{HOSTILE[kind][0]}:"
                    assert outcome.status == preference_pb2.REJECTED and outcome.reason.startswith(field), (
                        kind,
                        outcome.reason,
                    )
    assert _stored(srv, prefix) == expected  # every valid label stored as sent, nothing else


specs = st.lists(st.one_of(st.just(None), st.sampled_from(sorted(HOSTILE))), min_size=1, max_size=5)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(plan=st.lists(st.lists(specs, min_size=1, max_size=3), min_size=2, max_size=4))
def test_hostile_labels_fail_alone_among_concurrent_clients(store_server, plan):
    prefix = f"p-{uuid.uuid4().hex[:12]}-"
    clients = []
    for c, requests in enumerate(plan):
        built = []
        for r, request in enumerate(requests):
            labels = []
            for i, kind in enumerate(request):
                label_id = f"{prefix}{c}-{r}-{i}"
                label = _valid(label_id, i) if kind is None else _hostile(label_id, kind)
                if kind is not None:
                    label.metadata["kind"] = kind
                labels.append(label)
            built.append(labels)
        clients.append(built)
    _check(store_server, prefix, clients, _send_all(store_server.address, clients))


def test_a_rank_of_uint32_max_fails_alone_and_fast(store_server):
    """The issue's case: a rank of 4294967295 answered INTERNAL (MemoryError) and failed the
    valid label beside it and other clients' labels in the same group commit."""
    prefix = f"q-{uuid.uuid4().hex[:12]}-"
    bad = _hostile(f"{prefix}bad", "rank_uint32_max")
    bad.metadata["kind"] = "rank_uint32_max"
    clients = [[[bad, _valid(f"{prefix}beside")]]] + [
        [[_valid(f"{prefix}{c}-{i}", i) for i in range(4)]] for c in range(7)
    ]
    began = time.perf_counter()
    answers = _send_all(store_server.address, clients)
    assert time.perf_counter() - began < 10
    _check(store_server, prefix, clients, answers)
    assert len(_stored(store_server, prefix)) == 1 + 7 * 4
