"""The one way every rm-service client opens a gRPC channel: TLS, a bearer token, message sizes.

    channel = open_channel("rm.example:50051", token="...", tls_ca=open("ca.pem", "rb").read())
    channel = open_channel("127.0.0.1:50051", aio=True)            # a grpc.aio channel

- `tls_ca` (PEM bytes): TLS, verifying the server against that CA bundle; `tls_cert` and
  `tls_key` add a client certificate (mutual TLS); `tls_name` checks the server certificate
  for another name than the address's host (a certificate issued for `localhost`, say).
- `token`: sent as `authorization: Bearer <token>` on every call. Over TLS through gRPC's call
  credentials; over plaintext (the server allows it on loopback, and warns elsewhere) through
  an interceptor, since gRPC refuses call credentials on insecure channels.
- `max_message_bytes`: the send and receive limits (gRPC's default receive limit is 4 MiB,
  which a batch of long conversations passes).
- `service_config`: gRPC's service config, by default SERVICE_CONFIG: Score and ScoreTurns
  refused with RESOURCE_EXHAUSTED or UNAVAILABLE are retried by the channel itself, after the
  server's `grpc-retry-pushback-ms` when it sends one (rm-service does on every refusal), and
  retry throttling stops those retries while most calls to the server fail, so clients never
  multiply an overload. `None` turns it off.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import grpc

MAX_MESSAGE_BYTES = 64 << 20

# gRPC retry design (A6): up to 3 attempts; each failure takes a token from a bucket of 10 and
# each answer gives back 0.1, and retries stop while fewer than 5 tokens are left.
SERVICE_CONFIG = {
    "methodConfig": [
        {
            "name": [{"service": "rm.v1.RewardService", "method": m} for m in ("Score", "ScoreTurns")],
            "retryPolicy": {
                "maxAttempts": 3,
                "initialBackoff": "0.2s",
                "maxBackoff": "5s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["RESOURCE_EXHAUSTED", "UNAVAILABLE"],
            },
        }
    ],
    "retryThrottling": {"maxTokens": 10, "tokenRatio": 0.1},
}


def open_channel(
    address: str,
    token: str | None = None,
    tls_ca: bytes | None = None,
    *,
    tls_cert: bytes | None = None,
    tls_key: bytes | None = None,
    tls_name: str | None = None,
    max_message_bytes: int = MAX_MESSAGE_BYTES,
    options: Sequence[tuple[str, object]] = (),
    aio: bool = False,
    service_config: dict | None = SERVICE_CONFIG,
):
    """A channel to `address` (host:port, or any gRPC target); a grpc.aio channel when `aio`."""
    if (tls_cert is None) != (tls_key is None):
        raise ValueError("a client certificate needs both tls_cert and tls_key")
    if tls_ca is None and tls_cert is not None:
        raise ValueError("a client certificate (mutual TLS) needs tls_ca, the CA bundle that verifies the server")
    if token is not None and not token.strip():
        raise ValueError("token is empty")
    opts = [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        *options,
    ]
    if service_config is not None:
        opts += [("grpc.enable_retries", 1), ("grpc.service_config", json.dumps(service_config))]
    if tls_name:
        opts.append(("grpc.ssl_target_name_override", tls_name))
    grpc_ = grpc.aio if aio else grpc
    if tls_ca is None:
        if token is None:
            return grpc_.insecure_channel(address, options=opts)
        if aio:
            return grpc.aio.insecure_channel(address, options=opts, interceptors=_aio_token_interceptors(token))
        return grpc.intercept_channel(grpc.insecure_channel(address, options=opts), _BearerToken(token))
    credentials = grpc.ssl_channel_credentials(
        root_certificates=tls_ca, private_key=tls_key, certificate_chain=tls_cert
    )
    if token is not None:
        credentials = grpc.composite_channel_credentials(credentials, grpc.access_token_call_credentials(token))
    return grpc_.secure_channel(address, credentials, options=opts)


def _with_token(details, header: tuple[str, str]):
    return details._replace(metadata=[*(details.metadata or []), header])


class _BearerToken(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Adds the bearer token to every call of a plaintext channel."""

    def __init__(self, token: str):
        self.header = ("authorization", f"Bearer {token}")

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(_with_token(details, self.header), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(_with_token(details, self.header), request)


def _aio_token_interceptors(token: str) -> list:
    header = ("authorization", f"Bearer {token}")

    class UnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):
        async def intercept_unary_unary(self, continuation, details, request):
            return await continuation(_aio_details(details, header), request)

    class UnaryStream(grpc.aio.UnaryStreamClientInterceptor):
        async def intercept_unary_stream(self, continuation, details, request):
            return await continuation(_aio_details(details, header), request)

    return [UnaryUnary(), UnaryStream()]


def _aio_details(details, header: tuple[str, str]):
    metadata = grpc.aio.Metadata(*(tuple(details.metadata) if details.metadata else ()), header)
    return details._replace(metadata=metadata)
