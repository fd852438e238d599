"""The judge's connection to the rm-service store server: LeaseTasks and IngestLabels.

A failed call becomes the RMError of its status code (the inverse of errors.STATUS_CODES),
so the CLI prints one line instead of a traceback.
"""

from __future__ import annotations

from pathlib import Path

import grpc

from rm_client.channel import open_channel
from rm_service.api.v1 import preference_pb2, preference_pb2_grpc
from rm_service.errors import STATUS_CODES, InvalidArgument, RMError, Unavailable

CONNECT_TIMEOUT_S = 10.0


class StoreClient:
    def __init__(self, address: str, token: str | None = None, timeout_s: float = 30.0, tls_ca: Path | None = None):
        self.address = address
        self.timeout_s = timeout_s
        self.channel = open_channel(
            address, token, tls_ca.read_bytes() if tls_ca else None
        )  # TLS and the token on every call
        try:
            grpc.channel_ready_future(self.channel).result(timeout=min(timeout_s, CONNECT_TIMEOUT_S))
        except grpc.FutureTimeoutError:
            self.channel.close()
            raise Unavailable(
                f"cannot reach the rm-service server at {address}; start `rm-service serve` "
                "(or `serve --no-model`) or pass --address / RM_JUDGE_SERVER"
            ) from None
        self.stub = preference_pb2_grpc.PreferenceServiceStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def lease(
        self, owner: str, max_tasks: int, lease_seconds: int, kinds: tuple[str, ...] = ("ranking",)
    ) -> list[preference_pb2.Task]:
        request = preference_pb2.LeaseTasksRequest(
            owner=owner,
            max_tasks=max_tasks,
            lease_seconds=lease_seconds,
            kinds=[preference_pb2.SESSION if k == "session" else preference_pb2.RANKING for k in kinds],
        )
        return list(self._call(self.stub.LeaseTasks, request, "LeaseTasks").tasks)

    def ingest(self, label: preference_pb2.Label) -> preference_pb2.IngestResult:
        return self._call(
            self.stub.IngestLabels, preference_pb2.IngestLabelsRequest(labels=[label]), "IngestLabels"
        ).results[0]

    def ingest_feedback(self, feedback: preference_pb2.Feedback) -> preference_pb2.IngestResult:
        return self._call(
            self.stub.IngestFeedback, preference_pb2.IngestFeedbackRequest(feedback=[feedback]), "IngestFeedback"
        ).results[0]

    def stats(self) -> preference_pb2.Stats:
        return self._call(self.stub.GetStats, preference_pb2.GetStatsRequest(), "GetStats")

    def _call(self, method, request, name: str):
        try:
            return method(request, timeout=self.timeout_s)
        except grpc.RpcError as exc:
            raise rpc_error(exc, f"{name} on {self.address}") from None


def rpc_error(exc: grpc.RpcError, what: str) -> RMError:
    """The RMError whose status code the call failed with (RMError itself for INTERNAL and others)."""
    code, details = exc.code(), exc.details()
    for cls, status in STATUS_CODES.items():
        if status == code:
            return InvalidArgument(what, details) if cls is InvalidArgument else cls(f"{what}: {details}")
    return RMError(f"{what}: {code.name}: {details}")
