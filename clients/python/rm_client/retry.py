"""The retry budget of a call: which codes are retried, how long to wait, which address is next.

- UNAVAILABLE (down, draining, still loading) and RESOURCE_EXHAUSTED (overload: the server
  refuses at once rather than queue) are retried up to `max_retries` times with exponential
  backoff and full jitter, each retry on the next address (round-robin).
- NOT_FOUND for a pinned version is retried the same way: a replica may not have loaded a
  just-promoted version yet.
- A refusal's `grpc-retry-pushback-ms` trailer is a floor on the wait: the server says when it
  will have room (the channel's own retries, rm_client.channel.SERVICE_CONFIG, come first).
- Anything else, or the budget used up, raises the typed error of its code (rm_client.errors).
  DEADLINE_EXCEEDED is not retried: each call's deadline is the caller's bound.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import grpc

from rm_client.errors import BY_CODE, ScoreError, VersionUnavailable

log = logging.getLogger("rm_client")
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)


@dataclass(frozen=True)
class RetryPolicy:
    max_retries: int = 4
    backoff_s: float = 0.2
    backoff_max_s: float = 5.0

    def __post_init__(self):
        if self.max_retries < 0 or self.backoff_s < 0 or self.backoff_max_s < 0:
            raise ValueError(f"retry settings must be >= 0, got {self}")


def backoff_delays(first: float, cap: float, retries: int, rng: random.Random) -> list[float]:
    """Exponential backoff with full jitter: retry k waits uniform(0.5, 1) * min(cap, first * 2^k)."""
    return [min(cap, first * 2**k) * rng.uniform(0.5, 1.0) for k in range(retries)]


def pushback_s(err: grpc.RpcError) -> float:
    """The seconds the server asked the caller to wait (`grpc-retry-pushback-ms`), else 0."""
    try:
        trailers = err.trailing_metadata() or ()
    except Exception:  # noqa: BLE001 - an error raised before the call had trailers
        return 0.0
    for key, value in trailers:
        if key == "grpc-retry-pushback-ms":
            try:
                return max(0.0, int(value) / 1000)
            except ValueError:
                return 0.0
    return 0.0


class Attempts:
    """The attempts of one call. Iterating yields the index of the address each attempt uses;
    `failed(err)` returns how long to wait before the next one, or raises the typed error.

        for index in (attempts := Attempts(...)):
            try:
                return call(stubs[index])
            except grpc.RpcError as err:
                time.sleep(attempts.failed(err))
    """

    def __init__(
        self,
        policy: RetryPolicy,
        rng: random.Random,
        pick: Callable[[], int],
        addresses: Sequence[str],
        what: str,
        version: str = "",
    ):
        self.policy, self.pick, self.addresses, self.what, self.version = policy, pick, addresses, what, version
        self.delays = backoff_delays(policy.backoff_s, policy.backoff_max_s, policy.max_retries, rng)
        self.attempt, self.index = 0, 0

    def __iter__(self) -> Iterator[int]:
        for attempt in range(self.policy.max_retries + 1):
            self.attempt, self.index = attempt, self.pick()
            yield self.index

    def failed(self, err: grpc.RpcError) -> float:
        code, details = err.code(), err.details()
        missing_version = code == grpc.StatusCode.NOT_FOUND and bool(self.version)
        where = f"{self.what} on {self.addresses[self.index]}"
        if (code in RETRYABLE or missing_version) and self.attempt < self.policy.max_retries:
            delay = max(self.delays[self.attempt], pushback_s(err))
            log.warning(
                "%s: %s (%s); retry %d/%d in %.2fs",
                where,
                code.name,
                details,
                self.attempt + 1,
                self.policy.max_retries,
                delay,
            )
            return delay
        attempts = self.attempt + 1
        tries = f" after {attempts} attempts" if attempts > 1 else ""
        if missing_version:
            raise VersionUnavailable(
                f"{where}: reward-model version {self.version!r} is not loaded{tries}: {details}",
                code.name,
                self.addresses[self.index],
                attempts,
            ) from None
        cls = BY_CODE.get(code.name, ScoreError)
        raise cls(
            f"{where} failed{tries}: {code.name}: {details}", code.name, self.addresses[self.index], attempts
        ) from None
