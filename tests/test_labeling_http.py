"""The labeling page's JSON API over real HTTP to a real server on port 0: auth, lease order,
renewal, expiry, skip, idempotent submit, suggestions kept apart, admin agreement, and every
bad input answered 4xx (never 500)."""

from __future__ import annotations

import asyncio
import json
import ssl
import time

import httpx
import pytest
from conftest import lapse_leases
from labeling import CHAT, REPLIES, SECOND_LABELER, TOKENS, annotator, client, rows, start, submit, url

from rm_service.conversation import Message
from rm_service.errors import FailedPrecondition
from rm_service.store.labels import LabelIn

LABELER, ADMIN, SCORER = TOKENS["labeler"], TOKENS["admin"], TOKENS["scorer"]


@pytest.fixture
def srv(home):
    server = start()
    yield server
    server.stop()


def _next(c: httpx.Client) -> dict:
    r = c.post("/api/next")
    assert r.status_code == 200, r.text
    return r.json()


def test_tokens_and_roles_are_the_grpc_sides(srv):
    assert httpx.get(url(srv) + "/health").status_code == 200  # probes need no token
    assert httpx.get(url(srv) + "/").status_code == 200  # the page shell; its data needs a token
    missing = httpx.post(url(srv) + "/api/next", json={})
    assert missing.status_code == 401 and "missing bearer token" in missing.json()["error"]
    assert missing.headers["www-authenticate"].startswith("Bearer")
    wrong = client(srv, "labeler-" + "x" * 30).post("/api/next")
    assert wrong.status_code == 401 and wrong.json()["error"] == "invalid bearer token"
    assert LABELER not in wrong.text
    denied = client(srv, SCORER).post("/api/next")
    assert denied.status_code == 403 and "needs the labeler or admin role" in denied.json()["error"]
    assert client(srv, LABELER).get("/api/admin/agreement").status_code == 403
    assert client(srv, ADMIN).get("/api/admin/agreement").status_code == 200
    me = client(srv, LABELER).get("/api/me").json()
    assert me["annotator"] == annotator(LABELER) and me["role"] == "labeler" and me["auth"] is True
    assert rows(srv, "SELECT count(*) FROM tasks WHERE state = 'leased'") == [(0,)]


def test_lease_highest_priority_first_resume_renew_and_label(srv):
    low = submit(srv, ["a", "b"], priority=1)
    high = submit(srv, REPLIES, priority=5)
    me = client(srv, LABELER)
    first = _next(me)
    assert first["task"]["task_id"] == high and first["task"]["completions"] == REPLIES
    assert [m["role"] for m in first["task"]["prompt"]] == ["user", "assistant", "user"]
    assert first["progress"] == {"labeled_today": 0, "queue_left": 1}
    assert _next(me)["task"]["task_id"] == high  # a reopened page gets its own task back
    assert _next(client(srv, SECOND_LABELER))["task"]["task_id"] == low  # not the task someone holds
    before = rows(srv, "SELECT epoch_ms(lease_expires_at) FROM tasks WHERE task_id = ?", [high])[0][0]
    time.sleep(0.05)
    renewed = me.post(f"/api/tasks/{high}/renew")
    assert renewed.status_code == 200 and renewed.json()["lease_expires_unix_ms"] > before
    assert (
        rows(srv, "SELECT epoch_ms(lease_expires_at) FROM tasks WHERE task_id = ?", [high])[0][0]
        == renewed.json()["lease_expires_unix_ms"]
    )
    answer = {
        "ranks": [0, 0, 1],
        "strength": 2,
        "rationale": " A and B both help; C gives up. ",
        "turn_feedback": {"1": "up"},
    }
    r = me.post(f"/api/tasks/{high}/label", json=answer)
    assert r.status_code == 200 and r.json()["status"] == "INSERTED", r.text
    label_id = f"{high}/{annotator(LABELER)}"
    assert r.json()["label_id"] == label_id and r.json()["progress"]["labeled_today"] == 1
    [(source, who, strength, rationale, metadata, task_id)] = rows(
        srv,
        "SELECT source, annotator, strength, rationale, metadata, task_id FROM labels WHERE label_id = ?",
        [label_id],
    )
    assert (source, who, strength, rationale, task_id) == (
        "HUMAN",
        annotator(LABELER),
        2.0,
        "A and B both help; C gives up.",
        high,
    )
    meta = json.loads(metadata)
    assert json.loads(meta["turn_feedback"]) == {"1": "up"} and meta["interface"] == "labeling-page"
    ranking = rows(
        srv,
        """SELECT k.text, r.rank FROM label_rankings r JOIN completions k ON k.id = r.completion_id
                           WHERE r.label_id = ? ORDER BY r.position""",
        [label_id],
    )
    assert ranking == [(REPLIES[0], 0), (REPLIES[1], 0), (REPLIES[2], 1)]
    # The thumb is also a first-class feedback label on the chat, committed with the ranking.
    assert rows(
        srv,
        "SELECT l.annotator, l.task_id, f.kind, f.message_index, f.value FROM labels l JOIN label_feedback f "
        "USING (label_id) WHERE label_id = ?",
        [f"{label_id}/thumbs"],
    ) == [(annotator(LABELER), high, "thumb", 1, 1.0)]
    assert rows(srv, "SELECT state, closed_by FROM tasks WHERE task_id = ?", [high]) == [("done", label_id)]


def test_double_submit_stores_one_label(srv):
    task = submit(srv, REPLIES)
    me = client(srv, LABELER)
    _next(me)
    answer = {"ranks": [1, 0, 2]}

    async def twice():
        async with httpx.AsyncClient(base_url=url(srv), headers={"Authorization": f"Bearer {LABELER}"}) as c:
            return await asyncio.gather(*[c.post(f"/api/tasks/{task}/label", json=answer) for _ in range(2)])

    first, second = asyncio.run(twice())
    assert (first.status_code, second.status_code) == (200, 200)
    assert sorted([first.json()["status"], second.json()["status"]]) == ["DUPLICATE", "INSERTED"]
    assert (
        me.post(f"/api/tasks/{task}/label", json=answer).json()["status"] == "DUPLICATE"
    )  # after the task closed, too
    changed = me.post(f"/api/tasks/{task}/label", json={"ranks": [0, 1, 2]})
    assert changed.status_code == 409 and "another answer" in changed.json()["error"]
    assert rows(srv, "SELECT count(*) FROM labels") == [(1,)]
    assert rows(srv, "SELECT rank FROM label_rankings ORDER BY position") == [(1,), (0,), (2,)]


def test_skip_releases_the_task_and_is_not_offered_again(srv):
    skipped = submit(srv, REPLIES, priority=2)
    other = submit(srv, ["x", "y"])
    me = client(srv, LABELER)
    assert _next(me)["task"]["task_id"] == skipped
    r = me.post(f"/api/tasks/{skipped}/skip")
    assert r.status_code == 200 and r.json()["progress"]["queue_left"] == 1
    assert me.post(f"/api/tasks/{skipped}/skip").status_code == 200  # a repeated skip is a no-op
    assert rows(srv, "SELECT task_id, annotator FROM task_skips") == [(skipped, annotator(LABELER))]
    assert rows(srv, "SELECT state, lease_owner FROM tasks WHERE task_id = ?", [skipped]) == [("queued", None)]
    assert _next(me)["task"]["task_id"] == other
    assert _next(client(srv, SECOND_LABELER))["task"]["task_id"] == skipped  # someone else still gets it
    assert rows(srv, "SELECT count(*) FROM labels") == [(0,)]  # a skip is never a label


def test_an_expired_lease_is_409(home):
    srv = start()
    try:
        task = submit(srv, REPLIES)
        me = client(srv, LABELER)
        assert _next(me)["task"]["task_id"] == task
        assert lapse_leases(srv) == 1  # the lease runs out: the clock moved on, not slept through
        for path, body in (("renew", None), ("skip", None), ("label", {"ranks": [0, 1, 2]})):
            r = me.post(f"/api/tasks/{task}/{path}", json=body)
            assert r.status_code == 409 and "expired" in r.json()["error"], (path, r.text)
        assert _next(client(srv, SECOND_LABELER))["task"]["task_id"] == task  # it went back to the queue
        late = me.post(f"/api/tasks/{task}/label", json={"ranks": [0, 1, 2]})
        assert late.status_code == 409
        assert rows(srv, "SELECT count(*) FROM labels") == [(0,)]
    finally:
        srv.stop()


@pytest.mark.parametrize(
    "body, status, field",
    [
        (b"{not json", 400, "body"),
        (b"[1, 2]", 400, "body"),
        ({"ranks": "0,1,2"}, 400, "ranks"),
        ({"ranks": [0, 2, 1, 3]}, 400, "ranks"),
        ({"ranks": [0, 2, 2]}, 400, "ranks"),  # not dense: the store's own check
        ({"ranks": [0, 1, True]}, 400, "ranks[2]"),
        ({"ranks": [0, 1, 2], "strength": -1}, 400, "strength"),
        ({"ranks": [0, 1, 2], "strength": "high"}, 400, "strength"),
        ({"ranks": [0, 1, 2], "rationale": 7}, 400, "rationale"),
        ({"ranks": [0, 1, 2], "turn_feedback": {"0": "up"}}, 400, "turn_feedback['0']"),  # a user turn
        ({"ranks": [0, 1, 2], "turn_feedback": {"1": "meh"}}, 400, "turn_feedback['1']"),
        ({"ranks": [0, 1, 2], "turn_feedback": ["up"]}, 400, "turn_feedback"),
        ({"ranks": [0, 1, 2], "source": "JUDGE"}, 400, "source"),  # the page cannot choose source or annotator
    ],
)
def test_bad_answers_are_400_naming_the_field(srv, body, status, field):
    task = submit(srv, REPLIES)
    me = client(srv, LABELER)
    _next(me)
    kw = (
        {"content": body, "headers": {"Content-Type": "application/json"}}
        if isinstance(body, bytes)
        else {"json": body}
    )
    r = me.post(f"/api/tasks/{task}/label", **kw)
    assert r.status_code == status and r.json()["error"].startswith(field + ":"), r.text
    assert rows(srv, "SELECT count(*) FROM labels") == [(0,)]


def test_unknown_tasks_routes_and_methods_are_4xx(srv):
    me = client(srv, LABELER)
    assert me.post("/api/tasks/task-nope/label", json={"ranks": [0, 1]}).status_code == 404
    assert me.post("/api/tasks/task-nope/renew").status_code == 404
    assert me.get("/api/nothing").status_code == 404
    assert me.get("/api/next").status_code == 405
    big = me.post(
        "/api/tasks/x/label", content=b"{" + b" " * (1 << 20) + b"}", headers={"Content-Type": "application/json"}
    )
    assert big.status_code == 400 and "larger than" in big.json()["error"]
    assert _next(me) == {"task": None, "progress": {"labeled_today": 0, "queue_left": 0}}


def test_pages_forbid_inline_script_and_framing(srv):
    for path in ("/", "/admin"):
        r = httpx.get(url(srv) + path)
        assert (
            r.status_code == 200
            and r.headers["content-security-policy"] == "default-src 'self'; frame-ancestors 'none'"
        )
        assert "<script>" not in r.text and "onclick=" not in r.text  # nothing inline that the policy would block


def test_the_page_over_mutual_tls(home, pki):
    srv = start(tls={"tls_cert": pki / "server.crt", "tls_key": pki / "server.key", "tls_client_ca": pki / "ca.crt"})
    try:
        base = f"https://127.0.0.1:{srv.server.http.port}"
        assert srv.server.http.url == base + "/"
        trusted = ssl.create_default_context(cafile=str(pki / "ca.crt"))
        with_cert = ssl.create_default_context(cafile=str(pki / "ca.crt"))
        with_cert.load_cert_chain(pki / "client.crt", pki / "client.key")
        me = httpx.get(base + "/api/me", headers={"Authorization": f"Bearer {LABELER}"}, verify=with_cert)
        assert me.status_code == 200 and me.json()["annotator"] == annotator(LABELER)
        with pytest.raises(httpx.TransportError):  # no client certificate
            httpx.get(base + "/api/me", headers={"Authorization": f"Bearer {LABELER}"}, verify=trusted)
        with pytest.raises(httpx.TransportError):  # plaintext to the TLS port
            httpx.get(f"http://127.0.0.1:{srv.server.http.port}/health")
    finally:
        srv.stop()


def test_the_page_needs_a_free_port(home):
    srv = start()
    try:
        with pytest.raises(FailedPrecondition, match=f"127.0.0.1:{srv.server.http.port} \\(in use\\)"):
            start(http_port=srv.server.http.port)
    finally:
        srv.stop()


def test_suggestions_are_shown_and_kept_apart(home, tiny_rm_dir):
    srv = start(with_model=True, model=str(tiny_rm_dir), precision="fp32")
    try:
        task = submit(srv, REPLIES)
        judge = LabelIn("judge-1", CHAT, [REPLIES[2], REPLIES[0], REPLIES[1]], [0, 1, 1], "JUDGE", "judge-model")
        assert srv.server.store.ingest([judge])[0].status == "INSERTED"  # the same completions, another order
        shown = _next(client(srv, LABELER))["task"]["suggestions"]
        by_kind = {s["kind"]: s for s in shown}
        assert by_kind["judge"] == {
            "kind": "judge",
            "origin": "judge-1",
            "suggester": "judge-model",
            "ranks": [1, 1, 0],
            "scores": None,
        }
        model = by_kind["model"]
        version = srv.server.served.default
        assert model["origin"] == version and len(model["scores"]) == 3
        best = max(range(3), key=lambda i: model["scores"][i])
        assert model["ranks"][best] == 0
        assert _next(client(srv, LABELER))["task"]["suggestions"] == shown  # recorded once, shown again
        assert rows(srv, "SELECT kind, origin FROM suggestions ORDER BY kind") == [
            ("judge", "judge-1"),
            ("model", version),
        ]
        r = client(srv, LABELER).post(f"/api/tasks/{task}/label", json={"ranks": [0, 1, 2]})
        assert r.status_code == 200
        meta = json.loads(rows(srv, "SELECT metadata FROM labels WHERE source = 'HUMAN'")[0][0])
        assert sorted(meta["suggestions_shown"].split(",")) == ["judge:judge-1", f"model:{version}"]
        assert rows(srv, "SELECT source, count(*) FROM labels GROUP BY source ORDER BY source") == [
            ("HUMAN", 1),
            ("JUDGE", 1),
        ]
    finally:
        srv.stop()


def test_admin_agreement_between_people_and_with_each_judge(srv):
    prompt = [Message("user", "Name a fruit.")]
    replies = ["apple", "a rock", "banana"]
    people = {}
    for token in (LABELER, SECOND_LABELER):
        task = submit(srv, replies, prompt=prompt, priority=1) if token == LABELER else None
        c = client(srv, token)
        if task is None:  # the second person labels the same completions through another task
            task = submit(srv, list(reversed(replies)), prompt=prompt)
        got = _next(c)["task"]
        ranks = [{"apple": 0, "banana": 0, "a rock": 1}[text] for text in got["completions"]]
        assert c.post(f"/api/tasks/{got['task_id']}/label", json={"ranks": ranks}).status_code == 200
        people[token] = annotator(token)
    store = srv.server.store
    store.ingest(
        [
            LabelIn("j-good", prompt, replies, [0, 1, 0], "JUDGE", "good-judge"),
            LabelIn("j-bad", prompt, replies, [1, 0, 2], "JUDGE", "bad-judge"),
        ]
    )
    data = client(srv, ADMIN).get("/api/admin/agreement").json()
    [pair] = data["between_people"]
    assert {pair["a"], pair["b"]} == set(people.values())
    assert pair["shared_pairs"] == 2 and pair["agreement"] == 1.0  # apple > rock, banana > rock; the tie is no pair
    judges = {j["judge"]: j for j in data["people_and_judges"]}
    assert judges["good-judge"]["shared_pairs"] == 2 and judges["good-judge"]["agreement"] == 1.0
    assert judges["bad-judge"]["agreement"] == 0.0
    expected = store.judge_agreement(("HUMAN",), judge="bad-judge")  # the same computation, not a second one
    assert (judges["bad-judge"]["shared_pairs"], judges["bad-judge"]["agreement"]) == (
        expected.shared_pairs,
        expected.agreement,
    )
    assert data["people_and_all_judges"]["shared_pairs"] == store.judge_agreement().shared_pairs
    assert {p["annotator"] for p in data["people"]} == set(people.values())
    assert data["stats"]["labels_by_source"] == {"HUMAN": 2, "JUDGE": 2}


def test_every_error_has_a_grpc_code_and_an_http_status():
    from rm_service.errors import HTTP_STATUS, STATUS_CODES, RMError, http_status

    for cls in RMError.__subclasses__():
        assert cls in STATUS_CODES and cls in HTTP_STATUS, cls.__name__
    assert http_status(ValueError("a bug")) == 500
