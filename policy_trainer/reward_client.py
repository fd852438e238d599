"""Scores from the reward server: deadlines, bounded retries, one pinned version, round-robin.

- Every Score call carries a deadline (`timeout_s`).
- UNAVAILABLE and RESOURCE_EXHAUSTED (overload) are retried up to `max_retries` times with
  exponential backoff and jitter, each retry on the next address. NOT_FOUND for a pinned
  version is retried the same way: a replica may not have loaded a just-promoted version yet.
- The whole batch is pinned to one reward-model version through `model_version`; a response
  from another version is an error (never mixed into a batch).
- Anything else, or retries used up, raises ScoreError naming the cause: a failed score
  stops the step. Never a silent zero.
- Several addresses: requests rotate over one channel per address (our own round-robin,
  which also sends a retry to the next replica and works for host names; gRPC's `round_robin`
  policy over an `ipv4:a,b` target would balance too but hides which replica failed).
"""

from __future__ import annotations

import itertools
import logging
import math
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import numpy as np

from rm_service.api.v1 import common_pb2, reward_pb2, reward_pb2_grpc
from rm_service.conversation import Message

log = logging.getLogger(__name__)
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)


class ScoreError(RuntimeError):
    """Scoring a batch failed; the step cannot go on."""


class VersionUnavailable(ScoreError):
    """The pinned reward-model version is not loaded by the server (retries used up)."""


@dataclass
class Scores:
    rewards: np.ndarray  # [N] normalised served reward
    raw: np.ndarray  # [N]
    uncertainty: np.ndarray  # [N]
    truncated: np.ndarray  # [N] bool
    version: str
    members: np.ndarray | None = None  # [N, K] raw score of each ensemble member (K = 1 for a single head)


def open_channel(address: str, token: str | None = None, tls_ca: bytes | None = None, options=()) -> grpc.Channel:
    """A channel to one address; TLS when a CA bundle is given, a bearer token on every call."""
    options = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20), *options]
    if tls_ca is None and token is None:
        return grpc.insecure_channel(address, options=options)
    if tls_ca is None:  # a token over plaintext: only sensible on loopback, as the server itself enforces
        channel = grpc.insecure_channel(address, options=options)
        return grpc.intercept_channel(channel, _BearerToken(token))
    credentials = grpc.ssl_channel_credentials(root_certificates=tls_ca)
    if token is not None:
        credentials = grpc.composite_channel_credentials(credentials, grpc.access_token_call_credentials(token))
    return grpc.secure_channel(address, credentials, options=options)


class _BearerToken(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    def __init__(self, token: str):
        self.header = ("authorization", f"Bearer {token}")

    def _details(self, details):
        return details._replace(metadata=[*(details.metadata or []), self.header])

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)


def backoff_delays(first: float, cap: float, retries: int, rng: random.Random) -> list[float]:
    """Exponential backoff with full jitter: retry k waits uniform(0.5, 1) * min(cap, first * 2^k)."""
    return [min(cap, first * 2**k) * rng.uniform(0.5, 1.0) for k in range(retries)]


class RewardClient:
    def __init__(self, addresses: list[str], timeout_s: float = 60.0, max_retries: int = 4, backoff_s: float = 0.2,
                 backoff_max_s: float = 5.0, chunk_items: int = 64, token: str | None = None, tls_ca: bytes | None = None):
        if not addresses:
            raise ValueError("at least one reward server address is needed")
        self.addresses = list(addresses)
        self.channels = [open_channel(a, token, tls_ca) for a in self.addresses]
        self.stubs = [reward_pb2_grpc.RewardServiceStub(c) for c in self.channels]
        self.timeout_s, self.max_retries = timeout_s, max_retries
        self.backoff_s, self.backoff_max_s = backoff_s, backoff_max_s
        self.chunk_items = chunk_items
        self._next = itertools.count()
        self._lock = threading.Lock()
        self._rng = random.Random()  # jitter only; never part of the training's RNG state
        self._pool = ThreadPoolExecutor(max_workers=max(2, 2 * len(self.addresses)), thread_name_prefix="score")
        self.calls_per_address = [0] * len(self.addresses)  # answered Score calls, for metrics and tests

    def _pick(self) -> int:
        with self._lock:
            return next(self._next) % len(self.stubs)

    def current_version(self) -> str:
        """The version the (first reachable) server serves by default."""
        info = self._call(lambda stub: stub.GetModel(reward_pb2.GetModelRequest(), timeout=self.timeout_s), "GetModel")
        return info.version

    def _call(self, fn, what: str, version: str = ""):
        """fn(stub) with bounded retries on retryable codes, each attempt on the next address."""
        delays = backoff_delays(self.backoff_s, self.backoff_max_s, self.max_retries, self._rng)
        for attempt in range(self.max_retries + 1):
            index = self._pick()
            try:
                result = fn(self.stubs[index])
                with self._lock:
                    self.calls_per_address[index] += 1
                return result
            except grpc.RpcError as err:
                code = err.code()
                retryable = code in RETRYABLE or (code == grpc.StatusCode.NOT_FOUND and version)
                where = f"{what} on {self.addresses[index]}"
                if not retryable or attempt == self.max_retries:
                    tries = f" after {attempt + 1} attempts" if attempt else ""
                    if code == grpc.StatusCode.NOT_FOUND and version:
                        raise VersionUnavailable(f"{where}: reward-model version {version!r} is not loaded{tries}: {err.details()}") from None
                    raise ScoreError(f"{where} failed{tries}: {code.name}: {err.details()}") from None
                log.warning("%s: %s (%s); retry %d/%d in %.2fs", where, code.name, err.details(), attempt + 1, self.max_retries, delays[attempt])
                time.sleep(delays[attempt])
        raise AssertionError("unreachable")

    def _score_chunk(self, items: list[reward_pb2.ScoreItem], version: str) -> reward_pb2.ScoreResponse:
        request = reward_pb2.ScoreRequest(items=items, model_version=version)
        response = self._call(lambda stub: stub.Score(request, timeout=self.timeout_s), "Score", version)
        if len(response.results) != len(items) or any(r.id != i.id for r, i in zip(response.results, items)):
            raise ScoreError(f"Score answered {len(response.results)} results for {len(items)} items, or out of order")
        if version and response.model_version != version:
            raise ScoreError(f"Score pinned to {version!r} was answered by {response.model_version!r}")
        return response

    def score(self, prompts: list[list[Message]], completions: list[str], version: str = "") -> Scores:
        """Scores of (prompt, completion) pairs, all from one version. Empty `version`: the
        server's default version answers the first chunk and the rest are pinned to it."""
        if len(prompts) != len(completions):
            raise ValueError("one prompt per completion")
        items = [reward_pb2.ScoreItem(id=str(i), prompt=[common_pb2.Message(role=m.role, content=m.content) for m in p], completion=c)
                 for i, (p, c) in enumerate(zip(prompts, completions))]
        chunks = [items[i : i + self.chunk_items] for i in range(0, len(items), self.chunk_items)]
        responses = []
        if not version:
            responses.append(self._score_chunk(chunks.pop(0), ""))
            version = responses[0].model_version
        responses += list(self._pool.map(lambda chunk: self._score_chunk(chunk, version), chunks))
        results = [r for resp in responses for r in resp.results]
        rewards = np.array([r.reward for r in results], dtype=np.float64)
        bad = [i for i, x in enumerate(rewards) if not math.isfinite(x)]
        if bad:
            raise ScoreError(f"the reward server returned non-finite rewards for items {bad[:5]} (version {version})")
        members = np.array([list(r.members) or [r.raw_score] for r in results], dtype=np.float64)  # [N, K]
        return Scores(rewards, np.array([r.raw_score for r in results]), np.array([r.uncertainty for r in results]),
                      np.array([r.truncated for r in results], dtype=bool), version, members)

    def close(self) -> None:
        self._pool.shutdown(wait=False)
        for c in self.channels:
            c.close()
