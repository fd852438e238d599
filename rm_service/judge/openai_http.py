"""The HTTP judge: any OpenAI-compatible chat-completions endpoint (vLLM, llama.cpp server,
hosted APIs), through httpx.

Each request may be retried: after a timeout, a connection error, 429 or a 5xx, it waits
`backoff_s * 2**retry` (times a random factor in [0.5, 1], capped at `max_backoff_s`, at least
the server's Retry-After) and tries again, up to `max_retries` times; then BackendUnavailable.
Any other 4xx, or a 200 whose body is not a chat completion, is BackendRefused (no retry).
At most `concurrency` requests are open at once, however many threads call.

`choose` asks for one token with `logprobs` and `top_logprobs`, and reads the log-probability
of each label from the top list (tokens that spell the label, ignoring surrounding spaces,
summed); a label not in the list gets -inf, which the verdict parser treats as unparseable.
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time

import httpx

from rm_service.conversation import Message
from rm_service.judge.backend import BackendRefused, BackendUnavailable

log = logging.getLogger(__name__)
RETRY_STATUS = frozenset({429, 500, 502, 503, 504})


class OpenAIBackend:
    def __init__(self, settings, model: str):
        self.model_id = model
        self.settings = settings
        self.url = settings.base_url.rstrip("/") + "/chat/completions"
        headers = {"Authorization": f"Bearer {settings.api_key.get_secret_value()}"} if settings.api_key else {}
        self.client = httpx.Client(
            timeout=settings.timeout_s, headers=headers, limits=httpx.Limits(max_connections=settings.concurrency)
        )
        self._slots = threading.BoundedSemaphore(settings.concurrency)

    def close(self) -> None:
        self.client.close()

    def generate(self, chat: list[Message], max_new_tokens: int, temperature: float) -> str:
        body = self._post(
            {"messages": [m.as_dict() for m in chat], "max_tokens": max_new_tokens, "temperature": temperature}
        )
        try:
            return body["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            raise BackendRefused(f"{self.url} answered without choices[0].message.content") from None

    def choose(self, chats: list[list[Message]], labels: tuple[str, ...]) -> list[dict[str, float]]:
        return [self._choose_one(chat, labels) for chat in chats]

    def _choose_one(self, chat: list[Message], labels: tuple[str, ...]) -> dict[str, float]:
        body = self._post(
            {
                "messages": [m.as_dict() for m in chat],
                "max_tokens": 1,
                "temperature": 0.0,
                "logprobs": True,
                "top_logprobs": self.settings.top_logprobs,
            }
        )
        try:
            top = body["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
            pairs = [(entry["token"], float(entry["logprob"])) for entry in top]
        except (KeyError, IndexError, TypeError, ValueError):
            raise BackendRefused(
                f"{self.url} answered without choices[0].logprobs.content[0].top_logprobs; "
                "choice mode needs a server that returns logprobs (else use decision=generate)"
            ) from None
        return {label: _logsumexp([lp for token, lp in pairs if token.strip() == label]) for label in labels}

    def _post(self, payload: dict) -> dict:
        """POST one chat completion, retrying transient failures with exponential backoff."""
        payload = {"model": self.model_id, **payload}
        s = self.settings
        for retry in range(s.max_retries + 1):
            try:
                with self._slots:
                    response = self.client.post(self.url, json=payload)
            except httpx.TimeoutException:
                problem, retry_after = f"no answer within {s.timeout_s:g}s", 0.0
            except httpx.TransportError as exc:
                problem, retry_after = f"{type(exc).__name__}: {exc}", 0.0
            else:
                if response.status_code == 200:
                    try:
                        return response.json()
                    except ValueError:
                        raise BackendRefused(f"{self.url} answered 200 with a body that is not JSON") from None
                if response.status_code not in RETRY_STATUS:
                    raise BackendRefused(f"{self.url} answered {response.status_code}: {response.text[:300]}")
                problem, retry_after = f"HTTP {response.status_code}", _retry_after(response)
            if retry == s.max_retries:
                raise BackendUnavailable(f"judge backend {self.url} failed {s.max_retries + 1} times; last: {problem}")
            delay = max(
                min(s.max_backoff_s, s.backoff_s * 2**retry) * random.uniform(0.5, 1.0),
                min(retry_after, s.max_backoff_s),
            )
            log.warning(
                "judge backend %s: %s; retry %d/%d in %.2fs", self.url, problem, retry + 1, s.max_retries, delay
            )
            time.sleep(delay)
        raise AssertionError("unreachable")


def _retry_after(response: httpx.Response) -> float:
    try:
        return max(0.0, float(response.headers.get("retry-after", 0)))
    except ValueError:
        return 0.0


def _logsumexp(values: list[float]) -> float:
    if not values:
        return -math.inf
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))
