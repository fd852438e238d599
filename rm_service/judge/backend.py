"""What a judge backend does, the errors it raises, and how settings pick one.

A backend answers two questions about a chat (a list of Messages ending with the user turn):
`generate` returns the assistant's text; `choose` returns the log-probability of each
allowed label (e.g. "A", "B") as the assistant's next token. `choose` takes several chats at
once so a backend may share work between them (the local backend computes the common
prefix of the two orders of a pair once).
"""

from __future__ import annotations

from typing import Protocol

from rm_service.conversation import Message
from rm_service.errors import FailedPrecondition, Unavailable


class BackendUnavailable(Unavailable):
    """The backend did not answer after its retries (timeouts, connection errors, 429/5xx)."""


class BackendRefused(FailedPrecondition):
    """The backend refused the request (4xx other than 429, a malformed response): retrying
    cannot help, so the run stops."""


class JudgeBackend(Protocol):
    model_id: str

    def generate(self, chat: list[Message], max_new_tokens: int, temperature: float) -> str: ...

    def choose(self, chats: list[list[Message]], labels: tuple[str, ...]) -> list[dict[str, float]]: ...

    def close(self) -> None: ...
