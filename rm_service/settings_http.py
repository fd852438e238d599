"""ServeSettings' HTTP fields (the listener beside gRPC, its limits, the labeling page's lease),
in a module of their own so settings.py stays readable; ServeSettings inherits them, so their
environment names keep its prefix (`RM_SERVE_HTTP_PORT`...)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode


class HttpServeSettings(BaseSettings):
    """The HTTP listener of the reward server (docs/http.md)."""

    http_port: int = Field(
        -1,
        ge=-1,
        le=65535,
        description="HTTP port, bound on the same host as gRPC with the same rules (bearer tokens, TLS): the reward "
        "routes OpenRLHF, verl and vLLM clients call (docs/http.md) when this process serves a model, the labeling "
        "page (docs/labeling.md) when it holds the store, GET /health and /metrics always. 0 picks a free one, -1 "
        "(default) serves no HTTP.",
    )
    labeling_lease_s: int = Field(
        120,
        ge=1,
        le=24 * 3600,
        description="Lease of a task on the labeling page; the open page renews it every third of this, so a closed "
        "page frees its task within this time.",
    )
    http_allowed_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Names the HTTP Host header may carry (comma-separated; * for any): requests for other "
        "names are refused (400), which stops DNS rebinding. Empty = the bound address, plus localhost, "
        "127.0.0.1 and ::1 on a loopback bind; a wildcard bind (0.0.0.0, ::) accepts any name.",
    )
    http_header_timeout_s: float = Field(
        10.0,
        gt=0,
        description="An HTTP connection that has not sent a whole request head (line and headers) this long "
        "after it opened, or after its last answer, is closed.",
    )
    http_body_timeout_s: float = Field(
        60.0,
        gt=0,
        description="An HTTP request whose body has not fully arrived this long after its head is closed (a "
        "client sending 1 byte/s holds no connection longer).",
    )
    http_keep_alive_s: int = Field(
        5, ge=1, description="An idle keep-alive HTTP connection is closed after this many seconds (uvicorn's)."
    )
    http_max_connections: int = Field(
        512,
        ge=1,
        description="Open HTTP connections (and requests in progress) beyond which a request is answered 503 at once "
        "(uvicorn's limit_concurrency).",
    )
    http_access_log: bool = Field(
        True,
        description="One INFO line per HTTP request (method, path, status, seconds, client) on the "
        "rm_service.http.access logger. Every 4xx is logged with its reason either way (rate-limited).",
    )
    http_chat_template: Literal["auto", "chatml", "llama3", "gemma", "mistral", "raw"] = Field(
        "auto",
        description="The chat template of the rendered text the HTTP reward routes parse back into messages "
        "(OpenRLHF's query, a vLLM input): auto = the template whose turn marker comes first in each text; raw = "
        "no parsing: each text (or token-id list) is scored as it is, tokenised with the reward model's tokenizer "
        "without special tokens, as OpenRLHF's serve_rm scores a query (docs/http.md). Messages always go "
        "through the version's formatting contract.",
    )

    @field_validator("http_allowed_hosts", mode="before")
    @classmethod
    def _split_hosts(cls, value):
        return comma_list(value)


def comma_list(value):
    """A comma-separated environment value as a list of its non-empty names (lists pass as they are)."""
    return [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else value
