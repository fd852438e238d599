"""TrainingService: retraining jobs run by the process that owns the store.

`RequestRetrain` snapshots the store and trains a new version on a worker thread of this
process (DuckDB allows one writing process per file, so training cannot run beside the
server in another process). One retraining job runs at a time: a request while one is
queued or running returns that job instead of starting a second (a policy trainer that asks
every few steps gets one job, not a pile). When the job's version passes the promotion gate
and the request asked for promotion, `promoted.json` changes and every scorer following the
registry, this one included, hot-swaps to it.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor

from rm_service import registry
from rm_service.api.v1 import training_pb2, training_pb2_grpc
from rm_service.errors import InvalidArgument, NotFound, RMError
from rm_service.server.rpc import rpc
from rm_service.settings import ModelSettings, TrainSettings
from rm_service.store import jobs
from rm_service.store.db import Store
from rm_service.train.run import train

log = logging.getLogger(__name__)
KIND = "retrain"
MODES = ("head", "full")


class JobRunner:
    """Runs retraining jobs one at a time on a worker thread and tells watchers of changes."""

    def __init__(self, store: Store, settings: TrainSettings, models: ModelSettings, on_version=None):
        self.store, self.settings, self.models = store, settings, models
        self.on_version = (
            on_version  # on_version(kind, record): a job's version that was not promoted ("rejected", "candidate")
        )
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="retrain")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._changed = asyncio.Event()
        interrupted = jobs.fail_interrupted(store)
        if interrupted:
            log.warning(
                "%d retraining job(s) left unfinished by the previous server process marked failed", interrupted
            )

    def changed(self) -> asyncio.Event:
        """An event set at the next change of any job (take it before reading the job)."""
        return self._changed

    def _notify(self) -> None:
        event, self._changed = self._changed, asyncio.Event()
        event.set()

    def _notify_threadsafe(self) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._notify)

    async def submit(self, request: dict) -> jobs.Job:
        """Queue a job (or return the one already queued or running)."""
        self._loop = asyncio.get_running_loop()
        job, created = await asyncio.to_thread(jobs.create_job, self.store, KIND, request)
        if created:
            log.info("retraining job %s queued (%s)", job.job_id, request.get("reason") or "no reason given")
            self._pool.submit(self._run, job)
            self._notify()
        return job

    def _run(self, job: jobs.Job) -> None:
        req = job.request
        jobs.mark_running(self.store, job.job_id)
        self._notify_threadsafe()
        settings = self.settings.model_copy(
            update={"mode": req.get("mode") or self.settings.mode, "promote": bool(req.get("promote"))}
        )
        try:
            result = train(self.store, settings, self.models, show_progress=False, parent=req.get("parent_version"))
            assert result is not None  # None only on torchrun's other ranks; this is one process
            record = registry.get_model(self.store, result.version)
            snapshot_id = record.snapshot_id
            if (
                not result.promoted and self.on_version is not None and self._loop is not None
            ):  # WatchModels tells what happened
                self._loop.call_soon_threadsafe(self.on_version, record.status, record)
            metrics = {k: float(v) for k, v in result.metrics.items() if isinstance(v, (int, float))}
            jobs.mark_succeeded(
                self.store, job.job_id, snapshot_id, result.version, result.promoted, metrics, result.decision
            )
            log.info("retraining job %s: %s (%s)", job.job_id, result.version, result.gate_message)
        except RMError as exc:
            jobs.mark_failed(self.store, job.job_id, str(exc))
            log.warning("retraining job %s failed: %s", job.job_id, exc)
        except Exception as exc:
            log.exception("retraining job %s failed", job.job_id)
            jobs.mark_failed(self.store, job.job_id, f"{type(exc).__name__}: {exc}")
        finally:
            self._notify_threadsafe()

    def close(self) -> None:
        """Wait for a running job to finish (its version is registered or its failure recorded)."""
        self._pool.shutdown(wait=True, cancel_futures=True)


def job_to_proto(job: jobs.Job) -> training_pb2.TrainingJob:
    out = training_pb2.TrainingJob(
        job_id=job.job_id,
        state=job.state,
        snapshot_id=job.snapshot_id or "",
        model_version=job.model_version or "",
        promoted=job.promoted,
        error=job.error or "",
        decision=job.decision.get("verdict", ""),
        decision_reason=job.decision.get("reason", ""),
    )
    out.metrics.update(job.metrics)
    for name in ("created_at", "finished_at"):
        if getattr(job, name) is not None:
            getattr(out, name).FromNanoseconds(int(getattr(job, name) * 1e9))
    return out


def retrain_request(request: training_pb2.RetrainRequest, store: Store) -> dict:
    """Validate a RetrainRequest into the job's stored request."""
    if request.mode and request.mode not in MODES:
        raise InvalidArgument("mode", f"must be one of {', '.join(MODES)} or empty, got {request.mode!r}")
    parent = request.parent_version or None
    if parent is not None:
        registry.get_model(store, parent)  # NotFound names the version
    else:
        current = registry.promoted(store)
        parent = current.version if current else None
    return {
        "mode": request.mode or None,
        "parent_version": parent,
        "promote": request.promote,
        "reason": request.reason[:1000],
    }


class TrainingService(training_pb2_grpc.TrainingServiceServicer):
    def __init__(self, runner: JobRunner):
        self.runner = runner

    @rpc
    async def RequestRetrain(self, request, context):
        fields = await asyncio.to_thread(retrain_request, request, self.runner.store)
        return job_to_proto(await self.runner.submit(fields))

    @rpc
    async def GetJob(self, request, context):
        return job_to_proto(await asyncio.to_thread(self._get, request.job_id))

    @rpc
    async def WatchJob(self, request, context):
        last = None
        while True:
            changed = self.runner.changed()
            job = await asyncio.to_thread(self._get, request.job_id)
            if (job.state, job.model_version) != last:
                last = (job.state, job.model_version)
                yield job_to_proto(job)
            if job.done:
                return
            try:
                await asyncio.wait_for(changed.wait(), timeout=5.0)
            except TimeoutError:
                pass

    def _get(self, job_id: str) -> jobs.Job:
        if not job_id:
            raise InvalidArgument("job_id", "must not be empty")
        job = jobs.get_job(self.runner.store, job_id)
        if job is None:
            raise NotFound(f"job {job_id!r} not found")
        return job
