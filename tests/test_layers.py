"""The package's shape: layers that only point down (import-linter contracts in pyproject.toml)
and modules small enough to read in one sitting."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import REPO

MAX_LINES = 400


def test_import_layers_point_down():
    lint = Path(sys.executable).parent / "lint-imports"
    result = subprocess.run([str(lint), "--config", str(REPO / "pyproject.toml")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


def test_no_module_is_longer_than_one_sitting():
    generated = REPO / "rm_service" / "api"
    long = [(str(p.relative_to(REPO)), n) for root in ("rm_service", "policy_trainer") for p in (REPO / root).rglob("*.py")
            if generated not in p.parents and (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES]
    assert not long, f"modules over {MAX_LINES} lines: {long}"
