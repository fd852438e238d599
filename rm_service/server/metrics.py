"""Prometheus metrics of one server: its own CollectorRegistry, the batcher observer hooks, an
RPC-counting interceptor and the /metrics HTTP endpoint.

| Metric | Type | Labels |
|---|---|---|
| rm_queue_depth | gauge | items waiting for a batch (Batcher.queue_depth()) |
| rm_inflight_items | gauge | items admitted and not yet answered |
| rm_queued_tokens | gauge | tokens admitted and not yet scored |
| rm_admission_token_limit | gauge | queued tokens at which requests are refused (measured rate x target wait, or the setting) |
| rm_model_tokens_per_second | gauge | the model's measured rate (real tokens/s, weighted over recent batches) |
| rm_fair_wait_seconds | gauge | the fairness bound: an item waiting this long past its first-come-first-served turn joins the next batch |
| rm_batch_size | histogram | items per model batch |
| rm_batch_padding_ratio | histogram | padded / real tokens per batch |
| rm_stage_seconds | histogram | stage = tokenise (per request), queue_wait (per item), inference (per batch) |
| rm_rejections_total | counter | reason: inflight_items, queued_tokens, expected_wait |
| rm_dropped_items_total | counter | reason |
| rm_scores_total | counter | version: items scored |
| rm_rpcs_total | counter | method, code |
| rm_rpc_seconds | histogram | method |
| rm_http_requests_total | counter | route, status: finished requests to the HTTP reward routes and /health |
| rm_http_request_seconds | histogram | route |
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from rm_service.server.handlers import behaviour, with_behaviour

log = logging.getLogger(__name__)

SECONDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    """One server's metrics. Also the batcher's observer: batch(), rejected(), dropped()."""

    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.queue_depth = Gauge("rm_queue_depth", "Score items waiting for a model batch.", registry=r)
        self.inflight_items = Gauge("rm_inflight_items", "Score items admitted and not yet answered.", registry=r)
        self.queued_tokens = Gauge("rm_queued_tokens", "Tokens admitted and not yet scored.", registry=r)
        self.token_limit = Gauge("rm_admission_token_limit", "Queued tokens at which requests are refused.", registry=r)
        self.model_rate = Gauge("rm_model_tokens_per_second", "Measured model rate: real tokens/s over recent batches.", registry=r)
        self.fair_wait = Gauge("rm_fair_wait_seconds", "Fairness bound: an item waiting this long past its first-come-first-served turn joins the next batch.", registry=r)
        self.batch_size = Histogram("rm_batch_size", "Items per model batch.",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024), registry=r)
        self.padding_ratio = Histogram("rm_batch_padding_ratio", "Padded tokens / real tokens of a model batch (1: no padding).",
                                       buckets=(1.0, 1.05, 1.1, 1.25, 1.5, 2, 3, 5, 10), registry=r)
        self.stage_seconds = Histogram("rm_stage_seconds", "Latency of a stage: tokenise (per request), queue_wait (per item), "
                                       "inference (per batch).", ["stage"], buckets=SECONDS, registry=r)
        self.rejections = Counter("rm_rejections", "Score requests refused by admission control (RESOURCE_EXHAUSTED), by limit.",
                                  ["reason"], registry=r)
        self.dropped_items = Counter("rm_dropped_items", "Items dropped before the model: their request expired or was cancelled.",
                                     ["reason"], registry=r)
        self.scores = Counter("rm_scores", "Items scored, by model version.", ["version"], registry=r)
        self.rpcs = Counter("rm_rpcs", "Finished RPCs, by method and status code.", ["method", "code"], registry=r)
        self.rpc_seconds = Histogram("rm_rpc_seconds", "RPC latency, by method.", ["method"], buckets=SECONDS, registry=r)
        self.http_requests = Counter("rm_http_requests", "Finished HTTP requests to the reward routes and /health, by route and status.",
                                     ["route", "status"], registry=r)
        self.http_seconds = Histogram("rm_http_request_seconds", "HTTP request latency, by route.", ["route"], buckets=SECONDS, registry=r)
        self._httpd = None

    # The batcher observer interface (rm_service.server.batcher).
    def batch(self, version: str, n_items: int, padded_tokens: int, real_tokens: int, seconds: float, queue_waits) -> None:
        self.batch_size.observe(n_items)
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
        log.debug("rpc %s %s %.4fs", method, code.name, seconds, extra={"method": method, "code": code.name, "seconds": round(seconds, 6)})


def _code(context: grpc.aio.ServicerContext, exc: BaseException) -> grpc.StatusCode:
    if isinstance(exc, grpc.aio.AbortError):
        return context.code() or grpc.StatusCode.UNKNOWN
    if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.UNKNOWN
