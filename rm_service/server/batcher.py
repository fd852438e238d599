"""The token-budget batcher: every Score item of every request goes through one queue.

Admission (server.admission) comes first, in the caller's task and before tokenising; only
admitted, tokenised items reach this queue.

Forming (server.forming, whenever the model thread is free) picks each batch: dense, by length,
with a fairness bound past each item's first-come-first-served turn and callers' deadlines.

The model thread forms each batch itself the moment it is free, from everything waiting
(forming and collating cost well under a millisecond), so the model never waits for a busy
event loop; answers go back to the loop in one callback per batch. With `max_wait_ms` > 0 it
waits that long first. Items of expired or abandoned requests are dropped when a batch is
formed and again just before it runs: they never reach the model. ScoreTurns passes and the
warm-up run on the same thread, between batches.

Batches hold one version each; a batch formed before a hot-swap finishes on the old model.
The batcher holds a version's backend only while items of that version wait, so a version
the server unloads is freed.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import numpy as np

from rm_service.models.backend import RewardBackend
from rm_service.models.batching import collate
from rm_service.models.formatting import Formatted
from rm_service.server import budget
from rm_service.server.admission import Admission, Dropped, Permit, RateMeter, Ticket
from rm_service.server.forming import at_turn, pick_batch
from rm_service.server.threads import lower_priority
from rm_service.settings import ServeSettings

log = logging.getLogger(__name__)

FAIR_WAIT_BATCHES = 8  # default fairness bound, in measured batch times (see ServeSettings.fair_wait_s)
DEFAULT_BATCH_SECONDS = 0.25  # until a batch has been measured


@dataclass(eq=False)
class Job:
    item: Formatted
    permit: Permit
    future: asyncio.Future
    enqueued: float = field(default_factory=time.monotonic)
    turn: float | None = None  # when a first-come-first-served queue reached it (forming.at_turn)

    def due(self, fair_wait: float, batch_seconds: float) -> float:
        """When the item must join the next batch: the fairness bound after its first-come-first-served
        turn, or one batch before its deadline."""
        deadline = self.permit.ticket.deadline
        bound = math.inf if self.turn is None else self.turn + fair_wait
        return bound if deadline is None else min(bound, deadline - batch_seconds)


@dataclass(eq=False)
class _Waiting:
    """One version's waiting jobs and the backend they run on."""

    backend: RewardBackend
    jobs: list[Job] = field(default_factory=list)


@dataclass(eq=False)
class _Solo:
    """One call of `fn` on the model thread (a ScoreTurns pass, the warm-up)."""

    fn: Callable[[], object]
    runnable: Callable[[], bool]
    future: asyncio.Future
    tokens: int = 0  # what the rate meter records for it (0: nothing)
    items: int = 0


@dataclass
class _Ran:
    jobs: list[Job]  # the jobs that reached the model
    rewards: np.ndarray | None  # [b, K]
    padded_tokens: int = 0
    start: float = 0.0
    seconds: float = 0.0


class Batcher:
    def __init__(self, settings: ServeSettings, observer=None):
        self.max_batch_tokens = settings.max_batch_tokens  # 0 until warm_up measures it (server.budget)
        self.max_padding = settings.max_padding
        self.max_wait = settings.max_wait_ms / 1000
        self.fair_wait_s = settings.fair_wait_s  # 0: FAIR_WAIT_BATCHES x the measured batch time
        self.model_nice = settings.model_nice
        self.observer = observer  # metrics hooks (see server.metrics); may be None
        self.meter = RateMeter()  # written by the model thread only
        self.admission = Admission(settings, self.meter, observer)  # used on the event loop only
        self.items_scored = 0
        self._lock = threading.Condition()  # guards _waiting, _solo and _stopping
        self._waiting: dict[str, _Waiting] = {}  # version -> its waiting jobs and backend
        self._solo: deque[_Solo] = deque()
        self._stopping = False
        self._thread = threading.Thread(target=self._model_loop, name="model", daemon=True)
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def inflight_items(self) -> int:
        return self.admission.inflight_items

    @property
    def queued_tokens(self) -> int:
        return self.admission.queued_tokens

    @property
    def max_inflight_items(self) -> int:
        return self.admission.max_items

    @max_inflight_items.setter
    def max_inflight_items(self, value: int) -> None:
        self.admission.max_items = value

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread.start()

    async def stop(self) -> None:
        """Let the model thread finish what it is running, then end it."""
        with self._lock:
            self._stopping = True
            self._lock.notify()
        if self._thread.is_alive():
            await asyncio.to_thread(self._thread.join)

    def fair_wait(self) -> float:
        """Seconds past its first-come-first-served turn after which an item joins the next batch whatever its
        length."""
        return self.fair_wait_s or FAIR_WAIT_BATCHES * (self.meter.batch_seconds() or DEFAULT_BATCH_SECONDS)

    def admit(self, items: int, tokens: int, ticket: Ticket) -> Permit:
        """A permit (a context manager: leaving it gives everything back), or Overloaded at once."""
        return self.admission.admit(items, tokens, ticket, self._release)

    async def score(self, permit: Permit, version: str, backend: RewardBackend, items: list[Formatted]) -> np.ndarray:
        """Member rewards [N, K] of the permit's tokenised items, in order; raises Dropped."""
        self.admission.correct(permit, sum(len(x) for x in items))
        loop = asyncio.get_running_loop()
        jobs = [Job(x, permit, loop.create_future()) for x in items]
        permit.jobs.extend(jobs)
        with self._lock:
            self._waiting.setdefault(version, _Waiting(backend)).jobs.extend(jobs)
            self._lock.notify()
        rows = await asyncio.gather(*(j.future for j in jobs))
        return np.stack(rows)  # [N, K]

    async def run_solo(self, permit: Permit, tokens: int, fn, *args, record: bool = True):
        """fn(*args) on the model thread as one unit of `tokens` tokens (a ScoreTurns pass, a
        SimulateUser call), after the batch running now; Dropped if by then its caller has left or
        its deadline passed. `record`: the rate meter counts its tokens and time (Score's kind of work)."""
        self.admission.correct(permit, tokens)
        try:
            out, seconds = await self._on_model_thread(
                _Solo(lambda: fn(*args), permit.runnable, self._future(), tokens if record else 0, 1)
            )
        finally:
            self.admission.spend(permit, tokens)
        if seconds is None:
            self._observe_drop()
            raise Dropped("the call's deadline passed or it was cancelled before its turn on the model")
        return out

    async def warm_up(self, backend: RewardBackend, fill: Callable[[int], list[Formatted]]) -> None:
        """Prime the backend with one item; choose the token budget (server.budget: measured when the setting is 0)
        and measure a batch of `fill(budget)` at it: the rate admission starts from."""
        await self._time_batch(backend, fill(1)[:1], record=False)
        if not self.max_batch_tokens:

            async def rate_at(tokens: int) -> float:
                rows = fill(tokens)
                await self._time_batch(backend, rows, record=False)  # its shape's kernels, the allocator
                best = min([await self._time_batch(backend, rows, record=False) for _ in range(budget.RUNS)])
                return sum(len(x) for x in rows) / best

            curve = await budget.measure_curve(rate_at)
            self.max_batch_tokens = budget.choose_budget(curve)
            log.info(budget.describe(curve, self.max_batch_tokens))
        rows = fill(self.max_batch_tokens)
        seconds = await self._time_batch(backend, rows, record=True)
        log.info(
            "warm-up: %d tokens in %.3f s (%.0f tokens/s); batch budget %d tokens, token limit %s, fairness %.2f s",
            *(sum(len(x) for x in rows), seconds, self.meter.tokens_per_s(), self.max_batch_tokens),
            *(self.admission.token_limit(), self.fair_wait()),
        )

    async def _time_batch(self, backend: RewardBackend, rows: list[Formatted], record: bool) -> float:
        """Seconds of one padded batch of `rows` on the model thread (`record`: the rate meter counts it)."""
        tokens = sum(len(x) for x in rows) if record else 0  # the meter records only what has tokens
        batch = collate(rows, backend.pad_id)  # [b, T]
        _, seconds = await self._on_model_thread(
            _Solo(partial(backend.run_collated, batch), lambda: True, self._future(), tokens, len(rows))
        )
        assert seconds is not None  # runnable() is always true
        return seconds

    def queue_depth(self) -> int:
        with self._lock:
            return sum(len(w.jobs) for w in self._waiting.values())

    def _future(self) -> asyncio.Future:
        return asyncio.get_running_loop().create_future()

    async def _on_model_thread(self, solo: _Solo) -> tuple[object, float | None]:
        """(solo.fn(), seconds) from the model thread, or (None, None) if `solo.runnable()` was false by then."""
        with self._lock:
            self._solo.append(solo)
            self._lock.notify()
        return await solo.future

    def _release(self, permit: Permit) -> None:
        """The request is over: its waiting items leave the queue, its permits come back."""
        # Still queued: not answered yet, or cancelled (a cancelled caller's gather cancels its futures first)
        waiting = {id(j) for j in permit.jobs if not j.future.done() or j.future.cancelled()}
        if waiting:
            with self._lock:
                for version, w in list(self._waiting.items()):
                    w.jobs = [j for j in w.jobs if id(j) not in waiting]
                    if not w.jobs:
                        del self._waiting[version]
            for j in permit.jobs:
                if not j.future.done():
                    j.future.cancel()
        self.admission.close(permit)

    # ---- the model thread

    def _model_loop(self) -> None:
        lower_priority(self.model_nice)
        while self._wait_for_work():
            if self.max_wait:
                time.sleep(self.max_wait)
            self._run_next()  # its locals, and with them a swapped-out backend, go when it returns

    def _wait_for_work(self) -> bool:
        with self._lock:
            while not (self._stopping or self._waiting or self._solo):
                self._lock.wait()
            return not self._stopping

    def _run_next(self) -> None:
        with self._lock:
            solo = self._solo.popleft() if self._solo else None
            formed = None if solo is not None else self._form_batch()
        if solo is not None:
            self._run_solo(solo)
        elif formed is not None:
            self._run_batch(*formed)

    def _form_batch(self) -> tuple[str, object, list[Job], list[Job]] | None:
        """(version, backend, jobs, dropped): the next batch, from the version whose most urgent
        job is due first, and the jobs dropped because nobody waits for them any more."""
        dropped = self._prune()
        if not self._waiting:
            if dropped:
                self._post(self._deliver, "", dropped, _Ran([], None))
            return None
        now = time.monotonic()
        for w in self._waiting.values():  # stamp the turn of the items a first-come-first-served queue runs next
            for j in w.jobs[: at_turn([len(j.item) for j in w.jobs], self.max_batch_tokens)]:
                j.turn = now if j.turn is None else j.turn
        fair, batch_seconds = self.fair_wait(), self.meter.batch_seconds() or DEFAULT_BATCH_SECONDS
        due = {v: [j.due(fair, batch_seconds) for j in w.jobs] for v, w in self._waiting.items()}
        version = min(due, key=lambda v: min(due[v]))
        waiting = self._waiting[version]
        chosen = pick_batch(
            [len(j.item) for j in waiting.jobs], due[version], now, self.max_batch_tokens, self.max_padding
        )
        jobs = [waiting.jobs[i] for i in chosen]
        taken = set(chosen)
        waiting.jobs = [j for i, j in enumerate(waiting.jobs) if i not in taken]
        if not waiting.jobs:
            del self._waiting[version]  # the last reference to an unloaded version's backend goes here
        return version, waiting.backend, jobs, dropped

    def _prune(self) -> list[Job]:
        """Take out the waiting jobs whose caller has gone or whose deadline passed."""
        dropped = []
        for version, w in list(self._waiting.items()):
            w.jobs, gone = _partition(w.jobs)
            dropped += gone
            if not w.jobs:
                del self._waiting[version]
        return dropped

    def _run_batch(self, version: str, backend, jobs: list[Job], dropped: list[Job]) -> None:
        """Check the jobs once more, run the live ones as one padded batch, post the answers."""
        live, gone = _partition(jobs)
        dropped = dropped + gone
        ran = _Ran(live, None)
        try:
            if live:
                batch = collate([j.item for j in live], backend.pad_id)  # input_ids, attention_mask [b, T]
                start = time.monotonic()
                rewards = backend.run_collated(batch)  # [b, K]
                ran = _Ran(live, rewards, int(batch["input_ids"].numel()), start, time.monotonic() - start)
                self.meter.record(sum(len(j.item) for j in live), len(live), ran.seconds)
        except Exception as exc:
            log.exception("model batch failed")
            self._post(self._fail, live + dropped, exc)
            return
        self._post(self._deliver, version, dropped, ran)

    def _run_solo(self, solo: _Solo) -> None:
        if not solo.runnable():
            self._post(_settle, solo.future, (None, None), None)
            return
        start = time.monotonic()
        try:
            out = solo.fn()
        except Exception as exc:  # noqa: BLE001 - the caller gets the error
            self._post(_settle, solo.future, None, exc)
            return
        seconds = time.monotonic() - start
        if solo.tokens:
            self.meter.record(solo.tokens, solo.items, seconds)
        self._post(_settle, solo.future, (out, seconds), None)

    def _post(self, fn, *args) -> None:
        """Run fn(*args) on the event loop (the one place the model thread hands results back)."""
        assert self._loop is not None  # set by start(), before any batch runs
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass

    # ---- back on the event loop

    def _deliver(self, version: str, dropped: list[Job], ran: _Ran) -> None:
        """Answer the jobs that ran; the dropped ones get Dropped; their tokens leave the queue."""
        for j in dropped:
            self.admission.spend(j.permit, len(j.item))
            if not j.future.done():
                j.future.set_exception(
                    Dropped("the call's deadline passed or it was cancelled before its items were scored")
                )
            self._observe_drop()
        if ran.rewards is None:
            return
        for j, row in zip(ran.jobs, ran.rewards, strict=True):
            self.admission.spend(j.permit, len(j.item))
            if not j.future.done():
                j.future.set_result(row)
        self.items_scored += len(ran.jobs)
        if self.observer is not None:
            real = sum(len(j.item) for j in ran.jobs)
            self.observer.batch(
                version,
                len(ran.jobs),
                ran.padded_tokens,
                real,
                ran.seconds,
                [ran.start - j.enqueued for j in ran.jobs],
                budget=self.max_batch_tokens,
            )

    def _fail(self, jobs: list[Job], exc: Exception) -> None:
        for j in jobs:
            self.admission.spend(j.permit, len(j.item))
            if not j.future.done():
                j.future.set_exception(exc)

    def _observe_drop(self) -> None:
        if self.observer is not None:
            self.observer.dropped(None)


def _partition(jobs: list[Job]) -> tuple[list[Job], list[Job]]:
    """(the jobs still wanted, the ones whose caller has gone or whose deadline passed)."""
    live: list[Job] = []
    gone: list[Job] = []
    for j in jobs:
        (live if j.permit.runnable() else gone).append(j)
    return live, gone


def _settle(future: asyncio.Future, result, exc: Exception | None) -> None:
    if future.done():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)
