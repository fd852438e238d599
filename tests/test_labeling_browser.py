"""The labeling page in a real browser: Debian's headless Chromium driven by Selenium, against a
real server on port 0. Keys only: sign in, rank with a tie, thumbs, strength, rationale, submit,
skip; the rows are read back from DuckDB.

Screenshots of the labeling and admin views land in the test's temp dir, and in docs/ with
RM_SCREENSHOTS_DIR=docs (docs/labeling.md).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
from browser import chromium, missing
from conftest import HH_FILE
from labeling import CHAT, REPLIES, SECOND_LABELER, TOKENS, annotator, client, rows, start, submit, url

from rm_service.formats.hh import read_pairs
from rm_service.store.labels import LabelIn

pytestmark = [pytest.mark.slow, pytest.mark.skipif(missing() is not None, reason=missing() or "")]
WAIT_S = 30


@pytest.fixture
def browser():
    session = chromium()
    assert session.driver.capabilities["chrome"]["userDataDir"] == session.profile  # a fresh profile, not ~/.config
    yield session.driver
    session.quit()


def wait(predicate, what: str, timeout: float = WAIT_S):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def keys(driver, *typed) -> None:
    """Type into whatever has the focus, as a person at the keyboard does."""
    driver.switch_to.active_element.send_keys(*typed)


def by_id(driver, element_id: str):
    return driver.find_element("id", element_id)


def sign_in(driver, base: str, token: str, path: str = "/") -> None:
    from selenium.webdriver.common.keys import Keys

    driver.get(base + path)
    wait(lambda: by_id(driver, "signin").is_displayed(), "the sign-in form")
    assert driver.switch_to.active_element.get_attribute("id") == "token"  # the form has the focus
    keys(driver, token, Keys.ENTER)


def current_task(driver, previous: str | None = None) -> str:
    """The id of the task on the page, once it differs from `previous`."""

    def shown():
        task = by_id(driver, "task")
        tid = task.get_attribute("data-task-id")
        return tid if task.is_displayed() and tid and tid != previous else None

    return wait(shown, "the next task")


def saved(driver, text: str = "Saved.") -> None:
    wait(lambda: by_id(driver, "message").text == text, f"the message {text!r}")


def test_rank_a_three_way_task_with_a_tie_from_the_keyboard(home, tiny_rm_dir, browser, tmp_path):
    from selenium.webdriver.common.keys import Keys

    srv = start(with_model=True, model=str(tiny_rm_dir), precision="fp32", labeling_lease_s=3)
    try:
        task = submit(srv, REPLIES)
        sign_in(browser, url(srv), TOKENS["labeler"])
        assert current_task(browser) == task
        assert "Reward model" in by_id(browser, "suggestions").text  # the served model's suggestion, shown apart
        assert browser.find_elements("css selector", "#replies .reply")[0] == browser.switch_to.active_element

        # The open page renews its lease (every third of the 3 s lease): wait for two renewals,
        # by the stored expiry moving on, rather than sleeping and hoping.
        def expiry():
            return rows(srv, "SELECT epoch_ms(lease_expires_at) FROM tasks")[0][0]

        first = expiry()
        second = wait(lambda: (e := expiry()) > first and e, "a renewal of the lease")
        wait(lambda: expiry() > second, "a second renewal of the lease")
        [(state, owner)] = rows(srv, "SELECT state, lease_owner FROM tasks")
        assert (state, owner) == ("leased", annotator(TOKENS["labeler"]))
        keys(browser, "1")  # A: best; the focus moves on to B
        keys(browser, "1")  # B: best too, a tie
        keys(browser, "2")  # C: second
        keys(browser, "u", "+", "+", "r")  # thumbs up the last assistant turn, strength 2, to the rationale
        keys(browser, "A and B both help; C gives up.", Keys.ESCAPE)
        browser.save_screenshot(str(tmp_path / "ranked.png"))
        keys(browser, Keys.ENTER)
        saved(browser)
        label_id = f"{task}/{annotator(TOKENS['labeler'])}"
        [(source, who, strength, rationale, metadata)] = rows(
            srv, "SELECT source, annotator, strength, rationale, metadata FROM labels WHERE label_id = ?", [label_id]
        )
        assert (source, who, strength, rationale) == (
            "HUMAN",
            annotator(TOKENS["labeler"]),
            2.0,
            "A and B both help; C gives up.",
        )
        assert json.loads(json.loads(metadata)["turn_feedback"]) == {"1": "up"}
        thumbs = rows(
            srv,
            "SELECT l.source, l.annotator, f.kind, f.message_index, f.value FROM labels l JOIN label_feedback f "
            "USING (label_id) WHERE label_id = ?",
            [f"{label_id}/thumbs"],
        )
        assert thumbs == [
            ("HUMAN", annotator(TOKENS["labeler"]), "thumb", 1, 1.0)
        ]  # the thumb is a feedback label of its own too
        ranking = rows(
            srv,
            """SELECT k.text, r.rank FROM label_rankings r JOIN completions k ON k.id = r.completion_id
                               WHERE r.label_id = ? ORDER BY r.position""",
            [label_id],
        )
        assert ranking == [(REPLIES[0], 0), (REPLIES[1], 0), (REPLIES[2], 1)]
        assert rows(srv, "SELECT state, closed_by FROM tasks") == [("done", label_id)]
        assert rows(srv, "SELECT kind FROM suggestions") == [("model",)]
        wait(lambda: by_id(browser, "empty").is_displayed(), "the empty queue")
        assert by_id(browser, "progress").text == "Labeled today: 1 · Left in queue: 0"
    finally:
        srv.stop()


def test_a_wrong_token_is_refused(home, browser):
    srv = start()
    try:
        submit(srv, REPLIES)
        for token, refusal in (
            ("labeler-" + "w" * 30, "Refused: invalid bearer token"),
            (TOKENS["scorer"], "needs the labeler or admin role"),
        ):
            sign_in(browser, url(srv), token)
            wait(lambda refusal=refusal: refusal in by_id(browser, "message").text, f"the refusal {refusal!r}")
            assert by_id(browser, "signin").is_displayed() and not by_id(browser, "work").is_displayed()
        sign_in(browser, url(srv), TOKENS["labeler"], "/admin")
        wait(lambda: "needs the admin" in by_id(browser, "message").text, "the admin page's refusal")
        assert rows(srv, "SELECT state FROM tasks") == [("queued",)]  # nothing was leased
    finally:
        srv.stop()


def test_label_twenty_tasks_from_the_keyboard_alone(home, browser):
    from selenium.webdriver.common.keys import Keys

    srv = start()
    try:
        pairs = [pair for _, _, pair in read_pairs(HH_FILE) if not isinstance(pair, Exception)][:21]
        ids = [
            submit(
                srv,
                [p.chosen, p.rejected] + ([f"A third reply, number {i}."] if i % 3 == 0 else []),
                prompt=p.prompt,
                priority=100 - i,
            )
            for i, p in enumerate(pairs)
        ]
        sign_in(browser, url(srv), TOKENS["labeler"])
        shown, task = [], None
        for i in range(21):
            task = current_task(browser, task)
            shown.append(task)
            if i == 0:
                keys(browser, "s")  # skip the first
                saved(browser, "Skipped.")
                continue
            k = 3 if (i % 3 == 0) else 2
            keys(browser, *([str(k - j) for j in range(k)] if i % 2 else ["1"] * (k - 1) + ["2"]))  # reversed, or a tie
            keys(browser, Keys.ENTER)
            saved(browser)
        wait(lambda: by_id(browser, "empty").is_displayed(), "the empty queue")
        assert shown == ids  # highest priority first
        assert by_id(browser, "progress").text == "Labeled today: 20 · Left in queue: 0"
        assert rows(srv, "SELECT task_id, annotator FROM task_skips") == [(ids[0], annotator(TOKENS["labeler"]))]
        labeled = rows(
            srv,
            "SELECT task_id FROM labels WHERE source = 'HUMAN' AND annotator = ? ORDER BY seq",
            [annotator(TOKENS["labeler"])],
        )
        assert [t for (t,) in labeled] == ids[1:]
        assert rows(srv, "SELECT state, count(*) FROM tasks GROUP BY state ORDER BY state") == [
            ("done", 20),
            ("queued", 1),
        ]
    finally:
        srv.stop()


def test_screenshots_of_the_labeling_and_admin_views(home, property_rm_dir, browser, tmp_path):
    """The two views with real data, as PNGs (copied into RM_SCREENSHOTS_DIR when it is set)."""
    srv = start(with_model=True, model=str(property_rm_dir), precision="fp32")
    try:
        best_first = {
            SECOND_LABELER: [REPLIES, REPLIES],
            TOKENS["admin"]: [REPLIES, [REPLIES[1], REPLIES[0], REPLIES[2]]],
        }
        for n, prompt in enumerate([CHAT[:1], CHAT]):  # two people and two judges rank the same completions
            for p, (token, orders) in enumerate(best_first.items()):
                shown = REPLIES if p == 0 else REPLIES[::-1]  # the same completions, another task
                task = submit(srv, shown, prompt=prompt, priority=10)
                c = client(srv, token)
                assert c.post("/api/next").json()["task"]["task_id"] == task
                ranks = [orders[n].index(text) for text in shown]
                assert c.post(f"/api/tasks/{task}/label", json={"ranks": ranks}).status_code == 200
            srv.server.store.ingest(
                [
                    LabelIn(f"judge-a-{n}", prompt, REPLIES, [0, 1, 2], "JUDGE", "smollm2-135m-instruct@pairwise-v1"),
                    LabelIn(f"judge-b-{n}", prompt, REPLIES, [2, 1, 0], "JUDGE", "length-judge"),
                ]
            )
        submit(
            srv, [REPLIES[1], REPLIES[0], REPLIES[2]], priority=1
        )  # a third task of the same completions: both suggestions apply
        sign_in(browser, url(srv), TOKENS["labeler"])
        current_task(browser)
        wait(lambda: "Judge" in by_id(browser, "suggestions").text, "the judges' suggestions")
        keys(browser, "2", "1", "3", "u")
        shots = {
            "labeling-page.png": tmp_path / "labeling-page.png",
            "labeling-admin.png": tmp_path / "labeling-admin.png",
        }
        browser.save_screenshot(str(shots["labeling-page.png"]))
        browser.execute_script("sessionStorage.clear()")
        browser.set_window_size(1360, 1300)  # the whole admin view
        sign_in(browser, url(srv), TOKENS["admin"], "/admin")
        wait(lambda: "length-judge" in by_id(browser, "people-judges").text, "the agreement tables")
        browser.save_screenshot(str(shots["labeling-admin.png"]))
        for path in shots.values():
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
        if os.environ.get("RM_SCREENSHOTS_DIR"):
            for name, path in shots.items():
                shutil.copy(path, Path(os.environ["RM_SCREENSHOTS_DIR"]) / name)
    finally:
        srv.stop()
