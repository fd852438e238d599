"""What the sync and asyncio clients share: their settings, the request's chunks, the checks on
each answer, and the result.

A batch is scored from one reward-model version: its items are sent in chunks of
`chunk_items`, every chunk pinned (`model_version`) to the version asked for or, when none
was, to the one that answered the first chunk; an answer from another version, with another
count or order of results, or with a non-finite reward is an error (BadResponse).
"""

from __future__ import annotations

import itertools
import math
import random
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from rm_client.api.v1 import reward_pb2
from rm_client.channel import MAX_MESSAGE_BYTES, open_channel
from rm_client.errors import BadResponse
from rm_client.messages import score_item
from rm_client.retry import Attempts, RetryPolicy


@dataclass(frozen=True)
class ScoreResult:
    """Scores of N (prompt, completion) items, all from one version, in the order given."""

    rewards: list[float]  # normalised with the version's served statistics: what a policy optimises
    raw_scores: list[float]  # the model's output: the mean over the ensemble members
    uncertainty: list[float]  # the members' standard deviation (0 for a single head)
    members: list[list[float]]  # [N][K]: each ensemble member's raw score (K = 1 for a single head)
    truncated: list[bool]  # the item was cut to the model's max tokens (the start of the conversation went)
    num_tokens: list[int]
    version: str
    format_hash: str

    def __len__(self) -> int:
        return len(self.rewards)


class ClientBase:
    """Addresses, deadline, retry budget, chunking and channel settings of a reward client."""

    def __init__(
        self,
        addresses: str | Sequence[str],
        timeout_s: float = 60.0,
        max_retries: int = 4,
        backoff_s: float = 0.2,
        backoff_max_s: float = 5.0,
        chunk_items: int = 64,
        token: str | None = None,
        tls_ca: bytes | None = None,
        *,
        tls_cert: bytes | None = None,
        tls_key: bytes | None = None,
        tls_name: str | None = None,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
    ):
        self.addresses = [addresses] if isinstance(addresses, str) else list(addresses)
        if not self.addresses or not all(isinstance(a, str) and a.strip() for a in self.addresses):
            raise ValueError(f"at least one reward server address (host:port) is needed, got {addresses!r}")
        if timeout_s <= 0 or chunk_items <= 0:
            raise ValueError(f"timeout_s and chunk_items must be > 0, got {timeout_s} and {chunk_items}")
        self.timeout_s, self.chunk_items = timeout_s, chunk_items
        self.policy = RetryPolicy(max_retries, backoff_s, backoff_max_s)
        self._channel_kwargs: dict[str, Any] = dict(
            token=token,
            tls_ca=tls_ca,
            tls_cert=tls_cert,
            tls_key=tls_key,
            tls_name=tls_name,
            max_message_bytes=max_message_bytes,
        )
        self._next = itertools.count()
        self._lock = threading.Lock()
        self._rng = random.Random()  # jitter only; never part of a training run's RNG state
        self.calls_per_address = [0] * len(self.addresses)  # answered calls, for metrics and tests

    def _channels(self, aio: bool) -> list:
        return [open_channel(a, aio=aio, **self._channel_kwargs) for a in self.addresses]

    def _pick(self) -> int:
        with self._lock:
            return next(self._next) % len(self.addresses)

    def _attempts(self, what: str, version: str = "") -> Attempts:
        return Attempts(self.policy, self._rng, self._pick, self.addresses, what, version)

    def _answered(self, index: int) -> None:
        with self._lock:
            self.calls_per_address[index] += 1

    def _chunks(self, prompts: Sequence, completions: Sequence[str]) -> list[list[reward_pb2.ScoreItem]]:
        if len(prompts) != len(completions):
            raise ValueError(
                f"one prompt per completion: got {len(prompts)} prompts and {len(completions)} completions"
            )
        if not completions:
            raise ValueError("nothing to score: no completions")
        items = []
        for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
            if not isinstance(c, str):
                raise ValueError(f"completions[{i}]: expected a string, got {type(c).__name__}")
            items.append(score_item(p, c, str(i)))
        return [items[i : i + self.chunk_items] for i in range(0, len(items), self.chunk_items)]


def request(chunk: list[reward_pb2.ScoreItem], version: str) -> reward_pb2.ScoreRequest:
    return reward_pb2.ScoreRequest(items=chunk, model_version=version)


def checked(
    response: reward_pb2.ScoreResponse, chunk: list[reward_pb2.ScoreItem], version: str
) -> reward_pb2.ScoreResponse:
    if len(response.results) != len(chunk) or any(r.id != i.id for r, i in zip(response.results, chunk, strict=True)):
        raise BadResponse(f"Score answered {len(response.results)} results for {len(chunk)} items, or out of order")
    if version and response.model_version != version:
        raise BadResponse(f"Score pinned to {version!r} was answered by {response.model_version!r}")
    return response


def result(responses: list[reward_pb2.ScoreResponse]) -> ScoreResult:
    results = [r for resp in responses for r in resp.results]
    version = responses[0].model_version
    bad = [i for i, r in enumerate(results) if not math.isfinite(r.reward)]
    if bad:
        raise BadResponse(f"the reward server returned non-finite rewards for items {bad[:5]} (version {version})")
    return ScoreResult(
        rewards=[r.reward for r in results],
        raw_scores=[r.raw_score for r in results],
        uncertainty=[r.uncertainty for r in results],
        members=[list(r.members) or [r.raw_score] for r in results],
        truncated=[r.truncated for r in results],
        num_tokens=[r.num_tokens for r in results],
        version=version,
        format_hash=responses[0].format_hash,
    )
