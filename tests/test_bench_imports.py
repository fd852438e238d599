"""Every bench script imports: a name moved in the product breaks its bench here, not at the next run."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO

IMPORT_ALL = """
import importlib.util, sys
sys.path.insert(0, "bench")
for path in sorted(__import__("pathlib").Path("bench").glob("*.py")):
    spec = importlib.util.spec_from_file_location(f"bench_{path.stem}", path)
    module = sys.modules[f"bench_{path.stem}"] = importlib.util.module_from_spec(spec)  # registered: dataclasses look it up
    spec.loader.exec_module(module)  # top level only: each runs under __main__ alone
"""


def test_every_bench_script_imports():
    result = subprocess.run([sys.executable, "-c", IMPORT_ALL], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
