"""A judging run: take items (leased tasks or a JSONL file), judge them concurrently, and
write each label through IngestLabels as soon as it is judged.

Resumable: a leased task that is not labeled (the run stopped, crashed, or skipped it) returns
to the queue when its lease lapses; a label closes its task. For a file, the keys of finished
items are appended to a progress file, and a rerun skips them; label ids are derived from
the item and the judge, so judging an item twice stores it once.

Counts: `labeled` labels stored (`ties` of them rank every response equal), `skipped` items the
inconsistent=skip policy left without a label, `parse_failures` items with an answer that
stayed unparseable, `errors` items the backend failed on after its retries, `pair_judgments`
comparisons judged in both orders and `position_flips` those whose verdict changed with the order.
"""

from __future__ import annotations

import hashlib
import logging
import socket
import sys
import threading
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Protocol

from rm_service.api.v1 import preference_pb2
from rm_service.errors import InvalidArgument
from rm_service.judge.annotators import Annotator, open_annotator
from rm_service.judge.backend import BackendUnavailable
from rm_service.judge.items import JudgeItem, item_from_task, read_items
from rm_service.judge.settings import JudgeSettings
from rm_service.judge.store_client import StoreClient
from rm_service.judge.verdict import ParseFailure
from rm_service.settings import rm_home

log = logging.getLogger(__name__)


@dataclass
class JudgeCounts:
    items: int = 0
    labeled: int = 0
    ties: int = 0
    skipped: int = 0
    parse_failures: int = 0
    errors: int = 0
    duplicates: int = 0
    rejected: int = 0
    pair_judgments: int = 0
    position_flips: int = 0
    calls: int = 0
    seconds: float = 0.0

    def add(self, other: JudgeCounts) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    @property
    def position_bias_rate(self) -> float:
        return self.position_flips / self.pair_judgments if self.pair_judgments else 0.0

    def summary(self) -> str:
        return (
            f"judged {self.items} items in {self.seconds:.1f}s ({self.calls} judge calls): labeled {self.labeled} "
            f"(ties {self.ties}), skipped {self.skipped} (inconsistent), parse failures {self.parse_failures}, "
            f"backend errors {self.errors}, duplicates {self.duplicates}, rejected {self.rejected}; position flips "
            f"{self.position_flips} of {self.pair_judgments} pair judgments ({self.position_bias_rate:.1%})"
        )


class Source(Protocol):
    """Where items come from: the labeling queue or a file."""

    def take(self, n: int) -> list[JudgeItem]: ...

    def finished(self, item: JudgeItem) -> None: ...


class QueueSource:
    """Items from LeaseTasks, leased only when a worker is free (so leases do not lapse while
    waiting). A task seen earlier in this run (leased again after its lease lapsed) is not
    judged twice."""

    def __init__(self, client: StoreClient, owner: str, lease_seconds: int, kinds: tuple[str, ...] = ("ranking",)):
        self.client, self.owner, self.lease_seconds, self.kinds = client, owner, lease_seconds, kinds
        self.seen: set[str] = set()

    def take(self, n: int) -> list[JudgeItem]:
        while True:
            tasks = self.client.lease(self.owner, n, self.lease_seconds, self.kinds)
            fresh = [t for t in tasks if t.task_id not in self.seen]
            self.seen.update(t.task_id for t in fresh)
            if fresh or not tasks:
                return [item_from_task(t) for t in fresh]

    def finished(self, item: JudgeItem) -> None:
        pass  # the label closed the task; an unlabeled task returns when its lease lapses


class FileSource:
    """Items of a JSONL file that the progress file does not list yet."""

    def __init__(self, items: list[JudgeItem], progress_file: Path):
        self.progress_file = progress_file
        done = set(progress_file.read_text(encoding="utf-8").split()) if progress_file.exists() else set()
        self.pending = deque(i for i in items if i.key not in done)
        self._lock = threading.Lock()

    def take(self, n: int) -> list[JudgeItem]:
        with self._lock:
            return [self.pending.popleft() for _ in range(min(n, len(self.pending)))]

    def finished(self, item: JudgeItem) -> None:
        with self._lock:
            self.progress_file.parent.mkdir(parents=True, exist_ok=True)
            with open(self.progress_file, "a", encoding="utf-8") as f:
                f.write(item.key + "\n")


def default_progress_file(input_path: Path, annotator_: Annotator) -> Path:
    """$RM_HOME/judge/<file stem>-<hash of the file path and the annotator's configuration>.done"""
    config = f"{input_path.resolve()}|{annotator_.config}"
    return rm_home() / "judge" / f"{input_path.stem}-{hashlib.sha256(config.encode()).hexdigest()[:12]}.done"


class JudgeRun:
    def __init__(self, annotator_: Annotator, settings: JudgeSettings, client: StoreClient, source: Source):
        self.annotator, self.settings, self.client, self.source = annotator_, settings, client, source

    def judge_one(self, item: JudgeItem) -> tuple[JudgeCounts, str | None]:
        """Judge one item and store its label; returns its counts and the backend error, if any."""
        counts = JudgeCounts(items=1)
        try:
            label = self.annotator.annotate(item, counts)
        except ParseFailure as exc:
            log.warning("%s: unparseable judge answer, skipped: %s", item.key, exc)
            counts.parse_failures = 1
            return counts, None
        except BackendUnavailable as exc:
            counts.errors = 1
            return counts, str(exc)
        if label is None:
            counts.skipped = 1
            self.source.finished(item)
            return counts, None
        feedback = isinstance(label, preference_pb2.Feedback)
        result = self.client.ingest_feedback(label) if feedback else self.client.ingest(label)
        if result.status == preference_pb2.INSERTED:
            counts.labeled = 1
            counts.ties = 0 if feedback else int(len(set(label.ranks)) == 1)
        elif result.status == preference_pb2.DUPLICATE:
            counts.duplicates = 1
        else:
            log.warning("%s: label %s: %s", item.key, preference_pb2.IngestStatus.Name(result.status), result.reason)
            counts.rejected = 1
        self.source.finished(item)
        return counts, None

    def run(
        self,
        max_tasks: int | None,
        stop_event: threading.Event | None,
        follow: bool,
        progress: bool,
        total: int | None,
        drain: bool = False,
    ) -> JudgeCounts:
        from tqdm import tqdm

        s = self.settings
        stop = stop_event or threading.Event()
        counts = JudgeCounts()
        started = time.monotonic()
        taken, consecutive_errors, exhausted = 0, 0, False
        bar = tqdm(total=total, unit="item", desc="judge", disable=not progress, file=sys.stderr, dynamic_ncols=True)
        pool = ThreadPoolExecutor(s.concurrency, thread_name_prefix="judge")
        inflight: dict[Future, JudgeItem] = {}
        try:
            while True:
                room, stopping = s.concurrency - len(inflight), stop.is_set()
                if room > 0 and not exhausted and (drain or not stopping):
                    want = room if max_tasks is None else min(room, max_tasks - taken)
                    batch = self.source.take(want) if want > 0 else []
                    for item in batch:
                        inflight[pool.submit(self.judge_one, item)] = item
                    taken += len(batch)
                    if (not batch and (not follow or stopping)) or (max_tasks is not None and taken >= max_tasks):
                        exhausted = True  # draining: the queue was empty after the stop
                if not inflight:
                    if exhausted or (stopping and not drain):
                        break
                    stop.wait(s.poll_interval_s)  # follow: the queue is empty for now
                    continue
                done, _ = wait(list(inflight), timeout=s.poll_interval_s, return_when=FIRST_COMPLETED)
                for future in done:
                    item = inflight.pop(future)
                    item_counts, error = future.result()
                    counts.add(item_counts)
                    bar.update(1)
                    bar.set_postfix(
                        labeled=counts.labeled,
                        skipped=counts.skipped + counts.parse_failures + counts.errors,
                        refresh=False,
                    )
                    consecutive_errors = consecutive_errors + 1 if error else 0
                    if error:
                        log.warning("%s: judge backend failed, item skipped: %s", item.key, error)
                    if consecutive_errors >= s.max_consecutive_errors:
                        raise BackendUnavailable(
                            f"stopping: {consecutive_errors} items in a row failed at the judge backend; last: {error}"
                        )
        finally:
            not_started = [f for f in inflight if f.cancel()]
            pool.shutdown(wait=True, cancel_futures=True)
            bar.close()
            counts.calls = self.annotator.calls
            counts.seconds = time.monotonic() - started
            if not_started:
                log.info("%d items were not started; their leases lapse and they return to the queue", len(not_started))
        return counts


def run_judge(
    settings: JudgeSettings | None = None,
    *,
    address: str | None = None,
    input_path: Path | None = None,
    max_tasks: int | None = None,
    stop_event: threading.Event | None = None,
    follow: bool = False,
    progress: bool = False,
    annotator: Annotator | None = None,
    progress_file: Path | None = None,
    drain: bool = False,
) -> JudgeCounts:
    """Judge queued tasks (or the items of `input_path`) and ingest the labels; returns the counts.

    settings: JudgeSettings (default: from the environment). address: the rm-service server
    (default settings.server). max_tasks: stop after this many items. stop_event: set it to stop
    taking items; the ones in flight finish. follow: keep polling an empty queue until stop_event.
    drain: once stop_event is set, label what is still queued before returning (a run's last
    samples are labeled, not left behind).
    annotator: an annotator already open (annotators.open_annotator) to reuse across calls; the
    caller keeps ownership. Raises an RMError when the server or the backend cannot be used.
    """
    settings = settings or JudgeSettings()
    items = read_items(Path(input_path)) if input_path is not None else None  # a bad file fails before anything loads
    token = settings.server_token.get_secret_value() if settings.server_token else None
    client = StoreClient(address or settings.server, token, settings.rpc_timeout_s, settings.server_tls_ca)
    owned = annotator is None
    try:
        if annotator is None:
            annotator = open_annotator(settings)
        source: Source
        kinds = getattr(annotator, "kinds", ("ranking",))
        if items is not None and "ranking" not in kinds:
            raise InvalidArgument("input", f"the {settings.backend} backend labels SESSION tasks from the queue only")
        if items is not None and input_path is not None:
            file_source = FileSource(items, progress_file or default_progress_file(Path(input_path), annotator))
            source = file_source
            total: int | None = (
                len(file_source.pending) if max_tasks is None else min(max_tasks, len(file_source.pending))
            )
        else:
            owner = settings.owner or f"judge:{annotator.name}@{socket.gethostname()}"
            source, total = QueueSource(client, owner, settings.lease_seconds, kinds), max_tasks
        return JudgeRun(annotator, settings, client, source).run(max_tasks, stop_event, follow, progress, total, drain)
    finally:
        client.close()
        if owned and annotator is not None:
            annotator.close()
