"""A small gRPC client for rm-service (used by the demo, the tests and scripts)."""

from __future__ import annotations

import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rm_service.api.v1 import common_pb2, preference_pb2_grpc, reward_pb2, reward_pb2_grpc, training_pb2_grpc
from rm_service.conversation import Message


def score_item(prompt: list[Message], completion: str, item_id: str = "") -> reward_pb2.ScoreItem:
    return reward_pb2.ScoreItem(id=item_id, prompt=[common_pb2.Message(role=m.role, content=m.content) for m in prompt],
                                completion=completion)


class Client:
    def __init__(self, address: str):
        self.channel = grpc.insecure_channel(address)
        self.reward = reward_pb2_grpc.RewardServiceStub(self.channel)
        self.preference = preference_pb2_grpc.PreferenceServiceStub(self.channel)
        self.training = training_pb2_grpc.TrainingServiceStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    def wait_serving(self, timeout: float, is_alive=lambda: True) -> None:
        """Poll grpc.health.v1 until SERVING; raises TimeoutError after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not is_alive():
                raise RuntimeError("the server exited before it became SERVING")
            try:
                status = self.health.Check(health_pb2.HealthCheckRequest(), timeout=2).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.25)
        raise TimeoutError(f"server not SERVING after {timeout:.0f}s")

    def close(self) -> None:
        self.channel.close()
