"""bench/gpu_check.sh's path on a CPU with tiny models built from configs: full-mode training
in bf16, bf16 serving through gRPC of the version and of a config-built 'large' checkpoint,
2 PPO steps, the memory through a hot-swap, one table. On a GPU host the same code runs at
real sizes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO


@pytest.mark.slow
def test_the_gpu_check_runs_end_to_end_on_a_cpu_from_the_repository_alone(tmp_path):
    """gpu_check.sh's CPU path with --offline: the tokenizer trained on the shipped HH pairs, the
    backbone and policy built from configs; no bundled model and no ../shared is read."""
    out = tmp_path / "table.md"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        ["bash", "bench/gpu_check.sh", "--tiny", "--device", "cpu", "--offline", "--out", str(out)],
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
        "hot-swap memory, tiny",
    ):
        assert row in table
    figures = json.loads(raw)
    assert 0.0 <= figures["rm"]["accuracy"] <= 1.0 and figures["rm"]["steps"] >= 1 and figures["rm"]["tokens_per_s"] > 0
    assert (
        figures["served"]["items_per_s"] > 0 and figures["big"]["items_per_s"] > 0 and figures["served"]["p99_ms"] > 0
    )
    assert figures["ppo"]["steps"] == 2
    (swap,) = figures["swaps"]  # two versions on the tiny shape, swapped in the server's own path
    assert swap["size"] == "tiny" and 0 < swap["weight_bytes"] <= swap["predicted_bytes"] + 4 * swap["parameters"]
    assert swap["before_bytes"] < swap["peak_bytes"] <= swap["before_bytes"] + swap["weight_bytes"]


def test_the_dry_run_predicts_each_size_from_its_config_alone():
    """--dry-run builds nothing: parameters from the configs on the meta device, 2 bytes each
    served in bf16, twice that through a swap (the old and the new version)."""
    result = subprocess.run(
        [sys.executable, "bench/gpu_check.py", "--device", "cpu", "--dry-run", "--sizes", "135m,7b"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == ["135m", "7b"]
    assert "6.51B parameters, 13.02 GB served in bf16, 26.04 GB through a swap" in lines[1]
