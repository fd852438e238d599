"""PreferenceService: label ingestion and store statistics."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from rm_service.api.v1 import preference_pb2, preference_pb2_grpc
from rm_service.errors import InvalidArgument, Unimplemented
from rm_service.server.convert import STATUS_VALUES, label
from rm_service.server.rpc import rpc
from rm_service.store.db import Store


class PreferenceService(preference_pb2_grpc.PreferenceServiceServicer):
    def __init__(self, store: Store):
        self.store = store
        self.writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store-writer")  # the one writer

    @rpc
    async def IngestLabels(self, request: preference_pb2.IngestLabelsRequest, context) -> preference_pb2.IngestLabelsResponse:
        if not request.labels:
            raise InvalidArgument("labels", "must hold at least one label")
        labels = [label(pb) for pb in request.labels]
        outcomes = await asyncio.get_running_loop().run_in_executor(self.writer, self.store.ingest, labels, "dataset")
        return preference_pb2.IngestLabelsResponse(
            results=[preference_pb2.IngestResult(label_id=o.label_id, status=STATUS_VALUES[o.status], reason=o.reason) for o in outcomes]
        )

    @rpc
    async def GetStats(self, request: preference_pb2.GetStatsRequest, context) -> preference_pb2.Stats:
        stats = await asyncio.get_running_loop().run_in_executor(self.writer, self.store.stats, request.since_snapshot_id or None)
        return preference_pb2.Stats(**stats)

    @rpc
    async def SubmitCandidates(self, request, context):
        raise Unimplemented("SubmitCandidates is not implemented yet")

    @rpc
    async def LeaseTasks(self, request, context):
        raise Unimplemented("LeaseTasks is not implemented yet")
