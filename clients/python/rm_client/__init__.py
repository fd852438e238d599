"""rm-service-client: the light Python client of rm-service (needs only grpcio and protobuf).

    from rm_client import RewardClient
    with RewardClient("127.0.0.1:50051") as client:
        scores = client.score([[{"role": "user", "content": "Hi"}]], ["Hello!"])

Modules: client (RewardClient), aio (AsyncRewardClient), channel (open_channel: TLS, token,
message sizes), errors, messages (messages <-> rm.v1 protos), trl (GRPOTrainer's reward
function), verl (verl's compute_score), user (UserClient, AsyncUserClient: SimulateUser), env
(ConversationEnv: multi-turn sessions against the served user model), verl_interaction (verl's
BaseInteraction on that environment), api.v1 (the generated rm.v1 stubs).
"""

from rm_client.aio import AsyncRewardClient
from rm_client.channel import open_channel
from rm_client.client import RewardClient
from rm_client.errors import (
    AuthError,
    BadResponse,
    DeadlineExceeded,
    InvalidRequest,
    ScoreError,
    ServerUnavailable,
    VersionUnavailable,
)
from rm_client.retry import backoff_delays
from rm_client.scoring import ScoreResult
from rm_client.user import AsyncUserClient, SimulateResult, UserClient

__version__ = "0.1.0"
__all__ = [
    "AsyncRewardClient",
    "AsyncUserClient",
    "AuthError",
    "BadResponse",
    "DeadlineExceeded",
    "InvalidRequest",
    "RewardClient",
    "ScoreError",
    "ScoreResult",
    "ServerUnavailable",
    "SimulateResult",
    "UserClient",
    "VersionUnavailable",
    "backoff_delays",
    "open_channel",
]
