"""A small gRPC client for rm-service (used by the demo, the tests and scripts): stubs of every
service on one channel (rm_client's channel builder), and the start-and-wait helper."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rm_client.channel import open_channel
from rm_client.messages import score_item  # noqa: F401  (scripts import it from here)
from rm_service.api.v1 import preference_pb2_grpc, reward_pb2_grpc, training_pb2_grpc
from rm_service.errors import RMError


class Client:
    def __init__(self, address: str, token: str | None = None, tls_ca: bytes | None = None):
        self.channel = open_channel(address, token, tls_ca)
        self.reward = reward_pb2_grpc.RewardServiceStub(self.channel)
        self.preference = preference_pb2_grpc.PreferenceServiceStub(self.channel)
        self.training = training_pb2_grpc.TrainingServiceStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    def wait_serving(self, timeout: float, is_alive=lambda: True) -> None:
        """Poll grpc.health.v1 until SERVING; raises TimeoutError after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not is_alive():
                raise RuntimeError("the server exited before it became SERVING")
            try:
                status = self.health.Check(health_pb2.HealthCheckRequest(), timeout=2).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.25)
        raise TimeoutError(f"server not SERVING after {timeout:.0f}s")

    def close(self) -> None:
        self.channel.close()


def start_server_process(
    env: dict[str, str], run_dir: Path, timeout: float, args: Sequence[str] = (), log_name: str = "server.log"
) -> tuple[subprocess.Popen, str]:
    """`rm-service serve` on a free loopback port as a child process configured by `env`
    (RM_SERVE_*, ...) and extra serve flags `args` (`--no-model`, `--model X`, ...), its output
    in `run_dir/log_name` and its port in the file beside it (`.port` for `.log`). Returns the
    process and its address once grpc.health.v1 says SERVING; raises RMError, and kills the
    child, if it exits first or takes longer than `timeout` seconds to bind or to become
    SERVING. Every test, bench and the demo start a server process through this one helper."""
    log_path = run_dir / log_name
    port_file = log_path.with_suffix(".port")
    port_file.unlink(missing_ok=True)
    command = [sys.executable, "-m", "rm_service.cli", "serve", "--port", "0", "--port-file", str(port_file), *args]
    with log_path.open("w") as log:  # the child keeps its own descriptor
        server = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout
        while (port := _bound_port(port_file)) is None:
            if server.poll() is not None:
                raise RMError(f"the server exited during start-up (code {server.returncode}); see {log_path}")
            if time.monotonic() > deadline:
                raise RMError(f"the server did not bind within {timeout:.0f}s; see {log_path}")
            time.sleep(0.05)
        address = f"127.0.0.1:{port}"
        client = Client(address)
        try:
            client.wait_serving(timeout=timeout, is_alive=lambda: server.poll() is None)
        except (RuntimeError, TimeoutError) as exc:
            raise RMError(f"{exc}; see {log_path}") from exc
        finally:
            client.close()
    except BaseException:
        server.kill()
        server.wait()
        raise
    return server, address


def _bound_port(port_file: Path) -> int | None:
    text = port_file.read_text().strip() if port_file.exists() else ""
    return int(text) if text.isdigit() else None
