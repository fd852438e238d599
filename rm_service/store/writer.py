"""Group commit: one writer thread owns the store's writes and commits many requests'
labels per transaction.

Requests wait in a queue; the writer takes every request waiting (up to `max_labels`
labels) and stores them in one transaction, then answers each. While a COMMIT runs, new
requests gather for the next one, so the number of commits grows with the commit
rate, not with the request rate. A request is answered only after its COMMIT returns.
Requests never fail each other: each request's labels are validated on a worker thread
before they are queued (Store.prepare: a bad label is REJECTED alone and costs the writer
nothing), and a transaction that fails is retried request by request.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Sequence
from concurrent.futures import Future

from rm_service.store.db import Prepared, Store
from rm_service.store.feedback import FeedbackIn
from rm_service.store.labels import IngestOutcome, LabelIn

log = logging.getLogger(__name__)
_STOP = object()


class GroupCommitWriter:
    def __init__(self, store: Store, max_labels: int = 4096):
        self.store = store
        self.max_labels = max_labels
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="store-writer", daemon=True)
        self._thread.start()
        self.commits = 0  # transactions committed (for metrics and benchmarks)

    def submit(self, prepared: list[Prepared]) -> Future:
        """Queue one request's labels, already validated by Store.prepare in the caller's thread."""
        future: Future = Future()
        self._queue.put((prepared, future))
        return future

    async def ingest(
        self, labels: Sequence[LabelIn | FeedbackIn | IngestOutcome], origin: str = "dataset", field: str = "labels"
    ) -> list[IngestOutcome]:
        """Validate on a worker thread (never on the writer, never in a transaction), then group-commit
        (Store.prepare: `field` names the request's list in a rejection)."""
        prepared = await asyncio.to_thread(self.store.prepare, labels, origin, field)
        return await asyncio.wrap_future(self.submit(prepared))

    def close(self) -> None:
        """Finish every queued request, then stop the thread."""
        self._queue.put(_STOP)
        self._thread.join()

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is _STOP:
                return
            group, stop = [first], False
            count = len(first[0])
            while count < self.max_labels and self.max_labels > 1:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is _STOP:
                    stop = True
                    break
                group.append(nxt)
                count += len(nxt[0])
            self._commit(group)
            if stop:
                return

    def _commit(self, group: list) -> None:
        # A request whose caller left (deadline, cancel) before we got to it is skipped and
        # never written; the rest are marked running, so answering them cannot fail.
        self._commit_together([item for item in group if item[1].set_running_or_notify_cancel()])

    def _commit_together(self, items: list) -> None:
        """One transaction for every request in `items`. Labels were validated one by one
        before, so it should not fail; if it does (the disk, DuckDB), each request is retried
        in its own transaction, so a failure reaches only the request that causes it."""
        if not items:
            return
        try:
            results = self.store.ingest_batches([prepared for prepared, _ in items])
            self.commits += 1
        except Exception as exc:
            if len(items) > 1:
                log.warning("group commit of %d requests failed (%s); committing them one by one", len(items), exc)
                for item in items:
                    self._commit_together([item])
                return
            log.exception("commit of a request with %d labels failed", len(items[0][0]))
            items[0][1].set_exception(exc)
            return
        for (_, future), outcomes in zip(items, results, strict=True):
            future.set_result(outcomes)
