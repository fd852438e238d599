"""Shared by the labeling-page tests: a real server with tokens and the page on port 0, tasks in
its queue, HTTP clients per role."""

from __future__ import annotations

import secrets

import httpx
from conftest import ServerThread
from pydantic import SecretStr

from rm_service.conversation import Message
from rm_service.server.auth import identity
from rm_service.settings import SecuritySettings, ServeSettings
from rm_service.store import tasks

TOKENS = {role: f"{role}-{secrets.token_urlsafe(24)}" for role in ("scorer", "labeler", "admin")}
SECOND_LABELER = f"labeler-{secrets.token_urlsafe(24)}"
CHAT = [
    Message("user", "How do I keep basil alive on a windowsill?"),
    Message("assistant", "Give it six hours of sun, and water when the top of the soil is dry."),
    Message("user", "It keeps wilting anyway. What else?"),
]
REPLIES = [
    "Check the drainage: a pot without holes drowns the roots.",
    "Pinch off the flower buds, and move it away from cold glass at night.",
    "Basil is an annual; it will die eventually whatever you do.",
]


def annotator(token: str, role: str = "labeler") -> str:
    return identity(role, token)


def start(tls: dict | None = None, **serve) -> ServerThread:
    """A server with the store, the labeling page and the tokens of TOKENS (+ SECOND_LABELER);
    `tls` sets SecuritySettings' tls_* fields."""
    entries = [f"{role}:{token}" for role, token in TOKENS.items()] + [f"labeler:{SECOND_LABELER}"]
    files = {"tokens_file": None, "tls_cert": None, "tls_key": None, "tls_client_ca": None} | (tls or {})
    security = SecuritySettings(tokens=SecretStr(",".join(entries)), **files)
    settings = {"port": 0, "http_port": 0, "metrics_port": -1, "with_model": False, **serve}
    return ServerThread(ServeSettings(**settings), security=security)


def url(srv: ServerThread) -> str:
    return f"http://127.0.0.1:{srv.server.http.port}"


def client(srv: ServerThread, token: str | None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    headers["Content-Type"] = "application/json"  # every state-changing call is JSON (the page sends it too)
    return httpx.Client(base_url=url(srv), headers=headers, timeout=30)


def submit(srv: ServerThread, completions: list[str], prompt: list[Message] = CHAT, priority: int = 0) -> str:
    """Queue one task through the store's own submit (what SubmitCandidates calls)."""
    [task_id] = tasks.submit(
        srv.server.store, [tasks.Candidate(prompt, completions, policy_version="step-1", priority=priority)]
    )
    return task_id


def rows(srv: ServerThread, sql: str, params=None) -> list[tuple]:
    with srv.server.store._lock:
        return srv.server.store.con.execute(sql, params or []).fetchall()
