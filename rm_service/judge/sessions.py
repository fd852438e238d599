"""A reward model's ScoreTurns as the judge of SESSION tasks (`--backend turns`).

A session task is a conversation a policy played (store.session_tasks). `TurnsAnnotator` asks
the rm-service server (JudgeSettings.server) for ScoreTurns of the conversation under the
version `model` names (a stronger "gold" version the server keeps loaded: RM_SERVE_ALSO_LOAD)
and turns its scores into feedback the way `RewardAnnotator` turns rewards into a ranking:

- a thumb per assistant turn from the turn's logit: raw_score - thumb_offset for a version
  trained on thumbs (what its served P(up) = sigmoid(logit) is made of), else the turn's
  normalised reward (0 = the average completion it trained on). Up when the logit is above
  `rm_tie_margin`, down when below -rm_tie_margin, no thumb between (a tie);
- the session outcome, graded in [0, 1]: the version's P(success) when it was trained on
  outcomes, else sigmoid(sum of the turns' normalised rewards).

The numbers behind each label are kept in its metadata. How far these labels can be trusted
is measured where people gave feedback on the same turns and sessions (GetStats:
judge_human_thumb_agreement, judge_human_outcome_agreement).
"""

from __future__ import annotations

import hashlib
import json
import math

import grpc

from rm_client.channel import open_channel
from rm_client.messages import to_proto
from rm_service.api.v1 import preference_pb2, reward_pb2, reward_pb2_grpc
from rm_service.judge.backend import BackendUnavailable
from rm_service.judge.items import JudgeItem
from rm_service.judge.store_client import rpc_error

RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED)


def sigmoid(x: float) -> float:
    return 0.5 * (1.0 + math.tanh(0.5 * x))


def feedback_from_turns(
    item: JudgeItem, scored: reward_pb2.ScoreTurnsResponse, annotator: str, config: str, tie_margin: float
) -> preference_pb2.Feedback:
    """The feedback label of one session from its ScoreTurns (see the module docstring)."""
    thumbs, logits = [], {}
    for turn in scored.turns:
        p_up = turn.thumb_up if turn.HasField("thumb_up") else sigmoid(turn.reward)
        logit = math.log(p_up / (1 - p_up)) if 0 < p_up < 1 else math.copysign(math.inf, p_up - 0.5)
        logits[turn.message_index] = round(logit, 6)
        if abs(logit) > tie_margin:
            up = preference_pb2.THUMB_UP if logit > 0 else preference_pb2.THUMB_DOWN
            thumbs.append(preference_pb2.TurnThumb(message_index=turn.message_index, thumb=up))
    if scored.HasField("session_success"):
        outcome, how = float(scored.session_success), "session_success"
    else:
        outcome, how = sigmoid(sum(t.reward for t in scored.turns)), "sigmoid(sum of turn rewards)"
    return preference_pb2.Feedback(
        label_id="turns-" + hashlib.sha256(json.dumps([item.key, config]).encode()).hexdigest()[:32],
        conversation=to_proto(item.prompt),
        thumbs=thumbs,
        outcome=outcome,
        source=preference_pb2.JUDGE,
        annotator=annotator,
        task_id=item.task_id,
        metadata={
            "rm_version": scored.model_version,
            "turn_logits": json.dumps(logits, sort_keys=True),
            "session_value": f"{scored.session_value:.6f}",
            "outcome_from": how,
            "judge_template": "score-turns",
        },
    )


class TurnsAnnotator:
    """ScoreTurns of one served version (a registry version, e.g. the gold) labels sessions."""

    kinds = ("session",)

    def __init__(self, version: str, settings):
        token = settings.server_token.get_secret_value() if settings.server_token else None
        ca = settings.server_tls_ca.read_bytes() if settings.server_tls_ca else None
        self.channel = open_channel(settings.server, token, ca)
        self.stub = reward_pb2_grpc.RewardServiceStub(self.channel)
        self.version, self.settings, self.calls = version, settings, 0

    def close(self) -> None:
        self.channel.close()

    @property
    def name(self) -> str:
        return f"turns:{self.version}"

    @property
    def config(self) -> str:
        return f"{self.name}|tie={self.settings.rm_tie_margin}"

    def annotate(self, item: JudgeItem, counts) -> preference_pb2.Feedback:
        request = reward_pb2.ScoreTurnsRequest(conversation=to_proto(item.prompt), model_version=self.version)
        self.calls += 1
        try:
            scored = self.stub.ScoreTurns(request, timeout=self.settings.rpc_timeout_s)
        except grpc.RpcError as exc:
            if exc.code() in RETRYABLE:
                raise BackendUnavailable(f"ScoreTurns on {self.settings.server}: {exc.details()}") from None
            raise rpc_error(exc, f"ScoreTurns of {self.version} on {self.settings.server}") from None
        return feedback_from_turns(item, scored, self.name, self.config, self.settings.rm_tie_margin)
