"""Generated gRPC code must match proto/ (run `make proto` after editing a .proto)."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO


def test_generated_code_is_up_to_date():
    result = subprocess.run([sys.executable, "tools/gen_proto.py", "--check"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_staleness_is_detected():
    sys.path.insert(0, str(REPO / "tools"))
    try:
        import gen_proto
    finally:
        sys.path.pop(0)
    generated = gen_proto.generate()
    assert gen_proto.stale_files(generated) == []
    generated["reward_pb2.py"] += "# edited\n"
    generated["new_pb2.py"] = ""
    assert gen_proto.stale_files(generated) == ["new_pb2.py", "reward_pb2.py"]
