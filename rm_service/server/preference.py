"""PreferenceService: label ingestion (group commit), the labeling queue, statistics."""

from __future__ import annotations

import asyncio

from rm_service.api.v1 import preference_pb2, preference_pb2_grpc
from rm_service.errors import InvalidArgument
from rm_service.server.convert import STATUS_VALUES, candidate, feedback, label, session_candidate, task, task_kinds
from rm_service.server.rpc import rpc
from rm_service.store import session_tasks, tasks
from rm_service.store.db import Store
from rm_service.store.writer import GroupCommitWriter

MAX_LEASE_SECONDS = 24 * 3600
MAX_TASKS_PER_LEASE = 1000


class PreferenceService(preference_pb2_grpc.PreferenceServiceServicer):
    def __init__(self, store: Store, writer: GroupCommitWriter):
        self.store = store
        self.writer = writer

    @rpc
    async def IngestLabels(
        self, request: preference_pb2.IngestLabelsRequest, context
    ) -> preference_pb2.IngestLabelsResponse:
        if not request.labels:
            raise InvalidArgument("labels", "must hold at least one label")
        outcomes = await self.writer.ingest([label(pb) for pb in request.labels])
        return _ingest_response(outcomes)

    @rpc
    async def IngestFeedback(
        self, request: preference_pb2.IngestFeedbackRequest, context
    ) -> preference_pb2.IngestLabelsResponse:
        """Thumbs and session outcomes (store.feedback), through the same group commit; a bad
        item is REJECTED alone, naming its field."""
        if not request.feedback:
            raise InvalidArgument("feedback", "must hold at least one feedback label")
        outcomes = await self.writer.ingest(
            [feedback(pb, f"feedback[{i}]") for i, pb in enumerate(request.feedback)], field="feedback"
        )
        return _ingest_response(outcomes)

    @rpc
    async def GetStats(self, request: preference_pb2.GetStatsRequest, context) -> preference_pb2.Stats:
        stats = await asyncio.to_thread(self.store.stats, request.since_snapshot_id or None)
        return preference_pb2.Stats(**stats)

    @rpc
    async def SubmitCandidates(
        self, request: preference_pb2.SubmitCandidatesRequest, context
    ) -> preference_pb2.SubmitCandidatesResponse:
        if not request.candidates:
            raise InvalidArgument("candidates", "must hold at least one candidate")
        ids = await asyncio.to_thread(tasks.submit, self.store, [candidate(c) for c in request.candidates])
        return preference_pb2.SubmitCandidatesResponse(task_ids=ids)

    @rpc
    async def SubmitSessions(
        self, request: preference_pb2.SubmitSessionsRequest, context
    ) -> preference_pb2.SubmitCandidatesResponse:
        if not request.sessions:
            raise InvalidArgument("sessions", "must hold at least one session")
        ids = await asyncio.to_thread(
            session_tasks.submit_sessions, self.store, [session_candidate(c) for c in request.sessions]
        )
        return preference_pb2.SubmitCandidatesResponse(task_ids=ids)

    @rpc
    async def LeaseTasks(self, request: preference_pb2.LeaseTasksRequest, context) -> preference_pb2.LeaseTasksResponse:
        if request.max_tasks > MAX_TASKS_PER_LEASE:
            raise InvalidArgument("max_tasks", f"is {request.max_tasks}; the limit is {MAX_TASKS_PER_LEASE}")
        if request.lease_seconds > MAX_LEASE_SECONDS:
            raise InvalidArgument("lease_seconds", f"is {request.lease_seconds}; the limit is {MAX_LEASE_SECONDS}")
        leased = await asyncio.to_thread(
            tasks.lease,
            self.store,
            request.owner,
            request.max_tasks,
            request.lease_seconds,
            False,
            task_kinds(request.kinds),
        )
        return preference_pb2.LeaseTasksResponse(tasks=[task(t) for t in leased])


def _ingest_response(outcomes) -> preference_pb2.IngestLabelsResponse:
    """One IngestResult per label or feedback item, in the request's order."""
    return preference_pb2.IngestLabelsResponse(
        results=[
            preference_pb2.IngestResult(label_id=o.label_id, status=STATUS_VALUES[o.status], reason=o.reason)
            for o in outcomes
        ]
    )
