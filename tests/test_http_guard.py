"""The HTTP surface as hard as gRPC's, over real sockets to a real server on port 0: JSON nesting
and numbers refused as 400 naming the field, odd keys, a caller leaving mid-body (a disconnect,
never a 500), slow heads and bodies closed after their documented timeouts, the connection
limit, and no cross-site writes (content type, Origin, Host), with tokens and without."""

from __future__ import annotations

import json
import logging
import socket
import time
import uuid

import httpx
import pytest
from conftest import ServerThread, wait_until
from hypothesis import given, settings
from hypothesis import strategies as st
from labeling import REPLIES, TOKENS, rows, start, submit

from rm_service.settings import ServeSettings

LIMITS = {"http_header_timeout_s": 1.0, "http_body_timeout_s": 1.0}
MAX_CONNECTIONS = 4


@pytest.fixture(scope="module")
def open_srv(tmp_path_factory):
    """No tokens (loopback), the store and the labeling page, short HTTP deadlines."""
    mp = pytest.MonkeyPatch()
    mp.setenv("RM_HOME", str(tmp_path_factory.mktemp("home")))
    server = ServerThread(ServeSettings(port=0, http_port=0, metrics_port=-1, with_model=False, **LIMITS))
    yield server
    server.stop()
    mp.undo()


def _url(srv, path: str = "") -> str:
    return f"http://127.0.0.1:{srv.server.http.port}{path}"


def _labels(srv) -> int:
    return rows(srv, "SELECT count(*) FROM labels")[0][0]


def _leased(srv) -> int:
    return rows(srv, "SELECT count(*) FROM tasks WHERE state = 'leased'")[0][0]


def _task(srv) -> str:
    """A new task (fresh completions: the queue keeps one task per conversation and completions)."""
    return submit(srv, [f"{r} ({uuid.uuid4().hex[:8]})" for r in REPLIES[:2]])


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize(
    "body, field",
    [
        ('{"ranks": ' + _nested(40) + "}", "ranks" + "[0]" * 31),
        (_nested(100_000), "body"),  # deeper than Python's own recursion limit
        ('{"ranks": [0, 1' + "0" * 5000 + "]}", "ranks[1]"),  # past Python's 4,300-digit int limit
        ('{"ranks": [0, 1], "strength": 1e400}', "strength"),
        ('{"ranks": [0, 1], "strength": NaN}', "strength"),
        ('{"ranks": [0, 1], "strength": -Infinity}', "strength"),
        ('{"ranks": [0, 1], "turn_feedback": {"\u00b2": "up"}}', "turn_feedback['\u00b2']"),
        ('{"ranks": [0, 1], "turn_feedback": {"' + "9" * 5000 + '": "up"}}', "turn_feedback["),
        ('{"ranks": [0, 1], "turn_feedback": {"": "up"}}', "turn_feedback['']"),
        ('{"ranks": [0, 1], "\\ud800": 1}', "'\\ud800'"),
    ],
)
def test_nesting_numbers_and_odd_keys_are_400_naming_the_field(open_srv, body, field):
    _task(open_srv)
    with httpx.Client(base_url=_url(open_srv), timeout=30) as c:
        task = c.post("/api/next", json={}).json()["task"]["task_id"]
        r = c.post(f"/api/tasks/{task}/label", content=body.encode(), headers={"content-type": "application/json"})
        assert r.status_code == 400, r.text
        assert r.json()["error"].startswith(field), r.json()
        c.post(f"/api/tasks/{task}/skip", json={})


JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats()
    | st.text(max_size=8)
    | st.sampled_from(["0", "00", "\u00b2", "\u0663", "-1", "9" * 25, " 1"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6) | st.just("0"), inner, max_size=3),
    max_leaves=10,
)


@settings(max_examples=80, deadline=None)
@given(
    body=st.dictionaries(st.sampled_from(["ranks", "strength", "rationale", "turn_feedback", "x"]), JSON, max_size=4),
    depth=st.integers(0, 40),
)
def test_any_label_body_is_answered_4xx_or_200_never_500(open_srv, body, depth):
    _task(open_srv)
    text = json.dumps(body, allow_nan=True)
    if depth:
        text = text[:-1] + (', "deep": ' if body else '"deep": ') + _nested(depth) + "}"
    with httpx.Client(base_url=_url(open_srv), timeout=30) as c:
        task = c.post("/api/next", json={}).json()["task"]["task_id"]
        r = c.post(f"/api/tasks/{task}/label", content=text.encode(), headers={"content-type": "application/json"})
        assert r.status_code in (200, 400, 404, 409), r.text
        assert r.status_code == 200 or r.json()["error"]
        c.post(f"/api/tasks/{task}/skip", json={})


def _raw(srv) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", srv.server.http.port), timeout=30)
    return sock


def _closed(sock: socket.socket) -> bool:
    """True once the server has closed the connection (EOF or a reset), waiting up to 30 s."""
    try:
        return sock.recv(65536) == b""
    except ConnectionResetError:
        return True


def test_a_caller_leaving_mid_body_is_a_disconnect_not_a_500(open_srv, caplog):
    caplog.set_level(logging.INFO)
    task = _task(open_srv)
    httpx.post(_url(open_srv, "/api/next"), json={}, timeout=30)
    sock = _raw(open_srv)
    sock.sendall(
        f"POST /api/tasks/{task}/label HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        "Content-Length: 1000\r\n\r\n".encode()
        + b'{"ranks": [0,'
    )
    time.sleep(0.2)
    sock.close()
    wait_until(lambda: any(" 499 " in r.getMessage() for r in caplog.records))
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], "a disconnect is not an error"
    assert _labels(open_srv) == 0


def test_a_slow_request_head_is_closed_after_the_header_timeout(open_srv, caplog):
    sock = _raw(open_srv)
    sock.sendall(b"POST /api/next HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # ...and never the rest
    assert _closed(sock)
    wait_until(lambda: "no complete request head within 1 s" in caplog.text)


def test_a_body_at_one_byte_a_second_is_closed_after_the_body_timeout(open_srv):
    sock = _raw(open_srv)
    sock.sendall(
        b"POST /api/next HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 200\r\n\r\n"
    )
    sock.settimeout(0.25)
    sent, closed = 0, False
    while sent < 200 and not closed:
        try:
            sock.sendall(b" ")
            sent += 1
            closed = sock.recv(65536) == b""
        except TimeoutError:
            continue
        except (BrokenPipeError, ConnectionResetError):
            closed = True
    assert closed and sent < 200, f"the server read {sent} bytes of a 200-byte body sent at 4 bytes/s and kept going"


def test_beyond_the_connection_limit_requests_get_503_until_connections_close(home):
    open_srv = ServerThread(
        ServeSettings(port=0, http_port=0, metrics_port=-1, with_model=False, http_max_connections=MAX_CONNECTIONS)
    )
    idle = [_raw(open_srv) for _ in range(MAX_CONNECTIONS)]
    try:
        wait_until(lambda: len(open_srv.server.http._server.server_state.connections) >= len(idle))
        r = httpx.get(_url(open_srv, "/health"), timeout=30)
        assert r.status_code == 503
        for s in idle:
            s.close()
        wait_until(lambda: httpx.get(_url(open_srv, "/health"), timeout=30).status_code == 200)
    finally:
        open_srv.stop()


def _cross_site_attempts(srv, task: str, token: str | None) -> list[httpx.Response]:
    auth = {"Authorization": f"Bearer {token}"} if token else {}
    port = srv.server.http.port
    evil = {"Origin": "http://evil.example"}
    answer = json.dumps({"ranks": [0, 1]}).encode()
    with httpx.Client(base_url=_url(srv), timeout=30, headers=auth) as c:
        return [
            c.post("/api/next", content=b"", headers={"Content-Type": "text/plain"} | evil),  # a no-preflight fetch
            c.post(f"/api/tasks/{task}/label", content=answer, headers={"Content-Type": "text/plain"} | evil),
            c.post(f"/api/tasks/{task}/label", content=b"ranks=0", headers={"Content-Type": "multipart/form-data"}),
            c.post(f"/api/tasks/{task}/label", content=answer, headers={"Content-Type": "application/json"} | evil),
            c.post(
                f"/api/tasks/{task}/label",
                content=answer,
                headers={"Content-Type": "application/json", "Origin": "null"},
            ),
            c.post("/api/next", json={}, headers={"Host": f"evil.example:{port}"}),  # DNS rebinding
            c.get("/api/progress", headers={"Host": "evil.example"}),
        ]


def _assert_refused(srv, task: str, token: str | None) -> None:
    responses = _cross_site_attempts(srv, task, token)
    assert [r.status_code for r in responses] == [400, 400, 400, 403, 403, 400, 400], [r.text for r in responses]
    assert responses[0].json()["error"].startswith("content-type: must be application/json")
    assert "another site" in responses[3].json()["error"]
    assert responses[5].json()["error"].startswith("host: 'evil.example' is not a name of this server")
    assert _leased(srv) == 0 and _labels(srv) == 0  # nothing leased, no label stored


def test_no_cross_site_writes_without_tokens(home):
    open_srv = ServerThread(ServeSettings(port=0, http_port=0, metrics_port=-1, with_model=False))
    try:
        _same_origin_passes(open_srv)
    finally:
        open_srv.stop()


def _same_origin_passes(open_srv) -> None:
    task = _task(open_srv)
    _assert_refused(open_srv, task, None)
    # The page itself (same origin, JSON) and clients that send no Origin pass.
    same = {"Origin": _url(open_srv)}
    with httpx.Client(base_url=_url(open_srv), timeout=30) as c:
        assert c.post("/api/next", json={}, headers=same).json()["task"]["task_id"] == task
        assert c.post(f"/api/tasks/{task}/label", json={"ranks": [0, 1]}, headers=same).status_code == 200
        assert c.get("/health", headers={"Host": f"localhost:{open_srv.server.http.port}"}).status_code == 200
    assert _labels(open_srv) == 1


def test_no_cross_site_writes_with_tokens(home):
    srv = start()
    try:
        task = _task(srv)
        _assert_refused(srv, task, TOKENS["labeler"])
    finally:
        srv.stop()


def test_allowed_hosts_setting_and_wildcard_binds():
    from rm_service.server.http.guard import allowed_hosts

    assert allowed_hosts("127.0.0.1", []) == {"127.0.0.1", "localhost", "::1"}
    assert allowed_hosts("0.0.0.0", []) is None  # behind a Service or proxy: any name (tokens are required there)
    assert allowed_hosts("0.0.0.0", ["rm.example.org", "[::1]"]) == {"rm.example.org", "::1"}
    assert allowed_hosts("10.1.2.3", ["*"]) is None


def test_every_4xx_is_logged_with_its_reason_at_most_twenty_per_window(home, caplog):
    """Callers' mistakes are visible in the server's log (OpenRLHF turns a 400 into a silent None
    reward), and a caller repeating one cannot flood it: 20 reason lines per 10 s, the rest counted."""
    from rm_service.server.http.guard import LOG_4XX_PER_WINDOW

    srv = ServerThread(ServeSettings(port=0, http_port=0, metrics_port=-1, with_model=False))
    caplog.set_level(logging.WARNING, logger="rm_service.http")
    try:
        with httpx.Client(base_url=_url(srv), timeout=30) as c:
            for _ in range(LOG_4XX_PER_WINDOW + 5):
                assert c.post("/api/next", content=b"x", headers={"Content-Type": "text/plain"}).status_code == 400
        wait_until(lambda: len([r for r in caplog.records if "/api/next 400" in r.getMessage()]) >= LOG_4XX_PER_WINDOW)
        reasons = [
            r.getMessage() for r in caplog.records if r.name == "rm_service.http" and "/api/next 400" in r.getMessage()
        ]
        assert len(reasons) == LOG_4XX_PER_WINDOW
        assert all(m.endswith("content-type: must be application/json for POST, got 'text/plain'") for m in reasons)
    finally:
        srv.stop()
