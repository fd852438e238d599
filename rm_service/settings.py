"""Settings: one pydantic model per component, every field overridable by environment.

Environment names are the prefix plus the field name in upper case, e.g. `RM_SERVE_PORT=50051`
or `RM_TRAIN_BACKBONE=minilm-l6`. `RM_HOME` sets the service home (default `./var`), under
which the store file, model artifacts and the model cache live unless set otherwise.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from rm_service.settings_http import HttpServeSettings, comma_list
from rm_service.settings_train import Device
from rm_service.settings_train import TrainSettings as TrainSettings  # its own module for length; imported from here


def rm_home() -> Path:
    """The service home directory: `$RM_HOME`, default `./var`."""
    return Path(os.environ.get("RM_HOME", "var")).resolve()


class StoreSettings(BaseSettings):
    """The DuckDB preference store."""

    model_config = SettingsConfigDict(env_prefix="RM_STORE_")

    path: Path = Field(
        default_factory=lambda: rm_home() / "rm.duckdb", description="DuckDB file of the preference store."
    )
    max_text_chars: int = Field(32_000, gt=0, description="Longest accepted message or response, in characters.")
    max_responses: int = Field(16, ge=2, description="Most responses a single label may rank (K).")
    max_strength: float = Field(1000.0, gt=0, description="Largest accepted label strength (a margin; finite, >= 0).")
    group_commit_max_labels: int = Field(
        4096,
        ge=1,
        description="Most labels the writer commits in one transaction; 1 = one transaction per request (no group "
        "commit).",
    )


class ModelSettings(BaseSettings):
    """Where models and artifacts live."""

    model_config = SettingsConfigDict(env_prefix="RM_MODELS_")

    cache_dir: Path = Field(
        default_factory=lambda: rm_home() / "cache" / "models",
        description="Bundled models converted to HF directories (GGUF dequantised once) are cached here.",
    )
    artifacts_dir: Path = Field(
        default_factory=lambda: rm_home() / "registry",
        description="Reward-model versions: one directory per version.",
    )


class ServeSettings(HttpServeSettings):
    """The gRPC reward server."""

    model_config = SettingsConfigDict(env_prefix="RM_SERVE_")

    host: str = Field(
        "127.0.0.1", description="Address to bind; a non-loopback address needs bearer tokens (tokens_file)."
    )
    port: int = Field(50051, ge=0, le=65535, description="Port to bind; 0 picks a free one.")
    model: str | None = Field(
        None,
        description="Serve this model (a registry version, a bundled name or an HF directory) instead of the "
        "promoted version.",
    )
    device: Device = Field("auto", description="Device for the model: auto (CUDA when present), cpu, cuda or cuda:N.")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto",
        description="Precision of the served model: auto = bf16 on CUDA, and on a CPU the faster of fp32 and bf16 "
        "weights as measured on a layer of the model, once per machine (models/precision.py); golden pairs are "
        "checked in the precision served (auto falls back to fp32 for a version whose bf16 check fails).",
    )
    backend: Literal["auto", "torch", "onnx"] = Field(
        "auto",
        description="What runs batches: auto = PyTorch in the chosen precision, except ONNX Runtime when that "
        "precision is fp32 on a CPU and the version has an ONNX export (always PyTorch on CUDA).",
    )
    user_model: str | None = Field(
        None,
        description="Serve a user model beside the reward model (UserService.SimulateUser, POST /simulate_user): "
        "`promoted` (the registry's promoted user model, followed through promotions), a user version (u3), a version "
        "directory, or a causal LM served untuned. Unset: none. Its serving limits are UserModelSettings' (RM_USER_*).",
    )
    also_load: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Versions (registry names or version directories) kept loaded beside the served one, never "
        "swapped out, for clients that pin them: e.g. a gold reward model scored beside the proxy. "
        "Comma-separated.",
    )
    onnx_int8: bool = Field(
        False,
        description="Serve the int8 ONNX model when the version kept one (it passed the 99% pair-ordering check).",
    )
    max_items_per_request: int = Field(
        512, gt=0, description="Most items one Score request may carry (INVALID_ARGUMENT above)."
    )
    max_batch_tokens: int = Field(
        2048,
        ge=0,
        description="Token budget of one model batch (padded tokens: count x longest). 0 = measured at start on the "
        "served model: budgets doubling from 1024 while tokens/s still rises, the smallest within 5% of the best "
        "(logged; server.budget). A CPU peaks at a few thousand, a GPU at tens of thousands (raise it there, or "
        "measure). 2048 by default: under OpenRLHF's 128 one-item calls (bench/openrlhf_rewards.py, 2 cores) the "
        "measured 1024 lost 24 of 256 rewards and served 878 tokens/s, 2048 lost none at 967-990.",
    )
    max_padding: float = Field(
        0.3,
        ge=0,
        le=1,
        description="An item that is not yet due joins a batch only while padding the batch's not-yet-due rows to "
        "its longest item wastes at most this fraction of their tokens (due items join whatever their length).",
    )
    fair_wait_s: float = Field(
        0.0,
        ge=0,
        description="Fairness bound: an item still waiting this long after its first-come-first-served turn (the "
        "first batch formed while the items queued before it, its own included, fit one batch's token budget) "
        "joins the next batch whatever its length. 0 "
        "= 8 x the measured mean batch time (4 let padding grow to 1.5x under overload in a simulation of "
        "bench/overload.py's queue; 6 and more kept it at 1.13-1.18 with the same longest wait).",
    )
    max_queue_wait_s: float = Field(
        30.0,
        gt=0,
        description="Longest queue admission accepts: unless max_queued_tokens is set, a call is refused "
        "(RESOURCE_EXHAUSTED, with a retry pushback) while the work queued ahead of it is this many seconds at the "
        "measured model rate. "
        "Below that every call queues whatever its size, so a trainer's own concurrency (OpenRLHF's 64-128 one-item "
        "calls without a deadline, a PPO step's 512-item calls) waits its turn instead of being refused; a call "
        "with a deadline is also refused when it could not finish before it.",
    )
    room_wait_ms: float = Field(
        20.0,
        ge=0,
        le=10_000,
        description="A Score, ScoreTurns or SimulateUser call that finds the queue full waits this long for room, "
        "its request unread, before it is refused (the longest waiter goes first when room opens): a caller that "
        "retries the moment it is refused is then refused at most once per wait, so a crowd of them cannot take the "
        "model's CPU with refusals. 0 = refuse at once.",
    )
    max_inflight_items: int = Field(
        0,
        ge=0,
        description="Items admitted and not yet answered; beyond it Score answers RESOURCE_EXHAUSTED at once. 0 = no "
        "item cap.",
    )
    max_queued_tokens: int = Field(
        0,
        ge=0,
        description="Tokens admitted and not yet scored at which requests are refused (RESOURCE_EXHAUSTED at once). "
        "0 = the measured model rate x max_queue_wait_s.",
    )
    max_wait_ms: float = Field(
        0.0,
        ge=0,
        description="Wait this long before forming a batch (0: no timer; a batch leaves when the model is free).",
    )
    score_turns_max_turns: int = Field(
        64, gt=0, description="Most assistant turns one ScoreTurns call may score (INVALID_ARGUMENT above)."
    )
    score_turns_max_tokens: int = Field(
        8192,
        gt=0,
        description="Most tokens one ScoreTurns conversation may hold, formatted before truncation (INVALID_ARGUMENT "
        "above).",
    )
    follow_registry: bool = Field(
        True, description="Hot-swap to each version the registry promotes (polls promoted.json)."
    )
    watch_interval_s: float = Field(1.0, gt=0, description="How often to look for a promotion.")
    max_message_bytes: int = Field(16 * 1024 * 1024, gt=0, description="Largest gRPC message accepted or sent.")
    max_concurrent_rpcs: int = Field(
        512,
        ge=0,
        description="gRPC calls held at once, queued ones included (grpc refuses more before Python runs). 0: any.",
    )
    max_concurrent_streams: int = Field(
        128, ge=1, description="HTTP/2 streams per gRPC connection; a client with more in flight queues them itself."
    )
    grace_seconds: float = Field(10.0, ge=0, description="On shutdown, how long in-flight calls may take to finish.")
    with_store: bool = Field(
        True, description="Open the preference store and serve PreferenceService from this process."
    )
    with_model: bool = Field(
        True, description="Load a reward model and serve RewardService (off: a store-only process)."
    )
    torch_threads: int = Field(0, ge=0, description="Intra-op threads for torch; 0 = number of cores.")
    model_nice: int = Field(
        0,
        ge=0,
        le=19,
        description="How many nice steps the model thread and the OpenMP workers it starts run below the server's "
        "RPC threads (Linux): above 0, refusals, health checks and metrics are answered first when the CPU is "
        "oversubscribed, but every thread at nice 0 that wakes (the RPC threads, any other process) preempts an "
        "OpenMP worker and stalls the batch at its next barrier. bench/served_forward.py, 2 cores, one locked run "
        "each: served tokens/s 0.89-0.93x a bare loop at 0, 0.72-0.87x at 10. bench/overload.py at 4x load: "
        "rejection p99 55-56 ms at 0, 25-59 ms at 10; with callers retrying 10 ms after a refusal, goodput the same "
        "at both (60-72% of 1x) and refusal p99 4-6 ms slower at 0.",
    )
    gil_switch_interval_ms: float = Field(
        0.5,
        gt=0,
        le=100,
        description="Python's GIL switch interval in `rm-service serve` (sys.setswitchinterval; Python's default is "
        "5 ms): the longest the event loop waits for the GIL while the tokeniser or the model thread holds it. "
        "bench/overload.py, 2 cores at 4x load with model_nice 10: rejection p99 25-59 ms at 5 ms, 45-84 ms at 1 ms, "
        "28-34 ms at 0.5 ms.",
    )
    metrics_port: int = Field(
        9464,
        ge=-1,
        le=65535,
        description="Prometheus /metrics HTTP port, bound on the same host as gRPC; 0 picks a free one, -1 turns "
        "metrics off. If the default port is taken the server logs a warning and runs without metrics; a port set "
        "explicitly must bind.",
    )
    log_format: Literal["text", "json"] = Field(
        "text", description="Log lines as text, or json: one object per line with time, level, logger, message."
    )
    max_loaded: int = Field(
        2, ge=1, description="Versions kept loaded besides also_load; older ones go before a promoted one loads."
    )
    weight_memory_gb: float = Field(
        0.0, ge=0, description="GB cap on loaded weights; loads past it are refused (0: 90% of a GPU, no CPU cap)."
    )
    load_retry_s: float = Field(10.0, gt=0, description="Retry a failed load after this many s, doubled each time.")
    load_retry_max_s: float = Field(600.0, gt=0, description="Longest wait between two tries of a failed load.")

    @field_validator("also_load", mode="before")
    @classmethod
    def _split_names(cls, value):
        return comma_list(value)


class SecuritySettings(BaseSettings):
    """Authentication (bearer tokens with roles) and TLS for the gRPC server. Off by default: a
    server without tokens binds loopback addresses only."""

    model_config = SettingsConfigDict(env_prefix="RM_AUTH_")

    tokens_file: Path | None = Field(
        None,
        description="File of bearer tokens, one `role:token` per line (roles: scorer, labeler, admin; # starts a "
        "comment). Keeps secrets off the command line; make it readable by the server's user only.",
    )
    tokens: SecretStr | None = Field(
        None, description="Bearer tokens as `role:token,role:token`, added to those of tokens_file. Prefer tokens_file."
    )
    tls_cert: Path | None = Field(
        None, description="PEM certificate chain of the server; with tls_key, serve TLS only."
    )
    tls_key: Path | None = Field(None, description="PEM private key of tls_cert.")
    tls_client_ca: Path | None = Field(
        None,
        description="PEM CA bundle for mutual TLS: clients must present a certificate signed by it (needs tls_cert).",
    )
