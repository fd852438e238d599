"""Generated gRPC code must match proto/ (run `make proto` after editing a .proto): one copy, the
light client's (clients/python/rm_client/api/v1), which rm_service.api.v1 re-exports."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO


def test_generated_code_is_up_to_date():
    result = subprocess.run([sys.executable, "tools/gen_proto.py", "--check"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def _gen_proto():
    sys.path.insert(0, str(REPO / "tools"))
    try:
        import gen_proto
    finally:
        sys.path.pop(0)
    return gen_proto


def test_staleness_is_detected():
    gen_proto = _gen_proto()
    generated = gen_proto.generate()
    assert gen_proto.stale_files(generated) == []
    generated["reward_pb2.py"] += "# edited\n"
    generated["new_pb2.py"] = ""
    assert gen_proto.stale_files(generated) == ["new_pb2.py", "reward_pb2.py"]


def test_light_client_copy_is_in_sync_and_imports_only_itself(tmp_path):
    gen_proto = _gen_proto()
    generated = gen_proto.generate("rm_client.api.v1")
    assert gen_proto.stale_files(generated, gen_proto.OUT_DIR) == []
    assert not [name for name, src in generated.items() if "rm_service" in src]
    gen_proto.write(generated, tmp_path)
    generated["common_pb2.py"] += "# edited\n"
    assert gen_proto.stale_files(generated, tmp_path) == ["common_pb2.py"]


def test_the_service_serves_the_client_s_generated_messages():
    from rm_client.api.v1 import reward_pb2 as client_reward_pb2
    from rm_service.api.v1 import reward_pb2

    assert reward_pb2 is client_reward_pb2  # one generated copy, not two registrations of the same .proto files
