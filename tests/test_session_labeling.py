"""Session tasks on the labeling page: a conversation a policy played, thumbs on its assistant
turns and the session's outcome. Over real HTTP to a real server on port 0, and in Debian's
headless Chromium from the keyboard; the rows are read back from DuckDB."""

from __future__ import annotations

import httpx
import pytest
from browser import missing
from labeling import CHAT, REPLIES, TOKENS, annotator, client, rows, start, submit

from rm_service.conversation import Message
from rm_service.store.feedback import FeedbackIn, TurnThumb
from rm_service.store.session_tasks import SessionCandidate, submit_sessions

LABELER = TOKENS["labeler"]
PLAYED = [
    Message("assistant", "Hi! How can I help?"),  # a greeting before any user turn: no thumb
    *CHAT,
    Message("assistant", "Check the drainage, and pinch off the flower buds."),
]  # assistant turns 0 (greeting), 2, 4


@pytest.fixture
def srv(home):
    server = start()
    yield server
    server.stop()


def _queue_session(srv, conversation=PLAYED, priority=10) -> str:
    [task_id] = submit_sessions(srv.server.store, [SessionCandidate(conversation, "step-2", priority=priority)])
    return task_id


def _next(c: httpx.Client) -> dict:
    r = c.post("/api/next")
    assert r.status_code == 200, r.text
    return r.json()["task"]


def test_a_person_gives_thumbs_and_an_outcome_on_a_played_session(srv):
    ranking = submit(srv, REPLIES[:2])
    session = _queue_session(srv)
    with client(srv, LABELER) as c:
        task = _next(c)  # the session has the higher priority; the page leases both kinds
        assert task["task_id"] == session and task["kind"] == "session"
        assert task["conversation"][4]["content"] == PLAYED[4].content and task["scored_turns"] == [2, 4]
        assert task["completions"] == [] and task["suggestions"] == []
        path = f"/api/tasks/{session}/label"
        for body, field in [
            ({}, "turn_feedback"),
            ({"ranks": [0, 1]}, "ranks"),
            ({"outcome": True}, "outcome"),
            ({"outcome": 1.5}, "outcome"),
            ({"turn_feedback": {"0": "up"}}, "turn_feedback['0']"),
            ({"turn_feedback": {"1": "up"}}, "turn_feedback['1']"),
            ({"turn_feedback": {"2": "meh"}}, "turn_feedback['2']"),
        ]:
            r = c.post(path, json=body)
            assert r.status_code == 400 and field in r.text, (body, r.text)
        assert rows(srv, "SELECT count(*) FROM labels") == [(0,)]  # nothing stored by a bad answer
        answer = {"turn_feedback": {"2": "up", "4": "down"}, "outcome": 0, "rationale": " helpful, then lost "}
        r = c.post(path, json=answer)
        assert r.status_code == 200 and r.json()["status"] == "INSERTED", r.text
        assert c.post(path, json=answer).json()["status"] == "DUPLICATE"
        assert c.post(path, json={**answer, "outcome": 1}).status_code == 409  # another answer: the first is kept
        assert _next(c)["task_id"] == ranking
    label_id = f"{session}/{annotator(LABELER)}"
    assert rows(srv, "SELECT source, task_id, rationale FROM labels WHERE label_id = ?", [label_id]) == [
        ("HUMAN", session, "helpful, then lost")
    ]
    assert rows(
        srv, "SELECT kind, message_index, value FROM label_feedback WHERE label_id = ? ORDER BY kind, message_index",
        [label_id],
    ) == [("outcome", -1, 0.0), ("thumb", 2, 1.0), ("thumb", 4, 0.0)]  # fmt: skip
    assert rows(srv, "SELECT state, closed_by FROM tasks WHERE task_id = ?", [session]) == [("done", label_id)]


@pytest.mark.slow
@pytest.mark.skipif(missing() is not None, reason=missing() or "")
def test_label_a_session_from_the_keyboard_in_chromium(home):
    from browser import chromium
    from selenium.webdriver.common.keys import Keys
    from test_labeling_browser import by_id, current_task, keys, saved, sign_in, wait

    srv = start()
    session_browser = chromium()
    driver = session_browser.driver
    try:
        first = _queue_session(srv, priority=20)
        second = _queue_session(srv, PLAYED[1:3], priority=10)  # one turn only
        sign_in(driver, f"http://127.0.0.1:{srv.server.http.port}", LABELER)
        assert current_task(driver) == first
        assert by_id(driver, "outcome-box").is_displayed() and not by_id(driver, "replies-box").is_displayed()
        thumbs = driver.find_elements("css selector", "#chat .thumb")
        assert len(thumbs) == 4  # up and down on turns 2 and 4; the greeting takes none
        keys(driver, Keys.ENTER)  # nothing given yet: the page says so, nothing is sent
        wait(lambda: "Give a thumb" in by_id(driver, "message").text, "the empty-answer message")
        keys(driver, "u", Keys.ARROW_DOWN, "d", "n")  # turn 2 up, turn 4 down, the session failed
        assert by_id(driver, "outcome-failure").get_attribute("aria-pressed") == "true"
        keys(driver, Keys.ENTER)
        saved(driver)
        assert current_task(driver, first) == second
        keys(driver, "y", Keys.ENTER)  # an outcome alone
        saved(driver)
        wait(lambda: by_id(driver, "empty").is_displayed(), "the empty queue")
        who = annotator(LABELER)
        got = rows(
            srv,
            """SELECT l.task_id, f.kind, f.message_index, f.value FROM labels l JOIN label_feedback f USING (label_id)
               WHERE l.annotator = ? ORDER BY l.seq, f.kind, f.message_index""",
            [who],
        )
        assert got == [
            (first, "outcome", -1, 0.0),
            (first, "thumb", 2, 1.0),
            (first, "thumb", 4, 0.0),
            (second, "outcome", -1, 1.0),
        ]
        assert rows(srv, "SELECT count(*) FROM tasks WHERE state = 'done'") == [(2,)]

        # the gold's feedback on the first session: turn 2 up as the person said, turn 4 up where they said
        # down, success where they said failure; the admin page shows the agreement on thumbs and outcomes
        judge = FeedbackIn("gold-1", PLAYED, [TurnThumb(2, True), TurnThumb(4, True)], 1.0, "JUDGE", "turns:v1")
        assert srv.server.store.ingest([judge])[0].status == "INSERTED"
        driver.execute_script("sessionStorage.clear()")
        sign_in(driver, f"http://127.0.0.1:{srv.server.http.port}", TOKENS["admin"], "/admin")
        wait(lambda: "thumbs on assistant turns" in by_id(driver, "sessions-judges").text, "the sessions table")
        table = [
            [td.text for td in tr.find_elements("css selector", "td")]
            for tr in by_id(driver, "sessions-judges").find_elements("css selector", "tr")[1:]
        ]
        assert table == [
            ["thumbs on assistant turns", "2", "0.500", "0.000"],  # the judge always up: kappa 0
            ["session outcomes", "1", "0.000", "n/a"],
        ]
        assert "session tasks in the queue" in by_id(driver, "stats").text
    finally:
        session_browser.quit()
        srv.stop()
