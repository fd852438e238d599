"""Container health probe: asks the server's grpc.health.v1 service, exits 0 only when SERVING.

The image's HEALTHCHECK runs it; it also serves as a Kubernetes exec probe where the native gRPC
probe cannot be used (the kubelet's gRPC probe speaks plaintext only, so a TLS server needs this).

    python healthcheck.py [SERVICE]      # SERVICE: "" (the server), rm.v1.RewardService, ...

Address: RM_HEALTH_ADDRESS, default 127.0.0.1:$RM_SERVE_PORT. With RM_AUTH_TLS_CERT set the
probe speaks TLS, trusting RM_HEALTH_TLS_CA (default: the server's own certificate, which works
for a self-signed one) and checking the name RM_HEALTH_TLS_NAME (default localhost); for mutual
TLS it presents RM_HEALTH_TLS_CLIENT_CERT and RM_HEALTH_TLS_CLIENT_KEY. Health needs no token.
"""

from __future__ import annotations

import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rm_client.channel import open_channel


def channel(address: str) -> grpc.Channel:
    cert = os.environ.get("RM_AUTH_TLS_CERT")
    if not cert:
        return open_channel(address)

    def read(name: str, default: str | None = None) -> bytes | None:
        path = os.environ.get(name, default)
        return open(path, "rb").read() if path else None

    return open_channel(
        address,
        tls_ca=read("RM_HEALTH_TLS_CA", cert),
        tls_cert=read("RM_HEALTH_TLS_CLIENT_CERT"),
        tls_key=read("RM_HEALTH_TLS_CLIENT_KEY"),
        tls_name=os.environ.get("RM_HEALTH_TLS_NAME", "localhost"),
    )


def main(argv: list[str]) -> int:
    service = argv[0] if argv else ""
    address = os.environ.get("RM_HEALTH_ADDRESS") or f"127.0.0.1:{os.environ.get('RM_SERVE_PORT', '50051')}"
    timeout = float(os.environ.get("RM_HEALTH_TIMEOUT_SECONDS", "4"))
    with channel(address) as ch:
        try:
            status = (
                health_pb2_grpc.HealthStub(ch)
                .Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
                .status
            )
        except grpc.RpcError as exc:
            print(f"unhealthy: {address} {service or '(server)'}: {exc.code().name}: {exc.details()}")
            return 1
    name = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
    print(f"{address} {service or '(server)'}: {name}")
    return 0 if status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
