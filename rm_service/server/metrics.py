"""Prometheus metrics of one server: its own CollectorRegistry, the batcher observer hooks, an
RPC-counting interceptor and the /metrics HTTP endpoint.

| Metric | Type | Labels |
|---|---|---|
| rm_queue_depth | gauge | items waiting for a batch (Batcher.queue_depth()) |
| rm_inflight_items | gauge | items admitted and not yet answered |
| rm_queued_tokens | gauge | tokens admitted and not yet scored |
| rm_admission_token_limit | gauge | queued tokens at which requests are refused (rate x target wait, or the setting) |
| rm_model_tokens_per_second | gauge | the model's measured rate (real tokens/s, weighted over recent batches) |
| rm_fair_wait_seconds | gauge | the fairness bound: an item this long past its FCFS turn joins the next batch |
| rm_batch_size | histogram | items per model batch |
| rm_batch_padding_ratio | histogram | padded / real tokens per batch |
| rm_stage_seconds | histogram | stage = tokenise (per request), queue_wait (per item), inference (per batch) |
| rm_rejections_total | counter | reason: inflight_items, queued_tokens, expected_wait |
| rm_dropped_items_total | counter | reason |
| rm_scores_total | counter | version: items scored |
| rm_rpcs_total | counter | method, code |
| rm_rpc_seconds | histogram | method |
| rm_batch_fill_ratio | histogram | padded tokens / token budget (max_batch_tokens) per batch |
| rm_reward | histogram | version: the served (normalised) reward of each scored item |
| rm_item_tokens | histogram | version: tokens per scored item, after truncation |
| rm_truncated_items_total | counter | version: items cut at the version's max_tokens |
| rm_raw_score_window_mean, _std | gauge | version: raw score over the last WINDOW_ITEMS items |
| rm_raw_score_reference_mean, _std | gauge | version: raw score on its training items (version.json reward_mean/std) |
| rm_raw_score_drift_mean | gauge | version: (window mean - reference mean) / reference std |
| rm_raw_score_drift_std_ratio | gauge | version: window std / reference std |
| rm_reward_length_correlation | gauge | version: Pearson r of completion length (chars) and raw score over the window |
| rm_reward_length_correlation_reference | gauge | version: the same on its training items |
| rm_reward_window_items | gauge | version: items in the window |
| rm_http_requests_total | counter | route, status: finished requests to the HTTP reward routes and /health |
| rm_http_request_seconds | histogram | route |

The reward figures come from `observe_scores`, which the scoring core (server.scoring) calls for every item
it answers (gRPC Score and the HTTP routes; not ScoreTurns, whose per-turn rewards are not a
policy's final reward). Drift and reference gauges exist for registry versions only (an
external checkpoint has no reference statistics); the window is kept for the last
MAX_VERSIONS versions seen.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field

import grpc
import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily

from rm_service.server.handlers import behaviour, with_behaviour

log = logging.getLogger(__name__)

SECONDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
# Normalised rewards: 0 mean, unit std on the training items.
REWARD_BUCKETS = (-4, -3, -2, -1.5, -1, -0.5, 0, 0.5, 1, 1.5, 2, 3, 4)
TOKEN_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
FILL_BUCKETS = (0.1, 0.25, 0.5, 0.75, 0.9, 1.0)
WINDOW_ITEMS = 1000  # recent items per version behind the drift and length-correlation gauges
MAX_VERSIONS = 8  # versions whose windows are kept (the oldest seen goes first)


class Metrics:
    """One server's metrics. Also the batcher's observer: batch(), rejected(), dropped()."""

    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.queue_depth = Gauge("rm_queue_depth", "Score items waiting for a model batch.", registry=r)
        self.inflight_items = Gauge("rm_inflight_items", "Score items admitted and not yet answered.", registry=r)
        self.queued_tokens = Gauge("rm_queued_tokens", "Tokens admitted and not yet scored.", registry=r)
        self.token_limit = Gauge("rm_admission_token_limit", "Queued tokens at which requests are refused.", registry=r)
        self.model_rate = Gauge(
            "rm_model_tokens_per_second", "Measured model rate: real tokens/s over recent batches.", registry=r
        )
        self.fair_wait = Gauge(
            "rm_fair_wait_seconds",
            "Fairness bound: an item waiting this long past its first-come-first-served turn joins the next batch.",
            registry=r,
        )
        self.batch_size = Histogram(
            "rm_batch_size", "Items per model batch.", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024), registry=r
        )
        self.padding_ratio = Histogram(
            "rm_batch_padding_ratio",
            "Padded tokens / real tokens of a model batch (1: no padding).",
            buckets=(1.0, 1.05, 1.1, 1.25, 1.5, 2, 3, 5, 10),
            registry=r,
        )
        self.stage_seconds = Histogram(
            "rm_stage_seconds",
            "Latency of a stage: tokenise (per request), queue_wait (per item), inference (per batch).",
            ["stage"],
            buckets=SECONDS,
            registry=r,
        )
        self.rejections = Counter(
            "rm_rejections",
            "Score requests refused by admission control (RESOURCE_EXHAUSTED), by limit.",
            ["reason"],
            registry=r,
        )
        self.dropped_items = Counter(
            "rm_dropped_items",
            "Items dropped before the model: their request expired or was cancelled.",
            ["reason"],
            registry=r,
        )
        self.scores = Counter("rm_scores", "Items scored, by model version.", ["version"], registry=r)
        self.rpcs = Counter("rm_rpcs", "Finished RPCs, by method and status code.", ["method", "code"], registry=r)
        self.rpc_seconds = Histogram(
            "rm_rpc_seconds", "RPC latency, by method.", ["method"], buckets=SECONDS, registry=r
        )
        self.fill_ratio = Histogram(
            "rm_batch_fill_ratio",
            "Padded tokens of a model batch / the token budget (max_batch_tokens); "
            "over 1: one item longer than the budget.",
            buckets=FILL_BUCKETS,
            registry=r,
        )
        self.reward = Histogram(
            "rm_reward",
            "Served reward (normalised with the version's reference statistics) of each scored item.",
            ["version"],
            buckets=REWARD_BUCKETS,
            registry=r,
        )
        self.item_tokens = Histogram(
            "rm_item_tokens",
            "Tokens per scored item, after truncation.",
            ["version"],
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.truncated = Counter(
            "rm_truncated_items",
            "Scored items cut at the version's max_tokens (the start of the conversation goes first).",
            ["version"],
            registry=r,
        )
        self.windows = RewardWindows()
        r.register(self.windows)
        self.http_requests = Counter(
            "rm_http_requests",
            "Finished HTTP requests to the reward routes and /health, by route and status.",
            ["route", "status"],
            registry=r,
        )
        self.http_seconds = Histogram(
            "rm_http_request_seconds", "HTTP request latency, by route.", ["route"], buckets=SECONDS, registry=r
        )
        self._httpd = None

    def observe_scores(
        self, version: str, raw, reward, tokens, truncated, completion_chars, reference: Reference | None
    ) -> None:
        """The items of one scoring call, as answered: raw and served rewards, tokens, truncation
        and completion lengths [N] each; `reference` is None for a version without one (external)."""
        hist, toks = self.reward.labels(version), self.item_tokens.labels(version)
        for value, n in zip(reward, tokens, strict=True):
            hist.observe(float(value))
            toks.observe(n)
        cut = int(sum(bool(t) for t in truncated))
        if cut:
            self.truncated.labels(version).inc(cut)
        self.windows.add(version, raw, completion_chars, reference)

    # The batcher observer interface (rm_service.server.batcher).
    def batch(
        self,
        version: str,
        n_items: int,
        padded_tokens: int,
        real_tokens: int,
        seconds: float,
        queue_waits,
        budget: int | None = None,
    ) -> None:
        self.batch_size.observe(n_items)
        if budget:
            self.fill_ratio.observe(padded_tokens / budget)
        self.padding_ratio.observe(padded_tokens / max(real_tokens, 1))
        self.stage_seconds.labels("inference").observe(seconds)
        wait = self.stage_seconds.labels("queue_wait")
        for w in queue_waits:
            wait.observe(w)
        self.scores.labels(version).inc(n_items)

    def rejected(self, reason: str | None) -> None:
        self.rejections.labels(reason or "unknown").inc()

    def dropped(self, reason: str | None) -> None:
        self.dropped_items.labels(reason or "expired_or_cancelled").inc()

    def watch_batcher(self, batcher) -> None:
        """Read the queue, admission and rate figures from the batcher at scrape time."""
        self.queue_depth.set_function(batcher.queue_depth)
        self.inflight_items.set_function(lambda: batcher.inflight_items)
        self.queued_tokens.set_function(lambda: batcher.queued_tokens)
        self.token_limit.set_function(lambda: batcher.admission.token_limit() or 0)
        self.model_rate.set_function(lambda: batcher.meter.tokens_per_s() or 0)
        self.fair_wait.set_function(batcher.fair_wait)

    def stage(self, stage: str, seconds: float) -> None:
        """One measurement of a stage (RewardService reports tokenise through this)."""
        self.stage_seconds.labels(stage).observe(seconds)

    def http_request(self, route: str, status: int, seconds: float) -> None:
        """One finished HTTP request (server.http.reward_routes counts its routes through this)."""
        self.http_requests.labels(route, str(status)).inc()
        self.http_seconds.labels(route).observe(seconds)

    def serve_http(self, host: str, port: int) -> int:
        """Serve /metrics over HTTP on host:port (0: a free port) in a daemon thread; returns the port."""
        self._httpd, _ = start_http_server(port, addr=host, registry=self.registry)
        return self._httpd.server_port

    def close(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def interceptor(self) -> grpc.aio.ServerInterceptor:
        return _RpcInterceptor(self)


@dataclass(frozen=True)
class Reference:
    """A version's raw-score statistics on its training items (version.json reward_mean/std and
    metrics.reference_length_correlation)."""

    mean: float
    std: float
    length_correlation: float | None = None


@dataclass
class _Window:
    reference: Reference | None
    raw: deque = field(default_factory=lambda: deque(maxlen=WINDOW_ITEMS))
    length: deque = field(default_factory=lambda: deque(maxlen=WINDOW_ITEMS))


def pearson(x: np.ndarray, y: np.ndarray) -> float | None:
    """Pearson correlation, None where it is undefined (fewer than 3 points, or a constant)."""
    if len(x) < 3 or np.std(x) == 0 or np.std(y) == 0:
        return None
    return float(np.corrcoef(x, y)[0, 1])


class RewardWindows:
    """The last WINDOW_ITEMS (raw score, completion length) of each version, summarised at
    scrape time: drift from the version's reference statistics and the length correlation.
    Written on the event loop, read by the metrics HTTP thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._windows: OrderedDict[str, _Window] = OrderedDict()

    def add(self, version: str, raw, lengths, reference: Reference | None) -> None:
        with self._lock:
            w = self._windows.get(version)
            if w is None:
                w = self._windows[version] = _Window(reference)
                while len(self._windows) > MAX_VERSIONS:
                    self._windows.popitem(last=False)
            w.raw.extend(float(x) for x in raw)
            w.length.extend(float(n) for n in lengths)

    def summary(self, version: str) -> dict[str, float]:
        """The gauges of one version (what collect() exports)."""
        with self._lock:
            w = self._windows[version]
            raw, length, ref = np.array(w.raw), np.array(w.length), w.reference
        out = {
            "rm_reward_window_items": float(len(raw)),
            "rm_raw_score_window_mean": float(raw.mean()),
            "rm_raw_score_window_std": float(raw.std()),
        }
        r = pearson(length, raw)
        if r is not None:
            out["rm_reward_length_correlation"] = r
        if ref is not None:
            out.update(
                {
                    "rm_raw_score_reference_mean": ref.mean,
                    "rm_raw_score_reference_std": ref.std,
                    "rm_raw_score_drift_mean": (out["rm_raw_score_window_mean"] - ref.mean) / ref.std,
                    "rm_raw_score_drift_std_ratio": out["rm_raw_score_window_std"] / ref.std,
                }
            )
            if ref.length_correlation is not None:
                out["rm_reward_length_correlation_reference"] = ref.length_correlation
        return out

    def collect(self):
        with self._lock:
            versions = list(self._windows)
        families = {name: GaugeMetricFamily(name, help_, labels=["version"]) for name, help_ in WINDOW_GAUGES.items()}
        for version in versions:
            for name, value in self.summary(version).items():
                families[name].add_metric([version], value)
        yield from families.values()


WINDOW_GAUGES = {
    "rm_reward_window_items": f"Items in the version's window (the last {WINDOW_ITEMS} scored).",
    "rm_raw_score_window_mean": "Mean raw score over the version's window.",
    "rm_raw_score_window_std": "Standard deviation of the raw score over the version's window.",
    "rm_raw_score_reference_mean": "The version's raw-score mean on its training items (reward_mean).",
    "rm_raw_score_reference_std": "The version's raw-score standard deviation on its training items (reward_std).",
    "rm_raw_score_drift_mean": "(window mean - reference mean) / reference std: the served mean reward's shift.",
    "rm_raw_score_drift_std_ratio": "window std / reference std.",
    "rm_reward_length_correlation": "Pearson correlation of completion length (characters) and raw score over the "
    "window; rising above its reference is an early sign of a policy exploiting length.",
    "rm_reward_length_correlation_reference": "The same correlation on the version's training items.",
}


class _RpcInterceptor(grpc.aio.ServerInterceptor):
    """Counts every call to a known method by its final status code (auth refusals included
    when this interceptor runs before the auth one)."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None:  # unknown method: not counted, so callers cannot grow the label set
            return None
        method, fn = details.method, behaviour(handler)
        observed = self._observed
        if handler.response_streaming and inspect.isasyncgenfunction(fn):

            async def streaming(request, context):
                with observed(method, context):
                    async for response in fn(request, context):
                        yield response

            return with_behaviour(handler, streaming)

        async def unary(request, context):
            with observed(method, context):
                return await fn(request, context)

        return with_behaviour(handler, unary)

    @contextlib.contextmanager
    def _observed(self, method: str, context: grpc.aio.ServicerContext):
        """Time the call and count it by its final code: the exception's, else the context's, else OK."""
        start, code = time.perf_counter(), None
        try:
            yield
        except BaseException as exc:
            code = _code(context, exc)
            raise
        finally:
            self._done(method, code or context.code() or grpc.StatusCode.OK, start)

    def _done(self, method: str, code: grpc.StatusCode, start: float) -> None:
        seconds = time.perf_counter() - start
        self.metrics.rpcs.labels(method, code.name).inc()
        self.metrics.rpc_seconds.labels(method).observe(seconds)
        log.debug(
            "rpc %s %s %.4fs",
            method,
            code.name,
            seconds,
            extra={"method": method, "code": code.name, "seconds": round(seconds, 6)},
        )


def _code(context: grpc.aio.ServicerContext, exc: BaseException) -> grpc.StatusCode:
    if isinstance(exc, grpc.aio.AbortError):
        return context.code() or grpc.StatusCode.UNKNOWN
    if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.UNKNOWN
