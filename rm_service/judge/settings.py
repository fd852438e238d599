"""JudgeSettings: every knob of `rm-service judge`, settable as RM_JUDGE_<FIELD>."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# The judge backends: rm_service.judge.annotators.ANNOTATORS opens each (and checks this list against it).
BackendName = Literal["local", "http", "rm", "turns"]


class JudgeSettings(BaseSettings):
    """LLM-as-judge labeling (`rm-service judge`): backends, position swap, retries, the queue."""

    model_config = SettingsConfigDict(env_prefix="RM_JUDGE_")

    # -- which judge -------------------------------------------------------------------------
    backend: BackendName = Field(
        "local",
        description="local: an HF causal LM run in this process; http: an OpenAI-compatible chat-completions "
        "endpoint (vLLM, llama.cpp server, hosted APIs); rm: a reward model scores every response (a stronger or "
        "gold reward model as the annotator); turns: a served reward-model version's ScoreTurns gives thumbs and an "
        "outcome on SESSION tasks (played conversations; rm_service/judge/sessions.py).",
    )
    model: str = Field(
        "smollm2-135m-instruct",
        description="Judge model: for local a bundled name or HF directory, for http the served model name (several, "
        "comma-separated, form a panel that votes); for rm a registry version (name or directory) or a reward "
        "checkpoint; for turns a version the server (`server`) has loaded.",
    )
    decision: Literal["choice", "generate"] = Field(
        "choice",
        description="choice: compare the next-token log-probabilities of the verdict letters after the rubric (one "
        "forward pass, always parseable; http needs logprobs); generate: let the judge write a rationale and a "
        "strict [[A]]/[[B]]/[[C]] verdict.",
    )
    inconsistent: Literal["calibrate", "tie", "skip"] = Field(
        "calibrate",
        description="When the verdict changes with the order of the replies: calibrate decides by the margin summed "
        "over both orders (Balanced Position Calibration; a split generate verdict becomes a tie), tie stores a tie "
        "(MT-Bench's rule), skip stores no outcome.",
    )
    kway: Literal["tournament", "direct"] = Field(
        "tournament",
        description="K > 2 responses: tournament judges every pair (both orders) and ranks by wins; direct asks for "
        "one ranking in both orders (needs decision=generate).",
    )
    template_file: Path | None = Field(
        None,
        description="TOML file (version, kind = pairwise or ranking, system, user) replacing the built-in prompt "
        "template of that kind.",
    )
    choice_tie_margin: float = Field(
        0.0,
        ge=0,
        description="choice: a verdict (one order's, or the calibrated mean of both) is a tie when the letters' "
        "log-probabilities differ by at most this.",
    )
    rm_tie_margin: float = Field(
        0.0, ge=0, description="rm: responses whose rewards differ by at most this tie (0: only equal rewards tie)."
    )
    max_new_tokens: int = Field(256, gt=0, description="generate: most tokens the judge may write per answer.")
    temperature: float = Field(
        0.0, ge=0, description="generate: sampling temperature of the first attempt (0 = greedy)."
    )
    parse_retries: int = Field(
        1,
        ge=0,
        description="generate: extra attempts (at retry_temperature) when an answer has no valid verdict; then the "
        "item is counted and skipped.",
    )
    retry_temperature: float = Field(
        0.7, ge=0, description="generate: sampling temperature of the retries after an unparseable answer."
    )
    max_conversation_chars: int = Field(
        2000, gt=0, description="The conversation shown to the judge keeps its last this-many characters."
    )
    max_response_chars: int = Field(
        1500, gt=0, description="Each response shown to the judge keeps its first this-many characters."
    )

    # -- local backend -----------------------------------------------------------------------
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="local: device of the judge model; auto picks CUDA when present."
    )
    torch_threads: int = Field(
        0,
        ge=0,
        description="local: torch intra-op threads for the whole process (0 = leave torch's default). 1 is much "
        "faster on a CPU that other processes keep busy.",
    )

    # -- http backend ------------------------------------------------------------------------
    base_url: str = Field(
        "http://127.0.0.1:8000/v1",
        description="http: base URL of the OpenAI-compatible API (POST {base_url}/chat/completions).",
    )
    api_key: SecretStr | None = Field(None, description="http: sent as `Authorization: Bearer <key>`; never logged.")
    timeout_s: float = Field(
        60.0, gt=0, description="http: seconds one request may take before it is abandoned and retried."
    )
    max_retries: int = Field(
        4, ge=0, description="http: retries of a request after a timeout, a connection error, 429 or 5xx."
    )
    backoff_s: float = Field(
        0.5,
        ge=0,
        description="http: first retry delay; doubles with each retry (with jitter), capped by max_backoff_s. "
        "Retry-After is honoured.",
    )
    max_backoff_s: float = Field(10.0, ge=0, description="http: longest delay between two retries.")
    top_logprobs: int = Field(
        20, ge=1, description="http, choice: top_logprobs requested for the verdict token (OpenAI allows at most 20)."
    )
    concurrency: int = Field(
        4,
        ge=1,
        description="Judge calls in flight at once (items judged concurrently; for http also the limit of open "
        "requests).",
    )
    max_consecutive_errors: int = Field(
        5, ge=1, description="Abort the run after this many items in a row failed at the backend (after its retries)."
    )

    # -- the rm-service server ---------------------------------------------------------------
    server: str = Field(
        "127.0.0.1:50051", description="gRPC address of the rm-service store server (LeaseTasks, IngestLabels)."
    )
    server_token: SecretStr | None = Field(
        None, description="Bearer token (labeler role) for the rm-service server, when it requires tokens."
    )
    server_tls_ca: Path | None = Field(
        None, description="PEM CA bundle: connect to the rm-service server with TLS, verifying it against this bundle."
    )
    rpc_timeout_s: float = Field(30.0, gt=0, description="Deadline of each call to the rm-service server.")
    owner: str | None = Field(
        None, description="Lease owner recorded with leased tasks (default: judge:<model>@<host>)."
    )
    lease_seconds: int = Field(
        600, gt=0, description="Lease length; a task leased by a run that stopped returns to the queue after it."
    )
    poll_interval_s: float = Field(2.0, gt=0, description="With --follow: how often an empty queue is polled again.")

    @model_validator(mode="after")
    def _direct_needs_generate(self) -> JudgeSettings:
        if self.kway == "direct" and self.decision != "generate":
            raise ValueError("kway=direct asks the judge to write a ranking: it needs decision=generate")
        if not self.models:
            raise ValueError("model: name at least one judge model")
        return self

    @property
    def models(self) -> list[str]:
        """The judge panel: one model, or several that vote."""
        return [m.strip() for m in self.model.split(",") if m.strip()]
