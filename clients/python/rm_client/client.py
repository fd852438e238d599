"""RewardClient: Score calls with a deadline, a retry budget, round-robin and one version per batch.

    from rm_client import RewardClient

    with RewardClient(["10.0.0.5:50051", "10.0.0.6:50051"], token="...", tls_ca=ca_pem) as client:
        scores = client.score([[{"role": "user", "content": "Hi"}]], ["Hello! How can I help?"])
        scores.rewards, scores.raw_scores, scores.uncertainty, scores.members, scores.version

- Every call carries a deadline (`timeout_s`).
- Retries: see rm_client.retry (UNAVAILABLE, RESOURCE_EXHAUSTED, NOT_FOUND of a pinned version;
  exponential backoff with jitter, each on the next address). Anything else raises the typed
  error of its cause (rm_client.errors).
- Several addresses: one channel per address, calls rotate over them (our own round-robin,
  which also sends a retry to the next replica and names the replica that failed; gRPC's
  `round_robin` policy over an `ipv4:a,b` target balances too but hides which one failed).
- Chunks of a batch after the first run in parallel, one thread per chunk in flight.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import grpc

from rm_client.api.v1 import reward_pb2, reward_pb2_grpc
from rm_client.scoring import ClientBase, ScoreResult, checked, request, result


class RewardClient(ClientBase):
    """Blocking client of rm.v1.RewardService; thread-safe. Constructor: see ClientBase."""

    def __init__(self, addresses: str | Sequence[str], *args, **kwargs):
        super().__init__(addresses, *args, **kwargs)
        self.channels: list[grpc.Channel] = self._channels(aio=False)
        self.stubs = [reward_pb2_grpc.RewardServiceStub(c) for c in self.channels]
        self._pool = ThreadPoolExecutor(max_workers=max(2, 2 * len(self.addresses)), thread_name_prefix="rm-score")

    def _call(self, fn: Callable, what: str, version: str = ""):
        """fn(stub) under the retry budget, each attempt on the next address."""
        attempts = self._attempts(what, version)
        for index in attempts:
            try:
                answer = fn(self.stubs[index])
            except grpc.RpcError as err:
                time.sleep(attempts.failed(err))
                continue
            self._answered(index)
            return answer
        raise AssertionError("unreachable: the last attempt returns or raises")

    def model_info(self, version: str = "") -> reward_pb2.ModelInfo:
        """GetModel: the version served by default (empty `version`) or a named one."""
        return self._call(
            lambda stub: stub.GetModel(reward_pb2.GetModelRequest(version=version), timeout=self.timeout_s), "GetModel"
        )

    def current_version(self) -> str:
        """The version the (first reachable) server serves by default."""
        return self.model_info().version

    def _score_chunk(self, chunk: list[reward_pb2.ScoreItem], version: str) -> reward_pb2.ScoreResponse:
        req = request(chunk, version)
        return checked(
            self._call(lambda stub: stub.Score(req, timeout=self.timeout_s), "Score", version), chunk, version
        )

    def score(self, prompts: Sequence, completions: Sequence[str], version: str = "") -> ScoreResult:
        """Scores of (prompt, completion) pairs, all from one version. A prompt is a list of
        messages (objects with role and content, or {"role", "content"} dicts). Empty
        `version`: the server's default version answers the first chunk and the rest are pinned to it."""
        chunks = self._chunks(prompts, completions)
        responses = []
        if not version:
            responses.append(self._score_chunk(chunks.pop(0), ""))
            version = responses[0].model_version
        responses += list(self._pool.map(lambda chunk: self._score_chunk(chunk, version), chunks))
        return result(responses)

    def close(self) -> None:
        self._pool.shutdown(wait=False)
        for c in self.channels:
            c.close()

    def __enter__(self) -> RewardClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
