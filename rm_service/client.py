"""A small gRPC client for rm-service (used by the demo, the tests and scripts): stubs of every
service on one channel (rm_client's channel builder), and the start-and-wait helper."""

from __future__ import annotations

import subprocess
import sys
import time
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


def start_server_process(env: dict[str, str], run_dir: Path, timeout: float) -> tuple[subprocess.Popen, str]:
    """`rm-service serve` on a free loopback port as a child process configured by `env`
    (RM_SERVE_*, ...), its output in `run_dir/server.log`. Returns the process and its
    address once grpc.health.v1 says SERVING; raises RMError, and kills the child, if it
    exits first or takes longer than `timeout` seconds to bind or to become SERVING."""
    port_file, log_path = run_dir / "port", run_dir / "server.log"
    port_file.unlink(missing_ok=True)
    with log_path.open("w") as log:  # the child keeps its own descriptor
        server = subprocess.Popen([sys.executable, "-m", "rm_service.cli", "serve", "--port", "0", "--port-file", str(port_file)],
                                  env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout
        while not (port_file.exists() and port_file.read_text().strip()):
            if server.poll() is not None:
                raise RMError(f"the server exited during start-up (code {server.returncode}); see {log_path}")
            if time.monotonic() > deadline:
                raise RMError(f"the server did not bind within {timeout:.0f}s; see {log_path}")
            time.sleep(0.2)
        address = f"127.0.0.1:{port_file.read_text().strip()}"
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
