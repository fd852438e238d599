"""Build, start and stop the gRPC server (grpc.aio).

Health (`grpc.health.v1`) reports only the services this process serves. The store's services
(PreferenceService, TrainingService) are SERVING once the port is bound; RewardService and the
overall status (service name "", what generic probes ask) are NOT_SERVING until the model is
loaded and warmed, then SERVING; everything is NOT_SERVING again while draining. A store-only
process (`--no-model`) has no RewardService entry: health answers NOT_FOUND for it. While the
model loads, Score answers UNAVAILABLE (retryable). Reflection lists every service, so grpcurl
works without .proto files.

Security (server.auth): with bearer tokens configured every call except health and reflection
needs a token with the method's role; without tokens the server binds loopback only. TLS (and
mutual TLS with a client CA) comes from SecuritySettings. Metrics (server.metrics) are served
over HTTP on `metrics_port` of the same host; the HTTP app (server.http: the reward routes that
OpenRLHF, verl and vLLM clients call, `/health`, and with the store the labeling page) on `http_port`.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import socket
import sys
from pathlib import Path

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from rm_service.api.v1 import (
    preference_pb2,
    preference_pb2_grpc,
    reward_pb2,
    reward_pb2_grpc,
    training_pb2,
    training_pb2_grpc,
    user_pb2,
    user_pb2_grpc,
)
from rm_service.errors import FailedPrecondition
from rm_service.server.auth import AuthInterceptor, Tokens, check_address_free, check_bind, server_credentials
from rm_service.server.batcher import Batcher
from rm_service.server.gate import RoomGate
from rm_service.server.handlers import DecodeGuard
from rm_service.server.http import HttpContext, HttpServer, create_app
from rm_service.server.metrics import Metrics
from rm_service.server.models import ServedModels, load_for_serving, load_pinned, resolve_for_serving
from rm_service.server.preference import PreferenceService
from rm_service.server.reward import RewardService
from rm_service.server.scoring import ScoringCore
from rm_service.server.swap import ModelsCollector, follow_registry
from rm_service.server.training import JobRunner, TrainingService
from rm_service.server.user import UserService
from rm_service.server.user_models import PROMOTED, follow_user_registry, load_user_model
from rm_service.settings import ModelSettings, SecuritySettings, ServeSettings, StoreSettings, TrainSettings
from rm_service.store.db import Store
from rm_service.store.writer import GroupCommitWriter
from rm_service.usermodel.settings import UserModelSettings

log = logging.getLogger(__name__)

REWARD_SERVICE = reward_pb2.DESCRIPTOR.services_by_name["RewardService"].full_name
USER_SERVICE = user_pb2.DESCRIPTOR.services_by_name["UserService"].full_name
MODEL_SERVICES = (REWARD_SERVICE, USER_SERVICE)  # NOT_SERVING until their models are loaded


class RewardServer:
    """One server process: the model(s) it serves and, unless disabled, the store."""

    def __init__(
        self,
        settings: ServeSettings,
        store_settings: StoreSettings | None = None,
        models: ModelSettings | None = None,
        security: SecuritySettings | None = None,
        train: TrainSettings | None = None,
        user: UserModelSettings | None = None,
    ):
        self.security = security or SecuritySettings()
        self.tokens = Tokens.from_settings(self.security)
        self.credentials = server_credentials(self.security)
        check_bind(
            settings.host, self.tokens, self.credentials is not None
        )  # gRPC, metrics and the HTTP app share the host
        self.metrics = Metrics()
        self.metrics_port: int | None = None
        self.settings = settings
        self.store_settings = store_settings or StoreSettings()
        self.models = models or ModelSettings()
        self.train = train or TrainSettings()
        self.store: Store | None = None
        self.jobs: JobRunner | None = None
        self.writer: GroupCommitWriter | None = None
        self.served = ServedModels(settings.max_loaded)
        if settings.with_model:
            self.metrics.registry.register(ModelsCollector(self.served))
        self.user_settings = user or UserModelSettings()
        self.served_users = ServedModels(what="user model")  # the user model beside the reward model, if any
        self.user: UserService | None = None
        self._user_follower: asyncio.Task | None = None
        self.health = health.aio.HealthServicer()
        self.server: grpc.aio.Server | None = None
        self.port: int | None = None
        self.batcher: Batcher | None = None
        self.reward: ScoringCore | None = None  # the scoring core that gRPC and HTTP adapt
        self.http: HttpServer | None = None
        self._follower: asyncio.Task | None = None
        self.services: list[str] = []  # the gRPC services this process serves, as health reports them
        self.ready = False  # loaded, warmed and not draining: what health's "" and HTTP /health report

    @property
    def readiness(self) -> str:
        """Why the server is (not) ready, for HTTP /health."""
        if self.ready:
            return "serving"
        if self.server is None or self.port is None:
            return "starting"
        return (
            "loading the reward model"
            if self.settings.with_model and self.served.loading
            else "not serving (starting or draining)"
        )

    async def _check_room(self) -> None:
        """The gate's question, once the scoring core exists: raises Overloaded when the queue is full."""
        if self.reward is not None:
            await self.reward.check_room(None)

    async def start(self) -> int:
        """Bind, then load the model (health NOT_SERVING meanwhile), then SERVING. Returns the port."""
        options = [
            ("grpc.max_receive_message_length", self.settings.max_message_bytes),
            ("grpc.max_send_message_length", self.settings.max_message_bytes),
            ("grpc.max_concurrent_streams", self.settings.max_concurrent_streams),
        ]
        torch.set_num_threads(self.settings.torch_threads or os.cpu_count() or 1)
        interceptors = (
            [self.metrics.interceptor()]
            + ([AuthInterceptor(self.tokens)] if self.tokens else [])
            + [RoomGate(self._check_room), DecodeGuard()]
        )
        self.server = grpc.aio.server(
            options=options,
            interceptors=interceptors,
            maximum_concurrent_rpcs=self.settings.max_concurrent_rpcs or None,
        )
        if not self.settings.with_store and not self.settings.with_model:
            raise FailedPrecondition("nothing to serve: both the store and the model are disabled")
        if self.settings.with_store:
            self.store = Store(self.store_settings)
            self.writer = GroupCommitWriter(self.store, self.store_settings.group_commit_max_labels)
        max_chars = self.store_settings.max_text_chars
        names = self.services
        if self.settings.with_model:
            st = self.settings
            self.batcher = Batcher(st, observer=self.metrics)
            self.metrics.watch_batcher(self.batcher)
            self.batcher.start()
            self.reward = ScoringCore(self.served, self.batcher, st, max_chars, observer=self.metrics)
            reward_pb2_grpc.add_RewardServiceServicer_to_server(RewardService(self.reward, self.store), self.server)
            names.append(REWARD_SERVICE)
            if st.user_model:
                self.user = UserService(self.served_users, self.reward, self.user_settings, max_chars)
                user_pb2_grpc.add_UserServiceServicer_to_server(self.user, self.server)
                names.append(USER_SERVICE)
        elif self.settings.user_model:
            raise FailedPrecondition("a user model is served beside a reward model: --user-model needs the model on")
        if self.store is not None:
            assert self.writer is not None  # opened with the store
            preference_pb2_grpc.add_PreferenceServiceServicer_to_server(
                PreferenceService(self.store, self.writer), self.server
            )
            self.jobs = JobRunner(self.store, self.train, self.models, on_version=self.served.announce)
            training_pb2_grpc.add_TrainingServiceServicer_to_server(TrainingService(self.jobs), self.server)
            names += [
                preference_pb2.DESCRIPTOR.services_by_name["PreferenceService"].full_name,
                training_pb2.DESCRIPTOR.services_by_name["TrainingService"].full_name,
            ]
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        extra = [health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME]
        reflection.enable_server_reflection(names + extra, self.server)
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        # Start-up errors before binding, each one line: the registry, then the address.
        target = (
            await asyncio.to_thread(resolve_for_serving, self.settings, self.store, self.models)
            if self.settings.with_model
            else None
        )
        check_address_free(self.settings.host, self.settings.port)
        host = f"[{self.settings.host}]" if ":" in self.settings.host else self.settings.host
        address = f"{host}:{self.settings.port}"
        try:
            if self.credentials is not None:
                self.port = self.server.add_secure_port(address, self.credentials)
            else:
                self.port = self.server.add_insecure_port(address)
        except RuntimeError as exc:  # gRPC's "Failed to bind to address": the port was taken since the check
            raise FailedPrecondition(f"cannot bind {address}: {exc}") from None
        await self.server.start()
        for name in self.services:  # the store's services work from here on; the model's wait for the model
            if name not in MODEL_SERVICES:
                await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "gRPC on %s:%d: %s, %s",
            self.settings.host,
            self.port,
            ("mutual TLS" if self.security.tls_client_ca else "TLS") if self.credentials else "plaintext",
            f"bearer tokens required ({len(self.tokens)} configured)"
            if self.tokens
            else "no authentication (loopback only)",
        )
        self._start_metrics()
        await self._start_http()
        if self.settings.with_model:
            log.info("listening on %s:%d; loading the model", self.settings.host, self.port)
            served = await asyncio.get_running_loop().run_in_executor(
                None, load_for_serving, self.settings, self.store, self.models, target
            )
            assert self.reward is not None  # made above, with the batcher
            await self.reward.warm_up(served)  # the first measured model rate, before any call is admitted
            self.served.swap_in(served, "loaded")
            log.info(
                "serving %s (%s) on %s:%d; model thread at nice +%d below the RPC threads, GIL switch interval %.2g ms",
                served.record.version,
                served.record.backbone,
                self.settings.host,
                self.port,
                self.settings.model_nice,
                sys.getswitchinterval() * 1000,
            )
            for name in self.settings.also_load:
                pinned = await asyncio.get_running_loop().run_in_executor(
                    None, load_pinned, name, self.settings, self.store, self.models
                )
                self.served.pin(pinned)
                log.info("also serving %s (%s) to callers that pin it", pinned.record.version, pinned.record.backbone)
            self.served.loading = False  # from here a version this process does not hold is NOT_FOUND, not UNAVAILABLE
            if self.user is not None:
                await self._load_user_model()
            # Start-up objects out of the collector's full passes (270 ms pauses seen); a released version is
            # collected by server.models.free_memory.
            gc.freeze()
            if self.settings.follow_registry and served.record.status != "external":
                self._follower = asyncio.get_running_loop().create_task(
                    follow_registry(self.served, self.settings, self.models, self.settings.watch_interval_s)
                )
        else:
            log.info("serving the store only on %s:%d", self.settings.host, self.port)
        self.ready = True
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        return self.port

    async def _load_user_model(self) -> None:
        name = self.settings.user_model
        assert name is not None  # called only when a user model is configured
        loop = asyncio.get_running_loop()
        served = await loop.run_in_executor(None, load_user_model, name, self.settings, self.store, self.models)
        self.served_users.swap_in(served, "loaded")
        self.served_users.loading = False
        log.info("serving user model %s (%s) beside the reward model", served.record.version, served.record.backbone)
        if name == PROMOTED and self.settings.follow_registry:
            self._user_follower = loop.create_task(follow_user_registry(self.served_users, self.settings, self.models))

    def _start_metrics(self) -> None:
        port = self.settings.metrics_port
        if port < 0:
            return
        try:
            self.metrics_port = self.metrics.serve_http(self.settings.host, port)
        except OSError as exc:
            if "metrics_port" in self.settings.model_fields_set:
                raise FailedPrecondition(
                    f"cannot serve metrics on {self.settings.host}:{port}: {exc.strerror}; set RM_SERVE_METRICS_PORT "
                    "(serve --metrics-port) to a free port, 0 for any, or -1 for none"
                ) from None
            log.warning(
                "metrics off: the default metrics port %d is taken (%s); set RM_SERVE_METRICS_PORT", port, exc.strerror
            )
            return
        log.info("metrics on http://%s:%d/metrics", self.settings.host, self.metrics_port)

    async def _start_http(self) -> None:
        """The HTTP app on http_port of the gRPC host, auth and TLS alike: the reward routes when this
        process serves a model, the labeling page when it holds the store, /health always."""
        if self.settings.http_port < 0:
            return
        app = create_app(
            HttpContext(
                self.store,
                self.writer,
                self.tokens,
                self.settings,
                self.reward,
                self.metrics,
                lambda: self.readiness,
                self.served.health if self.settings.with_model else dict,
                self.user,
            )
        )
        self.http = HttpServer(
            app, self.settings.host, self.settings.http_port, self.security, self.settings.grace_seconds, self.settings
        )
        await self.http.start()
        log.info(
            "HTTP on %s: %s",
            self.http.url,
            ", ".join(
                filter(
                    None,
                    [
                        "reward routes" if self.reward else "",
                        "POST /simulate_user" if self.user else "",
                        "labeling page" if self.store else "",
                        "/health",
                    ],
                )
            ),
        )

    async def _set_health(self, status) -> None:
        for service in ("", *self.services):
            await self.health.set(service, status)

    async def stop(self) -> None:
        """Drain: health NOT_SERVING, refuse new calls, let in-flight calls finish, close the store."""
        self.ready = False
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        for follower in (self._follower, self._user_follower):
            if follower is not None:
                follower.cancel()
        if self.server is not None:
            await self.server.stop(self.settings.grace_seconds)  # new calls: UNAVAILABLE; in-flight ones finish
        if self.http is not None:
            await self.http.stop()  # before the writer closes: a label in flight is committed
            self.http = None
        await asyncio.to_thread(self.metrics.close)
        if self.reward is not None:
            await asyncio.to_thread(self.reward.close)
        if self.batcher is not None:
            await self.batcher.stop()
            self.batcher = None
        if self.jobs is not None:
            await asyncio.to_thread(self.jobs.close)  # a running retrain finishes and is recorded
            self.jobs = None
        if self.writer is not None:
            await asyncio.to_thread(self.writer.close)  # commit what is queued
            self.writer = None
        if self.store is not None:
            self.store.checkpoint()
            self.store.close()
            self.store = None


async def serve_forever(
    settings: ServeSettings, port_file: Path | None = None, security: SecuritySettings | None = None
) -> None:
    """Run until SIGTERM or SIGINT, then drain and exit."""
    server = RewardServer(settings, security=security)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        port = await server.start()
        if port_file is not None:
            port_file.write_text(str(port))
        what = server.served.default if settings.with_model else "the preference store"
        print(f"rm-service serving {what} on {settings.host}:{port}", flush=True)
        if server.http is not None and server.store is not None:
            print(f"labeling page on {server.http.url}", flush=True)
        if server.http is not None and server.reward is not None:
            print(
                f"HTTP reward routes on {server.http.url} (POST /get_reward, /classify, /pooling; GET /health)",
                flush=True,
            )
        await stop.wait()
        log.info("shutting down: draining in-flight calls")
    finally:
        await server.stop()
    print("rm-service stopped cleanly", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
