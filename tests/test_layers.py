"""The package's shape: layers that only point down (import-linter contracts in pyproject.toml)
and modules small enough to read in one sitting."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO

MAX_LINES = 400


def test_import_layers_point_down():
    # import-linter's own entry point, run by this interpreter (a venv that borrows its packages has no lint-imports
    # script)
    lint = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    result = subprocess.run(
        [sys.executable, "-c", lint, "--config", str(REPO / "pyproject.toml")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


def test_no_module_is_longer_than_one_sitting():
    """Every hand-written module of the service, the trainer and the light client (the
    generated rm.v1 stubs aside) is at most MAX_LINES lines."""
    roots = [REPO / "rm_service", REPO / "policy_trainer", REPO / "clients" / "python" / "rm_client"]
    generated = [REPO / "rm_service" / "api", REPO / "clients" / "python" / "rm_client" / "api" / "v1"]
    modules = [p for root in roots for p in root.rglob("*.py") if not any(g in p.parents for g in generated)]
    assert len(modules) > 100 and any("rm_client" in p.parts for p in modules)  # the walk found the packages
    long = [
        (str(p.relative_to(REPO)), n)
        for p in modules
        if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES
    ]
    assert not long, f"modules over {MAX_LINES} lines: {long}"
