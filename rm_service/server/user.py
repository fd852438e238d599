"""UserService.SimulateUser: the next user turn of each conversation, or its end, sampled by the
served user model; the one sampling path of gRPC and of the HTTP route (server.http.user_routes).

A call is admitted by the scoring core's admission, Score's (server.scoring, server.admission:
refused before its request is read when the queue is full, server.gate; its conversations count
as items, its tokens as the characters' estimate plus max_new_tokens per conversation; refused
at once with RESOURCE_EXHAUSTED when its deadline is too near) and runs on the model thread
between Score batches, as one unit: its conversations are one generation batch (or
several, by `generate_batch_tokens`), never mixed with another call's, so the same request and
seed sample the same turns. Callers batch by sending many conversations in one call (the
clients' ConversationEnv gathers concurrent sessions into one). A call whose caller leaves or
whose deadline passes is dropped before its turn on the model, or stops between two sampled
tokens. The version is pinned for the whole call (hot-swap lets it finish on the old model) and
named in every reply.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass

import grpc

from rm_service.api.v1 import user_pb2, user_pb2_grpc
from rm_service.conversation import Message, validate_finite, validate_turns
from rm_service.errors import InvalidArgument
from rm_service.server.admission import Ticket, estimate_tokens
from rm_service.server.convert import messages
from rm_service.server.models import Served, ServedModels
from rm_service.server.reward import ticket
from rm_service.server.rpc import rpc
from rm_service.server.scoring import ScoringCore
from rm_service.usermodel.generate import Sampling, Turn, simulate
from rm_service.usermodel.settings import UserModelSettings


@dataclass(frozen=True)
class Simulated:
    served: Served
    turns: list[Turn]
    seed: int

    @property
    def version(self) -> str:
        return self.served.record.version


class UserService(user_pb2_grpc.UserServiceServicer):
    def __init__(self, served: ServedModels, core: ScoringCore, settings: UserModelSettings, max_chars: int):
        self.served, self.core, self.settings, self.max_chars = served, core, settings, max_chars

    def sampling(
        self, temperature: float | None, top_p: float | None, max_new_tokens: int, seed: int | None
    ) -> Sampling:
        """Validated sampling parameters (None / 0: the defaults; no seed: a fresh one)."""
        temperature = 1.0 if temperature is None else temperature
        top_p = 1.0 if top_p is None else top_p
        validate_finite(temperature, "temperature", 0.0, 100.0)
        validate_finite(top_p, "top_p", 0.0, 1.0)
        if top_p <= 0:
            raise InvalidArgument("top_p", f"must be > 0, got {top_p}")
        cap = self.settings.max_new_tokens_cap
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or not 0 <= max_new_tokens <= cap:
            raise InvalidArgument(
                "max_new_tokens", f"must be an integer in [0, {cap}] (0: the default), got {max_new_tokens!r}"
            )
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64):
            raise InvalidArgument("seed", f"must be an integer in [0, 2^64), got {seed!r}")
        seed = secrets.randbits(63) if seed is None else seed
        return Sampling(float(temperature), float(top_p), max_new_tokens or self.settings.max_new_tokens, seed)

    def conversations(self, convs: list[list[Message]], field: str = "conversations") -> list[list[Message]]:
        """Validated conversations: each valid turns, a user turn, ending with an assistant turn."""
        if not convs:
            raise InvalidArgument(field, "must hold at least one conversation")
        if len(convs) > self.settings.max_conversations:
            raise InvalidArgument(
                field,
                f"holds {len(convs)} conversations; the limit per call is {self.settings.max_conversations} "
                "(RM_USER_MAX_CONVERSATIONS)",
            )
        for i, c in enumerate(convs):
            where = f"{field}[{i}].messages"
            validate_turns(c, where, self.max_chars)
            if c[-1].role != "assistant":
                raise InvalidArgument(f"{where}[{len(c) - 1}].role", "the conversation must end with an assistant turn")
            if not any(m.role == "user" for m in c):
                raise InvalidArgument(where, "holds no user turn: there is no user to simulate")
        return convs

    async def simulate(self, convs: list[list[Message]], sampling: Sampling, version: str, claim: Ticket) -> Simulated:
        """The scoring core's admission, then the model thread: the one sampling path of gRPC and HTTP."""
        served = self.served.get(version)
        max_tokens = served.runtime.spec.max_tokens
        tokens = sum(estimate_tokens([m.content for m in c], max_tokens) for c in convs)
        tokens += len(convs) * sampling.max_new_tokens
        with self.core.admit(len(convs), tokens, claim) as permit:
            turns = await self.core.batcher.run_solo(
                permit,
                tokens,
                simulate,
                served.runtime,
                convs,
                sampling,
                self.settings.generate_batch_tokens,
                permit.runnable,
                record=False,  # generation is not Score's work: it does not move the measured scoring rate
            )
        return Simulated(served, turns, sampling.seed)

    @rpc
    async def SimulateUser(self, request: user_pb2.SimulateUserRequest, context: grpc.aio.ServicerContext):
        # a full queue was refused before the request was read (server.gate.RoomGate)
        convs = self.conversations([messages(c.messages) for c in request.conversations])
        sampling = self.sampling(
            request.temperature if request.HasField("temperature") else None,
            request.top_p if request.HasField("top_p") else None,
            request.max_new_tokens,
            request.seed if request.HasField("seed") else None,
        )
        done = await self.simulate(convs, sampling, request.model_version, ticket(context))
        return user_pb2.SimulateUserResponse(
            results=[
                user_pb2.SimulatedTurn(
                    content=t.content,
                    ended=t.ended,
                    num_tokens=t.num_tokens,
                    end_probability=t.p_end if math.isfinite(t.p_end) else 0.0,
                    complete=t.complete,
                    truncated=t.truncated,
                )
                for t in done.turns
            ],
            model_version=done.version,
            seed=done.seed,
        )
