"""bench/gpu_check.py's path on a CPU with tiny models: full-mode training in bf16, bf16
serving through gRPC of the version and of a config-built 'large' checkpoint, 2 PPO steps,
one table. On a GPU host bench/gpu_check.sh runs the same code at real sizes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO


@pytest.mark.slow
def test_the_gpu_check_runs_end_to_end_on_a_cpu_with_tiny_models(tmp_path, tiny_backbone_dir, tiny_lm_dir):
    out = tmp_path / "table.md"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [
            sys.executable,
            "bench/gpu_check.py",
            "--tiny",
            "--device",
            "cpu",
            "--backbone",
            str(tiny_backbone_dir),
            "--policy",
            str(tiny_lm_dir),
            "--out",
            str(out),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    table, raw = out.read_text().split("\n\n")
    for row in (
        "bf16 GEMM",
        "full-mode fine-tune",
        "held-out accuracy",
        "served (bf16, 4 clients), the version",
        "B checkpoint",
        "PPO against the served version",
    ):
        assert row in table
    figures = json.loads(raw)
    assert 0.0 <= figures["rm"]["accuracy"] <= 1.0 and figures["rm"]["steps"] >= 1 and figures["rm"]["tokens_per_s"] > 0
    assert (
        figures["served"]["items_per_s"] > 0 and figures["big"]["items_per_s"] > 0 and figures["served"]["p99_ms"] > 0
    )
    assert figures["ppo"]["steps"] == 2
