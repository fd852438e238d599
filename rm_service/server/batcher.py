"""The token-budget batcher: every Score item of every request goes through one queue.

Admission (at once, in the caller's task): items are tokenised before they queue, and a
request is refused with Overloaded (RESOURCE_EXHAUSTED) when it would push the in-flight
item count or the queued token count past its limit: callers learn at once, nothing waits.

Forming (the batch loop): the waiting window is sorted by length and the longest items are
taken while count x longest stays within the token budget and each item's padding stays
under `max_padding` of its row, so batches are dense (on a CPU, padded positions cost as
much as real ones); items of
cancelled or expired requests are dropped here and never reach the model. With
`max_wait_ms` = 0 (the default) there is no timer: a batch leaves as soon as the model thread
is free. Batch k+1 is formed and collated while batch k runs on the one model thread.

Batches hold one version each; a batch formed before a hot-swap finishes on the old model.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from rm_service.errors import DeadlineExceeded, Overloaded
from rm_service.models.batching import collate
from rm_service.models.formatting import Formatted

log = logging.getLogger(__name__)


@dataclass
class Ticket:
    """One request's claim: its deadline and whether its caller has gone away."""

    deadline: float | None  # time.monotonic() seconds
    cancelled: Callable[[], bool] = lambda: False

    def expired(self) -> bool:
        return self.cancelled() or (self.deadline is not None and time.monotonic() >= self.deadline)


@dataclass
class Job:
    item: Formatted
    ticket: Ticket
    future: asyncio.Future
    enqueued: float = field(default_factory=time.monotonic)


class Dropped(DeadlineExceeded):
    """The item's request expired or was cancelled before the item reached the model."""


class Batcher:
    def __init__(self, max_batch_tokens: int, max_inflight_items: int, max_queued_tokens: int, max_wait_ms: float = 0.0,
                 observer=None, max_padding: float = 1.0):
        self.max_batch_tokens = max_batch_tokens
        self.max_padding = max_padding
        self.max_inflight_items = max_inflight_items
        self.max_queued_tokens = max_queued_tokens
        self.max_wait = max_wait_ms / 1000
        self.observer = observer  # metrics hooks (see server.metrics); may be None
        self.inflight_items = 0
        self.queued_tokens = 0
        self.items_scored = 0
        self._pending: dict[str, list[Job]] = {}  # version -> waiting jobs
        self._backends: dict[str, object] = {}
        self._wakeup = asyncio.Event()
        self._model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        self._loop_task: asyncio.Task | None = None

    def start(self) -> None:
        self._loop_task = asyncio.get_running_loop().create_task(self._batch_loop())

    async def stop(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
        self._model_thread.shutdown(wait=True)

    async def score(self, version: str, backend, items: list[Formatted], ticket: Ticket) -> np.ndarray:
        """Member rewards [N, K] of the items, in order; raises Overloaded or Dropped."""
        tokens = sum(len(x) for x in items)
        if self.inflight_items + len(items) > self.max_inflight_items:
            self._observe("rejected", "inflight_items")
            raise Overloaded(f"{self.inflight_items} items in flight; the limit is {self.max_inflight_items}. Retry with backoff")
        if self.queued_tokens + tokens > self.max_queued_tokens:
            self._observe("rejected", "queued_tokens")
            raise Overloaded(f"{self.queued_tokens} tokens queued; the limit is {self.max_queued_tokens}. Retry with backoff")
        loop = asyncio.get_running_loop()
        jobs = [Job(x, ticket, loop.create_future()) for x in items]
        self.inflight_items += len(items)
        self.queued_tokens += tokens
        self._backends[version] = backend
        self._pending.setdefault(version, []).extend(jobs)
        self._wakeup.set()
        try:
            rows = await asyncio.gather(*(j.future for j in jobs))
        finally:
            self.inflight_items -= len(items)  # permits come back however the call ends
            for j in jobs:
                if not j.future.done():
                    j.future.cancel()  # the batch loop skips it and gives back its tokens
        return np.stack(rows)  # [N, K]

    async def on_model_thread(self, fn, *args):
        """Run `fn` on the one model thread, between batches (e.g. a ScoreTurns pass)."""
        return await asyncio.get_running_loop().run_in_executor(self._model_thread, fn, *args)

    def queue_depth(self) -> int:
        return sum(len(v) for v in self._pending.values())

    async def _batch_loop(self) -> None:
        running: asyncio.Future | None = None
        while True:
            if not any(self._pending.values()):
                self._wakeup.clear()
                await self._wakeup.wait()
            if self.max_wait:
                await asyncio.sleep(self.max_wait)
            formed = self._form_batch()
            if formed is None:
                continue
            version, jobs = formed
            batch = collate([j.item for j in jobs], self._backends[version].pad_id)  # batch k+1, while batch k runs
            if running is not None:
                await running
            running = asyncio.ensure_future(self._run(version, jobs, batch))

    def _form_batch(self) -> tuple[str, list[Job]] | None:
        """Take the next batch from the version with the oldest waiting job."""
        for version in list(self._pending):
            self._pending[version] = [j for j in self._pending[version] if self._keep(j)]
        live = {v: jobs for v, jobs in self._pending.items() if jobs}
        if not live:
            return None
        version = min(live, key=lambda v: min(j.enqueued for j in live[v]))
        window = sorted(live[version], key=lambda j: -len(j.item))  # longest first
        taken, longest = [], 0
        for job in window:
            longest_if = max(longest, len(job.item))
            if taken and longest_if * (len(taken) + 1) > self.max_batch_tokens:
                break
            if taken and len(job.item) < (1 - self.max_padding) * longest:
                break  # shorter items wait for a batch of their own length: padding is wasted compute
            taken.append(job)
            longest = longest_if
        chosen = {id(j) for j in taken}
        self._pending[version] = [j for j in live[version] if id(j) not in chosen]
        return version, taken

    def _keep(self, job: Job) -> bool:
        """False (and the job's tokens released) for jobs whose caller is gone or late."""
        if job.future.done() or job.ticket.expired():
            if not job.future.done():
                job.future.set_exception(Dropped("the request's deadline passed or it was cancelled before scoring"))
            self.queued_tokens -= len(job.item)
            self._observe("dropped", None)
            return False
        return True

    async def _run(self, version: str, jobs: list[Job], batch) -> None:
        live = [self._keep(j) for j in jobs]
        if not all(live):  # someone left while the batch waited: re-collate without them
            jobs = [j for j, keep in zip(jobs, live) if keep]
            if not jobs:
                return
            batch = collate([j.item for j in jobs], self._backends[version].pad_id)
        backend = self._backends[version]
        start = time.monotonic()
        try:
            rewards = await asyncio.get_running_loop().run_in_executor(self._model_thread, backend.run_collated, batch)  # [b, K]
        except Exception as exc:  # noqa: BLE001 - the callers get the error, the loop goes on
            log.exception("model batch failed")
            for j in jobs:
                if not j.future.done():
                    j.future.set_exception(exc)
            rewards = None
        finally:
            self.queued_tokens -= sum(len(j.item) for j in jobs)
        if rewards is None:
            return
        self.items_scored += len(jobs)
        if self.observer is not None:
            self.observer.batch(version, len(jobs), int(batch["attention_mask"].numel()), int(batch["attention_mask"].sum()),
                                time.monotonic() - start, [start - j.enqueued for j in jobs])
        for j, row in zip(jobs, rewards):
            if not j.future.done():
                j.future.set_result(row)

    def _observe(self, what: str, reason: str | None) -> None:
        if self.observer is not None:
            getattr(self.observer, what)(reason)
