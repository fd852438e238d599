"""The rm.v1 messages and stubs: one generated copy, the light client's (rm_client.api.v1, from
proto/ by tools/gen_proto.py), which the service depends on. Registering the same .proto files
from two generated copies in one process would rely on the protobuf backend tolerating it."""

from rm_client.api.v1 import (
    common_pb2,
    common_pb2_grpc,
    preference_pb2,
    preference_pb2_grpc,
    reward_pb2,
    reward_pb2_grpc,
    training_pb2,
    training_pb2_grpc,
    user_pb2,
    user_pb2_grpc,
)

__all__ = [
    "common_pb2",
    "common_pb2_grpc",
    "preference_pb2",
    "preference_pb2_grpc",
    "reward_pb2",
    "reward_pb2_grpc",
    "training_pb2",
    "training_pb2_grpc",
    "user_pb2",
    "user_pb2_grpc",
]
