"""Admission control: decide at once, before any tokenising, whether a request may queue.

A request takes a Permit for its items and its tokens, estimated from its characters (UTF-8
bytes) and corrected once it is tokenised. The bytes rule is an upper bound (0.5 tokens per
byte; chat text runs at ~0.22 on SmolLM2's vocabulary), so the estimate is scaled by what
tokenising the calls before showed (real over estimated tokens, a moving average with a 1.25
margin, between 0.25 and 1): a burst of calls not yet tokenised is counted near its real
size, not at twice it (OpenRLHF's 128 one-item calls arriving at once were refused for work
that was not there). Calls queue whatever their size while the work
ahead of them is short enough; a call is refused with Overloaded (RESOURCE_EXHAUSTED, with a
retry pushback: the seconds until there is room at the measured rate) when:

- its items would pass `max_inflight_items` (when set; 0 means no item cap);
- the tokens already queued reach the token limit: `max_queued_tokens` when set, else the
  model's measured rate (real tokens/s, see RateMeter) x `max_queue_wait_s` (30 s by default).
  The limit bounds the work *ahead* of a call, not the call itself: a 512-item PPO call is
  queued behind what is there, never refused for being bigger than what is free;
- the expected wait, (tokens queued + its own) / measured rate, is longer than the time left
  before its deadline: it could only time out in the queue.

A trainer's own traffic at 1x never reaches the limit (OpenRLHF's 128 one-item calls in flight
are ~20 s of work for SmolLM2-135M on 2 cores, its calls carry no deadline and it gives up after
5 tries 1 s apart); the limit is for true overload, where it keeps the queue's wait bounded and
the model fed. The rate comes from the batches themselves (and the warm-up batch at start), so
the limit follows the model, the backend and the hardware instead of being a constant.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from rm_service.errors import DeadlineExceeded, Overloaded
from rm_service.settings import ServeSettings

TOKENS_PER_BYTE = (
    0.5  # upper estimate: English text runs at ~0.25 tokens per UTF-8 byte on BPE and WordPiece vocabularies
)
TOKENS_PER_MESSAGE = 8  # role markers and separators a template adds per message
TOKENS_PER_ITEM = 24  # special tokens and a default system prompt a template may add
ESTIMATE_MARGIN = 1.25  # the learned scale keeps estimates this far above the real counts seen
ESTIMATE_FLOOR = 0.25  # the learned scale never goes lower: estimates stay within 4x of the bytes rule


def estimate_tokens(texts: list[str], max_tokens: int) -> int:
    """Tokens one item (its messages' and completion's texts) will take, from its bytes alone."""
    overhead = TOKENS_PER_ITEM + TOKENS_PER_MESSAGE * len(texts)
    if overhead + sum(len(t) for t in texts) * TOKENS_PER_BYTE >= max_tokens:
        return max_tokens  # a text has at least as many bytes as characters: no need to encode 16 MB to know
    nbytes = sum(len(t.encode("utf-8", "surrogatepass")) for t in texts)
    return min(max_tokens, overhead + math.ceil(nbytes * TOKENS_PER_BYTE))


class Dropped(DeadlineExceeded):
    """The request expired or its caller left before its items reached the model."""


@dataclass
class Ticket:
    """One request's claim: its deadline and whether its caller has gone away."""

    deadline: float | None  # time.monotonic() seconds
    cancelled: Callable[[], bool] = lambda: False

    def expired(self) -> bool:
        return self.cancelled() or self.late()

    def late(self, now: float | None = None) -> bool:
        return self.deadline is not None and (now or time.monotonic()) >= self.deadline

    def left(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.monotonic()


@dataclass(eq=False)
class Permit:
    """A request's admitted items and the tokens it still holds in the queue.

    `gone` turns true once the request ends however it ends (answered, failed, cancelled);
    the model thread reads it to skip work nobody waits for."""

    items: int
    tokens: int
    ticket: Ticket
    release: Callable[[Permit], None]
    estimated: int = 0  # the bytes rule's estimate before the learned scale (0: none to learn from)
    gone: bool = False
    jobs: list = field(default_factory=list)  # the batcher's Jobs of this request

    def runnable(self) -> bool:
        """Safe from any thread: False once the caller has gone or the deadline passed."""
        return not self.gone and not self.ticket.late()

    def __enter__(self) -> Permit:
        return self

    def __exit__(self, *exc) -> None:
        self.release(self)


class RateMeter:
    """Exponentially weighted tokens, items and seconds per model batch; the rates are their ratios."""

    def __init__(self, alpha: float = 0.2):
        self.alpha = alpha
        self.tokens = self.items = self.seconds = 0.0
        self.batches = 0

    def record(self, tokens: int, items: int, seconds: float) -> None:
        a = self.alpha if self.batches else 1.0
        self.tokens += a * (tokens - self.tokens)
        self.items += a * (items - self.items)
        self.seconds += a * (max(seconds, 1e-6) - self.seconds)
        self.batches += 1

    def tokens_per_s(self) -> float | None:
        return self.tokens / self.seconds if self.batches else None

    def items_per_s(self) -> float | None:
        return self.items / self.seconds if self.batches else None

    def batch_seconds(self) -> float | None:
        return self.seconds if self.batches else None


class Admission:
    """The in-flight counts and the admission rule; every permit comes from `admit`."""

    def __init__(self, settings: ServeSettings, meter: RateMeter, observer=None):
        self.max_wait = settings.max_queue_wait_s
        self.max_items = settings.max_inflight_items  # 0: no item cap
        self.max_tokens = settings.max_queued_tokens  # 0: derived from the rate
        self.meter = meter
        self.observer = observer
        self.inflight_items = 0
        self.queued_tokens = 0  # admitted and not yet scored: estimates until tokenised, then real
        self._waiters: list[asyncio.Future] = []  # calls waiting at the gate for room, oldest first
        self.estimate_scale = 1.0  # real tokens over the bytes rule's estimate, learned as calls are tokenised

    def token_limit(self) -> int | None:
        """Queued tokens beyond which requests are refused (None until the rate is measured)."""
        if self.max_tokens:
            return self.max_tokens
        rate = self.meter.tokens_per_s()
        return None if rate is None else max(1, int(rate * self.max_wait))

    def expected_wait(self, extra_tokens: int = 0) -> float | None:
        """Seconds until `extra_tokens` more would be scored, at the measured rate."""
        rate = self.meter.tokens_per_s()
        return None if rate is None else (self.queued_tokens + extra_tokens) / rate

    def admit(self, items: int, tokens: int, ticket: Ticket, release: Callable[[Permit], None]) -> Permit:
        """A permit for `items` items of about `tokens` tokens (the bytes rule's estimate, scaled by
        what tokenising earlier calls showed), or Overloaded / Dropped at once."""
        estimated, tokens = tokens, max(items, math.ceil(tokens * self.estimate_scale))
        if ticket.expired():
            raise Dropped("the call's deadline passed or it was cancelled before it was admitted")
        self.refuse_when_full(items)
        wait, left = self.expected_wait(tokens), ticket.left()
        if wait is not None and left is not None and wait > left:
            self._refuse(
                "expected_wait",
                f"the expected wait, {wait:.2f} s, is longer than the {max(left, 0):.2f} s "
                "left before the call's deadline",
                wait - left,
            )
        self.inflight_items += items
        self.queued_tokens += tokens
        return Permit(items, tokens, ticket, release, estimated)

    def refuse_when_full(self, items: int = 1) -> None:
        """Overloaded at once when the queue has no room for `items` more, whatever their tokens."""
        full = self._full(items)
        if full is not None:
            self._refuse(*full)

    async def wait_for_room(self, hold_s: float) -> None:
        """Overloaded when the queue has no room for a call and none opens within `hold_s`.
        The transports await it before they read a request (gRPC: server.gate.RoomGate, before
        the request is received or parsed), so a refusal costs the RPC alone; and a caller that
        retries the moment it is refused is refused at most once per `hold_s`, whatever its own
        retry delay, so a crowd of them cannot take the model's CPU with refusals. A call that
        finds room meanwhile goes on (the longest waiter first)."""
        if self._full() is None:
            return
        if hold_s > 0:
            room = asyncio.get_running_loop().create_future()
            self._waiters.append(room)
            timer = asyncio.get_running_loop().call_later(hold_s, _settle, room)
            try:
                await room
            finally:
                timer.cancel()
                if room in self._waiters:
                    self._waiters.remove(room)
        self.refuse_when_full()

    def _full(self, items: int = 1) -> tuple[str, str, float] | None:
        """(reason, why, seconds until there is room) when the queue has no room for `items` more, else None."""
        if self.max_items and self.inflight_items + items > self.max_items:
            return (
                "inflight_items",
                f"{self.inflight_items} items in flight; the limit is {self.max_items}",
                self.meter.batch_seconds() or 1.0,
            )
        limit = self.token_limit()
        if limit is not None and self.queued_tokens >= limit:
            derived = "" if self.max_tokens else f" ({self.max_wait:g} s of work at the measured rate)"
            rate = self.meter.tokens_per_s()
            return (
                "queued_tokens",
                f"{self.queued_tokens} tokens queued; the limit is {limit}{derived}",
                (self.queued_tokens - limit + 1) / rate if rate else 1.0,
            )
        return None

    def _wake(self) -> None:
        """Room may have opened: the longest waiter at the gate goes on (one per change, so a
        freed slot is not promised to a crowd)."""
        while self._waiters and self._full() is None:
            room = self._waiters.pop(0)
            if not room.done():  # not one whose hold ran out meanwhile
                room.set_result(None)
                return

    def correct(self, permit: Permit, tokens: int) -> None:
        """Replace the permit's estimate by the tokens it really holds, once tokenised, and learn
        from the two how far the bytes rule overestimates this traffic and tokeniser."""
        if permit.estimated:
            seen = ESTIMATE_MARGIN * tokens / permit.estimated
            self.estimate_scale = min(1.0, max(ESTIMATE_FLOOR, 0.8 * self.estimate_scale + 0.2 * seen))
            permit.estimated = 0
        if not permit.gone:
            self.queued_tokens += tokens - permit.tokens
            permit.tokens = tokens

    def spend(self, permit: Permit, tokens: int) -> None:
        """`tokens` of the permit left the queue (scored or dropped)."""
        if not permit.gone:
            permit.tokens -= tokens
            self.queued_tokens -= tokens
            self._wake()

    def close(self, permit: Permit) -> None:
        """Give back what the permit still holds; idempotent."""
        if not permit.gone:
            permit.gone = True
            self.inflight_items -= permit.items
            self.queued_tokens -= permit.tokens
            permit.tokens = 0
            self._wake()

    def _refuse(self, reason: str, why: str, retry_after: float) -> None:
        """Overloaded, asking the caller to wait `retry_after` seconds (at least a batch, at most 30 s)."""
        if self.observer is not None:
            self.observer.rejected(reason)
        batch = self.meter.batch_seconds() or 0.05
        retry_after = min(30.0, max(batch, retry_after))
        raise Overloaded(f"{why}. Retry after {retry_after:.2f} s", retry_after)


def _settle(room: asyncio.Future) -> None:
    if not room.done():
        room.set_result(None)
