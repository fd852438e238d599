"""Typed errors of the client: each names the call, the address, the status code and its cause.

ScoreError                  any failed call (its `code` is the gRPC status code's name)
├── ServerUnavailable       UNAVAILABLE or RESOURCE_EXHAUSTED after the retry budget
├── VersionUnavailable      a pinned version still NOT_FOUND after the retry budget
├── DeadlineExceeded        a call ran past its deadline (not retried: it is the caller's bound)
├── InvalidRequest          INVALID_ARGUMENT: the server names the field
├── AuthError               UNAUTHENTICATED or PERMISSION_DENIED (a missing, wrong or under-privileged token)
└── BadResponse             an answer that breaks the contract (count, order, version, a non-finite reward)
"""

from __future__ import annotations


class ScoreError(RuntimeError):
    """Scoring (or another call) failed; a failed score is an error, never a silent zero."""

    def __init__(self, message: str, code: str | None = None, address: str | None = None, attempts: int = 1):
        super().__init__(message)
        self.code, self.address, self.attempts = code, address, attempts


class ServerUnavailable(ScoreError):
    """No server answered within the retry budget (down, draining, loading, or overloaded)."""


class VersionUnavailable(ScoreError):
    """The pinned reward-model version is not loaded by the server (retries used up)."""


class DeadlineExceeded(ScoreError):
    """A call ran past its deadline."""


class InvalidRequest(ScoreError):
    """The server refused the request as invalid; the message names the field."""


class AuthError(ScoreError):
    """The server refused the token (UNAUTHENTICATED) or its role (PERMISSION_DENIED)."""


class BadResponse(ScoreError):
    """The server's answer breaks the API's contract."""


BY_CODE = {
    "UNAVAILABLE": ServerUnavailable,
    "RESOURCE_EXHAUSTED": ServerUnavailable,
    "DEADLINE_EXCEEDED": DeadlineExceeded,
    "INVALID_ARGUMENT": InvalidRequest,
    "UNAUTHENTICATED": AuthError,
    "PERMISSION_DENIED": AuthError,
}
